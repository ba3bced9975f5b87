//! f64 linear algebra for PCA: one GEMM wrapper, a streaming covariance, and the top
//! eigenpairs of a symmetric matrix.
//!
//! - [`Covariance`] accumulates the mean and the centred scatter matrix `M2 = Σ (x-μ)(x-μ)ᵀ`
//!   of a stream of rows in chunks, merging chunks by Chan et al.'s update
//!   `M2 = M2_a + M2_b + δδᵀ·n_a·n_b/n` with `δ = μ_b - μ_a`. Each chunk is centred on its own
//!   mean before its `Xᵀ X`, so the result does not suffer the cancellation of
//!   `Σ x xᵀ - n μ μᵀ` when the mean is large next to the spread.
//! - [`top_eigenpairs`]: cyclic Jacobi (exact to rounding, O(d³) per sweep) up to
//!   [`JACOBI_MAX_DIM`]; above it, block subspace iteration with a Rayleigh–Ritz step every
//!   iteration (one `C·Q` GEMM of `d x d` by `d x p` per iteration, `p ≈ 2k + 8`).

use anyhow::{bail, Result};

/// Largest matrix solved by full Jacobi; larger ones use subspace iteration.
pub const JACOBI_MAX_DIM: usize = 192;

/// The element types [`gemm`] multiplies (those the gemm crate has kernels for).
pub trait GemmFloat: Copy + Default + 'static {
    const ONE: Self;
}
impl GemmFloat for f32 {
    const ONE: f32 = 1.0;
}
impl GemmFloat for f64 {
    const ONE: f64 = 1.0;
}

/// `dst[m, n] = (accumulate ? dst : 0) + A[m, k] · B[k, n]`, every matrix addressed by
/// element strides `(row stride, column stride)`, `dst` row-major with row stride `n`.
#[allow(clippy::too_many_arguments)]
pub fn gemm<T: GemmFloat>(
    dst: &mut [T],
    a: &[T],
    (a_rs, a_cs): (usize, usize),
    b: &[T],
    (b_rs, b_cs): (usize, usize),
    m: usize,
    n: usize,
    k: usize,
    accumulate: bool,
) {
    let span = |rows: usize, cols: usize, rs: usize, cs: usize| {
        if rows == 0 || cols == 0 {
            0
        } else {
            (rows - 1) * rs + (cols - 1) * cs + 1
        }
    };
    assert!(dst.len() >= m * n, "gemm: destination too short");
    assert!(a.len() >= span(m, k, a_rs, a_cs), "gemm: A too short");
    assert!(b.len() >= span(k, n, b_rs, b_cs), "gemm: B too short");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            dst[..m * n].fill(T::default());
        }
        return;
    }
    let par = match rayon::current_num_threads() {
        0 | 1 => gemm::Parallelism::None,
        t => gemm::Parallelism::Rayon(t),
    };
    // SAFETY: the three regions were bounds-checked above against their slices, `dst` is
    // borrowed mutably so nothing else touches it, and strides fit in isize because every
    // region lies inside one allocation. `gemm` computes dst = 1·dst + 1·A·B and reads dst
    // only when `accumulate` (read_dst) is true.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.as_ptr(),
            a_cs as isize,
            a_rs as isize,
            b.as_ptr(),
            b_cs as isize,
            b_rs as isize,
            T::ONE,
            T::ONE,
            false,
            false,
            false,
            par,
        )
    }
}

/// Running mean and centred scatter matrix of `d`-wide rows.
#[derive(Clone, Debug)]
pub struct Covariance {
    pub d: usize,
    /// Rows seen.
    pub n: u64,
    pub mean: Vec<f64>,
    /// `Σ (x-μ)(x-μ)ᵀ`, row-major `[d, d]`.
    pub m2: Vec<f64>,
}

impl Covariance {
    pub fn new(d: usize) -> Self {
        Covariance {
            d,
            n: 0,
            mean: vec![0.0; d],
            m2: vec![0.0; d * d],
        }
    }

