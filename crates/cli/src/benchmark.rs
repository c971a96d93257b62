//! `vigil benchmark`: methods x dataset classes -> benchmark.csv and benchmark.md (per class and mean).

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Result};
use vigil_data::dataset::Dataset;
use vigil_engine::outputs::{prepare_output, write_test_outputs};
use vigil_engine::{evaluate, fit, training_images, EvalOptions, MethodSpec, Metrics};

use crate::args::BenchmarkArgs;
use crate::options;

const HEADERS: [&str; 16] = [
    "method",
    "class",
    "image AUROC",
    "image AP",
    "pixel AUROC",
    "pixel AP",
    "AUPRO@0.3",
    "threshold",
    "image precision",
    "image recall",
    "pixel precision",
    "pixel recall",
    "mIoU",
    "false regions / normal image",
    "fit s",
    "s / image",
];

fn classes(root: &Path, only: Option<&str>) -> Result<Vec<PathBuf>> {
    let mut found = if root.join("train").join("good").is_dir() {
        vec![root.to_path_buf()]
    } else {
        vigil_data::dataset::list_classes(root)?
    };
    if let Some(only) = only {
        let wanted: Vec<&str> = only.split(',').map(str::trim).collect();
        found.retain(|p| p.file_name().is_some_and(|n| wanted.contains(&n.to_string_lossy().as_ref())));
        if found.len() != wanted.len() {
            bail!("--classes: some of {wanted:?} are not classes under {}", root.display());
        }
    }
    if found.is_empty() {
        bail!("{}: no MVTec-layout class folder (with train/good) found", root.display());
    }
    Ok(found)
}

fn fmt(v: Option<f64>) -> String {
    v.map(|x| format!("{x:.4}")).unwrap_or_else(|| "n/a".into())
}

fn row(method: &str, class: &str, m: &Metrics, threshold: &str, fit_s: f64) -> Vec<String> {
    vec![
        method.to_string(),
        class.to_string(),
        fmt(m.image_auroc),
        fmt(m.image_ap),
        fmt(m.pixel_auroc),
        fmt(m.pixel_ap),
        fmt(m.aupro),
        threshold.to_string(),
        fmt(m.image_precision),
        fmt(m.image_recall),
        fmt(m.pixel_precision),
        fmt(m.pixel_recall),
        fmt(m.miou),
        fmt(m.false_regions_per_normal_image),
        format!("{fit_s:.2}"),
        format!("{:.4}", m.seconds_per_image),
    ]
}

/// The row of a method and class that failed: the error in place of the metrics.
fn failed_row(method: &str, class: &str, error: &anyhow::Error) -> Vec<String> {
    let mut r = vec![method.to_string(), class.to_string()];
    r.resize(HEADERS.len(), "failed".into());
    r[7] = format!("failed: {}", format!("{error:#}").replace(['\n', '|'], " "));
    r
}

/// Mean of each numeric column over a method's classes ("n/a" entries are left out and flagged).
fn mean_row(method: &str, rows: &[Vec<String>]) -> Vec<String> {
    let mut out = vec![method.to_string(), "**mean**".to_string()];
    for col in 2..HEADERS.len() {
        if HEADERS[col] == "threshold" {
            out.push(rows.first().map(|r| r[col].clone()).unwrap_or_default());
            continue;
        }
        let values: Vec<f64> = rows.iter().filter_map(|r| r[col].parse::<f64>().ok()).collect();
        out.push(if values.is_empty() {
            "n/a".into()
        } else {
            let mean = values.iter().sum::<f64>() / values.len() as f64;
            let partial = if values.len() < rows.len() { "*" } else { "" };
            format!("{mean:.4}{partial}")
        });
    }
    out
}

