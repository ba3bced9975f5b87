//! One decoder layer, forward and backward, in three parts so activation checkpointing can
//! keep or recompute each (see [`Checkpointing`]):
//!
//! ```text
//! attention part  q,k,v = n1 W{q,k,v}ᵀ (+ b) + LoRA; (Qwen3: q,k <- rmsnorm per head);
//!                 rope; att = attention(q, k, v)
//!                 o = att Woᵀ + LoRA;  h_mid = resid_l + o;  n2 = rmsnorm(h_mid)
//! MLP part        gate, up = n2 W{g,u}ᵀ + LoRA;  act = silu(gate) ⊙ up;  o = act Wdᵀ + LoRA
//! output          resid_{l+1} = P_l (h_mid + o);  n1' = rmsnorm(resid_{l+1})  (the ablation)
//! ```
//!
//! A recomputed part runs the very same ops on the very same inputs as the forward did, so its
//! outputs (and the gradients computed from them) are bit-identical to the saved ones.

use super::{LoraState, Weights};
use crate::backend::{AttnShape, Backend, Seqs};
use crate::model::config::{MlpAct, ModelConfig};
use crate::model::full::{FullLayout, Param};
use crate::model::lora::{LoraLayout, Target};
use anyhow::Result;

/// What the backward keeps of each layer, and what it recomputes from the layer's input.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Checkpointing {
    /// Keep every activation of every layer (fastest, most memory).
    #[default]
    None,
    /// Keep the attention part (its recomputation would rerun attention) and recompute the
    /// MLP part, whose `gate` and `up` (2 x ffn per token) are most of a layer's activations.
    Selective,
    /// Keep only each layer's input (`resid_l` and its norm); recompute the whole layer.
    Full,
}

impl Checkpointing {
    pub const NAMES: &'static str = "none, selective or full";

    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "none" => Checkpointing::None,
            "selective" => Checkpointing::Selective,
            "full" => Checkpointing::Full,
            _ => anyhow::bail!("unknown checkpointing mode {s:?}: use {}", Self::NAMES),
        })
    }

    /// Slot of layer `l`'s attention activations (one shared slot when they are recomputed).
    pub(super) fn attn_slot(self, l: usize) -> usize {
        match self {
            Checkpointing::Full => 0,
            _ => l,
        }
    }

    /// Slot of layer `l`'s MLP activations.
    pub(super) fn mlp_slot(self, l: usize) -> usize {
        match self {
            Checkpointing::None => l,
            _ => 0,
        }
    }

    /// How many layers' attention / MLP activations are allocated.
    pub(super) fn slots(self, layers: usize) -> (usize, usize) {
        match self {
            Checkpointing::None => (layers, layers),
            Checkpointing::Selective => (layers, 1),
            Checkpointing::Full => (1, 1),
        }
    }
}

impl std::fmt::Display for Checkpointing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Checkpointing::None => "none",
            Checkpointing::Selective => "selective",
            Checkpointing::Full => "full",
        })
    }
}

/// The attention part's saved activations. `lora_u[t]` (`x Aᵀ`) for t in q, k, v, o.
pub(super) struct AttnActs<B: Backend> {
    pub q: B::Act,
    pub k: B::Act,
    pub v: B::Act,
    pub att: B::Act,
    pub lse: B::F32,
    pub h_mid: B::Act,
    pub n2: B::Act,
    pub rstd2: B::F32,
    pub lora_u: [Option<B::F32>; 7],
    /// Qwen3: q and k before their per-head norm, and the norms' `1/rms` per head row.
    pub qk_pre: Option<QkPre<B>>,
    /// Gemma: the attention output before its norm, and the norm's `1/rms`.
    pub o_pre: Option<(B::Act, B::F32)>,
}

pub(super) struct QkPre<B: Backend> {
    pub q: B::Act,
    pub k: B::Act,
    pub q_rstd: B::F32,
    pub k_rstd: B::F32,
}

/// The MLP part's saved activations. `lora_u[t]` for t in gate, up, down.
pub(super) struct MlpActs<B: Backend> {
    pub gate: B::Act,
    pub up: B::Act,
    pub lora_u: [Option<B::F32>; 7],
    /// Gemma: the MLP output before its norm, and the norm's `1/rms`.
    pub down_pre: Option<(B::Act, B::F32)>,
}

