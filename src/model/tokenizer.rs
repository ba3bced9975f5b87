//! Tokenizers: a Hugging Face `tokenizer.json`, or the byte-level BPE stated by a GGUF file's
//! metadata, rebuilt the way transformers rebuilds it (so ids match `AutoTokenizer` loading
//! the same GGUF).
//!
//! A GGUF byte-level vocabulary (`tokenizer.ggml.model == "gpt2"`) becomes:
//! - a BPE model over `tokenizer.ggml.tokens` and `tokenizer.ggml.merges` ("a b" pairs). Tokens
//!   written with characters outside GPT-2's byte alphabet are respelled byte by byte;
//! - control tokens (`token_type` 3) as special added tokens, matched whole in the text (those
//!   spelled outside the byte alphabet are skipped, as transformers skips them), user-defined
//!   tokens (`token_type` 4) as plain added tokens;
//! - the pre-tokenizer named by `tokenizer.ggml.pre`: a known split regex followed by a
//!   byte-level mapping, or GPT-2's byte-level pre-tokenizer (its own regex) for any other
//!   name, such as SmolLM2's "smollm";
//! - a byte-level decoder, and BOS/EOS added only when `tokenizer.ggml.add_bos_token` /
//!   `add_eos_token` say so.

use crate::model::gguf::{GgufArray, GgufFile};
use anyhow::{anyhow, bail, ensure, Context, Result};
use serde_json::{json, Map, Value};
use std::path::Path;

/// A tokenizer with its named BOS/EOS tokens.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos: Option<(String, u32)>,
    eos: Option<(String, u32)>,
    origin: String,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("origin", &self.origin)
            .field("vocab_size", &self.vocab_size())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .finish()
    }
}

/// GPT-2's reversible map from bytes to printable characters: printable Latin-1 bytes
/// (`!`..`~`, `¡`..`¬`, `®`..`ÿ`) stand for themselves, the other 68 bytes take the code points
/// 256, 257, ... in byte order.
pub fn byte_to_char_table() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut next = 256u32;
    for b in 0..=255u32 {
        let printable = (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || b >= 0xae;
        table[b as usize] = if printable {
            char::from_u32(b).unwrap_or('\0')
        } else {
            let c = char::from_u32(next).unwrap_or('\0');
            next += 1;
            c
        };
    }
    table
}

/// Split regexes for `tokenizer.ggml.pre` names, as transformers' GGUF loader maps them.
/// Names absent here get GPT-2's byte-level pre-tokenizer.
fn pre_tokenizer_split(pre: &str) -> Option<&'static str> {
    const LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const TEKKEN: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const GPT4O: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    Some(match pre {
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0"
        | "lfm2" | "dbrx" | "smaug-bpe" => LLAMA3,
        "qwen2" | "deepseek-r1-qwen" | "megrez" => QWEN2,
        "tekken" => TEKKEN,
        "gpt-4o" | "llama4" => GPT4O,
        _ => return None,
    })
}

