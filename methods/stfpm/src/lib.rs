//! STFPM: student-teacher feature pyramid matching for anomaly detection (Wang et al., 2021;
//! anomalib `stfpm`).
//!
//! - [`settings`]: [`StfpmSettings`] and the `paper` / `cpu` presets.
//! - [`detector`]: [`StfpmDetector`], the vigil [`Detector`](vigil_core::Detector), and
//!   [`train_student`], the resumable training of the student.

pub mod detector;
pub mod settings;

pub use detector::{train_student, StfpmDetector};
pub use settings::{Preset, StfpmSettings, StfpmSpec};
