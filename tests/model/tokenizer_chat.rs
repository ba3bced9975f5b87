//! Tokenizer and chat template parity: the SmolLM2 GGUF's tokenizer and chat template against
//! transformers (`tests/fixtures/smollm2/tokenizer.json`, made by scripts/make_fixtures.py from
//! the same file), and a small Hugging Face directory built here with hand-computed ids.

use crate::support::*;
use caft_fast::model::chat::{ChatMessage, ChatTemplate};
use caft_fast::model::gguf::GgufFile;
use caft_fast::model::loader::load_model;
use caft_fast::model::tokenizer::Tokenizer;
use serde::Deserialize;

#[derive(Deserialize)]
struct Case {
    text: String,
    ids: Vec<u32>,
}

#[derive(Deserialize)]
struct Chat {
    messages: Vec<ChatMessage>,
    add_generation_prompt: bool,
    text: String,
}

#[derive(Deserialize)]
struct Fixture {
    cases: Vec<Case>,
    chat: Vec<Chat>,
}

fn fixture() -> Fixture {
    let p = fixtures().join("smollm2/tokenizer.json");
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Ids must be identical to transformers' on every case (digits, unicode, emoji, code, runs
/// of whitespace, special tokens written in the text), and decoding gives the text back.
#[test]
fn smollm2_tokenizer_matches_transformers() {
    let Some(path) = smollm2_gguf() else { return };
    let fx = fixture();
    assert!(fx.cases.len() >= 10, "fixture has too few cases");
    let file = GgufFile::open(&path).unwrap();
    let tok = Tokenizer::from_gguf(&file).unwrap();
    assert_eq!(tok.vocab_size(), 49152);
    assert_eq!(
        (tok.bos_token(), tok.bos_token_id()),
        (Some("<|im_start|>"), Some(1))
    );
    assert_eq!(
        (tok.eos_token(), tok.eos_token_id()),
        (Some("<|im_end|>"), Some(2))
    );
    assert_eq!(tok.token_to_id("<|endoftext|>"), Some(0));
    for case in &fx.cases {
        let ids = tok.encode(&case.text, false).unwrap();
        assert_eq!(ids, case.ids, "ids of {:?}", case.text);
        // add_bos_token is false in this file: special tokens add nothing.
        assert_eq!(tok.encode(&case.text, true).unwrap(), case.ids);
        assert_eq!(
            tok.decode(&ids).unwrap(),
            case.text,
            "round trip of {:?}",
            case.text
        );
    }
    // Special tokens are kept by decode, dropped on request.
    let ids = tok.encode("<|im_start|>user\nhi<|im_end|>", false).unwrap();
    assert_eq!(ids[0], 1);
    assert_eq!(tok.decode_with(&ids, true).unwrap(), "user\nhi");
    assert!(tok.decode(&[49152]).is_err());
}

/// The GGUF's chat template renders exactly what transformers' `apply_chat_template(...,
/// tokenize=False)` renders.
#[test]
fn smollm2_chat_template_matches_transformers() {
    let Some(path) = smollm2_gguf() else { return };
    let fx = fixture();
    assert!(!fx.chat.is_empty());
    let m = load_model(&path).unwrap();
    let tmpl = m
        .chat_template
        .as_ref()
        .expect("SmolLM2 ships a chat template");
    assert_eq!(tmpl.bos_token(), Some("<|im_start|>"));
    for c in &fx.chat {
        let got = tmpl.render(&c.messages, c.add_generation_prompt).unwrap();
        assert_eq!(got, c.text, "messages {:?}", c.messages);
    }
}

/// A minimal byte-level BPE `tokenizer.json`: letters, 'Ġ' (a space), merges
/// h+e, l+l, he+ll, hell+o, Ġ+hello; `<s>`/`</s>` special; BOS prepended by the post-processor.
const TINY_TOKENIZER: &str = r#"{
  "version": "1.0", "truncation": null, "padding": null,
  "added_tokens": [
    {"id": 0, "content": "<s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
    {"id": 1, "content": "</s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}
  ],
  "normalizer": null,
  "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
  "post_processor": {"type": "TemplateProcessing",
    "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
    "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
    "special_tokens": {"<s>": {"id": "<s>", "ids": [0], "tokens": ["<s>"]}}},
  "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
  "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
    "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
    "vocab": {"<s>": 0, "</s>": 1, "h": 2, "e": 3, "l": 4, "o": 5, "Ġ": 6, "he": 7, "ll": 8,
              "hell": 9, "hello": 10, "Ġhello": 11, "w": 12, "!": 13},
    "merges": [["h", "e"], ["l", "l"], ["he", "ll"], ["hell", "o"], ["Ġ", "hello"]]}
}"#;

const TINY_CONFIG: &str = r#"{"architectures": ["LlamaForCausalLM"], "hidden_size": 8,
  "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
  "vocab_size": 14, "bos_token_id": 0, "eos_token_id": 1}"#;

fn tiny_dir(test: &str) -> TempDir {
    let d = TempDir::new(test);
    std::fs::write(d.join("config.json"), TINY_CONFIG).unwrap();
    std::fs::write(d.join("tokenizer.json"), TINY_TOKENIZER).unwrap();
    let mut rng = caft_fast::util::rng::Rng::new(3);
    let norm: Vec<u8> = rng
        .normal_vec(8)
        .iter()
        .flat_map(|x| x.to_le_bytes())
        .collect();
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![8], &norm).unwrap();
    safetensors::serialize_to_file(
        vec![("model.norm.weight".to_string(), view)],
        None,
        &d.join("model.safetensors"),
    )
    .unwrap();
    d
}

