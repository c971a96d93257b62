//! The Turbo colour map (Anton Mikhailov, Google, 2019; Apache-2.0) and the mapping of anomaly
//! maps onto it.
//!
//! Turbo runs dark blue → cyan → green → yellow → red with smooth lightness ramps, so a hot
//! spot reads as red on a blue background at a glance, which is what an inspector expects.

use std::sync::OnceLock;

use image::RgbImage;
use vigil_core::{Map, Result, VigilError};

use crate::overlay::INVALID_COLOUR;

/// Turbo at every 8th entry of its published 256-entry table, plus the last entry.
/// Linear interpolation between these knots stays within 2 levels (of 255) of the full table.
const TURBO_KNOTS: [[u8; 3]; 33] = [
    [48, 18, 59],
    [57, 42, 115],
    [64, 64, 162],
    [68, 86, 199],
    [70, 107, 227],
    [70, 128, 246],
    [66, 148, 255],
    [55, 168, 250],
    [40, 188, 235],
    [28, 205, 216],
    [24, 221, 194],
    [31, 233, 175],
    [50, 242, 152],
    [78, 249, 125],
    [109, 254, 98],
    [139, 255, 75],
    [164, 252, 60],
    [185, 246, 53],
    [205, 236, 52],
    [223, 223, 55],
    [238, 207, 58],
    [248, 190, 57],
    [253, 172, 52],
    [254, 150, 43],
    [251, 126, 33],
    [244, 102, 23],
    [235, 80, 14],
    [223, 63, 8],
    [208, 47, 5],
    [190, 33, 2],
    [169, 22, 1],
    [146, 11, 1],
    [122, 4, 3],
];

/// Distance between knots, in entries of the 256-entry table.
const KNOT_STEP: f32 = 8.0;

/// Entries of the precomputed Turbo table: `t` is quantised to 1/4095, which moves a colour by at
/// most a tenth of a level before rounding (Turbo changes by at most 3 levels per 1/255).
const TURBO_TABLE_LEN: usize = 4096;

/// The Turbo colour at `t` in [0, 1]; values outside are clamped and NaN counts as 0. A table
/// lookup: overlays and heatmaps colour every pixel of every image, and interpolating the knots
/// per pixel was most of an overlay's time.
pub fn turbo(t: f32) -> [u8; 3] {
    turbo_table()[turbo_index(t)]
}

/// The precomputed Turbo colours [`turbo`] looks up, built once.
pub(crate) fn turbo_table() -> &'static [[u8; 3]] {
    static TABLE: OnceLock<Vec<[u8; 3]>> = OnceLock::new();
    TABLE.get_or_init(|| {
        (0..TURBO_TABLE_LEN).map(|i| interpolated_turbo(i as f32 / (TURBO_TABLE_LEN - 1) as f32)).collect()
    })
}

/// `turbo_index(normalize(v, lo, hi))` of each value into `indices`, with the range test taken
/// out of the loop so that the loop vectorises.
pub(crate) fn turbo_indices(values: &[f32], lo: f32, hi: f32, indices: &mut [u32]) {
    if hi > lo {
        let span = hi - lo;
        for (index, &v) in indices.iter_mut().zip(values) {
            *index = turbo_index(((v - lo) / span).clamp(0.0, 1.0)) as u32;
        }
    } else {
        for (index, &v) in indices.iter_mut().zip(values) {
            *index = turbo_index(normalize(v, lo, hi)) as u32;
        }
    }
}

/// The entry of [`turbo_table`] for `t`; branch-free, so that a loop over pixels vectorises.
#[inline]
pub(crate) fn turbo_index(t: f32) -> usize {
    let t = if t.is_nan() { 0.0 } else { t.clamp(0.0, 1.0) };
    // within [½, TURBO_TABLE_LEN - ½]: an i32 holds it, and converts in vector registers
    (t * (TURBO_TABLE_LEN - 1) as f32 + 0.5) as i32 as usize
}

