//! Everything about the model: its configuration, loading weights and tokenizers, LoRA, the
//! ablation directions, and the transformer forward and backward written once over `Backend`.

pub mod ablation;
pub mod chat;
pub mod config;
pub mod full;
pub mod gguf;
pub mod hub;
pub mod loader;
pub mod lora;
pub mod peft;
pub mod random;
pub mod spec;
pub mod tokenizer;
pub mod transformer;
pub mod weights;
