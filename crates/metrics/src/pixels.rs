//! Every pixel-level ranking figure of a test set from one sort of its pixels: AUROC and AP
//! ([`crate::roc_auc_and_average_precision`]), AUPRO with its PRO curve
//! ([`crate::aupro_and_pro_curve`]) and the oracle mIoU ([`crate::oracle_mean_iou`]).
//!
//! The three each sorted all pixels with their own payload; sorting tens of millions of pixels is
//! most of their cost, and three sorts side by side also held three copies of the pixels. Here one
//! payload serves all three, and one pass over the ranking visits the pixels in the same order and
//! accumulates every sum in the same sequence as each function does, so every figure is
//! bit-identical to theirs (tested below).

use rayon::prelude::*;
use vigil_core::{Result, VigilError};

use crate::binary::threshold_below;
use crate::curve::{Curve, CurvePoint};
use crate::pro::{check_limit, label_regions, LimitedTrapezoid};
use crate::scores::{check_scores, Score};
use crate::segmentation::{CompensatedSum, MeanIouOptimum, IOU_EPSILON};

/// The pixel-level ranking figures of a test set.
#[derive(Clone, Debug, PartialEq)]
pub struct PixelRankingMetrics {
    pub roc_auc: f64,
    pub average_precision: f64,
    /// AUPRO up to the given FPR limit, normalised to [0, 1].
    pub aupro: f64,
    /// The PRO curve as [`crate::pro_curve`] gives it, thinned with [`Curve::downsampled`].
    pub pro_curve: Curve,
    pub oracle_mean_iou: MeanIouOptimum,
}

/// The payload of an OK pixel is `image << 1`, that of a defect pixel `region << 1 | 1`
/// (regions numbered from 1 over the whole set, in image order).
const DEFECT: u32 = 1;

