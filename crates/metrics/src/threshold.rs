//! Decision thresholds learned from scores. Every one follows vigil's rule: a score strictly
//! above `Threshold::value` is anomalous. Inputs must be non-empty and finite.
//!
//! [`ThresholdRule`] is the one threshold concept of vigil: it is parsed from the user's text
//! (`quantile:0.99`), printed back the same way, and computes a [`Threshold`] from scores.

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

/// How a threshold is chosen: `max`, `quantile:P`, `ksigma:K` (on held-out normal scores), `nfa:K`
/// (log10 NFA <= -K, for methods that compute an NFA), `nfa-calibrated:K` (the log10 NFA level at
/// which held-out normal images give 10^-K false detections per image), `fixed:V`, or `f1`
/// (F1-optimal on labelled validation scores). Every number is finite once parsed.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ThresholdRule {
    Max,
    Quantile(f64),
    KSigma(f64),
    Nfa(f64),
    NfaCalibrated(f64),
    Fixed(f64),
    F1,
}

/// Fewer held-out scores than this make a quantile or k-sigma threshold unreliable.
pub const FEW_SCORES: usize = 10;

impl std::str::FromStr for ThresholdRule {
    type Err = VigilError;

    fn from_str(text: &str) -> Result<Self> {
        let (kind, arg) = match text.trim().split_once(':') {
            Some((k, a)) => (k.trim(), Some(a.trim())),
            None => (text.trim(), None),
        };
        let bad = |why: String| VigilError::Config(format!("threshold '{text}': {why}"));
        let number = |default: Option<f64>| -> Result<f64> {
            let value = match arg {
                Some(a) => a.parse::<f64>().map_err(|_| bad(format!("'{a}' is not a number")))?,
                None => default.ok_or_else(|| bad(format!("needs a value, e.g. {kind}:0.5")))?,
            };
            if !value.is_finite() {
                return Err(bad(format!("{value} is not a finite number")));
            }
            Ok(value)
        };
        let no_value = |rule: ThresholdRule| match arg {
            Some(a) => Err(bad(format!("'{kind}' takes no value, got '{a}'"))),
            None => Ok(rule),
        };
        match kind {
            "max" => no_value(ThresholdRule::Max),
            "f1" => no_value(ThresholdRule::F1),
            "quantile" => {
                let p = number(Some(0.99))?;
                if !(p > 0.0 && p <= 1.0) {
                    return Err(bad("the quantile must be in (0, 1]".into()));
                }
                Ok(ThresholdRule::Quantile(p))
            }
            "ksigma" => Ok(ThresholdRule::KSigma(number(Some(3.0))?)),
            "nfa" => Ok(ThresholdRule::Nfa(number(Some(0.0))?)),
            "nfa-calibrated" => Ok(ThresholdRule::NfaCalibrated(number(Some(0.0))?)),
            "fixed" => Ok(ThresholdRule::Fixed(number(None)?)),
            _ => Err(bad(
                "unknown kind; use max, quantile:P, ksigma:K, nfa:K, nfa-calibrated:K, fixed:V or f1".into(),
            )),
        }
    }
}

impl std::fmt::Display for ThresholdRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ThresholdRule::Max => write!(f, "max"),
            ThresholdRule::Quantile(p) => write!(f, "quantile:{p}"),
            ThresholdRule::KSigma(k) => write!(f, "ksigma:{k}"),
            ThresholdRule::Nfa(k) => write!(f, "nfa:{k}"),
            ThresholdRule::NfaCalibrated(k) => write!(f, "nfa-calibrated:{k}"),
            ThresholdRule::Fixed(v) => write!(f, "fixed:{v}"),
            ThresholdRule::F1 => write!(f, "f1"),
        }
    }
}

impl ThresholdRule {
    /// The rule a stored threshold came from (a fixed one keeps its value).
    pub fn of(threshold: &Threshold) -> ThresholdRule {
        match threshold.kind {
            ThresholdKind::Max => ThresholdRule::Max,
            ThresholdKind::Quantile { p } => ThresholdRule::Quantile(p),
            ThresholdKind::KSigma { k } => ThresholdRule::KSigma(k),
            ThresholdKind::F1Optimal => ThresholdRule::F1,
            ThresholdKind::Nfa { k } => ThresholdRule::Nfa(k),
            ThresholdKind::NfaCalibrated { k } => ThresholdRule::NfaCalibrated(k),
            ThresholdKind::Fixed => ThresholdRule::Fixed(threshold.value),
        }
    }

    /// The rule of a method's own threshold kind (NFA for a contrario methods).
    pub fn of_kind(kind: &ThresholdKind) -> Option<ThresholdRule> {
        match kind {
            ThresholdKind::Max => Some(ThresholdRule::Max),
            ThresholdKind::Quantile { p } => Some(ThresholdRule::Quantile(*p)),
            ThresholdKind::KSigma { k } => Some(ThresholdRule::KSigma(*k)),
            ThresholdKind::F1Optimal => Some(ThresholdRule::F1),
            ThresholdKind::Nfa { k } => Some(ThresholdRule::Nfa(*k)),
            ThresholdKind::NfaCalibrated { k } => Some(ThresholdRule::NfaCalibrated(*k)),
            ThresholdKind::Fixed => None,
        }
    }

