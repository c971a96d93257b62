//! The random masks of RIFA: the image is cut into square cells of `patch_size` pixels and each
//! realization hides a share `ratio` of them.

use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// How the hidden cells of the K realizations are drawn.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MaskLayout {
    /// Each realization hides round(ratio · cells) cells drawn at random, independently of the
    /// others (the thesis' random masks).
    Random,
    /// Every cell is hidden in exactly round(ratio · K) realizations, chosen at random per cell,
    /// so every pixel is inpainted the same number of times.
    #[default]
    Balanced,
}

/// K masks of `size`×`size` pixels, 1 where the pixel is kept and 0 where it is inpainted.
pub fn draw_masks(
    layout: MaskLayout,
    size: usize,
    patch: usize,
    ratio: f64,
    realizations: usize,
    rng: &mut ChaCha8Rng,
) -> Vec<Vec<f32>> {
    let per_side = size.div_ceil(patch);
    let cells = per_side * per_side;
    // hidden[k][cell]
    let mut hidden = vec![vec![false; cells]; realizations];
    match layout {
        MaskLayout::Random => {
            let count = ((ratio * cells as f64).round() as usize).min(cells);
            for row in hidden.iter_mut() {
                let mut order: Vec<usize> = (0..cells).collect();
                order.shuffle(rng);
                for &cell in &order[..count] {
                    row[cell] = true;
                }
            }
        }
        MaskLayout::Balanced => {
            let count = ((ratio * realizations as f64).round() as usize).min(realizations);
            // Per cell, in cell order, the realizations that hide it.
            let hiding: Vec<Vec<usize>> = (0..cells)
                .map(|_| {
                    let mut order: Vec<usize> = (0..realizations).collect();
                    order.shuffle(rng);
                    order.truncate(count);
                    order
                })
                .collect();
            for (cell, realizations_hiding) in hiding.iter().enumerate() {
                for &k in realizations_hiding {
                    hidden[k][cell] = true;
                }
            }
        }
    }
    hidden
        .iter()
        .map(|row| {
            (0..size * size)
                .map(|p| {
                    let (y, x) = (p / size, p % size);
                    if row[(y / patch) * per_side + x / patch] {
                        0.0
                    } else {
                        1.0
                    }
                })
                .collect()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn balanced_masks_hide_every_pixel_equally_often() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let masks = draw_masks(MaskLayout::Balanced, 20, 8, 0.75, 4, &mut rng);
        assert_eq!(masks.len(), 4);
        for p in 0..400 {
            let hidden = masks.iter().filter(|m| m[p] == 0.0).count();
            assert_eq!(hidden, 3, "pixel {p}");
        }
        // Cells are whole: a 8x8 block shares its state (the last, partial cells too).
        for m in &masks {
            assert_eq!(m[0], m[7 * 20 + 7]);
            assert_eq!(m[16 * 20 + 16], m[19 * 20 + 19]);
        }
    }

    #[test]
    fn random_masks_hide_the_ratio_of_cells() {
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let masks = draw_masks(MaskLayout::Random, 32, 8, 0.75, 3, &mut rng);
        for m in &masks {
            assert_eq!(m.iter().filter(|&&v| v == 0.0).count(), 12 * 64);
        }
        assert_ne!(masks[0], masks[1]);
    }
}
