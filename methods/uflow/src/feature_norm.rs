//! [`UflowModel`]: the official CNN extractor's trainable per-scale LayerNorms
//! ([`vigil_flow::ScaleLayerNorm`], as mtailanian/uflow's `ResNetFeatureExtractor` and anomalib's
//! `LayerNormFeatureExtractor`) and the U-shaped flow as one trainable module.

use burn::module::Module;
use burn::tensor::{Device, Tensor};
use vigil_core::{Result, TensorBag};
use vigil_flow::{ScaleLayerNorm, TrainableFlow};

use crate::flow::{UFlow, UFlowShape};

/// What U-Flow trains: the per-scale LayerNorms (none when the features come normalised) and the
/// flow.
#[derive(Module, Debug)]
pub struct UflowModel {
    norms: Vec<ScaleLayerNorm>,
    flow: UFlow,
}

impl UflowModel {
    /// `shapes`: (channels, side) per scale, finest first; `layer_norm` adds a trainable
    /// LayerNorm in front of each scale.
    pub fn new(
        shapes: &[(usize, usize)],
        layer_norm: bool,
        steps_per_stage: usize,
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        let flow = UFlow::new(&flow_shape(shapes, steps_per_stage), seed, device)?;
        let norms = if layer_norm {
            shapes.iter().map(|&s| ScaleLayerNorm::new(s, device)).collect()
        } else {
            Vec::new()
        };
        Ok(UflowModel { norms, flow })
    }

    pub fn flow(&self) -> &UFlow {
        &self.flow
    }

    pub fn has_layer_norm(&self) -> bool {
        !self.norms.is_empty()
    }

    pub fn load(
        shapes: &[(usize, usize)],
        layer_norm: bool,
        steps_per_stage: usize,
        bag: &TensorBag,
        device: &Device,
    ) -> Result<Self> {
        let norms = if layer_norm {
            shapes
                .iter()
                .enumerate()
                .map(|(l, &s)| ScaleLayerNorm::load(bag, &format!("features.scale{l}.layer_norm"), s, device))
                .collect::<Result<Vec<_>>>()?
        } else {
            Vec::new()
        };
        let flow = UFlow::load(&flow_shape(shapes, steps_per_stage), bag, device)?;
        Ok(UflowModel { norms, flow })
    }
}

fn flow_shape(shapes: &[(usize, usize)], steps_per_stage: usize) -> UFlowShape {
    UFlowShape { feature_channels: shapes.iter().map(|s| s.0).collect(), steps_per_stage }
}

impl TrainableFlow for UflowModel {
    /// Latents (finest first) and the log-determinant per sample of raw features (finest first);
    /// `weights` as [`UFlow::forward_weighted`].
    fn forward(
        &self,
        features: Vec<Tensor<4>>,
        weights: Option<&[Tensor<4>]>,
    ) -> (Vec<Tensor<4>>, Tensor<1>) {
        let features = if self.norms.is_empty() {
            features
        } else {
            features.into_iter().zip(&self.norms).map(|(x, norm)| norm.forward(x)).collect()
        };
        self.flow.forward_weighted(features, weights)
    }

    /// The learned state: the flow's tensors and `features.scale{l}.layer_norm.{weight,bias}`.
    fn save(&self, bag: &mut TensorBag) {
        for (l, norm) in self.norms.iter().enumerate() {
            norm.save(bag, &format!("features.scale{l}.layer_norm"));
        }
        self.flow.save(bag);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_state_round_trips_with_and_without_layer_norm() {
        let device = Device::flex();
        let shapes = [(2, 2), (8, 1)];
        for layer_norm in [true, false] {
            let model = UflowModel::new(&shapes, layer_norm, 2, 3, &device).unwrap();
            let mut bag = TensorBag::new();
            model.save(&mut bag);
            assert_eq!(bag.f32("features.scale1.layer_norm.weight", Some(&[8, 1, 1])).is_ok(), layer_norm);
            let loaded = UflowModel::load(&shapes, layer_norm, 2, &bag, &device).unwrap();
            let mut again = TensorBag::new();
            loaded.save(&mut again);
            assert_eq!(bag, again);
            // A model saved without norms cannot be loaded as one with them.
            if !layer_norm {
                assert!(UflowModel::load(&shapes, true, 2, &bag, &device).is_err());
            }
        }
    }
}
