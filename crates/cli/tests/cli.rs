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
    let map = vigil_data::io::load_map_tiff(&test_dir.join("maps/spot/000.tiff")).unwrap();
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

/// Where tiled and untiled scoring must agree: tiles that meet without overlap and a method whose
/// statistics come from training see each tile exactly as they would see it as a whole image. A
/// 96x96 mosaic of four 48x48 test images, scored in 48-pixel tiles, must give back the four
/// untiled maps in its quadrants and the largest of their image scores; a tile the size of the
/// image must give back the untiled map.
#[test]
fn tiled_scoring_equals_untiled_scoring_where_the_tiles_are_whole_images() {
    let f = fixture();
    let (untiled, tiled) = (f.root.join("untiled.vigil"), f.root.join("tiled.vigil"));
    ok(&["fit", "-m", METHOD, "--train", s(&f.data), "-o", s(&untiled)]);
    ok(&["fit", "-m", METHOD, "--train", s(&f.data), "-o", s(&tiled), "--tile", "48", "--overlap", "0"]);

    let sources = ["test/spot/000.png", "test/good/000.png", "test/spot/001.png", "test/good/001.png"];
    let quadrants: Vec<image::RgbImage> =
        sources.iter().map(|p| image::open(f.data.join(p)).unwrap().to_rgb8()).collect();
    let pieces = f.root.join("pieces");
    std::fs::create_dir_all(&pieces).unwrap();
    let mut mosaic = image::RgbImage::new(2 * SIZE, 2 * SIZE);
    for (q, piece) in quadrants.iter().enumerate() {
        piece.save(pieces.join(format!("q{q}.png"))).unwrap();
        image::imageops::replace(
            &mut mosaic,
            piece,
            (q as u32 % 2 * SIZE).into(),
            (q as u32 / 2 * SIZE).into(),
        );
    }
    let mosaic_path = f.root.join("mosaic.png");
    mosaic.save(&mosaic_path).unwrap();

    let scores = |dir: &Path| -> Vec<f64> {
        let json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("scores.json")).unwrap()).unwrap();
        json["images"].as_array().unwrap().iter().map(|i| i["score"].as_f64().unwrap()).collect()
    };
    let (alone, whole) = (f.root.join("alone"), f.root.join("whole"));
    ok(&["predict", "--model", s(&untiled), s(&pieces), "-o", s(&alone)]);
    ok(&["predict", "--model", s(&tiled), s(&mosaic_path), "-o", s(&whole)]);
    let stitched = vigil_data::io::load_map_tiff(&whole.join("maps/mosaic.tiff")).unwrap();
    assert_eq!((stitched.width, stitched.height), (2 * SIZE as usize, 2 * SIZE as usize));
    let n = SIZE as usize;
    for q in 0..4 {
        let own = vigil_data::io::load_map_tiff(&alone.join(format!("maps/q{q}.tiff"))).unwrap();
        let (x0, y0) = (q % 2 * n, q / 2 * n);
        let worst = (0..n * n)
            .map(|i| (own.data[i] - stitched.get(y0 + i / n, x0 + i % n)).abs())
            .fold(0f32, f32::max);
        assert!(
            worst <= 1e-5 * own.max().abs().max(1.0),
            "quadrant {q}: tiled and untiled maps differ by {worst}"
        );
    }
    let best = scores(&alone).into_iter().fold(f64::MIN, f64::max);
    let mosaic_score = scores(&whole)[0];
    assert!((mosaic_score - best).abs() <= 1e-5 * best.abs().max(1.0), "mosaic {mosaic_score}, tiles {best}");

    // One tile covering the whole image is the untiled computation.
    let (one_tile, plain) = (f.root.join("one_tile"), f.root.join("plain"));
    let image = f.data.join("test/spot/002.png");
    ok(&["predict", "--model", s(&untiled), s(&image), "-o", s(&plain)]);
    ok(&["predict", "--model", s(&tiled), s(&image), "-o", s(&one_tile), "--tile", "48", "--overlap", "0"]);
    let a = vigil_data::io::load_map_tiff(&plain.join("maps/002.tiff")).unwrap();
    let b = vigil_data::io::load_map_tiff(&one_tile.join("maps/002.tiff")).unwrap();
    assert_eq!(a, b, "a single whole-image tile must give the untiled map");
}

