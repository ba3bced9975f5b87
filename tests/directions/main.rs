//! `caft-fast directions` and `caft_fast::directions`: the subcommands end to end (`cli`),
//! `explain`, the PCA of resid_post differences (`pca`), `probe-select` (`probe`), SAE latents
//! as directions (`sae`) and SAE training (`sae_train`). The directions files themselves
//! (`caft_fast::model::ablation`) are tests/model/ablation_directions.rs. One test binary for
//! the area (tests/support/mod.rs says why).

#[path = "../support/mod.rs"]
mod support;

mod cli;
mod explain;
mod pca;
mod probe;
mod sae;
mod sae_train;
