//! Reverse Distillation: anomaly detection via reverse distillation from one-class embedding
//! (Deng & Li, CVPR 2022; anomalib `reverse_distillation`).
//!
//! - [`settings`]: [`RdSettings`] and the `paper` / `cpu` presets.
//! - [`model`]: [`RdModel`], the trainable one-class bottleneck (OCBE) and reversed decoder.
//! - [`detector`]: [`RdDetector`], the vigil [`Detector`](vigil_core::Detector), and
//!   [`train_rd`], its resumable training.

pub mod detector;
pub mod model;
pub mod settings;

pub use detector::{train_rd, RdDetector};
pub use model::RdModel;
pub use settings::{Preset, RdSettings, RdSpec};
