//! Causal (optionally sliding-window, optionally soft-capped) softmax attention with GQA over
//! packed variable-length sequences, and its backward.
//!
//! Per sequence `s` (rows `cu[s] .. cu[s+1]`) and head `h` (kv head `h / group`),
//! `Q, K, V: [T, hd]` are strided views of the projection outputs (row stride = the projection
//! width); with the shape's `scale` and, when given, the soft-cap `c`:
//!   S = scale Q Kᵀ,  S <- c tanh(S / c),  P = softmax(S) over visible keys,  O = P V,
//!   lse_i = log Σ_j e^(S_ij).
//! Backward (P recomputed from the saved lse, nothing T x T kept between the passes):
//!   D_i = Σ_d dO_id O_id,  dV = Pᵀ dO,  dP = dO Vᵀ,  dS = P ⊙ (dP - D) ⊙ (1 - (S/c)²),
//!   dQ = scale dS K,  dK = scale dSᵀ Q          (the last factor of dS only with a soft-cap).
//!
//! Memory plan: queries go in blocks of `BLOCK` rows; a block only multiplies against the keys
//! some query in it can see (`lo..i1`), so causal masking skips almost half the work and a
//! sliding window skips the rest. The block's scores live in a per-task scratch of
//! `BLOCK x max_len` floats. The forward runs one rayon task per (sequence, head); the backward
//! one per (sequence, kv head), looping over the heads sharing it, so dK and dV are each written
//! by a single task. Every GEMM is single-threaded inside its task.

use super::simd::{dot_f64, exp_f32, exp_shift_sum, max_f32, multiversion};
use super::{check_len, matmul, matmul_to_ptr, MatRef, SharedMut, Threads};
use crate::backend::{AttnShape, CacheShape};
use rayon::prelude::*;

/// Query rows per block.
const BLOCK: usize = 64;

/// First key visible to query `i`: keys `j` with `i - window < j <= i`.
#[inline(always)]
fn first_key(i: usize, window: Option<usize>) -> usize {
    window.map_or(0, |w| (i + 1).saturating_sub(w))
}

/// Validates a shape, the sequence offsets and the buffers (`(name, length, elements per
/// row)`); returns the number of rows.
fn check_shape(op: &str, shape: &AttnShape, cu: &[usize], lens: &[(&str, usize, usize)]) -> usize {
    assert!(
        shape.n_kv_heads > 0 && shape.n_heads.is_multiple_of(shape.n_kv_heads),
        "{op}: n_heads {} is not a multiple of n_kv_heads {}",
        shape.n_heads,
        shape.n_kv_heads
    );
    assert!(
        shape.window != Some(0),
        "{op}: a sliding window of 0 sees no key"
    );
    assert!(shape.head_dim > 0, "{op}: head_dim is 0");
    assert!(shape.scale.is_finite(), "{op}: scale {}", shape.scale);
    if let Some(c) = shape.softcap {
        assert!(c.is_finite() && c > 0.0, "{op}: soft-cap {c}");
    }
    assert!(
        cu.first() == Some(&0) && cu.windows(2).all(|w| w[0] < w[1]),
        "{op}: sequence offsets {cu:?} do not start at 0 and rise"
    );
    let n = cu[cu.len() - 1];
    for &(what, len, per_row) in lens {
        check_len(op, what, len, n * per_row);
    }
    n
}

/// `S <- c tanh(S / c)` on a score row (Gemma-2's soft-capping).
#[inline]
fn cap_scores(row: &mut [f32], softcap: Option<f32>) {
    if let Some(c) = softcap {
        let inv = 1.0 / c;
        row.iter_mut().for_each(|x| *x = c * (*x * inv).tanh());
    }
}

