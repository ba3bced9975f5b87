//! The CUDA backend: NVRTC-compiled kernels (`kernels/*.cu`) and cuBLAS, driven through cudarc.
//!
//! - [`compile`]: the embedded kernel sources and NVRTC compilation (no GPU needed).
//! - [`runtime`]: context, stream, module cache, launch helper, element types.
//! - [`gemm`]: the one cuBLAS GEMM wrapper (row-major).
//! - [`backend`]: [`CudaBackend`], the `Backend` ops.
//! - [`probe`]: what CUDA support the machine has, without panicking (`--device auto`).
//! - [`doctor`]: `caft-fast doctor`.
//! - [`parity`]: CUDA-vs-CPU comparison of every op (doctor and tests).
//! - [`attention`]: the attention kernels' host side.

pub mod attention;
pub mod backend;
pub mod compile;
pub mod doctor;
pub mod gemm;
pub mod parity;
pub mod probe;
pub mod runtime;

pub use backend::{CudaBackend, KernelLaunch, NormLaunch};
pub use doctor::doctor;
pub use probe::{probe, DeviceProbe};
pub use runtime::{DeviceElem, Runtime};