/// Working buffers of one layer, shared by all layers.
pub(super) struct Scratch<B: Backend> {
    /// Output of the o and down projections.
    pub o: B::Act,
    pub act: B::Act,
    pub dres: B::Act,
    pub dn: B::Act,
    pub d_att: B::Act,
    pub dq: B::Act,
    pub dk: B::Act,
    pub dv: B::Act,
    pub d_act: B::Act,
    pub d_gate: B::Act,
    pub d_up: B::Act,
    /// Qwen3: gradients of q and k before their norms.
    pub dqk_pre: Option<(B::Act, B::Act)>,
    /// Gemma: the normed attention / MLP output (what is added to the residual stream), and
    /// the gradient of a sandwich norm's input.
    pub sandwich: Option<(B::Act, B::Act)>,
}

impl<B: Backend> Scratch<B> {
    /// What the attention or MLP part adds to the residual stream: its output `o`, or (Gemma)
    /// that output normed.
    pub fn added(&self) -> &B::Act {
        self.sandwich.as_ref().map_or(&self.o, |(p, _)| p)
    }
}

/// The adapters of a forward: parameters, scale, where each pair lives.
pub(super) struct LoraView<'a, B: Backend> {
    pub params: &'a B::F32,
    pub scale: f32,
    pub layout: &'a LoraLayout,
}

impl<'a, B: Backend> LoraView<'a, B> {
    pub fn of(s: &'a LoraState<B>) -> Self {
        LoraView {
            params: &s.params,
            scale: s.scale,
            layout: &s.layout,
        }
    }
}

/// Allocate layer `l`'s `u` buffers for `targets` (those that have an adapter).
pub(super) fn alloc_lora_u<B: Backend>(
    be: &B,
    lora: Option<&LoraState<B>>,
    l: usize,
    n: usize,
    targets: &[Target],
) -> Result<[Option<B::F32>; 7]> {
    let mut u: [Option<B::F32>; 7] = Default::default();
    if let Some(lora) = lora {
        for &t in targets {
            if let Some(s) = lora.layout.slot(l, t) {
                u[t as usize] = Some(be.alloc_f32(n * s.r)?);
            }
        }
    }
    Ok(u)
}

/// Everything one layer's ops share within a micro-batch.
pub(super) struct Layer<'a, B: Backend> {
    pub be: &'a B,
    pub cfg: &'a ModelConfig,
    pub w: &'a Weights<B>,
    pub rope: &'a B::F32,
    pub seqs: &'a Seqs<B::Idx>,
    pub shape: AttnShape,
    /// Token rows.
    pub n: usize,
    pub l: usize,
}

