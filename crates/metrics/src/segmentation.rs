//! Segmentation metrics: per-image IoU and the thesis' mIoU, plus pooling of pixel maps for the
//! pixel-level ranking metrics.
//!
//! **mIoU** follows Tailanian's thesis (Eqs. B.3–B.4) and its U-Flow evaluation code: for each
//! test image, IoU = (|P ∩ G| + ε) / (|P ∪ G| + ε) with ε = `f64::EPSILON`, P the predicted and G
//! the ground-truth anomalous pixels; mIoU is the mean over **all** test images, normal ones
//! included. So a normal image with an empty prediction scores 1 and one with any false
//! detection scores about 0, and a small anomaly weighs as much as a large one.
//!
//! The thesis' **oracle** mIoU is the best mIoU over all thresholds on the test set itself
//! ([`oracle_mean_iou`]): an upper bound for comparison, never a threshold to deploy.

use serde::{Deserialize, Serialize};
use vigil_core::{Map, Mask, Result, VigilError};

use crate::binary::{threshold_below, BinaryCounts};
use crate::scores::{check_scores, Label, Score};

/// The ε of the thesis' IoU, which makes an empty prediction on an empty ground truth score 1.
pub const IOU_EPSILON: f64 = f64::EPSILON;

/// IoU of one image: (|P ∩ G| + ε) / (|P ∪ G| + ε).
pub fn iou<P: Label, L: Label>(predicted: &[P], truth: &[L]) -> Result<f64> {
    let counts = BinaryCounts::from_decisions(predicted, truth)?;
    Ok(iou_of_counts(&counts))
}

fn iou_of_counts(c: &BinaryCounts) -> f64 {
    (c.tp as f64 + IOU_EPSILON) / ((c.tp + c.fp + c.fn_) as f64 + IOU_EPSILON)
}

/// mIoU over images (see the module docs): `predicted[i]` and `truth[i]` are image `i`'s masks.
pub fn mean_iou<P: Label, L: Label>(predicted: &[&[P]], truth: &[&[L]]) -> Result<f64> {
    check_image_counts(predicted.len(), truth.len())?;
    let mut sum = 0.0;
    for (i, (p, t)) in predicted.iter().zip(truth).enumerate() {
        sum += iou(p, t).map_err(|e| VigilError::invalid(format!("mean_iou: image #{i}: {e}")))?;
    }
    Ok(sum / predicted.len() as f64)
}

/// mIoU of the masks `map > threshold` (vigil's rule, compared in f64) against `truth`.
pub fn mean_iou_at<L: Label>(maps: &[&[f32]], truth: &[&[L]], threshold: f64) -> Result<f64> {
    check_image_counts(maps.len(), truth.len())?;
    if threshold.is_nan() {
        return Err(VigilError::invalid("mean_iou: the threshold is NaN"));
    }
    let mut sum = 0.0;
    for (i, (map, t)) in maps.iter().zip(truth).enumerate() {
        let what = format!("mean_iou: image #{i}");
        check_scores(map, &what)?;
        let counts = BinaryCounts::at_threshold(map, t, threshold)
            .map_err(|e| VigilError::invalid(format!("{what}: {e}")))?;
        sum += iou_of_counts(&counts);
    }
    Ok(sum / maps.len() as f64)
}

/// The best mIoU over every threshold and the threshold reaching it.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct MeanIouOptimum {
    pub mean_iou: f64,
    /// For vigil's rule `score > threshold`; the highest such threshold when several tie.
    pub threshold: f64,
}

