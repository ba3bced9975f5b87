//! `caft-fast train --method full` end to end on the tiny fixture models: the output is a
//! Hugging Face model folder whose tensors are the trained f32 master weights (Gemma's norm
//! gains as `w`, not `1 + w`) that caft-fast loads back with the same logits; `--resume` repeats
//! an uninterrupted run bit for bit; `--save-dtype` rounds the saved tensors; a checkpoint of the
//! other method is refused; a disk without room is refused before training.

use crate::support::*;
use caft_fast::backend::cpu::CpuBackend;
use caft_fast::model::loader::load_model;
use caft_fast::model::transformer::{Batch, Model};
use std::path::Path;
use std::process::{Command, Stdio};

/// Flags of a small full fine-tuning run on a tiny fixture model.
fn full_args<'a>(model: &'a Path, data: &'a Path, out: &'a Path) -> Vec<&'a str> {
    vec![
        "--model",
        s(model),
        "--data",
        s(data),
        "-o",
        s(out),
        "--method",
        "full",
        "--batch-size",
        "3",
        "--grad-accum",
        "2",
        "--warmup-steps",
        "1",
        "--lr",
        "1e-3",
        "--adam-beta2",
        "0.95",
    ]
}

fn with<'a>(mut base: Vec<&'a str>, extra: &[&'a str]) -> Vec<&'a str> {
    base.extend_from_slice(extra);
    base
}

fn tensors(p: &Path) -> std::collections::BTreeMap<String, Fx> {
    read_safetensors(p)
}

/// config.json's dtype (`dtype` in transformers 5, `torch_dtype` before).
fn dtype_of(cfg: &serde_json::Value) -> &str {
    cfg.get("dtype")
        .or(cfg.get("torch_dtype"))
        .and_then(|v| v.as_str())
        .unwrap_or("none")
}

/// Two rows of 12 token ids.
fn logits_ids() -> Vec<u32> {
    (0..24).map(|i| (i * 7 + 3) % 200).collect()
}

/// The logits of a fixed batch from a model folder, on the CPU.
fn logits(dir: &Path) -> Vec<f32> {
    let be = CpuBackend::new();
    let loaded = load_model(dir).unwrap();
    let mut m = Model::new(&be, loaded.config.clone(), loaded.weights.as_ref()).unwrap();
    let ids = logits_ids();
    let b = Batch::padded(2, 12, ids.clone(), ids.iter().map(|&i| i as i32).collect());
    m.forward(&be, &b, true).unwrap().logits.unwrap()
}

/// The model folder holds every tensor of the source, the trained ones equal to the final
/// checkpoint's f32 master weights (bitwise, saved as f32), the frozen ones as they were; it
/// loads back with logits that differ from the base model's; Gemma's gains are saved as `w`.
#[test]
fn full_run_writes_a_model_folder_that_loads_back() {
    for name in ["llama", "gemma2"] {
        let dir = TempDir::new(&format!("full-{name}"));
        let data = write(&dir.join("d.jsonl"), &progression_records(24, 5));
        let out = dir.join("run");
        let model = tiny_fixture(name);
        let msg = assert_ok(&train(&with(
            full_args(&model, &data, &out),
            &[
                "--max-steps",
                "4",
                "--save-dtype",
                "f32",
                "--freeze",
                "embeddings",
            ],
        )));
        assert!(msg.contains("full fine-tuning of"), "{msg}");
        let m = out.join("model");
        let cfg: serde_json::Value =
            serde_json::from_slice(&std::fs::read(m.join("config.json")).unwrap()).unwrap();
        assert_eq!(dtype_of(&cfg), "float32");
        let saved = tensors(&m.join("model.safetensors"));
        let base = tensors(&model.join("model.safetensors"));
        let ck = tensors(&out.join("checkpoints/step-00000004/model.safetensors"));
        assert_eq!(
            saved.keys().collect::<Vec<_>>(),
            base.keys().collect::<Vec<_>>()
        );
        assert!(!ck.contains_key("model.embed_tokens.weight"), "frozen");
        assert_eq!(
            saved["model.embed_tokens.weight"].data,
            base["model.embed_tokens.weight"].data
        );
        for (k, v) in &ck {
            assert_eq!(saved[k].data, v.data, "{name} {k}: saved vs checkpoint");
            assert_ne!(saved[k].data, base[k].data, "{name} {k}: trained");
        }
        // Norm gains moved by a few lr from where they started: `w` (Gemma stores w ~ 0 for a
        // gain of 1 + w; saving 1 + w would move them by 1).
        let g = "model.layers.0.input_layernorm.weight";
        let moved = saved[g]
            .data
            .iter()
            .zip(&base[g].data)
            .map(|(a, b)| (a - b).abs())
            .fold(0f64, f64::max);
        assert!(moved < 0.05, "{name} {g} moved by {moved}");
        let (a, b) = (logits(&m), logits(&model));
        // For scripts/check_full_export.py: the folder and caft-fast's logits on it.
        if let Some(keep) = std::env::var_os("CAFT_KEEP_FULL_EXPORT") {
            let keep = Path::new(&keep).join(name);
            std::fs::create_dir_all(&keep).unwrap();
            for e in std::fs::read_dir(&m).unwrap() {
                let p = e.unwrap().path();
                std::fs::copy(&p, keep.join(p.file_name().unwrap())).unwrap();
            }
            let ids: Vec<Vec<u32>> = logits_ids().chunks(12).map(|c| c.to_vec()).collect();
            let j = serde_json::json!({"ids": ids, "logits": a});
            std::fs::write(keep.join("caft_logits.json"), j.to_string()).unwrap();
        }
        let diff = rel_err(&a, &b.iter().map(|&x| x as f64).collect::<Vec<_>>());
        assert!(
            diff > 1e-4,
            "{name}: the trained model's logits equal the base's"
        );
    }
}

/// A run stopped after 3 steps and resumed gives the same model and optimizer state as an
/// uninterrupted run of 6 (bitwise); `--save-dtype bf16` saves BF16 tensors and says so in
/// config.json.
#[test]
fn full_resume_is_bit_identical_and_save_dtype_rounds() {
    let dir = TempDir::new("full-resume");
    let data = write(&dir.join("d.jsonl"), &progression_records(30, 2));
    let model = tiny_llama();
    let (a, b) = (dir.join("a"), dir.join("b"));
    let extra = [
        "--max-steps",
        "6",
        "--save-every",
        "3",
        "--save-dtype",
        "bf16",
    ];
    assert_ok(&train(&with(full_args(&model, &data, &a), &extra)));
    assert_ok(&train(&with(
        full_args(&model, &data, &b),
        &[&extra[..], &["--stop-after", "3"]].concat(),
    )));
    assert!(!b.join("model").exists(), "no model folder before the end");
    let msg = assert_ok(&train(&["--resume", s(&b)]));
    assert!(msg.contains("resuming at step 3"), "{msg}");
    for f in [
        "model/model.safetensors",
        "checkpoints/step-00000006/model.safetensors",
        "checkpoints/step-00000006/optimizer.safetensors",
    ] {
        assert_eq!(
            std::fs::read(a.join(f)).unwrap(),
            std::fs::read(b.join(f)).unwrap(),
            "{f}"
        );
    }
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(a.join("model/config.json")).unwrap()).unwrap();
    assert_eq!(dtype_of(&cfg), "bfloat16");
    let bytes = std::fs::read(a.join("model/model.safetensors")).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    assert_eq!(header["model.norm.weight"]["dtype"], "BF16");
}

