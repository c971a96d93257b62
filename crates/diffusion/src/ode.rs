//! The probability-flow ODE (thesis Eqs. 7.8–7.15): dx/dt = f(t)·x − ½ g(t)² ∇log p_t(x), which
//! carries the data distribution at t = ε to the prior at t = 1 with the SDE's marginals. DAD
//! integrates it from the image to its latent z = x(1) (score_sde's likelihood uses
//! `solve_ivp(RK45, rtol = atol = 1e-5)` over [1e-5, 1]).
//!
//! Solvers: fixed-step Heun (2nd order) and classic RK4, and adaptive Dormand–Prince RK45 with
//! scipy's error control (the error of the 4th-order embedded solution, RMS norm scaled by
//! atol + rtol·max(|y|, |y_new|), safety 0.9, step factor within [0.2, 10], the initial step of
//! `select_initial_step`). The whole batch is one system, as in score_sde, so it shares the steps.

use burn::tensor::Tensor;
use serde::{Deserialize, Serialize};
use vigil_core::{Result, VigilError};

use crate::sde::{ScoreModel, Sde, T_EPS};

/// How the ODE is integrated.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum OdeSolver {
    /// Heun's method (explicit trapezoid) with `steps` equal steps: 2 score evaluations a step.
    Heun { steps: usize },
    /// Classic 4th-order Runge–Kutta with `steps` equal steps: 4 evaluations a step.
    Rk4 { steps: usize },
    /// Adaptive Dormand–Prince 5(4) (scipy's RK45); fails after `max_evaluations` evaluations.
    Rk45 { rtol: f64, atol: f64, max_evaluations: usize },
}

impl Default for OdeSolver {
    /// score_sde's likelihood settings.
    fn default() -> Self {
        OdeSolver::Rk45 { rtol: 1e-5, atol: 1e-5, max_evaluations: 10_000 }
    }
}

impl OdeSolver {
    pub fn validate(&self) -> Result<()> {
        let ok = match *self {
            OdeSolver::Heun { steps } | OdeSolver::Rk4 { steps } => steps > 0,
            OdeSolver::Rk45 { rtol, atol, max_evaluations } => {
                rtol > 0.0 && atol > 0.0 && rtol.is_finite() && atol.is_finite() && max_evaluations > 0
            }
        };
        if ok {
            Ok(())
        } else {
            Err(VigilError::Config(format!(
                "ODE solver {self:?}: steps, rtol, atol and max_evaluations must be positive"
            )))
        }
    }
}

/// The end of a probability-flow integration.
pub struct FlowLatent {
    /// x(1): the image's latent, distributed as the prior N(0, σ_prior² I) for in-distribution data.
    pub z: Tensor<4>,
    /// Score evaluations used.
    pub evaluations: usize,
    /// Steps taken (accepted steps for RK45).
    pub steps: usize,
}

/// The probability-flow drift f(t)·x − ½ g(t)² s(x, t).
fn drift(model: &dyn ScoreModel, sde: &Sde, x: &Tensor<4>, t: f64) -> Tensor<4> {
    let n = x.dims()[0];
    let (f, g) = sde.coefficients(t);
    let score = model.score(x.clone(), &vec![t; n]);
    x.clone().mul_scalar(f) - score.mul_scalar(0.5 * g * g)
}

/// The RMS over all values of `err / (atol + rtol · max(|a|, |b|))`.
fn scaled_rms(err: &Tensor<4>, a: &Tensor<4>, b: &Tensor<4>, rtol: f64, atol: f64) -> f64 {
    let scale = a.clone().abs().max_pair(b.clone().abs()).mul_scalar(rtol).add_scalar(atol);
    let count = err.dims().iter().product::<usize>() as f64;
    let sum: f32 = (err.clone() / scale).square().sum().into_scalar();
    (sum as f64 / count).sqrt()
}

fn rms(x: &Tensor<4>) -> f64 {
    let count = x.dims().iter().product::<usize>() as f64;
    let sum: f32 = x.clone().square().sum().into_scalar();
    (sum as f64 / count).sqrt()
}

