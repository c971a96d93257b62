//! Pretrained feature extractors on burn, loaded from checkpoints with PyTorch names.
//!
//! Six ImageNet backbones, each split into stages named after the PyTorch module whose output
//! they are, so PatchCore, PaDiM or U-Flow can tap intermediate features:
//!
//! | [`BackboneKind`] | parses from | tappable layers (channels, stride) |
//! |---|---|---|
//! | `MobileNetV2` (torchvision) | `mobilenet_v2` | `features.0` .. `features.18`; usual taps `features.3` (24, 4), `features.6` (32, 8), `features.13` (96, 16) |
//! | `EfficientNetLite0` (lukemelas/ml-illustrated names) | `efficientnet_lite0` | `_conv_stem`, `_blocks.0` .. `_blocks.15`, `_conv_head`; e.g. `_blocks.2` (24, 4), `_blocks.4` (40, 8), `_blocks.10` (112, 16) |
//! | `EfficientNetB5` (torchvision) | `efficientnet_b5` | `features.0` (stem), every MBConv block `features.1.0` .. `features.7.2`, `features.8` (head, 2048); e.g. `features.2.4` (40, 4), `features.3.4` (64, 8), `features.5.6` (176, 16), `features.6.8` (304, 32, CS-Flow's tap) |
//! | `ResNet18`, `ResNet50`, `WideResNet50` (torchvision) | `resnet18`, `resnet50`, `wide_resnet50_2` | `maxpool` (64, 4), `layer1` .. `layer4` (strides 4, 8, 16, 32); ResNet-50 and WRN-50-2 also `layer1.0.conv3` (256, 4): the first bottleneck's third convolution before its batch norm, residual and ReLU |
//!
//! Batch norm runs in eval mode and is folded into the preceding convolution at load time.
//!
//! # Engines
//!
//! On the default CPU build the networks run on vigil's own channels-last kernels
//! ([`Engine::Kernels`]: fused bias, residual and activation, depthwise filters vectorised across
//! channels, rows split among threads), 2–3× faster at batch 1 than the same network
//! as burn-flex operations. With a GPU build feature the default is [`Engine::Burn`], the same
//! network as burn tensor operations on that device. Both engines are checked against the same
//! reference activations.
//!
//! # Trainable networks
//!
//! [`TrainableBackbone`] is the same CNN (up to a chosen layer) as a trainable burn module with
//! the same PyTorch tensor names: convolutions and batch norms apart, batch statistics in
//! training, randomly initialised or loaded from a pretrained state dict. It trains an STFPM
//! student; its [`TrainableBackbone::state`] gives an inference network through
//! [`Backbone::from_partial_state`].
//!
//! # CaiT and MS-CaiT
//!
//! [`Cait`] is a CaiT vision transformer (timm names: `patch_embed.proj`, `pos_embed`,
//! `blocks.N.{norm1, attn.{qkv, proj_l, proj_w, proj}, gamma_1, norm2, mlp.{fc1, fc2}, gamma_2}`,
//! `norm`) truncated after block [`CaitConfig::last_block`], followed by its final LayerNorm and
//! returned as a C x H/16 x W/16 token map. [`MsCait`] is U-Flow's extractor: `cait_m48_448` up to
//! block 40 on the 448 px image (768 x 28 x 28) and `cait_s24_224` up to block 20 on the image
//! bicubically resized to 224 px (384 x 14 x 14). Weights are timm state dicts saved as
//! safetensors (or `.pth`), looked up as `cait_m48_448` / `cait_s24_224` by
//! [`MsCait::default_weights_paths`]; none are shipped with the project.
//!
//! # Weights
//!
//! [`Backbone::load`] reads `.safetensors` (PyTorch names and layouts: conv `[out, in/groups, kh, kw]`,
//! linear `[out, in]`; integer tensors such as `num_batches_tracked` are ignored) and, through
//! burn-store's pure-Rust reader, PyTorch `.pth`/`.pt`/`.bin`/`.ckpt` files in both the zip format and the legacy
//! (pre-1.6, non-zip) pickle format. A missing tensor or a wrong shape is an error naming the file
//! and the tensor. [`default_weights_path`] looks in `$VIGIL_WEIGHTS_DIR` and then in the
//! `shared/weights` folder beside the workspace, for `<name>/<name>.safetensors` or `<name>.safetensors`.
//!
//! To convert a `.pth` to safetensors with Python instead (needs `torch` and `safetensors`):
//!
//! ```python
//! import torch
//! from safetensors.torch import save_file
//! sd = torch.load("resnet18-f37072fd.pth", map_location="cpu", weights_only=True)
//! sd = sd.get("state_dict", sd)  # some checkpoints nest the weights
//! sd = {k: v.float().contiguous() for k, v in sd.items() if v.is_floating_point()}
//! save_file(sd, "resnet18.safetensors")
//! ```
//!
//! # Input
//!
//! [`Backbone::extract`] and [`Backbone::classify`] take [`Image`]s with values in [0, 1]: one or
//! two channels (gray, gray + alpha) are replicated to RGB, a fourth (alpha) channel is dropped. Images are
//! resized with bilinear interpolation, half-pixel centres and no antialiasing (PyTorch
//! `F.interpolate(mode="bilinear", align_corners=False, antialias=False)`; torchvision's `Resize`
//! antialiases when it shrinks, PIL too, so strong downscaling differs slightly from those), then
//! normalised as the backbone was trained: ImageNet mean/std for torchvision models (EfficientNet-B5 included),
//! `(x - 0.5) / 0.5` for EfficientNet-Lite.

