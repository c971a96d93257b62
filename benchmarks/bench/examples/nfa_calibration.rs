//! Quality and NFA calibration of one a contrario configuration on the PIPED classes
//! (`<workspace>/../shared/data/piped`), through the engine: one markdown row per class and a mean row.
//!
//! Every fifth train/good image (sorted by name) is held out and the detector fitted on the rest
//! with the threshold `nfa-calibrated:0`: the fit counts the false detections (8-connected regions of
//! log10 NFA <= 0) on the held-out normals and sets the calibrated level for K = 0 (at most one false
//! detection per image). test/ is then evaluated at the theoretical level (log10 NFA <= 0) and at the
//! calibrated one: image AUROC (maximum score), pixel AUROC, AUPRO@0.3, false regions per normal test
//! image and the share of normal / anomalous test images with at least one detection.
//!
//! RAYON_NUM_THREADS=2 cargo run --release -p vigil-bench --example nfa_calibration -- \
//!     '{"feature":"cnn","nfa":"region"}' [CLASS...]

use std::path::{Path, PathBuf};

use vigil_bench::{method_spec, piped_classes, required};
use vigil_core::ThresholdLevel;
use vigil_data::dataset::Dataset;
use vigil_engine::run::{test_items, ImageFilter};
use vigil_engine::{
    evaluate, fit_with_held_out, training_images, EvalOptions, FitOptions, MethodSpec, Metrics, Model,
    PipelineOptions,
};
use vigil_metrics::ThresholdRule;

/// One class's figures, in table order.
const COLUMNS: [&str; 13] = [
    "image AUROC",
    "pixel AUROC",
    "AUPRO@0.3",
    "held-out false regions @0",
    "calibrated level",
    "false regions / normal @0",
    "false regions / normal @cal",
    "normal flagged @0",
    "normal flagged @cal",
    "anomalous flagged @0",
    "anomalous flagged @cal",
    "fit s",
    "s / image",
];

/// The protocol's split: every fifth image (the 5th, 10th, ...) is held out, the rest fitted on.
fn every_fifth_held_out(images: Vec<PathBuf>) -> (Vec<PathBuf>, Vec<PathBuf>) {
    let (held_out, fit): (Vec<_>, Vec<_>) = images.into_iter().enumerate().partition(|(i, _)| i % 5 == 4);
    (fit.into_iter().map(|(_, p)| p).collect(), held_out.into_iter().map(|(_, p)| p).collect())
}

/// Makes the model decide images and pixels with `rule` (an NFA rule, which needs no scores).
fn decide_with(model: &mut Model, rule: ThresholdRule) -> anyhow::Result<()> {
    model.image_threshold = rule.compute(ThresholdLevel::Image, &[], &[])?;
    model.pixel_threshold = rule.compute(ThresholdLevel::Pixel, &[], &[])?;
    Ok(())
}

fn class_row(spec: &MethodSpec, class_dir: &Path) -> anyhow::Result<Vec<f64>> {
    let filter = ImageFilter::default();
    let dataset = Dataset::discover(class_dir)?;
    let (fit_paths, held_out) = every_fifth_held_out(training_images(class_dir, &filter)?);
    let opts = FitOptions { image_threshold: Some(ThresholdRule::NfaCalibrated(0.0)), ..Default::default() };
    let mut model = fit_with_held_out(spec, fit_paths, held_out, &PipelineOptions::default(), opts)?;
    let level = model.image_threshold.log10_nfa_level().expect("an NFA threshold has a level");
    let held_out_false_regions = model.fit_info["nfa_check"]["false_detections_per_image_at_theoretical"]
        .as_f64()
        .ok_or_else(|| anyhow::anyhow!("{}: the fit made no NFA check", dataset.name))?;

    let items = test_items(&dataset, &filter);
    let calibrated = evaluate(&model, &items, EvalOptions::default())?.metrics;
    decide_with(&mut model, ThresholdRule::Nfa(0.0))?;
    let theoretical = evaluate(&model, &items, EvalOptions::default())?.metrics;

    let class = dataset.name.as_str();
    let at_both = |metric: fn(&Metrics) -> Option<f64>, name: &str| -> anyhow::Result<[f64; 2]> {
        Ok([required(metric(&theoretical), name, class)?, required(metric(&calibrated), name, class)?])
    };
    let false_regions = at_both(|m| m.false_regions_per_normal_image, "false regions per normal image")?;
    let normal_flagged = at_both(|m| m.image_false_positive_rate, "image false-positive rate")?;
    let anomalous_flagged = at_both(|m| m.image_recall, "image recall")?;
    Ok(vec![
        required(calibrated.image_auroc, "image AUROC", class)?,
        required(calibrated.pixel_auroc, "pixel AUROC", class)?,
        required(calibrated.aupro, "AUPRO", class)?,
        held_out_false_regions,
        level,
        false_regions[0],
        false_regions[1],
        normal_flagged[0],
        normal_flagged[1],
        anomalous_flagged[0],
        anomalous_flagged[1],
        model.fit_seconds(),
        calibrated.seconds_per_image,
    ])
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(settings) = args.first() else {
        eprintln!("usage: nfa_calibration '<acontrario settings JSON>' [CLASS...]");
        std::process::exit(2);
    };
    let spec = method_spec("acontrario", settings)?;
    let classes = piped_classes(&args[1..])?;
    println!("settings: {settings}\n");
    println!("| class | {} |", COLUMNS.join(" | "));
    println!("|---|{}", "---:|".repeat(COLUMNS.len()));
    let mut sums = vec![0f64; COLUMNS.len()];
    for class_dir in &classes {
        let row = class_row(&spec, class_dir)?;
        let name = class_dir.file_name().unwrap_or_default().to_string_lossy();
        println!("| {name} | {} |", row.iter().map(|v| format!("{v:.3}")).collect::<Vec<_>>().join(" | "));
        sums.iter_mut().zip(&row).for_each(|(s, v)| *s += v);
    }
    let n = classes.len() as f64;
    println!(
        "| **mean** | {} |",
        sums.iter().map(|v| format!("{:.3}", v / n)).collect::<Vec<_>>().join(" | ")
    );
    Ok(())
}
