//! The subcommands behind `caft-fast`: argument types and their implementations, generic over
//! the backend so each runs the same code on the CPU and on a GPU.

use crate::backend::cpu::CpuBackend;
use crate::backend::Backend;
use crate::model::ablation::{random_directions, Directions};
use crate::model::config::ModelConfig;
use crate::model::loader::{load_model, LoadedModel};
use crate::model::lora::{LoraConfig, LoraLayout, Target};
use crate::model::transformer::Model;
use crate::train::optim::{optimizer_step, OptimConfig};
use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use std::path::PathBuf;
use std::time::Instant;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Device {
    /// A CUDA GPU when one is usable, else the CPU (with a one-line notice).
    Auto,
    Cpu,
    Cuda,
}

/// Parse `10,20,30`.
pub fn parse_layers(s: &str) -> Result<Vec<usize>> {
    s.split(',')
        .filter(|p| !p.trim().is_empty())
        .map(|p| {
            p.trim()
                .parse::<usize>()
                .with_context(|| format!("layer {p:?} in {s:?} is not a number"))
        })
        .collect()
}

/// Set rayon's thread count once (0 = all cores).
fn set_threads(n: usize) {
    if n > 0 {
        // An error means the pool already exists (e.g. in tests); keep it.
        let _ = rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global();
    }
}

/// The model path given, or the default model (fetched on first use).
fn model_path(p: &Option<PathBuf>) -> Result<PathBuf> {
    match p {
        Some(p) => Ok(p.clone()),
        None => crate::util::fetch::smollm2(),
    }
}

/// Random directions at `layers` (validated against the model), seeded.
fn random_ablation(cfg: &ModelConfig, k: usize, layers: &[usize], seed: u64) -> Result<Directions> {
    for &l in layers {
        if l >= cfg.num_layers {
            bail!(
                "ablation layer {l} is out of range: the model has {} layers (0..{})",
                cfg.num_layers,
                cfg.num_layers - 1
            );
        }
    }
    random_directions(seed, k, cfg.hidden_size, layers)
}

// ---------------------------------------------------------------------------------------------
// bench-step

#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// Model: a Hugging Face folder or a GGUF file (default: SmolLM2-135M-Instruct).
    #[arg(long, conflicts_with = "shape")]
    pub model: Option<PathBuf>,
    /// Instead of a model file, random weights of a known shape: qwen2.5-1.5b, llama-3.2-1b,
    /// smollm2-135m.
    #[arg(long)]
    pub shape: Option<String>,
    #[arg(long, value_enum, default_value = "auto")]
    pub device: Device,
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    #[arg(long, default_value_t = 256)]
    pub seq: usize,
    #[arg(long, default_value_t = 32)]
    pub lora_r: usize,
    #[arg(long, default_value_t = 64.0)]
    pub lora_alpha: f64,
    /// Comma-separated LoRA targets.
    #[arg(long, default_value = "q,k,v,o,gate,up,down")]
    pub lora_targets: String,
    /// Layers to ablate (empty: no ablation).
    #[arg(long, default_value = "")]
    pub ablate_layers: String,
    /// Random directions per ablated layer.
    #[arg(long, default_value_t = 8)]
    pub ablate_k: usize,
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

pub fn bench_step(a: BenchArgs) -> Result<()> {
    set_threads(a.threads);
    let loaded = match &a.shape {
        Some(shape) => {
            let config = crate::model::random::preset(shape)?;
            LoadedModel {
                weights: Box::new(crate::model::random::RandomWeights::new(config.clone(), 0)),
                config,
                tokenizer: None,
                chat_template: None,
                source: PathBuf::from(format!("random:{shape}")),
            }
        }
        None => load_model(&model_path(&a.model)?)?,
    };
    match resolve_device(a.device)? {
        Device::Cuda => bench_impl(&cuda_backend()?, &a, &loaded),
        _ => bench_impl(&CpuBackend::new(), &a, &loaded),
    }
}

