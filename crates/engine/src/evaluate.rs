//! Evaluation of a model on labelled images: every metric of the MVTec protocol and the thesis,
//! computed from the items scored by the one per-image loop.

use anyhow::Result;
use serde::Serialize;
use vigil_core::{Mask, Threshold};

use crate::model::Model;
use crate::run::{process_items, Event, Item, LoopOptions, ScoredItem, Skipped};

/// Per-image outcome kept for metrics and the report (maps are kept; images are reduced to the
/// report's encoded pictures).
pub struct ItemResult {
    pub item: Item,
    pub image_score: f32,
    /// The quantity the image threshold is applied to (the region NFA for NFA thresholds).
    pub decided_value: f64,
    pub map: Vec<f32>,
    pub gt: Option<Mask>,
    pub predicted: Mask,
    pub verdict: bool,
    pub seconds: f64,
    /// The overlay thumbnail as PNG (what `--save-maps` writes beside each map).
    pub thumbnail_png: Vec<u8>,
    /// Original, heatmap and overlay (predicted and ground-truth outlines) for the report.
    pub pictures: vigil_report::ItemPictures,
    pub width: usize,
    pub height: usize,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct Metrics {
    pub n_images: usize,
    pub n_anomalous: usize,
    pub image_auroc: Option<f64>,
    pub image_ap: Option<f64>,
    pub image_f1_max: Option<f64>,
    pub image_accuracy: Option<f64>,
    pub image_precision: Option<f64>,
    pub image_recall: Option<f64>,
    pub image_f1: Option<f64>,
    /// Share of the normal test images flagged at the threshold.
    pub image_false_positive_rate: Option<f64>,
    pub pixel_auroc: Option<f64>,
    pub pixel_ap: Option<f64>,
    pub aupro: Option<f64>,
    pub aupro_limit: f64,
    pub pixel_precision: Option<f64>,
    pub pixel_recall: Option<f64>,
    pub pixel_iou: Option<f64>,
    /// Per-image IoU at the threshold averaged over all test images (the thesis' definition).
    pub miou: Option<f64>,
    /// mIoU at the best single threshold chosen on the test set (upper bound, as the thesis reports).
    pub oracle_miou: Option<f64>,
    /// Mean number of connected detected regions on normal test images (the a contrario promise is ~1 at NFA=1).
    pub false_regions_per_normal_image: Option<f64>,
    pub seconds_per_image: f64,
}

pub struct Evaluation {
    pub results: Vec<ItemResult>,
    pub metrics: Metrics,
    /// The PRO curve, thinned to [`PLOT_POINTS`], when AUPRO was computed.
    pub pro_curve: Option<vigil_metrics::Curve>,
    pub skipped: Vec<Skipped>,
    pub image_threshold: Threshold,
    pub pixel_threshold: Threshold,
}

#[derive(Clone, Copy, Debug)]
pub struct EvalOptions {
    /// Resample ground-truth masks whose size differs from their image instead of stopping.
    pub resize_masks: bool,
    /// FPR limit of AUPRO (0.3 in the MVTec protocol).
    pub aupro_limit: f64,
}

impl Default for EvalOptions {
    fn default() -> Self {
        EvalOptions { resize_masks: false, aupro_limit: 0.3 }
    }
}

/// Scores every labelled item with the model and computes the metrics.
pub fn evaluate(model: &Model, items: &[Item], options: EvalOptions) -> Result<Evaluation> {
    let mut results = Vec::with_capacity(items.len());
    let loop_options = LoopOptions { resize_masks: options.resize_masks };
    // Each image's pictures are made on the loop's workers, several images at a time.
    let prepare = |s: ScoredItem<'_>| -> Result<ItemResult> {
        let predicted = model.pixel_verdicts(&s.scored);
        let (pictures, thumbnail_png) = crate::report::pictures(
            &s.image,
            &s.scored.map,
            &model.pixel_threshold,
            &predicted,
            s.truth.as_ref(),
        )?;
        Ok(ItemResult {
            item: s.item.clone(),
            image_score: s.scored.image_score,
            decided_value: model.decided_value(&s.scored),
            verdict: model.image_verdict(&s.scored),
            width: s.scored.map.width,
            height: s.scored.map.height,
            map: s.scored.map.data,
            gt: s.truth,
            predicted,
            seconds: s.seconds,
            thumbnail_png,
            pictures,
        })
    };
    let skipped = process_items(
        model.detector.as_ref(),
        &model.pipeline,
        items,
        loop_options,
        "scoring",
        prepare,
        |event| {
            if let Event::Scored(r) = event {
                results.push(r);
            }
            Ok(())
        },
    )?;
    let (metrics, pro_curve) = compute_metrics(&results, options.aupro_limit)?;
    Ok(Evaluation {
        results,
        metrics,
        pro_curve,
        skipped,
        image_threshold: model.image_threshold.clone(),
        pixel_threshold: model.pixel_threshold.clone(),
    })
}

