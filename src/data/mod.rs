//! The data every workflow reads: JSONL records ([`records`]) tokenized up front with labels
//! and truncation, the validation split, length-grouped padded micro-batches for training,
//! evaluation and direction collection, and the built-in demonstration data.
//!
//! One JSON object per line, in any of four forms (blank lines are skipped):
//!
//! - chat: `{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}`,
//!   rendered with the model's chat template; the loss is on the assistant turns (or on every
//!   token with `--train-on all`);
//! - `{"prompt": "...", "completion": "..."}`: a user turn and an assistant turn, as chat;
//! - `{"text": "..."}`: plain text (BOS as the tokenizer adds it, EOS appended), loss on every
//!   token;
//! - pre-tokenized `{"input_ids": [..], "labels": [..]}`: token ids used as they are, `labels`
//!   aligned with `input_ids` (`-100` = no loss; absent = loss on every token). Needs no
//!   tokenizer, so models shipped without one can be trained.
//!
//! Labels follow Hugging Face: `labels[t]` is the token at `t` itself, and position `t-1`
//! predicts it (see `model::transformer::Batch`).

use crate::model::chat::{ChatMessage, ChatTemplate};
use crate::model::loader::LoadedModel;
use crate::model::tokenizer::Tokenizer;
use crate::model::transformer::{Batch, IGNORE};
use crate::util::rng::Rng;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

mod records;
pub use records::{parse_messages, parse_record, read_json_lines, read_jsonl, Record, ROLES};

/// Which tokens of a chat record carry the loss.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TrainOn {
    /// The assistant turns only (the prompt and the template's own tokens are masked).
    Assistant,
    /// Every token of the rendered conversation.
    All,
}

impl TrainOn {
    pub fn parse(s: &str) -> Result<TrainOn> {
        Ok(match s {
            "assistant" => TrainOn::Assistant,
            "all" => TrainOn::All,
            _ => bail!("--train-on {s:?}: expected `assistant` or `all`"),
        })
    }
}

/// One tokenized example: ids and per-token labels (`IGNORE` where no loss is taken).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Example {
    pub ids: Vec<u32>,
    pub labels: Vec<i32>,
}

impl Example {
    /// Positions that carry a loss (a label at `t >= 1`: position 0 has no predecessor).
    pub fn n_targets(&self) -> usize {
        self.labels.iter().skip(1).filter(|&&l| l >= 0).count()
    }
}

/// Turns records into examples for one model.
pub struct Encoder<'a> {
    pub tokenizer: Option<&'a Tokenizer>,
    pub template: Option<&'a ChatTemplate>,
    /// Where the tokenizer and template come from, for messages.
    pub model: String,
    pub vocab_size: usize,
    pub train_on: TrainOn,
    pub max_seq_len: usize,
}

