//! Training examples: chat conversations rendered with the model's own template and tokenized,
//! with labels on the assistant tokens only (the prompt and template tokens are masked).

use crate::model::chat::{ChatMessage, ChatTemplate};
use crate::model::tokenizer::Tokenizer;
use crate::model::transformer::{Batch, IGNORE};
use crate::util::rng::Rng;
use anyhow::{bail, Context, Result};

/// One tokenized example: ids and per-token labels (`IGNORE` where no loss is taken).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Example {
    pub ids: Vec<u32>,
    pub labels: Vec<i32>,
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

/// Group examples into padded micro-batches of `batch` rows, padded on the right to the longest
/// example of the whole set (so every micro-batch has one shape and buffers are reused). Padding
/// tokens get `pad_id` and no label; right padding keeps causal attention exact for real tokens.
pub fn make_batches(examples: &[Example], batch: usize, pad_id: u32) -> Result<Vec<Batch>> {
    if examples.is_empty() {
        bail!("the dataset is empty");
    }
    let seq = examples
        .iter()
        .map(|e| e.ids.len())
        .max()
        .context("empty")?;
    Ok(examples
        .chunks(batch)
        .filter(|c| c.len() == batch)
        .map(|c| {
            let mut ids = vec![pad_id; batch * seq];
            let mut labels = vec![IGNORE; batch * seq];
            for (r, e) in c.iter().enumerate() {
                ids[r * seq..r * seq + e.ids.len()].copy_from_slice(&e.ids);
                labels[r * seq..r * seq + e.labels.len()].copy_from_slice(&e.labels);
            }
            Batch {
                batch,
                seq,
                ids,
                labels,
            }
        })
        .collect())
}
