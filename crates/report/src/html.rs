//! One self-contained HTML report: no external assets or scripts, CSS inline, thumbnails as
//! base64 data URIs, curves as inline SVG. It opens offline and can be mailed as one file.

use std::fmt::Write;
use std::path::Path;

use image::codecs::jpeg::JpegEncoder;
use image::ImageFormat;
use vigil_core::model_file::write_atomic;
use vigil_core::{Result, Threshold, ThresholdLevel, VigilError};

use crate::colormap::turbo;
use crate::overlay::{encode_png, thumbnail, OUTLINE_COLOUR};
use crate::{base64, svg};

/// Thumbnails larger than this (either side) are shrunk before embedding, which keeps a report
/// of a few hundred images at a few megabytes.
pub const THUMBNAIL_MAX_SIDE: u32 = 160;

/// The decision threshold as the report shows it.
#[derive(Clone, Debug, PartialEq)]
pub struct ReportThreshold {
    /// How it was chosen, in words (e.g. the `Display` of a `ThresholdKind`).
    pub kind: String,
    /// What it applies to: `"image"` (image scores; the gallery then marks where it cuts the
    /// sorted images) or `"pixel"`.
    pub level: String,
    pub value: f64,
    /// The quantity compared with `value`, in words: "image score", or for a contrario methods
    /// "-log10 NFA of the most significant region". Item scores in the report are this quantity.
    pub quantity: String,
}

impl From<&Threshold> for ReportThreshold {
    fn from(t: &Threshold) -> Self {
        let level = match t.level {
            ThresholdLevel::Image => "image",
            ThresholdLevel::Pixel => "pixel",
        };
        ReportThreshold {
            kind: t.kind.to_string(),
            level: level.into(),
            value: t.value,
            quantity: format!("{level} score"),
        }
    }
}

/// A curve drawn as inline SVG.
#[derive(Clone, Debug, PartialEq)]
pub struct Curve {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    /// Drawn in the given order.
    pub points: Vec<(f64, f64)>,
    /// Draw the chance line y = x (ROC).
    pub diagonal: bool,
    /// Mark an x limit (the FPR limit of the PRO curve); the part beyond it is greyed out.
    pub x_max: Option<f64>,
}

impl Curve {
    pub fn new(
        title: impl Into<String>,
        x_label: impl Into<String>,
        y_label: impl Into<String>,
        points: impl IntoIterator<Item = (f64, f64)>,
        diagonal: bool,
        x_max: Option<f64>,
    ) -> Curve {
        Curve {
            title: title.into(),
            x_label: x_label.into(),
            y_label: y_label.into(),
            points: points.into_iter().collect(),
            diagonal,
            x_max,
        }
    }
}

/// One scored image.
#[derive(Clone, Debug, PartialEq)]
pub struct ReportItem {
    pub name: String,
    pub score: f64,
    /// Ground truth when known: `true` = anomalous.
    pub label: Option<bool>,
    /// The method's decision: `true` = anomalous.
    pub verdict: bool,
    /// PNG of the overlay; shrunk to [`THUMBNAIL_MAX_SIDE`] if larger.
    pub thumbnail_png: Vec<u8>,
    /// One more line under the thumbnail (e.g. the smallest log10 NFA).
    pub detail: Option<String>,
}

/// Everything one report shows. `Default` leaves every section empty.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ReportData {
    pub title: String,
    pub method: String,
    pub dataset: String,
    /// The method's settings as JSON text; shown pretty-printed when it parses.
    pub settings_json: String,
    pub threshold: Option<ReportThreshold>,
    /// (name, formatted value), shown in this order.
    pub metrics: Vec<(String, String)>,
    pub curves: Vec<Curve>,
    /// Shown sorted by score, highest first.
    pub items: Vec<ReportItem>,
    pub notes: Vec<String>,
    /// (stage, formatted duration).
    pub timings: Vec<(String, String)>,
}

/// Text safe inside HTML elements and quoted attributes.
pub(crate) fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            _ => out.push(c),
        }
    }
    out
}

