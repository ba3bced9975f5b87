//! The fused residual + ablation + rmsnorm: the CPU side of `Backend::residual_ablate_norm`.
//!
//! Forward, per token row (`d` wide), with directions `Q: [k, d]` (orthonormal rows):
//!   s = a + b;   c = Q s;   s <- s - Qᵀ c;   resid = s;
//!   r = (mean(s²) + eps)^(-1/2);   normed = (s · r) ⊙ w.
//! Backward, with `y = w ⊙ s · r` and the incoming `g = dnormed`, `t = dresid`:
//!   ds = r (w ⊙ g) - s · r³/d · Σ_j w_j g_j s_j          (rmsnorm backward)
//!   dresid <- P (t + ds),   P = I - QᵀQ                    (the projection is symmetric)
//! The projection's dot products, the mean of squares and `Σ w g s` accumulate in f64, and the
//! projected row is formed in f64 before rounding once, so `|Q resid|` ends at f32 rounding.
//! Rows are independent: one rayon task per block of rows, one f64 scratch row per task.

use super::check_len;
use super::simd::{dot3_f64, dot_f64, dot_f64_mixed, multiversion};
use rayon::prelude::*;

/// Rows per rayon task: enough work per task to amortise scheduling (d ~ 500..8000).
const MIN_ROWS: usize = 8;

/// `t <- t - Qᵀ(Q t)` on one f64 row, `Q: [k, d]` f32 row-major.
#[inline(always)]
fn project_out(t: &mut [f64], q: &[f32], k: usize) {
    let d = t.len();
    for j in 0..k {
        let qj = &q[j * d..(j + 1) * d];
        // Rows are orthonormal, so subtracting each component in turn equals Qᵀ(Q t); doing it
        // sequentially (modified Gram–Schmidt) is also the more accurate order.
        let c = dot_f64_mixed(t, qj);
        for (ti, qi) in t.iter_mut().zip(qj) {
            *ti -= c * *qi as f64;
        }
    }
}

multiversion! {
    /// One row of the forward: `resid`, `normed` written, `rstd` returned.
    #[allow(clippy::too_many_arguments)]
    fn fwd_row(
        resid: &mut [f32],
        normed: &mut [f32],
        a: &[f32],
        b: Option<&[f32]>,
        q: Option<(&[f32], usize)>,
        w: &[f32],
        eps: f32,
        scratch: &mut Vec<f64>,
    ) -> f32 {
        let d = resid.len();
        match b {
            Some(b) => {
                // The residual add itself is f32, as in the reference model.
                for ((s, x), y) in resid.iter_mut().zip(a).zip(b) {
                    *s = x + y;
                }
            }
            None => resid.copy_from_slice(a),
        }
        if let Some((q, k)) = q {
            scratch.clear();
            scratch.extend(resid.iter().map(|v| *v as f64));
            project_out(scratch, q, k);
            for (s, t) in resid.iter_mut().zip(scratch.iter()) {
                *s = *t as f32;
            }
        }
        let ms = dot_f64(resid, resid) / d as f64;
        let r = (1.0 / (ms + eps as f64).sqrt()) as f32;
        for ((o, s), wi) in normed.iter_mut().zip(resid.iter()).zip(w) {
            *o = (s * r) * wi;
        }
        r
    }
}

multiversion! {
    /// One row of the backward, in place on `dresid`.
    fn bwd_row(
        dresid: &mut [f32],
        g: &[f32],
        s: &[f32],
        r: f32,
        q: Option<(&[f32], usize)>,
        w: &[f32],
        scratch: &mut Vec<f64>,
    ) {
        let d = s.len();
        let r = r as f64;
        let c = r * r * r / d as f64 * dot3_f64(w, g, s);
        scratch.clear();
        scratch.extend(
            dresid
                .iter()
                .zip(g)
                .zip(s)
                .zip(w)
                .map(|(((t, gi), si), wi)| {
                    *t as f64 + r * (*wi as f64 * *gi as f64) - *si as f64 * c
                }),
        );
        if let Some((q, k)) = q {
            project_out(scratch, q, k);
        }
        for (t, v) in dresid.iter_mut().zip(scratch.iter()) {
            *t = *v as f32;
        }
    }
}

fn check_directions(op: &str, directions: Option<(&[f32], usize)>, d: usize) {
    if let Some((q, k)) = directions {
        check_len(op, "directions", q.len(), k * d);
    }
}

