//! Trainable versions of the CNN backbones: the same architectures as burn modules (convolution
//! and batch norm kept apart, batch norm in training mode on an autodiff device), with the same
//! PyTorch tensor names, so a network can be trained from scratch (an STFPM student) and a
//! pretrained state dict loads into it unchanged.
//!
//! Convolutions and BatchNorm + ReLU / ReLU6 / no activation run on vigil-nn's training kernels
//! ([`vigil_nn::kernels`]), the batch norm and its activation fused in one pass forward and one
//! backward.
//!
//! A trained network runs inference on the fast kernels of [`Backbone`]: [`TrainableBackbone::state`]
//! gives its tensors, [`Backbone::from_partial_state`] builds the inference network from them.

use burn::module::{Module, Param};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{BatchNorm, BatchNormConfig, Initializer, PaddingConfig2d};
use burn::tensor::activation::{relu, silu};
use burn::tensor::{Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use vigil_core::{Result, TensorBag, VigilError};
use vigil_nn::kernels::{batch_norm_act, batch_norm_act_clamped, conv2d};
use vigil_nn::{load_module, module_to_bag, tensor_from_vec};

use crate::arch::{EFFICIENTNET_LITE0_BLOCKS, MOBILENET_V2_BLOCKS};
use crate::layers::{resnet_max_pool, Activation, Padding};
use crate::BackboneKind;

/// One convolution (no bias) and its batch norm, as PyTorch names them.
#[derive(Clone, Debug)]
struct UnitSpec {
    conv: String,
    bn: String,
    channels: (usize, usize),
    kernel: usize,
    stride: usize,
    groups: usize,
    padding: Padding,
    activation: Activation,
    bn_eps: f64,
}

/// A ResNet block: its convolutions (indices into the units) and the optional shortcut projection.
#[derive(Clone, Debug)]
struct ResidualPlan {
    convs: Vec<usize>,
    downsample: Option<usize>,
}

#[derive(Clone, Debug)]
enum BlockPlan {
    Conv(usize),
    Inverted { convs: Vec<usize>, residual: bool },
    ResNetStem(usize),
    ResNetLayer(Vec<ResidualPlan>),
}

/// A tappable stage: the output of the PyTorch module `name`.
#[derive(Clone, Debug)]
struct StagePlan {
    name: String,
    channels: usize,
    stride: usize,
    block: BlockPlan,
}

/// A convolution + batch norm + activation with trainable weights and batch statistics.
#[derive(Module, Debug)]
pub struct TrainableConvBn {
    conv: Conv2d,
    bn: BatchNorm,
    #[module(skip)]
    spec: UnitSpec,
}

impl TrainableConvBn {
    fn new(spec: UnitSpec, rng_seed: u64, device: &Device) -> Self {
        let UnitSpec { channels: (cin, cout), kernel, stride, groups, .. } = spec;
        let padding = match spec.padding {
            Padding::Symmetric(p) => PaddingConfig2d::Explicit(p, p, p, p),
            Padding::TfSame => PaddingConfig2d::Same,
        };
        let mut conv = Conv2dConfig::new([cin, cout], [kernel, kernel])
            .with_stride([stride, stride])
            .with_groups(groups)
            .with_padding(padding)
            .with_bias(false)
            .with_initializer(Initializer::Zeros)
            .init(device);
        // torchvision's initialisation: Kaiming normal, fan-out mode (fan-out = out × k × k, as
        // PyTorch counts it also for grouped convolutions); batch norm scale 1, shift 0.
        let shape = [cout, cin / groups, kernel, kernel];
        let std = (2.0 / (cout * kernel * kernel) as f64).sqrt();
        let mut rng = ChaCha8Rng::seed_from_u64(rng_seed);
        let n = shape.iter().product();
        let values: Vec<f32> = (0..n)
            .map(|_| {
                // Box-Muller; 1 - u keeps the logarithm finite.
                let u: f64 = 1.0 - rng.gen::<f64>();
                let v: f64 = rng.gen();
                (std * (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
            })
            .collect();
        conv.weight = Param::from_tensor(tensor_from_vec(values, shape, device));
        let bn = BatchNormConfig::new(cout).with_epsilon(spec.bn_eps).init(device);
        TrainableConvBn { conv, bn, spec }
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let y = conv2d(&self.conv, x);
        match self.spec.activation {
            // Slope 1: the fused kernel without an activation (burn's BatchNorm is a dozen passes).
            Activation::Identity => batch_norm_act(&self.bn, y, 1.0),
            Activation::Relu => batch_norm_act(&self.bn, y, 0.0),
            Activation::Relu6 => batch_norm_act_clamped(&self.bn, y, 0.0, 6.0),
            Activation::Silu => silu(self.bn.forward(y)),
        }
    }
}

/// A backbone's stages up to a given layer as a trainable burn module (see the module docs).
#[derive(Module, Debug)]
pub struct TrainableBackbone {
    units: Vec<TrainableConvBn>,
    #[module(skip)]
    stages: Vec<StagePlan>,
    #[module(skip)]
    kind: BackboneKind,
}

impl TrainableBackbone {
    /// `kind`'s stages up to and including `last_layer`, randomly initialised from `seed`
    /// (each convolution from its own stream, a function of the seed and its position).
    pub fn new(kind: BackboneKind, last_layer: &str, seed: u64, device: &Device) -> Result<Self> {
        let (specs, stages) = plan(kind, last_layer)?;
        let units = specs
            .into_iter()
            .enumerate()
            .map(|(i, spec)| {
                let stream = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15).wrapping_add(i as u64);
                TrainableConvBn::new(spec, stream, device)
            })
            .collect();
        Ok(TrainableBackbone { units, stages, kind })
    }

    pub fn kind(&self) -> BackboneKind {
        self.kind
    }

    /// The stage names, input to output.
    pub fn layer_names(&self) -> Vec<String> {
        self.stages.iter().map(|s| s.name.clone()).collect()
    }

    fn stage_index(&self, layer: &str) -> Result<usize> {
        let position = |name: &str| self.stages.iter().position(|s| s.name == name);
        position(layer).or_else(|| position(&format!("_{layer}"))).ok_or_else(|| {
            VigilError::Config(format!(
                "trainable {} has no layer '{layer}' (layers: {})",
                self.kind,
                self.layer_names().join(", ")
            ))
        })
    }

    /// (channels, stride) of a layer's output.
    pub fn layer_info(&self, layer: &str) -> Result<(usize, usize)> {
        let stage = &self.stages[self.stage_index(layer)?];
        Ok((stage.channels, stage.stride))
    }

    /// Runs a normalised batch [N, 3, H, W] (as [`Backbone::preprocess`] makes it); one tensor
    /// per requested layer, in the order asked. Batch norms use the batch's statistics (and
    /// update their running ones) on an autodiff device, the running statistics elsewhere.
    pub fn forward(&self, x: Tensor<4>, layers: &[String]) -> Result<Vec<Tensor<4>>> {
        let wanted: Vec<usize> = layers.iter().map(|l| self.stage_index(l)).collect::<Result<_>>()?;
        let deepest = *wanted.iter().max().ok_or_else(|| VigilError::Config("no layers requested".into()))?;
        let mut outputs: Vec<Option<Tensor<4>>> = vec![None; deepest + 1];
        let mut x = x;
        for (index, stage) in self.stages[..=deepest].iter().enumerate() {
            x = self.run_block(&stage.block, x);
            if wanted.contains(&index) {
                outputs[index] = Some(x.clone());
            }
        }
        Ok(wanted.iter().map(|&i| outputs[i].clone().expect("every wanted stage ran")).collect())
    }

    fn run_block(&self, block: &BlockPlan, x: Tensor<4>) -> Tensor<4> {
        let unit = |i: usize, x: Tensor<4>| self.units[i].forward(x);
        match block {
            BlockPlan::Conv(i) => unit(*i, x),
            BlockPlan::ResNetStem(i) => resnet_max_pool(unit(*i, x)),
            BlockPlan::Inverted { convs, residual } => {
                let y = convs.iter().fold(x.clone(), |y, &i| unit(i, y));
                if *residual {
                    y + x
                } else {
                    y
                }
            }
            BlockPlan::ResNetLayer(blocks) => blocks.iter().fold(x, |x, block| {
                let shortcut = match block.downsample {
                    Some(i) => unit(i, x.clone()),
                    None => x.clone(),
                };
                relu(block.convs.iter().fold(x, |y, &i| unit(i, y)) + shortcut)
            }),
        }
    }

    /// Every tensor under its PyTorch name (`features.1.conv.0.0.weight`, `layer1.0.bn1.running_var`).
    pub fn state(&self) -> TensorBag {
        let mut bag = TensorBag::new();
        for unit in &self.units {
            for (prefix, part) in
                [(&unit.spec.conv, module_to_bag(&unit.conv)), (&unit.spec.bn, module_to_bag(&unit.bn))]
            {
                for name in part.names() {
                    let shape = part.shape(name).expect("listed tensor").to_vec();
                    let values = part.f32(name, None).expect("f32 tensor");
                    bag.put_f32(&format!("{prefix}.{name}"), &shape, values);
                }
            }
        }
        bag
    }

    /// This network with its tensors read from `state` (PyTorch names; tensors of later stages
    /// or of the classifier, as in a full pretrained state dict, are left unread). Parameter
    /// ids are kept, so an optimiser state stays attached.
    pub fn load_state(self, state: &TensorBag) -> Result<Self> {
        let TrainableBackbone { units, stages, kind } = self;
        let units = units
            .into_iter()
            .map(|unit| {
                let TrainableConvBn { conv, bn, spec } = unit;
                let conv = load_module(conv, state, &format!("{}.", spec.conv))?;
                let bn = load_module(bn, state, &format!("{}.", spec.bn))?;
                Ok(TrainableConvBn { conv, bn, spec })
            })
            .collect::<Result<_>>()?;
        Ok(TrainableBackbone { units, stages, kind })
    }
}

/// Collects the units and stages of an architecture, input to output.
struct Planner {
    units: Vec<UnitSpec>,
    stages: Vec<StagePlan>,
    bn_eps: f64,
    tf_same: bool,
}

impl Planner {
    fn unit(
        &mut self,
        conv: String,
        bn: String,
        channels: (usize, usize),
        (kernel, stride): (usize, usize),
        groups: usize,
        activation: Activation,
    ) -> usize {
        let padding = if self.tf_same { Padding::TfSame } else { Padding::Symmetric(kernel / 2) };
        self.units.push(UnitSpec {
            conv,
            bn,
            channels,
            kernel,
            stride,
            groups,
            padding,
            activation,
            bn_eps: self.bn_eps,
        });
        self.units.len() - 1
    }

    fn stage(&mut self, name: String, channels: usize, stride: usize, block: BlockPlan) {
        self.stages.push(StagePlan { name, channels, stride, block });
    }
}

/// The units and stages of `kind` up to `last_layer` (an underscore may be left out of
/// EfficientNet's names, as for [`Backbone`]).
fn plan(kind: BackboneKind, last_layer: &str) -> Result<(Vec<UnitSpec>, Vec<StagePlan>)> {
    let torchvision = |tf_same| Planner { units: Vec::new(), stages: Vec::new(), bn_eps: 1e-5, tf_same };
    let mut p = torchvision(false);
    match kind {
        BackboneKind::MobileNetV2 => mobilenet_v2(&mut p),
        BackboneKind::EfficientNetLite0 => {
            p = Planner { bn_eps: 1e-3, ..torchvision(true) };
            efficientnet_lite0(&mut p)
        }
        BackboneKind::EfficientNetB5 => {
            return Err(VigilError::Config(format!(
                "trainable {kind} is not supported (its squeeze-excitation blocks have no trainable \
                 version); use it as a frozen Backbone"
            )))
        }
        BackboneKind::ResNet18 => resnet(&mut p, &[2, 2, 2, 2], None),
        BackboneKind::ResNet50 => resnet(&mut p, &[3, 4, 6, 3], Some(1)),
        BackboneKind::WideResNet50 => resnet(&mut p, &[3, 4, 6, 3], Some(2)),
    }
    let Planner { units, mut stages, .. } = p;
    let last = stages
        .iter()
        .position(|s| s.name == last_layer || s.name == format!("_{last_layer}"))
        .ok_or_else(|| {
            let names: Vec<&str> = stages.iter().map(|s| s.name.as_str()).collect();
            VigilError::Config(format!(
                "trainable {kind} has no layer '{last_layer}' (layers: {})",
                names.join(", ")
            ))
        })?;
    stages.truncate(last + 1);
    // Units are numbered input to output, so the stages kept use a prefix of them.
    let used = stages
        .iter()
        .flat_map(|s| match &s.block {
            BlockPlan::Conv(i) | BlockPlan::ResNetStem(i) => vec![*i],
            BlockPlan::Inverted { convs, .. } => convs.clone(),
            BlockPlan::ResNetLayer(blocks) => {
                blocks.iter().flat_map(|b| b.convs.iter().copied().chain(b.downsample)).collect()
            }
        })
        .max()
        .map_or(0, |i| i + 1);
    let mut units = units;
    units.truncate(used);
    Ok((units, stages))
}

fn mobilenet_v2(p: &mut Planner) {
    let stem = p.unit("features.0.0".into(), "features.0.1".into(), (3, 32), (3, 2), 1, Activation::Relu6);
    p.stage("features.0".into(), 32, 2, BlockPlan::Conv(stem));
    let (mut in_channels, mut total_stride) = (32, 2);
    for (expansion, out_channels, repeats, first_stride) in MOBILENET_V2_BLOCKS {
        for repeat in 0..repeats {
            let stride = if repeat == 0 { first_stride } else { 1 };
            total_stride *= stride;
            let name = format!("features.{}", p.stages.len());
            let hidden = in_channels * expansion;
            let mut convs = Vec::with_capacity(3);
            let depthwise_index = usize::from(expansion != 1);
            if expansion != 1 {
                let (conv, bn) = (format!("{name}.conv.0.0"), format!("{name}.conv.0.1"));
                convs.push(p.unit(conv, bn, (in_channels, hidden), (1, 1), 1, Activation::Relu6));
            }
            let (conv, bn) =
                (format!("{name}.conv.{depthwise_index}.0"), format!("{name}.conv.{depthwise_index}.1"));
            convs.push(p.unit(conv, bn, (hidden, hidden), (3, stride), hidden, Activation::Relu6));
            let (conv, bn) = (
                format!("{name}.conv.{}", depthwise_index + 1),
                format!("{name}.conv.{}", depthwise_index + 2),
            );
            convs.push(p.unit(conv, bn, (hidden, out_channels), (1, 1), 1, Activation::Identity));
            let residual = stride == 1 && in_channels == out_channels;
            p.stage(name, out_channels, total_stride, BlockPlan::Inverted { convs, residual });
            in_channels = out_channels;
        }
    }
    let head =
        p.unit("features.18.0".into(), "features.18.1".into(), (320, 1280), (1, 1), 1, Activation::Relu6);
    p.stage("features.18".into(), 1280, total_stride, BlockPlan::Conv(head));
}

fn efficientnet_lite0(p: &mut Planner) {
    let stem = p.unit("_conv_stem".into(), "_bn0".into(), (3, 32), (3, 2), 1, Activation::Relu6);
    p.stage("_conv_stem".into(), 32, 2, BlockPlan::Conv(stem));
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
                convs.push(p.unit(conv, bn, (in_channels, hidden), (1, 1), 1, Activation::Relu6));
            }
            let (conv, bn) = (format!("{name}._depthwise_conv"), format!("{name}._bn1"));
            convs.push(p.unit(conv, bn, (hidden, hidden), (kernel, stride), hidden, Activation::Relu6));
            let (conv, bn) = (format!("{name}._project_conv"), format!("{name}._bn2"));
            convs.push(p.unit(conv, bn, (hidden, out_channels), (1, 1), 1, Activation::Identity));
            let residual = stride == 1 && in_channels == out_channels;
            p.stage(name, out_channels, total_stride, BlockPlan::Inverted { convs, residual });
            index += 1;
        }
    }
    let head = p.unit("_conv_head".into(), "_bn1".into(), (320, 1280), (1, 1), 1, Activation::Relu6);
    p.stage("_conv_head".into(), 1280, total_stride, BlockPlan::Conv(head));
}

