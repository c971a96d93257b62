//! Per-Region Overlap (PRO) curve and its normalised area AUPRO, exactly as the 2021 MVTec AD
//! evaluation code (`compute_pro` + `trapezoid(x_max = limit) / limit`):
//!
//! 1. Each ground-truth mask is split into **8-connected** regions (scipy `label` with a 3×3
//!    structure). Regions are pooled over the whole test set, each weighing the same.
//! 2. OK pixels are all ground-truth-zero pixels of all images (normal images and the
//!    background of defective ones).
//! 3. All pixel scores are sorted in decreasing order. At the cut after each run of tied scores,
//!    FPR = #flagged OK pixels / #OK pixels and PRO = (1/K) Σ_k |flagged ∩ C_k| / |C_k|,
//!    both clipped to ≤ 1; the curve is (0,0), the cuts, then (1,1).
//! 4. AUPRO = trapezoidal area of PRO over FPR ∈ [0, limit], with PRO linearly interpolated at
//!    the limit when no cut lands on it exactly, divided by the limit (so 1 is perfect).

use vigil_core::{Map, Mask, Result, VigilError};

use crate::curve::{Curve, CurvePoint};
use crate::scores::{check_scores, Score};

/// Every pixel with its region id (0 = OK pixel), sorted by decreasing score.
struct RegionRanking {
    items: Vec<(f32, u32)>,
    inverse_region_sizes: Vec<f64>,
    ok_pixels: u64,
}

impl RegionRanking {
    fn new(maps: &[&[f32]], masks: &[&[bool]], sizes: &[(usize, usize)], what: &str) -> Result<Self> {
        if maps.len() != masks.len() || maps.len() != sizes.len() {
            return Err(VigilError::invalid(format!(
                "{what}: {} maps, {} masks and {} sizes; one of each per image is needed",
                maps.len(),
                masks.len(),
                sizes.len()
            )));
        }
        if maps.is_empty() {
            return Err(VigilError::invalid(format!("{what}: no images given")));
        }
        let total: usize = sizes.iter().map(|&(w, h)| w * h).sum();
        let mut items = Vec::with_capacity(total);
        let mut region_sizes: Vec<u64> = Vec::new();
        let mut labels = Vec::new();
        let mut stack = Vec::new();
        for (i, ((&map, &mask), &(width, height))) in maps.iter().zip(masks).zip(sizes).enumerate() {
            let n = width * height;
            if map.len() != n || mask.len() != n {
                return Err(VigilError::invalid(format!(
                    "{what}: image #{i} is {width}x{height} = {n} pixels but its map holds {} values \
                     and its mask {}",
                    map.len(),
                    mask.len()
                )));
            }
            check_scores(map, &format!("{what}: image #{i}"))?;
            labels.clear();
            labels.resize(n, 0u32);
            label_regions(mask, width, height, &mut labels, &mut region_sizes, &mut stack)?;
            items.extend(map.iter().copied().zip(labels.iter().copied()));
        }
        if region_sizes.is_empty() {
            return Err(VigilError::invalid(format!(
                "{what}: no ground-truth anomalous region in any mask; PRO is undefined"
            )));
        }
        let ok_pixels = (total - region_sizes.iter().sum::<u64>() as usize) as u64;
        if ok_pixels == 0 {
            return Err(VigilError::invalid(format!(
                "{what}: every pixel is anomalous in the ground truth; the false-positive rate is undefined"
            )));
        }
        f32::sort_descending(&mut items);
        let inverse_region_sizes = region_sizes.iter().map(|&s| 1.0 / s as f64).collect();
        Ok(RegionRanking { items, inverse_region_sizes, ok_pixels })
    }

    /// Calls `visit(fpr, pro, score)` at the end of each run of tied scores, by decreasing score.
    fn for_each_cut(&self, mut visit: impl FnMut(f64, f64, f32)) {
        let regions = self.inverse_region_sizes.len() as f64;
        let mut false_positives = 0u64;
        let mut overlap_sum = 0.0f64;
        for run in self.items.chunk_by(|a, b| a.0 == b.0) {
            for &(_, region) in run {
                if region == 0 {
                    false_positives += 1;
                } else {
                    overlap_sum += self.inverse_region_sizes[region as usize - 1];
                }
            }
            let fpr = (false_positives as f64 / self.ok_pixels as f64).min(1.0);
            let pro = (overlap_sum / regions).min(1.0);
            visit(fpr, pro, run[0].0);
        }
    }
}

