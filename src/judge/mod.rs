//! `caft-fast judge`: score the answers `generate` sampled for alignment and coherence with an
//! LLM judge (step 5 of the workflow in the README), and report misalignment rates.
//!
//! - [`prompts`]: the judge prompts (defaults, files, a question file's own) and templating.
//! - [`score`]: from a judge's reply or token distribution to a score, CODE or REFUSAL.
//! - [`http`]: the judge behind an OpenAI-compatible chat-completions endpoint.
//! - [`local`]: a model run by caft-fast itself as the judge, its next-token logits read.
//! - [`report`]: misaligned-answer rates with bootstrap intervals, tables and charts.
//!
//! This file: the answers file, the judged lines, and the run: jobs not yet judged (resume),
//! answers judged concurrently (HTTP) or in turn (local), each judged line appended and flushed
//! as it comes back.

pub mod http;
pub mod local;
pub mod prompts;
pub mod report;
pub mod run;
pub mod score;

use crate::data::read_json_lines;
use crate::io::sha256_hex;
use anyhow::{bail, Context, Result};
use prompts::PromptSet;
use score::Judgement;
use serde_json::Value;
use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// One answer `generate` wrote.
#[derive(Clone, Debug, PartialEq)]
pub struct Answer {
    /// Line in the answers file (1-based).
    pub line: usize,
    pub id: String,
    pub paraphrase: u64,
    pub sample: u64,
    pub question: String,
    pub answer: String,
}

/// The fields every `generate` line has that the judge needs.
pub const ANSWER_FIELDS: [&str; 5] = ["id", "paraphrase", "sample", "question", "answer"];

/// Read a `generate` output file; errors name `file:line` and the missing or mistyped fields.
pub fn read_answers(path: &Path) -> Result<Vec<Answer>> {
    let at = path.display().to_string();
    let mut out: Vec<Answer> = Vec::new();
    let mut seen = HashSet::new();
    for (line, v) in read_json_lines(path, "answers")? {
        let missing: Vec<&str> = ANSWER_FIELDS
            .iter()
            .copied()
            .filter(|k| v.get(*k).is_none_or(Value::is_null))
            .collect();
        if !missing.is_empty() {
            bail!(
                "{at}:{line}: not `caft-fast generate` output: missing {} (each line needs {})",
                missing
                    .iter()
                    .map(|k| format!("\"{k}\""))
                    .collect::<Vec<_>>()
                    .join(", "),
                ANSWER_FIELDS.join(", ")
            );
        }
        let text = |k: &str| -> Result<String> {
            v[k].as_str()
                .map(str::to_string)
                .with_context(|| format!("{at}:{line}: \"{k}\" must be a string, got {}", v[k]))
        };
        let num = |k: &str| -> Result<u64> {
            v[k].as_u64().with_context(|| {
                format!("{at}:{line}: \"{k}\" must be a whole number, got {}", v[k])
            })
        };
        let id = match &v["id"] {
            Value::Number(n) => n.to_string(),
            _ => text("id")?,
        };
        let a = Answer {
            line,
            id,
            paraphrase: num("paraphrase")?,
            sample: num("sample")?,
            question: text("question")?,
            answer: text("answer")?,
        };
        if !seen.insert((a.id.clone(), a.paraphrase, a.sample)) {
            bail!(
                "{at}:{line}: the answer (id {:?}, paraphrase {}, sample {}) appears twice",
                a.id,
                a.paraphrase,
                a.sample
            );
        }
        out.push(a);
    }
    if out.is_empty() {
        bail!("{at}: no answers (the file is empty)");
    }
    Ok(out)
}

/// The prompts for each question: its own where the question file has them, else `default`.
#[derive(Clone, Debug)]
pub struct Prompts {
    pub default: PromptSet,
    pub by_id: BTreeMap<String, PromptSet>,
}

impl Prompts {
    pub fn for_id(&self, id: &str) -> &PromptSet {
        self.by_id.get(id).unwrap_or(&self.default)
    }
}

/// One answer to judge, with everything that identifies its judgement.
#[derive(Clone, Debug)]
pub struct Job {
    pub answer: Answer,
    pub prompts: PromptSet,
    pub aligned_sha: String,
    pub coherent_sha: String,
    /// Identifies answer, prompts and judge: the resume key.
    pub key: String,
}

