use crate::{Result, VigilError};

/// A decoded image: planar (channel-major) `f32` samples scaled to [0, 1].
///
/// `f32` keeps every level of a 16-bit source exactly (24-bit mantissa), so X-ray images lose no
/// precision until a method itself quantises. `bit_depth` records what the file held.
#[derive(Clone, Debug, PartialEq)]
pub struct Image {
    pub width: usize,
    pub height: usize,
    pub channels: usize,
    pub bit_depth: u8,
    pub data: Vec<f32>,
}

impl Image {
    pub fn new(width: usize, height: usize, channels: usize, data: Vec<f32>) -> Result<Self> {
        if width == 0 || height == 0 {
            return Err(VigilError::invalid(format!("image of size {width}x{height} is empty")));
        }
        if data.len() != width * height * channels {
            return Err(VigilError::invalid(format!(
                "image data holds {} samples, expected {width}x{height}x{channels}",
                data.len()
            )));
        }
        Ok(Image { width, height, channels, bit_depth: 8, data })
    }

    pub fn zeros(width: usize, height: usize, channels: usize) -> Self {
        Image { width, height, channels, bit_depth: 8, data: vec![0.0; width * height * channels] }
    }

    pub fn plane_len(&self) -> usize {
        self.width * self.height
    }

    pub fn channel(&self, c: usize) -> &[f32] {
        let n = self.plane_len();
        &self.data[c * n..(c + 1) * n]
    }

    pub fn channel_mut(&mut self, c: usize) -> &mut [f32] {
        let n = self.plane_len();
        &mut self.data[c * n..(c + 1) * n]
    }

    #[inline]
    pub fn get(&self, c: usize, y: usize, x: usize) -> f32 {
        self.data[c * self.plane_len() + y * self.width + x]
    }

    /// Luminance (ITU-R BT.601 weights, as PIL's "L" conversion); grayscale stays as is.
    pub fn to_gray(&self) -> Image {
        if self.channels == 1 {
            return self.clone();
        }
        let n = self.plane_len();
        let (r, g, b) = (self.channel(0), self.channel(1), self.channel(2));
        let data = (0..n).map(|i| 0.299 * r[i] + 0.587 * g[i] + 0.114 * b[i]).collect();
        Image { width: self.width, height: self.height, channels: 1, bit_depth: self.bit_depth, data }
    }

    /// Three channels: grayscale is replicated, an alpha channel is dropped.
    pub fn to_rgb(&self) -> Image {
        let n = self.plane_len();
        let data = match self.channels {
            1 => self.data.repeat(3),
            _ => self.data[..3 * n].to_vec(),
        };
        Image { width: self.width, height: self.height, channels: 3, bit_depth: self.bit_depth, data }
    }

    /// Bilinear resampling with half-pixel centres (PyTorch `align_corners=False`, no antialiasing).
    pub fn resize_bilinear(&self, width: usize, height: usize) -> Image {
        if width == self.width && height == self.height {
            return self.clone();
        }
        let mut data = Vec::with_capacity(width * height * self.channels);
        for c in 0..self.channels {
            data.extend(resize_plane_bilinear(self.channel(c), self.width, self.height, width, height));
        }
        Image { width, height, channels: self.channels, bit_depth: self.bit_depth, data }
    }

    /// A rectangular window; the caller keeps it inside the image.
    pub fn crop(&self, x0: usize, y0: usize, width: usize, height: usize) -> Image {
        assert!(x0 + width <= self.width && y0 + height <= self.height, "crop outside the image");
        let mut data = Vec::with_capacity(width * height * self.channels);
        for c in 0..self.channels {
            let plane = self.channel(c);
            for y in y0..y0 + height {
                data.extend_from_slice(&plane[y * self.width + x0..y * self.width + x0 + width]);
            }
        }
        Image { width, height, channels: self.channels, bit_depth: self.bit_depth, data }
    }
}

/// Bilinear resampling of one plane, half-pixel centres (PyTorch `align_corners=False`).
pub fn resize_plane_bilinear(src: &[f32], sw: usize, sh: usize, dw: usize, dh: usize) -> Vec<f32> {
    let mut out = vec![0.0; dw * dh];
    BilinearResampler::new((sw, sh), (dw, dh)).resample(src, &mut out);
    out
}

/// Bilinear resampling from one plane size to another (half-pixel centres, no antialiasing),
/// with the interpolation taps computed once for many planes.
#[derive(Clone, Debug)]
pub struct BilinearResampler {
    source_width: usize,
    /// Per output column / row: the two source indices and the weight of the second.
    xs: Vec<(usize, usize, f32)>,
    ys: Vec<(usize, usize, f32)>,
}

impl BilinearResampler {
    pub fn new((sw, sh): (usize, usize), (dw, dh): (usize, usize)) -> BilinearResampler {
        let axis = |dst: usize, src_len: usize| -> Vec<(usize, usize, f32)> {
            let scale = src_len as f32 / dst as f32;
            (0..dst)
                .map(|i| {
                    let s = ((i as f32 + 0.5) * scale - 0.5).max(0.0);
                    let i0 = (s.floor() as usize).min(src_len - 1);
                    let i1 = (i0 + 1).min(src_len - 1);
                    (i0, i1, s - i0 as f32)
                })
                .collect()
        };
        BilinearResampler { source_width: sw, xs: axis(dw, sw), ys: axis(dh, sh) }
    }

    /// Resamples `src` (the source size, row-major) into `out` (the destination size).
    pub fn resample(&self, src: &[f32], out: &mut [f32]) {
        let sw = self.source_width;
        assert_eq!(out.len(), self.xs.len() * self.ys.len(), "resample: destination size");
        for (&(y0, y1, fy), out_row) in self.ys.iter().zip(out.chunks_exact_mut(self.xs.len())) {
            let (r0, r1) = (&src[y0 * sw..(y0 + 1) * sw], &src[y1 * sw..(y1 + 1) * sw]);
            for (&(x0, x1, fx), o) in self.xs.iter().zip(out_row) {
                let top = r0[x0] + (r0[x1] - r0[x0]) * fx;
                let bottom = r1[x0] + (r1[x1] - r1[x0]) * fx;
                *o = top + (bottom - top) * fy;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gray_rgb_round_trip_keeps_values() {
        let g = Image::new(2, 1, 1, vec![0.25, 0.75]).unwrap();
        let rgb = g.to_rgb();
        assert_eq!(rgb.channels, 3);
        assert_eq!(rgb.channel(2), &[0.25, 0.75]);
        let back = rgb.to_gray();
        assert!((back.data[0] - 0.25).abs() < 1e-6 && (back.data[1] - 0.75).abs() < 1e-6);
    }

    #[test]
    fn bilinear_upsample_matches_half_pixel_convention() {
        // PyTorch: F.interpolate([[0,1]], size=4, mode="bilinear", align_corners=False) = [0, .25, .75, 1]
        let up = resize_plane_bilinear(&[0.0, 1.0], 2, 1, 4, 1);
        assert_eq!(up, vec![0.0, 0.25, 0.75, 1.0]);
    }

    #[test]
    fn wrong_sample_count_is_an_error() {
        assert!(Image::new(2, 2, 3, vec![0.0; 5]).is_err());
    }
}
