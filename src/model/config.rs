//! Model hyper-parameters, and their parsing from a Hugging Face `config.json` (GGUF metadata
//! is read in `gguf.rs`).

use crate::io::read_json;
use anyhow::{anyhow, bail, ensure, Result};
use serde_json::{Map, Value};
use std::path::Path;

/// The decoder families caft-fast runs. All are pre-norm decoders with RMSNorm, rotary
/// embeddings, GQA attention and a gated MLP; they differ in the details below.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    /// `LlamaForCausalLM` (Llama 2/3, SmolLM2).
    Llama,
    /// `Qwen2ForCausalLM`: biases on q, k and v.
    Qwen2,
    /// `MistralForCausalLM`: optional sliding window.
    Mistral,
    /// `Qwen3ForCausalLM`: RMSNorm of every q and k head (`q_norm`, `k_norm`) before rope,
    /// explicit head_dim, no q/k/v biases by default.
    Qwen3,
    /// `Gemma2ForCausalLM`: norms as `(1 + w)`, extra norms after attention and after the MLP
    /// ("sandwich"), GeGLU, the embedding scaled by `sqrt(hidden)`, attention scale
    /// `query_pre_attn_scalar^-1/2`, soft-capped attention scores and final logits, sliding
    /// and global layers alternating, tied embeddings.
    Gemma2,
}

/// The gate activation of the MLP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MlpAct {
    /// `silu(gate) · up` (SwiGLU).
    Silu,
    /// `gelu_tanh(gate) · up` (GeGLU; transformers' `gelu_pytorch_tanh`).
    GeluTanh,
}

impl Arch {
    /// The `architectures[0]` strings of `config.json` we accept.
    pub const SUPPORTED: &'static [&'static str] = &[
        "LlamaForCausalLM",
        "Qwen2ForCausalLM",
        "MistralForCausalLM",
        "Qwen3ForCausalLM",
        "Gemma2ForCausalLM",
    ];
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
    /// The sliding window; `None` = full causal attention on every layer.
    pub sliding_window: Option<usize>,
    /// Which layers use the window (Gemma-2 alternates); `None` = every layer.
    pub sliding_layers: Option<Vec<bool>>,
    /// q, k, v projections carry biases (Qwen2; Qwen3 when `attention_bias` is true).
    pub attention_bias: bool,
    /// RMSNorm over each head of q and of k before rope, weights `[head_dim]` (Qwen3).
    pub qk_norm: bool,
    pub mlp_act: MlpAct,
    /// Attention scores are `q·k / sqrt(query_pre_attn_scalar)` (Gemma-2); `None` = `/
    /// sqrt(head_dim)`.
    pub query_pre_attn_scalar: Option<f64>,
    /// `c · tanh(s / c)` on the attention scores (before the mask) and on the final logits.
    pub attn_softcap: Option<f64>,
    pub final_softcap: Option<f64>,
    /// Gemma: every norm multiplies by `1 + w` (the stored weight is `w`), the embedding is
    /// multiplied by `sqrt(hidden)`, and each layer normalises its attention and MLP outputs
    /// (`post_attention_layernorm`, `post_feedforward_layernorm`) before adding them.
    pub gemma_norms: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

impl ModelConfig {
    /// The sliding window of layer `l` (`None`: full causal attention).
    pub fn layer_window(&self, l: usize) -> Option<usize> {
        match &self.sliding_layers {
            Some(on) if !on.get(l).copied().unwrap_or(false) => None,
            _ => self.sliding_window,
        }
    }

    /// The heads of layer `l`'s attention: scale, soft-cap and window.
    pub fn attn_heads(&self, l: usize) -> crate::backend::AttnShape {
        crate::backend::AttnShape {
            n_heads: self.num_heads,
            n_kv_heads: self.num_kv_heads,
            head_dim: self.head_dim,
            window: self.layer_window(l),
            scale: (1.0
                / self
                    .query_pre_attn_scalar
                    .unwrap_or(self.head_dim as f64)
                    .sqrt()) as f32,
            softcap: self.attn_softcap.map(|c| c as f32),
        }
    }

