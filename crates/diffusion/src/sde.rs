//! Score-based SDEs (Song et al., "Score-Based Generative Modeling through Stochastic
//! Differential Equations", ICLR 2021; thesis §7.1–7.5): the variance-exploding (VE) and
//! variance-preserving (VP) SDEs with their perturbation kernels, the score of a network that
//! predicts the standardised noise, and the continuous denoising score-matching loss.
//!
//! Time runs over [0, 1]: t = 0 is the data, t = 1 the prior. Every SDE here is linear in x,
//! dx = f(t)·x dt + g(t) dw, so its kernel is x_t = m(t)·x0 + s(t)·z with z ~ N(0, I).

use burn::tensor::Tensor;
use serde::{Deserialize, Serialize};
use vigil_core::{Result, VigilError};
use vigil_nn::tensor_from_vec;

use crate::unet::{DropoutNoise, UNet};

/// The smallest time the solvers and the training use: the score is unbounded at t = 0
/// (`eps = 1e-5` in score_sde's losses and likelihood).
pub const T_EPS: f64 = 1e-5;

/// A linear SDE on [0, 1]. `steps` is the N of the discretised (predictor–corrector) sampler.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Sde {
    /// dx = √(d σ²(t)/dt) dw with σ(t) = σ_min (σ_max/σ_min)^t (NCSN's geometric noise levels).
    Ve { sigma_min: f64, sigma_max: f64, steps: usize },
    /// dx = −½β(t) x dt + √β(t) dw with β(t) = β_min + t (β_max − β_min) (continuous DDPM).
    Vp { beta_min: f64, beta_max: f64, steps: usize },
}

impl Sde {
    /// The thesis' VE SDE (score-sde configs: σ_min 0.01, σ_max 348, N = 2000).
    pub fn ve() -> Self {
        Sde::Ve { sigma_min: 0.01, sigma_max: 348.0, steps: 2000 }
    }

    /// The VP SDE (β from 0.1 to 20, N = 1000).
    pub fn vp() -> Self {
        Sde::Vp { beta_min: 0.1, beta_max: 20.0, steps: 1000 }
    }

    pub fn validate(&self) -> Result<()> {
        let ok = match *self {
            Sde::Ve { sigma_min, sigma_max, steps } => {
                sigma_min.is_finite()
                    && sigma_min > 0.0
                    && sigma_max.is_finite()
                    && sigma_max > sigma_min
                    && steps >= 2
            }
            Sde::Vp { beta_min, beta_max, steps } => {
                beta_min.is_finite()
                    && beta_min > 0.0
                    && beta_max.is_finite()
                    && beta_max >= beta_min
                    && steps >= 2
                    // β_i = β/N of the discrete chain must stay below 1 (√(1 − β_i) in the predictor).
                    && beta_max < steps as f64
            }
        };
        if ok {
            Ok(())
        } else {
            Err(VigilError::Config(format!(
                "SDE {self:?}: need 0 < sigma_min < sigma_max (VE) or 0 < beta_min <= beta_max < steps \
                 (VP), and at least 2 steps"
            )))
        }
    }

    /// N, the number of steps of the discretised reverse process.
    pub fn steps(&self) -> usize {
        match *self {
            Sde::Ve { steps, .. } | Sde::Vp { steps, .. } => steps,
        }
    }

    /// σ(t) of the VE SDE.
    fn sigma(sigma_min: f64, sigma_max: f64, t: f64) -> f64 {
        sigma_min * (sigma_max / sigma_min).powf(t)
    }

    /// ∫_0^t β(s) ds of the VP SDE.
    fn beta_integral(beta_min: f64, beta_max: f64, t: f64) -> f64 {
        beta_min * t + 0.5 * t * t * (beta_max - beta_min)
    }

    /// The perturbation kernel: x_t = m(t)·x0 + s(t)·z. Returns (m(t), s(t)).
    pub fn marginal(&self, t: f64) -> (f64, f64) {
        match *self {
            Sde::Ve { sigma_min, sigma_max, .. } => (1.0, Self::sigma(sigma_min, sigma_max, t)),
            Sde::Vp { beta_min, beta_max, .. } => {
                let log_mean = -0.5 * Self::beta_integral(beta_min, beta_max, t);
                (log_mean.exp(), (-(2.0 * log_mean).exp_m1()).sqrt())
            }
        }
    }