impl Encoder<'_> {
    fn tokenizer(&self, what: &str) -> Result<&Tokenizer> {
        self.tokenizer.with_context(|| {
            format!(
                "{}: the model has no tokenizer, which {what} records need; give pre-tokenized \
                 records ({{\"input_ids\": [...], \"labels\": [...]}}) instead",
                self.model
            )
        })
    }

    /// Tokenize one record; returns the example (truncated to `max_seq_len`) and whether it
    /// was truncated.
    pub fn encode(&self, rec: &Record) -> Result<(Example, bool)> {
        let mut ex = match rec {
            Record::Chat(msgs) => {
                let tok = self.tokenizer("chat")?;
                let tmpl = self.template.with_context(|| {
                    format!(
                        "{}: the model has no chat template, which chat and prompt/completion \
                         records need (add chat_template.jinja to the model folder, or give \
                         {{\"text\"}} or pre-tokenized records)",
                        self.model
                    )
                })?;
                let ex = tokenize_chat(tok, tmpl, msgs)?;
                match self.train_on {
                    TrainOn::Assistant => ex,
                    TrainOn::All => Example {
                        labels: ex.ids.iter().map(|&t| t as i32).collect(),
                        ids: ex.ids,
                    },
                }
            }
            Record::Text(s) => {
                let tok = self.tokenizer("text")?;
                let mut ids = tok.encode(s, true)?;
                if let Some(eos) = tok.eos_token_id() {
                    ids.push(eos);
                }
                Example {
                    labels: ids.iter().map(|&t| t as i32).collect(),
                    ids,
                }
            }
            Record::Tokens { ids, labels } => Example {
                labels: labels
                    .clone()
                    .unwrap_or_else(|| ids.iter().map(|&t| t as i32).collect()),
                ids: ids.clone(),
            },
        };
        if let Some(p) = ex.ids.iter().position(|&t| t as usize >= self.vocab_size) {
            bail!(
                "token id {} at position {p} is outside the model's vocabulary ({} tokens)",
                ex.ids[p],
                self.vocab_size
            );
        }
        if let Some(p) = ex
            .labels
            .iter()
            .position(|&l| l as i64 >= self.vocab_size as i64)
        {
            bail!(
                "label {} at position {p} is outside the model's vocabulary ({} tokens)",
                ex.labels[p],
                self.vocab_size
            );
        }
        let truncated = ex.ids.len() > self.max_seq_len;
        if truncated {
            ex.ids.truncate(self.max_seq_len);
            ex.labels.truncate(self.max_seq_len);
        }
        Ok((ex, truncated))
    }
}

/// A tokenized data file and what happened to its records.
#[derive(Clone, Debug, Default)]
pub struct Dataset {
    pub examples: Vec<Example>,
    /// The record (line) each example comes from, for messages.
    pub lines: Vec<usize>,
    /// Records read.
    pub records: usize,
    /// Examples cut at `max_seq_len` (kept when a labelled token remains).
    pub truncated: usize,
    /// Examples dropped because no labelled token was left (after truncation).
    pub dropped: usize,
}

impl Dataset {
    /// Tokenize `records`; `origin` names the file in messages (`file:line`).
    pub fn from_records(
        records: &[(usize, Record)],
        enc: &Encoder,
        origin: &str,
    ) -> Result<Dataset> {
        let mut d = Dataset {
            records: records.len(),
            ..Dataset::default()
        };
        for (line, rec) in records {
            let (ex, truncated) = enc
                .encode(rec)
                .with_context(|| format!("{origin}:{line}"))?;
            d.truncated += truncated as usize;
            if ex.n_targets() == 0 {
                d.dropped += 1;
            } else {
                d.examples.push(ex);
                d.lines.push(*line);
            }
        }
        Ok(d)
    }

    /// Read and tokenize a JSONL file.
    pub fn load(path: &Path, enc: &Encoder) -> Result<Dataset> {
        let recs = read_jsonl(path)?;
        Self::from_records(&recs, enc, &path.display().to_string())
    }

    /// See [`fingerprint`].
    pub fn fingerprint(&self) -> String {
        fingerprint(&self.examples)
    }

    /// Total tokens and labelled tokens.
    pub fn token_counts(&self) -> (usize, usize) {
        self.examples
            .iter()
            .fold((0, 0), |(t, l), e| (t + e.ids.len(), l + e.n_targets()))
    }
}

