//! The U-Net against DDAD's PyTorch `UNetModel` (fixture from `tests/fixtures/make_golden_unet.py`):
//! the same weights, loaded by their state_dict names, give the same noise prediction; and the
//! noise schedule equals the one PyTorch computes.

use std::path::Path;

use burn::tensor::Device;
use vigil_core::TensorBag;
use vigil_diffusion::{NoiseSchedule, UNet, UNetSettings};
use vigil_nn::{tensor_from_vec, tensor_to_vec};

fn fixture() -> TensorBag {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/golden_unet.safetensors");
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    TensorBag::from_safetensors(&bytes).unwrap()
}

/// The fixture's configuration (`CONFIG` in the script).
fn settings() -> UNetSettings {
    UNetSettings {
        image_size: 16,
        in_channels: 3,
        base_channels: 32,
        channel_mults: vec![1, 1],
        num_res_blocks: 1,
        heads: 2,
        dropout: 0.0,
        attention_resolutions: vec![8],
    }
}

/// The weights alone: the fixture's state dict without the reference tensors.
fn weights(bag: &TensorBag) -> TensorBag {
    let mut state = TensorBag::new();
    for name in bag.names().filter(|n| !n.starts_with("golden.")) {
        state.put_f32(name, bag.shape(name).unwrap(), bag.f32(name, None).unwrap());
    }
    state
}

#[test]
fn unet_matches_pytorch() {
    let bag = fixture();
    let device = Device::flex();
    let net = UNet::new(&settings(), &device).unwrap().load_state_dict(&weights(&bag)).unwrap();
    let x = tensor_from_vec(bag.f32("golden.input", Some(&[2, 3, 16, 16])).unwrap(), [2, 3, 16, 16], &device);
    let t = bag.f32("golden.timesteps", Some(&[2])).unwrap();
    let got = tensor_to_vec(net.forward(x, &t, None));
    let want = bag.f32("golden.output", Some(&[2, 3, 16, 16])).unwrap();
    let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let error = got.iter().zip(&want).fold(0.0f32, |m, (a, b)| m.max((a - b).abs())) / scale;
    println!("U-Net vs PyTorch: relative max error {error:.2e} (output scale {scale:.3})");
    assert!(scale > 0.1, "the reference output is not trivial");
    assert!(error < 1e-4, "relative max error {error:.2e}");

    // The loaded network writes the same state dict back (names and values).
    assert_eq!(net.state_dict(), weights(&bag));
}

#[test]
fn state_dict_names_are_checked_on_load() {
    let bag = weights(&fixture());
    let device = Device::flex();
    // DataParallel's "module." prefix is accepted.
    let mut prefixed = TensorBag::new();
    for name in bag.names() {
        prefixed.put_f32(&format!("module.{name}"), bag.shape(name).unwrap(), bag.f32(name, None).unwrap());
    }
    let net = UNet::new(&settings(), &device).unwrap().load_state_dict(&prefixed).unwrap();
    assert_eq!(net.state_dict(), bag);
    // Another architecture is refused, naming the tensor.
    let wider = UNetSettings { base_channels: 64, ..settings() };
    let err = UNet::new(&wider, &device).unwrap().load_state_dict(&bag).unwrap_err().to_string();
    assert!(err.contains("shape"), "{err}");
    let deeper = UNetSettings { num_res_blocks: 2, ..settings() };
    assert!(UNet::new(&deeper, &device).unwrap().load_state_dict(&bag).is_err());
    let mut extra = bag.clone();
    extra.put_f32("up.9.0.in_layers.2.weight", &[1], vec![0.0]);
    let err = UNet::new(&settings(), &device).unwrap().load_state_dict(&extra).unwrap_err().to_string();
    assert!(err.contains("up.9.0.in_layers.2.weight"), "{err}");

    // From a file, by the backbones' loader; errors name the file.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("unet.safetensors");
    std::fs::write(&path, bag.to_safetensors().unwrap()).unwrap();
    let from_file = UNet::new(&settings(), &device).unwrap().load_file(&path).unwrap();
    assert_eq!(from_file.state_dict(), bag);
    let err = UNet::new(&wider, &device).unwrap().load_file(&path).unwrap_err().to_string();
    assert!(err.contains("unet.safetensors"), "{err}");
}

#[test]
fn schedule_matches_pytorch() {
    let want = fixture().f32("golden.alpha_bars", Some(&[1000])).unwrap();
    let schedule = NoiseSchedule::ddad();
    for (t, &a) in want.iter().enumerate() {
        assert_eq!(schedule.alpha_bar(t as i64), a, "alpha_bar({t})");
    }
}
