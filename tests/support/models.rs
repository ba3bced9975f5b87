//! Tiny models: the fixture folders, copies of them with edits or a chat tokenizer, shrunk
//! random models of real families, and an adapter that plants a known direction.

use super::files::{write, TempDir};
use super::tiny_fixture;
use caft_fast::model::config::ModelConfig;
use caft_fast::model::loader::{load_model, LoadedModel};
use caft_fast::model::lora::{LoraConfig, LoraLayout, Target};
use caft_fast::util::rng::Rng;
use std::path::{Path, PathBuf};

/// The tiny random Llama (4 layers, d_model 64, ffn 96, vocab 256; no tokenizer).
pub fn tiny_llama() -> PathBuf {
    tiny_fixture("llama")
}

/// The tiny Llama's configuration.
pub fn tiny_config() -> ModelConfig {
    load_model(&tiny_llama()).expect("tiny llama").config
}

/// A copy of the tiny Llama fixture folder whose config.json is edited by `edit`.
pub fn tiny_llama_copy(tag: &str, edit: impl FnOnce(&mut serde_json::Value)) -> TempDir {
    let src = tiny_llama();
    let dst = TempDir::new(tag);
    std::fs::copy(src.join("model.safetensors"), dst.join("model.safetensors")).unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    edit(&mut cfg);
    std::fs::write(dst.join("config.json"), cfg.to_string()).unwrap();
    dst
}

/// The special tokens of the tiny chat tokenizer (ids 254 and 255).
pub const IM_START: &str = "<|im_start|>";
pub const IM_END: &str = "<|im_end|>";

/// A byte-level `tokenizer.json` whose 256 ids fit the tiny model's vocabulary: bytes 0..=253
/// are ids 0..=253 (GPT-2's byte-to-character map, no merges), and `<|im_start|>` and
/// `<|im_end|>` are the special ids 254 and 255 (bytes 254 and 255 never occur in ASCII text).
pub fn tiny_tokenizer_json() -> String {
    let table = caft_fast::model::tokenizer::byte_to_char_table();
    let mut vocab = serde_json::Map::new();
    for (b, c) in table.iter().enumerate().take(254) {
        vocab.insert(c.to_string(), b.into());
    }
    vocab.insert(IM_START.into(), 254.into());
    vocab.insert(IM_END.into(), 255.into());
    let added = |id: u32, content: &str| {
        serde_json::json!({"id": id, "content": content, "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true})
    };
    byte_level_bpe_json(vocab, vec![added(254, IM_START), added(255, IM_END)])
}

/// A byte-level BPE `tokenizer.json` (no merges) with `vocab` and `added_tokens`.
pub fn byte_level_bpe_json(
    vocab: serde_json::Map<String, serde_json::Value>,
    added_tokens: Vec<serde_json::Value>,
) -> String {
    serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": added_tokens,
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
            "ignore_merges": false, "vocab": vocab, "merges": []}
    })
    .to_string()
}

/// A ChatML template like SmolLM2's and Qwen's.
pub const CHATML: &str = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

/// The tiny Llama fixture plus the tokenizer above and (when `template`) the ChatML template:
/// a model that can be trained on chat records in milliseconds.
pub fn tiny_chat_model(tag: &str, template: bool) -> TempDir {
    let src = tiny_llama();
    let d = TempDir::new(&format!("model-{tag}"));
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(src.join(f), d.join(f)).unwrap();
    }
    write(&d.join("tokenizer.json"), &tiny_tokenizer_json());
    write(
        &d.join("tokenizer_config.json"),
        &serde_json::json!({"eos_token": IM_END}).to_string(),
    );
    if template {
        write(&d.join("chat_template.jinja"), CHATML);
    }
    d
}

