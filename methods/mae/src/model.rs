//! The ViT masked autoencoder of He et al. (facebookresearch/mae `models_mae.py`) on burn: patch
//! embedding, fixed 2-D sin-cos positional embeddings, a cls token, pre-LN transformer blocks
//! (LayerNorm eps 1e-6, qkv bias, MLP ratio 4, exact GELU) over the visible tokens only, and the
//! light decoder (mask tokens un-shuffled into place, its own positional embedding and blocks,
//! a linear head to p²·3 pixels per patch).
//!
//! Parameters carry the official state_dict names (`patch_embed.proj.weight`,
//! `blocks.0.attn.qkv.weight`, `decoder_embed.weight`, `mask_token`, ...) in PyTorch layouts
//! (linear weights `[out, in]`), so an official checkpoint loads by name through
//! [`vigil_nn::load_module`].

use burn::module::{Module, Param};
use burn::nn::{LayerNorm, LayerNormConfig};
use burn::tensor::activation::gelu;
use burn::tensor::{Device, Int, Tensor, TensorData};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use vigil_core::{Result, TensorBag, VigilError};
use vigil_nn::kernels::scaled_softmax;
use vigil_nn::{load_module, module_to_bag, tensor_from_vec};

/// LayerNorm epsilon of every norm in the official factories (`partial(nn.LayerNorm, eps=1e-6)`).
pub const LN_EPS: f64 = 1e-6;

/// The architecture of a masked autoencoder.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MaeArch {
    pub image_size: usize,
    pub patch_size: usize,
    pub embed_dim: usize,
    pub depth: usize,
    pub num_heads: usize,
    pub decoder_embed_dim: usize,
    pub decoder_depth: usize,
    pub decoder_num_heads: usize,
    pub mlp_ratio: usize,
}

impl MaeArch {
    /// `mae_vit_base_patch16_dec512d8b` at 224 px.
    pub fn vit_base() -> Self {
        MaeArch {
            image_size: 224,
            patch_size: 16,
            embed_dim: 768,
            depth: 12,
            num_heads: 12,
            decoder_embed_dim: 512,
            decoder_depth: 8,
            decoder_num_heads: 16,
            mlp_ratio: 4,
        }
    }

    /// `mae_vit_large_patch16_dec512d8b` at 224 px.
    pub fn vit_large() -> Self {
        MaeArch { embed_dim: 1024, depth: 24, num_heads: 16, ..MaeArch::vit_base() }
    }

    /// Patches per side.
    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size
    }

    /// Patches per image.
    pub fn patches(&self) -> usize {
        self.grid() * self.grid()
    }

    /// Values per patch (p²·3).
    pub fn patch_values(&self) -> usize {
        self.patch_size * self.patch_size * 3
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(VigilError::Config(format!("mae: {m}")));
        let a = self;
        if a.patch_size == 0 || a.image_size == 0 || !a.image_size.is_multiple_of(a.patch_size) {
            return bad(format!(
                "image size {} must be a positive multiple of the patch size {}",
                a.image_size, a.patch_size
            ));
        }
        for (what, dim, heads) in
            [("encoder", a.embed_dim, a.num_heads), ("decoder", a.decoder_embed_dim, a.decoder_num_heads)]
        {
            if dim == 0 || heads == 0 || !dim.is_multiple_of(heads) {
                return bad(format!("{what} width {dim} must be a positive multiple of its {heads} heads"));
            }
            // The 2-D sin-cos embedding splits the width in four (sin/cos of rows and columns).
            if !dim.is_multiple_of(4) {
                return bad(format!("{what} width {dim} must be a multiple of 4 for the sin-cos embedding"));
            }
        }
        if a.depth == 0 || a.decoder_depth == 0 || a.mlp_ratio == 0 {
            return bad("depths and the MLP ratio must be positive".into());
        }
        Ok(())
    }
}

/// A linear layer with PyTorch's weight layout `[out, in]`.
#[derive(Module, Debug)]
pub struct TorchLinear {
    pub weight: Param<Tensor<2>>,
    pub bias: Param<Tensor<1>>,
}

