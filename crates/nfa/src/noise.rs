//! "Detection in noise" (Davy, Ehret, Morel, Delbracio, "Reducing anomaly detection in images to
//! detection in noise", ICIP 2018), as the thesis' DAD applies it to the NLM-denoised latent
//! (§7.7; the author's `residual_whitening.compute_nfa`): each channel is mapped to a standard
//! normal by the best of several fits (the power transforms sign(x)|x|^α, α ∈ {0.5, …, 1.4},
//! each fitted by a zero-mean Laplacian and a zero-mean Gaussian, scored by the squared distance
//! between the cumulative 20-bin histogram of the fitted CDF values and the uniform one), and a
//! pixel's
//!
//! log10 NFA = log10(H·W) + min over channels log10 P(|N(0, 1)| ≥ |w|).
//!
//! Zeros are left out of the fits (they mark missing values in the reference).

use vigil_core::{Map, Result, VigilError};

use crate::tails::ln_gamma_q;

/// The exponents α of the power transforms tried.
pub const POWERS: [f64; 10] = [0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3, 1.4];
const BINS: usize = 20;

/// The distribution a channel was fitted with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NoiseModel {
    Gaussian,
    Laplacian,
}

/// The fit chosen for one channel.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Whitening {
    pub model: NoiseModel,
    pub power: f64,
    /// Scale of the fitted distribution (σ for Gaussian, b for Laplacian) of the transformed values.
    pub scale: f64,
    /// Squared distance of the cumulative histograms (lower is better).
    pub score: f64,
}

/// ln P(|N(0, 1)| ≥ |x|) = ln Q(½, x²/2), accurate far into the tail.
pub fn ln_two_sided_normal_sf(x: f64) -> f64 {
    ln_gamma_q(0.5, 0.5 * x * x)
}

/// erfc with relative error below 1.2e-7 (Numerical Recipes' Chebyshev fit): enough for the
/// fit's histogram; the tail probabilities use [`ln_two_sided_normal_sf`].
fn erfc_fast(x: f64) -> f64 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = -z * z - 1.265_512_23
        + t * (1.000_023_68
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07
                            + t * (-1.135_203_98
                                + t * (1.488_515_87 + t * (-0.822_152_23 + t * 0.170_872_77))))))));
    let r = t * poly.exp();
    if x >= 0.0 {
        r
    } else {
        2.0 - r
    }
}

fn normal_cdf(x: f64) -> f64 {
    0.5 * erfc_fast(-x / std::f64::consts::SQRT_2)
}

fn laplace_cdf(x: f64, scale: f64) -> f64 {
    if x < 0.0 {
        0.5 * (x / scale).exp()
    } else {
        1.0 - 0.5 * (-x / scale).exp()
    }
}

