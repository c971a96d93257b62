//! BatchNorm in training mode fused with a (leaky) ReLU, optionally clamped above (ReLU6), NCHW
//! f32, forward and backward. Slope 1 without a clamp is the plain BatchNorm.
//!
//! burn computes the batch statistics, the normalisation, the activation and their gradients
//! as a dozen separate element-wise passes; here the forward is three passes over each channel
//! (sum, squared deviations, normalise + activate) and the backward two (the two gradient sums,
//! then the input gradient), with the activation's gradient recomputed from the input instead of
//! stored. Channels go to the threads; each channel's sums run in a fixed order, so the results
//! do not depend on the thread count.

use rayon::prelude::*;

use super::conv::lane_sum;
use super::SharedOut;

/// `[batch, channels, pixels]` of the normalised tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct NormShape {
    pub batch: usize,
    pub channels: usize,
    pub pixels: usize,
}

impl NormShape {
    fn len(&self) -> usize {
        self.batch * self.channels * self.pixels
    }

    /// Values per channel: the count the statistics divide by.
    fn per_channel(&self) -> usize {
        self.batch * self.pixels
    }

    /// The planes of channel `c`, one per image.
    fn planes<'a>(&self, values: &'a [f32], c: usize) -> impl Iterator<Item = &'a [f32]> + 'a {
        let (channels, pixels) = (self.channels, self.pixels);
        (0..self.batch).map(move |n| &values[(n * channels + c) * pixels..][..pixels])
    }
}

/// The activation of `z = x·scale + shift`: `min(z, max)` for positive values, `slope·z`
/// otherwise (ReLU: slope 0, max ∞; ReLU6: slope 0, max 6; identity: slope 1, max ∞).
#[inline(always)]
fn activate(z: f32, slope: f32, max: f32) -> f32 {
    if z > 0.0 {
        z.min(max)
    } else {
        z * slope
    }
}

/// The activation's derivative applied to `g`: `g` on (0, max), 0 at or above `max` (as
/// PyTorch's ReLU6), `slope·g` at or below 0.
#[inline(always)]
fn activation_grad(z: f32, g: f32, slope: f32, max: f32) -> f32 {
    if z > 0.0 {
        if z < max {
            g
        } else {
            0.0
        }
    } else {
        g * slope
    }
}

/// The activation after the normalisation: negative slope and upper clamp (see [`activate`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Act {
    pub slope: f32,
    pub max: f32,
}

/// Lanes of the per-plane sums: one AVX-512 register. Both dispatch paths run the same
/// operations in the same order (no fused multiply-add), so results do not depend on the CPU.
const LANES: usize = 16;

vigil_core::simd_dispatch! {
    fn normalise_plane(plane: &[f32], out: &mut [f32], scale_shift: (f32, f32), act: Act);
    fast = normalise_plane_generic(plane, out, scale_shift, act);
    portable = normalise_plane_generic(plane, out, scale_shift, act);
}

#[inline(always)]
fn normalise_plane_generic(plane: &[f32], out: &mut [f32], (scale, shift): (f32, f32), act: Act) {
    out.iter_mut().zip(plane).for_each(|(o, v)| *o = activate(v * scale + shift, act.slope, act.max));
}

vigil_core::simd_dispatch! {
    /// Sums over one plane of the gradient before the activation, and of it times the
    /// normalised input.
    fn gradient_sums(plane: &[f32], grads: &[f32], st: &ChannelStats, act: Act) -> (f32, f32);
    fast = gradient_sums_generic(plane, grads, st, act);
    portable = gradient_sums_generic(plane, grads, st, act);
}

