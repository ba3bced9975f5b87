//! Frozen linear layers and LoRA, forward and backward. Every product is one [`matmul`] on
//! strided views: `W: [out, in]` row-major is read as `Wᵀ` through its strides, never copied.
//!
//! Shapes (row-major): `x [n, d_in]`, `W [d_out, d_in]`, `A [r, d_in]`, `B [d_out, r]`,
//! `u = x Aᵀ [n, r]`. The LoRA branch is `y += scale · u Bᵀ`; its gradients follow from
//! `dL/du = scale · dy B`: `dB = scale · dyᵀ u`, `dA = duᵀ x`, `dx = du A`.

use super::simd::multiversion;
use super::{check_len, check_min, matmul, MatRef, Threads};
use crate::backend::LoraSlot;
use rayon::prelude::*;

/// Linear layers over few rows (a decoding step's batch) take one of three paths. The GEMM
/// crate packs its right operand; as `x Wᵀ` that operand is the whole weight matrix, which pays
/// off only when many rows share the packed copy. Measured on SmolLM2 decoding (2 cores,
/// AVX-512, ms a step at batch 1 / 4 / 8 / 16 / 32 / 128):
///
/// | path | 1 | 4 | 8 | 16 | 32 | 128 |
/// | --- | ---: | ---: | ---: | ---: | ---: | ---: |
/// | `x Wᵀ` (GEMM) | 46 | | 123 | ~200 | 195 | 315 |
/// | streaming (below) | 36 | 57 | 85 | 144 | 271 | |
/// | `(W xᵀ)ᵀ` (GEMM on the transpose) | 58 | 67 | 73 | 82 | 138 | 368 |
///
/// Up to `STREAM_MAX_ROWS` rows each weight row is streamed once against every input row (the
/// memory-bound regime); up to `TRANSPOSED_MAX_ROWS` the GEMM computes the transpose, packing
/// only the input rows; above that, the plain GEMM.
const STREAM_MAX_ROWS: usize = 4;
const TRANSPOSED_MAX_ROWS: usize = 64;

/// Rows of `W` per parallel task of the streaming path.
const STREAM_BLOCK: usize = 16;

multiversion! {
    /// `out[j*n + i] = x_i · w_j` for the rows `w_j` of one block of `W`: `w_j` comes from
    /// memory once and from L1 for the other input rows; sums use 16 lanes combined in a fixed
    /// order, so results do not depend on the ISA or the thread count.
    fn stream_block(w: &[f32], x: &[f32], d_in: usize, n: usize, out: &mut [f32]) {
        let full = d_in / 16 * 16;
        let reduce = |acc: &[f32; 16], a: &[f32], b: &[f32]| -> f32 {
            let mut s = 0.0;
            for v in acc {
                s += v;
            }
            for (p, q) in a[full..].iter().zip(&b[full..]) {
                s += p * q;
            }
            s
        };
        for (wj, oj) in w.chunks_exact(d_in).zip(out.chunks_exact_mut(n)) {
            for (o, xr) in oj.iter_mut().zip(x.chunks_exact(d_in)) {
                let mut acc = [0f32; 16];
                for (wv, xv) in wj[..full].chunks_exact(16).zip(xr[..full].chunks_exact(16)) {
                    for l in 0..16 {
                        acc[l] += wv[l] * xv[l];
                    }
                }
                *o = reduce(&acc, wj, xr);
            }
        }
    }
}

/// `y (+)= x Wᵀ` for few rows (see [`STREAM_MAX_ROWS`]): parallel over blocks of `W` rows,
/// products gathered transposed (`[d_out, n]`) and written into `y` at the end.
fn linear_streaming(
    y: &mut [f32],
    x: &[f32],
    w: &[f32],
    n: usize,
    d_in: usize,
    d_out: usize,
    accumulate: bool,
) {
    if n == 0 || d_out == 0 {
        return;
    }
    let mut yt = vec![0f32; d_out * n];
    yt.par_chunks_mut(STREAM_BLOCK * n)
        .zip(w[..d_out * d_in].par_chunks(STREAM_BLOCK * d_in))
        .for_each(|(o, wb)| stream_block(wb, &x[..n * d_in], d_in, n, o));
    add_transposed(y, &yt, n, d_out, accumulate);
}

