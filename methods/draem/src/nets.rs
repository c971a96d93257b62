//! DRAEM's networks on burn, with names that mirror the PyTorch modules in
//! `benchmarks/draem_vs_torch/draem_torch.py` (so weights map 1:1).
//!
//! Channel widths at encoder level l are `base * min(2^l, 8)`; the decoder's output width at level
//! l is `dec[0] = base`, `dec[l] = base * min(2^(l-1), 8)`. Where the official code narrows
//! differs between the two networks, and both are kept: in the reconstructive decoder
//! (`DecoderReconstructive` of VitjanZ/DRAEM `model_unet.py`) the up-sampling conv and the first
//! conv of each block keep the width and the block's second conv narrows it (db1 8b→8b→4b, db2
//! 4b→4b→2b, db3 2b→2b→b, db4 b→b→b); in the discriminative decoder (`DecoderDiscriminative`) the
//! up-sampling conv narrows and the block takes the skip concatenation to that width. With the
//! official depths (reconstructive 4 poolings, discriminative 5) and bases (128, 64) these are the
//! official `ReconstructiveSubNetwork` and `DiscriminativeSubNetwork` layer for layer (97,458,309
//! values, BatchNorm statistics included: the test `official_widths_and_shapes`); other depths and
//! widths (the CPU preset) follow the same rules.

use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{BatchNorm, BatchNormConfig, PaddingConfig2d};
use burn::tensor::module::{interpolate, max_pool2d};
use burn::tensor::ops::{InterpolateMode, InterpolateOptions, MaxPoolOptions};
use burn::tensor::{Device, Tensor};
use vigil_nn::kernels;

fn enc_width(base: usize, level: usize) -> usize {
    base * (1usize << level.min(3))
}

fn dec_width(base: usize, level: usize) -> usize {
    if level == 0 {
        base
    } else {
        base * (1usize << (level - 1).min(3))
    }
}

fn conv3x3(cin: usize, cout: usize, device: &Device) -> Conv2d {
    Conv2dConfig::new([cin, cout], [3, 3]).with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1)).init(device)
}

/// Conv 3x3 -> BatchNorm -> ReLU (slope 0) or LeakyReLU.
#[derive(Module, Debug)]
pub struct ConvBnAct {
    pub conv: Conv2d,
    pub bn: BatchNorm,
    pub slope: f64,
}

impl ConvBnAct {
    pub fn new(cin: usize, cout: usize, slope: f64, device: &Device) -> Self {
        ConvBnAct { conv: conv3x3(cin, cout, device), bn: BatchNormConfig::new(cout).init(device), slope }
    }

    /// On the CPU by vigil's training kernels (see `vigil_nn::kernels`), else burn's operations.
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        kernels::batch_norm_act(&self.bn, kernels::conv2d(&self.conv, x), self.slope)
    }
}

/// Two [`ConvBnAct`] in a row (DRAEM's blocks, UNet++'s VGG block).
#[derive(Module, Debug)]
pub struct DoubleConv {
    pub a: ConvBnAct,
    pub b: ConvBnAct,
}

impl DoubleConv {
    /// The first conv changes the width, the second keeps it (encoders, discriminative decoder,
    /// UNet++ nodes).
    pub fn new(cin: usize, cout: usize, slope: f64, device: &Device) -> Self {
        DoubleConv {
            a: ConvBnAct::new(cin, cout, slope, device),
            b: ConvBnAct::new(cout, cout, slope, device),
        }
    }

    /// The first conv keeps the width, the second changes it (the official reconstructive
    /// decoder blocks `db1`..`db4`).
    pub fn narrowing_last(cin: usize, cout: usize, slope: f64, device: &Device) -> Self {
        DoubleConv { a: ConvBnAct::new(cin, cin, slope, device), b: ConvBnAct::new(cin, cout, slope, device) }
    }

    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        self.b.forward(self.a.forward(x))
    }
}

fn pool(x: Tensor<4>) -> Tensor<4> {
    max_pool2d(x, MaxPoolOptions::new([2, 2]))
}

/// Bilinear up-sampling (align_corners = true, as the official code) to `size`.
fn upsample(x: Tensor<4>, size: [usize; 2]) -> Tensor<4> {
    interpolate(x, InterpolateOptions::new(InterpolateMode::Bilinear).with_output_size(size))
}

fn spatial(x: &Tensor<4>) -> [usize; 2] {
    let [_, _, h, w] = x.dims();
    [h, w]
}

/// A network that maps an image batch to a reconstruction of the same shape.
pub trait Reconstructor: Module + burn::module::ModuleDisplay + Sync + Send {
    fn forward(&self, x: Tensor<4>) -> Tensor<4>;
}