impl<B: Backend> Layer<'_, B> {
    /// `y = x Wᵀ (+ bias) (+ LoRA)` for projection `t`, saving the LoRA `u` when adapted.
    #[allow(clippy::too_many_arguments)]
    fn proj(
        &self,
        lora: Option<&LoraView<B>>,
        y: &mut B::Act,
        u: &mut Option<B::F32>,
        x: &B::Act,
        wt: &B::Act,
        bias: Option<&B::Act>,
        t: Target,
    ) -> Result<()> {
        let (d_in, d_out) = t.dims(self.cfg);
        self.be.linear(y, x, wt, bias, self.n, d_in, d_out, false)?;
        if let (Some(lo), Some(u)) = (lora, u.as_mut()) {
            let slot = lo.layout.slot(self.l, t).expect("slot for allocated u");
            self.be
                .lora_fwd(y, u, x, lo.params, slot, lo.scale, self.n)?;
        }
        Ok(())
    }

    /// The attention part, from `n1 = rmsnorm(resid_l)` and `resid_l`, using the scratch.
    pub fn attn_fwd(
        &self,
        lora: Option<&LoraView<B>>,
        n1: &B::Act,
        resid: &B::Act,
        la: &mut AttnActs<B>,
        s: &mut Scratch<B>,
    ) -> Result<()> {
        let (be, cfg, n) = (self.be, self.cfg, self.n);
        let lw = &self.w.layers[self.l];
        let (nh, nkv, hd) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let [uq, uk, uv, uo, ..] = &mut la.lora_u;
        match (&mut la.qk_pre, &lw.qk_norm) {
            (Some(pre), Some((wqn, wkn))) => {
                // Qwen3: the projections go to the (free) dq/dk scratch, then each head row is
                // normalised into q/k; the pre-norm copy is kept for the norm's backward.
                let eps = cfg.rms_norm_eps as f32;
                self.proj(lora, &mut s.dq, uq, n1, &lw.wq, lw.bq.as_ref(), Target::Q)?;
                self.proj(lora, &mut s.dk, uk, n1, &lw.wk, lw.bk.as_ref(), Target::K)?;
                be.residual_ablate_norm(
                    &mut pre.q,
                    &mut la.q,
                    &mut pre.q_rstd,
                    &s.dq,
                    None,
                    None,
                    wqn,
                    n * nh,
                    hd,
                    eps,
                )?;
                be.residual_ablate_norm(
                    &mut pre.k,
                    &mut la.k,
                    &mut pre.k_rstd,
                    &s.dk,
                    None,
                    None,
                    wkn,
                    n * nkv,
                    hd,
                    eps,
                )?;
            }
            _ => {
                self.proj(lora, &mut la.q, uq, n1, &lw.wq, lw.bq.as_ref(), Target::Q)?;
                self.proj(lora, &mut la.k, uk, n1, &lw.wk, lw.bk.as_ref(), Target::K)?;
            }
        }
        self.proj(lora, &mut la.v, uv, n1, &lw.wv, lw.bv.as_ref(), Target::V)?;
        let o = &mut s.o;
        let pos = &self.seqs.pos_dev;
        be.rope(&mut la.q, self.rope, pos, n, nh, hd, false)?;
        be.rope(&mut la.k, self.rope, pos, n, nkv, hd, false)?;
        be.attention_fwd(
            &mut la.att,
            &mut la.lse,
            &la.q,
            &la.k,
            &la.v,
            self.seqs,
            &self.shape,
        )?;
        self.proj(lora, o, uo, &la.att, &lw.wo, None, Target::O)?;
        let eps = cfg.rms_norm_eps as f32;
        if let (Some((o_pre, rstd)), Some((w_attn, _)), Some((p, _))) =
            (&mut la.o_pre, &lw.sandwich, &mut s.sandwich)
        {
            be.residual_ablate_norm(
                o_pre,
                p,
                rstd,
                o,
                None,
                None,
                w_attn,
                n,
                cfg.hidden_size,
                eps,
            )?;
        }
        be.residual_ablate_norm(
            &mut la.h_mid,
            &mut la.n2,
            &mut la.rstd2,
            resid,
            Some(s.added()),
            None,
            &lw.post_norm,
            n,
            cfg.hidden_size,
            cfg.rms_norm_eps as f32,
        )
    }

    /// The MLP part, from `n2`; leaves `act` and the down projection `o` in the scratch.
    pub fn mlp_fwd(
        &self,
        lora: Option<&LoraView<B>>,
        n2: &B::Act,
        lm: &mut MlpActs<B>,
        s: &mut Scratch<B>,
    ) -> Result<()> {
        let (act, o) = (&mut s.act, &mut s.o);
        let lw = &self.w.layers[self.l];
        let [.., ug, uu, ud] = &mut lm.lora_u;
        self.proj(lora, &mut lm.gate, ug, n2, &lw.wg, None, Target::Gate)?;
        self.proj(lora, &mut lm.up, uu, n2, &lw.wu, None, Target::Up)?;
        self.glu(act, &lm.gate, &lm.up)?;
        self.proj(lora, o, ud, act, &lw.wd, None, Target::Down)?;
        if let (Some((d_pre, rstd)), Some((_, w_mlp)), Some((p, _))) =
            (&mut lm.down_pre, &lw.sandwich, &mut s.sandwich)
        {
            let (cfg, eps) = (self.cfg, self.cfg.rms_norm_eps as f32);
            self.be.residual_ablate_norm(
                d_pre,
                p,
                rstd,
                o,
                None,
                None,
                w_mlp,
                self.n,
                cfg.hidden_size,
                eps,
            )?;
        }
        Ok(())
    }

    fn glu(&self, out: &mut B::Act, gate: &B::Act, up: &B::Act) -> Result<()> {
        glu(self.be, self.cfg.mlp_act, out, gate, up)
    }

    fn glu_bwd(&self, s: &mut Scratch<B>, lm: &MlpActs<B>) -> Result<()> {
        let (dg, du, da) = (&mut s.d_gate, &mut s.d_up, &s.d_act);
        match self.cfg.mlp_act {
            MlpAct::Silu => self.be.swiglu_bwd(dg, du, da, &lm.gate, &lm.up),
            MlpAct::GeluTanh => self.be.geglu_bwd(dg, du, da, &lm.gate, &lm.up),
        }
    }

    /// The gradient of a sandwich norm's input from that of its output `dy` (Gemma), into the
    /// scratch; without sandwich norms `dy` itself.
    fn sandwich_bwd<'s>(
        &self,
        lg: &mut LayerGrads<B>,
        p: Param,
        dy: &'s B::Act,
        pre: Option<&(B::Act, B::F32)>,
        w: Option<&B::Act>,
        dx: Option<&'s mut B::Act>,
    ) -> Result<&'s B::Act> {
        match (pre, w, dx) {
            (Some((x, rstd)), Some(w), Some(dx)) => {
                lg.norm(self.be, p, dy, x, rstd, self.n, self.cfg.hidden_size)?;
                self.be.zero_act(dx)?;
                self.be.residual_ablate_norm_bwd(
                    dx,
                    dy,
                    x,
                    rstd,
                    None,
                    w,
                    self.n,
                    self.cfg.hidden_size,
                )?;
                Ok(dx)
            }
            _ => Ok(dy),
        }
    }

    /// The layer output: `resid_{l+1} = P_l (h_mid + o)` and its norm (the next layer's input
    /// norm, or the final norm).
    #[allow(clippy::too_many_arguments)]
    pub fn out_fwd(
        &self,
        h_mid: &B::Act,
        o: &B::Act,
        dirs: Option<(&B::F32, usize)>,
        resid: &mut B::Act,
        n1: &mut B::Act,
        rstd1: &mut B::F32,
    ) -> Result<()> {
        let cfg = self.cfg;
        self.be.residual_ablate_norm(
            resid,
            n1,
            rstd1,
            h_mid,
            Some(o),
            dirs,
            self.w.next_norm(self.l),
            self.n,
            cfg.hidden_size,
            cfg.rms_norm_eps as f32,
        )
    }

    /// Backward of the whole layer. On entry `s.dres` is the gradient reaching `resid_{l+1}`
    /// through the skip path and `s.dn` that of `n1_{l+1}`; on exit they are the gradients of
    /// `resid_l` (skip path) and of `n1_l`. LoRA gradients accumulate into `lg`.
    #[allow(clippy::too_many_arguments)]
    pub fn bwd(
        &self,
        lg: &mut LayerGrads<B>,
        la: &AttnActs<B>,
        lm: &MlpActs<B>,
        n1: &B::Act,
        resid_out: &B::Act,
        rstd_out: &B::F32,
        dirs: Option<(&B::F32, usize)>,
        s: &mut Scratch<B>,
    ) -> Result<()> {
        let (be, cfg, n, l) = (self.be, self.cfg, self.n, self.l);
        let d = cfg.hidden_size;
        let lw = &self.w.layers[l];
        // Through the layer-output fused op: dres = P(dres + rmsnorm_bwd(dn)).
        let next_norm = self.w.next_norm(l);
        let next_param = match l + 1 < cfg.num_layers {
            true => Param::InputNorm(l + 1),
            false => Param::FinalNorm,
        };
        lg.norm(be, next_param, &s.dn, resid_out, rstd_out, n, d)?;
        be.residual_ablate_norm_bwd(
            &mut s.dres,
            &s.dn,
            resid_out,
            rstd_out,
            dirs,
            next_norm,
            n,
            d,
        )?;
        // MLP: dres is the gradient of what the MLP added (through Gemma's norm: of down(act)).
        self.glu(&mut s.act, &lm.gate, &lm.up)?;
        let sw = lw.sandwich.as_ref();
        let d_down = self.sandwich_bwd(
            lg,
            Param::SandMlp(l),
            &s.dres,
            lm.down_pre.as_ref(),
            sw.map(|w| &w.1),
            s.sandwich.as_mut().map(|p| &mut p.1),
        )?;
        lg.bwd(
            be,
            l,
            Target::Down,
            &mut s.d_act,
            d_down,
            &s.act,
            &lw.wd,
            &lm.lora_u,
            false,
        )?;
        self.glu_bwd(s, lm)?;
        lg.bwd(
            be,
            l,
            Target::Gate,
            &mut s.dn,
            &s.d_gate,
            &la.n2,
            &lw.wg,
            &lm.lora_u,
            false,
        )?;
        lg.bwd(
            be,
            l,
            Target::Up,
            &mut s.dn,
            &s.d_up,
            &la.n2,
            &lw.wu,
            &lm.lora_u,
            true,
        )?;
        // Through the mid-layer fused op (no ablation): dres += rmsnorm_bwd(dn2).
        lg.norm(be, Param::PostNorm(l), &s.dn, &la.h_mid, &la.rstd2, n, d)?;
        be.residual_ablate_norm_bwd(
            &mut s.dres,
            &s.dn,
            &la.h_mid,
            &la.rstd2,
            None,
            &lw.post_norm,
            n,
            d,
        )?;
        // Attention output projection: dres is the gradient of what attention added.
        let d_o = self.sandwich_bwd(
            lg,
            Param::SandAttn(l),
            &s.dres,
            la.o_pre.as_ref(),
            sw.map(|w| &w.0),
            s.sandwich.as_mut().map(|p| &mut p.1),
        )?;
        lg.bwd(
            be,
            l,
            Target::O,
            &mut s.d_att,
            d_o,
            &la.att,
            &lw.wo,
            &la.lora_u,
            false,
        )?;
        be.attention_bwd(
            &mut s.dq,
            &mut s.dk,
            &mut s.dv,
            &s.d_att,
            &la.att,
            &la.lse,
            &la.q,
            &la.k,
            &la.v,
            self.seqs,
            &self.shape,
        )?;
        let (nh, nkv, hd) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let pos = &self.seqs.pos_dev;
        be.rope(&mut s.dq, self.rope, pos, n, nh, hd, true)?;
        be.rope(&mut s.dk, self.rope, pos, n, nkv, hd, true)?;
        let (dq, dk) = match (&la.qk_pre, &lw.qk_norm, &mut s.dqk_pre) {
            (Some(pre), Some((wqn, wkn)), Some((dq_pre, dk_pre))) => {
                // Through Qwen3's head norms (no skip path: the gradient starts at zero).
                lg.norm(be, Param::QNorm(l), &s.dq, &pre.q, &pre.q_rstd, n * nh, hd)?;
                lg.norm(be, Param::KNorm(l), &s.dk, &pre.k, &pre.k_rstd, n * nkv, hd)?;
                be.zero_act(dq_pre)?;
                be.zero_act(dk_pre)?;
                be.residual_ablate_norm_bwd(
                    dq_pre,
                    &s.dq,
                    &pre.q,
                    &pre.q_rstd,
                    None,
                    wqn,
                    n * nh,
                    hd,
                )?;
                be.residual_ablate_norm_bwd(
                    dk_pre,
                    &s.dk,
                    &pre.k,
                    &pre.k_rstd,
                    None,
                    wkn,
                    n * nkv,
                    hd,
                )?;
                (&*dq_pre, &*dk_pre)
            }
            _ => (&s.dq, &s.dk),
        };
        lg.bwd(
            be,
            l,
            Target::Q,
            &mut s.dn,
            dq,
            n1,
            &lw.wq,
            &la.lora_u,
            false,
        )?;
        lg.bwd(
            be,
            l,
            Target::K,
            &mut s.dn,
            dk,
            n1,
            &lw.wk,
            &la.lora_u,
            true,
        )?;
        lg.bwd(
            be,
            l,
            Target::V,
            &mut s.dn,
            &s.dv,
            n1,
            &lw.wv,
            &la.lora_u,
            true,
        )
        // Now dres is the gradient reaching resid_l through the skip path and dn the gradient
        // of n1_l; the next layer down combines them through its output op.
    }
}