/// Registration recovers known camera shifts. All images are windows of one scene at known
/// offsets: the reference sees scene pixels [18, 106)², each test view a larger window. The map of
/// a view is in the view's frame and is left at its background level (its minimum) exactly where
/// the reference does not see, so the edges of that background region give the recovered
/// alignment: they must lie where the known offsets put them, within `EDGE_TOLERANCE` pixels.
/// Measured: view a's edges are within 1.5 px all round; view b (shifted 14 px vertically) has one
/// edge tilted by up to 3 px at one end, the fitted homography's perspective terms drifting away
/// from the ORB matches; a wrong shift moves a whole edge.
#[test]
fn registration_recovers_known_shifts() {
    const EDGE_TOLERANCE: f64 = 4.0;
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let scene = image::open(&nudged_views(&root.join("scene"), 1, 5, (124, 124))[0]).unwrap().to_luma8();
    let window = |dir: &str, name: &str, (x, y): (u32, u32), (w, h): (u32, u32)| -> PathBuf {
        std::fs::create_dir_all(root.join(dir)).unwrap();
        let path = root.join(dir).join(format!("{name}.png"));
        image::imageops::crop_imm(&scene, x, y, w, h).to_image().save(&path).unwrap();
        path
    };
    let (reference_at, reference_size) = (18u32, 88u32);
    let reference =
        window("ref", "reference", (reference_at, reference_at), (reference_size, reference_size));
    for (i, offset) in [(14, 15), (16, 21), (19, 14), (22, 17), (15, 22), (21, 20), (17, 18), (20, 16)]
        .into_iter()
        .enumerate()
    {
        window("train", &format!("{i:03}"), offset, (reference_size, reference_size));
    }
    // A method whose map varies continuously (random-weight PaDiM): the a contrario map sits at
    // its floor, which is also the background level, on the scene's flat areas.
    let method = "padim:random_weights_seed=3,input_size=64";
    let model = root.join("m.vigil");
    ok(&[
        "fit",
        "-m",
        method,
        "--train",
        s(&root.join("train")),
        "-o",
        s(&model),
        "--register",
        s(&reference),
    ]);

    let views = [((6u32, 12u32), "a"), ((12, 4), "b")];
    let (vw, vh) = (104u32, 100u32);
    for &(offset, name) in &views {
        window("views", name, offset, (vw, vh));
    }
    let out = root.join("pred");
    ok(&["predict", "--model", s(&model), "-o", s(&out), s(&root.join("views"))]);
    for ((ox, oy), name) in views {
        let map = vigil_data::io::load_map_tiff(&out.join(format!("maps/{name}.tiff"))).unwrap();
        assert_eq!((map.width, map.height), (vw as usize, vh as usize), "maps are in the view's frame");
        // View pixel x shows scene pixel x + ox, which the reference sees iff it is in
        // [reference_at, reference_at + reference_size); likewise along y.
        let seen = |p: usize, offset: u32| {
            let scene_p = p as f64 + offset as f64;
            let (lo, hi) = (reference_at as f64, (reference_at + reference_size) as f64 - 1.0);
            // distance inside (positive) or outside (negative) the reference's window
            (scene_p - lo).min(hi - scene_p)
        };
        let background = map.min();
        let (mut wrong, mut checked) = (Vec::new(), 0);
        for y in 0..map.height {
            for x in 0..map.width {
                let margin = seen(x, ox).min(seen(y, oy));
                if margin.abs() < EDGE_TOLERANCE {
                    continue; // this close to the true edge, either side is accepted
                }
                checked += 1;
                let is_background = map.get(y, x) == background;
                if is_background != (margin < 0.0) {
                    wrong.push((x, y));
                }
            }
        }
        // Inside, one pixel may equal the minimum itself (a pure shift maps it exactly).
        assert!(
            wrong.len() <= 1 && checked > map.data.len() * 3 / 4,
            "view {name} at ({ox}, {oy}): {} of {checked} pixels are more than {EDGE_TOLERANCE} px on the \
             wrong side of the recovered field of view, first {:?}",
            wrong.len(),
            wrong.first()
        );
    }
}

fn csv_rows(path: &Path) -> Vec<Vec<String>> {
    let text = std::fs::read_to_string(path).unwrap();
    text.lines().skip(1).map(|l| l.split(',').map(str::to_string).collect()).collect()
}

