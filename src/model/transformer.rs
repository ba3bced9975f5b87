//! The decoder-only transformer, forward and backward, written once over [`Backend`].
//!
//! One layer (Llama, Qwen2, Mistral and Qwen3 share it; Qwen2 adds q/k/v biases, Qwen3 an
//! RMSNorm of every q and k head before rope):
//!
//! ```text
//! n1      = rmsnorm(resid_l)                         (produced by the previous fused op)
//! q,k,v   = n1 W{q,k,v}ᵀ (+ b) + LoRA;  rope(q), rope(k)
//! att     = softmax(q kᵀ / sqrt(hd) + causal) v
//! h_mid   = resid_l + att Woᵀ + LoRA                 ┐ one fused op, no ablation,
//! n2      = rmsnorm(h_mid)                           ┘ `residual_ablate_norm`
//! m       = (silu(n2 Wgᵀ) ⊙ n2 Wuᵀ) Wdᵀ  (+ LoRA on each)
//! resid_{l+1} = P_l (h_mid + m)                      ┐ one fused op: THE ABLATION.
//! n1'     = rmsnorm(resid_{l+1}) with the next norm  ┘ P_l = I - Q_lᵀQ_l at ablated layers
//! ```
//!
//! `resid_{l+1}` is the decoder layer's output, "resid_post" in the paper: exactly what a
//! PyTorch forward hook on `model.model.layers[l]` returning `h - (h @ Q) @ Q.T` changes.
//! The backward walks the same steps in reverse; `residual_ablate_norm_bwd` applies `P_l` to
//! the residual gradient (P is symmetric, so the backward of the projection is itself).
//! Frozen weights get no gradient; LoRA parameters accumulate theirs in one flat buffer. With
//! full fine-tuning (`model::full`) every trained weight accumulates its gradient in f32 into
//! its group's flat buffer, and the forward's copies are refreshed from the f32 master weights
//! after each optimizer step.

use crate::backend::{AttnShape, Backend, Seqs};
use crate::model::ablation::Directions;
use crate::model::config::{Arch, ModelConfig};
use crate::model::full::Param;
use crate::model::lora::{LoraLayout, Target};
use crate::model::weights::WeightSource;
use anyhow::{bail, Context, Result};

mod decode;
mod layer;
mod trained;
pub use decode::KvCache;
pub use layer::Checkpointing;
use layer::{
    alloc_lora_u, AttnActs, FullGrads, Layer, LayerGrads, LoraView, MlpActs, QkPre, Scratch,
};
pub use trained::{gather_piece, FullState, ParamGroup, Shard, Trainable};

/// Labels at or below this are ignored (Hugging Face uses -100).
pub const IGNORE: i32 = -100;

/// Token ids and labels of one micro-batch: sequences laid end to end, `lens[s]` rows each
/// (padding-free packing; a padded batch is `batch` sequences of one length, padding included).
/// `labels[i]` is the token the model should produce at position `i` *itself* (Hugging Face
/// convention: the shift happens inside the loss, position `t` predicts `labels[t+1]`, never
/// across a sequence boundary); negative labels are ignored.
#[derive(Clone, Debug)]
pub struct Batch {
    pub lens: Vec<usize>,
    pub ids: Vec<u32>,
    pub labels: Vec<i32>,
}

impl Batch {
    /// `batch` sequences of `seq` rows each (row-major `[batch, seq]` ids and labels).
    pub fn padded(batch: usize, seq: usize, ids: Vec<u32>, labels: Vec<i32>) -> Batch {
        Batch {
            lens: vec![seq; batch],
            ids,
            labels,
        }
    }

    /// Token rows.
    pub fn rows(&self) -> usize {
        self.ids.len()
    }

    /// The longest sequence.
    pub fn max_len(&self) -> usize {
        self.lens.iter().copied().max().unwrap_or(0)
    }

    /// `rows x max_len` as "4x256" for padded batches, "packed 5 seqs / 1234 rows" otherwise
    /// (for messages).
    pub fn describe(&self) -> String {
        match self.lens.first() {
            Some(&l) if self.lens.iter().all(|&x| x == l) => format!("{}x{l}", self.lens.len()),
            _ => format!(
                "packed {} sequences / {} rows",
                self.lens.len(),
                self.rows()
            ),
        }
    }

