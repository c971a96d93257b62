//! Sliding-mask reconstruction: the s × s family of complementary masks, each removed patch
//! reconstructed from its visible neighbours, the composite image from the removed patches of
//! each pass, and the optional half-patch shifted grid.

use burn::tensor::Device;
use vigil_core::{Result, VigilError};
use vigil_nn::{tensor_from_vec, tensor_to_vec};

use crate::model::{unpatchify, Mae, MaeArch, MaskPlan};

/// The `stride`² complementary masks over a `grid` × `grid` patch grid (`true` = removed), pass
/// k = a · stride + b removing the patches (i, j) with i mod stride = a and j mod stride = b.
/// Every patch is removed by exactly one pass; with stride 2 each removed patch has all its
/// (up to 8) neighbours visible.
pub fn sliding_masks(grid: usize, stride: usize) -> Vec<Vec<bool>> {
    (0..stride * stride)
        .map(|k| {
            let (a, b) = (k / stride, k % stride);
            (0..grid * grid).map(|p| (p / grid) % stride == a && (p % grid) % stride == b).collect()
        })
        .collect()
}

/// Per-patch mean and deviation (unbiased variance + 1e-6, as the normalised-pixel target) of
/// one image's patchified values.
fn patch_statistics(patch: &[f32]) -> (f32, f32) {
    let n = patch.len() as f32;
    let mean = patch.iter().sum::<f32>() / n;
    let var = patch.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / (n - 1.0).max(1.0);
    (mean, (var + 1e-6).sqrt())
}

/// One image's `[3, side, side]` values as the official patchify orders them: per patch (row,
/// column, channel).
fn patchify_one(image: &[f32], grid: usize, patch: usize) -> Vec<f32> {
    let side = grid * patch;
    let mut out = Vec::with_capacity(image.len());
    for gy in 0..grid {
        for gx in 0..grid {
            for py in 0..patch {
                for px in 0..patch {
                    for c in 0..3 {
                        out.push(image[(c * side + gy * patch + py) * side + gx * patch + px]);
                    }
                }
            }
        }
    }
    out
}

/// The composite reconstruction of normalised `[3, side, side]` images: for every pass of the
/// sliding family, the network's prediction of the removed patches. With `norm_pix` the
/// network predicts normalised patches, mapped back with each input patch's mean and deviation.
pub fn reconstruct(
    mae: &Mae,
    arch: &MaeArch,
    images: &[Vec<f32>],
    stride: usize,
    norm_pix: bool,
) -> Result<Vec<Vec<f32>>> {
    let (grid, patch, side) = (arch.grid(), arch.patch_size, arch.image_size);
    let per_image = 3 * side * side;
    if let Some(i) = images.iter().position(|x| x.len() != per_image) {
        return Err(VigilError::invalid(format!("mae: image {i} is not 3 x {side} x {side}")));
    }
    let n = images.len();
    let values = arch.patch_values();
    let device = Device::flex();
    let x = tensor_from_vec(images.concat(), [n, 3, side, side], &device);
    let patched: Vec<Vec<f32>> = images.iter().map(|x| patchify_one(x, grid, patch)).collect();
    let mut composite: Vec<Vec<f32>> = vec![vec![0f32; grid * grid * values]; n];
    for removed in sliding_masks(grid, stride) {
        let plan = MaskPlan::from_removed(&removed, n);
        let pred = tensor_to_vec(mae.forward(x.clone(), &plan));
        for (i, out) in composite.iter_mut().enumerate() {
            for (p, &r) in removed.iter().enumerate() {
                if !r {
                    continue;
                }
                let src = &pred[(i * grid * grid + p) * values..(i * grid * grid + p + 1) * values];
                let dst = &mut out[p * values..(p + 1) * values];
                if norm_pix {
                    let (mean, std) = patch_statistics(&patched[i][p * values..(p + 1) * values]);
                    dst.iter_mut().zip(src).for_each(|(d, s)| *d = s * std + mean);
                } else {
                    dst.copy_from_slice(src);
                }
            }
        }
    }
    Ok(composite.iter().map(|c| unpatchify(c, grid, patch)).collect())
}

