//! Full fine-tuning's ops on the CUDA backend (`linear_bwd_weight`, `bias_bwd`,
//! `norm_weight_bwd`, `embedding_bwd`, `params_to_act`: src/backend/cuda/weight_grad.rs and
//! kernels/weight_grad.cu) against the CPU reference, on the emulated GPU.
//!
//! Unlike tests/cuda_emulated_ops.rs, which launches each kernel by hand, these ops are checked
//! through `CudaBackend<bf16|f32>` itself (tests/cuda_emulated/gpu.rs: the fake driver runs the
//! kernels, the fake cuBLAS the GEMM), because their host side is half the op: the offset into
//! the flat gradient buffer, the two passes of the column sums and their scratch, the CSR of
//! the token ids, the GEMM's operand layout. The tests of `mod gpu` are marked "needs a CUDA
//! GPU" (on one, `--include-ignored` runs them there); `on_the_emulated_gpu` reruns them on the
//! emulated GPU, built with the weight_grad.cu kernel library only.
//!
//! Each case draws fresh random inputs (activations rounded through `T`, so the CPU reference
//! sees exactly the values the GPU does), a gradient buffer of random non-zero prior contents
//! with the op's slice at a non-zero offset and elements after it, and checks
//! - the slice against the CPU reference (relative L2 error, NaN never passes);
//! - every element outside the slice unchanged, bit for bit;
//! - a second GPU run bit-identical to the first (no atomics anywhere).
//!
//! Shapes: column counts that are no multiple of the 32-thread warp or the 256-thread tile
//! (partial tiles), row counts that span several 64-row chunks with a short last one, and one
//! past 128 chunks (8262 rows: 128 chunks of 65); embedding ids repeated many times (17 ids for
//! 300 rows), the table's first and last rows, widths above one block of threads; copies of a
//! master slice at an odd offset with `add` 0 and 1 and round-to-nearest-even ties.
//!
//! Tolerances, the same for bf16 and f32 (with bf16 inputs, the product of two bf16 values is
//! exact in f32, so in both cases only the summation order differs from the CPU's):
//! - column sums (`bias_bwd`, `norm_weight_bwd`): 1e-6 relative. The GPU sums in f32 (pass 1
//!   over a chunk of 64 rows, or n/128 past 8192, in order; pass 2 over at most 128 chunks),
//!   the CPU in f64.
//!   Measured worst: bias 2.9e-7 (f32) / 6.7e-8 (bf16), norm gain 2.9e-7 / 2.4e-7, both at
//!   8262 rows.
//! - `linear_bwd_weight`: 2e-6. The fake cuBLAS sums all n products in order in f32, the CPU
//!   reference (the gemm crate) in f32 in its own order. Measured worst 5.2e-7 (f32) / 2.3e-7 (bf16), at n = 1000;
//!   exact at the smaller shapes.
//! - `embedding_bwd`: 0, equal bit for bit (measured 0). Each table element starts from its
//!   prior value and adds its rows in token order in f32, exactly as the CPU reference does.
//! - `params_to_act`: 0, equal to the CPU's f32 sum rounded to `T` on the host (measured 0).
//!
//! A term too many or too few moves a sum of n unit terms by about 1/√n of it: at least 1e-2
//! here, four orders above the tolerances.
//!
//! The tests can fail: each `a_*_fails` test builds the emulated GPU with one line of
//! weight_grad.cu broken and requires every test it runs to fail there. Measured (smallest and
//! largest error over the shapes, bf16 and f32):
//! - `a_broken_norm_gain_gradient_fails`, the `rstd` factor dropped: `norm_weight_bwd` 4.5e-1
//!   to 7.0e-1 (tol 1e-6);
//! - `a_skipped_row_fails`, each row chunk's last row skipped: `bias_bwd` 1.0e-1 to 7.6e-1;
//! - `a_skipped_row_chunk_fails`, the last chunk's partial sums never added: `bias_bwd` 2.8e-2
//!   (8262 rows: 1 of 128 chunks) to 9.9e-1, `norm_weight_bwd` 1.6e-2 to 1.1;
//! - `a_wrong_embedding_row_fails`, the batch's k-th token added instead of the id's k-th row:
//!   `embedding_bwd` 3.5e-1 to 1.35 (tol 0; the one-token shape cannot tell them apart);
//! - `a_forgotten_add_fails`, `add` left out: `params_to_act` 7.0e-1 to 1.0 where `add` = 1
//!   (tol 0; the `add` = 0 shapes cannot tell).
//!
//! `linear_bwd_weight` has no kernel of its own (cuBLAS), so it has no kept mutation check; its
//! host side was broken by hand once instead: beta 0 (the prior contents overwritten) gave
//! 3.1e-2 (n = 1000) to 7.9e-1; the product written at offset 0 instead of `off` gave 5.3e-1 to
//! 1.4 and changed the buffer outside the slice in every case.
//!
//! The same ops also run in the parity catalogue (`grad_*` and `params_to_act` cases of
//! src/backend/cuda/diagnostics/parity.rs: `caft-fast doctor`, tests/cuda_parity.rs).

