//! CI-sized DRAEM training: tiny widths, 32x32 images, a few dozen steps.

use vigil_core::{Detector, FitContext, Image, InMemorySource};
use vigil_draem::{DraemDetector, DraemSettings, Preset, Variant};
use vigil_nn::kernels::{with_kernels, KernelChoice};
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
        preset: Preset::Cpu,
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
        ssim_weight: 1.0,
        opacity: [0.1, 1.0],
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

/// vigil's CPU kernels change how the convolutions and batch norms are computed, not what: the
/// same run with burn's operations follows the same loss curve. The two differ by rounding only,
/// but Adam turns rounding into whole steps where a gradient is pure rounding noise (the conv
/// biases ahead of each BatchNorm, whose true gradient is 0), so the curves drift apart with
/// learning rate × steps: a small learning rate keeps that drift below the tolerance over 20
/// steps (at lr 2e-3 the curves part by 0.4 % at step 3).
#[test]
fn vigil_kernels_and_burn_operations_give_the_same_loss_curve() {
    const STEPS: usize = 20;
    for variant in [Variant::Draem, Variant::Unetpp] {
        let losses = |choice| {
            with_kernels(choice, || {
                let settings = DraemSettings { lr: 1e-4, ..tiny(variant, STEPS) };
                let mut det = DraemDetector::new(settings).unwrap();
                det.fit(&train_set(), &FitContext { seed: 3, ..Default::default() }).unwrap();
                det.losses().to_vec()
            })
        };
        let (vigil, burn) = (losses(KernelChoice::Vigil), losses(KernelChoice::Burn));
        assert_eq!(vigil.len(), STEPS);
        assert!(burn[STEPS - 1] < 0.99 * burn[0], "{variant:?}: the run must train: {burn:?}");
        for (step, (v, b)) in vigil.iter().zip(&burn).enumerate() {
            assert!((v - b).abs() <= 3e-3 * b.abs(), "{variant:?} step {step}: {v} vs {b}");
        }
        // The sums run in another order than burn's, so some bits differ: the kernels did run.
        assert_ne!(vigil, burn, "{variant:?}: both runs took the same path");
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

#[test]
fn presets_are_chosen_by_name_and_fields_override_them() {
    let parse = |v: serde_json::Value| serde_json::from_value::<DraemSettings>(v).unwrap();
    // What the command line starts from: the CPU preset, nothing overridden.
    let defaults = serde_json::to_value(DraemSettings::cpu(Variant::Draem)).unwrap();
    assert_eq!(defaults["preset"], "cpu");
    assert!(defaults["steps"].is_null() && defaults["image_size"].is_null());
    assert_eq!(parse(defaults.clone()), DraemSettings::cpu(Variant::Draem));

    let mut paper = defaults.clone();
    paper["preset"] = "paper".into();
    assert_eq!(parse(paper.clone()), DraemSettings::paper(Variant::Draem));
    paper["steps"] = 400.into();
    let s = parse(paper);
    assert_eq!((s.preset, s.steps, s.image_size, s.recon_width), (Preset::Paper, 400, 256, 128));
    // Overrides survive a round trip; only they are written.
    let back = serde_json::to_value(&s).unwrap();
    assert_eq!(back["steps"], 400);
    assert!(back["image_size"].is_null());
    assert_eq!(parse(back), s);

    // The UNet++ paper preset is the seed paper's: 512 px, lambda = 2 on SSIM, opacity [0.2, 1].
    let unetpp = parse(serde_json::json!({"variant": "unetpp", "preset": "paper"}));
    assert_eq!((unetpp.image_size, unetpp.ssim_weight, unetpp.opacity), (512, 2.0, [0.2, 1.0]));
    assert_eq!((unetpp.nested_width, unetpp.nested_depth), (32, 4));
    DraemDetector::new(unetpp).unwrap();
    let draem = DraemSettings::preset("paper", Variant::Draem).unwrap();
    assert_eq!(
        (draem.image_size, draem.ssim_weight, draem.opacity, draem.steps),
        (256, 1.0, [0.2, 1.0], 20_000)
    );

    // A model file stores every field.
    let mut det = DraemDetector::new(tiny(Variant::Draem, 2)).unwrap();
    det.fit(&train_set(), &FitContext::default()).unwrap();
    let stored = det.settings();
    assert_eq!(stored["image_size"], SIZE);
    assert_eq!(stored["opacity"], serde_json::json!([0.1, 1.0]));

    let err =
        serde_json::from_value::<DraemSettings>(serde_json::json!({"variant": "draem", "preset": "gpu"}));
    assert!(err.unwrap_err().to_string().contains("gpu"));
    let err = serde_json::from_value::<DraemSettings>(serde_json::json!({"variant": "draem", "step": 3}));
    assert!(err.unwrap_err().to_string().contains("step"));
    let mut s = tiny(Variant::Draem, 3);
    s.opacity = [0.5, 0.2];
    assert!(DraemDetector::new(s).unwrap_err().to_string().contains("opacity"));
}

/// Ignored pixels ("before" mode): the image score does not see a defect inside them, and
/// training with an ignore mask runs and gives the same score without the mask's region.
#[test]
fn ignored_pixels_are_left_out_of_the_image_score() {
    let mut det = DraemDetector::new(tiny(Variant::Draem, 60)).unwrap();
    let mut train = train_set();
    let ignored =
        vigil_core::Mask::new(SIZE, SIZE, (0..SIZE * SIZE).map(|p| p % SIZE < SIZE / 2).collect()).unwrap();
    train.ignore = Some(ignored.clone());
    det.fit(&train, &FitContext { seed: 2, ..Default::default() }).unwrap();

    let clean = normal_image(77);
    let mut spotted = clean.clone();
    for c in 0..3 {
        for y in 12..20 {
            for x in 4..10 {
                spotted.data[(c * SIZE + y) * SIZE + x] = if c == 0 { 1.0 } else { 0.0 };
            }
        }
    }
    // The spot lies in the ignored left half. The score is, computed here from the map, the
    // max over kept pixels of the mean over the kept pixels of their 3x3 window.
    let expected = |m: &vigil_core::Map| {
        let kept = |x: i64, y: i64| (0..SIZE as i64).contains(&x) && (0..SIZE as i64).contains(&y) && x >= 16;
        let mut best = f32::MIN;
        for y in 0..SIZE as i64 {
            for x in 16..SIZE as i64 {
                let window: Vec<f32> = (-1..=1)
                    .flat_map(|dy| (-1..=1).map(move |dx| (x + dx, y + dy)))
                    .filter(|&(u, v)| kept(u, v))
                    .map(|(u, v)| m.data[v as usize * SIZE + u as usize])
                    .collect();
                best = best.max(window.iter().sum::<f32>() / window.len() as f32);
            }
        }
        best
    };
    for img in [&clean, &spotted] {
        let out = det.score(img, Some(&ignored)).unwrap();
        let (score, want) = (out.image_score.unwrap(), expected(&out.map));
        assert!((score - want).abs() < 1e-5, "score {score} vs kept-pixel filtered max {want}");
    }
    // Without the mask the spot's probabilities count.
    let plain = det.score(&spotted, None).unwrap();
    let masked = det.score(&spotted, Some(&ignored)).unwrap();
    let spot_max =
        plain.map.data.iter().zip(&ignored.data).filter(|(_, &i)| i).map(|(v, _)| *v).fold(0.0, f32::max);
    println!("spot max {spot_max}, scores {:?} / {:?}", plain.image_score, masked.image_score);

    let wrong = vigil_core::Mask::empty(SIZE + 1, SIZE);
    assert!(det.score(&clean, Some(&wrong)).unwrap_err().to_string().contains("ignore mask"));
    let everything = vigil_core::Mask::new(SIZE, SIZE, vec![true; SIZE * SIZE]).unwrap();
    assert!(det.score(&clean, Some(&everything)).is_err());
}