/// DRAEM's reconstructive sub-network: a plain encoder-decoder without skip connections.
#[derive(Module, Debug)]
pub struct Autoencoder {
    pub encoder: Vec<DoubleConv>,
    pub up: Vec<ConvBnAct>,
    pub decoder: Vec<DoubleConv>,
    pub out: Conv2d,
}

impl Autoencoder {
    /// `depth` poolings (official 4), `base` width (official 128).
    pub fn new(channels: usize, base: usize, depth: usize, device: &Device) -> Self {
        let mut encoder = vec![DoubleConv::new(channels, base, 0.0, device)];
        for l in 1..=depth {
            encoder.push(DoubleConv::new(enc_width(base, l - 1), enc_width(base, l), 0.0, device));
        }
        let (mut up, mut decoder) = (Vec::new(), Vec::new());
        let mut width = enc_width(base, depth);
        for l in (0..depth).rev() {
            up.push(ConvBnAct::new(width, width, 0.0, device));
            decoder.push(DoubleConv::narrowing_last(width, dec_width(base, l), 0.0, device));
            width = dec_width(base, l);
        }
        Autoencoder { encoder, up, decoder, out: conv3x3(width, channels, device) }
    }
}

impl Reconstructor for Autoencoder {
    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let mut sizes = Vec::new();
        let mut h = x;
        for (l, block) in self.encoder.iter().enumerate() {
            if l > 0 {
                sizes.push(spatial(&h));
                h = pool(h);
            }
            h = block.forward(h);
        }
        for (up, block) in self.up.iter().zip(&self.decoder) {
            let size = sizes.pop().expect("one size per pooling");
            h = block.forward(up.forward(upsample(h, size)));
        }
        kernels::conv2d(&self.out, h)
    }
}

/// DRAEM's discriminative sub-network: a U-Net with skip connections, 2 output logits.
#[derive(Module, Debug)]
pub struct UNet {
    pub encoder: Vec<DoubleConv>,
    pub up: Vec<ConvBnAct>,
    pub decoder: Vec<DoubleConv>,
    pub out: Conv2d,
}

impl UNet {
    /// `depth` poolings (official 5), `base` width (official 64).
    pub fn new(cin: usize, cout: usize, base: usize, depth: usize, device: &Device) -> Self {
        let mut encoder = vec![DoubleConv::new(cin, base, 0.0, device)];
        for l in 1..=depth {
            encoder.push(DoubleConv::new(enc_width(base, l - 1), enc_width(base, l), 0.0, device));
        }
        let (mut up, mut decoder) = (Vec::new(), Vec::new());
        let mut width = enc_width(base, depth);
        for l in (0..depth).rev() {
            let d = dec_width(base, l);
            up.push(ConvBnAct::new(width, d, 0.0, device));
            decoder.push(DoubleConv::new(d + enc_width(base, l), d, 0.0, device));
            width = d;
        }
        UNet { encoder, up, decoder, out: conv3x3(width, cout, device) }
    }

    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let mut skips = Vec::new();
        let mut h = x;
        for (l, block) in self.encoder.iter().enumerate() {
            if l > 0 {
                h = pool(h);
            }
            h = block.forward(h);
            skips.push(h.clone());
        }
        skips.pop();
        for (up, block) in self.up.iter().zip(&self.decoder) {
            let skip = skips.pop().expect("one skip per level");
            let u = up.forward(upsample(h, spatial(&skip)));
            h = block.forward(Tensor::cat(vec![u, skip], 1));
        }
        kernels::conv2d(&self.out, h)
    }
}

/// UNet++ (Nested U-Net) as a reconstructive sub-network: nodes x^{i,j} (level i, position j
/// along the skip path), each a VGG block (2 x conv 3x3 + BN + LeakyReLU 0.2) over the
/// concatenation of x^{i,0..j} and the up-sampled x^{i+1,j-1}; widths `base * 2^i`.
#[derive(Module, Debug)]
pub struct NestedUNet {
    /// Nodes in the order of [`NestedUNet::node_order`].
    pub nodes: Vec<DoubleConv>,
    pub out: Conv2d,
    pub depth: usize,
}

impl NestedUNet {
    /// (level i, position j) of every node, j-major: the backbone x^{i,0} first, then each
    /// skip column, so a node's inputs are always computed before it.
    pub fn node_order(depth: usize) -> Vec<(usize, usize)> {
        (0..=depth).flat_map(|j| (0..=depth - j).map(move |i| (i, j))).collect()
    }

    pub fn new(channels: usize, base: usize, depth: usize, device: &Device) -> Self {
        let width = |i: usize| base << i;
        let nodes = Self::node_order(depth)
            .into_iter()
            .map(|(i, j)| {
                let cin = match (i, j) {
                    (0, 0) => channels,
                    (i, 0) => width(i - 1),
                    (i, j) => width(i) * j + width(i + 1),
                };
                DoubleConv::new(cin, width(i), 0.2, device)
            })
            .collect();
        NestedUNet { nodes, out: Conv2dConfig::new([base, channels], [1, 1]).init(device), depth }
    }
}