#[inline(always)]
fn gradient_sums_generic(plane: &[f32], grads: &[f32], st: &ChannelStats, act: Act) -> (f32, f32) {
    let (mut sum, mut sum_normalised) = ([0.0f32; LANES], [0.0f32; LANES]);
    let mut add = |lane: usize, v: f32, g: f32| {
        let gz = activation_grad(v * st.scale + st.shift, g, act.slope, act.max);
        sum[lane] += gz;
        sum_normalised[lane] += gz * ((v - st.mean) * st.inv_std);
    };
    let (values, gradients) = (plane.chunks_exact(LANES), grads.chunks_exact(LANES));
    let tail = values.remainder().iter().zip(gradients.remainder());
    for (vs, gs) in values.zip(gradients) {
        for lane in 0..LANES {
            add(lane, vs[lane], gs[lane]);
        }
    }
    for (lane, (&v, &g)) in tail.enumerate() {
        add(lane, v, g);
    }
    (sum.iter().sum(), sum_normalised.iter().sum())
}

vigil_core::simd_dispatch! {
    /// One plane of the input gradient, from the two per-channel gradient means.
    fn input_gradient_plane(
        plane: &[f32],
        grads: &[f32],
        out: &mut [f32],
        stats_gamma: (&ChannelStats, f32),
        means: (f32, f32),
        act: Act,
    );
    fast = input_gradient_plane_generic(plane, grads, out, stats_gamma, means, act);
    portable = input_gradient_plane_generic(plane, grads, out, stats_gamma, means, act);
}

#[inline(always)]
fn input_gradient_plane_generic(
    plane: &[f32],
    grads: &[f32],
    out: &mut [f32],
    (st, gamma): (&ChannelStats, f32),
    (mean_grad, mean_normalised_grad): (f32, f32),
    act: Act,
) {
    let factor = gamma * st.inv_std;
    for ((d, &v), &g) in out.iter_mut().zip(plane).zip(grads) {
        let gz = activation_grad(v * st.scale + st.shift, g, act.slope, act.max);
        let normalised = (v - st.mean) * st.inv_std;
        *d = factor * (gz - mean_grad - normalised * mean_normalised_grad);
    }
}

/// What normalising one channel takes: its statistics and the (scale, shift) that apply them
/// with `gamma` and `beta`.
struct ChannelStats {
    mean: f32,
    inv_std: f32,
    scale: f32,
    shift: f32,
}

impl ChannelStats {
    fn new(mean: f64, variance: f64, gamma: f32, beta: f32, epsilon: f64) -> ChannelStats {
        let inv_std = 1.0 / (variance + epsilon).sqrt();
        let scale = f64::from(gamma) * inv_std;
        ChannelStats {
            mean: mean as f32,
            inv_std: inv_std as f32,
            scale: scale as f32,
            shift: (f64::from(beta) - mean * scale) as f32,
        }
    }
}

/// Mean and biased variance of channel `c` (two passes: the mean, then squared deviations).
fn channel_moments(s: &NormShape, x: &[f32], c: usize) -> (f64, f64) {
    let count = s.per_channel() as f64;
    let mean = s.planes(x, c).map(|p| f64::from(lane_sum(p))).sum::<f64>() / count;
    let centre = mean as f32;
    let variance = s
        .planes(x, c)
        .map(|p| {
            let mut lanes = [0.0f32; 8];
            let chunks = p.chunks_exact(8);
            let tail: f32 = chunks.remainder().iter().map(|v| (v - centre) * (v - centre)).sum();
            for chunk in chunks {
                lanes.iter_mut().zip(chunk).for_each(|(l, v)| *l += (v - centre) * (v - centre));
            }
            f64::from(lanes.iter().sum::<f32>() + tail)
        })
        .sum::<f64>()
        / count;
    (mean, variance)
}

