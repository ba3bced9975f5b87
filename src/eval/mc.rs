//! Multiple-choice accuracy from next-token logits.
//!
//! One JSON object a line (blank lines are skipped):
//!
//! ```text
//! {"id": "q1", "messages": [{"role": "user", "content": "Which is an animal?\nA. ...\nB. ..."}],
//!  "options": ["A", "B"], "answer": 0, "split": "ood"}
//! {"id": "q2", "prompt": "The capital of France is", "options": [" Paris", " Rome"], "answer": 0}
//! ```
//!
//! `messages` (turns ending with a user turn) are rendered with the model's chat template and
//! the generation prompt, exactly as training renders the text before an assistant turn;
//! `prompt` is raw text, tokenized as a `{"text"}` training record is (BOS as the tokenizer
//! adds it). `split` is any string (default `all`); `id` defaults to `line<N>`; other keys are
//! ignored.
//!
//! The score of option `i` is the logit `z[t_i]` at the prompt's last position, where `t_i` is
//! the first token of option `i` as it is tokenized right after the prompt: the first label
//! of the conversation with the option as the assistant turn (chat), or the token after the
//! prompt's tokens in `prompt + option` (raw). Its log-probability `z[t_i] - logsumexp(z)` is
//! reported too; both give the same ranking. The prediction is the highest score (the lowest
//! index on a tie). Options whose first tokens coincide cannot be told apart this way and are
//! refused, as are empty options.

use crate::backend::device::Device;
use crate::backend::Backend;
use crate::data::{parse_messages, read_json_lines, tokenize_chat};
use crate::dist::Dist;
use crate::io::write_json;
use crate::model::chat::{ChatMessage, ChatTemplate};
use crate::model::loader::LoadedModel;
use crate::model::spec::{ModelSpec, Provenance};
use crate::model::tokenizer::Tokenizer;
use crate::model::transformer::{Batch, Model, IGNORE};
use crate::with_backend;
use anyhow::{bail, Context, Result};
use serde::Serialize;
use serde_json::Value;
use std::path::Path;

/// The text an item's options continue.
#[derive(Clone, Debug, PartialEq)]
pub enum McPrompt {
    /// Chat turns ending with a user turn, rendered with the generation prompt.
    Chat(Vec<ChatMessage>),
    /// Raw text.
    Text(String),
}

/// One multiple-choice question.
#[derive(Clone, Debug, PartialEq)]
pub struct McItem {
    pub id: String,
    /// The line of the data file (1-based), for messages.
    pub line: usize,
    pub prompt: McPrompt,
    pub options: Vec<String>,
    /// Index into `options` of the correct one.
    pub answer: usize,
    pub split: String,
}

/// The split of items that give none.
pub const DEFAULT_SPLIT: &str = "all";

/// Parse one JSONL object into an item (`line` is used for the default id only; the caller
/// adds `file:line` to errors).
pub fn parse_item(v: &Value, line: usize) -> Result<McItem> {
    let obj = v.as_object().context(
        "an item must be a JSON object {\"messages\" or \"prompt\", \"options\", \"answer\"}",
    )?;
    let prompt = match (obj.get("messages"), obj.get("prompt")) {
        (Some(_), Some(_)) => bail!("give either \"messages\" or \"prompt\", not both"),
        (Some(m), None) => {
            let out = parse_messages(m)?;
            if out.is_empty() {
                bail!("\"messages\" is empty; it must end with a user turn");
            }
            let last = &out[out.len() - 1].role;
            if last != "user" {
                bail!(
                    "the last message is a {last} turn; the messages must end with the user \
                     turn the options answer"
                );
            }
            McPrompt::Chat(out)
        }
        (None, Some(p)) => McPrompt::Text(
            p.as_str()
                .context("\"prompt\" must be a string")?
                .to_string(),
        ),
        (None, None) => bail!("missing \"messages\" (chat turns) or \"prompt\" (raw text)"),
    };
    let options: Vec<String> = obj
        .get("options")
        .context("missing \"options\" (a list of answer strings)")?
        .as_array()
        .context("\"options\" must be a list of strings")?
        .iter()
        .enumerate()
        .map(|(i, o)| {
            o.as_str()
                .map(String::from)
                .with_context(|| format!("options[{i}] = {o} is not a string"))
        })
        .collect::<Result<_>>()?;
    if options.len() < 2 {
        bail!(
            "\"options\" has {} entries; a question needs at least two",
            options.len()
        );
    }
    if let Some(i) = options.iter().position(|o| o.trim().is_empty()) {
        bail!("options[{i}] is empty; every option needs text whose first token is scored");
    }
    let answer_v = obj
        .get("answer")
        .context("missing \"answer\" (the index of the correct option)")?;
    let answer = answer_v
        .as_u64()
        .with_context(|| format!("\"answer\" = {answer_v} is not an option index (0, 1, ...)"))?
        as usize;
    if answer >= options.len() {
        bail!(
            "\"answer\" = {answer} is out of range: there are {} options (0..{})",
            options.len(),
            options.len() - 1
        );
    }
    let id = match obj.get("id") {
        None | Some(Value::Null) => format!("line{line}"),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        Some(other) => bail!("\"id\" = {other} must be a string or a number"),
    };
    let split = match obj.get("split") {
        None | Some(Value::Null) => DEFAULT_SPLIT.to_string(),
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        Some(other) => bail!("\"split\" = {other} must be a non-empty string"),
    };
    Ok(McItem {
        id,
        line,
        prompt,
        options,
        answer,
        split,
    })
}

