//! What training updates, seen from the model: full fine-tuning's state (`model::full`: f32
//! master weights, gradients and AdamW moments per decay group, the forward's copies refreshed
//! from them), and the one view the optimizer and checkpoints take of LoRA's or full
//! fine-tuning's buffers.

use super::{check_shape, Model, Weights};
use crate::backend::Backend;
use crate::model::full::{Freeze, FullLayout, Param};
use crate::model::lora::Target;
use crate::model::weights::WeightSource;
use anyhow::{bail, Context, Result};

/// One group of full fine-tuning's trained weights (`model::full`): f32 master values, their
/// gradients and AdamW moments, flat. Sharded (ZeRO-1, see [`Shard`]): `params` and `grads`
/// are padded to `ranks x shard.len` and `m`, `v` hold this rank's shard only.
pub struct ParamGroup<B: Backend> {
    pub params: B::F32,
    pub grads: B::F32,
    pub m: B::F32,
    pub v: B::F32,
    pub shard: Option<Shard<B>>,
}

/// ZeRO-1 in a data-parallel run of full fine-tuning: each rank owns one equal slice of a
/// group (the last padded with zeros). The gradients are reduce-scattered, so each rank
/// receives the sum of its slice only; AdamW updates the slice with moments of the slice's size
/// (optimizer memory / ranks); the updated slices are all-gathered into every rank's full
/// master copy, from which the forward's copies are refreshed.
pub struct Shard<B: Backend> {
    /// The slice's start in the group's padded buffers, and its length.
    pub off: usize,
    pub len: usize,
    /// This rank's master weights and summed gradients of the slice.
    pub params: B::F32,
    pub grads: B::F32,
}

/// Full fine-tuning's state: the layout and the decay / no-decay groups.
pub struct FullState<B: Backend> {
    pub layout: FullLayout,
    pub groups: [ParamGroup<B>; 2],
    /// Optimizer steps taken.
    pub step: u64,
}

/// One flat buffer of trained parameters with its gradient and AdamW moments, as the
/// optimizer sees it: LoRA has one, full fine-tuning one per group.
pub struct Trainable<'a, B: Backend> {
    pub params: &'a mut B::F32,
    pub grads: &'a mut B::F32,
    pub m: &'a mut B::F32,
    pub v: &'a mut B::F32,
    /// Whether weight decay applies.
    pub decay: bool,
}

impl<B: Backend> Weights<B> {
    /// The forward's copy of weight `p`.
    fn get_mut(&mut self, p: Param) -> Option<&mut B::Act> {
        Some(match p {
            Param::Embed => &mut self.embed,
            Param::LmHead => self.lm_head.as_mut()?,
            Param::FinalNorm => &mut self.final_norm,
            Param::InputNorm(l) => &mut self.layers.get_mut(l)?.input_norm,
            Param::PostNorm(l) => &mut self.layers.get_mut(l)?.post_norm,
            Param::SandAttn(l) => &mut self.layers.get_mut(l)?.sandwich.as_mut()?.0,
            Param::SandMlp(l) => &mut self.layers.get_mut(l)?.sandwich.as_mut()?.1,
            Param::QNorm(l) => &mut self.layers.get_mut(l)?.qk_norm.as_mut()?.0,
            Param::KNorm(l) => &mut self.layers.get_mut(l)?.qk_norm.as_mut()?.1,
            Param::Proj(l, t) => {
                let lw = self.layers.get_mut(l)?;
                match t {
                    Target::Q => &mut lw.wq,
                    Target::K => &mut lw.wk,
                    Target::V => &mut lw.wv,
                    Target::O => &mut lw.wo,
                    Target::Gate => &mut lw.wg,
                    Target::Up => &mut lw.wu,
                    Target::Down => &mut lw.wd,
                }
            }
            Param::Bias(l, t) => {
                let lw = self.layers.get_mut(l)?;
                match t {
                    Target::Q => lw.bq.as_mut()?,
                    Target::K => lw.bk.as_mut()?,
                    Target::V => lw.bv.as_mut()?,
                    _ => return None,
                }
            }
        })
    }
}

