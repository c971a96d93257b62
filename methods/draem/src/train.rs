//! DRAEM training: synthetic anomalies, joint loss, one Adam over both networks, resumable.

use std::path::PathBuf;

use burn::module::Module;
use burn::optim::{GradientsParams, ModuleOptimizer};
use burn::tensor::Device;
use rand::Rng;
use rayon::prelude::*;
use vigil_core::{FitContext, Image, ImageSource, Result, VigilError};
use vigil_nn::checkpoint::{optimizer_bytes, restore_optimizer};
use vigil_nn::{
    focal_loss, init_normal, l2_loss, load_module, module_to_bag, run_training, ssim_loss, stable_param_ids,
    tensor_from_vec, training_device, Checkpoint, LoopConfig, LrSchedule, OptimizerSettings, TrainTask,
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

struct DraemTask<'a, R: Reconstructor> {
    net: Option<DraemNet<R>>,
    optimizer: ModuleOptimizer,
    schedule: LrSchedule,
    images: &'a [Image],
    synth: &'a Synthesizer,
    settings: &'a DraemSettings,
    seed: u64,
    device: Device,
}

impl<R: Reconstructor> DraemTask<'_, R> {
    /// Batch `step`: inputs, clean targets and masks, a pure function of (seed, step).
    fn batch(&self, step: usize) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
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
        for (sample, pick) in samples {
            x.extend_from_slice(&sample.image.data);
            clean.extend_from_slice(&self.images[pick].data);
            mask.extend_from_slice(&sample.mask);
        }
        Ok((x, clean, mask))
    }
}

impl<R: Reconstructor> TrainTask for DraemTask<'_, R> {
    fn step(&mut self, step: usize) -> Result<f32> {
        let (b, s) = (self.settings.batch, self.settings.image_size);
        let (x, clean, mask) = self.batch(step)?;
        let x = tensor_from_vec(x, [b, 3, s, s], &self.device);
        let clean = tensor_from_vec(clean, [b, 3, s, s], &self.device);
        let mask = tensor_from_vec(mask, [b, 1, s, s], &self.device);
        let net = self.net.take().expect("network present between steps");
        let (rec, logits) = net.forward(x);
        let loss =
            l2_loss(rec.clone(), clean.clone()) + ssim_loss(rec, clean) + focal_loss(logits, mask, 2.0);
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

fn load_images(train: &dyn ImageSource, size: usize) -> Result<Vec<Image>> {
    if train.is_empty() {
        return Err(VigilError::invalid("DRAEM needs at least one training image"));
    }
    (0..train.len())
        .into_par_iter()
        .map(|i| {
            let img = train.load(i).map_err(|e| VigilError::file(train.name(i), e.to_string()))?;
            Ok(img.to_rgb().resize_bilinear(size, size))
        })
        .collect()
}

/// Train (or resume training) and return the inference network and the per-step losses.
pub(crate) fn fit(
    settings: &DraemSettings,
    train: &dyn ImageSource,
    ctx: &FitContext,
    session_limit: Option<usize>,
) -> Result<(Trained, Vec<f32>)> {
    settings.validate()?;
    let images = load_images(train, settings.image_size)?;
    let synth_config = SynthConfig { cutout_probability: settings.cutout_probability, ..Default::default() };
    let synth = Synthesizer::new(synth_config, settings.anomaly_source()?);
    let device = training_device();
    let run = Run { settings, ctx, session_limit, images: &images, synth: &synth, device: device.clone() };
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
    synth: &'a Synthesizer,
    device: Device,
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
        fn run<R: Reconstructor>(
            net: DraemNet<R>,
            opt: &mut ModuleOptimizer,
            lr: f64,
            x: burn::Tensor<4>,
            clean: burn::Tensor<4>,
            mask: burn::Tensor<4>,
        ) -> (DraemNet<R>, f32) {
            let (rec, logits) = net.forward(x);
            let loss =
                l2_loss(rec.clone(), clean.clone()) + ssim_loss(rec, clean) + focal_loss(logits, mask, 2.0);
            let value: f32 = loss.clone().into_scalar();
            let grads = GradientsParams::from_grads(loss.backward(), &net);
            (opt.step(lr, net, grads), value)
        }
        let (net, loss) = match self.net.take().expect("network present") {
            Trained::Draem(n) => {
                let (n, l) = run(n, &mut self.optimizer, lr, x, clean, mask);
                (Trained::Draem(n), l)
            }
            Trained::Unetpp(n) => {
                let (n, l) = run(n, &mut self.optimizer, lr, x, clean, mask);
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
