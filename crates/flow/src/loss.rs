//! The likelihood loss of a normalizing flow whose latents are assumed N(0, I).

use burn::tensor::Tensor;

/// Negative log-likelihood per batch, constant dropped: mean_b [Σ_l ½‖z_l‖² − log|det J|]. With
/// `weights` (one [B, 1, H, W] per latent, as given to
/// [`FlowStep::forward_weighted`](crate::FlowStep::forward_weighted)), each position's ½‖z‖²
/// counts times its weight; `z_weight` multiplies the whole z term (1 for the likelihood).
///
/// FastFlow's loss Σ_l mean_b(½‖z_l‖² − log|det J_l|) is this with `log_det` = Σ_l log|det J_l|,
/// since the batch mean is linear.
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
    use burn::tensor::{Tensor, TensorData};

    use super::*;
    use crate::step::tests::{device, random, values};

    #[test]
    fn loss_is_half_squared_norm_minus_log_det_averaged_over_the_batch() {
        let z = vec![random([2, 3, 2, 2], 1), random([2, 2, 1, 1], 2)];
        let log_det = Tensor::<1>::from_data(TensorData::new(vec![1.5f32, -0.5], [2]), &device());
        let loss = values(nll_loss(&z, log_det.clone(), None, 1.0))[0];
        let (fine, coarse) = (values(z[0].clone()), values(z[1].clone()));
        let half_sq = |v: &[f32]| 0.5 * v.iter().map(|x| x * x).sum::<f32>();
        let expected = ((half_sq(&fine[..12]) + half_sq(&coarse[..2]) - 1.5)
            + (half_sq(&fine[12..]) + half_sq(&coarse[2..]) + 0.5))
            / 2.0;
        assert!((loss - expected).abs() < 1e-4 * expected.abs().max(1.0), "{loss} vs {expected}");

        // Per-position weights: all ones is the plain loss; complementary sets add up; a large z
        // at a weight-0 position does not enter.
        let weights = |fine: [f32; 4], coarse: f32| {
            vec![
                Tensor::<4>::from_data(TensorData::new([fine, fine].concat(), [2, 1, 2, 2]), &device()),
                Tensor::<4>::from_data(TensorData::new(vec![coarse; 2], [2, 1, 1, 1]), &device()),
            ]
        };
        let no_det = Tensor::<1>::zeros([2], &device());
        let weighted =
            |z: &[Tensor<4>], w: &[Tensor<4>]| values(nll_loss(z, no_det.clone(), Some(w), 1.0))[0];
        let plain = values(nll_loss(&z, no_det.clone(), None, 1.0))[0];
        assert!((weighted(&z, &weights([1.0; 4], 1.0)) - plain).abs() < 1e-4 * plain);
        let a = weighted(&z, &weights([1.0, 0.0, 0.0, 1.0], 0.0));
        let b = weighted(&z, &weights([0.0, 1.0, 1.0, 0.0], 1.0));
        assert!((a + b - plain).abs() < 1e-4 * plain, "{a} + {b} vs {plain}");
        let w = weights([1.0, 1.0, 1.0, 0.0], 1.0);
        let mut changed = fine.clone();
        for c in 0..3 {
            changed[c * 4 + 3] = 1e3;
        }
        let changed =
            vec![Tensor::from_data(TensorData::new(changed, [2, 3, 2, 2]), &device()), z[1].clone()];
        assert_eq!(weighted(&changed, &w), weighted(&z, &w));
        let eight = values(nll_loss(&z, no_det, None, 8.0))[0];
        assert!((eight - 8.0 * plain).abs() < 1e-4 * eight, "{eight} vs 8 × {plain}");
    }
}