#[allow(clippy::too_many_arguments)]
pub fn residual_ablate_norm(
    resid: &mut [f32],
    normed: &mut [f32],
    rstd: &mut [f32],
    a: &[f32],
    b: Option<&[f32]>,
    directions: Option<(&[f32], usize)>,
    norm_w: &[f32],
    n: usize,
    d: usize,
    eps: f32,
) {
    const OP: &str = "residual_ablate_norm";
    check_len(OP, "resid", resid.len(), n * d);
    check_len(OP, "normed", normed.len(), n * d);
    check_len(OP, "rstd", rstd.len(), n);
    check_len(OP, "a", a.len(), n * d);
    if let Some(b) = b {
        check_len(OP, "b", b.len(), n * d);
    }
    check_len(OP, "norm_w", norm_w.len(), d);
    check_directions(OP, directions, d);
    if n == 0 || d == 0 {
        return;
    }
    let w = &norm_w[..d];
    resid[..n * d]
        .par_chunks_mut(d)
        .zip(normed[..n * d].par_chunks_mut(d))
        .zip(rstd[..n].par_iter_mut())
        .enumerate()
        .with_min_len(MIN_ROWS)
        .for_each_init(Vec::new, |scratch, (i, ((res, nrm), rs))| {
            let rows = i * d..(i + 1) * d;
            *rs = fwd_row(
                res,
                nrm,
                &a[rows.clone()],
                b.map(|b| &b[rows]),
                directions,
                w,
                eps,
                scratch,
            );
        });
}

