//! Scratch folders and the files the tests write and read: safetensors, `.npy`, JSONL data.

use caft_fast::util::rng::Rng;
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

/// A fresh, empty folder under the system temp dir, removed when dropped. It derefs to its
/// path, so `dir.join("x")` and `&dir` where a `&Path` is wanted work.
///
/// The name holds the tag, the process id and a per-process count, so tests running at once
/// (in one binary or several) never share a folder, whatever tags they pick.
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        static SEQ: AtomicUsize = AtomicUsize::new(0);
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("caft-test-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        TempDir(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl std::ops::Deref for TempDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for TempDir {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<std::ffi::OsStr> for TempDir {
    fn as_ref(&self) -> &std::ffi::OsStr {
        self.0.as_os_str()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Write `text` to `path`; return the path.
pub fn write(path: &Path, text: &str) -> PathBuf {
    std::fs::write(path, text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    path.to_path_buf()
}

// ---- safetensors ------------------------------------------------------------------------------

/// Little-endian f32 bytes.
pub fn f32_le(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Write a safetensors file of `(name, dtype, shape, raw little-endian bytes)` tensors.
pub fn write_safetensors(path: &Path, tensors: &[(&str, Dtype, Vec<usize>, Vec<u8>)]) {
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(n, dt, shape, b)| {
            (
                n.to_string(),
                TensorView::new(*dt, shape.clone(), b).expect("test tensor view"),
            )
        })
        .collect();
    let bytes = safetensors::serialize(views, None).expect("serialize");
    std::fs::write(path, bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
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

/// Every tensor of a safetensors file (F32, I64 or I32), as f64, read independently of the
/// library.
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

/// F32 tensors of a safetensors file through the library's reader: name -> (shape, data).
pub fn read_tensors(path: &Path) -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    caft_fast::io::read_f32_safetensors(path).expect("read safetensors")
}

// ---- .npy ---------------------------------------------------------------------------------------

/// Write a .npy file (format `major`.0) with the given descr, order flag, shape text and data,
/// padding the header with spaces and a newline to a multiple of 64 bytes as numpy does.
pub fn write_npy(path: &Path, major: u8, descr: &str, fortran: bool, shape: &str, data: &[u8]) {
    let dict = format!(
        "{{'descr': '{descr}', 'fortran_order': {}, 'shape': {shape}, }}",
        if fortran { "True" } else { "False" }
    );
    let pre = if major == 1 { 10 } else { 12 };
    let mut header = dict.into_bytes();
    while (pre + header.len() + 1) % 64 != 0 {
        header.push(b' ');
    }
    header.push(b'\n');
    let mut out = b"\x93NUMPY".to_vec();
    out.push(major);
    out.push(0);
    if major == 1 {
        out.extend((header.len() as u16).to_le_bytes());
    } else {
        out.extend((header.len() as u32).to_le_bytes());
    }
    out.extend(header);
    out.extend(data);
    std::fs::write(path, out).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}

/// A little-endian f32 C-order .npy array `[k, d]` (format 1.0).
pub fn write_npy_f32(path: &Path, data: &[f32], k: usize, d: usize) {
    write_npy(path, 1, "<f4", false, &format!("({k}, {d})"), &f32_le(data));
}

// ---- training and evaluation data ---------------------------------------------------------------

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

/// `n` pre-tokenized records of random ids (lengths 6..=20), labels on the second half of
/// each (the "answer"), as JSONL at `path`.
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

/// The lines of a JSONL file, parsed.
pub fn jsonl(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The metrics lines of a training run, parsed.
pub fn metrics(run: &Path) -> Vec<serde_json::Value> {
    jsonl(&run.join("metrics.jsonl"))
}
