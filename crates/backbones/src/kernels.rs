//! CPU inference kernels for the backbones, in channels-last (NHWC) order.
//!
//! burn-flex runs these networks correctly but slowly at batch 1: its ReLU6 is a scalar clamp,
//! its 3-channel stem goes through a generic im2col path, its stride-2 depthwise convolution
//! does not vectorise, and every layer is a separate pass that leaves batch-1 work on one core.
//! Here every convolution writes its bias, residual and activation in the same pass as its
//! products, the channel axis is innermost so depthwise filters vectorise across channels, and
//! each layer is split into fixed bands of rows shared among the rayon threads. The bands do
//! not depend on the thread count, so the numbers do not either.
//!
//! Pointwise and dense convolutions are matrix products by the `gemm` crate; the depthwise
//! loops are plain Rust compiled once more with AVX-512 or AVX2 enabled and picked at run time.

use rayon::prelude::*;

use crate::layers::Activation;

/// Output pixels per parallel task of a matrix-product convolution: about an eighth of the
/// map, so small deep maps still spread over the threads, within bounds that keep each
/// product large enough to run at full speed. It depends on the shape only, never on the
/// thread count, so neither do the results.
fn pixels_per_task(pixels: usize) -> usize {
    (pixels / 8).clamp(64, 256)
}

/// A feature map of one image, channels last: `data[(y * width + x) * channels + c]`.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Nhwc {
    pub height: usize,
    pub width: usize,
    pub channels: usize,
    pub data: Vec<f32>,
}

impl Nhwc {
    /// From channel planes (`data[(c * height + y) * width + x]`).
    pub fn from_planar(channels: usize, height: usize, width: usize, planar: &[f32]) -> Nhwc {
        let plane = height * width;
        let mut data = vec![0.0; planar.len()];
        for (p, pixel) in data.chunks_exact_mut(channels).enumerate() {
            for (c, v) in pixel.iter_mut().enumerate() {
                *v = planar[c * plane + p];
            }
        }
        Nhwc { height, width, channels, data }
    }

    /// To channel planes.
    pub fn to_planar(&self) -> Vec<f32> {
        let plane = self.height * self.width;
        let mut planar = vec![0.0; self.data.len()];
        for (p, pixel) in self.data.chunks_exact(self.channels).enumerate() {
            for (c, &v) in pixel.iter().enumerate() {
                planar[c * plane + p] = v;
            }
        }
        planar
    }

    /// The mean of each channel over all pixels.
    pub fn channel_means(&self) -> Vec<f32> {
        let mut sums = vec![0.0f64; self.channels];
        for pixel in self.data.chunks_exact(self.channels) {
            sums.iter_mut().zip(pixel).for_each(|(s, &v)| *s += f64::from(v));
        }
        let n = (self.height * self.width) as f64;
        sums.into_iter().map(|s| (s / n) as f32).collect()
    }
}

/// Padding of one convolution for one input size: (top, bottom, left, right).
pub(crate) type Pads = (usize, usize, usize, usize);

#[derive(Clone, Copy, Debug, PartialEq)]
enum ConvShape {
    /// 1x1, stride 1: one matrix product of the pixels with the weights.
    Pointwise,
    /// One filter per channel, channels innermost.
    Depthwise,
    /// Any other convolution: patches gathered into rows (im2col), then a matrix product.
    Dense,
}

/// A convolution with its batch norm folded in, its weights laid out for the kernels.
#[derive(Clone, Debug)]
pub(crate) struct PackedConv {
    shape: ConvShape,
    in_channels: usize,
    out_channels: usize,
    kernel: usize,
    stride: usize,
    /// Pointwise and dense: `[kernel * kernel * in_channels][out_channels]`, taps outermost.
    /// Depthwise: `[kernel * kernel][channels]`.
    weights: Vec<f32>,
    bias: Vec<f32>,
}

