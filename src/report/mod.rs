//! What people look at: the loss curve of a run, the accuracy chart of evaluations (one run each, or arms repeated over seeds), and the
//! pieces every SVG and HTML output shares (axis ticks, text escaping). Written by hand: a
//! line or bar chart needs a few dozen lines of SVG, not a plotting library.

pub mod chart;
pub mod loss;
pub mod rates;
pub mod seeds;

/// "Nice" tick values covering `[lo, hi]` (steps of 1, 2 or 5 times a power of ten).
pub fn ticks(lo: f64, hi: f64, want: usize) -> Vec<f64> {
    let span = (hi - lo).max(1e-12);
    let raw = span / want.max(1) as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag);
    let first = (lo / step).ceil() * step;
    (0..)
        .map(|i| first + i as f64 * step)
        .take_while(|t| *t <= hi + step * 1e-9)
        .collect()
}

/// A tick label: short, without trailing zeros, scientific for very large or small values.
pub fn fmt_tick(t: f64) -> String {
    if t == 0.0 {
        "0".into()
    } else if t.abs() >= 1000.0 || t.abs() < 0.01 {
        format!("{t:.1e}")
    } else {
        let s = format!("{t:.3}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

/// A `w x h` SVG document opened with a white background and `title` centred on top (the
/// caller appends the content and `</svg>`).
pub fn svg_start(w: f64, h: f64, title: &str) -> String {
    format!(
        concat!(
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#,
            "\n",
            r#"<rect width="{w}" height="{h}" fill="white"/>"#,
            "\n",
            r#"<text x="{x:.1}" y="22" text-anchor="middle" font-size="14">{title}</text>"#,
            "\n"
        ),
        w = w,
        h = h,
        x = w / 2.0,
        title = esc(title)
    )
}

/// Horizontal grid lines with percent labels for shares `0..=ymax` (1 = 100%) over the plot
/// area `[left, right] x [top, bottom]`, share 0 at `bottom`.
pub fn percent_grid(s: &mut String, (left, top, right, bottom): (f64, f64, f64, f64), ymax: f64) {
    use std::fmt::Write;
    for t in ticks(0.0, ymax, 5) {
        let y = bottom - (t / ymax) * (bottom - top);
        let _ = writeln!(
            s,
            r##"<line x1="{left}" y1="{y:.1}" x2="{right:.1}" y2="{y:.1}" stroke="#e4e4e4"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}%</text>"##,
            left - 6.0,
            y + 4.0,
            fmt_tick(100.0 * t)
        );
    }
}

/// The left and bottom axis lines of the plot area `[left, right] x [top, bottom]` and the
/// y-axis label, rotated, centred on the axis.
pub fn axes(s: &mut String, (left, top, right, bottom): (f64, f64, f64, f64), y_label: &str) {
    use std::fmt::Write;
    let _ = writeln!(
        s,
        r##"<polyline points="{left},{top} {left},{bottom:.1} {right:.1},{bottom:.1}" fill="none" stroke="#333"/>"##
    );
    let mid = (top + bottom) / 2.0;
    let _ = writeln!(
        s,
        r#"<text x="16" y="{mid:.1}" text-anchor="middle" transform="rotate(-90 16 {mid:.1})">{}</text>"#,
        esc(y_label)
    );
}

/// Escape text for SVG and HTML (element text and quoted attribute values).
pub fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for ch in s.chars() {
        match ch {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c => o.push(c),
        }
    }
    o
}
