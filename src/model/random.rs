//! Random-weight models of real shapes, for benchmarks that need no download: the shapes of
//! Qwen2.5-1.5B, Qwen3-1.7B, Gemma-2-2B, Llama-3.2-1B and SmolLM2-135M with weights drawn
//! uniformly (std 0.02, norms 1), generated tensor by tensor on demand.

use crate::model::config::{Arch, Llama3Scaling, MlpAct, ModelConfig};
use crate::model::weights::{HostTensor, WeightSource};
use crate::util::rng::Rng;
use anyhow::{bail, Result};
use rayon::prelude::*;

/// Names accepted by [`preset`].
pub const PRESETS: &[&str] = &[
    "qwen2.5-1.5b",
    "qwen3-1.7b",
    "gemma-2-2b",
    "llama-3.2-1b",
    "smollm2-135m",
];

/// The configuration of a known model shape.
pub fn preset(name: &str) -> Result<ModelConfig> {
    let base = ModelConfig {
        arch: Arch::Llama,
        vocab_size: 0,
        hidden_size: 0,
        intermediate_size: 0,
        num_layers: 0,
        num_heads: 0,
        num_kv_heads: 0,
        head_dim: 0,
        rope_theta: 10000.0,
        rope_scaling: None,
        rms_norm_eps: 1e-6,
        tie_word_embeddings: true,
        max_position_embeddings: 32768,
        sliding_window: None,
        attention_bias: false,
        qk_norm: false,
        mlp_act: MlpAct::Silu,
        query_pre_attn_scalar: None,
        attn_softcap: None,
        final_softcap: None,
        gemma_norms: false,
        sliding_layers: None,
        bos_token_id: None,
        eos_token_ids: vec![],
    };
    Ok(match name {
        "qwen2.5-1.5b" => ModelConfig {
            arch: Arch::Qwen2,
            vocab_size: 151936,
            hidden_size: 1536,
            intermediate_size: 8960,
            num_layers: 28,
            num_heads: 12,
            num_kv_heads: 2,
            head_dim: 128,
            rope_theta: 1e6,
            attention_bias: true,
            ..base
        },
        "qwen3-1.7b" => ModelConfig {
            arch: Arch::Qwen3,
            vocab_size: 151936,
            hidden_size: 2048,
            intermediate_size: 6144,
            num_layers: 28,
            num_heads: 16,
            num_kv_heads: 8,
            head_dim: 128,
            rope_theta: 1e6,
            max_position_embeddings: 40960,
            qk_norm: true,
            ..base
        },
        "gemma-2-2b" => ModelConfig {
            arch: Arch::Gemma2,
            vocab_size: 256000,
            hidden_size: 2304,
            intermediate_size: 9216,
            num_layers: 26,
            num_heads: 8,
            num_kv_heads: 4,
            head_dim: 256,
            max_position_embeddings: 8192,
            sliding_window: Some(4096),
            sliding_layers: Some((0..26).map(|l| l % 2 == 0).collect()),
            mlp_act: MlpAct::GeluTanh,
            query_pre_attn_scalar: Some(256.0),
            attn_softcap: Some(50.0),
            final_softcap: Some(30.0),
            gemma_norms: true,
            ..base
        },
        "llama-3.2-1b" => ModelConfig {
            vocab_size: 128256,
            hidden_size: 2048,
            intermediate_size: 8192,
            num_layers: 16,
            num_heads: 32,
            num_kv_heads: 8,
            head_dim: 64,
            rope_theta: 500000.0,
            rope_scaling: Some(Llama3Scaling {
                factor: 32.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192.0,
            }),
            rms_norm_eps: 1e-5,
            max_position_embeddings: 131072,
            ..base
        },
        "smollm2-135m" => ModelConfig {
            vocab_size: 49152,
            hidden_size: 576,
            intermediate_size: 1536,
            num_layers: 30,
            num_heads: 9,
            num_kv_heads: 3,
            head_dim: 64,
            rope_theta: 100000.0,
            rms_norm_eps: 1e-5,
            max_position_embeddings: 8192,
            ..base
        },
        _ => bail!(
            "unknown model shape {name:?}: expected one of {}",
            PRESETS.join(", ")
        ),
    })
}

