//! The guided-diffusion U-Net as DDAD builds it (arimousa/DDAD `unet.py`, itself adapted from
//! openai/guided-diffusion): GroupNorm(32) + SiLU, residual blocks that add a projection of the
//! sinusoidal time embedding, 1-D multi-head qkv self-attention at the chosen resolutions and in
//! the middle, residual blocks that resample (BigGAN up/down: average pooling down, nearest
//! up-sampling up), and zero-initialised output convolutions.
//!
//! The burn modules use descriptive field names; [`UNet::state_dict`] and
//! [`UNet::load_state_dict`] translate them to and from the PyTorch `state_dict` names of
//! `UNetModel` (`down.3.0.in_layers.2.weight`, `middle.1.to_qkv.weight`, `out.2.bias`, ...), so the
//! official checkpoints load as they are (a `module.` prefix from `DataParallel` is accepted).

use std::path::Path;

use burn::module::{Module, ModuleMapper, Param};
use burn::nn::conv::{Conv1d, Conv1dConfig, Conv2d, Conv2dConfig};
use burn::nn::{GroupNorm, GroupNormConfig, PaddingConfig2d};
use burn::tensor::activation::silu;
use burn::tensor::{Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use vigil_core::{Result, TensorBag, VigilError};
use vigil_nn::kernels::{self, avg_pool2, conv1d, conv2d, group_norm_silu, scaled_softmax};
use vigil_nn::{load_module, module_to_bag, tensor_from_vec};

/// GroupNorm32 in `unet.py`: 32 groups everywhere, so every width must be a multiple of 32.
const GROUPS: usize = 32;

/// The shape of a U-Net. Field meanings follow `UNetModel.__init__`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UNetSettings {
    /// Side of the square input in pixels.
    pub image_size: usize,
    /// Input (and predicted-noise) channels: 3 in DDAD.
    pub in_channels: usize,
    /// Width of the first level; the time embedding is 4x this.
    pub base_channels: usize,
    /// Width multiplier of each level; every level but the last halves the resolution.
    pub channel_mults: Vec<usize>,
    /// Residual blocks per level on the way down (one more per level on the way up).
    pub num_res_blocks: usize,
    /// Attention heads (the channels are split evenly among them).
    pub heads: usize,
    /// Dropout before the second convolution of every residual block (training only).
    pub dropout: f64,
    /// Side lengths (pixels of the feature map at that level, as DDAD's "32,16,8") where the
    /// residual blocks are followed by self-attention: attention sits where the downsampling
    /// factor equals `image_size / resolution`, exactly as `unet.py` computes `attention_ds`.
    pub attention_resolutions: Vec<usize>,
}

impl UNetSettings {
    /// DDAD's network at 256 px (`main.py::build_model`: base 64, 4 heads, no dropout, the
    /// `unet.py` multipliers for 256, attention at 32, 16 and 8 px).
    pub fn ddad() -> Self {
        UNetSettings {
            image_size: 256,
            in_channels: 3,
            base_channels: 64,
            channel_mults: vec![1, 1, 2, 2, 4, 4],
            num_res_blocks: 2,
            heads: 4,
            dropout: 0.0,
            attention_resolutions: vec![32, 16, 8],
        }
    }

    /// DDAD-S: base 32, dropout 0.3, 2 heads, otherwise as [`UNetSettings::ddad`].
    pub fn ddad_s() -> Self {
        UNetSettings { base_channels: 32, heads: 2, dropout: 0.3, ..Self::ddad() }
    }

    /// A network that trains on one PIPED class on two CPU cores in minutes: 64 px, widths
    /// 32-32-64-64, one residual block per level, attention at 16 and 8 px and in the middle.
    pub fn cpu() -> Self {
        UNetSettings {
            image_size: 64,
            in_channels: 3,
            base_channels: 32,
            channel_mults: vec![1, 1, 2, 2],
            num_res_blocks: 1,
            heads: 2,
            dropout: 0.0,
            attention_resolutions: vec![16, 8],
        }
    }