/// torchvision ResNet; `bottleneck_width`: None for basic blocks, else the bottleneck's width
/// factor (2 for the wide ResNets). No side tap inside blocks (`layer1.0.conv3`).
fn resnet(p: &mut Planner, depths: &[usize; 4], bottleneck_width: Option<usize>) {
    let stem = p.unit("conv1".into(), "bn1".into(), (3, 64), (7, 2), 1, Activation::Relu);
    p.stage("maxpool".into(), 64, 4, BlockPlan::ResNetStem(stem));
    let mut in_channels = 64;
    for (layer, &depth) in depths.iter().enumerate() {
        let planes = 64 << layer;
        let mut blocks = Vec::with_capacity(depth);
        for index in 0..depth {
            let stride = if layer > 0 && index == 0 { 2 } else { 1 };
            let name = format!("layer{}.{index}", layer + 1);
            let names = |i: usize| (format!("{name}.conv{i}"), format!("{name}.bn{i}"));
            let (convs, out_channels) = match bottleneck_width {
                None => {
                    let ((c1, b1), (c2, b2)) = (names(1), names(2));
                    let first = p.unit(c1, b1, (in_channels, planes), (3, stride), 1, Activation::Relu);
                    let second = p.unit(c2, b2, (planes, planes), (3, 1), 1, Activation::Identity);
                    (vec![first, second], planes)
                }
                Some(factor) => {
                    let width = planes * factor;
                    let ((c1, b1), (c2, b2), (c3, b3)) = (names(1), names(2), names(3));
                    let first = p.unit(c1, b1, (in_channels, width), (1, 1), 1, Activation::Relu);
                    let second = p.unit(c2, b2, (width, width), (3, stride), 1, Activation::Relu);
                    let third = p.unit(c3, b3, (width, planes * 4), (1, 1), 1, Activation::Identity);
                    (vec![first, second, third], planes * 4)
                }
            };
            let downsample = (stride != 1 || in_channels != out_channels).then(|| {
                let (c, b) = (format!("{name}.downsample.0"), format!("{name}.downsample.1"));
                p.unit(c, b, (in_channels, out_channels), (1, stride), 1, Activation::Identity)
            });
            blocks.push(ResidualPlan { convs, downsample });
            in_channels = out_channels;
        }
        p.stage(format!("layer{}", layer + 1), in_channels, 4 << layer, BlockPlan::ResNetLayer(blocks));
    }
}
