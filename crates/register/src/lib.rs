//! Image registration for line clearance: aligns each image to a fixed reference view so that a
//! nudged camera does not turn the whole scene into an anomaly.
//!
//! The procedure follows the line-clearance thesis (OpenCV's ORB + brute-force matching +
//! RANSAC homography + perspective warp), implemented here in pure Rust:
//! 1. ORB features on the grayscale image: FAST-9 corners on an image pyramid, 3×3 non-maximum
//!    suppression, the best corners per level by Harris response, intensity-centroid
//!    orientation and a rotated 256-bit BRIEF descriptor on a Gaussian-smoothed level.
//! 2. Brute-force Hamming matching with Lowe's ratio test and a cross-check.
//! 3. A homography by normalised DLT inside seeded RANSAC, re-fitted on its inliers.
//! 4. A bilinear perspective warp into the reference frame, with a mask of the pixels the image
//!    actually saw.
//!
//! Coordinates are pixel centres at integer positions (x = column, y = row). A homography is a
//! row-major 3×3 matrix `[h0..h8]` mapping `(x, y)` to `((h0 x + h1 y + h2) / w, (h3 x + h4 y + h5) / w)`
//! with `w = h6 x + h7 y + h8`.

use std::path::Path;
use std::sync::OnceLock;

use nalgebra::{SMatrix, SymmetricEigen};
use rand::seq::index;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use vigil_core::{Image, Map, Mask, Result, VigilError};

use vigil_data::io::load_image;

/// Radius of the circular patch used for orientation and the descriptor (ORB's 31×31 patch).
const PATCH_RADIUS: isize = 15;
/// Keypoints stay this far from a level's border so every patch pixel exists.
const BORDER: usize = PATCH_RADIUS as usize + 1;
/// A pyramid level narrower than this has almost no room for keypoints and is not built.
const MIN_LEVEL_SIDE: usize = 2 * BORDER + 8;
/// Smoothing before the BRIEF tests, as ORB does, so single-pixel noise does not flip bits.
const DESCRIPTOR_SIGMA: f32 = 2.0;
/// The sampling pattern is part of the descriptor's definition: it must be the same in every run
/// and for every image, so it has its own fixed seed, independent of the RANSAC seed.
const PATTERN_SEED: u64 = 0x0_5EED_B41E;
/// Harris detector constant (the customary 0.04).
const HARRIS_K: f32 = 0.04;
/// RANSAC stops early once this confidence of having drawn an all-inlier sample is reached.
const RANSAC_CONFIDENCE: f64 = 0.999;

/// The 16-pixel Bresenham circle of radius 3 used by FAST, in order around the circle.
const FAST_CIRCLE: [(isize, isize); 16] = [
    (0, -3),
    (1, -3),
    (2, -2),
    (3, -1),
    (3, 0),
    (3, 1),
    (2, 2),
    (1, 3),
    (0, 3),
    (-1, 3),
    (-2, 2),
    (-3, 1),
    (-3, 0),
    (-3, -1),
    (-2, -2),
    (-1, -3),
];

/// How images are registered to the reference. Serialisable so a configuration file can set it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RegistrationSettings {
    /// Keypoints kept per image (the best Harris responses, spread over the pyramid levels).
    pub max_features: usize,
    /// Pyramid levels (fewer are used when the image becomes too small).
    pub pyramid_levels: usize,
    /// Size ratio between consecutive pyramid levels.
    pub scale_factor: f32,
    /// FAST intensity difference, in image units [0, 1] (OpenCV's default 20 of 255 ≈ 0.078).
    pub fast_threshold: f32,
    /// Lowe's ratio: the best match must be closer than this fraction of the second best.
    pub ratio: f32,
    /// Matches with more differing descriptor bits (of 256) than this are discarded.
    pub max_hamming: u32,
    /// Maximum RANSAC iterations (it stops earlier once confident).
    pub ransac_iterations: usize,
    /// Reprojection error, in pixels, under which a match counts as an inlier.
    pub inlier_tolerance: f64,
    /// Registration fails with fewer consistent matches than this.
    pub min_inliers: usize,
    /// Seed of the RANSAC sampling.
    pub seed: u64,
}

impl Default for RegistrationSettings {
    fn default() -> Self {
        RegistrationSettings {
            max_features: 1000,
            pyramid_levels: 8,
            scale_factor: 1.2,
            fast_threshold: 20.0 / 255.0,
            ratio: 0.8,
            max_hamming: 80,
            ransac_iterations: 2000,
            inlier_tolerance: 3.0,
            min_inliers: 15,
            seed: 0,
        }
    }
}

impl RegistrationSettings {
    fn validate(&self) -> Result<()> {
        let fail = |m: String| Err(VigilError::Config(format!("registration: {m}")));
        if self.max_features < 4 {
            return fail(format!("max_features is {}, it must be at least 4", self.max_features));
        }
        if !(1..=32).contains(&self.pyramid_levels) {
            return fail(format!("pyramid_levels is {}, it must be in 1..=32", self.pyramid_levels));
        }
        if !(self.scale_factor > 1.0 && self.scale_factor <= 2.0) {
            return fail(format!("scale_factor is {}, it must be in (1, 2]", self.scale_factor));
        }
        if !(self.fast_threshold > 0.0 && self.fast_threshold < 1.0) {
            return fail(format!("fast_threshold is {}, it must be in (0, 1)", self.fast_threshold));
        }
        if !(self.ratio > 0.0 && self.ratio <= 1.0) {
            return fail(format!("ratio is {}, it must be in (0, 1]", self.ratio));
        }
        if self.ransac_iterations == 0 {
            return fail("ransac_iterations must be at least 1".into());
        }
        if !(self.inlier_tolerance > 0.0 && self.inlier_tolerance.is_finite()) {
            return fail(format!("inlier_tolerance is {}, it must be positive", self.inlier_tolerance));
        }
        if self.min_inliers < 4 {
            return fail(format!("min_inliers is {}, a homography needs at least 4", self.min_inliers));
        }
        Ok(())
    }
}

