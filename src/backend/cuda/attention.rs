//! Host side of `kernels/attention.cu`: causal (optionally sliding-window, optionally
//! soft-capped) attention with GQA over packed variable-length sequences, forward and
//! deterministic backward; and of `kernels/attention_decode.cu`: attention against a key/value
//! cache for generation ([`attention_cached`], planned by [`cached_plan`]).
//!
//! Kernel choice: bf16 with `head_dim` 64 or 128 runs the tensor-core (FlashAttention-2 style)
//! kernels `*_hd64_bf16` / `*_hd128_bf16`; every other case (f32, or bf16 with another head
//! dim up to [`MAX_GENERIC_HEAD_DIM`], including Gemma-2's 256 for now) runs the generic
//! warp-per-row kernels, which are simple, exact f32-accumulating FMA code (slow: they exist for
//! tests and unusual head dims).
//!
//! Assumptions shared by both functions (each is checked and reported as an error):
//! - layouts as in [`crate::backend::Backend::attention_fwd`]: with `n = seqs.rows()`, `q`,
//!   `out`, `dq`, `dout`: `[n, n_heads*head_dim]`; `k`, `v`, `dk`, `dv`:
//!   `[n, n_kv_heads*head_dim]`; `lse`: f32 `[n_heads, n]`; every buffer has exactly that many
//!   elements;
//! - `seqs`: host offsets starting at 0 and rising (no empty sequence), `max_len` their longest
//!   sequence, `cu_dev` holding `n_seqs + 1` i32 and `pos_dev` `n` (lengths checked; the device
//!   values are the ones [`crate::backend::Backend::seqs`] uploaded with the host copy, which
//!   is not re-read from the device);
//! - `n_heads` is a multiple of `n_kv_heads`; `head_dim <= 256`; `window`, when given, is >= 1
//!   (a window of `max_len` or more is the same as none); `scale` finite; `softcap`, when
//!   given, finite and > 0;
//! - sizes fit the kernels' 32-bit indices (`n`, `n*n_heads`, `n_heads*head_dim` below 2³¹) and
//!   CUDA's grid limits (`n_heads`, `n_seqs` <= 65535).
//! - alignment: the tensor-core kernels copy rows in 16-byte chunks, which needs `head_dim` to be
//!   a multiple of 8 (true for 64 and 128) and every buffer to start 16-byte aligned; buffers are
//!   whole `CudaSlice`s, which cuMemAlloc aligns to 256 bytes. The generic kernels need nothing.
//!
//! Grids are (tiles of `max_len`, heads, `n_seqs`): a CTA whose tile starts past its sequence's
//! end returns at once, so a packed batch of unequal lengths costs some empty CTAs (as
//! FlashAttention's varlen kernels do).
//!
//! Determinism: no atomics anywhere; the same call on the same inputs is bit-identical, and a
//! sequence's outputs depend only on its own rows (not on its neighbours in the packed batch).
//! `attention_bwd` allocates its `Δ = rowsum(dO ∘ O)` scratch (`n_heads*n` f32) on every
//! call; a caller that wants no allocation in the training step can later pass a workspace.

use super::runtime::{DeviceElem, Runtime};
use crate::backend::{AttnShape, CacheShape, Seqs};
use anyhow::{bail, ensure, Context, Result};
use cudarc::driver::{sys::CUfunction_attribute, CudaSlice, LaunchConfig, PushKernelArg};

/// Largest head dim the generic kernels support (8 accumulators per lane, `ATTN_GEN_MAXD`).
pub const MAX_GENERIC_HEAD_DIM: usize = 256;

/// The kernel module of the training kernels (`kernels/attention.cu`).
pub const MODULE: &str = "attention";
/// The kernel module of the key/value-cache kernels (`kernels/attention_decode.cu`).
pub const DECODE_MODULE: &str = "attention_decode";

/// Threads per CTA of every attention kernel (`ATTN_THREADS`).
pub const THREADS: u32 = 128;
/// Rows (query or key) per CTA of the tensor-core kernels and of the generic kernels.
const TILE: usize = 64;
const GENERIC_ROWS: usize = 4;
/// Dynamic shared memory a kernel may use without opting in.
const DEFAULT_SMEM_LIMIT: u32 = 48 * 1024;

/// Which implementation serves a call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Path {
    /// Tensor-core kernels for this head dim (64 or 128), bf16 only.
    Mma(usize),
    /// Warp-per-row kernels, any element type.
    Generic,
}

impl Path {
    fn select(suffix: &str, head_dim: usize) -> Path {
        // head_dim 256 (Gemma-2) takes the generic kernels until a tensor-core path exists.
        if suffix == "bf16" && (head_dim == 64 || head_dim == 128) {
            Path::Mma(head_dim)
        } else {
            Path::Generic
        }
    }

    /// `attention_<family>[_hd<D>]_<suffix>`.
    fn kernel(self, family: &str, suffix: &str) -> String {
        match self {
            Path::Mma(d) => format!("attention_{family}_hd{d}_{suffix}"),
            Path::Generic => format!("attention_{family}_{suffix}"),
        }
    }
}

/// One kernel launch: module, name, grid, dynamic shared memory (blocks of [`THREADS`]). Public
/// so the emulated-kernel tests (tests/cuda_emulated_attention.rs) launch exactly what the
/// backend launches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Launch {
    /// [`MODULE`] or [`DECODE_MODULE`].
    pub module: &'static str,
    pub name: String,
    pub grid: (u32, u32, u32),
    pub smem: u32,
}

impl Launch {
    fn config(&self) -> LaunchConfig {
        LaunchConfig {
            grid_dim: self.grid,
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: self.smem,
        }
    }
}

/// Bytes of one shared-memory tile of `rows` rows of `d` bf16, padded to `d + 8` per row.
fn tile_bytes(rows: usize, d: usize) -> usize {
    rows * (d + 8) * 2
}

/// Query rows per inner tile of the dK/dV kernel, and key rows per tile of the dQ kernel
/// (`AttnBwdTile<D>::SMALL`): smaller for D = 128 to stay within the register file.
fn bwd_small_tile(d: usize) -> usize {
    if d >= 128 {
        32
    } else {
        64
    }
}

