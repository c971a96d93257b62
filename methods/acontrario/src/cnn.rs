//! CNN features for the a contrario detector: the thesis' "ResNet feature maps" variant (Sec. 3.3.2),
//! the one the author's code (`nfa_anomaly_detection`, `detection.py`) implements.
//!
//! The image is resized to the network input (256×256 in the reference), reflect-padded by an eighth
//! of its side so the features near the border see image content, run through a pretrained backbone
//! up to a stride-4 layer, and the padding is cropped again from the feature map. The features are
//! decorrelated by PCA (35 components in the reference), and each component's squared standardised
//! value is a χ²(1) distance map on the feature grid.

use nalgebra::{DMatrix, SymmetricEigen};
use vigil_backbones::{Backbone, BackboneKind};
use vigil_core::image::resize_plane_bilinear;
use vigil_core::{Image, Mask, Result, VigilError};

/// The layers tapped by default. ResNet-50 (and WRN-50-2, the same structure) tap what the
/// reference taps: `layer1[0].conv3` before its batch norm, residual and ReLU (256 channels,
/// stride 4). The others take their stride-4 features closest to it: `layer1` for ResNet-18;
/// MobileNetV2 and EfficientNet-Lite0 have only 24 channels at stride 4 per layer, fewer than
/// the 35 components, so their two stride-4 blocks are concatenated (48 channels); EfficientNet-B5's
/// last stride-4 block alone has 40.
pub fn default_layers(kind: BackboneKind) -> Vec<String> {
    let names: &[&str] = match kind {
        BackboneKind::MobileNetV2 => &["features.2", "features.3"],
        BackboneKind::EfficientNetLite0 => &["_blocks.1", "_blocks.2"],
        BackboneKind::EfficientNetB5 => &["features.2.4"],
        BackboneKind::ResNet18 => &["layer1"],
        BackboneKind::ResNet50 | BackboneKind::WideResNet50 => &["layer1.0.conv3"],
    };
    names.iter().map(|s| s.to_string()).collect()
}

/// One image's features on the finest tapped grid, pixel-major (`data[p * channels + c]`).
#[derive(Clone, Debug)]
pub struct FeatureGrid {
    pub width: usize,
    pub height: usize,
    pub channels: usize,
    /// Input pixels per grid cell along each axis.
    pub stride: usize,
    pub data: Vec<f64>,
    /// Cells touching an ignored input pixel.
    pub ignore: Option<Vec<bool>>,
}

/// Runs `image`, resized to `input` (width, height), through `backbone` and returns the `layers`
/// concatenated on the finest layer's grid (coarser layers up-sampled bilinearly).
pub fn extract(
    backbone: &Backbone,
    layers: &[String],
    image: &Image,
    input: (usize, usize),
    ignore: Option<&Mask>,
) -> Result<FeatureGrid> {
    let (width, height) = input;
    let infos: Vec<(usize, usize)> = layers.iter().map(|l| backbone.layer_info(l)).collect::<Result<_>>()?;
    let stride = infos.iter().map(|i| i.1).min().ok_or_else(|| VigilError::Config("no CNN layers".into()))?;
    let coarsest = infos.iter().map(|i| i.1).max().unwrap_or(stride);
    if width.min(height) < 2 * coarsest {
        return Err(VigilError::invalid(format!(
            "the CNN input {width}x{height} is too small for layers of stride {coarsest}"
        )));
    }
    // The reference pads by input/8 pixels (32 at 256, cropped as 8 cells at stride 4); rounded
    // down to whole cells of the coarsest layer so every layer crops exactly.
    let pad = width.min(height) / 8 / coarsest * coarsest;
    let resized = if (image.width, image.height) == input {
        image.clone()
    } else {
        image.resize_bilinear(width, height)
    };
    let padded = reflect_pad(&resized, pad);
    let maps = backbone
        .extract(std::slice::from_ref(&padded), layers, (width + 2 * pad, height + 2 * pad))?
        .pop()
        .ok_or_else(|| VigilError::Model("the backbone returned no features".into()))?;
    let (gw, gh) = (width.div_ceil(stride), height.div_ceil(stride));
    let channels: usize = maps.iter().map(|m| m.channels).sum();
    let mut data = vec![0f64; gw * gh * channels];
    let mut offset = 0;
    for (map, &(_, layer_stride)) in maps.iter().zip(&infos) {
        let crop = pad / layer_stride;
        let (lw, lh) = (width.div_ceil(layer_stride), height.div_ceil(layer_stride));
        if map.width < lw + 2 * crop || map.height < lh + 2 * crop {
            return Err(VigilError::Model(format!(
                "layer gave a {}x{} map, expected at least {}x{}",
                map.width,
                map.height,
                lw + 2 * crop,
                lh + 2 * crop
            )));
        }
        for c in 0..map.channels {
            let plane = map.plane(c);
            let cropped: Vec<f32> =
                (0..lh).flat_map(|y| plane[(y + crop) * map.width + crop..][..lw].iter().copied()).collect();
            let on_grid =
                if (lw, lh) == (gw, gh) { cropped } else { resize_plane_bilinear(&cropped, lw, lh, gw, gh) };
            for (p, v) in on_grid.iter().enumerate() {
                data[p * channels + offset + c] = *v as f64;
            }
        }
        offset += map.channels;
    }
    let ignore = ignore.map(|m| {
        let m = m.resize_nearest(width, height);
        let mut cells = vec![false; gw * gh];
        for y in 0..height {
            for x in 0..width {
                if m.data[y * width + x] {
                    cells[(y / stride) * gw + x / stride] = true;
                }
            }
        }
        cells
    });
    Ok(FeatureGrid { width: gw, height: gh, channels, stride, data, ignore })
}

