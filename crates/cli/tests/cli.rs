//! End-to-end tests of the `vigil` binary on small generated datasets: fit → test → predict,
//! config files, tiling, ignore masks, determinism, and clear errors on bad input.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use rand::{Rng, SeedableRng};
use vigil_core::shared_data::shared_path;

const SIZE: u32 = 48;
/// A small, fast a contrario configuration with statistics learned from the training images.
const METHOD: &str = "acontrario:statistics=training,scales=2,patch_size=7,components=8";

fn vigil(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vigil"))
        .args(args)
        .env("VIGIL_NO_PROGRESS", "1")
        .output()
        .expect("vigil runs")
}

fn ok(args: &[&str]) -> String {
    let out = vigil(args);
    assert!(
        out.status.success(),
        "vigil {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn fails(args: &[&str]) -> String {
    let out = vigil(args);
    assert!(!out.status.success(), "vigil {args:?} should fail but succeeded");
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!stderr.contains("panicked"), "vigil {args:?} panicked:\n{stderr}");
    stderr
}

/// A paper-like texture: smooth random field plus pixel noise, in three channels.
fn texture(rng: &mut rand_chacha::ChaCha8Rng, size: u32) -> image::RgbImage {
    let coarse: Vec<f32> = (0..64).map(|_| rng.gen_range(-0.05..0.05)).collect();
    image::RgbImage::from_fn(size, size, |x, y| {
        let c = coarse[((y * 8 / size) * 8 + x * 8 / size) as usize];
        let v = |rng: &mut rand_chacha::ChaCha8Rng| {
            ((0.5 + c + rng.gen_range(-0.04..0.04)) * 255.0).clamp(0.0, 255.0) as u8
        };
        image::Rgb([v(rng), v(rng), v(rng)])
    })
}

/// An MVTec-layout class: 12 train/good, 4 test/good, 4 test/spot with 8x8 dark spots and masks.
fn make_dataset(root: &Path, size: u32) {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    for dir in ["train/good", "test/good", "test/spot", "ground_truth/spot"] {
        std::fs::create_dir_all(root.join(dir)).unwrap();
    }
    for i in 0..12 {
        texture(&mut rng, size).save(root.join(format!("train/good/{i:03}.png"))).unwrap();
    }
    for i in 0..4 {
        texture(&mut rng, size).save(root.join(format!("test/good/{i:03}.png"))).unwrap();
        let mut img = texture(&mut rng, size);
        let mut mask = image::GrayImage::new(size, size);
        let (x0, y0) = (rng.gen_range(4..size - 12), rng.gen_range(4..size - 12));
        for y in y0..y0 + 8 {
            for x in x0..x0 + 8 {
                img.put_pixel(x, y, image::Rgb([20, 20, 20]));
                mask.put_pixel(x, y, image::Luma([255]));
            }
        }
        img.save(root.join(format!("test/spot/{i:03}.png"))).unwrap();
        mask.save(root.join(format!("ground_truth/spot/{i:03}_mask.png"))).unwrap();
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn metrics(dir: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(dir.join("metrics.json")).unwrap()).unwrap()
}

struct Fixture {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    data: PathBuf,
}

fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_path_buf();
    let data = root.join("cls");
    make_dataset(&data, SIZE);
    Fixture { _tmp: tmp, root, data }
}

