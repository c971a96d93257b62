//! DRAEM (Zavrtanik et al., ICCV 2021) and DRAEM-UNet++ (seed 000: a Nested U-Net as the
//! reconstructive sub-network): a reconstructive network learns to remove synthetic anomalies,
//! a discriminative U-Net on (reconstruction, input) segments them.
//!
//! Follows the official code (VitjanZ/DRAEM) in architecture, loss, optimiser, schedule and
//! scoring, with these deliberate differences:
//! - the blend weight of the anomaly source is drawn from [0.1, 1] (the project's spec); the
//!   official code draws it from [0.2, 1];
//! - the clean image is not rotated with probability 0.3 before corruption;
//! - training images are drawn with replacement per sample (a pure function of seed and step,
//!   which makes resuming exact) rather than in shuffled epochs;
//! - convolution biases start at zero (kernels N(0, 0.02) and BatchNorm scales N(1, 0.02) as the
//!   official `weights_init`).

pub mod nets;
mod train;

use std::path::PathBuf;

use burn::tensor::activation::softmax;
use serde::{Deserialize, Serialize};
use vigil_core::VigilError;
use vigil_core::{
    ChannelMode, Detector, FitContext, Image, ImageSource, Map, Mask, Result, ScoreOutput, TensorBag,
};
use vigil_nn::{default_device, load_module, module_to_bag, tensor_from_vec, tensor_to_vec};

use nets::{Autoencoder, DraemNet, NestedUNet, Reconstructor, UNet};
pub use train::{BenchStep, CHECKPOINT_FILE};

/// Which reconstructive sub-network.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Variant {
    /// The official plain auto-encoder (no skips).
    Draem,
    /// Nested U-Net (UNet++) with VGG blocks and LeakyReLU 0.2.
    Unetpp,
}

/// Everything that defines a DRAEM model and its training.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DraemSettings {
    pub variant: Variant,
    /// Images are resized to this square size for the networks.
    pub image_size: usize,
    /// Plain auto-encoder: base width (official 128) and number of poolings (official 4).
    pub recon_width: usize,
    pub recon_depth: usize,
    /// UNet++: width of level 0 (paper 32, doubling per level) and number of poolings (paper 4).
    pub nested_width: usize,
    pub nested_depth: usize,
    /// Discriminative U-Net: base width (official 64) and number of poolings (official 5).
    pub disc_width: usize,
    pub disc_depth: usize,
    /// Optimiser steps (batches) of training.
    pub steps: usize,
    pub batch: usize,
    /// Adam learning rate; multiplied by `lr_gamma` at 80 % and 90 % of `steps`.
    pub lr: f64,
    pub lr_gamma: f64,
    /// "procedural", "self" (the training image itself) or a folder of texture photos.
    pub anomaly_source: String,
    /// Share of the synthetic anomalies made as bright rectangular cutouts.
    pub cutout_probability: f64,
    /// Image score = max of the anomaly map mean-filtered over this window (odd; DRAEM: 21 at
    /// 256 px).
    pub score_filter: usize,
    /// Write a resumable checkpoint every this many steps (when a checkpoint folder is given).
    pub checkpoint_every: usize,
}

impl DraemSettings {
    /// The paper's configuration (official widths, 256 px, batch 8). Made for a GPU: on a
    /// 2-core CPU one step takes seconds.
    pub fn paper(variant: Variant) -> Self {
        DraemSettings {
            variant,
            image_size: 256,
            recon_width: 128,
            recon_depth: 4,
            nested_width: 32,
            nested_depth: 4,
            disc_width: 64,
            disc_depth: 5,
            steps: 20_000,
            batch: 8,
            lr: 1e-4,
            lr_gamma: 0.2,
            anomaly_source: "procedural".into(),
            cutout_probability: 0.0,
            score_filter: 21,
            checkpoint_every: 500,
        }
    }

