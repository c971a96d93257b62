//! `vigil benchmark`: methods x dataset classes -> benchmark.csv and benchmark.md (per class and mean).

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Result};
use vigil_data::dataset::Dataset;

use crate::args::BenchmarkArgs;
use crate::methods::MethodSpec;
use crate::pipeline::{fit, training_images, FitOptions, Pipeline};
use crate::test_cmd::{evaluate_fitted, write_outputs, Metrics};

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
    let csv = out.join("benchmark.csv");
    if csv.exists() && !args.overwrite {
        bail!("{}: already exists; pass --overwrite to replace it", csv.display());
    }
    let specs: Vec<MethodSpec> =
        args.methods.iter().map(|m| MethodSpec::parse(m, &[])).collect::<Result<_>>()?;
    let class_dirs = classes(data, args.classes.as_deref())?;
    let seed = args.seed.unwrap_or(0);
    let mut all_rows = Vec::new();
    let mut markdown = String::new();
    for spec in &specs {
        let label = spec.label();
        let mut rows = Vec::new();
        for class_dir in &class_dirs {
            let dataset = Dataset::discover(class_dir)?;
            let pipeline = Pipeline::from_args(&args.pipeline)?;
            let opts =
                FitOptions { val_fraction: args.val_fraction.unwrap_or(0.2), seed, ..Default::default() };
            let outcome = fit(spec, training_images(class_dir)?, pipeline, opts)?;
            let (eval, image_t, pixel_t) = evaluate_fitted(&outcome, &dataset.test)?;
            if args.reports {
                let dir = out.join(sanitize(&label)).join(&dataset.name);
                write_outputs(&dir, true, &outcome.model, &dataset.name, &eval, &image_t, &pixel_t, false)?;
            }
            let r =
                row(&label, &dataset.name, &eval.metrics, &short_kind(&image_t.kind), outcome.fit_seconds);
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
    }
    std::fs::create_dir_all(&out)?;
    vigil_report::markdown::write_csv(&csv, &HEADERS, &all_rows)?;
    let md_path = out.join("benchmark.md");
    let header = format!(
        "Dataset: {}; seed {seed}; validation fraction {}; vigil {}; threads {}.\n\
         `*` = mean over the classes where the metric exists.\n\n",
        data.display(),
        args.val_fraction.unwrap_or(0.2),
        env!("CARGO_PKG_VERSION"),
        rayon::current_num_threads()
    );
    vigil_core::model_file::write_atomic(&md_path, format!("{header}{markdown}").as_bytes(), true)?;
    println!("wrote {} and {}", csv.display(), md_path.display());
    Ok(())
}

fn strip_method(rows: &[Vec<String>]) -> Vec<Vec<String>> {
    rows.iter().map(|r| r[1..].to_vec()).collect()
}

fn short_kind(kind: &vigil_core::ThresholdKind) -> String {
    use vigil_core::ThresholdKind as K;
    match kind {
        K::Max => "max".into(),
        K::Quantile { p } => format!("quantile:{p}"),
        K::KSigma { k } => format!("ksigma:{k}"),
        K::F1Optimal => "f1".into(),
        K::Nfa { k } => format!("nfa:{k}"),
        K::Fixed => "fixed".into(),
    }
}

fn sanitize(label: &str) -> String {
    label.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).collect()
}
