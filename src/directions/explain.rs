//! What each direction means: the base model reads a generic corpus, every token's
//! resid_post at each layer is projected onto every direction of that layer
//! (`p = x · u / |u|`), and the contexts with the highest and the lowest projections are
//! reported, so a person can name the concept a component stands for (and pick the unwanted
//! ones for `directions select`).
//!
//! Output folder: `index.html` (self-contained: inline CSS and SVG, no scripts; a section per
//! layer with the explained-variance chart, a block per component; every context's tokens
//! coloured by their own projection, red positive and blue negative, the ranked token
//! outlined) and `summary.json` (the same numbers for programs). Projections of every corpus
//! token are kept in memory (`tokens x directions` f32), which bounds the corpus size in
//! practice to some millions of tokens.

use crate::backend::Backend;
use crate::data::Example;
use crate::data::{token_batches, TokenBatch};
use crate::model::tokenizer::Tokenizer;
use crate::model::transformer::Model;
use anyhow::{bail, Context, Result};
use std::fmt::Write as _;
use std::path::Path;

/// Directions to explain at one layer, as read from a PCA or directions file.
#[derive(Clone, Debug)]
pub struct LayerDirections {
    pub layer: usize,
    pub k: usize,
    pub d: usize,
    /// Row-major `[k, d]`, as stored (each row is normalised before projecting).
    pub rows: Vec<f32>,
    /// Share of variance per row when the file has `explained_variance_ratio.<L>`.
    pub ratio: Option<Vec<f32>>,
    /// SAE latent index of each row when the file has `sae_latent.<L>` (`directions sae`).
    pub latents: Option<Vec<usize>>,
}

/// Read every `layer.<L>` tensor (and its `explained_variance_ratio.<L>` if present).
pub fn read_directions(
    path: &Path,
    d_model: usize,
    n_layers: usize,
) -> Result<Vec<LayerDirections>> {
    let file = path.display().to_string();
    let t = crate::io::read_f32_safetensors(path)?;
    let mut out = Vec::new();
    for (name, (shape, data)) in &t {
        let Some(layer) = name
            .strip_prefix("layer.")
            .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|s| s.parse::<usize>().ok())
        else {
            continue;
        };
        let (k, d) = match shape.as_slice() {
            [d] => (1, *d),
            [k, d] => (*k, *d),
            s => bail!("{file}: tensor `{name}` has shape {s:?}; expected [k, d_model]"),
        };
        if d != d_model {
            bail!("{file}: tensor `{name}` has width {d} but the model's d_model is {d_model}");
        }
        if layer >= n_layers {
            bail!(
                "{file}: tensor `{name}`: layer {layer} does not exist (the model has {n_layers} \
                 layers)"
            );
        }
        for (i, row) in data.chunks_exact(d).enumerate() {
            let n: f64 = row.iter().map(|&x| x as f64 * x as f64).sum();
            if !n.is_finite() || n == 0.0 {
                bail!("{file}: tensor `{name}` row {i} is zero or not finite");
            }
        }
        let ratio = t
            .get(&format!("explained_variance_ratio.{layer}"))
            .filter(|(s, _)| s.as_slice() == [k])
            .map(|(_, r)| r.clone());
        let latents = t
            .get(&format!("sae_latent.{layer}"))
            .filter(|(s, _)| s.as_slice() == [k])
            .map(|(_, r)| r.iter().map(|&x| x as usize).collect());
        out.push(LayerDirections {
            layer,
            k,
            d,
            rows: data.clone(),
            ratio,
            latents,
        });
    }
    if out.is_empty() {
        bail!("{file}: no `layer.<L>` tensors (expected a `directions pca` output or an ablation file)");
    }
    out.sort_by_key(|l| l.layer);
    Ok(out)
}