/// Read a multiple-choice JSONL file; errors name `file:line`. A file without items is an
/// error.
pub fn read_items(path: &Path) -> Result<Vec<McItem>> {
    let mut items = Vec::new();
    for (line, v) in read_json_lines(path, "multiple-choice data")? {
        items.push(parse_item(&v, line).with_context(|| format!("{}:{line}", path.display()))?);
    }
    if items.is_empty() {
        bail!(
            "{}: no items (the file is empty); expected one JSON object a line with \
             \"messages\" or \"prompt\", \"options\" and \"answer\"",
            path.display()
        );
    }
    Ok(items)
}

/// An item as token ids: the prompt and the first token of each option.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EncodedItem {
    pub prompt_ids: Vec<u32>,
    pub option_tokens: Vec<u32>,
}

/// Tokenize one item (see the module docs for where each option's first token comes from).
pub fn encode_item(
    item: &McItem,
    tok: &Tokenizer,
    tmpl: Option<&ChatTemplate>,
) -> Result<EncodedItem> {
    let mut prompt_ids: Option<Vec<u32>> = None;
    let mut option_tokens = Vec::with_capacity(item.options.len());
    for (i, opt) in item.options.iter().enumerate() {
        let (prompt, first) = match &item.prompt {
            McPrompt::Chat(msgs) => {
                let tmpl = tmpl.context(
                    "the model has no chat template, which \"messages\" items need (add \
                     chat_template.jinja to the model folder, or give a raw \"prompt\")",
                )?;
                let mut conv = msgs.clone();
                conv.push(ChatMessage::new("assistant", opt.as_str()));
                // The training pipeline's labels: the first labelled token is the option's
                // first token, the tokens before it the prompt with the generation prompt.
                let ex = tokenize_chat(tok, tmpl, &conv)
                    .with_context(|| format!("option {i} ({opt:?})"))?;
                let start = ex.labels.iter().position(|&l| l >= 0).with_context(|| {
                    format!("option {i} ({opt:?}) renders as no assistant token")
                })?;
                (ex.ids[..start].to_vec(), ex.ids[start])
            }
            McPrompt::Text(p) => {
                let prompt = tok.encode(p, true)?;
                let full = tok.encode(&format!("{p}{opt}"), true)?;
                if full.len() <= prompt.len() || !full.starts_with(&prompt) {
                    bail!(
                        "option {i} ({opt:?}): the prompt's tokens change when the option is \
                         appended (the tokenizer merges text across the boundary), so the \
                         option's first token is not defined; put the separating space at the \
                         start of the options rather than at the end of the prompt"
                    );
                }
                (prompt.clone(), full[prompt.len()])
            }
        };
        match &prompt_ids {
            None => prompt_ids = Some(prompt),
            Some(p) if *p != prompt => bail!(
                "option {i} ({opt:?}) changes how the prompt is tokenized; the options must \
                 share one prompt"
            ),
            Some(_) => {}
        }
        if let Some(j) = option_tokens.iter().position(|&t| t == first) {
            let shown = tok
                .decode(&[first])
                .unwrap_or_else(|_| format!("id {first}"));
            bail!(
                "options {j} ({:?}) and {i} ({opt:?}) start with the same token {shown:?} \
                 (id {first}), so the first-token score cannot tell them apart; make their \
                 first tokens differ (e.g. answer letters)",
                item.options[j]
            );
        }
        option_tokens.push(first);
    }
    let prompt_ids = prompt_ids.unwrap_or_default();
    if prompt_ids.is_empty() {
        bail!("the prompt is empty: there is no position to read the next-token logits at");
    }
    Ok(EncodedItem {
        prompt_ids,
        option_tokens,
    })
}

