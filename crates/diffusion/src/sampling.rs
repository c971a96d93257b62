//! DDIM sampling with η, and DDAD's conditioned reconstruction (`reconstruction.py`).
//!
//! Gaussian noise comes from a caller's seeded ChaCha8 generator (not burn's process-wide one),
//! so a reconstruction is a pure function of its inputs and seed.

use burn::tensor::Tensor;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use vigil_core::{Result, VigilError};
use vigil_nn::tensor_from_vec;

use crate::schedule::NoiseSchedule;
use crate::unet::UNet;

/// Anything that predicts the noise ε in x_t: the U-Net, or a closed form in tests.
pub trait NoisePredictor {
    fn predict_noise(&self, x: Tensor<4>, t: &[f32]) -> Tensor<4>;
}

impl NoisePredictor for UNet {
    fn predict_noise(&self, x: Tensor<4>, t: &[f32]) -> Tensor<4> {
        self.forward(x, t, None)
    }
}

/// `n` standard normal samples (Box-Muller; rand 0.8 has no normal distribution without
/// rand_distr).
pub fn gaussian(rng: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(n + 1);
    while out.len() < n {
        let u1: f64 = 1.0 - rng.gen::<f64>();
        let u2: f64 = rng.gen::<f64>();
        let r = (-2.0 * u1.ln()).sqrt();
        let angle = 2.0 * std::f64::consts::PI * u2;
        out.push((r * angle.cos()) as f32);
        out.push((r * angle.sin()) as f32);
    }
    out.truncate(n);
    out
}

fn gaussian_like(x: &Tensor<4>, rng: &mut ChaCha8Rng) -> Tensor<4> {
    let dims = x.dims();
    tensor_from_vec(gaussian(rng, dims.iter().product()), dims, &x.device())
}

/// The (t, next t) pairs of a DDIM trajectory: `range(0, t_start, skip)` walked backwards, each
/// step going to the previous element, the last to −1 (the clean image). For t_start 250 and
/// skip 25: (225, 200), (200, 175), ..., (0, −1). The reference noises to t_start but starts
/// denoising at t_start − skip; that off-by-one is kept.
pub fn skip_steps(t_start: usize, skip: usize) -> Vec<(i64, i64)> {
    let seq: Vec<i64> = (0..t_start as i64).step_by(skip.max(1)).collect();
    let next: Vec<i64> = std::iter::once(-1).chain(seq.iter().copied()).collect();
    seq.iter().copied().zip(next).rev().collect()
}

/// DDAD's reconstruction settings (`config.yaml`: test_trajectoy_steps 250, skip 25, eta 1, w 2).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReconstructionSettings {
    /// Timestep the input is noised to.
    pub t_start: usize,
    /// Timesteps between DDIM steps.
    pub skip: usize,
    /// DDIM stochasticity: 0 deterministic, 1 DDPM-like.
    pub eta: f64,
    /// Conditioning weight: how strongly each step is pulled toward the target image.
    pub w: f64,
}

impl Default for ReconstructionSettings {
    fn default() -> Self {
        ReconstructionSettings { t_start: 250, skip: 25, eta: 1.0, w: 2.0 }
    }
}

impl ReconstructionSettings {
    pub fn validate(&self, schedule: &NoiseSchedule) -> Result<()> {
        let bad = |m: String| Err(VigilError::Config(format!("reconstruction: {m}")));
        if self.t_start == 0 || self.t_start >= schedule.steps() {
            return bad(format!("t_start {} must be in 1..{}", self.t_start, schedule.steps()));
        }
        if self.skip == 0 || self.skip > self.t_start {
            return bad(format!("skip {} must be in 1..={}", self.skip, self.t_start));
        }
        if !self.eta.is_finite() || self.eta < 0.0 || !self.w.is_finite() {
            return bad(format!("eta {} must be >= 0 and w {} finite", self.eta, self.w));
        }
        Ok(())
    }

