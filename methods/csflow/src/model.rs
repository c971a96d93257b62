//! What CS-Flow trains: a sequence of cross-scale coupling blocks over the features of the image
//! at several scales (official `parallel_glow_coupling_layer` with `CrossConvolutions`; anomalib
//! `ParallelGlowCouplingLayer`), each after a fixed channel permutation per scale.

use burn::module::{Module, Param};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::PaddingConfig2d;
use burn::tensor::activation::leaky_relu;
use burn::tensor::module::interpolate;
use burn::tensor::ops::{InterpolateMode, InterpolateOptions};
use burn::tensor::{Device, Int, Tensor, TensorData};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use vigil_core::{Result, TensorBag, VigilError};
use vigil_flow::TrainableFlow;
use vigil_nn::kernels::conv2d;
use vigil_nn::{load_module, module_to_bag};

/// The slope of the subnets' LeakyReLU.
const LEAKY_SLOPE: f64 = 0.1;
/// The soft clamp's constant: log-scale s ↦ CLAMP·0.636·atan(s/CLAMP), bounded by about ±CLAMP.
const ATAN_FACTOR: f32 = 0.636;

/// The architecture of a [`CsflowModel`]: what must agree between fitting and loading.
#[derive(Clone, Debug, PartialEq)]
pub struct CsflowShape {
    /// Feature channels (the same at every scale).
    pub channels: usize,
    /// Feature-grid side per scale, finest first; each is twice the next.
    pub sides: Vec<usize>,
    pub blocks: usize,
    pub hidden: usize,
    /// Subnet kernel of every block but the last, and of the last.
    pub kernel: usize,
    pub last_kernel: usize,
    /// Soft clamp of the coupling log-scales.
    pub clamp: f32,
}

impl CsflowShape {
    pub fn check(&self) -> Result<()> {
        let bad = |m: String| Err(VigilError::Config(format!("csflow: {m}")));
        if self.channels < 2 {
            return bad(format!("the features need at least 2 channels, got {}", self.channels));
        }
        if self.sides.is_empty() || self.sides.contains(&0) {
            return bad(format!("every scale needs a feature grid, got sides {:?}", self.sides));
        }
        if self.sides.windows(2).any(|w| w[0] != 2 * w[1]) {
            return bad(format!(
                "each scale's feature grid must be twice the next one's, got sides {:?} (choose an input size \
                 that is a multiple of the layer's stride times 2^(scales-1))",
                self.sides
            ));
        }
        if self.blocks == 0 || self.hidden == 0 {
            return bad("coupling_blocks and hidden_channels must be positive".into());
        }
        if self.kernel.is_multiple_of(2) || self.last_kernel.is_multiple_of(2) {
            return bad(format!("kernels must be odd, got {} and {}", self.kernel, self.last_kernel));
        }
        if !(self.clamp > 0.0 && self.clamp.is_finite()) {
            return bad(format!("clamp must be a positive number, got {}", self.clamp));
        }
        Ok(())
    }

    fn kernel_of(&self, block: usize) -> usize {
        if block + 1 == self.blocks {
            self.last_kernel
        } else {
            self.kernel
        }
    }

    /// Latent values per image over all scales.
    pub fn dimensions(&self) -> usize {
        self.sides.iter().map(|s| self.channels * s * s).sum()
    }
}

/// A convolution with PyTorch's default initialisation (weight and bias U(−1/√fan_in, 1/√fan_in))
/// and PyTorch's symmetric padding of k/2.
fn conv(
    rng: &mut ChaCha8Rng,
    (c_in, c_out): (usize, usize),
    kernel: usize,
    stride: usize,
    device: &Device,
) -> Conv2d {
    let bound = 1.0 / ((c_in * kernel * kernel) as f32).sqrt();
    let weight: Vec<f32> =
        (0..c_out * c_in * kernel * kernel).map(|_| rng.gen_range(-bound..bound)).collect();
    let bias: Vec<f32> = (0..c_out).map(|_| rng.gen_range(-bound..bound)).collect();
    let pad = kernel / 2;
    let mut module = Conv2dConfig::new([c_in, c_out], [kernel, kernel])
        .with_stride([stride, stride])
        .with_padding(PaddingConfig2d::Explicit(pad, pad, pad, pad))
        .init(device);
    module.weight =
        Param::from_tensor(Tensor::from_data(TensorData::new(weight, [c_out, c_in, kernel, kernel]), device));
    module.bias = Some(Param::from_tensor(Tensor::from_data(TensorData::new(bias, [c_out]), device)));
    module
}

