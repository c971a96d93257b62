//! CFA: coupled-hypersphere-based feature adaptation for target-oriented anomaly localization
//! (Lee, Lee and Song, 2022; sungwool/CFA_for_anomaly_localization, anomalib `cfa`).
//!
//! - [`settings`]: [`CfaSettings`] and the `paper` / `cpu` presets.
//! - [`model`]: the descriptor input, the CoordConv descriptor, the memory bank, the distances,
//!   the loss and the position scores.
//! - [`detector`]: [`CfaDetector`], the vigil [`Detector`](vigil_core::Detector).

pub mod detector;
pub mod model;
pub mod settings;

pub use detector::CfaDetector;
pub use settings::{CfaSettings, CfaSpec, Preset};
