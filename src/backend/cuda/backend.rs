//! `CudaBackend<T>`: the [`Backend`] ops on one GPU, activations stored as `T` (bf16 for
//! training, f32 for tight tests against the CPU reference), f32 state.
//!
//! Hand-written kernels (`kernels/*.cu`) do the memory-bound ops; cuBLAS ([`Gemm`]) does every
//! matrix product; attention is [`super::attention`]. Every op is queued on the runtime's one
//! stream and returns without waiting, except the ones that hand a number back to the host
//! (`sum_squares`, downloads). Small scratch buffers (token ids, targets, per-row losses, bf16
//! copies of LoRA factors) live in the backend and grow on demand, so the training loop does not
//! allocate device memory after its first step.
//!
//! This file holds the type, the memory ops and the [`Backend`] impl, which dispatches each op
//! to its family's module (`linear.rs`, `norm.rs`, `elementwise.rs`, `loss.rs`, `optim.rs`,
//! `weight_grad.rs`, [`super::attention`]).

use super::gemm::Gemm;
use super::runtime::{DeviceElem, Runtime};
use super::scratch::{ensure, Mirrored, Scratch};
use super::{attention, elementwise, linear, loss, norm, optim, weight_grad};
use crate::backend::{
    check_len, check_min, AdamStep, AttnShape, Backend, CacheShape, LoraSlot, Seqs,
};
use anyhow::{Context, Result};
use cudarc::driver::{CudaFunction, CudaSlice};
use std::marker::PhantomData;
use std::sync::{Arc, Mutex, MutexGuard};

/// The CUDA implementation of [`Backend`].
pub struct CudaBackend<T: DeviceElem> {
    pub rt: Arc<Runtime>,
    pub(super) gemm: Gemm,
    scratch: Mutex<Scratch<T>>,
    /// The data-parallel group this backend joined (`None`: training alone).
    pub(super) group: Mutex<Option<super::collective::Group>>,
    _elem: PhantomData<T>,
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
                starts: Mirrored::default(),
                row_loss: None,
                partial: None,
                attn_splits: None,
                colsum: None,
                csr: None,
                lora: [None, None, None, None],
            }),
            group: Mutex::new(None),
            _elem: PhantomData,
        })
    }

    /// The GEMM wrapper (for benchmarks and the doctor).
    pub fn gemm(&self) -> &Gemm {
        &self.gemm
    }

    pub(super) fn scratch(&self) -> MutexGuard<'_, Scratch<T>> {
        self.scratch.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn func(&self, module: &str, op: &str) -> Result<(CudaFunction, String)> {
        let name = format!("{op}_{}", T::SUFFIX);
        Ok((self.rt.function(module, &name)?, name))
    }
}

impl<T: DeviceElem> Backend for CudaBackend<T> {
    type Act = CudaSlice<T>;
    type F32 = CudaSlice<f32>;
    type Idx = CudaSlice<i32>;

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

