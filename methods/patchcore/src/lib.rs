//! PatchCore (Roth et al., "Towards Total Recall in Industrial Anomaly Detection", CVPR 2022):
//! a memory bank of locally aware patch features from a pretrained backbone, subsampled by a
//! greedy coreset; a test patch's anomaly score is its distance to the nearest bank patch.
//!
//! What differs from the reference implementations, and why:
//! - The coreset is streamed and memory-bounded ([`coreset::StreamingCoreset`]): training sets
//!   larger than one chunk are reduced chunk by chunk (composable k-center coresets) instead of
//!   holding every patch, so fitting 12,000 images stays within a few GB.
//! - Greedy k-center updates a min-distance vector with one pass per pick (no recomputed
//!   distance matrices), and nearest-neighbour search uses blocked matrix products.
//! - The patch-distance grid is up-sampled to the input size by nearest neighbour (anomalib's
//!   convention, the default; `map_upsampling = "bilinear"` gives the paper's wording), smoothed
//!   with σ = 4 input pixels, then resized bilinearly to the image.

pub mod coreset;
pub mod detector;
pub mod features;
pub mod knn;

pub use detector::{default_layers, MapUpsampling, PatchcoreDetector, PatchcoreSettings};