#[test]
fn fit_test_predict_round_trip() {
    let f = fixture();
    let model = f.root.join("m.vigil");
    let out = ok(&["fit", "-m", METHOD, "--train", s(&f.data), "-o", s(&model), "--seed", "3"]);
    assert!(out.contains("threshold"), "{out}");
    assert!(model.exists());

    let test_dir = f.root.join("test");
    ok(&["test", "--model", s(&model), "--data", s(&f.data), "-o", s(&test_dir), "--save-maps"]);
    let m = metrics(&test_dir);
    let auroc = m["metrics"]["image_auroc"].as_f64().unwrap();
    assert!(auroc >= 0.9, "planted dark spots must rank above normal textures, AUROC {auroc}");
    assert!(m["metrics"]["pixel_auroc"].as_f64().unwrap() > 0.8);
    assert!(m["metrics"]["aupro"].as_f64().is_some());
    assert_eq!(m["images"].as_array().unwrap().len(), 8);
    let report = std::fs::read_to_string(test_dir.join("report.html")).unwrap();
    assert!(report.contains("<svg") && report.contains("AUPRO"));
    let map = vigil_data::io::load_map_tiff(&test_dir.join("maps/spot_000.tiff")).unwrap();
    assert_eq!((map.width, map.height), (SIZE as usize, SIZE as usize));

    // Re-running into the same folder must not silently replace the user's results.
    let err = fails(&["test", "--model", s(&model), "--data", s(&f.data), "-o", s(&test_dir)]);
    assert!(err.contains("--overwrite"), "{err}");

    let pred = f.root.join("pred");
    let out = ok(&[
        "predict",
        "--model",
        s(&model),
        s(&f.data.join("test/spot")),
        s(&f.data.join("test/good/000.png")),
        "-o",
        s(&pred),
    ]);
    assert!(out.contains("scored 5 image(s)"), "{out}");
    let csv = std::fs::read_to_string(pred.join("scores.csv")).unwrap();
    assert_eq!(csv.lines().count(), 6, "{csv}");
    assert!(pred.join("overlays/000.png").exists());
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(pred.join("scores.json")).unwrap()).unwrap();
    assert_eq!(json["images"].as_array().unwrap().len(), 5);
}

#[test]
fn model_file_is_not_overwritten_without_asking() {
    let f = fixture();
    let model = f.root.join("m.vigil");
    std::fs::write(&model, b"the user's own file").unwrap();
    let err = fails(&["fit", "-m", METHOD, "--train", s(&f.data), "-o", s(&model)]);
    assert!(err.contains("already exists") && err.contains("--overwrite"), "{err}");
    assert_eq!(std::fs::read(&model).unwrap(), b"the user's own file");
    ok(&["fit", "-m", METHOD, "--train", s(&f.data), "-o", s(&model), "--overwrite"]);
}

#[test]
fn same_seed_same_numbers() {
    let f = fixture();
    let mut scores = Vec::new();
    for run in 0..2 {
        let model = f.root.join(format!("m{run}.vigil"));
        ok(&["fit", "-m", METHOD, "--train", s(&f.data), "-o", s(&model), "--seed", "11"]);
        let dir = f.root.join(format!("t{run}"));
        ok(&["test", "--model", s(&model), "--data", s(&f.data), "-o", s(&dir)]);
        let m = metrics(&dir);
        let v: Vec<f64> =
            m["images"].as_array().unwrap().iter().map(|i| i["score"].as_f64().unwrap()).collect();
        scores.push((v, m["image_threshold"]["value"].as_f64().unwrap()));
    }
    assert_eq!(scores[0], scores[1]);
}

#[test]
fn config_file_supplies_options_and_flags_override() {
    let f = fixture();
    let cfg = f.root.join("fit.toml");
    let model = f.root.join("from-config.vigil");
    std::fs::write(
        &cfg,
        format!(
            "method = \"{METHOD}\"\ntrain = \"{}\"\nout = \"{}\"\nthreshold = \"quantile:0.9\"\n",
            s(&f.data),
            s(&model)
        ),
    )
    .unwrap();
    let out = ok(&["fit", "--config", s(&cfg), "--threshold", "max"]);
    assert!(out.contains("max of normal validation scores"), "flag must override the file: {out}");
    assert!(model.exists());
    std::fs::write(&cfg, "no-such-option = 1\n").unwrap();
    let err = fails(&["fit", "--config", s(&cfg)]);
    assert!(err.contains("fit.toml"), "{err}");
}

