//! Full fine-tuning: which weights are trained, and where each lives in the flat f32 buffers
//! of the master weights, their gradients and AdamW moments.
//!
//! Mixed precision as the transformers Trainer runs bf16 on an f32 model: the optimizer holds
//! f32 master weights and moments; the forward and backward read a copy in the activation type
//! (bf16 on a GPU, the f32 values themselves on the CPU), refreshed after every optimizer
//! step; weight gradients are reduced into f32.
//!
//! The trained tensors form two groups, as `Trainer.get_decay_parameter_names` builds them:
//! weight decay on the linear weights and the embeddings, none on biases and norm gains. Each
//! group is one flat buffer, so AdamW is one pass per group and the gradient norm one sum over
//! both. Tied embeddings are one tensor, trained once (both its uses add to one gradient).

use crate::model::config::ModelConfig;
use crate::model::lora::Target;
use anyhow::{bail, Result};
use std::collections::HashMap;

/// One weight tensor of the model, by its role.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Param {
    Embed,
    /// The untied output projection.
    LmHead,
    FinalNorm,
    /// Layer `l`'s input norm.
    InputNorm(usize),
    /// The norm before the MLP (Gemma: `pre_feedforward_layernorm`).
    PostNorm(usize),
    /// Gemma's norm of the attention output (`post_attention_layernorm`).
    SandAttn(usize),
    /// Gemma's norm of the MLP output (`post_feedforward_layernorm`).
    SandMlp(usize),
    /// Qwen3's per-head norms of q and k.
    QNorm(usize),
    KNorm(usize),
    Proj(usize, Target),
    /// Qwen2's q/k/v biases.
    Bias(usize, Target),
}

impl Param {
    /// The Hugging Face tensor name.
    pub fn name(self, cfg: &ModelConfig) -> String {
        let layer = |l: usize, rest: &str| format!("model.layers.{l}.{rest}");
        match self {
            Param::Embed => "model.embed_tokens.weight".into(),
            Param::LmHead => "lm_head.weight".into(),
            Param::FinalNorm => "model.norm.weight".into(),
            Param::InputNorm(l) => layer(l, "input_layernorm.weight"),
            Param::PostNorm(l) if cfg.gemma_norms => layer(l, "pre_feedforward_layernorm.weight"),
            Param::PostNorm(l) => layer(l, "post_attention_layernorm.weight"),
            Param::SandAttn(l) => layer(l, "post_attention_layernorm.weight"),
            Param::SandMlp(l) => layer(l, "post_feedforward_layernorm.weight"),
            Param::QNorm(l) => layer(l, "self_attn.q_norm.weight"),
            Param::KNorm(l) => layer(l, "self_attn.k_norm.weight"),
            Param::Proj(l, t) => layer(l, &format!("{}.{}.weight", t.parent(), t.module_name())),
            Param::Bias(l, t) => layer(l, &format!("{}.{}.bias", t.parent(), t.module_name())),
        }
    }

    fn is_norm(self) -> bool {
        matches!(
            self,
            Param::FinalNorm
                | Param::InputNorm(_)
                | Param::PostNorm(_)
                | Param::SandAttn(_)
                | Param::SandMlp(_)
                | Param::QNorm(_)
                | Param::KNorm(_)
        )
    }

    /// Weight decay applies (the Trainer's rule: not to biases, not to norm gains).
    pub fn decays(self) -> bool {
        !self.is_norm() && !matches!(self, Param::Bias(..))
    }
}

/// Groups of weights `--freeze` can leave untrained.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Freeze {
    /// The input embedding table (with tied embeddings, the output projection too: one
    /// tensor).
    pub embeddings: bool,
    /// Every norm gain.
    pub norms: bool,
}

impl Freeze {
    pub const GROUPS: &'static str = "embeddings, norms";

    /// Parse a comma-separated list of groups (`""` freezes nothing).
    pub fn parse(list: &str) -> Result<Freeze> {
        let mut f = Freeze::default();
        for g in list.split(',').map(str::trim).filter(|g| !g.is_empty()) {
            match g {
                "embeddings" => f.embeddings = true,
                "norms" => f.norms = true,
                _ => bail!(
                    "--freeze {list:?}: unknown group {g:?}; the groups are {}",
                    Self::GROUPS
                ),
            }
        }
        Ok(f)
    }

