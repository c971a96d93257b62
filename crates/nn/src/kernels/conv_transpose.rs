//! Transposed 2-D convolution (one group), NCHW f32, forward and backward, by the convolution
//! kernels of [`super::conv`].
//!
//! A transposed convolution of `x` by a weight `[in, out, kh, kw]` is the input gradient of the
//! convolution with that weight read as `[out = in, in = out, kh, kw]` whose input is the
//! transposed convolution's output: so its forward pass is [`conv::input_grad`], its input
//! gradient the convolution's [`conv::forward`] of the output gradient, and its weight gradient
//! [`conv::weight_grad`] with the roles of image and gradient swapped. burn-flex runs the
//! forward pass as a scalar scatter loop.

use rayon::prelude::*;

use super::conv::{self, lane_sum, ConvGeometry};

/// The shapes of a transposed convolution: input `[batch, in_channels, h, w]`, weight
/// `[in_channels, out_channels, kh, kw]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct TransposedShape {
    pub input: [usize; 4],
    pub weight: [usize; 4],
    pub stride: [usize; 2],
    pub padding: [usize; 2],
    pub padding_out: [usize; 2],
    pub dilation: [usize; 2],
}

impl TransposedShape {
    /// The convolution whose input gradient this transposed convolution is, or `None` when the
    /// shapes do not describe one (burn's operation then reports the problem).
    pub fn geometry(&self) -> Option<ConvGeometry> {
        let [batch, in_channels, h, w] = self.input;
        let [weight_in, out_channels, kh, kw] = self.weight;
        if weight_in != in_channels || self.stride.contains(&0) || self.dilation.contains(&0) {
            return None;
        }
        let size = |axis: usize, input: usize, kernel: usize| -> Option<usize> {
            let full = (input.checked_sub(1)? * self.stride[axis]
                + self.dilation[axis] * (kernel.checked_sub(1)?)
                + self.padding_out[axis]
                + 1)
            .checked_sub(2 * self.padding[axis])?;
            // The convolution over `full` pixels must give back `input` pixels.
            let back = (full + 2 * self.padding[axis]).checked_sub(self.dilation[axis] * (kernel - 1) + 1)?
                / self.stride[axis]
                + 1;
            (full > 0 && back == input).then_some(full)
        };
        Some(ConvGeometry {
            batch,
            in_channels: out_channels,
            in_h: size(0, h, kh)?,
            in_w: size(1, w, kw)?,
            out_channels: in_channels,
            kernel: [kh, kw],
            stride: self.stride,
            dilation: self.dilation,
            pad_begin: [self.padding[0] as isize, self.padding[1] as isize],
            out_h: h,
            out_w: w,
            depthwise: false,
        })
    }
}

/// The transposed convolution of `x` by `weight` (+ bias): `[batch, out_channels, in_h, in_w]`
/// of `g`.
pub(crate) fn forward(g: &ConvGeometry, x: &[f32], weight: &[f32], bias: Option<&[f32]>) -> Vec<f32> {
    let mut out = conv::input_grad(g, weight, x);
    if let Some(bias) = bias {
        out.par_chunks_mut(g.in_pixels()).enumerate().for_each(|(plane, values)| {
            let b = bias[plane % g.in_channels];
            values.iter_mut().for_each(|v| *v += b);
        });
    }
    out
}

/// The input gradient: the convolution of the output gradient.
pub(crate) fn input_grad(g: &ConvGeometry, weight: &[f32], grad: &[f32]) -> Vec<f32> {
    conv::forward(g, grad, weight, None)
}

/// The weight gradient `[in_channels, out_channels·kh·kw]`.
pub(crate) fn weight_grad(g: &ConvGeometry, x: &[f32], grad: &[f32]) -> Vec<f32> {
    conv::weight_grad(g, grad, x)
}

/// The bias gradient: the sum of the output gradient over the batch and pixels of each channel.
pub(crate) fn bias_grad(g: &ConvGeometry, grad: &[f32]) -> Vec<f32> {
    let (channels, pixels) = (g.in_channels, g.in_pixels());
    (0..channels)
        .into_par_iter()
        .map(|c| (0..g.batch).map(|n| lane_sum(&grad[(n * channels + c) * pixels..][..pixels])).sum())
        .collect()
}
