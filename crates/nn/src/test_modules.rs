//! Small modules the unit tests of this crate share.

use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{BatchNorm, BatchNormConfig};
use burn::tensor::Device;

/// A convolution followed by a batch norm: every kind of parameter and buffer the engine handles.
#[derive(Module, Debug)]
pub struct Tiny {
    pub conv: Conv2d,
    pub bn: BatchNorm,
}

pub fn tiny(device: &Device, channels_in: usize, channels_out: usize) -> Tiny {
    Tiny {
        conv: Conv2dConfig::new([channels_in, channels_out], [3, 3]).init(device),
        bn: BatchNormConfig::new(channels_out).init(device),
    }
}
