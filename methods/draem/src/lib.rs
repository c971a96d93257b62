//! DRAEM (Zavrtanik et al., ICCV 2021) and DRAEM-UNet++ (seed 000: a Nested U-Net as the
//! reconstructive sub-network): a reconstructive network learns to remove synthetic anomalies,
//! a discriminative U-Net on (reconstruction, input) segments them.
//!
//! Follows the official code (VitjanZ/DRAEM) in architecture (layer for layer, see [`nets`]),
//! loss, optimiser, schedule and scoring. Its training samples, as `data_loader.py` makes them:
//! every sample draws a random training image (with replacement: `__getitem__` ignores its
//! index) and a random DTD photo; with probability 0.3 the clean image is rotated by up to 90
//! degrees; with probability 0.5 the sample stays normal; otherwise the photo, after 3 of 10
//! imgaug operations, is blended into a thresholded, rotated Perlin mask with opacity
//! 1 - beta, beta uniform in [0, 0.8), i.e. opacity in (0.2, 1]. Here the samples come from
//! `vigil-synth` (the same Perlin masks, augmentation pool and 50 % normal samples), with these
//! deliberate differences:
//! - the opacity range is a setting (`opacity`): [0.2, 1] in the paper preset as the official
//!   code, [0.1, 1] in the CPU preset;
//! - the anomaly source defaults to procedural textures (a DTD folder can be given);
//! - the clean image is not rotated with probability 0.3 before corruption;
//! - the image draw is a pure function of seed and step (which makes resuming exact), not of a
//!   global torch RNG;
//! - convolution biases start at zero (kernels N(0, 0.02) and BatchNorm scales N(1, 0.02) as the
//!   official `weights_init`; PyTorch's default bias init is uniform);
//! - with an ignore mask ("before" mode) the losses and the image score leave ignored pixels out
//!   (see `methods/draem/README.md` for what cannot be left out).

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

/// The named configuration a [`DraemSettings`] starts from; every field can be overridden.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Preset {
    /// The published configuration of the variant (made for a GPU).
    Paper,
    /// Small widths, 64 px, 400 steps: one category trains in minutes on a 2-core CPU.
    #[default]
    Cpu,
}

impl std::str::FromStr for Preset {
    type Err = VigilError;

    fn from_str(name: &str) -> Result<Self> {
        match name {
            "cpu" => Ok(Preset::Cpu),
            "paper" => Ok(Preset::Paper),
            other => {
                Err(VigilError::Config(format!("unknown DRAEM preset '{other}' (expected cpu or paper)")))
            }
        }
    }
}

/// Everything that defines a DRAEM model and its training.
///
/// Read and written as a [`DraemSpec`]: a preset plus the fields that differ from it (`null`
/// elsewhere), so the command line's defaults are "the CPU preset" and
/// `draem:preset=paper,steps=400` means "the paper preset with 400 steps". Model files store
/// every field ([`DraemSpec::complete`]), so they do not depend on the presets' values.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(from = "DraemSpec", into = "DraemSpec")]
pub struct DraemSettings {
    pub variant: Variant,
    /// The preset the other fields started from (they may have been overridden since).
    pub preset: Preset,
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
    /// Weight of the (1 - SSIM) term in the reconstruction loss (official DRAEM 1; the UNet++
    /// paper's lambda = 2).
    pub ssim_weight: f64,
    /// Opacity of the anomaly source in a synthetic anomaly, drawn uniformly from
    /// `[opacity[0], opacity[1]]` (official DRAEM and the UNet++ paper: [0.2, 1]).
    pub opacity: [f64; 2],
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

/// [`DraemSettings`] as written by a user: a variant and a preset, and any field to override.
/// A missing or `null` field takes the preset's value.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DraemSpec {
    pub variant: Variant,
    #[serde(default)]
    pub preset: Preset,
    #[serde(default)]
    pub image_size: Option<usize>,
    #[serde(default)]
    pub recon_width: Option<usize>,
    #[serde(default)]
    pub recon_depth: Option<usize>,
    #[serde(default)]
    pub nested_width: Option<usize>,
    #[serde(default)]
    pub nested_depth: Option<usize>,
    #[serde(default)]
    pub disc_width: Option<usize>,
    #[serde(default)]
    pub disc_depth: Option<usize>,
    #[serde(default)]
    pub steps: Option<usize>,
    #[serde(default)]
    pub batch: Option<usize>,
    #[serde(default)]
    pub lr: Option<f64>,
    #[serde(default)]
    pub lr_gamma: Option<f64>,
    #[serde(default)]
    pub ssim_weight: Option<f64>,
    #[serde(default)]
    pub opacity: Option<[f64; 2]>,
    #[serde(default)]
    pub anomaly_source: Option<String>,
    #[serde(default)]
    pub cutout_probability: Option<f64>,
    #[serde(default)]
    pub score_filter: Option<usize>,
    #[serde(default)]
    pub checkpoint_every: Option<usize>,
}