mod arch;
mod cait;
mod kernels;
mod layers;
mod params;
mod trainable;

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use burn::tensor::{Device, Tensor, TensorData};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use vigil_core::image::resize_plane_bilinear;
use vigil_core::{Image, Result, TensorBag, VigilError, WeightsFile};

use crate::arch::Network;
pub use crate::cait::{Cait, CaitConfig, MsCait, CAIT_M48_448, CAIT_S24_224};
use crate::kernels::Nhwc;
use crate::params::{Params, PrefixParams, RandomParams, StateParams};
pub use crate::trainable::{TrainableBackbone, TrainableConvBn};

/// The supported backbones. Serialised in kebab-case (`mobilenet-v2`, `efficientnet-lite0`,
/// `efficientnet-b5`, `resnet18`, `resnet50`, `wide-resnet50-2`); parsed from either that or the
/// torchvision names (`mobilenet_v2`, `efficientnet_lite0`, `efficientnet_b5`, `wide_resnet50_2`),
/// which `Display` prints.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum BackboneKind {
    #[serde(rename = "mobilenet-v2")]
    MobileNetV2,
    #[serde(rename = "efficientnet-lite0")]
    EfficientNetLite0,
    /// torchvision's EfficientNet-B5 (SiLU, squeeze-excitation); no weights are shipped:
    /// torchvision's `EfficientNet_B5_Weights.IMAGENET1K_V1` state dict is the one to bring.
    #[serde(rename = "efficientnet-b5")]
    EfficientNetB5,
    #[serde(rename = "resnet18")]
    ResNet18,
    #[serde(rename = "resnet50")]
    ResNet50,
    #[serde(rename = "wide-resnet50-2")]
    WideResNet50,
}

impl BackboneKind {
    pub const ALL: [BackboneKind; 6] = [
        BackboneKind::MobileNetV2,
        BackboneKind::EfficientNetLite0,
        BackboneKind::EfficientNetB5,
        BackboneKind::ResNet18,
        BackboneKind::ResNet50,
        BackboneKind::WideResNet50,
    ];

    /// The torchvision-style name, also the weights file stem.
    pub fn name(self) -> &'static str {
        match self {
            BackboneKind::MobileNetV2 => "mobilenet_v2",
            BackboneKind::EfficientNetLite0 => "efficientnet_lite0",
            BackboneKind::EfficientNetB5 => "efficientnet_b5",
            BackboneKind::ResNet18 => "resnet18",
            BackboneKind::ResNet50 => "resnet50",
            BackboneKind::WideResNet50 => "wide_resnet50_2",
        }
    }

    /// Where pretrained weights for this backbone come from, for error messages.
    pub fn weights_source(self) -> &'static str {
        match self {
            BackboneKind::MobileNetV2 => "torchvision's MobileNet_V2_Weights.IMAGENET1K_V1",
            BackboneKind::EfficientNetLite0 => {
                "the ml-illustrated EfficientNet-Lite0 port, shipped in shared/weights/efficientnet_lite0"
            }
            BackboneKind::EfficientNetB5 => {
                "torchvision's EfficientNet_B5_Weights.IMAGENET1K_V1, efficientnet_b5_lukemelas-1a07897c.pth"
            }
            BackboneKind::ResNet18 => "torchvision's resnet18 ImageNet state dict",
            BackboneKind::ResNet50 => "torchvision's resnet50 ImageNet state dict",
            BackboneKind::WideResNet50 => "torchvision's wide_resnet50_2 ImageNet state dict",
        }
    }

    /// Per-channel (mean, std) the network was trained with, for inputs in [0, 1].
    pub fn normalization(self) -> ([f32; 3], [f32; 3]) {
        match self {
            BackboneKind::EfficientNetLite0 => ([0.5; 3], [0.5; 3]),
            _ => IMAGENET_NORMALIZATION,
        }
    }
}

