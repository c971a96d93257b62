//! RIFA end to end on tiny data: fit, score at the image's own size, determinism, save and reload
//! to the same scores, ignore masks, and the two stages.

use vigil_core::{Detector, FitContext, Image, InMemorySource, Mask};
use vigil_rifa::{MaskLayout, RifaDetector, RifaSettings};

/// The CPU network with 3 training steps, 21 inpainting steps (the VP chain needs N > β_max = 20) and 2 realizations.
fn settings() -> RifaSettings {
    RifaSettings {
        network: "cpu".into(),
        steps: 3,
        batch: 2,
        warmup: 1,
        sde_steps: 21,
        corrector_steps: 0,
        realizations: 2,
        patch_size: 16,
        ..RifaSettings::default()
    }
}

fn image(k: usize) -> Image {
    let (w, h) = (40, 30);
    let data = (0..3 * w * h).map(|i| ((i * 7 + k * 11) % 23) as f32 / 22.0).collect();
    Image::new(w, h, 3, data).unwrap()
}

#[test]
fn fit_score_save_and_reload() {
    let mut detector = RifaDetector::new(settings()).unwrap();
    let train = InMemorySource::new((0..3).map(image).collect());
    let ctx = FitContext { seed: 1, checkpoint_dir: None, show_progress: false };
    detector.fit(&train, &ctx).unwrap();
    assert_eq!(detector.losses().len(), 3);

    let test = image(7);
    let out = detector.score(&test, None).unwrap();
    assert_eq!((out.map.width, out.map.height), (40, 30));
    assert!(out.map.data.iter().all(|v| v.is_finite() && *v >= 0.0));
    let score = out.image_score.unwrap();
    assert!(score > 0.0 && (score - out.map.max()).abs() < 1e-6);

    // Stage 2 inpaints only where stage 1 is above its mid-range, so elsewhere its
    // discrepancy is zero before smoothing (with sigma 0 exactly zero).
    let mut sharp = RifaDetector::load(
        &serde_json::to_value(RifaSettings { sigma: 0.0, ..settings() }).unwrap(),
        &detector.state().unwrap(),
    )
    .unwrap();
    sharp.set_progress(false);
    let maps = sharp.infer(&test).unwrap();
    let second = maps.second.unwrap();
    let threshold = (maps.first.min() + maps.first.max()) / 2.0;
    for (a, b) in maps.first.data.iter().zip(&second.data) {
        if *a <= threshold {
            assert_eq!(*b, 0.0);
        }
    }
    assert!(second.max() > 0.0);

    // Deterministic, and the same after saving and loading; ignoring the left half, the score
    // is the maximum over the right half.
    let reloaded = RifaDetector::load(&detector.settings(), &detector.state().unwrap()).unwrap();
    let ignore = Mask { width: 40, height: 30, data: (0..40 * 30).map(|p| p % 40 < 20).collect() };
    let kept_max = out
        .map
        .data
        .iter()
        .enumerate()
        .filter(|(p, _)| p % 40 >= 20)
        .map(|(_, v)| *v)
        .fold(f32::MIN, f32::max);
    let again = reloaded.score(&test, Some(&ignore)).unwrap();
    assert_eq!(again.map.data, out.map.data);
    assert_eq!(again.image_score, Some(kept_max));
    let everything = Mask { width: 40, height: 30, data: vec![true; 40 * 30] };
    assert!(detector.score(&test, Some(&everything)).is_err());
}

#[test]
fn first_stage_only_and_random_masks() {
    let mut detector =
        RifaDetector::new(RifaSettings { second_stage: false, masks: MaskLayout::Random, ..settings() })
            .unwrap();
    let train = InMemorySource::new((0..2).map(image).collect());
    detector.fit(&train, &FitContext { seed: 2, checkpoint_dir: None, show_progress: false }).unwrap();
    let maps = detector.infer(&image(5)).unwrap();
    assert!(maps.second.is_none());
    assert!(maps.first.max() > 0.0);
}

#[test]
fn bad_settings_and_untrained_use_are_refused() {
    let err = RifaDetector::new(RifaSettings { network: "huge".into(), ..settings() }).unwrap_err();
    assert!(err.to_string().contains("huge"), "{err}");
    let err = RifaDetector::new(RifaSettings { realizations: 0, ..settings() }).unwrap_err();
    assert!(err.to_string().contains("realizations"), "{err}");
    let untrained = RifaDetector::new(settings()).unwrap();
    assert!(untrained.score(&image(0), None).is_err());
}
