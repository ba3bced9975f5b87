//! Ablation directions: reading, validating and orthonormalising the concept directions whose
//! span CAFT projects out of the residual stream (`h <- h - Qᵀ(Q h)` at the output of a layer).
//!
//! A directions file holds, per ablated layer `L`, a matrix `[k, d_model]` whose rows span the
//! unwanted concepts. Only the span matters: the projection `P = I - QᵀQ` depends on it alone,
//! so the rows need not be orthonormal on disk. Every set is orthonormalised here in f64
//! (modified Gram–Schmidt with one re-orthogonalisation pass) and rounded once to f32, the
//! precision every backend applies it in.
//!
//! Accepted files:
//! - `.safetensors` with tensors named `layer.<L>`, shape `[k, d_model]` or `[d_model]` (k = 1),
//!   dtype F32, F16, BF16 or F64; as written by [`save_directions`].
//! - `.npy` (f32 or f64, little-endian, C order, 1-D or 2-D) holding one layer, whose index is
//!   given separately because the format has no place for it.

use anyhow::{anyhow, bail, Context, Result};
use safetensors::{Dtype, SafeTensors};
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::Path;

use crate::linalg::{gaussian_orthonormal, orthonormalize};
use crate::util::rng::Rng;

/// A directions file larger than this is almost certainly something else (a model checkpoint):
/// 64 layers x 64 directions x 16384 wide in f32 is 268 MB.
const MAX_FILE_BYTES: u64 = 1 << 30;

/// The tensor-name prefix of one layer's directions in a safetensors file.
const LAYER_PREFIX: &str = "layer.";

/// The orthonormal directions ablated at one layer.
#[derive(Clone, Debug, PartialEq)]
pub struct DirectionSet {
    /// Decoder layer whose output (resid_post) is projected.
    pub layer: usize,
    /// Number of directions (rows of `q`).
    pub k: usize,
    /// Width of each direction (the model's `hidden_size`).
    pub d: usize,
    /// Row-major `[k, d]`, orthonormal rows (f32 rounded from an f64 Gram–Schmidt).
    pub q: Vec<f32>,
}

/// All ablation directions of one run, one set per layer.
#[derive(Clone, Debug, PartialEq)]
pub struct Directions {
    /// Sorted by `layer`, at most one set per layer.
    pub sets: Vec<DirectionSet>,
    /// Lowercase hex SHA-256 of the file bytes (of the serialised safetensors bytes for
    /// generated directions), so a run records exactly which directions it ablated.
    pub sha256: String,
    /// Where the directions came from: the file path, or `random(seed=..,k=..)`.
    pub source: String,
}

impl Directions {
    /// The ablated layers, ascending.
    pub fn layers(&self) -> Vec<usize> {
        self.sets.iter().map(|s| s.layer).collect()
    }

    /// The set ablated at `layer`, if any.
    pub fn get(&self, layer: usize) -> Option<&DirectionSet> {
        self.sets
            .binary_search_by_key(&layer, |s| s.layer)
            .ok()
            .map(|i| &self.sets[i])
    }

    /// Keep only `layers` (in any order, duplicates allowed). Every requested layer must be
    /// present; the hash still names the original file, and `source` records the selection.
    pub fn restrict(&self, layers: &[usize]) -> Result<Directions> {
        let mut wanted = layers.to_vec();
        wanted.sort_unstable();
        wanted.dedup();
        let mut sets = Vec::with_capacity(wanted.len());
        for &l in &wanted {
            match self.get(l) {
                Some(s) => sets.push(s.clone()),
                None => bail!(
                    "{}: no directions for layer {l}; the file has layers {:?}",
                    self.source,
                    self.layers()
                ),
            }
        }
        Ok(Directions {
            sets,
            sha256: self.sha256.clone(),
            source: format!("{} (layers {:?})", self.source, wanted),
        })
    }