/// The MLP's gate, `act(gate) · up`, with the model's activation.
pub(super) fn glu<B: Backend>(
    be: &B,
    act: MlpAct,
    out: &mut B::Act,
    gate: &B::Act,
    up: &B::Act,
) -> Result<()> {
    match act {
        MlpAct::Silu => be.swiglu(out, gate, up),
        MlpAct::GeluTanh => be.geglu(out, gate, up),
    }
}

/// Where the backward puts the gradients of trained parameters: LoRA's flat buffer, or full
/// fine-tuning's per-group buffers (either, or neither for a frozen model).
pub(super) struct LayerGrads<'a, B: Backend> {
    pub lora: Option<(LoraView<'a, B>, &'a mut B::F32)>,
    pub full: Option<FullGrads<'a, B>>,
    pub cfg: &'a ModelConfig,
    pub n: usize,
}

/// Full fine-tuning's gradient buffers, one per group (`model::full`).
pub(super) struct FullGrads<'a, B: Backend> {
    pub layout: &'a FullLayout,
    pub grads: [&'a mut B::F32; 2],
}

impl<B: Backend> FullGrads<'_, B> {
    /// The gradient buffer and offset of `p`, when it is trained.
    pub fn slot(&mut self, p: Param) -> Option<(&mut B::F32, usize)> {
        let s = self.layout.slot(p)?;
        Some((&mut *self.grads[s.group], s.off))
    }
}

