//! The CUDA backend: NVRTC-compiled kernels (`kernels/*.cu`) and cuBLAS, driven through cudarc.
//!
//! - [`compile`]: the embedded kernel sources and NVRTC compilation (no GPU needed).
//! - [`runtime`]: context, stream, module cache, launch helper, element types.
//! - [`attention`]: the attention kernels' host side.

pub mod attention;
pub mod compile;
pub mod runtime;
