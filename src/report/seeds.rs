//! `caft-fast eval seeds`: the same arms (fine-tunes) repeated over seeds, summarised. Per seed
//! and arm the accuracy of each split (`eval mc` reports); per arm the mean, the standard
//! deviation and the 95% t-interval of the mean over seeds; for chosen pairs of arms the
//! paired differences over seeds (mean, 95% t-interval, seeds won and lost, an exact two-sided
//! sign test and an exact two-sided paired permutation test); and an SVG bar chart of the
//! means with the t-intervals as whiskers and every seed as a dot.

use super::chart::{percent, Bar, COLORS};
use super::esc;
use std::fmt::Write as _;

/// The accuracies of every arm at every seed.
#[derive(Clone, Debug, PartialEq)]
pub struct Seeds {
    /// The arms, in the order of the tables and bars.
    pub arms: Vec<String>,
    /// The seeds' names, in the order of the per-seed table.
    pub seeds: Vec<String>,
    /// `results[s][a]`: the splits of arm `a` at seed `s`.
    pub results: Vec<Vec<Vec<Bar>>>,
}

impl Seeds {
    /// The splits in order of first appearance.
    pub fn splits(&self) -> Vec<String> {
        let mut names: Vec<String> = Vec::new();
        for b in self.results.iter().flatten().flatten() {
            if !names.contains(&b.split) {
                names.push(b.split.clone());
            }
        }
        names
    }

    /// The accuracy of arm `a` on `split` at every seed that has it, in seed order.
    pub fn values(&self, a: usize, split: &str) -> Vec<f64> {
        self.results
            .iter()
            .filter_map(|r| r[a].iter().find(|b| b.split == split))
            .map(|b| b.accuracy)
            .collect()
    }

    fn value(&self, s: usize, a: usize, split: &str) -> Option<f64> {
        self.results[s][a]
            .iter()
            .find(|b| b.split == split)
            .map(|b| b.accuracy)
    }
}

/// The mean of `xs` (NaN when empty).
pub fn mean(xs: &[f64]) -> f64 {
    xs.iter().sum::<f64>() / xs.len() as f64
}

/// The sample standard deviation (divisor n − 1); `None` under two values.
pub fn sd(xs: &[f64]) -> Option<f64> {
    if xs.len() < 2 {
        return None;
    }
    let m = mean(xs);
    let ss: f64 = xs.iter().map(|x| (x - m) * (x - m)).sum();
    Some((ss / (xs.len() - 1) as f64).sqrt())
}

/// The 0.975 quantile of Student's t with `df` degrees of freedom (`df` ≥ 1): a table to 30,
/// then the Cornish–Fisher expansion around the normal quantile (error under 1e-4 there).
pub fn t975(df: usize) -> f64 {
    const T: [f64; 30] = [
        12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281, 2.2010,
        2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860, 2.0796, 2.0739,
        2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423,
    ];
    assert!(df >= 1, "t quantile of 0 degrees of freedom");
    if df <= T.len() {
        return T[df - 1];
    }
    let z: f64 = 1.959_964;
    let n = df as f64;
    let (z3, z5, z7) = (z.powi(3), z.powi(5), z.powi(7));
    z + (z3 + z) / (4.0 * n)
        + (5.0 * z5 + 16.0 * z3 + 3.0 * z) / (96.0 * n * n)
        + (3.0 * z7 + 19.0 * z5 + 17.0 * z3 - 15.0 * z) / (384.0 * n * n * n)
}

/// The 95% t-interval of the mean of `xs`; `None` under two values.
pub fn mean_ci(xs: &[f64]) -> Option<(f64, f64)> {
    let s = sd(xs)?;
    let half = t975(xs.len() - 1) * s / (xs.len() as f64).sqrt();
    let m = mean(xs);
    Some((m - half, m + half))
}

