//! Score and label element types, input validation and the descending sort every ranking
//! metric starts from.

use std::cmp::Ordering;

use rayon::slice::ParallelSliceMut;
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

/// LSD radix sort on the 32-bit key, 8 bits per pass: pixel metrics sort millions of scores and
/// a comparison sort was the bottleneck of AUPRO.
fn radix_sort_descending(items: &mut Vec<(f32, u32)>) {
    let n = items.len();
    if n < 2 {
        return;
    }
    let mut histograms = [[0usize; 256]; 4];
    for &(s, _) in items.iter() {
        let k = descending_key(s);
        for (pass, hist) in histograms.iter_mut().enumerate() {
            hist[((k >> (8 * pass)) & 0xff) as usize] += 1;
        }
    }
    let mut scratch: Vec<(f32, u32)> = vec![(0.0, 0); n];
    for (pass, hist) in histograms.iter().enumerate() {
        // A digit shared by every key would leave the order unchanged: skip the pass.
        if hist.contains(&n) {
            continue;
        }
        let mut offsets = [0usize; 256];
        let mut total = 0;
        for (offset, &count) in offsets.iter_mut().zip(hist.iter()) {
            *offset = total;
            total += count;
        }
        for &item in items.iter() {
            let digit = ((descending_key(item.0) >> (8 * pass)) & 0xff) as usize;
            scratch[offsets[digit]] = item;
            offsets[digit] += 1;
        }
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
    fn non_finite_scores_are_rejected_with_their_index() {
        let e = check_scores(&[0.1f64, f64::NAN], "roc_auc").unwrap_err().to_string();
        assert!(e.contains("score #1 is NaN"), "{e}");
        let e = check_scores(&[f32::INFINITY], "aupro").unwrap_err().to_string();
        assert!(e.contains("score #0 is inf"), "{e}");
        assert!(check_scores::<f64>(&[], "x").unwrap_err().to_string().contains("no scores"));
    }
}
