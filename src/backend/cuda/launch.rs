//! Launch shapes of the row and flat kernels (elementwise, loss, optimizer), the block-size
//! constants the kernels assume, and the opt-in to more than 48 KiB of shared memory.

use super::backend::CudaBackend;
use super::runtime::DeviceElem;
use anyhow::{Context, Result};
use cudarc::driver::{sys::CUfunction_attribute, CudaFunction, LaunchConfig};

/// Threads per block of the per-row kernels (norm, embedding, bias): at most this many.
pub(super) const ROW_THREADS: usize = 256;
/// Threads per block of the cross-entropy kernel (must match `CE_THREADS` in loss.cu).
const CE_THREADS: u32 = 512;
/// Threads per block of the flat elementwise kernels.
const FLAT_THREADS: usize = 256;
/// Most blocks of the first pass of `sum_squares` (a function of the length only).
const SUMSQ_MAX_BLOCKS: usize = 1024;
/// Shared memory a kernel may use without opting in.
const DEFAULT_SMEM: usize = 48 * 1024;

/// Threads for a per-row block over `chunks` work items: a multiple of 32 in [32, max].
pub(super) fn row_threads(chunks: usize, max: usize) -> u32 {
    (chunks.div_ceil(32) * 32).clamp(32, max) as u32
}

/// Work items of a row of `d` elements: 16-byte vectors when `d` allows, else elements
/// (the kernels make the same choice).
pub(super) fn row_chunks<T>(d: usize) -> usize {
    let vec = 16 / std::mem::size_of::<T>();
    if d.is_multiple_of(vec) {
        d / vec
    } else {
        d
    }
}

fn flat_grid(items: usize) -> u32 {
    // Grid-stride kernels: enough blocks to fill any GPU, never more than the items need.
    items.div_ceil(FLAT_THREADS).clamp(1, 65_535) as u32
}

/// Grid and block (x dimension; y = z = 1, no dynamic shared memory) of the launches of the
/// elementwise, loss and optimizer kernels. Public so the emulated-kernel tests
/// (tests/cuda_emulated_ops.rs) launch exactly what the backend launches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelLaunch {
    pub grid: u32,
    pub block: u32,
}

impl KernelLaunch {
    /// `embedding_*`: one block per token row, threads over the row's 16-byte chunks.
    pub fn embedding<T>(n: usize, d: usize) -> Self {
        Self {
            grid: n as u32,
            block: row_threads(row_chunks::<T>(d), ROW_THREADS),
        }
    }

    /// `add_bias_*`: one block per row, threads over the row's elements.
    pub fn add_bias(n: usize, d: usize) -> Self {
        Self {
            grid: n as u32,
            block: row_threads(d, ROW_THREADS),
        }
    }

    /// `embedding_bwd_*` over `unique` distinct ids: one block per id, threads over the
    /// row's `d` elements.
    pub fn embedding_bwd(unique: usize, d: usize) -> Self {
        Self {
            grid: unique as u32,
            block: row_threads(d, ROW_THREADS),
        }
    }

    /// `colsum_finish_f32` over `d` columns: a thread per column.
    pub fn colsum_finish(d: usize) -> Self {
        Self::flat(d)
    }

    /// `swiglu_fwd_*` and `swiglu_bwd_*` over `len` elements: a thread per 16-byte vector.
    pub fn swiglu<T>(len: usize) -> Self {
        Self::flat(len / (16 / std::mem::size_of::<T>()))
    }

    /// `rope_*` over `heads` head vectors (rows × heads per row) of `head_dim`: a thread per
    /// 16 bytes of pairs when head_dim / 2 allows it (as the kernel decides), else per pair.
    pub fn rope<T>(heads: usize, head_dim: usize) -> Self {
        let half = head_dim / 2;
        let vec = 16 / std::mem::size_of::<T>();
        let per_thread = if half.is_multiple_of(vec) { vec } else { 1 };
        Self::flat(heads * (half / per_thread))
    }

    /// `cast_from_f32_*` over `len` elements: a thread per element.
    pub fn cast(len: usize) -> Self {
        Self::flat(len)
    }

    /// `cross_entropy_*`: one block of `CE_THREADS` per row.
    pub fn cross_entropy(n: usize) -> Self {
        Self {
            grid: n as u32,
            block: CE_THREADS,
        }
    }

