//! What CFA learns and scores with (anomalib `cfa.torch_model`): the descriptor's input built
//! from frozen backbone features, the CoordConv 1×1 descriptor, the memory bank of normal
//! centroids, the squared distances between them, the coupled-hypersphere loss and the anomaly
//! score per grid position.

use burn::module::{Module, Param};
use burn::tensor::{Device, Int, Tensor, TensorData};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use vigil_backbones::FeatureMap;
use vigil_core::{Map, Result, TensorBag, VigilError};
use vigil_nn::{tensor_from_vec, tensor_to_vec};

/// The tensor names, as anomalib's `CfaModel.state_dict()`.
const WEIGHT: &str = "descriptor.layer.conv2d.weight";
const BIAS: &str = "descriptor.layer.conv2d.bias";
const MEMORY_BANK: &str = "memory_bank";

/// The descriptor's input for one image: per position of the first layer's grid (row-major), the
/// stacked 3×3-averaged features of every layer (coarser ones up-sampled bilinearly to the grid)
/// followed by CoordConv's two coordinate channels.
#[derive(Clone, Debug, PartialEq)]
pub struct DescriptorInput {
    pub height: usize,
    pub width: usize,
    /// Feature channels + 2.
    pub channels: usize,
    /// [height · width, channels], position-major.
    pub data: Vec<f32>,
}

/// anomalib's `Descriptor` input and `AddCoords`: each layer through `avg_pool2d(3, 1, 1)` (zero
/// padding counted, so borders divide by 9), the coarser layers bilinearly resized
/// (`align_corners=False`) to the first layer's grid and concatenated after it, then the channels
/// x = 2·row/(H−1) − 1 and y = 2·column/(W−1) − 1.
pub fn descriptor_input(layers: &[FeatureMap]) -> Result<DescriptorInput> {
    let first = layers.first().ok_or_else(|| VigilError::Config("cfa: no backbone layers".into()))?;
    let (height, width) = (first.height, first.width);
    if height < 2 || width < 2 {
        return Err(VigilError::Config(format!(
            "cfa: the first layer's grid is {width}x{height}; CoordConv needs at least 2x2 (a larger input_size)"
        )));
    }
    let features: usize = layers.iter().map(|l| l.channels).sum();
    let channels = features + 2;
    let mut data = vec![0f32; height * width * channels];
    let mut offset = 0;
    for layer in layers {
        for c in 0..layer.channels {
            let plane = &layer.data[c * layer.height * layer.width..(c + 1) * layer.height * layer.width];
            let pooled = Map {
                width: layer.width,
                height: layer.height,
                data: average_3x3(plane, layer.width, layer.height),
            };
            let grid = if (layer.width, layer.height) == (width, height) {
                pooled
            } else {
                pooled.resize_bilinear(width, height)
            };
            for (p, v) in grid.data.iter().enumerate() {
                data[p * channels + offset + c] = *v;
            }
        }
        offset += layer.channels;
    }
    for row in 0..height {
        for column in 0..width {
            let p = row * width + column;
            data[p * channels + features] = 2.0 * row as f32 / (height - 1) as f32 - 1.0;
            data[p * channels + features + 1] = 2.0 * column as f32 / (width - 1) as f32 - 1.0;
        }
    }
    Ok(DescriptorInput { height, width, channels, data })
}

/// `avg_pool2d(kernel 3, stride 1, padding 1)` with PyTorch's default `count_include_pad=True`.
fn average_3x3(plane: &[f32], width: usize, height: usize) -> Vec<f32> {
    let mut out = vec![0f32; plane.len()];
    for y in 0..height {
        for x in 0..width {
            let mut sum = 0f32;
            for yy in y.saturating_sub(1)..(y + 2).min(height) {
                for xx in x.saturating_sub(1)..(x + 2).min(width) {
                    sum += plane[yy * width + xx];
                }
            }
            out[y * width + x] = sum / 9.0;
        }
    }
    out
}

/// The CoordConv 1×1 convolution: a linear map of each position's input channels.
#[derive(Module, Debug)]
pub struct Descriptor {
    /// [out, in].
    weight: Param<Tensor<2>>,
    bias: Param<Tensor<1>>,
}

