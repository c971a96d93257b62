//! Locally aware patch features: each layer averaged over a p×p neighbourhood, deeper layers
//! up-sampled to the first layer's grid, channels concatenated, optionally pooled to a fixed size.

use rayon::prelude::*;
use vigil_backbones::FeatureMap;
use vigil_core::image::BilinearResampler;
use vigil_core::{Map, Result, VigilError};

/// One image's patch features: `rows` holds `width·height` rows of `dim` values, row-major by
/// grid position (y, then x).
#[derive(Clone, Debug, PartialEq)]
pub struct PatchGrid {
    pub width: usize,
    pub height: usize,
    pub dim: usize,
    pub rows: Vec<f32>,
}

/// Builds the patch features of one image from its layer maps (first layer sets the grid).
///
/// The neighbourhood average is PyTorch's `avg_pool2d(k, stride 1, padding k/2)` with padding
/// counted (the reference code's default), and up-sampling is bilinear with half-pixel centres.
/// `target_dim` applies the paper's adaptive average pooling along the concatenated vector.
pub fn patch_grid(maps: &[FeatureMap], neighbourhood: usize, target_dim: Option<usize>) -> Result<PatchGrid> {
    let first = maps.first().ok_or_else(|| VigilError::invalid("PatchCore: no feature maps"))?;
    let (width, height) = (first.width, first.height);
    let dim: usize = maps.iter().map(|m| m.channels).sum();
    let plane = width * height;
    // (layer, channel) pairs in concatenation order, each pooled and resampled independently
    let channels: Vec<(&FeatureMap, usize)> =
        maps.iter().flat_map(|m| (0..m.channels).map(move |c| (m, c))).collect();
    let resamplers: Vec<BilinearResampler> =
        maps.iter().map(|m| BilinearResampler::new((m.width, m.height), (width, height))).collect();
    let layer_of =
        |map: &FeatureMap| maps.iter().position(|m| std::ptr::eq(m, map)).expect("map of this list");
    let planes: Vec<Vec<f32>> = channels
        .par_iter()
        .map(|&(map, c)| {
            let layer = Map { width: map.width, height: map.height, data: map.plane(c).to_vec() };
            let pooled = if neighbourhood > 1 { layer.mean_filter(neighbourhood).data } else { layer.data };
            if (map.width, map.height) == (width, height) {
                pooled
            } else {
                let mut resized = vec![0.0; plane];
                resamplers[layer_of(map)].resample(&pooled, &mut resized);
                resized
            }
        })
        .collect();
    if let Some((c, v)) =
        planes.iter().enumerate().find_map(|(c, p)| p.iter().find(|v| !v.is_finite()).map(|v| (c, *v)))
    {
        return Err(VigilError::invalid(format!(
            "PatchCore: backbone feature {v} at channel {c} is not finite"
        )));
    }
    let mut rows = vec![0f32; plane * dim];
    for (pos, row) in rows.chunks_exact_mut(dim).enumerate() {
        row.iter_mut().zip(&planes).for_each(|(v, p)| *v = p[pos]);
    }
    match target_dim {
        Some(t) if t != dim => {
            let pooled = rows.chunks_exact(dim).flat_map(|r| adaptive_avg_pool(r, t)).collect();
            Ok(PatchGrid { width, height, dim: t, rows: pooled })
        }
        _ => Ok(PatchGrid { width, height, dim, rows }),
    }
}

/// PyTorch's `adaptive_avg_pool1d`: output i averages inputs floor(i·n/t) .. ceil((i+1)·n/t).
fn adaptive_avg_pool(values: &[f32], t: usize) -> Vec<f32> {
    let n = values.len();
    (0..t)
        .map(|i| {
            let (start, end) = (i * n / t, ((i + 1) * n).div_ceil(t));
            values[start..end].iter().sum::<f32>() / (end - start) as f32
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feature_map(
        channels: usize,
        height: usize,
        width: usize,
        f: impl Fn(usize, usize, usize) -> f32,
    ) -> FeatureMap {
        let mut data = Vec::new();
        for c in 0..channels {
            for y in 0..height {
                for x in 0..width {
                    data.push(f(c, y, x));
                }
            }
        }
        FeatureMap { channels, height, width, data }
    }

    #[test]
    fn neighbourhood_average_counts_padding_and_deeper_layers_are_upsampled() {
        let fine = feature_map(1, 4, 4, |_, y, x| if (y, x) == (1, 1) { 9.0 } else { 0.0 });
        let coarse = feature_map(2, 2, 2, |c, _, _| c as f32 + 1.0);
        let g = patch_grid(&[fine, coarse], 3, None).unwrap();
        assert_eq!((g.width, g.height, g.dim), (4, 4, 3));
        // every cell of the 3x3 window around (1,1) sees the 9 once: 9/9
        for (y, x) in [(0, 0), (2, 2), (0, 2)] {
            assert!((g.rows[(y * 4 + x) * 3] - 1.0).abs() < 1e-6);
        }
        assert_eq!(g.rows[(3 * 4 + 3) * 3], 0.0);
        // every window of a constant 2x2 map holds 4 of its 9 cells inside (padding counted),
        // and up-sampling a constant keeps it
        assert!(g
            .rows
            .chunks_exact(3)
            .all(|r| (r[1] - 4.0 / 9.0).abs() < 1e-5 && (r[2] - 8.0 / 9.0).abs() < 1e-5));
    }

    #[test]
    fn adaptive_pooling_matches_pytorch_bins() {
        // torch: F.adaptive_avg_pool1d(arange(5.), 3) = [0.5, 2.0, 3.5]
        assert_eq!(adaptive_avg_pool(&[0.0, 1.0, 2.0, 3.0, 4.0], 3), vec![0.5, 2.0, 3.5]);
        let m = feature_map(6, 1, 1, |c, _, _| c as f32);
        let g = patch_grid(&[m], 1, Some(2)).unwrap();
        assert_eq!((g.dim, g.rows.clone()), (2, vec![1.0, 4.0]));
    }

    #[test]
    fn non_finite_features_are_an_error() {
        let m = feature_map(1, 2, 2, |_, y, _| if y == 1 { f32::NAN } else { 0.0 });
        assert!(patch_grid(&[m], 1, None).is_err());
    }
}
