//! `caft-fast bench-step` (training steps, LoRA or full fine-tuning: tokens/s, model TFLOP/s,
//! memory) and `caft-fast bench-generate` (greedy generation: prefill and decode tokens/s).

use super::common::{
    checkpointing_parser, device_parser, method_parser, parse_layers, set_threads, BenchModelArgs,
};
use crate::backend::device::Device;
use crate::backend::Backend;
use crate::generate::sample::SampleOpts;
use crate::generate::{generate, Request};
use crate::model::loader::LoadedModel;
use crate::model::lora::Target;
use crate::model::transformer::{Checkpointing, Model};
use crate::train::config::Method;
use crate::util::rng::Rng;
use crate::with_backend;
use anyhow::{bail, Context, Result};
use clap::Args;
use std::path::PathBuf;
use std::time::Instant;

/// `bench-step`'s LoRA rank, alpha and targets when not given.
const LORA_R: usize = 32;
const LORA_ALPHA: f64 = 64.0;
const LORA_TARGETS: &str = "q,k,v,o,gate,up,down";

#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    #[command(flatten)]
    pub source: BenchModelArgs,
    #[arg(long, value_parser = device_parser(), default_value = "auto")]
    pub device: Device,
    /// What the step trains. The model FLOPs (model_tflop_per_step, achieved_tflops) count
    /// 4 x matrix parameters x tokens for lora (forward and input gradients; frozen weights
    /// get no weight gradient) and 6 x for full (the weight gradients too), plus causal
    /// attention for both.
    #[arg(long, value_parser = method_parser(), default_value = "lora")]
    pub method: Method,
    /// Sequences per step.
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    /// Tokens per sequence (random ids, every one a label).
    #[arg(long, default_value_t = 256)]
    pub seq: usize,
    /// LoRA rank [default: 32]. Refused with --method full.
    #[arg(long)]
    pub lora_r: Option<usize>,
    /// LoRA alpha (rsLoRA scaling) [default: 64]. Refused with --method full.
    #[arg(long)]
    pub lora_alpha: Option<f64>,
    /// Comma-separated LoRA targets [default: q,k,v,o,gate,up,down]. Refused with --method
    /// full.
    #[arg(long)]
    pub lora_targets: Option<String>,
    /// Keep only the model's first N layers (a quick run of a large shape).
    #[arg(long, value_name = "N")]
    pub layers: Option<usize>,
    /// Layers to ablate (empty: no ablation).
    #[arg(long, default_value = "")]
    pub ablate_layers: String,
    /// Random directions per ablated layer.
    #[arg(long, default_value_t = 8)]
    pub ablate_k: usize,
    /// Activation checkpointing, as `train --checkpointing`.
    #[arg(long, value_parser = checkpointing_parser(), default_value = "none")]
    pub checkpointing: Checkpointing,
    /// Timed optimizer steps.
    #[arg(long, default_value_t = 3)]
    pub steps: usize,
    /// Untimed steps first.
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// CPU threads (0 = all cores).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Also write the JSON result line to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

impl BenchArgs {
    /// The LoRA flags given on the command line, by name.
    fn lora_flags(&self) -> Vec<&'static str> {
        [
            ("--lora-r", self.lora_r.is_some()),
            ("--lora-alpha", self.lora_alpha.is_some()),
            ("--lora-targets", self.lora_targets.is_some()),
        ]
        .into_iter()
        .filter_map(|(name, given)| given.then_some(name))
        .collect()
    }
}

pub fn bench_step(a: BenchArgs) -> Result<()> {
    if a.method == Method::Full {
        let lora = a.lora_flags();
        if !lora.is_empty() {
            bail!(
                "{} {} LoRA-only: bench-step --method full trains every weight, with no adapter \
                 to shape; drop {}",
                lora.join(", "),
                if lora.len() == 1 { "is" } else { "are" },
                if lora.len() == 1 { "it" } else { "them" }
            );
        }
    }
    set_threads(a.threads);
    let mut loaded = a.source.load()?;
    if let Some(n) = a.layers {
        let total = loaded.config.num_layers;
        if n == 0 || n > total {
            bail!("--layers {n}: the model has {total} layers; give 1 to {total}");
        }
        loaded.config.num_layers = n;
        if let Some(sliding) = loaded.config.sliding_layers.as_mut() {
            sliding.truncate(n);
        }
    }
    with_backend!(a.device, |be| bench_impl(be, &a, &loaded))
}

