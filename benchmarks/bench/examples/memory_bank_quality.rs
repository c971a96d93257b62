//! PatchCore or PaDiM on the 12 PIPED classes fitted as anomalib's peer script fits them (every
//! train/good image, no hold-out, so no threshold), for a like-for-like quality comparison:
//! image AUROC, pixel AUROC and AUPRO@0.3 (MVTec 2021) per class and their mean, on maps at the
//! masks' resolution.
//!
//! cargo run --release -p vigil-bench --example memory_bank_quality -- [--method patchcore|padim]
//!     [--settings JSON]      e.g. --settings '{"map_upsampling":"nearest"}'

use vigil_bench::{arg, method_spec, piped_classes, required};
use vigil_data::dataset::Dataset;
use vigil_engine::run::{test_items, ImageFilter};
use vigil_engine::{evaluate, fit, EvalOptions, FitOptions, PipelineOptions};
use vigil_metrics::ThresholdRule;

fn main() -> anyhow::Result<()> {
    let method = arg("--method").unwrap_or_else(|| "patchcore".into());
    let settings = arg("--settings").unwrap_or_else(|| "{}".into());
    if !matches!(method.as_str(), "patchcore" | "padim") {
        anyhow::bail!("unknown --method {method} (patchcore or padim)");
    }
    let spec = method_spec(&method, &settings)?;
    let classes = piped_classes(&[])?;
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
        let row = [
            required(m.image_auroc, "image AUROC", &dataset.name)?,
            required(m.pixel_auroc, "pixel AUROC", &dataset.name)?,
            required(m.aupro, "AUPRO", &dataset.name)?,
        ];
        sums.iter_mut().zip(&row).for_each(|(s, v)| *s += v);
        println!("| {} | {:.4} | {:.4} | {:.4} |", dataset.name, row[0], row[1], row[2]);
    }
    let n = classes.len() as f64;
    println!("| **mean** | {:.4} | {:.4} | {:.4} |", sums[0] / n, sums[1] / n, sums[2] / n);
    Ok(())
}