/// The launch of [`attention_fwd`] for `shape`, the sequences `seqs` and element type `suffix`.
pub fn forward_launch<I>(shape: &AttnShape, seqs: &Seqs<I>, suffix: &str) -> Launch {
    let path = Path::select(suffix, shape.head_dim);
    let (rows_per_cta, smem) = match path {
        // Two (K, V) buffers; the Q tile is staged in the first K buffer.
        Path::Mma(d) => (TILE, 4 * tile_bytes(TILE, d)),
        Path::Generic => (GENERIC_ROWS, 0),
    };
    Launch {
        module: MODULE,
        name: path.kernel("fwd", suffix),
        grid: (
            seqs.max_len.div_ceil(rows_per_cta) as u32,
            shape.n_heads as u32,
            seqs.n_seqs() as u32,
        ),
        smem: smem as u32,
    }
}

/// The three backward launches of [`attention_bwd`]: preprocess (Δ), dK/dV, dQ.
pub fn backward_launches<I>(shape: &AttnShape, seqs: &Seqs<I>, suffix: &str) -> [Launch; 3] {
    let path = Path::select(suffix, shape.head_dim);
    let pre_warps = seqs.rows() * shape.n_heads;
    let pre = Launch {
        module: MODULE,
        name: format!("attention_bwd_preprocess_{suffix}"),
        grid: (pre_warps.div_ceil(GENERIC_ROWS) as u32, 1, 1),
        smem: 0,
    };
    let (rows_per_cta, dkdv_smem, dq_smem) = match path {
        Path::Mma(d) => {
            let bm = bwd_small_tile(d);
            // K, V (64 rows) + two buffers of Q, dO (bm rows) and of lse, Δ (bm floats each).
            let dkdv = 2 * tile_bytes(TILE, d) + 4 * tile_bytes(bm, d) + 4 * bm * 4;
            // Q and dO staged (64 rows each), then two buffers of K, V (bm rows each) in the
            // same space.
            let dq = tile_bytes((2 * TILE).max(4 * bm), d);
            (TILE, dkdv, dq)
        }
        Path::Generic => (GENERIC_ROWS, 0, 0),
    };
    let tiles = seqs.max_len.div_ceil(rows_per_cta) as u32;
    let n_seqs = seqs.n_seqs() as u32;
    let dkdv = Launch {
        module: MODULE,
        name: path.kernel("bwd_dkdv", suffix),
        grid: (tiles, shape.n_kv_heads as u32, n_seqs),
        smem: dkdv_smem as u32,
    };
    let dq = Launch {
        module: MODULE,
        name: path.kernel("bwd_dq", suffix),
        grid: (tiles, shape.n_heads as u32, n_seqs),
        smem: dq_smem as u32,
    };
    [pre, dkdv, dq]
}

/// Scalars every training attention kernel takes after its buffers and `cu`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Scalars {
    /// Rows of every sequence together (`seqs.rows()`).
    pub n: i32,
    pub n_heads: i32,
    pub n_kv_heads: i32,
    pub head_dim: i32,
    /// 0 = no window (also for a window of `max_len` or more).
    pub window: i32,
    pub scale: f32,
    /// 0 = no soft cap.
    pub softcap: f32,
}

/// Validate the heads of `shape` (shared by training and decoding): counts, head dim, window,
/// scale and soft cap. `op` names the caller in the message.
fn check_heads(op: &str, shape: &AttnShape) -> Result<()> {
    let AttnShape {
        n_heads,
        n_kv_heads,
        head_dim,
        window,
        scale,
        softcap,
    } = *shape;
    ensure!(
        n_heads > 0 && n_kv_heads > 0 && head_dim > 0,
        "{op}: n_heads ({n_heads}), n_kv_heads ({n_kv_heads}) and head_dim ({head_dim}) \
         must be positive"
    );
    ensure!(
        n_heads.is_multiple_of(n_kv_heads),
        "{op}: n_heads ({n_heads}) is not a multiple of n_kv_heads ({n_kv_heads})"
    );
    ensure!(
        head_dim <= MAX_GENERIC_HEAD_DIM,
        "{op}: head_dim {head_dim} is above the supported maximum {MAX_GENERIC_HEAD_DIM}"
    );
    if window == Some(0) {
        bail!("{op}: a sliding window of 0 lets a query see no key; use None for no window");
    }
    ensure!(
        scale.is_finite(),
        "{op}: the score scale {scale} is not finite"
    );
    if let Some(c) = softcap {
        ensure!(
            c.is_finite() && c > 0.0,
            "{op}: the soft cap {c} must be finite and positive (None for no cap)"
        );
    }
    ensure!(
        n_heads.saturating_mul(head_dim) <= i32::MAX as usize,
        "{op}: n_heads*head_dim exceeds the kernels' 32-bit indices"
    );
    Ok(())
}

/// Validate `shape` and `seqs` (see the module docs; `cu_len`, `pos_len`: the lengths of the
/// device copies of the offsets and positions) and derive the kernels' scalar arguments.
pub fn check_shape<I>(
    shape: &AttnShape,
    seqs: &Seqs<I>,
    cu_len: usize,
    pos_len: usize,
) -> Result<Scalars> {
    check_heads("attention", shape)?;
    let cu = &seqs.cu;
    ensure!(
        cu.first() == Some(&0) && cu.windows(2).all(|w| w[0] < w[1]),
        "attention: sequence offsets {cu:?} must start at 0 and rise (no empty sequence)"
    );
    let (n, n_seqs) = (seqs.rows(), seqs.n_seqs());
    let longest = seqs.lens().max().unwrap_or(0);
    ensure!(
        seqs.max_len == longest,
        "attention: max_len {} but the longest sequence has {longest} rows",
        seqs.max_len
    );
    ensure!(
        cu_len == n_seqs + 1,
        "attention: {cu_len} sequence offsets on the device, expected {} (n_seqs + 1)",
        n_seqs + 1
    );
    ensure!(
        pos_len == n,
        "attention: {pos_len} positions on the device, expected one per row ({n})"
    );
    let i32_max = i32::MAX as usize;
    ensure!(
        n.saturating_mul(shape.n_heads) <= i32_max,
        "attention: {n} rows x {} heads exceed the kernels' 32-bit indices",
        shape.n_heads
    );
    ensure!(
        shape.n_heads <= 65535 && n_seqs <= 65535,
        "attention: n_heads ({}) and the number of sequences ({n_seqs}) must be at most 65535 \
         (CUDA grid)",
        shape.n_heads
    );
    let window = match shape.window {
        Some(w) if w < seqs.max_len => w as i32,
        _ => 0,
    };
    Ok(Scalars {
        n: n as i32,
        n_heads: shape.n_heads as i32,
        n_kv_heads: shape.n_kv_heads as i32,
        head_dim: shape.head_dim as i32,
        window,
        scale: shape.scale,
        softcap: shape.softcap.unwrap_or(0.0),
    })
}

