//! An NFA threshold is checked on the held-out normal images at fit time, and `nfa-calibrated:K`
//! sets the log10 NFA level at which they give the nominal 10^-K false detections per image.

use std::path::{Path, PathBuf};

use vigil_core::ThresholdKind;
use vigil_data::dataset::validation_split;
use vigil_engine::{fit, fit_with_held_out, FitOptions, MethodSpec, Model, PipelineOptions};
use vigil_metrics::ThresholdRule;
use vigil_nfa::calibration::false_detections_per_image;

const SIZE: u32 = 48;
const SEED: u64 = 3;
const VAL_FRACTION: f64 = 0.5;

/// A texture whose local statistics vary from image to image (blotches of contrast), so that the
/// Gaussian background model of the a contrario detector does not hold and the theoretical NFA
/// level gives false detections.
fn write_textures(dir: &Path, n: usize) -> Vec<PathBuf> {
    std::fs::create_dir_all(dir).unwrap();
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 11) as f64 / (1u64 << 53) as f64
    };
    (0..n)
        .map(|i| {
            let path = dir.join(format!("{i:03}.png"));
            let (cx, cy, gain) = (next() * SIZE as f64, next() * SIZE as f64, 1.0 + 4.0 * next());
            let noise: Vec<f64> = (0..SIZE * SIZE).map(|_| next() - 0.5).collect();
            image::GrayImage::from_fn(SIZE, SIZE, |x, y| {
                let d2 = (x as f64 - cx).powi(2) + (y as f64 - cy).powi(2);
                let contrast = 20.0 * (1.0 + gain * (-d2 / 40.0).exp());
                let v = 128.0 + contrast * noise[(y * SIZE + x) as usize];
                image::Luma([v.clamp(0.0, 255.0) as u8])
            })
            .save(&path)
            .unwrap();
            path
        })
        .collect()
}

/// A small a contrario detector with training statistics.
fn spec() -> MethodSpec {
    MethodSpec::parse("acontrario:statistics=training,scales=2,patch_size=7,components=8", &[]).unwrap()
}

fn fit_with(train: &[PathBuf], rule: ThresholdRule) -> Model {
    let opts = FitOptions {
        val_fraction: VAL_FRACTION,
        seed: SEED,
        image_threshold: Some(rule),
        ..Default::default()
    };
    fit(&spec(), train.to_vec(), &PipelineOptions::default(), opts).unwrap()
}

/// The log10 NFA maps the model gives the held-out normal images.
fn held_out_maps(model: &Model, train: &[PathBuf]) -> Vec<vigil_core::Map> {
    nfa_maps(model, &validation_split(train, VAL_FRACTION, SEED).1)
}

/// The log10 NFA maps the model gives `images`.
fn nfa_maps(model: &Model, images: &[PathBuf]) -> Vec<vigil_core::Map> {
    images
        .iter()
        .map(|p| {
            let image = vigil_data::io::load_image(p).unwrap();
            model.score(&image, &p.display().to_string()).unwrap().log10_nfa.expect("an NFA map")
        })
        .collect()
}

#[test]
fn nfa_thresholds_are_checked_and_calibrated_on_held_out_normals() {
    let tmp = tempfile::tempdir().unwrap();
    let train = write_textures(&tmp.path().join("train"), 20);

    let theoretical = fit_with(&train, ThresholdRule::Nfa(0.0));
    let maps = held_out_maps(&theoretical, &train);
    assert_eq!(maps.len(), 10);
    let at_zero = false_detections_per_image(&maps, 0.0).unwrap();
    let check = &theoretical.fit_info["nfa_check"];
    assert_eq!(check["held_out_images"], 10);
    assert_eq!(check["false_detections_per_image_at_theoretical"].as_f64().unwrap(), at_zero);
    assert!(at_zero > 1.0, "the test texture should break the background model; got {at_zero} per image");
    assert_eq!(theoretical.image_threshold.kind, ThresholdKind::Nfa { k: 0.0 });

    let calibrated = fit_with(&train, ThresholdRule::NfaCalibrated(0.0));
    let t = &calibrated.image_threshold;
    assert_eq!(t.kind, ThresholdKind::NfaCalibrated { k: 0.0 });
    assert_eq!(t.n_samples, 10);
    let level = t.log10_nfa_level().unwrap();
    assert!(level < 0.0 && level.is_finite(), "calibrated level {level}");
    assert_eq!(check["calibrated_log10_nfa"].as_f64().unwrap(), level);
    // At the stored level the held-out normals give at most the nominal one detection per image,
    // and the decisions of the model read that level.
    let maps = held_out_maps(&calibrated, &train);
    assert!(false_detections_per_image(&maps, level).unwrap() <= 1.0);
    assert!(
        false_detections_per_image(&maps, level + 0.5).unwrap() > 1.0
            || maps.iter().all(|m| m.min() as f64 > level + 0.5)
    );
    let round_trip = tmp.path().join("calibrated.vigil");
    calibrated.save(&round_trip, false).unwrap();
    let loaded = Model::load(&round_trip, &Default::default()).unwrap();
    assert_eq!(loaded.image_threshold, *t);
    assert_eq!(loaded.pixel_threshold.log10_nfa_level(), Some(level));
}

#[test]
fn a_calibrated_threshold_needs_held_out_images() {
    let tmp = tempfile::tempdir().unwrap();
    let train = write_textures(&tmp.path().join("train"), 4);
    let opts = FitOptions {
        val_fraction: 0.0,
        image_threshold: Some(ThresholdRule::NfaCalibrated(0.0)),
        ..Default::default()
    };
    let Err(err) = fit(&spec(), train, &PipelineOptions::default(), opts) else {
        panic!("a calibrated NFA threshold without held-out images must be refused")
    };
    let err = err.to_string();
    assert!(err.contains("held-out"), "{err}");
}

#[test]
fn the_nfa_check_reads_the_held_out_images_the_caller_chose() {
    let tmp = tempfile::tempdir().unwrap();
    let train = write_textures(&tmp.path().join("train"), 12);
    // Every fourth image held out, as a fixed protocol would.
    let held_out: Vec<PathBuf> = train.iter().skip(3).step_by(4).cloned().collect();
    let fit_paths: Vec<PathBuf> = train.iter().filter(|p| !held_out.contains(p)).cloned().collect();
    let opts = FitOptions { image_threshold: Some(ThresholdRule::NfaCalibrated(0.0)), ..Default::default() };
    let model =
        fit_with_held_out(&spec(), fit_paths, held_out.clone(), &PipelineOptions::default(), opts).unwrap();
    assert_eq!(model.fit_info["train_images"], 9);
    let check = &model.fit_info["nfa_check"];
    assert_eq!(check["held_out_images"], 3);
    assert_eq!(
        check["false_detections_per_image_at_theoretical"].as_f64().unwrap(),
        false_detections_per_image(&nfa_maps(&model, &held_out), 0.0).unwrap()
    );
}
