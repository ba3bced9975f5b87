//! The loss curve of a run as a standalone SVG: training loss per step (and a running mean when
//! there are many steps), validation loss where it was measured. Written by hand: a line chart
//! needs a few dozen lines of SVG, not a plotting library.

use super::{fmt_tick, ticks};
use std::fmt::Write;

/// Chart size and margins in SVG user units (pixels).
const W: f64 = 720.0;
const H: f64 = 420.0;
const LEFT: f64 = 64.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 36.0;
const BOTTOM: f64 = 48.0;

/// The SVG of `train` (step, loss) and `val` (step, loss) points under `title`.
/// Non-finite values are left out; with no finite point the chart says so.
pub fn loss_svg(title: &str, train: &[(u64, f64)], val: &[(u64, f64)]) -> String {
    let finite = |v: &[(u64, f64)]| -> Vec<(f64, f64)> {
        v.iter()
            .filter(|(_, y)| y.is_finite())
            .map(|&(x, y)| (x as f64, y))
            .collect()
    };
    let (tr, va) = (finite(train), finite(val));
    let mut s = super::svg_start(W, H, title);
    let all: Vec<&(f64, f64)> = tr.iter().chain(va.iter()).collect();
    if all.is_empty() {
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" text-anchor="middle">no finite loss recorded</text></svg>"#,
            W / 2.0,
            H / 2.0
        );
        return s;
    }
    let x_lo = all
        .iter()
        .map(|p| p.0)
        .fold(f64::INFINITY, f64::min)
        .min(1.0);
    let mut x_hi = all.iter().map(|p| p.0).fold(f64::NEG_INFINITY, f64::max);
    if x_hi <= x_lo {
        x_hi = x_lo + 1.0;
    }
    let mut y_lo = all.iter().map(|p| p.1).fold(f64::INFINITY, f64::min);
    let mut y_hi = all.iter().map(|p| p.1).fold(f64::NEG_INFINITY, f64::max);
    let pad = ((y_hi - y_lo) * 0.05).max(1e-3);
    y_lo = (y_lo - pad).max(0.0);
    y_hi += pad;
    let px = |x: f64| LEFT + (x - x_lo) / (x_hi - x_lo) * (W - LEFT - RIGHT);
    let py = |y: f64| H - BOTTOM - (y - y_lo) / (y_hi - y_lo) * (H - TOP - BOTTOM);

    // Axes, grid and ticks.
    for t in ticks(y_lo, y_hi, 6) {
        let y = py(t);
        let _ = writeln!(
            s,
            r##"<line x1="{LEFT}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#e4e4e4"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
            W - RIGHT,
            LEFT - 6.0,
            y + 4.0,
            fmt_tick(t)
        );
    }
    for t in ticks(x_lo, x_hi, 8) {
        let x = px(t);
        let _ = writeln!(
            s,
            r##"<line x1="{x:.1}" y1="{:.1}" x2="{x:.1}" y2="{:.1}" stroke="#999"/><text x="{x:.1}" y="{:.1}" text-anchor="middle">{}</text>"##,
            H - BOTTOM,
            H - BOTTOM + 5.0,
            H - BOTTOM + 18.0,
            fmt_tick(t)
        );
    }
    super::axes(
        &mut s,
        (LEFT, TOP, W - RIGHT, H - BOTTOM),
        "loss (mean cross-entropy per token)",
    );
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">optimizer step</text>"#,
        (LEFT + W - RIGHT) / 2.0,
        H - 10.0
    );

    let poly = |pts: &[(f64, f64)]| -> String {
        pts.iter()
            .map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y)))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let mut legend: Vec<(&str, &str)> = Vec::new();
    if !tr.is_empty() {
        // Many noisy steps: draw them faint and a running mean over a window of ~2% bold.
        let window = (tr.len() / 50).max(1);
        if window > 1 {
            let _ = writeln!(
                s,
                r##"<polyline points="{}" fill="none" stroke="#9ecae1" stroke-width="1"/>"##,
                poly(&tr)
            );
            let smooth: Vec<(f64, f64)> = (0..tr.len())
                .map(|i| {
                    let lo = i.saturating_sub(window - 1);
                    let m = tr[lo..=i].iter().map(|p| p.1).sum::<f64>() / (i + 1 - lo) as f64;
                    (tr[i].0, m)
                })
                .collect();
            let _ = writeln!(
                s,
                r##"<polyline points="{}" fill="none" stroke="#1f77b4" stroke-width="2"/>"##,
                poly(&smooth)
            );
            legend.push(("#1f77b4", "training loss (running mean)"));
        } else {
            let _ = writeln!(
                s,
                r##"<polyline points="{}" fill="none" stroke="#1f77b4" stroke-width="2"/>"##,
                poly(&tr)
            );
            legend.push(("#1f77b4", "training loss"));
        }
    }
    if !va.is_empty() {
        let _ = writeln!(
            s,
            r##"<polyline points="{}" fill="none" stroke="#d62728" stroke-width="2" stroke-dasharray="5,3"/>"##,
            poly(&va)
        );
        for &(x, y) in &va {
            let _ = writeln!(
                s,
                r##"<circle cx="{:.1}" cy="{:.1}" r="3" fill="#d62728"/>"##,
                px(x),
                py(y)
            );
        }
        legend.push(("#d62728", "validation loss"));
    }
    for (i, (color, label)) in legend.iter().enumerate() {
        let y = TOP + 8.0 + 16.0 * i as f64;
        let x = W - RIGHT - 210.0;
        let _ = writeln!(
            s,
            r#"<line x1="{x:.1}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="{color}" stroke-width="2"/><text x="{:.1}" y="{:.1}">{label}</text>"#,
            x + 22.0,
            x + 28.0,
            y + 4.0
        );
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round_and_cover_the_range() {
        assert_eq!(ticks(0.0, 10.0, 5), vec![0.0, 2.0, 4.0, 6.0, 8.0, 10.0]);
        let t = ticks(2.31, 2.97, 6);
        assert!(
            t.len() >= 3 && t[0] >= 2.31 && *t.last().unwrap() <= 2.97,
            "{t:?}"
        );
    }

    #[test]
    fn svg_has_both_curves_and_skips_nan() {
        let tr: Vec<(u64, f64)> = (1..=10).map(|s| (s, 3.0 / s as f64)).collect();
        let va = vec![(5, 0.9), (10, f64::NAN)];
        let svg = loss_svg("run <x>", &tr, &va);
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("run &lt;x&gt;"));
        assert_eq!(
            svg.matches("<circle").count(),
            1,
            "the NaN point is left out"
        );
        assert!(svg.contains("validation loss") && svg.contains("training loss"));
        assert!(!svg.contains("NaN"));
        assert!(loss_svg("t", &[], &[]).contains("no finite loss"));
    }
}
