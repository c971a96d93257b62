//! Train DRAEM on every class of an MVTec-layout dataset (PIPED) and report image AUROC, pixel
//! AUROC, AUPRO@0.3 and pixel AP per class, training time and inference time per image.
//!
//!   RAYON_NUM_THREADS=2 cargo run --release -p vigil-draem --example draem_piped_eval -- \
//!       <data root> <cpu|paper> <draem|unetpp> [steps] [texture folder|procedural|self] [class ...]
//!
//! Prints a markdown table (one row per class and the mean) and one JSON line per class.

use std::path::{Path, PathBuf};
use std::time::Instant;

use vigil_core::{Detector, FitContext, InMemorySource, Mask};
use vigil_data::{list_classes, load_image, load_mask, Dataset};
use vigil_draem::{DraemDetector, DraemSettings, Variant};

struct Row {
    class: String,
    image_auroc: f64,
    pixel_auroc: f64,
    aupro: f64,
    pixel_ap: f64,
    train_s: f64,
    infer_ms: f64,
}

fn evaluate(root: &Path, settings: &DraemSettings) -> Result<Row, Box<dyn std::error::Error>> {
    let data = Dataset::mvtec(root)?;
    let train = InMemorySource::new(data.train.iter().map(|p| load_image(p)).collect::<Result<_, _>>()?);
    let mut det = DraemDetector::new(settings.clone())?;
    let t = Instant::now();
    det.fit(&train, &FitContext { seed: 0, checkpoint_dir: None, show_progress: false })?;
    let train_s = t.elapsed().as_secs_f64();

    let (mut image_scores, mut labels) = (Vec::new(), Vec::new());
    let (mut maps, mut masks, mut sizes) = (Vec::new(), Vec::new(), Vec::new());
    let mut infer = 0.0;
    for item in &data.test {
        let image = load_image(&item.path)?.to_rgb();
        let t = Instant::now();
        let out = det.score(&image, None)?;
        infer += t.elapsed().as_secs_f64();
        let (w, h) = (image.width, image.height);
        let mask = match &item.mask {
            Some(p) => load_mask(p, Some((w, h)), true)?,
            None => Mask::empty(w, h),
        };
        image_scores.push(out.image_score.expect("DRAEM gives an image score") as f64);
        labels.push(item.label);
        maps.push(out.map.data);
        masks.push(mask.data);
        sizes.push((w, h));
    }
    let all_pixels: Vec<f32> = maps.iter().flatten().copied().collect();
    let all_truth: Vec<bool> = masks.iter().flatten().copied().collect();
    let map_refs: Vec<&[f32]> = maps.iter().map(|m| m.as_slice()).collect();
    let mask_refs: Vec<&[bool]> = masks.iter().map(|m| m.as_slice()).collect();
    Ok(Row {
        class: data.name,
        image_auroc: vigil_metrics::roc_auc(&image_scores, &labels)?,
        pixel_auroc: vigil_metrics::roc_auc(&all_pixels, &all_truth)?,
        aupro: vigil_metrics::aupro(&map_refs, &mask_refs, &sizes, 0.3)?,
        pixel_ap: vigil_metrics::average_precision(&all_pixels, &all_truth)?,
        train_s,
        infer_ms: 1e3 * infer / data.test.len() as f64,
    })
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 4 {
        return Err(
            "usage: draem_piped_eval <root> <cpu|paper> <draem|unetpp> [steps] [source] [class ...]".into()
        );
    }
    let variant = match args[3].as_str() {
        "draem" => Variant::Draem,
        "unetpp" => Variant::Unetpp,
        other => return Err(format!("unknown variant {other}").into()),
    };
    let mut settings = DraemSettings::preset(&args[2], variant)?;
    if let Some(steps) = args.get(4) {
        settings.steps = steps.parse()?;
    }
    if let Some(source) = args.get(5) {
        settings.anomaly_source = source.clone();
    }
    let classes: Vec<PathBuf> = if args.len() > 6 {
        args[6..].iter().map(|c| Path::new(&args[1]).join(c)).collect()
    } else {
        list_classes(Path::new(&args[1]))?
    };
    eprintln!("settings: {}", serde_json::to_string(&settings)?);
    println!("| class | image AUROC | pixel AUROC | AUPRO@0.3 | pixel AP | train s | infer ms/img |");
    println!("|---|---|---|---|---|---|---|");
    let mut rows = Vec::new();
    for class in classes {
        let row = evaluate(&class, &settings)?;
        println!(
            "| {} | {:.3} | {:.3} | {:.3} | {:.3} | {:.0} | {:.1} |",
            row.class, row.image_auroc, row.pixel_auroc, row.aupro, row.pixel_ap, row.train_s, row.infer_ms
        );
        eprintln!(
            "{}",
            serde_json::json!({"class": row.class, "method": settings.method_name(), "image_auroc": row.image_auroc,
                "pixel_auroc": row.pixel_auroc, "aupro": row.aupro, "pixel_ap": row.pixel_ap,
                "train_s": row.train_s, "infer_ms": row.infer_ms})
        );
        rows.push(row);
    }
    let n = rows.len() as f64;
    let mean = |f: fn(&Row) -> f64| rows.iter().map(f).sum::<f64>() / n;
    println!(
        "| **mean** | {:.3} | {:.3} | {:.3} | {:.3} | {:.0} | {:.1} |",
        mean(|r| r.image_auroc),
        mean(|r| r.pixel_auroc),
        mean(|r| r.aupro),
        mean(|r| r.pixel_ap),
        mean(|r| r.train_s),
        mean(|r| r.infer_ms)
    );
    Ok(())
}