/// The exact two-sided sign test of `wins` against `losses` (ties left out): the probability,
/// with each untied seed a fair coin, of a split at least as uneven. 1 when all are tied.
pub fn sign_test_p(wins: usize, losses: usize) -> f64 {
    let n = wins + losses;
    let k = wins.min(losses);
    // P(X <= k) for X ~ Binomial(n, 1/2), summed in f64 (C(n, i) exact to n = 1000s).
    let mut c = 1.0f64;
    let mut tail = 0.0f64;
    for i in 0..=k {
        if i > 0 {
            c = c * (n - i + 1) as f64 / i as f64;
        }
        tail += c;
    }
    (2.0 * tail / 2f64.powi(n as i32)).min(1.0)
}

/// Seeds the exact permutation test enumerates all sign patterns of (2^n of them).
pub const MAX_PERMUTATION_SEEDS: usize = 20;

/// The exact two-sided paired permutation (sign-flip) test of the differences `d`: the share
/// of the 2^n ways of flipping their signs whose sum is at least as far from 0 as the
/// observed one. `None` beyond [`MAX_PERMUTATION_SEEDS`]; 1 for no differences.
pub fn permutation_p(d: &[f64]) -> Option<f64> {
    if d.len() > MAX_PERMUTATION_SEEDS {
        return None;
    }
    let observed = d.iter().sum::<f64>().abs();
    // Accuracies are multiples of 1/n_items: compare with a tolerance for rounding.
    let eps = 1e-9 * (1.0 + d.iter().map(|x| x.abs()).sum::<f64>());
    let total = 1u64 << d.len();
    let extreme = (0..total)
        .filter(|mask| {
            let s: f64 = d
                .iter()
                .enumerate()
                .map(|(i, x)| if mask >> i & 1 == 1 { -x } else { *x })
                .sum();
            s.abs() >= observed - eps
        })
        .count();
    Some(extreme as f64 / total as f64)
}

/// Arm `a` against arm `b` on one split over the seeds that have both.
#[derive(Clone, Debug, PartialEq)]
pub struct Paired {
    pub a: String,
    pub b: String,
    pub split: String,
    /// a − b per seed (seeds that have both).
    pub diffs: Vec<f64>,
    pub mean: f64,
    pub ci: Option<(f64, f64)>,
    /// Seeds where a is higher, lower, equal.
    pub wins: usize,
    pub losses: usize,
    pub ties: usize,
    pub sign_p: f64,
    pub permutation_p: Option<f64>,
}

/// The paired comparison of arms `a` and `b` (indices into `seeds.arms`) on `split`.
pub fn paired(seeds: &Seeds, a: usize, b: usize, split: &str) -> Paired {
    let diffs: Vec<f64> = (0..seeds.seeds.len())
        .filter_map(|s| Some(seeds.value(s, a, split)? - seeds.value(s, b, split)?))
        .collect();
    // Equal accuracies over the same items are exactly equal floats; allow rounding anyway.
    let tie = |d: f64| d.abs() < 1e-9;
    let wins = diffs.iter().filter(|d| !tie(**d) && **d > 0.0).count();
    let losses = diffs.iter().filter(|d| !tie(**d) && **d < 0.0).count();
    Paired {
        a: seeds.arms[a].clone(),
        b: seeds.arms[b].clone(),
        split: split.to_string(),
        mean: mean(&diffs),
        ci: mean_ci(&diffs),
        wins,
        losses,
        ties: diffs.len() - wins - losses,
        sign_p: sign_test_p(wins, losses),
        permutation_p: permutation_p(&diffs),
        diffs,
    }
}

/// Percent with one decimal (a share in [0, 1], or a difference of shares in points).
fn pc(x: f64) -> String {
    format!("{:.1}", 100.0 * x)
}

