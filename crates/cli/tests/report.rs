//! The HTML report of `vigil test` end to end: `vigil fit` + `vigil test` on a tiny MVTec-style
//! set with two defect kinds (one with ground-truth masks, one without), then the page is read as
//! a QA engineer would: pictures per image with larger views, the score histogram, the per-kind
//! table, the model details and a decision sentence that says what is decided.

use std::path::Path;
use std::process::Command;

use rand::{Rng, SeedableRng};

/// Wider than the report's thumbnails (160 px) so thumbnails and larger views differ in size.
const WIDTH: u32 = 200;
const HEIGHT: u32 = 120;
/// The a contrario detector with training statistics: fast, and its default threshold is an NFA
/// level, the case whose decision sentence used to be wrong.
const METHOD: &str = "acontrario:statistics=training,scales=2,patch_size=7,components=8";

fn vigil(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_vigil"))
        .args(args)
        .env("VIGIL_NO_PROGRESS", "1")
        .output()
        .expect("vigil runs");
    assert!(
        out.status.success(),
        "vigil {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn texture(rng: &mut rand_chacha::ChaCha8Rng) -> image::RgbImage {
    image::RgbImage::from_fn(WIDTH, HEIGHT, |_, _| {
        let v = ((0.5 + rng.gen_range(-0.04f32..0.04)) * 255.0) as u8;
        image::Rgb([v, v, v])
    })
}

/// train/good (12), test/good (4), test/spot (4, dark squares, masks), test/dent (4, bright
/// squares, no ground-truth folder: image labels only).
fn make_dataset(root: &Path) {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
    for dir in ["train/good", "test/good", "test/spot", "test/dent", "ground_truth/spot"] {
        std::fs::create_dir_all(root.join(dir)).unwrap();
    }
    for i in 0..12 {
        texture(&mut rng).save(root.join(format!("train/good/{i:03}.png"))).unwrap();
    }
    for i in 0..4 {
        texture(&mut rng).save(root.join(format!("test/good/{i:03}.png"))).unwrap();
        for (kind, level) in [("spot", 15u8), ("dent", 250u8)] {
            let mut img = texture(&mut rng);
            let mut mask = image::GrayImage::new(WIDTH, HEIGHT);
            let (x0, y0) = (rng.gen_range(10..WIDTH - 30), rng.gen_range(10..HEIGHT - 30));
            for y in y0..y0 + 14 {
                for x in x0..x0 + 14 {
                    img.put_pixel(x, y, image::Rgb([level; 3]));
                    mask.put_pixel(x, y, image::Luma([255]));
                }
            }
            img.save(root.join(format!("test/{kind}/{i:03}.png"))).unwrap();
            if kind == "spot" {
                mask.save(root.join(format!("ground_truth/spot/{i:03}_mask.png"))).unwrap();
            }
        }
    }
}

/// The page from `start` up to the next `</section>`.
fn section<'a>(html: &'a str, start: &str) -> &'a str {
    let from = html.find(start).unwrap_or_else(|| panic!("the report has no {start}"));
    &html[from..from + html[from..].find("</section>").unwrap()]
}

