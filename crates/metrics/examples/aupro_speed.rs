//! Times AUPRO, the oracle mIoU, pixel AUROC and AP on 100 maps of 256×256 (6.5 M pixels) with random scores and
//! square defects, each alone and all from one ranking (`pixel_ranking_metrics`, what `vigil test` computes).
//! Run: `cargo run --release -p vigil-metrics --example aupro_speed [-- WIDTH HEIGHT]` (e.g. 800 600: 48 M pixels).
//! The radix sort runs on the rayon threads (RAYON_NUM_THREADS); the rest is single-threaded.

use std::time::Instant;

use vigil_metrics::{aupro, average_precision, oracle_mean_iou, pixel_ranking_metrics, roc_auc};

const IMAGES: usize = 100;

fn main() {
    let side = |i: usize| std::env::args().nth(i).map_or(256, |s| s.parse().expect("a side in pixels"));
    let (width, height) = (side(1), side(2));
    // A fixed LCG: the example needs reproducible noise, not statistical quality.
    let mut state = 0x5eed_u64;
    let mut next = move || {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (state >> 40) as f32 / (1u64 << 24) as f32
    };
    let mut maps = Vec::with_capacity(IMAGES);
    let mut masks = Vec::with_capacity(IMAGES);
    for i in 0..IMAGES {
        let mut mask = vec![false; width * height];
        // Every other image gets a defect of 10 to 40 px per side at a random place.
        if i % 2 == 0 {
            let side = 10 + (next() * 30.0) as usize;
            let x0 = (next() * (width - side) as f32) as usize;
            let y0 = (next() * (height - side) as f32) as usize;
            for y in y0..y0 + side {
                mask[y * width + x0..y * width + x0 + side].fill(true);
            }
        }
        let map: Vec<f32> = mask.iter().map(|&m| next() + if m { 0.5 } else { 0.0 }).collect();
        maps.push(map);
        masks.push(mask);
    }
    let map_refs: Vec<&[f32]> = maps.iter().map(|m| m.as_slice()).collect();
    let mask_refs: Vec<&[bool]> = masks.iter().map(|m| m.as_slice()).collect();
    let sizes = vec![(width, height); IMAGES];

    let start = Instant::now();
    let value = aupro(&map_refs, &mask_refs, &sizes, 0.3).expect("valid synthetic input");
    let aupro_time = start.elapsed();
    println!(
        "aupro@0.3 = {value:.6} on {IMAGES} maps of {width}x{height}: {:.3} s",
        aupro_time.as_secs_f64()
    );

    let start = Instant::now();
    let oracle = oracle_mean_iou(&map_refs, &mask_refs).expect("valid synthetic input");
    println!(
        "oracle mIoU = {:.6} at threshold {:.4}: {:.3} s",
        oracle.mean_iou,
        oracle.threshold,
        start.elapsed().as_secs_f64()
    );

    let start = Instant::now();
    let all = pixel_ranking_metrics(&map_refs, &mask_refs, &sizes, 0.3, 2000).expect("valid synthetic input");
    println!(
        "all from one ranking (AUROC {:.6}, AP {:.6}, AUPRO {:.6}, oracle mIoU {:.6}): {:.3} s",
        all.roc_auc,
        all.average_precision,
        all.aupro,
        all.oracle_mean_iou.mean_iou,
        start.elapsed().as_secs_f64()
    );

    let scores = maps.concat();
    let labels = masks.concat();
    let start = Instant::now();
    let auc = roc_auc(&scores, &labels).expect("both classes present");
    println!("pixel roc_auc = {auc:.6}: {:.3} s", start.elapsed().as_secs_f64());
    let start = Instant::now();
    let ap = average_precision(&scores, &labels).expect("anomalous pixels present");
    println!("pixel average_precision = {ap:.6}: {:.3} s", start.elapsed().as_secs_f64());
}
