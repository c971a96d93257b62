//! Fits U-Flow on one PIPED class (MVTec layout) and reports image/pixel AUROC, the NFA (k = 0)
//! segmentation quality, false detections on normal images and inference time per image split
//! into flow and NFA.
//!
//! cargo run --release -p vigil-uflow --example uflow_piped -- <class dir> [mobilenet_v2|efficientnet_lite0] [epochs] [tree|block] [layer,layer,..] [input size]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vigil_core::{Detector, FitContext, Image, InMemorySource, Mask};
use vigil_uflow::{Segmentation, UflowDetector, UflowSettings};

fn images_in(dir: &Path) -> Vec<PathBuf> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    paths.sort();
    paths
}

fn load(path: &Path) -> Image {
    vigil_data::load_image(path).unwrap_or_else(|e| panic!("{e}")).to_rgb()
}

/// AUROC as the Mann–Whitney statistic, ties counted half.
fn auroc(scores: &[(f32, bool)]) -> f64 {
    let mut sorted = scores.to_vec();
    sorted.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (mut rank_sum, mut positives) = (0.0f64, 0usize);
    let mut i = 0;
    while i < sorted.len() {
        let mut j = i;
        while j < sorted.len() && sorted[j].0 == sorted[i].0 {
            j += 1;
        }
        let mid_rank = (i + j + 1) as f64 / 2.0;
        for item in &sorted[i..j] {
            if item.1 {
                rank_sum += mid_rank;
                positives += 1;
            }
        }
        i = j;
    }
    let negatives = sorted.len() - positives;
    (rank_sum - (positives * (positives + 1)) as f64 / 2.0) / (positives * negatives) as f64
}

/// 4-connected components of a mask.
fn components(mask: &[bool], width: usize) -> usize {
    let mut seen = vec![false; mask.len()];
    let mut count = 0;
    for start in 0..mask.len() {
        if !mask[start] || seen[start] {
            continue;
        }
        count += 1;
        let mut stack = vec![start];
        seen[start] = true;
        while let Some(p) = stack.pop() {
            let (x, y) = (p % width, p / width);
            let mut next = Vec::with_capacity(4);
            if x > 0 {
                next.push(p - 1);
            }
            if x + 1 < width {
                next.push(p + 1);
            }
            if y > 0 {
                next.push(p - width);
            }
            if p + width < mask.len() {
                next.push(p + width);
            }
            for q in next {
                if mask[q] && !seen[q] {
                    seen[q] = true;
                    stack.push(q);
                }
            }
        }
    }
    count
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let class = PathBuf::from(args.get(1).expect(
        "usage: uflow_piped <class dir> [backbone] [epochs] [tree|block] [layer,layer,..] [input size]",
    ));
    let mut settings = match args.get(2).map(String::as_str) {
        Some("efficientnet_lite0") => UflowSettings::efficientnet_lite0(),
        _ => UflowSettings::default(),
    };
    if let Some(epochs) = args.get(3) {
        settings.epochs = epochs.parse().expect("epochs");
    }
    if args.get(4).map(String::as_str) == Some("block") {
        settings.segmentation = Segmentation::Block { window: 5, probability: 0.9 };
    }
    if let Some(layers) = args.get(5) {
        settings.layers = layers.split(',').map(str::to_string).collect();
    }
    if let Some(size) = args.get(6) {
        settings.input_size = size.parse().expect("input size");
    }

    let train: Vec<Image> = images_in(&class.join("train/good")).iter().map(|p| load(p)).collect();
    let mut detector = UflowDetector::new(settings.clone());
    let start = Instant::now();
    detector
        .fit(&InMemorySource::new(train), &FitContext { seed: 0, checkpoint_dir: None, show_progress: false })
        .unwrap();
    let fit_time = start.elapsed();
    let losses = &detector.loss_history;
    println!(
        "fit: {:.1} s, loss per dim {:.3} -> {:.3}",
        fit_time.as_secs_f64(),
        losses[0],
        losses[losses.len() - 1]
    );

    let mut image_scores = Vec::new();
    let mut pixel_scores = Vec::new();
    let (mut flow_time, mut nfa_time, mut scored) = (Duration::ZERO, Duration::ZERO, 0u32);
    let (mut tp, mut fp, mut fn_) = (0usize, 0usize, 0usize);
    let mut iou_sum = 0.0;
    let (mut normal_images, mut normal_detections) = (0usize, 0usize);
    let test = class.join("test");
    let mut defect_dirs: Vec<PathBuf> = images_in(&test);
    defect_dirs.retain(|d| d.is_dir());
    for dir in defect_dirs {
        let defect = dir.file_name().unwrap().to_string_lossy().to_string();
        for path in images_in(&dir) {
            let image = load(&path);
            let (out, timing) = detector.score_timed(&image, None).unwrap();
            flow_time += timing.flow;
            nfa_time += timing.nfa;
            scored += 1;
            let gt = if defect == "good" {
                Mask::empty(image.width, image.height)
            } else {
                let stem = path.file_stem().unwrap().to_string_lossy();
                let mask_path = class.join("ground_truth").join(&defect).join(format!("{stem}_mask.png"));
                vigil_data::load_mask(&mask_path, Some((image.width, image.height)), true).unwrap()
            };
            image_scores.push((out.image_score.unwrap(), defect != "good"));
            pixel_scores.extend(out.map.data.iter().zip(&gt.data).map(|(&s, &g)| (s, g)));
            let detected: Vec<bool> = out.log10_nfa.unwrap().data.iter().map(|&v| v <= 0.0).collect();
            let (mut inter, mut union) = (0usize, 0usize);
            for (&d, &g) in detected.iter().zip(&gt.data) {
                inter += usize::from(d && g);
                union += usize::from(d || g);
                tp += usize::from(d && g);
                fp += usize::from(d && !g);
                fn_ += usize::from(!d && g);
            }
            // Per-image IoU as the reference: an empty prediction on a normal image scores 1.
            iou_sum += if union == 0 { 1.0 } else { inter as f64 / union as f64 };
            if defect == "good" {
                normal_images += 1;
                normal_detections += components(&detected, image.width);
            }
        }
    }
    println!("image AUROC {:.4}", auroc(&image_scores));
    println!("pixel AUROC {:.4}", auroc(&pixel_scores));
    println!(
        "NFA k=0: mIoU {:.4}, precision {:.4}, recall {:.4}",
        iou_sum / scored as f64,
        tp as f64 / (tp + fp).max(1) as f64,
        tp as f64 / (tp + fn_).max(1) as f64
    );
    println!(
        "false detections (regions with log10 NFA <= 0) per normal image: {:.3} over {normal_images} images",
        normal_detections as f64 / normal_images as f64
    );
    println!(
        "inference per image: flow {:.2} ms (backbone + flow + map), NFA {:.3} ms, over {scored} images",
        flow_time.as_secs_f64() * 1e3 / scored as f64,
        nfa_time.as_secs_f64() * 1e3 / scored as f64
    );
}