/// Points kept of a curve drawn in the report.
pub const PLOT_POINTS: usize = 2000;

/// The figures of a scored test set, and the PRO curve (thinned) when there is one: it comes from
/// the same ranking of the pixels as AUPRO.
pub fn compute_metrics(
    results: &[ItemResult],
    aupro_limit: f64,
) -> Result<(Metrics, Option<vigil_metrics::Curve>)> {
    use vigil_metrics as vm;
    let scores: Vec<f64> = results.iter().map(|r| r.image_score as f64).collect();
    let labels: Vec<bool> = results.iter().map(|r| r.item.label == Some(true)).collect();
    let both_classes = labels.iter().any(|&l| l) && labels.iter().any(|&l| !l);
    let mut m = Metrics {
        n_images: results.len(),
        n_anomalous: labels.iter().filter(|&&l| l).count(),
        aupro_limit,
        seconds_per_image: results.iter().map(|r| r.seconds).sum::<f64>() / results.len() as f64,
        ..Default::default()
    };
    if both_classes {
        m.image_auroc = Some(vm::roc_auc(&scores, &labels)?);
        m.image_ap = Some(vm::average_precision(&scores, &labels)?);
        m.image_f1_max = Some(vm::f1_max(&scores, &labels)?.0);
    }
    let verdicts: Vec<bool> = results.iter().map(|r| r.verdict).collect();
    let c = vm::BinaryCounts::from_decisions(&verdicts, &labels)?;
    m.image_accuracy = Some(c.accuracy());
    m.image_precision = Some(c.precision());
    m.image_recall = Some(c.recall());
    m.image_f1 = Some(c.f1());
    m.image_false_positive_rate = Some(c.false_positive_rate());

    // Pixel level: only when every image has a ground truth (normal ones are all-zero).
    let mut pro_curve = None;
    let with_gt: Vec<&ItemResult> = results.iter().filter(|r| r.gt.is_some()).collect();
    let any_defect_pixels = with_gt.iter().any(|r| r.gt.as_ref().is_some_and(|g| g.count() > 0));
    if with_gt.len() == results.len() && any_defect_pixels {
        let maps: Vec<&[f32]> = with_gt.iter().map(|r| r.map.as_slice()).collect();
        let truth: Vec<&[bool]> = with_gt.iter().map(|r| r.gt.as_ref().unwrap().data.as_slice()).collect();
        let sizes: Vec<(usize, usize)> = with_gt.iter().map(|r| (r.width, r.height)).collect();
        // One ranking of every pixel gives the ranking figures; sorting the pixels is most of their cost.
        let ranked = vm::pixel_ranking_metrics(&maps, &truth, &sizes, aupro_limit, PLOT_POINTS)?;
        (m.pixel_auroc, m.pixel_ap, m.aupro) =
            (Some(ranked.roc_auc), Some(ranked.average_precision), Some(ranked.aupro));
        pro_curve = Some(ranked.pro_curve);
        let predicted: Vec<&[bool]> = with_gt.iter().map(|r| r.predicted.data.as_slice()).collect();
        let mut pc = vm::BinaryCounts::default();
        for (p, t) in predicted.iter().zip(&truth) {
            pc += vm::BinaryCounts::from_decisions(p, t)?;
        }
        m.pixel_precision = Some(pc.precision());
        m.pixel_recall = Some(pc.recall());
        m.pixel_iou = Some(pc.iou());
        m.miou = Some(vm::mean_iou(&predicted, &truth)?);
        m.oracle_miou = Some(ranked.oracle_mean_iou.mean_iou);
    }
    let normals: Vec<&ItemResult> = results.iter().filter(|r| r.item.label == Some(false)).collect();
    if !normals.is_empty() {
        let regions =
            normals.iter().map(|r| vm::count_regions(&r.predicted)).sum::<vigil_core::Result<usize>>()?;
        m.false_regions_per_normal_image = Some(regions as f64 / normals.len() as f64);
    }
    Ok((m, pro_curve))
}

