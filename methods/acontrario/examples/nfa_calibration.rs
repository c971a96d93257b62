//! Quality and NFA calibration of one a contrario configuration on the PIPED classes (MVTec layout
//! under `<workspace>/../shared/data/piped`), one markdown row per class and a mean row.
//!
//! Every fifth train/good image (sorted by name) is held out; the detector is fitted on the rest.
//! On the held-out normals, `vigil_nfa::calibration` counts the false detections (8-connected regions
//! of log10 NFA <= 0) and finds the calibrated level for K = 0 (at most one false detection per
//! image). On test/, it reports image AUROC (maximum score), pixel AUROC, AUPRO@0.3, and at the
//! theoretical (log10 NFA <= 0) and calibrated levels: false regions per normal test image and the
//! share of normal / anomalous test images with at least one detection.
//!
//! RAYON_NUM_THREADS=2 cargo run --release -p vigil-acontrario --example nfa_calibration -- \
//!     '{"feature":"cnn","nfa":"region"}' [CLASS...]

use std::path::{Path, PathBuf};
use std::time::Instant;

use vigil_acontrario::{AcontrarioDetector, AcontrarioSettings};
use vigil_core::{Detector, FitContext, Image, ImageSource, Map, Mask, Result, VigilError};
use vigil_nfa::calibration::{calibrate, count_detections};

fn load_rgb(path: &Path) -> Result<Image> {
    let img = image::open(path).map_err(|e| VigilError::file(path, e.to_string()))?.to_rgb8();
    let (w, h) = (img.width() as usize, img.height() as usize);
    let mut data = vec![0f32; 3 * w * h];
    for (i, p) in img.pixels().enumerate() {
        for c in 0..3 {
            data[c * w * h + i] = p[c] as f32 / 255.0;
        }
    }
    Image::new(w, h, 3, data)
}

fn pngs(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    files.retain(|p| p.extension().is_some_and(|e| e == "png"));
    files.sort();
    files
}

struct Files(Vec<PathBuf>);

impl ImageSource for Files {
    fn len(&self) -> usize {
        self.0.len()
    }
    fn name(&self, index: usize) -> String {
        self.0[index].display().to_string()
    }
    fn load(&self, index: usize) -> Result<Image> {
        load_rgb(&self.0[index])
    }
}

/// One class's figures, in table order.
const COLUMNS: [&str; 13] = [
    "image AUROC",
    "pixel AUROC",
    "AUPRO@0.3",
    "held-out false regions @0",
    "calibrated level",
    "false regions / normal @0",
    "false regions / normal @cal",
    "normal flagged @0",
    "normal flagged @cal",
    "anomalous flagged @0",
    "anomalous flagged @cal",
    "fit s",
    "s / image",
];

