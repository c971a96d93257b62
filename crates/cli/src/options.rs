//! Flags → the engine's typed options, with every default in one place.

use anyhow::{anyhow, Result};
use vigil_data::dataset::Dataset;
use vigil_data::source::BadFilePolicy;
use vigil_engine::fit::FitOptions;
use vigil_engine::run::{ImageFilter, Item};
use vigil_engine::PipelineOptions;
use vigil_metrics::ThresholdRule;

use crate::args::{FitOptionArgs, PipelineArgs};

pub const DEFAULT_VAL_FRACTION: f64 = 0.2;
pub const DEFAULT_SEED: u64 = 0;
pub const DEFAULT_MASK_PATTERN: &str = "{stem}_mask.png";
pub const DEFAULT_AUPRO_LIMIT: f64 = 0.3;

pub fn pipeline(args: &PipelineArgs) -> Result<PipelineOptions> {
    Ok(PipelineOptions {
        tile: args.tile,
        overlap: args.overlap,
        ignore: args.ignore.clone(),
        ignore_mode: args
            .ignore_mode
            .as_deref()
            .map(str::parse)
            .transpose()
            .map_err(|e| anyhow!("--ignore-mode: {e}"))?,
        register: args.register.clone(),
        image_score: args
            .image_score
            .as_deref()
            .map(str::parse)
            .transpose()
            .map_err(|e| anyhow!("--image-score: {e}"))?,
        bad_files: if args.skip_bad { BadFilePolicy::Skip } else { BadFilePolicy::Stop },
    })
}

/// Which files of a folder are read as images.
pub fn filter(args: &PipelineArgs, recursive: bool) -> ImageFilter {
    ImageFilter { glob: args.glob.clone(), recursive }
}

pub fn threshold(flag: &str, text: Option<&str>) -> Result<Option<ThresholdRule>> {
    text.map(|t| t.parse::<ThresholdRule>().map_err(|e| anyhow!("--{flag}: {e}"))).transpose()
}

/// The fit options of `fit` and `benchmark`; `filter` selects the --val-anomalous images.
pub fn fit(args: &FitOptionArgs, filter: &ImageFilter) -> Result<FitOptions> {
    if args.fit_on_all && args.val_fraction.is_some_and(|f| f > 0.0) {
        return Err(anyhow!("--fit-on-all holds out no image: it cannot be combined with --val-fraction"));
    }
    let val_anomalous = match &args.val_anomalous {
        Some(dir) => anomalous_items(dir, args.val_masks.as_deref(), args.mask_pattern.as_deref(), filter)?,
        None if args.val_masks.is_some() => return Err(anyhow!("--val-masks needs --val-anomalous")),
        None => Vec::new(),
    };
    Ok(FitOptions {
        val_fraction: if args.fit_on_all { 0.0 } else { args.val_fraction.unwrap_or(DEFAULT_VAL_FRACTION) },
        fit_on_all: args.fit_on_all,
        image_threshold: threshold("threshold", args.threshold.as_deref())?,
        pixel_threshold: threshold("pixel-threshold", args.pixel_threshold.as_deref())?,
        seed: args.seed.unwrap_or(DEFAULT_SEED),
        checkpoint_dir: args.checkpoint_dir.clone(),
        val_anomalous,
    })
}

/// Labelled anomalous images of a folder, with their masks when a mask folder is given.
fn anomalous_items(
    dir: &std::path::Path,
    masks: Option<&std::path::Path>,
    pattern: Option<&str>,
    filter: &ImageFilter,
) -> Result<Vec<Item>> {
    let dataset = Dataset::folders(None, None, Some(dir), masks, pattern.unwrap_or(DEFAULT_MASK_PATTERN))?;
    Ok(vigil_engine::run::test_items(&dataset, filter))
}
