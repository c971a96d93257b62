//! The MAE detector end to end on small synthetic textures: pre-training lowers the loss, a
//! planted defect scores above every normal image, an interrupted fit resumes bit for bit, a
//! fitted model reloads to the same scores, and pretrained weights from an official-format file
//! are used without training.

use std::path::Path;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use vigil_core::{Detector, FitContext, Image, InMemorySource, Mask, VigilError};
use vigil_mae::detector::preprocess;
use vigil_mae::train::{pretrain, TrainingData};
use vigil_mae::{MaeDetector, MaeSettings};

/// A smooth striped texture with a random phase and a little noise; `defect` paints a red
/// square at (x, y) of side s.
fn texture(seed: u64, side: usize, defect: Option<(usize, usize, usize)>) -> Image {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let phase: f32 = rng.gen_range(0.0..std::f32::consts::TAU);
    let mut image = Image::zeros(side, side, 3);
    for c in 0..3 {
        for y in 0..side {
            for x in 0..side {
                let mut v = 0.5
                    + 0.25 * (x as f32 * 0.8 + phase).sin()
                    + 0.05 * c as f32
                    + rng.gen_range(-0.02..0.02);
                if let Some((dx, dy, s)) = defect {
                    if (dx..dx + s).contains(&x) && (dy..dy + s).contains(&y) {
                        v = if c == 0 { 1.0 } else { 0.0 };
                    }
                }
                image.data[(c * side + y) * side + x] = v;
            }
        }
    }
    image
}

fn small_settings() -> MaeSettings {
    MaeSettings {
        input_size: 32,
        patch_size: 4,
        embed_dim: 32,
        depth: 2,
        num_heads: 2,
        decoder_embed_dim: 32,
        decoder_depth: 1,
        decoder_num_heads: 2,
        epochs: 40,
        batch_size: 8,
        base_lr: 0.5,
        warmup_epochs: 2,
        augment: false,
        smoothing_sigma: 1.0,
        morphology: 2,
        ssim_window: 7,
        checkpoint_every: 3,
        ..MaeSettings::default()
    }
}

#[test]
fn fit_lowers_the_loss_a_defect_scores_above_the_normals_and_the_model_reloads() {
    let train = InMemorySource::new((0..16).map(|i| texture(i, 32, None)).collect());
    let mut detector = MaeDetector::new(small_settings()).unwrap();
    assert!(detector.score(&texture(0, 32, None), None).is_err(), "unfitted detectors refuse to score");
    detector.fit(&train, &FitContext::default()).unwrap();
    let losses = detector.loss_history.clone();
    assert_eq!(losses.len(), 40);
    let early: f32 = losses[..3].iter().sum::<f32>() / 3.0;
    let late: f32 = losses[37..].iter().sum::<f32>() / 3.0;
    assert!(late < 0.5 * early, "loss did not fall: {losses:?}");
    let normal: Vec<f32> = (100..108)
        .map(|i| detector.score(&texture(i, 32, None), None).unwrap().image_score.unwrap())
        .collect();
    for i in 200..204 {
        let out = detector.score(&texture(i, 32, Some((12, 12, 6))), None).unwrap();
        let score = out.image_score.unwrap();
        assert!(normal.iter().all(|&n| score > n), "defect {score} vs normals {normal:?}");
        // The map peaks on the defect.
        let peak = out.map.data.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0;
        let (px, py) = (peak % 32, peak / 32);
        assert!((8..22).contains(&px) && (8..22).contains(&py), "peak at ({px}, {py})");
        // Ignoring the defect's region lowers the score.
        let mut mask = Mask::empty(32, 32);
        for y in 6..24 {
            for x in 6..24 {
                mask.data[y * 32 + x] = true;
            }
        }
        assert!(
            detector.score(&texture(i, 32, Some((12, 12, 6))), Some(&mask)).unwrap().image_score.unwrap()
                < score
        );
    }
    let reloaded = MaeDetector::load(&detector.settings(), &detector.state().unwrap()).unwrap();
    let image = texture(300, 32, Some((4, 20, 5)));
    assert_eq!(reloaded.score(&image, None).unwrap().map, detector.score(&image, None).unwrap().map);
    // A mismatched state does not load.
    let other = MaeSettings { embed_dim: 64, ..small_settings() };
    assert!(MaeDetector::load(&other.complete(), &detector.state().unwrap()).is_err());
}

