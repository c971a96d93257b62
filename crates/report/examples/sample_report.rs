//! Renders a sample report from one PIPED class with a deliberately simple detector, to look at
//! the report on real images: `cargo run --release -p vigil-report --example sample_report --
//! [class] [out.html]` (defaults: PA_BDP01_TL, /tmp/report.html; data from <workspace>/../shared).
//!
//! The detector is the residual of each image against its own large-scale blur, whitened by the
//! per-channel residual spread of the first half of train/good; the second half of train/good
//! sets the thresholds. It stands in for a real method only so that the page shows real
//! overlays, curves and verdicts; the curves are computed here for the same reason.

use std::path::{Path, PathBuf};
use std::time::Instant;

use vigil_core::{Image, Map, Mask, Result, Threshold, ThresholdKind, ThresholdLevel, VigilError};
use vigil_report::{robust_range, write_html, Curve, ItemPictures, ReportData, ReportItem, ReportThreshold};

const BACKGROUND_SIGMA: f32 = 8.0;
const SMOOTH_SIGMA: f32 = 1.0;
const PIXEL_QUANTILE: f64 = 0.999;
const PRO_FPR_LIMIT: f64 = 0.3;

fn load_rgb(path: &Path) -> Result<Image> {
    let rgb = image::open(path).map_err(|e| VigilError::file(path, e.to_string()))?.to_rgb8();
    let (w, h) = (rgb.width() as usize, rgb.height() as usize);
    let mut data = vec![0f32; 3 * w * h];
    for (i, p) in rgb.pixels().enumerate() {
        for c in 0..3 {
            data[c * w * h + i] = p.0[c] as f32 / 255.0;
        }
    }
    Image::new(w, h, 3, data)
}

fn load_mask(path: &Path) -> Result<Mask> {
    let gray = image::open(path).map_err(|e| VigilError::file(path, e.to_string()))?.to_luma8();
    Mask::new(gray.width() as usize, gray.height() as usize, gray.pixels().map(|p| p.0[0] > 127).collect())
}

fn pngs(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| VigilError::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "png"))
        .collect();
    files.sort();
    Ok(files)
}

fn residuals(image: &Image) -> Vec<Vec<f32>> {
    (0..3)
        .map(|c| {
            let plane = Map::new(image.width, image.height, image.channel(c).to_vec()).expect("plane size");
            let background = plane.gaussian_blur(BACKGROUND_SIGMA);
            plane.data.iter().zip(&background.data).map(|(v, b)| v - b).collect()
        })
        .collect()
}

fn score_map(image: &Image, spread: &[f32; 3]) -> Map {
    let r = residuals(image);
    let data = (0..image.plane_len())
        .map(|i| (0..3).map(|c| (r[c][i] / spread[c]).powi(2)).sum::<f32>().sqrt())
        .collect();
    Map::new(image.width, image.height, data).expect("map size").gaussian_blur(SMOOTH_SIGMA)
}

fn quantile(values: &mut [f32], q: f64) -> f32 {
    values.sort_by(f32::total_cmp);
    values[((q * (values.len() - 1) as f64).round() as usize).min(values.len() - 1)]
}

type Points = Vec<(f64, f64)>;

/// (FPR, TPR) and (recall, precision) points over every distinct score.
fn roc_pr(scores: &[(f64, bool)]) -> (Points, Points) {
    let mut sorted = scores.to_vec();
    sorted.sort_by(|a, b| b.0.total_cmp(&a.0));
    let positives = sorted.iter().filter(|s| s.1).count() as f64;
    let negatives = sorted.len() as f64 - positives;
    let (mut tp, mut fp) = (0f64, 0f64);
    let (mut roc, mut pr) = (vec![(0.0, 0.0)], vec![]);
    for (i, &(score, label)) in sorted.iter().enumerate() {
        if label {
            tp += 1.0
        } else {
            fp += 1.0
        }
        if sorted.get(i + 1).is_some_and(|next| next.0 == score) {
            continue;
        }
        roc.push((fp / negatives, tp / positives));
        pr.push((tp / positives, tp / (tp + fp)));
    }
    (roc, pr)
}

