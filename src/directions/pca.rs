//! Principal components of what a fine-tune changed in the residual stream.
//!
//! For each token `t` of the data and each chosen layer `L`, the difference
//! `δ_t = resid_post_L(tuned)_t - resid_post_L(base)_t` (same tokens, no ablation), where the
//! fine-tune is the base with a LoRA adapter or a whole fine-tuned model of the base's shape
//! ([`TunedAndBase`]).
//! The differences are centred (`δ_t - mean δ`) and their covariance
//! `C = Σ (δ_t - μ)(δ_t - μ)ᵀ / (n - 1)` is accumulated in f64 as the batches stream past,
//! so memory is `d² · 8` bytes per layer whatever the number of tokens. The components are the
//! top eigenvectors of `C`; `explained_variance` are their eigenvalues (the variance of the
//! differences along each component) and `explained_variance_ratio` those over `trace C`.
//! This equals an SVD of the centred difference matrix: `C = V Σ² Vᵀ / (n - 1)`.
//!
//! Output (safetensors, written atomically): per layer `layer.<L>` F32 `[k, d_model]` (unit
//! rows, largest-magnitude entry positive), `explained_variance.<L>` and
//! `explained_variance_ratio.<L>` F32 `[k]`, and a JSON description under the `caft_fast`
//! metadata key. `caft-fast directions select` turns chosen rows into an ablation file.

use crate::backend::Backend;
use crate::data::TokenBatch;
use crate::linalg::{top_eigenpairs, Covariance};
use crate::model::config::ModelConfig;
use crate::model::loader::LoadedModel;
use crate::model::transformer::Model;
use anyhow::{anyhow, bail, Context, Result};
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

/// Difference rows are buffered up to this many before one covariance GEMM, so the GEMM has
/// a reasonable inner dimension even when batches hold few answer tokens.
const FLUSH_ROWS: usize = 512;

/// The principal components of one layer.
#[derive(Clone, Debug)]
pub struct LayerPca {
    pub layer: usize,
    /// Row-major `[k, d]`, unit rows.
    pub components: Vec<f64>,
    /// Eigenvalues of the difference covariance, descending.
    pub variance: Vec<f64>,
    /// `variance / trace(C)` (0 when the trace is 0: the fine-tune did not change this layer).
    pub ratio: Vec<f64>,
    /// `trace(C)`: the total variance of the differences.
    pub total_variance: f64,
    /// Norm of the mean difference (removed before the PCA).
    pub mean_norm: f64,
    /// Subspace iterations (0: solved exactly by Jacobi) and the final relative residual.
    pub iterations: usize,
    pub residual: f64,
}

/// The PCA of every requested layer, plus counts and timings.
#[derive(Clone, Debug)]
pub struct PcaResult {
    pub d: usize,
    pub k: usize,
    pub layers: Vec<LayerPca>,
    /// Difference rows (tokens) per layer.
    pub tokens: u64,
    /// Seconds in the two forward passes, in accumulating the covariance, in the eigensolver.
    pub forward_s: f64,
    pub accumulate_s: f64,
    pub eigen_s: f64,
    /// Tokens (real, unpadded) that went through each of the two models.
    pub tokens_forwarded: u64,
}

/// `(tuned, base)` activations: per layer, `[rows * d]` f32.
pub type Paired = (Vec<Vec<f32>>, Vec<Vec<f32>>);

/// A fine-tune and its base, read on the same tokens: a [`Model`] carrying a LoRA adapter
/// (the fine-tune with it attached, the base with it detached), or [`TwoModels`], a whole
/// fine-tuned model beside its base (full fine-tuning).
pub trait TunedAndBase<B: Backend> {
    /// The base's configuration (the fine-tune has its architecture and shape).
    fn config(&self) -> &ModelConfig;

    /// resid_post at `layers` for the collected rows of `tb`, from the fine-tune and from the
    /// base: `(tuned, base)`, each `[layer][rows.len() * d]` f32 (no ablation on either).
    fn paired_resid(&mut self, be: &B, tb: &TokenBatch, layers: &[usize]) -> Result<Paired>;
}

/// The rows `tb` collects of one layer's `[batch * seq, d]` activations.
fn gather(tb: &TokenBatch, v: &[f32], d: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(tb.rows.len() * d);
    for &r in &tb.rows {
        out.extend_from_slice(&v[r * d..(r + 1) * d]);
    }
    out
}

/// resid_post at `layers` after a forward pass of `tb`, gathered to its collected rows.
fn resid_rows<B: Backend>(
    be: &B,
    model: &Model<B>,
    tb: &TokenBatch,
    layers: &[usize],
) -> Result<Vec<Vec<f32>>> {
    let d = model.cfg.hidden_size;
    layers
        .iter()
        .map(|&l| Ok(gather(tb, &model.resid_post(be, l)?, d)))
        .collect()
}

