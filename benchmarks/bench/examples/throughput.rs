//! End-to-end throughput (issue #9): the data and the method's own scoring time that
//! `benchmarks/throughput/run.sh` compares with the wall time of `vigil test` and `vigil predict`.
//!
//! cargo run --release -p vigil-bench --example throughput -- make-data --out DIR [--n 40] [--train 20] [--texture FILE]
//!     An MVTec-style class of 800x600 (width x height) PNG images cut from a texture (default: DTD braided_0002 of ../shared) with
//!     per-image shifts, brightness and noise: `train/good` (--train images), and --n test images,
//!     half `test/good`, half `test/defect` with a dark blob and its `ground_truth/defect/*_mask.png`.
//!     Deterministic (seed 7).
//! cargo run --release -p vigil-bench --example throughput -- score-time --model FILE --data DIR [--warmup 3]
//!     Loads the model and times `Model::score` over every test image (decoded beforehand, after
//!     warm-up): the method's own scoring time per image, pipeline included, no decoding or writing.
//! cargo run --release -p vigil-bench --example throughput -- stage-time --model FILE --data DIR
//!     Times each per-image step of `vigil test` / `vigil predict` one after the other on the test
//!     images (decoding, scoring, the overlay PNG, the map TIFF, the mask PNG, the report's pictures):
//!     where the time beyond scoring goes. Files are encoded, not written.
//! Threads: RAYON_NUM_THREADS (default: all cores).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use vigil_bench::arg;
use vigil_engine::model::LoadOptions;
use vigil_engine::Model;

const WIDTH: u32 = 800;
const HEIGHT: u32 = 600;

fn main() -> Result<()> {
    match std::env::args().nth(1).as_deref() {
        Some("make-data") => make_data(),
        Some("score-time") => score_time(),
        Some("stage-time") => stage_time(),
        _ => bail!(
            "usage: throughput make-data --out DIR [--n 40] [--train 20] | score-time --model FILE --data DIR \
             | stage-time --model FILE --data DIR"
        ),
    }
}

fn number(name: &str, default: usize) -> Result<usize> {
    arg(name).map_or(Ok(default), |s| s.parse().with_context(|| format!("{name} is a number, got '{s}'")))
}

fn make_data() -> Result<()> {
    let out = PathBuf::from(arg("--out").context("--out DIR is required")?);
    let n_test = number("--n", 40)?;
    let n_train = number("--train", 20)?;
    let texture_path = arg("--texture").map(PathBuf::from).unwrap_or_else(|| {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../../shared/data/textures/dtd/braided/braided_0002.jpg")
    });
    let texture = image::open(&texture_path).with_context(|| texture_path.display().to_string())?.to_rgb8();
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    for dir in ["train/good", "test/good", "test/defect", "ground_truth/defect"] {
        std::fs::create_dir_all(out.join(dir))?;
    }
    let draw = |rng: &mut ChaCha8Rng| {
        let (dx, dy) = (rng.gen_range(0..texture.width()), rng.gen_range(0..texture.height()));
        let gain: f32 = rng.gen_range(0.9..1.1);
        image::RgbImage::from_fn(WIDTH, HEIGHT, |x, y| {
            let p = texture.get_pixel((x + dx) % texture.width(), (y + dy) % texture.height());
            let noise: f32 = rng.gen_range(-6.0..6.0);
            image::Rgb(p.0.map(|v| (v as f32 * gain + noise).clamp(0.0, 255.0) as u8))
        })
    };
    for i in 0..n_train {
        draw(&mut rng).save(out.join(format!("train/good/{i:03}.png")))?;
    }
    for i in 0..n_test {
        let mut img = draw(&mut rng);
        if i % 2 == 0 {
            img.save(out.join(format!("test/good/{i:03}.png")))?;
            continue;
        }
        let (cx, cy, r) =
            (rng.gen_range(100..700) as f32, rng.gen_range(100..500) as f32, rng.gen_range(15.0..60.0));
        let inside = |x: u32, y: u32| (x as f32 - cx).powi(2) + (y as f32 - cy).powi(2) < r * r;
        let mask = image::GrayImage::from_fn(WIDTH, HEIGHT, |x, y| {
            image::Luma([if inside(x, y) { 255 } else { 0 }])
        });
        for (x, y, p) in img.enumerate_pixels_mut() {
            if inside(x, y) {
                p.0 = p.0.map(|v| v / 4);
            }
        }
        img.save(out.join(format!("test/defect/{i:03}.png")))?;
        mask.save(out.join(format!("ground_truth/defect/{i:03}_mask.png")))?;
    }
    println!("{n_train} training and {n_test} test images of {WIDTH}x{HEIGHT} in {}", out.display());
    Ok(())
}

fn score_time() -> Result<()> {
    let model_path = PathBuf::from(arg("--model").context("--model FILE is required")?);
    let data = PathBuf::from(arg("--data").context("--data DIR is required")?);
    let warmup = number("--warmup", 3)?;
    let model = Model::load(&model_path, &LoadOptions::default())?;
    let mut images = Vec::new();
    for kind in ["good", "defect"] {
        for path in vigil_data::io::list_images(&data.join("test").join(kind))? {
            images.push((vigil_data::io::load_image(&path)?, path.display().to_string()));
        }
    }
    for (image, name) in images.iter().cycle().take(warmup) {
        model.score(image, name)?;
    }
    let start = Instant::now();
    for (image, name) in &images {
        model.score(image, name)?;
    }
    let ms = start.elapsed().as_secs_f64() * 1000.0 / images.len() as f64;
    println!(
        "score_ms_per_image {ms:.2} ({} images, {} threads)",
        images.len(),
        rayon::current_num_threads()
    );
    Ok(())
}

fn stage_time() -> Result<()> {
    let model_path = PathBuf::from(arg("--model").context("--model FILE is required")?);
    let data = PathBuf::from(arg("--data").context("--data DIR is required")?);
    let model = Model::load(&model_path, &LoadOptions::default())?;
    let mut paths = Vec::new();
    for kind in ["good", "defect"] {
        paths.extend(vigil_data::io::list_images(&data.join("test").join(kind))?);
    }
    const STAGES: [&str; 6] = ["decode", "score", "overlay png", "map tiff", "mask png", "report pictures"];
    let mut seconds = [0f64; STAGES.len()];
    let mut timed = |stage: usize, start: Instant| seconds[stage] += start.elapsed().as_secs_f64();
    for path in &paths {
        let start = Instant::now();
        let image = vigil_data::io::load_image(path)?;
        timed(0, start);
        let start = Instant::now();
        let scored = model.score(&image, &path.display().to_string())?;
        timed(1, start);
        let predicted = model.pixel_verdicts(&scored);
        let start = Instant::now();
        vigil_engine::report::full_overlay(&image, &scored.map, &model.pixel_threshold, &predicted)?;
        timed(2, start);
        let start = Instant::now();
        vigil_data::io::encode_map_tiff(path, &scored.map)?;
        timed(3, start);
        let start = Instant::now();
        vigil_engine::report::encode_mask_png(&predicted)?;
        timed(4, start);
        let start = Instant::now();
        vigil_engine::report::pictures(&image, &scored.map, &model.pixel_threshold, &predicted, None)?;
        timed(5, start);
    }
    for (stage, s) in STAGES.iter().zip(seconds) {
        println!("{stage:<16} {:7.2} ms/image", s * 1000.0 / paths.len() as f64);
    }
    Ok(())
}