#[test]
fn corrupt_training_image_stops_or_is_skipped() {
    let f = fixture();
    let bad = f.data.join("train/good/005.png");
    let bytes = std::fs::read(&bad).unwrap();
    std::fs::write(&bad, &bytes[..bytes.len() / 2]).unwrap();
    let model = f.root.join("m.vigil");
    let err = fails(&["fit", "-m", METHOD, "--train", s(&f.data), "-o", s(&model)]);
    assert!(err.contains("005.png"), "error must name the bad file: {err}");
    let out = vigil(&["fit", "-m", METHOD, "--train", s(&f.data), "-o", s(&model), "--skip-bad"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("005.png"), "skipped files are reported");
}

#[test]
fn empty_folder_and_missing_options_are_clear_errors() {
    let f = fixture();
    let empty = f.root.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let err = fails(&["fit", "-m", METHOD, "--train", s(&empty), "-o", s(&f.root.join("m.vigil"))]);
    assert!(err.contains("empty"), "{err}");
    let err = fails(&["fit", "--train", s(&f.data), "-o", s(&f.root.join("m.vigil"))]);
    assert!(err.contains("--method"), "{err}");
    let err = fails(&["fit", "-m", "acontrario:no_such_setting=1", "--train", s(&f.data), "-o", "x.vigil"]);
    assert!(err.contains("no_such_setting"), "{err}");
    let err = fails(&["fit", "-m", "nosuchmethod", "--train", s(&f.data), "-o", "x.vigil"]);
    assert!(err.contains("unknown method"), "{err}");
    let not_model = f.root.join("not-a-model.vigil");
    std::fs::write(&not_model, b"garbage").unwrap();
    let err = fails(&["predict", "--model", s(&not_model), s(&f.data), "-o", s(&f.root.join("p"))]);
    assert!(err.contains("not-a-model.vigil"), "{err}");
}

#[test]
fn mask_of_wrong_size_is_an_error_unless_resized() {
    let f = fixture();
    let model = f.root.join("m.vigil");
    ok(&["fit", "-m", METHOD, "--train", s(&f.data), "-o", s(&model)]);
    let mask = f.data.join("ground_truth/spot/002_mask.png");
    image::GrayImage::new(SIZE / 2, SIZE / 2).save(&mask).unwrap();
    let err = fails(&["test", "--model", s(&model), "--data", s(&f.data), "-o", s(&f.root.join("t"))]);
    assert!(err.contains("002_mask.png"), "{err}");
    ok(&["test", "--model", s(&model), "--data", s(&f.data), "-o", s(&f.root.join("t")), "--resize-masks"]);
}

#[test]
fn grayscale_input_to_a_colour_model_is_converted() {
    let f = fixture();
    let model = f.root.join("m.vigil");
    ok(&["fit", "-m", METHOD, "--train", s(&f.data), "-o", s(&model)]);
    let gray = f.root.join("gray.png");
    image::open(f.data.join("test/spot/001.png")).unwrap().to_luma16().save(&gray).unwrap();
    let out = ok(&["predict", "--model", s(&model), s(&gray), "-o", s(&f.root.join("p"))]);
    assert!(out.contains("scored 1 image(s)"), "{out}");
}

#[test]
fn ignore_mask_after_hides_a_defect() {
    let f = fixture();
    let model = f.root.join("m.vigil");
    // A threshold from held-out normal scores: the decision then reads the (masked) map itself.
    ok(&["fit", "-m", METHOD, "--train", s(&f.data), "-o", s(&model), "--threshold", "max"]);
    let target = f.data.join("test/spot/000.png");
    let truth = image::open(f.data.join("ground_truth/spot/000_mask.png")).unwrap().to_luma8();
    // Ignore a generous box around the defect: at the coarser pyramid scale a 7x7 patch spans 14 pixels.
    let ignore = image::GrayImage::from_fn(SIZE, SIZE, |x, y| {
        let near = (0..SIZE).any(|dy| {
            (0..SIZE).any(|dx| {
                truth.get_pixel(dx, dy)[0] > 0
                    && (x as i32 - dx as i32).abs() <= 12
                    && (y as i32 - dy as i32).abs() <= 12
            })
        });
        image::Luma([if near { 255 } else { 0 }])
    });
    let ignore_path = f.root.join("ignore.png");
    ignore.save(&ignore_path).unwrap();
    let verdict = |dir: &str, extra: &[&str]| -> bool {
        let out = f.root.join(dir);
        let mut args = vec!["predict", "--model", s(&model), s(&target), "-o", s(&out)];
        args.extend_from_slice(extra);
        ok(&args);
        let json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join("scores.json")).unwrap()).unwrap();
        json["images"][0]["anomalous"].as_bool().unwrap()
    };
    assert!(verdict("plain", &[]), "the dark spot is detected without an ignore mask");
    let hidden = verdict("ignored", &["--ignore", s(&ignore_path), "--ignore-mode", "after"]);
    let scores = std::fs::read_to_string(f.root.join("ignored/scores.json")).unwrap();
    assert!(!hidden, "the ignored defect must not flag the image: {scores}");
}

