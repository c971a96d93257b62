//! The trainable backbones against the inference networks: with the same weights they give the
//! same features, their state rebuilds an inference network, and they train.

use burn::module::Module;
use burn::tensor::{Device, Tensor, TensorData};
use vigil_backbones::{Backbone, BackboneKind, TrainableBackbone};
use vigil_core::TensorBag;

fn input(side: usize, seed: u32) -> Tensor<4> {
    let n = 2 * 3 * side * side;
    let values: Vec<f32> = (0..n)
        .map(|i| ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) % 1000) as f32 / 500.0 - 1.0)
        .collect();
    Tensor::from_data(TensorData::new(values, [2, 3, side, side]), &Device::flex())
}

fn values(t: Tensor<4>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_into_vec::<f32>().unwrap()
}

fn assert_close(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    let scale = want.iter().map(|v| v.abs()).fold(0f32, f32::max).max(1e-6);
    let worst = got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(worst <= 1e-4 * scale, "{what}: max error {worst} against max |value| {scale}");
}

fn cases() -> [(BackboneKind, [&'static str; 3], usize); 4] {
    [
        (BackboneKind::MobileNetV2, ["features.3", "features.6", "features.13"], 48),
        // 40 px: odd sizes on the way down exercise TensorFlow's asymmetric "SAME" padding.
        (BackboneKind::EfficientNetLite0, ["_blocks.2", "_blocks.4", "_blocks.10"], 40),
        (BackboneKind::ResNet18, ["layer1", "layer2", "layer3"], 48),
        (BackboneKind::ResNet50, ["maxpool", "layer1", "layer2"], 32),
    ]
}

/// A pretrained state dict (here a seeded random one, with batch-norm statistics away from the
/// identity) loaded into the trainable network reproduces the inference network's features;
/// the trainable network's own state rebuilds an inference network with its features.
#[test]
fn with_the_teachers_weights_the_trainable_network_gives_the_teachers_features() {
    let device = Device::flex();
    for (kind, taps, side) in cases() {
        let taps: Vec<String> = taps.iter().map(|t| t.to_string()).collect();
        let state = Backbone::random_state(kind, 3);
        let teacher = Backbone::from_state(kind, &state, &device).unwrap();
        let student = TrainableBackbone::new(kind, &taps[2], 9, &device).unwrap().load_state(&state).unwrap();
        let x = input(side, 1);
        let want = teacher.extract_tensor(x.clone(), &taps).unwrap();
        let got = student.forward(x.clone(), &taps).unwrap();
        for ((w, g), tap) in want.into_iter().zip(got).zip(&taps) {
            assert_eq!(w.dims(), g.dims(), "{kind} {tap}");
            assert_close(&values(g), &values(w), &format!("{kind} {tap}"));
        }
        // A fresh student differs, and its own state makes an inference network with its features.
        let fresh = TrainableBackbone::new(kind, &taps[2], 9, &device).unwrap();
        let rebuilt = Backbone::from_partial_state(kind, &fresh.state(), &device).unwrap();
        let mine = fresh.forward(x.clone(), &taps).unwrap();
        let inference = rebuilt.extract_tensor(x, &taps).unwrap();
        for ((m, i), tap) in mine.into_iter().zip(inference).zip(&taps) {
            assert_close(&values(i), &values(m), &format!("{kind} {tap} rebuilt"));
        }
        // The state stops at the last tap: tensors of later stages are not part of it.
        assert!(fresh.state().names().count() < state.names().count());
    }
}

#[test]
fn states_are_checked_by_name_and_shape() {
    let device = Device::flex();
    let kind = BackboneKind::MobileNetV2;
    let student = TrainableBackbone::new(kind, "features.6", 1, &device).unwrap();
    let state = student.state();
    assert!(state.shape("features.6.conv.1.0.weight").is_ok());
    assert!(state.shape("features.6.conv.1.1.running_var").is_ok());
    assert!(state.shape("features.7.conv.0.0.weight").is_err());
    let mut broken = state.clone();
    broken.put_f32("features.2.conv.0.0.weight", &[1], vec![0.0]);
    let error =
        TrainableBackbone::new(kind, "features.6", 1, &device).unwrap().load_state(&broken).unwrap_err();
    assert!(error.to_string().contains("shape"), "{error}");
    let mut holed = TensorBag::new();
    for name in state.names().filter(|n| !n.starts_with("features.2.")) {
        holed.put_f32(name, state.shape(name).unwrap(), state.f32(name, None).unwrap());
    }
    let error = Backbone::from_partial_state(kind, &holed, &device).err().unwrap().to_string();
    assert!(error.contains("features.3") && error.contains("features.2"), "{error}");
    assert!(TrainableBackbone::new(kind, "layer9", 1, &device).is_err());
    // Same seed, same network; another seed, another one.
    assert_eq!(TrainableBackbone::new(kind, "features.6", 1, &device).unwrap().state(), state);
    assert_ne!(TrainableBackbone::new(kind, "features.6", 2, &device).unwrap().state(), state);
}

/// On an autodiff device the network trains: batch statistics normalise, gradients reach the
/// first convolution, and the running statistics move.
#[test]
fn the_trainable_network_has_gradients_and_updates_its_statistics() {
    let device = Device::flex().autodiff();
    let kind = BackboneKind::ResNet18;
    let student = TrainableBackbone::new(kind, "layer2", 4, &device).unwrap();
    let before = student.state();
    let x = input(32, 5).to_device(&device);
    let out = student.forward(x, &["layer2".to_string()]).unwrap().remove(0);
    let grads = out.powf_scalar(2.0).sum().backward();
    let grads = burn::optim::GradientsParams::from_grads(grads, &student);
    assert!(grads.len() > 10, "only {} parameters have gradients", grads.len());
    let after = student.valid().state();
    let moved = |name: &str| before.f32(name, None).unwrap() != after.f32(name, None).unwrap();
    assert!(moved("bn1.running_mean") && moved("layer2.0.bn2.running_var"));
    assert!(!moved("conv1.weight"));
}