impl Descriptor {
    /// PyTorch's `Conv2d` initialisation (Kaiming-uniform with a = √5, i.e. U(±1/√fan_in) for the
    /// weight and the bias), drawn from one generator seeded with `seed`.
    pub fn new(inputs: usize, outputs: usize, seed: u64, device: &Device) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let bound = 1.0 / (inputs as f32).sqrt();
        let mut draw = |n: usize| (0..n).map(|_| rng.gen_range(-bound..bound)).collect::<Vec<f32>>();
        let weight = draw(outputs * inputs);
        let bias = draw(outputs);
        Descriptor {
            weight: Param::from_tensor(tensor_from_vec(weight, [outputs, inputs], device)),
            bias: Param::from_tensor(tensor_from_vec(bias, [outputs], device)),
        }
    }

    pub fn outputs(&self) -> usize {
        self.weight.dims()[0]
    }

    /// Target-oriented features [B, positions, out] of inputs [B, positions, in].
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let [batch, _, _] = x.dims();
        let weight = self.weight.val().transpose().unsqueeze::<3>().repeat_dim(0, batch);
        x.matmul(weight).add(self.bias.val().unsqueeze::<3>())
    }

    pub fn save(&self, bag: &mut TensorBag) {
        let [outputs, inputs] = self.weight.dims();
        bag.put_f32(WEIGHT, &[outputs, inputs, 1, 1], tensor_to_vec(self.weight.val()));
        bag.put_f32(BIAS, &[outputs], tensor_to_vec(self.bias.val()));
    }

    pub fn load(bag: &TensorBag, inputs: usize, outputs: usize, device: &Device) -> Result<Self> {
        let weight = bag.f32(WEIGHT, Some(&[outputs, inputs, 1, 1]))?;
        let bias = bag.f32(BIAS, Some(&[outputs]))?;
        Ok(Descriptor {
            weight: Param::from_tensor(tensor_from_vec(weight, [outputs, inputs], device)),
            bias: Param::from_tensor(tensor_from_vec(bias, [outputs], device)),
        })
    }
}

/// The memory bank: [out channels, centroids], one centroid per grid position (`gamma_c` = 1).
#[derive(Clone, Debug, PartialEq)]
pub struct MemoryBank {
    pub channels: usize,
    pub centroids: usize,
    pub data: Vec<f32>,
}

impl MemoryBank {
    pub fn tensor(&self, device: &Device) -> Tensor<2> {
        tensor_from_vec(self.data.clone(), [self.channels, self.centroids], device)
    }

    pub fn save(&self, bag: &mut TensorBag) {
        bag.put_f32(MEMORY_BANK, &[self.channels, self.centroids], self.data.clone());
    }

    pub fn load(bag: &TensorBag, channels: usize, centroids: usize) -> Result<Self> {
        Ok(MemoryBank { channels, centroids, data: bag.f32(MEMORY_BANK, Some(&[channels, centroids]))? })
    }
}

/// anomalib's `initialize_centroid`: the running mean, batch after batch, of each batch's mean
/// target-oriented feature per position (`bank ← (bank·i + mean_b) / (i + 1)`, so a smaller last
/// batch weighs as much as the others, as there), laid out [channels, positions].
pub fn initialize_memory_bank(descriptor: &Descriptor, batches: &[Tensor<3>]) -> MemoryBank {
    let mut mean: Option<Vec<f32>> = None;
    let mut positions = 0;
    for (i, batch) in batches.iter().enumerate() {
        let [_, p, _] = batch.dims();
        positions = p;
        let batch_mean = tensor_to_vec(descriptor.forward(batch.clone()).mean_dim(0));
        mean = Some(match mean {
            None => batch_mean,
            Some(m) => m.iter().zip(&batch_mean).map(|(a, b)| (a * i as f32 + b) / (i + 1) as f32).collect(),
        });
    }
    let channels = descriptor.outputs();
    let mean = mean.unwrap_or_default();
    // [positions, channels] → [channels, positions].
    let mut data = vec![0f32; channels * positions];
    for p in 0..positions {
        for c in 0..channels {
            data[c * positions + p] = mean[p * channels + c];
        }
    }
    MemoryBank { channels, centroids: positions, data }
}

