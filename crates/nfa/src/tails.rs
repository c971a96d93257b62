//! Tail probabilities in log10, accurate far beyond where f64 probabilities underflow.
//!
//! NFA tests need P-values like 10^−5000; evaluating them as probabilities and taking the log
//! would give −∞. Every routine here builds the logarithm directly from a series or a continued
//! fraction whose terms are of moderate size, so only the prefactor carries the huge exponent.

use std::f64::consts::{LN_10, PI};

const EPS: f64 = 1e-15;
const MAX_ITER: usize = 100_000;
const TINY: f64 = 1e-300;

/// ln Γ(x) for x > 0 (Lanczos, g = 7, 9 terms; relative error below 1e-15).
pub fn ln_gamma(x: f64) -> f64 {
    const COEF: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        // reflection keeps the approximation in its accurate range
        return (PI / (PI * x).sin()).ln() - ln_gamma(1.0 - x);
    }
    let x = x - 1.0;
    let mut a = COEF[0];
    let t = x + 7.5;
    for (i, c) in COEF.iter().enumerate().skip(1) {
        a += c / (x + i as f64);
    }
    0.5 * (2.0 * PI).ln() + (x + 0.5) * t.ln() - t + a.ln()
}

/// ln of the regularised upper incomplete gamma function Q(a, x) = Γ(a, x) / Γ(a).
pub fn ln_gamma_q(a: f64, x: f64) -> f64 {
    if x <= 0.0 {
        return 0.0;
    }
    if x < a + 1.0 {
        // Q is not small here, so 1 − P from the series loses nothing that matters.
        let ln_p = ln_gamma_p_series(a, x);
        ln_1m_exp(ln_p)
    } else {
        ln_gamma_q_continued_fraction(a, x)
    }
}

/// ln P(a, x) by the series P = x^a e^−x / Γ(a+1) · Σ x^n / ((a+1)…(a+n)).
fn ln_gamma_p_series(a: f64, x: f64) -> f64 {
    let mut term = 1.0;
    let mut sum = 1.0;
    let mut ap = a;
    for _ in 0..MAX_ITER {
        ap += 1.0;
        term *= x / ap;
        sum += term;
        if term < sum * EPS {
            break;
        }
    }
    a * x.ln() - x - ln_gamma(a + 1.0) + sum.ln()
}

/// ln Q(a, x) by the Legendre continued fraction (modified Lentz), valid for x ≥ a + 1.
fn ln_gamma_q_continued_fraction(a: f64, x: f64) -> f64 {
    let mut b = x + 1.0 - a;
    let mut c = 1.0 / TINY;
    let mut d = 1.0 / b;
    let mut h = d;
    for i in 1..MAX_ITER {
        let an = -(i as f64) * (i as f64 - a);
        b += 2.0;
        d = 1.0 / nonzero(an * d + b);
        c = nonzero(b + an / c);
        let delta = d * c;
        h *= delta;
        if (delta - 1.0).abs() < EPS {
            break;
        }
    }
    a * x.ln() - x - ln_gamma(a) + h.ln()
}

/// ln(1 − e^v) for v ≤ 0, accurate at both ends.
fn ln_1m_exp(v: f64) -> f64 {
    if v >= 0.0 {
        f64::NEG_INFINITY
    } else if v > -std::f64::consts::LN_2 {
        (-v.exp_m1()).ln()
    } else {
        (-v.exp()).ln_1p()
    }
}

/// log10 P[χ²(dof) > x], the chi-square survival function (scipy's `chi2.logsf / ln 10`).
pub fn log10_chi2_sf(x: f64, dof: f64) -> f64 {
    debug_assert!(dof > 0.0, "chi-square needs positive degrees of freedom");
    ln_gamma_q(dof / 2.0, x / 2.0) / LN_10
}

/// ln of the Beta function.
fn ln_beta(a: f64, b: f64) -> f64 {
    ln_gamma(a) + ln_gamma(b) - ln_gamma(a + b)
}

/// ln of the regularised incomplete beta function I_x(a, b).
pub fn ln_incomplete_beta(x: f64, a: f64, b: f64) -> f64 {
    if x <= 0.0 {
        return f64::NEG_INFINITY;
    }
    if x >= 1.0 {
        return 0.0;
    }
    let ln_front = a * x.ln() + b * (-x).ln_1p() - ln_beta(a, b);
    if x < (a + 1.0) / (a + b + 2.0) {
        ln_front + beta_continued_fraction(x, a, b).ln() - a.ln()
    } else {
        // the symmetry I_x(a,b) = 1 − I_{1−x}(b,a) keeps the fraction in its fast-converging range
        let ln_other = ln_front + beta_continued_fraction(1.0 - x, b, a).ln() - b.ln();
        ln_1m_exp(ln_other)
    }
}

/// The continued fraction of I_x(a, b) (modified Lentz), for x < (a+1)/(a+b+2).
fn beta_continued_fraction(x: f64, a: f64, b: f64) -> f64 {
    let qab = a + b;
    let qap = a + 1.0;
    let qam = a - 1.0;
    let mut c = 1.0;
    let mut d = 1.0 / nonzero(1.0 - qab * x / qap);
    let mut h = d;
    // One Lentz step for the partial numerator `aa`: updates c and d, returns the factor for h.
    let step = |aa: f64, c: &mut f64, d: &mut f64| -> f64 {
        *d = 1.0 / nonzero(1.0 + aa * *d);
        *c = nonzero(1.0 + aa / *c);
        *d * *c
    };
    for m in 1..MAX_ITER {
        let m = m as f64;
        let m2 = 2.0 * m;
        h *= step(m * (b - m) * x / ((qam + m2) * (a + m2)), &mut c, &mut d);
        let delta = step(-(a + m) * (qab + m) * x / ((a + m2) * (qap + m2)), &mut c, &mut d);
        h *= delta;
        if (delta - 1.0).abs() < EPS {
            break;
        }
    }
    h
}

