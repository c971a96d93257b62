//! Times one training step and one DDAD reconstruction (10 conditioned DDIM steps) of a U-Net
//! preset on the default device.
//!
//!     cargo run --release -p vigil-diffusion --example time_unet -- [preset] [train batch] [repeats]
//!
//! Defaults: preset `cpu`, batch 8, 3 repeats (after one warm-up each). The reconstruction is of
//! one image, as a detector scores them. The figures go to stderr as sentences and to stdout as
//! one JSON line with the keys `bench/time_unet_torch.py` prints, which
//! `benchmarks/diffusion_vs_torch/run.sh` compares.

use std::time::Instant;

use burn::tensor::Tensor;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use vigil_diffusion::{
    reconstruct, NoiseSchedule, ReconstructionSettings, TrainSettings, Trainer, TrainingImages, UNetSettings,
};
use vigil_nn::TrainTask;

fn main() -> vigil_core::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let preset = args.get(1).map_or("cpu", String::as_str);
    let batch: usize = args.get(2).map_or(8, |b| b.parse().expect("batch is a number"));
    let repeats: usize = args.get(3).map_or(3, |r| r.parse().expect("repeats is a number"));
    let unet = UNetSettings::preset(preset)?;
    let s = unet.image_size;
    let image = |k: usize| -> Vec<f32> {
        (0..3 * s * s).map(|i| ((i * 31 + k * 17) % 255) as f32 / 127.5 - 1.0).collect()
    };
    let images = TrainingImages::new((0..batch).map(image).collect(), 3, s)?;
    let settings = TrainSettings { steps: repeats + 1, batch, ..Default::default() };
    let mut trainer = Trainer::new(&unet, &settings, &images, 0)?;
    let start = Instant::now();
    trainer.step(0)?;
    let warm_up = start.elapsed().as_secs_f64();
    let start = Instant::now();
    for step in 1..=repeats {
        trainer.step(step)?;
    }
    let train_step = start.elapsed().as_secs_f64() / repeats as f64;
    let net = trainer.into_net();
    let parameters = burn::module::Module::num_params(&net);
    eprintln!(
        "{preset}: {parameters} parameters; training step (batch {batch}, {s} px): {train_step:.3} s (first {warm_up:.3} s)"
    );

    let device = vigil_nn::default_device();
    let x = vigil_nn::tensor_from_vec(image(0), [1, 3, s, s], &device);
    let schedule = NoiseSchedule::ddad();
    let settings = ReconstructionSettings::default();
    let run = || -> vigil_core::Result<Tensor<4>> {
        reconstruct(
            &net,
            &schedule,
            x.clone(),
            &x,
            &settings,
            &mut ChaCha8Rng::seed_from_u64(1),
            &mut |_, _| {},
        )
    };
    run()?;
    let start = Instant::now();
    for _ in 0..repeats {
        run()?;
    }
    let per_reconstruction = start.elapsed().as_secs_f64() / repeats as f64;
    eprintln!(
        "{preset}: one reconstruction ({} U-Net evaluations, 1 image): {per_reconstruction:.3} s",
        settings.steps()
    );
    let kernels = match vigil_nn::kernels::kernel_choice() {
        vigil_nn::kernels::KernelChoice::Vigil => "vigil",
        vigil_nn::kernels::KernelChoice::Burn => "burn",
    };
    println!(
        "{{\"preset\": \"{preset}\", \"batch\": {batch}, \"parameters\": {parameters}, \"train_step_s\": {train_step:.4}, \"reconstruction_s\": {per_reconstruction:.4}, \"kernels\": \"{kernels}\"}}"
    );
    Ok(())
}
