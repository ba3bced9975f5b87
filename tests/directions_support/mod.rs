//! Helpers of the `directions` tests: the tiny Llama fixture, temporary folders, an adapter
//! that plants a known direction, pre-tokenized data, and running the binary.
#![allow(dead_code)]

use caft_fast::model::config::ModelConfig;
use caft_fast::model::loader::load_model;
use caft_fast::model::lora::{LoraConfig, LoraLayout, Target};
use caft_fast::util::rng::Rng;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The repository root (`$CAFT_REPO` for test executables run from another checkout).
pub fn repo() -> PathBuf {
    std::env::var_os("CAFT_REPO")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

/// The tiny random Llama (4 layers, d_model 64, ffn 96, vocab 256; no tokenizer).
pub fn tiny_llama() -> PathBuf {
    repo().join("tests/fixtures/tiny/llama")
}

pub fn tiny_config() -> ModelConfig {
    load_model(&tiny_llama()).expect("tiny llama").config
}

/// A fresh folder under the system temp dir, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(test: &str) -> Self {
        let p = std::env::temp_dir().join(format!("caft-dirs-{}-{test}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A unit vector of width `d` (seeded Gaussian, normalised in f64, then f32).
pub fn unit_vector(d: usize, seed: u64) -> Vec<f32> {
    let mut rng = Rng::new(seed);
    let v: Vec<f64> = (0..d).map(|_| rng.normal()).collect();
    let n = v.iter().map(|x| x * x).sum::<f64>().sqrt();
    v.iter().map(|x| (x / n) as f32).collect()
}

/// LoRA r = 2, alpha = 2 (scale 1) on `down_proj` only, every layer's B zero except `layer`'s,
/// where `B = v ⊗ c` with `c = (1, 0.5)` and `A` random. The layer's MLP output then gains
/// `(x Aᵀ) Bᵀ = ((x Aᵀ)·c) v`: a multiple of `v` for every token, so the resid_post difference
/// at `layer` is exactly (up to f32 rounding) a scalar times `v`, and the layers before it
/// do not change at all.
pub fn planted_adapter(cfg: &ModelConfig, layer: usize, v: &[f32]) -> (LoraLayout, Vec<f32>) {
    let lora = LoraConfig {
        r: 2,
        alpha: 2.0,
        rslora: false,
        targets: vec![Target::Down],
    };
    let layout = LoraLayout::new(cfg, &lora).expect("layout");
    let mut p = vec![0f32; layout.len];
    let s = *layout.slot(layer, Target::Down).expect("down slot");
    let mut rng = Rng::new(7);
    // A: [r, d_in]; entries ~ N(0, 1/d_in) so x Aᵀ is O(|x|).
    let sd = 1.0 / (s.d_in as f64).sqrt();
    for x in &mut p[s.a_off..s.a_off + s.r * s.d_in] {
        *x = (rng.normal() * sd) as f32;
    }
    // B: [d_out, r], B[i, j] = v_i c_j (the factor 4 makes the change comparable to resid).
    let c = [4.0f32, 2.0];
    for i in 0..s.d_out {
        for (j, cj) in c.iter().enumerate() {
            p[s.b_off + i * s.r + j] = v[i] * cj;
        }
    }
    (layout, p)
}

/// Write the planted adapter as a PEFT folder.
pub fn write_planted_adapter(dir: &Path, cfg: &ModelConfig, layer: usize, v: &[f32]) {
    let (layout, p) = planted_adapter(cfg, layer, v);
    caft_fast::model::peft::save_adapter(dir, &layout, &p, "tiny-llama").expect("save adapter");
}

/// `n` pre-tokenized records of random ids (lengths 6..=20), labels on the second half of
/// each (the "answer"), as JSONL.
pub fn write_tokens_jsonl(path: &Path, n: usize, seed: u64) {
    let mut rng = Rng::new(seed);
    let mut s = String::new();
    for _ in 0..n {
        let len = 6 + rng.below(15);
        let ids: Vec<u32> = (0..len).map(|_| 3 + rng.below(250) as u32).collect();
        let labels: Vec<i64> = ids
            .iter()
            .enumerate()
            .map(|(i, &t)| if i >= len / 2 { t as i64 } else { -100 })
            .collect();
        s.push_str(&serde_json::json!({"input_ids": ids, "labels": labels}).to_string());
        s.push('\n');
    }
    std::fs::write(path, s).expect("write data");
}

pub fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// Run `caft-fast directions <args>`.
pub fn directions(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_caft-fast"))
        .arg("directions")
        .args(args)
        .output()
        .expect("run caft-fast")
}

/// Assert a run failed with exit code 2 (an error, not a panic) and that stderr says `want`.
pub fn assert_error(out: &Output, want: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(2),
        "expected exit 2 (error), got {:?}; stderr:\n{err}",
        out.status.code()
    );
    assert!(
        err.contains(want),
        "stderr does not mention {want:?}:\n{err}"
    );
    assert!(!err.contains("panicked"), "panic:\n{err}");
}

/// Assert success, returning stderr.
pub fn assert_ok(out: &Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        out.status.success(),
        "failed ({:?}):\n{err}",
        out.status.code()
    );
    err
}

/// F32 tensors of a safetensors file: name -> (shape, data).
pub fn read_tensors(path: &Path) -> std::collections::BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    caft_fast::io::read_f32_safetensors(path).expect("read safetensors")
}

pub fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum()
}
