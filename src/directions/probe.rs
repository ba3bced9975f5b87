//! Choosing directions without looking at test data: the components of a PCA (or any
//! directions file) that best separate the two labels of a probe set.
//!
//! The probe set holds sentences that carry one concept alone (for the spurious-correlation
//! task: positive or negative sentences about no animal and no object). The BASE model reads
//! each sentence; its feature at layer `L` is the mean of resid_post over the sentence's
//! tokens, leaving out the first `skip_first` positions (the first token's residual stream is
//! an outlier of huge norm, an attention sink, that would swamp the mean):
//!
//! ```text
//! x̄_s = mean_{t >= skip_first} resid_post_L(s)_t,    p_{s,c} = x̄_s · u_c / |u_c|
//! ```
//!
//! Each component `c` of layer `L` is scored by Cohen's d of its projections between the two
//! labels (sorted by name; `d = (mean_b − mean_a) / s_pooled` for labels `a < b`, with
//! `s_pooled² = ((n_a − 1) s_a² + (n_b − 1) s_b²) / (n_a + n_b − 2)`), and the `per_layer`
//! components with the largest `|d|` are kept. The area under the ROC curve of the same
//! projections is reported beside it (`AUC = 0.5` is no separation, 0 or 1 perfect); it ranks
//! by order only, so it saturates at 0/1 when the labels separate and cannot tell good from
//! better, which is why `|d|` ranks. The mean over tokens, not the last token, is the feature
//! because a sentence's concept sits on its words (the sentiment adjective) wherever they are.

use crate::backend::Backend;
use crate::data::token_batches;
use crate::data::TrainOn;
use crate::data::{parse_record, Encoder, Example};
use crate::directions::explain::LayerDirections;
use crate::model::loader::LoadedModel;
use crate::model::transformer::Model;
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::path::Path;

/// Probe sentences, tokenized, with their labels.
#[derive(Clone, Debug)]
pub struct Probes {
    pub examples: Vec<Example>,
    /// 0 or 1: the index of each example's label in `names`.
    pub labels: Vec<usize>,
    /// The two label names, sorted.
    pub names: [String; 2],
}

/// Read `{"text", "label"}` records (or pre-tokenized `{"input_ids", "label"}` ones, for models
/// without a tokenizer), one a line; blank lines are skipped. There must be exactly two
/// distinct labels, each on at least two records. Texts are tokenized as `train` tokenizes
/// `{"text"}` records (special tokens, EOS appended) and cut at `max_seq_len`.
pub fn read_probes(path: &Path, loaded: &LoadedModel, max_seq_len: usize) -> Result<Probes> {
    let file = path.display().to_string();
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading probe file {file}"))?;
    let enc = Encoder {
        tokenizer: loaded.tokenizer.as_ref(),
        template: loaded.chat_template.as_ref(),
        model: loaded.source.display().to_string(),
        vocab_size: loaded.config.vocab_size,
        train_on: TrainOn::All,
        max_seq_len,
    };
    let mut examples = Vec::new();
    let mut raw_labels: Vec<String> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = || format!("{file}:{}", i + 1);
        let v: serde_json::Value =
            serde_json::from_str(line).with_context(|| format!("{}: malformed JSON", at()))?;
        let label = match v.get("label") {
            Some(serde_json::Value::String(s)) if !s.is_empty() => s.clone(),
            Some(serde_json::Value::Bool(b)) => b.to_string(),
            Some(serde_json::Value::Number(n)) => n.to_string(),
            _ => bail!(
                "{}: missing \"label\" (a probe record is {{\"text\": ..., \"label\": ...}})",
                at()
            ),
        };
        let rec = parse_record(&v).with_context(at)?;
        if matches!(rec, crate::data::Record::Chat(_)) {
            bail!(
                "{}: a probe is a {{\"text\"}} or {{\"input_ids\"}} record, not a chat",
                at()
            );
        }
        let (ex, _) = enc.encode(&rec).with_context(at)?;
        if ex.ids.is_empty() {
            bail!("{}: the text has no tokens", at());
        }
        examples.push(ex);
        raw_labels.push(label);
    }
    if examples.is_empty() {
        bail!("{file}: no probe sentences (expected {{\"text\", \"label\"}} lines)");
    }
    let mut names: Vec<String> = raw_labels.clone();
    names.sort();
    names.dedup();
    if names.len() != 2 {
        bail!(
            "{file}: the probes have {} distinct label(s) {names:?}; exactly two are needed \
             (e.g. positive and negative)",
            names.len()
        );
    }
    let labels: Vec<usize> = raw_labels
        .iter()
        .map(|l| usize::from(*l == names[1]))
        .collect();
    for (j, name) in names.iter().enumerate() {
        let n = labels.iter().filter(|&&l| l == j).count();
        if n < 2 {
            bail!("{file}: label {name:?} has {n} probe(s); each label needs at least two");
        }
    }
    Ok(Probes {
        examples,
        labels,
        names: [names[0].clone(), names[1].clone()],
    })
}

