//! DDAD (Mousakhan, Brox and Tayyub, "Anomaly Detection with Conditioned Denoising Diffusion
//! Models", arXiv 2305.15956; code arimousa/DDAD): a diffusion U-Net learns the normal images;
//! a test image is noised to t = 250 and denoised in 10 DDIM steps, each pulled toward the test
//! image itself with weight w, so the reconstruction keeps the image's normal content and
//! drops its defects. The anomaly map compares input and reconstruction in pixels and in
//! pretrained features (`anomaly_map.py`).
//!
//! The diffusion parts (U-Net, schedule, training, conditioned reconstruction) are
//! `vigil-diffusion`. What differs from the reference is listed in `methods/ddad/README.md`;
//! most notably the feature extractor's domain adaptation is not implemented yet.

mod map;

use std::path::PathBuf;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use vigil_backbones::{Backbone, BackboneKind};
use vigil_core::{
    ChannelMode, Detector, FitContext, Image, ImageSource, Map, Mask, Result, ScoreOutput, TensorBag,
    VigilError,
};
use vigil_diffusion::{
    reconstruct, train_unet, NoiseSchedule, ReconstructionSettings, TrainRun, TrainSettings, TrainingImages,
    UNet, UNetSettings,
};
use vigil_nn::{default_device, tensor_from_vec, tensor_to_vec};

pub use map::{combine_distances, cosine_distance, patch_mean, upsample_align_corners};

/// The checkpoint file of the U-Net's training in the fit's checkpoint folder.
pub const CHECKPOINT_FILE: &str = "ddad-unet.ckpt";

/// Model-file prefix of the U-Net's tensors (the model file also holds the pipeline's).
const STATE_PREFIX: &str = "unet.";

/// Everything that defines a DDAD model. The default is the CPU preset.
///
/// Read and written as a [`DdadSpec`]: a preset plus the fields that differ from it, so
/// `ddad:preset=paper,w=4` is the paper preset with w = 4. Model files store every field
/// ([`DdadSpec::complete`]), so they do not depend on the presets' values.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(from = "DdadSpec", into = "DdadSpec")]
pub struct DdadSettings {
    /// The preset the other fields started from (they may have been overridden since).
    pub preset: Preset,
    /// U-Net preset (`vigil_diffusion::UNetSettings::preset`): `cpu`, `ddad` or `ddad-s`.
    pub network: String,
    /// Optimiser steps of the U-Net's training (the reference counts epochs).
    pub steps: usize,
    pub batch: usize,
    pub lr: f64,
    /// Adam's L2 weight decay.
    pub weight_decay: f32,
    /// Steps between training checkpoints (when a checkpoint folder is given).
    pub checkpoint_every: usize,
    /// Timestep the test image is noised to (`test_trajectoy_steps`).
    pub t_start: usize,
    /// Timesteps per DDIM step.
    pub skip: usize,
    /// DDIM stochasticity.
    pub eta: f64,
    /// Conditioning weight: how strongly each step is pulled toward the test image.
    pub w: f64,
    /// Weight of the pixel distance against the feature distance.
    pub v: f64,
    /// Feature extractor and the layers compared (the reference: WRN-101-2 layer2 and layer3).
    pub backbone: BackboneKind,
    pub layers: Vec<String>,
    /// Backbone weights file; `None`: the shared weights.
    pub weights: Option<PathBuf>,
    /// Seeded random backbone weights instead of pretrained ones (tests).
    pub random_weights_seed: Option<u64>,
    /// σ of the Gaussian smoothing of the map (kernel 2·round(4σ)+1, reflected border).
    pub sigma: f32,
    /// Seed of the reconstruction noise (the same for every image, so scores are deterministic).
    pub reconstruction_seed: u64,
}