impl fmt::Display for BackboneKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for BackboneKind {
    type Err = VigilError;

    fn from_str(s: &str) -> Result<Self> {
        let wanted = s.trim().to_ascii_lowercase().replace('-', "_");
        BackboneKind::ALL.into_iter().find(|kind| kind.name() == wanted).ok_or_else(|| {
            let known: Vec<&str> = BackboneKind::ALL.iter().map(|k| k.name()).collect();
            VigilError::Config(format!("unknown backbone '{s}' (known: {})", known.join(", ")))
        })
    }
}

/// ImageNet per-channel (mean, std) for inputs in [0, 1], used by torchvision and timm models.
pub const IMAGENET_NORMALIZATION: ([f32; 3], [f32; 3]) = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]);

/// One image's features at one layer, channel-major (C, H, W).
#[derive(Clone, Debug, PartialEq)]
pub struct FeatureMap {
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    pub data: Vec<f32>,
}

impl FeatureMap {
    /// The H x W plane of channel `c`.
    pub fn plane(&self, c: usize) -> &[f32] {
        let n = self.height * self.width;
        &self.data[c * n..(c + 1) * n]
    }
}

pub use vigil_nn::default_device;

/// The shipped weights of `kind`, if present: `$VIGIL_WEIGHTS_DIR` first, then
/// `<workspace>/../shared/weights`, as `<name>/<name>.safetensors` or `<name>.safetensors`.
pub fn default_weights_path(kind: BackboneKind) -> Option<PathBuf> {
    params::find_weights(kind.name())
}

/// Writes a state dict (PyTorch names, e.g. from [`Backbone::random_state`]) as safetensors.
pub fn write_state(state: &TensorBag, path: &Path) -> Result<()> {
    params::write_safetensors(state, path)
}

/// Reads a state dict with its PyTorch names: `.safetensors`, or a PyTorch checkpoint
/// (`.pth`/`.pt`/`.bin`/`.ckpt`). Used by networks outside this crate (the diffusion U-Net).
pub fn read_state(path: &Path) -> Result<TensorBag> {
    params::read_checkpoint(path)
}

/// How many images go through the network at once in [`Backbone::extract`]: enough to keep
/// the convolutions busy, few enough that WRN-50 activations at 256 px stay well under 1 GB.
const EXTRACT_BATCH: usize = 8;

/// What runs the network's layers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Engine {
    /// vigil's channels-last CPU kernels (see the crate documentation).
    Kernels,
    /// burn tensor operations on the backbone's device.
    Burn,
}

impl Engine {
    /// Kernels on the flex CPU device, burn elsewhere (a GPU).
    pub fn default_for(device: &Device) -> Engine {
        if *device == Device::flex() {
            Engine::Kernels
        } else {
            Engine::Burn
        }
    }
}

/// An inference-only pretrained network with tappable intermediate layers. Cloning is cheap:
/// the weights are shared.
#[derive(Clone)]
pub struct Backbone {
    kind: BackboneKind,
    network: Arc<Network>,
    device: Device,
    engine: Engine,
    /// The file the weights were read from, with its SHA-256 (None: random or in-memory weights).
    weights_file: Option<WeightsFile>,
}

impl Backbone {
    /// The backbone a method's settings ask for: random weights when a seed is given (tests),
    /// else the weights file given, else the default weights location.
    pub fn open(kind: BackboneKind, weights: Option<&Path>, random_seed: Option<u64>) -> Result<Backbone> {
        if let Some(seed) = random_seed {
            return Ok(Backbone::random(kind, seed));
        }
        let path = match weights {
            Some(p) => p.to_path_buf(),
            None => default_weights_path(kind).ok_or_else(|| {
                let name = kind.name();
                VigilError::Config(format!(
                    "no weights found for backbone {kind}: neither $VIGIL_WEIGHTS_DIR nor the shared weights \
                     folder has {name}/{name}.safetensors or {name}.safetensors, and nothing is downloaded. \
                     Set \"weights\" to a .safetensors or .pth state dict with PyTorch names ({}), or put it \
                     in one of those places",
                    kind.weights_source()
                ))
            })?,
        };
        Backbone::load(kind, &path)
    }

    /// Loads weights onto the [`default_device`]: `.pth`/`.pt`/`.bin`/`.ckpt` are read as PyTorch
    /// checkpoints, anything else as safetensors.
    pub fn load(kind: BackboneKind, weights: &Path) -> Result<Backbone> {
        Backbone::load_on(kind, weights, &default_device())
    }

