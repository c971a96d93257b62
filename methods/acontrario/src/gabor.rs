//! The fixed Gabor filter bank of the thesis's Gabor variant.
//!
//! The thesis gives 72 filters with sizes 7 to 31 but not their orientations or frequencies. This
//! bank takes, for each size, `orientations` evenly spaced directions over [0, π) and both phases
//! (even/cosine and odd/sine): 4 sizes × 9 orientations × 2 phases = 72 by default. The Gaussian
//! envelope spans the kernel (σ = (size − 1)/6, so the kernel edge is at 3σ) and the wavelength
//! is 2.5σ, about one octave of bandwidth, so each size looks at a different frequency band.

/// One bank of kernels, all embedded in a common (2·radius+1)² support (smaller filters centred
/// and zero-padded) so they can share one FFT size.
pub fn bank(sizes: &[usize], orientations: usize) -> (usize, Vec<Vec<f64>>) {
    let radius = sizes.iter().max().map_or(0, |s| s / 2);
    let k = 2 * radius + 1;
    let mut kernels = Vec::with_capacity(sizes.len() * orientations * 2);
    for &size in sizes {
        let r = (size / 2) as isize;
        let sigma = (size as f64 - 1.0) / 6.0;
        let wavelength = 2.5 * sigma;
        for o in 0..orientations {
            let theta = std::f64::consts::PI * o as f64 / orientations as f64;
            let (sin, cos) = theta.sin_cos();
            for phase in [0.0, std::f64::consts::FRAC_PI_2] {
                let mut taps = Vec::with_capacity(size * size);
                for y in -r..=r {
                    for x in -r..=r {
                        let (x, y) = (x as f64, y as f64);
                        let along = x * cos + y * sin;
                        let envelope = (-(x * x + y * y) / (2.0 * sigma * sigma)).exp();
                        taps.push(envelope * (2.0 * std::f64::consts::PI * along / wavelength + phase).cos());
                    }
                }
                // zero mean: flat regions give no response; unit norm: comparable responses
                let mean = taps.iter().sum::<f64>() / taps.len() as f64;
                taps.iter_mut().for_each(|v| *v -= mean);
                let norm = taps.iter().map(|v| v * v).sum::<f64>().sqrt();
                taps.iter_mut().for_each(|v| *v /= norm);
                let mut kernel = vec![0.0; k * k];
                let offset = radius - size / 2;
                for y in 0..size {
                    kernel[(y + offset) * k + offset..][..size].copy_from_slice(&taps[y * size..][..size]);
                }
                kernels.push(kernel);
            }
        }
    }
    (radius, kernels)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_bank_has_72_zero_mean_unit_filters() {
        let (radius, kernels) = bank(&[7, 15, 23, 31], 9);
        assert_eq!(radius, 15);
        assert_eq!(kernels.len(), 72);
        for kernel in &kernels {
            assert_eq!(kernel.len(), 31 * 31);
            assert!(kernel.iter().sum::<f64>().abs() < 1e-9);
            assert!((kernel.iter().map(|v| v * v).sum::<f64>() - 1.0).abs() < 1e-9);
        }
        // the smallest filters are centred: nothing outside their 7x7 support
        assert_eq!(kernels[0][0], 0.0);
        assert!(kernels[0][15 * 31 + 15] != 0.0);
    }
}