impl Default for DdadSettings {
    /// 64 px U-Net (`cpu`), 600 steps of batch 8, MobileNetV2 features at strides 8 and 16 (the
    /// strides of the reference's layer2 and layer3).
    fn default() -> Self {
        DdadSettings {
            preset: Preset::Cpu,
            network: "cpu".into(),
            steps: 600,
            batch: 8,
            lr: 3e-4,
            weight_decay: 0.05,
            checkpoint_every: 100,
            t_start: 250,
            skip: 25,
            eta: 1.0,
            w: 2.0,
            v: 1.0,
            backbone: BackboneKind::MobileNetV2,
            layers: vec!["features.6".into(), "features.13".into()],
            weights: None,
            random_weights_seed: None,
            sigma: 4.0,
            reconstruction_seed: 0,
        }
    }
}

impl DdadSettings {
    /// The published configuration at 256 px: DDAD's U-Net, batch 32, Wide-ResNet-50-2 layer2
    /// and layer3 (the reference's default WRN-101-2 is not among vigil's backbones), and
    /// 20,000 steps (about 3000 epochs of an MVTec class of ~210 images in batches of 32).
    pub fn paper() -> Self {
        DdadSettings {
            preset: Preset::Paper,
            network: "ddad".into(),
            steps: 20_000,
            batch: 32,
            checkpoint_every: 1000,
            backbone: BackboneKind::WideResNet50,
            layers: vec!["layer2".into(), "layer3".into()],
            ..Self::default()
        }
    }

    fn unet(&self) -> Result<UNetSettings> {
        UNetSettings::preset(&self.network)
    }

    fn train(&self) -> TrainSettings {
        TrainSettings {
            steps: self.steps,
            batch: self.batch,
            lr: self.lr,
            weight_decay: self.weight_decay,
            checkpoint_every: self.checkpoint_every.max(1),
        }
    }

    fn reconstruction(&self) -> ReconstructionSettings {
        ReconstructionSettings { t_start: self.t_start, skip: self.skip, eta: self.eta, w: self.w }
    }

    pub fn validate(&self) -> Result<()> {
        self.unet()?.validate()?;
        self.train().validate()?;
        self.reconstruction().validate(&NoiseSchedule::ddad())?;
        if self.layers.is_empty() {
            return Err(VigilError::Config("DDAD: at least one feature layer is needed".into()));
        }
        let v_ok = self.v.is_finite() && self.v >= 0.0;
        let sigma_ok = self.sigma.is_finite() && self.sigma > 0.0;
        if !v_ok || !sigma_ok {
            return Err(VigilError::Config(format!(
                "DDAD: v {} must be >= 0 and sigma {} positive",
                self.v, self.sigma
            )));
        }
        Ok(())
    }
}

/// The named configuration a [`DdadSettings`] starts from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Preset {
    /// 64 px U-Net, MobileNetV2 features: one class trains on a 2-core CPU.
    #[default]
    Cpu,
    /// The published configuration (made for a GPU).
    Paper,
}

impl DdadSettings {
    pub fn of_preset(preset: Preset) -> Self {
        match preset {
            Preset::Cpu => Self::default(),
            Preset::Paper => Self::paper(),
        }
    }
}

/// [`DdadSettings`] as written by a user: a preset and any field to override. A missing or
/// `null` field takes the preset's value.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DdadSpec {
    #[serde(default)]
    pub preset: Preset,
    #[serde(default)]
    pub network: Option<String>,
    #[serde(default)]
    pub steps: Option<usize>,
    #[serde(default)]
    pub batch: Option<usize>,
    #[serde(default)]
    pub lr: Option<f64>,
    #[serde(default)]
    pub weight_decay: Option<f32>,
    #[serde(default)]
    pub checkpoint_every: Option<usize>,
    #[serde(default)]
    pub t_start: Option<usize>,
    #[serde(default)]
    pub skip: Option<usize>,
    #[serde(default)]
    pub eta: Option<f64>,
    #[serde(default)]
    pub w: Option<f64>,
    #[serde(default)]
    pub v: Option<f64>,
    #[serde(default)]
    pub backbone: Option<BackboneKind>,
    #[serde(default)]
    pub layers: Option<Vec<String>>,
    #[serde(default)]
    pub weights: Option<Option<PathBuf>>,
    #[serde(default)]
    pub random_weights_seed: Option<Option<u64>>,
    #[serde(default)]
    pub sigma: Option<f32>,
    #[serde(default)]
    pub reconstruction_seed: Option<u64>,
}