/// [`crate::roc_auc_and_average_precision`] of the pooled pixels, [`crate::aupro_and_pro_curve`]
/// (the curve thinned to `curve_points`) and [`crate::oracle_mean_iou`], from one ranking.
/// `maps[i]` and `masks[i]` are row-major and `sizes[i] = (width, height)` of image `i`. Errors as
/// those functions do: mismatched sizes, non-finite scores, a limit outside (0, 1], no anomalous
/// region or no OK pixel.
pub fn pixel_ranking_metrics(
    maps: &[&[f32]],
    masks: &[&[bool]],
    sizes: &[(usize, usize)],
    aupro_limit: f64,
    curve_points: usize,
) -> Result<PixelRankingMetrics> {
    const WHAT: &str = "pixel metrics";
    check_limit(aupro_limit)?;
    if maps.len() != masks.len() || maps.len() != sizes.len() {
        return Err(VigilError::invalid(format!(
            "{WHAT}: {} maps, {} masks and {} sizes; one of each per image is needed",
            maps.len(),
            masks.len(),
            sizes.len()
        )));
    }
    if maps.is_empty() {
        return Err(VigilError::invalid(format!("{WHAT}: no images given")));
    }
    if maps.len() >= 1 << 31 {
        return Err(VigilError::invalid(format!("{WHAT}: too many images (2^31 or more)")));
    }
    let total: usize = sizes.iter().map(|&(w, h)| w * h).sum();
    let mut items: Vec<(f32, u32)> = vec![(0.0, 0); total];
    // Images are checked and their regions labelled side by side, each into its own stretch of
    // `items`, regions numbered within the image; the numbers are made global below.
    let labelled: Vec<Result<Vec<u64>>> = split_by_sizes(&mut items, sizes)
        .into_par_iter()
        .enumerate()
        .map(|(i, stretch)| {
            let ((map, mask), (width, height)) = ((maps[i], masks[i]), sizes[i]);
            let n = width * height;
            if map.len() != n || mask.len() != n {
                return Err(VigilError::invalid(format!(
                    "{WHAT}: image #{i} is {width}x{height} = {n} pixels but its map holds {} values and its mask {}",
                    map.len(),
                    mask.len()
                )));
            }
            check_scores(map, &format!("{WHAT}: image #{i}"))?;
            let (mut regions, mut region_sizes) = (vec![0u32; n], Vec::new());
            label_regions(mask, width, height, &mut regions, &mut region_sizes, &mut Vec::new())?;
            let ok = (i as u32) << 1;
            for ((item, &s), &r) in stretch.iter_mut().zip(map).zip(&regions) {
                *item = (s, if r == 0 { ok } else { (r << 1) | DEFECT });
            }
            Ok(region_sizes)
        })
        .collect();
    // The first error in image order, as a loop over the images would give.
    let labelled = labelled.into_iter().collect::<Result<Vec<Vec<u64>>>>()?;
    let mut region_sizes: Vec<u64> = Vec::new();
    let mut region_image: Vec<u32> = Vec::new();
    let mut first_region = Vec::with_capacity(maps.len());
    let mut defect_pixels = vec![0u64; maps.len()];
    for (i, sizes) in labelled.into_iter().enumerate() {
        first_region.push(region_sizes.len() as u32);
        defect_pixels[i] = sizes.iter().sum();
        region_sizes.extend(sizes);
        if region_sizes.len() >= 1 << 31 {
            return Err(VigilError::invalid(format!("{WHAT}: too many defect regions (2^31 or more)")));
        }
        region_image.resize(region_sizes.len(), i as u32);
    }
    split_by_sizes(&mut items, sizes).into_par_iter().zip(first_region).for_each(|(stretch, first)| {
        if first > 0 {
            for item in stretch.iter_mut().filter(|item| item.1 & DEFECT == DEFECT) {
                item.1 += first << 1;
            }
        }
    });
    if region_sizes.is_empty() {
        return Err(VigilError::invalid(format!(
            "{WHAT}: no ground-truth anomalous region in any mask; the pixel metrics are undefined"
        )));
    }
    let anomalous: u64 = region_sizes.iter().sum();
    let ok_pixels = total as u64 - anomalous;
    if ok_pixels == 0 {
        return Err(VigilError::invalid(format!(
            "{WHAT}: every pixel is anomalous in the ground truth; the false-positive rate is undefined"
        )));
    }
    f32::sort_descending(&mut items);
    let inverse_region_sizes: Vec<f64> = region_sizes.iter().map(|&s| 1.0 / s as f64).collect();
    let region_count = inverse_region_sizes.len() as f64;

    // The PRO curve is [(0,0), one point per cut, (1,1)], thinned as Curve::downsampled does:
    // the cuts are counted first so that the kept points are known as they come.
    let cuts = 1 + items.par_windows(2).filter(|w| w[0].0 != w[1].0).count();
    let mut points = KeptPoints::new(cuts + 2, curve_points.max(2));
    points.offer(0, || CurvePoint { x: 0.0, y: 0.0, threshold: f64::INFINITY });

    // Ranking (binary.rs): cumulative counts per cut. The area under the ROC curve grows by
    // (fp - prev_fp) * (tp + prev_tp) per cut; it is added where tp changes (and at the end), the
    // cuts in between, at one tp, all at once: the same integer.
    let (mut tp, mut fp) = (0u64, 0u64);
    let (mut doubled_area, mut anchor_tp, mut anchor_fp) = (0u128, 0u64, 0u64);
    let (mut ap, mut ap_tp) = (0.0f64, 0u64);
    // PRO (pro.rs).
    let mut overlap_sum = 0.0f64;
    let mut pro = 0.0f64;
    let mut integral = LimitedTrapezoid::new(aupro_limit, (0.0, 0.0));
    // Oracle mIoU (segmentation.rs); each image's current IoU term is kept, so it is divided once.
    let term = |inter: u64, union: u64| (inter as f64 + IOU_EPSILON) / (union as f64 + IOU_EPSILON);
    let images = maps.len() as f64;
    let mut intersection = vec![0u64; maps.len()];
    let mut union = defect_pixels;
    let mut terms: Vec<f64> = union.iter().map(|&u| term(0, u)).collect();
    let mut sum = CompensatedSum::default();
    for &t in &terms {
        sum.add(t);
    }
    // The mean is the sum over a fixed count, so a sum no larger than the best one's cannot give a
    // larger mean (division rounds monotonically): those cuts skip the division.
    let mut best_sum = sum.value();
    let mut best = MeanIouOptimum { mean_iou: best_sum / images, threshold: items[0].0 as f64 };
    let mut touched: Vec<usize> = Vec::new();
    let mut is_touched = vec![false; maps.len()];

    let mut start = 0;
    for cut in 1..=cuts {
        let score = items[start].0;
        let mut end = start + 1;
        while end < items.len() && items[end].0 == score {
            end += 1;
        }
        let (tp_before, fp_before) = (tp, fp);
        for &(_, payload) in &items[start..end] {
            let image = if payload & DEFECT == DEFECT {
                let region = (payload >> 1) as usize - 1;
                overlap_sum += inverse_region_sizes[region];
                tp += 1;
                region_image[region] as usize
            } else {
                fp += 1;
                (payload >> 1) as usize
            };
            if !is_touched[image] {
                is_touched[image] = true;
                touched.push(image);
                sum.add(-terms[image]);
            }
            if payload & DEFECT == DEFECT {
                intersection[image] += 1;
            } else {
                union[image] += 1;
            }
        }
        if tp != tp_before {
            doubled_area += (fp_before - anchor_fp) as u128 * (2 * anchor_tp) as u128
                + (fp - fp_before) as u128 * (tp + anchor_tp) as u128;
            (anchor_tp, anchor_fp) = (tp, fp);
            if tp > ap_tp {
                ap += (tp - ap_tp) as f64 / anomalous as f64 * tp as f64 / (tp + fp) as f64;
                ap_tp = tp;
            }
            pro = (overlap_sum / region_count).min(1.0);
        }
        // Past the FPR limit the rates are needed only for the kept points of the curve.
        if !integral.done() || points.due(cut) {
            let fpr = (fp as f64 / ok_pixels as f64).min(1.0);
            integral.push(fpr, pro);
            points.offer(cut, || CurvePoint { x: fpr, y: pro, threshold: score as f64 });
        }
        for image in touched.drain(..) {
            is_touched[image] = false;
            terms[image] = term(intersection[image], union[image]);
            sum.add(terms[image]);
        }
        let value = sum.value();
        if value > best_sum {
            let mean_iou = value / images;
            if mean_iou > best.mean_iou {
                let next_lower = items.get(end).map(|item| item.0 as f64);
                best = MeanIouOptimum { mean_iou, threshold: threshold_below(score as f64, next_lower) };
                best_sum = value;
            }
        }
        start = end;
    }
    doubled_area += (fp - anchor_fp) as u128 * (2 * anchor_tp) as u128;
    integral.push(1.0, 1.0);
    points.offer(cuts + 1, || CurvePoint { x: 1.0, y: 1.0, threshold: f64::NEG_INFINITY });
    Ok(PixelRankingMetrics {
        roc_auc: doubled_area as f64 / (2.0 * anomalous as f64 * ok_pixels as f64),
        average_precision: ap,
        aupro: integral.area() / aupro_limit,
        pro_curve: Curve { points: points.points },
        oracle_mean_iou: best,
    })
}

