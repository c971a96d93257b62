//! `vigil predict` and `vigil test` write each image's files from several threads at once: the
//! outputs must be the same, byte for byte, whatever the number of threads; and a run stopped by
//! a bad file keeps the rows of every image before it.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use rand::{Rng, SeedableRng};

const SIZE: u32 = 40;
const METHOD: &str = "acontrario:statistics=training,scales=2,patch_size=7,components=8";

fn vigil(args: &[&str], threads: usize) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vigil"))
        .args(args)
        .env("VIGIL_NO_PROGRESS", "1")
        .env("RAYON_NUM_THREADS", threads.to_string())
        .output()
        .expect("vigil runs")
}

fn ok(args: &[&str], threads: usize) {
    let out = vigil(args, threads);
    assert!(out.status.success(), "vigil {args:?} failed:\n{}", String::from_utf8_lossy(&out.stderr));
}

fn texture(rng: &mut rand_chacha::ChaCha8Rng, spot: bool) -> image::RgbImage {
    let mut img = image::RgbImage::from_fn(SIZE, SIZE, |_, _| {
        let v = rng.gen_range(110..150);
        image::Rgb([v, v, v])
    });
    if spot {
        let (x0, y0) = (rng.gen_range(2..SIZE - 10), rng.gen_range(2..SIZE - 10));
        for y in y0..y0 + 8 {
            for x in x0..x0 + 8 {
                img.put_pixel(x, y, image::Rgb([20, 20, 20]));
            }
        }
    }
    img
}

/// An MVTec-layout class (train/good, test/good, test/spot with masks) and a model fitted on it.
fn setup(root: &Path) -> (PathBuf, PathBuf) {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
    let data = root.join("cls");
    for dir in ["train/good", "test/good", "test/spot", "ground_truth/spot"] {
        std::fs::create_dir_all(data.join(dir)).unwrap();
    }
    for i in 0..10 {
        texture(&mut rng, false).save(data.join(format!("train/good/{i:03}.png"))).unwrap();
    }
    for i in 0..6 {
        texture(&mut rng, false).save(data.join(format!("test/good/{i:03}.png"))).unwrap();
        let img = texture(&mut rng, true);
        let mask = image::GrayImage::from_fn(SIZE, SIZE, |x, y| {
            image::Luma([if img.get_pixel(x, y).0[0] == 20 { 255 } else { 0 }])
        });
        img.save(data.join(format!("test/spot/{i:03}.png"))).unwrap();
        mask.save(data.join(format!("ground_truth/spot/{i:03}_mask.png"))).unwrap();
    }
    let model = root.join("m.vigil");
    ok(&["fit", "-m", METHOD, "--train", data.to_str().unwrap(), "-o", model.to_str().unwrap()], 2);
    (data, model)
}

/// Every file under `dir`, by relative path, with its bytes.
fn files(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut folders = vec![dir.to_path_buf()];
    while let Some(folder) = folders.pop() {
        for entry in std::fs::read_dir(&folder).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                folders.push(path);
            } else {
                out.push((path.strip_prefix(dir).unwrap().to_path_buf(), std::fs::read(&path).unwrap()));
            }
        }
    }
    out.sort();
    out
}

/// Runs `args` (writing into `out`) with `threads` threads and returns what it wrote; `out` is
/// then moved away so the next run writes the same paths.
fn outputs(args: &[&str], out: &Path, threads: usize) -> Vec<(PathBuf, Vec<u8>)> {
    ok(args, threads);
    let written = files(out);
    std::fs::remove_dir_all(out).unwrap();
    written
}

#[test]
fn predict_and_test_outputs_do_not_depend_on_the_number_of_threads() {
    let tmp = tempfile::tempdir().unwrap();
    let (data, model) = setup(tmp.path());
    let inputs = tmp.path().join("inputs");
    std::fs::create_dir_all(&inputs).unwrap();
    for kind in ["good", "spot"] {
        for i in 0..6 {
            let from = data.join(format!("test/{kind}/{i:03}.png"));
            std::fs::copy(from, inputs.join(format!("{kind}_{i:03}.png"))).unwrap();
        }
    }
    std::fs::write(inputs.join("good_002b.png"), b"not a png").unwrap();
    let out = tmp.path().join("p");
    let (model, inputs_s, out_s) = (model.to_str().unwrap(), inputs.to_str().unwrap(), out.to_str().unwrap());
    let predict = ["predict", "--model", model, inputs_s, "-o", out_s, "--skip-bad"];
    let one = outputs(&predict, &out, 1);
    assert_eq!(one.iter().filter(|(p, _)| p.starts_with("overlays")).count(), 12);
    let csv =
        String::from_utf8(one.iter().find(|(p, _)| p == Path::new("scores.csv")).unwrap().1.clone()).unwrap();
    let rows: Vec<&str> = csv.lines().skip(1).map(|l| l.split(',').next().unwrap()).collect();
    let mut sorted = rows.clone();
    sorted.sort();
    assert_eq!(rows, sorted, "rows in input order");
    assert!(csv.contains("good_002b.png,skipped"), "{csv}");
    for threads in [2, 4] {
        let again = outputs(&predict, &out, threads);
        assert_eq!(again.len(), one.len());
        for ((path, a), (_, b)) in one.iter().zip(&again) {
            assert!(a == b, "{threads} threads: {} differs", path.display());
        }
    }

    // `test` with maps: the maps and overlays (metrics.json and the report hold timings).
    let data_s = data.to_str().unwrap();
    let test = ["test", "--model", model, "--data", data_s, "-o", out_s, "--save-maps"];
    let strip = |files: Vec<(PathBuf, Vec<u8>)>| -> Vec<(PathBuf, Vec<u8>)> {
        files.into_iter().filter(|(p, _)| p.starts_with("maps")).collect()
    };
    let one = strip(outputs(&test, &out, 1));
    assert_eq!(one.len(), 24, "a map and an overlay per test image");
    assert_eq!(one, strip(outputs(&test, &out, 4)));
}

#[test]
fn a_bad_file_stops_predict_after_the_rows_of_every_earlier_image() {
    let tmp = tempfile::tempdir().unwrap();
    let (data, model) = setup(tmp.path());
    let inputs = tmp.path().join("inputs");
    std::fs::create_dir_all(&inputs).unwrap();
    for i in 0..6 {
        std::fs::copy(data.join(format!("test/good/{i:03}.png")), inputs.join(format!("{i:03}.png")))
            .unwrap();
    }
    std::fs::write(inputs.join("003.png"), b"not a png").unwrap();
    let out = tmp.path().join("p");
    let run = vigil(
        &[
            "predict",
            "--model",
            model.to_str().unwrap(),
            inputs.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
        ],
        4,
    );
    assert!(!run.status.success());
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(stderr.contains("003.png") && !stderr.contains("panicked"), "{stderr}");
    let csv = std::fs::read_to_string(out.join("scores.csv")).unwrap();
    let rows: Vec<&str> = csv.lines().skip(1).collect();
    assert_eq!(rows.len(), 3, "{csv}");
    for (row, name) in rows.iter().zip(["000.png", "001.png", "002.png"]) {
        assert!(row.split(',').next().unwrap().ends_with(name), "{row}");
    }
}
