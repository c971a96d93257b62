//! ResNet-18, ResNet-50, Wide-ResNet-50-2, EfficientNet-B5 and a small CaiT against torchvision
//! and timm.
//!
//! No weights are stored: both sides fill every tensor from a formula of its name, shape and
//! element index (`tests/fixtures/golden_weights.py`, copied below), and the fixtures hold only
//! the input and the reference activations that `make_golden_resnet.py`,
//! `make_golden_efficientnet_b5.py` and `make_golden_cait.py` computed in float64 with torchvision
//! and timm. The CNNs are checked on both engines; CaiT has only the burn one.

use std::path::Path;

use burn::tensor::{Tensor, TensorData};
use vigil_backbones::{default_device, Backbone, BackboneKind, Cait, CaitConfig, Engine};
use vigil_core::TensorBag;

/// Bound on the largest absolute difference over the reference's largest magnitude. The
/// reference is computed in float64 and rounded once, so what remains is vigil's float32
/// rounding, far below this; one wrong layer gives errors of order 1.
const TOLERANCE: f32 = 1e-4;

fn fnv1a64(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3))
}

/// `n` values in [0, 1): splitmix64's outputs for the stream seeded by the name's hash.
fn uniform(name: &str, n: usize) -> impl Iterator<Item = f64> {
    let key = fnv1a64(name);
    (1..=n as u64).map(move |i| {
        let mut z = key.wrapping_add(i.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        (z >> 11) as f64 * 2f64.powi(-53)
    })
}

/// The formula of `golden_weights.golden_value`, operation for operation, so the bits agree.
fn golden_value(name: &str, shape: &[usize]) -> Vec<f32> {
    let n = shape.iter().product();
    let leaf = name.rsplit('.').next().unwrap();
    let fan_in_scale = (6.0 / shape.iter().skip(1).product::<usize>() as f64).sqrt();
    uniform(name, n)
        .map(|u| {
            let v = 2.0 * u - 1.0;
            let x = match leaf {
                "running_var" => 0.5 + u,
                "running_mean" => 0.1 * v,
                "weight" if shape.len() >= 2 => v * fan_in_scale,
                "weight" => 1.0 + 0.2 * v,
                "bias" => 0.1 * v,
                _ if leaf.starts_with("gamma") => 0.5 + 0.5 * u,
                _ => 2.0 * v,
            };
            x as f32
        })
        .collect()
}

/// Every tensor `template` names, with its shape, filled from the formula.
fn golden_state(template: &TensorBag) -> TensorBag {
    let mut state = TensorBag::new();
    for name in template.names() {
        let shape = template.shape(name).unwrap().to_vec();
        state.put_f32(name, &shape, golden_value(name, &shape));
    }
    state
}

fn fixture(name: &str) -> TensorBag {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name);
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    TensorBag::from_safetensors(&bytes).unwrap()
}

/// The fixture's input, after checking that this file's formula reproduces it bit for bit
/// (if it does not, the weights differ too and every comparison below would be meaningless).
fn input(golden: &TensorBag, shape: [usize; 4]) -> Tensor<4> {
    let stored = golden.f32("input", Some(&shape)).unwrap();
    assert!(stored == golden_value("input", &shape), "the Rust formula differs from golden_weights.py");
    Tensor::from_data(TensorData::new(stored, shape), &default_device())
}

fn relative_max_error(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    assert!(scale > 0.0, "an all-zero reference checks nothing");
    got.iter().zip(want).fold(0f32, |m, (a, b)| m.max((a - b).abs())) / scale
}

fn check<const D: usize>(what: &str, got: Tensor<D>, golden: &TensorBag, key: &str) {
    let want_shape = golden.shape(key).unwrap().to_vec();
    assert_eq!(got.dims().to_vec(), want_shape, "{what}: shape");
    let error = relative_max_error(
        &got.into_data().try_into_vec_as::<f32>().unwrap(),
        &golden.f32(key, None).unwrap(),
    );
    println!("{what}: relative max error {error:.2e}");
    assert!(error < TOLERANCE, "{what}: relative max error {error:.2e}");
}