/// Labels the 8-connected regions of `mask` with ids continuing after those already in
/// `region_sizes`, and appends each new region's size.
pub(crate) fn label_regions(
    mask: &[bool],
    width: usize,
    height: usize,
    labels: &mut [u32],
    region_sizes: &mut Vec<u64>,
    stack: &mut Vec<usize>,
) -> Result<()> {
    for start in 0..mask.len() {
        if !mask[start] || labels[start] != 0 {
            continue;
        }
        let id = u32::try_from(region_sizes.len() + 1)
            .map_err(|_| VigilError::invalid("more than 2^32 - 1 connected regions"))?;
        labels[start] = id;
        stack.push(start);
        let mut size = 0u64;
        while let Some(p) = stack.pop() {
            size += 1;
            let (x, y) = (p % width, p / width);
            for ny in y.saturating_sub(1)..=(y + 1).min(height - 1) {
                for nx in x.saturating_sub(1)..=(x + 1).min(width - 1) {
                    let q = ny * width + nx;
                    if mask[q] && labels[q] == 0 {
                        labels[q] = id;
                        stack.push(q);
                    }
                }
            }
        }
        region_sizes.push(size);
    }
    Ok(())
}

/// Number of 8-connected regions in `mask` (e.g. false detections on a normal image).
pub fn count_regions(mask: &Mask) -> Result<usize> {
    if mask.data.len() != mask.width * mask.height {
        return Err(VigilError::invalid(format!(
            "count_regions: mask is {}x{} but holds {} values",
            mask.width,
            mask.height,
            mask.data.len()
        )));
    }
    let mut labels = vec![0u32; mask.data.len()];
    let mut sizes = Vec::new();
    label_regions(&mask.data, mask.width, mask.height, &mut labels, &mut sizes, &mut Vec::new())?;
    Ok(sizes.len())
}

/// Trapezoidal integration of a curve with non-decreasing x up to `limit`, as MVTec's
/// `trapezoid(x, y, x_max)`: points beyond the limit are dropped and, unless a point lies exactly
/// on it, the last partial trapezoid uses y linearly interpolated at the limit.
pub(crate) struct LimitedTrapezoid {
    limit: f64,
    prev: (f64, f64),
    area: f64,
    limit_reached: bool,
    done: bool,
}

impl LimitedTrapezoid {
    pub(crate) fn new(limit: f64, first: (f64, f64)) -> Self {
        LimitedTrapezoid { limit, prev: first, area: 0.0, limit_reached: first.0 == limit, done: false }
    }

    pub(crate) fn push(&mut self, x: f64, y: f64) {
        if self.done {
            return;
        }
        let (px, py) = self.prev;
        if x <= self.limit {
            self.area += 0.5 * (y + py) * (x - px);
            self.limit_reached |= x == self.limit;
            self.prev = (x, y);
        } else {
            if !self.limit_reached {
                let y_at_limit = py + (y - py) * (self.limit - px) / (x - px);
                self.area += 0.5 * (y_at_limit + py) * (self.limit - px);
            }
            self.done = true;
        }
    }

    pub(crate) fn area(&self) -> f64 {
        self.area
    }

    /// Whether a point beyond the limit has been pushed: later points change nothing.
    pub(crate) fn done(&self) -> bool {
        self.done
    }
}

pub(crate) fn check_limit(fpr_limit: f64) -> Result<()> {
    if !(fpr_limit > 0.0 && fpr_limit <= 1.0) {
        return Err(VigilError::invalid(format!(
            "aupro: the FPR integration limit must lie in (0, 1], got {fpr_limit}"
        )));
    }
    Ok(())
}

/// AUPRO up to `fpr_limit` (0.3 in the MVTec protocol), normalised to [0, 1].
/// `maps[i]` and `masks[i]` are row-major and `sizes[i] = (width, height)` of image `i`; images
/// may differ in size. Errors on mismatched sizes, non-finite scores, a limit outside (0, 1], or
/// when there is no anomalous region or no OK pixel at all.
pub fn aupro(maps: &[&[f32]], masks: &[&[bool]], sizes: &[(usize, usize)], fpr_limit: f64) -> Result<f64> {
    check_limit(fpr_limit)?;
    let ranking = RegionRanking::new(maps, masks, sizes, "aupro")?;
    let mut integral = LimitedTrapezoid::new(fpr_limit, (0.0, 0.0));
    ranking.for_each_cut(|fpr, pro, _| integral.push(fpr, pro));
    integral.push(1.0, 1.0);
    Ok(integral.area / fpr_limit)
}

