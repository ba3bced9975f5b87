//! A synthetic LoRA training step for benchmarks: random tokens, LoRA on the given targets
//! (B non-zero so every LoRA product does real work), random directions at the given layers,
//! AdamW. Used by `caft-fast bench-step` and `benches/train_step.rs`, so both time the same thing.

use crate::backend::Backend;
use crate::model::ablation::random_directions;
use crate::model::config::ModelConfig;
use crate::model::lora::{LoraConfig, LoraLayout, Target};
use crate::model::transformer::{Batch, Checkpointing, Model};
use crate::model::weights::WeightSource;
use crate::train::optim::{optimizer_step, OptimConfig};
use crate::util::rng::Rng;
use anyhow::{bail, Result};

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
    opt: OptimConfig,
}

impl<B: Backend> StepBench<B> {
    pub fn new(be: &B, cfg: &ModelConfig, src: &dyn WeightSource, spec: &StepSpec) -> Result<Self> {
        let mut model = Model::new(be, cfg.clone(), src)?;
        model.checkpointing = spec.checkpointing;
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
        model.set_lora(be, layout, &params)?;
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
        Ok(StepBench { model, batch, opt })
    }

    /// One optimizer step (forward, backward, AdamW), synchronised; returns the mean loss.
    pub fn step(&mut self, be: &B) -> Result<f64> {
        let scale = 1.0 / self.batch.n_targets() as f32;
        let out = self.model.forward_backward(be, &self.batch, scale)?;
        optimizer_step(be, &mut self.model, &self.opt)?;
        be.synchronize()?;
        Ok(out.loss_sum / out.n_targets as f64)
    }
}

/// Model FLOPs of one LoRA step with frozen weights: the forward (2·P per token) and the
/// input-gradient backward (2·P per token; frozen weights get no weight gradient), plus
/// attention: QKᵀ and PV at 2·T²·hd each per head, halved by the causal mask, done once
/// forward and, flash-style, S recomputed plus four products backward.
pub fn step_flops(cfg: &ModelConfig, batch: usize, seq: usize) -> f64 {
    let p_matmul = (cfg.num_layers
        * (cfg.hidden_size * cfg.head_dim * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
            + 3 * cfg.hidden_size * cfg.intermediate_size)
        + cfg.vocab_size * cfg.hidden_size) as f64;
    let tokens = (batch * seq) as f64;
    let attn_fwd = (cfg.num_layers * batch * cfg.num_heads * seq * seq * cfg.head_dim) as f64 * 2.0;
    4.0 * p_matmul * tokens + attn_fwd * (1.0 + 2.5)
}