/// The stages, the logits and, for the bottleneck networks (`extra_taps`), `layer1.0.conv3`: the
/// first bottleneck's third convolution before its batch norm (a torchvision forward hook on
/// `layer1[0].conv3`), a side tap that must not disturb the stages after it.
fn check_resnet(kind: BackboneKind, fixture_name: &str, extra_taps: &[&str]) {
    let golden = fixture(fixture_name);
    let state = golden_state(&Backbone::random_state(kind, 0));
    let backbone = Backbone::from_state(kind, &state, &default_device()).unwrap();
    drop(state);
    let taps: Vec<String> = ["maxpool", "layer1", "layer2", "layer3", "layer4"]
        .iter()
        .chain(extra_taps)
        .map(|tap| tap.to_string())
        .collect();
    let batch = input(&golden, [1, 3, 64, 64]);
    for engine in [Engine::Kernels, Engine::Burn] {
        let backbone = backbone.clone().with_engine(engine);
        let features = backbone.extract_tensor(batch.clone(), &taps).unwrap();
        for (tap, feature) in taps.iter().zip(features) {
            check(&format!("{kind} {engine:?} {tap}"), feature, &golden, tap);
        }
        let logits = backbone.classify_tensor(batch.clone()).unwrap();
        check(&format!("{kind} {engine:?} logits"), logits, &golden, "logits");
    }
}

#[test]
fn resnet18_matches_torchvision() {
    check_resnet(BackboneKind::ResNet18, "golden_resnet18.safetensors", &[]);
}

#[test]
fn resnet50_matches_torchvision() {
    check_resnet(BackboneKind::ResNet50, "golden_resnet50.safetensors", &["layer1.0.conv3"]);
}

#[test]
fn wide_resnet50_2_matches_torchvision() {
    check_resnet(BackboneKind::WideResNet50, "golden_wide_resnet50_2.safetensors", &["layer1.0.conv3"]);
}

/// `make_golden_efficientnet_b5.py`'s `damp_residual_branches`: the weight and bias of the
/// projection batch norm (`block.3.1`, `block.2.1` in stage 1) of every residual block
/// `features.S.B`, B >= 1, halved (exact), without which the formula network is too
/// ill-conditioned for float32 to follow float64.
fn damp_residual_branches(state: &TensorBag) -> TensorBag {
    let mut damped = TensorBag::new();
    for name in state.names() {
        let shape = state.shape(name).unwrap().to_vec();
        let mut values = state.f32(name, None).unwrap();
        let parts: Vec<&str> = name.split('.').collect();
        if let ["features", stage, block, "block", part, "1", "weight" | "bias"] = parts[..] {
            let (stage, block, part): (usize, usize, usize) =
                (stage.parse().unwrap(), block.parse().unwrap(), part.parse().unwrap());
            if block >= 1 && part == if stage == 1 { 2 } else { 3 } {
                values.iter_mut().for_each(|v| *v *= 0.5);
            }
        }
        damped.put_f32(name, &shape, values);
    }
    damped
}

/// SiLU, squeeze-excitation, batch norm eps 1e-3 and the block names torchvision's state dict
/// uses: two early blocks, CS-Flow's `features.6.8`, the head and the logits.
#[test]
fn efficientnet_b5_matches_torchvision() {
    let kind = BackboneKind::EfficientNetB5;
    let golden = fixture("golden_efficientnet_b5.safetensors");
    let state = damp_residual_branches(&golden_state(&Backbone::random_state(kind, 0)));
    let backbone = Backbone::from_state(kind, &state, &default_device()).unwrap();
    drop(state);
    let taps: Vec<String> = ["features.2.4", "features.3.4", "features.6.8", "features.8"]
        .iter()
        .map(|t| t.to_string())
        .collect();
    let batch = input(&golden, [1, 3, 64, 64]);
    for engine in [Engine::Kernels, Engine::Burn] {
        let backbone = backbone.clone().with_engine(engine);
        let features = backbone.extract_tensor(batch.clone(), &taps).unwrap();
        for (tap, feature) in taps.iter().zip(features) {
            check(&format!("{kind} {engine:?} {tap}"), feature, &golden, tap);
        }
        let logits = backbone.classify_tensor(batch.clone()).unwrap();
        check(&format!("{kind} {engine:?} logits"), logits, &golden, "logits");
    }
}

#[test]
fn small_cait_matches_timm_whole_and_truncated() {
    let golden = fixture("golden_cait.safetensors");
    let config = |last_block| CaitConfig {
        image_size: 32,
        patch_size: 8,
        embed_dim: 32,
        depth: 4,
        num_heads: 4,
        mlp_ratio: 4,
        last_block,
    };
    let batch = input(&golden, [1, 3, 32, 32]);
    // "full" is timm's forward_features without the class token; "truncated" stops after
    // block 1, as U-Flow's extractor does.
    for (last_block, key) in [(3, "full"), (1, "truncated")] {
        let config = config(last_block);
        let state = golden_state(&Cait::random_state(&config, 0).unwrap());
        let cait = Cait::from_state(&config, &state, &default_device()).unwrap();
        check(&format!("CaiT blocks 0..={last_block}"), cait.tokens(batch.clone()).unwrap(), &golden, key);
    }
}
