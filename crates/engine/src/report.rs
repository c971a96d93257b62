//! Report assembly: pictures, overlays and the data of the HTML report, from an evaluation.

use anyhow::Result;
use vigil_core::{Image, Map, Mask, Threshold};
use vigil_report::html::{Curve, KindPixels, KindRow, ReportData, ReportItem, ReportThreshold};
use vigil_report::{ItemPictures, Views, LARGE_VIEW_MAX_SIDE, THUMBNAIL_MAX_SIDE};

use crate::evaluate::{kind_metrics, metric_rows, Evaluation, ItemResult};
use crate::model::Model;

/// The colour range of overlays: from the pixel threshold's neighbourhood down to zero, so that
/// "hot" means "above threshold" in every image of a run, comparable across images.
pub fn overlay_range(map: &Map, pixel_t: &Threshold) -> (f32, f32) {
    let hi = match pixel_t.log10_nfa_level() {
        Some(_) => map.max().max(1.0),
        None => (pixel_t.value as f32 * 1.5).max(f32::MIN_POSITIVE),
    };
    let lo = map.min().min(0.0).max(if hi > 0.0 { 0.0 } else { map.min() });
    (lo, hi.max(lo + f32::EPSILON))
}

/// The report's pictures of a scored image (original, heatmap, overlay with the predicted and,
/// where there is one, the ground-truth outline; thumbnails and larger views) and the overlay
/// thumbnail as PNG, coloured on the same scale as every other image of the run.
pub fn pictures(
    image: &Image,
    map: &Map,
    pixel_t: &Threshold,
    predicted: &Mask,
    truth: Option<&Mask>,
) -> Result<(ItemPictures, Vec<u8>)> {
    let range = overlay_range(map, pixel_t);
    let small = Views::render(image, map, range, predicted, truth, THUMBNAIL_MAX_SIDE);
    let large = Views::render(image, map, range, predicted, truth, LARGE_VIEW_MAX_SIDE);
    let thumbnail_png = vigil_report::encode_png(&small.overlay)?;
    Ok((ItemPictures::encode(&small, &large)?, thumbnail_png))
}

pub fn full_overlay(image: &Image, map: &Map, pixel_t: &Threshold, predicted: &Mask) -> Result<Vec<u8>> {
    let (lo, hi) = overlay_range(map, pixel_t);
    let rgb = vigil_report::overlay(image, map, lo, hi, Some(predicted), 0.5);
    Ok(vigil_report::encode_png(&rgb)?)
}

/// Curve points for plotting, thinned to what an SVG needs.
fn points(curve: &vigil_metrics::Curve) -> Vec<(f64, f64)> {
    curve.downsampled(crate::evaluate::PLOT_POINTS).points.iter().map(|p| (p.x, p.y)).collect()
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
    if let Some(c) = &eval.pro_curve {
        curves.push(Curve::new(
            "PRO",
            "false positive rate",
            "per-region overlap",
            points(c),
            false,
            Some(eval.metrics.aupro_limit),
        ));
    }
    // The report shows the quantity the threshold decides on: for NFA thresholds the NFA of the
    // most significant region (as -log10 NFA, so that larger is more anomalous like a score).
    let nfa = image_t.log10_nfa_level().is_some();
    let shown_score = |r: &ItemResult| if nfa { -r.decided_value } else { r.image_score as f64 };
    let items = eval
        .results
        .iter()
        .map(|r| ReportItem {
            name: format!(
                "{}/{}",
                r.item.kind,
                r.item.path.file_name().unwrap_or_default().to_string_lossy()
            ),
            score: shown_score(r),
            label: r.item.label,
            verdict: r.verdict,
            pictures: r.pictures.clone(),
            detail: nfa.then(|| format!("image score {}", vigil_report::format_score(r.image_score as f64))),
        })
        .collect();
    let mut notes = vec![
        "Maps and metrics are at each image's original resolution; metrics use raw scores (no normalisation)."
            .to_string(),
        "Image F1-max uses the best threshold chosen on the test labels: an upper bound, not a deployable figure."
            .to_string(),
    ];
    let kinds = match kind_metrics(&eval.results, shown_score) {
        Ok(kinds) => kinds
            .into_iter()
            .map(|k| KindRow {
                kind: if k.kind.is_empty() { "(no kind)".into() } else { k.kind },
                images: k.images,
                anomalous: k.anomalous,
                flagged: k.flagged,
                mean_score: k.mean_score,
                pixels: k.pixels.map(|p| KindPixels {
                    masked_images: p.masked_images,
                    detected_images: p.detected_images,
                    recall: p.recall,
                    precision: p.precision,
                    miou: p.miou,
                }),
            })
            .collect(),
        Err(e) => {
            notes.push(format!("Per-kind figures are missing: {e:#}"));
            Vec::new()
        }
    };
    for skipped in &eval.skipped {
        notes.push(format!("Skipped (--skip-bad): {}: {}", skipped.path.display(), skipped.reason));
    }
    let mut threshold = ReportThreshold::from(image_t);
    if nfa {
        threshold.quantity = "-log10 NFA of the most significant region".into();
    }
    ReportData {
        title: format!("vigil — {} on {}", model.method, dataset),
        method: model.method.clone(),
        dataset: dataset.to_string(),
        settings_json: serde_json::to_string_pretty(&model.settings).unwrap_or_default(),
        threshold: Some(threshold),
        model: model_rows(model),
        metrics: metric_rows(&eval.metrics),
        curves,
        kinds,
        items,
        notes,
        timings: vec![("seconds per image".into(), format!("{:.4}", eval.metrics.seconds_per_image))],
    }
}

