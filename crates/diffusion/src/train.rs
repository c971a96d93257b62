//! ε-prediction training (DDAD's `train.py` and `loss.py`): t uniform in 0..T per image,
//! x_t = √ᾱ_t x0 + √(1−ᾱ_t) ε, loss ‖ε − ε_θ(x_t, t)‖² summed over C, H, W and averaged over the
//! batch; Adam with L2 weight decay (`torch.optim.Adam(weight_decay=0.05)`, not AdamW: the AdamW
//! line in `train.py` is commented out). Resumable exactly: every random draw of step s (batch,
//! timesteps, noise, dropout masks) is a pure function of (seed, s), and checkpoints carry the
//! weights and Adam's moments.

use std::path::PathBuf;

use burn::module::Module;
use burn::optim::{GradientsParams, ModuleOptimizer};
use burn::tensor::{Device, Tensor};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use vigil_core::{DataFingerprint, Result, VigilError};
use vigil_nn::checkpoint::{optimizer_bytes, restore_optimizer};
use vigil_nn::{
    run_training, tensor_from_vec, Checkpoint, LoopConfig, LrSchedule, OptimizerSettings, TrainTask,
};

use crate::sampling::gaussian;
use crate::schedule::NoiseSchedule;
use crate::unet::{DropoutNoise, UNet, UNetSettings};

/// Stream keys: independent random streams per purpose, each indexed by the step.
const ORDER_KEY: u64 = 0x6f72_6465_7221;
const NOISE_KEY: u64 = 0x6e6f_6973_6521;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainSettings {
    /// Optimiser steps (the reference counts epochs of `len(train) / batch` steps, drop_last).
    pub steps: usize,
    pub batch: usize,
    pub lr: f64,
    /// L2 weight decay added to the gradient (Adam, as the reference).
    pub weight_decay: f32,
    /// Steps between checkpoints when a checkpoint path is given.
    pub checkpoint_every: usize,
}

impl Default for TrainSettings {
    /// DDAD's optimiser and batch (`config.yaml`: lr 3e-4, weight_decay 0.05, batch 32).
    fn default() -> Self {
        TrainSettings { steps: 1000, batch: 32, lr: 3e-4, weight_decay: 0.05, checkpoint_every: 250 }
    }
}

impl TrainSettings {
    pub fn validate(&self) -> Result<()> {
        if self.steps == 0 || self.batch == 0 {
            return Err(VigilError::Config("diffusion training: steps and batch must be at least 1".into()));
        }
        let lr_ok = self.lr.is_finite() && self.lr > 0.0;
        let decay_ok = self.weight_decay.is_finite() && self.weight_decay >= 0.0;
        if !lr_ok || !decay_ok {
            return Err(VigilError::Config(format!(
                "diffusion training: learning rate {} must be positive and weight decay {} non-negative",
                self.lr, self.weight_decay
            )));
        }
        Ok(())
    }

    fn optimizer(&self) -> ModuleOptimizer {
        OptimizerSettings { decoupled: false, weight_decay: self.weight_decay, ..Default::default() }.build()
    }
}

/// Training images at the network's size, values in [−1, 1] (DDAD maps [0, 1] to [−1, 1]).
pub struct TrainingImages {
    data: Vec<f32>,
    count: usize,
    pub(crate) channels: usize,
    pub(crate) size: usize,
}

impl TrainingImages {
    /// `images`: planar `[channels, size, size]` arrays.
    pub fn new(images: Vec<Vec<f32>>, channels: usize, size: usize) -> Result<Self> {
        if images.is_empty() {
            return Err(VigilError::invalid("diffusion training needs at least one image"));
        }
        let per_image = channels * size * size;
        if let Some(i) = images.iter().position(|im| im.len() != per_image) {
            return Err(VigilError::invalid(format!(
                "training image {i} holds {} values, expected {channels}x{size}x{size}",
                images[i].len()
            )));
        }
        Ok(TrainingImages { count: images.len(), data: images.concat(), channels, size })
    }

    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    pub(crate) fn image(&self, i: usize) -> &[f32] {
        let n = self.channels * self.size * self.size;
        &self.data[i * n..(i + 1) * n]
    }
}

/// The images of step `step`: epochs of shuffled images (a fresh permutation per epoch, from the
/// seed), `max(n / batch, 1)` batches per epoch as `drop_last=True` gives. With fewer images than
/// a batch the permutation is repeated to fill it (the reference would run no step at all).
pub fn batch_indices(n: usize, batch: usize, seed: u64, step: usize) -> Vec<usize> {
    let per_epoch = (n / batch).max(1);
    let (epoch, k) = (step / per_epoch, step % per_epoch);
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut step_rng(seed ^ ORDER_KEY, epoch));
    (k * batch..(k + 1) * batch).map(|i| order[i % n]).collect()
}

/// A generator that depends only on (seed, index).
pub(crate) fn step_rng(seed: u64, index: usize) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(index as u64);
    rng
}