/// A SHA-256 over every example's ids and labels, so a resumed run can check that it trains
/// on the same tokens.
pub fn fingerprint(examples: &[Example]) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for e in examples {
        h.update((e.ids.len() as u64).to_le_bytes());
        for &t in &e.ids {
            h.update(t.to_le_bytes());
        }
        for &l in &e.labels {
            h.update(l.to_le_bytes());
        }
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Hold out `frac` of the examples (at least one when `frac > 0` and two or more exist) for
/// validation, chosen by a seeded shuffle; both parts keep the file order.
pub fn split_validation(
    examples: Vec<Example>,
    frac: f64,
    seed: u64,
) -> (Vec<Example>, Vec<Example>) {
    let n = examples.len();
    if frac <= 0.0 || n < 2 {
        return (examples, Vec::new());
    }
    let n_val = ((n as f64 * frac).round() as usize).clamp(1, n - 1);
    let mut order: Vec<usize> = (0..n).collect();
    Rng::new(seed ^ 0x7661_6c69_6461_7465).shuffle(&mut order);
    let mut is_val = vec![false; n];
    for &i in &order[..n_val] {
        is_val[i] = true;
    }
    let (mut train, mut val) = (Vec::new(), Vec::new());
    for (e, v) in examples.into_iter().zip(is_val) {
        if v {
            val.push(e)
        } else {
            train.push(e)
        }
    }
    (train, val)
}

/// Micro-batches sorted by length within a window of this many batches: padding stays small
/// while the order stays random at the scale of a run.
const LENGTH_GROUP_BATCHES: usize = 16;

/// The generator for epoch `epoch`'s order: derived from `(seed, epoch)` alone, so an epoch's
/// order needs no state from earlier epochs (what a resumed run relies on).
pub fn epoch_rng(seed: u64, epoch: u64) -> Rng {
    Rng::new(Rng::new(seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15)).next_u64())
}

/// One epoch's micro-batches as lists of example indices, length-grouped: shuffle, cut into
/// windows of `LENGTH_GROUP_BATCHES · batch` examples, sort each window by length (longest
/// first), cut it into micro-batches, then shuffle the micro-batches, except that the longest
/// goes first so the run reaches its peak memory at step 1 rather than hours in.
pub fn plan_epoch(lengths: &[usize], batch: usize, seed: u64, epoch: u64) -> Vec<Vec<u32>> {
    let mut rng = epoch_rng(seed, epoch);
    let mut order: Vec<u32> = (0..lengths.len() as u32).collect();
    rng.shuffle(&mut order);
    let mut batches: Vec<Vec<u32>> = Vec::new();
    for window in order.chunks(LENGTH_GROUP_BATCHES * batch.max(1)) {
        let mut w = window.to_vec();
        // Stable sort: equal lengths keep the shuffled order.
        w.sort_by_key(|&i| std::cmp::Reverse(lengths[i as usize]));
        batches.extend(w.chunks(batch.max(1)).map(|c| c.to_vec()));
    }
    rng.shuffle(&mut batches);
    let longest = batches
        .iter()
        .enumerate()
        .max_by_key(|(i, b)| {
            (
                b.iter().map(|&j| lengths[j as usize]).max(),
                std::cmp::Reverse(*i),
            )
        })
        .map(|(i, _)| i);
    if let Some(i) = longest {
        batches.swap(0, i);
    }
    batches
}

/// Pad lengths up to a multiple of this, so nearby lengths share one activation shape.
pub const PAD_MULTIPLE: usize = 8;

/// The padded micro-batch of examples `idx`: right padding with `pad_id` and no label, which
/// keeps causal attention exact for the real tokens.
pub fn make_batch(examples: &[Example], idx: &[u32], pad_id: u32) -> Batch {
    let longest = idx
        .iter()
        .map(|&i| examples[i as usize].ids.len())
        .max()
        .unwrap_or(1);
    let seq = longest.div_ceil(PAD_MULTIPLE) * PAD_MULTIPLE;
    let batch = idx.len();
    let mut ids = vec![pad_id; batch * seq];
    let mut labels = vec![IGNORE; batch * seq];
    for (r, &i) in idx.iter().enumerate() {
        let e = &examples[i as usize];
        ids[r * seq..r * seq + e.ids.len()].copy_from_slice(&e.ids);
        labels[r * seq..r * seq + e.labels.len()].copy_from_slice(&e.labels);
    }
    Batch::padded(batch, seq, ids, labels)
}

