//! The `Backend` trait: the model's ops, one method each, implemented once per device.
//!
//! The transformer in `model::transformer` is written once against this trait; `cpu` is the
//! f32 reference and `cuda` drives the NVRTC kernels and cuBLAS. There is no autograd: every op
//! that the training step differentiates has a hand-written `_bwd` twin.
//!
//! Layout conventions shared by every backend:
//! - Activations are row-major `[n, d]` with `n` token rows. The sequences of a micro-batch lie
//!   end to end (padding-free packing; a padded batch is the case of equal lengths): a [`Seqs`]
//!   says where each starts, and attention never looks across a boundary.
//! - Linear weights use the Hugging Face layout `W: [out, in]`, so a linear layer is
//!   `y = x Wᵀ (+ bias)`.
//! - Attention inputs come straight from the projections: `q: [n, n_heads*head_dim]`,
//!   `k, v: [n, n_kv_heads*head_dim]`; head `h` uses kv head `h / (n_heads / n_kv_heads)`.
//! - Two storage kinds: `Act` holds frozen weights and activations (f32 on the CPU, bf16 on a
//!   GPU); `F32` always holds f32 (LoRA parameters, their gradients and AdamW moments, rmsnorm
//!   statistics, attention log-sum-exps, ablation directions, loss accumulators).
//! - LoRA parameters of the whole model live in one flat `F32` buffer (and their gradients in a
//!   second one of the same length); a [`LoraSlot`] says where one adapted projection's `A` and
//!   `B` are. That makes AdamW and the gradient norm one pass over one buffer.

mod check;
pub mod cpu;
pub mod cuda;
pub mod device;

pub(crate) use check::{check_len, check_min};

use anyhow::Result;

/// Where one LoRA pair lives inside the flat parameter (and gradient) buffer.
/// `A: [r, d_in]` at `a_off`, `B: [d_out, r]` at `b_off`, as PEFT stores `lora_A.weight` and
/// `lora_B.weight`. The adapted projection computes `y = x Wᵀ + scale · (x Aᵀ) Bᵀ`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoraSlot {
    pub a_off: usize,
    pub b_off: usize,
    pub r: usize,
    pub d_in: usize,
    pub d_out: usize,
}

/// Where the sequences of one micro-batch lie among its `n` token rows, built once per
/// micro-batch ([`Backend::seqs`]) and read by every layer's rope and attention.
///
/// This is the variable-length layout of FlashAttention's `cu_seqlens`: sequence `s` owns rows
/// `cu[s] .. cu[s+1]`, `cu[0] = 0` and the last entry is `n`. Rows of one sequence sit at rope
/// positions `0, 1, ...` (restarting for each sequence, as transformers' padding-free path
/// does with `position_ids`).
pub struct Seqs<I> {
    /// Row offsets, host copy: `n_seqs + 1` entries.
    pub cu: Vec<usize>,
    /// The longest sequence (grid size of the attention kernels).
    pub max_len: usize,
    /// `cu` on the device, as i32.
    pub cu_dev: I,
    /// Each row's position in its sequence, on the device, as i32 (for [`Backend::rope`]).
    pub pos_dev: I,
}

impl<I> Seqs<I> {
    pub fn n_seqs(&self) -> usize {
        self.cu.len() - 1
    }
    pub fn rows(&self) -> usize {
        *self.cu.last().unwrap_or(&0)
    }
    /// The sequence lengths.
    pub fn lens(&self) -> impl Iterator<Item = usize> + '_ {
        self.cu.windows(2).map(|w| w[1] - w[0])
    }
}

/// The heads of one attention call and how scores are formed:
/// `s_ij = scale · q_i·k_j`, then with `softcap = Some(c)` `s_ij <- c · tanh(s_ij / c)`
/// (Gemma-2's attention logit soft-capping), then the causal / sliding-window mask.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttnShape {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// Sliding window (Mistral, Gemma-2): query `i` sees keys `j` with `i - window < j <= i`
    /// (positions within the query's own sequence).
    pub window: Option<usize>,
    /// `1/sqrt(head_dim)` for Llama-like models; Gemma-2 uses `query_pre_attn_scalar^-1/2`.
    pub scale: f32,
    pub softcap: Option<f32>,
}

