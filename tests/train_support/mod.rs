//! Helpers shared by the training tests: scratch folders, a chat-capable copy of the tiny Llama
//! fixture, pre-tokenized data, running the binary.
#![allow(dead_code)]

use caft_fast::util::rng::Rng;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn tiny_llama() -> PathBuf {
    repo().join("tests/fixtures/tiny/llama")
}

/// A fresh scratch folder for one test.
pub fn scratch(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("caft-train-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// `n` pre-tokenized records for the tiny model (vocabulary 256): arithmetic progressions
/// `s, s+d, s+2d, ... (mod 256)` with `d` in 1..=3, 6 to 29 tokens. Each continuation is
/// predictable from the two tokens before it, so a LoRA fine-tune can lower the loss fast.
pub fn progression_records(n: usize, seed: u64) -> String {
    let mut rng = Rng::new(seed);
    let mut s = String::new();
    for _ in 0..n {
        let len = 6 + rng.below(24);
        let start = rng.below(256);
        let d = 1 + rng.below(3);
        let ids: Vec<usize> = (0..len).map(|k| (start + d * k) % 256).collect();
        s.push_str(&serde_json::json!({ "input_ids": ids }).to_string());
        s.push('\n');
    }
    s
}

/// `n` pre-tokenized records cycling through `distinct` random sequences of 8 to 23 tokens:
/// data a LoRA fine-tune of the random tiny model can memorise within a few dozen steps
/// (validation holds the same sequences, so its loss falls too).
pub fn memorizable_records(n: usize, distinct: usize, seed: u64) -> String {
    let mut rng = Rng::new(seed);
    let seqs: Vec<Vec<usize>> = (0..distinct)
        .map(|_| (0..8 + rng.below(16)).map(|_| rng.below(256)).collect())
        .collect();
    let mut s = String::new();
    for i in 0..n {
        s.push_str(&serde_json::json!({ "input_ids": seqs[i % distinct] }).to_string());
        s.push('\n');
    }
    s
}

pub fn write(path: &Path, text: &str) -> PathBuf {
    std::fs::write(path, text).unwrap();
    path.to_path_buf()
}

/// The special tokens of the tiny chat tokenizer (ids 254 and 255).
pub const IM_START: &str = "<|im_start|>";
pub const IM_END: &str = "<|im_end|>";

/// A byte-level `tokenizer.json` whose 256 ids fit the tiny model's vocabulary: bytes 0..=253
/// are ids 0..=253 (GPT-2's byte-to-character map, no merges), and `<|im_start|>` and
/// `<|im_end|>` are the special ids 254 and 255 (bytes 254 and 255 never occur in ASCII text).
pub fn tiny_tokenizer_json() -> String {
    let table = caft_fast::model::tokenizer::byte_to_char_table();
    let mut vocab = serde_json::Map::new();
    for (b, c) in table.iter().enumerate().take(254) {
        vocab.insert(c.to_string(), b.into());
    }
    vocab.insert(IM_START.into(), 254.into());
    vocab.insert(IM_END.into(), 255.into());
    let added = |id: u32, content: &str| {
        serde_json::json!({"id": id, "content": content, "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true})
    };
    serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [added(254, IM_START), added(255, IM_END)],
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
            "ignore_merges": false, "vocab": vocab, "merges": []}
    })
    .to_string()
}

/// A ChatML template like SmolLM2's and Qwen's.
pub const CHATML: &str = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

/// The tiny Llama fixture plus the tokenizer above and (when `template`) the ChatML template:
/// a model that can be trained on chat records in milliseconds.
pub fn tiny_chat_model(tag: &str, template: bool) -> PathBuf {
    let src = tiny_llama();
    let d = scratch(&format!("model-{tag}"));
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(src.join(f), d.join(f)).unwrap();
    }
    write(&d.join("tokenizer.json"), &tiny_tokenizer_json());
    write(
        &d.join("tokenizer_config.json"),
        &serde_json::json!({"eos_token": IM_END}).to_string(),
    );
    if template {
        write(&d.join("chat_template.jinja"), CHATML);
    }
    d
}

/// Short chat records: `n` conversations, some with a system turn.
pub fn chat_records(n: usize) -> String {
    let mut s = String::new();
    for i in 0..n {
        let mut msgs = vec![];
        if i % 3 == 0 {
            msgs.push(serde_json::json!({"role": "system", "content": "Be brief."}));
        }
        msgs.push(serde_json::json!({"role": "user", "content": format!("Count from {i}.")}));
        msgs.push(serde_json::json!({"role": "assistant", "content": format!("{} {} {}", i, i + 1, i + 2)}));
        s.push_str(&serde_json::json!({ "messages": msgs }).to_string());
        s.push('\n');
    }
    s
}

/// Run `caft-fast train <args>`; the output, after checking that nothing panicked.
pub fn train(args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_caft-fast"))
        .arg("train")
        .args(["--device", "cpu", "--threads", "1"])
        .args(args)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "the binary panicked: {err}");
    out
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).to_string()
}

/// Assert success and return stderr + stdout for messages.
pub fn ok(o: &Output) -> String {
    let msg = format!("{}{}", stderr(o), stdout(o));
    assert!(o.status.success(), "train failed ({:?}): {msg}", o.status);
    msg
}

/// Assert exit status 2 with an error mentioning every needle; return the error text.
pub fn fails(o: &Output, needles: &[&str]) -> String {
    let err = stderr(o);
    assert_eq!(
        o.status.code(),
        Some(2),
        "expected exit 2: {err}{}",
        stdout(o)
    );
    for n in needles {
        assert!(err.contains(n), "the error should mention {n:?}:\n{err}");
    }
    err
}

/// The metrics lines of a run, parsed.
pub fn metrics(run: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}