/// The jobs for `answers` judged by `judge` (its name and scoring settings) with `prompts`.
pub fn jobs(answers: &[Answer], prompts: &Prompts, judge: &str) -> Vec<Job> {
    answers
        .iter()
        .map(|a| {
            let p = prompts.for_id(&a.id).clone();
            let (aligned_sha, coherent_sha) = p.hashes();
            let key = sha256_hex(
                serde_json::json!([
                    a.id,
                    a.paraphrase,
                    a.sample,
                    a.question,
                    a.answer,
                    judge,
                    aligned_sha,
                    coherent_sha
                ])
                .to_string()
                .as_bytes(),
            );
            Job {
                answer: a.clone(),
                prompts: p,
                aligned_sha,
                coherent_sha,
                key,
            }
        })
        .collect()
}

/// The judged line of one answer.
pub fn judged_line(
    job: &Job,
    judge: &str,
    aligned: &Judgement,
    coherent: &Judgement,
    extra: Value,
) -> Value {
    let a = &job.answer;
    let mut v = serde_json::json!({
        "id": a.id,
        "paraphrase": a.paraphrase,
        "sample": a.sample,
        "question": a.question,
        "answer": a.answer,
        "judge": judge,
        "aligned": aligned,
        "coherent": coherent,
        "key": job.key,
    });
    if let (Value::Object(m), Value::Object(e)) = (&mut v, extra) {
        m.extend(e);
    }
    v
}

/// The judged-lines file: the keys already in it (after cutting off a last line a crash left
/// half-written), appended to line by line (created with the first line).
pub struct Output {
    path: std::path::PathBuf,
    file: Option<std::fs::File>,
    pub done: HashSet<String>,
    pub written: usize,
}

impl Output {
    /// Open (or create) `path` for appending; read the keys of the lines already there.
    pub fn open(path: &Path) -> Result<Output> {
        let at = path.display().to_string();
        let mut done = HashSet::new();
        if path.exists() {
            let text = std::fs::read_to_string(path).with_context(|| format!("reading {at}"))?;
            let mut good_len = 0;
            let mut pos = 0;
            for (i, line) in text.split_inclusive('\n').enumerate() {
                pos += line.len();
                if line.trim().is_empty() {
                    good_len = pos;
                    continue;
                }
                let complete = line.ends_with('\n');
                match serde_json::from_str::<Value>(line.trim()) {
                    Ok(v) => {
                        let key = v.get("key").and_then(Value::as_str).with_context(|| {
                            format!(
                                "{at}:{}: no \"key\": this is not a `caft-fast judge` output \
                                 (choose another -o)",
                                i + 1
                            )
                        })?;
                        done.insert(key.to_string());
                        good_len = pos;
                    }
                    Err(_) if !complete => {
                        eprintln!(
                            "note: {at}:{}: the last line was cut off (an interrupted run); \
                             dropping it, its answer is judged again",
                            i + 1
                        );
                    }
                    Err(e) => bail!("{at}:{}: malformed JSON: {e}", i + 1),
                }
            }
            if good_len < text.len() {
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(path)
                    .with_context(|| format!("opening {at}"))?;
                f.set_len(good_len as u64)
                    .with_context(|| format!("truncating {at}"))?;
            }
        }
        Ok(Output {
            path: path.to_path_buf(),
            file: None,
            done,
            written: 0,
        })
    }

    /// Append one line and flush it to the file.
    pub fn append(&mut self, v: &Value) -> Result<()> {
        let mut line = v.to_string();
        line.push('\n');
        if self.file.is_none() {
            let path = &self.path;
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
            }
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("opening {} for appending", path.display()))?;
            self.file = Some(f);
        }
        let file = self.file.as_mut().expect("opened above");
        file.write_all(line.as_bytes())
            .and_then(|_| file.flush())
            .with_context(|| format!("writing {}", self.path.display()))?;
        self.written += 1;
        Ok(())
    }
}

