//! `vigil predict --list FILE --shard I/N --resume`: shards of a list concatenate to the whole run,
//! and a resumed run scores only what an interrupted one left.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use rand::{Rng, SeedableRng};

const SIZE: u32 = 40;
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

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Grey noise with, in every third image, a dark square.
fn write_image(rng: &mut rand_chacha::ChaCha8Rng, path: &Path, spot: bool) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let img = image::GrayImage::from_fn(SIZE, SIZE, |x, y| {
        let dark = spot && (10..18).contains(&x) && (12..20).contains(&y);
        image::Luma([if dark { 20 } else { rng.gen_range(110..146) }])
    });
    img.save(path).unwrap();
}

/// Rows of a score table without the header, split on commas (no field here holds one).
fn rows(out: &Path) -> Vec<Vec<String>> {
    let text = std::fs::read_to_string(out.join("scores.csv")).unwrap();
    text.lines().skip(1).map(|l| l.split(',').map(str::to_string).collect()).collect()
}

/// The columns that do not name the output folder: path, status, score, verdict, threshold, size,
/// anomalous pixels and the decided value.
fn content(rows: &[Vec<String>]) -> Vec<Vec<String>> {
    rows.iter().map(|r| r[..8].iter().chain(&r[11..]).cloned().collect()).collect()
}

struct Job {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    model: PathBuf,
    list: PathBuf,
    images: Vec<PathBuf>,
}

fn job() -> Job {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_path_buf();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
    for i in 0..10 {
        write_image(&mut rng, &root.join(format!("train/{i:02}.png")), false);
    }
    let images: Vec<PathBuf> = (0..11)
        .map(|i| {
            let p = root.join(format!("new/{}/{i:02}.png", if i % 2 == 0 { "line-a" } else { "line-b" }));
            write_image(&mut rng, &p, i % 3 == 0);
            p
        })
        .collect();
    let list = root.join("list.txt");
    let text: String = images.iter().map(|p| format!("{}\n", p.display())).collect();
    std::fs::write(&list, format!("# images of two lines\n{text}")).unwrap();
    let model = root.join("m.vigil");
    ok(&["fit", "-m", METHOD, "--train", s(&root.join("train")), "-o", s(&model), "--threshold", "max"]);
    Job { _tmp: tmp, root, model, list, images }
}

#[test]
fn four_shards_concatenated_are_the_whole_run() {
    let j = job();
    let all = j.root.join("all");
    let out = ok(&["predict", "--model", s(&j.model), "--list", s(&j.list), "-o", s(&all)]);
    assert!(out.contains("scored 11 image(s)"), "{out}");
    let whole = rows(&all);
    assert_eq!(whole.iter().map(|r| PathBuf::from(&r[0])).collect::<Vec<_>>(), j.images);
    assert!(whole.iter().any(|r| r[3] == "anomalous") && whole.iter().any(|r| r[3] == "normal"), "{whole:?}");
    // Names keep the folders below the one the listed files share.
    assert!(all.join("maps/line-b/01.tiff").exists());

    let mut concatenated = Vec::new();
    for i in 0..4 {
        let part = j.root.join(format!("shard{i}"));
        ok(&[
            "predict",
            "--model",
            s(&j.model),
            "--list",
            s(&j.list),
            "--shard",
            &format!("{i}/4"),
            "-o",
            s(&part),
        ]);
        let part_rows = rows(&part);
        assert!((2..=3).contains(&part_rows.len()), "shard {i}: {part_rows:?}");
        for r in &part_rows {
            let name = Path::new(&r[8]).strip_prefix(&part).unwrap().to_path_buf();
            assert_eq!(std::fs::read(&r[8]).unwrap(), std::fs::read(all.join(&name)).unwrap(), "{name:?}");
        }
        concatenated.extend(part_rows);
    }
    assert_eq!(content(&concatenated), content(&whole));

    let err = fails(&[
        "predict",
        "--model",
        s(&j.model),
        "--list",
        s(&j.list),
        "--shard",
        "4/4",
        "-o",
        s(&j.root.join("x")),
    ]);
    assert!(err.contains("--shard must be I/N"), "{err}");
    let err = fails(&[
        "predict",
        "--model",
        s(&j.model),
        "--list",
        s(&j.root.join("none.txt")),
        "-o",
        s(&j.root.join("x")),
    ]);
    assert!(err.contains("none.txt") && err.contains("cannot read the image list"), "{err}");
}

#[test]
fn a_resumed_run_scores_only_what_the_interrupted_one_left() {
    let j = job();
    let full = j.root.join("full");
    ok(&["predict", "--model", s(&j.model), "--list", s(&j.list), "-o", s(&full)]);
    let whole = rows(&full);

    // An interrupted run: four rows written, the fifth cut short by the crash.
    let run = j.root.join("run");
    ok(&["predict", "--model", s(&j.model), "--list", s(&j.list), "-o", s(&run)]);
    let text = std::fs::read_to_string(run.join("scores.csv")).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let cut = &lines[5][..lines[5].len() / 2];
    std::fs::write(run.join("scores.csv"), format!("{}\n{cut}", lines[..5].join("\n"))).unwrap();
    // The files of every image are removed: those of the four done images must not come back.
    for folder in ["maps", "overlays", "masks"] {
        std::fs::remove_dir_all(run.join(folder)).unwrap();
    }
    let out = ok(&["predict", "--model", s(&j.model), "--list", s(&j.list), "-o", s(&run), "--resume"]);
    assert!(out.contains("scored 11 image(s) (4 of them scored by an earlier run)"), "{out}");
    assert_eq!(content(&rows(&run)), content(&whole));
    let maps: Vec<bool> = rows(&run).iter().map(|r| Path::new(&r[8]).exists()).collect();
    assert_eq!(maps, [vec![false; 4], vec![true; 7]].concat(), "only the images not yet scored are scored");
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("scores.json")).unwrap()).unwrap();
    let full_json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(full.join("scores.json")).unwrap()).unwrap();
    let strip = |v: &serde_json::Value| -> Vec<serde_json::Value> {
        v["images"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| serde_json::json!([r["path"], r["score"], r["decided_value"], r["anomalous"]]))
            .collect()
    };
    assert_eq!(strip(&json), strip(&full_json));

    // Nothing left: a second resume scores nothing new.
    let out = ok(&["predict", "--model", s(&j.model), "--list", s(&j.list), "-o", s(&run), "--resume"]);
    assert!(out.contains("scored 11 image(s) (11 of them scored by an earlier run)"), "{out}");

    // Another model's table is not continued.
    let other = j.root.join("other.vigil");
    ok(&[
        "fit",
        "-m",
        METHOD,
        "--train",
        s(&j.root.join("train")),
        "-o",
        s(&other),
        "--threshold",
        "quantile:0.5",
    ]);
    let err = fails(&["predict", "--model", s(&other), "--list", s(&j.list), "-o", s(&run), "--resume"]);
    assert!(err.contains("another model"), "{err}");
}
