//! CaiT (Touvron et al. 2021, "Going deeper with Image Transformers") as a truncated feature
//! trunk, and U-Flow's two-scale extractor MS-CaiT built from two of them.
//!
//! Only the self-attention part of CaiT is built: patch embedding, position embedding, the first
//! `last_block + 1` LayerScale blocks with talking-heads attention, then the model's final
//! LayerNorm. U-Flow (mtailanian/uflow, `MCaitFeatureExtractor`) stops there: it never uses the
//! class token nor the class-attention blocks (`blocks_token_only`), and it applies `norm` to the
//! patch tokens of the truncated trunk before reshaping them into a C x H/p x W/p map. Tensor
//! names and layouts are timm's (`timm/models/cait.py`), so a timm state dict loads as is; extra
//! tensors (`cls_token`, `blocks_token_only.*`, `head.*`, deeper blocks) are ignored.

use std::path::{Path, PathBuf};

use burn::tensor::activation::{gelu, softmax};
use burn::tensor::module::{conv2d, interpolate, layer_norm, linear};
use burn::tensor::ops::{ConvOptions, InterpolateMode, InterpolateOptions};
use burn::tensor::{Device, Tensor, TensorData};
use serde::{Deserialize, Serialize};
use vigil_core::{Image, Result, TensorBag, VigilError, WeightsFile};

use crate::params::{self, Params, RandomParams, StateParams};
use crate::{default_device, preprocess_images, split_batch, FeatureMap, IMAGENET_NORMALIZATION};

/// timm builds CaiT with `LayerNorm(eps=1e-6)` everywhere.
const LAYER_NORM_EPS: f64 = 1e-6;

/// Images per forward pass in [`MsCait::extract`]: at 448 px one M48 attention map is
/// 16 x 784 x 784 floats (39 MB) per image and several live at once, so batches stay small.
const EXTRACT_BATCH: usize = 2;

/// Shape of a CaiT trunk. `depth` is the full model's number of self-attention blocks (for
/// validation and documentation); the trunk runs blocks `0..=last_block`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaitConfig {
    /// Square input side the position embedding was trained for.
    pub image_size: usize,
    pub patch_size: usize,
    pub embed_dim: usize,
    pub depth: usize,
    pub num_heads: usize,
    /// MLP hidden width as a multiple of `embed_dim`.
    pub mlp_ratio: usize,
    /// Index of the last block run; `depth - 1` runs the whole self-attention trunk.
    pub last_block: usize,
}

impl CaitConfig {
    /// timm `cait_s24_224` truncated after block 20, as U-Flow's coarse scale (384 x 14 x 14).
    pub fn s24_224() -> CaitConfig {
        CaitConfig {
            image_size: 224,
            patch_size: 16,
            embed_dim: 384,
            depth: 24,
            num_heads: 8,
            mlp_ratio: 4,
            last_block: 20,
        }
    }

    /// timm `cait_m48_448` truncated after block 40, as U-Flow's fine scale (768 x 28 x 28).
    pub fn m48_448() -> CaitConfig {
        CaitConfig {
            image_size: 448,
            patch_size: 16,
            embed_dim: 768,
            depth: 48,
            num_heads: 16,
            mlp_ratio: 4,
            last_block: 40,
        }
    }

