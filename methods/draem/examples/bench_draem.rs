//! Times one DRAEM training step (batch 8) and the inference of one image, for the comparison
//! with PyTorch in benchmarks/draem_vs_torch. Run with RAYON_NUM_THREADS=2:
//!
//!   cargo run --release -p vigil-draem --example bench_draem -- <cpu|paper> <draem|unetpp> <size> [reps]
//!
//! Prints one JSON line: {"train_ms": median, "infer_ms": median, ...}.

use std::time::Instant;

use rand::{Rng, SeedableRng};
use vigil_core::{Detector, Image};
use vigil_draem::{BenchStep, DraemSettings, Variant};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 4 {
        return Err("usage: bench_draem <cpu|paper> <draem|unetpp> <size> [reps] [batch]".into());
    }
    let variant = match args[2].as_str() {
        "draem" => Variant::Draem,
        "unetpp" => Variant::Unetpp,
        other => return Err(format!("unknown variant {other}").into()),
    };
    let mut settings = DraemSettings::preset(&args[1], variant)?;
    settings.image_size = args[3].parse()?;
    let reps: usize = args.get(4).map(|r| r.parse()).transpose()?.unwrap_or(3);
    let batch: usize = args.get(5).map(|r| r.parse()).transpose()?.unwrap_or(8);
    let s = settings.image_size;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let mut data = |n: usize| (0..n).map(|_| rng.gen::<f32>()).collect::<Vec<f32>>();
    let x = data(batch * 3 * s * s);
    let clean = data(batch * 3 * s * s);
    let mask: Vec<f32> = data(batch * s * s).into_iter().map(|v| if v > 0.9 { 1.0 } else { 0.0 }).collect();

    let mut trainer = BenchStep::new(&settings, 0)?;
    let params = trainer.num_params();
    let mut train_ms = Vec::new();
    for rep in 0..=reps {
        let t = Instant::now();
        let loss = trainer.step(x.clone(), clean.clone(), mask.clone());
        assert!(loss.is_finite());
        if rep > 0 {
            train_ms.push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    let detector = trainer.into_detector();
    let image = Image::new(s, s, 3, x[..3 * s * s].to_vec())?;
    let mut infer_ms = Vec::new();
    for rep in 0..=reps {
        let t = Instant::now();
        let out = detector.score(&image, None)?;
        assert!(out.image_score.is_some_and(f32::is_finite));
        if rep > 0 {
            infer_ms.push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    println!(
        "{}",
        serde_json::json!({
            "framework": "vigil", "preset": args[1], "variant": args[2], "size": s, "batch": batch,
            "params": params, "train_ms": median(train_ms), "infer_ms": median(infer_ms),
        })
    );
    Ok(())
}