/// The cross-convolution subnet (official `CrossConvolutions`, paper Fig. 4): per scale a
/// convolution to `hidden` channels and LeakyReLU(0.1); per scale a convolution back to the
/// output channels, plus the bilinearly up-sampled next-coarser hidden map through an "up"
/// convolution and the next-finer one through a stride-2 "down" convolution; each scale's sum
/// times a learned γ that starts at 0, so a fresh block is the identity.
#[derive(Module, Debug)]
pub struct CrossConvolutions {
    /// conv_scale{l}_0.
    hidden: Vec<Conv2d>,
    /// conv_scale{l}_1.
    out: Vec<Conv2d>,
    /// up_conv{l+1}{l}: from scale l+1's hidden map, up-sampled, to scale l.
    up: Vec<Conv2d>,
    /// down_conv{l}{l+1}: from scale l's hidden map at stride 2 to scale l+1.
    down: Vec<Conv2d>,
    /// γ per scale.
    gammas: Param<Tensor<1>>,
}

impl CrossConvolutions {
    /// Draws from `rng`: per scale the hidden convolution (weight, bias), then per scale the
    /// output convolution, then the up and the down convolutions.
    fn new(
        rng: &mut ChaCha8Rng,
        scales: usize,
        (c_in, c_out): (usize, usize),
        hidden: usize,
        kernel: usize,
        device: &Device,
    ) -> Self {
        let mut convs = |n: usize, shape: (usize, usize), stride| {
            (0..n).map(|_| conv(rng, shape, kernel, stride, device)).collect()
        };
        let hidden_convs = convs(scales, (c_in, hidden), 1);
        let out = convs(scales, (hidden, c_out), 1);
        let up = convs(scales - 1, (hidden, c_out), 1);
        let down = convs(scales - 1, (hidden, c_out), 2);
        CrossConvolutions {
            hidden: hidden_convs,
            out,
            up,
            down,
            gammas: Param::from_tensor(Tensor::zeros([scales], device)),
        }
    }

    fn forward(&self, inputs: Vec<Tensor<4>>) -> Vec<Tensor<4>> {
        let hidden: Vec<Tensor<4>> = inputs
            .into_iter()
            .zip(&self.hidden)
            .map(|(x, c)| leaky_relu(conv2d(c, x), LEAKY_SLOPE))
            .collect();
        let n = hidden.len();
        let gammas = self.gammas.val();
        (0..n)
            .map(|l| {
                let mut y = conv2d(&self.out[l], hidden[l].clone());
                if l + 1 < n {
                    let [_, _, h, w] = hidden[l + 1].dims();
                    let up = interpolate(
                        hidden[l + 1].clone(),
                        InterpolateOptions::new(InterpolateMode::Bilinear)
                            .with_align_corners(false)
                            .with_output_size([2 * h, 2 * w]),
                    );
                    y = y.add(conv2d(&self.up[l], up));
                }
                if l > 0 {
                    y = y.add(conv2d(&self.down[l - 1], hidden[l - 1].clone()));
                }
                y.mul(gammas.clone().narrow(0, l, 1).reshape([1, 1, 1, 1]))
            })
            .collect()
    }
}

/// One cross-scale coupling block: a fixed channel permutation per scale, then an affine coupling
/// of the first channel half (conditioned on the second through `cross2`) and of the second
/// (conditioned on the transformed first through `cross1`), at every scale together.
#[derive(Module, Debug)]
pub struct CouplingBlock {
    /// First half → scales and shifts of the second half.
    cross1: CrossConvolutions,
    /// Second half → scales and shifts of the first half.
    cross2: CrossConvolutions,
    /// Per scale: output channel i takes input channel `permutations[l][i]`.
    #[module(skip)]
    permutations: Vec<Vec<usize>>,
    #[module(skip)]
    clamp: f32,
}