    /// The safetensors bytes [`save_directions`] writes: one F32 tensor `layer.<L>` of shape
    /// `[k, d]` per set, and the `source` in the header metadata.
    pub fn to_safetensors_bytes(&self) -> Result<Vec<u8>> {
        let bytes: Vec<(String, Vec<u8>, Vec<usize>)> = self
            .sets
            .iter()
            .map(|s| {
                let b: Vec<u8> = s.q.iter().flat_map(|x| x.to_le_bytes()).collect();
                (format!("{LAYER_PREFIX}{}", s.layer), b, vec![s.k, s.d])
            })
            .collect();
        let mut views = Vec::with_capacity(bytes.len());
        for (name, b, shape) in &bytes {
            let v = safetensors::tensor::TensorView::new(Dtype::F32, shape.clone(), b)
                .map_err(|e| anyhow!("directions tensor `{name}`: {e}"))?;
            views.push((name.clone(), v));
        }
        // A single metadata key keeps the header (a JSON map) byte-for-byte deterministic.
        let meta = HashMap::from([("source".to_string(), self.source.clone())]);
        safetensors::serialize(views, Some(meta))
            .map_err(|e| anyhow!("serialising directions from {}: {e}", self.source))
    }
}

/// Validate one layer's raw rows and orthonormalise them. `what` names the file and tensor
/// for messages ("dirs.safetensors: tensor `layer.3`").
fn build_set(
    what: &str,
    layer: usize,
    rows: &[f64],
    k: usize,
    width: usize,
    d_model: usize,
    n_layers: usize,
) -> Result<DirectionSet> {
    if layer >= n_layers {
        bail!(
            "{what}: layer {layer} does not exist: the model has {n_layers} layers \
             (valid 0..{})",
            n_layers.saturating_sub(1)
        );
    }
    if width != d_model {
        bail!(
            "{what}: directions have width {width} but the model's hidden size (d_model) is \
             {d_model}; the file was probably made for another model"
        );
    }
    if k == 0 {
        bail!("{what}: has no rows (k = 0)");
    }
    if k >= d_model {
        bail!(
            "{what}: {k} directions for d_model = {d_model}; ablating that many would remove \
             (nearly) the whole residual stream (need k < d_model)"
        );
    }
    for (i, row) in rows.chunks_exact(width).enumerate() {
        if let Some(c) = row.iter().position(|x| !x.is_finite()) {
            bail!("{what}: row {i} column {c} is {} (NaN or Inf)", row[c]);
        }
    }
    let q = orthonormalize(rows, k, width).map_err(|e| anyhow!("{what}: {e}"))?;
    Ok(DirectionSet {
        layer,
        k,
        d: width,
        q: q.iter().map(|&x| x as f32).collect(),
    })
}

/// Read, validate and orthonormalise a directions file (see the module docs for formats).
///
/// `npy_layer` is the layer a `.npy` file applies to (required for `.npy`, refused for
/// `.safetensors`, whose tensor names carry their layers). `d_model` and `n_layers` are the
/// model's, so that a file made for another model is caught here rather than mid-training.
pub fn load_directions(
    path: &Path,
    npy_layer: Option<usize>,
    d_model: usize,
    n_layers: usize,
) -> Result<Directions> {
    let file = path.display().to_string();
    let len = std::fs::metadata(path)
        .with_context(|| format!("reading directions file {file}"))?
        .len();
    if len > MAX_FILE_BYTES {
        bail!(
            "{file}: {len} bytes is too large for a directions file (limit {MAX_FILE_BYTES}); \
             is this a model checkpoint?"
        );
    }
    let bytes = std::fs::read(path).with_context(|| format!("reading directions file {file}"))?;
    if bytes.is_empty() {
        bail!("{file}: the file is empty (no tensors)");
    }
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(|e| e.to_ascii_lowercase());
    let (sets, meta_source) = match ext.as_deref() {
        Some("npy") => {
            let layer = npy_layer.ok_or_else(|| {
                anyhow!(
                    "{file}: a .npy file holds one layer's directions but says not which; \
                     give the layer explicitly"
                )
            })?;
            (
                vec![load_npy(&file, &bytes, layer, d_model, n_layers)?],
                None,
            )
        }
        Some("safetensors") => {
            if let Some(l) = npy_layer {
                bail!(
                    "{file}: a layer ({l}) was given, but a .safetensors file names its layers \
                     in its tensor names (`{LAYER_PREFIX}<L>`); give no layer, or select \
                     layers after loading"
                );
            }
            load_safetensors(&file, &bytes, d_model, n_layers)?
        }
        _ => bail!(
            "{file}: unknown directions format; expected a .safetensors file (tensors \
             `{LAYER_PREFIX}<L>` of shape [k, d_model]) or a .npy file"
        ),
    };
    let source = match meta_source {
        Some(m) => format!("{file} [{m}]"),
        None => file,
    };
    Ok(Directions {
        sets,
        sha256: crate::io::sha256_hex(&bytes),
        source,
    })
}

