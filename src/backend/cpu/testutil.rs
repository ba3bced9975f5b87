//! Helpers shared by the CPU backend's tests: error norms and finite differences.

/// `‖got - want‖₂ / ‖want‖₂`, with `want` in f64.
pub fn rel_err(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len(), "rel_err: length mismatch");
    let mut num = 0.0;
    let mut den = 0.0;
    for (g, w) in got.iter().zip(want) {
        num += (*g as f64 - w) * (*g as f64 - w);
        den += w * w;
    }
    assert!(
        den > 0.0,
        "rel_err: reference is all zeros, the test would be vacuous"
    );
    (num / den).sqrt()
}

/// Asserts `rel_err(got, want) <= tol`, naming the quantity.
pub fn assert_close(what: &str, got: &[f32], want: &[f64], tol: f64) {
    let e = rel_err(got, want);
    assert!(e <= tol, "{what}: relative error {e:e} exceeds {tol:e}");
}

/// Widens to f64.
pub fn f64s(x: &[f32]) -> Vec<f64> {
    x.iter().map(|v| *v as f64).collect()
}

/// Central-difference gradient of a scalar f64 function at `x` (every coordinate).
///
/// Tolerances for the comparisons that use it: the functions are smooth and evaluated in f64,
/// so with `h = 1e-6·max(1, |x_i|)` the truncation error is O(h²) ≈ 1e-12 and the rounding
/// error O(1e-16/h) ≈ 1e-10, both far below the f32 rounding (~1e-6 relative) of the analytic
/// gradient under test.
pub fn fd_grad(x: &[f64], f: impl Fn(&[f64]) -> f64) -> Vec<f64> {
    let mut xp = x.to_vec();
    (0..x.len())
        .map(|i| {
            let h = 1e-6 * x[i].abs().max(1.0);
            xp[i] = x[i] + h;
            let fp = f(&xp);
            xp[i] = x[i] - h;
            let fm = f(&xp);
            xp[i] = x[i];
            (fp - fm) / (2.0 * h)
        })
        .collect()
}

/// `Σ a_i b_i` in f64.
pub fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// `k` random orthonormal rows of length `d` (Gram–Schmidt in f64, twice for stability),
/// rounded to f32 as the backend stores directions.
pub fn orthonormal_rows(rng: &mut crate::util::rng::Rng, k: usize, d: usize) -> Vec<f32> {
    let mut rows: Vec<Vec<f64>> = Vec::new();
    for _ in 0..k {
        let mut v: Vec<f64> = (0..d).map(|_| rng.normal()).collect();
        for _ in 0..2 {
            for r in &rows {
                let c = dot(&v, r);
                for (vi, ri) in v.iter_mut().zip(r) {
                    *vi -= c * ri;
                }
            }
        }
        let nrm = dot(&v, &v).sqrt();
        v.iter_mut().for_each(|x| *x /= nrm);
        rows.push(v);
    }
    rows.into_iter().flatten().map(|x| x as f32).collect()
}