/// Every rank's slice of a sharded buffer (this rank's `mine`, the same length on every rank),
/// gathered in rank order on the host and cut to `len` values. The device holds only a
/// piece of a slice and the ranks' pieces at a time ([`gather_piece`] values a rank): a
/// checkpoint never needs a whole buffer's room. Every rank must call it.
fn gather_in_pieces<B: Backend>(be: &B, mine: &B::F32, len: usize) -> Result<Vec<f32>> {
    let (_, ranks) = be.group();
    let host = be.download_f32(mine)?;
    let n = host.len();
    let piece = gather_piece(n);
    let mut recv = be.alloc_f32(piece * ranks)?;
    let mut all = vec![0f32; n * ranks];
    for start in (0..n).step_by(piece) {
        let take = piece.min(n - start);
        let mut chunk = host[start..start + take].to_vec();
        chunk.resize(piece, 0.0);
        let send = be.upload_f32(&chunk)?;
        be.all_gather_f32(&send, &mut recv)?;
        let got = be.download_f32(&recv)?;
        for r in 0..ranks {
            all[r * n + start..r * n + start + take]
                .copy_from_slice(&got[r * piece..r * piece + take]);
        }
    }
    all.truncate(len);
    Ok(all)
}

/// Values a rank sends per all-gather when a checkpoint gathers a slice of `n`: an eighth of
/// it, at most 2^20 (the memory plan counts these buffers).
pub fn gather_piece(n: usize) -> usize {
    n.div_ceil(8).clamp(1, 1 << 20)
}

impl<B: Backend> Model<B> {
    /// Train every weight (less the `freeze` groups): the f32 master weights are read from
    /// `src` (the source of [`Model::new`]; Gemma's norm gains as stored, `w`, not `1 + w`).
    /// Host memory peaks at one group's master copy.
    pub fn set_full(&mut self, be: &B, src: &dyn WeightSource, freeze: Freeze) -> Result<()> {
        self.set_full_sharded(be, src, freeze, None)
    }

    /// [`Model::set_full`] as rank `rank` of `ranks` data-parallel ranks with the optimizer state
    /// sharded (ZeRO-1, [`Shard`]; `None`: not sharded), allocated sharded from the start so that
    /// the moments of the whole model never occupy the device.
    pub fn set_full_sharded(
        &mut self,
        be: &B,
        src: &dyn WeightSource,
        freeze: Freeze,
        shard: Option<(usize, usize)>,
    ) -> Result<()> {
        if self.lora.is_some() {
            bail!("full fine-tuning and LoRA adapters cannot be combined");
        }
        let layout = FullLayout::new(&self.cfg, freeze);
        let group = |g: usize| -> Result<ParamGroup<B>> {
            let mut host = vec![0f32; layout.group_len[g]];
            for s in layout.slots.iter().filter(|s| s.group == g) {
                check_shape(src, &s.name, &s.shape)?;
                let t = src.get(&s.name)?;
                host[s.off..s.off + s.len].copy_from_slice(&t.data);
            }
            let Some((rank, ranks)) = shard.filter(|&(_, n)| n > 1) else {
                let n = host.len();
                return Ok(ParamGroup {
                    params: be.upload_f32(&host)?,
                    grads: be.alloc_f32(n)?,
                    m: be.alloc_f32(n)?,
                    v: be.alloc_f32(n)?,
                    shard: None,
                });
            };
            // Equal slices, the last padded with zeros (no gradient ever reaches the padding).
            let n = host.len().div_ceil(ranks).max(1);
            host.resize(n * ranks, 0.0);
            let off = rank * n;
            Ok(ParamGroup {
                params: be.upload_f32(&host)?,
                grads: be.alloc_f32(n * ranks)?,
                m: be.alloc_f32(n)?,
                v: be.alloc_f32(n)?,
                shard: Some(Shard {
                    off,
                    len: n,
                    params: be.upload_f32(&host[off..off + n])?,
                    grads: be.alloc_f32(n)?,
                }),
            })
        };
        let groups = [group(0)?, group(1)?];
        self.full = Some(FullState {
            layout,
            groups,
            step: 0,
        });
        // The forward's copies from the masters, so both start from the same rounding.
        self.refresh_weights(be)
    }