/// Prefixes (followed by a layer index) of tensors that annotate directions and are skipped.
const ANNOTATIONS: &[&str] = &[
    "explained_variance.",
    "explained_variance_ratio.",
    "sae_latent.",
    "sae_score.",
];

/// Parse `layer.<L>` with `L` a canonical decimal (no sign, no leading zeros).
fn parse_layer_name(name: &str) -> Option<usize> {
    let digits = name.strip_prefix(LAYER_PREFIX)?;
    let ok = !digits.is_empty()
        && digits.bytes().all(|b| b.is_ascii_digit())
        && (digits == "0" || !digits.starts_with('0'));
    if ok {
        digits.parse().ok()
    } else {
        None
    }
}

fn load_safetensors(
    file: &str,
    bytes: &[u8],
    d_model: usize,
    n_layers: usize,
) -> Result<(Vec<DirectionSet>, Option<String>)> {
    let st = SafeTensors::deserialize(bytes)
        .map_err(|e| anyhow!("{file}: not a valid safetensors file: {e}"))?;
    let (_, meta) = SafeTensors::read_metadata(bytes)
        .map_err(|e| anyhow!("{file}: not a valid safetensors file: {e}"))?;
    let meta_source = meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get("source").cloned());
    let mut named: BTreeMap<usize, (String, safetensors::tensor::TensorView)> = BTreeMap::new();
    let mut bad: Vec<String> = Vec::new();
    for (name, view) in st.tensors() {
        match parse_layer_name(&name) {
            Some(l) => {
                named.insert(l, (name, view));
            }
            // Per-layer annotations that `caft-fast directions` writes beside the directions
            // (explained variance of PCA components, SAE latent indices and scores): not
            // directions, so a PCA or SAE output can be ablated as it is.
            None if ANNOTATIONS.iter().any(|p| {
                name.strip_prefix(p)
                    .is_some_and(|l| l.parse::<usize>().is_ok())
            }) => {}
            None => bad.push(name),
        }
    }
    if !bad.is_empty() {
        bad.sort();
        bail!(
            "{file}: unexpected tensor name(s) {}; a directions file holds only tensors named \
             `{LAYER_PREFIX}<L>` (L = decoder layer index, e.g. `{LAYER_PREFIX}12`) of shape \
             [k, d_model]",
            bad.iter()
                .map(|n| format!("`{n}`"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    if named.is_empty() {
        bail!("{file}: the file is empty (no tensors); expected tensors `{LAYER_PREFIX}<L>`");
    }
    let mut sets = Vec::with_capacity(named.len());
    for (layer, (name, view)) in named {
        let what = format!("{file}: tensor `{name}`");
        let (k, width) = match *view.shape() {
            [w] => (1, w),
            [k, w] => (k, w),
            ref s => bail!(
                "{what}: shape {s:?} has {} dimensions; expected [k, d_model] or [d_model]",
                s.len()
            ),
        };
        let rows = decode(&what, view.dtype(), view.data())?;
        sets.push(build_set(&what, layer, &rows, k, width, d_model, n_layers)?);
    }
    Ok((sets, meta_source))
}

/// Little-endian tensor bytes to f64 (exact for every accepted dtype).
fn decode(what: &str, dtype: Dtype, data: &[u8]) -> Result<Vec<f64>> {
    Ok(match dtype {
        Dtype::F32 => data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64)
            .collect(),
        Dtype::F64 => data
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
            .collect(),
        Dtype::F16 => data
            .chunks_exact(2)
            .map(|c| half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f64())
            .collect(),
        Dtype::BF16 => data
            .chunks_exact(2)
            .map(|c| half::bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f64())
            .collect(),
        other => bail!("{what}: dtype {other:?} is not supported; use F32, F16, BF16 or F64"),
    })
}

fn load_npy(
    file: &str,
    bytes: &[u8],
    layer: usize,
    d_model: usize,
    n_layers: usize,
) -> Result<DirectionSet> {
    let what = format!("{file}: array (layer {layer})");
    // (d_model,) is one direction, (k, d_model) k of them.
    let a = crate::io::npy::parse(file, bytes, 1..=2)?;
    let (k, width) = match a.shape[..] {
        [w] => (1, w),
        [k, w] => (k, w),
        _ => unreachable!("parse checked 1 or 2 dimensions"),
    };
    build_set(&what, layer, &a.data, k, width, d_model, n_layers)
}

/// Random orthonormal directions, the paper's control: ablating as many random directions as
/// chosen ones shows whether the effect comes from the concepts or from removing any subspace.
///
/// Each layer's rows are standard Gaussian (`Rng::normal`, so the span is uniformly
/// distributed) then orthonormalised. Each layer draws from its own generator seeded from
/// `(seed, layer)`, so a layer's directions do not depend on which other layers are asked for.
/// The hash is that of the safetensors bytes [`save_directions`] would write, so a saved copy
/// loads back with the same hash.
pub fn random_directions(
    seed: u64,
    k: usize,
    d_model: usize,
    layers: &[usize],
) -> Result<Directions> {
    if layers.is_empty() {
        bail!("random directions: no layers given");
    }
    if k == 0 || k >= d_model {
        bail!("random directions: k = {k} must satisfy 0 < k < d_model = {d_model}");
    }
    let mut sorted = layers.to_vec();
    sorted.sort_unstable();
    if let Some(w) = sorted.windows(2).find(|w| w[0] == w[1]) {
        bail!("random directions: layer {} is listed twice", w[0]);
    }
    let mut sets = Vec::with_capacity(sorted.len());
    for &layer in &sorted {
        // Hash (seed, layer) into an independent seed; Rng::new mixes it further.
        let layer_seed =
            Rng::new(seed ^ (layer as u64).wrapping_mul(0xD6E8_FEB8_6659_FD93)).next_u64();
        let q = gaussian_orthonormal(&mut Rng::new(layer_seed), k, d_model)
            .with_context(|| format!("random directions for layer {layer} (seed {seed})"))?;
        sets.push(DirectionSet {
            layer,
            k,
            d: d_model,
            q,
        });
    }
    let mut dirs = Directions {
        sets,
        sha256: String::new(),
        source: format!("random(seed={seed},k={k})"),
    };
    dirs.sha256 = crate::io::sha256_hex(&dirs.to_safetensors_bytes()?);
    Ok(dirs)
}

/// Write `dirs` as safetensors (`layer.<L>`, F32 `[k, d]`), atomically: the bytes go to a
/// temporary file in the same folder, which is then renamed over `path`, so a reader never sees
/// a half-written file.
pub fn save_directions(path: &Path, dirs: &Directions) -> Result<()> {
    let file = path.display().to_string();
    let bytes = dirs.to_safetensors_bytes()?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| anyhow!("{file}: not a file path"))?
        .to_string_lossy();
    let tmp = dir.join(format!(".{name}.tmp{}", std::process::id()));
    let write = || -> Result<()> {
        let mut f = std::fs::File::create(&tmp)
            .with_context(|| format!("creating temporary file {}", tmp.display()))?;
        f.write_all(&bytes)
            .with_context(|| format!("writing {}", tmp.display()))?;
        f.sync_all()
            .with_context(|| format!("flushing {}", tmp.display()))?;
        std::fs::rename(&tmp, path)
            .with_context(|| format!("renaming {} to {file}", tmp.display()))?;
        Ok(())
    };
    write().inspect_err(|_| {
        // Best effort: the write already failed and that error is the one to report.
        let _ = std::fs::remove_file(&tmp);
    })
}
