//! Orthonormal bases in f64: modified Gram–Schmidt for given rows, and random orthonormal rows
//! (the random-direction control, and test inputs of every ablation kernel).

use crate::util::rng::Rng;
use anyhow::{anyhow, bail, Result};

/// A row whose norm after removing its components along the previous rows is below this
/// fraction of its original norm lies (numerically) in their span.
const DEPENDENCE_TOL: f64 = 1e-6;

/// Orthonormalise the rows of `rows` (row-major `[k, d]`) by modified Gram–Schmidt with one
/// re-orthogonalisation pass, in f64.
///
/// Row `i` of the result spans the same space as input rows `0..=i`. A single MGS pass loses
/// orthogonality in proportion to the condition number of the input; the second pass
/// ("twice is enough") brings `|QQᵀ - I|` back to a few ulps for any input that passes the
/// dependence test. Row `i` is rejected as linearly dependent when the norm left after both
/// passes is below `1e-6` of its original norm. Each row is first scaled by its largest
/// magnitude so that norms neither overflow nor underflow whatever the input's scale.
pub fn orthonormalize(rows: &[f64], k: usize, d: usize) -> Result<Vec<f64>> {
    if d == 0 {
        bail!("directions have width 0");
    }
    if k == 0 {
        bail!("no directions (k = 0)");
    }
    let want = k
        .checked_mul(d)
        .ok_or_else(|| anyhow!("{k} x {d} directions overflow the address space"))?;
    if rows.len() != want {
        bail!(
            "{} values given for {k} directions of width {d} (expected {want})",
            rows.len()
        );
    }
    if k > d {
        bail!("{k} directions of width {d} cannot be linearly independent (need k <= d)");
    }
    let mut q = vec![0.0f64; want];
    for i in 0..k {
        let src = &rows[i * d..(i + 1) * d];
        if let Some(c) = src.iter().position(|x| !x.is_finite()) {
            bail!("row {i} column {c} is not finite ({})", src[c]);
        }
        let scale = src.iter().fold(0.0f64, |m, x| m.max(x.abs()));
        if scale == 0.0 {
            bail!("row {i} is all zeros");
        }
        let mut v: Vec<f64> = src.iter().map(|x| x / scale).collect();
        let norm0 = norm(&v);
        let (done, rest) = q.split_at_mut(i * d);
        for _pass in 0..2 {
            // v <- v - (q_j · v) q_j for each earlier row, using the updated v (MGS).
            for qj in done.chunks_exact(d) {
                let c = dot(qj, &v);
                for (vx, qx) in v.iter_mut().zip(qj) {
                    *vx -= c * qx;
                }
            }
        }
        let left = norm(&v);
        if left < DEPENDENCE_TOL * norm0 {
            bail!(
                "row {i} is linearly dependent on rows 0..{i}: only {:.3e} of its norm lies \
                 outside their span (threshold {DEPENDENCE_TOL:e})",
                left / norm0
            );
        }
        for (o, x) in rest[..d].iter_mut().zip(&v) {
            *o = x / left;
        }
    }
    Ok(q)
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn norm(a: &[f64]) -> f64 {
    dot(a, a).sqrt()
}

/// `k` random orthonormal rows of width `d` (row-major, f32): standard Gaussian rows, whose span
/// is uniformly distributed, through [`orthonormalize`].
pub fn gaussian_orthonormal(rng: &mut Rng, k: usize, d: usize) -> Result<Vec<f32>> {
    let rows: Vec<f64> = (0..k * d).map(|_| rng.normal()).collect();
    Ok(orthonormalize(&rows, k, d)?
        .into_iter()
        .map(|x| x as f32)
        .collect())
}