/// Squared distances [B, positions, centroids] between target-oriented features [B, positions, C]
/// and the bank's centroids [C, centroids]: ‖f‖² + ‖c‖² − 2 f·c, as anomalib computes them.
pub fn squared_distances(features: Tensor<3>, bank: Tensor<2>) -> Tensor<3> {
    let [batch, _, _] = features.dims();
    let f2 = features.clone().powi_scalar(2).sum_dim(2);
    let c2 = bank.clone().powi_scalar(2).sum_dim(0).unsqueeze::<3>();
    let fc = features.matmul(bank.unsqueeze::<3>().repeat_dim(0, batch));
    f2.add(c2).sub(fc.mul_scalar(2.0))
}

/// Per row of `values` ([rows, columns]), the columns of its `k` smallest values, nearest first.
fn nearest_columns(values: &[f32], columns: usize, k: usize) -> Vec<i64> {
    values
        .par_chunks(columns)
        .flat_map_iter(|row| {
            let mut order: Vec<usize> = (0..columns).collect();
            let by_value = |a: &usize, b: &usize| row[*a].total_cmp(&row[*b]).then(a.cmp(b));
            order.select_nth_unstable_by(k - 1, by_value);
            order.truncate(k);
            order.sort_unstable_by(by_value);
            order.into_iter().map(|c| c as i64)
        })
        .collect()
}

/// anomalib's `CfaLoss`: over each position's K + J nearest centroids, the attraction
/// mean(max(0, d_k − r²)) of the K nearest and the repulsion mean(max(0, r² − d_j − 0.1)) of the
/// J after the first J (as anomalib slices), times 1000. `kept` ([B, positions, 1], 1 or 0)
/// leaves positions an ignore mask covers out of both means.
pub fn cfa_loss(
    distances: Tensor<3>,
    kept: Tensor<3>,
    neighbors: usize,
    hard_negatives: usize,
    radius: f32,
) -> Tensor<1> {
    let [batch, positions, centroids] = distances.dims();
    let k = neighbors + hard_negatives;
    let values = tensor_to_vec(distances.clone().detach());
    let nearest = nearest_columns(&values, centroids, k);
    let indices: Tensor<3, Int> =
        Tensor::from_data(TensorData::new(nearest, [batch, positions, k]), &distances.device());
    let picked = distances.gather(2, indices);
    let r2 = radius * radius;
    let kept_positions = kept.clone().sum();
    let attraction = picked.clone().narrow(2, 0, neighbors).sub_scalar(r2).clamp_min(0.0).mul(kept.clone());
    let repulsion = picked
        .narrow(2, hard_negatives, k - hard_negatives)
        .neg()
        .add_scalar(r2 - 0.1)
        .clamp_min(0.0)
        .mul(kept);
    let attraction = attraction.sum().div(kept_positions.clone().mul_scalar(neighbors as f32));
    let repulsion = repulsion.sum().div(kept_positions.mul_scalar((k - hard_negatives) as f32));
    attraction.add(repulsion).mul_scalar(1000.0)
}

