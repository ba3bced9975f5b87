//! `caft-fast train`: the flags map one-to-one onto [`TrainConfig`] keys (also read from a
//! TOML file); the loop is [`crate::train::run`].

use super::common::{
    device_parser, launch_if_asked, merge_config_file, model_path, set_threads, RunShapeArgs,
};
use crate::backend::device::Device;
use crate::data::TrainOn;
use crate::dist::Dist;
use crate::model::loader::load_model;
use crate::train::checkpoint;
use crate::train::config::{is_gguf, Explicit, Method, TrainConfig, SAVE_DTYPES};
use crate::train::{Outcome, RunOptions};
use crate::with_backend;
use anyhow::{bail, Result};
use clap::builder::PossibleValuesParser;
use clap::Args;
use std::path::PathBuf;

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

Every option except --config, --resume, --overwrite, --stop-after and --gpus is also a key of a
TOML config file (snake_case: lora_r = 32, ablate_layers = [10, 20]). Precedence: defaults, then
--config, then flags. Each run writes its exact configuration to <output>/config.toml.

Several GPUs (data parallel, NCCL): --gpus 0,1,2,3 on one node starts a worker per GPU; across
nodes start one process per GPU with torchrun or srun (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT set) and no --gpus. An optimizer step stays --batch-size x --grad-accum examples,
shared by the GPUs, so N GPUs give the run one GPU gives (up to the order of f32 sums) and a
checkpoint resumes on any number of GPUs. Rank 0 writes every output. Needs libnccl (the system's,
or pip install nvidia-nccl-cu13).

Output folder: adapter/ (PEFT: adapter_config.json + adapter_model.safetensors), metrics.jsonl,
loss.svg, run.json (configuration, data and directions hashes, program version), config.toml,
checkpoints/step-N/ (adapter, optimizer state, data order, step), merged/ with --merge.
With --method full the run writes a complete Hugging Face model folder instead of the adapter
(sharded safetensors in the model's own dtype unless --save-dtype says otherwise).
Ctrl-C saves a checkpoint and exits with status 1; --resume <output> continues bit-identically.

Defaults: LoRA r=32, alpha 64, rsLoRA on all seven projections, lr 1e-5, weight decay 0.01,
linear schedule after 5 warmup steps, 1 epoch, batch 2 x accumulation 8, 2048 tokens, seed 0:
the settings of the paper's emergent-misalignment runs. docs/recipes/ holds one config file per
experiment of the paper (emergent misalignment on Qwen2.5-Coder-32B-Instruct and on
Mistral-Small-24B-Instruct-2501, spurious correlation on Gemma-2-2B with --method full).

Where caft-fast departs from the paper's code:
- Optimizer: AdamW with f32 moments; the paper's LoRA runs used 8-bit AdamW (bitsandbytes,
  through unsloth). --method full keeps f32 master weights and f32 AdamW moments and runs the
  forward and backward in bf16 on the GPU (f32 throughout on the CPU); the paper's
  spurious-correlation code trained Gemma-2-2B's bf16 weights with PyTorch's AdamW directly.
- Model: the default model is SmolLM2-135M-Instruct as a 4-bit GGUF (Q4_1), dequantised on
  load, so that the demo runs on a laptop; the paper fine-tuned Qwen2.5-Coder-32B-Instruct and
  Mistral-Small-24B-Instruct-2501 (LoRA) and Gemma-2-2B (every weight) in bf16.
- Activation checkpointing is off unless the GPU needs it (--checkpointing auto, the default,
  picks the fastest mode whose memory plan fits; the paper's code ran gradient checkpointing;
  every mode gives the same gradients).