/// The training loss of one batch: `x0` `[n, C, S, S]`, timesteps `t`, noise `noise` of x0's
/// shape. Returns ‖ε − ε_θ(x_t, t)‖² summed over C, H, W, averaged over the batch.
pub fn noise_prediction_loss(
    net: &UNet,
    x0: Tensor<4>,
    t: &[usize],
    noise: Tensor<4>,
    schedule: &NoiseSchedule,
    dropout: Option<&mut DropoutNoise>,
) -> Tensor<1> {
    let [n, _, _, _] = x0.dims();
    let device = x0.device();
    let alpha_bar: Vec<f32> = t.iter().map(|&ti| schedule.alpha_bar(ti as i64)).collect();
    let signal = tensor_from_vec(alpha_bar.iter().map(|a| a.sqrt()).collect(), [n, 1, 1, 1], &device);
    let spread = tensor_from_vec(alpha_bar.iter().map(|a| (1.0 - a).sqrt()).collect(), [n, 1, 1, 1], &device);
    let x_t = x0 * signal + noise.clone() * spread;
    let times: Vec<f32> = t.iter().map(|&ti| ti as f32).collect();
    let predicted = net.forward(x_t, &times, dropout);
    (noise - predicted).square().sum_dim(3).sum_dim(2).sum_dim(1).mean().reshape([1])
}

/// One U-Net and its Adam, stepping through the training of [`TrainSettings`].
pub struct Trainer<'a> {
    net: Option<UNet>,
    optimizer: ModuleOptimizer,
    unet: UNetSettings,
    settings: TrainSettings,
    images: &'a TrainingImages,
    schedule: NoiseSchedule,
    seed: u64,
    device: Device,
}

impl<'a> Trainer<'a> {
    /// A freshly initialised network (the reference initialisation from `seed`) on the training
    /// device.
    pub fn new(
        unet: &UNetSettings,
        settings: &TrainSettings,
        images: &'a TrainingImages,
        seed: u64,
    ) -> Result<Self> {
        settings.validate()?;
        if (images.channels, images.size) != (unet.in_channels, unet.image_size) {
            return Err(VigilError::invalid(format!(
                "training images are {}x{}x{} but the U-Net takes {}x{}x{}",
                images.channels, images.size, images.size, unet.in_channels, unet.image_size, unet.image_size
            )));
        }
        let device = vigil_nn::training_device();
        Ok(Trainer {
            net: Some(UNet::init(unet, seed, &device)?),
            optimizer: settings.optimizer(),
            unet: unet.clone(),
            settings: settings.clone(),
            images,
            schedule: NoiseSchedule::ddad(),
            seed,
            device,
        })
    }

    /// Continue from a checkpoint written by this trainer's [`TrainTask::snapshot`].
    fn restore(&mut self, ck: &Checkpoint, path: &std::path::Path) -> Result<()> {
        let net = self.net.take().expect("network present between steps");
        let net = net.load_state_dict(&ck.weights).map_err(|e| VigilError::file(path, e.to_string()))?;
        self.net = Some(net);
        let bytes =
            ck.optimizers.first().ok_or_else(|| VigilError::file(path, "holds no optimiser state"))?;
        self.optimizer = restore_optimizer(self.settings.optimizer(), bytes)?;
        Ok(())
    }

    /// The network in inference mode.
    pub fn into_net(mut self) -> UNet {
        self.net.take().expect("network present between steps").valid()
    }

    fn meta(&self) -> serde_json::Value {
        serde_json::json!({ "unet": self.unet, "train": self.settings })
    }
}

impl TrainTask for Trainer<'_> {
    fn step(&mut self, step: usize) -> Result<f32> {
        let (b, c, s) = (self.settings.batch, self.images.channels, self.images.size);
        let mut x0 = Vec::with_capacity(b * c * s * s);
        for i in batch_indices(self.images.len(), b, self.seed, step) {
            x0.extend_from_slice(self.images.image(i));
        }
        let mut rng = step_rng(self.seed ^ NOISE_KEY, step);
        let t: Vec<usize> = (0..b).map(|_| rng.gen_range(0..self.schedule.steps())).collect();
        let noise = gaussian(&mut rng, x0.len());
        let mut dropout = DropoutNoise::new(rng);
        let net = self.net.take().expect("network present between steps");
        let loss = noise_prediction_loss(
            &net,
            tensor_from_vec(x0, [b, c, s, s], &self.device),
            &t,
            tensor_from_vec(noise, [b, c, s, s], &self.device),
            &self.schedule,
            Some(&mut dropout),
        );
        let value: f32 = loss.clone().into_scalar();
        let grads = GradientsParams::from_grads(loss.backward(), &net);
        self.net = Some(self.optimizer.step(self.settings.lr, net, grads));
        Ok(value)
    }

    fn snapshot(&self) -> Result<Checkpoint> {
        let net = self.net.as_ref().expect("network present between steps");
        Ok(Checkpoint {
            step: 0,
            seed: self.seed,
            rng: None,
            schedule: Some(LrSchedule::Constant { lr: self.settings.lr }),
            meta: self.meta(),
            weights: net.state_dict(),
            optimizers: vec![optimizer_bytes(&self.optimizer)?],
        })
    }
}