    /// The preset of that name: `ddad`, `ddad-s` or `cpu`.
    pub fn preset(name: &str) -> Result<Self> {
        match name {
            "ddad" => Ok(Self::ddad()),
            "ddad-s" => Ok(Self::ddad_s()),
            "cpu" => Ok(Self::cpu()),
            other => {
                Err(VigilError::Config(format!("unknown U-Net preset '{other}' (known: ddad, ddad-s, cpu)")))
            }
        }
    }

    /// Downsampling factors with attention (`attention_ds` in `unet.py`).
    fn attention_factors(&self) -> Vec<usize> {
        self.attention_resolutions.iter().map(|&r| self.image_size / r).collect()
    }

    /// Checks everything the constructor relies on, with messages that name the setting.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(VigilError::Config(format!("U-Net: {m}")));
        if self.in_channels == 0 || self.base_channels == 0 || self.num_res_blocks == 0 || self.heads == 0 {
            return bad("in_channels, base_channels, num_res_blocks and heads must be at least 1".into());
        }
        if self.channel_mults.is_empty() || self.channel_mults.contains(&0) {
            return bad(format!(
                "channel_mults {:?} must be a non-empty list of positive numbers",
                self.channel_mults
            ));
        }
        for &m in &self.channel_mults {
            let width = self.base_channels * m;
            if !width.is_multiple_of(GROUPS) {
                return bad(format!(
                    "width {width} (base_channels {} x multiplier {m}) is not a multiple of {GROUPS}, \
                     which GroupNorm(32) needs",
                    self.base_channels
                ));
            }
            if !width.is_multiple_of(self.heads) {
                return bad(format!("width {width} cannot be split among {} attention heads", self.heads));
            }
        }
        let downsampling = 1usize << (self.channel_mults.len() - 1);
        if self.image_size == 0 || !self.image_size.is_multiple_of(downsampling) {
            return bad(format!(
                "image_size {} must be a positive multiple of {downsampling} ({} levels halve it {} times)",
                self.image_size,
                self.channel_mults.len(),
                self.channel_mults.len() - 1
            ));
        }
        for &r in &self.attention_resolutions {
            if r == 0 || !self.image_size.is_multiple_of(r) {
                return bad(format!(
                    "attention resolution {r} does not divide image_size {}",
                    self.image_size
                ));
            }
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return bad(format!("dropout {} must be in [0, 1)", self.dropout));
        }
        Ok(())
    }
}

/// Bernoulli masks for dropout drawn from a seeded generator, so a training step is a pure
/// function of its seed (burn's own dropout draws from a process-wide generator).
pub struct DropoutNoise {
    rng: ChaCha8Rng,
}

impl DropoutNoise {
    pub fn new(rng: ChaCha8Rng) -> Self {
        DropoutNoise { rng }
    }

    /// Zero each value with probability `p`, scale the rest by `1 / (1 - p)` (PyTorch's dropout).
    fn apply(&mut self, x: Tensor<4>, p: f64) -> Tensor<4> {
        let dims = x.dims();
        let keep = 1.0 - p;
        let scale = (1.0 / keep) as f32;
        let mask: Vec<f32> = (0..dims.iter().product::<usize>())
            .map(|_| if self.rng.gen::<f64>() < keep { scale } else { 0.0 })
            .collect();
        let mask = tensor_from_vec(mask, dims, &x.device());
        x * mask
    }
}

/// A linear layer with PyTorch's weight layout `[out, in]` (burn's `Linear` stores `[in, out]`),
/// so its weights load without transposition.
#[derive(Module, Debug)]
pub struct Linear {
    pub weight: Param<Tensor<2>>,
    pub bias: Param<Tensor<1>>,
}

impl Linear {
    fn new(inputs: usize, outputs: usize, device: &Device) -> Self {
        Linear {
            weight: Param::from_tensor(Tensor::zeros([outputs, inputs], device)),
            bias: Param::from_tensor(Tensor::zeros([outputs], device)),
        }
    }

    fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        x.matmul(self.weight.val().transpose()) + self.bias.val().unsqueeze_dim::<2>(0)
    }
}

/// `time_embedding`: the sinusoidal embedding of the timestep, Linear, SiLU, Linear.
#[derive(Module, Debug)]
pub struct TimeEmbedding {
    pub linear_in: Linear,
    pub linear_out: Linear,
    pub channels: usize,
}

impl TimeEmbedding {
    /// `PositionalEmbedding(dim)`: `[sin(t f_i), cos(t f_i)]` with `f_i = exp(-i ln(10000) / (dim/2))`.
    /// Computed in f32 as PyTorch does: for t near 1000 the argument's rounding is larger than the
    /// golden test's tolerance, so the order of operations matters.
    pub fn sinusoid(t: &[f32], dim: usize) -> Vec<f32> {
        let half = dim / 2;
        let step = ((10000f64).ln() / half as f64) as f32;
        let freqs: Vec<f32> = (0..half).map(|i| (i as f32 * -step).exp()).collect();
        let mut out = Vec::with_capacity(t.len() * dim);
        for &ti in t {
            out.extend(freqs.iter().map(|&f| (ti * f).sin()));
            out.extend(freqs.iter().map(|&f| (ti * f).cos()));
        }
        out
    }

    fn forward(&self, t: &[f32], device: &Device) -> Tensor<2> {
        let emb = tensor_from_vec(Self::sinusoid(t, self.channels), [t.len(), self.channels], device);
        self.linear_out.forward(silu(self.linear_in.forward(emb)))
    }
}

fn conv3x3(cin: usize, cout: usize, device: &Device) -> Conv2d {
    Conv2dConfig::new([cin, cout], [3, 3]).with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1)).init(device)
}

fn group_norm(channels: usize, device: &Device) -> GroupNorm {
    GroupNormConfig::new(GROUPS, channels).init(device)
}

/// `ResBlock`: GroupNorm, SiLU, (resample), conv; plus the projected time embedding; GroupNorm,
/// SiLU, dropout, zero-initialised conv; plus the (1x1-projected when widths differ) input.
#[derive(Module, Debug)]
pub struct ResBlock {
    pub in_norm: GroupNorm,
    pub in_conv: Conv2d,
    pub embed: Linear,
    pub out_norm: GroupNorm,
    pub out_conv: Conv2d,
    pub skip_connection: Option<Conv2d>,
    pub up: bool,
    pub down: bool,
    pub dropout: f64,
}

impl ResBlock {
    fn new(cin: usize, cout: usize, emb: usize, dropout: f64, up: bool, down: bool, device: &Device) -> Self {
        ResBlock {
            in_norm: group_norm(cin, device),
            in_conv: conv3x3(cin, cout, device),
            embed: Linear::new(emb, cout, device),
            out_norm: group_norm(cout, device),
            out_conv: conv3x3(cout, cout, device),
            skip_connection: (cin != cout).then(|| Conv2dConfig::new([cin, cout], [1, 1]).init(device)),
            up,
            down,
            dropout,
        }
    }

    /// `emb_act` is SiLU(time embedding): `embed_layers` starts with a SiLU that every block
    /// would apply to the same tensor, so the U-Net applies it once.
    fn forward(&self, x: Tensor<4>, emb_act: &Tensor<2>, dropout: Option<&mut DropoutNoise>) -> Tensor<4> {
        let h = group_norm_silu(&self.in_norm, x.clone());
        // Nearest-neighbour up-sampling by 2 (`F.interpolate(scale_factor=2, mode="nearest")`)
        // or 2x2 average pooling with stride 2 (`Downsample(use_conv=False)`).
        let (h, x) = if self.up {
            (kernels::upsample_nearest2(h), kernels::upsample_nearest2(x))
        } else if self.down {
            (avg_pool2(h), avg_pool2(x))
        } else {
            (h, x)
        };
        let h = conv2d(&self.in_conv, h);
        let [b, c, _, _] = h.dims();
        let h = h + self.embed.forward(emb_act.clone()).reshape([b, c, 1, 1]);
        let mut h = group_norm_silu(&self.out_norm, h);
        if let Some(noise) = dropout.filter(|_| self.dropout > 0.0) {
            h = noise.apply(h, self.dropout);
        }
        let h = conv2d(&self.out_conv, h);
        match &self.skip_connection {
            Some(conv) => conv2d(conv, x) + h,
            None => x + h,
        }
    }
}