/// Tokenize every item for `loaded`'s tokenizer and template; errors name `origin:line`.
pub fn encode_items(
    items: &[McItem],
    loaded: &LoadedModel,
    origin: &str,
) -> Result<Vec<EncodedItem>> {
    let tok = loaded.tokenizer.as_ref().with_context(|| {
        format!(
            "{}: the model has no tokenizer, which multiple-choice evaluation needs",
            loaded.source.display()
        )
    })?;
    let v = loaded.config.vocab_size;
    items
        .iter()
        .map(|it| {
            let e = encode_item(it, tok, loaded.chat_template.as_ref())?;
            if let Some(&t) = e
                .prompt_ids
                .iter()
                .chain(&e.option_tokens)
                .find(|&&t| t as usize >= v)
            {
                bail!("token id {t} is outside the model's vocabulary ({v} tokens)");
            }
            Ok(e)
        })
        .enumerate()
        .map(|(i, r)| r.with_context(|| format!("{origin}:{}", items[i].line)))
        .collect()
}

/// The scores of one item.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct ItemResult {
    pub id: String,
    pub line: usize,
    pub split: String,
    pub answer: usize,
    pub predicted: usize,
    pub correct: bool,
    /// The first token of each option.
    pub option_tokens: Vec<u32>,
    /// The logit of each option's first token at the prompt's last position.
    pub logits: Vec<f32>,
    /// The same as log-probabilities over the whole vocabulary.
    pub log_probs: Vec<f64>,
    /// The probability of the correct option renormalised over the options' first tokens.
    pub p_answer: f64,
}

/// Accuracy of one split (or of all items).
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct SplitScore {
    pub split: String,
    pub n: usize,
    pub correct: usize,
    pub accuracy: f64,
    /// Mean of [`ItemResult::p_answer`]: a smooth companion of the accuracy.
    pub mean_p_answer: f64,
    /// Mean log-probability of the correct option's first token.
    pub mean_log_prob_answer: f64,
}

/// Everything `eval mc` reports.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct McReport {
    pub data: String,
    #[serde(flatten)]
    pub provenance: Provenance,
    pub overall: SplitScore,
    /// In order of first appearance in the file.
    pub splits: Vec<SplitScore>,
    pub items: Vec<ItemResult>,
}

/// Keep the downloaded logits of one forward pass under this many values (512 MiB of f32).
const LOGITS_BUDGET: usize = 128 << 20;

/// Groups of item indices to run together: by prompt length, at most
/// `batch_size` per group and within [`LOGITS_BUDGET`].
fn plan_batches(enc: &[EncodedItem], batch_size: usize, vocab: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..enc.len()).collect();
    order.sort_by_key(|&i| enc[i].prompt_ids.len());
    let mut out: Vec<Vec<usize>> = Vec::new();
    let mut cur: Vec<usize> = Vec::new();
    let mut rows = 0;
    for i in order {
        let len = enc[i].prompt_ids.len();
        if !cur.is_empty()
            && (cur.len() >= batch_size.max(1) || (rows + len) * vocab > LOGITS_BUDGET)
        {
            out.push(std::mem::take(&mut cur));
            rows = 0;
        }
        cur.push(i);
        rows += len;
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// The results of one item from the logits `z` at its prompt's last position.
pub fn score_item(item: &McItem, enc: &EncodedItem, z: &[f32]) -> Result<ItemResult> {
    if let Some(p) = z.iter().position(|x| !x.is_finite()) {
        bail!("the logit of token {p} is {} (NaN or Inf)", z[p]);
    }
    let logits: Vec<f32> = enc.option_tokens.iter().map(|&t| z[t as usize]).collect();
    Ok(result_of(item, enc, log_sum_exp(z), logits))
}

/// `log Σ exp z` over the vocabulary, in f64.
fn log_sum_exp(z: &[f32]) -> f64 {
    let m = z.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
    m + z.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln()
}

/// An item's result from the log-sum-exp of its logits and its options' logits.
fn result_of(item: &McItem, enc: &EncodedItem, lse: f64, logits: Vec<f32>) -> ItemResult {
    let log_probs: Vec<f64> = logits.iter().map(|&x| x as f64 - lse).collect();
    let mut predicted = 0;
    for (i, &s) in logits.iter().enumerate() {
        if s > logits[predicted] {
            predicted = i;
        }
    }
    let mo = log_probs.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b));
    let norm: f64 = log_probs.iter().map(|&l| (l - mo).exp()).sum();
    let p_answer = (log_probs[item.answer] - mo).exp() / norm;
    ItemResult {
        id: item.id.clone(),
        line: item.line,
        split: item.split.clone(),
        answer: item.answer,
        predicted,
        correct: predicted == item.answer,
        option_tokens: enc.option_tokens.clone(),
        logits,
        log_probs,
        p_answer,
    }
}

