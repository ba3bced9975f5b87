//! Host-side weights: what a loader hands to the model, one tensor at a time, in f32.

use anyhow::Result;

/// One tensor converted to f32 on the host, row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// A source of named tensors using Hugging Face names (`model.layers.0.self_attn.q_proj.weight`,
/// `model.embed_tokens.weight`, `model.norm.weight`, `lm_head.weight`). Loaders convert on
/// demand (dtype conversion, dequantisation, llama.cpp's q/k permutation undone) so only one
/// tensor at a time is materialised in f32.
pub trait WeightSource: Send + Sync {
    /// Every tensor name this source holds.
    fn names(&self) -> Vec<String>;
    /// The shape of `name` without converting it; `None` when absent.
    fn shape(&self, name: &str) -> Option<Vec<usize>>;
    /// The tensor in f32. Errors name the file and the tensor.
    fn get(&self, name: &str) -> Result<HostTensor>;
    /// Where the weights came from, for messages.
    fn origin(&self) -> String;
}