/// Lentz's guard against a zero denominator.
fn nonzero(v: f64) -> f64 {
    if v.abs() < TINY {
        TINY
    } else {
        v
    }
}

/// log10 P[Bin(n, p) ≥ k], extended to real k and n through the regularised incomplete beta
/// I_p(k, n − k + 1). For integer k it is exactly the binomial tail; a contrario block tests
/// need the real-valued extension because their counts are divided by an independence factor.
/// Returns 0 for k ≤ 0 and −∞ for k > n (the event is impossible).
pub fn log10_binomial_tail(n: f64, k: f64, p: f64) -> f64 {
    if k <= 0.0 {
        return 0.0;
    }
    if k > n || p <= 0.0 {
        return f64::NEG_INFINITY;
    }
    if p >= 1.0 {
        return 0.0;
    }
    ln_incomplete_beta(p, k, n - k + 1.0) / LN_10
}

/// log10 of the binomial coefficient C(n, k) for real 0 ≤ k ≤ n.
pub fn log10_binomial_coefficient(n: f64, k: f64) -> f64 {
    (ln_gamma(n + 1.0) - ln_gamma(k + 1.0) - ln_gamma(n - k + 1.0)) / LN_10
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(got: f64, want: f64, rel: f64) {
        assert!(
            (got - want).abs() <= rel * want.abs().max(1e-300),
            "got {got:e}, want {want:e} (relative tolerance {rel:e})"
        );
    }

    #[test]
    fn ln_gamma_matches_factorials_and_half_integers() {
        assert!(ln_gamma(1.0).abs() < 1e-14 && ln_gamma(2.0).abs() < 1e-14);
        close(ln_gamma(11.0), (3_628_800f64).ln(), 1e-14);
        close(ln_gamma(0.5), PI.sqrt().ln(), 1e-14);
        // scipy.special.gammaln(1000.5)
        close(ln_gamma(1000.5), 5_908.674175848678, 1e-14);
    }

    // Reference values: scipy 1.17 `chi2.logsf(x, dof) / ln(10)`; where scipy underflows to −inf
    // (the last two extreme tails) mpmath at 50 digits: log10(gammainc(dof/2, x/2, inf, regularized)).
    #[test]
    fn chi_square_tail_matches_scipy_from_bulk_to_extreme_tail() {
        let cases: [(f64, f64, f64); 8] = [
            (1.0, 1.0, -0.4985155458279933),
            (45.0, 45.0, -0.32609576154780767),
            (10.0, 45.0, -3.6857617162712035e-09),
            (100.0, 45.0, -5.330045199893523),
            (1000.0, 45.0, -179.47742628048982),
            (23_000.0, 45.0, -4_927.457_813_570_893),
            (50_000.0, 72.0, -10_743.447_771_512_23),
            (0.5, 3.0, -0.03673580755354874),
        ];
        for (x, dof, want) in cases {
            close(log10_chi2_sf(x, dof), want, 1e-10);
        }
        assert_eq!(log10_chi2_sf(0.0, 45.0), 0.0);
    }

    // Reference values: scipy 1.17 `binom.logsf(k - 1, n, p) / ln(10)`, i.e. log10 P[X ≥ k]; the
    // extreme tail (scipy: −inf) is the exact sum at 50 digits in mpmath.
    #[test]
    fn binomial_tail_matches_scipy_for_integer_counts() {
        let cases: [(f64, f64, f64, f64); 6] = [
            (9.0, 1.0, 0.01, -1.0630704963946782),
            (9.0, 9.0, 0.01, -17.999999999999996),
            (100.0, 5.0, 0.05, -0.24870649730320166),
            (2601.0, 200.0, 0.01, -105.70403098547317),
            (10_000.0, 5_000.0, 0.01, -7_013.617_732_953_623),
            (50.0, 2.0, 0.3, -1.751814077588959e-07),
        ];
        for (n, k, p, want) in cases {
            close(log10_binomial_tail(n, k, p), want, 1e-9);
        }
    }

    #[test]
    fn binomial_tail_is_monotone_in_real_k_and_handles_edges() {
        let mut prev = 0.0;
        for i in 1..=36 {
            let k = i as f64 * 0.25;
            let v = log10_binomial_tail(9.0, k, 0.01);
            assert!(v < prev, "tail must decrease with k (k={k}: {v} vs {prev})");
            prev = v;
        }
        // real-valued counts, mpmath: log10(betainc(k, n − k + 1, 0, p, regularized))
        close(log10_binomial_tail(9.0, 2.5, 0.01), -3.254146220453165, 1e-10);
        close(log10_binomial_tail(9.0, 0.3, 0.01), -0.270_337_804_500_606_4, 1e-10);
        assert_eq!(log10_binomial_tail(9.0, 0.0, 0.01), 0.0);
        assert_eq!(log10_binomial_tail(9.0, 9.5, 0.01), f64::NEG_INFINITY);
    }

    #[test]
    fn binomial_coefficient_is_exact_for_small_and_right_for_large() {
        close(log10_binomial_coefficient(10.0, 3.0), 120f64.log10(), 1e-13);
        close(log10_binomial_coefficient(52.0, 5.0), 2_598_960f64.log10(), 1e-13);
        // (gammaln(10001) − 2·gammaln(5001)) / ln 10 in scipy
        close(log10_binomial_coefficient(10_000.0, 5_000.0), 3_008.201885843934, 1e-12);
    }
}
