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
    let (xd, yd) = (xa.decimals(), ya.decimals());
    for t in xa.ticks() {
        let x = px(t);
        let _ = write!(
            s,
            r##"<line x1="{x:.1}" y1="{TOP}" x2="{x:.1}" y2="{:.1}" stroke="#e1e4e8"/><text x="{x:.1}" y="{:.1}" class="tick" text-anchor="middle">{t:.xd$}</text>"##,
            TOP + ph,
            TOP + ph + 16.0
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

    #[test]
    fn empty_and_non_finite_curves() {
        let s = curve_svg(&curve(vec![], None), 0).unwrap();
        assert!(s.contains("no data") && !s.contains("<polyline"));
        let e = curve_svg(&curve(vec![(0.0, f64::NAN)], None), 0).unwrap_err().to_string();
        assert!(e.contains("point 0") && e.contains("ROC <image>"), "{e}");
    }
}
