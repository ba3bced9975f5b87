//! Model hyper-parameters, read from a Hugging Face `config.json` or from GGUF metadata.

use anyhow::Result;
use std::path::Path;

/// The decoder families caft-fast runs. All are Llama-style pre-norm decoders with RMSNorm,
/// rotary embeddings, GQA attention and a SwiGLU MLP; they differ in the details below.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    /// `LlamaForCausalLM` (Llama 2/3, SmolLM2).
    Llama,
    /// `Qwen2ForCausalLM`: biases on q, k and v.
    Qwen2,
    /// `MistralForCausalLM`: optional sliding window.
    Mistral,
}

impl Arch {
    /// The `architectures[0]` strings of `config.json` we accept.
    pub const SUPPORTED: &'static [&'static str] =
        &["LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM"];
}

/// Llama 3.1/3.2 frequency-dependent rope scaling (`rope_scaling.rope_type == "llama3"`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Llama3Scaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: f64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    pub arch: Arch,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    /// From the config when present (Mistral-Small has 128 with hidden 5120 / 32 heads),
    /// else `hidden_size / num_heads`.
    pub head_dim: usize,
    pub rope_theta: f64,
    pub rope_scaling: Option<Llama3Scaling>,
    pub rms_norm_eps: f64,
    pub tie_word_embeddings: bool,
    pub max_position_embeddings: usize,
    /// Mistral's sliding window; `None` = full causal attention.
    pub sliding_window: Option<usize>,
    /// q, k, v projections carry biases (Qwen2).
    pub attention_bias: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

impl ModelConfig {
    /// Parse a Hugging Face `config.json`. Errors name the file and the offending key.
    pub fn from_hf_json(path: &Path) -> Result<Self> {
        crate::model::loader::config_from_hf_json(path)
    }

    /// The rotary inverse frequencies `θ_i = base^(-2i/head_dim)`, `i < head_dim/2`, with the
    /// llama3 scaling applied when configured (as transformers' `_compute_llama3_parameters`).
    pub fn rope_inv_freq(&self) -> Vec<f64> {
        let half = self.head_dim / 2;
        let mut inv: Vec<f64> = (0..half)
            .map(|i| 1.0 / self.rope_theta.powf((2 * i) as f64 / self.head_dim as f64))
            .collect();
        if let Some(s) = self.rope_scaling {
            let low_wavelen = s.original_max_position_embeddings / s.low_freq_factor;
            let high_wavelen = s.original_max_position_embeddings / s.high_freq_factor;
            for f in inv.iter_mut() {
                let wavelen = 2.0 * std::f64::consts::PI / *f;
                if wavelen > low_wavelen {
                    *f /= s.factor;
                } else if wavelen >= high_wavelen {
                    // Smooth interpolation between the scaled and unscaled frequencies.
                    let smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor)
                        / (s.high_freq_factor - s.low_freq_factor);
                    *f = (1.0 - smooth) * *f / s.factor + smooth * *f;
                }
            }
        }
        inv
    }

    /// `(cos, sin)` pairs for positions `0..max_pos`, laid out as `Backend::rope` expects.
    /// Computed in f64 then rounded, so every backend rotates by the same angles.
    pub fn rope_table(&self, max_pos: usize) -> Vec<f32> {
        let inv = self.rope_inv_freq();
        let mut t = Vec::with_capacity(max_pos * inv.len() * 2);
        for p in 0..max_pos {
            for f in &inv {
                // transformers computes the angle in f32 (`inv_freq` f32 times position f32).
                let angle = (*f as f32 * p as f32) as f64;
                t.push(angle.cos() as f32);
                t.push(angle.sin() as f32);
            }
        }
        t
    }
}
