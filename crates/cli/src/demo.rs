//! `vigil demo`: the first command a newcomer runs. Fits and tests a method on the small real
//! dataset shipped in the repository (one PIPED paper class, CC BY 4.0) and prints where the report is.

use std::path::PathBuf;

use anyhow::{bail, Result};
use vigil_data::dataset::Dataset;

use crate::args::{DemoArgs, PipelineArgs};
use crate::methods::MethodSpec;
use crate::pipeline::{fit, training_images, FitOptions, Pipeline};
use crate::test_cmd::{evaluate_fitted, print_metrics, write_outputs};

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

pub fn demo_command(args: DemoArgs) -> Result<()> {
    let data = demo_data()?;
    let spec = MethodSpec::parse(&args.method, &[])?;
    println!("vigil demo: {} on {} (PIPED, CC BY 4.0)", spec.label(), data.display());
    let pipeline = Pipeline::from_args(&PipelineArgs::default())?;
    let opts = FitOptions { image_threshold: Some(args.threshold.clone()), ..Default::default() };
    let outcome = fit(&spec, training_images(&data)?, pipeline, opts)?;
    println!("fitted in {:.1} s", outcome.fit_seconds);
    // The demo's outputs are its own: re-running the demo replaces them.
    let model_path = args.out.join("model.vigil");
    outcome.model.write(&model_path, true)?;
    let dataset = Dataset::discover(&data)?;
    let (eval, image_t, pixel_t) = evaluate_fitted(&outcome, &dataset.test)?;
    write_outputs(&args.out, true, &outcome.model, &dataset.name, &eval, &image_t, &pixel_t, false)?;
    println!("threshold: {} = {:.4}", image_t.kind, image_t.value);
    print_metrics(&eval.metrics);
    println!("model:  {}", model_path.display());
    println!("report: {}", args.out.join("report.html").display());
    Ok(())
}
