//! vigil's own CPU training kernels for layers burn-flex runs slowly, as burn operations with
//! their backward passes, so networks stay burn modules.
//!
//! A network calls the layer functions here ([`conv2d`], [`conv_transpose2d`], [`conv1d`],
//! [`batch_norm_act`], [`group_norm_silu`], [`scaled_softmax`], ...) with burn's own layer
//! instead of the layer's `forward`. On
//! the flex CPU backend (with or without autodiff) and f32 they run vigil's kernels, reached
//! through burn's backend-extension mechanism ([`TrainingKernels`]); on any other backend, for
//! other float types, or when [`KernelChoice::Burn`] is chosen, they call burn's own operation,
//! so GPU builds and the reference path keep working unchanged.
//!
//! Which path runs: [`KernelChoice::Vigil`] by default; the environment variable
//! `VIGIL_KERNELS=burn` makes burn's operations the process default (to compare or to rule the
//! kernels out), and [`with_kernels`] chooses for the layer calls made on the current thread.

mod conv;
mod conv_transpose;
mod depthwise;
mod extension;
mod group_norm;
mod math;
mod norm;
mod resample;
mod softmax;

use std::cell::Cell;
use std::sync::OnceLock;

use burn::backend::{Dispatch, DispatchDevice};
use burn::nn::conv::{Conv1d, Conv2d, ConvTranspose2d};
use burn::nn::{BatchNorm, GroupNorm, PaddingConfig1d, PaddingConfig2d};
use burn::tensor::activation::{leaky_relu, relu, silu, softmax};
use burn::tensor::module::{avg_pool2d, interpolate};
use burn::tensor::ops::{
    AvgPoolOptions, ConvOptions, ConvTransposeOptions, InterpolateMode, InterpolateOptions,
};
use burn::tensor::{DType, Tensor};

pub use extension::TrainingKernels;

/// A pointer that rayon tasks may share because each writes a disjoint part of its buffer.
#[derive(Clone, Copy)]
struct SharedOut(*mut f32);
// SAFETY: only used by tasks that write disjoint elements (argued at each use).
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

impl SharedOut {
    /// The pointer, through a method so closures capture the whole (Send) wrapper.
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// Which implementation the layer functions use on the flex CPU backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelChoice {
    /// vigil's kernels (the default).
    Vigil,
    /// burn's own operations.
    Burn,
}

/// The environment variable that sets the process default: `burn` or `vigil`.
pub const KERNELS_ENV: &str = "VIGIL_KERNELS";

thread_local! {
    static THREAD_CHOICE: Cell<Option<KernelChoice>> = const { Cell::new(None) };
}

fn process_default() -> KernelChoice {
    static DEFAULT: OnceLock<KernelChoice> = OnceLock::new();
    *DEFAULT.get_or_init(|| match std::env::var(KERNELS_ENV).as_deref() {
        Err(_) | Ok("vigil") => KernelChoice::Vigil,
        Ok("burn") => KernelChoice::Burn,
        Ok(other) => {
            eprintln!(
                "warning: {KERNELS_ENV}={other:?} is neither \"vigil\" nor \"burn\"; using vigil's kernels"
            );
            KernelChoice::Vigil
        }
    })
}

/// The implementation layer calls on this thread use now.
pub fn kernel_choice() -> KernelChoice {
    THREAD_CHOICE.get().unwrap_or_else(process_default)
}

/// Runs `f` with the layer calls it makes on this thread using `choice` (restored afterwards,
/// also when `f` panics).
pub fn with_kernels<T>(choice: KernelChoice, f: impl FnOnce() -> T) -> T {
    struct Restore(Option<KernelChoice>);
    impl Drop for Restore {
        fn drop(&mut self) {
            THREAD_CHOICE.set(self.0);
        }
    }
    let _restore = Restore(THREAD_CHOICE.replace(Some(choice)));
    f()
}

/// Whether a layer call on `x` goes to vigil's kernels.
fn vigil_kernels_take<const D: usize>(x: &Tensor<D>) -> bool {
    kernel_choice() == KernelChoice::Vigil
        && x.dtype() == DType::F32
        && matches!(x.device().as_dispatch().clone().inner(), DispatchDevice::Flex(_))
}

