//! Arguments of `caft-fast generate` and the glue from them to [`super::generate`].

use super::questions::{builtin_questions, load_questions, Question};
use super::sample::SampleOpts;
use super::{generate, GenStats, Request};
use crate::backend::cpu::CpuBackend;
use crate::backend::Backend;
use crate::cli::{model_path, resolve_device, set_threads, Device};
use crate::directions::{load_peft_adapter, progress};
use crate::model::ablation::load_directions;
use crate::model::loader::{load_model, LoadedModel};
use crate::model::transformer::Model;
use crate::util::rng::Rng;
use anyhow::{bail, Context, Result};
use clap::Args;
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Args, Debug, Clone)]
pub struct GenerateArgs {
    /// Base model: a Hugging Face folder or a GGUF file [default: SmolLM2-135M-Instruct].
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// A PEFT LoRA adapter folder (as `caft-fast train` writes it) to apply.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Directions to ablate while generating (CAFT itself ablates during training only; this
    /// is for experiments).
    #[arg(long)]
    pub ablate: Option<PathBuf>,
    /// Questions: JSONL ({"id", "question" | "messages" | "prompt" | "paraphrases"}) or YAML
    /// (the emergent-misalignment question files) [default: 8 built-in open-ended questions].
    #[arg(long)]
    pub questions: Option<PathBuf>,
    /// Samples per question (per paraphrase) [default: the file's samples_per_paraphrase, else
    /// 100].
    #[arg(long)]
    pub samples: Option<usize>,
    /// Sampling temperature; 0 is greedy decoding.
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f64,
    /// Nucleus sampling: keep the most probable tokens up to this probability mass.
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    /// Most new tokens per answer.
    #[arg(long, default_value_t = 600)]
    pub max_tokens: usize,
    /// Seed of the samplers (each answer has its own stream derived from it).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Sequences decoded together.
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// Never stop at an end-of-sequence token: every answer has exactly --max-tokens tokens
    /// (for benchmarks that must compare equal work).
    #[arg(long)]
    pub ignore_eos: bool,
    /// A system prompt for chat questions that have none.
    #[arg(long)]
    pub system: Option<String>,
    #[arg(long, value_enum, default_value = "auto")]
    pub device: Device,
    /// CPU threads (0 = all cores).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Output JSONL, one answer a line.
    #[arg(short, long)]
    pub output: PathBuf,
    /// Replace an existing output file.
    #[arg(long)]
    pub overwrite: bool,
}

/// One answer to produce.
struct Job {
    question: usize,
    sample: usize,
    seed: u64,
}

/// Each answer's sampler seed, from the run's seed and the answer's place, so that an answer
/// does not depend on the batch it was decoded in.
fn job_seed(seed: u64, question: usize, sample: usize) -> u64 {
    let mut r = Rng::new(seed);
    Rng::new(r.next_u64() ^ ((question as u64) << 32) ^ sample as u64).next_u64()
}

pub fn run(a: GenerateArgs) -> Result<()> {
    if a.output.exists() && !a.overwrite {
        bail!(
            "{} exists; pass --overwrite to replace it",
            a.output.display()
        );
    }
    if !(a.temperature >= 0.0 && a.temperature.is_finite()) {
        bail!(
            "--temperature must be >= 0 (0 is greedy), got {}",
            a.temperature
        );
    }
    if !(a.top_p > 0.0 && a.top_p <= 1.0) {
        bail!("--top-p must be in (0, 1], got {}", a.top_p);
    }
    if a.max_tokens == 0 || a.batch_size == 0 || a.samples == Some(0) {
        bail!("--max-tokens, --batch-size and --samples must be at least 1");
    }
    set_threads(a.threads);
    let questions = match &a.questions {
        Some(p) => load_questions(p)?,
        None => builtin_questions(),
    };
    let loaded = load_model(&model_path(&a.model)?)?;
    match resolve_device(a.device)? {
        Device::Cuda => run_on(&crate::cli::cuda_backend()?, &a, &loaded, &questions),
        _ => run_on(&CpuBackend::new(), &a, &loaded, &questions),
    }
}