/// Half-sample mirror index (scipy's "reflect").
fn mirror(i: isize, n: usize) -> usize {
    let n = n as isize;
    let period = 2 * n;
    let m = i.rem_euclid(period);
    (if m < n { m } else { period - 1 - m }) as usize
}

/// `image` moved by (d, d) pixels towards the bottom right, mirrored at the top-left border.
fn shift(image: &[f32], side: usize, d: usize) -> Vec<f32> {
    let mut out = vec![0f32; image.len()];
    for c in 0..3 {
        for y in 0..side {
            let sy = mirror(y as isize - d as isize, side);
            for x in 0..side {
                let sx = mirror(x as isize - d as isize, side);
                out[(c * side + y) * side + x] = image[(c * side + sy) * side + sx];
            }
        }
    }
    out
}

/// [`reconstruct`], optionally averaged with the reconstruction on the grid shifted by half a
/// patch (where the shifted image covers the pixel; the unshifted one alone elsewhere).
pub fn reconstruct_all(
    mae: &Mae,
    arch: &MaeArch,
    images: &[Vec<f32>],
    stride: usize,
    norm_pix: bool,
    shifted: bool,
) -> Result<Vec<Vec<f32>>> {
    let mut out = reconstruct(mae, arch, images, stride, norm_pix)?;
    if !shifted {
        return Ok(out);
    }
    let (side, d) = (arch.image_size, arch.patch_size / 2);
    let moved: Vec<Vec<f32>> = images.iter().map(|x| shift(x, side, d)).collect();
    let moved_back = reconstruct(mae, arch, &moved, stride, norm_pix)?;
    for (o, m) in out.iter_mut().zip(&moved_back) {
        for c in 0..3 {
            for y in 0..side - d {
                for x in 0..side - d {
                    let i = (c * side + y) * side + x;
                    o[i] = 0.5 * (o[i] + m[(c * side + y + d) * side + x + d]);
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_four_sliding_masks_are_complementary_with_visible_neighbours() {
        for grid in [4, 7, 14] {
            let masks = sliding_masks(grid, 2);
            assert_eq!(masks.len(), 4);
            // Each patch removed by exactly one pass.
            for p in 0..grid * grid {
                assert_eq!(masks.iter().filter(|m| m[p]).count(), 1, "patch {p} of grid {grid}");
            }
            for m in &masks {
                for p in (0..grid * grid).filter(|&p| m[p]) {
                    let (i, j) = ((p / grid) as isize, (p % grid) as isize);
                    for (di, dj) in [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)] {
                        let (y, x) = (i + di, j + dj);
                        if (0..grid as isize).contains(&y) && (0..grid as isize).contains(&x) {
                            assert!(!m[y as usize * grid + x as usize], "neighbour of {p} hidden too");
                        }
                    }
                }
            }
        }
        // 14 x 14 (ViT at 224 px): 49 patches removed by each pass.
        assert!(sliding_masks(14, 2).iter().all(|m| m.iter().filter(|&&r| r).count() == 49));
        // A stride of 3: nine passes, still a partition.
        let nine = sliding_masks(6, 3);
        assert_eq!(nine.len(), 9);
        assert!((0..36).all(|p| nine.iter().filter(|m| m[p]).count() == 1));
    }

    #[test]
    fn shift_mirrors_and_patch_statistics_match_their_definitions() {
        let image: Vec<f32> = (0..3 * 4 * 4).map(|v| v as f32).collect();
        let moved = shift(&image, 4, 1);
        assert_eq!(&moved[..4], &[0.0, 0.0, 1.0, 2.0]);
        assert_eq!(moved[4 * 4 + 5], 16.0 + 0.0);
        assert_eq!(moved[5], 0.0);
        let (mean, std) = patch_statistics(&[1.0, 3.0]);
        assert_eq!(mean, 2.0);
        assert!((std - (2.0f32 + 1e-6).sqrt()).abs() < 1e-6);
    }
}
