//! DDAD's anomaly map pieces (`anomaly_map.py`): 3x3 patch means of feature maps, the cosine
//! distance over channels, corner-aligned bilinear up-sampling, and the pixel/feature mix.

use vigil_backbones::FeatureMap;

/// `patchify`: the mean of each 3x3 neighbourhood (stride 1), zero padding counted in the mean
/// (PyTorch's `Unfold(kernel 3, padding 1)` followed by a mean over the 9 values).
pub fn patch_mean(map: &FeatureMap) -> Vec<f32> {
    let (h, w) = (map.height, map.width);
    let mut out = vec![0.0f32; map.data.len()];
    for (plane, target) in map.data.chunks(h * w).zip(out.chunks_mut(h * w)) {
        for y in 0..h {
            for x in 0..w {
                let mut sum = 0.0;
                for yy in y.saturating_sub(1)..(y + 2).min(h) {
                    for xx in x.saturating_sub(1)..(x + 2).min(w) {
                        sum += plane[yy * w + xx];
                    }
                }
                target[y * w + x] = sum / 9.0;
            }
        }
    }
    out
}

/// `1 − F.cosine_similarity(a, b)` over the channels of two planar `[channels, h, w]` maps (norms
/// clamped at 1e-8 as PyTorch does).
pub fn cosine_distance(a: &[f32], b: &[f32], channels: usize) -> Vec<f32> {
    let plane = a.len() / channels;
    (0..plane)
        .map(|p| {
            let (mut dot, mut na, mut nb) = (0.0f64, 0.0f64, 0.0f64);
            for c in 0..channels {
                let (x, y) = (a[c * plane + p] as f64, b[c * plane + p] as f64);
                dot += x * y;
                na += x * x;
                nb += y * y;
            }
            (1.0 - dot / (na.sqrt().max(1e-8) * nb.sqrt().max(1e-8))) as f32
        })
        .collect()
}

/// Bilinear up-sampling of an `h x w` map to `size x size` with corner alignment
/// (`F.interpolate(mode="bilinear", align_corners=True)`).
pub fn upsample_align_corners(map: &[f32], h: usize, w: usize, size: usize) -> Vec<f32> {
    let coordinate = |i: usize, n: usize| -> (usize, usize, f32) {
        if n == 1 || size == 1 {
            return (0, 0, 0.0);
        }
        let position = i as f32 * (n - 1) as f32 / (size - 1) as f32;
        let low = (position.floor() as usize).min(n - 1);
        let high = (low + 1).min(n - 1);
        (low, high, position - low as f32)
    };
    let mut out = Vec::with_capacity(size * size);
    for y in 0..size {
        let (y0, y1, fy) = coordinate(y, h);
        for x in 0..size {
            let (x0, x1, fx) = coordinate(x, w);
            let top = map[y0 * w + x0] * (1.0 - fx) + map[y0 * w + x1] * fx;
            let bottom = map[y1 * w + x0] * (1.0 - fx) + map[y1 * w + x1] * fx;
            out.push(top * (1.0 - fy) + bottom * fy);
        }
    }
    out
}

/// `f_d + v · (max f_d / max i_d) · i_d`: the pixel distance rescaled to the feature distance's
/// range, then weighted by v. The maxima are this image's (the reference takes them over its
/// test batch, which makes a score depend on the other images in the batch).
pub fn combine_distances(feature: &[f32], pixel: &[f32], v: f32) -> Vec<f32> {
    let max_feature = feature.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let max_pixel = pixel.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    // A perfect reconstruction (max i_d = 0) leaves the feature distance alone instead of 0/0.
    let scale = if max_pixel > 0.0 { v * max_feature / max_pixel } else { 0.0 };
    feature.iter().zip(pixel).map(|(f, p)| f + scale * p).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patch_mean_counts_the_zero_padding() {
        let map = FeatureMap { channels: 1, height: 3, width: 3, data: vec![9.0; 9] };
        let m = patch_mean(&map);
        // Corner: 4 of 9 values inside, edge 6, centre 9.
        assert_eq!(m, vec![4.0, 6.0, 4.0, 6.0, 9.0, 6.0, 4.0, 6.0, 4.0]);
    }

    #[test]
    fn cosine_distance_per_pixel() {
        // Two pixels, two channels: identical directions, then orthogonal ones.
        let a = [1.0, 1.0, 0.0, 0.0];
        let b = [2.0, 0.0, 0.0, 3.0];
        let d = cosine_distance(&a, &b, 2);
        assert!(d[0].abs() < 1e-7 && (d[1] - 1.0).abs() < 1e-7, "{d:?}");
        // A zero vector: cosine 0, distance 1 (no division by zero).
        assert_eq!(cosine_distance(&[0.0, 0.0], &[1.0, 1.0], 2), vec![1.0]);
    }

    #[test]
    fn corner_aligned_upsampling_keeps_the_corners() {
        let up = upsample_align_corners(&[0.0, 1.0, 2.0, 3.0], 2, 2, 3);
        assert_eq!(up, vec![0.0, 0.5, 1.0, 1.0, 1.5, 2.0, 2.0, 2.5, 3.0]);
        assert_eq!(upsample_align_corners(&[5.0], 1, 1, 2), vec![5.0; 4]);
    }

    #[test]
    fn pixel_distance_is_rescaled_to_the_feature_range() {
        let combined = combine_distances(&[0.5, 1.0], &[2.0, 4.0], 1.0);
        // scale = 1 · 1.0 / 4.0: [0.5 + 0.5, 1.0 + 1.0].
        assert_eq!(combined, vec![1.0, 2.0]);
        assert_eq!(combine_distances(&[0.5, 1.0], &[0.0, 0.0], 1.0), vec![0.5, 1.0]);
        assert_eq!(combine_distances(&[0.5, 1.0], &[2.0, 4.0], 0.0), vec![0.5, 1.0]);
    }
}
