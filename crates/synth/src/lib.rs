//! Synthetic anomalies for training, as DRAEM makes them: a Perlin-noise mask cut from an
//! augmented anomaly source (texture photos, the training image itself or procedural textures)
//! blended into a normal image; plus the line-clearance paper's bright rectangular cutouts.
//!
//! Every sample is a pure function of (seed, index), so a training run can regenerate exactly
//! the batch of any step, which is what makes resuming from a checkpoint exact.

pub mod augment;
pub mod perlin;

use std::path::{Path, PathBuf};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use vigil_core::{Image, Result, VigilError};

pub use augment::{random_augment, Augmentation};
pub use perlin::{perlin_mask, perlin_noise, PerlinMaskConfig};

/// Where the anomalous content comes from.
#[derive(Clone, Debug, PartialEq)]
pub enum AnomalySource {
    /// Texture photos (DRAEM uses DTD); one drawn per sample.
    Textures(Vec<PathBuf>),
    /// The normal image itself, augmented: anomalies that look like misplaced product.
    SelfImage,
    /// Generated textures (coloured noise, stripes, checkers) when no folder is given.
    Procedural,
}

impl AnomalySource {
    /// Every .jpg/.jpeg/.png/.bmp/.tif(f) under `dir` (recursively), sorted so the draw order
    /// does not depend on the file system.
    pub fn from_folder(dir: &Path) -> Result<Self> {
        fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
            for entry in std::fs::read_dir(dir).map_err(|e| VigilError::io(dir, e))? {
                let path = entry.map_err(|e| VigilError::io(dir, e))?.path();
                if path.is_dir() {
                    walk(&path, out)?;
                } else if path.extension().and_then(|e| e.to_str()).is_some_and(|e| {
                    matches!(e.to_ascii_lowercase().as_str(), "jpg" | "jpeg" | "png" | "bmp" | "tif" | "tiff")
                }) {
                    out.push(path);
                }
            }
            Ok(())
        }
        let mut files = Vec::new();
        walk(dir, &mut files)?;
        if files.is_empty() {
            return Err(VigilError::file(dir, "holds no texture images (.jpg, .png, .bmp, .tif)"));
        }
        files.sort();
        Ok(AnomalySource::Textures(files))
    }
}

/// Load an image file as RGB, resized to `width` x `height`.
pub fn load_rgb(path: &Path, width: usize, height: usize) -> Result<Image> {
    let decoded =
        image::open(path).map_err(|e| VigilError::file(path, format!("cannot decode image: {e}")))?;
    let rgb = decoded.to_rgb32f();
    let (w, h) = (rgb.width() as usize, rgb.height() as usize);
    let mut data = vec![0.0f32; 3 * w * h];
    for (i, px) in rgb.pixels().enumerate() {
        for c in 0..3 {
            data[c * w * h + i] = px.0[c].clamp(0.0, 1.0);
        }
    }
    let img = Image::new(w, h, 3, data).map_err(|e| VigilError::file(path, e.to_string()))?;
    Ok(if (w, h) == (width, height) { img } else { img.resize_bilinear(width, height) })
}

#[derive(Clone, Debug, PartialEq)]
pub struct SynthConfig {
    /// Share of samples that get an anomaly (DRAEM: 0.5; the rest stay normal).
    pub anomaly_probability: f64,
    /// Share of the anomalous samples made by the cutout path instead of Perlin blending.
    pub cutout_probability: f64,
    /// Opacity of the anomaly source, drawn uniformly from this range.
    pub beta_range: (f32, f32),
    /// Augmentations applied to each anomaly source.
    pub augmentations: usize,
    pub mask: PerlinMaskConfig,
}

impl Default for SynthConfig {
    fn default() -> Self {
        SynthConfig {
            anomaly_probability: 0.5,
            cutout_probability: 0.0,
            beta_range: (0.1, 1.0),
            augmentations: 3,
            mask: PerlinMaskConfig::default(),
        }
    }
}

/// One training sample: the (possibly) corrupted image and its ground-truth mask.
#[derive(Clone, Debug, PartialEq)]
pub struct SyntheticSample {
    pub image: Image,
    /// Row-major, 1.0 where the image was altered.
    pub mask: Vec<f32>,
    pub has_anomaly: bool,
}

/// I*(1-M) + (1-beta)*I*M + beta*A*M, per channel (M is one plane shared by all channels).
pub fn blend(image: &Image, source: &Image, mask: &[f32], beta: f32) -> Image {
    let mut out = image.clone();
    let n = image.plane_len();
    for c in 0..image.channels {
        let (i_plane, a_plane) = (image.channel(c), source.channel(c.min(source.channels - 1)));
        for (p, o) in out.channel_mut(c).iter_mut().enumerate() {
            let (i, a, m) = (i_plane[p], a_plane[p], mask[p % n]);
            *o = i * (1.0 - m) + (1.0 - beta) * i * m + beta * a * m;
        }
    }
    out
}

