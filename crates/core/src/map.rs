use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::image::resize_plane_bilinear;
use crate::{Result, VigilError};

/// A single-channel `f32` map at a known size: anomaly maps, NFA maps, score planes.
#[derive(Clone, Debug, PartialEq)]
pub struct Map {
    pub width: usize,
    pub height: usize,
    pub data: Vec<f32>,
}

/// Nearest-neighbour resampling of a row-major plane with half-pixel centres: output pixel i
/// reads source pixel ⌊(i + ½)·src/dst⌋ on each axis.
pub(crate) fn resample_nearest<T: Copy>(
    src: &[T],
    (sw, sh): (usize, usize),
    (dw, dh): (usize, usize),
) -> Vec<T> {
    let index = |i: usize, src: usize, dst: usize| {
        (((i as f64 + 0.5) * src as f64 / dst as f64) as usize).min(src - 1)
    };
    let xs: Vec<usize> = (0..dw).map(|x| index(x, sw, dw)).collect();
    let mut out = Vec::with_capacity(dw * dh);
    for y in 0..dh {
        let row = &src[index(y, sh, dh) * sw..][..sw];
        out.extend(xs.iter().map(|&x| row[x]));
    }
    out
}

/// How a filter sees past the edge of a map.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BlurBorder {
    /// Mirrored about the edge between pixels, the edge pixel repeated: `d c b a | a b c d | d c b a`
    /// (scipy `mode="reflect"`, PyTorch `"symmetric"`).
    HalfSample,
    /// Mirrored about the edge pixel's centre, not repeated: `d c b | a b c d | c b a` (PyTorch and
    /// kornia `"reflect"`, as anomalib's blur).
    WholeSample,
}

impl BlurBorder {
    /// The in-range index that position `i` of an axis of length `n` reads.
    fn index(self, i: isize, n: usize) -> usize {
        let n = n as isize;
        let (period, last) = match self {
            BlurBorder::HalfSample => (2 * n, 2 * n - 1),
            BlurBorder::WholeSample if n > 1 => (2 * n - 2, 2 * n - 2),
            BlurBorder::WholeSample => return 0,
        };
        let m = i.rem_euclid(period);
        (if m >= n { last - m } else { m }) as usize
    }
}

impl Map {
    pub fn new(width: usize, height: usize, data: Vec<f32>) -> Result<Self> {
        if data.len() != width * height {
            return Err(VigilError::invalid(format!(
                "map data holds {} values, expected {width}x{height}",
                data.len()
            )));
        }
        Ok(Map { width, height, data })
    }

    pub fn filled(width: usize, height: usize, value: f32) -> Self {
        Map { width, height, data: vec![value; width * height] }
    }

    #[inline]
    pub fn get(&self, y: usize, x: usize) -> f32 {
        self.data[y * self.width + x]
    }

    /// NaN or infinity in a map is a defect of the method that made it: callers check before
    /// thresholds and metrics silently misorder them.
    pub fn check_finite(&self, what: &str) -> Result<()> {
        match self.data.iter().position(|v| !v.is_finite()) {
            None => Ok(()),
            Some(i) => Err(VigilError::invalid(format!(
                "{what}: anomaly map has a non-finite value ({}) at x={}, y={}",
                self.data[i],
                i % self.width,
                i / self.width
            ))),
        }
    }

    pub fn max(&self) -> f32 {
        self.data.iter().copied().fold(f32::NEG_INFINITY, f32::max)
    }

    pub fn min(&self) -> f32 {
        self.data.iter().copied().fold(f32::INFINITY, f32::min)
    }

    pub fn mean(&self) -> f32 {
        (self.data.iter().map(|&v| v as f64).sum::<f64>() / self.data.len() as f64) as f32
    }

    pub fn resize_bilinear(&self, width: usize, height: usize) -> Map {
        if width == self.width && height == self.height {
            return self.clone();
        }
        let data = resize_plane_bilinear(&self.data, self.width, self.height, width, height);
        Map { width, height, data }
    }

