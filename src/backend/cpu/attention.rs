//! Causal (optionally sliding-window) softmax attention with GQA, and its backward.
//!
//! Per sequence `b` and head `h` (kv head `h / group`), `Q, K, V: [T, hd]` are strided views of
//! the projection outputs (row stride = the projection width), scale `c = 1/sqrt(hd)`:
//!   S = c Q Kᵀ,  P = softmax(S) over visible keys,  O = P V,  lse_i = log Σ_j e^(S_ij).
//! Backward (P recomputed from the saved lse, nothing T x T kept between the passes):
//!   D_i = Σ_d dO_id O_id,  dV = Pᵀ dO,  dP = dO Vᵀ,  dS = P ⊙ (dP - D),
//!   dQ = c dS K,  dK = c dSᵀ Q.
//!
//! Memory plan: queries go in blocks of `BLOCK` rows; a block only multiplies against the keys
//! some query in it can see (`lo..i1`), so causal masking skips almost half the work and a
//! sliding window skips the rest. The block's scores live in a per-task scratch of
//! `BLOCK x T` floats. The forward runs one rayon task per (sequence, head); the backward one
//! per (sequence, kv head), looping over the heads sharing it, so dK and dV are each written by
//! a single task. Every GEMM is single-threaded inside its task.

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

/// Validates a shape against the buffers and returns `(group, scale)`.
fn check_shape(op: &str, shape: &AttnShape, lens: &[(&str, usize, usize)]) -> (usize, f32) {
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
    for &(what, len, need) in lens {
        check_len(op, what, len, need);
    }
    (
        shape.n_heads / shape.n_kv_heads,
        (1.0 / (shape.head_dim as f64).sqrt()) as f32,
    )
}

