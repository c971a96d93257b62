//! Training a score network with continuous denoising score matching (score_sde's `run_lib.train`
//! with `continuous=True`): t ~ U(ε, 1) per image, the loss of [`score_matching_loss`], Adam with a
//! linear learning-rate warm-up (lr · min(step / warmup, 1)) and global gradient-norm clipping,
//! and an exponential moving average of the weights (decay min(d, (1 + k)/(10 + k)) after k
//! updates, `ExponentialMovingAverage(use_num_updates=True)`), which is the network returned.
//!
//! Resumable exactly: every random draw of step s is a pure function of (seed, s), and the
//! checkpoint holds the weights, their average and Adam's moments.

use std::path::PathBuf;

use burn::module::Module;
use burn::optim::{GradientsParams, ModuleOptimizer};
use burn::tensor::Device;
use rand::Rng;
use serde::{Deserialize, Serialize};
use vigil_core::{DataFingerprint, Result, TensorBag, VigilError};
use vigil_nn::checkpoint::{optimizer_bytes, restore_optimizer};
use vigil_nn::{
    run_training, tensor_from_vec, Checkpoint, LoopConfig, LrSchedule, OptimizerSettings, TrainTask,
};

use crate::sampling::gaussian;
use crate::sde::{score_matching_loss, Sde, T_EPS};
use crate::train::{batch_indices, step_rng, TrainingImages};
use crate::unet::{DropoutNoise, UNet, UNetSettings};

const NOISE_KEY: u64 = 0x7363_6f72_6521;
/// Checkpoint tensor-name prefixes of the trained weights and of their moving average.
const NET_PREFIX: &str = "net.";
const EMA_PREFIX: &str = "ema.";

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScoreTrainSettings {
    pub steps: usize,
    pub batch: usize,
    pub lr: f64,
    /// Steps of linear learning-rate warm-up.
    pub warmup: usize,
    /// Global gradient-norm clip (PyTorch `clip_grad_norm_`); `None`: no clipping.
    pub grad_clip: Option<f32>,
    /// Decay of the weights' exponential moving average.
    pub ema_decay: f64,
    /// Steps between checkpoints when a checkpoint path is given.
    pub checkpoint_every: usize,
}

impl Default for ScoreTrainSettings {
    /// score_sde's optimiser (Adam lr 2e-4, warm-up 5000, gradient clip 1) with the VE configs'
    /// batch 8 and EMA 0.999, for 100,000 steps.
    fn default() -> Self {
        ScoreTrainSettings {
            steps: 100_000,
            batch: 8,
            lr: 2e-4,
            warmup: 5000,
            grad_clip: Some(1.0),
            ema_decay: 0.999,
            checkpoint_every: 1000,
        }
    }
}

impl ScoreTrainSettings {
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(VigilError::Config(format!("score training: {m}")));
        if self.steps == 0 || self.batch == 0 {
            return bad("steps and batch must be at least 1".into());
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad(format!("learning rate {} must be positive", self.lr));
        }
        if !(0.0..1.0).contains(&self.ema_decay) {
            return bad(format!("ema_decay {} must be in [0, 1)", self.ema_decay));
        }
        if self.grad_clip.is_some_and(|c| !(c.is_finite() && c > 0.0)) {
            return bad(format!("grad_clip {:?} must be positive", self.grad_clip));
        }
        Ok(())
    }

    /// The learning rate of step `step` (0-based; score_sde's warm-up gives step 0 a rate of 0).
    pub fn lr_at(&self, step: usize) -> f64 {
        if self.warmup == 0 {
            self.lr
        } else {
            self.lr * (step as f64 / self.warmup as f64).min(1.0)
        }
    }

    /// The decay of the moving average at its `updates`-th update (0-based).
    pub fn ema_decay_at(&self, updates: usize) -> f64 {
        self.ema_decay.min((1.0 + updates as f64) / (10.0 + updates as f64))
    }

    fn optimizer(&self) -> ModuleOptimizer {
        OptimizerSettings::default().build()
    }
}

struct ScoreTrainer<'a> {
    net: Option<UNet>,
    /// The moving average, by PyTorch parameter name.
    ema: TensorBag,
    optimizer: ModuleOptimizer,
    unet: UNetSettings,
    sde: Sde,
    settings: ScoreTrainSettings,
    images: &'a TrainingImages,
    seed: u64,
    device: Device,
}

impl ScoreTrainer<'_> {
    fn meta(&self) -> serde_json::Value {
        serde_json::json!({ "unet": self.unet, "sde": self.sde, "train": self.settings })
    }

    fn update_average(&mut self, step: usize) -> Result<()> {
        let decay = self.settings.ema_decay_at(step) as f32;
        let current = self.net.as_ref().expect("network present between steps").state_dict();
        let mut next = TensorBag::new();
        for name in current.names() {
            let shape = current.shape(name)?.to_vec();
            let values = current.f32(name, None)?;
            let average = self.ema.f32(name, Some(&shape))?;
            let blended = average.iter().zip(&values).map(|(a, v)| decay * a + (1.0 - decay) * v).collect();
            next.put_f32(name, &shape, blended);
        }
        self.ema = next;
        Ok(())
    }
}

