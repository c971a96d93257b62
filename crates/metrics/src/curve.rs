//! Curves for plotting: ROC, precision–recall and per-region-overlap points.

use serde::{Deserialize, Serialize};

/// One point of a curve. `threshold` is the lowest score flagged at this point, i.e. the point
/// counts `score >= threshold` as anomalous (as scikit-learn's curves do); the leading point of
/// ROC and PR curves has threshold +∞ (nothing flagged).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct CurvePoint {
    pub x: f64,
    pub y: f64,
    pub threshold: f64,
}

/// Points ordered by decreasing threshold. What `x` and `y` are depends on the curve:
/// ROC (x = FPR, y = TPR), PR (x = recall, y = precision), PRO (x = FPR, y = mean region overlap).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Curve {
    pub points: Vec<CurvePoint>,
}

impl Curve {
    /// At most `max_points` points (at least 2) taken at evenly spaced indices, keeping the first
    /// and last. For plots only: the metrics themselves always use every point.
    pub fn downsampled(&self, max_points: usize) -> Curve {
        let n = self.points.len();
        let m = max_points.max(2);
        if n <= m {
            return self.clone();
        }
        let points = (0..m).map(|i| self.points[i * (n - 1) / (m - 1)]).collect();
        Curve { points }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn downsampling_keeps_ends_and_bounds_the_count() {
        let points = (0..1001).map(|i| CurvePoint { x: i as f64, y: 0.0, threshold: -(i as f64) }).collect();
        let curve = Curve { points };
        let small = curve.downsampled(11);
        assert_eq!(small.points.len(), 11);
        assert_eq!(small.points[0].x, 0.0);
        assert_eq!(small.points[10].x, 1000.0);
        assert_eq!(small.points[5].x, 500.0);
        assert_eq!(curve.downsampled(5000).points.len(), 1001);
    }
}