    /// Whether the optimizer state is sharded across ranks (ZeRO-1).
    pub fn sharded(&self) -> bool {
        self.full
            .as_ref()
            .is_some_and(|f| f.groups.iter().any(|g| g.shard.is_some()))
    }

    /// Copy every trained master weight into the forward's copy (after an optimizer step);
    /// sharded, first gather every rank's updated slice into the full master copy.
    pub fn refresh_weights(&mut self, be: &B) -> Result<()> {
        let Some(full) = self.full.as_mut() else {
            return Ok(());
        };
        for g in &mut full.groups {
            if let Some(sh) = &g.shard {
                be.all_gather_f32(&sh.params, &mut g.params)
                    .context("gathering the updated weights of every rank")?;
            }
        }
        for s in &full.layout.slots {
            let dst = self
                .w
                .get_mut(s.param)
                .with_context(|| format!("{}: the model has no such weight", s.name))?;
            be.params_to_act(dst, &full.groups[s.group].params, s.off, s.gain_offset)?;
        }
        Ok(())
    }

    /// What the optimizer updates (LoRA's buffer or full fine-tuning's groups) and its step
    /// counter; an error when nothing is trained.
    pub fn trainable(&mut self) -> Result<(Vec<Trainable<'_, B>>, &mut u64)> {
        if let Some(l) = self.lora.as_mut() {
            let part = Trainable {
                params: &mut l.params,
                grads: &mut l.grads,
                m: &mut l.m,
                v: &mut l.v,
                decay: true,
            };
            return Ok((vec![part], &mut l.step));
        }
        let f = self
            .full
            .as_mut()
            .context("nothing is trained: call set_lora or set_full first")?;
        let [g0, g1] = &mut f.groups;
        let parts = [(g0, true), (g1, false)]
            .into_iter()
            .map(|(g, decay)| {
                // Sharded, AdamW sees this rank's slice and its moments.
                let (params, grads) = match &mut g.shard {
                    Some(sh) => (&mut sh.params, &mut sh.grads),
                    None => (&mut g.params, &mut g.grads),
                };
                Trainable {
                    params,
                    grads,
                    m: &mut g.m,
                    v: &mut g.v,
                    decay,
                }
            })
            .collect();
        Ok((parts, &mut f.step))
    }

    /// The trained parameters and their AdamW moments as flat host vectors, as checkpoints
    /// hold them: LoRA's buffer, or full fine-tuning's decay group then its no-decay group.
    /// Sharded, the moments are gathered from every rank first: every rank must call this.
    pub fn download_trained(&self, be: &B) -> Result<[Vec<f32>; 3]> {
        let mut out: [Vec<f32>; 3] = Default::default();
        match (&self.lora, &self.full) {
            (Some(l), _) => {
                for (o, buf) in out.iter_mut().zip([&l.params, &l.m, &l.v]) {
                    o.extend(be.download_f32(buf)?);
                }
            }
            (None, Some(f)) => {
                for (g, group) in f.groups.iter().enumerate() {
                    let len = f.layout.group_len[g];
                    let take = |o: &mut Vec<f32>, buf: &B::F32| -> Result<()> {
                        let host = be.download_f32(buf)?;
                        o.extend_from_slice(&host[..len]);
                        Ok(())
                    };
                    take(&mut out[0], &group.params)?;
                    for (k, moment) in [(1, &group.m), (2, &group.v)] {
                        if group.shard.is_some() {
                            let all = gather_in_pieces(be, moment, len)
                                .context("gathering the AdamW moments of every rank")?;
                            out[k].extend_from_slice(&all);
                        } else {
                            take(&mut out[k], moment)?;
                        }
                    }
                }
            }
            (None, None) => bail!("nothing is trained: call set_lora or set_full first"),
        }
        Ok(out)
    }

