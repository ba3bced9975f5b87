//! Helpers shared by the CPU backend's tests: error norms and finite differences.

/// [`crate::linalg::rel_err`], refusing an all-zero reference (the test would be vacuous).
pub fn rel_err(got: &[f32], want: &[f64]) -> f64 {
    assert!(
        want.iter().any(|w| *w != 0.0),
        "rel_err: reference is all zeros, the test would be vacuous"
    );
    crate::linalg::rel_err(got, want)
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
