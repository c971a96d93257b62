//! Exact nearest-neighbour search in the memory bank by blocked matrix products.
//!
//! ‖q − b‖² = ‖q‖² + ‖b‖² − 2 q·b: the dot products of a block of queries with a block of bank
//! rows are one small matrix product (the `gemm` crate's SIMD kernels), sized so the block
//! product stays in the L2 cache; query blocks run in parallel.

use half::f16;
use rayon::prelude::*;

use crate::coreset::squared_distance;

const QUERY_BLOCK: usize = 128;
const BANK_BLOCK: usize = 1024;

/// The memory bank's values: f32, or f16 to halve memory (widened block by block when searched).
#[derive(Clone, Debug, PartialEq)]
pub enum BankData {
    F32(Vec<f32>),
    F16(Vec<f16>),
}

impl BankData {
    pub fn len(&self) -> usize {
        match self {
            BankData::F32(v) => v.len(),
            BankData::F16(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Values `start..end` as f32.
    fn widen_into(&self, start: usize, end: usize, out: &mut Vec<f32>) {
        out.clear();
        match self {
            BankData::F32(v) => out.extend_from_slice(&v[start..end]),
            BankData::F16(v) => out.extend(v[start..end].iter().map(|x| x.to_f32())),
        }
    }
}

/// The memory bank with its squared row norms, ready for search.
#[derive(Clone, Debug)]
pub struct MemoryBank {
    dim: usize,
    data: BankData,
    norms: Vec<f32>,
}

impl MemoryBank {
    pub fn new(data: BankData, dim: usize) -> Self {
        let mut norms = Vec::with_capacity(data.len() / dim);
        let mut row = Vec::with_capacity(dim);
        for i in 0..data.len() / dim {
            data.widen_into(i * dim, (i + 1) * dim, &mut row);
            norms.push(row.iter().map(|v| v * v).sum());
        }
        MemoryBank { dim, data, norms }
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    pub fn rows(&self) -> usize {
        self.norms.len()
    }

    pub fn data(&self) -> &BankData {
        &self.data
    }

    pub fn row(&self, i: usize) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.dim);
        self.data.widen_into(i * self.dim, (i + 1) * self.dim, &mut out);
        out
    }

    /// For each query row: the Euclidean distance to its nearest bank row and that row's index
    /// (the lowest index among equally near rows).
    pub fn nearest(&self, queries: &[f32]) -> (Vec<f32>, Vec<u32>) {
        let nq = queries.len() / self.dim;
        let mut dist = vec![f32::INFINITY; nq];
        let mut index = vec![0u32; nq];
        dist.par_chunks_mut(QUERY_BLOCK)
            .zip(index.par_chunks_mut(QUERY_BLOCK))
            .zip(queries.par_chunks(QUERY_BLOCK * self.dim))
            .for_each(|((d, i), q)| self.nearest_block(q, d, i));
        (dist, index)
    }

    fn nearest_block(&self, queries: &[f32], best: &mut [f32], best_index: &mut [u32]) {
        let dim = self.dim;
        let nq = best.len();
        let q_norms: Vec<f32> = queries.chunks_exact(dim).map(|q| q.iter().map(|v| v * v).sum()).collect();
        // f16 banks are widened block by block; f32 blocks are read in place
        let mut bank_block = Vec::new();
        let mut dots = vec![0f32; nq * BANK_BLOCK];
        for start in (0..self.rows()).step_by(BANK_BLOCK) {
            let end = (start + BANK_BLOCK).min(self.rows());
            let nb = end - start;
            let block = match &self.data {
                BankData::F32(values) => &values[start * dim..end * dim],
                BankData::F16(_) => {
                    self.data.widen_into(start * dim, end * dim, &mut bank_block);
                    &bank_block[..]
                }
            };
            // one row per bank row, so the minimum runs along rows across all queries at once
            matmul_nt(block, queries, dim, &mut dots[..nb * nq], -2.0);
            for (j, row) in dots[..nb * nq].chunks_exact(nq).enumerate() {
                lower_minima(row, self.norms[start + j], (start + j) as u32, best, best_index);
            }
        }
        for (d, qn) in best.iter_mut().zip(q_norms) {
            *d = (*d + qn).max(0.0).sqrt();
        }
    }

    /// The `k` bank rows nearest to bank row `row` (itself included), nearest first.
    pub fn neighbours_of_row(&self, row: usize, k: usize) -> Vec<usize> {
        let centre = self.row(row);
        let dim = self.dim;
        let mut scored: Vec<(f32, usize)> = (0..self.rows())
            .into_par_iter()
            .with_min_len(BANK_BLOCK)
            .map_init(
                || Vec::with_capacity(dim),
                |buf, i| {
                    self.data.widen_into(i * dim, (i + 1) * dim, buf);
                    (squared_distance(buf, &centre), i)
                },
            )
            .collect();
        let k = k.min(scored.len());
        let by_distance = |a: &(f32, usize), b: &(f32, usize)| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1));
        if k < scored.len() {
            scored.select_nth_unstable_by(k, by_distance);
            scored.truncate(k);
        }
        scored.sort_unstable_by(by_distance);
        scored.into_iter().map(|(_, i)| i).collect()
    }
}

