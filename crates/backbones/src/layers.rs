//! Inference-only building blocks: convolutions with their batch norm folded in, and the
//! blocks the supported architectures are made of.

use burn::tensor::activation::{relu, relu6, sigmoid, silu};
use burn::tensor::module::{conv2d, max_pool2d};
use burn::tensor::ops::{ConvOptions, MaxPoolOptions};
use burn::tensor::{Device, Tensor, TensorData};
use vigil_core::Result;

use crate::kernels::{max_pool_3x3_s2, squeeze_excite, Nhwc, PackedConv, Pads};
use crate::params::Params;

#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Activation {
    Identity,
    Relu,
    Relu6,
    /// x · sigmoid(x), EfficientNet-B0..B7's activation ("swish").
    Silu,
}

/// How a convolution pads its input.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Padding {
    /// The same amount on every side (PyTorch `padding=p`).
    Symmetric(usize),
    /// TensorFlow "SAME": output = ceil(input / stride), the odd pixel of padding going to the
    /// bottom/right. EfficientNet-Lite was trained in TensorFlow, so its stride-2 convolutions
    /// need this asymmetric padding to reproduce its features.
    TfSame,
}

/// Where a convolution's and its batch norm's tensors live in the checkpoint, and its shape.
pub(crate) struct ConvSpec<'a> {
    pub conv: &'a str,
    pub bn: &'a str,
    pub in_channels: usize,
    pub out_channels: usize,
    pub kernel: usize,
    pub stride: usize,
    pub groups: usize,
    pub padding: Padding,
    pub activation: Activation,
    pub bn_eps: f32,
}

/// A bias-free convolution followed by an eval-mode batch norm, folded into one convolution:
/// w' = w * gamma / sqrt(var + eps), b' = beta - mean * gamma / sqrt(var + eps).
#[derive(Clone)]
pub(crate) struct ConvBn {
    weight: Tensor<4>,
    bias: Tensor<1>,
    kernel: usize,
    stride: usize,
    groups: usize,
    padding: Padding,
    activation: Activation,
    /// The same folded weights laid out for the CPU kernels.
    packed: PackedConv,
}

impl ConvBn {
    pub fn load(spec: &ConvSpec, params: &mut dyn Params, device: &Device) -> Result<ConvBn> {
        Ok(ConvBn::load_keeping_unfolded(spec, params, device, false)?.0)
    }

    /// The folded layer and, if `keep_unfolded`, also the convolution alone (its own weights, zero
    /// bias, no activation): the exact output before the batch norm, for a tap placed there.
    pub fn load_keeping_unfolded(
        spec: &ConvSpec,
        params: &mut dyn Params,
        device: &Device,
        keep_unfolded: bool,
    ) -> Result<(ConvBn, Option<ConvBn>)> {
        let ConvSpec { conv, bn, in_channels, out_channels, kernel, .. } = *spec;
        let mut weight = params
            .take(&format!("{conv}.weight"), &[out_channels, in_channels / spec.groups, kernel, kernel])?;
        let gamma = params.take(&format!("{bn}.weight"), &[out_channels])?;
        let beta = params.take(&format!("{bn}.bias"), &[out_channels])?;
        let mean = params.take(&format!("{bn}.running_mean"), &[out_channels])?;
        let var = params.take(&format!("{bn}.running_var"), &[out_channels])?;
        let unfolded = keep_unfolded.then(|| {
            ConvBn::new(weight.clone(), vec![0.0; out_channels], Activation::Identity, spec, device)
        });
        let per_filter = weight.len() / out_channels;
        let mut bias = Vec::with_capacity(out_channels);
        for o in 0..out_channels {
            let scale = gamma[o] / (var[o] + spec.bn_eps).sqrt();
            weight[o * per_filter..(o + 1) * per_filter].iter_mut().for_each(|w| *w *= scale);
            bias.push(beta[o] - mean[o] * scale);
        }
        Ok((ConvBn::new(weight, bias, spec.activation, spec, device), unfolded))
    }

