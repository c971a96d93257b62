//! DRAEM's Perlin-noise anomaly masks.

use rand::Rng;

/// Smootherstep fade of Perlin noise: 6t^5 - 15t^4 + 10t^3.
fn fade(t: f32) -> f32 {
    t * t * t * (t * (t * 6.0 - 15.0) + 10.0)
}

/// 2-D gradient noise on a `res_y` x `res_x` lattice over a `height` x `width` image, as
/// DRAEM's `rand_perlin_2d_np` (random unit gradients per lattice node, smootherstep
/// interpolation, scaled by sqrt 2 so values span about [-1, 1]). Any image size works: lattice
/// coordinates are continuous rather than whole pixels per cell.
pub fn perlin_noise(width: usize, height: usize, res_x: usize, res_y: usize, rng: &mut impl Rng) -> Vec<f32> {
    let res_x = res_x.max(1);
    let res_y = res_y.max(1);
    let gradients: Vec<(f32, f32)> = (0..(res_y + 1) * (res_x + 1))
        .map(|_| {
            let angle = rng.gen::<f32>() * std::f32::consts::TAU;
            (angle.cos(), angle.sin())
        })
        .collect();
    let grad = |gy: usize, gx: usize| gradients[gy * (res_x + 1) + gx];
    let mut out = Vec::with_capacity(width * height);
    for y in 0..height {
        let fy = y as f32 * res_y as f32 / height as f32;
        let cy = (fy.floor() as usize).min(res_y - 1);
        let ty = fy - cy as f32;
        for x in 0..width {
            let fx = x as f32 * res_x as f32 / width as f32;
            let cx = (fx.floor() as usize).min(res_x - 1);
            let tx = fx - cx as f32;
            let dot = |gy: usize, gx: usize, dy: f32, dx: f32| {
                let (gcx, gcy) = grad(gy, gx);
                gcx * dx + gcy * dy
            };
            let n00 = dot(cy, cx, ty, tx);
            let n01 = dot(cy, cx + 1, ty, tx - 1.0);
            let n10 = dot(cy + 1, cx, ty - 1.0, tx);
            let n11 = dot(cy + 1, cx + 1, ty - 1.0, tx - 1.0);
            let (ux, uy) = (fade(tx), fade(ty));
            let top = n00 + ux * (n01 - n00);
            let bottom = n10 + ux * (n11 - n10);
            out.push(std::f32::consts::SQRT_2 * (top + uy * (bottom - top)));
        }
    }
    out
}

/// Rotate a plane by `degrees` about its centre (bilinear; outside samples become `fill`).
pub fn rotate_plane(src: &[f32], width: usize, height: usize, degrees: f32, fill: f32) -> Vec<f32> {
    let (s, c) = degrees.to_radians().sin_cos();
    let (cx, cy) = ((width as f32 - 1.0) / 2.0, (height as f32 - 1.0) / 2.0);
    let mut out = vec![fill; width * height];
    for y in 0..height {
        for x in 0..width {
            // Inverse mapping: where in the source does this output pixel come from.
            let (dx, dy) = (x as f32 - cx, y as f32 - cy);
            let sx = c * dx + s * dy + cx;
            let sy = -s * dx + c * dy + cy;
            // A small tolerance keeps border pixels that rounding pushes just outside.
            const EPS: f32 = 1e-3;
            if sx < -EPS || sy < -EPS || sx > (width - 1) as f32 + EPS || sy > (height - 1) as f32 + EPS {
                continue;
            }
            let (sx, sy) = (sx.clamp(0.0, (width - 1) as f32), sy.clamp(0.0, (height - 1) as f32));
            let (x0, y0) = (sx.floor() as usize, sy.floor() as usize);
            let (x1, y1) = ((x0 + 1).min(width - 1), (y0 + 1).min(height - 1));
            let (fx, fy) = (sx - x0 as f32, sy - y0 as f32);
            let at = |yy: usize, xx: usize| src[yy * width + xx];
            let top = at(y0, x0) + fx * (at(y0, x1) - at(y0, x0));
            let bottom = at(y1, x0) + fx * (at(y1, x1) - at(y1, x0));
            out[y * width + x] = top + fy * (bottom - top);
        }
    }
    out
}