/// The fixed permutations of block `block`: drawn from a generator seeded with the block's index
/// (as the official code seeds NumPy with it), one per scale in turn, so they need not be stored.
fn permutations(block: usize, channels: usize, scales: usize) -> Vec<Vec<usize>> {
    let mut rng = ChaCha8Rng::seed_from_u64(block as u64);
    (0..scales)
        .map(|_| {
            let mut p: Vec<usize> = (0..channels).collect();
            p.shuffle(&mut rng);
            p
        })
        .collect()
}

impl CouplingBlock {
    fn split(&self, x: &Tensor<4>) -> (Tensor<4>, Tensor<4>) {
        let c = x.dims()[1];
        (x.clone().narrow(1, 0, c / 2), x.clone().narrow(1, c / 2, c - c / 2))
    }

    /// clamp·0.636·atan(s/clamp).
    fn log_scale(&self, s: Tensor<4>) -> Tensor<4> {
        s.div_scalar(self.clamp).atan().mul_scalar(self.clamp * ATAN_FACTOR)
    }

    /// The affine coupling of `x` by `params` (scales then shifts along the channels) and the
    /// log-scales' sum per sample (each position's share times its weight).
    fn couple(&self, x: Tensor<4>, params: Tensor<4>, weight: Option<&Tensor<4>>) -> (Tensor<4>, Tensor<1>) {
        let [batch, c, h, w] = x.dims();
        let log_scale = self.log_scale(params.clone().narrow(1, 0, c));
        let y = x.mul(log_scale.clone().exp()).add(params.narrow(1, c, c));
        let per_position = log_scale.sum_dim(1);
        let per_position = match weight {
            Some(w) => per_position.mul(w.clone()),
            None => per_position,
        };
        (y, per_position.reshape([batch, h * w]).sum_dim(1).reshape([batch]))
    }

    fn forward(&self, xs: Vec<Tensor<4>>, weights: Option<&[Tensor<4>]>) -> (Vec<Tensor<4>>, Tensor<1>) {
        let batch = xs[0].dims()[0];
        let device = xs[0].device();
        let permuted: Vec<Tensor<4>> = xs
            .into_iter()
            .zip(&self.permutations)
            .map(|(x, p)| {
                let index: Vec<i64> = p.iter().map(|&i| i as i64).collect();
                let n = index.len();
                x.select(1, Tensor::<1, Int>::from_data(TensorData::new(index, [n]), &device))
            })
            .collect();
        let (firsts, seconds): (Vec<_>, Vec<_>) = permuted.iter().map(|x| self.split(x)).unzip();
        let mut log_det = Tensor::<1>::zeros([batch], &device);
        let weight = |l: usize| weights.map(|w| &w[l]);
        let mut new_firsts = Vec::with_capacity(firsts.len());
        for (l, (x, params)) in firsts.into_iter().zip(self.cross2.forward(seconds.clone())).enumerate() {
            let (y, d) = self.couple(x, params, weight(l));
            log_det = log_det.add(d);
            new_firsts.push(y);
        }
        let mut outputs = Vec::with_capacity(seconds.len());
        let params = self.cross1.forward(new_firsts.clone());
        for (l, ((x, params), first)) in seconds.into_iter().zip(params).zip(new_firsts).enumerate() {
            let (y, d) = self.couple(x, params, weight(l));
            log_det = log_det.add(d);
            outputs.push(Tensor::cat(vec![first, y], 1));
        }
        (outputs, log_det)
    }
}

/// CS-Flow's flow: `blocks` cross-scale coupling blocks over the features of every scale.
#[derive(Module, Debug)]
pub struct CsflowModel {
    blocks: Vec<CouplingBlock>,
}