    /// The number of network evaluations one reconstruction takes.
    pub fn steps(&self) -> usize {
        skip_steps(self.t_start, self.skip).len()
    }
}

/// One DDIM step from x_t to x_next given the noise estimate ε̂:
/// x̂0 = (x_t − √(1−ᾱ_t) ε̂)/√ᾱ_t, c1 = η √((1 − ᾱ_t/ᾱ_next)(1 − ᾱ_next)/(1 − ᾱ_t)),
/// c2 = √(1 − ᾱ_next − c1²), x_next = √ᾱ_next x̂0 + c1 z + c2 ε̂.
/// Returns x_next; `z` is drawn only when c1 > 0.
pub fn ddim_update(
    x_t: Tensor<4>,
    eps_hat: Tensor<4>,
    alpha_bar: f32,
    alpha_bar_next: f32,
    eta: f64,
    rng: &mut ChaCha8Rng,
) -> Tensor<4> {
    let (a, a_next) = (alpha_bar as f64, alpha_bar_next as f64);
    let x0 = (x_t.clone() - eps_hat.clone().mul_scalar((1.0 - a).sqrt())).div_scalar(a.sqrt());
    let c1 = eta * ((1.0 - a / a_next) * (1.0 - a_next) / (1.0 - a)).max(0.0).sqrt();
    let c2 = ((1.0 - a_next) - c1 * c1).max(0.0).sqrt();
    let mut next = x0.mul_scalar(a_next.sqrt()) + eps_hat.mul_scalar(c2);
    if c1 > 0.0 {
        next = next + gaussian_like(&x_t, rng).mul_scalar(c1);
    }
    next
}

/// A DDIM trajectory: the (t, next t) pairs (from [`skip_steps`]), η, and optionally DDAD's
/// conditioning: a target y0 and weight w.
pub struct DdimPlan<'a> {
    pub steps: Vec<(i64, i64)>,
    pub eta: f64,
    pub guide: Option<(&'a Tensor<4>, f64)>,
}

/// Denoise `x` along `plan`. With a guide (y0, w) each step is DDAD's conditioned step:
/// y_t = √ᾱ_t y0 + √(1−ᾱ_t) ε, ε̂ = ε − √(1−ᾱ_t) w (y_t − x_t); without one, plain DDIM.
/// `on_step(done, total)` is called after each network evaluation.
pub fn ddim_denoise(
    model: &dyn NoisePredictor,
    schedule: &NoiseSchedule,
    mut x: Tensor<4>,
    plan: &DdimPlan,
    rng: &mut ChaCha8Rng,
    on_step: &mut dyn FnMut(usize, usize),
) -> Tensor<4> {
    let n = x.dims()[0];
    for (done, &(t, next)) in plan.steps.iter().enumerate() {
        let (a, a_next) = (schedule.alpha_bar(t), schedule.alpha_bar(next));
        let eps = model.predict_noise(x.clone(), &vec![t as f32; n]);
        let eps_hat = match plan.guide {
            Some((y0, w)) => {
                let sigma = (1.0 - a as f64).sqrt();
                let y_t = y0.clone().mul_scalar((a as f64).sqrt()) + eps.clone().mul_scalar(sigma);
                eps - (y_t - x.clone()).mul_scalar(sigma * w)
            }
            None => eps,
        };
        x = ddim_update(x, eps_hat, a, a_next, plan.eta, rng);
        on_step(done + 1, plan.steps.len());
    }
    x
}

