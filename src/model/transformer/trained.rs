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
/// gradients and AdamW moments, flat.
pub struct ParamGroup<B: Backend> {
    pub params: B::F32,
    pub grads: B::F32,
    pub m: B::F32,
    pub v: B::F32,
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

impl<B: Backend> Model<B> {
    /// Train every weight (less the `freeze` groups): the f32 master weights are read from
    /// `src` (the source of [`Model::new`]; Gemma's norm gains as stored, `w`, not `1 + w`).
    /// Host memory peaks at one group's master copy.
    pub fn set_full(&mut self, be: &B, src: &dyn WeightSource, freeze: Freeze) -> Result<()> {
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
            let n = host.len();
            Ok(ParamGroup {
                params: be.upload_f32(&host)?,
                grads: be.alloc_f32(n)?,
                m: be.alloc_f32(n)?,
                v: be.alloc_f32(n)?,
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

    /// Copy every trained master weight into the forward's copy (after an optimizer step).
    pub fn refresh_weights(&mut self, be: &B) -> Result<()> {
        let Some(full) = self.full.as_ref() else {
            return Ok(());
        };
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
            .map(|(g, decay)| Trainable {
                params: &mut g.params,
                grads: &mut g.grads,
                m: &mut g.m,
                v: &mut g.v,
                decay,
            })
            .collect();
        Ok((parts, &mut f.step))
    }

    /// The trained parameters and their AdamW moments as flat host vectors, as checkpoints
    /// hold them: LoRA's buffer, or full fine-tuning's decay group then its no-decay group.
    pub fn download_trained(&self, be: &B) -> Result<[Vec<f32>; 3]> {
        let bufs: Vec<[&B::F32; 3]> = match (&self.lora, &self.full) {
            (Some(l), _) => vec![[&l.params, &l.m, &l.v]],
            (None, Some(f)) => f.groups.iter().map(|g| [&g.params, &g.m, &g.v]).collect(),
            (None, None) => bail!("nothing is trained: call set_lora or set_full first"),
        };
        let mut out: [Vec<f32>; 3] = Default::default();
        for b in bufs {
            for (o, buf) in out.iter_mut().zip(b) {
                o.extend(be.download_f32(buf)?);
            }
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
        let (parts, st) = self.trainable()?;
        let total: usize = parts.iter().map(|p| be.f32_len(p.params)).sum();
        if [params.len(), m.len(), v.len()] != [total; 3] {
            bail!(
                "the stored parameters and moments have {}, {} and {} values, the model trains {total}",
                params.len(),
                m.len(),
                v.len()
            );
        }
        let mut off = 0;
        for p in parts {
            let n = be.f32_len(p.params);
            *p.params = be.upload_f32(&params[off..off + n])?;
            *p.m = be.upload_f32(&m[off..off + n])?;
            *p.v = be.upload_f32(&v[off..off + n])?;
            be.zero_f32(p.grads)?;
            off += n;
        }
        *st = step;
        self.refresh_weights(be)
    }

    /// Zero every gradient of what is trained.
    pub fn zero_grads(&mut self, be: &B) -> Result<()> {
        let (parts, _) = self.trainable()?;
        for p in parts {
            be.zero_f32(p.grads)?;
        }
        Ok(())
    }

    /// Every gradient of what is trained summed across the ranks of the backend's
    /// data-parallel group (nothing outside one).
    pub fn all_reduce_grads(&mut self, be: &B) -> Result<()> {
        let (parts, _) = self.trainable()?;
        for p in parts {
            be.all_reduce_f32(p.grads)?;
        }
        Ok(())
    }

    /// `Σ g²` over every gradient of what is trained.
    pub fn grad_sum_squares(&mut self, be: &B) -> Result<f64> {
        let (parts, _) = self.trainable()?;
        let mut s = 0.0;
        for p in &parts {
            s += be.sum_squares(p.grads)?;
        }
        Ok(s)
    }
}
