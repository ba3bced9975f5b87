//! `caft-fast directions`: finding, choosing and explaining the concept directions that CAFT
//! ablates (step 2 of the workflow in the README).
//!
//! - [`pca`]: run the base model and the fine-tune (base + adapter, or a whole fine-tuned
//!   model) over the same tokens, take per-token differences of resid_post at chosen layers
//!   (on answer tokens, or all tokens), centre them and keep the top principal components of
//!   each layer.
//! - [`select`]: make an ablation file from chosen components, random control directions, or
//!   directions from other tools (`.npy`, safetensors under other names).
//! - [`probe`]: choose components without test data: those whose projections best separate
//!   the two labels of probe sentences that carry the unwanted concept alone.
//! - [`explain`]: project a generic corpus's resid_post onto every direction and report the
//!   contexts with the highest and lowest projections (HTML for people, JSON for programs).
//! - [`sae`]: directions from a sparse autoencoder's latents, ranked by how much the
//!   fine-tune changes their mean activation.
//! - [`sae_train`]: training a BatchTopK SAE on a corpus's resid_post, for models without
//!   published SAEs.

pub mod explain;
pub mod pca;
pub mod probe;
pub mod sae;
pub mod sae_train;
pub mod select;