fn prefixed(bag: &TensorBag, prefix: &str, out: &mut TensorBag) -> Result<()> {
    for name in bag.names() {
        out.put_f32(&format!("{prefix}{name}"), bag.shape(name)?, bag.f32(name, None)?);
    }
    Ok(())
}

fn unprefixed(bag: &TensorBag, prefix: &str) -> Result<TensorBag> {
    let mut out = TensorBag::new();
    for name in bag.names().filter(|n| n.starts_with(prefix)) {
        out.put_f32(&name[prefix.len()..], bag.shape(name)?, bag.f32(name, None)?);
    }
    Ok(out)
}

impl TrainTask for ScoreTrainer<'_> {
    fn step(&mut self, step: usize) -> Result<f32> {
        let (b, c, s) = (self.settings.batch, self.images.channels, self.images.size);
        let mut x0 = Vec::with_capacity(b * c * s * s);
        for i in batch_indices(self.images.len(), b, self.seed, step) {
            x0.extend_from_slice(self.images.image(i));
        }
        let mut rng = step_rng(self.seed ^ NOISE_KEY, step);
        let t: Vec<f64> = (0..b).map(|_| T_EPS + (1.0 - T_EPS) * rng.gen::<f64>()).collect();
        let z = gaussian(&mut rng, x0.len());
        let mut dropout = DropoutNoise::new(rng);
        let net = self.net.take().expect("network present between steps");
        let loss = score_matching_loss(
            &net,
            &self.sde,
            tensor_from_vec(x0, [b, c, s, s], &self.device),
            &t,
            tensor_from_vec(z, [b, c, s, s], &self.device),
            Some(&mut dropout),
        );
        let value: f32 = loss.clone().into_scalar();
        let mut grads = GradientsParams::from_grads(loss.backward(), &net);
        if let Some(max_norm) = self.settings.grad_clip {
            vigil_flow::clip_grad_norm(&net, &mut grads, max_norm);
        }
        self.net = Some(self.optimizer.step(self.settings.lr_at(step), net, grads));
        self.update_average(step)?;
        Ok(value)
    }

    fn snapshot(&self) -> Result<Checkpoint> {
        let net = self.net.as_ref().expect("network present between steps");
        let mut weights = TensorBag::new();
        prefixed(&net.state_dict(), NET_PREFIX, &mut weights)?;
        prefixed(&self.ema, EMA_PREFIX, &mut weights)?;
        Ok(Checkpoint {
            step: 0,
            seed: self.seed,
            rng: None,
            schedule: Some(LrSchedule::Constant { lr: self.settings.lr }),
            meta: self.meta(),
            weights,
            optimizers: vec![optimizer_bytes(&self.optimizer)?],
        })
    }
}

/// Where and how one score training runs (as [`crate::TrainRun`]).
#[derive(Clone, Debug, Default)]
pub struct ScoreTrainRun {
    pub seed: u64,
    pub checkpoint_path: Option<PathBuf>,
    pub session_limit: Option<usize>,
    pub show_progress: bool,
    pub label: String,
    pub data: Option<DataFingerprint>,
}

/// A trained score network (the moving average of the weights, in inference mode) and the loss
/// of every step.
pub struct TrainedScore {
    pub net: UNet,
    pub losses: Vec<f32>,
}