    /// Patches per side of the input.
    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(VigilError::Config(format!("CaiT: {m}")));
        let c = self;
        if c.image_size == 0 || c.patch_size == 0 || c.embed_dim == 0 || c.num_heads == 0 || c.mlp_ratio == 0
        {
            return bad(format!("sizes must be positive: {c:?}"));
        }
        if !c.image_size.is_multiple_of(c.patch_size) {
            return bad(format!(
                "image size {} is not a multiple of patch size {}",
                c.image_size, c.patch_size
            ));
        }
        if !c.embed_dim.is_multiple_of(c.num_heads) {
            return bad(format!("embed_dim {} is not divisible by {} heads", c.embed_dim, c.num_heads));
        }
        if c.last_block >= c.depth {
            return bad(format!("last block {} does not exist in a {}-block model", c.last_block, c.depth));
        }
        Ok(())
    }

    /// The timm-named tensors the truncated trunk reads, with their PyTorch shapes, in load
    /// order. Computed without allocating, so the real configurations can be checked cheaply.
    pub fn parameter_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (d, h, p) = (self.embed_dim, self.num_heads, self.patch_size);
        let hidden = d * self.mlp_ratio;
        let mut shapes = vec![
            ("patch_embed.proj.weight".to_string(), vec![d, 3, p, p]),
            ("patch_embed.proj.bias".to_string(), vec![d]),
            ("pos_embed".to_string(), vec![1, self.grid() * self.grid(), d]),
        ];
        for i in 0..=self.last_block {
            let block: [(&str, Vec<usize>); 18] = [
                ("norm1.weight", vec![d]),
                ("norm1.bias", vec![d]),
                ("attn.qkv.weight", vec![3 * d, d]),
                ("attn.qkv.bias", vec![3 * d]),
                ("attn.proj_l.weight", vec![h, h]),
                ("attn.proj_l.bias", vec![h]),
                ("attn.proj_w.weight", vec![h, h]),
                ("attn.proj_w.bias", vec![h]),
                ("attn.proj.weight", vec![d, d]),
                ("attn.proj.bias", vec![d]),
                ("gamma_1", vec![d]),
                ("norm2.weight", vec![d]),
                ("norm2.bias", vec![d]),
                ("mlp.fc1.weight", vec![hidden, d]),
                ("mlp.fc1.bias", vec![hidden]),
                ("mlp.fc2.weight", vec![d, hidden]),
                ("mlp.fc2.bias", vec![d]),
                ("gamma_2", vec![d]),
            ];
            shapes.extend(block.into_iter().map(|(name, shape)| (format!("blocks.{i}.{name}"), shape)));
        }
        shapes.push(("norm.weight".to_string(), vec![d]));
        shapes.push(("norm.bias".to_string(), vec![d]));
        shapes
    }

    /// Number of weights the truncated trunk holds.
    pub fn parameter_count(&self) -> usize {
        self.parameter_shapes().iter().map(|(_, shape)| shape.iter().product::<usize>()).sum()
    }
}

/// A linear layer, weight stored as [in, out] (the transpose of PyTorch's).
#[derive(Clone)]
struct Linear {
    weight: Tensor<2>,
    bias: Tensor<1>,
}

impl Linear {
    fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        linear(x, self.weight.clone(), Some(self.bias.clone()))
    }
}

#[derive(Clone)]
struct LayerNorm {
    weight: Tensor<1>,
    bias: Tensor<1>,
}

impl LayerNorm {
    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        layer_norm(x, self.weight.clone(), Some(self.bias.clone()), LAYER_NORM_EPS)
    }
}

/// Talking-heads attention (Shazeer et al. 2020): the attention logits and then the softmaxed
/// weights are mixed across heads by two learned head x head maps, `proj_l` and `proj_w`.
#[derive(Clone)]
struct TalkingHeadAttention {
    num_heads: usize,
    qkv: Linear,
    /// PyTorch layout [out_head, in_head], applied from the left on [N, heads, T*T].
    proj_l: (Tensor<3>, Tensor<3>),
    proj_w: (Tensor<3>, Tensor<3>),
    proj: Linear,
}

impl TalkingHeadAttention {
    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let [n, t, d] = x.dims();
        let h = self.num_heads;
        let head_dim = d / h;
        let qkv = self.qkv.forward(x);
        // timm splits the 3d outputs as (q | k | v), each split into heads of head_dim.
        let heads = |i: usize| qkv.clone().narrow(2, i * d, d).reshape([n, t, h, head_dim]).swap_dims(1, 2);
        let q = heads(0) * (head_dim as f64).powf(-0.5);
        let (k, v) = (heads(1), heads(2));
        let logits = self.mix_heads(q.matmul(k.swap_dims(2, 3)), &self.proj_l);
        let weights = self.mix_heads(softmax(logits, 3), &self.proj_w);
        let out = weights.matmul(v).swap_dims(1, 2).reshape([n, t, d]);
        self.proj.forward(out)
    }

    /// out[:, g] = sum_h W[g, h] * a[:, h] + b[g] over attention maps a: [N, heads, T, T].
    fn mix_heads(&self, a: Tensor<4>, (weight, bias): &(Tensor<3>, Tensor<3>)) -> Tensor<4> {
        let [n, h, t, _] = a.dims();
        let flat = a.reshape([n, h, t * t]);
        let mixed = weight.clone().expand([n, h, h]).matmul(flat) + bias.clone();
        mixed.reshape([n, h, t, t])
    }
}