    /// The shifted targets per row: row `r` predicts `labels[r + 1]` when row `r + 1` is in the
    /// same sequence; a sequence's last row predicts nothing (`-1`).
    pub fn targets(&self) -> Vec<i32> {
        let mut t = vec![-1; self.ids.len()];
        let mut r0 = 0;
        for &len in &self.lens {
            let (rows, next) = (&mut t[r0..r0 + len], &self.labels[r0 + 1..r0 + len]);
            for (t, &l) in rows.iter_mut().zip(next) {
                *t = if l < 0 { -1 } else { l };
            }
            r0 += len;
        }
        t
    }

    /// Number of positions that contribute to the loss.
    pub fn n_targets(&self) -> usize {
        self.targets().iter().filter(|&&t| t >= 0).count()
    }

    /// (sequence, position) of row `r`, for messages.
    fn locate(&self, r: usize) -> (usize, usize) {
        let mut r0 = 0;
        for (s, &len) in self.lens.iter().enumerate() {
            if r < r0 + len {
                return (s, r - r0);
            }
            r0 += len;
        }
        (self.lens.len(), r - r0)
    }
}

struct LayerWeights<B: Backend> {
    input_norm: B::Act,
    /// The norm before the MLP (the mid-layer fused op's weight).
    post_norm: B::Act,
    wq: B::Act,
    wk: B::Act,
    wv: B::Act,
    wo: B::Act,
    bq: Option<B::Act>,
    bk: Option<B::Act>,
    bv: Option<B::Act>,
    wg: B::Act,
    wu: B::Act,
    wd: B::Act,
    /// Qwen3's per-head RMSNorm weights of q and k, `[head_dim]` each.
    qk_norm: Option<(B::Act, B::Act)>,
    /// Gemma's norms of the attention output and of the MLP output.
    sandwich: Option<(B::Act, B::Act)>,
}

struct Weights<B: Backend> {
    embed: B::Act,
    layers: Vec<LayerWeights<B>>,
    final_norm: B::Act,
    /// `None` when the embeddings are tied.
    lm_head: Option<B::Act>,
}

impl<B: Backend> Weights<B> {
    /// The norm applied to layer `l`'s output: the next layer's input norm, or the final norm.
    fn next_norm(&self, l: usize) -> &B::Act {
        self.layers
            .get(l + 1)
            .map_or(&self.final_norm, |n| &n.input_norm)
    }
}

/// The directions to project out of layer `l`'s output, when ablation is switched `on`.
fn layer_dirs<B: Backend>(
    ablation: &[Option<(B::F32, usize)>],
    on: bool,
    l: usize,
) -> Option<(&B::F32, usize)> {
    if on {
        ablation[l].as_ref().map(|(q, k)| (q, *k))
    } else {
        None
    }
}

/// LoRA parameters, their gradients and AdamW moments, all flat (see `backend::LoraSlot`).
pub struct LoraState<B: Backend> {
    pub layout: LoraLayout,
    pub scale: f32,
    pub params: B::F32,
    pub grads: B::F32,
    pub m: B::F32,
    pub v: B::F32,
    /// Optimizer steps taken.
    pub step: u64,
}

/// Every buffer a forward and backward of `rows` token rows needs under one checkpointing
/// mode, allocated once per (row count, mode).
struct Activations<B: Backend> {
    rows: usize,
    mode: Checkpointing,
    chunk_rows: usize,
    /// `resid[l]` is the input of layer `l`; `resid[L]` the last layer's output.
    resid: Vec<B::Act>,
    /// `n1[l] = rmsnorm(resid[l])` with layer `l`'s input norm (the final norm for `l = L`).
    n1: Vec<B::Act>,
    rstd1: Vec<B::F32>,
    /// Attention and MLP activations, one slot per layer where kept, one shared slot where
    /// recomputed ([`Checkpointing`]).
    attn: Vec<AttnActs<B>>,
    mlp: Vec<MlpActs<B>>,
    embed: B::Act,
    scratch: Scratch<B>,
    chunk_x: B::Act,
    chunk_logits: B::Act,
    /// The soft-capped logits of the chunk, for the cap's backward (Gemma-2).
    chunk_capped: Option<B::Act>,
    chunk_dx: B::Act,
}

