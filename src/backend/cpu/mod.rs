//! The CPU reference backend (in progress).

/// f32, multithreaded.
#[derive(Clone, Debug, Default)]
pub struct CpuBackend;