impl PackedConv {
    /// From PyTorch's `[out, in / groups, k, k]` weights.
    pub fn new(
        weight: &[f32],
        bias: Vec<f32>,
        (in_channels, out_channels): (usize, usize),
        (kernel, stride): (usize, usize),
        groups: usize,
    ) -> PackedConv {
        let taps = kernel * kernel;
        let depthwise = groups > 1;
        assert!(
            !depthwise || (groups == in_channels && groups == out_channels),
            "grouped convolutions other than depthwise are not used by any supported backbone"
        );
        let shape = if depthwise {
            ConvShape::Depthwise
        } else if kernel == 1 && stride == 1 {
            ConvShape::Pointwise
        } else {
            ConvShape::Dense
        };
        let mut weights = vec![0.0; weight.len()];
        if depthwise {
            for c in 0..out_channels {
                for t in 0..taps {
                    weights[t * out_channels + c] = weight[c * taps + t];
                }
            }
        } else {
            for o in 0..out_channels {
                for i in 0..in_channels {
                    for t in 0..taps {
                        weights[(t * in_channels + i) * out_channels + o] =
                            weight[(o * in_channels + i) * taps + t];
                    }
                }
            }
        }
        PackedConv { shape, in_channels, out_channels, kernel, stride, weights, bias }
    }

    /// `activation(conv(x) + bias + residual)`.
    pub fn run(&self, x: &Nhwc, pads: Pads, residual: Option<&Nhwc>, activation: Activation) -> Nhwc {
        assert_eq!(x.channels, self.in_channels, "convolution input channels");
        let (top, bottom, left, right) = pads;
        let out_h = (x.height + top + bottom - self.kernel) / self.stride + 1;
        let out_w = (x.width + left + right - self.kernel) / self.stride + 1;
        let cout = self.out_channels;
        if let Some(r) = residual {
            assert_eq!((r.height, r.width, r.channels), (out_h, out_w, cout), "residual shape");
        }
        let g = Geometry { in_h: x.height, in_w: x.width, out_w, top, left };
        // A depthwise task is one output row; a matrix-product task a fixed run of pixels.
        let task_pixels =
            if self.shape == ConvShape::Depthwise { out_w } else { pixels_per_task(out_h * out_w) };
        let mut out = vec![0.0; out_h * out_w * cout];
        out.par_chunks_mut(task_pixels * cout).enumerate().for_each_init(Vec::new, |patches, (task, out)| {
            let first = task * task_pixels;
            // The output starts as bias (+ residual), so the products accumulate onto it.
            match residual {
                Some(r) => {
                    let r = &r.data[first * cout..][..out.len()];
                    for (o, r) in out.chunks_exact_mut(cout).zip(r.chunks_exact(cout)) {
                        o.iter_mut().zip(r).zip(&self.bias).for_each(|((o, r), b)| *o = r + b);
                    }
                }
                None => out.chunks_exact_mut(cout).for_each(|o| o.copy_from_slice(&self.bias)),
            }
            match self.shape {
                ConvShape::Pointwise => {
                    let rows = &x.data[first * self.in_channels..][..out.len() / cout * self.in_channels];
                    accumulate_product(rows, self.in_channels, &self.weights, cout, out);
                }
                ConvShape::Dense => {
                    self.gather_patches(x, &g, first, out.len() / cout, patches);
                    accumulate_product(patches, patches.len() / (out.len() / cout), &self.weights, cout, out);
                }
                ConvShape::Depthwise => {
                    depthwise_row(out, first / out_w, x, &g, &self.weights, self.kernel, self.stride)
                }
            }
            activate(out, activation);
        });
        Nhwc { height: out_h, width: out_w, channels: cout, data: out }
    }

    /// The input patches of output pixels `first..first + pixels` as rows (im2col), taps
    /// outermost, zeros where a tap falls in the padding.
    fn gather_patches(&self, x: &Nhwc, g: &Geometry, first: usize, pixels: usize, patches: &mut Vec<f32>) {
        let (cin, k) = (self.in_channels, self.kernel);
        let depth = k * k * cin;
        patches.clear();
        patches.resize(pixels * depth, 0.0);
        for (p, patch) in patches.chunks_exact_mut(depth).enumerate() {
            let (oy, ox) = ((first + p) / g.out_w, (first + p) % g.out_w);
            for ky in 0..k {
                let Some(iy) = g.input_row(oy, ky, self.stride) else { continue };
                for kx in 0..k {
                    let Some(ix) = g.input_col(ox, kx, self.stride) else { continue };
                    let src = &x.data[(iy * g.in_w + ix) * cin..][..cin];
                    let dst = &mut patch[(ky * k + kx) * cin..][..cin];
                    // an element loop for RGB stems, where a memcpy call per tap would cost more
                    if cin < 8 {
                        dst.iter_mut().zip(src).for_each(|(d, s)| *d = *s);
                    } else {
                        dst.copy_from_slice(src);
                    }
                }
            }
        }
    }
}

