//! Ranking metrics on binary labels: ROC AUC, average precision, their curves, F1-max and
//! confusion counts at a threshold.
//!
//! Definitions (identical to scikit-learn 1.x):
//! - Scores are sorted in decreasing order; each run of equal scores is one cut. At the cut of
//!   score `s` every sample with score `>= s` is flagged anomalous, giving cumulative counts
//!   `tp(s)`, `fp(s)`.
//! - **ROC AUC** (`roc_auc_score`): trapezoidal area under (FPR, TPR) through (0,0) and all
//!   cuts. With ties this equals the Mann–Whitney probability P(s⁺ > s⁻) + ½·P(s⁺ = s⁻).
//!   Computed in exact integer arithmetic, divided once at the end.
//! - **Average precision** (`average_precision_score`): Σ_cuts (R_k − R_{k−1})·P_k, the
//!   step-wise (not interpolated) area under the PR curve, ties grouped into one step.
//! - **F1-max**: the largest F1 = 2·tp / (tp + fp + #anomalous) over all cuts, as read off
//!   `precision_recall_curve`.

use serde::{Deserialize, Serialize};
use vigil_core::{Result, VigilError};

use crate::curve::{Curve, CurvePoint};
use crate::scores::{check_same_len, check_scores, sorted_with_labels, Label, Score};

/// Samples sorted by descending score with the class totals.
struct Ranked<S> {
    items: Vec<(S, u32)>,
    anomalous: u64,
    normal: u64,
}

impl<S: Score> Ranked<S> {
    fn new<L: Label>(scores: &[S], labels: &[L], what: &str) -> Result<Self> {
        check_same_len(scores.len(), labels.len(), what)?;
        check_scores(scores, what)?;
        let items = sorted_with_labels(scores, labels);
        let anomalous = items.iter().filter(|p| p.1 != 0).count() as u64;
        let normal = items.len() as u64 - anomalous;
        Ok(Ranked { items, anomalous, normal })
    }

    fn require_anomalous(&self, what: &str) -> Result<()> {
        if self.anomalous == 0 {
            return Err(VigilError::invalid(format!(
                "{what}: no anomalous sample among the {} labels; the metric is undefined",
                self.items.len()
            )));
        }
        Ok(())
    }

    fn require_both_classes(&self, what: &str) -> Result<()> {
        self.require_anomalous(what)?;
        if self.normal == 0 {
            return Err(VigilError::invalid(format!(
                "{what}: no normal sample among the {} labels; the metric is undefined",
                self.items.len()
            )));
        }
        Ok(())
    }

    /// Needs both classes.
    fn roc_auc(&self) -> f64 {
        // Twice the area in units of one (1/N)·(1/P) cell; u128 because it reaches P·N·2.
        let mut doubled_area: u128 = 0;
        let (mut prev_tp, mut prev_fp) = (0u64, 0u64);
        for cut in self.cuts() {
            doubled_area += (cut.fp - prev_fp) as u128 * (cut.tp + prev_tp) as u128;
            (prev_tp, prev_fp) = (cut.tp, cut.fp);
        }
        doubled_area as f64 / (2.0 * self.anomalous as f64 * self.normal as f64)
    }

    /// Needs an anomalous sample.
    fn average_precision(&self) -> f64 {
        let mut ap = 0.0;
        let mut prev_tp = 0u64;
        for cut in self.cuts() {
            if cut.tp > prev_tp {
                let recall_gain = (cut.tp - prev_tp) as f64 / self.anomalous as f64;
                ap += recall_gain * cut.tp as f64 / (cut.tp + cut.fp) as f64;
                prev_tp = cut.tp;
            }
        }
        ap
    }

    /// Cumulative counts at the end of each run of tied scores, by decreasing score.
    fn cuts(&self) -> impl Iterator<Item = Cut<S>> + '_ {
        let (mut tp, mut fp) = (0u64, 0u64);
        self.items.chunk_by(|a, b| a.0 == b.0).map(move |run| {
            let positives = run.iter().filter(|p| p.1 != 0).count() as u64;
            tp += positives;
            fp += run.len() as u64 - positives;
            Cut { score: run[0].0, tp, fp }
        })
    }
}