/// ((top, bottom), (left, right)) padding of a convolution, as burn's `Conv2d::forward`
/// resolves it (its own helper is private to burn-nn).
fn padding_pairs(conv: &Conv2d, height: usize, width: usize) -> [(usize, usize); 2] {
    let same = |kernel: usize, stride: usize, size: usize| {
        let total = ((size.div_ceil(stride).max(1) - 1) * stride + kernel).saturating_sub(size);
        (total / 2, total - total / 2)
    };
    match conv.padding {
        PaddingConfig2d::Valid => [(0, 0), (0, 0)],
        PaddingConfig2d::Same => [
            same(conv.kernel_size[0], conv.stride[0], height),
            same(conv.kernel_size[1], conv.stride[1], width),
        ],
        PaddingConfig2d::Explicit(top, left, bottom, right) => [(top, bottom), (left, right)],
    }
}

/// `conv.forward(x)`, by vigil's kernels where they apply.
pub fn conv2d(conv: &Conv2d, x: Tensor<4>) -> Tensor<4> {
    let [_, _, height, width] = x.dims();
    let padding = padding_pairs(conv, height, width);
    let options = ConvOptions::new_with_padding(conv.stride, padding, conv.dilation, conv.groups);
    conv2d_with(x, conv.weight.val(), conv.bias.as_ref().map(|bias| bias.val()), options)
}

/// burn's `module::conv2d(x, weight, bias, options)`, by vigil's kernels where they apply: one
/// group, or one filter per channel without dilation (other convolutions, other
/// backends and float types take burn's operation).
pub fn conv2d_with(
    x: Tensor<4>,
    weight: Tensor<4>,
    bias: Option<Tensor<1>>,
    options: ConvOptions<2>,
) -> Tensor<4> {
    if !vigil_kernels_take(&x) {
        return burn::tensor::module::conv2d(x, weight, bias, options);
    }
    let (x, weight) = (x.into_dispatch(), weight.into_dispatch());
    Tensor::from_dispatch(match bias {
        Some(bias) => {
            <Dispatch as TrainingKernels>::fast_conv2d_bias(x, weight, bias.into_dispatch(), options)
        }
        None => <Dispatch as TrainingKernels>::fast_conv2d(x, weight, options),
    })
}

/// `relu(bn.forward(x))` for `slope` 0, else `leaky_relu(bn.forward(x), slope)` (`bn.forward(x)`
/// for slope 1); in training mode (an autodiff device and a trainable layer) by one fused vigil
/// kernel, with the running statistics updated as burn's `BatchNorm` does.
pub fn batch_norm_act(bn: &BatchNorm, x: Tensor<4>, slope: f64) -> Tensor<4> {
    batch_norm_act_clamped(bn, x, slope, f64::INFINITY)
}

/// [`batch_norm_act`] with the positive side clamped at `max` (ReLU6: slope 0, max 6), in one
/// fused kernel where it applies; above `max` the gradient is 0, as PyTorch's ReLU6 has it.
pub fn batch_norm_act_clamped(bn: &BatchNorm, x: Tensor<4>, slope: f64, max: f64) -> Tensor<4> {
    let training = x.device().is_autodiff() && bn.training.is_enabled();
    if !training || !vigil_kernels_take(&x) {
        let y = bn.forward(x);
        let y = if slope == 0.0 {
            relu(y)
        } else if slope == 1.0 {
            y
        } else {
            leaky_relu(y, slope)
        };
        return if max.is_finite() { y.clamp_max(max) } else { y };
    }
    let device = x.device();
    let (out, mean, variance) = <Dispatch as TrainingKernels>::fast_batch_norm_act(
        x.into_dispatch(),
        bn.gamma.val().into_dispatch(),
        bn.beta.val().into_dispatch(),
        bn.epsilon,
        (slope, max),
    );
    let (mean, variance) = (Tensor::<1>::from_dispatch(mean), Tensor::<1>::from_dispatch(variance));
    let momentum = bn.momentum;
    let running_mean = bn.running_mean.value_sync().to_device(&device);
    let running_var = bn.running_var.value_sync().to_device(&device);
    bn.running_mean
        .update(running_mean.mul_scalar(1.0 - momentum).add(mean.detach().mul_scalar(momentum)).detach());
    bn.running_var
        .update(running_var.mul_scalar(1.0 - momentum).add(variance.detach().mul_scalar(momentum)).detach());
    Tensor::from_dispatch(out)
}