/// The markdown summary: per-seed table, per-arm statistics, the paired comparisons.
pub fn markdown(seeds: &Seeds, comparisons: &[Paired]) -> String {
    let splits = seeds.splits();
    let n = seeds.seeds.len();
    let items: Vec<String> = splits
        .iter()
        .filter_map(|sp| {
            let b = seeds
                .results
                .iter()
                .flatten()
                .flatten()
                .find(|b| &b.split == sp)?;
            Some(format!("{sp} {}", b.n))
        })
        .collect();
    let mut s = String::new();
    let _ = writeln!(
        s,
        "### Accuracy per seed (%; questions per split: {})\n",
        items.join(", ")
    );
    let mut head = vec!["seed".to_string()];
    for arm in &seeds.arms {
        for sp in &splits {
            head.push(format!("{arm} {sp}"));
        }
    }
    let _ = writeln!(s, "| {} |", head.join(" | "));
    let _ = writeln!(s, "| --- |{}", " ---: |".repeat(head.len() - 1));
    for (si, name) in seeds.seeds.iter().enumerate() {
        let mut cells = vec![name.clone()];
        for a in 0..seeds.arms.len() {
            for sp in &splits {
                cells.push(seeds.value(si, a, sp).map(pc).unwrap_or("–".into()));
            }
        }
        let _ = writeln!(s, "| {} |", cells.join(" | "));
    }

    let _ = writeln!(
        s,
        "\n### Accuracy per arm over {n} seed{} (%: mean ± standard deviation, 95% t-interval of the mean cut to 0–100, lowest–highest seed)\n",
        if n == 1 { "" } else { "s" }
    );
    let mut head = vec!["arm".to_string()];
    for sp in &splits {
        head.push(format!("{sp} mean ± sd"));
        head.push(format!("{sp} 95% CI"));
        head.push(format!("{sp} range"));
    }
    let _ = writeln!(s, "| {} |", head.join(" | "));
    let _ = writeln!(s, "| --- |{}", " ---: |".repeat(head.len() - 1));
    for (a, arm) in seeds.arms.iter().enumerate() {
        let mut cells = vec![arm.clone()];
        for sp in &splits {
            let v = seeds.values(a, sp);
            if v.is_empty() {
                cells.extend(["–".to_string(), "–".into(), "–".into()]);
                continue;
            }
            cells.push(match sd(&v) {
                Some(d) => format!("{} ± {}", pc(mean(&v)), pc(d)),
                None => pc(mean(&v)),
            });
            cells.push(match mean_ci(&v) {
                Some((lo, hi)) => format!("{} to {}", pc(lo.max(0.0)), pc(hi.min(1.0))),
                None => "–".into(),
            });
            let lo = v.iter().cloned().fold(f64::INFINITY, f64::min);
            let hi = v.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            cells.push(format!("{}–{}", pc(lo), pc(hi)));
        }
        let _ = writeln!(s, "| {} |", cells.join(" | "));
    }

    if !comparisons.is_empty() {
        let _ = writeln!(
            s,
            "\n### Paired over seeds (percentage points; each seed's two arms share the task, data order and LoRA initialisation)\n"
        );
        let _ = writeln!(
            s,
            "| comparison | split | mean difference | 95% t-interval | seeds higher / lower / tied | sign test p | permutation p |"
        );
        let _ = writeln!(s, "| --- | --- | ---: | ---: | ---: | ---: | ---: |");
        for c in comparisons {
            let _ = writeln!(
                s,
                "| {} − {} | {} | {:+.1} | {} | {} / {} / {} | {} | {} |",
                c.a,
                c.b,
                c.split,
                100.0 * c.mean,
                c.ci.map(|(lo, hi)| format!("{:+.1} to {:+.1}", 100.0 * lo, 100.0 * hi))
                    .unwrap_or("–".into()),
                c.wins,
                c.losses,
                c.ties,
                format_p(Some(c.sign_p)),
                format_p(c.permutation_p)
            );
        }
        let _ = writeln!(
            s,
            "\nBoth p-values are exact and two-sided. Sign test: the number of seeds the first \
             arm wins against a fair coin per untied seed. Permutation test: the share of the \
             2^n sign flips of the per-seed differences whose sum is at least as far from 0 as \
             the observed one (exact up to {MAX_PERMUTATION_SEEDS} seeds). With {n} seed{} \
             neither can go below 2/2^{n} = {}.",
            if n == 1 { "" } else { "s" },
            format_p(Some((2.0 / 2f64.powi(n as i32)).min(1.0)))
        );
    }
    s
}

fn format_p(p: Option<f64>) -> String {
    match p {
        Some(p) if p >= 0.001 => format!("{p:.3}"),
        Some(p) => format!("{p:.1e}"),
        None => "–".into(),
    }
}

