//! Patch PCA: first and second moments of all s×s patches of a plane, and the principal filters.
//!
//! The covariance of 17×17 patches is a 289×289 matrix; summing outer products of every patch
//! costs 289²/2 multiply-adds per pixel. Instead, entry (a, b) is Σ_p P(p+a)·P(p+b), a windowed
//! autocorrelation at lag b − a, so one product image and its integral image per lag give every
//! entry with that lag by rectangle lookups: about s²·2 passes over the plane in total. Pixels
//! excluded by an ignore mask are then removed (or, when most are excluded, the kept ones are
//! summed) explicitly, which keeps the moments exact.

use nalgebra::{DMatrix, SymmetricEigen};
use vigil_core::{Result, VigilError};

use crate::fft::PaddedPlane;

/// Running sums of patch vectors over any number of planes.
#[derive(Clone, Debug)]
pub struct PatchMoments {
    pub size: usize,
    pub count: f64,
    pub sum: Vec<f64>,
    /// Upper triangle (and diagonal) of Σ x xᵀ, row-major n×n.
    pub outer: Vec<f64>,
}

/// The retained principal directions and the statistics of their projections.
#[derive(Clone, Debug, PartialEq)]
pub struct PatchPca {
    pub size: usize,
    /// m rows of n = size² filter taps.
    pub basis: Vec<Vec<f64>>,
    /// Mean patch (n values).
    pub mean_patch: Vec<f64>,
    /// Variance of each projection (the eigenvalues).
    pub variances: Vec<f64>,
}

impl PatchMoments {
    pub fn new(size: usize) -> Self {
        let n = size * size;
        PatchMoments { size, count: 0.0, sum: vec![0.0; n], outer: vec![0.0; n * n] }
    }

    /// Adds the patches centred on every pixel of `plane` whose `ignore` flag is not set.
    pub fn add(&mut self, plane: &PaddedPlane, ignore: Option<&[bool]>) {
        let (w, h) = plane.inner();
        let ignored = ignore.map_or(0, |m| m.iter().filter(|&&b| b).count());
        if ignored * 2 > w * h {
            let kept: Vec<usize> = (0..w * h).filter(|&i| !ignore.is_some_and(|m| m[i])).collect();
            self.add_patches(plane, &kept, 1.0);
            return;
        }
        self.add_all(plane);
        if let Some(mask) = ignore {
            let dropped: Vec<usize> = (0..w * h).filter(|&i| mask[i]).collect();
            self.add_patches(plane, &dropped, -1.0);
        }
    }

    /// Every patch of the plane, through per-lag integral images.
    fn add_all(&mut self, plane: &PaddedPlane) {
        let s = self.size;
        let n = s * s;
        let (w, h) = plane.inner();
        let (pw, ph) = (plane.width, plane.height);
        let iw = pw + 1;
        let mut integral = vec![0f64; iw * (ph + 1)];
        let rect = |integral: &[f64], ax: usize, ay: usize| -> f64 {
            integral[(ay + h) * iw + ax + w] + integral[ay * iw + ax]
                - integral[ay * iw + ax + w]
                - integral[(ay + h) * iw + ax]
        };
        fill_integral(&mut integral, pw, ph, |x, y| plane.data[y * pw + x]);
        for ay in 0..s {
            for ax in 0..s {
                self.sum[ay * s + ax] += rect(&integral, ax, ay);
            }
        }
        // lags (dy, dx) with dy ≥ 0 cover every pair a ≤ b in row-major order once
        let si = s as isize;
        for dy in 0..si {
            for dx in (1 - si)..si {
                if dy == 0 && dx < 0 {
                    continue;
                }
                fill_integral(&mut integral, pw, ph, |x, y| {
                    let (qx, qy) = (x as isize + dx, y as isize + dy);
                    if qx < 0 || qx >= pw as isize || qy >= ph as isize {
                        0.0
                    } else {
                        plane.data[y * pw + x] * plane.data[qy as usize * pw + qx as usize]
                    }
                });
                for ay in 0..(si - dy) {
                    for ax in (-dx).max(0)..(si - dx).min(si) {
                        let a = (ay * si + ax) as usize;
                        let b = ((ay + dy) * si + ax + dx) as usize;
                        self.outer[a * n + b] += rect(&integral, ax as usize, ay as usize);
                    }
                }
            }
        }
        self.count += (w * h) as f64;
    }