/// `items` cut into one stretch per image, of its size.
fn split_by_sizes<'a>(items: &'a mut [(f32, u32)], sizes: &[(usize, usize)]) -> Vec<&'a mut [(f32, u32)]> {
    let mut stretches = Vec::with_capacity(sizes.len());
    let mut rest = items;
    for &(w, h) in sizes {
        let (stretch, tail) = rest.split_at_mut(w * h);
        stretches.push(stretch);
        rest = tail;
    }
    stretches
}

/// The points of a curve of `len` points that [`Curve::downsampled`] keeps (at most `kept`),
/// collected as the curve is walked: the index of the next one is known in advance.
struct KeptPoints {
    len: usize,
    kept: usize,
    next: usize,
    points: Vec<CurvePoint>,
}

impl KeptPoints {
    fn new(len: usize, kept: usize) -> KeptPoints {
        let mut k = KeptPoints { len, kept, next: 0, points: Vec::with_capacity(kept.min(len)) };
        k.next = k.wanted(0);
        k
    }

    /// The index of the curve's point kept as the `k`-th, or none (usize::MAX) once all are.
    fn wanted(&self, k: usize) -> usize {
        if k >= self.kept.min(self.len) {
            usize::MAX
        } else if self.len <= self.kept {
            k
        } else {
            k * (self.len - 1) / (self.kept - 1)
        }
    }

    fn due(&self, index: usize) -> bool {
        index == self.next
    }

    /// Keeps the point at `index` (made by `point`) if it is one of the kept.
    fn offer(&mut self, index: usize, point: impl FnOnce() -> CurvePoint) {
        if self.due(index) {
            self.points.push(point());
            self.next = self.wanted(self.points.len());
        }
    }
}

#[cfg(test)]
mod tests {

    use super::*;
    use crate::{aupro_and_pro_curve, oracle_mean_iou, roc_auc_and_average_precision};

