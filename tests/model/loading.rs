//! Model loading: config.json parsing, safetensors (single and sharded), GGUF (a small file
//! written here with known values of every supported type, and the real SmolLM2 file against
//! values transformers loads from it), and bad input of every kind giving a clear error.

use crate::support::*;
use caft_fast::model::config::ModelConfig;
use caft_fast::model::config::{Arch, MlpAct};
use caft_fast::model::gguf::{config_from_gguf, GgufFile, GgufHeader, GgufValue, GgufWeights};
use caft_fast::model::loader::{load_model, SafetensorsWeights};
use caft_fast::model::weights::WeightSource;
use caft_fast::util::rng::Rng;
use half::{bf16, f16};
use proptest::prelude::*;
use safetensors::Dtype;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

// ---- helpers --------------------------------------------------------------------------------

fn err_text<T>(r: anyhow::Result<T>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => format!("{e:#}"),
    }
}

// ---- config.json ------------------------------------------------------------------------------

fn llama_config_json(extra: &str) -> String {
    format!(
        r#"{{"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "vocab_size": 100, "rms_norm_eps": 1e-5, "max_position_embeddings": 512,
        "bos_token_id": 1, "eos_token_id": [2, 3]{extra}}}"#
    )
}

#[test]
fn config_llama_with_llama3_rope_both_layouts() {
    let d = TempDir::new("cfg-llama");
    let p = d.join("config.json");
    let scaling = r#""rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192"#;
    // transformers 4: top-level rope_theta + rope_scaling ("type" is the older key name).
    write(
        &p,
        &llama_config_json(&format!(
            r#", "rope_theta": 500000.0, "rope_scaling": {{{}}}"#,
            scaling.replace("rope_type", "type")
        )),
    );
    let c4 = ModelConfig::from_hf_json(&p).unwrap();
    // transformers 5: rope_parameters holds both.
    write(
        &p,
        &llama_config_json(&format!(
            r#", "rope_parameters": {{"rope_theta": 500000.0, {scaling}}}"#
        )),
    );
    let c5 = ModelConfig::from_hf_json(&p).unwrap();
    assert_eq!(c4, c5);
    assert_eq!(c4.arch, Arch::Llama);
    assert_eq!(
        (c4.hidden_size, c4.num_heads, c4.num_kv_heads, c4.head_dim),
        (64, 4, 2, 16)
    );
    assert_eq!(c4.rope_theta, 500000.0);
    let s = c4.rope_scaling.unwrap();
    assert_eq!(
        (s.factor, s.original_max_position_embeddings),
        (8.0, 8192.0)
    );
    assert_eq!(c4.bos_token_id, Some(1));
    assert_eq!(c4.eos_token_ids, vec![2, 3]);
    assert!(!c4.tie_word_embeddings && !c4.attention_bias);
    assert_eq!(c4.sliding_window, None);
    assert_eq!(c4.rms_norm_eps, 1e-5);
}

#[test]
fn config_qwen2_and_mistral_specifics() {
    let d = TempDir::new("cfg-qwen-mistral");
    let p = d.join("config.json");
    let base = |arch: &str, extra: &str| {
        format!(
            r#"{{"architectures": ["{arch}"], "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 1,
            "vocab_size": 100, "eos_token_id": 7{extra}}}"#
        )
    };
    // Qwen2: biases; the window is ignored unless use_sliding_window is true.
    write(
        &p,
        &base(
            "Qwen2ForCausalLM",
            r#", "sliding_window": 4096, "use_sliding_window": false, "tie_word_embeddings": true, "max_window_layers": 0"#,
        ),
    );
    let q = ModelConfig::from_hf_json(&p).unwrap();
    assert_eq!(q.arch, Arch::Qwen2);
    assert!(q.attention_bias && q.tie_word_embeddings);
    assert_eq!(q.sliding_window, None);
    assert_eq!(q.eos_token_ids, vec![7]);
    write(
        &p,
        &base(
            "Qwen2ForCausalLM",
            r#", "sliding_window": 64, "use_sliding_window": true, "max_window_layers": 0"#,
        ),
    );
    assert_eq!(
        ModelConfig::from_hf_json(&p).unwrap().sliding_window,
        Some(64)
    );
    // Some layers windowed, some not: the window applies from max_window_layers on.
    write(
        &p,
        &base(
            "Qwen2ForCausalLM",
            r#", "sliding_window": 64, "use_sliding_window": true, "max_window_layers": 2"#,
        ),
    );
    let q = ModelConfig::from_hf_json(&p).unwrap();
    let windows: Vec<_> = (0..4).map(|l| q.layer_window(l)).collect();
    assert_eq!(windows, [None, None, Some(64), Some(64)]);

    // Mistral: explicit head_dim (as Mistral-Small), window null => full attention.
    write(
        &p,
        &base(
            "MistralForCausalLM",
            r#", "head_dim": 32, "sliding_window": null"#,
        ),
    );
    let m = ModelConfig::from_hf_json(&p).unwrap();
    assert_eq!(
        (m.arch, m.head_dim, m.sliding_window),
        (Arch::Mistral, 32, None)
    );
    assert!(!m.attention_bias);
    write(
        &p,
        &base(
            "MistralForCausalLM",
            r#", "head_dim": null, "sliding_window": 4096"#,
        ),
    );
    let m = ModelConfig::from_hf_json(&p).unwrap();
    assert_eq!((m.head_dim, m.sliding_window), (16, Some(4096)));
}

