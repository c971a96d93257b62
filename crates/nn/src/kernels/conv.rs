//! 2-D convolution for training on the CPU, channels-first (NCHW) f32: forward, input gradient,
//! weight gradient and bias gradient.
//!
//! Every pass is a matrix product by the `gemm` crate over patches gathered row by row (im2col):
//! - forward: `out[n][:, band] = W · cols_n[:, band]` (+ bias), one product per band of output
//!   pixels, the patches of that band only, so the patch buffer stays small;
//! - input gradient at stride 1: the same forward kernel run on the output gradient with the
//!   flipped, transposed kernel (no scatter at all); at other strides `W^T · grad_n` gives the
//!   gradient of each patch, added back into the image plane by plane (col2im);
//! - weight gradient: `dW = Σ_n grad_n · cols_n^T`, one product per band of the patch rows,
//!   accumulating over the images in order;
//! - bias gradient: per-channel sums.
//!
//! Work is split into bands fixed by the shapes, never by the thread count, and every output
//! value is summed in the same order whichever thread computes it, so the results do not depend
//! on `RAYON_NUM_THREADS`.

use rayon::prelude::*;

use super::{depthwise, SharedOut};

/// The shapes of one convolution: input `[batch, in_channels, in_h, in_w]`, weight
/// `[out_channels, in_channels, kernel[0], kernel[1]]` (one group) or, `depthwise`,
/// `[channels, 1, kernel[0], kernel[1]]`, output `[batch, out_channels, out_h, out_w]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ConvGeometry {
    pub batch: usize,
    pub in_channels: usize,
    pub in_h: usize,
    pub in_w: usize,
    pub out_channels: usize,
    pub kernel: [usize; 2],
    pub stride: [usize; 2],
    pub dilation: [usize; 2],
    /// Padding before the first row and column; negative crops (the flipped-kernel input
    /// gradient of a convolution padded by more than its kernel's reach).
    pub pad_begin: [isize; 2],
    pub out_h: usize,
    pub out_w: usize,
    /// One filter per channel (groups = in_channels = out_channels), no dilation:
    /// run by [`super::depthwise`].
    pub depthwise: bool,
}

impl ConvGeometry {
    /// Values per patch (per filter): the depth of the matrix products.
    pub fn depth(&self) -> usize {
        let inputs_per_filter = if self.depthwise { 1 } else { self.in_channels };
        inputs_per_filter * self.kernel[0] * self.kernel[1]
    }

    pub fn out_pixels(&self) -> usize {
        self.out_h * self.out_w
    }

    pub fn in_pixels(&self) -> usize {
        self.in_h * self.in_w
    }

    /// A 1x1 convolution that maps every pixel to itself: its patches are the input planes.
    fn is_pointwise(&self) -> bool {
        self.kernel == [1, 1]
            && self.stride == [1, 1]
            && self.pad_begin == [0, 0]
            && (self.out_h, self.out_w) == (self.in_h, self.in_w)
    }

    /// The geometry whose forward pass is this convolution's input gradient (stride 1 only):
    /// input = the output gradient, kernel flipped and transposed, padded so that output tap
    /// `oy = iy + pad - ky·d` lines up with input row `iy`.
    pub(super) fn input_gradient_as_forward(&self) -> ConvGeometry {
        debug_assert_eq!(self.stride, [1, 1]);
        let reach = |axis: usize| (self.dilation[axis] * (self.kernel[axis] - 1)) as isize;
        ConvGeometry {
            batch: self.batch,
            in_channels: self.out_channels,
            in_h: self.out_h,
            in_w: self.out_w,
            out_channels: self.in_channels,
            kernel: self.kernel,
            stride: [1, 1],
            dilation: self.dilation,
            pad_begin: [reach(0) - self.pad_begin[0], reach(1) - self.pad_begin[1]],
            out_h: self.in_h,
            out_w: self.in_w,
            depthwise: self.depthwise,
        }
    }