/// `tokenizer.json` contents for a GGUF byte-level BPE vocabulary.
fn gguf_tokenizer_json(file: &GgufFile) -> Result<Value> {
    let path = file.path().display().to_string();
    let model = file
        .meta_str_opt("tokenizer.ggml.model")?
        .ok_or_else(|| anyhow!("{path}: metadata key \"tokenizer.ggml.model\" is missing"))?;
    ensure!(
        model == "gpt2",
        "{path}: tokenizer.ggml.model is {model:?}; caft-fast builds byte-level BPE (\"gpt2\") \
         tokenizers from GGUF only (use the model's tokenizer.json instead)"
    );
    let list = |key: &str| -> Result<&GgufArray> {
        file.meta_required(key)?
            .as_array()
            .ok_or_else(|| anyhow!("{path}: metadata {key:?} is not an array"))
    };
    let tokens = list("tokenizer.ggml.tokens")?.as_strings().ok_or_else(|| {
        anyhow!("{path}: metadata \"tokenizer.ggml.tokens\" is not a string array")
    })?;
    let merges = list("tokenizer.ggml.merges")?.as_strings().ok_or_else(|| {
        anyhow!("{path}: metadata \"tokenizer.ggml.merges\" is not a string array")
    })?;
    let token_type: Vec<i64> = match file.meta("tokenizer.ggml.token_type") {
        None => Vec::new(),
        Some(v) => v.as_array().and_then(|a| a.to_i64_vec()).ok_or_else(|| {
            anyhow!("{path}: metadata \"tokenizer.ggml.token_type\" is not an integer array")
        })?,
    };
    ensure!(
        token_type.is_empty() || token_type.len() == tokens.len(),
        "{path}: tokenizer.ggml.token_type has {} entries for {} tokens",
        token_type.len(),
        tokens.len()
    );

    let table = byte_to_char_table();
    let alphabet: std::collections::HashSet<char> = table.iter().copied().collect();
    let in_alphabet = |t: &str| t.chars().all(|c| alphabet.contains(&c));
    let mut vocab = Map::with_capacity(tokens.len());
    for (id, tok) in tokens.iter().enumerate() {
        let spelled = if in_alphabet(tok) {
            tok.clone()
        } else {
            tok.bytes().map(|b| table[b as usize]).collect()
        };
        // A respelled token may collide with another; the later id wins, as in a Python dict.
        vocab.insert(spelled, json!(id));
    }
    let mut merge_pairs = Vec::with_capacity(merges.len());
    for (i, m) in merges.iter().enumerate() {
        let parts: Vec<&str> = m.split(' ').collect();
        ensure!(
            parts.len() == 2,
            "{path}: tokenizer.ggml.merges[{i}] = {m:?} is not two tokens separated by a space"
        );
        merge_pairs.push(json!([parts[0], parts[1]]));
    }

    // Control tokens (type 3) are special; user-defined ones (type 4) plain added tokens.
    let mut added = Vec::new();
    for (id, (tok, &ty)) in tokens.iter().zip(&token_type).enumerate() {
        let special = match ty {
            3 if in_alphabet(tok) => true,
            4 if vocab.contains_key(tok) => false,
            _ => continue,
        };
        added.push(json!({
            "id": id, "content": tok, "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": special,
        }));
    }

    let pre = file
        .meta_str_opt("tokenizer.ggml.pre")?
        .unwrap_or("default");
    let pre_tokenizer = match pre_tokenizer_split(pre) {
        Some(regex) => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false},
        ]}),
        None => {
            json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true})
        }
    };

    // BOS / EOS around each sequence only when the file asks for them.
    let flag = |key: &str| -> Result<bool> {
        match file.meta(key) {
            None => Ok(false),
            Some(v) => v
                .as_bool()
                .ok_or_else(|| anyhow!("{path}: metadata {key:?} is not a bool")),
        }
    };
    let special_id = |key: &str| -> Result<Option<(String, u32)>> {
        match file.meta(key) {
            None => Ok(None),
            Some(v) => {
                let id = v
                    .as_u64()
                    .and_then(|i| u32::try_from(i).ok())
                    .filter(|&i| (i as usize) < tokens.len())
                    .ok_or_else(|| anyhow!("{path}: metadata {key:?} is not a valid token id"))?;
                Ok(Some((tokens[id as usize].clone(), id)))
            }
        }
    };
    let mut single = Vec::new();
    let mut specials = Map::new();
    let mut add_special = |(tok, id): (String, u32), seq: &mut Vec<Value>| {
        seq.push(json!({"SpecialToken": {"id": tok, "type_id": 0}}));
        specials.insert(
            tok.clone(),
            json!({"id": tok, "ids": [id], "tokens": [tok]}),
        );
    };
    if flag("tokenizer.ggml.add_bos_token")? {
        let bos = special_id("tokenizer.ggml.bos_token_id")?.ok_or_else(|| {
            anyhow!("{path}: add_bos_token is set but tokenizer.ggml.bos_token_id is missing")
        })?;
        add_special(bos, &mut single);
    }
    single.push(json!({"Sequence": {"id": "A", "type_id": 0}}));
    if flag("tokenizer.ggml.add_eos_token")? {
        let eos = special_id("tokenizer.ggml.eos_token_id")?.ok_or_else(|| {
            anyhow!("{path}: add_eos_token is set but tokenizer.ggml.eos_token_id is missing")
        })?;
        add_special(eos, &mut single);
    }
    let mut pair = single.clone();
    pair.extend(single.iter().map(|p| match p.get("Sequence") {
        Some(_) => json!({"Sequence": {"id": "B", "type_id": 1}}),
        None => {
            let mut q = p.clone();
            q["SpecialToken"]["type_id"] = json!(1);
            q
        }
    }));

    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": {"type": "TemplateProcessing", "single": single, "pair": pair,
                           "special_tokens": specials},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": "",
            "end_of_word_suffix": "", "fuse_unk": false, "byte_fallback": false,
            "ignore_merges": false, "vocab": vocab, "merges": merge_pairs,
        },
    }))
}

impl Tokenizer {
    /// Load a Hugging Face `tokenizer.json`. BOS/EOS are unset until [`Tokenizer::set_bos_eos`].
    pub fn from_file(path: &Path) -> Result<Tokenizer> {
        let bytes = std::fs::read(path)
            .with_context(|| format!("cannot read tokenizer {}", path.display()))?;
        let inner = tokenizers::Tokenizer::from_bytes(&bytes)
            .map_err(|e| anyhow!("{}: invalid tokenizer.json: {e}", path.display()))?;
        Ok(Tokenizer {
            inner,
            bos: None,
            eos: None,
            origin: path.display().to_string(),
        })
    }