/// The full PRO curve (x = FPR, y = PRO) from (0,0) to (1,1) for plots; each point's threshold is
/// the lowest flagged score (`score >= threshold`), ±∞ for the two added end points.
pub fn pro_curve(maps: &[&[f32]], masks: &[&[bool]], sizes: &[(usize, usize)]) -> Result<Curve> {
    let ranking = RegionRanking::new(maps, masks, sizes, "pro_curve")?;
    let mut points = vec![CurvePoint { x: 0.0, y: 0.0, threshold: f64::INFINITY }];
    ranking
        .for_each_cut(|fpr, pro, score| points.push(CurvePoint { x: fpr, y: pro, threshold: score as f64 }));
    points.push(CurvePoint { x: 1.0, y: 1.0, threshold: f64::NEG_INFINITY });
    Ok(Curve { points })
}

/// [`aupro`] and [`pro_curve`] from one ranking of the pixels (the sort is most of the cost).
pub fn aupro_and_pro_curve(
    maps: &[&[f32]],
    masks: &[&[bool]],
    sizes: &[(usize, usize)],
    fpr_limit: f64,
) -> Result<(f64, Curve)> {
    check_limit(fpr_limit)?;
    let ranking = RegionRanking::new(maps, masks, sizes, "aupro")?;
    let mut integral = LimitedTrapezoid::new(fpr_limit, (0.0, 0.0));
    let mut points = vec![CurvePoint { x: 0.0, y: 0.0, threshold: f64::INFINITY }];
    ranking.for_each_cut(|fpr, pro, score| {
        integral.push(fpr, pro);
        points.push(CurvePoint { x: fpr, y: pro, threshold: score as f64 });
    });
    integral.push(1.0, 1.0);
    points.push(CurvePoint { x: 1.0, y: 1.0, threshold: f64::NEG_INFINITY });
    Ok((integral.area / fpr_limit, Curve { points }))
}

/// [`aupro`] on vigil maps and masks; each map must have its mask's size.
pub fn aupro_of_maps(maps: &[&Map], masks: &[&Mask], fpr_limit: f64) -> Result<f64> {
    let (m, k, s) = split_maps(maps, masks, "aupro")?;
    aupro(&m, &k, &s, fpr_limit)
}

/// [`pro_curve`] on vigil maps and masks.
pub fn pro_curve_of_maps(maps: &[&Map], masks: &[&Mask]) -> Result<Curve> {
    let (m, k, s) = split_maps(maps, masks, "pro_curve")?;
    pro_curve(&m, &k, &s)
}

type SplitMaps<'a> = (Vec<&'a [f32]>, Vec<&'a [bool]>, Vec<(usize, usize)>);

