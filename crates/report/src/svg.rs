//! Curves (ROC, PR, PRO, ...) as inline SVG: axes with round-number ticks, labels, an optional
//! chance diagonal and an optional x limit (the FPR integration limit of the PRO curve).

use std::fmt::Write;

use vigil_core::{Result, VigilError};

use crate::html::{escape, Curve};

const WIDTH: f64 = 340.0;
const HEIGHT: f64 = 290.0;
const LEFT: f64 = 58.0;
const RIGHT: f64 = 18.0;
const TOP: f64 = 32.0;
const BOTTOM: f64 = 50.0;
/// Gap between the frame and the data range, so a curve at 0 or 1 does not hide in the frame.
const INSET: f64 = 6.0;
const TARGET_TICKS: f64 = 5.0;
const CURVE_COLOUR: &str = "#1f5fbf";
const LIMIT_COLOUR: &str = "#c0392b";

/// An axis spanning whole multiples of a 1-2-2.5-5 step.
struct Axis {
    lo: f64,
    hi: f64,
    step: f64,
}

impl Axis {
    fn covering(lo: f64, hi: f64) -> Axis {
        let (lo, hi) = if hi > lo {
            (lo, hi)
        } else if lo == 0.0 {
            (0.0, 1.0)
        } else {
            (lo - lo.abs() * 0.1, hi + hi.abs() * 0.1)
        };
        let raw = (hi - lo) / TARGET_TICKS;
        let magnitude = 10f64.powf(raw.log10().floor());
        let step = [1.0, 2.0, 2.5, 5.0, 10.0]
            .iter()
            .map(|m| m * magnitude)
            .find(|s| *s >= raw * (1.0 - 1e-9))
            .unwrap_or(10.0 * magnitude);
        let lo_t = (lo / step + 1e-9).floor() * step;
        let hi_t = (hi / step - 1e-9).ceil() * step;
        Axis { lo: lo_t, hi: hi_t, step }
    }

    fn ticks(&self) -> Vec<f64> {
        let n = ((self.hi - self.lo) / self.step).round() as usize;
        (0..=n).map(|i| self.lo + i as f64 * self.step).collect()
    }

    /// Decimals that print every tick exactly (0.25 needs two, 0.2 one).
    fn decimals(&self) -> usize {
        (0..=6)
            .find(|&d| {
                ((self.step * 10f64.powi(d as i32)).round() - self.step * 10f64.powi(d as i32)).abs() < 1e-6
            })
            .unwrap_or(6)
    }

    fn fraction(&self, v: f64) -> f64 {
        (v - self.lo) / (self.hi - self.lo)
    }
}

/// `id` keeps the clip path of each curve distinct within one page.
/// The tick lines and labels of both axes of a plot area at `top` (`pw` × `ph` pixels from `LEFT`),
/// shared by the curve plots and the histogram.
fn grid_lines(
    s: &mut String,
    (xa, ya): (&Axis, &Axis),
    (px, py): (&dyn Fn(f64) -> f64, &dyn Fn(f64) -> f64),
    (top, pw, ph): (f64, f64, f64),
) {
    let (xd, yd) = (xa.decimals(), ya.decimals());
    for t in xa.ticks() {
        let x = px(t);
        let _ = write!(
            s,
            r##"<line x1="{x:.1}" y1="{top}" x2="{x:.1}" y2="{:.1}" stroke="#e1e4e8"/><text x="{x:.1}" y="{:.1}" class="tick" text-anchor="middle">{t:.xd$}</text>"##,
            top + ph,
            top + ph + 16.0
        );
    }
    for t in ya.ticks() {
        let y = py(t);
        let _ = write!(
            s,
            r##"<line x1="{LEFT}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#e1e4e8"/><text x="{:.1}" y="{:.1}" class="tick" text-anchor="end">{t:.yd$}</text>"##,
            LEFT + pw,
            LEFT - 6.0,
            y + 4.0
        );
    }
}

