//! The predictor–corrector inpainter of score_sde (`controllable_generation.get_pc_inpainter`;
//! thesis Eqs. 7.19–7.20): start from the known pixels and prior noise elsewhere, then for each of
//! the SDE's N times from 1 down to ε run a Langevin corrector step and a reverse-diffusion
//! predictor step, each followed by re-imposing the known pixels as a draw from the forward
//! marginal at that time (m(t)·x + s(t)·z; the thesis writes the clean x, score_sde pastes the
//! noised one). The result is the last noise-free mean with the known pixels replaced by
//! exactly the input (score_sde's last mean holds m(ε)·x there, within 1e-5 of it).

use burn::tensor::Tensor;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use vigil_core::{Result, VigilError};
use vigil_nn::tensor_from_vec;

use crate::sampling::gaussian;
use crate::sde::{ScoreModel, Sde, T_EPS};

/// The inpainter's settings (score_sde's defaults in the thesis' experiments).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InpaintSettings {
    /// Signal-to-noise ratio of the Langevin corrector's step size.
    pub snr: f64,
    /// Corrector steps per time step (0: predictor only).
    pub corrector_steps: usize,
}

impl Default for InpaintSettings {
    fn default() -> Self {
        InpaintSettings { snr: 0.16, corrector_steps: 1 }
    }
}

impl InpaintSettings {
    pub fn validate(&self) -> Result<()> {
        if !(self.snr.is_finite() && self.snr > 0.0) {
            return Err(VigilError::Config(format!("inpainting: snr {} must be positive", self.snr)));
        }
        Ok(())
    }

    /// Score evaluations of one inpainting with `sde`.
    pub fn evaluations(&self, sde: &Sde) -> usize {
        sde.steps() * (1 + self.corrector_steps)
    }
}

fn noise_like(x: &Tensor<4>, rng: &mut ChaCha8Rng) -> Tensor<4> {
    let dims = x.dims();
    tensor_from_vec(gaussian(rng, dims.iter().product()), dims, &x.device())
}

/// The L2 norm of each image's values, averaged over the batch (score_sde's corrector uses one
/// step size for the batch).
fn mean_norm(x: &Tensor<4>) -> f64 {
    let n = x.dims()[0];
    let squares = x.clone().square().sum_dim(3).sum_dim(2).sum_dim(1);
    let norms: Vec<f32> = vigil_nn::tensor_to_vec(squares.sqrt());
    norms.iter().map(|&v| v as f64).sum::<f64>() / n as f64
}

