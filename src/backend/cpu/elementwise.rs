//! Row-parallel elementwise ops: embedding lookup, rotary embeddings, SwiGLU, GeGLU, scaling
//! and soft-capping.
//!
//! Rotary (Hugging Face "rotate_half" pairing): for each head and `i < head_dim/2`, with
//! `(c, s) = table[p, i]` at the row's position `p = pos[row]`,
//!   x1' = x1 c - x2 s,   x2' = x2 c + x1 s        (x1 = x[i], x2 = x[i + head_dim/2]);
//! the inverse uses `-s`, which is also the backward (a rotation's transpose is its inverse).
//! SwiGLU: `out = silu(g) · u`, `silu(g) = g σ(g)`; `d silu/dg = σ(g)(1 + g(1 - σ(g)))`.
//! GeGLU (PyTorch's `gelu(approximate="tanh")`): `gelu(g) = g/2 (1 + t)`, `t = tanh(a (g + b g³))`
//! with `a = √(2/π)`, `b = 0.044715`; `d gelu/dg = (1 + t)/2 + g/2 (1 - t²) a (1 + 3 b g²)`.
//! Soft-cap: `y = c tanh(x / c)`, `dy/dx = 1 - (y/c)²`.

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

const GELU_A: f32 = 0.797_884_6; // √(2/π)
const GELU_B: f32 = 0.044_715;

/// `(gelu_tanh(g), gelu_tanh'(g))`.
#[inline(always)]
fn gelu_tanh(g: f32) -> (f32, f32) {
    let t = (GELU_A * (g + GELU_B * g * g * g)).tanh();
    let y = 0.5 * g * (1.0 + t);
    let dy = 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * GELU_A * (1.0 + 3.0 * GELU_B * g * g);
    (y, dy)
}

multiversion! {
    fn geglu_chunk(out: &mut [f32], gate: &[f32], up: &[f32]) {
        for ((o, g), u) in out.iter_mut().zip(gate).zip(up) {
            *o = gelu_tanh(*g).0 * *u;
        }
    }
}

multiversion! {
    fn geglu_bwd_chunk(dgate: &mut [f32], dup: &mut [f32], dout: &[f32], gate: &[f32], up: &[f32]) {
        for ((((dg, du), d), g), u) in dgate.iter_mut().zip(dup.iter_mut()).zip(dout).zip(gate).zip(up) {
            let (y, dy) = gelu_tanh(*g);
            *du = *d * y;
            *dg = *d * *u * dy;
        }
    }
}

/// A gated MLP's activation `out = act(gate) · up`, chunk by chunk in parallel.
fn glu(op: &str, out: &mut [f32], gate: &[f32], up: &[f32], chunk: fn(&mut [f32], &[f32], &[f32])) {
    assert!(
        out.len() == gate.len() && gate.len() == up.len(),
        "{op}: lengths differ (out {}, gate {}, up {})",
        out.len(),
        gate.len(),
        up.len()
    );
    out.par_chunks_mut(CHUNK)
        .zip(gate.par_chunks(CHUNK))
        .zip(up.par_chunks(CHUNK))
        .for_each(|((o, g), u)| chunk(o, g, u));
}

type GluBwdChunk = fn(&mut [f32], &mut [f32], &[f32], &[f32], &[f32]);

