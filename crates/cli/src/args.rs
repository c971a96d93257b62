//! Command-line options. Every option of `fit`, `test`, `predict` and `benchmark` can also come
//! from a TOML file given with `--config` (same names as the long flags, e.g. `val-fraction = 0.2`;
//! the image-pipeline options — tile, overlap, ignore, ignore-mode, image-score, skip-bad — go in a
//! `[pipeline]` table); a flag on the command line overrides the file.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use serde::{Deserialize, Serialize};

#[derive(Parser, Debug)]
#[command(
    name = "vigil",
    version,
    about = "Unsupervised visual anomaly detection: learn normality from normal images, then find, locate and \
             outline what deviates, with a threshold that can be justified.",
    after_help = "Start with `vigil demo`. `vigil methods` lists the methods and their parameters."
)]
pub struct Cli {
    /// Worker threads for parallel work (default: all cores).
    #[arg(long, global = true)]
    pub threads: Option<usize>,
    /// Progress on stderr: `bar` (a terminal bar), `plain` (a line every few seconds, for logs and CI),
    /// `none`, or `auto` (bar on a terminal, plain otherwise; the default).
    #[arg(long, global = true, default_value = "auto")]
    pub progress: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Learn from normal images and write a model file (method, settings, learned state, thresholds).
    Fit(FitArgs),
    /// Score a labelled test set with a model; write metrics (JSON) and an HTML report.
    Test(TestArgs),
    /// Score new images or folders; write anomaly maps, overlays and a CSV/JSON of scores and verdicts.
    Predict(PredictArgs),
    /// Fit and test methods x datasets; write a CSV and a markdown table.
    Benchmark(BenchmarkArgs),
    /// Fit and test the a contrario detector on the small real dataset embedded in the repository.
    Demo(DemoArgs),
    /// List the methods and their settings with defaults.
    Methods,
    /// Serve models over HTTP (scores, maps, overlays, metrics) with a web page at `/`.
    #[command(long_about = crate::serve_cmd::ABOUT)]
    Serve(crate::serve_cmd::ServeArgs),
}

/// Options shared by everything that reads images and turns them into maps.
#[derive(Args, Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct PipelineArgs {
    /// Cut images into square tiles of this size (pixels), score each and stitch the maps (overlaps blended).
    /// For large images (X-ray paintings); off by default.
    #[arg(long)]
    pub tile: Option<usize>,
    /// Overlap between neighbouring tiles in pixels (with --tile; default a quarter of the tile).
    #[arg(long)]
    pub overlap: Option<usize>,
    /// An image marking regions to ignore (any non-zero pixel is ignored); same size as the images.
    #[arg(long)]
    pub ignore: Option<PathBuf>,
    /// When to apply --ignore: `before` leaves the region out of the method's statistics and scores,
    /// `after` sets it to the map's background level after scoring (default: after).
    #[arg(long)]
    pub ignore_mode: Option<String>,
    /// Align every image to this reference image before scoring (ORB features + RANSAC homography), for a
    /// camera that may have moved (line clearance). Maps are returned in each image's own frame; parts of the
    /// image the reference does not cover are left at the map's background level. Not combined with --tile.
    #[arg(long)]
    pub register: Option<PathBuf>,
    /// How an image score is made from its map when the method has no score of its own:
    /// `max`, `mean`, or `mean-filter-max:K` (max after a KxK mean filter; DRAEM uses 21). Default: method's own,
    /// else max.
    #[arg(long)]
    pub image_score: Option<String>,
    /// A file that cannot be read stops the run (default); with --skip-bad it is reported, skipped and
    /// listed in the outputs.
    #[arg(long)]
    #[serde(default)]
    pub skip_bad: bool,
    /// Only image files whose name matches this pattern (`*` and `?`, e.g. `*.jpg`) are read from folders.
    #[arg(long)]
    pub glob: Option<String>,
}