impl TorchLinear {
    fn zeros(input: usize, output: usize, device: &Device) -> Self {
        TorchLinear {
            weight: Param::from_tensor(Tensor::zeros([output, input], device)),
            bias: Param::from_tensor(Tensor::zeros([output], device)),
        }
    }

    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let [b, t, d] = x.dims();
        let w = self.weight.val();
        let out = w.dims()[0];
        let y = x.reshape([b * t, d]).matmul(w.transpose()) + self.bias.val().unsqueeze::<2>();
        y.reshape([b, t, out])
    }
}

fn layer_norm(dim: usize, device: &Device) -> LayerNorm {
    LayerNormConfig::new(dim).with_epsilon(LN_EPS).init(device)
}

/// timm's `Attention` (qkv with bias, scale head_dim^-0.5, output projection).
#[derive(Module, Debug)]
pub struct Attention {
    pub qkv: TorchLinear,
    pub proj: TorchLinear,
    heads: usize,
}

impl Attention {
    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let [b, t, c] = x.dims();
        let h = self.heads;
        let hd = c / h;
        let qkv = self.qkv.forward(x);
        let part = |i: usize| qkv.clone().narrow(2, i * c, c).reshape([b, t, h, hd]).swap_dims(1, 2);
        let (q, k, v) = (part(0), part(1), part(2));
        let weights = scaled_softmax(q.matmul(k.swap_dims(2, 3)), 1.0 / (hd as f64).sqrt());
        let y = weights.matmul(v).swap_dims(1, 2).reshape([b, t, c]);
        self.proj.forward(y)
    }
}

/// timm's `Mlp`: fc1, exact GELU, fc2.
#[derive(Module, Debug)]
pub struct Mlp {
    pub fc1: TorchLinear,
    pub fc2: TorchLinear,
}

/// timm's pre-LN `Block`: x + attn(norm1(x)), then x + mlp(norm2(x)).
#[derive(Module, Debug)]
pub struct Block {
    pub norm1: LayerNorm,
    pub attn: Attention,
    pub norm2: LayerNorm,
    pub mlp: Mlp,
}

impl Block {
    fn zeros(dim: usize, heads: usize, mlp_ratio: usize, device: &Device) -> Self {
        Block {
            norm1: layer_norm(dim, device),
            attn: Attention {
                qkv: TorchLinear::zeros(dim, 3 * dim, device),
                proj: TorchLinear::zeros(dim, dim, device),
                heads,
            },
            norm2: layer_norm(dim, device),
            mlp: Mlp {
                fc1: TorchLinear::zeros(dim, mlp_ratio * dim, device),
                fc2: TorchLinear::zeros(mlp_ratio * dim, dim, device),
            },
        }
    }

    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let x = x.clone() + self.attn.forward(self.norm1.forward(x));
        let hidden = gelu(self.mlp.fc1.forward(self.norm2.forward(x.clone())));
        x + self.mlp.fc2.forward(hidden)
    }
}

/// The `Conv2d(3, E, p, stride p)` of timm's `PatchEmbed`.
#[derive(Module, Debug)]
pub struct PatchProj {
    pub weight: Param<Tensor<4>>,
    pub bias: Param<Tensor<1>>,
}

#[derive(Module, Debug)]
pub struct PatchEmbed {
    pub proj: PatchProj,
}

/// The masked autoencoder, with the official parameter names.
#[derive(Module, Debug)]
pub struct Mae {
    pub patch_embed: PatchEmbed,
    pub cls_token: Param<Tensor<3>>,
    /// Fixed (not trained), as in the official code, but part of the state dict.
    pub pos_embed: Param<Tensor<3>>,
    pub blocks: Vec<Block>,
    pub norm: LayerNorm,
    pub decoder_embed: TorchLinear,
    pub mask_token: Param<Tensor<3>>,
    pub decoder_pos_embed: Param<Tensor<3>>,
    pub decoder_blocks: Vec<Block>,
    pub decoder_norm: LayerNorm,
    pub decoder_pred: TorchLinear,
    patch: usize,
}