/// anomalib's `AnomalyMapGenerator.compute_score` for one image: per position the K smallest
/// distances d (square roots of the squared ones, clamped at 0 against rounding), and
/// softmin(d)₀ · d₀, as a `width`×`height` map.
pub fn position_scores(
    squared: &[f32],
    centroids: usize,
    neighbors: usize,
    width: usize,
    height: usize,
) -> Map {
    let distances: Vec<f32> = squared.iter().map(|v| v.max(0.0).sqrt()).collect();
    let nearest = nearest_columns(&distances, centroids, neighbors);
    let data = distances
        .chunks(centroids)
        .zip(nearest.chunks(neighbors))
        .map(|(row, picked)| {
            let d: Vec<f32> = picked.iter().map(|&c| row[c as usize]).collect();
            // softmin over the K nearest, its first weight: e^(−d₀) / Σ e^(−d_k), shifted by d₀.
            let total: f32 = d.iter().map(|v| (d[0] - v).exp()).sum();
            d[0] / total
        })
        .collect();
    Map { width, height, data }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device() -> Device {
        Device::flex()
    }

    #[test]
    fn descriptor_input_pools_resizes_and_adds_coordinates() {
        let fine = FeatureMap { channels: 1, height: 2, width: 3, data: vec![9.0; 6] };
        let coarse = FeatureMap { channels: 1, height: 1, width: 1, data: vec![4.5] };
        let input = descriptor_input(&[fine, coarse]).unwrap();
        assert_eq!((input.height, input.width, input.channels), (2, 3, 4));
        // Corner (0,0): 4 of 9 taps inside → 9·4/9; middle of the top row: 6 taps → 6.
        assert_eq!(input.data[0], 4.0);
        assert_eq!(input.data[4], 6.0);
        // The 1×1 coarse layer pooled to 4.5/9 and up-sampled to a constant.
        assert!(input.data.chunks(4).all(|p| p[1] == 0.5));
        // Coordinates: x by row, y by column, in [−1, 1].
        let coords: Vec<(f32, f32)> = input.data.chunks(4).map(|p| (p[2], p[3])).collect();
        assert_eq!(coords, vec![(-1.0, -1.0), (-1.0, 0.0), (-1.0, 1.0), (1.0, -1.0), (1.0, 0.0), (1.0, 1.0)]);
        assert!(
            descriptor_input(&[FeatureMap { channels: 1, height: 1, width: 4, data: vec![0.0; 4] }]).is_err()
        );
    }

    #[test]
    fn squared_distances_match_a_direct_sum() {
        let d = device();
        let features = tensor_from_vec((0..12).map(|i| i as f32 * 0.5 - 2.0).collect(), [1, 4, 3], &d);
        let bank_values: Vec<f32> = (0..6).map(|i| (i as f32 * 0.7).sin()).collect();
        let bank = tensor_from_vec(bank_values.clone(), [3, 2], &d);
        let got = tensor_to_vec(squared_distances(features.clone(), bank));
        let f = tensor_to_vec(features);
        for p in 0..4 {
            for m in 0..2 {
                let direct: f32 = (0..3).map(|c| (f[p * 3 + c] - bank_values[c * 2 + m]).powi(2)).sum();
                assert!((got[p * 2 + m] - direct).abs() < 1e-4, "{p} {m}");
            }
        }
    }

    #[test]
    fn loss_attracts_the_nearest_and_repels_the_hard_negatives() {
        let d = device();
        // One position, six centroids at squared distances 1..6; K = J = 2, r = 2 (r² = 4).
        let distances = tensor_from_vec(vec![6.0, 1.0, 5.0, 2.0, 4.0, 3.0], [1, 1, 6], &d);
        let kept = tensor_from_vec(vec![1.0], [1, 1, 1], &d);
        let loss = tensor_to_vec(cfa_loss(distances.clone(), kept.clone(), 2, 2, 2.0))[0];
        // attraction: mean(max(0, [1, 2] − 4)) = 0; repulsion over sorted[2..4] = [3, 4]:
        // mean(max(0, 4 − [3, 4] − 0.1)) = (0.9 + 0) / 2.
        assert!((loss - 1000.0 * 0.45).abs() < 1e-3, "{loss}");
        // An ignored position adds nothing.
        let two = Tensor::cat(vec![distances.clone(), distances.mul_scalar(0.0)], 1);
        let half_kept = tensor_from_vec(vec![1.0, 0.0], [1, 2, 1], &d);
        let masked = tensor_to_vec(cfa_loss(two, half_kept, 2, 2, 2.0))[0];
        assert!((masked - loss).abs() < 1e-3, "{masked} {loss}");
    }

    #[test]
    fn scores_weight_the_nearest_distance_by_its_softmin() {
        // Two positions, three centroids; K = 2.
        let squared = [4.0, 1.0, 9.0, 0.0, 16.0, 25.0];
        let map = position_scores(&squared, 3, 2, 2, 1);
        let first = 1.0 / (1.0 + (1.0f32 - 2.0).exp());
        assert!((map.data[0] - first).abs() < 1e-6);
        assert_eq!(map.data[1], 0.0);
    }

    #[test]
    fn descriptor_state_round_trips() {
        let d = device();
        let descriptor = Descriptor::new(5, 3, 7, &d);
        let mut bag = TensorBag::new();
        descriptor.save(&mut bag);
        let again = Descriptor::load(&bag, 5, 3, &d).unwrap();
        let mut bag2 = TensorBag::new();
        again.save(&mut bag2);
        assert_eq!(bag, bag2);
        assert!(Descriptor::load(&bag, 4, 3, &d).is_err());
    }
}
