//! Losses burn does not provide in the form DRAEM-style training needs. All are built from
//! differentiable tensor ops, so gradients flow through them on an autodiff device.

use burn::tensor::activation::softmax;
use burn::tensor::ops::ConvOptions;
use burn::tensor::{Tensor, TensorData};

/// SSIM's Gaussian window: 11 taps, sigma 1.5, as in the SSIM paper and DRAEM's loss.
pub const SSIM_WINDOW: usize = 11;
pub const SSIM_SIGMA: f32 = 1.5;

fn gaussian_window(channels: usize, device: &burn::tensor::Device) -> Tensor<4> {
    let half = (SSIM_WINDOW / 2) as f32;
    let taps: Vec<f32> = (0..SSIM_WINDOW)
        .map(|i| (-((i as f32 - half).powi(2)) / (2.0 * SSIM_SIGMA * SSIM_SIGMA)).exp())
        .collect();
    let total: f32 = taps.iter().sum();
    let taps: Vec<f32> = taps.iter().map(|t| t / total).collect();
    let mut window = Vec::with_capacity(channels * SSIM_WINDOW * SSIM_WINDOW);
    for _ in 0..channels {
        for y in 0..SSIM_WINDOW {
            for x in 0..SSIM_WINDOW {
                window.push(taps[y] * taps[x]);
            }
        }
    }
    Tensor::from_data(TensorData::new(window, [channels, 1, SSIM_WINDOW, SSIM_WINDOW]), device)
}

/// Per-pixel SSIM map `[N, C, H, W]` of two batches with values in [0, 1] (dynamic range 1).
///
/// Local statistics come from the 11x11 Gaussian window with zero padding, per channel, as the
/// reference implementation DRAEM uses (`pytorch-ssim`), so border pixels see a partial window.
pub fn ssim(a: Tensor<4>, b: Tensor<4>) -> Tensor<4> {
    let [_, channels, _, _] = a.dims();
    let window = gaussian_window(channels, &a.device());
    let pad = SSIM_WINDOW / 2;
    let blur = |x: Tensor<4>| {
        // depthwise: vigil's direct kernel on the CPU (see `kernels`)
        crate::kernels::conv2d_with(
            x,
            window.clone(),
            None,
            ConvOptions::new([1, 1], [pad, pad], [1, 1], channels),
        )
    };
    let c1 = 0.01f32.powi(2);
    let c2 = 0.03f32.powi(2);
    let mu_a = blur(a.clone());
    let mu_b = blur(b.clone());
    let mu_a2 = mu_a.clone() * mu_a.clone();
    let mu_b2 = mu_b.clone() * mu_b.clone();
    let mu_ab = mu_a * mu_b;
    let var_a = blur(a.clone() * a.clone()) - mu_a2.clone();
    let var_b = blur(b.clone() * b.clone()) - mu_b2.clone();
    let cov = blur(a * b) - mu_ab.clone();
    let numerator = (mu_ab.mul_scalar(2.0).add_scalar(c1)) * (cov.mul_scalar(2.0).add_scalar(c2));
    let denominator = (mu_a2 + mu_b2).add_scalar(c1) * (var_a + var_b).add_scalar(c2);
    numerator / denominator
}

/// `1 - mean SSIM`, the structural term of DRAEM's reconstruction loss.
pub fn ssim_loss(a: Tensor<4>, b: Tensor<4>) -> Tensor<1> {
    ssim(a, b).mean().neg().add_scalar(1.0)
}

/// Mean squared error.
pub fn l2_loss<const D: usize>(a: Tensor<D>, b: Tensor<D>) -> Tensor<1> {
    let d = a - b;
    (d.clone() * d).mean()
}

/// Mean absolute error.
pub fn l1_loss<const D: usize>(a: Tensor<D>, b: Tensor<D>) -> Tensor<1> {
    (a - b).abs().mean()
}

/// Focal loss (gamma 2 in DRAEM) of 2-class logits `[N, 2, H, W]` against a {0,1} target
/// `[N, 1, H, W]`, mean over pixels.
///
/// As DRAEM's reference: the one-hot target is clamped to [smooth, 1 - smooth] with
/// smooth = 1e-5, `pt = <onehot, softmax> + smooth` and the loss is `-(1 - pt)^gamma log pt`.
pub fn focal_loss(logits: Tensor<4>, target: Tensor<4>, gamma: f32) -> Tensor<1> {
    focal_loss_map(logits, target, gamma).mean()
}