    /// The drift coefficient f(t) (drift = f(t)·x) and the diffusion g(t).
    pub fn coefficients(&self, t: f64) -> (f64, f64) {
        match *self {
            Sde::Ve { sigma_min, sigma_max, .. } => {
                let sigma = Self::sigma(sigma_min, sigma_max, t);
                (0.0, sigma * (2.0 * (sigma_max / sigma_min).ln()).sqrt())
            }
            Sde::Vp { beta_min, beta_max, .. } => {
                let beta = beta_min + t * (beta_max - beta_min);
                (-0.5 * beta, beta.sqrt())
            }
        }
    }

    /// The standard deviation of the prior N(0, σ² I) at t = 1.
    pub fn prior_std(&self) -> f64 {
        match *self {
            Sde::Ve { sigma_max, .. } => sigma_max,
            Sde::Vp { .. } => 1.0,
        }
    }

    /// The index i ∈ 0..N of time t on the discrete grid (`(t · (N − 1) / T).long()`).
    fn index(&self, t: f64) -> usize {
        let n = self.steps();
        ((t * (n - 1) as f64) as usize).min(n - 1)
    }

    /// The discretised reverse step at time t, as score_sde's `discretize`: x_{i−1} =
    /// x_i − f_i(x_i) + G_i² s(x_i) + G_i z with f_i(x) = `shrink`·x. Returns (`shrink`, G_i).
    /// VE: f = 0, G = √(σ_i² − σ_{i−1}²) on the geometric grid (σ_{−1} = 0). VP: the DDPM chain,
    /// f = (√(1 − β_i) − 1)·x, G = √β_i with β_i from linspace(β_min/N, β_max/N, N).
    pub fn discretize(&self, t: f64) -> (f64, f64) {
        let i = self.index(t);
        match *self {
            Sde::Ve { sigma_min, sigma_max, steps } => {
                let level = |k: usize| {
                    let (lo, hi) = (sigma_min.ln(), sigma_max.ln());
                    (lo + (hi - lo) * k as f64 / (steps - 1) as f64).exp()
                };
                let previous = if i == 0 { 0.0 } else { level(i - 1) };
                (0.0, (level(i).powi(2) - previous * previous).sqrt())
            }
            Sde::Vp { .. } => {
                let beta = self.discrete_beta(i);
                ((1.0 - beta).sqrt() - 1.0, beta.sqrt())
            }
        }
    }

    /// β_i of the VP chain (linspace(β_min/N, β_max/N, N)).
    fn discrete_beta(&self, i: usize) -> f64 {
        match *self {
            Sde::Vp { beta_min, beta_max, steps } => {
                let n = steps as f64;
                beta_min / n + (beta_max - beta_min) / n * i as f64 / (n - 1.0)
            }
            Sde::Ve { .. } => 0.0,
        }
    }

    /// The α of the Langevin corrector's step size at time t: 1 − β_i for VP, 1 for VE.
    pub fn langevin_alpha(&self, t: f64) -> f64 {
        match self {
            Sde::Vp { .. } => 1.0 - self.discrete_beta(self.index(t)),
            Sde::Ve { .. } => 1.0,
        }
    }

    /// The time label the U-Net's sinusoidal embedding receives: 999·t for both SDEs (score_sde
    /// feeds 999·t to its positional-embedding VP models; its VE models embed log σ(t), which
    /// t determines one-to-one).
    pub fn network_time(t: f64) -> f32 {
        (999.0 * t) as f32
    }
}

/// Anything that gives ∇ log p_t(x): the U-Net with its SDE, or a closed form in tests.
pub trait ScoreModel {
    /// The score at `x` `[n, C, H, W]`, one time per image.
    fn score(&self, x: Tensor<4>, t: &[f64]) -> Tensor<4>;
}

/// The per-image column `[n, 1, 1, 1]` of `f(t)`.
pub(crate) fn per_image(t: &[f64], f: impl Fn(f64) -> f64, device: &burn::tensor::Device) -> Tensor<4> {
    tensor_from_vec(t.iter().map(|&ti| f(ti) as f32).collect(), [t.len(), 1, 1, 1], device)
}

/// The U-Net as a score model: the network predicts the standardised noise z of x_t = m·x0 + s·z,
/// so the score is −output / s(t). For VE this is score_sde's `scale_by_sigma` (the output divided
/// by σ(t)); for VP its ε-parameterised score. Both make the network's target z, as DDPM training.
pub struct ScoreNet<'a> {
    pub net: &'a UNet,
    pub sde: Sde,
}

impl ScoreNet<'_> {
    fn score_with(&self, x: Tensor<4>, t: &[f64], dropout: Option<&mut DropoutNoise>) -> Tensor<4> {
        let device = x.device();
        let times: Vec<f32> = t.iter().map(|&ti| Sde::network_time(ti)).collect();
        let out = self.net.forward(x, &times, dropout);
        let sde = self.sde;
        out.neg() / per_image(t, |ti| sde.marginal(ti).1, &device)
    }
}