impl DraemSpec {
    /// Every field written out: what a model file stores.
    pub fn complete(s: &DraemSettings) -> Self {
        DraemSpec {
            variant: s.variant,
            preset: s.preset,
            image_size: Some(s.image_size),
            recon_width: Some(s.recon_width),
            recon_depth: Some(s.recon_depth),
            nested_width: Some(s.nested_width),
            nested_depth: Some(s.nested_depth),
            disc_width: Some(s.disc_width),
            disc_depth: Some(s.disc_depth),
            steps: Some(s.steps),
            batch: Some(s.batch),
            lr: Some(s.lr),
            lr_gamma: Some(s.lr_gamma),
            ssim_weight: Some(s.ssim_weight),
            opacity: Some(s.opacity),
            anomaly_source: Some(s.anomaly_source.clone()),
            cutout_probability: Some(s.cutout_probability),
            score_filter: Some(s.score_filter),
            checkpoint_every: Some(s.checkpoint_every),
        }
    }
}

impl From<DraemSettings> for DraemSpec {
    /// Only the fields that differ from the preset; the others `None`.
    fn from(s: DraemSettings) -> Self {
        fn differs<T: PartialEq>(value: T, preset: T) -> Option<T> {
            (value != preset).then_some(value)
        }
        let base = DraemSettings::of_preset(s.preset, s.variant);
        DraemSpec {
            variant: s.variant,
            preset: s.preset,
            image_size: differs(s.image_size, base.image_size),
            recon_width: differs(s.recon_width, base.recon_width),
            recon_depth: differs(s.recon_depth, base.recon_depth),
            nested_width: differs(s.nested_width, base.nested_width),
            nested_depth: differs(s.nested_depth, base.nested_depth),
            disc_width: differs(s.disc_width, base.disc_width),
            disc_depth: differs(s.disc_depth, base.disc_depth),
            steps: differs(s.steps, base.steps),
            batch: differs(s.batch, base.batch),
            lr: differs(s.lr, base.lr),
            lr_gamma: differs(s.lr_gamma, base.lr_gamma),
            ssim_weight: differs(s.ssim_weight, base.ssim_weight),
            opacity: differs(s.opacity, base.opacity),
            anomaly_source: differs(s.anomaly_source, base.anomaly_source),
            cutout_probability: differs(s.cutout_probability, base.cutout_probability),
            score_filter: differs(s.score_filter, base.score_filter),
            checkpoint_every: differs(s.checkpoint_every, base.checkpoint_every),
        }
    }
}

impl From<DraemSpec> for DraemSettings {
    fn from(spec: DraemSpec) -> Self {
        let base = DraemSettings::of_preset(spec.preset, spec.variant);
        DraemSettings {
            variant: spec.variant,
            preset: spec.preset,
            image_size: spec.image_size.unwrap_or(base.image_size),
            recon_width: spec.recon_width.unwrap_or(base.recon_width),
            recon_depth: spec.recon_depth.unwrap_or(base.recon_depth),
            nested_width: spec.nested_width.unwrap_or(base.nested_width),
            nested_depth: spec.nested_depth.unwrap_or(base.nested_depth),
            disc_width: spec.disc_width.unwrap_or(base.disc_width),
            disc_depth: spec.disc_depth.unwrap_or(base.disc_depth),
            steps: spec.steps.unwrap_or(base.steps),
            batch: spec.batch.unwrap_or(base.batch),
            lr: spec.lr.unwrap_or(base.lr),
            lr_gamma: spec.lr_gamma.unwrap_or(base.lr_gamma),
            ssim_weight: spec.ssim_weight.unwrap_or(base.ssim_weight),
            opacity: spec.opacity.unwrap_or(base.opacity),
            anomaly_source: spec.anomaly_source.unwrap_or(base.anomaly_source),
            cutout_probability: spec.cutout_probability.unwrap_or(base.cutout_probability),
            score_filter: spec.score_filter.unwrap_or(base.score_filter),
            checkpoint_every: spec.checkpoint_every.unwrap_or(base.checkpoint_every),
        }
    }
}

impl DraemSettings {
    /// The published configuration. DRAEM: the official code's widths and depths, 256 px,
    /// batch 8, Adam 1e-4 with x0.2 at 80 % and 90 %, opacity [0.2, 1], loss weights 1, score
    /// filter 21; 20,000 steps stand for the official 700 epochs (700 x ceil(N/8) batches is
    /// 5,600-34,300 steps over the MVTec classes, N = 60-391 training images). UNet++: the same
    /// with the seed paper's 512 px input, lambda = 2 on the SSIM term and opacity [0.2, 1].
    /// Both use procedural textures as the anomaly source (the official code uses DTD photos;
    /// set `anomaly_source` to a DTD folder for that). Made for a GPU: on a 2-core CPU one step
    /// takes a minute or more.
    pub fn paper(variant: Variant) -> Self {
        let unetpp = variant == Variant::Unetpp;
        DraemSettings {
            variant,
            preset: Preset::Paper,
            image_size: if unetpp { 512 } else { 256 },
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
            ssim_weight: if unetpp { 2.0 } else { 1.0 },
            opacity: [0.2, 1.0],
            anomaly_source: "procedural".into(),
            cutout_probability: 0.0,
            score_filter: 21,
            checkpoint_every: 500,
        }
    }

