//! `CudaBackend<T>`: the [`Backend`] ops on one GPU, activations stored as `T` (bf16 for
//! training, f32 for tight tests against the CPU reference), f32 state.
//!
//! Hand-written kernels (`kernels/*.cu`) do the memory-bound ops; cuBLAS ([`Gemm`]) does every
//! matrix product; attention is [`super::attention`]. Every op is queued on the runtime's one
//! stream and returns without waiting, except the ones that hand a number back to the host
//! (`sum_squares`, downloads). Small scratch buffers (token ids, targets, per-row losses, bf16
//! copies of LoRA factors) live in the backend and grow on demand, so the training loop does not
//! allocate device memory after its first step.

use super::attention;
use super::gemm::{DType, Gemm, Operand, Output};
use super::runtime::{DeviceElem, Runtime};
use crate::backend::{AdamStep, AttnShape, Backend, CacheShape, LoraSlot};
use anyhow::{bail, Context, Result};
use cudarc::driver::{
    sys::CUfunction_attribute, CudaFunction, CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg,
    ValidAsZeroBits,
};
use std::marker::PhantomData;
use std::sync::{Arc, Mutex, MutexGuard};

/// Threads per block of the per-row kernels (norm, embedding, bias): at most this many.
const ROW_THREADS: usize = 256;
/// Threads per block of the cross-entropy kernel (must match `CE_THREADS` in loss.cu).
const CE_THREADS: u32 = 512;
/// Threads per block of the flat elementwise kernels.
const FLAT_THREADS: usize = 256;
/// Directions are reduced in groups of this many (`DIR_GROUP` in norm.cu).
const DIR_GROUP: usize = 8;
/// Most blocks of the first pass of `sum_squares` (a function of the length only).
const SUMSQ_MAX_BLOCKS: usize = 1024;
/// Shared memory a kernel may use without opting in.
const DEFAULT_SMEM: usize = 48 * 1024;

/// Device scratch, grown on demand.
#[derive(Default)]
struct Scratch<T> {
    ids: Option<CudaSlice<u32>>,
    targets: Option<CudaSlice<i32>>,
    /// Per-sequence rope offsets and cache starts (generation).
    offsets: Mirrored<i32>,
    starts: Mirrored<u32>,
    row_loss: Option<CudaSlice<f32>>,
    partial: Option<CudaSlice<f32>>,
    /// Per-split partial outputs of `attention_cached` (decoding small batches).
    attn_splits: Option<CudaSlice<f32>>,
    /// `T` copies of LoRA `A`, `B`, `u` and `du` (used when `T` is not f32).
    lora: [Option<CudaSlice<T>>; 4],
}

/// Grow `slot` to hold at least `len` elements (contents undefined) and return it.
fn ensure<'s, E: DeviceRepr + ValidAsZeroBits>(
    rt: &Runtime,
    slot: &'s mut Option<CudaSlice<E>>,
    len: usize,
) -> Result<&'s mut CudaSlice<E>> {
    let need = len.max(1);
    if slot.as_ref().is_none_or(|s| s.len() < need) {
        *slot = None; // free first: the old buffer is not needed
        *slot = Some(rt.alloc_zeros::<E>(need, || format!("allocating {need} scratch elements"))?);
    }
    Ok(slot.as_mut().expect("just ensured"))
}

/// A small device array that remembers what it was last given. Generation passes the same
/// per-sequence rope offsets and cache starts to every layer of a step (and the same starts to
/// every step), so an upload is skipped when the values have not changed.
struct Mirrored<E> {
    dev: Option<CudaSlice<E>>,
    host: Vec<E>,
}

impl<E> Default for Mirrored<E> {
    fn default() -> Self {
        Mirrored {
            dev: None,
            host: Vec::new(),
        }
    }
}

impl<E: DeviceRepr + ValidAsZeroBits + Copy + PartialEq> Mirrored<E> {
    /// The device array holding `values` (in its first `values.len()` elements).
    fn upload(&mut self, rt: &Runtime, values: &[E], what: &str) -> Result<&CudaSlice<E>> {
        let fits = self
            .dev
            .as_ref()
            .is_some_and(|d| d.len() >= values.len().max(1));
        if !fits || self.host != values {
            let dev = ensure(rt, &mut self.dev, values.len())?;
            rt.stream
                .memcpy_htod(values, &mut dev.slice_mut(0..values.len()))
                .with_context(|| format!("uploading {what}"))?;
            self.host = values.to_vec();
        }
        Ok(self.dev.as_ref().expect("uploaded"))
    }
}

/// The CUDA implementation of [`Backend`].
pub struct CudaBackend<T: DeviceElem> {
    pub rt: Arc<Runtime>,
    gemm: Gemm,
    scratch: Mutex<Scratch<T>>,
    _elem: PhantomData<T>,
}

