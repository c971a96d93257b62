//! FastFlow: unsupervised anomaly detection and localization via 2D normalizing flows (Yu et al.,
//! 2021; gathierry/FastFlow, anomalib `fastflow`).
//!
//! - [`settings`]: [`FastflowSettings`] and the `paper` / `cpu` presets.
//! - [`model`]: [`FastflowModel`], the per-scale trainable LayerNorms and flows.
//! - [`detector`]: [`FastflowDetector`], the vigil [`Detector`](vigil_core::Detector).

pub mod detector;
pub mod model;
pub mod settings;

pub use detector::FastflowDetector;
pub use model::FastflowModel;
pub use settings::{FastflowSettings, FastflowSpec, Preset};