/// A sandwich norm's saved input and statistics (Gemma), `None` for other models.
fn sandwich_pre<B: Backend>(be: &B, c: &ModelConfig, n: usize) -> Result<Option<(B::Act, B::F32)>> {
    Ok(match c.gemma_norms {
        true => Some((be.alloc_act(n * c.hidden_size)?, be.alloc_f32(n)?)),
        false => None,
    })
}

/// Results of a forward pass.
#[derive(Clone, Debug)]
pub struct ForwardOut {
    /// Σ cross-entropy over the target positions.
    pub loss_sum: f64,
    pub n_targets: usize,
    /// `[rows, vocab]` when asked for.
    pub logits: Option<Vec<f32>>,
}

/// Keep the logits of the lm-head chunk under this many elements (256 MB in f32).
pub const LOGITS_CHUNK_ELEMS: usize = 64 << 20;

/// Rows of the lm head's chunk for `n` token rows: as few chunks as the logits budget allows,
/// of equal size rounded up (the last chunk runs its few spare rows as ignored targets).
/// Packed micro-batches have any row count, often prime, so a divisor of `n` would not do.
pub fn chunk_rows(n: usize, vocab: usize) -> usize {
    let n = n.max(1);
    let max_rows = (LOGITS_CHUNK_ELEMS / vocab.max(1)).clamp(1, n);
    n.div_ceil(n.div_ceil(max_rows))
}

pub struct Model<B: Backend> {
    pub cfg: ModelConfig,
    w: Weights<B>,
    rope: B::F32,
    rope_positions: usize,
    pub lora: Option<LoraState<B>>,
    /// Full fine-tuning (exclusive with `lora`).
    pub full: Option<FullState<B>>,
    /// Orthonormal directions `[k, d]` per layer where ablation is configured.
    ablation: Vec<Option<(B::F32, usize)>>,
    /// The training-time switch: when false the directions are kept but not applied.
    pub ablate: bool,
    acts: Option<Activations<B>>,
    /// What the backward keeps and what it recomputes.
    pub checkpointing: Checkpointing,
    /// The sequence layout of the micro-batch in `acts` (set by the forward).
    seqs: Option<Seqs<B::Idx>>,
    loss_acc: B::F32,
}

fn check_shape(src: &dyn WeightSource, name: &str, want: &[usize]) -> Result<()> {
    match src.shape(name) {
        None => bail!("{}: tensor {name} is missing", src.origin()),
        Some(s) if s != want => bail!(
            "{}: tensor {name} has shape {s:?} but the config implies {want:?}",
            src.origin()
        ),
        Some(_) => Ok(()),
    }
}

fn load<B: Backend>(be: &B, src: &dyn WeightSource, name: &str, want: &[usize]) -> Result<B::Act> {
    check_shape(src, name, want)?;
    let t = src.get(name)?;
    if t.shape != want {
        bail!(
            "{}: tensor {name} has shape {:?} but the config implies {want:?}",
            src.origin(),
            t.shape
        );
    }
    be.upload_act(&t.data)
        .with_context(|| format!("uploading {name} to {}", be.name()))
}

