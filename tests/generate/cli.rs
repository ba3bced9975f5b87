//! `caft-fast generate` through the binary, on the tiny Llama fixture with a byte-level chat
//! tokenizer and ChatML template (tests/support): the output lines, seeded reproducibility,
//! an adapter changing the answers, and bad input that must leave earlier output intact.

use crate::support::*;
use std::path::Path;
use std::process::Output;

/// `caft-fast generate --device cpu --threads 1 --model <model> <args>`.
fn generate(model: &Path, args: &[&str]) -> Output {
    let head = [
        "generate",
        "--device",
        "cpu",
        "--threads",
        "1",
        "--model",
        s(model),
    ];
    caft(head.iter().chain(args))
}

#[test]
fn answers_are_written_and_reproducible() {
    let model = tiny_chat_model("gen-cli", true);
    let dir = TempDir::new("gen-cli");
    let q = write(
        &dir.join("q.jsonl"),
        "{\"id\": \"count\", \"question\": \"Count from 3.\"}\n{\"id\": \"p\", \"paraphrases\": [\"Hi\", \"Hello there\"]}\n",
    );
    let run = |out: &str, seed: &str, extra: &[&str]| {
        let o = dir.join(out);
        let mut args = vec![
            "--questions",
            s(&q),
            "--samples",
            "3",
            "--max-tokens",
            "6",
            "--temperature",
            "1.5",
            "--seed",
            seed,
            "-o",
        ];
        args.push(s(&o));
        args.extend_from_slice(extra);
        let msg = assert_ok(&generate(&model, &args));
        assert!(msg.contains("tokens/s"), "{msg}");
        jsonl(&o)
    };
    let a = run("a.jsonl", "7", &["--batch-size", "4"]);
    assert_eq!(a.len(), 9, "3 prompts x 3 samples");
    let keys: Vec<(String, u64, u64)> = a
        .iter()
        .map(|l| {
            (
                l["id"].as_str().unwrap().to_string(),
                l["paraphrase"].as_u64().unwrap(),
                l["sample"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(keys[0], ("count".into(), 0, 0));
    assert_eq!(keys[8], ("p".into(), 1, 2));
    for l in &a {
        let n = l["completion_tokens"].as_u64().unwrap();
        assert!((1..=6).contains(&n), "{l}");
        let fin = l["finish_reason"].as_str().unwrap();
        assert!(fin == "eos" || (fin == "length" && n == 6), "{l}");
        assert!(l["prompt_tokens"].as_u64().unwrap() > 5);
    }
    assert_eq!(a[3]["question"], "Hi");
    // The same seed gives the same answers whatever the batch size; another seed differs.
    assert_eq!(run("b.jsonl", "7", &["--batch-size", "2"]), a);
    assert_ne!(run("c.jsonl", "8", &["--batch-size", "4"]), a);
    // An adapter trained on the chat records changes what the model says.
    let data = write(&dir.join("chat.jsonl"), &chat_records(12));
    let tr = dir.join("train");
    assert_ok(&train(&[
        "--model",
        s(&model),
        "--data",
        s(&data),
        "-o",
        s(&tr),
        "--epochs",
        "2",
        "--lr",
        "1e-2",
        "--batch-size",
        "4",
        "--grad-accum",
        "1",
        "--val-split",
        "0",
    ]));
    let adapted = run("d.jsonl", "7", &["--adapter", s(&tr.join("adapter"))]);
    assert_ne!(adapted, a);
}

#[test]
fn bad_input_leaves_earlier_output_alone() {
    let model = tiny_chat_model("gen-bad", true);
    let dir = TempDir::new("gen-bad");
    let out = dir.join("out.jsonl");
    std::fs::write(&out, "earlier\n").unwrap();
    let q = write(&dir.join("q.jsonl"), "{\"question\": \"Hi\"}\n");
    assert_error(
        &generate(&model, &["--questions", s(&q), "-o", s(&out)]),
        &["out.jsonl", "--overwrite"],
    );
    let bad = write(
        &dir.join("bad.jsonl"),
        "{\"question\": \"Hi\"}\n{\"question\": 5}\n",
    );
    assert_error(
        &generate(
            &model,
            &["--questions", s(&bad), "-o", s(&out), "--overwrite"],
        ),
        &["bad.jsonl:2", "string"],
    );
    assert_error(
        &generate(
            &model,
            &[
                "--questions",
                s(&q),
                "--top-p",
                "0",
                "-o",
                s(&out),
                "--overwrite",
            ],
        ),
        &["--top-p"],
    );
    let no_template = tiny_chat_model("gen-bad-nt", false);
    assert_error(
        &generate(
            &no_template,
            &["--questions", s(&q), "-o", s(&out), "--overwrite"],
        ),
        &["chat template"],
    );
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "earlier\n");
}