fn bench_impl<B: Backend>(be: &B, a: &BenchArgs, loaded: &LoadedModel) -> Result<()> {
    use crate::train::bench::{step_flops, StepBench, StepSpec};
    let cfg = &loaded.config;
    let layers = parse_layers(&a.ablate_layers)?;
    let spec = StepSpec {
        batch: a.batch,
        seq: a.seq,
        lora_r: a.lora_r,
        lora_alpha: a.lora_alpha,
        targets: Target::parse_list(&a.lora_targets)?,
        ablate_layers: layers.clone(),
        ablate_k: a.ablate_k,
    };
    let t_load = Instant::now();
    let mut bench = StepBench::new(be, cfg, loaded.weights.as_ref(), &spec)?;
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
    let flops = step_flops(cfg, a.batch, a.seq);
    let json = serde_json::json!({
        "backend": be.name(),
        "model": loaded.source.display().to_string(),
        "batch": a.batch, "seq": a.seq, "tokens": n,
        "lora_r": a.lora_r, "ablate_layers": layers, "ablate_k": a.ablate_k,
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

/// The GPU backend used for training: bf16 weights and activations, f32 LoRA state.
fn cuda_backend() -> Result<crate::backend::cuda::backend::CudaBackend<half::bf16>> {
    crate::backend::cuda::backend::CudaBackend::new(0)
}

/// Turn `auto` into a concrete device, printing a one-line notice on fallback.
pub fn resolve_device(d: Device) -> Result<Device> {
    match d {
        Device::Cpu => Ok(Device::Cpu),
        Device::Cuda => Ok(Device::Cuda),
        Device::Auto => {
            let p = crate::backend::cuda::probe::probe();
            if p.usable() {
                Ok(Device::Cuda)
            } else {
                eprintln!("note: running on the CPU ({})", p.summary());
                Ok(Device::Cpu)
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// doctor, fetch-model

pub fn doctor() -> Result<bool> {
    crate::backend::cuda::doctor::doctor()
}

pub fn fetch_model() -> Result<PathBuf> {
    crate::util::fetch::smollm2()
}

// ---------------------------------------------------------------------------------------------
// train (the built-in demonstration run; chat JSONL input and checkpoints come next)

#[derive(Args, Debug, Clone)]
pub struct TrainArgs {
    /// Model: a Hugging Face folder or a GGUF file (default: SmolLM2-135M-Instruct).
    #[arg(long)]
    pub model: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "auto")]
    pub device: Device,
    /// Output folder for the adapter, metrics and run record.
    #[arg(long, short = 'o', default_value = "runs/caft-demo")]
    pub output: PathBuf,
    /// Replace an existing output folder.
    #[arg(long)]
    pub overwrite: bool,
    /// Number of built-in training conversations.
    #[arg(long, default_value_t = 64)]
    pub examples: usize,
    #[arg(long, default_value_t = 1)]
    pub epochs: usize,
    #[arg(long, default_value_t = 4)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 1)]
    pub grad_accum: usize,
    #[arg(long, default_value_t = 1e-5)]
    pub lr: f64,
    #[arg(long, default_value_t = 0.01)]
    pub weight_decay: f64,
    #[arg(long, default_value_t = 5)]
    pub warmup_steps: u64,
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f64,
    #[arg(long, default_value_t = 32)]
    pub lora_r: usize,
    #[arg(long, default_value_t = 64.0)]
    pub lora_alpha: f64,
    /// Scale LoRA by alpha/sqrt(r) (rsLoRA) instead of alpha/r.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub rslora: bool,
    #[arg(long, default_value = "q,k,v,o,gate,up,down")]
    pub lora_targets: String,
    /// Directions to ablate: safetensors with `layer.<L>` tensors [k, d_model].
    #[arg(long)]
    pub ablate: Option<PathBuf>,
    /// Ablate K random orthonormal directions instead (the paper's control), at --ablate-layers.
    #[arg(long)]
    pub ablate_random: Option<usize>,
    /// Restrict (with --ablate) or choose (with --ablate-random) the ablated layers.
    #[arg(long)]
    pub ablate_layers: Option<String>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// CPU threads (0 = all cores).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
}

pub fn train(a: TrainArgs) -> Result<()> {
    set_threads(a.threads);
    if a.output.exists() && !a.overwrite {
        bail!(
            "output folder {} exists; pass --overwrite to replace it",
            a.output.display()
        );
    }
    let path = model_path(&a.model)?;
    let loaded = load_model(&path)?;
    match resolve_device(a.device)? {
        Device::Cuda => train_impl(&cuda_backend()?, &a, &loaded),
        _ => train_impl(&CpuBackend::new(), &a, &loaded),
    }
}

fn train_impl<B: Backend>(be: &B, a: &TrainArgs, loaded: &LoadedModel) -> Result<()> {
    use crate::train::{adapter, data};
    let cfg = loaded.config.clone();
    let tok = loaded
        .tokenizer
        .as_ref()
        .with_context(|| format!("{}: the model has no tokenizer", loaded.source.display()))?;
    let tmpl = loaded.chat_template.as_ref().with_context(|| {
        format!(
            "{}: the model has no chat template, which chat data needs",
            loaded.source.display()
        )
    })?;
    let convs = data::builtin_chat_dataset(a.examples, a.seed);
    let examples = convs
        .iter()
        .enumerate()
        .map(|(i, c)| data::tokenize_chat(tok, tmpl, c).with_context(|| format!("example {i}")))
        .collect::<Result<Vec<_>>>()?;
    let pad = tok.eos_token_id().unwrap_or(0);
    let batches = data::make_batches(&examples, a.batch_size, pad)?;
    let accum = a.grad_accum.max(1);
    let steps_per_epoch = batches.len() / accum;
    if steps_per_epoch == 0 {
        bail!(
            "{} examples make no full optimizer step of batch {} x accumulation {accum}",
            examples.len(),
            a.batch_size
        );
    }
    let total = (steps_per_epoch * a.epochs) as u64;

    let mut model = Model::new(be, cfg.clone(), loaded.weights.as_ref())?;
    let lora_cfg = LoraConfig {
        r: a.lora_r,
        alpha: a.lora_alpha,
        rslora: a.rslora,
        targets: Target::parse_list(&a.lora_targets)?,
    };
    let layout = LoraLayout::new(&cfg, &lora_cfg)?;
    model.set_lora(be, layout.clone(), &layout.init_params(a.seed))?;
    let layers = a.ablate_layers.as_deref().map(parse_layers).transpose()?;
    let dirs = match (&a.ablate, a.ablate_random) {
        (Some(_), Some(_)) => bail!("give either --ablate FILE or --ablate-random K, not both"),
        (Some(f), None) => {
            let d =
                crate::model::ablation::load_directions(f, None, cfg.hidden_size, cfg.num_layers)?;
            Some(match &layers {
                Some(l) => d.restrict(l)?,
                None => d,
            })
        }
        (None, Some(k)) => {
            let l = layers.context("--ablate-random needs --ablate-layers")?;
            Some(random_ablation(&cfg, k, &l, a.seed)?)
        }
        (None, None) => None,
    };
    if let Some(d) = &dirs {
        model.set_ablation(be, d)?;
    }
    let opt = OptimConfig {
        lr: a.lr,
        weight_decay: a.weight_decay,
        warmup_steps: a.warmup_steps,
        total_steps: total,
        max_grad_norm: Some(a.max_grad_norm),
        ..OptimConfig::default()
    };
    eprintln!(
        "training {} on {}: {} examples, {total} steps of {} x {} sequences of {} tokens; \
         LoRA r={} alpha={} on {}; ablation: {}",
        loaded.source.display(),
        be.name(),
        examples.len(),
        a.batch_size,
        accum,
        batches[0].seq,
        a.lora_r,
        a.lora_alpha,
        a.lora_targets,
        match &dirs {
            Some(d) => format!(
                "layers {:?}, k = {:?} ({})",
                d.layers(),
                d.sets.iter().map(|s| s.k).collect::<Vec<_>>(),
                d.source
            ),
            None => "off".into(),
        }
    );

    std::fs::create_dir_all(&a.output)
        .with_context(|| format!("creating {}", a.output.display()))?;
    let mut metrics = String::new();
    let t0 = Instant::now();
    let mut tokens = 0usize;
    for epoch in 0..a.epochs {
        for s in 0..steps_per_epoch {
            let micro = &batches[s * accum..(s + 1) * accum];
            let n_step: usize = micro.iter().map(|m| m.n_targets()).sum();
            let mut loss = 0.0;
            let t = Instant::now();
            for m in micro {
                loss += model
                    .forward_backward(be, m, 1.0 / n_step.max(1) as f32)?
                    .loss_sum;
                tokens += m.batch * m.seq;
            }
            loss /= n_step.max(1) as f64;
            if !loss.is_finite() {
                bail!(
                    "the loss became {loss} at step {}; stopping",
                    epoch * steps_per_epoch + s
                );
            }
            let rep = optimizer_step(be, model.lora.as_mut().expect("lora set"), &opt)?;
            be.synchronize()?;
            let step = epoch * steps_per_epoch + s + 1;
            let tps = micro.iter().map(|m| m.batch * m.seq).sum::<usize>() as f64
                / t.elapsed().as_secs_f64();
            eprintln!(
                "step {step}/{total}  loss {loss:.4}  lr {:.2e}  grad-norm {:.3}  {tps:.0} tok/s",
                rep.lr, rep.grad_norm
            );
            metrics.push_str(
                &serde_json::json!({"step": step, "loss": loss, "lr": rep.lr,
                    "grad_norm": rep.grad_norm, "tokens_per_s": tps})
                .to_string(),
            );
            metrics.push('\n');
        }
    }
    let params = be.download_f32(&model.lora.as_ref().expect("lora set").params)?;
    let adapter_dir = a.output.join("adapter");
    adapter::save_adapter(
        &adapter_dir,
        &layout,
        &params,
        &loaded.source.display().to_string(),
    )?;
    adapter::write_atomic(&a.output.join("metrics.jsonl"), metrics.as_bytes())?;
    let record = serde_json::json!({
        "program": format!("caft-fast {}", env!("CARGO_PKG_VERSION")),
        "model": loaded.source.display().to_string(),
        "backend": be.name(),
        "args": format!("{a:?}"),
        "directions": dirs.as_ref().map(|d| serde_json::json!({
            "source": d.source, "sha256": d.sha256, "layers": d.layers()})),
        "steps": total, "tokens": tokens, "seconds": t0.elapsed().as_secs_f64(),
    });
    adapter::write_atomic(
        &a.output.join("run.json"),
        &serde_json::to_vec_pretty(&record)?,
    )?;
    println!(
        "done in {:.1} s: adapter in {}, metrics in {}",
        t0.elapsed().as_secs_f64(),
        adapter_dir.display(),
        a.output.join("metrics.jsonl").display()
    );
    Ok(())
}