#[test]
fn an_interrupted_pretraining_resumes_to_the_same_network() {
    let settings = MaeSettings { epochs: 3, augment: true, ..small_settings() };
    // 10 images in batches of 8: two steps per epoch, the second short.
    let images: Vec<Vec<f32>> = (0..10).map(|i| preprocess(&texture(i, 32, None), 32).unwrap()).collect();
    let data = TrainingData { images: &images, ignored: None };
    let plain = FitContext::default();
    let (straight, straight_losses) = pretrain(&settings, &data, &plain, None, None).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ctx = FitContext { checkpoint_dir: Some(dir.path().to_path_buf()), ..FitContext::default() };
    let stopped = pretrain(&settings, &data, &ctx, Some(4), None).unwrap_err();
    assert!(matches!(stopped, VigilError::Interrupted(_)), "{stopped}");
    let (resumed, resumed_losses) = pretrain(&settings, &data, &ctx, None, None).unwrap();
    assert_eq!(resumed, straight);
    assert_eq!(resumed_losses, straight_losses);
    // Another seed trains another network; other settings refuse the checkpoint.
    let other_seed = FitContext { seed: 1, ..FitContext::default() };
    assert_ne!(pretrain(&settings, &data, &other_seed, None, None).unwrap().0, straight);
    let other = MaeSettings { epochs: 4, ..settings.clone() };
    let error = pretrain(&other, &data, &ctx, None, None).unwrap_err().to_string();
    assert!(error.contains("mae-train.ckpt") && error.contains("delete it"), "{error}");
    // Ignoring every pixel leaves nothing to learn from: a zero loss.
    let all: Vec<Vec<f32>> = vec![vec![1.0; 32 * 32]; 10];
    let masked = TrainingData { images: &images, ignored: Some(&all) };
    let (_, zero) = pretrain(&MaeSettings { epochs: 1, ..settings }, &masked, &plain, None, None).unwrap();
    assert_eq!(zero, vec![0.0]);
}

#[test]
fn pretrained_official_format_weights_are_used_without_training() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/official_format.pth");
    let settings = MaeSettings {
        input_size: 8,
        patch_size: 4,
        embed_dim: 16,
        depth: 1,
        num_heads: 2,
        decoder_embed_dim: 8,
        decoder_depth: 1,
        decoder_num_heads: 2,
        weights: Some(path.clone()),
        ssim_window: 3,
        ..MaeSettings::default()
    };
    let mut detector = MaeDetector::new(settings.clone()).unwrap();
    // No training images are needed.
    detector.fit(&InMemorySource::new(Vec::new()), &FitContext::default()).unwrap();
    assert!(detector.loss_history.is_empty());
    assert_eq!(detector.weights_files().len(), 1);
    let state = detector.state().unwrap();
    assert_eq!(state.names().count(), 0, "the weights file is the state");
    let image = texture(5, 20, None);
    let a = detector.score(&image, None).unwrap();
    assert_eq!((a.map.width, a.map.height), (20, 20));
    let reloaded = MaeDetector::load(&detector.settings(), &state).unwrap();
    assert_eq!(reloaded.score(&image, None).unwrap().map, a.map);
    // Weights of another architecture are refused, naming the file.
    let wrong = MaeSettings { embed_dim: 32, ..settings };
    let error =
        MaeDetector::new(wrong).unwrap().fit(&InMemorySource::new(Vec::new()), &FitContext::default());
    let error = error.unwrap_err().to_string();
    assert!(error.contains("official_format.pth"), "{error}");
}