/// timm `LayerScaleBlock`: x + gamma_1 * attn(norm1(x)), then x + gamma_2 * mlp(norm2(x)).
#[derive(Clone)]
struct LayerScaleBlock {
    norm1: LayerNorm,
    attn: TalkingHeadAttention,
    gamma_1: Tensor<3>,
    norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    gamma_2: Tensor<3>,
}

impl LayerScaleBlock {
    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let x = x.clone() + self.attn.forward(self.norm1.forward(x)) * self.gamma_1.clone();
        // nn.GELU's default is the exact (erf) form.
        let mlp = self.fc2.forward(gelu(self.fc1.forward(self.norm2.forward(x.clone()))));
        x + mlp * self.gamma_2.clone()
    }
}

/// Hands out the trunk's tensors by timm name, with an optional prefix for checkpoints that
/// nest the state dict (the original DeiT files keep it under `model`).
struct Loader<'a> {
    params: &'a mut dyn Params,
    prefix: String,
    device: &'a Device,
}

impl Loader<'_> {
    fn take<const D: usize>(&mut self, name: &str, shape: [usize; D]) -> Result<Tensor<D>> {
        let data = self.params.take(&format!("{}{name}", self.prefix), &shape)?;
        Ok(Tensor::from_data(TensorData::new(data, shape), self.device))
    }

    fn linear(&mut self, name: &str, in_features: usize, out_features: usize) -> Result<Linear> {
        let weight: Tensor<2> = self.take(&format!("{name}.weight"), [out_features, in_features])?;
        Ok(Linear { weight: weight.transpose(), bias: self.take(&format!("{name}.bias"), [out_features])? })
    }

    fn layer_norm(&mut self, name: &str, dim: usize) -> Result<LayerNorm> {
        Ok(LayerNorm {
            weight: self.take(&format!("{name}.weight"), [dim])?,
            bias: self.take(&format!("{name}.bias"), [dim])?,
        })
    }

    fn head_mix(&mut self, name: &str, heads: usize) -> Result<(Tensor<3>, Tensor<3>)> {
        let weight: Tensor<2> = self.take(&format!("{name}.weight"), [heads, heads])?;
        let bias: Tensor<1> = self.take(&format!("{name}.bias"), [heads])?;
        Ok((weight.unsqueeze::<3>(), bias.reshape([1, heads, 1])))
    }

    /// A per-channel LayerScale vector, shaped to broadcast over [N, T, C].
    fn scale(&mut self, name: &str, dim: usize) -> Result<Tensor<3>> {
        let gamma: Tensor<1> = self.take(name, [dim])?;
        Ok(gamma.reshape([1, 1, dim]))
    }
}

/// A truncated CaiT trunk: image batch in, normalised patch-token map out. Cloning is cheap.
#[derive(Clone)]
pub struct Cait {
    config: CaitConfig,
    patch_weight: Tensor<4>,
    patch_bias: Tensor<1>,
    pos_embed: Tensor<3>,
    blocks: Vec<LayerScaleBlock>,
    norm: LayerNorm,
    device: Device,
    /// The file the weights were read from, with its SHA-256 (None: random or in-memory weights).
    weights_file: Option<WeightsFile>,
}

impl Cait {
    /// Loads timm-named weights (`.safetensors`, or `.pth`/`.pt`/`.bin`/`.ckpt`) onto the
    /// [`default_device`].
    pub fn load(config: &CaitConfig, weights: &Path) -> Result<Cait> {
        Cait::load_on(config, weights, &default_device())
    }

    pub fn load_on(config: &CaitConfig, weights: &Path, device: &Device) -> Result<Cait> {
        let state = params::read_checkpoint(weights)?;
        let prefix = state_prefix(&state);
        let mut trunk =
            Cait::build(config, &mut StateParams { bag: &state, origin: Some(weights) }, prefix, device)?;
        trunk.weights_file = Some(WeightsFile::read(weights)?);
        Ok(trunk)
    }

    /// Builds from an in-memory timm state dict.
    pub fn from_state(config: &CaitConfig, state: &TensorBag, device: &Device) -> Result<Cait> {
        let prefix = state_prefix(state);
        Cait::build(config, &mut StateParams { bag: state, origin: None }, prefix, device)
    }

