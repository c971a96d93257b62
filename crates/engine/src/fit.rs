//! Fitting: everything that depends only on options is checked first, then the method learns from
//! normal images, held-out images are scored and the thresholds set.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use vigil_core::{FitContext, Map, Threshold, ThresholdKind, ThresholdLevel};
use vigil_data::dataset::validation_split;
use vigil_metrics::threshold::FEW_SCORES;
use vigil_metrics::{ImageScoreReduction, ThresholdRule};
use vigil_nfa::calibration::{calibrate, NfaCalibration};

use crate::model::Model;
use crate::pipeline::{Pipeline, PipelineOptions};
use crate::registry::MethodSpec;
use crate::run::{score_items, Event, ImageFilter, Item, LoopOptions};

/// How to fit and set thresholds.
#[derive(Clone, Debug)]
pub struct FitOptions {
    /// Fraction of the normal images held out to set thresholds, in [0, 1).
    pub val_fraction: f64,
    /// Fit on every training image; thresholds then come from the training images' own scores.
    pub fit_on_all: bool,
    /// Image threshold; None: the method's own (NFA), else quantile:0.99.
    pub image_threshold: Option<ThresholdRule>,
    /// Pixel threshold; None: derived from the image threshold.
    pub pixel_threshold: Option<ThresholdRule>,
    pub seed: u64,
    pub checkpoint_dir: Option<PathBuf>,
    /// Labelled anomalous validation images (for F1-optimal thresholds), with masks when known.
    pub val_anomalous: Vec<Item>,
}

impl Default for FitOptions {
    fn default() -> Self {
        FitOptions {
            val_fraction: 0.2,
            fit_on_all: false,
            image_threshold: None,
            pixel_threshold: None,
            seed: 0,
            checkpoint_dir: None,
            val_anomalous: Vec::new(),
        }
    }
}

/// The normal training images of a folder: an MVTec class folder (train/good) or a plain folder.
pub fn training_images(train: &Path, filter: &ImageFilter) -> Result<Vec<PathBuf>> {
    let good = train.join("train").join("good");
    filter.list(if good.is_dir() { &good } else { train })
}

/// Scores of validation data with labels (false = normal).
#[derive(Default)]
struct ValidationScores {
    scores: Vec<f64>,
    labels: Vec<bool>,
}

impl ValidationScores {
    fn push(&mut self, score: f64, label: bool) {
        self.scores.push(score);
        self.labels.push(label);
    }
    fn normal_count(&self) -> usize {
        self.labels.iter().filter(|&&l| !l).count()
    }
}

/// The thresholds a fit will set, decided (and checked) before any work.
struct Plan {
    image_rule: ThresholdRule,
    /// None: the pixel threshold is the image threshold applied to pixels.
    pixel_rule: Option<ThresholdRule>,
}

fn plan(
    spec: &MethodSpec,
    provides_nfa: bool,
    own: Option<ThresholdRule>,
    pipeline: &Pipeline,
    opts: &FitOptions,
    n_train: usize,
    n_held_out: usize,
) -> Result<Plan> {
    if !(0.0..1.0).contains(&opts.val_fraction) {
        bail!("--val-fraction must be in [0, 1), got {}", opts.val_fraction);
    }
    let image_rule = opts.image_threshold.or(own).unwrap_or(ThresholdRule::Quantile(0.99));
    let image_is_map_max =
        pipeline.settings.image_score.is_none_or(|r| matches!(r, ImageScoreReduction::Max));
    let labelled_masks =
        !opts.val_anomalous.is_empty() && opts.val_anomalous.iter().all(|i| i.mask.is_some());
    let pixel_rule = match opts.pixel_threshold {
        Some(rule) => Some(rule),
        // A pixel is flagged exactly when it alone would flag its image.
        None if image_is_map_max || image_rule.is_nfa() || matches!(image_rule, ThresholdRule::Fixed(_)) => {
            None
        }
        None if image_rule.needs_labels() && !labelled_masks => None,
        None => Some(image_rule),
    };
    for (level, rule) in [("image", Some(image_rule)), ("pixel", pixel_rule)] {
        let Some(rule) = rule else { continue };
        if rule.is_nfa() && !provides_nfa {
            bail!(
                "--{}threshold {rule}: an NFA threshold needs a method that computes an NFA (acontrario, uflow); \
                 '{}' does not",
                if level == "pixel" { "pixel-" } else { "" },
                spec.name
            );
        }
        if rule.needs_labels() && opts.val_anomalous.is_empty() {
            bail!("an F1-optimal {level} threshold needs labelled anomalous validation images (--val-anomalous)");
        }
        if rule.needs_labels() && level == "pixel" && !labelled_masks {
            bail!(
                "a pixel-level F1 threshold needs a mask for every anomalous validation image (--val-masks)"
            );
        }
        if rule.needs_normal_scores() && !opts.fit_on_all && n_held_out == 0 {
            bail!(
                "the {level} threshold {rule} needs scores of held-out normal images, but none are held out \
                 ({n_train} training image(s), --val-fraction {}): use --fit-on-all to take them from the \
                 training images themselves, or a threshold that needs none (fixed:V, nfa:K)",
                opts.val_fraction
            );
        }
    }
    Ok(Plan { image_rule, pixel_rule })
}