pub struct Synthesizer {
    pub config: SynthConfig,
    pub source: AnomalySource,
}

impl Synthesizer {
    pub fn new(config: SynthConfig, source: AnomalySource) -> Self {
        Synthesizer { config, source }
    }

    /// The RNG of sample `index` under `seed`: one ChaCha stream per index.
    pub fn rng(seed: u64, index: u64) -> ChaCha8Rng {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(index);
        rng
    }

    /// Corrupt `image` (or leave it normal) as sample `index` of the run seeded `seed`.
    pub fn sample(&self, image: &Image, seed: u64, index: u64) -> Result<SyntheticSample> {
        let mut rng = Self::rng(seed, index);
        let (w, h) = (image.width, image.height);
        if !rng.gen_bool(self.config.anomaly_probability.clamp(0.0, 1.0)) {
            return Ok(SyntheticSample { image: image.clone(), mask: vec![0.0; w * h], has_anomaly: false });
        }
        if rng.gen_bool(self.config.cutout_probability.clamp(0.0, 1.0)) {
            let (out, mask) = cutout(image, &mut rng);
            return Ok(SyntheticSample { image: out, mask, has_anomaly: true });
        }
        let mask = perlin_mask(w, h, &self.config.mask, &mut rng);
        let mut source = match &self.source {
            AnomalySource::Textures(files) => load_rgb(&files[rng.gen_range(0..files.len())], w, h)?,
            AnomalySource::SelfImage => image.to_rgb(),
            AnomalySource::Procedural => procedural_texture(w, h, &mut rng),
        };
        random_augment(&mut source, self.config.augmentations, &mut rng);
        let (lo, hi) = self.config.beta_range;
        let beta = if hi > lo { rng.gen_range(lo..=hi) } else { lo };
        let out = blend(image, &source, &mask, beta);
        let has_anomaly = mask.iter().any(|&m| m > 0.0);
        Ok(SyntheticSample { image: out, mask, has_anomaly })
    }
}

/// The line-clearance paper's cutout: a bright, nearly white rectangle whose sides are 5-30 %
/// of the image's, at a random position.
pub fn cutout(image: &Image, rng: &mut impl Rng) -> (Image, Vec<f32>) {
    let (w, h) = (image.width, image.height);
    let rw = ((w as f32 * rng.gen_range(0.05..=0.3)).round() as usize).clamp(1, w);
    let rh = ((h as f32 * rng.gen_range(0.05..=0.3)).round() as usize).clamp(1, h);
    let x0 = rng.gen_range(0..=w - rw);
    let y0 = rng.gen_range(0..=h - rh);
    let level: f32 = rng.gen_range(0.85..=1.0);
    let mut out = image.clone();
    let mut mask = vec![0.0; w * h];
    for c in 0..image.channels {
        let plane = out.channel_mut(c);
        for y in y0..y0 + rh {
            for x in x0..x0 + rw {
                plane[y * w + x] = level;
                mask[y * w + x] = 1.0;
            }
        }
    }
    (out, mask)
}

