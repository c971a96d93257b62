//! Correlating one plane with a bank of square kernels through the FFT, tile by tile.
//!
//! Both feature kinds are inner products of every s×s patch with a set of filters. Done directly
//! that is s² multiply-adds per pixel and filter; in the Fourier domain the cost no longer depends
//! on the kernel size. Kernels are real, so two of them share one complex transform (one in the
//! real part, one in the imaginary part), halving the work. Large images are cut into tiles
//! (overlap-save), which keeps memory bounded and the result exact.

use std::sync::Arc;

use rustfft::num_complex::Complex64;
use rustfft::{Fft, FftPlanner};

/// Output tile side; the FFT works on the tile plus the kernel's margin.
const TILE: usize = 256;

/// A plane extended by `radius` pixels on each side with half-sample symmetric reflection
/// (scipy's "reflect": d c b a | a b c d | d c b a), valid for any radius.
pub struct PaddedPlane {
    pub data: Vec<f64>,
    pub width: usize,
    pub height: usize,
    pub radius: usize,
}

impl PaddedPlane {
    pub fn new(plane: &[f64], width: usize, height: usize, radius: usize) -> Self {
        let reflect = |i: isize, n: usize| -> usize {
            let period = 2 * n as isize;
            let m = i.rem_euclid(period);
            (if m >= n as isize { period - 1 - m } else { m }) as usize
        };
        let (pw, ph) = (width + 2 * radius, height + 2 * radius);
        let mut data = Vec::with_capacity(pw * ph);
        for y in 0..ph {
            let sy = reflect(y as isize - radius as isize, height);
            for x in 0..pw {
                data.push(plane[sy * width + reflect(x as isize - radius as isize, width)]);
            }
        }
        PaddedPlane { data, width: pw, height: ph, radius }
    }

    /// The size of the unpadded plane.
    pub fn inner(&self) -> (usize, usize) {
        (self.width - 2 * self.radius, self.height - 2 * self.radius)
    }
}

/// A rectangle of output pixels (in unpadded plane coordinates) and the responses over it.
pub struct TileResponse<'a> {
    pub x0: usize,
    pub y0: usize,
    pub width: usize,
    pub height: usize,
    /// Row-major responses of the tile, `width`×`height`.
    pub values: &'a [f64],
}

struct Plan {
    nx: usize,
    ny: usize,
    row_fwd: Arc<dyn Fft<f64>>,
    col_fwd: Arc<dyn Fft<f64>>,
    row_inv: Arc<dyn Fft<f64>>,
    col_inv: Arc<dyn Fft<f64>>,
}

impl Plan {
    fn new(nx: usize, ny: usize) -> Self {
        let mut planner = FftPlanner::new();
        Plan {
            nx,
            ny,
            row_fwd: planner.plan_fft_forward(nx),
            col_fwd: planner.plan_fft_forward(ny),
            row_inv: planner.plan_fft_inverse(nx),
            col_inv: planner.plan_fft_inverse(ny),
        }
    }

    /// Forward 2-D transform; the spectrum is left transposed (ny fastest), which is fine
    /// because spectra are only multiplied pointwise with spectra in the same layout.
    fn forward(&self, buf: &mut [Complex64], tmp: &mut [Complex64]) {
        self.row_fwd.process(buf);
        transpose(buf, tmp, self.nx, self.ny);
        self.col_fwd.process(tmp);
        buf.copy_from_slice(tmp);
    }

    /// Inverse of [`Plan::forward`], unnormalised.
    fn inverse(&self, spectrum: &mut [Complex64], tmp: &mut [Complex64]) {
        self.col_inv.process(spectrum);
        transpose(spectrum, tmp, self.ny, self.nx);
        self.row_inv.process(tmp);
        spectrum.copy_from_slice(tmp);
    }
}

/// `src` is `rows` rows of `cols`; `dst` receives `cols` rows of `rows`.
fn transpose(src: &[Complex64], dst: &mut [Complex64], cols: usize, rows: usize) {
    const B: usize = 16;
    for r0 in (0..rows).step_by(B) {
        for c0 in (0..cols).step_by(B) {
            for r in r0..(r0 + B).min(rows) {
                for c in c0..(c0 + B).min(cols) {
                    dst[c * rows + r] = src[r * cols + c];
                }
            }
        }
    }
}

/// The smallest size ≥ n whose only prime factors are 2, 3 and 5 (fast FFT lengths).
fn fast_length(n: usize) -> usize {
    (n..)
        .find(|&m| {
            let mut m = m;
            for p in [2, 3, 5] {
                while m % p == 0 {
                    m /= p;
                }
            }
            m == 1
        })
        .expect("a 5-smooth number always exists")
}

/// The spectra of a kernel bank for planes of one size, reusable across planes and threads.
pub struct KernelSpectra {
    radius: usize,
    kernel_count: usize,
    /// Output tile size.
    tile: (usize, usize),
    plan: Plan,
    /// Kernels in pairs (one in the real part, one in the imaginary part), flipped so that the
    /// FFT's convolution computes a correlation.
    spectra: Vec<Vec<Complex64>>,
}