impl CsflowModel {
    /// A fresh flow; the subnets are drawn from one generator seeded with `seed`, block after
    /// block, `cross1` before `cross2`.
    pub fn new(shape: &CsflowShape, seed: u64, device: &Device) -> Result<Self> {
        shape.check()?;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let (c1, c2) = (shape.channels / 2, shape.channels - shape.channels / 2);
        let scales = shape.sides.len();
        let blocks = (0..shape.blocks)
            .map(|b| {
                let kernel = shape.kernel_of(b);
                let cross1 =
                    CrossConvolutions::new(&mut rng, scales, (c1, 2 * c2), shape.hidden, kernel, device);
                let cross2 =
                    CrossConvolutions::new(&mut rng, scales, (c2, 2 * c1), shape.hidden, kernel, device);
                CouplingBlock {
                    cross1,
                    cross2,
                    permutations: permutations(b, shape.channels, scales),
                    clamp: shape.clamp,
                }
            })
            .collect();
        Ok(CsflowModel { blocks })
    }

    /// A flow with the learned state `bag` ([`TrainableFlow::save`]); fails naming the tensor
    /// that is missing, misshapen or left over.
    pub fn load(shape: &CsflowShape, bag: &TensorBag, device: &Device) -> Result<Self> {
        // The fresh flow only gives the structure; every tensor is replaced from the bag.
        load_module(Self::new(shape, 0, device)?, bag, "")
    }

    /// Latents per scale (without the log-determinant, for scoring).
    pub fn latents(&self, features: Vec<Tensor<4>>) -> Vec<Tensor<4>> {
        self.forward(features, None).0
    }
}

impl TrainableFlow for CsflowModel {
    /// Latents per scale and log|det J| per sample for backbone features (one [B, C, side, side]
    /// per scale, finest first). With `weights` (one [B, 1, side, side] per scale) each
    /// position's share of the log-determinant counts times its weight.
    fn forward(
        &self,
        features: Vec<Tensor<4>>,
        weights: Option<&[Tensor<4>]>,
    ) -> (Vec<Tensor<4>>, Tensor<1>) {
        let batch = features[0].dims()[0];
        let mut log_det = Tensor::<1>::zeros([batch], &features[0].device());
        let mut xs = features;
        for block in &self.blocks {
            let (ys, d) = block.forward(xs, weights);
            xs = ys;
            log_det = log_det.add(d);
        }
        (xs, log_det)
    }

    /// `blocks.{b}.cross{1,2}.{hidden,out,up,down}.{l}.{weight,bias}` and `…gammas`.
    fn save(&self, bag: &mut TensorBag) {
        let state = module_to_bag(self);
        for name in state.names() {
            let shape = state.shape(name).expect("name listed by the bag").to_vec();
            bag.put_f32(name, &shape, state.f32(name, None).expect("module tensors are f32"));
        }
    }
}

#[cfg(test)]
mod tests {
    use rand::Rng;
    use vigil_flow::testing::numerical_log_det;

    use super::*;

    fn shape(hidden: usize) -> CsflowShape {
        CsflowShape {
            channels: 3,
            sides: vec![4, 2, 1],
            blocks: 2,
            hidden,
            kernel: 3,
            last_kernel: 5,
            clamp: 3.0,
        }
    }

    fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
        t.into_data().convert::<f32>().try_into_vec::<f32>().unwrap()
    }

    /// A model far from the identity: random γs instead of zeros.
    fn perturbed(shape: &CsflowShape, seed: u64) -> CsflowModel {
        let device = Device::flex();
        let model = CsflowModel::new(shape, seed, &device).unwrap();
        let mut bag = TensorBag::new();
        model.save(&mut bag);
        let mut rng = ChaCha8Rng::seed_from_u64(seed + 100);
        let names: Vec<String> = bag.names().filter(|n| n.ends_with("gammas")).map(String::from).collect();
        for name in names {
            let n = shape.sides.len();
            bag.put_f32(&name, &[n], (0..n).map(|_| rng.gen_range(-1.5..1.5)).collect());
        }
        CsflowModel::load(shape, &bag, &device).unwrap()
    }

    fn split(flat: &[f32], shape: &CsflowShape) -> Vec<Tensor<4>> {
        let mut at = 0;
        shape
            .sides
            .iter()
            .map(|&s| {
                let n = shape.channels * s * s;
                let t = Tensor::from_data(
                    TensorData::new(flat[at..at + n].to_vec(), [1, shape.channels, s, s]),
                    &Device::flex(),
                );
                at += n;
                t
            })
            .collect()
    }

    #[test]
    fn a_fresh_flow_is_the_identity() {
        let shape = shape(8);
        let model = CsflowModel::new(&shape, 3, &Device::flex()).unwrap();
        let x: Vec<f32> = (0..shape.dimensions()).map(|i| ((i * 37) % 11) as f32 * 0.3 - 1.0).collect();
        let (z, log_det) = model.forward(split(&x, &shape), None);
        // Permuted channels, unchanged values: each scale holds the same multiset per position.
        for (l, z) in z.into_iter().enumerate() {
            let mut a = values(z);
            let mut b = values(split(&x, &shape)[l].clone());
            a.sort_by(f32::total_cmp);
            b.sort_by(f32::total_cmp);
            assert_eq!(a, b);
        }
        assert_eq!(values(log_det), vec![0.0]);
    }

    #[test]
    fn log_determinant_matches_the_numerical_jacobian() {
        let shape = shape(6);
        let model = perturbed(&shape, 1);
        let n = shape.dimensions();
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let x: Vec<f32> = (0..n).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let f = |t: Tensor<4>| {
            let flat = values(t);
            model.latents(split(&flat, &shape)).into_iter().flat_map(values).collect::<Vec<f32>>()
        };
        let numerical = numerical_log_det(f, &x, [1, 1, 1, n]);
        let (_, exact) = model.forward(split(&x, &shape), None);
        let exact = values(exact)[0] as f64;
        assert!(exact.abs() > 0.5, "the test flow should be far from volume-preserving: {exact}");
        assert!((exact - numerical).abs() < 2e-2 * exact.abs().max(1.0), "{exact} vs {numerical}");

        // Position weights: all ones is the plain log-det; zeros everywhere leave nothing.
        let ones: Vec<Tensor<4>> =
            shape.sides.iter().map(|&s| Tensor::ones([1, 1, s, s], &Device::flex())).collect();
        let (_, weighted) = model.forward(split(&x, &shape), Some(&ones));
        assert!((values(weighted)[0] as f64 - exact).abs() < 1e-4 * exact.abs());
        let zeros: Vec<Tensor<4>> =
            shape.sides.iter().map(|&s| Tensor::zeros([1, 1, s, s], &Device::flex())).collect();
        let (_, none) = model.forward(split(&x, &shape), Some(&zeros));
        assert_eq!(values(none), vec![0.0]);
    }

    #[test]
    fn state_round_trips_and_mismatches_are_refused() {
        let shape = shape(4);
        let model = perturbed(&shape, 2);
        let mut bag = TensorBag::new();
        model.save(&mut bag);
        assert_eq!(bag.shape("blocks.1.cross1.hidden.0.weight").unwrap(), &[4, 1, 5, 5]);
        assert_eq!(bag.shape("blocks.0.cross2.down.1.weight").unwrap(), &[2, 4, 3, 3]);
        assert_eq!(bag.shape("blocks.0.cross2.gammas").unwrap(), &[3]);
        let loaded = CsflowModel::load(&shape, &bag, &Device::flex()).unwrap();
        let mut again = TensorBag::new();
        loaded.save(&mut again);
        assert_eq!(bag, again);
        assert!(
            CsflowModel::load(&CsflowShape { hidden: 5, ..shape.clone() }, &bag, &Device::flex()).is_err()
        );
        assert!(
            CsflowModel::load(&CsflowShape { blocks: 1, ..shape.clone() }, &bag, &Device::flex()).is_err()
        );
        // Same seed, same flow.
        let (mut a, mut b) = (TensorBag::new(), TensorBag::new());
        CsflowModel::new(&shape, 7, &Device::flex()).unwrap().save(&mut a);
        CsflowModel::new(&shape, 7, &Device::flex()).unwrap().save(&mut b);
        assert_eq!(a, b);
        assert!(CsflowShape { sides: vec![4, 3, 1], ..shape.clone() }.check().is_err());
        assert!(CsflowShape { kernel: 4, ..shape }.check().is_err());
    }
}
