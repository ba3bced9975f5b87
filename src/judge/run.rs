//! The `judge` command around the pieces: answers read and checked against the questions, the
//! jobs not yet in the output, the judge (HTTP or local) asked, lines appended, a summary.

use super::http::{HttpJudge, HttpOptions};
use super::local::LocalJudge;
use super::{jobs, judged_line, read_answers, run_concurrent, Answer, Output, Prompts, Tally};
use crate::backend::device::Device;
use crate::backend::Backend;
use crate::model::spec::ModelSpec;
use crate::util::progress;
use crate::with_backend;
use anyhow::{bail, Context, Result};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Mutex;

/// Which judge.
#[derive(Clone, Debug)]
pub enum JudgeKind {
    Http {
        opts: HttpOptions,
        concurrency: usize,
        /// USD per million prompt and completion tokens, for the cost line.
        price: (f64, f64),
    },
    Local {
        spec: ModelSpec,
        device: Device,
        min_mass: f64,
    },
}

/// Everything one `judge` run needs.
#[derive(Clone, Debug)]
pub struct JudgeRun {
    pub answers: PathBuf,
    pub output: PathBuf,
    pub prompts: Prompts,
    /// The question ids of `--questions` (and the file's name), when given.
    pub question_ids: Option<(String, Vec<String>)>,
    pub kind: JudgeKind,
}

/// Every answer's id must be one of the questions'.
pub fn check_ids(answers: &[Answer], answers_file: &str, ids: &[String], file: &str) -> Result<()> {
    for a in answers {
        if !ids.contains(&a.id) {
            let shown: Vec<&str> = ids.iter().take(12).map(String::as_str).collect();
            bail!(
                "{answers_file}:{}: the answer's question id {:?} is not in {file} (its ids: \
                 {}{}); were the answers generated from another question file?",
                a.line,
                a.id,
                shown.join(", "),
                if ids.len() > 12 { ", ..." } else { "" }
            );
        }
    }
    Ok(())
}