fn evaluate(settings: &AcontrarioSettings, dir: &Path) -> Result<Vec<f64>> {
    let (mut held_out, mut fit_files) = (Vec::new(), Vec::new());
    for (i, file) in pngs(&dir.join("train/good")).into_iter().enumerate() {
        if i % 5 == 4 {
            held_out.push(file)
        } else {
            fit_files.push(file)
        }
    }
    let mut det = AcontrarioDetector::new(settings.clone());
    let start = Instant::now();
    det.fit(&Files(fit_files), &FitContext::default())?;
    let fit_seconds = start.elapsed().as_secs_f64();
    let held_out_maps: Vec<Map> = held_out
        .iter()
        .map(|f| Ok(det.score(&load_rgb(f)?, None)?.log10_nfa.expect("a contrario gives an NFA map")))
        .collect::<Result<_>>()?;
    let calibration = calibrate(&held_out_maps, 0.0)?;
    let level = calibration.calibrated_log10_nfa;

    let (mut image_scores, mut image_labels) = (Vec::new(), Vec::new());
    let (mut maps, mut masks) = (Vec::new(), Vec::new());
    let mut regions = [0usize; 2];
    let mut flagged = [[0usize; 2]; 2]; // [normal, anomalous][theoretical, calibrated]
    let (mut seconds, mut images) = (0f64, 0usize);
    for (file, anomalous) in pngs(&dir.join("test/good"))
        .into_iter()
        .map(|f| (f, false))
        .chain(pngs(&dir.join("test/impurity")).into_iter().map(|f| (f, true)))
    {
        let image = load_rgb(&file)?;
        let start = Instant::now();
        let out = det.score(&image, None)?;
        seconds += start.elapsed().as_secs_f64();
        images += 1;
        let nfa = out.log10_nfa.expect("a contrario gives an NFA map");
        for (j, l) in [0.0, level].into_iter().enumerate() {
            let n = count_detections(&nfa, l);
            if !anomalous {
                regions[j] += n;
            }
            flagged[anomalous as usize][j] += (n > 0) as usize;
        }
        let mask = if anomalous {
            let stem = file.file_stem().unwrap().to_string_lossy();
            let path = dir.join("ground_truth/impurity").join(format!("{stem}_mask.png"));
            let m = image::open(&path).map_err(|e| VigilError::file(&path, e.to_string()))?.to_luma8();
            Mask::new(image.width, image.height, m.pixels().map(|p| p[0] > 127).collect())?
        } else {
            Mask::empty(image.width, image.height)
        };
        image_scores.push(out.image_score.unwrap_or_else(|| out.map.max()));
        image_labels.push(anomalous);
        maps.push(out.map);
        masks.push(mask);
    }
    let normals = image_labels.iter().filter(|&&a| !a).count() as f64;
    let anomalies = image_labels.len() as f64 - normals;
    let map_refs: Vec<&Map> = maps.iter().collect();
    let mask_refs: Vec<&Mask> = masks.iter().collect();
    let (pixels, labels) = vigil_metrics::segmentation::flatten_pixels(&map_refs, &mask_refs)?;
    Ok(vec![
        vigil_metrics::roc_auc(&image_scores, &image_labels)?,
        vigil_metrics::roc_auc(&pixels, &labels)?,
        vigil_metrics::pro::aupro_of_maps(&map_refs, &mask_refs, 0.3)?,
        calibration.false_detections_at_theoretical,
        level,
        regions[0] as f64 / normals,
        regions[1] as f64 / normals,
        flagged[0][0] as f64 / normals,
        flagged[0][1] as f64 / normals,
        flagged[1][0] as f64 / anomalies,
        flagged[1][1] as f64 / anomalies,
        fit_seconds,
        seconds / images as f64,
    ])
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(json) = args.first() else {
        eprintln!("usage: nfa_calibration '<settings JSON>' [CLASS...]");
        std::process::exit(2);
    };
    let settings: AcontrarioSettings =
        serde_json::from_str(json).map_err(|e| VigilError::Config(format!("settings: {e}")))?;
    settings.validate()?;
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data/piped");
    let classes: Vec<String> = if args.len() > 1 {
        args[1..].to_vec()
    } else {
        let mut all: Vec<String> = std::fs::read_dir(&root)
            .map_err(|e| VigilError::file(&root, e.to_string()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.join("train/good").is_dir())
            .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().to_string()))
            .collect();
        all.sort();
        all
    };
    println!("settings: {json}\n");
    println!("| class | {} |", COLUMNS.join(" | "));
    println!("|---|{}", "---:|".repeat(COLUMNS.len()));
    let mut sums = vec![0f64; COLUMNS.len()];
    for class in &classes {
        let row = evaluate(&settings, &root.join(class))?;
        println!("| {class} | {} |", row.iter().map(|v| format!("{v:.3}")).collect::<Vec<_>>().join(" | "));
        sums.iter_mut().zip(&row).for_each(|(s, v)| *s += v);
    }
    let n = classes.len() as f64;
    println!(
        "| **mean** | {} |",
        sums.iter().map(|v| format!("{:.3}", v / n)).collect::<Vec<_>>().join(" | ")
    );
    Ok(())
}
