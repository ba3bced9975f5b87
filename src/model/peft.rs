//! Writing and reading LoRA adapters in PEFT's format: `adapter_config.json` and
//! `adapter_model.safetensors` with PEFT's tensor names, so `peft.PeftModel.from_pretrained`
//! loads what caft-fast trains.

use crate::io::{f32_safetensors, read_f32_safetensors, write_atomic};
use crate::model::config::ModelConfig;
use crate::model::lora::{LoraConfig, LoraLayout, Target};
use anyhow::{bail, Context, Result};
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

/// Load a PEFT adapter folder's LoRA parameters into `layout`'s flat buffer. The adapter's
/// rank, alpha, rsLoRA flag and targets must be `layout`'s (a mismatch is reported by name).
pub fn load_adapter(dir: &Path, layout: &LoraLayout) -> Result<Vec<f32>> {
    let cfg_path = dir.join("adapter_config.json");
    let text = std::fs::read_to_string(&cfg_path)
        .with_context(|| format!("reading {}", cfg_path.display()))?;
    let cfg: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{}: malformed JSON", cfg_path.display()))?;
    let want = adapter_config(&layout.config, "");
    // PEFT writes target_modules from a set, in no fixed order: compare them sorted.
    let sorted = |v: Option<&serde_json::Value>| -> Option<Vec<String>> {
        let mut l: Vec<String> = v?
            .as_array()?
            .iter()
            .map(|x| x.as_str().map(String::from))
            .collect::<Option<_>>()?;
        l.sort();
        Some(l)
    };
    if sorted(cfg.get("target_modules")) != sorted(want.get("target_modules")) {
        bail!(
            "{}: target_modules is {} but this configuration adapts {}",
            cfg_path.display(),
            cfg.get("target_modules")
                .unwrap_or(&serde_json::Value::Null),
            want["target_modules"]
        );
    }
    for key in ["r", "use_rslora"] {
        if cfg.get(key) != want.get(key) {
            bail!(
                "{}: {key} is {} but this configuration has {}",
                cfg_path.display(),
                cfg.get(key).unwrap_or(&serde_json::Value::Null),
                want[key]
            );
        }
    }
    let alpha = cfg.get("lora_alpha").and_then(|a| a.as_f64());
    if alpha != Some(layout.config.alpha) {
        bail!(
            "{}: lora_alpha is {alpha:?} but this configuration has {}",
            cfg_path.display(),
            layout.config.alpha
        );
    }
    let st = dir.join("adapter_model.safetensors");
    let tensors = read_f32_safetensors(&st)?;
    layout.from_named(&tensors, &st.display().to_string())
}

/// Save the flat LoRA parameters as a PEFT adapter folder.
pub fn save_adapter(
    dir: &Path,
    layout: &LoraLayout,
    params: &[f32],
    base_model: &str,
) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    if params.len() != layout.len {
        bail!(
            "LoRA buffer has {} values but the layout needs {}",
            params.len(),
            layout.len
        );
    }
    let st = f32_safetensors(&layout.to_named(params))?;
    write_atomic(&dir.join("adapter_model.safetensors"), &st)?;
    let cfg = serde_json::to_vec_pretty(&adapter_config(&layout.config, base_model))?;
    write_atomic(&dir.join("adapter_config.json"), &cfg)
}

/// Read a PEFT LoRA adapter folder (`adapter_config.json` + `adapter_model.safetensors`) for
/// the model `cfg`: the LoRA configuration comes from the adapter's own config, so any rank,
/// alpha, rsLoRA setting and target subset that caft-fast can run is accepted.
pub fn load_peft_adapter(dir: &Path, cfg: &ModelConfig) -> Result<(LoraLayout, Vec<f32>)> {
    let cfg_path = dir.join("adapter_config.json");
    let at = cfg_path.display().to_string();
    let text = std::fs::read_to_string(&cfg_path).with_context(|| {
        format!(
            "reading {at} (an adapter folder holds adapter_config.json and \
             adapter_model.safetensors, as `caft-fast train` and PEFT write them)"
        )
    })?;
    let v: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{at}: malformed JSON"))?;
    if let Some(t) = v.get("peft_type").and_then(|t| t.as_str()) {
        if !t.eq_ignore_ascii_case("lora") {
            bail!("{at}: peft_type is {t:?}; only LORA adapters are supported");
        }
    }
    if v.get("use_dora").and_then(|x| x.as_bool()) == Some(true) {
        bail!("{at}: use_dora is true; DoRA adapters are not supported");
    }
    for key in ["layers_to_transform", "rank_pattern", "alpha_pattern"] {
        let set = match v.get(key) {
            None | Some(serde_json::Value::Null) => false,
            Some(serde_json::Value::Object(o)) => !o.is_empty(),
            Some(serde_json::Value::Array(a)) => !a.is_empty(),
            Some(_) => true,
        };
        if set {
            bail!("{at}: {key} is set; per-layer LoRA settings are not supported");
        }
    }
    let r = v
        .get("r")
        .and_then(|x| x.as_u64())
        .with_context(|| format!("{at}: \"r\" (the LoRA rank) is missing or not an integer"))?;
    let alpha = v
        .get("lora_alpha")
        .and_then(|x| x.as_f64())
        .with_context(|| format!("{at}: \"lora_alpha\" is missing or not a number"))?;
    let rslora = v
        .get("use_rslora")
        .and_then(|x| x.as_bool())
        .unwrap_or(false);
    let targets = match v.get("target_modules") {
        Some(serde_json::Value::Array(a)) => {
            let names: Vec<&str> = a
                .iter()
                .map(|x| {
                    x.as_str()
                        .with_context(|| format!("{at}: target_modules entry {x} is not a string"))
                })
                .collect::<Result<_>>()?;
            Target::parse_list(&names.join(",")).with_context(|| format!("{at}: target_modules"))?
        }
        other => bail!(
            "{at}: target_modules is {}; expected a list of module names (q_proj, ..., down_proj)",
            other.unwrap_or(&serde_json::Value::Null)
        ),
    };
    let lora = LoraConfig {
        r: r as usize,
        alpha,
        rslora,
        targets,
    };
    let layout = LoraLayout::new(cfg, &lora).with_context(|| at.clone())?;
    let params = load_adapter(dir, &layout)?;
    Ok((layout, params))
}
