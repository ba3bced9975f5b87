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

/// Read every tensor of a safetensors file as f32, keyed by name: floats of any width (F64,
/// F32, F16, BF16) and integer tensors (I64, I32, such as an SAE's `k`) converted, with errors
/// naming the file and the tensor.
pub fn read_f32_safetensors(path: &Path) -> Result<NamedTensors> {
    let file = path.display();
    let bytes = std::fs::read(path).with_context(|| format!("reading {file}"))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .with_context(|| format!("{file}: not a valid safetensors file"))?;
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        let b = view.data();
        // Each arm reads fixed-size little-endian chunks; `chunks_exact` guarantees the size.
        let data: Vec<f32> = match view.dtype() {
            Dtype::F64 => b
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")) as f32)
                .collect(),
            Dtype::F32 => b
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
                .collect(),
            Dtype::F16 => b
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::BF16 => b
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::I64 => b
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")) as f32)
                .collect(),
            Dtype::I32 => b
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes(c.try_into().expect("4 bytes")) as f32)
                .collect(),
            other => bail!(
                "{file}: tensor `{name}` has dtype {other:?}; expected a float (F64, F32, F16, \
                 BF16) or integer (I64, I32) tensor"
            ),
        };
        out.insert(name, (view.shape().to_vec(), data));
    }
    Ok(out)
}