    /// Output columns `ox` whose tap at offset `offset` (= kx·dilation − pad) falls inside the
    /// input: `0 <= ox·stride + offset < in_w`.
    pub(super) fn valid_columns(&self, offset: isize) -> std::ops::Range<usize> {
        let stride = self.stride[1] as isize;
        let first = if offset >= 0 { 0 } else { (-offset + stride - 1) / stride };
        let last = (self.in_w as isize - 1 - offset).div_euclid(stride) + 1;
        let (first, last) = (first.clamp(0, self.out_w as isize), last.clamp(0, self.out_w as isize));
        first as usize..(last.max(first)) as usize
    }

    /// The input row of output row `oy` at kernel row `ky`, if inside the input.
    pub(super) fn input_row(&self, oy: usize, ky: usize) -> Option<usize> {
        let y = (oy * self.stride[0] + ky * self.dilation[0]) as isize - self.pad_begin[0];
        (0..self.in_h as isize).contains(&y).then_some(y as usize)
    }
}

/// Output pixels per forward task: about a sixteenth of an image, within bounds that keep each
/// product large enough to run at full speed and the patch buffer in cache-friendly sizes.
fn pixels_per_band(pixels: usize) -> usize {
    (pixels / 16).clamp(128, 1024)
}

/// Patch rows per weight-gradient task: at least four tasks for the narrowest layers.
fn patch_rows_per_band(depth: usize) -> usize {
    (depth / 4).clamp(8, 64)
}

/// A strided matrix view: element (i, j) at `ptr + i·row_stride + j·col_stride`.
#[derive(Clone, Copy)]
struct Strided {
    ptr: *const f32,
    row_stride: usize,
    col_stride: usize,
}

/// `dst (m × n) = [dst +] lhs (m × k) · rhs (k × n)` on one thread.
///
/// # Safety
/// Every view must cover its matrix: `dst` m × n writable, `lhs` m × k and `rhs` k × n readable,
/// with the given strides.
unsafe fn product(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    (dst_row_stride, dst_col_stride): (usize, usize),
    accumulate: bool,
    lhs: Strided,
    rhs: Strided,
) {
    gemm::gemm(
        m,
        n,
        k,
        dst,
        dst_col_stride as isize,
        dst_row_stride as isize,
        accumulate,
        lhs.ptr,
        lhs.col_stride as isize,
        lhs.row_stride as isize,
        rhs.ptr,
        rhs.col_stride as isize,
        rhs.row_stride as isize,
        1.0,
        1.0,
        false,
        false,
        false,
        gemm::Parallelism::None,
    );
}

/// The patches of output pixels `first..first + count` of one image as rows of `cols`
/// (`cols[r][j]`, r = (channel, ky, kx), `count` values per row, 0 where a tap falls in the
/// padding), for patch rows `rows`.
fn gather_patches(
    g: &ConvGeometry,
    image: &[f32],
    first: usize,
    count: usize,
    rows: std::ops::Range<usize>,
    cols: &mut [f32],
) {
    let [kh, kw] = g.kernel;
    for (r, dst) in rows.zip(cols.chunks_exact_mut(count)) {
        let (channel, ky, kx) = (r / (kh * kw), r / kw % kh, r % kw);
        let plane = &image[channel * g.in_pixels()..][..g.in_pixels()];
        let offset = (kx * g.dilation[1]) as isize - g.pad_begin[1];
        let valid = g.valid_columns(offset);
        let mut pixel = first;
        let mut dst = &mut dst[..];
        while !dst.is_empty() {
            let (oy, ox0) = (pixel / g.out_w, pixel % g.out_w);
            let run = (g.out_w - ox0).min(dst.len());
            let (segment, rest) = std::mem::take(&mut dst).split_at_mut(run);
            match g.input_row(oy, ky) {
                None => segment.fill(0.0),
                Some(iy) => {
                    let row = &plane[iy * g.in_w..][..g.in_w];
                    let (lo, hi) = (valid.start.clamp(ox0, ox0 + run), valid.end.clamp(ox0, ox0 + run));
                    segment[..lo - ox0].fill(0.0);
                    segment[hi - ox0..].fill(0.0);
                    let inside = &mut segment[lo - ox0..hi - ox0];
                    if !inside.is_empty() {
                        let start = (lo * g.stride[1]) as isize + offset;
                        if g.stride[1] == 1 {
                            inside.copy_from_slice(&row[start as usize..][..inside.len()]);
                        } else {
                            for (j, v) in inside.iter_mut().enumerate() {
                                *v = row[start as usize + j * g.stride[1]];
                            }
                        }
                    }
                }
            }
            dst = rest;
            pixel += run;
        }
    }
}

