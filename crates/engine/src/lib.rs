//! vigil-engine: the library behind every vigil front end (the `vigil` command line today; an
//! HTTP server and Python bindings next). It owns
//! - the image [`pipeline`] around a method (colour conversion, registration, tiling, ignore masks),
//! - the [`Model`]: detector, pipeline and thresholds, returned by both [`fit()`] and [`Model::load`],
//! - [`fit()`]ting with held-out validation and thresholds ([`vigil_metrics::ThresholdRule`]),
//! - the one per-image loop ([`run::score_items`]) with its skip-bad policy, used by validation,
//!   evaluation and prediction,
//! - [`evaluate`] (metrics), [`outputs`] (metrics.json, maps, overlays, score tables), [`report`]
//!   assembly, and the method [`registry`].
//!
//! Options are plain structs ([`PipelineOptions`], [`FitOptions`], [`EvalOptions`]); front ends
//! convert their own flags into them once.

pub mod batch;
pub mod evaluate;
pub mod fit;
pub mod ignore;
pub mod model;
pub mod outputs;
pub mod pipeline;
pub mod progress;
pub mod registry;
pub mod report;
pub mod run;
pub mod tiling;

pub use evaluate::{evaluate, EvalOptions, Evaluation, ItemResult, Metrics};
pub use fit::{fit, fit_with_held_out, training_images, FitOptions};
pub use model::Model;
pub use pipeline::{Pipeline, PipelineOptions, Scored};
pub use registry::MethodSpec;
pub use run::{Item, Skipped};

/// A warning for the user, on stderr; the library's one channel for them.
pub fn warn(message: impl std::fmt::Display) {
    eprintln!("warning: {message}");
}
