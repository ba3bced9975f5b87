//! `caft-fast doctor` (the GPU, driver, NVRTC and cuBLAS found; every kernel compiled and
//! checked against the CPU) and `caft-fast fetch-model`.

use anyhow::Result;
use std::path::PathBuf;

pub fn doctor() -> Result<bool> {
    crate::backend::cuda::diagnostics::doctor::doctor()
}

pub fn fetch_model() -> Result<PathBuf> {
    crate::util::fetch::smollm2()
}
