//! The CUDA backend: NVRTC-compiled kernels (`kernels/*.cu`) and cuBLAS, driven through cudarc.
//!
//! - [`compile`]: the embedded kernel sources and NVRTC compilation (no GPU needed).
//! - [`runtime`]: context, stream, module cache, launch helper, element types.
//! - [`gemm`]: the one cuBLAS GEMM wrapper (row-major).
//! - [`backend`]: [`CudaBackend`], its memory ops and the `Backend` impl that dispatches to the
//!   op families below.
//! - `linear`: frozen linear layers and LoRA (every GEMM), forward and backward.
//! - `norm`: the fused residual + ablation + rmsnorm and its backward, [`NormLaunch`].
//! - [`attention`]: the attention kernels' host side (training and KV-cache decoding).
//! - `elementwise`: embedding, rotary embeddings, SwiGLU, the f32 -> `T` cast.
//! - `loss`: cross-entropy.
//! - `optim`: AdamW and the sum of squares.
//! - `weight_grad`: full fine-tuning's weight, bias, norm-gain and embedding gradients, and
//!   the forward's copies of the master weights.
//! - `launch`: launch shapes of the row and flat kernels ([`KernelLaunch`]), block-size constants.
//! - `scratch`: device scratch the backend grows on demand.
//! - [`collective`]: NCCL for data parallelism (the group, sums across ranks).
//! - [`probe`]: what CUDA support the machine has, without panicking (`--device auto`).
//! - [`diagnostics`]: CUDA-vs-CPU parity of every op and `caft-fast doctor`.

pub mod attention;
pub mod backend;
pub mod collective;
pub mod compile;
pub mod diagnostics;
mod elementwise;
pub mod gemm;
mod launch;
mod linear;
mod loss;
mod norm;
mod optim;
pub mod probe;
pub mod runtime;
mod scratch;
mod weight_grad;

pub use backend::CudaBackend;
pub use diagnostics::doctor::doctor;
pub use launch::KernelLaunch;
pub use norm::NormLaunch;
pub use probe::{probe, DeviceProbe};
pub use runtime::{DeviceElem, Runtime};
pub use weight_grad::ColumnSums;