    fn frozen(self, p: Param) -> bool {
        (self.embeddings && p == Param::Embed) || (self.norms && p.is_norm())
    }
}

/// The decay group (0) and the no-decay group (1).
pub const DECAY: usize = 0;
pub const NO_DECAY: usize = 1;

/// Where one trained tensor lives.
#[derive(Clone, Debug, PartialEq)]
pub struct FullSlot {
    pub param: Param,
    pub name: String,
    pub shape: Vec<usize>,
    /// [`DECAY`] or [`NO_DECAY`].
    pub group: usize,
    /// Offset in the group's buffers.
    pub off: usize,
    pub len: usize,
    /// Added to the master value to form the forward's copy: 1 for Gemma's norm gains (the
    /// model multiplies by `1 + w`, the checkpoint and the optimizer hold `w`), else 0.
    pub gain_offset: f32,
}

/// Every trained tensor of a model, in Hugging Face order.
#[derive(Clone, Debug, PartialEq)]
pub struct FullLayout {
    pub slots: Vec<FullSlot>,
    index: HashMap<Param, usize>,
    /// Elements of each group.
    pub group_len: [usize; 2],
}

impl FullLayout {
    /// The weights of `cfg`, less the `freeze` groups.
    pub fn new(cfg: &ModelConfig, freeze: Freeze) -> FullLayout {
        let (d, v, hd) = (cfg.hidden_size, cfg.vocab_size, cfg.head_dim);
        let mut params: Vec<(Param, Vec<usize>)> = vec![(Param::Embed, vec![v, d])];
        for l in 0..cfg.num_layers {
            params.push((Param::InputNorm(l), vec![d]));
            for t in Target::ATTENTION {
                let (d_in, d_out) = t.dims(cfg);
                params.push((Param::Proj(l, t), vec![d_out, d_in]));
                if cfg.attention_bias && t != Target::O {
                    params.push((Param::Bias(l, t), vec![d_out]));
                }
            }
            if cfg.qk_norm {
                params.push((Param::QNorm(l), vec![hd]));
                params.push((Param::KNorm(l), vec![hd]));
            }
            if cfg.gemma_norms {
                params.push((Param::SandAttn(l), vec![d]));
            }
            params.push((Param::PostNorm(l), vec![d]));
            for t in Target::MLP {
                let (d_in, d_out) = t.dims(cfg);
                params.push((Param::Proj(l, t), vec![d_out, d_in]));
            }
            if cfg.gemma_norms {
                params.push((Param::SandMlp(l), vec![d]));
            }
        }
        params.push((Param::FinalNorm, vec![d]));
        if !cfg.tie_word_embeddings {
            params.push((Param::LmHead, vec![v, d]));
        }
        let mut group_len = [0usize; 2];
        let mut slots = Vec::new();
        let mut index = HashMap::new();
        for (param, shape) in params {
            if freeze.frozen(param) {
                continue;
            }
            let group = if param.decays() { DECAY } else { NO_DECAY };
            let len = shape.iter().product();
            index.insert(param, slots.len());
            slots.push(FullSlot {
                param,
                name: param.name(cfg),
                shape,
                group,
                off: group_len[group],
                len,
                gain_offset: if cfg.gemma_norms && param.is_norm() {
                    1.0
                } else {
                    0.0
                },
            });
            group_len[group] += len;
        }
        FullLayout {
            slots,
            index,
            group_len,
        }
    }

    pub fn slot(&self, p: Param) -> Option<&FullSlot> {
        self.index.get(&p).map(|&i| &self.slots[i])
    }

    /// The slot of a Hugging Face tensor name.
    pub fn by_name(&self, name: &str) -> Option<&FullSlot> {
        self.slots.iter().find(|s| s.name == name)
    }

    /// Where slot `s` starts in the groups laid end to end (decay group first), the flat
    /// order of checkpoints and `Model::download_trained`.
    pub fn flat_offset(&self, s: &FullSlot) -> usize {
        match s.group {
            DECAY => s.off,
            _ => self.group_len[DECAY] + s.off,
        }
    }

    /// Trained elements in all.
    pub fn len(&self) -> usize {
        self.group_len[DECAY] + self.group_len[NO_DECAY]
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
