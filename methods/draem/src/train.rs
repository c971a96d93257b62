//! DRAEM training: synthetic anomalies, joint loss, one Adam over both networks, resumable.

use std::path::PathBuf;

use burn::module::Module;
use burn::optim::{GradientsParams, ModuleOptimizer};
use burn::tensor::{Device, Tensor};
use rand::Rng;
use rayon::prelude::*;
use vigil_core::{DataFingerprint, FitContext, Image, ImageSource, Mask, Result, VigilError};
use vigil_nn::checkpoint::{optimizer_bytes, restore_optimizer};
use vigil_nn::{
    focal_loss, focal_loss_map, init_normal, l2_loss, load_module, module_to_bag, run_training, ssim,
    ssim_loss, stable_param_ids, tensor_from_vec, training_device, Checkpoint, LoopConfig, LrSchedule,
    OptimizerSettings, TrainTask,
};
use vigil_synth::{SynthConfig, Synthesizer};

use crate::nets::{DraemNet, Reconstructor};
use crate::{new_autoencoder, new_nested, DraemSettings, Trained, Variant};

/// The checkpoint's file name inside `FitContext::checkpoint_dir` (prefixed by the method name).
pub const CHECKPOINT_FILE: &str = "training.ckpt";

/// Keeps the data-order stream apart from the synthetic-anomaly streams of the same seed.
const ORDER_KEY: u64 = 0x6f72_6465_725f_6b79;

/// DCGAN-style init as the official DRAEM (`weights_init`): N(0, 0.02) kernels.
const INIT_STD: f32 = 0.02;

/// DRAEM's focal loss exponent.
const FOCAL_GAMMA: f32 = 2.0;

/// The joint loss L2 + w (1 - SSIM) + focal of one batch. With `keep` (`[N, 1, H, W]`, 1 where a
/// pixel counts, 0 where it is ignored) each term is the mean over the kept pixels only; without
/// it, the official plain means.
fn joint_loss(
    rec: Tensor<4>,
    clean: Tensor<4>,
    logits: Tensor<4>,
    target: Tensor<4>,
    keep: Option<Tensor<4>>,
    ssim_weight: f64,
) -> Tensor<1> {
    let Some(keep) = keep else {
        return l2_loss(rec.clone(), clean.clone())
            + ssim_loss(rec, clean).mul_scalar(ssim_weight)
            + focal_loss(logits, target, FOCAL_GAMMA);
    };
    let [_, channels, _, _] = rec.dims();
    let kept = keep.clone().sum().clamp_min(1.0);
    let kept_values = kept.clone().mul_scalar(channels as f32);
    let keep_channels = keep.clone().repeat_dim(1, channels);
    let diff = rec.clone() - clean.clone();
    let l2 = (diff.clone() * diff * keep_channels.clone()).sum() / kept_values.clone();
    let structure = (ssim(rec, clean) * keep_channels).sum() / kept_values;
    let focal = (focal_loss_map(logits, target, FOCAL_GAMMA) * keep).sum() / kept;
    l2 + structure.neg().add_scalar(1.0).mul_scalar(ssim_weight) + focal
}

/// 1 where the pixel of the network-sized image counts, 0 where `ignore` marks it (nearest
/// resampling to `size` x `size`).
pub(crate) fn keep_weights(ignore: &Mask, size: usize) -> Vec<f32> {
    ignore.resize_nearest(size, size).data.iter().map(|&ignored| if ignored { 0.0 } else { 1.0 }).collect()
}

struct DraemTask<'a, R: Reconstructor> {
    net: Option<DraemNet<R>>,
    optimizer: ModuleOptimizer,
    schedule: LrSchedule,
    images: &'a [Image],
    /// Per training image, the pixels its losses count (see [`joint_loss`]); `None` when no
    /// image has an ignore mask.
    keep: Option<&'a [Vec<f32>]>,
    synth: &'a Synthesizer,
    settings: &'a DraemSettings,
    seed: u64,
    device: Device,
}