#[test]
fn tiled_scoring_returns_whole_image_maps() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("big");
    make_dataset(&data, 96);
    let model = tmp.path().join("m.vigil");
    ok(&["fit", "-m", METHOD, "--train", s(&data), "-o", s(&model), "--tile", "48", "--overlap", "16"]);
    let pred = tmp.path().join("p");
    ok(&["predict", "--model", s(&model), s(&data.join("test/spot/000.png")), "-o", s(&pred)]);
    let map = vigil_data::io::load_map_tiff(&pred.join("maps/000.tiff")).unwrap();
    assert_eq!((map.width, map.height), (96, 96));
    map.check_finite("stitched").unwrap();
}

#[test]
fn f1_threshold_needs_and_uses_labelled_anomalies() {
    let f = fixture();
    let model = f.root.join("m.vigil");
    let err = fails(&["fit", "-m", METHOD, "--train", s(&f.data), "-o", s(&model), "--threshold", "f1"]);
    assert!(err.contains("--val-anomalous"), "{err}");
    let out = ok(&[
        "fit",
        "-m",
        METHOD,
        "--train",
        s(&f.data),
        "-o",
        s(&model),
        "--threshold",
        "f1",
        "--val-anomalous",
        s(&f.data.join("test/spot")),
        "--val-masks",
        s(&f.data.join("ground_truth/spot")),
    ]);
    assert_eq!(out.matches("F1-optimal").count(), 2, "image and pixel thresholds are F1-optimal: {out}");
}

/// A scene of random rectangles (plenty of corners for ORB) seen through a nudged camera:
/// `w`x`h` windows at small random offsets.
fn nudged_views(dir: &Path, n: usize, seed: u64, (w, h): (u32, u32)) -> Vec<PathBuf> {
    let mut scene_rng = rand_chacha::ChaCha8Rng::seed_from_u64(99);
    let mut scene = image::GrayImage::from_pixel(150, 150, image::Luma([128]));
    for _ in 0..60 {
        let (x, y) = (scene_rng.gen_range(0..140u32), scene_rng.gen_range(0..140u32));
        let (rw, rh) = (scene_rng.gen_range(4..14u32), scene_rng.gen_range(4..14u32));
        let v = scene_rng.gen_range(0..255u8);
        for yy in y..(y + rh).min(150) {
            for xx in x..(x + rw).min(150) {
                scene.put_pixel(xx, yy, image::Luma([v]));
            }
        }
    }
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    std::fs::create_dir_all(dir).unwrap();
    (0..n)
        .map(|i| {
            let (ox, oy) = (rng.gen_range(18..=26u32), rng.gen_range(18..=26u32));
            let path = dir.join(format!("{i:03}.png"));
            image::imageops::crop_imm(&scene, ox, oy, w, h).to_image().save(&path).unwrap();
            path
        })
        .collect()
}

#[test]
fn registration_aligns_views_and_returns_maps_in_each_image_frame() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let train = root.join("train");
    nudged_views(&train, 8, 1, (96, 96));
    let reference = train.join("000.png");
    let model = root.join("m.vigil");
    ok(&["fit", "-m", METHOD, "--train", s(&train), "-o", s(&model), "--register", s(&reference)]);
    // The reference travels in the model file: predict needs no --register.
    let views = nudged_views(&root.join("views"), 2, 2, (104, 90));
    let out = root.join("pred");
    ok(&["predict", "--model", s(&model), "-o", s(&out), s(&views[0]), s(&views[1])]);
    let map = vigil_data::io::load_map_tiff(&out.join("maps/000.tiff")).unwrap();
    assert_eq!((map.width, map.height), (104, 90), "maps are in the image's own frame");
    map.check_finite("registered map").unwrap();
    // An image with nothing to align on is a clear error naming it.
    let flat = root.join("flat.png");
    image::GrayImage::from_pixel(96, 96, image::Luma([90])).save(&flat).unwrap();
    let err = fails(&["predict", "--model", s(&model), "-o", s(&root.join("p2")), s(&flat)]);
    assert!(err.contains("flat.png") && err.contains("registration"), "{err}");
    let err = fails(&["fit", "-m", METHOD, "--train", s(&train), "-o", "x.vigil", "--register", s(&flat)]);
    assert!(err.contains("flat.png"), "{err}");
}

