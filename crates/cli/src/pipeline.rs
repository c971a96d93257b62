//! The image pipeline around a method: channel conversion, tiling and stitching, ignore masks,
//! image scores from maps, thresholds from held-out normal images, and the `fit` command.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use vigil_core::model_file::ModelHeader;
use vigil_core::{
    Detector, FitContext, Image, ImageSource, Map, Mask, ModelFile, Threshold, ThresholdKind, ThresholdLevel,
};
use vigil_data::dataset::{validation_split, Dataset, TestItem};
use vigil_data::ignore::IgnoreMode;
use vigil_data::source::{BadFilePolicy, FileSource, SourceOptions};
use vigil_data::tiling::TiledSource;
use vigil_data::{Registration, RegistrationSettings};
use vigil_metrics::ImageScoreReduction;

use crate::args::{FitArgs, PipelineArgs};
use crate::methods::{self, MethodSpec};

/// Pipeline settings stored in the model file, so `test` and `predict` score exactly as `fit` did.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PipelineSettings {
    pub tile: Option<usize>,
    pub overlap: usize,
    pub ignore_mode: Option<IgnoreMode>,
    /// Source of the ignore mask (informational; the mask itself is stored in the model state).
    pub ignore_path: Option<PathBuf>,
    pub image_score: Option<ImageScoreReduction>,
    /// Channels of the training images as the method saw them; test images are converted to match
    /// (a grayscale image given to a colour model is replicated, a colour one to a gray model is reduced).
    pub channels: Option<usize>,
    /// Source of the registration reference (informational; the reference itself is stored in the model state).
    pub register_path: Option<PathBuf>,
}

/// A ready-to-score pipeline: settings plus the loaded ignore mask.
pub struct Pipeline {
    pub settings: PipelineSettings,
    pub ignore: Option<Mask>,
    pub policy: BadFilePolicy,
    /// The reference view every image is aligned to, and its prepared features.
    pub registration: Option<(Image, Registration)>,
}

/// One scored image.
pub struct Scored {
    pub map: Map,
    pub image_score: f32,
    pub log10_nfa: Option<Map>,
}

pub const IGNORE_TENSOR: &str = "pipeline.ignore_mask";
pub const REFERENCE_TENSOR: &str = "pipeline.registration_reference";

fn registration_for(reference: Image) -> Result<(Image, Registration)> {
    let reg = Registration::new(&reference, RegistrationSettings::default())
        .context("cannot use this image as the registration reference")?;
    Ok((reference, reg))
}

impl Pipeline {
    pub fn from_args(args: &PipelineArgs) -> Result<Pipeline> {
        let ignore_mode = match args.ignore_mode.as_deref() {
            None => args.ignore.as_ref().map(|_| IgnoreMode::After),
            Some(s) => Some(s.parse::<IgnoreMode>().map_err(|e| anyhow!("--ignore-mode: {e}"))?),
        };
        if ignore_mode.is_some() && args.ignore.is_none() {
            bail!("--ignore-mode needs --ignore <mask image>");
        }
        let ignore = match &args.ignore {
            Some(p) => {
                let mask = vigil_data::io::load_mask(p, None, false)?;
                if mask.count() == mask.data.len() {
                    bail!(
                        "{}: the ignore mask covers the whole image; nothing would be inspected",
                        p.display()
                    );
                }
                Some(mask)
            }
            None => None,
        };
        let image_score = args
            .image_score
            .as_deref()
            .map(|s| s.parse::<ImageScoreReduction>().map_err(|e| anyhow!("--image-score: {e}")))
            .transpose()?;
        if let Some(t) = args.tile {
            if t < 8 {
                bail!("--tile {t} is too small (at least 8 pixels)");
            }
            if args.overlap.unwrap_or(0) >= t {
                bail!("--overlap must be smaller than --tile");
            }
        }
        if args.register.is_some() && args.tile.is_some() {
            bail!("--register and --tile cannot be combined: register whole views, tile very large images");
        }
        let registration = match &args.register {
            Some(p) => Some(
                registration_for(vigil_data::io::load_image(p)?).with_context(|| p.display().to_string())?,
            ),
            None => None,
        };
        Ok(Pipeline {
            registration,
            settings: PipelineSettings {
                tile: args.tile,
                overlap: args.overlap.unwrap_or(0),
                ignore_mode,
                ignore_path: args.ignore.clone(),
                image_score,
                channels: None,
                register_path: args.register.clone(),
            },
            ignore,
            policy: if args.skip_bad { BadFilePolicy::Skip } else { BadFilePolicy::Stop },
        })
    }

