//! The CPU reference backend: f32 storage, exact reductions, multithreaded with rayon.
//!
//! Every other backend is tested against this one, so it favours exactness where it is cheap:
//! GEMMs run in f32 through the `gemm` crate (AVX-512/AVX2 microkernels picked at run time),
//! while every reduction that decides a normalisation (rmsnorm mean of squares, softmax and
//! log-sum-exp sums, ablation dot products, the gradient norm) accumulates in f64.
//!
//! Files by op family:
//! - `mod.rs`: the [`Backend`] impl (dispatch and size checks), the one GEMM wrapper [`matmul`].
//! - `linear.rs`: frozen linear layers and LoRA, forward and backward (all GEMMs).
//! - `norm.rs`: the fused residual + ablation + rmsnorm and its backward.
//! - `attention.rs`: causal / sliding-window GQA attention, flash-style backward.
//! - `elementwise.rs`: embedding, rotary embeddings, SwiGLU.
//! - `loss.rs`: cross-entropy with the gradient written in place.
//! - `optim.rs`: AdamW (PyTorch's arithmetic order) and the sum of squares.
//! - `weight_grad.rs`: full fine-tuning's weight, bias, norm-gain and embedding gradients.
//! - `simd.rs`: a vectorisable `exp`, lane-split f64 reductions, run-time ISA dispatch.

mod attention;
mod elementwise;
mod linear;
mod loss;
mod norm;
mod optim;
mod simd;
#[cfg(test)]
mod testutil;
mod weight_grad;

use super::{check_len, check_min, AdamStep, AttnShape, Backend, CacheShape, LoraSlot, Seqs};
use anyhow::Result;

/// The f32 reference backend. Stateless: it uses rayon's global thread pool (size it with
/// `RAYON_NUM_THREADS` or `rayon::ThreadPoolBuilder::build_global`).
#[derive(Clone, Debug, Default)]
pub struct CpuBackend;

impl CpuBackend {
    pub fn new() -> Self {
        CpuBackend
    }
}

// ---- the GEMM wrapper --------------------------------------------------------------------------

/// How many threads one GEMM may use: `All` for a top-level product (rayon's pool), `One`
/// inside a task that is itself one of many running in parallel (attention per head).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Threads {
    All,
    One,
}

/// A read-only strided matrix view: element `(i, j)` is `data[i * rs + j * cs]`.
/// Transposes and column blocks of row-major buffers are views, never copies.
#[derive(Clone, Copy, Debug)]
pub(crate) struct MatRef<'a> {
    pub data: &'a [f32],
    pub rs: usize,
    pub cs: usize,
}

impl<'a> MatRef<'a> {
    /// A row-major matrix with row stride `rs` starting at `data[0]`.
    pub fn rows(data: &'a [f32], rs: usize) -> Self {
        MatRef { data, rs, cs: 1 }
    }
    /// The transpose of a row-major matrix with row stride `rs`: `(i, j)` reads `data[j*rs + i]`.
    pub fn transposed(data: &'a [f32], rs: usize) -> Self {
        MatRef {
            data,
            rs: 1,
            cs: rs,
        }
    }
}

/// Number of elements a `rows x cols` strided region spans (0 when empty).
fn span(rows: usize, cols: usize, rs: usize, cs: usize) -> usize {
    if rows == 0 || cols == 0 {
        0
    } else {
        (rows - 1) * rs + (cols - 1) * cs + 1
    }
}

/// `C[m, n] = (accumulate ? C : 0) + alpha · A[m, k] B[k, n]`, `C` row-major with row stride
/// `dst_rs`. All bounds are checked against the slices, so this is safe to call.
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul(
    dst: &mut [f32],
    dst_rs: usize,
    a: MatRef,
    b: MatRef,
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    accumulate: bool,
    threads: Threads,
) {
    assert!(
        span(m, n, dst_rs, 1) <= dst.len(),
        "matmul: destination too short"
    );
    // SAFETY: the destination region lies inside `dst` (checked above) and `dst` is borrowed
    // mutably, so nothing else reads or writes it during the call.
    unsafe {
        matmul_to_ptr(
            dst.as_mut_ptr(),
            dst_rs,
            a,
            b,
            m,
            n,
            k,
            alpha,
            accumulate,
            threads,
        )
    }
}

