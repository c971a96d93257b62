//! A small training loop: steps with a progress bar, periodic validation with early stopping,
//! periodic atomic checkpoints, exact resumption from a checkpoint.
//!
//! The loop owns no model: a [`TrainTask`] does one optimiser step at a time and snapshots its
//! state. For an exact resume the task's randomness (data order, augmentation) must be a pure
//! function of (seed, step), or its RNG position must travel in the checkpoint.
//!
//! Checkpoints record the fingerprint of the training set ([`LoopConfig::data`]) and a resume
//! on other data is refused. A finished run leaves its final checkpoint in place: the same fit
//! (same data, settings and seed, which the task checks) reuses it and says so; any other fit is
//! refused, so a checkpoint folder never hands one data set's network to another.

use std::path::PathBuf;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use vigil_core::{DataFingerprint, Result, VigilError};

use crate::checkpoint::Checkpoint;

/// The order in which epoch `epoch` of a fit with `seed` visits `images` training images (batches
/// are consecutive runs of it): a pure function of its arguments, so a resumed run draws the same
/// batches and a peer implementation can be fed the same ones.
pub fn epoch_order(seed: u64, epoch: usize, images: usize) -> Vec<usize> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(epoch as u64);
    let mut order: Vec<usize> = (0..images).collect();
    order.shuffle(&mut rng);
    order
}

pub trait TrainTask {
    /// Run optimiser step `step` (0-based) and return its training loss.
    fn step(&mut self, step: usize) -> Result<f32>;
    /// A validation loss (lower is better), or `None` when the task does not validate.
    fn validate(&mut self, _steps_done: usize) -> Result<Option<f32>> {
        Ok(None)
    }
    /// The task's state (weights, optimisers, schedule, RNG); the loop fills in the step and its
    /// own bookkeeping.
    fn snapshot(&self) -> Result<Checkpoint>;
}

#[derive(Clone, Debug)]
pub struct LoopConfig {
    pub total_steps: usize,
    /// Write a checkpoint every this many steps (0: only when the session stops early).
    pub checkpoint_every: usize,
    pub checkpoint_path: Option<PathBuf>,
    /// Validate every this many steps (0: never).
    pub validate_every: usize,
    /// Early stopping: stop after this many validations without improvement.
    pub patience: Option<usize>,
    /// Stop this session (after checkpointing) once this many steps are done in total, leaving
    /// the rest for a resumed run; `None` trains to `total_steps`.
    pub session_limit: Option<usize>,
    pub show_progress: bool,
    pub label: String,
    /// The training set the checkpoints are for; a checkpoint of other data is not resumed.
    pub data: Option<DataFingerprint>,
}

impl LoopConfig {
    pub fn new(total_steps: usize, label: &str) -> Self {
        LoopConfig {
            total_steps,
            checkpoint_every: 0,
            checkpoint_path: None,
            validate_every: 0,
            patience: None,
            session_limit: None,
            show_progress: false,
            label: label.to_string(),
            data: None,
        }
    }
}

/// The loop's own bookkeeping, carried in checkpoints under `meta.loop`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LoopState {
    pub losses: Vec<f32>,
    pub best_validation: Option<f32>,
    pub validations_since_best: usize,
    pub stopped_early: bool,
}

#[derive(Clone, Debug, PartialEq)]
pub struct LoopOutcome {
    pub steps_done: usize,
    /// Whether every step up to `total_steps` ran (or early stopping ended training).
    pub finished: bool,
    pub state: LoopState,
    /// The step the run resumed from, when it started from a checkpoint.
    pub resumed_from: Option<usize>,
}

/// Where the checkpoint's training data is kept in its `meta`.
const DATA_KEY: &str = "data";

fn write_checkpoint(
    task: &dyn TrainTask,
    cfg: &LoopConfig,
    steps_done: usize,
    state: &LoopState,
) -> Result<()> {
    let Some(path) = &cfg.checkpoint_path else { return Ok(()) };
    let mut ck = task.snapshot()?;
    ck.step = steps_done;
    if !ck.meta.is_object() {
        ck.meta = serde_json::json!({});
    }
    ck.meta["loop"] = serde_json::to_value(state).map_err(|e| VigilError::Model(e.to_string()))?;
    ck.meta[DATA_KEY] = serde_json::to_value(&cfg.data).map_err(|e| VigilError::Model(e.to_string()))?;
    ck.write(path)
}