/// `y (+)= ytᵀ` with `y: [n, d_out]`, `yt: [d_out, n]`.
fn add_transposed(y: &mut [f32], yt: &[f32], n: usize, d_out: usize, accumulate: bool) {
    for (i, row) in y[..n * d_out].chunks_exact_mut(d_out).enumerate() {
        for (j, v) in row.iter_mut().enumerate() {
            let p = yt[j * n + i];
            *v = if accumulate { *v + p } else { p };
        }
    }
}

/// `y (+)= x Wᵀ (+ bias)`.
#[allow(clippy::too_many_arguments)]
pub fn linear(
    y: &mut [f32],
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    n: usize,
    d_in: usize,
    d_out: usize,
    accumulate: bool,
) {
    check_len("linear", "y", y.len(), n * d_out);
    check_len("linear", "x", x.len(), n * d_in);
    check_len("linear", "w", w.len(), d_out * d_in);
    if n <= STREAM_MAX_ROWS {
        linear_streaming(y, x, w, n, d_in, d_out, accumulate);
    } else if n <= TRANSPOSED_MAX_ROWS {
        // yᵀ = W xᵀ: the GEMM then packs the few input rows and walks W as its left operand.
        let mut yt = vec![0f32; d_out * n];
        matmul(
            &mut yt,
            n,
            MatRef::rows(w, d_in),
            MatRef::transposed(x, d_in),
            d_out,
            n,
            d_in,
            1.0,
            false,
            Threads::All,
        );
        add_transposed(y, &yt, n, d_out, accumulate);
    } else {
        matmul(
            y,
            d_out,
            MatRef::rows(x, d_in),
            MatRef::transposed(w, d_in),
            n,
            d_out,
            d_in,
            1.0,
            accumulate,
            Threads::All,
        );
    }
    if let Some(bias) = bias {
        check_len("linear", "bias", bias.len(), d_out);
        let bias = &bias[..d_out];
        y[..n * d_out]
            .par_chunks_mut(d_out)
            .with_min_len(16)
            .for_each(|row| row.iter_mut().zip(bias).for_each(|(v, b)| *v += b));
    }
}

/// `dx (+)= dy W`.
pub fn linear_bwd_input(
    dx: &mut [f32],
    dy: &[f32],
    w: &[f32],
    n: usize,
    d_in: usize,
    d_out: usize,
    accumulate: bool,
) {
    check_len("linear_bwd_input", "dx", dx.len(), n * d_in);
    check_len("linear_bwd_input", "dy", dy.len(), n * d_out);
    check_len("linear_bwd_input", "w", w.len(), d_out * d_in);
    matmul(
        dx,
        d_in,
        MatRef::rows(dy, d_out),
        MatRef::rows(w, d_in),
        n,
        d_in,
        d_out,
        1.0,
        accumulate,
        Threads::All,
    );
}

/// Checks that a slot's `A` and `B` lie inside a buffer of `len` elements and do not overlap.
fn check_slot(op: &str, slot: &LoraSlot, len: usize) {
    let a_len = slot.r * slot.d_in;
    let b_len = slot.d_out * slot.r;
    check_min(op, "LoRA A (params/grads)", len, slot.a_off + a_len);
    check_min(op, "LoRA B (params/grads)", len, slot.b_off + b_len);
    assert!(
        slot.a_off + a_len <= slot.b_off || slot.b_off + b_len <= slot.a_off,
        "{op}: LoRA A and B overlap in {slot:?}"
    );
}

/// `u = x Aᵀ`, then `y += scale · u Bᵀ`.
pub fn lora_fwd(
    y: &mut [f32],
    u: &mut [f32],
    x: &[f32],
    params: &[f32],
    slot: &LoraSlot,
    scale: f32,
    n: usize,
) {
    let LoraSlot {
        a_off,
        b_off,
        r,
        d_in,
        d_out,
    } = *slot;
    check_slot("lora_fwd", slot, params.len());
    check_len("lora_fwd", "y", y.len(), n * d_out);
    check_len("lora_fwd", "u", u.len(), n * r);
    check_len("lora_fwd", "x", x.len(), n * d_in);
    let a = &params[a_off..a_off + r * d_in];
    let b = &params[b_off..b_off + d_out * r];
    matmul(
        u,
        r,
        MatRef::rows(x, d_in),
        MatRef::transposed(a, d_in),
        n,
        r,
        d_in,
        1.0,
        false,
        Threads::All,
    );
    matmul(
        y,
        d_out,
        MatRef::rows(u, r),
        MatRef::transposed(b, r),
        n,
        d_out,
        r,
        scale,
        true,
        Threads::All,
    );
}