/// One batch: corrupted inputs, clean targets, anomaly masks and (with ignore masks) the kept pixels.
type Batch = (Vec<f32>, Vec<f32>, Vec<f32>, Option<Vec<f32>>);

impl<R: Reconstructor> DraemTask<'_, R> {
    /// Batch `step`, a pure function of (seed, step).
    fn batch(&self, step: usize) -> Result<Batch> {
        let b = self.settings.batch;
        let samples: Vec<(vigil_synth::SyntheticSample, usize)> = (0..b)
            .into_par_iter()
            .map(|k| {
                let index = (step * b + k) as u64;
                let pick = Synthesizer::rng(self.seed ^ ORDER_KEY, index).gen_range(0..self.images.len());
                Ok((self.synth.sample(&self.images[pick], self.seed, index)?, pick))
            })
            .collect::<Result<_>>()?;
        let (mut x, mut clean, mut mask) = (Vec::new(), Vec::new(), Vec::new());
        let mut keep = self.keep.map(|_| Vec::new());
        for (sample, pick) in samples {
            x.extend_from_slice(&sample.image.data);
            clean.extend_from_slice(&self.images[pick].data);
            mask.extend_from_slice(&sample.mask);
            if let (Some(keep), Some(per_image)) = (keep.as_mut(), self.keep) {
                keep.extend_from_slice(&per_image[pick]);
            }
        }
        Ok((x, clean, mask, keep))
    }
}

impl<R: Reconstructor> TrainTask for DraemTask<'_, R> {
    fn step(&mut self, step: usize) -> Result<f32> {
        let (b, s) = (self.settings.batch, self.settings.image_size);
        let (x, clean, mask, keep) = self.batch(step)?;
        let x = tensor_from_vec(x, [b, 3, s, s], &self.device);
        let clean = tensor_from_vec(clean, [b, 3, s, s], &self.device);
        let mask = tensor_from_vec(mask, [b, 1, s, s], &self.device);
        let keep = keep.map(|k| tensor_from_vec(k, [b, 1, s, s], &self.device));
        let net = self.net.take().expect("network present between steps");
        let (rec, logits) = net.forward(x);
        let loss = joint_loss(rec, clean, logits, mask, keep, self.settings.ssim_weight);
        let value: f32 = loss.clone().into_scalar();
        let grads = GradientsParams::from_grads(loss.backward(), &net);
        self.net = Some(self.optimizer.step(self.schedule.lr_at(step), net, grads));
        Ok(value)
    }

    fn snapshot(&self) -> Result<Checkpoint> {
        let net = self.net.as_ref().expect("network present between steps");
        Ok(Checkpoint {
            step: 0,
            seed: self.seed,
            rng: None,
            schedule: Some(self.schedule.clone()),
            meta: serde_json::json!({ "settings": self.settings }),
            weights: module_to_bag(net),
            optimizers: vec![optimizer_bytes(&self.optimizer)?],
        })
    }
}

/// Per training image, 1 for each network-sized pixel its losses count, 0 where it is ignored.
type KeptPixels = Vec<Vec<f32>>;

/// The training images at the network size, and per image the pixels its losses count when
/// any image has an ignore mask.
fn load_images(train: &dyn ImageSource, size: usize) -> Result<(Vec<Image>, Option<KeptPixels>)> {
    if train.is_empty() {
        return Err(VigilError::invalid("DRAEM needs at least one training image"));
    }
    let loaded: Vec<(Image, Option<Vec<f32>>)> = (0..train.len())
        .into_par_iter()
        .map(|i| {
            let img = train.load(i).map_err(|e| VigilError::file(train.name(i), e.to_string()))?;
            let keep = match train.ignore_mask(i) {
                Some(mask) if (mask.width, mask.height) != (img.width, img.height) => {
                    return Err(VigilError::file(
                        train.name(i),
                        format!(
                            "ignore mask is {}x{} but the image is {}x{}",
                            mask.width, mask.height, img.width, img.height
                        ),
                    ))
                }
                Some(mask) => Some(keep_weights(&mask, size)),
                None => None,
            };
            Ok((img.to_rgb().resize_bilinear(size, size), keep))
        })
        .collect::<Result<_>>()?;
    let any_mask = loaded.iter().any(|(_, keep)| keep.is_some());
    let (images, keep): (Vec<Image>, Vec<Option<Vec<f32>>>) = loaded.into_iter().unzip();
    let keep =
        any_mask.then(|| keep.into_iter().map(|k| k.unwrap_or_else(|| vec![1.0; size * size])).collect());
    Ok((images, keep))
}