/// One ORB keypoint, in full-resolution pixel coordinates.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Keypoint {
    pub x: f64,
    pub y: f64,
    /// Pyramid level it was detected on (0 = full resolution).
    pub level: usize,
    /// Orientation in radians (intensity centroid direction).
    pub angle: f32,
    /// Harris response at its level; higher is a stronger corner.
    pub response: f32,
}

/// Keypoints and their 256-bit descriptors (same order).
#[derive(Clone, Debug, Default)]
pub struct OrbFeatures {
    pub keypoints: Vec<Keypoint>,
    pub descriptors: Vec<[u64; 4]>,
}

/// ORB features of an image (RGB is converted to luminance, otherwise the first channel is
/// used; too-small images give none).
pub fn detect_orb(image: &Image, settings: &RegistrationSettings) -> OrbFeatures {
    let data = if image.channels >= 3 { image.to_gray().data } else { image.channel(0).to_vec() };
    let base = Map { width: image.width, height: image.height, data };
    let levels = pyramid(&base, settings.pyramid_levels, settings.scale_factor);
    let budgets = level_budgets(settings.max_features, levels.len(), settings.scale_factor);
    let mut features = OrbFeatures::default();
    for (level, (plane, budget)) in levels.iter().zip(budgets).enumerate() {
        let scale_x = base.width as f64 / plane.width as f64;
        let scale_y = base.height as f64 / plane.height as f64;
        let smoothed = plane.gaussian_blur(DESCRIPTOR_SIGMA);
        for (x, y, response) in level_corners(plane, settings.fast_threshold, budget) {
            let angle = orientation(plane, x, y);
            features.descriptors.push(brief(&smoothed, x, y, angle));
            // Half-pixel centres: the same convention the pyramid's bilinear resampling uses.
            features.keypoints.push(Keypoint {
                x: (x as f64 + 0.5) * scale_x - 0.5,
                y: (y as f64 + 0.5) * scale_y - 0.5,
                level,
                angle,
                response,
            });
        }
    }
    features
}

/// Each level is resampled from the previous one, stopping before a level gets too small.
fn pyramid(base: &Map, levels: usize, scale: f32) -> Vec<Map> {
    let mut out = vec![base.clone()];
    for k in 1..levels {
        let factor = scale.powi(k as i32);
        let w = (base.width as f32 / factor).round() as usize;
        let h = (base.height as f32 / factor).round() as usize;
        if w < MIN_LEVEL_SIDE || h < MIN_LEVEL_SIDE {
            break;
        }
        let next = out[k - 1].resize_bilinear(w, h);
        out.push(next);
    }
    out
}

/// Keypoint budget per level, proportional to the level's linear size (as ORB does), so coarse
/// levels do not take keypoints the fine levels localise better.
fn level_budgets(total: usize, levels: usize, scale: f32) -> Vec<usize> {
    let f = 1.0 / scale as f64;
    let first = total as f64 * (1.0 - f) / (1.0 - f.powi(levels as i32));
    let mut remaining = total;
    (0..levels)
        .map(|k| {
            let budget =
                if k + 1 == levels { remaining } else { (first * f.powi(k as i32)).round() as usize };
            let budget = budget.min(remaining);
            remaining -= budget;
            budget
        })
        .collect()
}

/// The FAST-9 score: the largest threshold at which 9 contiguous circle pixels are all brighter
/// (or all darker) than the centre by more than it; 0 if that is not above `threshold`.
fn fast_score(plane: &Map, x: usize, y: usize, threshold: f32) -> f32 {
    let w = plane.width as isize;
    let centre_index = (y * plane.width + x) as isize;
    let centre = plane.data[centre_index as usize];
    let mut diff = [0f32; 16];
    for (d, &(dx, dy)) in diff.iter_mut().zip(&FAST_CIRCLE) {
        *d = plane.data[(centre_index + dy * w + dx) as usize] - centre;
    }
    // Any 9-pixel arc contains at least two of the four compass points, which rejects most
    // pixels after four comparisons.
    let compass = [diff[0], diff[4], diff[8], diff[12]];
    let brighter = compass.iter().filter(|&&d| d > threshold).count();
    let darker = compass.iter().filter(|&&d| d < -threshold).count();
    if brighter < 2 && darker < 2 {
        return 0.0;
    }
    let mut best = 0f32;
    for start in 0..16 {
        let arc = (0..9).map(|j| diff[(start + j) % 16]);
        let (lo, hi) = arc.fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), d| (lo.min(d), hi.max(d)));
        best = best.max(lo).max(-hi);
    }
    if best > threshold {
        best
    } else {
        0.0
    }
}

/// FAST corners of one level after 3×3 non-maximum suppression, the `budget` best by Harris
/// response, as (x, y, response) in the level's pixels.
fn level_corners(plane: &Map, threshold: f32, budget: usize) -> Vec<(usize, usize, f32)> {
    let (w, h) = (plane.width, plane.height);
    if budget == 0 || w < MIN_LEVEL_SIDE || h < MIN_LEVEL_SIDE {
        return Vec::new();
    }
    // Scores one pixel beyond the keypoint area, so suppression sees every neighbour.
    let mut score = vec![0f32; w * h];
    for y in BORDER - 1..h - BORDER + 1 {
        for x in BORDER - 1..w - BORDER + 1 {
            score[y * w + x] = fast_score(plane, x, y, threshold);
        }
    }
    let mut corners = Vec::new();
    for y in BORDER..h - BORDER {
        for x in BORDER..w - BORDER {
            let s = score[y * w + x];
            if s <= 0.0 {
                continue;
            }
            // Ties go to the first pixel in raster order, so a plateau keeps exactly one corner.
            let is_max = (-1isize..=1).all(|dy| {
                (-1isize..=1).all(|dx| {
                    let n = score[(y as isize + dy) as usize * w + (x as isize + dx) as usize];
                    let earlier = dy < 0 || (dy == 0 && dx < 0);
                    (dx == 0 && dy == 0) || if earlier { s > n } else { s >= n }
                })
            });
            if is_max {
                corners.push((x, y, harris_response(plane, x, y)));
            }
        }
    }
    corners.sort_by(|a, b| b.2.total_cmp(&a.2).then((a.1, a.0).cmp(&(b.1, b.0))));
    corners.truncate(budget);
    corners
}

