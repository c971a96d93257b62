//! RegionNFA (thesis Sec. 3.3.4, after Grompone von Gioi et al., IPOL 2021): 4-connected regions
//! of a map of χ²(1) distances, each tested as a whole.
//!
//! A region R of N pixels whose distances sum to D is scored as
//! NFA(R) = (H·W / s̃²) · A(N/s̃²) · P[χ²(N/s̃²) > D/s̃²], where A(r) = α β^r / r counts the
//! polyominoes of size r and s̃ is the receptive-field factor: the distances were up-sampled from a
//! coarser feature grid, so only about one pixel in s̃² carries independent information.
//!
//! Two ways to grow a region from a seed pixel whose distance reaches the threshold:
//! [`Growing::Reference`] is the author's code (`region_nfa.py`): a plain flood fill over every
//! 4-connected pixel at or above the threshold. [`Growing::Thesis`] is what the thesis text says:
//! a neighbour at or above the threshold joins only if it lowers the region's NFA. The thesis does
//! not say in which order; here seeds are taken from the largest distance down and each region
//! offers its largest-distance neighbour first (best-first growth).

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::collections::VecDeque;

use serde::{Deserialize, Serialize};
use vigil_core::{Result, VigilError};

use crate::polyomino::log10_polyominoes_of_size;
use crate::tails::log10_chi2_sf;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Growing {
    /// Flood fill over pixels with distance ≥ threshold (the author's `compute_neighbors`).
    Reference,
    /// Best-first growth (largest distance first); a neighbour joins only if it lowers the NFA.
    Thesis,
}

/// The region test on one W×H map of per-pixel χ²(1) distances.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RegionTest {
    /// Pixels with distance below this never join a region (the reference code's 0.5).
    pub threshold: f64,
    /// The receptive-field factor s̃ (the reference code's 12 for ResNet-50 layer1 at stride 4).
    pub receptive_field: f64,
    pub growing: Growing,
}

impl RegionTest {
    /// log10 NFA of a region of `pixels` pixels whose distances sum to `sum`, in a `map_pixels` map.
    pub fn log10_nfa(&self, pixels: usize, sum: f64, map_pixels: usize) -> f64 {
        let s2 = self.receptive_field * self.receptive_field;
        let size = pixels as f64 / s2;
        (map_pixels as f64 / s2).log10() + log10_polyominoes_of_size(size) + log10_chi2_sf(sum / s2, size)
    }

    /// Per-pixel log10 NFA of the region holding it; `f64::INFINITY` for pixels in no region.
    /// Pixels flagged in `excluded` never join a region.
    pub fn region_map(
        &self,
        distances: &[f64],
        width: usize,
        height: usize,
        excluded: Option<&[bool]>,
    ) -> Result<Vec<f64>> {
        let n = width * height;
        if distances.len() != n || n == 0 {
            return Err(VigilError::invalid(format!(
                "region test input holds {} values, expected a non-empty {width}x{height} map",
                distances.len()
            )));
        }
        if excluded.is_some_and(|m| m.len() != n) {
            return Err(VigilError::invalid("region test exclusion mask does not match the map"));
        }
        if !(self.receptive_field >= 1.0 && self.threshold > 0.0) {
            return Err(VigilError::invalid(format!(
                "region test needs a receptive-field factor of at least 1 and a positive threshold, got {self:?}"
            )));
        }
        let eligible: Vec<bool> =
            (0..n).map(|i| distances[i] >= self.threshold && !excluded.is_some_and(|m| m[i])).collect();
        let mut out = vec![f64::INFINITY; n];
        let mut used = vec![false; n];
        // Thesis growth: the region number that last offered each pixel, so a pixel rejected by
        // one region can still seed or join a later one.
        let mut offered = vec![u32::MAX; n];
        let mut region_id = 0u32;
        let mut members = Vec::new();
        // Flood-fill regions do not depend on the seed order (the reference scans rows); growth by
        // NFA does, and starts from the most distant pixels so that a weak region cannot reach a
        // strong one first and absorb it.
        let mut seeds: Vec<usize> = (0..n).filter(|&i| eligible[i]).collect();
        if self.growing == Growing::Thesis {
            seeds.sort_by(|&a, &b| distances[b].total_cmp(&distances[a]).then(a.cmp(&b)));
        }
        for seed in seeds {
            if used[seed] {
                continue;
            }
            members.clear();
            let sum = match self.growing {
                Growing::Reference => {
                    flood_fill(seed, distances, &eligible, &mut used, width, height, &mut members)
                }
                Growing::Thesis => {
                    region_id += 1;
                    self.grow_by_nfa(
                        seed,
                        distances,
                        &eligible,
                        &mut used,
                        &mut offered,
                        region_id,
                        width,
                        height,
                        &mut members,
                    )
                }
            };
            let nfa = self.log10_nfa(members.len(), sum, n);
            for &p in &members {
                out[p] = nfa;
            }
        }
        Ok(out)
    }

