//! `vigil demo`: the first command a newcomer runs. Fits and tests a method on the small real
//! dataset shipped in the repository (one PIPED paper class, CC BY 4.0) and prints where the report is.

use std::path::PathBuf;

use anyhow::{bail, Result};
use vigil_data::dataset::Dataset;
use vigil_engine::outputs::{prepare_output, write_test_outputs, TEST_FILES, TEST_FOLDERS};
use vigil_engine::run::{test_items, ImageFilter};
use vigil_engine::{evaluate, fit, training_images, EvalOptions, FitOptions, MethodSpec, PipelineOptions};

use crate::args::DemoArgs;
use crate::test_cmd::print_metrics;

/// The embedded dataset: `data/demo/PA_BDP01_TL` in the repository (override with VIGIL_DEMO_DATA).
fn demo_data() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("VIGIL_DEMO_DATA") {
        return Ok(PathBuf::from(p));
    }
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../data/demo/PA_BDP01_TL");
    if !p.join("train/good").is_dir() {
        bail!(
            "the demo dataset is not at {}: run `vigil demo` from a checkout of the repository, or set \
             VIGIL_DEMO_DATA to an MVTec-layout class folder",
            p.display()
        );
    }
    Ok(p.canonicalize().unwrap_or(p))
}

const MODEL: &str = "model.vigil";

pub fn demo_command(args: DemoArgs) -> Result<()> {
    let data = demo_data()?;
    let spec = MethodSpec::parse(&args.method, &[])?;
    let image_threshold = Some(crate::options::threshold("threshold", Some(&args.threshold))?).flatten();
    let files: Vec<&str> = TEST_FILES.iter().copied().chain([MODEL]).collect();
    prepare_output(&args.out, &files, &TEST_FOLDERS, args.overwrite)?;
    println!("vigil demo: {} on {} (PIPED, CC BY 4.0)", spec.label(), data.display());
    let filter = ImageFilter::default();
    let opts = FitOptions { image_threshold, ..Default::default() };
    let model = fit(&spec, training_images(&data, &filter)?, &PipelineOptions::default(), opts)?;
    println!("fitted in {:.1} s", model.fit_seconds());
    let model_path = args.out.join(MODEL);
    model.save(&model_path, false)?;
    let dataset = Dataset::discover(&data)?;
    let eval = evaluate(&model, &test_items(&dataset, &filter), EvalOptions::default())?;
    write_test_outputs(&args.out, &model, &dataset.name, &eval, false)?;
    println!("threshold: {} = {:.4}", eval.image_threshold.kind, eval.image_threshold.value);
    print_metrics(&eval.metrics);
    println!("model:  {}", model_path.display());
    println!("report: {}", args.out.join("report.html").display());
    Ok(())
}