/// Run the judge; returns the summary line.
pub fn run(r: &JudgeRun) -> Result<String> {
    let answers = read_answers(&r.answers)?;
    if let Some((file, ids)) = &r.question_ids {
        check_ids(&answers, &r.answers.display().to_string(), ids, file)?;
    }
    match &r.kind {
        JudgeKind::Http {
            opts,
            concurrency,
            price,
        } => {
            let judge_name = format!("chat-completions:{}", opts.model);
            let judge = HttpJudge::new(opts.clone())?;
            let (todo, mut out, skipped) = pending(&answers, r, &judge_name)?;
            eprintln!(
                "judging {} answers with {} at {} ({} already judged in {})",
                todo.len(),
                opts.model,
                judge.url(),
                skipped,
                r.output.display()
            );
            let bar = progress(todo.len() as u64, "judge");
            let tally = Mutex::new(Tally::default());
            let res = run_concurrent(
                &todo,
                *concurrency,
                &mut out,
                |i, job| {
                    let a = &job.answer;
                    let p = &job.prompts;
                    let seed = (i as u64) << 1;
                    let al = super::prompts::render(&p.aligned, &a.question, &a.answer)?;
                    let aligned = judge.judge(&al, &job.aligned_sha, seed)?;
                    let co = super::prompts::render(&p.coherent, &a.question, &a.answer)?;
                    let coherent = judge.judge(&co, &job.coherent_sha, seed | 1)?;
                    let mut t = tally.lock().unwrap_or_else(|e| e.into_inner());
                    t.add(&aligned);
                    t.add(&coherent);
                    Ok(judged_line(
                        job,
                        &judge_name,
                        &aligned,
                        &coherent,
                        serde_json::json!({"judge_url": judge.url()}),
                    ))
                },
                |n| bar.set_position(n as u64),
            );
            bar.finish_and_clear();
            let u = &judge.usage;
            let (pt, ct) = (
                u.prompt_tokens.load(Ordering::Relaxed),
                u.completion_tokens.load(Ordering::Relaxed),
            );
            let cost = (pt as f64 * price.0 + ct as f64 * price.1) / 1e6;
            let t = tally.into_inner().unwrap_or_else(|e| e.into_inner());
            if t.from_reply > 0 && opts.top_logprobs > 0 {
                eprintln!(
                    "note: {} of {} judgements were read from the reply text: the endpoint sent \
                     no log-probabilities, or wrote the number over several tokens (docs/eval.md)",
                    t.from_reply,
                    2 * out.written
                );
            }
            let summary = format!(
                "judged {} answers ({} skipped, already judged): {} scores, {} CODE/REFUSAL, {} \
                 without a score; {} requests ({} retries), {pt} prompt + {ct} completion tokens{}; \
                 wrote {}",
                out.written,
                skipped,
                t.scored,
                t.labels,
                t.no_score,
                u.requests.load(Ordering::Relaxed),
                u.retries.load(Ordering::Relaxed),
                if price.0 > 0.0 || price.1 > 0.0 {
                    format!(", cost ${cost:.4}")
                } else {
                    String::new()
                },
                r.output.display()
            );
            res.map(|_| summary.clone()).with_context(|| {
                format!(
                    "the run stopped; {} answers were judged and written before it ({summary}); \
                     rerun the same command to resume",
                    out.written
                )
            })
        }
        JudgeKind::Local {
            spec,
            device,
            min_mass,
        } => {
            let loaded = spec.load()?;
            let tok = loaded.tokenizer.as_ref().with_context(|| {
                format!(
                    "{}: the judge model has no tokenizer",
                    loaded.source.display()
                )
            })?;
            let judge_name = format!("local:{}", loaded.source.display());
            let lj = LocalJudge::new(
                tok,
                loaded.chat_template.as_ref(),
                loaded.config.vocab_size,
                *min_mass,
            )?;
            let (todo, mut out, skipped) = pending(&answers, r, &judge_name)?;
            with_backend!(*device, |be| run_local(
                be,
                spec,
                &loaded,
                &lj,
                &todo,
                &mut out,
                &judge_name
            ))?;
            Ok(format!(
                "judged {} answers ({} skipped, already judged) with {}; wrote {}",
                out.written,
                skipped,
                judge_name,
                r.output.display()
            ))
        }
    }
}

/// The jobs of `judge` not yet in the output file (opened for appending), and how many were
/// skipped because they are: what makes a rerun resume.
fn pending(
    answers: &[Answer],
    r: &JudgeRun,
    judge: &str,
) -> Result<(Vec<super::Job>, Output, usize)> {
    let out = Output::open(&r.output)?;
    let todo: Vec<_> = jobs(answers, &r.prompts, judge)
        .into_iter()
        .filter(|j| !out.done.contains(&j.key))
        .collect();
    let skipped = answers.len() - todo.len();
    Ok((todo, out, skipped))
}

fn run_local<B: Backend>(
    be: &B,
    spec: &ModelSpec,
    loaded: &crate::model::loader::LoadedModel,
    lj: &LocalJudge,
    todo: &[super::Job],
    out: &mut Output,
    judge_name: &str,
) -> Result<()> {
    let mut model = spec.build(be, loaded)?;
    eprintln!(
        "judging {} answers with {} on {}",
        todo.len(),
        loaded.source.display(),
        be.name()
    );
    let bar = progress(todo.len() as u64, "judge");
    for job in todo {
        let a = &job.answer;
        let p = &job.prompts;
        let al = super::prompts::render(&p.aligned, &a.question, &a.answer)?;
        let aligned = lj.judge(be, &mut model, &al, &job.aligned_sha)?;
        let co = super::prompts::render(&p.coherent, &a.question, &a.answer)?;
        let coherent = lj.judge(be, &mut model, &co, &job.coherent_sha)?;
        out.append(&judged_line(
            job,
            judge_name,
            &aligned,
            &coherent,
            serde_json::json!({"judge_backend": be.name()}),
        ))?;
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(())
}