    /// Nearest-neighbour resampling with half-pixel centres (PyTorch `mode="nearest"` for
    /// integer factors).
    pub fn resize_nearest(&self, width: usize, height: usize) -> Map {
        let data = resample_nearest(&self.data, (self.width, self.height), (width, height));
        Map { width, height, data }
    }

    /// Mean over a `k`×`k` window (k odd), zero padding counted as in PyTorch's `avg_pool2d`
    /// with `count_include_pad=True`: DRAEM's 21×21 image score, PatchCore's 3×3 neighbourhoods.
    pub fn mean_filter(&self, k: usize) -> Map {
        let r = k / 2;
        let (w, h) = (self.width, self.height);
        // separable box sums: rows then columns
        let mut rows = vec![0f64; w * h];
        for y in 0..h {
            let mut acc = 0f64;
            let row = &self.data[y * w..(y + 1) * w];
            acc += row[..(r + 1).min(w)].iter().map(|&v| v as f64).sum::<f64>();
            for x in 0..w {
                rows[y * w + x] = acc;
                if x + r + 1 < w {
                    acc += row[x + r + 1] as f64;
                }
                if x >= r {
                    acc -= row[x - r] as f64;
                }
            }
        }
        let norm = (k * k) as f64;
        let mut out = vec![0f32; w * h];
        for x in 0..w {
            let mut acc = 0f64;
            for y in 0..(r + 1).min(h) {
                acc += rows[y * w + x];
            }
            for y in 0..h {
                out[y * w + x] = (acc / norm) as f32;
                if y + r + 1 < h {
                    acc += rows[(y + r + 1) * w + x];
                }
                if y >= r {
                    acc -= rows[(y - r) * w + x];
                }
            }
        }
        Map { width: w, height: h, data: out }
    }

    /// Gaussian blur with half-sample mirror padding, truncated at 4σ (scipy's
    /// `gaussian_filter`, as the original PatchCore and PaDiM code smooth).
    pub fn gaussian_blur(&self, sigma: f32) -> Map {
        self.gaussian_blur_with(sigma, BlurBorder::HalfSample)
    }