multiversion! {
    /// Softmax of a score block in place (`bm x nk`, queries `i0..`, keys `lo..`), soft-capping
    /// and zeroing invisible keys, and the rows' log-sum-exps into `lse` (sums in f64).
    #[allow(clippy::too_many_arguments)]
    fn softmax_block(s: &mut [f32], nk: usize, i0: usize, lo: usize, window: Option<usize>, softcap: Option<f32>, lse: &mut [f32]) {
        for (r, (row, l)) in s.chunks_exact_mut(nk).zip(lse.iter_mut()).enumerate() {
            let i = i0 + r;
            let (jlo, jhi) = (first_key(i, window) - lo, i + 1 - lo);
            let vis = &mut row[jlo..jhi];
            cap_scores(vis, softcap);
            let m = max_f32(vis);
            let sum = exp_shift_sum(vis, m);
            let inv = (1.0 / sum) as f32;
            vis.iter_mut().for_each(|p| *p *= inv);
            row[..jlo].fill(0.0);
            row[jhi..].fill(0.0);
            *l = (m as f64 + sum.ln()) as f32;
        }
    }
}

multiversion! {
    /// `P = e^(S - lse)` on visible keys, 0 elsewhere: the forward's probabilities, recomputed.
    /// With a soft-cap, `t` (same shape) receives `tanh(S_raw / c)` for the backward's factor.
    #[allow(clippy::too_many_arguments)]
    fn probs_block(s: &mut [f32], t: &mut [f32], nk: usize, i0: usize, lo: usize, window: Option<usize>, softcap: Option<f32>, lse: &[f32]) {
        for (r, (row, l)) in s.chunks_exact_mut(nk).zip(lse).enumerate() {
            let i = i0 + r;
            let (jlo, jhi) = (first_key(i, window) - lo, i + 1 - lo);
            let vis = &mut row[jlo..jhi];
            if let Some(c) = softcap {
                let trow = &mut t[r * nk + jlo..r * nk + jhi];
                cap_scores(vis, softcap);
                for (tv, x) in trow.iter_mut().zip(vis.iter()) {
                    *tv = *x / c;
                }
            }
            vis.iter_mut().for_each(|x| *x = exp_f32(*x - *l));
            row[..jlo].fill(0.0);
            row[jhi..].fill(0.0);
        }
    }
}

multiversion! {
    /// `dS = P ⊙ (dP - D)` in place on `dp`, one `D` per row; with a soft-cap also
    /// `⊙ (1 - t²)`, the derivative of `c tanh(x / c)`.
    fn ds_block(p: &[f32], dp: &mut [f32], t: &[f32], nk: usize, d: &[f32], softcap: bool) {
        for (r, ((prow, drow), di)) in p.chunks_exact(nk).zip(dp.chunks_exact_mut(nk)).zip(d).enumerate() {
            for (x, pv) in drow.iter_mut().zip(prow) {
                *x = *pv * (*x - *di);
            }
            if softcap {
                for (x, tv) in drow.iter_mut().zip(&t[r * nk..(r + 1) * nk]) {
                    *x *= 1.0 - *tv * *tv;
                }
            }
        }
    }
}

/// Every (sequence, head-ish index) pair as one task: `(s, x)` for `s < n_seqs`, `x < per_seq`.
fn tasks(n_seqs: usize, per_seq: usize) -> impl ParallelIterator<Item = (usize, usize)> {
    (0..n_seqs * per_seq)
        .into_par_iter()
        .map(move |i| (i / per_seq, i % per_seq))
}