    /// Add a chunk of rows (row-major `[rows, d]`).
    pub fn add_rows(&mut self, rows: &[f64]) {
        let d = self.d;
        assert_eq!(
            rows.len() % d.max(1),
            0,
            "Covariance::add_rows: ragged rows"
        );
        let nb = rows.len() / d.max(1);
        if nb == 0 {
            return;
        }
        let mut mu_b = vec![0.0; d];
        for r in rows.chunks_exact(d) {
            for (m, x) in mu_b.iter_mut().zip(r) {
                *m += x;
            }
        }
        mu_b.iter_mut().for_each(|m| *m /= nb as f64);
        let centred: Vec<f64> = rows
            .chunks_exact(d)
            .flat_map(|r| r.iter().zip(&mu_b).map(|(x, m)| x - m))
            .collect();
        let (na, nbf) = (self.n as f64, nb as f64);
        let n = na + nbf;
        // Chan's merge: the cross term first (it uses the old mean), then XcᵀXc added by GEMM.
        if self.n > 0 {
            let delta: Vec<f64> = mu_b.iter().zip(&self.mean).map(|(b, a)| b - a).collect();
            let w = na * nbf / n;
            for (i, row) in self.m2.chunks_exact_mut(d).enumerate() {
                let di = delta[i] * w;
                for (v, dj) in row.iter_mut().zip(&delta) {
                    *v += di * dj;
                }
            }
        }
        // m2[d, d] += Xcᵀ[d, nb] · Xc[nb, d]; Xcᵀ is Xc read with swapped strides.
        gemm(
            &mut self.m2,
            &centred,
            (1, d),
            &centred,
            (d, 1),
            d,
            d,
            nb,
            true,
        );
        for (m, b) in self.mean.iter_mut().zip(&mu_b) {
            *m += (b - *m) * nbf / n;
        }
        self.n += nb as u64;
    }

    /// The sample covariance `M2 / (n - 1)` (the unbiased estimate, as `numpy.cov` and
    /// scikit-learn's `explained_variance_` use), symmetrised against rounding.
    pub fn covariance(&self) -> Vec<f64> {
        let d = self.d;
        let s = 1.0 / (self.n.saturating_sub(1).max(1)) as f64;
        let mut c = vec![0.0; d * d];
        for i in 0..d {
            for j in 0..d {
                c[i * d + j] = 0.5 * (self.m2[i * d + j] + self.m2[j * d + i]) * s;
            }
        }
        c
    }
}

/// Eigenpairs of a symmetric matrix, largest eigenvalue first.
#[derive(Clone, Debug)]
pub struct Eigen {
    pub values: Vec<f64>,
    /// Row-major `[k, d]`: row `i` is the unit eigenvector of `values[i]`.
    pub vectors: Vec<f64>,
    /// Subspace iterations used (0 for Jacobi).
    pub iterations: usize,
    /// Largest residual `|C v - λ v|` of the returned pairs, relative to the largest `|λ|`.
    pub residual: f64,
}

/// All eigenpairs of the symmetric `[n, n]` matrix `a` by cyclic Jacobi, largest first.
///
/// Each rotation in the `(p, q)` plane zeroes `a_pq` with `t = tan φ` the smaller root of
/// `t² + 2θt - 1 = 0`, `θ = (a_qq - a_pp) / (2 a_pq)`; sweeps repeat until the off-diagonal
/// mass is below `1e-30` of the total (quadratic convergence makes that a handful of sweeps).
pub fn jacobi_eigh(a: &[f64], n: usize) -> Result<Eigen> {
    assert_eq!(a.len(), n * n, "jacobi_eigh: matrix is not n x n");
    if let Some(i) = a.iter().position(|x| !x.is_finite()) {
        bail!(
            "matrix entry ({}, {}) is {} (NaN or Inf)",
            i / n.max(1),
            i % n.max(1),
            a[i]
        );
    }
    let mut a = a.to_vec();
    // Columns of v are the eigenvectors: A = V Λ Vᵀ.
    let mut v = vec![0.0; n * n];
    for i in 0..n {
        v[i * n + i] = 1.0;
    }
    let total: f64 = a.iter().map(|x| x * x).sum();
    for _sweep in 0..64 {
        let mut off = 0.0;
        for p in 0..n {
            for q in p + 1..n {
                off += 2.0 * a[p * n + q] * a[p * n + q];
            }
        }
        if off <= 1e-30 * total || off == 0.0 {
            break;
        }
        for p in 0..n {
            for q in p + 1..n {
                let apq = a[p * n + q];
                if apq == 0.0 {
                    continue;
                }
                let theta = (a[q * n + q] - a[p * n + p]) / (2.0 * apq);
                let t = if theta.abs() > 1e150 {
                    0.5 / theta
                } else {
                    theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt())
                };
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                // A <- A P (columns p, q), then A <- Pᵀ A (rows p, q); V <- V P.
                for k in 0..n {
                    let (akp, akq) = (a[k * n + p], a[k * n + q]);
                    a[k * n + p] = c * akp - s * akq;
                    a[k * n + q] = s * akp + c * akq;
                }
                for k in 0..n {
                    let (apk, aqk) = (a[p * n + k], a[q * n + k]);
                    a[p * n + k] = c * apk - s * aqk;
                    a[q * n + k] = s * apk + c * aqk;
                }
                for k in 0..n {
                    let (vkp, vkq) = (v[k * n + p], v[k * n + q]);
                    v[k * n + p] = c * vkp - s * vkq;
                    v[k * n + q] = s * vkp + c * vkq;
                }
            }
        }
    }
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&i, &j| a[j * n + j].total_cmp(&a[i * n + i]));
    let values: Vec<f64> = order.iter().map(|&i| a[i * n + i]).collect();
    let mut vectors = vec![0.0; n * n];
    for (r, &i) in order.iter().enumerate() {
        for k in 0..n {
            vectors[r * n + k] = v[k * n + i];
        }
    }
    Ok(Eigen {
        values,
        vectors,
        iterations: 0,
        residual: 0.0,
    })
}

