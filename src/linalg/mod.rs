//! Linear algebra shared by the model layer, direction finding and backend diagnostics:
//! orthonormalisation (the ablation's `Q`), an f64/f32 GEMM wrapper, a streaming covariance and
//! symmetric eigen solvers (PCA).

mod eigen;
mod orthonormal;

pub use eigen::{
    gemm, jacobi_eigh, subspace_eigh, top_eigenpairs, Covariance, Eigen, GemmFloat, JACOBI_MAX_DIM,
    MAX_SUBSPACE_ITERS, SUBSPACE_TOL,
};
pub use orthonormal::{gaussian_orthonormal, orthonormalize};

/// Relative L2 error `‖got - want‖ / ‖want‖` in f64, the measure every parity check states its
/// tolerance in. Infinite when the lengths differ or any value is not finite, so a NaN never
/// passes a `<=` test; the absolute error `‖got - want‖` when `want` is all zeros.
pub fn rel_err<A, B>(got: &[A], want: &[B]) -> f64
where
    A: Copy + Into<f64>,
    B: Copy + Into<f64>,
{
    if got.len() != want.len() {
        return f64::INFINITY;
    }
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (&g, &w) in got.iter().zip(want) {
        let (g, w): (f64, f64) = (g.into(), w.into());
        if !g.is_finite() || !w.is_finite() {
            return f64::INFINITY;
        }
        num += (g - w) * (g - w);
        den += w * w;
    }
    if den == 0.0 {
        num.sqrt()
    } else {
        (num / den).sqrt()
    }
}

#[cfg(test)]
mod tests {
    use super::rel_err;

    #[test]
    fn rel_err_is_relative_and_never_passes_nan_or_a_length_mismatch() {
        assert_eq!(rel_err(&[3.0f32, 4.0], &[3.0f64, 4.0]), 0.0);
        // ‖(0.3, 0.4)‖ / ‖(3, 4)‖ = 0.5 / 5.
        let e = rel_err(&[3.3f64, 4.4], &[3.0f32, 4.0]);
        assert!((e - 0.1).abs() < 1e-6, "{e}");
        assert_eq!(rel_err(&[f32::NAN], &[1.0f32]), f64::INFINITY);
        assert_eq!(rel_err(&[1.0f32], &[f64::INFINITY]), f64::INFINITY);
        assert_eq!(rel_err(&[1.0f32], &[1.0f32, 2.0]), f64::INFINITY);
        assert_eq!(rel_err(&[0.5f32], &[0.0f32]), 0.5);
    }
}