/// A LoRA checkpoint is not resumed as a full run, nor the reverse; nothing is changed.
#[test]
fn resume_across_methods_is_refused() {
    let dir = TempDir::new("full-cross");
    let data = write(&dir.join("d.jsonl"), &progression_records(20, 4));
    let model = tiny_llama();
    let lora = dir.join("lora");
    assert_ok(&train(&[
        "--model",
        s(&model),
        "--data",
        s(&data),
        "-o",
        s(&lora),
        "--max-steps",
        "2",
    ]));
    let o = train(&[
        "--resume",
        s(&lora),
        "--method",
        "full",
        "--save-dtype",
        "f32",
    ]);
    assert_error(&o, &["method"]);
    let full = dir.join("full");
    assert_ok(&train(&with(
        full_args(&model, &data, &full),
        &["--max-steps", "2", "--save-dtype", "f32"],
    )));
    assert_error(
        &train(&["--resume", s(&full), "--method", "lora"]),
        &["method"],
    );
}

/// An output file system without room for the model folder and two checkpoints is refused
/// before training (a 256 KiB tmpfs; the tiny model's folder alone is ~600 KB). Needs root to
/// mount, as the checkpoint disk-full test.
#[test]
fn full_run_without_disk_room_is_refused_before_training() {
    let dir = TempDir::new("full-room");
    let data = write(&dir.join("d.jsonl"), &progression_records(20, 4));
    let mnt = dir.join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=262144", "tmpfs", s(&mnt)])
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !mounted {
        eprintln!("skipping: cannot mount a tmpfs here (needs root)");
        return;
    }
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _guard = Unmount(mnt.clone());
    let out = mnt.join("run");
    let o = train(&with(
        full_args(&tiny_llama(), &data, &out),
        &["--max-steps", "2", "--save-dtype", "f32"],
    ));
    assert_error(&o, &["GiB free", "full fine-tuning run", "--output"]);
    assert!(!out.exists(), "nothing written");
}