/// Orthonormalise the columns of `x: [d, p]` (row-major) in place by modified Gram–Schmidt,
/// twice. A column that vanishes (the block lost rank) is replaced by a fresh random one.
fn orthonormalize_columns(x: &mut [f64], d: usize, p: usize, rng: &mut crate::util::rng::Rng) {
    for j in 0..p {
        for _pass in 0..2 {
            for i in 0..j {
                let dot: f64 = (0..d).map(|r| x[r * p + i] * x[r * p + j]).sum();
                for r in 0..d {
                    x[r * p + j] -= dot * x[r * p + i];
                }
            }
        }
        let norm = (0..d)
            .map(|r| x[r * p + j] * x[r * p + j])
            .sum::<f64>()
            .sqrt();
        if norm < 1e-150 {
            for r in 0..d {
                x[r * p + j] = rng.normal();
            }
            // Retry this column against the earlier ones.
            for i in 0..j {
                let dot: f64 = (0..d).map(|r| x[r * p + i] * x[r * p + j]).sum();
                for r in 0..d {
                    x[r * p + j] -= dot * x[r * p + i];
                }
            }
            let n2 = (0..d)
                .map(|r| x[r * p + j] * x[r * p + j])
                .sum::<f64>()
                .sqrt();
            for r in 0..d {
                x[r * p + j] /= n2;
            }
        } else {
            for r in 0..d {
                x[r * p + j] /= norm;
            }
        }
    }
}

/// Iteration cap of the subspace iteration.
pub const MAX_SUBSPACE_ITERS: usize = 3000;
/// Converged when every returned pair has `|C v - λ v| <= SUBSPACE_TOL · |λ_1|`. The
/// eigenvector error is then at most `SUBSPACE_TOL · |λ_1| / gap` (Davis–Kahan).
pub const SUBSPACE_TOL: f64 = 1e-11;

