//! STFPM's settings and its two presets.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use vigil_backbones::BackboneKind;
use vigil_core::{Result, VigilError};

/// The named configuration a [`StfpmSettings`] starts from; every field can be overridden.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Preset {
    /// anomalib 2.x's defaults and the paper's schedule: ResNet-18 `layer1`..`layer3`
    /// (user-supplied torchvision weights), 256 px, batch 32, 100 epochs.
    Paper,
    /// The shipped MobileNetV2 at strides 4/8/16 (`features.3`, `.6`, `.13`), 128 px, batch 8,
    /// 40 epochs (as FastFlow's CPU preset): a PIPED class trains in about 25 s on 2 cores.
    #[default]
    Cpu,
}

/// Everything that defines an STFPM model and its training.
///
/// Read and written as a [`StfpmSpec`]: a preset plus the fields that differ from it (`null`
/// elsewhere), so `stfpm:preset=paper,epochs=20` means "the paper preset with 20 epochs".
/// Model files store every field ([`StfpmSpec::complete`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(from = "StfpmSpec", into = "StfpmSpec")]
pub struct StfpmSettings {
    pub preset: Preset,
    /// The teacher's architecture, also the student's.
    pub backbone: BackboneKind,
    /// Teacher weights; `None` looks for the shipped ones (`vigil_backbones::default_weights_path`).
    pub weights: Option<PathBuf>,
    /// Random teacher weights from this seed instead of pretrained ones (tests only).
    pub random_weights_seed: Option<u64>,
    /// The layers whose features the student learns to match, input to output.
    pub layers: Vec<String>,
    /// Square side images are resized to.
    pub input_size: usize,
    pub epochs: usize,
    pub batch_size: usize,
    /// SGD (anomalib: lr 0.4, momentum 0.9, no dampening, L2 weight decay 1e-3).
    pub learning_rate: f64,
    pub momentum: f64,
    pub weight_decay: f64,
    /// Write a resumable checkpoint every this many steps (when a checkpoint folder is given).
    pub checkpoint_every: usize,
}

/// [`StfpmSettings`] as written by a user: a preset, and any field to override.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StfpmSpec {
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
    pub epochs: Option<usize>,
    #[serde(default)]
    pub batch_size: Option<usize>,
    #[serde(default)]
    pub learning_rate: Option<f64>,
    #[serde(default)]
    pub momentum: Option<f64>,
    #[serde(default)]
    pub weight_decay: Option<f64>,
    #[serde(default)]
    pub checkpoint_every: Option<usize>,
}

impl From<StfpmSpec> for StfpmSettings {
    fn from(spec: StfpmSpec) -> Self {
        let base = StfpmSettings::of_preset(spec.preset);
        // A backbone named without layers takes that backbone's default taps.
        let layers = match (spec.layers, spec.backbone) {
            (Some(layers), _) => layers,
            (None, Some(kind)) if kind != base.backbone => default_layers(kind),
            (None, _) => base.layers,
        };
        StfpmSettings {
            preset: spec.preset,
            backbone: spec.backbone.unwrap_or(base.backbone),
            // Weights are never part of a preset: `None` means the backbone's shipped weights.
            weights: spec.weights,
            random_weights_seed: spec.random_weights_seed,
            layers,
            input_size: spec.input_size.unwrap_or(base.input_size),
            epochs: spec.epochs.unwrap_or(base.epochs),
            batch_size: spec.batch_size.unwrap_or(base.batch_size),
            learning_rate: spec.learning_rate.unwrap_or(base.learning_rate),
            momentum: spec.momentum.unwrap_or(base.momentum),
            weight_decay: spec.weight_decay.unwrap_or(base.weight_decay),
            checkpoint_every: spec.checkpoint_every.unwrap_or(base.checkpoint_every),
        }
    }
}

impl From<StfpmSettings> for StfpmSpec {
    /// Only the fields that differ from the preset; the others `None`.
    fn from(s: StfpmSettings) -> Self {
        fn differs<T: PartialEq>(value: T, preset: T) -> Option<T> {
            (value != preset).then_some(value)
        }
        let base = StfpmSettings::of_preset(s.preset);
        StfpmSpec {
            preset: s.preset,
            backbone: differs(s.backbone, base.backbone),
            weights: s.weights,
            random_weights_seed: s.random_weights_seed,
            // Kept whenever the backbone differs, since its default taps are not the preset's.
            layers: (s.backbone != base.backbone || s.layers != base.layers).then_some(s.layers),
            input_size: differs(s.input_size, base.input_size),
            epochs: differs(s.epochs, base.epochs),
            batch_size: differs(s.batch_size, base.batch_size),
            learning_rate: differs(s.learning_rate, base.learning_rate),
            momentum: differs(s.momentum, base.momentum),
            weight_decay: differs(s.weight_decay, base.weight_decay),
            checkpoint_every: differs(s.checkpoint_every, base.checkpoint_every),
        }
    }
}

