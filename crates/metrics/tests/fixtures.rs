//! Agreement with golden values from scikit-learn and an independent numpy/scipy transcription
//! of the MVTec AUPRO protocol (crates/metrics/fixtures/make_fixtures.py).

use serde_json::Value;
use vigil_metrics::{
    aupro, average_precision, f1_max_detailed, mean_iou_at, oracle_mean_iou, pr_curve, pro_curve, roc_auc,
    roc_curve, BinaryCounts, Curve,
};

const TOLERANCE: f64 = 1e-6;

fn fixtures() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/metrics.json");
    let text = std::fs::read_to_string(path).expect("fixture file is checked in");
    serde_json::from_str(&text).expect("fixture file is valid JSON")
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
}

fn close(actual: f64, expected: f64, what: &str) {
    assert!((actual - expected).abs() <= TOLERANCE, "{what}: got {actual}, expected {expected}");
}

fn assert_curve(curve: &Curve, xs: &[f64], ys: &[f64], what: &str) {
    assert_eq!(curve.points.len(), xs.len(), "{what}: number of points");
    for (i, p) in curve.points.iter().enumerate() {
        close(p.x, xs[i], &format!("{what} point {i} x"));
        close(p.y, ys[i], &format!("{what} point {i} y"));
    }
}

/// The checks shared by image and pixel cases: AUROC, AP and F1-max with its threshold.
fn check_binary<S: vigil_metrics::Score>(scores: &[S], labels: &[bool], expected: &Value, name: &str) {
    if let Some(auc) = expected.get("roc_auc") {
        close(roc_auc(scores, labels).unwrap(), auc.as_f64().unwrap(), &format!("{name} roc_auc"));
    }
    let ap = average_precision(scores, labels).unwrap();
    close(ap, expected["average_precision"].as_f64().unwrap(), &format!("{name} average_precision"));
    let best = f1_max_detailed(scores, labels).unwrap();
    close(best.f1, expected["f1_max"].as_f64().unwrap(), &format!("{name} f1_max"));
    let sklearn_threshold = expected["f1_threshold"].as_f64().unwrap();
    assert_eq!(best.lowest_flagged_score, sklearn_threshold, "{name}: F1-max cut");
    // vigil's `score > threshold` rule must flag exactly scikit-learn's `score >= t` set.
    let counts = BinaryCounts::at_threshold(scores, labels, best.threshold).unwrap();
    assert_eq!(counts, best.counts, "{name}: counts at the F1-max threshold");
    let flagged = scores.iter().filter(|&&s| s.into() >= sklearn_threshold).count() as u64;
    assert_eq!(counts.tp + counts.fp, flagged, "{name}: flagged set");
    close(counts.f1(), best.f1, &format!("{name} f1 of counts"));
}

#[test]
fn image_level_metrics_match_scikit_learn() {
    let fixtures = fixtures();
    let cases = fixtures["image_cases"].as_array().unwrap();
    assert!(cases.len() >= 5);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let scores = floats(&case["scores"]);
        let labels: Vec<bool> = floats(&case["labels"]).iter().map(|&l| l != 0.0).collect();
        check_binary(&scores, &labels, case, name);
        if let Some(fpr) = case.get("roc_fpr") {
            let roc = roc_curve(&scores, &labels).unwrap();
            assert_curve(&roc, &floats(fpr), &floats(&case["roc_tpr"]), &format!("{name} roc"));
            let pr = pr_curve(&scores, &labels).unwrap();
            let (recall, precision) = (floats(&case["pr_recall"]), floats(&case["pr_precision"]));
            assert_curve(&pr, &recall, &precision, &format!("{name} pr"));
        }
    }
}

/// splitmix64, the generator the fixture script describes its pixel datasets with.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E3779B97F4A7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

struct Dataset {
    maps: Vec<Vec<f32>>,
    masks: Vec<Vec<bool>>,
    width: usize,
    height: usize,
}