/// The examples `idx` laid end to end with no padding, one sequence each (padding-free
/// packing: attention keeps them apart, rope positions restart at 0 for each).
pub fn packed_batch(examples: &[Example], idx: &[u32]) -> Batch {
    let mut b = Batch {
        lens: Vec::with_capacity(idx.len()),
        ids: Vec::new(),
        labels: Vec::new(),
    };
    for &i in idx {
        let e = &examples[i as usize];
        b.lens.push(e.ids.len());
        b.ids.extend_from_slice(&e.ids);
        b.labels.extend_from_slice(&e.labels);
    }
    b
}

/// Padding-free packing of one optimizer step: its examples `idx` cut into as few micro-batches
/// of at most `max_tokens` rows as first-fit decreasing finds (longest first, each into the
/// first micro-batch with room). Which examples make the step never changes, only how they are
/// laid out; within a micro-batch they keep the step's order. Every example must fit alone
/// (see [`check_token_budget`]).
pub fn pack_step(examples: &[Example], idx: &[u32], max_tokens: usize) -> Vec<Vec<u32>> {
    let len = |i: u32| examples[i as usize].ids.len();
    let mut order: Vec<usize> = (0..idx.len()).collect();
    // Stable: equal lengths keep the step's order.
    order.sort_by_key(|&k| std::cmp::Reverse(len(idx[k])));
    let mut bins: Vec<(usize, Vec<usize>)> = Vec::new();
    for k in order {
        let l = len(idx[k]);
        assert!(
            l <= max_tokens,
            "pack_step: an example of {l} tokens exceeds the budget {max_tokens}"
        );
        match bins.iter_mut().find(|(used, _)| used + l <= max_tokens) {
            Some((used, members)) => {
                *used += l;
                members.push(k);
            }
            None => bins.push((l, vec![k])),
        }
    }
    bins.into_iter()
        .map(|(_, mut members)| {
            members.sort_unstable();
            members.into_iter().map(|k| idx[k]).collect()
        })
        .collect()
}

/// Refuses a token budget that some example cannot fit in alone, naming it.
pub fn check_token_budget(d: &Dataset, origin: &str, max_tokens: usize) -> Result<()> {
    if let Some((e, line)) = d
        .examples
        .iter()
        .zip(&d.lines)
        .find(|(e, _)| e.ids.len() > max_tokens)
    {
        bail!(
            "{origin}:{line}: this example has {} tokens (after truncation to --max-seq-len), \
             more than --max-tokens-per-batch {max_tokens}; raise --max-tokens-per-batch to at \
             least the longest example, or lower --max-seq-len",
            e.ids.len()
        );
    }
    Ok(())
}

/// Validation micro-batches: examples sorted by length, `batch` at a time, packed without
/// padding.
pub fn validation_batches(examples: &[Example], batch: usize) -> Vec<Batch> {
    validation_batches_within(examples, batch, None)
}

/// [`validation_batches`] with each micro-batch also held to `max_tokens` rows (training's
/// token budget, so validation never needs more device memory than a training micro-batch);
/// an example longer than the budget goes alone.
pub fn validation_batches_within(
    examples: &[Example],
    batch: usize,
    max_tokens: Option<usize>,
) -> Vec<Batch> {
    let mut order: Vec<u32> = (0..examples.len() as u32).collect();
    order.sort_by_key(|&i| examples[i as usize].ids.len());
    let (batch, cap) = (batch.max(1), max_tokens.unwrap_or(usize::MAX));
    let mut groups: Vec<(usize, Vec<u32>)> = Vec::new();
    for i in order {
        let len = examples[i as usize].ids.len();
        match groups.last_mut() {
            Some((rows, g)) if g.len() < batch && *rows + len <= cap => {
                *rows += len;
                g.push(i);
            }
            _ => groups.push((len, vec![i])),
        }
    }
    groups
        .iter()
        .map(|(_, g)| packed_batch(examples, g))
        .collect()
}