/// Turbo at `t` in [0, 1] by linear interpolation between the knots.
fn interpolated_turbo(t: f32) -> [u8; 3] {
    let position = t * 255.0;
    let k = ((position / KNOT_STEP) as usize).min(TURBO_KNOTS.len() - 2);
    let start = k as f32 * KNOT_STEP;
    // the last segment is shorter: it ends at entry 255, not 256
    let end = if k + 2 == TURBO_KNOTS.len() { 255.0 } else { start + KNOT_STEP };
    let f = (position - start) / (end - start);
    let (a, b) = (TURBO_KNOTS[k], TURBO_KNOTS[k + 1]);
    std::array::from_fn(|c| to_level(a[c] as f32 + (b[c] as f32 - a[c] as f32) * f))
}

/// A level in [0, 255] rounded to the nearest 8-bit value (halves up). `f32::round` is a libm call
/// on baseline x86-64 and was a fifth of `vigil predict`'s time in the overlays; adding ½ and
/// truncating is inlined and equal for non-negative values.
/// Through i32 and a clamp, which equals the saturating `as u8` for every f32 (NaN gives 0) and,
/// unlike it, converts in vector registers.
#[inline]
pub(crate) fn to_level(v: f32) -> u8 {
    ((v + 0.5) as i32).clamp(0, 255) as u8
}

/// Position of `value` in the display range [lo, hi], clamped to [0, 1].
/// A degenerate range (hi <= lo) becomes a step at `lo`, so a constant map still shows which
/// side of it each pixel is on.
pub fn normalize(value: f32, lo: f32, hi: f32) -> f32 {
    if hi > lo {
        ((value - lo) / (hi - lo)).clamp(0.0, 1.0)
    } else if value > lo {
        1.0
    } else {
        0.0
    }
}

/// The map as a Turbo heatmap: `lo` (and below) is dark blue, `hi` (and above) dark red,
/// NaN is [`INVALID_COLOUR`] so a defective map shows as such.
pub fn colorize(map: &Map, lo: f32, hi: f32) -> RgbImage {
    let mut out = RgbImage::new(map.width as u32, map.height as u32);
    for (pixel, &v) in out.pixels_mut().zip(&map.data) {
        pixel.0 = if v.is_nan() { INVALID_COLOUR } else { turbo(normalize(v, lo, hi)) };
    }
    out
}

/// Values pooled from at most this many samples when choosing a display range, so a
/// range over hundreds of large maps stays cheap.
const RANGE_SAMPLE_LIMIT: usize = 1 << 20;