/// Adds patch gradients `cols` (all `out_pixels` of one image, rows r = (channel, ky, kx)) back
/// into the planes of one image's input gradient, for input channels `channels`.
fn scatter_patches(g: &ConvGeometry, cols: &[f32], channels: std::ops::Range<usize>, planes: &mut [f32]) {
    let [kh, kw] = g.kernel;
    let taps = kh * kw;
    for (channel, plane) in channels.zip(planes.chunks_exact_mut(g.in_pixels())) {
        for tap in 0..taps {
            let (ky, kx) = (tap / kw, tap % kw);
            let src = &cols[(channel * taps + tap) * g.out_pixels()..][..g.out_pixels()];
            let offset = (kx * g.dilation[1]) as isize - g.pad_begin[1];
            let valid = g.valid_columns(offset);
            for oy in 0..g.out_h {
                let Some(iy) = g.input_row(oy, ky) else { continue };
                let row = &mut plane[iy * g.in_w..][..g.in_w];
                let src = &src[oy * g.out_w..][..g.out_w];
                for ox in valid.clone() {
                    row[((ox * g.stride[1]) as isize + offset) as usize] += src[ox];
                }
            }
        }
    }
}

/// Forward convolution: `x` `[batch, in_channels, in_h, in_w]`, `weight`
/// `[out_channels, in_channels·kh·kw]` → `[batch, out_channels, out_h, out_w]`.
pub(crate) fn forward(g: &ConvGeometry, x: &[f32], weight: &[f32], bias: Option<&[f32]>) -> Vec<f32> {
    if g.depthwise {
        return depthwise::forward(g, x, weight, bias);
    }
    let (depth, out_pixels, in_size) = (g.depth(), g.out_pixels(), g.in_channels * g.in_pixels());
    assert_eq!(x.len(), g.batch * in_size, "convolution input size");
    assert_eq!(weight.len(), g.out_channels * depth, "convolution weight size");
    let band = pixels_per_band(out_pixels);
    let bands = out_pixels.div_ceil(band);
    let mut out = vec![0.0f32; g.batch * g.out_channels * out_pixels];
    let shared = SharedOut(out.as_mut_ptr());
    let pointwise = g.is_pointwise();
    (0..g.batch * bands).into_par_iter().for_each_init(Vec::new, |cols, task| {
        let (n, b) = (task / bands, task % bands);
        let first = b * band;
        let count = band.min(out_pixels - first);
        let image = &x[n * in_size..][..in_size];
        let patches = if pointwise {
            Strided { ptr: image[first..].as_ptr(), row_stride: out_pixels, col_stride: 1 }
        } else {
            cols.resize(depth * count, 0.0);
            gather_patches(g, image, first, count, 0..depth, cols);
            Strided { ptr: cols.as_ptr(), row_stride: count, col_stride: 1 }
        };
        // SAFETY: task (n, b) writes output columns first..first + count of image n's
        // out_channels rows, which no other task touches; `out` outlives the parallel loop.
        // The views cover out_channels × count, out_channels × depth and depth × count values.
        unsafe {
            let dst = shared.get().add(n * g.out_channels * out_pixels + first);
            if let Some(bias) = bias {
                for (o, &b) in bias.iter().enumerate() {
                    std::slice::from_raw_parts_mut(dst.add(o * out_pixels), count).fill(b);
                }
            }
            product(
                (g.out_channels, count, depth),
                dst,
                (out_pixels, 1),
                bias.is_some(),
                Strided { ptr: weight.as_ptr(), row_stride: depth, col_stride: 1 },
                patches,
            );
        }
    });
    out
}

