//! Fits any registered method on every image of one MVTec-layout class's train/good and writes the
//! anomaly map and image score of every test image, for metrics computed outside: the side-by-side
//! runs with anomalib (`benchmarks/*_vs_anomalib`) read the same layout from both tools.
//!
//! cargo run --release -p vigil-bench --example method_maps -- <method> <class dir> <out dir> ['<settings JSON>'] [seed]
//!
//! The settings JSON overrides the method's defaults key by key (`vigil methods` lists them).
//! Writes `<out dir>/maps.f32` (the maps one after another, row-major, little-endian f32, at each
//! image's size) and `<out dir>/index.json` (per image: path relative to the class folder, score,
//! width, height; the settings, the seed, the fit time and the scoring time per image).

use std::path::Path;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use vigil_bench::{list_images, method_spec};
use vigil_core::{FitContext, InMemorySource};

fn run(method: &str, class: &Path, out: &Path, settings: &str, seed: u64) -> anyhow::Result<()> {
    let mut detector = method_spec(method, settings)?.build()?;
    let mode = detector.channel_mode();
    let load = |path: &Path| vigil_data::io::load_image(path).map(|image| mode.convert(&image));
    let train =
        list_images(&class.join("train/good"))?.iter().map(|p| load(p)).collect::<Result<Vec<_>, _>>()?;
    let start = Instant::now();
    let ctx = FitContext { seed, checkpoint_dir: None, show_progress: false };
    detector.fit(&InMemorySource::new(train), &ctx)?;
    let fit_s = start.elapsed().as_secs_f64();

    let mut maps = Vec::new();
    let mut index = Vec::new();
    let mut score_s = 0.0;
    let test = class.join("test");
    let mut kinds: Vec<_> = std::fs::read_dir(&test)
        .with_context(|| format!("{}: cannot read", test.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    kinds.sort();
    for dir in kinds {
        for path in list_images(&dir)? {
            let image = load(&path)?;
            let start = Instant::now();
            let scored = detector.score(&image, None)?;
            score_s += start.elapsed().as_secs_f64();
            maps.extend(scored.map.data.iter().flat_map(|v| v.to_le_bytes()));
            let relative = path.strip_prefix(class).unwrap_or(&path).to_string_lossy().to_string();
            index.push(serde_json::json!({
                "path": relative, "score": scored.image_score.unwrap_or(scored.map.max()),
                "width": scored.map.width, "height": scored.map.height,
            }));
        }
    }
    std::fs::create_dir_all(out).with_context(|| format!("{}: cannot create", out.display()))?;
    let maps_path = out.join("maps.f32");
    std::fs::write(&maps_path, maps).with_context(|| format!("{}: cannot write", maps_path.display()))?;
    let meta = serde_json::json!({
        "images": index, "fit_s": fit_s, "score_s_per_image": score_s / index.len().max(1) as f64,
        "method": method, "settings": detector.settings(), "seed": seed,
    });
    let index_path = out.join("index.json");
    std::fs::write(&index_path, meta.to_string())
        .with_context(|| format!("{}: cannot write", index_path.display()))?;
    println!("{} {}: fit {fit_s:.1} s, {} test images", method, class.display(), index.len());
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 4 {
        eprintln!("usage: method_maps <method> <class dir> <out dir> ['<settings JSON>'] [seed]");
        return ExitCode::FAILURE;
    }
    let settings = args.get(4).map_or("{}", String::as_str);
    let seed = match args.get(5).map(|s| s.parse::<u64>()).transpose() {
        Ok(seed) => seed.unwrap_or(0),
        Err(e) => {
            eprintln!("error: seed {:?}: {e}", args[5]);
            return ExitCode::FAILURE;
        }
    };
    let result = run(&args[1], Path::new(&args[2]), Path::new(&args[3]), settings, seed);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
