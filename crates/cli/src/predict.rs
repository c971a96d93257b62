//! `vigil predict`: score new images; write maps, overlays, scores.csv and scores.json. Also the
//! report assembly shared with `test`.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Result};
use vigil_core::{Image, Map, Mask, ModelFile, Threshold};
use vigil_report::html::{Curve, ReportData, ReportItem, ReportThreshold};

use crate::args::PredictArgs;
use crate::pipeline::{image_decision, load_model, pixel_decisions, Pipeline};
use crate::test_cmd::{metric_rows, thresholds, Evaluation};

const THUMBNAIL: usize = 160;

/// A file name for outputs that stays unique across defect kinds: `<kind>_<stem>`.
pub fn output_stem(path: &Path, kind: &str) -> String {
    let stem = path.file_stem().map(|s| s.to_string_lossy().to_string()).unwrap_or_else(|| "image".into());
    if kind.is_empty() {
        stem
    } else {
        format!("{kind}_{stem}")
    }
}

/// The colour range of overlays: from the pixel threshold's neighbourhood down to zero, so that
/// "hot" means "above threshold" in every image of a run, comparable across images.
fn overlay_range(map: &Map, pixel_t: &Threshold) -> (f32, f32) {
    let hi = match pixel_t.kind {
        vigil_core::ThresholdKind::Nfa { .. } => map.max().max(1.0),
        _ => (pixel_t.value as f32 * 1.5).max(f32::MIN_POSITIVE),
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

fn full_overlay(image: &Image, map: &Map, pixel_t: &Threshold, predicted: &Mask) -> Result<Vec<u8>> {
    let (lo, hi) = overlay_range(map, pixel_t);
    let rgb = vigil_report::overlay(image, map, lo, hi, Some(predicted), 0.5);
    Ok(vigil_report::encode_png(&rgb)?)
}

/// Curve points for plotting, thinned to what an SVG needs.
fn points(curve: &vigil_metrics::Curve) -> Vec<(f64, f64)> {
    curve.downsampled(2000).points.iter().map(|p| (p.x, p.y)).collect()
}

pub fn report_data(model: &ModelFile, dataset: &str, eval: &Evaluation, image_t: &Threshold) -> ReportData {
    use vigil_metrics as vm;
    let scores: Vec<f64> = eval.results.iter().map(|r| r.image_score as f64).collect();
    let labels: Vec<bool> = eval.results.iter().map(|r| r.item.label).collect();
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
    let items = eval
        .results
        .iter()
        .map(|r| ReportItem {
            name: format!(
                "{}/{}",
                r.item.kind,
                r.item.path.file_name().unwrap_or_default().to_string_lossy()
            ),
            score: r.image_score as f64,
            label: Some(r.item.label),
            verdict: r.verdict,
            thumbnail_png: r.thumbnail_png.clone(),
            detail: None,
        })
        .collect();
    let mut notes = vec![
        "Maps and metrics are at each image's original resolution; metrics use raw scores (no normalisation)."
            .to_string(),
        "Image F1-max uses the best threshold chosen on the test labels: an upper bound, not a deployable figure."
            .to_string(),
    ];
    if !eval.skipped.is_empty() {
        notes.push(format!(
            "{} unreadable file(s) were skipped (listed in metrics.json).",
            eval.skipped.len()
        ));
    }
    ReportData {
        title: format!("vigil — {} on {}", model.header.method, dataset),
        method: model.header.method.clone(),
        dataset: dataset.to_string(),
        settings_json: serde_json::to_string_pretty(&model.header.settings).unwrap_or_default(),
        threshold: Some(ReportThreshold {
            kind: image_t.kind.to_string(),
            level: "image".into(),
            value: image_t.value,
        }),
        metrics: metric_rows(&eval.metrics),
        curves,
        items,
        notes,
        timings: vec![("seconds per image".into(), format!("{:.4}", eval.metrics.seconds_per_image))],
    }
}

fn collect_inputs(inputs: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for input in inputs {
        if input.is_dir() {
            files.extend(vigil_data::io::list_images(input)?);
        } else if input.exists() {
            files.push(input.clone());
        } else {
            bail!("{}: no such file or folder", input.display());
        }
    }
    if files.is_empty() {
        bail!("no input image: give image files or folders");
    }
    Ok(files)
}

pub fn predict_command(args: PredictArgs) -> Result<()> {
    let config = args.config.clone();
    let args: PredictArgs = crate::config::merge_with_file(args, config.as_deref())?;
    let model_path = args.model.as_deref().ok_or_else(|| anyhow!("--model <file> is required"))?;
    let out = args.out.clone().ok_or_else(|| anyhow!("--out <folder> is required"))?;
    let format = args.map_format.as_deref().unwrap_or("tiff");
    if format != "tiff" && format != "png16" {
        bail!("--map-format must be tiff or png16, got '{format}'");
    }
    let (model, det) = load_model(model_path)?;
    let pipeline = Pipeline::from_model(&model, &args.pipeline)?;
    let (image_t, pixel_t) = thresholds(&model)?;
    let files = collect_inputs(&args.inputs)?;
    let csv_path = out.join("scores.csv");
    if csv_path.exists() && !args.overwrite {
        bail!("{}: already exists; pass --overwrite to replace it", csv_path.display());
    }
    std::fs::create_dir_all(out.join("maps"))?;
    std::fs::create_dir_all(out.join("overlays"))?;
    let mut rows = Vec::new();
    let mut json_rows = Vec::new();
    let bar = vigil_core::progress::bar(files.len() as u64, "predict");
    for path in &files {
        let name = path.display().to_string();
        let image = match vigil_data::io::load_image(path) {
            Ok(i) => i,
            Err(e) if args.pipeline.skip_bad => {
                eprintln!("warning: skipped {name}: {e}");
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        let scored = pipeline.score(det.as_ref(), &image, &name)?;
        let predicted = pixel_decisions(&scored, &pixel_t);
        let verdict = image_decision(&scored, &image_t);
        let stem = output_stem(path, "");
        let map_path = match format {
            "png16" => {
                let p = out.join("maps").join(format!("{stem}.png"));
                vigil_data::io::write_map_png16(&p, &scored.map, scored.map.min(), scored.map.max())?;
                p
            }
            _ => {
                let p = out.join("maps").join(format!("{stem}.tiff"));
                vigil_data::io::write_map_tiff(&p, &scored.map)?;
                p
            }
        };
        let overlay_path = out.join("overlays").join(format!("{stem}.png"));
        vigil_core::model_file::write_atomic(
            &overlay_path,
            &full_overlay(&image, &scored.map, &pixel_t, &predicted)?,
            true,
        )?;
        let region_pixels = predicted.count();
        rows.push(vec![
            name.clone(),
            format!("{}", scored.image_score),
            if verdict { "anomalous".into() } else { "normal".into() },
            region_pixels.to_string(),
            map_path.display().to_string(),
            overlay_path.display().to_string(),
        ]);
        json_rows.push(serde_json::json!({
            "path": name, "score": scored.image_score, "anomalous": verdict,
            "anomalous_pixels": region_pixels, "map": map_path, "overlay": overlay_path,
        }));
        bar.inc(1);
    }
    bar.finish_and_clear();
    let headers = ["path", "score", "verdict", "anomalous_pixels", "map", "overlay"];
    vigil_report::markdown::write_csv(&csv_path, &headers, &rows)?;
    let json = serde_json::to_vec_pretty(&serde_json::json!({
        "model": model_path, "method": model.header.method,
        "image_threshold": image_t, "pixel_threshold": pixel_t, "images": json_rows,
    }))?;
    vigil_core::model_file::write_atomic(&out.join("scores.json"), &json, true)?;
    let flagged = rows.iter().filter(|r| r[2] == "anomalous").count();
    println!("scored {} image(s), {} anomalous -> {}", rows.len(), flagged, out.display());
    Ok(())
}
