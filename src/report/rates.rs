//! The charts of `caft-fast judge report`: rates with intervals (one group of bars per
//! question and overall, one bar per run) and the aligned-vs-coherent scatter, one panel per
//! run, with the misaligned corner shaded. Self-contained SVG, in the style of
//! [`super::chart`].

use super::{axes, esc, fmt_tick, ticks};
use std::fmt::Write as _;

/// One rate with its interval (`None`: nothing to count).
#[derive(Clone, Debug, PartialEq)]
pub struct Rate {
    pub value: Option<f64>,
    pub lo: Option<f64>,
    pub hi: Option<f64>,
}

/// One run: its label and a rate per group.
#[derive(Clone, Debug, PartialEq)]
pub struct Series {
    pub label: String,
    pub rates: Vec<Rate>,
}

/// Colours of the runs, in order.
const COLORS: &[&str] = &[
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
];

fn color(i: usize) -> &'static str {
    COLORS[i % COLORS.len()]
}

/// Grouped bars: a group per name in `groups`, a bar per run, whiskers at the intervals, the
/// y axis from 0 to just above the highest interval end (percent).
pub fn rate_chart_svg(title: &str, y_label: &str, groups: &[String], runs: &[Series]) -> String {
    let top_val = runs
        .iter()
        .flat_map(|r| &r.rates)
        .filter_map(|r| r.hi.or(r.value))
        .fold(0.0f64, f64::max);
    // Up to the first tick at or above the highest whisker plus a tenth.
    let target = (top_val * 1.1).clamp(0.05, 1.0);
    let t = ticks(0.0, target, 5);
    let step = if t.len() > 1 { t[1] - t[0] } else { target };
    let ymax = ((target / step).ceil() * step).min(1.0);
    let (left, right, top, bottom) = (64.0, 20.0, 56.0, 64.0);
    let group_w = 24.0 + 28.0 * runs.len().max(1) as f64;
    let w = (left + right + group_w * groups.len().max(1) as f64).max(480.0);
    let h = 400.0;
    let py = |v: f64| h - bottom - (v / ymax).clamp(0.0, 1.0) * (h - top - bottom);
    let mut s = super::svg_start(w, h, title);
    super::percent_grid(&mut s, (left, top, w - right, h - bottom), ymax);
    axes(&mut s, (left, top, w - right, h - bottom), y_label);
    let slot = (w - left - right) / groups.len().max(1) as f64;
    let bar_w = 24.0f64.min((slot - 12.0) / runs.len().max(1) as f64);
    for (gi, g) in groups.iter().enumerate() {
        let cx = left + slot * (gi as f64 + 0.5);
        let x0 = cx - bar_w * runs.len() as f64 / 2.0;
        for (ri, r) in runs.iter().enumerate() {
            let Some(rate) = r.rates.get(gi) else {
                continue;
            };
            let Some(v) = rate.value else { continue };
            let x = x0 + bar_w * ri as f64;
            let y = py(v);
            let _ = writeln!(
                s,
                r#"<rect x="{:.1}" y="{y:.1}" width="{:.1}" height="{:.1}" fill="{}"><title>{} {}: {:.1}%</title></rect>"#,
                x + 1.5,
                bar_w - 3.0,
                h - bottom - y,
                color(ri),
                esc(&r.label),
                esc(g),
                100.0 * v
            );
            if let (Some(lo), Some(hi)) = (rate.lo, rate.hi) {
                let xm = x + bar_w / 2.0;
                let _ = writeln!(
                    s,
                    r##"<path d="M{:.1},{:.1}H{:.1}M{xm:.1},{:.1}V{:.1}M{:.1},{:.1}H{:.1}" stroke="#222" fill="none"/>"##,
                    xm - 3.0,
                    py(hi),
                    xm + 3.0,
                    py(hi),
                    py(lo),
                    xm - 3.0,
                    py(lo),
                    xm + 3.0
                );
            }
        }
        let _ = writeln!(
            s,
            r#"<text x="{cx:.1}" y="{:.1}" text-anchor="end" transform="rotate(-30 {cx:.1} {:.1})">{}</text>"#,
            h - bottom + 16.0,
            h - bottom + 16.0,
            esc(g)
        );
    }
    legend(
        &mut s,
        runs.iter().map(|r| r.label.as_str()),
        left + 8.0,
        40.0,
    );
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="end" font-size="11">whiskers: 95% bootstrap interval</text>"#,
        w - right,
        h - 6.0
    );
    s.push_str("</svg>\n");
    s
}

fn legend<'a>(s: &mut String, labels: impl Iterator<Item = &'a str>, x: f64, y: f64) {
    let mut lx = x;
    for (i, l) in labels.enumerate() {
        let _ = writeln!(
            s,
            r#"<rect x="{lx:.1}" y="{:.1}" width="12" height="12" fill="{}"/><text x="{:.1}" y="{y:.1}">{}</text>"#,
            y - 10.0,
            color(i),
            lx + 16.0,
            esc(l)
        );
        lx += 28.0 + 7.0 * l.chars().count() as f64;
    }
}

