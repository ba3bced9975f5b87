//! AdamW with global-norm gradient clipping, and the learning-rate schedules of
//! `transformers.get_{linear,cosine}_schedule_with_warmup`.

use crate::backend::{AdamStep, Backend};
use crate::model::transformer::Model;
use anyhow::{bail, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Schedule {
    /// Linear warmup from 0, then linear decay to 0 at the last step.
    Linear,
    /// Linear warmup, then half a cosine down to 0.
    Cosine,
    /// Linear warmup, then constant.
    Constant,
}

impl Schedule {
    pub fn parse(s: &str) -> Result<Schedule> {
        Ok(match s {
            "linear" => Schedule::Linear,
            "cosine" => Schedule::Cosine,
            "constant" => Schedule::Constant,
            _ => bail!("unknown schedule {s:?}: expected linear, cosine or constant"),
        })
    }

    /// The multiplier of the peak learning rate for the optimizer step that follows `done`
    /// completed steps (`done` = 0 for the first step), as the transformers schedulers give
    /// after `done` calls of `scheduler.step()`.
    pub fn multiplier(self, done: u64, warmup: u64, total: u64) -> f64 {
        if done < warmup {
            return done as f64 / warmup.max(1) as f64;
        }
        let rest = total.saturating_sub(warmup).max(1) as f64;
        let progress = (done - warmup) as f64 / rest;
        match self {
            Schedule::Linear => ((total as f64 - done as f64) / rest).max(0.0),
            Schedule::Cosine => (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0),
            Schedule::Constant => 1.0,
        }
    }
}

/// Optimizer settings (PyTorch AdamW defaults, the paper's weight decay).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct OptimConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Clip the global gradient norm to this; `None` or non-positive = no clipping.
    pub max_grad_norm: Option<f64>,
    pub schedule: Schedule,
    pub warmup_steps: u64,
    pub total_steps: u64,
}

impl Default for OptimConfig {
    fn default() -> Self {
        OptimConfig {
            lr: 1e-5,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
            max_grad_norm: Some(1.0),
            schedule: Schedule::Linear,
            warmup_steps: 5,
            total_steps: 1,
        }
    }
}

/// Warmup steps of a run of `total` optimizer steps: `ceil(ratio · total)` when a ratio is
/// given (the transformers Trainer's `warmup_ratio`), else `steps`.
pub fn warmup_steps(steps: u64, ratio: Option<f64>, total: u64) -> u64 {
    match ratio {
        Some(r) => (r * total as f64).ceil() as u64,
        None => steps,
    }
}

/// What one optimizer step did.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepReport {
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    pub lr: f64,
}

/// Clip, step and zero the gradients of what `model` trains (gradients accumulated by
/// `Model::forward_backward`), then refresh the forward's copies of fully fine-tuned weights.
/// Clipping follows `torch.nn.utils.clip_grad_norm_` over every trained parameter:
/// `g <- g · min(1, max_norm / (‖g‖ + 1e-6))`. Weight decay applies to the parts that decay
/// (LoRA: all; full fine-tuning: not biases and norm gains, as the transformers Trainer).
pub fn optimizer_step<B: Backend>(
    be: &B,
    model: &mut Model<B>,
    cfg: &OptimConfig,
) -> Result<StepReport> {
    let grad_norm = model.grad_sum_squares(be)?.sqrt();
    if !grad_norm.is_finite() {
        bail!("the gradient norm is {grad_norm}: the loss diverged (NaN or Inf)");
    }
    apply_step(be, model, cfg, grad_norm)
}

/// [`optimizer_step`] with the gradient norm already measured (finite): clip, step, zero the
/// gradients and refresh the forward's copies, without a second pass over the gradients.
pub fn apply_step<B: Backend>(
    be: &B,
    model: &mut Model<B>,
    cfg: &OptimConfig,
    grad_norm: f64,
) -> Result<StepReport> {
    let grad_scale = match cfg.max_grad_norm {
        Some(max) if max > 0.0 => (max / (grad_norm + 1e-6)).min(1.0),
        _ => 1.0,
    };
    let (parts, step) = model.trainable()?;
    let lr = cfg.lr
        * cfg
            .schedule
            .multiplier(*step, cfg.warmup_steps, cfg.total_steps);
    *step += 1;
    for p in parts {
        let hp = AdamStep {
            lr: lr as f32,
            beta1: cfg.beta1 as f32,
            beta2: cfg.beta2 as f32,
            eps: cfg.eps as f32,
            weight_decay: if p.decay {
                cfg.weight_decay as f32
            } else {
                0.0
            },
            step: *step,
            grad_scale: grad_scale as f32,
        };
        be.adamw(p.params, p.grads, p.m, p.v, &hp)?;
        be.zero_f32(p.grads)?;
    }
    model.refresh_weights(be)?;
    Ok(StepReport { grad_norm, lr })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_schedule_matches_transformers() {
        // get_linear_schedule_with_warmup(warmup=2, total=6): lambda(s) = s/2 for s < 2,
        // else (6 - s) / 4.
        let m: Vec<f64> = (0..7)
            .map(|s| Schedule::Linear.multiplier(s, 2, 6))
            .collect();
        let want = [0.0, 0.5, 1.0, 0.75, 0.5, 0.25, 0.0];
        for (a, b) in m.iter().zip(want) {
            assert!((a - b).abs() < 1e-12, "{m:?}");
        }
    }

    #[test]
    fn cosine_schedule_matches_transformers() {
        // get_cosine_schedule_with_warmup(warmup=1, total=5): 0.5(1 + cos(pi (s-1)/4)).
        let got: Vec<f64> = (0..6)
            .map(|s| Schedule::Cosine.multiplier(s, 1, 5))
            .collect();
        let want: Vec<f64> = (0..6)
            .map(|s| {
                if s < 1 {
                    0.0
                } else {
                    0.5 * (1.0 + (std::f64::consts::PI * (s as f64 - 1.0) / 4.0).cos())
                }
            })
            .collect();
        for (a, b) in got.iter().zip(&want) {
            assert!((a - b).abs() < 1e-12, "{got:?} vs {want:?}");
        }
    }
}
