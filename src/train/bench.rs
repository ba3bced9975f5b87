//! A synthetic training step for benchmarks: random tokens, random directions at the given
//! layers, AdamW over what the method trains: LoRA on the given targets (B non-zero so every
//! LoRA product does real work) or, for full fine-tuning, every weight (`Model::set_full`,
//! nothing frozen). Used by `caft-fast bench-step` and `benches/train_step.rs`, so both time
//! the same thing.

use crate::backend::Backend;
use crate::model::ablation::random_directions;
use crate::model::config::ModelConfig;
use crate::model::full::{Freeze, FullLayout};
use crate::model::lora::{LoraConfig, LoraLayout, Target};
use crate::model::transformer::{Batch, Checkpointing, Model};
use crate::model::weights::WeightSource;
use crate::train::config::Method;
use crate::train::optim::{optimizer_step, OptimConfig};
use crate::util::rng::Rng;
use anyhow::{bail, Result};

/// The step's shape. The LoRA fields (`lora_r`, `lora_alpha`, `targets`) are read only by a
/// LoRA step.
#[derive(Clone, Debug)]
pub struct StepSpec {
    pub batch: usize,
    pub seq: usize,
    pub lora_r: usize,
    pub lora_alpha: f64,
    pub targets: Vec<Target>,
    pub ablate_layers: Vec<usize>,
    pub ablate_k: usize,
    pub checkpointing: Checkpointing,
}

pub struct StepBench<B: Backend> {
    pub model: Model<B>,
    pub batch: Batch,
    /// What the optimizer updates, in f32 values.
    pub trained_params: usize,
    opt: OptimConfig,
}

impl<B: Backend> StepBench<B> {
    /// A LoRA step.
    pub fn new(be: &B, cfg: &ModelConfig, src: &dyn WeightSource, spec: &StepSpec) -> Result<Self> {
        Self::with_method(be, cfg, src, spec, Method::Lora)
    }

    /// A step of `method`: LoRA as [`Self::new`], or full fine-tuning of every weight (f32
    /// master weights, gradients and moments; `Freeze::default()`, so embeddings and norms
    /// train too).
    pub fn with_method(
        be: &B,
        cfg: &ModelConfig,
        src: &dyn WeightSource,
        spec: &StepSpec,
        method: Method,
    ) -> Result<Self> {
        let mut model = Model::new(be, cfg.clone(), src)?;
        model.checkpointing = spec.checkpointing;
        let trained_params = match method {
            Method::Lora => {
                let layout = LoraLayout::new(
                    cfg,
                    &LoraConfig {
                        r: spec.lora_r,
                        alpha: spec.lora_alpha,
                        rslora: true,
                        targets: spec.targets.clone(),
                    },
                )?;
                let mut params = layout.init_params(0);
                let mut rng = Rng::new(1);
                for (_, _, s) in layout.iter() {
                    for x in &mut params[s.b_off..s.b_off + s.d_out * s.r] {
                        *x = 1e-3 * rng.normal() as f32;
                    }
                }
                let n = layout.len;
                model.set_lora(be, layout, &params)?;
                n
            }
            Method::Full => {
                let freeze = Freeze::default();
                model.set_full(be, src, freeze)?;
                FullLayout::new(cfg, freeze).len()
            }
        };
        if !spec.ablate_layers.is_empty() {
            if let Some(&l) = spec.ablate_layers.iter().find(|&&l| l >= cfg.num_layers) {
                bail!(
                    "ablation layer {l} is out of range: the model has {} layers",
                    cfg.num_layers
                );
            }
            let dirs = random_directions(0, spec.ablate_k, cfg.hidden_size, &spec.ablate_layers)?;
            model.set_ablation(be, &dirs)?;
        }
        let n = spec.batch * spec.seq;
        let mut rng = Rng::new(2);
        let ids: Vec<u32> = (0..n).map(|_| rng.below(cfg.vocab_size) as u32).collect();
        let labels = ids.iter().map(|&x| x as i32).collect();
        let batch = Batch::padded(spec.batch, spec.seq, ids, labels);
        let opt = OptimConfig {
            total_steps: 1 << 20,
            warmup_steps: 0,
            ..OptimConfig::default()
        };
        Ok(StepBench {
            model,
            batch,
            trained_params,
            opt,
        })
    }