- Examples are packed without padding unless --no-packing (same examples per step, same loss
  normalisation; the paper's code padded)."
)]
pub struct TrainArgs {
    #[command(flatten)]
    pub shape: RunShapeArgs,
    /// TOML file with any of the options below (flags given here override it).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Continue a run: its output folder (newest checkpoint) or one checkpoint folder. The
    /// training settings must be the checkpoint's; device and cadence options may change.
    #[arg(long, value_name = "DIR")]
    pub resume: Option<PathBuf>,
    /// Model: a Hugging Face folder, a GGUF file or a Hub id in the local cache (ORG/NAME[@REV])
    /// [default: SmolLM2-135M-Instruct, fetched on first use].
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// auto, cpu or cuda [default: auto].
    #[arg(long, value_parser = device_parser())]
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
    /// LoRA alpha [default: 64].
    #[arg(long)]
    pub lora_alpha: Option<f64>,
    /// Scale LoRA by alpha/sqrt(r) (rsLoRA) instead of alpha/r [default: true].
    #[arg(long, num_args = 0..=1, default_missing_value = BOOL_FLAG)]
    pub rslora: Option<bool>,
    /// With --method full: the dtype of the saved model folder: bf16, f16 or f32 [default: the
    /// model's own torch_dtype from its config.json; required for a GGUF base, whose weights
    /// are quantized].
    #[arg(long, value_name = "DTYPE", value_parser = PossibleValuesParser::new(SAVE_DTYPES))]
    pub save_dtype: Option<String>,
    /// Peak learning rate (AdamW) [default: 1e-5].
    #[arg(long)]
    pub lr: Option<f64>,
    /// AdamW weight decay [default: 0.01].
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// AdamW beta1, the first moment's decay; in (0.5, 1) (caft-fast's AdamW kernel needs
    /// beta1 > 0.5) [default: 0.9].
    #[arg(long, value_name = "B1")]
    pub adam_beta1: Option<f64>,
    /// AdamW beta2, the second moment's decay; in [0, 1) [default: 0.999; the paper's
    /// spurious-correlation runs used 0.95].
    #[arg(long, value_name = "B2")]
    pub adam_beta2: Option<f64>,
    /// AdamW epsilon, added to the second moment's square root; above 0 [default: 1e-8].
    #[arg(long, value_name = "EPS")]
    pub adam_eps: Option<f64>,
    /// Linear warmup steps [default: 5, unless --warmup-ratio is given].
    #[arg(long)]
    pub warmup_steps: Option<u64>,
    /// Warmup as a fraction of the run's optimizer steps, in [0, 1): ceil(ratio x steps), as
    /// the transformers Trainer counts it; instead of --warmup-steps, not with it [default:
    /// unset; --warmup-steps applies].
    #[arg(long, value_name = "RATIO")]
    pub warmup_ratio: Option<f64>,
    /// Learning-rate schedule after warmup: linear, cosine or constant [default: linear].
    #[arg(long)]
    pub schedule: Option<String>,
    /// Passes over the training data [default: 1].
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Optimizer steps in total (the schedule ends there); overrides --epochs.
    #[arg(long)]
    pub max_steps: Option<u64>,
    /// Clip the global gradient norm (0 = off) [default: 1.0].
    #[arg(long)]
    pub max_grad_norm: Option<f64>,
    /// Seed of the LoRA init, data order, validation split and random directions [default: 0].
    #[arg(long)]
    pub seed: Option<u64>,
    /// Validation loss every N steps (0 = at the end only) [default: about 10 times a run].
    #[arg(long, value_name = "N")]
    pub eval_every: Option<u64>,
    /// Checkpoint every N steps (0 = at the end only) [default: about 10 times a run].
    #[arg(long, value_name = "N")]
    pub save_every: Option<u64>,
    /// Checkpoints kept on disk, newest first [default: 2].
    #[arg(long, value_name = "N")]
    pub keep_checkpoints: Option<usize>,
    /// LoRA runs: also write a merged model folder (W + scale·B·A, f32 safetensors) that
    /// transformers loads without PEFT [default: false]. Refused with --method full, whose
    /// output already is a whole model.
    #[arg(long, num_args = 0..=1, default_missing_value = BOOL_FLAG)]
    pub merge: Option<bool>,
    /// Save a checkpoint and stop after N steps in total (for time-sliced jobs; continue with
    /// --resume).
    #[arg(long, value_name = "N")]
    pub stop_after: Option<u64>,
    /// CPU threads (0 = all cores) [default: 0].
    #[arg(long)]
    pub threads: Option<usize>,
    /// Data parallelism on this node: one worker process per GPU in LIST (e.g. 0,1,2,3, or
    /// all), gradients summed over NCCL every optimizer step. The step stays --batch-size x
    /// --grad-accum examples, shared by the GPUs, so the run matches a one-GPU run. Across
    /// nodes, start one process per GPU with torchrun or srun instead (RANK, WORLD_SIZE,
    /// LOCAL_RANK, MASTER_ADDR, MASTER_PORT), without --gpus.
    #[arg(long, value_name = "LIST")]
    pub gpus: Option<String>,
}