/// The rule of [`crate::backend::check_len`] (exactly the elements the shape gives), reported
/// as an error naming the layout, as every check of this module is.
fn ensure_len(what: &str, actual: usize, expected: usize, layout: &str) -> Result<()> {
    ensure!(
        actual == expected,
        "attention: {what} has {actual} elements, expected {expected} ({layout})"
    );
    Ok(())
}

/// Look up `launch`'s kernel and, when it asks for more than 48 KB of dynamic shared memory,
/// raise the kernel's limit (sm_80 allows up to 163 KB, sm_90 227 KB).
fn prepare(rt: &Runtime, launch: &Launch) -> Result<cudarc::driver::CudaFunction> {
    let f = rt.function(launch.module, &launch.name)?;
    if launch.smem > DEFAULT_SMEM_LIMIT {
        f.set_attribute(
            CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            launch.smem as i32,
        )
        .with_context(|| {
            format!(
                "allowing {} B of dynamic shared memory for {}",
                launch.smem, launch.name
            )
        })?;
    }
    Ok(f)
}

/// Push the scalars after the buffers and `cu` (the tail of `ATTN_*_ARGS`).
fn push_scalars<'a>(args: &mut cudarc::driver::LaunchArgs<'a>, s: &'a Scalars) {
    args.arg(&s.n)
        .arg(&s.n_heads)
        .arg(&s.n_kv_heads)
        .arg(&s.head_dim)
        .arg(&s.window)
        .arg(&s.scale)
        .arg(&s.softcap);
}

/// Forward attention: writes `out` (`[n, n_heads*head_dim]`) and `lse` (f32 `[n_heads, n]`,
/// natural-log log-sum-exp of each query row's final scores).
///
/// Causal within each sequence of `seqs`, with optional sliding window (query `i` sees keys `j`
/// of its own sequence with `i - window < j <= i`), GQA (head `h` reads kv head
/// `h / (n_heads / n_kv_heads)`), scores `scale·q·k`, soft-capped when `shape.softcap` is set.
/// Queued on `rt.stream`; nothing is synchronised. See the module docs for every assumption.
#[allow(clippy::too_many_arguments)]
pub fn attention_fwd<T: DeviceElem>(
    rt: &Runtime,
    out: &mut CudaSlice<T>,
    lse: &mut CudaSlice<f32>,
    q: &CudaSlice<T>,
    k: &CudaSlice<T>,
    v: &CudaSlice<T>,
    seqs: &Seqs<CudaSlice<i32>>,
    shape: &AttnShape,
) -> Result<()> {
    let s = check_shape(shape, seqs, seqs.cu_dev.len(), seqs.pos_dev.len())?;
    let n = seqs.rows();
    let (nq, nkv) = (n * shape.q_width(), n * shape.kv_width());
    let q_layout = "[n, n_heads*head_dim]";
    let kv_layout = "[n, n_kv_heads*head_dim]";
    ensure_len("q", q.len(), nq, q_layout)?;
    ensure_len("k", k.len(), nkv, kv_layout)?;
    ensure_len("v", v.len(), nkv, kv_layout)?;
    ensure_len("out", out.len(), nq, q_layout)?;
    ensure_len("lse", lse.len(), shape.n_heads * n, "[n_heads, n]")?;
    if n == 0 {
        return Ok(());
    }

    let launch = forward_launch(shape, seqs, T::SUFFIX);
    let f = prepare(rt, &launch)?;
    let mut args = rt.stream.launch_builder(&f);
    args.arg(out)
        .arg(lse)
        .arg(q)
        .arg(k)
        .arg(v)
        .arg(&seqs.cu_dev);
    push_scalars(&mut args, &s);
    // SAFETY: the arguments match ATTN_FWD_ARGS (out, lse, q, k, v, cu, then five i32 and two
    // f32) in order and type; every buffer length was checked against `shape` and `seqs` above,
    // cu_dev holds n_seqs + 1 offsets rising from 0 to n (the host copy was checked; the device
    // copy is its upload), and the kernel indexes only rows cu[z] .. cu[z+1] of sequence z, heads
    // < n_heads (kv heads < n_kv_heads) and columns < head_dim; the grid (n_seqs in z, max_len
    // tiles in x) and shared memory come from `forward_launch`, which mirrors the kernel's tile
    // constants.
    unsafe { rt.launch(&launch.name, launch.config(), args) }
}

