//! The subcommands behind `caft-fast`: argument types and their implementations, generic over
//! the backend so each runs the same code on the CPU and on a GPU.

use crate::backend::cpu::CpuBackend;
use crate::backend::Backend;
use crate::model::loader::{load_model, LoadedModel};
use crate::model::lora::Target;
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
pub fn set_threads(n: usize) {
    if n > 0 {
        // An error means the pool already exists (e.g. in tests); keep it.
        let _ = rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global();
    }
}

/// The model path given, or the default model (fetched on first use).
pub fn model_path(p: &Option<PathBuf>) -> Result<PathBuf> {
    match p {
        Some(p) => Ok(p.clone()),
        None => crate::util::fetch::smollm2(),
    }
}

// ---------------------------------------------------------------------------------------------
// bench-step

/// The model of a benchmark.
#[derive(Args, Debug, Clone)]
pub struct BenchModelArgs {
    /// Model: a Hugging Face folder or a GGUF file (default: SmolLM2-135M-Instruct).
    #[arg(long, conflicts_with = "shape")]
    pub model: Option<PathBuf>,
    /// Instead of a model file, random weights of a known shape: qwen2.5-1.5b, llama-3.2-1b,
    /// smollm2-135m.
    #[arg(long)]
    pub shape: Option<String>,
}

impl BenchModelArgs {
    /// Random weights of the preset shape, or the model file.
    pub fn load(&self) -> Result<LoadedModel> {
        Ok(match &self.shape {
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
            None => load_model(&model_path(&self.model)?)?,
        })
    }
}

#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    #[command(flatten)]
    pub source: BenchModelArgs,
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
    let loaded = a.source.load()?;
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
/// Work that runs on whichever backend the device resolves to (a closure cannot be generic
/// over the backend type, a trait method can).
pub trait BackendJob {
    type Out;
    fn run<B: Backend>(self, be: &B) -> Result<Self::Out>;
}

/// Run `job` on `device`: the GPU (bf16 weights and activations, as training uses) or the CPU.
pub fn on_device<J: BackendJob>(device: Device, job: J) -> Result<J::Out> {
    match resolve_device(device)? {
        Device::Cuda => job.run(&cuda_backend()?),
        _ => job.run(&CpuBackend::new()),
    }
}

/// The GPU backend every command uses: device 0, bf16 weights and activations.
pub fn cuda_backend() -> Result<crate::backend::cuda::backend::CudaBackend<half::bf16>> {
    crate::backend::cuda::backend::CudaBackend::new(0)
}

