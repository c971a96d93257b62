//! Depthwise 2-D convolution (one filter per channel, any stride, no dilation), NCHW f32:
//! forward, input gradient, weight gradient.
//!
//! A depthwise filter has one input channel, so a matrix product would have one row; burn-flex
//! computes its input gradient through a transposed convolution with a scalar scatter loop.
//! Here each channel plane is filtered directly: every tap adds a shifted input row, times the
//! tap's weight, to an output row (a multiply-add loop the compiler vectorises). At stride 1 the
//! input gradient is the same filter flipped; at other strides (MobileNetV2's down-sampling
//! blocks) each output-gradient row, times a tap's weight, is added back into the input row it
//! was read from. This is also what SSIM's 11x11 Gaussian blur runs on. Planes (and for the
//! weight gradient, taps) go to the threads and each value is summed in a fixed order, so the
//! results do not depend on the thread count.

use rayon::prelude::*;

use super::conv::ConvGeometry;

vigil_core::simd_dispatch! {
    fn filter_plane(g: &ConvGeometry, plane: &[f32], taps: &[f32], out: &mut [f32]);
    fast = filter_plane_generic::<true>(g, plane, taps, out);
    portable = filter_plane_generic::<false>(g, plane, taps, out);
}

/// `(offset, valid output columns)` of each kernel column: output column `ox` reads input
/// column `ox·stride + offset`.
fn tap_columns(g: &ConvGeometry) -> Vec<(isize, std::ops::Range<usize>)> {
    (0..g.kernel[1])
        .map(|kx| {
            let offset = kx as isize - g.pad_begin[1];
            (offset, g.valid_columns(offset))
        })
        .collect()
}

/// Adds the filtered `plane` to `out` (one output plane). `FMA` is whether the CPU fuses
/// multiply-add (without it, `mul_add` would be a slow library call).
#[inline(always)]
fn filter_plane_generic<const FMA: bool>(g: &ConvGeometry, plane: &[f32], taps: &[f32], out: &mut [f32]) {
    let [kh, kw] = g.kernel;
    let stride = g.stride[1];
    let columns = tap_columns(g);
    for (oy, row) in out.chunks_exact_mut(g.out_w).enumerate() {
        for ky in 0..kh {
            let Some(iy) = g.input_row(oy, ky) else { continue };
            let input = &plane[iy * g.in_w..][..g.in_w];
            for (kx, (offset, valid)) in columns.iter().enumerate() {
                let w = taps[ky * kw + kx];
                let start = (valid.start * stride) as isize + offset;
                let row = &mut row[valid.clone()];
                if stride == 1 {
                    let src = &input[start as usize..][..valid.len()];
                    for (o, &s) in row.iter_mut().zip(src) {
                        *o = if FMA { s.mul_add(w, *o) } else { *o + s * w };
                    }
                } else {
                    let src = input[start as usize..].iter().step_by(stride);
                    for (o, &s) in row.iter_mut().zip(src) {
                        *o = if FMA { s.mul_add(w, *o) } else { *o + s * w };
                    }
                }
            }
        }
    }
}

/// `[batch, channels, in_h, in_w]` filtered by `weight` `[channels, kh·kw]` (+ bias).
pub(crate) fn forward(g: &ConvGeometry, x: &[f32], weight: &[f32], bias: Option<&[f32]>) -> Vec<f32> {
    let (taps, channels) = (g.kernel[0] * g.kernel[1], g.out_channels);
    let mut out = vec![0.0f32; g.batch * channels * g.out_pixels()];
    out.par_chunks_mut(g.out_pixels()).enumerate().for_each(|(plane, out)| {
        let c = plane % channels;
        if let Some(bias) = bias {
            out.fill(bias[c]);
        }
        filter_plane(g, &x[plane * g.in_pixels()..][..g.in_pixels()], &weight[c * taps..][..taps], out);
    });
    out
}

vigil_core::simd_dispatch! {
    /// Adds one output-gradient plane, through the filter `taps`, back into the input-gradient
    /// plane `dx` at the positions it was read from (strided convolutions).
    fn scatter_plane(g: &ConvGeometry, grads: &[f32], taps: &[f32], dx: &mut [f32]);
    fast = scatter_plane_generic(g, grads, taps, dx);
    portable = scatter_plane_generic(g, grads, taps, dx);
}