/// Exact oracle mIoU: every distinct score is tried as a cut (plus "nothing flagged") with one
/// sort of all pixels, updating only the IoU terms of the images a cut touches.
pub fn oracle_mean_iou<L: Label>(maps: &[&[f32]], truth: &[&[L]]) -> Result<MeanIouOptimum> {
    check_image_counts(maps.len(), truth.len())?;
    if maps.len() >= 1 << 31 {
        return Err(VigilError::invalid("oracle mean_iou: too many images (2^31 or more)"));
    }
    let total = maps.iter().map(|m| m.len()).sum();
    let mut items: Vec<(f32, u32)> = Vec::with_capacity(total);
    let mut anomalous = vec![0u64; maps.len()];
    for (i, (map, t)) in maps.iter().zip(truth).enumerate() {
        let what = format!("oracle mean_iou: image #{i}");
        check_scores(map, &what)?;
        if map.len() != t.len() {
            return Err(VigilError::invalid(format!(
                "{what}: the map holds {} values but the mask {}",
                map.len(),
                t.len()
            )));
        }
        for (&s, &l) in map.iter().zip(t.iter()) {
            let is_anomalous = l.is_anomalous();
            anomalous[i] += is_anomalous as u64;
            // payload: image index and ground-truth bit
            items.push((s, ((i as u32) << 1) | is_anomalous as u32));
        }
    }
    f32::sort_descending(&mut items);

    let term = |inter: u64, union: u64| (inter as f64 + IOU_EPSILON) / (union as f64 + IOU_EPSILON);
    let n = maps.len() as f64;
    let mut intersection = vec![0u64; maps.len()];
    let mut union = anomalous;
    let mut sum = CompensatedSum::default();
    for &u in &union {
        sum.add(term(0, u));
    }
    let mut best = MeanIouOptimum { mean_iou: sum.value() / n, threshold: items[0].0 as f64 };
    let mut touched: Vec<usize> = Vec::new();
    let mut is_touched = vec![false; maps.len()];
    let mut runs = items.chunk_by(|a, b| a.0 == b.0).peekable();
    while let Some(run) = runs.next() {
        for &(_, payload) in run {
            let i = (payload >> 1) as usize;
            if !is_touched[i] {
                is_touched[i] = true;
                touched.push(i);
                sum.add(-term(intersection[i], union[i]));
            }
            if payload & 1 == 1 {
                intersection[i] += 1;
            } else {
                union[i] += 1;
            }
        }
        for i in touched.drain(..) {
            is_touched[i] = false;
            sum.add(term(intersection[i], union[i]));
        }
        let mean_iou = sum.value() / n;
        if mean_iou > best.mean_iou {
            let next_lower = runs.peek().map(|r| r[0].0 as f64);
            best = MeanIouOptimum { mean_iou, threshold: threshold_below(run[0].0 as f64, next_lower) };
        }
    }
    Ok(best)
}

/// Neumaier-compensated sum: the oracle adds and removes millions of IoU terms, and plain
/// accumulation would drift away from the directly computed mIoU.
#[derive(Default)]
pub(crate) struct CompensatedSum {
    sum: f64,
    compensation: f64,
}

impl CompensatedSum {
    pub(crate) fn add(&mut self, v: f64) {
        let t = self.sum + v;
        if self.sum.abs() >= v.abs() {
            self.compensation += (self.sum - t) + v;
        } else {
            self.compensation += (v - t) + self.sum;
        }
        self.sum = t;
    }

    pub(crate) fn value(&self) -> f64 {
        self.sum + self.compensation
    }
}

fn check_image_counts(predicted: usize, truth: usize) -> Result<()> {
    if predicted == 0 {
        return Err(VigilError::invalid("mean_iou: no images given"));
    }
    if predicted != truth {
        return Err(VigilError::invalid(format!(
            "mean_iou: {predicted} predictions but {truth} ground-truth masks"
        )));
    }
    Ok(())
}