    pub fn load_on(kind: BackboneKind, weights: &Path, device: &Device) -> Result<Backbone> {
        let state = params::read_checkpoint(weights)?;
        let mut backbone =
            Backbone::build(kind, &mut StateParams { bag: &state, origin: Some(weights) }, device)?;
        backbone.weights_file = Some(WeightsFile::read(weights)?);
        Ok(backbone)
    }

    /// Builds from an in-memory state dict with PyTorch names.
    pub fn from_state(kind: BackboneKind, state: &TensorBag, device: &Device) -> Result<Backbone> {
        Backbone::build(kind, &mut StateParams { bag: state, origin: None }, device)
    }

    /// Builds from a state that holds the network's tensors from the input up to some stage (as
    /// [`TrainableBackbone::state`] gives them): features up to that stage are the state's; the
    /// later stages and the classifier get seeded random weights and must not be used.
    pub fn from_partial_state(kind: BackboneKind, state: &TensorBag, device: &Device) -> Result<Backbone> {
        let mut params = PrefixParams {
            bag: state,
            fallback: RandomParams::new(0),
            taken: Default::default(),
            missing_since: None,
        };
        let backbone = Backbone::build(kind, &mut params, device)?;
        if let Some(unread) = state.names().find(|n| !params.taken.contains(*n)) {
            return Err(VigilError::Model(format!(
                "tensor '{unread}' of the partial {kind} state has no place in the network"
            )));
        }
        Ok(backbone)
    }

    /// Seeded random weights (torchvision-like initialisation) for tests without weight files.
    pub fn random(kind: BackboneKind, seed: u64) -> Backbone {
        Backbone::random_on(kind, seed, &default_device())
    }

    pub fn random_on(kind: BackboneKind, seed: u64, device: &Device) -> Backbone {
        Backbone::build(kind, &mut RandomParams::new(seed), device)
            .expect("random parameters are drawn with the shapes the architecture asks for")
    }

    /// The state dict [`Backbone::random`] draws for this seed, with PyTorch names.
    pub fn random_state(kind: BackboneKind, seed: u64) -> TensorBag {
        let mut params = RandomParams::new(seed);
        Backbone::build(kind, &mut params, &default_device())
            .expect("random parameters are drawn with the shapes the architecture asks for");
        params.drawn
    }

    fn build(kind: BackboneKind, params: &mut dyn Params, device: &Device) -> Result<Backbone> {
        let network = arch::build(kind, params, device)?;
        Ok(Backbone {
            kind,
            network: Arc::new(network),
            device: device.clone(),
            engine: Engine::default_for(device),
            weights_file: None,
        })
    }

    /// The weights file this backbone was loaded from and its SHA-256, for model files to record.
    pub fn weights_file(&self) -> Option<&WeightsFile> {
        self.weights_file.as_ref()
    }

    /// The same backbone run by another engine.
    pub fn with_engine(mut self, engine: Engine) -> Backbone {
        self.engine = engine;
        self
    }

    pub fn engine(&self) -> Engine {
        self.engine
    }