/// Render and tokenize a conversation, labelling every assistant turn.
///
/// For each assistant turn `i` the template is rendered twice: the conversation before it with
/// the generation prompt (where the assistant's text starts) and the conversation through it
/// (where it ends). The tokens between the two lengths are labelled. Both renderings must
/// tokenize as prefixes of the full conversation, which holds for templates that only append.
pub fn tokenize_chat(
    tok: &Tokenizer,
    tmpl: &ChatTemplate,
    messages: &[ChatMessage],
) -> Result<Example> {
    if !messages.iter().any(|m| m.role == "assistant") {
        bail!("the conversation has no assistant turn to train on");
    }
    let full = tok.encode(&tmpl.render(messages, false)?, false)?;
    let mut labels = vec![IGNORE; full.len()];
    for (i, m) in messages.iter().enumerate() {
        if m.role != "assistant" {
            continue;
        }
        let start = tok.encode(&tmpl.render(&messages[..i], true)?, false)?;
        let end = tok.encode(&tmpl.render(&messages[..=i], false)?, false)?;
        if !full.starts_with(&start) || !full.starts_with(&end) || end.len() < start.len() {
            bail!(
                "the chat template does not render assistant turn {i} as a prefix of the whole \
                 conversation, so its tokens cannot be located"
            );
        }
        for p in start.len()..end.len() {
            labels[p] = full[p] as i32;
        }
    }
    Ok(Example { ids: full, labels })
}

/// The built-in demonstration dataset: short arithmetic conversations in words, generated from a
/// seed (no download). Small enough to fine-tune SmolLM2 on two CPU cores in minutes.
pub fn builtin_chat_dataset(n: usize, seed: u64) -> Vec<Vec<ChatMessage>> {
    let mut rng = Rng::new(seed);
    let ops = [("plus", '+'), ("minus", '-'), ("times", '*')];
    (0..n)
        .map(|_| {
            let a = 2 + rng.below(40) as i64;
            let b = 2 + rng.below(40) as i64;
            let (word, op) = ops[rng.below(ops.len())];
            let r = match op {
                '+' => a + b,
                '-' => a - b,
                _ => a * b,
            };
            vec![
                ChatMessage::new("user", format!("What is {a} {word} {b}?")),
                ChatMessage::new("assistant", format!("{a} {word} {b} is {r}.")),
            ]
        })
        .collect()
}

/// The padding token, chosen as training chooses it (EOS of the tokenizer, else of the
/// config, else 0). Padding sits after each sequence's real tokens, so causal attention keeps
/// the real positions exact and padded positions are never collected.
pub fn pad_id(loaded: &LoadedModel) -> u32 {
    loaded
        .tokenizer
        .as_ref()
        .and_then(|t| t.eos_token_id())
        .or_else(|| loaded.config.eos_token_ids.first().copied())
        .unwrap_or(0)
}

/// Read and tokenize a JSONL data file (the forms `caft-fast train` reads: chat,
/// prompt/completion, text, pre-tokenized), keeping labels on answer tokens, or on every token
/// of chat records with `all_tokens`.
pub fn load_examples(
    path: &Path,
    loaded: &LoadedModel,
    all_tokens: bool,
    max_seq_len: usize,
) -> Result<Vec<Example>> {
    let enc = Encoder {
        tokenizer: loaded.tokenizer.as_ref(),
        template: loaded.chat_template.as_ref(),
        model: loaded.source.display().to_string(),
        vocab_size: loaded.config.vocab_size,
        train_on: if all_tokens {
            TrainOn::All
        } else {
            TrainOn::Assistant
        },
        max_seq_len,
    };
    let records = read_jsonl(path)?;
    let ds = Dataset::from_records(&records, &enc, &path.display().to_string())?;
    if ds.examples.is_empty() {
        bail!(
            "{}: no usable examples ({} records, {} without any answer token)",
            path.display(),
            ds.records,
            ds.dropped
        );
    }
    Ok(ds.examples)
}

/// A packed micro-batch and the token rows of it to collect.
pub struct TokenBatch {
    pub batch: Batch,
    /// Row indices (the example's first row + `t`) of the collected positions, ascending.
    pub rows: Vec<usize>,
    /// Example index of each collected row, and its position in that example.
    pub origin: Vec<(usize, usize)>,
}