#[test]
fn test_report_shows_pictures_histogram_kinds_model_and_the_exact_decision() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("cls");
    make_dataset(&data);
    let model = tmp.path().join("m.vigil");
    let out_dir = tmp.path().join("test");
    let s = |p: &Path| p.to_str().unwrap().to_string();
    vigil(&["fit", "-m", METHOD, "--train", &s(&data), "-o", &s(&model), "--seed", "5"]);
    vigil(&["test", "--model", &s(&model), "--data", &s(&data), "-o", &s(&out_dir)]);
    let html = std::fs::read_to_string(out_dir.join("report.html")).unwrap();
    let metrics: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out_dir.join("metrics.json")).unwrap()).unwrap();

    // one self-contained file
    assert!(!html.contains("<script") && !html.contains("<link") && !html.contains("src=\"http"));
    assert_eq!(html.matches("http").count(), html.matches("http://www.w3.org/2000/svg").count());

    // every image: original, heatmap and overlay as thumbnails (bounded to 160 px) and larger views
    let n = 12;
    for view in ["original", "heatmap", "overlay"] {
        assert_eq!(html.matches(&format!(": {view}\"")).count(), n, "{view} thumbnails");
        assert_eq!(html.matches(&format!(": {view}, larger view\"")).count(), n, "{view} larger views");
    }
    assert_eq!(html.matches("width=\"160\" height=\"96\"").count(), 3 * n, "thumbnails are resized");
    assert_eq!(html.matches("width=\"200\" height=\"120\"").count(), 3 * n, "larger views at full size here");
    for index in 0..n {
        assert!(
            html.contains(&format!("href=\"#view-{index}\""))
                && html.contains(&format!("id=\"view-{index}\""))
        );
    }
    // the ground truth of the masked kind is outlined, and the legend says in which colour
    let legend = section(&html, "class=\"legend\"");
    assert!(legend.contains("ground-truth defect") && legend.contains("rgb(255,255,255)"));
    assert!(legend.contains("predicted anomalous region") && legend.contains("rgb(255,0,255)"));

    // the decision sentence for an NFA threshold: log10 NFA <= level, shown as -log10 NFA >= -level
    let t = &metrics["image_threshold"]["kind"];
    assert_eq!((t["kind"].as_str(), t["k"].as_f64()), (Some("nfa"), Some(0.0)), "the default: NFA <= 1");
    let summary = section(&html, "<h2>Summary</h2>");
    assert!(
        summary.contains(
            "-log10 NFA of the most significant region &ge; <b>0</b> is anomalous (that is, log10 NFA ≤ 0)"
        ),
        "{summary}"
    );
    assert!(!summary.contains("&gt; <b>"), "no strict '>' for an NFA level");
    // and the gallery agrees with it: flagged images above the cut line, passed ones below
    let grid = &html[html.find("<div class=\"grid\">").unwrap()..html.find("class=\"view\"").unwrap()];
    let cut = grid.find("class=\"cut\"").unwrap_or(grid.len());
    assert!(!grid[..cut].contains(">NORMAL<") && !grid[cut..].contains(">ANOMALOUS<"));
    let flagged = metrics["images"].as_array().unwrap().iter().filter(|i| i["verdict"] == true).count();
    assert_eq!(grid[..cut].matches(">ANOMALOUS<").count(), flagged);

    // histogram of the thresholded quantity, normal vs anomalous, with the threshold line
    let hist = section(&html, "<h2>Score distribution</h2>");
    assert!(hist.contains("normal (4)") && hist.contains("anomalous (8)"), "{hist}");
    assert!(hist.contains("class=\"threshold\"") && hist.contains("Images by -log10 NFA"));
    assert!(hist.contains("class=\"bin\""));

    // per-kind table: counts, flags, pixel figures where masks exist
    let kinds = section(&html, "<h2>Defect kinds</h2>");
    for kind in ["dent", "good", "spot"] {
        assert!(kinds.contains(&format!("<tr><td>{kind}</td><td class=\"n\">4</td>")), "{kind}: {kinds}");
    }
    let row = |kind: &str| {
        let from = kinds.find(&format!("<tr><td>{kind}</td>")).unwrap();
        &kinds[from..from + kinds[from..].find("</tr>").unwrap()]
    };
    assert!(row("dent").contains("no mask") && row("good").contains("no mask"));
    assert!(row("spot").contains(" of 4</td>"), "{}", row("spot"));
    assert!(kinds.contains("pixel recall"));

    // model details
    let model_table = section(&html, "<h2>Model</h2>");
    for fact in [
        "<td>method</td><td class=\"mono\">acontrario</td>",
        "<td>seed</td><td class=\"mono\">5</td>",
        "<td>training images</td>",
        "<td>fitted on all images (no held-out set)</td><td class=\"mono\">no</td>",
        "<td>validation images</td>",
        "<td>image threshold</td>",
        "<td>pixel threshold</td>",
        "<td>pretrained weights</td>",
        &format!("vigil {}", env!("CARGO_PKG_VERSION")),
    ] {
        assert!(model_table.contains(fact), "{fact}: {model_table}");
    }
    let count = |key: &str| -> usize {
        let cell = format!("<td>{key}</td><td class=\"mono\">");
        let from = model_table.find(&cell).unwrap() + cell.len();
        model_table[from..from + model_table[from..].find('<').unwrap()].parse().unwrap()
    };
    assert_eq!(count("training images") + count("validation images"), 12);
}