impl AttnShape {
    /// Heads with the usual `1/sqrt(head_dim)` scale and no soft-capping.
    pub fn plain(
        n_heads: usize,
        n_kv_heads: usize,
        head_dim: usize,
        window: Option<usize>,
    ) -> Self {
        AttnShape {
            n_heads,
            n_kv_heads,
            head_dim,
            window,
            scale: (1.0 / (head_dim as f64).sqrt()) as f32,
            softcap: None,
        }
    }
    pub fn q_width(&self) -> usize {
        self.n_heads * self.head_dim
    }
    pub fn kv_width(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }
}

/// Shape of one [`Backend::attention_cached`] call.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CacheShape {
    pub batch: usize,
    /// New rows per sequence (the padded prompt length at prefill, 1 per decoding step).
    pub new: usize,
    /// Timeline rows already in the cache; the new rows go to `past .. past + new`.
    pub past: usize,
    /// Cache rows per sequence.
    pub cap: usize,
    /// Heads, scale, soft-capping and window, as in training.
    pub heads: AttnShape,
}

/// AdamW hyper-parameters for one step, PyTorch semantics (`torch.optim.AdamW`):
/// `m = b1 m + (1-b1) g; v = b2 v + (1-b2) g²; p -= lr·wd·p; p -= lr · m̂ / (sqrt(v̂) + eps)`
/// with `m̂ = m / (1 - b1^step)`, `v̂ = v / (1 - b2^step)`, `g = grad · grad_scale`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamStep {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// 1-based step count, for bias correction.
    pub step: u64,
    /// Multiplies every gradient first (gradient clipping folds in here).
    pub grad_scale: f32,
}

/// The constants of one AdamW step, formed in f64 from the hyper-parameters and rounded to f32
/// once, where PyTorch rounds them (it holds hyper-parameters as Python floats). The CPU
/// reference and the CUDA kernel both take exactly these, so they agree bit for bit on them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamScalars {
    pub grad_scale: f32,
    /// `1 - lr·wd`
    pub decay: f32,
    /// `1 - β1` (the weight of torch's lerp)
    pub w1: f32,
    pub beta2: f32,
    pub one_minus_beta2: f32,
    /// `sqrt(1 - β2^t)`
    pub bc2_sqrt: f32,
    pub eps: f32,
    /// `-lr / (1 - β1^t)`
    pub neg_step_size: f32,
}

impl AdamScalars {
    /// In the order of `adamw_f32`'s scalar parameters (kernels/optim.cu).
    pub fn to_array(self) -> [f32; 8] {
        [
            self.grad_scale,
            self.decay,
            self.w1,
            self.beta2,
            self.one_minus_beta2,
            self.bc2_sqrt,
            self.eps,
            self.neg_step_size,
        ]
    }
}

/// The f64 nearest to the shortest decimal that rounds to `x` (0.999f32 -> 0.999f64).
///
/// Hyper-parameters are written as decimals and PyTorch holds them as Python floats (f64);
/// `AdamStep` carries f32. Widening 0.999f32 directly gives 0.99900001287, which moves
/// `1 - β2` by 1.3e-5 relative; going through the decimal recovers the value the user wrote.
fn decimal(x: f32) -> f64 {
    x.to_string().parse().unwrap_or(x as f64)
}

impl AdamStep {
    /// This step's constants. Panics on β1 <= 0.5 (torch's lerp form is used, which is its
    /// form only for weights below one half) and on step 0 (steps are 1-based).
    pub fn scalars(&self) -> AdamScalars {
        assert!(self.step >= 1, "adamw: step is 1-based, got {}", self.step);
        let (lr, b1, b2) = (decimal(self.lr), decimal(self.beta1), decimal(self.beta2));
        let t = self.step.min(i32::MAX as u64) as i32;
        let bc1 = 1.0 - b1.powi(t);
        let bc2 = 1.0 - b2.powi(t);
        let w1 = 1.0 - b1;
        assert!(w1 < 0.5, "adamw: beta1 {b1} <= 0.5 is not supported");
        AdamScalars {
            grad_scale: self.grad_scale,
            decay: (1.0 - lr * decimal(self.weight_decay)) as f32,
            w1: w1 as f32,
            beta2: self.beta2,
            one_minus_beta2: (1.0 - b2) as f32,
            bc2_sqrt: bc2.sqrt() as f32,
            eps: decimal(self.eps) as f32,
            neg_step_size: (-(lr / bc1)) as f32,
        }
    }
}