    fn upload_idx(&self, host: &[i32]) -> Result<Self::Idx> {
        self.rt
            .upload(host, || "uploading indices to the GPU".to_string())
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

    fn group_id(&self) -> Result<[u8; 128]> {
        super::collective::unique_id()
    }

    fn join_group(&self, rank: usize, size: usize, id: &[u8; 128]) -> Result<()> {
        self.join(rank, size, id)
    }

    fn group(&self) -> (usize, usize) {
        let g = self.group.lock().unwrap_or_else(|e| e.into_inner());
        g.as_ref().map_or((0, 1), |g| (g.rank(), g.size()))
    }

    fn all_reduce_f32(&self, x: &mut Self::F32) -> Result<()> {
        CudaBackend::all_reduce_f32(self, x)
    }

    fn all_reduce_host(&self, x: &mut [f64]) -> Result<()> {
        CudaBackend::all_reduce_host(self, x)
    }

    fn reduce_scatter_f32(&self, send: &Self::F32, recv: &mut Self::F32) -> Result<()> {
        CudaBackend::reduce_scatter_f32(self, send, recv)
    }

    fn all_gather_f32(&self, send: &Self::F32, recv: &mut Self::F32) -> Result<()> {
        CudaBackend::all_gather_f32(self, send, recv)
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

    fn device_memory(&self) -> Option<crate::backend::DeviceMemory> {
        let (free, total) = self.rt.ctx.mem_get_info().ok()?;
        Some(crate::backend::DeviceMemory {
            free: free as u64,
            total: total as u64,
            act_bytes: std::mem::size_of::<T>(),
        })
    }

    // ---- embedding ----------------------------------------------------------------------
    fn embedding(
        &self,
        out: &mut Self::Act,
        table: &Self::Act,
        ids: &[u32],
        d: usize,
    ) -> Result<()> {
        elementwise::embedding(self, out, table, ids, d)
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
        linear::linear(self, y, x, w, bias, n, d_in, d_out, accumulate)
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
        linear::linear_bwd_input(self, dx, dy, w, n, d_in, d_out, accumulate)
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
        linear::lora_fwd(self, y, u, x, params, slot, scale, n)
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
        linear::lora_bwd(self, dx, grads, dy, x, u, params, slot, scale, n)
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
        norm::residual_ablate_norm(
            self, resid, normed, rstd, a, b, directions, norm_w, n, d, eps,
        )
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
        norm::residual_ablate_norm_bwd(self, dresid, dnormed, resid, rstd, directions, norm_w, n, d)
    }

    // ---- rotary embeddings ----------------------------------------------------------------
    fn rope(
        &self,
        x: &mut Self::Act,
        table: &Self::F32,
        pos: &Self::Idx,
        n: usize,
        n_heads: usize,
        head_dim: usize,
        inverse: bool,
    ) -> Result<()> {
        elementwise::rope(self, x, table, pos, n, n_heads, head_dim, inverse)
    }

    // ---- attention ----------------------------------------------------------------------
    fn attention_fwd(
        &self,
        out: &mut Self::Act,
        lse: &mut Self::F32,
        q: &Self::Act,
        k: &Self::Act,
        v: &Self::Act,
        seqs: &Seqs<Self::Idx>,
        shape: &AttnShape,
    ) -> Result<()> {
        attention::attention_fwd::<T>(&self.rt, out, lse, q, k, v, seqs, shape)
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
        seqs: &Seqs<Self::Idx>,
        shape: &AttnShape,
    ) -> Result<()> {
        attention::attention_bwd::<T>(&self.rt, dq, dk, dv, dout, out, lse, q, k, v, seqs, shape)
    }

    // ---- MLP ----------------------------------------------------------------------------
    fn swiglu(&self, out: &mut Self::Act, gate: &Self::Act, up: &Self::Act) -> Result<()> {
        elementwise::glu(self, "swiglu", out, gate, up)
    }

    fn swiglu_bwd(
        &self,
        dgate: &mut Self::Act,
        dup: &mut Self::Act,
        dout: &Self::Act,
        gate: &Self::Act,
        up: &Self::Act,
    ) -> Result<()> {
        elementwise::glu_bwd(self, "swiglu", dgate, dup, dout, gate, up)
    }

    fn geglu(&self, out: &mut Self::Act, gate: &Self::Act, up: &Self::Act) -> Result<()> {
        elementwise::glu(self, "geglu", out, gate, up)
    }

    fn geglu_bwd(
        &self,
        dgate: &mut Self::Act,
        dup: &mut Self::Act,
        dout: &Self::Act,
        gate: &Self::Act,
        up: &Self::Act,
    ) -> Result<()> {
        elementwise::glu_bwd(self, "geglu", dgate, dup, dout, gate, up)
    }

    // ---- elementwise --------------------------------------------------------------------
    fn scale_act(&self, x: &mut Self::Act, s: f32) -> Result<()> {
        // The factor in T, as transformers casts Gemma's normalizer to the weights' dtype.
        elementwise::scale_or_cap(self, "scale", x, T::from_f32(s).to_f32())
    }

    fn softcap(&self, x: &mut Self::Act, cap: f32) -> Result<()> {
        anyhow::ensure!(
            cap.is_finite() && cap > 0.0,
            "softcap: cap {cap} must be positive"
        );
        elementwise::scale_or_cap(self, "softcap_fwd", x, cap)
    }

    fn softcap_bwd(&self, dx: &mut Self::Act, y: &Self::Act, cap: f32) -> Result<()> {
        anyhow::ensure!(
            cap.is_finite() && cap > 0.0,
            "softcap_bwd: cap {cap} must be positive"
        );
        elementwise::softcap_bwd(self, dx, y, cap)
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
        loss::cross_entropy(self, logits, loss_acc, targets, vocab, grad_scale)
    }

    // ---- full fine-tuning ---------------------------------------------------------------
    fn linear_bwd_weight(
        &self,
        dw: &mut Self::F32,
        off: usize,
        dy: &Self::Act,
        x: &Self::Act,
        n: usize,
        d_in: usize,
        d_out: usize,
    ) -> Result<()> {
        weight_grad::linear_bwd_weight(self, dw, off, dy, x, n, d_in, d_out)
    }

    fn bias_bwd(
        &self,
        db: &mut Self::F32,
        off: usize,
        dy: &Self::Act,
        n: usize,
        d: usize,
    ) -> Result<()> {
        weight_grad::bias_bwd(self, db, off, dy, n, d)
    }

    fn norm_weight_bwd(
        &self,
        dw: &mut Self::F32,
        off: usize,
        dnormed: &Self::Act,
        x: &Self::Act,
        rstd: &Self::F32,
        n: usize,
        d: usize,
    ) -> Result<()> {
        weight_grad::norm_weight_bwd(self, dw, off, dnormed, x, rstd, n, d)
    }

    fn embedding_bwd(
        &self,
        dtable: &mut Self::F32,
        off: usize,
        dx: &Self::Act,
        ids: &[u32],
        d: usize,
    ) -> Result<()> {
        weight_grad::embedding_bwd(self, dtable, off, dx, ids, d)
    }

    fn params_to_act(
        &self,
        dst: &mut Self::Act,
        src: &Self::F32,
        off: usize,
        add: f32,
    ) -> Result<()> {
        weight_grad::params_to_act(self, dst, src, off, add)
    }

    // ---- optimizer ----------------------------------------------------------------------
    fn sum_squares(&self, g: &Self::F32) -> Result<f64> {
        optim::sum_squares(self, g)
    }

    fn adamw(
        &self,
        params: &mut Self::F32,
        grads: &Self::F32,
        m: &mut Self::F32,
        v: &mut Self::F32,
        hp: &AdamStep,
    ) -> Result<()> {
        optim::adamw(self, params, grads, m, v, hp)
    }
}
