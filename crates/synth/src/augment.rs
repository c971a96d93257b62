//! DRAEM's augmentation pool for anomaly sources (its imgaug list, re-implemented on [0, 1]
//! planar images): three distinct operations are drawn per sample.

use rand::seq::SliceRandom;
use rand::Rng;
use vigil_core::Image;

use crate::perlin::rotate_plane;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Augmentation {
    /// x^g per channel, g in [0.5, 2].
    Gamma,
    /// x * m + a, m in [0.8, 1.2], a in [-30, 30] / 255.
    Brightness,
    /// PIL's EnhanceSharpness with factor in [0, 2].
    Sharpness,
    /// Hue shift up to 50/255 of the colour circle, saturation change up to 50/255.
    HueSaturation,
    /// With probability 1/2, invert values above a threshold in [32, 128] / 255.
    Solarize,
    /// Keep 1..=8 bits per channel.
    Posterize,
    Invert,
    /// Stretch each channel to [0, 1], cutting up to 20 % of the histogram.
    Autocontrast,
    /// Per-channel histogram equalisation (256 bins).
    Equalize,
    /// Rotation by up to 45 degrees, uncovered corners black.
    Rotate,
}

pub const POOL: [Augmentation; 10] = [
    Augmentation::Gamma,
    Augmentation::Brightness,
    Augmentation::Sharpness,
    Augmentation::HueSaturation,
    Augmentation::Solarize,
    Augmentation::Posterize,
    Augmentation::Invert,
    Augmentation::Autocontrast,
    Augmentation::Equalize,
    Augmentation::Rotate,
];

/// Apply `count` distinct augmentations drawn from [`POOL`], in the drawn order.
pub fn random_augment(image: &mut Image, count: usize, rng: &mut impl Rng) -> Vec<Augmentation> {
    let chosen: Vec<Augmentation> = POOL.choose_multiple(rng, count.min(POOL.len())).cloned().collect();
    for &a in &chosen {
        apply(image, a, rng);
    }
    chosen
}

fn map_all(image: &mut Image, f: impl Fn(f32) -> f32) {
    for v in image.data.iter_mut() {
        *v = f(*v).clamp(0.0, 1.0);
    }
}

pub fn apply(image: &mut Image, aug: Augmentation, rng: &mut impl Rng) {
    let (w, h) = (image.width, image.height);
    match aug {
        Augmentation::Gamma => {
            for c in 0..image.channels {
                let g: f32 = rng.gen_range(0.5..=2.0);
                for v in image.channel_mut(c) {
                    *v = v.max(0.0).powf(g);
                }
            }
        }
        Augmentation::Brightness => {
            let m: f32 = rng.gen_range(0.8..=1.2);
            let a: f32 = rng.gen_range(-30.0..=30.0) / 255.0;
            map_all(image, |v| v * m + a);
        }
        Augmentation::Sharpness => {
            let factor: f32 = rng.gen_range(0.0..=2.0);
            for c in 0..image.channels {
                let src = image.channel(c).to_vec();
                let dst = image.channel_mut(c);
                // PIL's SMOOTH kernel [[1,1,1],[1,5,1],[1,1,1]]/13 on the interior; borders kept.
                for y in 1..h.saturating_sub(1) {
                    for x in 1..w.saturating_sub(1) {
                        let mut s = 4.0 * src[y * w + x];
                        for dy in 0..3 {
                            for dx in 0..3 {
                                s += src[(y + dy - 1) * w + (x + dx - 1)];
                            }
                        }
                        let smooth = s / 13.0;
                        dst[y * w + x] = (smooth + factor * (src[y * w + x] - smooth)).clamp(0.0, 1.0);
                    }
                }
            }
        }
        Augmentation::HueSaturation => {
            if image.channels == 3 {
                let dh: f32 = rng.gen_range(-50.0..=50.0) / 255.0;
                let ds: f32 = rng.gen_range(-50.0..=50.0) / 255.0;
                hue_saturation(image, dh, ds);
            }
        }
        Augmentation::Solarize => {
            if rng.gen_bool(0.5) {
                let t: f32 = rng.gen_range(32.0..=128.0) / 255.0;
                map_all(image, |v| if v >= t { 1.0 - v } else { v });
            }
        }
        Augmentation::Posterize => {
            let bits: u32 = rng.gen_range(1..=8);
            let mask = !((1u32 << (8 - bits)) - 1) & 0xff;
            map_all(image, |v| (((v * 255.0).round() as u32) & mask) as f32 / 255.0);
        }
        Augmentation::Invert => map_all(image, |v| 1.0 - v),
        Augmentation::Autocontrast => {
            let cutoff: f32 = rng.gen_range(0.0..0.2);
            for c in 0..image.channels {
                let plane = image.channel_mut(c);
                let mut sorted = plane.to_vec();
                sorted.sort_by(f32::total_cmp);
                let n = sorted.len();
                let lo = sorted[((n as f32 * cutoff / 2.0) as usize).min(n - 1)];
                let hi = sorted[((n as f32 * (1.0 - cutoff / 2.0)) as usize).min(n - 1)];
                if hi > lo {
                    for v in plane.iter_mut() {
                        *v = ((*v - lo) / (hi - lo)).clamp(0.0, 1.0);
                    }
                }
            }
        }
        Augmentation::Equalize => {
            for c in 0..image.channels {
                let plane = image.channel_mut(c);
                let bins: Vec<usize> =
                    plane.iter().map(|v| (v.clamp(0.0, 1.0) * 255.0).round() as usize).collect();
                let mut hist = [0usize; 256];
                for &b in &bins {
                    hist[b] += 1;
                }
                let mut cdf = [0usize; 256];
                let mut acc = 0;
                for (i, count) in hist.iter().enumerate() {
                    acc += count;
                    cdf[i] = acc;
                }
                let n = bins.len();
                let cdf_min = cdf.iter().copied().find(|&v| v > 0).unwrap_or(0);
                if n > cdf_min {
                    for (v, &b) in plane.iter_mut().zip(&bins) {
                        *v = (cdf[b] - cdf_min) as f32 / (n - cdf_min) as f32;
                    }
                }
            }
        }
        Augmentation::Rotate => {
            let angle: f32 = rng.gen_range(-45.0..=45.0);
            for c in 0..image.channels {
                let rotated = rotate_plane(image.channel(c), w, h, angle, 0.0);
                image.channel_mut(c).copy_from_slice(&rotated);
            }
        }
    }
}