/// The SVG chart: one group per arm, one bar per split at the mean over seeds, whiskers at the
/// 95% t-interval of the mean (none for one seed), every seed a dot, and the chance line.
pub fn seeds_chart_svg(title: &str, seeds: &Seeds) -> String {
    let names = seeds.splits();
    let n = seeds.seeds.len();
    let (left, right, top, bottom) = (64.0, 20.0, 56.0, 48.0);
    let group_w = 60.0 + 56.0 * names.len().max(1) as f64;
    let w = (left + right + group_w * seeds.arms.len().max(1) as f64).max(560.0);
    let h = 420.0;
    let py = |v: f64| h - bottom - v.clamp(0.0, 1.0) * (h - top - bottom);
    let mut s = super::svg_start(w, h, title);
    super::percent_grid(&mut s, (left, top, w - right, h - bottom), 1.0);
    super::axes(&mut s, (left, top, w - right, h - bottom), "accuracy");
    let slot = (w - left - right) / seeds.arms.len().max(1) as f64;
    let bar_w = 44.0f64.min((slot - 16.0) / names.len().max(1) as f64);
    for (ai, arm) in seeds.arms.iter().enumerate() {
        let cx = left + slot * (ai as f64 + 0.5);
        let x0 = cx - bar_w * names.len() as f64 / 2.0;
        for (si, name) in names.iter().enumerate() {
            let v = seeds.values(ai, name);
            if v.is_empty() {
                continue;
            }
            let m = mean(&v);
            let x = x0 + bar_w * si as f64;
            let xm = x + bar_w / 2.0;
            let y = py(m);
            let color = COLORS[si % COLORS.len()];
            let spread = sd(&v)
                .map(|d| format!(" ± {:.1}", 100.0 * d))
                .unwrap_or_default();
            let _ = writeln!(
                s,
                r#"<rect x="{:.1}" y="{y:.1}" width="{:.1}" height="{:.1}" fill="{color}" fill-opacity="0.75"><title>{} {}: mean {:.1}%{spread} over {} seed(s)</title></rect>"#,
                x + 2.0,
                bar_w - 4.0,
                h - bottom - y,
                esc(arm),
                esc(name),
                100.0 * m,
                v.len()
            );
            // Seeds as dots, spread across the bar so that equal values stay visible.
            for (k, x_val) in v.iter().enumerate() {
                let off = if v.len() > 1 {
                    (k as f64 / (v.len() - 1) as f64 - 0.5) * (bar_w - 16.0)
                } else {
                    0.0
                };
                let _ = writeln!(
                    s,
                    r##"<circle class="seed" cx="{:.1}" cy="{:.1}" r="2.5" fill="white" stroke="#222"/>"##,
                    xm + off,
                    py(*x_val)
                );
            }
            let mut label_y = y;
            if let Some((lo, hi)) = mean_ci(&v) {
                let _ = writeln!(
                    s,
                    r##"<path class="whisker" d="M{:.1},{:.1}H{:.1}M{xm:.1},{:.1}V{:.1}M{:.1},{:.1}H{:.1}" stroke="#222" stroke-width="1.5" fill="none"/>"##,
                    xm - 5.0,
                    py(hi),
                    xm + 5.0,
                    py(hi),
                    py(lo),
                    xm - 5.0,
                    py(lo),
                    xm + 5.0
                );
                label_y = label_y.min(py(hi));
            }
            let top_dot = v.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            label_y = label_y.min(py(top_dot) - 3.0);
            let _ = writeln!(
                s,
                r#"<text x="{xm:.1}" y="{:.1}" text-anchor="middle" font-size="11">{}%</text>"#,
                label_y - 4.0,
                percent(m)
            );
        }
        let _ = writeln!(
            s,
            r#"<text x="{cx:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            h - bottom + 18.0,
            esc(arm)
        );
    }
    let (lx, ly) = super::chart::chance_and_legend(&mut s, &names, left, w - right, py(0.5));
    let what = if n > 1 {
        format!("bars: mean of {n} seeds; whiskers: 95% t-interval of the mean; dots: seeds")
    } else {
        "one seed (no interval over seeds)".to_string()
    };
    let _ = writeln!(
        s,
        r##"<line x1="{lx:.1}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="#d62728" stroke-dasharray="6,4"/><text x="{:.1}" y="{ly:.1}">chance; {}</text>"##,
        ly - 4.0,
        lx + 22.0,
        ly - 4.0,
        lx + 28.0,
        esc(&what)
    );
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64, tol: f64) -> bool {
        (a - b).abs() <= tol
    }

    /// Three arms at three seeds, splits id and ood over 200 items.
    fn seeds() -> Seeds {
        let bars = |id: f64, ood: f64| {
            vec![
                Bar {
                    split: "id".into(),
                    accuracy: id,
                    n: 200,
                },
                Bar {
                    split: "ood".into(),
                    accuracy: ood,
                    n: 200,
                },
            ]
        };
        Seeds {
            arms: vec!["plain".into(), "caft".into(), "random <r>".into()],
            seeds: vec!["seed0".into(), "seed1".into(), "seed2".into()],
            results: vec![
                vec![bars(1.0, 0.67), bars(1.0, 0.975), bars(1.0, 0.995)],
                vec![bars(1.0, 0.95), bars(0.99, 0.97), bars(1.0, 0.995)],
                vec![bars(0.995, 0.80), bars(1.0, 0.90), bars(1.0, 0.90)],
            ],
        }
    }

    #[test]
    fn mean_sd_and_t_interval_match_hand_computation() {
        let x = [0.67, 0.95, 0.80];
        assert!(close(mean(&x), 0.80667, 1e-5));
        // Squared deviations 0.018678 + 0.020544 + 0.000044 = 0.039267; / 2; sqrt.
        let d = sd(&x).unwrap();
        assert!(close(d, 0.140119, 1e-5), "{d}");
        let (lo, hi) = mean_ci(&x).unwrap();
        let half = 4.3027 * d / 3f64.sqrt();
        assert!(close(lo, mean(&x) - half, 1e-12) && close(hi, mean(&x) + half, 1e-12));
        assert_eq!(sd(&[0.5]), None);
        assert_eq!(mean_ci(&[0.5]), None);
    }

    #[test]
    fn t_quantiles_match_tables() {
        assert!(close(t975(1), 12.706, 1e-3));
        assert!(close(t975(4), 2.776, 1e-3));
        // Beyond the table, the expansion against published values.
        assert!(close(t975(40), 2.0211, 2e-4), "{}", t975(40));
        assert!(close(t975(60), 2.0003, 2e-4), "{}", t975(60));
        assert!(close(t975(120), 1.9799, 2e-4), "{}", t975(120));
        // Continuous at the end of the table.
        assert!(t975(31) < t975(30) && t975(30) - t975(31) < 0.01);
    }

    #[test]
    fn sign_test_is_exact() {
        // 5 of 5: 2 / 32.
        assert!(close(sign_test_p(5, 0), 0.0625, 1e-12));
        assert!(close(sign_test_p(0, 5), 0.0625, 1e-12));
        // 4 of 5: 2 * (1 + 5) / 32.
        assert!(close(sign_test_p(4, 1), 0.375, 1e-12));
        // 8 of 10: 2 * (1 + 10 + 45) / 1024.
        assert!(close(sign_test_p(8, 2), 0.109375, 1e-12));
        assert_eq!(sign_test_p(0, 0), 1.0);
        assert_eq!(sign_test_p(3, 3), 1.0);
    }

    #[test]
    fn permutation_test_enumerates_sign_flips() {
        // All positive, 4 seeds: only all-plus and all-minus are as extreme: 2/16.
        assert!(close(
            permutation_p(&[0.1, 0.2, 0.3, 0.4]).unwrap(),
            0.125,
            1e-12
        ));
        // [0.3, -0.1, 0.1]: with +0.3 the flips sum to 0.1, 0.3, 0.3 or 0.5, three of them
        // at least 0.3 away from 0; with -0.3 their mirror images: 6/8.
        assert!(close(
            permutation_p(&[0.3, -0.1, 0.1]).unwrap(),
            0.75,
            1e-12
        ));
        assert_eq!(permutation_p(&[]), Some(1.0));
        assert_eq!(permutation_p(&[0.0; 21]), None);
    }

    #[test]
    fn paired_counts_wins_and_ties() {
        let s = seeds();
        let c = paired(&s, 1, 2, "ood");
        // caft − random: -0.02, -0.025, 0.
        assert_eq!((c.wins, c.losses, c.ties), (0, 2, 1));
        assert!(close(c.mean, -0.015, 1e-12));
        assert!(close(c.sign_p, 0.5, 1e-12));
        let c = paired(&s, 1, 0, "ood");
        assert_eq!((c.wins, c.losses, c.ties), (3, 0, 0));
        assert!(close(c.permutation_p.unwrap(), 0.25, 1e-12));
        assert!(c.ci.is_some());
    }

    #[test]
    fn markdown_has_every_seed_arm_and_comparison() {
        let s = seeds();
        let c = vec![paired(&s, 1, 2, "ood"), paired(&s, 1, 0, "ood")];
        let md = markdown(&s, &c);
        assert!(md.contains("| seed | plain id | plain ood | caft id | caft ood |"));
        assert!(md.contains("| seed0 | 100.0 | 67.0 | 100.0 | 97.5 | 100.0 | 99.5 |"));
        // plain ood: 80.7 ± 14.0, 95% CI 80.67 ± 34.81, cut at 100.
        assert!(md.contains("| plain | 99.8 ± 0.3 |"), "{md}");
        assert!(
            md.contains("80.7 ± 14.0 | 45.9 to 100.0 | 67.0–95.0 |"),
            "{md}"
        );
        assert!(md.contains("| caft − random <r> | ood | -1.5 |"), "{md}");
        assert!(md.contains("| 0 / 2 / 1 | 0.500 |"), "{md}");
        assert!(md.contains("| caft − plain | ood | +14.2 |"), "{md}");
        assert!(md.contains("questions per split: id 200, ood 200"));
        assert!(
            md.contains("With 3 seeds neither can go below 2/2^3 = 0.250."),
            "{md}"
        );
    }

    #[test]
    fn markdown_of_one_seed_has_no_spread() {
        let mut s = seeds();
        s.seeds.truncate(1);
        s.results.truncate(1);
        let md = markdown(&s, &[paired(&s, 1, 2, "ood")]);
        assert!(md.contains("over 1 seed ("));
        assert!(
            md.contains("| plain | 100.0 | – | 100.0–100.0 | 67.0 | – | 67.0–67.0 |"),
            "{md}"
        );
        assert!(
            md.contains("| caft − random <r> | ood | -2.0 | – | 0 / 1 / 0 | 1.000 | 1.000 |"),
            "{md}"
        );
    }

    #[test]
    fn chart_draws_means_whiskers_and_seed_dots() {
        let s = seeds();
        let svg = seeds_chart_svg("t & u", &s);
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        // 6 bars + 2 legend swatches + the background.
        assert_eq!(svg.matches("<rect").count(), 9);
        // A whisker per bar, a dot per seed and bar.
        assert_eq!(svg.matches(r#"class="whisker""#).count(), 6);
        assert_eq!(svg.matches(r#"class="seed""#).count(), 18);
        assert!(svg.contains("random &lt;r&gt;") && svg.contains("t &amp; u"));
        // plain ood mean 80.7%; the whiskers reach above 100% and are drawn clamped at the top.
        assert!(svg.contains(">80.7%</text>"), "{svg}");
        assert!(svg.contains("mean of 3 seeds"));
        // The chance line at 50%, halfway between the 0% and 100% gridlines.
        assert!(svg.contains(r#"y1="214.0""#));
        let one = Seeds {
            seeds: vec!["seed0".into()],
            results: vec![s.results[0].clone()],
            ..s
        };
        let svg = seeds_chart_svg("t", &one);
        assert_eq!(svg.matches(r#"class="whisker""#).count(), 0);
        assert!(svg.contains("one seed"));
    }
}