/// Backward of [`attention_fwd`]: overwrites `dq` (like `q`), `dk`, `dv` (like `k`, `v`) given
/// `dout` (like `out`) and the forward's `out` and `lse`.
///
/// Deterministic (no atomics; the GQA sum over a kv head's query heads runs inside the dK/dV
/// kernel in a fixed order). Three launches: `Δ = rowsum(dO ∘ O)` into a scratch buffer allocated
/// per call (`n_heads*n` f32), then dK/dV (one CTA per key tile, kv head and sequence), then dQ
/// (one CTA per query tile, head and sequence). Same assumptions as [`attention_fwd`].
#[allow(clippy::too_many_arguments)]
pub fn attention_bwd<T: DeviceElem>(
    rt: &Runtime,
    dq: &mut CudaSlice<T>,
    dk: &mut CudaSlice<T>,
    dv: &mut CudaSlice<T>,
    dout: &CudaSlice<T>,
    out: &CudaSlice<T>,
    lse: &CudaSlice<f32>,
    q: &CudaSlice<T>,
    k: &CudaSlice<T>,
    v: &CudaSlice<T>,
    seqs: &Seqs<CudaSlice<i32>>,
    shape: &AttnShape,
) -> Result<()> {
    let s = check_shape(shape, seqs, seqs.cu_dev.len(), seqs.pos_dev.len())?;
    let n = seqs.rows();
    let (nq, nkv) = (n * shape.q_width(), n * shape.kv_width());
    let q_layout = "[n, n_heads*head_dim]";
    let kv_layout = "[n, n_kv_heads*head_dim]";
    ensure_len("q", q.len(), nq, q_layout)?;
    ensure_len("k", k.len(), nkv, kv_layout)?;
    ensure_len("v", v.len(), nkv, kv_layout)?;
    ensure_len("out", out.len(), nq, q_layout)?;
    ensure_len("dout", dout.len(), nq, q_layout)?;
    ensure_len("dq", dq.len(), nq, q_layout)?;
    ensure_len("dk", dk.len(), nkv, kv_layout)?;
    ensure_len("dv", dv.len(), nkv, kv_layout)?;
    let n_stats = shape.n_heads * n;
    ensure_len("lse", lse.len(), n_stats, "[n_heads, n]")?;
    if n == 0 {
        return Ok(());
    }

    let [pre, dkdv, dql] = backward_launches(shape, seqs, T::SUFFIX);
    let mut delta = rt.alloc_zeros::<f32>(n_stats, || {
        "allocating the attention backward's Δ scratch".to_string()
    })?;

    let f = prepare(rt, &pre)?;
    let mut args = rt.stream.launch_builder(&f);
    args.arg(&mut delta)
        .arg(dout)
        .arg(out)
        .arg(&s.n)
        .arg(&s.n_heads)
        .arg(&s.head_dim);
    // SAFETY: matches attention_bwd_preprocess_* (delta, dout, out, rows, n_heads, head_dim);
    // `delta` has n_heads*n elements and dout/out were checked above; one warp per (row, head),
    // warps past n*n_heads return.
    unsafe { rt.launch(&pre.name, pre.config(), args) }?;

    let f = prepare(rt, &dkdv)?;
    let mut args = rt.stream.launch_builder(&f);
    args.arg(dk)
        .arg(dv)
        .arg(dout)
        .arg(lse)
        .arg(&delta)
        .arg(q)
        .arg(k)
        .arg(v)
        .arg(&seqs.cu_dev);
    push_scalars(&mut args, &s);
    // SAFETY: matches ATTN_DKDV_ARGS in order and type; lengths and offsets checked above; grid
    // and shared memory from `backward_launches`, mirroring the kernel's tile constants.
    unsafe { rt.launch(&dkdv.name, dkdv.config(), args) }?;

    let f = prepare(rt, &dql)?;
    let mut args = rt.stream.launch_builder(&f);
    args.arg(dq)
        .arg(dout)
        .arg(lse)
        .arg(&delta)
        .arg(q)
        .arg(k)
        .arg(v)
        .arg(&seqs.cu_dev);
    push_scalars(&mut args, &s);
    // SAFETY: matches ATTN_DQ_ARGS in order and type; lengths and offsets checked above; grid
    // and shared memory from `backward_launches`.
    unsafe { rt.launch(&dql.name, dql.config(), args) }?;
    // `delta` is freed on drop; cudarc orders the free after the queued kernels on this stream.
    Ok(())
}

// ---- generation: attention against a key/value cache -------------------------------------------

/// Query vectors (new rows x query heads of one kv head) per CTA of `attention_cached_*`
/// (`ACACHE_QMAX` in attention_decode.cu).
const CACHED_QMAX: usize = 8;
/// Key tiles the cached kernel takes, largest first (`ACACHE_MAX_KT` is the first); each divides
/// [`THREADS`].
const CACHED_KEY_TILES: [usize; 3] = [64, 32, 16];
/// Shared memory budget of the double-buffered K/V staging when picking the key tile: with the
/// rest (~6 KB) it leaves room for three CTAs per SM on Hopper, two on Ampere.
const CACHED_KV_SMEM: usize = 72 * 1024;
/// CTAs per SM the key-split heuristic aims for (enough loads in flight to stream the cache).
const CACHED_CTAS_PER_SM: usize = 2;
/// Most key splits of one call (bounds the workspace and the combine's loop).
const CACHED_MAX_SPLITS: usize = 64;

/// How one [`attention_cached`] call is cut into CTAs, from [`cached_plan`] (the numbers are the
/// kernel's `rows_per_cta`, `heads_per_cta`, `splits` and `kt` arguments).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CachedPlan {
    /// New rows of one sequence per CTA (1 when decoding).
    pub rows_per_cta: usize,
    /// Query heads of one kv head per CTA (the whole group unless it exceeds 8).
    pub heads_per_cta: usize,
    /// Pieces the key range of each CTA's rows is cut into (1 unless the grid would not fill
    /// the GPU); their partial results are merged by a second kernel.
    pub splits: usize,
    /// Keys per shared-memory tile.
    pub key_tile: usize,
    /// f32 elements of workspace the splits need (0 when `splits == 1`).
    pub workspace: usize,
    /// Integer scalars of the attention kernel: window (0 = none).
    pub window: i32,
    /// The launches: cache append, attention, split merge (when `splits > 1`).
    pub append: Launch,
    pub attend: Launch,
    pub combine: Option<Launch>,
}

