//! Writing and reading LoRA adapters in PEFT's format: `adapter_config.json` and
//! `adapter_model.safetensors` with PEFT's tensor names, so `peft.PeftModel.from_pretrained`
//! loads what caft-fast trains.

use crate::model::lora::{LoraConfig, LoraLayout};
use anyhow::{Context, Result};
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use std::collections::BTreeMap;
use std::path::Path;

/// PEFT's `adapter_config.json` for a LoRA adapter.
pub fn adapter_config(lora: &LoraConfig, base_model: &str) -> serde_json::Value {
    let targets: Vec<&str> = lora.targets.iter().map(|t| t.module_name()).collect();
    serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": lora.r,
        "lora_alpha": lora.alpha,
        "use_rslora": lora.rslora,
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": targets,
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "modules_to_save": null,
        "use_dora": false,
    })
}

/// Write `content` to `path` atomically: a temporary file in the same folder, then a rename,
/// so a reader (or a crash) never sees a half-written file.
pub fn write_atomic(path: &Path, content: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().context("path has no file name")?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    std::fs::write(&tmp, content).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))
}

/// Save the flat LoRA parameters as a PEFT adapter folder.
pub fn save_adapter(
    dir: &Path,
    layout: &LoraLayout,
    params: &[f32],
    base_model: &str,
) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let named = layout.to_named(params);
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = named
        .into_iter()
        .map(|(n, s, d)| (n, s, bytemuck::cast_slice::<f32, u8>(&d).to_vec()))
        .collect();
    let views: Vec<(String, TensorView)> = bytes
        .iter()
        .map(|(n, s, b)| Ok((n.clone(), TensorView::new(Dtype::F32, s.clone(), b)?)))
        .collect::<Result<_>>()?;
    let mut meta = BTreeMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    let st = safetensors::serialize(views, Some(meta.into_iter().collect()))?;
    write_atomic(&dir.join("adapter_model.safetensors"), &st)?;
    let cfg = serde_json::to_vec_pretty(&adapter_config(&layout.config, base_model))?;
    write_atomic(&dir.join("adapter_config.json"), &cfg)
}
