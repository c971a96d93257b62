//! vigil's MAE against the reference PyTorch network (He et al.'s MaskedAutoencoderViT on timm's
//! blocks) from seeded random weights: encoder output, decoder predictions and both losses for a
//! given masking noise, predictions for a given mask, and an official-format `.pth` checkpoint
//! ({"model": state_dict}). Fixtures written by `make_golden.py` beside this file.

use std::path::{Path, PathBuf};

use burn::tensor::Device;
use vigil_core::TensorBag;
use vigil_mae::{masked_loss, Mae, MaeArch, MaskPlan};
use vigil_nn::{tensor_from_vec, tensor_to_vec};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests").join(name)
}

fn assert_close(what: &str, got: &[f32], expected: &[f32], tolerance: f32) {
    assert_eq!(got.len(), expected.len(), "{what}: length");
    let worst = got.iter().zip(expected).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    let scale = expected.iter().map(|v| v.abs()).fold(0f32, f32::max);
    assert!(worst <= tolerance * scale.max(1.0), "{what}: largest difference {worst} (values up to {scale})");
}

fn tiny() -> MaeArch {
    MaeArch {
        image_size: 32,
        patch_size: 8,
        embed_dim: 64,
        depth: 2,
        num_heads: 4,
        decoder_embed_dim: 32,
        decoder_depth: 1,
        decoder_num_heads: 4,
        mlp_ratio: 4,
    }
}

fn rows(bag: &TensorBag, name: &str) -> Vec<Vec<f32>> {
    let shape = bag.shape(name).unwrap().to_vec();
    let values = bag.f32(name, None).unwrap();
    values.chunks(shape[1..].iter().product()).map(<[f32]>::to_vec).collect()
}

#[test]
fn forward_and_loss_match_the_reference_for_given_noise_and_a_given_mask() {
    let bytes = std::fs::read(fixture("golden.safetensors")).unwrap();
    let bag = TensorBag::from_safetensors(&bytes).unwrap();
    let device = Device::flex();
    let arch = tiny();
    let mae = Mae::from_state(&arch, &bag, "model.", &device).unwrap();
    let images = tensor_from_vec(bag.f32("golden.images", None).unwrap(), [2, 3, 32, 32], &device);

    let plan = MaskPlan::from_noise(&rows(&bag, "golden.noise"), 0.75);
    assert_eq!(plan.keep, 4);
    assert_eq!(plan.mask().concat(), bag.f32("golden.mask", None).unwrap());
    let latent = mae.forward_encoder(images.clone(), &plan);
    assert_eq!(latent.dims(), [2, 5, 64]);
    assert_close("latent", &tensor_to_vec(latent.clone()), &bag.f32("golden.latent", None).unwrap(), 1e-5);
    let pred = mae.forward_decoder(latent, &plan);
    assert_eq!(pred.dims(), [2, 16, 192]);
    assert_close("pred", &tensor_to_vec(pred.clone()), &bag.f32("golden.pred", None).unwrap(), 1e-5);
    for (norm_pix, name) in [(false, "golden.loss"), (true, "golden.loss_norm_pix")] {
        let loss = masked_loss(pred.clone(), images.clone(), &plan, 8, norm_pix).into_scalar::<f32>();
        assert_close(name, &[loss], &bag.f32(name, None).unwrap(), 1e-5);
    }

    let removed: Vec<bool> = bag.f32("golden.given_mask", None).unwrap().iter().map(|&v| v == 1.0).collect();
    assert_eq!(removed.iter().filter(|&&r| r).count(), 4);
    let given = MaskPlan::from_removed(&removed, 2);
    let pred_given = tensor_to_vec(mae.forward(images, &given));
    assert_close("pred_given", &pred_given, &bag.f32("golden.pred_given", None).unwrap(), 1e-5);
}

#[test]
fn an_official_format_checkpoint_loads_by_name_and_predicts_as_the_reference() {
    let state = vigil_backbones::read_state(&fixture("official_format.pth")).unwrap();
    assert!(state.shape("model.blocks.0.attn.qkv.weight").is_ok());
    let arch = MaeArch {
        image_size: 8,
        patch_size: 4,
        embed_dim: 16,
        depth: 1,
        num_heads: 2,
        decoder_embed_dim: 8,
        decoder_depth: 1,
        decoder_num_heads: 2,
        mlp_ratio: 4,
    };
    let device = Device::flex();
    let mae = Mae::from_state(&arch, &state, "model.", &device).unwrap();
    let images = tensor_from_vec(state.f32("golden.images", None).unwrap(), [1, 3, 8, 8], &device);
    let removed: Vec<bool> = state.f32("golden.removed", None).unwrap().iter().map(|&v| v == 1.0).collect();
    let pred = tensor_to_vec(mae.forward(images, &MaskPlan::from_removed(&removed, 1)));
    assert_close("pred", &pred, &state.f32("golden.pred", None).unwrap(), 1e-5);
    // Another architecture does not half-load: the wrong width is named.
    let wider = MaeArch { embed_dim: 32, ..arch };
    let error = Mae::from_state(&wider, &state, "model.", &device).unwrap_err().to_string();
    assert!(error.contains("shape") || error.contains("model."), "{error}");
}