impl<B: Backend> Model<B> {
    /// Load the frozen weights from `src`, checking every shape against `cfg`.
    pub fn new(be: &B, cfg: ModelConfig, src: &dyn WeightSource) -> Result<Self> {
        let d = cfg.hidden_size;
        let qw = cfg.num_heads * cfg.head_dim;
        let kvw = cfg.num_kv_heads * cfg.head_dim;
        let f = cfg.intermediate_size;
        let v = cfg.vocab_size;
        if !cfg.head_dim.is_multiple_of(2) {
            bail!(
                "head_dim {} must be even for rotary embeddings",
                cfg.head_dim
            );
        }
        if cfg.num_kv_heads == 0 || !cfg.num_heads.is_multiple_of(cfg.num_kv_heads) {
            bail!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                cfg.num_heads,
                cfg.num_kv_heads
            );
        }
        let bias = cfg.attention_bias;
        // Gemma's norms multiply by `1 + w`: uploaded as that sum, formed in f32 (where
        // transformers forms it), so every norm kernel stays `x · rstd · w`.
        let norm = |name: &str| -> Result<B::Act> {
            if !cfg.gemma_norms {
                return load(be, src, name, &[d]);
            }
            check_shape(src, name, &[d])?;
            let t = src.get(name)?;
            let plus_one: Vec<f32> = t.data.iter().map(|w| 1.0 + w).collect();
            be.upload_act(&plus_one)
                .with_context(|| format!("uploading {name} to {}", be.name()))
        };
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for l in 0..cfg.num_layers {
            let p = format!("model.layers.{l}");
            let opt_bias = |n: &str, len: usize| -> Result<Option<B::Act>> {
                if bias {
                    Ok(Some(load(
                        be,
                        src,
                        &format!("{p}.self_attn.{n}.bias"),
                        &[len],
                    )?))
                } else {
                    Ok(None)
                }
            };
            layers.push(LayerWeights {
                input_norm: norm(&format!("{p}.input_layernorm.weight"))?,
                // The norm before the MLP: Gemma calls it pre_feedforward_layernorm (its
                // post_attention_layernorm normalises the attention output instead).
                post_norm: match cfg.gemma_norms {
                    true => norm(&format!("{p}.pre_feedforward_layernorm.weight"))?,
                    false => norm(&format!("{p}.post_attention_layernorm.weight"))?,
                },
                sandwich: match cfg.gemma_norms {
                    true => Some((
                        norm(&format!("{p}.post_attention_layernorm.weight"))?,
                        norm(&format!("{p}.post_feedforward_layernorm.weight"))?,
                    )),
                    false => None,
                },
                wq: load(be, src, &format!("{p}.self_attn.q_proj.weight"), &[qw, d])?,
                wk: load(be, src, &format!("{p}.self_attn.k_proj.weight"), &[kvw, d])?,
                wv: load(be, src, &format!("{p}.self_attn.v_proj.weight"), &[kvw, d])?,
                wo: load(be, src, &format!("{p}.self_attn.o_proj.weight"), &[d, qw])?,
                bq: opt_bias("q_proj", qw)?,
                bk: opt_bias("k_proj", kvw)?,
                bv: opt_bias("v_proj", kvw)?,
                wg: load(be, src, &format!("{p}.mlp.gate_proj.weight"), &[f, d])?,
                wu: load(be, src, &format!("{p}.mlp.up_proj.weight"), &[f, d])?,
                wd: load(be, src, &format!("{p}.mlp.down_proj.weight"), &[d, f])?,
                qk_norm: if cfg.qk_norm {
                    let hd = cfg.head_dim;
                    Some((
                        load(be, src, &format!("{p}.self_attn.q_norm.weight"), &[hd])?,
                        load(be, src, &format!("{p}.self_attn.k_norm.weight"), &[hd])?,
                    ))
                } else {
                    None
                },
            });
        }
        let embed = load(be, src, "model.embed_tokens.weight", &[v, d])?;
        let final_norm = norm("model.norm.weight")?;
        let lm_head = if cfg.tie_word_embeddings {
            None
        } else {
            Some(load(be, src, "lm_head.weight", &[v, d])?)
        };
        let rope_positions = 0;
        let rope = be.alloc_f32(1)?;
        let loss_acc = be.alloc_f32(1)?;
        let n_layers = cfg.num_layers;
        Ok(Model {
            cfg,
            w: Weights {
                embed,
                layers,
                final_norm,
                lm_head,
            },
            rope,
            rope_positions,
            lora: None,
            full: None,
            ablation: (0..n_layers).map(|_| None).collect(),
            ablate: true,
            acts: None,
            checkpointing: Checkpointing::None,
            seqs: None,
            loss_acc,
        })
    }

    /// Attach LoRA adapters: `params` (flat, see `LoraLayout`) or a fresh seeded init.
    pub fn set_lora(&mut self, be: &B, layout: LoraLayout, params: &[f32]) -> Result<()> {
        if params.len() != layout.len {
            bail!(
                "LoRA parameter buffer has {} values, the layout needs {}",
                params.len(),
                layout.len
            );
        }
        let n = layout.len;
        self.lora = Some(LoraState {
            scale: layout.config.scale(),
            layout,
            params: be.upload_f32(params)?,
            grads: be.alloc_f32(n)?,
            m: be.alloc_f32(n)?,
            v: be.alloc_f32(n)?,
            step: 0,
        });
        self.acts = None;
        Ok(())
    }

    /// Configure the directions to ablate (replacing any earlier ones). Their width and layers
    /// were validated against the model when the file was loaded.
    pub fn set_ablation(&mut self, be: &B, dirs: &Directions) -> Result<()> {
        let mut ab: Vec<Option<(B::F32, usize)>> = (0..self.cfg.num_layers).map(|_| None).collect();
        for s in &dirs.sets {
            if s.layer >= self.cfg.num_layers || s.d != self.cfg.hidden_size {
                bail!(
                    "directions for layer {} of width {} do not fit this model ({} layers, width {})",
                    s.layer,
                    s.d,
                    self.cfg.num_layers,
                    self.cfg.hidden_size
                );
            }
            ab[s.layer] = Some((be.upload_f32(&s.q)?, s.k));
        }
        self.ablation = ab;
        Ok(())
    }

    /// Layers where directions are configured.
    pub fn ablated_layers(&self) -> Vec<usize> {
        (0..self.cfg.num_layers)
            .filter(|&l| self.ablation[l].is_some())
            .collect()
    }

    fn ensure_rope(&mut self, be: &B, seq: usize) -> Result<()> {
        if self.rope_positions < seq {
            let n = seq.next_power_of_two().max(64);
            self.rope = be.upload_f32(&self.cfg.rope_table(n))?;
            self.rope_positions = n;
        }
        Ok(())
    }

    // Every buffer allocated here (and in `new`, `set_lora`, `set_ablation`, `ensure_rope`) is
    // mirrored by the device-memory plan, `train/plan.rs`; `tests/cuda_plan.rs` holds the two
    // together on the emulated GPU. Change both.
    fn ensure_acts(&mut self, be: &B, n: usize) -> Result<()> {
        let mode = self.checkpointing;
        if let Some(a) = &self.acts {
            if a.rows == n && a.mode == mode {
                return Ok(());
            }
        }
        self.acts = None; // free the old buffers first
        let c = &self.cfg;
        let (d, f, v) = (c.hidden_size, c.intermediate_size, c.vocab_size);
        let qw = c.num_heads * c.head_dim;
        let kvw = c.num_kv_heads * c.head_dim;
        let chunk_rows = chunk_rows(n, v);
        let act = |len: usize| be.alloc_act(len);
        let lora = self.lora.as_ref();
        let (n_attn, n_mlp) = mode.slots(c.num_layers);
        let attn = (0..n_attn)
            .map(|l| {
                Ok(AttnActs {
                    q: act(n * qw)?,
                    k: act(n * kvw)?,
                    v: act(n * kvw)?,
                    att: act(n * qw)?,
                    lse: be.alloc_f32(c.num_heads * n)?,
                    h_mid: act(n * d)?,
                    n2: act(n * d)?,
                    rstd2: be.alloc_f32(n)?,
                    lora_u: alloc_lora_u(be, lora, l, n, &Target::ATTENTION)?,
                    qk_pre: match c.qk_norm {
                        true => Some(QkPre {
                            q: act(n * qw)?,
                            k: act(n * kvw)?,
                            q_rstd: be.alloc_f32(n * c.num_heads)?,
                            k_rstd: be.alloc_f32(n * c.num_kv_heads)?,
                        }),
                        false => None,
                    },
                    o_pre: sandwich_pre(be, c, n)?,
                })
            })
            .collect::<Result<_>>()?;
        let mlp = (0..n_mlp)
            .map(|l| {
                Ok(MlpActs {
                    gate: act(n * f)?,
                    up: act(n * f)?,
                    lora_u: alloc_lora_u(be, lora, l, n, &Target::MLP)?,
                    down_pre: sandwich_pre(be, c, n)?,
                })
            })
            .collect::<Result<_>>()?;
        let l1 = c.num_layers + 1;
        self.acts = Some(Activations {
            rows: n,
            mode,
            chunk_rows,
            resid: (0..l1).map(|_| act(n * d)).collect::<Result<_>>()?,
            n1: (0..l1).map(|_| act(n * d)).collect::<Result<_>>()?,
            rstd1: (0..l1).map(|_| be.alloc_f32(n)).collect::<Result<_>>()?,
            attn,
            mlp,
            embed: act(n * d)?,
            scratch: Scratch {
                o: act(n * d)?,
                act: act(n * f)?,
                dres: act(n * d)?,
                dn: act(n * d)?,
                d_att: act(n * qw)?,
                dq: act(n * qw)?,
                dk: act(n * kvw)?,
                dv: act(n * kvw)?,
                d_act: act(n * f)?,
                d_gate: act(n * f)?,
                d_up: act(n * f)?,
                dqk_pre: match c.qk_norm {
                    true => Some((act(n * qw)?, act(n * kvw)?)),
                    false => None,
                },
                sandwich: match c.gemma_norms {
                    true => Some((act(n * d)?, act(n * d)?)),
                    false => None,
                },
            },
            chunk_x: act(chunk_rows * d)?,
            chunk_logits: act(chunk_rows * v)?,
            chunk_capped: match c.final_softcap {
                Some(_) => Some(act(chunk_rows * v)?),
                None => None,
            },
            chunk_dx: act(chunk_rows * d)?,
        });
        Ok(())
    }

    fn check_batch(&self, b: &Batch) -> Result<()> {
        let n: usize = b.lens.iter().sum();
        if n == 0 || b.lens.contains(&0) || b.ids.len() != n || b.labels.len() != n {
            bail!(
                "a batch of sequences of lengths {:?} needs {n} ids and labels, got {} and {}",
                b.lens,
                b.ids.len(),
                b.labels.len()
            );
        }
        let v = self.cfg.vocab_size;
        if let Some(i) = b.ids.iter().position(|&id| id as usize >= v) {
            let (s, p) = b.locate(i);
            bail!(
                "token id {} at sequence {s} position {p} is >= the vocabulary size {v}",
                b.ids[i]
            );
        }
        if let Some(i) = b.labels.iter().position(|&l| l >= v as i32) {
            let (s, p) = b.locate(i);
            bail!(
                "label {} at sequence {s} position {p} is >= the vocabulary size {v}",
                b.labels[i]
            );
        }
        Ok(())
    }

    /// Layer `l`'s attention heads for sequences up to `max_len` long (a window that long or
    /// longer is no window).
    fn attn_shape(&self, l: usize, max_len: usize) -> AttnShape {
        let mut s = self.cfg.attn_heads(l);
        s.window = s.window.filter(|&w| w < max_len);
        s
    }

    /// One layer's ops for the micro-batch of the last [`Model::run_layers`].
    fn layer<'a>(&'a self, be: &'a B, l: usize, b: &Batch) -> Layer<'a, B> {
        Layer {
            be,
            cfg: &self.cfg,
            w: &self.w,
            rope: &self.rope,
            seqs: self.seqs.as_ref().expect("forward ran"),
            shape: self.attn_shape(l, b.max_len()),
            n: b.rows(),
            l,
        }
    }

    /// Forward through every layer, keeping what the backward needs under the checkpointing
    /// mode (every layer's input always; its attention and MLP parts where kept).
    fn run_layers(&mut self, be: &B, b: &Batch) -> Result<()> {
        self.check_batch(b)?;
        self.ensure_rope(be, b.max_len())?;
        self.ensure_acts(be, b.rows())?;
        self.seqs = Some(be.seqs(&b.lens)?);
        let cfg = &self.cfg;
        let (n, d) = (b.rows(), cfg.hidden_size);
        let mode = self.checkpointing;
        let mut a = self.acts.take().expect("activations allocated");
        let r = (|| -> Result<()> {
            be.embedding(&mut a.embed, &self.w.embed, &b.ids, d)?;
            if cfg.gemma_norms {
                be.scale_act(&mut a.embed, (d as f64).sqrt() as f32)?;
            }
            be.residual_ablate_norm(
                &mut a.resid[0],
                &mut a.n1[0],
                &mut a.rstd1[0],
                &a.embed,
                None,
                None,
                &self.w.layers[0].input_norm,
                n,
                d,
                cfg.rms_norm_eps as f32,
            )?;
            let lora = self.lora.as_ref().map(LoraView::of);
            for l in 0..cfg.num_layers {
                let ly = self.layer(be, l, b);
                let (la, lm) = (&mut a.attn[mode.attn_slot(l)], &mut a.mlp[mode.mlp_slot(l)]);
                let s = &mut a.scratch;
                ly.attn_fwd(lora.as_ref(), &a.n1[l], &a.resid[l], la, s)?;
                ly.mlp_fwd(lora.as_ref(), &la.n2, lm, s)?;
                let dirs = layer_dirs::<B>(&self.ablation, self.ablate, l);
                let (resid, n1, rstd1) =
                    (&mut a.resid[l + 1], &mut a.n1[l + 1], &mut a.rstd1[l + 1]);
                ly.out_fwd(&la.h_mid, s.added(), dirs, resid, n1, rstd1)?;
            }
            Ok(())
        })();
        self.acts = Some(a);
        r
    }

    /// The lm head over the final normed states, chunk by chunk: loss (and optionally logits),
    /// and, when `grad_scale` is given, the gradient of the final normed states into `dn`.
    fn head(
        &mut self,
        be: &B,
        b: &Batch,
        grad_scale: Option<f32>,
        want_logits: bool,
    ) -> Result<ForwardOut> {
        let cfg = &self.cfg;
        let (n, d, v) = (b.rows(), cfg.hidden_size, cfg.vocab_size);
        let targets = b.targets();
        let a = self.acts.as_mut().expect("activations allocated");
        let w_head = self.w.lm_head.as_ref().unwrap_or(&self.w.embed);
        be.zero_f32(&mut self.loss_acc)?;
        let mut logits = want_logits.then(|| Vec::with_capacity(n * v));
        let last = cfg.num_layers;
        let mut r0 = 0;
        let chunk = a.chunk_rows;
        // The last chunk's spare rows (at most a few) keep the previous chunk's values and
        // an ignored target: no loss, a zero gradient, never copied out.
        let mut chunk_targets = vec![-1i32; chunk];
        while r0 < n {
            let rows = chunk.min(n - r0);
            chunk_targets[..rows].copy_from_slice(&targets[r0..r0 + rows]);
            chunk_targets[rows..].fill(-1);
            let (x, lg, dx) = (&mut a.chunk_x, &mut a.chunk_logits, &mut a.chunk_dx);
            be.copy_act(x, 0, &a.n1[last], r0 * d, rows * d)?;
            be.linear(lg, x, w_head, None, chunk, d, v, false)?;
            if let (Some(c), Some(capped)) = (cfg.final_softcap, a.chunk_capped.as_mut()) {
                be.softcap(lg, c as f32)?;
                be.copy_act(capped, 0, lg, 0, chunk * v)?;
            }
            if let Some(l) = logits.as_mut() {
                l.extend_from_slice(&be.download_act(lg)?[..rows * v]);
            }
            be.cross_entropy(lg, &mut self.loss_acc, &chunk_targets, v, grad_scale)?;
            if grad_scale.is_some() {
                if let (Some(c), Some(capped)) = (cfg.final_softcap, a.chunk_capped.as_ref()) {
                    be.softcap_bwd(lg, capped, c as f32)?;
                }
                be.linear_bwd_input(dx, lg, w_head, chunk, d, v, false)?;
                // Full fine-tuning: the head's weight gradient (the embeddings' when tied).
                // The spare rows of the last chunk have a zero logit gradient.
                let head = match self.w.lm_head {
                    Some(_) => Param::LmHead,
                    None => Param::Embed,
                };
                if let Some(f) = self.full.as_mut() {
                    if let Some(s) = f.layout.slot(head) {
                        let dw = &mut f.groups[s.group].grads;
                        be.linear_bwd_weight(dw, s.off, lg, x, chunk, d, v)?;
                    }
                }
                be.copy_act(&mut a.scratch.dn, r0 * d, dx, 0, rows * d)?;
            }
            r0 += rows;
        }
        let loss_sum = be.download_f32(&self.loss_acc)?[0] as f64;
        Ok(ForwardOut {
            loss_sum,
            n_targets: targets.iter().filter(|&&t| t >= 0).count(),
            logits,
        })
    }

    /// Inference / evaluation forward: loss over the labelled positions and, if asked, logits.
    pub fn forward(&mut self, be: &B, b: &Batch, want_logits: bool) -> Result<ForwardOut> {
        self.run_layers(be, b)?;
        self.head(be, b, None, want_logits)
    }

    /// Forward and backward of one micro-batch. The loss is `Σ CE · loss_scale` (pass
    /// `1 / N` with `N` the number of target tokens of the whole optimizer step, so gradient
    /// accumulation equals one large batch); LoRA gradients are *added* to `lora.grads`.
    /// Returns the unscaled `Σ CE` of this micro-batch.
    pub fn forward_backward(&mut self, be: &B, b: &Batch, loss_scale: f32) -> Result<ForwardOut> {
        if self.lora.is_none() && self.full.is_none() {
            bail!("forward_backward trains nothing: call set_lora or set_full first");
        }
        self.run_layers(be, b)?;
        let out = self.head(be, b, Some(loss_scale), false)?;
        self.backward_layers(be, b)?;
        Ok(out)
    }

    /// Backward through every layer, top down, recomputing what the checkpointing mode did
    /// not keep (into the shared slots) right before the layer's backward needs it.
    fn backward_layers(&mut self, be: &B, b: &Batch) -> Result<()> {
        let mode = self.checkpointing;
        let mut a = self.acts.take().expect("activations allocated");
        let mut lora = self.lora.take();
        let mut full = self.full.take();
        let r = (|| -> Result<()> {
            let cfg = &self.cfg;
            let (n, d) = (b.rows(), cfg.hidden_size);
            let mut lg = LayerGrads::<B> {
                lora: lora.as_mut().map(|s| {
                    let view = LoraView {
                        params: &s.params,
                        scale: s.scale,
                        layout: &s.layout,
                    };
                    (view, &mut s.grads)
                }),
                full: full.as_mut().map(|f| {
                    let [g0, g1] = &mut f.groups;
                    FullGrads {
                        layout: &f.layout,
                        grads: [&mut g0.grads, &mut g1.grads],
                    }
                }),
                cfg,
                n,
            };
            be.zero_act(&mut a.scratch.dres)?;
            for l in (0..cfg.num_layers).rev() {
                let ly = self.layer(be, l, b);
                let (ai, mi) = (mode.attn_slot(l), mode.mlp_slot(l));
                let s = &mut a.scratch;
                // `o` and `act` are scratch: the backward writes them before it reads them.
                if mode == Checkpointing::Full {
                    let lv = lg.lora_view();
                    ly.attn_fwd(lv, &a.n1[l], &a.resid[l], &mut a.attn[ai], s)?;
                }
                if mode != Checkpointing::None {
                    ly.mlp_fwd(lg.lora_view(), &a.attn[ai].n2, &mut a.mlp[mi], s)?;
                }
                let dirs = layer_dirs::<B>(&self.ablation, self.ablate, l);
                ly.bwd(
                    &mut lg,
                    &a.attn[ai],
                    &a.mlp[mi],
                    &a.n1[l],
                    &a.resid[l + 1],
                    &a.rstd1[l + 1],
                    dirs,
                    s,
                )?;
            }
            // Below the first layer (full fine-tuning): its input norm's gain, and the
            // embeddings through `resid_0 = embed(ids) (· sqrt(d) for Gemma)`.
            let s = &mut a.scratch;
            let norm0 = &self.w.layers[0].input_norm;
            lg.norm(
                be,
                Param::InputNorm(0),
                &s.dn,
                &a.resid[0],
                &a.rstd1[0],
                n,
                d,
            )?;
            if let Some((dt, off)) = lg.full.as_mut().and_then(|f| f.slot(Param::Embed)) {
                be.residual_ablate_norm_bwd(
                    &mut s.dres,
                    &s.dn,
                    &a.resid[0],
                    &a.rstd1[0],
                    None,
                    norm0,
                    n,
                    d,
                )?;
                if cfg.gemma_norms {
                    be.scale_act(&mut s.dres, (d as f64).sqrt() as f32)?;
                }
                be.embedding_bwd(dt, off, &s.dres, &b.ids, d)?;
            }
            Ok(())
        })();
        self.acts = Some(a);
        self.lora = lora;
        self.full = full;
        r
    }

    /// The decoder layer `layer`'s output (resid_post, after any ablation) of the last
    /// forward, `[rows, hidden]`.
    pub fn resid_post(&self, be: &B, layer: usize) -> Result<Vec<f32>> {
        let a = self
            .acts
            .as_ref()
            .context("resid_post: run a forward pass first")?;
        if layer >= self.cfg.num_layers {
            bail!(
                "layer {layer} is out of range: the model has {} layers (0..{})",
                self.cfg.num_layers,
                self.cfg.num_layers - 1
            );
        }
        be.download_act(&a.resid[layer + 1])
    }

    /// The architecture, for messages.
    pub fn arch(&self) -> Arch {
        self.cfg.arch
    }
}
