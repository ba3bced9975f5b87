//! Writing and reading LoRA adapters in PEFT's format: `adapter_config.json` and
//! `adapter_model.safetensors` with PEFT's tensor names, so `peft.PeftModel.from_pretrained`
//! loads what caft-fast trains.

use crate::model::lora::{LoraConfig, LoraLayout};
use anyhow::{bail, Context, Result};
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

/// Write `content` to `path` atomically: a temporary file in the same folder, flushed to disk,
/// then a rename, so a reader (or a crash, or a full disk) never sees a half-written file and
/// an earlier version at `path` survives any failure. The temporary file is removed on error.
pub fn write_atomic(path: &Path, content: &[u8]) -> Result<()> {
    use std::io::Write;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .with_context(|| format!("{}: path has no file name", path.display()))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let write = || -> Result<()> {
        let mut f =
            std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(content)
            .with_context(|| format!("writing {} ({} bytes)", tmp.display(), content.len()))?;
        f.sync_all()
            .with_context(|| format!("flushing {}", tmp.display()))?;
        std::fs::rename(&tmp, path)
            .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
    };
    write().inspect_err(|_| {
        // Best effort: the write already failed and that error is the one to report.
        let _ = std::fs::remove_file(&tmp);
    })
}

/// Serialise f32 tensors `(name, shape, data)` as safetensors bytes with `format: pt`
/// metadata (what PEFT and `safetensors.torch` expect).
pub fn f32_safetensors(tensors: &[(String, Vec<usize>, Vec<f32>)]) -> Result<Vec<u8>> {
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(n, s, d)| {
            TensorView::new(Dtype::F32, s.clone(), bytemuck::cast_slice::<f32, u8>(d))
                .map(|v| (n.clone(), v))
                .with_context(|| format!("tensor {n}: shape {s:?} does not match its data"))
        })
        .collect::<Result<_>>()?;
    let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    Ok(safetensors::serialize(views, Some(meta))?)
}

/// Tensors by name: `(shape, data)` in f32.
pub type NamedTensors = BTreeMap<String, (Vec<usize>, Vec<f32>)>;

/// Read every tensor of a safetensors file as f32 (F32, F16 and BF16 are accepted), keyed by
/// name, with errors naming the file and the tensor.
pub fn read_f32_safetensors(path: &Path) -> Result<NamedTensors> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .with_context(|| format!("{}: not a valid safetensors file", path.display()))?;
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        let raw = view.data();
        let data: Vec<f32> = match view.dtype() {
            Dtype::F32 => raw
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Dtype::F16 => raw
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::BF16 => raw
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            other => bail!(
                "{}: tensor {name} has dtype {other:?}; expected F32, F16 or BF16",
                path.display()
            ),
        };
        out.insert(name, (view.shape().to_vec(), data));
    }
    Ok(out)
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
