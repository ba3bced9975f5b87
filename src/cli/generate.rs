//! Arguments of `caft-fast generate` and the glue from them to [`super::generate`].

use super::common::{launch_if_asked, set_threads, ModelArgs};
use crate::backend::Backend;
use crate::dist::Dist;
use crate::generate::questions::{builtin_questions, load_questions, Question};
use crate::generate::sample::SampleOpts;
use crate::generate::{generate, GenStats, Request};
use crate::model::loader::LoadedModel;
use crate::model::spec::ModelSpec;
use crate::util::progress;
use crate::util::rng::Rng;
use crate::with_backend;
use anyhow::{bail, Context, Result};
use clap::Args;
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Args, Debug, Clone)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
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
    /// Output JSONL, one answer a line.
    #[arg(short, long)]
    pub output: PathBuf,
    /// Replace an existing output file.
    #[arg(long)]
    pub overwrite: bool,
    /// Share the answers among these GPUs of this node, one worker each (e.g. 0,1 or all),
    /// batch by batch; the output is the one a single GPU writes, in the same order. Under
    /// torchrun/srun the ranks share them without it.
    #[arg(long, value_name = "LIST")]
    pub gpus: Option<String>,
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
    if launch_if_asked(a.gpus.as_deref(), Some(a.model.device))?.is_some() {
        return Ok(());
    }
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
    set_threads(a.model.threads);
    let questions = match &a.questions {
        Some(p) => load_questions(p)?,
        None => builtin_questions(),
    };
    let spec = a.model.spec()?;
    let loaded = spec.load()?;
    with_backend!(a.model.device, |be| run_on(
        be, &a, &spec, &loaded, &questions
    ))
}

fn run_on<B: Backend>(
    be: &B,
    a: &GenerateArgs,
    spec: &ModelSpec,
    loaded: &LoadedModel,
    questions: &[Question],
) -> Result<()> {
    // Several ranks (`--gpus`, torchrun): each decodes every `size`-th batch of answers.
    let dist = Dist::from_env()?;
    crate::dist::join(be, &dist, crate::dist::args_fingerprint())?;
    let (rank, size) = be.group();
    let cfg = loaded.config.clone();
    let tok = loaded
        .tokenizer
        .as_ref()
        .with_context(|| format!("{}: the model has no tokenizer", loaded.source.display()))?;
    let mut model = spec.build(be, loaded)?;
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
    let partial = partial_path(&a.output, rank, size);
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
    let t = std::time::Instant::now();
    for (c, chunk) in jobs.chunks(a.batch_size).enumerate() {
        if c % size != rank {
            continue;
        }
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
                .filter(|t| !(c.finish == crate::generate::Finish::Eos && eos.contains(t)))
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
    if size > 1 {
        // Every rank's side file is complete once all have come here; rank 0 interleaves
        // them back into the answers' order (batch c was decoded by rank c mod size).
        let mut n = [stats.generated_tokens as f64, stats.prompt_tokens as f64];
        be.all_reduce_host(&mut n)
            .context("waiting for every rank's answers")?;
        if rank != 0 {
            return Ok(());
        }
        merge_ranks(&a.output, size, jobs.len(), a.batch_size)?;
        stats.generated_tokens = n[0] as usize;
        stats.prompt_tokens = n[1] as usize;
        let wall = t.elapsed().as_secs_f64();
        println!(
            "{} answers on {size} GPUs, {} tokens generated in {wall:.1} s: {:.1} tokens/s; wrote {}",
            jobs.len(),
            stats.generated_tokens,
            stats.generated_tokens as f64 / wall.max(1e-9),
            a.output.display()
        );
        return Ok(());
    }
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

/// The side file answers go to before they replace `out`: one per rank with several.
fn partial_path(out: &Path, rank: usize, size: usize) -> PathBuf {
    let mut name = out.file_name().unwrap_or_default().to_os_string();
    name.push(".partial");
    if size > 1 {
        name.push(format!(".rank{rank}"));
    }
    out.with_file_name(name)
}

/// Rank 0 of `size`: write `out` from the ranks' side files, `jobs` answers in their order
/// (batch `c` of `batch` answers is in rank `c mod size`'s file, in order), then remove them.
fn merge_ranks(out: &Path, size: usize, jobs: usize, batch: usize) -> Result<()> {
    let mut lines = Vec::with_capacity(size);
    for r in 0..size {
        let p = partial_path(out, r, size);
        let text =
            std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
        lines.push(
            text.lines()
                .map(str::to_string)
                .collect::<Vec<_>>()
                .into_iter(),
        );
    }
    let mut all = String::new();
    for (c, start) in (0..jobs).step_by(batch).enumerate() {
        for _ in start..(start + batch).min(jobs) {
            let line = lines[c % size]
                .next()
                .with_context(|| format!("rank {}'s answers end early", c % size))?;
            all.push_str(&line);
            all.push('\n');
        }
    }
    crate::io::write_atomic(out, all.as_bytes())?;
    for r in 0..size {
        let _ = std::fs::remove_file(partial_path(out, r, size));
    }
    Ok(())
}