/// `a/x.png`, `a/x.jpg`, `b/x.png` and `b/sub/x.png` under one folder: four maps, overlays and
/// masks, each CSV row pointing to its own; the sub-folders are searched.
#[test]
fn predict_keeps_colliding_names_apart_and_searches_sub_folders() {
    let f = fixture();
    let model = f.root.join("m.vigil");
    ok(&["fit", "-m", METHOD, "--train", s(&f.data), "-o", s(&model)]);
    let inputs = f.root.join("inputs");
    for (source, target) in [
        ("test/good/000.png", "a/x.png"),
        ("test/spot/000.png", "a/x.jpg"),
        ("test/good/001.png", "b/x.png"),
        ("test/spot/001.png", "b/sub/x.png"),
    ] {
        let path = inputs.join(target);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        image::open(f.data.join(source)).unwrap().to_rgb8().save(&path).unwrap();
    }
    let out = f.root.join("p");
    ok(&["predict", "--model", s(&model), s(&inputs), "-o", s(&out)]);
    let rows = csv_rows(&out.join("scores.csv"));
    assert_eq!(rows.len(), 4, "{rows:?}");
    for column in [8, 9, 10] {
        let files: std::collections::HashSet<&String> = rows.iter().map(|r| &r[column]).collect();
        assert_eq!(files.len(), 4, "column {column} must name four different files: {rows:?}");
        assert!(files.iter().all(|f| Path::new(f).is_file()), "{files:?}");
    }
    assert!(out.join("maps/b/sub/x.tiff").is_file(), "outputs keep the relative path");
}

/// Outputs of an earlier run (or the user's files of the same names) are replaced only with
/// --overwrite, which also removes the earlier run's outputs that would otherwise stay stale.
#[test]
fn existing_outputs_are_kept_without_overwrite_and_stale_ones_removed_with_it() {
    let f = fixture();
    let model = f.root.join("m.vigil");
    ok(&["fit", "-m", METHOD, "--train", s(&f.data), "-o", s(&model)]);
    let out = f.root.join("p");
    let user_map = out.join("maps/orig.tiff");
    std::fs::create_dir_all(user_map.parent().unwrap()).unwrap();
    std::fs::write(&user_map, b"user data").unwrap();
    let good = f.data.join("test/good");
    let err = fails(&["predict", "--model", s(&model), s(&good), "-o", s(&out)]);
    assert!(err.contains("--overwrite"), "{err}");
    assert_eq!(std::fs::read(&user_map).unwrap(), b"user data", "the user's file is untouched");
    assert!(!out.join("scores.json").exists());
    ok(&["predict", "--model", s(&model), s(&good), "-o", s(&out), "--overwrite"]);
    assert!(!user_map.exists(), "a stale map of the earlier run is removed");
    assert_eq!(csv_rows(&out.join("scores.csv")).len(), 4);

    // `test` and `demo` keep the same rule.
    let t = f.root.join("t");
    ok(&["test", "--model", s(&model), "--data", s(&f.data), "-o", s(&t), "--save-maps"]);
    fails(&["test", "--model", s(&model), "--data", s(&f.data), "-o", s(&t)]);
    let demo = f.root.join("demo");
    let demo_args = ["demo", "-o", s(&demo), "-m", METHOD];
    let run_demo = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_vigil"))
            .args(demo_args.iter().chain(extra))
            .env("VIGIL_NO_PROGRESS", "1")
            .env("VIGIL_DEMO_DATA", &f.data)
            .output()
            .unwrap()
    };
    assert!(run_demo(&[]).status.success());
    let again = run_demo(&[]);
    assert!(!again.status.success(), "demo must not replace its earlier outputs without --overwrite");
    assert!(String::from_utf8_lossy(&again.stderr).contains("--overwrite"));
    assert!(run_demo(&["--overwrite"]).status.success());
}