impl DdadSpec {
    /// Every field written out: what a model file stores.
    pub fn complete(s: &DdadSettings) -> Self {
        DdadSpec {
            preset: s.preset,
            network: Some(s.network.clone()),
            steps: Some(s.steps),
            batch: Some(s.batch),
            lr: Some(s.lr),
            weight_decay: Some(s.weight_decay),
            checkpoint_every: Some(s.checkpoint_every),
            t_start: Some(s.t_start),
            skip: Some(s.skip),
            eta: Some(s.eta),
            w: Some(s.w),
            v: Some(s.v),
            backbone: Some(s.backbone),
            layers: Some(s.layers.clone()),
            weights: Some(s.weights.clone()),
            random_weights_seed: Some(s.random_weights_seed),
            sigma: Some(s.sigma),
            reconstruction_seed: Some(s.reconstruction_seed),
        }
    }
}

impl From<DdadSettings> for DdadSpec {
    /// Only the fields that differ from the preset; the others `None`.
    fn from(s: DdadSettings) -> Self {
        fn differs<T: PartialEq>(value: T, preset: T) -> Option<T> {
            (value != preset).then_some(value)
        }
        let base = DdadSettings::of_preset(s.preset);
        DdadSpec {
            preset: s.preset,
            network: differs(s.network, base.network),
            steps: differs(s.steps, base.steps),
            batch: differs(s.batch, base.batch),
            lr: differs(s.lr, base.lr),
            weight_decay: differs(s.weight_decay, base.weight_decay),
            checkpoint_every: differs(s.checkpoint_every, base.checkpoint_every),
            t_start: differs(s.t_start, base.t_start),
            skip: differs(s.skip, base.skip),
            eta: differs(s.eta, base.eta),
            w: differs(s.w, base.w),
            v: differs(s.v, base.v),
            backbone: differs(s.backbone, base.backbone),
            layers: differs(s.layers, base.layers),
            weights: differs(s.weights, base.weights),
            random_weights_seed: differs(s.random_weights_seed, base.random_weights_seed),
            sigma: differs(s.sigma, base.sigma),
            reconstruction_seed: differs(s.reconstruction_seed, base.reconstruction_seed),
        }
    }
}

impl From<DdadSpec> for DdadSettings {
    fn from(spec: DdadSpec) -> Self {
        let base = DdadSettings::of_preset(spec.preset);
        DdadSettings {
            preset: spec.preset,
            network: spec.network.unwrap_or(base.network),
            steps: spec.steps.unwrap_or(base.steps),
            batch: spec.batch.unwrap_or(base.batch),
            lr: spec.lr.unwrap_or(base.lr),
            weight_decay: spec.weight_decay.unwrap_or(base.weight_decay),
            checkpoint_every: spec.checkpoint_every.unwrap_or(base.checkpoint_every),
            t_start: spec.t_start.unwrap_or(base.t_start),
            skip: spec.skip.unwrap_or(base.skip),
            eta: spec.eta.unwrap_or(base.eta),
            w: spec.w.unwrap_or(base.w),
            v: spec.v.unwrap_or(base.v),
            backbone: spec.backbone.unwrap_or(base.backbone),
            layers: spec.layers.unwrap_or(base.layers),
            weights: spec.weights.unwrap_or(base.weights),
            random_weights_seed: spec.random_weights_seed.unwrap_or(base.random_weights_seed),
            sigma: spec.sigma.unwrap_or(base.sigma),
            reconstruction_seed: spec.reconstruction_seed.unwrap_or(base.reconstruction_seed),
        }
    }
}