    /// The pipeline a model was fitted with; options given now (tiling, score, ignore) override it.
    pub fn from_model(model: &ModelFile, args: &PipelineArgs) -> Result<Pipeline> {
        let stored: PipelineSettings = serde_json::from_value(model.header.pipeline.clone())
            .context("model file: pipeline settings are not valid")?;
        let mut p = Pipeline::from_args(args)?;
        if args.tile.is_none() {
            p.settings.tile = stored.tile;
            p.settings.overlap = stored.overlap;
        }
        p.settings.channels = stored.channels;
        if args.register.is_none() && stored.register_path.is_some() {
            let shape = model.state.shape(REFERENCE_TENSOR)?.to_vec();
            let data = model.state.f32(REFERENCE_TENSOR, None)?;
            p.registration = Some(registration_for(Image::new(shape[2], shape[1], shape[0], data)?)?);
            p.settings.register_path = stored.register_path;
        }
        if p.settings.image_score.is_none() {
            p.settings.image_score = stored.image_score;
        }
        if args.ignore.is_none() {
            p.settings.ignore_mode = stored.ignore_mode;
            p.settings.ignore_path = stored.ignore_path;
            if p.settings.ignore_mode.is_some() {
                let shape = model.state.shape(IGNORE_TENSOR)?.to_vec();
                let v = model.state.f32(IGNORE_TENSOR, None)?;
                p.ignore = Some(Mask::new(shape[1], shape[0], v.iter().map(|&x| x > 0.5).collect())?);
            }
        }
        Ok(p)
    }

    fn ignore_for(&self, image: &Image, name: &str) -> Result<Option<Mask>> {
        match &self.ignore {
            None => Ok(None),
            Some(m) if m.width == image.width && m.height == image.height => Ok(Some(m.clone())),
            Some(m) => bail!(
                "{name}: image is {}x{} but the ignore mask is {}x{}; ignore masks must match the images",
                image.width,
                image.height,
                m.width,
                m.height
            ),
        }
    }

    /// Score one image (already loaded) with the detector through registration, tiling and ignore masks.
    /// The map is in the image's own frame.
    pub fn score(&self, det: &dyn Detector, image: &Image, name: &str) -> Result<Scored> {
        let Some((_, registration)) = &self.registration else {
            return self.score_aligned(det, image, name, None);
        };
        let registered = registration.register(image).with_context(|| format!("{name}: registration"))?;
        let unseen = Mask {
            width: registered.valid.width,
            height: registered.valid.height,
            data: registered.valid.data.iter().map(|&v| !v).collect(),
        };
        let scored = self.score_aligned(det, &registered.image, name, Some(&unseen))?;
        // Back to the image's frame: the map follows the inverse of the image-to-reference homography.
        let back = vigil_data::registration::invert_homography(&registered.homography)
            .ok_or_else(|| anyhow!("{name}: registration gave a singular homography"))?;
        let to_image_frame = |map: &Map, fill: f32| -> Result<Map> {
            let plane = Image::new(map.width, map.height, 1, map.data.clone())?;
            let (warped, seen) = vigil_data::warp_perspective(&plane, &back, image.width, image.height)?;
            let data = warped.data.iter().zip(&seen.data).map(|(&v, &s)| if s { v } else { fill }).collect();
            Ok(Map::new(image.width, image.height, data)?)
        };
        let map = to_image_frame(&scored.map, scored.map.min())?;
        let log10_nfa = match &scored.log10_nfa {
            Some(n) => Some(to_image_frame(n, n.max().max(1.0))?),
            None => None,
        };
        Ok(Scored { map, image_score: scored.image_score, log10_nfa })
    }