/// Every tensor of `cfg` with the Hugging Face names, random.
pub struct RandomWeights {
    cfg: ModelConfig,
    seed: u64,
}

impl RandomWeights {
    pub fn new(cfg: ModelConfig, seed: u64) -> Self {
        RandomWeights { cfg, seed }
    }

    fn all(&self) -> Vec<(String, Vec<usize>)> {
        let c = &self.cfg;
        let (d, f, v) = (c.hidden_size, c.intermediate_size, c.vocab_size);
        let qw = c.num_heads * c.head_dim;
        let kvw = c.num_kv_heads * c.head_dim;
        let mut t = vec![
            ("model.embed_tokens.weight".to_string(), vec![v, d]),
            ("model.norm.weight".to_string(), vec![d]),
        ];
        if !c.tie_word_embeddings {
            t.push(("lm_head.weight".to_string(), vec![v, d]));
        }
        for l in 0..c.num_layers {
            let p = format!("model.layers.{l}");
            t.push((format!("{p}.input_layernorm.weight"), vec![d]));
            t.push((format!("{p}.post_attention_layernorm.weight"), vec![d]));
            if c.gemma_norms {
                t.push((format!("{p}.pre_feedforward_layernorm.weight"), vec![d]));
                t.push((format!("{p}.post_feedforward_layernorm.weight"), vec![d]));
            }
            t.push((format!("{p}.self_attn.q_proj.weight"), vec![qw, d]));
            t.push((format!("{p}.self_attn.k_proj.weight"), vec![kvw, d]));
            t.push((format!("{p}.self_attn.v_proj.weight"), vec![kvw, d]));
            t.push((format!("{p}.self_attn.o_proj.weight"), vec![d, qw]));
            if c.attention_bias {
                t.push((format!("{p}.self_attn.q_proj.bias"), vec![qw]));
                t.push((format!("{p}.self_attn.k_proj.bias"), vec![kvw]));
                t.push((format!("{p}.self_attn.v_proj.bias"), vec![kvw]));
            }
            if c.qk_norm {
                t.push((format!("{p}.self_attn.q_norm.weight"), vec![c.head_dim]));
                t.push((format!("{p}.self_attn.k_norm.weight"), vec![c.head_dim]));
            }
            t.push((format!("{p}.mlp.gate_proj.weight"), vec![f, d]));
            t.push((format!("{p}.mlp.up_proj.weight"), vec![f, d]));
            t.push((format!("{p}.mlp.down_proj.weight"), vec![d, f]));
        }
        t
    }
}

impl WeightSource for RandomWeights {
    fn names(&self) -> Vec<String> {
        self.all().into_iter().map(|(n, _)| n).collect()
    }

    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.all()
            .into_iter()
            .find(|(n, _)| n == name)
            .map(|(_, s)| s)
    }

    fn get(&self, name: &str) -> Result<HostTensor> {
        let Some(shape) = self.shape(name) else {
            bail!("{}: tensor {name} is missing", self.origin());
        };
        let n: usize = shape.iter().product();
        if name.ends_with("norm.weight") {
            return Ok(HostTensor {
                shape,
                data: vec![1.0; n],
            });
        }
        // Uniform(±a) has std a/√3; a = 0.02·√3 gives std 0.02. Chunks get their own
        // generators (seeded by name and chunk) so generation runs in parallel, reproducibly.
        let a = 0.02 * 3f64.sqrt();
        let name_seed = name
            .bytes()
            .fold(self.seed ^ 0xcbf2_9ce4_8422_2325, |h, b| {
                (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
            });
        let mut data = vec![0f32; n];
        data.par_chunks_mut(1 << 16).enumerate().for_each(|(i, c)| {
            let mut rng = Rng::new(name_seed.wrapping_add(i as u64));
            for x in c {
                *x = rng.uniform(-a, a) as f32;
            }
        });
        Ok(HostTensor { shape, data })
    }

    fn origin(&self) -> String {
        format!("random weights (seed {})", self.seed)
    }
}