    fn new(
        weight: Vec<f32>,
        bias: Vec<f32>,
        activation: Activation,
        spec: &ConvSpec,
        device: &Device,
    ) -> ConvBn {
        let ConvSpec { in_channels, out_channels, kernel, .. } = *spec;
        let shape = [out_channels, in_channels / spec.groups, kernel, kernel];
        let packed = PackedConv::new(
            &weight,
            bias.clone(),
            (in_channels, out_channels),
            (kernel, spec.stride),
            spec.groups,
        );
        ConvBn {
            weight: Tensor::from_data(TensorData::new(weight, shape), device),
            bias: Tensor::from_data(TensorData::new(bias, [out_channels]), device),
            kernel,
            stride: spec.stride,
            groups: spec.groups,
            padding: spec.padding,
            activation,
            packed,
        }
    }

    /// (top, bottom, left, right) padding for an input of this size.
    fn pads(&self, height: usize, width: usize) -> Pads {
        match self.padding {
            Padding::Symmetric(p) => (p, p, p, p),
            Padding::TfSame => {
                let (top, bottom) = tf_same_padding(height, self.kernel, self.stride);
                let (left, right) = tf_same_padding(width, self.kernel, self.stride);
                (top, bottom, left, right)
            }
        }
    }

    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let [_, _, height, width] = x.dims();
        let (top, bottom, left, right) = self.pads(height, width);
        let padding = [(top, bottom), (left, right)];
        let options = ConvOptions::new_with_padding([self.stride; 2], padding, [1, 1], self.groups);
        let y = conv2d(x, self.weight.clone(), Some(self.bias.clone()), options);
        match self.activation {
            Activation::Identity => y,
            Activation::Relu => relu(y),
            Activation::Relu6 => relu6(y),
            Activation::Silu => silu(y),
        }
    }

    /// The CPU kernels' forward pass: `activation(conv(x) + residual)`, with this layer's own
    /// activation unless a block applies another one after the sum.
    pub fn forward_nhwc(&self, x: &Nhwc, residual: Option<&Nhwc>, activation: Option<Activation>) -> Nhwc {
        let pads = self.pads(x.height, x.width);
        self.packed.run(x, pads, residual, activation.unwrap_or(self.activation))
    }
}

/// (before, after) padding of one axis under TensorFlow's "SAME" rule.
pub(crate) fn tf_same_padding(size: usize, kernel: usize, stride: usize) -> (usize, usize) {
    let out = size.div_ceil(stride);
    let total = ((out - 1) * stride + kernel).saturating_sub(size);
    (total / 2, total - total / 2)
}

/// torchvision's ResNet stem pooling: 3x3, stride 2, padding 1.
pub(crate) fn resnet_max_pool(x: Tensor<4>) -> Tensor<4> {
    let options = MaxPoolOptions {
        kernel_size: [3, 3],
        stride: [2, 2],
        padding: [(1, 1), (1, 1)],
        dilation: [1, 1],
        ceil_mode: false,
    };
    max_pool2d(x, options)
}

/// The inverted residual of MobileNetV2 and the MBConv of EfficientNet: expand 1x1, depthwise
/// kxk, squeeze-excitation (EfficientNet-B5; none in MobileNetV2 and EfficientNet-Lite), project
/// 1x1, plus the input when shapes allow.
#[derive(Clone)]
pub(crate) struct InvertedResidual {
    pub convs: Vec<ConvBn>,
    /// Rescales the channels of the depthwise output, before the projection (the last conv).
    /// Boxed: it holds four tensors, and most blocks have none.
    pub squeeze_excitation: Option<Box<SqueezeExcitation>>,
    pub residual: bool,
}