/// Judge `jobs` on `threads` threads, `judge_one` making the judged line of one job (its index
/// seeds any randomness), each line appended to `out` as it comes back. The first error stops
/// the run: no new job starts, the jobs in flight finish and are written, then it is returned.
pub fn run_concurrent<F>(
    jobs: &[Job],
    threads: usize,
    out: &mut Output,
    judge_one: F,
    mut progress: impl FnMut(usize),
) -> Result<()>
where
    F: Fn(usize, &Job) -> Result<Value> + Sync,
{
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let mut first_err: Option<anyhow::Error> = None;
    std::thread::scope(|s| {
        let (tx, rx) = std::sync::mpsc::channel::<Result<Value>>();
        for _ in 0..threads.max(1).min(jobs.len().max(1)) {
            let tx = tx.clone();
            let (next, stop, judge_one) = (&next, &stop, &judge_one);
            s.spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    let Some(job) = jobs.get(i) else { break };
                    let r = judge_one(i, job);
                    let failed = r.is_err();
                    if tx.send(r).is_err() || failed {
                        stop.store(true, Ordering::SeqCst);
                        break;
                    }
                }
            });
        }
        drop(tx);
        let mut n = 0;
        for r in rx {
            match r.and_then(|v| out.append(&v)) {
                Ok(()) => {
                    n += 1;
                    progress(n);
                }
                Err(e) => {
                    stop.store(true, Ordering::SeqCst);
                    first_err.get_or_insert(e);
                }
            }
        }
    });
    match first_err {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Counts of a finished run for the summary line.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Tally {
    pub scored: usize,
    pub labels: usize,
    pub no_score: usize,
    /// Judgements read from the reply text (no usable log-probabilities came back).
    pub from_reply: usize,
}

impl Tally {
    pub fn add(&mut self, j: &Judgement) {
        if j.method == "reply" {
            self.from_reply += 1;
        }
        if j.score.is_some() {
            self.scored += 1;
        } else if j.label.is_some() {
            self.labels += 1;
        } else {
            self.no_score += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str, text: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("caft-judge-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn answers_need_the_generate_fields() {
        let p = tmp(
            "a.jsonl",
            "{\"id\": \"q\", \"paraphrase\": 0, \"sample\": 0, \"question\": \"Q\", \"answer\": \"A\"}\n{\"id\": \"q\", \"question\": \"Q\", \"text\": \"A\"}\n",
        );
        let e = format!("{:#}", read_answers(&p).unwrap_err());
        assert!(
            e.contains("a.jsonl:2") && e.contains("\"paraphrase\", \"sample\", \"answer\""),
            "{e}"
        );
    }

    /// A cut-off last line is dropped (and rewritten later); complete lines are kept.
    #[test]
    fn output_resumes_after_a_cut_off_line() {
        let p = tmp(
            "out.jsonl",
            "{\"key\": \"k1\"}\n{\"key\": \"k2\"}\n{\"key\": \"k3\", \"al",
        );
        let mut o = Output::open(&p).unwrap();
        assert_eq!(o.done, HashSet::from(["k1".to_string(), "k2".to_string()]));
        o.append(&serde_json::json!({"key": "k3"})).unwrap();
        drop(o);
        assert_eq!(
            std::fs::read_to_string(&p).unwrap(),
            "{\"key\": \"k1\"}\n{\"key\": \"k2\"}\n{\"key\":\"k3\"}\n"
        );
    }

    /// The first error stops new jobs; what was judged before it is written.
    #[test]
    fn an_error_stops_the_run_and_keeps_what_was_judged() {
        let answers: Vec<Answer> = (0..20)
            .map(|i| Answer {
                line: i + 1,
                id: "q".into(),
                paraphrase: 0,
                sample: i as u64,
                question: "Q".into(),
                answer: format!("A{i}"),
            })
            .collect();
        let prompts = Prompts {
            default: prompts::default_prompts(),
            by_id: BTreeMap::new(),
        };
        let js = jobs(&answers, &prompts, "test");
        assert_eq!(js.iter().map(|j| &j.key).collect::<HashSet<_>>().len(), 20);
        let p = tmp("stop.jsonl", "");
        let mut out = Output::open(&p).unwrap();
        let calls = AtomicUsize::new(0);
        let r = run_concurrent(
            &js,
            1,
            &mut out,
            |i, j| {
                calls.fetch_add(1, Ordering::SeqCst);
                if i == 5 {
                    bail!("boom at {}", j.answer.sample)
                }
                Ok(serde_json::json!({"key": j.key}))
            },
            |_| {},
        );
        assert!(format!("{:#}", r.unwrap_err()).contains("boom at 5"));
        assert_eq!(
            calls.load(Ordering::SeqCst),
            6,
            "no job after the failing one"
        );
        assert_eq!(out.written, 5);
    }
}
