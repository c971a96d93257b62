//! CI-sized DRAEM training: tiny widths, 32x32 images, a few dozen steps.

use vigil_core::{Detector, FitContext, Image, InMemorySource};
use vigil_draem::{DraemDetector, DraemSettings, Variant};
use vigil_synth::{AnomalySource, SynthConfig, Synthesizer};

const SIZE: usize = 32;
const STEPS: usize = 150;

/// Normal images: a regular stripe pattern with a per-image phase and mild noise.
fn normal_image(k: usize) -> Image {
    let mut data = Vec::with_capacity(3 * SIZE * SIZE);
    for c in 0..3 {
        for y in 0..SIZE {
            for x in 0..SIZE {
                let phase = k as f32 * 0.7;
                let stripe = 0.5 + 0.2 * ((x as f32 + phase) * 0.8).sin();
                let noise = (((x * 31 + y * 17 + c * 7 + k * 13) % 23) as f32 / 23.0 - 0.5) * 0.05;
                data.push((stripe + noise + 0.05 * c as f32).clamp(0.0, 1.0));
            }
        }
    }
    Image::new(SIZE, SIZE, 3, data).unwrap()
}

fn tiny(variant: Variant, steps: usize) -> DraemSettings {
    DraemSettings {
        variant,
        image_size: SIZE,
        recon_width: 4,
        recon_depth: 2,
        nested_width: 4,
        nested_depth: 2,
        disc_width: 4,
        disc_depth: 3,
        steps,
        batch: 4,
        lr: 2e-3,
        lr_gamma: 0.2,
        anomaly_source: "procedural".into(),
        cutout_probability: 0.0,
        score_filter: 3,
        checkpoint_every: 5,
    }
}

fn train_set() -> InMemorySource {
    InMemorySource::new((0..6).map(normal_image).collect())
}

fn mean(v: &[f32]) -> f32 {
    v.iter().sum::<f32>() / v.len() as f32
}

#[test]
fn loss_falls_and_planted_anomaly_scores_above_background() {
    for variant in [Variant::Draem, Variant::Unetpp] {
        let mut det = DraemDetector::new(tiny(variant, STEPS)).unwrap();
        det.fit(&train_set(), &FitContext { seed: 1, ..Default::default() }).unwrap();
        let losses = det.losses();
        assert_eq!(losses.len(), STEPS);
        let (first, last) = (mean(&losses[..10]), mean(&losses[STEPS - 10..]));
        assert!(last < 0.8 * first, "{variant:?}: loss {first} -> {last}");

        // Plant anomalies of the training distribution into unseen normal images.
        let config = SynthConfig { anomaly_probability: 1.0, ..Default::default() };
        let synth = Synthesizer::new(config, AnomalySource::Procedural);
        let (mut inside, mut outside) = (Vec::new(), Vec::new());
        for k in 0..6 {
            let sample = synth.sample(&normal_image(100 + k), 999, k as u64).unwrap();
            if !sample.has_anomaly {
                continue;
            }
            let out = det.score(&sample.image, None).unwrap();
            for (p, &m) in sample.mask.iter().enumerate() {
                if m > 0.0 {
                    inside.push(out.map.data[p])
                } else {
                    outside.push(out.map.data[p])
                }
            }
        }
        assert!(!inside.is_empty());
        println!(
            "{variant:?}: loss {} -> {}, anomalous pixels {} vs background {}",
            first,
            last,
            mean(&inside),
            mean(&outside)
        );
        assert!(
            mean(&inside) > mean(&outside) + 0.05,
            "{variant:?}: anomalous pixels {} vs background {}",
            mean(&inside),
            mean(&outside)
        );
    }
}

#[test]
fn killed_run_resumes_to_the_same_weights() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = FitContext { seed: 5, checkpoint_dir: Some(dir.path().to_path_buf()), show_progress: false };
    let settings = tiny(Variant::Draem, 12);

    // First session stops after 6 of 12 steps (as if killed right after its checkpoint).
    let mut first = DraemDetector::new(settings.clone()).unwrap();
    first.set_session_limit(Some(6));
    let err = first.fit(&train_set(), &ctx).unwrap_err();
    assert!(err.to_string().contains("resume"), "{err}");
    assert!(!first.is_trained());

    // A fresh detector (no state shared with the first) resumes from the checkpoint file.
    let mut resumed = DraemDetector::new(settings.clone()).unwrap();
    resumed.fit(&train_set(), &ctx).unwrap();

    let mut whole = DraemDetector::new(settings).unwrap();
    whole.fit(&train_set(), &FitContext { seed: 5, ..Default::default() }).unwrap();

    assert_eq!(resumed.losses(), whole.losses());
    let (a, b) = (resumed.state().unwrap(), whole.state().unwrap());
    assert_eq!(a.names().collect::<Vec<_>>(), b.names().collect::<Vec<_>>());
    for name in a.names() {
        let (x, y) = (a.f32(name, None).unwrap(), b.f32(name, None).unwrap());
        assert!(x.iter().zip(&y).all(|(p, q)| p.to_bits() == q.to_bits()), "{name} differs");
    }

    // Another seed must not silently reuse this run's checkpoint.
    let other = FitContext { seed: 6, ..ctx };
    let err = DraemDetector::new(tiny(Variant::Draem, 12)).unwrap().fit(&train_set(), &other).unwrap_err();
    assert!(err.to_string().contains("another seed"), "{err}");
}

#[test]
fn saved_state_reloads_to_identical_scores() {
    let mut det = DraemDetector::new(tiny(Variant::Unetpp, 3)).unwrap();
    det.fit(&train_set(), &FitContext::default()).unwrap();
    let state = det.state().unwrap();
    assert!(state.names().any(|n| n == "reconstructive.nodes.0.a.bn.running_mean"));
    let bytes = state.to_safetensors().unwrap();
    let back = vigil_core::TensorBag::from_safetensors(&bytes).unwrap();
    let loaded = DraemDetector::load(&det.settings(), &back).unwrap();
    assert_eq!(loaded.method(), "draem-unetpp");
    let img = normal_image(50).resize_bilinear(40, 24);
    let (a, b) = (det.score(&img, None).unwrap(), loaded.score(&img, None).unwrap());
    assert_eq!((a.map.width, a.map.height), (40, 24));
    assert_eq!(a.map.data, b.map.data);
    assert_eq!(a.image_score, b.image_score);

    // Settings of the other variant do not fit these weights.
    let mut wrong = det.settings();
    wrong["variant"] = serde_json::json!("draem");
    assert!(DraemDetector::load(&wrong, &back).is_err());
}

#[test]
fn bad_settings_are_rejected() {
    let mut s = tiny(Variant::Draem, 3);
    s.image_size = 36;
    assert!(DraemDetector::new(s).unwrap_err().to_string().contains("multiple of 2^3"));
    let mut s = tiny(Variant::Draem, 3);
    s.score_filter = 4;
    assert!(DraemDetector::new(s).is_err());
    assert!(DraemSettings::preset("gpu", Variant::Draem).is_err());
    let empty = InMemorySource::new(vec![]);
    let err =
        DraemDetector::new(tiny(Variant::Draem, 3)).unwrap().fit(&empty, &FitContext::default()).unwrap_err();
    assert!(err.to_string().contains("at least one training image"));
}
