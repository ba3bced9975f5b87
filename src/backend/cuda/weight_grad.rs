//! Full fine-tuning: the gradients of the weights themselves and the refresh of the forward's
//! copies from the f32 master weights (the CUDA side of `backend/cpu/weight_grad.rs`).
//!
//! - `linear_bwd_weight`: `dW += dyᵀ x`, one cuBLAS GEMM with `T` inputs and the f32 gradient
//!   slice as its output (f32 accumulation, beta 1).
//! - `bias_bwd`, `norm_weight_bwd`: column sums over the token rows in two passes
//!   (kernels/weight_grad.cu: partial sums per chunk of rows, then the chunks in order), shaped
//!   by [`ColumnSums`]; deterministic, no atomics.
//! - `embedding_bwd`: the token ids (on the host) become a CSR of distinct ids and their rows,
//!   in increasing order; a block per distinct id adds its rows in that order.
//! - `params_to_act`: `T(master + add)`, one element per thread.
//!
//! Every gradient is a slice of one flat f32 buffer at `off`: the kernels get the slice's
//! address, so they never see the offset.

use super::backend::CudaBackend;
use super::gemm::{DType, Operand, Output};
use super::launch::{row_threads, to_i32, KernelLaunch, ROW_THREADS};
use super::runtime::DeviceElem;
use super::scratch::ensure;
use crate::backend::{check_len, check_min};
use anyhow::{Context, Result};
use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

/// Fewest rows a chunk of the column sums covers (short chunks would make pass 2 the work).
const COLSUM_MIN_ROWS: usize = 64;
/// Most row chunks (partial sums per column): bounds the scratch at 128 · d floats.
const COLSUM_MAX_CHUNKS: usize = 128;

/// Launch shape of the column sums over `n` rows of `d` columns (`colsum_<term>_*`, then
/// `colsum_finish_f32`): a thread per column in blocks of `threads`, `tiles` blocks across the
/// columns, `chunks` blocks down the rows, each summing `rows_per_chunk` rows (the last one
/// fewer). A function of `n` and `d` only, so the summation order is the same on every GPU.
/// Public so the tests can pick shapes that cover partial tiles and several chunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ColumnSums {
    pub tiles: u32,
    pub chunks: u32,
    pub rows_per_chunk: usize,
    pub threads: u32,
}

impl ColumnSums {
    pub fn new(n: usize, d: usize) -> Self {
        let rows_per_chunk = COLSUM_MIN_ROWS.max(n.div_ceil(COLSUM_MAX_CHUNKS));
        let threads = row_threads(d, ROW_THREADS);
        Self {
            tiles: d.div_ceil(threads as usize).max(1) as u32,
            chunks: n.div_ceil(rows_per_chunk).max(1) as u32,
            rows_per_chunk,
            threads,
        }
    }

    /// f32 elements of the partial sums (`chunks · d`): the scratch the op needs.
    pub fn partial_len(&self, d: usize) -> usize {
        self.chunks as usize * d
    }

    fn pass1(&self) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (self.tiles, self.chunks, 1),
            block_dim: (self.threads, 1, 1),
            shared_mem_bytes: 0,
        }
    }
}

/// The token rows of `ids` grouped by id, as `embedding_bwd_*` reads them (i32):
/// `rows[n] | starts[u + 1] | ids[u]`, `u` distinct ids in increasing order, the rows of each in
/// increasing order (a stable sort), `starts` the first entry of each id in `rows`, then `n`.
/// Returns the array and `u`.
fn token_csr(ids: &[u32]) -> (Vec<i32>, usize) {
    let n = ids.len();
    let mut rows: Vec<u32> = (0..n as u32).collect();
    rows.sort_by_key(|&i| ids[i as usize]);
    let mut starts = Vec::new();
    let mut distinct = Vec::new();
    for (k, &i) in rows.iter().enumerate() {
        let id = ids[i as usize];
        if distinct.last() != Some(&id) {
            distinct.push(id);
            starts.push(k);
        }
    }
    starts.push(n);
    let u = distinct.len();
    let mut csr = Vec::with_capacity(n + 2 * u + 1);
    csr.extend(rows.iter().map(|&i| i as i32));
    csr.extend(starts.iter().map(|&s| to_i32("embedding_bwd", "row", s)));
    csr.extend(
        distinct
            .iter()
            .map(|&id| to_i32("embedding_bwd", "id", id as usize)),
    );
    (csr, u)
}

/// Address of element `off` of an f32 buffer.
fn at(base: u64, off: usize) -> u64 {
    base + (off * std::mem::size_of::<f32>()) as u64
}