/// Gemma-2: even layers slide by default (layer_types, when given, decides), the attention
/// scale comes from query_pre_attn_scalar, soft-caps and GeGLU are read, embeddings tie by
/// default; soft-caps of the wrong type are refused naming the key.
#[test]
fn config_gemma2_and_qwen3_specifics() {
    let d = TempDir::new("cfg-gemma");
    let p = d.join("config.json");
    let gemma = |extra: &str| {
        format!(
            r#"{{"architectures": ["Gemma2ForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
            "vocab_size": 100, "sliding_window": 8, "query_pre_attn_scalar": 24,
            "hidden_activation": "gelu_pytorch_tanh"{extra}}}"#
        )
    };
    write(
        &p,
        &gemma(r#", "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30"#),
    );
    let g = ModelConfig::from_hf_json(&p).unwrap();
    assert_eq!(g.arch, Arch::Gemma2);
    assert!(g.tie_word_embeddings && g.gemma_norms);
    assert_eq!(g.mlp_act, MlpAct::GeluTanh);
    assert_eq!((g.attn_softcap, g.final_softcap), (Some(50.0), Some(30.0)));
    let windows: Vec<_> = (0..4).map(|l| g.layer_window(l)).collect();
    assert_eq!(windows, [Some(8), None, Some(8), None]);
    let h = g.attn_heads(1);
    assert_eq!(
        (h.scale, h.softcap, h.window),
        ((1.0 / 24f64.sqrt()) as f32, Some(50.0), None)
    );
    write(
        &p,
        &gemma(
            r#", "layer_types": ["full_attention", "sliding_attention", "full_attention", "full_attention"]"#,
        ),
    );
    let g = ModelConfig::from_hf_json(&p).unwrap();
    let windows: Vec<_> = (0..4).map(|l| g.layer_window(l)).collect();
    assert_eq!(windows, [None, Some(8), None, None]);
    for (bad, key) in [
        (
            r#", "attn_logit_softcapping": "50""#,
            "attn_logit_softcapping",
        ),
        (
            r#", "final_logit_softcapping": -1"#,
            "final_logit_softcapping",
        ),
        (
            r#", "attn_logit_softcapping": [50]"#,
            "attn_logit_softcapping",
        ),
    ] {
        write(&p, &gemma(bad));
        let e = err_text(ModelConfig::from_hf_json(&p));
        assert!(
            e.contains(key) && e.contains("config.json") && e.contains("positive number"),
            "{e}"
        );
    }
    write(&p, &gemma("").replace("gelu_pytorch_tanh", "relu"));
    assert!(err_text(ModelConfig::from_hf_json(&p)).contains("hidden_activation"));

    write(
        &p,
        r#"{"architectures": ["Qwen3ForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 24,
        "vocab_size": 100}"#,
    );
    let q = ModelConfig::from_hf_json(&p).unwrap();
    assert_eq!(
        (q.arch, q.head_dim, q.qk_norm, q.attention_bias),
        (Arch::Qwen3, 24, true, false)
    );
    assert!(!q.tie_word_embeddings);
}

#[test]
fn config_errors_name_file_and_key() {
    let d = TempDir::new("cfg-errors");
    let p = d.join("config.json");
    let e = err_text(ModelConfig::from_hf_json(&p));
    assert!(e.contains("config.json"), "{e}");

    write(
        &p,
        &llama_config_json("").replace("LlamaForCausalLM", "GPT2LMHeadModel"),
    );
    let e = err_text(ModelConfig::from_hf_json(&p));
    for want in [
        "GPT2LMHeadModel",
        "LlamaForCausalLM",
        "Qwen2ForCausalLM",
        "MistralForCausalLM",
        "Qwen3ForCausalLM",
        "Gemma2ForCausalLM",
    ] {
        assert!(e.contains(want), "{e}");
    }

    write(
        &p,
        &llama_config_json("").replace("\"hidden_size\": 64,", ""),
    );
    let e = err_text(ModelConfig::from_hf_json(&p));
    assert!(
        e.contains("hidden_size") && e.contains("config.json"),
        "{e}"
    );

    write(
        &p,
        &llama_config_json(r#", "rope_scaling": {"rope_type": "yarn", "factor": 4.0}"#),
    );
    let e = err_text(ModelConfig::from_hf_json(&p));
    assert!(e.contains("yarn") && e.contains("llama3"), "{e}");

    write(
        &p,
        &llama_config_json(r#", "num_attention_heads": "four""#)
            .replace("\"num_attention_heads\": 4,", ""),
    );
    let e = err_text(ModelConfig::from_hf_json(&p));
    assert!(e.contains("num_attention_heads"), "{e}");

    write(
        &p,
        "{\"architectures\": [\"LlamaForCausalLM\"],\n \"hidden_size\": 64,,}",
    );
    let e = err_text(ModelConfig::from_hf_json(&p));
    assert!(e.contains("invalid JSON") && e.contains("line 2"), "{e}");
}

// ---- safetensors ------------------------------------------------------------------------------

/// Values exactly representable in bf16 and f16 (8-bit significands, moderate exponents), so
/// every dtype round-trips exactly and the comparisons below are exact.
fn exact_values(rng: &mut Rng, n: usize) -> Vec<f32> {
    (0..n)
        .map(|_| (rng.below(255) as f32 - 127.0) / 64.0)
        .collect()
}

fn encode(dtype: Dtype, xs: &[f32]) -> Vec<u8> {
    match dtype {
        Dtype::F32 => xs.iter().flat_map(|x| x.to_le_bytes()).collect(),
        Dtype::F16 => xs
            .iter()
            .flat_map(|&x| f16::from_f32(x).to_le_bytes())
            .collect(),
        Dtype::BF16 => xs
            .iter()
            .flat_map(|&x| bf16::from_f32(x).to_le_bytes())
            .collect(),
        Dtype::I32 => xs.iter().flat_map(|&x| (x as i32).to_le_bytes()).collect(),
        other => panic!("test encoder lacks {other:?}"),
    }
}

/// Write a safetensors file of `(name, dtype, shape, values)`, each value stored exactly in
/// its dtype.
fn write_exact(path: &Path, tensors: &[(&str, Dtype, Vec<usize>, Vec<f32>)]) {
    let encoded: Vec<(&str, Dtype, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(n, d, s, v)| (*n, *d, s.clone(), encode(*d, v)))
        .collect();
    write_safetensors(path, &encoded);
}

#[test]
fn safetensors_single_and_sharded_convert_exactly() {
    let mut rng = Rng::new(11);
    let a = exact_values(&mut rng, 12);
    let b = exact_values(&mut rng, 10);
    let c = exact_values(&mut rng, 6);

    let d = TempDir::new("st-single");
    write_exact(
        &d.join("model.safetensors"),
        &[
            ("a", Dtype::BF16, vec![3, 4], a.clone()),
            ("b", Dtype::F16, vec![10], b.clone()),
            ("c", Dtype::F32, vec![2, 1, 3], c.clone()),
        ],
    );
    let w = SafetensorsWeights::open_dir(&d).unwrap();
    assert_eq!(w.names(), vec!["a", "b", "c"]);
    assert_eq!(w.shape("c"), Some(vec![2, 1, 3]));
    assert_eq!(w.get("a").unwrap().data, a);
    assert_eq!(w.get("b").unwrap().data, b);
    assert_eq!(w.get("c").unwrap().data, c);
    let e = err_text(w.get("model.norm.weight"));
    assert!(e.contains("model.norm.weight"), "{e}");

    let s = TempDir::new("st-sharded");
    write_exact(
        &s.join("model-00001-of-00002.safetensors"),
        &[("a", Dtype::BF16, vec![3, 4], a.clone())],
    );
    write_exact(
        &s.join("model-00002-of-00002.safetensors"),
        &[
            ("b", Dtype::F16, vec![10], b.clone()),
            ("c", Dtype::F32, vec![6], c.clone()),
        ],
    );
    let index = r#"{"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors",
        "b": "model-00002-of-00002.safetensors", "c": "model-00002-of-00002.safetensors"}}"#;
    write(&s.join("model.safetensors.index.json"), index);
    let w = SafetensorsWeights::open_dir(&s).unwrap();
    assert_eq!(w.get("a").unwrap().data, a);
    assert_eq!(w.get("b").unwrap().shape, vec![10]);
    assert_eq!(w.get("c").unwrap().data, c);

    // A shard the index names but the folder lacks.
    std::fs::remove_file(s.join("model-00002-of-00002.safetensors")).unwrap();
    let e = err_text(SafetensorsWeights::open_dir(&s));
    assert!(
        e.contains("model-00002-of-00002.safetensors") && e.contains("missing"),
        "{e}"
    );
}

