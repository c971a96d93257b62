//! DAD, Diffusion Anomaly Detection (Tailanian's thesis, §7.6–7.8; preliminary, unpublished):
//! a score-based diffusion model of the normal images maps a test image through the
//! probability-flow ODE to its latent z, which follows the prior N(0, σ² I) where the image is
//! normal. Stage 1: z is denoised by non-local means, aggregated over channels (L2), and tested
//! a contrario as "detection in noise" (best power-transform × Gaussian/Laplacian fit mapped to
//! N(0, 1), log10 NFA = log10(H·W) + min over channels log10 p, detection at log10 NFA < 3),
//! the detection cleaned by morphology. Stage 2: the detected region is inpainted by the same
//! model and compared with the image.
//!
//! The score model, ODE and inpainter are `vigil-diffusion`'s; the detection in noise is
//! `vigil-nfa`'s. Deviations are listed in `methods/dad/README.md`.

mod detector;
mod morphology;
mod nlm;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use vigil_core::{Result, VigilError};
use vigil_diffusion::{InpaintSettings, OdeSolver, ScoreTrainSettings, Sde, UNetSettings};

pub use detector::{DadDetector, DadMaps, CHECKPOINT_FILE};
pub use morphology::{close, dilate, erode, median};
pub use nlm::{nl_means, schraudolph_exp, NlmParams};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Preset {
    /// 64 px U-Net, VP SDE, Heun ODE with 50 steps, 50 inpainting steps: one class on 2 cores.
    #[default]
    Cpu,
    /// score_sde's VE model at 256 px as the author's code runs DAD (RK45 rtol = atol = 1e-5).
    Paper,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SdeKind {
    /// σ from 0.01 to 348, images in [0, 1].
    Ve,
    /// β from 0.1 to 20, images in [−1, 1].
    Vp,
}

/// Which map the detector reports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    /// Stage 1 only: the NLM-denoised latent's channel L2 norm (in prior standard deviations).
    Likelihood,
    /// Stage 2: the distance between the image and its inpainting over the detected region.
    #[default]
    Inpainting,
}

/// Everything that defines a DAD model. The default is the CPU preset.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DadSettings {
    pub preset: Preset,
    /// U-Net preset: `cpu`, `ddad` or `ddad-s`.
    pub network: String,
    pub sde: SdeKind,
    /// N of the inpainter.
    pub sde_steps: usize,
    pub steps: usize,
    pub batch: usize,
    pub lr: f64,
    pub warmup: usize,
    /// Global gradient-norm clip; 0: no clipping.
    pub grad_clip: f32,
    pub ema_decay: f64,
    pub checkpoint_every: usize,
    /// Probability-flow ODE solver.
    pub ode: OdeSolver,
    /// NLM patch side and search distance (pixels), and h as a multiple of the prior σ (NLM's
    /// σ is the prior σ).
    pub nlm_patch_size: usize,
    pub nlm_patch_distance: usize,
    pub nlm_h_factor: f64,
    /// Detection where log10 NFA is below this (the thesis: 3, about 1000 false alarms an image,
    /// permissive on purpose).
    pub nfa_level: f64,
    /// Disk radius of the closing, window of the median, disk radius of the final dilation (pixels
    /// at the network's size; 0 skips a step).
    pub closing_radius: usize,
    pub median_size: usize,
    pub dilation_radius: usize,
    pub stage: Stage,
    pub snr: f64,
    pub corrector_steps: usize,
    /// σ (network pixels) of the Gaussian smoothing of the stage-2 distance.
    pub sigma: f32,
    pub inpaint_seed: u64,
}

impl Default for DadSettings {
    fn default() -> Self {
        DadSettings {
            preset: Preset::Cpu,
            network: "cpu".into(),
            sde: SdeKind::Vp,
            sde_steps: 50,
            steps: 600,
            batch: 8,
            lr: 5e-4,
            warmup: 50,
            grad_clip: 1.0,
            ema_decay: 0.999,
            checkpoint_every: 100,
            ode: OdeSolver::Heun { steps: 50 },
            nlm_patch_size: 5,
            nlm_patch_distance: 16,
            nlm_h_factor: 0.8,
            nfa_level: 3.0,
            closing_radius: 2,
            median_size: 3,
            dilation_radius: 3,
            stage: Stage::Inpainting,
            snr: 0.16,
            corrector_steps: 1,
            sigma: 1.5,
            inpaint_seed: 0,
        }
    }
}

impl DadSettings {
    /// score_sde's VE configuration (N = 2000, 100,000 steps of 8, Adam 2e-4, warm-up 5000, clip 1,
    /// EMA 0.999) on DDAD's 256 px U-Net; RK45 with rtol = atol = 1e-5; morphology scaled to 256 px
    /// (closing 5, median 5, dilation 10: the code's 21×21 ellipse).
    pub fn paper() -> Self {
        let train = ScoreTrainSettings::default();
        DadSettings {
            preset: Preset::Paper,
            network: "ddad".into(),
            sde: SdeKind::Ve,
            sde_steps: 2000,
            steps: train.steps,
            batch: train.batch,
            lr: train.lr,
            warmup: train.warmup,
            grad_clip: train.grad_clip.unwrap_or(0.0),
            ema_decay: train.ema_decay,
            checkpoint_every: train.checkpoint_every,
            ode: OdeSolver::default(),
            closing_radius: 5,
            median_size: 5,
            dilation_radius: 10,
            sigma: 4.0,
            ..Self::default()
        }
    }