    /// A configuration that trains one small category on a 2-core CPU in minutes: 64 px,
    /// widths 1/16 of the paper's (UNet++ 1/8) and one pooling less in each network. The
    /// learning rate is raised to make up for the far fewer steps.
    pub fn cpu(variant: Variant) -> Self {
        DraemSettings {
            variant,
            image_size: 64,
            recon_width: 8,
            recon_depth: 3,
            nested_width: 4,
            nested_depth: 3,
            disc_width: 8,
            disc_depth: 4,
            steps: 400,
            batch: 8,
            lr: 1e-3,
            lr_gamma: 0.2,
            anomaly_source: "procedural".into(),
            cutout_probability: 0.0,
            score_filter: 5,
            checkpoint_every: 100,
        }
    }

    pub fn preset(name: &str, variant: Variant) -> Result<Self> {
        match name {
            "cpu" => Ok(Self::cpu(variant)),
            "paper" => Ok(Self::paper(variant)),
            other => {
                Err(VigilError::Config(format!("unknown DRAEM preset '{other}' (expected cpu or paper)")))
            }
        }
    }

    pub fn method_name(&self) -> &'static str {
        match self.variant {
            Variant::Draem => "draem",
            Variant::Unetpp => "draem-unetpp",
        }
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(VigilError::Config(format!("DRAEM settings: {m}")));
        let depth = self.disc_depth.max(match self.variant {
            Variant::Draem => self.recon_depth,
            Variant::Unetpp => self.nested_depth,
        });
        if self.image_size == 0 || !self.image_size.is_multiple_of(1 << depth) {
            return bad(format!("image_size {} must be a positive multiple of 2^{depth}", self.image_size));
        }
        if self.recon_width == 0 || self.nested_width == 0 || self.disc_width == 0 {
            return bad("widths must be at least 1".into());
        }
        if self.recon_depth == 0 || self.nested_depth == 0 || self.disc_depth == 0 {
            return bad("depths must be at least 1".into());
        }
        if self.steps == 0 || self.batch == 0 {
            return bad("steps and batch must be at least 1".into());
        }
        if !(self.lr.is_finite() && self.lr > 0.0 && self.lr_gamma.is_finite() && self.lr_gamma > 0.0) {
            return bad(format!("lr {} and lr_gamma {} must be positive", self.lr, self.lr_gamma));
        }
        if !(0.0..=1.0).contains(&self.cutout_probability) {
            return bad(format!("cutout_probability {} is not in [0, 1]", self.cutout_probability));
        }
        if self.score_filter.is_multiple_of(2) {
            return bad(format!("score_filter {} must be odd", self.score_filter));
        }
        if self.checkpoint_every == 0 {
            return bad("checkpoint_every must be at least 1".into());
        }
        Ok(())
    }

    pub(crate) fn anomaly_source(&self) -> Result<vigil_synth::AnomalySource> {
        match self.anomaly_source.as_str() {
            "procedural" => Ok(vigil_synth::AnomalySource::Procedural),
            "self" => Ok(vigil_synth::AnomalySource::SelfImage),
            folder => vigil_synth::AnomalySource::from_folder(&PathBuf::from(folder)),
        }
    }
}

/// A network of either variant, ready for inference (no autodiff).
#[derive(Debug)]
pub(crate) enum Trained {
    Draem(DraemNet<Autoencoder>),
    Unetpp(DraemNet<NestedUNet>),
}

pub(crate) fn build_net<R: Reconstructor>(
    recon: R,
    s: &DraemSettings,
    device: &burn::tensor::Device,
) -> DraemNet<R> {
    DraemNet { reconstructive: recon, discriminative: UNet::new(6, 2, s.disc_width, s.disc_depth, device) }
}

pub(crate) fn new_autoencoder(s: &DraemSettings, device: &burn::tensor::Device) -> DraemNet<Autoencoder> {
    build_net(Autoencoder::new(3, s.recon_width, s.recon_depth, device), s, device)
}

pub(crate) fn new_nested(s: &DraemSettings, device: &burn::tensor::Device) -> DraemNet<NestedUNet> {
    build_net(NestedUNet::new(3, s.nested_width, s.nested_depth, device), s, device)
}

/// DRAEM as a vigil [`Detector`].
#[derive(Debug)]
pub struct DraemDetector {
    settings: DraemSettings,
    net: Option<Trained>,
    /// Stop training after this many steps in total (checkpointing first), to be resumed later.
    session_limit: Option<usize>,
    /// Per-step training losses of the last `fit` (across resumptions).
    losses: Vec<f32>,
}

