//! CS-Flow's settings and its presets.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use vigil_backbones::BackboneKind;
use vigil_core::{Result, VigilError};

/// The named configuration a [`CsflowSettings`] starts from; every field can be overridden.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Preset {
    /// The paper's backbone tap, flow and training: EfficientNet-B5 `features.6.8` (304 channels,
    /// stride 32) at 768 px, 3 scales, 4 blocks, 1024 hidden channels, 240 epochs in batches of 16.
    /// No B5 weights are shipped: `weights` must name torchvision's `efficientnet_b5` state dict.
    Paper,
    /// EfficientNet-Lite0 `_blocks.10` (stride 16) on the image at 128, 64 and 32 px, the paper's
    /// flow, 12 epochs in batches of 8 (a 26-image PIPED fit took 600 s with about a third of a
    /// core on the loaded shared machine; not yet timed quietly).
    #[default]
    Cpu,
}

/// Everything that defines a CS-Flow model and its training.
///
/// Read and written as a [`CsflowSpec`]: a preset plus the fields that differ from it (`null`
/// elsewhere), so `csflow:preset=paper,epochs=100` means "the paper preset with 100 epochs".
/// Model files store every field ([`CsflowSpec::complete`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(from = "CsflowSpec", into = "CsflowSpec")]
pub struct CsflowSettings {
    pub preset: Preset,
    pub backbone: BackboneKind,
    /// Backbone weights; `None` looks for the shipped ones (`vigil_backbones::default_weights_path`;
    /// EfficientNet-B5's are not shipped, so the paper preset needs this set).
    pub weights: Option<PathBuf>,
    /// Random backbone weights from this seed instead of pretrained ones (tests only).
    pub random_weights_seed: Option<u64>,
    /// The backbone layer tapped at every scale (the paper: EfficientNet-B5 `features.6.8`).
    pub layer: String,
    /// Square side the image is resized to; scale s sees it at input_size / 2^s.
    pub input_size: usize,
    /// Image scales (the paper: 3).
    pub scales: usize,
    /// Cross-scale coupling blocks (the paper: 4).
    pub coupling_blocks: usize,
    /// Hidden channels of the cross-convolution subnets (the paper: 1024).
    pub hidden_channels: usize,
    /// Subnet kernel of every block but the last (3), and of the last (5).
    pub kernel_size: usize,
    pub last_kernel_size: usize,
    /// Soft clamp of the coupling log-scales: s ↦ clamp·0.636·atan(s/clamp) (the paper: 3).
    pub clamp: f32,
    pub epochs: usize,
    pub batch_size: usize,
    /// Adam (L2 weight decay) with anomalib's constants: lr 2e-4, betas (0.5, 0.9), eps 1e-4,
    /// weight decay 1e-5; gradients clipped to a joint L2 norm of 1.
    pub learning_rate: f64,
    pub beta1: f32,
    pub beta2: f32,
    pub epsilon: f32,
    pub weight_decay: f64,
    /// `None` or 0: no clipping.
    pub max_grad_norm: Option<f32>,
    /// Write a resumable checkpoint every this many steps (when a checkpoint folder is given).
    pub checkpoint_every: usize,
}

/// [`CsflowSettings`] as written by a user: a preset, and any field to override. A missing or
/// `null` field takes the preset's value.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CsflowSpec {
    #[serde(default)]
    pub preset: Preset,
    #[serde(default)]
    pub backbone: Option<BackboneKind>,
    #[serde(default)]
    pub weights: Option<PathBuf>,
    #[serde(default)]
    pub random_weights_seed: Option<u64>,
    #[serde(default)]
    pub layer: Option<String>,
    #[serde(default)]
    pub input_size: Option<usize>,
    #[serde(default)]
    pub scales: Option<usize>,
    #[serde(default)]
    pub coupling_blocks: Option<usize>,
    #[serde(default)]
    pub hidden_channels: Option<usize>,
    #[serde(default)]
    pub kernel_size: Option<usize>,
    #[serde(default)]
    pub last_kernel_size: Option<usize>,
    #[serde(default)]
    pub clamp: Option<f32>,
    #[serde(default)]
    pub epochs: Option<usize>,
    #[serde(default)]
    pub batch_size: Option<usize>,
    #[serde(default)]
    pub learning_rate: Option<f64>,
    #[serde(default)]
    pub beta1: Option<f32>,
    #[serde(default)]
    pub beta2: Option<f32>,
    #[serde(default)]
    pub epsilon: Option<f32>,
    #[serde(default)]
    pub weight_decay: Option<f64>,
    #[serde(default)]
    pub max_grad_norm: Option<f32>,
    #[serde(default)]
    pub checkpoint_every: Option<usize>,
}

