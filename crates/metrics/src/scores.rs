//! Score and label element types, input validation and the descending sort every ranking
//! metric starts from.

use std::cmp::Ordering;

use rayon::prelude::*;
use vigil_core::{Result, VigilError};

/// A score type the metrics accept: `f64` for image scores, `f32` for pixel maps.
pub trait Score: Copy + PartialOrd + Send + Sync + Into<f64> + 'static {
    /// Sorts `(score, payload)` pairs by descending score so that equal scores are adjacent.
    /// Scores must already be checked finite.
    fn sort_descending(items: &mut Vec<(Self, u32)>);
}

impl Score for f64 {
    fn sort_descending(items: &mut Vec<(Self, u32)>) {
        // Finite scores were checked, so `partial_cmp` never fails; -0.0 and 0.0 compare equal
        // and therefore stay one tie, as in numpy.
        items.par_sort_unstable_by(|a, b| b.0.partial_cmp(&a.0).unwrap_or(Ordering::Equal));
    }
}

impl Score for f32 {
    fn sort_descending(items: &mut Vec<(Self, u32)>) {
        radix_sort_descending(items);
    }
}

/// A ground-truth label: `bool`, or `u8` where any non-zero value is anomalous.
pub trait Label: Copy + Send + Sync {
    fn is_anomalous(self) -> bool;
}

impl Label for bool {
    #[inline]
    fn is_anomalous(self) -> bool {
        self
    }
}

impl Label for u8 {
    #[inline]
    fn is_anomalous(self) -> bool {
        self != 0
    }
}

/// Rejects empty input and non-finite scores, which would silently misorder every ranking.
pub(crate) fn check_scores<S: Score>(scores: &[S], what: &str) -> Result<()> {
    if scores.is_empty() {
        return Err(VigilError::invalid(format!("{what}: no scores given")));
    }
    match scores.iter().position(|&s| !s.into().is_finite()) {
        None => Ok(()),
        Some(i) => Err(VigilError::invalid(format!(
            "{what}: score #{i} is {}; scores must be finite (NaN or infinity usually means a broken map)",
            scores[i].into()
        ))),
    }
}

pub(crate) fn check_same_len(n_scores: usize, n_labels: usize, what: &str) -> Result<()> {
    if n_scores != n_labels {
        return Err(VigilError::invalid(format!("{what}: {n_scores} scores but {n_labels} labels")));
    }
    Ok(())
}

/// Maps an `f32` to a `u32` whose unsigned order is the *descending* order of the floats.
/// -0.0 is folded onto 0.0 first so that both land in one tie, as a float comparison would.
#[inline]
fn descending_key(v: f32) -> u32 {
    let v = if v == 0.0 { 0.0 } else { v };
    let bits = v.to_bits();
    let ascending = if bits & 0x8000_0000 != 0 { !bits } else { bits | 0x8000_0000 };
    !ascending
}

/// Bits of the first (most significant) digit: the items are split into up to this many buckets
/// in one pass over memory, each bucket then small enough to be sorted by its remaining bits
/// inside the cache.
const TOP_BITS: u32 = 12;
/// Bits of each later digit, sorted within a bucket.
const DIGIT_BITS: u32 = 8;
const BUCKETS: usize = 1 << DIGIT_BITS;

/// Below this many items one thread sorts: splitting would cost more than it saves.
const PARALLEL_MIN: usize = 1 << 16;

/// Buckets of at most this many items are sorted by insertion.
const INSERTION_MAX: usize = 32;

/// A score with its payload, as sorted.
type Item = (f32, u32);

