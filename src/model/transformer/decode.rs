//! Inference with a key/value cache: the same layer as the training forward (see the parent
//! module), run over new rows only, with every layer's rotated keys and values kept per
//! sequence so that each decoding step costs one row per sequence.
//!
//! Sequences share a timeline of `cap` cache rows. Prompts of different lengths are
//! left-padded to a common length `P`: sequence `b`'s tokens occupy timeline rows
//! `start[b] .. P` and everything it generates follows at `P, P+1, ...`. Its rope position at
//! timeline row `t` is `t - start[b]` (the padding rows clamp to 0 and are never attended to),
//! so a padded sequence computes exactly what it would alone. The ablation, when configured
//! and switched on (`Model::ablate`), is applied as in training.

use super::layer::{glu, QkPre};
use super::Model;
use crate::backend::{Backend, CacheShape};
use crate::model::lora::Target;
use anyhow::{bail, Result};

/// The per-layer key/value caches of a batch of sequences and the step buffers.
pub struct KvCache<B: Backend> {
    batch: usize,
    cap: usize,
    /// Timeline rows filled so far.
    len: usize,
    /// First timeline row of each sequence's tokens.
    start: Vec<u32>,
    k: Vec<B::Act>,
    v: Vec<B::Act>,
    bufs: Option<StepBufs<B>>,
}

impl<B: Backend> KvCache<B> {
    pub fn batch(&self) -> usize {
        self.batch
    }
    pub fn capacity(&self) -> usize {
        self.cap
    }
    /// Timeline rows filled (the padded prompt length plus the steps taken).
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Forget the rows after the first `len` (at least one, at most those filled), so that
    /// the next step continues from there: another continuation of the same prefix (the
    /// judge's number tree). The forgotten rows are overwritten by the steps that follow.
    pub fn rewind(&mut self, len: usize) -> Result<()> {
        if len == 0 || len > self.len {
            bail!("cannot rewind a cache of {} rows to {len}", self.len);
        }
        self.len = len;
        Ok(())
    }
}

/// Activations of one step of `rows = batch * new` token rows, reused while `new` repeats.
struct StepBufs<B: Backend> {
    rows: usize,
    embed: B::Act,
    resid: B::Act,
    resid_next: B::Act,
    n1: B::Act,
    rstd: B::F32,
    q: B::Act,
    k: B::Act,
    v: B::Act,
    att: B::Act,
    o: B::Act,
    h_mid: B::Act,
    n2: B::Act,
    gate: B::Act,
    up: B::Act,
    act: B::Act,
    /// `x Aᵀ` scratch for the adapted projections (`[rows, r]`).
    lora_u: Option<B::F32>,
    /// Qwen3's head norms: the projections of q and k, and the norms' outputs and statistics
    /// (the normed values go to `q`, `k`).
    qk_norm: Option<(B::Act, B::Act, QkPre<B>)>,
    /// Gemma: the normed attention / MLP output.
    sandwich: Option<B::Act>,
    last: B::Act,
    logits: B::Act,
}

impl<B: Backend> Model<B> {
    /// Empty caches for `batch` sequences of up to `cap` timeline rows (padded prompt plus
    /// generated tokens).
    pub fn new_cache(&mut self, be: &B, batch: usize, cap: usize) -> Result<KvCache<B>> {
        if batch == 0 || cap == 0 {
            bail!("a KV cache needs at least one sequence and one row (got {batch} x {cap})");
        }
        self.ensure_rope(be, cap)?;
        let kvw = self.cfg.num_kv_heads * self.cfg.head_dim;
        let n = self.cfg.num_layers;
        let alloc =
            || -> Result<Vec<B::Act>> { (0..n).map(|_| be.alloc_act(batch * cap * kvw)).collect() };
        Ok(KvCache {
            batch,
            cap,
            len: 0,
            start: vec![0; batch],
            k: alloc()?,
            v: alloc()?,
            bufs: None,
        })
    }

    /// Feed the prompts (one per sequence of the cache, any lengths >= 1) into an empty cache
    /// and return the logits of each prompt's last token, `[batch, vocab]`.
    pub fn prefill(
        &mut self,
        be: &B,
        cache: &mut KvCache<B>,
        prompts: &[Vec<u32>],
    ) -> Result<Vec<f32>> {
        if prompts.len() != cache.batch {
            bail!(
                "{} prompts for a cache of {} sequences",
                prompts.len(),
                cache.batch
            );
        }
        if !cache.is_empty() {
            bail!("prefill needs an empty cache ({} rows in use)", cache.len);
        }
        let p = prompts.iter().map(Vec::len).max().unwrap_or(0);
        if let Some(i) = prompts.iter().position(Vec::is_empty) {
            bail!("prompt {i} is empty");
        }
        let mut ids = Vec::with_capacity(cache.batch * p);
        for (b, pr) in prompts.iter().enumerate() {
            cache.start[b] = (p - pr.len()) as u32;
            ids.extend(std::iter::repeat_n(pr[0], p - pr.len()));
            ids.extend_from_slice(pr);
        }
        self.cache_step(be, cache, &ids, p)
    }