/// The options of how a model is fitted, shared by `fit` and `benchmark`.
#[derive(Args, Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct FitOptionArgs {
    /// Method settings as key=value (repeatable), applied after those in --method
    /// (in `benchmark`, to every method).
    #[arg(long = "param", short = 'p')]
    #[serde(default)]
    pub params: Vec<String>,
    /// Fraction of the normal training images held out to set the threshold (default 0.2).
    #[arg(long)]
    pub val_fraction: Option<f64>,
    /// Fit on every training image (no hold-out); thresholds that need normal scores then come from the
    /// training images' own scores, which are optimistic.
    #[arg(long)]
    #[serde(default)]
    pub fit_on_all: bool,
    /// Image-level threshold: `max`, `quantile:P`, `ksigma:K` (on held-out normal scores), `nfa:K`
    /// (log10 NFA <= -K, for a contrario methods and U-Flow), `nfa-calibrated:K` (the log10 NFA level at
    /// which the held-out normal images give 10^-K false detections per image), `fixed:V`, or `f1`
    /// (F1-optimal; needs --val-anomalous). Default: the method's own (NFA) or quantile:0.99. With an NFA
    /// threshold, fit counts the false detections on the held-out normals and warns when the theoretical
    /// level gives more than 10x the nominal rate.
    #[arg(long)]
    pub threshold: Option<String>,
    /// Labelled anomalous validation images (a folder), for `--threshold f1` (F1-optimal) thresholds
    /// (`benchmark` uses the same folder for every class).
    #[arg(long)]
    pub val_anomalous: Option<PathBuf>,
    /// Ground-truth masks of the --val-anomalous images (a folder), for pixel-level F1 thresholds.
    #[arg(long)]
    pub val_masks: Option<PathBuf>,
    /// Mask file name pattern for --val-masks; `{stem}` is the image file stem (default `{stem}_mask.png`).
    #[arg(long)]
    pub mask_pattern: Option<String>,
    /// Pixel-level threshold, same forms as --threshold. Default: the image threshold when image scores are the
    /// map maximum (a pixel is flagged exactly when it alone would flag its image), else the same kind on pixels.
    #[arg(long)]
    pub pixel_threshold: Option<String>,
    /// Seed for every random choice (validation split, sampling, initialisation).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Keep training checkpoints here so an interrupted fit resumes exactly (draem, draem-unetpp, uflow);
    /// `benchmark` keeps one sub-folder per method and class.
    #[arg(long)]
    pub checkpoint_dir: Option<PathBuf>,
}

// `FitArgs` and `BenchmarkArgs` flatten `FitOptionArgs`, which serde's `deny_unknown_fields` does
// not see through: `config::merge_with_file` refuses unknown names in the file instead.
#[derive(Args, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct FitArgs {
    /// TOML file with any of these options (flags override it).
    #[arg(long)]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Method, optionally with settings: `acontrario`, `acontrario:feature=gabor,statistics=training`.
    /// `vigil methods` lists them.
    #[arg(long, short)]
    pub method: Option<String>,
    /// Normal training images: an MVTec-layout class folder (uses train/good) or a folder of normal images.
    /// Not needed by a method that learns nothing (acontrario with statistics=test-image).
    #[arg(long)]
    pub train: Option<PathBuf>,
    /// Where to write the model file.
    #[arg(long, short)]
    pub out: Option<PathBuf>,
    /// Replace an existing model file.
    #[arg(long)]
    #[serde(default)]
    pub overwrite: bool,
    #[command(flatten)]
    #[serde(flatten)]
    pub fit: FitOptionArgs,
    #[command(flatten)]
    #[serde(default)]
    pub pipeline: PipelineArgs,
}

#[derive(Args, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct TestArgs {
    /// TOML file with any of these options (flags override it).
    #[arg(long)]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Model file written by `vigil fit`.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Labelled test set: an MVTec-layout class folder (test/<kind>, ground_truth/<kind>/<stem>_mask.png;
    /// sub-folders of a kind are read too, with their masks in the same sub-folders).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Generic layout instead of --data: folder of normal test images (sub-folders are read too; outputs
    /// keep each file's relative path).
    #[arg(long)]
    pub normal: Option<PathBuf>,
    /// Generic layout: folder of anomalous test images; images in a sub-folder take its name as defect kind.
    #[arg(long)]
    pub anomalous: Option<PathBuf>,
    /// Generic layout: folder of ground-truth masks for the anomalous images, with the same sub-folders.
    #[arg(long)]
    pub masks: Option<PathBuf>,
    /// Generic layout: mask file name pattern, `{stem}` is the image file stem (default `{stem}_mask.png`).
    #[arg(long)]
    pub mask_pattern: Option<String>,
    /// Resize ground-truth masks whose size differs from their image instead of stopping.
    #[arg(long)]
    #[serde(default)]
    pub resize_masks: bool,
    /// Output folder for metrics.json, report.html and (with --save-maps) maps and overlays.
    #[arg(long, short)]
    pub out: Option<PathBuf>,
    /// Replace existing outputs in --out.
    #[arg(long)]
    #[serde(default)]
    pub overwrite: bool,
    /// Score even if the pretrained weights differ from those the model was fitted with (a warning).
    #[arg(long)]
    #[serde(default)]
    pub allow_other_weights: bool,
    /// Also write every anomaly map (float TIFF) and overlay (PNG).
    #[arg(long)]
    #[serde(default)]
    pub save_maps: bool,
    /// FPR limit of AUPRO (default 0.3, the MVTec protocol).
    #[arg(long)]
    pub aupro_limit: Option<f64>,
    #[command(flatten)]
    #[serde(default)]
    pub pipeline: PipelineArgs,
}

