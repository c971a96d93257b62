//! Shared ground for every vigil crate: the image, map and mask types, the [`Detector`]
//! interface every method implements, thresholds, model files and errors.

pub mod detector;
pub mod error;
pub mod fingerprint;
pub mod image;
pub mod map;
pub mod mask;
pub mod model_file;
pub mod progress;
pub mod shared_data;
pub mod simd;
pub mod tensors;
pub mod threshold;

pub use detector::{
    for_each_batch, ChannelMode, Detector, FitContext, ImageSource, InMemorySource, ScoreOutput,
};
pub use error::{Result, VigilError};
pub use fingerprint::{DataFingerprint, WeightsFile};
pub use image::Image;
pub use map::{BlurBorder, Map};
pub use mask::Mask;
pub use model_file::ModelFile;
pub use tensors::TensorBag;
pub use threshold::{Threshold, ThresholdKind, ThresholdLevel};