pub fn attention_fwd(
    out: &mut [f32],
    lse: &mut [f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    cu: &[usize],
    shape: &AttnShape,
) {
    let (qw, kvw) = (shape.q_width(), shape.kv_width());
    let AttnShape {
        n_heads,
        n_kv_heads,
        head_dim: hd,
        window,
        scale,
        softcap,
    } = *shape;
    let n = check_shape(
        "attention_fwd",
        shape,
        cu,
        &[
            ("out", out.len(), qw),
            ("lse", lse.len(), n_heads),
            ("q", q.len(), qw),
            ("k", k.len(), kvw),
            ("v", v.len(), kvw),
        ],
    );
    if n == 0 {
        return;
    }
    let group = n_heads / n_kv_heads;
    let max_len = cu.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0);
    let (out_ptr, lse_ptr) = (SharedMut(out.as_mut_ptr()), SharedMut(lse.as_mut_ptr()));
    tasks(cu.len() - 1, n_heads).for_each_init(
        || vec![0f32; BLOCK * max_len],
        |s, (sq, h)| {
            let (r0, t) = (cu[sq], cu[sq + 1] - cu[sq]);
            let kvh = h / group;
            let q0 = r0 * qw + h * hd;
            let kv0 = r0 * kvw + kvh * hd;
            // SAFETY: `lse` holds n_heads·n elements (checked); this task alone writes head h's
            // rows r0 .. r0+t of it, and `lse` is borrowed mutably for the whole section.
            let lse_sh =
                unsafe { std::slice::from_raw_parts_mut(lse_ptr.get().add(h * n + r0), t) };
            for i0 in (0..t).step_by(BLOCK) {
                let i1 = (i0 + BLOCK).min(t);
                let bm = i1 - i0;
                let lo = first_key(i0, window);
                let nk = i1 - lo;
                let sb = &mut s[..bm * nk];
                matmul(
                    sb,
                    nk,
                    MatRef::rows(&q[q0 + i0 * qw..], qw),
                    MatRef::transposed(&k[kv0 + lo * kvw..], kvw),
                    bm,
                    nk,
                    hd,
                    scale,
                    false,
                    Threads::One,
                );
                softmax_block(sb, nk, i0, lo, window, softcap, &mut lse_sh[i0..i1]);
                // SAFETY: `out` holds n·qw elements (checked); this writes rows r0+i0 .. r0+i1,
                // columns h*hd .. (h+1)*hd, inside it. Only the task of (sequence, h) touches
                // those elements, and `out` is borrowed mutably for the whole parallel section.
                unsafe {
                    matmul_to_ptr(
                        out_ptr.get().add(q0 + i0 * qw),
                        qw,
                        MatRef::rows(sb, nk),
                        MatRef::rows(&v[kv0 + lo * kvw..], kvw),
                        bm,
                        hd,
                        nk,
                        1.0,
                        false,
                        Threads::One,
                    )
                };
            }
        },
    );
}

/// Per-task scratch of the backward: probabilities, their gradient, the soft-capped scores'
/// `tanh` (empty without a soft-cap), one `D` per block row.
struct BwdScratch {
    p: Vec<f32>,
    dp: Vec<f32>,
    t: Vec<f32>,
    d: Vec<f32>,
}

