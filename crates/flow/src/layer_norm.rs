//! The official CNN extractors' feature normalisation (mtailanian/uflow `ResNetFeatureExtractor`,
//! anomalib's `LayerNormFeatureExtractor` and FastFlow's `norms`): `nn.LayerNorm([C, H, W],
//! elementwise_affine=True)` on each scale, trained together with the flow.

use burn::module::{Module, Param};
use burn::tensor::{Device, Tensor, TensorData};
use vigil_core::{Result, TensorBag};

/// PyTorch's `nn.LayerNorm` default ε.
const LAYER_NORM_EPS: f32 = 1e-5;

/// LayerNorm over all C·H·W values of each image at one scale, then a learned scale and shift
/// per value (initialised to 1 and 0, as PyTorch does).
#[derive(Module, Debug)]
pub struct ScaleLayerNorm {
    /// [1, C, H, W]
    weight: Param<Tensor<4>>,
    /// [1, C, H, W]
    bias: Param<Tensor<4>>,
}

fn plane_tensor(data: Vec<f32>, (channels, side): (usize, usize), device: &Device) -> Tensor<4> {
    Tensor::from_data(TensorData::new(data, [1, channels, side, side]), device)
}

fn values(t: Tensor<4>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_into_vec::<f32>().expect("f32 tensor")
}

impl ScaleLayerNorm {
    /// A fresh norm for maps of `shape` = (channels, side) (square side × side maps).
    pub fn new(shape: (usize, usize), device: &Device) -> Self {
        let n = shape.0 * shape.1 * shape.1;
        ScaleLayerNorm {
            weight: Param::from_tensor(plane_tensor(vec![1.0; n], shape, device)),
            bias: Param::from_tensor(plane_tensor(vec![0.0; n], shape, device)),
        }
    }

    /// x: [B, C, H, W] with (C, H, W) the shape this norm was built for.
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let [batch, channels, height, width] = x.dims();
        let flat = x.reshape([batch, channels * height * width]);
        let mean = flat.clone().mean_dim(1);
        let centred = flat.sub(mean);
        // Biased variance, as PyTorch's LayerNorm.
        let variance = centred.clone().square().mean_dim(1);
        centred
            .div(variance.add_scalar(LAYER_NORM_EPS).sqrt())
            .reshape([batch, channels, height, width])
            .mul(self.weight.val())
            .add(self.bias.val())
    }

    /// The learned state as `{prefix}.weight` and `{prefix}.bias`, each [C, H, W].
    pub fn save(&self, bag: &mut TensorBag, prefix: &str) {
        let [_, c, h, w] = self.weight.val().dims();
        bag.put_f32(&format!("{prefix}.weight"), &[c, h, w], values(self.weight.val()));
        bag.put_f32(&format!("{prefix}.bias"), &[c, h, w], values(self.bias.val()));
    }

    pub fn load(bag: &TensorBag, prefix: &str, shape: (usize, usize), device: &Device) -> Result<Self> {
        let (c, side) = shape;
        let read = |name: &str| -> Result<Param<Tensor<4>>> {
            let data = bag.f32(&format!("{prefix}.{name}"), Some(&[c, side, side]))?;
            Ok(Param::from_tensor(plane_tensor(data, shape, device)))
        };
        Ok(ScaleLayerNorm { weight: read("weight")?, bias: read("bias")? })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_norm_matches_the_pytorch_definition() {
        let device = Device::flex();
        let shape = (2, 2);
        let mut norm = ScaleLayerNorm::new(shape, &device);
        let weight: Vec<f32> = (0..8).map(|i| 0.5 + i as f32 * 0.25).collect();
        let bias: Vec<f32> = (0..8).map(|i| i as f32 * 0.1 - 0.3).collect();
        norm.weight = Param::from_tensor(plane_tensor(weight.clone(), shape, &device));
        norm.bias = Param::from_tensor(plane_tensor(bias.clone(), shape, &device));
        let images: [Vec<f32>; 2] = [
            (0..8).map(|i| (i * i) as f32 * 0.3 - 2.0).collect(),
            vec![5.0, 5.5, 4.0, 7.0, 6.0, 5.0, 3.0, 9.0],
        ];
        let input = Tensor::from_data(TensorData::new(images.concat(), [2, 2, 2, 2]), &device);
        let out = values(norm.forward(input));
        for (b, x) in images.iter().enumerate() {
            let mean = x.iter().sum::<f32>() / 8.0;
            let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / 8.0;
            for i in 0..8 {
                let expected = (x[i] - mean) / (var + LAYER_NORM_EPS).sqrt() * weight[i] + bias[i];
                assert!((out[8 * b + i] - expected).abs() < 1e-5, "image {b} value {i}");
            }
        }
        let mut bag = TensorBag::new();
        norm.save(&mut bag, "n");
        let again = ScaleLayerNorm::load(&bag, "n", shape, &device).unwrap();
        let mut bag2 = TensorBag::new();
        again.save(&mut bag2, "n");
        assert_eq!(bag, bag2);
        assert!(ScaleLayerNorm::load(&bag, "n", (2, 3), &device).is_err());
    }
}
