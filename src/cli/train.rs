//! `caft-fast train`: the flags map one-to-one onto [`TrainConfig`] keys (also read from a
//! TOML file); the loop is [`crate::train::run`].

use super::common::{device_parser, model_path, set_threads, RunShapeArgs};
use crate::backend::device::Device;
use crate::data::TrainOn;
use crate::model::loader::load_model;
use crate::train::checkpoint;
use crate::train::config::TrainConfig;
use crate::train::{Outcome, RunOptions};
use crate::with_backend;
use anyhow::{bail, Result};
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

Every option except --config, --resume, --overwrite and --stop-after is also a key of a TOML
config file (snake_case: lora_r = 32, ablate_layers = [10, 20]). Precedence: defaults, then
--config, then flags. Each run writes its exact configuration to <output>/config.toml.

Output folder: adapter/ (PEFT: adapter_config.json + adapter_model.safetensors), metrics.jsonl,
loss.svg, run.json (configuration, data and directions hashes, program version), config.toml,
checkpoints/step-N/ (adapter, optimizer state, data order, step), merged/ with --merge.
Ctrl-C saves a checkpoint and exits with status 1; --resume <output> continues bit-identically.

Departures from the paper's code: AdamW keeps f32 moments (the paper ran 8-bit AdamW);
activation checkpointing is off unless the GPU needs it (--checkpointing auto, the default, picks
the fastest mode whose memory plan fits; the paper's code ran gradient checkpointing; every mode
gives the same gradients); examples are packed without padding unless
--no-packing (same examples per step, same loss normalisation); the default model is
SmolLM2-135M-Instruct, a 4-bit GGUF dequantised on load."
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
        set_opt!(model, data, val_data, max_steps, eval_every, save_every);
        self.shape.apply(&mut c)?;
        if let Some(t) = &self.train_on {
            c.train_on = TrainOn::parse(t)?;
        }
        if let Some(d) = self.device {
            c.device = d;
        }
        Ok(c)
    }
}

/// Resolve the configuration (defaults or the checkpoint's, then --config, then flags), load
/// the model and train. Returns false when the run stopped early on Ctrl-C (a checkpoint was
/// saved).
pub fn train(a: TrainArgs) -> Result<bool> {
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
    let outcome = with_backend!(cfg.device, |be| crate::train::run(be, &cfg, &loaded, &opts))?;
    Ok(outcome != Outcome::Interrupted)
}
