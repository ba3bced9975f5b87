//! Full fine-tuning: the gradients of the weights themselves (linear weights and biases, norm
//! gains, the embedding table), and the refresh of the forward's copies from the f32 master
//! weights after an optimizer step. Every gradient accumulates (`+=`) into a slice of one flat
//! f32 buffer, as LoRA's do, so micro-batches of one optimizer step add up.
//!
//! Reductions over token rows accumulate in f64 and are added to the f32 gradient once.

use super::{check_len, check_min, matmul, MatRef, Threads};
use rayon::prelude::*;

/// Columns per rayon task of the column reductions.
const COLS: usize = 64;

/// `dw[off .. off + d_out·d_in] += dyᵀ x`: the gradient of `W: [d_out, d_in]` in `y = x Wᵀ`.
#[allow(clippy::too_many_arguments)]
pub fn linear_bwd_weight(
    dw: &mut [f32],
    off: usize,
    dy: &[f32],
    x: &[f32],
    n: usize,
    d_in: usize,
    d_out: usize,
) {
    const OP: &str = "linear_bwd_weight";
    check_min(OP, "dw", dw.len(), off + d_out * d_in);
    check_len(OP, "dy", dy.len(), n * d_out);
    check_len(OP, "x", x.len(), n * d_in);
    matmul(
        &mut dw[off..off + d_out * d_in],
        d_in,
        MatRef::transposed(dy, d_out),
        MatRef::rows(x, d_in),
        d_out,
        d_in,
        n,
        1.0,
        true,
        Threads::All,
    );
}

/// `out[j] += Σ_i term(i, j)` over `n` rows for `j < d`, in f64 per column, rows in order.
fn column_sums(out: &mut [f32], n: usize, d: usize, term: impl Fn(usize, usize) -> f64 + Sync) {
    out[..d]
        .par_chunks_mut(COLS)
        .enumerate()
        .for_each(|(c, cols)| {
            let j0 = c * COLS;
            let mut acc = vec![0.0f64; cols.len()];
            for i in 0..n {
                for (jj, a) in acc.iter_mut().enumerate() {
                    *a += term(i, j0 + jj);
                }
            }
            for (o, a) in cols.iter_mut().zip(acc) {
                *o = (*o as f64 + a) as f32;
            }
        });
}

/// `db[off + j] += Σ_i dy[i, j]`: the gradient of a bias added to `n` rows of width `d`.
pub fn bias_bwd(db: &mut [f32], off: usize, dy: &[f32], n: usize, d: usize) {
    check_min("bias_bwd", "db", db.len(), off + d);
    check_len("bias_bwd", "dy", dy.len(), n * d);
    column_sums(&mut db[off..], n, d, |i, j| dy[i * d + j] as f64);
}

/// `dw[off + j] += Σ_i dnormed[i, j] · (x[i, j] · rstd[i])`: the gradient of the gain `w` of
/// `normed = (x · rstd) · w`, with `x · rstd` rounded to f32 as the forward forms it.
#[allow(clippy::too_many_arguments)]
pub fn norm_weight_bwd(
    dw: &mut [f32],
    off: usize,
    dnormed: &[f32],
    x: &[f32],
    rstd: &[f32],
    n: usize,
    d: usize,
) {
    const OP: &str = "norm_weight_bwd";
    check_min(OP, "dw", dw.len(), off + d);
    check_len(OP, "dnormed", dnormed.len(), n * d);
    check_len(OP, "x", x.len(), n * d);
    check_len(OP, "rstd", rstd.len(), n);
    column_sums(&mut dw[off..], n, d, |i, j| {
        dnormed[i * d + j] as f64 * (x[i * d + j] * rstd[i]) as f64
    });
}

/// `dtable[off + ids[i]·d ..][j] += dx[i, j]` for every row `i`, rows of one id added in the
/// order of `i` (deterministic). Ids were validated against the table by the caller.
pub fn embedding_bwd(dtable: &mut [f32], off: usize, dx: &[f32], ids: &[u32], d: usize) {
    check_len("embedding_bwd", "dx", dx.len(), ids.len() * d);
    if let Some(max) = ids.iter().max() {
        check_min(
            "embedding_bwd",
            "dtable",
            dtable.len(),
            off + (*max as usize + 1) * d,
        );
    }
    for (i, &id) in ids.iter().enumerate() {
        let row = &mut dtable[off + id as usize * d..off + (id as usize + 1) * d];
        for (t, g) in row.iter_mut().zip(&dx[i * d..(i + 1) * d]) {
            *t += g;
        }
    }
}