/// Output, batch mean and biased batch variance (per channel) of
/// `activate(batch_norm(x, gamma, beta))`.
pub(crate) fn forward(
    s: &NormShape,
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    epsilon: f64,
    act: Act,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    assert_eq!(x.len(), s.len(), "batch norm input size");
    let mut out = vec![0.0f32; s.len()];
    let shared = SharedOut(out.as_mut_ptr());
    let stats: Vec<(f32, f32)> = (0..s.channels)
        .into_par_iter()
        .map(|c| {
            let (mean, variance) = channel_moments(s, x, c);
            let st = ChannelStats::new(mean, variance, gamma[c], beta[c], epsilon);
            for (n, plane) in s.planes(x, c).enumerate() {
                // SAFETY: channel c's task alone writes plane (n, c) of `out`, which outlives the
                // parallel loop.
                let dst = unsafe {
                    std::slice::from_raw_parts_mut(
                        shared.get().add((n * s.channels + c) * s.pixels),
                        s.pixels,
                    )
                };
                normalise_plane(plane, dst, (st.scale, st.shift), act);
            }
            (mean as f32, variance as f32)
        })
        .collect();
    let (mean, variance) = stats.into_iter().unzip();
    (out, mean, variance)
}

/// The batch statistics [`forward`] returned, which its backward pass reuses.
pub(crate) struct BatchMoments<'a> {
    pub mean: &'a [f32],
    pub variance: &'a [f32],
}