/// Train (or resume training) and return the inference network and the per-step losses.
pub(crate) fn fit(
    settings: &DraemSettings,
    train: &dyn ImageSource,
    ctx: &FitContext,
    session_limit: Option<usize>,
) -> Result<(Trained, Vec<f32>)> {
    settings.validate()?;
    // A checkpoint is tied to the images it was trained on: resuming on others is refused.
    let data = ctx.checkpoint_dir.as_ref().map(|_| train.fingerprint()).transpose()?;
    let (images, keep) = load_images(train, settings.image_size)?;
    let synth_config = SynthConfig {
        cutout_probability: settings.cutout_probability,
        beta_range: (settings.opacity[0] as f32, settings.opacity[1] as f32),
        ..Default::default()
    };
    let synth = Synthesizer::new(synth_config, settings.anomaly_source()?);
    let device = training_device();
    let run = Run {
        settings,
        ctx,
        session_limit,
        images: &images,
        keep: keep.as_deref(),
        synth: &synth,
        device: device.clone(),
        data,
    };
    Ok(match settings.variant {
        Variant::Draem => {
            let (net, losses) = run.train(new_autoencoder(settings, &device))?;
            (Trained::Draem(net), losses)
        }
        Variant::Unetpp => {
            let (net, losses) = run.train(new_nested(settings, &device))?;
            (Trained::Unetpp(net), losses)
        }
    })
}

struct Run<'a> {
    settings: &'a DraemSettings,
    ctx: &'a FitContext,
    session_limit: Option<usize>,
    images: &'a [Image],
    keep: Option<&'a [Vec<f32>]>,
    synth: &'a Synthesizer,
    device: Device,
    data: Option<DataFingerprint>,
}

impl Run<'_> {
    fn checkpoint_path(&self) -> Option<PathBuf> {
        let name = format!("{}-{CHECKPOINT_FILE}", self.settings.method_name());
        self.ctx.checkpoint_dir.as_ref().map(|d| d.join(name))
    }

    fn train<R: Reconstructor>(&self, net: DraemNet<R>) -> Result<(DraemNet<R>, Vec<f32>)> {
        let s = self.settings;
        let mut net = stable_param_ids(init_normal(net, self.ctx.seed, INIT_STD));
        let mut optimizer = OptimizerSettings::default().build();
        let checkpoint_path = self.checkpoint_path();
        if self.session_limit.is_some() && checkpoint_path.is_none() {
            return Err(VigilError::Config(
                "a session step limit needs a checkpoint folder to resume from".into(),
            ));
        }
        let resume = match &checkpoint_path {
            Some(path) => Checkpoint::read_if_exists(path)?,
            None => None,
        };
        if let (Some(ck), Some(path)) = (&resume, &checkpoint_path) {
            let same_settings =
                ck.meta.get("settings") == Some(&serde_json::to_value(s).expect("serialisable"));
            if !same_settings || ck.seed != self.ctx.seed {
                return Err(VigilError::file(
                    path,
                    "was written by a run with other settings or another seed; delete it to start over",
                ));
            }
            net = load_module(net, &ck.weights, "").map_err(|e| VigilError::file(path, e.to_string()))?;
            let bytes =
                ck.optimizers.first().ok_or_else(|| VigilError::file(path, "holds no optimiser state"))?;
            optimizer = restore_optimizer(optimizer, bytes)?;
        }
        let mut task = DraemTask {
            net: Some(net),
            optimizer,
            schedule: LrSchedule::draem(s.lr, s.steps, s.lr_gamma),
            images: self.images,
            keep: self.keep,
            synth: self.synth,
            settings: s,
            seed: self.ctx.seed,
            device: self.device.clone(),
        };
        let mut config = LoopConfig::new(s.steps, s.method_name());
        config.checkpoint_every = if checkpoint_path.is_some() { s.checkpoint_every } else { 0 };
        config.checkpoint_path = checkpoint_path;
        config.session_limit = self.session_limit;
        config.show_progress = self.ctx.show_progress;
        config.data = self.data.clone();
        let outcome = run_training(&mut task, &config, resume.as_ref())?;
        if !outcome.finished {
            return Err(VigilError::Interrupted(format!(
                "{} training stopped after step {} of {}; fit again with the same checkpoint folder to resume",
                s.method_name(),
                outcome.steps_done,
                s.steps
            )));
        }
        let net = task.net.take().expect("network present after training");
        Ok((net.valid(), outcome.state.losses))
    }
}