    /// Gaussian blur truncated at 4σ (a kernel of 2·round(4σ)+1 taps) with the given border.
    pub fn gaussian_blur_with(&self, sigma: f32, border: BlurBorder) -> Map {
        if sigma <= 0.0 {
            return self.clone();
        }
        let radius = (4.0 * sigma + 0.5) as isize;
        let kernel: Vec<f32> =
            (-radius..=radius).map(|i| (-(i * i) as f32 / (2.0 * sigma * sigma)).exp()).collect();
        let total: f32 = kernel.iter().sum();
        let kernel: Vec<f32> = kernel.iter().map(|v| v / total).collect();
        let (w, h) = (self.width, self.height);
        let reflect = |i: isize, n: usize| border.index(i, n);
        // Taps are summed in kernel order for every pixel, but with the loop over pixels
        // innermost so it vectorises: the same sums as a per-pixel loop, much faster on the
        // 256-px maps PatchCore and PaDiM blur for every image.
        // Rows (and then output rows) are independent, so both passes run in parallel.
        let taps = kernel.len();
        let mut tmp = vec![0f32; self.data.len()];
        tmp.par_chunks_mut(w).zip(self.data.par_chunks(w)).for_each_init(
            || vec![0f32; w + taps - 1],
            |padded, (out, row)| {
                for (i, p) in padded.iter_mut().enumerate() {
                    *p = row[reflect(i as isize - radius, w)];
                }
                for (j, kv) in kernel.iter().enumerate() {
                    for (o, v) in out.iter_mut().zip(&padded[j..j + w]) {
                        *o += kv * v;
                    }
                }
            },
        );
        let mut out = vec![0f32; self.data.len()];
        out.par_chunks_mut(w).enumerate().for_each(|(y, out_row)| {
            for (j, kv) in kernel.iter().enumerate() {
                let yy = reflect(y as isize + j as isize - radius, h);
                for (o, v) in out_row.iter_mut().zip(&tmp[yy * w..(yy + 1) * w]) {
                    *o += kv * v;
                }
            }
        });
        Map { width: self.width, height: self.height, data: out }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_filter_counts_padding_like_avg_pool() {
        let m = Map::new(3, 3, vec![9.0; 9]).unwrap();
        let f = m.mean_filter(3);
        assert!((f.get(1, 1) - 9.0).abs() < 1e-6);
        assert!((f.get(0, 0) - 4.0).abs() < 1e-6); // 4 of 9 window cells inside
    }

    #[test]
    fn gaussian_blur_equals_the_direct_per_pixel_sum() {
        let (w, h, sigma) = (9usize, 6usize, 1.3f32);
        let m = Map::new(w, h, (0..w * h).map(|i| ((i * 37) % 11) as f32).collect()).unwrap();
        let r = (4.0 * sigma + 0.5) as isize;
        let k: Vec<f32> = (-r..=r).map(|i| (-(i * i) as f32 / (2.0 * sigma * sigma)).exp()).collect();
        let total: f32 = k.iter().sum();
        let reflect = |i: isize, n: usize| {
            let m = i.rem_euclid(2 * n as isize) as usize;
            if m >= n {
                2 * n - 1 - m
            } else {
                m
            }
        };
        let get = |y: usize, x: isize, y_off: isize| -> f32 {
            // horizontal pass at row reflect(y + y_off)
            let yy = reflect(y as isize + y_off, h);
            let mut acc = 0f32;
            for (j, kv) in k.iter().enumerate() {
                acc += kv / total * m.get(yy, reflect(x + j as isize - r, w));
            }
            acc
        };
        let b = m.gaussian_blur(sigma);
        for y in 0..h {
            for x in 0..w {
                let mut acc = 0f32;
                for (j, kv) in k.iter().enumerate() {
                    acc += kv / total * get(y, x as isize, j as isize - r);
                }
                assert_eq!(b.get(y, x), acc, "({x}, {y})");
            }
        }
    }

    #[test]
    fn blur_borders_mirror_as_scipy_and_pytorch() {
        let read = |border: BlurBorder| (-4..8).map(|i| border.index(i, 4)).collect::<Vec<_>>();
        // a b c d = 0 1 2 3, read from four before to four after
        assert_eq!(read(BlurBorder::HalfSample), [3, 2, 1, 0, 0, 1, 2, 3, 3, 2, 1, 0]);
        assert_eq!(read(BlurBorder::WholeSample), [2, 3, 2, 1, 0, 1, 2, 3, 2, 1, 0, 1]);
        assert_eq!(BlurBorder::WholeSample.index(-3, 1), 0);
        // the borders differ only near the edges
        let m = Map::new(40, 1, (0..40).map(|i| (i % 7) as f32).collect()).unwrap();
        let (a, b) = (m.gaussian_blur_with(1.0, BlurBorder::HalfSample), m.gaussian_blur(1.0));
        assert_eq!(a, b);
        let c = m.gaussian_blur_with(1.0, BlurBorder::WholeSample);
        assert_eq!(a.data[10..30], c.data[10..30]);
        assert_ne!(a.data[0], c.data[0]);
    }

    #[test]
    fn gaussian_blur_preserves_constant_and_mass() {
        let m = Map::filled(7, 5, 2.0);
        let b = m.gaussian_blur(1.5);
        assert!(b.data.iter().all(|v| (v - 2.0).abs() < 1e-5));
    }

    #[test]
    fn non_finite_values_are_reported_with_position() {
        let m = Map::new(2, 2, vec![0.0, 1.0, f32::NAN, 0.0]).unwrap();
        let e = m.check_finite("a.png").unwrap_err().to_string();
        assert!(e.contains("x=0, y=1"), "{e}");
    }
}