/// The script's `blob_dataset`: elliptic blobs, integer noise plus levels/2 inside blobs.
fn blob_dataset(spec: &Value) -> Dataset {
    let get = |k: &str| spec[k].as_u64().unwrap();
    let (width, height, levels) = (get("width") as i64, get("height") as i64, get("levels"));
    let mut gen = SplitMix64(get("seed"));
    let (mut maps, mut masks) = (Vec::new(), Vec::new());
    for _ in 0..get("n_images") {
        let mut mask = vec![false; (width * height) as usize];
        for _ in 0..gen.below(get("max_blobs")) {
            let (cx, cy) = (gen.below(width as u64) as i64, gen.below(height as u64) as i64);
            let rx = 1 + gen.below(get("max_radius")) as i64;
            let ry = 1 + gen.below(get("max_radius")) as i64;
            for y in 0..height {
                for x in 0..width {
                    let (dx, dy) = (x - cx, y - cy);
                    if dx * dx * ry * ry + dy * dy * rx * rx <= rx * rx * ry * ry {
                        mask[(y * width + x) as usize] = true;
                    }
                }
            }
        }
        let map = mask.iter().map(|&m| (gen.below(levels) + m as u64 * (levels / 2)) as f32).collect();
        maps.push(map);
        masks.push(mask);
    }
    Dataset { maps, masks, width: width as usize, height: height as usize }
}

#[test]
fn pixel_metrics_and_aupro_match_the_reference_scripts() {
    let fixtures = fixtures();
    let cases = fixtures["pixel_cases"].as_array().unwrap();
    assert!(cases.len() >= 4);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let data = blob_dataset(&case["generator"]);
        let scores: Vec<f32> = data.maps.concat();
        let labels: Vec<bool> = data.masks.concat();

        let checksum = &case["checksum"];
        let score_sum: f64 = scores.iter().map(|&s| s as f64).sum();
        let weighted: f64 = scores.iter().enumerate().map(|(i, &s)| s as f64 * (i % 7 + 1) as f64).sum();
        assert_eq!(score_sum, checksum["score_sum"].as_f64().unwrap(), "{name}: generated scores differ");
        assert_eq!(weighted, checksum["weighted_score_sum"].as_f64().unwrap(), "{name}: score order differs");
        let anomalous = labels.iter().filter(|&&l| l).count() as u64;
        assert_eq!(anomalous, checksum["anomalous_pixels"].as_u64().unwrap(), "{name}: masks differ");

        check_binary(&scores, &labels, &case["pixel"], &format!("{name} pixel"));

        let maps: Vec<&[f32]> = data.maps.iter().map(|m| m.as_slice()).collect();
        let masks: Vec<&[bool]> = data.masks.iter().map(|m| m.as_slice()).collect();
        let sizes = vec![(data.width, data.height); maps.len()];
        for (limit, expected) in case["aupro"].as_object().unwrap() {
            let limit: f64 = limit.parse().unwrap();
            let actual = aupro(&maps, &masks, &sizes, limit).unwrap();
            close(actual, expected.as_f64().unwrap(), &format!("{name} aupro@{limit}"));
        }
        let curve = pro_curve(&maps, &masks, &sizes).unwrap();
        assert_eq!(curve.points.len() as u64, case["pro_curve_points"].as_u64().unwrap(), "{name}");

        let at = &case["mean_iou_at"];
        let miou = mean_iou_at(&maps, &masks, at["threshold"].as_f64().unwrap()).unwrap();
        close(miou, at["mean_iou"].as_f64().unwrap(), &format!("{name} mean_iou_at"));
        let oracle = oracle_mean_iou(&maps, &masks).unwrap();
        close(oracle.mean_iou, case["oracle_mean_iou"].as_f64().unwrap(), &format!("{name} oracle mIoU"));
        let direct = mean_iou_at(&maps, &masks, oracle.threshold).unwrap();
        close(direct, oracle.mean_iou, &format!("{name} mIoU at the oracle threshold"));

        if let Some(expected) = case.get("image_roc_auc_of_max") {
            let image_scores: Vec<f64> =
                data.maps.iter().map(|m| m.iter().copied().fold(f32::MIN, f32::max) as f64).collect();
            let image_labels: Vec<bool> = data.masks.iter().map(|m| m.iter().any(|&b| b)).collect();
            let auc = roc_auc(&image_scores, &image_labels).unwrap();
            close(auc, expected.as_f64().unwrap(), &format!("{name} image roc_auc"));
        }
    }
}
