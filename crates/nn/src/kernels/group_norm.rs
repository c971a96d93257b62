//! GroupNorm fused with SiLU (or with no activation), NCHW f32, forward and backward.
//!
//! burn's GroupNorm is a reshape, two reductions and five element-wise passes, each recorded
//! for autodiff, and SiLU three more; here the forward is three passes over each group (sum,
//! squared deviations, normalise + activate) and the backward two (the activation's gradient
//! with the per-channel sums, then the input gradient in place), the activation recomputed from
//! the input instead of stored. A group's channels are contiguous in NCHW, so every (image,
//! group) is one task; each sum runs in a fixed order, so the results do not depend on the
//! thread count.

use rayon::prelude::*;

use super::conv::lane_sum;
use super::math::sigmoid;

/// `[batch, channels, pixels]` of the normalised tensor and its number of groups.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct GroupShape {
    pub batch: usize,
    pub channels: usize,
    pub pixels: usize,
    pub groups: usize,
}

impl GroupShape {
    fn len(&self) -> usize {
        self.batch * self.channels * self.pixels
    }

    fn channels_per_group(&self) -> usize {
        self.channels / self.groups
    }

    /// Values per (image, group): the count the statistics divide by.
    fn group_len(&self) -> usize {
        self.channels_per_group() * self.pixels
    }
}

/// Lanes of the per-plane sums: one AVX-512 register. Both dispatch paths run the same
/// operations in the same order (no fused multiply-add), so results do not depend on the CPU.
const LANES: usize = 16;

/// `z·σ(z)` (SiLU) or `z`.
#[inline(always)]
fn activate(z: f32, silu: bool) -> f32 {
    if silu {
        z * sigmoid(z)
    } else {
        z
    }
}

/// The derivative of [`activate`] at `z`: σ(z)·(1 + z·(1 − σ(z))) for SiLU.
#[inline(always)]
fn activation_slope(z: f32, silu: bool) -> f32 {
    if silu {
        let s = sigmoid(z);
        s * (1.0 + z * (1.0 - s))
    } else {
        1.0
    }
}

vigil_core::simd_dispatch! {
    fn normalise_plane(plane: &[f32], out: &mut [f32], scale_shift: (f32, f32), silu: bool);
    fast = normalise_plane_generic(plane, out, scale_shift, silu);
    portable = normalise_plane_generic(plane, out, scale_shift, silu);
}

#[inline(always)]
fn normalise_plane_generic(plane: &[f32], out: &mut [f32], (scale, shift): (f32, f32), silu: bool) {
    if silu {
        out.iter_mut().zip(plane).for_each(|(o, v)| *o = activate(v * scale + shift, true));
    } else {
        out.iter_mut().zip(plane).for_each(|(o, v)| *o = activate(v * scale + shift, false));
    }
}

/// How to normalise one channel of one image: the group's statistics and the (scale, shift)
/// that apply them with the channel's gamma and beta.
#[derive(Clone, Copy)]
struct ChannelMap {
    mean: f32,
    inv_std: f32,
    scale: f32,
    shift: f32,
}

impl ChannelMap {
    fn new(mean: f32, inv_std: f32, gamma: f32, beta: f32) -> ChannelMap {
        let scale = gamma * inv_std;
        ChannelMap { mean, inv_std, scale, shift: beta - mean * scale }
    }
}

vigil_core::simd_dispatch! {
    /// Writes the gradient before the activation into `dst` and returns its sum and the sum of
    /// it times the normalised input.
    fn activation_gradient_plane(plane: &[f32], grads: &[f32], dst: &mut [f32], map: ChannelMap, silu: bool)
        -> (f32, f32);
    fast = activation_gradient_plane_generic(plane, grads, dst, map, silu);
    portable = activation_gradient_plane_generic(plane, grads, dst, map, silu);
}

#[inline(always)]
fn activation_gradient_plane_generic(
    plane: &[f32],
    grads: &[f32],
    dst: &mut [f32],
    map: ChannelMap,
    silu: bool,
) -> (f32, f32) {
    let (mut sum, mut sum_normalised) = ([0.0f32; LANES], [0.0f32; LANES]);
    let mut step = |lane: usize, v: f32, g: f32, d: &mut f32| {
        let gz = g * activation_slope(v * map.scale + map.shift, silu);
        *d = gz;
        sum[lane] += gz;
        sum_normalised[lane] += gz * ((v - map.mean) * map.inv_std);
    };
    let mut values = plane.chunks_exact(LANES);
    let mut gradients = grads.chunks_exact(LANES);
    let mut outs = dst.chunks_exact_mut(LANES);
    for ((vs, gs), ds) in (&mut values).zip(&mut gradients).zip(&mut outs) {
        for lane in 0..LANES {
            step(lane, vs[lane], gs[lane], &mut ds[lane]);
        }
    }
    let tail = values.remainder().iter().zip(gradients.remainder()).zip(outs.into_remainder());
    for (lane, ((&v, &g), d)) in tail.enumerate() {
        step(lane, v, g, d);
    }
    (sum.iter().sum(), sum_normalised.iter().sum())
}