impl<'a, B: Backend> LayerGrads<'a, B> {
    /// The adapters, for a recomputed forward.
    pub fn lora_view(&self) -> Option<&LoraView<'a, B>> {
        self.lora.as_ref().map(|(v, _)| v)
    }

    /// Backward of projection `t` of layer `l`, `y = x Wᵀ (+ b) (+ LoRA)`: the input gradient
    /// `dx (+)= dy W` (plus LoRA's `scale·(dy B) A`), and the gradients of what is trained:
    /// LoRA's `dA`, `dB`; with full fine-tuning `dW += dyᵀ x` and `db += Σ dy`.
    #[allow(clippy::too_many_arguments)]
    fn bwd(
        &mut self,
        be: &B,
        l: usize,
        t: Target,
        dx: &mut B::Act,
        dy: &B::Act,
        x: &B::Act,
        w: &B::Act,
        lora_u: &[Option<B::F32>; 7],
        accumulate: bool,
    ) -> Result<()> {
        let (d_in, d_out) = t.dims(self.cfg);
        let n = self.n;
        be.linear_bwd_input(dx, dy, w, n, d_in, d_out, accumulate)?;
        if let Some((v, grads)) = self.lora.as_mut() {
            if let (Some(slot), Some(u)) = (v.layout.slot(l, t), lora_u[t as usize].as_ref()) {
                be.lora_bwd(dx, grads, dy, x, u, v.params, slot, v.scale, n)?;
            }
        }
        if let Some(f) = self.full.as_mut() {
            if let Some((dw, off)) = f.slot(Param::Proj(l, t)) {
                be.linear_bwd_weight(dw, off, dy, x, n, d_in, d_out)?;
            }
            if let Some((db, off)) = f.slot(Param::Bias(l, t)) {
                be.bias_bwd(db, off, dy, n, d_out)?;
            }
        }
        Ok(())
    }

    /// The gradient of norm gain `p` (when trained) from that of the norm's output `dnormed`
    /// and its saved input `x` and `rstd` (`rows` rows of width `d`).
    #[allow(clippy::too_many_arguments)]
    pub fn norm(
        &mut self,
        be: &B,
        p: Param,
        dnormed: &B::Act,
        x: &B::Act,
        rstd: &B::F32,
        rows: usize,
        d: usize,
    ) -> Result<()> {
        if let Some((dw, off)) = self.full.as_mut().and_then(|f| f.slot(p)) {
            be.norm_weight_bwd(dw, off, dnormed, x, rstd, rows, d)?;
        }
        Ok(())
    }
}