/// `AttentionBlock` with the legacy `QKVAttention` head layout: the qkv channels are split into
/// heads first, and each head's block holds its q, k and v in that order.
#[derive(Module, Debug)]
pub struct AttentionBlock {
    pub norm: GroupNorm,
    pub to_qkv: Conv1d,
    pub proj_out: Conv1d,
    pub heads: usize,
}

impl AttentionBlock {
    fn new(channels: usize, heads: usize, device: &Device) -> Self {
        AttentionBlock {
            norm: group_norm(channels, device),
            to_qkv: Conv1dConfig::new(channels, 3 * channels, 1).init(device),
            proj_out: Conv1dConfig::new(channels, channels, 1).init(device),
            heads,
        }
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let [b, c, height, width] = x.dims();
        let length = height * width;
        let x = x.reshape([b, c, length]);
        let qkv = conv1d(&self.to_qkv, kernels::group_norm(&self.norm, x.clone()));
        let ch = c / self.heads;
        let qkv = qkv.reshape([b * self.heads, 3 * ch, length]);
        let q = qkv.clone().narrow(1, 0, ch);
        let k = qkv.clone().narrow(1, ch, ch);
        let v = qkv.narrow(1, 2 * ch, ch);
        // weight[t, s] = sum_c q[c, t] k[c, s] / sqrt(ch); softmax over s;
        // a[c, t] = sum_s weight[t, s] v[c, s]. The reference scales q and k by ch^(-1/4) each
        // (steadier in half precision); in f32 scaling the product inside the softmax kernel
        // is the same to rounding and saves two passes.
        let weight = scaled_softmax(q.swap_dims(1, 2).matmul(k), 1.0 / (ch as f64).sqrt());
        let attended = v.matmul(weight.swap_dims(1, 2)).reshape([b, c, length]);
        (x + conv1d(&self.proj_out, attended)).reshape([b, c, height, width])
    }
}

/// One `TimestepEmbedSequential` of `down` or `up`: the layers present, in this order.
#[derive(Module, Debug)]
pub struct Stage {
    /// The input convolution (`down.0` only).
    pub conv: Option<Conv2d>,
    pub res: Option<ResBlock>,
    pub attention: Option<AttentionBlock>,
    /// The resampling residual block ending a level (BigGAN up/down).
    pub resample: Option<ResBlock>,
}

impl Stage {
    fn forward(
        &self,
        mut h: Tensor<4>,
        emb_act: &Tensor<2>,
        mut dropout: Option<&mut DropoutNoise>,
    ) -> Tensor<4> {
        if let Some(conv) = &self.conv {
            h = conv2d(conv, h);
        }
        if let Some(res) = &self.res {
            h = res.forward(h, emb_act, dropout.as_deref_mut());
        }
        if let Some(attention) = &self.attention {
            h = attention.forward(h);
        }
        if let Some(resample) = &self.resample {
            h = resample.forward(h, emb_act, dropout);
        }
        h
    }

    /// The index in the PyTorch `TimestepEmbedSequential` of the layer held in `field`.
    fn torch_index(&self, field: &str) -> Option<usize> {
        let present = [
            ("conv", self.conv.is_some()),
            ("res", self.res.is_some()),
            ("attention", self.attention.is_some()),
            ("resample", self.resample.is_some()),
        ];
        present.iter().filter(|entry| entry.1).position(|entry| entry.0 == field)
    }
}

