//! Checking and calibrating an NFA threshold on held-out normal images.
//!
//! The a contrario promise is that at log10 NFA ≤ −K at most 10^−K false detections are expected
//! per image. It holds only if the background model (Gaussian, independent features) does. On
//! normal images held out from training, every detection is false, so counting them says whether the
//! promise holds, and the level at which they reach the nominal rate is a calibrated threshold.
//!
//! A detection is a connected region (8-connected, as the benchmark counts false regions) of pixels
//! with log10 NFA ≤ the level.

use vigil_core::{Map, Mask, Result, VigilError};

/// What held-out normal images say about the threshold log10 NFA ≤ −K.
#[derive(Clone, Debug, PartialEq)]
pub struct NfaCalibration {
    /// K: the nominal rate is 10^−K false detections per image.
    pub k: f64,
    /// Held-out normal images counted.
    pub images: usize,
    /// Mean false detections per held-out image at the theoretical level log10 NFA ≤ −K.
    pub false_detections_at_theoretical: f64,
    /// The largest level L such that, for every level up to L, the held-out images give at most
    /// 10^−K detections per image (detections: log10 NFA ≤ L).
    pub calibrated_log10_nfa: f64,
    /// Mean false detections per held-out image at the calibrated level.
    pub false_detections_at_calibrated: f64,
}

impl NfaCalibration {
    pub fn nominal_rate(&self) -> f64 {
        10f64.powf(-self.k)
    }

    /// Fewer than 10^K images: a rate of 10^−K per image is below one detection in the whole
    /// held-out set, so the calibrated level only says that none of these images had a detection.
    pub fn too_few_images(&self) -> bool {
        (self.images as f64) * self.nominal_rate() < 1.0
    }

    /// The theoretical threshold gives more than ten times the nominal rate.
    pub fn miscalibrated(&self) -> bool {
        self.false_detections_at_theoretical > 10.0 * self.nominal_rate()
    }

    /// Plain-language warnings for the user (empty when the theoretical threshold holds).
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.miscalibrated() {
            out.push(format!(
                "the NFA threshold log10 NFA <= {} gave {:.3} false detections per held-out normal image, more than \
                 10x the nominal {:.3}: the background model does not fit these images; consider the calibrated \
                 level {:.3} (nfa-calibrated:{})",
                0.0 - self.k,
                self.false_detections_at_theoretical,
                self.nominal_rate(),
                self.calibrated_log10_nfa,
                self.k
            ));
        }
        if self.too_few_images() {
            out.push(format!(
                "only {} held-out normal image(s): a rate of {:.3} false detections per image cannot be observed \
                 (it needs at least {:.0}); the calibrated level only guarantees no detection on these images",
                self.images,
                self.nominal_rate(),
                (1.0 / self.nominal_rate()).ceil()
            ));
        }
        out
    }
}

/// Number of 8-connected regions of pixels with value ≤ `level`.
pub fn count_detections(log10_nfa: &Map, level: f64) -> Result<usize> {
    let detected = log10_nfa.data.iter().map(|&v| (v as f64) <= level).collect();
    vigil_metrics::count_regions(&Mask::new(log10_nfa.width, log10_nfa.height, detected)?)
}

/// Mean number of detections per image at `level`.
pub fn false_detections_per_image(maps: &[Map], level: f64) -> Result<f64> {
    if maps.is_empty() {
        return Ok(0.0);
    }
    let detections = maps.iter().map(|m| count_detections(m, level)).sum::<Result<usize>>()?;
    Ok(detections as f64 / maps.len() as f64)
}

