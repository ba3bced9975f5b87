//! `caft-fast eval`: measuring what a fine-tune learned and what it generalises to (step 4 of
//! the workflow in the README: compare base, plain fine-tune and CAFT fine-tune).
//!
//! - [`mc`]: multiple-choice accuracy from next-token logits. Each option is scored by the
//!   logit of its first token at the prompt's last position (one forward pass per prompt,
//!   whatever the number of options); accuracy per split and overall.
//! - [`loss`]: mean cross-entropy (and perplexity) on the assistant tokens of held-out chat
//!   data, through the training data pipeline, so the masked tokens are exactly training's.
//! - [`task`]: the double multiple-choice spurious-correlation task (an intended concept and a
//!   spurious attribute that agree in training and disagree in the out-of-distribution test),
//!   with probe sentences for the spurious concept alone.
//! - [`chart`]: several `mc` results side by side, as a markdown table and an SVG bar chart.
//! - [`cli`]: the subcommand's arguments and the glue from them to the functions above.
//!
//! Evaluation runs the model as inference does: LoRA on when an adapter is given, no ablation
//! unless directions are given explicitly (`--ablate`).

pub mod chart;
pub mod cli;
pub mod loss;
pub mod mc;
pub mod task;

use crate::backend::Backend;
use crate::model::ablation::load_directions;
use crate::model::loader::{load_model, LoadedModel};
use crate::model::transformer::Model;
use anyhow::{Context, Result};
use serde::Serialize;
use std::path::{Path, PathBuf};

/// The model to evaluate: base weights, an optional LoRA adapter and optional directions to
/// ablate during the evaluation.
#[derive(Clone, Debug, Default)]
pub struct ModelSpec {
    /// A Hugging Face folder or a GGUF file; `None` = SmolLM2-135M-Instruct (fetched and
    /// cached on first use).
    pub model: Option<PathBuf>,
    /// A PEFT LoRA adapter folder (`<train output>/adapter`); `None` = the base model.
    pub adapter: Option<PathBuf>,
    /// A directions file (safetensors `layer.<L>` tensors) to ablate while evaluating.
    pub ablate: Option<PathBuf>,
    /// Keep only these layers of `ablate`.
    pub ablate_layers: Option<Vec<usize>>,
}

/// What was evaluated, recorded in every report.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Provenance {
    pub model: String,
    pub adapter: Option<String>,
    pub ablate: Option<String>,
    /// Layers where directions were ablated (empty without `ablate`).
    pub ablated_layers: Vec<usize>,
    pub backend: String,
    pub program: String,
}

impl ModelSpec {
    /// The model path, the default model fetched when none is given.
    pub fn model_path(&self) -> Result<PathBuf> {
        match &self.model {
            Some(p) => Ok(p.clone()),
            None => crate::util::fetch::smollm2(),
        }
    }

    /// Load the model files (weights stay memory-mapped).
    pub fn load(&self) -> Result<LoadedModel> {
        load_model(&self.model_path()?)
    }

    /// Build the model on `be`: frozen weights, the adapter's LoRA parameters (its own rank,
    /// alpha and targets), and the directions to ablate.
    pub fn build<B: Backend>(&self, be: &B, loaded: &LoadedModel) -> Result<Model<B>> {
        let cfg = loaded.config.clone();
        let mut model = Model::new(be, cfg.clone(), loaded.weights.as_ref())?;
        if let Some(dir) = &self.adapter {
            let (layout, params) = crate::directions::load_peft_adapter(dir, &cfg)?;
            model.set_lora(be, layout, &params)?;
        }
        if let Some(f) = &self.ablate {
            let dirs =
                load_directions(f, None, cfg.hidden_size, cfg.num_layers).with_context(|| {
                    format!(
                        "directions for {} ({} layers, width {})",
                        loaded.source.display(),
                        cfg.num_layers,
                        cfg.hidden_size
                    )
                })?;
            let dirs = match &self.ablate_layers {
                Some(l) => dirs.restrict(l)?,
                None => dirs,
            };
            model.set_ablation(be, &dirs)?;
            model.ablate = true;
        }
        Ok(model)
    }

    /// The record of what `model` (built by [`ModelSpec::build`]) is.
    pub fn provenance<B: Backend>(
        &self,
        be: &B,
        loaded: &LoadedModel,
        model: &Model<B>,
    ) -> Provenance {
        let show = |p: &Option<PathBuf>| p.as_ref().map(|p| p.display().to_string());
        Provenance {
            model: loaded.source.display().to_string(),
            adapter: show(&self.adapter),
            ablate: show(&self.ablate),
            ablated_layers: model.ablated_layers(),
            backend: be.name(),
            program: crate::train::run::program(),
        }
    }
}

/// Write `value` as pretty JSON to `path` atomically, creating its folder.
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut bytes = serde_json::to_vec_pretty(value)?;
    bytes.push(b'\n');
    crate::train::adapter::write_atomic(path, &bytes)
}