/// `middle`: residual block, attention, residual block.
#[derive(Module, Debug)]
pub struct Middle {
    pub res_in: ResBlock,
    pub attention: AttentionBlock,
    pub res_out: ResBlock,
}

/// `UNetModel` (see the module documentation).
#[derive(Module, Debug)]
pub struct UNet {
    pub time_embedding: TimeEmbedding,
    pub down: Vec<Stage>,
    pub middle: Middle,
    pub up: Vec<Stage>,
    pub out_norm: GroupNorm,
    pub out_conv: Conv2d,
}

impl UNet {
    /// The network of `settings` with every weight zero and every GroupNorm at (1, 0); see
    /// [`UNet::init`] for the reference initialisation.
    pub fn new(settings: &UNetSettings, device: &Device) -> Result<Self> {
        settings.validate()?;
        let s = settings;
        let emb = 4 * s.base_channels;
        let attention_at = s.attention_factors();
        let res = |cin, cout| ResBlock::new(cin, cout, emb, s.dropout, false, false, device);
        let attention = |ds: usize, ch: usize| {
            attention_at.contains(&ds).then(|| AttentionBlock::new(ch, s.heads, device))
        };
        let mut ch = s.base_channels * s.channel_mults[0];
        let mut down = vec![Stage {
            conv: Some(conv3x3(s.in_channels, ch, device)),
            res: None,
            attention: None,
            resample: None,
        }];
        let mut skip_widths = vec![ch];
        let mut ds = 1;
        for (level, &mult) in s.channel_mults.iter().enumerate() {
            for _ in 0..s.num_res_blocks {
                let out = s.base_channels * mult;
                down.push(Stage {
                    conv: None,
                    res: Some(res(ch, out)),
                    attention: attention(ds, out),
                    resample: None,
                });
                ch = out;
                skip_widths.push(ch);
            }
            if level + 1 != s.channel_mults.len() {
                let resample = ResBlock::new(ch, ch, emb, s.dropout, false, true, device);
                down.push(Stage { conv: None, res: None, attention: None, resample: Some(resample) });
                ds *= 2;
                skip_widths.push(ch);
            }
        }
        let middle = Middle {
            res_in: res(ch, ch),
            attention: AttentionBlock::new(ch, s.heads, device),
            res_out: res(ch, ch),
        };
        let mut up = Vec::new();
        for (level, &mult) in s.channel_mults.iter().enumerate().rev() {
            for j in 0..=s.num_res_blocks {
                let skip = skip_widths.pop().expect("one skip per down stage");
                let out = s.base_channels * mult;
                let block = res(ch + skip, out);
                ch = out;
                let block_attention = attention(ds, ch);
                let resample = (level > 0 && j == s.num_res_blocks)
                    .then(|| ResBlock::new(ch, ch, emb, s.dropout, true, false, device));
                if resample.is_some() {
                    ds /= 2;
                }
                up.push(Stage { conv: None, res: Some(block), attention: block_attention, resample });
            }
        }
        Ok(UNet {
            time_embedding: TimeEmbedding {
                linear_in: Linear::new(s.base_channels, emb, device),
                linear_out: Linear::new(emb, emb, device),
                channels: s.base_channels,
            },
            down,
            middle,
            up,
            out_norm: group_norm(ch, device),
            out_conv: conv3x3(ch, s.in_channels, device),
        })
    }

    /// The network with the reference initialisation, drawn from `seed` (values depend only on
    /// the seed and each parameter's name): PyTorch's default for convolutions and linear layers
    /// (weights and biases uniform in ±1/sqrt(fan_in)), GroupNorm (1, 0), and zeros for the
    /// convolutions `unet.py` passes through `zero_module` (each residual block's last
    /// convolution, the attention output projection and the final convolution).
    pub fn init(settings: &UNetSettings, seed: u64, device: &Device) -> Result<Self> {
        let net = UNet::new(settings, device)?;
        Ok(vigil_nn::stable_param_ids(net.map(&mut ReferenceInit { path: Vec::new(), seed, fan_in: 0 })))
    }