    /// Score an image already in the reference frame; `unseen` marks pixels outside its field of view,
    /// which are treated like ignored pixels after scoring.
    fn score_aligned(
        &self,
        det: &dyn Detector,
        image: &Image,
        name: &str,
        unseen: Option<&Mask>,
    ) -> Result<Scored> {
        let image = match (self.settings.channels, det.channel_mode().convert(image)) {
            (Some(3), i) if i.channels != 3 => i.to_rgb(),
            (Some(1), i) if i.channels != 1 => i.to_gray(),
            (_, i) => i,
        };
        let ignore = self.ignore_for(&image, name)?;
        let before = matches!(self.settings.ignore_mode, Some(IgnoreMode::Before));
        let method_ignore = ignore.as_ref().filter(|_| before);
        let out = match self.settings.tile {
            Some(tile) => {
                vigil_data::tiling::score_tiled(&image, method_ignore, tile, self.settings.overlap, |t, m| {
                    det.score(t, m)
                })
                .with_context(|| format!("{name}: tiled scoring"))?
            }
            None => det.score(&image, method_ignore).with_context(|| name.to_string())?,
        };
        let (mut map, mut nfa, own_score) = (out.map, out.log10_nfa, out.image_score);
        if map.width != image.width || map.height != image.height {
            bail!(
                "{name}: method returned a {}x{} map for a {}x{} image",
                map.width,
                map.height,
                image.width,
                image.height
            );
        }
        map.check_finite(name)?;
        let mut own_score = own_score;
        let after = match (ignore.as_ref().filter(|_| !before), unseen) {
            (Some(a), Some(b)) => Some(union(a, b)),
            (a, b) => a.or(b).cloned(),
        };
        if let Some(ignore) = &after {
            vigil_data::ignore::apply_after(&mut map, ignore)?;
            // The method's own score saw the ignored pixels: the score must come from the masked map.
            own_score = None;
            if let Some(n) = nfa.as_mut() {
                silence_nfa(n, ignore);
            }
        }
        let image_score = match (&self.settings.image_score, own_score) {
            (Some(r), _) => r.reduce(&map)?,
            (None, Some(s)) => s,
            (None, None) => map.max(),
        };
        Ok(Scored { map, image_score, log10_nfa: nfa })
    }

    pub fn source(&self, paths: Vec<PathBuf>, det: &dyn Detector) -> Result<Box<dyn ImageSource + '_>> {
        let ignore =
            self.ignore.clone().filter(|_| matches!(self.settings.ignore_mode, Some(IgnoreMode::Before)));
        let options =
            SourceOptions { ignore, bad_files: self.policy, ..SourceOptions::new(det.channel_mode()) };
        let source = FileSource::open(&paths, options)?;
        for (path, err) in source.skipped() {
            eprintln!("warning: skipped {}: {err}", path.display());
        }
        Ok(match (self.settings.tile, &self.registration) {
            (Some(tile), _) => Box::new(TiledSource::new(source, tile, self.settings.overlap)?),
            (None, Some((_, registration))) => Box::new(RegisteredSource { inner: source, registration }),
            (None, None) => Box::new(source),
        })
    }
}

fn union(a: &Mask, b: &Mask) -> Mask {
    Mask {
        width: a.width,
        height: a.height,
        data: a.data.iter().zip(&b.data).map(|(&x, &y)| x || y).collect(),
    }
}

/// Training images aligned to the registration reference. Pixels outside an image's field of view
/// join the "before" ignore mask, so they never enter the method's statistics.
struct RegisteredSource<'a> {
    inner: FileSource,
    registration: &'a Registration,
}

impl RegisteredSource<'_> {
    fn registered(&self, index: usize) -> vigil_core::Result<vigil_data::Registered> {
        let image = self.inner.load(index)?;
        self.registration
            .register(&image)
            .map_err(|e| vigil_core::VigilError::file(self.inner.name(index), format!("registration: {e}")))
    }
}

