//! PatchCore or PaDiM on the 12 PIPED classes fitted as anomalib's peer script fits them (every
//! train/good image, no hold-out, so no threshold), for a like-for-like quality comparison:
//! image AUROC, pixel AUROC and AUPRO@0.3 (MVTec 2021) per class and their mean, on maps at the
//! masks' resolution.
//!
//! cargo run --release -p vigil-bench --example memory_bank_quality -- [--method patchcore|padim]
//!     [--settings JSON]      e.g. --settings '{"map_upsampling":"nearest"}'

use vigil_bench::{arg, load_rgb, piped_root};
use vigil_core::{Detector, FitContext, InMemorySource, Result, VigilError};
use vigil_data::dataset::Dataset;
use vigil_data::io::load_mask;
use vigil_metrics::{aupro, roc_auc};
use vigil_padim::{PadimDetector, PadimSettings};
use vigil_patchcore::{PatchcoreDetector, PatchcoreSettings};

fn detector(method: &str, settings: &serde_json::Value) -> Result<Box<dyn Detector>> {
    let bad = |e: serde_json::Error| VigilError::Config(format!("--settings: {e}"));
    Ok(match method {
        "patchcore" => Box::new(PatchcoreDetector::new(
            serde_json::from_value::<PatchcoreSettings>(settings.clone()).map_err(bad)?,
        )?),
        "padim" => Box::new(PadimDetector::new(
            serde_json::from_value::<PadimSettings>(settings.clone()).map_err(bad)?,
        )?),
        other => return Err(VigilError::Config(format!("unknown --method {other} (patchcore or padim)"))),
    })
}

fn main() -> Result<()> {
    let method = arg("--method").unwrap_or_else(|| "patchcore".into());
    let settings: serde_json::Value = match arg("--settings") {
        Some(s) => serde_json::from_str(&s).map_err(|e| VigilError::Config(format!("--settings: {e}")))?,
        None => serde_json::json!({}),
    };
    let root = piped_root();
    let mut classes: Vec<_> = std::fs::read_dir(&root)
        .map_err(|e| VigilError::io(&root, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("train/good").is_dir())
        .collect();
    classes.sort();
    println!("method {method} settings {settings} threads {}", rayon::current_num_threads());
    println!();
    println!("| class | image AUROC | pixel AUROC | AUPRO@0.3 |");
    println!("|---|---:|---:|---:|");
    let mut sums = [0.0; 3];
    for class in &classes {
        let dataset = Dataset::discover(class)?;
        let train = dataset.train.iter().map(|p| load_rgb(p)).collect::<Result<Vec<_>>>()?;
        let mut d = detector(&method, &settings)?;
        d.fit(
            &InMemorySource::new(train),
            &FitContext { seed: 0, checkpoint_dir: None, show_progress: false },
        )?;
        let (mut image_scores, mut labels, mut maps, mut masks, mut sizes) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for item in &dataset.test {
            let image = load_rgb(&item.path)?;
            let scored = d.score(&image, None)?;
            let size = (image.width, image.height);
            let mask = match &item.mask {
                Some(m) => load_mask(m, Some(size), true)?.data,
                None => vec![false; size.0 * size.1],
            };
            image_scores.push(scored.image_score.expect("PatchCore and PaDiM give image scores") as f64);
            labels.push(item.label);
            maps.push(scored.map.data);
            masks.push(mask);
            sizes.push(size);
        }
        let pixel_scores: Vec<f32> = maps.iter().flatten().copied().collect();
        let pixel_labels: Vec<bool> = masks.iter().flatten().copied().collect();
        let map_refs: Vec<&[f32]> = maps.iter().map(Vec::as_slice).collect();
        let mask_refs: Vec<&[bool]> = masks.iter().map(Vec::as_slice).collect();
        let row = [
            roc_auc(&image_scores, &labels)?,
            roc_auc(&pixel_scores, &pixel_labels)?,
            aupro(&map_refs, &mask_refs, &sizes, 0.3)?,
        ];
        sums.iter_mut().zip(&row).for_each(|(s, v)| *s += v);
        println!("| {} | {:.4} | {:.4} | {:.4} |", dataset.name, row[0], row[1], row[2]);
    }
    let n = classes.len() as f64;
    println!("| **mean** | {:.4} | {:.4} | {:.4} |", sums[0] / n, sums[1] / n, sums[2] / n);
    Ok(())
}