impl DraemDetector {
    pub fn new(settings: DraemSettings) -> Result<Self> {
        settings.validate()?;
        Ok(DraemDetector { settings, net: None, session_limit: None, losses: Vec::new() })
    }

    pub(crate) fn from_trained(settings: DraemSettings, net: Trained) -> Self {
        DraemDetector { settings, net: Some(net), session_limit: None, losses: Vec::new() }
    }

    /// Rebuild a trained detector from its saved settings and state.
    pub fn load(settings: &serde_json::Value, state: &TensorBag) -> Result<Self> {
        let settings: DraemSettings = serde_json::from_value(settings.clone())
            .map_err(|e| VigilError::Model(format!("DRAEM settings in the model file: {e}")))?;
        let mut det = Self::new(settings)?;
        det.net = Some(det.load_net(state)?);
        Ok(det)
    }

    fn load_net(&self, state: &TensorBag) -> Result<Trained> {
        let device = default_device();
        Ok(match self.settings.variant {
            Variant::Draem => {
                Trained::Draem(load_module(new_autoencoder(&self.settings, &device), state, "")?)
            }
            Variant::Unetpp => Trained::Unetpp(load_module(new_nested(&self.settings, &device), state, "")?),
        })
    }

    pub fn settings_struct(&self) -> &DraemSettings {
        &self.settings
    }

    /// Train at most up to `steps` total steps in the next `fit`, writing a checkpoint there
    /// (requires a checkpoint folder); a later `fit` with the same folder finishes the run.
    pub fn set_session_limit(&mut self, steps: Option<usize>) {
        self.session_limit = steps;
    }

    /// Per-step training losses of the last `fit`, including steps before a resumption.
    pub fn losses(&self) -> &[f32] {
        &self.losses
    }

    pub fn is_trained(&self) -> bool {
        self.net.is_some()
    }

    /// Reconstruction and anomaly probability map (image_size x image_size) of one image.
    pub fn infer(&self, image: &Image) -> Result<(Image, Map)> {
        let net = self.net.as_ref().ok_or_else(|| VigilError::Model("DRAEM model is not trained".into()))?;
        let s = self.settings.image_size;
        let rgb = image.to_rgb().resize_bilinear(s, s);
        let x = tensor_from_vec(rgb.data, [1, 3, s, s], &default_device());
        let (rec, logits) = match net {
            Trained::Draem(n) => n.forward(x),
            Trained::Unetpp(n) => n.forward(x),
        };
        let prob = softmax(logits, 1).narrow(1, 1, 1);
        let rec = Image::new(s, s, 3, tensor_to_vec(rec))?;
        let map = Map::new(s, s, tensor_to_vec(prob))?;
        map.check_finite("DRAEM anomaly map")?;
        Ok((rec, map))
    }
}

impl Detector for DraemDetector {
    fn method(&self) -> &'static str {
        self.settings.method_name()
    }

    fn channel_mode(&self) -> ChannelMode {
        ChannelMode::Rgb
    }

    fn fit(&mut self, train: &dyn ImageSource, ctx: &FitContext) -> Result<()> {
        let (net, losses) = train::fit(&self.settings, train, ctx, self.session_limit)?;
        self.losses = losses;
        self.net = Some(net);
        Ok(())
    }

    fn score(&self, image: &Image, _ignore: Option<&Mask>) -> Result<ScoreOutput> {
        // DRAEM has no statistics to protect from ignored pixels; the map covers them all.
        let (_, map) = self.infer(image)?;
        let image_score = map.mean_filter(self.settings.score_filter).max();
        let map = map.resize_bilinear(image.width, image.height);
        Ok(ScoreOutput { map, image_score: Some(image_score), log10_nfa: None })
    }

    fn settings(&self) -> serde_json::Value {
        serde_json::to_value(&self.settings).expect("settings serialise")
    }

    fn state(&self) -> Result<TensorBag> {
        match &self.net {
            Some(Trained::Draem(n)) => Ok(module_to_bag(n)),
            Some(Trained::Unetpp(n)) => Ok(module_to_bag(n)),
            None => Err(VigilError::Model("DRAEM model is not trained".into())),
        }
    }
}
