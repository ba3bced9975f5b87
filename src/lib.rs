//! caft-fast: Concept Ablation Fine-Tuning (CAFT) in one program.
//!
//! Fine-tune an LLM with LoRA while projecting chosen concept directions out of the residual
//! stream (`h <- h - Q Qᵀ h` at chosen layers, forward and backward, training only).
//! The ablation itself is [`backend::Backend::residual_ablate_norm`]; the model that calls it is
//! [`model::transformer`].

// Every unsafe block says why it is sound in a `// SAFETY:` comment.
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod backend;
pub mod cli;
pub mod data;
pub mod directions;
pub mod dist;
pub mod eval;
pub mod generate;
pub mod io;
pub mod judge;
pub mod linalg;
pub mod model;
pub mod report;
pub mod train;
pub mod util;