impl TrainArgs {
    /// Lay the flags that were given over `base`.
    fn apply(
        &self,
        base: crate::train::config::TrainConfig,
    ) -> Result<crate::train::config::TrainConfig> {
        let mut c = base;
        macro_rules! set {
            ($($f:ident),*) => { $( if let Some(v) = &self.$f { c.$f = v.clone(); } )* };
        }
        macro_rules! set_opt {
            ($($f:ident),*) => { $( if let Some(v) = &self.$f { c.$f = Some(v.clone()); } )* };
        }
        set!(val_split, examples, lora_alpha, rslora, lr);
        set!(weight_decay, warmup_steps, schedule, epochs, max_grad_norm);
        set!(seed, keep_checkpoints, merge, threads, output);
        set!(adam_beta1, adam_beta2, adam_eps);
        set_opt!(model, data, val_data, max_steps, eval_every, save_every);
        set_opt!(save_dtype, warmup_ratio);
        self.shape.apply(&mut c)?;
        if let Some(t) = &self.train_on {
            c.train_on = TrainOn::parse(t)?;
        }
        if let Some(d) = self.device {
            c.device = d;
        }
        Ok(c)
    }

    /// Note the options given on the command line as explicit.
    fn mark_explicit(&self, given: &mut Explicit) {
        let flags = [
            ("model", self.model.is_some()),
            ("device", self.device.is_some()),
            ("output", self.output.is_some()),
            ("data", self.data.is_some()),
            ("val_data", self.val_data.is_some()),
            ("val_split", self.val_split.is_some()),
            ("examples", self.examples.is_some()),
            ("train_on", self.train_on.is_some()),
            ("save_dtype", self.save_dtype.is_some()),
            ("lora_alpha", self.lora_alpha.is_some()),
            ("rslora", self.rslora.is_some()),
            ("lr", self.lr.is_some()),
            ("weight_decay", self.weight_decay.is_some()),
            ("adam_beta1", self.adam_beta1.is_some()),
            ("adam_beta2", self.adam_beta2.is_some()),
            ("adam_eps", self.adam_eps.is_some()),
            ("warmup_steps", self.warmup_steps.is_some()),
            ("warmup_ratio", self.warmup_ratio.is_some()),
            ("schedule", self.schedule.is_some()),
            ("epochs", self.epochs.is_some()),
            ("max_steps", self.max_steps.is_some()),
            ("max_grad_norm", self.max_grad_norm.is_some()),
            ("seed", self.seed.is_some()),
            ("eval_every", self.eval_every.is_some()),
            ("save_every", self.save_every.is_some()),
            ("keep_checkpoints", self.keep_checkpoints.is_some()),
            ("merge", self.merge.is_some()),
            ("threads", self.threads.is_some()),
        ];
        for (key, set) in flags {
            if set {
                given.flag(key);
            }
        }
        self.shape.mark_explicit(given);
    }
}

/// Resolve the configuration (defaults or the checkpoint's, then --config, then flags), load
/// the model and train. Returns false when the run stopped early on Ctrl-C (a checkpoint was
/// saved).
pub fn train(a: TrainArgs) -> Result<bool> {
    if let Some(done) = launch_if_asked(a.gpus.as_deref(), a.device)? {
        return Ok(done);
    }
    let dist = Dist::from_env()?;
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
    // What the user gave explicitly (the file's keys, then the flags): some checks must not
    // fire on a default or on the resumed checkpoint's own settings.
    let mut given = Explicit::default();
    if let Some(f) = &a.config {
        base = merge_config_file(&base, f, &mut given)?;
    }
    a.mark_explicit(&mut given);
    let cfg = a.apply(base)?;
    cfg.validate()?;
    cfg.validate_explicit(&given)?;
    cfg.validate_base()?;
    set_threads(cfg.threads);
    let world = dist.world;
    if world.size > 1 {
        if cfg.device == Device::Cpu {
            bail!(
                "WORLD_SIZE={} asks for data parallelism, which runs on CUDA GPUs: leave out \
                 --device cpu",
                world.size
            );
        }
        let share = cfg.share_per_rank(world.size)?;
        if world.is_main() {
            eprintln!("data parallel: {} ranks; {share}", world.size);
        }
    }
    // Refuse an existing output folder before the (possibly long) model load.
    if resume.is_none() && world.is_main() && cfg.output.exists() && !a.overwrite {
        bail!(
            "output folder {} exists; pass --overwrite to replace it (or --resume {} to continue it)",
            cfg.output.display(),
            cfg.output.display()
        );
    }
    if cfg.method == Method::Full && is_gguf(&cfg.model) {
        eprintln!(
            "notice: the base model is a GGUF file with quantized weights; full fine-tuning \
             starts from their dequantised values and saves the model as {}",
            cfg.save_dtype.as_deref().unwrap_or("?")
        );
    }
    let path = model_path(&cfg.model)?;
    let loaded = load_model(&path)?;
    let opts = RunOptions {
        resume,
        overwrite: a.overwrite,
        stop_after: a.stop_after,
        dist,
    };
    let outcome = with_backend!(cfg.device, |be| crate::train::run(be, &cfg, &loaded, &opts))?;
    Ok(outcome != Outcome::Interrupted)
}