/// Refuses a checkpoint written for another training set, naming both.
fn check_same_data(ck: &Checkpoint, cfg: &LoopConfig) -> Result<()> {
    let recorded: Option<DataFingerprint> = match ck.meta.get(DATA_KEY) {
        Some(v) => serde_json::from_value(v.clone())
            .map_err(|e| VigilError::Model(format!("checkpoint training-data record: {e}")))?,
        None => None,
    };
    let problem = match (&recorded, &cfg.data) {
        (None, None) => return Ok(()),
        (Some(a), Some(b)) if a.same_data(b) => return Ok(()),
        (Some(a), Some(b)) => format!("was written while training on {a}, but this fit trains on {b}"),
        (None, Some(b)) => {
            format!(
                "does not record its training data (an older vigil wrote it), so it cannot be resumed on {b}"
            )
        }
        (Some(a), None) => {
            format!("was written while training on {a}; this fit's training data is not known")
        }
    };
    let advice = "delete it, or give each data set its own checkpoint folder";
    Err(match &cfg.checkpoint_path {
        Some(path) => VigilError::file(path, format!("{problem}; {advice}")),
        None => VigilError::Config(format!("the checkpoint {problem}; {advice}")),
    })
}

fn describe_path(cfg: &LoopConfig) -> String {
    cfg.checkpoint_path.as_ref().map_or_else(|| "the checkpoint".to_string(), |p| p.display().to_string())
}