/// How well one component separates the two labels.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct ComponentScore {
    /// Row of the layer's tensor in the directions file.
    pub component: usize,
    /// Cohen's d, `(mean_b − mean_a) / s_pooled` (labels sorted, `a < b`).
    pub cohen_d: f64,
    /// Probability that a random `b` probe projects higher than a random `a` probe.
    pub auc: f64,
    /// Mean projection of each label's probes.
    pub mean: [f64; 2],
    /// Share of the PCA's variance, when the file has `explained_variance_ratio.<L>`.
    pub explained_variance_ratio: Option<f32>,
}

/// The scores of one layer's components (in row order) and the chosen rows (best first).
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct LayerScores {
    pub layer: usize,
    pub scores: Vec<ComponentScore>,
    pub chosen: Vec<usize>,
}

/// Cohen's d and the AUC of `a` against `b` (`b` is the "higher" label). Both need two values
/// each. Zero pooled spread gives d = 0 when the means are equal and ±∞ otherwise.
pub fn separation(a: &[f64], b: &[f64]) -> (f64, f64) {
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let (ma, mb) = (mean(a), mean(b));
    let ss = |v: &[f64], m: f64| v.iter().map(|x| (x - m) * (x - m)).sum::<f64>();
    let dof = (a.len() + b.len()).saturating_sub(2).max(1) as f64;
    let sp = ((ss(a, ma) + ss(b, mb)) / dof).sqrt();
    let diff = mb - ma;
    let d = if sp > 0.0 {
        diff / sp
    } else if diff == 0.0 {
        0.0
    } else {
        diff.signum() * f64::INFINITY
    };
    // AUC by ranks (Mann–Whitney U), ties counted half.
    let mut all: Vec<(f64, bool)> = a
        .iter()
        .map(|&x| (x, false))
        .chain(b.iter().map(|&x| (x, true)))
        .collect();
    all.sort_by(|x, y| x.0.total_cmp(&y.0));
    let mut rank_sum_b = 0.0;
    let mut i = 0;
    while i < all.len() {
        let mut j = i;
        while j + 1 < all.len() && all[j + 1].0 == all[i].0 {
            j += 1;
        }
        let mid_rank = (i + j) as f64 / 2.0 + 1.0;
        rank_sum_b += mid_rank * all[i..=j].iter().filter(|x| x.1).count() as f64;
        i = j + 1;
    }
    let (na, nb) = (a.len() as f64, b.len() as f64);
    let auc = (rank_sum_b - nb * (nb + 1.0) / 2.0) / (na * nb);
    (d, auc)
}

/// Score every component of `feats` (per layer, probe-major `[n_probes, d]` mean resid_post)
/// against `labels` and keep the `per_layer` best by `|d|` (ties: lower row first).
pub fn score_layers(
    dirs: &[LayerDirections],
    feats: &[Vec<f64>],
    labels: &[usize],
    per_layer: usize,
) -> Result<Vec<LayerScores>> {
    let mut out = Vec::with_capacity(dirs.len());
    for (l, f) in dirs.iter().zip(feats) {
        let d = l.d;
        if per_layer == 0 || per_layer > l.k {
            bail!(
                "layer {}: {per_layer} components asked for; the file has {} (0 < --per-layer <= {})",
                l.layer,
                l.k,
                l.k
            );
        }
        let mut scores = Vec::with_capacity(l.k);
        for (c, row) in l.rows.chunks_exact(d).enumerate() {
            let norm = row.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt();
            let mut groups: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
            for (x, &lab) in f.chunks_exact(d).zip(labels) {
                let p = x.iter().zip(row).map(|(&a, &b)| a * b as f64).sum::<f64>() / norm;
                groups[lab].push(p);
            }
            let (cohen_d, auc) = separation(&groups[0], &groups[1]);
            let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
            scores.push(ComponentScore {
                component: c,
                cohen_d,
                auc,
                mean: [mean(&groups[0]), mean(&groups[1])],
                explained_variance_ratio: l.ratio.as_ref().map(|r| r[c]),
            });
        }
        let mut order: Vec<usize> = (0..l.k).collect();
        // Stable sort: equal |d| keeps the lower row (the larger PCA variance) first.
        let key = |c: usize| {
            let d = scores[c].cohen_d.abs();
            if d.is_nan() {
                0.0
            } else {
                d
            }
        };
        order.sort_by(|&x, &y| key(y).total_cmp(&key(x)));
        order.truncate(per_layer);
        out.push(LayerScores {
            layer: l.layer,
            scores,
            chosen: order,
        });
    }
    Ok(out)
}