/// `dst[i] = src[off + i] + add` (the forward's copy of a master weight; `add = 1` gives
/// Gemma's `1 + w` norm gains, formed in f32 as at load).
pub fn params_to_act(dst: &mut [f32], src: &[f32], off: usize, add: f32) {
    check_min("params_to_act", "src", src.len(), off + dst.len());
    let len = dst.len();
    dst.par_iter_mut()
        .zip(src[off..off + len].par_iter())
        .with_min_len(1 << 14)
        .for_each(|(d, s)| *d = s + add);
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;
    use crate::util::rng::Rng;

    fn randn(rng: &mut Rng, n: usize) -> Vec<f32> {
        rng.normal_vec(n)
    }

    #[test]
    fn linear_weight_gradient_matches_finite_differences() {
        let mut rng = Rng::new(11);
        let (n, d_in, d_out) = (7, 5, 3);
        let (x, w, g) = (
            randn(&mut rng, n * d_in),
            randn(&mut rng, d_out * d_in),
            randn(&mut rng, n * d_out),
        );
        // L(W) = Σ g ⊙ (x Wᵀ): its gradient is gᵀ x.
        let loss = |w: &[f64]| {
            let mut s = 0.0;
            for i in 0..n {
                for o in 0..d_out {
                    let y: f64 = (0..d_in)
                        .map(|c| x[i * d_in + c] as f64 * w[o * d_in + c])
                        .sum();
                    s += g[i * d_out + o] as f64 * y;
                }
            }
            s
        };
        let want = fd_grad(&f64s(&w), loss);
        // Accumulates into a non-zero buffer at an offset.
        let off = 4;
        let prior = randn(&mut rng, off + d_out * d_in + 2);
        let mut dw = prior.clone();
        linear_bwd_weight(&mut dw, off, &g, &x, n, d_in, d_out);
        let got: Vec<f32> = (0..d_out * d_in)
            .map(|i| dw[off + i] - prior[off + i])
            .collect();
        assert_close("dW", &got, &want, 1e-5);
        assert_eq!(dw[..off], prior[..off]);
        assert_eq!(dw[off + d_out * d_in..], prior[off + d_out * d_in..]);
    }

    #[test]
    fn bias_and_norm_gains_are_column_sums() {
        let mut rng = Rng::new(12);
        let (n, d) = (9, 150); // more columns than one task's block
        let (dy, x) = (randn(&mut rng, n * d), randn(&mut rng, n * d));
        let rstd: Vec<f32> = (0..n).map(|_| rng.uniform(0.5, 1.5) as f32).collect();
        let mut db = vec![0.25f32; d + 3];
        bias_bwd(&mut db, 3, &dy, n, d);
        let want: Vec<f64> = (0..d)
            .map(|j| 0.25 + (0..n).map(|i| dy[i * d + j] as f64).sum::<f64>())
            .collect();
        assert_close("db", &db[3..], &want, 1e-6);
        assert!(db[..3].iter().all(|&v| v == 0.25));

        // L(w) = Σ dy ⊙ (x · rstd · w): dL/dw_j = Σ_i dy_ij x_ij rstd_i.
        let w = randn(&mut rng, d);
        let loss = |w: &[f64]| {
            (0..n * d)
                .map(|t| dy[t] as f64 * x[t] as f64 * rstd[t / d] as f64 * w[t % d])
                .sum()
        };
        let want = fd_grad(&f64s(&w), loss);
        let mut dw = vec![0.0f32; d];
        norm_weight_bwd(&mut dw, 0, &dy, &x, &rstd, n, d);
        assert_close("dw", &dw, &want, 1e-5);
    }

    #[test]
    fn embedding_gradient_adds_every_occurrence() {
        let mut rng = Rng::new(13);
        let (vocab, d) = (6, 4);
        let ids = [3u32, 1, 3, 5, 3, 0];
        let dx = randn(&mut rng, ids.len() * d);
        // L(T) = Σ dx ⊙ T[ids]: each occurrence of an id adds its row.
        let table = randn(&mut rng, vocab * d);
        let loss = |t: &[f64]| {
            ids.iter()
                .enumerate()
                .map(|(i, &id)| {
                    (0..d)
                        .map(|j| dx[i * d + j] as f64 * t[id as usize * d + j])
                        .sum::<f64>()
                })
                .sum()
        };
        let want = fd_grad(&f64s(&table), loss);
        let off = 2;
        let mut dt = vec![0.0f32; off + vocab * d];
        embedding_bwd(&mut dt, off, &dx, &ids, d);
        // Rows 2 and 4 never occur: their gradient stays zero.
        assert_close("dT", &dt[off..], &want, 1e-6);
        assert!(dt[off + 2 * d..off + 3 * d].iter().all(|&v| v == 0.0));
    }

    #[test]
    fn params_to_act_copies_with_offset_and_shift() {
        let src = [1.0f32, 2.0, 3.0, -0.5, 7.0];
        let mut dst = vec![0.0f32; 3];
        params_to_act(&mut dst, &src, 1, 0.0);
        assert_eq!(dst, [2.0, 3.0, -0.5]);
        params_to_act(&mut dst, &src, 2, 1.0);
        assert_eq!(dst, [4.0, 0.5, 8.0]);
    }
}
