//! vigil's kernels for the diffusion U-Net's layers against burn's own operations, on the
//! autodiff flex backend: GroupNorm (with and without SiLU), the scaled softmax, nearest
//! up-sampling, 2x2 average pooling and pointwise 1-D convolutions. Outputs and every gradient
//! must agree to float rounding, on shapes with odd sizes.

use burn::module::Param;
use burn::nn::conv::{Conv1d, Conv1dConfig};
use burn::nn::{GroupNorm, GroupNormConfig};
use burn::tensor::{Device, Tensor};
use vigil_nn::kernels::{self, with_kernels, KernelChoice};
use vigil_nn::{tensor_from_vec, tensor_to_vec};

/// Deterministic values in [−1, 1).
fn values(len: usize, seed: u32) -> Vec<f32> {
    (0..len)
        .map(|i| {
            ((i as u32).wrapping_mul(2654435761).wrapping_add(seed.wrapping_mul(97)) % 1999) as f32 / 999.5
                - 1.0
        })
        .collect()
}

fn assert_close(vigil: &[f32], burn: &[f32], tolerance: f32, what: &str) {
    assert_eq!(vigil.len(), burn.len(), "{what}: lengths");
    for (i, (v, b)) in vigil.iter().zip(burn).enumerate() {
        assert!((v - b).abs() <= tolerance * (1.0 + b.abs()), "{what}[{i}]: vigil {v} vs burn {b}");
    }
}

/// The output and the input gradient of sum(f(x) · r), with `choice`'s kernels.
fn output_and_input_gradient<const D: usize, const E: usize>(
    shape: [usize; D],
    seed: u32,
    choice: KernelChoice,
    f: impl Fn(Tensor<D>) -> Tensor<E>,
) -> (Vec<f32>, Vec<f32>) {
    let device = Device::flex().autodiff();
    let x = tensor_from_vec(values(shape.iter().product(), seed), shape, &device).require_grad();
    let out = with_kernels(choice, || f(x.clone()));
    let dims = out.dims();
    let r = tensor_from_vec(values(dims.iter().product(), seed + 1), dims, &device);
    let grads = (out.clone() * r).sum().backward();
    (tensor_to_vec(out), tensor_to_vec(x.grad(&grads).expect("input gradient")))
}

fn group_norm_of(channels: usize, groups: usize, seed: u32, device: &Device) -> GroupNorm {
    let mut gn = GroupNormConfig::new(groups, channels).init(device);
    let gamma: Vec<f32> = values(channels, seed).iter().map(|v| 1.0 + 0.5 * v).collect();
    gn.gamma = gn.gamma.map(|p| p.map(|_| tensor_from_vec(gamma, [channels], device).require_grad()));
    gn.beta = gn
        .beta
        .map(|p| p.map(|_| tensor_from_vec(values(channels, seed + 1), [channels], device).require_grad()));
    gn
}

/// GroupNorm + SiLU and GroupNorm alone, ranks 3 and 4, one to 32 groups, odd planes, images
/// of one pixel: output and the gradients of input, gamma and beta equal burn's.
#[test]
fn group_norm_matches_burn() {
    let device = Device::flex().autodiff();
    let cases: [(&[usize], usize); 6] = [
        (&[2, 64, 9, 7], 32),
        (&[3, 6, 5, 11], 3),
        (&[1, 32, 1, 1], 32),
        (&[2, 4, 13], 1),
        (&[4, 96, 8, 8], 32),
        (&[2, 10, 3, 33], 5),
    ];
    for (shape, groups) in cases {
        for silu in [true, false] {
            let channels = shape[1];
            let run = |choice: KernelChoice| {
                let gn = group_norm_of(channels, groups, 7, &device);
                let x_values = values(shape.iter().product(), 3);
                let r_values = values(shape.iter().product(), 4);
                let dims4 = match *shape {
                    [n, c, h, w] => [n, c, h, w],
                    [n, c, l] => [n, c, l, 1],
                    _ => unreachable!(),
                };
                // Rank 3 goes through the rank-3 layer call, rank 4 through the rank-4 one.
                let x = tensor_from_vec(x_values, dims4, &device).require_grad();
                let layer = |x: Tensor<4>| {
                    let [n, c, l, _] = dims4;
                    if shape.len() == 3 {
                        let y = x.reshape([n, c, l]);
                        let y =
                            if silu { kernels::group_norm_silu(&gn, y) } else { kernels::group_norm(&gn, y) };
                        y.reshape(dims4)
                    } else if silu {
                        kernels::group_norm_silu(&gn, x)
                    } else {
                        kernels::group_norm(&gn, x)
                    }
                };
                let out = with_kernels(choice, || layer(x.clone()));
                let r = tensor_from_vec(r_values, dims4, &device);
                let grads = (out.clone() * r).sum().backward();
                let param_grad = |p: &Option<Param<Tensor<1>>>| {
                    tensor_to_vec(p.as_ref().unwrap().val().grad(&grads).expect("parameter gradient"))
                };
                [
                    tensor_to_vec(out),
                    tensor_to_vec(x.grad(&grads).expect("input gradient")),
                    param_grad(&gn.gamma),
                    param_grad(&gn.beta),
                ]
            };
            let (vigil, burn) = (run(KernelChoice::Vigil), run(KernelChoice::Burn));
            for (name, (v, b)) in ["output", "input gradient", "gamma gradient", "beta gradient"]
                .iter()
                .zip(vigil.iter().zip(&burn))
            {
                assert_close(v, b, 2e-4, &format!("{name} {shape:?} groups {groups} silu {silu}"));
            }
        }
    }
}