    /// `ce_loss_accumulate_f32`: one block.
    pub fn ce_loss_accumulate() -> Self {
        Self {
            grid: 1,
            block: 256,
        }
    }

    /// `sum_squares_partial_f32` over `len` values: a fixed number of blocks for a length
    /// (`grid` partial sums), so the result does not depend on the GPU.
    pub fn sum_squares(len: usize) -> Self {
        Self {
            grid: len.div_ceil(4 * FLAT_THREADS).clamp(1, SUMSQ_MAX_BLOCKS) as u32,
            block: FLAT_THREADS as u32,
        }
    }

    /// `adamw_f32` over `len` parameters: a thread per 4 of them.
    pub fn adamw(len: usize) -> Self {
        Self::flat(len.div_ceil(4))
    }

    fn flat(items: usize) -> Self {
        Self {
            grid: flat_grid(items),
            block: FLAT_THREADS as u32,
        }
    }

    pub(super) fn config(self) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (self.grid, 1, 1),
            block_dim: (self.block, 1, 1),
            shared_mem_bytes: 0,
        }
    }
}

pub(super) fn to_i32(op: &str, what: &str, x: usize) -> i32 {
    i32::try_from(x).unwrap_or_else(|_| panic!("{op}: {what} = {x} exceeds i32"))
}

impl<T: DeviceElem> CudaBackend<T> {
    /// Opt a kernel into more than 48 KiB of dynamic shared memory when needed.
    pub(super) fn allow_smem(&self, f: &CudaFunction, name: &str, bytes: usize) -> Result<()> {
        if bytes > DEFAULT_SMEM {
            f.set_attribute(
                CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                bytes as i32,
            )
            .with_context(|| {
                format!("{name}: {bytes} B of shared memory per row exceed what the GPU allows")
            })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The flat and per-row launch shapes the emulated-kernel tests rely on.
    #[test]
    fn kernel_launch_shapes() {
        let l = |grid, block| KernelLaunch { grid, block };
        // Rows: one block each; threads over 16-byte chunks (embedding) or elements (bias).
        assert_eq!(KernelLaunch::embedding::<half::bf16>(5, 64), l(5, 32));
        assert_eq!(KernelLaunch::embedding::<f32>(3, 37), l(3, 64));
        assert_eq!(KernelLaunch::embedding::<f32>(2, 4104), l(2, 256));
        assert_eq!(KernelLaunch::add_bias(7, 64), l(7, 64));
        assert_eq!(KernelLaunch::add_bias(1, 1000), l(1, 256));
        assert_eq!(KernelLaunch::embedding_bwd(9, 37), l(9, 64));
        assert_eq!(KernelLaunch::embedding_bwd(2, 4104), l(2, 256));
        assert_eq!(KernelLaunch::colsum_finish(257), l(2, 256));
        // Flat: a thread per vector, pair, element or float4; at least one block.
        assert_eq!(KernelLaunch::swiglu::<half::bf16>(3), l(1, 256));
        assert_eq!(KernelLaunch::swiglu::<half::bf16>(8 * 257), l(2, 256));
        assert_eq!(KernelLaunch::swiglu::<f32>(4 * 257), l(2, 256));
        // 257 heads of 64: 32 pairs each, 4 threads of 8 (bf16), 8 of 4 (f32); odd halves: 1.
        assert_eq!(KernelLaunch::rope::<half::bf16>(257, 64), l(5, 256));
        assert_eq!(KernelLaunch::rope::<f32>(257, 64), l(9, 256));
        assert_eq!(KernelLaunch::rope::<f32>(257, 2), l(2, 256));
        assert_eq!(KernelLaunch::cast(1), l(1, 256));
        assert_eq!(KernelLaunch::adamw(4 * 256 + 1), l(2, 256));
        assert_eq!(KernelLaunch::cast(1 << 30), l(65_535, 256));
        // Loss and the sum of squares.
        assert_eq!(KernelLaunch::cross_entropy(7), l(7, 512));
        assert_eq!(KernelLaunch::ce_loss_accumulate(), l(1, 256));
        assert_eq!(KernelLaunch::sum_squares(1), l(1, 256));
        assert_eq!(KernelLaunch::sum_squares(4 * 256 + 1), l(2, 256));
        assert_eq!(KernelLaunch::sum_squares(1 << 22), l(1024, 256));
    }
}
