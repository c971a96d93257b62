//! The invertible pieces of U-Flow on burn: the i-RevNet up-sampling and the U-shaped graph over
//! scales of [`vigil_flow::FlowStep`]s, each with its inverse and exact log-determinant.

use burn::module::Module;
use burn::tensor::{Device, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use vigil_core::{Result, TensorBag, VigilError};
use vigil_flow::{alternating_kernel, FlowStep};

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
                (0..shape.steps_per_stage)
                    .map(|s| FlowStep::new(c, alternating_kernel(s), &mut rng, device))
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
                        let prefix = format!("flow.stage{l}.step{s}");
                        FlowStep::load(bag, &prefix, c, alternating_kernel(s), device)
                    })
                    .collect::<Result<Vec<_>>>()
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(UFlow { stages, feature_channels: shape.feature_channels.clone() })
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::TensorData;
    use rand::Rng;
    use vigil_flow::nll_loss;
    use vigil_flow::testing::numerical_log_det;

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

    fn tensor_vec<const D: usize>(t: Tensor<D>) -> Vec<f32> {
        t.into_data().convert::<f32>().try_into_vec::<f32>().expect("f32 tensor")
    }

    fn max_abs_diff(a: Tensor<4>, b: Tensor<4>) -> f32 {
        tensor_vec(a).iter().zip(tensor_vec(b)).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
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

    fn tiny_uflow() -> UFlow {
        // Fine scale 2 channels at 2×2, coarse 8 channels at 1×1: 16 dimensions in and out.
        let shape = UFlowShape { feature_channels: vec![2, 8], steps_per_stage: 2 };
        let mut flow = UFlow::new(&shape, 3, &device()).unwrap();
        for (l, stage) in flow.stages.iter_mut().enumerate() {
            for (s, step) in stage.iter_mut().enumerate() {
                *step = FlowStep::perturbed(step.channels(), step.kernel(), (10 * l + s) as u64, &device())
                    .unwrap();
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
        let exact = tensor_vec(log_det)[0] as f64;
        assert!((exact - numeric).abs() < 5e-2, "exact {exact} vs numeric {numeric}");
    }

    #[test]
    fn weighted_log_det_and_loss_split_by_position_across_scales() {
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
            tensor_vec(nll_loss(&z, ld, w, 1.0))[0]
        };
        let plain = loss(None);
        let all = loss(Some(&weights([1.0; 4], 1.0)));
        assert!((plain - all).abs() < 1e-4 * plain.abs().max(1.0), "{plain} vs {all}");
        // The loss is a sum of per-position terms: two complementary sets of positions add up.
        let a = loss(Some(&weights([1.0, 0.0, 0.0, 1.0], 0.0)));
        let b = loss(Some(&weights([0.0, 1.0, 1.0, 0.0], 1.0)));
        assert!((a + b - plain).abs() < 1e-4 * plain.abs().max(1.0), "{a} + {b} vs {plain}");
        assert_eq!(loss(Some(&weights([0.0; 4], 0.0))), 0.0);
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
        assert_eq!(tensor_vec(la), tensor_vec(lb));
        let mut broken = bag.clone();
        broken.put_i64("flow.stage0.step0.permutation", &[3], vec![0, 0, 1]);
        assert!(UFlow::load(&flow.shape(), &broken, &device()).is_err());
    }
}
