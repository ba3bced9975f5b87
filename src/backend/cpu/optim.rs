//! AdamW over the flat LoRA parameter buffer, and the gradient's sum of squares.
//!
//! AdamW follows `torch.optim.AdamW` (single-tensor path) operation by operation, in f32 with
//! the scalar factors formed in f64 and rounded once, as PyTorch does with Python floats:
//!   g  = grad · grad_scale
//!   p  = p · (1 - lr·wd)
//!   m  = lerp(m, g, 1 - β1)          (m + w (g - m), w = 1 - β1 < 0.5)
//!   v  = v · β2 + (1 - β2) · g · g
//!   denom = sqrt(v) / sqrt(1 - β2^t) + eps
//!   p  = p + (-lr / (1 - β1^t)) · (m / denom)

use super::check_len;
use super::simd::{dot_f64, multiversion};
use crate::backend::{AdamScalars, AdamStep};
use rayon::prelude::*;

/// Elements per rayon task.
const CHUNK: usize = 1 << 14;

multiversion! {
    fn sum_squares_chunk(c: &[f32]) -> f64 {
        dot_f64(c, c)
    }
}

pub fn sum_squares(g: &[f32]) -> f64 {
    // Per-chunk partials collected in order and summed sequentially: deterministic.
    let parts: Vec<f64> = g.par_chunks(CHUNK).map(sum_squares_chunk).collect();
    parts.iter().sum()
}

multiversion! {
    fn adamw_chunk(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], k: AdamScalars) {
        for (((p, g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
            let g = *g * k.grad_scale;
            *p *= k.decay;
            *m += k.w1 * (g - *m);
            *v = *v * k.beta2 + k.one_minus_beta2 * g * g;
            let denom = v.sqrt() / k.bc2_sqrt + k.eps;
            *p += k.neg_step_size * (*m / denom);
        }
    }
}

pub fn adamw(params: &mut [f32], grads: &[f32], m: &mut [f32], v: &mut [f32], hp: &AdamStep) {
    let n = params.len();
    check_len("adamw", "grads", grads.len(), n);
    check_len("adamw", "m", m.len(), n);
    check_len("adamw", "v", v.len(), n);
    let k = hp.scalars();
    params
        .par_chunks_mut(CHUNK)
        .zip(grads[..n].par_chunks(CHUNK))
        .zip(m[..n].par_chunks_mut(CHUNK))
        .zip(v[..n].par_chunks_mut(CHUNK))
        .for_each(|(((p, g), m), v)| adamw_chunk(p, g, m, v, k));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::rng::Rng;

    /// Two steps on three parameters, worked by hand in f64 from PyTorch's formulas
    /// (lr 0.1, β 0.9/0.999, eps 1e-8, wd 0.01, grad_scale 0.5):
    ///   step 1, p = 1, grad = 2 (g = 1): p = 0.999, m = 0.1, v = 0.001,
    ///     denom = sqrt(0.001)/sqrt(0.001) + 1e-8, p = 0.999 - 0.1/0.1 · 0.1/denom = 0.899000001
    ///   step 2, grad = -4 (g = -2): p = 0.899000001·0.999 = 0.898101000999,
    ///     m = 0.1 + 0.1(-2 - 0.1) = -0.11, v = 0.000999 + 0.004 = 0.004999,
    ///     denom = sqrt(0.004999)/sqrt(0.001999) + 1e-8 = 1.581375...,
    ///     p += 0.1/0.19 · 0.11/denom = 0.898101000999 + 0.036610... = 0.934711...
    /// The other two parameters check sign and zero handling the same way. The bound, 1e-6
    /// relative, is a few f32 roundings per operation.
    #[test]
    fn adamw_two_steps_by_hand() {
        let hp1 = AdamStep {
            lr: 0.1,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
            step: 1,
            grad_scale: 0.5,
        };
        let hp2 = AdamStep { step: 2, ..hp1 };
        let mut p = vec![1.0f32, -2.0, 0.5];
        let mut m = vec![0.0f32; 3];
        let mut v = vec![0.0f32; 3];
        adamw(&mut p, &[2.0, 1.0, 0.0], &mut m, &mut v, &hp1);
        adamw(&mut p, &[-4.0, 1.0, 6.0], &mut m, &mut v, &hp2);
        // Parameter 0: the worked example above, completed in f64.
        let d2 = (0.004999f64).sqrt() / (1.0 - 0.999f64 * 0.999).sqrt() + 1e-8;
        let p0 = 0.899000001f64 * 0.999 + 0.1 / (1.0 - 0.81) * 0.11 / d2;
        // Parameter 1: g = 0.5 both steps. Step 1: p = -2·0.999 = -1.998, m1 = 0.05,
        //   v1 = 0.00025, denom1 = sqrt(0.00025)/sqrt(0.001) + 1e-8 = 0.5 + 1e-8,
        //   p = -1.998 - (0.1/0.1)·0.05/denom1 ≈ -2.098.
        let p1_1 = -1.998f64 - 0.1 / 0.1 * 0.05 / (0.5 + 1e-8);
        //   m2 = 0.05 + 0.1(0.5 - 0.05) = 0.095, v2 = 0.00025·0.999 + 0.001·0.25 = 0.00049975,
        //   denom2 = sqrt(0.00049975)/sqrt(0.001999) + 1e-8.
        let d2b = (0.00049975f64).sqrt() / (0.001999f64).sqrt() + 1e-8;
        let p1 = p1_1 * 0.999 - 0.1 / 0.19 * 0.095 / d2b;
        // Parameter 2: zero gradient at step 1 (only decay: 0.4995), g = 3 at step 2:
        //   m2 = 0.3, v2 = 0.009, denom = sqrt(0.009)/sqrt(0.001999) + 1e-8.
        let d2c = (0.009f64).sqrt() / (0.001999f64).sqrt() + 1e-8;
        let p2 = 0.4995f64 * 0.999 - 0.1 / 0.19 * 0.3 / d2c;
        for (i, want) in [p0, p1, p2].into_iter().enumerate() {
            let e = ((p[i] as f64 - want) / want).abs();
            assert!(e < 1e-6, "param {i}: {} vs {want} ({e:e})", p[i]);
        }
        assert!((p0 - 0.934711).abs() < 1e-5, "the worked example itself");
        assert!(((m[0] as f64 + 0.11) / 0.11).abs() < 1e-6, "m = {}", m[0]);
        assert!(
            ((v[0] as f64 - 0.004999) / 0.004999).abs() < 1e-6,
            "v = {}",
            v[0]
        );
    }

    /// Sum of squares against a plain f64 loop over a buffer spanning several chunks.
    /// Both are f64 sums of exact f64 squares; they differ only in order (1e-12).
    #[test]
    fn sum_squares_matches_f64() {
        let mut rng = Rng::new(51);
        let g = rng.normal_vec(3 * CHUNK + 17);
        let want: f64 = g.iter().map(|x| *x as f64 * *x as f64).sum();
        let got = sum_squares(&g);
        assert!(((got - want) / want).abs() < 1e-12, "{got} vs {want}");
    }
}
