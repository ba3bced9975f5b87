//! Device scratch owned by the backend (token ids, targets, per-row losses, cache starts,
//! split-attention partials, full fine-tuning's column sums and token-id groups, `T` copies of
//! LoRA factors), grown on demand.

use super::runtime::Runtime;
use anyhow::{Context, Result};
use cudarc::driver::{CudaSlice, DeviceRepr, ValidAsZeroBits};

/// Device scratch, grown on demand.
#[derive(Default)]
pub(super) struct Scratch<T> {
    pub ids: Option<CudaSlice<u32>>,
    pub targets: Option<CudaSlice<i32>>,
    /// Per-sequence cache starts (generation).
    pub starts: Mirrored<u32>,
    pub row_loss: Option<CudaSlice<f32>>,
    pub partial: Option<CudaSlice<f32>>,
    /// Per-split partial outputs of `attention_cached` (decoding small batches).
    pub attn_splits: Option<CudaSlice<f32>>,
    /// Per-chunk column sums of `bias_bwd` and `norm_weight_bwd` (`ColumnSums::partial_len`).
    pub colsum: Option<CudaSlice<f32>>,
    /// The rows of each token id of `embedding_bwd` (`3·n + 1` i32 for `n` tokens).
    pub csr: Option<CudaSlice<i32>>,
    /// `T` copies of LoRA `A`, `B`, `u` and `du` (used when `T` is not f32).
    pub lora: [Option<CudaSlice<T>>; 4],
}

/// Grow `slot` to hold at least `len` elements (contents undefined) and return it.
pub(super) fn ensure<'s, E: DeviceRepr + ValidAsZeroBits>(
    rt: &Runtime,
    slot: &'s mut Option<CudaSlice<E>>,
    len: usize,
) -> Result<&'s mut CudaSlice<E>> {
    let need = len.max(1);
    if slot.as_ref().is_none_or(|s| s.len() < need) {
        *slot = None; // free first: the old buffer is not needed
        *slot = Some(rt.alloc_zeros::<E>(need, || format!("allocating {need} scratch elements"))?);
    }
    Ok(slot.as_mut().expect("just ensured"))
}

/// A small device array that remembers what it was last given. Generation passes the same
/// per-sequence cache starts to every layer of a step and to every step, so an upload is
/// skipped when the values have not changed.
pub(super) struct Mirrored<E> {
    dev: Option<CudaSlice<E>>,
    host: Vec<E>,
}

impl<E> Default for Mirrored<E> {
    fn default() -> Self {
        Mirrored {
            dev: None,
            host: Vec::new(),
        }
    }
}

impl<E: DeviceRepr + ValidAsZeroBits + Copy + PartialEq> Mirrored<E> {
    /// The device array holding `values` (in its first `values.len()` elements).
    pub(super) fn upload(
        &mut self,
        rt: &Runtime,
        values: &[E],
        what: &str,
    ) -> Result<&CudaSlice<E>> {
        let fits = self
            .dev
            .as_ref()
            .is_some_and(|d| d.len() >= values.len().max(1));
        if !fits || self.host != values {
            let dev = ensure(rt, &mut self.dev, values.len())?;
            rt.stream
                .memcpy_htod(values, &mut dev.slice_mut(0..values.len()))
                .with_context(|| format!("uploading {what}"))?;
            self.host = values.to_vec();
        }
        Ok(self.dev.as_ref().expect("uploaded"))
    }
}