    /// Predicted noise for a batch `x` `[n, C, S, S]` at timesteps `t` (one per image; the
    /// reference passes the integer timestep as a float). `dropout` is the mask source during
    /// training; `None` runs without dropout (inference, or a network without it).
    pub fn forward(&self, x: Tensor<4>, t: &[f32], mut dropout: Option<&mut DropoutNoise>) -> Tensor<4> {
        assert_eq!(x.dims()[0], t.len(), "one timestep per image");
        let emb_act = silu(self.time_embedding.forward(t, &x.device()));
        let mut skips = Vec::with_capacity(self.down.len());
        let mut h = x;
        for stage in &self.down {
            h = stage.forward(h, &emb_act, dropout.as_deref_mut());
            skips.push(h.clone());
        }
        h = self.middle.res_in.forward(h, &emb_act, dropout.as_deref_mut());
        h = self.middle.attention.forward(h);
        h = self.middle.res_out.forward(h, &emb_act, dropout.as_deref_mut());
        for stage in &self.up {
            let skip = skips.pop().expect("one skip per down stage");
            h = stage.forward(Tensor::cat(vec![h, skip], 1), &emb_act, dropout.as_deref_mut());
        }
        conv2d(&self.out_conv, group_norm_silu(&self.out_norm, h))
    }

    /// The PyTorch `state_dict` name of a parameter named `burn_name` by [`module_to_bag`].
    fn torch_name(&self, burn_name: &str) -> Option<String> {
        let parts: Vec<&str> = burn_name.split('.').collect();
        let rest = |from: usize| parts[from..].join(".");
        let res_block = |from: usize| -> Option<String> {
            let inner = match *parts.get(from)? {
                "in_norm" => "in_layers.0",
                "in_conv" => "in_layers.2",
                "embed" => "embed_layers.1",
                "out_norm" => "out_layers.0",
                "out_conv" => "out_layers.3",
                "skip_connection" => "skip_connection",
                _ => return None,
            };
            Some(format!("{inner}.{}", rest(from + 1)))
        };
        match *parts.first()? {
            "time_embedding" => {
                let index = match *parts.get(1)? {
                    "linear_in" => 1,
                    "linear_out" => 3,
                    _ => return None,
                };
                Some(format!("time_embedding.{index}.{}", rest(2)))
            }
            "out_norm" => Some(format!("out.0.{}", rest(1))),
            "out_conv" => Some(format!("out.2.{}", rest(1))),
            "middle" => match *parts.get(1)? {
                "res_in" => Some(format!("middle.0.{}", res_block(2)?)),
                "attention" => Some(format!("middle.1.{}", rest(2))),
                "res_out" => Some(format!("middle.2.{}", res_block(2)?)),
                _ => None,
            },
            side @ ("down" | "up") => {
                let k: usize = parts.get(1)?.parse().ok()?;
                let stage = if side == "down" { self.down.get(k)? } else { self.up.get(k)? };
                let field = *parts.get(2)?;
                let index = stage.torch_index(field)?;
                let inner = match field {
                    "res" | "resample" => res_block(3)?,
                    _ => rest(3),
                };
                Some(format!("{side}.{k}.{index}.{inner}"))
            }
            _ => None,
        }
    }

    /// Every parameter under its PyTorch `state_dict` name.
    pub fn state_dict(&self) -> TensorBag {
        let burn_bag = module_to_bag(self);
        let mut bag = TensorBag::new();
        for name in burn_bag.names() {
            let torch = self.torch_name(name).expect("every U-Net parameter has a PyTorch name");
            let shape = burn_bag.shape(name).expect("listed name").to_vec();
            bag.put_f32(&torch, &shape, burn_bag.f32(name, None).expect("listed name"));
        }
        bag
    }

