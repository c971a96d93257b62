//! The training actually learns: on a tiny U-Net and two images, 60 steps bring the
//! ε-prediction loss well below its starting value (the zero-initialised output predicts ε = 0,
//! so the first losses are Σ ε² ≈ C·H·W).

use vigil_diffusion::{train_unet, TrainRun, TrainSettings, TrainingImages, UNetSettings};

#[test]
fn loss_falls_during_training() {
    let unet = UNetSettings {
        image_size: 16,
        in_channels: 3,
        base_channels: 32,
        channel_mults: vec![1, 1],
        num_res_blocks: 1,
        heads: 2,
        dropout: 0.0,
        attention_resolutions: vec![8],
    };
    let image = |k: usize| -> Vec<f32> {
        (0..3 * 16 * 16).map(|i| if (i % 16 + i / 16 + k) % 4 < 2 { 0.8 } else { -0.8 }).collect()
    };
    let images = TrainingImages::new(vec![image(0), image(1)], 3, 16).unwrap();
    let settings = TrainSettings { steps: 60, batch: 4, lr: 1e-3, weight_decay: 0.0, checkpoint_every: 60 };
    let trained = train_unet(&unet, &settings, &images, &TrainRun { seed: 2, ..Default::default() }).unwrap();
    let mean = |l: &[f32]| l.iter().sum::<f32>() / l.len() as f32;
    let (first, last) = (mean(&trained.losses[..10]), mean(&trained.losses[50..]));
    println!("loss: first 10 steps {first:.1}, last 10 {last:.1}");
    assert!(first > 400.0, "{first}");
    assert!(last < 0.5 * first, "first {first}, last {last}");
}
