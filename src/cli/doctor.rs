//! `caft-fast doctor` (the GPU, driver, NVRTC and cuBLAS found; every kernel compiled and
//! checked against the CPU) and `caft-fast fetch-model`.

use super::common::launch_if_asked;
use crate::backend::cuda::backend::CudaBackend;
use crate::backend::cuda::diagnostics::doctor as checks;
use crate::dist::Dist;
use anyhow::Result;
use clap::Args;
use std::path::PathBuf;

#[derive(Args, Debug, Clone, Default)]
pub struct DoctorArgs {
    /// Check NCCL across these GPUs of this node (e.g. 0,1,2,3 or all), one worker each: the
    /// sums of an all-reduce, a reduce-scatter and an all-gather checked exactly, and the
    /// all-reduce bus bandwidth of 256 MiB. Under torchrun/srun it runs without --gpus.
    #[arg(long, value_name = "LIST")]
    pub gpus: Option<String>,
}

pub fn doctor(a: DoctorArgs) -> Result<bool> {
    if let Some(done) = launch_if_asked(a.gpus.as_deref(), None)? {
        return Ok(done);
    }
    let dist = Dist::from_env()?;
    if a.gpus.is_none() && dist.world.size == 1 {
        return checks::doctor();
    }
    // One rank of the group check.
    let be = CudaBackend::<half::bf16>::new(crate::backend::device::cuda_ordinal()?)?;
    if dist.world.size == 1 {
        be.join(0, 1, &crate::backend::cuda::collective::unique_id()?)?;
    } else {
        crate::dist::join(&be, &dist, crate::dist::args_fingerprint())?;
    }
    checks::group_check(&be)
}

pub fn fetch_model() -> Result<PathBuf> {
    crate::util::fetch::smollm2()
}