/// Four significant digits, switching to scientific notation for very large or small values,
/// so scores of any method fit a thumbnail caption.
pub fn format_score(v: f64) -> String {
    let a = v.abs();
    if v == 0.0 {
        "0".into()
    } else if !(1e-3..1e5).contains(&a) {
        format!("{v:.3e}")
    } else {
        let decimals = (3 - a.log10().floor() as i32).max(0) as usize;
        format!("{v:.decimals$}")
    }
}

const STYLE: &str = "
*{box-sizing:border-box}
body{margin:0;font:14px/1.45 system-ui,-apple-system,'Segoe UI',Roboto,Helvetica,Arial,sans-serif;color:#1d2330;background:#f2f3f5}
header{background:#1d2330;color:#fff;padding:14px 24px}
header h1{margin:0 0 4px;font-size:22px}
header .sub{color:#c5cad3}
main{padding:16px 24px;max-width:1500px}
section{background:#fff;border-radius:8px;padding:12px 16px;margin-bottom:14px;box-shadow:0 1px 2px rgba(0,0,0,.08)}
h2{font-size:16px;margin:0 0 10px}
.row{display:flex;flex-wrap:wrap;gap:14px;align-items:flex-start}
.curves{margin-top:12px}
.stat{min-width:120px;padding:6px 12px;border-left:4px solid #9aa0a8}
.stat .v{font-size:24px;font-weight:600}
.stat .k{color:#5b6270;font-size:12px;text-transform:uppercase;letter-spacing:.04em}
.stat.bad{border-color:#c62828}.stat.good{border-color:#2e7d32}
table{border-collapse:collapse}
th,td{padding:4px 12px 4px 0;border-bottom:1px solid #e6e8eb;text-align:left;vertical-align:top}
td.n{text-align:right;font-variant-numeric:tabular-nums}
.thr{font-size:15px}.thr b{font-size:18px}
pre{background:#f6f7f9;padding:8px;border-radius:4px;overflow:auto;max-height:320px;margin:6px 0 0}
svg.curve{background:#fff;border:1px solid #e6e8eb;border-radius:6px}
svg .ctitle{font-size:14px;font-weight:600;fill:#1d2330}
svg .tick{font-size:11px;fill:#5b6270}
svg .axis{font-size:12px;fill:#1d2330}
svg .limit{font-size:11px}
.legend{display:flex;flex-wrap:wrap;gap:18px;align-items:center;margin-bottom:10px;color:#3b4250}
.bar{width:220px;height:14px;border:1px solid #9aa0a8;display:inline-block;vertical-align:middle;margin:0 6px}
.sw{display:inline-block;width:14px;height:14px;vertical-align:middle;margin-right:4px;border-radius:3px}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(192px,1fr));gap:10px}
.card{margin:0;border:3px solid #b9bec6;border-radius:7px;padding:6px;background:#fff}
.card.flag{border-color:#c62828;background:#fff6f6}
.card img{display:block;width:160px;max-width:100%;height:auto;margin:0 auto;image-rendering:pixelated}
.card .name{font-weight:600;font-size:12px;overflow-wrap:anywhere;margin-top:4px}
.card .line{display:flex;justify-content:space-between;align-items:center;gap:4px;margin-top:2px;white-space:nowrap}
.card .detail{color:#5b6270;font-size:12px}
.verdict{font-weight:700;font-size:12px;letter-spacing:.03em}
.verdict.flag{color:#c62828}.verdict.pass{color:#2e7d32}
.badge{font-size:12px;font-weight:700;padding:1px 6px;border-radius:4px;color:#fff}
.badge.ok{background:#2e7d32}.badge.wrong{background:#c62828}
.cut{grid-column:1/-1;border-top:2px dashed #c62828;color:#c62828;font-weight:600;padding-top:2px;font-size:13px}
ul{margin:4px 0;padding-left:20px}
";

/// The report as an HTML string.
pub fn render_html(data: &ReportData) -> Result<String> {
    let items = sorted_items(&data.items)?;
    let thumbnails =
        items.iter().map(|item| embeddable_thumbnail(item)).collect::<Result<Vec<(String, u32, u32)>>>()?;
    let curves =
        data.curves.iter().enumerate().map(|(i, c)| svg::curve_svg(c, i)).collect::<Result<Vec<String>>>()?;

    let mut h = String::with_capacity(4096 + thumbnails.iter().map(|t| t.0.len() + 400).sum::<usize>());
    // `write!` into a String cannot fail; the results are ignored for that reason
    let _ = write!(
        h,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><meta name=\"viewport\" content=\"width=device-width,initial-scale=1\"><title>{}</title><style>{STYLE}</style></head><body>",
        escape(&data.title)
    );
    let _ = write!(
        h,
        "<header><h1>{}</h1><div class=\"sub\">method <b>{}</b> · dataset <b>{}</b></div></header><main>",
        escape(&data.title),
        escape(&data.method),
        escape(&data.dataset)
    );
    summary_section(&mut h, data);
    if !data.metrics.is_empty() || !curves.is_empty() {
        h.push_str("<section><h2>Metrics</h2>");
        if !data.metrics.is_empty() {
            h.push_str("<table><tr><th>metric</th><th>value</th></tr>");
            for (name, value) in &data.metrics {
                let _ = write!(h, "<tr><td>{}</td><td class=\"n\">{}</td></tr>", escape(name), escape(value));
            }
            h.push_str("</table>");
        }
        if !curves.is_empty() {
            h.push_str("<div class=\"row curves\">");
            for c in &curves {
                h.push_str(c);
            }
            h.push_str("</div>");
        }
        h.push_str("</section>");
    }
    items_section(&mut h, data, &items, &thumbnails);
    details_section(&mut h, data);
    h.push_str("</main></body></html>\n");
    Ok(h)
}

/// Renders and writes the report atomically; an existing file is replaced only with `overwrite`.
pub fn write_html(path: &Path, data: &ReportData, overwrite: bool) -> Result<()> {
    let html = render_html(data).map_err(|e| VigilError::file(path, e.to_string()))?;
    write_atomic(path, html.as_bytes(), overwrite)
}

fn sorted_items(items: &[ReportItem]) -> Result<Vec<&ReportItem>> {
    if let Some(bad) = items.iter().find(|i| !i.score.is_finite()) {
        return Err(VigilError::invalid(format!(
            "report item {}: score {} is not finite",
            bad.name, bad.score
        )));
    }
    let mut sorted: Vec<&ReportItem> = items.iter().collect();
    // names break ties so the page is the same on every run
    sorted.sort_by(|a, b| b.score.total_cmp(&a.score).then_with(|| a.name.cmp(&b.name)));
    Ok(sorted)
}

/// Quality of the JPEG copy of a thumbnail: high enough that the 1-px outline survives.
const JPEG_QUALITY: u8 = 90;

/// A data URI of the thumbnail no larger than [`THUMBNAIL_MAX_SIDE`], with its size.
/// Overlays of textured images compress poorly as PNG (about 40 KB at 128×128), so the smaller
/// of PNG and JPEG is embedded, which keeps a few hundred thumbnails within a few megabytes.
/// Decoding also proves the bytes are an image, so the page never shows a broken one.
fn embeddable_thumbnail(item: &ReportItem) -> Result<(String, u32, u32)> {
    let decoded =
        image::load_from_memory_with_format(&item.thumbnail_png, ImageFormat::Png).map_err(|e| {
            VigilError::invalid(format!("report item {}: thumbnail is not a PNG: {e}", item.name))
        })?;
    let small = thumbnail(&decoded.to_rgb8(), THUMBNAIL_MAX_SIDE);
    let png = if small.dimensions() == (decoded.width(), decoded.height()) {
        item.thumbnail_png.clone()
    } else {
        encode_png(&small)?
    };
    let mut jpeg = Vec::new();
    JpegEncoder::new_with_quality(&mut jpeg, JPEG_QUALITY).encode_image(&small).map_err(|e| {
        VigilError::invalid(format!("report item {}: cannot encode thumbnail: {e}", item.name))
    })?;
    let uri = if jpeg.len() < png.len() {
        format!("data:image/jpeg;base64,{}", base64::encode(&jpeg))
    } else {
        format!("data:image/png;base64,{}", base64::encode(&png))
    };
    Ok((uri, small.width(), small.height()))
}

/// Correctness of a verdict against a known label.
fn outcome(item: &ReportItem) -> Option<(&'static str, bool, &'static str)> {
    item.label.map(|label| match (item.verdict, label) {
        (true, true) => ("TP", true, "true positive: flagged and anomalous"),
        (false, false) => ("TN", true, "true negative: passed and normal"),
        (true, false) => ("FP", false, "false positive: flagged but normal"),
        (false, true) => ("FN", false, "false negative: passed but anomalous"),
    })
}

fn stat(h: &mut String, value: &str, key: &str, class: &str) {
    let _ = write!(
        h,
        "<div class=\"stat {class}\"><div class=\"v\">{value}</div><div class=\"k\">{key}</div></div>"
    );
}

fn summary_section(h: &mut String, data: &ReportData) {
    h.push_str("<section><h2>Summary</h2><div class=\"row\">");
    let flagged = data.items.iter().filter(|i| i.verdict).count();
    stat(h, &data.items.len().to_string(), "images", "");
    stat(h, &flagged.to_string(), "flagged anomalous", if flagged > 0 { "bad" } else { "good" });
    let outcomes: Vec<_> = data.items.iter().filter_map(outcome).collect();
    if !outcomes.is_empty() {
        for (code, correct) in [("TP", true), ("FP", false), ("TN", true), ("FN", false)] {
            let n = outcomes.iter().filter(|o| o.0 == code).count();
            stat(h, &n.to_string(), code, if correct || n == 0 { "good" } else { "bad" });
        }
        let right = outcomes.iter().filter(|o| o.1).count();
        let accuracy = format!("{:.1}%", 100.0 * right as f64 / outcomes.len() as f64);
        stat(h, &accuracy, &format!("accuracy ({} labelled)", outcomes.len()), "");
    }
    h.push_str("</div>");
    match &data.threshold {
        Some(t) => {
            let _ = write!(
                h,
                "<p class=\"thr\">Decision threshold: {} &gt; <b>{}</b> is anomalous · chosen as <b>{}</b></p>",
                escape(&t.quantity),
                escape(&format_score(t.value)),
                escape(&t.kind)
            );
        }
        None => h.push_str("<p class=\"thr\">No decision threshold: verdicts were given by the caller.</p>"),
    }
    h.push_str("</section>");
}

fn colour_legend(h: &mut String) {
    let stops: Vec<String> = (0..=10)
        .map(|i| {
            let [r, g, b] = turbo(i as f32 / 10.0);
            format!("rgb({r},{g},{b}) {}%", i * 10)
        })
        .collect();
    let [r, g, b] = OUTLINE_COLOUR;
    let _ = write!(
        h,
        "<div class=\"legend\"><span>anomaly score: low<span class=\"bar\" style=\"background:linear-gradient(to right,{})\"></span>high</span><span><span class=\"sw\" style=\"background:rgb({r},{g},{b})\"></span>outline = predicted anomalous region</span><span><span class=\"sw\" style=\"border:3px solid #c62828\"></span>flagged anomalous</span><span><span class=\"sw\" style=\"border:3px solid #b9bec6\"></span>passed</span></div>",
        stops.join(",")
    );
}

fn items_section(
    h: &mut String,
    data: &ReportData,
    items: &[&ReportItem],
    thumbnails: &[(String, u32, u32)],
) {
    if items.is_empty() {
        return;
    }
    h.push_str("<section><h2>Images, most anomalous first</h2>");
    colour_legend(h);
    h.push_str("<div class=\"grid\">");
    // the cut line marks where the image threshold splits the sorted list
    let cut = data.threshold.as_ref().filter(|t| t.level == "image").map(|t| t.value);
    let mut cut_drawn = false;
    for (item, (uri, w, ht)) in items.iter().zip(thumbnails) {
        if let Some(value) = cut.filter(|&v| !cut_drawn && item.score <= v) {
            let _ = write!(
                h,
                "<div class=\"cut\">image threshold {}: the images below this line scored at or under it and passed</div>",
                escape(&format_score(value))
            );
            cut_drawn = true;
        }
        let name = escape(&item.name);
        let (class, verdict) = if item.verdict { ("flag", "ANOMALOUS") } else { ("pass", "NORMAL") };
        let _ = write!(
            h,
            "<figure class=\"card {class}\"><img src=\"{uri}\" width=\"{w}\" height=\"{ht}\" alt=\"{name}\"><figcaption><div class=\"name\" title=\"{name}\">{name}</div><div class=\"line\"><span>score {}</span><span class=\"verdict {class}\">{verdict}</span></div>",
            escape(&format_score(item.score))
        );
        if let Some((code, correct, meaning)) = outcome(item) {
            let (class, mark) = if correct { ("ok", "✓") } else { ("wrong", "✗") };
            let _ = write!(
                h,
                "<div class=\"line\"><span class=\"detail\">truth: {}</span><span class=\"badge {class}\" title=\"{meaning}\">{mark} {code}</span></div>",
                if item.label == Some(true) { "anomalous" } else { "normal" }
            );
        }
        if let Some(detail) = &item.detail {
            let _ = write!(h, "<div class=\"detail\">{}</div>", escape(detail));
        }
        h.push_str("</figcaption></figure>");
    }
    h.push_str("</div></section>");
}

fn details_section(h: &mut String, data: &ReportData) {
    h.push_str("<section><h2>Details</h2>");
    if !data.notes.is_empty() {
        h.push_str("<h3>Notes</h3><ul>");
        for note in &data.notes {
            let _ = write!(h, "<li>{}</li>", escape(note));
        }
        h.push_str("</ul>");
    }
    if !data.timings.is_empty() {
        h.push_str("<h3>Timings</h3><table>");
        for (stage, duration) in &data.timings {
            let _ = write!(h, "<tr><td>{}</td><td class=\"n\">{}</td></tr>", escape(stage), escape(duration));
        }
        h.push_str("</table>");
    }
    let settings = match serde_json::from_str::<serde_json::Value>(&data.settings_json) {
        Ok(v) => serde_json::to_string_pretty(&v).unwrap_or_else(|_| data.settings_json.clone()),
        Err(_) => data.settings_json.clone(),
    };
    if !settings.trim().is_empty() {
        let _ = write!(
            h,
            "<details><summary>Method settings</summary><pre>{}</pre></details>",
            escape(&settings)
        );
    }
    h.push_str("</section>");
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::RgbImage;
    use vigil_core::ThresholdKind;

    fn png(w: u32, h: u32) -> Vec<u8> {
        encode_png(&RgbImage::from_pixel(w, h, image::Rgb([200, 30, 30]))).unwrap()
    }

    fn item(name: &str, score: f64, label: Option<bool>, verdict: bool) -> ReportItem {
        ReportItem {
            name: name.into(),
            score,
            label,
            verdict,
            thumbnail_png: png(16, 16),
            detail: Some(format!("detail of {name}")),
        }
    }

    fn sample() -> ReportData {
        let threshold = Threshold {
            kind: ThresholdKind::Quantile { p: 0.99 },
            level: ThresholdLevel::Image,
            value: 0.5,
            n_samples: 20,
        };
        ReportData {
            title: "PIPED <test>".into(),
            method: "patchcore".into(),
            dataset: "piped/paper".into(),
            settings_json: r#"{"k":3,"backbone":"mobilenet_v2"}"#.into(),
            threshold: Some(ReportThreshold::from(&threshold)),
            metrics: vec![
                ("image AUROC".into(), "0.9731".into()),
                ("pixel AUPRO@0.3".into(), "0.8812".into()),
            ],
            curves: vec![
                Curve {
                    title: "ROC".into(),
                    x_label: "FPR".into(),
                    y_label: "TPR".into(),
                    points: vec![(0.0, 0.0), (0.2, 0.9), (1.0, 1.0)],
                    diagonal: true,
                    x_max: None,
                },
                Curve::new("PRO", "FPR", "PRO", [(0.0, 0.0), (0.3, 0.8)], false, Some(0.3)),
            ],
            items: vec![
                item("low_normal", 0.1, Some(false), false),
                item("top_defect", 2.5, Some(true), true),
                item("missed", 0.3, Some(true), false),
                item("false_alarm", 0.9, Some(false), true),
            ],
            notes: vec!["trained on 40 images".into()],
            timings: vec![("fit".into(), "1.2 s".into())],
        }
    }

    #[test]
    fn report_shows_metrics_threshold_curves_and_sorted_items() {
        let html = render_html(&sample()).unwrap();
        assert!(html.contains("PIPED &lt;test&gt;"));
        assert!(html.contains("image AUROC") && html.contains("0.9731") && html.contains("0.8812"));
        assert!(html.contains("0.99-quantile of normal validation scores"), "threshold kind shown");
        assert_eq!(html.matches("<svg").count(), 2);
        assert_eq!(html.matches("<img").count(), 4);
        let order: Vec<usize> = ["top_defect", "false_alarm", "missed", "low_normal"]
            .iter()
            .map(|n| html.find(&format!("alt=\"{n}\"")).unwrap())
            .collect();
        assert!(order.windows(2).all(|w| w[0] < w[1]), "sorted by score, highest first: {order:?}");
        // the threshold cut sits between the last flagged (0.9) and the first passed (0.3) image
        let cut = html.find("class=\"cut\"").unwrap();
        assert!(order[1] < cut && cut < order[2]);
        for code in ["✓ TP", "✗ FP", "✗ FN", "✓ TN"] {
            assert_eq!(html.matches(code).count(), 1, "{code}");
        }
        assert!(html.contains("50.0%"), "2 of 4 verdicts right");
        assert!(html.contains("&quot;backbone&quot;: &quot;mobilenet_v2&quot;"), "settings pretty-printed");
        assert_eq!(html.matches("http").count(), html.matches("http://www.w3.org/2000/svg").count());
        assert!(!html.contains("<script"));
    }

    #[test]
    fn large_thumbnails_are_shrunk_and_bad_ones_rejected() {
        let mut data = ReportData::default();
        data.items.push(ReportItem { thumbnail_png: png(640, 320), ..item("big", 1.0, None, true) });
        let html = render_html(&data).unwrap();
        assert!(html.contains("width=\"160\" height=\"80\""));
        assert!(html.contains("ANOMALOUS") && !html.contains("badge ok"));
        data.items
            .push(ReportItem { thumbnail_png: b"not a png".to_vec(), ..item("broken", 0.5, None, false) });
        let e = render_html(&data).unwrap_err().to_string();
        assert!(e.contains("broken") && e.contains("not a PNG"), "{e}");
        data.items.pop();
        data.items.push(item("nan", f64::NAN, None, false));
        assert!(render_html(&data).unwrap_err().to_string().contains("nan"));
    }

    #[test]
    fn textured_thumbnails_are_embedded_compactly() {
        // a speckled texture, like paper under a heatmap, compresses poorly as PNG
        let speckle = RgbImage::from_fn(128, 128, |x, y| {
            let v = ((x * 7919 + y * 104729) ^ (x * y * 31)) % 251;
            image::Rgb([v as u8, (v * 3 % 251) as u8, (v * 7 % 251) as u8])
        });
        let mut data = ReportData::default();
        data.items
            .push(ReportItem { thumbnail_png: encode_png(&speckle).unwrap(), ..item("t", 1.0, None, true) });
        data.items.push(item("flat", 0.5, None, false));
        let html = render_html(&data).unwrap();
        assert_eq!(html.matches("data:image/jpeg;base64,").count(), 1);
        assert_eq!(html.matches("data:image/png;base64,").count(), 1, "flat image stays PNG");
        let png_b64_len = encode_png(&speckle).unwrap().len() * 4 / 3;
        assert!(html.len() < png_b64_len, "{} vs {png_b64_len}", html.len());
    }

    #[test]
    fn write_html_is_atomic_and_refuses_to_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("report.html");
        write_html(&path, &sample(), false).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with("<!DOCTYPE html>") && text.trim_end().ends_with("</html>"));
        assert!(write_html(&path, &sample(), false).unwrap_err().to_string().contains("--overwrite"));
        write_html(&path, &sample(), true).unwrap();
    }

    #[test]
    fn scores_are_formatted_for_any_magnitude() {
        assert_eq!(format_score(0.0), "0");
        assert_eq!(format_score(0.123456), "0.1235");
        assert_eq!(format_score(12.3456), "12.35");
        assert_eq!(format_score(-3.0), "-3.000");
        assert_eq!(format_score(1234567.0), "1.235e6");
        assert_eq!(format_score(0.00001234), "1.234e-5");
    }
}