/// Harris corner response over a 7×7 block of Sobel gradients.
fn harris_response(plane: &Map, x: usize, y: usize) -> f32 {
    let w = plane.width;
    let p = |xx: usize, yy: usize| plane.data[yy * w + xx];
    let (mut a, mut b, mut c) = (0f32, 0f32, 0f32);
    for yy in y - 3..=y + 3 {
        for xx in x - 3..=x + 3 {
            let gx = (p(xx + 1, yy - 1) + 2.0 * p(xx + 1, yy) + p(xx + 1, yy + 1))
                - (p(xx - 1, yy - 1) + 2.0 * p(xx - 1, yy) + p(xx - 1, yy + 1));
            let gy = (p(xx - 1, yy + 1) + 2.0 * p(xx, yy + 1) + p(xx + 1, yy + 1))
                - (p(xx - 1, yy - 1) + 2.0 * p(xx, yy - 1) + p(xx + 1, yy - 1));
            a += gx * gx;
            b += gy * gy;
            c += gx * gy;
        }
    }
    a * b - c * c - HARRIS_K * (a + b) * (a + b)
}

/// Direction from the keypoint to the intensity centroid of its circular patch.
fn orientation(plane: &Map, x: usize, y: usize) -> f32 {
    let (mut m10, mut m01) = (0f64, 0f64);
    for dy in -PATCH_RADIUS..=PATCH_RADIUS {
        let row = (y as isize + dy) as usize * plane.width;
        for dx in -PATCH_RADIUS..=PATCH_RADIUS {
            if dx * dx + dy * dy <= PATCH_RADIUS * PATCH_RADIUS {
                let v = plane.data[row + (x as isize + dx) as usize] as f64;
                m10 += dx as f64 * v;
                m01 += dy as f64 * v;
            }
        }
    }
    m01.atan2(m10) as f32
}

/// 256 point pairs inside the patch circle, drawn once from an isotropic Gaussian of standard
/// deviation patch/5 (BRIEF's best-performing sampling), from a fixed seed.
fn brief_pattern() -> &'static [[f32; 4]; 256] {
    static PATTERN: OnceLock<[[f32; 4]; 256]> = OnceLock::new();
    PATTERN.get_or_init(|| {
        let mut rng = ChaCha8Rng::seed_from_u64(PATTERN_SEED);
        let sigma = (2 * PATCH_RADIUS + 1) as f64 / 5.0;
        let radius2 = (PATCH_RADIUS * PATCH_RADIUS) as f64;
        let point = |rng: &mut ChaCha8Rng| loop {
            // Box-Muller: two independent standard normals from two uniforms.
            let u1: f64 = 1.0 - rng.gen::<f64>();
            let u2: f64 = rng.gen();
            let r = (-2.0 * u1.ln()).sqrt() * sigma;
            let (px, py) = (r * (std::f64::consts::TAU * u2).cos(), r * (std::f64::consts::TAU * u2).sin());
            // Inside the circle, a point stays inside the patch whatever the rotation.
            if px * px + py * py <= radius2 {
                return [px as f32, py as f32];
            }
        };
        let mut pattern = [[0f32; 4]; 256];
        for pair in pattern.iter_mut() {
            loop {
                let (a, b) = (point(&mut rng), point(&mut rng));
                if (a[0].round(), a[1].round()) != (b[0].round(), b[1].round()) {
                    *pair = [a[0], a[1], b[0], b[1]];
                    break;
                }
            }
        }
        pattern
    })
}

/// Rotated BRIEF: bit i is set when the first point of pair i, rotated by the keypoint's
/// angle, is darker than the second.
fn brief(smoothed: &Map, x: usize, y: usize, angle: f32) -> [u64; 4] {
    let (sin, cos) = angle.sin_cos();
    let sample = |px: f32, py: f32| {
        let rx = (cos * px - sin * py).round() as isize;
        let ry = (sin * px + cos * py).round() as isize;
        smoothed.data[(y as isize + ry) as usize * smoothed.width + (x as isize + rx) as usize]
    };
    let mut bits = [0u64; 4];
    for (i, p) in brief_pattern().iter().enumerate() {
        if sample(p[0], p[1]) < sample(p[2], p[3]) {
            bits[i / 64] |= 1 << (i % 64);
        }
    }
    bits
}

fn hamming(a: &[u64; 4], b: &[u64; 4]) -> u32 {
    a.iter().zip(b).map(|(x, y)| (x ^ y).count_ones()).sum()
}

/// Brute-force matches `(query index, train index)` that pass the ratio test, the distance
/// limit and the cross-check (each is the other's nearest descriptor).
pub fn match_descriptors(
    query: &[[u64; 4]],
    train: &[[u64; 4]],
    ratio: f32,
    max_hamming: u32,
) -> Vec<(usize, usize)> {
    let mut train_best = vec![(u32::MAX, usize::MAX); train.len()];
    let mut query_best = Vec::with_capacity(query.len());
    for (qi, q) in query.iter().enumerate() {
        let (mut best, mut second, mut best_index) = (u32::MAX, u32::MAX, usize::MAX);
        for (ti, t) in train.iter().enumerate() {
            let d = hamming(q, t);
            if d < best {
                second = best;
                best = d;
                best_index = ti;
            } else if d < second {
                second = d;
            }
            if d < train_best[ti].0 {
                train_best[ti] = (d, qi);
            }
        }
        query_best.push((best, second, best_index));
    }
    query_best
        .into_iter()
        .enumerate()
        .filter(|&(qi, (best, second, ti))| {
            ti != usize::MAX
                && best <= max_hamming
                && (second == u32::MAX || (best as f32) < ratio * second as f32)
                && train_best[ti].1 == qi
        })
        .map(|(qi, (_, _, ti))| (qi, ti))
        .collect()
}