/// `conv.forward(x)` for a transposed convolution, by vigil's kernels where they apply (one
/// group; others take burn's operation).
pub fn conv_transpose2d(conv: &ConvTranspose2d, x: Tensor<4>) -> Tensor<4> {
    let options =
        ConvTransposeOptions::new(conv.stride, conv.padding, conv.padding_out, conv.dilation, conv.groups);
    conv_transpose2d_with(x, conv.weight.val(), conv.bias.as_ref().map(|bias| bias.val()), options)
}

/// burn's `module::conv_transpose2d(x, weight, bias, options)`, by vigil's kernels where they
/// apply.
pub fn conv_transpose2d_with(
    x: Tensor<4>,
    weight: Tensor<4>,
    bias: Option<Tensor<1>>,
    options: ConvTransposeOptions<2>,
) -> Tensor<4> {
    if !vigil_kernels_take(&x) {
        return burn::tensor::module::conv_transpose2d(x, weight, bias, options);
    }
    let (x, weight) = (x.into_dispatch(), weight.into_dispatch());
    Tensor::from_dispatch(match bias {
        Some(bias) => <Dispatch as TrainingKernels>::fast_conv_transpose2d_bias(
            x,
            weight,
            bias.into_dispatch(),
            options,
        ),
        None => <Dispatch as TrainingKernels>::fast_conv_transpose2d(x, weight, options),
    })
}

/// `conv.forward(x)` for a 1-D convolution; pointwise ones (kernel 1, stride 1, no padding, one
/// group, as attention's qkv and output projections) by vigil's kernels where they apply, as a
/// 1x1 convolution over `[batch, channels, length, 1]`.
pub fn conv1d(conv: &Conv1d, x: Tensor<3>) -> Tensor<3> {
    let unpadded = match conv.padding {
        PaddingConfig1d::Valid | PaddingConfig1d::Same => true,
        PaddingConfig1d::Explicit(left, right) => left == 0 && right == 0,
    };
    let pointwise = conv.kernel_size == 1 && conv.stride == 1 && conv.groups == 1 && unpadded;
    if !pointwise || !vigil_kernels_take(&x) {
        return conv.forward(x);
    }
    let [batch, channels, length] = x.dims();
    let weight = conv.weight.val();
    let [outputs, inputs, _] = weight.dims();
    let out = conv2d_with(
        x.reshape([batch, channels, length, 1]),
        weight.reshape([outputs, inputs, 1, 1]),
        conv.bias.as_ref().map(|bias| bias.val()),
        ConvOptions::new([1, 1], [0, 0], [1, 1], 1),
    );
    out.reshape([batch, outputs, length])
}

/// `gn.forward(x)`, by vigil's fused kernel where it applies (an affine GroupNorm on an f32
/// flex tensor without empty axes).
pub fn group_norm<const D: usize>(gn: &GroupNorm, x: Tensor<D>) -> Tensor<D> {
    group_norm_act(gn, x, false)
}

/// `silu(gn.forward(x))`, by one fused vigil kernel where it applies.
pub fn group_norm_silu<const D: usize>(gn: &GroupNorm, x: Tensor<D>) -> Tensor<D> {
    group_norm_act(gn, x, true)
}