/// One ranked token and the window of tokens around it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Excerpt {
    pub projection: f32,
    /// Example (0-based, in corpus order) and position of the ranked token.
    pub example: usize,
    pub position: usize,
    /// Window start position in the example; `tokens[marked]` is the ranked token.
    pub start: usize,
    pub marked: usize,
    pub tokens: Vec<String>,
    /// Each window token's projection onto the same direction.
    pub projections: Vec<f32>,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct ComponentReport {
    pub index: usize,
    /// The SAE latent this direction is the decoder row of, for `directions sae` files.
    pub sae_latent: Option<usize>,
    pub explained_variance_ratio: Option<f32>,
    pub mean: f64,
    pub std: f64,
    /// Largest `|projection|` over the corpus (the colour scale).
    pub max_abs: f32,
    pub highest: Vec<Excerpt>,
    pub lowest: Vec<Excerpt>,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct LayerReport {
    pub layer: usize,
    pub components: Vec<ComponentReport>,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct Report {
    pub model: String,
    pub directions: String,
    pub corpus: String,
    pub examples: usize,
    pub tokens: usize,
    /// Positions below this in each text were not ranked.
    pub skip_first: usize,
    pub layers: Vec<LayerReport>,
}

/// Options of the report.
#[derive(Clone, Debug)]
pub struct ExplainOptions {
    /// Contexts per list (highest, lowest).
    pub top: usize,
    /// Tokens shown before the ranked one (and `after` after it).
    pub before: usize,
    pub after: usize,
    pub batch_size: usize,
    /// Positions below this in each text are not ranked (nor counted in the statistics and
    /// the colour scale): the first token's residual stream is typically an outlier of huge
    /// norm (an "attention sink") that would fill every list.
    pub skip_first: usize,
}

/// A token's text for display: the tokenizer's decoding of that one id (special tokens kept),
/// with line breaks and tabs made visible; `⟨id⟩` without a tokenizer.
pub fn token_text(tok: Option<&Tokenizer>, id: u32) -> String {
    match tok.and_then(|t| t.decode(&[id]).ok()) {
        Some(s) => s.replace('\n', "↵").replace('\t', "⇥"),
        None => format!("⟨{id}⟩"),
    }
}

/// Project every token of `examples` onto every direction and rank the contexts.
pub fn explain<B: Backend>(
    be: &B,
    model: &mut Model<B>,
    examples: &[Example],
    dirs: &[LayerDirections],
    tok: Option<&Tokenizer>,
    opt: &ExplainOptions,
    mut on_batch: impl FnMut(usize),
) -> Result<(Vec<LayerReport>, usize)> {
    if model.lora.is_some() {
        bail!("explain reads the base model: detach the adapter first");
    }
    let d = model.cfg.hidden_size;
    // Unit rows in f64.
    let units: Vec<Vec<f64>> = dirs
        .iter()
        .map(|l| {
            l.rows
                .chunks_exact(d)
                .flat_map(|r| {
                    let n = r.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt();
                    r.iter().map(move |&x| x as f64 / n)
                })
                .collect()
        })
        .collect();
    // Global token index of (example, position): offsets[e] + position.
    let mut offsets = Vec::with_capacity(examples.len());
    let mut total = 0usize;
    for e in examples {
        offsets.push(total);
        total += e.ids.len();
    }
    // proj[layer][component][token]
    let mut proj: Vec<Vec<Vec<f32>>> = dirs.iter().map(|l| vec![vec![0f32; total]; l.k]).collect();
    let batches: Vec<TokenBatch> = token_batches(examples, opt.batch_size, true);
    for (bi, tb) in batches.iter().enumerate() {
        model.forward(be, &tb.batch, false)?;
        for (li, l) in dirs.iter().enumerate() {
            let x = model.resid_post(be, l.layer)?;
            for (&row, &(ex, pos)) in tb.rows.iter().zip(&tb.origin) {
                let xr = &x[row * d..(row + 1) * d];
                let g = offsets[ex] + pos;
                for c in 0..l.k {
                    let u = &units[li][c * d..(c + 1) * d];
                    let p: f64 = xr.iter().zip(u).map(|(&a, &b)| a as f64 * b).sum();
                    if !p.is_finite() {
                        bail!(
                            "layer {}: resid_post is not finite at example {} position {pos}",
                            l.layer,
                            ex + 1
                        );
                    }
                    proj[li][c][g] = p as f32;
                }
            }
        }
        on_batch(bi + 1);
    }
    // Which example and position a global token index is.
    let locate = |g: usize| -> (usize, usize) {
        let e = offsets.partition_point(|&o| o <= g) - 1;
        (e, g - offsets[e])
    };
    let context = |p: &[f32], g: usize| -> Excerpt {
        let (e, pos) = locate(g);
        let ids = &examples[e].ids;
        let start = pos.saturating_sub(opt.before);
        let end = (pos + opt.after + 1).min(ids.len());
        Excerpt {
            projection: p[g],
            example: e,
            position: pos,
            start,
            marked: pos - start,
            tokens: ids[start..end]
                .iter()
                .map(|&t| token_text(tok, t))
                .collect(),
            projections: (start..end).map(|q| p[offsets[e] + q]).collect(),
        }
    };
    // The ranked tokens: every position from `skip_first` on.
    let ranked: Vec<usize> = examples
        .iter()
        .zip(&offsets)
        .flat_map(|(e, &o)| (opt.skip_first.min(e.ids.len())..e.ids.len()).map(move |q| o + q))
        .collect();
    if ranked.is_empty() {
        bail!(
            "every text is at most {} tokens long, so no token is ranked (lower --skip-first)",
            opt.skip_first
        );
    }
    let mut layers = Vec::with_capacity(dirs.len());
    for (li, l) in dirs.iter().enumerate() {
        let mut comps = Vec::with_capacity(l.k);
        for (c, p) in proj[li].iter().enumerate() {
            let n = ranked.len() as f64;
            let mean = ranked.iter().map(|&g| p[g] as f64).sum::<f64>() / n;
            let var = ranked
                .iter()
                .map(|&g| (p[g] as f64 - mean).powi(2))
                .sum::<f64>()
                / n;
            let mut order = ranked.clone();
            // Descending by projection; ties by corpus order, so reports repeat exactly.
            order.sort_by(|&a, &b| p[b].total_cmp(&p[a]).then(a.cmp(&b)));
            let highest = distinct(order.iter().map(|&g| context(p, g)), opt.top);
            let lowest = distinct(order.iter().rev().map(|&g| context(p, g)), opt.top);
            comps.push(ComponentReport {
                index: c,
                sae_latent: l.latents.as_ref().map(|v| v[c]),
                explained_variance_ratio: l.ratio.as_ref().map(|r| r[c]),
                mean,
                std: var.sqrt(),
                max_abs: ranked.iter().fold(0f32, |m, &g| m.max(p[g].abs())),
                highest,
                lowest,
            });
        }
        layers.push(LayerReport {
            layer: l.layer,
            components: comps,
        });
    }
    Ok((layers, total))
}

/// The first `n` excerpts whose shown tokens differ: a corpus with repeated passages would
/// otherwise fill a list with copies of one context.
fn distinct(excerpts: impl Iterator<Item = Excerpt>, n: usize) -> Vec<Excerpt> {
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::with_capacity(n);
    for e in excerpts {
        if out.len() == n {
            break;
        }
        if seen.insert((e.tokens.clone(), e.marked)) {
            out.push(e);
        }
    }
    out
}

/// A bar chart of the explained-variance shares of one layer's components (inline SVG).
fn variance_svg(ratios: &[f32]) -> String {
    let (w, h, pad) = (600.0f64, 160.0f64, 28.0f64);
    let max = ratios.iter().fold(0f32, |m, &r| m.max(r)).max(1e-12) as f64;
    let bw = (w - 2.0 * pad) / ratios.len().max(1) as f64;
    let mut s = format!(
        "<svg class=\"variance\" xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" \
         viewBox=\"0 0 {w} {h}\" role=\"img\"><title>explained variance ratio per component</title>\
         <line x1=\"{pad}\" y1=\"{y0}\" x2=\"{x1}\" y2=\"{y0}\" stroke=\"#444\"/>",
        y0 = h - pad,
        x1 = w - pad
    );
    for (i, &r) in ratios.iter().enumerate() {
        let bh = (h - 2.0 * pad) * r as f64 / max;
        let x = pad + i as f64 * bw;
        let _ = write!(
            s,
            "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"#4a78b5\">\
             <title>component {i}: {:.2}%</title></rect>\
             <text x=\"{:.1}\" y=\"{:.1}\" font-size=\"9\" text-anchor=\"middle\">{i}</text>",
            x + 0.1 * bw,
            h - pad - bh,
            0.8 * bw,
            bh,
            100.0 * r,
            x + 0.5 * bw,
            h - pad + 11.0
        );
    }
    let _ = write!(
        s,
        "<text x=\"{pad}\" y=\"{:.1}\" font-size=\"10\">max {:.1}%</text></svg>",
        pad - 8.0,
        100.0 * max
    );
    s
}

/// Background of a token: red for positive projections, blue for negative, opacity `|p|/max`.
fn colour(p: f32, max_abs: f32) -> String {
    let a = if max_abs > 0.0 {
        (p.abs() / max_abs).clamp(0.0, 1.0)
    } else {
        0.0
    };
    if p >= 0.0 {
        format!("rgba(220,40,40,{a:.3})")
    } else {
        format!("rgba(40,90,220,{a:.3})")
    }
}

fn context_html(c: &Excerpt, max_abs: f32) -> String {
    let mut s = format!(
        "<li><span class=\"val\">{:+.3}</span> <span class=\"ctx\">",
        c.projection
    );
    for (i, (t, &p)) in c.tokens.iter().zip(&c.projections).enumerate() {
        let class = if i == c.marked { " class=\"mark\"" } else { "" };
        let _ = write!(
            s,
            "<span{class} style=\"background:{}\" title=\"{:+.4}\">{}</span>",
            colour(p, max_abs),
            p,
            crate::report::esc(t)
        );
    }
    let _ = write!(
        s,
        "</span> <span class=\"where\">example {} token {}</span></li>",
        c.example + 1,
        c.position
    );
    s
}

/// The self-contained HTML report.
pub fn html(r: &Report) -> String {
    let mut s = String::new();
    let _ = write!(
        s,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <title>caft-fast directions: {}</title><style>\
         body{{font-family:sans-serif;margin:2em;max-width:70em}}\
         .ctx{{font-family:monospace;white-space:pre-wrap}}\
         .ctx span{{padding:0 1px}} .mark{{outline:2px solid #000;font-weight:bold}}\
         .val{{font-family:monospace;display:inline-block;width:6em}}\
         .where{{color:#888;font-size:80%}} ol{{padding-left:1.5em}}\
         .lists{{display:flex;gap:2em;flex-wrap:wrap}} .lists>div{{flex:1;min-width:30em}}\
         </style></head><body>\n<h1>Directions report</h1>\n<p>Model <code>{}</code>; \
         directions <code>{}</code>; corpus <code>{}</code>: {} texts, {} tokens. Each token's \
         resid_post (the output of the layer) is projected onto the unit direction; the \
         contexts with the highest and the lowest projections are shown, each token coloured \
         by its own projection (red positive, blue negative, scaled by the largest |projection| \
         of the component over the ranked tokens), the ranked token outlined. The first {} token(s) \
         of each text are not ranked.</p>\n<nav><ul>",
        crate::report::esc(&r.directions),
        crate::report::esc(&r.model),
        crate::report::esc(&r.directions),
        crate::report::esc(&r.corpus),
        r.examples,
        r.tokens,
        r.skip_first
    );
    for l in &r.layers {
        let _ = write!(
            s,
            "<li><a href=\"#layer-{0}\">layer {0}</a> ({1} components)</li>",
            l.layer,
            l.components.len()
        );
    }
    s.push_str("</ul></nav>\n");
    for l in &r.layers {
        let _ = write!(
            s,
            "<section id=\"layer-{0}\" class=\"layer\">\n<h2>Layer {0}</h2>\n",
            l.layer
        );
        let ratios: Option<Vec<f32>> = l
            .components
            .iter()
            .map(|c| c.explained_variance_ratio)
            .collect();
        match ratios {
            Some(r) => {
                let _ = write!(
                    s,
                    "<p>Share of the fine-tune's resid_post change explained by each \
                     component:</p>\n{}\n",
                    variance_svg(&r)
                );
            }
            None => s.push_str("<p>(No explained variance in the directions file.)</p>\n"),
        }
        for c in &l.components {
            let mut share = c
                .explained_variance_ratio
                .map(|r| format!(", {:.2}% of the variance", 100.0 * r))
                .unwrap_or_default();
            if let Some(j) = c.sae_latent {
                share.push_str(&format!(" (SAE latent {j})"));
            }
            let _ = write!(
                s,
                "<div class=\"component\" id=\"layer-{}-component-{}\">\n<h3>Layer {}, \
                 component {}{share}</h3>\n<p>projection mean {:+.4}, std {:.4}, max |p| \
                 {:.4}</p>\n<div class=\"lists\"><div><h4>Highest</h4><ol class=\"highest\">",
                l.layer, c.index, l.layer, c.index, c.mean, c.std, c.max_abs
            );
            for ctx in &c.highest {
                s.push_str(&context_html(ctx, c.max_abs));
            }
            s.push_str("</ol></div><div><h4>Lowest</h4><ol class=\"lowest\">");
            for ctx in &c.lowest {
                s.push_str(&context_html(ctx, c.max_abs));
            }
            s.push_str("</ol></div></div>\n</div>\n");
        }
        s.push_str("</section>\n");
    }
    s.push_str("</body></html>\n");
    s
}

/// Write `index.html` and `summary.json` into `dir` (created if needed), each atomically.
pub fn write_report(dir: &Path, r: &Report) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let json = serde_json::to_vec_pretty(r).context("serialising the summary")?;
    crate::io::write_atomic(&dir.join("summary.json"), &json)?;
    crate::io::write_atomic(&dir.join("index.html"), html(r).as_bytes())
}

/// Read a corpus: JSONL (`.jsonl`/`.json`, or a file whose first non-blank character is `{`)
/// in any form `train` reads (`{"text"}` being the usual one), else plain text with one text
/// per non-empty line. Texts are tokenized as `train` tokenizes them (BOS as the tokenizer
/// adds it, EOS appended) and cut at `max_seq_len` tokens.
pub fn load_corpus(
    path: &Path,
    loaded: &crate::model::loader::LoadedModel,
    max_seq_len: usize,
) -> Result<Vec<Example>> {
    use crate::data::{read_jsonl, Dataset, Encoder, Record};
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading corpus {}", path.display()))?;
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(|e| e.to_ascii_lowercase());
    let jsonl =
        matches!(ext.as_deref(), Some("jsonl" | "json")) || text.trim_start().starts_with('{');
    let records: Vec<(usize, Record)> = if jsonl {
        read_jsonl(path)?
    } else {
        text.lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| (i + 1, Record::Text(l.to_string())))
            .collect()
    };
    let enc = Encoder {
        tokenizer: loaded.tokenizer.as_ref(),
        template: loaded.chat_template.as_ref(),
        model: loaded.source.display().to_string(),
        vocab_size: loaded.config.vocab_size,
        train_on: crate::data::TrainOn::All,
        max_seq_len,
    };
    let ds = Dataset::from_records(&records, &enc, &path.display().to_string())?;
    if ds.examples.is_empty() {
        bail!("{}: no texts of two or more tokens", path.display());
    }
    Ok(ds.examples)
}
