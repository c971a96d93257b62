//! Normalizing-flow building blocks shared by the flow methods (U-Flow, FastFlow):
//!
//! - [`FlowStep`]: one FrEIA `AllInOneBlock`-style step (`permute_soft=False`) with its inverse
//!   and exact log-determinant, optionally weighted per position.
//! - [`ScaleLayerNorm`]: the trainable `LayerNorm([C, H, W])` the official CNN extractors put in
//!   front of each scale's flow.
//! - [`nll_loss`]: the negative log-likelihood of latents under N(0, I), constant dropped.
//! - [`kept_positions`]: the feature-grid positions an ignore mask leaves in the loss.
//! - [`alternating_kernel`]: the 3×3 / 1×1 kernel pattern both methods use along a sequence of steps.
//! - `testing` (feature `testing`): a finite-difference log-determinant for tests of flows.

mod ignore;
mod layer_norm;
mod loss;
mod step;
#[cfg(any(test, feature = "testing"))]
pub mod testing;

pub use ignore::kept_positions;
pub use layer_norm::ScaleLayerNorm;
pub use loss::nll_loss;
pub use step::{alternating_kernel, FlowStep};