    /// Load weights named as PyTorch's `state_dict` of `UNetModel` (optionally all prefixed
    /// `module.`, as `DataParallel` saves them). A missing tensor, a shape mismatch or a tensor
    /// this network has no place for is an error naming the tensor.
    pub fn load_state_dict(self, state: &TensorBag) -> Result<Self> {
        let prefix = if state.names().next().is_some() && state.names().all(|n| n.starts_with("module.")) {
            "module."
        } else {
            ""
        };
        let mut used = std::collections::BTreeSet::new();
        let mut translated = TensorBag::new();
        let own = module_to_bag(&self);
        for name in own.names() {
            let torch = format!(
                "{prefix}{}",
                self.torch_name(name).expect("every U-Net parameter has a PyTorch name")
            );
            let shape = own.shape(name).expect("listed name").to_vec();
            translated.put_f32(name, &shape, state.f32(&torch, Some(&shape))?);
            used.insert(torch);
        }
        if let Some(extra) = state.names().find(|n| !used.contains(*n)) {
            return Err(VigilError::Model(format!(
                "tensor '{extra}' has no place in this U-Net (the settings and the weights disagree)"
            )));
        }
        load_module(self, &translated, "")
    }

    /// Load a `.safetensors` or PyTorch (`.pth`, `.pt`, `.bin`, `.ckpt`) state dict from disk.
    pub fn load_file(self, path: &Path) -> Result<Self> {
        let state = vigil_backbones::read_state(path)?;
        self.load_state_dict(&state).map_err(|e| VigilError::file(path, e.to_string()))
    }
}

/// The reference initialisation (see [`UNet::init`]). Relies on burn visiting a layer's weight
/// before its bias, which holds for Conv1d, Conv2d and [`Linear`].
struct ReferenceInit {
    path: Vec<String>,
    seed: u64,
    /// Fan-in of the last weight seen: the bias that follows belongs to the same layer.
    fan_in: usize,
}

/// FNV-1a of a parameter path: a per-parameter stream that does not depend on visiting order.
fn path_hash(path: &str) -> u64 {
    path.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}