impl InvertedResidual {
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let (project, inner) = self.convs.split_last().expect("a block has at least one convolution");
        let mut y = inner.iter().fold(x.clone(), |y, conv| conv.forward(y));
        if let Some(se) = &self.squeeze_excitation {
            y = se.forward(y);
        }
        let y = project.forward(y);
        if self.residual {
            y + x
        } else {
            y
        }
    }

    pub fn forward_nhwc(&self, x: &Nhwc) -> Nhwc {
        let (project, inner) = self.convs.split_last().expect("a block has at least one convolution");
        let mut y: Option<Nhwc> = None;
        for conv in inner {
            y = Some(conv.forward_nhwc(y.as_ref().unwrap_or(x), None, None));
        }
        if let (Some(se), Some(y)) = (&self.squeeze_excitation, y.as_mut()) {
            se.forward_nhwc(y);
        }
        project.forward_nhwc(y.as_ref().unwrap_or(x), self.residual.then_some(x), None)
    }
}

/// torchvision's `SqueezeExcitation` as EfficientNet uses it: the channel means through a 1x1
/// convolution (`fc1`, with bias) to a few channels, SiLU, a 1x1 convolution back (`fc2`), a
/// sigmoid, and each input channel multiplied by its gate.
#[derive(Clone)]
pub(crate) struct SqueezeExcitation {
    /// PyTorch layouts: `fc1` `[squeezed, channels, 1, 1]`, `fc2` `[channels, squeezed, 1, 1]`.
    reduce_weight: Tensor<4>,
    reduce_bias: Tensor<1>,
    expand_weight: Tensor<4>,
    expand_bias: Tensor<1>,
    /// The same values as `[squeezed][channels]`, `[squeezed]`, `[channels][squeezed]`,
    /// `[channels]`, for the CPU kernels.
    reduce_rows: Vec<f32>,
    reduce_bias_values: Vec<f32>,
    expand_rows: Vec<f32>,
    expand_bias_values: Vec<f32>,
}

impl SqueezeExcitation {
    /// `name.fc1` and `name.fc2`, each with `weight` and `bias`.
    pub fn load(
        name: &str,
        channels: usize,
        squeezed: usize,
        params: &mut dyn Params,
        device: &Device,
    ) -> Result<SqueezeExcitation> {
        let reduce_rows = params.take(&format!("{name}.fc1.weight"), &[squeezed, channels, 1, 1])?;
        let reduce_bias_values = params.take(&format!("{name}.fc1.bias"), &[squeezed])?;
        let expand_rows = params.take(&format!("{name}.fc2.weight"), &[channels, squeezed, 1, 1])?;
        let expand_bias_values = params.take(&format!("{name}.fc2.bias"), &[channels])?;
        let tensor4 = |values: &[f32], shape: [usize; 4]| {
            Tensor::<4>::from_data(TensorData::new(values.to_vec(), shape), device)
        };
        let tensor1 =
            |values: &[f32]| Tensor::<1>::from_data(TensorData::new(values.to_vec(), [values.len()]), device);
        Ok(SqueezeExcitation {
            reduce_weight: tensor4(&reduce_rows, [squeezed, channels, 1, 1]),
            reduce_bias: tensor1(&reduce_bias_values),
            expand_weight: tensor4(&expand_rows, [channels, squeezed, 1, 1]),
            expand_bias: tensor1(&expand_bias_values),
            reduce_rows,
            reduce_bias_values,
            expand_rows,
            expand_bias_values,
        })
    }

    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let [n, c, h, w] = x.dims();
        let pooled = x.clone().reshape([n, c, h * w]).mean_dim(2).reshape([n, c, 1, 1]);
        let pointwise = ConvOptions::new([1, 1], [0, 0], [1, 1], 1);
        let squeezed = silu(conv2d(
            pooled,
            self.reduce_weight.clone(),
            Some(self.reduce_bias.clone()),
            pointwise.clone(),
        ));
        let gates =
            sigmoid(conv2d(squeezed, self.expand_weight.clone(), Some(self.expand_bias.clone()), pointwise));
        x * gates
    }

    /// Rescales `x`'s channels in place.
    pub fn forward_nhwc(&self, x: &mut Nhwc) {
        squeeze_excite(
            x,
            (&self.reduce_rows, &self.reduce_bias_values),
            (&self.expand_rows, &self.expand_bias_values),
        );
    }
}