fn group_norm_act<const D: usize>(gn: &GroupNorm, x: Tensor<D>, with_silu: bool) -> Tensor<D> {
    let dims = x.dims();
    let takes = D >= 3
        && !dims.contains(&0)
        && dims[1] == gn.num_channels
        && gn.num_groups > 0
        && dims[1].is_multiple_of(gn.num_groups)
        && vigil_kernels_take(&x);
    let (Some(gamma), Some(beta), true) = (gn.gamma.as_ref(), gn.beta.as_ref(), takes) else {
        let y = gn.forward(x);
        return if with_silu { silu(y) } else { y };
    };
    Tensor::from_dispatch(<Dispatch as TrainingKernels>::fast_group_norm(
        x.into_dispatch(),
        gamma.val().into_dispatch(),
        beta.val().into_dispatch(),
        gn.num_groups,
        gn.epsilon,
        with_silu,
    ))
}

/// `softmax(x · scale, D − 1)`: the softmax over the last axis of the scaled input, by one vigil
/// kernel (forward and backward) where it applies.
pub fn scaled_softmax<const D: usize>(x: Tensor<D>, scale: f64) -> Tensor<D> {
    let takes = x.dims()[D - 1] > 0 && scale.is_finite() && scale > 0.0 && vigil_kernels_take(&x);
    if !takes {
        return softmax(x.mul_scalar(scale), D - 1);
    }
    Tensor::from_dispatch(<Dispatch as TrainingKernels>::fast_softmax(x.into_dispatch(), scale))
}

/// Nearest-neighbour up-sampling by 2 (`interpolate` to twice the size, nearest), by vigil's
/// kernels where they apply.
pub fn upsample_nearest2(x: Tensor<4>) -> Tensor<4> {
    let [_, _, h, w] = x.dims();
    if x.dims().contains(&0) || !vigil_kernels_take(&x) {
        let options = InterpolateOptions::new(InterpolateMode::Nearest).with_output_size([2 * h, 2 * w]);
        return interpolate(x, options);
    }
    Tensor::from_dispatch(<Dispatch as TrainingKernels>::fast_upsample_nearest2(x.into_dispatch()))
}

/// 2x2 average pooling with stride 2 (`avg_pool2d` with a 2x2 kernel), by vigil's kernels where
/// they apply.
pub fn avg_pool2(x: Tensor<4>) -> Tensor<4> {
    let [_, _, h, w] = x.dims();
    if h < 2 || w < 2 || x.dims().contains(&0) || !vigil_kernels_take(&x) {
        return avg_pool2d(x, AvgPoolOptions::new([2, 2]));
    }
    Tensor::from_dispatch(<Dispatch as TrainingKernels>::fast_avg_pool2(x.into_dispatch()))
}

#[cfg(test)]
mod tests {
    use burn::nn::conv::Conv2dConfig;
    use burn::tensor::Device;

    use super::*;
    use crate::{tensor_from_vec, tensor_to_vec};

