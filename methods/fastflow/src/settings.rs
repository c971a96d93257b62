//! FastFlow's settings and its two presets.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use vigil_backbones::BackboneKind;
use vigil_core::{Result, VigilError};

/// The named configuration a [`FastflowSettings`] starts from; every field can be overridden.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Preset {
    /// anomalib 2.x's defaults: ResNet-18 `layer1`..`layer3` (user-supplied torchvision weights),
    /// 256 px, 8 steps per scale, batch 32, 500 epochs (the paper's schedule).
    Paper,
    /// The shipped MobileNetV2 at strides 4/8/16, 128 px, 8 steps per scale, batch 8, 40 epochs:
    /// a 32-image PIPED class trains in about a minute on 2 cores.
    #[default]
    Cpu,
}

/// Everything that defines a FastFlow model and its training.
///
/// Read and written as a [`FastflowSpec`]: a preset plus the fields that differ from it (`null`
/// elsewhere), so `fastflow:preset=paper,epochs=100` means "the paper preset with 100 epochs".
/// Model files store every field ([`FastflowSpec::complete`]), so they do not depend on the
/// presets' values.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(from = "FastflowSpec", into = "FastflowSpec")]
pub struct FastflowSettings {
    pub preset: Preset,
    pub backbone: BackboneKind,
    /// Backbone weights; `None` looks for the shipped ones (`vigil_backbones::default_weights_path`).
    pub weights: Option<PathBuf>,
    /// Random backbone weights from this seed instead of pretrained ones (tests only).
    pub random_weights_seed: Option<u64>,
    /// Backbone layers, one flow each (anomalib: the outputs at strides 4, 8 and 16).
    pub layers: Vec<String>,
    /// Square side images are resized to before the backbone.
    pub input_size: usize,
    /// Flow steps per scale.
    pub flow_steps: usize,
    /// 3×3 subnet kernels in every step instead of alternating 3×3 / 1×1 (anomalib `conv3x3_only`).
    pub conv3x3_only: bool,
    pub epochs: usize,
    pub batch_size: usize,
    /// Adam, constant learning rate, L2 weight decay (anomalib: 1e-3 and 1e-5).
    pub learning_rate: f64,
    pub weight_decay: f64,
    /// Write a resumable checkpoint every this many steps (when a checkpoint folder is given).
    pub checkpoint_every: usize,
}

/// [`FastflowSettings`] as written by a user: a preset, and any field to override. A missing or
/// `null` field takes the preset's value.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FastflowSpec {
    #[serde(default)]
    pub preset: Preset,
    #[serde(default)]
    pub backbone: Option<BackboneKind>,
    #[serde(default)]
    pub weights: Option<PathBuf>,
    #[serde(default)]
    pub random_weights_seed: Option<u64>,
    #[serde(default)]
    pub layers: Option<Vec<String>>,
    #[serde(default)]
    pub input_size: Option<usize>,
    #[serde(default)]
    pub flow_steps: Option<usize>,
    #[serde(default)]
    pub conv3x3_only: Option<bool>,
    #[serde(default)]
    pub epochs: Option<usize>,
    #[serde(default)]
    pub batch_size: Option<usize>,
    #[serde(default)]
    pub learning_rate: Option<f64>,
    #[serde(default)]
    pub weight_decay: Option<f64>,
    #[serde(default)]
    pub checkpoint_every: Option<usize>,
}

impl From<FastflowSpec> for FastflowSettings {
    fn from(spec: FastflowSpec) -> Self {
        let base = FastflowSettings::of_preset(spec.preset);
        FastflowSettings {
            preset: spec.preset,
            backbone: spec.backbone.unwrap_or(base.backbone),
            // Weights are never part of a preset: `None` means the backbone's shipped weights.
            weights: spec.weights,
            random_weights_seed: spec.random_weights_seed,
            layers: spec.layers.unwrap_or(base.layers),
            input_size: spec.input_size.unwrap_or(base.input_size),
            flow_steps: spec.flow_steps.unwrap_or(base.flow_steps),
            conv3x3_only: spec.conv3x3_only.unwrap_or(base.conv3x3_only),
            epochs: spec.epochs.unwrap_or(base.epochs),
            batch_size: spec.batch_size.unwrap_or(base.batch_size),
            learning_rate: spec.learning_rate.unwrap_or(base.learning_rate),
            weight_decay: spec.weight_decay.unwrap_or(base.weight_decay),
            checkpoint_every: spec.checkpoint_every.unwrap_or(base.checkpoint_every),
        }
    }
}

