//! Pixel AUROC and time per image of the a contrario detector on PIPED classes (MVTec layout under
//! `<workspace>/../shared/data/piped`).
//!
//! cargo run --release -p vigil-acontrario --example piped_eval -- pca test-image pixel PA_BDP01_TL PA_GLA01_TL

use std::path::{Path, PathBuf};
use std::time::Instant;

use vigil_acontrario::{AcontrarioDetector, AcontrarioSettings};
use vigil_core::{Detector, FitContext, Image, ImageSource, Result, VigilError};

fn load_rgb(path: &Path) -> Result<Image> {
    let img = image::open(path).map_err(|e| VigilError::file(path, e.to_string()))?.to_rgb8();
    let (w, h) = (img.width() as usize, img.height() as usize);
    let mut data = vec![0f32; 3 * w * h];
    for (i, p) in img.pixels().enumerate() {
        for c in 0..3 {
            data[c * w * h + i] = p[c] as f32 / 255.0;
        }
    }
    Image::new(w, h, 3, data)
}

fn pngs(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    files.retain(|p| p.extension().is_some_and(|e| e == "png"));
    files.sort();
    files
}

struct Files(Vec<PathBuf>);

impl ImageSource for Files {
    fn len(&self) -> usize {
        self.0.len()
    }
    fn name(&self, index: usize) -> String {
        self.0[index].display().to_string()
    }
    fn load(&self, index: usize) -> Result<Image> {
        load_rgb(&self.0[index])
    }
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 4 {
        eprintln!("usage: piped_eval <pca|gabor> <test-image|training> <pixel|block> CLASS...");
        std::process::exit(2);
    }
    let settings: AcontrarioSettings = serde_json::from_value(serde_json::json!({
        "feature": args[0], "statistics": args[1], "nfa": args[2]
    }))
    .map_err(|e| VigilError::Config(e.to_string()))?;
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data/piped");
    if !root.exists() {
        println!("PIPED data not found at {}: nothing to evaluate", root.display());
        return Ok(());
    }
    let mut aurocs = Vec::new();
    let (mut total_time, mut total_images) = (0f64, 0usize);
    for class in &args[3..] {
        let dir = root.join(class);
        let mut det = AcontrarioDetector::new(settings.clone());
        det.fit(&Files(pngs(&dir.join("train/good"))), &FitContext::default())?;
        let (mut scores, mut labels) = (Vec::new(), Vec::new());
        for (file, anomalous) in pngs(&dir.join("test/good"))
            .into_iter()
            .map(|f| (f, false))
            .chain(pngs(&dir.join("test/impurity")).into_iter().map(|f| (f, true)))
        {
            let image = load_rgb(&file)?;
            let start = Instant::now();
            let out = det.score(&image, None)?;
            total_time += start.elapsed().as_secs_f64();
            total_images += 1;
            let mask: Vec<bool> = if anomalous {
                let stem = file.file_stem().unwrap().to_string_lossy();
                let path = dir.join("ground_truth/impurity").join(format!("{stem}_mask.png"));
                let m = image::open(&path).map_err(|e| VigilError::file(&path, e.to_string()))?.to_luma8();
                m.pixels().map(|p| p[0] > 127).collect()
            } else {
                vec![false; image.width * image.height]
            };
            scores.extend_from_slice(&out.map.data);
            labels.extend(mask);
        }
        let auroc = vigil_metrics::roc_auc(&scores, &labels)?;
        println!("{class}: pixel AUROC {auroc:.4}");
        aurocs.push(auroc);
    }
    println!(
        "{:?}/{:?}/{:?}: mean pixel AUROC {:.4} over {} classes; {:.3} s per image",
        settings.feature,
        settings.statistics,
        settings.nfa,
        aurocs.iter().sum::<f64>() / aurocs.len() as f64,
        aurocs.len(),
        total_time / total_images as f64
    );
    Ok(())
}