/// Train a score network for `sde` on `images` (values in [−1, 1]) or continue the checkpointed
/// run. A session that stops early returns [`VigilError::Interrupted`] after its checkpoint.
pub fn train_score_net(
    unet: &UNetSettings,
    sde: &Sde,
    settings: &ScoreTrainSettings,
    images: &TrainingImages,
    run: &ScoreTrainRun,
) -> Result<TrainedScore> {
    settings.validate()?;
    sde.validate()?;
    if (images.channels, images.size) != (unet.in_channels, unet.image_size) {
        return Err(VigilError::invalid(format!(
            "training images are {}x{}x{} but the U-Net takes {}x{}x{}",
            images.channels, images.size, images.size, unet.in_channels, unet.image_size, unet.image_size
        )));
    }
    if run.session_limit.is_some() && run.checkpoint_path.is_none() {
        return Err(VigilError::Config("a session step limit needs a checkpoint file to resume from".into()));
    }
    let device = vigil_nn::training_device();
    let net = UNet::init(unet, run.seed, &device)?;
    let mut trainer = ScoreTrainer {
        ema: net.state_dict(),
        net: Some(net),
        optimizer: settings.optimizer(),
        unet: unet.clone(),
        sde: *sde,
        settings: settings.clone(),
        images,
        seed: run.seed,
        device,
    };
    let resume = match &run.checkpoint_path {
        Some(path) => Checkpoint::read_if_exists(path)?,
        None => None,
    };
    if let (Some(ck), Some(path)) = (&resume, &run.checkpoint_path) {
        let mine = trainer.meta();
        if ["unet", "sde", "train"].iter().any(|k| ck.meta.get(k) != mine.get(k)) || ck.seed != run.seed {
            return Err(VigilError::file(
                path,
                "was written by a run with other settings or another seed; delete it to start over",
            ));
        }
        let net = trainer.net.take().expect("network present");
        let net = net
            .load_state_dict(&unprefixed(&ck.weights, NET_PREFIX)?)
            .map_err(|e| VigilError::file(path, e.to_string()))?;
        trainer.net = Some(net);
        trainer.ema = unprefixed(&ck.weights, EMA_PREFIX)?;
        let bytes =
            ck.optimizers.first().ok_or_else(|| VigilError::file(path, "holds no optimiser state"))?;
        trainer.optimizer = restore_optimizer(settings.optimizer(), bytes)?;
    }
    let label = if run.label.is_empty() { "score" } else { run.label.as_str() };
    let mut config = LoopConfig::new(settings.steps, label);
    config.checkpoint_every =
        if run.checkpoint_path.is_some() { settings.checkpoint_every.max(1) } else { 0 };
    config.checkpoint_path = run.checkpoint_path.clone();
    config.session_limit = run.session_limit;
    config.show_progress = run.show_progress;
    config.data = run.data.clone();
    let outcome = run_training(&mut trainer, &config, resume.as_ref())?;
    if !outcome.finished {
        return Err(VigilError::Interrupted(format!(
            "{label} training stopped after step {} of {}; train again with the same checkpoint to resume",
            outcome.steps_done, settings.steps
        )));
    }
    let averaged = UNet::new(unet, &trainer.device)?.load_state_dict(&trainer.ema)?.valid();
    Ok(TrainedScore { net: averaged, losses: outcome.state.losses })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> UNetSettings {
        UNetSettings {
            image_size: 8,
            channel_mults: vec![1, 1],
            attention_resolutions: vec![4],
            num_res_blocks: 1,
            ..UNetSettings::cpu()
        }
    }

    fn images() -> TrainingImages {
        let images =
            (0..4).map(|i| (0..3 * 64).map(|p| ((p + i * 5) % 11) as f32 / 5.5 - 1.0).collect()).collect();
        TrainingImages::new(images, 3, 8).unwrap()
    }

    #[test]
    fn warmup_and_average_decay_follow_score_sde() {
        let s = ScoreTrainSettings { warmup: 100, ..Default::default() };
        assert_eq!(s.lr_at(0), 0.0);
        assert!((s.lr_at(50) - 1e-4).abs() < 1e-15 && s.lr_at(500) == 2e-4);
        assert!((s.ema_decay_at(0) - 0.1).abs() < 1e-12);
        assert_eq!(s.ema_decay_at(1_000_000), 0.999);
        assert!(ScoreTrainSettings { ema_decay: 1.0, ..Default::default() }.validate().is_err());
        assert!(ScoreTrainSettings { grad_clip: Some(0.0), ..Default::default() }.validate().is_err());
    }

    #[test]
    fn training_resumes_exactly_with_its_average() {
        let settings = ScoreTrainSettings {
            steps: 6,
            batch: 2,
            warmup: 2,
            lr: 1e-3,
            checkpoint_every: 3,
            ..Default::default()
        };
        let sde = Sde::vp();
        let images = images();
        let whole = train_score_net(
            &tiny(),
            &sde,
            &settings,
            &images,
            &ScoreTrainRun { seed: 3, ..Default::default() },
        )
        .unwrap();
        assert_eq!(whole.losses.len(), 6);
        let dir = tempfile::tempdir().unwrap();
        let run = ScoreTrainRun {
            seed: 3,
            checkpoint_path: Some(dir.path().join("score.ckpt")),
            session_limit: Some(3),
            ..Default::default()
        };
        let err = train_score_net(&tiny(), &sde, &settings, &images, &run).err().unwrap();
        assert!(matches!(err, VigilError::Interrupted(_)), "{err}");
        let resumed = train_score_net(
            &tiny(),
            &sde,
            &settings,
            &images,
            &ScoreTrainRun { session_limit: None, ..run.clone() },
        )
        .unwrap();
        assert_eq!(resumed.losses, whole.losses);
        assert_eq!(resumed.net.state_dict(), whole.net.state_dict());
        // Another SDE's checkpoint is refused.
        let other = train_score_net(&tiny(), &Sde::ve(), &settings, &images, &run).err().unwrap();
        assert!(other.to_string().contains("other settings"), "{other}");
    }
}