fn split_maps<'a>(maps: &[&'a Map], masks: &[&'a Mask], what: &str) -> Result<SplitMaps<'a>> {
    for (i, (map, mask)) in maps.iter().zip(masks).enumerate() {
        if (map.width, map.height) != (mask.width, mask.height) {
            return Err(VigilError::invalid(format!(
                "{what}: image #{i}: map is {}x{} but its mask is {}x{}",
                map.width, map.height, mask.width, mask.height
            )));
        }
    }
    Ok((
        maps.iter().map(|m| m.data.as_slice()).collect(),
        masks.iter().map(|m| m.data.as_slice()).collect(),
        maps.iter().map(|m| (m.width, m.height)).collect(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn regions_of(mask: &[bool], width: usize) -> (Vec<u32>, Vec<u64>) {
        let mut labels = vec![0; mask.len()];
        let mut sizes = Vec::new();
        label_regions(mask, width, mask.len() / width, &mut labels, &mut sizes, &mut Vec::new()).unwrap();
        (labels, sizes)
    }

    #[test]
    fn diagonal_neighbours_join_one_region() {
        #[rustfmt::skip]
        let mask = [
            true,  false, false, false,
            false, true,  false, true,
            false, false, false, true,
        ];
        let (labels, sizes) = regions_of(&mask, 4);
        assert_eq!(sizes, vec![2, 2]);
        assert_eq!(labels, vec![1, 0, 0, 0, 0, 1, 0, 2, 0, 0, 0, 2]);
    }

    #[test]
    fn counts_regions_with_8_connectivity() {
        let mask = Mask::new(3, 3, vec![true, false, true, false, true, false, false, false, true]).unwrap();
        assert_eq!(count_regions(&mask).unwrap(), 1);
        let mask = Mask::new(3, 2, vec![true, false, true, true, false, true]).unwrap();
        assert_eq!(count_regions(&mask).unwrap(), 2);
        assert_eq!(count_regions(&Mask::empty(4, 4)).unwrap(), 0);
        let broken = Mask { width: 3, height: 3, data: vec![true; 4] };
        assert!(count_regions(&broken).unwrap_err().to_string().contains("3x3 but holds 4"));
    }

    #[test]
    fn perfect_separation_gives_one_and_inverted_gives_zero() {
        let mask = [false, true, true, false, false, false];
        let good = [0.0f32, 1.0, 1.0, 0.0, 0.0, 0.0];
        let bad = [1.0f32, 0.0, 0.0, 1.0, 1.0, 1.0];
        assert_eq!(aupro(&[&good], &[&mask], &[(3, 2)], 0.3).unwrap(), 1.0);
        assert_eq!(aupro(&[&bad], &[&mask], &[(3, 2)], 0.3).unwrap(), 0.0);
    }

    #[test]
    fn each_region_weighs_the_same_whatever_its_size() {
        // A 1-pixel region found first and a 4-pixel region found last: after the top cut the
        // PRO is 1/2 although only 1 of 5 anomalous pixels is flagged.
        let mask = [true, false, false, true, true, true, true, false, false];
        let map = [0.9f32, 0.1, 0.2, 0.05, 0.05, 0.05, 0.05, 0.3, 0.4];
        let curve = pro_curve(&[&map], &[&mask], &[(9, 1)]).unwrap();
        assert_eq!((curve.points[1].x, curve.points[1].y), (0.0, 0.5));
        // The OK pixels are flagged before the big region: PRO stays 1/2 until FPR = 1.
        let area = aupro(&[&map], &[&mask], &[(9, 1)], 1.0).unwrap();
        assert!((area - 0.5).abs() < 1e-15, "{area}");
        // With limit 0.3 the step to (1/4, 1/2) and interpolation leave 1/2 as well.
        assert!((aupro(&[&map], &[&mask], &[(9, 1)], 0.3).unwrap() - 0.5).abs() < 1e-15);
    }

    #[test]
    fn one_ranking_gives_the_same_area_and_curve_as_two() {
        let mask = [true, false, false, true, true, true, true, false, false];
        let map = [0.9f32, 0.1, 0.2, 0.05, 0.05, 0.07, 0.05, 0.3, 0.4];
        let (area, curve) = aupro_and_pro_curve(&[&map], &[&mask], &[(3, 3)], 0.3).unwrap();
        assert_eq!(area, aupro(&[&map], &[&mask], &[(3, 3)], 0.3).unwrap());
        assert_eq!(curve.points, pro_curve(&[&map], &[&mask], &[(3, 3)]).unwrap().points);
        assert!(aupro_and_pro_curve(&[&map], &[&mask], &[(3, 3)], 0.0).is_err());
    }

    #[test]
    fn limit_between_cuts_interpolates_linearly() {
        // One region of 1 pixel and 2 OK pixels; all scores tied: the curve is (0,0) → (1,1).
        let area = aupro(&[&[0.5f32, 0.5, 0.5]], &[&[true, false, false]], &[(3, 1)], 0.3).unwrap();
        // ∫₀^0.3 x dx / 0.3 = 0.15
        assert!((area - 0.15).abs() < 1e-15, "{area}");
    }

    #[test]
    fn bad_inputs_are_named() {
        let map = [0.0f32; 4];
        let mask = [true, false, false, false];
        let e = aupro(&[&map], &[&mask], &[(3, 1)], 0.3).unwrap_err().to_string();
        assert!(e.contains("image #0 is 3x1"), "{e}");
        let e = aupro(&[&map], &[&[false; 4]], &[(2, 2)], 0.3).unwrap_err().to_string();
        assert!(e.contains("no ground-truth anomalous region"), "{e}");
        let e = aupro(&[&map], &[&[true; 4]], &[(2, 2)], 0.3).unwrap_err().to_string();
        assert!(e.contains("every pixel is anomalous"), "{e}");
        let e = aupro(&[&map], &[&mask], &[(2, 2)], 0.0).unwrap_err().to_string();
        assert!(e.contains("(0, 1]"), "{e}");
        let e = aupro(&[&[0.0, f32::NAN, 0.0, 0.0]], &[&mask], &[(2, 2)], 0.3).unwrap_err().to_string();
        assert!(e.contains("image #0") && e.contains("NaN"), "{e}");
        let e =
            aupro_of_maps(&[&Map::filled(2, 2, 0.0)], &[&Mask::empty(3, 2)], 0.3).unwrap_err().to_string();
        assert!(e.contains("map is 2x2 but its mask is 3x2"), "{e}");
    }
}