/// Reflect padding (PyTorch `mode="reflect"`: the edge pixel is not repeated).
fn reflect_pad(image: &Image, pad: usize) -> Image {
    if pad == 0 {
        return image.clone();
    }
    let (w, h) = (image.width, image.height);
    let (pw, ph) = (w + 2 * pad, h + 2 * pad);
    let reflect = |i: isize, n: usize| -> usize {
        let n = n as isize;
        let period = 2 * (n - 1).max(1);
        let m = i.rem_euclid(period);
        (if m < n { m } else { period - m }) as usize
    };
    let mut data = Vec::with_capacity(pw * ph * image.channels);
    for c in 0..image.channels {
        let plane = image.channel(c);
        for y in 0..ph {
            let sy = reflect(y as isize - pad as isize, h);
            for x in 0..pw {
                data.push(plane[sy * w + reflect(x as isize - pad as isize, w)]);
            }
        }
    }
    Image { width: pw, height: ph, channels: image.channels, bit_depth: image.bit_depth, data }
}

/// Running first and second moments of feature vectors (cells flagged ignored are left out).
#[derive(Clone, Debug)]
pub struct FeatureMoments {
    pub count: f64,
    pub sum: Vec<f64>,
    /// Σ x xᵀ, channels × channels.
    pub outer: DMatrix<f64>,
}

/// The retained principal directions of the features and the variance of each projection.
#[derive(Clone, Debug, PartialEq)]
pub struct FeaturePca {
    pub mean: Vec<f64>,
    /// m rows of `channels` weights.
    pub basis: Vec<Vec<f64>>,
    /// Unbiased variance of each projection (the eigenvalues, as scikit-learn's PCA reports them).
    pub variances: Vec<f64>,
}

impl FeatureMoments {
    pub fn new(channels: usize) -> Self {
        FeatureMoments { count: 0.0, sum: vec![0.0; channels], outer: DMatrix::zeros(channels, channels) }
    }

    pub fn add(&mut self, grid: &FeatureGrid) -> Result<()> {
        let c = grid.channels;
        if c != self.sum.len() {
            return Err(VigilError::invalid(format!(
                "features have {c} channels, earlier ones had {}",
                self.sum.len()
            )));
        }
        let kept: Vec<usize> =
            (0..grid.width * grid.height).filter(|&p| !grid.ignore.as_ref().is_some_and(|m| m[p])).collect();
        let rows = DMatrix::from_fn(kept.len(), c, |r, j| grid.data[kept[r] * c + j]);
        for (s, col) in self.sum.iter_mut().zip(rows.column_iter()) {
            *s += col.sum();
        }
        self.outer += rows.tr_mul(&rows);
        self.count += kept.len() as f64;
        Ok(())
    }

    /// The `components` leading principal directions (fewer if there are fewer channels).
    pub fn pca(&self, components: usize) -> Result<FeaturePca> {
        if self.count < 2.0 {
            return Err(VigilError::invalid(
                "CNN feature statistics need at least two cells outside the ignore mask",
            ));
        }
        let n = self.count;
        let mean: Vec<f64> = self.sum.iter().map(|s| s / n).collect();
        let c = mean.len();
        let covariance =
            DMatrix::from_fn(c, c, |i, j| (self.outer[(i, j)] - n * mean[i] * mean[j]) / (n - 1.0));
        let eigen = SymmetricEigen::new(covariance);
        let mut order: Vec<usize> = (0..c).collect();
        order.sort_by(|&a, &b| eigen.eigenvalues[b].total_cmp(&eigen.eigenvalues[a]));
        order.truncate(components.min(c));
        Ok(FeaturePca {
            mean,
            basis: order.iter().map(|&k| eigen.eigenvectors.column(k).iter().copied().collect()).collect(),
            variances: order.iter().map(|&k| eigen.eigenvalues[k].max(0.0)).collect(),
        })
    }
}