/// Applies a homography to a point; `None` when it maps the point to infinity or behind.
fn apply_homography(h: &[f64; 9], x: f64, y: f64) -> Option<(f64, f64)> {
    let w = h[6] * x + h[7] * y + h[8];
    if w.abs() < 1e-12 || !w.is_finite() {
        return None;
    }
    Some(((h[0] * x + h[1] * y + h[2]) / w, (h[3] * x + h[4] * y + h[5]) / w))
}

/// The inverse homography (adjugate over determinant), scaled so its last entry is 1 when it can be.
fn invert_homography(h: &[f64; 9]) -> Option<[f64; 9]> {
    let inv = [
        h[4] * h[8] - h[5] * h[7],
        h[2] * h[7] - h[1] * h[8],
        h[1] * h[5] - h[2] * h[4],
        h[5] * h[6] - h[3] * h[8],
        h[0] * h[8] - h[2] * h[6],
        h[2] * h[3] - h[0] * h[5],
        h[3] * h[7] - h[4] * h[6],
        h[1] * h[6] - h[0] * h[7],
        h[0] * h[4] - h[1] * h[3],
    ];
    let det = h[0] * inv[0] + h[1] * inv[3] + h[2] * inv[6];
    let scale: f64 = h.iter().map(|v| v * v).sum::<f64>().sqrt();
    if !det.is_finite() || det.abs() <= 1e-12 * scale.powi(3) {
        return None;
    }
    Some(normalise(inv.map(|v| v / det)))
}

/// Scales a homography so h8 = 1 (the usual form), unless h8 is essentially 0.
fn normalise(h: [f64; 9]) -> [f64; 9] {
    let norm: f64 = h.iter().map(|v| v * v).sum::<f64>().sqrt();
    if h[8].abs() > 1e-10 * norm {
        h.map(|v| v / h[8])
    } else {
        h.map(|v| v / norm)
    }
}

/// Hartley normalisation: moves the centroid to the origin and scales the mean distance to √2,
/// which keeps the DLT system well conditioned. Returns the points and the 3×3 transform.
fn hartley(points: &[[f64; 2]]) -> Option<(Vec<[f64; 2]>, [f64; 9])> {
    let n = points.len() as f64;
    let cx = points.iter().map(|p| p[0]).sum::<f64>() / n;
    let cy = points.iter().map(|p| p[1]).sum::<f64>() / n;
    let mean_dist =
        points.iter().map(|p| ((p[0] - cx).powi(2) + (p[1] - cy).powi(2)).sqrt()).sum::<f64>() / n;
    // NaN (non-finite input) fails too.
    if mean_dist.is_nan() || mean_dist <= 1e-12 {
        return None;
    }
    let s = std::f64::consts::SQRT_2 / mean_dist;
    let normalised = points.iter().map(|p| [(p[0] - cx) * s, (p[1] - cy) * s]).collect();
    Some((normalised, [s, 0.0, -s * cx, 0.0, s, -s * cy, 0.0, 0.0, 1.0]))
}

fn mul3(a: &[f64; 9], b: &[f64; 9]) -> [f64; 9] {
    let mut out = [0f64; 9];
    for r in 0..3 {
        for c in 0..3 {
            out[r * 3 + c] = (0..3).map(|k| a[r * 3 + k] * b[k * 3 + c]).sum();
        }
    }
    out
}

/// The homography mapping `src[i]` to `dst[i]` (least squares in the algebraic error for more
/// than 4 points) by the normalised DLT; `None` for fewer than 4 points or a degenerate set
/// (e.g. 3 of 4 points collinear).
pub fn homography_dlt(src: &[[f64; 2]], dst: &[[f64; 2]]) -> Option<[f64; 9]> {
    if src.len() < 4 || src.len() != dst.len() {
        return None;
    }
    let (src_n, t_src) = hartley(src)?;
    let (dst_n, t_dst) = hartley(dst)?;
    // The null vector of the 2n×9 DLT matrix A is the eigenvector of AᵀA with the smallest
    // eigenvalue; AᵀA is accumulated directly so A is never stored.
    let mut ata = SMatrix::<f64, 9, 9>::zeros();
    for (s, d) in src_n.iter().zip(&dst_n) {
        let (x, y, u, v) = (s[0], s[1], d[0], d[1]);
        let rows =
            [[-x, -y, -1.0, 0.0, 0.0, 0.0, u * x, u * y, u], [0.0, 0.0, 0.0, -x, -y, -1.0, v * x, v * y, v]];
        for row in &rows {
            for i in 0..9 {
                for j in 0..9 {
                    ata[(i, j)] += row[i] * row[j];
                }
            }
        }
    }
    let eigen = SymmetricEigen::new(ata);
    let mut order: Vec<usize> = (0..9).collect();
    order.sort_by(|&a, &b| eigen.eigenvalues[a].total_cmp(&eigen.eigenvalues[b]));
    let largest = eigen.eigenvalues[order[8]];
    // A second (near-)null direction means the points do not determine a unique homography.
    let second = eigen.eigenvalues[order[1]];
    if second.is_nan() || second <= 1e-10 * largest {
        return None;
    }
    let v = eigen.eigenvectors.column(order[0]);
    let h_n: [f64; 9] = std::array::from_fn(|i| v[i]);
    let t_dst_inv = invert_homography(&t_dst)?;
    let h = normalise(mul3(&mul3(&t_dst_inv, &h_n), &t_src));
    h.iter().all(|v| v.is_finite()).then_some(h)
}

fn cross(o: [f64; 2], a: [f64; 2], b: [f64; 2]) -> f64 {
    (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])
}

/// A minimal sample is usable only when no three points are collinear and every triangle keeps
/// its orientation (a camera nudge does not mirror the scene).
fn sample_is_consistent(src: &[[f64; 2]; 4], dst: &[[f64; 2]; 4]) -> bool {
    const TRIPLES: [[usize; 3]; 4] = [[0, 1, 2], [0, 1, 3], [0, 2, 3], [1, 2, 3]];
    TRIPLES.iter().all(|&[i, j, k]| {
        let a = cross(src[i], src[j], src[k]);
        let b = cross(dst[i], dst[j], dst[k]);
        a.abs() > 1e-6 && b.abs() > 1e-6 && (a > 0.0) == (b > 0.0)
    })
}

