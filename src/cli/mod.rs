//! The command line: the only part of caft-fast that knows clap. Each subcommand has a file
//! that turns its flags into the library's plain types and calls the library; [`run`]
//! dispatches. `main.rs` parses and maps the outcome to an exit status.

pub mod bench;
pub mod common;
pub mod directions;
pub mod doctor;
pub mod eval;
pub mod generate;
pub mod judge;
pub mod plan;
pub mod train;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "caft-fast",
    version,
    about = "Concept Ablation Fine-Tuning: LoRA or full fine-tuning with concept directions \
             projected out of the residual stream",
    long_about = "caft-fast fine-tunes LLMs (Llama, Qwen2, Qwen3, Mistral, Gemma-2) with LoRA or \
                  in full while projecting chosen concept directions out of the residual stream \
                  (h <- h - Q Qᵀ h at the output of chosen decoder layers, forward and backward, \
                  training only), on NVIDIA GPUs through hand-written CUDA kernels or on the CPU."
)]
pub struct Cli {
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Subcommand)]
pub enum Cmd {
    /// Fine-tune with concept ablation on chat/text JSONL (or built-in demonstration data):
    /// LoRA adapters (a PEFT adapter) or, with --method full, every weight (a whole model
    /// folder); also metrics, a loss plot and checkpoints. The default model is
    /// SmolLM2-135M-Instruct, fetched on first use.
    Train(Box<train::TrainArgs>),
    /// Predict a training run's peak GPU memory by part (weights, LoRA state, activations,
    /// recomputation, logits) for each checkpointing mode from the model's config.json alone,
    /// and say whether it fits; exit status 1 when it does not.
    Plan(Box<plan::PlanArgs>),
    /// Time training steps, LoRA or (--method full) every weight, on random tokens (random
    /// directions ablated at --ablate-layers), and print tokens/s, model TFLOP/s and memory as
    /// JSON.
    ///
    /// Each step is a whole optimizer step as `train` runs it (forward, backward, AdamW; full
    /// fine-tuning keeps f32 master weights and moments): --warmup untimed steps, then the mean
    /// of --steps timed ones. The model is a model file (--model) or the random weights of a
    /// shape (--shape, no download), optionally cut to its first --layers N for a quick run of
    /// a large shape. The JSON line has tokens_per_s, step_s (the mean), model_tflop_per_step
    /// and achieved_tflops (the model FLOPs of --method, see below), trained_params,
    /// peak_rss_mb, device_mem_mb (a GPU's use, total - free) and every step's loss.
    BenchStep(bench::BenchArgs),
    /// Report the GPU, driver, NVRTC, cuBLAS and NCCL found; compile every kernel and check
    /// every op against the CPU reference. Exits non-zero on any failure. With --gpus, check
    /// NCCL across those GPUs instead (one worker each: sums checked, all-reduce bandwidth).
    Doctor(doctor::DoctorArgs),
    /// Download the default model (SmolLM2-135M-Instruct GGUF) into the cache and print its path.
    FetchModel,
    /// Find, choose and import concept directions: PCA of what a fine-tune changed in
    /// resid_post, selection of components, random controls, imports from other tools.
    Directions(directions::DirectionsArgs),
    /// Evaluate a model or fine-tune: multiple-choice accuracy per split, held-out loss;
    /// write the double multiple-choice spurious-correlation task.
    Eval(eval::EvalArgs),
    /// Sample answers to questions (JSONL or YAML) with a KV cache, batched, with the chat
    /// template applied; writes one JSON line per answer and prints tokens/s.
    Generate(generate::GenerateArgs),
    /// Score `generate` answers for alignment and coherence with an LLM judge (an
    /// OpenAI-compatible endpoint or a local model); `judge report` gives misaligned-answer
    /// rates with bootstrap intervals, tables and charts.
    Judge(Box<judge::JudgeArgs>),
    /// Time greedy generation (prefill and decode tokens/s) at several batch sizes on random
    /// prompts, as JSON lines.
    BenchGenerate(bench::BenchGenerateArgs),
}

/// Run one subcommand. `Ok(false)` is a run that ended without failing but without finishing
/// (Ctrl-C during `train`, a failed `doctor` check): exit status 1.
pub fn run(cli: Cli) -> Result<bool> {
    Ok(match cli.cmd {
        Cmd::Train(a) => return train::train(*a),
        Cmd::Plan(a) => return plan::run(*a),
        Cmd::BenchStep(a) => bench::bench_step(a).map(|_| true)?,
        Cmd::Doctor(a) => return doctor::doctor(a),
        Cmd::FetchModel => {
            println!("{}", doctor::fetch_model()?.display());
            true
        }
        Cmd::Directions(a) => directions::run(a).map(|_| true)?,
        Cmd::Eval(a) => eval::run(a).map(|_| true)?,
        Cmd::Generate(a) => generate::run(a).map(|_| true)?,
        Cmd::Judge(a) => judge::run(*a).map(|_| true)?,
        Cmd::BenchGenerate(a) => bench::bench_generate(a).map(|_| true)?,
    })
}