/// A threshold in words: how it was chosen, the rule it decides by, and its sample count.
fn threshold_text(t: &Threshold) -> String {
    let rule = match t.log10_nfa_level() {
        Some(level) => format!("anomalous when log10 NFA <= {level}"),
        None => format!("anomalous when score > {}", t.value),
    };
    format!("{} · {rule} · {} sample(s)", t.kind, t.n_samples)
}

/// A fact of the fit in words: yes/no, whole numbers as they are, other numbers to 3 decimals,
/// objects as compact JSON.
fn fact_text(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Bool(b) => if *b { "yes" } else { "no" }.into(),
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Number(n) if n.is_f64() => format!("{:.3}", n.as_f64().unwrap_or(f64::NAN)),
        other => other.to_string(),
    }
}

/// The model as the report's "Model" table: what was fitted, on how many images, with which
/// seed, thresholds and pretrained weights. Facts a model file does not record are left out.
fn model_rows(model: &Model) -> Vec<(String, String)> {
    let info = &model.fit_info;
    let mut rows = vec![("method".to_string(), model.method.clone())];
    let mut fact = |name: &str, key: &str| {
        if let Some(v) = info.get(key).filter(|v| !v.is_null()) {
            rows.push((name.to_string(), fact_text(v)));
        }
    };
    fact("seed", "seed");
    fact("training images", "train_images");
    fact("validation images", "validation_images");
    fact("fitted on all images (no held-out set)", "fit_on_all");
    fact("fit seconds", "fit_seconds");
    fact("NFA check on held-out normals", "nfa_check");
    if let Some(skipped) = info.get("validation_skipped").and_then(|v| v.as_array()).filter(|a| !a.is_empty())
    {
        rows.push(("validation files skipped".into(), skipped.len().to_string()));
    }
    rows.push(("image threshold".into(), threshold_text(&model.image_threshold)));
    rows.push(("pixel threshold".into(), threshold_text(&model.pixel_threshold)));
    if let Ok(serde_json::Value::Object(mut pipeline)) = serde_json::to_value(&model.pipeline.settings) {
        // unset options (null) say nothing; the ones in use are listed
        pipeline.retain(|_, v| !v.is_null());
        rows.push(("pipeline".into(), serde_json::Value::Object(pipeline).to_string()));
    }
    for w in &model.weights {
        rows.push(("pretrained weights".into(), format!("{} (SHA-256 {})", w.path.display(), w.sha256)));
    }
    if model.weights.is_empty() {
        rows.push(("pretrained weights".into(), "none recorded".into()));
    }
    rows.push(("report written by".into(), format!("vigil {}", env!("CARGO_PKG_VERSION"))));
    rows
}

/// A predicted region as a black-and-white PNG (white = anomalous): 8-bit gray, 0 and 255, the
/// layout of MVTec-style ground-truth masks.
pub fn write_mask_png(path: &std::path::Path, mask: &Mask) -> Result<()> {
    vigil_core::model_file::write_atomic(path, &encode_mask_png(mask)?, true)?;
    Ok(())
}

/// The bytes [`write_mask_png`] writes.
pub fn encode_mask_png(mask: &Mask) -> Result<Vec<u8>> {
    let levels: Vec<u8> = mask.data.iter().map(|&on| if on { 255 } else { 0 }).collect();
    Ok(vigil_report::encode_gray_png(&levels, mask.width as u32, mask.height as u32)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_png_decodes_to_the_mask() {
        let (w, h) = (37, 23);
        let data: Vec<bool> = (0..w * h).map(|i| (i * 7919) % 11 < 4).collect();
        let mask = Mask::new(w, h, data.clone()).unwrap();
        let bytes = encode_mask_png(&mask).unwrap();
        let decoded = image::load_from_memory(&bytes).unwrap();
        assert_eq!(decoded.color(), image::ColorType::L8);
        let levels = decoded.to_luma8().into_raw();
        assert_eq!(levels, data.iter().map(|&on| if on { 255 } else { 0 }).collect::<Vec<u8>>());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.png");
        write_mask_png(&path, &mask).unwrap();
        assert_eq!(vigil_data::io::load_mask(&path, Some((w, h)), false).unwrap().data, data);
    }
}