    /// Append one token to every sequence and return the next logits, `[batch, vocab]`.
    pub fn decode(&mut self, be: &B, cache: &mut KvCache<B>, ids: &[u32]) -> Result<Vec<f32>> {
        if cache.is_empty() {
            bail!("decode needs a prefilled cache");
        }
        self.cache_step(be, cache, ids, 1)
    }

    fn ensure_step_bufs(&self, be: &B, cache: &mut KvCache<B>, rows: usize) -> Result<()> {
        if cache.bufs.as_ref().is_some_and(|s| s.rows == rows) {
            return Ok(());
        }
        cache.bufs = None; // free the old step first
        let c = &self.cfg;
        let (d, f, v) = (c.hidden_size, c.intermediate_size, c.vocab_size);
        let (qw, kvw) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
        let act = |len: usize| be.alloc_act(len);
        let lora_u = match &self.lora {
            Some(lo) => Some(be.alloc_f32(rows * lo.layout.config.r)?),
            None => None,
        };
        cache.bufs = Some(StepBufs {
            rows,
            embed: act(rows * d)?,
            resid: act(rows * d)?,
            resid_next: act(rows * d)?,
            n1: act(rows * d)?,
            rstd: be.alloc_f32(rows)?,
            q: act(rows * qw)?,
            k: act(rows * kvw)?,
            v: act(rows * kvw)?,
            att: act(rows * qw)?,
            o: act(rows * d)?,
            h_mid: act(rows * d)?,
            n2: act(rows * d)?,
            gate: act(rows * f)?,
            up: act(rows * f)?,
            act: act(rows * f)?,
            lora_u,
            qk_norm: match c.qk_norm {
                true => Some((
                    act(rows * qw)?,
                    act(rows * kvw)?,
                    QkPre {
                        q: act(rows * qw)?,
                        k: act(rows * kvw)?,
                        q_rstd: be.alloc_f32(rows * c.num_heads)?,
                        k_rstd: be.alloc_f32(rows * c.num_kv_heads)?,
                    },
                )),
                false => None,
            },
            sandwich: match c.gemma_norms {
                true => Some(act(rows * d)?),
                false => None,
            },
            last: act(cache.batch * d)?,
            logits: act(cache.batch * v)?,
        });
        Ok(())
    }