/// Which patches each image of a batch shows the encoder, and where everything goes back:
/// the official `random_masking`'s `ids_shuffle` (kept ones first) per image.
#[derive(Clone, Debug, PartialEq)]
pub struct MaskPlan {
    /// Per image, the permutation of the patches whose first `keep` entries are visible.
    pub ids_shuffle: Vec<Vec<usize>>,
    pub keep: usize,
}

impl MaskPlan {
    /// The official random masking from given noise: argsort of the noise (small kept), keeping
    /// `int(L · (1 − ratio))` patches.
    pub fn from_noise(noise: &[Vec<f32>], mask_ratio: f64) -> Self {
        let patches = noise.first().map_or(0, Vec::len);
        let keep = (patches as f64 * (1.0 - mask_ratio)) as usize;
        let ids_shuffle = noise
            .iter()
            .map(|n| {
                let mut ids: Vec<usize> = (0..n.len()).collect();
                ids.sort_by(|&a, &b| n[a].total_cmp(&n[b]).then(a.cmp(&b)));
                ids
            })
            .collect();
        MaskPlan { ids_shuffle, keep }
    }

    /// Seeded random masking of `images` images of `patches` patches (uniform noise per patch).
    pub fn random(rng: &mut ChaCha8Rng, images: usize, patches: usize, mask_ratio: f64) -> Self {
        let noise: Vec<Vec<f32>> =
            (0..images).map(|_| (0..patches).map(|_| rng.gen::<f32>()).collect()).collect();
        MaskPlan::from_noise(&noise, mask_ratio)
    }

    /// The same removed patches for every image of a batch (`true` = removed): visible patches
    /// in index order, then removed ones.
    pub fn from_removed(removed: &[bool], images: usize) -> Self {
        let visible = removed.iter().enumerate().filter(|(_, &r)| !r).map(|(i, _)| i);
        let hidden = removed.iter().enumerate().filter(|(_, &r)| r).map(|(i, _)| i);
        let ids: Vec<usize> = visible.chain(hidden).collect();
        let keep = removed.iter().filter(|&&r| !r).count();
        MaskPlan { ids_shuffle: vec![ids; images], keep }
    }

    /// Per image and patch, 1 where the patch is removed (the official `mask`).
    pub fn mask(&self) -> Vec<Vec<f32>> {
        self.ids_shuffle
            .iter()
            .map(|ids| {
                let mut m = vec![0f32; ids.len()];
                for &i in &ids[self.keep..] {
                    m[i] = 1.0;
                }
                m
            })
            .collect()
    }

    /// Flat row indices into a `[N·L, D]` tensor: the kept patches of every image.
    fn keep_rows(&self) -> Vec<i64> {
        let mut rows = Vec::with_capacity(self.ids_shuffle.len() * self.keep);
        for (n, ids) in self.ids_shuffle.iter().enumerate() {
            let base = n * ids.len();
            rows.extend(ids[..self.keep].iter().map(|&i| (base + i) as i64));
        }
        rows
    }

    /// Flat row indices into the `[N·L, D]` tensor of (kept tokens, then mask tokens) per image
    /// that put every patch back in place (the official gather by `ids_restore`).
    fn restore_rows(&self) -> Vec<i64> {
        let mut rows = Vec::new();
        for (n, ids) in self.ids_shuffle.iter().enumerate() {
            let l = ids.len();
            let mut restore = vec![0usize; l];
            for (position, &patch) in ids.iter().enumerate() {
                restore[patch] = position;
            }
            rows.extend(restore.iter().map(|&p| (n * l + p) as i64));
        }
        rows
    }
}

fn int_tensor(values: Vec<i64>, device: &Device) -> Tensor<1, Int> {
    let n = values.len();
    Tensor::from_data(TensorData::new(values, [n]), device)
}