#[allow(clippy::too_many_arguments)]
pub(super) fn linear_bwd_weight<T: DeviceElem>(
    be: &CudaBackend<T>,
    dw: &mut CudaSlice<f32>,
    off: usize,
    dy: &CudaSlice<T>,
    x: &CudaSlice<T>,
    n: usize,
    d_in: usize,
    d_out: usize,
) -> Result<()> {
    const OP: &str = "linear_bwd_weight";
    check_min(OP, "dw", dw.len(), off + d_out * d_in);
    check_len(OP, "dy", dy.len(), n * d_out);
    check_len(OP, "x", x.len(), n * d_in);
    if n == 0 || d_in == 0 || d_out == 0 {
        return Ok(());
    }
    let t = DType::of_suffix(T::SUFFIX);
    // SAFETY: dW[d_out, d_in] (f32, inside dw at off: checked) += dyᵀ[d_out, n] · x[n, d_in],
    // dy stored [n, d_out] and x [n, d_in] as checked; dw is a distinct buffer (Rust borrows).
    unsafe {
        be.gemm.gemm(
            d_out,
            d_in,
            n,
            Operand {
                ptr: be.rt.ptr(dy),
                dtype: t,
                trans: true,
            },
            Operand {
                ptr: be.rt.ptr(x),
                dtype: t,
                trans: false,
            },
            Output {
                ptr: at(be.rt.ptr(dw), off),
                dtype: DType::F32,
            },
            1.0,
            1.0,
        )
    }
    .context(OP)
}

/// `out[off + j] += Σ_i term(i, j)`: pass 1 (`colsum_<term>`, its arguments after the partial
/// buffer: `inputs`, then n, d, rows per chunk) then pass 2.
#[allow(clippy::too_many_arguments)]
fn column_sums<T: DeviceElem>(
    be: &CudaBackend<T>,
    op: &str,
    term: &str,
    out: &mut CudaSlice<f32>,
    off: usize,
    n: usize,
    d: usize,
    inputs: &[u64],
) -> Result<()> {
    let shape = ColumnSums::new(n, d);
    let (n_i, d_i) = (to_i32(op, "n", n), to_i32(op, "d", d));
    let rows_i = to_i32(op, "rows per chunk", shape.rows_per_chunk);
    let chunks_i = shape.chunks as i32;
    let mut sc = be.scratch();
    let part = be
        .rt
        .ptr(ensure(&be.rt, &mut sc.colsum, shape.partial_len(d))?);

    let (f, name) = be.func("weight_grad", &format!("colsum_{term}"))?;
    let mut args = be.rt.stream.launch_builder(&f);
    args.arg(&part);
    for p in inputs {
        args.arg(p);
    }
    args.arg(&n_i).arg(&d_i).arg(&rows_i);
    // SAFETY: colsum_bias(float* partial, const T* dy, int n, int d, int rows_per_chunk) or
    // colsum_norm(float* partial, const T* dnormed, const T* x, const float* rstd, int n, int d,
    // int rows_per_chunk): the inputs hold n·d elements (rstd n), checked by the caller;
    // partial holds chunks·d (ensured); the grid covers d columns and n rows.
    unsafe { be.rt.launch(&name, shape.pass1(), args) }?;

    let f = be.rt.function("weight_grad", "colsum_finish_f32")?;
    let o = at(be.rt.ptr(out), off);
    let mut args = be.rt.stream.launch_builder(&f);
    args.arg(&o).arg(&part).arg(&chunks_i).arg(&d_i);
    let cfg = KernelLaunch::colsum_finish(d).config();
    // SAFETY: colsum_finish_f32(float* out, const float* partial, int chunks, int d): out is
    // the slice [off, off + d) of a buffer checked by the caller, partial chunks·d (pass 1).
    unsafe { be.rt.launch("colsum_finish_f32", cfg, args) }
}

pub(super) fn bias_bwd<T: DeviceElem>(
    be: &CudaBackend<T>,
    db: &mut CudaSlice<f32>,
    off: usize,
    dy: &CudaSlice<T>,
    n: usize,
    d: usize,
) -> Result<()> {
    check_min("bias_bwd", "db", db.len(), off + d);
    check_len("bias_bwd", "dy", dy.len(), n * d);
    if n == 0 || d == 0 {
        return Ok(());
    }
    let inputs = [be.rt.ptr(dy)];
    column_sums(be, "bias_bwd", "bias", db, off, n, d, &inputs)
}

#[allow(clippy::too_many_arguments)]
pub(super) fn norm_weight_bwd<T: DeviceElem>(
    be: &CudaBackend<T>,
    dw: &mut CudaSlice<f32>,
    off: usize,
    dnormed: &CudaSlice<T>,
    x: &CudaSlice<T>,
    rstd: &CudaSlice<f32>,
    n: usize,
    d: usize,
) -> Result<()> {
    const OP: &str = "norm_weight_bwd";
    check_min(OP, "dw", dw.len(), off + d);
    check_len(OP, "dnormed", dnormed.len(), n * d);
    check_len(OP, "x", x.len(), n * d);
    check_len(OP, "rstd", rstd.len(), n);
    if n == 0 || d == 0 {
        return Ok(());
    }
    let inputs = [be.rt.ptr(dnormed), be.rt.ptr(x), be.rt.ptr(rstd)];
    column_sums(be, OP, "norm", dw, off, n, d, &inputs)
}

