//! Frozen linear layers and LoRA, forward and backward: every GEMM of the model (cuBLAS through
//! [`super::gemm::Gemm`]), plus the bias add (kernels/elementwise.cu).

use super::backend::CudaBackend;
use super::gemm::{DType, Operand, Output};
use super::launch::{to_i32, KernelLaunch};
use super::runtime::DeviceElem;
use crate::backend::{check_len, check_min, LoraSlot};
use anyhow::{Context, Result};
use cudarc::driver::{CudaSlice, PushKernelArg};

impl<T: DeviceElem> CudaBackend<T> {
    fn dtype() -> DType {
        DType::of_suffix(T::SUFFIX)
    }

    fn op(&self, ptr: u64, trans: bool) -> Operand {
        Operand {
            ptr,
            dtype: Self::dtype(),
            trans,
        }
    }
}

#[allow(clippy::too_many_arguments)]
pub(super) fn linear<T: DeviceElem>(
    be: &CudaBackend<T>,
    y: &mut CudaSlice<T>,
    x: &CudaSlice<T>,
    w: &CudaSlice<T>,
    bias: Option<&CudaSlice<T>>,
    n: usize,
    d_in: usize,
    d_out: usize,
    accumulate: bool,
) -> Result<()> {
    check_len("linear", "y", y.len(), n * d_out);
    check_len("linear", "x", x.len(), n * d_in);
    check_len("linear", "w", w.len(), d_out * d_in);
    let yp = be.rt.ptr(y);
    // SAFETY: y [n, d_out], x [n, d_in], W [d_out, d_in] stored row-major as checked above;
    // y is a distinct buffer from x and w (Rust borrows).
    unsafe {
        be.gemm.gemm(
            n,
            d_out,
            d_in,
            be.op(be.rt.ptr(x), false),
            be.op(be.rt.ptr(w), true),
            Output {
                ptr: yp,
                dtype: CudaBackend::<T>::dtype(),
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
        let (f, name) = be.func("elementwise", "add_bias")?;
        let bp = be.rt.ptr(b);
        let d_i = to_i32("linear", "d_out", d_out);
        let mut args = be.rt.stream.launch_builder(&f);
        args.arg(&yp).arg(&bp).arg(&d_i);
        let cfg = KernelLaunch::add_bias(n, d_out).config();
        // SAFETY: add_bias(T* y, const T* bias, int d): y holds n rows of d_out, bias d_out.
        unsafe { be.rt.launch(&name, cfg, args) }?;
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
pub(super) fn linear_bwd_input<T: DeviceElem>(
    be: &CudaBackend<T>,
    dx: &mut CudaSlice<T>,
    dy: &CudaSlice<T>,
    w: &CudaSlice<T>,
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
        be.gemm.gemm(
            n,
            d_in,
            d_out,
            be.op(be.rt.ptr(dy), false),
            be.op(be.rt.ptr(w), false),
            Output {
                ptr: be.rt.ptr(dx),
                dtype: CudaBackend::<T>::dtype(),
            },
            1.0,
            if accumulate { 1.0 } else { 0.0 },
        )
    }
    .context("linear_bwd_input")
}

#[allow(clippy::too_many_arguments)]
pub(super) fn lora_fwd<T: DeviceElem>(
    be: &CudaBackend<T>,
    y: &mut CudaSlice<T>,
    u: &mut CudaSlice<f32>,
    x: &CudaSlice<T>,
    params: &CudaSlice<f32>,
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
    let p = be.rt.ptr(params);
    let (a_ptr, b_ptr) = (p + 4 * a_off as u64, p + 4 * b_off as u64);
    let mut sc = be.scratch();
    let a_t = be.f32_as_t(&mut sc, 0, a_ptr, r * d_in)?;
    let up = be.rt.ptr(u);
    // SAFETY: (both GEMMs) shapes checked above; A [r, d_in] and B [d_out, r] lie inside
    // `params` (checked), their T copies in scratch hold as many elements; u [n, r] f32.
    unsafe {
        // u[n, r] = x[n, d_in] · Aᵀ
        be.gemm.gemm(
            n,
            r,
            d_in,
            be.op(be.rt.ptr(x), false),
            be.op(a_t, true),
            Output {
                ptr: up,
                dtype: DType::F32,
            },
            1.0,
            0.0,
        )
    }
    .context("lora_fwd: u = x Aᵀ")?;
    let u_t = be.f32_as_t(&mut sc, 2, up, n * r)?;
    let b_t = be.f32_as_t(&mut sc, 1, b_ptr, d_out * r)?;
    // SAFETY: see above; y [n, d_out] is distinct from the scratch copies.
    unsafe {
        // y[n, d_out] += scale · u[n, r] · Bᵀ
        be.gemm.gemm(
            n,
            d_out,
            r,
            be.op(u_t, false),
            be.op(b_t, true),
            Output {
                ptr: be.rt.ptr(y),
                dtype: CudaBackend::<T>::dtype(),
            },
            scale,
            1.0,
        )
    }
    .context("lora_fwd: y += scale u Bᵀ")
}

#[allow(clippy::too_many_arguments)]
pub(super) fn lora_bwd<T: DeviceElem>(
    be: &CudaBackend<T>,
    dx: &mut CudaSlice<T>,
    grads: &mut CudaSlice<f32>,
    dy: &CudaSlice<T>,
    x: &CudaSlice<T>,
    u: &CudaSlice<f32>,
    params: &CudaSlice<f32>,
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
    let p = be.rt.ptr(params);
    let g = be.rt.ptr(grads);
    let (dy_p, x_p) = (be.rt.ptr(dy), be.rt.ptr(x));
    let mut sc = be.scratch();
    let u_t = be.f32_as_t(&mut sc, 2, be.rt.ptr(u), n * r)?;
    let b_t = be.f32_as_t(&mut sc, 1, p + 4 * b_off as u64, d_out * r)?;
    let a_t = be.f32_as_t(&mut sc, 0, p + 4 * a_off as u64, r * d_in)?;
    let du_t = be.t_scratch(&mut sc, 3, n * r)?;
    // SAFETY: (all four GEMMs) shapes checked above; the gradient slices of A and B lie
    // inside `grads` (checked) and do not overlap the inputs (distinct buffers / scratch).
    unsafe {
        // dB[d_out, r] += scale · dyᵀ[d_out, n] · u[n, r]
        be.gemm
            .gemm(
                d_out,
                r,
                n,
                be.op(dy_p, true),
                be.op(u_t, false),
                Output {
                    ptr: g + 4 * b_off as u64,
                    dtype: DType::F32,
                },
                scale,
                1.0,
            )
            .context("lora_bwd: dB")?;
        // du[n, r] = scale · dy[n, d_out] · B[d_out, r]
        be.gemm
            .gemm(
                n,
                r,
                d_out,
                be.op(dy_p, false),
                be.op(b_t, false),
                Output {
                    ptr: du_t,
                    dtype: CudaBackend::<T>::dtype(),
                },
                scale,
                0.0,
            )
            .context("lora_bwd: du")?;
        // dA[r, d_in] += duᵀ[r, n] · x[n, d_in]
        be.gemm
            .gemm(
                r,
                d_in,
                n,
                be.op(du_t, true),
                be.op(x_p, false),
                Output {
                    ptr: g + 4 * a_off as u64,
                    dtype: DType::F32,
                },
                1.0,
                1.0,
            )
            .context("lora_bwd: dA")?;
        // dx[n, d_in] += du[n, r] · A[r, d_in]
        be.gemm
            .gemm(
                n,
                d_in,
                r,
                be.op(du_t, false),
                be.op(a_t, false),
                Output {
                    ptr: be.rt.ptr(dx),
                    dtype: CudaBackend::<T>::dtype(),
                },
                1.0,
                1.0,
            )
            .context("lora_bwd: dx")?;
    }
    Ok(())
}