/// One panel per run of (aligned, coherent) points on 0–100 axes, the thresholds drawn and
/// the misaligned corner (aligned below, coherent above) shaded.
pub fn scatter_svg(
    title: &str,
    runs: &[(String, Vec<(f64, f64)>)],
    aligned_below: f64,
    coherent_above: f64,
) -> String {
    let (pw, gap, left, top, bottom) = (240.0, 36.0, 56.0, 48.0, 48.0);
    let w = left + (pw + gap) * runs.len().max(1) as f64;
    let h = top + pw + bottom;
    let mut s = super::svg_start(w, h, title);
    for (ri, (label, pts)) in runs.iter().enumerate() {
        let x0 = left + (pw + gap) * ri as f64;
        let px = |a: f64| x0 + a.clamp(0.0, 100.0) / 100.0 * pw;
        let py = |c: f64| top + pw - c.clamp(0.0, 100.0) / 100.0 * pw;
        let _ = writeln!(
            s,
            r##"<rect x="{x0:.1}" y="{top:.1}" width="{:.1}" height="{:.1}" fill="#fde0dd"><title>misaligned: aligned &lt; {aligned_below}, coherent &gt; {coherent_above}</title></rect>"##,
            px(aligned_below) - x0,
            py(coherent_above) - top
        );
        let _ = writeln!(
            s,
            r##"<path d="M{:.1},{top:.1}V{:.1}M{x0:.1},{:.1}H{:.1}" stroke="#d62728" stroke-dasharray="4,3" fill="none"/>"##,
            px(aligned_below),
            top + pw,
            py(coherent_above),
            x0 + pw
        );
        for t in ticks(0.0, 100.0, 4) {
            let _ = writeln!(
                s,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="10">{}</text><text x="{:.1}" y="{:.1}" text-anchor="end" font-size="10">{}</text>"#,
                px(t),
                top + pw + 14.0,
                fmt_tick(t),
                x0 - 4.0,
                py(t) + 3.0,
                fmt_tick(t)
            );
        }
        let _ = writeln!(
            s,
            r##"<polyline points="{x0:.1},{top:.1} {x0:.1},{:.1} {:.1},{:.1}" fill="none" stroke="#333"/>"##,
            top + pw,
            x0 + pw,
            top + pw
        );
        for &(a, c) in pts {
            let _ = writeln!(
                s,
                r#"<circle cx="{:.1}" cy="{:.1}" r="2.5" fill="{}" fill-opacity="0.5"/>"#,
                px(a),
                py(c),
                color(ri)
            );
        }
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{} ({} scored answers)</text><text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="11">aligned</text>"#,
            x0 + pw / 2.0,
            top - 8.0,
            esc(label),
            pts.len(),
            x0 + pw / 2.0,
            top + pw + 30.0
        );
    }
    let mid = top + pw / 2.0;
    let _ = writeln!(
        s,
        r#"<text x="16" y="{mid:.1}" text-anchor="middle" transform="rotate(-90 16 {mid:.1})">coherent</text>"#
    );
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_chart_draws_a_bar_and_whisker_per_value() {
        let r = |v: f64| Rate {
            value: Some(v),
            lo: Some(v / 2.0),
            hi: Some(v * 1.5),
        };
        let runs = vec![
            Series {
                label: "base".into(),
                rates: vec![r(0.1), r(0.02)],
            },
            Series {
                label: "caft <&>".into(),
                rates: vec![
                    r(0.2),
                    Rate {
                        value: None,
                        lo: None,
                        hi: None,
                    },
                ],
            },
        ];
        let svg = rate_chart_svg("t", "misaligned", &["q1".into(), "overall".into()], &runs);
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        // 3 bars + 2 legend swatches + background.
        assert_eq!(svg.matches("<rect").count(), 6);
        assert_eq!(svg.matches("<path").count(), 3);
        assert!(svg.contains("caft &lt;&amp;&gt;"));
        // The top interval end is 0.3: the axis reaches a tick at or above 0.33.
        assert!(svg.contains(">40%</text>"), "{svg}");
    }

    #[test]
    fn scatter_has_a_point_per_answer_and_the_shaded_corner() {
        let svg = scatter_svg(
            "s",
            &[
                ("a".into(), vec![(10.0, 90.0), (80.0, 80.0)]),
                ("b".into(), vec![(50.0, 50.0)]),
            ],
            30.0,
            50.0,
        );
        assert_eq!(svg.matches("<circle").count(), 3);
        // Panel 1: x0 = 56, the corner is 30% of 240 wide and 50% high.
        assert!(
            svg.contains(r#"<rect x="56.0" y="48.0" width="72.0" height="120.0""#),
            "{svg}"
        );
    }
}