impl KernelSpectra {
    /// `kernels` are (2·radius+1)² taps, row-major; planes are `width`×`height` before padding.
    pub fn new(kernels: &[Vec<f64>], radius: usize, width: usize, height: usize) -> Self {
        let k = 2 * radius + 1;
        let tile = (width.min(TILE), height.min(TILE));
        let plan = Plan::new(fast_length(tile.0 + k - 1), fast_length(tile.1 + k - 1));
        let (nx, ny) = (plan.nx, plan.ny);
        let mut tmp = vec![Complex64::default(); nx * ny];
        let spectra = kernels
            .chunks(2)
            .map(|pair| {
                let mut buf = vec![Complex64::default(); nx * ny];
                for ay in 0..k {
                    for ax in 0..k {
                        let at = ((ny - ay) % ny) * nx + (nx - ax) % nx;
                        let im = pair.get(1).map_or(0.0, |kernel| kernel[ay * k + ax]);
                        buf[at] = Complex64::new(pair[0][ay * k + ax], im);
                    }
                }
                plan.forward(&mut buf, &mut tmp);
                buf
            })
            .collect();
        KernelSpectra { radius, kernel_count: kernels.len(), tile, plan, spectra }
    }

    pub fn radius(&self) -> usize {
        self.radius
    }

    /// Correlates `plane` with every kernel:
    /// response_j(p) = Σ_a plane_padded(p + a) · kernel_j(a), the inner product of the kernel with
    /// the patch centred on p. Calls `visit(j, tile)` for each kernel and output tile.
    pub fn correlate(&self, plane: &PaddedPlane, mut visit: impl FnMut(usize, &TileResponse)) {
        assert_eq!(plane.radius, self.radius, "plane padded for a different kernel size");
        let (width, height) = plane.inner();
        let k = 2 * self.radius + 1;
        let (tw, th) = self.tile;
        let (nx, ny) = (self.plan.nx, self.plan.ny);
        let scale = 1.0 / (nx * ny) as f64;
        let mut tmp = vec![Complex64::default(); nx * ny];
        let mut image = vec![Complex64::default(); nx * ny];
        let mut product = vec![Complex64::default(); nx * ny];
        let mut real = Vec::with_capacity(tw * th);
        let mut imag = Vec::with_capacity(tw * th);
        for y0 in (0..height).step_by(th) {
            for x0 in (0..width).step_by(tw) {
                let (w, h) = (tw.min(width - x0), th.min(height - y0));
                image.fill(Complex64::default());
                for y in 0..h + k - 1 {
                    let src = &plane.data[(y0 + y) * plane.width + x0..][..w + k - 1];
                    for (dst, &v) in image[y * nx..].iter_mut().zip(src) {
                        *dst = Complex64::new(v, 0.0);
                    }
                }
                self.plan.forward(&mut image, &mut tmp);
                for (pair, spectrum) in self.spectra.iter().enumerate() {
                    for ((out, a), b) in product.iter_mut().zip(&image).zip(spectrum) {
                        *out = a * b;
                    }
                    self.plan.inverse(&mut product, &mut tmp);
                    real.clear();
                    imag.clear();
                    for y in 0..h {
                        for v in &product[y * nx..y * nx + w] {
                            real.push(v.re * scale);
                            imag.push(v.im * scale);
                        }
                    }
                    visit(2 * pair, &TileResponse { x0, y0, width: w, height: h, values: &real });
                    if 2 * pair + 1 < self.kernel_count {
                        visit(2 * pair + 1, &TileResponse { x0, y0, width: w, height: h, values: &imag });
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn direct(plane: &PaddedPlane, kernel: &[f64], x: usize, y: usize) -> f64 {
        let k = 2 * plane.radius + 1;
        let mut acc = 0.0;
        for ay in 0..k {
            for ax in 0..k {
                acc += plane.data[(y + ay) * plane.width + x + ax] * kernel[ay * k + ax];
            }
        }
        acc
    }

    #[test]
    fn reflect_padding_mirrors_half_sample() {
        let p = PaddedPlane::new(&[1.0, 2.0, 3.0], 3, 1, 2);
        assert_eq!(&p.data[..7], &[2.0, 1.0, 1.0, 2.0, 3.0, 3.0, 2.0]);
        assert_eq!(p.inner(), (3, 1));
    }

    #[test]
    fn fft_correlation_matches_direct_sums_across_tiles() {
        // 300 wide forces two tiles; three kernels exercise the unpaired last one
        let (w, h, r) = (300, 37, 2);
        let plane: Vec<f64> = (0..w * h).map(|i| ((i * 7919) % 101) as f64 / 101.0).collect();
        let padded = PaddedPlane::new(&plane, w, h, r);
        let kernels: Vec<Vec<f64>> =
            (0..3).map(|j| (0..25).map(|i| ((i * 31 + j * 17) % 13) as f64 - 6.0).collect()).collect();
        let mut seen = [0usize; 3];
        let bank = KernelSpectra::new(&kernels, r, w, h);
        bank.correlate(&padded, |j, tile| {
            seen[j] += tile.width * tile.height;
            for y in 0..tile.height {
                for x in 0..tile.width {
                    let want = direct(&padded, &kernels[j], tile.x0 + x, tile.y0 + y);
                    let got = tile.values[y * tile.width + x];
                    assert!((got - want).abs() < 1e-9, "kernel {j} at ({x},{y}): {got} vs {want}");
                }
            }
        });
        assert_eq!(seen, [w * h; 3]);
    }
}
