//! Decision thresholds learned from scores. Every one follows vigil's rule: a score strictly
//! above `Threshold::value` is anomalous. Inputs must be non-empty and finite.

use vigil_core::{Result, Threshold, ThresholdKind, ThresholdLevel, VigilError};

use crate::binary::f1_max;
use crate::scores::{check_scores, Label, Score};

/// The largest normal score: no held-out normal sample is flagged.
pub fn max_of<S: Score>(normal_scores: &[S], level: ThresholdLevel) -> Result<Threshold> {
    check_scores(normal_scores, "max threshold")?;
    let value = normal_scores.iter().map(|&s| s.into()).fold(f64::NEG_INFINITY, f64::max);
    Ok(Threshold { kind: ThresholdKind::Max, level, value, n_samples: normal_scores.len() })
}

/// The p-quantile of normal scores, p ∈ (0, 1], with numpy's default ("linear", Hyndman–Fan
/// type 7) definition: with the scores sorted ascending as v₀..v_{n−1} and h = (n − 1)·p,
/// q = v_⌊h⌋ + (h − ⌊h⌋)·(v_⌊h⌋₊₁ − v_⌊h⌋). So p = 1 is the maximum. Linear time (selection, no sort).
pub fn quantile<S: Score>(normal_scores: &[S], p: f64, level: ThresholdLevel) -> Result<Threshold> {
    check_scores(normal_scores, "quantile threshold")?;
    if !(p > 0.0 && p <= 1.0) {
        return Err(VigilError::invalid(format!("quantile threshold: p must lie in (0, 1], got {p}")));
    }
    let mut values: Vec<f64> = normal_scores.iter().map(|&s| s.into()).collect();
    let h = (values.len() - 1) as f64 * p;
    let lower_index = (h.floor() as usize).min(values.len() - 1);
    let fraction = h - lower_index as f64;
    let (_, &mut lower, above) = values.select_nth_unstable_by(lower_index, f64::total_cmp);
    let value = if fraction > 0.0 {
        let upper = above.iter().copied().fold(f64::INFINITY, f64::min);
        lower + fraction * (upper - lower)
    } else {
        lower
    };
    Ok(Threshold { kind: ThresholdKind::Quantile { p }, level, value, n_samples: normal_scores.len() })
}

/// mean + k·σ of normal scores, σ the population standard deviation (ddof = 0, numpy's default).
pub fn k_sigma<S: Score>(normal_scores: &[S], k: f64, level: ThresholdLevel) -> Result<Threshold> {
    check_scores(normal_scores, "k-sigma threshold")?;
    if !k.is_finite() {
        return Err(VigilError::invalid(format!("k-sigma threshold: k must be finite, got {k}")));
    }
    let n = normal_scores.len() as f64;
    let mean = normal_scores.iter().map(|&s| s.into()).sum::<f64>() / n;
    // Two passes: the one-pass formula loses all digits when σ ≪ |mean|.
    let variance = normal_scores.iter().map(|&s| (s.into() - mean).powi(2)).sum::<f64>() / n;
    let value = mean + k * variance.sqrt();
    Ok(Threshold { kind: ThresholdKind::KSigma { k }, level, value, n_samples: normal_scores.len() })
}

/// The threshold maximising F1 on labelled scores (see [`crate::f1_max_detailed`]; it sits midway
/// between the lowest flagged score and the next lower one).
pub fn f1_optimal<S: Score, L: Label>(
    scores: &[S],
    labels: &[L],
    level: ThresholdLevel,
) -> Result<Threshold> {
    let (_, value) = f1_max(scores, labels)?;
    Ok(Threshold { kind: ThresholdKind::F1Optimal, level, value, n_samples: scores.len() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ThresholdLevel::{Image, Pixel};

    #[test]
    fn max_is_the_largest_score() {
        let t = max_of(&[0.2f32, 0.9, -1.0], Pixel).unwrap();
        assert_eq!(t.value, 0.9f32 as f64);
        assert_eq!((t.kind, t.level, t.n_samples), (ThresholdKind::Max, Pixel, 3));
    }

    #[test]
    fn quantile_is_numpy_linear() {
        let scores = [7.0, 1.0, 3.0, 5.0, 9.0];
        // np.quantile([1,3,5,7,9], [0.5, 0.9, 0.95, 1.0]) = [5.0, 8.2, 8.6, 9.0]
        for (p, expected) in [(0.5, 5.0), (0.9, 8.2), (0.95, 8.6), (1.0, 9.0)] {
            let t = quantile(&scores, p, Image).unwrap();
            assert!((t.value - expected).abs() < 1e-12, "p={p}: {}", t.value);
        }
        assert_eq!(quantile(&[4.0], 0.99, Image).unwrap().value, 4.0);
        let e = quantile(&scores, 0.0, Image).unwrap_err().to_string();
        assert!(e.contains("(0, 1]"), "{e}");
    }

    #[test]
    fn k_sigma_uses_population_std() {
        // mean 5, population σ = 2
        let t = k_sigma(&[3.0, 7.0, 3.0, 7.0], 3.0, Image).unwrap();
        assert!((t.value - 11.0).abs() < 1e-12);
        assert_eq!(t.kind, ThresholdKind::KSigma { k: 3.0 });
    }

    #[test]
    fn f1_optimal_separates_the_classes() {
        let t = f1_optimal(&[0.1, 0.2, 0.8, 0.9], &[false, false, true, true], Image).unwrap();
        assert!(t.value > 0.2 && t.value < 0.8);
        assert_eq!(t.kind, ThresholdKind::F1Optimal);
    }

    #[test]
    fn empty_and_nan_inputs_are_errors() {
        let e = max_of::<f64>(&[], Image).unwrap_err().to_string();
        assert!(e.contains("max threshold: no scores"), "{e}");
        let e = k_sigma(&[1.0, f64::NAN], 3.0, Image).unwrap_err().to_string();
        assert!(e.contains("k-sigma threshold: score #1 is NaN"), "{e}");
        let e = quantile(&[f32::NAN], 0.5, Pixel).unwrap_err().to_string();
        assert!(e.contains("NaN"), "{e}");
        assert!(f1_optimal(&[0.1, 0.2], &[false, false], Image).is_err());
    }
}