/// DDAD's conditioned reconstruction of `x` toward the target `y0` (DDAD passes the input as
/// both): noise `x` to t_start, then denoise with the skip sequence, each step conditioned on
/// `y0` with weight w. Returns the reconstruction x̂0 (`xs[-1]` in the reference).
pub fn reconstruct(
    model: &dyn NoisePredictor,
    schedule: &NoiseSchedule,
    x: Tensor<4>,
    y0: &Tensor<4>,
    settings: &ReconstructionSettings,
    rng: &mut ChaCha8Rng,
    on_step: &mut dyn FnMut(usize, usize),
) -> Result<Tensor<4>> {
    settings.validate(schedule)?;
    if x.dims() != y0.dims() {
        return Err(VigilError::invalid(format!(
            "reconstruction input {:?} and target {:?} differ in shape",
            x.dims(),
            y0.dims()
        )));
    }
    let a = schedule.alpha_bar(settings.t_start as i64) as f64;
    let noise = gaussian_like(&x, rng);
    let x_t = x.mul_scalar(a.sqrt()) + noise.mul_scalar((1.0 - a).sqrt());
    let plan = DdimPlan {
        steps: skip_steps(settings.t_start, settings.skip),
        eta: settings.eta,
        guide: Some((y0, settings.w)),
    };
    Ok(ddim_denoise(model, schedule, x_t, &plan, rng, on_step))
}

