//! One self-contained HTML report: no external assets or scripts, CSS inline, thumbnails as
//! base64 data URIs, curves as inline SVG. It opens offline and can be mailed as one file.

use std::fmt::Write;
use std::path::Path;

use vigil_core::model_file::write_atomic;
use vigil_core::{Result, Threshold, ThresholdLevel, VigilError};

use crate::colormap::turbo;
use crate::overlay::{OUTLINE_COLOUR, TRUTH_COLOUR};
use crate::pictures::{ItemPictures, Picture, LARGE_VIEW_MAX_SIDE};
use crate::svg;

/// Thumbnails are at most this many pixels on either side, which keeps the gallery of a few
/// hundred images light; the larger views opened on click are bounded by
/// [`crate::pictures::LARGE_VIEW_MAX_SIDE`].
pub const THUMBNAIL_MAX_SIDE: u32 = 160;

/// How the decided quantity is compared with the threshold value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Comparison {
    /// Anomalous when strictly above (score thresholds).
    Above,
    /// Anomalous when at or above (NFA thresholds: log10 NFA <= level, i.e. -log10 NFA >= -level).
    AtOrAbove,
}

impl Comparison {
    pub fn flags(self, quantity: f64, value: f64) -> bool {
        match self {
            Comparison::Above => quantity > value,
            Comparison::AtOrAbove => quantity >= value,
        }
    }

    fn symbol(self) -> &'static str {
        match self {
            Comparison::Above => "&gt;",
            Comparison::AtOrAbove => "&ge;",
        }
    }
}

/// The decision threshold as the report shows it.
#[derive(Clone, Debug, PartialEq)]
pub struct ReportThreshold {
    /// How it was chosen, in words (e.g. the `Display` of a `ThresholdKind`).
    pub kind: String,
    /// What it applies to: `"image"` (image scores; the gallery then marks where it cuts the
    /// sorted images) or `"pixel"`.
    pub level: String,
    /// The value the quantity is compared with, in the units of the quantity.
    pub value: f64,
    /// The quantity compared with `value`, in words: "image score", or for a contrario methods
    /// "-log10 NFA of the most significant region". Item scores in the report are this quantity.
    pub quantity: String,
    pub comparison: Comparison,
    /// The same decision in the method's own terms when the shown quantity is a transform of it
    /// (e.g. "log10 NFA ≤ -2").
    pub meaning: Option<String>,
    /// How many scores or held-out images it was computed from (0 when none were needed).
    pub samples: usize,
}