#[allow(clippy::too_many_arguments)]
pub fn attention_bwd(
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
    dout: &[f32],
    out: &[f32],
    lse: &[f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    cu: &[usize],
    shape: &AttnShape,
) {
    let (qw, kvw) = (shape.q_width(), shape.kv_width());
    let AttnShape {
        n_heads,
        n_kv_heads,
        head_dim: hd,
        window,
        scale,
        softcap,
    } = *shape;
    let n = check_shape(
        "attention_bwd",
        shape,
        cu,
        &[
            ("dq", dq.len(), qw),
            ("dk", dk.len(), kvw),
            ("dv", dv.len(), kvw),
            ("dout", dout.len(), qw),
            ("out", out.len(), qw),
            ("lse", lse.len(), n_heads),
            ("q", q.len(), qw),
            ("k", k.len(), kvw),
            ("v", v.len(), kvw),
        ],
    );
    if n == 0 {
        return;
    }
    let group = n_heads / n_kv_heads;
    let max_len = cu.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0);
    let (dq_ptr, dk_ptr, dv_ptr) = (
        SharedMut(dq.as_mut_ptr()),
        SharedMut(dk.as_mut_ptr()),
        SharedMut(dv.as_mut_ptr()),
    );
    tasks(cu.len() - 1, n_kv_heads).for_each_init(
        || BwdScratch {
            p: vec![0.0; BLOCK * max_len],
            dp: vec![0.0; BLOCK * max_len],
            t: vec![
                0.0;
                if softcap.is_some() {
                    BLOCK * max_len
                } else {
                    0
                }
            ],
            d: vec![0.0; BLOCK],
        },
        |sc, (sq, kvh)| {
            let (r0, t) = (cu[sq], cu[sq + 1] - cu[sq]);
            let kv0 = r0 * kvw + kvh * hd;
            // SAFETY (for every raw write in this task): dq holds n·qw and dk, dv hold n·kvw
            // elements (checked above). This task writes only rows r0 .. r0+t of them (its
            // sequence), and within those only kv head kvh's columns of dk, dv and the columns
            // of the heads sharing it (kvh*group .. (kvh+1)*group) of dq. Those sets are
            // disjoint across tasks, and the three buffers are borrowed mutably for the whole
            // section.
            for i in 0..t {
                // SAFETY: see above; row r0+i, kv head kvh's columns (dk and dv start at 0).
                unsafe {
                    std::ptr::write_bytes(dk_ptr.get().add(kv0 + i * kvw), 0, hd);
                    std::ptr::write_bytes(dv_ptr.get().add(kv0 + i * kvw), 0, hd);
                }
            }
            for h in kvh * group..(kvh + 1) * group {
                let q0 = r0 * qw + h * hd;
                let lse_sh = &lse[h * n + r0..h * n + r0 + t];
                for i0 in (0..t).step_by(BLOCK) {
                    let i1 = (i0 + BLOCK).min(t);
                    let bm = i1 - i0;
                    let lo = first_key(i0, window);
                    let nk = i1 - lo;
                    let (p, dp, d) = (&mut sc.p[..bm * nk], &mut sc.dp[..bm * nk], &mut sc.d[..bm]);
                    let tc = &mut sc.t[..if softcap.is_some() { bm * nk } else { 0 }];
                    let q_blk = MatRef::rows(&q[q0 + i0 * qw..], qw);
                    let do_blk = MatRef::rows(&dout[q0 + i0 * qw..], qw);
                    matmul(
                        p,
                        nk,
                        q_blk,
                        MatRef::transposed(&k[kv0 + lo * kvw..], kvw),
                        bm,
                        nk,
                        hd,
                        scale,
                        false,
                        Threads::One,
                    );
                    probs_block(p, tc, nk, i0, lo, window, softcap, &lse_sh[i0..i1]);
                    // SAFETY: see the task's comment; rows r0+lo .. r0+i1, kv head kvh.
                    unsafe {
                        matmul_to_ptr(
                            dv_ptr.get().add(kv0 + lo * kvw),
                            kvw,
                            MatRef::transposed(p, nk),
                            do_blk,
                            nk,
                            hd,
                            bm,
                            1.0,
                            true,
                            Threads::One,
                        )
                    };
                    matmul(
                        dp,
                        nk,
                        do_blk,
                        MatRef::transposed(&v[kv0 + lo * kvw..], kvw),
                        bm,
                        nk,
                        hd,
                        1.0,
                        false,
                        Threads::One,
                    );
                    for (r, di) in d.iter_mut().enumerate() {
                        let o = q0 + (i0 + r) * qw;
                        *di = dot_f64(&dout[o..o + hd], &out[o..o + hd]) as f32;
                    }
                    ds_block(p, dp, tc, nk, d, softcap.is_some());
                    // SAFETY: see the task's comment; rows r0+i0 .. r0+i1, head h of dq and
                    // rows r0+lo .. r0+i1, kv head kvh of dk.
                    unsafe {
                        matmul_to_ptr(
                            dq_ptr.get().add(q0 + i0 * qw),
                            qw,
                            MatRef::rows(dp, nk),
                            MatRef::rows(&k[kv0 + lo * kvw..], kvw),
                            bm,
                            hd,
                            nk,
                            scale,
                            false,
                            Threads::One,
                        );
                        matmul_to_ptr(
                            dk_ptr.get().add(kv0 + lo * kvw),
                            kvw,
                            MatRef::transposed(dp, nk),
                            q_blk,
                            nk,
                            hd,
                            bm,
                            scale,
                            true,
                            Threads::One,
                        );
                    }
                }
            }
        },
    );
}