    /// Seeded random weights for tests without weight files. Only sensible for small
    /// configurations: U-Flow's M48 trunk holds 292 M weights.
    pub fn random(config: &CaitConfig, seed: u64) -> Result<Cait> {
        Cait::random_on(config, seed, &default_device())
    }

    pub fn random_on(config: &CaitConfig, seed: u64, device: &Device) -> Result<Cait> {
        Cait::build(config, &mut RandomParams::new(seed), String::new(), device)
    }

    /// The timm-named state dict [`Cait::random`] draws for this seed.
    pub fn random_state(config: &CaitConfig, seed: u64) -> Result<TensorBag> {
        let mut params = RandomParams::new(seed);
        Cait::build(config, &mut params, String::new(), &default_device())?;
        Ok(params.drawn)
    }

    fn build(config: &CaitConfig, params: &mut dyn Params, prefix: String, device: &Device) -> Result<Cait> {
        config.validate()?;
        let (d, h, p) = (config.embed_dim, config.num_heads, config.patch_size);
        let hidden = d * config.mlp_ratio;
        let mut load = Loader { params, prefix, device };
        let patch_weight = load.take("patch_embed.proj.weight", [d, 3, p, p])?;
        let patch_bias = load.take("patch_embed.proj.bias", [d])?;
        let pos_embed = load.take("pos_embed", [1, config.grid() * config.grid(), d])?;
        let mut blocks = Vec::with_capacity(config.last_block + 1);
        for i in 0..=config.last_block {
            let name = |part: &str| format!("blocks.{i}.{part}");
            let norm1 = load.layer_norm(&name("norm1"), d)?;
            let attn = TalkingHeadAttention {
                num_heads: h,
                qkv: load.linear(&name("attn.qkv"), d, 3 * d)?,
                proj_l: load.head_mix(&name("attn.proj_l"), h)?,
                proj_w: load.head_mix(&name("attn.proj_w"), h)?,
                proj: load.linear(&name("attn.proj"), d, d)?,
            };
            let gamma_1 = load.scale(&name("gamma_1"), d)?;
            let norm2 = load.layer_norm(&name("norm2"), d)?;
            let fc1 = load.linear(&name("mlp.fc1"), d, hidden)?;
            let fc2 = load.linear(&name("mlp.fc2"), hidden, d)?;
            let gamma_2 = load.scale(&name("gamma_2"), d)?;
            blocks.push(LayerScaleBlock { norm1, attn, gamma_1, norm2, fc1, fc2, gamma_2 });
        }
        let norm = load.layer_norm("norm", d)?;
        Ok(Cait {
            config: config.clone(),
            patch_weight,
            patch_bias,
            pos_embed,
            blocks,
            norm,
            device: device.clone(),
            weights_file: None,
        })
    }

    /// The weights file this trunk was loaded from and its SHA-256, for model files to record.
    pub fn weights_file(&self) -> Option<&WeightsFile> {
        self.weights_file.as_ref()
    }

