//! Embedding lookup, rotary embeddings, SwiGLU forward and backward, and the f32 -> `T` cast
//! (kernels/elementwise.cu).

use super::backend::CudaBackend;
use super::launch::{to_i32, KernelLaunch};
use super::runtime::DeviceElem;
use super::scratch::{ensure, Scratch};
use crate::backend::{check_len, check_min};
use anyhow::{Context, Result};
use cudarc::driver::{CudaSlice, PushKernelArg};

impl<T: DeviceElem> CudaBackend<T> {
    fn is_f32() -> bool {
        T::SUFFIX == "f32"
    }

    /// Device address of `len` f32 values at `src` seen as `T`: the same address when `T` is
    /// f32, else a `T` copy in scratch slot `slot`.
    pub(super) fn f32_as_t(
        &self,
        scratch: &mut Scratch<T>,
        slot: usize,
        src: u64,
        len: usize,
    ) -> Result<u64> {
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
    pub(super) fn t_scratch(
        &self,
        scratch: &mut Scratch<T>,
        slot: usize,
        len: usize,
    ) -> Result<u64> {
        let dst = ensure(&self.rt, &mut scratch.lora[slot], len)?;
        Ok(self.rt.ptr(dst))
    }
}

pub(super) fn embedding<T: DeviceElem>(
    be: &CudaBackend<T>,
    out: &mut CudaSlice<T>,
    table: &CudaSlice<T>,
    ids: &[u32],
    d: usize,
) -> Result<()> {
    let n = ids.len();
    check_len("embedding", "out", out.len(), n * d);
    assert!(
        d > 0 && table.len().is_multiple_of(d),
        "embedding: table length {} is not a multiple of d = {d}",
        table.len()
    );
    if n == 0 {
        return Ok(());
    }
    let mut sc = be.scratch();
    let ids_dev = ensure(&be.rt, &mut sc.ids, n)?;
    be.rt
        .stream
        .memcpy_htod(ids, &mut ids_dev.slice_mut(0..n))
        .context("uploading token ids")?;
    let (f, name) = be.func("elementwise", "embedding")?;
    let d_i = to_i32("embedding", "d", d);
    let (o, t, i) = (be.rt.ptr(out), be.rt.ptr(table), be.rt.ptr(&*ids_dev));
    let mut args = be.rt.stream.launch_builder(&f);
    args.arg(&o).arg(&t).arg(&i).arg(&d_i);
    let cfg = KernelLaunch::embedding::<T>(n, d).config();
    // SAFETY: embedding(T* out, const T* table, const u32* ids, int d): out holds n·d,
    // ids holds n valid row indices of table (validated by the caller), grid = n rows.
    unsafe { be.rt.launch(&name, cfg, args) }
}

/// Rotate `x: [n, n_heads*head_dim]` in place at the positions `pos` (`n` i32 on the device).
/// The host cannot see the positions, so the kernel checks each against the table's
/// `table.len() / head_dim` rows and traps (a launch failure) on one outside it.
#[allow(clippy::too_many_arguments)]
pub(super) fn rope<T: DeviceElem>(
    be: &CudaBackend<T>,
    x: &mut CudaSlice<T>,
    table: &CudaSlice<f32>,
    pos: &CudaSlice<i32>,
    n: usize,
    n_heads: usize,
    head_dim: usize,
    inverse: bool,
) -> Result<()> {
    assert!(
        head_dim > 0 && head_dim.is_multiple_of(2),
        "rope: head_dim {head_dim} is odd or 0"
    );
    check_len("rope", "x", x.len(), n * n_heads * head_dim);
    check_len("rope", "pos", pos.len(), n);
    let n_pos = table.len() / head_dim;
    let total = n * n_heads * head_dim / 2;
    if total == 0 {
        return Ok(());
    }
    check_min("rope", "table (one position)", table.len(), head_dim);
    let (f, name) = be.func("elementwise", "rope")?;
    let (xp, tp, pp) = (be.rt.ptr(x), be.rt.ptr(table), be.rt.ptr(pos));
    let rows_i = n as i64;
    let (nh_i, hd_i, np_i) = (
        to_i32("rope", "n_heads", n_heads),
        to_i32("rope", "head_dim", head_dim),
        to_i32("rope", "table positions", n_pos),
    );
    let sign: f32 = if inverse { -1.0 } else { 1.0 };
    let mut args = be.rt.stream.launch_builder(&f);
    args.arg(&xp)
        .arg(&tp)
        .arg(&pp)
        .arg(&rows_i)
        .arg(&nh_i)
        .arg(&hd_i)
        .arg(&np_i)
        .arg(&sign);
    let cfg = KernelLaunch::rope::<T>(n * n_heads, head_dim).config();
    // SAFETY: rope(T* x, const float* table, const int* pos, long long rows, int n_heads, int hd,
    // int n_pos, float sign): x holds rows·n_heads·hd, pos holds rows ints (both checked), and
    // the kernel traps on a position outside [0, n_pos), n_pos = table.len() / hd, so every table
    // read is in bounds.
    unsafe { be.rt.launch(&name, cfg, args) }
}

/// `out = act(gate) · up` with `kernel` `swiglu` or `geglu`.
pub(super) fn glu<T: DeviceElem>(
    be: &CudaBackend<T>,
    kernel: &str,
    out: &mut CudaSlice<T>,
    gate: &CudaSlice<T>,
    up: &CudaSlice<T>,
) -> Result<()> {
    let len = out.len();
    check_len(kernel, "gate", gate.len(), len);
    check_len(kernel, "up", up.len(), len);
    if len == 0 {
        return Ok(());
    }
    let (f, name) = be.func("elementwise", &format!("{kernel}_fwd"))?;
    let (op, gp, upp) = (be.rt.ptr(out), be.rt.ptr(gate), be.rt.ptr(up));
    let len_i = len as i64;
    let mut args = be.rt.stream.launch_builder(&f);
    args.arg(&op).arg(&gp).arg(&upp).arg(&len_i);
    let cfg = KernelLaunch::swiglu::<T>(len).config();
    // SAFETY: {swiglu,geglu}_fwd(T* out, const T* gate, const T* up, long long len): all three
    // hold len elements (whole buffers, so 16-byte aligned for the vector path).
    unsafe { be.rt.launch(&name, cfg, args) }
}

/// The backward of [`glu`] with the same `kernel`.
pub(super) fn glu_bwd<T: DeviceElem>(
    be: &CudaBackend<T>,
    kernel: &str,
    dgate: &mut CudaSlice<T>,
    dup: &mut CudaSlice<T>,
    dout: &CudaSlice<T>,
    gate: &CudaSlice<T>,
    up: &CudaSlice<T>,
) -> Result<()> {
    let len = dout.len();
    let op = format!("{kernel}_bwd");
    check_len(&op, "dgate", dgate.len(), len);
    check_len(&op, "dup", dup.len(), len);
    check_len(&op, "gate", gate.len(), len);
    check_len(&op, "up", up.len(), len);
    if len == 0 {
        return Ok(());
    }
    let (f, name) = be.func("elementwise", &op)?;
    let ptrs = [
        be.rt.ptr(dgate),
        be.rt.ptr(dup),
        be.rt.ptr(dout),
        be.rt.ptr(gate),
        be.rt.ptr(up),
    ];
    let len_i = len as i64;
    let mut args = be.rt.stream.launch_builder(&f);
    for p in &ptrs {
        args.arg(p);
    }
    args.arg(&len_i);
    let cfg = KernelLaunch::swiglu::<T>(len).config();
    // SAFETY: {swiglu,geglu}_bwd(T* dgate, T* dup, const T* dout, const T* gate, const T* up,
    // long long len): all five hold len elements.
    unsafe { be.rt.launch(&name, cfg, args) }
}

/// `x = s · x` (`scale`, with `s` rounded to `T` first, as transformers casts Gemma's
/// normalizer) or `x = c · tanh(x / c)` (`softcap_fwd`), in place.
pub(super) fn scale_or_cap<T: DeviceElem>(
    be: &CudaBackend<T>,
    kernel: &str,
    x: &mut CudaSlice<T>,
    s: f32,
) -> Result<()> {
    let len = x.len();
    if len == 0 {
        return Ok(());
    }
    let (f, name) = be.func("elementwise", kernel)?;
    let xp = be.rt.ptr(x);
    let len_i = len as i64;
    let mut args = be.rt.stream.launch_builder(&f);
    args.arg(&xp).arg(&s).arg(&len_i);
    let cfg = KernelLaunch::cast(len).config();
    // SAFETY: scale / softcap_fwd(T* x, float s, long long len): x holds len elements.
    unsafe { be.rt.launch(&name, cfg, args) }
}

/// `dx = dx · (1 - (y / c)²)` in place, `y` the capped values.
pub(super) fn softcap_bwd<T: DeviceElem>(
    be: &CudaBackend<T>,
    dx: &mut CudaSlice<T>,
    y: &CudaSlice<T>,
    cap: f32,
) -> Result<()> {
    let len = dx.len();
    check_len("softcap_bwd", "y", y.len(), len);
    if len == 0 {
        return Ok(());
    }
    let (f, name) = be.func("elementwise", "softcap_bwd")?;
    let (dp, yp) = (be.rt.ptr(dx), be.rt.ptr(y));
    let len_i = len as i64;
    let mut args = be.rt.stream.launch_builder(&f);
    args.arg(&dp).arg(&yp).arg(&cap).arg(&len_i);
    let cfg = KernelLaunch::cast(len).config();
    // SAFETY: softcap_bwd(T* dx, const T* y, float cap, long long len): both hold len elements.
    unsafe { be.rt.launch(&name, cfg, args) }
}