    pub fn kind(&self) -> BackboneKind {
        self.kind
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Tappable layer names, input to output (PyTorch module names: "features.6", "layer2", "_blocks.2").
    pub fn layer_names(&self) -> Vec<String> {
        self.network.stages.iter().map(|s| s.name.clone()).collect()
    }

    /// (channels, stride relative to the input) of a layer's output.
    pub fn layer_info(&self, layer: &str) -> Result<(usize, usize)> {
        let stage = &self.network.stages[self.stage_index(layer)?];
        Ok((stage.channels, stage.stride))
    }

    /// EfficientNet's module names start with an underscore; "blocks.2" is accepted for "_blocks.2".
    fn stage_index(&self, layer: &str) -> Result<usize> {
        let stages = &self.network.stages;
        let position = |name: &str| stages.iter().position(|s| s.name == name);
        position(layer).or_else(|| position(&format!("_{layer}"))).ok_or_else(|| {
            VigilError::Config(format!(
                "backbone {} has no layer '{layer}' (layers: {})",
                self.kind,
                self.layer_names().join(", ")
            ))
        })
    }

    /// Images as one normalised batch [N, 3, h, w] on this backbone's device (see the crate
    /// docs for the channel, resize and normalisation rules).
    pub fn preprocess(&self, images: &[Image], input_size: (usize, usize)) -> Result<Tensor<4>> {
        preprocess_images(images, input_size, self.kind.normalization(), &self.device)
    }

    /// Runs a normalised batch [N, 3, H, W] up to the deepest requested layer; returns one
    /// tensor [N, C, H/s, W/s] per requested layer, in the order asked.
    pub fn extract_tensor(&self, batch: Tensor<4>, layers: &[String]) -> Result<Vec<Tensor<4>>> {
        check_batch(&batch)?;
        if layers.is_empty() {
            return Err(VigilError::Config("no backbone layers requested".into()));
        }
        let wanted: Vec<usize> = layers.iter().map(|l| self.stage_index(l)).collect::<Result<_>>()?;
        if self.engine == Engine::Kernels {
            let images = tensor_images(batch)?;
            let per_image: Vec<Vec<Nhwc>> = images.par_iter().map(|x| self.run_stages(x, &wanted)).collect();
            return Ok((0..wanted.len())
                .map(|tap| {
                    let maps: Vec<&Nhwc> = per_image.iter().map(|outputs| &outputs[tap]).collect();
                    images_tensor(&maps, &self.device)
                })
                .collect());
        }
        let deepest = *wanted.iter().max().expect("layers is not empty");
        let mut outputs: Vec<Option<Tensor<4>>> = vec![None; self.network.stages.len()];
        let mut x = batch;
        for (index, stage) in self.network.stages[..=deepest].iter().enumerate() {
            let y = stage.block.forward(x.clone());
            if wanted.contains(&index) {
                outputs[index] = Some(y.clone());
            }
            if !stage.branch {
                x = y;
            }
        }
        Ok(wanted.iter().map(|&i| outputs[i].clone().expect("every wanted stage ran")).collect())
    }

    /// Features of each requested layer for each image: `result[image][layer]`.
    pub fn extract(
        &self,
        images: &[Image],
        layers: &[String],
        input_size: (usize, usize),
    ) -> Result<Vec<Vec<FeatureMap>>> {
        if self.engine == Engine::Kernels {
            let wanted: Vec<usize> = layers.iter().map(|l| self.stage_index(l)).collect::<Result<_>>()?;
            if wanted.is_empty() {
                return Err(VigilError::Config("no backbone layers requested".into()));
            }
            return images
                .par_iter()
                .map(|image| {
                    let input = self.preprocess_nhwc(image, input_size)?;
                    Ok(self
                        .run_stages(&input, &wanted)
                        .into_iter()
                        .map(|map| FeatureMap {
                            channels: map.channels,
                            height: map.height,
                            width: map.width,
                            data: map.to_planar(),
                        })
                        .collect())
                })
                .collect();
        }
        let mut result = Vec::with_capacity(images.len());
        for chunk in images.chunks(EXTRACT_BATCH) {
            let batch = self.preprocess(chunk, input_size)?;
            let features = self.extract_tensor(batch, layers)?;
            let mut per_image: Vec<Vec<FeatureMap>> = vec![Vec::with_capacity(layers.len()); chunk.len()];
            for tensor in features {
                for (image, map) in split_batch(tensor)?.into_iter().enumerate() {
                    per_image[image].push(map);
                }
            }
            result.extend(per_image);
        }
        Ok(result)
    }

    /// ImageNet logits [N, 1000] of a normalised batch.
    pub fn classify_tensor(&self, batch: Tensor<4>) -> Result<Tensor<2>> {
        check_batch(&batch)?;
        if self.engine == Engine::Kernels {
            let images = tensor_images(batch)?;
            let stages = &self.network.stages;
            let logits: Vec<f32> = images
                .par_iter()
                .flat_map_iter(|x| {
                    let features = stages
                        .iter()
                        .skip(1)
                        .filter(|stage| !stage.branch)
                        .fold(stages[0].block.forward_nhwc(x), |y, stage| stage.block.forward_nhwc(&y));
                    self.network.classifier.forward_nhwc(&features)
                })
                .collect();
            let classes = logits.len() / images.len();
            return Ok(Tensor::from_data(TensorData::new(logits, [images.len(), classes]), &self.device));
        }
        let features = self
            .network
            .stages
            .iter()
            .filter(|stage| !stage.branch)
            .fold(batch, |x, stage| stage.block.forward(x));
        Ok(self.network.classifier.forward(features))
    }

    /// ImageNet logits (1000 classes) of one image.
    pub fn classify(&self, image: &Image, input_size: (usize, usize)) -> Result<Vec<f32>> {
        let logits = self.classify_tensor(self.preprocess(std::slice::from_ref(image), input_size)?)?;
        tensor_values(logits.into_data())
    }
}

/// Images as one batch [N, 3, h, w] on `device`: made RGB, resized bilinearly to `input_size`
/// (width, height) and normalised with per-channel (mean, std).
impl Backbone {
    /// One image resized and normalised for the kernels, channels last.
    fn preprocess_nhwc(&self, image: &Image, (width, height): (usize, usize)) -> Result<Nhwc> {
        let planes = normalized_planes(image, (width, height), self.kind.normalization())?;
        let mut data = vec![0.0; 3 * width * height];
        for (p, pixel) in data.chunks_exact_mut(3).enumerate() {
            pixel.iter_mut().zip(&planes).for_each(|(v, plane)| *v = plane[p]);
        }
        Ok(Nhwc { height, width, channels: 3, data })
    }