fn inlier_set(h: &[f64; 9], src: &[[f64; 2]], dst: &[[f64; 2]], tolerance: f64) -> Vec<usize> {
    let tol2 = tolerance * tolerance;
    (0..src.len())
        .filter(|&i| match apply_homography(h, src[i][0], src[i][1]) {
            Some((x, y)) => (x - dst[i][0]).powi(2) + (y - dst[i][1]).powi(2) < tol2,
            None => false,
        })
        .collect()
}

/// A plane projective transform as a row-major 3x3 matrix (h[8] = 1): (x, y) maps to
/// ((h0 x + h1 y + h2) / w, (h3 x + h4 y + h5) / w) with w = h6 x + h7 y + h8.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Homography(pub [f64; 9]);

impl Homography {
    pub const IDENTITY: Homography = Homography([1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]);

    /// Where (x, y) goes; None where the point goes to infinity.
    pub fn apply(&self, x: f64, y: f64) -> Option<(f64, f64)> {
        apply_homography(&self.0, x, y)
    }

    /// The inverse transform; None for a singular matrix.
    pub fn inverse(&self) -> Option<Homography> {
        invert_homography(&self.0).map(Homography)
    }
}

/// A robust homography fit: the model and the indices of the correspondences it explains.
#[derive(Clone, Debug, PartialEq)]
pub struct HomographyFit {
    pub homography: Homography,
    pub inliers: Vec<usize>,
}