/// Shift hue by `dh` turns and add `ds` to saturation (HSV), per pixel.
fn hue_saturation(image: &mut Image, dh: f32, ds: f32) {
    let n = image.plane_len();
    for i in 0..n {
        let (r, g, b) = (image.data[i], image.data[n + i], image.data[2 * n + i]);
        let max = r.max(g).max(b);
        let min = r.min(g).min(b);
        let delta = max - min;
        let mut hue = if delta <= 0.0 {
            0.0
        } else if max == r {
            ((g - b) / delta).rem_euclid(6.0) / 6.0
        } else if max == g {
            ((b - r) / delta + 2.0) / 6.0
        } else {
            ((r - g) / delta + 4.0) / 6.0
        };
        let sat = if max > 0.0 { delta / max } else { 0.0 };
        hue = (hue + dh).rem_euclid(1.0);
        let sat = (sat + ds).clamp(0.0, 1.0);
        let (r2, g2, b2) = hsv_to_rgb(hue, sat, max);
        image.data[i] = r2;
        image.data[n + i] = g2;
        image.data[2 * n + i] = b2;
    }
}

fn hsv_to_rgb(h: f32, s: f32, v: f32) -> (f32, f32, f32) {
    let h6 = h * 6.0;
    let sector = (h6.floor() as i32).rem_euclid(6);
    let f = h6 - h6.floor();
    let p = v * (1.0 - s);
    let q = v * (1.0 - s * f);
    let t = v * (1.0 - s * (1.0 - f));
    match sector {
        0 => (v, t, p),
        1 => (q, v, p),
        2 => (p, v, t),
        3 => (p, q, v),
        4 => (t, p, v),
        _ => (v, p, q),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    fn gradient_image() -> Image {
        let (w, h) = (16, 16);
        let data = (0..3 * w * h).map(|i| ((i * 7) % 256) as f32 / 255.0).collect();
        Image::new(w, h, 3, data).unwrap()
    }

    #[test]
    fn every_augmentation_keeps_range_and_shape() {
        for aug in POOL {
            let mut rng = ChaCha8Rng::seed_from_u64(5);
            let mut img = gradient_image();
            apply(&mut img, aug, &mut rng);
            assert_eq!(img.data.len(), 3 * 16 * 16);
            assert!(img.data.iter().all(|v| (0.0..=1.0).contains(v)), "{aug:?} left [0, 1]");
        }
    }

    #[test]
    fn invert_and_equalize_and_hue_round_trip() {
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let orig = gradient_image();
        let mut img = orig.clone();
        apply(&mut img, Augmentation::Invert, &mut rng);
        assert!(img.data.iter().zip(&orig.data).all(|(a, b)| (a + b - 1.0).abs() < 1e-6));
        // Equalisation spreads values over [0, 1].
        let mut eq = orig.clone();
        apply(&mut eq, Augmentation::Equalize, &mut rng);
        let max = eq.channel(0).iter().cloned().fold(0.0, f32::max);
        assert!((max - 1.0).abs() < 1e-6);
        // A zero hue/saturation change leaves colours as they were.
        let mut hs = orig.clone();
        hue_saturation(&mut hs, 0.0, 0.0);
        assert!(hs.data.iter().zip(&orig.data).all(|(a, b)| (a - b).abs() < 1e-5));
    }

    #[test]
    fn three_distinct_operations_per_draw() {
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        for _ in 0..20 {
            let mut img = gradient_image();
            let chosen = random_augment(&mut img, 3, &mut rng);
            assert_eq!(chosen.len(), 3);
            assert!(chosen[0] != chosen[1] && chosen[1] != chosen[2] && chosen[0] != chosen[2]);
        }
    }
}
