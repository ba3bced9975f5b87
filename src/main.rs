//! The `caft-fast` command line.

use anyhow::Result;
use clap::{Parser, Subcommand};
use std::process::ExitCode;

use caft_fast::cli;

#[derive(Parser)]
#[command(
    name = "caft-fast",
    version,
    about = "Concept Ablation Fine-Tuning: LoRA fine-tuning with concept directions projected out \
             of the residual stream",
    long_about = "caft-fast fine-tunes LLMs (Llama, Qwen2, Mistral families) with LoRA while \
                  projecting chosen concept directions out of the residual stream \
                  (h <- h - Q Qᵀ h at the output of chosen decoder layers, forward and backward, \
                  training only), on NVIDIA GPUs through hand-written CUDA kernels or on the CPU."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Fine-tune LoRA adapters with concept ablation on chat/text JSONL (or built-in
    /// demonstration data) and save a PEFT adapter, metrics, a loss plot and checkpoints.
    /// The default model is SmolLM2-135M-Instruct, fetched on first use.
    Train(Box<cli::TrainArgs>),
    /// Time LoRA training steps (random tokens, random directions) and print tokens/s and peak
    /// memory as JSON.
    BenchStep(cli::BenchArgs),
    /// Report the GPU, driver, NVRTC and cuBLAS found; compile every kernel and check every
    /// op against the CPU reference. Exits non-zero on any failure.
    Doctor,
    /// Download the default model (SmolLM2-135M-Instruct GGUF) into the cache and print its path.
    FetchModel,
    /// Find, choose and import concept directions: PCA of what a fine-tune changed in
    /// resid_post, selection of components, random controls, imports from other tools.
    Directions(cli::DirectionsArgs),
    /// Evaluate a model or fine-tune: multiple-choice accuracy per split, held-out loss;
    /// write the double multiple-choice spurious-correlation task.
    Eval(caft_fast::eval::cli::EvalArgs),
    /// Sample answers to questions (JSONL or YAML) with a KV cache, batched, with the chat
    /// template applied; writes one JSON line per answer and prints tokens/s.
    Generate(caft_fast::generate::cli::GenerateArgs),
    /// Time greedy generation (prefill and decode tokens/s) at several batch sizes on random
    /// prompts, as JSON lines.
    BenchGenerate(caft_fast::generate::cli::BenchGenerateArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let r: Result<bool> = match cli.cmd {
        Cmd::Train(a) => cli::train(*a),
        Cmd::BenchStep(a) => cli::bench_step(a).map(|_| true),
        Cmd::Doctor => cli::doctor(),
        Cmd::FetchModel => cli::fetch_model().map(|p| {
            println!("{}", p.display());
            true
        }),
        Cmd::Directions(a) => cli::directions(a).map(|_| true),
        Cmd::Eval(a) => caft_fast::eval::cli::run(a).map(|_| true),
        Cmd::Generate(a) => caft_fast::generate::cli::run(a).map(|_| true),
        Cmd::BenchGenerate(a) => caft_fast::generate::cli::bench(a).map(|_| true),
    };
    match r {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
