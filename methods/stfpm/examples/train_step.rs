//! Times STFPM training steps at the `cpu` preset (MobileNetV2 student to `features.13`, 128 px,
//! batches of 8) on synthetic textures, and prints the loss of every epoch in full precision, so
//! two builds (or `VIGIL_KERNELS=burn` against the default kernels) can be compared for speed and
//! for the same loss trajectory.
//!
//!   cargo run --release -p vigil-stfpm --example train_step [epochs] [images]
//!
//! Defaults: 5 epochs of 16 images (2 steps each). The teacher is the shipped MobileNetV2 when
//! ../shared has it, else a random one. Besides the wall time the example prints the process's
//! CPU time (user + system) spent in training, which on a machine loaded by other jobs is the
//! fairer measure: compare CPU times, or instruction counts under `valgrind --tool=callgrind`.

use std::time::Instant;

use vigil_backbones::{Backbone, BackboneKind};
use vigil_core::FitContext;
use vigil_nn::{tensor_from_vec, tensor_to_vec};
use vigil_stfpm::detector::TrainingData;
use vigil_stfpm::{train_student, StfpmSettings};

/// User + system CPU seconds of this process so far (Linux `/proc/self/stat`, 100 ticks a second).
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which may hold spaces): state is field 3, utime 14, stime 15.
    let after_name = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

/// A normalised [3, side, side] image: stripes with a per-image phase and a little hashed noise.
fn texture(index: usize, side: usize) -> Vec<f32> {
    let phase = index as f32 * 0.7;
    (0..3 * side * side)
        .map(|i| {
            let (c, y, x) = (i / (side * side), i / side % side, i % side);
            let noise =
                ((i as u32 ^ (index as u32 * 7919)).wrapping_mul(2_654_435_761) % 1000) as f32 / 1000.0;
            ((x as f32 * 0.3 + y as f32 * 0.1 + phase).sin() + 0.2 * c as f32 + 0.3 * (noise - 0.5)) * 1.5
        })
        .collect()
}

fn main() -> vigil_core::Result<()> {
    let args: Vec<usize> = std::env::args().skip(1).map(|a| a.parse().expect("a number")).collect();
    let (epochs, images) = (args.first().copied().unwrap_or(5), args.get(1).copied().unwrap_or(16));
    let weights = vigil_core::shared_data::shared_path("weights/mobilenet_v2/mobilenet_v2.safetensors");
    let settings = StfpmSettings {
        random_weights_seed: weights.is_none().then_some(3),
        weights,
        epochs,
        ..StfpmSettings::default()
    };
    let side = settings.input_size;
    let teacher =
        Backbone::open(BackboneKind::MobileNetV2, settings.weights.as_deref(), settings.random_weights_seed)?;
    let pixels: Vec<Vec<f32>> = (0..images).map(|i| texture(i, side)).collect();
    let batch = tensor_from_vec(pixels.concat(), [images, 3, side, side], &vigil_nn::default_device());
    let features = teacher.extract_tensor(batch, &settings.layers)?;
    let mut shapes = Vec::new();
    let mut targets: Vec<Vec<Vec<f32>>> = vec![Vec::new(); images];
    for (layer, feature) in settings.layers.iter().zip(features) {
        let (channels, stride) = teacher.layer_info(layer)?;
        let plane = (side / stride) * (side / stride);
        shapes.push((channels, side / stride));
        for (target, values) in targets.iter_mut().zip(tensor_to_vec(feature).chunks_exact(channels * plane))
        {
            // F.normalize over the channels, as the detector's targets are.
            let mut normalised = values.to_vec();
            for p in 0..plane {
                let norm =
                    (0..channels).map(|c| values[c * plane + p].powi(2)).sum::<f32>().sqrt().max(1e-12);
                (0..channels).for_each(|c| normalised[c * plane + p] /= norm);
            }
            target.push(normalised);
        }
    }
    let data = TrainingData { images: &pixels, targets: &targets, shapes: &shapes, position_weights: None };
    let last = settings.layers.last().expect("three layers").clone();
    let steps = epochs * images.div_ceil(settings.batch_size);
    let (cpu, wall) = (cpu_seconds(), Instant::now());
    let (_, losses) = train_student(&settings, &last, &data, &FitContext::default(), None, None)?;
    let (cpu, wall) = (cpu_seconds() - cpu, wall.elapsed().as_secs_f64());
    for (epoch, loss) in losses.iter().enumerate() {
        println!("epoch {epoch}: loss {loss:.9e}");
    }
    println!(
        "{steps} steps of batch {} at {side} px: {:.1} ms wall, {:.1} ms CPU (user + system) per step",
        settings.batch_size,
        1e3 * wall / steps as f64,
        1e3 * cpu / steps as f64
    );
    Ok(())
}
