//! Bad input through the binary and the model API: each case must give a clear error that
//! names the file, tensor or position, a non-zero exit status (2 for errors), and no panic.

use crate::support::*;
use caft_fast::backend::cpu::CpuBackend;
use caft_fast::model::loader::load_model;
use caft_fast::model::transformer::{Batch, Model};
use std::ffi::OsStr;
use std::path::Path;
use std::process::Output;

/// `caft-fast bench-step`: one CPU step of batch 1 x `seq` tokens with LoRA r 2 on `source`
/// (`--model PATH` or `--shape S`), with `env` set (checking that it did not panic).
pub(crate) fn bench_step(seq: usize, source: [&OsStr; 2], env: &[(&str, &Path)]) -> Output {
    let seq = seq.to_string();
    let args = [
        "bench-step",
        "--device",
        "cpu",
        "--batch",
        "1",
        "--seq",
        &seq,
        "--steps",
        "1",
        "--warmup",
        "0",
        "--lora-r",
        "2",
    ];
    let mut cmd = std::process::Command::new(exe());
    cmd.args(args).args(source);
    for (k, v) in env {
        cmd.env(k, v);
    }
    no_panic(cmd.output().expect("running caft-fast"))
}

/// Run `caft-fast bench-step` on a model path.
fn bench_on(model: &Path) -> Output {
    bench_step(4, [OsStr::new("--model"), model.as_os_str()], &[])
}

/// `bench-step` on `model` ends in an error (exit 2) that mentions every one of `needles`.
fn assert_fails(model: &Path, needles: &[&str]) {
    assert_error(&bench_on(model), needles);
}

#[test]
fn the_tiny_model_itself_runs() {
    // The control for the cases below: the unedited copy works, so each failure is the edit's.
    let dir = tiny_llama_copy("ok", |_| {});
    assert_ok(&bench_on(&dir));
}

#[test]
fn missing_model_path() {
    let p = std::env::temp_dir().join("caft-no-such-model-dir");
    assert_fails(&p, &["caft-no-such-model-dir"]);
}

#[test]
fn unsupported_architecture_names_the_supported_ones() {
    let dir = tiny_llama_copy("arch", |c| {
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
    let dir = tiny_llama_copy("shape", |c| c["intermediate_size"] = serde_json::json!(100));
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
    let dir = tiny_llama_copy("missing", |c| c["num_hidden_layers"] = serde_json::json!(5));
    assert_fails(&dir, &["model.layers.4", "missing"]);
}

#[test]
fn truncated_safetensors() {
    let dir = tiny_llama_copy("trunc", |_| {});
    let f = dir.join("model.safetensors");
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() / 2]).unwrap();
    assert_fails(&dir, &["model.safetensors"]);
}

#[test]
fn missing_config() {
    let dir = tiny_llama_copy("noconfig", |_| {});
    std::fs::remove_file(dir.join("config.json")).unwrap();
    assert_fails(&dir, &["config.json"]);
}

#[test]
fn truncated_gguf() {
    let Some(gguf) = smollm2_gguf() else { return };
    let dir = TempDir::new("gguf");
    let f = dir.join("cut.gguf");
    // Header, metadata and tensor infos stay (the first ~2 MB), the tensor data is cut off.
    let bytes = std::fs::read(gguf).unwrap();
    std::fs::write(&f, &bytes[..4 << 20]).unwrap();
    assert_fails(&f, &["cut.gguf"]);
}

#[test]
fn existing_output_folder_is_refused() {
    let dir = TempDir::new("out");
    let out = caft([
        OsStr::new("train"),
        OsStr::new("--device"),
        OsStr::new("cpu"),
        OsStr::new("--model"),
        tiny_llama().as_os_str(),
        OsStr::new("-o"),
        dir.as_os_str(),
    ]);
    assert_error(&out, &["--overwrite", &dir.to_string_lossy()]);
}

