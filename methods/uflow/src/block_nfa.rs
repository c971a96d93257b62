//! The block (binomial window) variant of U-Flow's a contrario segmentation, the coarse version
//! anomalib ships: in a window around each pixel, count how many z² exceed the χ²(1) quantile τ
//! and test that count against Bin(n, 1 − q).

use vigil_core::{Map, Result, VigilError};
use vigil_nfa::tails::{log10_binomial_tail, log10_chi2_sf};

/// Window test settings: window side at the finest scale (halved at each coarser scale, as the
/// reference code) and the per-value probability q below which z² counts as normal.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockNfa {
    pub window: usize,
    pub probability: f64,
}

impl Default for BlockNfa {
    /// The reference code's values: window 5, q = 0.9.
    fn default() -> Self {
        BlockNfa { window: 5, probability: 0.9 }
    }
}

/// One scale's latent: `channels` planes of `width`×`height`, channel-major.
pub struct Latent<'a> {
    pub data: &'a [f32],
    pub channels: usize,
    pub width: usize,
    pub height: usize,
}

/// τ with P(χ²(1) ≥ τ) = 1 − q, by bisection on the survival function (τ = Φ⁻¹((1+q)/2)²).
fn chi2_1_quantile(q: f64) -> f64 {
    let target = (1.0 - q).log10();
    let (mut lo, mut hi) = (0.0f64, 1.0f64);
    while log10_chi2_sf(hi, 1.0) > target {
        hi *= 2.0;
    }
    for _ in 0..200 {
        let mid = 0.5 * (lo + hi);
        if log10_chi2_sf(mid, 1.0) > target {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    0.5 * (lo + hi)
}

/// Mirror an index into 0..n without repeating the edge (PyTorch `reflect` padding).
fn reflect(i: isize, n: usize) -> usize {
    let n = n as isize;
    if n == 1 {
        return 0;
    }
    let period = 2 * (n - 1);
    let m = i.rem_euclid(period);
    (if m < n { m } else { period - m }) as usize
}

impl BlockNfa {
    /// log10 NFA at `width`×`height`: per scale (finest first) the window test's log10 PFA,
    /// bilinearly up-sampled, summed over scales, plus log10 of the number of windows Σ H_l W_l.
    pub fn log10_nfa(&self, latents: &[Latent], width: usize, height: usize) -> Result<Map> {
        if latents.is_empty() {
            return Err(VigilError::invalid("block NFA: no scales given"));
        }
        if self.window == 0 || !(self.probability > 0.0 && self.probability < 1.0) {
            return Err(VigilError::Config(format!(
                "block NFA needs a positive window and a probability in (0, 1), got {self:?}"
            )));
        }
        let tau = chi2_1_quantile(self.probability) as f32;
        let mut total = Map::filled(width, height, 0.0);
        let mut tests = 0usize;
        for (scale, latent) in latents.iter().enumerate() {
            let (w, h, c) = (latent.width, latent.height, latent.channels);
            if c == 0 || w * h == 0 || latent.data.len() != c * w * h {
                return Err(VigilError::invalid(format!(
                    "block NFA: scale {scale} holds {} values, expected {c}x{h}x{w}",
                    latent.data.len()
                )));
            }
            tests += w * h;
            let half = ((self.window as f64 / 2f64.powi(scale as i32)) as usize / 2).max(1) as isize;
            let trials = ((2 * half + 1) * (2 * half + 1)) as f64;
            // Candidates per pixel summed over channels, then over the window.
            let mut candidates = vec![0u32; w * h];
            for plane in latent.data.chunks_exact(w * h) {
                for (count, &z) in candidates.iter_mut().zip(plane) {
                    *count += u32::from(z * z >= tau);
                }
            }
            let mut log_pfa = vec![0f32; w * h];
            for y in 0..h as isize {
                for x in 0..w as isize {
                    let mut sum = 0u32;
                    for dy in -half..=half {
                        let row = reflect(y + dy, h) * w;
                        for dx in -half..=half {
                            sum += candidates[row + reflect(x + dx, w)];
                        }
                    }
                    // The count is averaged over channels as in the reference, which then takes
                    // scipy's strict binom.sf(x) = P(X > x); that is −∞ when every window value is
                    // a candidate, so the tail here is P(X ≥ ⌈x⌉), finite (≥ (1−q)^n) everywhere.
                    let mean_count = sum as f64 / c as f64;
                    log_pfa[y as usize * w + x as usize] =
                        log10_binomial_tail(trials, mean_count.ceil(), 1.0 - self.probability) as f32;
                }
            }
            let up = Map { width: w, height: h, data: log_pfa }.resize_bilinear(width, height);
            for (t, v) in total.data.iter_mut().zip(&up.data) {
                *t += v;
            }
        }
        let log_tests = (tests as f32).log10();
        for t in total.data.iter_mut() {
            *t += log_tests;
        }
        Ok(total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantile_matches_the_normal_table() {
        // χ²(1) 0.9-quantile = 1.644854² = 2.705543.
        assert!((chi2_1_quantile(0.9) - 2.705543).abs() < 1e-5);
    }

    #[test]
    fn reflect_mirrors_without_repeating_the_edge() {
        assert_eq!([-2, -1, 0, 3, 4, 5].map(|i| reflect(i, 4)), [2, 1, 0, 3, 2, 1]);
    }

    #[test]
    fn a_block_of_large_values_is_detected_and_noise_is_not() {
        let (w, h, c) = (16usize, 16usize, 4usize);
        // Background z = 0.5 (z² below τ), a 5×5 patch with z = 3 (z² far above τ).
        let mut data = vec![0.5f32; c * w * h];
        for ch in 0..c {
            for y in 5..10 {
                for x in 5..10 {
                    data[ch * w * h + y * w + x] = 3.0;
                }
            }
        }
        let nfa = BlockNfa::default()
            .log10_nfa(&[Latent { data: &data, channels: c, width: w, height: h }], w, h)
            .unwrap();
        let log_tests = ((w * h) as f32).log10();
        // All 25 window values are candidates: log10 P(Bin(25, 0.1) ≥ 25) = −25.
        assert!((nfa.get(7, 7) - (-25.0 + log_tests)).abs() < 1e-3, "centre {}", nfa.get(7, 7));
        assert!((nfa.get(0, 15) - log_tests).abs() < 1e-4, "background {}", nfa.get(0, 15));
        let bad = [Latent { data: &data[..10], channels: c, width: w, height: h }];
        assert!(BlockNfa::default().log10_nfa(&bad, w, h).is_err());
    }
}
