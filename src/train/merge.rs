//! The model folders a run writes, which `transformers` loads with
//! `AutoModelForCausalLM.from_pretrained` (and caft-fast with `--model`): `--merge`'s
//! standalone model with the adapter folded into the weights, `W' = W + scale · B A` for every
//! adapted projection (f32), and full fine-tuning's trained model (in the source's dtype or
//! `--save-dtype`).
//!
//! A folder holds `config.json` (the source's, or derived from GGUF metadata), the tensors in
//! safetensors shards (streamed one tensor at a time so memory stays at one tensor beyond the
//! model) and the tokenizer files when the source has them (for GGUF, the tokenizer and chat
//! template are rebuilt from its metadata).

use crate::model::config::{Arch, MlpAct, ModelConfig};
use crate::model::loader::LoadedModel;
use crate::model::lora::{LoraLayout, Target};
use crate::model::weights::HostTensor;
use anyhow::{bail, Context, Result};
use std::io::Write;
use std::path::Path;

/// `(layer, target)` of a Hugging Face projection weight name, e.g.
/// `model.layers.3.mlp.down_proj.weight` -> `(3, Down)`.
fn projection_of(name: &str) -> Option<(usize, Target)> {
    let rest = name.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer = layer.parse().ok()?;
    let module = rest.strip_suffix(".weight")?;
    Target::ALL
        .into_iter()
        .find(|t| module == format!("{}.{}", t.parent(), t.module_name()))
        .map(|t| (layer, t))
}

/// `w[d_out, d_in] += scale · B[d_out, r] A[r, d_in]`, each entry summed in f64 and rounded
/// once, so the merge adds no error beyond the f32 result.
fn add_lora(w: &mut [f32], a: &[f32], b: &[f32], r: usize, d_in: usize, d_out: usize, scale: f64) {
    use rayon::prelude::*;
    w.par_chunks_mut(d_in)
        .enumerate()
        .take(d_out)
        .for_each(|(o, row)| {
            let brow = &b[o * r..(o + 1) * r];
            for (i, x) in row.iter_mut().enumerate() {
                let mut acc = 0f64;
                for k in 0..r {
                    acc += brow[k] as f64 * a[k * d_in + i] as f64;
                }
                *x = (*x as f64 + scale * acc) as f32;
            }
        });
}

/// A Hugging Face `config.json` for `cfg` (for sources without one: GGUF files).
pub fn hf_config_json(cfg: &ModelConfig) -> serde_json::Value {
    let (arch, model_type) = match cfg.arch {
        Arch::Llama => ("LlamaForCausalLM", "llama"),
        Arch::Qwen2 => ("Qwen2ForCausalLM", "qwen2"),
        Arch::Mistral => ("MistralForCausalLM", "mistral"),
        Arch::Qwen3 => ("Qwen3ForCausalLM", "qwen3"),
        Arch::Gemma2 => ("Gemma2ForCausalLM", "gemma2"),
    };
    let mut j = serde_json::json!({
        "architectures": [arch],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rope_theta": cfg.rope_theta,
        "rms_norm_eps": cfg.rms_norm_eps,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "max_position_embeddings": cfg.max_position_embeddings,
        "attention_bias": cfg.attention_bias,
        "mlp_bias": false,
        "torch_dtype": "float32",
    });
    if let Some(s) = &cfg.rope_scaling {
        j["rope_scaling"] = serde_json::json!({
            "rope_type": "llama3",
            "factor": s.factor,
            "low_freq_factor": s.low_freq_factor,
            "high_freq_factor": s.high_freq_factor,
            "original_max_position_embeddings": s.original_max_position_embeddings,
        });
    }
    if let Some(w) = cfg.sliding_window {
        j["sliding_window"] = w.into();
    }
    if let Some(on) = &cfg.sliding_layers {
        let types: Vec<&str> = on
            .iter()
            .map(|&s| {
                if s {
                    "sliding_attention"
                } else {
                    "full_attention"
                }
            })
            .collect();
        j["layer_types"] = types.into();
    }
    if cfg.mlp_act == MlpAct::GeluTanh {
        j["hidden_act"] = "gelu_pytorch_tanh".into();
        j["hidden_activation"] = "gelu_pytorch_tanh".into();
    }
    if let Some(s) = cfg.query_pre_attn_scalar {
        j["query_pre_attn_scalar"] = s.into();
    }
    if let Some(c) = cfg.attn_softcap {
        j["attn_logit_softcapping"] = c.into();
    }
    if let Some(c) = cfg.final_softcap {
        j["final_logit_softcapping"] = c.into();
    }
    if let Some(b) = cfg.bos_token_id {
        j["bos_token_id"] = b.into();
    }
    match cfg.eos_token_ids.as_slice() {
        [] => {}
        [e] => j["eos_token_id"] = (*e).into(),
        many => j["eos_token_id"] = many.into(),
    }
    j
}