/// Gradients of input, gamma and beta of [`forward`], given the output gradient.
pub(crate) fn backward(
    s: &NormShape,
    x: &[f32],
    (gamma, beta): (&[f32], &[f32]),
    moments: BatchMoments,
    epsilon: f64,
    act: Act,
    grad: &[f32],
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    assert_eq!(grad.len(), s.len(), "batch norm output gradient size");
    let count = s.per_channel() as f32;
    let mut dx = vec![0.0f32; s.len()];
    let shared = SharedOut(dx.as_mut_ptr());
    let sums: Vec<(f32, f32)> = (0..s.channels)
        .into_par_iter()
        .map(|c| {
            let (mean, variance) = (f64::from(moments.mean[c]), f64::from(moments.variance[c]));
            let st = ChannelStats::new(mean, variance, gamma[c], beta[c], epsilon);
            let (mut beta_grad, mut gamma_grad) = (0.0f64, 0.0f64);
            for (plane, grads) in s.planes(x, c).zip(s.planes(grad, c)) {
                let (sum, sum_normalised) = gradient_sums(plane, grads, &st, act);
                beta_grad += f64::from(sum);
                gamma_grad += f64::from(sum_normalised);
            }
            let (beta_grad, gamma_grad) = (beta_grad as f32, gamma_grad as f32);
            let means = (beta_grad / count, gamma_grad / count);
            for (n, (plane, grads)) in s.planes(x, c).zip(s.planes(grad, c)).enumerate() {
                // SAFETY: channel c's task alone writes plane (n, c) of `dx`, which outlives the
                // parallel loop.
                let dst = unsafe {
                    std::slice::from_raw_parts_mut(
                        shared.get().add((n * s.channels + c) * s.pixels),
                        s.pixels,
                    )
                };
                input_gradient_plane(plane, grads, dst, (&st, gamma[c]), means, act);
            }
            (gamma_grad, beta_grad)
        })
        .collect();
    let (gamma_grad, beta_grad) = sums.into_iter().unzip();
    (dx, gamma_grad, beta_grad)
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
    fn loss(s: &NormShape, x: &[f32], gamma: &[f32], beta: &[f32], act: Act, r: &[f32]) -> f64 {
        let (slope, max) = (f64::from(act.slope), f64::from(act.max));
        let mut total = 0.0;
        for c in 0..s.channels {
            let plane = |n: usize| (n * s.channels + c) * s.pixels;
            let all: Vec<f64> =
                (0..s.batch).flat_map(|n| x[plane(n)..][..s.pixels].iter().map(|&v| f64::from(v))).collect();
            let mean = all.iter().sum::<f64>() / all.len() as f64;
            let var = all.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / all.len() as f64;
            for n in 0..s.batch {
                for p in 0..s.pixels {
                    let z = (f64::from(x[plane(n) + p]) - mean) / (var + 1e-5).sqrt() * f64::from(gamma[c])
                        + f64::from(beta[c]);
                    let a = if z > 0.0 { z.min(max) } else { z * slope };
                    total += a * f64::from(r[plane(n) + p]);
                }
            }
        }
        total
    }

    #[test]
    fn gradients_match_finite_differences() {
        // ReLU, leaky ReLU, ReLU6-like (clamped at 0.5, so that values reach it) and identity.
        for (slope, max) in [(0.0f32, f32::INFINITY), (0.2, f32::INFINITY), (0.0, 0.5), (1.0, f32::INFINITY)]
        {
            let act = Act { slope, max };
            let s = NormShape { batch: 3, channels: 2, pixels: 13 };
            let x = values(s.len(), 1);
            let (gamma, beta) = (vec![0.7, -1.3], vec![0.1, 0.4]);
            let r = values(s.len(), 2);
            let (out, mean, variance) = forward(&s, &x, &gamma, &beta, 1e-5, act);
            assert!(out.iter().all(|&v| v <= max));
            if max.is_finite() {
                assert!(out.contains(&max), "the clamp is reached");
            }
            let moments = BatchMoments { mean: &mean, variance: &variance };
            let (dx, dgamma, dbeta) = backward(&s, &x, (&gamma, &beta), moments, 1e-5, act, &r);
            let h = 1e-3f32;
            let quotient = |plus: f64, minus: f64| (plus - minus) / (2.0 * f64::from(h));
            let loss = |x: &[f32], gamma: &[f32], beta: &[f32]| loss(&s, x, gamma, beta, act, &r);
            for i in 0..x.len() {
                let (mut up, mut down) = (x.clone(), x.clone());
                up[i] += h;
                down[i] -= h;
                let d = quotient(loss(&up, &gamma, &beta), loss(&down, &gamma, &beta));
                assert!((d - f64::from(dx[i])).abs() < 2e-3, "slope {slope} dx[{i}]: {d} vs {}", dx[i]);
            }
            for c in 0..2 {
                let (mut up, mut down) = (gamma.clone(), gamma.clone());
                up[c] += h;
                down[c] -= h;
                let d = quotient(loss(&x, &up, &beta), loss(&x, &down, &beta));
                assert!((d - f64::from(dgamma[c])).abs() < 2e-3, "dgamma[{c}]: {d} vs {}", dgamma[c]);
                let (mut up, mut down) = (beta.clone(), beta.clone());
                up[c] += h;
                down[c] -= h;
                let d = quotient(loss(&x, &gamma, &up), loss(&x, &gamma, &down));
                assert!((d - f64::from(dbeta[c])).abs() < 2e-3, "dbeta[{c}]: {d} vs {}", dbeta[c]);
            }
        }
    }

    #[test]
    fn forward_normalises_and_activates() {
        let s = NormShape { batch: 2, channels: 3, pixels: 21 };
        let x = values(s.len(), 3);
        let (gamma, beta) = (vec![1.0, 2.0, 0.5], vec![0.0, -0.5, 0.3]);
        let act = Act { slope: 0.2, max: f32::INFINITY };
        let (out, mean, variance) = forward(&s, &x, &gamma, &beta, 1e-5, act);
        for c in 0..3 {
            let all: Vec<f64> = s.planes(&x, c).flatten().map(|&v| f64::from(v)).collect();
            let m = all.iter().sum::<f64>() / all.len() as f64;
            let v = all.iter().map(|a| (a - m) * (a - m)).sum::<f64>() / all.len() as f64;
            assert!((f64::from(mean[c]) - m).abs() < 1e-6 && (f64::from(variance[c]) - v).abs() < 1e-6);
            for (o, a) in s.planes(&out, c).flatten().zip(&all) {
                let z = (a - m) / (v + 1e-5).sqrt() * f64::from(gamma[c]) + f64::from(beta[c]);
                let expected = if z > 0.0 { z } else { 0.2 * z };
                assert!((f64::from(*o) - expected).abs() < 1e-5);
            }
        }
    }
}