// Dormand–Prince 5(4) tableau (scipy's RK45: C, A, B, and E = B̂ − B for the error estimate).
const DP_C: [f64; 6] = [0.0, 1.0 / 5.0, 3.0 / 10.0, 4.0 / 5.0, 8.0 / 9.0, 1.0];
const DP_A: [[f64; 5]; 6] = [
    [0.0, 0.0, 0.0, 0.0, 0.0],
    [1.0 / 5.0, 0.0, 0.0, 0.0, 0.0],
    [3.0 / 40.0, 9.0 / 40.0, 0.0, 0.0, 0.0],
    [44.0 / 45.0, -56.0 / 15.0, 32.0 / 9.0, 0.0, 0.0],
    [19372.0 / 6561.0, -25360.0 / 2187.0, 64448.0 / 6561.0, -212.0 / 729.0, 0.0],
    [9017.0 / 3168.0, -355.0 / 33.0, 46732.0 / 5247.0, 49.0 / 176.0, -5103.0 / 18656.0],
];
const DP_B: [f64; 6] = [35.0 / 384.0, 0.0, 500.0 / 1113.0, 125.0 / 192.0, -2187.0 / 6784.0, 11.0 / 84.0];
const DP_E: [f64; 7] =
    [-71.0 / 57600.0, 0.0, 71.0 / 16695.0, -71.0 / 1920.0, 17253.0 / 339200.0, -22.0 / 525.0, 1.0 / 40.0];

/// Σ w_i k_i.
fn combine(ks: &[Tensor<4>], weights: &[f64]) -> Option<Tensor<4>> {
    ks.iter().zip(weights).filter(|(_, &w)| w != 0.0).fold(None, |acc, (k, &w)| {
        let term = k.clone().mul_scalar(w);
        Some(match acc {
            Some(a) => a + term,
            None => term,
        })
    })
}