#[derive(Args, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct PredictArgs {
    /// TOML file with any of these options (flags override it).
    #[arg(long)]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Model file written by `vigil fit`.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Images or folders of images to score (folders are searched recursively; outputs keep each file's
    /// path relative to its folder).
    #[serde(default)]
    pub inputs: Vec<PathBuf>,
    /// Output folder: maps/ (float TIFF), overlays/ (PNG), masks/ (predicted regions, PNG), scores.csv,
    /// scores.json.
    #[arg(long, short)]
    pub out: Option<PathBuf>,
    /// Replace existing outputs in --out.
    #[arg(long)]
    #[serde(default)]
    pub overwrite: bool,
    /// Score even if the pretrained weights differ from those the model was fitted with (a warning).
    #[arg(long)]
    #[serde(default)]
    pub allow_other_weights: bool,
    /// Map file format: `tiff` (32-bit float) or `png16` (16-bit, scaled between the map's min and max).
    #[arg(long)]
    pub map_format: Option<String>,
    /// A file listing the images to score, one path a line (`#` starts a comment line), instead of
    /// inputs on the command line; outputs are named by each path below the folder all files share.
    #[arg(long)]
    pub list: Option<PathBuf>,
    /// Score only part I of N contiguous parts of the inputs (I from 0), e.g. `--shard 2/8` in the third
    /// of eight jobs; give each shard its own --out. The shards' scores.csv rows, concatenated in shard
    /// order, are the rows of the whole run.
    #[arg(long)]
    pub shard: Option<String>,
    /// Continue an interrupted run in --out: images already in its scores.csv are not scored again,
    /// new rows are appended (the model must be the same).
    #[arg(long)]
    #[serde(default)]
    pub resume: bool,
    #[command(flatten)]
    #[serde(default)]
    pub pipeline: PipelineArgs,
}

#[derive(Args, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct BenchmarkArgs {
    /// TOML file with any of these options (flags override it).
    #[arg(long)]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Methods to run, each `name[:key=value,...]`; repeatable (e.g. -m acontrario:feature=pca -m patchcore).
    #[arg(long = "method", short)]
    #[serde(default)]
    pub methods: Vec<String>,
    /// A dataset root: one MVTec-layout class folder, or a folder of such classes (all are run).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Only these classes (comma-separated folder names).
    #[arg(long)]
    pub classes: Option<String>,
    /// Output folder for benchmark.csv and benchmark.md (and per-run reports with --reports).
    #[arg(long, short)]
    pub out: Option<PathBuf>,
    /// Replace existing outputs in --out.
    #[arg(long)]
    #[serde(default)]
    pub overwrite: bool,
    /// Also write an HTML report per method and class.
    #[arg(long)]
    #[serde(default)]
    pub reports: bool,
    #[command(flatten)]
    #[serde(flatten)]
    pub fit: FitOptionArgs,
    #[command(flatten)]
    #[serde(default)]
    pub pipeline: PipelineArgs,
}

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Where to write the demo model, metrics and report.
    #[arg(long, short, default_value = "runs/demo")]
    pub out: PathBuf,
    /// Method to run on the demo data (default: the a contrario detector, Gabor features, statistics from
    /// the training images).
    #[arg(long, short, default_value = "acontrario:feature=gabor,statistics=training")]
    pub method: String,
    /// Threshold, as for `vigil fit`. The default is the largest score of the held-out normal images: on
    /// paper texture the NFA's independence assumptions do not hold (see BENCHMARKS.md), so NFA <= 1 would
    /// flag every image.
    #[arg(long, default_value = "max")]
    pub threshold: String,
    /// Replace the outputs of an earlier demo in --out.
    #[arg(long)]
    pub overwrite: bool,
}