/// The top `k` eigenpairs of the symmetric `[d, d]` matrix `c` by block subspace iteration:
/// `Q = orth(Y)`, `Z = C Q`, `H = Qᵀ Z` (Rayleigh–Ritz), `H = W Θ Wᵀ` (Jacobi), `X = Q W`,
/// `Y = C X = Z W`. The block has `p = min(d, 2k + 8)` columns; the error in eigenvector `i`
/// shrinks by `λ_{p+1} / λ_i` per iteration. Seeded, so results repeat exactly.
pub fn subspace_eigh(c: &[f64], d: usize, k: usize, seed: u64) -> Result<Eigen> {
    assert_eq!(c.len(), d * d, "subspace_eigh: matrix is not d x d");
    let p = (2 * k + 8).min(d);
    let mut rng = crate::util::rng::Rng::new(seed);
    let mut y: Vec<f64> = (0..d * p).map(|_| rng.normal()).collect();
    let mut z = vec![0.0; d * p];
    let mut x = vec![0.0; d * p];
    let mut theta = vec![0.0; p];
    let mut worst = f64::INFINITY;
    let mut iters = 0;
    while iters < MAX_SUBSPACE_ITERS {
        iters += 1;
        orthonormalize_columns(&mut y, d, p, &mut rng);
        // Z = C Q.
        gemm(&mut z, c, (d, 1), &y, (p, 1), d, p, d, false);
        // H = Qᵀ Z, symmetrised.
        let mut h = vec![0.0; p * p];
        gemm(&mut h, &y, (1, p), &z, (p, 1), p, p, d, false);
        for i in 0..p {
            for j in 0..i {
                let s = 0.5 * (h[i * p + j] + h[j * p + i]);
                h[i * p + j] = s;
                h[j * p + i] = s;
            }
        }
        let e = jacobi_eigh(&h, p)?;
        theta.copy_from_slice(&e.values);
        // W: columns = Ritz vectors of H; e.vectors rows are them, so W = e.vectorsᵀ.
        // X = Q W and Y = Z W (= C X).
        gemm(&mut x, &y, (p, 1), &e.vectors, (1, p), d, p, p, false);
        let mut y_next = vec![0.0; d * p];
        gemm(&mut y_next, &z, (p, 1), &e.vectors, (1, p), d, p, p, false);
        let scale = theta.iter().fold(0.0f64, |m, t| m.max(t.abs())).max(1e-300);
        worst = 0.0;
        for (i, th) in theta.iter().enumerate().take(k) {
            let r: f64 = (0..d)
                .map(|row| {
                    let e = y_next[row * p + i] - th * x[row * p + i];
                    e * e
                })
                .sum::<f64>()
                .sqrt();
            worst = worst.max(r / scale);
        }
        y = y_next;
        if worst <= SUBSPACE_TOL || theta[0] == 0.0 {
            break;
        }
    }
    let mut vectors = vec![0.0; k * d];
    for i in 0..k {
        for row in 0..d {
            vectors[i * d + row] = x[row * p + i];
        }
    }
    Ok(Eigen {
        values: theta[..k].to_vec(),
        vectors,
        iterations: iters,
        residual: worst,
    })
}

