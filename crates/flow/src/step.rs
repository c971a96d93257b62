//! The FrEIA `AllInOneBlock`-style flow step (`permute_soft=False`) on burn, with its inverse and
//! exact log-determinant.

use burn::module::{Module, Param};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::PaddingConfig2d;
use burn::tensor::activation::{relu, softplus};
use burn::tensor::{Device, Int, Tensor, TensorData};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use vigil_core::{Result, TensorBag, VigilError};

/// Soft clamp of the coupling's log-scale: s = CLAMP·tanh(0.1·a) bounds each step's scaling to
/// e^±2 so training cannot blow up (FrEIA `affine_clamping = 2.0`).
const AFFINE_CLAMP: f32 = 2.0;
/// FrEIA scales the subnet output by 0.1 so a fresh block starts near the identity.
const SUBNET_OUTPUT_SCALE: f32 = 0.1;
/// Global scale g = 0.1·softplus_β(γ) with β = 0.5 (FrEIA's SOFTPLUS global affine).
const GLOBAL_SCALE_BETA: f64 = 0.5;

/// The subnet kernel of step `index` along a sequence of steps: 3×3 for even steps, 1×1 for odd
/// ones (U-Flow's stages, FastFlow's `conv3x3_only=False`).
pub fn alternating_kernel(index: usize) -> usize {
    if index.is_multiple_of(2) {
        3
    } else {
        1
    }
}

/// One flow step (FrEIA `AllInOneBlock`, `permute_soft=False`): affine coupling of the second
/// channel half conditioned on the first, global affine, then a fixed channel permutation. The
/// subnet is conv(k) → ReLU → conv(k) with as many hidden channels as conditioning channels
/// (hidden ratio 1) and "same" padding.
#[derive(Module, Debug)]
pub struct FlowStep {
    subnet_in: Conv2d,
    subnet_out: Conv2d,
    /// γ of the global scale g = 0.1·softplus_{0.5}(γ); initialised so g = 1.
    global_scale: Param<Tensor<1>>,
    global_offset: Param<Tensor<1>>,
    /// Output channel i takes input channel `permutation[i]`.
    #[module(skip)]
    permutation: Vec<usize>,
    #[module(skip)]
    channels: usize,
    #[module(skip)]
    kernel: usize,
}

fn conv(rng: &mut ChaCha8Rng, c_in: usize, c_out: usize, kernel: usize, device: &Device) -> Conv2d {
    // PyTorch's default Conv2d init: U(−1/√fan_in, 1/√fan_in) for weight and bias.
    let bound = 1.0 / ((c_in * kernel * kernel) as f32).sqrt();
    let weight: Vec<f32> =
        (0..c_out * c_in * kernel * kernel).map(|_| rng.gen_range(-bound..bound)).collect();
    let bias: Vec<f32> = (0..c_out).map(|_| rng.gen_range(-bound..bound)).collect();
    conv_from(&weight, &bias, c_in, c_out, kernel, device)
}

fn conv_from(
    weight: &[f32],
    bias: &[f32],
    c_in: usize,
    c_out: usize,
    kernel: usize,
    device: &Device,
) -> Conv2d {
    let mut module =
        Conv2dConfig::new([c_in, c_out], [kernel, kernel]).with_padding(PaddingConfig2d::Same).init(device);
    module.weight = Param::from_tensor(Tensor::from_data(
        TensorData::new(weight.to_vec(), [c_out, c_in, kernel, kernel]),
        device,
    ));
    module.bias =
        Some(Param::from_tensor(Tensor::from_data(TensorData::new(bias.to_vec(), [c_out]), device)));
    module
}

fn to_vec<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_into_vec::<f32>().expect("f32 tensor")
}

fn vector_param(data: Vec<f32>, device: &Device) -> Param<Tensor<1>> {
    let n = data.len();
    Param::from_tensor(Tensor::from_data(TensorData::new(data, [n]), device))
}

impl FlowStep {
    /// The halves: the first ⌈C/2⌉ channels condition the last ⌊C/2⌋.
    fn halves(&self) -> (usize, usize) {
        (self.channels - self.channels / 2, self.channels / 2)
    }