#[test]
fn token_id_beyond_vocabulary() {
    let loaded = load_model(&tiny_llama()).unwrap();
    let be = CpuBackend::new();
    let mut model = Model::new(&be, loaded.config.clone(), loaded.weights.as_ref()).unwrap();
    let v = loaded.config.vocab_size as u32;
    let batch = Batch::padded(1, 3, vec![1, v + 7, 2], vec![1, 2, 3]);
    let err = model.forward(&be, &batch, false).unwrap_err().to_string();
    assert!(
        err.contains(&format!("{}", v + 7)) && err.contains("position 1"),
        "{err}"
    );
}

/// `bench-step --shape` takes any config.json (a model's shape without its weights): the tiny
/// Qwen2's config runs with random weights and is reported as such; a shape that is neither a
/// file nor a preset names both choices.
#[test]
fn bench_step_shape_from_a_config_json() {
    let config = tiny_fixture("qwen2").join("config.json");
    let run = |shape: &str| bench_step(8, [OsStr::new("--shape"), OsStr::new(shape)], &[]);
    let out = assert_ok(&run(s(&config)));
    assert!(out.contains(&format!("random:{}", s(&config))), "{out}");
    assert!(out.contains("\"tokens\":8"), "{out}");
    assert_error(
        &run("no-such-shape"),
        &["no-such-shape", "config.json", "llama-3.2-1b"],
    );
}

/// `bench-step --method full` trains every weight of the tiny Llama (its 156,224 values: two
/// untied 256 x 64 tables, four layers, the final norm) for one warm-up and one timed step,
/// counts 6 x matrix parameters x tokens plus attention, and refuses the LoRA flags.
#[test]
fn bench_step_full_fine_tuning() {
    let model = tiny_fixture("llama");
    let run = |extra: &[&str]| {
        let mut cmd = std::process::Command::new(exe());
        cmd.args([
            "bench-step",
            "--device",
            "cpu",
            "--model",
            s(&model),
            "--method",
            "full",
            "--batch",
            "1",
            "--seq",
            "8",
            "--ablate-layers",
            "0,2",
            "--ablate-k",
            "2",
            "--warmup",
            "1",
            "--steps",
            "1",
        ])
        .args(extra);
        no_panic(cmd.output().expect("running caft-fast"))
    };
    let out = run(&[]);
    assert_ok(&out);
    let j: serde_json::Value = serde_json::from_str(stdout(&out).trim()).expect("one JSON line");
    assert_eq!(j["method"], "full", "{j}");
    assert_eq!(j["trained_params"], 156_224, "{j}");
    assert!(j["lora_r"].is_null(), "{j}");
    let losses: Vec<f64> = j["losses"]
        .as_array()
        .expect("losses")
        .iter()
        .map(|l| l.as_f64().unwrap())
        .collect();
    assert_eq!(losses.len(), 2, "{j}");
    assert!(losses.iter().all(|l| l.is_finite()), "{j}");
    // The same batch twice: the second step's forward read the updated weights.
    assert_ne!(losses[0], losses[1], "{j}");
    // Matrix parameters: 4 x (64 x 16 x (2·4 + 2·2) + 3 x 64 x 96) + 256 x 64 = 139,264; 6 of
    // them per token over 8 tokens, plus causal attention: forward 2 x 8² x 16 per head and
    // layer (QKᵀ and PV, halved by the mask), 3.5 times that for the whole step.
    let flops = j["model_tflop_per_step"].as_f64().unwrap() * 1e12;
    let want = 6.0 * 139_264.0 * 8.0 + 3.5 * (4 * 4 * 2 * 8 * 8 * 16) as f64;
    assert!((flops - want).abs() < 1e-3, "{flops} vs {want}");

    assert_error(
        &run(&["--lora-r", "2", "--lora-alpha", "4"]),
        &["--lora-r", "--lora-alpha", "LoRA-only", "--method full"],
    );
}