/// Train from step 0, or from `resume` (whose weights and optimiser state the task has already
/// restored) to `cfg.total_steps`.
pub fn run_training(
    task: &mut dyn TrainTask,
    cfg: &LoopConfig,
    resume: Option<&Checkpoint>,
) -> Result<LoopOutcome> {
    let (mut steps_done, mut state) = match resume {
        Some(ck) => {
            check_same_data(ck, cfg)?;
            let state: LoopState = match ck.meta.get("loop") {
                Some(v) => serde_json::from_value(v.clone())
                    .map_err(|e| VigilError::Model(format!("checkpoint loop state: {e}")))?,
                None => LoopState::default(),
            };
            (ck.step, state)
        }
        None => (0, LoopState::default()),
    };
    if steps_done > cfg.total_steps {
        return Err(VigilError::Config(format!(
            "the checkpoint is at step {steps_done}, beyond the {} steps configured",
            cfg.total_steps
        )));
    }
    let resumed_from = resume.map(|ck| ck.step);
    if resume.is_some() {
        let (path, total) = (describe_path(cfg), cfg.total_steps);
        if steps_done >= total || state.stopped_early {
            eprintln!(
                "{}: {path} holds a finished training ({steps_done} of {total} steps) on the same data, \
                 settings and seed; using its weights (delete it to train again)",
                cfg.label
            );
        } else {
            eprintln!("{}: resuming from step {steps_done} of {total} ({path})", cfg.label);
        }
    }
    let end = cfg.session_limit.map_or(cfg.total_steps, |l| l.min(cfg.total_steps));
    let bar = if cfg.show_progress {
        vigil_core::progress::bar(cfg.total_steps as u64, &cfg.label)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_position(steps_done as u64);
    while steps_done < end && !state.stopped_early {
        let loss = task.step(steps_done)?;
        if !loss.is_finite() {
            return Err(VigilError::Model(format!(
                "{}: training diverged at step {steps_done} (loss {loss}); try a lower learning rate",
                cfg.label
            )));
        }
        state.losses.push(loss);
        steps_done += 1;
        bar.set_position(steps_done as u64);
        bar.set_message(format!("{} {loss:.4}", cfg.label));
        if cfg.validate_every > 0 && steps_done % cfg.validate_every == 0 {
            if let Some(v) = task.validate(steps_done)? {
                if state.best_validation.is_none_or(|b| v < b) {
                    state.best_validation = Some(v);
                    state.validations_since_best = 0;
                } else {
                    state.validations_since_best += 1;
                    if cfg.patience.is_some_and(|p| state.validations_since_best >= p) {
                        state.stopped_early = true;
                    }
                }
            }
        }
        if cfg.checkpoint_every > 0 && steps_done % cfg.checkpoint_every == 0 {
            write_checkpoint(task, cfg, steps_done, &state)?;
        }
    }
    bar.finish_and_clear();
    let finished = steps_done >= cfg.total_steps || state.stopped_early;
    let trained_now = resumed_from != Some(steps_done);
    let written_last_step = cfg.checkpoint_every > 0 && steps_done % cfg.checkpoint_every == 0;
    if trained_now && !written_last_step {
        write_checkpoint(task, cfg, steps_done, &state)?;
    }
    if finished && trained_now && cfg.checkpoint_path.is_some() {
        eprintln!(
            "{}: training finished at step {steps_done} of {}; {} now holds the finished run (the same \
             fit reuses it, a fit on other data, settings or seed refuses it)",
            cfg.label,
            cfg.total_steps,
            describe_path(cfg)
        );
    }
    Ok(LoopOutcome { steps_done, finished, state, resumed_from })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vigil_core::TensorBag;

    /// Gradient descent on (w - 3)^2 with a validation loss that stops improving at step 6.
    struct Quadratic {
        w: f32,
        validations: Vec<f32>,
    }

    impl TrainTask for Quadratic {
        fn step(&mut self, _step: usize) -> Result<f32> {
            let loss = (self.w - 3.0).powi(2);
            self.w -= 0.2 * 2.0 * (self.w - 3.0);
            Ok(loss)
        }
        fn validate(&mut self, steps_done: usize) -> Result<Option<f32>> {
            let v = if steps_done <= 6 { 10.0 - steps_done as f32 } else { 5.0 };
            self.validations.push(v);
            Ok(Some(v))
        }
        fn snapshot(&self) -> Result<Checkpoint> {
            let mut weights = TensorBag::new();
            weights.put_f32("w", &[1], vec![self.w]);
            Ok(Checkpoint {
                step: 0,
                seed: 0,
                rng: None,
                schedule: None,
                meta: serde_json::json!({}),
                weights,
                optimizers: vec![],
            })
        }
    }

    #[test]
    fn early_stopping_after_patience() {
        let mut task = Quadratic { w: 0.0, validations: vec![] };
        let mut cfg = LoopConfig::new(100, "q");
        cfg.validate_every = 2;
        cfg.patience = Some(2);
        let out = run_training(&mut task, &cfg, None).unwrap();
        // Validations at 2, 4, 6 improve; 8 and 10 do not: stop after step 10.
        assert_eq!(out.steps_done, 10);
        assert!(out.finished && out.state.stopped_early);
        assert_eq!(out.state.best_validation, Some(4.0));
        assert!(out.state.losses.windows(2).all(|w| w[1] < w[0]));
    }

    #[test]
    fn session_limit_checkpoints_and_resumes_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.ckpt");
        let mut cfg = LoopConfig::new(12, "q");
        cfg.checkpoint_path = Some(path.clone());
        cfg.checkpoint_every = 5;
        cfg.session_limit = Some(7);

        let mut first = Quadratic { w: 0.0, validations: vec![] };
        let out = run_training(&mut first, &cfg, None).unwrap();
        assert_eq!(out.steps_done, 7);
        assert!(!out.finished);
        let ck = Checkpoint::read_if_exists(&path).unwrap().unwrap();
        assert_eq!(ck.step, 7);

        let mut resumed = Quadratic { w: ck.weights.f32("w", None).unwrap()[0], validations: vec![] };
        cfg.session_limit = None;
        let out2 = run_training(&mut resumed, &cfg, Some(&ck)).unwrap();
        assert_eq!(out2.steps_done, 12);
        assert!(out2.finished);

        let mut whole = Quadratic { w: 0.0, validations: vec![] };
        cfg.checkpoint_path = None;
        let out3 = run_training(&mut whole, &cfg, None).unwrap();
        assert_eq!(resumed.w.to_bits(), whole.w.to_bits());
        assert_eq!(out2.state.losses, out3.state.losses);
        assert_eq!((out2.resumed_from, out3.resumed_from), (Some(7), None));
    }

    fn fingerprint(origin: &str, sha256: &str) -> DataFingerprint {
        DataFingerprint { origin: origin.into(), images: 3, sha256: sha256.into() }
    }

    #[test]
    fn checkpoint_of_other_data_is_refused_and_a_finished_one_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.ckpt");
        let mut cfg = LoopConfig::new(6, "q");
        cfg.checkpoint_path = Some(path.clone());
        cfg.checkpoint_every = 4;
        cfg.data = Some(fingerprint("data/class-a/train", "aaaa"));
        let mut first = Quadratic { w: 0.0, validations: vec![] };
        let out = run_training(&mut first, &cfg, None).unwrap();
        assert!(out.finished);
        // The finished run is on disk (step 6, not the periodic step 4) with its data.
        let ck = Checkpoint::read_if_exists(&path).unwrap().unwrap();
        assert_eq!(ck.step, 6);

        // The same data elsewhere (same digest) reuses it without a step.
        let mut same = cfg.clone();
        same.data = Some(fingerprint("copy/of/class-a", "aaaa"));
        let mut task = Quadratic { w: ck.weights.f32("w", None).unwrap()[0], validations: vec![] };
        let again = run_training(&mut task, &same, Some(&ck)).unwrap();
        assert_eq!((again.steps_done, again.resumed_from), (6, Some(6)));
        assert_eq!(task.w.to_bits(), first.w.to_bits());

        // Another data set, or none recorded, is refused with both sets and the file named.
        let mut other = cfg.clone();
        other.data = Some(fingerprint("data/class-b/train", "bbbb"));
        let err = run_training(&mut Quadratic { w: 0.0, validations: vec![] }, &other, Some(&ck))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("q.ckpt")
                && err.contains("data/class-a/train")
                && err.contains("data/class-b/train"),
            "{err}"
        );
        let mut old = ck.clone();
        old.meta.as_object_mut().unwrap().remove(DATA_KEY);
        let err = run_training(&mut Quadratic { w: 0.0, validations: vec![] }, &cfg, Some(&old)).unwrap_err();
        assert!(err.to_string().contains("does not record its training data"), "{err}");
    }
}
