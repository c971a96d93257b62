//! Pretrained MobileNetV2 and EfficientNet-Lite0 against reference activations computed by an
//! independent numpy implementation (shared/weights/*/golden_*.safetensors). Skipped when the
//! shared folder is absent, failed instead with VIGIL_REQUIRE_SHARED=1.

use std::path::Path;

use burn::tensor::{Tensor, TensorData};
use vigil_backbones::{Backbone, BackboneKind, Engine};
use vigil_core::shared_data::shared_path;
use vigil_core::{Image, TensorBag};

fn read_bag(path: &Path) -> TensorBag {
    TensorBag::from_safetensors(&std::fs::read(path).unwrap()).unwrap()
}

/// Largest absolute difference, relative to the reference's largest magnitude (at least 1).
fn relative_max_error(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(1.0f32, |m, v| m.max(v.abs()));
    got.iter().zip(want).fold(0.0f32, |m, (a, b)| m.max((a - b).abs())) / scale
}

fn top5(logits: &[f32]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    order.truncate(5);
    order
}

/// `taps` pairs a backbone layer with the golden file's name for it. Both engines are checked.
fn check_golden(kind: BackboneKind, folder: &str, taps: &[(&str, &str)]) {
    let Some(weights) = shared_path("weights") else { return };
    let dir = weights.join(folder);
    let loaded = Backbone::load(kind, &dir.join(format!("{folder}.safetensors"))).unwrap();
    for engine in [Engine::Kernels, Engine::Burn] {
        check_engine(&loaded.clone().with_engine(engine), &dir, taps);
    }
}

fn check_engine(backbone: &Backbone, dir: &Path, taps: &[(&str, &str)]) {
    let (kind, folder, engine) =
        (backbone.kind(), dir.file_name().unwrap().to_str().unwrap(), backbone.engine());
    let golden = read_bag(&dir.join(format!("golden_{folder}.safetensors")));
    let top5_json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("golden_top5.json")).unwrap()).unwrap();
    let layers: Vec<String> = taps.iter().map(|(layer, _)| layer.to_string()).collect();
    for image in ["chelsea", "coffee"] {
        let input = golden.f32(&format!("{image}.input"), Some(&[1, 3, 224, 224])).unwrap();
        let batch =
            || Tensor::<4>::from_data(TensorData::new(input.clone(), [1, 3, 224, 224]), backbone.device());
        let features = backbone.extract_tensor(batch(), &layers).unwrap();
        for ((layer, golden_name), feature) in taps.iter().zip(features) {
            let want_shape = golden.shape(&format!("{image}.{golden_name}")).unwrap().to_vec();
            assert_eq!(feature.dims().to_vec(), want_shape, "{image} {layer}");
            let want = golden.f32(&format!("{image}.{golden_name}"), None).unwrap();
            let got = feature.into_data().try_into_vec_as::<f32>().unwrap();
            let error = relative_max_error(&got, &want);
            println!("{kind} {engine:?} {image} {layer}: relative max error {error:.2e}");
            assert!(error < 1e-3, "{image} {layer}: relative max error {error}");
        }
        let logits = backbone.classify_tensor(batch()).unwrap().into_data().try_into_vec_as::<f32>().unwrap();
        let want = golden.f32(&format!("{image}.logits"), Some(&[1, 1000])).unwrap();
        let error = relative_max_error(&logits, &want);
        println!("{kind} {engine:?} {image} logits: relative max error {error:.2e}");
        assert!(error < 1e-3, "{image} logits: relative max error {error}");
        let want_top5: Vec<usize> = top5_json[image]["top5_class_index"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect();
        assert_eq!(top5(&logits), want_top5, "{image} top-5");

        // The same input as an image in [0, 1] through the public preprocessing path (the
        // resize is the identity at 224x224), which must apply this backbone's normalisation.
        let (mean, std) = kind.normalization();
        let plane = 224 * 224;
        let pixels = input.iter().enumerate().map(|(i, v)| v * std[i / plane] + mean[i / plane]).collect();
        let picture = Image::new(224, 224, 3, pixels).unwrap();
        let from_image = backbone.classify(&picture, (224, 224)).unwrap();
        let error = relative_max_error(&from_image, &want);
        assert!(error < 1e-3, "{image} logits through classify(): relative max error {error}");
    }
}

#[test]
fn mobilenet_v2_matches_reference_activations() {
    check_golden(
        BackboneKind::MobileNetV2,
        "mobilenet_v2",
        &[
            ("features.3", "features.3"),
            ("features.6", "features.6"),
            ("features.13", "features.13"),
            ("features.17", "features.17"),
            ("features.18", "features.18"),
        ],
    );
}

#[test]
fn efficientnet_lite0_matches_reference_activations() {
    check_golden(
        BackboneKind::EfficientNetLite0,
        "efficientnet_lite0",
        &[
            ("_blocks.2", "_blocks.2"),
            ("_blocks.4", "_blocks.4"),
            ("_blocks.10", "_blocks.10"),
            ("_blocks.15", "_blocks.15"),
            ("_conv_head", "head"),
        ],
    );
}