impl ScoreModel for ScoreNet<'_> {
    fn score(&self, x: Tensor<4>, t: &[f64]) -> Tensor<4> {
        self.score_with(x, t, None)
    }
}

/// The continuous denoising score-matching loss (thesis Eq. 7.7; score_sde's `get_sde_loss_fn`
/// with `reduce_mean=False`, no likelihood weighting): x_t = m(t)·x0 + s(t)·z,
/// ½ Σ_{C,H,W} (s(t)·score(x_t, t) + z)², averaged over the batch. The weighting λ(t) = s(t)²
/// keeps every t's term of order one.
pub fn score_matching_loss(
    net: &UNet,
    sde: &Sde,
    x0: Tensor<4>,
    t: &[f64],
    z: Tensor<4>,
    dropout: Option<&mut DropoutNoise>,
) -> Tensor<1> {
    let device = x0.device();
    let mean = per_image(t, |ti| sde.marginal(ti).0, &device);
    let std = per_image(t, |ti| sde.marginal(ti).1, &device);
    let x_t = x0 * mean + z.clone() * std.clone();
    let score = ScoreNet { net, sde: *sde }.score_with(x_t, t, dropout);
    (score * std + z).square().sum_dim(3).sum_dim(2).sum_dim(1).mean().mul_scalar(0.5).reshape([1])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marginals_match_their_sdes() {
        // VE: s(t)² grows as ∫ g² dt (s(0)² = σ_min² is the kernel's floor); VP: m' = f m and
        // (s²)' = 2 f s² + g². Checked by central differences.
        for sde in [Sde::ve(), Sde::vp()] {
            sde.validate().unwrap();
            for &t in &[0.1, 0.5, 0.9] {
                let h = 1e-6;
                let (m0, s0) = sde.marginal(t - h);
                let (m1, s1) = sde.marginal(t + h);
                let (m, s) = sde.marginal(t);
                let (f, g) = sde.coefficients(t);
                let dm = (m1 - m0) / (2.0 * h);
                let dvar = (s1 * s1 - s0 * s0) / (2.0 * h);
                assert!((dm - f * m).abs() < 1e-5 * (1.0 + m), "{sde:?} t {t}: {dm} vs {}", f * m);
                let expected = 2.0 * f * s * s + g * g;
                assert!((dvar - expected).abs() < 1e-5 * expected.abs().max(1.0), "{sde:?} t {t}");
            }
        }
        let (m, s) = Sde::vp().marginal(1.0);
        // m(1) = exp(−½ (β_min + ½(β_max − β_min))) = exp(−5.025), s² = 1 − m².
        assert!((m - (-5.025f64).exp()).abs() < 1e-12 && (s * s + m * m - 1.0).abs() < 1e-12);
        assert_eq!(Sde::ve().marginal(1.0), (1.0, 348.0));
        assert!((Sde::ve().marginal(0.0).1 - 0.01).abs() < 1e-12);
    }

    #[test]
    fn discretisation_follows_score_sde() {
        // VP at N = 1000 is DDPM's β from 1e-4 to 0.02.
        let vp = Sde::vp();
        assert!((vp.langevin_alpha(0.0) - (1.0 - 1e-4)).abs() < 1e-12);
        assert!((vp.langevin_alpha(1.0) - (1.0 - 0.02)).abs() < 1e-12);
        let (shrink, g) = vp.discretize(1.0);
        assert!((g - 0.02f64.sqrt()).abs() < 1e-12 && (shrink - (0.98f64.sqrt() - 1.0)).abs() < 1e-12);
        // VE: the last step goes from σ_max to the previous geometric level; the first from σ_min to 0.
        let ve = Sde::ve();
        let ratio = (348.0f64 / 0.01).ln() / 1999.0;
        let (_, g_top) = ve.discretize(1.0);
        assert!((g_top - (348.0f64.powi(2) - (348.0 * (-ratio).exp()).powi(2)).sqrt()).abs() < 1e-9);
        assert!((ve.discretize(0.0).1 - 0.01).abs() < 1e-12);
        assert!(Sde::Ve { sigma_min: 1.0, sigma_max: 0.5, steps: 10 }.validate().is_err());
        assert!(Sde::Vp { beta_min: 0.1, beta_max: 20.0, steps: 1 }.validate().is_err());
        assert!(Sde::Vp { beta_min: 0.1, beta_max: 20.0, steps: 20 }.validate().is_err());
    }
}
