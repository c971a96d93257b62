//! Normalizing-flow building blocks shared by the flow methods (U-Flow, FastFlow, CS-Flow):
//!
//! - [`FlowStep`]: one FrEIA `AllInOneBlock`-style step (`permute_soft=False`) with its inverse
//!   and exact log-determinant, optionally weighted per position.
//! - [`ScaleLayerNorm`]: the trainable `LayerNorm([C, H, W])` the official CNN extractors put in
//!   front of each scale's flow.
//! - [`nll_loss`]: the negative log-likelihood of latents under N(0, I), constant dropped.
//! - [`kept_positions`]: the feature-grid positions an ignore mask leaves in the loss.
//! - [`alternating_kernel`]: the 3×3 / 1×1 kernel pattern both methods use along a sequence of steps.
//! - [`train_flow`]: resumable maximum-likelihood training of any [`TrainableFlow`] on
//!   [`TrainingFeatures`] (batches, checks, checkpoints, loss bookkeeping), and
//!   [`extract_training_features`] with the ignore masks' position weights; [`train_flow_with`]
//!   with other Adam constants, global gradient-norm clipping ([`clip_grad_norm`]) and a loss
//!   factor ([`FlowOptions`], CS-Flow).
//! - `testing` (feature `testing`): a finite-difference log-determinant for tests of flows.

mod ignore;
mod layer_norm;
mod loss;
mod step;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
mod train;

pub use ignore::kept_positions;
pub use layer_norm::ScaleLayerNorm;
pub use loss::nll_loss;
pub use step::{alternating_kernel, FlowStep};
pub use train::{
    batch_tensor, clip_grad_norm, extract_training_features, train_flow, train_flow_with, FlowFit,
    FlowFitResult, FlowOptions, TrainableFlow, TrainingFeatures,
};
