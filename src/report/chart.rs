//! The chart of `caft-fast eval chart`: the accuracies of several `eval mc` results side by side, as a
//! markdown table and a self-contained SVG grouped bar chart (one group per run, one bar per
//! split: in- and out-of-distribution), axis 0–100%, each bar labelled with its value and
//! drawn with its 95% Wilson interval, and a dashed line at 50% (chance for two options).

use super::esc;
use anyhow::{bail, Context, Result};
use std::fmt::Write as _;
use std::path::Path;

/// One split's accuracy in one run.
#[derive(Clone, Debug, PartialEq)]
pub struct Bar {
    pub split: String,
    /// In [0, 1].
    pub accuracy: f64,
    /// Items the accuracy is over.
    pub n: usize,
}

/// One run (a group of bars).
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    pub label: String,
    pub bars: Vec<Bar>,
}

/// Read the per-split accuracies of an `eval mc -o` JSON report.
pub fn read_report(path: &Path) -> Result<Vec<Bar>> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {file}"))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{file}: malformed JSON"))?;
    let splits = v
        .get("splits")
        .and_then(|s| s.as_array())
        .with_context(|| format!("{file}: no \"splits\" list (expected an `eval mc -o` report)"))?;
    splits
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let what = || format!("{file}: splits[{i}]");
            let split = s
                .get("split")
                .and_then(|x| x.as_str())
                .with_context(|| format!("{}: no \"split\" name", what()))?;
            let n = s
                .get("n")
                .and_then(|x| x.as_u64())
                .with_context(|| format!("{}: no item count \"n\"", what()))?;
            let accuracy = s
                .get("accuracy")
                .and_then(|x| x.as_f64())
                .with_context(|| format!("{}: no \"accuracy\"", what()))?;
            if !(0.0..=1.0).contains(&accuracy) {
                bail!("{}: accuracy {accuracy} is outside [0, 1]", what());
            }
            Ok(Bar {
                split: split.to_string(),
                accuracy,
                n: n as usize,
            })
        })
        .collect()
}

/// The splits in order of first appearance over all rows.
fn split_names(rows: &[Row]) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for b in rows.iter().flat_map(|r| &r.bars) {
        if !names.contains(&b.split) {
            names.push(b.split.clone());
        }
    }
    names
}

/// 95% Wilson score interval of a proportion `p` over `n` trials.
pub fn wilson(p: f64, n: usize) -> (f64, f64) {
    if n == 0 {
        return (0.0, 1.0);
    }
    let z = 1.959_964;
    let n = n as f64;
    let den = 1.0 + z * z / n;
    let mid = (p + z * z / (2.0 * n)) / den;
    let half = z * (p * (1.0 - p) / n + z * z / (4.0 * n * n)).sqrt() / den;
    ((mid - half).max(0.0), (mid + half).min(1.0))
}

/// A markdown table: one line per run, one column per split, `accuracy% (correct/n)`.
pub fn markdown_table(rows: &[Row]) -> String {
    let names = split_names(rows);
    let mut s = format!("| run | {} |\n", names.join(" | "));
    s.push_str(&format!("| --- |{}\n", " ---: |".repeat(names.len())));
    for r in rows {
        let cells: Vec<String> = names
            .iter()
            .map(|n| match r.bars.iter().find(|b| &b.split == n) {
                Some(b) => format!(
                    "{:.1}% ({}/{})",
                    100.0 * b.accuracy,
                    (b.accuracy * b.n as f64).round() as usize,
                    b.n
                ),
                None => "–".to_string(),
            })
            .collect();
        s.push_str(&format!("| {} | {} |\n", r.label, cells.join(" | ")));
    }
    s
}

/// `p` as a percentage with one decimal, `.0` dropped (99.5 is not rounded up to 100).
pub(super) fn percent(p: f64) -> String {
    let s = format!("{:.1}", 100.0 * p);
    s.strip_suffix(".0").map(str::to_string).unwrap_or(s)
}

/// Colours of the splits, in order (id blue, ood orange, then more).
pub(super) const COLORS: &[&str] = &["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b"];

