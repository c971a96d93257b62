//! What Reverse Distillation trains: the one-class bottleneck embedding (OCBE, anomalib
//! `components/bottleneck.py` with basic blocks) and the reversed ResNet decoder
//! (`resnet_decoder.py`'s `DecoderBasicBlock`), sized by the encoder's three taps.
//!
//! With ResNet-18's taps (64, 128, 256 channels) the two are exactly anomalib's
//! `get_bottleneck_layer("resnet18")` and `de_resnet18` (up to their unused `conv4`/`bn4` and
//! `layer4`); with other encoders the same structure takes the encoder's channel counts: the
//! bottleneck fuses the three taps at stride 16 into 3·c3 channels and compresses them to 2·c3
//! at stride 32, and the decoder climbs back through c3, c2, c1.

use burn::module::{Module, Param};
use burn::nn::conv::{Conv2d, Conv2dConfig, ConvTranspose2d, ConvTranspose2dConfig};
use burn::nn::{BatchNorm, BatchNormConfig, Initializer, PaddingConfig2d};
use burn::tensor::activation::relu;
use burn::tensor::{Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use vigil_core::{Result, TensorBag};
use vigil_nn::kernels::{batch_norm_act, conv2d, conv_transpose2d};
use vigil_nn::{load_module, module_to_bag, tensor_from_vec};

/// Residual blocks per bottleneck stage and per decoder stage (anomalib: 2 for ResNet-18).
const BLOCKS: usize = 2;

/// Kaiming normal, fan-out mode (`nn.init.kaiming_normal_(mode="fan_out", nonlinearity="relu")`).
fn kaiming_normal(rng: &mut ChaCha8Rng, shape: [usize; 4]) -> Vec<f32> {
    let std = (2.0 / (shape[0] * shape[2] * shape[3]) as f64).sqrt();
    (0..shape.iter().product())
        .map(|_| {
            let u: f64 = 1.0 - rng.gen::<f64>();
            let v: f64 = rng.gen();
            (std * (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
        })
        .collect()
}

fn conv(
    rng: &mut ChaCha8Rng,
    [cin, cout]: [usize; 2],
    kernel: usize,
    stride: usize,
    device: &Device,
) -> Conv2d {
    let mut layer = Conv2dConfig::new([cin, cout], [kernel, kernel])
        .with_stride([stride, stride])
        .with_padding(PaddingConfig2d::Explicit(kernel / 2, kernel / 2, kernel / 2, kernel / 2))
        .with_bias(false)
        .with_initializer(Initializer::Zeros)
        .init(device);
    let shape = [cout, cin, kernel, kernel];
    layer.weight = Param::from_tensor(tensor_from_vec(kaiming_normal(rng, shape), shape, device));
    layer
}

/// A 2×2 stride-2 transposed convolution. anomalib's initialisation loops only re-initialise
/// `nn.Conv2d`, so these keep PyTorch's default: uniform in ±1/√(fan-in), PyTorch counting the
/// fan-in of a transposed weight [in, out, k, k] as out·k·k.
fn up_conv(rng: &mut ChaCha8Rng, [cin, cout]: [usize; 2], device: &Device) -> ConvTranspose2d {
    let mut layer = ConvTranspose2dConfig::new([cin, cout], [2, 2])
        .with_stride([2, 2])
        .with_bias(false)
        .with_initializer(Initializer::Zeros)
        .init(device);
    let shape = [cin, cout, 2, 2];
    let bound = 1.0 / ((cout * 4) as f32).sqrt();
    let values = (0..cin * cout * 4).map(|_| rng.gen_range(-bound..bound)).collect();
    layer.weight = Param::from_tensor(tensor_from_vec(values, shape, device));
    layer
}

fn bn(channels: usize, device: &Device) -> BatchNorm {
    BatchNormConfig::new(channels).init(device)
}

#[derive(Module, Debug)]
pub struct Projection {
    conv: Conv2d,
    bn: BatchNorm,
}

/// torchvision's `BasicBlock`: conv3×3 (stride) → BN → ReLU → conv3×3 → BN, plus the
/// (projected) input, ReLU.
#[derive(Module, Debug)]
pub struct BasicBlock {
    conv1: Conv2d,
    bn1: BatchNorm,
    conv2: Conv2d,
    bn2: BatchNorm,
    downsample: Option<Projection>,
}

impl BasicBlock {
    fn new(rng: &mut ChaCha8Rng, [cin, cout]: [usize; 2], stride: usize, device: &Device) -> Self {
        let conv1 = conv(rng, [cin, cout], 3, stride, device);
        let conv2 = conv(rng, [cout, cout], 3, 1, device);
        let downsample = (stride != 1 || cin != cout)
            .then(|| Projection { conv: conv(rng, [cin, cout], 1, stride, device), bn: bn(cout, device) });
        BasicBlock { conv1, bn1: bn(cout, device), conv2, bn2: bn(cout, device), downsample }
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let y = batch_norm_act(&self.bn1, conv2d(&self.conv1, x.clone()), 0.0);
        let y = self.bn2.forward(conv2d(&self.conv2, y));
        let shortcut = match &self.downsample {
            Some(p) => p.bn.forward(conv2d(&p.conv, x)),
            None => x,
        };
        relu(y + shortcut)
    }
}

#[derive(Module, Debug)]
pub struct UpProjection {
    conv: ConvTranspose2d,
    bn: BatchNorm,
}

/// anomalib's `DecoderBasicBlock`: the first convolution is a 2×2 stride-2 transposed one when
/// the block up-samples, a 3×3 one otherwise.
#[derive(Module, Debug)]
pub struct DecoderBlock {
    up_conv1: Option<ConvTranspose2d>,
    conv1: Option<Conv2d>,
    bn1: BatchNorm,
    conv2: Conv2d,
    bn2: BatchNorm,
    upsample: Option<UpProjection>,
}

impl DecoderBlock {
    fn new(rng: &mut ChaCha8Rng, [cin, cout]: [usize; 2], upsamples: bool, device: &Device) -> Self {
        let (up_conv1, conv1) = if upsamples {
            (Some(up_conv(rng, [cin, cout], device)), None)
        } else {
            (None, Some(conv(rng, [cin, cout], 3, 1, device)))
        };
        let conv2 = conv(rng, [cout, cout], 3, 1, device);
        let upsample = (upsamples || cin != cout)
            .then(|| UpProjection { conv: up_conv(rng, [cin, cout], device), bn: bn(cout, device) });
        DecoderBlock { up_conv1, conv1, bn1: bn(cout, device), conv2, bn2: bn(cout, device), upsample }
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let y = match (&self.up_conv1, &self.conv1) {
            (Some(up), _) => conv_transpose2d(up, x.clone()),
            (None, Some(c)) => conv2d(c, x.clone()),
            (None, None) => unreachable!("a decoder block has a first convolution"),
        };
        let y = batch_norm_act(&self.bn1, y, 0.0);
        let y = self.bn2.forward(conv2d(&self.conv2, y));
        let identity = match &self.upsample {
            Some(p) => p.bn.forward(conv_transpose2d(&p.conv, x)),
            None => x,
        };
        relu(y + identity)
    }
}

/// The one-class bottleneck embedding.
#[derive(Module, Debug)]
pub struct Ocbe {
    conv1: Conv2d,
    bn1: BatchNorm,
    conv2: Conv2d,
    bn2: BatchNorm,
    conv3: Conv2d,
    bn3: BatchNorm,
    bn_layer: Vec<BasicBlock>,
}

impl Ocbe {
    fn new(rng: &mut ChaCha8Rng, [c1, c2, c3]: [usize; 3], device: &Device) -> Self {
        let conv1 = conv(rng, [c1, c2], 3, 2, device);
        let conv2 = conv(rng, [c2, c3], 3, 2, device);
        let conv3 = conv(rng, [c2, c3], 3, 2, device);
        let mut bn_layer = vec![BasicBlock::new(rng, [3 * c3, 2 * c3], 2, device)];
        bn_layer.extend((1..BLOCKS).map(|_| BasicBlock::new(rng, [2 * c3, 2 * c3], 1, device)));
        Ocbe { conv1, bn1: bn(c2, device), conv2, bn2: bn(c3, device), conv3, bn3: bn(c3, device), bn_layer }
    }

    fn forward(&self, [f1, f2, f3]: [Tensor<4>; 3]) -> Tensor<4> {
        let a = batch_norm_act(&self.bn1, conv2d(&self.conv1, f1), 0.0);
        let a = batch_norm_act(&self.bn2, conv2d(&self.conv2, a), 0.0);
        let b = batch_norm_act(&self.bn3, conv2d(&self.conv3, f2), 0.0);
        let fused = Tensor::cat(vec![a, b, f3], 1);
        self.bn_layer.iter().fold(fused, |x, block| block.forward(x))
    }
}

/// The trainable part of Reverse Distillation: bottleneck and decoder.
#[derive(Module, Debug)]
pub struct RdModel {
    bottleneck: Ocbe,
    /// Decoder stages, deepest first: up to c3 at stride 16, c2 at 8, c1 at 4.
    decoder: Vec<Vec<DecoderBlock>>,
}

impl RdModel {
    /// `channels`: the encoder taps' channels at strides 4, 8 and 16. Initial weights are drawn
    /// from one generator seeded with `seed`, layer after layer.
    pub fn new(channels: [usize; 3], seed: u64, device: &Device) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let bottleneck = Ocbe::new(&mut rng, channels, device);
        let mut cin = 2 * channels[2];
        let decoder = channels
            .iter()
            .rev()
            .map(|&cout| {
                let mut stage = vec![DecoderBlock::new(&mut rng, [cin, cout], true, device)];
                stage.extend((1..BLOCKS).map(|_| DecoderBlock::new(&mut rng, [cout, cout], false, device)));
                cin = cout;
                stage
            })
            .collect();
        RdModel { bottleneck, decoder }
    }

    /// Decoder features for encoder features at strides 4, 8 and 16, in that order.
    pub fn forward(&self, features: [Tensor<4>; 3]) -> [Tensor<4>; 3] {
        let mut x = self.bottleneck.forward(features);
        let mut outputs = Vec::with_capacity(3);
        for stage in &self.decoder {
            x = stage.iter().fold(x, |y, block| block.forward(y));
            outputs.push(x.clone());
        }
        let [deep, middle, fine]: [Tensor<4>; 3] = outputs.try_into().expect("three decoder stages");
        [fine, middle, deep]
    }

    /// Every tensor (parameters and batch-norm statistics) by its module path
    /// (`bottleneck.bn_layer.0.conv1.weight`, `decoder.2.1.bn2.running_var`).
    pub fn state(&self) -> TensorBag {
        module_to_bag(self)
    }

    /// The model for `channels` with its tensors read from `state` (every one present with its
    /// shape, none left over).
    pub fn load(channels: [usize; 3], state: &TensorBag, device: &Device) -> Result<Self> {
        load_module(RdModel::new(channels, 0, device), state, "")
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::TensorData;

    use super::*;

    #[test]
    fn shapes_follow_the_encoder_and_the_state_round_trips() {
        let device = Device::flex();
        let channels = [4, 6, 8];
        let model = RdModel::new(channels, 3, &device);
        let input = |c: usize, side: usize| {
            let data: Vec<f32> = (0..2 * c * side * side).map(|i| ((i * 37) % 11) as f32 * 0.1).collect();
            Tensor::<4>::from_data(TensorData::new(data, [2, c, side, side]), &device)
        };
        let out = model.forward([input(4, 16), input(6, 8), input(8, 4)]);
        assert_eq!(out[0].dims(), [2, 4, 16, 16]);
        assert_eq!(out[1].dims(), [2, 6, 8, 8]);
        assert_eq!(out[2].dims(), [2, 8, 4, 4]);
        let state = model.state();
        // ResNet-18's layout: the fused 3·c3 channels compressed to 2·c3 at stride 32.
        assert_eq!(state.shape("bottleneck.bn_layer.0.conv1.weight").unwrap(), &[16, 24, 3, 3]);
        assert_eq!(state.shape("decoder.0.0.up_conv1.weight").unwrap(), &[16, 8, 2, 2]);
        let loaded = RdModel::load(channels, &state, &device).unwrap();
        assert_eq!(loaded.state(), state);
        assert!(RdModel::load([4, 6, 10], &state, &device).is_err());
        assert_eq!(RdModel::new(channels, 3, &device).state(), state);
        assert_ne!(RdModel::new(channels, 4, &device).state(), state);
    }
}
