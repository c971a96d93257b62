//! Bounding boxes of the predicted regions: 8-connected groups of flagged pixels (the region rule
//! of vigil-metrics' `count_regions`).

use serde::Serialize;
use vigil_core::Mask;

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Region {
    /// Left column and top row of the box, in pixels of the image.
    pub x: usize,
    pub y: usize,
    pub width: usize,
    pub height: usize,
    /// Flagged pixels in the region.
    pub pixels: usize,
}

/// Every 8-connected region of the mask, largest first (ties by position).
pub fn regions(mask: &Mask) -> Vec<Region> {
    let (w, h) = (mask.width, mask.height);
    let mut seen = vec![false; mask.data.len()];
    let mut stack = Vec::new();
    let mut out = Vec::new();
    for start in 0..mask.data.len() {
        if !mask.data[start] || seen[start] {
            continue;
        }
        seen[start] = true;
        stack.push(start);
        let (mut x0, mut y0, mut x1, mut y1, mut pixels) = (w, h, 0, 0, 0);
        while let Some(p) = stack.pop() {
            let (x, y) = (p % w, p / w);
            (x0, y0, x1, y1) = (x0.min(x), y0.min(y), x1.max(x), y1.max(y));
            pixels += 1;
            for ny in y.saturating_sub(1)..=(y + 1).min(h - 1) {
                for nx in x.saturating_sub(1)..=(x + 1).min(w - 1) {
                    let q = ny * w + nx;
                    if mask.data[q] && !seen[q] {
                        seen[q] = true;
                        stack.push(q);
                    }
                }
            }
        }
        out.push(Region { x: x0, y: y0, width: x1 - x0 + 1, height: y1 - y0 + 1, pixels });
    }
    out.sort_by(|a, b| b.pixels.cmp(&a.pixels).then((a.y, a.x).cmp(&(b.y, b.x))));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diagonal_neighbours_join_and_separate_groups_stay_apart() {
        // 5x4: a diagonal pair at (0,0),(1,1); an L of three at (3,1),(3,2),(4,2).
        let mut data = vec![false; 20];
        for (x, y) in [(0, 0), (1, 1), (3, 1), (3, 2), (4, 2)] {
            data[y * 5 + x] = true;
        }
        let mask = Mask::new(5, 4, data).unwrap();
        let r = regions(&mask);
        assert_eq!(
            r,
            vec![
                Region { x: 3, y: 1, width: 2, height: 2, pixels: 3 },
                Region { x: 0, y: 0, width: 2, height: 2, pixels: 2 },
            ]
        );
        assert_eq!(r.len(), vigil_metrics::count_regions(&mask).unwrap());
    }
}
