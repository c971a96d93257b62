//! The `--ignore-mode` contract, checked on the built `vigil` binary for one method at a time
//! (each `ignore_<method>.rs` calls [`check_both_modes`]): a defect inside the ignored region
//! does not flag the image in either mode (`before`, `after`); the same defect outside it still
//! does; and without a mask the inside defect is flagged, so the first check cannot pass merely
//! because the defect is invisible.

use std::path::Path;
use std::process::Command;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Image side in pixels.
pub const SIZE: u32 = 128;
/// The ignored region: the left half of the image.
pub const IGNORED_WIDTH: u32 = 64;
const TRAIN_IMAGES: usize = 30;
const SPOT: u32 = 10;
/// Top-left corners of the dark spot: inside the ignored half, 40 px from its edge (the
/// features of the kept half see it through their receptive fields: in `after` mode nothing
/// else keeps it out of the kept pixels), and mirrored outside it.
pub const SPOT_INSIDE: (u32, u32) = (14, 59);
pub const SPOT_OUTSIDE: (u32, u32) = (104, 59);

fn vigil(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_vigil"))
        .args(args)
        .env("VIGIL_NO_PROGRESS", "1")
        .output()
        .expect("vigil runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "vigil {args:?} failed:\n{}\n{stderr}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(!stderr.contains("panicked"), "vigil {args:?} panicked:\n{stderr}");
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// A smooth random field plus pixel noise, in three channels.
fn texture(rng: &mut ChaCha8Rng) -> image::RgbImage {
    let coarse: Vec<f32> = (0..64).map(|_| rng.gen_range(-0.05..0.05)).collect();
    image::RgbImage::from_fn(SIZE, SIZE, |x, y| {
        let c = coarse[((y * 8 / SIZE) * 8 + x * 8 / SIZE) as usize];
        let mut v = || ((0.5 + c + rng.gen_range(-0.04..0.04)) * 255.0).clamp(0.0, 255.0) as u8;
        image::Rgb([v(), v(), v()])
    })
}

fn with_spot(mut img: image::RgbImage, (x0, y0): (u32, u32)) -> image::RgbImage {
    for y in y0..y0 + SPOT {
        for x in x0..x0 + SPOT {
            img.put_pixel(x, y, image::Rgb([20, 20, 20]));
        }
    }
    img
}

fn s(p: &Path) -> &str {
    p.to_str().expect("temporary paths are UTF-8")
}

/// Fits `method` three times (no mask, `before`, `after`) on generated normal textures and
/// checks each verdict of the contract.
pub fn check_both_modes(method: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let train = root.join("train");
    std::fs::create_dir_all(&train).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    for i in 0..TRAIN_IMAGES {
        texture(&mut rng).save(train.join(format!("{i:03}.png"))).unwrap();
    }
    let inside = root.join("inside.png");
    let outside = root.join("outside.png");
    with_spot(texture(&mut rng), SPOT_INSIDE).save(&inside).unwrap();
    with_spot(texture(&mut rng), SPOT_OUTSIDE).save(&outside).unwrap();
    let ignore = root.join("ignore.png");
    image::GrayImage::from_fn(SIZE, SIZE, |x, _| image::Luma([if x < IGNORED_WIDTH { 255 } else { 0 }]))
        .save(&ignore)
        .unwrap();

    let flagged = |model: &Path, image: &Path, out: &str| -> (bool, String) {
        let out = root.join(out);
        vigil(&["predict", "--model", s(model), s(image), "-o", s(&out)]);
        let text = std::fs::read_to_string(out.join("scores.json")).unwrap();
        let json: serde_json::Value = serde_json::from_str(&text).unwrap();
        (json["images"][0]["anomalous"].as_bool().expect("a verdict per image"), text)
    };
    let fit = |name: &str, extra: &[&str]| {
        let model = root.join(format!("{name}.vigil"));
        // mean + 3σ of the held-out normal scores: a quantile of six held-out images would be
        // exceeded by about one fresh normal image in seven
        let mut args = vec![
            "fit",
            "-m",
            method,
            "--train",
            s(&train),
            "-o",
            s(&model),
            "--seed",
            "1",
            "--threshold",
            "ksigma:3",
        ];
        args.extend_from_slice(extra);
        vigil(&args);
        model
    };

    let plain = fit("plain", &[]);
    let (seen, scores) = flagged(&plain, &inside, "plain-inside");
    assert!(seen, "{method}: without a mask the spot must flag the image: {scores}");
    for mode in ["before", "after"] {
        let model = fit(mode, &["--ignore", s(&ignore), "--ignore-mode", mode]);
        let (hidden, scores) = flagged(&model, &inside, &format!("{mode}-inside"));
        assert!(!hidden, "{method}, {mode}: a spot in the ignored region must not flag the image: {scores}");
        let (seen, scores) = flagged(&model, &outside, &format!("{mode}-outside"));
        assert!(seen, "{method}, {mode}: a spot outside the ignored region must flag the image: {scores}");
    }
}
