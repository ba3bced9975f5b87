//! The CUDA backend: NVRTC-compiled kernels (`kernels/*.cu`) and cuBLAS, driven through cudarc.
//!
//! - [`compile`]: the embedded kernel sources and NVRTC compilation (no GPU needed).
//! - [`runtime`]: context, stream, module cache, launch helper, element types.
//! - [`gemm`]: the one cuBLAS GEMM wrapper (row-major).
//! - [`backend`]: [`CudaBackend`], the `Backend` ops.
//! - [`attention`]: the attention kernels' host side.

pub mod attention;
pub mod backend;
pub mod compile;
pub mod gemm;
pub mod runtime;

pub use backend::CudaBackend;
pub use runtime::{DeviceElem, Runtime};