    #[allow(clippy::too_many_arguments)]
    fn grow_by_nfa(
        &self,
        seed: usize,
        distances: &[f64],
        eligible: &[bool],
        used: &mut [bool],
        offered: &mut [u32],
        region_id: u32,
        width: usize,
        height: usize,
        members: &mut Vec<usize>,
    ) -> f64 {
        let n = width * height;
        used[seed] = true;
        members.push(seed);
        let mut sum = distances[seed];
        let mut nfa = self.log10_nfa(1, sum, n);
        let mut frontier = BinaryHeap::new();
        let mut offer = |p: usize, frontier: &mut BinaryHeap<Candidate>, used: &[bool]| {
            for q in neighbours(p, width, height) {
                if eligible[q] && !used[q] && offered[q] != region_id {
                    offered[q] = region_id;
                    frontier.push(Candidate { distance: distances[q], index: q });
                }
            }
        };
        offer(seed, &mut frontier, used);
        while let Some(Candidate { distance, index }) = frontier.pop() {
            let grown = self.log10_nfa(members.len() + 1, sum + distance, n);
            if grown < nfa {
                nfa = grown;
                sum += distance;
                used[index] = true;
                members.push(index);
                offer(index, &mut frontier, used);
            }
        }
        sum
    }
}

/// A frontier pixel, ordered by distance (ties: lower index first, for determinism).
#[derive(PartialEq)]
struct Candidate {
    distance: f64,
    index: usize,
}

impl Eq for Candidate {}

impl Ord for Candidate {
    fn cmp(&self, other: &Self) -> Ordering {
        self.distance.total_cmp(&other.distance).then_with(|| other.index.cmp(&self.index))
    }
}

