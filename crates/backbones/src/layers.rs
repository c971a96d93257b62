//! Inference-only building blocks: convolutions with their batch norm folded in, and the
//! blocks the supported architectures are made of.

use burn::tensor::activation::{relu, relu6};
use burn::tensor::module::{conv2d, max_pool2d};
use burn::tensor::ops::{ConvOptions, MaxPoolOptions};
use burn::tensor::{Device, Tensor, TensorData};
use vigil_core::Result;

use crate::params::Params;

#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Activation {
    Identity,
    Relu,
    Relu6,
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
}

impl ConvBn {
    pub fn load(spec: &ConvSpec, params: &mut dyn Params, device: &Device) -> Result<ConvBn> {
        let ConvSpec { conv, bn, in_channels, out_channels, kernel, .. } = *spec;
        let mut weight = params
            .take(&format!("{conv}.weight"), &[out_channels, in_channels / spec.groups, kernel, kernel])?;
        let gamma = params.take(&format!("{bn}.weight"), &[out_channels])?;
        let beta = params.take(&format!("{bn}.bias"), &[out_channels])?;
        let mean = params.take(&format!("{bn}.running_mean"), &[out_channels])?;
        let var = params.take(&format!("{bn}.running_var"), &[out_channels])?;
        let per_filter = weight.len() / out_channels;
        let mut bias = Vec::with_capacity(out_channels);
        for o in 0..out_channels {
            let scale = gamma[o] / (var[o] + spec.bn_eps).sqrt();
            weight[o * per_filter..(o + 1) * per_filter].iter_mut().for_each(|w| *w *= scale);
            bias.push(beta[o] - mean[o] * scale);
        }
        let shape = [out_channels, in_channels / spec.groups, kernel, kernel];
        Ok(ConvBn {
            weight: Tensor::from_data(TensorData::new(weight, shape), device),
            bias: Tensor::from_data(TensorData::new(bias, [out_channels]), device),
            kernel,
            stride: spec.stride,
            groups: spec.groups,
            padding: spec.padding,
            activation: spec.activation,
        })
    }

    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let [_, _, height, width] = x.dims();
        let padding = match self.padding {
            Padding::Symmetric(p) => [(p, p), (p, p)],
            Padding::TfSame => [
                tf_same_padding(height, self.kernel, self.stride),
                tf_same_padding(width, self.kernel, self.stride),
            ],
        };
        let options = ConvOptions::new_with_padding([self.stride; 2], padding, [1, 1], self.groups);
        let y = conv2d(x, self.weight.clone(), Some(self.bias.clone()), options);
        match self.activation {
            Activation::Identity => y,
            Activation::Relu => relu(y),
            Activation::Relu6 => relu6(y),
        }
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

/// The inverted residual of MobileNetV2 and the (squeeze-excite-free) MBConv of
/// EfficientNet-Lite: expand 1x1, depthwise kxk, project 1x1, plus the input when shapes allow.
#[derive(Clone)]
pub(crate) struct InvertedResidual {
    pub convs: Vec<ConvBn>,
    pub residual: bool,
}

impl InvertedResidual {
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let y = self.convs.iter().fold(x.clone(), |y, conv| conv.forward(y));
        if self.residual {
            y + x
        } else {
            y
        }
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
}

/// Global average pooling and a linear layer (PyTorch `weight` [out, in], stored transposed).
#[derive(Clone)]
pub(crate) struct Classifier {
    weight_t: Tensor<2>,
    bias: Tensor<2>,
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
        let weight: Tensor<2> =
            Tensor::from_data(TensorData::new(weight, [out_features, in_features]), device);
        Ok(Classifier {
            weight_t: weight.transpose(),
            bias: Tensor::from_data(TensorData::new(bias, [1, out_features]), device),
        })
    }

    pub fn forward(&self, features: Tensor<4>) -> Tensor<2> {
        let [n, c, h, w] = features.dims();
        let pooled = features.reshape([n, c, h * w]).mean_dim(2).reshape([n, c]);
        pooled.matmul(self.weight_t.clone()) + self.bias.clone()
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
