//! The supported architectures, assembled from PyTorch-named tensors into tappable stages.

use burn::tensor::{Device, Tensor};
use vigil_core::Result;

use crate::kernels::Nhwc;
use crate::layers::{
    resnet_max_pool, resnet_stem_nhwc, Activation, Classifier, ConvBn, ConvSpec, InvertedResidual, Padding,
    ResidualBlock, SqueezeExcitation,
};
use crate::params::Params;
use crate::BackboneKind;

/// MobileNetV2's inverted residual stages after the stem: (expansion t, output channels c,
/// repeats n, first stride s), as in the MobileNetV2 paper.
pub(crate) const MOBILENET_V2_BLOCKS: [(usize, usize, usize, usize); 7] = [
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
];

/// EfficientNet-Lite0's MBConv stages after the stem: (repeats, kernel, first stride, expansion,
/// input channels, output channels).
pub(crate) const EFFICIENTNET_LITE0_BLOCKS: [(usize, usize, usize, usize, usize, usize); 7] = [
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
];

/// torchvision's EfficientNet-B5 MBConv stages `features.1` .. `features.7`: (expansion,
/// kernel, first stride, input channels, output channels, repeats). They are EfficientNet-B0's
/// with width 1.6 (channels rounded to a multiple of 8, never below 90 % of the product) and
/// depth 2.2 (repeats rounded up).
pub(crate) const EFFICIENTNET_B5_BLOCKS: [(usize, usize, usize, usize, usize, usize); 7] = [
    (1, 3, 1, 48, 24, 3),
    (6, 3, 2, 24, 40, 5),
    (6, 5, 2, 40, 64, 5),
    (6, 3, 2, 64, 128, 7),
    (6, 5, 1, 128, 176, 7),
    (6, 5, 2, 176, 304, 9),
    (6, 3, 1, 304, 512, 3),
];

#[derive(Clone)]
pub(crate) enum Block {
    Conv(ConvBn),
    Inverted(InvertedResidual),
    /// conv1 + bn1 + ReLU + 3x3/2 max pool.
    ResNetStem(ConvBn),
    ResNetLayer(Vec<ResidualBlock>),
    /// Convolutions in sequence, nothing added: a path into the middle of a block.
    Chain(Vec<ConvBn>),
}

impl Block {
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        match self {
            Block::Conv(conv) => conv.forward(x),
            Block::Inverted(block) => block.forward(x),
            Block::ResNetStem(conv) => resnet_max_pool(conv.forward(x)),
            Block::ResNetLayer(blocks) => blocks.iter().fold(x, |y, block| block.forward(y)),
            Block::Chain(convs) => convs.iter().fold(x, |y, conv| conv.forward(y)),
        }
    }

    pub fn forward_nhwc(&self, x: &Nhwc) -> Nhwc {
        match self {
            Block::Conv(conv) => conv.forward_nhwc(x, None, None),
            Block::Inverted(block) => block.forward_nhwc(x),
            Block::ResNetStem(conv) => resnet_stem_nhwc(conv, x),
            Block::ResNetLayer(blocks) => {
                let (first, rest) = blocks.split_first().expect("a ResNet layer has blocks");
                rest.iter().fold(first.forward_nhwc(x), |y, block| block.forward_nhwc(&y))
            }
            Block::Chain(convs) => {
                let (first, rest) = convs.split_first().expect("a chain has convolutions");
                rest.iter()
                    .fold(first.forward_nhwc(x, None, None), |y, conv| conv.forward_nhwc(&y, None, None))
            }
        }
    }
}

/// A tappable point of the network, named after the PyTorch module whose output it is.
#[derive(Clone)]
pub(crate) struct Stage {
    pub name: String,
    pub channels: usize,
    /// Total downsampling factor of the stage's output relative to the input.
    pub stride: usize,
    pub block: Block,
    /// A side tap: it reads the previous stage's output like the next stage does, but its
    /// own output feeds nothing (e.g. `layer1.0.conv3`, inside the block that `layer1` runs whole).
    pub branch: bool,
}