#[path = "cuda_emulated/common.rs"]
mod common;
#[path = "cuda_emulated/gpu.rs"]
mod emulated_gpu;
#[path = "cuda_emulated/harness.rs"]
mod harness;
mod support;

use std::path::PathBuf;

/// The emulated GPU with only the weight_grad.cu kernel library (the ops here use no other),
/// that file passed through `edit`; `tag` names the variant.
fn build(tag: &str, edit: &dyn Fn(String) -> String) -> PathBuf {
    emulated_gpu::build_edited(tag, &["weight_grad"], &|file, text| {
        if file == "weight_grad.cu" {
            edit(text)
        } else {
            text
        }
    })
    .unwrap_or_else(|e| panic!("building the emulated GPU ({tag}): {e}"))
}

/// Every test of `mod gpu` on the emulated GPU.
#[test]
fn on_the_emulated_gpu() {
    let name = "on_the_emulated_gpu";
    if emulated_gpu::is_child() || !emulated_gpu::available(name) {
        return;
    }
    let dir = build("-weight-grad", &|t| t);
    let (ok, text) = emulated_gpu::run_ignored(&dir, name, &["gpu::"]);
    println!("{text}");
    assert!(
        ok,
        "the weight-gradient tests failed on the emulated GPU:\n{text}"
    );
}

/// Build weight_grad.cu with `from` replaced by `to` and run the tests of `mod gpu` matching
/// `filters`: every one of them must fail, and each of their lines is printed (the errors).
fn assert_mutant_fails(test: &str, tag: &str, from: &str, to: &str, filters: &[&str]) {
    if emulated_gpu::is_child() || !emulated_gpu::available(test) {
        return;
    }
    let dir = build(tag, &|t| common::mutate("weight_grad.cu", t, from, to));
    let (ok, text) = emulated_gpu::run_ignored(&dir, test, filters);
    for line in text.lines().filter(|l| l.contains("rel.err")) {
        println!("{line}");
    }
    assert!(
        !ok,
        "{test}: the mutant passed on the emulated GPU:\n{text}"
    );
    // libtest lists the failed tests by name, indented, after "failures:".
    let ran: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("test gpu::"))
        .map(|l| l.split_whitespace().next().unwrap_or(""))
        .collect();
    assert!(!ran.is_empty(), "{test}: no test ran:\n{text}");
    for name in ran {
        let listed = format!("gpu::{name}");
        assert!(
            text.lines().any(|l| l.trim() == listed),
            "{test}: {listed} passed with the mutant:\n{text}"
        );
    }
}

#[test]
fn a_broken_norm_gain_gradient_fails() {
    assert_mutant_fails(
        "a_broken_norm_gain_gradient_fails",
        "-mutant-wg-rstd",
        "to_f32(x[at]) * rstd[i];",
        "to_f32(x[at]);",
        &["gpu::norm_weight_bwd"],
    );
}

#[test]
fn a_skipped_row_fails() {
    assert_mutant_fails(
        "a_skipped_row_fails",
        "-mutant-wg-row",
        "for (int i = r0; i < r1; i++)",
        "for (int i = r0; i + 1 < r1; i++)",
        &["gpu::bias_bwd"],
    );
}