    /// A fresh step on `channels` channels with subnet kernel `kernel`. Draws from `rng`, in this
    /// order: the first convolution's weight then bias, the second's weight then bias, then the
    /// permutation (a shuffle of 0..channels).
    pub fn new(channels: usize, kernel: usize, rng: &mut ChaCha8Rng, device: &Device) -> Result<Self> {
        if channels < 2 {
            return Err(VigilError::invalid(format!("flow step needs at least 2 channels, got {channels}")));
        }
        let (c1, c2) = (channels - channels / 2, channels / 2);
        let subnet_in = conv(rng, c1, c1, kernel, device);
        let subnet_out = conv(rng, c1, 2 * c2, kernel, device);
        let mut permutation: Vec<usize> = (0..channels).collect();
        permutation.shuffle(rng);
        // softplus_{0.5}(γ) = 2 ln(1 + e^{γ/2}) = 10 ⇔ γ = 2 ln(e^5 − 1).
        let gamma = 2.0 * (5f32.exp() - 1.0).ln();
        Ok(FlowStep {
            subnet_in,
            subnet_out,
            global_scale: vector_param(vec![gamma; channels], device),
            global_offset: Param::from_tensor(Tensor::zeros([channels], device)),
            permutation,
            channels,
            kernel,
        })
    }