fn check_len(op: &str, what: &str, got: usize, want: usize) {
    assert!(
        got == want,
        "{op}: {what} has {got} elements, expected {want}"
    );
}

fn check_min(op: &str, what: &str, got: usize, want: usize) {
    assert!(
        got >= want,
        "{op}: {what} has {got} elements, needs at least {want}"
    );
}

/// Threads for a per-row block over `chunks` work items: a multiple of 32 in [32, max].
fn row_threads(chunks: usize, max: usize) -> u32 {
    (chunks.div_ceil(32) * 32).clamp(32, max) as u32
}

/// Work items of a row of `d` elements: 16-byte vectors when `d` allows, else elements
/// (the kernels make the same choice).
fn row_chunks<T>(d: usize) -> usize {
    let vec = 16 / std::mem::size_of::<T>();
    if d.is_multiple_of(vec) {
        d / vec
    } else {
        d
    }
}

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

    fn config(self) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (self.grid, 1, 1),
            block_dim: (self.block, 1, 1),
            shared_mem_bytes: 0,
        }
    }
}

fn to_i32(op: &str, what: &str, x: usize) -> i32 {
    i32::try_from(x).unwrap_or_else(|_| panic!("{op}: {what} = {x} exceeds i32"))
}

impl<T: DeviceElem> CudaBackend<T> {
    /// Open device `ordinal` (context, stream, cuBLAS).
    pub fn new(ordinal: usize) -> Result<Self> {
        let rt = Arc::new(Runtime::new(ordinal)?);
        Self::with_runtime(rt)
    }

    /// A backend on an already opened runtime (several element types may share one device).
    pub fn with_runtime(rt: Arc<Runtime>) -> Result<Self> {
        let gemm = Gemm::new(&rt)?;
        Ok(CudaBackend {
            rt,
            gemm,
            scratch: Mutex::new(Scratch {
                ids: None,
                targets: None,
                offsets: Mirrored::default(),
                starts: Mirrored::default(),
                row_loss: None,
                partial: None,
                attn_splits: None,
                lora: [None, None, None, None],
            }),
            _elem: PhantomData,
        })
    }

    /// The GEMM wrapper (for benchmarks and the doctor).
    pub fn gemm(&self) -> &Gemm {
        &self.gemm
    }

    fn scratch(&self) -> MutexGuard<'_, Scratch<T>> {
        self.scratch.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn func(&self, module: &str, op: &str) -> Result<(CudaFunction, String)> {
        let name = format!("{op}_{}", T::SUFFIX);
        Ok((self.rt.function(module, &name)?, name))
    }

    fn dtype() -> DType {
        DType::of_suffix(T::SUFFIX)
    }

    fn is_f32() -> bool {
        T::SUFFIX == "f32"
    }

    /// Device address of `len` f32 values at `src` seen as `T`: the same address when `T` is
    /// f32, else a `T` copy in scratch slot `slot`.
    fn f32_as_t(&self, scratch: &mut Scratch<T>, slot: usize, src: u64, len: usize) -> Result<u64> {
        if Self::is_f32() {
            return Ok(src);
        }
        let dst = ensure(&self.rt, &mut scratch.lora[slot], len)?;
        let dst_ptr = self.rt.ptr(dst);
        let (f, name) = self.func("elementwise", "cast_from_f32")?;
        let len_i = len as i64;
        let mut args = self.rt.stream.launch_builder(&f);
        args.arg(&dst_ptr).arg(&src).arg(&len_i);
        let cfg = KernelLaunch::cast(len).config();
        // SAFETY: cast_from_f32(T* dst, const float* src, long long len); dst holds >= len
        // elements (ensured above), src holds len f32 values (caller).
        unsafe { self.rt.launch(&name, cfg, args) }?;
        Ok(dst_ptr)
    }

    /// Scratch address for `len` elements of `T` in slot `slot` (no conversion).
    fn t_scratch(&self, scratch: &mut Scratch<T>, slot: usize, len: usize) -> Result<u64> {
        let dst = ensure(&self.rt, &mut scratch.lora[slot], len)?;
        Ok(self.rt.ptr(dst))
    }

    fn op(&self, ptr: u64, trans: bool) -> Operand {
        Operand {
            ptr,
            dtype: Self::dtype(),
            trans,
        }
    }