pub fn benchmark_command(args: BenchmarkArgs) -> Result<()> {
    let config = args.config.clone();
    let args: BenchmarkArgs = crate::config::merge_with_file(args, config.as_deref())?;
    let data = args.data.as_deref().ok_or_else(|| anyhow!("--data <dataset root> is required"))?;
    if args.methods.is_empty() {
        bail!("give at least one --method (see `vigil methods`)");
    }
    let out = args.out.clone().unwrap_or_else(|| PathBuf::from("runs/benchmark"));
    let specs: Vec<MethodSpec> =
        args.methods.iter().map(|m| MethodSpec::parse(m, &args.fit.params)).collect::<Result<_>>()?;
    let class_dirs = classes(data, args.classes.as_deref())?;
    let pipeline = options::pipeline(&args.pipeline)?;
    let filter = options::filter(&args.pipeline, false);
    let opts = options::fit(&args.fit, &filter)?;
    let report_folders: Vec<String> = specs.iter().map(|s| sanitize(&s.label())).collect();
    let folders: Vec<&str> =
        if args.reports { report_folders.iter().map(String::as_str).collect() } else { Vec::new() };
    prepare_output(&out, &["benchmark.csv", "benchmark.md"], &folders, args.overwrite)?;
    let csv = out.join("benchmark.csv");
    let mut all_rows = Vec::new();
    let mut markdown = String::new();
    let mut failures = 0;
    for (spec, folder) in specs.iter().zip(&report_folders) {
        let label = spec.label();
        let mut rows = Vec::new();
        for class_dir in &class_dirs {
            let class = class_dir.file_name().unwrap_or_default().to_string_lossy().into_owned();
            let run = || -> Result<Vec<String>> {
                let dataset = Dataset::discover(class_dir)?;
                let checkpoint_dir = args.fit.checkpoint_dir.as_ref().map(|d| d.join(folder).join(&class));
                let opts = vigil_engine::FitOptions { checkpoint_dir, ..opts.clone() };
                let model = fit(spec, training_images(class_dir, &filter)?, &pipeline, opts)?;
                let items = vigil_engine::run::test_items(&dataset, &filter);
                let eval = evaluate(&model, &items, EvalOptions::default())?;
                if args.reports {
                    write_test_outputs(
                        &out.join(folder).join(&dataset.name),
                        &model,
                        &dataset.name,
                        &eval,
                        false,
                    )?;
                }
                let threshold = vigil_metrics::ThresholdRule::of(&eval.image_threshold).to_string();
                Ok(row(&label, &dataset.name, &eval.metrics, &threshold, model.fit_seconds()))
            };
            let r = run().unwrap_or_else(|e| {
                eprintln!("error: {label} on {class}: {e:#}; the benchmark goes on");
                failures += 1;
                failed_row(&label, &class, &e)
            });
            println!("{}", r.join(" | "));
            rows.push(r);
        }
        let mean = mean_row(&label, &rows);
        println!("{}", mean.join(" | "));
        markdown.push_str(&format!("### {label}\n\n"));
        let mut table_rows = rows.clone();
        table_rows.push(mean);
        markdown.push_str(&vigil_report::markdown::markdown_table(&HEADERS[1..], &strip_method(&table_rows)));
        markdown.push('\n');
        all_rows.extend(table_rows);
        // Tables are rewritten after each method, so finished rows survive a later crash.
        write_tables(&out, data, &args, &all_rows, &markdown)?;
    }
    println!("wrote {} and {}", csv.display(), out.join("benchmark.md").display());
    if failures > 0 {
        bail!("{failures} method/class run(s) failed (marked 'failed' in the tables)");
    }
    Ok(())
}

fn write_tables(
    out: &Path,
    data: &Path,
    args: &BenchmarkArgs,
    rows: &[Vec<String>],
    markdown: &str,
) -> Result<()> {
    vigil_report::markdown::write_csv(&out.join("benchmark.csv"), &HEADERS, rows)?;
    let fit = if args.fit.fit_on_all {
        "fit on all training images".to_string()
    } else {
        format!("validation fraction {}", args.fit.val_fraction.unwrap_or(options::DEFAULT_VAL_FRACTION))
    };
    let header = format!(
        "Dataset: {}; seed {}; {fit}; vigil {}; threads {}.\n\
         `*` = mean over the classes where the metric exists.\n\n",
        data.display(),
        args.fit.seed.unwrap_or(options::DEFAULT_SEED),
        env!("CARGO_PKG_VERSION"),
        rayon::current_num_threads()
    );
    vigil_core::model_file::write_atomic(
        &out.join("benchmark.md"),
        format!("{header}{markdown}").as_bytes(),
        true,
    )?;
    Ok(())
}

fn strip_method(rows: &[Vec<String>]) -> Vec<Vec<String>> {
    rows.iter().map(|r| r[1..].to_vec()).collect()
}

fn sanitize(label: &str) -> String {
    label.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).collect()
}