/// The model must carry the adapter (`Model::set_lora`). The adapter pass runs first: the
/// model allocates its activation buffers (including each adapter's `x Aᵀ` buffers) on the
/// first forward of a batch shape, so the base pass, with the adapter detached, reuses
/// buffers that were sized with it and attaching it again needs no reallocation.
impl<B: Backend> TunedAndBase<B> for Model<B> {
    fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    fn paired_resid(&mut self, be: &B, tb: &TokenBatch, layers: &[usize]) -> Result<Paired> {
        if self.lora.is_none() {
            bail!("comparing base and fine-tuned activations needs an adapter attached");
        }
        self.forward(be, &tb.batch, false)?;
        let tuned = resid_rows(be, self, tb, layers)?;
        let lora = self.lora.take();
        let base = self.forward(be, &tb.batch, false);
        self.lora = lora;
        base?;
        Ok((tuned, resid_rows(be, self, tb, layers)?))
    }
}

/// A whole fine-tuned model and its base, of one architecture and shape (built by
/// [`TwoModels::new`], which checks that): the output of full fine-tuning against the model
/// it started from. Both are on the device at once, so this takes twice the weights' memory.
pub struct TwoModels<B: Backend> {
    pub tuned: Model<B>,
    pub base: Model<B>,
}

impl<B: Backend> TwoModels<B> {
    /// Both models on `be`; an error naming every difference when `tuned` is not of `base`'s
    /// architecture and shape (its directions would not live in the base's residual stream).
    pub fn new(be: &B, base: &LoadedModel, tuned: &LoadedModel) -> Result<Self> {
        let (b, t) = (&base.config, &tuned.config);
        let mut diffs = Vec::new();
        if b.arch != t.arch {
            diffs.push(format!(
                "architecture {:?} (fine-tuned) vs {:?} (base)",
                t.arch, b.arch
            ));
        }
        for (name, tv, bv) in [
            ("hidden_size", t.hidden_size, b.hidden_size),
            ("num_hidden_layers", t.num_layers, b.num_layers),
            (
                "intermediate_size",
                t.intermediate_size,
                b.intermediate_size,
            ),
            ("num_attention_heads", t.num_heads, b.num_heads),
            ("num_key_value_heads", t.num_kv_heads, b.num_kv_heads),
            ("head_dim", t.head_dim, b.head_dim),
            ("vocab_size", t.vocab_size, b.vocab_size),
        ] {
            if tv != bv {
                diffs.push(format!("{name} {tv} (fine-tuned) vs {bv} (base)"));
            }
        }
        if !diffs.is_empty() {
            bail!(
                "{} is not a fine-tune of {}: {}",
                tuned.source.display(),
                base.source.display(),
                diffs.join(", ")
            );
        }
        Ok(TwoModels {
            tuned: Model::new(be, t.clone(), tuned.weights.as_ref())
                .with_context(|| format!("loading {}", tuned.source.display()))?,
            base: Model::new(be, b.clone(), base.weights.as_ref())
                .with_context(|| format!("loading {}", base.source.display()))?,
        })
    }
}

impl<B: Backend> TunedAndBase<B> for TwoModels<B> {
    fn config(&self) -> &ModelConfig {
        &self.base.cfg
    }

    fn paired_resid(&mut self, be: &B, tb: &TokenBatch, layers: &[usize]) -> Result<Paired> {
        self.tuned.forward(be, &tb.batch, false)?;
        let tuned = resid_rows(be, &self.tuned, tb, layers)?;
        self.base.forward(be, &tb.batch, false)?;
        Ok((tuned, resid_rows(be, &self.base, tb, layers)?))
    }
}

/// The differences `resid_post(tuned) - resid_post(base)` at `layers` for the collected rows
/// of `tb`, as f64 `[rows.len() * d]` per layer (see [`TunedAndBase::paired_resid`]).
pub fn differences<B: Backend, P: TunedAndBase<B> + ?Sized>(
    be: &B,
    pair: &mut P,
    tb: &TokenBatch,
    layers: &[usize],
) -> Result<Vec<Vec<f64>>> {
    let (tuned, base) = pair.paired_resid(be, tb, layers)?;
    Ok(tuned
        .iter()
        .zip(&base)
        .map(|(t, b)| {
            t.iter()
                .zip(b)
                .map(|(&x, &y)| x as f64 - y as f64)
                .collect()
        })
        .collect())
}

