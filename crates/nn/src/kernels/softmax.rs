//! Softmax over the last axis of a scaled input, `softmax(scale · x)`, f32, forward and
//! backward: attention's weights in one pass per row instead of burn's max, subtract, exp, sum
//! and divide (five tensors recorded for autodiff). The scale folds attention's 1/√d into the
//! same pass. Rows are split into bands fixed by the shape, so the results do not depend on the
//! thread count.

use rayon::prelude::*;

use super::math::exp;

/// Lanes of the row sums: one AVX-512 register; both dispatch paths add in the same order.
const LANES: usize = 16;

/// Rows per task: at least 16k values, so small attention maps stay on one thread.
fn rows_per_band(row: usize) -> usize {
    (16_384 / row.max(1)).max(1)
}

vigil_core::simd_dispatch! {
    fn softmax_row(row: &[f32], out: &mut [f32], scale: f32);
    fast = softmax_row_generic(row, out, scale);
    portable = softmax_row_generic(row, out, scale);
}

#[inline(always)]
fn softmax_row_generic(row: &[f32], out: &mut [f32], scale: f32) {
    let mut maxima = [f32::NEG_INFINITY; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for chunk in &mut chunks {
        maxima.iter_mut().zip(chunk).for_each(|(m, &v)| *m = m.max(v));
    }
    let max = chunks.remainder().iter().chain(&maxima).fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let mut sums = [0.0f32; LANES];
    let (mut outs, mut values) = (out.chunks_exact_mut(LANES), row.chunks_exact(LANES));
    for (o, v) in (&mut outs).zip(&mut values) {
        for lane in 0..LANES {
            o[lane] = exp(scale * (v[lane] - max));
            sums[lane] += o[lane];
        }
    }
    for (lane, (o, &v)) in outs.into_remainder().iter_mut().zip(values.remainder()).enumerate() {
        *o = exp(scale * (v - max));
        sums[lane] += *o;
    }
    let inverse = 1.0 / sums.iter().sum::<f32>();
    out.iter_mut().for_each(|o| *o *= inverse);
}

vigil_core::simd_dispatch! {
    fn softmax_gradient_row(y: &[f32], grad: &[f32], out: &mut [f32], scale: f32);
    fast = softmax_gradient_row_generic(y, grad, out, scale);
    portable = softmax_gradient_row_generic(y, grad, out, scale);
}

/// `scale · y · (grad − Σ grad·y)`.
#[inline(always)]
fn softmax_gradient_row_generic(y: &[f32], grad: &[f32], out: &mut [f32], scale: f32) {
    let mut lanes = [0.0f32; LANES];
    let (mut ys, mut gs) = (y.chunks_exact(LANES), grad.chunks_exact(LANES));
    for (y, g) in (&mut ys).zip(&mut gs) {
        for lane in 0..LANES {
            lanes[lane] += y[lane] * g[lane];
        }
    }
    for (lane, (&y, &g)) in ys.remainder().iter().zip(gs.remainder()).enumerate() {
        lanes[lane] += y * g;
    }
    let dot = lanes.iter().sum::<f32>();
    for ((o, &y), &g) in out.iter_mut().zip(y).zip(grad) {
        *o = scale * y * (g - dot);
    }
}

/// `softmax(scale · x)` over rows of length `row`.
pub(crate) fn forward(x: &[f32], row: usize, scale: f32) -> Vec<f32> {
    let mut out = vec![0.0f32; x.len()];
    let band = rows_per_band(row) * row;
    out.par_chunks_mut(band).zip(x.par_chunks(band)).for_each(|(out, x)| {
        for (o, r) in out.chunks_exact_mut(row).zip(x.chunks_exact(row)) {
            softmax_row(r, o, scale);
        }
    });
    out
}

/// The input gradient of [`forward`] from its output `y` and the output gradient.
pub(crate) fn backward(y: &[f32], grad: &[f32], row: usize, scale: f32) -> Vec<f32> {
    let mut dx = vec![0.0f32; y.len()];
    let band = rows_per_band(row) * row;
    dx.par_chunks_mut(band).zip(y.par_chunks(band)).zip(grad.par_chunks(band)).for_each(|((dx, y), grad)| {
        for ((d, y), g) in dx.chunks_exact_mut(row).zip(y.chunks_exact(row)).zip(grad.chunks_exact(row)) {
            softmax_gradient_row(y, g, d, scale);
        }
    });
    dx
}
