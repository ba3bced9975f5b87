//! Loading a model: a Hugging Face directory (`config.json`, safetensors weights single or
//! sharded, `tokenizer.json`, `tokenizer_config.json` / `chat_template.jinja`) or a GGUF file.
//!
//! Weights stay memory-mapped; [`WeightSource::get`] converts one tensor at a time to f32.

use crate::model::chat::{chat_template_from_config, ChatTemplate, SPECIAL_TOKEN_NAMES};
use crate::model::config::ModelConfig;
use crate::model::gguf::{config_from_gguf, GgufFile, GgufWeights};
use crate::model::tokenizer::Tokenizer;
use crate::model::weights::{HostTensor, WeightSource};
use anyhow::{anyhow, bail, ensure, Context, Result};
use half::{bf16, f16};
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

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
            let json = crate::io::read_json(&index)?;
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

/// Load a model from a Hugging Face directory, a `.gguf` file, or a Hub id (`ORG/NAME[@REV]`)
/// found in the local Hugging Face cache ([`crate::model::hub`]).
pub fn load_model(path: &Path) -> Result<LoadedModel> {
    if !path.exists() {
        if let Some(spec) = path
            .to_str()
            .filter(|s| crate::model::hub::parse_id(s).is_some())
        {
            return load_hf_dir(&crate::model::hub::resolve(spec)?);
        }
    }
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
    let config = ModelConfig::from_hf_json(&config_path)?;
    let weights = SafetensorsWeights::open_dir(dir)?;

    // Named special tokens: tokenizer_config.json, then the legacy special_tokens_map.json.
    let mut specials: BTreeMap<String, String> = BTreeMap::new();
    let tc_path = dir.join("tokenizer_config.json");
    let tokenizer_config = if tc_path.is_file() {
        Some(crate::io::read_json(&tc_path)?)
    } else {
        None
    };
    let stm_path = dir.join("special_tokens_map.json");
    let special_map = if stm_path.is_file() {
        Some(crate::io::read_json(&stm_path)?)
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