    fn values(len: usize, seed: u32) -> Vec<f32> {
        (0..len)
            .map(|i| ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) % 997) as f32 / 498.5 - 1.0)
            .collect()
    }

    /// A convolution with deterministic weights: [cin, cout], kernel, stride, padding, bias.
    fn conv_of(
        device: &Device,
        [cin, cout, groups]: [usize; 3],
        kernel: [usize; 2],
        stride: [usize; 2],
        padding: PaddingConfig2d,
        bias: bool,
    ) -> Conv2d {
        let mut conv = Conv2dConfig::new([cin, cout], kernel)
            .with_stride(stride)
            .with_padding(padding)
            .with_bias(bias)
            .with_groups(groups)
            .init(device);
        let shape = [cout, cin / groups, kernel[0], kernel[1]];
        conv.weight = conv
            .weight
            .map(|_| tensor_from_vec(values(shape.iter().product(), 11), shape, device).require_grad());
        conv.bias =
            conv.bias.map(|b| b.map(|_| tensor_from_vec(values(cout, 12), [cout], device).require_grad()));
        conv
    }

    struct Grads {
        out: Vec<f32>,
        x: Vec<f32>,
        weight: Vec<f32>,
        bias: Option<Vec<f32>>,
    }

    /// Output and gradients of sum(conv(x) · r) with `choice`'s kernels.
    fn run(conv: &Conv2d, x: &[f32], shape: [usize; 4], choice: KernelChoice) -> Grads {
        let device = Device::flex().autodiff();
        let x = tensor_from_vec(x.to_vec(), shape, &device).require_grad();
        let out = with_kernels(choice, || conv2d(conv, x.clone()));
        let dims = out.dims();
        let r = tensor_from_vec(values(dims.iter().product(), 13), dims, &device);
        let grads = (out.clone() * r).sum().backward();
        Grads {
            out: tensor_to_vec(out),
            x: tensor_to_vec(x.grad(&grads).expect("input gradient")),
            weight: tensor_to_vec(conv.weight.val().grad(&grads).expect("weight gradient")),
            bias: conv.bias.as_ref().map(|b| tensor_to_vec(b.val().grad(&grads).expect("bias gradient"))),
        }
    }

    fn assert_close(a: &[f32], b: &[f32], what: &str) {
        assert_eq!(a.len(), b.len(), "{what}: lengths");
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!((x - y).abs() <= 1e-4 * (1.0 + x.abs().max(y.abs())), "{what}[{i}]: {x} vs {y}");
        }
    }

    /// Odd sizes, strides 1 and 2, explicit, same and no padding, with and without a bias:
    /// vigil's output and gradients equal burn's.
    #[test]
    fn conv2d_matches_burn_forward_and_backward() {
        let device = Device::flex().autodiff();
        let cases = [
            ([3, 5, 1], [3, 3], [1, 1], PaddingConfig2d::Explicit(1, 1, 1, 1), true, [2, 3, 13, 11]),
            ([4, 6, 1], [3, 3], [2, 2], PaddingConfig2d::Explicit(1, 1, 1, 1), true, [2, 4, 15, 9]),
            ([5, 3, 1], [1, 1], [1, 1], PaddingConfig2d::Valid, true, [3, 5, 7, 10]),
            ([2, 4, 1], [3, 2], [2, 1], PaddingConfig2d::Explicit(2, 0, 1, 1), false, [1, 2, 9, 8]),
            ([3, 4, 1], [3, 3], [2, 2], PaddingConfig2d::Same, false, [2, 3, 12, 7]),
            ([6, 8, 1], [3, 3], [1, 1], PaddingConfig2d::Explicit(1, 1, 1, 1), true, [2, 6, 37, 41]),
            // depthwise (groups = channels)
            ([4, 4, 4], [5, 5], [1, 1], PaddingConfig2d::Explicit(2, 2, 2, 2), true, [2, 4, 9, 12]),
            // depthwise at stride 2, as MobileNetV2 down-samples
            ([6, 6, 6], [3, 3], [2, 2], PaddingConfig2d::Explicit(1, 1, 1, 1), false, [2, 6, 15, 12]),
            ([8, 8, 8], [3, 3], [2, 2], PaddingConfig2d::Explicit(1, 1, 1, 1), false, [2, 8, 32, 33]),
            // grouped: burn's operation (vigil's kernels take one group or depthwise only)
            ([4, 6, 2], [3, 3], [1, 1], PaddingConfig2d::Explicit(1, 1, 1, 1), true, [1, 4, 6, 7]),
        ];
        for (channels, kernel, stride, padding, bias, shape) in cases {
            let what = format!("{channels:?} k{kernel:?} s{stride:?} {padding:?} {shape:?}");
            let conv = conv_of(&device, channels, kernel, stride, padding, bias);
            let x = values(shape.iter().product(), 14);
            let (vigil, burn) =
                (run(&conv, &x, shape, KernelChoice::Vigil), run(&conv, &x, shape, KernelChoice::Burn));
            assert_close(&vigil.out, &burn.out, &format!("output {what}"));
            assert_close(&vigil.x, &burn.x, &format!("input gradient {what}"));
            assert_close(&vigil.weight, &burn.weight, &format!("weight gradient {what}"));
            assert_eq!(vigil.bias.is_some(), bias);
            if let (Some(v), Some(b)) = (vigil.bias, burn.bias) {
                assert_close(&v, &b, &format!("bias gradient {what}"));
            }
            // Thousands of sums in another order than burn's: some bits differ, so vigil's
            // kernels did run.
            if shape.iter().product::<usize>() > 10_000 {
                assert_ne!(vigil.weight, burn.weight, "vigil's kernels were not used");
            }
        }
    }

    /// Central differences of sum(conv(x) · r) in f64 over the inputs and weights of small
    /// convolutions against vigil's gradients.
    #[test]
    fn conv2d_gradients_match_finite_differences() {
        let device = Device::flex().autodiff();
        for (stride, padding) in
            [([1, 1], PaddingConfig2d::Explicit(1, 1, 1, 1)), ([2, 2], PaddingConfig2d::Explicit(0, 1, 1, 0))]
        {
            let shape = [2, 2, 7, 6];
            let conv = conv_of(&device, [2, 3, 1], [3, 3], stride, padding.clone(), true);
            let x = values(shape.iter().product(), 15);
            let vigil = run(&conv, &x, shape, KernelChoice::Vigil);
            let r = values(vigil.out.len(), 13);
            let weight = tensor_to_vec(conv.weight.val());
            // The loss written out in f64 from the values, so the difference quotient is exact
            // up to f64 rounding.
            let loss = |x: &[f32], weight: &[f32]| -> f64 {
                let mut c = conv_of(&device, [2, 3, 1], [3, 3], stride, padding.clone(), true);
                c.weight = c.weight.map(|w| tensor_from_vec(weight.to_vec(), w.dims(), &device));
                let out = c.forward(tensor_from_vec(x.to_vec(), shape, &device));
                tensor_to_vec(out).iter().zip(&r).map(|(o, r)| f64::from(*o) * f64::from(*r)).sum()
            };
            let h = 1e-2f32;
            let difference = |f: &dyn Fn(f32) -> f64| (f(h) - f(-h)) / (2.0 * f64::from(h));
            for i in (0..x.len()).step_by(7) {
                let d = difference(&|e| {
                    let mut x = x.clone();
                    x[i] += e;
                    loss(&x, &weight)
                });
                assert!(
                    (d - f64::from(vigil.x[i])).abs() < 2e-2,
                    "input {i} stride {stride:?}: {d} vs {}",
                    vigil.x[i]
                );
            }
            for i in 0..weight.len() {
                let d = difference(&|e| {
                    let mut w = weight.clone();
                    w[i] += e;
                    loss(&x, &w)
                });
                assert!(
                    (d - f64::from(vigil.weight[i])).abs() < 2e-2,
                    "weight {i} stride {stride:?}: {d} vs {}",
                    vigil.weight[i]
                );
            }
            let db = vigil.bias.expect("bias gradient");
            let out_pixels = vigil.out.len() / 2 / 3;
            for (o, db) in db.iter().enumerate() {
                let sum: f64 = (0..2)
                    .flat_map(|n| &r[(n * 3 + o) * out_pixels..][..out_pixels])
                    .map(|&v| f64::from(v))
                    .sum();
                assert!((sum - f64::from(*db)).abs() < 1e-3, "bias {o}: {sum} vs {db}");
            }
        }
    }

    /// The fused BatchNorm + (leaky) ReLU against burn's BatchNorm and activation: outputs,
    /// gradients of input, gamma and beta, and the running statistics after two steps.
    #[test]
    fn batch_norm_act_matches_burn() {
        let device = Device::flex().autodiff();
        // (slope, max): ReLU, leaky ReLU, ReLU6-like clamped where values reach it, no activation.
        let inf = f64::INFINITY;
        for ((slope, max), shape) in [
            ((0.0, inf), [3, 4, 7, 5]),
            ((0.2, inf), [2, 3, 9, 11]),
            ((0.0, inf), [4, 2, 1, 1]),
            ((0.0, inf), [2, 4, 32, 32]),
            ((0.0, 0.6), [2, 3, 9, 11]),
            ((1.0, inf), [2, 4, 32, 32]),
        ] {
            let channels = shape[1];
            let run = |choice: KernelChoice| {
                let mut bn = burn::nn::BatchNormConfig::new(channels).init(&device);
                bn.gamma = bn
                    .gamma
                    .map(|_| tensor_from_vec(values(channels, 21), [channels], &device).require_grad());
                bn.beta = bn
                    .beta
                    .map(|_| tensor_from_vec(values(channels, 22), [channels], &device).require_grad());
                let mut results = Vec::new();
                for step in 0..2u32 {
                    let x = tensor_from_vec(values(shape.iter().product(), 23 + step), shape, &device)
                        .require_grad();
                    let out = with_kernels(choice, || batch_norm_act_clamped(&bn, x.clone(), slope, max));
                    let r = tensor_from_vec(values(shape.iter().product(), 25 + step), shape, &device);
                    let grads = (out.clone() * r).sum().backward();
                    results.push(vec![
                        tensor_to_vec(out),
                        tensor_to_vec(x.grad(&grads).expect("input gradient")),
                        tensor_to_vec(bn.gamma.val().grad(&grads).expect("gamma gradient")),
                        tensor_to_vec(bn.beta.val().grad(&grads).expect("beta gradient")),
                        tensor_to_vec(bn.running_mean.value()),
                        tensor_to_vec(bn.running_var.value()),
                    ]);
                }
                results
            };
            let (vigil, burn) = (run(KernelChoice::Vigil), run(KernelChoice::Burn));
            let names = [
                "output",
                "input gradient",
                "gamma gradient",
                "beta gradient",
                "running mean",
                "running variance",
            ];
            for (step, (v, b)) in vigil.iter().zip(&burn).enumerate() {
                for ((v, b), name) in v.iter().zip(b).zip(names) {
                    assert_close(v, b, &format!("{name} step {step} slope {slope} max {max} {shape:?}"));
                }
            }
        }
    }

    /// conv → BatchNorm + ReLU → conv, the layers chained as networks chain them: the same
    /// output and gradients with vigil's kernels as with burn's operations.
    #[test]
    fn chained_layers_match_burn() {
        let device = Device::flex().autodiff();
        let first = conv_of(&device, [3, 4, 1], [3, 3], [1, 1], PaddingConfig2d::Explicit(1, 1, 1, 1), true);
        let second = conv_of(&device, [4, 2, 1], [3, 3], [1, 1], PaddingConfig2d::Explicit(1, 1, 1, 1), true);
        let bn = burn::nn::BatchNormConfig::new(4).init(&device);
        let shape = [2, 3, 16, 16];
        let run = |choice: KernelChoice| {
            let x = tensor_from_vec(values(shape.iter().product(), 31), shape, &device).require_grad();
            let out =
                with_kernels(choice, || conv2d(&second, batch_norm_act(&bn, conv2d(&first, x.clone()), 0.0)));
            let dims = out.dims();
            let r = tensor_from_vec(values(dims.iter().product(), 32), dims, &device);
            let grads = (out.clone() * r).sum().backward();
            let grad =
                |p: &burn::module::Param<Tensor<4>>| tensor_to_vec(p.val().grad(&grads).expect("gradient"));
            vec![
                tensor_to_vec(out),
                tensor_to_vec(x.grad(&grads).expect("input gradient")),
                grad(&first.weight),
                grad(&second.weight),
                tensor_to_vec(bn.gamma.val().grad(&grads).expect("gamma gradient")),
            ]
        };
        let (vigil, burn) = (run(KernelChoice::Vigil), run(KernelChoice::Burn));
        for (i, (v, b)) in vigil.iter().zip(&burn).enumerate() {
            assert_close(v, b, &format!("chained result {i}"));
        }
    }

    #[test]
    fn the_thread_choice_is_scoped_and_the_default_is_vigil() {
        let outer = kernel_choice();
        with_kernels(KernelChoice::Burn, || {
            assert_eq!(kernel_choice(), KernelChoice::Burn);
            with_kernels(KernelChoice::Vigil, || assert_eq!(kernel_choice(), KernelChoice::Vigil));
            assert_eq!(kernel_choice(), KernelChoice::Burn);
        });
        assert_eq!(kernel_choice(), outer);
        if std::env::var(KERNELS_ENV).is_err() {
            assert_eq!(outer, KernelChoice::Vigil);
        }
    }
}