    /// A configuration that trains one small category on a 2-core CPU in minutes: 64 px,
    /// widths 1/16 of the paper's (UNet++ 1/8) and one pooling less in each network. The
    /// learning rate is raised to make up for the far fewer steps; opacity [0.1, 1] and SSIM
    /// weight 1 for both variants (the settings of the measured PIPED tables).
    pub fn cpu(variant: Variant) -> Self {
        DraemSettings {
            variant,
            preset: Preset::Cpu,
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
            ssim_weight: 1.0,
            opacity: [0.1, 1.0],
            anomaly_source: "procedural".into(),
            cutout_probability: 0.0,
            score_filter: 5,
            checkpoint_every: 100,
        }
    }

    /// The preset called `name` ("cpu" or "paper").
    pub fn preset(name: &str, variant: Variant) -> Result<Self> {
        Ok(Self::of_preset(name.parse()?, variant))
    }

    pub fn of_preset(preset: Preset, variant: Variant) -> Self {
        match preset {
            Preset::Paper => Self::paper(variant),
            Preset::Cpu => Self::cpu(variant),
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
        if !(self.ssim_weight.is_finite() && self.ssim_weight >= 0.0) {
            return bad(format!("ssim_weight {} must be a finite number >= 0", self.ssim_weight));
        }
        let [lo, hi] = self.opacity;
        if !(0.0 <= lo && lo <= hi && hi <= 1.0) {
            return bad(format!("opacity [{lo}, {hi}] must satisfy 0 <= low <= high <= 1"));
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

/// The image score with ignored pixels left out: the max, over the kept pixels, of the mean of
/// the map over the kept pixels of the `filter` x `filter` window around each. Where the whole
/// window is kept this is the official `avg_pool2d(map, filter)`; next to ignored pixels and at
/// the image border it averages the kept pixels only.
fn kept_filtered_max(map: &Map, ignore: &Mask, filter: usize) -> Result<f32> {
    let keep = train::keep_weights(ignore, map.width);
    if keep.iter().all(|&k| k == 0.0) {
        return Err(VigilError::invalid(format!(
            "the ignore mask covers every pixel of the {0}x{0} network input; nothing is left to score",
            map.width
        )));
    }
    let kept_map: Vec<f32> = map.data.iter().zip(&keep).map(|(v, k)| v * k).collect();
    let sums = Map::new(map.width, map.height, kept_map)?.mean_filter(filter);
    let counts = Map::new(map.width, map.height, keep.clone())?.mean_filter(filter);
    Ok(sums
        .data
        .iter()
        .zip(&counts.data)
        .zip(&keep)
        .filter(|(_, &k)| k > 0.0)
        .map(|((sum, count), _)| sum / count)
        .fold(f32::NEG_INFINITY, f32::max))
}

/// Both networks from their own names in `state` (every one of them must fit); a model file also
/// holds the pipeline's tensors (ignore mask, registration reference), which are not DRAEM's.
fn load_networks<R: Reconstructor>(net: DraemNet<R>, state: &TensorBag) -> Result<DraemNet<R>> {
    Ok(DraemNet {
        reconstructive: load_module(net.reconstructive, state, "reconstructive.")?,
        discriminative: load_module(net.discriminative, state, "discriminative.")?,
    })
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
            Variant::Draem => Trained::Draem(load_networks(new_autoencoder(&self.settings, &device), state)?),
            Variant::Unetpp => Trained::Unetpp(load_networks(new_nested(&self.settings, &device), state)?),
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

    fn score(&self, image: &Image, ignore: Option<&Mask>) -> Result<ScoreOutput> {
        let (_, map) = self.infer(image)?;
        let image_score = match ignore {
            None => map.mean_filter(self.settings.score_filter).max(),
            Some(mask) => {
                if (mask.width, mask.height) != (image.width, image.height) {
                    return Err(VigilError::invalid(format!(
                        "ignore mask is {}x{} but the image is {}x{}",
                        mask.width, mask.height, image.width, image.height
                    )));
                }
                kept_filtered_max(&map, mask, self.settings.score_filter)?
            }
        };
        // The map still covers the ignored pixels; the pipeline clears them.
        let map = map.resize_bilinear(image.width, image.height);
        Ok(ScoreOutput { map, image_score: Some(image_score), log10_nfa: None })
    }

    fn settings(&self) -> serde_json::Value {
        serde_json::to_value(DraemSpec::complete(&self.settings)).expect("settings serialise")
    }

    fn state(&self) -> Result<TensorBag> {
        match &self.net {
            Some(Trained::Draem(n)) => Ok(module_to_bag(n)),
            Some(Trained::Unetpp(n)) => Ok(module_to_bag(n)),
            None => Err(VigilError::Model("DRAEM model is not trained".into())),
        }
    }
}