    /// Build the tokenizer a GGUF file describes (byte-level BPE only), with BOS/EOS from
    /// `tokenizer.ggml.bos_token_id` / `eos_token_id`.
    pub fn from_gguf(file: &GgufFile) -> Result<Tokenizer> {
        let path = file.path().display().to_string();
        let json = gguf_tokenizer_json(file)?;
        let text = serde_json::to_string(&json)?;
        let inner = tokenizers::Tokenizer::from_bytes(text.as_bytes())
            .map_err(|e| anyhow!("{path}: cannot build the tokenizer from GGUF metadata: {e}"))?;
        let mut tok = Tokenizer {
            inner,
            bos: None,
            eos: None,
            origin: path.clone(),
        };
        let tokens = file
            .meta("tokenizer.ggml.tokens")
            .and_then(|v| v.as_array())
            .and_then(|a| a.as_strings())
            .unwrap_or_default();
        let named = |key: &str| -> Option<String> {
            let id = file.meta(key)?.as_u64()?;
            tokens.get(usize::try_from(id).ok()?).cloned()
        };
        tok.set_bos_eos(
            named("tokenizer.ggml.bos_token_id").as_deref(),
            named("tokenizer.ggml.eos_token_id").as_deref(),
        )
        .with_context(|| format!("{path}: special tokens"))?;
        Ok(tok)
    }

    /// Wrap an already built `tokenizers::Tokenizer`.
    pub fn from_inner(inner: tokenizers::Tokenizer, origin: impl Into<String>) -> Tokenizer {
        Tokenizer {
            inner,
            bos: None,
            eos: None,
            origin: origin.into(),
        }
    }

    /// Name the BOS and EOS tokens; each must be in the vocabulary.
    pub fn set_bos_eos(&mut self, bos: Option<&str>, eos: Option<&str>) -> Result<()> {
        let resolve = |t: Option<&str>, what: &str| -> Result<Option<(String, u32)>> {
            match t {
                None => Ok(None),
                Some(t) => match self.inner.token_to_id(t) {
                    Some(id) => Ok(Some((t.to_string(), id))),
                    None => bail!(
                        "{}: {what} token {t:?} is not in the vocabulary",
                        self.origin
                    ),
                },
            }
        };
        let bos = resolve(bos, "BOS")?;
        let eos = resolve(eos, "EOS")?;
        self.bos = bos;
        self.eos = eos;
        Ok(())
    }

    /// Token ids of `text`. Special tokens written in the text (`<|im_start|>`) become their
    /// single ids; `add_special_tokens` adds what the post-processor adds (e.g. a BOS).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| anyhow!("{}: cannot encode text: {e}", self.origin))?;
        Ok(enc.get_ids().to_vec())
    }

    /// The text of `ids`, special tokens included.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.decode_with(ids, false)
    }

    /// The text of `ids`; `skip_special_tokens` drops special tokens (for showing answers).
    pub fn decode_with(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        let n = self.vocab_size();
        if let Some(bad) = ids.iter().find(|&&i| i as usize >= n) {
            bail!(
                "{}: token id {bad} is outside the vocabulary ({n})",
                self.origin
            );
        }
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| anyhow!("{}: cannot decode ids: {e}", self.origin))
    }

    /// Vocabulary size including added tokens (what transformers' `len(tokenizer)` gives).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    pub fn bos_token(&self) -> Option<&str> {
        self.bos.as_ref().map(|(t, _)| t.as_str())
    }

    pub fn bos_token_id(&self) -> Option<u32> {
        self.bos.as_ref().map(|&(_, id)| id)
    }

    pub fn eos_token(&self) -> Option<&str> {
        self.eos.as_ref().map(|(t, _)| t.as_str())
    }

    pub fn eos_token_id(&self) -> Option<u32> {
        self.eos.as_ref().map(|&(_, id)| id)
    }

    /// The underlying `tokenizers` object (offsets, batch encoding).
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// Where the tokenizer came from, for messages.
    pub fn origin(&self) -> &str {
        &self.origin
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The table is a bijection onto 256 distinct characters, with the GPT-2 anchors:
    /// space is 'Ġ' (U+0120), newline 'Ċ' (U+010A), 'a' itself.
    #[test]
    fn byte_table_is_gpt2s() {
        let t = byte_to_char_table();
        let distinct: std::collections::HashSet<char> = t.iter().copied().collect();
        assert_eq!(distinct.len(), 256);
        assert_eq!(t[b' ' as usize], '\u{120}');
        assert_eq!(t[b'\n' as usize], '\u{10a}');
        assert_eq!(t[b'a' as usize], 'a');
        assert_eq!(t[0xad], '\u{143}');
    }
}