    /// Adds (`sign` = 1) or removes (`sign` = −1) the patches centred on the listed pixels.
    fn add_patches(&mut self, plane: &PaddedPlane, pixels: &[usize], sign: f64) {
        let s = self.size;
        let n = s * s;
        let (w, _) = plane.inner();
        let mut patch = vec![0f64; n];
        for &i in pixels {
            let (x, y) = (i % w, i / w);
            for ay in 0..s {
                patch[ay * s..(ay + 1) * s].copy_from_slice(&plane.data[(y + ay) * plane.width + x..][..s]);
            }
            for (a, &xa) in patch.iter().enumerate() {
                self.sum[a] += sign * xa;
                let row = &mut self.outer[a * n + a..(a + 1) * n];
                for (acc, &xb) in row.iter_mut().zip(&patch[a..]) {
                    *acc += sign * xa * xb;
                }
            }
        }
        self.count += sign * pixels.len() as f64;
    }

    /// The `components` leading principal directions of the accumulated patches.
    pub fn pca(&self, components: usize) -> Result<PatchPca> {
        let n = self.size * self.size;
        if self.count < 2.0 {
            return Err(VigilError::invalid(
                "patch PCA needs at least two pixels outside the ignore mask".to_string(),
            ));
        }
        let mean: Vec<f64> = self.sum.iter().map(|v| v / self.count).collect();
        let cov = DMatrix::from_fn(n, n, |i, j| {
            let (a, b) = if i <= j { (i, j) } else { (j, i) };
            self.outer[a * n + b] / self.count - mean[a] * mean[b]
        });
        let eigen = SymmetricEigen::new(cov);
        let mut order: Vec<usize> = (0..n).collect();
        // ties broken by index so the basis is reproducible
        order.sort_by(|&i, &j| eigen.eigenvalues[j].total_cmp(&eigen.eigenvalues[i]).then(i.cmp(&j)));
        let keep = &order[..components.min(n)];
        let basis = keep.iter().map(|&j| eigen.eigenvectors.column(j).iter().copied().collect()).collect();
        let variances = keep.iter().map(|&j| eigen.eigenvalues[j].max(0.0)).collect();
        Ok(PatchPca { size: self.size, basis, mean_patch: mean, variances })
    }
}

/// Integral image of `value` over a `pw`×`ph` grid, with a zero first row and column.
fn fill_integral(integral: &mut [f64], pw: usize, ph: usize, value: impl Fn(usize, usize) -> f64) {
    let iw = pw + 1;
    for y in 0..ph {
        let mut row = 0.0;
        for x in 0..pw {
            row += value(x, y);
            integral[(y + 1) * iw + x + 1] = integral[y * iw + x + 1] + row;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plane(w: usize, h: usize) -> Vec<f64> {
        (0..w * h).map(|i| (((i * 7919) % 97) as f64 / 97.0).powi(2)).collect()
    }

    fn brute_force(padded: &PaddedPlane, s: usize, keep: &dyn Fn(usize) -> bool) -> PatchMoments {
        let mut m = PatchMoments::new(s);
        let (w, h) = padded.inner();
        let pixels: Vec<usize> = (0..w * h).filter(|&i| keep(i)).collect();
        m.add_patches(padded, &pixels, 1.0);
        m
    }

    fn assert_same(a: &PatchMoments, b: &PatchMoments) {
        assert_eq!(a.count, b.count);
        for (x, y) in a.sum.iter().zip(&b.sum).chain(a.outer.iter().zip(&b.outer)) {
            assert!((x - y).abs() < 1e-9 * (1.0 + y.abs()), "{x} vs {y}");
        }
    }

    #[test]
    fn lag_integrals_equal_summed_outer_products() {
        let (w, h, s) = (23, 19, 5);
        let padded = PaddedPlane::new(&plane(w, h), w, h, s / 2);
        let mut fast = PatchMoments::new(s);
        fast.add(&padded, None);
        assert_same(&fast, &brute_force(&padded, s, &|_| true));
    }

    #[test]
    fn ignored_pixels_are_left_out_exactly_for_small_and_large_masks() {
        let (w, h, s) = (20, 16, 3);
        let padded = PaddedPlane::new(&plane(w, h), w, h, 1);
        for cut in [40, 250] {
            let mask: Vec<bool> = (0..w * h).map(|i| i < cut).collect();
            let mut fast = PatchMoments::new(s);
            fast.add(&padded, Some(&mask));
            assert_same(&fast, &brute_force(&padded, s, &|i| i >= cut));
        }
    }

    #[test]
    fn pca_finds_the_dominant_direction() {
        // patches of a horizontal ramp vary along one direction only
        let (w, h, s) = (30, 30, 3);
        let ramp: Vec<f64> = (0..w * h).map(|i| (i / w) as f64 / h as f64).collect();
        let mut m = PatchMoments::new(s);
        m.add(&PaddedPlane::new(&ramp, w, h, 1), None);
        let pca = m.pca(2).unwrap();
        assert!(pca.variances[0] > 1e3 * pca.variances[1].max(1e-300));
        let norm: f64 = pca.basis[0].iter().map(|v| v * v).sum();
        assert!((norm - 1.0).abs() < 1e-9);
        assert!(PatchMoments::new(3).pca(2).is_err());
    }
}