/// One DRAEM training step on given tensors, exactly as `fit` runs it (joint loss, Adam,
/// autodiff), without the synthetic-anomaly generation: what the PyTorch comparison times.
pub struct BenchStep {
    net: Option<Trained>,
    optimizer: ModuleOptimizer,
    device: Device,
    settings: DraemSettings,
}

impl BenchStep {
    pub fn new(settings: &DraemSettings, seed: u64) -> Result<Self> {
        settings.validate()?;
        let device = training_device();
        let net = match settings.variant {
            Variant::Draem => Trained::Draem(stable_param_ids(init_normal(
                new_autoencoder(settings, &device),
                seed,
                INIT_STD,
            ))),
            Variant::Unetpp => {
                Trained::Unetpp(stable_param_ids(init_normal(new_nested(settings, &device), seed, INIT_STD)))
            }
        };
        Ok(BenchStep {
            net: Some(net),
            optimizer: OptimizerSettings::default().build(),
            device,
            settings: settings.clone(),
        })
    }

    /// One step on a batch `[n, 3, s, s]` of inputs, clean targets and `[n, 1, s, s]` masks;
    /// returns the loss.
    pub fn step(&mut self, x: Vec<f32>, clean: Vec<f32>, mask: Vec<f32>) -> f32 {
        let s = self.settings.image_size;
        let n = mask.len() / (s * s);
        let x = tensor_from_vec(x, [n, 3, s, s], &self.device);
        let clean = tensor_from_vec(clean, [n, 3, s, s], &self.device);
        let mask = tensor_from_vec(mask, [n, 1, s, s], &self.device);
        let lr = self.settings.lr;
        let ssim_weight = self.settings.ssim_weight;
        fn run<R: Reconstructor>(
            net: DraemNet<R>,
            opt: &mut ModuleOptimizer,
            lr: f64,
            ssim_weight: f64,
            [x, clean, mask]: [Tensor<4>; 3],
        ) -> (DraemNet<R>, f32) {
            let (rec, logits) = net.forward(x);
            let loss = joint_loss(rec, clean, logits, mask, None, ssim_weight);
            let value: f32 = loss.clone().into_scalar();
            let grads = GradientsParams::from_grads(loss.backward(), &net);
            (opt.step(lr, net, grads), value)
        }
        let batch = [x, clean, mask];
        let (net, loss) = match self.net.take().expect("network present") {
            Trained::Draem(n) => {
                let (n, l) = run(n, &mut self.optimizer, lr, ssim_weight, batch);
                (Trained::Draem(n), l)
            }
            Trained::Unetpp(n) => {
                let (n, l) = run(n, &mut self.optimizer, lr, ssim_weight, batch);
                (Trained::Unetpp(n), l)
            }
        };
        self.net = Some(net);
        loss
    }

