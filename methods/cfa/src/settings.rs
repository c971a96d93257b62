//! CFA's settings and its two presets.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use vigil_backbones::BackboneKind;
use vigil_core::{Result, VigilError};

/// The named configuration a [`CfaSettings`] starts from; every field can be overridden.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Preset {
    /// anomalib 2.x's defaults: Wide-ResNet-50-2 `layer1`..`layer3` (user-supplied torchvision
    /// weights), 256 px, batch 32, 30 epochs (anomalib's example configuration).
    Paper,
    /// The shipped MobileNetV2 at strides 4/8/16, 128 px, batch 8, 30 epochs: a 32-image PIPED
    /// class trains in seconds on 2 cores.
    #[default]
    Cpu,
}

/// Everything that defines a CFA model and its training.
///
/// Read and written as a [`CfaSpec`]: a preset plus the fields that differ from it (`null`
/// elsewhere), so `cfa:preset=paper,epochs=10` means "the paper preset with 10 epochs". Model
/// files store every field ([`CfaSpec::complete`]), so they do not depend on the presets' values.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(from = "CfaSpec", into = "CfaSpec")]
pub struct CfaSettings {
    pub preset: Preset,
    pub backbone: BackboneKind,
    /// Backbone weights; `None` looks for the shipped ones (`vigil_backbones::default_weights_path`).
    pub weights: Option<PathBuf>,
    /// Random backbone weights from this seed instead of pretrained ones (tests only).
    pub random_weights_seed: Option<u64>,
    /// Backbone layers, finest first; their 3×3-averaged features, up-sampled to the first layer's
    /// grid and stacked, are the descriptor's input (anomalib: `layer1`..`layer3`).
    pub layers: Vec<String>,
    /// Square side images are resized to before the backbone.
    pub input_size: usize,
    /// The memory bank holds (grid positions / `gamma_c`) centroids; only 1 (one centroid per
    /// position, anomalib's default) is implemented.
    pub gamma_c: usize,
    /// The descriptor maps the stacked features to (channels / `gamma_d`) channels.
    pub gamma_d: usize,
    /// K: the nearest centroids a feature is pulled within the hypersphere of, and the map's
    /// soft-min runs over.
    pub neighbors: usize,
    /// J: the hard negatives (the next nearest centroids) pushed out of it.
    pub hard_negatives: usize,
    /// The hypersphere's radius r (the loss compares squared distances with r²).
    pub radius: f64,
    pub epochs: usize,
    pub batch_size: usize,
    /// AdamW with AMSGrad (anomalib: lr 1e-3, weight decay 5e-4).
    pub learning_rate: f64,
    pub weight_decay: f64,
    /// σ of the Gaussian that smooths the up-sampled map (anomalib: 4 pixels).
    pub sigma: f32,
    /// Write a resumable checkpoint every this many steps (when a checkpoint folder is given).
    pub checkpoint_every: usize,
}

/// [`CfaSettings`] as written by a user: a preset, and any field to override. A missing or `null`
/// field takes the preset's value.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CfaSpec {
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
    pub gamma_c: Option<usize>,
    #[serde(default)]
    pub gamma_d: Option<usize>,
    #[serde(default)]
    pub neighbors: Option<usize>,
    #[serde(default)]
    pub hard_negatives: Option<usize>,
    #[serde(default)]
    pub radius: Option<f64>,
    #[serde(default)]
    pub epochs: Option<usize>,
    #[serde(default)]
    pub batch_size: Option<usize>,
    #[serde(default)]
    pub learning_rate: Option<f64>,
    #[serde(default)]
    pub weight_decay: Option<f64>,
    #[serde(default)]
    pub sigma: Option<f32>,
    #[serde(default)]
    pub checkpoint_every: Option<usize>,
}

impl From<CfaSpec> for CfaSettings {
    fn from(spec: CfaSpec) -> Self {
        let base = CfaSettings::of_preset(spec.preset);
        CfaSettings {
            preset: spec.preset,
            backbone: spec.backbone.unwrap_or(base.backbone),
            // Weights are never part of a preset: `None` means the backbone's shipped weights.
            weights: spec.weights,
            random_weights_seed: spec.random_weights_seed,
            layers: spec.layers.unwrap_or(base.layers),
            input_size: spec.input_size.unwrap_or(base.input_size),
            gamma_c: spec.gamma_c.unwrap_or(base.gamma_c),
            gamma_d: spec.gamma_d.unwrap_or(base.gamma_d),
            neighbors: spec.neighbors.unwrap_or(base.neighbors),
            hard_negatives: spec.hard_negatives.unwrap_or(base.hard_negatives),
            radius: spec.radius.unwrap_or(base.radius),
            epochs: spec.epochs.unwrap_or(base.epochs),
            batch_size: spec.batch_size.unwrap_or(base.batch_size),
            learning_rate: spec.learning_rate.unwrap_or(base.learning_rate),
            weight_decay: spec.weight_decay.unwrap_or(base.weight_decay),
            sigma: spec.sigma.unwrap_or(base.sigma),
            checkpoint_every: spec.checkpoint_every.unwrap_or(base.checkpoint_every),
        }
    }
}