/// Integrate the probability-flow ODE of `sde` with `model`'s score from `x` at t = ε (1e-5) to
/// t = 1. `on_step(t)` is called after each accepted step with the time reached (for progress).
pub fn probability_flow_latent(
    model: &dyn ScoreModel,
    sde: &Sde,
    x: Tensor<4>,
    solver: &OdeSolver,
    on_step: &mut dyn FnMut(f64),
) -> Result<FlowLatent> {
    solver.validate()?;
    sde.validate()?;
    let (t0, t1) = (T_EPS, 1.0);
    match *solver {
        OdeSolver::Heun { steps } | OdeSolver::Rk4 { steps } => {
            let h = (t1 - t0) / steps as f64;
            let mut y = x;
            let mut evaluations = 0;
            for i in 0..steps {
                let t = t0 + i as f64 * h;
                y = if matches!(solver, OdeSolver::Heun { .. }) {
                    let k1 = drift(model, sde, &y, t);
                    let k2 = drift(model, sde, &(y.clone() + k1.clone().mul_scalar(h)), t + h);
                    evaluations += 2;
                    y + (k1 + k2).mul_scalar(h / 2.0)
                } else {
                    let k1 = drift(model, sde, &y, t);
                    let k2 = drift(model, sde, &(y.clone() + k1.clone().mul_scalar(h / 2.0)), t + h / 2.0);
                    let k3 = drift(model, sde, &(y.clone() + k2.clone().mul_scalar(h / 2.0)), t + h / 2.0);
                    let k4 = drift(model, sde, &(y.clone() + k3.clone().mul_scalar(h)), t + h);
                    evaluations += 4;
                    y + (k1 + k2.mul_scalar(2.0) + k3.mul_scalar(2.0) + k4).mul_scalar(h / 6.0)
                };
                on_step(t + h);
            }
            Ok(FlowLatent { z: y, evaluations, steps })
        }
        OdeSolver::Rk45 { rtol, atol, max_evaluations } => {
            rk45(model, sde, x, (t0, t1), rtol, atol, max_evaluations, on_step)
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn rk45(
    model: &dyn ScoreModel,
    sde: &Sde,
    mut y: Tensor<4>,
    (t0, t1): (f64, f64),
    rtol: f64,
    atol: f64,
    max_evaluations: usize,
    on_step: &mut dyn FnMut(f64),
) -> Result<FlowLatent> {
    const SAFETY: f64 = 0.9;
    const MIN_FACTOR: f64 = 0.2;
    const MAX_FACTOR: f64 = 10.0;
    let error_exponent = -1.0 / 5.0;
    let mut t = t0;
    let mut f = drift(model, sde, &y, t);
    let mut evaluations = 1;
    // scipy's select_initial_step (order 4 error estimate).
    let mut h = {
        let scale = y.clone().abs().mul_scalar(rtol).add_scalar(atol);
        let d0 = rms(&(y.clone() / scale.clone()));
        let d1 = rms(&(f.clone() / scale.clone()));
        let h0 = if d0 < 1e-5 || d1 < 1e-5 { 1e-6 } else { 0.01 * d0 / d1 };
        let y1 = y.clone() + f.clone().mul_scalar(h0);
        let f1 = drift(model, sde, &y1, t + h0);
        evaluations += 1;
        let d2 = rms(&((f1 - f.clone()) / scale)) / h0;
        let h1 = if d1 <= 1e-15 && d2 <= 1e-15 {
            (h0 * 1e-3).max(1e-6)
        } else {
            (0.01 / d1.max(d2)).powf(1.0 / 5.0)
        };
        (100.0 * h0).min(h1).min(t1 - t0)
    };
    let mut steps = 0;
    while t < t1 {
        if evaluations >= max_evaluations {
            return Err(VigilError::Model(format!(
                "probability-flow ODE: RK45 reached {max_evaluations} score evaluations at t = {t:.6} \
                 (rtol {rtol}, atol {atol}); loosen the tolerances or raise max_evaluations"
            )));
        }
        let min_step = 10.0 * (t.abs() * f64::EPSILON).max(f64::MIN_POSITIVE);
        let mut rejected = false;
        loop {
            if h < min_step {
                return Err(VigilError::Model(format!(
                    "probability-flow ODE: RK45 step size fell below {min_step:e} at t = {t:.6}"
                )));
            }
            let h_step = h.min(t1 - t);
            let t_new = t + h_step;
            let mut ks = vec![f.clone()];
            for stage in 1..6 {
                let increment = combine(&ks, &DP_A[stage][..stage]).expect("first column is non-zero");
                let y_stage = y.clone() + increment.mul_scalar(h_step);
                ks.push(drift(model, sde, &y_stage, t + DP_C[stage] * h_step));
            }
            let y_new = y.clone() + combine(&ks, &DP_B).expect("weights present").mul_scalar(h_step);
            let f_new = drift(model, sde, &y_new, t_new);
            evaluations += 6;
            ks.push(f_new.clone());
            let err = combine(&ks, &DP_E).expect("weights present").mul_scalar(h_step);
            let err_norm = scaled_rms(&err, &y, &y_new, rtol, atol);
            if err_norm < 1.0 {
                let factor = if err_norm == 0.0 {
                    MAX_FACTOR
                } else {
                    (SAFETY * err_norm.powf(error_exponent)).min(MAX_FACTOR)
                };
                // After a rejection the step may not grow (scipy).
                h = if rejected { h_step * factor.min(1.0) } else { h_step * factor };
                t = t_new;
                y = y_new;
                f = f_new;
                break;
            }
            if !err_norm.is_finite() {
                return Err(VigilError::Model(format!(
                    "probability-flow ODE: the state is not finite at t = {t:.6} (a diverging score?)"
                )));
            }
            h = h_step * (SAFETY * err_norm.powf(error_exponent)).max(MIN_FACTOR);
            rejected = true;
        }
        steps += 1;
        on_step(t);
    }
    Ok(FlowLatent { z: y, evaluations, steps })
}

/// The prior's per-value negative log density of the latent, −log N(z; 0, σ_prior²), as DAD's
/// per-pixel likelihood map uses it (the divergence integral is dropped, thesis §7.6).
pub fn prior_neg_log_density(sde: &Sde, z: Tensor<4>) -> Tensor<4> {
    let sigma = sde.prior_std();
    let constant = 0.5 * (2.0 * std::f64::consts::PI * sigma * sigma).ln();
    z.square().mul_scalar(0.5 / (sigma * sigma)).add_scalar(constant)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use burn::tensor::Device;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;
    use vigil_nn::{tensor_from_vec, tensor_to_vec};

    use crate::sampling::gaussian;
    use crate::sde::per_image;

    /// The exact score of data distributed N(μ, s² I) under `sde`: p_t = N(m μ, m² s² + σ_t² ).
    pub(crate) struct GaussianData {
        pub mean: f64,
        pub std: f64,
        pub sde: Sde,
    }

    impl GaussianData {
        pub fn variance(&self, t: f64) -> f64 {
            let (m, s) = self.sde.marginal(t);
            m * m * self.std * self.std + s * s
        }
    }

    impl ScoreModel for GaussianData {
        fn score(&self, x: Tensor<4>, t: &[f64]) -> Tensor<4> {
            let device = x.device();
            let center = per_image(t, |ti| self.sde.marginal(ti).0 * self.mean, &device);
            let variance = per_image(t, |ti| self.variance(ti), &device);
            (center - x) / variance
        }
    }

    /// Along the exact flow (x − m(t) μ)/√v(t) is constant, so the latent is known in closed form.
    fn exact_latent(data: &GaussianData, x: &[f32]) -> Vec<f64> {
        let (m0, _) = data.sde.marginal(T_EPS);
        let (m1, _) = data.sde.marginal(1.0);
        let ratio = (data.variance(1.0) / data.variance(T_EPS)).sqrt();
        x.iter().map(|&v| m1 * data.mean + (v as f64 - m0 * data.mean) * ratio).collect()
    }

    #[test]
    fn probability_flow_recovers_the_latent_of_gaussian_data() {
        let device = Device::flex();
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        for sde in [Sde::ve(), Sde::vp()] {
            let data = GaussianData { mean: 0.3, std: 0.5, sde };
            let x: Vec<f32> = gaussian(&mut rng, 2 * 3 * 4 * 4).iter().map(|v| 0.3 + 0.5 * v).collect();
            let expected = exact_latent(&data, &x);
            let scale = sde.prior_std();
            for (solver, tolerance) in [
                (OdeSolver::Heun { steps: 400 }, 2e-3),
                (OdeSolver::Rk4 { steps: 100 }, 1e-4),
                // rtol = atol = 1e-5 on an f32 state.
                (OdeSolver::default(), 5e-4),
            ] {
                let mut times = Vec::new();
                let out = probability_flow_latent(
                    &data,
                    &sde,
                    tensor_from_vec(x.clone(), [2, 3, 4, 4], &device),
                    &solver,
                    &mut |t| times.push(t),
                )
                .unwrap();
                let z = tensor_to_vec(out.z);
                let worst = z.iter().zip(&expected).map(|(a, b)| (*a as f64 - b).abs()).fold(0.0, f64::max);
                // Relative to the prior's scale (σ_max = 348 for VE).
                assert!(worst / scale < tolerance, "{sde:?} {solver:?}: error {worst}");
                assert_eq!(times.len(), out.steps);
                assert!((times.last().unwrap() - 1.0).abs() < 1e-12);
                if matches!(solver, OdeSolver::Rk45 { .. }) {
                    // Adaptive: far fewer evaluations than the fixed 400-step Heun.
                    assert!(out.evaluations < 800, "{sde:?}: {} evaluations", out.evaluations);
                }
            }
        }
    }

    #[test]
    fn rk45_tolerance_matters_and_bad_settings_are_refused() {
        let device = Device::flex();
        let sde = Sde::vp();
        let data = GaussianData { mean: -0.2, std: 0.3, sde };
        let x: Vec<f32> = (0..16).map(|i| (i as f32 / 8.0) - 1.0).collect();
        let expected = exact_latent(&data, &x);
        let run = |rtol: f64| {
            let solver = OdeSolver::Rk45 { rtol, atol: rtol, max_evaluations: 10_000 };
            let out = probability_flow_latent(
                &data,
                &sde,
                tensor_from_vec(x.clone(), [1, 1, 4, 4], &device),
                &solver,
                &mut |_| {},
            )
            .unwrap();
            let z = tensor_to_vec(out.z);
            let err = z.iter().zip(&expected).map(|(a, b)| (*a as f64 - b).abs()).fold(0.0, f64::max);
            (err, out.evaluations)
        };
        let (loose_err, loose_evals) = run(1e-2);
        let (tight_err, tight_evals) = run(1e-6);
        assert!(tight_err < loose_err && tight_evals > loose_evals, "{loose_err} {tight_err}");
        let tiny = OdeSolver::Rk45 { rtol: 1e-8, atol: 1e-8, max_evaluations: 10 };
        let err = probability_flow_latent(
            &data,
            &sde,
            tensor_from_vec(x, [1, 1, 4, 4], &device),
            &tiny,
            &mut |_| {},
        )
        .err()
        .unwrap();
        assert!(err.to_string().contains("max_evaluations"), "{err}");
        assert!(OdeSolver::Heun { steps: 0 }.validate().is_err());
    }
}