#[inline(always)]
fn scatter_plane_generic(g: &ConvGeometry, grads: &[f32], taps: &[f32], dx: &mut [f32]) {
    let [kh, kw] = g.kernel;
    let stride = g.stride[1];
    let columns = tap_columns(g);
    for (oy, row) in grads.chunks_exact(g.out_w).enumerate() {
        for ky in 0..kh {
            let Some(iy) = g.input_row(oy, ky) else { continue };
            let input = &mut dx[iy * g.in_w..][..g.in_w];
            for (kx, (offset, valid)) in columns.iter().enumerate() {
                let w = taps[ky * kw + kx];
                let start = ((valid.start * stride) as isize + offset) as usize;
                let dst = input[start..].iter_mut().step_by(stride);
                for (d, &s) in dst.zip(&row[valid.clone()]) {
                    *d += s * w;
                }
            }
        }
    }
}

/// The input gradient: at stride 1 the output gradient filtered by the flipped filters, else
/// each output gradient scattered back through the filter.
pub(crate) fn input_grad(g: &ConvGeometry, weight: &[f32], grad: &[f32]) -> Vec<f32> {
    let taps = g.kernel[0] * g.kernel[1];
    if g.stride == [1, 1] {
        let flipped: Vec<f32> =
            weight.chunks_exact(taps).flat_map(|filter| filter.iter().rev().copied()).collect();
        return forward(&g.input_gradient_as_forward(), grad, &flipped, None);
    }
    let channels = g.out_channels;
    let mut dx = vec![0.0f32; g.batch * channels * g.in_pixels()];
    dx.par_chunks_mut(g.in_pixels()).enumerate().for_each(|(plane, dx)| {
        let c = plane % channels;
        scatter_plane(g, &grad[plane * g.out_pixels()..][..g.out_pixels()], &weight[c * taps..][..taps], dx);
    });
    dx
}

vigil_core::simd_dispatch! {
    /// Σ over one plane of the output gradient times the input under tap (ky, kx).
    fn tap_sum(g: &ConvGeometry, plane: &[f32], grads: &[f32], tap: (usize, usize)) -> f32;
    fast = tap_sum_generic(g, plane, grads, tap);
    portable = tap_sum_generic(g, plane, grads, tap);
}

/// Sums in 16 lanes, combined in a fixed order; the same operations on both dispatch paths (no
/// fused multiply-add), so the weight gradient does not depend on the CPU.
#[inline(always)]
fn tap_sum_generic(g: &ConvGeometry, plane: &[f32], grads: &[f32], (ky, kx): (usize, usize)) -> f32 {
    let stride = g.stride[1];
    let offset = kx as isize - g.pad_begin[1];
    let valid = g.valid_columns(offset);
    let start = ((valid.start * stride) as isize + offset) as usize;
    let mut lanes = [0.0f32; 16];
    for oy in 0..g.out_h {
        let Some(iy) = g.input_row(oy, ky) else { continue };
        let input = &plane[iy * g.in_w + start..];
        let row = &grads[oy * g.out_w + valid.start..][..valid.len()];
        if stride == 1 {
            let input = &input[..valid.len()];
            let (chunks_a, chunks_b) = (row.chunks_exact(16), input.chunks_exact(16));
            let tail = chunks_a.remainder().iter().zip(chunks_b.remainder());
            for (ca, cb) in chunks_a.zip(chunks_b) {
                for lane in 0..16 {
                    lanes[lane] += ca[lane] * cb[lane];
                }
            }
            for (lane, (a, b)) in tail.enumerate() {
                lanes[lane] += a * b;
            }
        } else {
            for (i, (a, b)) in row.iter().zip(input.iter().step_by(stride)).enumerate() {
                lanes[i % 16] += a * b;
            }
        }
    }
    lanes.iter().sum()
}

/// The weight gradient `[channels, kh·kw]`: per tap, the sum over the batch of the output
/// gradient times the input shifted by the tap.
pub(crate) fn weight_grad(g: &ConvGeometry, x: &[f32], grad: &[f32]) -> Vec<f32> {
    let [kh, kw] = g.kernel;
    let channels = g.out_channels;
    (0..channels * kh * kw)
        .into_par_iter()
        .map(|index| {
            let (c, ky, kx) = (index / (kh * kw), index / kw % kh, index % kw);
            let total: f64 = (0..g.batch)
                .map(|n| {
                    let plane = &x[(n * channels + c) * g.in_pixels()..][..g.in_pixels()];
                    let grads = &grad[(n * channels + c) * g.out_pixels()..][..g.out_pixels()];
                    f64::from(tap_sum(g, plane, grads, (ky, kx)))
                })
                .sum();
            total as f32
        })
        .collect()
}