/// Check the layers and the component count against the model before any work.
pub fn check_request(layers: &[usize], k: usize, n_layers: usize, d: usize) -> Result<()> {
    if layers.is_empty() {
        bail!("no layers given (e.g. --layers 10,20,30)");
    }
    let mut s = layers.to_vec();
    s.sort_unstable();
    if let Some(w) = s.windows(2).find(|w| w[0] == w[1]) {
        bail!("layer {} is listed twice", w[0]);
    }
    if let Some(&l) = layers.iter().find(|&&l| l >= n_layers) {
        bail!(
            "layer {l} does not exist: the model has {n_layers} layers (0..{})",
            n_layers.saturating_sub(1)
        );
    }
    if k == 0 || k > d {
        bail!("--components {k} must be between 1 and d_model = {d}");
    }
    Ok(())
}

/// Stream `batches` through the base and the fine-tune (`pair`: a model carrying an adapter,
/// or [`TwoModels`]), accumulate the difference covariance of each layer and take the top `k`
/// components. `on_batch` is called after each batch (for a progress bar).
pub fn pca<B: Backend, P: TunedAndBase<B> + ?Sized>(
    be: &B,
    pair: &mut P,
    batches: &[TokenBatch],
    layers: &[usize],
    k: usize,
    mut on_batch: impl FnMut(usize),
) -> Result<PcaResult> {
    let d = pair.config().hidden_size;
    check_request(layers, k, pair.config().num_layers, d)?;
    let mut covs: Vec<Covariance> = layers.iter().map(|_| Covariance::new(d)).collect();
    let mut pending: Vec<Vec<f64>> = layers.iter().map(|_| Vec::new()).collect();
    let (mut forward_s, mut accumulate_s) = (0.0, 0.0);
    let mut tokens_forwarded = 0u64;
    // In a data-parallel group each rank takes every `size`-th batch; the covariances are
    // merged across ranks below.
    let (rank, size) = be.group();
    for (i, tb) in batches.iter().enumerate() {
        if i % size != rank {
            on_batch(i + 1);
            continue;
        }
        let t0 = Instant::now();
        let diffs = differences(be, pair, tb, layers)?;
        be.synchronize()?;
        forward_s += t0.elapsed().as_secs_f64();
        tokens_forwarded += tb.batch.labels.len() as u64;
        let t1 = Instant::now();
        for (li, dl) in diffs.into_iter().enumerate() {
            if let Some(r) = dl.iter().position(|x| !x.is_finite()) {
                let (ex, pos) = tb.origin[r / d];
                bail!(
                    "layer {}: the resid_post difference is {} (NaN or Inf) at example {} \
                     (in file order after filtering) position {pos}",
                    layers[li],
                    dl[r],
                    ex + 1
                );
            }
            pending[li].extend_from_slice(&dl);
            if pending[li].len() >= FLUSH_ROWS * d {
                covs[li].add_rows(&pending[li]);
                pending[li].clear();
            }
        }
        accumulate_s += t1.elapsed().as_secs_f64();
        on_batch(i + 1);
    }
    let t1 = Instant::now();
    for (c, p) in covs.iter_mut().zip(&pending) {
        c.add_rows(p);
    }
    if size > 1 {
        for c in &mut covs {
            merge_across_ranks(be, c).context("merging the covariances of every rank")?;
        }
        let mut n = [tokens_forwarded as f64];
        be.all_reduce_host(&mut n)?;
        tokens_forwarded = n[0] as u64;
    }
    accumulate_s += t1.elapsed().as_secs_f64();
    let tokens = covs[0].n;
    if tokens < 2 {
        bail!(
            "only {tokens} token(s) to compare; PCA needs at least 2 (give more data, or \
             --all-tokens to use every token rather than the answers only)"
        );
    }
    let t2 = Instant::now();
    let mut out = Vec::with_capacity(layers.len());
    for (&layer, cov) in layers.iter().zip(&covs) {
        let c = cov.covariance();
        let total: f64 = (0..d).map(|i| c[i * d + i]).sum();
        let e = top_eigenpairs(&c, d, k).with_context(|| format!("PCA of layer {layer}"))?;
        let ratio = e
            .values
            .iter()
            .map(|v| if total > 0.0 { v / total } else { 0.0 })
            .collect();
        out.push(LayerPca {
            layer,
            components: e.vectors,
            variance: e.values,
            ratio,
            total_variance: total,
            mean_norm: cov.mean.iter().map(|x| x * x).sum::<f64>().sqrt(),
            iterations: e.iterations,
            residual: e.residual,
        });
    }
    Ok(PcaResult {
        d,
        k,
        layers: out,
        tokens,
        forward_s,
        accumulate_s,
        eigen_s: t2.elapsed().as_secs_f64(),
        tokens_forwarded,
    })
}

