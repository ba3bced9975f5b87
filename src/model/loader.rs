//! Loading a model: a Hugging Face directory (`config.json`, safetensors weights single or
//! sharded, `tokenizer.json`, `tokenizer_config.json` / `chat_template.jinja`) or a GGUF file.
//!
//! Weights stay memory-mapped; [`WeightSource::get`] converts one tensor at a time to f32.

use crate::model::chat::{chat_template_from_config, ChatTemplate, SPECIAL_TOKEN_NAMES};
use crate::model::config::{Arch, Llama3Scaling, ModelConfig};
use crate::model::gguf::{config_from_gguf, GgufFile, GgufWeights};
use crate::model::tokenizer::Tokenizer;
use crate::model::weights::{HostTensor, WeightSource};
use anyhow::{anyhow, bail, ensure, Context, Result};
use half::{bf16, f16};
use safetensors::{Dtype, SafeTensors};
use serde_json::{Map, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Read and parse a JSON file; errors name the file (and the line and column of a syntax error).
pub(crate) fn read_json(path: &Path) -> Result<Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: invalid JSON", path.display()))
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
pub fn config_from_hf_json(path: &Path) -> Result<ModelConfig> {
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
        other => bail!(
            "{}: architecture {other:?} (key \"architectures\") is not supported; caft-fast runs {}",
            path.display(),
            Arch::SUPPORTED.join(", ")
        ),
    };

    if let Some(act) = k.str_opt("hidden_act")? {
        ensure!(
            act == "silu",
            k.err(
                "hidden_act",
                &format!("is {act:?}; only \"silu\" (SwiGLU) is supported")
            )
        );
    }
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

    let sliding_window = sliding_window(&k, arch, num_layers)?;
    let default_max_pos = match arch {
        Arch::Llama => 2048,
        Arch::Qwen2 => 32768,
        Arch::Mistral => 4096 * 32,
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
        tie_word_embeddings: k.bool_opt("tie_word_embeddings")?.unwrap_or(false),
        max_position_embeddings: k
            .usize_opt("max_position_embeddings")?
            .unwrap_or(default_max_pos),
        sliding_window,
        attention_bias: arch == Arch::Qwen2,
        bos_token_id: bos.first().copied(),
        eos_token_ids: k.ids("eos_token_id")?,
    })
}

/// The attention window of every layer, when it is the same for all layers.
///
/// Mistral: `sliding_window` (null = full attention). Qwen2: the window applies only when
/// `use_sliding_window` is true, and then only to layers `i >= max_window_layers`. A
/// transformers 5 `layer_types` list, when present, says it per layer. Mixed layers are refused.
fn sliding_window(k: &JsonKeys, arch: Arch, num_layers: usize) -> Result<Option<usize>> {
    let window = k.usize_opt("sliding_window")?;
    let mut sliding_layers = match arch {
        Arch::Llama => 0,
        Arch::Mistral => {
            if window.is_some() {
                num_layers
            } else {
                0
            }
        }
        Arch::Qwen2 => {
            if k.bool_opt("use_sliding_window")? == Some(true) && window.is_some() {
                let first = k.usize_opt("max_window_layers")?.unwrap_or(0);
                num_layers.saturating_sub(first)
            } else {
                0
            }
        }
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
            let mut n = 0;
            for t in types {
                match t.as_str() {
                    Some("full_attention") => {}
                    Some("sliding_attention") => n += 1,
                    _ => return Err(k.err("layer_types", &format!("holds unknown type {t}"))),
                }
            }
            sliding_layers = n;
        }
    }
    if sliding_layers == 0 {
        return Ok(None);
    }
    ensure!(
        sliding_layers == num_layers,
        "{}: {sliding_layers} of {num_layers} layers use a sliding window (keys \
         \"sliding_window\", \"use_sliding_window\", \"max_window_layers\", \"layer_types\"); \
         caft-fast supports the same attention on every layer",
        k.path.display()
    );
    window.map(Some).ok_or_else(|| {
        k.err(
            "sliding_window",
            "is null but layers ask for sliding attention",
        )
    })
}