impl ImageSource for RegisteredSource<'_> {
    fn len(&self) -> usize {
        self.inner.len()
    }
    fn name(&self, index: usize) -> String {
        self.inner.name(index)
    }
    fn load(&self, index: usize) -> vigil_core::Result<Image> {
        Ok(self.registered(index)?.image)
    }
    fn ignore_mask(&self, index: usize) -> Option<Mask> {
        let unseen = self.registered(index).ok().map(|r| Mask {
            width: r.valid.width,
            height: r.valid.height,
            data: r.valid.data.iter().map(|&v| !v).collect(),
        });
        match (self.inner.ignore_mask(index), unseen) {
            (Some(a), Some(b)) => Some(union(&a, &b)),
            (a, b) => a.or(b),
        }
    }
}

/// Ignored pixels must never count as detections: give them the least significant NFA seen (at least 1).
fn silence_nfa(nfa: &mut Map, ignore: &Mask) {
    let quiet = nfa
        .data
        .iter()
        .zip(&ignore.data)
        .filter(|(_, &ig)| !ig)
        .map(|(&v, _)| v)
        .fold(0.0f32, f32::max)
        .max(1.0);
    for (v, &ig) in nfa.data.iter_mut().zip(&ignore.data) {
        if ig {
            *v = quiet;
        }
    }
}

/// `max`, `quantile:P`, `ksigma:K`, `nfa:K`, `fixed:V`, `f1` (F1-optimal; needs labels).
#[derive(Clone, Debug, PartialEq)]
pub enum ThresholdSpec {
    Max,
    Quantile(f64),
    KSigma(f64),
    Nfa(f64),
    Fixed(f64),
    /// F1-optimal on held-out normal images plus labelled anomalous validation images.
    F1,
}

impl std::str::FromStr for ThresholdSpec {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        let (kind, arg) = match s.split_once(':') {
            Some((k, a)) => (k, Some(a)),
            None => (s, None),
        };
        let num = |default: Option<f64>| -> Result<f64> {
            match arg {
                Some(a) => a.parse::<f64>().map_err(|_| anyhow!("threshold '{s}': '{a}' is not a number")),
                None => default.ok_or_else(|| anyhow!("threshold '{s}' needs a value, e.g. {kind}:0.99")),
            }
        };
        Ok(match kind {
            "max" => ThresholdSpec::Max,
            "quantile" => {
                let p = num(Some(0.99))?;
                if !(0.0..=1.0).contains(&p) || p == 0.0 {
                    bail!("threshold '{s}': the quantile must be in (0, 1]");
                }
                ThresholdSpec::Quantile(p)
            }
            "ksigma" => ThresholdSpec::KSigma(num(Some(3.0))?),
            "nfa" => ThresholdSpec::Nfa(num(Some(0.0))?),
            "fixed" => ThresholdSpec::Fixed(num(None)?),
            "f1" => ThresholdSpec::F1,
            _ => bail!("unknown threshold '{s}': use max, quantile:P, ksigma:K, nfa:K, fixed:V or f1"),
        })
    }
}

impl ThresholdSpec {
    fn from_kind(kind: &ThresholdKind) -> ThresholdSpec {
        match kind {
            ThresholdKind::Nfa { k } => ThresholdSpec::Nfa(*k),
            ThresholdKind::Max => ThresholdSpec::Max,
            ThresholdKind::Quantile { p } => ThresholdSpec::Quantile(*p),
            ThresholdKind::KSigma { k } => ThresholdSpec::KSigma(*k),
            ThresholdKind::F1Optimal => ThresholdSpec::F1,
            ThresholdKind::Fixed => ThresholdSpec::Quantile(0.99),
        }
    }