    pub fn of_preset(preset: Preset) -> Self {
        match preset {
            Preset::Cpu => Self::default(),
            Preset::Paper => Self::paper(),
        }
    }

    pub fn unet(&self) -> Result<UNetSettings> {
        UNetSettings::preset(&self.network)
    }

    pub fn sde(&self) -> Sde {
        match self.sde {
            SdeKind::Ve => Sde::Ve { sigma_min: 0.01, sigma_max: 348.0, steps: self.sde_steps },
            SdeKind::Vp => Sde::Vp { beta_min: 0.1, beta_max: 20.0, steps: self.sde_steps },
        }
    }

    pub fn train(&self) -> ScoreTrainSettings {
        ScoreTrainSettings {
            steps: self.steps,
            batch: self.batch,
            lr: self.lr,
            warmup: self.warmup,
            grad_clip: (self.grad_clip > 0.0).then_some(self.grad_clip),
            ema_decay: self.ema_decay,
            checkpoint_every: self.checkpoint_every,
        }
    }

    pub fn inpainting(&self) -> InpaintSettings {
        InpaintSettings { snr: self.snr, corrector_steps: self.corrector_steps }
    }

    pub fn nlm(&self) -> NlmParams {
        let sigma = self.sde().prior_std();
        NlmParams {
            patch_size: self.nlm_patch_size,
            patch_distance: self.nlm_patch_distance,
            h: self.nlm_h_factor * sigma,
            sigma,
        }
    }

    pub fn validate(&self) -> Result<()> {
        self.unet()?.validate()?;
        self.sde().validate()?;
        self.train().validate()?;
        self.inpainting().validate()?;
        self.ode.validate()?;
        let bad = |m: String| Err(VigilError::Config(format!("DAD: {m}")));
        if self.nlm_patch_size == 0 || !(self.nlm_h_factor.is_finite() && self.nlm_h_factor > 0.0) {
            return bad(format!(
                "nlm_patch_size {} must be at least 1 and nlm_h_factor {} positive",
                self.nlm_patch_size, self.nlm_h_factor
            ));
        }
        if !self.nfa_level.is_finite() {
            return bad(format!("nfa_level {} must be finite", self.nfa_level));
        }
        if !(self.sigma.is_finite() && self.sigma >= 0.0) {
            return bad(format!("sigma {} must be >= 0", self.sigma));
        }
        Ok(())
    }
}

/// [`DadSettings`] as a user writes them: `preset` plus overrides (`dad:preset=paper,stage=likelihood`);
/// written back as the preset and the fields that differ from it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DadSpec(pub DadSettings);

impl DadSpec {
    /// Every field written out (what `vigil methods` shows).
    pub fn complete(&self) -> Value {
        serde_json::to_value(&self.0).expect("settings serialise")
    }
}

impl Serialize for DadSpec {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        let full = serde_json::to_value(&self.0).map_err(serde::ser::Error::custom)?;
        let base =
            serde_json::to_value(DadSettings::of_preset(self.0.preset)).map_err(serde::ser::Error::custom)?;
        let mut out = serde_json::Map::new();
        if let (Value::Object(full), Value::Object(base)) = (full, base) {
            // Every key, so `key=value` overrides find it; null where the preset's value holds.
            for (key, value) in full {
                let keep = key == "preset" || base.get(&key) != Some(&value);
                out.insert(key, if keep { value } else { Value::Null });
            }
        }
        Value::Object(out).serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for DadSpec {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        let Value::Object(given) = Value::deserialize(deserializer)? else {
            return Err(serde::de::Error::custom("DAD settings must be an object of key = value pairs"));
        };
        let preset: Preset = match given.get("preset") {
            Some(v) => serde_json::from_value(v.clone()).map_err(serde::de::Error::custom)?,
            None => Preset::default(),
        };
        let mut merged =
            serde_json::to_value(DadSettings::of_preset(preset)).map_err(serde::de::Error::custom)?;
        for (key, value) in given.into_iter().filter(|(_, v)| !v.is_null()) {
            merged[key.as_str()] = value;
        }
        serde_json::from_value(merged).map(DadSpec).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_by_name_with_overrides_round_trip() {
        let spec: DadSpec =
            serde_json::from_value(serde_json::json!({"preset": "paper", "stage": "likelihood"})).unwrap();
        assert_eq!(spec.0, DadSettings { stage: Stage::Likelihood, ..DadSettings::paper() });
        let written = serde_json::to_value(&spec).unwrap();
        assert_eq!(
            (&written["stage"], &written["ode"]),
            (&serde_json::json!("likelihood"), &serde_json::Value::Null)
        );
        assert_eq!(serde_json::from_value::<DadSpec>(written).unwrap(), spec);
        assert!(serde_json::from_value::<DadSpec>(serde_json::json!({"nfa": 3})).is_err());
        DadSettings::default().validate().unwrap();
        DadSettings::paper().validate().unwrap();
        let nlm = DadSettings::paper().nlm();
        assert_eq!((nlm.h, nlm.sigma), (0.8 * 348.0, 348.0));
    }
}
