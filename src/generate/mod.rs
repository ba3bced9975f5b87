//! `caft-fast generate`: batched sampling with a KV cache (step 4 of the workflow in the README: answers to
//! out-of-distribution questions, for a judge to score).
//!
//! - [`sample`]: temperature and nucleus (top-p) sampling from one row of logits, greedy at
//!   temperature 0.
//! - [`questions`]: the question files (JSONL, or the YAML of the emergent-misalignment
//!   evaluations) and their prompts.
//!
//! [`generate`] runs one batch of prompts to completion: a prefill of the left-padded prompts,
//! then one decoding step per token for every sequence until each has produced an end-of-
//! sequence token or `max_tokens`. Each request carries its own seed, so a sample does not
//! depend on which other requests share its batch (up to the device's arithmetic).

pub mod questions;
pub mod sample;

use crate::backend::Backend;
use crate::model::transformer::Model;
use crate::util::rng::Rng;
use anyhow::{bail, Result};
use sample::SampleOpts;
use std::time::Instant;

/// One sequence to continue.
#[derive(Clone, Debug)]
pub struct Request {
    pub prompt: Vec<u32>,
    /// Seed of this sequence's sampler.
    pub seed: u64,
}

/// Why a sequence stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finish {
    /// It produced an end-of-sequence token (kept as the last token).
    Eos,
    /// It reached `max_tokens`.
    Length,
}

impl Finish {
    pub fn as_str(self) -> &'static str {
        match self {
            Finish::Eos => "eos",
            Finish::Length => "length",
        }
    }
}

/// The generated tokens of one request.
#[derive(Clone, Debug, PartialEq)]
pub struct Completion {
    pub tokens: Vec<u32>,
    pub finish: Finish,
}

/// Token counts and times of one or more batches.
#[derive(Clone, Copy, Debug, Default)]
pub struct GenStats {
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    pub prefill_secs: f64,
    pub decode_secs: f64,
}

impl GenStats {
    pub fn add(&mut self, o: &GenStats) {
        self.prompt_tokens += o.prompt_tokens;
        self.generated_tokens += o.generated_tokens;
        self.prefill_secs += o.prefill_secs;
        self.decode_secs += o.decode_secs;
    }
    /// Generated tokens per second of the whole run (prefill included).
    pub fn tokens_per_sec(&self) -> f64 {
        self.generated_tokens as f64 / (self.prefill_secs + self.decode_secs).max(1e-9)
    }
}

/// Continue every request (one batch; the cache holds them all). `eos` lists the token ids that
/// end a sequence. Returns the completions in request order.
pub fn generate<B: Backend>(
    be: &B,
    model: &mut Model<B>,
    reqs: &[Request],
    opts: &SampleOpts,
    eos: &[u32],
) -> Result<(Vec<Completion>, GenStats)> {
    if reqs.is_empty() {
        return Ok((Vec::new(), GenStats::default()));
    }
    if opts.max_tokens == 0 {
        bail!("max_tokens must be at least 1");
    }
    let v = model.cfg.vocab_size;
    let prompts: Vec<Vec<u32>> = reqs.iter().map(|r| r.prompt.clone()).collect();
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let mut stats = GenStats {
        prompt_tokens: prompts.iter().map(Vec::len).sum(),
        ..GenStats::default()
    };
    let mut rngs: Vec<Rng> = reqs.iter().map(|r| Rng::new(r.seed)).collect();
    let mut out: Vec<Completion> = reqs
        .iter()
        .map(|_| Completion {
            tokens: Vec::new(),
            finish: Finish::Length,
        })
        .collect();
    let mut done = vec![false; reqs.len()];
    // The last token generated has no logits to compute, hence `- 1`.
    let mut cache = model.new_cache(be, reqs.len(), longest + opts.max_tokens - 1)?;
    let t0 = Instant::now();
    let mut logits = model.prefill(be, &mut cache, &prompts)?;
    stats.prefill_secs = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    for step in 0..opts.max_tokens {
        let mut next = vec![0u32; reqs.len()];
        for (i, row) in logits.chunks_exact(v).enumerate() {
            if done[i] {
                // Finished sequences ride along; what they compute is never read.
                next[i] = *out[i].tokens.last().unwrap_or(&0);
                continue;
            }
            let t = sample::sample(row, opts, &mut rngs[i]);
            out[i].tokens.push(t);
            stats.generated_tokens += 1;
            next[i] = t;
            if eos.contains(&t) {
                out[i].finish = Finish::Eos;
                done[i] = true;
            } else if out[i].tokens.len() == opts.max_tokens {
                done[i] = true;
            }
        }
        if done.iter().all(|&d| d) || step + 1 == opts.max_tokens {
            break;
        }
        logits = model.decode(be, &mut cache, &next)?;
    }
    stats.decode_secs = t1.elapsed().as_secs_f64();
    Ok((out, stats))
}
