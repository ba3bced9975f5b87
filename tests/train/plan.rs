//! `caft-fast plan` through the binary: the Qwen2.5-Coder-32B plan (its config.json only, no
//! weights) does not fit 80 GiB without checkpointing and fits with `auto`; `--json`; and bad
//! input (sizes, a config without the needed keys, runs that fit in no mode) is refused clearly.

use crate::support::*;
use std::path::{Path, PathBuf};

/// Qwen2.5-Coder-32B's shapes: 64 layers, d 5120, ffn 27648, 40/8 heads of 128, vocab 152064,
/// untied embeddings.
fn qwen32b(dir: &Path) -> PathBuf {
    let cfg = serde_json::json!({
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": 5120,
        "intermediate_size": 27648,
        "num_hidden_layers": 64,
        "num_attention_heads": 40,
        "num_key_value_heads": 8,
        "vocab_size": 152064,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": false,
        "bos_token_id": 151643,
        "eos_token_id": 151643
    });
    let m = dir.join("qwen32b");
    std::fs::create_dir_all(&m).unwrap();
    write(&m.join("config.json"), &cfg.to_string());
    m
}

fn plan(model: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "plan",
        "--model",
        s(model),
        "--batch-size",
        "2",
        "--max-seq-len",
        "2048",
        "--lora-r",
        "32",
        "--lora-targets",
        "q,k,v,o,gate,up,down",
        "--ablate-random",
        "8",
        "--ablate-layers",
        "16,32,48",
    ];
    args.extend_from_slice(extra);
    caft(&args)
}

