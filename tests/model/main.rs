//! The model's inputs: loading (config.json, safetensors, GGUF), the tokenizer and chat
//! template, ablation-direction files (`caft_fast::model::ablation`), and bad model input
//! through the binary. One test binary for the area (tests/support/mod.rs says why).

#[path = "../support/mod.rs"]
mod support;

mod ablation_directions;
mod bad_input;
mod hub;
mod loading;
mod tokenizer_chat;
