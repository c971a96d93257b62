//! Block NFA: detects unusual concentrations of "candidate" pixels in square windows
//! (Tailanian et al., thesis Sec. 3.3.4, after Gardella et al.).
//!
//! Under H0 a pixel is a candidate with probability `p`, independently of the others once the
//! map is sub-sampled every `s` pixels. Rather than sub-sampling, a w×w window holding |L| candidates
//! is scored as |L|/s² successes among w²/s² trials: at least one of the s² sub-sampling grids is
//! that significant. Each pixel gets the smallest NFA of the windows covering it.

use vigil_core::{Result, VigilError};

use crate::tails::log10_binomial_tail;

/// Parameters of the window test. The thesis uses window 51, stride 10, p = 0.01 and `s` = the
/// patch or filter size of the features that produced the per-pixel p-values.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockTest {
    pub window: usize,
    pub stride: usize,
    /// A pixel is a candidate when its own tail probability is below `p`.
    pub p: f64,
    /// The independence factor s: neighbours closer than s pixels are treated as dependent.
    pub independence: usize,
}

impl BlockTest {
    fn check(&self, width: usize, height: usize, len: usize) -> Result<()> {
        if self.window == 0 || self.stride == 0 || self.independence == 0 {
            return Err(VigilError::invalid(format!(
                "block test needs positive window, stride and independence factor, got {self:?}"
            )));
        }
        if !(self.p > 0.0 && self.p < 1.0) {
            return Err(VigilError::invalid(format!("block test p must lie in (0, 1), got {}", self.p)));
        }
        if width * height != len || len == 0 {
            return Err(VigilError::invalid(format!(
                "block test input holds {len} values, expected a non-empty {width}x{height} map"
            )));
        }
        Ok(())
    }

    /// Per-pixel log10 NFA from a map of per-pixel log10 tail probabilities: a pixel is a
    /// candidate when its probability under H0 is below `p`.
    pub fn log10_nfa_from_log10_pfa(
        &self,
        log10_pfa: &[f64],
        width: usize,
        height: usize,
    ) -> Result<Vec<f64>> {
        let threshold = self.p.log10();
        let exceeds: Vec<bool> = log10_pfa.iter().map(|&v| v < threshold).collect();
        self.log10_nfa(&exceeds, width, height)
    }

    /// Per-pixel log10 NFA from a boolean candidate map (row-major, `width`×`height`).
    ///
    /// Windows larger than the map shrink to it; the independence factor shrinks to the window so
    /// that a window always holds at least one independent trial. The number of tests counts the
    /// windows actually evaluated (the stride makes them overlap) times the s² sub-sampling grids;
    /// the thesis writes HW/w² windows, which undercounts overlapping windows.
    pub fn log10_nfa(&self, exceeds: &[bool], width: usize, height: usize) -> Result<Vec<f64>> {
        self.check(width, height, exceeds.len())?;
        let wx = self.window.min(width);
        let wy = self.window.min(height);
        let s = self.independence.min(wx).min(wy) as f64;
        let xs = window_starts(width, wx, self.stride);
        let ys = window_starts(height, wy, self.stride);

        // integral image of candidate counts: any window count in O(1)
        let iw = width + 1;
        let mut integral = vec![0u32; iw * (height + 1)];
        for y in 0..height {
            let mut row = 0u32;
            for x in 0..width {
                row += exceeds[y * width + x] as u32;
                integral[(y + 1) * iw + x + 1] = integral[y * iw + x + 1] + row;
            }
        }
        let window_count = |x0: usize, y0: usize| -> u32 {
            let (x1, y1) = (x0 + wx, y0 + wy);
            integral[y1 * iw + x1] + integral[y0 * iw + x0] - integral[y0 * iw + x1] - integral[y1 * iw + x0]
        };

        let log10_tests = ((xs.len() * ys.len()) as f64 * s * s).log10();
        let trials = (wx * wy) as f64 / (s * s);
        let mut out = vec![f64::INFINITY; width * height];
        for &y0 in &ys {
            for &x0 in &xs {
                let successes = window_count(x0, y0) as f64 / (s * s);
                let nfa = log10_tests + log10_binomial_tail(trials, successes, self.p);
                for y in y0..y0 + wy {
                    for v in &mut out[y * width + x0..y * width + x0 + wx] {
                        *v = v.min(nfa);
                    }
                }
            }
        }
        Ok(out)
    }
}

