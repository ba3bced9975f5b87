//! The one GEMM wrapper: row-major matrices (the Hugging Face layouts) over cuBLAS.
//!
//! cuBLAS is column-major. A row-major `X[r, c]` is the column-major `Xᵀ[c, r]` with the same
//! leading dimension `c`, so the row-major product `C = op(A) op(B)` is computed as the
//! column-major `Cᵀ = op(B)ᵀ op(A)ᵀ`: the operands are swapped and `m`/`n` exchanged, with no
//! data movement.
//!
//! Precision: bf16 operands accumulate in f32 (`CUBLAS_COMPUTE_32F`, tensor cores), with the
//! output in bf16 or f32; when every operand is f32 the compute type is
//! `CUBLAS_COMPUTE_32F_PEDANTIC`, which keeps plain f32 math (no TF32, no reduced-precision
//! tricks), so the f32 path matches the CPU reference tightly.
//!
//! Determinism: cuBLAS gives bit-identical results run to run on one GPU model with one stream
//! and no atomics mode, which is how it is used here.

use super::runtime::Runtime;
use anyhow::{bail, ensure, Result};
use cudarc::cublas::sys as cb;
use cudarc::cublas::CudaBlas;
use std::ffi::{c_int, c_void};

/// Whether libcublas can be loaded.
pub fn cublas_present() -> bool {
    // SAFETY: only tries to dlopen the library by its usual names; no symbol is called.
    unsafe { cb::is_culib_present() }
}

/// Element type of a GEMM operand.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    Bf16,
    F32,
}

impl DType {
    fn cuda(self) -> cb::cudaDataType {
        match self {
            DType::Bf16 => cb::cudaDataType::CUDA_R_16BF,
            DType::F32 => cb::cudaDataType::CUDA_R_32F,
        }
    }

    /// The GEMM type of a device element (`"bf16"` or `"f32"` suffix).
    pub fn of_suffix(suffix: &str) -> DType {
        if suffix == "bf16" {
            DType::Bf16
        } else {
            DType::F32
        }
    }
}

/// One input operand: a device address, its element type, and whether it is used transposed.
/// Not transposed, `A` of `op(A)[m, k]` is stored row-major `[m, k]`; transposed, `[k, m]`.
#[derive(Clone, Copy, Debug)]
pub struct Operand {
    pub ptr: u64,
    pub dtype: DType,
    pub trans: bool,
}

/// The output: a contiguous row-major `[m, n]` matrix.
#[derive(Clone, Copy, Debug)]
pub struct Output {
    pub ptr: u64,
    pub dtype: DType,
}

/// A cuBLAS handle bound to the runtime's stream.
pub struct Gemm {
    blas: CudaBlas,
}

impl std::fmt::Debug for Gemm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Gemm(cuBLAS)")
    }
}

fn check(status: cb::cublasStatus_t, what: &str) -> Result<()> {
    if status != cb::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
        bail!("{what} failed: {status:?}");
    }
    Ok(())
}

impl Gemm {
    /// Open cuBLAS on the runtime's stream. Fails (never panics) when libcublas is absent.
    pub fn new(rt: &Runtime) -> Result<Gemm> {
        if !cublas_present() {
            bail!("libcublas not found (put the folder holding libcublas.so on LD_LIBRARY_PATH)");
        }
        let blas = CudaBlas::new(rt.stream.clone())
            .map_err(|e| anyhow::anyhow!("creating a cuBLAS handle: {e:?}"))?;
        check(
            // SAFETY: the handle is valid; DEFAULT_MATH disallows TF32 for f32 GEMMs.
            unsafe { cb::cublasSetMathMode(*blas.handle(), cb::cublasMath_t::CUBLAS_DEFAULT_MATH) },
            "cublasSetMathMode",
        )?;
        Ok(Gemm { blas })
    }

    /// cuBLAS version number (e.g. 130001 for 13.0.1).
    pub fn version(&self) -> Result<i32> {
        let mut v: c_int = 0;
        check(
            // SAFETY: valid handle and out-pointer.
            unsafe { cb::cublasGetVersion_v2(*self.blas.handle(), &mut v) },
            "cublasGetVersion",
        )?;
        Ok(v)
    }

    /// Row-major `C[m, n] = alpha · op(A)[m, k] · op(B)[k, n] + beta · C`.
    ///
    /// # Safety
    /// Each address must point to a live device buffer of at least the elements its shape
    /// implies (`m·k`, `k·n`, `m·n`) of its stated type, and `c` must not overlap `a` or `b`.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn gemm(
        &self,
        m: usize,
        n: usize,
        k: usize,
        a: Operand,
        b: Operand,
        c: Output,
        alpha: f32,
        beta: f32,
    ) -> Result<()> {
        if m == 0 || n == 0 {
            return Ok(());
        }
        let fits = |x: usize| x <= c_int::MAX as usize;
        ensure!(
            fits(m) && fits(n) && fits(k),
            "GEMM {m}x{n}x{k} exceeds cuBLAS's 32-bit sizes"
        );
        let (m, n, k) = (m as c_int, n as c_int, k as c_int);
        // Column-major Cᵀ[n, m] = op(B)ᵀ[n, k] · op(A)ᵀ[k, m].
        // B stored row-major [k, n] is column-major [n, k] = op(B)ᵀ: no transpose, ld n.
        // B stored row-major [n, k] (trans) is column-major [k, n]: transpose, ld k.
        let (op_b, ld_b) = if b.trans {
            (cb::cublasOperation_t::CUBLAS_OP_T, k)
        } else {
            (cb::cublasOperation_t::CUBLAS_OP_N, n)
        };
        let (op_a, ld_a) = if a.trans {
            (cb::cublasOperation_t::CUBLAS_OP_T, m)
        } else {
            (cb::cublasOperation_t::CUBLAS_OP_N, k)
        };
        let all_f32 = a.dtype == DType::F32 && b.dtype == DType::F32 && c.dtype == DType::F32;
        ensure!(
            a.dtype == b.dtype,
            "GEMM operands must share one type ({:?} vs {:?})",
            a.dtype,
            b.dtype
        );
        let compute = if all_f32 {
            cb::cublasComputeType_t::CUBLAS_COMPUTE_32F_PEDANTIC
        } else {
            cb::cublasComputeType_t::CUBLAS_COMPUTE_32F
        };
        // SAFETY: the caller guarantees the buffers; alpha and beta are host f32 values (host
        // pointer mode, the default) that outlive the call; leading dimensions follow from the
        // row-major shapes above (and are at least 1 as cuBLAS requires).
        let status = unsafe {
            cb::cublasGemmEx(
                *self.blas.handle(),
                op_b,
                op_a,
                n,
                m,
                k,
                &alpha as *const f32 as *const c_void,
                b.ptr as *const c_void,
                b.dtype.cuda(),
                ld_b.max(1),
                a.ptr as *const c_void,
                a.dtype.cuda(),
                ld_a.max(1),
                &beta as *const f32 as *const c_void,
                c.ptr as *mut c_void,
                c.dtype.cuda(),
                n,
                compute,
                cb::cublasGemmAlgo_t::CUBLAS_GEMM_DFALT,
            )
        };
        check(
            status,
            &format!("cublasGemmEx (row-major {m}x{n}x{k}, A {a:?}, B {b:?}, C {c:?})"),
        )
    }
}