impl ModuleMapper for ReferenceInit {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }
    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let leaf = self.path.last().map(String::as_str).unwrap_or("");
        let layer = self.path.len().checked_sub(2).map(|i| self.path[i].as_str()).unwrap_or("");
        let current = param.val();
        let dims = current.dims();
        let n: usize = dims.iter().product();
        let bound = match (leaf, D) {
            ("weight", d) if d >= 2 => {
                self.fan_in = dims[1..].iter().product();
                1.0 / (self.fan_in as f64).sqrt()
            }
            ("bias", 1) => 1.0 / (self.fan_in.max(1) as f64).sqrt(),
            // GroupNorm's gamma and beta keep their constructor values (1 and 0).
            _ => return param,
        };
        let values = if layer == "out_conv" || layer == "proj_out" {
            vec![0.0; n]
        } else {
            let mut rng = ChaCha8Rng::seed_from_u64(self.seed ^ path_hash(&self.path.join(".")));
            (0..n).map(|_| rng.gen_range(-bound..bound) as f32).collect()
        };
        let id = param.id;
        param.transform_for_load(tensor_from_vec(values, dims, &current.device()), id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_validate_and_bad_settings_are_named() {
        for name in ["ddad", "ddad-s", "cpu"] {
            UNetSettings::preset(name).unwrap().validate().unwrap();
        }
        assert!(UNetSettings::preset("large").unwrap_err().to_string().contains("large"));
        let narrow = UNetSettings { base_channels: 16, ..UNetSettings::cpu() };
        assert!(narrow.validate().unwrap_err().to_string().contains("GroupNorm"));
        let odd = UNetSettings { image_size: 60, ..UNetSettings::cpu() };
        assert!(odd.validate().unwrap_err().to_string().contains("image_size 60"));
        let heads = UNetSettings { heads: 3, ..UNetSettings::cpu() };
        assert!(heads.validate().unwrap_err().to_string().contains("3 attention heads"));
    }

    #[test]
    fn official_layout_and_parameter_count() {
        // DDAD's network: parameter names and count as `UNetModel(256, 64, n_heads=4, in_channels=3)`
        // (shapes are read without allocating the weights).
        let device = Device::flex();
        let net = UNet::new(&UNetSettings::ddad(), &device).unwrap();
        // 6 levels: input conv + 2 blocks per level + 5 downsampling blocks = 18 down stages;
        // 3 blocks per level on the way up.
        assert_eq!((net.down.len(), net.up.len()), (18, 18));
        // Attention after the blocks at 32, 16 and 8 px (levels 3, 4, 5) only.
        let with_attention: Vec<usize> =
            net.down.iter().enumerate().filter(|(_, s)| s.attention.is_some()).map(|(i, _)| i).collect();
        assert_eq!(with_attention, vec![10, 11, 13, 14, 16, 17]);
        assert_eq!(net.torch_name("down.0.conv.weight").unwrap(), "down.0.0.weight");
        assert_eq!(net.torch_name("down.10.attention.to_qkv.weight").unwrap(), "down.10.1.to_qkv.weight");
        assert_eq!(net.torch_name("down.3.resample.in_conv.bias").unwrap(), "down.3.0.in_layers.2.bias");
        assert_eq!(net.torch_name("up.2.resample.out_conv.weight").unwrap(), "up.2.2.out_layers.3.weight");
        assert_eq!(net.torch_name("up.17.res.embed.weight").unwrap(), "up.17.0.embed_layers.1.weight");
        assert_eq!(net.torch_name("middle.res_out.out_norm.weight").unwrap(), "middle.2.out_layers.0.weight");
        assert_eq!(net.torch_name("time_embedding.linear_out.bias").unwrap(), "time_embedding.3.bias");
        assert_eq!(net.torch_name("out_conv.weight").unwrap(), "out.2.weight");
        // The up path's first block sees the deepest width (256) twice: 512 inputs, a 1x1 skip.
        let first_up = net.up[0].res.as_ref().unwrap();
        assert_eq!(first_up.in_conv.weight.lazy_shape().dims::<4>(), [256, 512, 3, 3]);
        assert!(first_up.skip_connection.is_some());
        // Parameter counts of the official networks (printed by make_golden_unet.py --official).
        assert_eq!(net.num_params(), 32_952_707);
        assert_eq!(UNet::new(&UNetSettings::ddad_s(), &device).unwrap().num_params(), 8_257_731);
    }

    #[test]
    fn reference_init_zeroes_the_output_convolutions() {
        let device = Device::flex();
        let net = UNet::init(&UNetSettings::cpu(), 5, &device).unwrap();
        let state = net.state_dict();
        let all_zero = |name: &str| state.f32(name, None).unwrap().iter().all(|&v| v == 0.0);
        assert!(all_zero("out.2.weight") && all_zero("out.2.bias"));
        assert!(all_zero("down.1.0.out_layers.3.weight") && all_zero("middle.1.proj_out.weight"));
        let w = state.f32("down.1.0.in_layers.2.weight", None).unwrap();
        let bound = 1.0 / ((32 * 9) as f32).sqrt();
        assert!(w.iter().all(|v| v.abs() <= bound) && w.iter().any(|v| v.abs() > 0.5 * bound));
        let b = state.f32("down.1.0.in_layers.2.bias", None).unwrap();
        assert!(b.iter().all(|v| v.abs() <= bound) && b.iter().any(|&v| v != 0.0));
        assert!(state.f32("down.1.0.in_layers.0.weight", None).unwrap().iter().all(|&v| v == 1.0));
        // A zero output convolution predicts zero noise everywhere.
        let y = net.forward(Tensor::ones([1, 3, 64, 64], &device), &[10.0], None);
        assert!(vigil_nn::tensor_to_vec(y).iter().all(|&v| v == 0.0));
        // Same seed, same weights; another seed, others.
        assert_eq!(UNet::init(&UNetSettings::cpu(), 5, &device).unwrap().state_dict(), state);
        assert_ne!(UNet::init(&UNetSettings::cpu(), 6, &device).unwrap().state_dict(), state);
    }
}
