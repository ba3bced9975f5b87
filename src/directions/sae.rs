//! Directions from a sparse autoencoder (SAE) instead of PCA: latents of an SAE trained on the
//! base model's resid_post at a layer, ranked by how much the fine-tune changes their mean
//! activation on the data's answer tokens; the decoder rows of the top latents are directions.
//!
//! An SAE with `m` latents reads `x` (one token's resid_post, width `d`) as
//!
//! ```text
//! pre = (x - b_dec·[subtract]) W_enc + b_enc          W_enc: [d, m]
//! f   = σ(pre)                                        sparse latent activations
//! x̂   = f W_dec + b_dec                               W_dec: [m, d]; row j is latent j's direction
//! ```
//!
//! with `σ` one of
//! - `relu`: `max(pre, 0)`;
//! - `jumprelu`: `pre · [pre > θ_j]` with a learned threshold per latent (Gemma Scope, SAELens);
//! - `topk`: the `k` largest `max(pre, 0)` of each token, others 0;
//! - `batchtopk`: trained with the top `k·batch` over a batch, used at inference as
//!   `max(pre, 0) · [pre > θ]` with one global threshold (dictionary_learning).
//!
//! Files: safetensors with SAELens names (`W_enc [d, m]`, `b_enc`, `W_dec [m, d]`, `b_dec`,
//! optional `threshold [m]`), Gemma Scope's `params.npz` (the same names as `.npy` arrays, read
//! as published), or dictionary_learning names (`encoder.weight [m, d]`,
//! `encoder.bias`, `decoder.weight [d, m]`, `b_dec` (or `bias`), optional scalar `threshold`
//! and `k`).
//!
//! The score of latent `j` is `mean_t f_j(x_t^tuned) - mean_t f_j(x_t^base)` over the answer
//! tokens; latents are ranked by `|score|`. The output has `layer.<L>` `[n, d]` (the decoder
//! rows, as stored), `sae_latent.<L>` (indices, as F32: exact below 2^24) and
//! `sae_score.<L>` `[n]`, so `select` and `explain` read it like a PCA file.

use crate::backend::Backend;
use crate::data::TokenBatch;
use crate::directions::pca::TunedAndBase;
use crate::linalg::gemm;
use anyhow::{anyhow, bail, Context, Result};
use std::collections::HashMap;
use std::path::Path;

/// The nonlinearity of an SAE (see the module docs).
#[derive(Clone, Debug, PartialEq)]
pub enum Activation {
    Relu,
    JumpRelu(Vec<f32>),
    TopK(usize),
    BatchTopK(f32),
}

/// A sparse autoencoder's encoder and decoder.
#[derive(Clone, Debug)]
pub struct Sae {
    pub d: usize,
    pub m: usize,
    /// `[d, m]` row-major.
    pub w_enc: Vec<f32>,
    pub b_enc: Vec<f32>,
    /// `[m, d]` row-major: row `j` is latent `j`'s decoder direction.
    pub w_dec: Vec<f32>,
    pub b_dec: Vec<f32>,
    /// Subtract `b_dec` from the input before encoding (dictionary_learning always does;
    /// SAELens when `apply_b_dec_to_input`).
    pub subtract_b_dec: bool,
    pub act: Activation,
}