/// Where and how one training runs.
#[derive(Clone, Debug, Default)]
pub struct TrainRun {
    pub seed: u64,
    /// Checkpoint file; a run finds its predecessor's state there and continues it.
    pub checkpoint_path: Option<PathBuf>,
    /// Stop (after a checkpoint) once this many steps are done, leaving the rest to a resumed run.
    pub session_limit: Option<usize>,
    pub show_progress: bool,
    /// Progress-bar label and message prefix.
    pub label: String,
    /// The training set, recorded in checkpoints so another set's checkpoint is refused.
    pub data: Option<DataFingerprint>,
}

/// A trained network and the loss of every step.
pub struct Trained {
    pub net: UNet,
    pub losses: Vec<f32>,
}

/// Train a U-Net on `images` (or continue the checkpointed run), returning it in inference mode.
/// A session that stops early returns [`VigilError::Interrupted`] after writing its checkpoint.
pub fn train_unet(
    unet: &UNetSettings,
    settings: &TrainSettings,
    images: &TrainingImages,
    run: &TrainRun,
) -> Result<Trained> {
    let mut trainer = Trainer::new(unet, settings, images, run.seed)?;
    if run.session_limit.is_some() && run.checkpoint_path.is_none() {
        return Err(VigilError::Config("a session step limit needs a checkpoint file to resume from".into()));
    }
    let resume = match &run.checkpoint_path {
        Some(path) => Checkpoint::read_if_exists(path)?,
        None => None,
    };
    if let (Some(ck), Some(path)) = (&resume, &run.checkpoint_path) {
        if ck.meta.get("unet") != trainer.meta().get("unet")
            || ck.meta.get("train") != trainer.meta().get("train")
            || ck.seed != run.seed
        {
            return Err(VigilError::file(
                path,
                "was written by a run with other settings or another seed; delete it to start over",
            ));
        }
        trainer.restore(ck, path)?;
    }
    let label = if run.label.is_empty() { "diffusion" } else { run.label.as_str() };
    let mut config = LoopConfig::new(settings.steps, label);
    config.checkpoint_every = if run.checkpoint_path.is_some() { settings.checkpoint_every } else { 0 };
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
    Ok(Trained { net: trainer.into_net(), losses: outcome.state.losses })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_cover_each_epoch_once() {
        let (n, b) = (10, 3);
        // 3 batches per epoch (drop_last): 9 distinct images of the 10, from one permutation.
        let epoch: Vec<usize> = (0..3).flat_map(|s| batch_indices(n, b, 7, s)).collect();
        let mut sorted = epoch.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), 9);
        assert_ne!(batch_indices(n, b, 7, 3), batch_indices(n, b, 7, 0));
        assert_eq!(batch_indices(n, b, 7, 4), batch_indices(n, b, 7, 4));
        // Fewer images than a batch: every image appears, repeated.
        let small = batch_indices(2, 5, 1, 0);
        assert_eq!(small.len(), 5);
        assert!(small.contains(&0) && small.contains(&1));
    }

    #[test]
    fn loss_sums_over_pixels_and_averages_over_images() {
        // With the zero-initialised output convolution the network predicts 0, so the loss is
        // the mean over images of Σ ε² (here ε = 0.5 everywhere: 0.25 · 3 · 8 · 8 = 48).
        let device = Device::flex();
        let settings = UNetSettings {
            image_size: 8,
            channel_mults: vec![1, 1],
            attention_resolutions: vec![4],
            ..UNetSettings::cpu()
        };
        let net = UNet::init(&settings, 1, &device).unwrap();
        let x0 = Tensor::<4>::zeros([2, 3, 8, 8], &device);
        let noise = Tensor::<4>::ones([2, 3, 8, 8], &device).mul_scalar(0.5);
        let loss: f32 =
            noise_prediction_loss(&net, x0, &[3, 900], noise, &NoiseSchedule::ddad(), None).into_scalar();
        assert!((loss - 48.0).abs() < 1e-4, "{loss}");
    }

    #[test]
    fn bad_settings_and_images_are_refused() {
        assert!(TrainSettings { batch: 0, ..Default::default() }.validate().is_err());
        assert!(TrainSettings { lr: -1.0, ..Default::default() }
            .validate()
            .unwrap_err()
            .to_string()
            .contains("-1"));
        assert!(TrainingImages::new(vec![], 3, 8).is_err());
        let err = TrainingImages::new(vec![vec![0.0; 192], vec![0.0; 10]], 3, 8).err().unwrap();
        assert!(err.to_string().contains("image 1"), "{err}");
        let images = TrainingImages::new(vec![vec![0.0; 192]], 3, 8).unwrap();
        let err = Trainer::new(&UNetSettings::cpu(), &TrainSettings::default(), &images, 0).err().unwrap();
        assert!(err.to_string().contains("3x64x64"), "{err}");
    }
}