impl Reconstructor for NestedUNet {
    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let order = Self::node_order(self.depth);
        let mut outputs: Vec<Vec<Tensor<4>>> = vec![Vec::new(); self.depth + 1];
        for ((i, j), node) in order.into_iter().zip(&self.nodes) {
            let y = if j == 0 {
                let input = if i == 0 { x.clone() } else { pool(outputs[i - 1][0].clone()) };
                node.forward(input)
            } else {
                let size = spatial(&outputs[i][0]);
                let mut inputs: Vec<Tensor<4>> = outputs[i][..j].to_vec();
                inputs.push(upsample(outputs[i + 1][j - 1].clone(), size));
                node.forward(Tensor::cat(inputs, 1))
            };
            outputs[i].push(y);
        }
        let last = outputs[0].pop().expect("x^{0,depth}");
        kernels::conv2d(&self.out, last)
    }
}

/// Reconstructive + discriminative networks, trained together by one optimiser.
#[derive(Module, Debug)]
pub struct DraemNet<R: Reconstructor> {
    pub reconstructive: R,
    pub discriminative: UNet,
}

impl<R: Reconstructor> DraemNet<R> {
    /// Reconstruction and 2-channel anomaly logits for a batch in [0, 1].
    pub fn forward(&self, x: Tensor<4>) -> (Tensor<4>, Tensor<4>) {
        let rec = self.reconstructive.forward(x.clone());
        let logits = self.discriminative.forward(Tensor::cat(vec![rec.clone(), x], 1));
        (rec, logits)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vigil_nn::module_to_bag;

    fn shape(conv: &Conv2d) -> [usize; 4] {
        conv.weight.lazy_shape().dims::<4>()
    }

    /// Output and input widths of the convs in one official block, as `model_unet.py` writes them.
    fn block(block: &DoubleConv) -> [[usize; 4]; 2] {
        [shape(&block.a.conv), shape(&block.b.conv)]
    }

    #[test]
    fn official_widths_and_shapes() {
        let device = Device::flex();
        // Paper widths (shapes are read without allocating the 97 M values).
        let ae = Autoencoder::new(3, 128, 4, &device);
        let k = |o: usize, i: usize| [o, i, 3, 3];
        // EncoderReconstructive block1..block5: 3→128→256→512→1024→1024.
        let enc = [(3, 128), (128, 256), (256, 512), (512, 1024), (1024, 1024)];
        for (b, &(i, o)) in ae.encoder.iter().zip(&enc) {
            assert_eq!(block(b), [k(o, i), k(o, o)]);
        }
        // DecoderReconstructive: up1..up4 keep the width; db1..db4 keep it in the first conv and
        // narrow in the second (1024→1024→512, 512→512→256, 256→256→128, 128→128→128).
        let dec = [(1024, 512), (512, 256), (256, 128), (128, 128)];
        assert_eq!(ae.up.len(), 4);
        for ((up, b), &(i, o)) in ae.up.iter().zip(&ae.decoder).zip(&dec) {
            assert_eq!(shape(&up.conv), k(i, i));
            assert_eq!(block(b), [k(i, i), k(o, i)]);
        }
        assert_eq!(shape(&ae.out), k(3, 128));

        let unet = UNet::new(6, 2, 64, 5, &device);
        // EncoderDiscriminative block1..block6: 6→64→128→256→512→512→512.
        let enc = [(6, 64), (64, 128), (128, 256), (256, 512), (512, 512), (512, 512)];
        for (b, &(i, o)) in unet.encoder.iter().zip(&enc) {
            assert_eq!(block(b), [k(o, i), k(o, o)]);
        }
        // DecoderDiscriminative up_b, up1..up4 narrow; db_b, db1..db4 take (up, skip) to that width.
        let dec = [(512, 512, 1024), (512, 256, 768), (256, 128, 384), (128, 64, 192), (64, 64, 128)];
        for ((up, b), &(i, o, cat)) in unet.up.iter().zip(&unet.decoder).zip(&dec) {
            assert_eq!(shape(&up.conv), k(o, i));
            assert_eq!(block(b), [k(o, cat), k(o, o)]);
        }
        assert_eq!(shape(&unet.out), k(2, 64));

        // The official pair has 97,458,309 values: parameters plus BatchNorm running statistics.
        let net = DraemNet { reconstructive: ae, discriminative: unet };
        assert_eq!(net.num_params(), 97_458_309);

        // The same rules at small widths and other depths give working networks.
        let small = DraemNet {
            reconstructive: Autoencoder::new(3, 8, 3, &device),
            discriminative: UNet::new(6, 2, 4, 4, &device),
        };
        assert_eq!(block(&small.reconstructive.decoder[0]), [k(64, 64), k(16, 64)]);
        let (rec, logits) = small.forward(Tensor::<4>::zeros([2, 3, 32, 32], &device));
        assert_eq!(rec.dims(), [2, 3, 32, 32]);
        assert_eq!(logits.dims(), [2, 2, 32, 32]);
    }

    #[test]
    fn nested_unet_nodes_and_shapes() {
        let device = Device::flex();
        assert_eq!(NestedUNet::node_order(2), vec![(0, 0), (1, 0), (2, 0), (0, 1), (1, 1), (0, 2)]);
        let nn = NestedUNet::new(3, 4, 4, &device);
        assert_eq!(nn.nodes.len(), 15);
        let bag = module_to_bag(&nn);
        // x^{0,4} sees x^{0,0..3} (4 x 4 channels) and up(x^{1,3}) (8 channels).
        assert_eq!(bag.shape("nodes.14.a.conv.weight").unwrap(), &[4, 24, 3, 3]);
        // x^{4,0} is the bottleneck at width 4 * 16.
        assert_eq!(bag.shape("nodes.4.b.conv.weight").unwrap(), &[64, 64, 3, 3]);
        let y = nn.forward(Tensor::<4>::zeros([1, 3, 32, 32], &device));
        assert_eq!(y.dims(), [1, 3, 32, 32]);
    }

    /// Every parameter's gradient, in visiting order.
    struct GradientsOf<'a>(&'a burn::tensor::Gradients, Vec<Vec<f32>>);