/// Turn `auto` into a concrete device, printing a one-line notice on fallback; `cuda` where no
/// GPU is usable is an error that says why.
pub fn resolve_device(d: Device) -> Result<Device> {
    match d {
        Device::Cpu => Ok(Device::Cpu),
        Device::Cuda => {
            // Refuse at once, before a command creates any output, rather than at the first
            // kernel it would compile.
            let p = crate::backend::cuda::probe::probe();
            if !p.usable() {
                anyhow::bail!("--device cuda: {}", p.summary());
            }
            Ok(Device::Cuda)
        }
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
    crate::backend::cuda::diagnostics::doctor::doctor()
}

pub fn fetch_model() -> Result<PathBuf> {
    crate::util::fetch::smollm2()
}

// ---------------------------------------------------------------------------------------------
// train: the flags map one-to-one onto `train::config::TrainConfig` keys; the loop is in
// `train::run`.

/// `--flag` alone means true; `--flag false` switches a config-file `true` off.
const BOOL_FLAG: &str = "true";

#[derive(Args, Debug, Clone, Default)]
#[command(
    args_override_self = true,
    after_long_help = "\
Data (JSONL, one record a line): chat {\"messages\": [{\"role\", \"content\"}, ...]} with roles
system/user/assistant; {\"prompt\", \"completion\"}; {\"text\"}; or pre-tokenized
{\"input_ids\": [...], \"labels\": [...]} (labels -100 = no loss; absent = loss on every token).
Chat records are rendered with the model's chat template, loss on the assistant tokens.

Every option except --config, --resume, --overwrite and --stop-after is also a key of a TOML
config file (snake_case: lora_r = 32, ablate_layers = [10, 20]). Precedence: defaults, then
--config, then flags. Each run writes its exact configuration to <output>/config.toml.

Output folder: adapter/ (PEFT: adapter_config.json + adapter_model.safetensors), metrics.jsonl,
loss.svg, run.json (configuration, data and directions hashes, program version), config.toml,
checkpoints/step-N/ (adapter, optimizer state, data order, step), merged/ with --merge.
Ctrl-C saves a checkpoint and exits with status 1; --resume <output> continues bit-identically."
)]
pub struct TrainArgs {
    /// TOML file with any of the options below (flags given here override it).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Continue a run: its output folder (newest checkpoint) or one checkpoint folder. The
    /// training settings must be the checkpoint's; device and cadence options may change.
    #[arg(long, value_name = "DIR")]
    pub resume: Option<PathBuf>,
    /// Model: a Hugging Face folder or a GGUF file [default: SmolLM2-135M-Instruct, fetched on
    /// first use].
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// auto, cpu or cuda [default: auto].
    #[arg(long, value_enum)]
    pub device: Option<Device>,
    /// Output folder [default: runs/caft].
    #[arg(long, short = 'o')]
    pub output: Option<PathBuf>,
    /// Replace the outputs of an existing output folder.
    #[arg(long)]
    pub overwrite: bool,
    /// Training data, JSONL (see below) [default: built-in arithmetic conversations].
    #[arg(long, value_name = "FILE")]
    pub data: Option<PathBuf>,
    /// Validation data, JSONL [default: hold out --val-split of --data].
    #[arg(long, value_name = "FILE")]
    pub val_data: Option<PathBuf>,
    /// Fraction of the training records held out for validation [default: 0.1].
    #[arg(long)]
    pub val_split: Option<f64>,
    /// Number of built-in conversations when no --data is given [default: 64].
    #[arg(long)]
    pub examples: Option<usize>,
    /// Loss on `assistant` tokens only, or on `all` tokens of chat records [default: assistant].
    #[arg(long)]
    pub train_on: Option<String>,
    /// Truncate longer examples (counted and reported) [default: 2048].
    #[arg(long)]
    pub max_seq_len: Option<usize>,
    /// LoRA rank [default: 32].
    #[arg(long)]
    pub lora_r: Option<usize>,
    /// LoRA alpha [default: 64].
    #[arg(long)]
    pub lora_alpha: Option<f64>,
    /// Scale LoRA by alpha/sqrt(r) (rsLoRA) instead of alpha/r [default: true].
    #[arg(long, num_args = 0..=1, default_missing_value = BOOL_FLAG)]
    pub rslora: Option<bool>,
    /// Comma-separated LoRA targets [default: q,k,v,o,gate,up,down].
    #[arg(long)]
    pub lora_targets: Option<String>,
    /// Peak learning rate (AdamW) [default: 1e-5].
    #[arg(long)]
    pub lr: Option<f64>,
    /// AdamW weight decay [default: 0.01].
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// Linear warmup steps [default: 5].
    #[arg(long)]
    pub warmup_steps: Option<u64>,
    /// Learning-rate schedule after warmup: linear, cosine or constant [default: linear].
    #[arg(long)]
    pub schedule: Option<String>,
    /// Passes over the training data [default: 1].
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Optimizer steps in total (the schedule ends there); overrides --epochs.
    #[arg(long)]
    pub max_steps: Option<u64>,
    /// Sequences per micro-batch [default: 2].
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Micro-batches per optimizer step [default: 8].
    #[arg(long)]
    pub grad_accum: Option<usize>,
    /// Clip the global gradient norm (0 = off) [default: 1.0].
    #[arg(long)]
    pub max_grad_norm: Option<f64>,
    /// Seed of the LoRA init, data order, validation split and random directions [default: 0].
    #[arg(long)]
    pub seed: Option<u64>,
    /// Directions to ablate: safetensors with `layer.<L>` tensors [k, d_model].
    #[arg(long, value_name = "FILE")]
    pub ablate: Option<PathBuf>,
    /// Ablate K random orthonormal directions per layer instead (the paper's control), at
    /// --ablate-layers.
    #[arg(long, value_name = "K")]
    pub ablate_random: Option<usize>,
    /// Restrict (with --ablate) or choose (with --ablate-random) the ablated layers: 10,20,30.
    #[arg(long)]
    pub ablate_layers: Option<String>,
    /// Validation loss every N steps (0 = at the end only) [default: about 10 times a run].
    #[arg(long, value_name = "N")]
    pub eval_every: Option<u64>,
    /// Checkpoint every N steps (0 = at the end only) [default: about 10 times a run].
    #[arg(long, value_name = "N")]
    pub save_every: Option<u64>,
    /// Checkpoints kept on disk, newest first [default: 2].
    #[arg(long, value_name = "N")]
    pub keep_checkpoints: Option<usize>,
    /// Also write a merged model folder (W + scale·B·A, f32 safetensors) that transformers
    /// loads without PEFT [default: false].
    #[arg(long, num_args = 0..=1, default_missing_value = BOOL_FLAG)]
    pub merge: Option<bool>,
    /// Save a checkpoint and stop after N steps in total (for time-sliced jobs; continue with
    /// --resume).
    #[arg(long, value_name = "N")]
    pub stop_after: Option<u64>,
    /// CPU threads (0 = all cores) [default: 0].
    #[arg(long)]
    pub threads: Option<usize>,
}

impl TrainArgs {
    /// Lay the flags that were given over `base`.
    fn apply(
        &self,
        base: crate::train::config::TrainConfig,
    ) -> Result<crate::train::config::TrainConfig> {
        use crate::train::config::TrainOn;
        let mut c = base;
        macro_rules! set {
            ($($f:ident),*) => { $( if let Some(v) = &self.$f { c.$f = v.clone(); } )* };
        }
        macro_rules! set_opt {
            ($($f:ident),*) => { $( if let Some(v) = &self.$f { c.$f = Some(v.clone()); } )* };
        }
        set!(
            val_split,
            examples,
            max_seq_len,
            lora_r,
            lora_alpha,
            rslora,
            lora_targets,
            lr
        );
        set!(
            weight_decay,
            warmup_steps,
            schedule,
            epochs,
            batch_size,
            grad_accum,
            max_grad_norm
        );
        set!(seed, keep_checkpoints, merge, threads, output);
        set_opt!(
            model,
            data,
            val_data,
            max_steps,
            ablate,
            ablate_random,
            eval_every,
            save_every
        );
        if let Some(t) = &self.train_on {
            c.train_on = TrainOn::parse(t)?;
        }
        if let Some(d) = self.device {
            c.device = format!("{d:?}").to_lowercase();
        }
        if let Some(l) = &self.ablate_layers {
            c.ablate_layers = Some(parse_layers(l)?);
        }
        Ok(c)
    }
}

/// Resolve the configuration (defaults or the checkpoint's, then --config, then flags), load
/// the model and train. Returns false when the run stopped early on Ctrl-C (a checkpoint was
/// saved).
pub fn train(a: TrainArgs) -> Result<bool> {
    use crate::train::checkpoint;
    use crate::train::config::TrainConfig;
    use crate::train::run::{Outcome, RunOptions};
    let mut resume = None;
    let mut base = TrainConfig::default();
    if let Some(dir) = &a.resume {
        let (run_dir, ck) = checkpoint::resolve_resume(dir)?;
        base = checkpoint::load_state(&ck)?.config;
        if let Some(o) = &a.output {
            if o != &run_dir {
                bail!(
                    "--resume continues the run in {}; -o {} names another folder",
                    run_dir.display(),
                    o.display()
                );
            }
        }
        base.output = run_dir;
        resume = Some(ck);
    }
    if let Some(f) = &a.config {
        base = TrainConfig::merge_toml_file(&base, f)?;
    }
    let cfg = a.apply(base)?;
    cfg.validate()?;
    set_threads(cfg.threads);
    let device = <Device as ValueEnum>::from_str(&cfg.device, true)
        .map_err(|e| anyhow::anyhow!("device {:?}: {e}; expected auto, cpu or cuda", cfg.device))?;
    // Refuse an existing output folder before the (possibly long) model load.
    if resume.is_none() && cfg.output.exists() && !a.overwrite {
        bail!(
            "output folder {} exists; pass --overwrite to replace it (or --resume {} to continue it)",
            cfg.output.display(),
            cfg.output.display()
        );
    }
    let path = model_path(&cfg.model)?;
    let loaded = load_model(&path)?;
    let opts = RunOptions {
        resume,
        overwrite: a.overwrite,
        stop_after: a.stop_after,
    };
    let outcome = match resolve_device(device)? {
        Device::Cuda => crate::train::run::run(&cuda_backend()?, &cfg, &loaded, &opts)?,
        _ => crate::train::run::run(&CpuBackend::new(), &cfg, &loaded, &opts)?,
    };
    Ok(outcome != Outcome::Interrupted)
}

// ---------------------------------------------------------------------------------------------
// directions: arguments and glue in `directions::cli`, the work in `directions`.

pub use crate::directions::cli::DirectionsArgs;

/// `caft-fast directions ...`.
pub fn directions(a: DirectionsArgs) -> Result<()> {
    crate::directions::cli::run(a)
}