impl PartialOrd for Candidate {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// Marks and collects the 4-connected eligible pixels reachable from `seed`; returns their
/// distance sum.
fn flood_fill(
    seed: usize,
    distances: &[f64],
    eligible: &[bool],
    used: &mut [bool],
    width: usize,
    height: usize,
    members: &mut Vec<usize>,
) -> f64 {
    let mut queue = VecDeque::from([seed]);
    used[seed] = true;
    let mut sum = 0.0;
    while let Some(p) = queue.pop_front() {
        members.push(p);
        sum += distances[p];
        for q in neighbours(p, width, height) {
            if eligible[q] && !used[q] {
                used[q] = true;
                queue.push_back(q);
            }
        }
    }
    sum
}

/// The 4-connected neighbours of pixel `p` inside a width×height map.
fn neighbours(p: usize, width: usize, height: usize) -> impl Iterator<Item = usize> {
    let (x, y) = (p % width, p / width);
    [
        (x > 0).then(|| p - 1),
        (x + 1 < width).then(|| p + 1),
        (y > 0).then(|| p - width),
        (y + 1 < height).then(|| p + width),
    ]
    .into_iter()
    .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    const REFERENCE: RegionTest =
        RegionTest { threshold: 0.5, receptive_field: 12.0, growing: Growing::Reference };

    #[test]
    fn region_nfa_matches_the_reference_formula() {
        // scipy: ln H + ln W − ln 144 + ln α + (N/144) ln β − ln(N/144) + chi2.logsf(D/144, N/144), / ln 10
        for (pixels, sum, want) in [
            (1, 0.7, 2.594_369_525_821_176),
            (2, 1.5, 2.530_709_120_303_639),
            (50, 120.0, 1.920_814_106_684_926),
            (300, 2000.0, 0.139_921_147_558_742),
            (1000, 900.0, 5.248_146_236_256_122),
        ] {
            let got = REFERENCE.log10_nfa(pixels, sum, 256 * 256);
            assert!((got - want).abs() < 1e-9, "N={pixels} D={sum}: {got} vs {want}");
        }
    }

    #[test]
    fn flood_fill_is_the_reference_unit_test() {
        // region_nfa.py's unit_test: seed (0,0), threshold 0.5 → region {(0,0),(1,0),(1,1),(2,1)}, score 2.7
        let d = [0.8, 0.1, 0.1, 0.3, 0.6, 0.7, 0.4, 0.1, 0.1, 0.6, 0.3, 0.2];
        let map = REFERENCE.region_map(&d, 4, 3, None).unwrap();
        let want = REFERENCE.log10_nfa(4, 2.7, 12);
        let in_region = [0, 4, 5, 9];
        for (i, v) in map.iter().enumerate() {
            if in_region.contains(&i) {
                assert!((v - want).abs() < 1e-12, "pixel {i}: {v}");
            } else {
                assert_eq!(*v, f64::INFINITY, "pixel {i} is in no region");
            }
        }
        // an excluded pixel splits the region: (1,1) out leaves {(0,0),(1,0)} and {(2,1)}
        let mut excluded = vec![false; 12];
        excluded[5] = true;
        let map = REFERENCE.region_map(&d, 4, 3, Some(&excluded)).unwrap();
        assert!((map[0] - REFERENCE.log10_nfa(2, 1.4, 12)).abs() < 1e-12);
        assert!((map[9] - REFERENCE.log10_nfa(1, 0.6, 12)).abs() < 1e-12);
        assert_eq!(map[5], f64::INFINITY);
    }

    #[test]
    fn a_strong_blob_is_meaningful_and_thesis_growth_stops_at_weak_pixels() {
        // A 40x40 blob of distance 9 inside a 128x128 map of 0.6 (above the threshold, below the χ²(1) mean).
        let (w, h) = (128, 128);
        let mut d = vec![0.6; w * h];
        for y in 40..80 {
            for x in 40..80 {
                d[y * w + x] = 9.0;
            }
        }
        let reference = REFERENCE.region_map(&d, w, h, None).unwrap();
        // the flood fill swallows the whole map (every pixel is ≥ 0.5): one region
        assert!(reference.iter().all(|&v| v == reference[0]));
        let thesis = RegionTest { growing: Growing::Thesis, ..REFERENCE };
        let grown = thesis.region_map(&d, w, h, None).unwrap();
        let blob = grown[60 * w + 60];
        assert!((blob - thesis.log10_nfa(1600, 1600.0 * 9.0, w * h)).abs() < 1e-9, "blob: {blob}");
        assert!(blob < -5.0, "the blob is meaningful: {blob}");
        assert!(blob < reference[0], "growth by NFA keeps the blob apart: {blob} vs {}", reference[0]);
        assert!(grown[5 * w + 5] > 0.0, "weak background regions are not meaningful: {}", grown[5 * w + 5]);
    }

    #[test]
    fn bad_input_is_an_error() {
        assert!(REFERENCE.region_map(&[1.0; 5], 2, 3, None).is_err());
        assert!(REFERENCE.region_map(&[1.0; 6], 2, 3, Some(&[false; 2])).is_err());
        let bad = RegionTest { receptive_field: 0.0, ..REFERENCE };
        assert!(bad.region_map(&[1.0; 6], 2, 3, None).is_err());
    }
}