impl Sae {
    /// Read an SAE file (see the module docs). `arch` (`relu`, `jumprelu`, `topk`,
    /// `batchtopk`) overrides the guess from the tensors present; `k` is needed for `topk`
    /// unless the file has it.
    pub fn load(path: &Path, arch: Option<&str>, k: Option<usize>) -> Result<Sae> {
        let file = path.display().to_string();
        // Gemma Scope publishes params.npz with SAELens's names; everything else is safetensors.
        let t = if path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("npz"))
        {
            crate::io::npy::read_npz(path)?
        } else {
            crate::io::read_f32_safetensors(path)?
        };
        let get = |name: &str| t.get(name);
        let need = |name: &str| {
            t.get(name).ok_or_else(|| {
                anyhow!(
                    "{file}: tensor `{name}` is missing (the file has {:?})",
                    t.keys().take(8).collect::<Vec<_>>()
                )
            })
        };
        let transpose = |data: &[f32], rows: usize, cols: usize| -> Vec<f32> {
            let mut o = vec![0f32; data.len()];
            for r in 0..rows {
                for c in 0..cols {
                    o[c * rows + r] = data[r * cols + c];
                }
            }
            o
        };
        let (d, m, w_enc, b_enc, w_dec, subtract) = if let Some((s, w)) = get("W_enc") {
            let [d, m] = s[..] else {
                bail!("{file}: `W_enc` has shape {s:?}; expected [d_model, latents]");
            };
            let (sd, wd) = need("W_dec")?;
            if sd[..] != [m, d] {
                bail!("{file}: `W_dec` has shape {sd:?}; expected [{m}, {d}]");
            }
            (d, m, w.clone(), need("b_enc")?.1.clone(), wd.clone(), false)
        } else if let Some((s, w)) = get("encoder.weight") {
            let [m, d] = s[..] else {
                bail!("{file}: `encoder.weight` has shape {s:?}; expected [latents, d_model]");
            };
            let (sd, wd) = need("decoder.weight")?;
            if sd[..] != [d, m] {
                bail!("{file}: `decoder.weight` has shape {sd:?}; expected [{d}, {m}]");
            }
            (
                d,
                m,
                transpose(w, m, d),
                need("encoder.bias")?.1.clone(),
                transpose(wd, d, m),
                true,
            )
        } else {
            bail!(
                "{file}: not an SAE file: expected `W_enc`/`W_dec` (SAELens) or \
                 `encoder.weight`/`decoder.weight` (dictionary_learning) tensors"
            );
        };
        // dictionary_learning names the decoder bias `b_dec` in newer releases and `bias` in
        // older ones; SAELens always `b_dec`.
        let b_dec = match get("b_dec").or_else(|| get("bias")) {
            Some((_, v)) => v.clone(),
            None => need("b_dec")?.1.clone(),
        };
        // SAELens writes `apply_b_dec_to_input` into a cfg.json beside the weights.
        let subtract = match std::fs::read_to_string(path.with_file_name("cfg.json")) {
            Ok(text) => serde_json::from_str::<serde_json::Value>(&text)
                .ok()
                .and_then(|v| v.get("apply_b_dec_to_input").and_then(|b| b.as_bool()))
                .unwrap_or(subtract),
            Err(_) => subtract,
        };
        if b_enc.len() != m || b_dec.len() != d {
            bail!(
                "{file}: bias lengths {} and {} do not match {m} latents of width {d}",
                b_enc.len(),
                b_dec.len()
            );
        }
        let threshold = get("threshold").map(|(_, v)| v.clone());
        let file_k = get("k").and_then(|(_, v)| v.first()).map(|&x| x as usize);
        let arch = match arch {
            Some(a) => a.to_ascii_lowercase(),
            None => match (&threshold, file_k) {
                (Some(th), _) if th.len() == m && m > 1 => "jumprelu".into(),
                (Some(_), Some(_)) => "batchtopk".into(),
                (None, Some(_)) => "topk".into(),
                _ => "relu".into(),
            },
        };
        let act = match arch.as_str() {
            "relu" => Activation::Relu,
            "jumprelu" => match threshold {
                Some(th) if th.len() == m => Activation::JumpRelu(th),
                _ => bail!("{file}: a jumprelu SAE needs a `threshold` tensor of {m} values"),
            },
            "topk" => Activation::TopK(k.or(file_k).with_context(|| {
                format!("{file}: a topk SAE needs k (give --sae-k, or a `k` tensor in the file)")
            })?),
            "batchtopk" => match threshold.as_deref() {
                Some([th]) => Activation::BatchTopK(*th),
                _ => bail!(
                    "{file}: a batchtopk SAE is used with its global inference threshold: a \
                     scalar `threshold` tensor is needed"
                ),
            },
            other => {
                bail!("SAE architecture {other:?}: expected relu, jumprelu, topk or batchtopk")
            }
        };
        for (name, v) in [("encoder", &w_enc), ("decoder", &w_dec)] {
            if let Some(i) = v.iter().position(|x| !x.is_finite()) {
                bail!("{file}: {name} weight {i} is {} (NaN or Inf)", v[i]);
            }
        }
        Ok(Sae {
            d,
            m,
            w_enc,
            b_enc,
            w_dec,
            b_dec,
            subtract_b_dec: subtract,
            act,
        })
    }

    /// Latent activations of `rows` (`[n, d]`), `[n, m]`.
    pub fn encode(&self, rows: &[f32]) -> Vec<f32> {
        let (d, m) = (self.d, self.m);
        let n = rows.len() / d;
        let x: Vec<f32> = if self.subtract_b_dec {
            rows.chunks_exact(d)
                .flat_map(|r| r.iter().zip(&self.b_dec).map(|(a, b)| a - b))
                .collect()
        } else {
            rows.to_vec()
        };
        let mut f = vec![0f32; n * m];
        for row in f.chunks_exact_mut(m) {
            row.copy_from_slice(&self.b_enc);
        }
        gemm(&mut f, &x, (d, 1), &self.w_enc, (m, 1), n, m, d, true);
        for row in f.chunks_exact_mut(m) {
            match &self.act {
                Activation::Relu => row.iter_mut().for_each(|v| *v = v.max(0.0)),
                Activation::JumpRelu(th) => row
                    .iter_mut()
                    .zip(th)
                    .for_each(|(v, t)| *v = if *v > *t && *v > 0.0 { *v } else { 0.0 }),
                Activation::BatchTopK(t) => row
                    .iter_mut()
                    .for_each(|v| *v = if *v > *t && *v > 0.0 { *v } else { 0.0 }),
                Activation::TopK(k) => {
                    let k = (*k).min(m);
                    let mut idx: Vec<usize> = (0..m).collect();
                    // Largest first; ties by index so the result is deterministic.
                    idx.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
                    let mut keep = vec![false; m];
                    idx[..k].iter().for_each(|&j| keep[j] = true);
                    for (j, v) in row.iter_mut().enumerate() {
                        if !keep[j] || *v < 0.0 {
                            *v = 0.0;
                        }
                    }
                }
            }
        }
        f
    }
}