/// The per-pixel terms `[N, 1, H, W]` of [`focal_loss`], for losses that weight pixels (DRAEM
/// leaves ignored pixels out).
pub fn focal_loss_map(logits: Tensor<4>, target: Tensor<4>, gamma: f32) -> Tensor<4> {
    const SMOOTH: f32 = 1e-5;
    let probs = softmax(logits, 1);
    let p_normal = probs.clone().narrow(1, 0, 1);
    let p_anomal = probs.narrow(1, 1, 1);
    let t_anomal = target.clamp(SMOOTH, 1.0 - SMOOTH);
    let t_normal = t_anomal.clone().neg().add_scalar(1.0).clamp(SMOOTH, 1.0 - SMOOTH);
    let pt = (t_normal * p_normal + t_anomal * p_anomal).add_scalar(SMOOTH);
    let weight = pt.clone().neg().add_scalar(1.0).powf_scalar(gamma);
    (weight * pt.log()).neg()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::tensor_to_vec;
    use burn::tensor::Device;

    fn tensor(data: Vec<f32>, shape: [usize; 4], device: &Device) -> Tensor<4> {
        Tensor::from_data(TensorData::new(data, shape), device)
    }

    #[test]
    fn ssim_of_identical_images_is_one() {
        let device = Device::flex();
        let data: Vec<f32> = (0..2 * 3 * 16 * 16).map(|i| ((i * 37) % 101) as f32 / 100.0).collect();
        let a = tensor(data, [2, 3, 16, 16], &device);
        let map = tensor_to_vec(ssim(a.clone(), a.clone()));
        assert!(
            map.iter().all(|v| (v - 1.0).abs() < 1e-4),
            "min {:?}",
            map.iter().cloned().fold(2.0, f32::min)
        );
        let loss: f32 = ssim_loss(a.clone(), a).into_scalar();
        assert!(loss.abs() < 1e-4);
    }

    #[test]
    fn ssim_matches_hand_computed_constant_images() {
        // Two flat images of 0.5 and 0.7: at the centre the window lies inside the image, the
        // variances are 0, so SSIM = (2*0.5*0.7 + C1) / (0.5^2 + 0.7^2 + C1).
        let device = Device::flex();
        let a = tensor(vec![0.5; 21 * 21], [1, 1, 21, 21], &device);
        let b = tensor(vec![0.7; 21 * 21], [1, 1, 21, 21], &device);
        let map = tensor_to_vec(ssim(a, b));
        let c1 = 1e-4f32;
        let expected = (0.7 + c1) / (0.74 + c1);
        // f32 cancellation in E[x^2] - mu^2 (about 1e-7, against C2 = 9e-4) bounds the agreement.
        assert!((map[10 * 21 + 10] - expected).abs() < 5e-4, "{} vs {expected}", map[10 * 21 + 10]);
        // A corner sees the zero padding, so the means shrink and SSIM differs from the centre.
        assert!((map[0] - expected).abs() > 1e-2, "corner {}", map[0]);
    }

    #[test]
    fn ssim_matches_direct_window_sum() {
        // The value at one interior pixel, summed by hand over the 11x11 window.
        let device = Device::flex();
        let n = 15;
        let a: Vec<f32> = (0..n * n).map(|i| ((i * 13) % 17) as f32 / 16.0).collect();
        let b: Vec<f32> = (0..n * n).map(|i| ((i * 7) % 11) as f32 / 10.0).collect();
        let map = tensor_to_vec(ssim(
            tensor(a.clone(), [1, 1, n, n], &device),
            tensor(b.clone(), [1, 1, n, n], &device),
        ));
        let g: Vec<f64> = (0..11).map(|i| (-((i as f64 - 5.0).powi(2)) / 4.5).exp()).collect();
        let gs: f64 = g.iter().sum();
        let (cy, cx) = (7usize, 6usize);
        let (mut ma, mut mb, mut saa, mut sbb, mut sab) = (0.0, 0.0, 0.0, 0.0, 0.0);
        for dy in 0..11 {
            for dx in 0..11 {
                let w = g[dy] * g[dx] / (gs * gs);
                let idx = (cy + dy - 5) * n + (cx + dx - 5);
                let (va, vb) = (a[idx] as f64, b[idx] as f64);
                ma += w * va;
                mb += w * vb;
                saa += w * va * va;
                sbb += w * vb * vb;
                sab += w * va * vb;
            }
        }
        let (c1, c2) = (1e-4, 9e-4);
        let expected = ((2.0 * ma * mb + c1) * (2.0 * (sab - ma * mb) + c2))
            / ((ma * ma + mb * mb + c1) * (saa - ma * ma + sbb - mb * mb + c2));
        assert!((map[cy * n + cx] as f64 - expected).abs() < 1e-4, "{} vs {expected}", map[cy * n + cx]);
    }

    #[test]
    fn focal_loss_of_a_tiny_case() {
        let device = Device::flex();
        // Pixel 0: logits (0, ln 3) -> p = (0.25, 0.75), target anomalous.
        // Pixel 1: logits (0, 0) -> p = (0.5, 0.5), target normal.
        let logits = tensor(vec![0.0, 0.0, 3f32.ln(), 0.0], [1, 2, 1, 2], &device);
        let target = tensor(vec![1.0, 0.0], [1, 1, 1, 2], &device);
        let loss: f32 = focal_loss(logits, target, 2.0).into_scalar();
        let s = 1e-5f64;
        let pt0 = (1.0 - s) * 0.75 + s * 0.25 + s;
        let pt1 = (1.0 - s) * 0.5 + s * 0.5 + s;
        let f = |pt: f64| -(1.0 - pt).powi(2) * pt.ln();
        let expected = (f(pt0) + f(pt1)) / 2.0;
        assert!((loss as f64 - expected).abs() < 1e-6, "{loss} vs {expected}");
    }

    #[test]
    fn l2_and_l1() {
        let device = Device::flex();
        let a = tensor(vec![0.0, 1.0, 2.0, 3.0], [1, 1, 2, 2], &device);
        let b = tensor(vec![1.0, 1.0, 0.0, 3.0], [1, 1, 2, 2], &device);
        let l2: f32 = l2_loss(a.clone(), b.clone()).into_scalar();
        let l1: f32 = l1_loss(a, b).into_scalar();
        assert!((l2 - 5.0 / 4.0).abs() < 1e-6);
        assert!((l1 - 3.0 / 4.0).abs() < 1e-6);
    }
}