/// Score every item with `model` (as it is set up: adapter, ablation), `batch_size` prompts a
/// forward pass, packed end to end without padding; `progress(done)` after each pass. Results
/// are in the items' order.
pub fn score<B: Backend>(
    be: &B,
    model: &mut Model<B>,
    items: &[McItem],
    enc: &[EncodedItem],
    batch_size: usize,
    mut progress: impl FnMut(usize),
) -> Result<Vec<ItemResult>> {
    if items.len() != enc.len() {
        bail!("{} items but {} encodings", items.len(), enc.len());
    }
    let v = model.cfg.vocab_size;
    let mut results: Vec<Option<ItemResult>> = vec![None; items.len()];
    let groups = plan_batches(enc, batch_size, v);
    // In a data-parallel group each rank scores every `size`-th pass; what an item's result
    // needs of the logits (the log-sum-exp and its options' logits) is then summed across
    // ranks into every rank's copy, so every rank ends with all results, bit for bit those
    // of one process.
    let (rank, size) = be.group();
    let offsets: Vec<usize> = enc
        .iter()
        .scan(0, |o, e| {
            let at = *o;
            *o += 1 + e.option_tokens.len();
            Some(at)
        })
        .collect();
    let mut shared = vec![0.0f64; enc.iter().map(|e| 1 + e.option_tokens.len()).sum()];
    for (g, idx) in groups.iter().enumerate() {
        if g % size != rank {
            progress(g + 1);
            continue;
        }
        let prompts = idx.iter().map(|&i| &enc[i].prompt_ids);
        let ids: Vec<u32> = prompts.clone().flatten().copied().collect();
        let batch = Batch {
            lens: prompts.map(Vec::len).collect(),
            labels: vec![IGNORE; ids.len()],
            ids,
        };
        let out = model.forward(be, &batch, true)?;
        let logits = out.logits.context("the forward pass returned no logits")?;
        let mut r0 = 0;
        for &i in idx {
            // Each prompt is read at its own last position.
            let len = enc[i].prompt_ids.len();
            let row = r0 + len - 1;
            r0 += len;
            let z = &logits[row * v..(row + 1) * v];
            let res = score_item(&items[i], &enc[i], z)
                .with_context(|| format!("item {:?} (line {})", items[i].id, items[i].line))?;
            if size > 1 {
                shared[offsets[i]] = log_sum_exp(z);
                for (k, &l) in res.logits.iter().enumerate() {
                    shared[offsets[i] + 1 + k] = l as f64;
                }
            }
            results[i] = Some(res);
        }
        progress(g + 1);
    }
    if size > 1 {
        be.all_reduce_host(&mut shared)
            .context("gathering the items' scores from every rank")?;
        for (i, r) in results.iter_mut().enumerate() {
            if r.is_none() {
                let at = offsets[i];
                let n = enc[i].option_tokens.len();
                let logits: Vec<f32> = shared[at + 1..at + 1 + n]
                    .iter()
                    .map(|&x| x as f32)
                    .collect();
                *r = Some(result_of(&items[i], &enc[i], shared[at], logits));
            }
        }
    }
    Ok(results
        .into_iter()
        .map(|r| r.expect("every item is in one group"))
        .collect())
}