/// How the probes go through the model.
#[derive(Clone, Copy, Debug)]
pub struct FeatureOptions {
    /// Probes per forward pass.
    pub batch_size: usize,
    /// Positions below this are left out of each probe's mean.
    pub skip_first: usize,
}

/// The probes' mean resid_post at each layer of `dirs`, per layer `[n_probes, d]` in probe
/// order, through the base `model`; `on_batch(i)` after the `i`-th forward pass.
pub fn probe_features<B: Backend>(
    be: &B,
    model: &mut Model<B>,
    probes: &Probes,
    dirs: &[LayerDirections],
    opt: FeatureOptions,
    mut on_batch: impl FnMut(usize),
) -> Result<Vec<Vec<f64>>> {
    let FeatureOptions {
        batch_size,
        skip_first,
    } = opt;
    if model.lora.is_some() {
        bail!("probe features are the base model's: detach the adapter first");
    }
    let d = model.cfg.hidden_size;
    let n = probes.examples.len();
    for (i, e) in probes.examples.iter().enumerate() {
        if e.ids.len() <= skip_first {
            bail!(
                "probe {} has {} token(s); with --skip-first {skip_first} none is left to average",
                i + 1,
                e.ids.len()
            );
        }
    }
    let mut feats: Vec<Vec<f64>> = dirs.iter().map(|_| vec![0f64; n * d]).collect();
    let mut counts = vec![0usize; n];
    for (bi, tb) in token_batches(&probes.examples, batch_size, true)
        .iter()
        .enumerate()
    {
        model.forward(be, &tb.batch, false)?;
        for (li, l) in dirs.iter().enumerate() {
            let x = model.resid_post(be, l.layer)?;
            for (&row, &(e, pos)) in tb.rows.iter().zip(&tb.origin) {
                if pos < skip_first {
                    continue;
                }
                let src = &x[row * d..(row + 1) * d];
                if let Some(j) = src.iter().position(|v| !v.is_finite()) {
                    bail!(
                        "layer {}: resid_post of probe {} position {pos} value {j} is NaN or Inf",
                        l.layer,
                        e + 1
                    );
                }
                for (acc, &v) in feats[li][e * d..(e + 1) * d].iter_mut().zip(src) {
                    *acc += v as f64;
                }
                if li == 0 {
                    counts[e] += 1;
                }
            }
        }
        on_batch(bi + 1);
    }
    for f in &mut feats {
        for (e, &c) in counts.iter().enumerate() {
            for v in &mut f[e * d..(e + 1) * d] {
                *v /= c as f64;
            }
        }
    }
    Ok(feats)
}

/// A text table of the scores: one line per layer, the chosen components first.
pub fn summary(layers: &[LayerScores], names: &[String; 2]) -> String {
    let mut s = format!(
        "Cohen's d = ({b} - {a}) / pooled sd of the probes' projections; AUC = P({b} > {a})\n",
        a = names[0],
        b = names[1]
    );
    for l in layers {
        let show = |c: usize| {
            let sc = &l.scores[c];
            format!("{c} (d {:+.2}, AUC {:.2})", sc.cohen_d, sc.auc)
        };
        let chosen: Vec<String> = l.chosen.iter().map(|&c| show(c)).collect();
        let best_rest = (0..l.scores.len())
            .filter(|c| !l.chosen.contains(c))
            .max_by(|&x, &y| {
                l.scores[x]
                    .cohen_d
                    .abs()
                    .total_cmp(&l.scores[y].cohen_d.abs())
            });
        s.push_str(&format!(
            "layer {}: chosen {}{}\n",
            l.layer,
            chosen.join(", "),
            best_rest
                .map(|c| format!("; next best {}", show(c)))
                .unwrap_or_default()
        ));
    }
    s
}