    /// The outputs of stages `wanted` (in that order) on one image, by the kernels.
    fn run_stages(&self, input: &Nhwc, wanted: &[usize]) -> Vec<Nhwc> {
        let deepest = *wanted.iter().max().expect("at least one layer is wanted");
        let mut outputs: Vec<Option<Nhwc>> = vec![None; deepest + 1];
        let mut x: Option<Nhwc> = None;
        for (index, stage) in self.network.stages[..=deepest].iter().enumerate() {
            let y = stage.block.forward_nhwc(x.as_ref().unwrap_or(input));
            if wanted.contains(&index) {
                outputs[index] = Some(y.clone());
            }
            if !stage.branch {
                x = Some(y);
            }
        }
        wanted.iter().map(|&i| outputs[i].clone().expect("every wanted stage ran")).collect()
    }
}

/// A `[N, 3, H, W]` batch as channels-last images.
fn tensor_images(batch: Tensor<4>) -> Result<Vec<Nhwc>> {
    let [n, c, h, w] = batch.dims();
    let data = tensor_values(batch.into_data())?;
    Ok(data.chunks_exact(c * h * w).take(n).map(|planar| Nhwc::from_planar(c, h, w, planar)).collect())
}

/// Channels-last maps of equal shape as one `[N, C, H, W]` tensor.
fn images_tensor(maps: &[&Nhwc], device: &Device) -> Tensor<4> {
    let (c, h, w) = (maps[0].channels, maps[0].height, maps[0].width);
    let data: Vec<f32> = maps.iter().flat_map(|m| m.to_planar()).collect();
    Tensor::from_data(TensorData::new(data, [maps.len(), c, h, w]), device)
}

fn preprocess_images(
    images: &[Image],
    input_size: (usize, usize),
    normalization: ([f32; 3], [f32; 3]),
    device: &Device,
) -> Result<Tensor<4>> {
    if images.is_empty() {
        return Err(VigilError::invalid("no images to run through the backbone"));
    }
    let (width, height) = input_size;
    let mut data = Vec::with_capacity(images.len() * 3 * width * height);
    for (i, image) in images.iter().enumerate() {
        let planes = normalized_planes(image, input_size, normalization)
            .map_err(|e| VigilError::invalid(format!("image {i}: {e}")))?;
        data.extend(planes.into_iter().flatten());
    }
    Ok(Tensor::from_data(TensorData::new(data, [images.len(), 3, height, width]), device))
}

/// The R, G and B planes of `image` resized to `size` (bilinear) and normalised, as every
/// backbone input starts; the three planes are resampled in parallel.
fn normalized_planes(
    image: &Image,
    (width, height): (usize, usize),
    (mean, std): ([f32; 3], [f32; 3]),
) -> Result<Vec<Vec<f32>>> {
    if width == 0 || height == 0 {
        return Err(VigilError::Config(format!("backbone input size {width}x{height} is empty")));
    }
    let sources = rgb_sources(image)?;
    Ok(sources
        .par_iter()
        .enumerate()
        .map(|(c, &source)| {
            let plane = image.channel(source);
            let normalise = |v: f32| (v - mean[c]) / std[c];
            if (image.width, image.height) == (width, height) {
                plane.iter().map(|&v| normalise(v)).collect()
            } else {
                let mut resized = resize_plane_bilinear(plane, image.width, image.height, width, height);
                resized.iter_mut().for_each(|v| *v = normalise(*v));
                resized
            }
        })
        .collect())
}

fn check_batch(batch: &Tensor<4>) -> Result<()> {
    let [n, c, h, w] = batch.dims();
    if n == 0 || c != 3 || h == 0 || w == 0 {
        return Err(VigilError::invalid(format!(
            "backbone input must be [N>0, 3, H>0, W>0], got [{n}, {c}, {h}, {w}]"
        )));
    }
    Ok(())
}

/// Three channels from 1 (gray), 2 (gray + alpha), 3 (RGB) or 4 (RGBA).
/// Which channel of `image` feeds each of R, G and B: gray (with or without alpha) is
/// replicated, a fourth (alpha) channel is dropped.
fn rgb_sources(image: &Image) -> Result<[usize; 3]> {
    let expected = image.width * image.height * image.channels;
    if image.width == 0 || image.height == 0 || image.data.len() != expected {
        return Err(VigilError::invalid(format!(
            "{}x{}x{} image holds {} samples",
            image.width,
            image.height,
            image.channels,
            image.data.len()
        )));
    }
    match image.channels {
        1 | 2 => Ok([0; 3]),
        3 | 4 => Ok([0, 1, 2]),
        n => Err(VigilError::invalid(format!("images with {n} channels are not supported (1 to 4)"))),
    }
}

fn split_batch(tensor: Tensor<4>) -> Result<Vec<FeatureMap>> {
    let [n, channels, height, width] = tensor.dims();
    let data = tensor_values(tensor.into_data())?;
    let per_image = channels * height * width;
    Ok(data
        .chunks_exact(per_image)
        .take(n)
        .map(|chunk| FeatureMap { channels, height, width, data: chunk.to_vec() })
        .collect())
}

fn tensor_values(data: TensorData) -> Result<Vec<f32>> {
    data.try_into_vec_as::<f32>().map_err(|e| VigilError::Model(format!("reading backbone output: {e:?}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_parse_from_torchvision_and_kebab_names() {
        for kind in BackboneKind::ALL {
            assert_eq!(kind.name().parse::<BackboneKind>().unwrap(), kind);
            let json = serde_json::to_string(&kind).unwrap();
            assert_eq!(serde_json::from_str::<BackboneKind>(&json).unwrap(), kind);
            assert_eq!(json.trim_matches('"').parse::<BackboneKind>().unwrap(), kind);
        }
        assert_eq!(serde_json::to_string(&BackboneKind::WideResNet50).unwrap(), "\"wide-resnet50-2\"");
        assert!("vgg16".parse::<BackboneKind>().unwrap_err().to_string().contains("resnet18"));
    }

    #[test]
    fn mobilenet_layers_and_strides() {
        let backbone = Backbone::random(BackboneKind::MobileNetV2, 0);
        let names = backbone.layer_names();
        assert_eq!(names.len(), 19);
        assert_eq!(names[0], "features.0");
        assert_eq!(names[18], "features.18");
        assert_eq!(backbone.layer_info("features.3").unwrap(), (24, 4));
        assert_eq!(backbone.layer_info("features.6").unwrap(), (32, 8));
        assert_eq!(backbone.layer_info("features.13").unwrap(), (96, 16));
        assert_eq!(backbone.layer_info("features.17").unwrap(), (320, 32));
        assert!(backbone.layer_info("layer2").unwrap_err().to_string().contains("features.3"));
    }

    #[test]
    fn efficientnet_layers_and_strides() {
        let backbone = Backbone::random(BackboneKind::EfficientNetLite0, 0);
        assert_eq!(backbone.layer_names().len(), 18);
        assert_eq!(backbone.layer_info("_blocks.2").unwrap(), (24, 4));
        assert_eq!(backbone.layer_info("_blocks.4").unwrap(), (40, 8));
        assert_eq!(backbone.layer_info("_blocks.10").unwrap(), (112, 16));
        assert_eq!(backbone.layer_info("_blocks.15").unwrap(), (320, 32));
        assert_eq!(backbone.layer_info("_conv_head").unwrap(), (1280, 32));
        assert_eq!(backbone.layer_info("blocks.4").unwrap(), (40, 8));
    }

    #[test]
    fn efficientnet_b5_layers_and_strides() {
        let backbone = Backbone::random(BackboneKind::EfficientNetB5, 0);
        let names = backbone.layer_names();
        // stem, 3 + 5 + 5 + 7 + 7 + 9 + 3 blocks, head
        assert_eq!(names.len(), 41);
        assert_eq!((names[0].as_str(), names[40].as_str()), ("features.0", "features.8"));
        assert_eq!(backbone.layer_info("features.1.2").unwrap(), (24, 2));
        assert_eq!(backbone.layer_info("features.2.4").unwrap(), (40, 4));
        assert_eq!(backbone.layer_info("features.3.4").unwrap(), (64, 8));
        assert_eq!(backbone.layer_info("features.5.6").unwrap(), (176, 16));
        assert_eq!(backbone.layer_info("features.6.8").unwrap(), (304, 32));
        assert_eq!(backbone.layer_info("features.7.2").unwrap(), (512, 32));
        assert_eq!(backbone.layer_info("features.8").unwrap(), (2048, 32));
        assert!(backbone.layer_info("features.6.9").is_err());
        // torchvision's parameter count for efficientnet_b5, classifier included
        let state = Backbone::random_state(BackboneKind::EfficientNetB5, 0);
        let parameters: usize = state
            .names()
            .filter(|n| !n.ends_with("running_mean") && !n.ends_with("running_var"))
            .map(|n| state.shape(n).unwrap().iter().product::<usize>())
            .sum();
        assert_eq!(parameters, 30_389_784);
        let err = TrainableBackbone::new(BackboneKind::EfficientNetB5, "features.6.8", 0, &default_device())
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("efficientnet_b5"), "{err}");
    }

    #[test]
    fn backbones_can_be_shared_across_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Backbone>();
    }

    #[test]
    fn gray_two_channel_and_rgba_images_become_rgb() {
        let gray = Image::new(2, 1, 1, vec![0.2, 0.4]).unwrap();
        assert_eq!(rgb_sources(&gray).unwrap(), [0, 0, 0]);
        let gray_alpha = Image::new(2, 1, 2, vec![0.2, 0.4, 1.0, 1.0]).unwrap();
        assert_eq!(rgb_sources(&gray_alpha).unwrap(), [0, 0, 0]);
        let rgba = Image::new(1, 1, 4, vec![0.1, 0.2, 0.3, 1.0]).unwrap();
        assert_eq!(rgb_sources(&rgba).unwrap(), [0, 1, 2]);
        let five = Image::new(1, 1, 5, vec![0.0; 5]).unwrap();
        assert!(rgb_sources(&five).is_err());
        let broken = Image { width: 2, height: 2, channels: 3, bit_depth: 8, data: vec![0.0; 3] };
        assert!(rgb_sources(&broken).is_err());

        // Through both engines, a gray image gives the features of its RGB replica.
        let pixels: Vec<f32> = (0..40 * 30).map(|i| ((i * 7) % 255) as f32 / 255.0).collect();
        let gray = Image::new(40, 30, 1, pixels.clone()).unwrap();
        let rgb = Image::new(40, 30, 3, pixels.repeat(3)).unwrap();
        let layers = vec!["features.3".to_string()];
        for engine in [Engine::Kernels, Engine::Burn] {
            let backbone = Backbone::random(BackboneKind::MobileNetV2, 1).with_engine(engine);
            let from_gray = backbone.extract(std::slice::from_ref(&gray), &layers, (32, 32)).unwrap();
            let from_rgb = backbone.extract(std::slice::from_ref(&rgb), &layers, (32, 32)).unwrap();
            assert_eq!(from_gray, from_rgb, "{engine:?}");
        }
    }

    #[test]
    fn kernel_features_do_not_depend_on_the_thread_count() {
        let image =
            Image::new(96, 80, 3, (0..96 * 80 * 3).map(|i| ((i * 29) % 256) as f32 / 255.0).collect())
                .unwrap();
        let backbone = Backbone::random(BackboneKind::EfficientNetLite0, 3).with_engine(Engine::Kernels);
        let layers = vec!["_blocks.4".to_string(), "_blocks.10".to_string()];
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            pool.install(|| backbone.extract(std::slice::from_ref(&image), &layers, (128, 96)).unwrap())
        };
        assert_eq!(run(1), run(3));
    }

