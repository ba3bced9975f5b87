//! Cross-entropy over the vocabulary, with the gradient written over the logits.
//!
//! Per row `x` with target `t`: `lse = m + ln Σ_j e^(x_j - m)` (`m = max x`, the sum in f64),
//! `loss = lse - x_t`, and `dL/dx_j = softmax_j - [j = t]`, scaled by the caller's factor.
//! Rows run in parallel; each row's loss lands in its own slot and the slots are summed in row
//! order, so the total does not depend on the thread count.

use super::simd::{exp_shift_sum, max_f32, multiversion, sum_exp_shift};
use super::{check_len, check_min};
use rayon::prelude::*;

multiversion! {
    /// One row: returns its loss (f64); with `grad_scale` overwrites the row with the gradient.
    fn ce_row(x: &mut [f32], target: usize, grad_scale: Option<f32>) -> f64 {
        let m = max_f32(x);
        let xt = x[target];
        match grad_scale {
            Some(s) => {
                // e_j = e^(x_j - m) stored in place, then scaled: s·e_j/Σe - s·[j = t].
                let sum = exp_shift_sum(x, m);
                let k = (s as f64 / sum) as f32;
                for v in x.iter_mut() {
                    *v *= k;
                }
                x[target] -= s;
                m as f64 + sum.ln() - xt as f64
            }
            None => m as f64 + sum_exp_shift(x, m).ln() - xt as f64,
        }
    }
}

pub fn cross_entropy(
    logits: &mut [f32],
    loss_acc: &mut [f32],
    targets: &[i32],
    vocab: usize,
    grad_scale: Option<f32>,
) {
    let n = targets.len();
    check_len("cross_entropy", "logits", logits.len(), n * vocab);
    check_min("cross_entropy", "loss_acc", loss_acc.len(), 1);
    if n == 0 {
        return;
    }
    assert!(vocab > 0, "cross_entropy: vocab is 0");
    let mut row_loss = vec![0.0f64; n];
    logits[..n * vocab]
        .par_chunks_mut(vocab)
        .zip(row_loss.par_iter_mut())
        .zip(targets.par_iter())
        .for_each(|((x, loss), &t)| {
            if t == -1 {
                if grad_scale.is_some() {
                    x.fill(0.0);
                }
                return;
            }
            assert!(
                t >= 0 && (t as usize) < vocab,
                "cross_entropy: target {t} out of range (vocab {vocab}, -1 = ignored)"
            );
            *loss = ce_row(x, t as usize, grad_scale);
        });
    let total: f64 = row_loss.iter().sum();
    loss_acc[0] = (loss_acc[0] as f64 + total) as f32;
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;
    use crate::util::rng::Rng;

    fn naive_loss(x: &[f64], targets: &[i32], vocab: usize) -> f64 {
        let mut total = 0.0;
        for (i, &t) in targets.iter().enumerate() {
            if t < 0 {
                continue;
            }
            let row = &x[i * vocab..(i + 1) * vocab];
            let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let lse = m + row.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
            total += lse - row[t as usize];
        }
        total
    }

    fn random_case(rng: &mut Rng, n: usize, vocab: usize, spread: f64) -> (Vec<f32>, Vec<i32>) {
        let logits = (0..n * vocab)
            .map(|_| (spread * rng.normal()) as f32)
            .collect();
        // Every third row ignored, the others random targets.
        let targets = (0..n)
            .map(|i| {
                if i % 3 == 1 {
                    -1
                } else {
                    rng.below(vocab) as i32
                }
            })
            .collect();
        (logits, targets)
    }

    /// Loss against f64 (inputs in f32, every reduction in f64, so the only error is exp_f32's
    /// ~2 ulp per term and one f32 rounding of the total: bound 1e-6 relative), added to the
    /// accumulator; logits untouched without `grad_scale`. Spread 8 gives peaked softmaxes.
    #[test]
    fn loss_matches_f64() {
        let mut rng = Rng::new(41);
        for &(n, vocab, spread) in &[(1, 1, 1.0), (4, 3, 1.0), (7, 1001, 8.0), (5, 49152, 3.0)] {
            let (logits, targets) = random_case(&mut rng, n, vocab, spread);
            let mut x = logits.clone();
            let mut acc = vec![0.75f32];
            cross_entropy(&mut x, &mut acc, &targets, vocab, None);
            assert_eq!(x, logits, "logits changed without grad_scale");
            let want = naive_loss(&f64s(&logits), &targets, vocab) + 0.75;
            let e = ((acc[0] as f64 - want) / want.abs().max(1e-3)).abs();
            assert!(
                e < 1e-6,
                "loss n={n} vocab={vocab}: {} vs {want} ({e:e})",
                acc[0]
            );
        }
    }

    /// Gradient against f64 central differences of the summed loss, times the scale, with zero
    /// rows for ignored targets. The differences are exact to ~1e-9 (smooth f64 function); the
    /// analytic side has f32 softmax rounding (~1e-7 relative per element): bound 1e-5.
    #[test]
    fn gradient_is_scaled_softmax_minus_onehot() {
        let mut rng = Rng::new(42);
        for &(n, vocab) in &[(1, 2), (6, 5), (4, 37)] {
            let (logits, targets) = random_case(&mut rng, n, vocab, 2.0);
            let s = 0.37f32;
            let mut g = logits.clone();
            let mut acc = vec![0.0f32];
            cross_entropy(&mut g, &mut acc, &targets, vocab, Some(s));
            let fd: Vec<f64> = fd_grad(&f64s(&logits), |x| naive_loss(x, &targets, vocab))
                .iter()
                .map(|v| v * s as f64)
                .collect();
            assert_close(&format!("ce grad n={n} vocab={vocab}"), &g, &fd, 1e-5);
            for (i, &t) in targets.iter().enumerate() {
                if t < 0 {
                    assert!(g[i * vocab..(i + 1) * vocab].iter().all(|v| *v == 0.0));
                }
            }
            let want = naive_loss(&f64s(&logits), &targets, vocab);
            assert!(
                ((acc[0] as f64 - want) / want).abs() < 1e-6,
                "loss with gradient"
            );
        }
    }
}