#[test]
fn draem_trains_through_the_cli_with_checkpoints() {
    let f = fixture();
    let model = f.root.join("draem.vigil");
    let ckpt = f.root.join("ckpt");
    let method = "draem:steps=4,image_size=32,batch=2,checkpoint_every=2";
    ok(&["fit", "-m", method, "--train", s(&f.data), "-o", s(&model), "--checkpoint-dir", s(&ckpt)]);
    assert!(std::fs::read_dir(&ckpt).unwrap().count() > 0, "a checkpoint was written");
    let out = f.root.join("t");
    ok(&["test", "--model", s(&model), "--data", s(&f.data), "-o", s(&out)]);
    assert!(metrics(&out)["metrics"]["pixel_auroc"].as_f64().is_some());
}

/// The pretrained-feature methods with the real MobileNetV2 weights on one real PIPED class.
/// Skipped (with a message) when `<workspace>/../shared` is absent; failed with VIGIL_REQUIRE_SHARED=1.
#[test]
fn pretrained_feature_methods_separate_real_impurities() {
    let Some(class) = shared_path("data/piped/PA_BDP01_TL") else { return };
    // The binary finds these weights itself (VIGIL_WEIGHTS_DIR, else the shared folder).
    if shared_path("weights/mobilenet_v2").is_none() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    for method in ["patchcore", "padim", "uflow:epochs=8"] {
        let model = tmp.path().join("m.vigil");
        ok(&["fit", "-m", method, "--train", s(&class), "-o", s(&model), "--overwrite"]);
        let out = tmp.path().join("t");
        ok(&["test", "--model", s(&model), "--data", s(&class), "-o", s(&out), "--overwrite"]);
        let m = metrics(&out);
        let (image, pixel) =
            (m["metrics"]["image_auroc"].as_f64().unwrap(), m["metrics"]["pixel_auroc"].as_f64().unwrap());
        assert!(image > 0.95 && pixel > 0.9, "{method}: image AUROC {image}, pixel AUROC {pixel}");
    }
}

/// Kill a DRAEM fit (SIGKILL) once it has written a checkpoint, run the same command again: it
/// resumes, and the learned weights equal those of a run that was never interrupted.
#[test]
fn killed_fit_resumes_to_the_same_weights() {
    let f = fixture();
    let method = "draem:steps=120,image_size=32,batch=2,checkpoint_every=10";
    let ckpt = f.root.join("ckpt");
    let resumed = f.root.join("resumed.vigil");
    let args = ["fit", "-m", method, "--train", s(&f.data), "-o", s(&resumed), "--checkpoint-dir", s(&ckpt)];
    let mut child = Command::new(env!("CARGO_BIN_EXE_vigil"))
        .args(args)
        .env("VIGIL_NO_PROGRESS", "1")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let checkpoint = ckpt.join("draem-training.ckpt");
    let start = std::time::Instant::now();
    while !checkpoint.exists() {
        assert!(start.elapsed().as_secs() < 120, "no checkpoint was written");
        assert!(
            child.try_wait().unwrap().is_none(),
            "the fit ended before a checkpoint could be interrupted"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(!resumed.exists(), "the killed run must not have written a model");
    ok(&args);

    let straight = f.root.join("straight.vigil");
    ok(&["fit", "-m", method, "--train", s(&f.data), "-o", s(&straight)]);
    let a = vigil_core::ModelFile::read(&resumed).unwrap();
    let b = vigil_core::ModelFile::read(&straight).unwrap();
    assert_eq!(a.state, b.state, "resumed weights differ from the uninterrupted run");
    assert_eq!(a.header.image_threshold, b.header.image_threshold);
}