    /// One optimizer step (forward, backward, AdamW, and for full fine-tuning the refresh of
    /// the forward's weights from the masters), synchronised; returns the mean loss.
    pub fn step(&mut self, be: &B) -> Result<f64> {
        let scale = 1.0 / self.batch.n_targets() as f32;
        let out = self.model.forward_backward(be, &self.batch, scale)?;
        optimizer_step(be, &mut self.model, &self.opt)?;
        be.synchronize()?;
        Ok(out.loss_sum / out.n_targets as f64)
    }
}

/// Parameters of the model's matrix products: the seven projections of every layer and the
/// lm head (counted once when tied: the embedding lookup is a gather, not a product).
pub fn matmul_params(cfg: &ModelConfig) -> f64 {
    (cfg.num_layers
        * (cfg.hidden_size * cfg.head_dim * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
            + 3 * cfg.hidden_size * cfg.intermediate_size)
        + cfg.vocab_size * cfg.hidden_size) as f64
}

/// Attention FLOPs of one training step: QKᵀ and PV at 2·T²·hd each per head, halved by the
/// causal mask, done once forward and, flash-style, S recomputed plus four products backward
/// (3.5 times the forward's). The same for every method: attention has no weights.
fn attention_flops(cfg: &ModelConfig, batch: usize, seq: usize) -> f64 {
    let fwd = (cfg.num_layers * batch * cfg.num_heads * seq * seq * cfg.head_dim) as f64 * 2.0;
    fwd * (1.0 + 2.5)
}

/// Model FLOPs of one LoRA step with frozen weights: the forward (2·P per token) and the
/// input-gradient backward (2·P per token; frozen weights get no weight gradient), plus
/// attention (see [`attention_flops`]). LoRA's own products are left out.
pub fn step_flops(cfg: &ModelConfig, batch: usize, seq: usize) -> f64 {
    4.0 * matmul_params(cfg) * (batch * seq) as f64 + attention_flops(cfg, batch, seq)
}

/// Model FLOPs of one full fine-tuning step: LoRA's count ([`step_flops`]) plus the
/// weight-gradient products (another 2·P per token), so 6·P per token plus attention, the
/// usual MFU count of training.
pub fn full_step_flops(cfg: &ModelConfig, batch: usize, seq: usize) -> f64 {
    step_flops(cfg, batch, seq) + 2.0 * matmul_params(cfg) * (batch * seq) as f64
}

/// The model FLOPs of one step of `method`.
pub fn method_step_flops(method: Method, cfg: &ModelConfig, batch: usize, seq: usize) -> f64 {
    match method {
        Method::Lora => step_flops(cfg, batch, seq),
        Method::Full => full_step_flops(cfg, batch, seq),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The full count is the LoRA count plus 2·P·tokens, i.e. 6·P·tokens plus attention.
    #[test]
    fn full_step_counts_the_weight_gradients() {
        let cfg = crate::model::random::preset("gemma-2-2b").unwrap();
        let (b, s) = (16, 512);
        let p = matmul_params(&cfg);
        let tokens = (b * s) as f64;
        let attn = attention_flops(&cfg, b, s);
        let lora = method_step_flops(Method::Lora, &cfg, b, s);
        let full = method_step_flops(Method::Full, &cfg, b, s);
        assert_eq!(lora, 4.0 * p * tokens + attn);
        assert_eq!(full, 6.0 * p * tokens + attn);
        // Gemma-2-2B: 26 layers of (2304 x 256 x (16 + 8) + 3 x 2304 x 9216) plus the tied
        // 256000 x 2304 head.
        assert_eq!(p, 2_614_099_968.0);
    }
}
