//! Fit time on one PIPED class's training images and batch-1 scoring latency, PatchCore and
//! PaDiM with MobileNetV2 (features.6 + features.13) at 256 px, as the anomalib peer's `speed`.
//!
//! cargo run --release -p vigil-bench --example memory_bank_speed -- [--method patchcore|padim]
//!     [--class DIR] [--size 256] [--reps 20] [--reps-fit 1] [--batch B]
//! Run one method per process so the printed peak RSS (VmHWM) is that method's.
//! Threads: RAYON_NUM_THREADS (default: all cores).

use std::time::Instant;

use vigil_bench::{arg, list_images, load_rgb, peak_rss_mb, piped_root};
use vigil_core::{Detector, FitContext, Image, InMemorySource, Result};
use vigil_padim::{PadimDetector, PadimSettings};
use vigil_patchcore::{PatchcoreDetector, PatchcoreSettings};

fn main() -> Result<()> {
    let class = arg("--class").map(Into::into).unwrap_or_else(|| piped_root().join("PA_BDP01_TL"));
    let size: usize = arg("--size").map_or(256, |s| s.parse().expect("--size is a number"));
    let reps: usize = arg("--reps").map_or(20, |s| s.parse().expect("--reps is a number"));
    let reps_fit: usize = arg("--reps-fit").map_or(1, |s| s.parse().expect("--reps-fit is a number"));
    let method = arg("--method").unwrap_or_else(|| "patchcore".into());
    let batch: Option<usize> = arg("--batch").map(|s| s.parse().expect("--batch is a number"));
    let train: Vec<Image> =
        list_images(&class.join("train/good"))?.iter().map(|p| load_rgb(p)).collect::<Result<_>>()?;
    let mut test_paths = Vec::new();
    for sub in ["good", "impurity"] {
        test_paths.extend(list_images(&class.join("test").join(sub))?);
    }
    let test: Vec<Image> = test_paths.iter().take(32).map(|p| load_rgb(p)).collect::<Result<_>>()?;
    let source = InMemorySource::new(train);
    let ctx = FitContext::default();

    let mut fits = Vec::new();
    let mut detector: Option<Box<dyn Detector>> = None;
    for _ in 0..reps_fit {
        let mut d: Box<dyn Detector> = match method.as_str() {
            "patchcore" => Box::new(PatchcoreDetector::new(PatchcoreSettings {
                input_size: size,
                ..Default::default()
            })?),
            "padim" => {
                let mut s = PadimSettings { input_size: size, ..Default::default() };
                s.batch_size = batch.unwrap_or(s.batch_size);
                Box::new(PadimDetector::new(s)?)
            }
            other => panic!("unknown --method {other} (patchcore or padim)"),
        };
        let t0 = Instant::now();
        d.fit(&source, &ctx)?;
        fits.push(t0.elapsed().as_secs_f64());
        detector = Some(d);
    }
    let detector = detector.expect("--reps-fit is at least 1");
    println!("fit_s_median {:.3} (all {fits:.3?})", median(fits.clone()));
    if let Some(rows) = detector.state()?.shape("memory_bank").ok().map(|s| s.to_vec()) {
        println!("memory_bank {rows:?}");
    }
    for _ in 0..3 {
        detector.score(&test[0], None)?;
    }
    let b1: Vec<f64> = (0..reps)
        .map(|_| {
            let t0 = Instant::now();
            detector.score(&test[0], None).map(|_| t0.elapsed().as_secs_f64() * 1000.0)
        })
        .collect::<Result<_>>()?;
    let t0 = Instant::now();
    for img in &test {
        detector.score(img, None)?;
    }
    let per_image = t0.elapsed().as_secs_f64() * 1000.0 / test.len() as f64;
    println!(
        "method {method} class {} size {size} threads {}",
        class.display(),
        rayon::current_num_threads()
    );
    println!("n_train {}", source.images.len());
    println!(
        "infer_b1_ms_median {:.2} (min {:.2}, {reps} reps)",
        median(b1.clone()),
        b1.iter().copied().fold(f64::INFINITY, f64::min)
    );
    println!("sequential_{}_ms_per_image {per_image:.2}", test.len());
    println!("peak_rss_mb {:.0}", peak_rss_mb());
    println!("loadavg {}", std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim());
    Ok(())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}