vigil_core::simd_dispatch! {
    /// Turns the gradient before the activation (`dst`) into the input gradient, from the
    /// group's two gradient means.
    fn input_gradient_plane(plane: &[f32], dst: &mut [f32], map: ChannelMap, gamma: f32, means: (f32, f32));
    fast = input_gradient_plane_generic(plane, dst, map, gamma, means);
    portable = input_gradient_plane_generic(plane, dst, map, gamma, means);
}

#[inline(always)]
fn input_gradient_plane_generic(
    plane: &[f32],
    dst: &mut [f32],
    map: ChannelMap,
    gamma: f32,
    (mean_grad, mean_normalised_grad): (f32, f32),
) {
    for (d, &v) in dst.iter_mut().zip(plane) {
        let normalised = (v - map.mean) * map.inv_std;
        *d = map.inv_std * (gamma * *d - mean_grad - normalised * mean_normalised_grad);
    }
}

/// Mean and biased variance of one group's values (two passes).
fn group_moments(block: &[f32]) -> (f64, f64) {
    let count = block.len() as f64;
    let mean = f64::from(lane_sum(block)) / count;
    let centre = mean as f32;
    let mut lanes = [0.0f32; 8];
    let chunks = block.chunks_exact(8);
    let tail: f32 = chunks.remainder().iter().map(|v| (v - centre) * (v - centre)).sum();
    for chunk in chunks {
        lanes.iter_mut().zip(chunk).for_each(|(l, v)| *l += (v - centre) * (v - centre));
    }
    (mean, f64::from(lanes.iter().sum::<f32>() + tail) / count)
}

/// The statistics of every (image, group), which the backward pass reuses.
#[derive(Clone, Debug)]
pub(crate) struct GroupMoments {
    pub mean: Vec<f32>,
    pub inv_std: Vec<f32>,
}

/// `activate(group_norm(x) · gamma + beta)` and the statistics of every (image, group).
pub(crate) fn forward(
    s: &GroupShape,
    x: &[f32],
    (gamma, beta): (&[f32], &[f32]),
    epsilon: f64,
    silu: bool,
) -> (Vec<f32>, GroupMoments) {
    assert_eq!(x.len(), s.len(), "group norm input size");
    let mut out = vec![0.0f32; s.len()];
    let cg = s.channels_per_group();
    let stats: Vec<(f32, f32)> = out
        .par_chunks_mut(s.group_len())
        .zip(x.par_chunks(s.group_len()))
        .enumerate()
        .map(|(task, (out, block))| {
            let g = task % s.groups;
            let (mean, variance) = group_moments(block);
            let (mean, inv_std) = (mean as f32, (1.0 / (variance + epsilon).sqrt()) as f32);
            for (k, (dst, plane)) in
                out.chunks_exact_mut(s.pixels).zip(block.chunks_exact(s.pixels)).enumerate()
            {
                let c = g * cg + k;
                let map = ChannelMap::new(mean, inv_std, gamma[c], beta[c]);
                normalise_plane(plane, dst, (map.scale, map.shift), silu);
            }
            (mean, inv_std)
        })
        .collect();
    let (mean, inv_std) = stats.into_iter().unzip();
    (out, GroupMoments { mean, inv_std })
}