pub(crate) fn curve_svg(curve: &Curve, id: usize) -> Result<String> {
    if let Some(i) = curve.points.iter().position(|(x, y)| !x.is_finite() || !y.is_finite()) {
        let (x, y) = curve.points[i];
        return Err(VigilError::invalid(format!(
            "curve \"{}\": point {i} ({x}, {y}) is not finite",
            curve.title
        )));
    }
    if let Some(limit) = curve.x_max.filter(|v| !v.is_finite()) {
        return Err(VigilError::invalid(format!("curve \"{}\": x limit {limit} is not finite", curve.title)));
    }
    let (mut x_lo, mut x_hi, mut y_lo, mut y_hi) = (0f64, 0f64, 0f64, 0f64);
    for &(x, y) in &curve.points {
        (x_lo, x_hi, y_lo, y_hi) = (x_lo.min(x), x_hi.max(x), y_lo.min(y), y_hi.max(y));
    }
    if let Some(limit) = curve.x_max {
        (x_lo, x_hi) = (x_lo.min(limit), x_hi.max(limit));
    }
    let (xa, ya) = (Axis::covering(x_lo, x_hi), Axis::covering(y_lo, y_hi));
    let (pw, ph) = (WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM);
    let px = |x: f64| LEFT + INSET + xa.fraction(x) * (pw - 2.0 * INSET);
    let py = |y: f64| TOP + INSET + (1.0 - ya.fraction(y)) * (ph - 2.0 * INSET);

    let mut s = String::new();
    let title = escape(&curve.title);
    // `write!` into a String cannot fail; the results are ignored for that reason
    let _ = write!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" class="curve" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{title}"><title>{title}</title>"#
    );
    let _ =
        write!(s, r#"<text x="{}" y="20" class="ctitle" text-anchor="middle">{title}</text>"#, WIDTH / 2.0);
    let _ = write!(
        s,
        r#"<clipPath id="plot{id}"><rect x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}"/></clipPath>"#
    );
    if let Some(limit) = curve.x_max.filter(|&l| l < xa.hi) {
        // grey out the part of the curve that does not count towards the area
        let x0 = px(limit);
        let _ = write!(
            s,
            r##"<rect x="{x0:.1}" y="{TOP}" width="{:.1}" height="{ph}" fill="#eceef1"/>"##,
            LEFT + pw - x0
        );
    }
    grid_lines(&mut s, (&xa, &ya), (&px, &py), (TOP, pw, ph));
    let _ = write!(
        s,
        r##"<rect x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}" fill="none" stroke="#4a5160"/>"##
    );
    if curve.diagonal {
        let (t0, t1) = (xa.lo.max(ya.lo), xa.hi.min(ya.hi));
        if t1 > t0 {
            let _ = write!(
                s,
                r##"<line x1="{:.1}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="#9aa0a8" stroke-dasharray="5 4"/>"##,
                px(t0),
                py(t0),
                px(t1),
                py(t1)
            );
        }
    }
    if let Some(limit) = curve.x_max {
        let x = px(limit);
        // near the right edge the label goes left of the line so it stays inside the frame
        let (label_x, anchor) = if x > LEFT + 0.7 * pw { (x - 4.0, "end") } else { (x + 4.0, "start") };
        let _ = write!(
            s,
            r##"<line x1="{x:.1}" y1="{TOP}" x2="{x:.1}" y2="{:.1}" stroke="{LIMIT_COLOUR}" stroke-width="1.5" stroke-dasharray="6 3"/><text x="{label_x:.1}" y="{:.1}" class="limit" fill="{LIMIT_COLOUR}" text-anchor="{anchor}">FPR limit {}</text>"##,
            TOP + ph,
            TOP + ph - 8.0,
            escape(&format!("{limit}"))
        );
    }
    if curve.points.is_empty() {
        let _ = write!(
            s,
            r#"<text x="{:.1}" y="{:.1}" class="tick" text-anchor="middle">no data</text>"#,
            LEFT + pw / 2.0,
            TOP + ph / 2.0
        );
    } else {
        // pixel-level ROC curves can hold millions of points; ones that land within half a
        // pixel of the last drawn point change nothing on screen and are skipped
        let mut points = String::new();
        let mut last: Option<(f64, f64)> = None;
        for (i, &(x, y)) in curve.points.iter().enumerate() {
            let (sx, sy) = (px(x), py(y));
            let close = last.is_some_and(|(lx, ly)| (sx - lx).abs() < 0.5 && (sy - ly).abs() < 0.5);
            if close && i + 1 < curve.points.len() {
                continue;
            }
            let _ = write!(points, "{sx:.1},{sy:.1} ");
            last = Some((sx, sy));
        }
        let _ = write!(
            s,
            r#"<polyline clip-path="url(#plot{id})" points="{}" fill="none" stroke="{CURVE_COLOUR}" stroke-width="2" stroke-linejoin="round"/>"#,
            points.trim_end()
        );
    }
    let _ = write!(
        s,
        r#"<text x="{:.1}" y="{:.1}" class="axis" text-anchor="middle">{}</text>"#,
        LEFT + pw / 2.0,
        HEIGHT - 10.0,
        escape(&curve.x_label)
    );
    let (lx, ly) = (16.0, TOP + ph / 2.0);
    let _ = write!(
        s,
        r#"<text x="{lx}" y="{ly:.1}" class="axis" text-anchor="middle" transform="rotate(-90 {lx} {ly:.1})">{}</text></svg>"#,
        escape(&curve.y_label)
    );
    Ok(s)
}

