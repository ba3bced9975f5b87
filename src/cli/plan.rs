//! `caft-fast plan`: the predicted peak device memory of a training run, by part, for each
//! checkpointing mode, against a GPU's memory ([`crate::train::plan`]). Only the model's
//! `config.json` is read, so a run can be planned before its weights are downloaded.

use super::common::{merge_config_file, RunShapeArgs};
use crate::backend::Backend;
use crate::model::ablation::load_directions;
use crate::model::config::ModelConfig;
use crate::train::config::{Explicit, TrainConfig};
use crate::train::plan::{self, CONTEXT_ESTIMATE, CUBLAS_WORKSPACE};
use anyhow::{bail, Context, Result};
use clap::Args;
use std::path::{Path, PathBuf};

#[derive(Args, Debug, Clone, Default)]
#[command(
    args_override_self = true,
    after_long_help = "\
The plan counts every buffer caft-fast allocates on the GPU for a training step (bf16 weights and
activations, f32 LoRA state): frozen weights; LoRA parameters, gradients and AdamW moments;
activations kept for the backward; recomputation and backward scratch; the lm head's logits
chunk; small buffers (rope table, directions, sequence layout); plus cuBLAS's workspace and an
estimate of the CUDA context. The largest micro-batch is the token budget
(--max-tokens-per-batch, default batch-size x max-seq-len).

Exit status: 0 when the run fits, 1 when it does not (the shortfall and what to change are
printed), 2 on bad input. `train` makes the same check on the GPU before loading the weights."
)]
pub struct PlanArgs {
    /// The model: a folder holding config.json (weights not needed), a config.json, a GGUF
    /// file, or a shape preset (qwen2.5-1.5b, qwen3-1.7b, gemma-2-2b, llama-3.2-1b,
    /// smollm2-135m).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// A `train` TOML config file (its model and run settings; flags here override it).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// GPU memory to plan for: 80GiB, 80GB, 81920MiB or bytes [default: the GPU's total].
    #[arg(long, value_name = "SIZE")]
    pub gpu_memory: Option<String>,
    /// Print the plan as JSON.
    #[arg(long)]
    pub json: bool,
    /// Plan one GPU of a data-parallel run on N GPUs (`train --gpus`, torchrun): with
    /// --method full each holds 1/N of the AdamW moments (ZeRO-1).
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub ranks: usize,
    #[command(flatten)]
    pub shape: RunShapeArgs,
}

/// The model's configuration without its weights.
fn model_config(path: &Path) -> Result<ModelConfig> {
    if path.is_dir() {
        let json = path.join("config.json");
        if !json.is_file() {
            bail!("{}: no config.json in this folder", path.display());
        }
        return ModelConfig::from_hf_json(&json);
    }
    if path.is_file() {
        if path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
        {
            return Ok(crate::model::loader::load_model(path)?.config);
        }
        return ModelConfig::from_hf_json(path);
    }
    let name = path.to_string_lossy();
    crate::model::random::preset(&name).with_context(|| {
        format!(
            "--model {}: no such file or folder, and no shape preset of that name",
            path.display()
        )
    })
}

/// The GPU's total memory, or an error asking for --gpu-memory.
fn detected_gpu_memory() -> Result<u64> {
    let probe = crate::backend::cuda::probe::probe();
    if !probe.usable() {
        bail!(
            "no usable GPU to plan for ({}); give --gpu-memory SIZE (e.g. 80GiB)",
            probe.summary()
        );
    }
    let be = crate::backend::device::cuda_backend()
        .context("opening the GPU to read its memory; give --gpu-memory SIZE instead")?;
    let mem = be
        .device_memory()
        .context("reading the GPU's memory; give --gpu-memory SIZE instead")?;
    Ok(mem.total)
}