    /// Parse a Hugging Face `config.json`. Errors name the file and the offending key.
    pub fn from_hf_json(path: &Path) -> Result<Self> {
        config_from_hf_json(path)
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

/// Typed access to the keys of a `config.json` object, with errors that name file and key.
struct JsonKeys<'a> {
    path: &'a Path,
    obj: &'a Map<String, Value>,
}

impl JsonKeys<'_> {
    /// The value of `key`, treating JSON `null` like an absent key.
    fn get(&self, key: &str) -> Option<&Value> {
        self.obj.get(key).filter(|v| !v.is_null())
    }

    fn err(&self, key: &str, what: &str) -> anyhow::Error {
        anyhow!("{}: key \"{key}\" {what}", self.path.display())
    }

    fn usize_opt(&self, key: &str) -> Result<Option<usize>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .and_then(|x| usize::try_from(x).ok())
                .map(Some)
                .ok_or_else(|| self.err(key, &format!("must be a non-negative integer, got {v}"))),
        }
    }

    fn usize_req(&self, key: &str) -> Result<usize> {
        let v = self
            .usize_opt(key)?
            .ok_or_else(|| self.err(key, "is missing"))?;
        ensure!(v > 0, self.err(key, "must be positive, got 0"));
        Ok(v)
    }

    fn f64_opt(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.err(key, &format!("must be a number, got {v}"))),
        }
    }

    fn bool_opt(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| self.err(key, &format!("must be true or false, got {v}"))),
        }
    }

    fn str_opt(&self, key: &str) -> Result<Option<&str>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(Some)
                .ok_or_else(|| self.err(key, &format!("must be a string, got {v}"))),
        }
    }

    /// A token id key that may be an integer or a list of integers (`eos_token_id`).
    fn ids(&self, key: &str) -> Result<Vec<u32>> {
        let one = |v: &Value| v.as_u64().and_then(|x| u32::try_from(x).ok());
        match self.get(key) {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| one(v).ok_or_else(|| self.err(key, &format!("holds {v}, not a token id"))))
                .collect(),
            Some(v) => one(v)
                .map(|id| vec![id])
                .ok_or_else(|| self.err(key, &format!("must be a token id or a list, got {v}"))),
        }
    }
}