/// A ResNet basic block or bottleneck: the convolutions (the last without activation), the
/// optional 1x1 projection of the shortcut, then ReLU of the sum.
#[derive(Clone)]
pub(crate) struct ResidualBlock {
    pub convs: Vec<ConvBn>,
    pub downsample: Option<ConvBn>,
}

impl ResidualBlock {
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let shortcut = match &self.downsample {
            Some(projection) => projection.forward(x.clone()),
            None => x.clone(),
        };
        let y = self.convs.iter().fold(x, |y, conv| conv.forward(y));
        relu(y + shortcut)
    }

    pub fn forward_nhwc(&self, x: &Nhwc) -> Nhwc {
        let shortcut = self.downsample.as_ref().map(|projection| projection.forward_nhwc(x, None, None));
        let (last, inner) = self.convs.split_last().expect("a block has at least one convolution");
        let mut y: Option<Nhwc> = None;
        for conv in inner {
            y = Some(conv.forward_nhwc(y.as_ref().unwrap_or(x), None, None));
        }
        let residual = shortcut.as_ref().unwrap_or(x);
        last.forward_nhwc(y.as_ref().unwrap_or(x), Some(residual), Some(Activation::Relu))
    }
}

/// The ResNet stem on the CPU kernels: conv1 + bn1 + ReLU, then the 3x3/2 max pool.
pub(crate) fn resnet_stem_nhwc(conv: &ConvBn, x: &Nhwc) -> Nhwc {
    max_pool_3x3_s2(&conv.forward_nhwc(x, None, None))
}

/// Global average pooling and a linear layer (PyTorch `weight` [out, in], stored transposed).
#[derive(Clone)]
pub(crate) struct Classifier {
    weight_t: Tensor<2>,
    bias: Tensor<2>,
    /// `[out][in]` and `[out]`, for the CPU kernels.
    weight_rows: Vec<f32>,
    bias_values: Vec<f32>,
}

impl Classifier {
    pub fn load(
        name: &str,
        in_features: usize,
        out_features: usize,
        params: &mut dyn Params,
        device: &Device,
    ) -> Result<Classifier> {
        let weight = params.take(&format!("{name}.weight"), &[out_features, in_features])?;
        let bias = params.take(&format!("{name}.bias"), &[out_features])?;
        let weight_t =
            Tensor::<2>::from_data(TensorData::new(weight.clone(), [out_features, in_features]), device)
                .transpose();
        Ok(Classifier {
            weight_t,
            bias: Tensor::from_data(TensorData::new(bias.clone(), [1, out_features]), device),
            weight_rows: weight,
            bias_values: bias,
        })
    }

    pub fn forward(&self, features: Tensor<4>) -> Tensor<2> {
        let [n, c, h, w] = features.dims();
        let pooled = features.reshape([n, c, h * w]).mean_dim(2).reshape([n, c]);
        pooled.matmul(self.weight_t.clone()) + self.bias.clone()
    }

    pub fn forward_nhwc(&self, features: &Nhwc) -> Vec<f32> {
        let pooled = features.channel_means();
        self.weight_rows
            .chunks_exact(pooled.len())
            .zip(&self.bias_values)
            .map(|(row, b)| b + row.iter().zip(&pooled).map(|(w, p)| w * p).sum::<f32>())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tf_same_padding_is_asymmetric_for_stride_two() {
        // k3 s2 on 224: output 112, total padding 1, all of it at the end (TensorFlow convention).
        assert_eq!(tf_same_padding(224, 3, 2), (0, 1));
        // k5 s2 on 56: output 28, total padding 3 -> 1 before, 2 after.
        assert_eq!(tf_same_padding(56, 5, 2), (1, 2));
        // Odd sizes: k3 s2 on 7 -> output 4, total padding 2.
        assert_eq!(tf_same_padding(7, 3, 2), (1, 1));
        // Stride 1 keeps the size with symmetric padding.
        assert_eq!(tf_same_padding(14, 5, 1), (2, 2));
    }
}