    pub fn config(&self) -> &CaitConfig {
        &self.config
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Patch tokens [N, T, C] after the truncated trunk and the final LayerNorm, row-major over
    /// the patch grid. The batch must be [N, 3, S, S] with S the configured image size: the
    /// position embedding is learned for that grid and CaiT does not interpolate it.
    pub fn tokens(&self, batch: Tensor<4>) -> Result<Tensor<3>> {
        let [n, c, height, width] = batch.dims();
        let size = self.config.image_size;
        if n == 0 || c != 3 || height != size || width != size {
            return Err(VigilError::invalid(format!(
                "CaiT input must be [N>0, 3, {size}, {size}], got [{n}, {c}, {height}, {width}]"
            )));
        }
        let (d, p) = (self.config.embed_dim, self.config.patch_size);
        let options = ConvOptions::new([p, p], [0, 0], [1, 1], 1);
        let patches = conv2d(batch, self.patch_weight.clone(), Some(self.patch_bias.clone()), options);
        let grid = self.config.grid();
        let x = patches.reshape([n, d, grid * grid]).swap_dims(1, 2) + self.pos_embed.clone();
        let x = self.blocks.iter().fold(x, |x, block| block.forward(x));
        Ok(self.norm.forward(x))
    }

    /// The token map as features [N, C, S/p, S/p] (U-Flow's `permute(0, 2, 1).reshape`).
    pub fn feature_map(&self, batch: Tensor<4>) -> Result<Tensor<4>> {
        let tokens = self.tokens(batch)?;
        let [n, _, d] = tokens.dims();
        let grid = self.config.grid();
        Ok(tokens.swap_dims(1, 2).reshape([n, d, grid, grid]))
    }
}

/// The prefix under which a checkpoint keeps its tensors: "" for timm files, "model." or
/// "module." for the original DeiT releases and DataParallel saves.
fn state_prefix(state: &TensorBag) -> String {
    if state.get("pos_embed").is_ok() {
        return String::new();
    }
    state
        .names()
        .find_map(|name| name.strip_suffix("pos_embed").filter(|p| p.ends_with('.')).map(str::to_string))
        .unwrap_or_default()
}

/// U-Flow's multi-scale CaiT: the fine trunk (M48, 448 px) on the image, the coarse trunk
/// (S24, 224 px) on the same normalised image resized bicubically (corner-aligned, as
/// `F.interpolate(mode="bicubic", align_corners=True)`). The coarse map has half the side of
/// the fine one, so the pair is one octave apart as the U-shaped flow needs.
#[derive(Clone)]
pub struct MsCait {
    fine: Cait,
    coarse: Cait,
}

/// Weight file stems of the two U-Flow trunks, as found by [`MsCait::default_weights_paths`].
pub const CAIT_M48_448: &str = "cait_m48_448";
pub const CAIT_S24_224: &str = "cait_s24_224";

impl MsCait {
    /// U-Flow's extractor from timm `cait_m48_448` and `cait_s24_224` weight files.
    pub fn load(m48_weights: &Path, s24_weights: &Path) -> Result<MsCait> {
        let device = default_device();
        MsCait::new(
            Cait::load_on(&CaitConfig::m48_448(), m48_weights, &device)?,
            Cait::load_on(&CaitConfig::s24_224(), s24_weights, &device)?,
        )
    }

    /// Pairs two trunks on one device; the coarse grid must be half the fine one.
    pub fn new(fine: Cait, coarse: Cait) -> Result<MsCait> {
        let (f, c) = (fine.config(), coarse.config());
        if f.grid() != 2 * c.grid() {
            return Err(VigilError::Config(format!(
                "MS-CaiT: the coarse trunk's {0}x{0} token grid must be half the fine trunk's {1}x{1}",
                c.grid(),
                f.grid()
            )));
        }
        if fine.device() != coarse.device() {
            return Err(VigilError::Config("MS-CaiT: both trunks must be on the same device".into()));
        }
        Ok(MsCait { fine, coarse })
    }

    /// `cait_m48_448` and `cait_s24_224` weights, looked up like the other backbones'
    /// (`$VIGIL_WEIGHTS_DIR`, then `shared/weights`), if both exist.
    pub fn default_weights_paths() -> Option<(PathBuf, PathBuf)> {
        Some((params::find_weights(CAIT_M48_448)?, params::find_weights(CAIT_S24_224)?))
    }

    /// Square side the images are resized to (448 for U-Flow).
    pub fn input_size(&self) -> usize {
        self.fine.config().image_size
    }

    /// (channels, side) of each scale's features, finest first: [(768, 28), (384, 14)] for U-Flow.
    pub fn scales(&self) -> Vec<(usize, usize)> {
        [&self.fine, &self.coarse].iter().map(|t| (t.config().embed_dim, t.config().grid())).collect()
    }

    /// Downsampling factor of each scale relative to the input, finest first ([16, 32] for U-Flow).
    pub fn strides(&self) -> Vec<usize> {
        let size = self.input_size();
        self.scales().iter().map(|&(_, side)| size / side).collect()
    }

    pub fn device(&self) -> &Device {
        self.fine.device()
    }

    /// The weights files of both trunks (fine first) that were loaded from files.
    pub fn weights_files(&self) -> Vec<WeightsFile> {
        [&self.fine, &self.coarse].iter().filter_map(|t| t.weights_file().cloned()).collect()
    }

