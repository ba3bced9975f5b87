//! Row-parallel elementwise ops: embedding lookup, rotary embeddings, SwiGLU.
//!
//! Rotary (Hugging Face "rotate_half" pairing): for each head and `i < head_dim/2`, with
//! `(c, s) = table[p, i]` at the row's position `p = pos[row]`,
//!   x1' = x1 c - x2 s,   x2' = x2 c + x1 s        (x1 = x[i], x2 = x[i + head_dim/2]);
//! the inverse uses `-s`, which is also the backward (a rotation's transpose is its inverse).
//! SwiGLU: `out = silu(g) · u`, `silu(g) = g σ(g)`; `d silu/dg = σ(g)(1 + g(1 - σ(g)))`.

use super::simd::{exp_f32, multiversion};
use super::{check_len, check_min};
use rayon::prelude::*;

/// Elements per rayon task for flat elementwise loops.
const CHUNK: usize = 1 << 14;

pub fn embedding(out: &mut [f32], table: &[f32], ids: &[u32], d: usize) {
    check_len("embedding", "out", out.len(), ids.len() * d);
    assert!(
        d > 0 && table.len().is_multiple_of(d),
        "embedding: table length {} is not a multiple of d = {d}",
        table.len()
    );
    let vocab = table.len() / d;
    out[..ids.len() * d]
        .par_chunks_mut(d)
        .zip(ids.par_iter())
        .with_min_len(16)
        .for_each(|(row, &id)| {
            let id = id as usize;
            assert!(
                id < vocab,
                "embedding: id {id} out of range (vocab {vocab})"
            );
            row.copy_from_slice(&table[id * d..(id + 1) * d]);
        });
}

pub fn rope(
    x: &mut [f32],
    table: &[f32],
    pos: &[i32],
    n_heads: usize,
    head_dim: usize,
    inverse: bool,
) {
    assert!(
        head_dim.is_multiple_of(2),
        "rope: head_dim {head_dim} is odd"
    );
    let width = n_heads * head_dim;
    let half = head_dim / 2;
    let n = pos.len();
    check_len("rope", "x", x.len(), n * width);
    if width == 0 || n == 0 {
        return;
    }
    assert!(pos.iter().all(|&p| p >= 0), "rope: a negative position");
    let max_pos = pos.iter().copied().max().unwrap_or(0) as usize;
    check_min(
        "rope",
        "table (max_pos·head_dim)",
        table.len(),
        (max_pos + 1) * head_dim,
    );
    // Flipping the sign of sin rotates by -θ.
    let sign = if inverse { -1.0f32 } else { 1.0 };
    x[..n * width]
        .par_chunks_mut(width)
        .zip(pos.par_iter())
        .with_min_len(16)
        .for_each(|(xr, &p)| {
            let p = p as usize;
            let cs = &table[p * head_dim..(p + 1) * head_dim];
            for head in xr.chunks_exact_mut(head_dim) {
                let (x1, x2) = head.split_at_mut(half);
                for ((a, b), t) in x1.iter_mut().zip(x2.iter_mut()).zip(cs.chunks_exact(2)) {
                    let (c, s) = (t[0], sign * t[1]);
                    let (u, v) = (*a, *b);
                    *a = u * c - v * s;
                    *b = v * c + u * s;
                }
            }
        });
}

multiversion! {
    fn swiglu_chunk(out: &mut [f32], gate: &[f32], up: &[f32]) {
        for ((o, g), u) in out.iter_mut().zip(gate).zip(up) {
            // silu(g) = g / (1 + e^-g), the form PyTorch evaluates.
            *o = *g / (1.0 + exp_f32(-*g)) * *u;
        }
    }
}

multiversion! {
    fn swiglu_bwd_chunk(dgate: &mut [f32], dup: &mut [f32], dout: &[f32], gate: &[f32], up: &[f32]) {
        for ((((dg, du), d), g), u) in dgate.iter_mut().zip(dup.iter_mut()).zip(dout).zip(gate).zip(up) {
            let sig = 1.0 / (1.0 + exp_f32(-*g));
            *du = *d * (*g * sig);
            *dg = *d * *u * (sig * (1.0 + *g * (1.0 - sig)));
        }
    }
}

