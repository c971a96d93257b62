//! Exact evaluation metrics and thresholds for anomaly detection.
//!
//! - [`roc_auc`], [`average_precision`], [`roc_curve`], [`pr_curve`], [`f1_max`],
//!   [`BinaryCounts`]: ranking metrics equal to scikit-learn's (ties grouped), for image scores
//!   (`f64`) or millions of pooled pixels (`f32`, radix-sorted once).
//! - [`aupro`] / [`pro_curve`]: the exact 2021 MVTec AD per-region-overlap protocol.
//! - [`pixel_ranking_metrics`]: pixel AUROC, AP, AUPRO with its curve and the oracle mIoU of a
//!   test set from one ranking of its pixels (what `vigil test` computes).
//! - [`iou`], [`mean_iou`], [`mean_iou_at`], [`oracle_mean_iou`]: segmentation quality as
//!   Tailanian's thesis defines mIoU (per image, averaged over all test images).
//! - [`threshold`]: max / quantile / k-sigma / F1-optimal thresholds as `vigil_core::Threshold`.
//! - [`ImageScoreReduction`]: map → image score (max, DRAEM's mean-filter-then-max, mean).
//!
//! All inputs are validated: mismatched lengths, empty inputs, non-finite scores and undefined
//! metrics (e.g. AUROC with a single class) are errors naming the problem.

pub mod binary;
pub mod curve;
pub mod pixels;
pub mod pro;
pub mod reduction;
pub mod scores;
pub mod segmentation;
pub mod threshold;

pub use binary::{
    average_precision, f1_max, f1_max_detailed, pr_curve, roc_auc, roc_auc_and_average_precision, roc_curve,
    BinaryCounts, F1Max,
};
pub use curve::{Curve, CurvePoint};
pub use pixels::{pixel_ranking_metrics, PixelRankingMetrics};
pub use pro::{aupro, aupro_and_pro_curve, aupro_of_maps, count_regions, pro_curve, pro_curve_of_maps};
pub use reduction::ImageScoreReduction;
pub use scores::{Label, Score};
pub use segmentation::{
    flatten_pixels, iou, mean_iou, mean_iou_at, oracle_mean_iou, MeanIouOptimum, IOU_EPSILON,
};
pub use threshold::ThresholdRule;
