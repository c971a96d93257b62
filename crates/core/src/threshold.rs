use serde::{Deserialize, Serialize};

/// How a decision threshold was chosen; stored in the model file and shown in every report.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum ThresholdKind {
    /// The largest score seen on held-out normal images.
    Max,
    /// The p-quantile of held-out normal scores (p in (0, 1]).
    Quantile { p: f64 },
    /// mean + k·std of held-out normal scores.
    KSigma { k: f64 },
    /// The threshold maximising F1 on labelled validation data.
    F1Optimal,
    /// log10 NFA ≤ −k: the expected number of false detections per image is at most 10^−k.
    Nfa { k: f64 },
    /// log10 NFA ≤ `value`: the level at which held-out normal images gave 10^−k false detections
    /// per image (the theoretical level −k assumes a background model that real data may not follow).
    NfaCalibrated { k: f64 },
    /// Given by the user.
    Fixed,
}

impl std::fmt::Display for ThresholdKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ThresholdKind::Max => write!(f, "max of normal validation scores"),
            ThresholdKind::Quantile { p } => write!(f, "{p}-quantile of normal validation scores"),
            ThresholdKind::KSigma { k } => write!(f, "mean + {k}·sigma of normal validation scores"),
            ThresholdKind::F1Optimal => write!(f, "F1-optimal on labelled validation data"),
            ThresholdKind::Nfa { k } if *k == 0.0 => write!(f, "a contrario: NFA <= 1 (log10 NFA <= 0)"),
            ThresholdKind::Nfa { k } => write!(f, "a contrario: log10 NFA <= -{k}"),
            ThresholdKind::NfaCalibrated { k } => {
                write!(f, "a contrario, calibrated on held-out normals to 10^-{k} false detections per image")
            }
            ThresholdKind::Fixed => write!(f, "fixed by the user"),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ThresholdLevel {
    Image,
    Pixel,
}

/// A decision threshold on scores: a score strictly above `value` is anomalous.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Threshold {
    pub kind: ThresholdKind,
    pub level: ThresholdLevel,
    pub value: f64,
    /// How many scores it was computed from (0 for NFA and fixed thresholds; the number of
    /// held-out images for a calibrated NFA threshold).
    pub n_samples: usize,
}

impl Threshold {
    /// For NFA thresholds, the log10 NFA at or below which a pixel or region is detected.
    pub fn log10_nfa_level(&self) -> Option<f64> {
        match self.kind {
            // 0 − k, not −k: NFA ≤ 1 reads as level 0, not −0.
            ThresholdKind::Nfa { k } => Some(0.0 - k),
            ThresholdKind::NfaCalibrated { .. } => Some(self.value),
            _ => None,
        }
    }
}