    /// `new` rows per sequence (`ids: [batch*new]`) through every layer, appending to the
    /// caches; returns the logits of each sequence's last new row.
    fn cache_step(
        &mut self,
        be: &B,
        cache: &mut KvCache<B>,
        ids: &[u32],
        new: usize,
    ) -> Result<Vec<f32>> {
        let batch = cache.batch;
        if new == 0 || ids.len() != batch * new {
            bail!(
                "a cache step of {new} rows for {batch} sequences needs {} ids, got {}",
                batch * new,
                ids.len()
            );
        }
        if cache.len + new > cache.cap {
            bail!(
                "the KV cache is full: {} rows in use + {new} new > capacity {}",
                cache.len,
                cache.cap
            );
        }
        let v = self.cfg.vocab_size;
        if let Some(&id) = ids.iter().find(|&&id| id as usize >= v) {
            bail!("token id {id} is >= the vocabulary size {v}");
        }
        let rows = batch * new;
        self.ensure_step_bufs(be, cache, rows)?;
        let cfg = &self.cfg;
        let d = cfg.hidden_size;
        let eps = cfg.rms_norm_eps as f32;
        let past = cache.len;
        // Row `i` of sequence `b` sits at timeline row `past + i`, which is position
        // `past + i - start[b]` of that sequence (left padding sits below 0: clamped, never seen).
        let pos: Vec<i32> = cache
            .start
            .iter()
            .flat_map(|&s| (0..new).map(move |i| (past + i) as i32 - s as i32))
            .map(|p| p.max(0))
            .collect();
        let pos = be.upload_idx(&pos)?;
        let shape = |l: usize| CacheShape {
            batch,
            new,
            past,
            cap: cache.cap,
            heads: self.attn_shape(l, cache.cap),
        };
        let w = &self.w;
        let lora = self.lora.as_ref();
        let s = cache.bufs.as_mut().expect("step buffers allocated");
        // y = x Wᵀ (+ bias) (+ LoRA) for projection `t` of layer `l`.
        let proj = |be: &B,
                    y: &mut B::Act,
                    u: &mut Option<B::F32>,
                    x: &B::Act,
                    wt: &B::Act,
                    bias: Option<&B::Act>,
                    l: usize,
                    t: Target|
         -> Result<()> {
            let (d_in, d_out) = t.dims(cfg);
            be.linear(y, x, wt, bias, rows, d_in, d_out, false)?;
            if let (Some(lo), Some(u)) = (lora, u.as_mut()) {
                if let Some(slot) = lo.layout.slot(l, t) {
                    be.lora_fwd(y, u, x, &lo.params, slot, lo.scale, rows)?;
                }
            }
            Ok(())
        };

        be.embedding(&mut s.embed, &w.embed, ids, d)?;
        if cfg.gemma_norms {
            be.scale_act(&mut s.embed, (d as f64).sqrt() as f32)?;
        }
        be.residual_ablate_norm(
            &mut s.resid,
            &mut s.n1,
            &mut s.rstd,
            &s.embed,
            None,
            None,
            &w.layers[0].input_norm,
            rows,
            d,
            eps,
        )?;
        for l in 0..cfg.num_layers {
            let lw = &w.layers[l];
            let u = &mut s.lora_u;
            let (nh, nkv, hd) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
            match (&mut s.qk_norm, &lw.qk_norm) {
                (Some((q_in, k_in, pre)), Some((wqn, wkn))) => {
                    proj(be, q_in, u, &s.n1, &lw.wq, lw.bq.as_ref(), l, Target::Q)?;
                    proj(be, k_in, u, &s.n1, &lw.wk, lw.bk.as_ref(), l, Target::K)?;
                    let (q, k) = (&mut s.q, &mut s.k);
                    be.residual_ablate_norm(
                        &mut pre.q,
                        q,
                        &mut pre.q_rstd,
                        q_in,
                        None,
                        None,
                        wqn,
                        rows * nh,
                        hd,
                        eps,
                    )?;
                    be.residual_ablate_norm(
                        &mut pre.k,
                        k,
                        &mut pre.k_rstd,
                        k_in,
                        None,
                        None,
                        wkn,
                        rows * nkv,
                        hd,
                        eps,
                    )?;
                }
                _ => {
                    proj(be, &mut s.q, u, &s.n1, &lw.wq, lw.bq.as_ref(), l, Target::Q)?;
                    proj(be, &mut s.k, u, &s.n1, &lw.wk, lw.bk.as_ref(), l, Target::K)?;
                }
            }
            proj(be, &mut s.v, u, &s.n1, &lw.wv, lw.bv.as_ref(), l, Target::V)?;
            be.rope(&mut s.q, &self.rope, &pos, rows, nh, hd, false)?;
            be.rope(&mut s.k, &self.rope, &pos, rows, nkv, hd, false)?;
            be.attention_cached(
                &mut s.att,
                &s.q,
                &s.k,
                &s.v,
                &mut cache.k[l],
                &mut cache.v[l],
                &cache.start,
                &shape(l),
            )?;
            proj(be, &mut s.o, u, &s.att, &lw.wo, None, l, Target::O)?;
            // Gemma's sandwich norm of the attention output (resid_next is free scratch here).
            if let (Some((w_attn, _)), Some(p)) = (&lw.sandwich, &mut s.sandwich) {
                be.residual_ablate_norm(
                    &mut s.resid_next,
                    p,
                    &mut s.rstd,
                    &s.o,
                    None,
                    None,
                    w_attn,
                    rows,
                    d,
                    eps,
                )?;
            }
            be.residual_ablate_norm(
                &mut s.h_mid,
                &mut s.n2,
                &mut s.rstd,
                &s.resid,
                Some(s.sandwich.as_ref().unwrap_or(&s.o)),
                None,
                &lw.post_norm,
                rows,
                d,
                eps,
            )?;
            proj(be, &mut s.gate, u, &s.n2, &lw.wg, None, l, Target::Gate)?;
            proj(be, &mut s.up, u, &s.n2, &lw.wu, None, l, Target::Up)?;
            glu(be, cfg.mlp_act, &mut s.act, &s.gate, &s.up)?;
            proj(be, &mut s.o, u, &s.act, &lw.wd, None, l, Target::Down)?;
            if let (Some((_, w_mlp)), Some(p)) = (&lw.sandwich, &mut s.sandwich) {
                be.residual_ablate_norm(
                    &mut s.resid_next,
                    p,
                    &mut s.rstd,
                    &s.o,
                    None,
                    None,
                    w_mlp,
                    rows,
                    d,
                    eps,
                )?;
            }
            let next_norm = w.next_norm(l);
            let dirs = super::layer_dirs::<B>(&self.ablation, self.ablate, l);
            be.residual_ablate_norm(
                &mut s.resid_next,
                &mut s.n1,
                &mut s.rstd,
                &s.h_mid,
                Some(s.sandwich.as_ref().unwrap_or(&s.o)),
                dirs,
                next_norm,
                rows,
                d,
                eps,
            )?;
            std::mem::swap(&mut s.resid, &mut s.resid_next);
        }
        cache.len += new;
        // The lm head on each sequence's last row only.
        let last = if new == 1 {
            &s.n1
        } else {
            for b in 0..batch {
                be.copy_act(&mut s.last, b * d, &s.n1, ((b + 1) * new - 1) * d, d)?;
            }
            &s.last
        };
        let w_head = w.lm_head.as_ref().unwrap_or(&w.embed);
        be.linear(&mut s.logits, last, w_head, None, batch, d, v, false)?;
        if let Some(c) = cfg.final_softcap {
            be.softcap(&mut s.logits, c as f32)?;
        }
        be.download_act(&s.logits)
    }
}