/// `dB += scale · dyᵀ u`, `du = scale · dy B`, `dA += duᵀ x`, `dx += du A`.
#[allow(clippy::too_many_arguments)]
pub fn lora_bwd(
    dx: &mut [f32],
    grads: &mut [f32],
    dy: &[f32],
    x: &[f32],
    u: &[f32],
    params: &[f32],
    slot: &LoraSlot,
    scale: f32,
    n: usize,
) {
    let LoraSlot {
        a_off,
        b_off,
        r,
        d_in,
        d_out,
    } = *slot;
    check_slot("lora_bwd", slot, params.len());
    check_slot("lora_bwd", slot, grads.len());
    check_len("lora_bwd", "dx", dx.len(), n * d_in);
    check_len("lora_bwd", "dy", dy.len(), n * d_out);
    check_len("lora_bwd", "x", x.len(), n * d_in);
    check_len("lora_bwd", "u", u.len(), n * r);
    let a = &params[a_off..a_off + r * d_in];
    let b = &params[b_off..b_off + d_out * r];
    matmul(
        &mut grads[b_off..b_off + d_out * r],
        r,
        MatRef::transposed(dy, d_out),
        MatRef::rows(u, r),
        d_out,
        r,
        n,
        scale,
        true,
        Threads::All,
    );
    // du is n x r (r ~ 8..64): small next to the products around it.
    let mut du = vec![0.0f32; n * r];
    matmul(
        &mut du,
        r,
        MatRef::rows(dy, d_out),
        MatRef::rows(b, r),
        n,
        r,
        d_out,
        scale,
        false,
        Threads::All,
    );
    matmul(
        &mut grads[a_off..a_off + r * d_in],
        d_in,
        MatRef::transposed(&du, r),
        MatRef::rows(x, d_in),
        r,
        d_in,
        n,
        1.0,
        true,
        Threads::All,
    );
    matmul(
        dx,
        d_in,
        MatRef::rows(&du, r),
        MatRef::rows(a, d_in),
        n,
        d_in,
        r,
        1.0,
        true,
        Threads::All,
    );
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;
    use crate::util::rng::Rng;

    /// `x Wᵀ` in f64.
    fn naive_xwt(x: &[f64], w: &[f64], n: usize, d_in: usize, d_out: usize) -> Vec<f64> {
        let mut y = vec![0.0; n * d_out];
        for i in 0..n {
            for o in 0..d_out {
                y[i * d_out + o] = (0..d_in).map(|c| x[i * d_in + c] * w[o * d_in + c]).sum();
            }
        }
        y
    }

    /// LoRA branch `scale · (x Aᵀ) Bᵀ` in f64.
    #[allow(clippy::too_many_arguments)]
    fn naive_lora(
        x: &[f64],
        a: &[f64],
        b: &[f64],
        scale: f64,
        n: usize,
        r: usize,
        d_in: usize,
        d_out: usize,
    ) -> Vec<f64> {
        let u = naive_xwt(x, a, n, d_in, r);
        naive_xwt(&u, b, n, r, d_out)
            .iter()
            .map(|v| v * scale)
            .collect()
    }

    // Forward tolerance: f32 GEMM error is about sqrt(k)·2^-24 relative per dot product
    // (k <= 300 here: ~1e-6); 1e-5 on the norm-relative error leaves 10x margin.
    const FWD_TOL: f64 = 1e-5;

    #[test]
    fn linear_matches_f64_with_bias_and_accumulate() {
        let mut rng = Rng::new(11);
        // Each of the three paths: streaming (n <= 4; d_in with and without a tail past the
        // 16-wide chunks), the GEMM on the transpose (5..=64 rows), the plain GEMM (above).
        for &(n, d_in, d_out) in &[
            (1, 1, 1),
            (3, 35, 20),
            (4, 48, 9),
            (5, 7, 3),
            (6, 48, 37),
            (16, 35, 20),
            (17, 35, 20),
            (33, 65, 17),
            (64, 300, 129),
            (65, 40, 70),
            (130, 17, 9),
        ] {
            let x = rng.normal_vec(n * d_in);
            let w = rng.normal_vec(d_out * d_in);
            let bias = rng.normal_vec(d_out);
            let y0 = rng.normal_vec(n * d_out);
            let xw = naive_xwt(&f64s(&x), &f64s(&w), n, d_in, d_out);
            for (acc, with_bias) in [(false, false), (false, true), (true, false), (true, true)] {
                let mut y = y0.clone();
                linear(
                    &mut y,
                    &x,
                    &w,
                    with_bias.then_some(&bias[..]),
                    n,
                    d_in,
                    d_out,
                    acc,
                );
                let want: Vec<f64> = (0..n * d_out)
                    .map(|i| {
                        xw[i]
                            + if acc { y0[i] as f64 } else { 0.0 }
                            + if with_bias {
                                bias[i % d_out] as f64
                            } else {
                                0.0
                            }
                    })
                    .collect();
                assert_close(
                    &format!("linear {n}x{d_in}->{d_out} acc={acc}"),
                    &y,
                    &want,
                    FWD_TOL,
                );
            }
        }
    }

    /// `dx = dy W` is the gradient of `L = Σ (x Wᵀ) ⊙ dy` with respect to `x`; the function is
    /// linear, so f64 central differences are exact up to f64 rounding and the comparison
    /// measures only the f32 GEMM's rounding (FWD_TOL).
    #[test]
    fn linear_bwd_input_is_the_gradient() {
        let mut rng = Rng::new(12);
        for &(n, d_in, d_out) in &[(1, 1, 1), (3, 5, 4), (9, 31, 17)] {
            let x = rng.normal_vec(n * d_in);
            let w = rng.normal_vec(d_out * d_in);
            let dy = rng.normal_vec(n * d_out);
            let dx0 = rng.normal_vec(n * d_in);
            let (w64, dy64) = (f64s(&w), f64s(&dy));
            let fd = fd_grad(&f64s(&x), |x| {
                dot(&naive_xwt(x, &w64, n, d_in, d_out), &dy64)
            });
            let mut dx = vec![0.0; n * d_in];
            linear_bwd_input(&mut dx, &dy, &w, n, d_in, d_out, false);
            assert_close("linear_bwd_input", &dx, &fd, FWD_TOL);
            let mut dx = dx0.clone();
            linear_bwd_input(&mut dx, &dy, &w, n, d_in, d_out, true);
            let want: Vec<f64> = fd.iter().zip(&dx0).map(|(g, d)| g + *d as f64).collect();
            assert_close("linear_bwd_input accumulate", &dx, &want, FWD_TOL);
        }
    }

    fn random_slot(rng: &mut Rng, r: usize, d_in: usize, d_out: usize) -> (LoraSlot, Vec<f32>) {
        // Put B first and leave gaps so offsets are exercised.
        let b_off = 3;
        let a_off = b_off + d_out * r + 5;
        let len = a_off + r * d_in + 2;
        (
            LoraSlot {
                a_off,
                b_off,
                r,
                d_in,
                d_out,
            },
            rng.normal_vec(len).iter().map(|v| v * 0.5).collect(),
        )
    }

    #[test]
    fn lora_fwd_matches_f64() {
        let mut rng = Rng::new(13);
        for &(n, r, d_in, d_out) in &[(1, 1, 1, 1), (7, 3, 11, 5), (40, 8, 96, 67)] {
            let (slot, params) = random_slot(&mut rng, r, d_in, d_out);
            let x = rng.normal_vec(n * d_in);
            let y0 = rng.normal_vec(n * d_out);
            let scale = 1.7f32;
            let mut y = y0.clone();
            let mut u = rng.normal_vec(n * r);
            lora_fwd(&mut y, &mut u, &x, &params, &slot, scale, n);
            let p = f64s(&params);
            let a = &p[slot.a_off..slot.a_off + r * d_in];
            let b = &p[slot.b_off..slot.b_off + d_out * r];
            let want_u = naive_xwt(&f64s(&x), a, n, d_in, r);
            assert_close("lora u", &u, &want_u, FWD_TOL);
            let branch = naive_lora(&f64s(&x), a, b, scale as f64, n, r, d_in, d_out);
            let want: Vec<f64> = branch.iter().zip(&y0).map(|(l, y)| l + *y as f64).collect();
            assert_close("lora y", &y, &want, FWD_TOL);
        }
    }

    /// dx, dA and dB against f64 central differences of `L = Σ lora(x) ⊙ dy`, and the
    /// accumulate semantics (existing gradients and dx are added to, other slots untouched).
    /// The branch is bilinear in (A, B) and linear in x, so the differences are exact up to
    /// f64 rounding; tolerance 1e-5 covers the f32 GEMMs (chained twice, hence ~2x FWD_TOL's
    /// estimate, still 5x margin).
    #[test]
    fn lora_bwd_is_the_gradient() {
        let mut rng = Rng::new(14);
        for &(n, r, d_in, d_out) in &[(1, 1, 1, 1), (6, 3, 7, 5), (13, 4, 19, 11)] {
            let (slot, params) = random_slot(&mut rng, r, d_in, d_out);
            let x = rng.normal_vec(n * d_in);
            let dy = rng.normal_vec(n * d_out);
            let scale = 0.8f32;
            let mut y = vec![0.0; n * d_out];
            let mut u = vec![0.0; n * r];
            lora_fwd(&mut y, &mut u, &x, &params, &slot, scale, n);
            // First from zero gradients, compared with the differences below; then again on
            // random existing gradients, which must come out as existing + the first result.
            let mut grads = vec![0.0; params.len()];
            let mut dx = vec![0.0; n * d_in];
            lora_bwd(&mut dx, &mut grads, &dy, &x, &u, &params, &slot, scale, n);
            let g0 = rng.normal_vec(params.len());
            let dx0 = rng.normal_vec(n * d_in);
            let (mut grads_acc, mut dx_acc) = (g0.clone(), dx0.clone());
            lora_bwd(
                &mut dx_acc,
                &mut grads_acc,
                &dy,
                &x,
                &u,
                &params,
                &slot,
                scale,
                n,
            );

            let (x64, p64, dy64) = (f64s(&x), f64s(&params), f64s(&dy));
            let (ar, br) = (
                slot.a_off..slot.a_off + r * d_in,
                slot.b_off..slot.b_off + d_out * r,
            );
            let loss = |x: &[f64], a: &[f64], b: &[f64]| {
                dot(&naive_lora(x, a, b, scale as f64, n, r, d_in, d_out), &dy64)
            };
            let fd_x = fd_grad(&x64, |x| loss(x, &p64[ar.clone()], &p64[br.clone()]));
            let fd_a = fd_grad(&p64[ar.clone()], |a| loss(&x64, a, &p64[br.clone()]));
            let fd_b = fd_grad(&p64[br.clone()], |b| loss(&x64, &p64[ar.clone()], b));
            assert_close("lora dx", &dx, &fd_x, 1e-5);
            assert_close("lora dA", &grads[ar.clone()], &fd_a, 1e-5);
            assert_close("lora dB", &grads[br.clone()], &fd_b, 1e-5);
            // Accumulation: one f32 addition per element on top of the same products.
            let sum = |a: &[f32], b: &[f32]| -> Vec<f64> {
                a.iter()
                    .zip(b)
                    .map(|(x, y)| *x as f64 + *y as f64)
                    .collect()
            };
            assert_close("lora dx accumulate", &dx_acc, &sum(&dx, &dx0), 1e-6);
            for i in 0..params.len() {
                let want = if ar.contains(&i) || br.contains(&i) {
                    g0[i] + grads[i]
                } else {
                    g0[i]
                };
                assert!(
                    (grads_acc[i] - want).abs() <= 1e-6 * want.abs().max(1.0),
                    "accumulated gradient {i}: {} vs {want}",
                    grads_acc[i]
                );
            }
        }
    }
}