    /// Maps with many tied scores (coarse levels, signed zeros) and masks of several regions per
    /// image, some images without any.
    fn sample(images: usize, (w, h): (usize, usize), levels: f32) -> (Vec<Vec<f32>>, Vec<Vec<bool>>) {
        let mut state = 0x9e37_79b9_u64;
        let mut next = move || {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (state >> 40) as f32 / (1u64 << 24) as f32
        };
        let mut maps = Vec::new();
        let mut masks = Vec::new();
        for i in 0..images {
            let mut mask = vec![false; w * h];
            if i % 3 != 0 {
                for _ in 0..1 + i % 3 {
                    let (x0, y0) = ((next() * (w - 4) as f32) as usize, (next() * (h - 4) as f32) as usize);
                    for y in y0..y0 + 1 + (next() * 3.0) as usize {
                        for x in x0..x0 + 1 + (next() * 3.0) as usize {
                            mask[y * w + x] = true;
                        }
                    }
                }
            }
            let map = mask
                .iter()
                .map(|&m| {
                    let v = ((next() + if m { 0.4 } else { 0.0 }) * levels).floor() / levels - 0.2;
                    if v == 0.0 && next() < 0.5 {
                        -0.0
                    } else {
                        v
                    }
                })
                .collect();
            maps.push(map);
            masks.push(mask);
        }
        (maps, masks)
    }

    fn same_bits(a: f64, b: f64, what: &str) {
        assert_eq!(a.to_bits(), b.to_bits(), "{what}: {a} vs {b}");
    }

    #[test]
    fn one_ranking_gives_every_figure_bit_identical_to_the_separate_functions() {
        // Coarse levels make long runs of ties; fine ones make almost every score distinct. The
        // larger sets take the parallel radix sort.
        for (images, size, levels, points) in [
            (7, (9, 5), 10.0, 2000),
            (12, (40, 30), 50.0, 17),
            (40, (64, 48), 1e6, 2000),
            (40, (64, 48), 1e6, 100),
        ] {
            let (maps, masks) = sample(images, size, levels);
            let maps: Vec<&[f32]> = maps.iter().map(|m| m.as_slice()).collect();
            let masks: Vec<&[bool]> = masks.iter().map(|m| m.as_slice()).collect();
            let sizes = vec![size; images];
            let all = pixel_ranking_metrics(&maps, &masks, &sizes, 0.3, points).unwrap();
            let (scores, labels) = (maps.concat(), masks.concat());
            let (auroc, ap) = roc_auc_and_average_precision(&scores, &labels).unwrap();
            let (aupro, curve) = aupro_and_pro_curve(&maps, &masks, &sizes, 0.3).unwrap();
            let oracle = oracle_mean_iou(&maps, &masks).unwrap();
            let what = format!("{images} images of {size:?}, {levels} levels");
            same_bits(all.roc_auc, auroc, &format!("{what}: AUROC"));
            same_bits(all.average_precision, ap, &format!("{what}: AP"));
            same_bits(all.aupro, aupro, &format!("{what}: AUPRO"));
            same_bits(all.oracle_mean_iou.mean_iou, oracle.mean_iou, &format!("{what}: oracle mIoU"));
            same_bits(all.oracle_mean_iou.threshold, oracle.threshold, &format!("{what}: oracle threshold"));
            let thinned = curve.downsampled(points);
            assert_eq!(all.pro_curve.points.len(), thinned.points.len(), "{what}");
            for (a, b) in all.pro_curve.points.iter().zip(&thinned.points) {
                same_bits(a.x, b.x, &what);
                same_bits(a.y, b.y, &what);
                same_bits(a.threshold, b.threshold, &what);
            }
        }
    }

    #[test]
    fn undefined_inputs_are_refused() {
        let map = [0.1f32, 0.2, 0.3, 0.4];
        let none = [false; 4];
        let e = pixel_ranking_metrics(&[&map], &[&none], &[(2, 2)], 0.3, 10).unwrap_err().to_string();
        assert!(e.contains("no ground-truth anomalous region"), "{e}");
        let all = [true; 4];
        let e = pixel_ranking_metrics(&[&map], &[&all], &[(2, 2)], 0.3, 10).unwrap_err().to_string();
        assert!(e.contains("every pixel is anomalous"), "{e}");
        let nan = [0.1f32, f32::NAN, 0.3, 0.4];
        let one = [true, false, false, false];
        let e = pixel_ranking_metrics(&[&nan], &[&one], &[(2, 2)], 0.3, 10).unwrap_err().to_string();
        assert!(e.contains("image #0") && e.contains("NaN"), "{e}");
        let e = pixel_ranking_metrics(&[&map], &[&one], &[(3, 2)], 0.3, 10).unwrap_err().to_string();
        assert!(e.contains("3x2"), "{e}");
        assert!(pixel_ranking_metrics(&[&map], &[&one], &[(2, 2)], 0.0, 10).is_err());
    }
}