/// softmax(scale · x) over the last axis, as attention uses it, rows of 1 to 67 values.
#[test]
fn scaled_softmax_matches_burn() {
    for (shape, scale) in [([4, 16, 16], 0.25), ([3, 5, 67], 1.0), ([2, 7, 1], 0.7), ([1, 64, 64], 0.125)] {
        let run = |choice| {
            output_and_input_gradient(shape, 11, choice, |x: Tensor<3>| {
                kernels::scaled_softmax(x.mul_scalar(3.0), scale)
            })
        };
        let (vigil, burn) = (run(KernelChoice::Vigil), run(KernelChoice::Burn));
        assert_close(&vigil.0, &burn.0, 1e-5, &format!("softmax {shape:?}"));
        assert_close(&vigil.1, &burn.1, 1e-5, &format!("softmax gradient {shape:?}"));
    }
    // Rank 4, through the same kernel.
    let run = |choice| {
        output_and_input_gradient([2, 3, 5, 9], 12, choice, |x: Tensor<4>| kernels::scaled_softmax(x, 2.0))
    };
    let (vigil, burn) = (run(KernelChoice::Vigil), run(KernelChoice::Burn));
    assert_close(&vigil.0, &burn.0, 1e-5, "softmax rank 4");
    assert_close(&vigil.1, &burn.1, 1e-5, "softmax rank 4 gradient");
}

/// Nearest up-sampling by 2 and 2x2 average pooling, odd and even planes.
#[test]
fn resampling_matches_burn() {
    for shape in [[2, 3, 5, 7], [1, 4, 8, 8], [3, 2, 1, 9], [2, 5, 33, 16]] {
        let run = |choice| output_and_input_gradient(shape, 21, choice, kernels::upsample_nearest2);
        let (vigil, burn) = (run(KernelChoice::Vigil), run(KernelChoice::Burn));
        assert_eq!(vigil.0, burn.0, "up-sampling {shape:?}");
        assert_close(&vigil.1, &burn.1, 1e-6, &format!("up-sampling gradient {shape:?}"));

        let run = |choice| output_and_input_gradient(shape, 22, choice, kernels::avg_pool2);
        let (vigil, burn) = (run(KernelChoice::Vigil), run(KernelChoice::Burn));
        assert_close(&vigil.0, &burn.0, 1e-6, &format!("average pooling {shape:?}"));
        assert_close(&vigil.1, &burn.1, 1e-6, &format!("average pooling gradient {shape:?}"));
    }
}

/// Pointwise 1-D convolutions (attention's projections) and one that is not pointwise, which
/// takes burn's operation either way.
#[test]
fn conv1d_matches_burn() {
    let device = Device::flex().autodiff();
    for (channels, kernel, bias, shape) in
        [([6, 18], 1, true, [2, 6, 37]), ([5, 3], 1, false, [3, 5, 1]), ([4, 4], 3, true, [2, 4, 9])]
    {
        let mut conv: Conv1d =
            Conv1dConfig::new(channels[0], channels[1], kernel).with_bias(bias).init(&device);
        let dims = [channels[1], channels[0], kernel];
        conv.weight = conv
            .weight
            .map(|_| tensor_from_vec(values(dims.iter().product(), 31), dims, &device).require_grad());
        conv.bias = conv.bias.map(|b| {
            b.map(|_| tensor_from_vec(values(channels[1], 32), [channels[1]], &device).require_grad())
        });
        let run = |choice| {
            let x = tensor_from_vec(values(shape.iter().product(), 33), shape, &device).require_grad();
            let out = with_kernels(choice, || kernels::conv1d(&conv, x.clone()));
            let out_dims = out.dims();
            let r = tensor_from_vec(values(out_dims.iter().product(), 34), out_dims, &device);
            let grads = (out.clone() * r).sum().backward();
            let mut results = vec![
                tensor_to_vec(out),
                tensor_to_vec(x.grad(&grads).expect("input gradient")),
                tensor_to_vec(conv.weight.val().grad(&grads).expect("weight gradient")),
            ];
            if let Some(b) = &conv.bias {
                results.push(tensor_to_vec(b.val().grad(&grads).expect("bias gradient")));
            }
            results
        };
        let (vigil, burn) = (run(KernelChoice::Vigil), run(KernelChoice::Burn));
        for (i, (v, b)) in vigil.iter().zip(&burn).enumerate() {
            assert_close(v, b, 1e-5, &format!("conv1d {channels:?} k{kernel} result {i}"));
        }
    }
}