#[derive(Clone)]
pub(crate) struct Network {
    pub stages: Vec<Stage>,
    pub classifier: Classifier,
}

pub(crate) fn build(kind: BackboneKind, params: &mut dyn Params, device: &Device) -> Result<Network> {
    match kind {
        BackboneKind::MobileNetV2 => mobilenet_v2(params, device),
        BackboneKind::EfficientNetLite0 => efficientnet_lite0(params, device),
        BackboneKind::EfficientNetB5 => efficientnet_b5(params, device),
        BackboneKind::ResNet18 => resnet(&[2, 2, 2, 2], ResNetBlock::Basic, params, device),
        BackboneKind::ResNet50 => {
            resnet(&[3, 4, 6, 3], ResNetBlock::Bottleneck { width_factor: 1 }, params, device)
        }
        BackboneKind::WideResNet50 => {
            resnet(&[3, 4, 6, 3], ResNetBlock::Bottleneck { width_factor: 2 }, params, device)
        }
    }
}

/// Loads convolution + batch norm pairs with one architecture's padding rule and epsilon.
struct ConvLoader<'a> {
    params: &'a mut dyn Params,
    device: &'a Device,
    bn_eps: f32,
    tf_same: bool,
}

impl ConvLoader<'_> {
    fn conv(
        &mut self,
        conv: &str,
        bn: &str,
        (in_channels, out_channels): (usize, usize),
        kernel: usize,
        stride: usize,
        activation: Activation,
    ) -> Result<ConvBn> {
        self.grouped(conv, bn, (in_channels, out_channels), (kernel, stride), 1, activation)
    }

    /// Depthwise kxk convolution (one filter per channel).
    fn depthwise(
        &mut self,
        conv: &str,
        bn: &str,
        channels: usize,
        (kernel, stride): (usize, usize),
        activation: Activation,
    ) -> Result<ConvBn> {
        self.grouped(conv, bn, (channels, channels), (kernel, stride), channels, activation)
    }

    fn grouped(
        &mut self,
        conv: &str,
        bn: &str,
        (in_channels, out_channels): (usize, usize),
        (kernel, stride): (usize, usize),
        groups: usize,
        activation: Activation,
    ) -> Result<ConvBn> {
        let spec = self.spec(conv, bn, (in_channels, out_channels), (kernel, stride), groups, activation);
        ConvBn::load(&spec, self.params, self.device)
    }

    /// A convolution + batch norm, and the convolution alone (the output before the batch norm).
    fn conv_and_unfolded(
        &mut self,
        conv: &str,
        bn: &str,
        (in_channels, out_channels): (usize, usize),
        kernel: usize,
        activation: Activation,
    ) -> Result<(ConvBn, ConvBn)> {
        let spec = self.spec(conv, bn, (in_channels, out_channels), (kernel, 1), 1, activation);
        let (folded, unfolded) = ConvBn::load_keeping_unfolded(&spec, self.params, self.device, true)?;
        Ok((folded, unfolded.expect("the unfolded convolution was asked for")))
    }

    fn spec<'a>(
        &self,
        conv: &'a str,
        bn: &'a str,
        (in_channels, out_channels): (usize, usize),
        (kernel, stride): (usize, usize),
        groups: usize,
        activation: Activation,
    ) -> ConvSpec<'a> {
        let padding = if self.tf_same { Padding::TfSame } else { Padding::Symmetric(kernel / 2) };
        ConvSpec {
            conv,
            bn,
            in_channels,
            out_channels,
            kernel,
            stride,
            groups,
            padding,
            activation,
            bn_eps: self.bn_eps,
        }
    }
}

