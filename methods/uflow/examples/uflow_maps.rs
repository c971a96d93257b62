//! Fits U-Flow on every image of one MVTec-layout class's train/good and writes the anomaly map and
//! image score of every test image, for metrics computed outside (the side-by-side with anomalib in
//! `benchmarks/uflow_vs_anomalib`, which reads the same layout from both tools).
//!
//! cargo run --release -p vigil-uflow --example uflow_maps -- <class dir> <out dir> ['<settings JSON>'] [seed]
//!
//! Writes `<out dir>/maps.f32` (the maps one after another, row-major, little-endian f32, at each
//! image's size) and `<out dir>/index.json` (per image: path relative to the class folder, score,
//! width, height; the fit time and the loss per epoch).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use vigil_core::{Detector, FitContext, Image, InMemorySource, Result, VigilError};
use vigil_uflow::{UflowDetector, UflowSettings};

fn images_in(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| VigilError::file(dir, e.to_string()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    paths.sort();
    Ok(paths)
}

fn load(path: &Path) -> Result<Image> {
    Ok(vigil_data::load_image(path)?.to_rgb())
}

fn run(class: &Path, out: &Path, settings: UflowSettings, seed: u64) -> Result<()> {
    let train = images_in(&class.join("train/good"))?.iter().map(|p| load(p)).collect::<Result<Vec<_>>>()?;
    let mut detector = UflowDetector::new(settings);
    let start = Instant::now();
    let ctx = FitContext { seed, checkpoint_dir: None, show_progress: false };
    detector.fit(&InMemorySource::new(train), &ctx)?;
    let fit_s = start.elapsed().as_secs_f64();

    let mut maps = Vec::new();
    let mut index = Vec::new();
    let test = class.join("test");
    for dir in images_in(&test)?.into_iter().filter(|d| d.is_dir()) {
        for path in images_in(&dir)? {
            let image = load(&path)?;
            let scored = detector.score(&image, None)?;
            maps.extend(scored.map.data.iter().flat_map(|v| v.to_le_bytes()));
            let relative = path.strip_prefix(class).unwrap_or(&path).to_string_lossy().to_string();
            index.push(serde_json::json!({
                "path": relative, "score": scored.image_score.unwrap_or(scored.map.max()),
                "width": scored.map.width, "height": scored.map.height,
            }));
        }
    }
    std::fs::create_dir_all(out).map_err(|e| VigilError::file(out, e.to_string()))?;
    let maps_path = out.join("maps.f32");
    std::fs::write(&maps_path, maps).map_err(|e| VigilError::file(&maps_path, e.to_string()))?;
    let meta = serde_json::json!({
        "images": index, "fit_s": fit_s, "epoch_losses": detector.loss_history,
        "settings": detector.settings(), "seed": seed,
    });
    let index_path = out.join("index.json");
    std::fs::write(&index_path, meta.to_string())
        .map_err(|e| VigilError::file(&index_path, e.to_string()))?;
    println!("{}: fit {fit_s:.1} s, {} test images", class.display(), index.len());
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        eprintln!("usage: uflow_maps <class dir> <out dir> ['<settings JSON>'] [seed]");
        return ExitCode::FAILURE;
    }
    let settings = match args.get(3) {
        None => Ok(UflowSettings::default()),
        Some(json) => serde_json::from_str::<UflowSettings>(json).map_err(|e| format!("settings: {e}")),
    };
    let seed = match args.get(4).map(|s| s.parse::<u64>()) {
        None => Ok(0),
        Some(Ok(seed)) => Ok(seed),
        Some(Err(e)) => Err(format!("seed {:?}: {e}", args[4])),
    };
    let result = settings.and_then(|s| {
        let seed = seed?;
        run(Path::new(&args[1]), Path::new(&args[2]), s, seed).map_err(|e| e.to_string())
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