/// Pools every pixel of every image (scores and ground truth) for pixel-level AUROC, AP and
/// F1; each map must have its mask's size.
pub fn flatten_pixels(maps: &[&Map], masks: &[&Mask]) -> Result<(Vec<f32>, Vec<bool>)> {
    if maps.len() != masks.len() {
        return Err(VigilError::invalid(format!(
            "pixel metrics: {} maps but {} masks",
            maps.len(),
            masks.len()
        )));
    }
    let total = maps.iter().map(|m| m.data.len()).sum();
    let (mut scores, mut labels) = (Vec::with_capacity(total), Vec::with_capacity(total));
    for (i, (map, mask)) in maps.iter().zip(masks).enumerate() {
        if (map.width, map.height) != (mask.width, mask.height) {
            return Err(VigilError::invalid(format!(
                "pixel metrics: image #{i}: map is {}x{} but its mask is {}x{}",
                map.width, map.height, mask.width, mask.height
            )));
        }
        scores.extend_from_slice(&map.data);
        labels.extend_from_slice(&mask.data);
    }
    Ok((scores, labels))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iou_of_overlapping_masks_and_of_empty_ones() {
        let p = [true, true, false, false];
        let g = [false, true, true, false];
        assert!((iou(&p, &g).unwrap() - 1.0 / 3.0).abs() < 1e-12);
        assert_eq!(iou(&[false; 3], &[false; 3]).unwrap(), 1.0);
        assert!(iou(&[true, false], &[false, false]).unwrap() < 1e-15);
    }

    #[test]
    fn mean_iou_matches_the_thesis_toy_example_idea() {
        // Two images: one large anomaly found exactly, one small anomaly missed. Pooled IoU is
        // 8/9 but mIoU weighs the small miss as much: (1 + ~0) / 2.
        let big = [true; 8];
        let small_truth = [true, false, false, false, false, false, false, false];
        let miou = mean_iou(&[&big[..], &[false; 8][..]], &[&big[..], &small_truth[..]]).unwrap();
        assert!((miou - 0.5).abs() < 1e-12, "{miou}");
    }

    #[test]
    fn mean_iou_at_thresholds_maps_strictly() {
        let map = [0.2f32, 0.5, 0.7, 0.1];
        let truth = [false, true, true, false];
        assert!((mean_iou_at(&[&map], &[&truth], 0.4).unwrap() - 1.0).abs() < 1e-12);
        // 0.5 is not > 0.5: only one of the two anomalous pixels is flagged.
        assert!((mean_iou_at(&[&map], &[&truth], 0.5).unwrap() - 0.5).abs() < 1e-12);
        let e = mean_iou_at(&[&map], &[&truth[..3]], 0.5).unwrap_err().to_string();
        assert!(e.contains("image #0"), "{e}");
    }

    #[test]
    fn oracle_finds_the_best_cut_and_its_threshold_reproduces_it() {
        let maps: [&[f32]; 3] = [&[0.9, 0.8, 0.1, 0.2], &[0.3, 0.7, 0.2, 0.1], &[0.6, 0.1, 0.1, 0.0]];
        let truth: [&[bool]; 3] =
            [&[true, true, false, false], &[false, true, false, false], &[false, false, false, false]];
        let best = oracle_mean_iou(&maps, &truth).unwrap();
        // Flagging > 0.6 finds both anomalies exactly and leaves the normal image clean.
        assert!((best.mean_iou - 1.0).abs() < 1e-12, "{best:?}");
        assert!(best.threshold >= 0.6 && best.threshold < 0.7, "{best:?}");
        let direct = mean_iou_at(&maps, &truth, best.threshold).unwrap();
        assert!((direct - best.mean_iou).abs() < 1e-12);
        // No threshold does better than brute force over all scores.
        for t in [-1.0, 0.0, 0.1, 0.2, 0.3, 0.6, 0.7, 0.8, 0.9] {
            assert!(mean_iou_at(&maps, &truth, t).unwrap() <= best.mean_iou + 1e-12);
        }
    }

    #[test]
    fn oracle_may_flag_nothing() {
        // The only anomaly scores lowest: flagging nothing (all normal images perfect) wins.
        let maps: [&[f32]; 2] = [&[0.9, 0.1], &[0.5, 0.5]];
        let truth: [&[bool]; 2] = [&[false, true], &[false, false]];
        let best = oracle_mean_iou(&maps, &truth).unwrap();
        assert!((best.mean_iou - 0.5).abs() < 1e-12);
        assert_eq!(best.threshold, 0.9f32 as f64);
    }

    #[test]
    fn flatten_checks_sizes() {
        let maps = [Map::filled(2, 1, 0.5), Map::filled(1, 1, 0.7)];
        let masks = [Mask::new(2, 1, vec![true, false]).unwrap(), Mask::empty(1, 1)];
        let (maps, masks): (Vec<&Map>, Vec<&Mask>) = (maps.iter().collect(), masks.iter().collect());
        let (s, l) = flatten_pixels(&maps, &masks).unwrap();
        assert_eq!(s, vec![0.5, 0.5, 0.7]);
        assert_eq!(l, vec![true, false, false]);
        assert!(flatten_pixels(&maps[..1], &masks[1..]).unwrap_err().to_string().contains("1x1"));
    }
}