/// Fits a method on normal images and sets its thresholds: `opts.val_fraction` of the images,
/// drawn with `opts.seed`, are held out for the thresholds (none with `opts.fit_on_all`). Options
/// are checked before any image is scored or any network trained.
pub fn fit(
    spec: &MethodSpec,
    train_paths: Vec<PathBuf>,
    pipeline: &PipelineOptions,
    opts: FitOptions,
) -> Result<Model> {
    let (fit_paths, held_out) = if opts.fit_on_all {
        (train_paths, Vec::new())
    } else {
        validation_split(&train_paths, opts.val_fraction, opts.seed)
    };
    fit_with_held_out(spec, fit_paths, held_out, pipeline, opts)
}

/// [`fit()`] with the held-out normal images chosen by the caller (a fixed evaluation protocol):
/// the method learns from `fit_paths`, and the thresholds and the NFA check come from `held_out`
/// (`opts.val_fraction` is not used).
pub fn fit_with_held_out(
    spec: &MethodSpec,
    fit_paths: Vec<PathBuf>,
    held_out: Vec<PathBuf>,
    pipeline: &PipelineOptions,
    opts: FitOptions,
) -> Result<Model> {
    let mut pipeline = Pipeline::new(pipeline)?;
    let mut detector = spec.build()?;
    let needs_training = spec.needs_training();
    if needs_training && fit_paths.is_empty() {
        bail!("method {} learns from normal images: give --train <folder>", spec.label());
    }
    let own = detector.default_threshold().as_ref().and_then(ThresholdRule::of_kind);
    let provides_nfa = own.is_some_and(|r| r.is_nfa());
    let n_train = fit_paths.len() + held_out.len();
    let plan = plan(spec, provides_nfa, own, &pipeline, &opts, n_train, held_out.len())?;
    if let Some(first) = fit_paths.first().or(held_out.first()) {
        let image = vigil_data::io::load_image(first)?;
        pipeline.check_size(image.width, image.height, &first.display().to_string())?;
        pipeline.record_training_image(&image);
    }

    let n_fit = fit_paths.len();
    let start = Instant::now();
    if needs_training {
        let source = pipeline.source(fit_paths.clone(), detector.channel_mode())?;
        // The context grows with new needs (e.g. checkpoint fingerprints); later fields keep their defaults.
        #[allow(clippy::needless_update)]
        let ctx = FitContext {
            seed: opts.seed,
            checkpoint_dir: opts.checkpoint_dir.clone(),
            show_progress: true,
            ..Default::default()
        };
        detector.fit(source.as_ref(), &ctx)?;
    }
    let fit_seconds = start.elapsed().as_secs_f64();

    // Validation: held-out normals (or, fitting on all, the training images themselves), then any
    // labelled anomalous images.
    let normal_paths = if opts.fit_on_all && plan_needs_scores(&plan) { fit_paths } else { held_out };
    let items: Vec<Item> = normal_paths
        .iter()
        .map(|path| Item {
            path: path.clone(),
            name: String::new(),
            label: Some(false),
            kind: "good".into(),
            mask: None,
        })
        .chain(opts.val_anomalous.iter().cloned())
        .collect();
    let mut image_val = ValidationScores::default();
    let mut pixel_val = ValidationScores::default();
    let mut normal_nfa: Vec<Map> = Vec::new();
    let skipped =
        score_items(detector.as_ref(), &pipeline, &items, LoopOptions::default(), "validation", |event| {
            let Event::Scored(s) = event else { return Ok(()) };
            let label = s.item.label == Some(true);
            image_val.push(s.scored.image_score as f64, label);
            if let (false, Some(nfa)) = (label, &s.scored.log10_nfa) {
                normal_nfa.push(nfa.clone());
            }
            if let Some(truth) = &s.truth {
                for (&v, &l) in s.scored.map.data.iter().zip(&truth.data) {
                    pixel_val.push(v as f64, l);
                }
            }
            Ok(())
        })?;
    if opts.fit_on_all && plan_needs_scores(&plan) {
        crate::warn(
            "--fit-on-all: the thresholds come from the training images' own scores, which are lower than \
             those of unseen normal images; expect more false alarms than the threshold suggests",
        );
    }

    let calibration = check_nfa(&plan, &normal_nfa)?;
    let image_t = compute(plan.image_rule, ThresholdLevel::Image, &image_val, calibration.as_ref())?;
    let pixel_t = match plan.pixel_rule {
        Some(rule) => compute(rule, ThresholdLevel::Pixel, &pixel_val, calibration.as_ref())?,
        None => Threshold { level: ThresholdLevel::Pixel, ..image_t.clone() },
    };
    let weights = detector.weights_files();
    Ok(Model {
        method: spec.name.clone(),
        settings: spec.settings.clone(),
        detector,
        pipeline,
        image_threshold: image_t,
        pixel_threshold: pixel_t,
        fit_info: serde_json::json!({
            "train_images": if needs_training { n_fit } else { 0 },
            "validation_images": image_val.scores.len(),
            "validation_skipped": skipped,
            "fit_on_all": opts.fit_on_all,
            "seed": opts.seed,
            "fit_seconds": fit_seconds,
            "nfa_check": calibration.as_ref().map(|c| serde_json::json!({
                "k": c.k,
                "held_out_images": c.images,
                "false_detections_per_image_at_theoretical": c.false_detections_at_theoretical,
                "calibrated_log10_nfa": c.calibrated_log10_nfa,
                "false_detections_per_image_at_calibrated": c.false_detections_at_calibrated,
            })),
        }),
        weights,
    })
}

