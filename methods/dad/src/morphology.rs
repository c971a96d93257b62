//! Binary morphology on masks (`true` = detected): disk dilation and erosion, closing, and the
//! binary median (majority) filter DAD smooths its detection with.

/// The offsets of a disk of radius `r` (dx² + dy² ≤ r²).
fn disk(r: usize) -> Vec<(isize, isize)> {
    let r = r as isize;
    let mut out = Vec::new();
    for dy in -r..=r {
        for dx in -r..=r {
            if dx * dx + dy * dy <= r * r {
                out.push((dy, dx));
            }
        }
    }
    out
}

/// Dilation by a disk of radius `r` (pixels outside the image count as not detected).
pub fn dilate(mask: &[bool], width: usize, height: usize, r: usize) -> Vec<bool> {
    spread(mask, width, height, r, true)
}

/// Erosion by a disk of radius `r` (pixels outside the image count as detected, so the border
/// does not erode: OpenCV's default).
pub fn erode(mask: &[bool], width: usize, height: usize, r: usize) -> Vec<bool> {
    spread(mask, width, height, r, false)
}

/// `any = true`: a pixel is set if any disk neighbour is; `false`: only if all are.
fn spread(mask: &[bool], width: usize, height: usize, r: usize, any: bool) -> Vec<bool> {
    if r == 0 {
        return mask.to_vec();
    }
    let offsets = disk(r);
    let mut out = vec![false; mask.len()];
    for y in 0..height {
        for x in 0..width {
            let hit = |&(dy, dx): &(isize, isize)| {
                let (yy, xx) = (y as isize + dy, x as isize + dx);
                if yy < 0 || xx < 0 || yy >= height as isize || xx >= width as isize {
                    !any
                } else {
                    mask[yy as usize * width + xx as usize]
                }
            };
            out[y * width + x] = if any { offsets.iter().any(hit) } else { offsets.iter().all(hit) };
        }
    }
    out
}

/// Closing (dilation then erosion) by a disk of radius `r`: fills gaps narrower than the disk.
pub fn close(mask: &[bool], width: usize, height: usize, r: usize) -> Vec<bool> {
    erode(&dilate(mask, width, height, r), width, height, r)
}

/// Median of a binary mask over a `size`×`size` window (odd size): set where more than half of
/// the window's in-image pixels are set.
pub fn median(mask: &[bool], width: usize, height: usize, size: usize) -> Vec<bool> {
    if size <= 1 {
        return mask.to_vec();
    }
    let half = (size / 2) as isize;
    let mut out = vec![false; mask.len()];
    for y in 0..height as isize {
        for x in 0..width as isize {
            let (mut set, mut total) = (0usize, 0usize);
            for yy in (y - half).max(0)..(y + half + 1).min(height as isize) {
                for xx in (x - half).max(0)..(x + half + 1).min(width as isize) {
                    total += 1;
                    set += mask[yy as usize * width + xx as usize] as usize;
                }
            }
            out[y as usize * width + x as usize] = 2 * set > total;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count(m: &[bool]) -> usize {
        m.iter().filter(|&&v| v).count()
    }

    #[test]
    fn dilation_erosion_closing_and_median() {
        let (w, h) = (9, 9);
        let mut point = vec![false; w * h];
        point[4 * w + 4] = true;
        // A radius-2 disk holds 13 pixels; eroding it back gives the point.
        let grown = dilate(&point, w, h, 2);
        assert_eq!(count(&grown), 13);
        assert_eq!(erode(&grown, w, h, 2), point);
        // Two blocks a pixel apart close into one; an isolated pixel is removed by the median.
        let mut two = vec![false; w * h];
        for y in 2..7 {
            for x in [1, 2, 3, 5, 6, 7] {
                two[y * w + x] = true;
            }
        }
        let closed = close(&two, w, h, 1);
        assert!(closed[4 * w + 4] && !closed[0]);
        assert_eq!(median(&point, w, h, 3), vec![false; w * h]);
        // The median drops the blocks' corners (4 of 9 set) and fills the gap's middle (6 of 9).
        let smoothed = median(&two, w, h, 3);
        assert!(!smoothed[2 * w + 1] && smoothed[2 * w + 2] && smoothed[4 * w + 4] && !smoothed[2 * w + 4]);
        assert_eq!(count(&smoothed), 30 - 8 + 3);
    }
}
