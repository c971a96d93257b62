//! `vigil test`: score a labelled test set, compute every metric, write metrics.json and report.html.

use std::path::PathBuf;

use anyhow::{anyhow, bail, Result};
use vigil_data::dataset::Dataset;
use vigil_engine::model::LoadOptions;
use vigil_engine::outputs::{prepare_output, write_test_outputs, TEST_FILES, TEST_FOLDERS};
use vigil_engine::{evaluate, EvalOptions, Model};

use crate::args::TestArgs;
use crate::options;

pub fn test_command(args: TestArgs) -> Result<()> {
    let config = args.config.clone();
    let args: TestArgs = crate::config::merge_with_file(args, config.as_deref())?;
    let model_path = args.model.as_deref().ok_or_else(|| anyhow!("--model <file> is required"))?;
    let out = args.out.clone().unwrap_or_else(|| PathBuf::from("runs/test"));
    let pipeline = options::pipeline(&args.pipeline)?;
    let dataset = match (&args.data, &args.anomalous, &args.normal) {
        (Some(d), _, _) => Dataset::discover(d)?,
        (None, a, n) if a.is_some() || n.is_some() => Dataset::folders(
            None,
            n.as_deref(),
            a.as_deref(),
            args.masks.as_deref(),
            args.mask_pattern.as_deref().unwrap_or(options::DEFAULT_MASK_PATTERN),
        )?,
        _ => bail!("give --data <MVTec class folder> or --normal/--anomalous folders"),
    };
    let items = vigil_engine::run::test_items(&dataset, &options::filter(&args.pipeline, false));
    prepare_output(&out, &TEST_FILES, &TEST_FOLDERS, args.overwrite)?;
    let model =
        Model::load(model_path, &LoadOptions { pipeline, allow_other_weights: args.allow_other_weights })?;
    let eval_options = EvalOptions {
        resize_masks: args.resize_masks,
        aupro_limit: args.aupro_limit.unwrap_or(options::DEFAULT_AUPRO_LIMIT),
    };
    let eval = evaluate(&model, &items, eval_options)?;
    write_test_outputs(&out, &model, &dataset.name, &eval, args.save_maps)?;
    print_metrics(&eval.metrics);
    if !eval.skipped.is_empty() {
        println!(
            "  skipped {} unreadable file(s) (listed in metrics.json and the report)",
            eval.skipped.len()
        );
    }
    println!("report: {}", out.join("report.html").display());
    Ok(())
}

pub fn print_metrics(m: &vigil_engine::Metrics) {
    for (name, value) in vigil_engine::evaluate::metric_rows(m) {
        println!("  {name:<34} {value}");
    }
}