/// DDAD as a vigil [`Detector`].
pub struct DdadDetector {
    settings: DdadSettings,
    unet: UNetSettings,
    net: Option<UNet>,
    backbone: Backbone,
    schedule: NoiseSchedule,
    /// Stop training after this many steps in total (checkpointing first), to be resumed later.
    session_limit: Option<usize>,
    losses: Vec<f32>,
}

impl DdadDetector {
    pub fn new(settings: DdadSettings) -> Result<Self> {
        settings.validate()?;
        let backbone =
            Backbone::open(settings.backbone, settings.weights.as_deref(), settings.random_weights_seed)?;
        for layer in &settings.layers {
            backbone.layer_info(layer)?;
        }
        Ok(DdadDetector {
            unet: settings.unet()?,
            settings,
            net: None,
            backbone,
            schedule: NoiseSchedule::ddad(),
            session_limit: None,
            losses: Vec::new(),
        })
    }

    /// Rebuild a trained detector from its saved settings and state.
    pub fn load(settings: &serde_json::Value, state: &TensorBag) -> Result<Self> {
        let settings: DdadSettings = serde_json::from_value(settings.clone())
            .map_err(|e| VigilError::Model(format!("DDAD settings in the model file: {e}")))?;
        let mut detector = Self::new(settings)?;
        let mut unet_state = TensorBag::new();
        for name in state.names().filter(|n| n.starts_with(STATE_PREFIX)) {
            let shape = state.shape(name)?.to_vec();
            unet_state.put_f32(&name[STATE_PREFIX.len()..], &shape, state.f32(name, None)?);
        }
        let net = UNet::new(&detector.unet, &default_device())?.load_state_dict(&unet_state)?;
        detector.net = Some(net);
        Ok(detector)
    }

    pub fn settings_struct(&self) -> &DdadSettings {
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

    /// The reconstruction (values in [0, 1] nominally) and the anomaly map, both at the network's
    /// size.
    pub fn infer(&self, image: &Image) -> Result<(Image, Map)> {
        let net = self.net.as_ref().ok_or_else(|| VigilError::Model("DDAD model is not trained".into()))?;
        let s = self.unet.image_size;
        let input = image.to_rgb().resize_bilinear(s, s);
        let device = default_device();
        let x = tensor_from_vec(input.data.iter().map(|v| 2.0 * v - 1.0).collect(), [1, 3, s, s], &device);
        let mut rng = ChaCha8Rng::seed_from_u64(self.settings.reconstruction_seed);
        let settings = self.settings.reconstruction();
        let reconstructed =
            reconstruct(net, &self.schedule, x.clone(), &x, &settings, &mut rng, &mut |_, _| {})?;
        let reconstructed: Vec<f32> = tensor_to_vec(reconstructed);
        let plane = s * s;
        // Pixel distance: mean over channels of |x̂0 − x| in the network's [−1, 1] range.
        let x_values = tensor_to_vec(x);
        let pixel: Vec<f32> = (0..plane)
            .map(|p| {
                (0..3).map(|c| (reconstructed[c * plane + p] - x_values[c * plane + p]).abs()).sum::<f32>()
                    / 3.0
            })
            .collect();
        // Features of both, from [0, 1] images ((t + 1) / 2, then the backbone's normalisation).
        let reconstruction = Image::new(s, s, 3, reconstructed.iter().map(|v| (v + 1.0) / 2.0).collect())?;
        let features =
            self.backbone.extract(&[input, reconstruction.clone()], &self.settings.layers, (s, s))?;
        let mut feature = vec![0.0f32; plane];
        for (input_map, output_map) in features[0].iter().zip(&features[1]) {
            let distance =
                cosine_distance(&patch_mean(input_map), &patch_mean(output_map), input_map.channels);
            let up = upsample_align_corners(&distance, input_map.height, input_map.width, s);
            feature.iter_mut().zip(up).for_each(|(f, d)| *f += d);
        }
        let combined = combine_distances(&feature, &pixel, self.settings.v as f32);
        let map = Map::new(s, s, combined)?
            .gaussian_blur_with(self.settings.sigma, vigil_core::BlurBorder::WholeSample);
        map.check_finite("DDAD anomaly map")?;
        Ok((reconstruction, map))
    }
}

impl std::fmt::Debug for DdadDetector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DdadDetector")
            .field("settings", &self.settings)
            .field("trained", &self.net.is_some())
            .finish()
    }
}