impl From<CsflowSpec> for CsflowSettings {
    fn from(spec: CsflowSpec) -> Self {
        let base = CsflowSettings::of_preset(spec.preset);
        CsflowSettings {
            preset: spec.preset,
            backbone: spec.backbone.unwrap_or(base.backbone),
            // Weights are never part of a preset: `None` means the backbone's shipped weights.
            weights: spec.weights,
            random_weights_seed: spec.random_weights_seed,
            layer: spec.layer.unwrap_or(base.layer),
            input_size: spec.input_size.unwrap_or(base.input_size),
            scales: spec.scales.unwrap_or(base.scales),
            coupling_blocks: spec.coupling_blocks.unwrap_or(base.coupling_blocks),
            hidden_channels: spec.hidden_channels.unwrap_or(base.hidden_channels),
            kernel_size: spec.kernel_size.unwrap_or(base.kernel_size),
            last_kernel_size: spec.last_kernel_size.unwrap_or(base.last_kernel_size),
            clamp: spec.clamp.unwrap_or(base.clamp),
            epochs: spec.epochs.unwrap_or(base.epochs),
            batch_size: spec.batch_size.unwrap_or(base.batch_size),
            learning_rate: spec.learning_rate.unwrap_or(base.learning_rate),
            beta1: spec.beta1.unwrap_or(base.beta1),
            beta2: spec.beta2.unwrap_or(base.beta2),
            epsilon: spec.epsilon.unwrap_or(base.epsilon),
            weight_decay: spec.weight_decay.unwrap_or(base.weight_decay),
            // 0 turns clipping off (a `null` takes the preset's).
            max_grad_norm: match spec.max_grad_norm {
                Some(0.0) => None,
                Some(v) => Some(v),
                None => base.max_grad_norm,
            },
            checkpoint_every: spec.checkpoint_every.unwrap_or(base.checkpoint_every),
        }
    }
}

impl From<CsflowSettings> for CsflowSpec {
    /// Only the fields that differ from the preset; the others `None`.
    fn from(s: CsflowSettings) -> Self {
        fn differs<T: PartialEq>(value: T, preset: T) -> Option<T> {
            (value != preset).then_some(value)
        }
        let base = CsflowSettings::of_preset(s.preset);
        CsflowSpec {
            preset: s.preset,
            backbone: differs(s.backbone, base.backbone),
            weights: s.weights,
            random_weights_seed: s.random_weights_seed,
            layer: differs(s.layer, base.layer),
            input_size: differs(s.input_size, base.input_size),
            scales: differs(s.scales, base.scales),
            coupling_blocks: differs(s.coupling_blocks, base.coupling_blocks),
            hidden_channels: differs(s.hidden_channels, base.hidden_channels),
            kernel_size: differs(s.kernel_size, base.kernel_size),
            last_kernel_size: differs(s.last_kernel_size, base.last_kernel_size),
            clamp: differs(s.clamp, base.clamp),
            epochs: differs(s.epochs, base.epochs),
            batch_size: differs(s.batch_size, base.batch_size),
            learning_rate: differs(s.learning_rate, base.learning_rate),
            beta1: differs(s.beta1, base.beta1),
            beta2: differs(s.beta2, base.beta2),
            epsilon: differs(s.epsilon, base.epsilon),
            weight_decay: differs(s.weight_decay, base.weight_decay),
            max_grad_norm: differs(s.max_grad_norm, base.max_grad_norm).map(|v| v.unwrap_or(0.0)),
            checkpoint_every: differs(s.checkpoint_every, base.checkpoint_every),
        }
    }
}

impl CsflowSpec {
    /// Every field with the value it takes.
    pub fn complete(s: &CsflowSettings) -> Self {
        let s = s.clone();
        CsflowSpec {
            preset: s.preset,
            backbone: Some(s.backbone),
            weights: s.weights,
            random_weights_seed: s.random_weights_seed,
            layer: Some(s.layer),
            input_size: Some(s.input_size),
            scales: Some(s.scales),
            coupling_blocks: Some(s.coupling_blocks),
            hidden_channels: Some(s.hidden_channels),
            kernel_size: Some(s.kernel_size),
            last_kernel_size: Some(s.last_kernel_size),
            clamp: Some(s.clamp),
            epochs: Some(s.epochs),
            batch_size: Some(s.batch_size),
            learning_rate: Some(s.learning_rate),
            beta1: Some(s.beta1),
            beta2: Some(s.beta2),
            epsilon: Some(s.epsilon),
            weight_decay: Some(s.weight_decay),
            max_grad_norm: Some(s.max_grad_norm.unwrap_or(0.0)),
            checkpoint_every: Some(s.checkpoint_every),
        }
    }
}

impl Default for CsflowSettings {
    fn default() -> Self {
        CsflowSettings::of_preset(Preset::Cpu)
    }
}

