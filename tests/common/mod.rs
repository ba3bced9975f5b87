//! Helpers shared by the integration tests: fixture reading, error norms, the SmolLM2 file.
#![allow(dead_code)]

use safetensors::{Dtype, SafeTensors};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The repository root: `$CAFT_REPO` when set (test executables copied to another machine,
/// e.g. by scripts/stage.sh, run from a checkout elsewhere), else where they were built.
pub fn repo() -> PathBuf {
    std::env::var_os("CAFT_REPO")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

pub fn fixtures() -> PathBuf {
    repo().join("tests").join("fixtures")
}

/// The SmolLM2-135M-Instruct GGUF where the program looks for it (`$CAFT_SMOLLM2_GGUF`, else
/// the cache; `scripts/test.sh` fetches it). Missing: a failure in CI (the parity tests must
/// run there), a skip notice elsewhere.
pub fn smollm2_gguf() -> Option<PathBuf> {
    let p = caft_fast::util::fetch::smollm2_path();
    if p.exists() {
        return Some(p);
    }
    if std::env::var_os("CI").is_some() {
        panic!("{} is missing; scripts/test.sh fetches it", p.display());
    }
    eprintln!(
        "skipping: {} not found (scripts/test.sh fetches it)",
        p.display()
    );
    None
}

/// A tensor read from a fixture, converted to f64 (ints too).
#[derive(Clone, Debug)]
pub struct Fx {
    pub shape: Vec<usize>,
    pub data: Vec<f64>,
}

impl Fx {
    pub fn f32(&self) -> Vec<f32> {
        self.data.iter().map(|&x| x as f32).collect()
    }
    pub fn i64(&self) -> Vec<i64> {
        self.data.iter().map(|&x| x as i64).collect()
    }
}

pub fn read_safetensors(path: &Path) -> BTreeMap<String, Fx> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        let raw = view.data();
        let data: Vec<f64> = match view.dtype() {
            Dtype::F32 => raw
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
                .collect(),
            Dtype::I64 => raw
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f64)
                .collect(),
            Dtype::I32 => raw
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes(c.try_into().unwrap()) as f64)
                .collect(),
            other => panic!("{}: tensor {name} has dtype {other:?}", path.display()),
        };
        out.insert(
            name.to_string(),
            Fx {
                shape: view.shape().to_vec(),
                data,
            },
        );
    }
    out
}

/// ‖a - b‖ / ‖b‖, computed in f64; NaN anywhere gives infinity so it never passes.
pub fn rel_err(a: &[f32], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    let (mut num, mut den) = (0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        if !x.is_finite() {
            return f64::INFINITY;
        }
        num += (x as f64 - y).powi(2);
        den += y * y;
    }
    (num / den.max(1e-300)).sqrt()
}

pub fn assert_close(what: &str, a: &[f32], b: &[f64], tol: f64) {
    let e = rel_err(a, b);
    assert!(e <= tol, "{what}: relative error {e:.3e} > {tol:.0e}");
}

/// Random weights of a real model's family and head_dim (a `caft_fast::model::random` preset),
/// shrunk to 3 layers of width 256 and a 512-token vocabulary, with `num_heads` query and
/// `num_kv_heads` key/value heads. For the bf16 attention kernels of head_dim 64 and 128, which
/// use tensor cores (the tiny fixtures' head_dims take the generic kernels).
pub fn shrunk_random_model(
    preset: &str,
    num_heads: usize,
    num_kv_heads: usize,
) -> caft_fast::model::loader::LoadedModel {
    let full = caft_fast::model::random::preset(preset).unwrap();
    let config = caft_fast::model::config::ModelConfig {
        vocab_size: 512,
        hidden_size: 256,
        intermediate_size: 384,
        num_layers: 3,
        num_heads,
        num_kv_heads,
        ..full
    };
    caft_fast::model::loader::LoadedModel {
        weights: Box::new(caft_fast::model::random::RandomWeights::new(
            config.clone(),
            9,
        )),
        config,
        tokenizer: None,
        chat_template: None,
        source: format!("random:{preset}-shrunk").into(),
    }
}