/// Figures of one defect kind (MVTec-style test sub-folder).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct KindMetrics {
    pub kind: String,
    pub images: usize,
    /// Images known to be anomalous.
    pub anomalous: usize,
    /// Images the model flagged.
    pub flagged: usize,
    /// Mean of the score the caller chose (the thresholded quantity).
    pub mean_score: f64,
    /// Pixel figures at the pixel threshold over the kind's images whose ground truth has defect
    /// pixels; `None` when it has none.
    pub pixels: Option<KindPixelMetrics>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct KindPixelMetrics {
    /// Images with a non-empty ground-truth mask.
    pub masked_images: usize,
    /// Of those, images where at least one ground-truth pixel was flagged.
    pub detected_images: usize,
    pub recall: f64,
    pub precision: f64,
    /// Mean per-image IoU of the predicted and true regions.
    pub miou: f64,
}

/// Per-kind figures, kinds in name order; `score` gives each image's shown score.
pub fn kind_metrics(results: &[ItemResult], score: impl Fn(&ItemResult) -> f64) -> Result<Vec<KindMetrics>> {
    use vigil_metrics as vm;
    let mut kinds: std::collections::BTreeMap<&str, Vec<&ItemResult>> = Default::default();
    for r in results {
        kinds.entry(r.item.kind.as_str()).or_default().push(r);
    }
    kinds
        .into_iter()
        .map(|(kind, rs)| {
            let masked: Vec<&&ItemResult> =
                rs.iter().filter(|r| r.gt.as_ref().is_some_and(|g| g.count() > 0)).collect();
            let pixels = if masked.is_empty() {
                None
            } else {
                let truth: Vec<&[bool]> =
                    masked.iter().map(|r| r.gt.as_ref().unwrap().data.as_slice()).collect();
                let predicted: Vec<&[bool]> = masked.iter().map(|r| r.predicted.data.as_slice()).collect();
                let mut detected_images = 0;
                for (p, t) in predicted.iter().zip(&truth) {
                    detected_images += usize::from(vm::BinaryCounts::from_decisions(p, t)?.tp > 0);
                }
                let flat_pred: Vec<bool> = predicted.iter().flat_map(|p| p.iter().copied()).collect();
                let flat_truth: Vec<bool> = truth.iter().flat_map(|t| t.iter().copied()).collect();
                let total = vm::BinaryCounts::from_decisions(&flat_pred, &flat_truth)?;
                Some(KindPixelMetrics {
                    masked_images: masked.len(),
                    detected_images,
                    recall: total.recall(),
                    precision: total.precision(),
                    miou: vm::mean_iou(&predicted, &truth)?,
                })
            };
            Ok(KindMetrics {
                kind: kind.to_string(),
                images: rs.len(),
                anomalous: rs.iter().filter(|r| r.item.label == Some(true)).count(),
                flagged: rs.iter().filter(|r| r.verdict).count(),
                mean_score: rs.iter().map(|r| score(r)).sum::<f64>() / rs.len() as f64,
                pixels,
            })
        })
        .collect()
}

pub fn print_metrics(m: &Metrics) {
    for (name, value) in metric_rows(m) {
        println!("  {name:<34} {value}");
    }
}