vigil_core::simd_dispatch! {
    /// For every query q: if `dots[q] + norm` is below `best[q]`, it becomes the best and `index`
    /// its bank row. Bank rows come in increasing order, so ties keep the lowest index.
    fn lower_minima(dots: &[f32], norm: f32, index: u32, best: &mut [f32], best_index: &mut [u32]);
    fast = lower_minima_generic(dots, norm, index, best, best_index);
    portable = lower_minima_generic(dots, norm, index, best, best_index);
}

/// Written as compare-and-select so it vectorises across queries.
#[inline(always)]
fn lower_minima_generic(dots: &[f32], norm: f32, index: u32, best: &mut [f32], best_index: &mut [u32]) {
    for ((&dot, b), i) in dots.iter().zip(best.iter_mut()).zip(best_index.iter_mut()) {
        let v = dot + norm;
        let better = v < *b;
        *b = if better { v } else { *b };
        *i = if better { index } else { *i };
    }
}

/// `dst = alpha · A · Bᵀ` for row-major `A` (n×dim) and `B` (m×dim); `dst` is n×m row-major.
pub(crate) fn matmul_nt(a: &[f32], b: &[f32], dim: usize, dst: &mut [f32], alpha: f32) {
    let (n, m) = (a.len() / dim, b.len() / dim);
    assert_eq!(dst.len(), n * m, "matmul_nt: destination size");
    if n == 0 || m == 0 {
        return;
    }
    // SAFETY: the strides describe `a` (n×dim, row-major), `b` read transposed (dim×m) and `dst`
    // (n×m, row-major), all within the slices' bounds as checked above; `dst` is not read.
    unsafe {
        gemm::gemm(
            n,
            m,
            dim,
            dst.as_mut_ptr(),
            1,
            m as isize,
            false,
            a.as_ptr(),
            1,
            dim as isize,
            b.as_ptr(),
            dim as isize,
            1,
            0.0,
            alpha,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn random_rows(n: usize, dim: usize, seed: u64) -> Vec<f32> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        (0..n * dim).map(|_| rng.gen::<f32>() * 2.0 - 1.0).collect()
    }

    fn brute_force(bank: &[f32], queries: &[f32], dim: usize) -> Vec<(f32, usize)> {
        queries
            .chunks_exact(dim)
            .map(|q| {
                bank.chunks_exact(dim)
                    .enumerate()
                    .map(|(i, b)| (squared_distance(q, b).sqrt(), i))
                    .fold((f32::INFINITY, 0), |a, b| if b.0 < a.0 { b } else { a })
            })
            .collect()
    }

    #[test]
    fn blocked_search_equals_brute_force() {
        // sizes not multiples of the blocks, so partial blocks are exercised
        let dim = 37;
        let bank = random_rows(2500, dim, 1);
        let queries = random_rows(300, dim, 2);
        let (dist, index) = MemoryBank::new(BankData::F32(bank.clone()), dim).nearest(&queries);
        for (q, (d, i)) in brute_force(&bank, &queries, dim).into_iter().enumerate() {
            assert_eq!(index[q] as usize, i, "query {q}");
            assert!((dist[q] - d).abs() < 1e-4, "query {q}: {} vs {d}", dist[q]);
        }
    }

    #[test]
    fn f16_bank_search_equals_brute_force_on_rounded_values() {
        let dim = 16;
        let bank: Vec<f16> = random_rows(1500, dim, 3).iter().map(|&v| f16::from_f32(v)).collect();
        let widened: Vec<f32> = bank.iter().map(|v| v.to_f32()).collect();
        let queries = random_rows(50, dim, 4);
        let (dist, index) = MemoryBank::new(BankData::F16(bank), dim).nearest(&queries);
        for (q, (d, i)) in brute_force(&widened, &queries, dim).into_iter().enumerate() {
            assert_eq!(index[q] as usize, i);
            assert!((dist[q] - d).abs() < 1e-4);
        }
    }

    #[test]
    fn a_query_equal_to_a_bank_row_is_at_distance_zero() {
        let dim = 8;
        let bank = random_rows(100, dim, 5);
        let (dist, index) =
            MemoryBank::new(BankData::F32(bank.clone()), dim).nearest(&bank[40 * dim..41 * dim]);
        assert_eq!(index[0], 40);
        assert!(dist[0] < 1e-3);
    }

    #[test]
    fn neighbours_of_a_row_are_sorted_and_start_with_itself() {
        let dim = 3;
        let bank = random_rows(3000, dim, 6);
        let mb = MemoryBank::new(BankData::F32(bank.clone()), dim);
        let nn = mb.neighbours_of_row(17, 9);
        assert_eq!(nn.len(), 9);
        assert_eq!(nn[0], 17);
        let d = |i: usize| squared_distance(&bank[i * dim..(i + 1) * dim], &bank[17 * dim..18 * dim]);
        assert!(nn.windows(2).all(|w| d(w[0]) <= d(w[1])));
        let ninth = d(nn[8]);
        assert_eq!((0..3000).filter(|&i| d(i) < ninth).count(), 8);
    }
}