/// Stable radix sort on the 32-bit key: pixel metrics sort millions of scores and a comparison
/// sort was the bottleneck of AUPRO. The first pass distributes the items by the [`TOP_BITS`]
/// highest bits in which the keys differ (the bits all keys share order nothing); each bucket is
/// then sorted on its own by the bits below, [`DIGIT_BITS`] per pass (least significant first),
/// buckets in parallel. Every pass keeps the order of equal digits, so the result is the stable
/// descending order, whatever the number of threads. Four passes over the whole array (8-bit
/// digits) took most of the time of the pixel metrics; here one pass touches main memory and the
/// rest stays in the cache.
fn radix_sort_descending(items: &mut [(f32, u32)]) {
    let n = items.len();
    if n < 2 {
        return;
    }
    let parallel = n >= PARALLEL_MIN;
    let bounds = |part: &[(f32, u32)]| {
        part.iter().fold((u32::MAX, 0u32), |(lo, hi), item| {
            let k = descending_key(item.0);
            (lo.min(k), hi.max(k))
        })
    };
    let (lo, hi) = if parallel {
        items
            .par_chunks(PARALLEL_MIN)
            .map(bounds)
            .reduce(|| (u32::MAX, 0), |a, b| (a.0.min(b.0), a.1.max(b.1)))
    } else {
        bounds(items)
    };
    // The bits at and below the highest one in which two keys differ; above it every key is the same.
    let varying = 32 - (lo ^ hi).leading_zeros();
    if varying == 0 {
        return;
    }
    let shift = varying.saturating_sub(TOP_BITS);
    let top_buckets = 1usize << (varying - shift);
    let top = |item: &(f32, u32)| ((descending_key(item.0) >> shift) as usize) & (top_buckets - 1);
    let parts = if parallel { rayon::current_num_threads().max(1) } else { 1 };
    let part_len = n.div_ceil(parts);
    let mut scratch: Vec<(f32, u32)> = vec![(0.0, 0); n];
    // counts[p][d]: items of part p whose top digit is d
    let counts: Vec<Vec<usize>> = items
        .par_chunks(part_len)
        .map(|part| {
            let mut count = vec![0usize; top_buckets];
            for item in part {
                count[top(item)] += 1;
            }
            count
        })
        .collect();
    // Cut the output into the stretches (digit-major, part-minor) each part writes.
    let mut stretches: Vec<Vec<&mut [(f32, u32)]>> =
        (0..counts.len()).map(|_| Vec::with_capacity(top_buckets)).collect();
    let mut rest: &mut [(f32, u32)] = &mut scratch;
    for d in 0..top_buckets {
        for (part, count) in counts.iter().enumerate() {
            let (stretch, tail) = rest.split_at_mut(count[d]);
            stretches[part].push(stretch);
            rest = tail;
        }
    }
    items.par_chunks(part_len).zip(stretches.into_par_iter()).for_each(|(part, mut out)| {
        let mut filled = vec![0usize; top_buckets];
        for item in part {
            let d = top(item);
            out[d][filled[d]] = *item;
            filled[d] += 1;
        }
    });
    // Each bucket is sorted by the bits below the top digit, from scratch back into items.
    let mut buckets: Vec<(&mut [Item], &mut [Item])> = Vec::with_capacity(top_buckets);
    let (mut from, mut to): (&mut [Item], &mut [Item]) = (&mut scratch, items);
    for d in 0..top_buckets {
        let len: usize = counts.iter().map(|c| c[d]).sum();
        let (a, from_rest) = from.split_at_mut(len);
        let (b, to_rest) = to.split_at_mut(len);
        if len > 0 {
            buckets.push((a, b));
        }
        (from, to) = (from_rest, to_rest);
    }
    let sort_bucket = |(from, to): (&mut [Item], &mut [Item])| sort_low_bits(from, to, shift);
    if parallel {
        buckets.into_par_iter().for_each(sort_bucket);
    } else {
        buckets.into_iter().for_each(sort_bucket);
    }
}

/// Sorts `from` stably by the `bits` low bits of the key into `to` (same length; `from` is
/// scratch afterwards).
fn sort_low_bits(from: &mut [(f32, u32)], to: &mut [(f32, u32)], bits: u32) {
    if from.len() <= INSERTION_MAX {
        to.copy_from_slice(from);
        let low = |item: &(f32, u32)| descending_key(item.0) & ((1u64 << bits) - 1) as u32;
        for i in 1..to.len() {
            let item = to[i];
            let mut j = i;
            while j > 0 && low(&to[j - 1]) > low(&item) {
                to[j] = to[j - 1];
                j -= 1;
            }
            to[j] = item;
        }
        return;
    }
    // The sorted items are in `from` after an even number of passes, in `to` after an odd one.
    let (mut src, mut dst) = (from, to);
    let mut in_to = false;
    for pass in 0..bits.div_ceil(DIGIT_BITS) {
        let shift = pass * DIGIT_BITS;
        let digit = |item: &(f32, u32)| ((descending_key(item.0) >> shift) as usize) & (BUCKETS - 1);
        let mut offsets = [0usize; BUCKETS];
        for item in src.iter() {
            offsets[digit(item)] += 1;
        }
        // A digit shared by every item would leave the order unchanged: skip the pass.
        if offsets.contains(&src.len()) {
            continue;
        }
        let mut sum = 0;
        for o in offsets.iter_mut() {
            (*o, sum) = (sum, sum + *o);
        }
        for item in src.iter() {
            let d = digit(item);
            dst[offsets[d]] = *item;
            offsets[d] += 1;
        }
        (src, dst) = (dst, src);
        in_to = !in_to;
    }
    if !in_to {
        // an even number of passes left the sorted items in `from`
        dst.copy_from_slice(src);
    }
}

