//! Ablation files from chosen principal components, random controls, and directions made by
//! other tools.
//!
//! Every output is a directions file `train --ablate` reads: tensors `layer.<L>` F32
//! `[k, d_model]`, written atomically by `model::ablation::save_directions`.

use crate::io::read_f32_safetensors;
use crate::linalg::orthonormalize;
use crate::model::ablation::{DirectionSet, Directions};
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::path::Path;

/// `--pick 10:0,12`: the components (rows) to keep at one layer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pick {
    pub layer: usize,
    pub rows: Vec<usize>,
}

/// Parse `L:i,j,...` where each item is a row index or an inclusive range `a-b`.
pub fn parse_pick(s: &str) -> Result<Pick> {
    let what = || format!("--pick {s:?}");
    let (l, rows) = s.split_once(':').with_context(|| {
        format!(
            "{}: expected LAYER:ROWS, e.g. 10:0,12 (rows 0 and 12 of layer 10) or 20:0-4",
            what()
        )
    })?;
    let layer: usize = l
        .trim()
        .parse()
        .with_context(|| format!("{}: layer {l:?} is not a number", what()))?;
    let mut out = Vec::new();
    for item in rows.split(',').map(str::trim) {
        if item.is_empty() {
            bail!("{}: empty row index", what());
        }
        let num = |t: &str| -> Result<usize> {
            t.trim()
                .parse()
                .with_context(|| format!("{}: row {t:?} is not a number", what()))
        };
        match item.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (num(a)?, num(b)?);
                if b < a {
                    bail!("{}: range {item} runs backwards", what());
                }
                out.extend(a..=b);
            }
            None => out.push(num(item)?),
        }
    }
    let mut sorted = out.clone();
    sorted.sort_unstable();
    if let Some(w) = sorted.windows(2).find(|w| w[0] == w[1]) {
        bail!("{}: row {} is picked twice", what(), w[0]);
    }
    Ok(Pick { layer, rows: out })
}

/// Parse `layer.<L>` (canonical decimal).
fn layer_of(name: &str) -> Option<usize> {
    let digits = name.strip_prefix("layer.")?;
    let ok = !digits.is_empty()
        && digits.bytes().all(|b| b.is_ascii_digit())
        && (digits == "0" || !digits.starts_with('0'));
    ok.then(|| digits.parse().ok()).flatten()
}

/// Keep exactly the picked rows (bit for bit, in the order given) of the `layer.<L>` tensors
/// of `from` (a `directions pca` output or any directions file).
pub fn select(from: &Path, picks: &[Pick]) -> Result<Directions> {
    let file = from.display().to_string();
    if picks.is_empty() {
        bail!("nothing picked: give --pick LAYER:ROWS (e.g. --pick 10:0,12 20:3)");
    }
    let tensors = read_f32_safetensors(from)?;
    let layers: BTreeMap<usize, &(Vec<usize>, Vec<f32>)> = tensors
        .iter()
        .filter_map(|(n, t)| layer_of(n).map(|l| (l, t)))
        .collect();
    if layers.is_empty() {
        bail!("{file}: no `layer.<L>` tensors (is this a directions or PCA file?)");
    }
    let mut seen = std::collections::BTreeSet::new();
    let mut sets = Vec::with_capacity(picks.len());
    for p in picks {
        if !seen.insert(p.layer) {
            bail!(
                "layer {} is picked twice; list all its rows in one pick ({}:a,b,...)",
                p.layer,
                p.layer
            );
        }
        let Some((shape, data)) = layers.get(&p.layer) else {
            bail!(
                "{file}: no components for layer {}; the file has layers {:?}",
                p.layer,
                layers.keys().collect::<Vec<_>>()
            );
        };
        let (k, d) = match shape.as_slice() {
            [d] => (1, *d),
            [k, d] => (*k, *d),
            s => bail!(
                "{file}: tensor `layer.{}` has shape {s:?}; expected [k, d]",
                p.layer
            ),
        };
        if let Some(&r) = p.rows.iter().find(|&&r| r >= k) {
            bail!(
                "{file}: layer {} has {k} components (rows 0..{}); row {r} does not exist",
                p.layer,
                k - 1
            );
        }
        if p.rows.len() >= d {
            bail!(
                "layer {}: {} rows picked for d_model = {d}; that would ablate the whole \
                 residual stream",
                p.layer,
                p.rows.len()
            );
        }
        let mut q = Vec::with_capacity(p.rows.len() * d);
        for &r in &p.rows {
            q.extend_from_slice(&data[r * d..(r + 1) * d]);
        }
        sets.push(DirectionSet {
            layer: p.layer,
            k: p.rows.len(),
            d,
            q,
        });
    }
    sets.sort_by_key(|s| s.layer);
    let desc: Vec<String> = picks
        .iter()
        .map(|p| {
            let r: Vec<String> = p.rows.iter().map(|r| r.to_string()).collect();
            format!("{}:{}", p.layer, r.join(","))
        })
        .collect();
    finish(sets, format!("{file} picks {}", desc.join(" ")))
}