impl StfpmSpec {
    /// Every field with the value it takes.
    pub fn complete(s: &StfpmSettings) -> Self {
        let s = s.clone();
        StfpmSpec {
            preset: s.preset,
            backbone: Some(s.backbone),
            weights: s.weights,
            random_weights_seed: s.random_weights_seed,
            layers: Some(s.layers),
            input_size: Some(s.input_size),
            epochs: Some(s.epochs),
            batch_size: Some(s.batch_size),
            learning_rate: Some(s.learning_rate),
            momentum: Some(s.momentum),
            weight_decay: Some(s.weight_decay),
            checkpoint_every: Some(s.checkpoint_every),
        }
    }
}

/// The taps at strides 4, 8 and 16 of each backbone (ResNets: `layer1`..`layer3`, as STFPM).
pub fn default_layers(kind: BackboneKind) -> Vec<String> {
    let layers: [&str; 3] = match kind {
        BackboneKind::MobileNetV2 => ["features.3", "features.6", "features.13"],
        BackboneKind::EfficientNetLite0 => ["_blocks.2", "_blocks.4", "_blocks.10"],
        BackboneKind::EfficientNetB5 => ["features.2.4", "features.3.4", "features.5.6"],
        BackboneKind::ResNet18 | BackboneKind::ResNet50 | BackboneKind::WideResNet50 => {
            ["layer1", "layer2", "layer3"]
        }
    };
    layers.iter().map(|l| l.to_string()).collect()
}

impl Default for StfpmSettings {
    fn default() -> Self {
        StfpmSettings::of_preset(Preset::Cpu)
    }
}

impl StfpmSettings {
    pub fn of_preset(preset: Preset) -> Self {
        let common = |backbone, input_size, batch_size, epochs| StfpmSettings {
            preset,
            backbone,
            weights: None,
            random_weights_seed: None,
            layers: default_layers(backbone),
            input_size,
            epochs,
            batch_size,
            learning_rate: 0.4,
            momentum: 0.9,
            weight_decay: 1e-3,
            checkpoint_every: 50,
        };
        match preset {
            Preset::Paper => common(BackboneKind::ResNet18, 256, 32, 100),
            Preset::Cpu => common(BackboneKind::MobileNetV2, 128, 8, 40),
        }
    }

    pub(crate) fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(VigilError::Config(format!("stfpm: {m}")));
        if self.layers.is_empty() {
            return bad("at least one backbone layer is needed");
        }
        if self.input_size == 0 || self.epochs == 0 || self.batch_size == 0 || self.checkpoint_every == 0 {
            return bad("input_size, epochs, batch_size and checkpoint_every must be positive");
        }
        // Written so that NaN fails too.
        if !(self.learning_rate > 0.0 && (0.0..1.0).contains(&self.momentum) && self.weight_decay >= 0.0) {
            return bad("learning_rate must be > 0, momentum in [0, 1) and weight_decay >= 0");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_round_trip_as_overrides() {
        let paper = StfpmSettings::of_preset(Preset::Paper);
        assert_eq!((paper.input_size, paper.batch_size, paper.epochs), (256, 32, 100));
        assert_eq!(paper.layers, vec!["layer1", "layer2", "layer3"]);
        let json = serde_json::to_value(&paper).unwrap();
        assert_eq!(json["epochs"], serde_json::Value::Null, "preset values are not repeated");
        assert_eq!(serde_json::from_value::<StfpmSettings>(json).unwrap(), paper);
        let custom: StfpmSettings =
            serde_json::from_value(serde_json::json!({ "preset": "paper", "epochs": 3 })).unwrap();
        assert_eq!(custom, StfpmSettings { epochs: 3, ..paper.clone() });
        let complete = serde_json::to_value(StfpmSpec::complete(&custom)).unwrap();
        assert_eq!(complete["input_size"], 256);
        assert_eq!(serde_json::from_value::<StfpmSettings>(complete).unwrap(), custom);
        assert!(serde_json::from_value::<StfpmSettings>(serde_json::json!({ "epoch": 3 })).is_err());
        // Naming another backbone takes its taps at strides 4/8/16.
        let lite: StfpmSettings =
            serde_json::from_value(serde_json::json!({ "backbone": "efficientnet-lite0" })).unwrap();
        assert_eq!(lite.layers, vec!["_blocks.2", "_blocks.4", "_blocks.10"]);
        let again: StfpmSettings = serde_json::from_value(serde_json::to_value(&lite).unwrap()).unwrap();
        assert_eq!(again, lite);
    }

    #[test]
    fn invalid_values_are_refused() {
        assert!(StfpmSettings::default().validate().is_ok());
        for broken in [
            StfpmSettings { epochs: 0, ..StfpmSettings::default() },
            StfpmSettings { layers: Vec::new(), ..StfpmSettings::default() },
            StfpmSettings { learning_rate: f64::NAN, ..StfpmSettings::default() },
            StfpmSettings { momentum: 1.0, ..StfpmSettings::default() },
        ] {
            assert!(broken.validate().is_err(), "{broken:?}");
        }
    }
}