fn plan_needs_scores(plan: &Plan) -> bool {
    plan.image_rule.needs_normal_scores() || plan.pixel_rule.is_some_and(|r| r.needs_normal_scores())
}

/// An NFA threshold promises at most 10^−K false detections per image; held-out normal images
/// (where every detection is false) say whether it keeps that promise, and where it would.
fn check_nfa(plan: &Plan, normal_nfa: &[Map]) -> Result<Option<NfaCalibration>> {
    let k = match plan.image_rule {
        ThresholdRule::Nfa(k) | ThresholdRule::NfaCalibrated(k) => k,
        _ => return Ok(None),
    };
    if normal_nfa.is_empty() {
        if matches!(plan.image_rule, ThresholdRule::NfaCalibrated(_)) {
            bail!(
                "{}: no held-out normal image was scored, so there is nothing to calibrate on",
                plan.image_rule
            );
        }
        crate::warn(format!(
            "{}: no held-out normal images, so the NFA promise (at most 10^-{k} false detections per image) is              not checked on this data",
            plan.image_rule
        ));
        return Ok(None);
    }
    let calibration = calibrate(normal_nfa, k)?;
    eprintln!(
        "NFA check on {} held-out normal image(s): {:.3} false detections per image at log10 NFA <= {} \
         (nominal {:.3}); calibrated level {:.3}",
        calibration.images,
        calibration.false_detections_at_theoretical,
        0.0 - k,
        calibration.nominal_rate(),
        calibration.calibrated_log10_nfa
    );
    for warning in calibration.warnings() {
        crate::warn(warning);
    }
    Ok(Some(calibration))
}

fn compute(
    rule: ThresholdRule,
    level: ThresholdLevel,
    val: &ValidationScores,
    calibration: Option<&NfaCalibration>,
) -> Result<Threshold> {
    if let ThresholdRule::NfaCalibrated(k) = rule {
        let c =
            calibration.context("a calibrated NFA threshold needs the NFA maps of held-out normal images")?;
        return Ok(Threshold {
            kind: ThresholdKind::NfaCalibrated { k },
            level,
            value: c.calibrated_log10_nfa,
            n_samples: c.images,
        });
    }
    if rule.is_statistical() && val.normal_count() < FEW_SCORES {
        crate::warn(format!(
            "the {level:?} threshold {rule} comes from only {} normal score(s): it is unreliable below {FEW_SCORES}; \
             hold out more images (--val-fraction) or use max",
            val.normal_count()
        ));
    }
    rule.compute(level, &val.scores, &val.labels).with_context(|| format!("{level:?} threshold"))
}

impl Model {
    /// Seconds the method took to learn (without validation).
    pub fn fit_seconds(&self) -> f64 {
        self.fit_info["fit_seconds"].as_f64().unwrap_or(0.0)
    }
}