/// [`matmul`] writing through a raw pointer, for tasks that fill disjoint column blocks of one
/// shared output (attention heads).
///
/// # Safety
/// `dst` must be valid for reads and writes of every element `dst[i * dst_rs + j]`, `i < m`,
/// `j < n`, and no other thread may access those elements during the call.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn matmul_to_ptr(
    dst: *mut f32,
    dst_rs: usize,
    a: MatRef,
    b: MatRef,
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    accumulate: bool,
    threads: Threads,
) {
    assert!(
        span(m, k, a.rs, a.cs) <= a.data.len(),
        "matmul: left operand too short"
    );
    assert!(
        span(k, n, b.rs, b.cs) <= b.data.len(),
        "matmul: right operand too short"
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                for j in 0..n {
                    // SAFETY: (i, j) is inside the region the caller vouches for.
                    unsafe { *dst.add(i * dst_rs + j) = 0.0 };
                }
            }
        }
        return;
    }
    let par = match threads {
        Threads::One => gemm::Parallelism::None,
        Threads::All => match rayon::current_num_threads() {
            0 | 1 => gemm::Parallelism::None,
            t => gemm::Parallelism::Rayon(t),
        },
    };
    // SAFETY: both operands' regions were bounds-checked above, the destination's by the caller;
    // strides fit in isize because every region lies inside an allocation. `gemm` computes
    // dst = alpha·dst + beta·lhs·rhs and reads dst only when `read_dst` is true.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_rs as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            1.0,
            alpha,
            false,
            false,
            false,
            par,
        )
    }
}

/// A raw pointer that tasks may share because each writes a disjoint set of elements.
#[derive(Clone, Copy)]
pub(crate) struct SharedMut(pub *mut f32);
// SAFETY: the pointer is only dereferenced by tasks that write disjoint elements (each use site
// states which), and the buffer outlives the parallel section that uses it.
unsafe impl Send for SharedMut {}
// SAFETY: as above.
unsafe impl Sync for SharedMut {}

impl SharedMut {
    /// Method access, so closures capture the whole (Send) wrapper, not the raw field.
    pub fn get(self) -> *mut f32 {
        self.0
    }
}

impl Backend for CpuBackend {
    type Act = Vec<f32>;
    type F32 = Vec<f32>;
    type Idx = Vec<i32>;

    fn name(&self) -> String {
        format!("cpu ({} threads)", rayon::current_num_threads())
    }

    fn alloc_act(&self, n: usize) -> Result<Vec<f32>> {
        Ok(vec![0.0; n])
    }
    fn alloc_f32(&self, n: usize) -> Result<Vec<f32>> {
        Ok(vec![0.0; n])
    }
    fn upload_act(&self, host: &[f32]) -> Result<Vec<f32>> {
        Ok(host.to_vec())
    }
    fn upload_f32(&self, host: &[f32]) -> Result<Vec<f32>> {
        Ok(host.to_vec())
    }
    fn upload_idx(&self, host: &[i32]) -> Result<Vec<i32>> {
        Ok(host.to_vec())
    }
    fn download_act(&self, buf: &Vec<f32>) -> Result<Vec<f32>> {
        Ok(buf.clone())
    }
    fn download_f32(&self, buf: &Vec<f32>) -> Result<Vec<f32>> {
        Ok(buf.clone())
    }
    fn act_len(&self, buf: &Vec<f32>) -> usize {
        buf.len()
    }
    fn f32_len(&self, buf: &Vec<f32>) -> usize {
        buf.len()
    }
    fn zero_act(&self, buf: &mut Vec<f32>) -> Result<()> {
        buf.fill(0.0);
        Ok(())
    }
    fn zero_f32(&self, buf: &mut Vec<f32>) -> Result<()> {
        buf.fill(0.0);
        Ok(())
    }
    fn copy_act(
        &self,
        dst: &mut Vec<f32>,
        dst_off: usize,
        src: &Vec<f32>,
        src_off: usize,
        len: usize,
    ) -> Result<()> {
        check_min("copy_act", "dst", dst.len(), dst_off + len);
        check_min("copy_act", "src", src.len(), src_off + len);
        dst[dst_off..dst_off + len].copy_from_slice(&src[src_off..src_off + len]);
        Ok(())
    }
    fn synchronize(&self) -> Result<()> {
        Ok(())
    }

    fn embedding(&self, out: &mut Vec<f32>, table: &Vec<f32>, ids: &[u32], d: usize) -> Result<()> {
        elementwise::embedding(out, table, ids, d);
        Ok(())
    }