multiversion! {
    /// Softmax of a score block in place (`bm x nk`, queries `i0..`, keys `lo..`), zeroing
    /// invisible keys, and the rows' log-sum-exps into `lse` (sums in f64).
    fn softmax_block(s: &mut [f32], nk: usize, i0: usize, lo: usize, window: Option<usize>, lse: &mut [f32]) {
        for (r, (row, l)) in s.chunks_exact_mut(nk).zip(lse.iter_mut()).enumerate() {
            let i = i0 + r;
            let (jlo, jhi) = (first_key(i, window) - lo, i + 1 - lo);
            let vis = &mut row[jlo..jhi];
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
    fn probs_block(s: &mut [f32], nk: usize, i0: usize, lo: usize, window: Option<usize>, lse: &[f32]) {
        for (r, (row, l)) in s.chunks_exact_mut(nk).zip(lse).enumerate() {
            let i = i0 + r;
            let (jlo, jhi) = (first_key(i, window) - lo, i + 1 - lo);
            row[jlo..jhi].iter_mut().for_each(|x| *x = exp_f32(*x - *l));
            row[..jlo].fill(0.0);
            row[jhi..].fill(0.0);
        }
    }
}

multiversion! {
    /// `dS = P ⊙ (dP - D)` in place on `dp`, one `D` per row.
    fn ds_block(p: &[f32], dp: &mut [f32], nk: usize, d: &[f32]) {
        for ((prow, drow), di) in p.chunks_exact(nk).zip(dp.chunks_exact_mut(nk)).zip(d) {
            for (x, pv) in drow.iter_mut().zip(prow) {
                *x = *pv * (*x - *di);
            }
        }
    }
}

pub fn attention_fwd(
    out: &mut [f32],
    lse: &mut [f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    shape: &AttnShape,
) {
    let (rows, qw, kvw) = (shape.rows(), shape.q_width(), shape.kv_width());
    let AttnShape {
        batch,
        seq: t,
        n_heads,
        head_dim: hd,
        window,
        ..
    } = *shape;
    let (group, scale) = check_shape(
        "attention_fwd",
        shape,
        &[
            ("out", out.len(), rows * qw),
            ("lse", lse.len(), batch * n_heads * t),
            ("q", q.len(), rows * qw),
            ("k", k.len(), rows * kvw),
            ("v", v.len(), rows * kvw),
        ],
    );
    if rows == 0 {
        return;
    }
    let out_ptr = SharedMut(out.as_mut_ptr());
    lse[..batch * n_heads * t]
        .par_chunks_mut(t)
        .enumerate()
        .for_each_init(
            || vec![0f32; BLOCK * t],
            |s, (bh, lse_bh)| {
                let (b, h) = (bh / n_heads, bh % n_heads);
                let kvh = h / group;
                let q0 = b * t * qw + h * hd;
                let kv0 = b * t * kvw + kvh * hd;
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
                    softmax_block(sb, nk, i0, lo, window, &mut lse_bh[i0..i1]);
                    // SAFETY: `out` holds rows*qw elements (checked); this writes rows
                    // b*t+i0 .. b*t+i1, columns h*hd .. (h+1)*hd, inside it. Only the task of
                    // (b, h) touches those elements, and `out` is borrowed mutably for the
                    // whole parallel section.
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

/// Per-task scratch of the backward: probabilities, their gradient, one `D` per block row.
struct BwdScratch {
    p: Vec<f32>,
    dp: Vec<f32>,
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
    shape: &AttnShape,
) {
    let (rows, qw, kvw) = (shape.rows(), shape.q_width(), shape.kv_width());
    let AttnShape {
        batch,
        seq: t,
        n_heads,
        n_kv_heads,
        head_dim: hd,
        window,
    } = *shape;
    let (group, scale) = check_shape(
        "attention_bwd",
        shape,
        &[
            ("dq", dq.len(), rows * qw),
            ("dk", dk.len(), rows * kvw),
            ("dv", dv.len(), rows * kvw),
            ("dout", dout.len(), rows * qw),
            ("out", out.len(), rows * qw),
            ("lse", lse.len(), batch * n_heads * t),
            ("q", q.len(), rows * qw),
            ("k", k.len(), rows * kvw),
            ("v", v.len(), rows * kvw),
        ],
    );
    if rows == 0 {
        return;
    }
    let (dq_ptr, dk_ptr, dv_ptr) = (
        SharedMut(dq.as_mut_ptr()),
        SharedMut(dk.as_mut_ptr()),
        SharedMut(dv.as_mut_ptr()),
    );
    (0..batch * n_kv_heads).into_par_iter().for_each_init(
        || BwdScratch {
            p: vec![0.0; BLOCK * t],
            dp: vec![0.0; BLOCK * t],
            d: vec![0.0; BLOCK],
        },
        |sc, bkv| {
            let (b, kvh) = (bkv / n_kv_heads, bkv % n_kv_heads);
            let kv0 = b * t * kvw + kvh * hd;
            // SAFETY (for every raw write in this task): dq holds rows*qw and dk, dv hold
            // rows*kvw elements (checked above). This task writes only rows b*t .. (b+1)*t of
            // them, and within those only kv head kvh's columns of dk, dv and the columns of
            // the heads sharing it (kvh*group .. (kvh+1)*group) of dq. Those sets are disjoint
            // across tasks, and the three buffers are borrowed mutably for the whole section.
            for i in 0..t {
                // SAFETY: see above; row b*t+i, kv head kvh's columns (dk and dv start at 0).
                unsafe {
                    std::ptr::write_bytes(dk_ptr.get().add(kv0 + i * kvw), 0, hd);
                    std::ptr::write_bytes(dv_ptr.get().add(kv0 + i * kvw), 0, hd);
                }
            }
            for h in kvh * group..(kvh + 1) * group {
                let q0 = b * t * qw + h * hd;
                let lse_bh = &lse[(b * n_heads + h) * t..(b * n_heads + h + 1) * t];
                for i0 in (0..t).step_by(BLOCK) {
                    let i1 = (i0 + BLOCK).min(t);
                    let bm = i1 - i0;
                    let lo = first_key(i0, window);
                    let nk = i1 - lo;
                    let (p, dp, d) = (&mut sc.p[..bm * nk], &mut sc.dp[..bm * nk], &mut sc.d[..bm]);
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
                    probs_block(p, nk, i0, lo, window, &lse_bh[i0..i1]);
                    // SAFETY: see the task's comment; rows b*t+lo .. b*t+i1, kv head kvh.
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
                        *di = super::simd::dot_f64(&dout[o..o + hd], &out[o..o + hd]) as f32;
                    }
                    ds_block(p, dp, nk, d);
                    // SAFETY: see the task's comment; rows b*t+i0 .. b*t+i1, head h of dq and
                    // rows b*t+lo .. b*t+i1, kv head kvh of dk.
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
        n_heads,
        n_kv_heads,
        head_dim: hd,
        window,
    } = *shape;
    assert!(
        n_kv_heads > 0 && n_heads.is_multiple_of(n_kv_heads),
        "{op}: n_heads {n_heads} is not a multiple of n_kv_heads {n_kv_heads}"
    );
    assert!(window != Some(0), "{op}: a sliding window of 0 sees no key");
    assert!(
        past + new <= cap,
        "{op}: {past} cached + {new} new rows exceed the capacity {cap}"
    );
    assert!(
        start.len() == batch,
        "{op}: {} starts for {batch} sequences",
        start.len()
    );
    let (qw, kvw) = (shape.q_width(), shape.kv_width());
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
    let scale = (1.0 / (hd as f64).sqrt()) as f32;
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
                attend_cached(oh, qh, kc, vc, kv, kvw, scale, p);
            }
        });
}

multiversion! {
    /// One query head against its visible cached keys: `o = softmax(c q Kᵀ) V` with the
    /// forward's arithmetic (f32 scores, f32 exp, the softmax sum in f64). Key `j` of the
    /// `p.len()` visible ones is at `kv + j · kvw` in both caches.
    #[allow(clippy::too_many_arguments)]
    fn attend_cached(o: &mut [f32], qh: &[f32], kc: &[f32], vc: &[f32], kv: usize, kvw: usize, scale: f32, p: &mut [f32]) {
        let hd = qh.len();
        for (j, pj) in p.iter_mut().enumerate() {
            *pj = dot_f64(qh, &kc[kv + j * kvw..][..hd]) as f32 * scale;
        }
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

    /// Attention in f64, straight from the definition: returns (out, lse).
    fn naive(q: &[f64], k: &[f64], v: &[f64], sh: &AttnShape) -> (Vec<f64>, Vec<f64>) {
        let (qw, kvw, t, hd) = (sh.q_width(), sh.kv_width(), sh.seq, sh.head_dim);
        let group = sh.n_heads / sh.n_kv_heads;
        let mut out = vec![0.0; sh.rows() * qw];
        let mut lse = vec![0.0; sh.batch * sh.n_heads * t];
        let scale = 1.0 / (hd as f64).sqrt();
        for b in 0..sh.batch {
            for h in 0..sh.n_heads {
                let kvh = h / group;
                for i in 0..t {
                    let qi = &q[(b * t + i) * qw + h * hd..][..hd];
                    let keys: Vec<usize> = (0..=i)
                        .filter(|&j| sh.window.is_none_or(|w| j + w > i))
                        .collect();
                    let s: Vec<f64> = keys
                        .iter()
                        .map(|&j| scale * dot(qi, &k[(b * t + j) * kvw + kvh * hd..][..hd]))
                        .collect();
                    let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
                    lse[(b * sh.n_heads + h) * t + i] = m + z.ln();
                    for (sj, &j) in s.iter().zip(&keys) {
                        let p = (sj - m).exp() / z;
                        for c in 0..hd {
                            out[(b * t + i) * qw + h * hd + c] +=
                                p * v[(b * t + j) * kvw + kvh * hd + c];
                        }
                    }
                }
            }
        }
        (out, lse)
    }

    fn shape(
        batch: usize,
        seq: usize,
        nh: usize,
        nkv: usize,
        hd: usize,
        w: Option<usize>,
    ) -> AttnShape {
        AttnShape {
            batch,
            seq,
            n_heads: nh,
            n_kv_heads: nkv,
            head_dim: hd,
            window: w,
        }
    }

    fn inputs(rng: &mut Rng, sh: &AttnShape) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        // Spread 1.5 makes some softmax rows peaked and others flat.
        let mut g = |n| {
            rng.normal_vec(n)
                .iter()
                .map(|x| 1.5 * x)
                .collect::<Vec<f32>>()
        };
        (
            g(sh.rows() * sh.q_width()),
            g(sh.rows() * sh.kv_width()),
            g(sh.rows() * sh.kv_width()),
        )
    }

    /// Forward against f64 on shapes with several query blocks, GQA, MHA and sliding windows
    /// (shorter and longer than a block). The f32 GEMMs have error ~sqrt(T)·2^-24 and exp_f32
    /// ~2 ulp: ~1e-6 relative; bound 1e-5 (the brief's). lse likewise.
    #[test]
    fn forward_matches_f64() {
        let mut rng = Rng::new(61);
        for sh in [
            shape(1, 1, 1, 1, 2, None),
            shape(2, 7, 4, 2, 4, None),
            shape(1, 9, 3, 1, 8, Some(3)),
            shape(2, 150, 3, 1, 16, Some(40)),
            shape(1, 200, 2, 2, 64, Some(100)),
            shape(3, 130, 6, 3, 32, None),
        ] {
            let (q, k, v) = inputs(&mut rng, &sh);
            let mut out = rng.normal_vec(q.len());
            let mut lse = rng.normal_vec(sh.batch * sh.n_heads * sh.seq);
            attention_fwd(&mut out, &mut lse, &q, &k, &v, &sh);
            let (wo, wl) = naive(&f64s(&q), &f64s(&k), &f64s(&v), &sh);
            assert_close(&format!("attention out {sh:?}"), &out, &wo, 1e-5);
            assert_close(&format!("attention lse {sh:?}"), &lse, &wl, 1e-5);
        }
    }

    /// dq, dk, dv against f64 central differences of `L = Σ out ⊙ R` (every coordinate), with
    /// GQA, a sliding window and two query blocks. The differences are exact to ~1e-9 (smooth
    /// f64 function); the analytic gradient carries the f32 rounding of P recomputed from the
    /// f32 lse (~|lse|·2^-24 relative) and of dP - D: measured <= 3e-7, bound 1e-5.
    #[test]
    fn backward_is_the_gradient() {
        let mut rng = Rng::new(62);
        for sh in [
            shape(1, 3, 1, 1, 2, None),
            shape(2, 6, 4, 2, 4, None),
            shape(1, 9, 3, 1, 6, Some(3)),
            shape(1, 70, 2, 1, 4, Some(50)),
        ] {
            let (q, k, v) = inputs(&mut rng, &sh);
            let r = rng.normal_vec(q.len());
            let mut out = vec![0.0; q.len()];
            let mut lse = vec![0.0; sh.batch * sh.n_heads * sh.seq];
            attention_fwd(&mut out, &mut lse, &q, &k, &v, &sh);
            // Poison the outputs: attention_bwd must overwrite, not accumulate.
            let (mut dq, mut dk, mut dv) = (
                rng.normal_vec(q.len()),
                rng.normal_vec(k.len()),
                rng.normal_vec(v.len()),
            );
            attention_bwd(&mut dq, &mut dk, &mut dv, &r, &out, &lse, &q, &k, &v, &sh);
            let (q64, k64, v64, r64) = (f64s(&q), f64s(&k), f64s(&v), f64s(&r));
            let fd_q = fd_grad(&q64, |x| dot(&naive(x, &k64, &v64, &sh).0, &r64));
            let fd_k = fd_grad(&k64, |x| dot(&naive(&q64, x, &v64, &sh).0, &r64));
            let fd_v = fd_grad(&v64, |x| dot(&naive(&q64, &k64, x, &sh).0, &r64));
            assert_close(&format!("dq {sh:?}"), &dq, &fd_q, 1e-5);
            assert_close(&format!("dk {sh:?}"), &dk, &fd_k, 1e-5);
            assert_close(&format!("dv {sh:?}"), &dv, &fd_v, 1e-5);
        }
    }

    /// The cached path against the f64 definition: sequences of different lengths left-padded
    /// to a common prompt length, a prefill of the prompt, then one row at a time; every row
    /// must equal full causal attention over that sequence's own tokens (padding invisible),
    /// with GQA and with a sliding window. Same 1e-5 bound as the forward.
    #[test]
    fn cached_matches_full_attention() {
        let mut rng = Rng::new(67);
        for &(nh, nkv, hd, w) in &[(4, 2, 8, None), (3, 3, 16, Some(3)), (6, 1, 4, None)] {
            let lens = [7usize, 4, 9];
            let (prompt, steps) = (5, 4);
            let cap = prompt + steps + 2;
            let batch = lens.len();
            let total = prompt + steps; // timeline rows used
                                        // Each sequence b's tokens occupy timeline rows start[b] .. total.
            let start: Vec<u32> = lens.iter().map(|&l| (total - l) as u32).collect();
            let full = shape(1, total, nh, nkv, hd, w);
            let (qa, ka, va) = inputs(&mut rng, &shape(batch, total, nh, nkv, hd, w));
            let (qw, kvw) = (full.q_width(), full.kv_width());
            let cs = |new, past| CacheShape {
                batch,
                new,
                past,
                cap,
                n_heads: nh,
                n_kv_heads: nkv,
                head_dim: hd,
                window: w,
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
                let one = shape(1, len, nh, nkv, hd, w);
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