    /// Opt a kernel into more than 48 KiB of dynamic shared memory when needed.
    fn allow_smem(&self, f: &CudaFunction, name: &str, bytes: usize) -> Result<()> {
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

impl<T: DeviceElem> Backend for CudaBackend<T> {
    type Act = CudaSlice<T>;
    type F32 = CudaSlice<f32>;

    fn name(&self) -> String {
        format!("cuda:{} {}", self.rt.ctx.ordinal(), self.rt.device_name())
    }

    // ---- memory -------------------------------------------------------------------------
    fn alloc_act(&self, n: usize) -> Result<Self::Act> {
        self.rt.alloc_zeros::<T>(n, || {
            format!("allocating {n} activation elements on {}", self.name())
        })
    }

    fn alloc_f32(&self, n: usize) -> Result<Self::F32> {
        self.rt.alloc_zeros::<f32>(n, || {
            format!("allocating {n} f32 elements on {}", self.name())
        })
    }

    fn upload_act(&self, host: &[f32]) -> Result<Self::Act> {
        let conv: Vec<T> = host.iter().map(|&x| T::from_f32(x)).collect();
        self.rt.upload(&conv, || "uploading to the GPU".to_string())
    }

    fn upload_f32(&self, host: &[f32]) -> Result<Self::F32> {
        self.rt.upload(host, || "uploading to the GPU".to_string())
    }

    fn download_act(&self, buf: &Self::Act) -> Result<Vec<f32>> {
        let v: Vec<T> = self
            .rt
            .stream
            .clone_dtoh(buf)
            .context("download from the GPU")?;
        Ok(v.into_iter().map(T::to_f32).collect())
    }

    fn download_f32(&self, buf: &Self::F32) -> Result<Vec<f32>> {
        self.rt
            .stream
            .clone_dtoh(buf)
            .context("download from the GPU")
    }

    fn act_len(&self, buf: &Self::Act) -> usize {
        buf.len()
    }

    fn f32_len(&self, buf: &Self::F32) -> usize {
        buf.len()
    }

    fn zero_act(&self, buf: &mut Self::Act) -> Result<()> {
        self.rt.stream.memset_zeros(buf).context("zeroing a buffer")
    }

    fn zero_f32(&self, buf: &mut Self::F32) -> Result<()> {
        self.rt.stream.memset_zeros(buf).context("zeroing a buffer")
    }

    fn copy_act(
        &self,
        dst: &mut Self::Act,
        dst_off: usize,
        src: &Self::Act,
        src_off: usize,
        len: usize,
    ) -> Result<()> {
        check_min("copy_act", "src", src.len(), src_off + len);
        check_min("copy_act", "dst", dst.len(), dst_off + len);
        if len == 0 {
            return Ok(());
        }
        let s = src.slice(src_off..src_off + len);
        let mut d = dst.slice_mut(dst_off..dst_off + len);
        self.rt
            .stream
            .memcpy_dtod(&s, &mut d)
            .context("device-to-device copy")
    }

    fn synchronize(&self) -> Result<()> {
        self.rt.synchronize()
    }

    fn device_memory_used_mib(&self) -> Option<f64> {
        // Device-wide (total - free): includes the context and cuBLAS workspaces, as
        // nvidia-smi would show; this process is the only user in the benchmarks.
        let (free, total) = self.rt.ctx.mem_get_info().ok()?;
        Some((total - free) as f64 / (1u64 << 20) as f64)
    }

    // ---- embedding ----------------------------------------------------------------------
    fn embedding(
        &self,
        out: &mut Self::Act,
        table: &Self::Act,
        ids: &[u32],
        d: usize,
    ) -> Result<()> {
        let n = ids.len();
        check_len("embedding", "out", out.len(), n * d);
        assert!(
            d > 0 && table.len() % d == 0,
            "embedding: table length {} is not a multiple of d = {d}",
            table.len()
        );
        if n == 0 {
            return Ok(());
        }
        let mut sc = self.scratch();
        let ids_dev = ensure(&self.rt, &mut sc.ids, n)?;
        self.rt
            .stream
            .memcpy_htod(ids, &mut ids_dev.slice_mut(0..n))
            .context("uploading token ids")?;
        let (f, name) = self.func("elementwise", "embedding")?;
        let d_i = to_i32("embedding", "d", d);
        let (o, t, i) = (self.rt.ptr(out), self.rt.ptr(table), self.rt.ptr(&*ids_dev));
        let mut args = self.rt.stream.launch_builder(&f);
        args.arg(&o).arg(&t).arg(&i).arg(&d_i);
        let cfg = KernelLaunch::embedding::<T>(n, d).config();
        // SAFETY: embedding(T* out, const T* table, const u32* ids, int d): out holds n·d,
        // ids holds n valid row indices of table (validated by the caller), grid = n rows.
        unsafe { self.rt.launch(&name, cfg, args) }
    }

    // ---- linear layers ------------------------------------------------------------------
    fn linear(
        &self,
        y: &mut Self::Act,
        x: &Self::Act,
        w: &Self::Act,
        bias: Option<&Self::Act>,
        n: usize,
        d_in: usize,
        d_out: usize,
        accumulate: bool,
    ) -> Result<()> {
        check_len("linear", "y", y.len(), n * d_out);
        check_len("linear", "x", x.len(), n * d_in);
        check_len("linear", "w", w.len(), d_out * d_in);
        let yp = self.rt.ptr(y);
        // SAFETY: y [n, d_out], x [n, d_in], W [d_out, d_in] stored row-major as checked above;
        // y is a distinct buffer from x and w (Rust borrows).
        unsafe {
            self.gemm.gemm(
                n,
                d_out,
                d_in,
                self.op(self.rt.ptr(x), false),
                self.op(self.rt.ptr(w), true),
                Output {
                    ptr: yp,
                    dtype: Self::dtype(),
                },
                1.0,
                if accumulate { 1.0 } else { 0.0 },
            )
        }
        .context("linear")?;
        if let Some(b) = bias {
            check_len("linear", "bias", b.len(), d_out);
            if n == 0 {
                return Ok(());
            }
            let (f, name) = self.func("elementwise", "add_bias")?;
            let bp = self.rt.ptr(b);
            let d_i = to_i32("linear", "d_out", d_out);
            let mut args = self.rt.stream.launch_builder(&f);
            args.arg(&yp).arg(&bp).arg(&d_i);
            let cfg = KernelLaunch::add_bias(n, d_out).config();
            // SAFETY: add_bias(T* y, const T* bias, int d): y holds n rows of d_out, bias d_out.
            unsafe { self.rt.launch(&name, cfg, args) }?;
        }
        Ok(())
    }

    fn linear_bwd_input(
        &self,
        dx: &mut Self::Act,
        dy: &Self::Act,
        w: &Self::Act,
        n: usize,
        d_in: usize,
        d_out: usize,
        accumulate: bool,
    ) -> Result<()> {
        check_len("linear_bwd_input", "dx", dx.len(), n * d_in);
        check_len("linear_bwd_input", "dy", dy.len(), n * d_out);
        check_len("linear_bwd_input", "w", w.len(), d_out * d_in);
        // SAFETY: dx [n, d_in] = dy [n, d_out] · W [d_out, d_in], shapes checked above.
        unsafe {
            self.gemm.gemm(
                n,
                d_in,
                d_out,
                self.op(self.rt.ptr(dy), false),
                self.op(self.rt.ptr(w), false),
                Output {
                    ptr: self.rt.ptr(dx),
                    dtype: Self::dtype(),
                },
                1.0,
                if accumulate { 1.0 } else { 0.0 },
            )
        }
        .context("linear_bwd_input")
    }

    // ---- LoRA -----------------------------------------------------------------------------
    fn lora_fwd(
        &self,
        y: &mut Self::Act,
        u: &mut Self::F32,
        x: &Self::Act,
        params: &Self::F32,
        slot: &LoraSlot,
        scale: f32,
        n: usize,
    ) -> Result<()> {
        let LoraSlot {
            a_off,
            b_off,
            r,
            d_in,
            d_out,
        } = *slot;
        check_len("lora_fwd", "y", y.len(), n * d_out);
        check_len("lora_fwd", "u", u.len(), n * r);
        check_len("lora_fwd", "x", x.len(), n * d_in);
        check_min(
            "lora_fwd",
            "params",
            params.len(),
            (a_off + r * d_in).max(b_off + d_out * r),
        );
        if n == 0 || r == 0 {
            return Ok(());
        }
        let p = self.rt.ptr(params);
        let (a_ptr, b_ptr) = (p + 4 * a_off as u64, p + 4 * b_off as u64);
        let mut sc = self.scratch();
        let a_t = self.f32_as_t(&mut sc, 0, a_ptr, r * d_in)?;
        let up = self.rt.ptr(u);
        // SAFETY (both GEMMs): shapes checked above; A [r, d_in] and B [d_out, r] lie inside
        // `params` (checked), their T copies in scratch hold as many elements; u [n, r] f32.
        unsafe {
            // u[n, r] = x[n, d_in] · Aᵀ
            self.gemm.gemm(
                n,
                r,
                d_in,
                self.op(self.rt.ptr(x), false),
                self.op(a_t, true),
                Output {
                    ptr: up,
                    dtype: DType::F32,
                },
                1.0,
                0.0,
            )
        }
        .context("lora_fwd: u = x Aᵀ")?;
        let u_t = self.f32_as_t(&mut sc, 2, up, n * r)?;
        let b_t = self.f32_as_t(&mut sc, 1, b_ptr, d_out * r)?;
        // SAFETY: see above; y [n, d_out] is distinct from the scratch copies.
        unsafe {
            // y[n, d_out] += scale · u[n, r] · Bᵀ
            self.gemm.gemm(
                n,
                d_out,
                r,
                self.op(u_t, false),
                self.op(b_t, true),
                Output {
                    ptr: self.rt.ptr(y),
                    dtype: Self::dtype(),
                },
                scale,
                1.0,
            )
        }
        .context("lora_fwd: y += scale u Bᵀ")
    }

    fn lora_bwd(
        &self,
        dx: &mut Self::Act,
        grads: &mut Self::F32,
        dy: &Self::Act,
        x: &Self::Act,
        u: &Self::F32,
        params: &Self::F32,
        slot: &LoraSlot,
        scale: f32,
        n: usize,
    ) -> Result<()> {
        let LoraSlot {
            a_off,
            b_off,
            r,
            d_in,
            d_out,
        } = *slot;
        check_len("lora_bwd", "dx", dx.len(), n * d_in);
        check_len("lora_bwd", "dy", dy.len(), n * d_out);
        check_len("lora_bwd", "x", x.len(), n * d_in);
        check_len("lora_bwd", "u", u.len(), n * r);
        let need = (a_off + r * d_in).max(b_off + d_out * r);
        check_min("lora_bwd", "params", params.len(), need);
        check_min("lora_bwd", "grads", grads.len(), need);
        if n == 0 || r == 0 {
            return Ok(());
        }
        let p = self.rt.ptr(params);
        let g = self.rt.ptr(grads);
        let (dy_p, x_p) = (self.rt.ptr(dy), self.rt.ptr(x));
        let mut sc = self.scratch();
        let u_t = self.f32_as_t(&mut sc, 2, self.rt.ptr(u), n * r)?;
        let b_t = self.f32_as_t(&mut sc, 1, p + 4 * b_off as u64, d_out * r)?;
        let a_t = self.f32_as_t(&mut sc, 0, p + 4 * a_off as u64, r * d_in)?;
        let du_t = self.t_scratch(&mut sc, 3, n * r)?;
        // SAFETY (all four GEMMs): shapes checked above; the gradient slices of A and B lie
        // inside `grads` (checked) and do not overlap the inputs (distinct buffers / scratch).
        unsafe {
            // dB[d_out, r] += scale · dyᵀ[d_out, n] · u[n, r]
            self.gemm
                .gemm(
                    d_out,
                    r,
                    n,
                    self.op(dy_p, true),
                    self.op(u_t, false),
                    Output {
                        ptr: g + 4 * b_off as u64,
                        dtype: DType::F32,
                    },
                    scale,
                    1.0,
                )
                .context("lora_bwd: dB")?;
            // du[n, r] = scale · dy[n, d_out] · B[d_out, r]
            self.gemm
                .gemm(
                    n,
                    r,
                    d_out,
                    self.op(dy_p, false),
                    self.op(b_t, false),
                    Output {
                        ptr: du_t,
                        dtype: Self::dtype(),
                    },
                    scale,
                    0.0,
                )
                .context("lora_bwd: du")?;
            // dA[r, d_in] += duᵀ[r, n] · x[n, d_in]
            self.gemm
                .gemm(
                    r,
                    d_in,
                    n,
                    self.op(du_t, true),
                    self.op(x_p, false),
                    Output {
                        ptr: g + 4 * a_off as u64,
                        dtype: DType::F32,
                    },
                    1.0,
                    1.0,
                )
                .context("lora_bwd: dA")?;
            // dx[n, d_in] += du[n, r] · A[r, d_in]
            self.gemm
                .gemm(
                    n,
                    d_in,
                    r,
                    self.op(du_t, false),
                    self.op(a_t, false),
                    Output {
                        ptr: self.rt.ptr(dx),
                        dtype: Self::dtype(),
                    },
                    1.0,
                    1.0,
                )
                .context("lora_bwd: dx")?;
        }
        Ok(())
    }

    // ---- residual + ablation + rmsnorm --------------------------------------------------
    fn residual_ablate_norm(
        &self,
        resid: &mut Self::Act,
        normed: &mut Self::Act,
        rstd: &mut Self::F32,
        a: &Self::Act,
        b: Option<&Self::Act>,
        directions: Option<(&Self::F32, usize)>,
        norm_w: &Self::Act,
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
                (self.rt.ptr(q), k)
            }
            None => (0u64, 0usize),
        };
        if n == 0 {
            return Ok(());
        }
        let shape = NormLaunch::new::<T>(op, d)?;
        let name = shape.entry("fwd", T::SUFFIX);
        let f = self.rt.function("norm", &name)?;
        let smem = shape.smem_bytes(k);
        self.allow_smem(&f, &name, smem)?;
        let (rp, np, sp, ap) = (
            self.rt.ptr(resid),
            self.rt.ptr(normed),
            self.rt.ptr(rstd),
            self.rt.ptr(a),
        );
        let bp = b.map_or(0u64, |b| self.rt.ptr(b));
        let wp = self.rt.ptr(norm_w);
        let (k_i, n_i, d_i) = (to_i32(op, "k", k), to_i32(op, "n", n), to_i32(op, "d", d));
        let mut args = self.rt.stream.launch_builder(&f);
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
        unsafe { self.rt.launch(&name, cfg, args) }
    }