impl From<&Threshold> for ReportThreshold {
    /// Score thresholds decide `score > value`. NFA thresholds decide `log10 NFA <= level`; the
    /// report shows -log10 NFA so that larger is more anomalous, as for scores, which makes the
    /// decision `-log10 NFA >= -level`.
    fn from(t: &Threshold) -> Self {
        let level = match t.level {
            ThresholdLevel::Image => "image",
            ThresholdLevel::Pixel => "pixel",
        };
        let (quantity, value, comparison, meaning) = match t.log10_nfa_level() {
            Some(nfa_level) => (
                "-log10 NFA".to_string(),
                0.0 - nfa_level,
                Comparison::AtOrAbove,
                Some(format!("log10 NFA ≤ {}", format_level(nfa_level))),
            ),
            None => (format!("{level} score"), t.value, Comparison::Above, None),
        };
        ReportThreshold {
            kind: t.kind.to_string(),
            level: level.into(),
            value,
            quantity,
            comparison,
            meaning,
            samples: t.n_samples,
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
    /// The quantity the image threshold is applied to (see [`ReportThreshold::quantity`]).
    pub score: f64,
    /// Ground truth when known: `true` = anomalous.
    pub label: Option<bool>,
    /// The method's decision: `true` = anomalous.
    pub verdict: bool,
    /// Original, heatmap and overlay, as thumbnails and larger views.
    pub pictures: ItemPictures,
    /// One more line under the thumbnails (e.g. the raw image score).
    pub detail: Option<String>,
}

/// Pixel-level figures of one defect kind at the pixel threshold, over its images with a
/// ground-truth mask holding defect pixels.
#[derive(Clone, Debug, PartialEq)]
pub struct KindPixels {
    /// Images with a non-empty ground-truth mask.
    pub masked_images: usize,
    /// Of those, images where at least one ground-truth pixel was flagged.
    pub detected_images: usize,
    pub recall: f64,
    pub precision: f64,
    /// Mean per-image IoU of predicted and true regions.
    pub miou: f64,
}

/// One row of the per-defect-kind table (MVTec-style test sub-folder = kind).
#[derive(Clone, Debug, PartialEq)]
pub struct KindRow {
    pub kind: String,
    pub images: usize,
    /// Images of this kind known to be anomalous (the rest are normal or unlabelled).
    pub anomalous: usize,
    pub flagged: usize,
    /// Mean of the shown score (the thresholded quantity).
    pub mean_score: f64,
    pub pixels: Option<KindPixels>,
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
    /// (name, formatted value) of the model: method, seed, image counts, thresholds, weights,
    /// version; shown in this order.
    pub model: Vec<(String, String)>,
    /// (name, formatted value), shown in this order.
    pub metrics: Vec<(String, String)>,
    pub curves: Vec<Curve>,
    pub kinds: Vec<KindRow>,
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

/// A threshold value: whole numbers (NFA levels such as 0 or 2) bare, anything else as a score.
fn format_level(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e6 {
        format!("{v:.0}")
    } else {
        format_score(v)
    }
}

const STYLE: &str = "
*{box-sizing:border-box}
html{scroll-behavior:auto}
body{margin:0;font:14px/1.45 system-ui,-apple-system,'Segoe UI',Roboto,Helvetica,Arial,sans-serif;color:#1d2330;background:#f2f3f5}
header{background:#1d2330;color:#fff;padding:14px 24px}
header h1{margin:0 0 4px;font-size:22px}
header .sub{color:#c5cad3}
main{padding:16px 24px;max-width:1500px}
section{background:#fff;border-radius:8px;padding:12px 16px;margin-bottom:14px;box-shadow:0 1px 2px rgba(0,0,0,.08)}
h2{font-size:16px;margin:0 0 10px}
h3{font-size:14px;margin:10px 0 6px}
.row{display:flex;flex-wrap:wrap;gap:14px;align-items:flex-start}
.curves{margin-top:12px}
.stat{min-width:120px;padding:6px 12px;border-left:4px solid #9aa0a8}
.stat .v{font-size:24px;font-weight:600}
.stat .k{color:#5b6270;font-size:12px;text-transform:uppercase;letter-spacing:.04em}
.stat.bad{border-color:#c62828}.stat.good{border-color:#2e7d32}
table{border-collapse:collapse}
th,td{padding:4px 12px 4px 0;border-bottom:1px solid #e6e8eb;text-align:left;vertical-align:top}
th.n,td.n{text-align:right;font-variant-numeric:tabular-nums}
td.mono{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px;overflow-wrap:anywhere}
.thr{font-size:15px}.thr b{font-size:18px}
.muted{color:#5b6270}
pre{background:#f6f7f9;padding:8px;border-radius:4px;overflow:auto;max-height:320px;margin:6px 0 0}
svg.curve{background:#fff;border:1px solid #e6e8eb;border-radius:6px}
svg .ctitle{font-size:14px;font-weight:600;fill:#1d2330}
svg .tick{font-size:11px;fill:#5b6270}
svg .axis{font-size:12px;fill:#1d2330}
svg .limit{font-size:11px}
.legend{display:flex;flex-wrap:wrap;gap:18px;align-items:center;margin-bottom:10px;color:#3b4250}
.bar{width:220px;height:14px;border:1px solid #9aa0a8;display:inline-block;vertical-align:middle;margin:0 6px}
.sw{display:inline-block;width:14px;height:14px;vertical-align:middle;margin-right:4px;border-radius:3px}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(390px,1fr));gap:10px}
.card{margin:0;border:3px solid #b9bec6;border-radius:7px;padding:6px;background:#fff}
.card.flag{border-color:#c62828;background:#fff6f6}
.card .views{display:grid;grid-template-columns:repeat(3,1fr);gap:4px;text-decoration:none;color:#5b6270;font-size:11px;text-align:center}
.card .views img{display:block;width:100%;height:auto;margin:0 auto 1px;background:#000}
.card .views:hover img{outline:2px solid #1f5fbf}
.card .name{font-weight:600;font-size:12px;overflow-wrap:anywhere;margin-top:4px}
.card .line{display:flex;justify-content:space-between;align-items:center;gap:4px;margin-top:2px;white-space:nowrap}
.card .detail{color:#5b6270;font-size:12px}
.verdict{font-weight:700;font-size:12px;letter-spacing:.03em}
.verdict.flag{color:#c62828}.verdict.pass{color:#2e7d32}
.badge{font-size:12px;font-weight:700;padding:1px 6px;border-radius:4px;color:#fff}
.badge.ok{background:#2e7d32}.badge.wrong{background:#c62828}
.cut{grid-column:1/-1;border-top:2px dashed #c62828;color:#c62828;font-weight:600;padding-top:2px;font-size:13px}
.view{display:none;position:fixed;inset:0;z-index:10;overflow:auto;padding:24px}
.view:target{display:block}
.view .shade{position:fixed;inset:0;background:rgba(12,15,22,.86)}
.view .box{position:relative;background:#fff;border-radius:8px;padding:12px 16px;max-width:1640px;margin:0 auto}
.view .top{display:flex;justify-content:space-between;gap:12px;align-items:baseline;margin-bottom:8px}
.view .close{font-weight:700;text-decoration:none;color:#1d2330;font-size:15px;white-space:nowrap}
.view .large{display:flex;flex-wrap:wrap;gap:10px}
.view figure{margin:0;flex:1 1 300px;max-width:512px}
.view figure img{display:block;width:100%;height:auto;background:#000}
img.px{image-rendering:pixelated}
.view figcaption{color:#5b6270;font-size:12px;text-align:center}
ul{margin:4px 0;padding-left:20px}
";

/// The report as an HTML string.
pub fn render_html(data: &ReportData) -> Result<String> {
    let items = sorted_items(&data.items)?;
    let curves =
        data.curves.iter().enumerate().map(|(i, c)| svg::curve_svg(c, i)).collect::<Result<Vec<String>>>()?;
    if let Some(t) = data.threshold.as_ref().filter(|t| !t.value.is_finite()) {
        return Err(VigilError::invalid(format!("report threshold {} is not finite", t.value)));
    }
    if let Some(k) = data.kinds.iter().find(|k| !k.mean_score.is_finite()) {
        return Err(VigilError::invalid(format!(
            "defect kind {}: mean score {} is not finite",
            k.kind, k.mean_score
        )));
    }

    let picture_bytes: usize = items
        .iter()
        .flat_map(|i| [&i.pictures.original, &i.pictures.heatmap, &i.pictures.overlay])
        .map(|v| v.small.bytes().len() + v.large.bytes().len())
        .sum();
    let mut h = String::with_capacity(16384 + picture_bytes * 4 / 3 + items.len() * 1500);
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
    histogram_section(&mut h, data);
    kinds_section(&mut h, data);
    if !data.metrics.is_empty() || !curves.is_empty() {
        h.push_str("<section><h2>Metrics</h2>");
        if !data.metrics.is_empty() {
            h.push_str("<table><tr><th>metric</th><th class=\"n\">value</th></tr>");
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
    items_section(&mut h, data, &items);
    model_section(&mut h, data);
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

/// "image score &gt; 0.5" or "-log10 NFA &ge; 2 (that is, log10 NFA ≤ -2)": exactly what is decided.
fn decision_rule(t: &ReportThreshold) -> String {
    let mut rule = format!(
        "{} {} <b>{}</b> is anomalous",
        escape(&t.quantity),
        t.comparison.symbol(),
        escape(&format_level(t.value))
    );
    if let Some(meaning) = &t.meaning {
        let _ = write!(rule, " (that is, {})", escape(meaning));
    }
    rule
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
            let samples = if t.samples > 0 { format!(" from {} samples", t.samples) } else { String::new() };
            let _ = write!(
                h,
                "<p class=\"thr\">Decision threshold: {} · chosen as <b>{}</b>{samples}</p>",
                decision_rule(t),
                escape(&t.kind)
            );
        }
        None => h.push_str("<p class=\"thr\">No decision threshold: verdicts were given by the caller.</p>"),
    }
    h.push_str("</section>");
}

fn histogram_section(h: &mut String, data: &ReportData) {
    if data.items.is_empty() {
        return;
    }
    let of = |label: Option<bool>| -> Vec<f64> {
        data.items.iter().filter(|i| i.label == label).map(|i| i.score).collect()
    };
    let series = [
        svg::Series { label: "normal", colour: "#2e7d32", values: of(Some(false)) },
        svg::Series { label: "anomalous", colour: "#c62828", values: of(Some(true)) },
        svg::Series { label: "unlabelled", colour: "#6b7280", values: of(None) },
    ];
    let threshold = data.threshold.as_ref().filter(|t| t.level == "image");
    let quantity = threshold.map_or("image score".to_string(), |t| t.quantity.clone());
    let line = threshold.map(|t| svg::ThresholdLine {
        value: t.value,
        label: format!("threshold {}", format_level(t.value)),
        equal_flagged: t.comparison == Comparison::AtOrAbove,
    });
    h.push_str("<section><h2>Score distribution</h2>");
    h.push_str(&svg::histogram_svg(&format!("Images by {quantity}"), &quantity, &series, line));
    if let Some(t) = threshold {
        let _ =
            write!(h, "<p class=\"muted\">Images right of the line are flagged: {}.</p>", decision_rule(t));
    }
    h.push_str("</section>");
}

fn kinds_section(h: &mut String, data: &ReportData) {
    if data.kinds.is_empty() {
        return;
    }
    let pixels = data.kinds.iter().any(|k| k.pixels.is_some());
    h.push_str("<section><h2>Defect kinds</h2><table><tr><th>kind</th><th class=\"n\">images</th><th class=\"n\">known anomalous</th><th class=\"n\">flagged</th><th class=\"n\">mean score</th>");
    if pixels {
        h.push_str("<th class=\"n\" title=\"images with at least one ground-truth pixel flagged, of the images with a non-empty mask\">defects detected</th><th class=\"n\">pixel recall</th><th class=\"n\">pixel precision</th><th class=\"n\">mIoU</th>");
    }
    h.push_str("</tr>");
    for k in &data.kinds {
        let share = if k.images > 0 { 100.0 * k.flagged as f64 / k.images as f64 } else { 0.0 };
        let _ = write!(
            h,
            "<tr><td>{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{} ({share:.0}%)</td><td class=\"n\">{}</td>",
            escape(&k.kind),
            k.images,
            k.anomalous,
            k.flagged,
            escape(&format_score(k.mean_score))
        );
        if pixels {
            match &k.pixels {
                Some(p) => {
                    let _ = write!(
                        h,
                        "<td class=\"n\">{} of {}</td><td class=\"n\">{:.4}</td><td class=\"n\">{:.4}</td><td class=\"n\">{:.4}</td>",
                        p.detected_images, p.masked_images, p.recall, p.precision, p.miou
                    );
                }
                None => h.push_str("<td class=\"n muted\">no mask</td><td></td><td></td><td></td>"),
            }
        }
        h.push_str("</tr>");
    }
    h.push_str("</table>");
    if pixels {
        h.push_str("<p class=\"muted\">Pixel figures at the pixel threshold over the kind's images with a non-empty ground-truth mask; mIoU is the mean of per-image IoU.</p>");
    }
    h.push_str("</section>");
}

fn colour_legend(h: &mut String, truth: bool) {
    let stops: Vec<String> = (0..=10)
        .map(|i| {
            let [r, g, b] = turbo(i as f32 / 10.0);
            format!("rgb({r},{g},{b}) {}%", i * 10)
        })
        .collect();
    let [r, g, b] = OUTLINE_COLOUR;
    let _ = write!(
        h,
        "<div class=\"legend\"><span>anomaly score: low<span class=\"bar\" style=\"background:linear-gradient(to right,{})\"></span>high</span><span><span class=\"sw\" style=\"background:rgb({r},{g},{b})\"></span>predicted anomalous region (outline)</span>",
        stops.join(",")
    );
    if truth {
        let [r, g, b] = TRUTH_COLOUR;
        let _ = write!(
            h,
            "<span><span class=\"sw\" style=\"background:rgb({r},{g},{b});border:1px solid #5b6270\"></span>ground-truth defect (outline just outside it)</span>"
        );
    }
    h.push_str("<span><span class=\"sw\" style=\"border:3px solid #c62828\"></span>flagged anomalous</span><span><span class=\"sw\" style=\"border:3px solid #b9bec6\"></span>passed</span><span class=\"muted\">click an image for a larger view</span></div>");
}

fn img(h: &mut String, picture: &Picture, alt: &str) {
    // small images shown enlarged keep sharp pixels; larger ones shown shrunk are smoothed, so
    // their 1-px outlines do not break into dashes
    let class =
        if picture.width().max(picture.height()) < LARGE_VIEW_MAX_SIDE / 2 { " class=\"px\"" } else { "" };
    let _ = write!(
        h,
        "<img{class} src=\"{}\" width=\"{}\" height=\"{}\" alt=\"{alt}\">",
        picture.data_uri(),
        picture.width(),
        picture.height()
    );
}

const VIEW_NAMES: [&str; 3] = ["original", "heatmap", "overlay"];

fn views(item: &ReportItem) -> [&crate::pictures::View; 3] {
    [&item.pictures.original, &item.pictures.heatmap, &item.pictures.overlay]
}

fn items_section(h: &mut String, data: &ReportData, items: &[&ReportItem]) {
    if items.is_empty() {
        return;
    }
    h.push_str("<section id=\"images\"><h2>Images, most anomalous first</h2>");
    colour_legend(h, items.iter().any(|i| i.pictures.truth_drawn));
    h.push_str("<div class=\"grid\">");
    // the cut line marks where the image threshold splits the sorted list
    let cut = data.threshold.as_ref().filter(|t| t.level == "image");
    let mut cut_drawn = false;
    for (index, item) in items.iter().enumerate() {
        if let Some(t) = cut.filter(|t| !cut_drawn && !t.comparison.flags(item.score, t.value)) {
            let under = match t.comparison {
                Comparison::Above => "at or under",
                Comparison::AtOrAbove => "under",
            };
            let _ = write!(
                h,
                "<div class=\"cut\">image threshold {}: the images below this line scored {under} it and passed</div>",
                escape(&format_level(t.value))
            );
            cut_drawn = true;
        }
        let name = escape(&item.name);
        let (class, verdict) = if item.verdict { ("flag", "ANOMALOUS") } else { ("pass", "NORMAL") };
        let _ = write!(
            h,
            "<figure class=\"card {class}\" id=\"item-{index}\"><a class=\"views\" href=\"#view-{index}\" title=\"larger view of {name}\">"
        );
        for (view, label) in views(item).into_iter().zip(VIEW_NAMES) {
            h.push_str("<span>");
            img(h, &view.small, &format!("{name}: {label}"));
            let _ = write!(h, "{label}</span>");
        }
        let _ = write!(
            h,
            "</a><figcaption><div class=\"name\" title=\"{name}\">{name}</div><div class=\"line\"><span>score {}</span><span class=\"verdict {class}\">{verdict}</span></div>",
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
    h.push_str("</div>");
    // larger views: hidden until their anchor is the URL's target (CSS only, no script); closing
    // goes back to the item's card, so the page stays where it was
    for (index, item) in items.iter().enumerate() {
        let name = escape(&item.name);
        let verdict = if item.verdict { "ANOMALOUS" } else { "NORMAL" };
        let _ = write!(
            h,
            "<div class=\"view\" id=\"view-{index}\"><a class=\"shade\" href=\"#item-{index}\" aria-label=\"close\"></a><div class=\"box\"><div class=\"top\"><span><b>{name}</b> · score {} · <span class=\"verdict {}\">{verdict}</span></span><a class=\"close\" href=\"#item-{index}\">close ✕</a></div><div class=\"large\">",
            escape(&format_score(item.score)),
            if item.verdict { "flag" } else { "pass" }
        );
        for (view, label) in views(item).into_iter().zip(VIEW_NAMES) {
            h.push_str("<figure>");
            img(h, &view.large, &format!("{name}: {label}, larger view"));
            let _ = write!(h, "<figcaption>{label}</figcaption></figure>");
        }
        h.push_str("</div></div></div>");
    }
    h.push_str("</section>");
}

fn model_section(h: &mut String, data: &ReportData) {
    let settings = match serde_json::from_str::<serde_json::Value>(&data.settings_json) {
        Ok(v) => serde_json::to_string_pretty(&v).unwrap_or_else(|_| data.settings_json.clone()),
        Err(_) => data.settings_json.clone(),
    };
    if data.model.is_empty() && settings.trim().is_empty() {
        return;
    }
    h.push_str("<section><h2>Model</h2>");
    if !data.model.is_empty() {
        h.push_str("<table>");
        for (name, value) in &data.model {
            let _ = write!(h, "<tr><td>{}</td><td class=\"mono\">{}</td></tr>", escape(name), escape(value));
        }
        h.push_str("</table>");
    }
    if !settings.trim().is_empty() {
        let _ = write!(
            h,
            "<details><summary>Method settings</summary><pre>{}</pre></details>",
            escape(&settings)
        );
    }
    h.push_str("</section>");
}

fn details_section(h: &mut String, data: &ReportData) {
    if data.notes.is_empty() && data.timings.is_empty() {
        return;
    }
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
    h.push_str("</section>");
}

#[cfg(test)]
mod tests {
    use super::*;
    use vigil_core::{Image, Map, Mask, ThresholdKind};

    /// Pictures of a `w`×`h` gray image with a hot square the prediction outlines and, for
    /// `truth`, a ground-truth square beside it.
    fn pictures(w: usize, h: usize, truth: bool) -> ItemPictures {
        let image = Image::new(w, h, 1, vec![0.5; w * h]).unwrap();
        let square = |x0: usize, x1: usize| {
            let data = (0..w * h).map(|i| (x0..x1).contains(&(i % w)) && (h / 4..h / 2).contains(&(i / w)));
            Mask::new(w, h, data.collect()).unwrap()
        };
        let predicted = square(w / 8, w / 3);
        let map =
            Map::new(w, h, predicted.data.iter().map(|&p| if p { 1.0 } else { 0.0 }).collect()).unwrap();
        let gt = square(w / 2, 3 * w / 4);
        ItemPictures::render(&image, &map, (0.0, 1.0), &predicted, truth.then_some(&gt)).unwrap()
    }

    fn item(name: &str, score: f64, label: Option<bool>, verdict: bool) -> ReportItem {
        ReportItem {
            name: name.into(),
            score,
            label,
            verdict,
            pictures: pictures(16, 16, label == Some(true)),
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
            model: vec![
                ("seed".into(), "7".into()),
                ("weights".into(), "mobilenet <v2>.safetensors sha256 ab12".into()),
            ],
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
            kinds: vec![
                KindRow {
                    kind: "good".into(),
                    images: 2,
                    anomalous: 0,
                    flagged: 1,
                    mean_score: 0.5,
                    pixels: None,
                },
                KindRow {
                    kind: "scratch & dent".into(),
                    images: 2,
                    anomalous: 2,
                    flagged: 1,
                    mean_score: 1.4,
                    pixels: Some(KindPixels {
                        masked_images: 2,
                        detected_images: 1,
                        recall: 0.25,
                        precision: 0.5,
                        miou: 0.125,
                    }),
                },
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

    /// The part of the page from `start` up to the next `</section>`.
    fn section<'a>(html: &'a str, start: &str) -> &'a str {
        let from = html.find(start).unwrap_or_else(|| panic!("no {start}"));
        let len = html[from..].find("</section>").unwrap();
        &html[from..from + len]
    }

    #[test]
    fn report_shows_metrics_threshold_curves_and_sorted_items() {
        let html = render_html(&sample()).unwrap();
        assert!(html.contains("PIPED &lt;test&gt;"));
        assert!(html.contains("image AUROC") && html.contains("0.9731") && html.contains("0.8812"));
        assert!(html.contains("0.99-quantile of normal validation scores"), "threshold kind shown");
        assert!(html.contains("image score &gt; <b>0.5000</b> is anomalous"), "decision rule");
        assert!(html.contains("from 20 samples"));
        // two curves and the histogram
        assert_eq!(html.matches("<svg").count(), 3);
        // three thumbnails and three larger views per item
        assert_eq!(html.matches("<img").count(), 4 * 6);
        let order: Vec<usize> = ["top_defect", "false_alarm", "missed", "low_normal"]
            .iter()
            .map(|n| html.find(&format!("alt=\"{n}: original\"")).unwrap())
            .collect();
        assert!(order.windows(2).all(|w| w[0] < w[1]), "sorted by score, highest first: {order:?}");
        // the threshold cut sits between the last flagged (0.9) and the first passed (0.3) image
        let cut = html.find("class=\"cut\"").unwrap();
        assert!(order[1] < cut && cut < order[2]);
        assert!(html.contains("scored at or under it"));
        for code in ["✓ TP", "✗ FP", "✗ FN", "✓ TN"] {
            assert_eq!(html.matches(code).count(), 1, "{code}");
        }
        assert!(html.contains("50.0%"), "2 of 4 verdicts right");
        assert!(html.contains("&quot;backbone&quot;: &quot;mobilenet_v2&quot;"), "settings pretty-printed");
        assert_eq!(html.matches("http").count(), html.matches("http://www.w3.org/2000/svg").count());
        assert!(!html.contains("<script") && !html.contains("<link") && !html.contains("src=\"http"));
    }

    #[test]
    fn every_item_opens_a_larger_view_of_its_three_pictures() {
        let data = sample();
        let html = render_html(&data).unwrap();
        for index in 0..data.items.len() {
            // the card links to its view, the view's close links go back to the card
            let card = section(&html, &format!("id=\"item-{index}\""));
            assert!(card.contains(&format!("href=\"#view-{index}\"")));
            let view_at = html.find(&format!("id=\"view-{index}\"")).unwrap();
            let view = &html[view_at..view_at + html[view_at..].find("</div></div></div>").unwrap()];
            assert_eq!(view.matches(&format!("href=\"#item-{index}\"")).count(), 2, "shade and close link");
            for label in VIEW_NAMES {
                assert!(view.contains(&format!("{label}, larger view\"")), "{label}");
            }
        }
        // the views are hidden until targeted: CSS only, no script
        assert!(html.contains(".view{display:none") && html.contains(".view:target{display:block}"));
        assert!(!html.contains("<script"));
        // larger views are bigger than thumbnails when the image is
        let mut big = sample();
        big.items =
            vec![ReportItem { pictures: pictures(1200, 600, true), ..item("big", 1.0, Some(true), true) }];
        let html = render_html(&big).unwrap();
        assert!(html.contains("width=\"160\" height=\"80\" alt=\"big: overlay\""));
        assert!(html.contains("<img src=\"data:image/jpeg;base64,"), "larger views are smoothed when shrunk");
        assert!(html.contains("width=\"512\" height=\"256\" alt=\"big: overlay, larger view\""));
        // the 16-px images of the sample are shown enlarged with sharp pixels
        assert_eq!(render_html(&sample()).unwrap().matches("<img class=\"px\"").count(), 4 * 6);
    }

    #[test]
    fn the_legend_names_the_ground_truth_outline_only_when_one_is_drawn() {
        let html = render_html(&sample()).unwrap();
        let legend = section(&html, "class=\"legend\"");
        assert!(legend.contains("predicted anomalous region") && legend.contains("ground-truth defect"));
        assert!(legend.contains("rgb(255,0,255)") && legend.contains("rgb(255,255,255)"));
        let mut normals_only = sample();
        normals_only.items.retain(|i| i.label == Some(false));
        let html = render_html(&normals_only).unwrap();
        assert!(!html.contains("ground-truth defect") && html.contains("predicted anomalous region"));
    }

    #[test]
    fn histogram_separates_normal_and_anomalous_at_the_threshold() {
        let html = render_html(&sample()).unwrap();
        let hist = section(&html, "<h2>Score distribution</h2>");
        assert!(hist.contains("normal (2)") && hist.contains("anomalous (2)"));
        assert!(!hist.contains("unlabelled"));
        assert!(hist.contains("class=\"threshold\"") && hist.contains("threshold 0.5000"));
        assert!(hist.contains("Images by image score"));
        // unlabelled images form their own group; a pixel threshold draws no image line
        let mut data = sample();
        data.items.push(item("unknown", 0.7, None, true));
        data.threshold.as_mut().unwrap().level = "pixel".into();
        let html = render_html(&data).unwrap();
        let hist = section(&html, "<h2>Score distribution</h2>");
        assert!(hist.contains("unlabelled (1)") && !hist.contains("class=\"threshold\""));
    }

    #[test]
    fn kind_table_lists_counts_scores_and_pixel_figures() {
        let html = render_html(&sample()).unwrap();
        let table = section(&html, "<h2>Defect kinds</h2>");
        assert!(table.contains("<td>good</td><td class=\"n\">2</td><td class=\"n\">0</td><td class=\"n\">1 (50%)</td><td class=\"n\">0.5000</td><td class=\"n muted\">no mask</td>"));
        assert!(table.contains("<td>scratch &amp; dent</td>"));
        assert!(table.contains("<td class=\"n\">1 of 2</td><td class=\"n\">0.2500</td><td class=\"n\">0.5000</td><td class=\"n\">0.1250</td>"));
        // without masks anywhere the pixel columns go
        let mut data = sample();
        data.kinds[1].pixels = None;
        let html = render_html(&data).unwrap();
        assert!(!section(&html, "<h2>Defect kinds</h2>").contains("pixel recall"));
        data.kinds[0].mean_score = f64::NAN;
        assert!(render_html(&data).unwrap_err().to_string().contains("good"));
    }

    #[test]
    fn model_details_are_listed_and_escaped() {
        let html = render_html(&sample()).unwrap();
        let model = section(&html, "<h2>Model</h2>");
        assert!(model.contains("<td>seed</td><td class=\"mono\">7</td>"));
        assert!(model.contains("mobilenet &lt;v2&gt;.safetensors sha256 ab12"));
        assert!(model.contains("Method settings"));
    }

    #[test]
    fn nfa_thresholds_say_exactly_what_is_decided() {
        let nfa = |kind, value| Threshold { kind, level: ThresholdLevel::Image, value, n_samples: 0 };
        let t = ReportThreshold::from(&nfa(ThresholdKind::Nfa { k: 2.0 }, 0.0));
        assert_eq!((t.value, t.comparison), (2.0, Comparison::AtOrAbove));
        assert!(t.comparison.flags(2.0, t.value) && !t.comparison.flags(1.99, t.value));
        let mut data = sample();
        data.threshold =
            Some(ReportThreshold { quantity: "-log10 NFA of the most significant region".into(), ..t });
        let html = render_html(&data).unwrap();
        assert!(
            html.contains("-log10 NFA of the most significant region &ge; <b>2</b> is anomalous (that is, log10 NFA ≤ -2)"),
            "{}",
            section(&html, "<h2>Summary</h2>")
        );
        assert!(!html.contains("&gt; <b>2</b>"));
        assert!(!html.contains("samples"), "no sample count for a theoretical NFA level");
        // an item exactly at the level is flagged, so the cut goes below it
        data.items = vec![item("at_level", 2.0, Some(true), true), item("under", 1.5, Some(false), false)];
        let html = render_html(&data).unwrap();
        let cut = html.find("class=\"cut\"").unwrap();
        assert!(html.find("alt=\"at_level: original\"").unwrap() < cut);
        assert!(cut < html.find("alt=\"under: original\"").unwrap());
        assert!(html.contains("scored under it and passed"));
        // NFA <= 1 reads as level 0; a calibrated level keeps its digits
        let t = ReportThreshold::from(&nfa(ThresholdKind::Nfa { k: 0.0 }, 0.0));
        assert_eq!((t.value, t.meaning.as_deref()), (0.0, Some("log10 NFA ≤ 0")));
        let t = ReportThreshold::from(&nfa(ThresholdKind::NfaCalibrated { k: 1.0 }, -3.25));
        assert_eq!((t.value, t.meaning.as_deref()), (3.25, Some("log10 NFA ≤ -3.250")));
        let score = ReportThreshold::from(&nfa(ThresholdKind::Max, 0.7));
        assert_eq!((score.comparison, score.meaning), (Comparison::Above, None));
    }

    #[test]
    fn non_finite_scores_and_thresholds_are_refused() {
        let mut data = ReportData::default();
        data.items.push(item("nan", f64::NAN, None, false));
        assert!(render_html(&data).unwrap_err().to_string().contains("nan"));
        let mut data = sample();
        data.threshold.as_mut().unwrap().value = f64::INFINITY;
        assert!(render_html(&data).unwrap_err().to_string().contains("not finite"));
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
        assert_eq!(format_level(-2.0), "-2");
        assert_eq!(format_level(0.5), "0.5000");
    }
}
