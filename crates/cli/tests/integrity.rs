//! What `vigil` refuses rather than score silently wrong: a model file with changed bytes, a
//! backbone weights file other than the one the model was fitted with, a training checkpoint of
//! another data set.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use vigil_backbones::{write_state, Backbone, BackboneKind};

fn joined<A: AsRef<str>>(args: &[A]) -> String {
    args.iter().map(|a| a.as_ref()).collect::<Vec<_>>().join(" ")
}

fn vigil<A: AsRef<str>>(args: &[A]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vigil"))
        .args(args.iter().map(|a| a.as_ref()))
        .env("VIGIL_NO_PROGRESS", "1")
        .output()
        .unwrap()
}

/// stdout and stderr of a run that must succeed.
fn ok<A: AsRef<str>>(args: &[A]) -> (String, String) {
    let out = vigil(args);
    let (stdout, stderr) =
        (String::from_utf8_lossy(&out.stdout).to_string(), String::from_utf8_lossy(&out.stderr).to_string());
    assert!(out.status.success(), "vigil {} failed:\n{stdout}\n{stderr}", joined(args));
    (stdout, stderr)
}

/// stderr of a run that must fail cleanly.
fn fails<A: AsRef<str>>(args: &[A]) -> String {
    let out = vigil(args);
    assert!(!out.status.success(), "vigil {} should fail but succeeded", joined(args));
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!stderr.contains("panicked"), "vigil {} panicked:\n{stderr}", joined(args));
    stderr
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `count` 48x48 stripe images whose period depends on `period`.
fn write_images(dir: &Path, count: u32, period: f32) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    for k in 0..count {
        image::RgbImage::from_fn(48, 48, |x, y| {
            let v = (127.0 + 90.0 * ((x + k) as f32 / period).sin() + (y % 3) as f32) as u8;
            image::Rgb([v, v / 2 + 20, 255 - v])
        })
        .save(dir.join(format!("{k:02}.png")))
        .unwrap();
    }
    dir.to_path_buf()
}

/// A MobileNetV2 weights file of seeded random values; `bump` changes one value of the first
/// convolution.
fn write_weights(path: &Path, bump: f32) {
    let mut state = Backbone::random_state(BackboneKind::MobileNetV2, 4);
    let name = "features.0.0.weight";
    let mut values = state.f32(name, None).unwrap();
    values[0] += bump;
    let shape = state.shape(name).unwrap().to_vec();
    state.put_f32(name, &shape, values);
    write_state(&state, path).unwrap();
}

#[test]
fn changed_model_bytes_and_other_weights_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let train = write_images(&root.join("train"), 6, 4.0);
    let probe = write_images(&root.join("probe"), 2, 4.0);
    let weights = root.join("mobilenet_v2.safetensors");
    write_weights(&weights, 0.0);
    let model = root.join("m.vigil");
    let method = format!("padim:weights={}", s(&weights));
    ok(&["fit", "-m", &method, "--train", s(&train), "-o", s(&model), "--threshold", "max"]);
    let predict = |out: &str, extra: &[&str]| {
        let out = root.join(out);
        let mut args = vec!["predict", "--model", s(&model), "-o", s(&out), s(&probe)];
        args.extend_from_slice(extra);
        args.into_iter().map(String::from).collect::<Vec<_>>()
    };
    ok(&predict("p0", &[]));

    // One flipped bit in the middle of the file (the tensors): refused, naming the file.
    let bytes = std::fs::read(&model).unwrap();
    let mut flipped = bytes.clone();
    flipped[bytes.len() / 2] ^= 0x01;
    std::fs::write(&model, &flipped).unwrap();
    let err = fails(&predict("p1", &[]));
    assert!(err.contains("m.vigil") && err.contains("checksum"), "{err}");
    std::fs::write(&model, &bytes).unwrap();

    // The weights file changed in one value: refused naming it (both digests), unless allowed.
    write_weights(&weights, 0.25);
    let err = fails(&predict("p2", &[]));
    assert!(
        err.contains("m.vigil")
            && err.contains("mobilenet_v2.safetensors")
            && err.contains("--allow-other-weights"),
        "{err}"
    );
    let (_, warning) = ok(&predict("p3", &["--allow-other-weights"]));
    assert!(warning.contains("warning") && warning.contains("mobilenet_v2.safetensors"), "{warning}");
}

#[test]
fn one_checkpoint_folder_for_two_classes_refuses_the_second() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let class_a = write_images(&root.join("class-a"), 5, 3.0);
    let class_b = write_images(&root.join("class-b"), 5, 7.0);
    let ckpt = root.join("ckpt");
    let method = "draem:steps=4,image_size=32,batch=2,checkpoint_every=2";
    let fit = |class: &Path, out: &str| {
        let out = root.join(out);
        [
            "fit",
            "-m",
            method,
            "--train",
            s(class),
            "-o",
            s(&out),
            "--checkpoint-dir",
            s(&ckpt),
            "--threshold",
            "max",
        ]
        .map(String::from)
    };
    let (_, said) = ok(&fit(&class_a, "a.vigil"));
    assert!(said.contains("training finished"), "{said}");
    let err = fails(&fit(&class_b, "b.vigil"));
    assert!(
        err.contains("draem-training.ckpt") && err.contains("class-a") && err.contains("class-b"),
        "{err}"
    );
    assert!(!root.join("b.vigil").exists());
    // The same fit as the first reuses the finished run, and says so.
    let (_, said) = ok(&fit(&class_a, "a2.vigil"));
    assert!(said.contains("holds a finished training"), "{said}");
}
