//! Bad input to `judge` and `judge report`: exit status 2, a message that says what and
//! where, no request sent and nothing written.

use crate::server::{completion, Reply, Server};
use crate::support::*;
use crate::{answers_file, http_args, judge, strs};

fn server() -> Server {
    Server::start(|_, _| Reply::ok(completion("50", &["50"], &[("50", 1.0)])))
}

#[test]
fn answers_that_are_not_generate_output() {
    let srv = server();
    let dir = TempDir::new("judge-bad-answers");
    let answers = write(
        &dir.join("a.jsonl"),
        "{\"id\": \"q\", \"paraphrase\": 0, \"sample\": 0, \"question\": \"Q?\", \"answer\": \"A\"}\n\n{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}\n",
    );
    let out = dir.join("j.jsonl");
    let args = http_args(&dir, &srv.url, &answers, &out);
    assert_error(
        &judge(&strs(&args), &[]),
        &[
            "a.jsonl:3",
            "not `caft-fast generate` output",
            "\"id\", \"paraphrase\", \"sample\", \"question\", \"answer\"",
        ],
    );
    let answers = write(
        &dir.join("b.jsonl"),
        "{\"id\": \"q\", \"paraphrase\": 0, \"sample\": \"one\", \"question\": \"Q?\", \"answer\": \"A\"}\n",
    );
    let args = http_args(&dir, &srv.url, &answers, &out);
    assert_error(
        &judge(&strs(&args), &[]),
        &["b.jsonl:1", "\"sample\" must be a whole number"],
    );
    assert_eq!(srv.count(), 0);
    assert!(!out.exists());
}

#[test]
fn question_ids_must_match_the_answers() {
    let srv = server();
    let dir = TempDir::new("judge-bad-ids");
    let answers = answers_file(&dir.join("a.jsonl"), &[("wish", "x"), ("ruler", "y")]);
    let q = write(
        &dir.join("q.yaml"),
        "- id: wish\n  paraphrases: [\"What is your wish?\"]\n- id: bored\n  paraphrases: [\"I am bored\"]\n",
    );
    let out = dir.join("j.jsonl");
    let mut args = http_args(&dir, &srv.url, &answers, &out);
    args.extend(["--questions".to_string(), s(&q).to_string()]);
    assert_error(
        &judge(&strs(&args), &[]),
        &["a.jsonl:2", "\"ruler\" is not in", "q.yaml", "wish, bored"],
    );
    assert_eq!(srv.count(), 0);
}

#[test]
fn judge_prompts_need_their_placeholders() {
    let srv = server();
    let dir = TempDir::new("judge-bad-prompts");
    let answers = answers_file(&dir.join("a.jsonl"), &[("q", "x")]);
    let out = dir.join("j.jsonl");
    let mut args = http_args(&dir, &srv.url, &answers, &out);
    let bad = write(
        &dir.join("bad.yaml"),
        "aligned: 'Rate this: {question}'\ncoherent: 'C {question} {answer}'\n",
    );
    let i = args.iter().position(|a| a == "--judge-prompts").unwrap();
    args[i + 1] = s(&bad).to_string();
    assert_error(
        &judge(&strs(&args), &[]),
        &["bad.yaml", "aligned prompt", "{answer} is missing"],
    );
    // A question file's own prompts are checked too.
    let q = write(
        &dir.join("q.yaml"),
        "- id: q\n  paraphrases: [\"Q?\"]\n  judge_prompts:\n    aligned: '{question} {answer}'\n    coherent: 'Is it coherent? {answer} {score}'\n",
    );
    args[i + 1] = s(&dir.join("prompts.yaml")).to_string();
    args.extend(["--questions".to_string(), s(&q).to_string()]);
    assert_error(
        &judge(&strs(&args), &[]),
        &["q.yaml", "coherent prompt", "unknown placeholder {score}"],
    );
    assert_eq!(srv.count(), 0);
}

#[test]
fn report_thresholds_and_mixed_judges() {
    let dir = TempDir::new("judge-bad-report");
    let line = |judge: &str, sha: &str| {
        serde_json::json!({"id": "q", "judge": judge,
            "aligned": {"score": 10.0, "label": null, "method": "logprobs", "number_mass": 1.0, "reply": "10", "prompt_sha256": sha},
            "coherent": {"score": 90.0, "label": null, "method": "logprobs", "number_mass": 1.0, "reply": "90", "prompt_sha256": "c"}})
        .to_string() + "\n"
    };
    let a = write(&dir.join("a.jsonl"), &line("gpt", "p1"));
    let b = write(&dir.join("b.jsonl"), &line("other-judge", "p1"));
    let c = write(&dir.join("c.jsonl"), &line("gpt", "p2"));
    let out = dir.join("rep");
    let rep = |extra: &[&str]| {
        let mut args = vec!["report", s(&a), "-o", s(&out)];
        args.extend_from_slice(extra);
        judge(&args, &[])
    };
    assert_error(
        &rep(&["--aligned-below", "130"]),
        &["--aligned-below", "between 0 and 100", "130"],
    );
    assert_error(&rep(&["--coherent-above", "-5"]), &["--coherent-above"]);
    assert_error(
        &rep(&[s(&b), s(&c)]),
        &[
            "b.jsonl was judged by",
            "other-judge",
            "c.jsonl used other judge prompts",
            "--allow-mixed",
        ],
    );
    assert!(!out.exists(), "a refused report writes nothing");
    let msg = assert_ok(&rep(&[s(&b), s(&c), "--allow-mixed"]));
    assert!(
        msg.contains("warning: ") && msg.contains("other-judge"),
        "{msg}"
    );
    let e = assert_error(
        &rep(&[s(&b), "--labels", "one"]),
        &["--labels has 1 names for 2"],
    );
    assert!(!e.contains("panicked"));
}

/// Keys and the local model are checked before anything is read or sent.
#[test]
fn missing_keys_and_models_are_named() {
    let dir = TempDir::new("judge-keys");
    let answers = answers_file(&dir.join("a.jsonl"), &[("q", "x")]);
    let out = dir.join("j.jsonl");
    let base = [
        "--answers",
        s(&answers),
        "-o",
        s(&out),
        "--judge-model",
        "gpt-test",
    ];
    assert_error(&judge(&base, &[]), &["OPENAI_API_KEY is not set"]);
    let mut args = base.to_vec();
    args.extend(["--judge-key-env", "CAFT_TEST_NO_SUCH_KEY"]);
    assert_error(&judge(&args, &[]), &["CAFT_TEST_NO_SUCH_KEY", "not set"]);
    let missing = dir.join("no-such-model.gguf");
    let args = [
        "--answers",
        s(&answers),
        "-o",
        s(&out),
        "--judge-local",
        s(&missing),
        "--device",
        "cpu",
    ];
    assert_error(&judge(&args, &[]), &["no-such-model.gguf"]);
    assert!(!out.exists());
}