impl CsflowSettings {
    pub fn of_preset(preset: Preset) -> Self {
        let common = |backbone, layer: &str, input_size, batch_size, epochs| CsflowSettings {
            preset,
            backbone,
            weights: None,
            random_weights_seed: None,
            layer: layer.into(),
            input_size,
            scales: 3,
            coupling_blocks: 4,
            hidden_channels: 1024,
            kernel_size: 3,
            last_kernel_size: 5,
            clamp: 3.0,
            epochs,
            batch_size,
            learning_rate: 2e-4,
            beta1: 0.5,
            beta2: 0.9,
            epsilon: 1e-4,
            weight_decay: 1e-5,
            max_grad_norm: Some(1.0),
            checkpoint_every: 50,
        };
        match preset {
            Preset::Paper => common(BackboneKind::EfficientNetB5, "features.6.8", 768, 16, 240),
            Preset::Cpu => common(BackboneKind::EfficientNetLite0, "_blocks.10", 128, 8, 12),
        }
    }

    /// The CPU preset on MobileNetV2's stride-16 tap (`features.13`).
    pub fn mobilenet_v2() -> Self {
        CsflowSettings {
            backbone: BackboneKind::MobileNetV2,
            layer: "features.13".into(),
            ..CsflowSettings::default()
        }
    }

    pub(crate) fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(VigilError::Config(format!("csflow: {m}")));
        if self.input_size == 0
            || self.scales == 0
            || self.coupling_blocks == 0
            || self.hidden_channels == 0
            || self.epochs == 0
            || self.batch_size == 0
            || self.checkpoint_every == 0
        {
            return bad(
                "input_size, scales, coupling_blocks, hidden_channels, epochs, batch_size and checkpoint_every \
                 must be positive",
            );
        }
        if self.kernel_size.is_multiple_of(2) || self.last_kernel_size.is_multiple_of(2) {
            return bad("kernel_size and last_kernel_size must be odd");
        }
        // Written so that NaN fails too.
        if !(self.learning_rate > 0.0
            && self.weight_decay >= 0.0
            && self.clamp > 0.0
            && self.epsilon > 0.0
            && (0.0..1.0).contains(&self.beta1)
            && (0.0..1.0).contains(&self.beta2)
            && self.max_grad_norm.is_none_or(|v| v > 0.0))
        {
            return bad(
                "learning_rate, clamp, epsilon and max_grad_norm must be > 0, weight_decay >= 0, betas in [0, 1)",
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_round_trip_as_overrides() {
        let paper = CsflowSettings::of_preset(Preset::Paper);
        assert_eq!((paper.input_size, paper.hidden_channels, paper.epochs), (768, 1024, 240));
        assert_eq!((paper.backbone, paper.layer.as_str()), (BackboneKind::EfficientNetB5, "features.6.8"));
        let json = serde_json::to_value(&paper).unwrap();
        assert_eq!(json["epochs"], serde_json::Value::Null, "preset values are not repeated");
        assert_eq!(serde_json::from_value::<CsflowSettings>(json).unwrap(), paper);
        let custom: CsflowSettings = serde_json::from_value(
            serde_json::json!({ "preset": "paper", "epochs": 3, "max_grad_norm": 0.0 }),
        )
        .unwrap();
        assert_eq!(custom, CsflowSettings { epochs: 3, max_grad_norm: None, ..paper.clone() });
        let complete = serde_json::to_value(CsflowSpec::complete(&custom)).unwrap();
        assert_eq!(complete["input_size"], 768);
        assert_eq!(serde_json::from_value::<CsflowSettings>(complete).unwrap(), custom);
        let again: CsflowSettings = serde_json::from_value(serde_json::to_value(&custom).unwrap()).unwrap();
        assert_eq!(again, custom);
        assert!(serde_json::from_value::<CsflowSettings>(serde_json::json!({ "epoch": 3 })).is_err());
        let mobile = CsflowSettings::mobilenet_v2();
        let again: CsflowSettings = serde_json::from_value(serde_json::to_value(&mobile).unwrap()).unwrap();
        assert_eq!(again, mobile);
    }

    #[test]
    fn invalid_values_are_refused() {
        assert!(CsflowSettings::default().validate().is_ok());
        for broken in [
            CsflowSettings { epochs: 0, ..CsflowSettings::default() },
            CsflowSettings { last_kernel_size: 4, ..CsflowSettings::default() },
            CsflowSettings { learning_rate: f64::NAN, ..CsflowSettings::default() },
            CsflowSettings { beta2: 1.0, ..CsflowSettings::default() },
            CsflowSettings { max_grad_norm: Some(-1.0), ..CsflowSettings::default() },
        ] {
            assert!(broken.validate().is_err(), "{broken:?}");
        }
    }
}