impl Detector for DdadDetector {
    fn method(&self) -> &'static str {
        "ddad"
    }

    fn channel_mode(&self) -> ChannelMode {
        ChannelMode::Rgb
    }

    fn fit(&mut self, train: &dyn ImageSource, ctx: &FitContext) -> Result<()> {
        if train.is_empty() {
            return Err(VigilError::invalid("DDAD needs at least one training image"));
        }
        let s = self.unet.image_size;
        let images: Vec<Vec<f32>> = (0..train.len())
            .into_par_iter()
            .map(|i| {
                let image = train.load(i).map_err(|e| VigilError::file(train.name(i), e.to_string()))?;
                // DDAD maps [0, 1] to [−1, 1].
                Ok(image.to_rgb().resize_bilinear(s, s).data.iter().map(|v| 2.0 * v - 1.0).collect())
            })
            .collect::<Result<_>>()?;
        let data = ctx.checkpoint_dir.as_ref().map(|_| train.fingerprint()).transpose()?;
        let run = TrainRun {
            seed: ctx.seed,
            checkpoint_path: ctx.checkpoint_dir.as_ref().map(|d| d.join(CHECKPOINT_FILE)),
            session_limit: self.session_limit,
            show_progress: ctx.show_progress,
            label: "ddad".into(),
            data,
        };
        let trained =
            train_unet(&self.unet, &self.settings.train(), &TrainingImages::new(images, 3, s)?, &run)?;
        self.losses = trained.losses;
        self.net = Some(trained.net);
        Ok(())
    }

    fn score(&self, image: &Image, ignore: Option<&Mask>) -> Result<ScoreOutput> {
        let (_, map) = self.infer(image)?;
        // The map still covers ignored pixels (the pipeline clears them); the image score, the
        // map's maximum as in the reference, is taken over the kept pixels only.
        let map = map.resize_bilinear(image.width, image.height);
        let image_score = match ignore {
            None => map.max(),
            Some(mask) => {
                if (mask.width, mask.height) != (image.width, image.height) {
                    return Err(VigilError::invalid(format!(
                        "ignore mask is {}x{} but the image is {}x{}",
                        mask.width, mask.height, image.width, image.height
                    )));
                }
                let kept = map.data.iter().zip(&mask.data).filter(|(_, &ignored)| !ignored).map(|(v, _)| *v);
                kept.fold(None, |m: Option<f32>, v| Some(m.map_or(v, |m| m.max(v)))).ok_or_else(|| {
                    VigilError::invalid("the ignore mask covers every pixel; nothing is left to score")
                })?
            }
        };
        Ok(ScoreOutput { map, image_score: Some(image_score), log10_nfa: None })
    }

    fn settings(&self) -> serde_json::Value {
        serde_json::to_value(DdadSpec::complete(&self.settings)).expect("settings serialise")
    }

    fn state(&self) -> Result<TensorBag> {
        let net = self.net.as_ref().ok_or_else(|| VigilError::Model("DDAD model is not trained".into()))?;
        let unet_state = net.state_dict();
        let mut state = TensorBag::new();
        for name in unet_state.names() {
            let shape = unet_state.shape(name)?.to_vec();
            state.put_f32(&format!("{STATE_PREFIX}{name}"), &shape, unet_state.f32(name, None)?);
        }
        Ok(state)
    }

    fn weights_files(&self) -> Vec<vigil_core::WeightsFile> {
        self.backbone.weights_file().cloned().into_iter().collect()
    }
}
