//! The number of tests of a region-based a contrario detector: every 4-connected region
//! (polyomino) of every size at every position, at every scale.

/// Growth constants of the number of fixed polyominoes of size r, A(r) ≈ α·β^r / r
/// (Jensen & Guttmann's asymptotic fit, as used by U-Flow).
pub const POLYOMINO_ALPHA: f64 = 0.316915;
pub const POLYOMINO_BETA: f64 = 4.062570;

/// log10 N_T with N_T = Σ_l n_l · Σ_{r=1..n_l} α β^r / r, where n_l is the pixel count of scale l.
///
/// N_T overflows f64 for maps beyond about 22×22 pixels, so the sums are log-sum-exps.
/// Scales with no pixels contribute nothing; with no pixels at all the result is -∞ (no tests).
pub fn log10_polyomino_tests(pixels_per_scale: &[usize]) -> f64 {
    let (ln_alpha, ln_beta) = (POLYOMINO_ALPHA.ln(), POLYOMINO_BETA.ln());
    let per_scale: Vec<f64> = pixels_per_scale
        .iter()
        .filter(|&&n| n > 0)
        .map(|&n| {
            let terms = (1..=n).map(|r| ln_alpha + r as f64 * ln_beta - (r as f64).ln());
            (n as f64).ln() + log_sum_exp(terms)
        })
        .collect();
    log_sum_exp(per_scale.into_iter()) / std::f64::consts::LN_10
}

/// log10 of the number of fixed polyominoes of size r, α·β^r / r, for a real size r > 0 (RegionNFA
/// evaluates it at N/s̃², a region's pixel count divided by the receptive-field area).
pub fn log10_polyominoes_of_size(r: f64) -> f64 {
    POLYOMINO_ALPHA.log10() + r * POLYOMINO_BETA.log10() - r.log10()
}

/// ln Σ exp(x_i), stable for terms far beyond f64's exponent range.
fn log_sum_exp(terms: impl Iterator<Item = f64> + Clone) -> f64 {
    let max = terms.clone().fold(f64::NEG_INFINITY, f64::max);
    if max == f64::NEG_INFINITY {
        return max;
    }
    max + terms.map(|t| (t - max).exp()).sum::<f64>().ln()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_u_flow_check_values() {
        // Digest §3.4: 28×28 alone gives 476.92, 14×14 alone 118.95, together still 476.92.
        assert!((log10_polyomino_tests(&[28 * 28]) - 476.92).abs() < 0.01);
        assert!((log10_polyomino_tests(&[14 * 14]) - 118.95).abs() < 0.01);
        assert!((log10_polyomino_tests(&[28 * 28, 14 * 14]) - 476.92).abs() < 0.01);
    }

    #[test]
    fn small_case_equals_the_direct_sum() {
        // n = 3: 3·(αβ + αβ²/2 + αβ³/3), small enough to sum directly.
        let (a, b) = (POLYOMINO_ALPHA, POLYOMINO_BETA);
        let direct = 3.0 * (a * b + a * b * b / 2.0 + a * b * b * b / 3.0);
        assert!((log10_polyomino_tests(&[3]) - direct.log10()).abs() < 1e-12);
        // Two scales add their counts.
        let two = log10_polyomino_tests(&[3, 3]);
        assert!((two - (2.0 * direct).log10()).abs() < 1e-12);
    }

    #[test]
    fn one_size_is_one_term_of_the_sum() {
        let (a, b) = (POLYOMINO_ALPHA, POLYOMINO_BETA);
        assert!((log10_polyominoes_of_size(3.0) - (a * b * b * b / 3.0).log10()).abs() < 1e-12);
        assert!((log10_polyominoes_of_size(0.5) - (a * b.sqrt() / 0.5).log10()).abs() < 1e-12);
    }

    #[test]
    fn no_pixels_means_no_tests() {
        assert_eq!(log10_polyomino_tests(&[]), f64::NEG_INFINITY);
        assert_eq!(log10_polyomino_tests(&[0]), f64::NEG_INFINITY);
    }
}