/// Pairs each score with a 0/1 anomalous flag and sorts them by descending score.
pub(crate) fn sorted_with_labels<S: Score, L: Label>(scores: &[S], labels: &[L]) -> Vec<(S, u32)> {
    let mut items: Vec<(S, u32)> =
        scores.iter().zip(labels.iter()).map(|(&s, &l)| (s, l.is_anomalous() as u32)).collect();
    S::sort_descending(&mut items);
    items
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn radix_sort_orders_floats_descending_with_signed_zeros_tied() {
        let values = [3.5f32, -1.0, 0.0, -0.0, f32::MAX, -f32::MAX, 1e-30, -1e-30, 2.0, 3.5, -7.25];
        let mut items: Vec<(f32, u32)> = values.iter().enumerate().map(|(i, &v)| (v, i as u32)).collect();
        radix_sort_descending(&mut items);
        for w in items.windows(2) {
            assert!(w[0].0 >= w[1].0, "{:?} before {:?}", w[0], w[1]);
        }
        assert_eq!(descending_key(0.0), descending_key(-0.0));
        let mut payloads: Vec<u32> = items.iter().map(|p| p.1).collect();
        payloads.sort();
        assert_eq!(payloads, (0..values.len() as u32).collect::<Vec<_>>());
    }

    #[test]
    fn radix_sort_matches_comparison_sort_on_pseudo_random_input() {
        let mut state = 12345u64;
        let mut items: Vec<(f32, u32)> = (0..5000)
            .map(|i| {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((((state >> 33) as i64 - (1 << 30)) as f32) / 1e5, i)
            })
            .collect();
        let mut expected: Vec<f32> = items.iter().map(|p| p.0).collect();
        expected.sort_by(|a, b| b.partial_cmp(a).unwrap());
        radix_sort_descending(&mut items);
        assert_eq!(items.iter().map(|p| p.0).collect::<Vec<_>>(), expected);
    }

    #[test]
    fn parallel_radix_sort_is_the_stable_descending_order() {
        // Enough items for the parallel path; few distinct values, so long runs of ties whose
        // order (the payload, the original position) must be kept, signed zeros among them.
        let mut state = 777u64;
        let mut items: Vec<(f32, u32)> = (0..3 * PARALLEL_MIN as u32)
            .map(|i| {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                let v = ((state >> 33) % 301) as f32 / 10.0 - 15.0;
                (if v == 0.0 && i % 2 == 1 { -0.0 } else { v }, i)
            })
            .collect();
        let mut expected = items.clone();
        expected.sort_by(|a, b| b.0.partial_cmp(&a.0).unwrap());
        radix_sort_descending(&mut items);
        assert!(items.iter().zip(&expected).all(|(a, b)| a.0.to_bits() == b.0.to_bits() && a.1 == b.1));
    }

    #[test]
    fn radix_sort_is_stable_for_narrow_and_wide_key_ranges() {
        // Scores sharing their sign and exponent (the top digit then starts inside the mantissa),
        // scores spread over many magnitudes, and a few items (insertion-sorted buckets): each
        // the order of a stable comparison sort, ties in input order.
        let mut state = 4242u64;
        let mut next = move || {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (state >> 33) as u32
        };
        let narrow: Vec<f32> = (0..200_000).map(|_| 1.0 + (next() % 50_000) as f32 / 65_536.0).collect();
        let wide: Vec<f32> = (0..200_000)
            .map(|_| {
                let v = f32::from_bits(next() & 0xBFFF_FFFF);
                if v.is_finite() {
                    v
                } else {
                    1.0
                }
            })
            .collect();
        let few: Vec<f32> = (0..300).map(|_| (next() % 7) as f32 - 3.0).collect();
        for values in [narrow, wide, few] {
            let mut items: Vec<(f32, u32)> = values.iter().enumerate().map(|(i, &v)| (v, i as u32)).collect();
            let mut expected = items.clone();
            expected.sort_by(|a, b| b.0.partial_cmp(&a.0).unwrap());
            radix_sort_descending(&mut items);
            assert!(items.iter().zip(&expected).all(|(a, b)| a.0.to_bits() == b.0.to_bits() && a.1 == b.1));
        }
    }

    #[test]
    fn non_finite_scores_are_rejected_with_their_index() {
        let e = check_scores(&[0.1f64, f64::NAN], "roc_auc").unwrap_err().to_string();
        assert!(e.contains("score #1 is NaN"), "{e}");
        let e = check_scores(&[f32::INFINITY], "aupro").unwrap_err().to_string();
        assert!(e.contains("score #0 is inf"), "{e}");
        assert!(check_scores::<f64>(&[], "x").unwrap_err().to_string().contains("no scores"));
    }
}