    /// Continue from [`Model::download_trained`]'s vectors after `step` optimizer steps
    /// (gradients zeroed, the forward's copies refreshed).
    pub fn upload_trained(
        &mut self,
        be: &B,
        params: &[f32],
        m: &[f32],
        v: &[f32],
        step: u64,
    ) -> Result<()> {
        let lens: Vec<usize> = match (&self.lora, &self.full) {
            (Some(l), _) => vec![be.f32_len(&l.params)],
            (None, Some(f)) => f.layout.group_len.to_vec(),
            (None, None) => bail!("nothing is trained: call set_lora or set_full first"),
        };
        let total: usize = lens.iter().sum();
        if [params.len(), m.len(), v.len()] != [total; 3] {
            bail!(
                "the stored parameters and moments have {}, {} and {} values, the model trains {total}",
                params.len(),
                m.len(),
                v.len()
            );
        }
        if let Some(l) = self.lora.as_mut() {
            l.params = be.upload_f32(params)?;
            l.m = be.upload_f32(m)?;
            l.v = be.upload_f32(v)?;
            be.zero_f32(&mut l.grads)?;
            l.step = step;
            return Ok(());
        }
        let f = self.full.as_mut().context("nothing is trained")?;
        let mut off = 0;
        for (group, &n) in f.groups.iter_mut().zip(&lens) {
            let slice = |x: &[f32]| x[off..off + n].to_vec();
            match &mut group.shard {
                Some(sh) => {
                    // Every rank holds all the weights and its slice of the moments.
                    let pad = |x: &[f32]| {
                        let mut h = slice(x);
                        h.resize(be.f32_len(&group.params), 0.0);
                        h
                    };
                    let (p_all, m_all, v_all) = (pad(params), pad(m), pad(v));
                    let mine = sh.off..sh.off + sh.len;
                    group.params = be.upload_f32(&p_all)?;
                    sh.params = be.upload_f32(&p_all[mine.clone()])?;
                    group.m = be.upload_f32(&m_all[mine.clone()])?;
                    group.v = be.upload_f32(&v_all[mine])?;
                    be.zero_f32(&mut sh.grads)?;
                }
                None => {
                    group.params = be.upload_f32(&slice(params))?;
                    group.m = be.upload_f32(&slice(m))?;
                    group.v = be.upload_f32(&slice(v))?;
                }
            }
            be.zero_f32(&mut group.grads)?;
            off += n;
        }
        f.step = step;
        self.refresh_weights(be)
    }

    /// Zero every gradient of what is trained.
    pub fn zero_grads(&mut self, be: &B) -> Result<()> {
        // Sharded, the backward's full buffers besides the slices AdamW sees.
        if let Some(f) = self.full.as_mut() {
            for g in f.groups.iter_mut().filter(|g| g.shard.is_some()) {
                be.zero_f32(&mut g.grads)?;
            }
        }
        let (parts, _) = self.trainable()?;
        for p in parts {
            be.zero_f32(p.grads)?;
        }
        Ok(())
    }

    /// Every gradient of what is trained summed across the ranks of the backend's
    /// data-parallel group (nothing outside one): all-reduced, or sharded, reduce-scattered
    /// into this rank's slice (the full buffer is then zeroed for the next accumulation).
    pub fn all_reduce_grads(&mut self, be: &B) -> Result<()> {
        if let Some(f) = self
            .full
            .as_mut()
            .filter(|f| f.groups.iter().any(|g| g.shard.is_some()))
        {
            for g in &mut f.groups {
                if let Some(sh) = &mut g.shard {
                    be.reduce_scatter_f32(&g.grads, &mut sh.grads)?;
                    be.zero_f32(&mut g.grads)?;
                }
            }
            return Ok(());
        }
        let (parts, _) = self.trainable()?;
        for p in parts {
            be.all_reduce_f32(p.grads)?;
        }
        Ok(())
    }

    /// `Σ g²` over every gradient of what is trained (sharded: over every rank's slice).
    pub fn grad_sum_squares(&mut self, be: &B) -> Result<f64> {
        let sharded = self.sharded();
        let (parts, _) = self.trainable()?;
        let mut s = 0.0;
        for p in &parts {
            s += be.sum_squares(p.grads)?;
        }
        if sharded {
            let mut all = [s];
            be.all_reduce_host(&mut all)?;
            s = all[0];
        }
        Ok(s)
    }
}
