//! A training killed after some steps and resumed from its checkpoint ends on exactly the weights
//! and losses of an uninterrupted one (dropout included); a checkpoint of other settings or
//! another seed is refused.

use vigil_core::VigilError;
use vigil_diffusion::{train_unet, TrainRun, TrainSettings, TrainingImages, UNetSettings};

fn unet() -> UNetSettings {
    UNetSettings {
        image_size: 16,
        in_channels: 3,
        base_channels: 32,
        channel_mults: vec![1, 1],
        num_res_blocks: 1,
        heads: 2,
        dropout: 0.3,
        attention_resolutions: vec![8],
    }
}

fn images() -> TrainingImages {
    let image = |k: usize| -> Vec<f32> {
        (0..3 * 16 * 16).map(|i| (((i * 7 + k * 13) % 29) as f32 / 14.0 - 1.0).clamp(-1.0, 1.0)).collect()
    };
    TrainingImages::new((0..5).map(image).collect(), 3, 16).unwrap()
}

fn settings() -> TrainSettings {
    TrainSettings { steps: 6, batch: 2, lr: 1e-3, weight_decay: 0.05, checkpoint_every: 2 }
}

#[test]
fn killed_and_resumed_training_equals_an_uninterrupted_one() {
    let images = images();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("unet.ckpt");
    let run = TrainRun { seed: 11, checkpoint_path: Some(path.clone()), ..Default::default() };

    // The first session stops after 3 of 6 steps (as a kill after the checkpoint would).
    let first = TrainRun { session_limit: Some(3), ..run.clone() };
    match train_unet(&unet(), &settings(), &images, &first) {
        Err(VigilError::Interrupted(message)) => assert!(message.contains("step 3 of 6"), "{message}"),
        other => panic!("expected an interruption, got {:?}", other.map(|t| t.losses)),
    }
    let resumed = train_unet(&unet(), &settings(), &images, &run).unwrap();

    let whole =
        train_unet(&unet(), &settings(), &images, &TrainRun { seed: 11, ..Default::default() }).unwrap();
    assert_eq!(resumed.losses, whole.losses);
    assert_eq!(resumed.losses.len(), 6);
    assert_eq!(resumed.net.state_dict(), whole.net.state_dict());

    // Another seed trains differently.
    let other =
        train_unet(&unet(), &settings(), &images, &TrainRun { seed: 12, ..Default::default() }).unwrap();
    assert_ne!(other.losses, whole.losses);

    // The finished checkpoint is not reused by other settings or another seed.
    let longer = TrainSettings { steps: 8, ..settings() };
    let err = train_unet(&unet(), &longer, &images, &run).err().unwrap().to_string();
    assert!(err.contains("unet.ckpt") && err.contains("other settings"), "{err}");
    let reseeded = TrainRun { seed: 5, ..run.clone() };
    assert!(train_unet(&unet(), &settings(), &images, &reseeded).is_err());
}
