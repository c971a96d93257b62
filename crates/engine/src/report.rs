//! Report assembly: thumbnails, overlays and the data of the HTML report, from an evaluation.

use anyhow::Result;
use vigil_core::{Image, Map, Mask, Threshold};
use vigil_report::html::{Curve, ReportData, ReportItem, ReportThreshold};

use crate::evaluate::{metric_rows, Evaluation};
use crate::model::Model;

const THUMBNAIL: usize = 160;

/// The colour range of overlays: from the pixel threshold's neighbourhood down to zero, so that
/// "hot" means "above threshold" in every image of a run, comparable across images.
fn overlay_range(map: &Map, pixel_t: &Threshold) -> (f32, f32) {
    let hi = match pixel_t.log10_nfa_level() {
        Some(_) => map.max().max(1.0),
        None => (pixel_t.value as f32 * 1.5).max(f32::MIN_POSITIVE),
    };
    let lo = map.min().min(0.0).max(if hi > 0.0 { 0.0 } else { map.min() });
    (lo, hi.max(lo + f32::EPSILON))
}

/// A small overlay (colour map + outline of the predicted region) for reports.
pub fn thumbnail(image: &Image, map: &Map, pixel_t: &Threshold, predicted: &Mask) -> Result<Vec<u8>> {
    let (lo, hi) = overlay_range(map, pixel_t);
    let scale = (THUMBNAIL as f32 / image.width.max(image.height) as f32).min(1.0);
    let (w, h) =
        (((image.width as f32 * scale) as usize).max(1), ((image.height as f32 * scale) as usize).max(1));
    let small_image = image.resize_bilinear(w, h);
    let small_map = map.resize_bilinear(w, h);
    let small_pred = predicted.resize_nearest(w, h);
    let rgb = vigil_report::overlay(&small_image, &small_map, lo, hi, Some(&small_pred), 0.5);
    Ok(vigil_report::encode_png(&rgb)?)
}

pub fn full_overlay(image: &Image, map: &Map, pixel_t: &Threshold, predicted: &Mask) -> Result<Vec<u8>> {
    let (lo, hi) = overlay_range(map, pixel_t);
    let rgb = vigil_report::overlay(image, map, lo, hi, Some(predicted), 0.5);
    Ok(vigil_report::encode_png(&rgb)?)
}

/// Curve points for plotting, thinned to what an SVG needs.
fn points(curve: &vigil_metrics::Curve) -> Vec<(f64, f64)> {
    curve.downsampled(2000).points.iter().map(|p| (p.x, p.y)).collect()
}

pub fn report_data(model: &Model, dataset: &str, eval: &Evaluation) -> ReportData {
    let image_t = &eval.image_threshold;
    use vigil_metrics as vm;
    let scores: Vec<f64> = eval.results.iter().map(|r| r.image_score as f64).collect();
    let labels: Vec<bool> = eval.results.iter().map(|r| r.item.label == Some(true)).collect();
    let mut curves = Vec::new();
    if let Ok(c) = vm::roc_curve(&scores, &labels) {
        curves.push(Curve::new(
            "Image ROC",
            "false positive rate",
            "true positive rate",
            points(&c),
            true,
            None,
        ));
    }
    if let Ok(c) = vm::pr_curve(&scores, &labels) {
        curves.push(Curve::new("Image precision-recall", "recall", "precision", points(&c), false, None));
    }
    if eval.metrics.aupro.is_some() {
        let maps: Vec<&[f32]> = eval.results.iter().map(|r| r.map.as_slice()).collect();
        let truth: Vec<&[bool]> =
            eval.results.iter().filter_map(|r| r.gt.as_ref().map(|g| g.data.as_slice())).collect();
        let sizes: Vec<(usize, usize)> = eval.results.iter().map(|r| (r.width, r.height)).collect();
        if let Ok(c) = vm::pro_curve(&maps, &truth, &sizes) {
            let points = points(&c);
            let limit = eval.metrics.aupro_limit;
            curves.push(Curve::new(
                "PRO",
                "false positive rate",
                "per-region overlap",
                points,
                false,
                Some(limit),
            ));
        }
    }
    // The report shows the quantity the threshold decides on: for NFA thresholds the NFA of the
    // most significant region (as -log10 NFA, so that larger is more anomalous like a score).
    let nfa = image_t.log10_nfa_level().is_some();
    let items = eval
        .results
        .iter()
        .map(|r| ReportItem {
            name: format!(
                "{}/{}",
                r.item.kind,
                r.item.path.file_name().unwrap_or_default().to_string_lossy()
            ),
            score: if nfa { -r.decided_value } else { r.image_score as f64 },
            label: r.item.label,
            verdict: r.verdict,
            thumbnail_png: r.thumbnail_png.clone(),
            detail: nfa.then(|| format!("image score {}", vigil_report::format_score(r.image_score as f64))),
        })
        .collect();
    let mut notes = vec![
        "Maps and metrics are at each image's original resolution; metrics use raw scores (no normalisation)."
            .to_string(),
        "Image F1-max uses the best threshold chosen on the test labels: an upper bound, not a deployable figure."
            .to_string(),
    ];
    for skipped in &eval.skipped {
        notes.push(format!("Skipped (--skip-bad): {}: {}", skipped.path.display(), skipped.reason));
    }
    ReportData {
        title: format!("vigil — {} on {}", model.method, dataset),
        method: model.method.clone(),
        dataset: dataset.to_string(),
        settings_json: serde_json::to_string_pretty(&model.settings).unwrap_or_default(),
        threshold: Some(ReportThreshold {
            kind: image_t.kind.to_string(),
            level: "image".into(),
            value: image_t.log10_nfa_level().map_or(image_t.value, |level| -level),
            quantity: if nfa {
                "-log10 NFA of the most significant region".into()
            } else {
                "image score".into()
            },
        }),
        metrics: metric_rows(&eval.metrics),
        curves,
        items,
        notes,
        timings: vec![("seconds per image".into(), format!("{:.4}", eval.metrics.seconds_per_image))],
    }
}

/// A predicted region as a black-and-white PNG (white = anomalous).
pub fn write_mask_png(path: &std::path::Path, mask: &Mask) -> Result<()> {
    let img = image_of_mask(mask);
    vigil_report::write_png(path, &img, true)?;
    Ok(())
}

fn image_of_mask(mask: &Mask) -> vigil_report::RgbImage {
    vigil_report::RgbImage::from_fn(mask.width as u32, mask.height as u32, |x, y| {
        let v = if mask.get(y as usize, x as usize) { 255 } else { 0 };
        [v, v, v].into()
    })
}