/// Latents of one layer's SAE ranked by the change of their mean activation.
#[derive(Clone, Debug)]
pub struct RankedLatents {
    pub layer: usize,
    /// Latent indices, largest `|score|` first.
    pub latents: Vec<usize>,
    /// `mean f(tuned) - mean f(base)` of each listed latent.
    pub scores: Vec<f64>,
    /// Decoder rows of the listed latents, `[n, d]`.
    pub directions: Vec<f32>,
    pub tokens: u64,
}

/// Encode base and fine-tuned resid_post at each `(layer, sae)` over `batches` and rank the
/// latents (see the module docs); keep the top `top` per layer. `pair` is a model carrying an
/// adapter or a whole fine-tuned model beside its base ([`TunedAndBase`]).
pub fn rank_latents<B: Backend, P: TunedAndBase<B> + ?Sized>(
    be: &B,
    pair: &mut P,
    batches: &[TokenBatch],
    saes: &[(usize, Sae)],
    top: usize,
    mut on_batch: impl FnMut(usize),
) -> Result<Vec<RankedLatents>> {
    let d = pair.config().hidden_size;
    let layers: Vec<usize> = saes.iter().map(|(l, _)| *l).collect();
    crate::directions::pca::check_request(&layers, 1, pair.config().num_layers, d)?;
    for (l, s) in saes {
        if s.d != d {
            bail!(
                "the SAE for layer {l} reads width {} but the model's d_model is {d}",
                s.d
            );
        }
    }
    // Per layer: Σ f(tuned) - Σ f(base) per latent, in f64.
    let mut sums: Vec<Vec<f64>> = saes.iter().map(|(_, s)| vec![0.0; s.m]).collect();
    let mut tokens = 0u64;
    for (i, tb) in batches.iter().enumerate() {
        let (tuned, base) = pair.paired_resid(be, tb, &layers)?;
        for (li, (_, sae)) in saes.iter().enumerate() {
            let ft = sae.encode(&tuned[li]);
            let fb = sae.encode(&base[li]);
            for (rt, rb) in ft.chunks_exact(sae.m).zip(fb.chunks_exact(sae.m)) {
                for ((s, a), b) in sums[li].iter_mut().zip(rt).zip(rb) {
                    *s += *a as f64 - *b as f64;
                }
            }
        }
        tokens += tb.rows.len() as u64;
        on_batch(i + 1);
    }
    if tokens == 0 {
        bail!("no answer tokens to compare (give more data, or --all-tokens)");
    }
    let mut out = Vec::with_capacity(saes.len());
    for ((layer, sae), s) in saes.iter().zip(&sums) {
        let score: Vec<f64> = s.iter().map(|x| x / tokens as f64).collect();
        let mut idx: Vec<usize> = (0..sae.m).collect();
        idx.sort_by(|&a, &b| score[b].abs().total_cmp(&score[a].abs()).then(a.cmp(&b)));
        idx.truncate(top.min(sae.m));
        out.push(RankedLatents {
            layer: *layer,
            scores: idx.iter().map(|&j| score[j]).collect(),
            directions: idx
                .iter()
                .flat_map(|&j| sae.w_dec[j * d..(j + 1) * d].iter().copied())
                .collect(),
            latents: idx,
            tokens,
        });
    }
    Ok(out)
}

/// Write ranked latents (module docs: `layer.<L>`, `sae_latent.<L>`, `sae_score.<L>`)
/// atomically, with `about` as JSON under the `caft_fast` metadata key.
pub fn save(path: &Path, ranked: &[RankedLatents], about: &serde_json::Value) -> Result<()> {
    let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
    for r in ranked {
        let n = r.latents.len();
        let d = r.directions.len() / n.max(1);
        tensors.push((
            format!("layer.{}", r.layer),
            vec![n, d],
            r.directions.clone(),
        ));
        tensors.push((
            format!("sae_latent.{}", r.layer),
            vec![n],
            r.latents.iter().map(|&j| j as f32).collect(),
        ));
        tensors.push((
            format!("sae_score.{}", r.layer),
            vec![n],
            r.scores.iter().map(|&x| x as f32).collect(),
        ));
    }
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(name, shape, data)| {
            safetensors::tensor::TensorView::new(
                safetensors::Dtype::F32,
                shape.clone(),
                bytemuck::cast_slice::<f32, u8>(data),
            )
            .map(|v| (name.clone(), v))
            .map_err(|e| anyhow!("tensor {name}: {e}"))
        })
        .collect::<Result<_>>()?;
    let meta = HashMap::from([
        ("format".to_string(), "pt".to_string()),
        ("caft_fast".to_string(), about.to_string()),
    ]);
    let bytes = safetensors::serialize(views, Some(meta))
        .map_err(|e| anyhow!("serialising ranked SAE latents: {e}"))?;
    crate::io::write_atomic(path, &bytes)
}