struct Cut<S> {
    score: S,
    tp: u64,
    fp: u64,
}

/// Area under the ROC curve, exact with ties (= `sklearn.metrics.roc_auc_score`).
/// Errors when either class is absent, lengths differ or a score is not finite.
pub fn roc_auc<S: Score, L: Label>(scores: &[S], labels: &[L]) -> Result<f64> {
    let ranked = Ranked::new(scores, labels, "roc_auc")?;
    ranked.require_both_classes("roc_auc")?;
    Ok(ranked.roc_auc())
}

/// [`roc_auc`] and [`average_precision`] of the same samples from one sort: pixel metrics pool
/// millions of scores, and sorting them is most of the cost of either figure.
pub fn roc_auc_and_average_precision<S: Score, L: Label>(scores: &[S], labels: &[L]) -> Result<(f64, f64)> {
    let ranked = Ranked::new(scores, labels, "roc_auc")?;
    ranked.require_both_classes("roc_auc")?;
    Ok((ranked.roc_auc(), ranked.average_precision()))
}

/// Average precision, step-wise with tied scores grouped (= `sklearn.metrics.average_precision_score`).
/// Needs at least one anomalous sample; normal samples may be absent (AP is then 1).
pub fn average_precision<S: Score, L: Label>(scores: &[S], labels: &[L]) -> Result<f64> {
    let ranked = Ranked::new(scores, labels, "average_precision")?;
    ranked.require_anomalous("average_precision")?;
    Ok(ranked.average_precision())
}

/// ROC curve: (FPR, TPR) from (0, 0) at threshold +∞ through every cut to (1, 1), without
/// dropping collinear points. Use [`Curve::downsampled`] for plots.
pub fn roc_curve<S: Score, L: Label>(scores: &[S], labels: &[L]) -> Result<Curve> {
    let ranked = Ranked::new(scores, labels, "roc_curve")?;
    ranked.require_both_classes("roc_curve")?;
    let (p, n) = (ranked.anomalous as f64, ranked.normal as f64);
    let mut points = vec![CurvePoint { x: 0.0, y: 0.0, threshold: f64::INFINITY }];
    points.extend(ranked.cuts().map(|c| CurvePoint {
        x: c.fp as f64 / n,
        y: c.tp as f64 / p,
        threshold: c.score.into(),
    }));
    Ok(Curve { points })
}

/// Precision–recall curve: (recall, precision) from (0, 1) at threshold +∞ through every cut.
pub fn pr_curve<S: Score, L: Label>(scores: &[S], labels: &[L]) -> Result<Curve> {
    let ranked = Ranked::new(scores, labels, "pr_curve")?;
    ranked.require_anomalous("pr_curve")?;
    let p = ranked.anomalous as f64;
    let mut points = vec![CurvePoint { x: 0.0, y: 1.0, threshold: f64::INFINITY }];
    points.extend(ranked.cuts().map(|c| CurvePoint {
        x: c.tp as f64 / p,
        y: c.tp as f64 / (c.tp + c.fp) as f64,
        threshold: c.score.into(),
    }));
    Ok(Curve { points })
}

/// The best F1 over all cuts and where it is reached.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct F1Max {
    pub f1: f64,
    /// Decision threshold for vigil's rule `score > threshold`: midway between
    /// `lowest_flagged_score` and the next lower score (just below it if there is none), so it
    /// reproduces `counts` exactly on these scores (comparing in f64).
    pub threshold: f64,
    /// The lowest score flagged at the optimum (scikit-learn's `threshold`, rule `score >= t`).
    pub lowest_flagged_score: f64,
    pub counts: BinaryCounts,
}

/// F1-max and its decision threshold (for `score > threshold`), see [`f1_max_detailed`].
pub fn f1_max<S: Score, L: Label>(scores: &[S], labels: &[L]) -> Result<(f64, f64)> {
    let best = f1_max_detailed(scores, labels)?;
    Ok((best.f1, best.threshold))
}