/// torchvision `mobilenet_v2`: features.0 .. features.18, classifier.1.
fn mobilenet_v2(params: &mut dyn Params, device: &Device) -> Result<Network> {
    let mut load = ConvLoader { params, device, bn_eps: 1e-5, tf_same: false };
    let stem = load.conv("features.0.0", "features.0.1", (3, 32), 3, 2, Activation::Relu6)?;
    let mut stages = vec![Stage {
        name: "features.0".into(),
        channels: 32,
        stride: 2,
        block: Block::Conv(stem),
        branch: false,
    }];
    let (mut in_channels, mut total_stride) = (32, 2);
    for (expansion, out_channels, repeats, first_stride) in MOBILENET_V2_BLOCKS {
        for repeat in 0..repeats {
            let stride = if repeat == 0 { first_stride } else { 1 };
            total_stride *= stride;
            let name = format!("features.{}", stages.len());
            let hidden = in_channels * expansion;
            let mut convs = Vec::with_capacity(3);
            // Without expansion the depthwise conv is conv.0, else it follows the expand conv.
            let depthwise_index = usize::from(expansion != 1);
            if expansion != 1 {
                let (conv, bn) = (format!("{name}.conv.0.0"), format!("{name}.conv.0.1"));
                convs.push(load.conv(&conv, &bn, (in_channels, hidden), 1, 1, Activation::Relu6)?);
            }
            let (conv, bn) =
                (format!("{name}.conv.{depthwise_index}.0"), format!("{name}.conv.{depthwise_index}.1"));
            convs.push(load.depthwise(&conv, &bn, hidden, (3, stride), Activation::Relu6)?);
            let (conv, bn) = (
                format!("{name}.conv.{}", depthwise_index + 1),
                format!("{name}.conv.{}", depthwise_index + 2),
            );
            convs.push(load.conv(&conv, &bn, (hidden, out_channels), 1, 1, Activation::Identity)?);
            let residual = stride == 1 && in_channels == out_channels;
            let block = Block::Inverted(InvertedResidual { convs, squeeze_excitation: None, residual });
            stages.push(Stage { name, channels: out_channels, stride: total_stride, block, branch: false });
            in_channels = out_channels;
        }
    }
    let head = load.conv("features.18.0", "features.18.1", (320, 1280), 1, 1, Activation::Relu6)?;
    stages.push(Stage {
        name: "features.18".into(),
        channels: 1280,
        stride: total_stride,
        block: Block::Conv(head),
        branch: false,
    });
    let classifier = Classifier::load("classifier.1", 1280, 1000, load.params, device)?;
    Ok(Network { stages, classifier })
}

/// EfficientNet-Lite0 with the names of lukemelas/EfficientNet-PyTorch (the ml-illustrated port):
/// _conv_stem/_bn0, _blocks.0 .. _blocks.15, _conv_head/_bn1, _fc.
fn efficientnet_lite0(params: &mut dyn Params, device: &Device) -> Result<Network> {
    let mut load = ConvLoader { params, device, bn_eps: 1e-3, tf_same: true };
    let stem = load.conv("_conv_stem", "_bn0", (3, 32), 3, 2, Activation::Relu6)?;
    let mut stages = vec![Stage {
        name: "_conv_stem".into(),
        channels: 32,
        stride: 2,
        block: Block::Conv(stem),
        branch: false,
    }];
    let mut total_stride = 2;
    let mut index = 0;
    for (repeats, kernel, first_stride, expansion, first_in, out_channels) in EFFICIENTNET_LITE0_BLOCKS {
        for repeat in 0..repeats {
            let (stride, in_channels) =
                if repeat == 0 { (first_stride, first_in) } else { (1, out_channels) };
            total_stride *= stride;
            let name = format!("_blocks.{index}");
            let hidden = in_channels * expansion;
            let mut convs = Vec::with_capacity(3);
            if expansion != 1 {
                let (conv, bn) = (format!("{name}._expand_conv"), format!("{name}._bn0"));
                convs.push(load.conv(&conv, &bn, (in_channels, hidden), 1, 1, Activation::Relu6)?);
            }
            let (conv, bn) = (format!("{name}._depthwise_conv"), format!("{name}._bn1"));
            convs.push(load.depthwise(&conv, &bn, hidden, (kernel, stride), Activation::Relu6)?);
            let (conv, bn) = (format!("{name}._project_conv"), format!("{name}._bn2"));
            convs.push(load.conv(&conv, &bn, (hidden, out_channels), 1, 1, Activation::Identity)?);
            let residual = stride == 1 && in_channels == out_channels;
            let block = Block::Inverted(InvertedResidual { convs, squeeze_excitation: None, residual });
            stages.push(Stage { name, channels: out_channels, stride: total_stride, block, branch: false });
            index += 1;
        }
    }
    let head = load.conv("_conv_head", "_bn1", (320, 1280), 1, 1, Activation::Relu6)?;
    stages.push(Stage {
        name: "_conv_head".into(),
        channels: 1280,
        stride: total_stride,
        block: Block::Conv(head),
        branch: false,
    });
    let classifier = Classifier::load("_fc", 1280, 1000, load.params, device)?;
    Ok(Network { stages, classifier })
}