/// Gradients of input, gamma and beta of [`forward`], given the output gradient.
pub(crate) fn backward(
    s: &GroupShape,
    x: &[f32],
    (gamma, beta): (&[f32], &[f32]),
    moments: &GroupMoments,
    silu: bool,
    grad: &[f32],
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    assert_eq!(grad.len(), s.len(), "group norm output gradient size");
    let cg = s.channels_per_group();
    let count = s.group_len() as f64;
    let mut dx = vec![0.0f32; s.len()];
    // Per (image, group): the sums of the pre-activation gradient and of it times the
    // normalised input, per channel of the group.
    let sums: Vec<Vec<(f32, f32)>> = dx
        .par_chunks_mut(s.group_len())
        .zip(x.par_chunks(s.group_len()))
        .zip(grad.par_chunks(s.group_len()))
        .enumerate()
        .map(|(task, ((dx, block), grads))| {
            let first = task % s.groups * cg;
            let (mean, inv_std) = (moments.mean[task], moments.inv_std[task]);
            let map = |k: usize| ChannelMap::new(mean, inv_std, gamma[first + k], beta[first + k]);
            let planes = dx.chunks_exact_mut(s.pixels).zip(block.chunks_exact(s.pixels));
            let sums: Vec<(f32, f32)> = planes
                .zip(grads.chunks_exact(s.pixels))
                .enumerate()
                .map(|(k, ((dst, plane), grads))| activation_gradient_plane(plane, grads, dst, map(k), silu))
                .collect();
            // The means over the group of the normalised-input gradient (gamma times the
            // pre-activation gradient) and of it times the normalised input.
            let (mut mean_grad, mut mean_normalised_grad) = (0.0f64, 0.0f64);
            for (k, (sum, sum_normalised)) in sums.iter().enumerate() {
                mean_grad += f64::from(gamma[first + k]) * f64::from(*sum);
                mean_normalised_grad += f64::from(gamma[first + k]) * f64::from(*sum_normalised);
            }
            let means = ((mean_grad / count) as f32, (mean_normalised_grad / count) as f32);
            let planes = dx.chunks_exact_mut(s.pixels).zip(block.chunks_exact(s.pixels));
            for (k, (dst, plane)) in planes.enumerate() {
                input_gradient_plane(plane, dst, map(k), gamma[first + k], means);
            }
            sums
        })
        .collect();
    // gamma's and beta's gradients: the per-image sums of each channel, added in image order.
    let (mut gamma_grad, mut beta_grad) = (vec![0.0f64; s.channels], vec![0.0f64; s.channels]);
    for (task, sums) in sums.iter().enumerate() {
        let first = task % s.groups * cg;
        for (k, (sum, sum_normalised)) in sums.iter().enumerate() {
            beta_grad[first + k] += f64::from(*sum);
            gamma_grad[first + k] += f64::from(*sum_normalised);
        }
    }
    let to_f32 = |v: Vec<f64>| v.into_iter().map(|v| v as f32).collect();
    (dx, to_f32(gamma_grad), to_f32(beta_grad))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(len: usize, seed: u32) -> Vec<f32> {
        (0..len)
            .map(|i| ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) % 1000) as f32 / 500.0 - 1.0)
            .collect()
    }

    /// The loss sum(out · r) in f64, straight from the definitions.
    fn loss(s: &GroupShape, x: &[f32], gamma: &[f32], beta: &[f32], silu: bool, r: &[f32]) -> f64 {
        let (cg, len) = (s.channels_per_group(), s.group_len());
        let mut total = 0.0;
        for (task, block) in x.chunks_exact(len).enumerate() {
            let all: Vec<f64> = block.iter().map(|&v| f64::from(v)).collect();
            let mean = all.iter().sum::<f64>() / len as f64;
            let var = all.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / len as f64;
            for (i, v) in all.iter().enumerate() {
                let c = task % s.groups * cg + i / s.pixels;
                let z = (v - mean) / (var + 1e-5).sqrt() * f64::from(gamma[c]) + f64::from(beta[c]);
                let a = if silu { z / (1.0 + (-z).exp()) } else { z };
                total += a * f64::from(r[task * len + i]);
            }
        }
        total
    }

    #[test]
    fn gradients_match_finite_differences() {
        for silu in [true, false] {
            let s = GroupShape { batch: 2, channels: 6, pixels: 7, groups: 3 };
            let x = values(s.len(), 1);
            let gamma: Vec<f32> = values(6, 5).iter().map(|v| v + 1.2).collect();
            let beta = values(6, 6);
            let r = values(s.len(), 2);
            let (_, moments) = forward(&s, &x, (&gamma, &beta), 1e-5, silu);
            let (dx, dgamma, dbeta) = backward(&s, &x, (&gamma, &beta), &moments, silu, &r);
            let h = 1e-3f32;
            let quotient = |plus: f64, minus: f64| (plus - minus) / (2.0 * f64::from(h));
            let loss = |x: &[f32], gamma: &[f32], beta: &[f32]| loss(&s, x, gamma, beta, silu, &r);
            let nudged = |v: &[f32], i: usize, e: f32| {
                let mut v = v.to_vec();
                v[i] += e;
                v
            };
            for (i, &dxi) in dx.iter().enumerate() {
                let d =
                    quotient(loss(&nudged(&x, i, h), &gamma, &beta), loss(&nudged(&x, i, -h), &gamma, &beta));
                assert!((d - f64::from(dxi)).abs() < 2e-3, "silu {silu} dx[{i}]: {d} vs {dxi}");
            }
            for c in 0..6 {
                let d =
                    quotient(loss(&x, &nudged(&gamma, c, h), &beta), loss(&x, &nudged(&gamma, c, -h), &beta));
                assert!((d - f64::from(dgamma[c])).abs() < 2e-3, "dgamma[{c}]: {d} vs {}", dgamma[c]);
                let d =
                    quotient(loss(&x, &gamma, &nudged(&beta, c, h)), loss(&x, &gamma, &nudged(&beta, c, -h)));
                assert!((d - f64::from(dbeta[c])).abs() < 2e-3, "dbeta[{c}]: {d} vs {}", dbeta[c]);
            }
        }
    }

    #[test]
    fn results_do_not_depend_on_the_thread_count() {
        let s = GroupShape { batch: 3, channels: 64, pixels: 67, groups: 32 };
        let x = values(s.len(), 3);
        let (gamma, beta) = (values(64, 4), values(64, 5));
        let r = values(s.len(), 6);
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            pool.install(|| {
                let (out, moments) = forward(&s, &x, (&gamma, &beta), 1e-5, true);
                (out, backward(&s, &x, (&gamma, &beta), &moments, true, &r))
            })
        };
        let one = run(1);
        assert_eq!(one, run(2));
        assert_eq!(one, run(5));
    }
}