/// The top `k` eigenpairs of the symmetric `[d, d]` matrix `c`, largest first: Jacobi for
/// `d <= JACOBI_MAX_DIM`, subspace iteration above. Each vector's sign is fixed so that its
/// largest-magnitude entry is positive, so runs and machines agree.
pub fn top_eigenpairs(c: &[f64], d: usize, k: usize) -> Result<Eigen> {
    if k == 0 || k > d {
        bail!("asked for {k} eigenpairs of a {d} x {d} matrix (need 1..={d})");
    }
    if let Some(i) = c.iter().position(|x| !x.is_finite()) {
        bail!(
            "covariance entry ({}, {}) is {} (NaN or Inf in the activations?)",
            i / d,
            i % d,
            c[i]
        );
    }
    let mut e = if d <= JACOBI_MAX_DIM {
        let mut e = jacobi_eigh(c, d)?;
        e.values.truncate(k);
        e.vectors.truncate(k * d);
        e
    } else {
        subspace_eigh(c, d, k, 0x5EED_5CA1)?
    };
    for v in e.vectors.chunks_exact_mut(d) {
        let big = v
            .iter()
            .copied()
            .fold(0.0f64, |m, x| if x.abs() > m.abs() { x } else { m });
        if big < 0.0 {
            v.iter_mut().for_each(|x| *x = -*x);
        }
    }
    Ok(e)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::rng::Rng;

    /// A symmetric `[d, d]` matrix `U diag(λ) Uᵀ` with a random orthonormal `U` and the given
    /// spectrum (padded with small values), returned with `U`'s rows as eigenvectors.
    fn planted(d: usize, spectrum: &[f64], seed: u64) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        let mut rng = Rng::new(seed);
        let rows: Vec<f64> = (0..d * d).map(|_| rng.normal()).collect();
        let u = crate::linalg::orthonormalize(&rows, d, d).unwrap();
        let lam: Vec<f64> = (0..d)
            .map(|i| {
                spectrum
                    .get(i)
                    .copied()
                    .unwrap_or(0.01 * (d - i) as f64 / d as f64)
            })
            .collect();
        let mut c = vec![0.0; d * d];
        for (l, ui) in lam.iter().zip(u.chunks_exact(d)) {
            for a in 0..d {
                for b in 0..d {
                    c[a * d + b] += l * ui[a] * ui[b];
                }
            }
        }
        (c, u, lam)
    }

    fn check(e: &Eigen, u: &[f64], lam: &[f64], d: usize, k: usize, tol: f64) {
        for i in 0..k {
            let rel = (e.values[i] - lam[i]).abs() / lam[0];
            assert!(
                rel <= tol,
                "eigenvalue {i}: {} vs {} ({rel:e})",
                e.values[i],
                lam[i]
            );
            let dot: f64 = (0..d).map(|j| e.vectors[i * d + j] * u[i * d + j]).sum();
            assert!(
                dot.abs() >= 1.0 - tol,
                "eigenvector {i}: |cos| = {} (1 - {:e})",
                dot.abs(),
                1.0 - dot.abs()
            );
        }
    }

    /// Jacobi on a 40 x 40 matrix with distinct eigenvalues recovers them to 1e-12 (rounding
    /// of a well-conditioned O(d³) algorithm in f64 is ~d·1e-16).
    #[test]
    fn jacobi_recovers_a_planted_spectrum() {
        let d = 40;
        let spectrum: Vec<f64> = (0..d).map(|i| 10.0 * 0.8f64.powi(i as i32)).collect();
        let (c, u, lam) = planted(d, &spectrum, 1);
        let e = jacobi_eigh(&c, d).unwrap();
        check(&e, &u, &lam, d, d, 1e-12);
    }

    /// Subspace iteration on a 300 x 300 matrix (above the Jacobi limit) finds the top 6 pairs
    /// to 1e-9: the residual bound 1e-11·λ₁ over the smallest gap (0.1 of λ₁ here) bounds the
    /// vector error by 1e-10; eigenvalue errors are quadratic in it.
    #[test]
    fn subspace_iteration_matches_the_planted_top_pairs() {
        let d = 300;
        let spectrum = [5.0, 4.5, 4.0, 3.5, 3.0, 2.5, 0.5, 0.4];
        let (c, u, lam) = planted(d, &spectrum, 2);
        let e = top_eigenpairs(&c, d, 6).unwrap();
        assert!(e.iterations > 0, "the subspace path ran");
        check(&e, &u, &lam, d, 6, 1e-9);
    }

    /// The streaming covariance over uneven chunks equals the two-pass formula on all rows to
    /// 1e-9, with means up to 6e4 and unit spread. Bound: the inputs carry rounding of
    /// ulp(6e4) ≈ 7e-12, which after centring reaches each product; summed over n = 103 rows
    /// (random signs, ~√n) and divided by n-1 that is ~1e-11, so 1e-9 leaves margin. The
    /// one-pass `(Σxxᵀ - nμμᵀ)/(n-1)` would be off by ~ulp(n·3.6e9)/n ≈ 1e-6 and fail.
    #[test]
    fn chunked_covariance_equals_two_pass() {
        let (d, n) = (7, 103);
        let mut rng = Rng::new(3);
        let rows: Vec<f64> = (0..n * d)
            .map(|i| 1e4 * (i % d) as f64 + rng.normal())
            .collect();
        let mut cov = Covariance::new(d);
        let mut start = 0;
        for len in [1, 5, 30, 0, 67] {
            cov.add_rows(&rows[start * d..(start + len) * d]);
            start += len;
        }
        assert_eq!(cov.n as usize, n);
        let mean: Vec<f64> = (0..d)
            .map(|j| (0..n).map(|i| rows[i * d + j]).sum::<f64>() / n as f64)
            .collect();
        let c = cov.covariance();
        for a in 0..d {
            for b in 0..d {
                let r: f64 = (0..n)
                    .map(|i| (rows[i * d + a] - mean[a]) * (rows[i * d + b] - mean[b]))
                    .sum::<f64>()
                    / (n - 1) as f64;
                assert!(
                    (c[a * d + b] - r).abs() <= 1e-9,
                    "({a},{b}): {} vs {r}",
                    c[a * d + b]
                );
            }
        }
    }
}