/// Fill in the hash of the bytes `save_directions` will write.
fn finish(sets: Vec<DirectionSet>, source: String) -> Result<Directions> {
    let mut dirs = Directions {
        sets,
        sha256: String::new(),
        source,
    };
    dirs.sha256 = crate::io::sha256_hex(&dirs.to_safetensors_bytes()?);
    Ok(dirs)
}

/// Check layers against the model, when one is known.
fn check_layers(
    sets: &[DirectionSet],
    d_model: Option<usize>,
    n_layers: Option<usize>,
) -> Result<()> {
    for s in sets {
        if let Some(n) = n_layers {
            if s.layer >= n {
                bail!(
                    "layer {} does not exist: the model has {n} layers (0..{})",
                    s.layer,
                    n.saturating_sub(1)
                );
            }
        }
        if let Some(d) = d_model {
            if s.d != d {
                bail!(
                    "layer {}: directions have width {} but the model's d_model is {d}",
                    s.layer,
                    s.d
                );
            }
        }
    }
    Ok(())
}

/// Import the tensors of a safetensors file whose names match `pattern` (one `{L}` standing
/// for the layer index, e.g. `blocks.{L}.dir`), each `[k, d]` or `[d]`, orthonormalised in f64
/// (only the span is ablated). Other tensors are ignored; no match is an error.
pub fn import_renamed(
    from: &Path,
    pattern: &str,
    d_model: Option<usize>,
    n_layers: Option<usize>,
) -> Result<Directions> {
    let file = from.display().to_string();
    let (pre, post) = match pattern.split_once("{L}") {
        Some((a, b)) if !b.contains("{L}") => (a, b),
        _ => bail!(
            "--rename {pattern:?} must contain `{{L}}` exactly once where the layer index is \
             (e.g. 'blocks.{{L}}.dir')"
        ),
    };
    let tensors = read_f32_safetensors(from)?;
    let mut sets = Vec::new();
    for (name, (shape, data)) in &tensors {
        let Some(mid) = name.strip_prefix(pre).and_then(|r| r.strip_suffix(post)) else {
            continue;
        };
        let Ok(layer) = mid.parse::<usize>() else {
            continue;
        };
        if !mid.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let what = format!("{file}: tensor `{name}`");
        let (k, d) = match shape.as_slice() {
            [d] => (1, *d),
            [k, d] => (*k, *d),
            s => bail!("{what}: shape {s:?}; expected [k, d_model] or [d_model]"),
        };
        if k == 0 || k >= d {
            bail!("{what}: {k} directions of width {d}; need 0 < k < d_model");
        }
        if let Some(i) = data.iter().position(|x| !x.is_finite()) {
            bail!(
                "{what}: row {} column {} is {} (NaN or Inf)",
                i / d,
                i % d,
                data[i]
            );
        }
        let rows: Vec<f64> = data.iter().map(|&x| x as f64).collect();
        let q = orthonormalize(&rows, k, d).with_context(|| what.clone())?;
        if sets.iter().any(|s: &DirectionSet| s.layer == layer) {
            bail!("{what}: a second tensor for layer {layer} (names differ only in zeros?)");
        }
        sets.push(DirectionSet {
            layer,
            k,
            d,
            q: q.iter().map(|&x| x as f32).collect(),
        });
    }
    if sets.is_empty() {
        let some: Vec<&String> = tensors.keys().take(5).collect();
        bail!("{file}: no tensor name matches {pattern:?} (the file has e.g. {some:?})");
    }
    sets.sort_by_key(|s| s.layer);
    check_layers(&sets, d_model, n_layers)?;
    finish(sets, format!("{file} renamed from {pattern}"))
}
