//! PaDiM (Defard et al., "PaDiM: a Patch Distribution Modeling Framework for Anomaly Detection
//! and Localization", ICPR 2020): a multivariate Gaussian per feature-grid position over
//! concatenated multi-layer backbone features (a random channel subset), fitted by streaming
//! mean/covariance accumulation; a test patch scores its Mahalanobis distance.
//!
//! Memory during the fit is one mean and one f64 covariance per position whatever the number of
//! training images (PaDiM's reference code keeps every image's embedding until the end).

pub mod detector;
pub mod gaussian;

pub use detector::{default_channels, default_layers, PadimDetector, PadimSettings};