/// Inpaint `data` `[n, C, H, W]` (in the network's value range) where `known` is 0. `known` is
/// 1 on the pixels to keep and 0 on those to fill, `[n, C, H, W]` or `[n, 1, H, W]`.
/// `on_step(done, total)` is called after each of the N time steps.
pub fn inpaint(
    model: &dyn ScoreModel,
    sde: &Sde,
    data: &Tensor<4>,
    known: &Tensor<4>,
    settings: &InpaintSettings,
    rng: &mut ChaCha8Rng,
    on_step: &mut dyn FnMut(usize, usize),
) -> Result<Tensor<4>> {
    settings.validate()?;
    sde.validate()?;
    let [n, c, h, w] = data.dims();
    let [mn, mc, mh, mw] = known.dims();
    if (mn, mh, mw) != (n, h, w) || (mc != c && mc != 1) {
        return Err(VigilError::invalid(format!(
            "inpainting mask {:?} does not fit the images {:?}",
            known.dims(),
            data.dims()
        )));
    }
    let known = if mc == c { known.clone() } else { known.clone().repeat_dim(1, c) };
    let unknown = known.clone().neg().add_scalar(1.0);
    // Re-impose the known pixels from the forward marginal at t; returns (x, x_mean).
    let paste = |x: Tensor<4>, x_mean: Tensor<4>, t: f64, rng: &mut ChaCha8Rng| {
        let (m, s) = sde.marginal(t);
        let data_mean = data.clone().mul_scalar(m);
        let data_noised = data_mean.clone() + noise_like(data, rng).mul_scalar(s);
        let x = x * unknown.clone() + data_noised * known.clone();
        let x_mean = x_mean * unknown.clone() + data_mean * known.clone();
        (x, x_mean)
    };
    let prior = noise_like(data, rng).mul_scalar(sde.prior_std());
    let mut x = data.clone() * known.clone() + prior * unknown.clone();
    let mut x_mean = x.clone();
    let steps = sde.steps();
    for i in 0..steps {
        // linspace(1, ε, N)
        let t = 1.0 + (T_EPS - 1.0) * i as f64 / (steps - 1) as f64;
        let times = vec![t; n];
        for _ in 0..settings.corrector_steps {
            // Langevin: ε_step = 2 α (snr ‖z‖ / ‖∇log p‖)², x ← x + ε_step ∇log p + √(2 ε_step) z.
            let grad = model.score(x.clone(), &times);
            let noise = noise_like(&x, rng);
            let grad_norm = mean_norm(&grad);
            // A score of zero (an untrained network) would make the step infinite: no step then.
            let ratio = if grad_norm > 0.0 { settings.snr * mean_norm(&noise) / grad_norm } else { 0.0 };
            let step_size = ratio * ratio * 2.0 * sde.langevin_alpha(t);
            let corrected_mean = x + grad.mul_scalar(step_size);
            let corrected = corrected_mean.clone() + noise.mul_scalar((2.0 * step_size).sqrt());
            (x, _) = paste(corrected, corrected_mean, t, rng);
        }
        // Reverse diffusion: x ← x − f_i(x) + G_i² ∇log p + G_i z.
        let (shrink, g) = sde.discretize(t);
        let score = model.score(x.clone(), &times);
        let predicted_mean = x.clone() - x.mul_scalar(shrink) + score.mul_scalar(g * g);
        let predicted = predicted_mean.clone() + noise_like(data, rng).mul_scalar(g);
        (x, x_mean) = paste(predicted, predicted_mean, t, rng);
        on_step(i + 1, steps);
    }
    Ok(x_mean * unknown + data.clone() * known)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Device;
    use rand::SeedableRng;
    use vigil_nn::tensor_to_vec;

    use crate::ode::tests::GaussianData;

    #[test]
    fn known_pixels_are_kept_and_the_rest_follows_the_data() {
        let device = Device::flex();
        for sde in [
            Sde::Ve { sigma_min: 0.01, sigma_max: 50.0, steps: 200 },
            Sde::Vp { beta_min: 0.1, beta_max: 20.0, steps: 200 },
        ] {
            let model = GaussianData { mean: 0.4, std: 0.2, sde };
            let (n, c, s) = (2, 3, 16);
            // Known pixels far from the data distribution, so a leak would show.
            let data: Vec<f32> = (0..n * c * s * s).map(|i| -3.0 + (i % 7) as f32 * 0.01).collect();
            let mask: Vec<f32> = (0..n * s * s).map(|i| if (i % s) < s / 2 { 1.0 } else { 0.0 }).collect();
            let data_t = tensor_from_vec(data.clone(), [n, c, s, s], &device);
            let mask_t = tensor_from_vec(mask.clone(), [n, 1, s, s], &device);
            let mut calls = 0;
            let out = inpaint(
                &model,
                &sde,
                &data_t,
                &mask_t,
                &InpaintSettings::default(),
                &mut ChaCha8Rng::seed_from_u64(1),
                &mut |done, total| {
                    calls += 1;
                    assert_eq!((done, total), (calls, 200));
                },
            )
            .unwrap();
            assert_eq!(calls, 200);
            let out = tensor_to_vec(out);
            let mut filled = Vec::new();
            for (i, (&o, &d)) in out.iter().zip(&data).enumerate() {
                let (image, pixel) = (i / (c * s * s), i % (s * s));
                if mask[image * s * s + pixel] == 1.0 {
                    assert_eq!(o, d, "{sde:?}: known value {i} changed");
                } else {
                    filled.push(o as f64);
                }
            }
            // The filled pixels are draws from N(0.4, 0.2²) (the Gaussian data has independent
            // pixels, so nothing leaks from the known half).
            let mean = filled.iter().sum::<f64>() / filled.len() as f64;
            let var = filled.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / filled.len() as f64;
            assert!((mean - 0.4).abs() < 0.05 && (var.sqrt() - 0.2).abs() < 0.06, "{sde:?}: {mean} {var}");
        }
    }

    #[test]
    fn a_mask_of_the_wrong_shape_is_refused() {
        let device = Device::flex();
        let sde = Sde::Vp { beta_min: 0.1, beta_max: 20.0, steps: 25 };
        let model = GaussianData { mean: 0.0, std: 1.0, sde };
        let data = Tensor::<4>::zeros([1, 3, 8, 8], &device);
        let mask = Tensor::<4>::ones([1, 2, 8, 8], &device);
        let err = inpaint(
            &model,
            &sde,
            &data,
            &mask,
            &InpaintSettings::default(),
            &mut ChaCha8Rng::seed_from_u64(0),
            &mut |_, _| {},
        )
        .unwrap_err();
        assert!(err.to_string().contains("does not fit"), "{err}");
    }
}