/// Parameters of the Perlin mask (DRAEM's values by default).
#[derive(Clone, Debug, PartialEq)]
pub struct PerlinMaskConfig {
    /// Lattice resolution per axis is 2^k with k drawn from [0, max_scale_exp).
    pub max_scale_exp: u32,
    pub threshold: f32,
    /// Rotation drawn from [-max_rotation, max_rotation] degrees.
    pub max_rotation: f32,
}

impl Default for PerlinMaskConfig {
    fn default() -> Self {
        PerlinMaskConfig { max_scale_exp: 6, threshold: 0.5, max_rotation: 90.0 }
    }
}

/// A binary mask (1.0 = anomalous) from thresholded, rotated Perlin noise. The lattice never
/// gets finer than one cell per pixel, so small images still get a valid mask.
pub fn perlin_mask(width: usize, height: usize, config: &PerlinMaskConfig, rng: &mut impl Rng) -> Vec<f32> {
    let res_x = (1usize << rng.gen_range(0..config.max_scale_exp.max(1))).min(width);
    let res_y = (1usize << rng.gen_range(0..config.max_scale_exp.max(1))).min(height);
    let noise = perlin_noise(width, height, res_x, res_y, rng);
    let angle = rng.gen_range(-config.max_rotation..=config.max_rotation);
    let rotated = rotate_plane(&noise, width, height, angle, 0.0);
    rotated.into_iter().map(|v| if v > config.threshold { 1.0 } else { 0.0 }).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn noise_is_zero_on_lattice_nodes_and_bounded() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let n = perlin_noise(64, 64, 4, 8, &mut rng);
        // Gradient noise vanishes at lattice nodes (every 16 px in x, 8 px in y).
        for gy in 0..8 {
            for gx in 0..4 {
                assert!(n[(gy * 8) * 64 + gx * 16].abs() < 1e-6);
            }
        }
        assert!(n.iter().all(|v| v.abs() <= 1.0 + 1e-4));
        let var = n.iter().map(|v| v * v).sum::<f32>() / n.len() as f32;
        assert!(var > 0.01, "noise too flat: {var}");
    }

    #[test]
    fn mask_statistics_over_many_draws() {
        let config = PerlinMaskConfig::default();
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let mut fractions = Vec::new();
        for _ in 0..200 {
            let m = perlin_mask(64, 64, &config, &mut rng);
            assert!(m.iter().all(|&v| v == 0.0 || v == 1.0));
            fractions.push(m.iter().sum::<f32>() / m.len() as f32);
        }
        let mean = fractions.iter().sum::<f32>() / fractions.len() as f32;
        // Thresholding noise in about [-1, 1] at 0.5 keeps a minority of pixels: some masks are
        // empty, none is full, and on average a few to ~15 % are anomalous.
        assert!(mean > 0.02 && mean < 0.2, "mean anomalous fraction {mean}");
        assert!(fractions.iter().all(|&f| f < 0.6));
        assert!(fractions.iter().filter(|&&f| f > 0.0).count() > 100);
    }

    #[test]
    fn rotation_by_zero_is_identity_and_by_180_flips() {
        let src: Vec<f32> = (0..12).map(|v| v as f32).collect();
        assert_eq!(rotate_plane(&src, 4, 3, 0.0, -1.0), src);
        let r = rotate_plane(&src, 4, 3, 180.0, -1.0);
        let flipped: Vec<f32> = src.iter().rev().cloned().collect();
        assert!(r.iter().zip(&flipped).all(|(a, b)| (a - b).abs() < 1e-4), "{r:?}");
    }
}
