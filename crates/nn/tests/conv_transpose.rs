//! vigil's transposed convolution against burn's `ConvTranspose2d` on the autodiff flex
//! backend: output and the gradients of input, weight and bias, for the decoders' 2x2 stride-2
//! up-sampling, padded and output-padded kernels, dilation, odd sizes, and a grouped one (burn's
//! operation either way).

use burn::nn::conv::{ConvTranspose2d, ConvTranspose2dConfig};
use burn::tensor::Device;
use vigil_nn::kernels::{self, with_kernels, KernelChoice};
use vigil_nn::{tensor_from_vec, tensor_to_vec};

fn values(len: usize, seed: u32) -> Vec<f32> {
    (0..len)
        .map(|i| {
            ((i as u32).wrapping_mul(2654435761).wrapping_add(seed.wrapping_mul(97)) % 1999) as f32 / 999.5
                - 1.0
        })
        .collect()
}

struct Case {
    channels: [usize; 2],
    kernel: [usize; 2],
    stride: [usize; 2],
    padding: [usize; 2],
    padding_out: [usize; 2],
    dilation: [usize; 2],
    groups: usize,
    bias: bool,
    input: [usize; 4],
}

fn layer(case: &Case, device: &Device) -> ConvTranspose2d {
    let mut conv = ConvTranspose2dConfig::new(case.channels, case.kernel)
        .with_stride(case.stride)
        .with_padding(case.padding)
        .with_padding_out(case.padding_out)
        .with_dilation(case.dilation)
        .with_groups(case.groups)
        .with_bias(case.bias)
        .init(device);
    let dims = conv.weight.val().dims();
    conv.weight =
        conv.weight.map(|_| tensor_from_vec(values(dims.iter().product(), 5), dims, device).require_grad());
    let out = case.channels[1];
    conv.bias = conv.bias.map(|b| b.map(|_| tensor_from_vec(values(out, 6), [out], device).require_grad()));
    conv
}

/// Output, input gradient, weight gradient and bias gradient of sum(conv(x) · r).
fn run(case: &Case, choice: KernelChoice) -> Vec<Vec<f32>> {
    let device = Device::flex().autodiff();
    let conv = layer(case, &device);
    let x = tensor_from_vec(values(case.input.iter().product(), 7), case.input, &device).require_grad();
    let out = with_kernels(choice, || kernels::conv_transpose2d(&conv, x.clone()));
    let dims = out.dims();
    let r = tensor_from_vec(values(dims.iter().product(), 8), dims, &device);
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
}

#[test]
fn conv_transpose2d_matches_burn() {
    let base = Case {
        channels: [4, 3],
        kernel: [2, 2],
        stride: [2, 2],
        padding: [0, 0],
        padding_out: [0, 0],
        dilation: [1, 1],
        groups: 1,
        bias: true,
        input: [2, 4, 5, 7],
    };
    let cases = [
        // Reverse Distillation's decoder: 2x2, stride 2.
        Case { channels: [8, 6], input: [2, 8, 9, 6], ..base },
        Case { kernel: [3, 3], padding: [1, 1], padding_out: [1, 1], input: [3, 4, 7, 5], ..base },
        Case { kernel: [3, 3], stride: [1, 1], padding: [1, 1], bias: false, ..base },
        Case { kernel: [4, 4], padding: [1, 1], input: [1, 4, 6, 9], ..base },
        Case { kernel: [3, 2], stride: [2, 1], dilation: [2, 1], padding: [2, 0], ..base },
        Case { kernel: [3, 3], stride: [1, 1], padding: [0, 0], input: [2, 4, 1, 1], ..base },
        // More than one band of pixels in every pass.
        Case {
            channels: [6, 5],
            kernel: [3, 3],
            padding: [1, 1],
            padding_out: [1, 1],
            input: [2, 6, 24, 21],
            ..base
        },
        // Grouped: burn's operation on both paths.
        Case { channels: [4, 6], groups: 2, ..base },
    ];
    let names = ["output", "input gradient", "weight gradient", "bias gradient"];
    for case in &cases {
        let (vigil, burn) = (run(case, KernelChoice::Vigil), run(case, KernelChoice::Burn));
        assert_eq!(vigil.len(), burn.len());
        for (name, (v, b)) in names.iter().zip(vigil.iter().zip(&burn)) {
            assert_eq!(v.len(), b.len(), "{name} length, input {:?}", case.input);
            for (i, (v, b)) in v.iter().zip(b).enumerate() {
                assert!(
                    (v - b).abs() <= 1e-4 * (1.0 + b.abs()),
                    "{name}[{i}] kernel {:?} stride {:?} input {:?}: vigil {v} vs burn {b}",
                    case.kernel,
                    case.stride,
                    case.input
                );
            }
        }
    }
}
