//! Resampling by 2 of NCHW f32 planes: nearest-neighbour up-sampling and 2x2 average pooling
//! with stride 2, forward and backward, as the diffusion U-Net's residual blocks resample.
//!
//! burn-flex runs both through its general interpolation and pooling code (index arithmetic per
//! value, the nearest backward as a scatter); here each is a copy or a sum of row pairs. Planes
//! go to the threads; every value is computed the same way whichever thread runs it.

use rayon::prelude::*;

/// Planes per task: at least 16k values.
fn planes_per_band(plane: usize) -> usize {
    (16_384 / plane.max(1)).max(1)
}

/// `[planes, h, w]` → `[planes, 2h, 2w]`, every value repeated in a 2x2 block
/// (`interpolate(scale 2, nearest)`).
pub(crate) fn upsample_nearest2(x: &[f32], [h, w]: [usize; 2]) -> Vec<f32> {
    let (plane_in, plane_out) = (h * w, 4 * h * w);
    let mut out = vec![0.0f32; x.len() * 4];
    let per = planes_per_band(plane_out);
    out.par_chunks_mut(per * plane_out).zip(x.par_chunks(per * plane_in)).for_each(|(out, x)| {
        for (rows, row) in out.chunks_exact_mut(4 * w).zip(x.chunks_exact(w)) {
            let (upper, lower) = rows.split_at_mut(2 * w);
            for (pair, &v) in upper.chunks_exact_mut(2).zip(row) {
                pair.fill(v);
            }
            lower.copy_from_slice(upper);
        }
    });
    out
}

/// The input gradient of [`upsample_nearest2`]: the sum of each 2x2 block of `grad`
/// (`[planes, 2h, 2w]` → `[planes, h, w]`).
pub(crate) fn upsample_nearest2_backward(grad: &[f32], [h, w]: [usize; 2]) -> Vec<f32> {
    let (plane_in, plane_out) = (h * w, 4 * h * w);
    let mut dx = vec![0.0f32; grad.len() / 4];
    let per = planes_per_band(plane_out);
    dx.par_chunks_mut(per * plane_in).zip(grad.par_chunks(per * plane_out)).for_each(|(dx, grad)| {
        for (row, rows) in dx.chunks_exact_mut(w).zip(grad.chunks_exact(4 * w)) {
            let (upper, lower) = rows.split_at(2 * w);
            for ((d, u), l) in row.iter_mut().zip(upper.chunks_exact(2)).zip(lower.chunks_exact(2)) {
                *d = (u[0] + u[1]) + (l[0] + l[1]);
            }
        }
    });
    dx
}

/// `[planes, h, w]` → `[planes, h/2, w/2]` (rounded down), the mean of each 2x2 block
/// (`avg_pool2d(kernel 2, stride 2)`; an odd last row or column is left out).
pub(crate) fn avg_pool2(x: &[f32], [h, w]: [usize; 2]) -> Vec<f32> {
    let (oh, ow) = (h / 2, w / 2);
    let (plane_in, plane_out) = (h * w, oh * ow);
    let mut out = vec![0.0f32; x.len() / plane_in * plane_out];
    if plane_out == 0 {
        return out;
    }
    let per = planes_per_band(plane_in);
    out.par_chunks_mut(per * plane_out).zip(x.par_chunks(per * plane_in)).for_each(|(out, x)| {
        for (out, plane) in out.chunks_exact_mut(plane_out).zip(x.chunks_exact(plane_in)) {
            for (oy, row) in out.chunks_exact_mut(ow).enumerate() {
                let (upper, lower) = (&plane[2 * oy * w..][..2 * ow], &plane[(2 * oy + 1) * w..][..2 * ow]);
                for ((o, u), l) in row.iter_mut().zip(upper.chunks_exact(2)).zip(lower.chunks_exact(2)) {
                    *o = ((u[0] + u[1]) + (l[0] + l[1])) * 0.25;
                }
            }
        }
    });
    out
}

/// The input gradient of [`avg_pool2`]: a quarter of each output gradient to every value of its
/// block, zero for a left-out row or column.
pub(crate) fn avg_pool2_backward(grad: &[f32], [h, w]: [usize; 2]) -> Vec<f32> {
    let (oh, ow) = (h / 2, w / 2);
    let (plane_in, plane_out) = (h * w, oh * ow);
    let planes = grad.len().checked_div(plane_out).unwrap_or(0);
    let mut dx = vec![0.0f32; planes * plane_in];
    if plane_out == 0 {
        return dx;
    }
    let per = planes_per_band(plane_in);
    dx.par_chunks_mut(per * plane_in).zip(grad.par_chunks(per * plane_out)).for_each(|(dx, grad)| {
        for (plane, grad) in dx.chunks_exact_mut(plane_in).zip(grad.chunks_exact(plane_out)) {
            for (oy, row) in grad.chunks_exact(ow).enumerate() {
                let (upper, rest) = plane[2 * oy * w..].split_at_mut(w);
                let lower = &mut rest[..w];
                for ((u, l), &g) in upper.chunks_exact_mut(2).zip(lower.chunks_exact_mut(2)).zip(row) {
                    let quarter = g * 0.25;
                    u.fill(quarter);
                    l.fill(quarter);
                }
            }
        }
    });
    dx
}
