//! Which positions of a flow's feature grid an ignore mask leaves in the loss.

use vigil_core::Mask;

/// 1 for each position of a `side`×`side` grid over the image whose cell holds no ignored pixel,
/// 0 for the others (row-major). Cells take the pixels they overlap, so a cell touching the
/// ignored region by a fraction of a pixel is left out too.
pub fn kept_positions(ignore: &Mask, side: usize) -> Vec<f32> {
    let (w, h) = (ignore.width, ignore.height);
    let mut kept = vec![1f32; side * side];
    for cy in 0..side {
        let (y0, y1) = (cy * h / side, ((cy + 1) * h).div_ceil(side).min(h));
        for cx in 0..side {
            let (x0, x1) = (cx * w / side, ((cx + 1) * w).div_ceil(side).min(w));
            if (y0..y1).any(|y| ignore.data[y * w + x0..y * w + x1].iter().any(|&i| i)) {
                kept[cy * side + cx] = 0.0;
            }
        }
    }
    kept
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_positions_leave_out_every_cell_the_mask_touches() {
        let mut mask = Mask::empty(10, 10);
        mask.data[3 * 10 + 4] = true; // pixel (4, 3)
                                      // 4×4 cells over 10 px: cell x 1 covers pixels 2..5, cell y 1 covers 2..5.
        let kept = kept_positions(&mask, 4);
        let dropped: Vec<usize> = (0..16).filter(|&p| kept[p] == 0.0).collect();
        assert_eq!(dropped, vec![4 + 1]);
        assert!(kept_positions(&Mask::empty(10, 10), 4).iter().all(|&k| k == 1.0));
    }
}