/// Calibrates the level for a nominal rate of 10^−K false detections per image on the log10 NFA maps
/// of held-out normal images.
pub fn calibrate(maps: &[Map], k: f64) -> Result<NfaCalibration> {
    if maps.is_empty() {
        return Err(VigilError::invalid("NFA calibration needs at least one held-out normal image"));
    }
    if !k.is_finite() {
        return Err(VigilError::invalid(format!("NFA calibration needs a finite K, got {k}")));
    }
    for (i, m) in maps.iter().enumerate() {
        if m.data.iter().any(|v| v.is_nan()) {
            return Err(VigilError::invalid(format!("held-out log10 NFA map {i} holds NaN")));
        }
    }
    // Every image's detection count as a function of the level, as (level, change) events.
    let mut events: Vec<(f32, i64)> = maps.iter().flat_map(count_changes).collect();
    events.sort_by(|a, b| a.0.total_cmp(&b.0));
    let allowed = maps.len() as f64 * 10f64.powf(-k);
    let mut total = 0i64;
    let mut calibrated = None;
    let mut i = 0;
    while i < events.len() {
        let level = events[i].0;
        while i < events.len() && events[i].0 == level {
            total += events[i].1;
            i += 1;
        }
        if total as f64 > allowed {
            calibrated = Some((level as f64).next_down());
            break;
        }
    }
    // No level ever exceeds the allowance: every pixel may be detected.
    let calibrated = calibrated.unwrap_or_else(|| events.last().map_or(f64::INFINITY, |e| e.0 as f64));
    Ok(NfaCalibration {
        k,
        images: maps.len(),
        false_detections_at_theoretical: false_detections_per_image(maps, -k)?,
        calibrated_log10_nfa: calibrated,
        false_detections_at_calibrated: false_detections_per_image(maps, calibrated)?,
    })
}

/// Adds pixels in increasing value with a union-find: each pixel creates a region, joins one or merges
/// several; the change in the region count at each pixel value.
fn count_changes(map: &Map) -> Vec<(f32, i64)> {
    let (w, h) = (map.width, map.height);
    let mut order: Vec<usize> = (0..w * h).collect();
    order.sort_by(|&a, &b| map.data[a].total_cmp(&map.data[b]));
    let mut parent: Vec<usize> = (0..w * h).collect();
    let mut added = vec![false; w * h];
    let mut changes = Vec::with_capacity(w * h);
    for &p in &order {
        added[p] = true;
        let mut change = 1i64;
        for q in neighbours8(p, w, h) {
            if added[q] {
                let (rp, rq) = (find(&mut parent, p), find(&mut parent, q));
                if rp != rq {
                    parent[rq] = rp;
                    change -= 1;
                }
            }
        }
        changes.push((map.data[p], change));
    }
    changes
}

fn find(parent: &mut [usize], mut p: usize) -> usize {
    while parent[p] != p {
        parent[p] = parent[parent[p]];
        p = parent[p];
    }
    p
}