/// Parse a Hugging Face `config.json` into a [`ModelConfig`].
///
/// Accepts both the transformers 4 layout (`rope_theta`, `rope_scaling`) and the transformers 5
/// one (`rope_parameters` holding `rope_theta` and `rope_type`). Errors name the file and key.
fn config_from_hf_json(path: &Path) -> Result<ModelConfig> {
    let json = read_json(path)?;
    let obj = json
        .as_object()
        .ok_or_else(|| anyhow!("{}: expected a JSON object", path.display()))?;
    let k = JsonKeys { path, obj };

    let arch_name = match k.get("architectures") {
        Some(Value::Array(a)) if !a.is_empty() => a[0]
            .as_str()
            .ok_or_else(|| k.err("architectures", "must be a list of strings"))?,
        Some(_) => return Err(k.err("architectures", "must be a non-empty list of strings")),
        None => {
            return Err(k.err(
                "architectures",
                &format!("is missing (supported: {})", Arch::SUPPORTED.join(", ")),
            ))
        }
    };
    let arch = match arch_name {
        "LlamaForCausalLM" => Arch::Llama,
        "Qwen2ForCausalLM" => Arch::Qwen2,
        "MistralForCausalLM" => Arch::Mistral,
        "Qwen3ForCausalLM" => Arch::Qwen3,
        "Gemma2ForCausalLM" => Arch::Gemma2,
        other => bail!(
            "{}: architecture {other:?} (key \"architectures\") is not supported; caft-fast runs {}",
            path.display(),
            Arch::SUPPORTED.join(", ")
        ),
    };

    // Gemma-2 names its activation `hidden_activation` (and keeps a legacy `hidden_act`).
    let act_key = match arch {
        Arch::Gemma2 if k.get("hidden_activation").is_some() => "hidden_activation",
        _ => "hidden_act",
    };
    let mlp_act = match (arch, k.str_opt(act_key)?) {
        (Arch::Gemma2, None | Some("gelu_pytorch_tanh")) => MlpAct::GeluTanh,
        (Arch::Gemma2, Some(other)) => {
            return Err(k.err(
                act_key,
                &format!("is {other:?}; Gemma-2 runs \"gelu_pytorch_tanh\""),
            ))
        }
        (_, None | Some("silu")) => MlpAct::Silu,
        (_, Some(other)) => {
            return Err(k.err(
                act_key,
                &format!("is {other:?}; only \"silu\" (SwiGLU) is supported"),
            ))
        }
    };
    // Gemma-2's soft-caps and attention scale: numbers (or null for no cap).
    let positive = |key: &str| -> Result<Option<f64>> {
        match k.get(key) {
            None => Ok(None),
            Some(v) => match v.as_f64() {
                Some(x) if x.is_finite() && x > 0.0 => Ok(Some(x)),
                _ => Err(k.err(key, &format!("is {v}; expected a positive number or null"))),
            },
        }
    };
    let (attn_softcap, final_softcap, query_pre_attn_scalar) = match arch {
        Arch::Gemma2 => (
            positive("attn_logit_softcapping")?,
            positive("final_logit_softcapping")?,
            positive("query_pre_attn_scalar")?,
        ),
        _ => (None, None, None),
    };
    // Llama's optional biases would also sit on o_proj and the MLP, which the model lacks.
    if arch == Arch::Llama {
        for key in ["attention_bias", "mlp_bias"] {
            ensure!(
                k.bool_opt(key)? != Some(true),
                k.err(
                    key,
                    "is true; biases on Llama projections are not supported"
                )
            );
        }
    }

    let hidden_size = k.usize_req("hidden_size")?;
    let num_heads = k.usize_req("num_attention_heads")?;
    let num_layers = k.usize_req("num_hidden_layers")?;
    let num_kv_heads = match k.usize_opt("num_key_value_heads")? {
        Some(n) => n,
        None => num_heads,
    };
    ensure!(
        num_kv_heads > 0 && num_heads.is_multiple_of(num_kv_heads),
        k.err(
            "num_key_value_heads",
            &format!("= {num_kv_heads} must divide num_attention_heads = {num_heads}")
        )
    );
    let head_dim = match k.usize_opt("head_dim")? {
        Some(d) => d,
        None => {
            ensure!(
                hidden_size.is_multiple_of(num_heads),
                k.err(
                    "hidden_size",
                    &format!(
                        "= {hidden_size} is not a multiple of num_attention_heads = {num_heads}"
                    )
                )
            );
            hidden_size / num_heads
        }
    };
    ensure!(
        head_dim.is_multiple_of(2),
        k.err("head_dim", "must be even for rotary embeddings")
    );

    // transformers 5 nests rope settings in `rope_parameters`; 4 has top-level keys.
    let (rope_obj, rope_key) = match k.get("rope_parameters") {
        Some(Value::Object(o)) => (Some(o), "rope_parameters"),
        Some(_) => return Err(k.err("rope_parameters", "must be an object")),
        None => match k.get("rope_scaling") {
            Some(Value::Object(o)) => (Some(o), "rope_scaling"),
            Some(_) => return Err(k.err("rope_scaling", "must be an object or null")),
            None => (None, "rope_scaling"),
        },
    };
    let mut rope_theta = k.f64_opt("rope_theta")?;
    let mut rope_scaling = None;
    if let Some(o) = rope_obj {
        let r = JsonKeys { path, obj: o };
        if let Some(t) = r.f64_opt("rope_theta")? {
            rope_theta = Some(t);
        }
        let kind = match r.str_opt("rope_type")? {
            Some(t) => Some(t),
            None => r.str_opt("type")?,
        };
        match kind {
            None | Some("default") => {}
            Some("llama3") => {
                let need = |key: &str| -> Result<f64> {
                    r.f64_opt(key)?.ok_or_else(|| {
                        anyhow!(
                            "{}: key \"{rope_key}.{key}\" is missing (needed for llama3 rope scaling)",
                            path.display()
                        )
                    })
                };
                rope_scaling = Some(Llama3Scaling {
                    factor: need("factor")?,
                    low_freq_factor: need("low_freq_factor")?,
                    high_freq_factor: need("high_freq_factor")?,
                    original_max_position_embeddings: need("original_max_position_embeddings")?,
                });
            }
            Some(other) => bail!(
                "{}: key \"{rope_key}\" asks for rope type {other:?}; supported: none (default) \
                 and \"llama3\"",
                path.display()
            ),
        }
    }

    let (sliding_window, sliding_layers) = sliding_window(&k, arch, num_layers)?;
    let default_max_pos = match arch {
        Arch::Llama => 2048,
        Arch::Qwen2 => 32768,
        Arch::Mistral => 4096 * 32,
        Arch::Qwen3 => 40960,
        Arch::Gemma2 => 8192,
    };
    let attention_bias = match arch {
        Arch::Qwen2 => true,
        Arch::Qwen3 => k.bool_opt("attention_bias")?.unwrap_or(false),
        _ => false,
    };

    let bos = k.ids("bos_token_id")?;
    ensure!(
        bos.len() <= 1,
        k.err("bos_token_id", "must be a single token id")
    );

    Ok(ModelConfig {
        arch,
        vocab_size: k.usize_req("vocab_size")?,
        hidden_size,
        intermediate_size: k.usize_req("intermediate_size")?,
        num_layers,
        num_heads,
        num_kv_heads,
        head_dim,
        rope_theta: rope_theta.unwrap_or(10000.0),
        rope_scaling,
        rms_norm_eps: k.f64_opt("rms_norm_eps")?.unwrap_or(1e-6),
        tie_word_embeddings: k
            .bool_opt("tie_word_embeddings")?
            .unwrap_or(arch == Arch::Gemma2),
        max_position_embeddings: k
            .usize_opt("max_position_embeddings")?
            .unwrap_or(default_max_pos),
        sliding_window,
        sliding_layers,
        attention_bias,
        qk_norm: arch == Arch::Qwen3,
        mlp_act,
        query_pre_attn_scalar,
        attn_softcap,
        final_softcap,
        gemma_norms: arch == Arch::Gemma2,
        bos_token_id: bos.first().copied(),
        eos_token_ids: k.ids("eos_token_id")?,
    })
}