    #[test]
    fn both_engines_give_the_same_features_for_every_architecture() {
        let image =
            Image::new(70, 50, 3, (0..70 * 50 * 3).map(|i| ((i * 13) % 256) as f32 / 255.0).collect())
                .unwrap();
        for kind in BackboneKind::ALL {
            let backbone = Backbone::random(kind, 2);
            let layers = backbone.layer_names();
            let kernels = backbone.clone().with_engine(Engine::Kernels);
            let burn = backbone.with_engine(Engine::Burn);
            // at 16 px EfficientNet's TensorFlow padding meets maps narrower than a kernel
            for size in [(64, 48), (16, 16)] {
                let want = burn.extract(std::slice::from_ref(&image), &layers, size).unwrap();
                let got = kernels.extract(std::slice::from_ref(&image), &layers, size).unwrap();
                for ((layer, g), w) in layers.iter().zip(&got[0]).zip(&want[0]) {
                    let shape = (g.channels, g.height, g.width);
                    assert_eq!(shape, (w.channels, w.height, w.width), "{kind} {layer}");
                    let scale = w.data.iter().fold(1.0f32, |m, v| m.max(v.abs()));
                    let error =
                        g.data.iter().zip(&w.data).fold(0.0f32, |m, (a, b)| m.max((a - b).abs())) / scale;
                    assert!(error < 1e-4, "{kind} {layer} at {size:?}: relative error {error}");
                }
            }
        }
    }
}