pub fn swiglu(out: &mut [f32], gate: &[f32], up: &[f32]) {
    assert!(
        out.len() == gate.len() && gate.len() == up.len(),
        "swiglu: lengths differ (out {}, gate {}, up {})",
        out.len(),
        gate.len(),
        up.len()
    );
    out.par_chunks_mut(CHUNK)
        .zip(gate.par_chunks(CHUNK))
        .zip(up.par_chunks(CHUNK))
        .for_each(|((o, g), u)| swiglu_chunk(o, g, u));
}

pub fn swiglu_bwd(dgate: &mut [f32], dup: &mut [f32], dout: &[f32], gate: &[f32], up: &[f32]) {
    let n = dout.len();
    assert!(
        dgate.len() == n && dup.len() == n && gate.len() == n && up.len() == n,
        "swiglu_bwd: lengths differ (dgate {}, dup {}, dout {n}, gate {}, up {})",
        dgate.len(),
        dup.len(),
        gate.len(),
        up.len()
    );
    dgate
        .par_chunks_mut(CHUNK)
        .zip(dup.par_chunks_mut(CHUNK))
        .zip(dout.par_chunks(CHUNK))
        .zip(gate.par_chunks(CHUNK))
        .zip(up.par_chunks(CHUNK))
        .for_each(|((((dg, du), d), g), u)| swiglu_bwd_chunk(dg, du, d, g, u));
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;
    use crate::util::rng::Rng;

    #[test]
    fn embedding_copies_rows() {
        let mut rng = Rng::new(31);
        let (vocab, d) = (13, 7);
        let table = rng.normal_vec(vocab * d);
        let ids: Vec<u32> = (0..41).map(|_| rng.below(vocab) as u32).collect();
        let mut out = rng.normal_vec(ids.len() * d);
        embedding(&mut out, &table, &ids, d);
        for (i, &id) in ids.iter().enumerate() {
            assert_eq!(
                &out[i * d..(i + 1) * d],
                &table[id as usize * d..(id as usize + 1) * d]
            );
        }
    }

    #[test]
    #[should_panic(expected = "out of range")]
    fn embedding_rejects_bad_ids() {
        let table = vec![1.0f32; 6];
        let mut out = vec![0.0f32; 3];
        embedding(&mut out, &table, &[2], 3);
    }

    /// A random rotary table with angles as the model computes them, in f32 (cos, sin) pairs.
    fn table(rng: &mut Rng, max_pos: usize, head_dim: usize) -> Vec<f32> {
        let inv: Vec<f64> = (0..head_dim / 2).map(|_| rng.uniform(0.0, 1.0)).collect();
        let mut t = Vec::new();
        for p in 0..max_pos {
            for f in &inv {
                let a = f * p as f64;
                t.push(a.cos() as f32);
                t.push(a.sin() as f32);
            }
        }
        t
    }

    fn naive_rope_at(
        x: &[f64],
        t: &[f32],
        n_heads: usize,
        hd: usize,
        inv: bool,
        pos: &dyn Fn(usize) -> usize,
    ) -> Vec<f64> {
        let mut y = x.to_vec();
        let width = n_heads * hd;
        for row in 0..x.len() / width {
            let p = pos(row);
            for h in 0..n_heads {
                for i in 0..hd / 2 {
                    let c = t[2 * (p * hd / 2 + i)] as f64;
                    let s = t[2 * (p * hd / 2 + i) + 1] as f64 * if inv { -1.0 } else { 1.0 };
                    let (a, b) = (row * width + h * hd + i, row * width + h * hd + i + hd / 2);
                    y[a] = x[a] * c - x[b] * s;
                    y[b] = x[b] * c + x[a] * s;
                }
            }
        }
        y
    }

    /// Positions of packed sequences (restarting at 0) and of generation (arbitrary, not
    /// sorted): row `r` rotates at `pos[r]`.
    #[test]
    fn rope_at_given_positions() {
        let mut rng = Rng::new(33);
        let (heads, hd) = (2, 8);
        let pos = [0i32, 1, 2, 0, 0, 1, 7, 3, 12];
        let t = table(&mut rng, 16, hd);
        let x = rng.normal_vec(pos.len() * heads * hd);
        let mut y = x.clone();
        rope(&mut y, &t, &pos, heads, hd, false);
        let want = naive_rope_at(&f64s(&x), &t, heads, hd, false, &|row| pos[row] as usize);
        assert_close("rope at positions", &y, &want, 1e-6);
    }

    /// Forward against f64 (two products and a sum per element: ~1e-7; bound 1e-6), the
    /// inverse undoes the forward (the table's cos²+sin² is 1 to f32 rounding, so 1e-6), and
    /// the inverse is the gradient: `L = Σ rope(x) ⊙ R` is linear in x, its f64 differences are
    /// exact, so `rope_inverse(R)` must match them to f32 rounding (1e-6).
    #[test]
    fn rope_forward_inverse_and_gradient() {
        let mut rng = Rng::new(32);
        for &(batch, seq, heads, hd) in &[(1, 1, 1, 2), (2, 5, 3, 4), (3, 17, 2, 64)] {
            let max_pos = seq + 3;
            let t = table(&mut rng, max_pos, hd);
            let pos: Vec<i32> = (0..batch * seq).map(|r| (r % seq) as i32).collect();
            let at = |row: usize| row % seq;
            let x = rng.normal_vec(batch * seq * heads * hd);
            let mut y = x.clone();
            rope(&mut y, &t, &pos, heads, hd, false);
            assert_close(
                "rope fwd",
                &y,
                &naive_rope_at(&f64s(&x), &t, heads, hd, false, &at),
                1e-6,
            );
            let mut back = y.clone();
            rope(&mut back, &t, &pos, heads, hd, true);
            assert_close("rope inverse(rope)", &back, &f64s(&x), 1e-6);
            let r = rng.normal_vec(x.len());
            let r64 = f64s(&r);
            let fd = fd_grad(&f64s(&x), |x| {
                dot(&naive_rope_at(x, &t, heads, hd, false, &at), &r64)
            });
            let mut g = r.clone();
            rope(&mut g, &t, &pos, heads, hd, true);
            assert_close("rope gradient", &g, &fd, 1e-6);
        }
    }

    fn naive_silu(g: f64) -> f64 {
        g / (1.0 + (-g).exp())
    }

    /// SwiGLU forward against f64 (a few f32 roundings plus exp_f32's 2 ulp: bound 1e-6) and
    /// its backward against f64 central differences of `L = Σ swiglu(g, u) ⊙ R` (smooth,
    /// differences exact to ~1e-9, analytic side ~1e-6 from the f32 sigmoid; bound 1e-5).
    /// Gates span [-12, 12] so both saturated tails of the sigmoid are exercised.
    #[test]
    fn swiglu_forward_and_backward() {
        let mut rng = Rng::new(33);
        for &n in &[1usize, 7, 1000, 40_000] {
            let g: Vec<f32> = (0..n).map(|_| rng.uniform(-12.0, 12.0) as f32).collect();
            let u = rng.normal_vec(n);
            let r = rng.normal_vec(n);
            let mut out = rng.normal_vec(n);
            swiglu(&mut out, &g, &u);
            let want: Vec<f64> = g
                .iter()
                .zip(&u)
                .map(|(g, u)| naive_silu(*g as f64) * *u as f64)
                .collect();
            assert_close("swiglu", &out, &want, 1e-6);

            let (mut dg, mut du) = (rng.normal_vec(n), rng.normal_vec(n));
            swiglu_bwd(&mut dg, &mut du, &r, &g, &u);
            if n > 1000 {
                continue; // the differences below are O(n²) with a full-vector loss
            }
            let (g64, u64_, r64) = (f64s(&g), f64s(&u), f64s(&r));
            // The loss is separable, so one coordinate's difference only needs its own term.
            let fd_g: Vec<f64> = (0..n)
                .map(|i| {
                    let h = 1e-6 * g64[i].abs().max(1.0);
                    let f = |x: f64| naive_silu(x) * u64_[i] * r64[i];
                    (f(g64[i] + h) - f(g64[i] - h)) / (2.0 * h)
                })
                .collect();
            let fd_u: Vec<f64> = (0..n).map(|i| naive_silu(g64[i]) * r64[i]).collect();
            assert_close("swiglu dgate", &dg, &fd_g, 1e-5);
            assert_close("swiglu dup", &du, &fd_u, 1e-6);
        }
    }
}