/// torchvision `efficientnet_b5`: the stem `features.0`, every MBConv block as its own stage
/// `features.S.B` (S = 1..7, e.g. CS-Flow's `features.6.8`), the head `features.8`, and
/// `classifier.1`. Symmetric padding (k / 2), SiLU, squeeze-excitation to a quarter of the
/// block's input channels, batch norm eps 1e-3 (torchvision's choice for B5-B7, whose weights
/// were ported from TensorFlow); stochastic depth is the identity at inference.
fn efficientnet_b5(params: &mut dyn Params, device: &Device) -> Result<Network> {
    let mut load = ConvLoader { params, device, bn_eps: 1e-3, tf_same: false };
    let stem = load.conv("features.0.0", "features.0.1", (3, 48), 3, 2, Activation::Silu)?;
    let mut stages = vec![Stage {
        name: "features.0".into(),
        channels: 48,
        stride: 2,
        block: Block::Conv(stem),
        branch: false,
    }];
    let mut total_stride = 2;
    for (stage, (expansion, kernel, first_stride, first_in, out_channels, repeats)) in
        (1..).zip(EFFICIENTNET_B5_BLOCKS)
    {
        for repeat in 0..repeats {
            let (stride, in_channels) =
                if repeat == 0 { (first_stride, first_in) } else { (1, out_channels) };
            total_stride *= stride;
            let name = format!("features.{stage}.{repeat}");
            let hidden = in_channels * expansion;
            // block.0 is the expand conv when there is one; the depthwise conv, the
            // squeeze-excitation and the projection follow it.
            let mut index = 0;
            let mut part = || {
                index += 1;
                format!("{name}.block.{}", index - 1)
            };
            let mut convs = Vec::with_capacity(3);
            if expansion != 1 {
                let expand = part();
                let (conv, bn) = (format!("{expand}.0"), format!("{expand}.1"));
                convs.push(load.conv(&conv, &bn, (in_channels, hidden), 1, 1, Activation::Silu)?);
            }
            let depthwise = part();
            let (conv, bn) = (format!("{depthwise}.0"), format!("{depthwise}.1"));
            convs.push(load.depthwise(&conv, &bn, hidden, (kernel, stride), Activation::Silu)?);
            let squeezed = (in_channels / 4).max(1);
            let squeeze_excitation = SqueezeExcitation::load(&part(), hidden, squeezed, load.params, device)?;
            let project = part();
            let (conv, bn) = (format!("{project}.0"), format!("{project}.1"));
            convs.push(load.conv(&conv, &bn, (hidden, out_channels), 1, 1, Activation::Identity)?);
            let residual = stride == 1 && in_channels == out_channels;
            let block = Block::Inverted(InvertedResidual {
                convs,
                squeeze_excitation: Some(Box::new(squeeze_excitation)),
                residual,
            });
            stages.push(Stage { name, channels: out_channels, stride: total_stride, block, branch: false });
        }
    }
    let head = load.conv("features.8.0", "features.8.1", (512, 2048), 1, 1, Activation::Silu)?;
    stages.push(Stage {
        name: "features.8".into(),
        channels: 2048,
        stride: total_stride,
        block: Block::Conv(head),
        branch: false,
    });
    let classifier = Classifier::load("classifier.1", 2048, 1000, load.params, device)?;
    Ok(Network { stages, classifier })
}

