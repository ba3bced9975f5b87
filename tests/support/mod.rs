//! What the integration tests share, in one module: every test binary that needs any of it
//! declares `mod support;` (a file directly under `tests/`) or
//! `#[path = "../support/mod.rs"] mod support;` (the `main.rs` of a folder binary) and imports
//! `support::*`.
//!
//! - this file: where things are. [`repo`] is `$CAFT_REPO` when set (test executables copied
//!   to a machine without cargo by `scripts/stage.sh` and run by `scripts/gpu_check.sh` from a
//!   checkout there), else the folder they were built from; [`fixtures`], [`tiny_fixture`] and
//!   [`smollm2_gguf`] (the real model, or a skip notice, or a failure under `CI`) build on it.
//!   Plus the error measures the parity tests compare with ([`rel_err`], [`assert_close`]).
//! - [`bin`]: running the `caft-fast` binary ([`caft`], and [`train`], [`directions`],
//!   [`eval`] for a subcommand), always checking that it did not panic, and [`assert_ok`] /
//!   [`assert_error`], which print both output streams when they fail.
//! - [`files`]: [`TempDir`], the one scratch folder of the tests (unique per test, removed
//!   when dropped); safetensors and `.npy` writers and readers; pre-tokenized and chat data.
//! - [`models`]: tiny models: the fixture folders, a chat-capable copy of the tiny Llama (a
//!   byte-level tokenizer and a ChatML template), shrunk random models of real families, an
//!   adapter that plants a known direction.
//!
//! How the test binaries are organised: every `tests/*.rs` file and every `tests/*/main.rs` is
//! a test binary of its own, compiled and linked against the whole crate separately at the test
//! profile's opt-level 3 (each costs its own build time), so an area's tests share one binary:
//! `tests/model/`, `tests/parity/`, `tests/train/`, `tests/generate/`, `tests/directions/` are
//! folders whose `main.rs` declares one module per topic (`mod cli;` is `tests/train/cli.rs`).
//! Cargo discovers `tests/*/main.rs` by itself, so Cargo.toml needs no `[[test]]` entries and
//! the topic modules no `#[path]`; a folder without `main.rs` (this one, `cuda_emulated/`) is
//! no test binary. Test names carry the module: `cargo test --test train cli::`.
//! The files that rerun their own executable on the emulated GPU (`cuda_model.rs`,
//! `cuda_parity.rs`, `generate_kv.rs`, `emulated_gpu_cli.rs`; see `cuda_emulated/gpu.rs`) stay
//! binaries of their own: the rerun selects tests by name within the executable, and
//! `scripts/stage.sh` copies such executables to the GPU machine by name. Folder binaries have
//! no such tests.
//!
//! Each test binary compiles this module separately and uses a part of it, hence the
//! `dead_code` allowance.
#![allow(dead_code)]

pub mod bin;
pub mod files;
pub mod models;

// A binary that uses nothing of one part would warn about its re-export.
#[allow(unused_imports)]
pub use bin::*;
#[allow(unused_imports)]
pub use files::*;
#[allow(unused_imports)]
pub use models::*;

use std::path::{Path, PathBuf};

/// The repository root: `$CAFT_REPO` when set (test executables run from a copy, away from
/// the checkout they were built in), else where they were built.
pub fn repo() -> PathBuf {
    std::env::var_os("CAFT_REPO")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

/// `tests/fixtures` (made by scripts/make_fixtures.py; docs/fixtures.md).
pub fn fixtures() -> PathBuf {
    repo().join("tests").join("fixtures")
}

/// A tiny fixture model folder: `llama`, `qwen2` or `mistral`.
pub fn tiny_fixture(name: &str) -> PathBuf {
    fixtures().join("tiny").join(name)
}

/// The SmolLM2-135M-Instruct GGUF, the first file of: `$CAFT_SMOLLM2_GGUF`,
/// `<repo>/.cache/smollm2/`, the program's own cache (where `scripts/test.sh` fetches it).
/// Missing: a failure under `CI` (the real-model tests must run there), a skip notice (and
/// `None`) elsewhere.
pub fn smollm2_gguf() -> Option<PathBuf> {
    let file = caft_fast::util::fetch::SMOLLM2_FILE;
    let candidates = [
        std::env::var_os("CAFT_SMOLLM2_GGUF").map(PathBuf::from),
        Some(repo().join(".cache").join("smollm2").join(file)),
        Some(caft_fast::util::fetch::smollm2_path()),
    ];
    for c in candidates.iter().flatten() {
        if c.is_file() {
            return Some(c.clone());
        }
    }
    let looked: Vec<String> = candidates
        .iter()
        .flatten()
        .map(|p| p.display().to_string())
        .collect();
    let msg = format!(
        "the SmolLM2 GGUF is in none of {} (scripts/test.sh fetches it; or set \
         CAFT_SMOLLM2_GGUF)",
        looked.join(", ")
    );
    if std::env::var_os("CI").is_some() {
        panic!("{msg}");
    }
    eprintln!("skipping: {msg}");
    None
}

/// A path as `&str`, for argument lists (the tests' paths are UTF-8).
pub fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// ‖a - b‖ / ‖b‖ in f64, infinite on any NaN or length mismatch (the library's measure).
pub use caft_fast::linalg::rel_err;

pub fn assert_close(what: &str, a: &[f32], b: &[f64], tol: f64) {
    let e = rel_err(a, b);
    assert!(e <= tol, "{what}: relative error {e:.3e} > {tol:.0e}");
}

/// The dot product in f64.
pub fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum()
}