/// Window origins every `stride` pixels, plus one flush with the far edge so every pixel is covered.
fn window_starts(len: usize, window: usize, stride: usize) -> Vec<usize> {
    let last = len - window;
    let mut starts: Vec<usize> = (0..=last).step_by(stride).collect();
    if *starts.last().unwrap_or(&usize::MAX) != last {
        starts.push(last);
    }
    starts
}

#[cfg(test)]
mod tests {
    use super::*;

    const THESIS: BlockTest = BlockTest { window: 51, stride: 10, p: 0.01, independence: 17 };

    #[test]
    fn windows_cover_the_whole_map() {
        assert_eq!(window_starts(128, 51, 10), vec![0, 10, 20, 30, 40, 50, 60, 70, 77]);
        assert_eq!(window_starts(51, 51, 10), vec![0]);
    }

    #[test]
    fn a_dense_cluster_is_detected_where_it_is_and_nowhere_else() {
        let (w, h) = (200, 160);
        let mut exceeds = vec![false; w * h];
        // 45x45 candidates = 7 of 9 independent trials at p = 0.01
        for y in 100..145 {
            for x in 20..65 {
                exceeds[y * w + x] = true;
            }
        }
        let nfa = THESIS.log10_nfa(&exceeds, w, h).unwrap();
        assert!(nfa[120 * w + 40] < -5.0, "cluster centre: {}", nfa[120 * w + 40]);
        // far from the cluster no window holds a candidate: probability 1, NFA = number of tests
        let far = nfa[10 * w + 190];
        let n_windows = window_starts(w, 51, 10).len() * window_starts(h, 51, 10).len();
        assert!((far - (n_windows as f64 * 289.0).log10()).abs() < 1e-12, "far: {far}");
    }

    #[test]
    fn one_isolated_candidate_is_not_meaningful() {
        let (w, h) = (128, 128);
        let mut exceeds = vec![false; w * h];
        exceeds[64 * w + 64] = true;
        let nfa = THESIS.log10_nfa(&exceeds, w, h).unwrap();
        assert!(nfa.iter().all(|&v| v > 0.0));
    }

    #[test]
    fn pfa_input_thresholds_at_p() {
        let (w, h) = (60, 60);
        let pfa: Vec<f64> = (0..w * h).map(|i| if i % 2 == 0 { -3.0 } else { -1.0 }).collect();
        let from_pfa = THESIS.log10_nfa_from_log10_pfa(&pfa, w, h).unwrap();
        let exceeds: Vec<bool> = (0..w * h).map(|i| i % 2 == 0).collect();
        assert_eq!(from_pfa, THESIS.log10_nfa(&exceeds, w, h).unwrap());
        assert!(from_pfa[0] < -2.0, "half the pixels at p=0.01 is significant: {}", from_pfa[0]);
    }

    #[test]
    fn small_maps_shrink_the_window_and_bad_input_is_an_error() {
        // 16x16 with s shrunk to 16 is one trial: all candidates means probability p, times 256 grids
        let nfa = THESIS.log10_nfa(&[true; 16 * 16], 16, 16).unwrap();
        assert!(nfa.iter().all(|v| (v - (256f64.log10() - 2.0)).abs() < 1e-9), "{}", nfa[0]);
        assert!(THESIS.log10_nfa(&[true; 10], 4, 4).is_err());
        let bad = BlockTest { p: 1.5, ..THESIS };
        assert!(bad.log10_nfa(&[true; 16], 4, 4).is_err());
    }
}
