//! The seed's anomaly map: SSIM and absolute error between the image and its reconstruction
//! (both de-normalised to [0, 1]), combined, smoothed, and cleaned by a morphological opening;
//! the image score is the map's mean.

use vigil_core::{Map, Mask};

/// SSIM's constants for a dynamic range of 1.
const C1: f32 = 0.01 * 0.01;
const C2: f32 = 0.03 * 0.03;
/// σ of SSIM's Gaussian window (Wang et al.).
const SSIM_SIGMA: f32 = 1.5;

/// Half-sample mirror index (scipy's "reflect").
fn mirror(i: isize, n: usize) -> usize {
    let n = n as isize;
    let period = 2 * n;
    let m = i.rem_euclid(period);
    (if m < n { m } else { period - 1 - m }) as usize
}

/// A separable `window`-tap Gaussian filter (σ 1.5, normalised) with mirrored borders.
fn gaussian_window_filter(plane: &[f32], side_w: usize, side_h: usize, taps: &[f32]) -> Vec<f32> {
    let r = (taps.len() / 2) as isize;
    let mut rows = vec![0f32; plane.len()];
    for y in 0..side_h {
        for x in 0..side_w {
            let mut acc = 0f32;
            for (k, t) in taps.iter().enumerate() {
                acc += t * plane[y * side_w + mirror(x as isize + k as isize - r, side_w)];
            }
            rows[y * side_w + x] = acc;
        }
    }
    let mut out = vec![0f32; plane.len()];
    for y in 0..side_h {
        for x in 0..side_w {
            let mut acc = 0f32;
            for (k, t) in taps.iter().enumerate() {
                acc += t * rows[mirror(y as isize + k as isize - r, side_h) * side_w + x];
            }
            out[y * side_w + x] = acc;
        }
    }
    out
}

/// The per-pixel SSIM of two single-channel planes in [0, 1] with a `window`-tap Gaussian
/// window (σ 1.5) and mirrored borders.
pub fn ssim_plane(a: &[f32], b: &[f32], width: usize, height: usize, window: usize) -> Vec<f32> {
    let half = (window / 2) as f32;
    let taps: Vec<f32> =
        (0..window).map(|i| (-(i as f32 - half).powi(2) / (2.0 * SSIM_SIGMA * SSIM_SIGMA)).exp()).collect();
    let total: f32 = taps.iter().sum();
    let taps: Vec<f32> = taps.iter().map(|t| t / total).collect();
    let blur = |p: &[f32]| gaussian_window_filter(p, width, height, &taps);
    let mu_a = blur(a);
    let mu_b = blur(b);
    let product = |x: &[f32], y: &[f32]| x.iter().zip(y).map(|(u, v)| u * v).collect::<Vec<f32>>();
    let e_aa = blur(&product(a, a));
    let e_bb = blur(&product(b, b));
    let e_ab = blur(&product(a, b));
    (0..a.len())
        .map(|i| {
            let (ma, mb) = (mu_a[i], mu_b[i]);
            let var_a = e_aa[i] - ma * ma;
            let var_b = e_bb[i] - mb * mb;
            let cov = e_ab[i] - ma * mb;
            ((2.0 * ma * mb + C1) * (2.0 * cov + C2)) / ((ma * ma + mb * mb + C1) * (var_a + var_b + C2))
        })
        .collect()
}

/// Grey-level opening by a `size` × `size` square (erosion, then dilation by the same square):
/// for every threshold it is the binary opening of the thresholded map, so isolated bright
/// specks smaller than the square go and larger regions keep their shape.
pub fn opening(map: &Map, size: usize) -> Map {
    if size <= 1 {
        return map.clone();
    }
    // The square covers offsets [-lo, hi] (size = lo + hi + 1); dilation uses the reflected one.
    let lo = (size - 1) / 2;
    let hi = size - 1 - lo;
    let eroded = filter_square(map, lo, hi, f32::INFINITY, f32::min);
    filter_square(&eroded, hi, lo, f32::NEG_INFINITY, f32::max)
}

/// Separable min/max over the offsets [-before, after] in x and y (pixels outside the map are
/// left out).
fn filter_square(map: &Map, before: usize, after: usize, start: f32, pick: fn(f32, f32) -> f32) -> Map {
    let (w, h) = (map.width, map.height);
    let mut rows = vec![start; w * h];
    for y in 0..h {
        for x in 0..w {
            let (from, to) = (x.saturating_sub(before), (x + after).min(w - 1));
            rows[y * w + x] = map.data[y * w + from..=y * w + to].iter().fold(start, |a, &v| pick(a, v));
        }
    }
    let mut out = vec![start; w * h];
    for y in 0..h {
        let (from, to) = (y.saturating_sub(before), (y + after).min(h - 1));
        for x in 0..w {
            out[y * w + x] = (from..=to).fold(start, |a, yy| pick(a, rows[yy * w + x]));
        }
    }
    Map { width: w, height: h, data: out }
}

