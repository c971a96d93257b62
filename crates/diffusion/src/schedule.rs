//! The noise schedule: β_t and ᾱ_t = ∏_{s<=t} (1 − β_s), computed as DDAD's `loss.py` and
//! `reconstruction.py` compute them (β from a float64 linspace rounded to float32; 1 − β in
//! float32; the cumulative product accumulated in double precision, as PyTorch's CPU `cumprod`
//! does, then rounded to float32).

use serde::{Deserialize, Serialize};
use vigil_core::{Result, VigilError};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NoiseSchedule {
    betas: Vec<f32>,
    alpha_bars: Vec<f32>,
}

impl NoiseSchedule {
    /// β linear from `beta_start` to `beta_end` over `steps` timesteps (numpy's `linspace`).
    pub fn linear(beta_start: f64, beta_end: f64, steps: usize) -> Result<Self> {
        if steps < 2 || !(0.0 < beta_start && beta_start <= beta_end && beta_end < 1.0) {
            return Err(VigilError::Config(format!(
                "noise schedule: need at least 2 steps and 0 < beta_start <= beta_end < 1 (got {steps} steps, \
                 {beta_start}..{beta_end})"
            )));
        }
        let delta = (beta_end - beta_start) / (steps - 1) as f64;
        let betas: Vec<f32> = (0..steps)
            .map(|i| if i + 1 == steps { beta_end as f32 } else { (beta_start + i as f64 * delta) as f32 })
            .collect();
        let mut product = 1.0f64;
        let alpha_bars = betas
            .iter()
            .map(|&b| {
                product *= (1.0f32 - b) as f64;
                product as f32
            })
            .collect();
        Ok(NoiseSchedule { betas, alpha_bars })
    }

    /// DDAD's schedule: β from 1e-4 to 0.02 over T = 1000 steps.
    pub fn ddad() -> Self {
        Self::linear(1e-4, 0.02, 1000).expect("valid constants")
    }

    /// T, the number of timesteps (training draws t uniformly from 0..T).
    pub fn steps(&self) -> usize {
        self.betas.len()
    }

    pub fn beta(&self, t: usize) -> f32 {
        self.betas[t]
    }

    /// ᾱ_t; t = −1 gives 1 (the reference pads β with a leading 0 and indexes t + 1, so the last
    /// DDIM step lands on the clean image).
    pub fn alpha_bar(&self, t: i64) -> f32 {
        if t < 0 {
            1.0
        } else {
            self.alpha_bars[t as usize]
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ddad_schedule_values() {
        let s = NoiseSchedule::ddad();
        assert_eq!(s.steps(), 1000);
        assert_eq!(s.beta(0), 1e-4f32);
        assert_eq!(s.beta(999), 0.02f32);
        assert!((s.beta(500) as f64 - (1e-4 + 500.0 * (0.02 - 1e-4) / 999.0)).abs() < 1e-9);
        assert_eq!(s.alpha_bar(-1), 1.0);
        assert_eq!(s.alpha_bar(0), 1.0 - 1e-4f32);
        // Values PyTorch gives for (1 - b).cumprod(0) (the fixture test compares all 1000).
        assert!((s.alpha_bar(250) - 0.521_423_04).abs() < 1e-7, "{}", s.alpha_bar(250));
        assert!((s.alpha_bar(999) - 4.035_83e-5).abs() < 1e-10, "{}", s.alpha_bar(999));
        assert!((1..1000).all(|t| s.alpha_bar(t) < s.alpha_bar(t - 1)));
        assert!(NoiseSchedule::linear(0.0, 0.02, 1000).is_err());
        assert!(NoiseSchedule::linear(1e-4, 0.02, 1).is_err());
    }
}