    /// Does it need scores (or, calibrated NFA, NFA maps) of held-out normal images?
    pub fn needs_normal_scores(&self) -> bool {
        matches!(
            self,
            ThresholdRule::Max
                | ThresholdRule::Quantile(_)
                | ThresholdRule::KSigma(_)
                | ThresholdRule::F1
                | ThresholdRule::NfaCalibrated(_)
        )
    }

    /// Does it rest on a statistic that is unreliable from few scores?
    pub fn is_statistical(&self) -> bool {
        matches!(self, ThresholdRule::Quantile(_) | ThresholdRule::KSigma(_))
    }

    /// Does it need labelled anomalous validation data?
    pub fn needs_labels(&self) -> bool {
        matches!(self, ThresholdRule::F1)
    }

    /// Does it read the NFA a method computes instead of scores?
    pub fn is_nfa(&self) -> bool {
        matches!(self, ThresholdRule::Nfa(_) | ThresholdRule::NfaCalibrated(_))
    }

    /// Computes the threshold from validation scores with labels (false = held-out normal image or
    /// pixel, true = anomalous). NFA and fixed rules need no scores; a calibrated NFA threshold
    /// comes from NFA maps instead (`vigil_nfa::calibration`), so it is refused here.
    pub fn compute(&self, level: ThresholdLevel, scores: &[f64], labels: &[bool]) -> Result<Threshold> {
        if scores.len() != labels.len() {
            return Err(VigilError::invalid(format!(
                "{self} threshold: {} scores but {} labels",
                scores.len(),
                labels.len()
            )));
        }
        let normal: Vec<f64> = scores.iter().zip(labels).filter(|(_, &l)| !l).map(|(&s, _)| s).collect();
        if self.needs_normal_scores() && normal.is_empty() {
            return Err(VigilError::Config(format!(
                "{level:?} threshold {self} needs held-out normal images, but none were held out: raise \
                 --val-fraction or give more training images (or use fixed:V / nfa:K)"
            )));
        }
        match *self {
            ThresholdRule::Nfa(k) => {
                Ok(Threshold { kind: ThresholdKind::Nfa { k }, level, value: k, n_samples: 0 })
            }
            ThresholdRule::Fixed(value) => {
                Ok(Threshold { kind: ThresholdKind::Fixed, level, value, n_samples: 0 })
            }
            ThresholdRule::NfaCalibrated(_) => Err(VigilError::invalid(format!(
                "{self}: a calibrated NFA threshold comes from the NFA maps of held-out normal images, not from scores"
            ))),
            ThresholdRule::Max => max_of(&normal, level),
            ThresholdRule::Quantile(p) => quantile(&normal, p, level),
            ThresholdRule::KSigma(k) => k_sigma(&normal, k, level),
            ThresholdRule::F1 => {
                if !labels.iter().any(|&l| l) {
                    return Err(VigilError::Config(format!(
                        "an F1-optimal {level:?} threshold needs labelled anomalous validation data besides \
                         held-out normal images"
                    )));
                }
                f1_optimal(scores, labels, level)
            }
        }
    }
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

    #[test]
    fn rules_parse_print_and_refuse_non_finite_values() {
        for text in ["max", "quantile:0.95", "ksigma:2.5", "nfa:1", "nfa-calibrated:1", "fixed:0.25", "f1"] {
            let rule: ThresholdRule = text.parse().unwrap();
            assert_eq!(rule.to_string().parse::<ThresholdRule>().unwrap(), rule, "{text}");
        }
        assert_eq!("quantile".parse::<ThresholdRule>().unwrap(), ThresholdRule::Quantile(0.99));
        for text in ["fixed:NaN", "fixed:inf", "fixed:-inf", "ksigma:nan", "nfa:inf", "nfa-calibrated:nan"] {
            let e = text.parse::<ThresholdRule>().unwrap_err().to_string();
            assert!(e.contains(text) && e.contains("finite"), "{text}: {e}");
        }
        for text in ["quantile:0", "quantile:1.5", "fixed", "max:3", "median"] {
            let e = text.parse::<ThresholdRule>().unwrap_err().to_string();
            assert!(e.contains(text), "{text}: {e}");
        }
    }

    #[test]
    fn rules_compute_from_labelled_scores() {
        let scores = [1.0, 2.0, 3.0, 10.0];
        let labels = [false, false, false, true];
        assert_eq!(ThresholdRule::Max.compute(Image, &scores, &labels).unwrap().value, 3.0);
        let t = ThresholdRule::Fixed(0.5).compute(Image, &[], &[]).unwrap();
        assert_eq!((t.value, t.kind), (0.5, ThresholdKind::Fixed));
        let f1 = ThresholdRule::F1.compute(Image, &scores, &labels).unwrap();
        assert!(f1.value > 3.0 && f1.value < 10.0);
        assert!(ThresholdRule::F1.compute(Image, &scores[..3], &labels[..3]).is_err());
        let e = ThresholdRule::Quantile(0.9).compute(Image, &[], &[]).unwrap_err().to_string();
        assert!(e.contains("held-out"), "{e}");
        assert_eq!(ThresholdRule::of(&f1), ThresholdRule::F1);
    }
}
