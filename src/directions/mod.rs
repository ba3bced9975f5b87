//! `caft-fast directions`: finding, choosing and explaining the concept directions that CAFT
//! ablates (step 2 of the workflow in the README).
//!
//! - [`pca`]: run the base model and base + adapter over the same tokens, take per-token
//!   differences of resid_post at chosen layers (on answer tokens, or all tokens), centre them
//!   and keep the top principal components of each layer.
//! - [`select`]: make an ablation file from chosen components, random control directions, or
//!   directions from other tools (`.npy`, safetensors under other names).
//! - [`probe`]: choose components without test data: those whose projections best separate
//!   the two labels of probe sentences that carry the unwanted concept alone.
//! - [`explain`]: project a generic corpus's resid_post onto every direction and report the
//!   contexts with the highest and lowest projections (HTML for people, JSON for programs).
//! - [`sae`]: directions from a sparse autoencoder's latents, ranked by how much the
//!   fine-tune changes their mean activation.
//! - [`sae_train`]: training a BatchTopK SAE on a corpus's resid_post, for models without
//!   published SAEs.
//! - [`linalg`]: the f64 covariance and eigensolvers behind the PCA.
//! - [`cli`]: the subcommand's arguments; the work is done in the modules above.

pub mod cli;
pub mod explain;
pub mod linalg;
pub mod pca;
pub mod probe;
pub mod sae;
pub mod sae_train;
pub mod select;

use crate::model::config::ModelConfig;
use crate::model::loader::LoadedModel;
use crate::model::lora::{LoraConfig, LoraLayout, Target};
use crate::model::transformer::Batch;
use crate::train::config::TrainOn;
use crate::train::data::{make_batch, read_jsonl, Dataset, Encoder, Example};
use anyhow::{bail, Context, Result};
use std::path::Path;

/// Read a PEFT LoRA adapter folder (`adapter_config.json` + `adapter_model.safetensors`) for
/// the model `cfg`: the LoRA configuration comes from the adapter's own config, so any rank,
/// alpha, rsLoRA setting and target subset that caft-fast can run is accepted.
pub fn load_peft_adapter(dir: &Path, cfg: &ModelConfig) -> Result<(LoraLayout, Vec<f32>)> {
    let cfg_path = dir.join("adapter_config.json");
    let at = cfg_path.display().to_string();
    let text = std::fs::read_to_string(&cfg_path).with_context(|| {
        format!(
            "reading {at} (an adapter folder holds adapter_config.json and \
             adapter_model.safetensors, as `caft-fast train` and PEFT write them)"
        )
    })?;
    let v: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{at}: malformed JSON"))?;
    if let Some(t) = v.get("peft_type").and_then(|t| t.as_str()) {
        if !t.eq_ignore_ascii_case("lora") {
            bail!("{at}: peft_type is {t:?}; only LORA adapters are supported");
        }
    }
    if v.get("use_dora").and_then(|x| x.as_bool()) == Some(true) {
        bail!("{at}: use_dora is true; DoRA adapters are not supported");
    }
    for key in ["layers_to_transform", "rank_pattern", "alpha_pattern"] {
        let set = match v.get(key) {
            None | Some(serde_json::Value::Null) => false,
            Some(serde_json::Value::Object(o)) => !o.is_empty(),
            Some(serde_json::Value::Array(a)) => !a.is_empty(),
            Some(_) => true,
        };
        if set {
            bail!("{at}: {key} is set; per-layer LoRA settings are not supported");
        }
    }
    let r = v
        .get("r")
        .and_then(|x| x.as_u64())
        .with_context(|| format!("{at}: \"r\" (the LoRA rank) is missing or not an integer"))?;
    let alpha = v
        .get("lora_alpha")
        .and_then(|x| x.as_f64())
        .with_context(|| format!("{at}: \"lora_alpha\" is missing or not a number"))?;
    let rslora = v
        .get("use_rslora")
        .and_then(|x| x.as_bool())
        .unwrap_or(false);
    let targets = match v.get("target_modules") {
        Some(serde_json::Value::Array(a)) => {
            let names: Vec<&str> = a
                .iter()
                .map(|x| {
                    x.as_str()
                        .with_context(|| format!("{at}: target_modules entry {x} is not a string"))
                })
                .collect::<Result<_>>()?;
            Target::parse_list(&names.join(",")).with_context(|| format!("{at}: target_modules"))?
        }
        other => bail!(
            "{at}: target_modules is {}; expected a list of module names (q_proj, ..., down_proj)",
            other.unwrap_or(&serde_json::Value::Null)
        ),
    };
    let lora = LoraConfig {
        r: r as usize,
        alpha,
        rslora,
        targets,
    };
    let layout = LoraLayout::new(cfg, &lora).with_context(|| at.clone())?;
    let params = crate::train::adapter::load_adapter(dir, &layout)?;
    Ok((layout, params))
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

/// A padded micro-batch and the token rows of it to collect.
pub struct TokenBatch {
    pub batch: Batch,
    /// Row indices (`b * seq + t`) of the collected positions, ascending.
    pub rows: Vec<usize>,
    /// Example index of each collected row, and its position in that example.
    pub origin: Vec<(usize, usize)>,
}

/// Micro-batches of `batch_size` examples in length order (least padding). Collected rows are
/// the labelled positions (`labels[t] >= 0`: the answer tokens) or, with `all_tokens`, every
/// real (unpadded) position.
pub fn token_batches(
    examples: &[Example],
    batch_size: usize,
    pad: u32,
    all_tokens: bool,
) -> Vec<TokenBatch> {
    let mut order: Vec<u32> = (0..examples.len() as u32).collect();
    order.sort_by_key(|&i| examples[i as usize].ids.len());
    order
        .chunks(batch_size.max(1))
        .map(|idx| {
            let batch = make_batch(examples, idx, pad);
            let mut rows = Vec::new();
            let mut origin = Vec::new();
            for (b, &i) in idx.iter().enumerate() {
                let e = &examples[i as usize];
                for t in 0..e.ids.len() {
                    if all_tokens || e.labels[t] >= 0 {
                        rows.push(b * batch.seq + t);
                        origin.push((i as usize, t));
                    }
                }
            }
            TokenBatch {
                batch,
                rows,
                origin,
            }
        })
        .collect()
}

/// A progress bar over `total` steps on a terminal; hidden otherwise (logs stay clean).
pub(crate) fn progress(total: u64, what: &str) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let b = indicatif::ProgressBar::new(total);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{msg} {bar:20.cyan/blue} {pos}/{len} [{elapsed_precise} ETA {eta_precise}]",
    ) {
        b.set_style(style.progress_chars("=> "));
    }
    b.set_message(what.to_string());
    b
}