/// Its backward, `dgate = dout · up · act'(gate)`, `dup = dout · act(gate)`.
fn glu_bwd(
    op: &str,
    dgate: &mut [f32],
    dup: &mut [f32],
    dout: &[f32],
    gate: &[f32],
    up: &[f32],
    chunk: GluBwdChunk,
) {
    let n = dout.len();
    assert!(
        dgate.len() == n && dup.len() == n && gate.len() == n && up.len() == n,
        "{op}: lengths differ (dgate {}, dup {}, dout {n}, gate {}, up {})",
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
        .for_each(|((((dg, du), d), g), u)| chunk(dg, du, d, g, u));
}

pub fn swiglu(out: &mut [f32], gate: &[f32], up: &[f32]) {
    glu("swiglu", out, gate, up, swiglu_chunk);
}

pub fn swiglu_bwd(dgate: &mut [f32], dup: &mut [f32], dout: &[f32], gate: &[f32], up: &[f32]) {
    glu_bwd("swiglu_bwd", dgate, dup, dout, gate, up, swiglu_bwd_chunk);
}

pub fn geglu(out: &mut [f32], gate: &[f32], up: &[f32]) {
    glu("geglu", out, gate, up, geglu_chunk);
}

pub fn geglu_bwd(dgate: &mut [f32], dup: &mut [f32], dout: &[f32], gate: &[f32], up: &[f32]) {
    glu_bwd("geglu_bwd", dgate, dup, dout, gate, up, geglu_bwd_chunk);
}

/// `x <- s · x`.
pub fn scale(x: &mut [f32], s: f32) {
    x.par_chunks_mut(CHUNK)
        .for_each(|c| c.iter_mut().for_each(|v| *v *= s));
}

/// `x <- c · tanh(x / c)`.
pub fn softcap(x: &mut [f32], cap: f32) {
    assert!(cap.is_finite() && cap > 0.0, "softcap: cap {cap}");
    let inv = 1.0 / cap;
    x.par_chunks_mut(CHUNK)
        .for_each(|c| c.iter_mut().for_each(|v| *v = cap * (*v * inv).tanh()));
}

/// `dx <- dx · (1 - (y/c)²)` with `y` the capped values.
pub fn softcap_bwd(dx: &mut [f32], y: &[f32], cap: f32) {
    assert!(cap.is_finite() && cap > 0.0, "softcap_bwd: cap {cap}");
    assert!(
        dx.len() == y.len(),
        "softcap_bwd: dx {} and y {} differ",
        dx.len(),
        y.len()
    );
    let inv = 1.0 / cap;
    dx.par_chunks_mut(CHUNK)
        .zip(y.par_chunks(CHUNK))
        .for_each(|(d, y)| {
            for (d, y) in d.iter_mut().zip(y) {
                let t = *y * inv;
                *d *= 1.0 - t * t;
            }
        });
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

    fn naive_gelu_tanh(g: f64) -> f64 {
        let a = (2.0 / std::f64::consts::PI).sqrt();
        0.5 * g * (1.0 + (a * (g + 0.044715 * g * g * g)).tanh())
    }

    /// GeGLU forward against f64 (tanh and a few products in f32: bound 1e-6) and its backward
    /// against f64 central differences of the separable loss `Σ geglu(g, u) ⊙ R` (bound 1e-5:
    /// the analytic derivative is evaluated in f32). Gates span [-8, 8]: both tails of tanh.
    #[test]
    fn geglu_forward_and_backward() {
        let mut rng = Rng::new(34);
        for &n in &[1usize, 9, 1000] {
            let g: Vec<f32> = (0..n).map(|_| rng.uniform(-8.0, 8.0) as f32).collect();
            let u = rng.normal_vec(n);
            let r = rng.normal_vec(n);
            let mut out = rng.normal_vec(n);
            geglu(&mut out, &g, &u);
            let want: Vec<f64> = g
                .iter()
                .zip(&u)
                .map(|(g, u)| naive_gelu_tanh(*g as f64) * *u as f64)
                .collect();
            assert_close("geglu", &out, &want, 1e-6);
            let (mut dg, mut du) = (rng.normal_vec(n), rng.normal_vec(n));
            geglu_bwd(&mut dg, &mut du, &r, &g, &u);
            let (g64, u64_, r64) = (f64s(&g), f64s(&u), f64s(&r));
            let fd_g: Vec<f64> = (0..n)
                .map(|i| {
                    let h = 1e-6 * g64[i].abs().max(1.0);
                    let f = |x: f64| naive_gelu_tanh(x) * u64_[i] * r64[i];
                    (f(g64[i] + h) - f(g64[i] - h)) / (2.0 * h)
                })
                .collect();
            let fd_u: Vec<f64> = (0..n).map(|i| naive_gelu_tanh(g64[i]) * r64[i]).collect();
            assert_close("geglu dgate", &dg, &fd_g, 1e-5);
            assert_close("geglu dup", &du, &fd_u, 1e-6);
        }
    }

    /// Soft-capping against f64 (bound 1e-6), saturating (|x| up to 6c), and its backward from
    /// the capped values against f64 central differences (bound 1e-5); scaling is exact.
    #[test]
    fn softcap_and_scale() {
        let mut rng = Rng::new(35);
        let c = 1.5f32;
        let x: Vec<f32> = (0..500).map(|_| rng.uniform(-9.0, 9.0) as f32).collect();
        let mut y = x.clone();
        softcap(&mut y, c);
        let cap = |v: f64| c as f64 * (v / c as f64).tanh();
        let want: Vec<f64> = x.iter().map(|&v| cap(v as f64)).collect();
        assert_close("softcap", &y, &want, 1e-6);
        assert!(y.iter().any(|v| v.abs() > 0.99 * c), "saturates");
        let r = rng.normal_vec(x.len());
        let mut d = r.clone();
        softcap_bwd(&mut d, &y, c);
        let fd: Vec<f64> = x
            .iter()
            .zip(&r)
            .map(|(&v, &r)| {
                let (v, h) = (v as f64, 1e-6);
                (cap(v + h) - cap(v - h)) / (2.0 * h) * r as f64
            })
            .collect();
        assert_close("softcap_bwd", &d, &fd, 1e-5);
        let mut s = x.clone();
        scale(&mut s, 8.0);
        assert!(s.iter().zip(&x).all(|(a, b)| *a == 8.0 * b));
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