pub(super) fn embedding_bwd<T: DeviceElem>(
    be: &CudaBackend<T>,
    dtable: &mut CudaSlice<f32>,
    off: usize,
    dx: &CudaSlice<T>,
    ids: &[u32],
    d: usize,
) -> Result<()> {
    const OP: &str = "embedding_bwd";
    let n = ids.len();
    check_len(OP, "dx", dx.len(), n * d);
    if let Some(max) = ids.iter().max() {
        check_min(OP, "dtable", dtable.len(), off + (*max as usize + 1) * d);
    }
    if n == 0 || d == 0 {
        return Ok(());
    }
    let (csr, u) = token_csr(ids);
    let (n_i, u_i, d_i) = (to_i32(OP, "rows", n), u as i32, to_i32(OP, "d", d));
    let mut sc = be.scratch();
    // Sized for any ids of n rows (u <= n), so the scratch depends on n alone.
    let dev = ensure(&be.rt, &mut sc.csr, 3 * n + 1)?;
    be.rt
        .stream
        .memcpy_htod(&csr, &mut dev.slice_mut(0..csr.len()))
        .context("uploading the rows of each token id")?;
    let (f, name) = be.func("weight_grad", "embedding_bwd")?;
    let (t, xp, cp) = (at(be.rt.ptr(dtable), off), be.rt.ptr(dx), be.rt.ptr(&*dev));
    let mut args = be.rt.stream.launch_builder(&f);
    args.arg(&t).arg(&xp).arg(&cp).arg(&n_i).arg(&u_i).arg(&d_i);
    let cfg = KernelLaunch::embedding_bwd(u, d).config();
    // SAFETY: embedding_bwd(float* table, const T* dx, const int* csr, int n, int u, int d):
    // dx holds n·d (checked), csr n + 2u + 1 entries (uploaded), every id < max + 1 rows of d
    // inside dtable from off (checked), every row index < n; grid = u.
    unsafe { be.rt.launch(&name, cfg, args) }
}

pub(super) fn params_to_act<T: DeviceElem>(
    be: &CudaBackend<T>,
    dst: &mut CudaSlice<T>,
    src: &CudaSlice<f32>,
    off: usize,
    add: f32,
) -> Result<()> {
    let len = dst.len();
    check_min("params_to_act", "src", src.len(), off + len);
    if len == 0 {
        return Ok(());
    }
    let (f, name) = be.func("weight_grad", "params_to_act")?;
    let (dp, sp) = (be.rt.ptr(dst), at(be.rt.ptr(src), off));
    let len_i = len as i64;
    let mut args = be.rt.stream.launch_builder(&f);
    args.arg(&dp).arg(&sp).arg(&add).arg(&len_i);
    let cfg = KernelLaunch::cast(len).config();
    // SAFETY: params_to_act(T* dst, const float* src, float add, long long len): dst holds len
    // elements, src len from off (checked).
    unsafe { be.rt.launch(&name, cfg, args) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn column_sum_shapes() {
        let s = |tiles, chunks, rows_per_chunk, threads| ColumnSums {
            tiles,
            chunks,
            rows_per_chunk,
            threads,
        };
        // Narrow rows: one tile of a multiple of 32 threads; up to 64 rows a chunk.
        assert_eq!(ColumnSums::new(1, 5), s(1, 1, 64, 32));
        assert_eq!(ColumnSums::new(64, 33), s(1, 1, 64, 64));
        assert_eq!(ColumnSums::new(65, 257), s(2, 2, 64, 256));
        // Past 128 chunks of 64 rows the chunks grow instead (the last one shorter).
        assert_eq!(ColumnSums::new(128 * 64, 576), s(3, 128, 64, 256));
        assert_eq!(ColumnSums::new(128 * 64 + 70, 37), s(1, 128, 65, 64));
        assert_eq!(ColumnSums::new(1 << 20, 4096), s(16, 128, 8192, 256));
        assert_eq!(ColumnSums::new(300, 100).partial_len(100), 5 * 100);
    }

    #[test]
    fn token_rows_grouped_by_id_in_order() {
        let (csr, u) = token_csr(&[7, 2, 7, 9, 2, 7]);
        assert_eq!(u, 3);
        // rows | starts | ids
        assert_eq!(csr, [1, 4, 0, 2, 5, 3, 0, 2, 5, 6, 2, 7, 9]);
        let (csr, u) = token_csr(&[4]);
        assert_eq!((csr, u), (vec![0, 0, 1, 4], 1));
    }
}
