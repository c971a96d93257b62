//! Greedy k-center coreset selection: PatchCore's memory-bank subsampling.
//!
//! Greedy farthest-point selection keeps the row farthest from everything chosen so far, which
//! bounds the covering radius of the bank within twice the optimum (Gonzalez 1985). Each step
//! costs one pass over the rows: the distance of every row to the newly chosen centre updates
//! a running minimum, so the whole selection is O(k·n·dim) time and O(n) extra memory (the naive
//! loop of the reference code recomputes a full distance matrix slice per step).

use half::f16;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use crate::knn::{matmul_nt, BankData};

/// Rows per parallel work item of the greedy update: large enough to amortise scheduling, small
/// enough that both cores get several items.
const UPDATE_BLOCK: usize = 4096;

/// A dense Gaussian random projection (Johnson–Lindenstrauss): pairwise distances survive up to
/// a small relative error, so greedy selection on projected rows picks nearly the same centres
/// at a fraction of the cost.
#[derive(Clone, Debug)]
pub struct GaussianProjection {
    pub in_dim: usize,
    pub out_dim: usize,
    /// `out_dim` rows of `in_dim` entries drawn from N(0, 1/out_dim).
    matrix: Vec<f32>,
}

impl GaussianProjection {
    pub fn new(in_dim: usize, out_dim: usize, seed: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let scale = (1.0 / out_dim as f64).sqrt();
        let matrix = (0..in_dim * out_dim).map(|_| (standard_normal(&mut rng) * scale) as f32).collect();
        GaussianProjection { in_dim, out_dim, matrix }
    }

    /// Projects row-major rows of `in_dim` values to rows of `out_dim` values.
    pub fn apply(&self, rows: &[f32]) -> Vec<f32> {
        let n = rows.len() / self.in_dim;
        let mut out = vec![0f32; n * self.out_dim];
        out.par_chunks_mut(UPDATE_BLOCK * self.out_dim)
            .zip(rows.par_chunks(UPDATE_BLOCK * self.in_dim))
            .for_each(|(dst, src)| matmul_nt(src, &self.matrix, self.in_dim, dst, 1.0));
        out
    }
}

