//! PatchCore or PaDiM on the 12 PIPED classes fitted as anomalib's peer script fits them (every
//! train/good image, no hold-out, so no threshold), for a like-for-like quality comparison:
//! image AUROC, pixel AUROC and AUPRO@0.3 (MVTec 2021) per class and their mean, on maps at the
//! masks' resolution.
//!
//! cargo run --release -p vigil-bench --example memory_bank_quality -- [--method patchcore|padim]
//!     [--settings JSON]      e.g. --settings '{"map_upsampling":"nearest"}'

use vigil_bench::{arg, piped_root};
use vigil_core::VigilError;
use vigil_data::dataset::Dataset;
use vigil_engine::run::{test_items, ImageFilter};
use vigil_engine::{evaluate, fit, EvalOptions, FitOptions, MethodSpec, PipelineOptions};
use vigil_metrics::ThresholdRule;

fn main() -> anyhow::Result<()> {
    let method = arg("--method").unwrap_or_else(|| "patchcore".into());
    let settings: serde_json::Value = match arg("--settings") {
        Some(s) => serde_json::from_str(&s).map_err(|e| VigilError::Config(format!("--settings: {e}")))?,
        None => serde_json::json!({}),
    };
    if !matches!(method.as_str(), "patchcore" | "padim") {
        anyhow::bail!("unknown --method {method} (patchcore or padim)");
    }
    // The settings given override the method's defaults, key by key.
    let params: Vec<String> =
        settings.as_object().map(|o| o.iter().map(|(k, v)| format!("{k}={v}")).collect()).unwrap_or_default();
    let spec = MethodSpec::parse(&method, &params)?;
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
        // Every training image, no hold-out: the threshold is irrelevant to these metrics.
        let opts = FitOptions {
            fit_on_all: true,
            image_threshold: Some(ThresholdRule::Fixed(0.0)),
            ..Default::default()
        };
        let model = fit(&spec, dataset.train.clone(), &PipelineOptions::default(), opts)?;
        let eval = evaluate(
            &model,
            &test_items(&dataset, &ImageFilter::default()),
            EvalOptions { resize_masks: true, ..Default::default() },
        )?;
        let m = &eval.metrics;
        let missing = || VigilError::invalid(format!("{}: a metric is undefined", dataset.name));
        let row = [
            m.image_auroc.ok_or_else(missing)?,
            m.pixel_auroc.ok_or_else(missing)?,
            m.aupro.ok_or_else(missing)?,
        ];
        sums.iter_mut().zip(&row).for_each(|(s, v)| *s += v);
        println!("| {} | {:.4} | {:.4} | {:.4} |", dataset.name, row[0], row[1], row[2]);
    }
    let n = classes.len() as f64;
    println!("| **mean** | {:.4} | {:.4} | {:.4} |", sums[0] / n, sums[1] / n, sums[2] / n);
    Ok(())
}
