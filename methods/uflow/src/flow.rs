//! The invertible pieces of U-Flow on burn: the AllInOneBlock-style flow step, the i-RevNet
//! up-sampling and the U-shaped graph over scales, each with its inverse and exact log-determinant.

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

/// One flow step (FrEIA `AllInOneBlock`, `permute_soft=False`): affine coupling of the second
/// channel half conditioned on the first, global affine, then a fixed channel permutation.
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

fn conv(
    rng: &mut ChaCha8Rng,
    c_in: usize,
    c_out: usize,
    kernel: usize,
    device: &Device,
) -> (Vec<f32>, Vec<f32>, Conv2d) {
    // PyTorch's default Conv2d init: U(−1/√fan_in, 1/√fan_in) for weight and bias.
    let bound = 1.0 / ((c_in * kernel * kernel) as f32).sqrt();
    let weight: Vec<f32> =
        (0..c_out * c_in * kernel * kernel).map(|_| rng.gen_range(-bound..bound)).collect();
    let bias: Vec<f32> = (0..c_out).map(|_| rng.gen_range(-bound..bound)).collect();
    let module = conv_from(&weight, &bias, c_in, c_out, kernel, device);
    (weight, bias, module)
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

fn to_vec(t: Tensor<1>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_into_vec::<f32>().expect("f32 tensor")
}

fn tensor_vec<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_into_vec::<f32>().expect("f32 tensor")
}

impl FlowStep {
    /// The halves: the first ⌈C/2⌉ channels condition the last ⌊C/2⌋.
    fn halves(&self) -> (usize, usize) {
        (self.channels - self.channels / 2, self.channels / 2)
    }

