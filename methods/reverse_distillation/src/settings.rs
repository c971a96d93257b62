//! Reverse Distillation's settings and its two presets.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use vigil_backbones::BackboneKind;
use vigil_core::{Result, VigilError};

/// The named configuration a [`RdSettings`] starts from; every field can be overridden.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Preset {
    /// anomalib 2.x's defaults with a ResNet-18 encoder (`layer1`..`layer3`, user-supplied
    /// torchvision weights; anomalib's default WRN-50-2 needs bottleneck blocks, not implemented),
    /// 256 px, batch 32, 200 epochs (the paper's schedule).
    Paper,
    /// The shipped MobileNetV2 at strides 4/8/16 (`features.3`, `.6`, `.13`), 128 px, batch 8,
    /// 40 epochs.
    #[default]
    Cpu,
}

/// Everything that defines a Reverse Distillation model and its training.
///
/// Read and written as a [`RdSpec`]: a preset plus the fields that differ from it (`null`
/// elsewhere), so `reverse_distillation:preset=paper,epochs=20` means "the paper preset with 20 epochs".
/// Model files store every field ([`RdSpec::complete`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(from = "RdSpec", into = "RdSpec")]
pub struct RdSettings {
    pub preset: Preset,
    /// The frozen encoder.
    pub backbone: BackboneKind,
    /// Encoder weights; `None` looks for the shipped ones (`vigil_backbones::default_weights_path`).
    pub weights: Option<PathBuf>,
    /// Random encoder weights from this seed instead of pretrained ones (tests only).
    pub random_weights_seed: Option<u64>,
    /// The three encoder layers at strides 4, 8 and 16, the decoder reproduces.
    pub layers: Vec<String>,
    /// Square side images are resized to.
    pub input_size: usize,
    pub epochs: usize,
    pub batch_size: usize,
    /// Adam (anomalib: lr 0.005, betas (0.5, 0.99), no weight decay).
    pub learning_rate: f64,
    pub beta1: f64,
    pub beta2: f64,
    /// σ of the Gaussian that smooths the map at the input size (anomalib: 4).
    pub blur_sigma: f64,
    /// Early stopping on held-out normal images: this fraction of the training images is kept out
    /// of training and their loss computed after every epoch; training stops once it has not
    /// improved for `patience` epochs. 0 (the default, as anomalib 2.x) trains every epoch.
    pub validation_fraction: f64,
    pub patience: usize,
    /// Write a resumable checkpoint every this many steps (when a checkpoint folder is given).
    pub checkpoint_every: usize,
}

/// [`RdSettings`] as written by a user: a preset, and any field to override.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RdSpec {
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
    pub beta1: Option<f64>,
    #[serde(default)]
    pub beta2: Option<f64>,
    #[serde(default)]
    pub blur_sigma: Option<f64>,
    #[serde(default)]
    pub validation_fraction: Option<f64>,
    #[serde(default)]
    pub patience: Option<usize>,
    #[serde(default)]
    pub checkpoint_every: Option<usize>,
}

impl From<RdSpec> for RdSettings {
    fn from(spec: RdSpec) -> Self {
        let base = RdSettings::of_preset(spec.preset);
        // A backbone named without layers takes that backbone's default taps.
        let layers = match (spec.layers, spec.backbone) {
            (Some(layers), _) => layers,
            (None, Some(kind)) if kind != base.backbone => default_layers(kind),
            (None, _) => base.layers,
        };
        RdSettings {
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
            beta1: spec.beta1.unwrap_or(base.beta1),
            beta2: spec.beta2.unwrap_or(base.beta2),
            blur_sigma: spec.blur_sigma.unwrap_or(base.blur_sigma),
            validation_fraction: spec.validation_fraction.unwrap_or(base.validation_fraction),
            patience: spec.patience.unwrap_or(base.patience),
            checkpoint_every: spec.checkpoint_every.unwrap_or(base.checkpoint_every),
        }
    }
}

impl From<RdSettings> for RdSpec {
    /// Only the fields that differ from the preset; the others `None`.
    fn from(s: RdSettings) -> Self {
        fn differs<T: PartialEq>(value: T, preset: T) -> Option<T> {
            (value != preset).then_some(value)
        }
        let base = RdSettings::of_preset(s.preset);
        RdSpec {
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
            beta1: differs(s.beta1, base.beta1),
            beta2: differs(s.beta2, base.beta2),
            blur_sigma: differs(s.blur_sigma, base.blur_sigma),
            validation_fraction: differs(s.validation_fraction, base.validation_fraction),
            patience: differs(s.patience, base.patience),
            checkpoint_every: differs(s.checkpoint_every, base.checkpoint_every),
        }
    }
}