/// One tensor of a safetensors shard: where its bytes are and how to read them.
#[derive(Clone, Debug)]
struct StTensor {
    shard: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    /// Absolute byte range inside the shard file.
    start: usize,
    end: usize,
}

struct Shard {
    path: PathBuf,
    map: memmap2::Mmap,
}

/// Safetensors weights (a single file or shards), memory-mapped; BF16, F16 and F32 tensors are
/// converted to f32 on [`WeightSource::get`].
pub struct SafetensorsWeights {
    origin: String,
    shards: Vec<Shard>,
    tensors: BTreeMap<String, StTensor>,
}

impl SafetensorsWeights {
    /// The weights of a Hugging Face directory: `model.safetensors.index.json` (sharded; its
    /// `weight_map` names each tensor's shard) or else `model.safetensors`.
    pub fn open_dir(dir: &Path) -> Result<SafetensorsWeights> {
        let index = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        if index.is_file() {
            let json = read_json(&index)?;
            let map = json
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| {
                    anyhow!(
                        "{}: key \"weight_map\" is missing or not an object",
                        index.display()
                    )
                })?;
            let mut files = BTreeSet::new();
            for (name, file) in map {
                let file = file.as_str().ok_or_else(|| {
                    anyhow!(
                        "{}: weight_map entry {name:?} is {file}, not a file name",
                        index.display()
                    )
                })?;
                ensure!(
                    !file.contains('/') && !file.contains('\\') && file != ".." && !file.is_empty(),
                    "{}: weight_map entry {name:?} names {file:?}, not a file in the directory",
                    index.display()
                );
                files.insert(file.to_string());
            }
            let paths: Vec<PathBuf> = files.iter().map(|f| dir.join(f)).collect();
            for p in &paths {
                ensure!(
                    p.is_file(),
                    "shard {} listed in {} is missing",
                    p.display(),
                    index.display()
                );
            }
            let w = Self::open_files(&paths, dir.display().to_string())?;
            // Every tensor of the index must be in the shard the index names.
            for (name, file) in map {
                let file = file.as_str().unwrap_or_default();
                match w.tensors.get(name) {
                    Some(t) if w.shards[t.shard].path.file_name() == Some(file.as_ref()) => {}
                    Some(t) => bail!(
                        "{}: tensor {name:?} is listed in shard {file} but found in {}",
                        index.display(),
                        w.shards[t.shard].path.display()
                    ),
                    None => bail!(
                        "{}: tensor {name:?} is listed in shard {file} but that shard lacks it",
                        index.display()
                    ),
                }
            }
            Ok(w)
        } else if single.is_file() {
            Self::open_files(&[single], dir.display().to_string())
        } else {
            bail!(
                "{}: no weights found (expected model.safetensors or model.safetensors.index.json)",
                dir.display()
            )
        }
    }

    /// The union of the tensors of the given safetensors files (no name may repeat).
    pub fn open_files(paths: &[PathBuf], origin: String) -> Result<SafetensorsWeights> {
        let mut shards = Vec::with_capacity(paths.len());
        let mut tensors = BTreeMap::new();
        for (i, path) in paths.iter().enumerate() {
            let file = File::open(path)
                .with_context(|| format!("cannot open safetensors file {}", path.display()))?;
            // SAFETY: read-only private map; we rely, as every memory-mapped loader does, on the
            // file not being truncated while open. Every tensor range is validated against the
            // map's length below.
            let map = unsafe { memmap2::Mmap::map(&file) }
                .with_context(|| format!("cannot memory-map {}", path.display()))?;
            let (header_len, meta) = SafeTensors::read_metadata(&map).map_err(|e| {
                anyhow!(
                    "{}: invalid safetensors file ({e}); it may be truncated or not a safetensors file",
                    path.display()
                )
            })?;
            let data_start = 8 + header_len;
            for (name, info) in meta.tensors() {
                let (s, e) = info.data_offsets;
                let t = StTensor {
                    shard: i,
                    dtype: info.dtype,
                    shape: info.shape.clone(),
                    start: data_start + s,
                    end: data_start + e,
                };
                ensure!(
                    t.end <= map.len(),
                    "{}: tensor {name:?} extends past the end",
                    path.display()
                );
                if tensors.insert(name.clone(), t).is_some() {
                    bail!(
                        "tensor {name:?} appears in more than one file (second: {})",
                        path.display()
                    );
                }
            }
            shards.push(Shard {
                path: path.clone(),
                map,
            });
        }
        Ok(SafetensorsWeights {
            origin,
            shards,
            tensors,
        })
    }
}