/// Unconditional DDIM sampling: start from pure noise of `shape` at the top of
/// `range(0, T, skip)` and denoise to t = −1.
pub fn sample(
    model: &dyn NoisePredictor,
    schedule: &NoiseSchedule,
    shape: [usize; 4],
    skip: usize,
    eta: f64,
    device: &burn::tensor::Device,
    rng: &mut ChaCha8Rng,
) -> Tensor<4> {
    let x = tensor_from_vec(gaussian(rng, shape.iter().product()), shape, device);
    let plan = DdimPlan { steps: skip_steps(schedule.steps(), skip), eta, guide: None };
    ddim_denoise(model, schedule, x, &plan, rng, &mut |_, _| {})
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Device;
    use rand::SeedableRng;
    use vigil_nn::tensor_to_vec;

    /// The exact noise predictor for data that is always `target`: ε = (x_t − √ᾱ_t target)/√(1−ᾱ_t).
    struct PointMass {
        target: Tensor<4>,
        schedule: NoiseSchedule,
    }

    impl NoisePredictor for PointMass {
        fn predict_noise(&self, x: Tensor<4>, t: &[f32]) -> Tensor<4> {
            let a = self.schedule.alpha_bar(t[0] as i64) as f64;
            (x - self.target.clone().mul_scalar(a.sqrt())).div_scalar((1.0 - a).sqrt())
        }
    }

    fn image(seed: u64, device: &Device) -> Tensor<4> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let values = gaussian(&mut rng, 2 * 3 * 8 * 8).into_iter().map(|v| v.clamp(-1.0, 1.0)).collect();
        tensor_from_vec(values, [2, 3, 8, 8], device)
    }

    fn max_diff(a: Tensor<4>, b: Tensor<4>) -> f32 {
        tensor_to_vec(a).iter().zip(tensor_to_vec(b)).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
    }

    #[test]
    fn ddad_skip_sequence_keeps_the_off_by_one() {
        let steps = skip_steps(250, 25);
        assert_eq!(steps.len(), 10);
        assert_eq!(steps[0], (225, 200));
        assert_eq!(steps[8], (25, 0));
        assert_eq!(steps[9], (0, -1));
        assert_eq!(ReconstructionSettings::default().steps(), 10);
        assert_eq!(skip_steps(10, 3), vec![(9, 6), (6, 3), (3, 0), (0, -1)]);
    }

    #[test]
    fn gaussian_moments() {
        let v = gaussian(&mut ChaCha8Rng::seed_from_u64(1), 20001);
        assert_eq!(v.len(), 20001);
        let mean = v.iter().sum::<f32>() / v.len() as f32;
        let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / v.len() as f32;
        assert!(mean.abs() < 0.03 && (var - 1.0).abs() < 0.03, "{mean} {var}");
    }

    #[test]
    fn deterministic_ddim_recovers_the_only_image_the_model_knows() {
        let device = Device::flex();
        let schedule = NoiseSchedule::ddad();
        let target = image(1, &device);
        let model = PointMass { target: target.clone(), schedule: schedule.clone() };
        let run = |seed: u64| {
            sample(&model, &schedule, [2, 3, 8, 8], 50, 0.0, &device, &mut ChaCha8Rng::seed_from_u64(seed))
        };
        let (a, b) = (run(3), run(3));
        assert_eq!(tensor_to_vec(a.clone()), tensor_to_vec(b));
        // From any noise, the η = 0 trajectory of an exact predictor ends on its image.
        assert!(max_diff(a, target.clone()) < 1e-3);
        assert!(max_diff(run(4), target) < 1e-3);
    }

    #[test]
    fn deterministic_ddim_inverts_the_forward_step() {
        // η = 0 makes each step invertible: going from x_t to x_next and solving the update for
        // x_t with the same ε̂ gives x_t back.
        let device = Device::flex();
        let schedule = NoiseSchedule::ddad();
        let x_t = image(5, &device);
        let eps = image(6, &device);
        let (a, a_next) = (schedule.alpha_bar(500), schedule.alpha_bar(450));
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let next = ddim_update(x_t.clone(), eps.clone(), a, a_next, 0.0, &mut rng);
        let (a, a_next) = (a as f64, a_next as f64);
        // x_next = √ā' (x_t − √(1−ā) ε)/√ā + √(1−ā') ε  ⇒  x_t = √ā (x_next − √(1−ā') ε)/√ā' + √(1−ā) ε.
        let back = (next - eps.clone().mul_scalar((1.0 - a_next).sqrt()))
            .mul_scalar(a.sqrt() / a_next.sqrt())
            + eps.mul_scalar((1.0 - a).sqrt());
        assert!(max_diff(back, x_t) < 1e-5);
    }

    #[test]
    fn conditioning_pulls_the_reconstruction_toward_the_target() {
        let device = Device::flex();
        let schedule = NoiseSchedule::ddad();
        let learned = image(1, &device);
        let input = image(2, &device);
        let model = PointMass { target: learned.clone(), schedule: schedule.clone() };
        let run = |w: f64, eta: f64| {
            let settings = ReconstructionSettings { t_start: 250, skip: 25, eta, w };
            let mut steps = Vec::new();
            let out = reconstruct(
                &model,
                &schedule,
                input.clone(),
                &input,
                &settings,
                &mut ChaCha8Rng::seed_from_u64(9),
                &mut |done, total| steps.push((done, total)),
            )
            .unwrap();
            assert_eq!(steps.last(), Some(&(10, 10)));
            out
        };
        // w = 0: the model's own image; growing w moves the result toward the input.
        let plain = run(0.0, 1.0);
        assert!(max_diff(plain, learned.clone()) < 1e-3);
        // With an exact predictor x_t = √ᾱ_t·learned + √(1−ᾱ_t)·ε, so y_t − x_t = √ᾱ_t (y0 − learned)
        // and the last step (t = 0 → −1) returns x̂0 = learned + (1 − ᾱ_0)·w·(y0 − learned): the
        // sign and size of the conditioning term are visible in the result.
        let w = 8.0;
        let pull = (1.0 - schedule.alpha_bar(0) as f64) * w;
        let expected = learned.clone() + (input.clone() - learned.clone()).mul_scalar(pull);
        let conditioned = run(w, 1.0);
        assert!(max_diff(conditioned.clone(), expected) < 1e-5);
        assert!(max_diff(conditioned, learned.clone()) > 1e-4);
        // Same seed, same result, with η = 1 too.
        assert_eq!(tensor_to_vec(run(2.0, 1.0)), tensor_to_vec(run(2.0, 1.0)));
        let bad = ReconstructionSettings { t_start: 1000, ..Default::default() };
        let err = reconstruct(
            &model,
            &schedule,
            input.clone(),
            &input,
            &bad,
            &mut ChaCha8Rng::seed_from_u64(0),
            &mut |_, _| {},
        )
        .unwrap_err();
        assert!(err.to_string().contains("t_start 1000"), "{err}");
    }
}