/// How the map is made from an image and its reconstruction.
#[derive(Clone, Copy, Debug)]
pub struct MapRecipe {
    pub ssim_window: usize,
    pub alpha: f32,
    pub smoothing_sigma: f32,
    pub morphology: usize,
}

/// The anomaly map of a `[3, side, side]` image and its reconstruction, both in [0, 1]:
/// alpha · (1 − SSIM) + (1 − alpha) · |x − x̂|, each averaged over the channels, then the
/// Gaussian smoothing and the opening.
pub fn anomaly_map(image: &[f32], reconstruction: &[f32], side: usize, recipe: &MapRecipe) -> Map {
    let plane = side * side;
    let mut map = vec![0f32; plane];
    for c in 0..3 {
        let a = &image[c * plane..(c + 1) * plane];
        let b = &reconstruction[c * plane..(c + 1) * plane];
        let ssim = ssim_plane(a, b, side, side, recipe.ssim_window);
        for (i, m) in map.iter_mut().enumerate() {
            *m += (recipe.alpha * (1.0 - ssim[i]) + (1.0 - recipe.alpha) * (a[i] - b[i]).abs()) / 3.0;
        }
    }
    let mut map = Map { width: side, height: side, data: map };
    if recipe.smoothing_sigma > 0.0 {
        map = map.gaussian_blur(recipe.smoothing_sigma);
    }
    opening(&map, recipe.morphology)
}

/// The seed's image score: the mean of the map (over the pixels an ignore mask keeps; 0 when it
/// keeps none).
pub fn mean_score(map: &Map, ignore: Option<&Mask>) -> f32 {
    match ignore {
        None => map.mean(),
        Some(mask) => {
            let (sum, count) = map
                .data
                .iter()
                .zip(&mask.data)
                .filter(|(_, &ignored)| !ignored)
                .fold((0f64, 0usize), |(s, n), (&v, _)| (s + v as f64, n + 1));
            if count == 0 {
                0.0
            } else {
                (sum / count as f64) as f32
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ssim_is_one_for_equal_images_and_lower_for_different_ones() {
        let a: Vec<f32> = (0..64).map(|i| ((i * 7) % 11) as f32 / 10.0).collect();
        let same = ssim_plane(&a, &a, 8, 8, 7);
        assert!(same.iter().all(|&v| (v - 1.0).abs() < 1e-5), "{same:?}");
        let b: Vec<f32> = a.iter().map(|v| 1.0 - v).collect();
        assert!(ssim_plane(&a, &b, 8, 8, 7).iter().all(|&v| v < 0.5));
    }

    #[test]
    fn opening_removes_specks_smaller_than_the_square_and_keeps_larger_regions() {
        let mut map = Map::filled(12, 12, 0.0);
        map.data[2 * 12 + 2] = 1.0; // a one-pixel speck
        for y in 6..10 {
            for x in 6..10 {
                map.data[y * 12 + x] = 2.0; // a 4 x 4 region
            }
        }
        let opened = opening(&map, 2);
        assert_eq!(opened.data[2 * 12 + 2], 0.0);
        for y in 0..12 {
            for x in 0..12 {
                let inside = (6..10).contains(&y) && (6..10).contains(&x);
                assert_eq!(opened.data[y * 12 + x], if inside { 2.0 } else { 0.0 }, "({x}, {y})");
            }
        }
        // Opening never raises a value and is idempotent.
        let again = opening(&opened, 2);
        assert_eq!(again.data, opened.data);
        assert_eq!(opening(&map, 4).data.iter().filter(|&&v| v > 0.0).count(), 16);
        assert_eq!(opening(&map, 5).data.iter().filter(|&&v| v > 0.0).count(), 0);
    }

    #[test]
    fn the_map_is_zero_for_a_perfect_reconstruction_and_the_score_is_its_mean() {
        let image: Vec<f32> = (0..3 * 16 * 16).map(|i| ((i * 13) % 17) as f32 / 16.0).collect();
        let recipe = MapRecipe { ssim_window: 7, alpha: 0.5, smoothing_sigma: 1.0, morphology: 2 };
        let map = anomaly_map(&image, &image, 16, &recipe);
        assert!(map.data.iter().all(|&v| v.abs() < 1e-5));
        let mut changed = image.clone();
        for y in 4..10 {
            for x in 4..10 {
                changed[y * 16 + x] = 1.0 - changed[y * 16 + x];
            }
        }
        let map = anomaly_map(&image, &changed, 16, &recipe);
        assert!(map.get(6, 6) > 10.0 * map.get(14, 14).max(1e-4), "{} vs {}", map.get(6, 6), map.get(14, 14));
        assert_eq!(mean_score(&map, None), map.mean());
        let mut mask = Mask::empty(16, 16);
        mask.data.iter_mut().take(128).for_each(|m| *m = true);
        let lower: f32 = map.data[128..].iter().sum::<f32>() / 128.0;
        assert!((mean_score(&map, Some(&mask)) - lower).abs() < 1e-6);
    }
}
