//! ResNet-18/50 and Wide-ResNet-50-2: layer shapes with random weights, and a weight round trip
//! through safetensors with PyTorch names. Their activations are checked against torchvision in
//! golden_formula.rs.

use vigil_backbones::{default_device, write_state, Backbone, BackboneKind, FeatureMap};
use vigil_core::Image;

fn test_image(width: usize, height: usize, channels: usize, phase: f32) -> Image {
    let data =
        (0..width * height * channels).map(|i| (((i as f32) * 0.37 + phase).sin() + 1.0) / 2.0).collect();
    Image::new(width, height, channels, data).unwrap()
}

fn layers(names: &[&str]) -> Vec<String> {
    names.iter().map(|s| s.to_string()).collect()
}

fn shapes(maps: &[FeatureMap]) -> Vec<(usize, usize, usize)> {
    maps.iter().map(|m| (m.channels, m.height, m.width)).collect()
}

/// Layer shapes at a 64x48 input, then the same outputs after a save/load round trip.
fn check(kind: BackboneKind, channels: [usize; 4]) {
    let state = Backbone::random_state(kind, 3);
    let backbone = Backbone::from_state(kind, &state, &default_device()).unwrap();
    let mut names = layers(&["maxpool", "layer1", "layer2", "layer3", "layer4"]);
    if kind != BackboneKind::ResNet18 {
        // the bottleneck networks' side tap, before the stage that contains it
        names.insert(1, "layer1.0.conv3".into());
        assert_eq!(backbone.layer_info("layer1.0.conv3").unwrap(), (256, 4));
    }
    assert_eq!(backbone.layer_names(), names);
    for (i, &c) in channels.iter().enumerate() {
        assert_eq!(backbone.layer_info(&format!("layer{}", i + 1)).unwrap(), (c, 4 << i));
    }
    let taps = layers(&["layer4", "maxpool", "layer2"]);
    let images = [test_image(64, 48, 3, 0.0), test_image(30, 20, 1, 1.0)];
    let features = backbone.extract(&images, &taps, (64, 48)).unwrap();
    assert_eq!(features.len(), 2);
    for maps in &features {
        assert_eq!(shapes(maps), vec![(channels[3], 2, 2), (64, 12, 16), (channels[1], 6, 8)]);
        assert!(maps.iter().all(|m| m.data.iter().all(|v| v.is_finite())));
        // Everything after a ReLU is non-negative, and random weights must not give all zeros.
        assert!(maps.iter().all(|m| m.data.iter().all(|&v| v >= 0.0) && m.data.iter().any(|&v| v > 0.0)));
    }
    assert_ne!(features[0][0], features[1][0], "different images give different features");

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(format!("{kind}.safetensors"));
    write_state(&state, &path).unwrap();
    drop(state);
    let loaded = Backbone::load(kind, &path).unwrap();
    assert_eq!(loaded.extract(&images, &taps, (64, 48)).unwrap(), features);
    let logits = loaded.classify(&images[0], (64, 48)).unwrap();
    assert_eq!(logits, backbone.classify(&images[0], (64, 48)).unwrap());
    assert_eq!(logits.len(), 1000);
}

#[test]
fn random_backbones_are_built_from_their_seeded_state() {
    let kind = BackboneKind::ResNet18;
    let image = [test_image(32, 32, 3, 0.5)];
    let taps = layers(&["layer3"]);
    let direct = Backbone::random(kind, 9).extract(&image, &taps, (32, 32)).unwrap();
    let state = Backbone::random_state(kind, 9);
    let via_state = Backbone::from_state(kind, &state, &default_device()).unwrap();
    assert_eq!(via_state.extract(&image, &taps, (32, 32)).unwrap(), direct);
    assert_ne!(Backbone::random(kind, 10).extract(&image, &taps, (32, 32)).unwrap(), direct);
}

#[test]
fn resnet18_shapes_and_round_trip() {
    check(BackboneKind::ResNet18, [64, 128, 256, 512]);
}

#[test]
fn resnet50_shapes_and_round_trip() {
    check(BackboneKind::ResNet50, [256, 512, 1024, 2048]);
}

#[test]
fn wide_resnet50_shapes_and_round_trip() {
    check(BackboneKind::WideResNet50, [256, 512, 1024, 2048]);
}

#[test]
fn weights_of_another_architecture_are_refused_naming_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("resnet18.safetensors");
    write_state(&Backbone::random_state(BackboneKind::ResNet18, 1), &path).unwrap();
    let err = Backbone::load(BackboneKind::ResNet50, &path).err().unwrap().to_string();
    assert!(err.contains("resnet18.safetensors"), "{err}");
    assert!(err.contains("layer1.0.conv1.weight") && err.contains("[64, 64, 3, 3]"), "{err}");
    let err = Backbone::load(BackboneKind::MobileNetV2, &path).err().unwrap().to_string();
    assert!(err.contains("features.0.0.weight") && err.contains("missing"), "{err}");
    let garbage = dir.path().join("garbage.safetensors");
    std::fs::write(&garbage, b"not a tensor file").unwrap();
    let err = Backbone::load(BackboneKind::ResNet18, &garbage).err().unwrap().to_string();
    assert!(err.contains("garbage.safetensors") && err.contains("safetensors"), "{err}");
    let err =
        Backbone::load(BackboneKind::ResNet18, &dir.path().join("absent.pth")).err().unwrap().to_string();
    assert!(err.contains("absent.pth"), "{err}");
}

#[test]
fn extraction_is_per_image_and_batched_consistently() {
    // More images than one internal batch, mixed channel counts and sizes.
    let backbone = Backbone::random(BackboneKind::MobileNetV2, 11);
    let images: Vec<Image> = (0..10).map(|i| test_image(40 + i, 36, 1 + 2 * (i % 2), i as f32)).collect();
    let taps = layers(&["features.6", "features.3"]);
    let together = backbone.extract(&images, &taps, (32, 32)).unwrap();
    assert_eq!(together.len(), 10);
    for (image, maps) in images.iter().zip(&together) {
        assert_eq!(shapes(maps), vec![(32, 4, 4), (24, 8, 8)]);
        let alone = backbone.extract(std::slice::from_ref(image), &taps, (32, 32)).unwrap();
        for (a, b) in alone[0].iter().zip(maps) {
            let diff = a.data.iter().zip(&b.data).fold(0.0f32, |m, (x, y)| m.max((x - y).abs()));
            assert!(diff < 1e-4, "batched and single extraction differ by {diff}");
        }
    }
    assert!(backbone.extract(&images, &layers(&["layer1"]), (32, 32)).is_err());
    assert!(backbone.extract(&images, &[], (32, 32)).is_err());
    assert!(backbone.extract(&images, &taps, (0, 32)).is_err());
}