fn regions(mask: &Mask) -> Vec<Vec<usize>> {
    let (w, h) = (mask.width, mask.height);
    let mut seen = vec![false; mask.data.len()];
    let mut out = Vec::new();
    for start in 0..mask.data.len() {
        if !mask.data[start] || seen[start] {
            continue;
        }
        let (mut stack, mut region) = (vec![start], Vec::new());
        seen[start] = true;
        while let Some(i) = stack.pop() {
            region.push(i);
            let (y, x) = ((i / w) as isize, (i % w) as isize);
            for (dy, dx) in [(-1, 0), (1, 0), (0, -1), (0, 1)] {
                let (ny, nx) = (y + dy, x + dx);
                if ny < 0 || nx < 0 || ny >= h as isize || nx >= w as isize {
                    continue;
                }
                let j = ny as usize * w + nx as usize;
                if mask.data[j] && !seen[j] {
                    seen[j] = true;
                    stack.push(j);
                }
            }
        }
        out.push(region);
    }
    out
}

/// Per-region overlap against the FPR on normal pixels, over 200 thresholds up to the limit.
fn pro_curve(maps: &[(Map, Option<Mask>)]) -> Vec<(f64, f64)> {
    let mut normal: Vec<f32> = maps
        .iter()
        .flat_map(|(m, gt)| {
            m.data.iter().enumerate().filter(move |(i, _)| !gt.as_ref().is_some_and(|g| g.data[*i]))
        })
        .map(|(_, v)| *v)
        .collect();
    normal.sort_by(f32::total_cmp);
    let all_regions: Vec<(usize, Vec<usize>)> = maps
        .iter()
        .enumerate()
        .flat_map(|(k, (_, gt))| gt.iter().flat_map(regions).map(move |r| (k, r)))
        .collect();
    let mut curve = Vec::new();
    for step in 0..=200 {
        let fpr = PRO_FPR_LIMIT * step as f64 / 200.0;
        let idx = (((1.0 - fpr) * normal.len() as f64) as usize).min(normal.len() - 1);
        let t = normal[idx];
        let overlap: f64 = all_regions
            .iter()
            .map(|(k, r)| r.iter().filter(|&&i| maps[*k].0.data[i] > t).count() as f64 / r.len() as f64)
            .sum::<f64>()
            / all_regions.len() as f64;
        let real_fpr = (normal.len() - normal.partition_point(|v| *v <= t)) as f64 / normal.len() as f64;
        curve.push((real_fpr, overlap));
    }
    curve
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let class = args.get(1).map(String::as_str).unwrap_or("PA_BDP01_TL");
    let out = PathBuf::from(args.get(2).map(String::as_str).unwrap_or("/tmp/report.html"));
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data/piped").join(class);
    let started = Instant::now();

    let train = pngs(&root.join("train/good"))?;
    let (fit, validation) = train.split_at(train.len() / 2);
    let mut sums = [0f64; 3];
    let mut count = 0usize;
    for path in fit {
        let r = residuals(&load_rgb(path)?);
        for c in 0..3 {
            sums[c] += r[c].iter().map(|v| (*v as f64).powi(2)).sum::<f64>();
        }
        count += r[0].len();
    }
    let spread: [f32; 3] = std::array::from_fn(|c| ((sums[c] / count as f64).sqrt() as f32).max(1e-6));
    let mut val_scores = Vec::new();
    let mut val_pixels = Vec::new();
    for path in validation {
        let map = score_map(&load_rgb(path)?, &spread);
        val_scores.push(map.max());
        val_pixels.extend_from_slice(&map.data);
    }
    let image_threshold = Threshold {
        kind: ThresholdKind::Max,
        level: ThresholdLevel::Image,
        value: val_scores.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64,
        n_samples: val_scores.len(),
    };
    let pixel_threshold = quantile(&mut val_pixels, PIXEL_QUANTILE);
    let fit_time = started.elapsed();

    let mut scored = Vec::new();
    for (dir, anomalous) in [("test/good", false), ("test/impurity", true)] {
        for path in pngs(&root.join(dir))? {
            let image = load_rgb(&path)?;
            let map = score_map(&image, &spread);
            let stem = path.file_stem().unwrap_or_default().to_string_lossy().to_string();
            let gt = if anomalous {
                Some(load_mask(&root.join("ground_truth/impurity").join(format!("{stem}_mask.png")))?)
            } else {
                None
            };
            scored.push((stem, image, map, gt, anomalous));
        }
    }
    let maps: Vec<&Map> = scored.iter().map(|s| &s.2).collect();
    let (lo, hi) = robust_range(&maps, 0.01, 0.999)?;
    let mut items = Vec::new();
    for (name, image, map, gt, anomalous) in &scored {
        let predicted =
            Mask::new(map.width, map.height, map.data.iter().map(|v| *v > pixel_threshold).collect())?;
        let score = map.max() as f64;
        let gt_pixels = gt.as_ref().map_or(0, Mask::count);
        items.push(ReportItem {
            name: name.clone(),
            score,
            label: Some(*anomalous),
            verdict: score > image_threshold.value,
            pictures: ItemPictures::render(image, map, (lo, hi), &predicted, gt.as_ref())?,
            detail: Some(format!("{} px predicted, {gt_pixels} px in ground truth", predicted.count())),
        });
    }
    let labelled: Vec<(f64, bool)> = items.iter().map(|i| (i.score, i.label == Some(true))).collect();
    let (roc, pr) = roc_pr(&labelled);
    let auroc: f64 = roc.windows(2).map(|w| (w[1].0 - w[0].0) * (w[1].1 + w[0].1) / 2.0).sum();
    let pro_input: Vec<(Map, Option<Mask>)> = scored.iter().map(|s| (s.2.clone(), s.3.clone())).collect();
    let pro = pro_curve(&pro_input);
    let aupro: f64 =
        pro.windows(2).map(|w| (w[1].0 - w[0].0) * (w[1].1 + w[0].1) / 2.0).sum::<f64>() / PRO_FPR_LIMIT;
    let data = ReportData {
        title: format!("Inspection report: {class}"),
        method: "residual-whitening demo (example only)".into(),
        dataset: format!("piped/{class}: {} test images", items.len()),
        settings_json: format!(
            r#"{{"background_sigma":{BACKGROUND_SIGMA},"smooth_sigma":{SMOOTH_SIGMA},"pixel_quantile":{PIXEL_QUANTILE}}}"#
        ),
        threshold: Some(ReportThreshold::from(&image_threshold)),
        metrics: vec![
            ("image AUROC".into(), format!("{auroc:.4}")),
            ("heatmap colour range".into(), format!("{lo:.3} to {hi:.3}")),
            (format!("pixel AUPRO (FPR ≤ {PRO_FPR_LIMIT})"), format!("{aupro:.4}")),
            ("image threshold".into(), format!("{:.4}", image_threshold.value)),
            (format!("pixel threshold ({PIXEL_QUANTILE}-quantile)"), format!("{pixel_threshold:.4}")),
        ],
        curves: vec![
            Curve {
                title: format!("Image ROC (AUROC {auroc:.3})"),
                x_label: "false positive rate".into(),
                y_label: "true positive rate".into(),
                points: roc,
                diagonal: true,
                x_max: None,
            },
            Curve {
                title: "Image precision-recall".into(),
                x_label: "recall".into(),
                y_label: "precision".into(),
                points: pr,
                diagonal: false,
                x_max: None,
            },
            Curve {
                title: format!("Pixel PRO (AUPRO {aupro:.3})"),
                x_label: "false positive rate (normal pixels)".into(),
                y_label: "per-region overlap".into(),
                points: pro,
                diagonal: false,
                x_max: Some(PRO_FPR_LIMIT),
            },
        ],
        model: Vec::new(),
        kinds: Vec::new(),
        items,
        notes: vec![
            format!(
                "Fitted on {} images of train/good; thresholds from the other {}.",
                fit.len(),
                validation.len()
            ),
            "This detector exists only to exercise the report on real images.".into(),
        ],
        timings: vec![
            ("fit + thresholds".into(), format!("{:.2} s", fit_time.as_secs_f64())),
            ("score + render".into(), format!("{:.2} s", (started.elapsed() - fit_time).as_secs_f64())),
        ],
    };
    write_html(&out, &data, true)?;
    let size = std::fs::metadata(&out).map_err(|e| VigilError::io(&out, e))?.len();
    println!("wrote {} ({} KiB, {} images)", out.display(), size / 1024, data.items.len());
    Ok(())
}
