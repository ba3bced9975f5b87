//! Checks of the CUDA backend against the CPU reference, for people and for tests.
//!
//! - [`parity`]: CUDA-vs-CPU comparison of every op (the doctor and `tests/cuda_parity.rs`).
//! - [`doctor`]: `caft-fast doctor`.

pub mod doctor;
pub mod parity;