/// A Hugging Face directory: tokenizer.json ids computed by hand from the merges above;
/// the chat template and special tokens from tokenizer_config.json (list form), overridden
/// by chat_template.jinja when present.
#[test]
fn hf_dir_tokenizer_and_chat_template() {
    let d = tiny_dir("hf");
    std::fs::write(
        d.join("tokenizer_config.json"),
        r#"{"bos_token": "<s>", "eos_token": {"content": "</s>", "special": true},
           "chat_template": [
             {"name": "tool_use", "template": "TOOLS"},
             {"name": "default", "template": "{{ bos_token }}{% for m in messages %}{{ m['role'] | upper }}: {{ m['content'] | trim }}{{ eos_token }}\n{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"}
           ]}"#,
    )
    .unwrap();
    let m = load_model(&d).unwrap();
    let tok = m.tokenizer.as_ref().unwrap();
    // "hello hello!</s>": hello | Ġhello | ! | </s>; with special tokens a BOS first.
    assert_eq!(
        tok.encode("hello hello!</s>", false).unwrap(),
        vec![10, 11, 13, 1]
    );
    assert_eq!(
        tok.encode("hello hello!</s>", true).unwrap(),
        vec![0, 10, 11, 13, 1]
    );
    assert_eq!(tok.encode("hel", false).unwrap(), vec![7, 4]);
    assert_eq!(tok.decode(&[0, 10, 11, 13]).unwrap(), "<s>hello hello!");
    assert_eq!(
        (tok.bos_token_id(), tok.eos_token(), tok.vocab_size()),
        (Some(0), Some("</s>"), 14)
    );
    let msgs = vec![
        ChatMessage::new("user", " hello "),
        ChatMessage::new("assistant", "hi"),
    ];
    let tmpl = m.chat_template.as_ref().unwrap();
    assert_eq!(
        tmpl.render(&msgs, true).unwrap(),
        "<s>USER: hello</s>\nASSISTANT: hi</s>\nASSISTANT:"
    );

    // chat_template.jinja wins over tokenizer_config.json, as in transformers.
    std::fs::write(
        d.join("chat_template.jinja"),
        "{{ messages | length }}{{ eos_token }}\n",
    )
    .unwrap();
    let m = load_model(&d).unwrap();
    assert_eq!(
        m.chat_template.unwrap().render(&msgs, false).unwrap(),
        "2</s>"
    );
}

#[test]
fn tokenizer_and_template_errors_are_clear() {
    let d = tiny_dir("errors");
    let e = Tokenizer::from_file(&d.join("missing.json")).unwrap_err();
    assert!(format!("{e:#}").contains("missing.json"), "{e:#}");
    std::fs::write(d.join("tokenizer.json"), "{not json").unwrap();
    let e = load_model(&d).unwrap_err();
    assert!(format!("{e:#}").contains("tokenizer.json"), "{e:#}");

    std::fs::write(d.join("tokenizer.json"), TINY_TOKENIZER).unwrap();
    std::fs::write(
        d.join("tokenizer_config.json"),
        r#"{"bos_token": "<nope>"}"#,
    )
    .unwrap();
    let e = load_model(&d).unwrap_err();
    assert!(format!("{e:#}").contains("<nope>"), "{e:#}");

    let e = ChatTemplate::new("{% for m in messages %}", None, None).unwrap_err();
    assert!(format!("{e:#}").contains("does not compile"), "{e:#}");
    let t = ChatTemplate::new("{{ raise_exception('only user turns') }}", None, None).unwrap();
    let e = t.render(&[], false).unwrap_err();
    assert!(format!("{e:#}").contains("only user turns"), "{e:#}");
}

/// A Llama-3-style template: `strftime_now`, `namespace`, loop controls, Python string
/// methods and `tojson`, all as transformers evaluates them (expected text written by hand
/// from Jinja semantics with trim_blocks and lstrip_blocks).
#[test]
fn template_features_used_by_hub_templates() {
    let src = r#"{{- bos_token }}
{%- set ns = namespace(sys='') %}
{%- for m in messages %}
    {%- if m.role == 'system' %}
        {%- set ns.sys = m.content.strip() %}
        {%- continue %}
    {%- endif %}
    {%- if loop.index0 > 3 %}{% break %}{% endif %}
    {{- '<|' + m.role + '|>' + m.content.lstrip() }}
    {%- if m.content.endswith('?') %}{{ ' [q]' }}{% endif %}
{%- endfor %}
{{- '|' + ns.sys + '|' + (strftime_now('%Y') | length | string) }}
{{- {'k': [1, 'x']} | tojson }}
"#;
    let t = ChatTemplate::new(src, Some("<B>"), Some("<E>")).unwrap();
    let msgs = vec![
        ChatMessage::new("system", "  be nice \n"),
        ChatMessage::new("user", "  why?"),
        ChatMessage::new("assistant", "because"),
    ];
    assert_eq!(
        t.render(&msgs, false).unwrap(),
        "<B><|user|>why? [q]<|assistant|>because|be nice|4{\"k\": [1, \"x\"]}"
    );
}