/// Threshold specs and options that can only fail are refused before any network is trained: a
/// DRAEM fit with a checkpoint folder leaves no checkpoint behind.
#[test]
fn bad_options_are_refused_before_a_draem_fit_starts() {
    let f = fixture();
    let ckpt = f.root.join("ckpt");
    let method = "draem:steps=40,image_size=32,batch=2,checkpoint_every=1";
    let wrong_mask = f.root.join("ignore.png");
    image::GrayImage::new(SIZE / 2, SIZE / 2).save(&wrong_mask).unwrap();
    let model = f.root.join("m.vigil");
    let base = ["fit", "-m", method, "--train", s(&f.data), "-o", s(&model), "--checkpoint-dir", s(&ckpt)];
    for (extra, expected) in [
        (vec!["--threshold", "fixed:NaN"], "fixed:NaN"),
        (vec!["--threshold", "fixed:inf"], "finite"),
        (vec!["--threshold", "nfa"], "NFA"),
        (vec!["--threshold", "f1"], "--val-anomalous"),
        (vec!["--val-fraction", "0"], "--fit-on-all"),
        (vec!["--ignore", s(&wrong_mask)], "ignore mask"),
    ] {
        let args: Vec<&str> = base.iter().copied().chain(extra.iter().copied()).collect();
        let err = fails(&args);
        assert!(err.contains(expected), "{extra:?}: {err}");
        let checkpoints = std::fs::read_dir(&ckpt).map(|d| d.count()).unwrap_or(0);
        assert_eq!(checkpoints, 0, "{extra:?}: training started before the option was refused");
        assert!(!model.exists());
    }
}

/// --skip-bad lists each skipped file in scores.csv / scores.json / metrics.json; a run that can
/// score nothing fails.
#[test]
fn skipped_files_are_listed_and_a_run_that_scores_nothing_fails() {
    let f = fixture();
    let model = f.root.join("m.vigil");
    ok(&["fit", "-m", METHOD, "--train", s(&f.data), "-o", s(&model)]);
    let inputs = f.root.join("inputs");
    std::fs::create_dir_all(&inputs).unwrap();
    std::fs::copy(f.data.join("test/good/000.png"), inputs.join("a.png")).unwrap();
    std::fs::write(inputs.join("broken.png"), b"not a png").unwrap();
    let out = f.root.join("p");
    ok(&["predict", "--model", s(&model), s(&inputs), "-o", s(&out), "--skip-bad"]);
    let rows = csv_rows(&out.join("scores.csv"));
    let broken = rows.iter().find(|r| r[0].ends_with("broken.png")).expect("the skipped file has a row");
    assert!(broken[1].starts_with("skipped"), "{broken:?}");
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("scores.json")).unwrap()).unwrap();
    assert!(json["images"].as_array().unwrap().iter().any(|r| r["status"] == "skipped"));

    std::fs::remove_file(inputs.join("a.png")).unwrap();
    let err =
        fails(&["predict", "--model", s(&model), s(&inputs), "-o", s(&out), "--skip-bad", "--overwrite"]);
    assert!(err.contains("no image could be scored"), "{err}");
}