/// RANSAC over minimal 4-point DLT samples (seeded), then the DLT re-fitted on the inliers until
/// the inlier set stops growing. `None` if no sample gives a homography.
pub fn ransac_homography(
    src: &[[f64; 2]],
    dst: &[[f64; 2]],
    max_iterations: usize,
    tolerance: f64,
    seed: u64,
) -> Option<HomographyFit> {
    let n = src.len();
    if n < 4 || dst.len() != n {
        return None;
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut best: Option<HomographyFit> = None;
    let mut needed = max_iterations;
    let mut iteration = 0;
    while iteration < needed.min(max_iterations) {
        iteration += 1;
        let pick = index::sample(&mut rng, n, 4);
        let s: [[f64; 2]; 4] = std::array::from_fn(|k| src[pick.index(k)]);
        let d: [[f64; 2]; 4] = std::array::from_fn(|k| dst[pick.index(k)]);
        if !sample_is_consistent(&s, &d) {
            continue;
        }
        let Some(h) = homography_dlt(&s, &d) else { continue };
        let inliers = inlier_set(&h, src, dst, tolerance);
        if best.as_ref().is_none_or(|b| inliers.len() > b.inliers.len()) {
            // Iterations for RANSAC_CONFIDENCE of one all-inlier sample at this inlier ratio.
            let w = inliers.len() as f64 / n as f64;
            let miss = 1.0 - w.powi(4);
            needed = if miss <= 0.0 {
                0
            } else {
                ((1.0 - RANSAC_CONFIDENCE).ln() / miss.ln()).ceil().max(1.0) as usize
            };
            best = Some(HomographyFit { homography: Homography(h), inliers });
        }
    }
    let mut fit = best?;
    // All inliers average out the keypoints' quantisation, which a minimal sample cannot.
    for _ in 0..10 {
        let s: Vec<[f64; 2]> = fit.inliers.iter().map(|&i| src[i]).collect();
        let d: Vec<[f64; 2]> = fit.inliers.iter().map(|&i| dst[i]).collect();
        let Some(h) = homography_dlt(&s, &d) else { break };
        let inliers = inlier_set(&h, src, dst, tolerance);
        if inliers.len() < fit.inliers.len() {
            break;
        }
        let converged = inliers == fit.inliers;
        fit = HomographyFit { homography: Homography(h), inliers };
        if converged {
            break;
        }
    }
    Some(fit)
}

/// Warps `image` by the homography `h` (source pixel → output pixel, as OpenCV's
/// `warpPerspective`) into an `out_w`×`out_h` image, sampling bilinearly. The mask is true where
/// the output pixel came from inside the source; elsewhere the image is 0.
pub fn warp_perspective(image: &Image, h: &Homography, out_w: usize, out_h: usize) -> Result<(Image, Mask)> {
    if out_w == 0 || out_h == 0 {
        return Err(VigilError::invalid(format!("warp to an empty {out_w}x{out_h} image")));
    }
    let inverse = invert_homography(&h.0)
        .ok_or_else(|| VigilError::invalid(format!("cannot warp with a singular homography {h:?}")))?;
    let (w, hgt) = (image.width, image.height);
    let (max_x, max_y) = ((w - 1) as f64, (hgt - 1) as f64);
    // Rounding in the inverse must not drop the exact border rows and columns.
    const EDGE: f64 = 1e-6;
    let plane = out_w * out_h;
    let mut data = vec![0f32; plane * image.channels];
    let mut valid = vec![false; plane];
    for y in 0..out_h {
        for x in 0..out_w {
            let Some((sx, sy)) = apply_homography(&inverse, x as f64, y as f64) else { continue };
            let denominator = inverse[6] * x as f64 + inverse[7] * y as f64 + inverse[8];
            if denominator <= 0.0
                || !(-EDGE..=max_x + EDGE).contains(&sx)
                || !(-EDGE..=max_y + EDGE).contains(&sy)
            {
                continue;
            }
            let (sx, sy) = (sx.clamp(0.0, max_x), sy.clamp(0.0, max_y));
            let (x0, y0) = (sx.floor() as usize, sy.floor() as usize);
            let (x1, y1) = ((x0 + 1).min(w - 1), (y0 + 1).min(hgt - 1));
            let (fx, fy) = ((sx - x0 as f64) as f32, (sy - y0 as f64) as f32);
            let out = y * out_w + x;
            valid[out] = true;
            for c in 0..image.channels {
                let p = image.channel(c);
                let top = p[y0 * w + x0] + (p[y0 * w + x1] - p[y0 * w + x0]) * fx;
                let bottom = p[y1 * w + x0] + (p[y1 * w + x1] - p[y1 * w + x0]) * fx;
                data[c * plane + out] = top + (bottom - top) * fy;
            }
        }
    }
    let warped =
        Image { width: out_w, height: out_h, channels: image.channels, bit_depth: image.bit_depth, data };
    Ok((warped, Mask { width: out_w, height: out_h, data: valid }))
}

/// An image aligned to the reference.
#[derive(Clone, Debug)]
pub struct Registered {
    /// The image warped into the reference frame (reference size, the image's channels).
    pub image: Image,
    /// True where the warped pixel was seen by the image; the rest is outside its field of view.
    pub valid: Mask,
    /// Homography from the image's pixels to the reference's pixels (h8 = 1).
    pub homography: Homography,
    /// Matches consistent with the homography.
    pub inliers: usize,
    /// Descriptor matches RANSAC started from.
    pub matches: usize,
}

impl Registered {
    /// Fraction of the descriptor matches that the homography explains.
    pub fn inlier_ratio(&self) -> f64 {
        self.inliers as f64 / self.matches.max(1) as f64
    }
}

/// Registration against one reference view, whose features are computed once.
#[derive(Clone, Debug)]
pub struct Registration {
    settings: RegistrationSettings,
    reference_width: usize,
    reference_height: usize,
    reference: OrbFeatures,
}

impl Registration {
    pub fn new(reference: &Image, settings: RegistrationSettings) -> Result<Self> {
        settings.validate()?;
        check_size(reference, "reference image")?;
        let features = detect_orb(reference, &settings);
        if features.keypoints.len() < settings.min_inliers {
            return Err(VigilError::invalid(format!(
                "the reference image has only {} ORB keypoints (registration needs at least {}): it has \
                 too little texture to register against; choose a reference with visible structure or \
                 lower fast_threshold",
                features.keypoints.len(),
                settings.min_inliers
            )));
        }
        Ok(Registration {
            settings,
            reference_width: reference.width,
            reference_height: reference.height,
            reference: features,
        })
    }

    pub fn settings(&self) -> &RegistrationSettings {
        &self.settings
    }

    /// The reference's ORB keypoints (full-resolution coordinates).
    pub fn reference_keypoints(&self) -> &[Keypoint] {
        &self.reference.keypoints
    }

    /// Aligns `image` to the reference. Fails, without panicking, when too few matches agree on
    /// one homography.
    pub fn register(&self, image: &Image) -> Result<Registered> {
        check_size(image, "image")?;
        let s = &self.settings;
        let features = detect_orb(image, s);
        let matches =
            match_descriptors(&features.descriptors, &self.reference.descriptors, s.ratio, s.max_hamming);
        let src: Vec<[f64; 2]> = matches.iter().map(|&(q, _)| point(&features.keypoints[q])).collect();
        let dst: Vec<[f64; 2]> = matches.iter().map(|&(_, t)| point(&self.reference.keypoints[t])).collect();
        let fit = ransac_homography(&src, &dst, s.ransac_iterations, s.inlier_tolerance, s.seed);
        let inliers = fit.as_ref().map_or(0, |f| f.inliers.len());
        let fit = match fit {
            Some(fit) if inliers >= s.min_inliers => fit,
            _ => {
                return Err(VigilError::invalid(format!(
                    "could not register the image to the reference: only {inliers} consistent matches \
                     (need {}; {} descriptor matches, {} keypoints in the image, {} in the reference); \
                     the view may differ too much from the reference or show too little texture",
                    s.min_inliers,
                    matches.len(),
                    features.keypoints.len(),
                    self.reference.keypoints.len()
                )))
            }
        };
        let (warped, valid) =
            warp_perspective(image, &fit.homography, self.reference_width, self.reference_height)?;
        Ok(Registered { image: warped, valid, homography: fit.homography, inliers, matches: matches.len() })
    }

    /// Loads and registers an image file; every error names the file.
    pub fn register_file(&self, path: &Path) -> Result<Registered> {
        let image = load_image(path)?;
        self.register(&image).map_err(|e| match e {
            VigilError::Invalid(message) => VigilError::file(path, message),
            other => other,
        })
    }
}

fn point(k: &Keypoint) -> [f64; 2] {
    [k.x, k.y]
}

fn check_size(image: &Image, what: &str) -> Result<()> {
    if image.width < MIN_LEVEL_SIDE || image.height < MIN_LEVEL_SIDE {
        return Err(VigilError::invalid(format!(
            "{what} is {}x{}, too small to register (ORB features need at least {MIN_LEVEL_SIDE}x{MIN_LEVEL_SIDE})",
            image.width, image.height
        )));
    }
    if image.channels != 1 && image.channels != 3 {
        return Err(VigilError::invalid(format!(
            "{what} has {} channels; registration takes gray or RGB images",
            image.channels
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rotation by `degrees` about the image centre, then a shift and a slight perspective tilt.
    fn camera_nudge(w: usize, h: usize, degrees: f64, shift: (f64, f64), tilt: (f64, f64)) -> [f64; 9] {
        let (cx, cy) = ((w - 1) as f64 / 2.0, (h - 1) as f64 / 2.0);
        let (sin, cos) = degrees.to_radians().sin_cos();
        let to_centre = [1.0, 0.0, -cx, 0.0, 1.0, -cy, 0.0, 0.0, 1.0];
        let rotate = [cos, -sin, shift.0, sin, cos, shift.1, tilt.0, tilt.1, 1.0];
        let back = [1.0, 0.0, cx, 0.0, 1.0, cy, 0.0, 0.0, 1.0];
        normalise(mul3(&back, &mul3(&rotate, &to_centre)))
    }

    /// Gray shapes of random size and intensity on a smooth random background: corners at many
    /// scales and orientations, like a cluttered machine view.
    fn procedural_texture(w: usize, h: usize, seed: u64) -> Image {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let grid: Vec<f32> = (0..64).map(|_| rng.gen_range(0.3..0.7)).collect();
        let mut data: Vec<f32> = (0..w * h)
            .map(|i| {
                let (x, y) = ((i % w) as f32 / w as f32 * 7.0, (i / w) as f32 / h as f32 * 7.0);
                let (gx, gy) = (x as usize, y as usize);
                let (fx, fy) = (x - gx as f32, y - gy as f32);
                let g = |a: usize, b: usize| grid[b * 8 + a];
                let top = g(gx, gy) + (g(gx + 1, gy) - g(gx, gy)) * fx;
                let bottom = g(gx, gy + 1) + (g(gx + 1, gy + 1) - g(gx, gy + 1)) * fx;
                top + (bottom - top) * fy
            })
            .collect();
        for _ in 0..120 {
            let (x0, y0) = (rng.gen_range(0..w) as isize, rng.gen_range(0..h) as isize);
            let (rw, rh) = (rng.gen_range(3..25isize), rng.gen_range(3..25isize));
            let value: f32 = rng.gen();
            let disk = rng.gen_bool(0.5);
            for y in (y0 - rh).max(0)..(y0 + rh).min(h as isize) {
                for x in (x0 - rw).max(0)..(x0 + rw).min(w as isize) {
                    let (dx, dy) = ((x - x0) as f32 / rw as f32, (y - y0) as f32 / rh as f32);
                    if !disk || dx * dx + dy * dy <= 1.0 {
                        data[y as usize * w + x as usize] = value;
                    }
                }
            }
        }
        Image::new(w, h, 1, data).unwrap()
    }

    fn shared_texture(name: &str) -> Option<Image> {
        let path = vigil_core::shared_data::shared_path(&format!("data/textures/skimage/{name}"))?;
        Some(load_image(&path).unwrap())
    }

    /// Warps `reference` by a known nudge, registers it back and checks the recovered homography
    /// against the true inverse and the aligned pixels against the reference.
    fn assert_recovers_nudge(reference: &Image) {
        let (w, h) = (reference.width, reference.height);
        let nudge = camera_nudge(w, h, 4.0, (7.0, -5.0), (2e-5, -1.5e-5));
        let (moved, _) = warp_perspective(reference, &Homography(nudge), w, h).unwrap();
        let registration = Registration::new(reference, RegistrationSettings::default()).unwrap();
        let out = registration.register(&moved).unwrap();
        assert!(out.inliers >= 50, "{} inliers of {} matches", out.inliers, out.matches);

        let truth = invert_homography(&nudge).unwrap();
        let mut worst = 0f64;
        for gy in 1..8 {
            for gx in 1..8 {
                let (x, y) = (gx as f64 * w as f64 / 8.0, gy as f64 * h as f64 / 8.0);
                let (ex, ey) = apply_homography(&truth, x, y).unwrap();
                let (rx, ry) = out.homography.apply(x, y).unwrap();
                worst = worst.max(((ex - rx).powi(2) + (ey - ry).powi(2)).sqrt());
            }
        }
        assert!(worst < 1.0, "recovered homography is off by up to {worst:.3} px");

        let valid = out.valid.count();
        assert!(valid > w * h * 3 / 4, "only {valid} of {} pixels are valid", w * h);
        let mean_abs = |img: &Image| {
            let diff: f64 = (0..w * h)
                .filter(|&i| out.valid.data[i])
                .map(|i| (img.data[i] - reference.data[i]).abs() as f64)
                .sum();
            diff / valid as f64
        };
        let (aligned, unaligned) = (mean_abs(&out.image), mean_abs(&moved));
        assert!(
            aligned < 0.03 && aligned < unaligned / 4.0,
            "aligned {aligned:.4}, unaligned {unaligned:.4}"
        );
        // The nudged camera did not see the reference's corners.
        assert!(!out.valid.get(0, 0) && !out.valid.get(h - 1, w - 1));
        println!(
            "{w}x{h}: {} inliers of {} matches, worst error {worst:.3} px, mean abs diff {aligned:.4} \
             (unaligned {unaligned:.4})",
            out.inliers, out.matches
        );
    }

    #[test]
    fn recovers_a_camera_nudge_on_a_real_texture() {
        if let Some(gravel) = shared_texture("gravel.png") {
            assert_recovers_nudge(&gravel);
        }
    }

    #[test]
    fn recovers_a_camera_nudge_on_a_procedural_scene() {
        assert_recovers_nudge(&procedural_texture(256, 256, 7));
    }

    #[test]
    fn oriented_descriptors_survive_a_large_rotation() {
        let scene = procedural_texture(192, 192, 13);
        let turn = camera_nudge(192, 192, 30.0, (0.0, 0.0), (0.0, 0.0));
        let (turned, _) = warp_perspective(&scene, &Homography(turn), 192, 192).unwrap();
        let registration = Registration::new(&scene, RegistrationSettings::default()).unwrap();
        let out = registration.register(&turned).unwrap();
        let truth = invert_homography(&turn).unwrap();
        let (ex, ey) = apply_homography(&truth, 60.0, 130.0).unwrap();
        let (rx, ry) = out.homography.apply(60.0, 130.0).unwrap();
        assert!((ex - rx).abs() < 1.0 && (ey - ry).abs() < 1.0, "({rx}, {ry}) instead of ({ex}, {ey})");
    }

    #[test]
    fn keypoint_budget_is_split_over_levels_without_exceeding_it() {
        let budgets = level_budgets(1000, 8, 1.2);
        assert_eq!(budgets.iter().sum::<usize>(), 1000);
        assert!(budgets.windows(2).all(|b| b[0] >= b[1]), "{budgets:?}");
        assert_eq!(level_budgets(4, 8, 1.2).iter().sum::<usize>(), 4);
        let features = detect_orb(&procedural_texture(128, 128, 2), &RegistrationSettings::default());
        assert!(features.keypoints.len() <= 1000 && features.keypoints.len() == features.descriptors.len());
    }

    #[test]
    fn identical_image_registers_to_identity() {
        let scene = procedural_texture(160, 128, 3).to_rgb();
        let registration = Registration::new(&scene, RegistrationSettings::default()).unwrap();
        let out = registration.register(&scene).unwrap();
        let identity = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0];
        for (got, want) in out.homography.0.iter().zip(identity) {
            assert!((got - want).abs() < 1e-6, "{:?}", out.homography);
        }
        assert_eq!(out.inliers, out.matches);
        assert_eq!(out.valid.count(), 160 * 128);
        assert_eq!(out.image.channels, 3);
        let max_diff =
            out.image.data.iter().zip(&scene.data).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(max_diff < 1e-4, "{max_diff}");
    }

    #[test]
    fn registration_is_deterministic_with_the_seed() {
        let scene = procedural_texture(128, 128, 11);
        let (moved, _) = warp_perspective(
            &scene,
            &Homography(camera_nudge(128, 128, -3.0, (4.0, 2.0), (0.0, 0.0))),
            128,
            128,
        )
        .unwrap();
        let registration = Registration::new(&scene, RegistrationSettings::default()).unwrap();
        let (a, b) = (registration.register(&moved).unwrap(), registration.register(&moved).unwrap());
        assert_eq!(a.homography, b.homography);
        assert_eq!(a.image, b.image);
    }

    #[test]
    fn featureless_images_give_clear_errors() {
        let flat = Image::new(96, 96, 1, vec![0.5; 96 * 96]).unwrap();
        let err = Registration::new(&flat, RegistrationSettings::default()).unwrap_err().to_string();
        assert!(err.contains("only 0 ORB keypoints"), "{err}");

        let scene = procedural_texture(96, 96, 5);
        let registration = Registration::new(&scene, RegistrationSettings::default()).unwrap();
        let ramp: Vec<f32> = (0..96 * 96).map(|i| (i % 96) as f32 / 96.0).collect();
        let err = registration.register(&Image::new(96, 96, 1, ramp).unwrap()).unwrap_err().to_string();
        assert!(
            err.contains("could not register the image to the reference: only 0 consistent matches"),
            "{err}"
        );

        let tiny = Image::new(20, 20, 1, vec![0.5; 400]).unwrap();
        let err = registration.register(&tiny).unwrap_err().to_string();
        assert!(err.contains("20x20, too small"), "{err}");
    }

    #[test]
    fn file_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("flat.png");
        image::GrayImage::from_pixel(96, 96, image::Luma([128])).save(&path).unwrap();
        let registration =
            Registration::new(&procedural_texture(96, 96, 5), RegistrationSettings::default()).unwrap();
        let err = registration.register_file(&path).unwrap_err().to_string();
        assert!(err.starts_with(&path.display().to_string()) && err.contains("could not register"), "{err}");
    }

    #[test]
    fn bad_settings_are_rejected() {
        let scene = procedural_texture(96, 96, 5);
        let settings = RegistrationSettings { min_inliers: 3, ..Default::default() };
        let err = Registration::new(&scene, settings).unwrap_err().to_string();
        assert!(err.contains("min_inliers is 3"), "{err}");
        let settings = RegistrationSettings { scale_factor: 1.0, ..Default::default() };
        assert!(Registration::new(&scene, settings).is_err());
    }

    #[test]
    fn dlt_is_exact_on_four_correspondences() {
        let truth = camera_nudge(200, 150, 12.0, (30.0, -17.0), (4e-4, -2e-4));
        let src = [[10.0, 12.0], [180.0, 5.0], [170.0, 140.0], [25.0, 130.0]];
        let dst: Vec<[f64; 2]> = src
            .iter()
            .map(|p| {
                let (x, y) = apply_homography(&truth, p[0], p[1]).unwrap();
                [x, y]
            })
            .collect();
        let h = homography_dlt(&src, &dst).unwrap();
        for (got, want) in h.iter().zip(&truth) {
            assert!((got - want).abs() < 1e-9 * want.abs().max(1.0), "{h:?} vs {truth:?}");
        }
    }

    #[test]
    fn dlt_rejects_collinear_points() {
        let src = [[0.0, 0.0], [1.0, 1.0], [2.0, 2.0], [3.0, 3.0]];
        assert_eq!(homography_dlt(&src, &src), None);
        assert_eq!(homography_dlt(&src[..3], &src[..3]), None);
    }

    #[test]
    fn ransac_ignores_outliers() {
        let truth = camera_nudge(100, 100, 5.0, (3.0, 1.0), (1e-4, 0.0));
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let src: Vec<[f64; 2]> =
            (0..60).map(|_| [rng.gen_range(0.0..100.0), rng.gen_range(0.0..100.0)]).collect();
        let dst: Vec<[f64; 2]> = src
            .iter()
            .enumerate()
            .map(|(i, p)| match i % 3 {
                // A third of the correspondences are wrong matches.
                0 => [rng.gen_range(0.0..100.0), rng.gen_range(0.0..100.0)],
                _ => {
                    let (x, y) = apply_homography(&truth, p[0], p[1]).unwrap();
                    [x, y]
                }
            })
            .collect();
        let fit = ransac_homography(&src, &dst, 500, 1.0, 9).unwrap();
        assert_eq!(fit.inliers, (0..60).filter(|i| i % 3 != 0).collect::<Vec<_>>());
        for (got, want) in fit.homography.0.iter().zip(&truth) {
            assert!((got - want).abs() < 1e-6 * want.abs().max(1.0));
        }
    }

    #[test]
    fn warp_marks_unseen_pixels_invalid() {
        let img = Image::new(4, 3, 1, (0..12).map(|v| v as f32).collect()).unwrap();
        let shift = [1.0, 0.0, 1.5, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0];
        let (out, valid) = warp_perspective(&img, &Homography(shift), 4, 3).unwrap();
        // Output x samples source x - 1.5: columns 0 and 1 were never seen, column 2 interpolates.
        assert_eq!(
            valid.data.iter().map(|&v| v as u8).collect::<Vec<_>>(),
            [0, 0, 1, 1, 0, 0, 1, 1, 0, 0, 1, 1]
        );
        assert_eq!(out.data[2], 0.5);
        assert_eq!(out.data[7], 5.5);
        assert_eq!(out.data[0], 0.0);
        let singular = [1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0];
        assert!(warp_perspective(&img, &Homography(singular), 4, 3).is_err());
    }
}