impl RdSpec {
    /// Every field with the value it takes.
    pub fn complete(s: &RdSettings) -> Self {
        let s = s.clone();
        RdSpec {
            preset: s.preset,
            backbone: Some(s.backbone),
            weights: s.weights,
            random_weights_seed: s.random_weights_seed,
            layers: Some(s.layers),
            input_size: Some(s.input_size),
            epochs: Some(s.epochs),
            batch_size: Some(s.batch_size),
            learning_rate: Some(s.learning_rate),
            beta1: Some(s.beta1),
            beta2: Some(s.beta2),
            blur_sigma: Some(s.blur_sigma),
            validation_fraction: Some(s.validation_fraction),
            patience: Some(s.patience),
            checkpoint_every: Some(s.checkpoint_every),
        }
    }
}

/// The taps at strides 4, 8 and 16 of each backbone (ResNets: `layer1`..`layer3`, as anomalib).
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

impl Default for RdSettings {
    fn default() -> Self {
        RdSettings::of_preset(Preset::Cpu)
    }
}

impl RdSettings {
    pub fn of_preset(preset: Preset) -> Self {
        let common = |backbone, input_size, batch_size, epochs| RdSettings {
            preset,
            backbone,
            weights: None,
            random_weights_seed: None,
            layers: default_layers(backbone),
            input_size,
            epochs,
            batch_size,
            learning_rate: 0.005,
            beta1: 0.5,
            beta2: 0.99,
            blur_sigma: 4.0,
            validation_fraction: 0.0,
            patience: 3,
            checkpoint_every: 50,
        };
        match preset {
            Preset::Paper => common(BackboneKind::ResNet18, 256, 32, 200),
            Preset::Cpu => common(BackboneKind::MobileNetV2, 128, 8, 40),
        }
    }

    pub(crate) fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(VigilError::Config(format!("reverse_distillation: {m}")));
        if self.layers.is_empty() {
            return bad("at least one backbone layer is needed");
        }
        if self.input_size == 0 || self.epochs == 0 || self.batch_size == 0 || self.checkpoint_every == 0 {
            return bad("input_size, epochs, batch_size and checkpoint_every must be positive");
        }
        if self.layers.len() != 3 {
            return bad("exactly three encoder layers (strides 4, 8 and 16) are needed");
        }
        let unit = 0.0..1.0;
        // Written so that NaN fails too.
        if !(self.learning_rate > 0.0
            && unit.contains(&self.beta1)
            && unit.contains(&self.beta2)
            && self.blur_sigma >= 0.0)
        {
            return bad("learning_rate must be > 0, beta1 and beta2 in [0, 1), blur_sigma >= 0");
        }
        if !(0.0..1.0).contains(&self.validation_fraction) || self.patience == 0 {
            return bad("validation_fraction must be in [0, 1) and patience positive");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_round_trip_as_overrides() {
        let paper = RdSettings::of_preset(Preset::Paper);
        assert_eq!((paper.input_size, paper.batch_size, paper.epochs), (256, 32, 200));
        assert_eq!(paper.layers, vec!["layer1", "layer2", "layer3"]);
        let json = serde_json::to_value(&paper).unwrap();
        assert_eq!(json["epochs"], serde_json::Value::Null, "preset values are not repeated");
        assert_eq!(serde_json::from_value::<RdSettings>(json).unwrap(), paper);
        let custom: RdSettings =
            serde_json::from_value(serde_json::json!({ "preset": "paper", "epochs": 3 })).unwrap();
        assert_eq!(custom, RdSettings { epochs: 3, ..paper.clone() });
        let complete = serde_json::to_value(RdSpec::complete(&custom)).unwrap();
        assert_eq!(complete["input_size"], 256);
        assert_eq!(serde_json::from_value::<RdSettings>(complete).unwrap(), custom);
        assert!(serde_json::from_value::<RdSettings>(serde_json::json!({ "epoch": 3 })).is_err());
        // Naming another backbone takes its taps at strides 4/8/16.
        let lite: RdSettings =
            serde_json::from_value(serde_json::json!({ "backbone": "efficientnet-lite0" })).unwrap();
        assert_eq!(lite.layers, vec!["_blocks.2", "_blocks.4", "_blocks.10"]);
        let again: RdSettings = serde_json::from_value(serde_json::to_value(&lite).unwrap()).unwrap();
        assert_eq!(again, lite);
    }

    #[test]
    fn invalid_values_are_refused() {
        assert!(RdSettings::default().validate().is_ok());
        for broken in [
            RdSettings { epochs: 0, ..RdSettings::default() },
            RdSettings { layers: Vec::new(), ..RdSettings::default() },
            RdSettings { learning_rate: f64::NAN, ..RdSettings::default() },
            RdSettings { beta2: 1.0, ..RdSettings::default() },
            RdSettings { validation_fraction: 1.0, ..RdSettings::default() },
            RdSettings { patience: 0, ..RdSettings::default() },
            RdSettings { layers: vec!["features.3".into(), "features.6".into()], ..RdSettings::default() },
        ] {
            assert!(broken.validate().is_err(), "{broken:?}");
        }
    }
}
