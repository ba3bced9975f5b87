//! The fused residual add + ablation + rmsnorm (kernels/norm.cu) and its backward, with the
//! launch shape ([`NormLaunch`]) that picks the kernel variant for a row width.

use super::backend::CudaBackend;
use super::launch::{row_threads, to_i32, ROW_THREADS};
use super::runtime::DeviceElem;
use crate::backend::check_len;
use anyhow::{bail, Result};
use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

/// Directions are reduced in groups of this many (`DIR_GROUP` in norm.cu).
const DIR_GROUP: usize = 8;

/// Launch shape of the fused residual/ablation/rmsnorm kernels (norm.cu) for rows of `d`
/// elements of `T`: the entry-point variant, rows per block and threads per block. Each thread
/// keeps C chunks of R rows in registers with C·R = 4 (16-byte chunks), or 8 single elements
/// of one row when `d` does not allow vectors. Public so the emulated-kernel tests launch
/// exactly what the backend launches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NormLaunch {
    pub variant: &'static str,
    pub rows: usize,
    pub threads: u32,
}

impl NormLaunch {
    /// Every variant norm.cu defines.
    pub const VARIANTS: [&'static str; 4] = ["c1r4", "c2r2", "c4r1", "s"];

    pub fn new<T>(op: &str, d: usize) -> Result<Self> {
        let vec = 16 / std::mem::size_of::<T>();
        if d.is_multiple_of(vec) {
            let chunks = d / vec;
            let threads = row_threads(chunks, ROW_THREADS);
            let (variant, rows) = match chunks.div_ceil(threads as usize) {
                1 => ("c1r4", 4),
                2 => ("c2r2", 2),
                3 | 4 => ("c4r1", 1),
                _ => bail!(
                    "{op}: rows of d = {d} exceed the {} elements the fused kernel keeps per row",
                    4 * ROW_THREADS * vec
                ),
            };
            Ok(Self {
                variant,
                rows,
                threads,
            })
        } else if d <= 8 * ROW_THREADS {
            Ok(Self {
                variant: "s",
                rows: 1,
                threads: row_threads(d, ROW_THREADS),
            })
        } else {
            bail!(
                "{op}: d = {d} is not a multiple of {vec}; such rows are supported up to {} \
                 elements",
                8 * ROW_THREADS
            )
        }
    }

    /// `resid_ablate_norm_{pass}_{suffix}_{variant}`, pass "fwd" or "bwd".
    pub fn entry(&self, pass: &str, suffix: &str) -> String {
        format!("resid_ablate_norm_{pass}_{suffix}_{}", self.variant)
    }

    /// One block per `rows` rows.
    pub fn blocks(&self, n: usize) -> u32 {
        n.div_ceil(self.rows) as u32
    }

    /// Dynamic shared memory: R·roundup(k, 8) f32 direction coefficients.
    pub fn smem_bytes(&self, k: usize) -> usize {
        self.rows * k.div_ceil(DIR_GROUP) * DIR_GROUP * 4
    }
}

#[allow(clippy::too_many_arguments)]
pub(super) fn residual_ablate_norm<T: DeviceElem>(
    be: &CudaBackend<T>,
    resid: &mut CudaSlice<T>,
    normed: &mut CudaSlice<T>,
    rstd: &mut CudaSlice<f32>,
    a: &CudaSlice<T>,
    b: Option<&CudaSlice<T>>,
    directions: Option<(&CudaSlice<f32>, usize)>,
    norm_w: &CudaSlice<T>,
    n: usize,
    d: usize,
    eps: f32,
) -> Result<()> {
    let op = "residual_ablate_norm";
    check_len(op, "resid", resid.len(), n * d);
    check_len(op, "normed", normed.len(), n * d);
    check_len(op, "rstd", rstd.len(), n);
    check_len(op, "a", a.len(), n * d);
    if let Some(b) = b {
        check_len(op, "b", b.len(), n * d);
    }
    check_len(op, "norm_w", norm_w.len(), d);
    let (q_ptr, k) = match directions {
        Some((q, k)) => {
            check_len(op, "directions", q.len(), k * d);
            (be.rt.ptr(q), k)
        }
        None => (0u64, 0usize),
    };
    if n == 0 {
        return Ok(());
    }
    let shape = NormLaunch::new::<T>(op, d)?;
    let name = shape.entry("fwd", T::SUFFIX);
    let f = be.rt.function("norm", &name)?;
    let smem = shape.smem_bytes(k);
    be.allow_smem(&f, &name, smem)?;
    let (rp, np, sp, ap) = (
        be.rt.ptr(resid),
        be.rt.ptr(normed),
        be.rt.ptr(rstd),
        be.rt.ptr(a),
    );
    let bp = b.map_or(0u64, |b| be.rt.ptr(b));
    let wp = be.rt.ptr(norm_w);
    let (k_i, n_i, d_i) = (to_i32(op, "k", k), to_i32(op, "n", n), to_i32(op, "d", d));
    let mut args = be.rt.stream.launch_builder(&f);
    args.arg(&rp)
        .arg(&np)
        .arg(&sp)
        .arg(&ap)
        .arg(&bp)
        .arg(&q_ptr)
        .arg(&k_i)
        .arg(&wp)
        .arg(&n_i)
        .arg(&d_i)
        .arg(&eps);
    let cfg = LaunchConfig {
        grid_dim: (shape.blocks(n), 1, 1),
        block_dim: (shape.threads, 1, 1),
        shared_mem_bytes: smem as u32,
    };
    // SAFETY: resid_ablate_norm_fwd_<T>_<variant>(T* resid, T* normed, float* rstd,
    // const T* a, const T* b (nullable), const float* q, int k, const T* w, int n, int d,
    // float eps): lengths checked above (n·d, n, k·d, d); ceil(n / R) blocks of R rows, the
    // variant chosen for d as the kernel expects; shared memory R·roundup(k, 8) floats.
    unsafe { be.rt.launch(&name, cfg, args) }
}

#[allow(clippy::too_many_arguments)]
pub(super) fn residual_ablate_norm_bwd<T: DeviceElem>(
    be: &CudaBackend<T>,
    dresid: &mut CudaSlice<T>,
    dnormed: &CudaSlice<T>,
    resid: &CudaSlice<T>,
    rstd: &CudaSlice<f32>,
    directions: Option<(&CudaSlice<f32>, usize)>,
    norm_w: &CudaSlice<T>,
    n: usize,
    d: usize,
) -> Result<()> {
    let op = "residual_ablate_norm_bwd";
    check_len(op, "dresid", dresid.len(), n * d);
    check_len(op, "dnormed", dnormed.len(), n * d);
    check_len(op, "resid", resid.len(), n * d);
    check_len(op, "rstd", rstd.len(), n);
    check_len(op, "norm_w", norm_w.len(), d);
    let (q_ptr, k) = match directions {
        Some((q, k)) => {
            check_len(op, "directions", q.len(), k * d);
            (be.rt.ptr(q), k)
        }
        None => (0u64, 0usize),
    };
    if n == 0 {
        return Ok(());
    }
    let shape = NormLaunch::new::<T>(op, d)?;
    let name = shape.entry("bwd", T::SUFFIX);
    let f = be.rt.function("norm", &name)?;
    let smem = shape.smem_bytes(k);
    be.allow_smem(&f, &name, smem)?;
    let (drp, dnp, rp, sp, wp) = (
        be.rt.ptr(dresid),
        be.rt.ptr(dnormed),
        be.rt.ptr(resid),
        be.rt.ptr(rstd),
        be.rt.ptr(norm_w),
    );
    let (k_i, n_i, d_i) = (to_i32(op, "k", k), to_i32(op, "n", n), to_i32(op, "d", d));
    let mut args = be.rt.stream.launch_builder(&f);
    args.arg(&drp)
        .arg(&dnp)
        .arg(&rp)
        .arg(&sp)
        .arg(&q_ptr)
        .arg(&k_i)
        .arg(&wp)
        .arg(&n_i)
        .arg(&d_i);
    let cfg = LaunchConfig {
        grid_dim: (shape.blocks(n), 1, 1),
        block_dim: (shape.threads, 1, 1),
        shared_mem_bytes: smem as u32,
    };
    // SAFETY: resid_ablate_norm_bwd_<T>_<variant>(T* dresid, const T* dnormed,
    // const T* resid, const float* rstd, const float* q, int k, const T* w, int n, int d):
    // lengths checked above; ceil(n / R) blocks of R rows as the variant expects; shared
    // memory as the kernel expects.
    unsafe { be.rt.launch(&name, cfg, args) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape<T>(d: usize) -> (&'static str, usize, u32) {
        let l = NormLaunch::new::<T>("test", d).expect("supported width");
        (l.variant, l.rows, l.threads)
    }

    /// The variant matches the chunks per thread the kernel assumes: C·R = 4 vector chunks of
    /// a row per thread, or up to 8 single elements on the scalar path.
    #[test]
    fn norm_launch_covers_every_chunk_count() {
        // bf16: 8 elements per 16-byte chunk.
        assert_eq!(shape::<half::bf16>(576), ("c1r4", 4, 96));
        assert_eq!(shape::<half::bf16>(2048), ("c1r4", 4, 256));
        assert_eq!(shape::<half::bf16>(2056), ("c2r2", 2, 256));
        assert_eq!(shape::<half::bf16>(3584), ("c2r2", 2, 256));
        assert_eq!(shape::<half::bf16>(4104), ("c4r1", 1, 256));
        assert_eq!(shape::<half::bf16>(8192), ("c4r1", 1, 256));
        assert_eq!(shape::<half::bf16>(97), ("s", 1, 128));
        assert_eq!(shape::<half::bf16>(2047), ("s", 1, 256));
        // f32: 4 elements per chunk.
        assert_eq!(shape::<f32>(100), ("c1r4", 4, 32));
        assert_eq!(shape::<f32>(2048), ("c2r2", 2, 256));
        assert_eq!(shape::<f32>(4096), ("c4r1", 1, 256));
        for (d, ok) in [(8200, false), (2049, false), (16, true)] {
            assert_eq!(
                NormLaunch::new::<half::bf16>("t", d).is_ok(),
                ok,
                "bf16 d={d}"
            );
        }
        let err = NormLaunch::new::<f32>("op", 4100)
            .expect_err("too wide")
            .to_string();
        assert!(err.contains("4096"), "{err}");
    }
}
