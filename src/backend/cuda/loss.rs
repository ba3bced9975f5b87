//! Cross-entropy over the vocabulary with the gradient written in place of the logits, and the
//! deterministic sum of the per-row losses (kernels/loss.cu).

use super::backend::CudaBackend;
use super::launch::{to_i32, KernelLaunch};
use super::runtime::DeviceElem;
use super::scratch::ensure;
use crate::backend::{check_len, check_min};
use anyhow::{bail, Context, Result};
use cudarc::driver::{CudaSlice, PushKernelArg};

pub(super) fn cross_entropy<T: DeviceElem>(
    be: &CudaBackend<T>,
    logits: &mut CudaSlice<T>,
    loss_acc: &mut CudaSlice<f32>,
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
    let mut sc = be.scratch();
    let tg = ensure(&be.rt, &mut sc.targets, n)?;
    be.rt
        .stream
        .memcpy_htod(targets, &mut tg.slice_mut(0..n))
        .context("uploading targets")?;
    let tgp = be.rt.ptr(&*tg);
    let rl = be.rt.ptr(ensure(&be.rt, &mut sc.row_loss, n)?);
    let (f, name) = be.func("loss", "cross_entropy")?;
    let lp = be.rt.ptr(logits);
    let vocab_i = to_i32("cross_entropy", "vocab", vocab);
    let scale = grad_scale.unwrap_or(0.0);
    let write_grad: i32 = grad_scale.is_some().into();
    let mut args = be.rt.stream.launch_builder(&f);
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
    unsafe { be.rt.launch(&name, cfg, args) }?;

    let f = be.rt.function("loss", "ce_loss_accumulate_f32")?;
    let acc = be.rt.ptr(loss_acc);
    let n_i = to_i32("cross_entropy", "rows", n);
    let mut args = be.rt.stream.launch_builder(&f);
    args.arg(&acc).arg(&rl).arg(&n_i);
    let cfg = KernelLaunch::ce_loss_accumulate().config();
    // SAFETY: ce_loss_accumulate_f32(float* acc, const float* row_loss, int n): acc holds
    // >= 1 element, row_loss n; one block.
    unsafe { be.rt.launch("ce_loss_accumulate_f32", cfg, args) }
}
