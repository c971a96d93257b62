//! Non-local means as scikit-image's `denoise_nl_means(fast_mode=True)` computes it (the author's
//! DAD denoises the latent with it): Froment's pixelwise variant of Darbon et al.'s algorithm,
//! looping over shifts (t_row ∈ [−d, d], t_col ∈ [0, d], each pair once) with an integral image of
//! the squared channel differences, patch distance max(Σ box − C·2σ², 0)/(C·h²·s²), weight
//! exp(−distance) dropped beyond a distance of 5, accumulated symmetrically on both pixels of the
//! pair (half weight for t_col = 0, which visits each pair twice), and NumPy `reflect` padding.
//!
//! Two of skimage's details are kept so the results agree with it: the box summed from the
//! integral image is (s − 1)×(s − 1) (its corners are row ± offset, col ± offset), and the
//! exponential is Schraudolph's approximation `_fast_exp` (a few per cent off exp).

use vigil_core::{Result, VigilError};

/// NLM parameters, named as `denoise_nl_means`'s.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct NlmParams {
    /// Patch side in pixels (an even value is increased by one, as skimage does).
    pub patch_size: usize,
    /// Largest shift searched, in pixels.
    pub patch_distance: usize,
    /// Cut-off: the higher, the more permissive in accepting patches.
    pub h: f64,
    /// Expected noise standard deviation (0: none subtracted).
    pub sigma: f64,
}

/// skimage's `_fast_exp`: Schraudolph's exponential, the high 32 bits of an IEEE double set to
/// a·y + b (a = 2²⁰/ln 2, b = 1023·2²⁰ − 60801), the low 32 bits zero.
pub fn schraudolph_exp(y: f64) -> f64 {
    const EXP_A: f64 = 1_512_775.395_195_185_6;
    const EXP_BC: i32 = 1_072_632_447;
    let high = ((EXP_A * y) as i32).wrapping_add(EXP_BC);
    f64::from_bits((high as u32 as u64) << 32)
}

/// NumPy's `reflect` index (no edge repetition) of position `i` (may be negative or ≥ n).
fn reflect(i: isize, n: usize) -> usize {
    if n == 1 {
        return 0;
    }
    let period = 2 * (n as isize - 1);
    let m = i.rem_euclid(period);
    (if m < n as isize { m } else { period - m }) as usize
}

/// Denoise planar `[channels, height, width]` values; returns the same layout.
pub fn nl_means(
    data: &[f32],
    channels: usize,
    height: usize,
    width: usize,
    params: &NlmParams,
) -> Result<Vec<f32>> {
    if channels == 0 || height == 0 || width == 0 || data.len() != channels * height * width {
        return Err(VigilError::invalid(format!(
            "NLM: {} values do not make a {channels}x{height}x{width} image",
            data.len()
        )));
    }
    if !(params.h.is_finite() && params.h > 0.0 && params.sigma.is_finite() && params.sigma >= 0.0) {
        return Err(VigilError::invalid(format!(
            "NLM: h {} must be positive and sigma {} >= 0",
            params.h, params.sigma
        )));
    }
    let s = params.patch_size | 1;
    let d = params.patch_distance as isize;
    let offset = (s / 2) as isize;
    let pad = offset + d + 1;
    let (n_row, n_col) = (height + 2 * pad as usize, width + 2 * pad as usize);
    let c = channels;
    // padded[row][col][channel], as skimage's channel-last float64 copy.
    let mut padded = vec![0.0f64; n_row * n_col * c];
    for row in 0..n_row {
        let y = reflect(row as isize - pad, height);
        for col in 0..n_col {
            let x = reflect(col as isize - pad, width);
            for ch in 0..c {
                padded[(row * n_col + col) * c + ch] = data[(ch * height + y) * width + x] as f64;
            }
        }
    }
    let mut weights = vec![0.0f64; n_row * n_col];
    let mut result = vec![0.0f64; n_row * n_col * c];
    // Not cleared between shifts, as skimage: stale entries cancel in every box sum read.
    let mut integral = vec![0.0f64; n_row * n_col];
    let h2s2 = c as f64 * params.h * params.h * (s * s) as f64;
    let var_diff = 2.0 * params.sigma * params.sigma;
    let (nr, nc) = (n_row as isize, n_col as isize);
    let at = |row: isize, col: isize| (row * nc + col) as usize;
    for t_row in -d..=d {
        let row_start = offset.max(offset - t_row);
        let row_end = (nr - offset).min(nr - offset - t_row);
        for t_col in 0..=d {
            let alpha = if t_col == 0 { 0.5 } else { 1.0 };
            for row in 1.max(-t_row)..nr.min(nr - t_row) {
                for col in 1..nc - t_col {
                    let mut distance = 0.0;
                    for ch in 0..c {
                        let t = padded[at(row, col) * c + ch] - padded[at(row + t_row, col + t_col) * c + ch];
                        distance += t * t;
                    }
                    distance -= c as f64 * var_diff;
                    integral[at(row, col)] =
                        distance + integral[at(row - 1, col)] + integral[at(row, col - 1)]
                            - integral[at(row - 1, col - 1)];
                }
            }
            for row in row_start..row_end {
                let row_shift = row + t_row;
                for col in offset..nc - offset - t_col {
                    let boxed = integral[at(row + offset, col + offset)]
                        + integral[at(row - offset, col - offset)]
                        - integral[at(row - offset, col + offset)]
                        - integral[at(row + offset, col - offset)];
                    let distance = boxed.max(0.0) / h2s2;
                    if distance > 5.0 {
                        continue;
                    }
                    let col_shift = col + t_col;
                    let weight = alpha * schraudolph_exp(-distance);
                    let (p, q) = (at(row, col), at(row_shift, col_shift));
                    weights[p] += weight;
                    weights[q] += weight;
                    for ch in 0..c {
                        result[p * c + ch] += weight * padded[q * c + ch];
                        result[q * c + ch] += weight * padded[p * c + ch];
                    }
                }
            }
        }
    }
    let mut out = vec![0.0f32; data.len()];
    for y in 0..height {
        for x in 0..width {
            let p = (y + pad as usize) * n_col + x + pad as usize;
            for ch in 0..c {
                out[(ch * height + y) * width + x] = (result[p * c + ch] / weights[p]) as f32;
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schraudolph_exp_is_a_few_percent_off_exp() {
        for &y in &[0.0, -0.3, -1.0, -2.5, -5.0] {
            let (approx, exact) = (schraudolph_exp(y), f64::exp(y));
            assert!(((approx - exact) / exact).abs() < 0.05, "{y}: {approx} vs {exact}");
        }
    }

    #[test]
    fn reflect_matches_numpy() {
        // np.pad(np.arange(4), 6, mode="reflect")[:16]
        let got: Vec<usize> = (-6..10).map(|i| reflect(i, 4)).collect();
        assert_eq!(got, vec![0, 1, 2, 3, 2, 1, 0, 1, 2, 3, 2, 1, 0, 1, 2, 3]);
    }

    #[test]
    fn a_constant_image_stays_constant_and_bad_input_is_refused() {
        let params = NlmParams { patch_size: 5, patch_distance: 3, h: 0.5, sigma: 0.0 };
        let out = nl_means(&[0.25; 2 * 7 * 9], 2, 7, 9, &params).unwrap();
        assert!(out.iter().all(|&v| (v - 0.25).abs() < 1e-7));
        assert!(nl_means(&[0.0; 10], 1, 3, 3, &params).is_err());
        assert!(nl_means(&[0.0; 9], 1, 3, 3, &NlmParams { h: 0.0, ..params }).is_err());
    }
}