#[allow(clippy::too_many_arguments)]
pub fn residual_ablate_norm_bwd(
    dresid: &mut [f32],
    dnormed: &[f32],
    resid: &[f32],
    rstd: &[f32],
    directions: Option<(&[f32], usize)>,
    norm_w: &[f32],
    n: usize,
    d: usize,
) {
    const OP: &str = "residual_ablate_norm_bwd";
    check_len(OP, "dresid", dresid.len(), n * d);
    check_len(OP, "dnormed", dnormed.len(), n * d);
    check_len(OP, "resid", resid.len(), n * d);
    check_len(OP, "rstd", rstd.len(), n);
    check_len(OP, "norm_w", norm_w.len(), d);
    check_directions(OP, directions, d);
    if n == 0 || d == 0 {
        return;
    }
    let w = &norm_w[..d];
    dresid[..n * d]
        .par_chunks_mut(d)
        .enumerate()
        .with_min_len(MIN_ROWS)
        .for_each_init(Vec::new, |scratch, (i, dr)| {
            let rows = i * d..(i + 1) * d;
            bwd_row(
                dr,
                &dnormed[rows.clone()],
                &resid[rows],
                rstd[i],
                directions,
                w,
                scratch,
            );
        });
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;
    use crate::util::rng::Rng;

    /// `k` random orthonormal directions of width `d` (none for `k = 0`).
    fn directions(rng: &mut Rng, k: usize, d: usize) -> Vec<f32> {
        if k == 0 {
            return Vec::new();
        }
        crate::linalg::gaussian_orthonormal(rng, k, d).unwrap()
    }

    /// The whole forward in f64: returns (resid, normed, rstd).
    fn naive(
        a: &[f64],
        b: Option<&[f64]>,
        q: Option<(&[f64], usize)>,
        w: &[f64],
        n: usize,
        d: usize,
        eps: f64,
    ) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        let mut resid = vec![0.0; n * d];
        let mut normed = vec![0.0; n * d];
        let mut rstd = vec![0.0; n];
        for i in 0..n {
            let mut s: Vec<f64> = (0..d)
                .map(|c| a[i * d + c] + b.map_or(0.0, |b| b[i * d + c]))
                .collect();
            if let Some((q, k)) = q {
                let coef: Vec<f64> = (0..k).map(|j| dot(&q[j * d..(j + 1) * d], &s)).collect();
                for (c, sc) in s.iter_mut().enumerate() {
                    *sc -= (0..k).map(|j| coef[j] * q[j * d + c]).sum::<f64>();
                }
            }
            let r = 1.0 / (dot(&s, &s) / d as f64 + eps).sqrt();
            rstd[i] = r;
            for c in 0..d {
                resid[i * d + c] = s[c];
                normed[i * d + c] = s[c] * r * w[c];
            }
        }
        (resid, normed, rstd)
    }

    struct Case {
        n: usize,
        d: usize,
        k: usize,
        with_b: bool,
    }

    const CASES: &[Case] = &[
        Case {
            n: 1,
            d: 1,
            k: 0,
            with_b: false,
        },
        Case {
            n: 3,
            d: 5,
            k: 0,
            with_b: true,
        },
        Case {
            n: 17,
            d: 33,
            k: 3,
            with_b: true,
        },
        Case {
            n: 9,
            d: 64,
            k: 8,
            with_b: false,
        },
        Case {
            n: 70,
            d: 577,
            k: 8,
            with_b: true,
        },
    ];

    /// Forward against f64. Every step is elementwise or an f64 reduction, so the only errors
    /// are a handful of f32 roundings per element (~2e-7); 1e-6 is the bound (tighter than the
    /// brief's 1e-5 because nothing here accumulates in f32). The ablation check is the
    /// brief's: `|Q resid_row| <= 1e-6 |resid_row|` with the f32 outputs.
    #[test]
    fn forward_matches_f64_and_ablates() {
        let mut rng = Rng::new(21);
        for c in CASES {
            let (n, d, k) = (c.n, c.d, c.k);
            let a = rng.normal_vec(n * d);
            let b = rng.normal_vec(n * d);
            let w: Vec<f32> = rng.normal_vec(d).iter().map(|v| 1.0 + 0.3 * v).collect();
            let q = directions(&mut rng, k, d);
            let dirs = (k > 0).then_some((&q[..], k));
            let eps = 1e-5f32;
            let (mut resid, mut normed, mut rstd) = (
                rng.normal_vec(n * d),
                rng.normal_vec(n * d),
                rng.normal_vec(n),
            );
            let bb = c.with_b.then_some(&b[..]);
            residual_ablate_norm(
                &mut resid,
                &mut normed,
                &mut rstd,
                &a,
                bb,
                dirs,
                &w,
                n,
                d,
                eps,
            );
            let (q64, b64) = (f64s(&q), f64s(&b));
            let (wr, wn, ws) = naive(
                &f64s(&a),
                c.with_b.then_some(&b64[..]),
                (k > 0).then_some((&q64[..], k)),
                &f64s(&w),
                n,
                d,
                eps as f64,
            );
            assert_close("resid", &resid, &wr, 1e-6);
            assert_close("normed", &normed, &wn, 1e-6);
            assert_close("rstd", &rstd, &ws, 1e-6);
            for i in 0..n {
                let row = f64s(&resid[i * d..(i + 1) * d]);
                let norm = dot(&row, &row).sqrt();
                for j in 0..k {
                    let proj = dot(&q64[j * d..(j + 1) * d], &row).abs();
                    assert!(
                        proj <= 1e-6 * norm,
                        "row {i} keeps {proj:e} along direction {j}"
                    );
                }
            }
        }
    }

    /// Backward against f64 central differences of
    /// `L = Σ resid ⊙ R1 + Σ normed ⊙ R2` with respect to `a` (the gradient of `b` is the same
    /// by construction). Tolerance 1e-5: the analytic side is f64 arithmetic on f32 inputs
    /// rounded once (~1e-7), the differences are exact to ~1e-9 (see `fd_grad`); 1e-5 still
    /// fails for any wrong term (those are O(1)).
    #[test]
    fn backward_is_the_gradient() {
        let mut rng = Rng::new(22);
        for c in CASES.iter().filter(|c| c.n * c.d < 2000) {
            let (n, d, k) = (c.n, c.d, c.k);
            let a = rng.normal_vec(n * d);
            let b = rng.normal_vec(n * d);
            let w: Vec<f32> = rng.normal_vec(d).iter().map(|v| 1.0 + 0.3 * v).collect();
            let q = directions(&mut rng, k, d);
            let dirs = (k > 0).then_some((&q[..], k));
            let r1 = rng.normal_vec(n * d);
            let r2 = rng.normal_vec(n * d);
            let eps = 1e-5f32;
            let (mut resid, mut normed, mut rstd) =
                (vec![0.0; n * d], vec![0.0; n * d], vec![0.0; n]);
            let bb = c.with_b.then_some(&b[..]);
            residual_ablate_norm(
                &mut resid,
                &mut normed,
                &mut rstd,
                &a,
                bb,
                dirs,
                &w,
                n,
                d,
                eps,
            );
            let mut dresid = r1.clone();
            residual_ablate_norm_bwd(&mut dresid, &r2, &resid, &rstd, dirs, &w, n, d);

            let (q64, b64, w64, r164, r264) = (f64s(&q), f64s(&b), f64s(&w), f64s(&r1), f64s(&r2));
            let fd = fd_grad(&f64s(&a), |a| {
                let (res, nrm, _) = naive(
                    a,
                    c.with_b.then_some(&b64[..]),
                    (k > 0).then_some((&q64[..], k)),
                    &w64,
                    n,
                    d,
                    eps as f64,
                );
                dot(&res, &r164) + dot(&nrm, &r264)
            });
            assert_close(&format!("dresid n={n} d={d} k={k}"), &dresid, &fd, 1e-5);
        }
    }
}