/// A GPU's memory as a memory plan needs it ([`Backend::device_memory`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceMemory {
    /// Bytes free now (the context, and whatever else runs on the GPU, already taken).
    pub free: u64,
    pub total: u64,
    /// Bytes of one activation (`Act`) element: 2 for bf16.
    pub act_bytes: usize,
}

/// The model's ops. Every method works on whole buffers of the backend's own storage; sizes are
/// passed explicitly and checked by the implementation (a mismatch is a programming error and
/// panics with the op name). Methods that may fail for reasons outside the program (device
/// errors, out of memory) return `Result`.
pub trait Backend {
    /// Frozen weights and activations.
    type Act;
    /// f32 state: LoRA parameters, gradients, optimizer moments, statistics, directions.
    type F32;
    /// i32 index buffers: sequence offsets and token positions ([`Seqs`]).
    type Idx;

    /// A short name for messages ("cpu", "cuda:0 NVIDIA H200").
    fn name(&self) -> String;

    // ---- memory ---------------------------------------------------------------------------
    /// A new zero-filled activation buffer of `n` elements.
    fn alloc_act(&self, n: usize) -> Result<Self::Act>;
    fn alloc_f32(&self, n: usize) -> Result<Self::F32>;
    fn upload_act(&self, host: &[f32]) -> Result<Self::Act>;
    fn upload_f32(&self, host: &[f32]) -> Result<Self::F32>;
    fn upload_idx(&self, host: &[i32]) -> Result<Self::Idx>;
    fn download_act(&self, buf: &Self::Act) -> Result<Vec<f32>>;
    fn download_f32(&self, buf: &Self::F32) -> Result<Vec<f32>>;
    fn act_len(&self, buf: &Self::Act) -> usize;
    fn f32_len(&self, buf: &Self::F32) -> usize;
    /// The layout of sequences of lengths `lens` laid end to end (each >= 1), on the device.
    fn seqs(&self, lens: &[usize]) -> Result<Seqs<Self::Idx>> {
        let mut cu = Vec::with_capacity(lens.len() + 1);
        cu.push(0usize);
        let mut pos = Vec::with_capacity(lens.iter().sum());
        for &l in lens {
            assert!(l > 0, "seqs: a sequence of length 0");
            cu.push(cu[cu.len() - 1] + l);
            pos.extend(0..l as i32);
        }
        assert!(
            *cu.last().unwrap_or(&0) <= i32::MAX as usize,
            "seqs: more than 2^31 rows"
        );
        let cu_i32: Vec<i32> = cu.iter().map(|&c| c as i32).collect();
        Ok(Seqs {
            max_len: lens.iter().copied().max().unwrap_or(0),
            cu_dev: self.upload_idx(&cu_i32)?,
            pos_dev: self.upload_idx(&pos)?,
            cu,
        })
    }
    fn zero_act(&self, buf: &mut Self::Act) -> Result<()>;
    fn zero_f32(&self, buf: &mut Self::F32) -> Result<()>;
    /// `dst[dst_off..dst_off+len] = src[src_off..src_off+len]` (row slices of activations).
    fn copy_act(
        &self,
        dst: &mut Self::Act,
        dst_off: usize,
        src: &Self::Act,
        src_off: usize,
        len: usize,
    ) -> Result<()>;
    /// Wait for queued work (no-op on the CPU).
    fn synchronize(&self) -> Result<()>;
    /// Device memory in use now, in MiB (GPU backends; `None` where the host's RSS is the
    /// measure). Buffers are allocated up front, so after a step this is the step's peak.
    fn device_memory_used_mib(&self) -> Option<f64> {
        None
    }
    /// The device's memory for a memory plan (`train::plan`): free and total bytes now and the
    /// bytes of one activation element; `None` on the CPU, which has no fixed budget.
    fn device_memory(&self) -> Option<DeviceMemory> {
        None
    }

    // ---- embedding ------------------------------------------------------------------------
    /// `out[i, :] = table[ids[i], :]`, `table: [vocab, d]`. Ids are validated by the caller.
    fn embedding(
        &self,
        out: &mut Self::Act,
        table: &Self::Act,
        ids: &[u32],
        d: usize,
    ) -> Result<()>;

