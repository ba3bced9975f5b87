//! Bad input through the binary and the model API: each case must give a clear error that
//! names the file, tensor or position, a non-zero exit status (2 for errors), and no panic.

mod common;

use caft_fast::backend::cpu::CpuBackend;
use caft_fast::model::loader::load_model;
use caft_fast::model::transformer::{Batch, Model};
use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("caft-bad-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A copy of the tiny Llama fixture folder whose config.json is edited by `edit`.
fn tiny_copy(tag: &str, edit: impl FnOnce(&mut serde_json::Value)) -> PathBuf {
    let src = fixtures().join("tiny/llama");
    let dst = tmpdir(tag);
    std::fs::copy(src.join("model.safetensors"), dst.join("model.safetensors")).unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    edit(&mut cfg);
    std::fs::write(dst.join("config.json"), cfg.to_string()).unwrap();
    dst
}

/// Run `caft-fast bench-step` on a model path; return (exit code, stderr).
fn bench_on(model: &Path) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_caft-fast"))
        .args([
            "bench-step",
            "--device",
            "cpu",
            "--batch",
            "1",
            "--seq",
            "4",
        ])
        .args(["--steps", "1", "--warmup", "0", "--lora-r", "2"])
        .arg("--model")
        .arg(model)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!err.contains("panicked"), "the binary panicked: {err}");
    (out.status.code().unwrap_or(-1), err)
}

fn assert_fails(model: &Path, needles: &[&str]) {
    let (code, err) = bench_on(model);
    assert_eq!(code, 2, "expected exit 2, got {code}: {err}");
    for n in needles {
        assert!(err.contains(n), "error should mention {n:?}: {err}");
    }
}

#[test]
fn the_tiny_model_itself_runs() {
    // The control for the cases below: the unedited copy works, so each failure is the edit's.
    let dir = tiny_copy("ok", |_| {});
    let (code, err) = bench_on(&dir);
    assert_eq!(code, 0, "{err}");
}

#[test]
fn missing_model_path() {
    let p = std::env::temp_dir().join("caft-no-such-model-dir");
    assert_fails(&p, &["caft-no-such-model-dir"]);
}

#[test]
fn unsupported_architecture_names_the_supported_ones() {
    let dir = tiny_copy("arch", |c| {
        c["architectures"] = serde_json::json!(["GPT2LMHeadModel"])
    });
    assert_fails(
        &dir,
        &[
            "GPT2LMHeadModel",
            "LlamaForCausalLM",
            "Qwen2ForCausalLM",
            "MistralForCausalLM",
        ],
    );
}

#[test]
fn tensor_shape_disagreeing_with_config() {
    let dir = tiny_copy("shape", |c| c["intermediate_size"] = serde_json::json!(100));
    assert_fails(
        &dir,
        &[
            "model.layers.0.mlp.gate_proj.weight",
            "[96, 64]",
            "[100, 64]",
        ],
    );
}

#[test]
fn missing_tensor() {
    let dir = tiny_copy("missing", |c| c["num_hidden_layers"] = serde_json::json!(5));
    assert_fails(&dir, &["model.layers.4", "missing"]);
}

#[test]
fn truncated_safetensors() {
    let dir = tiny_copy("trunc", |_| {});
    let f = dir.join("model.safetensors");
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() / 2]).unwrap();
    assert_fails(&dir, &["model.safetensors"]);
}

#[test]
fn missing_config() {
    let dir = tiny_copy("noconfig", |_| {});
    std::fs::remove_file(dir.join("config.json")).unwrap();
    assert_fails(&dir, &["config.json"]);
}

#[test]
fn truncated_gguf() {
    let Some(gguf) = smollm2_gguf() else { return };
    let dir = tmpdir("gguf");
    let f = dir.join("cut.gguf");
    // Header, metadata and tensor infos stay (the first ~2 MB), the tensor data is cut off.
    let bytes = std::fs::read(gguf).unwrap();
    std::fs::write(&f, &bytes[..4 << 20]).unwrap();
    assert_fails(&f, &["cut.gguf"]);
}

#[test]
fn existing_output_folder_is_refused() {
    let dir = tmpdir("out");
    let out = Command::new(env!("CARGO_BIN_EXE_caft-fast"))
        .args(["train", "--device", "cpu", "--model"])
        .arg(fixtures().join("tiny/llama"))
        .arg("-o")
        .arg(&dir)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("--overwrite") && err.contains(&*dir.to_string_lossy()),
        "{err}"
    );
}

#[test]
fn token_id_beyond_vocabulary() {
    let loaded = load_model(&fixtures().join("tiny/llama")).unwrap();
    let be = CpuBackend::new();
    let mut model = Model::new(&be, loaded.config.clone(), loaded.weights.as_ref()).unwrap();
    let v = loaded.config.vocab_size as u32;
    let batch = Batch {
        batch: 1,
        seq: 3,
        ids: vec![1, v + 7, 2],
        labels: vec![1, 2, 3],
    };
    let err = model.forward(&be, &batch, false).unwrap_err().to_string();
    assert!(
        err.contains(&format!("{}", v + 7)) && err.contains("position 1"),
        "{err}"
    );
}