#[test]
fn qwen32b_needs_checkpointing_on_80_gib() {
    let dir = TempDir::new("plan-32b");
    let m = qwen32b(&dir);
    let none = plan(&m, &["--gpu-memory", "80GiB", "--checkpointing", "none"]);
    println!("{}{}", stdout(&none), stderr(&none));
    assert_eq!(none.status.code(), Some(1), "{}", stderr(&none));
    let table = stdout(&none);
    for part in [
        "model weights (the forward's copy)",
        "trained params, grads, AdamW moments (f32)",
        "activations kept for the backward",
        "recomputation and backward scratch",
        "logits / cross-entropy chunk",
        "cuBLAS workspace and CUDA context",
        "total",
        "auto chooses: full",
    ] {
        assert!(
            table.contains(part),
            "the table should show {part:?}:\n{table}"
        );
    }
    assert!(
        table.contains("61.03"),
        "the bf16 weights are 61.03 GiB:\n{table}"
    );
    let err = stderr(&none);
    assert!(
        err.contains("GiB short") && err.contains("--checkpointing full"),
        "{err}"
    );

    let auto = plan(&m, &["--gpu-memory", "80GiB"]);
    println!("{}", stdout(&auto));
    assert_eq!(auto.status.code(), Some(0), "{}", stderr(&auto));
    assert!(
        stdout(&auto).contains("checkpointing full"),
        "{}",
        stdout(&auto)
    );

    let json = plan(&m, &["--gpu-memory", "80GiB", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&stdout(&json)).unwrap();
    assert_eq!(v["fits"], true);
    assert_eq!(v["mode"], "full");
    assert_eq!(v["rows"], 4096);
    assert_eq!(v["lora_parameters"], 268435456u64);
    let modes = &v["modes_total_bytes"];
    let gib = |m: &str| modes[m].as_u64().unwrap() as f64 / (1u64 << 30) as f64;
    assert!(gib("none") > 80.0 && gib("full") < 80.0, "{modes}");
    let parts = v["parts_bytes"].as_object().unwrap();
    let sum: u64 = parts.values().map(|b| b.as_u64().unwrap()).sum();
    assert_eq!(sum, v["total_bytes"].as_u64().unwrap());
}

#[test]
fn a_run_that_fits_in_no_mode_says_by_how_much_and_what_to_lower() {
    let dir = TempDir::new("plan-nofit");
    let m = qwen32b(&dir);
    // The weights and LoRA state fit 67 GiB, a 4096-token micro-batch does not, even with full.
    let o = plan(&m, &["--gpu-memory", "67GiB"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let err = stderr(&o);
    for n in [
        "does not fit",
        "GiB short",
        "--max-tokens-per-batch",
        "at most",
    ] {
        assert!(err.contains(n), "{n:?} missing:\n{err}");
    }
    assert!(
        stdout(&o).contains("auto chooses: nothing fits"),
        "{}",
        stdout(&o)
    );
    // Smaller than the weights: no token count helps.
    let o = plan(&m, &["--gpu-memory", "40GiB"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("Even one token"), "{}", stderr(&o));
}

#[test]
fn bad_plan_input_is_refused_before_anything_is_read() {
    let dir = TempDir::new("plan-bad");
    let m = qwen32b(&dir);
    assert_error(
        &plan(&m, &["--gpu-memory", "lots"]),
        &["--gpu-memory", "memory size"],
    );
    assert_error(&plan(&m, &["--gpu-memory", "0GiB"]), &["more than zero"]);
    assert_error(
        &plan(&m, &["--gpu-memory", "80 parsecs"]),
        &["unknown unit"],
    );
    let partial = dir.join("partial");
    std::fs::create_dir_all(&partial).unwrap();
    write(
        &partial.join("config.json"),
        r#"{"architectures": ["Qwen2ForCausalLM"], "hidden_size": 5120}"#,
    );
    assert_error(
        &plan(&partial, &["--gpu-memory", "80GiB"]),
        &["config.json"],
    );
    assert_error(
        &plan(&dir.join("nowhere"), &["--gpu-memory", "80GiB"]),
        &["no such file or folder"],
    );
    assert_error(
        &plan(&m, &["--gpu-memory", "80GiB", "--ablate-layers", "64"]),
        &["out of range"],
    );
}

/// `plan --ranks 8 --method full` plans one GPU of eight with ZeRO-1: the trained state is the
/// padded master weights and gradients, this rank's slice of weights, gradients and both
/// moments, and the pieces a checkpoint gathers in, exactly; everything else as one GPU.
#[test]
fn plan_ranks_counts_zero1_state_per_gpu() {
    let json = |ranks: &str| -> serde_json::Value {
        let o = caft([
            "plan",
            "--model",
            "gemma-2-2b",
            "--method",
            "full",
            "--batch-size",
            "16",
            "--max-seq-len",
            "512",
            "--gpu-memory",
            "80GiB",
            "--ranks",
            ranks,
            "--json",
        ]);
        serde_json::from_str(&assert_ok(&o)[..]).unwrap_or_else(|e| panic!("{e}"))
    };
    let (one, eight) = (json("1"), json("8"));
    let part = |v: &serde_json::Value, k: &str| v["parts_bytes"][k].as_u64().unwrap();
    let cfg = caft_fast::model::random::preset("gemma-2-2b").unwrap();
    let layout = caft_fast::model::full::FullLayout::new(&cfg, Default::default());
    let f4 = 4u64;
    let unsharded: u64 = layout.group_len.iter().map(|&p| 4 * p as u64 * f4).sum();
    let mut sharded = 0u64;
    let mut longest = 0usize;
    for &p in &layout.group_len {
        let n = p.div_ceil(8);
        sharded += (2 * 8 * n + 4 * n) as u64 * f4;
        longest = longest.max(n);
    }
    sharded += (caft_fast::model::transformer::gather_piece(longest) * 9) as u64 * f4;
    assert_eq!(part(&one, "lora"), unsharded);
    assert_eq!(part(&eight, "lora"), sharded);
    assert!(sharded < unsharded * 2 / 3, "{sharded} vs {unsharded}");
    for k in ["weights", "activations", "logits"] {
        assert_eq!(part(&one, k), part(&eight, k), "{k}");
    }
}