    /// A step far from the identity, for tests of flows built from steps: a fresh step from
    /// `seed` whose second convolution is scaled by 20 and whose global scales and offsets are
    /// drawn at random.
    pub fn perturbed(channels: usize, kernel: usize, seed: u64, device: &Device) -> Result<Self> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut step = FlowStep::new(channels, kernel, &mut rng, device)?;
        step.subnet_out.weight = Param::from_tensor(step.subnet_out.weight.val().mul_scalar(20.0));
        step.global_scale = vector_param((0..channels).map(|_| rng.gen_range(-2.0..8.0)).collect(), device);
        step.global_offset = vector_param((0..channels).map(|_| rng.gen_range(-1.0..1.0)).collect(), device);
        Ok(step)
    }

    pub fn channels(&self) -> usize {
        self.channels
    }

    pub fn kernel(&self) -> usize {
        self.kernel
    }

    fn subnet(&self, x1: Tensor<4>) -> (Tensor<4>, Tensor<4>) {
        let c2 = self.channels / 2;
        let a = self.subnet_out.forward(relu(self.subnet_in.forward(x1))).mul_scalar(SUBNET_OUTPUT_SCALE);
        let log_scale = a.clone().narrow(1, 0, c2).tanh().mul_scalar(AFFINE_CLAMP);
        (log_scale, a.narrow(1, c2, c2))
    }

    fn global_scale(&self) -> Tensor<1> {
        softplus(self.global_scale.val(), GLOBAL_SCALE_BETA).mul_scalar(0.1)
    }

    fn index(&self, indices: &[usize], device: &Device) -> Tensor<1, Int> {
        let data: Vec<i64> = indices.iter().map(|&i| i as i64).collect();
        Tensor::from_data(TensorData::new(data, [indices.len()]), device)
    }

    /// y = f(x) and log|det ∂f/∂x| per sample, for x of shape [B, C, H, W].
    pub fn forward(&self, x: Tensor<4>) -> (Tensor<4>, Tensor<1>) {
        self.forward_weighted(x, None)
    }

    /// [`FlowStep::forward`] whose log-determinant sums each position's share (its coupling
    /// log-scales and the global log-scales) times `weight` ([B, 1, H, W]); with no weight, every
    /// position counts once.
    pub fn forward_weighted(&self, x: Tensor<4>, weight: Option<&Tensor<4>>) -> (Tensor<4>, Tensor<1>) {
        let [batch, channels, height, width] = x.dims();
        let (c1, c2) = self.halves();
        let x1 = x.clone().narrow(1, 0, c1);
        let (log_scale, shift) = self.subnet(x1.clone());
        let y2 = x.narrow(1, c1, c2).mul(log_scale.clone().exp()).add(shift);
        let scale = self.global_scale();
        let y = Tensor::cat(vec![x1, y2], 1)
            .mul(scale.clone().reshape([1, channels, 1, 1]))
            .add(self.global_offset.val().reshape([1, channels, 1, 1]));
        let device = y.device();
        let y = y.select(1, self.index(&self.permutation, &device));
        let log_det = match weight {
            None => log_scale
                .reshape([batch, c2 * height * width])
                .sum_dim(1)
                .reshape([batch])
                .add(scale.log().sum().mul_scalar((height * width) as f32)),
            Some(weight) => log_scale
                .sum_dim(1)
                .add(scale.log().sum().reshape([1, 1, 1, 1]))
                .mul(weight.clone())
                .reshape([batch, height * width])
                .sum_dim(1)
                .reshape([batch]),
        };
        (y, log_det)
    }

    /// x = f⁻¹(y).
    pub fn inverse(&self, y: Tensor<4>) -> Tensor<4> {
        let channels = self.channels;
        let (c1, c2) = self.halves();
        let mut inverse_permutation = vec![0; channels];
        for (i, &p) in self.permutation.iter().enumerate() {
            inverse_permutation[p] = i;
        }
        let device = y.device();
        let u = y
            .select(1, self.index(&inverse_permutation, &device))
            .sub(self.global_offset.val().reshape([1, channels, 1, 1]))
            .div(self.global_scale().reshape([1, channels, 1, 1]));
        let x1 = u.clone().narrow(1, 0, c1);
        let (log_scale, shift) = self.subnet(x1.clone());
        let x2 = u.narrow(1, c1, c2).sub(shift).mul(log_scale.neg().exp());
        Tensor::cat(vec![x1, x2], 1)
    }

    /// The learned state under `{prefix}.subnet_in.{weight,bias}`, `{prefix}.subnet_out.…`,
    /// `{prefix}.global_scale` (γ), `{prefix}.global_offset` and `{prefix}.permutation` (i64).
    pub fn save(&self, bag: &mut TensorBag, prefix: &str) {
        let (c1, c2) = self.halves();
        let k = self.kernel;
        let put_conv = |bag: &mut TensorBag, name: &str, conv: &Conv2d, c_in: usize, c_out: usize| {
            bag.put_f32(&format!("{prefix}.{name}.weight"), &[c_out, c_in, k, k], to_vec(conv.weight.val()));
            let bias = conv.bias.as_ref().expect("subnet convolutions have a bias").val();
            bag.put_f32(&format!("{prefix}.{name}.bias"), &[c_out], to_vec(bias));
        };
        put_conv(bag, "subnet_in", &self.subnet_in, c1, c1);
        put_conv(bag, "subnet_out", &self.subnet_out, c1, 2 * c2);
        bag.put_f32(&format!("{prefix}.global_scale"), &[self.channels], to_vec(self.global_scale.val()));
        bag.put_f32(&format!("{prefix}.global_offset"), &[self.channels], to_vec(self.global_offset.val()));
        let permutation = self.permutation.iter().map(|&p| p as i64).collect();
        bag.put_i64(&format!("{prefix}.permutation"), &[self.channels], permutation);
    }

    /// The step [`FlowStep::save`] wrote under `prefix`; an error names the tensor that is
    /// missing, has the wrong shape or is not a permutation.
    pub fn load(
        bag: &TensorBag,
        prefix: &str,
        channels: usize,
        kernel: usize,
        device: &Device,
    ) -> Result<Self> {
        let (c1, c2) = (channels - channels / 2, channels / 2);
        let k = kernel;
        let load_conv = |name: &str, c_in: usize, c_out: usize| -> Result<Conv2d> {
            let weight = bag.f32(&format!("{prefix}.{name}.weight"), Some(&[c_out, c_in, k, k]))?;
            let bias = bag.f32(&format!("{prefix}.{name}.bias"), Some(&[c_out]))?;
            Ok(conv_from(&weight, &bias, c_in, c_out, k, device))
        };
        let vector = |name: &str| -> Result<Param<Tensor<1>>> {
            Ok(vector_param(bag.f32(&format!("{prefix}.{name}"), Some(&[channels]))?, device))
        };
        let permutation: Vec<usize> = bag
            .i64(&format!("{prefix}.permutation"))?
            .into_iter()
            .map(|p| usize::try_from(p).unwrap_or(usize::MAX))
            .collect();
        let mut seen = vec![false; channels];
        let valid = permutation.len() == channels
            && permutation.iter().all(|&p| p < channels && !std::mem::replace(&mut seen[p], true));
        if !valid {
            return Err(VigilError::Model(format!(
                "{prefix}.permutation is not a permutation of {channels}"
            )));
        }
        Ok(FlowStep {
            subnet_in: load_conv("subnet_in", c1, c1)?,
            subnet_out: load_conv("subnet_out", c1, 2 * c2)?,
            global_scale: vector("global_scale")?,
            global_offset: vector("global_offset")?,
            permutation,
            channels,
            kernel,
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::testing::numerical_log_det;

    pub fn device() -> Device {
        Device::flex()
    }

    pub fn random(shape: [usize; 4], seed: u64) -> Tensor<4> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let n = shape.iter().product();
        let data: Vec<f32> = (0..n).map(|_| rng.gen_range(-1.5..1.5)).collect();
        Tensor::from_data(TensorData::new(data, shape), &device())
    }

    pub fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
        to_vec(t)
    }

    fn max_abs_diff(a: Tensor<4>, b: Tensor<4>) -> f32 {
        to_vec(a).iter().zip(to_vec(b)).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
    }

    #[test]
    fn fresh_step_starts_with_unit_global_scale() {
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let step = FlowStep::new(4, 1, &mut rng, &device()).unwrap();
        for g in to_vec(step.global_scale()) {
            assert!((g - 1.0).abs() < 1e-5);
        }
        assert!(FlowStep::new(1, 3, &mut rng, &device()).is_err());
    }

    #[test]
    fn kernels_alternate_three_and_one() {
        let kernels: Vec<usize> = (0..8).map(alternating_kernel).collect();
        assert_eq!(kernels, vec![3, 1, 3, 1, 3, 1, 3, 1]);
    }

    #[test]
    fn step_inverse_undoes_forward() {
        for (channels, kernel) in [(5, 3), (6, 1)] {
            let step = FlowStep::perturbed(channels, kernel, 7, &device()).unwrap();
            let x = random([2, channels, 4, 3], 1);
            let (y, _) = step.forward(x.clone());
            assert!(max_abs_diff(x.clone(), y.clone()) > 0.1, "the step must not be the identity");
            assert!(max_abs_diff(step.inverse(y), x) < 1e-4);
        }
    }

    #[test]
    fn step_log_det_matches_numerical_jacobian() {
        for kernel in [3, 1] {
            let step = FlowStep::perturbed(2, kernel, 11, &device()).unwrap();
            let shape = [1, 2, 2, 2];
            let x = to_vec(random(shape, 5));
            let (_, log_det) = step.forward(Tensor::from_data(TensorData::new(x.clone(), shape), &device()));
            let exact = to_vec(log_det)[0] as f64;
            let numeric = numerical_log_det(|t| to_vec(step.forward(t).0), &x, shape);
            assert!(exact.abs() > 0.5, "log-det {exact} too small to test anything");
            assert!((exact - numeric).abs() < 2e-2, "kernel {kernel}: exact {exact} vs numeric {numeric}");
        }
    }

    #[test]
    fn sequence_of_alternating_steps_inverts_and_its_log_det_matches_numerical_jacobian() {
        // FastFlow's per-scale flow: steps with kernels 3, 1, 3, 1 on 3 channels at 2×2.
        let steps: Vec<FlowStep> = (0..4)
            .map(|s| FlowStep::perturbed(3, alternating_kernel(s), 40 + s as u64, &device()).unwrap())
            .collect();
        let forward = |x: Tensor<4>| {
            let [batch, ..] = x.dims();
            steps.iter().fold((x, Tensor::<1>::zeros([batch], &device())), |(x, ld), step| {
                let (y, step_ld) = step.forward(x);
                (y, ld.add(step_ld))
            })
        };
        let shape = [1, 3, 2, 2];
        let x = random(shape, 9);
        let (z, log_det) = forward(x.clone());
        let back = steps.iter().rev().fold(z, |y, step| step.inverse(y));
        assert!(max_abs_diff(back, x.clone()) < 1e-4);
        let numeric = numerical_log_det(|t| to_vec(forward(t).0), &to_vec(x), shape);
        let exact = to_vec(log_det)[0] as f64;
        assert!(exact.abs() > 0.5, "log-det {exact} too small to test anything");
        assert!((exact - numeric).abs() < 5e-2, "exact {exact} vs numeric {numeric}");
    }

    #[test]
    fn weighted_log_det_splits_by_position() {
        let step = FlowStep::perturbed(4, 3, 3, &device()).unwrap();
        let x = random([1, 4, 2, 2], 2);
        let weight =
            |w: [f32; 4]| Tensor::<4>::from_data(TensorData::new(w.to_vec(), [1, 1, 2, 2]), &device());
        let log_det = |w: Option<&Tensor<4>>| to_vec(step.forward_weighted(x.clone(), w).1)[0];
        let plain = log_det(None);
        let ones = log_det(Some(&weight([1.0; 4])));
        let a = log_det(Some(&weight([1.0, 0.0, 0.0, 1.0])));
        let b = log_det(Some(&weight([0.0, 1.0, 1.0, 0.0])));
        assert!((plain - ones).abs() < 1e-4 * plain.abs().max(1.0), "{plain} vs {ones}");
        assert!((a + b - plain).abs() < 1e-4 * plain.abs().max(1.0), "{a} + {b} vs {plain}");
        assert!(a.abs() > 1e-3 && b.abs() > 1e-3);
    }

    #[test]
    fn state_round_trip_gives_the_same_step() {
        let step = FlowStep::perturbed(5, 3, 8, &device()).unwrap();
        let mut bag = TensorBag::new();
        step.save(&mut bag, "s");
        let loaded = FlowStep::load(&bag, "s", 5, 3, &device()).unwrap();
        let x = random([2, 5, 3, 3], 4);
        let (a, la) = step.forward(x.clone());
        let (b, lb) = loaded.forward(x);
        assert_eq!(max_abs_diff(a, b), 0.0);
        assert_eq!(to_vec(la), to_vec(lb));
        assert!(FlowStep::load(&bag, "s", 5, 1, &device()).is_err(), "kernel mismatch must be refused");
        let mut broken = bag.clone();
        broken.put_i64("s.permutation", &[5], vec![0, 0, 1, 2, 3]);
        let error = FlowStep::load(&broken, "s", 5, 3, &device()).unwrap_err().to_string();
        assert!(error.contains("s.permutation"), "{error}");
    }
}