/// Files of a Hugging Face folder that describe the tokenizer and generation, copied as they are.
const TOKENIZER_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
    "tokenizer.model",
];

/// The element type of a written model folder.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SaveDtype {
    F32,
    Bf16,
    F16,
}

impl SaveDtype {
    pub const NAMES: &'static str = "bf16, f16 or f32";

    pub fn parse(s: &str) -> Result<SaveDtype> {
        Ok(match s {
            "f32" | "float32" => SaveDtype::F32,
            "bf16" | "bfloat16" => SaveDtype::Bf16,
            "f16" | "float16" => SaveDtype::F16,
            _ => bail!("--save-dtype {s:?}: expected one of {}", Self::NAMES),
        })
    }

    /// From a config.json `torch_dtype` / `dtype` value (`None` for anything else).
    pub fn from_torch(s: &str) -> Option<SaveDtype> {
        match s {
            "float32" => Some(SaveDtype::F32),
            "bfloat16" => Some(SaveDtype::Bf16),
            "float16" => Some(SaveDtype::F16),
            _ => None,
        }
    }

    /// The name config.json uses.
    pub fn torch_name(self) -> &'static str {
        match self {
            SaveDtype::F32 => "float32",
            SaveDtype::Bf16 => "bfloat16",
            SaveDtype::F16 => "float16",
        }
    }

    fn safetensors_name(self) -> &'static str {
        match self {
            SaveDtype::F32 => "F32",
            SaveDtype::Bf16 => "BF16",
            SaveDtype::F16 => "F16",
        }
    }

    pub fn bytes(self) -> usize {
        match self {
            SaveDtype::F32 => 4,
            SaveDtype::Bf16 | SaveDtype::F16 => 2,
        }
    }

    /// Little-endian bytes of `data` in this type (round to nearest even).
    fn encode(self, data: &[f32], out: &mut Vec<u8>) {
        out.clear();
        match self {
            SaveDtype::F32 => out.extend_from_slice(bytemuck::cast_slice(data)),
            SaveDtype::Bf16 => out.extend(
                data.iter()
                    .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes()),
            ),
            SaveDtype::F16 => out.extend(
                data.iter()
                    .flat_map(|&x| half::f16::from_f32(x).to_le_bytes()),
            ),
        }
    }
}

/// The dtype a model folder's config.json declares (`torch_dtype`, or transformers 5's
/// `dtype`); `None` for a GGUF file or a config without one.
pub fn source_dtype(loaded: &LoadedModel) -> Option<SaveDtype> {
    let p = loaded.source.join("config.json");
    let j: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(p).ok()?).ok()?;
    ["torch_dtype", "dtype"]
        .iter()
        .find_map(|k| j.get(*k)?.as_str().and_then(SaveDtype::from_torch))
}

/// Largest shard of a written model, as `save_pretrained`'s default (5 GB).
pub const SHARD_BYTES: u64 = 5_000_000_000;

/// The bytes a model folder of `loaded`'s tensors takes in `dtype` (tensor data only).
pub fn model_bytes(loaded: &LoadedModel, dtype: SaveDtype) -> u64 {
    let src = loaded.weights.as_ref();
    src.names()
        .iter()
        .filter_map(|n| src.shape(n))
        .map(|s| (s.iter().product::<usize>() * dtype.bytes()) as u64)
        .sum()
}