impl FeaturePca {
    /// Per component, the map of (y − μ)² / σ² on the grid: χ²(1) under the null hypothesis. The
    /// projections of the fitted samples have mean 0 and variance `variances`, so μ = 0 and σ² is
    /// the eigenvalue, as the reference code's standardisation of each PCA component gives.
    pub fn distances(&self, grid: &FeatureGrid) -> Result<Vec<Vec<f64>>> {
        let c = grid.channels;
        if c != self.mean.len() {
            return Err(VigilError::invalid(format!(
                "features have {c} channels, the model was fitted on {}",
                self.mean.len()
            )));
        }
        let inverse = crate::inverse_variances(&self.variances);
        let n = grid.width * grid.height;
        let centred = DMatrix::from_fn(n, c, |p, j| grid.data[p * c + j] - self.mean[j]);
        let basis = DMatrix::from_fn(c, self.basis.len(), |j, k| self.basis[k][j]);
        let projected = centred * basis;
        Ok((0..self.basis.len())
            .map(|k| projected.column(k).iter().map(|y| y * y * inverse[k]).collect())
            .collect())
    }
}

/// Bicubic up-sampling with corner pixels aligned (PyTorch `mode="bicubic", align_corners=True`,
/// cubic coefficient −0.75, border samples clamped), as the reference up-samples the distances.
pub fn resize_bicubic_aligned(src: &[f64], sw: usize, sh: usize, dw: usize, dh: usize) -> Vec<f64> {
    const A: f64 = -0.75;
    let near = |x: f64| ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0;
    let far = |x: f64| ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A;
    let taps = |dst: usize, src_len: usize| -> Vec<([usize; 4], [f64; 4])> {
        let scale = if dst > 1 { (src_len - 1) as f64 / (dst - 1) as f64 } else { 0.0 };
        (0..dst)
            .map(|i| {
                let real = scale * i as f64;
                let base = real.floor();
                let t = real - base;
                let at = |o: isize| (base as isize + o).clamp(0, src_len as isize - 1) as usize;
                ([at(-1), at(0), at(1), at(2)], [far(t + 1.0), near(t), near(1.0 - t), far(2.0 - t)])
            })
            .collect()
    };
    let (xs, ys) = (taps(dw, sw), taps(dh, sh));
    // rows first: sh × dw, then columns
    let mut rows = vec![0f64; sh * dw];
    for y in 0..sh {
        for (x, (ix, wx)) in xs.iter().enumerate() {
            rows[y * dw + x] = (0..4).map(|k| src[y * sw + ix[k]] * wx[k]).sum();
        }
    }
    let mut out = vec![0f64; dw * dh];
    for (y, (iy, wy)) in ys.iter().enumerate() {
        for x in 0..dw {
            out[y * dw + x] = (0..4).map(|k| rows[iy[k] * dw + x] * wy[k]).sum();
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bicubic_matches_pytorch() {
        // torch.nn.functional.interpolate(torch.tensor([[[[0., 1.], [2., 4.]]]]), size=(3, 4),
        //                                 mode="bicubic", align_corners=True)
        let got = resize_bicubic_aligned(&[0.0, 1.0, 2.0, 4.0], 2, 2, 4, 3);
        let want = [
            0.0, 0.31481463, 0.68518513, 1.0, 1.0, 1.4722216, 2.0277779, 2.5, 2.0, 2.6296287, 3.3703706, 4.0,
        ];
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-6, "{got:?}");
        }
    }

    #[test]
    fn reflect_padding_does_not_repeat_the_edge() {
        // torch.nn.functional.pad(x, (2, 2, 2, 2), mode="reflect") on a 3x3 ramp
        let image = Image::new(3, 3, 1, vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0]).unwrap();
        let padded = reflect_pad(&image, 2);
        assert_eq!((padded.width, padded.height), (7, 7));
        assert_eq!(&padded.data[..7], &[9.0, 8.0, 7.0, 8.0, 9.0, 8.0, 7.0]);
        assert_eq!(&padded.data[14..21], &[3.0, 2.0, 1.0, 2.0, 3.0, 2.0, 1.0]);
    }

    #[test]
    fn pca_distances_are_standardised_projections() {
        // two perfectly correlated channels plus an independent one
        let n = 400;
        let data: Vec<f64> = (0..n)
            .flat_map(|i| {
                let a = ((i * 37) % 101) as f64 / 101.0;
                let b = ((i * 53) % 97) as f64 / 97.0;
                [a, 2.0 * a, b]
            })
            .collect();
        let grid = FeatureGrid { width: 20, height: 20, channels: 3, stride: 4, data, ignore: None };
        let mut moments = FeatureMoments::new(3);
        moments.add(&grid).unwrap();
        let pca = moments.pca(2).unwrap();
        assert_eq!(pca.basis.len(), 2);
        let d = pca.distances(&grid).unwrap();
        for component in &d {
            // the mean of (y/σ)² over the fitted samples is (n − 1)/n with the unbiased variance
            let mean = component.iter().sum::<f64>() / n as f64;
            assert!((mean - (n as f64 - 1.0) / n as f64).abs() < 1e-9, "{mean}");
        }
        assert!(moments.pca(5).unwrap().basis.len() == 3, "at most as many components as channels");
        // a cell flagged ignored is left out of the moments
        let mut ignore = vec![false; n];
        ignore[0] = true;
        let mut partial = FeatureMoments::new(3);
        partial.add(&FeatureGrid { ignore: Some(ignore), ..grid }).unwrap();
        assert_eq!(partial.count, (n - 1) as f64);
    }
}