impl Mae {
    /// A network of `arch` with zero weights (to be loaded).
    fn skeleton(arch: &MaeArch, device: &Device) -> Self {
        let (e, d, l, p) = (arch.embed_dim, arch.decoder_embed_dim, arch.patches(), arch.patch_size);
        let fixed =
            |dim: usize| Param::from_tensor(Tensor::zeros([1, l + 1, dim], device)).set_require_grad(false);
        Mae {
            patch_embed: PatchEmbed {
                proj: PatchProj {
                    weight: Param::from_tensor(Tensor::zeros([e, 3, p, p], device)),
                    bias: Param::from_tensor(Tensor::zeros([e], device)),
                },
            },
            cls_token: Param::from_tensor(Tensor::zeros([1, 1, e], device)),
            pos_embed: fixed(e),
            blocks: (0..arch.depth)
                .map(|_| Block::zeros(e, arch.num_heads, arch.mlp_ratio, device))
                .collect(),
            norm: layer_norm(e, device),
            decoder_embed: TorchLinear::zeros(e, d, device),
            mask_token: Param::from_tensor(Tensor::zeros([1, 1, d], device)),
            decoder_pos_embed: fixed(d),
            decoder_blocks: (0..arch.decoder_depth)
                .map(|_| Block::zeros(d, arch.decoder_num_heads, arch.mlp_ratio, device))
                .collect(),
            decoder_norm: layer_norm(d, device),
            decoder_pred: TorchLinear::zeros(d, arch.patch_values(), device),
            patch: p,
        }
    }

    /// The network of `arch` with the weights of `state` (official names, after `prefix`, e.g.
    /// "model." for a `.pth` that keeps its state dict under "model"). Every tensor must be
    /// there with its shape, and nothing else under the prefix.
    pub fn from_state(arch: &MaeArch, state: &TensorBag, prefix: &str, device: &Device) -> Result<Self> {
        arch.validate()?;
        load_module(Mae::skeleton(arch, device), state, prefix)
    }

    /// The state dict (official names).
    pub fn state(&self) -> TensorBag {
        module_to_bag(self)
    }

    /// Patch embedding: the stride-p convolution as one matrix product over the patches.
    fn embed(&self, x: Tensor<4>) -> Tensor<3> {
        let [n, c, h, w] = x.dims();
        let p = self.patch;
        let (gh, gw) = (h / p, w / p);
        let weight = self.patch_embed.proj.weight.val();
        let e = weight.dims()[0];
        let patches =
            x.reshape([n, c, gh, p, gw, p]).permute([0, 2, 4, 1, 3, 5]).reshape([n * gh * gw, c * p * p]);
        let y = patches.matmul(weight.reshape([e, c * p * p]).transpose())
            + self.patch_embed.proj.bias.val().unsqueeze::<2>();
        y.reshape([n, gh * gw, e])
    }

    /// The encoder on the visible patches of `plan`: `[N, 1 + keep, E]` after the final norm.
    pub fn forward_encoder(&self, x: Tensor<4>, plan: &MaskPlan) -> Tensor<3> {
        let device = x.device();
        let tokens = self.embed(x);
        let [n, l, e] = tokens.dims();
        let pos = self.pos_embed.val();
        let tokens = tokens + pos.clone().narrow(1, 1, l);
        let kept = tokens
            .reshape([n * l, e])
            .select(0, int_tensor(plan.keep_rows(), &device))
            .reshape([n, plan.keep, e]);
        let cls = (self.cls_token.val() + pos.narrow(1, 0, 1)).repeat_dim(0, n);
        let mut x = Tensor::cat(vec![cls, kept], 1);
        for block in &self.blocks {
            x = block.forward(x);
        }
        self.norm.forward(x)
    }