pub fn metric_rows(m: &Metrics) -> Vec<(String, String)> {
    let f = |v: Option<f64>| v.map(|x| format!("{x:.4}")).unwrap_or_else(|| "n/a".into());
    vec![
        ("images (anomalous)".into(), format!("{} ({})", m.n_images, m.n_anomalous)),
        ("image AUROC".into(), f(m.image_auroc)),
        ("image AP".into(), f(m.image_ap)),
        ("image F1-max (oracle threshold)".into(), f(m.image_f1_max)),
        ("image accuracy @ threshold".into(), f(m.image_accuracy)),
        ("image precision @ threshold".into(), f(m.image_precision)),
        ("image recall @ threshold".into(), f(m.image_recall)),
        ("image F1 @ threshold".into(), f(m.image_f1)),
        ("image false-positive rate @ threshold".into(), f(m.image_false_positive_rate)),
        ("pixel AUROC".into(), f(m.pixel_auroc)),
        ("pixel AP".into(), f(m.pixel_ap)),
        (format!("AUPRO@{}", m.aupro_limit), f(m.aupro)),
        ("pixel precision @ threshold".into(), f(m.pixel_precision)),
        ("pixel recall @ threshold".into(), f(m.pixel_recall)),
        ("pixel IoU @ threshold".into(), f(m.pixel_iou)),
        ("mIoU @ threshold".into(), f(m.miou)),
        ("mIoU @ oracle threshold".into(), f(m.oracle_miou)),
        ("false regions per normal image".into(), f(m.false_regions_per_normal_image)),
        ("seconds per image".into(), format!("{:.4}", m.seconds_per_image)),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;
    use vigil_core::{Image, Map};

    /// A 4x4 result of `kind` whose predicted region and ground truth are the given pixel sets.
    fn result(
        kind: &str,
        label: bool,
        verdict: bool,
        score: f32,
        predicted: &[usize],
        truth: Option<&[usize]>,
    ) -> ItemResult {
        let mask = |on: &[usize]| Mask::new(4, 4, (0..16).map(|i| on.contains(&i)).collect()).unwrap();
        let (image, map, predicted) = (Image::zeros(4, 4, 1), Map::filled(4, 4, score), mask(predicted));
        let gt = truth.map(mask);
        let pictures =
            vigil_report::ItemPictures::render(&image, &map, (0.0, 1.0), &predicted, gt.as_ref()).unwrap();
        ItemResult {
            item: Item {
                path: PathBuf::from(format!("{kind}.png")),
                name: kind.into(),
                label: Some(label),
                kind: kind.into(),
                mask: None,
            },
            image_score: score,
            decided_value: score as f64,
            map: map.data,
            gt,
            predicted,
            verdict,
            seconds: 0.0,
            thumbnail_png: Vec::new(),
            pictures,
            width: 4,
            height: 4,
        }
    }

    #[test]
    fn kind_metrics_count_flags_and_pixel_figures_per_kind() {
        let results = vec![
            result("good", false, false, 0.1, &[], Some(&[])),
            result("good", false, true, 0.7, &[0], Some(&[])),
            // scratch: one image half found (2 of 4 true pixels, 1 false pixel), one missed
            result("scratch", true, true, 0.9, &[0, 1, 15], Some(&[0, 1, 2, 3])),
            result("scratch", true, false, 0.3, &[], Some(&[5, 6])),
            // no mask at all: image labels only
            result("stain", true, true, 0.8, &[3], None),
        ];
        let kinds = kind_metrics(&results, |r| 10.0 * r.image_score as f64).unwrap();
        let names: Vec<&str> = kinds.iter().map(|k| k.kind.as_str()).collect();
        assert_eq!(names, ["good", "scratch", "stain"]);
        let good = &kinds[0];
        assert_eq!((good.images, good.anomalous, good.flagged), (2, 0, 1));
        assert!((good.mean_score - 4.0).abs() < 1e-5, "mean of the given score: {}", good.mean_score);
        assert_eq!(good.pixels, None, "normal images have no defect pixels");
        let scratch = &kinds[1];
        assert_eq!((scratch.images, scratch.anomalous, scratch.flagged), (2, 2, 1));
        let p = scratch.pixels.as_ref().unwrap();
        assert_eq!((p.masked_images, p.detected_images), (2, 1));
        assert!((p.recall - 2.0 / 6.0).abs() < 1e-12, "{}", p.recall);
        assert!((p.precision - 2.0 / 3.0).abs() < 1e-12, "{}", p.precision);
        // per-image IoU 2/5 and 0
        assert!((p.miou - 0.2).abs() < 1e-12, "{}", p.miou);
        assert_eq!(kinds[2].pixels, None);
    }
}