    fn linear(
        &self,
        y: &mut Vec<f32>,
        x: &Vec<f32>,
        w: &Vec<f32>,
        bias: Option<&Vec<f32>>,
        n: usize,
        d_in: usize,
        d_out: usize,
        accumulate: bool,
    ) -> Result<()> {
        linear::linear(y, x, w, bias.map(|b| &b[..]), n, d_in, d_out, accumulate);
        Ok(())
    }

    fn linear_bwd_input(
        &self,
        dx: &mut Vec<f32>,
        dy: &Vec<f32>,
        w: &Vec<f32>,
        n: usize,
        d_in: usize,
        d_out: usize,
        accumulate: bool,
    ) -> Result<()> {
        linear::linear_bwd_input(dx, dy, w, n, d_in, d_out, accumulate);
        Ok(())
    }

    fn lora_fwd(
        &self,
        y: &mut Vec<f32>,
        u: &mut Vec<f32>,
        x: &Vec<f32>,
        params: &Vec<f32>,
        slot: &LoraSlot,
        scale: f32,
        n: usize,
    ) -> Result<()> {
        linear::lora_fwd(y, u, x, params, slot, scale, n);
        Ok(())
    }

    fn lora_bwd(
        &self,
        dx: &mut Vec<f32>,
        grads: &mut Vec<f32>,
        dy: &Vec<f32>,
        x: &Vec<f32>,
        u: &Vec<f32>,
        params: &Vec<f32>,
        slot: &LoraSlot,
        scale: f32,
        n: usize,
    ) -> Result<()> {
        linear::lora_bwd(dx, grads, dy, x, u, params, slot, scale, n);
        Ok(())
    }

    fn residual_ablate_norm(
        &self,
        resid: &mut Vec<f32>,
        normed: &mut Vec<f32>,
        rstd: &mut Vec<f32>,
        a: &Vec<f32>,
        b: Option<&Vec<f32>>,
        directions: Option<(&Vec<f32>, usize)>,
        norm_w: &Vec<f32>,
        n: usize,
        d: usize,
        eps: f32,
    ) -> Result<()> {
        norm::residual_ablate_norm(
            resid,
            normed,
            rstd,
            a,
            b.map(|b| &b[..]),
            directions.map(|(q, k)| (&q[..], k)),
            norm_w,
            n,
            d,
            eps,
        );
        Ok(())
    }

    fn residual_ablate_norm_bwd(
        &self,
        dresid: &mut Vec<f32>,
        dnormed: &Vec<f32>,
        resid: &Vec<f32>,
        rstd: &Vec<f32>,
        directions: Option<(&Vec<f32>, usize)>,
        norm_w: &Vec<f32>,
        n: usize,
        d: usize,
    ) -> Result<()> {
        norm::residual_ablate_norm_bwd(
            dresid,
            dnormed,
            resid,
            rstd,
            directions.map(|(q, k)| (&q[..], k)),
            norm_w,
            n,
            d,
        );
        Ok(())
    }

    fn rope(
        &self,
        x: &mut Vec<f32>,
        table: &Vec<f32>,
        pos: &Vec<i32>,
        n: usize,
        n_heads: usize,
        head_dim: usize,
        inverse: bool,
    ) -> Result<()> {
        check_len("rope", "pos", pos.len(), n);
        elementwise::rope(x, table, pos, n_heads, head_dim, inverse);
        Ok(())
    }

    fn attention_fwd(
        &self,
        out: &mut Vec<f32>,
        lse: &mut Vec<f32>,
        q: &Vec<f32>,
        k: &Vec<f32>,
        v: &Vec<f32>,
        seqs: &Seqs<Vec<i32>>,
        shape: &AttnShape,
    ) -> Result<()> {
        attention::attention_fwd(out, lse, q, k, v, &seqs.cu, shape);
        Ok(())
    }

    fn attention_cached(
        &self,
        out: &mut Vec<f32>,
        q: &Vec<f32>,
        k: &Vec<f32>,
        v: &Vec<f32>,
        k_cache: &mut Vec<f32>,
        v_cache: &mut Vec<f32>,
        start: &[u32],
        shape: &CacheShape,
    ) -> Result<()> {
        attention::attention_cached(out, q, k, v, k_cache, v_cache, start, shape);
        Ok(())
    }