fn run_on<B: Backend>(
    be: &B,
    a: &GenerateArgs,
    loaded: &LoadedModel,
    questions: &[Question],
) -> Result<()> {
    let cfg = loaded.config.clone();
    let tok = loaded
        .tokenizer
        .as_ref()
        .with_context(|| format!("{}: the model has no tokenizer", loaded.source.display()))?;
    let mut model = Model::new(be, cfg.clone(), loaded.weights.as_ref())?;
    if let Some(dir) = &a.adapter {
        let (layout, params) = load_peft_adapter(dir, &cfg)?;
        model.set_lora(be, layout, &params)?;
    }
    if let Some(path) = &a.ablate {
        let dirs = load_directions(path, None, cfg.hidden_size, cfg.num_layers)?;
        model.set_ablation(be, &dirs)?;
    }
    let mut eos = cfg.eos_token_ids.clone();
    eos.extend(tok.eos_token_id());
    if a.ignore_eos {
        eos.clear();
    } else if eos.is_empty() {
        eprintln!(
            "note: the model names no end-of-sequence token; every answer runs to --max-tokens"
        );
    }
    let prompts: Vec<Vec<u32>> = questions
        .iter()
        .map(|q| {
            q.encode(tok, loaded.chat_template.as_ref(), a.system.as_deref())
                .with_context(|| format!("question {:?}", q.id))
        })
        .collect::<Result<_>>()?;
    let mut jobs = Vec::new();
    for (qi, q) in questions.iter().enumerate() {
        for s in 0..a.samples.or(q.samples).unwrap_or(100) {
            jobs.push(Job {
                question: qi,
                sample: s,
                seed: job_seed(a.seed, qi, s),
            });
        }
    }
    let opts = SampleOpts {
        temperature: a.temperature,
        top_p: a.top_p,
        max_tokens: a.max_tokens,
    };
    // Answers go to a side file as they come and replace the output only when all are done,
    // so an interrupted run never leaves a truncated file under the output's name.
    let partial = partial_path(&a.output);
    let mut out = std::io::BufWriter::new(
        std::fs::File::create(&partial)
            .with_context(|| format!("creating {}", partial.display()))?,
    );
    eprintln!(
        "generating {} answers ({} prompts) with {} on {}",
        jobs.len(),
        questions.len(),
        loaded.source.display(),
        be.name()
    );
    let bar = progress(jobs.len() as u64, "generate");
    let mut stats = GenStats::default();
    for chunk in jobs.chunks(a.batch_size) {
        let reqs: Vec<Request> = chunk
            .iter()
            .map(|j| Request {
                prompt: prompts[j.question].clone(),
                seed: j.seed,
            })
            .collect();
        let (done, st) = generate(be, &mut model, &reqs, &opts, &eos)?;
        stats.add(&st);
        for (j, c) in chunk.iter().zip(&done) {
            let q = &questions[j.question];
            let body = c
                .tokens
                .iter()
                .copied()
                .filter(|t| !(c.finish == super::Finish::Eos && eos.contains(t)))
                .collect::<Vec<_>>();
            let line = serde_json::json!({
                "id": q.id,
                "paraphrase": q.paraphrase,
                "sample": j.sample,
                "question": q.text(),
                "answer": tok.decode_with(&body, true)?,
                "prompt_tokens": prompts[j.question].len(),
                "completion_tokens": c.tokens.len(),
                "finish_reason": c.finish.as_str(),
            });
            writeln!(out, "{line}").with_context(|| format!("writing {}", partial.display()))?;
        }
        out.flush()
            .with_context(|| format!("writing {}", partial.display()))?;
        bar.inc(chunk.len() as u64);
        bar.set_message(format!("generate {:.0} tok/s", stats.tokens_per_sec()));
    }
    bar.finish_and_clear();
    drop(out);
    std::fs::rename(&partial, &a.output)
        .with_context(|| format!("renaming {} to {}", partial.display(), a.output.display()))?;
    println!(
        "{} answers, {} tokens generated in {:.1} s: {:.1} tokens/s (prefill {} tokens in {:.1} s); \
         wrote {}",
        jobs.len(),
        stats.generated_tokens,
        stats.prefill_secs + stats.decode_secs,
        stats.tokens_per_sec(),
        stats.prompt_tokens,
        stats.prefill_secs,
        a.output.display()
    );
    Ok(())
}

fn partial_path(out: &Path) -> PathBuf {
    let mut name = out.file_name().unwrap_or_default().to_os_string();
    name.push(".partial");
    out.with_file_name(name)
}

#[derive(Args, Debug, Clone)]
pub struct BenchGenerateArgs {
    #[command(flatten)]
    pub source: crate::cli::BenchModelArgs,
    #[arg(long, value_enum, default_value = "auto")]
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
pub fn bench(a: BenchGenerateArgs) -> Result<()> {
    set_threads(a.threads);
    let loaded = a.source.load()?;
    match resolve_device(a.device)? {
        Device::Cuda => bench_on(&crate::cli::cuda_backend()?, &a, &loaded),
        _ => bench_on(&CpuBackend::new(), &a, &loaded),
    }
}

fn bench_on<B: Backend>(be: &B, a: &BenchGenerateArgs, loaded: &LoadedModel) -> Result<()> {
    let cfg = &loaded.config;
    let mut model = Model::new(be, cfg.clone(), loaded.weights.as_ref())?;
    let batches = crate::cli::parse_layers(&a.batch)?;
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