/// Write the merged model folder `dir` from `loaded` and the adapter `params` (flat, `layout`),
/// in f32.
pub fn write_merged(
    dir: &Path,
    loaded: &LoadedModel,
    layout: &LoraLayout,
    params: &[f32],
) -> Result<()> {
    if params.len() != layout.len {
        bail!(
            "LoRA buffer has {} values but the layout needs {}",
            params.len(),
            layout.len
        );
    }
    let scale = layout.config.scale() as f64;
    write_model(dir, loaded, SaveDtype::F32, SHARD_BYTES, &|n, t| {
        if let Some((l, tg)) = projection_of(n) {
            if let Some(s) = layout.slots.get(l).and_then(|_| layout.slot(l, tg)) {
                if t.shape != [s.d_out, s.d_in] {
                    bail!(
                        "tensor {n} has shape {:?} but the adapter expects [{}, {}]",
                        t.shape,
                        s.d_out,
                        s.d_in
                    );
                }
                let a = &params[s.a_off..s.a_off + s.r * s.d_in];
                let b = &params[s.b_off..s.b_off + s.d_out * s.r];
                add_lora(&mut t.data, a, b, s.r, s.d_in, s.d_out, scale);
            }
        }
        Ok(())
    })
}

/// Write a Hugging Face model folder `dir`: every tensor of `loaded` (after `edit`, which may
/// change its values in place) in `dtype`, in shards of at most `shard_bytes`
/// (`model.safetensors`, or `model-0000i-of-0000N.safetensors` with
/// `model.safetensors.index.json`), streamed one tensor at a time so memory stays at one
/// tensor; then config.json (its dtype set to `dtype`) and the tokenizer files. Each file is
/// written under a temporary name and renamed when complete.
pub fn write_model(
    dir: &Path,
    loaded: &LoadedModel,
    dtype: SaveDtype,
    shard_bytes: u64,
    edit: &dyn Fn(&str, &mut HostTensor) -> Result<()>,
) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let src = loaded.weights.as_ref();
    let mut names = src.names();
    names.sort();
    // Shards: tensors in name order, a new shard when the next tensor would overflow one.
    let mut shards: Vec<Vec<(String, Vec<usize>)>> = vec![Vec::new()];
    let mut filled = 0u64;
    for n in &names {
        let shape = src
            .shape(n)
            .with_context(|| format!("{}: tensor {n} has no shape", src.origin()))?;
        let bytes = (shape.iter().product::<usize>() * dtype.bytes()) as u64;
        if filled > 0 && filled + bytes > shard_bytes {
            shards.push(Vec::new());
            filled = 0;
        }
        filled += bytes;
        shards
            .last_mut()
            .expect("one shard")
            .push((n.clone(), shape));
    }
    let count = shards.len();
    let file_name = |i: usize| match count {
        1 => "model.safetensors".to_string(),
        _ => format!("model-{:05}-of-{count:05}.safetensors", i + 1),
    };
    let mut weight_map = serde_json::Map::new();
    let mut total = 0u64;
    for (i, shard) in shards.iter().enumerate() {
        let path = dir.join(file_name(i));
        let mut header = serde_json::Map::new();
        header.insert(
            "__metadata__".into(),
            serde_json::json!({"format": "pt", "written_by": format!("caft-fast {}", env!("CARGO_PKG_VERSION"))}),
        );
        let mut off = 0usize;
        for (n, shape) in shard {
            let bytes = dtype.bytes() * shape.iter().product::<usize>();
            header.insert(
                n.clone(),
                serde_json::json!({"dtype": dtype.safetensors_name(), "shape": shape, "data_offsets": [off, off + bytes]}),
            );
            weight_map.insert(n.clone(), file_name(i).into());
            off += bytes;
        }
        total += off as u64;
        let mut hjson = serde_json::to_vec(&serde_json::Value::Object(header))?;
        // The data must start 8-byte aligned; the format pads the header with spaces.
        while hjson.len() % 8 != 0 {
            hjson.push(b' ');
        }
        let tmp = dir.join(format!(".{}.tmp-{}", file_name(i), std::process::id()));
        let write = || -> Result<()> {
            let f = std::fs::File::create(&tmp)
                .with_context(|| format!("creating {}", tmp.display()))?;
            let mut w = std::io::BufWriter::with_capacity(1 << 22, f);
            let io = |e: std::io::Error| anyhow::anyhow!("writing {}: {e}", tmp.display());
            w.write_all(&(hjson.len() as u64).to_le_bytes())
                .map_err(io)?;
            w.write_all(&hjson).map_err(io)?;
            let mut buf = Vec::new();
            for (n, shape) in shard {
                let mut t = src.get(n)?;
                if &t.shape != shape {
                    bail!("{}: tensor {n} changed shape while reading", src.origin());
                }
                edit(n, &mut t).with_context(|| src.origin())?;
                if &t.shape != shape || t.data.len() != shape.iter().product::<usize>() {
                    bail!("tensor {n}: the edited tensor no longer has shape {shape:?}");
                }
                dtype.encode(&t.data, &mut buf);
                w.write_all(&buf).map_err(io)?;
            }
            let f = w.into_inner().map_err(|e| io(e.into_error()))?;
            f.sync_all().map_err(io)?;
            std::fs::rename(&tmp, &path)
                .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
        };
        write().inspect_err(|_| {
            // Best effort: the write already failed and that error is the one to report.
            let _ = std::fs::remove_file(&tmp);
        })?;
    }
    if count > 1 {
        let index =
            serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        crate::io::write_atomic(
            &dir.join("model.safetensors.index.json"),
            &serde_json::to_vec_pretty(&index)?,
        )?;
    }

    let put = |name: &str, bytes: &[u8]| crate::io::write_atomic(&dir.join(name), bytes);
    let src_dir = loaded.source.is_dir().then_some(loaded.source.as_path());
    let config = match src_dir
        .map(|d| d.join("config.json"))
        .filter(|p| p.is_file())
    {
        Some(p) => {
            let text =
                std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
            let mut j: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("{}: malformed JSON", p.display()))?;
            // The weights are in `dtype` whatever the source stored.
            let keys = ["torch_dtype", "dtype"];
            for key in keys {
                if j.get(key).is_some() {
                    j[key] = dtype.torch_name().into();
                }
            }
            if keys.iter().all(|k| j.get(*k).is_none()) {
                j["torch_dtype"] = dtype.torch_name().into();
            }
            j
        }
        None => {
            let mut j = hf_config_json(&loaded.config);
            j["torch_dtype"] = dtype.torch_name().into();
            j
        }
    };
    put("config.json", &serde_json::to_vec_pretty(&config)?)?;
    if let Some(d) = src_dir {
        for f in TOKENIZER_FILES {
            let p = d.join(f);
            if p.is_file() {
                let bytes =
                    std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?;
                put(f, &bytes)?;
            }
        }
    } else {
        if let Some(tok) = &loaded.tokenizer {
            let json = tok
                .inner()
                .to_string(true)
                .map_err(|e| anyhow::anyhow!("serialising the tokenizer: {e}"))?;
            put("tokenizer.json", json.as_bytes())?;
            let mut tc = serde_json::json!({"tokenizer_class": "PreTrainedTokenizerFast"});
            if let Some(b) = tok.bos_token() {
                tc["bos_token"] = b.into();
            }
            if let Some(e) = tok.eos_token() {
                tc["eos_token"] = e.into();
            }
            put("tokenizer_config.json", &serde_json::to_vec_pretty(&tc)?)?;
        }
        if let Some(t) = &loaded.chat_template {
            put("chat_template.jinja", t.source().as_bytes())?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn projection_names() {
        assert_eq!(
            projection_of("model.layers.3.mlp.down_proj.weight"),
            Some((3, Target::Down))
        );
        assert_eq!(
            projection_of("model.layers.12.self_attn.q_proj.weight"),
            Some((12, Target::Q))
        );
        assert_eq!(projection_of("model.layers.3.self_attn.q_proj.bias"), None);
        assert_eq!(projection_of("model.norm.weight"), None);
        assert_eq!(projection_of("model.layers.1.input_layernorm.weight"), None);
    }

    #[test]
    fn add_lora_matches_a_naive_product() {
        let mut rng = crate::util::rng::Rng::new(4);
        let (r, d_in, d_out) = (3, 5, 4);
        let a = rng.normal_vec(r * d_in);
        let b = rng.normal_vec(d_out * r);
        let w0 = rng.normal_vec(d_out * d_in);
        let mut w = w0.clone();
        add_lora(&mut w, &a, &b, r, d_in, d_out, 0.5);
        for o in 0..d_out {
            for i in 0..d_in {
                let ba: f64 = (0..r)
                    .map(|k| b[o * r + k] as f64 * a[k * d_in + i] as f64)
                    .sum();
                let want = w0[o * d_in + i] as f64 + 0.5 * ba;
                assert!((w[o * d_in + i] as f64 - want).abs() <= 1e-6 * want.abs().max(1.0));
            }
        }
    }
}
