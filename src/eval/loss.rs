//! Held-out loss: the mean cross-entropy per labelled token, and its perplexity, of a data file
//! read by the training pipeline (`train::data`). Chat records are rendered and masked exactly
//! as `caft-fast train` masks them (loss on the assistant turns; `all` for every token), and
//! the sum over tokens is the one training's validation loss takes: the same quantity as a
//! run's logged `val_loss` (`val_loss_unablated` for a run with directions, since evaluation
//! ablates only when asked).

use crate::backend::device::Device;
use crate::backend::Backend;
use crate::data::TrainOn;
use crate::data::{validation_batches, Dataset, Encoder, Example};
use crate::dist::Dist;
use crate::io::write_json;
use crate::model::loader::LoadedModel;
use crate::model::spec::{ModelSpec, Provenance};
use crate::model::transformer::Model;
use crate::with_backend;
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::path::Path;

/// Options of `eval loss`.
#[derive(Clone, Debug)]
pub struct LossOptions {
    /// Truncate longer examples (as training does; counted in the report).
    pub max_seq_len: usize,
    /// Sequences per forward pass.
    pub batch_size: usize,
    pub train_on: TrainOn,
}

impl Default for LossOptions {
    fn default() -> Self {
        LossOptions {
            max_seq_len: 2048,
            batch_size: 8,
            train_on: TrainOn::Assistant,
        }
    }
}

/// Everything `eval loss` reports.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct LossReport {
    pub data: String,
    #[serde(flatten)]
    pub provenance: Provenance,
    /// `assistant` or `all`.
    pub train_on: String,
    pub max_seq_len: usize,
    /// Records read, examples kept, examples cut at `max_seq_len`, examples dropped (no
    /// labelled token left).
    pub records: usize,
    pub examples: usize,
    pub truncated: usize,
    pub dropped: usize,
    /// Tokens that carry a loss.
    pub tokens: usize,
    /// Σ cross-entropy (nats) over those tokens.
    pub loss_sum: f64,
    /// `loss_sum / tokens`: nats per token.
    pub loss: f64,
    /// `exp(loss)`.
    pub perplexity: f64,
}

/// Read and tokenize `path` as training does; an empty result is an error.
pub fn load_data(
    path: &Path,
    loaded: &LoadedModel,
    train_on: TrainOn,
    max_seq_len: usize,
) -> Result<Dataset> {
    let enc = Encoder {
        tokenizer: loaded.tokenizer.as_ref(),
        template: loaded.chat_template.as_ref(),
        model: loaded.source.display().to_string(),
        vocab_size: loaded.config.vocab_size,
        train_on,
        max_seq_len,
    };
    let ds = Dataset::load(path, &enc)?;
    if ds.examples.is_empty() {
        bail!(
            "{}: no examples to evaluate ({} records read, {} dropped because no labelled token \
             is left within --max-seq-len {max_seq_len})",
            path.display(),
            ds.records,
            ds.dropped
        );
    }
    Ok(ds)
}

/// `(Σ cross-entropy, labelled tokens)` of `examples` under `model`, `batch_size` sequences a
/// forward pass (length-sorted and packed without padding, as training's validation batches);
/// `progress(done, total)` after each pass.
pub fn loss_sum<B: Backend>(
    be: &B,
    model: &mut Model<B>,
    examples: &[Example],
    batch_size: usize,
    mut progress: impl FnMut(usize, usize),
) -> Result<(f64, usize)> {
    let batches = validation_batches(examples, batch_size);
    let (mut sum, mut n) = (0.0, 0usize);
    // In a data-parallel group each rank runs every `size`-th batch; the sums are added.
    let (rank, size) = be.group();
    for (i, b) in batches.iter().enumerate() {
        if i % size != rank {
            progress(i + 1, batches.len());
            continue;
        }
        let out = model.forward(be, b, false).context("evaluation forward")?;
        if !out.loss_sum.is_finite() {
            bail!(
                "the loss of batch {} of {} is {} (NaN or Inf)",
                i + 1,
                batches.len(),
                out.loss_sum
            );
        }
        sum += out.loss_sum;
        n += out.n_targets;
        progress(i + 1, batches.len());
    }
    if size > 1 {
        let mut sums = [sum, n as f64];
        be.all_reduce_host(&mut sums)
            .context("summing the loss across ranks")?;
        (sum, n) = (sums[0], sums[1] as usize);
    }
    Ok((sum, n))
}

/// Evaluate `data` with the model `spec` describes on `be`.
pub fn evaluate_on<B: Backend>(
    be: &B,
    spec: &ModelSpec,
    loaded: &LoadedModel,
    data: &Path,
    opt: &LossOptions,
    progress: impl FnMut(usize, usize),
) -> Result<LossReport> {
    let ds = load_data(data, loaded, opt.train_on, opt.max_seq_len)?;
    let mut model = spec.build(be, loaded)?;
    let (sum, tokens) = loss_sum(be, &mut model, &ds.examples, opt.batch_size, progress)?;
    let loss = sum / tokens.max(1) as f64;
    Ok(LossReport {
        data: data.display().to_string(),
        provenance: spec.provenance(be, loaded, &model),
        train_on: match opt.train_on {
            TrainOn::Assistant => "assistant",
            TrainOn::All => "all",
        }
        .to_string(),
        max_seq_len: opt.max_seq_len,
        records: ds.records,
        examples: ds.examples.len(),
        truncated: ds.truncated,
        dropped: ds.dropped,
        tokens,
        loss_sum: sum,
        loss,
        perplexity: loss.exp(),
    })
}

/// `eval loss` as a function: load the model `spec` describes on `device`, evaluate `data`,
/// and write the report as JSON to `output` when given.
pub fn evaluate(
    spec: &ModelSpec,
    device: Device,
    data: &Path,
    opt: &LossOptions,
    output: Option<&Path>,
    dist: &Dist,
) -> Result<LossReport> {
    if !data.is_file() {
        bail!("data file {} does not exist", data.display());
    }
    let loaded = spec.load()?;
    let report = with_backend!(device, |be| {
        // Several ranks (`--gpus`, torchrun): each takes its share of the passes.
        crate::dist::join(be, dist, crate::dist::args_fingerprint())?;
        let bar = crate::util::progress(0, "eval loss");
        let r = evaluate_on(be, spec, &loaded, data, opt, |i, n| {
            bar.set_length(n as u64);
            bar.set_position(i as u64)
        });
        bar.finish_and_clear();
        r
    })?;
    if let Some(o) = output.filter(|_| dist.world.is_main()) {
        write_json(o, &report)?;
    }
    Ok(report)
}