/// Make `cov` (this rank's rows) the covariance of every rank's rows. Each rank's
/// `(n, mean, M2)` is moved to a common reference `μ0` (rank 0's mean): `S1 = n (μ - μ0)`,
/// `S2 = M2 + n (μ - μ0)(μ - μ0)ᵀ` are then plain sums over ranks, and the merged
/// `μ = μ0 + S1/n`, `M2 = S2 - n δδᵀ` with `δ = S1/n` (small: no cancellation as with raw
/// second moments).
fn merge_across_ranks<B: Backend>(be: &B, cov: &mut Covariance) -> Result<()> {
    let d = cov.d;
    let (rank, _) = be.group();
    let mut mu0 = if rank == 0 {
        cov.mean.clone()
    } else {
        vec![0.0; d]
    };
    be.all_reduce_host(&mut mu0)?;
    let n = cov.n as f64;
    let shift: Vec<f64> = cov.mean.iter().zip(&mu0).map(|(m, r)| m - r).collect();
    let mut sums = vec![0.0f64; 1 + d + d * d];
    sums[0] = n;
    for i in 0..d {
        sums[1 + i] = n * shift[i];
        for j in 0..d {
            sums[1 + d + i * d + j] = cov.m2[i * d + j] + n * shift[i] * shift[j];
        }
    }
    be.all_reduce_host(&mut sums)?;
    let n = sums[0];
    let delta: Vec<f64> = (0..d)
        .map(|i| if n > 0.0 { sums[1 + i] / n } else { 0.0 })
        .collect();
    cov.n = n as u64;
    cov.mean = mu0.iter().zip(&delta).map(|(r, x)| r + x).collect();
    for i in 0..d {
        for j in 0..d {
            cov.m2[i * d + j] = sums[1 + d + i * d + j] - n * delta[i] * delta[j];
        }
    }
    Ok(())
}

/// The safetensors bytes of a PCA result (see the module docs); `about` goes into the
/// `caft_fast` metadata entry as JSON.
pub fn to_safetensors(r: &PcaResult, about: &serde_json::Value) -> Result<Vec<u8>> {
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    let bytes =
        |v: &[f64]| -> Vec<u8> { v.iter().flat_map(|&x| (x as f32).to_le_bytes()).collect() };
    for l in &r.layers {
        tensors.push((
            format!("layer.{}", l.layer),
            vec![r.k, r.d],
            bytes(&l.components),
        ));
        tensors.push((
            format!("explained_variance.{}", l.layer),
            vec![r.k],
            bytes(&l.variance),
        ));
        tensors.push((
            format!("explained_variance_ratio.{}", l.layer),
            vec![r.k],
            bytes(&l.ratio),
        ));
    }
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(n, s, b)| {
            TensorView::new(Dtype::F32, s.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| anyhow!("tensor {n}: {e}"))
        })
        .collect::<Result<_>>()?;
    let meta = HashMap::from([
        ("format".to_string(), "pt".to_string()),
        ("caft_fast".to_string(), about.to_string()),
    ]);
    safetensors::serialize(views, Some(meta)).map_err(|e| anyhow!("serialising the PCA: {e}"))
}

/// Write a PCA result atomically (temporary file, then rename).
pub fn save(path: &Path, r: &PcaResult, about: &serde_json::Value) -> Result<()> {
    crate::io::write_atomic(path, &to_safetensors(r, about)?)
}

/// One line per layer: the share of variance in the first components.
pub fn summary(r: &PcaResult) -> String {
    let mut s = String::new();
    for l in &r.layers {
        let show: Vec<String> = l
            .ratio
            .iter()
            .take(5)
            .map(|x| format!("{:.1}%", 100.0 * x))
            .collect();
        let cum: f64 = l.ratio.iter().sum();
        s.push_str(&format!(
            "layer {}: total variance {:.4e}, |mean| {:.4e}, first components {} (top {} explain \
             {:.1}%{})\n",
            l.layer,
            l.total_variance,
            l.mean_norm,
            show.join(" "),
            r.k,
            100.0 * cum,
            if l.iterations > 0 {
                format!("; {} subspace iterations", l.iterations)
            } else {
                String::new()
            }
        ));
        if l.iterations > 0 && l.residual > crate::linalg::SUBSPACE_TOL {
            s.push_str(&format!(
                "  note: layer {}: the eigensolver stopped after {} iterations with relative \
                 residual {:.1e} (the trailing components have nearly equal variance, so their \
                 directions are not well defined)\n",
                l.layer, l.iterations, l.residual
            ));
        }
    }
    s
}
