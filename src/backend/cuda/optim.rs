//! AdamW (the CPU reference's arithmetic, one thread per 4 parameters) and the sum of squares
//! behind the gradient norm, in a fixed number of blocks per length (kernels/optim.cu).

use super::backend::CudaBackend;
use super::launch::KernelLaunch;
use super::runtime::DeviceElem;
use super::scratch::ensure;
use crate::backend::{check_len, AdamStep};
use anyhow::{Context, Result};
use cudarc::driver::{CudaSlice, PushKernelArg};

pub(super) fn sum_squares<T: DeviceElem>(be: &CudaBackend<T>, g: &CudaSlice<f32>) -> Result<f64> {
    let len = g.len();
    if len == 0 {
        return Ok(0.0);
    }
    let shape = KernelLaunch::sum_squares(len);
    let blocks = shape.grid as usize;
    let mut sc = be.scratch();
    let part = ensure(&be.rt, &mut sc.partial, blocks)?;
    let f = be.rt.function("optim", "sum_squares_partial_f32")?;
    let (pp, gp) = (be.rt.ptr(&*part), be.rt.ptr(g));
    let len_i = len as i64;
    let mut args = be.rt.stream.launch_builder(&f);
    args.arg(&pp).arg(&gp).arg(&len_i);
    let cfg = shape.config();
    // SAFETY: sum_squares_partial_f32(float* partial, const float* g, long long len):
    // partial holds >= blocks elements, g holds len.
    unsafe { be.rt.launch("sum_squares_partial_f32", cfg, args) }?;
    let host = be
        .rt
        .stream
        .clone_dtoh(&part.slice(0..blocks))
        .context("downloading partial sums of squares")?;
    Ok(host.iter().map(|&x| x as f64).sum())
}

pub(super) fn adamw<T: DeviceElem>(
    be: &CudaBackend<T>,
    params: &mut CudaSlice<f32>,
    grads: &CudaSlice<f32>,
    m: &mut CudaSlice<f32>,
    v: &mut CudaSlice<f32>,
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
    let f = be.rt.function("optim", "adamw_f32")?;
    let ptrs = [
        be.rt.ptr(params),
        be.rt.ptr(grads),
        be.rt.ptr(m),
        be.rt.ptr(v),
    ];
    let len_i = len as i64;
    let mut args = be.rt.stream.launch_builder(&f);
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
    unsafe { be.rt.launch("adamw_f32", cfg, args) }
}