#[test]
fn a_skipped_row_chunk_fails() {
    assert_mutant_fails(
        "a_skipped_row_chunk_fails",
        "-mutant-wg-chunk",
        "for (int c = 0; c < chunks; c++)",
        "for (int c = 0; c + 1 < chunks; c++)",
        &["gpu::bias_bwd", "gpu::norm_weight_bwd"],
    );
}

#[test]
fn a_wrong_embedding_row_fails() {
    assert_mutant_fails(
        "a_wrong_embedding_row_fails",
        "-mutant-wg-embed",
        "dx[(long long)rows[k] * d + j]",
        "dx[(long long)k * d + j]",
        &["gpu::embedding_bwd"],
    );
}

#[test]
fn a_forgotten_add_fails() {
    assert_mutant_fails(
        "a_forgotten_add_fails",
        "-mutant-wg-add",
        "from_f32<T>(src[i] + add)",
        "from_f32<T>(src[i])",
        &["gpu::params_to_act"],
    );
}

/// The ops on a CUDA device (the emulated one under `on_the_emulated_gpu`).
mod gpu {
    use caft_fast::backend::cpu::CpuBackend;
    use caft_fast::backend::cuda::diagnostics::parity::rel_err;
    use caft_fast::backend::cuda::{probe, ColumnSums, CudaBackend, DeviceElem, Runtime};
    use caft_fast::backend::Backend;
    use caft_fast::util::rng::Rng;
    use half::bf16;
    use std::fmt::Debug;
    use std::sync::{Arc, OnceLock};

    /// Column sums: f32 sums in another order than the CPU's f64 (see the file's doc comment).
    const TOL_SUM: f64 = 1e-6;
    /// The GEMM: the fake cuBLAS sums all n products in order in f32 (n = 1000 here).
    const TOL_GEMM: f64 = 2e-6;
    /// The embedding gradient and the copies: the CPU's own arithmetic.
    const EXACT: f64 = 0.0;

    fn runtime() -> Arc<Runtime> {
        static RT: OnceLock<Arc<Runtime>> = OnceLock::new();
        RT.get_or_init(|| {
            let p = probe();
            assert!(p.usable(), "{}", p.summary());
            Arc::new(Runtime::new(0).expect("opening CUDA device 0"))
        })
        .clone()
    }

    fn backend<T: DeviceElem>() -> CudaBackend<T> {
        CudaBackend::<T>::with_runtime(runtime()).expect("CUDA backend")
    }

    /// Normal values times `scale`, rounded through `T` (what the GPU stores).
    fn act<T: DeviceElem>(rng: &mut Rng, len: usize, scale: f32) -> Vec<f32> {
        rng.normal_vec(len)
            .into_iter()
            .map(|x| T::from_f32(x * scale).to_f32())
            .collect()
    }

    /// A gradient buffer: random prior contents around a slice of `len` at `off`.
    struct Grad {
        prior: Vec<f32>,
        off: usize,
        len: usize,
    }

    impl Grad {
        fn new(rng: &mut Rng, off: usize, len: usize) -> Grad {
            Grad {
                prior: rng.normal_vec(off + len + 5),
                off,
                len,
            }
        }
    }

    /// One case's outcome: the slice's error, the rest of the buffer unchanged, the repeat.
    struct Outcome {
        err: f64,
        outside_kept: bool,
        repeat_equal: bool,
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    /// Compare the GPU's buffer after the op (`run`, called twice on fresh uploads) with the
    /// CPU's (`want`) on the slice, and with the prior contents outside it.
    fn compare(g: &Grad, want: &[f32], run: &dyn Fn() -> Vec<f32>) -> Outcome {
        let (got, again) = (run(), run());
        let r = g.off..g.off + g.len;
        let outside = |v: &[f32]| bits(&[&v[..g.off], &v[r.end..]].concat());
        Outcome {
            err: rel_err(&got[r.clone()], &want[r.clone()]),
            outside_kept: got.len() == g.prior.len()
                && outside(&got) == outside(&g.prior)
                && outside(want) == outside(&g.prior),
            repeat_equal: bits(&got) == bits(&again),
        }
    }