/// Random weights of a real model's family and head_dim (a `caft_fast::model::random` preset),
/// shrunk to 3 layers of width 256 and a 512-token vocabulary, with `num_heads` query and
/// `num_kv_heads` key/value heads. For the bf16 attention kernels of head_dim 64 and 128, which
/// use tensor cores (the tiny fixtures' head_dims take the generic kernels).
pub fn shrunk_random_model(preset: &str, num_heads: usize, num_kv_heads: usize) -> LoadedModel {
    let full = caft_fast::model::random::preset(preset).unwrap();
    let config = ModelConfig {
        vocab_size: 512,
        hidden_size: 256,
        intermediate_size: 384,
        num_layers: 3,
        num_heads,
        num_kv_heads,
        ..full
    };
    LoadedModel {
        weights: Box::new(caft_fast::model::random::RandomWeights::new(
            config.clone(),
            9,
        )),
        config,
        tokenizer: None,
        chat_template: None,
        source: format!("random:{preset}-shrunk").into(),
    }
}

/// A unit vector of width `d` (seeded Gaussian, normalised in f64, then f32).
pub fn unit_vector(d: usize, seed: u64) -> Vec<f32> {
    let mut rng = Rng::new(seed);
    let v: Vec<f64> = (0..d).map(|_| rng.normal()).collect();
    let n = v.iter().map(|x| x * x).sum::<f64>().sqrt();
    v.iter().map(|x| (x / n) as f32).collect()
}

/// LoRA r = 2, alpha = 2 (scale 1) on `down_proj` only, every layer's B zero except `layer`'s,
/// where `B = v ⊗ c` with `c = (1, 0.5)` and `A` random. The layer's MLP output then gains
/// `(x Aᵀ) Bᵀ = ((x Aᵀ)·c) v`: a multiple of `v` for every token, so the resid_post difference
/// at `layer` is exactly (up to f32 rounding) a scalar times `v`, and the layers before it
/// do not change at all.
pub fn planted_adapter(cfg: &ModelConfig, layer: usize, v: &[f32]) -> (LoraLayout, Vec<f32>) {
    let lora = LoraConfig {
        r: 2,
        alpha: 2.0,
        rslora: false,
        targets: vec![Target::Down],
    };
    let layout = LoraLayout::new(cfg, &lora).expect("layout");
    let mut p = vec![0f32; layout.len];
    let s = *layout.slot(layer, Target::Down).expect("down slot");
    let mut rng = Rng::new(7);
    // A: [r, d_in]; entries ~ N(0, 1/d_in) so x Aᵀ is O(|x|).
    let sd = 1.0 / (s.d_in as f64).sqrt();
    for x in &mut p[s.a_off..s.a_off + s.r * s.d_in] {
        *x = (rng.normal() * sd) as f32;
    }
    // B: [d_out, r], B[i, j] = v_i c_j (the factor 4 makes the change comparable to resid).
    let c = [4.0f32, 2.0];
    for i in 0..s.d_out {
        for (j, cj) in c.iter().enumerate() {
            p[s.b_off + i * s.r + j] = v[i] * cj;
        }
    }
    (layout, p)
}

/// Write the planted adapter as a PEFT folder.
pub fn write_planted_adapter(dir: &Path, cfg: &ModelConfig, layer: usize, v: &[f32]) {
    let (layout, p) = planted_adapter(cfg, layer, v);
    caft_fast::model::peft::save_adapter(dir, &layout, &p, "tiny-llama").expect("save adapter");
}

/// A tiny fixture model on `be` with the fixture's directions ablated; `train` attaches what
/// the test trains (LoRA or full fine-tuning) before the ablation, as the library does.
pub fn fixture_model<B: caft_fast::backend::Backend>(
    be: &B,
    name: &str,
    train: impl FnOnce(&mut caft_fast::model::transformer::Model<B>, &LoadedModel),
) -> caft_fast::model::transformer::Model<B> {
    let dir = tiny_fixture(name);
    let loaded = load_model(&dir).unwrap();
    let cfg = loaded.config.clone();
    let mut model =
        caft_fast::model::transformer::Model::new(be, cfg.clone(), loaded.weights.as_ref())
            .unwrap();
    train(&mut model, &loaded);
    let dirs = caft_fast::model::ablation::load_directions(
        &dir.join("directions.safetensors"),
        None,
        cfg.hidden_size,
        cfg.num_layers,
    )
    .unwrap();
    model.set_ablation(be, &dirs).unwrap();
    model
}