/// Generation attention against a key/value cache (see `Backend::attention_cached`): append
/// the new rows, then one rayon task per new query row computes every head directly (scores,
/// max-shifted softmax in f64 sums, weighted values). Decoding has one query per sequence, so
/// there is no block to form a GEMM from; the work is dominated by reading the cache.
#[allow(clippy::too_many_arguments)]
pub fn attention_cached(
    out: &mut [f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    k_cache: &mut [f32],
    v_cache: &mut [f32],
    start: &[u32],
    shape: &CacheShape,
) {
    let op = "attention_cached";
    let CacheShape {
        batch,
        new,
        past,
        cap,
        heads,
    } = *shape;
    let AttnShape {
        n_heads,
        n_kv_heads,
        head_dim: hd,
        window,
        scale,
        softcap,
    } = heads;
    check_shape(op, &heads, &[0], &[]);
    assert!(
        past + new <= cap,
        "{op}: {past} cached + {new} new rows exceed the capacity {cap}"
    );
    assert!(
        start.len() == batch,
        "{op}: {} starts for {batch} sequences",
        start.len()
    );
    let (qw, kvw) = (heads.q_width(), heads.kv_width());
    let rows = batch * new;
    check_len(op, "out", out.len(), rows * qw);
    check_len(op, "q", q.len(), rows * qw);
    check_len(op, "k", k.len(), rows * kvw);
    check_len(op, "v", v.len(), rows * kvw);
    check_len(op, "k_cache", k_cache.len(), batch * cap * kvw);
    check_len(op, "v_cache", v_cache.len(), batch * cap * kvw);
    for b in 0..batch {
        let dst = (b * cap + past) * kvw..(b * cap + past + new) * kvw;
        let src = b * new * kvw..(b + 1) * new * kvw;
        k_cache[dst.clone()].copy_from_slice(&k[src.clone()]);
        v_cache[dst].copy_from_slice(&v[src]);
    }
    let (kc, vc) = (&*k_cache, &*v_cache);
    let group = n_heads / n_kv_heads;
    out[..rows * qw]
        .par_chunks_mut(qw)
        .enumerate()
        .for_each_init(Vec::new, |p, (r, o)| {
            let b = r / new;
            let t = past + r % new;
            let lo = (start[b] as usize).max(first_key(t, window));
            if lo > t {
                o.fill(0.0);
                return;
            }
            p.resize(t + 1 - lo, 0.0);
            for (h, oh) in o.chunks_exact_mut(hd).enumerate() {
                let qh = &q[r * qw + h * hd..][..hd];
                let kv = (b * cap + lo) * kvw + (h / group) * hd;
                attend_cached(oh, qh, kc, vc, kv, kvw, scale, softcap, p);
            }
        });
}

multiversion! {
    /// One query head against its visible cached keys: `o = softmax(cap(scale q Kᵀ)) V` with
    /// the forward's arithmetic (f32 scores, f32 exp, the softmax sum in f64). Key `j` of the
    /// `p.len()` visible ones is at `kv + j · kvw` in both caches.
    #[allow(clippy::too_many_arguments)]
    fn attend_cached(o: &mut [f32], qh: &[f32], kc: &[f32], vc: &[f32], kv: usize, kvw: usize, scale: f32, softcap: Option<f32>, p: &mut [f32]) {
        let hd = qh.len();
        for (j, pj) in p.iter_mut().enumerate() {
            *pj = dot_f64(qh, &kc[kv + j * kvw..][..hd]) as f32 * scale;
        }
        cap_scores(p, softcap);
        let m = max_f32(p);
        let inv = (1.0 / exp_shift_sum(p, m)) as f32;
        o.fill(0.0);
        for (j, pj) in p.iter().enumerate() {
            let w = pj * inv;
            for (a, x) in o.iter_mut().zip(&vc[kv + j * kvw..][..hd]) {
                *a += w * x;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;
    use crate::util::rng::Rng;

    /// A test case: packed sequence lengths and the heads.
    struct Case {
        lens: Vec<usize>,
        sh: AttnShape,
    }

    impl Case {
        fn cu(&self) -> Vec<usize> {
            let mut cu = vec![0];
            for l in &self.lens {
                cu.push(cu[cu.len() - 1] + l);
            }
            cu
        }
        fn rows(&self) -> usize {
            self.lens.iter().sum()
        }
    }

    /// Attention in f64, straight from the definition: returns (out, lse `[n_heads, n]`).
    fn naive(q: &[f64], k: &[f64], v: &[f64], c: &Case) -> (Vec<f64>, Vec<f64>) {
        let sh = &c.sh;
        let (qw, kvw, hd, n) = (sh.q_width(), sh.kv_width(), sh.head_dim, c.rows());
        let group = sh.n_heads / sh.n_kv_heads;
        let mut out = vec![0.0; n * qw];
        let mut lse = vec![0.0; sh.n_heads * n];
        let cu = c.cu();
        for (sq, &t) in c.lens.iter().enumerate() {
            let r0 = cu[sq];
            for h in 0..sh.n_heads {
                let kvh = h / group;
                for i in 0..t {
                    let qi = &q[(r0 + i) * qw + h * hd..][..hd];
                    let keys: Vec<usize> = (0..=i)
                        .filter(|&j| sh.window.is_none_or(|w| j + w > i))
                        .collect();
                    let s: Vec<f64> = keys
                        .iter()
                        .map(|&j| {
                            let x =
                                sh.scale as f64 * dot(qi, &k[(r0 + j) * kvw + kvh * hd..][..hd]);
                            sh.softcap.map_or(x, |c| c as f64 * (x / c as f64).tanh())
                        })
                        .collect();
                    let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
                    lse[h * n + r0 + i] = m + z.ln();
                    for (sj, &j) in s.iter().zip(&keys) {
                        let p = (sj - m).exp() / z;
                        for e in 0..hd {
                            out[(r0 + i) * qw + h * hd + e] += p * v[(r0 + j) * kvw + kvh * hd + e];
                        }
                    }
                }
            }
        }
        (out, lse)
    }

    fn case(lens: &[usize], nh: usize, nkv: usize, hd: usize, w: Option<usize>) -> Case {
        Case {
            lens: lens.to_vec(),
            sh: AttnShape::plain(nh, nkv, hd, w),
        }
    }

    /// The same case with another scale and a soft-cap.
    fn capped(mut c: Case, scale: f32, cap: f32) -> Case {
        c.sh.scale = scale;
        c.sh.softcap = Some(cap);
        c
    }

    fn inputs(rng: &mut Rng, c: &Case) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        // Spread 1.5 makes some softmax rows peaked and others flat.
        let mut g = |n| {
            rng.normal_vec(n)
                .iter()
                .map(|x| 1.5 * x)
                .collect::<Vec<f32>>()
        };
        let n = c.rows();
        (
            g(n * c.sh.q_width()),
            g(n * c.sh.kv_width()),
            g(n * c.sh.kv_width()),
        )
    }

    fn fwd(q: &[f32], k: &[f32], v: &[f32], c: &Case) -> (Vec<f32>, Vec<f32>) {
        let mut out = vec![f32::NAN; q.len()];
        let mut lse = vec![f32::NAN; c.sh.n_heads * c.rows()];
        attention_fwd(&mut out, &mut lse, q, k, v, &c.cu(), &c.sh);
        (out, lse)
    }

    /// Forward against f64 on packed sequences (lengths 1, under and over a block), GQA, MHA,
    /// sliding windows (shorter and longer than a block), and soft-capping at a cap the scores
    /// exceed (|s| up to ~10 against c = 2, so tanh saturates) with a scale that is not
    /// 1/sqrt(hd). The f32 GEMMs have error ~sqrt(T)·2^-24 and exp_f32 ~2 ulp: ~1e-6 relative;
    /// bound 1e-5. lse likewise.
    #[test]
    fn forward_matches_f64() {
        let mut rng = Rng::new(61);
        for c in [
            case(&[1], 1, 1, 2, None),
            case(&[7, 7], 4, 2, 4, None),
            case(&[9], 3, 1, 8, Some(3)),
            case(&[150, 1, 90], 3, 1, 16, Some(40)),
            case(&[200], 2, 2, 64, Some(100)),
            case(&[130, 5, 64, 65], 6, 3, 32, None),
            capped(case(&[20, 1, 70], 4, 2, 16, Some(8)), 0.6, 2.0),
            capped(case(&[33, 12], 2, 1, 8, None), 0.3, 0.5),
        ] {
            let (q, k, v) = inputs(&mut rng, &c);
            let (out, lse) = fwd(&q, &k, &v, &c);
            let (wo, wl) = naive(&f64s(&q), &f64s(&k), &f64s(&v), &c);
            assert_close(
                &format!("attention out {:?} {:?}", c.lens, c.sh),
                &out,
                &wo,
                1e-5,
            );
            assert_close(
                &format!("attention lse {:?} {:?}", c.lens, c.sh),
                &lse,
                &wl,
                1e-5,
            );
        }
    }

    /// Packing keeps sequences apart: changing every input of one sequence leaves the outputs
    /// and lse of the others bit for bit the same, and each sequence's output equals that
    /// sequence run alone.
    #[test]
    fn sequences_do_not_see_each_other() {
        let mut rng = Rng::new(63);
        let c = capped(case(&[37, 1, 80, 12], 4, 2, 8, Some(20)), 0.4, 3.0);
        let (q, k, v) = inputs(&mut rng, &c);
        let (out, lse) = fwd(&q, &k, &v, &c);
        let cu = c.cu();
        let (qw, kvw, n) = (c.sh.q_width(), c.sh.kv_width(), c.rows());
        // Sequence 2 changed.
        let (mut q2, mut k2, mut v2) = (q.clone(), k.clone(), v.clone());
        let (a, b) = (cu[2], cu[3]);
        q2[a * qw..b * qw].iter_mut().for_each(|x| *x = -*x + 0.5);
        k2[a * kvw..b * kvw].iter_mut().for_each(|x| *x *= 1.7);
        v2[a * kvw..b * kvw].iter_mut().for_each(|x| *x -= 1.0);
        let (out2, lse2) = fwd(&q2, &k2, &v2, &c);
        for (sq, w) in cu.windows(2).enumerate() {
            let same = out[w[0] * qw..w[1] * qw] == out2[w[0] * qw..w[1] * qw]
                && (0..c.sh.n_heads)
                    .all(|h| lse[h * n + w[0]..h * n + w[1]] == lse2[h * n + w[0]..h * n + w[1]]);
            assert_eq!(same, sq != 2, "sequence {sq}");
            // Alone.
            let one = Case {
                lens: vec![w[1] - w[0]],
                sh: c.sh,
            };
            let (o1, _) = fwd(
                &q[w[0] * qw..w[1] * qw],
                &k[w[0] * kvw..w[1] * kvw],
                &v[w[0] * kvw..w[1] * kvw],
                &one,
            );
            assert_eq!(o1, out[w[0] * qw..w[1] * qw], "sequence {sq} alone");
        }
    }

    /// dq, dk, dv against f64 central differences of `L = Σ out ⊙ R` (every coordinate), with
    /// packed sequences, GQA, a sliding window, two query blocks and soft-capping. The
    /// differences are exact to ~1e-9 (smooth f64 function); the analytic gradient carries the
    /// f32 rounding of P recomputed from the f32 lse (~|lse|·2^-24 relative) and of dP - D:
    /// measured <= 3e-7, bound 1e-5.
    #[test]
    fn backward_is_the_gradient() {
        let mut rng = Rng::new(62);
        for c in [
            case(&[3], 1, 1, 2, None),
            case(&[6, 2, 6], 4, 2, 4, None),
            case(&[9, 1], 3, 1, 6, Some(3)),
            case(&[70], 2, 1, 4, Some(50)),
            capped(case(&[5, 8, 1], 2, 1, 4, Some(4)), 0.7, 1.5),
            capped(case(&[66, 3], 2, 2, 4, None), 0.45, 2.0),
        ] {
            let (q, k, v) = inputs(&mut rng, &c);
            let r = rng.normal_vec(q.len());
            let (out, lse) = fwd(&q, &k, &v, &c);
            // Poison the outputs: attention_bwd must overwrite, not accumulate.
            let (mut dq, mut dk, mut dv) = (
                rng.normal_vec(q.len()),
                rng.normal_vec(k.len()),
                rng.normal_vec(v.len()),
            );
            attention_bwd(
                &mut dq,
                &mut dk,
                &mut dv,
                &r,
                &out,
                &lse,
                &q,
                &k,
                &v,
                &c.cu(),
                &c.sh,
            );
            let (q64, k64, v64, r64) = (f64s(&q), f64s(&k), f64s(&v), f64s(&r));
            let fd_q = fd_grad(&q64, |x| dot(&naive(x, &k64, &v64, &c).0, &r64));
            let fd_k = fd_grad(&k64, |x| dot(&naive(&q64, x, &v64, &c).0, &r64));
            let fd_v = fd_grad(&v64, |x| dot(&naive(&q64, &k64, x, &c).0, &r64));
            let what = format!("{:?} {:?}", c.lens, c.sh);
            assert_close(&format!("dq {what}"), &dq, &fd_q, 1e-5);
            assert_close(&format!("dk {what}"), &dk, &fd_k, 1e-5);
            assert_close(&format!("dv {what}"), &dv, &fd_v, 1e-5);
        }
    }

    /// The cached path against the f64 definition: sequences of different lengths left-padded
    /// to a common prompt length, a prefill of the prompt, then one row at a time; every row
    /// must equal full causal attention over that sequence's own tokens (padding invisible),
    /// with GQA, with a sliding window and with soft-capping. Same 1e-5 bound as the forward.
    #[test]
    fn cached_matches_full_attention() {
        let mut rng = Rng::new(67);
        for heads in [
            AttnShape::plain(4, 2, 8, None),
            AttnShape::plain(3, 3, 16, Some(3)),
            AttnShape::plain(6, 1, 4, None),
            AttnShape {
                scale: 0.8,
                softcap: Some(1.5),
                ..AttnShape::plain(4, 1, 8, Some(6))
            },
        ] {
            let lens = [7usize, 4, 9];
            let (prompt, steps) = (5, 4);
            let cap = prompt + steps + 2;
            let batch = lens.len();
            let total = prompt + steps; // timeline rows used
                                        // Each sequence b's tokens occupy timeline rows start[b] .. total.
            let start: Vec<u32> = lens.iter().map(|&l| (total - l) as u32).collect();
            let all = Case {
                lens: vec![total; batch],
                sh: heads,
            };
            let (qa, ka, va) = inputs(&mut rng, &all);
            let (qw, kvw) = (heads.q_width(), heads.kv_width());
            let cs = |new, past| CacheShape {
                batch,
                new,
                past,
                cap,
                heads,
            };
            let mut kc = rng.normal_vec(batch * cap * kvw); // garbage the op must not read
            let mut vc = rng.normal_vec(batch * cap * kvw);
            // Rows [t0, t1) of every sequence, batched as the op takes them.
            let rows = |x: &[f32], width: usize, t0: usize, t1: usize| -> Vec<f32> {
                (0..batch)
                    .flat_map(|b| x[(b * total + t0) * width..(b * total + t1) * width].to_vec())
                    .collect()
            };
            let mut got = vec![vec![0f32; 0]; batch];
            let mut step = |t0: usize, t1: usize, kc: &mut Vec<f32>, vc: &mut Vec<f32>| {
                let n = t1 - t0;
                let mut out = vec![f32::NAN; batch * n * qw];
                attention_cached(
                    &mut out,
                    &rows(&qa, qw, t0, t1),
                    &rows(&ka, kvw, t0, t1),
                    &rows(&va, kvw, t0, t1),
                    kc,
                    vc,
                    &start,
                    &cs(n, t0),
                );
                for (b, g) in got.iter_mut().enumerate() {
                    g.extend_from_slice(&out[b * n * qw..(b + 1) * n * qw]);
                }
            };
            step(0, prompt, &mut kc, &mut vc);
            for t in prompt..total {
                step(t, t + 1, &mut kc, &mut vc);
            }
            for (b, &len) in lens.iter().enumerate() {
                let s = total - len;
                let sub = |x: &[f32], width: usize| {
                    f64s(&x[(b * total + s) * width..(b * total + total) * width])
                };
                let one = Case {
                    lens: vec![len],
                    sh: heads,
                };
                let (want, _) = naive(&sub(&qa, qw), &sub(&ka, kvw), &sub(&va, kvw), &one);
                let g = &got[b];
                assert!(
                    g[..s * qw].iter().all(|&x| x == 0.0),
                    "padding rows are zero"
                );
                assert_close("attention_cached", &g[s * qw..], &want, 1e-5);
            }
        }
    }
}