    // ---- linear layers ----------------------------------------------------------------------
    /// `y[n, d_out] (+)= x[n, d_in] Wᵀ (+ bias)` with `W: [d_out, d_in]`.
    /// With `accumulate` the product is added to `y` (the bias is still added once).
    #[allow(clippy::too_many_arguments)]
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
    ) -> Result<()>;
    /// Input gradient of a frozen linear layer: `dx[n, d_in] (+)= dy[n, d_out] W`.
    #[allow(clippy::too_many_arguments)]
    fn linear_bwd_input(
        &self,
        dx: &mut Self::Act,
        dy: &Self::Act,
        w: &Self::Act,
        n: usize,
        d_in: usize,
        d_out: usize,
        accumulate: bool,
    ) -> Result<()>;

    // ---- LoRA -------------------------------------------------------------------------------
    /// `u = x Aᵀ` (saved for the backward, `[n, r]`), then `y += scale · u Bᵀ`.
    #[allow(clippy::too_many_arguments)]
    fn lora_fwd(
        &self,
        y: &mut Self::Act,
        u: &mut Self::F32,
        x: &Self::Act,
        params: &Self::F32,
        slot: &LoraSlot,
        scale: f32,
        n: usize,
    ) -> Result<()>;
    /// Given `dy`, accumulate the LoRA gradients and the input gradient:
    /// `dB += scale · dyᵀ u`, `du = scale · dy B`, `dA += duᵀ x`, `dx += du A`.
    /// Gradients accumulate (`+=`) so micro-batches of one optimizer step add up.
    #[allow(clippy::too_many_arguments)]
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
    ) -> Result<()>;

    // ---- residual + ablation + rmsnorm (the fused op) ---------------------------------------
    /// The residual stream step with the concept ablation (docs/architecture.md, "One layer,
    /// and where the ablation is"):
    /// `s = a (+ b)`; with directions `q: [k, d]` (orthonormal rows) `s <- s - Qᵀ(Q s)` per row;
    /// `resid = s`; `normed = s · rstd · w` with `rstd = 1/sqrt(mean(s²) + eps)` saved per row.
    /// `b = None` is a plain rmsnorm of `a` (the first layer's input).
    #[allow(clippy::too_many_arguments)]
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
    ) -> Result<()>;
    /// Backward of `residual_ablate_norm`, in place on `dresid`:
    /// `dresid <- P (dresid + rmsnorm_bwd(dnormed))` with `P = I - QᵀQ` (identity without
    /// directions). On entry `dresid` is the gradient reaching `resid` through the skip path;
    /// on exit it is the gradient of the pre-add sum `s`, i.e. of both `a` and `b`.
    #[allow(clippy::too_many_arguments)]
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
    ) -> Result<()>;

    // ---- rotary embeddings ------------------------------------------------------------------
    /// Rotate `x: [n, n_heads*head_dim]` in place with the Hugging Face "rotate_half" pairing
    /// `(i, i + head_dim/2)`: `x1' = x1 cos - x2 sin`, `x2' = x2 cos + x1 sin`, where
    /// `cos/sin = table[p, i]`, `table: [max_pos, head_dim/2]` as `(cos, sin)` pairs
    /// interleaved (`table[2*(p*hd/2 + i)] = cos`, `+1 = sin`), and `p = pos[row]` (`n`
    /// entries: [`Seqs::pos_dev`] in training; generation passes each row's timeline position).
    /// `inverse` rotates by `-θ`, which is the backward (a rotation's transpose).
    #[allow(clippy::too_many_arguments)]
    fn rope(
        &self,
        x: &mut Self::Act,
        table: &Self::F32,
        pos: &Self::Idx,
        n: usize,
        n_heads: usize,
        head_dim: usize,
        inverse: bool,
    ) -> Result<()>;

    // ---- attention --------------------------------------------------------------------------
    /// Causal (optionally sliding-window, optionally soft-capped) softmax attention with GQA,
    /// within each sequence of `seqs` (a query never sees a key of another sequence).
    /// Writes `out: [n, n_heads*head_dim]` and `lse: [n_heads, n]` (natural-log log-sum-exp of
    /// each query row's final scores, for the backward).
    #[allow(clippy::too_many_arguments)]
    fn attention_fwd(
        &self,
        out: &mut Self::Act,
        lse: &mut Self::F32,
        q: &Self::Act,
        k: &Self::Act,
        v: &Self::Act,
        seqs: &Seqs<Self::Idx>,
        shape: &AttnShape,
    ) -> Result<()>;
    /// Attention of new rows against a per-sequence key/value cache (generation; no backward).
    /// The caches are `[batch*cap, kv_width]`, sequence `b` owning rows `b*cap .. (b+1)*cap`
    /// indexed by a shared timeline. First the new keys and values `k, v: [batch*new,
    /// kv_width]` (already rotated) are written to timeline rows `past .. past+new`; then new
    /// row `i` of sequence `b` (timeline `t = past + i`) attends, with the scores of
    /// `shape.heads`, to the cached rows `j` with `start[b] <= j <= t` (and `t - window < j`
    /// with a sliding window). `start[b]` is where sequence `b`'s tokens begin (prompts are
    /// left-padded to a common length); a row that sees no key (padding) gets zeros.
    /// `out: [batch*new, q_width]`.
    #[allow(clippy::too_many_arguments)]
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
    ) -> Result<()>;
    /// Gradients of `attention_fwd` (overwritten, not accumulated).
    #[allow(clippy::too_many_arguments)]
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
    ) -> Result<()>;

    // ---- MLP --------------------------------------------------------------------------------
    /// `out = silu(gate) * up`, elementwise.
    fn swiglu(&self, out: &mut Self::Act, gate: &Self::Act, up: &Self::Act) -> Result<()>;
    /// `dgate = dout · up · silu'(gate)`, `dup = dout · silu(gate)`.
    fn swiglu_bwd(
        &self,
        dgate: &mut Self::Act,
        dup: &mut Self::Act,
        dout: &Self::Act,
        gate: &Self::Act,
        up: &Self::Act,
    ) -> Result<()>;

    /// `out = gelu_tanh(gate) * up` (GeGLU, Gemma-2), with PyTorch's tanh-approximated GELU
    /// `gelu_tanh(x) = x/2 · (1 + tanh(√(2/π) (x + 0.044715 x³)))`.
    fn geglu(&self, out: &mut Self::Act, gate: &Self::Act, up: &Self::Act) -> Result<()>;
    /// `dgate = dout · up · gelu_tanh'(gate)`, `dup = dout · gelu_tanh(gate)`.
    fn geglu_bwd(
        &self,
        dgate: &mut Self::Act,
        dup: &mut Self::Act,
        dout: &Self::Act,
        gate: &Self::Act,
        up: &Self::Act,
    ) -> Result<()>;

    // ---- elementwise --------------------------------------------------------------------------
    /// `x <- s · x` in place, `s` first rounded to the activation type (as transformers casts
    /// Gemma's embedding normalizer `sqrt(hidden)` to the weights' dtype).
    fn scale_act(&self, x: &mut Self::Act, s: f32) -> Result<()>;
    /// Soft-capping in place: `x <- c · tanh(x / c)` (Gemma-2's final logits).
    fn softcap(&self, x: &mut Self::Act, cap: f32) -> Result<()>;
    /// Backward of [`Backend::softcap`] in place on the gradient, from the capped values `y`:
    /// `dx <- dx · (1 - (y/c)²)`.
    fn softcap_bwd(&self, dx: &mut Self::Act, y: &Self::Act, cap: f32) -> Result<()>;

    // ---- loss -------------------------------------------------------------------------------
    /// Cross-entropy of `logits: [n, vocab]` against `targets` (`-1` = ignored row).
    /// Adds `Σ_rows CE` over the non-ignored rows to `loss_acc[0]` and, when `grad_scale` is
    /// `Some(s)`, overwrites `logits` in place with `s · (softmax - onehot)` (zero on ignored
    /// rows), so no separate probability tensor exists.
    fn cross_entropy(
        &self,
        logits: &mut Self::Act,
        loss_acc: &mut Self::F32,
        targets: &[i32],
        vocab: usize,
        grad_scale: Option<f32>,
    ) -> Result<()>;

    // ---- full fine-tuning: gradients of the weights themselves ------------------------------
    // Weight gradients live in one flat f32 buffer (like LoRA's), each tensor at an offset;
    // every op here accumulates (`+=`) so micro-batches of one optimizer step add up.

    /// `dw[off .. off + d_out·d_in] += dyᵀ x`: the gradient of `W: [d_out, d_in]` in
    /// `y = x Wᵀ`, `dy: [n, d_out]`, `x: [n, d_in]`, accumulated in f32.
    #[allow(clippy::too_many_arguments)]
    fn linear_bwd_weight(
        &self,
        dw: &mut Self::F32,
        off: usize,
        dy: &Self::Act,
        x: &Self::Act,
        n: usize,
        d_in: usize,
        d_out: usize,
    ) -> Result<()>;
    /// `db[off + j] += Σ_i dy[i, j]` over the `n` rows of `dy: [n, d]` (a bias's gradient).
    fn bias_bwd(
        &self,
        db: &mut Self::F32,
        off: usize,
        dy: &Self::Act,
        n: usize,
        d: usize,
    ) -> Result<()>;
    /// The gradient of an rmsnorm gain: `dw[off + j] += Σ_i dnormed[i, j] · x[i, j] · rstd[i]`,
    /// where `normed = x · rstd · w` was formed by [`Backend::residual_ablate_norm`] from the
    /// saved `x` (its `resid` output) and `rstd`. Gemma's `1 + w` has the same gradient.
    #[allow(clippy::too_many_arguments)]
    fn norm_weight_bwd(
        &self,
        dw: &mut Self::F32,
        off: usize,
        dnormed: &Self::Act,
        x: &Self::Act,
        rstd: &Self::F32,
        n: usize,
        d: usize,
    ) -> Result<()>;
    /// The gradient of an embedding table: `dtable[off + ids[i]·d + j] += dx[i, j]`. Rows that
    /// share an id are added in the order of `i`, so the result is deterministic.
    fn embedding_bwd(
        &self,
        dtable: &mut Self::F32,
        off: usize,
        dx: &Self::Act,
        ids: &[u32],
        d: usize,
    ) -> Result<()>;
    /// `dst[i] = src[off + i] + add`, rounded to the activation type: the forward's copy of a
    /// master weight after an optimizer step (`add = 1` forms Gemma's `1 + w` gains in f32).
    fn params_to_act(
        &self,
        dst: &mut Self::Act,
        src: &Self::F32,
        off: usize,
        add: f32,
    ) -> Result<()>;

    // ---- data parallelism (`crate::dist`) ------------------------------------------------
    /// A new unique id for a data-parallel group (rank 0 makes it, the rendezvous hands it to
    /// the others). Only the CUDA backend has groups (NCCL).
    fn group_id(&self) -> Result<[u8; 128]> {
        anyhow::bail!(
            "{}: running on several processes needs the CUDA backend (NCCL)",
            self.name()
        )
    }
    /// Join the group of `size` ranks as `rank`; returns once every rank has joined.
    fn join_group(&self, rank: usize, size: usize, _id: &[u8; 128]) -> Result<()> {
        anyhow::bail!(
            "{}: cannot join a group of {size} as rank {rank}: running on several processes \
             needs the CUDA backend (NCCL)",
            self.name()
        )
    }
    /// This backend's place in its data-parallel group: `(rank, size)`, `(0, 1)` alone.
    fn group(&self) -> (usize, usize) {
        (0, 1)
    }
    /// `x <- Σ over the group's ranks of x`, the same bytes on every rank. Nothing outside a
    /// group.
    fn all_reduce_f32(&self, _x: &mut Self::F32) -> Result<()> {
        Ok(())
    }
    /// Host numbers summed across the group's ranks (f64). Nothing outside a group.
    fn all_reduce_host(&self, _x: &mut [f64]) -> Result<()> {
        Ok(())
    }
    /// ZeRO-1's gradient step: `recv <- Σ over ranks of send[rank·n .. (rank+1)·n]`, where
    /// `send` holds `size · n` values and `recv` `n`. Only in a group.
    fn reduce_scatter_f32(&self, _send: &Self::F32, _recv: &mut Self::F32) -> Result<()> {
        anyhow::bail!(
            "{}: reduce-scatter needs a data-parallel group",
            self.name()
        )
    }
    /// ZeRO-1's weight step: `recv[r·n .. (r+1)·n] <- send of rank r` for every rank `r`,
    /// where `send` holds `n` values and `recv` `size · n`. Only in a group.
    fn all_gather_f32(&self, _send: &Self::F32, _recv: &mut Self::F32) -> Result<()> {
        anyhow::bail!("{}: all-gather needs a data-parallel group", self.name())
    }

    // ---- optimizer --------------------------------------------------------------------------
    /// `Σ g²` over the whole buffer (for the global gradient norm).
    fn sum_squares(&self, g: &Self::F32) -> Result<f64>;
    /// One AdamW step over the whole flat parameter buffer. Every parameter is a LoRA parameter
    /// and all of them decay, as PEFT + `torch.optim.AdamW` do.
    fn adamw(
        &self,
        params: &mut Self::F32,
        grads: &Self::F32,
        m: &mut Self::F32,
        v: &mut Self::F32,
        hp: &AdamStep,
    ) -> Result<()>;
}