    /// Compute the threshold from validation scores: held-out normal images (label false) and,
    /// for F1, labelled anomalous ones (label true).
    pub fn compute(
        &self,
        level: ThresholdLevel,
        val: &ValidationScores,
        nfa_available: bool,
    ) -> Result<Threshold> {
        use vigil_metrics::threshold as th;
        let normal = val.normal();
        let needs_normal =
            matches!(self, ThresholdSpec::Max | ThresholdSpec::Quantile(_) | ThresholdSpec::KSigma(_));
        if needs_normal && normal.is_empty() {
            bail!(
                "{level:?} threshold {self:?} needs held-out normal images, but none were held out: raise \
                 --val-fraction or give more training images (or use --threshold fixed:V / nfa:K)"
            );
        }
        let t = match self {
            ThresholdSpec::Nfa(k) => {
                if !nfa_available {
                    bail!("an NFA threshold needs a method that computes an NFA (acontrario, uflow)");
                }
                Threshold { kind: ThresholdKind::Nfa { k: *k }, level, value: *k, n_samples: 0 }
            }
            ThresholdSpec::Fixed(v) => {
                Threshold { kind: ThresholdKind::Fixed, level, value: *v, n_samples: 0 }
            }
            ThresholdSpec::Max => th::max_of(&normal, level)?,
            ThresholdSpec::Quantile(p) => th::quantile(&normal, *p, level)?,
            ThresholdSpec::KSigma(k) => th::k_sigma(&normal, *k, level)?,
            ThresholdSpec::F1 => {
                if !val.labels.iter().any(|&l| l) || !val.labels.iter().any(|&l| !l) {
                    bail!(
                        "an F1-optimal {level:?} threshold needs labelled anomalous validation data \
                         (--val-anomalous, and --val-masks for pixels) besides held-out normal images"
                    );
                }
                th::f1_optimal(&val.scores, &val.labels, level)?
            }
        };
        Ok(t)
    }
}

/// Scores of validation data with labels (false = normal).
#[derive(Default)]
pub struct ValidationScores {
    pub scores: Vec<f64>,
    pub labels: Vec<bool>,
}

impl ValidationScores {
    fn normal(&self) -> Vec<f64> {
        self.scores.iter().zip(&self.labels).filter(|(_, &l)| !l).map(|(&s, _)| s).collect()
    }
    fn push(&mut self, score: f64, label: bool) {
        self.scores.push(score);
        self.labels.push(label);
    }
}

/// Is `score` above the threshold? For NFA thresholds the decision reads the NFA map (or, for
/// methods whose map is −log10 NFA, the map itself).
pub fn pixel_decisions(scored: &Scored, t: &Threshold) -> Mask {
    let data = match (&t.kind, &scored.log10_nfa) {
        (ThresholdKind::Nfa { k }, Some(nfa)) => nfa.data.iter().map(|&v| (v as f64) <= -k).collect(),
        _ => scored.map.data.iter().map(|&v| (v as f64) > t.value).collect(),
    };
    Mask { width: scored.map.width, height: scored.map.height, data }
}

pub fn image_decision(scored: &Scored, t: &Threshold) -> bool {
    match (&t.kind, &scored.log10_nfa) {
        (ThresholdKind::Nfa { k }, Some(nfa)) => (nfa.min() as f64) <= -k,
        _ => (scored.image_score as f64) > t.value,
    }
}

/// Resolve a training argument: an MVTec class folder (train/good) or a plain folder of normal images.
pub fn training_images(train: &Path) -> Result<Vec<PathBuf>> {
    let good = train.join("train").join("good");
    if good.is_dir() {
        Ok(vigil_data::io::list_images(&good)?)
    } else {
        Ok(vigil_data::io::list_images(train)?)
    }
}

pub struct FitOutcome {
    pub model: ModelFile,
    pub detector: Box<dyn Detector>,
    pub pipeline: Pipeline,
    pub fit_seconds: f64,
}

/// How to fit and set thresholds.
pub struct FitOptions {
    /// Fraction of the normal images held out for thresholds.
    pub val_fraction: f64,
    pub image_threshold: Option<String>,
    pub pixel_threshold: Option<String>,
    pub seed: u64,
    pub checkpoint_dir: Option<PathBuf>,
    /// Labelled anomalous validation images (for F1-optimal thresholds), with masks when known.
    pub val_anomalous: Vec<TestItem>,
}

