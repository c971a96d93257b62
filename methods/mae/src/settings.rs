//! MAE's settings and presets. Written by users as a preset plus the fields that differ from it
//! (`mae:preset=vit_large,weights=mae_visualize_vit_large.pth`); model files keep every field.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use vigil_core::{Result, VigilError};

use crate::model::MaeArch;

/// The named configuration a [`MaeSettings`] starts from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Preset {
    /// A small MAE trained from scratch on the class's normal images on the CPU: 128 px,
    /// patch 8 (16 × 16 patches), width 128, 4 blocks; decoder width 64, 2 blocks.
    #[default]
    Cpu,
    /// `mae_vit_base_patch16_dec512d8b` at 224 px; meant for `weights=mae_visualize_vit_base.pth`.
    VitBase,
    /// `mae_vit_large_patch16_dec512d8b` at 224 px (the seed's network); meant for
    /// `weights=mae_visualize_vit_large.pth`.
    VitLarge,
}

macro_rules! settings_structs {
    ($( $(#[$meta:meta])* $name:ident : $ty:ty ),* $(,)?) => {
        /// Everything that defines an MAE detector and its training.
        #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
        #[serde(try_from = "Value", into = "Value")]
        pub struct MaeSettings {
            pub preset: Preset,
            $( $(#[$meta])* pub $name: $ty, )*
        }

        /// Every field, as model files store them.
        #[derive(Serialize, Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Complete {
            preset: Preset,
            $( $name: $ty, )*
        }

        impl From<MaeSettings> for Complete {
            fn from(s: MaeSettings) -> Self {
                Complete { preset: s.preset, $( $name: s.$name, )* }
            }
        }

        impl From<Complete> for MaeSettings {
            fn from(c: Complete) -> Self {
                MaeSettings { preset: c.preset, $( $name: c.$name, )* }
            }
        }
    };
}

settings_structs! {
    /// Side images are resized to (a multiple of `patch_size`).
    input_size: usize,
    patch_size: usize,
    embed_dim: usize,
    depth: usize,
    num_heads: usize,
    decoder_embed_dim: usize,
    decoder_depth: usize,
    decoder_num_heads: usize,
    mlp_ratio: usize,
    /// A pretrained MAE with its decoder (the official `mae_visualize_vit_*.pth`, or safetensors
    /// with the same names): `fit` then trains nothing. `None`: `fit` pre-trains from scratch
    /// on the normal images.
    weights: Option<PathBuf>,
    /// s of the s × s family of complementary masks (pass (a, b) removes the patches (i, j)
    /// with i mod s = a and j mod s = b): s = 2 gives the four sliding 2 × 2 passes.
    mask_stride: usize,
    /// Also reconstruct on the grid shifted by half a patch and average the two composites
    /// (twice the passes; softens block artefacts).
    shifted_grids: bool,
    /// Side of SSIM's Gaussian window (σ = 1.5); the seed uses 7, 9 or 11.
    ssim_window: usize,
    /// Map = alpha · (1 − SSIM) + (1 − alpha) · L1.
    alpha: f32,
    /// σ in pixels (at `input_size`) of the Gaussian smoothing of the map; 0 turns it off.
    smoothing_sigma: f32,
    /// Side of the square of the grey-level opening that removes salt noise from the map (the
    /// seed's morphology filter, 2 or 4); 0 or 1 turns it off.
    morphology: usize,
    /// Train on per-patch normalised pixels (the official `--norm_pix_loss`); predictions are
    /// then mapped back with each patch's own mean and deviation.
    norm_pix_loss: bool,
    /// Share of patches removed in pre-training (official 0.75).
    mask_ratio: f64,
    epochs: usize,
    batch_size: usize,
    /// Official `blr`: lr = blr · batch_size / 256, linear warm-up then half-cycle cosine.
    base_lr: f64,
    warmup_epochs: usize,
    /// AdamW's decoupled weight decay (official 0.05, betas 0.9 / 0.95).
    weight_decay: f64,
    /// The official pre-training augmentation: random resized crop (scale 0.2–1) and
    /// horizontal flip.
    augment: bool,
    /// Write a resumable checkpoint every this many steps (with a checkpoint folder).
    checkpoint_every: usize,
    /// Random initial weights (no training) from this seed instead: tests only.
    random_weights_seed: Option<u64>,
}

impl Default for MaeSettings {
    fn default() -> Self {
        MaeSettings::of_preset(Preset::Cpu)
    }
}

impl MaeSettings {
    pub fn of_preset(preset: Preset) -> Self {
        let arch = match preset {
            Preset::Cpu => MaeArch {
                image_size: 128,
                patch_size: 8,
                embed_dim: 128,
                depth: 4,
                num_heads: 4,
                decoder_embed_dim: 64,
                decoder_depth: 2,
                decoder_num_heads: 4,
                mlp_ratio: 4,
            },
            Preset::VitBase => MaeArch::vit_base(),
            Preset::VitLarge => MaeArch::vit_large(),
        };
        let cpu = preset == Preset::Cpu;
        MaeSettings {
            preset,
            input_size: arch.image_size,
            patch_size: arch.patch_size,
            embed_dim: arch.embed_dim,
            depth: arch.depth,
            num_heads: arch.num_heads,
            decoder_embed_dim: arch.decoder_embed_dim,
            decoder_depth: arch.decoder_depth,
            decoder_num_heads: arch.decoder_num_heads,
            mlp_ratio: arch.mlp_ratio,
            weights: None,
            mask_stride: 2,
            shifted_grids: false,
            ssim_window: 11,
            alpha: 0.5,
            smoothing_sigma: if cpu { 2.0 } else { 4.0 },
            morphology: if cpu { 2 } else { 4 },
            norm_pix_loss: false,
            mask_ratio: 0.75,
            epochs: if cpu { 200 } else { 400 },
            batch_size: if cpu { 16 } else { 64 },
            base_lr: if cpu { 0.016 } else { 1e-3 },
            warmup_epochs: if cpu { 10 } else { 40 },
            weight_decay: 0.05,
            augment: true,
            checkpoint_every: 50,
            random_weights_seed: None,
        }
    }

    pub fn arch(&self) -> MaeArch {
        MaeArch {
            image_size: self.input_size,
            patch_size: self.patch_size,
            embed_dim: self.embed_dim,
            depth: self.depth,
            num_heads: self.num_heads,
            decoder_embed_dim: self.decoder_embed_dim,
            decoder_depth: self.decoder_depth,
            decoder_num_heads: self.decoder_num_heads,
            mlp_ratio: self.mlp_ratio,
        }
    }

    /// Every field with the value it takes (as model files and `vigil methods` show them).
    pub fn complete(&self) -> Value {
        serde_json::to_value(Complete::from(self.clone())).expect("settings serialise")
    }

    /// The learning rate of the official recipe.
    pub fn learning_rate(&self) -> f64 {
        self.base_lr * self.batch_size as f64 / 256.0
    }

    /// Whether `fit` trains the network (no pretrained weights, no test-only random weights).
    pub fn trains(&self) -> bool {
        self.weights.is_none() && self.random_weights_seed.is_none()
    }

    pub fn validate(&self) -> Result<()> {
        self.arch().validate()?;
        let bad = |m: &str| Err(VigilError::Config(format!("mae: {m}")));
        let grid = self.input_size / self.patch_size;
        if self.mask_stride < 2 || self.mask_stride > grid {
            return bad("mask_stride must be at least 2 and at most the patches per side");
        }
        if self.shifted_grids && (self.patch_size < 2 || grid < 2) {
            return bad("shifted_grids needs patches of at least 2 px and 2 patches per side");
        }
        if self.ssim_window < 3 || self.ssim_window.is_multiple_of(2) {
            return bad("ssim_window must be odd and at least 3");
        }
        let sigma_ok = self.smoothing_sigma >= 0.0 && self.smoothing_sigma.is_finite();
        if !((0.0..=1.0).contains(&self.alpha) && sigma_ok) {
            return bad("alpha must be in [0, 1] and smoothing_sigma >= 0");
        }
        if !(self.mask_ratio > 0.0 && self.mask_ratio < 1.0) {
            return bad("mask_ratio must be in (0, 1)");
        }
        let kept = ((grid * grid) as f64 * (1.0 - self.mask_ratio)) as usize;
        if kept == 0 || kept == grid * grid {
            return bad("mask_ratio must keep at least one patch and remove at least one");
        }
        if self.epochs == 0 || self.batch_size == 0 || self.checkpoint_every == 0 {
            return bad("epochs, batch_size and checkpoint_every must be positive");
        }
        if !(self.base_lr > 0.0 && self.base_lr.is_finite() && self.weight_decay >= 0.0) {
            return bad("base_lr must be > 0 and weight_decay >= 0");
        }
        Ok(())
    }
}

impl TryFrom<Value> for MaeSettings {
    type Error = String;

    /// The preset named (default `cpu`) with the given fields over it; `null` keeps the preset's.
    fn try_from(value: Value) -> std::result::Result<Self, String> {
        let Value::Object(given) = value else {
            return Err("mae settings must be a JSON object".into());
        };
        let preset: Preset = match given.get("preset") {
            Some(p) if !p.is_null() => {
                serde_json::from_value(p.clone()).map_err(|e| format!("mae preset: {e}"))?
            }
            _ => Preset::default(),
        };
        let mut merged = MaeSettings::of_preset(preset).complete();
        let object = merged.as_object_mut().expect("settings are an object");
        for (key, v) in given {
            if !v.is_null() {
                object.insert(key, v);
            } else if !object.contains_key(&key) {
                return Err(format!("unknown mae setting '{key}'"));
            }
        }
        serde_json::from_value::<Complete>(merged)
            .map(MaeSettings::from)
            .map_err(|e| format!("mae settings: {e}"))
    }
}

impl From<MaeSettings> for Value {
    /// The preset and the fields that differ from it; every other field `null` (the preset's
    /// value), so the keys list every setting.
    fn from(s: MaeSettings) -> Value {
        let base = MaeSettings::of_preset(s.preset).complete();
        let mut full = s.complete();
        let object = full.as_object_mut().expect("settings are an object");
        for (key, v) in object.iter_mut() {
            if key != "preset" && base.get(key) == Some(v) {
                *v = Value::Null;
            }
        }
        full
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_round_trip_as_overrides() {
        let large: MaeSettings =
            serde_json::from_value(serde_json::json!({ "preset": "vit_large" })).unwrap();
        assert_eq!(large.arch(), MaeArch::vit_large());
        let json = serde_json::to_value(&large).unwrap();
        assert_eq!(json["preset"], "vit_large");
        assert_eq!(json["epochs"], Value::Null, "preset values are not repeated");
        assert_eq!(serde_json::from_value::<MaeSettings>(json).unwrap(), large);
        let custom: MaeSettings =
            serde_json::from_value(serde_json::json!({ "epochs": 3, "weights": "a.pth" })).unwrap();
        assert_eq!(custom.epochs, 3);
        assert_eq!(custom.weights, Some(PathBuf::from("a.pth")));
        assert!(!custom.trains());
        let json = serde_json::to_value(&custom).unwrap();
        let given: Vec<&String> =
            json.as_object().unwrap().iter().filter(|(_, v)| !v.is_null()).map(|(k, _)| k).collect();
        assert_eq!(given, ["epochs", "preset", "weights"]);
        assert_eq!(serde_json::from_value::<MaeSettings>(json).unwrap(), custom);
        assert_eq!(serde_json::from_value::<MaeSettings>(custom.complete()).unwrap(), custom);
        assert!(serde_json::from_value::<MaeSettings>(serde_json::json!({ "epoch": 3 })).is_err());
        assert!(serde_json::from_value::<MaeSettings>(serde_json::json!({ "epochs": "x" })).is_err());
    }

    #[test]
    fn invalid_values_are_refused() {
        assert!(MaeSettings::default().validate().is_ok());
        for broken in [
            MaeSettings { input_size: 100, ..MaeSettings::default() },
            MaeSettings { mask_stride: 1, ..MaeSettings::default() },
            MaeSettings { ssim_window: 8, ..MaeSettings::default() },
            MaeSettings { alpha: f32::NAN, ..MaeSettings::default() },
            MaeSettings { mask_ratio: 1.0, ..MaeSettings::default() },
            MaeSettings { num_heads: 3, ..MaeSettings::default() },
            MaeSettings { epochs: 0, ..MaeSettings::default() },
        ] {
            assert!(broken.validate().is_err(), "{broken:?}");
        }
    }
}