/// F1-max over all cuts with its counts. Equal F1 values are compared exactly (as fractions);
/// among equal ones the lowest threshold wins, as `np.argmax` over scikit-learn's increasing
/// thresholds picks.
pub fn f1_max_detailed<S: Score, L: Label>(scores: &[S], labels: &[L]) -> Result<F1Max> {
    let ranked = Ranked::new(scores, labels, "f1_max")?;
    ranked.require_anomalous("f1_max")?;
    let p = ranked.anomalous;
    // F1 = 2tp / (tp + fp + p): the best is kept as an exact fraction, with its cut.
    let mut best: Option<(u64, u64, Cut<S>)> = None;
    // The threshold needs the score of the cut after the best one, known one step later.
    let mut next_lower: Option<f64> = None;
    let mut awaiting_next = false;
    for cut in ranked.cuts() {
        if awaiting_next {
            next_lower = Some(cut.score.into());
            awaiting_next = false;
        }
        let (num, den) = (2 * cut.tp, cut.tp + cut.fp + p);
        let better = match &best {
            None => true,
            Some((bn, bd, _)) => num as u128 * *bd as u128 >= *bn as u128 * den as u128,
        };
        if better {
            best = Some((num, den, cut));
            next_lower = None;
            awaiting_next = true;
        }
    }
    let (num, den, cut) = best.expect("a non-empty ranking has at least one cut");
    let total = ranked.items.len() as u64;
    Ok(F1Max {
        f1: num as f64 / den as f64,
        threshold: threshold_below(cut.score.into(), next_lower),
        lowest_flagged_score: cut.score.into(),
        counts: BinaryCounts { tp: cut.tp, fp: cut.fp, fn_: p - cut.tp, tn: total - p - cut.fp },
    })
}

/// A value t with `next_lower <= t < flagged`, midway when the gap allows.
pub(crate) fn threshold_below(flagged: f64, next_lower: Option<f64>) -> f64 {
    match next_lower {
        Some(lower) => {
            let mid = lower + (flagged - lower) / 2.0;
            if mid < flagged {
                mid
            } else {
                lower
            }
        }
        None => flagged.next_down(),
    }
}

/// Confusion counts of a binary decision.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BinaryCounts {
    pub tp: u64,
    pub fp: u64,
    pub tn: u64,
    pub fn_: u64,
}

/// Counts of two sets of samples together (e.g. the pixels of each image of a test set).
impl std::ops::AddAssign for BinaryCounts {
    fn add_assign(&mut self, other: BinaryCounts) {
        self.tp += other.tp;
        self.fp += other.fp;
        self.tn += other.tn;
        self.fn_ += other.fn_;
    }
}

impl BinaryCounts {
    /// Counts at `threshold` with vigil's rule: `score > threshold` is anomalous.
    pub fn at_threshold<S: Score, L: Label>(scores: &[S], labels: &[L], threshold: f64) -> Result<Self> {
        check_same_len(scores.len(), labels.len(), "binary counts")?;
        check_scores(scores, "binary counts")?;
        if threshold.is_nan() {
            return Err(VigilError::invalid("binary counts: the threshold is NaN"));
        }
        let mut counts = BinaryCounts::default();
        for (&s, &l) in scores.iter().zip(labels) {
            counts.add(s.into() > threshold, l.is_anomalous());
        }
        Ok(counts)
    }

    /// Counts of given decisions (e.g. a predicted mask or image verdicts) against ground truth
    /// of the same length.
    pub fn from_decisions<P: Label, L: Label>(predicted: &[P], truth: &[L]) -> Result<Self> {
        if predicted.len() != truth.len() {
            return Err(VigilError::invalid(format!(
                "binary counts: {} predictions but {} ground-truth labels",
                predicted.len(),
                truth.len()
            )));
        }
        let mut counts = BinaryCounts::default();
        for (&p, &t) in predicted.iter().zip(truth) {
            counts.add(p.is_anomalous(), t.is_anomalous());
        }
        Ok(counts)
    }

    #[inline]
    fn add(&mut self, flagged: bool, anomalous: bool) {
        match (flagged, anomalous) {
            (true, true) => self.tp += 1,
            (true, false) => self.fp += 1,
            (false, false) => self.tn += 1,
            (false, true) => self.fn_ += 1,
        }
    }

    pub fn total(&self) -> u64 {
        self.tp + self.fp + self.tn + self.fn_
    }

