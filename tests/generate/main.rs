//! Generation: `caft-fast generate` through the binary (`cli`) and SmolLM2's greedy decoding
//! against transformers (`smollm2`). The KV cache against the full forward is
//! tests/generate_kv.rs, a binary of its own because it reruns itself on the emulated GPU.
//! One test binary for the area (tests/support/mod.rs says why).

#[path = "../support/mod.rs"]
mod support;

mod cli;
mod smollm2;
