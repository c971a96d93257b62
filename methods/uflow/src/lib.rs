//! U-Flow: U-shaped normalizing flow on multi-scale features with a contrario segmentation
//! (Tailanian et al., JMIV 2024).
//!
//! - [`flow`]: the i-RevNet up-sampling and the U-shaped flow over scales (burn), built from
//!   [`vigil_flow::FlowStep`]s.
//! - [`feature_norm`]: [`UflowModel`](feature_norm::UflowModel), the official trainable per-scale
//!   LayerNorms of CNN features ([`vigil_flow::ScaleLayerNorm`]) and the flow as one trainable module.
//! - [`detector`]: [`UflowDetector`], the vigil [`Detector`](vigil_core::Detector).
//! - [`block_nfa`]: the binomial window variant of the NFA segmentation; the max-tree variant
//!   lives in `vigil_nfa::maxtree`.

pub mod block_nfa;
pub mod detector;
pub mod feature_norm;
pub mod flow;

pub use detector::{
    FeatureNorm, Loss, MsCaitWeights, ScoreTiming, Segmentation, UflowDetector, UflowSettings,
};