    /// Images as one ImageNet-normalised batch [N, 3, S, S] (same channel and resize rules as
    /// [`crate::Backbone::preprocess`]).
    pub fn preprocess(&self, images: &[Image]) -> Result<Tensor<4>> {
        let size = self.input_size();
        preprocess_images(images, (size, size), IMAGENET_NORMALIZATION, self.device())
    }

    /// Both scales' features of a normalised batch [N, 3, S, S], finest first.
    pub fn extract_tensor(&self, batch: Tensor<4>) -> Result<Vec<Tensor<4>>> {
        let coarse_size = self.coarse.config().image_size;
        let fine = self.fine.feature_map(batch.clone())?;
        let options = InterpolateOptions::new(InterpolateMode::Bicubic)
            .with_align_corners(true)
            .with_output_size([coarse_size, coarse_size]);
        let coarse = self.coarse.feature_map(interpolate(batch, options))?;
        Ok(vec![fine, coarse])
    }

    /// Features of each image at both scales: `result[image][scale]`, finest first.
    pub fn extract(&self, images: &[Image]) -> Result<Vec<Vec<FeatureMap>>> {
        let mut result = Vec::with_capacity(images.len());
        for chunk in images.chunks(EXTRACT_BATCH) {
            let mut per_image: Vec<Vec<FeatureMap>> = vec![Vec::with_capacity(2); chunk.len()];
            for tensor in self.extract_tensor(self.preprocess(chunk)?)? {
                for (image, map) in split_batch(tensor)?.into_iter().enumerate() {
                    per_image[image].push(map);
                }
            }
            result.extend(per_image);
        }
        Ok(result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny(image_size: usize, patch_size: usize) -> CaitConfig {
        CaitConfig {
            image_size,
            patch_size,
            embed_dim: 32,
            depth: 3,
            num_heads: 4,
            mlp_ratio: 4,
            last_block: 1,
        }
    }

    fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
        t.into_data().try_into_vec_as::<f32>().unwrap()
    }

    fn input(config: &CaitConfig, n: usize, phase: f32) -> Tensor<4> {
        let s = config.image_size;
        let data: Vec<f32> = (0..n * 3 * s * s).map(|i| ((i as f32) * 0.13 + phase).sin()).collect();
        Tensor::from_data(TensorData::new(data, [n, 3, s, s]), &default_device())
    }

    /// Talking-heads attention written out with loops over the PyTorch-layout weights, in f64.
    fn naive_attention(state: &TensorBag, block: usize, x: &[f32], t: usize, d: usize, h: usize) -> Vec<f64> {
        let get = |n: &str| state.f32(&format!("blocks.{block}.attn.{n}"), None).unwrap();
        let (qkv_w, qkv_b) = (get("qkv.weight"), get("qkv.bias"));
        let (l_w, l_b, w_w, w_b) =
            (get("proj_l.weight"), get("proj_l.bias"), get("proj_w.weight"), get("proj_w.bias"));
        let (p_w, p_b) = (get("proj.weight"), get("proj.bias"));
        let hd = d / h;
        // qkv[token][o] = b[o] + sum_i W[o, i] x[token, i]
        let qkv: Vec<Vec<f64>> = (0..t)
            .map(|tok| {
                (0..3 * d)
                    .map(|o| {
                        qkv_b[o] as f64
                            + (0..d).map(|i| qkv_w[o * d + i] as f64 * x[tok * d + i] as f64).sum::<f64>()
                    })
                    .collect()
            })
            .collect();
        let scale = (hd as f64).powf(-0.5);
        // logits[head][i][j]
        let mut logits = vec![vec![vec![0f64; t]; t]; h];
        for (head, rows) in logits.iter_mut().enumerate() {
            for (i, row) in rows.iter_mut().enumerate() {
                for (j, v) in row.iter_mut().enumerate() {
                    *v = (0..hd).map(|c| qkv[i][head * hd + c] * scale * qkv[j][d + head * hd + c]).sum();
                }
            }
        }
        let mix = |a: &Vec<Vec<Vec<f64>>>, w: &[f32], b: &[f32]| -> Vec<Vec<Vec<f64>>> {
            (0..h)
                .map(|g| {
                    (0..t)
                        .map(|i| {
                            (0..t)
                                .map(|j| {
                                    b[g] as f64
                                        + (0..h).map(|k| w[g * h + k] as f64 * a[k][i][j]).sum::<f64>()
                                })
                                .collect()
                        })
                        .collect()
                })
                .collect()
        };
        let mut weights = mix(&logits, &l_w, &l_b);
        for row in weights.iter_mut().flatten() {
            let max = row.iter().cloned().fold(f64::MIN, f64::max);
            let total: f64 = row.iter().map(|v| (v - max).exp()).sum();
            row.iter_mut().for_each(|v| *v = (*v - max).exp() / total);
        }
        let weights = mix(&weights, &w_w, &w_b);
        let mut heads_out = vec![vec![0f64; d]; t];
        for head in 0..h {
            for i in 0..t {
                for c in 0..hd {
                    heads_out[i][head * hd + c] =
                        (0..t).map(|j| weights[head][i][j] * qkv[j][2 * d + head * hd + c]).sum();
                }
            }
        }
        (0..t)
            .flat_map(|i| {
                let row = &heads_out[i];
                (0..d)
                    .map(|o| p_b[o] as f64 + (0..d).map(|c| p_w[o * d + c] as f64 * row[c]).sum::<f64>())
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    #[test]
    fn attention_matches_a_direct_computation() {
        let config = tiny(32, 8);
        let state = Cait::random_state(&config, 5).unwrap();
        let cait = Cait::from_state(&config, &state, &default_device()).unwrap();
        let (t, d) = (16, 32);
        let x: Vec<f32> = (0..t * d).map(|i| ((i as f32) * 0.71).cos()).collect();
        let tokens = Tensor::<3>::from_data(TensorData::new(x.clone(), [1, t, d]), &default_device());
        let got = values(cait.blocks[1].attn.forward(tokens));
        let want = naive_attention(&state, 1, &x, t, d, 4);
        let scale = want.iter().fold(1f64, |m, v| m.max(v.abs()));
        let error = got.iter().zip(&want).fold(0f64, |m, (&a, b)| m.max((a as f64 - b).abs())) / scale;
        assert!(error < 1e-5, "relative max error {error}");
    }

    /// erf by Abramowitz & Stegun 7.1.26 (absolute error below 1.5e-7), for the exact GELU.
    fn erf(x: f64) -> f64 {
        let t = 1.0 / (1.0 + 0.327_591_1 * x.abs());
        let poly = t
            * (0.254_829_592
                + t * (-0.284_496_736 + t * (1.421_413_741 + t * (-1.453_152_027 + t * 1.061_405_429))));
        (1.0 - poly * (-x * x).exp()).copysign(x)
    }

    fn naive_layer_norm(state: &TensorBag, name: &str, row: &[f64]) -> Vec<f64> {
        let w = state.f32(&format!("{name}.weight"), None).unwrap();
        let b = state.f32(&format!("{name}.bias"), None).unwrap();
        let n = row.len() as f64;
        let mean = row.iter().sum::<f64>() / n;
        let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
        row.iter()
            .enumerate()
            .map(|(i, v)| (v - mean) / (var + 1e-6).sqrt() * w[i] as f64 + b[i] as f64)
            .collect()
    }

    fn naive_linear(state: &TensorBag, name: &str, row: &[f64]) -> Vec<f64> {
        let w = state.f32(&format!("{name}.weight"), None).unwrap();
        let b = state.f32(&format!("{name}.bias"), None).unwrap();
        let n_in = row.len();
        (0..b.len())
            .map(|o| b[o] as f64 + (0..n_in).map(|i| w[o * n_in + i] as f64 * row[i]).sum::<f64>())
            .collect()
    }

    /// The whole one-block trunk with loops: patch embedding, position embedding, LayerScale
    /// block, final norm, then the token-to-map reshape. Returns [C][gy][gx] flattened.
    fn naive_feature_map(state: &TensorBag, config: &CaitConfig, image: &[f32]) -> Vec<f64> {
        let (s, p, d, g) = (config.image_size, config.patch_size, config.embed_dim, config.grid());
        let t = g * g;
        let conv_w = state.f32("patch_embed.proj.weight", None).unwrap();
        let conv_b = state.f32("patch_embed.proj.bias", None).unwrap();
        let pos = state.f32("pos_embed", None).unwrap();
        let mut x = vec![vec![0f64; d]; t];
        for (token, row) in x.iter_mut().enumerate() {
            let (gy, gx) = (token / g, token % g);
            for (o, v) in row.iter_mut().enumerate() {
                let mut sum = conv_b[o] as f64 + pos[token * d + o] as f64;
                for c in 0..3 {
                    for ky in 0..p {
                        for kx in 0..p {
                            let pixel = image[c * s * s + (gy * p + ky) * s + gx * p + kx] as f64;
                            sum += conv_w[((o * 3 + c) * p + ky) * p + kx] as f64 * pixel;
                        }
                    }
                }
                *v = sum;
            }
        }
        let gamma = |n: &str| state.f32(&format!("blocks.0.{n}"), None).unwrap();
        let normed: Vec<f32> =
            x.iter().flat_map(|r| naive_layer_norm(state, "blocks.0.norm1", r)).map(|v| v as f32).collect();
        let attn = naive_attention(state, 0, &normed, t, d, config.num_heads);
        let gamma_1 = gamma("gamma_1");
        for (token, row) in x.iter_mut().enumerate() {
            row.iter_mut().enumerate().for_each(|(c, v)| *v += gamma_1[c] as f64 * attn[token * d + c]);
        }
        let gamma_2 = gamma("gamma_2");
        for row in x.iter_mut() {
            let hidden =
                naive_linear(state, "blocks.0.mlp.fc1", &naive_layer_norm(state, "blocks.0.norm2", row));
            let hidden: Vec<f64> =
                hidden.iter().map(|&h| 0.5 * h * (1.0 + erf(h / std::f64::consts::SQRT_2))).collect();
            let out = naive_linear(state, "blocks.0.mlp.fc2", &hidden);
            row.iter_mut().enumerate().for_each(|(c, v)| *v += gamma_2[c] as f64 * out[c]);
        }
        let tokens: Vec<Vec<f64>> = x.iter().map(|r| naive_layer_norm(state, "norm", r)).collect();
        (0..d).flat_map(|c| tokens.iter().map(move |r| r[c])).collect()
    }

    #[test]
    fn trunk_matches_a_direct_computation() {
        let config = CaitConfig { last_block: 0, ..tiny(24, 8) };
        let state = Cait::random_state(&config, 9).unwrap();
        let cait = Cait::from_state(&config, &state, &default_device()).unwrap();
        let batch = input(&config, 1, 0.3);
        let image = values(batch.clone());
        let got = values(cait.feature_map(batch).unwrap());
        assert_eq!(got.len(), 32 * 3 * 3);
        let want = naive_feature_map(&state, &config, &image);
        let error = got.iter().zip(&want).fold(0f64, |m, (&a, b)| m.max((a as f64 - b).abs()));
        // LayerNorm output is O(1) per channel, so this is a relative error too.
        assert!(error < 1e-4, "max error {error}");
    }

    #[test]
    fn builder_reads_exactly_the_listed_parameters() {
        let config = tiny(32, 8);
        let state = Cait::random_state(&config, 1).unwrap();
        let listed = config.parameter_shapes();
        let mut drawn: Vec<(String, Vec<usize>)> =
            state.names().map(|n| (n.to_string(), state.shape(n).unwrap().to_vec())).collect();
        let mut sorted = listed.clone();
        sorted.sort();
        drawn.sort();
        assert_eq!(drawn, sorted);
        // Two blocks of 17 + 1 tensors, plus patch embedding (2), position embedding and norm (2).
        assert_eq!(listed.len(), 2 * 18 + 5);
    }

    #[test]
    fn nested_checkpoint_names_are_found() {
        let config = tiny(16, 8);
        let state = Cait::random_state(&config, 2).unwrap();
        let mut nested = TensorBag::new();
        for name in state.names() {
            let shape = state.shape(name).unwrap().to_vec();
            nested.put_f32(&format!("model.{name}"), &shape, state.f32(name, None).unwrap());
        }
        assert_eq!(state_prefix(&nested), "model.");
        let batch = || input(&config, 1, 0.0);
        let a = Cait::from_state(&config, &state, &default_device()).unwrap();
        let b = Cait::from_state(&config, &nested, &default_device()).unwrap();
        assert_eq!(values(a.feature_map(batch()).unwrap()), values(b.feature_map(batch()).unwrap()));
    }
}