/// Box–Muller: one N(0, 1) sample from two uniforms (rand 0.8 has no normal distribution
/// without rand_distr, and this is all the projection needs).
fn standard_normal(rng: &mut ChaCha8Rng) -> f64 {
    let u1: f64 = 1.0 - rng.gen::<f64>(); // (0, 1]: keeps ln finite
    let u2: f64 = rng.gen();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

/// Indices of `k` rows chosen by greedy k-center selection, in the order chosen. The first
/// centre is a row drawn with `seed`; each next one is the row farthest (Euclidean) from all
/// chosen centres, ties going to the lowest index so the result is independent of threading.
/// `k` larger than the row count is clamped.
///
/// Rows are skipped by the triangle inequality (as in Elkan's k-means): a row at distance r from
/// its nearest centre a cannot get nearer to a new centre c when ‖a − c‖ ≥ 2r, so once the
/// covering radius has shrunk most rows are settled by one comparison instead of a distance.
pub fn greedy_k_center(rows: &[f32], dim: usize, k: usize, seed: u64) -> Vec<usize> {
    let n = rows.len() / dim;
    let k = k.min(n);
    if k == 0 {
        return Vec::new();
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut next = rng.gen_range(0..n);
    let mut min_dist = vec![f32::INFINITY; n];
    // which chosen centre (position in `chosen`) each row is nearest to
    let mut nearest = vec![0u32; n];
    let mut chosen = Vec::with_capacity(k);
    // squared distances from the newest centre to every chosen centre
    let mut centre_dist: Vec<f32> = Vec::with_capacity(k);
    loop {
        chosen.push(next);
        if chosen.len() == k {
            break;
        }
        let t = chosen.len() - 1;
        // A chosen row is marked below every distance (and the update never raises it) so that,
        // once only duplicates of chosen rows are left at distance 0, a duplicate is taken
        // rather than a chosen row again.
        min_dist[next] = -1.0;
        let centre = &rows[next * dim..(next + 1) * dim];
        centre_dist.clear();
        centre_dist
            .par_extend(chosen.par_iter().map(|&c| squared_distance(&rows[c * dim..(c + 1) * dim], centre)));
        let (_, far) = min_dist
            .par_chunks_mut(UPDATE_BLOCK)
            .zip(nearest.par_chunks_mut(UPDATE_BLOCK))
            .zip(rows.par_chunks(UPDATE_BLOCK * dim))
            .enumerate()
            .map(|(b, ((md, near), xs))| {
                let (d, i) = update_block(md, near, xs, centre, &centre_dist, t as u32);
                (d, b * UPDATE_BLOCK + i)
            })
            .reduce(|| (f32::NEG_INFINITY, usize::MAX), farther);
        next = far;
    }
    chosen
}

fn farther(a: (f32, usize), b: (f32, usize)) -> (f32, usize) {
    if b.0 > a.0 || (b.0 == a.0 && b.1 < a.1) {
        b
    } else {
        a
    }
}

vigil_core::simd_dispatch! {
    /// Lowers each row's squared distance-to-set with its distance to `centre` (centre number `t`,
    /// at squared distances `centre_dist` from the earlier centres), returning the largest
    /// remaining distance in the block and its offset.
    fn update_block(
        min_dist: &mut [f32],
        nearest: &mut [u32],
        rows: &[f32],
        centre: &[f32],
        centre_dist: &[f32],
        t: u32,
    ) -> (f32, usize);
    fast = update_block_generic(min_dist, nearest, rows, centre, centre_dist, t);
    portable = update_block_generic(min_dist, nearest, rows, centre, centre_dist, t);
}

#[inline(always)]
fn update_block_generic(
    min_dist: &mut [f32],
    nearest: &mut [u32],
    rows: &[f32],
    centre: &[f32],
    centre_dist: &[f32],
    t: u32,
) -> (f32, usize) {
    let dim = centre.len();
    let mut best = (f32::NEG_INFINITY, usize::MAX);
    for (i, ((md, near), row)) in
        min_dist.iter_mut().zip(nearest.iter_mut()).zip(rows.chunks_exact(dim)).enumerate()
    {
        // ‖a − c‖ ≥ 2r in squares, with a margin far above rounding so the skip is always exact
        let settled = *md <= 0.0 || centre_dist[*near as usize] >= 4.0 * *md * (1.0 + 1e-3);
        if !settled {
            let d = squared_distance(row, centre);
            if d < *md {
                *md = d;
                *near = t;
            }
        }
        if *md > best.0 {
            best = (*md, i);
        }
    }
    best
}

/// Squared Euclidean distance with eight independent accumulators so the compiler vectorises
/// the sum (a single accumulator forces sequential float additions).
#[inline(always)]
pub(crate) fn squared_distance(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ac, ar) = a.split_at(a.len() / 8 * 8);
    let (bc, br) = b.split_at(ac.len());
    for (x, y) in ac.chunks_exact(8).zip(bc.chunks_exact(8)) {
        for j in 0..8 {
            let d = x[j] - y[j];
            acc[j] += d * d;
        }
    }
    let mut total: f32 = acc.iter().sum();
    for (x, y) in ar.iter().zip(br) {
        total += (x - y) * (x - y);
    }
    total
}

/// Memory-bounded coreset of a stream of patch rows.
///
/// Rows are buffered in chunks of at most `chunk_rows`; each full chunk is reduced on its own by
/// greedy k-center to its share of the bank, and the bank is the union of the chunk coresets.
/// This is the composable-coreset construction for k-center (Malkomes et al. 2015, "Fast
/// distributed k-center clustering"): every row lies within its chunk's greedy covering radius
/// of the bank, so the bank's covering radius is bounded by the largest chunk radius, while
/// memory stays at one chunk plus the bank and time grows linearly with the number of rows
/// (greedy on all rows at once is quadratic). When all rows fit in one chunk this is exactly
/// greedy k-center over the whole set.
pub struct StreamingCoreset {
    dim: usize,
    chunk_rows: usize,
    keep_fraction: f64,
    projection: Option<GaussianProjection>,
    seed: u64,
    chunk: Vec<f32>,
    chunks_done: u64,
    bank: BankData,
}

impl StreamingCoreset {
    /// `keep_fraction` of the rows go to the bank; `projection` (if any) maps rows to the space
    /// the greedy selection measures distances in; the bank keeps the original rows, as f16
    /// when `f16_bank`.
    pub fn new(
        dim: usize,
        chunk_rows: usize,
        keep_fraction: f64,
        projection: Option<GaussianProjection>,
        f16_bank: bool,
        seed: u64,
    ) -> Self {
        let bank = if f16_bank { BankData::F16(Vec::new()) } else { BankData::F32(Vec::new()) };
        StreamingCoreset {
            dim,
            chunk_rows: chunk_rows.max(1),
            keep_fraction,
            projection,
            seed,
            chunk: Vec::new(),
            chunks_done: 0,
            bank,
        }
    }

    /// Adds row-major rows of `dim` values; reduces the buffer whenever it holds a full chunk.
    pub fn push(&mut self, rows: &[f32]) {
        let mut rest = rows;
        while !rest.is_empty() {
            let room = self.chunk_rows * self.dim - self.chunk.len();
            let take = room.min(rest.len());
            self.chunk.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
            if self.chunk.len() == self.chunk_rows * self.dim {
                self.reduce_chunk();
            }
        }
    }

    /// Reduces the last partial chunk and returns the bank.
    pub fn finish(mut self) -> BankData {
        if !self.chunk.is_empty() {
            self.reduce_chunk();
        }
        self.bank
    }

    fn reduce_chunk(&mut self) {
        let n = self.chunk.len() / self.dim;
        let k = ((n as f64 * self.keep_fraction) as usize).clamp(1, n);
        // each chunk gets its own start point, all derived from the one seed
        let seed = self.seed ^ self.chunks_done.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let picked = match &self.projection {
            Some(p) => greedy_k_center(&p.apply(&self.chunk), p.out_dim, k, seed),
            None => greedy_k_center(&self.chunk, self.dim, k, seed),
        };
        for i in picked {
            let row = &self.chunk[i * self.dim..(i + 1) * self.dim];
            match &mut self.bank {
                BankData::F32(v) => v.extend_from_slice(row),
                BankData::F16(v) => v.extend(row.iter().map(|&x| f16::from_f32(x))),
            }
        }
        self.chunk.clear();
        self.chunks_done += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random_rows(n: usize, dim: usize, seed: u64) -> Vec<f32> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        (0..n * dim).map(|_| rng.gen::<f32>()).collect()
    }

    /// Largest distance from any row to its nearest chosen row.
    fn covering_radius(rows: &[f32], dim: usize, chosen: &[usize]) -> f32 {
        rows.chunks_exact(dim)
            .map(|r| {
                chosen
                    .iter()
                    .map(|&c| squared_distance(r, &rows[c * dim..(c + 1) * dim]))
                    .fold(f32::INFINITY, f32::min)
            })
            .fold(0f32, f32::max)
            .sqrt()
    }

    #[test]
    fn each_pick_is_the_farthest_row_from_the_previous_picks() {
        let dim = 5;
        let rows = random_rows(700, dim, 1);
        let chosen = greedy_k_center(&rows, dim, 40, 7);
        assert_eq!(chosen.len(), 40);
        for step in 1..chosen.len() {
            let dist_to_set = |i: usize| {
                chosen[..step]
                    .iter()
                    .map(|&c| squared_distance(&rows[i * dim..(i + 1) * dim], &rows[c * dim..(c + 1) * dim]))
                    .fold(f32::INFINITY, f32::min)
            };
            let best = (0..700).map(dist_to_set).fold(0f32, f32::max);
            assert_eq!(dist_to_set(chosen[step]), best, "pick {step} is not the farthest row");
        }
    }

    #[test]
    fn greedy_keeps_isolated_outliers_and_covers_within_twice_the_optimum() {
        // three tight clusters and two lone points: 5 centres must take one of each
        let dim = 2;
        let mut rows = Vec::new();
        for (cx, cy) in [(0.0, 0.0), (10.0, 0.0), (0.0, 10.0)] {
            for i in 0..50 {
                rows.extend([cx + (i % 7) as f32 * 0.01, cy + (i / 7) as f32 * 0.01]);
            }
        }
        rows.extend([30.0, 30.0, -20.0, 5.0]);
        let chosen = greedy_k_center(&rows, dim, 5, 3);
        assert!(chosen.contains(&150) && chosen.contains(&151), "{chosen:?}");
        // optimum radius < 0.1 (cluster diameter); greedy must be within twice that
        assert!(covering_radius(&rows, dim, &chosen) < 0.2);
    }

    #[test]
    fn selection_is_deterministic_with_the_seed_and_distinct() {
        let rows = random_rows(5000, 16, 2);
        let a = greedy_k_center(&rows, 16, 300, 11);
        assert_eq!(a, greedy_k_center(&rows, 16, 300, 11));
        assert_ne!(a, greedy_k_center(&rows, 16, 300, 12));
        let mut sorted = a.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), a.len(), "a row was chosen twice");
    }

    #[test]
    fn duplicates_are_taken_before_a_row_is_chosen_twice() {
        let rows = vec![1.0, 1.0, 1.0, 2.0];
        let mut chosen = greedy_k_center(&rows, 1, 4, 0);
        chosen.sort_unstable();
        assert_eq!(chosen, vec![0, 1, 2, 3]);
    }

    #[test]
    fn projection_preserves_distances_roughly() {
        let (n, dim) = (50, 512);
        let rows = random_rows(n, dim, 3);
        let p = GaussianProjection::new(dim, 128, 5);
        let projected = p.apply(&rows);
        let mut worst = 0f32;
        for i in 0..n {
            for j in 0..i {
                let d = squared_distance(&rows[i * dim..(i + 1) * dim], &rows[j * dim..(j + 1) * dim]);
                let e =
                    squared_distance(&projected[i * 128..(i + 1) * 128], &projected[j * 128..(j + 1) * 128]);
                worst = worst.max((e / d - 1.0).abs());
            }
        }
        // JL: relative error ~ sqrt(8 ln n / m) for m = 128 dims
        assert!(worst < 0.5, "worst relative distortion {worst}");
    }

    #[test]
    fn streaming_in_one_chunk_equals_plain_greedy() {
        let dim = 8;
        let rows = random_rows(1000, dim, 4);
        let mut s = StreamingCoreset::new(dim, 4096, 0.1, None, false, 9);
        for part in rows.chunks(dim * 37) {
            s.push(part);
        }
        let BankData::F32(bank) = s.finish() else { panic!("f32 bank expected") };
        let direct: Vec<f32> = greedy_k_center(&rows, dim, 100, 9)
            .into_iter()
            .flat_map(|i| rows[i * dim..(i + 1) * dim].to_vec())
            .collect();
        assert_eq!(bank, direct);
    }

    #[test]
    fn chunked_streaming_keeps_the_ratio_and_bounds_the_covering_radius() {
        let dim = 4;
        let rows = random_rows(4000, dim, 6);
        let mut s = StreamingCoreset::new(dim, 1000, 0.05, None, true, 1);
        s.push(&rows);
        let BankData::F16(bank) = s.finish() else { panic!("f16 bank expected") };
        assert_eq!(bank.len() / dim, 200);
        let bank: Vec<f32> = bank.iter().map(|x| x.to_f32()).collect();
        let radius_of = |centres: &[f32]| {
            rows.chunks_exact(dim)
                .map(|r| {
                    centres.chunks_exact(dim).map(|c| squared_distance(r, c)).fold(f32::INFINITY, f32::min)
                })
                .fold(0f32, f32::max)
                .sqrt()
        };
        let global: Vec<f32> = greedy_k_center(&rows, dim, 200, 1)
            .into_iter()
            .flat_map(|i| rows[i * dim..(i + 1) * dim].to_vec())
            .collect();
        // the composed bank is a 4-approximation; in practice it stays close to global greedy
        let (chunked, single) = (radius_of(&bank), radius_of(&global));
        assert!(chunked < 2.0 * single, "chunked radius {chunked} vs global {single}");
    }
}
