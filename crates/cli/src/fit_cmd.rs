//! `vigil fit`.

use anyhow::{anyhow, bail, Result};
use vigil_core::ThresholdKind;
use vigil_engine::{fit, training_images, MethodSpec};

use crate::args::FitArgs;
use crate::options;

pub fn fit_command(args: FitArgs) -> Result<()> {
    let config = args.config.clone();
    let args: FitArgs = crate::config::merge_with_file(args, config.as_deref())?;
    let method =
        args.method.as_deref().ok_or_else(|| anyhow!("--method is required (see `vigil methods`)"))?;
    let out = args.out.as_deref().ok_or_else(|| anyhow!("--out <model file> is required"))?;
    if out.exists() && !args.overwrite {
        bail!("{}: already exists; pass --overwrite to replace it", out.display());
    }
    let spec = MethodSpec::parse(method, &args.fit.params)?;
    let pipeline = options::pipeline(&args.pipeline)?;
    let filter = options::filter(&args.pipeline, false);
    let opts = options::fit(&args.fit, &filter)?;
    let paths = match &args.train {
        Some(train) => training_images(train, &filter)?,
        None if !spec.needs_training() => Vec::new(),
        None => bail!("--train <folder> is required: {} learns from normal images", spec.label()),
    };
    let model = fit(&spec, paths, &pipeline, opts)?;
    model.save(out, args.overwrite)?;
    println!("fitted {} in {:.1} s -> {}", spec.label(), model.fit_seconds(), out.display());
    for t in [&model.image_threshold, &model.pixel_threshold] {
        let source = match t.kind {
            ThresholdKind::Nfa { .. } | ThresholdKind::Fixed => String::new(),
            ThresholdKind::NfaCalibrated { .. } => format!(", from {} held-out normal images", t.n_samples),
            _ => format!(", from {} scores", t.n_samples),
        };
        println!("  {:?} threshold {:.6} ({}{source})", t.level, t.value, t.kind);
    }
    Ok(())
}