impl Default for FitOptions {
    fn default() -> Self {
        FitOptions {
            val_fraction: 0.2,
            image_threshold: None,
            pixel_threshold: None,
            seed: 0,
            checkpoint_dir: None,
            val_anomalous: Vec::new(),
        }
    }
}

/// Fit a method on normal images, hold some out to set thresholds; returns the model (not yet written).
pub fn fit(
    spec: &MethodSpec,
    train_paths: Vec<PathBuf>,
    mut pipeline: Pipeline,
    opts: FitOptions,
) -> Result<FitOutcome> {
    if !(0.0..1.0).contains(&opts.val_fraction) {
        bail!("--val-fraction must be in [0, 1), got {}", opts.val_fraction);
    }
    let mut detector = spec.build()?;
    let (fit_paths, val_paths) = validation_split(&train_paths, opts.val_fraction, opts.seed);
    let n_fit = fit_paths.len();
    let (fit_seconds, channels) = {
        let source = pipeline.source(fit_paths, detector.as_ref())?;
        if source.is_empty() {
            bail!("no usable training image");
        }
        let channels = source.load(0)?.channels;
        let ctx =
            FitContext { seed: opts.seed, checkpoint_dir: opts.checkpoint_dir.clone(), show_progress: true };
        let start = Instant::now();
        detector.fit(source.as_ref(), &ctx)?;
        (start.elapsed().as_secs_f64(), channels)
    };
    pipeline.settings.channels = Some(channels);

    // Score the validation images: held-out normals, then any labelled anomalous ones.
    let mut image_val = ValidationScores::default();
    let mut pixel_val = ValidationScores::default();
    let mut pixel_labels_complete = true;
    let mut nfa_available = detector.default_threshold().is_some();
    let val_items: Vec<TestItem> = val_paths
        .into_iter()
        .map(|path| TestItem { path, label: false, kind: "good".into(), mask: None })
        .chain(opts.val_anomalous.iter().cloned())
        .collect();
    let bar = vigil_core::progress::bar(val_items.len() as u64, "validation");
    for item in &val_items {
        let image = match vigil_data::io::load_image(&item.path) {
            Ok(i) => i,
            Err(e) if pipeline.policy == BadFilePolicy::Skip => {
                eprintln!("warning: skipped {}: {e}", item.path.display());
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        let scored = pipeline.score(detector.as_ref(), &image, &item.path.display().to_string())?;
        image_val.push(scored.image_score as f64, item.label);
        nfa_available &= scored.log10_nfa.is_some();
        let truth = match (&item.mask, item.label) {
            (Some(m), _) => Some(vigil_data::io::load_mask(m, Some((image.width, image.height)), false)?),
            (None, false) => Some(Mask::empty(image.width, image.height)),
            (None, true) => None,
        };
        match truth {
            Some(t) => {
                for (&v, &l) in scored.map.data.iter().zip(&t.data) {
                    pixel_val.push(v as f64, l);
                }
            }
            None => pixel_labels_complete = false,
        }
        bar.inc(1);
    }
    bar.finish_and_clear();

    let image_spec = match &opts.image_threshold {
        Some(s) => s.parse::<ThresholdSpec>()?,
        None => detector
            .default_threshold()
            .as_ref()
            .map(ThresholdSpec::from_kind)
            .unwrap_or(ThresholdSpec::Quantile(0.99)),
    };
    let image_t = image_spec.compute(ThresholdLevel::Image, &image_val, nfa_available)?;
    let image_is_map_max =
        pipeline.settings.image_score.as_ref().is_none_or(|r| matches!(r, ImageScoreReduction::Max));
    let pixel_spec = match &opts.pixel_threshold {
        Some(s) => Some(s.parse::<ThresholdSpec>()?),
        // A pixel is flagged exactly when it alone would flag its image.
        None if image_is_map_max || matches!(image_spec, ThresholdSpec::Nfa(_) | ThresholdSpec::Fixed(_)) => {
            None
        }
        None if matches!(image_spec, ThresholdSpec::F1) && !pixel_labels_complete => None,
        None => Some(image_spec.clone()),
    };
    if matches!(pixel_spec, Some(ThresholdSpec::F1)) && !pixel_labels_complete {
        bail!("a pixel-level F1 threshold needs a mask for every anomalous validation image (--val-masks)");
    }
    let pixel_t = match pixel_spec {
        Some(spec) => spec.compute(ThresholdLevel::Pixel, &pixel_val, nfa_available)?,
        None => Threshold { level: ThresholdLevel::Pixel, ..image_t.clone() },
    };

    let mut state = detector.state()?;
    if let Some((reference, _)) = &pipeline.registration {
        state.put_f32(
            REFERENCE_TENSOR,
            &[reference.channels, reference.height, reference.width],
            reference.data.clone(),
        );
    }
    if let Some(m) = &pipeline.ignore {
        state.put_f32(
            IGNORE_TENSOR,
            &[m.height, m.width],
            m.data.iter().map(|&b| if b { 1.0 } else { 0.0 }).collect(),
        );
    }
    let header = ModelHeader {
        method: spec.name.clone(),
        vigil_version: env!("CARGO_PKG_VERSION").to_string(),
        settings: spec.settings.clone(),
        pipeline: serde_json::to_value(&pipeline.settings)?,
        image_threshold: Some(image_t),
        pixel_threshold: Some(pixel_t),
        fit_info: serde_json::json!({
            "train_images": n_fit,
            "validation_images": image_val.scores.len(),
            "seed": opts.seed,
            "fit_seconds": fit_seconds,
        }),
    };
    Ok(FitOutcome { model: ModelFile { header, state }, detector, pipeline, fit_seconds })
}

pub fn fit_command(args: FitArgs) -> Result<()> {
    let config = args.config.clone();
    let args: FitArgs = crate::config::merge_with_file(args, config.as_deref())?;
    let method =
        args.method.as_deref().ok_or_else(|| anyhow!("--method is required (see `vigil methods`)"))?;
    let train = args.train.as_deref().ok_or_else(|| anyhow!("--train <folder> is required"))?;
    let out = args.out.as_deref().ok_or_else(|| anyhow!("--out <model file> is required"))?;
    if out.exists() && !args.overwrite {
        bail!("{}: already exists; pass --overwrite to replace it", out.display());
    }
    let spec = MethodSpec::parse(method, &args.params)?;
    let pipeline = Pipeline::from_args(&args.pipeline)?;
    let paths = training_images(train)?;
    let val_anomalous = match &args.val_anomalous {
        Some(dir) => {
            let pattern = args.mask_pattern.as_deref().unwrap_or("{stem}_mask.png");
            Dataset::folders(None, None, Some(dir), args.val_masks.as_deref(), pattern)?.test
        }
        None => Vec::new(),
    };
    let opts = FitOptions {
        val_fraction: args.val_fraction.unwrap_or(0.2),
        image_threshold: args.threshold.clone(),
        pixel_threshold: args.pixel_threshold.clone(),
        seed: args.seed.unwrap_or(0),
        checkpoint_dir: args.checkpoint_dir.clone(),
        val_anomalous,
    };
    let outcome = fit(&spec, paths, pipeline, opts)?;
    outcome.model.write(out, args.overwrite)?;
    let h = &outcome.model.header;
    println!("fitted {} in {:.1} s -> {}", spec.label(), outcome.fit_seconds, out.display());
    for t in [&h.image_threshold, &h.pixel_threshold].into_iter().flatten() {
        println!("  {:?} threshold {:.6} ({}, from {} scores)", t.level, t.value, t.kind, t.n_samples);
    }
    Ok(())
}

/// Load a model file and rebuild its detector.
pub fn load_model(path: &Path) -> Result<(ModelFile, Box<dyn Detector>)> {
    let model = ModelFile::read(path)?;
    let det = methods::load(&model.header.method, &model.header.settings, &model.state)
        .with_context(|| format!("{}", path.display()))?;
    Ok((model, det))
}