/// The sliding window and which layers use it (`None`: every layer does).
///
/// Mistral: `sliding_window` on every layer (null = full attention). Qwen2/Qwen3: only when
/// `use_sliding_window` is true, and then on layers `i >= max_window_layers`. Gemma-2: even
/// layers slide, odd ones are global. A transformers 5 `layer_types` list, when present, says
/// it per layer.
fn sliding_window(
    k: &JsonKeys,
    arch: Arch,
    num_layers: usize,
) -> Result<(Option<usize>, Option<Vec<bool>>)> {
    let window = k.usize_opt("sliding_window")?;
    let mut sliding: Vec<bool> = match arch {
        Arch::Llama => vec![false; num_layers],
        Arch::Mistral => vec![window.is_some(); num_layers],
        Arch::Qwen2 | Arch::Qwen3 => {
            let on = k.bool_opt("use_sliding_window")? == Some(true) && window.is_some();
            let first = k.usize_opt("max_window_layers")?.unwrap_or(0);
            (0..num_layers).map(|l| on && l >= first).collect()
        }
        Arch::Gemma2 => (0..num_layers).map(|l| l % 2 == 0).collect(),
    };
    if arch != Arch::Llama {
        if let Some(types) = k.get("layer_types") {
            let types = types
                .as_array()
                .ok_or_else(|| k.err("layer_types", "must be a list of strings"))?;
            ensure!(
                types.len() == num_layers,
                k.err(
                    "layer_types",
                    &format!("has {} entries for {num_layers} layers", types.len())
                )
            );
            sliding = types
                .iter()
                .map(|t| match t.as_str() {
                    Some("full_attention") => Ok(false),
                    Some("sliding_attention") => Ok(true),
                    _ => Err(k.err("layer_types", &format!("holds unknown type {t}"))),
                })
                .collect::<Result<_>>()?;
        }
    }
    if !sliding.contains(&true) {
        return Ok((None, None));
    }
    let w = window.ok_or_else(|| {
        k.err(
            "sliding_window",
            "is null but layers ask for sliding attention",
        )
    })?;
    ensure!(w > 0, k.err("sliding_window", "is 0"));
    let all = sliding.iter().all(|&s| s);
    Ok((Some(w), (!all).then_some(sliding)))
}
