//! Memory-bounded fit on a large training set: N augmented crops of the PIPED training images
//! (random square crops of 50-100 % of the side, random flips, resized to 256 px), generated on
//! demand so the set itself takes no memory. Prints the fit time and the peak RSS (VmHWM).
//!
//! cargo run --release -p vigil-bench --example memory_bank_bigmem -- [--method patchcore|padim] [--n 12000]
//!     [--f16]
//! Run one method per process so the printed peak RSS is that method's.

use std::time::Instant;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use vigil_bench::{arg, list_images, load_rgb, peak_rss_mb, piped_root};
use vigil_core::{Detector, FitContext, Image, ImageSource, Result};
use vigil_padim::{PadimDetector, PadimSettings};
use vigil_patchcore::{PatchcoreDetector, PatchcoreSettings};

const SIZE: usize = 256;

/// `len` augmented views of the base images; view `i` is a pure function of (`seed`, `i`).
struct AugmentedCrops {
    bases: Vec<Image>,
    len: usize,
    seed: u64,
}

impl ImageSource for AugmentedCrops {
    fn len(&self) -> usize {
        self.len
    }

    fn name(&self, index: usize) -> String {
        format!("augmented crop #{index}")
    }

    fn load(&self, index: usize) -> Result<Image> {
        let mut rng =
            ChaCha8Rng::seed_from_u64(self.seed ^ (index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let base = &self.bases[rng.gen_range(0..self.bases.len())];
        let short = base.width.min(base.height);
        let side = rng.gen_range(short / 2..=short);
        let (x0, y0) = (rng.gen_range(0..=base.width - side), rng.gen_range(0..=base.height - side));
        let mut crop = base.crop(x0, y0, side, side);
        let (flip_x, flip_y) = (rng.gen_bool(0.5), rng.gen_bool(0.5));
        let src = crop.clone();
        for c in 0..crop.channels {
            for y in 0..side {
                for x in 0..side {
                    let (sx, sy) =
                        (if flip_x { side - 1 - x } else { x }, if flip_y { side - 1 - y } else { y });
                    crop.channel_mut(c)[y * side + x] = src.get(c, sy, sx);
                }
            }
        }
        Ok(crop.resize_bilinear(SIZE, SIZE))
    }
}

fn main() -> Result<()> {
    let n: usize = arg("--n").map_or(12_000, |s| s.parse().expect("--n is a number"));
    let method = arg("--method").unwrap_or_else(|| "patchcore".into());
    let f16_bank = std::env::args().any(|a| a == "--f16");
    let root = piped_root();
    let mut bases = Vec::new();
    let mut classes: Vec<_> = std::fs::read_dir(&root)
        .map_err(|e| vigil_core::VigilError::io(&root, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("train/good").is_dir())
        .collect();
    classes.sort();
    for class in &classes {
        for p in list_images(&class.join("train/good"))? {
            bases.push(load_rgb(&p)?);
        }
    }
    let source = AugmentedCrops { bases, len: n, seed: 1 };
    let ctx = FitContext { seed: 0, checkpoint_dir: None, show_progress: true };
    println!(
        "method {method} n {n} base_images {} size {SIZE} threads {}",
        source.bases.len(),
        rayon::current_num_threads()
    );
    println!("rss_before_fit_mb {:.0}", peak_rss_mb());
    let t0 = Instant::now();
    let detector: Box<dyn Detector> = match method.as_str() {
        "patchcore" => {
            let mut d = PatchcoreDetector::new(PatchcoreSettings { f16_bank, ..Default::default() })?;
            d.fit(&source, &ctx)?;
            println!(
                "memory_bank {} x {} ({})",
                d.bank_rows(),
                d.feature_dim()?,
                if f16_bank { "f16" } else { "f32" }
            );
            Box::new(d)
        }
        "padim" => {
            let mut d = PadimDetector::new(PadimSettings::default())?;
            d.fit(&source, &ctx)?;
            Box::new(d)
        }
        other => panic!("unknown --method {other} (patchcore or padim)"),
    };
    let fit_s = t0.elapsed().as_secs_f64();
    println!("fit_s {fit_s:.1} ({:.1} ms per image)", fit_s * 1000.0 / n as f64);
    let t1 = Instant::now();
    let out = detector.score(&source.load(0)?, None)?;
    println!(
        "score_one_ms {:.1} (image score {:.4})",
        t1.elapsed().as_secs_f64() * 1000.0,
        out.image_score.unwrap_or(f32::NAN)
    );
    println!("peak_rss_mb {:.0}", peak_rss_mb());
    Ok(())
}