/// Validate a cached-attention shape (mirrors the CPU reference's checks, plus the kernels'
/// 32-bit indices and grid limits) and plan its launches for a GPU with `sm_count` SMs.
///
/// The key split depends on `sm_count`, so results are bit-identical run to run on one GPU
/// model but may differ in the last bits between GPUs with different SM counts.
pub fn cached_plan(shape: &CacheShape, suffix: &str, sm_count: usize) -> Result<CachedPlan> {
    let CacheShape {
        batch,
        new,
        past,
        cap,
        heads,
    } = *shape;
    check_heads("attention_cached", &heads)?;
    let AttnShape {
        n_heads,
        n_kv_heads,
        head_dim,
        window,
        ..
    } = heads;
    ensure!(
        past + new <= cap,
        "attention_cached: {past} cached + {new} new rows exceed the capacity {cap}"
    );
    ensure!(
        cap < 1 << 30
            && n_heads.saturating_mul(head_dim) <= i32::MAX as usize
            && batch.saturating_mul(new) <= i32::MAX as usize,
        "attention_cached: shape {shape:?} exceeds the kernels' 32-bit indices"
    );

    let elem = if suffix == "f32" { 4 } else { 2 };
    let vec = 16 / elem;
    let dpad = head_dim.div_ceil(vec) * vec;
    // Shared K/V rows are an odd number of 16-byte chunks apart (bank-conflict-free reads).
    let sd = ((dpad / vec) | 1) * vec;
    let kv_bytes = |kt: usize| 4 * kt * sd * elem;
    let key_tile = CACHED_KEY_TILES
        .into_iter()
        .find(|&kt| kv_bytes(kt) <= CACHED_KV_SMEM)
        .unwrap_or(CACHED_KEY_TILES[2]);
    let smem = kv_bytes(key_tile) + 4 * CACHED_QMAX * (dpad + key_tile + 3);

    let group = n_heads / n_kv_heads;
    // As few head chunks as the CTA's query vectors allow, of near-equal size, none empty.
    let heads_per_cta = group.div_ceil(group.div_ceil(CACHED_QMAX));
    let hchunks = group.div_ceil(heads_per_cta);
    let rows_per_cta = (CACHED_QMAX / heads_per_cta).clamp(1, new.max(1));
    let row_tiles = new.div_ceil(rows_per_cta);
    ensure!(
        n_kv_heads * hchunks <= 65535 && batch <= 65535,
        "attention_cached: n_kv_heads ({n_kv_heads}) x head chunks ({hchunks}) and batch \
         ({batch}) must be at most 65535 (CUDA grid)"
    );
    let ctas = row_tiles * n_kv_heads * hchunks * batch;
    // Keys one CTA may visit: the union of its rows' ranges.
    let keys = (past + new).min(window.map_or(usize::MAX, |w| w.saturating_add(rows_per_cta - 1)));
    let target = CACHED_CTAS_PER_SM * sm_count.max(1);
    let splits = if ctas == 0 || ctas >= target {
        1
    } else {
        target
            .div_ceil(ctas)
            .min(keys.div_ceil(key_tile))
            .clamp(1, CACHED_MAX_SPLITS)
    };
    let rows = batch * new;
    let kv_width = n_kv_heads * head_dim;
    let append_items = rows
        * if kv_width.is_multiple_of(vec) {
            kv_width / vec
        } else {
            kv_width
        };
    let flat = |items: usize| {
        (
            items.div_ceil(THREADS as usize).clamp(1, 65535) as u32,
            1,
            1,
        )
    };
    Ok(CachedPlan {
        rows_per_cta,
        heads_per_cta,
        splits,
        key_tile,
        workspace: if splits > 1 {
            splits * rows * n_heads * (head_dim + 2)
        } else {
            0
        },
        window: window.map_or(0, |w| w.min(i32::MAX as usize) as i32),
        append: Launch {
            module: DECODE_MODULE,
            name: format!("attention_cache_append_{suffix}"),
            grid: flat(append_items),
            smem: 0,
        },
        attend: Launch {
            module: DECODE_MODULE,
            name: format!("attention_cached_{suffix}"),
            grid: (
                (row_tiles * splits) as u32,
                (n_kv_heads * hchunks) as u32,
                batch as u32,
            ),
            smem: smem as u32,
        },
        combine: (splits > 1).then(|| Launch {
            module: DECODE_MODULE,
            name: format!("attention_cached_combine_{suffix}"),
            grid: flat(rows * n_heads * head_dim),
            smem: 0,
        }),
    })
}