    /// Run `case` for every shape, print a line each, and fail listing the bad ones.
    fn check<T: DeviceElem, S: Debug>(
        op: &str,
        seed: u64,
        tol: f64,
        shapes: &[S],
        case: &dyn Fn(&mut Rng, &S) -> Outcome,
    ) {
        let mut rng = Rng::new(seed);
        let mut failures = Vec::new();
        for s in shapes {
            let o = case(&mut rng, s);
            let ok = o.err.is_finite() && o.err <= tol && o.outside_kept && o.repeat_equal;
            println!(
                "{op:<18} {:<5} {s:?}  rel.err {:.2e} (tol {tol:.0e}){}{}{}",
                T::SUFFIX,
                o.err,
                if o.outside_kept {
                    ""
                } else {
                    "  OUTSIDE THE SLICE CHANGED"
                },
                if o.repeat_equal {
                    ""
                } else {
                    "  REPEAT DIFFERS"
                },
                if ok { "" } else { "  FAIL" }
            );
            if !ok {
                failures.push(format!("{s:?}: rel.err {:.3e}", o.err));
            }
        }
        assert!(
            failures.is_empty(),
            "{op} ({}):\n{}",
            T::SUFFIX,
            failures.join("\n")
        );
    }

    // ---- linear_bwd_weight -------------------------------------------------------------

    #[derive(Debug)]
    struct Linear {
        n: usize,
        d_in: usize,
        d_out: usize,
        off: usize,
    }

    const LINEAR: [Linear; 4] = [
        Linear {
            n: 1,
            d_in: 3,
            d_out: 5,
            off: 1,
        },
        Linear {
            n: 7,
            d_in: 33,
            d_out: 17,
            off: 13,
        },
        Linear {
            n: 129,
            d_in: 100,
            d_out: 70,
            off: 3,
        },
        Linear {
            n: 1000,
            d_in: 64,
            d_out: 48,
            off: 1001,
        },
    ];

    fn linear_bwd_weight<T: DeviceElem>(seed: u64) {
        check::<T, _>("linear_bwd_weight", seed, TOL_GEMM, &LINEAR, &|rng, s| {
            let (n, d_in, d_out) = (s.n, s.d_in, s.d_out);
            let dy = act::<T>(rng, n * d_out, 1.0);
            let x = act::<T>(rng, n * d_in, 1.0);
            let g = Grad::new(rng, s.off, d_out * d_in);
            let mut want = g.prior.clone();
            CpuBackend::new()
                .linear_bwd_weight(&mut want, g.off, &dy, &x, n, d_in, d_out)
                .unwrap();
            let be = backend::<T>();
            compare(&g, &want, &|| {
                let mut dw = be.upload_f32(&g.prior).unwrap();
                let (dy, x) = (be.upload_act(&dy).unwrap(), be.upload_act(&x).unwrap());
                be.linear_bwd_weight(&mut dw, g.off, &dy, &x, n, d_in, d_out)
                    .unwrap();
                be.download_f32(&dw).unwrap()
            })
        });
    }

    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn linear_bwd_weight_f32() {
        linear_bwd_weight::<f32>(41);
    }

    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn linear_bwd_weight_bf16() {
        linear_bwd_weight::<bf16>(42);
    }

    // ---- bias_bwd, norm_weight_bwd ---------------------------------------------------------

    #[derive(Debug)]
    struct Cols {
        n: usize,
        d: usize,
        off: usize,
    }

    /// Partial warps and tiles (5, 33, 257, 600 = 2·256 + 88 columns), one row, one whole chunk,
    /// 2, 5 and 16 chunks with a short last one, and 128 chunks of 65 rows (past 128 · 64).
    const COLS: [Cols; 7] = [
        Cols { n: 1, d: 5, off: 2 },
        Cols {
            n: 64,
            d: 33,
            off: 7,
        },
        Cols {
            n: 65,
            d: 257,
            off: 1,
        },
        Cols {
            n: 300,
            d: 100,
            off: 300,
        },
        Cols {
            n: 1000,
            d: 600,
            off: 5,
        },
        Cols {
            n: 2 * 64 + 3,
            d: 256,
            off: 9,
        },
        Cols {
            n: 128 * 64 + 70,
            d: 37,
            off: 11,
        },
    ];

