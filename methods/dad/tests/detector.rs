//! DAD end to end on tiny data: fit, both stages, determinism, save and reload, ignore masks.

use vigil_core::{Detector, FitContext, Image, InMemorySource, Mask};
use vigil_dad::{DadDetector, DadSettings, Stage};
use vigil_diffusion::OdeSolver;

/// The CPU network with 3 training steps, a 4-step Heun ODE and 21 inpainting steps (the VP chain needs N > β_max = 20); a level of
/// 10 so the untrained model's latent is surely detected somewhere and stage 2 runs.
fn settings() -> DadSettings {
    DadSettings {
        steps: 3,
        batch: 2,
        warmup: 1,
        sde_steps: 21,
        corrector_steps: 0,
        ode: OdeSolver::Heun { steps: 4 },
        nlm_patch_distance: 4,
        nfa_level: 10.0,
        ..DadSettings::default()
    }
}

fn image(k: usize) -> Image {
    let (w, h) = (40, 30);
    let data = (0..3 * w * h).map(|i| ((i * 7 + k * 11) % 23) as f32 / 22.0).collect();
    Image::new(w, h, 3, data).unwrap()
}

#[test]
fn fit_score_save_and_reload() {
    let mut detector = DadDetector::new(settings()).unwrap();
    let train = InMemorySource::new((0..3).map(image).collect());
    detector.fit(&train, &FitContext { seed: 1, checkpoint_dir: None, show_progress: false }).unwrap();
    assert_eq!(detector.losses().len(), 3);

    let test = image(7);
    let maps = detector.infer(&test).unwrap();
    assert!(maps.likelihood.data.iter().all(|v| v.is_finite() && *v >= 0.0));
    assert!(maps.detection.contains(&true));
    let second = maps.inpainting.as_ref().unwrap();
    assert!(second.max() > 0.0);

    let out = detector.score(&test, None).unwrap();
    assert_eq!((out.map.width, out.map.height), (40, 30));
    assert_eq!(out.log10_nfa.as_ref().map(|m| (m.width, m.height)), Some((40, 30)));
    assert!((out.image_score.unwrap() - out.map.max()).abs() < 1e-6);

    let reloaded = DadDetector::load(&detector.settings(), &detector.state().unwrap()).unwrap();
    assert_eq!(reloaded.score(&test, None).unwrap().map.data, out.map.data);

    // Stage 1 alone reports the latent map.
    let stage1 = DadDetector::load(
        &serde_json::to_value(DadSettings { stage: Stage::Likelihood, ..settings() }).unwrap(),
        &detector.state().unwrap(),
    )
    .unwrap();
    let maps1 = stage1.infer(&test).unwrap();
    assert!(maps1.inpainting.is_none());
    assert_eq!(maps1.likelihood.data, maps.likelihood.data);

    let everything = Mask { width: 40, height: 30, data: vec![true; 40 * 30] };
    assert!(detector.score(&test, Some(&everything)).is_err());
}

#[test]
fn bad_settings_and_untrained_use_are_refused() {
    let err = DadDetector::new(DadSettings { nlm_h_factor: 0.0, ..settings() }).unwrap_err();
    assert!(err.to_string().contains("nlm_h_factor"), "{err}");
    let err = DadDetector::new(DadSettings { ode: OdeSolver::Rk4 { steps: 0 }, ..settings() }).unwrap_err();
    assert!(err.to_string().contains("ODE"), "{err}");
    assert!(DadDetector::new(settings()).unwrap().score(&image(0), None).is_err());
}