/// The threshold line of a histogram.
pub(crate) struct ThresholdLine {
    pub value: f64,
    pub label: String,
    /// Whether a value equal to the threshold is flagged (drawn right of the line).
    pub equal_flagged: bool,
}

/// One group of values in a histogram.
pub(crate) struct Series<'a> {
    pub label: &'a str,
    pub colour: &'a str,
    pub values: Vec<f64>,
}

const HIST_WIDTH: f64 = 620.0;
const HIST_HEIGHT: f64 = 300.0;
/// Room for the title and the legend above the plot.
const HIST_TOP: f64 = 52.0;
const HIST_MIN_BINS: usize = 10;
const HIST_MAX_BINS: usize = 40;
const THRESHOLD_COLOUR: &str = "#1d2330";

/// Bin count growing with the square root of the sample count, within [10, 40].
fn bin_count(n: usize) -> usize {
    ((n as f64).sqrt().ceil() as usize * 2).clamp(HIST_MIN_BINS, HIST_MAX_BINS)
}

/// A histogram of every series over shared bins, drawn as translucent overlapping bars so that
/// where two groups overlap shows; an optional vertical line marks the threshold. Empty series
/// are left out of the legend. Values must be finite.
pub(crate) fn histogram_svg(
    title: &str,
    x_label: &str,
    series: &[Series],
    threshold: Option<ThresholdLine>,
) -> String {
    let all = || series.iter().flat_map(|s| s.values.iter().copied());
    let n = all().count();
    let (mut lo, mut hi) = all().fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), v| (l.min(v), h.max(v)));
    if let Some(t) = &threshold {
        (lo, hi) = (lo.min(t.value), hi.max(t.value));
    }
    if !lo.is_finite() {
        (lo, hi) = (0.0, 1.0);
    }
    if hi <= lo {
        let pad = if lo == 0.0 { 0.5 } else { lo.abs() * 0.05 };
        (lo, hi) = (lo - pad, hi + pad);
    }
    let width = (hi - lo) / bin_count(n) as f64;
    if let Some(t) = &threshold {
        // a bin edge on the threshold, so that no bar straddles the line
        lo = t.value - ((t.value - lo) / width).ceil() * width;
    }
    let bins = (((hi - lo) / width).ceil() as usize).max(1);
    // the axis spans whole bins
    let hi = lo + bins as f64 * width;
    let bin_of = |v: f64| {
        let b = (((v - lo) / width).floor().max(0.0) as usize).min(bins - 1);
        // a value exactly at a threshold it does not reach goes left of the line, with the passed
        match &threshold {
            Some(t) if v == t.value && !t.equal_flagged && b > 0 => b - 1,
            _ => b,
        }
    };
    let counts: Vec<Vec<usize>> = series
        .iter()
        .map(|s| {
            let mut c = vec![0usize; bins];
            for &v in &s.values {
                c[bin_of(v)] += 1;
            }
            c
        })
        .collect();
    let max_count = counts.iter().flatten().copied().max().unwrap_or(0);

    let (xa, ya) = (Axis::covering(lo, hi), Axis::covering(0.0, max_count.max(5) as f64));
    let (pw, ph) = (HIST_WIDTH - LEFT - RIGHT, HIST_HEIGHT - HIST_TOP - BOTTOM);
    let px = |x: f64| LEFT + INSET + xa.fraction(x) * (pw - 2.0 * INSET);
    let py = |y: f64| HIST_TOP + (1.0 - ya.fraction(y)) * ph;

    let mut s = String::new();
    let title = escape(title);
    // `write!` into a String cannot fail; the results are ignored for that reason
    let _ = write!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" class="curve histogram" width="{HIST_WIDTH}" height="{HIST_HEIGHT}" viewBox="0 0 {HIST_WIDTH} {HIST_HEIGHT}" role="img" aria-label="{title}"><title>{title}</title><text x="{LEFT}" y="20" class="ctitle">{title}</text>"#
    );
    let mut legend_x = LEFT;
    for (serie, c) in series.iter().zip(&counts) {
        let total: usize = c.iter().sum();
        if total == 0 {
            continue;
        }
        let label = format!("{} ({total})", serie.label);
        let _ = write!(
            s,
            r#"<rect x="{legend_x:.1}" y="30" width="12" height="12" fill="{}" fill-opacity="0.55" stroke="{}"/><text x="{:.1}" y="40" class="axis">{}</text>"#,
            serie.colour,
            serie.colour,
            legend_x + 16.0,
            escape(&label)
        );
        legend_x += 28.0 + 7.0 * label.chars().count() as f64;
    }
    grid_lines(&mut s, (&xa, &ya), (&px, &py), (HIST_TOP, pw, ph));
    for (serie, c) in series.iter().zip(&counts) {
        for (b, &count) in c.iter().enumerate().filter(|(_, &count)| count > 0) {
            let (x0, x1) = (px(lo + b as f64 * width), px(lo + (b + 1) as f64 * width));
            let y = py(count as f64);
            let _ = write!(
                s,
                r#"<rect class="bin" x="{x0:.1}" y="{y:.1}" width="{:.1}" height="{:.1}" fill="{}" fill-opacity="0.55" stroke="{}"><title>{}: {count}</title></rect>"#,
                (x1 - x0).max(1.0),
                py(0.0) - y,
                serie.colour,
                serie.colour,
                escape(serie.label)
            );
        }
    }
    let _ = write!(
        s,
        r##"<rect x="{LEFT}" y="{HIST_TOP}" width="{pw}" height="{ph}" fill="none" stroke="#4a5160"/>"##
    );
    if let Some(ThresholdLine { value, label, .. }) = &threshold {
        let x = px(*value);
        let (label_x, anchor) = if x > LEFT + 0.7 * pw { (x - 4.0, "end") } else { (x + 4.0, "start") };
        let _ = write!(
            s,
            r##"<line class="threshold" x1="{x:.1}" y1="{HIST_TOP}" x2="{x:.1}" y2="{:.1}" stroke="{THRESHOLD_COLOUR}" stroke-width="2" stroke-dasharray="6 3"/><text x="{label_x:.1}" y="{:.1}" class="limit" fill="{THRESHOLD_COLOUR}" text-anchor="{anchor}">{}</text>"##,
            HIST_TOP + ph,
            HIST_TOP + 14.0,
            escape(label)
        );
    }
    let _ = write!(
        s,
        r#"<text x="{:.1}" y="{:.1}" class="axis" text-anchor="middle">{}</text>"#,
        LEFT + pw / 2.0,
        HIST_HEIGHT - 10.0,
        escape(x_label)
    );
    let (lx, ly) = (16.0, HIST_TOP + ph / 2.0);
    let _ = write!(
        s,
        r#"<text x="{lx}" y="{ly:.1}" class="axis" text-anchor="middle" transform="rotate(-90 {lx} {ly:.1})">images</text></svg>"#
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn curve(points: Vec<(f64, f64)>, x_max: Option<f64>) -> Curve {
        Curve {
            title: "ROC <image>".into(),
            x_label: "false positive rate".into(),
            y_label: "true positive rate".into(),
            points,
            diagonal: true,
            x_max,
        }
    }

    #[test]
    fn axes_use_round_steps() {
        let a = Axis::covering(0.0, 1.0);
        assert_eq!((a.lo, a.hi, a.step), (0.0, 1.0, 0.2));
        assert_eq!(a.ticks().len(), 6);
        assert_eq!(a.decimals(), 1);
        let b = Axis::covering(0.0, 0.93);
        assert_eq!((b.lo, b.hi), (0.0, 1.0));
        let c = Axis::covering(-3.0, 117.0);
        assert_eq!((c.lo, c.hi, c.step), (-25.0, 125.0, 25.0));
        assert_eq!(c.decimals(), 0);
        let d = Axis::covering(0.0, 0.25);
        assert_eq!(d.decimals(), 2); // step 0.05
        let flat = Axis::covering(2.0, 2.0);
        assert!(flat.lo < 2.0 && flat.hi > 2.0);
    }

    #[test]
    fn svg_has_polyline_labels_diagonal_and_limit() {
        let s = curve_svg(&curve(vec![(0.0, 0.0), (0.1, 0.8), (1.0, 1.0)], Some(0.3)), 7).unwrap();
        assert!(s.starts_with("<svg") && s.ends_with("</svg>"));
        assert!(s.contains("ROC &lt;image&gt;"), "title escaped");
        assert!(s.contains("false positive rate") && s.contains("true positive rate"));
        assert!(s.contains("<polyline clip-path=\"url(#plot7)\""));
        assert!(s.contains("stroke-dasharray=\"5 4\""), "diagonal");
        assert!(s.contains("FPR limit 0.3"));
        // the first point sits at the plot's lower-left corner
        assert!(s.contains(&format!("points=\"{:.1},{:.1} ", LEFT + INSET, HEIGHT - BOTTOM - INSET)));
    }

    #[test]
    fn dense_curves_are_thinned_to_screen_resolution() {
        let n = 100_000;
        let points: Vec<(f64, f64)> =
            (0..=n).map(|i| (i as f64 / n as f64, (i as f64 / n as f64).sqrt())).collect();
        let s = curve_svg(&curve(points, None), 0).unwrap();
        let drawn = s.split("points=\"").nth(1).unwrap().split('"').next().unwrap().split(' ').count();
        assert!(drawn > 100 && drawn < 2000, "{drawn} points drawn");
        // the last point is always kept: the curve reaches (1, 1), the plot's upper-right corner
        let end = format!("{:.1},{:.1}\"", WIDTH - RIGHT - INSET, TOP + INSET);
        assert!(s.contains(&end), "{end}");
    }

    fn line(value: f64, equal_flagged: bool) -> ThresholdLine {
        ThresholdLine { value, label: format!("threshold {value}"), equal_flagged }
    }

    /// (x of the bar's left edge, its width, count) of every bar of the given colour.
    fn bars(svg: &str, colour: &str) -> Vec<(f64, f64, usize)> {
        svg.match_indices("class=\"bin\"")
            .filter(|(at, _)| svg[*at..].split("fill=\"").nth(1).unwrap().starts_with(colour))
            .map(|(at, _)| {
                let rest = &svg[at..];
                let attr = |name: &str| -> f64 {
                    rest.split(&format!(" {name}=\""))
                        .nth(1)
                        .unwrap()
                        .split('"')
                        .next()
                        .unwrap()
                        .parse()
                        .unwrap()
                };
                let count = rest.split("<title>").nth(1).unwrap().split("</title>").next().unwrap();
                (attr("x"), attr("width"), count.rsplit(": ").next().unwrap().parse().unwrap())
            })
            .collect()
    }

    fn threshold_x(svg: &str) -> f64 {
        let at = svg.find("class=\"threshold\"").unwrap();
        svg[at..].split("x1=\"").nth(1).unwrap().split('"').next().unwrap().parse().unwrap()
    }

    #[test]
    fn bins_meet_the_threshold_and_values_on_it_fall_on_their_decided_side() {
        let values = vec![0.0, 0.33, 0.5, 0.5, 0.72, 1.0];
        for (equal_flagged, right) in [(false, 2), (true, 4)] {
            let series = [Series { label: "normal", colour: "#2e7d32", values: values.clone() }];
            let s = histogram_svg("t", "score", &series, Some(line(0.5, equal_flagged)));
            let x = threshold_x(&s);
            let bars = bars(&s, "#2e7d32");
            // no bar straddles the line: each starts at or right of it, or ends at or left of it
            let right_of = |b: &&(f64, f64, usize)| b.0 >= x - 0.11;
            assert!(bars.iter().all(|b| right_of(&b) || b.0 + b.1 <= x + 0.11), "{bars:?} vs line at {x}");
            let on_right: usize = bars.iter().filter(right_of).map(|b| b.2).sum();
            assert_eq!(on_right, right, "equal_flagged {equal_flagged}: {bars:?} vs {x}");
            assert_eq!(bars.iter().map(|b| b.2).sum::<usize>(), 6);
        }
    }

    #[test]
    fn histogram_counts_every_value_once_and_marks_the_threshold() {
        let normal = Series { label: "normal", colour: "#2e7d32", values: vec![0.1, 0.2, 0.2, 0.3] };
        let anomalous = Series { label: "anomalous", colour: "#c62828", values: vec![0.9, 1.0] };
        let none = Series { label: "unlabelled", colour: "#6b7280", values: vec![] };
        let s = histogram_svg("Scores", "image score", &[normal, anomalous, none], Some(line(0.5, false)));
        assert!(s.starts_with("<svg") && s.ends_with("</svg>"));
        // every value lands in exactly one bar: the bars' counts add up to the six values
        let counted: usize = s
            .split("<title>")
            .skip(2)
            .filter_map(|t| t.split("</title>").next()?.rsplit(": ").next()?.parse::<usize>().ok())
            .sum();
        assert_eq!(counted, 6);
        assert!(s.contains("normal (4)") && s.contains("anomalous (2)"));
        assert!(!s.contains("unlabelled"), "empty series left out of the legend");
        assert_eq!(s.matches("class=\"threshold\"").count(), 1);
        assert!(s.contains("threshold 0.5"));
        // the threshold line sits between the normal bars (left) and the anomalous bars (right)
        let x_of = |marker: &str| -> f64 {
            let at = s.find(marker).unwrap();
            let rest = &s[at..];
            rest.split("x1=\"")
                .nth(1)
                .or_else(|| rest.split("x=\"").nth(1))
                .unwrap()
                .split('"')
                .next()
                .unwrap()
                .parse()
                .unwrap()
        };
        let line = x_of("class=\"threshold\"");
        let bars: Vec<(f64, bool)> = s
            .match_indices("class=\"bin\"")
            .map(|(at, _)| {
                let x: f64 =
                    s[at..].split("x=\"").nth(1).unwrap().split('"').next().unwrap().parse().unwrap();
                (x, s[at..].split("fill=\"").nth(1).unwrap().starts_with("#c62828"))
            })
            .collect();
        assert!(bars.iter().all(|&(x, red)| if red { x > line } else { x < line }), "{bars:?} vs {line}");
    }

    #[test]
    fn histogram_of_one_value_or_none_is_still_drawn() {
        let one = Series { label: "normal", colour: "#2e7d32", values: vec![3.0, 3.0] };
        let s = histogram_svg("Scores", "score", &[one], None);
        assert_eq!(s.matches("class=\"bin\"").count(), 1);
        assert!(!s.contains("class=\"threshold\""));
        let s = histogram_svg("Scores", "score", &[], Some(line(2.0, true)));
        assert_eq!(s.matches("class=\"bin\"").count(), 0);
        assert_eq!(bin_count(0), HIST_MIN_BINS);
        assert_eq!(bin_count(10_000), HIST_MAX_BINS);
    }

    #[test]
    fn empty_and_non_finite_curves() {
        let s = curve_svg(&curve(vec![], None), 0).unwrap();
        assert!(s.contains("no data") && !s.contains("<polyline"));
        let e = curve_svg(&curve(vec![(0.0, f64::NAN)], None), 0).unwrap_err().to_string();
        assert!(e.contains("point 0") && e.contains("ROC <image>"), "{e}");
    }
}