/// Gradient of the convolution input: `grad` `[batch, out_channels, out_h, out_w]` →
/// `[batch, in_channels, in_h, in_w]`.
pub(crate) fn input_grad(g: &ConvGeometry, weight: &[f32], grad: &[f32]) -> Vec<f32> {
    if g.depthwise {
        return depthwise::input_grad(g, weight, grad);
    }
    assert_eq!(grad.len(), g.batch * g.out_channels * g.out_pixels(), "convolution output gradient size");
    if g.stride == [1, 1] {
        let flipped = g.input_gradient_as_forward();
        return forward(&flipped, grad, &flipped_transposed(g, weight), None);
    }
    let (depth, out_pixels, in_size) = (g.depth(), g.out_pixels(), g.in_channels * g.in_pixels());
    let mut dx = vec![0.0f32; g.batch * in_size];
    dx.par_chunks_mut(in_size).zip(grad.par_chunks(g.out_channels * out_pixels)).for_each(|(dx, grad)| {
        let mut cols = vec![0.0f32; depth * out_pixels];
        // SAFETY: cols is depth × out_pixels; W^T reads weight (out_channels × depth) with
        // swapped strides; grad is out_channels × out_pixels.
        unsafe {
            product(
                (depth, out_pixels, g.out_channels),
                cols.as_mut_ptr(),
                (out_pixels, 1),
                false,
                Strided { ptr: weight.as_ptr(), row_stride: 1, col_stride: depth },
                Strided { ptr: grad.as_ptr(), row_stride: out_pixels, col_stride: 1 },
            );
        }
        scatter_patches(g, &cols, 0..g.in_channels, dx);
    });
    dx
}

/// `[out, in, kh, kw]` → `[in, out, kh, kw]` with both kernel axes reversed.
fn flipped_transposed(g: &ConvGeometry, weight: &[f32]) -> Vec<f32> {
    let [kh, kw] = g.kernel;
    let taps = kh * kw;
    let mut flipped = vec![0.0f32; weight.len()];
    for o in 0..g.out_channels {
        for i in 0..g.in_channels {
            let src = &weight[(o * g.in_channels + i) * taps..][..taps];
            let dst = &mut flipped[(i * g.out_channels + o) * taps..][..taps];
            for (t, v) in src.iter().enumerate() {
                dst[taps - 1 - t] = *v;
            }
        }
    }
    flipped
}

/// Gradient of the weight, `[out_channels, in_channels·kh·kw]`.
pub(crate) fn weight_grad(g: &ConvGeometry, x: &[f32], grad: &[f32]) -> Vec<f32> {
    if g.depthwise {
        return depthwise::weight_grad(g, x, grad);
    }
    let (depth, out_pixels, in_size) = (g.depth(), g.out_pixels(), g.in_channels * g.in_pixels());
    let rows_per_band = patch_rows_per_band(depth);
    let mut dw = vec![0.0f32; g.out_channels * depth];
    let shared = SharedOut(dw.as_mut_ptr());
    let pointwise = g.is_pointwise();
    (0..depth.div_ceil(rows_per_band)).into_par_iter().for_each(|band| {
        let rows = band * rows_per_band..((band + 1) * rows_per_band).min(depth);
        let mut cols = Vec::new();
        for n in 0..g.batch {
            let image = &x[n * in_size..][..in_size];
            let patches = if pointwise {
                image[rows.start * out_pixels..].as_ptr()
            } else {
                cols.resize(rows.len() * out_pixels, 0.0);
                gather_patches(g, image, 0, out_pixels, rows.clone(), &mut cols);
                cols.as_ptr()
            };
            // SAFETY: this task alone writes columns `rows` of dw (out_channels × depth); grad
            // of image n is out_channels × out_pixels; the patches are rows.len() × out_pixels,
            // read transposed.
            unsafe {
                product(
                    (g.out_channels, rows.len(), out_pixels),
                    shared.get().add(rows.start),
                    (depth, 1),
                    n > 0,
                    Strided {
                        ptr: grad[n * g.out_channels * out_pixels..].as_ptr(),
                        row_stride: out_pixels,
                        col_stride: 1,
                    },
                    Strided { ptr: patches, row_stride: 1, col_stride: out_pixels },
                );
            }
        }
    });
    dw
}