/// Attention of new rows against a per-sequence key/value cache, as
/// [`crate::backend::Backend::attention_cached`] specifies: appends `k`, `v` (`[batch*new,
/// kv_width]`) to timeline rows `past .. past+new` of `k_cache`, `v_cache` (`[batch*cap,
/// kv_width]`), then writes `out` (`[batch*new, q_width]`). `start` holds the `batch` first
/// timeline rows of the sequences (device copy); `workspace` holds at least
/// `plan.workspace` f32 (needed only when `plan.splits > 1`). `plan` must come from
/// [`cached_plan`] for this `shape` and `T::SUFFIX`.
///
/// Scores as in training, from `shape.heads`: `scale·q·k`, soft-capped when `softcap` is set.
/// Three launches on `rt.stream` (append, attention, and the split merge when there are splits);
/// nothing is synchronised. Deterministic for a given plan.
#[allow(clippy::too_many_arguments)]
pub fn attention_cached<T: DeviceElem>(
    rt: &Runtime,
    plan: &CachedPlan,
    out: &mut CudaSlice<T>,
    q: &CudaSlice<T>,
    k: &CudaSlice<T>,
    v: &CudaSlice<T>,
    k_cache: &mut CudaSlice<T>,
    v_cache: &mut CudaSlice<T>,
    start: &CudaSlice<u32>,
    workspace: Option<&CudaSlice<f32>>,
    shape: &CacheShape,
) -> Result<()> {
    let rows = shape.batch * shape.new;
    let h = &shape.heads;
    let (nq, nkv) = (rows * h.q_width(), rows * h.kv_width());
    let q_layout = "[batch*new, n_heads*head_dim]";
    let kv_layout = "[batch*new, n_kv_heads*head_dim]";
    ensure_len("q", q.len(), nq, q_layout)?;
    ensure_len("k", k.len(), nkv, kv_layout)?;
    ensure_len("v", v.len(), nkv, kv_layout)?;
    ensure_len("out", out.len(), nq, q_layout)?;
    let cache_len = shape.batch * shape.cap * h.kv_width();
    let cache_layout = "[batch*cap, n_kv_heads*head_dim]";
    ensure_len("k_cache", k_cache.len(), cache_len, cache_layout)?;
    ensure_len("v_cache", v_cache.len(), cache_len, cache_layout)?;
    ensure!(
        start.len() >= shape.batch,
        "attention_cached: {} sequence starts on the device for a batch of {}",
        start.len(),
        shape.batch
    );
    let ws_len = workspace.map_or(0, |w| w.len());
    ensure!(
        ws_len >= plan.workspace,
        "attention_cached: workspace of {ws_len} f32, the plan needs {}",
        plan.workspace
    );
    if rows == 0 {
        return Ok(());
    }
    let (new, past, cap) = (shape.new as i32, shape.past as i32, shape.cap as i32);
    let (n_heads, n_kv_heads, head_dim) =
        (h.n_heads as i32, h.n_kv_heads as i32, h.head_dim as i32);
    let kv_ld = h.kv_width() as i32;

    let f = prepare(rt, &plan.append)?;
    let rows_ll = rows as i64;
    let mut args = rt.stream.launch_builder(&f);
    args.arg(&mut *k_cache)
        .arg(&mut *v_cache)
        .arg(k)
        .arg(v)
        .arg(&rows_ll)
        .arg(&new)
        .arg(&past)
        .arg(&cap)
        .arg(&kv_ld);
    // SAFETY: matches ATTN_APPEND_ARGS (k_cache, v_cache, k, v, long long rows, then four i32);
    // k, v hold rows·kv_ld and the caches batch·cap·kv_ld elements (checked), and every written
    // row b·cap + past + i < b·cap + cap since past + new <= cap (checked by cached_plan).
    unsafe { rt.launch(&plan.append.name, plan.append.config(), args) }?;

    let ws_ptr = workspace.map_or(0u64, |w| rt.ptr(w));
    let start_ptr = rt.ptr(start);
    let (scale, softcap) = (h.scale, h.softcap.unwrap_or(0.0));
    let (rows_per_cta, heads_per_cta, splits, kt) = (
        plan.rows_per_cta as i32,
        plan.heads_per_cta as i32,
        plan.splits as i32,
        plan.key_tile as i32,
    );
    let f = prepare(rt, &plan.attend)?;
    let mut args = rt.stream.launch_builder(&f);
    args.arg(&mut *out)
        .arg(&ws_ptr)
        .arg(q)
        .arg(&*k_cache)
        .arg(&*v_cache)
        .arg(&start_ptr)
        .arg(&new)
        .arg(&past)
        .arg(&cap)
        .arg(&n_heads)
        .arg(&n_kv_heads)
        .arg(&head_dim)
        .arg(&plan.window)
        .arg(&scale)
        .arg(&softcap)
        .arg(&rows_per_cta)
        .arg(&heads_per_cta)
        .arg(&splits)
        .arg(&kt);
    // SAFETY: matches ATTN_CACHED_ARGS in order and type; q, out, caches checked above, start
    // holds >= batch u32; with splits > 1 the workspace holds splits·rows·n_heads·(head_dim + 2)
    // f32 (checked against the plan), which is what the kernel indexes; the grid and shared
    // memory come from cached_plan, which mirrors the kernel's layout (the kernel traps if the
    // shared memory is short). The kernel reads cache rows < past + new of each sequence only.
    unsafe { rt.launch(&plan.attend.name, plan.attend.config(), args) }?;

    if let Some(combine) = &plan.combine {
        let f = prepare(rt, combine)?;
        let rows_i = rows as i32;
        let mut args = rt.stream.launch_builder(&f);
        args.arg(&mut *out)
            .arg(&ws_ptr)
            .arg(&rows_i)
            .arg(&n_heads)
            .arg(&head_dim)
            .arg(&splits);
        // SAFETY: matches ATTN_COMBINE_ARGS; out holds rows·n_heads·head_dim elements and the
        // workspace the splits' outputs and (m, l) pairs written by the launch above.
        unsafe { rt.launch(&combine.name, combine.config(), args) }?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cuda::compile::{self, Output};

    fn shape(n_heads: usize, n_kv_heads: usize, head_dim: usize) -> AttnShape {
        AttnShape::plain(n_heads, n_kv_heads, head_dim, None)
    }

    /// Host-only sequences (the launch plans read only the host offsets).
    fn seqs(lens: &[usize]) -> Seqs<()> {
        let mut cu = vec![0];
        for &l in lens {
            cu.push(cu[cu.len() - 1] + l);
        }
        Seqs {
            cu,
            max_len: lens.iter().copied().max().unwrap_or(0),
            cu_dev: (),
            pos_dev: (),
        }
    }

    /// `check_shape` with device copies of the right lengths.
    fn check(shape: &AttnShape, s: &Seqs<()>) -> Result<Scalars> {
        check_shape(shape, s, s.cu.len(), s.rows())
    }

    #[test]
    fn picks_tensor_core_kernels_only_for_bf16_64_and_128() {
        let s = seqs(&[100, 100]);
        assert_eq!(
            forward_launch(&shape(9, 3, 64), &s, "bf16").name,
            "attention_fwd_hd64_bf16"
        );
        assert_eq!(
            forward_launch(&shape(8, 2, 128), &s, "bf16").name,
            "attention_fwd_hd128_bf16"
        );
        assert_eq!(
            forward_launch(&shape(8, 2, 96), &s, "bf16").name,
            "attention_fwd_bf16"
        );
        // Gemma-2's head_dim 256: the generic kernels for now.
        assert_eq!(
            forward_launch(&shape(8, 4, 256), &s, "bf16").name,
            "attention_fwd_bf16"
        );
        assert_eq!(
            forward_launch(&shape(8, 2, 64), &s, "f32").name,
            "attention_fwd_f32"
        );
        let [p, a, b] = backward_launches(&shape(8, 2, 128), &s, "bf16");
        assert_eq!(p.name, "attention_bwd_preprocess_bf16");
        assert_eq!(a.name, "attention_bwd_dkdv_hd128_bf16");
        assert_eq!(b.name, "attention_bwd_dq_hd128_bf16");
    }

    #[test]
    fn launch_geometry_covers_every_row() {
        // Longest sequence 100 rows: two 64-row tiles (the second one partial), one z per
        // sequence; generic: 25 warps-of-4. The short sequences' second tile returns at once.
        let s = seqs(&[100, 7, 64]);
        let l = forward_launch(&shape(9, 3, 64), &s, "bf16");
        assert_eq!(l.grid, (2, 9, 3));
        assert_eq!(l.smem, 4 * 64 * 72 * 2); // two (K, V) buffers of 64 rows
        let l = forward_launch(&shape(9, 3, 24), &s, "bf16");
        assert_eq!((l.grid, l.smem), ((25, 9, 3), 0));

        let s = seqs(&[129, 1]);
        let [p, a, b] = backward_launches(&shape(8, 2, 128), &s, "bf16");
        // Preprocess: one warp per (row, head) over all 130 rows.
        assert_eq!(p.grid, ((130 * 8usize).div_ceil(4) as u32, 1, 1));
        // One dK/dV CTA per 64 keys, kv head and sequence; one dQ CTA per 64 queries, head and
        // sequence.
        assert_eq!(a.grid, (3, 2, 2));
        assert_eq!(b.grid, (3, 8, 2));
        // dK/dV at D=128: K, V 64x136 and two buffers of Q, dO 32x136 (bf16) and of lse, delta
        // (32 floats each).
        assert_eq!(a.smem, (2 * 64 + 4 * 32) * 136 * 2 + 4 * 32 * 4);
        assert!(a.smem > DEFAULT_SMEM_LIMIT, "needs the opt-in attribute");
        // dQ at D=128: the Q, dO staging (2 x 64 rows) equals four K/V buffers of 32 rows.
        assert_eq!(b.smem, 2 * 64 * 136 * 2);

        let [_, a, b] = backward_launches(&shape(4, 4, 64), &seqs(&[64]), "bf16");
        assert_eq!(a.smem, 384 * 72 * 2 + 4 * 64 * 4);
        assert_eq!(b.smem, 4 * 64 * 72 * 2);
    }

    #[test]
    fn rejects_bad_shapes() {
        let q = seqs(&[10, 4]);
        assert!(check(&shape(6, 4, 64), &q).is_err()); // 6 heads over 4 kv heads
        assert!(check(&shape(4, 4, 512), &q).is_err()); // head dim too large
        let mut s = shape(4, 2, 64);
        s.window = Some(0);
        assert!(check(&s, &q).is_err());
        s.window = Some(10); // as long as the longest sequence: no window
        assert_eq!(check(&s, &q).unwrap().window, 0);
        s.window = Some(3);
        let sc = check(&s, &q).unwrap();
        assert_eq!((sc.window, sc.n, sc.softcap), (3, 14, 0.0));
        assert_eq!(sc.scale, 0.125);
        // Scale and soft cap: any finite scale; a cap finite and positive.
        let g = AttnShape {
            scale: 0.0625,
            softcap: Some(50.0),
            ..s
        };
        assert_eq!(check(&g, &q).unwrap().softcap, 50.0);
        for bad in [
            AttnShape {
                scale: f32::NAN,
                ..g
            },
            AttnShape {
                scale: f32::INFINITY,
                ..g
            },
            AttnShape {
                softcap: Some(0.0),
                ..g
            },
            AttnShape {
                softcap: Some(-3.0),
                ..g
            },
            AttnShape {
                softcap: Some(f32::INFINITY),
                ..g
            },
        ] {
            assert!(check(&bad, &q).is_err(), "{bad:?}");
        }
        // Offsets and device copies.
        let sh = shape(4, 2, 64);
        assert!(check_shape(&sh, &q, 2, 14).is_err()); // cu_dev too short
        assert!(check_shape(&sh, &q, 3, 13).is_err()); // pos_dev too short
        let mut bad = seqs(&[3, 4]);
        bad.max_len = 3;
        assert!(check(&sh, &bad).is_err()); // max_len not the longest
        let mut bad = seqs(&[3, 4]);
        bad.cu = vec![0, 3, 3, 7]; // an empty sequence
        assert!(check_shape(&sh, &bad, 4, 7).is_err());
        bad.cu = vec![1, 3, 7]; // not from 0
        assert!(check_shape(&sh, &bad, 3, 7).is_err());
    }

    fn cache_shape(
        batch: usize,
        new: usize,
        past: usize,
        heads: (usize, usize),
        head_dim: usize,
        window: Option<usize>,
    ) -> CacheShape {
        CacheShape {
            batch,
            new,
            past,
            cap: past + new + 5,
            heads: AttnShape::plain(heads.0, heads.1, head_dim, window),
        }
    }

    #[test]
    fn cached_plan_splits_decoding_and_tiles_prefill() {
        // SmolLM2 decoding one sequence on 132 SMs: 3 CTAs (one per kv head, all 3 query heads
        // each) would idle the GPU; 264 wanted, but 1001 keys make only 16 tiles of 64: 16 splits.
        let p = cached_plan(&cache_shape(1, 1, 1000, (9, 3), 64, None), "bf16", 132).unwrap();
        assert_eq!((p.rows_per_cta, p.heads_per_cta, p.key_tile), (1, 3, 64));
        assert_eq!(p.splits, 16);
        assert_eq!(p.attend.grid, (16, 3, 1));
        assert_eq!(p.workspace, 16 * 9 * (64 + 2));
        assert_eq!(p.attend.name, "attention_cached_bf16");
        assert_eq!(p.append.name, "attention_cache_append_bf16");
        let combine = p.combine.expect("splits need the merge");
        assert_eq!(combine.name, "attention_cached_combine_bf16");
        assert_eq!(combine.grid, (((9 * 64) as u32).div_ceil(THREADS), 1, 1));
        // K/V: 2 buffers x (K, V) x 64 keys x 72 bf16 (9 chunks: odd); f32 Q (8 x 64),
        // scores (8 x 64), alpha, m, l (8 each).
        assert_eq!(
            p.attend.smem as usize,
            4 * 64 * 72 * 2 + 4 * 8 * (64 + 64 + 3)
        );
        // A sliding window bounds the keys: 100 keys, two tiles, two splits.
        let w = cache_shape(1, 1, 8000, (9, 3), 64, Some(100));
        assert_eq!(cached_plan(&w, "bf16", 132).unwrap().splits, 2);
        // 64 sequences decoding fill the GPU without splits.
        let p = cached_plan(&cache_shape(64, 1, 4000, (16, 8), 128, None), "bf16", 132).unwrap();
        assert_eq!((p.splits, p.workspace), (1, 0));
        assert!(p.combine.is_none());
        assert_eq!(p.attend.grid, (1, 8, 64));

        // Prefill of 64 prompts of 2048: 2 rows x 3 heads per CTA, no split.
        let p = cached_plan(&cache_shape(64, 2048, 0, (9, 3), 64, None), "bf16", 132).unwrap();
        assert_eq!((p.rows_per_cta, p.heads_per_cta, p.splits), (2, 3, 1));
        assert_eq!(p.attend.grid, (1024, 3, 64));
        // MHA: 8 rows per CTA; a short prefill that leaves the GPU idle splits its keys too.
        let p = cached_plan(&cache_shape(1, 100, 0, (4, 4), 64, None), "f32", 132).unwrap();
        assert_eq!((p.rows_per_cta, p.heads_per_cta), (8, 1));
        assert_eq!(p.attend.grid, (13 * 2, 4, 1));
        // A group of 10 query heads is served by two CTAs of 5.
        let p = cached_plan(&cache_shape(2, 1, 10, (20, 2), 128, None), "f32", 132).unwrap();
        assert_eq!((p.heads_per_cta, p.attend.grid.1), (5, 4));
    }

    #[test]
    fn cached_key_tile_fits_the_shared_memory_budget() {
        for (suffix, d, kt) in [
            ("bf16", 64, 64),
            ("bf16", 128, 64),
            ("bf16", 256, 32),
            ("f32", 64, 64),
            ("f32", 128, 32),
            ("f32", 256, 16),
            ("bf16", 18, 64),
            ("f32", 18, 64),
        ] {
            let p = cached_plan(&cache_shape(1, 1, 0, (2, 1), d, None), suffix, 132).unwrap();
            assert_eq!(p.key_tile, kt, "{suffix} head_dim {d}");
            assert!(
                p.attend.smem <= 100 * 1024,
                "{suffix} head_dim {d}: {}",
                p.attend.smem
            );
        }
    }

    #[test]
    fn cached_plan_rejects_bad_shapes() {
        let ok = cache_shape(2, 3, 4, (4, 2), 64, None);
        assert!(cached_plan(&ok, "bf16", 132).is_ok());
        let h = ok.heads;
        let with = |heads: AttnShape| CacheShape { heads, ..ok };
        let capped = with(AttnShape {
            scale: 0.0625,
            softcap: Some(50.0),
            ..h
        });
        assert!(cached_plan(&capped, "bf16", 132).is_ok());
        let bad = [
            CacheShape { cap: 6, ..ok },            // 4 cached + 3 new > 6
            with(AttnShape { n_heads: 3, ..h }),    // 3 heads over 2 kv heads
            with(AttnShape { head_dim: 320, ..h }), // head dim too large
            with(AttnShape {
                window: Some(0),
                ..h
            }), // sees nothing
            with(AttnShape { n_kv_heads: 0, ..h }),
            with(AttnShape {
                softcap: Some(0.0),
                ..h
            }),
            with(AttnShape {
                scale: f32::NAN,
                ..h
            }),
        ];
        for s in bad {
            assert!(cached_plan(&s, "bf16", 132).is_err(), "{s:?}");
        }
    }

    /// Every kernel the host can pick exists in the module the host loads it from, for sm_80
    /// and sm_90a, without register spills. Needs libnvrtc (not a GPU); skipped with a notice
    /// when it is absent.
    #[test]
    fn every_selectable_kernel_compiles_without_spills() {
        if !compile::nvrtc_present() {
            eprintln!("skipped: libnvrtc not found (put its folder on LD_LIBRARY_PATH)");
            return;
        }
        let mut wanted = Vec::new();
        for suffix in ["bf16", "f32"] {
            for d in [24, 64, 96, 128, 256] {
                let s = shape(4, 2, d);
                let q = seqs(&[100, 3]);
                wanted.push(forward_launch(&s, &q, suffix));
                wanted.extend(backward_launches(&s, &q, suffix));
            }
        }
        for suffix in ["bf16", "f32"] {
            let p = cached_plan(&cache_shape(1, 1, 1000, (9, 3), 64, None), suffix, 132).unwrap();
            wanted.extend([p.append, p.attend]);
            wanted.extend(p.combine);
        }
        let mut wanted: Vec<(&str, String)> =
            wanted.into_iter().map(|l| (l.module, l.name)).collect();
        wanted.sort();
        wanted.dedup();
        for arch in ["sm_80", "sm_90a"] {
            for module in [MODULE, DECODE_MODULE] {
                let c = compile::compile(module, arch, Output::Cubin, &["-Xptxas=-v"])
                    .unwrap_or_else(|e| panic!("{e:#}"));
                let stats = compile::parse_ptxas_log(&c.log);
                for (_, name) in wanted.iter().filter(|(m, _)| *m == module) {
                    let k = stats.iter().find(|k| &k.name == name).unwrap_or_else(|| {
                        panic!("{arch}: kernel {name} not in kernels/{module}.cu")
                    });
                    assert_eq!(
                        (k.spill_stores, k.spill_loads),
                        (0, 0),
                        "{arch}: {name} spills registers ({} used)",
                        k.registers
                    );
                }
            }
        }
    }
}