    /// The shapes cover what the doc comment says they cover.
    #[test]
    fn column_shapes_cover_tiles_and_chunks() {
        let shapes: Vec<ColumnSums> = COLS.iter().map(|s| ColumnSums::new(s.n, s.d)).collect();
        assert!(COLS.iter().any(|s| s.d % 256 != 0 && s.d > 256));
        assert!(shapes.iter().any(|c| c.tiles >= 3));
        assert!(COLS
            .iter()
            .zip(&shapes)
            .any(|(s, c)| c.chunks >= 5 && s.n % c.rows_per_chunk != 0));
        assert!(shapes
            .iter()
            .any(|c| c.chunks == 128 && c.rows_per_chunk > 64));
    }

    fn bias_bwd<T: DeviceElem>(seed: u64) {
        check::<T, _>("bias_bwd", seed, TOL_SUM, &COLS, &|rng, s| {
            let (n, d) = (s.n, s.d);
            let dy = act::<T>(rng, n * d, 1.0);
            let g = Grad::new(rng, s.off, d);
            let mut want = g.prior.clone();
            CpuBackend::new()
                .bias_bwd(&mut want, g.off, &dy, n, d)
                .unwrap();
            let be = backend::<T>();
            compare(&g, &want, &|| {
                let mut db = be.upload_f32(&g.prior).unwrap();
                let dy = be.upload_act(&dy).unwrap();
                be.bias_bwd(&mut db, g.off, &dy, n, d).unwrap();
                be.download_f32(&db).unwrap()
            })
        });
    }

    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn bias_bwd_f32() {
        bias_bwd::<f32>(43);
    }

    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn bias_bwd_bf16() {
        bias_bwd::<bf16>(44);
    }

    fn norm_weight_bwd<T: DeviceElem>(seed: u64) {
        check::<T, _>("norm_weight_bwd", seed, TOL_SUM, &COLS, &|rng, s| {
            let (n, d) = (s.n, s.d);
            let dn = act::<T>(rng, n * d, 1.0);
            let x = act::<T>(rng, n * d, 2.0);
            // rstd of rows of unequal scale (0.3 .. 3), as the forward leaves it.
            let rstd: Vec<f32> = (0..n).map(|_| rng.uniform(0.3, 3.0) as f32).collect();
            let g = Grad::new(rng, s.off, d);
            let mut want = g.prior.clone();
            CpuBackend::new()
                .norm_weight_bwd(&mut want, g.off, &dn, &x, &rstd, n, d)
                .unwrap();
            let be = backend::<T>();
            compare(&g, &want, &|| {
                let mut dw = be.upload_f32(&g.prior).unwrap();
                let (dn, x) = (be.upload_act(&dn).unwrap(), be.upload_act(&x).unwrap());
                let rstd = be.upload_f32(&rstd).unwrap();
                be.norm_weight_bwd(&mut dw, g.off, &dn, &x, &rstd, n, d)
                    .unwrap();
                be.download_f32(&dw).unwrap()
            })
        });
    }

    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn norm_weight_bwd_f32() {
        norm_weight_bwd::<f32>(45);
    }

    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn norm_weight_bwd_bf16() {
        norm_weight_bwd::<bf16>(46);
    }

    // ---- embedding_bwd ------------------------------------------------------------------

    #[derive(Debug)]
    struct Embed {
        n: usize,
        d: usize,
        vocab: usize,
        off: usize,
    }

    /// One token; 9 tokens of 5 ids; 300 tokens of 17 ids (each about 18 times); 64 tokens
    /// of a 1000-row table (mostly distinct), rows wider than a block of threads.
    const EMBED: [Embed; 4] = [
        Embed {
            n: 1,
            d: 4,
            vocab: 3,
            off: 1,
        },
        Embed {
            n: 9,
            d: 37,
            vocab: 5,
            off: 6,
        },
        Embed {
            n: 300,
            d: 100,
            vocab: 17,
            off: 100,
        },
        Embed {
            n: 64,
            d: 300,
            vocab: 1000,
            off: 3,
        },
    ];

