//! Per-position multivariate Gaussians accumulated over a stream of images.
//!
//! Each batch's mean and centred scatter matrix are merged into the running ones with Chan et
//! al.'s pairwise update (the batched form of Welford's algorithm), in f64: memory is one mean
//! and one scatter matrix per position whatever the number of images, and no sum of raw squares
//! is kept, so there is no cancellation when the mean is large against the spread.

use rayon::prelude::*;
use vigil_core::{Result, VigilError};

/// Running means and scatter matrices (Σ (x − mean)(x − mean)ᵀ) at `positions` positions.
#[derive(Clone, Debug)]
pub struct GaussianAccumulator {
    positions: usize,
    dim: usize,
    counts: Vec<u64>,
    mean: Vec<f64>,
    scatter: Vec<f64>,
}

impl GaussianAccumulator {
    pub fn new(positions: usize, dim: usize) -> Self {
        GaussianAccumulator {
            positions,
            dim,
            counts: vec![0; positions],
            mean: vec![0.0; positions * dim],
            scatter: vec![0.0; positions * dim * dim],
        }
    }

    /// Samples seen at each position.
    pub fn counts(&self) -> &[u64] {
        &self.counts
    }

    /// Adds a batch of `n` samples laid out `[n][positions][dim]`. `valid`, laid out
    /// `[n][positions]`, leaves out the samples it marks false (ignored pixels).
    pub fn add_batch(&mut self, batch: &[f32], n: usize, valid: Option<&[bool]>) {
        let (p_count, dim) = (self.positions, self.dim);
        assert_eq!(batch.len(), n * p_count * dim, "add_batch: batch size");
        self.counts
            .par_iter_mut()
            .zip(self.mean.par_chunks_mut(dim))
            .zip(self.scatter.par_chunks_mut(dim * dim))
            .enumerate()
            .for_each(|(p, ((count, mean), scatter))| {
                let rows: Vec<f64> = (0..n)
                    .filter(|&s| valid.is_none_or(|v| v[s * p_count + p]))
                    .flat_map(|s| batch[(s * p_count + p) * dim..(s * p_count + p + 1) * dim].iter())
                    .map(|&x| x as f64)
                    .collect();
                merge_rows(count, mean, scatter, rows, dim);
            });
    }

    /// Mean at position `p`.
    pub fn mean(&self, p: usize) -> &[f64] {
        &self.mean[p * self.dim..(p + 1) * self.dim]
    }

    /// Unbiased covariance at position `p` (divided by count − 1, as `torch.cov` and PaDiM).
    pub fn covariance(&self, p: usize) -> Vec<f64> {
        let d2 = self.dim * self.dim;
        let denom = self.counts[p].saturating_sub(1).max(1) as f64;
        self.scatter[p * d2..(p + 1) * d2].iter().map(|v| v / denom).collect()
    }

    /// Means (`[positions][dim]`), inverses of the covariances regularised by `eps`·I
    /// (`[positions][dim][dim]`), in f32 for scoring, and which positions had a sample. A
    /// position no sample reached (ignored in every image) keeps zeros and is marked false; it
    /// is an error only when no position had a sample.
    pub fn finish(&self, eps: f64) -> Result<(Vec<f32>, Vec<f32>, Vec<bool>)> {
        let sampled: Vec<bool> = self.counts.iter().map(|&c| c > 0).collect();
        if !sampled.contains(&true) {
            return Err(VigilError::invalid(
                "PaDiM: no feature position has a training sample (all ignored)",
            ));
        }
        let dim = self.dim;
        let mut inverse = vec![0f32; self.positions * dim * dim];
        inverse.par_chunks_mut(dim * dim).enumerate().filter(|(p, _)| sampled[*p]).try_for_each(
            |(p, out)| {
                let mut cov = self.covariance(p);
                for i in 0..dim {
                    cov[i * dim + i] += eps;
                }
                let inv = spd_inverse(&cov, dim).ok_or_else(|| {
                    VigilError::invalid(format!(
                        "PaDiM: covariance at feature position {p} is not positive definite \
                     (non-finite features, or a regularisation eps of {eps} too small)"
                    ))
                })?;
                out.iter_mut().zip(inv).for_each(|(o, v)| *o = v as f32);
                Ok::<(), VigilError>(())
            },
        )?;
        Ok((self.mean.iter().map(|&v| v as f32).collect(), inverse, sampled))
    }
}

