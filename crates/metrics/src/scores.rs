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

/// Bits of the key sorted per pass: four passes cover the 32-bit key. Wider digits take fewer
/// passes but scatter to more places at once, and measured slower (11 bits: 3 passes, +10%).
const DIGIT_BITS: u32 = 8;
const BUCKETS: usize = 1 << DIGIT_BITS;
const PASSES: u32 = 32_u32.div_ceil(DIGIT_BITS);

#[inline]
fn digit(item: &(f32, u32), pass: u32) -> usize {
    ((descending_key(item.0) >> (DIGIT_BITS * pass)) as usize) & (BUCKETS - 1)
}

/// Below this many items one thread sorts: splitting would cost more than it saves.
const PARALLEL_MIN: usize = 1 << 16;

/// Stable LSD radix sort on the 32-bit key, 8 bits per pass: pixel metrics sort millions of
/// scores and a comparison sort was the bottleneck of AUPRO. Each pass splits the items into one
/// part per rayon thread; every part's items of one digit go to their own stretch of the output
/// (after those of the earlier parts), so the result is the same as a sequential stable sort.
fn radix_sort_descending(items: &mut Vec<(f32, u32)>) {
    let n = items.len();
    if n < 2 {
        return;
    }
    let parts = if n < PARALLEL_MIN { 1 } else { rayon::current_num_threads().max(1) };
    let part_len = n.div_ceil(parts);
    let mut scratch: Vec<(f32, u32)> = vec![(0.0, 0); n];
    for pass in 0..PASSES {
        // counts[p][d]: items of part p whose digit is d
        let counts: Vec<Vec<usize>> = items
            .par_chunks(part_len)
            .map(|part| {
                let mut count = vec![0usize; BUCKETS];
                for item in part {
                    count[digit(item, pass)] += 1;
                }
                count
            })
            .collect();
        // A digit shared by every key would leave the order unchanged: skip the pass.
        if (0..BUCKETS).any(|d| counts.iter().map(|c| c[d]).sum::<usize>() == n) {
            continue;
        }
        // Cut the output into the stretches (digit-major, part-minor) each part writes.
        let mut stretches: Vec<Vec<&mut [(f32, u32)]>> =
            (0..counts.len()).map(|_| Vec::with_capacity(BUCKETS)).collect();
        let mut rest: &mut [(f32, u32)] = &mut scratch;
        for d in 0..BUCKETS {
            for (part, count) in counts.iter().enumerate() {
                let (stretch, tail) = rest.split_at_mut(count[d]);
                stretches[part].push(stretch);
                rest = tail;
            }
        }
        items.par_chunks(part_len).zip(stretches.into_par_iter()).for_each(|(part, mut out)| {
            for &item in part {
                // Each stretch shrinks from the front as it is filled; it holds exactly the
                // part's items of its digit, so it is never empty here.
                let stretch = std::mem::take(&mut out[digit(&item, pass)]);
                if let Some((slot, rest)) = stretch.split_first_mut() {
                    *slot = item;
                    out[digit(&item, pass)] = rest;
                }
            }
        });
        std::mem::swap(items, &mut scratch);
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
    fn non_finite_scores_are_rejected_with_their_index() {
        let e = check_scores(&[0.1f64, f64::NAN], "roc_auc").unwrap_err().to_string();
        assert!(e.contains("score #1 is NaN"), "{e}");
        let e = check_scores(&[f32::INFINITY], "aupro").unwrap_err().to_string();
        assert!(e.contains("score #0 is inf"), "{e}");
        assert!(check_scores::<f64>(&[], "x").unwrap_err().to_string().contains("no scores"));
    }
}
