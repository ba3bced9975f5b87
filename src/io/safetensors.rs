//! f32 tensors to and from safetensors bytes, with errors naming the file and the tensor.

use anyhow::{bail, Context, Result};
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use std::collections::BTreeMap;
use std::path::Path;

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