    /// The network in inference mode, as a detector (for timing `score`).
    pub fn into_detector(mut self) -> crate::DraemDetector {
        let net = match self.net.take().expect("network present") {
            Trained::Draem(n) => Trained::Draem(n.valid()),
            Trained::Unetpp(n) => Trained::Unetpp(n.valid()),
        };
        crate::DraemDetector::from_trained(self.settings.clone(), net)
    }

    /// Number of trainable parameters.
    pub fn num_params(&self) -> usize {
        match self.net.as_ref().expect("network present") {
            Trained::Draem(n) => n.num_params(),
            Trained::Unetpp(n) => n.num_params(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vigil_nn::tensor_to_vec;

    fn tensor(data: Vec<f32>, shape: [usize; 4], device: &Device) -> Tensor<4> {
        tensor_from_vec(data, shape, device)
    }

    #[test]
    fn ignored_pixels_do_not_enter_the_loss() {
        let device = Device::flex();
        let (n, s) = (1, 16);
        let values = |seed: usize, len: usize| -> Vec<f32> {
            (0..len).map(|i| ((i * 37 + seed * 11) % 97) as f32 / 96.0).collect()
        };
        let clean = values(1, 3 * s * s);
        let logits = values(3, 2 * s * s);
        let target: Vec<f32> = (0..s * s).map(|p| if p % 5 == 0 { 1.0 } else { 0.0 }).collect();
        // The right half is ignored.
        let keep: Vec<f32> = (0..s * s).map(|p| if p % s < s / 2 { 1.0 } else { 0.0 }).collect();
        let loss = |rec: Vec<f32>, logits: Vec<f32>, keep: Option<Vec<f32>>, w: f64| -> f32 {
            joint_loss(
                tensor(rec, [n, 3, s, s], &device),
                tensor(clean.clone(), [n, 3, s, s], &device),
                tensor(logits, [n, 2, s, s], &device),
                tensor(target.clone(), [n, 1, s, s], &device),
                keep.map(|k| tensor(k, [n, 1, s, s], &device)),
                w,
            )
            .into_scalar()
        };
        let rec = values(2, 3 * s * s);
        // Keeping every pixel gives the official plain means.
        let plain = loss(rec.clone(), logits.clone(), None, 2.0);
        let all_kept = loss(rec.clone(), logits.clone(), Some(vec![1.0; s * s]), 2.0);
        assert!((plain - all_kept).abs() < 1e-5, "{plain} vs {all_kept}");
        // Changing the reconstruction and the logits only where pixels are ignored leaves the L2
        // and focal terms unchanged (SSIM's 11x11 window still reaches across the boundary, so it
        // is weighted 0 here).
        let scramble = |v: &[f32], planes: usize| -> Vec<f32> {
            let mut v = v.to_vec();
            for c in 0..planes {
                for p in 0..s * s {
                    if keep[p] == 0.0 {
                        v[c * s * s + p] = 1.0 - v[c * s * s + p] * 0.5;
                    }
                }
            }
            v
        };
        let before = loss(rec.clone(), logits.clone(), Some(keep.clone()), 0.0);
        let after = loss(scramble(&rec, 3), scramble(&logits, 2), Some(keep.clone()), 0.0);
        assert!((before - after).abs() < 1e-6, "{before} vs {after}");
        // Without the mask the same change does move the loss.
        let moved = loss(scramble(&rec, 3), scramble(&logits, 2), None, 0.0);
        assert!((moved - loss(rec.clone(), logits.clone(), None, 0.0)).abs() > 1e-3);
        // The SSIM weight scales the structural term.
        let one = loss(rec.clone(), logits.clone(), None, 1.0);
        let zero = loss(rec, logits, None, 0.0);
        assert!((plain - zero - 2.0 * (one - zero)).abs() < 1e-5);
        let _ = tensor_to_vec::<4>;
    }
}