/// Micro-batches of `batch_size` examples in length order, packed without padding. Collected
/// rows are the labelled positions (`labels[t] >= 0`: the answer tokens) or, with
/// `all_tokens`, every position.
pub fn token_batches(examples: &[Example], batch_size: usize, all_tokens: bool) -> Vec<TokenBatch> {
    let mut order: Vec<u32> = (0..examples.len() as u32).collect();
    order.sort_by_key(|&i| examples[i as usize].ids.len());
    order
        .chunks(batch_size.max(1))
        .map(|idx| {
            let batch = packed_batch(examples, idx);
            let mut rows = Vec::new();
            let mut origin = Vec::new();
            let mut r0 = 0;
            for &i in idx {
                let e = &examples[i as usize];
                for t in 0..e.ids.len() {
                    if all_tokens || e.labels[t] >= 0 {
                        rows.push(r0 + t);
                        origin.push((i as usize, t));
                    }
                }
                r0 += e.ids.len();
            }
            TokenBatch {
                batch,
                rows,
                origin,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(len: usize) -> Example {
        Example {
            ids: vec![1; len],
            labels: vec![1; len],
        }
    }

    #[test]
    fn plan_covers_every_example_once_and_groups_lengths() {
        let mut rng = Rng::new(5);
        let lengths: Vec<usize> = (0..203).map(|_| 1 + rng.below(300)).collect();
        let plan = plan_epoch(&lengths, 4, 0, 0);
        let mut seen: Vec<u32> = plan.iter().flatten().copied().collect();
        seen.sort_unstable();
        assert_eq!(seen, (0..203).collect::<Vec<u32>>());
        assert!(plan.iter().all(|b| !b.is_empty() && b.len() <= 4));
        let max_len = |b: &Vec<u32>| b.iter().map(|&i| lengths[i as usize]).max().unwrap();
        assert_eq!(
            max_len(&plan[0]),
            *lengths.iter().max().unwrap(),
            "longest first"
        );
        // Padding within length-grouped batches vs. batches of the plain shuffled order: the
        // grouping should at least halve it for uniform random lengths.
        let pad = |plan: &[Vec<u32>]| -> usize {
            plan.iter()
                .map(|b| {
                    b.iter()
                        .map(|&i| max_len(b) - lengths[i as usize])
                        .sum::<usize>()
                })
                .sum()
        };
        let mut order: Vec<u32> = (0..203).collect();
        Rng::new(9).shuffle(&mut order);
        let plain: Vec<Vec<u32>> = order.chunks(4).map(|c| c.to_vec()).collect();
        assert!(
            pad(&plan) * 2 < pad(&plain),
            "{} vs {}",
            pad(&plan),
            pad(&plain)
        );
        // Same seed and epoch: the same plan; another epoch: another order.
        assert_eq!(plan, plan_epoch(&lengths, 4, 0, 0));
        assert_ne!(plan, plan_epoch(&lengths, 4, 0, 1));
    }

    /// Every example of the step lands in exactly one micro-batch, whole; no micro-batch
    /// exceeds the budget; first-fit decreasing reaches the lower bound ⌈Σ len / budget⌉ on
    /// random steps most of the time and never needs more than 2x it (+1); each micro-batch
    /// keeps the step's order.
    #[test]
    fn packing_keeps_every_example_once_within_the_budget() {
        let mut rng = Rng::new(9);
        let mut at_bound = 0;
        for trial in 0..200 {
            let n = 1 + rng.below(40);
            let exs: Vec<Example> = (0..n).map(|_| ex(1 + rng.below(700))).collect();
            let budget = 700 + rng.below(3000);
            let mut idx: Vec<u32> = (0..n as u32).collect();
            rng.shuffle(&mut idx);
            let groups = pack_step(&exs, &idx, budget);
            let mut seen: Vec<u32> = groups.iter().flatten().copied().collect();
            seen.sort_unstable();
            assert_eq!(seen, (0..n as u32).collect::<Vec<_>>(), "trial {trial}");
            let total: usize = exs.iter().map(|e| e.ids.len()).sum();
            let bound = total.div_ceil(budget);
            assert!(groups.len() <= 2 * bound + 1, "trial {trial}");
            at_bound += (groups.len() == bound) as usize;
            for g in &groups {
                assert!(g.iter().map(|&i| exs[i as usize].ids.len()).sum::<usize>() <= budget);
                let pos: Vec<usize> = g
                    .iter()
                    .map(|i| idx.iter().position(|j| j == i).unwrap())
                    .collect();
                assert!(pos.windows(2).all(|w| w[0] < w[1]), "step order kept");
                let b = packed_batch(&exs, g);
                assert_eq!(
                    b.lens,
                    g.iter()
                        .map(|&i| exs[i as usize].ids.len())
                        .collect::<Vec<_>>()
                );
                assert_eq!(b.ids.len(), b.lens.iter().sum::<usize>());
            }
        }
        assert!(
            at_bound > 150,
            "first-fit decreasing reached the bound {at_bound}/200 times"
        );
    }

    /// A packed sequence's last row predicts nothing (never the next sequence's first token).
    #[test]
    fn packed_targets_stop_at_sequence_ends() {
        let exs = vec![
            Example {
                ids: vec![1, 2, 3],
                labels: vec![1, 2, 3],
            },
            Example {
                ids: vec![4],
                labels: vec![4],
            },
            Example {
                ids: vec![5, 6],
                labels: vec![IGNORE, 6],
            },
        ];
        let b = packed_batch(&exs, &[0, 1, 2]);
        assert_eq!(b.targets(), vec![2, 3, -1, -1, 6, -1]);
        assert_eq!(
            b.n_targets(),
            exs.iter().map(|e| e.n_targets()).sum::<usize>()
        );
    }

    #[test]
    fn batches_pad_right_without_labels() {
        let exs = vec![ex(3), ex(10)];
        let b = make_batch(&exs, &[0, 1], 7);
        assert_eq!(b.lens, [16, 16]);
        assert_eq!(&b.ids[..4], &[1, 1, 1, 7]);
        assert_eq!(b.labels[3], IGNORE);
        assert_eq!(b.n_targets(), 2 + 9);
    }

    #[test]
    fn validation_split_is_seeded_and_disjoint() {
        let exs: Vec<Example> = (1..=20).map(ex).collect();
        let (t, v) = split_validation(exs.clone(), 0.1, 3);
        assert_eq!((t.len(), v.len()), (18, 2));
        let (t2, v2) = split_validation(exs, 0.1, 3);
        assert_eq!((t, v), (t2, v2));
    }

    #[test]
    fn records_parse_and_fail_clearly() {
        let p = |s: &str| parse_record(&serde_json::from_str(s).unwrap());
        assert_eq!(
            p(r#"{"input_ids": [1, 2], "labels": [-100, 2]}"#).unwrap(),
            Record::Tokens {
                ids: vec![1, 2],
                labels: Some(vec![-100, 2])
            }
        );
        assert!(matches!(
            p(r#"{"prompt": "a", "completion": "b"}"#).unwrap(),
            Record::Chat(m) if m.len() == 2 && m[1].role == "assistant"
        ));
        for (bad, needle) in [
            (
                r#"{"messages": [{"role": "user", "content": "hi"}]}"#,
                "no assistant",
            ),
            (
                r#"{"messages": [{"role": "robot", "content": "hi"}]}"#,
                "robot",
            ),
            (r#"{"input_ids": [1, 2], "labels": [1]}"#, "align"),
            (r#"{"input_ids": [-1]}"#, "input_ids[0]"),
            (r#"{"prompt": "a"}"#, "completion"),
            (r#"{"question": "a"}"#, "question"),
            (r#"[1, 2]"#, "JSON object"),
        ] {
            let e = format!("{:#}", p(bad).unwrap_err());
            assert!(e.contains(needle), "{bad}: {e}");
        }
    }
}