#[test]
fn safetensors_bad_inputs() {
    let mut rng = Rng::new(12);
    let d = TempDir::new("st-bad");
    let p = d.join("model.safetensors");
    write_exact(
        &p,
        &[
            ("w", Dtype::F32, vec![4, 4], exact_values(&mut rng, 16)),
            ("ids", Dtype::I32, vec![3], vec![1.0, 2.0, 3.0]),
        ],
    );
    let w = SafetensorsWeights::open_dir(&d).unwrap();
    let e = err_text(w.get("ids"));
    assert!(e.contains("ids") && e.contains("I32"), "{e}");

    // Truncated: every shorter prefix is refused, naming the file.
    let full = std::fs::read(&p).unwrap();
    for cut in [0, 5, 8, 20, full.len() / 2, full.len() - 1] {
        std::fs::write(&p, &full[..cut]).unwrap();
        let e = err_text(SafetensorsWeights::open_dir(&d));
        assert!(e.contains("model.safetensors"), "cut {cut}: {e}");
    }
    // No weights at all.
    std::fs::remove_file(&p).unwrap();
    let e = err_text(SafetensorsWeights::open_dir(&d));
    assert!(e.contains("model.safetensors"), "{e}");
}

#[test]
fn load_model_hf_dir_and_missing_pieces() {
    let mut rng = Rng::new(13);
    let d = TempDir::new("hf-dir");
    let e = err_text(load_model(&d));
    assert!(e.contains("config.json"), "{e}");

    write(&d.join("config.json"), &llama_config_json(""));
    let e = err_text(load_model(&d));
    assert!(e.contains("model.safetensors"), "{e}");

    let norm = exact_values(&mut rng, 64);
    write_exact(
        &d.join("model.safetensors"),
        &[("model.norm.weight", Dtype::BF16, vec![64], norm.clone())],
    );
    let m = load_model(&d).unwrap();
    assert!(m.tokenizer.is_none() && m.chat_template.is_none());
    assert_eq!(m.config.vocab_size, 100);
    assert_eq!(m.weights.get("model.norm.weight").unwrap().data, norm);

    // A corrupt tokenizer.json is an error naming it (an absent one is allowed).
    write(&d.join("tokenizer.json"), "{\"model\": 3}");
    let e = err_text(load_model(&d));
    assert!(e.contains("tokenizer.json"), "{e}");

    let e = err_text(load_model(&d.join("nope")));
    assert!(e.contains("nope") && e.contains("does not exist"), "{e}");
}

// ---- GGUF writer for tests --------------------------------------------------------------------

/// Builds GGUF v3 bytes: metadata entries (already encoded) and tensors (already encoded).
struct GgufBuilder {
    version: u32,
    kvs: Vec<u8>,
    n_kv: u64,
    tensors: Vec<(String, Vec<u64>, u32, Vec<u8>)>,
    alignment: u64,
}