/// Merges `rows` (row-major, `dim` wide) into one position's running count, mean and scatter.
fn merge_rows(count: &mut u64, mean: &mut [f64], scatter: &mut [f64], mut rows: Vec<f64>, dim: usize) {
    let nb = rows.len() / dim;
    if nb == 0 {
        return;
    }
    let mut batch_mean = vec![0f64; dim];
    for row in rows.chunks_exact(dim) {
        batch_mean.iter_mut().zip(row).for_each(|(m, x)| *m += x);
    }
    batch_mean.iter_mut().for_each(|m| *m /= nb as f64);
    for row in rows.chunks_exact_mut(dim) {
        row.iter_mut().zip(&batch_mean).for_each(|(x, m)| *x -= m);
    }
    // scatter += Xcᵀ·Xc: the batch's own centred scatter
    // SAFETY: `rows` is nb×dim row-major, read as its transpose (dim×nb) and as itself; `scatter`
    // is dim×dim row-major and is both read and written, as gemm allows.
    unsafe {
        gemm::gemm(
            dim,
            dim,
            nb,
            scatter.as_mut_ptr(),
            1,
            dim as isize,
            true,
            rows.as_ptr(),
            dim as isize,
            1,
            rows.as_ptr(),
            1,
            dim as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
    let (na, n) = (*count as f64, (*count + nb as u64) as f64);
    let delta: Vec<f64> = batch_mean.iter().zip(mean.iter()).map(|(b, a)| b - a).collect();
    let w = na * nb as f64 / n;
    for i in 0..dim {
        for j in 0..dim {
            scatter[i * dim + j] += w * delta[i] * delta[j];
        }
    }
    mean.iter_mut().zip(&delta).for_each(|(m, d)| *m += d * nb as f64 / n);
    *count += nb as u64;
}

/// Inverse of a symmetric positive-definite matrix by Cholesky (A = L·Lᵀ, A⁻¹ = L⁻ᵀ·L⁻¹);
/// `None` when A is not positive definite.
pub fn spd_inverse(a: &[f64], dim: usize) -> Option<Vec<f64>> {
    let mut l = vec![0f64; dim * dim];
    for i in 0..dim {
        for j in 0..=i {
            let s: f64 = (0..j).map(|k| l[i * dim + k] * l[j * dim + k]).sum();
            if i == j {
                let d = a[i * dim + i] - s;
                if d <= 0.0 || !d.is_finite() {
                    return None;
                }
                l[i * dim + i] = d.sqrt();
            } else {
                l[i * dim + j] = (a[i * dim + j] - s) / l[j * dim + j];
            }
        }
    }
    // M = L⁻¹ (lower triangular), column by column by forward substitution
    let mut m = vec![0f64; dim * dim];
    for c in 0..dim {
        m[c * dim + c] = 1.0 / l[c * dim + c];
        for i in c + 1..dim {
            let s: f64 = (c..i).map(|k| l[i * dim + k] * m[k * dim + c]).sum();
            m[i * dim + c] = -s / l[i * dim + i];
        }
    }
    // A⁻¹ = Mᵀ·M; entry (i, j) sums over rows k ≥ max(i, j) where both columns are non-zero
    let mut inv = vec![0f64; dim * dim];
    for i in 0..dim {
        for j in 0..=i {
            let s: f64 = (i..dim).map(|k| m[k * dim + i] * m[k * dim + j]).sum();
            inv[i * dim + j] = s;
            inv[j * dim + i] = s;
        }
    }
    Some(inv)
}

/// Values in a packed precision matrix of `dim` rows: the upper triangle, row by row.
pub fn packed_len(dim: usize) -> usize {
    dim * (dim + 1) / 2
}

/// Packs a precision matrix `a` (dim×dim) for [`mahalanobis`]: row i holds A_ii, then
/// A_ij + A_ji for j > i. The quadratic form reads half the values of the full matrix, which is
/// what a batch-1 score spends its time on (1,024 positions × 128² values at the defaults).
pub fn pack_precision(a: &[f32], dim: usize) -> Vec<f32> {
    let mut packed = Vec::with_capacity(packed_len(dim));
    for i in 0..dim {
        packed.push(a[i * dim + i]);
        packed.extend((i + 1..dim).map(|j| a[i * dim + j] + a[j * dim + i]));
    }
    packed
}

/// The full symmetric matrix of a packed one (exact for a symmetric original: halving is exact).
pub fn unpack_precision(packed: &[f32], dim: usize) -> Vec<f32> {
    let mut a = vec![0f32; dim * dim];
    let mut rows = packed;
    for i in 0..dim {
        let (row, rest) = rows.split_at(dim - i);
        a[i * dim + i] = row[0];
        for (j, &v) in (i + 1..dim).zip(&row[1..]) {
            a[i * dim + j] = v / 2.0;
            a[j * dim + i] = v / 2.0;
        }
        rows = rest;
    }
    a
}

vigil_core::simd_dispatch! {
    /// Mahalanobis distance √((x − μ)ᵀ A (x − μ)) for a precision matrix packed by
    /// [`pack_precision`]. The same sums in the same order on every path (8-lane accumulators,
    /// no fused multiply-add), so the result does not depend on the CPU.
    pub fn mahalanobis(x: &[f32], mean: &[f32], packed: &[f32]) -> f32;
    fast = mahalanobis_generic(x, mean, packed);
    portable = mahalanobis_generic(x, mean, packed);
}

#[inline(always)]
fn mahalanobis_generic(x: &[f32], mean: &[f32], packed: &[f32]) -> f32 {
    let dim = mean.len();
    let d: Vec<f32> = x.iter().zip(mean).map(|(x, m)| x - m).collect();
    let mut q = 0f32;
    let mut rows = packed;
    for i in 0..dim {
        let (row, rest) = rows.split_at(dim - i);
        q += d[i] * dot(row, &d[i..]);
        rows = rest;
    }
    q.max(0.0).sqrt()
}

/// Dot product with eight independent accumulators so the compiler vectorises it (a single
/// accumulator forces sequential float additions); this is the inner loop of every score.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ac, ar) = a.split_at(a.len() / 8 * 8);
    let (bc, br) = b.split_at(ac.len());
    for (x, y) in ac.chunks_exact(8).zip(bc.chunks_exact(8)) {
        for j in 0..8 {
            acc[j] += x[j] * y[j];
        }
    }
    acc.iter().sum::<f32>() + ar.iter().zip(br).map(|(x, y)| x * y).sum::<f32>()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn streamed_mean_and_covariance_equal_a_direct_computation() {
        let (positions, dim, n) = (3, 4, 23);
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        // an offset far from zero checks the update is free of cancellation
        let data: Vec<f32> =
            (0..n * positions * dim).map(|i| 100.0 + rng.gen::<f32>() * (1 + i % 3) as f32).collect();
        let mut acc = GaussianAccumulator::new(positions, dim);
        // uneven batches: 5, 1, 10, 7
        let mut start = 0;
        for b in [5, 1, 10, 7] {
            acc.add_batch(&data[start * positions * dim..(start + b) * positions * dim], b, None);
            start += b;
        }
        for p in 0..positions {
            let sample = |s: usize, i: usize| data[(s * positions + p) * dim + i] as f64;
            let mean: Vec<f64> =
                (0..dim).map(|i| (0..n).map(|s| sample(s, i)).sum::<f64>() / n as f64).collect();
            let cov = acc.covariance(p);
            for i in 0..dim {
                assert!((acc.mean(p)[i] - mean[i]).abs() < 1e-9);
                for j in 0..dim {
                    let direct =
                        (0..n).map(|s| (sample(s, i) - mean[i]) * (sample(s, j) - mean[j])).sum::<f64>()
                            / (n - 1) as f64;
                    assert!(
                        (cov[i * dim + j] - direct).abs() < 1e-9,
                        "p{p} ({i},{j}): {} vs {direct}",
                        cov[i * dim + j]
                    );
                }
            }
        }
    }

    #[test]
    fn invalid_samples_are_left_out() {
        let (positions, dim) = (2, 1);
        let data = [1.0, 10.0, 3.0, 1000.0];
        let valid = [true, true, true, false];
        let mut acc = GaussianAccumulator::new(positions, dim);
        acc.add_batch(&data, 2, Some(&valid));
        assert_eq!(acc.counts(), &[2, 1]);
        assert_eq!(acc.mean(0), &[2.0]);
        assert_eq!(acc.mean(1), &[10.0]);
    }

    #[test]
    fn cholesky_inverse_times_matrix_is_identity() {
        let dim = 6;
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let b: Vec<f64> = (0..dim * dim).map(|_| rng.gen::<f64>() - 0.5).collect();
        // A = B·Bᵀ + 0.1·I is symmetric positive definite
        let mut a = vec![0f64; dim * dim];
        for i in 0..dim {
            for j in 0..dim {
                a[i * dim + j] = (0..dim).map(|k| b[i * dim + k] * b[j * dim + k]).sum::<f64>();
            }
            a[i * dim + i] += 0.1;
        }
        let inv = spd_inverse(&a, dim).unwrap();
        for i in 0..dim {
            for j in 0..dim {
                let v: f64 = (0..dim).map(|k| a[i * dim + k] * inv[k * dim + j]).sum();
                assert!((v - if i == j { 1.0 } else { 0.0 }).abs() < 1e-9, "({i},{j}) = {v}");
            }
        }
        assert!(spd_inverse(&[1.0, 2.0, 2.0, 1.0], 2).is_none(), "indefinite matrix accepted");
    }

    #[test]
    fn mahalanobis_with_diagonal_precision_scales_each_axis() {
        let a = pack_precision(&[4.0, 0.0, 0.0, 1.0], 2);
        let d = mahalanobis(&[1.0, 3.0], &[0.0, 0.0], &a);
        assert!((d - (4.0f32 + 9.0).sqrt()).abs() < 1e-6);
    }

    #[test]
    fn packed_mahalanobis_equals_the_full_quadratic_form() {
        let dim = 37;
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let b: Vec<f64> = (0..dim * dim).map(|_| rng.gen::<f64>() - 0.5).collect();
        let mut a = vec![0f32; dim * dim];
        for i in 0..dim {
            for j in 0..dim {
                a[i * dim + j] = (0..dim).map(|k| b[i * dim + k] * b[j * dim + k]).sum::<f64>() as f32;
            }
        }
        let packed = pack_precision(&a, dim);
        assert_eq!(packed.len(), packed_len(dim));
        assert_eq!(unpack_precision(&packed, dim), a);
        let x: Vec<f32> = (0..dim).map(|_| rng.gen::<f32>()).collect();
        let mean: Vec<f32> = (0..dim).map(|_| rng.gen::<f32>()).collect();
        let d: Vec<f64> = x.iter().zip(&mean).map(|(x, m)| (x - m) as f64).collect();
        let full: f64 = (0..dim)
            .flat_map(|i| (0..dim).map(move |j| (i, j)))
            .map(|(i, j)| d[i] * a[i * dim + j] as f64 * d[j])
            .sum();
        let got = mahalanobis(&x, &mean, &packed) as f64;
        assert!((got - full.sqrt()).abs() < 1e-5 * full.sqrt(), "{got} vs {}", full.sqrt());
    }

    #[test]
    fn an_empty_position_is_marked_and_all_empty_is_an_error() {
        let mut acc = GaussianAccumulator::new(2, 1);
        acc.add_batch(&[1.0, 2.0], 1, Some(&[true, false]));
        let (mean, inv, sampled) = acc.finish(0.01).unwrap();
        assert_eq!(sampled, vec![true, false]);
        assert_eq!((mean[1], inv[1]), (0.0, 0.0));
        assert!((inv[0] - 100.0).abs() < 1e-3, "one sample: covariance 0 + eps, inverse {}", inv[0]);
        let mut none = GaussianAccumulator::new(2, 1);
        none.add_batch(&[1.0, 2.0], 1, Some(&[false, false]));
        assert!(none.finish(0.01).unwrap_err().to_string().contains("all ignored"));
    }
}