/// A model fitted on grayscale images scores colour images of the same scenes as their grayscale
/// versions, for a method that wants RGB input (PaDiM, random backbone weights: no download).
#[test]
fn colour_images_reach_a_grayscale_model_as_grayscale() {
    let tmp = tempfile::tempdir().unwrap();
    let (gray, colour) = (tmp.path().join("gray"), tmp.path().join("colour"));
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
    for (dir, n) in [("train", 10), ("test", 6)] {
        std::fs::create_dir_all(gray.join(dir)).unwrap();
        std::fs::create_dir_all(colour.join(dir)).unwrap();
        for i in 0..n {
            // A strongly tinted texture: its grayscale version is a different picture to an RGB network.
            let base = texture(&mut rng, SIZE);
            let tinted = image::RgbImage::from_fn(SIZE, SIZE, |x, y| {
                let v = base.get_pixel(x, y)[0] as f32;
                image::Rgb([v as u8, (v * 0.4) as u8, (255.0 - v) as u8])
            });
            tinted.save(colour.join(format!("{dir}/{i:03}.png"))).unwrap();
            // The same luminance weights as vigil's own conversion, kept to 16 bits.
            let luma = image::ImageBuffer::<image::Luma<u16>, Vec<u16>>::from_fn(SIZE, SIZE, |x, y| {
                let [r, g, b] = tinted.get_pixel(x, y).0.map(|c| c as f32 / 255.0);
                image::Luma([((0.299 * r + 0.587 * g + 0.114 * b) * 65535.0).round() as u16])
            });
            luma.save(gray.join(format!("{dir}/{i:03}.png"))).unwrap();
        }
    }
    let model = tmp.path().join("m.vigil");
    let method = "padim:random_weights_seed=1,input_size=64";
    ok(&["fit", "-m", method, "--train", s(&gray.join("train")), "-o", s(&model), "--threshold", "max"]);
    let verdicts = |dir: &Path, out: &str| -> Vec<String> {
        let out = tmp.path().join(out);
        let o = vigil(&["predict", "--model", s(&model), s(dir), "-o", s(&out)]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        csv_rows(&out.join("scores.csv")).into_iter().map(|r| r[3].clone()).collect()
    };
    let from_gray = verdicts(&gray.join("test"), "pg");
    let from_colour = verdicts(&colour.join("test"), "pc");
    assert_eq!(from_gray, from_colour, "colour images must be scored as their grayscale versions");
    let o =
        vigil(&["predict", "--model", s(&model), s(&colour.join("test")), "-o", s(&tmp.path().join("pc2"))]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(stderr.matches("converted").count(), 1, "the conversion is reported once: {stderr}");
}

/// --fit-on-all fits on every image with a quantile threshold from their own scores, and warns;
/// a quantile from fewer than 10 held-out scores warns too.
#[test]
fn fit_on_all_and_few_score_warnings() {
    let f = fixture();
    let model = f.root.join("m.vigil");
    let out = vigil(&[
        "fit",
        "-m",
        METHOD,
        "--train",
        s(&f.data),
        "-o",
        s(&model),
        "--fit-on-all",
        "--threshold",
        "quantile:0.9",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let header = vigil_core::ModelFile::read(&model).unwrap().header;
    assert_eq!(header.fit_info["train_images"], 12);
    assert_eq!(header.image_threshold.unwrap().n_samples, 12);
    assert!(String::from_utf8_lossy(&out.stderr).contains("--fit-on-all"));
    let out = vigil(&[
        "fit",
        "-m",
        METHOD,
        "--train",
        s(&f.data),
        "-o",
        s(&model),
        "--overwrite",
        "--threshold",
        "quantile:0.9",
    ]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("only 2 normal score"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The a contrario detector with statistics from the test image learns nothing: no --train.
#[test]
fn a_method_that_learns_nothing_needs_no_training_images() {
    let f = fixture();
    let model = f.root.join("m.vigil");
    ok(&["fit", "-m", "acontrario:scales=2,patch_size=7,components=8", "-o", s(&model)]);
    let out = f.root.join("t");
    ok(&["test", "--model", s(&model), "--data", s(&f.data), "-o", s(&out)]);
    let err = fails(&["fit", "-m", METHOD, "-o", s(&f.root.join("x.vigil"))]);
    assert!(err.contains("--train"), "{err}");
}

/// Masks kept beside their images (`x.jpg` + `x.png`) are not read as test images; --glob filters.
#[test]
fn masks_beside_images_are_not_test_images_and_glob_filters() {
    let f = fixture();
    let model = f.root.join("m.vigil");
    ok(&["fit", "-m", METHOD, "--train", s(&f.data), "-o", s(&model)]);
    let imgs = f.root.join("Imgs");
    std::fs::create_dir_all(&imgs).unwrap();
    for i in 0..4 {
        image::open(f.data.join(format!("test/spot/{i:03}.png")))
            .unwrap()
            .to_rgb8()
            .save(imgs.join(format!("{i}.jpg")))
            .unwrap();
        std::fs::copy(
            f.data.join(format!("ground_truth/spot/{i:03}_mask.png")),
            imgs.join(format!("{i}.png")),
        )
        .unwrap();
    }
    let out = f.root.join("t");
    let normal = f.data.join("test/good");
    let common = ["test", "--model", s(&model), "--normal", s(&normal), "--anomalous", s(&imgs)];
    let args: Vec<&str> = common
        .iter()
        .copied()
        .chain(["--masks", s(&imgs), "--mask-pattern", "{stem}.png", "-o", s(&out)])
        .collect();
    ok(&args);
    assert_eq!(metrics(&out)["metrics"]["n_images"], 8, "4 normal + 4 anomalous, masks left out");
    let p = f.root.join("p");
    ok(&["predict", "--model", s(&model), s(&imgs), "-o", s(&p), "--glob", "*.jpg"]);
    assert_eq!(csv_rows(&p.join("scores.csv")).len(), 4);
}

/// A benchmark in which one class fails still writes its table, with the failure in it.
#[test]
fn a_failing_class_is_reported_and_the_benchmark_goes_on() {
    let f = fixture();
    let root = f.root.join("classes");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::rename(&f.data, root.join("good_class")).unwrap();
    let broken = root.join("broken_class");
    std::fs::create_dir_all(broken.join("train/good")).unwrap();
    std::fs::create_dir_all(broken.join("test/good")).unwrap();
    std::fs::write(broken.join("train/good/000.png"), b"not a png").unwrap();
    std::fs::copy(root.join("good_class/test/good/000.png"), broken.join("test/good/000.png")).unwrap();
    let out = f.root.join("b");
    let o = vigil(&[
        "benchmark",
        "-m",
        METHOD,
        "--data",
        s(&root),
        "-o",
        s(&out),
        "--fit-on-all",
        "--threshold",
        "max",
    ]);
    assert!(!o.status.success(), "a failed run is reported in the exit status");
    let csv = std::fs::read_to_string(out.join("benchmark.csv")).unwrap();
    assert!(csv.contains("broken_class") && csv.contains("failed"), "{csv}");
    let good = csv.lines().find(|l| l.contains("good_class")).unwrap();
    assert!(!good.contains("failed"), "{good}");
}

/// With stderr not a terminal, `--progress plain` (and auto) write plain progress lines.
#[test]
fn plain_progress_lines_when_not_a_terminal() {
    let f = fixture();
    let model = f.root.join("m.vigil");
    ok(&["fit", "-m", METHOD, "--train", s(&f.data), "-o", s(&model)]);
    let o = vigil(&[
        "--progress",
        "plain",
        "test",
        "--model",
        s(&model),
        "--data",
        s(&f.data),
        "-o",
        s(&f.root.join("t")),
    ]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(stderr.contains("scoring: 8/8 images"), "{stderr}");
}

/// An image far larger than the training images, scored whole, is worth a warning.
#[test]
fn much_larger_images_without_tiles_are_warned_about() {
    let f = fixture();
    let model = f.root.join("m.vigil");
    ok(&["fit", "-m", METHOD, "--train", s(&f.data), "-o", s(&model)]);
    let big = f.root.join("big.png");
    image::open(f.data.join("test/good/000.png"))
        .unwrap()
        .resize_exact(SIZE * 5, SIZE * 5, image::imageops::FilterType::Nearest)
        .save(&big)
        .unwrap();
    let o = vigil(&["predict", "--model", s(&model), s(&big), "-o", s(&f.root.join("p"))]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("--tile"), "{}", String::from_utf8_lossy(&o.stderr));
}

/// The `.tiff` files under a folder, as paths relative to it.
fn tiff_files(dir: &Path) -> std::collections::BTreeSet<String> {
    let mut found = std::collections::BTreeSet::new();
    let mut folders = vec![dir.to_path_buf()];
    while let Some(folder) = folders.pop() {
        for entry in std::fs::read_dir(&folder).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                folders.push(path);
            } else if path.extension().is_some_and(|e| e == "tiff") {
                found.insert(path.strip_prefix(dir).unwrap().to_string_lossy().replace('\\', "/"));
            }
        }
    }
    found
}

/// `test` on an MVTec layout (the same file names in every kind) and on generic folders of
/// sub-folders (normal/<line>/, defects/<kind>/ with masks mirrored under gt/<kind>/): every image
/// is read, kinds come from the sub-folders, and every saved map keeps its relative path.
#[test]
fn test_reads_sub_folders_and_keeps_every_name_apart() {
    let f = fixture();
    let model = f.root.join("m.vigil");
    ok(&["fit", "-m", METHOD, "--train", s(&f.data), "-o", s(&model)]);
    let mvtec = f.root.join("t_mvtec");
    ok(&["test", "--model", s(&model), "--data", s(&f.data), "-o", s(&mvtec), "--save-maps"]);
    let m = metrics(&mvtec);
    assert_eq!(m["metrics"]["n_images"], 8);
    let expected: Vec<String> =
        (0..4).flat_map(|i| [format!("good/{i:03}.tiff"), format!("spot/{i:03}.tiff")]).collect();
    assert_eq!(tiff_files(&mvtec.join("maps")), expected.into_iter().collect());

    // The same images spread over sub-folders, with file names repeated across them.
    let copy = |from: &str, to: &Path| {
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(f.data.join(from), to).unwrap();
    };
    let (normal, defects, gt) = (f.root.join("normal"), f.root.join("defects"), f.root.join("gt"));
    for i in 0..4 {
        let (line, kind) = (["line1", "line2"][i % 2], ["crack", "hole"][i % 2]);
        copy(&format!("test/good/{i:03}.png"), &normal.join(format!("{line}/{:03}.png", i / 2)));
        copy(&format!("test/spot/{i:03}.png"), &defects.join(format!("{kind}/{:03}.png", i / 2)));
        copy(
            &format!("ground_truth/spot/{i:03}_mask.png"),
            &gt.join(format!("{kind}/{:03}_mask.png", i / 2)),
        );
    }
    let generic = f.root.join("t_generic");
    ok(&[
        "test",
        "--model",
        s(&model),
        "--normal",
        s(&normal),
        "--anomalous",
        s(&defects),
        "--masks",
        s(&gt),
        "-o",
        s(&generic),
        "--save-maps",
    ]);
    let g = metrics(&generic);
    assert_eq!(g["metrics"]["n_images"], 8);
    let expected: std::collections::BTreeSet<String> = [
        "good/line1/000",
        "good/line1/001",
        "good/line2/000",
        "good/line2/001",
        "crack/000",
        "crack/001",
        "hole/000",
        "hole/001",
    ]
    .iter()
    .map(|n| format!("{n}.tiff"))
    .collect();
    assert_eq!(tiff_files(&generic.join("maps")), expected);
    let kinds: std::collections::BTreeSet<&str> =
        g["images"].as_array().unwrap().iter().map(|i| i["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["crack", "good", "hole"].into_iter().collect());
    for metric in ["image_auroc", "pixel_auroc"] {
        assert_eq!(g["metrics"][metric], m["metrics"][metric], "{metric}: the same images, the same result");
    }

    // Two files that differ only by extension keep it in their output names.
    let twins = f.root.join("twins");
    copy("test/good/000.png", &twins.join("x.png"));
    image::open(f.data.join("test/good/001.png")).unwrap().to_rgb8().save(twins.join("x.jpg")).unwrap();
    let out = f.root.join("t_twins");
    ok(&[
        "test",
        "--model",
        s(&model),
        "--normal",
        s(&twins),
        "--anomalous",
        s(&defects),
        "-o",
        s(&out),
        "--save-maps",
    ]);
    let maps = tiff_files(&out.join("maps"));
    assert!(maps.contains("good/x_png.tiff") && maps.contains("good/x_jpg.tiff"), "{maps:?}");
}

fn stderr_of(args: &[&str]) -> String {
    let o = vigil(args);
    assert!(o.status.success(), "vigil {args:?} failed: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stderr).to_string()
}

/// Pipeline options given to `predict` that differ from those of the fit are warned about (the
/// model's thresholds were set without them); the fit's own options are used silently.
#[test]
fn predict_warns_when_pipeline_options_differ_from_the_fit() {
    let f = fixture();
    let model = f.root.join("m.vigil");
    ok(&["fit", "-m", METHOD, "--train", s(&f.data), "-o", s(&model)]);
    let good = f.data.join("test/good");
    let predict = |name: &str, extra: &[&str]| -> String {
        let out = f.root.join(name);
        let args: Vec<&str> = ["predict", "--model", s(&model), s(&good), "-o", s(&out)]
            .into_iter()
            .chain(extra.iter().copied())
            .collect();
        stderr_of(&args)
    };
    const WARNING: &str = "pipeline options differ from the fit";
    let same = predict("p_same", &[]);
    assert!(!same.contains(WARNING), "{same}");
    let tiled = predict("p_tiled", &["--tile", "32"]);
    assert!(tiled.contains(WARNING) && tiled.contains("tiling"), "{tiled}");
    let scored = predict("p_score", &["--image-score", "mean"]);
    assert!(scored.contains(WARNING) && scored.contains("image score"), "{scored}");
}

/// Ground truth that says nothing (an anomalous image's mask all zero) or is not binary is
/// reported once for the run, naming the first such mask; clean masks give no such warning.
#[test]
fn all_zero_and_non_binary_ground_truth_masks_are_warned_about() {
    let f = fixture();
    let model = f.root.join("m.vigil");
    ok(&["fit", "-m", METHOD, "--train", s(&f.data), "-o", s(&model)]);
    let test = |name: &str| {
        stderr_of(&["test", "--model", s(&model), "--data", s(&f.data), "-o", s(&f.root.join(name))])
    };
    let clean = test("t_clean");
    assert!(!clean.contains("ground-truth"), "{clean}");
    let gt = f.data.join("ground_truth/spot");
    image::GrayImage::new(SIZE, SIZE).save(gt.join("000_mask.png")).unwrap();
    let mut soft = image::open(gt.join("001_mask.png")).unwrap().to_luma8();
    for p in soft.pixels_mut().filter(|p| p[0] > 0).take(5) {
        p[0] = 128;
    }
    soft.save(gt.join("001_mask.png")).unwrap();
    let warned = test("t_bad");
    let lines: Vec<&str> = warned.lines().filter(|l| l.contains("ground-truth")).collect();
    assert_eq!(lines.len(), 2, "{warned}");
    assert!(
        lines.iter().any(|l| l.contains("1 ground-truth mask(s) of anomalous images are all zero")
            && l.contains("000_mask.png")),
        "{warned}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains("1 ground-truth mask(s) are not binary") && l.contains("001_mask.png")),
        "{warned}"
    );
}

/// A model fitted on colour images scores grayscale versions of colour test images (channels
/// replicated) with the verdicts it gives the colour images themselves, up to the method's noise
/// (at most one of twelve): the crossing the other way is tested above. PaDiM with random
/// backbone weights; the textures are near-neutral colour (independent noise per channel), as a
/// colour camera sees a grey product. (Of a strongly tinted product, a grayscale image is another
/// picture: replicating its channels cannot bring the tint back, and every such image is flagged.)
#[test]
fn grayscale_images_reach_a_colour_model_with_the_colour_verdicts() {
    let tmp = tempfile::tempdir().unwrap();
    let (colour, gray) = (tmp.path().join("colour"), tmp.path().join("gray"));
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
    let mut expected = Vec::new();
    for (dir, n) in [("train", 16), ("test", 12)] {
        std::fs::create_dir_all(colour.join(dir)).unwrap();
        std::fs::create_dir_all(gray.join(dir)).unwrap();
        for i in 0..n {
            let base = texture(&mut rng, SIZE);
            let defect = dir == "test" && i % 2 == 1;
            let (x0, y0) = (rng.gen_range(4..SIZE - 16), rng.gen_range(4..SIZE - 16));
            let tinted = image::RgbImage::from_fn(SIZE, SIZE, |x, y| {
                let spot = defect && (x0..x0 + 12).contains(&x) && (y0..y0 + 12).contains(&y);
                if spot {
                    image::Rgb([30, 30, 30])
                } else {
                    *base.get_pixel(x, y)
                }
            });
            if dir == "test" {
                expected.push(defect);
            }
            tinted.save(colour.join(format!("{dir}/{i:03}.png"))).unwrap();
            image::DynamicImage::ImageRgb8(tinted)
                .to_luma8()
                .save(gray.join(format!("{dir}/{i:03}.png")))
                .unwrap();
        }
    }
    let model = tmp.path().join("m.vigil");
    let method = "padim:random_weights_seed=1,input_size=64";
    ok(&["fit", "-m", method, "--train", s(&colour.join("train")), "-o", s(&model), "--threshold", "max"]);
    let verdicts = |dir: &Path, out: &str| -> Vec<bool> {
        let out = tmp.path().join(out);
        ok(&["predict", "--model", s(&model), s(dir), "-o", s(&out)]);
        csv_rows(&out.join("scores.csv")).into_iter().map(|r| r[3] == "anomalous").collect()
    };
    let from_colour = verdicts(&colour.join("test"), "pc");
    let from_gray = verdicts(&gray.join("test"), "pg");
    let found = |v: &[bool]| v.iter().zip(&expected).filter(|(&v, &e)| v && e).count();
    assert_eq!(
        found(&from_colour),
        6,
        "the colour model must find the spots in colour images: {from_colour:?}"
    );
    let differing = from_colour.iter().zip(&from_gray).filter(|(a, b)| a != b).count();
    assert!(
        differing <= 1,
        "grayscale images must get the colour verdicts: {from_colour:?} vs {from_gray:?}"
    );
}