    impl burn::module::ModuleVisitor for GradientsOf<'_> {
        fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<Tensor<D>>) {
            if let Some(grad) = param.val().grad(self.0) {
                self.1.push(vigil_nn::tensor_to_vec(grad));
            }
        }
    }

    /// One backward pass through both networks gives every parameter the same gradient with
    /// vigil's kernels as with burn's operations, to rounding (relative to the largest value of
    /// each gradient; the conv biases ahead of a BatchNorm have true gradient 0 and are left out).
    #[test]
    fn every_gradient_is_the_same_with_vigil_kernels_and_burn_operations() {
        let device = Device::flex().autodiff();
        for seed in 0..4 {
            // DRAEM's own initialisation (N(0, 0.02) kernels), as training starts from
            let net = vigil_nn::init_normal(
                DraemNet {
                    reconstructive: Autoencoder::new(3, 4, 2, &device),
                    discriminative: UNet::new(6, 2, 4, 3, &device),
                },
                seed,
                0.02,
            );
            gradients_agree(&net, &device, seed);
        }
    }

    fn gradients_agree(net: &DraemNet<Autoencoder>, device: &Device, seed: u64) {
        use vigil_nn::kernels::{with_kernels, KernelChoice};
        // centred values: an all-positive output gradient makes BatchNorm's backward cancel
        // large terms, which magnifies rounding
        let values = |len: usize, seed: u32| -> Vec<f32> {
            (0..len)
                .map(|i| {
                    ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) % 1000) as f32 / 1000.0 - 0.5
                })
                .collect()
        };
        let (n, s) = (2, 32);
        let gradients = |choice| {
            with_kernels(choice, || {
                let x = vigil_nn::tensor_from_vec(values(n * 3 * s * s, 1), [n, 3, s, s], device);
                let (rec, logits) = net.forward(x);
                let r1 = vigil_nn::tensor_from_vec(values(n * 3 * s * s, 2), [n, 3, s, s], device);
                let r2 = vigil_nn::tensor_from_vec(values(n * 2 * s * s, 3), [n, 2, s, s], device);
                let grads = ((rec * r1).sum() + (logits * r2).sum()).backward();
                let mut visitor = GradientsOf(&grads, Vec::new());
                net.visit(&mut visitor);
                visitor.1
            })
        };
        let (vigil, burn) = (gradients(KernelChoice::Vigil), gradients(KernelChoice::Burn));
        assert_eq!(vigil.len(), burn.len());
        let mut compared = 0;
        for (i, (v, b)) in vigil.iter().zip(&burn).enumerate() {
            let scale = b.iter().fold(0.0f32, |m, x| m.max(x.abs()));
            if scale < 1e-2 {
                continue;
            }
            let diff = v.iter().zip(b).fold(0.0f32, |m, (x, y)| m.max((x - y).abs()));
            assert!(
                diff <= 1e-3 * scale,
                "seed {seed} parameter {i}: largest difference {diff} of largest value {scale}"
            );
            compared += 1;
        }
        assert!(compared > vigil.len() / 2, "only {compared} of {} gradients compared", vigil.len());
    }
}