/// Run `plan`: `Ok(true)` when the run fits, `Ok(false)` when it does not.
pub fn run(a: PlanArgs) -> Result<bool> {
    let mut cfg = TrainConfig::default();
    let mut given = Explicit::default();
    if let Some(f) = &a.config {
        cfg = merge_config_file(&cfg, f, &mut given)?;
    }
    if let Some(m) = &a.model {
        cfg.model = Some(m.clone());
        given.flag("model");
    }
    a.shape.apply(&mut cfg)?;
    a.shape.mark_explicit(&mut given);
    cfg.validate()?;
    cfg.validate_explicit(&given)?;
    // The budget first: a bad size is refused before anything is read.
    let (budget, budget_what) = match &a.gpu_memory {
        Some(s) => (
            plan::parse_size(s).with_context(|| format!("--gpu-memory {s:?}"))?,
            "GPU memory (--gpu-memory)",
        ),
        None => (detected_gpu_memory()?, "GPU memory (detected)"),
    };
    let path = cfg
        .model
        .clone()
        .context("give --model (a folder with config.json, a config.json or a preset)")?;
    let mc = model_config(&path)?;
    let ablation = match (&cfg.ablate, cfg.ablate_random) {
        (Some(f), _) => {
            let d = load_directions(f, None, mc.hidden_size, mc.num_layers)?;
            let d = match &cfg.ablate_layers {
                Some(l) => d.restrict(l)?,
                None => d,
            };
            d.sets.iter().map(|s| s.k).collect()
        }
        (None, Some(k)) => {
            let layers = cfg.ablate_layers.clone().unwrap_or_default();
            if let Some(&l) = layers.iter().find(|&&l| l >= mc.num_layers) {
                bail!(
                    "ablation layer {l} is out of range: the model has {} layers (0..{})",
                    mc.num_layers,
                    mc.num_layers - 1
                );
            }
            if k == 0 || k > mc.hidden_size {
                bail!(
                    "--ablate-random {k}: k must be in 1..={} (the model's width)",
                    mc.hidden_size
                );
            }
            vec![k; layers.len()]
        }
        (None, None) => Vec::new(),
    };
    let input = plan::run_input(
        &cfg,
        &mc,
        ablation.clone(),
        None,
        2,
        CUBLAS_WORKSPACE + CONTEXT_ESTIMATE,
        a.ranks.max(1),
    )?;
    let v = plan::verdict(&input, cfg.checkpointing, budget);
    if a.json {
        println!("{}", serde_json::to_string_pretty(&v.to_json(&input))?);
    } else {
        let abl = if ablation.is_empty() {
            "no ablation".to_string()
        } else {
            format!("ablation at {} layers (k = {:?})", ablation.len(), ablation)
        };
        println!(
            "{} layers, d {}, ffn {}, {}/{} heads of {}, vocab {}{}; micro-batch of {} token rows \
             (at most {} sequences, longest {}); {}; {abl}; checkpointing {}{}",
            mc.num_layers,
            mc.hidden_size,
            mc.intermediate_size,
            mc.num_heads,
            mc.num_kv_heads,
            mc.head_dim,
            mc.vocab_size,
            if mc.tie_word_embeddings { ", tied" } else { "" },
            input.rows,
            input.seqs,
            input.max_len,
            match &input.full {
                Some(f) => format!(
                    "full fine-tuning of {} parameters{}",
                    f.len(),
                    match cfg.freeze.is_empty() {
                        true => String::new(),
                        false => format!(" (frozen: {})", cfg.freeze),
                    }
                ),
                None => format!(
                    "LoRA r={} on {} ({} parameters)",
                    cfg.lora_r, cfg.lora_targets, input.lora.len
                ),
            },
            cfg.checkpointing,
            match (input.ranks, input.full.is_some()) {
                (1, _) => String::new(),
                (n, true) => format!("; one GPU of {n} (ZeRO-1: 1/{n} of the AdamW moments)"),
                (n, false) => format!("; one GPU of {n}"),
            }
        );
        print!("{}", v.table(budget_what));
    }
    if !v.fits {
        eprintln!("{}", v.advice(input.rows));
    }
    Ok(v.fits)
}
