//! What FastFlow trains: a `LayerNorm([C, H, W])` and an independent sequence of flow steps per
//! scale (anomalib `FastflowModel.norms` and `fast_flow_blocks`).

use burn::module::Module;
use burn::tensor::{Device, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use vigil_core::{Result, TensorBag};
use vigil_flow::{alternating_kernel, FlowStep, ScaleLayerNorm, TrainableFlow};

/// The subnet kernel of step `index`: alternating 3×3 / 1×1, or 3×3 throughout.
fn kernel(index: usize, conv3x3_only: bool) -> usize {
    if conv3x3_only {
        3
    } else {
        alternating_kernel(index)
    }
}

#[derive(Module, Debug)]
pub struct FastflowModel {
    /// One per scale, finest first.
    norms: Vec<ScaleLayerNorm>,
    /// The steps of each scale's flow, finest scale first.
    flows: Vec<Vec<FlowStep>>,
}

impl FastflowModel {
    /// `shapes`: (channels, side) per scale. The steps are drawn from one generator seeded with
    /// `seed`, scale after scale, step after step.
    pub fn new(
        shapes: &[(usize, usize)],
        flow_steps: usize,
        conv3x3_only: bool,
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let flows = shapes
            .iter()
            .map(|&(channels, _)| {
                (0..flow_steps)
                    .map(|s| FlowStep::new(channels, kernel(s, conv3x3_only), &mut rng, device))
                    .collect::<Result<Vec<_>>>()
            })
            .collect::<Result<Vec<_>>>()?;
        let norms = shapes.iter().map(|&shape| ScaleLayerNorm::new(shape, device)).collect();
        Ok(FastflowModel { norms, flows })
    }

    pub fn load(
        shapes: &[(usize, usize)],
        flow_steps: usize,
        conv3x3_only: bool,
        bag: &TensorBag,
        device: &Device,
    ) -> Result<Self> {
        let mut norms = Vec::with_capacity(shapes.len());
        let mut flows = Vec::with_capacity(shapes.len());
        for (l, &shape) in shapes.iter().enumerate() {
            norms.push(ScaleLayerNorm::load(bag, &format!("scale{l}.layer_norm"), shape, device)?);
            flows.push(
                (0..flow_steps)
                    .map(|s| {
                        let prefix = format!("scale{l}.step{s}");
                        FlowStep::load(bag, &prefix, shape.0, kernel(s, conv3x3_only), device)
                    })
                    .collect::<Result<Vec<_>>>()?,
            );
        }
        Ok(FastflowModel { norms, flows })
    }
}

impl TrainableFlow for FastflowModel {
    /// Latents per scale and the summed log|det J| per sample, for raw backbone features (one
    /// [B, C, H, W] per scale). With `weights` (one [B, 1, H, W] per scale) each position's share
    /// of the log-determinant counts times its weight.
    fn forward(
        &self,
        features: Vec<Tensor<4>>,
        weights: Option<&[Tensor<4>]>,
    ) -> (Vec<Tensor<4>>, Tensor<1>) {
        let batch = features[0].dims()[0];
        let mut log_det = Tensor::<1>::zeros([batch], &features[0].device());
        let mut latents = Vec::with_capacity(features.len());
        for (l, feature) in features.into_iter().enumerate() {
            let mut x = self.norms[l].forward(feature);
            for step in &self.flows[l] {
                let (y, step_log_det) = step.forward_weighted(x, weights.map(|w| &w[l]));
                x = y;
                log_det = log_det.add(step_log_det);
            }
            latents.push(x);
        }
        (latents, log_det)
    }

    /// The learned state: `scale{l}.layer_norm.{weight,bias}` and `scale{l}.step{s}.…`.
    fn save(&self, bag: &mut TensorBag) {
        for (l, (norm, steps)) in self.norms.iter().zip(&self.flows).enumerate() {
            norm.save(bag, &format!("scale{l}.layer_norm"));
            for (s, step) in steps.iter().enumerate() {
                step.save(bag, &format!("scale{l}.step{s}"));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::TensorData;

    use super::*;

    #[test]
    fn state_round_trips_and_steps_alternate_kernels() {
        let device = Device::flex();
        let shapes = [(4, 4), (6, 2)];
        let model = FastflowModel::new(&shapes, 3, false, 5, &device).unwrap();
        let mut bag = TensorBag::new();
        model.save(&mut bag);
        assert_eq!(bag.f32("scale1.step1.subnet_in.weight", Some(&[3, 3, 1, 1])).unwrap().len(), 9);
        assert!(bag.f32("scale1.step2.subnet_in.weight", Some(&[3, 3, 3, 3])).is_ok());
        let loaded = FastflowModel::load(&shapes, 3, false, &bag, &device).unwrap();
        let mut again = TensorBag::new();
        loaded.save(&mut again);
        assert_eq!(bag, again);
        assert!(FastflowModel::load(&shapes, 3, true, &bag, &device).is_err());
        // Same seed, same model; another seed, another one.
        let mut same = TensorBag::new();
        FastflowModel::new(&shapes, 3, false, 5, &device).unwrap().save(&mut same);
        assert_eq!(bag, same);
        let mut other = TensorBag::new();
        FastflowModel::new(&shapes, 3, false, 6, &device).unwrap().save(&mut other);
        assert_ne!(bag, other);

        let inputs = || {
            shapes
                .iter()
                .map(|&(c, s)| {
                    let data: Vec<f32> = (0..2 * c * s * s).map(|i| ((i * 37) % 11) as f32 * 0.3).collect();
                    Tensor::<4>::from_data(TensorData::new(data, [2, c, s, s]), &device)
                })
                .collect::<Vec<_>>()
        };
        let (z, log_det) = model.forward(inputs(), None);
        assert_eq!(z[0].dims(), [2, 4, 4, 4]);
        assert_eq!(z[1].dims(), [2, 6, 2, 2]);
        assert_eq!(log_det.dims(), [2]);
    }
}
