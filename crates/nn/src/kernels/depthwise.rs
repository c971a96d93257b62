//! Depthwise 2-D convolution (one filter per channel, stride 1, no dilation), NCHW f32: forward,
//! input gradient, weight gradient.
//!
//! A depthwise filter has one input channel, so a matrix product would have one row; burn-flex
//! computes its input gradient through a transposed convolution with a scalar scatter loop.
//! Here each channel plane is filtered directly: every tap adds a shifted input row, times the
//! tap's weight, to an output row (a multiply-add loop the compiler vectorises), and the input
//! gradient is the same filter flipped. This is what SSIM's 11x11 Gaussian blur runs on.
//! Planes go to the threads and each value is summed in a fixed order, so the results do not
//! depend on the thread count.

use rayon::prelude::*;

use super::conv::ConvGeometry;

vigil_core::simd_dispatch! {
    fn filter_plane(g: &ConvGeometry, plane: &[f32], taps: &[f32], out: &mut [f32]);
    fast = filter_plane_generic::<true>(g, plane, taps, out);
    portable = filter_plane_generic::<false>(g, plane, taps, out);
}

/// Adds the filtered `plane` to `out` (one output plane). `FMA` is whether the CPU fuses
/// multiply-add (without it, `mul_add` would be a slow library call).
#[inline(always)]
fn filter_plane_generic<const FMA: bool>(g: &ConvGeometry, plane: &[f32], taps: &[f32], out: &mut [f32]) {
    let [kh, kw] = g.kernel;
    let columns: Vec<(isize, std::ops::Range<usize>)> = (0..kw)
        .map(|kx| {
            let offset = kx as isize - g.pad_begin[1];
            (offset, g.valid_columns(offset))
        })
        .collect();
    for (oy, row) in out.chunks_exact_mut(g.out_w).enumerate() {
        for ky in 0..kh {
            let Some(iy) = g.input_row(oy, ky) else { continue };
            let input = &plane[iy * g.in_w..][..g.in_w];
            for (kx, (offset, valid)) in columns.iter().enumerate() {
                let w = taps[ky * kw + kx];
                let src = &input[(valid.start as isize + offset) as usize..][..valid.len()];
                for (o, &s) in row[valid.clone()].iter_mut().zip(src) {
                    *o = if FMA { s.mul_add(w, *o) } else { *o + s * w };
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

/// The input gradient: the output gradient filtered by the flipped filters.
pub(crate) fn input_grad(g: &ConvGeometry, weight: &[f32], grad: &[f32]) -> Vec<f32> {
    let taps = g.kernel[0] * g.kernel[1];
    let flipped: Vec<f32> =
        weight.chunks_exact(taps).flat_map(|filter| filter.iter().rev().copied()).collect();
    forward(&g.input_gradient_as_forward(), grad, &flipped, None)
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
            let offset = kx as isize - g.pad_begin[1];
            let valid = g.valid_columns(offset);
            let mut total = 0.0f64;
            for n in 0..g.batch {
                let plane = &x[(n * channels + c) * g.in_pixels()..][..g.in_pixels()];
                let grads = &grad[(n * channels + c) * g.out_pixels()..][..g.out_pixels()];
                let mut sum = [0.0f32; 8];
                for oy in 0..g.out_h {
                    let Some(iy) = g.input_row(oy, ky) else { continue };
                    let input =
                        &plane[iy * g.in_w + (valid.start as isize + offset) as usize..][..valid.len()];
                    let row = &grads[oy * g.out_w + valid.start..][..valid.len()];
                    for (i, (a, b)) in row.iter().zip(input).enumerate() {
                        sum[i % 8] += a * b;
                    }
                }
                total += f64::from(sum.iter().sum::<f32>());
            }
            total as f32
        })
        .collect()
}