    /// The decoder: `[N, L, p²·3]` predictions for every patch (cls dropped).
    pub fn forward_decoder(&self, latent: Tensor<3>, plan: &MaskPlan) -> Tensor<3> {
        let device = latent.device();
        let x = self.decoder_embed.forward(latent);
        let [n, t, d] = x.dims();
        let l = plan.ids_shuffle.first().map_or(0, Vec::len);
        let kept = x.clone().narrow(1, 1, t - 1);
        let masks = self.mask_token.val().repeat_dim(0, n).repeat_dim(1, l + 1 - t);
        let shuffled = Tensor::cat(vec![kept, masks], 1).reshape([n * l, d]);
        let restored = shuffled.select(0, int_tensor(plan.restore_rows(), &device)).reshape([n, l, d]);
        let mut x = Tensor::cat(vec![x.narrow(1, 0, 1), restored], 1) + self.decoder_pos_embed.val();
        for block in &self.decoder_blocks {
            x = block.forward(x);
        }
        let x = self.decoder_pred.forward(self.decoder_norm.forward(x));
        x.narrow(1, 1, l)
    }

    /// Encoder then decoder: `[N, L, p²·3]` predictions.
    pub fn forward(&self, x: Tensor<4>, plan: &MaskPlan) -> Tensor<3> {
        let latent = self.forward_encoder(x, plan);
        self.forward_decoder(latent, plan)
    }
}

/// The official `patchify`: `[N, 3, H, W]` to `[N, L, p²·3]`, each patch as (row, column,
/// channel).
pub fn patchify(x: Tensor<4>, patch: usize) -> Tensor<3> {
    let [n, c, h, w] = x.dims();
    let (gh, gw) = (h / patch, w / patch);
    x.reshape([n, c, gh, patch, gw, patch]).permute([0, 2, 4, 3, 5, 1]).reshape([
        n,
        gh * gw,
        patch * patch * c,
    ])
}

/// The official `unpatchify` of one image's predictions (`[L, p²·3]` values) to a channel-major
/// `[3, side, side]` image.
pub fn unpatchify(values: &[f32], grid: usize, patch: usize) -> Vec<f32> {
    let side = grid * patch;
    let mut out = vec![0f32; 3 * side * side];
    for gy in 0..grid {
        for gx in 0..grid {
            let base = (gy * grid + gx) * patch * patch * 3;
            for py in 0..patch {
                for px in 0..patch {
                    for c in 0..3 {
                        let v = values[base + (py * patch + px) * 3 + c];
                        out[(c * side + gy * patch + py) * side + gx * patch + px] = v;
                    }
                }
            }
        }
    }
    out
}

/// The official masked loss: per-patch mean squared error, averaged over the removed patches;
/// with `norm_pix` the target patch is normalised by its mean and unbiased variance (+1e-6).
pub fn masked_loss(
    pred: Tensor<3>,
    images: Tensor<4>,
    plan: &MaskPlan,
    patch: usize,
    norm_pix: bool,
) -> Tensor<1> {
    masked_loss_weighted(pred, images, plan, patch, norm_pix, None)
}

/// [`masked_loss`] with a weight per image and patch multiplying the removal mask (0 leaves a
/// patch out, as ignore masks do).
pub fn masked_loss_weighted(
    pred: Tensor<3>,
    images: Tensor<4>,
    plan: &MaskPlan,
    patch: usize,
    norm_pix: bool,
    weights: Option<&[Vec<f32>]>,
) -> Tensor<1> {
    let device = pred.device();
    let mut target = patchify(images, patch);
    if norm_pix {
        let values = target.dims()[2];
        let mean = target.clone().mean_dim(2);
        let centred = target - mean;
        let var = centred.clone().powf_scalar(2.0).sum_dim(2).div_scalar((values - 1) as f64);
        target = centred / var.add_scalar(1e-6).sqrt();
    }
    let per_patch = (pred - target).powf_scalar(2.0).mean_dim(2); // [N, L, 1]
    let mut mask = plan.mask();
    if let Some(weights) = weights {
        for (m, w) in mask.iter_mut().zip(weights) {
            m.iter_mut().zip(w).for_each(|(m, w)| *m *= w);
        }
    }
    let [n, l, _] = per_patch.dims();
    let removed: f32 = mask.iter().flatten().sum();
    let mask = tensor_from_vec(mask.into_iter().flatten().collect(), [n, l, 1], &device);
    // All removed patches ignored: a zero loss (and zero gradients) rather than 0 / 0.
    (per_patch * mask).sum().div_scalar(removed.max(1.0) as f64)
}