fn split_score(split: &str, rs: &[&ItemResult]) -> SplitScore {
    let n = rs.len();
    let correct = rs.iter().filter(|r| r.correct).count();
    let mean = |f: &dyn Fn(&ItemResult) -> f64| {
        if n == 0 {
            f64::NAN
        } else {
            rs.iter().map(|r| f(r)).sum::<f64>() / n as f64
        }
    };
    SplitScore {
        split: split.to_string(),
        n,
        correct,
        accuracy: if n == 0 {
            f64::NAN
        } else {
            correct as f64 / n as f64
        },
        mean_p_answer: mean(&|r| r.p_answer),
        mean_log_prob_answer: mean(&|r| r.log_probs[r.answer]),
    }
}

/// Accuracy over all results and per split (splits in order of first appearance).
pub fn summarize(results: &[ItemResult]) -> (SplitScore, Vec<SplitScore>) {
    let mut names: Vec<&str> = Vec::new();
    for r in results {
        if !names.contains(&r.split.as_str()) {
            names.push(&r.split);
        }
    }
    let splits = names
        .iter()
        .map(|s| {
            let rs: Vec<&ItemResult> = results.iter().filter(|r| r.split == *s).collect();
            split_score(s, &rs)
        })
        .collect();
    let all: Vec<&ItemResult> = results.iter().collect();
    (split_score("overall", &all), splits)
}

/// The accuracy table `eval mc` prints.
pub fn format_table(report: &McReport) -> String {
    let rows: Vec<&SplitScore> = report
        .splits
        .iter()
        .chain(std::iter::once(&report.overall))
        .collect();
    let w = rows
        .iter()
        .map(|r| r.split.chars().count())
        .max()
        .unwrap_or(5)
        .max(5);
    let mut s = format!(
        "{:<w$}  {:>6}  {:>7}  {:>8}  {:>9}\n",
        "split", "n", "correct", "accuracy", "p(answer)"
    );
    for r in rows {
        s.push_str(&format!(
            "{:<w$}  {:>6}  {:>7}  {:>8.3}  {:>9.3}\n",
            r.split, r.n, r.correct, r.accuracy, r.mean_p_answer
        ));
    }
    s
}

/// Evaluate `items` (read from `data`) with the model `spec` describes on `be`.
pub fn evaluate_on<B: Backend>(
    be: &B,
    spec: &ModelSpec,
    loaded: &LoadedModel,
    data: &Path,
    items: &[McItem],
    batch_size: usize,
    mut progress: impl FnMut(usize, usize),
) -> Result<McReport> {
    let enc = encode_items(items, loaded, &data.display().to_string())?;
    let mut model = spec.build(be, loaded)?;
    let n_groups = plan_batches(&enc, batch_size, loaded.config.vocab_size).len();
    let results = score(be, &mut model, items, &enc, batch_size, |g| {
        progress(g, n_groups)
    })?;
    let (overall, splits) = summarize(&results);
    Ok(McReport {
        data: data.display().to_string(),
        provenance: spec.provenance(be, loaded, &model),
        overall,
        splits,
        items: results,
    })
}

/// `eval mc` as a function: read `data`, load the model `spec` describes on `device`, score
/// every item, and write the report as JSON to `output` when given.
pub fn evaluate(
    spec: &ModelSpec,
    device: Device,
    data: &Path,
    batch_size: usize,
    output: Option<&Path>,
    dist: &Dist,
) -> Result<McReport> {
    // Check the data before loading (and possibly downloading) the model.
    let items = read_items(data)?;
    let loaded = spec.load()?;
    let report = with_backend!(device, |be| {
        // Several ranks (`--gpus`, torchrun): each takes its share of the passes.
        crate::dist::join(be, dist, crate::dist::args_fingerprint())?;
        let bar = crate::util::progress(0, "eval mc");
        let r = evaluate_on(be, spec, &loaded, data, &items, batch_size, |g, n| {
            bar.set_length(n as u64);
            bar.set_position(g as u64)
        });
        bar.finish_and_clear();
        r
    })?;
    if let Some(o) = output.filter(|_| dist.world.is_main()) {
        write_json(o, &report)?;
    }
    Ok(report)
}