/// The x > 0 with ln P(N(0, 1) ≥ x) = `ln_p` (ln_p < ln ½): Acklam's rational approximation of
/// the tail, refined by Newton steps on the logarithm of the exact tail.
fn normal_isf_from_ln(ln_p: f64) -> f64 {
    let ln_half = 0.5f64.ln();
    if ln_p >= ln_half {
        return 0.0;
    }
    let p = ln_p.exp();
    let mut x = if p > 0.02425 {
        // Central region of Acklam's approximation for the quantile of 1 − p.
        const A: [f64; 6] = [
            -3.969_683_028_665_376e1,
            2.209_460_984_245_205e2,
            -2.759_285_104_469_687e2,
            1.383_577_518_672_69e2,
            -3.066_479_806_614_716e1,
            2.506_628_277_459_239,
        ];
        const B: [f64; 5] = [
            -5.447_609_879_822_406e1,
            1.615_858_368_580_409e2,
            -1.556_989_798_598_866e2,
            6.680_131_188_771_972e1,
            -1.328_068_155_288_572e1,
        ];
        let q = 0.5 - p;
        let r = q * q;
        (((((A[0] * r + A[1]) * r + A[2]) * r + A[3]) * r + A[4]) * r + A[5]) * q
            / (((((B[0] * r + B[1]) * r + B[2]) * r + B[3]) * r + B[4]) * r + 1.0)
    } else {
        const C: [f64; 6] = [
            -7.784_894_002_430_293e-3,
            -3.223_964_580_411_365e-1,
            -2.400_758_277_161_838,
            -2.549_732_539_343_734,
            4.374_664_141_464_968,
            2.938_163_982_698_783,
        ];
        const D: [f64; 4] = [
            7.784_695_709_041_462e-3,
            3.224_671_290_700_398e-1,
            2.445_134_137_142_996,
            3.754_408_661_907_416,
        ];
        let q = (-2.0 * ln_p).sqrt();
        -(((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5])
            / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
    };
    // Newton on g(x) = ln sf(x) − ln p, g'(x) = −φ(x)/sf(x).
    let ln_phi = |x: f64| -0.5 * x * x - 0.5 * (2.0 * std::f64::consts::PI).ln();
    for _ in 0..3 {
        let ln_sf = ln_two_sided_normal_sf(x) + ln_half;
        let step = (ln_sf - ln_p) * (ln_sf - ln_phi(x)).exp();
        x += step;
        if step.abs() < 1e-12 * x.abs().max(1.0) {
            break;
        }
    }
    x
}

/// Population variance of the non-zero values (NumPy's `var`), or `None` when there are none.
fn nonzero_variance(values: &[f64]) -> Option<f64> {
    let kept: Vec<f64> = values.iter().copied().filter(|&v| v != 0.0).collect();
    if kept.is_empty() {
        return None;
    }
    let mean = kept.iter().sum::<f64>() / kept.len() as f64;
    Some(kept.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / kept.len() as f64)
}

/// Squared distance between the cumulative 20-bin histogram of the CDF values of the non-zero
/// data and the uniform distribution's.
fn uniformity_score(data: &[f64], cdf: impl Fn(f64) -> f64) -> f64 {
    let mut hist = [0usize; BINS];
    let mut count = 0usize;
    for &d in data.iter().filter(|&&d| d != 0.0) {
        let u = cdf(d);
        if (0.0..=1.0).contains(&u) {
            hist[((u * BINS as f64) as usize).min(BINS - 1)] += 1;
            count += 1;
        }
    }
    let mut cumulative = 0.0;
    let mut score = 0.0;
    for (i, &h) in hist.iter().enumerate() {
        cumulative += h as f64 / count.max(1) as f64;
        score += (cumulative - (i + 1) as f64 / BINS as f64).powi(2);
    }
    score
}

/// Map one channel to (approximately) N(0, 1) by the best-fitting transform. Returns `None` for
/// a channel of zeros (the reference skips it).
pub fn whiten(values: &[f32]) -> Option<(Vec<f64>, Whitening)> {
    if values.iter().all(|&v| v == 0.0) {
        return None;
    }
    let transform = |alpha: f64| -> Vec<f64> {
        values
            .iter()
            .map(|&v| (v as f64).signum() * (v as f64).abs().powf(alpha) * (v != 0.0) as u8 as f64)
            .collect()
    };
    let mut best: Option<Whitening> = None;
    // Laplacians first, then Gaussians; a later fit replaces the best only if strictly better.
    for model in [NoiseModel::Laplacian, NoiseModel::Gaussian] {
        for &alpha in &POWERS {
            let data = transform(alpha);
            let variance = nonzero_variance(&data).unwrap_or(0.0);
            let scale = match model {
                NoiseModel::Laplacian => (variance / 2.0).sqrt(),
                NoiseModel::Gaussian => variance.sqrt(),
            };
            let scale = if scale > 0.0 { scale } else { 1.0 };
            let score = match model {
                NoiseModel::Laplacian => uniformity_score(&data, |d| laplace_cdf(d, scale)),
                NoiseModel::Gaussian => uniformity_score(&data, |d| normal_cdf(d / scale)),
            };
            if best.as_ref().is_none_or(|w| score < w.score) {
                best = Some(Whitening { model, power: alpha, scale, score });
            }
        }
    }
    let fit = best.expect("at least one fit");
    let data = transform(fit.power);
    let white = data.iter().map(|&d| match fit.model {
        // The Laplacian's tail probability 0.5·exp(−|d|/b), mapped to the normal quantile with
        // the same tail (in log space, so far tails stay finite).
        NoiseModel::Laplacian => d.signum() * normal_isf_from_ln(0.5f64.ln() - d.abs() / fit.scale),
        NoiseModel::Gaussian => d / fit.scale,
    });
    Some((white.map(|v| if v.is_finite() { v } else { 0.0 }).collect(), fit))
}

/// The log10 NFA map of the channels (each `width`×`height`, row-major): log10(H·W) + the minimum
/// over the non-zero channels of log10 P(|N(0, 1)| ≥ |w|) of their whitened values. Detections
/// are the pixels below a level (DAD: 3, permissive; the usual ε = 1 is 0).
pub fn log10_nfa_in_noise(channels: &[Vec<f32>], width: usize, height: usize) -> Result<Map> {
    let n = width * height;
    if channels.is_empty() || channels.iter().any(|c| c.len() != n) {
        return Err(VigilError::invalid(format!(
            "detection in noise: need at least one channel of {width}x{height} values"
        )));
    }
    if let Some(c) = channels.iter().position(|c| c.iter().any(|v| !v.is_finite())) {
        return Err(VigilError::invalid(format!("detection in noise: channel {c} holds a non-finite value")));
    }
    let mut min_log10_p = vec![f64::INFINITY; n];
    for channel in channels {
        let Some((white, _)) = whiten(channel) else { continue };
        for (m, w) in min_log10_p.iter_mut().zip(white) {
            *m = m.min(ln_two_sided_normal_sf(w) / std::f64::consts::LN_10);
        }
    }
    // A map of zeros has nothing to test: probability 1 everywhere.
    let tests = (n as f64).log10();
    let data = min_log10_p.iter().map(|&p| (tests + if p.is_finite() { p } else { 0.0 }) as f32).collect();
    Map::new(width, height, data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn normal(rng: &mut ChaCha8Rng) -> f32 {
        let (u1, u2): (f64, f64) = (1.0 - rng.gen::<f64>(), rng.gen());
        ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
    }

    #[test]
    fn tails_and_quantiles_are_exact_far_out() {
        // P(|N| >= 1.959963984540054) = 0.05; P(|N| >= 10) = 1.523970e-23.
        assert!((ln_two_sided_normal_sf(1.959_963_984_540_054).exp() - 0.05).abs() < 1e-12);
        assert!(
            (ln_two_sided_normal_sf(10.0) / std::f64::consts::LN_10 - 1.523_970e-23f64.log10()).abs() < 1e-5
        );
        for &x in &[0.3, 1.0, 2.5, 6.0, 20.0, 35.0] {
            let ln_p = ln_two_sided_normal_sf(x) + 0.5f64.ln();
            assert!((normal_isf_from_ln(ln_p) - x).abs() < 1e-9 * x.max(1.0), "{x}");
        }
        assert!((normal_cdf(1.0) - 0.841_344_746_068_543).abs() < 2e-7);
    }

    #[test]
    fn gaussian_and_laplacian_noise_get_their_own_fit() {
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        let gaussian: Vec<f32> = (0..4096).map(|_| 3.0 * normal(&mut rng)).collect();
        let (white, fit) = whiten(&gaussian).unwrap();
        assert_eq!(fit.model, NoiseModel::Gaussian);
        let var = white.iter().map(|v| v * v).sum::<f64>() / white.len() as f64;
        assert!((var - 1.0).abs() < 0.1, "{var}");
        let laplacian: Vec<f32> = (0..4096)
            .map(|_| {
                let u: f64 = rng.gen::<f64>() - 0.5;
                (-2.0 * u.signum() * (1.0 - 2.0 * u.abs()).ln()) as f32
            })
            .collect();
        let (_, fit) = whiten(&laplacian).unwrap();
        assert_eq!((fit.model, fit.power), (NoiseModel::Laplacian, 1.0), "{fit:?}");
        assert!(whiten(&[0.0; 16]).is_none());
    }

    #[test]
    fn about_one_false_detection_per_pure_noise_image() {
        // ε = 1 (log10 NFA < 0) bounds the expected number of false detections per image by 1:
        // on pure N(0, s²) noise the count averages about 1. With C channels the minimum over
        // channels makes it about C (the reference's N_T counts pixels, not channels).
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let (w, h, images) = (40, 40, 200);
        let mut single = 0usize;
        let mut triple = 0usize;
        for _ in 0..images {
            let plane = |rng: &mut ChaCha8Rng| (0..w * h).map(|_| 0.7 * normal(rng)).collect::<Vec<f32>>();
            let one = log10_nfa_in_noise(&[plane(&mut rng)], w, h).unwrap();
            single += one.data.iter().filter(|&&v| v < 0.0).count();
            let three =
                log10_nfa_in_noise(&[plane(&mut rng), plane(&mut rng), plane(&mut rng)], w, h).unwrap();
            triple += three.data.iter().filter(|&&v| v < 0.0).count();
        }
        let (single, triple) = (single as f64 / images as f64, triple as f64 / images as f64);
        eprintln!("false detections per image: {single} (1 channel), {triple} (3 channels)");
        assert!((0.7..1.4).contains(&single), "{single} false detections per image");
        assert!((2.2..4.0).contains(&triple), "{triple} false detections per 3-channel image");
        // An outlier in noise is detected.
        let mut plane: Vec<f32> = (0..w * h).map(|_| normal(&mut rng)).collect();
        plane[100] = 9.0;
        let map = log10_nfa_in_noise(&[plane], w, h).unwrap();
        assert!(map.data[100] < -10.0, "{}", map.data[100]);
        assert!(log10_nfa_in_noise(&[vec![0.0; 4]], 3, 3).is_err());
    }
}