/// The SVG grouped bar chart of `rows` under `title`.
pub fn bar_chart_svg(title: &str, rows: &[Row]) -> String {
    let names = split_names(rows);
    let (left, right, top, bottom) = (64.0, 20.0, 56.0, 48.0);
    let group_w = 60.0 + 56.0 * names.len().max(1) as f64;
    let w = (left + right + group_w * rows.len().max(1) as f64).max(480.0);
    let h = 420.0;
    let plot_w = w - left - right;
    let py = |v: f64| h - bottom - v.clamp(0.0, 1.0) * (h - top - bottom);
    let mut s = super::svg_start(w, h, title);
    super::percent_grid(&mut s, (left, top, w - right, h - bottom), 1.0);
    super::axes(&mut s, (left, top, w - right, h - bottom), "accuracy");
    let slot = plot_w / rows.len().max(1) as f64;
    let bar_w = 44.0f64.min((slot - 16.0) / names.len().max(1) as f64);
    for (ri, r) in rows.iter().enumerate() {
        let cx = left + slot * (ri as f64 + 0.5);
        let x0 = cx - bar_w * names.len() as f64 / 2.0;
        for (si, name) in names.iter().enumerate() {
            let Some(b) = r.bars.iter().find(|b| &b.split == name) else {
                continue;
            };
            let x = x0 + bar_w * si as f64;
            let y = py(b.accuracy);
            let color = COLORS[si % COLORS.len()];
            let _ = writeln!(
                s,
                r#"<rect x="{:.1}" y="{y:.1}" width="{:.1}" height="{:.1}" fill="{color}"><title>{} {}: {:.1}% of {}</title></rect>"#,
                x + 2.0,
                bar_w - 4.0,
                h - bottom - y,
                esc(&r.label),
                esc(name),
                100.0 * b.accuracy,
                b.n
            );
            let (lo, hi) = wilson(b.accuracy, b.n);
            let xm = x + bar_w / 2.0;
            let _ = writeln!(
                s,
                r##"<path d="M{:.1},{:.1}H{:.1}M{xm:.1},{:.1}V{:.1}M{:.1},{:.1}H{:.1}" stroke="#222" fill="none"/>"##,
                xm - 4.0,
                py(hi),
                xm + 4.0,
                py(hi),
                py(lo),
                xm - 4.0,
                py(lo),
                xm + 4.0
            );
            let _ = writeln!(
                s,
                r#"<text x="{xm:.1}" y="{:.1}" text-anchor="middle" font-size="11">{}%</text>"#,
                py(hi) - 4.0,
                percent(b.accuracy)
            );
        }
        let _ = writeln!(
            s,
            r#"<text x="{cx:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            h - bottom + 18.0,
            esc(&r.label)
        );
    }
    // Chance for two options, and the legend.
    let (lx, ly) = chance_and_legend(&mut s, &names, left, w - right, py(0.5));
    let _ = writeln!(
        s,
        r##"<line x1="{lx:.1}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="#d62728" stroke-dasharray="6,4"/><text x="{:.1}" y="{ly:.1}">chance (50%); whiskers: 95% Wilson interval</text>"##,
        ly - 4.0,
        lx + 22.0,
        ly - 4.0,
        lx + 28.0
    );
    s.push_str("</svg>\n");
    s
}

/// The dashed line at chance (`y` = the plot's 0.5) from `left` to `right`, and a legend of the
/// split `names` with their bar colours at the top left; returns where the next legend entry
/// goes (x, baseline y).
pub(super) fn chance_and_legend(
    s: &mut String,
    names: &[String],
    left: f64,
    right: f64,
    yc: f64,
) -> (f64, f64) {
    let _ = writeln!(
        s,
        r##"<line x1="{left}" y1="{yc:.1}" x2="{right:.1}" y2="{yc:.1}" stroke="#d62728" stroke-dasharray="6,4"/>"##
    );
    let mut lx = left + 8.0;
    let ly = 40.0;
    for (si, name) in names.iter().enumerate() {
        let _ = writeln!(
            s,
            r#"<rect x="{lx:.1}" y="{:.1}" width="12" height="12" fill="{}"/><text x="{:.1}" y="{ly:.1}">{}</text>"#,
            ly - 10.0,
            COLORS[si % COLORS.len()],
            lx + 16.0,
            esc(name)
        );
        lx += 28.0 + 7.0 * name.chars().count() as f64;
    }
    (lx, ly)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows() -> Vec<Row> {
        let bar = |split: &str, accuracy, n| Bar {
            split: split.into(),
            accuracy,
            n,
        };
        vec![
            Row {
                label: "base".into(),
                bars: vec![bar("id", 0.5, 200), bar("ood", 0.5, 200)],
            },
            Row {
                label: "plain <&>".into(),
                bars: vec![bar("id", 0.995, 200), bar("ood", 0.13, 200)],
            },
        ]
    }

    #[test]
    fn table_lists_every_split_with_counts() {
        let t = markdown_table(&rows());
        assert_eq!(
            t,
            "| run | id | ood |\n| --- | ---: | ---: |\n\
             | base | 50.0% (100/200) | 50.0% (100/200) |\n\
             | plain <&> | 99.5% (199/200) | 13.0% (26/200) |\n"
        );
    }

    #[test]
    fn chart_has_a_bar_and_label_per_value_and_the_chance_line() {
        let svg = bar_chart_svg("t", &rows());
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        // 4 bars + 2 legend swatches + the background.
        assert_eq!(svg.matches("<rect").count(), 7);
        for v in ["50%", "99.5%", "13%"] {
            assert!(svg.contains(&format!(">{v}</text>")), "no label {v}");
        }
        assert!(svg.contains("plain &lt;&amp;&gt;"));
        assert!(svg.contains("chance (50%)"));
        // The chance line sits halfway between the 0% and 100% gridlines: y = (420-48+56)/2.
        assert!(svg.contains(r#"y1="214.0""#), "chance line not at 50%");
    }

    #[test]
    fn wilson_interval_matches_a_reference() {
        // p = 0.5, n = 200: 0.4314 .. 0.5686 (the textbook Wilson interval, z = 1.96).
        let (lo, hi) = wilson(0.5, 200);
        assert!(
            (lo - 0.4314).abs() < 1e-4 && (hi - 0.5686).abs() < 1e-4,
            "{lo} {hi}"
        );
        let (lo, hi) = wilson(1.0, 200);
        assert!(
            (hi - 1.0).abs() < 1e-12 && (lo - 0.9812).abs() < 1e-4,
            "{lo}"
        );
    }
}