    fn attention_bwd(
        &self,
        dq: &mut Vec<f32>,
        dk: &mut Vec<f32>,
        dv: &mut Vec<f32>,
        dout: &Vec<f32>,
        out: &Vec<f32>,
        lse: &Vec<f32>,
        q: &Vec<f32>,
        k: &Vec<f32>,
        v: &Vec<f32>,
        seqs: &Seqs<Vec<i32>>,
        shape: &AttnShape,
    ) -> Result<()> {
        attention::attention_bwd(dq, dk, dv, dout, out, lse, q, k, v, &seqs.cu, shape);
        Ok(())
    }

    fn swiglu(&self, out: &mut Vec<f32>, gate: &Vec<f32>, up: &Vec<f32>) -> Result<()> {
        elementwise::swiglu(out, gate, up);
        Ok(())
    }

    fn swiglu_bwd(
        &self,
        dgate: &mut Vec<f32>,
        dup: &mut Vec<f32>,
        dout: &Vec<f32>,
        gate: &Vec<f32>,
        up: &Vec<f32>,
    ) -> Result<()> {
        elementwise::swiglu_bwd(dgate, dup, dout, gate, up);
        Ok(())
    }

    fn geglu(&self, out: &mut Vec<f32>, gate: &Vec<f32>, up: &Vec<f32>) -> Result<()> {
        elementwise::geglu(out, gate, up);
        Ok(())
    }

    fn geglu_bwd(
        &self,
        dgate: &mut Vec<f32>,
        dup: &mut Vec<f32>,
        dout: &Vec<f32>,
        gate: &Vec<f32>,
        up: &Vec<f32>,
    ) -> Result<()> {
        elementwise::geglu_bwd(dgate, dup, dout, gate, up);
        Ok(())
    }

    fn scale_act(&self, x: &mut Vec<f32>, s: f32) -> Result<()> {
        elementwise::scale(x, s);
        Ok(())
    }

    fn softcap(&self, x: &mut Vec<f32>, cap: f32) -> Result<()> {
        elementwise::softcap(x, cap);
        Ok(())
    }

    fn softcap_bwd(&self, dx: &mut Vec<f32>, y: &Vec<f32>, cap: f32) -> Result<()> {
        elementwise::softcap_bwd(dx, y, cap);
        Ok(())
    }

    fn cross_entropy(
        &self,
        logits: &mut Vec<f32>,
        loss_acc: &mut Vec<f32>,
        targets: &[i32],
        vocab: usize,
        grad_scale: Option<f32>,
    ) -> Result<()> {
        loss::cross_entropy(logits, loss_acc, targets, vocab, grad_scale);
        Ok(())
    }

    fn linear_bwd_weight(
        &self,
        dw: &mut Vec<f32>,
        off: usize,
        dy: &Vec<f32>,
        x: &Vec<f32>,
        n: usize,
        d_in: usize,
        d_out: usize,
    ) -> Result<()> {
        weight_grad::linear_bwd_weight(dw, off, dy, x, n, d_in, d_out);
        Ok(())
    }

    fn bias_bwd(
        &self,
        db: &mut Vec<f32>,
        off: usize,
        dy: &Vec<f32>,
        n: usize,
        d: usize,
    ) -> Result<()> {
        weight_grad::bias_bwd(db, off, dy, n, d);
        Ok(())
    }

    fn norm_weight_bwd(
        &self,
        dw: &mut Vec<f32>,
        off: usize,
        dnormed: &Vec<f32>,
        x: &Vec<f32>,
        rstd: &Vec<f32>,
        n: usize,
        d: usize,
    ) -> Result<()> {
        weight_grad::norm_weight_bwd(dw, off, dnormed, x, rstd, n, d);
        Ok(())
    }

    fn embedding_bwd(
        &self,
        dtable: &mut Vec<f32>,
        off: usize,
        dx: &Vec<f32>,
        ids: &[u32],
        d: usize,
    ) -> Result<()> {
        weight_grad::embedding_bwd(dtable, off, dx, ids, d);
        Ok(())
    }

    fn params_to_act(
        &self,
        dst: &mut Vec<f32>,
        src: &Vec<f32>,
        off: usize,
        add: f32,
    ) -> Result<()> {
        weight_grad::params_to_act(dst, src, off, add);
        Ok(())
    }

    fn sum_squares(&self, g: &Vec<f32>) -> Result<f64> {
        Ok(optim::sum_squares(g))
    }

    fn adamw(
        &self,
        params: &mut Vec<f32>,
        grads: &Vec<f32>,
        m: &mut Vec<f32>,
        v: &mut Vec<f32>,
        hp: &AdamStep,
    ) -> Result<()> {
        optim::adamw(params, grads, m, v, hp);
        Ok(())
    }
}