/// Gradient of the bias: the sum of `grad` over the batch and the pixels of each channel.
pub(crate) fn bias_grad(g: &ConvGeometry, grad: &[f32]) -> Vec<f32> {
    let out_pixels = g.out_pixels();
    (0..g.out_channels)
        .into_par_iter()
        .map(|o| {
            (0..g.batch).map(|n| lane_sum(&grad[(n * g.out_channels + o) * out_pixels..][..out_pixels])).sum()
        })
        .collect()
}

/// Sum in eight interleaved partial sums (so it vectorises), combined in a fixed order.
pub(crate) fn lane_sum(values: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 8];
    let chunks = values.chunks_exact(8);
    let tail: f32 = chunks.remainder().iter().sum();
    for chunk in chunks {
        lanes.iter_mut().zip(chunk).for_each(|(l, v)| *l += v);
    }
    lanes.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Calls `tap(x index, weight index, output index)` for every product of the direct
    /// convolution: the reference all three passes are checked against.
    fn for_each_tap(g: &ConvGeometry, mut tap: impl FnMut(usize, usize, usize)) {
        let [kh, kw] = g.kernel;
        for n in 0..g.batch {
            for o in 0..g.out_channels {
                for oy in 0..g.out_h {
                    for ox in 0..g.out_w {
                        let out = ((n * g.out_channels + o) * g.out_h + oy) * g.out_w + ox;
                        let (first, inputs) = if g.depthwise { (o, 1) } else { (0, g.in_channels) };
                        for i in first..first + inputs {
                            for ky in 0..kh {
                                for kx in 0..kw {
                                    let iy =
                                        (oy * g.stride[0] + ky * g.dilation[0]) as isize - g.pad_begin[0];
                                    let ix =
                                        (ox * g.stride[1] + kx * g.dilation[1]) as isize - g.pad_begin[1];
                                    if iy < 0 || ix < 0 || iy >= g.in_h as isize || ix >= g.in_w as isize {
                                        continue;
                                    }
                                    let xi = ((n * g.in_channels + i) * g.in_h + iy as usize) * g.in_w
                                        + ix as usize;
                                    tap(xi, ((o * inputs + i - first) * kh + ky) * kw + kx, out);
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    fn values(len: usize, seed: u32) -> Vec<f32> {
        (0..len)
            .map(|i| ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) % 1000) as f32 / 500.0 - 1.0)
            .collect()
    }

    fn geometry(
        (batch, cin, h, w): (usize, usize, usize, usize),
        (cout, k): (usize, [usize; 2]),
        stride: [usize; 2],
        pad: [isize; 2],
        dilation: [usize; 2],
    ) -> ConvGeometry {
        let out = |axis: usize, size: usize| {
            ((size as isize + 2 * pad[axis] - (dilation[axis] * (k[axis] - 1)) as isize - 1)
                / stride[axis] as isize
                + 1) as usize
        };
        ConvGeometry {
            batch,
            in_channels: cin,
            in_h: h,
            in_w: w,
            out_channels: cout,
            kernel: k,
            stride,
            dilation,
            pad_begin: pad,
            out_h: out(0, h),
            out_w: out(1, w),
            depthwise: false,
        }
    }

    fn depthwise(g: ConvGeometry) -> ConvGeometry {
        ConvGeometry { depthwise: true, ..g }
    }

    fn shapes() -> Vec<ConvGeometry> {
        vec![
            geometry((2, 3, 9, 7), (4, [3, 3]), [1, 1], [1, 1], [1, 1]),
            geometry((1, 2, 11, 13), (3, [3, 3]), [2, 2], [1, 1], [1, 1]),
            geometry((3, 5, 8, 8), (2, [1, 1]), [1, 1], [0, 0], [1, 1]),
            geometry((2, 2, 10, 9), (3, [3, 2]), [2, 1], [2, 0], [2, 1]),
            // padded beyond the kernel's reach: the flipped input gradient crops
            geometry((1, 2, 6, 5), (2, [3, 3]), [1, 1], [3, 3], [1, 1]),
            // depthwise: SSIM's 11x11 blur, and a 3x3 one with one-sided padding
            depthwise(geometry((2, 3, 16, 13), (3, [11, 11]), [1, 1], [5, 5], [1, 1])),
            depthwise(geometry((1, 2, 7, 9), (2, [3, 3]), [1, 1], [0, 2], [1, 1])),
            // depthwise at stride 2 (MobileNetV2's down-sampling blocks), odd and even sizes
            depthwise(geometry((2, 3, 11, 10), (3, [3, 3]), [2, 2], [1, 1], [1, 1])),
            depthwise(geometry((1, 2, 40, 37), (2, [3, 3]), [2, 2], [1, 1], [1, 1])),
            // more than 128 pixels: several forward bands
            geometry((2, 3, 40, 37), (5, [3, 3]), [1, 1], [1, 1], [1, 1]),
        ]
    }

    fn assert_close(fast: &[f32], reference: &[f64], what: &str, g: &ConvGeometry) {
        assert_eq!(fast.len(), reference.len());
        for (i, (f, r)) in fast.iter().zip(reference).enumerate() {
            assert!((f64::from(*f) - r).abs() < 1e-4 * (1.0 + r.abs()), "{what} [{i}] {g:?}: {f} vs {r}");
        }
    }

    /// Forward, input, weight and bias gradients against the direct convolution written out
    /// product by product, in f64.
    #[test]
    fn every_pass_matches_the_direct_convolution() {
        for g in shapes() {
            let x = values(g.batch * g.in_channels * g.in_pixels(), 1);
            let w = values(g.out_channels * g.depth(), 2);
            let b = values(g.out_channels, 3);
            let grad = values(g.batch * g.out_channels * g.out_pixels(), 4);
            let mut out: Vec<f64> =
                (0..grad.len()).map(|i| f64::from(b[i / g.out_pixels() % g.out_channels])).collect();
            let (mut dx, mut dw) = (vec![0.0f64; x.len()], vec![0.0f64; w.len()]);
            let mut db = vec![0.0f64; b.len()];
            for_each_tap(&g, |xi, wi, oi| {
                out[oi] += f64::from(x[xi]) * f64::from(w[wi]);
                dx[xi] += f64::from(grad[oi]) * f64::from(w[wi]);
                dw[wi] += f64::from(grad[oi]) * f64::from(x[xi]);
            });
            for (i, v) in grad.iter().enumerate() {
                db[i / g.out_pixels() % g.out_channels] += f64::from(*v);
            }
            assert_close(&forward(&g, &x, &w, Some(&b)), &out, "forward", &g);
            assert_close(&input_grad(&g, &w, &grad), &dx, "input gradient", &g);
            assert_close(&weight_grad(&g, &x, &grad), &dw, "weight gradient", &g);
            assert_close(&bias_grad(&g, &grad), &db, "bias gradient", &g);
        }
    }

    #[test]
    fn results_do_not_depend_on_the_thread_count() {
        let dense = geometry((3, 6, 33, 29), (7, [3, 3]), [1, 1], [1, 1], [1, 1]);
        let blur = depthwise(geometry((3, 4, 33, 29), (4, [11, 11]), [1, 1], [5, 5], [1, 1]));
        let strided = depthwise(geometry((3, 4, 33, 29), (4, [3, 3]), [2, 2], [1, 1], [1, 1]));
        for g in [dense, blur, strided] {
            let x = values(g.batch * g.in_channels * g.in_pixels(), 7);
            let w = values(g.out_channels * g.depth(), 8);
            let grad = values(g.batch * g.out_channels * g.out_pixels(), 9);
            let run = |threads: usize| {
                let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                pool.install(|| {
                    (forward(&g, &x, &w, None), input_grad(&g, &w, &grad), weight_grad(&g, &x, &grad))
                })
            };
            let one = run(1);
            assert_eq!(one, run(3));
            assert_eq!(one, run(8));
        }
    }
}