    pub fn new(channels: usize, kernel: usize, rng: &mut ChaCha8Rng, device: &Device) -> Result<Self> {
        if channels < 2 {
            return Err(VigilError::invalid(format!("flow step needs at least 2 channels, got {channels}")));
        }
        let (c1, c2) = (channels - channels / 2, channels / 2);
        let (_, _, subnet_in) = conv(rng, c1, c1, kernel, device);
        let (_, _, subnet_out) = conv(rng, c1, 2 * c2, kernel, device);
        let mut permutation: Vec<usize> = (0..channels).collect();
        permutation.shuffle(rng);
        // softplus_{0.5}(γ) = 2 ln(1 + e^{γ/2}) = 10 ⇔ γ = 2 ln(e^5 − 1).
        let gamma = 2.0 * (5f32.exp() - 1.0).ln();
        Ok(FlowStep {
            subnet_in,
            subnet_out,
            global_scale: Param::from_tensor(Tensor::from_data(
                TensorData::new(vec![gamma; channels], [channels]),
                device,
            )),
            global_offset: Param::from_tensor(Tensor::zeros([channels], device)),
            permutation,
            channels,
            kernel,
        })
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

    fn save(&self, bag: &mut TensorBag, prefix: &str) {
        let (c1, c2) = self.halves();
        let k = self.kernel;
        let put_conv = |bag: &mut TensorBag, name: &str, conv: &Conv2d, c_in: usize, c_out: usize| {
            bag.put_f32(
                &format!("{prefix}.{name}.weight"),
                &[c_out, c_in, k, k],
                tensor_vec(conv.weight.val()),
            );
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

    fn load(bag: &TensorBag, prefix: &str, channels: usize, kernel: usize, device: &Device) -> Result<Self> {
        let (c1, c2) = (channels - channels / 2, channels / 2);
        let k = kernel;
        let load_conv = |name: &str, c_in: usize, c_out: usize| -> Result<Conv2d> {
            let weight = bag.f32(&format!("{prefix}.{name}.weight"), Some(&[c_out, c_in, k, k]))?;
            let bias = bag.f32(&format!("{prefix}.{name}.bias"), Some(&[c_out]))?;
            Ok(conv_from(&weight, &bias, c_in, c_out, k, device))
        };
        let vector = |name: &str| -> Result<Param<Tensor<1>>> {
            let data = bag.f32(&format!("{prefix}.{name}"), Some(&[channels]))?;
            Ok(Param::from_tensor(Tensor::from_data(TensorData::new(data, [channels]), device)))
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

/// i-RevNet invertible up-sampling (pixel shuffle by 2): input channel 4c + 2i + j goes to output
/// channel c at offset (i, j) of each 2×2 block. Volume-preserving, log-det 0.
pub fn upsample(x: Tensor<4>) -> Tensor<4> {
    let [b, c, h, w] = x.dims();
    x.reshape([b, c / 4, 2, 2, h, w]).permute([0, 1, 4, 2, 5, 3]).reshape([b, c / 4, 2 * h, 2 * w])
}

/// Inverse of [`upsample`].
pub fn downsample(x: Tensor<4>) -> Tensor<4> {
    let [b, c, h, w] = x.dims();
    x.reshape([b, c, h / 2, 2, w / 2, 2]).permute([0, 1, 3, 5, 2, 4]).reshape([b, 4 * c, h / 2, w / 2])
}

/// The shape of a U-Flow: input feature channels per scale, finest first, and steps per stage.
#[derive(Clone, Debug, PartialEq)]
pub struct UFlowShape {
    pub feature_channels: Vec<usize>,
    pub steps_per_stage: usize,
}

impl UFlowShape {
    /// Channels entering each scale's stage (features plus what the coarser stage sends up).
    pub fn stage_channels(&self) -> Vec<usize> {
        let levels = self.feature_channels.len();
        let mut stage = vec![0; levels];
        let mut carried = 0;
        for l in (0..levels).rev() {
            stage[l] = self.feature_channels[l] + carried;
            carried = split_up_channels(stage[l]) / 4;
        }
        stage
    }

    /// Channels of each scale's latent z, finest first.
    pub fn latent_channels(&self) -> Vec<usize> {
        self.stage_channels()
            .iter()
            .enumerate()
            .map(|(l, &c)| if l == 0 { c } else { c - split_up_channels(c) })
            .collect()
    }

    fn validate(&self) -> Result<()> {
        if self.feature_channels.is_empty() || self.steps_per_stage == 0 {
            return Err(VigilError::Config("U-Flow needs at least one scale and one flow step".into()));
        }
        for (l, &c) in self.stage_channels().iter().enumerate() {
            if c < 2 || (l > 0 && split_up_channels(c) == 0) {
                return Err(VigilError::Config(format!(
                    "U-Flow scale {l} has {c} channels; coarser scales need at least 8 to split and up-sample"
                )));
            }
        }
        Ok(())
    }
}

/// FrEIA `Split(C//8·4, rest)`: the part sent up is a multiple of 4 so it can be pixel-shuffled.
fn split_up_channels(channels: usize) -> usize {
    channels / 8 * 4
}

/// The U-shaped flow: one stage of steps per scale, processed coarse to fine; each coarser stage
/// sends half its output up (i-RevNet) to be concatenated with the next finer scale's features.
#[derive(Module, Debug)]
pub struct UFlow {
    /// Stage per scale, finest first.
    stages: Vec<Vec<FlowStep>>,
    #[module(skip)]
    feature_channels: Vec<usize>,
}

impl UFlow {
    pub fn new(shape: &UFlowShape, seed: u64, device: &Device) -> Result<Self> {
        shape.validate()?;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let stages = shape
            .stage_channels()
            .iter()
            .map(|&c| {
                // Kernels alternate 3×3, 1×1 along each stage.
                (0..shape.steps_per_stage)
                    .map(|s| FlowStep::new(c, if s % 2 == 0 { 3 } else { 1 }, &mut rng, device))
                    .collect::<Result<Vec<_>>>()
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(UFlow { stages, feature_channels: shape.feature_channels.clone() })
    }

    pub fn shape(&self) -> UFlowShape {
        UFlowShape { feature_channels: self.feature_channels.clone(), steps_per_stage: self.stages[0].len() }
    }

    /// Latents z (finest first) and log|det J| per sample, for features given finest first with
    /// each scale exactly half the height and width of the previous one.
    pub fn forward(&self, features: Vec<Tensor<4>>) -> (Vec<Tensor<4>>, Tensor<1>) {
        self.forward_weighted(features, None)
    }

    /// [`UFlow::forward`] with per-position weights for the log-determinant, one [B, 1, H, W]
    /// tensor per scale (finest first): a stage's steps run at its scale's resolution.
    pub fn forward_weighted(
        &self,
        features: Vec<Tensor<4>>,
        weights: Option<&[Tensor<4>]>,
    ) -> (Vec<Tensor<4>>, Tensor<1>) {
        let levels = self.stages.len();
        let batch = features[0].dims()[0];
        let device = features[0].device();
        let mut log_det = Tensor::<1>::zeros([batch], &device);
        let mut latents: Vec<Option<Tensor<4>>> = vec![None; levels];
        let mut carried: Option<Tensor<4>> = None;
        for (l, feature) in features.into_iter().enumerate().rev() {
            let mut x = match carried.take() {
                Some(up) => Tensor::cat(vec![feature, up], 1),
                None => feature,
            };
            for step in &self.stages[l] {
                let (y, ld) = step.forward_weighted(x, weights.map(|w| &w[l]));
                x = y;
                log_det = log_det.add(ld);
            }
            if l == 0 {
                latents[0] = Some(x);
            } else {
                let channels = x.dims()[1];
                let up = split_up_channels(channels);
                carried = Some(upsample(x.clone().narrow(1, 0, up)));
                latents[l] = Some(x.narrow(1, up, channels - up));
            }
        }
        (latents.into_iter().map(|z| z.expect("every scale has a latent")).collect(), log_det)
    }

    /// Features (finest first) from latents: the exact inverse of [`UFlow::forward`].
    pub fn inverse(&self, latents: Vec<Tensor<4>>) -> Vec<Tensor<4>> {
        let mut features = Vec::with_capacity(latents.len());
        let mut from_finer: Option<Tensor<4>> = None;
        for (l, z) in latents.into_iter().enumerate() {
            let mut x = match from_finer.take() {
                Some(up) => Tensor::cat(vec![downsample(up), z], 1),
                None => z,
            };
            for step in self.stages[l].iter().rev() {
                x = step.inverse(x);
            }
            let channels = x.dims()[1];
            let own = self.feature_channels[l];
            if channels > own {
                from_finer = Some(x.clone().narrow(1, own, channels - own));
            }
            features.push(x.narrow(1, 0, own));
        }
        features
    }

    /// The learned state under stable names (`stage{l}.step{s}.…`).
    pub fn save(&self, bag: &mut TensorBag) {
        for (l, stage) in self.stages.iter().enumerate() {
            for (s, step) in stage.iter().enumerate() {
                step.save(bag, &format!("flow.stage{l}.step{s}"));
            }
        }
    }

    pub fn load(shape: &UFlowShape, bag: &TensorBag, device: &Device) -> Result<Self> {
        shape.validate()?;
        let stages = shape
            .stage_channels()
            .iter()
            .enumerate()
            .map(|(l, &c)| {
                (0..shape.steps_per_stage)
                    .map(|s| {
                        let kernel = if s % 2 == 0 { 3 } else { 1 };
                        FlowStep::load(bag, &format!("flow.stage{l}.step{s}"), c, kernel, device)
                    })
                    .collect::<Result<Vec<_>>>()
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(UFlow { stages, feature_channels: shape.feature_channels.clone() })
    }
}

/// Negative log-likelihood per batch, constant dropped: mean_b [Σ_l ½‖z_l‖² − log|det J|] (the
/// official code's loss). With `weights` (one [B, 1, H, W] per scale, as given to
/// [`UFlow::forward_weighted`]), each position's ½‖z‖² counts times its weight; `z_weight`
/// multiplies the whole z term (1 in the official loss).
pub fn nll_loss(
    latents: &[Tensor<4>],
    log_det: Tensor<1>,
    weights: Option<&[Tensor<4>]>,
    z_weight: f32,
) -> Tensor<1> {
    let batch = log_det.dims()[0];
    let mut per_sample = log_det.neg();
    for (l, z) in latents.iter().enumerate() {
        let [_, c, h, w] = z.dims();
        let squares = match weights {
            None => z.clone().square().reshape([batch, c * h * w]),
            Some(weights) => z.clone().square().sum_dim(1).mul(weights[l].clone()).reshape([batch, h * w]),
        };
        per_sample = per_sample.add(squares.sum_dim(1).reshape([batch]).mul_scalar(0.5 * z_weight));
    }
    per_sample.mean()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device() -> Device {
        Device::flex()
    }

    fn random(shape: [usize; 4], seed: u64) -> Tensor<4> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let n = shape.iter().product();
        let data: Vec<f32> = (0..n).map(|_| rng.gen_range(-1.5..1.5)).collect();
        Tensor::from_data(TensorData::new(data, shape), &device())
    }

    fn max_abs_diff(a: Tensor<4>, b: Tensor<4>) -> f32 {
        tensor_vec(a).iter().zip(tensor_vec(b)).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
    }

    /// A step whose coupling is far from the identity, so the tests see a real transform.
    fn perturbed_step(channels: usize, kernel: usize, seed: u64) -> FlowStep {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut step = FlowStep::new(channels, kernel, &mut rng, &device()).unwrap();
        step.subnet_out.weight = Param::from_tensor(step.subnet_out.weight.val().mul_scalar(20.0));
        let gamma: Vec<f32> = (0..channels).map(|_| rng.gen_range(-2.0..8.0)).collect();
        step.global_scale =
            Param::from_tensor(Tensor::from_data(TensorData::new(gamma, [channels]), &device()));
        let offset: Vec<f32> = (0..channels).map(|_| rng.gen_range(-1.0..1.0)).collect();
        step.global_offset =
            Param::from_tensor(Tensor::from_data(TensorData::new(offset, [channels]), &device()));
        step
    }

    #[test]
    fn fresh_step_starts_with_unit_global_scale() {
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let step = FlowStep::new(4, 1, &mut rng, &device()).unwrap();
        for g in to_vec(step.global_scale()) {
            assert!((g - 1.0).abs() < 1e-5);
        }
    }

    #[test]
    fn step_inverse_undoes_forward() {
        for (channels, kernel) in [(5, 3), (6, 1)] {
            let step = perturbed_step(channels, kernel, 7);
            let x = random([2, channels, 4, 3], 1);
            let (y, _) = step.forward(x.clone());
            assert!(max_abs_diff(x.clone(), y.clone()) > 0.1, "the step must not be the identity");
            assert!(max_abs_diff(step.inverse(y), x) < 1e-4);
        }
    }

    #[test]
    fn upsample_is_pixel_shuffle_and_inverts() {
        // One output channel from 4 input channels of a 1×1 map: a 2×2 block in channel order.
        let x = Tensor::<4>::from_data(TensorData::new(vec![1f32, 2.0, 3.0, 4.0], [1, 4, 1, 1]), &device());
        assert_eq!(tensor_vec(upsample(x)), vec![1.0, 2.0, 3.0, 4.0]);
        let x = random([2, 8, 3, 2], 3);
        let up = upsample(x.clone());
        assert_eq!(up.dims(), [2, 2, 6, 4]);
        assert_eq!(max_abs_diff(downsample(up), x), 0.0);
    }

    /// log|det| of the Jacobian of `f` at `x` by central differences, through an LU in f64.
    fn numerical_log_det(f: impl Fn(Tensor<4>) -> Vec<f32>, x: &[f32], shape: [usize; 4]) -> f64 {
        let n = x.len();
        let eps = 1e-2f32;
        let mut jac = vec![vec![0f64; n]; n];
        for j in 0..n {
            let eval = |delta: f32| {
                let mut xp = x.to_vec();
                xp[j] += delta;
                f(Tensor::from_data(TensorData::new(xp, shape), &device()))
            };
            let (plus, minus) = (eval(eps), eval(-eps));
            assert_eq!(plus.len(), n, "the transform must preserve dimension");
            for i in 0..n {
                jac[i][j] = (plus[i] as f64 - minus[i] as f64) / (2.0 * eps as f64);
            }
        }
        let mut log_det = 0.0;
        for col in 0..n {
            let pivot = (col..n).max_by(|&a, &b| jac[a][col].abs().total_cmp(&jac[b][col].abs())).unwrap();
            jac.swap(col, pivot);
            let p = jac[col][col];
            assert!(p.abs() > 1e-9, "singular Jacobian");
            log_det += p.abs().ln();
            let (done, rest) = jac.split_at_mut(col + 1);
            let pivot_row = &done[col];
            for row in rest.iter_mut() {
                let factor = row[col] / p;
                for (v, pv) in row[col..].iter_mut().zip(&pivot_row[col..]) {
                    *v -= factor * pv;
                }
            }
        }
        log_det
    }

    #[test]
    fn step_log_det_matches_numerical_jacobian() {
        for kernel in [3, 1] {
            let step = perturbed_step(2, kernel, 11);
            let shape = [1, 2, 2, 2];
            let x = tensor_vec(random(shape, 5));
            let (_, log_det) = step.forward(Tensor::from_data(TensorData::new(x.clone(), shape), &device()));
            let exact = to_vec(log_det)[0] as f64;
            let numeric = numerical_log_det(|t| tensor_vec(step.forward(t).0), &x, shape);
            assert!(exact.abs() > 0.5, "log-det {exact} too small to test anything");
            assert!((exact - numeric).abs() < 2e-2, "kernel {kernel}: exact {exact} vs numeric {numeric}");
        }
    }

    fn tiny_uflow() -> UFlow {
        // Fine scale 2 channels at 2×2, coarse 8 channels at 1×1: 16 dimensions in and out.
        let shape = UFlowShape { feature_channels: vec![2, 8], steps_per_stage: 2 };
        let mut flow = UFlow::new(&shape, 3, &device()).unwrap();
        for (l, stage) in flow.stages.iter_mut().enumerate() {
            for (s, step) in stage.iter_mut().enumerate() {
                let c = step.channels;
                *step = perturbed_step(c, step.kernel, (10 * l + s) as u64);
            }
        }
        flow
    }

    #[test]
    fn u_flow_shapes_follow_the_reference() {
        // MS-CaiT: 768×28×28 and 384×14×14 give latents 816 and 192 channels.
        let shape = UFlowShape { feature_channels: vec![768, 384], steps_per_stage: 4 };
        assert_eq!(shape.stage_channels(), vec![816, 384]);
        assert_eq!(shape.latent_channels(), vec![816, 192]);
        let bad = UFlowShape { feature_channels: vec![4, 4], steps_per_stage: 4 };
        assert!(UFlow::new(&bad, 0, &device()).is_err());
    }

    #[test]
    fn u_flow_inverse_and_log_det() {
        let flow = tiny_uflow();
        let fine = random([1, 2, 2, 2], 21);
        let coarse = random([1, 8, 1, 1], 22);
        let (latents, log_det) = flow.forward(vec![fine.clone(), coarse.clone()]);
        assert_eq!(latents[0].dims(), [1, 3, 2, 2]);
        assert_eq!(latents[1].dims(), [1, 4, 1, 1]);
        let back = flow.inverse(latents);
        assert!(max_abs_diff(back[0].clone(), fine.clone()) < 1e-4);
        assert!(max_abs_diff(back[1].clone(), coarse.clone()) < 1e-4);

        let mut x = tensor_vec(fine);
        x.extend(tensor_vec(coarse));
        let f = |t: Tensor<4>| {
            let fine = t.clone().narrow(1, 0, 1).reshape([1, 2, 2, 2]);
            let coarse = t.narrow(1, 1, 1).reshape([1, 8, 1, 1]);
            let (z, _) = flow.forward(vec![fine, coarse]);
            z.into_iter().flat_map(tensor_vec).collect()
        };
        let numeric = numerical_log_det(f, &x, [1, 2, 8, 1]);
        let exact = to_vec(log_det)[0] as f64;
        assert!((exact - numeric).abs() < 5e-2, "exact {exact} vs numeric {numeric}");
    }

    #[test]
    fn weighted_log_det_and_loss_split_by_position() {
        let flow = tiny_uflow();
        let inputs = || vec![random([2, 2, 2, 2], 31), random([2, 8, 1, 1], 32)];
        let weights = |fine: [f32; 4], coarse: f32| {
            vec![
                Tensor::<4>::from_data(TensorData::new([fine, fine].concat(), [2, 1, 2, 2]), &device()),
                Tensor::<4>::from_data(TensorData::new(vec![coarse; 2], [2, 1, 1, 1]), &device()),
            ]
        };
        let loss = |w: Option<&[Tensor<4>]>| {
            let (z, ld) = flow.forward_weighted(inputs(), w);
            to_vec(nll_loss(&z, ld, w, 1.0))[0]
        };
        let plain = loss(None);
        let all = loss(Some(&weights([1.0; 4], 1.0)));
        assert!((plain - all).abs() < 1e-4 * plain.abs().max(1.0), "{plain} vs {all}");
        // The loss is a sum of per-position terms: two complementary sets of positions add up.
        let a = loss(Some(&weights([1.0, 0.0, 0.0, 1.0], 0.0)));
        let b = loss(Some(&weights([0.0, 1.0, 1.0, 0.0], 1.0)));
        assert!((a + b - plain).abs() < 1e-4 * plain.abs().max(1.0), "{a} + {b} vs {plain}");
        assert_eq!(loss(Some(&weights([0.0; 4], 0.0))), 0.0);
        // A latent at a position of weight 0 does not enter the loss.
        let (z, ld) = flow.forward_weighted(inputs(), None);
        let w = weights([1.0, 1.0, 1.0, 0.0], 1.0);
        let before = to_vec(nll_loss(&z, ld.clone(), Some(&w), 1.0))[0];
        let mut fine = tensor_vec(z[0].clone());
        for c in 0..3 {
            fine[c * 4 + 3] = 1e3;
        }
        let changed = vec![Tensor::from_data(TensorData::new(fine, [2, 3, 2, 2]), &device()), z[1].clone()];
        assert_eq!(to_vec(nll_loss(&changed, ld, Some(&w), 1.0))[0], before);
        // z_weight scales the z term alone.
        let no_det = Tensor::<1>::zeros([2], &device());
        let once = to_vec(nll_loss(&z, no_det.clone(), None, 1.0))[0];
        let eight = to_vec(nll_loss(&z, no_det, None, 8.0))[0];
        assert!((eight - 8.0 * once).abs() < 1e-4 * eight.abs(), "{eight} vs 8 × {once}");
    }

    #[test]
    fn state_round_trip_gives_the_same_flow() {
        let flow = tiny_uflow();
        let mut bag = TensorBag::new();
        flow.save(&mut bag);
        let loaded = UFlow::load(&flow.shape(), &bag, &device()).unwrap();
        let inputs = || vec![random([2, 2, 2, 2], 4), random([2, 8, 1, 1], 5)];
        let (a, la) = flow.forward(inputs());
        let (b, lb) = loaded.forward(inputs());
        for (za, zb) in a.into_iter().zip(b) {
            assert_eq!(max_abs_diff(za, zb), 0.0);
        }
        assert_eq!(to_vec(la), to_vec(lb));
        let mut broken = bag.clone();
        broken.put_i64("flow.stage0.step0.permutation", &[3], vec![0, 0, 1]);
        assert!(UFlow::load(&flow.shape(), &broken, &device()).is_err());
    }
}