impl From<FastflowSettings> for FastflowSpec {
    /// Only the fields that differ from the preset; the others `None`.
    fn from(s: FastflowSettings) -> Self {
        fn differs<T: PartialEq>(value: T, preset: T) -> Option<T> {
            (value != preset).then_some(value)
        }
        let base = FastflowSettings::of_preset(s.preset);
        FastflowSpec {
            preset: s.preset,
            backbone: differs(s.backbone, base.backbone),
            weights: s.weights,
            random_weights_seed: s.random_weights_seed,
            layers: differs(s.layers, base.layers),
            input_size: differs(s.input_size, base.input_size),
            flow_steps: differs(s.flow_steps, base.flow_steps),
            conv3x3_only: differs(s.conv3x3_only, base.conv3x3_only),
            epochs: differs(s.epochs, base.epochs),
            batch_size: differs(s.batch_size, base.batch_size),
            learning_rate: differs(s.learning_rate, base.learning_rate),
            weight_decay: differs(s.weight_decay, base.weight_decay),
            checkpoint_every: differs(s.checkpoint_every, base.checkpoint_every),
        }
    }
}

impl FastflowSpec {
    /// Every field with the value it takes.
    pub fn complete(s: &FastflowSettings) -> Self {
        let s = s.clone();
        FastflowSpec {
            preset: s.preset,
            backbone: Some(s.backbone),
            weights: s.weights,
            random_weights_seed: s.random_weights_seed,
            layers: Some(s.layers),
            input_size: Some(s.input_size),
            flow_steps: Some(s.flow_steps),
            conv3x3_only: Some(s.conv3x3_only),
            epochs: Some(s.epochs),
            batch_size: Some(s.batch_size),
            learning_rate: Some(s.learning_rate),
            weight_decay: Some(s.weight_decay),
            checkpoint_every: Some(s.checkpoint_every),
        }
    }
}

impl Default for FastflowSettings {
    fn default() -> Self {
        FastflowSettings::of_preset(Preset::Cpu)
    }
}

impl FastflowSettings {
    pub fn of_preset(preset: Preset) -> Self {
        let common = |backbone, layers: [&str; 3], input_size, batch_size, epochs| FastflowSettings {
            preset,
            backbone,
            weights: None,
            random_weights_seed: None,
            layers: layers.iter().map(|l| l.to_string()).collect(),
            input_size,
            flow_steps: 8,
            conv3x3_only: false,
            epochs,
            batch_size,
            learning_rate: 1e-3,
            weight_decay: 1e-5,
            checkpoint_every: 50,
        };
        match preset {
            Preset::Paper => common(BackboneKind::ResNet18, ["layer1", "layer2", "layer3"], 256, 32, 500),
            Preset::Cpu => {
                common(BackboneKind::MobileNetV2, ["features.3", "features.6", "features.13"], 128, 8, 40)
            }
        }
    }

    /// The CPU preset on EfficientNet-Lite0 taps at strides 4, 8 and 16.
    pub fn efficientnet_lite0() -> Self {
        FastflowSettings {
            backbone: BackboneKind::EfficientNetLite0,
            layers: vec!["_blocks.2".into(), "_blocks.4".into(), "_blocks.10".into()],
            ..FastflowSettings::default()
        }
    }

    pub(crate) fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(VigilError::Config(format!("fastflow: {m}")));
        if self.layers.is_empty() {
            return bad("at least one backbone layer is needed");
        }
        if self.input_size == 0
            || self.flow_steps == 0
            || self.epochs == 0
            || self.batch_size == 0
            || self.checkpoint_every == 0
        {
            return bad("input_size, flow_steps, epochs, batch_size and checkpoint_every must be positive");
        }
        // Written so that NaN fails too.
        if !(self.learning_rate > 0.0 && self.weight_decay >= 0.0) {
            return bad("learning_rate must be > 0 and weight_decay >= 0");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_round_trip_as_overrides() {
        let paper = FastflowSettings::of_preset(Preset::Paper);
        assert_eq!(paper.input_size, 256);
        assert_eq!(paper.layers, vec!["layer1", "layer2", "layer3"]);
        let json = serde_json::to_value(&paper).unwrap();
        assert_eq!(json["epochs"], serde_json::Value::Null, "preset values are not repeated");
        assert_eq!(serde_json::from_value::<FastflowSettings>(json).unwrap(), paper);
        let custom: FastflowSettings =
            serde_json::from_value(serde_json::json!({ "preset": "paper", "epochs": 3 })).unwrap();
        assert_eq!(custom, FastflowSettings { epochs: 3, ..paper.clone() });
        let complete = serde_json::to_value(FastflowSpec::complete(&custom)).unwrap();
        assert_eq!(complete["input_size"], 256);
        assert_eq!(serde_json::from_value::<FastflowSettings>(complete).unwrap(), custom);
        assert!(serde_json::from_value::<FastflowSettings>(serde_json::json!({ "epoch": 3 })).is_err());
        let lite = FastflowSettings::efficientnet_lite0();
        let again: FastflowSettings = serde_json::from_value(serde_json::to_value(&lite).unwrap()).unwrap();
        assert_eq!(again, lite);
    }

    #[test]
    fn invalid_values_are_refused() {
        assert!(FastflowSettings::default().validate().is_ok());
        for broken in [
            FastflowSettings { epochs: 0, ..FastflowSettings::default() },
            FastflowSettings { layers: Vec::new(), ..FastflowSettings::default() },
            FastflowSettings { learning_rate: f64::NAN, ..FastflowSettings::default() },
        ] {
            assert!(broken.validate().is_err(), "{broken:?}");
        }
    }
}