/// A random RGB texture: coloured Perlin noise, oriented stripes or a checkerboard between two
/// random colours.
pub fn procedural_texture(width: usize, height: usize, rng: &mut impl Rng) -> Image {
    let c0: [f32; 3] = [rng.gen(), rng.gen(), rng.gen()];
    let c1: [f32; 3] = [rng.gen(), rng.gen(), rng.gen()];
    let field: Vec<f32> = match rng.gen_range(0..3) {
        0 => {
            let res = 1usize << rng.gen_range(1..6);
            perlin_noise(width, height, res.min(width), res.min(height), rng)
                .into_iter()
                .map(|v| (v * 0.5 + 0.5).clamp(0.0, 1.0))
                .collect()
        }
        1 => {
            let period = rng.gen_range(3.0..(width.max(height) as f32 / 2.0).max(4.0));
            let theta: f32 = rng.gen_range(0.0..std::f32::consts::PI);
            let (s, c) = theta.sin_cos();
            (0..width * height)
                .map(|i| {
                    let (x, y) = ((i % width) as f32, (i / width) as f32);
                    0.5 + 0.5 * (std::f32::consts::TAU * (x * c + y * s) / period).sin()
                })
                .collect()
        }
        _ => {
            let cell = rng.gen_range(2..(width.max(height) / 4).max(3));
            (0..width * height).map(|i| (((i % width) / cell + (i / width) / cell) % 2) as f32).collect()
        }
    };
    let mut data = Vec::with_capacity(3 * width * height);
    for ch in 0..3 {
        data.extend(field.iter().map(|&t| c0[ch] + t * (c1[ch] - c0[ch])));
    }
    Image::new(width, height, 3, data).expect("sizes match")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flat(w: usize, h: usize, v: f32) -> Image {
        Image::new(w, h, 3, vec![v; 3 * w * h]).unwrap()
    }

    #[test]
    fn blend_formula_exactly() {
        let i = Image::new(2, 1, 3, vec![0.2, 0.4, 0.6, 0.8, 1.0, 0.0]).unwrap();
        let a = Image::new(2, 1, 3, vec![1.0, 0.0, 0.5, 0.5, 0.25, 0.75]).unwrap();
        let mask = vec![0.0, 1.0];
        let out = blend(&i, &a, &mask, 0.3);
        // Unmasked pixel unchanged; masked pixel = 0.7*I + 0.3*A.
        let expected = [0.2, 0.7 * 0.4 + 0.3 * 0.0, 0.6, 0.7 * 0.8 + 0.3 * 0.5, 1.0, 0.7 * 0.0 + 0.3 * 0.75];
        for (o, e) in out.data.iter().zip(expected) {
            assert!((o - e).abs() < 1e-7, "{o} vs {e}");
        }
    }

    #[test]
    fn samples_are_a_pure_function_of_seed_and_index() {
        let synth = Synthesizer::new(SynthConfig::default(), AnomalySource::Procedural);
        let img = flat(32, 32, 0.5);
        let a = synth.sample(&img, 11, 4).unwrap();
        let b = synth.sample(&img, 11, 4).unwrap();
        assert_eq!(a, b);
        let others: Vec<_> = (0..8).map(|k| synth.sample(&img, 11, 100 + k).unwrap()).collect();
        assert!(others.iter().any(|s| s.image != a.image));
    }

    #[test]
    fn about_half_the_samples_stay_normal_and_masks_mark_changes() {
        let synth = Synthesizer::new(SynthConfig::default(), AnomalySource::Procedural);
        let img = flat(32, 32, 0.5);
        let mut normal = 0;
        for k in 0..200 {
            let s = synth.sample(&img, 1, k).unwrap();
            if s.mask.iter().all(|&m| m == 0.0) {
                normal += 1;
                assert_eq!(s.image, img);
            } else {
                // Outside the mask the image is untouched.
                for c in 0..3 {
                    for (p, &m) in s.mask.iter().enumerate() {
                        if m == 0.0 {
                            assert_eq!(s.image.channel(c)[p], 0.5);
                        }
                    }
                }
            }
        }
        // 100 of 200 are left normal by design, plus the anomalous draws whose mask came out empty.
        assert!((90..=150).contains(&normal), "{normal} normal samples");
    }

    #[test]
    fn cutout_is_a_bright_rectangle_of_plausible_size() {
        let config = SynthConfig { anomaly_probability: 1.0, cutout_probability: 1.0, ..Default::default() };
        let synth = Synthesizer::new(config, AnomalySource::Procedural);
        let img = flat(40, 40, 0.2);
        for k in 0..20 {
            let s = synth.sample(&img, 2, k).unwrap();
            let xs: Vec<usize> = (0..1600).filter(|p| s.mask[*p] == 1.0).collect();
            let (minx, maxx) =
                (xs.iter().map(|p| p % 40).min().unwrap(), xs.iter().map(|p| p % 40).max().unwrap());
            let (miny, maxy) =
                (xs.iter().map(|p| p / 40).min().unwrap(), xs.iter().map(|p| p / 40).max().unwrap());
            assert_eq!(xs.len(), (maxx - minx + 1) * (maxy - miny + 1), "not a rectangle");
            assert!((2..=12).contains(&(maxx - minx + 1)) && (2..=12).contains(&(maxy - miny + 1)));
            assert!(xs.iter().all(|&p| s.image.channel(0)[p] >= 0.85));
        }
    }

    #[test]
    fn texture_folder_source() {
        let Some(dir) = vigil_core::shared_data::shared_path("data/textures/dtd") else { return };
        let source = AnomalySource::from_folder(&dir).unwrap();
        let AnomalySource::Textures(files) = &source else { panic!() };
        assert!(files.len() >= 10);
        let config = SynthConfig { anomaly_probability: 1.0, ..Default::default() };
        let synth = Synthesizer::new(config, source);
        let img = flat(48, 48, 0.5);
        let changed = (0..6).filter(|&k| synth.sample(&img, 3, k).unwrap().image != img).count();
        assert!(changed >= 3);
        let empty = tempfile::tempdir().unwrap();
        let err = AnomalySource::from_folder(empty.path()).unwrap_err();
        assert!(err.to_string().contains("no texture images"));
        assert!(load_rgb(&empty.path().join("missing.jpg"), 8, 8).is_err());
    }
}