impl WeightSource for SafetensorsWeights {
    fn names(&self) -> Vec<String> {
        self.tensors.keys().cloned().collect()
    }

    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.tensors.get(name).map(|t| t.shape.clone())
    }

    fn get(&self, name: &str) -> Result<HostTensor> {
        let t = self
            .tensors
            .get(name)
            .ok_or_else(|| anyhow!("{}: no tensor named {name:?}", self.origin))?;
        let shard = &self.shards[t.shard];
        let bytes = &shard.map[t.start..t.end];
        let data: Vec<f32> = match t.dtype {
            Dtype::F32 => bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Dtype::F16 => bytes
                .chunks_exact(2)
                .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::BF16 => bytes
                .chunks_exact(2)
                .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            other => bail!(
                "{}: tensor {name:?} has dtype {other:?}; caft-fast reads BF16, F16 and F32",
                shard.path.display()
            ),
        };
        Ok(HostTensor {
            shape: t.shape.clone(),
            data,
        })
    }

    fn origin(&self) -> String {
        self.origin.clone()
    }
}

/// Everything loaded from a model path.
pub struct LoadedModel {
    pub config: ModelConfig,
    pub weights: Box<dyn WeightSource>,
    pub tokenizer: Option<Tokenizer>,
    pub chat_template: Option<ChatTemplate>,
    pub source: PathBuf,
}

impl std::fmt::Debug for LoadedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedModel")
            .field("config", &self.config)
            .field("weights", &self.weights.origin())
            .field("tokenizer", &self.tokenizer.is_some())
            .field("chat_template", &self.chat_template.is_some())
            .field("source", &self.source)
            .finish()
    }
}

/// Load a model from a Hugging Face directory or a `.gguf` file.
pub fn load_model(path: &Path) -> Result<LoadedModel> {
    if path.is_dir() {
        load_hf_dir(path)
    } else if path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
    {
        load_gguf(path)
    } else if !path.exists() {
        bail!("model path {} does not exist", path.display())
    } else {
        bail!(
            "{}: not a model directory (config.json + safetensors) or a .gguf file",
            path.display()
        )
    }
}

/// A special token string of `tokenizer_config.json`: a string, or an added-token object with
/// a `content` field.
fn special_token_string(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(|c| c.as_str()).map(String::from),
        _ => None,
    }
}

