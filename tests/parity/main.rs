//! The transformer on the CPU backend against transformers: the tiny fixture models (forward,
//! backward, AdamW steps, ablation, padding-free packing) and SmolLM2-135M from its GGUF. One test binary for the
//! area (tests/support/mod.rs says why).

#[path = "../support/mod.rs"]
mod support;

mod checkpointing;
mod full;
mod packing;
mod smollm2;
mod tiny;