    fn embedding_bwd<T: DeviceElem>(seed: u64) {
        check::<T, _>("embedding_bwd", seed, EXACT, &EMBED, &|rng, s| {
            let (n, d) = (s.n, s.d);
            // The table's last and first rows, then random ones (repeats included).
            let ids: Vec<u32> = (0..n)
                .map(|i| match i {
                    0 => s.vocab - 1,
                    1 => 0,
                    _ => rng.below(s.vocab),
                } as u32)
                .collect();
            let dx = act::<T>(rng, n * d, 1.0);
            let g = Grad::new(rng, s.off, s.vocab * d);
            let mut want = g.prior.clone();
            CpuBackend::new()
                .embedding_bwd(&mut want, g.off, &dx, &ids, d)
                .unwrap();
            let be = backend::<T>();
            compare(&g, &want, &|| {
                let mut dt = be.upload_f32(&g.prior).unwrap();
                let dx = be.upload_act(&dx).unwrap();
                be.embedding_bwd(&mut dt, g.off, &dx, &ids, d).unwrap();
                be.download_f32(&dt).unwrap()
            })
        });
    }

    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn embedding_bwd_f32() {
        embedding_bwd::<f32>(47);
    }

    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn embedding_bwd_bf16() {
        embedding_bwd::<bf16>(48);
    }

    // ---- params_to_act ------------------------------------------------------------------

    #[derive(Debug)]
    struct CopyShape {
        len: usize,
        off: usize,
        add: f32,
    }

    /// One element; a misaligned slice; more elements than one block (1000) and than the
    /// grid's first pass (70000: several blocks); Gemma's `1 + w` (add = 1).
    const COPY: [CopyShape; 5] = [
        CopyShape {
            len: 1,
            off: 0,
            add: 1.0,
        },
        CopyShape {
            len: 37,
            off: 3,
            add: 0.0,
        },
        CopyShape {
            len: 1000,
            off: 1,
            add: 1.0,
        },
        CopyShape {
            len: 70_000,
            off: 5,
            add: 0.0,
        },
        CopyShape {
            len: 70_000,
            off: 7,
            add: 1.0,
        },
    ];

    /// Master values whose sum with `add` (0 or 1) is a bf16 tie, halfway between two bf16
    /// neighbours: round-to-nearest-even must take the even one, for either `add`.
    fn ties(add: f32) -> Vec<f32> {
        let ulp = 2f32.powi(-7); // bf16's spacing in [1, 2)
        [1.0 + ulp / 2.0, 1.0 + 3.0 * ulp / 2.0, -(1.0 + ulp / 2.0)]
            .into_iter()
            .map(|v| v - add)
            .collect()
    }

    fn params_to_act<T: DeviceElem>(seed: u64) {
        check::<T, _>("params_to_act", seed, EXACT, &COPY, &|rng, s| {
            let mut src = rng.normal_vec(s.off + s.len + 4);
            for (k, t) in ties(s.add).into_iter().enumerate() {
                if k < s.len {
                    src[s.off + k] = t;
                }
            }
            let mut cpu = vec![f32::NAN; s.len];
            CpuBackend::new()
                .params_to_act(&mut cpu, &src, s.off, s.add)
                .unwrap();
            // The reference rounded to T on the host (`DeviceElem::from_f32`: nearest even).
            let want: Vec<f32> = cpu.iter().map(|&v| T::from_f32(v).to_f32()).collect();
            // The whole destination is the slice (it starts NaN: every element must be written).
            let g = Grad {
                prior: want.clone(),
                off: 0,
                len: s.len,
            };
            let be = backend::<T>();
            compare(&g, &want, &|| {
                let mut dst = be.upload_act(&vec![f32::NAN; s.len]).unwrap();
                let src = be.upload_f32(&src).unwrap();
                be.params_to_act(&mut dst, &src, s.off, s.add).unwrap();
                be.download_act(&dst).unwrap()
            })
        });
    }

    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn params_to_act_f32() {
        params_to_act::<f32>(49);
    }

    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn params_to_act_bf16() {
        params_to_act::<bf16>(50);
    }
}