    /// (tp + tn) / total; 0 when there is no sample.
    pub fn accuracy(&self) -> f64 {
        ratio(self.tp + self.tn, self.total())
    }

    /// tp / (tp + fp); 0 when nothing is flagged (scikit-learn's `zero_division=0`).
    pub fn precision(&self) -> f64 {
        ratio(self.tp, self.tp + self.fp)
    }

    /// tp / (tp + fn); 0 when nothing is anomalous.
    pub fn recall(&self) -> f64 {
        ratio(self.tp, self.tp + self.fn_)
    }

    /// fp / (fp + tn): the share of normal samples flagged; 0 when there is no normal sample.
    pub fn false_positive_rate(&self) -> f64 {
        ratio(self.fp, self.fp + self.tn)
    }

    /// 2tp / (2tp + fp + fn) (= harmonic mean of precision and recall); 0 when undefined.
    pub fn f1(&self) -> f64 {
        ratio(2 * self.tp, 2 * self.tp + self.fp + self.fn_)
    }

    /// tp / (tp + fp + fn): intersection over union of flagged and anomalous; 0 when both are empty.
    pub fn iou(&self) -> f64 {
        ratio(self.tp, self.tp + self.fp + self.fn_)
    }
}

fn ratio(num: u64, den: u64) -> f64 {
    if den == 0 {
        0.0
    } else {
        num as f64 / den as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Mann–Whitney with ties by brute force, the definition the sort-based AUC must match.
    fn pairwise_auc(scores: &[f64], labels: &[bool]) -> f64 {
        let (mut wins, mut pairs) = (0.0, 0.0);
        for (i, &si) in scores.iter().enumerate() {
            for (j, &sj) in scores.iter().enumerate() {
                if labels[i] && !labels[j] {
                    pairs += 1.0;
                    wins += if si > sj {
                        1.0
                    } else if si == sj {
                        0.5
                    } else {
                        0.0
                    };
                }
            }
        }
        wins / pairs
    }

    #[test]
    fn auc_matches_pairwise_definition_with_ties() {
        let scores = [0.1, 0.4, 0.35, 0.8, 0.4, 0.4, 0.1, 0.9, 0.35];
        let labels = [false, false, true, true, true, false, false, true, false];
        let auc = roc_auc(&scores, &labels).unwrap();
        assert!((auc - pairwise_auc(&scores, &labels)).abs() < 1e-12);
        // sklearn: roc_auc_score([0,0,1,1],[0.1,0.4,0.35,0.8]) = 0.75
        assert!((roc_auc(&[0.1, 0.4, 0.35, 0.8], &[0u8, 0, 1, 1]).unwrap() - 0.75).abs() < 1e-15);
    }

    #[test]
    fn one_sort_gives_both_auc_and_ap() {
        let scores = [0.1f32, 0.4, 0.35, 0.8, 0.4, 0.4, 0.1, 0.9, 0.35];
        let labels = [false, false, true, true, true, false, false, true, false];
        let both = roc_auc_and_average_precision(&scores, &labels).unwrap();
        assert_eq!(both, (roc_auc(&scores, &labels).unwrap(), average_precision(&scores, &labels).unwrap()));
        assert!(roc_auc_and_average_precision(&[0.1f32, 0.2], &[true, true]).is_err());
    }

    #[test]
    fn auc_of_all_equal_scores_is_one_half_and_single_class_errors() {
        assert_eq!(roc_auc(&[2.0f32; 5], &[true, false, false, true, false]).unwrap(), 0.5);
        let e = roc_auc(&[0.1, 0.2], &[true, true]).unwrap_err().to_string();
        assert!(e.contains("no normal sample"), "{e}");
        let e = roc_auc(&[0.1, 0.2], &[false, false]).unwrap_err().to_string();
        assert!(e.contains("no anomalous sample"), "{e}");
        let e = roc_auc(&[0.1, 0.2], &[false]).unwrap_err().to_string();
        assert!(e.contains("2 scores but 1 labels"), "{e}");
    }

    #[test]
    fn average_precision_matches_sklearn_examples() {
        // sklearn docs: average_precision_score([0,0,1,1],[0.1,0.4,0.35,0.8]) = 0.8333...
        let ap = average_precision(&[0.1, 0.4, 0.35, 0.8], &[false, false, true, true]).unwrap();
        assert!((ap - 5.0 / 6.0).abs() < 1e-15);
        // All scores tied: one step at recall 1 with precision = prevalence.
        let ap = average_precision(&[1.0; 4], &[true, false, false, false]).unwrap();
        assert!((ap - 0.25).abs() < 1e-15);
    }

    #[test]
    fn curves_start_at_the_origin_and_end_at_full_recall() {
        let scores = [0.1, 0.4, 0.35, 0.8];
        let labels = [false, false, true, true];
        let roc = roc_curve(&scores, &labels).unwrap();
        let xy: Vec<(f64, f64)> = roc.points.iter().map(|p| (p.x, p.y)).collect();
        assert_eq!(xy, vec![(0.0, 0.0), (0.0, 0.5), (0.5, 0.5), (0.5, 1.0), (1.0, 1.0)]);
        assert_eq!(roc.points[2].threshold, 0.4);
        let pr = pr_curve(&scores, &labels).unwrap();
        assert_eq!(pr.points.last().unwrap().x, 1.0);
        assert_eq!(pr.points.last().unwrap().y, 0.5);
    }

    #[test]
    fn f1_max_threshold_reproduces_its_counts() {
        let scores = [0.1f32, 0.4, 0.35, 0.8, 0.2, 0.9];
        let labels = [false, false, true, true, false, true];
        let best = f1_max_detailed(&scores, &labels).unwrap();
        // Cuts: {0.9}: F1 = 2/4, {0.9, 0.8}: 4/5, +0.4: 4/6, +0.35: 6/7.
        assert!((best.f1 - 6.0 / 7.0).abs() < 1e-15);
        assert_eq!(best.lowest_flagged_score, 0.35f32 as f64);
        assert!(best.threshold < 0.35f32 as f64 && best.threshold > 0.2f32 as f64);
        let counts = BinaryCounts::at_threshold(&scores, &labels, best.threshold).unwrap();
        assert_eq!(counts, best.counts);
        assert_eq!(counts, BinaryCounts { tp: 3, fp: 1, tn: 2, fn_: 0 });
        assert!((counts.f1() - best.f1).abs() < 1e-15);
    }

    #[test]
    fn f1_max_flagging_everything_puts_threshold_below_the_minimum() {
        let best = f1_max_detailed(&[0.5, 0.5, 0.5], &[true, true, false]).unwrap();
        assert_eq!(f1_max(&[0.5, 0.5, 0.5], &[true, true, false]).unwrap(), (best.f1, best.threshold));
        assert!(best.threshold < 0.5);
        assert_eq!(best.counts.tp, 2);
        assert_eq!(BinaryCounts::at_threshold(&[0.5], &[true], best.threshold).unwrap().tp, 1);
    }

    #[test]
    fn counts_give_standard_ratios_and_zero_when_undefined() {
        let c = BinaryCounts { tp: 3, fp: 1, tn: 5, fn_: 2 };
        assert!((c.accuracy() - 8.0 / 11.0).abs() < 1e-15);
        assert!((c.precision() - 0.75).abs() < 1e-15);
        assert!((c.recall() - 0.6).abs() < 1e-15);
        assert!((c.f1() - 2.0 * 0.75 * 0.6 / 1.35).abs() < 1e-15);
        assert!((c.iou() - 0.5).abs() < 1e-15);
        assert!((c.false_positive_rate() - 1.0 / 6.0).abs() < 1e-15);
        let none = BinaryCounts { tn: 4, ..Default::default() };
        assert_eq!((none.precision(), none.recall(), none.f1(), none.accuracy()), (0.0, 0.0, 0.0, 1.0));
        assert_eq!(BinaryCounts { tp: 2, ..Default::default() }.false_positive_rate(), 0.0);
        let c = BinaryCounts::from_decisions(&[1u8, 0, 1], &[true, true, false]).unwrap();
        assert_eq!(c, BinaryCounts { tp: 1, fp: 1, tn: 0, fn_: 1 });
    }
}
