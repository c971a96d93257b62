//! DRAEM's networks on burn, with names that mirror the PyTorch modules in
//! `benchmarks/draem_vs_torch/draem_torch.py` (so weights map 1:1).
//!
//! Channel widths at encoder level l are `base * min(2^l, 8)`, and the decoder narrows as the
//! official code does: `dec[0] = base`, `dec[l] = base * min(2^(l-1), 8)`. With the official
//! depths (reconstructive 4 poolings, discriminative 5) and bases (128, 64) this reproduces
//! VitjanZ/DRAEM's `ReconstructiveSubNetwork` and `DiscriminativeSubNetwork` exactly.

use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{BatchNorm, BatchNormConfig, PaddingConfig2d};
use burn::tensor::activation::{leaky_relu, relu};
use burn::tensor::module::{interpolate, max_pool2d};
use burn::tensor::ops::{InterpolateMode, InterpolateOptions, MaxPoolOptions};
use burn::tensor::{Device, Tensor};

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

    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let y = self.bn.forward(self.conv.forward(x));
        if self.slope == 0.0 {
            relu(y)
        } else {
            leaky_relu(y, self.slope)
        }
    }
}

/// Two [`ConvBnAct`] in a row (DRAEM's blocks, UNet++'s VGG block).
#[derive(Module, Debug)]
pub struct DoubleConv {
    pub a: ConvBnAct,
    pub b: ConvBnAct,
}

impl DoubleConv {
    pub fn new(cin: usize, cout: usize, slope: f64, device: &Device) -> Self {
        DoubleConv {
            a: ConvBnAct::new(cin, cout, slope, device),
            b: ConvBnAct::new(cout, cout, slope, device),
        }
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
            decoder.push(DoubleConv::new(width, dec_width(base, l), 0.0, device));
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
        self.out.forward(h)
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
        self.out.forward(h)
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
        self.out.forward(last)
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

    #[test]
    fn official_widths_and_shapes() {
        let device = Device::flex();
        // Official widths, scaled down 16x to keep the test small: the pattern must hold.
        let ae = Autoencoder::new(3, 8, 4, &device);
        let bag = module_to_bag(&ae);
        assert_eq!(bag.shape("encoder.4.b.conv.weight").unwrap(), &[64, 64, 3, 3]);
        assert_eq!(bag.shape("up.0.conv.weight").unwrap(), &[64, 64, 3, 3]);
        assert_eq!(bag.shape("decoder.0.a.conv.weight").unwrap(), &[32, 64, 3, 3]);
        assert_eq!(bag.shape("decoder.3.b.conv.weight").unwrap(), &[8, 8, 3, 3]);
        assert_eq!(bag.shape("out.weight").unwrap(), &[3, 8, 3, 3]);
        let unet = UNet::new(6, 2, 4, 5, &device);
        let bag = module_to_bag(&unet);
        assert_eq!(bag.shape("encoder.5.a.conv.weight").unwrap(), &[32, 32, 3, 3]);
        assert_eq!(bag.shape("decoder.0.a.conv.weight").unwrap(), &[32, 64, 3, 3]);
        assert_eq!(bag.shape("decoder.1.a.conv.weight").unwrap(), &[16, 48, 3, 3]);
        assert_eq!(bag.shape("decoder.4.a.conv.weight").unwrap(), &[4, 8, 3, 3]);
        let x = Tensor::<4>::zeros([2, 3, 32, 32], &device);
        let net = DraemNet { reconstructive: ae, discriminative: unet };
        let (rec, logits) = net.forward(x);
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
}
