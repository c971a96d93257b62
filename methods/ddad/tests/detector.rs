//! DDAD end to end on tiny data: fit, score at the image's own size, save and reload to the same
//! scores, ignore masks, settings checks.

use vigil_core::{Detector, FitContext, Image, InMemorySource, Mask};
use vigil_ddad::{DdadDetector, DdadSettings};

fn settings() -> DdadSettings {
    DdadSettings {
        steps: 2,
        batch: 2,
        t_start: 50,
        skip: 25,
        random_weights_seed: Some(3),
        ..DdadSettings::default()
    }
}

fn image(k: usize) -> Image {
    let (w, h) = (40, 30);
    let data = (0..3 * w * h).map(|i| ((i * 7 + k * 11) % 23) as f32 / 22.0).collect();
    Image::new(w, h, 3, data).unwrap()
}

#[test]
fn fit_score_save_and_reload() {
    let mut detector = DdadDetector::new(settings()).unwrap();
    let train = InMemorySource::new((0..3).map(image).collect());
    let ctx = FitContext { seed: 1, checkpoint_dir: None, show_progress: false };
    detector.fit(&train, &ctx).unwrap();
    assert_eq!(detector.losses().len(), 2);

    let test = image(7);
    let out = detector.score(&test, None).unwrap();
    assert_eq!((out.map.width, out.map.height), (40, 30));
    assert!(out.map.data.iter().all(|v| v.is_finite()));
    let score = out.image_score.unwrap();
    assert!(score > 0.0 && (score - out.map.max()).abs() < 1e-6);
    // Deterministic.
    assert_eq!(detector.score(&test, None).unwrap().map.data, out.map.data);

    let reloaded = DdadDetector::load(&detector.settings(), &detector.state().unwrap()).unwrap();
    assert_eq!(reloaded.score(&test, None).unwrap().map.data, out.map.data);

    // Ignoring the left half: the score is the maximum over the right half.
    let ignore = Mask { width: 40, height: 30, data: (0..40 * 30).map(|p| p % 40 < 20).collect() };
    let kept_max = out
        .map
        .data
        .iter()
        .enumerate()
        .filter(|(p, _)| p % 40 >= 20)
        .map(|(_, v)| *v)
        .fold(f32::MIN, f32::max);
    assert_eq!(detector.score(&test, Some(&ignore)).unwrap().image_score, Some(kept_max));
    let everything = Mask { width: 40, height: 30, data: vec![true; 40 * 30] };
    assert!(detector.score(&test, Some(&everything)).is_err());
}

#[test]
fn bad_settings_are_refused_before_training() {
    let err = DdadDetector::new(DdadSettings { network: "huge".into(), ..settings() }).unwrap_err();
    assert!(err.to_string().contains("huge"), "{err}");
    let err = DdadDetector::new(DdadSettings { t_start: 5000, ..settings() }).unwrap_err();
    assert!(err.to_string().contains("t_start"), "{err}");
    let err =
        DdadDetector::new(DdadSettings { layers: vec!["features.99".into()], ..settings() }).unwrap_err();
    assert!(err.to_string().contains("features.99"), "{err}");
    let untrained = DdadDetector::new(settings()).unwrap();
    assert!(untrained.score(&image(0), None).is_err());
}

#[test]
fn presets_by_name_and_overrides() {
    use vigil_ddad::{DdadSpec, Preset};
    let paper: DdadSettings =
        serde_json::from_value(serde_json::json!({"preset": "paper", "w": 4.0})).unwrap();
    assert_eq!(paper, DdadSettings { w: 4.0, ..DdadSettings::paper() });
    assert_eq!((paper.network.as_str(), paper.batch, paper.preset), ("ddad", 32, Preset::Paper));
    // Written back as the preset and the overrides only (null elsewhere); a model file writes
    // every field.
    let written = serde_json::to_value(&paper).unwrap();
    let given: Vec<&String> =
        written.as_object().unwrap().iter().filter(|(_, v)| !v.is_null()).map(|(k, _)| k).collect();
    assert_eq!(given, ["preset", "w"]);
    let complete = serde_json::to_value(DdadSpec::complete(&paper)).unwrap();
    assert_eq!(complete["layers"], serde_json::json!(["layer2", "layer3"]));
    assert_eq!(serde_json::from_value::<DdadSettings>(complete).unwrap(), paper);
    // The default is the CPU preset; unknown fields are refused.
    assert_eq!(
        serde_json::from_value::<DdadSettings>(serde_json::json!({})).unwrap(),
        DdadSettings::default()
    );
    assert!(serde_json::from_value::<DdadSettings>(serde_json::json!({"wieght": 1})).is_err());
}