fn load_hf_dir(dir: &Path) -> Result<LoadedModel> {
    let config_path = dir.join("config.json");
    ensure!(
        config_path.is_file(),
        "{}: no config.json (a model directory holds config.json, safetensors weights and \
         tokenizer.json)",
        dir.display()
    );
    let config = config_from_hf_json(&config_path)?;
    let weights = SafetensorsWeights::open_dir(dir)?;

    // Named special tokens: tokenizer_config.json, then the legacy special_tokens_map.json.
    let mut specials: BTreeMap<String, String> = BTreeMap::new();
    let tc_path = dir.join("tokenizer_config.json");
    let tokenizer_config = if tc_path.is_file() {
        Some(read_json(&tc_path)?)
    } else {
        None
    };
    let stm_path = dir.join("special_tokens_map.json");
    let special_map = if stm_path.is_file() {
        Some(read_json(&stm_path)?)
    } else {
        None
    };
    for src in [&tokenizer_config, &special_map].into_iter().flatten() {
        for name in SPECIAL_TOKEN_NAMES {
            if let Some(s) = src.get(*name).and_then(special_token_string) {
                specials.entry(name.to_string()).or_insert(s);
            }
        }
    }

    let tok_path = dir.join("tokenizer.json");
    let tokenizer = if tok_path.is_file() {
        let mut tok = Tokenizer::from_file(&tok_path)?;
        // Token strings from tokenizer_config, else the ids of config.json.
        let bos = match specials.get("bos_token") {
            Some(s) => Some(s.clone()),
            None => config.bos_token_id.and_then(|id| tok.id_to_token(id)),
        };
        let eos = match specials.get("eos_token") {
            Some(s) => Some(s.clone()),
            None => config
                .eos_token_ids
                .first()
                .and_then(|&id| tok.id_to_token(id)),
        };
        tok.set_bos_eos(bos.as_deref(), eos.as_deref())
            .with_context(|| format!("{}: special tokens", dir.display()))?;
        for (name, tokn) in [
            ("bos_token", tok.bos_token()),
            ("eos_token", tok.eos_token()),
        ] {
            if let Some(t) = tokn {
                specials
                    .entry(name.to_string())
                    .or_insert_with(|| t.to_string());
            }
        }
        Some(tok)
    } else {
        None
    };

    let jinja_path = dir.join("chat_template.jinja");
    let source = if jinja_path.is_file() {
        Some(
            std::fs::read_to_string(&jinja_path)
                .with_context(|| format!("cannot read {}", jinja_path.display()))?,
        )
    } else if let Some(tc) = &tokenizer_config {
        chat_template_from_config(tc).with_context(|| format!("{}", tc_path.display()))?
    } else {
        None
    };
    let chat_template = match source {
        Some(src) => Some(
            ChatTemplate::with_special_tokens(&src, &specials)
                .with_context(|| format!("{}: chat template", dir.display()))?,
        ),
        None => None,
    };

    Ok(LoadedModel {
        config,
        weights: Box::new(weights),
        tokenizer,
        chat_template,
        source: dir.to_path_buf(),
    })
}

fn load_gguf(path: &Path) -> Result<LoadedModel> {
    let file = Arc::new(GgufFile::open(path)?);
    let config = config_from_gguf(&file)?;
    let weights = GgufWeights::new(file.clone(), config.num_heads, config.num_kv_heads)?;
    let tokenizer = if file.meta("tokenizer.ggml.tokens").is_some() {
        Some(Tokenizer::from_gguf(&file)?)
    } else {
        None
    };
    let chat_template = match file.meta_str_opt("tokenizer.chat_template")? {
        Some(src) => {
            // The token strings as the file spells them (as transformers reads them).
            let mut specials = BTreeMap::new();
            let tokens = file
                .meta("tokenizer.ggml.tokens")
                .and_then(|v| v.as_array())
                .and_then(|a| a.as_strings());
            if let Some(tokens) = tokens {
                for (name, key) in [
                    ("bos_token", "tokenizer.ggml.bos_token_id"),
                    ("eos_token", "tokenizer.ggml.eos_token_id"),
                    ("unk_token", "tokenizer.ggml.unknown_token_id"),
                    ("pad_token", "tokenizer.ggml.padding_token_id"),
                ] {
                    let id = file.meta(key).and_then(|v| v.as_u64());
                    if let Some(s) = id.and_then(|i| tokens.get(usize::try_from(i).ok()?)) {
                        specials.insert(name.to_string(), s.clone());
                    }
                }
            }
            Some(
                ChatTemplate::with_special_tokens(src, &specials)
                    .with_context(|| format!("{}: tokenizer.chat_template", path.display()))?,
            )
        }
        None => None,
    };
    Ok(LoadedModel {
        config,
        weights: Box::new(weights),
        tokenizer,
        chat_template,
        source: path.to_path_buf(),
    })
}