fn bench_impl<B: Backend>(be: &B, a: &BenchArgs, loaded: &LoadedModel) -> Result<()> {
    use crate::train::bench::{method_step_flops, StepBench, StepSpec};
    let cfg = &loaded.config;
    let layers = parse_layers(&a.ablate_layers)?;
    let lora_r = a.lora_r.unwrap_or(LORA_R);
    let spec = StepSpec {
        batch: a.batch,
        seq: a.seq,
        lora_r,
        lora_alpha: a.lora_alpha.unwrap_or(LORA_ALPHA),
        targets: Target::parse_list(a.lora_targets.as_deref().unwrap_or(LORA_TARGETS))?,
        ablate_layers: layers.clone(),
        ablate_k: a.ablate_k,
        checkpointing: a.checkpointing,
    };
    let t_load = Instant::now();
    let mut bench = StepBench::with_method(be, cfg, loaded.weights.as_ref(), &spec, a.method)?;
    be.synchronize()?;
    let load_s = t_load.elapsed().as_secs_f64();
    let mut times = Vec::new();
    let mut losses = Vec::new();
    for i in 0..a.warmup + a.steps {
        let t = Instant::now();
        let loss = bench.step(be)?;
        let dt = t.elapsed().as_secs_f64();
        losses.push(loss);
        eprintln!("step {i}: {dt:.3} s, loss {loss:.4}");
        if i >= a.warmup {
            times.push(dt);
        }
    }
    let mean = times.iter().sum::<f64>() / times.len().max(1) as f64;
    let n = a.batch * a.seq;
    let flops = method_step_flops(a.method, cfg, a.batch, a.seq);
    let lora = a.method == Method::Lora;
    let json = serde_json::json!({
        "backend": be.name(),
        "model": loaded.source.display().to_string(),
        "method": a.method.to_string(),
        "layers": cfg.num_layers,
        "batch": a.batch, "seq": a.seq, "tokens": n,
        "lora_r": lora.then_some(lora_r),
        "trained_params": bench.trained_params,
        "ablate_layers": layers, "ablate_k": a.ablate_k,
        "checkpointing": a.checkpointing.to_string(),
        "steps": a.steps, "step_s": mean, "tokens_per_s": n as f64 / mean,
        "model_tflop_per_step": flops / 1e12,
        "achieved_tflops": flops / mean / 1e12,
        "peak_rss_mb": crate::util::peak_rss_mib(),
        "device_mem_mb": be.device_memory_used_mib(),
        "load_s": load_s,
        "losses": losses,
    });
    println!("{json}");
    if let Some(p) = &a.json {
        std::fs::write(p, format!("{json}\n"))
            .with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}

#[derive(Args, Debug, Clone)]
pub struct BenchGenerateArgs {
    #[command(flatten)]
    pub source: BenchModelArgs,
    #[arg(long, value_parser = device_parser(), default_value = "auto")]
    pub device: Device,
    /// Batch sizes to time, comma-separated.
    #[arg(long, default_value = "1,32")]
    pub batch: String,
    /// Prompt tokens per sequence (random ids).
    #[arg(long, default_value_t = 128)]
    pub prompt_len: usize,
    /// New tokens per sequence (greedy, never stopping early).
    #[arg(long, default_value_t = 128)]
    pub new_tokens: usize,
    /// CPU threads (0 = all cores).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
}

/// Time greedy generation at each batch size: one untimed warm-up batch of 4 tokens, then a
/// timed one. Prints a JSON line per batch size: decode tokens/s (every sequence producing
/// `new_tokens`), prefill tokens/s, and the frozen-weight bytes streamed per decoding step
/// as GB/s (at batch 1 decoding is bound by reading the weights, so this is the figure to
/// hold against the memory bandwidth).
pub fn bench_generate(a: BenchGenerateArgs) -> Result<()> {
    set_threads(a.threads);
    let loaded = a.source.load()?;
    with_backend!(a.device, |be| bench_on(be, &a, &loaded))
}

fn bench_on<B: Backend>(be: &B, a: &BenchGenerateArgs, loaded: &LoadedModel) -> Result<()> {
    let cfg = &loaded.config;
    let mut model = Model::new(be, cfg.clone(), loaded.weights.as_ref())?;
    let batches = parse_layers(&a.batch)?;
    if batches.is_empty() || batches.contains(&0) || a.prompt_len == 0 || a.new_tokens < 2 {
        bail!("--batch needs sizes >= 1, --prompt-len >= 1 and --new-tokens >= 2");
    }
    let mut rng = Rng::new(1);
    // Bytes of the frozen weights one decoding step reads (every matrix once; the embedding
    // gather is negligible unless it is also the tied lm head).
    let (d, f, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
    let (qw, kvw) = (
        cfg.num_heads * cfg.head_dim,
        cfg.num_kv_heads * cfg.head_dim,
    );
    let per_layer = d * (qw + 2 * kvw) + qw * d + 3 * d * f;
    let weight_elems = cfg.num_layers * per_layer + v * d;
    let elem_bytes = if be.name().starts_with("cpu") { 4 } else { 2 };
    for &batch in &batches {
        let reqs: Vec<Request> = (0..batch)
            .map(|i| Request {
                prompt: (0..a.prompt_len).map(|_| rng.below(v) as u32).collect(),
                seed: i as u64,
            })
            .collect();
        generate(be, &mut model, &reqs, &SampleOpts::greedy(4), &[])?;
        let (_, st) = generate(
            be,
            &mut model,
            &reqs,
            &SampleOpts::greedy(a.new_tokens),
            &[],
        )?;
        // The first new token comes from the prefill; the decode steps produce the rest.
        let decode_tokens = batch * (a.new_tokens - 1);
        let steps = (a.new_tokens - 1) as f64;
        let json = serde_json::json!({
            "backend": be.name(),
            "model": loaded.source.display().to_string(),
            "batch": batch,
            "prompt_len": a.prompt_len,
            "new_tokens": a.new_tokens,
            "prefill_tokens_per_s": st.prompt_tokens as f64 / st.prefill_secs,
            "decode_tokens_per_s": decode_tokens as f64 / st.decode_secs,
            "tokens_per_s": st.tokens_per_sec(),
            "ms_per_step": 1e3 * st.decode_secs / steps,
            "weight_gb_per_s": (weight_elems * elem_bytes) as f64 * steps / st.decode_secs / 1e9,
        });
        println!("{json}");
    }
    Ok(())
}