/// A display range shared by several maps: the `q_lo` and `q_hi` quantiles of their pooled
/// values. Quantiles instead of min/max keep one outlier pixel from washing out every other
/// heatmap of a report. Maps are sampled on a regular stride when they hold many values.
pub fn robust_range(maps: &[&Map], q_lo: f64, q_hi: f64) -> Result<(f32, f32)> {
    if !(0.0..=1.0).contains(&q_lo) || !(0.0..=1.0).contains(&q_hi) || q_lo > q_hi {
        return Err(VigilError::invalid(format!(
            "display range quantiles must satisfy 0 <= q_lo <= q_hi <= 1, got {q_lo} and {q_hi}"
        )));
    }
    let total: usize = maps.iter().map(|m| m.data.len()).sum();
    if total == 0 {
        return Err(VigilError::invalid("no anomaly map values to choose a display range from"));
    }
    for m in maps {
        m.check_finite("display range")?;
    }
    let stride = total.div_ceil(RANGE_SAMPLE_LIMIT);
    let mut values: Vec<f32> = maps.iter().flat_map(|m| m.data.iter().copied()).step_by(stride).collect();
    let n = values.len();
    let index = |q: f64| ((q * (n - 1) as f64).round() as usize).min(n - 1);
    let (i_lo, i_hi) = (index(q_lo), index(q_hi));
    let hi = *values.select_nth_unstable_by(i_hi, f32::total_cmp).1;
    // after the partition every value left of i_hi is <= hi, so the low quantile is found there
    let lo = if i_lo == i_hi { hi } else { *values[..i_hi].select_nth_unstable_by(i_lo, f32::total_cmp).1 };
    Ok((lo, hi))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn turbo_matches_published_table_at_ends_and_middle() {
        assert_eq!(turbo(0.0), [48, 18, 59]);
        assert_eq!(turbo(1.0), [122, 4, 3]);
        // table entry 128 is (0.64362, 0.98999, 0.23356) → (164, 252, 60)
        assert_eq!(turbo(128.0 / 255.0), [164, 252, 60]);
        // entry 100 is (0.24797, 0.96423, 0.54303) → (63, 246, 138), between knots 96 and 104
        let c = turbo(100.0 / 255.0);
        let want = [63i32, 246, 138];
        for ch in 0..3 {
            assert!((c[ch] as i32 - want[ch]).abs() <= 2, "{c:?} vs {want:?}");
        }
        assert_eq!(turbo(-3.0), turbo(0.0));
        assert_eq!(turbo(f32::NAN), turbo(0.0));
        assert_eq!(turbo(7.0), turbo(1.0));
    }

    #[test]
    fn table_lookup_stays_within_one_level_of_the_interpolation() {
        for i in 0..=10_000 {
            let t = i as f32 / 10_000.0;
            let (fast, exact) = (turbo(t), interpolated_turbo(t));
            for c in 0..3 {
                assert!((fast[c] as i32 - exact[c] as i32).abs() <= 1, "t = {t}: {fast:?} vs {exact:?}");
            }
        }
    }

    #[test]
    fn normalize_clamps_and_handles_degenerate_range() {
        assert_eq!(normalize(5.0, 0.0, 10.0), 0.5);
        assert_eq!(normalize(-1.0, 0.0, 10.0), 0.0);
        assert_eq!(normalize(11.0, 0.0, 10.0), 1.0);
        assert_eq!(normalize(2.0, 1.0, 1.0), 1.0);
        assert_eq!(normalize(1.0, 1.0, 1.0), 0.0);
    }

    #[test]
    fn colorize_maps_low_to_blue_and_high_to_red() {
        let map = Map::new(2, 1, vec![0.0, 4.0]).unwrap();
        let img = colorize(&map, 0.0, 4.0);
        assert_eq!(img.dimensions(), (2, 1));
        assert_eq!(img.get_pixel(0, 0).0, [48, 18, 59]);
        assert_eq!(img.get_pixel(1, 0).0, [122, 4, 3]);
        let odd = Map::new(2, 1, vec![f32::INFINITY, f32::NAN]).unwrap();
        let img = colorize(&odd, 0.0, 1.0);
        assert_eq!(img.get_pixel(0, 0).0, [122, 4, 3]);
        assert_eq!(img.get_pixel(1, 0).0, INVALID_COLOUR);
    }

    #[test]
    fn robust_range_ignores_a_single_outlier() {
        let mut data: Vec<f32> = (0..1000).map(|i| i as f32 / 999.0).collect();
        data[500] = 1e6;
        let a = Map::new(1000, 1, data).unwrap();
        let b = Map::filled(10, 10, 0.5);
        let (lo, hi) = robust_range(&[&a, &b], 0.0, 0.99).unwrap();
        assert_eq!(lo, 0.0);
        assert!(hi < 1.0 && hi > 0.9, "{hi}");
        let (lo, hi) = robust_range(&[&a], 0.0, 1.0).unwrap();
        assert_eq!((lo, hi), (0.0, 1e6));
        assert!(robust_range(&[], 0.0, 1.0).is_err());
        assert!(robust_range(&[&a], 0.9, 0.1).is_err());
    }
}