fn neighbours8(p: usize, w: usize, h: usize) -> impl Iterator<Item = usize> {
    let (x, y) = ((p % w) as isize, (p / w) as isize);
    (-1isize..=1).flat_map(move |dy| {
        (-1isize..=1).filter_map(move |dx| {
            let (nx, ny) = (x + dx, y + dy);
            ((dx, dy) != (0, 0) && nx >= 0 && ny >= 0 && nx < w as isize && ny < h as isize)
                .then(|| ny as usize * w + nx as usize)
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A map at `background` with square spots of the given log10 NFA values.
    fn map_with_spots(spots: &[(usize, usize, f32)]) -> Map {
        let mut m = Map::filled(20, 20, 3.0);
        for &(x, y, v) in spots {
            for yy in y..y + 2 {
                for xx in x..x + 2 {
                    m.data[yy * 20 + xx] = v;
                }
            }
        }
        m
    }

    #[test]
    fn counts_eight_connected_regions_below_the_level() {
        let m = map_with_spots(&[(1, 1, -2.0), (3, 3, -1.0), (10, 10, -0.5)]);
        // the first two squares touch at a corner: one 8-connected region
        assert_eq!(count_detections(&m, 0.0).unwrap(), 2);
        assert_eq!(count_detections(&m, -1.5).unwrap(), 1);
        assert_eq!(count_detections(&m, -3.0).unwrap(), 0);
        assert_eq!(count_detections(&m, 3.0).unwrap(), 1);
    }

    #[test]
    fn calibrated_level_gives_the_nominal_rate_on_held_out_images() {
        // ten images, each with one spot at log10 NFA −i/2 and one at −5 on image 0
        let maps: Vec<Map> = (0..10)
            .map(|i| {
                let mut spots = vec![(2, 2, -(i as f32) / 2.0 - 0.25)];
                if i == 0 {
                    spots.push((12, 12, -5.0));
                }
                map_with_spots(&spots)
            })
            .collect();
        let cal = calibrate(&maps, 0.0).unwrap();
        // at NFA <= 1 every image has at least one detection: 1.1 per image, more than 10x? no (limit 10)
        assert!((cal.false_detections_at_theoretical - 1.1).abs() < 1e-12);
        assert!(!cal.miscalibrated() && !cal.too_few_images());
        assert!(cal.warnings().is_empty());
        // K = 1: at most one detection in ten images; the second detection appears at −4.75
        let cal = calibrate(&maps, 1.0).unwrap();
        assert!(cal.calibrated_log10_nfa < -4.75 && cal.calibrated_log10_nfa > -4.7501);
        assert!((cal.false_detections_at_calibrated - 0.1).abs() < 1e-12);
        // at log10 NFA <= −1: the spots of images 2..9 and the −5 spot
        assert!((cal.false_detections_at_theoretical - 0.9).abs() < 1e-12);
        assert!(!cal.miscalibrated(), "0.9 per image is not more than 10x the nominal 0.1");
        // K = 2 with ten images: too few to observe 0.01 per image
        let cal = calibrate(&maps, 2.0).unwrap();
        assert!(cal.too_few_images());
        assert!(cal.calibrated_log10_nfa < -5.0 && cal.false_detections_at_calibrated == 0.0);
        assert!(cal.warnings().iter().any(|w| w.contains("only 10 held-out")));
    }

    #[test]
    fn too_many_false_detections_warn() {
        let spots: Vec<(usize, usize, f32)> =
            (0..12).map(|i| (1 + 3 * (i % 6), 1 + 4 * (i / 6), -1.0)).collect();
        let cal = calibrate(&[map_with_spots(&spots)], 0.0).unwrap();
        assert_eq!(cal.false_detections_at_theoretical, 12.0);
        assert!(cal.miscalibrated());
        assert!(cal.calibrated_log10_nfa < -1.0 && cal.false_detections_at_calibrated == 0.0);
        let warnings = cal.warnings();
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(warnings[0].contains("12.000 false detections"), "{warnings:?}");
    }

    #[test]
    fn merging_regions_lowers_the_count() {
        // two spots joined by a bridge at a higher level: 2 regions until the bridge, then 1
        let mut m = map_with_spots(&[(2, 2, -3.0), (6, 2, -3.0)]);
        for x in 4..6 {
            m.data[2 * 20 + x] = -1.0;
        }
        assert_eq!(count_detections(&m, -2.0).unwrap(), 2);
        assert_eq!(count_detections(&m, -1.0).unwrap(), 1);
        // at K = log10(1/1.5): 1.5 detections allowed in one image; the count is 2 on [−3, −1)
        let cal = calibrate(std::slice::from_ref(&m), -(1.5f64.log10())).unwrap();
        assert!(cal.calibrated_log10_nfa < -3.0, "{}", cal.calibrated_log10_nfa);
    }

    #[test]
    fn bad_input_is_an_error() {
        assert!(calibrate(&[], 0.0).is_err());
        assert!(calibrate(&[Map::filled(2, 2, f32::NAN)], 0.0).is_err());
        assert!(calibrate(&[Map::filled(2, 2, 1.0)], f64::NAN).is_err());
    }
}
