//! CS-Flow: fully convolutional cross-scale normalizing flows for image-based defect detection
//! (Rudolph et al., WACV 2022; marco-rudolph/cs-flow, anomalib `csflow`).
//!
//! - [`settings`]: [`CsflowSettings`] and the `cpu` / `paper` presets.
//! - [`model`]: [`CsflowModel`], the cross-scale coupling blocks with their cross-convolution
//!   subnets.
//! - [`detector`]: [`CsflowDetector`], the vigil [`Detector`](vigil_core::Detector).

pub mod detector;
pub mod model;
pub mod settings;

pub use detector::CsflowDetector;
pub use model::{CsflowModel, CsflowShape};
pub use settings::{CsflowSettings, CsflowSpec, Preset};