fn gguf_str(s: &str) -> Vec<u8> {
    let mut v = (s.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(s.as_bytes());
    v
}

impl GgufBuilder {
    fn new() -> Self {
        GgufBuilder {
            version: 3,
            kvs: Vec::new(),
            n_kv: 0,
            tensors: Vec::new(),
            alignment: 32,
        }
    }

    /// A raw entry: key, value type id, encoded value.
    fn kv(&mut self, key: &str, ty: u32, value: &[u8]) -> &mut Self {
        self.kvs.extend(gguf_str(key));
        self.kvs.extend(ty.to_le_bytes());
        self.kvs.extend_from_slice(value);
        self.n_kv += 1;
        self
    }
    fn u32(&mut self, key: &str, v: u32) -> &mut Self {
        self.kv(key, 4, &v.to_le_bytes())
    }
    fn f32(&mut self, key: &str, v: f32) -> &mut Self {
        self.kv(key, 6, &v.to_le_bytes())
    }
    fn str(&mut self, key: &str, v: &str) -> &mut Self {
        self.kv(key, 8, &gguf_str(v))
    }
    fn bool(&mut self, key: &str, v: bool) -> &mut Self {
        self.kv(key, 7, &[v as u8])
    }
    fn str_array(&mut self, key: &str, items: &[&str]) -> &mut Self {
        let mut v = 8u32.to_le_bytes().to_vec();
        v.extend((items.len() as u64).to_le_bytes());
        for s in items {
            v.extend(gguf_str(s));
        }
        self.kv(key, 9, &v)
    }
    fn i32_array(&mut self, key: &str, items: &[i32]) -> &mut Self {
        let mut v = 5u32.to_le_bytes().to_vec();
        v.extend((items.len() as u64).to_le_bytes());
        for x in items {
            v.extend(x.to_le_bytes());
        }
        self.kv(key, 9, &v)
    }
    fn tensor(&mut self, name: &str, ne: &[u64], ty: u32, data: Vec<u8>) -> &mut Self {
        self.tensors.push((name.to_string(), ne.to_vec(), ty, data));
        self
    }

    fn build(&self) -> Vec<u8> {
        let mut out = b"GGUF".to_vec();
        out.extend(self.version.to_le_bytes());
        out.extend((self.tensors.len() as u64).to_le_bytes());
        out.extend(self.n_kv.to_le_bytes());
        out.extend_from_slice(&self.kvs);
        let align = |x: u64| x.div_ceil(self.alignment) * self.alignment;
        let mut offset = 0u64;
        let mut offsets = Vec::new();
        for (name, ne, ty, data) in &self.tensors {
            out.extend(gguf_str(name));
            out.extend((ne.len() as u32).to_le_bytes());
            for d in ne {
                out.extend(d.to_le_bytes());
            }
            out.extend(ty.to_le_bytes());
            out.extend(offset.to_le_bytes());
            offsets.push(offset);
            offset = align(offset + data.len() as u64);
        }
        // Data section: aligned start, each tensor at its aligned offset, nothing after the
        // last tensor (so any truncation cuts tensor data).
        let start = align(out.len() as u64);
        out.resize(start as usize, 0);
        for ((_, _, _, data), off) in self.tensors.iter().zip(offsets) {
            out.resize((start + off) as usize, 0);
            out.extend_from_slice(data);
        }
        out
    }
}

/// llama.cpp's q/k row permutation (what its converter writes): view `[rows, cols]` as
/// `(H, 2, rows/H/2, cols)` and swap axes 1 and 2.
fn llama_cpp_permute(w: &[f32], rows: usize, cols: usize, heads: usize) -> Vec<f32> {
    let d = rows / heads;
    let mut out = vec![0f32; w.len()];
    for h in 0..heads {
        for a in 0..2 {
            for b in 0..d / 2 {
                let src = h * d + a * (d / 2) + b;
                let dst = h * d + b * 2 + a;
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&w[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

/// Q8_0 blocks whose values are exactly `d · q`: returns (bytes, values).
fn q8_0(rng: &mut Rng, n: usize) -> (Vec<u8>, Vec<f32>) {
    let (mut bytes, mut vals) = (Vec::new(), Vec::new());
    for _ in 0..n / 32 {
        let d = f16::from_f32(rng.uniform(0.01, 0.1) as f32);
        bytes.extend(d.to_le_bytes());
        for _ in 0..32 {
            let q = rng.below(255) as i32 - 127;
            bytes.push(q as i8 as u8);
            vals.push(d.to_f32() * q as f32);
        }
    }
    (bytes, vals)
}

/// Pack row-major values whose blocks share `(d, m)` and whose nibbles are given into Q4_1.
fn q4_1_pack(nibbles: &[u8], dm: &[(f32, f32)]) -> Vec<u8> {
    let mut bytes = Vec::new();
    for (blk, &(d, m)) in nibbles.chunks(32).zip(dm) {
        bytes.extend(f16::from_f32(d).to_le_bytes());
        bytes.extend(f16::from_f32(m).to_le_bytes());
        for j in 0..16 {
            bytes.push(blk[j] | (blk[j + 16] << 4));
        }
    }
    bytes
}

const TINY_TOKENS: [&str; 32] = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "a",
    "b",
    "c",
    "d",
    "e",
    "f",
    "g",
    "h",
    "i",
    "j",
    "k",
    "l",
    "m",
    "n",
    "o",
    "p",
    "q",
    "r",
    "s",
    "t",
    "u",
    "v",
    "w",
    "x",
    "y",
    "z",
    "Ġ",
    "ab",
    "Ġab",
];

/// What the tiny GGUF holds, in Hugging Face layout, to compare with.
struct TinyGguf {
    bytes: Vec<u8>,
    expect: BTreeMap<String, (Vec<usize>, Vec<f32>)>,
}

/// A one-layer llama GGUF (hidden 64, 4 heads, 2 kv heads, ffn 128, vocab 32) with tensors of
/// every supported type, q and k stored permuted as llama.cpp does, no output.weight (tied),
/// a byte-level tokenizer and a chat template.
fn tiny_gguf(arch: &str) -> TinyGguf {
    let mut rng = Rng::new(21);
    let mut b = GgufBuilder::new();
    let mut expect = BTreeMap::new();
    let token_types: Vec<i32> = (0..32).map(|i| if i < 3 { 3 } else { 1 }).collect();
    b.str("general.architecture", arch)
        .str("general.name", "tiny")
        .u32("general.alignment", 32)
        .u32(&format!("{arch}.block_count"), 1)
        .u32(&format!("{arch}.context_length"), 256)
        .u32(&format!("{arch}.embedding_length"), 64)
        .u32(&format!("{arch}.feed_forward_length"), 128)
        .u32(&format!("{arch}.attention.head_count"), 4)
        .u32(&format!("{arch}.attention.head_count_kv"), 2)
        .f32(&format!("{arch}.rope.freq_base"), 10000.0)
        .f32(&format!("{arch}.attention.layer_norm_rms_epsilon"), 1e-5)
        .str("tokenizer.ggml.model", "gpt2")
        .str("tokenizer.ggml.pre", "smollm")
        .str_array("tokenizer.ggml.tokens", &TINY_TOKENS)
        .i32_array("tokenizer.ggml.token_type", &token_types)
        .str_array("tokenizer.ggml.merges", &["a b", "Ġ ab"])
        .u32("tokenizer.ggml.bos_token_id", 1)
        .u32("tokenizer.ggml.eos_token_id", 2)
        .bool("tokenizer.ggml.add_bos_token", false)
        .str(
            "tokenizer.chat_template",
            "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
        );
    // Every other value type, including a nested array, to exercise the parser.
    b.kv("test.u8", 0, &[200])
        .kv("test.i8", 1, &[0xfe])
        .kv("test.u16", 2, &60000u16.to_le_bytes())
        .kv("test.i16", 3, &(-3i16).to_le_bytes())
        .kv("test.i32", 5, &(-70000i32).to_le_bytes())
        .kv("test.u64", 10, &(1u64 << 40).to_le_bytes())
        .kv("test.i64", 11, &(-5i64).to_le_bytes())
        .kv("test.f64", 12, &0.25f64.to_le_bytes());
    let mut nested = 9u32.to_le_bytes().to_vec(); // array of arrays
    nested.extend(2u64.to_le_bytes());
    for row in [[1u16, 2], [3, 4]] {
        nested.extend(2u32.to_le_bytes());
        nested.extend(2u64.to_le_bytes());
        for x in row {
            nested.extend(x.to_le_bytes());
        }
    }
    b.kv("test.nested", 9, &nested);

    // token_embd: Q8_0, [32 tokens, 64] (ne = [64, 32]).
    let (bytes, vals) = q8_0(&mut rng, 32 * 64);
    b.tensor("token_embd.weight", &[64, 32], 8, bytes);
    expect.insert("model.embed_tokens.weight".into(), (vec![32, 64], vals));
    // Norms: F32.
    for (g, h) in [
        ("output_norm.weight", "model.norm.weight"),
        (
            "blk.0.attn_norm.weight",
            "model.layers.0.input_layernorm.weight",
        ),
        (
            "blk.0.ffn_norm.weight",
            "model.layers.0.post_attention_layernorm.weight",
        ),
    ] {
        let v = rng.normal_vec(64);
        b.tensor(
            g,
            &[64],
            0,
            v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        );
        expect.insert(h.into(), (vec![64], v));
    }
    // q: Q4_1 [64, 64], stored permuted over 4 heads. Each stored block gets its own (d, m),
    // so build the HF matrix from the permuted one (values d·q + m exact in f32).
    let nib: Vec<u8> = (0..64 * 64).map(|_| rng.below(16) as u8).collect();
    let dm: Vec<(f32, f32)> = (0..128)
        .map(|_| {
            (
                rng.below(8) as f32 / 16.0 + 0.0625,
                -(rng.below(8) as f32) / 8.0,
            )
        })
        .collect();
    let stored: Vec<f32> = nib
        .iter()
        .enumerate()
        .map(|(i, &q)| {
            let (d, m) = dm[i / 32];
            d * q as f32 + m
        })
        .collect();
    let hf_q = caft_fast::model::gguf::unpermute_qk(&stored, 64, 64, 4).unwrap();
    assert_eq!(llama_cpp_permute(&hf_q, 64, 64, 4), stored);
    b.tensor("blk.0.attn_q.weight", &[64, 64], 3, q4_1_pack(&nib, &dm));
    expect.insert(
        "model.layers.0.self_attn.q_proj.weight".into(),
        (vec![64, 64], hf_q),
    );
    // k: F16 [32, 64] over 2 kv heads, permuted from a known HF matrix.
    let hf_k: Vec<f32> = exact_values(&mut rng, 32 * 64);
    let stored_k = llama_cpp_permute(&hf_k, 32, 64, 2);
    b.tensor(
        "blk.0.attn_k.weight",
        &[64, 32],
        1,
        stored_k
            .iter()
            .flat_map(|&x| f16::from_f32(x).to_le_bytes())
            .collect(),
    );
    expect.insert(
        "model.layers.0.self_attn.k_proj.weight".into(),
        (vec![32, 64], hf_k),
    );
    // v: F32, o: BF16, gate: Q4_0, up: Q8_0, down: F32.
    let v = rng.normal_vec(32 * 64);
    b.tensor(
        "blk.0.attn_v.weight",
        &[64, 32],
        0,
        v.iter().flat_map(|x| x.to_le_bytes()).collect(),
    );
    expect.insert(
        "model.layers.0.self_attn.v_proj.weight".into(),
        (vec![32, 64], v),
    );
    let o = exact_values(&mut rng, 64 * 64);
    b.tensor(
        "blk.0.attn_output.weight",
        &[64, 64],
        30,
        o.iter()
            .flat_map(|&x| bf16::from_f32(x).to_le_bytes())
            .collect(),
    );
    expect.insert(
        "model.layers.0.self_attn.o_proj.weight".into(),
        (vec![64, 64], o),
    );
    let mut gate_bytes = Vec::new();
    let mut gate = Vec::new();
    for _ in 0..128 * 64 / 32 {
        let d = 0.25f32;
        gate_bytes.extend(f16::from_f32(d).to_le_bytes());
        let q: Vec<u8> = (0..32).map(|_| rng.below(16) as u8).collect();
        for j in 0..16 {
            gate_bytes.push(q[j] | (q[j + 16] << 4));
        }
        gate.extend(q.iter().map(|&x| d * (x as f32 - 8.0)));
    }
    b.tensor("blk.0.ffn_gate.weight", &[64, 128], 2, gate_bytes);
    expect.insert(
        "model.layers.0.mlp.gate_proj.weight".into(),
        (vec![128, 64], gate),
    );
    let (bytes, up) = q8_0(&mut rng, 128 * 64);
    b.tensor("blk.0.ffn_up.weight", &[64, 128], 8, bytes);
    expect.insert(
        "model.layers.0.mlp.up_proj.weight".into(),
        (vec![128, 64], up),
    );
    let down = rng.normal_vec(64 * 128);
    b.tensor(
        "blk.0.ffn_down.weight",
        &[128, 64],
        0,
        down.iter().flat_map(|x| x.to_le_bytes()).collect(),
    );
    expect.insert(
        "model.layers.0.mlp.down_proj.weight".into(),
        (vec![64, 128], down),
    );
    TinyGguf {
        bytes: b.build(),
        expect,
    }
}

// ---- GGUF -----------------------------------------------------------------------------------

#[test]
fn gguf_metadata_of_every_type() {
    let t = tiny_gguf("llama");
    let f = GgufFile::from_bytes(t.bytes, "tiny.gguf").unwrap();
    assert_eq!(f.header.version, 3);
    assert_eq!(f.meta("test.u8"), Some(&GgufValue::U8(200)));
    assert_eq!(f.meta("test.i8"), Some(&GgufValue::I8(-2)));
    assert_eq!(f.meta("test.u16"), Some(&GgufValue::U16(60000)));
    assert_eq!(f.meta("test.i16"), Some(&GgufValue::I16(-3)));
    assert_eq!(f.meta("test.i32"), Some(&GgufValue::I32(-70000)));
    assert_eq!(f.meta("test.u64"), Some(&GgufValue::U64(1 << 40)));
    assert_eq!(f.meta("test.i64"), Some(&GgufValue::I64(-5)));
    assert_eq!(f.meta("test.f64"), Some(&GgufValue::F64(0.25)));
    assert_eq!(
        f.meta("tokenizer.ggml.add_bos_token"),
        Some(&GgufValue::Bool(false))
    );
    use caft_fast::model::gguf::GgufArray;
    assert_eq!(
        f.meta("test.nested"),
        Some(&GgufValue::Array(GgufArray::Array(vec![
            GgufArray::U16(vec![1, 2]),
            GgufArray::U16(vec![3, 4])
        ])))
    );
    let toks = f.meta("tokenizer.ggml.tokens").unwrap().as_array().unwrap();
    assert_eq!(toks.as_strings().unwrap()[31], "Ġab");
    let q = f.header.tensor("blk.0.attn_q.weight").unwrap();
    assert_eq!((q.ne.clone(), q.shape()), (vec![64, 64], vec![64, 64]));
    assert_eq!(q.ggml_type.name(), "Q4_1");
    assert_eq!(f.header.data_start % 32, 0);
}

#[test]
fn gguf_weights_under_hf_names_exact() {
    let t = tiny_gguf("llama");
    let f = Arc::new(GgufFile::from_bytes(t.bytes, "tiny.gguf").unwrap());
    let cfg = config_from_gguf(&f).unwrap();
    assert_eq!(cfg.arch, Arch::Llama);
    assert_eq!(
        (cfg.num_layers, cfg.hidden_size, cfg.intermediate_size),
        (1, 64, 128)
    );
    assert_eq!(
        (
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_dim,
            cfg.vocab_size
        ),
        (4, 2, 16, 32)
    );
    assert!(cfg.tie_word_embeddings);
    assert_eq!(cfg.rope_theta, 10000.0);
    assert_eq!(cfg.rms_norm_eps, 1e-5f32 as f64);
    assert_eq!(cfg.max_position_embeddings, 256);
    assert_eq!(
        (cfg.bos_token_id, cfg.eos_token_ids.clone()),
        (Some(1), vec![2])
    );

    let w = GgufWeights::new(f, 4, 2).unwrap();
    let names: Vec<String> = t.expect.keys().cloned().collect();
    assert_eq!(w.names(), names);
    // Every conversion here is exact (values chosen representable), so compare exactly.
    for (name, (shape, vals)) in &t.expect {
        let got = w.get(name).unwrap();
        assert_eq!(&got.shape, shape, "{name}");
        assert_eq!(w.shape(name).as_ref(), Some(shape), "{name}");
        assert_eq!(&got.data, vals, "{name}");
    }
    let e = err_text(w.get("lm_head.weight"));
    assert!(
        e.contains("lm_head.weight") && e.contains("tiny.gguf"),
        "{e}"
    );
}

#[test]
fn gguf_load_model_with_tokenizer_and_template() {
    let t = tiny_gguf("llama");
    let d = TempDir::new("gguf-load");
    let p = d.join("tiny.gguf");
    std::fs::write(&p, &t.bytes).unwrap();
    let m = load_model(&p).unwrap();
    assert_eq!(m.config.hidden_size, 64);
    let tok = m.tokenizer.as_ref().unwrap();
    assert_eq!(tok.vocab_size(), 32);
    // "ab ab" => "ab", "Ġab" by the two merges; "c" alone; the control token whole.
    assert_eq!(
        tok.encode("ab abc<|im_end|>", false).unwrap(),
        vec![30, 31, 5, 2]
    );
    assert_eq!(tok.decode(&[30, 31, 5, 2]).unwrap(), "ab abc<|im_end|>");
    assert_eq!(
        (tok.bos_token(), tok.eos_token_id()),
        (Some("<|im_start|>"), Some(2))
    );
    let chat = m.chat_template.as_ref().unwrap();
    let msgs = [caft_fast::model::chat::ChatMessage::new("user", "ab")];
    assert_eq!(
        chat.render(&msgs, true).unwrap(),
        "<|im_start|>user\nab<|im_end|>\n<|im_start|>assistant\n"
    );
}

#[test]
fn gguf_non_llama_and_unsupported_type_errors() {
    let t = tiny_gguf("qwen2");
    let d = TempDir::new("gguf-errors");
    let p = d.join("qwen.gguf");
    std::fs::write(&p, &t.bytes).unwrap();
    let e = err_text(load_model(&p));
    assert!(
        e.contains("qwen2") && e.contains("llama") && e.contains("qwen.gguf"),
        "{e}"
    );

    // A Q6_K tensor: listed, but reading it names the tensor and the type.
    let mut b = GgufBuilder::new();
    b.str("general.architecture", "llama");
    b.tensor("blk.0.ffn_down.weight", &[256, 2], 14, vec![0u8; 2 * 210]);
    let f = Arc::new(GgufFile::from_bytes(b.build(), "q6k.gguf").unwrap());
    let w = GgufWeights::new(f, 1, 1).unwrap();
    let e = err_text(w.get("model.layers.0.mlp.down_proj.weight"));
    assert!(
        e.contains("Q6_K") && e.contains("blk.0.ffn_down.weight") && e.contains("q6k.gguf"),
        "{e}"
    );

    // Version 1 and big-endian files are refused by name.
    let mut v = t.bytes.clone();
    v[4..8].copy_from_slice(&1u32.to_le_bytes());
    assert!(err_text(GgufFile::from_bytes(v, "v1.gguf")).contains("version 1"));
    let mut v = t.bytes.clone();
    v[4..8].copy_from_slice(&3u32.to_be_bytes());
    assert!(err_text(GgufFile::from_bytes(v, "be.gguf")).contains("big-endian"));
    // Version 2 has the same layout and is accepted.
    let mut v = t.bytes.clone();
    v[4..8].copy_from_slice(&2u32.to_le_bytes());
    assert_eq!(
        GgufFile::from_bytes(v, "v2.gguf").unwrap().header.version,
        2
    );
}

/// Counts far beyond the file are rejected before anything is allocated for them.
#[test]
fn gguf_huge_counts_are_rejected_cheaply() {
    let head = |tensors: u64, kvs: u64| {
        let mut v = b"GGUF".to_vec();
        v.extend(3u32.to_le_bytes());
        v.extend(tensors.to_le_bytes());
        v.extend(kvs.to_le_bytes());
        v
    };
    assert!(err_text(GgufHeader::parse(&head(0, u64::MAX))).contains("metadata"));
    assert!(err_text(GgufHeader::parse(&head(1 << 62, 0))).contains("tensors"));
    // One entry: a string of length 2^63, then an array of 2^61 u64s, then deep nesting.
    let mut s = head(0, 1);
    s.extend((1u64 << 63).to_le_bytes());
    assert!(GgufHeader::parse(&s).is_err());
    let mut a = head(0, 1);
    a.extend(gguf_str("k"));
    a.extend(9u32.to_le_bytes());
    a.extend(10u32.to_le_bytes());
    a.extend((1u64 << 61).to_le_bytes());
    a.extend([0u8; 64]);
    assert!(err_text(GgufHeader::parse(&a)).contains("array"));
    let mut n = head(0, 1);
    n.extend(gguf_str("k"));
    n.extend(9u32.to_le_bytes());
    for _ in 0..100 {
        n.extend(9u32.to_le_bytes());
        n.extend(1u64.to_le_bytes());
    }
    assert!(err_text(GgufHeader::parse(&n)).contains("nested"));
}

/// Whatever a parsed file holds, using it must not panic.
fn exercise(bytes: Vec<u8>) {
    if let Ok(f) = GgufFile::from_bytes(bytes, "fuzz.gguf") {
        let f = Arc::new(f);
        let _ = config_from_gguf(&f);
        let _ = caft_fast::model::tokenizer::Tokenizer::from_gguf(&f);
        if let Ok(w) = GgufWeights::new(f, 4, 2) {
            for n in w.names() {
                let _ = w.get(&n);
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Random bytes after a valid magic and version: an error, never a panic.
    #[test]
    fn gguf_random_bytes_are_errors(rest in proptest::collection::vec(any::<u8>(), 0..600)) {
        let mut v = b"GGUF".to_vec();
        v.extend(3u32.to_le_bytes());
        v.extend_from_slice(&rest);
        let r = GgufHeader::parse(&v);
        // Only all-zero counts (an empty file) can be valid.
        let empty = rest.len() >= 16 && rest[..16].iter().all(|&b| b == 0);
        prop_assert!(r.is_err() || empty);
        exercise(v);
    }

    /// Every truncation of a valid file cuts tensor data or the header: always an error.
    #[test]
    fn gguf_truncations_are_errors(frac in 0.0f64..1.0) {
        let t = tiny_gguf("llama");
        let cut = (frac * t.bytes.len() as f64) as usize;
        prop_assert!(GgufFile::from_bytes(t.bytes[..cut].to_vec(), "cut.gguf").is_err());
    }

    /// Random byte changes anywhere in the header: maybe valid, maybe not, never a panic.
    #[test]
    fn gguf_mutations_never_panic(
        edits in proptest::collection::vec((0.0f64..1.0, any::<u8>()), 1..6)
    ) {
        let t = tiny_gguf("llama");
        let f = GgufFile::from_bytes(t.bytes.clone(), "ok.gguf").unwrap();
        let header_len = f.header.data_start as usize;
        let mut v = t.bytes;
        for (pos, byte) in edits {
            v[(pos * header_len as f64) as usize] = byte;
        }
        exercise(v);
    }
}

// ---- the real SmolLM2 file against transformers ---------------------------------------------

/// Reference values from transformers 5.23 `AutoModelForCausalLM.from_pretrained(dir,
/// gguf_file=...)` in float32 (which dequantises and un-permutes q/k itself): for each tensor,
/// the first 4 values of a few rows and `Σ_r r · Σ_c w[r, c] / rows` (which moves when rows are
/// permuted). Dequantisation is `d·q + m` in f32 on both sides, so values agree to an f32
/// rounding step: probes within 1e-6 absolute, sums within 1e-6 relative.
#[test]
fn smollm2_weights_match_transformers() {
    let Some(path) = smollm2_gguf() else { return };
    let m = load_model(&path).unwrap();
    let c = &m.config;
    assert_eq!(
        (
            c.num_layers,
            c.hidden_size,
            c.intermediate_size,
            c.num_heads,
            c.num_kv_heads
        ),
        (30, 576, 1536, 9, 3)
    );
    assert_eq!(
        (c.head_dim, c.vocab_size, c.max_position_embeddings),
        (64, 49152, 8192)
    );
    assert_eq!(
        (c.rope_theta, c.rms_norm_eps),
        (100000.0, 9.999999747378752e-06)
    );
    assert!(c.tie_word_embeddings);
    assert_eq!(
        (c.bos_token_id, c.eos_token_ids.clone()),
        (Some(1), vec![2])
    );
    assert_eq!(m.weights.names().len(), 272);

    type Probe = (usize, [f64; 4]);
    let refs: [(&str, f64, &[Probe]); 4] = [
        (
            "model.layers.0.self_attn.q_proj.weight",
            44.9239415857527,
            &[
                (
                    0,
                    [
                        -0.0963134765625,
                        0.1573486328125,
                        -0.0963134765625,
                        -0.73046875,
                    ],
                ),
                (
                    1,
                    [-0.1591796875, 0.39794921875, -0.0198974609375, -1.2734375],
                ),
                (
                    33,
                    [
                        -0.06280517578125,
                        0.1446533203125,
                        0.00634765625,
                        -0.4085693359375,
                    ],
                ),
                (
                    575,
                    [
                        -0.15679931640625,
                        0.154327392578125,
                        0.34100341796875,
                        0.029876708984375,
                    ],
                ),
            ],
        ),
        (
            "model.layers.0.self_attn.k_proj.weight",
            24.85746455192566,
            &[
                (
                    1,
                    [
                        0.203369140625,
                        0.09136962890625,
                        0.203369140625,
                        -0.13262939453125,
                    ],
                ),
                (32, [0.056640625, 0.056640625, -0.126953125, 0.1484375]),
                (
                    191,
                    [
                        0.015869140625,
                        -0.4342041015625,
                        0.015869140625,
                        -0.7342529296875,
                    ],
                ),
            ],
        ),
        (
            "model.layers.29.self_attn.k_proj.weight",
            61.456260879834495,
            &[(
                33,
                [
                    0.1531982421875,
                    -0.136688232421875,
                    -0.053863525390625,
                    -0.09527587890625,
                ],
            )],
        ),
        (
            "model.embed_tokens.weight",
            -6357.954051365571,
            &[
                (
                    0,
                    [
                        -0.10654449462890625,
                        0.032978057861328125,
                        0.048198699951171875,
                        -0.022830963134765625,
                    ],
                ),
                (
                    49151,
                    [
                        0.011505126953125,
                        0.0057525634765625,
                        0.0977935791015625,
                        -0.0977935791015625,
                    ],
                ),
            ],
        ),
    ];
    for (name, weighted_sum, probes) in refs {
        let t = m.weights.get(name).unwrap();
        let (rows, cols) = (t.shape[0], t.shape[1]);
        for (r, want) in probes {
            for (j, w) in want.iter().enumerate() {
                let got = t.data[r * cols + j] as f64;
                assert!((got - w).abs() <= 1e-6, "{name}[{r},{j}]: {got} vs {w}");
            }
        }
        let s: f64 = (0..rows)
            .map(|r| {
                r as f64
                    * t.data[r * cols..(r + 1) * cols]
                        .iter()
                        .map(|&x| x as f64)
                        .sum::<f64>()
            })
            .sum::<f64>()
            / rows as f64;
        assert!(
            (s - weighted_sum).abs() <= 1e-6 * weighted_sum.abs(),
            "{name}: weighted sum {s} vs {weighted_sum}"
        );
    }
    let norm = m.weights.get("model.norm.weight").unwrap();
    assert_eq!(&norm.data[..3], &[1.7578125, 1.8203125, 1.78125]);
}