#[derive(Clone, Copy)]
enum ResNetBlock {
    Basic,
    /// 1x1 -> 3x3 (stride here, torchvision's "v1.5") -> 1x1 x4; wide ResNets double the inner width.
    Bottleneck {
        width_factor: usize,
    },
}

/// torchvision ResNet: conv1/bn1 (+ maxpool), layer1 .. layer4, fc.
fn resnet(
    depths: &[usize; 4],
    block: ResNetBlock,
    params: &mut dyn Params,
    device: &Device,
) -> Result<Network> {
    let mut load = ConvLoader { params, device, bn_eps: 1e-5, tf_same: false };
    let stem = load.conv("conv1", "bn1", (3, 64), 7, 2, Activation::Relu)?;
    let mut stages = vec![Stage {
        name: "maxpool".into(),
        channels: 64,
        stride: 4,
        block: Block::ResNetStem(stem),
        branch: false,
    }];
    let mut in_channels = 64;
    for (layer, &depth) in depths.iter().enumerate() {
        let planes = 64 << layer;
        let mut blocks = Vec::with_capacity(depth);
        for index in 0..depth {
            let stride = if layer > 0 && index == 0 { 2 } else { 1 };
            let name = format!("layer{}.{index}", layer + 1);
            let conv = |i: usize| (format!("{name}.conv{i}"), format!("{name}.bn{i}"));
            let (convs, out_channels) = match block {
                ResNetBlock::Basic => {
                    let (c1, b1) = conv(1);
                    let (c2, b2) = conv(2);
                    let convs = vec![
                        load.conv(&c1, &b1, (in_channels, planes), 3, stride, Activation::Relu)?,
                        load.conv(&c2, &b2, (planes, planes), 3, 1, Activation::Identity)?,
                    ];
                    (convs, planes)
                }
                ResNetBlock::Bottleneck { width_factor } => {
                    let width = planes * width_factor;
                    let (c1, b1) = conv(1);
                    let (c2, b2) = conv(2);
                    let (c3, b3) = conv(3);
                    let conv1 = load.conv(&c1, &b1, (in_channels, width), 1, 1, Activation::Relu)?;
                    let conv2 = load.conv(&c2, &b2, (width, width), 3, stride, Activation::Relu)?;
                    let conv3 = if (layer, index) == (0, 0) {
                        // layer1[0].conv3 before bn3, the residual and the ReLU, as the a contrario
                        // reference taps it: conv3 with its own weights, not the folded ones.
                        let (folded, unfolded) =
                            load.conv_and_unfolded(&c3, &b3, (width, planes * 4), 1, Activation::Identity)?;
                        stages.push(Stage {
                            name: c3.clone(),
                            channels: planes * 4,
                            stride: 4,
                            block: Block::Chain(vec![conv1.clone(), conv2.clone(), unfolded]),
                            branch: true,
                        });
                        folded
                    } else {
                        load.conv(&c3, &b3, (width, planes * 4), 1, 1, Activation::Identity)?
                    };
                    (vec![conv1, conv2, conv3], planes * 4)
                }
            };
            let downsample = if stride != 1 || in_channels != out_channels {
                let (c, b) = (format!("{name}.downsample.0"), format!("{name}.downsample.1"));
                Some(load.conv(&c, &b, (in_channels, out_channels), 1, stride, Activation::Identity)?)
            } else {
                None
            };
            blocks.push(ResidualBlock { convs, downsample });
            in_channels = out_channels;
        }
        stages.push(Stage {
            name: format!("layer{}", layer + 1),
            channels: in_channels,
            stride: 4 << layer,
            block: Block::ResNetLayer(blocks),
            branch: false,
        });
    }
    let classifier = Classifier::load("fc", in_channels, 1000, load.params, device)?;
    Ok(Network { stages, classifier })
}