/// Where an output pixel's taps fall in the input.
struct Geometry {
    in_h: usize,
    in_w: usize,
    out_w: usize,
    top: usize,
    left: usize,
}

impl Geometry {
    #[inline(always)]
    fn input_row(&self, oy: usize, ky: usize, stride: usize) -> Option<usize> {
        (oy * stride + ky).checked_sub(self.top).filter(|&y| y < self.in_h)
    }

    #[inline(always)]
    fn input_col(&self, ox: usize, kx: usize, stride: usize) -> Option<usize> {
        (ox * stride + kx).checked_sub(self.left).filter(|&x| x < self.in_w)
    }
}

/// `out += rows · weights` for row-major `rows` (pixels × depth) and `weights` (depth × cout).
fn accumulate_product(rows: &[f32], depth: usize, weights: &[f32], cout: usize, out: &mut [f32]) {
    let pixels = out.len() / cout;
    debug_assert_eq!(rows.len(), pixels * depth);
    // SAFETY: the slices hold pixels × depth, depth × cout and pixels × cout values, row-major,
    // which is what the strides below describe.
    unsafe {
        gemm::gemm(
            pixels,
            cout,
            depth,
            out.as_mut_ptr(),
            1,
            cout as isize,
            true,
            rows.as_ptr(),
            1,
            depth as isize,
            weights.as_ptr(),
            1,
            cout as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

vigil_core::simd_dispatch! {
    fn depthwise_row(row: &mut [f32], oy: usize, x: &Nhwc, g: &Geometry, weights: &[f32], k: usize, stride: usize);
    fast = depthwise_row_generic::<true>(row, oy, x, g, weights, k, stride);
    portable = depthwise_row_generic::<false>(row, oy, x, g, weights, k, stride);
}

/// Channels per depthwise accumulator block: one AVX-512 register, two AVX2 ones.
const LANES: usize = 16;
/// Output pixels a depthwise filter computes together.
const PIXELS: usize = 4;

/// One output row of a depthwise convolution, accumulated onto `row` (which holds the bias).
/// Channels go in blocks of [`LANES`] kept in registers through all taps of a pixel; pixels
/// whose taps all fall inside the input skip the bounds checks. `FMA` is whether the CPU fuses
/// multiply-add (without it, `mul_add` would be a slow library call).
#[inline(always)]
fn depthwise_row_generic<const FMA: bool>(
    row: &mut [f32],
    oy: usize,
    x: &Nhwc,
    g: &Geometry,
    weights: &[f32],
    k: usize,
    stride: usize,
) {
    let c = x.channels;
    let input_rows: Vec<(usize, usize)> =
        (0..k).filter_map(|ky| g.input_row(oy, ky, stride).map(|iy| (ky, iy))).collect();
    // Output columns whose k taps are all inside the input: ox·stride ≥ left and
    // ox·stride + k − 1 − left < in_w (none when the input is narrower than the kernel).
    let first_inner = g.left.div_ceil(stride);
    let end_inner = (g.in_w + g.left).checked_sub(k).map_or(0, |span| (span / stride + 1).min(g.out_w));
    let madd = |a: f32, s: f32, w: f32| if FMA { s.mul_add(w, a) } else { a + s * w };
    let tap_column = |ox: usize, kx: usize, inner: bool| {
        if inner {
            Some(ox * stride + kx - g.left)
        } else {
            g.input_col(ox, kx, stride)
        }
    };
    let full_blocks = c / LANES * LANES;
    let lanes_at = |data: &[f32], offset: usize| -> [f32; LANES] {
        data[offset..offset + LANES].try_into().expect("LANES values")
    };
    for block in (0..full_blocks).step_by(LANES) {
        let mut ox = 0;
        while ox < g.out_w {
            // PIXELS neighbours at once when all their taps are inside: independent accumulators
            // hide the multiply-add latency and share each weight load.
            if ox >= first_inner && ox + PIXELS <= end_inner {
                let mut acc: [[f32; LANES]; PIXELS] =
                    std::array::from_fn(|p| lanes_at(row, (ox + p) * c + block));
                for &(ky, iy) in &input_rows {
                    for kx in 0..k {
                        let w = lanes_at(weights, (ky * k + kx) * c + block);
                        let base = (iy * g.in_w + ox * stride + kx - g.left) * c + block;
                        for (p, acc) in acc.iter_mut().enumerate() {
                            let src = lanes_at(&x.data, base + p * stride * c);
                            for l in 0..LANES {
                                acc[l] = madd(acc[l], src[l], w[l]);
                            }
                        }
                    }
                }
                for (p, acc) in acc.iter().enumerate() {
                    row[(ox + p) * c + block..][..LANES].copy_from_slice(acc);
                }
                ox += PIXELS;
                continue;
            }
            let inner = ox >= first_inner && ox < end_inner;
            let mut acc = lanes_at(row, ox * c + block);
            for &(ky, iy) in &input_rows {
                for kx in 0..k {
                    let Some(ix) = tap_column(ox, kx, inner) else { continue };
                    let src = lanes_at(&x.data, (iy * g.in_w + ix) * c + block);
                    let w = lanes_at(weights, (ky * k + kx) * c + block);
                    for l in 0..LANES {
                        acc[l] = madd(acc[l], src[l], w[l]);
                    }
                }
            }
            row[ox * c + block..][..LANES].copy_from_slice(&acc);
            ox += 1;
        }
    }
    // the channels after the last full block, one at a time
    for ch in full_blocks..c {
        for ox in 0..g.out_w {
            let mut acc = row[ox * c + ch];
            for &(ky, iy) in &input_rows {
                for kx in 0..k {
                    let Some(ix) = g.input_col(ox, kx, stride) else { continue };
                    acc = madd(acc, x.data[(iy * g.in_w + ix) * c + ch], weights[(ky * k + kx) * c + ch]);
                }
            }
            row[ox * c + ch] = acc;
        }
    }
}

fn activate(values: &mut [f32], activation: Activation) {
    match activation {
        Activation::Identity => {}
        Activation::Relu => values.iter_mut().for_each(|v| *v = v.max(0.0)),
        Activation::Relu6 => values.iter_mut().for_each(|v| *v = v.clamp(0.0, 6.0)),
        Activation::Silu => values.iter_mut().for_each(|v| *v *= sigmoid(*v)),
    }
}

/// 1 / (1 + e^-x); for very negative x the exponential overflows to infinity and gives 0.
#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(a, b)| a * b).sum()
}

/// Squeeze-excitation in place: channel c of `x` is multiplied by
/// sigmoid(expand_c · silu(reduce · means + reduce_bias) + expand_bias_c), the means taken over
/// all pixels. Weights are row-major, `reduce` `[squeezed][channels]` and `expand`
/// `[channels][squeezed]`. The gates are a few small dot products; the rescaling is split
/// into rows among the threads.
pub(crate) fn squeeze_excite(
    x: &mut Nhwc,
    (reduce, reduce_bias): (&[f32], &[f32]),
    (expand, expand_bias): (&[f32], &[f32]),
) {
    let channels = x.channels;
    let means = x.channel_means();
    let squeezed: Vec<f32> = reduce
        .chunks_exact(channels)
        .zip(reduce_bias)
        .map(|(row, b)| {
            let v = b + dot(row, &means);
            v * sigmoid(v)
        })
        .collect();
    let gates: Vec<f32> = expand
        .chunks_exact(squeezed.len())
        .zip(expand_bias)
        .map(|(row, b)| sigmoid(b + dot(row, &squeezed)))
        .collect();
    debug_assert_eq!(gates.len(), channels);
    x.data.par_chunks_mut(x.width * channels).for_each(|row| {
        for pixel in row.chunks_exact_mut(channels) {
            pixel.iter_mut().zip(&gates).for_each(|(v, g)| *v *= g);
        }
    });
}

/// torchvision's ResNet stem pooling, 3x3 stride 2 padding 1 (padding never wins the max).
pub(crate) fn max_pool_3x3_s2(x: &Nhwc) -> Nhwc {
    let out_h = (x.height + 2 - 3) / 2 + 1;
    let out_w = (x.width + 2 - 3) / 2 + 1;
    let channels = x.channels;
    let g = Geometry { in_h: x.height, in_w: x.width, out_w, top: 1, left: 1 };
    let mut data = vec![f32::NEG_INFINITY; out_h * out_w * channels];
    data.par_chunks_mut(out_w * channels).enumerate().for_each(|(oy, row)| {
        for (ox, acc) in row.chunks_exact_mut(channels).enumerate() {
            for ky in 0..3 {
                let Some(iy) = g.input_row(oy, ky, 2) else { continue };
                for kx in 0..3 {
                    let Some(ix) = g.input_col(ox, kx, 2) else { continue };
                    let src = &x.data[(iy * x.width + ix) * channels..][..channels];
                    acc.iter_mut().zip(src).for_each(|(a, &s)| *a = a.max(s));
                }
            }
        }
    });
    Nhwc { height: out_h, width: out_w, channels, data }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Direct NCHW convolution with PyTorch's weight layout, the reference for every shape.
    #[allow(clippy::too_many_arguments)]
    fn reference_conv(
        x: &[f32],
        (cin, h, w): (usize, usize, usize),
        weight: &[f32],
        bias: &[f32],
        cout: usize,
        (k, stride, groups): (usize, usize, usize),
        (top, bottom, left, right): Pads,
    ) -> (Vec<f32>, usize, usize) {
        let out_h = (h + top + bottom - k) / stride + 1;
        let out_w = (w + left + right - k) / stride + 1;
        let per_group_in = cin / groups;
        let per_group_out = cout / groups;
        let mut out = vec![0.0; cout * out_h * out_w];
        for o in 0..cout {
            let group = o / per_group_out;
            for oy in 0..out_h {
                for ox in 0..out_w {
                    let mut acc = f64::from(bias[o]);
                    for i in 0..per_group_in {
                        let ci = group * per_group_in + i;
                        for ky in 0..k {
                            for kx in 0..k {
                                let (iy, ix) = (
                                    (oy * stride + ky) as isize - top as isize,
                                    (ox * stride + kx) as isize - left as isize,
                                );
                                if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                                    continue;
                                }
                                let v = x[(ci * h + iy as usize) * w + ix as usize];
                                acc += f64::from(v)
                                    * f64::from(weight[((o * per_group_in + i) * k + ky) * k + kx]);
                            }
                        }
                    }
                    out[(o * out_h + oy) * out_w + ox] = acc as f32;
                }
            }
        }
        (out, out_h, out_w)
    }

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                (((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 8) % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn every_convolution_shape_matches_a_direct_reference() {
        // (cin, cout, kernel, stride, groups, pads), on inputs of 13x10 and 600 output pixels
        // (more than one task) -- covering pointwise, strided and 7x7 dense, 3x3 and 5x5
        // depthwise with symmetric and TensorFlow-style asymmetric padding.
        let cases = [
            (16, 24, 1, 1, 1, (0, 0, 0, 0)),
            (3, 32, 3, 2, 1, (1, 1, 1, 1)),
            (3, 8, 7, 2, 1, (3, 3, 3, 3)),
            (8, 16, 1, 2, 1, (0, 0, 0, 0)),
            (12, 12, 3, 1, 12, (1, 1, 1, 1)),
            (12, 12, 3, 2, 12, (0, 1, 0, 1)),
            (32, 32, 3, 2, 32, (0, 1, 0, 1)),
            (20, 20, 5, 2, 20, (1, 2, 1, 2)),
            (6, 10, 3, 1, 1, (1, 1, 1, 1)),
        ];
        for (cin, cout, k, stride, groups, pads) in cases {
            for (h, w) in [(13, 10), (20, 30), (2, 2), (2, 3)] {
                let x = values(cin * h * w, 1);
                let weight = values(cout * (cin / groups) * k * k, 2);
                let bias = values(cout, 3);
                let (want, out_h, out_w) =
                    reference_conv(&x, (cin, h, w), &weight, &bias, cout, (k, stride, groups), pads);
                let conv = PackedConv::new(&weight, bias.clone(), (cin, cout), (k, stride), groups);
                let got = conv.run(&Nhwc::from_planar(cin, h, w, &x), pads, None, Activation::Identity);
                assert_eq!((got.height, got.width, got.channels), (out_h, out_w, cout));
                let error = got.to_planar().iter().zip(&want).fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
                assert!(
                    error < 1e-4,
                    "cin {cin} cout {cout} k {k} s {stride} g {groups} {h}x{w}: error {error}"
                );
            }
        }
    }

    #[test]
    fn depthwise_matches_the_reference_on_every_small_shape() {
        // Every map from 1x1 to 9x9 under both padding rules the backbones use, with channel
        // counts that give full 16-lane blocks, a tail, or both.
        for (k, stride) in [(3, 1), (3, 2), (5, 1), (5, 2)] {
            for c in [16, 20, 40] {
                for (h, w) in (1..=9).flat_map(|h| (1..=9).map(move |w| (h, w))) {
                    let (top, bottom) = crate::layers::tf_same_padding(h, k, stride);
                    let (left, right) = crate::layers::tf_same_padding(w, k, stride);
                    for pads in [(k / 2, k / 2, k / 2, k / 2), (top, bottom, left, right)] {
                        if h + pads.0 + pads.1 < k || w + pads.2 + pads.3 < k {
                            continue;
                        }
                        let x = values(c * h * w, (h * 10 + w) as u32);
                        let weight = values(c * k * k, 12);
                        let bias = values(c, 13);
                        let (want, _, _) =
                            reference_conv(&x, (c, h, w), &weight, &bias, c, (k, stride, c), pads);
                        let conv = PackedConv::new(&weight, bias.clone(), (c, c), (k, stride), c);
                        let got = conv.run(&Nhwc::from_planar(c, h, w, &x), pads, None, Activation::Identity);
                        let error =
                            got.to_planar().iter().zip(&want).fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
                        assert!(error < 1e-4, "k {k} s {stride} c {c} {h}x{w} pads {pads:?}: error {error}");
                    }
                }
            }
        }
    }

    #[test]
    fn depthwise_rows_agree_on_every_instruction_set() {
        // 20 channels: one 16-lane block and a 4-channel tail; 11 columns: inner runs of four
        // pixels, single inner pixels and border pixels.
        let (c, h, w, k) = (20, 7, 11, 3);
        let x = Nhwc::from_planar(c, h, w, &values(c * h * w, 9));
        let weights = values(k * k * c, 10);
        for (stride, pads) in [(1, (1, 1, 1, 1)), (2, (0, 1, 0, 1))] {
            let out_w = (w + pads.2 + pads.3 - k) / stride + 1;
            let g = Geometry { in_h: h, in_w: w, out_w, top: pads.0, left: pads.2 };
            for oy in 0..(h + pads.0 + pads.1 - k) / stride + 1 {
                let bias = values(out_w * c, 11);
                let mut dispatched = bias.clone();
                depthwise_row(&mut dispatched, oy, &x, &g, &weights, k, stride);
                for portable in [false, true] {
                    let mut row = bias.clone();
                    if portable {
                        depthwise_row_generic::<false>(&mut row, oy, &x, &g, &weights, k, stride);
                    } else {
                        depthwise_row_generic::<true>(&mut row, oy, &x, &g, &weights, k, stride);
                    }
                    let error = row.iter().zip(&dispatched).fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
                    assert!(error < 1e-5, "stride {stride} row {oy} portable {portable}: {error}");
                }
            }
        }
    }

    #[test]
    fn residual_and_activation_apply_after_the_sum() {
        let (cin, cout, h, w) = (4, 5, 3, 7);
        let x = values(cin * h * w, 4);
        let weight = values(cout * cin, 5);
        let bias = values(cout, 6);
        let residual = Nhwc::from_planar(
            cout,
            h,
            w,
            &values(cout * h * w, 7).iter().map(|v| v * 8.0).collect::<Vec<_>>(),
        );
        let conv = PackedConv::new(&weight, bias, (cin, cout), (1, 1), 1);
        let input = Nhwc::from_planar(cin, h, w, &x);
        let plain = conv.run(&input, (0, 0, 0, 0), None, Activation::Identity);
        for activation in [Activation::Identity, Activation::Relu, Activation::Relu6, Activation::Silu] {
            let got = conv.run(&input, (0, 0, 0, 0), Some(&residual), activation);
            for ((g, p), r) in got.data.iter().zip(&plain.data).zip(&residual.data) {
                let sum = p + r;
                let want = match activation {
                    Activation::Identity => sum,
                    Activation::Relu => sum.max(0.0),
                    Activation::Relu6 => sum.clamp(0.0, 6.0),
                    Activation::Silu => (f64::from(sum) / (1.0 + (-f64::from(sum)).exp())) as f32,
                };
                assert!((g - want).abs() < 1e-5, "{activation:?}: {g} vs {want}");
            }
        }
    }

    #[test]
    fn squeeze_excitation_matches_a_direct_reference() {
        // 20 channels squeezed to 5, on a 3x7 map; computed in f64 from the definition.
        let (c, squeezed, h, w) = (20, 5, 3, 7);
        let planar = values(c * h * w, 14);
        let reduce = values(squeezed * c, 15);
        let reduce_bias = values(squeezed, 16);
        let expand = values(c * squeezed, 17);
        let expand_bias = values(c, 18);
        let mut x = Nhwc::from_planar(c, h, w, &planar);
        squeeze_excite(&mut x, (&reduce, &reduce_bias), (&expand, &expand_bias));
        let sigmoid = |v: f64| 1.0 / (1.0 + (-v).exp());
        let means: Vec<f64> = planar
            .chunks_exact(h * w)
            .map(|plane| plane.iter().map(|&v| f64::from(v)).sum::<f64>() / (h * w) as f64)
            .collect();
        let hidden: Vec<f64> = (0..squeezed)
            .map(|s| {
                let v = f64::from(reduce_bias[s])
                    + (0..c).map(|i| f64::from(reduce[s * c + i]) * means[i]).sum::<f64>();
                v * sigmoid(v)
            })
            .collect();
        let got = x.to_planar();
        for ch in 0..c {
            let gate = sigmoid(
                f64::from(expand_bias[ch])
                    + (0..squeezed).map(|s| f64::from(expand[ch * squeezed + s]) * hidden[s]).sum::<f64>(),
            );
            for p in 0..h * w {
                let want = f64::from(planar[ch * h * w + p]) * gate;
                let error = (f64::from(got[ch * h * w + p]) - want).abs();
                assert!(error < 1e-5, "channel {ch} pixel {p}: error {error}");
            }
        }
    }

    #[test]
    fn max_pool_matches_a_direct_reference_and_layouts_round_trip() {
        let (c, h, w) = (3, 9, 6);
        let planar = values(c * h * w, 8);
        let x = Nhwc::from_planar(c, h, w, &planar);
        assert_eq!(x.to_planar(), planar);
        let pooled = max_pool_3x3_s2(&x);
        assert_eq!((pooled.height, pooled.width), (5, 3));
        for ch in 0..c {
            for oy in 0..5usize {
                for ox in 0..3usize {
                    let mut want = f32::NEG_INFINITY;
                    for iy in (oy * 2).saturating_sub(1)..(oy * 2 + 2).min(h) {
                        for ix in (ox * 2).saturating_sub(1)..(ox * 2 + 2).min(w) {
                            want = want.max(planar[(ch * h + iy) * w + ix]);
                        }
                    }
                    assert_eq!(pooled.data[(oy * 3 + ox) * c + ch], want);
                }
            }
        }
        let means = x.channel_means();
        let want: f32 = planar[..h * w].iter().sum::<f32>() / (h * w) as f32;
        assert!((means[0] - want).abs() < 1e-6);
    }
}
