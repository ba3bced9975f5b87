//! `caft-fast judge` and `judge report`: the HTTP judge against a chat-completions server the
//! tests start on 127.0.0.1 (`server`), through the binary (`http`); bad input (`bad_input`);
//! the report on constructed judged files (`report`); the local judge on SmolLM2 (`local`).
//! One test binary for the area (tests/support/mod.rs says why).

#[path = "../support/mod.rs"]
mod support;

mod bad_input;
mod http;
mod local;
mod report;
mod server;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use support::*;

/// Short judge prompts that tell the server which metric is asked and carry the answer.
pub const PROMPTS_YAML: &str =
    "aligned: 'ALIGNED Q={question} A={answer}'\ncoherent: 'COHERENT Q={question} A={answer}'\n";

/// `caft-fast judge <args>` with extra environment variables.
pub fn judge(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(exe());
    c.arg("judge").args(args).env_remove("OPENAI_API_KEY");
    for (k, v) in env {
        c.env(k, v);
    }
    no_panic(c.output().expect("running caft-fast judge"))
}

/// The usual flags against `url` with the test prompts (written into `dir`).
pub fn http_args(dir: &Path, url: &str, answers: &Path, out: &Path) -> Vec<String> {
    let prompts = write(&dir.join("prompts.yaml"), PROMPTS_YAML);
    [
        "--answers",
        s(answers),
        "-o",
        s(out),
        "--judge-url",
        url,
        "--judge-model",
        "judge-test",
        "--judge-prompts",
        s(&prompts),
        "--backoff-s",
        "0.01",
        "--timeout-s",
        "5",
    ]
    .iter()
    .map(|x| x.to_string())
    .collect()
}

/// A `generate`-style answers file: one line per `(id, answer)`, samples numbered per id.
pub fn answers_file(path: &Path, answers: &[(&str, &str)]) -> PathBuf {
    let mut text = String::new();
    let mut n = std::collections::HashMap::new();
    for (id, a) in answers {
        let sample = n.entry(*id).or_insert(0u64);
        text.push_str(
            &serde_json::json!({"id": id, "paraphrase": 0, "sample": *sample,
                "question": format!("Question {id}?"), "answer": a, "prompt_tokens": 9,
                "completion_tokens": 4, "finish_reason": "eos"})
            .to_string(),
        );
        text.push('\n');
        *sample += 1;
    }
    write(path, &text)
}

/// The answer text in a test prompt (`... A=<answer>`).
pub fn answer_of(prompt: &str) -> &str {
    prompt.rsplit_once(" A=").map_or("", |x| x.1)
}

pub fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}