/// The official `get_1d_sincos_pos_embed_from_grid`: `[sin(pos·ω), cos(pos·ω)]` with
/// `ω_d = 10000^(−d / (dim/2))`, computed in f64 as numpy does.
fn sincos_1d(dim: usize, positions: &[f64]) -> Vec<Vec<f64>> {
    let half = dim / 2;
    let omega: Vec<f64> = (0..half).map(|d| 1.0 / 10000f64.powf(d as f64 / half as f64)).collect();
    positions
        .iter()
        .map(|&p| {
            let mut row: Vec<f64> = omega.iter().map(|w| (p * w).sin()).collect();
            row.extend(omega.iter().map(|w| (p * w).cos()));
            row
        })
        .collect()
}

/// The official `get_2d_sincos_pos_embed(dim, grid, cls_token=True)` as `[(1 + grid²) · dim]`
/// values: a zero row for the cls token, then per patch (row-major) the 1-D embedding of its
/// column in the first half and of its row in the second (the official meshgrid puts the
/// width coordinate first).
pub fn sincos_2d(dim: usize, grid: usize) -> Vec<f32> {
    let mut columns = Vec::with_capacity(grid * grid);
    let mut rows = Vec::with_capacity(grid * grid);
    for i in 0..grid {
        for j in 0..grid {
            columns.push(j as f64);
            rows.push(i as f64);
        }
    }
    let first = sincos_1d(dim / 2, &columns);
    let second = sincos_1d(dim / 2, &rows);
    let mut out = vec![0f32; dim];
    for (a, b) in first.iter().zip(&second) {
        out.extend(a.iter().chain(b).map(|&v| v as f32));
    }
    out
}

