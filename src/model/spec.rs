//! The model a command runs: base weights, an optional PEFT adapter and optional directions
//! to ablate, assembled the same way by `eval`, `generate` and `directions`, and the record of
//! what was run that each report carries.

use crate::backend::Backend;
use crate::model::ablation::load_directions;
use crate::model::loader::{load_model, LoadedModel};
use crate::model::transformer::Model;
use anyhow::{Context, Result};
use serde::Serialize;
use std::path::{Path, PathBuf};

/// The model to run: base weights, an optional LoRA adapter and optional directions to ablate
/// (at inference: training builds its model from its own configuration).
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
    /// The base model as loaded, with the PEFT adapter in `dir`.
    pub fn with_adapter(dir: &Path) -> Self {
        ModelSpec {
            adapter: Some(dir.to_path_buf()),
            ..ModelSpec::default()
        }
    }

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
            let (layout, params) = crate::model::peft::load_peft_adapter(dir, &cfg)?;
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
            program: crate::io::program(),
        }
    }
}
