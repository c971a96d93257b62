//! `vigil test`: score a labelled test set, compute every metric, write metrics.json and report.html.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use serde::Serialize;
use vigil_core::{Detector, Mask, Threshold};
use vigil_data::dataset::{Dataset, TestItem};
use vigil_data::source::BadFilePolicy;

use crate::args::TestArgs;
use crate::pipeline::{image_decision, load_model, pixel_decisions, Pipeline};

/// Per-image outcome kept for metrics and the report (maps are kept; images are reduced to a thumbnail).
pub struct ItemResult {
    pub item: TestItem,
    pub image_score: f32,
    pub map: Vec<f32>,
    pub gt: Option<Mask>,
    pub predicted: Mask,
    pub verdict: bool,
    pub seconds: f64,
    pub thumbnail_png: Vec<u8>,
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
    pub skipped: Vec<(PathBuf, String)>,
}

/// Score every test item and compute the metrics.
pub fn evaluate(
    det: &dyn Detector,
    pipeline: &Pipeline,
    items: &[TestItem],
    image_t: &Threshold,
    pixel_t: &Threshold,
    resize_masks: bool,
    aupro_limit: f64,
) -> Result<Evaluation> {
    let mut results = Vec::with_capacity(items.len());
    let mut skipped = Vec::new();
    let bar = vigil_core::progress::bar(items.len() as u64, "scoring");
    for item in items {
        let name = item.path.display().to_string();
        let loaded = vigil_data::io::load_image(&item.path).and_then(|image| {
            let gt = match &item.mask {
                Some(m) => {
                    Some(vigil_data::io::load_mask(m, Some((image.width, image.height)), resize_masks)?)
                }
                None => None,
            };
            Ok((image, gt))
        });
        let (image, gt) = match loaded {
            Ok(x) => x,
            Err(e) if pipeline.policy == BadFilePolicy::Skip => {
                eprintln!("warning: skipped {name}: {e}");
                skipped.push((item.path.clone(), e.to_string()));
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        let gt = match (gt, item.label) {
            (Some(g), _) => Some(g),
            // A normal image's ground truth is all zero.
            (None, false) => Some(Mask::empty(image.width, image.height)),
            (None, true) => None,
        };
        let start = Instant::now();
        let scored = pipeline.score(det, &image, &name)?;
        let seconds = start.elapsed().as_secs_f64();
        let predicted = pixel_decisions(&scored, pixel_t);
        let verdict = image_decision(&scored, image_t);
        let thumbnail_png = crate::predict::thumbnail(&image, &scored.map, pixel_t, &predicted)?;
        results.push(ItemResult {
            item: item.clone(),
            image_score: scored.image_score,
            width: scored.map.width,
            height: scored.map.height,
            map: scored.map.data,
            gt,
            predicted,
            verdict,
            seconds,
            thumbnail_png,
        });
        bar.inc(1);
    }
    bar.finish_and_clear();
    if results.is_empty() {
        bail!("no test image could be scored");
    }
    let metrics = compute_metrics(&results, aupro_limit)?;
    Ok(Evaluation { results, metrics, skipped })
}

fn compute_metrics(results: &[ItemResult], aupro_limit: f64) -> Result<Metrics> {
    use vigil_metrics as vm;
    let scores: Vec<f64> = results.iter().map(|r| r.image_score as f64).collect();
    let labels: Vec<bool> = results.iter().map(|r| r.item.label).collect();
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

    // Pixel level: only when every image has a ground truth (normal ones are all-zero).
    let with_gt: Vec<&ItemResult> = results.iter().filter(|r| r.gt.is_some()).collect();
    let any_defect_pixels = with_gt.iter().any(|r| r.gt.as_ref().is_some_and(|g| g.count() > 0));
    if with_gt.len() == results.len() && any_defect_pixels {
        let maps: Vec<&[f32]> = with_gt.iter().map(|r| r.map.as_slice()).collect();
        let truth: Vec<&[bool]> = with_gt.iter().map(|r| r.gt.as_ref().unwrap().data.as_slice()).collect();
        let sizes: Vec<(usize, usize)> = with_gt.iter().map(|r| (r.width, r.height)).collect();
        let flat_scores: Vec<f32> = maps.iter().flat_map(|s| s.iter().copied()).collect();
        let flat_labels: Vec<bool> = truth.iter().flat_map(|g| g.iter().copied()).collect();
        m.pixel_auroc = Some(vm::roc_auc(&flat_scores, &flat_labels)?);
        m.pixel_ap = Some(vm::average_precision(&flat_scores, &flat_labels)?);
        m.aupro = Some(vm::aupro(&maps, &truth, &sizes, aupro_limit)?);
        let predicted: Vec<&[bool]> = with_gt.iter().map(|r| r.predicted.data.as_slice()).collect();
        let flat_pred: Vec<bool> = predicted.iter().flat_map(|p| p.iter().copied()).collect();
        let pc = vm::BinaryCounts::from_decisions(&flat_pred, &flat_labels)?;
        m.pixel_precision = Some(pc.precision());
        m.pixel_recall = Some(pc.recall());
        m.pixel_iou = Some(pc.iou());
        m.miou = Some(vm::mean_iou(&predicted, &truth)?);
        m.oracle_miou = Some(vm::oracle_mean_iou(&maps, &truth)?.mean_iou);
    }
    let normals: Vec<&ItemResult> = results.iter().filter(|r| !r.item.label).collect();
    if !normals.is_empty() {
        let regions =
            normals.iter().map(|r| vm::count_regions(&r.predicted)).sum::<vigil_core::Result<usize>>()?;
        m.false_regions_per_normal_image = Some(regions as f64 / normals.len() as f64);
    }
    Ok(m)
}

pub fn test_command(args: TestArgs) -> Result<()> {
    let config = args.config.clone();
    let args: TestArgs = crate::config::merge_with_file(args, config.as_deref())?;
    let model_path = args.model.as_deref().ok_or_else(|| anyhow!("--model <file> is required"))?;
    let out = args.out.clone().unwrap_or_else(|| PathBuf::from("runs/test"));
    let (model, det) = load_model(model_path)?;
    let pipeline = Pipeline::from_model(&model, &args.pipeline)?;
    let dataset = match (&args.data, &args.anomalous, &args.normal) {
        (Some(d), _, _) => Dataset::discover(d)?,
        (None, a, n) if a.is_some() || n.is_some() => Dataset::folders(
            None,
            n.as_deref(),
            a.as_deref(),
            args.masks.as_deref(),
            args.mask_pattern.as_deref().unwrap_or("{stem}_mask.png"),
        )?,
        _ => bail!("give --data <MVTec class folder> or --normal/--anomalous folders"),
    };
    let (image_t, pixel_t) = thresholds(&model)?;
    let eval = evaluate(
        det.as_ref(),
        &pipeline,
        &dataset.test,
        &image_t,
        &pixel_t,
        args.resize_masks,
        args.aupro_limit.unwrap_or(0.3),
    )?;
    write_outputs(&out, args.overwrite, &model, &dataset.name, &eval, &image_t, &pixel_t, args.save_maps)?;
    print_metrics(&eval.metrics);
    println!("report: {}", out.join("report.html").display());
    Ok(())
}

/// Score a dataset's test items with a freshly fitted model and its own thresholds.
pub fn evaluate_fitted(
    outcome: &crate::pipeline::FitOutcome,
    items: &[TestItem],
) -> Result<(Evaluation, Threshold, Threshold)> {
    let (image_t, pixel_t) = thresholds(&outcome.model)?;
    let eval = evaluate(outcome.detector.as_ref(), &outcome.pipeline, items, &image_t, &pixel_t, false, 0.3)?;
    Ok((eval, image_t, pixel_t))
}

pub fn thresholds(model: &vigil_core::ModelFile) -> Result<(Threshold, Threshold)> {
    let i = model.header.image_threshold.clone().context("model file has no image threshold")?;
    let p = model.header.pixel_threshold.clone().context("model file has no pixel threshold")?;
    Ok((i, p))
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

#[allow(clippy::too_many_arguments)]
pub fn write_outputs(
    out: &Path,
    overwrite: bool,
    model: &vigil_core::ModelFile,
    dataset: &str,
    eval: &Evaluation,
    image_t: &Threshold,
    pixel_t: &Threshold,
    save_maps: bool,
) -> Result<()> {
    let metrics_path = out.join("metrics.json");
    let json = serde_json::to_vec_pretty(&serde_json::json!({
        "method": model.header.method,
        "settings": model.header.settings,
        "dataset": dataset,
        "image_threshold": image_t,
        "pixel_threshold": pixel_t,
        "metrics": eval.metrics,
        "skipped": eval.skipped.iter().map(|(p, e)| (p.display().to_string(), e.clone())).collect::<Vec<_>>(),
        "images": eval.results.iter().map(|r| serde_json::json!({
            "path": r.item.path, "kind": r.item.kind, "label": r.item.label,
            "score": r.image_score, "verdict": r.verdict, "seconds": r.seconds,
        })).collect::<Vec<_>>(),
    }))?;
    vigil_core::model_file::write_atomic(&metrics_path, &json, overwrite)?;
    if save_maps {
        let maps = out.join("maps");
        for r in &eval.results {
            let stem = crate::predict::output_stem(&r.item.path, &r.item.kind);
            let map = vigil_core::Map::new(r.width, r.height, r.map.clone())?;
            let path = maps.join(format!("{stem}.tiff"));
            if path.exists() && !overwrite {
                bail!("{}: already exists; pass --overwrite to replace it", path.display());
            }
            std::fs::create_dir_all(&maps)?;
            vigil_data::io::write_map_tiff(&path, &map)?;
            vigil_core::model_file::write_atomic(
                &maps.join(format!("{stem}_overlay.png")),
                &r.thumbnail_png,
                true,
            )?;
        }
    }
    let report = crate::predict::report_data(model, dataset, eval, image_t);
    vigil_report::html::write_html(&out.join("report.html"), &report, overwrite)?;
    Ok(())
}
