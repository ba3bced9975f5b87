//! Vector-friendly scalar building blocks and run-time ISA dispatch.
//!
//! The crate is compiled for baseline x86-64 (SSE2), so the loops below would only use 128-bit
//! vectors. [`multiversion!`] compiles a row kernel three times (AVX-512, AVX2+FMA, baseline)
//! and picks one per call from the CPU's features (the check is a cached atomic load).
//!
//! The helpers are written so LLVM can vectorise them without reassociating floating point:
//! sums use `LANES` independent f64 accumulators combined in a fixed order, so results do not
//! depend on the ISA or the thread count.

/// Independent accumulators per reduction (two AVX-512 registers of f64; with 8 LLVM keeps
/// them in 128-bit registers and the sums run at half the speed).
const LANES: usize = 16;

/// Defines `fn name(args) -> ret` whose body is compiled for AVX-512, for AVX2+FMA and for the
/// baseline, dispatching on the running CPU. The body must be safe code.
macro_rules! multiversion {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn body($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512dq,avx512vl,avx2,fma")]
                unsafe fn v4($($arg: $ty),*) $(-> $ret)? { body($($arg),*) }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn v3($($arg: $ty),*) $(-> $ret)? { body($($arg),*) }
                if std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512dq")
                    && std::arch::is_x86_feature_detected!("avx512vl")
                {
                    // SAFETY: the CPU supports every feature `v4` is compiled for (checked
                    // just above); the body itself is safe code.
                    return unsafe { v4($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: as above, for AVX2 and FMA.
                    return unsafe { v3($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
}
pub(crate) use multiversion;

/// `e^x` in f32 within ~2 ulp, written branch-free so loops over it vectorise.
///
/// `e^x = 2^n · e^r` with `n = round(x·log2 e)` and `r = x - n·ln 2` (ln 2 split in two parts,
/// Cody–Waite, so `r` is exact to f32 precision), `|r| <= ln2/2`; `e^r` by a degree-7
/// minimax-style polynomial (the Cephes `expf` coefficients); `2^n` built from exponent bits.
/// Inputs below -87.3 give 0 (the true value is below f32's normal range), inputs above 88 are
/// clamped to 88 (only `exp(-g)` of a very negative gate gets there; the result stays finite).
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5·2^23: adding it rounds to the nearest integer and leaves n in the low mantissa bits.
    const MAGIC: f32 = 12_582_912.0;
    let xc = x.min(88.0);
    let t = xc * LOG2E + MAGIC;
    let n = t - MAGIC;
    let ni = (t.to_bits() as i32).wrapping_sub(MAGIC.to_bits() as i32);
    let r = (xc - n * LN2_HI) - n * LN2_LO;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let er = p * r * r + r + 1.0;
    // n is in [-126, 127] here, so 2^n is a normal float.
    let pow2 = f32::from_bits((ni.wrapping_add(127) as u32) << 23);
    let y = er * pow2;
    if x < -87.3 {
        0.0
    } else {
        y
    }
}

/// Combines lane accumulators in a fixed order.
#[inline(always)]
fn combine(acc: [f64; LANES]) -> f64 {
    acc.iter().sum()
}

/// `Σ x_i` accumulated in f64.
#[inline(always)]
pub fn sum_f64(x: &[f32]) -> f64 {
    let mut acc = [0f64; LANES];
    let cx = x.chunks_exact(LANES);
    let rx = cx.remainder();
    for c in cx {
        for l in 0..LANES {
            acc[l] += c[l] as f64;
        }
    }
    combine(acc) + rx.iter().map(|v| *v as f64).sum::<f64>()
}

/// `Σ a_i b_i` accumulated in f64.
#[inline(always)]
pub fn dot_f64(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "dot_f64: length mismatch");
    let mut acc = [0f64; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..LANES {
            acc[l] += x[l] as f64 * y[l] as f64;
        }
    }
    let mut tail = 0.0;
    for (x, y) in ra.iter().zip(rb) {
        tail += *x as f64 * *y as f64;
    }
    combine(acc) + tail
}

/// `Σ a_i b_i c_i` accumulated in f64 (the rmsnorm backward's `Σ w dy s`).
#[inline(always)]
pub fn dot3_f64(a: &[f32], b: &[f32], c: &[f32]) -> f64 {
    assert!(
        a.len() == b.len() && b.len() == c.len(),
        "dot3_f64: length mismatch"
    );
    let mut acc = [0f64; LANES];
    let (ca, cb, cc) = (
        a.chunks_exact(LANES),
        b.chunks_exact(LANES),
        c.chunks_exact(LANES),
    );
    let (ra, rb, rc) = (ca.remainder(), cb.remainder(), cc.remainder());
    for ((x, y), z) in ca.zip(cb).zip(cc) {
        for l in 0..LANES {
            acc[l] += x[l] as f64 * y[l] as f64 * z[l] as f64;
        }
    }
    let mut tail = 0.0;
    for ((x, y), z) in ra.iter().zip(rb).zip(rc) {
        tail += *x as f64 * *y as f64 * *z as f64;
    }
    combine(acc) + tail
}

/// `Σ a_i b_i` with `a` in f64 and `b` in f32, accumulated in f64.
#[inline(always)]
pub fn dot_f64_mixed(a: &[f64], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "dot_f64_mixed: length mismatch");
    let mut acc = [0f64; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..LANES {
            acc[l] += x[l] * y[l] as f64;
        }
    }
    let mut tail = 0.0;
    for (x, y) in ra.iter().zip(rb) {
        tail += *x * *y as f64;
    }
    combine(acc) + tail
}

/// Maximum of a non-empty slice (NaN-propagation is not needed: inputs are finite).
#[inline(always)]
pub fn max_f32(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let cx = x.chunks_exact(LANES);
    let rx = cx.remainder();
    // A compare-and-select, unlike f32::max's NaN rules, maps to one vector max instruction.
    for c in cx {
        for l in 0..LANES {
            acc[l] = if c[l] > acc[l] { c[l] } else { acc[l] };
        }
    }
    let mut m = f32::NEG_INFINITY;
    for v in rx.iter().chain(acc.iter()) {
        if *v > m {
            m = *v;
        }
    }
    m
}

/// `x_i <- e^(x_i - shift)` in place; returns `Σ e^(x_i - shift)` accumulated in f64.
/// Two passes: the f32 exp loop vectorises at full width only without f64 work inside it.
#[inline(always)]
pub fn exp_shift_sum(x: &mut [f32], shift: f32) -> f64 {
    for v in x.iter_mut() {
        *v = exp_f32(*v - shift);
    }
    sum_f64(x)
}

/// `Σ e^(x_i - shift)` accumulated in f64, `x` untouched (through a small stack buffer).
#[inline(always)]
pub fn sum_exp_shift(x: &[f32], shift: f32) -> f64 {
    let mut buf = [0f32; 512];
    let mut total = 0.0;
    for c in x.chunks(buf.len()) {
        let b = &mut buf[..c.len()];
        b.copy_from_slice(c);
        total += exp_shift_sum(b, shift);
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::rng::Rng;

    /// The polynomial exp against f64's over the whole range softmax and SiLU use. Cephes'
    /// coefficients give about 1 ulp (6e-8 relative); 3e-7 leaves room for the rounding of
    /// `x·log2 e` and still fails for any wrong coefficient or range reduction.
    #[test]
    fn exp_f32_is_accurate() {
        let mut rng = Rng::new(7);
        let mut worst = 0.0f64;
        for i in 0..200_000 {
            let x = if i % 2 == 0 {
                rng.uniform(-87.0, 88.0) as f32
            } else {
                rng.uniform(-10.0, 10.0) as f32
            };
            let want = (x as f64).exp();
            let got = exp_f32(x) as f64;
            worst = worst.max(((got - want) / want).abs());
        }
        assert!(worst < 3e-7, "exp_f32 worst relative error {worst:e}");
        assert_eq!(exp_f32(-100.0), 0.0);
        assert_eq!(exp_f32(0.0), 1.0);
        assert!(exp_f32(200.0).is_finite());
    }

    /// The lane-split reductions against a plain f64 loop, on odd lengths that exercise the
    /// remainder path; both sides are f64 sums of the same f64 products, so they agree to a few
    /// f64 ulps (1e-12 relative).
    #[test]
    fn reductions_match_plain_loops() {
        let mut rng = Rng::new(8);
        for n in [1usize, 7, 8, 9, 63, 577] {
            let a = rng.normal_vec(n);
            let b = rng.normal_vec(n);
            let c = rng.normal_vec(n);
            let want: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
            let tol = 1e-12 * a.iter().map(|x| (*x as f64).abs() * 10.0).sum::<f64>();
            assert!((dot_f64(&a, &b) - want).abs() < tol, "dot n={n}");
            let a64: Vec<f64> = a.iter().map(|x| *x as f64).collect();
            assert!((dot_f64_mixed(&a64, &b) - want).abs() < tol, "mixed n={n}");
            let want3: f64 = (0..n)
                .map(|i| a[i] as f64 * b[i] as f64 * c[i] as f64)
                .sum();
            assert!(
                (dot3_f64(&a, &b, &c) - want3).abs() < tol * 10.0,
                "dot3 n={n}"
            );
            let m = a.iter().fold(f32::NEG_INFINITY, |m, v| m.max(*v));
            assert_eq!(max_f32(&a), m, "max n={n}");
            let mut e = a.clone();
            let s0 = sum_exp_shift(&a, m);
            let s = exp_shift_sum(&mut e, m);
            assert!(
                ((s - s0) / s).abs() < 1e-12,
                "the two exp sums differ n={n}"
            );
            let want_plain: f64 = a.iter().map(|x| *x as f64).sum();
            assert!((sum_f64(&a) - want_plain).abs() < tol, "sum n={n}");
            let want_s: f64 = a.iter().map(|x| ((*x - m) as f64).exp()).sum();
            assert!(((s - want_s) / want_s).abs() < 1e-6, "exp sum n={n}");
            for (ei, ai) in e.iter().zip(&a) {
                let w = ((*ai - m) as f64).exp();
                assert!(((*ei as f64 - w) / w).abs() < 3e-7);
            }
        }
    }
}