    fn residual_ablate_norm_bwd(
        &self,
        dresid: &mut Self::Act,
        dnormed: &Self::Act,
        resid: &Self::Act,
        rstd: &Self::F32,
        directions: Option<(&Self::F32, usize)>,
        norm_w: &Self::Act,
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
                (self.rt.ptr(q), k)
            }
            None => (0u64, 0usize),
        };
        if n == 0 {
            return Ok(());
        }
        let shape = NormLaunch::new::<T>(op, d)?;
        let name = shape.entry("bwd", T::SUFFIX);
        let f = self.rt.function("norm", &name)?;
        let smem = shape.smem_bytes(k);
        self.allow_smem(&f, &name, smem)?;
        let (drp, dnp, rp, sp, wp) = (
            self.rt.ptr(dresid),
            self.rt.ptr(dnormed),
            self.rt.ptr(resid),
            self.rt.ptr(rstd),
            self.rt.ptr(norm_w),
        );
        let (k_i, n_i, d_i) = (to_i32(op, "k", k), to_i32(op, "n", n), to_i32(op, "d", d));
        let mut args = self.rt.stream.launch_builder(&f);
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
        unsafe { self.rt.launch(&name, cfg, args) }
    }

    // ---- rotary embeddings ----------------------------------------------------------------
    fn rope(
        &self,
        x: &mut Self::Act,
        table: &Self::F32,
        batch: usize,
        seq: usize,
        n_heads: usize,
        head_dim: usize,
        inverse: bool,
        offsets: Option<&[i32]>,
    ) -> Result<()> {
        assert!(
            head_dim.is_multiple_of(2),
            "rope: head_dim {head_dim} is odd"
        );
        let rows = batch * seq;
        check_len("rope", "x", x.len(), rows * n_heads * head_dim);
        let max_pos = match offsets {
            None => seq.max(1) - 1,
            Some(o) => {
                check_len("rope", "offsets", o.len(), batch);
                o.iter()
                    .map(|&p| (p as i64 + seq as i64 - 1).max(0) as usize)
                    .max()
                    .unwrap_or(0)
            }
        };
        check_min("rope", "table", table.len(), (max_pos + 1) * head_dim);
        let total = rows * n_heads * head_dim / 2;
        if total == 0 {
            return Ok(());
        }
        let mut sc = self.scratch();
        let offsets_ptr = match offsets {
            None => 0u64,
            Some(o) => {
                let dev = sc.offsets.upload(&self.rt, o, "rope offsets")?;
                self.rt.ptr(dev)
            }
        };
        let (f, name) = self.func("elementwise", "rope")?;
        let (xp, tp) = (self.rt.ptr(x), self.rt.ptr(table));
        let rows_i = rows as i64;
        let (seq_i, nh_i, hd_i) = (
            to_i32("rope", "seq", seq),
            to_i32("rope", "n_heads", n_heads),
            to_i32("rope", "head_dim", head_dim),
        );
        let sign: f32 = if inverse { -1.0 } else { 1.0 };
        let mut args = self.rt.stream.launch_builder(&f);
        args.arg(&xp)
            .arg(&tp)
            .arg(&offsets_ptr)
            .arg(&rows_i)
            .arg(&seq_i)
            .arg(&nh_i)
            .arg(&hd_i)
            .arg(&sign);
        let cfg = KernelLaunch::rope::<T>(rows * n_heads, head_dim).config();
        // SAFETY: rope(T* x, const float* table, const int* offsets, long long rows, int seq,
        // int n_heads, int hd, float sign): x holds rows·n_heads·hd, table covers every
        // position used (checked above), offsets is null or holds `batch` ints.
        unsafe { self.rt.launch(&name, cfg, args) }
    }

    // ---- attention ----------------------------------------------------------------------
    fn attention_fwd(
        &self,
        out: &mut Self::Act,
        lse: &mut Self::F32,
        q: &Self::Act,
        k: &Self::Act,
        v: &Self::Act,
        shape: &AttnShape,
    ) -> Result<()> {
        attention::attention_fwd::<T>(&self.rt, out, lse, q, k, v, shape)
    }

    fn attention_cached(
        &self,
        out: &mut Self::Act,
        q: &Self::Act,
        k: &Self::Act,
        v: &Self::Act,
        k_cache: &mut Self::Act,
        v_cache: &mut Self::Act,
        start: &[u32],
        shape: &CacheShape,
    ) -> Result<()> {
        check_len("attention_cached", "start", start.len(), shape.batch);
        let plan = attention::cached_plan(shape, T::SUFFIX, self.rt.sm_count())?;
        if shape.batch * shape.new == 0 {
            return Ok(());
        }
        let mut guard = self.scratch();
        let sc = &mut *guard;
        let starts = sc.starts.upload(&self.rt, start, "sequence starts")?;
        let workspace = match plan.workspace {
            0 => None,
            len => Some(&*ensure(&self.rt, &mut sc.attn_splits, len)?),
        };
        attention::attention_cached::<T>(
            &self.rt, &plan, out, q, k, v, k_cache, v_cache, starts, workspace, shape,
        )
    }

    fn attention_bwd(
        &self,
        dq: &mut Self::Act,
        dk: &mut Self::Act,
        dv: &mut Self::Act,
        dout: &Self::Act,
        out: &Self::Act,
        lse: &Self::F32,
        q: &Self::Act,
        k: &Self::Act,
        v: &Self::Act,
        shape: &AttnShape,
    ) -> Result<()> {
        attention::attention_bwd::<T>(&self.rt, dq, dk, dv, dout, out, lse, q, k, v, shape)
    }

    // ---- MLP ----------------------------------------------------------------------------
    fn swiglu(&self, out: &mut Self::Act, gate: &Self::Act, up: &Self::Act) -> Result<()> {
        let len = out.len();
        check_len("swiglu", "gate", gate.len(), len);
        check_len("swiglu", "up", up.len(), len);
        if len == 0 {
            return Ok(());
        }
        let (f, name) = self.func("elementwise", "swiglu_fwd")?;
        let (op, gp, upp) = (self.rt.ptr(out), self.rt.ptr(gate), self.rt.ptr(up));
        let len_i = len as i64;
        let mut args = self.rt.stream.launch_builder(&f);
        args.arg(&op).arg(&gp).arg(&upp).arg(&len_i);
        let cfg = KernelLaunch::swiglu::<T>(len).config();
        // SAFETY: swiglu_fwd(T* out, const T* gate, const T* up, long long len): all three hold
        // len elements (whole buffers, so 16-byte aligned for the vector path).
        unsafe { self.rt.launch(&name, cfg, args) }
    }

    fn swiglu_bwd(
        &self,
        dgate: &mut Self::Act,
        dup: &mut Self::Act,
        dout: &Self::Act,
        gate: &Self::Act,
        up: &Self::Act,
    ) -> Result<()> {
        let len = dout.len();
        check_len("swiglu_bwd", "dgate", dgate.len(), len);
        check_len("swiglu_bwd", "dup", dup.len(), len);
        check_len("swiglu_bwd", "gate", gate.len(), len);
        check_len("swiglu_bwd", "up", up.len(), len);
        if len == 0 {
            return Ok(());
        }
        let (f, name) = self.func("elementwise", "swiglu_bwd")?;
        let ptrs = [
            self.rt.ptr(dgate),
            self.rt.ptr(dup),
            self.rt.ptr(dout),
            self.rt.ptr(gate),
            self.rt.ptr(up),
        ];
        let len_i = len as i64;
        let mut args = self.rt.stream.launch_builder(&f);
        for p in &ptrs {
            args.arg(p);
        }
        args.arg(&len_i);
        let cfg = KernelLaunch::swiglu::<T>(len).config();
        // SAFETY: swiglu_bwd(T* dgate, T* dup, const T* dout, const T* gate, const T* up,
        // long long len): all five hold len elements.
        unsafe { self.rt.launch(&name, cfg, args) }
    }

    // ---- loss ---------------------------------------------------------------------------
    fn cross_entropy(
        &self,
        logits: &mut Self::Act,
        loss_acc: &mut Self::F32,
        targets: &[i32],
        vocab: usize,
        grad_scale: Option<f32>,
    ) -> Result<()> {
        let n = targets.len();
        check_len("cross_entropy", "logits", logits.len(), n * vocab);
        check_min("cross_entropy", "loss_acc", loss_acc.len(), 1);
        if let Some((i, &t)) = targets
            .iter()
            .enumerate()
            .find(|(_, &t)| t >= vocab as i32 || t < -1)
        {
            bail!("cross_entropy: target {t} of row {i} is outside the vocabulary (0..{vocab}, or -1)");
        }
        if n == 0 {
            return Ok(());
        }
        let mut sc = self.scratch();
        let tg = ensure(&self.rt, &mut sc.targets, n)?;
        self.rt
            .stream
            .memcpy_htod(targets, &mut tg.slice_mut(0..n))
            .context("uploading targets")?;
        let tgp = self.rt.ptr(&*tg);
        let rl = self.rt.ptr(ensure(&self.rt, &mut sc.row_loss, n)?);
        let (f, name) = self.func("loss", "cross_entropy")?;
        let lp = self.rt.ptr(logits);
        let vocab_i = to_i32("cross_entropy", "vocab", vocab);
        let scale = grad_scale.unwrap_or(0.0);
        let write_grad: i32 = grad_scale.is_some().into();
        let mut args = self.rt.stream.launch_builder(&f);
        args.arg(&lp)
            .arg(&rl)
            .arg(&tgp)
            .arg(&vocab_i)
            .arg(&scale)
            .arg(&write_grad);
        let cfg = KernelLaunch::cross_entropy(n).config();
        // SAFETY: cross_entropy(T* logits, float* row_loss, const int* targets, int vocab,
        // float grad_scale, int write_grad): logits n·vocab, row_loss and targets n (scratch
        // ensured), targets in -1..vocab (checked); block size = CE_THREADS.
        unsafe { self.rt.launch(&name, cfg, args) }?;

        let f = self.rt.function("loss", "ce_loss_accumulate_f32")?;
        let acc = self.rt.ptr(loss_acc);
        let n_i = to_i32("cross_entropy", "rows", n);
        let mut args = self.rt.stream.launch_builder(&f);
        args.arg(&acc).arg(&rl).arg(&n_i);
        let cfg = KernelLaunch::ce_loss_accumulate().config();
        // SAFETY: ce_loss_accumulate_f32(float* acc, const float* row_loss, int n): acc holds
        // >= 1 element, row_loss n; one block.
        unsafe { self.rt.launch("ce_loss_accumulate_f32", cfg, args) }
    }

    // ---- optimizer ----------------------------------------------------------------------
    fn sum_squares(&self, g: &Self::F32) -> Result<f64> {
        let len = g.len();
        if len == 0 {
            return Ok(0.0);
        }
        let shape = KernelLaunch::sum_squares(len);
        let blocks = shape.grid as usize;
        let mut sc = self.scratch();
        let part = ensure(&self.rt, &mut sc.partial, blocks)?;
        let f = self.rt.function("optim", "sum_squares_partial_f32")?;
        let (pp, gp) = (self.rt.ptr(&*part), self.rt.ptr(g));
        let len_i = len as i64;
        let mut args = self.rt.stream.launch_builder(&f);
        args.arg(&pp).arg(&gp).arg(&len_i);
        let cfg = shape.config();
        // SAFETY: sum_squares_partial_f32(float* partial, const float* g, long long len):
        // partial holds >= blocks elements, g holds len.
        unsafe { self.rt.launch("sum_squares_partial_f32", cfg, args) }?;
        let host = self
            .rt
            .stream
            .clone_dtoh(&part.slice(0..blocks))
            .context("downloading partial sums of squares")?;
        Ok(host.iter().map(|&x| x as f64).sum())
    }

    fn adamw(
        &self,
        params: &mut Self::F32,
        grads: &Self::F32,
        m: &mut Self::F32,
        v: &mut Self::F32,
        hp: &AdamStep,
    ) -> Result<()> {
        let len = params.len();
        check_len("adamw", "grads", grads.len(), len);
        check_len("adamw", "m", m.len(), len);
        check_len("adamw", "v", v.len(), len);
        assert!(hp.step >= 1, "adamw: step is 1-based, got {}", hp.step);
        if len == 0 {
            return Ok(());
        }
        // The step's constants, exactly those the CPU reference uses.
        let scalars = hp.scalars().to_array();
        let f = self.rt.function("optim", "adamw_f32")?;
        let ptrs = [
            self.rt.ptr(params),
            self.rt.ptr(grads),
            self.rt.ptr(m),
            self.rt.ptr(v),
        ];
        let len_i = len as i64;
        let mut args = self.rt.stream.launch_builder(&f);
        for p in &ptrs {
            args.arg(p);
        }
        args.arg(&len_i);
        for s in &scalars {
            args.arg(s);
        }
        let cfg = KernelLaunch::adamw(len).config();
        // SAFETY: adamw_f32(float* p, const float* g, float* m, float* v, long long len,
        // 8 × float): the four buffers hold len elements (checked), scalars in kernel order.
        unsafe { self.rt.launch("adamw_f32", cfg, args) }
    }
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