/// The official initialisation, seeded: fixed sin-cos positional embeddings; xavier-uniform
/// linear weights and patch projection (as a `[E, 3p²]` matrix) with zero biases (the patch
/// projection's bias keeps PyTorch's conv default, uniform ±1/√(3p²)); cls and mask tokens
/// N(0, 0.02); LayerNorms weight 1, bias 0.
pub fn init_state(arch: &MaeArch, seed: u64) -> Result<TensorBag> {
    arch.validate()?;
    let skeleton = module_to_bag(&Mae::skeleton(arch, &Device::flex()));
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut bag = TensorBag::new();
    let normal = |rng: &mut ChaCha8Rng, std: f32| {
        // Box-Muller.
        let u1: f32 = rng.gen_range(f32::MIN_POSITIVE..1.0);
        let u2: f32 = rng.gen();
        std * (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
    };
    // BTreeMap order: deterministic.
    for name in skeleton.names() {
        let shape = skeleton.shape(name)?.to_vec();
        let len: usize = shape.iter().product();
        let values: Vec<f32> = if name == "pos_embed" {
            sincos_2d(arch.embed_dim, arch.grid())
        } else if name == "decoder_pos_embed" {
            sincos_2d(arch.decoder_embed_dim, arch.grid())
        } else if name == "cls_token" || name == "mask_token" {
            (0..len).map(|_| normal(&mut rng, 0.02)).collect()
        } else if name == "patch_embed.proj.bias" {
            let bound = 1.0 / ((3 * arch.patch_size * arch.patch_size) as f32).sqrt();
            (0..len).map(|_| rng.gen_range(-bound..bound)).collect()
        } else if name.ends_with(".weight") && shape.len() >= 2 {
            let fan_out = shape[0];
            let fan_in = len / fan_out;
            let bound = (6.0 / (fan_in + fan_out) as f32).sqrt();
            (0..len).map(|_| rng.gen_range(-bound..bound)).collect()
        } else if name.ends_with(".weight") {
            vec![1.0; len]
        } else {
            vec![0.0; len]
        };
        bag.put_f32(name, &shape, values);
    }
    Ok(bag)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> MaeArch {
        MaeArch {
            image_size: 16,
            patch_size: 4,
            embed_dim: 16,
            depth: 2,
            num_heads: 2,
            decoder_embed_dim: 8,
            decoder_depth: 1,
            decoder_num_heads: 2,
            mlp_ratio: 4,
        }
    }

    #[test]
    fn state_has_the_official_names_and_round_trips() {
        let arch = tiny();
        let state = init_state(&arch, 3).unwrap();
        for name in [
            "patch_embed.proj.weight",
            "cls_token",
            "pos_embed",
            "blocks.1.attn.qkv.weight",
            "blocks.0.mlp.fc2.bias",
            "blocks.0.norm1.weight",
            "norm.bias",
            "decoder_embed.weight",
            "mask_token",
            "decoder_pos_embed",
            "decoder_blocks.0.attn.proj.weight",
            "decoder_norm.weight",
            "decoder_pred.bias",
        ] {
            assert!(state.shape(name).is_ok(), "{name} missing: {:?}", state.names().collect::<Vec<_>>());
        }
        assert_eq!(state.shape("blocks.0.attn.qkv.weight").unwrap(), &[48, 16]);
        assert_eq!(state.shape("decoder_pred.weight").unwrap(), &[48, 8]);
        let mae = Mae::from_state(&arch, &state, "", &Device::flex()).unwrap();
        assert_eq!(mae.state(), state);
        let mut extra = state.clone();
        extra.put_f32("blocks.2.norm1.weight", &[16], vec![1.0; 16]);
        let error = Mae::from_state(&arch, &extra, "", &Device::flex()).unwrap_err().to_string();
        assert!(error.contains("blocks.2.norm1.weight"), "{error}");
    }

    #[test]
    fn sincos_matches_its_definition() {
        let pe = sincos_2d(8, 3);
        assert_eq!(pe.len(), 8 * 10);
        assert!(pe[..8].iter().all(|&v| v == 0.0), "the cls row is zero");
        // Patch (row 2, column 1): first half encodes the column 1, second the row 2.
        let row = &pe[8 * (1 + 2 * 3 + 1)..8 * (1 + 2 * 3 + 2)];
        let expect = [1f64.sin(), (0.01f64).sin(), 1f64.cos(), 0.01f64.cos()];
        for (a, b) in row[..4].iter().zip(expect) {
            assert!((*a as f64 - b).abs() < 1e-7, "{row:?}");
        }
        assert!((row[4] as f64 - 2f64.sin()).abs() < 1e-7 && (row[6] as f64 - 2f64.cos()).abs() < 1e-7);
    }

    #[test]
    fn masking_plans_restore_every_patch() {
        let noise = vec![vec![0.5, 0.1, 0.9, 0.3]];
        let plan = MaskPlan::from_noise(&noise, 0.5);
        assert_eq!(plan.ids_shuffle, vec![vec![1, 3, 0, 2]]);
        assert_eq!(plan.mask(), vec![vec![1.0, 0.0, 1.0, 0.0]]);
        assert_eq!(plan.keep_rows(), vec![1, 3]);
        // (kept 1, kept 3, mask, mask): patch 0 takes position 2, 1 position 0, ...
        assert_eq!(plan.restore_rows(), vec![2, 0, 3, 1]);
        let removed = MaskPlan::from_removed(&[true, false, false, true], 2);
        assert_eq!(removed.ids_shuffle, vec![vec![1, 2, 0, 3]; 2]);
        assert_eq!(removed.keep_rows(), vec![1, 2, 5, 6]);
    }

    #[test]
    fn patchify_and_unpatchify_are_inverse() {
        let device = Device::flex();
        let values: Vec<f32> = (0..3 * 8 * 8).map(|v| v as f32).collect();
        let x = tensor_from_vec(values.clone(), [1, 3, 8, 8], &device);
        let patches = vigil_nn::tensor_to_vec(patchify(x, 4));
        assert_eq!(patches[..3], [0.0, 64.0, 128.0]);
        assert_eq!(unpatchify(&patches, 2, 4), values);
    }
}