impl From<CfaSettings> for CfaSpec {
    /// Only the fields that differ from the preset; the others `None`.
    fn from(s: CfaSettings) -> Self {
        fn differs<T: PartialEq>(value: T, preset: T) -> Option<T> {
            (value != preset).then_some(value)
        }
        let base = CfaSettings::of_preset(s.preset);
        CfaSpec {
            preset: s.preset,
            backbone: differs(s.backbone, base.backbone),
            weights: s.weights,
            random_weights_seed: s.random_weights_seed,
            layers: differs(s.layers, base.layers),
            input_size: differs(s.input_size, base.input_size),
            gamma_c: differs(s.gamma_c, base.gamma_c),
            gamma_d: differs(s.gamma_d, base.gamma_d),
            neighbors: differs(s.neighbors, base.neighbors),
            hard_negatives: differs(s.hard_negatives, base.hard_negatives),
            radius: differs(s.radius, base.radius),
            epochs: differs(s.epochs, base.epochs),
            batch_size: differs(s.batch_size, base.batch_size),
            learning_rate: differs(s.learning_rate, base.learning_rate),
            weight_decay: differs(s.weight_decay, base.weight_decay),
            sigma: differs(s.sigma, base.sigma),
            checkpoint_every: differs(s.checkpoint_every, base.checkpoint_every),
        }
    }
}

impl CfaSpec {
    /// Every field with the value it takes.
    pub fn complete(s: &CfaSettings) -> Self {
        let s = s.clone();
        CfaSpec {
            preset: s.preset,
            backbone: Some(s.backbone),
            weights: s.weights,
            random_weights_seed: s.random_weights_seed,
            layers: Some(s.layers),
            input_size: Some(s.input_size),
            gamma_c: Some(s.gamma_c),
            gamma_d: Some(s.gamma_d),
            neighbors: Some(s.neighbors),
            hard_negatives: Some(s.hard_negatives),
            radius: Some(s.radius),
            epochs: Some(s.epochs),
            batch_size: Some(s.batch_size),
            learning_rate: Some(s.learning_rate),
            weight_decay: Some(s.weight_decay),
            sigma: Some(s.sigma),
            checkpoint_every: Some(s.checkpoint_every),
        }
    }
}

impl Default for CfaSettings {
    fn default() -> Self {
        CfaSettings::of_preset(Preset::Cpu)
    }
}

impl CfaSettings {
    pub fn of_preset(preset: Preset) -> Self {
        let common = |backbone, layers: [&str; 3], input_size, batch_size| CfaSettings {
            preset,
            backbone,
            weights: None,
            random_weights_seed: None,
            layers: layers.iter().map(|l| l.to_string()).collect(),
            input_size,
            gamma_c: 1,
            gamma_d: 1,
            neighbors: 3,
            hard_negatives: 3,
            radius: 1e-5,
            epochs: 30,
            batch_size,
            learning_rate: 1e-3,
            weight_decay: 5e-4,
            sigma: 4.0,
            checkpoint_every: 50,
        };
        match preset {
            Preset::Paper => common(BackboneKind::WideResNet50, ["layer1", "layer2", "layer3"], 256, 32),
            Preset::Cpu => {
                common(BackboneKind::MobileNetV2, ["features.3", "features.6", "features.13"], 128, 8)
            }
        }
    }

    /// The CPU preset on EfficientNet-Lite0 taps at strides 4, 8 and 16.
    pub fn efficientnet_lite0() -> Self {
        CfaSettings {
            backbone: BackboneKind::EfficientNetLite0,
            layers: vec!["_blocks.2".into(), "_blocks.4".into(), "_blocks.10".into()],
            ..CfaSettings::default()
        }
    }

    pub(crate) fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(VigilError::Config(format!("cfa: {m}")));
        if self.layers.is_empty() {
            return bad("at least one backbone layer is needed");
        }
        if self.gamma_c != 1 {
            return bad("gamma_c > 1 (a k-means memory bank) is not implemented; use gamma_c=1");
        }
        if [
            self.input_size,
            self.gamma_d,
            self.neighbors,
            self.epochs,
            self.batch_size,
            self.checkpoint_every,
        ]
        .contains(&0)
        {
            return bad(
                "input_size, gamma_d, neighbors, epochs, batch_size and checkpoint_every must be positive",
            );
        }
        // Written so that NaN fails too.
        if !(self.learning_rate > 0.0 && self.weight_decay >= 0.0 && self.radius >= 0.0 && self.sigma >= 0.0)
        {
            return bad("learning_rate must be > 0, and weight_decay, radius and sigma >= 0");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_round_trip_as_overrides() {
        let paper = CfaSettings::of_preset(Preset::Paper);
        assert_eq!((paper.input_size, paper.batch_size), (256, 32));
        let json = serde_json::to_value(&paper).unwrap();
        assert_eq!(json["epochs"], serde_json::Value::Null, "preset values are not repeated");
        assert_eq!(serde_json::from_value::<CfaSettings>(json).unwrap(), paper);
        let custom: CfaSettings =
            serde_json::from_value(serde_json::json!({ "preset": "paper", "epochs": 3 })).unwrap();
        assert_eq!(custom, CfaSettings { epochs: 3, ..paper.clone() });
        let complete = serde_json::to_value(CfaSpec::complete(&custom)).unwrap();
        assert_eq!(complete["input_size"], 256);
        assert_eq!(serde_json::from_value::<CfaSettings>(complete).unwrap(), custom);
        assert!(serde_json::from_value::<CfaSettings>(serde_json::json!({ "epoch": 3 })).is_err());
    }

    #[test]
    fn invalid_values_are_refused() {
        assert!(CfaSettings::default().validate().is_ok());
        for broken in [
            CfaSettings { epochs: 0, ..CfaSettings::default() },
            CfaSettings { gamma_c: 2, ..CfaSettings::default() },
            CfaSettings { layers: Vec::new(), ..CfaSettings::default() },
            CfaSettings { radius: f64::NAN, ..CfaSettings::default() },
        ] {
            assert!(broken.validate().is_err(), "{broken:?}");
        }
    }
}
