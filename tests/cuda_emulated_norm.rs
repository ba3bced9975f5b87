//! The CUDA kernels of `kernels/norm.cu`, run on the CPU under emulation, against the CPU
//! reference backend.
//!
//! Why: CI and most development machines have no GPU, so the kernels' logic (indexing, the
//! vector and scalar paths, block reductions, barrier placement, which outputs get written)
//! would otherwise be checked only when a GPU is at hand. Here each kernel is compiled as C++
//! against `cuda_emulated/cuda_shim.hpp` (one std::thread per CUDA thread, real barriers for
//! `__syncthreads`, a per-warp exchange for `__shfl_xor_sync`) and launched exactly as
//! `src/backend/cuda/norm.rs` launches it; the outputs are compared with
//! `caft_fast::backend::cpu` the way `backend::cuda::diagnostics::parity` compares a GPU: outputs
//! NaN-poisoned first, relative L2 error within 1e-5 (f32) or 1e-2 (bf16), NaN never passes.
//! The emulator also fails a launch that writes past a buffer or its dynamic shared memory,
//! passes arguments of the wrong kind or count, or leaves a barrier short of threads.
//!
//! Races: threads leave every `__syncthreads` out of step (the shim makes some yield), and the
//! shapes with the most directions run twice and must agree bit for bit, so a missing barrier
//! usually shows as a wrong or varying result; usually, not always. `CAFT_EMU_SANITIZE=thread`
//! builds the emulator with ThreadSanitizer, which names the unordered accesses.
//!
//! What it cannot check: timing, occupancy and register spills (tests/cuda_compile.rs); the
//! GPU memory model beyond what barriers order; GPU arithmetic details (nvcc contracts a*b+c
//! into FMA, g++ here does not: results differ by rounding); inline PTX, except the wrappers of
//! kernels/ptx.cuh (tests/cuda_emulated/ptx_emu.hpp). The real-GPU comparison stays
//! tests/cuda_parity.rs. The other kernels are tests/cuda_emulated_ops.rs (elementwise.cu,
//! loss.cu, optim.cu) and tests/cuda_emulated_attention.rs; what the files share is
//! tests/cuda_emulated/common.rs.
//!
//! Without g++ the tests fail when `CI` is set and are skipped with a notice otherwise (as in
//! tests/cuda_compile.rs). `CXX` picks another compiler; `CAFT_EMU_SANITIZE=address` (or
//! `thread`, `undefined`) adds `-fsanitize=` to the emulator build; `CAFT_EMU_KERNELS=<dir>`
//! takes the kernel sources from a directory instead of the ones embedded at build time.
//!
//! When the kernels change, adapt the section "The launches" (`norm_entries`, [`emulate_fwd`],
//! [`emulate_bwd`]): the only place that knows entry-point names, argument order and launch
//! shapes.

#[path = "cuda_emulated/common.rs"]
mod common;
#[path = "cuda_emulated/harness.rs"]
mod harness;
mod support;

use caft_fast::backend::cpu::CpuBackend;
use caft_fast::backend::cuda::NormLaunch;
use caft_fast::backend::Backend;
use caft_fast::linalg::gaussian_orthonormal;
use caft_fast::util::rng::Rng;
use common::{act, draw, have_compiler, poisoned, to_f32, Elem, Outputs};
use harness::{Arg, Launch, Module};
use std::sync::OnceLock;

// ==== The launches: as src/backend/cuda/norm.rs makes them ===================================
// Entry point, grid, block and shared memory come from the backend's own `NormLaunch`; only
// the argument lists are written out here (in the kernels' parameter order).

/// Every entry point norm.cu defines (the emulator's table; macro-made names cannot be found
/// by scanning the source).
fn norm_entries() -> Vec<String> {
    let mut v = Vec::new();
    for pass in ["fwd", "bwd"] {
        for suffix in ["f32", "bf16"] {
            for variant in NormLaunch::VARIANTS {
                v.push(format!("resid_ablate_norm_{pass}_{suffix}_{variant}"));
            }
        }
    }
    v
}

/// `CudaBackend::<T>::residual_ablate_norm`: returns (resid, normed, rstd) as f32.
fn emulate_fwd<T: Elem>(m: &Module, x: &FwdInputs) -> Result<Outputs, String> {
    let (n, d) = (x.n, x.d);
    let k = x.q.as_ref().map_or(0, |(_, k)| *k);
    let shape = NormLaunch::new::<T>("emulate_fwd", d).map_err(|e| e.to_string())?;
    let launch = Launch {
        entry: shape.entry("fwd", T::SUFFIX),
        grid: [shape.blocks(n), 1, 1],
        block: [shape.threads, 1, 1],
        smem_bytes: shape.smem_bytes(k),
        args: vec![
            poisoned::<T>(n * d),                                 // 0 T* resid
            poisoned::<T>(n * d),                                 // 1 T* normed
            poisoned::<f32>(n),                                   // 2 float* rstd
            act::<T>(&x.a),                                       // 3 const T* a
            x.b.as_ref().map_or(Arg::Null, |b| act::<T>(b)),      // 4 const T* b (nullable)
            x.q.as_ref().map_or(Arg::Null, |(q, _)| Arg::buf(q)), // 5 const float* q
            Arg::I32(k as i32),                                   // 6 int k
            act::<T>(&x.w),                                       // 7 const T* w
            Arg::I32(n as i32),                                   // 8 int n
            Arg::I32(d as i32),                                   // 9 int d
            Arg::F32(x.eps),                                      // 10 float eps
        ],
    };
    let after = m.run(&launch)?;
    Ok(vec![
        to_f32(&after.get::<T>(0)),
        to_f32(&after.get::<T>(1)),
        after.get::<f32>(2),
    ])
}

/// `CudaBackend::<T>::residual_ablate_norm_bwd`: returns the new dresid as f32.
fn emulate_bwd<T: Elem>(m: &Module, x: &BwdInputs) -> Result<Outputs, String> {
    let (n, d) = (x.n, x.d);
    let k = x.q.as_ref().map_or(0, |(_, k)| *k);
    let shape = NormLaunch::new::<T>("emulate_bwd", d).map_err(|e| e.to_string())?;
    let launch = Launch {
        entry: shape.entry("bwd", T::SUFFIX),
        grid: [shape.blocks(n), 1, 1],
        block: [shape.threads, 1, 1],
        smem_bytes: shape.smem_bytes(k),
        args: vec![
            act::<T>(&x.dresid),                                  // 0 T* dresid (in and out)
            act::<T>(&x.dnormed),                                 // 1 const T* dnormed
            act::<T>(&x.resid),                                   // 2 const T* resid
            Arg::buf(&x.rstd),                                    // 3 const float* rstd
            x.q.as_ref().map_or(Arg::Null, |(q, _)| Arg::buf(q)), // 4 const float* q
            Arg::I32(k as i32),                                   // 5 int k
            act::<T>(&x.w),                                       // 6 const T* w
            Arg::I32(n as i32),                                   // 7 int n
            Arg::I32(d as i32),                                   // 8 int d
        ],
    };
    let after = m.run(&launch)?;
    Ok(vec![to_f32(&after.get::<T>(0))])
}

// ==== Inputs and the CPU reference ===========================================================

/// `k` random orthonormal rows of length `d`.
fn directions(rng: &mut Rng, k: usize, d: usize) -> Vec<f32> {
    gaussian_orthonormal(rng, k, d).expect("k <= d Gaussian rows are independent")
}

struct FwdInputs {
    n: usize,
    d: usize,
    a: Vec<f32>,
    b: Option<Vec<f32>>,
    q: Option<(Vec<f32>, usize)>,
    w: Vec<f32>,
    eps: f32,
}

struct BwdInputs {
    n: usize,
    d: usize,
    dresid: Vec<f32>,
    dnormed: Vec<f32>,
    resid: Vec<f32>,
    rstd: Vec<f32>,
    q: Option<(Vec<f32>, usize)>,
    w: Vec<f32>,
}

#[derive(Clone, Copy, Debug)]
struct Shape {
    n: usize,
    d: usize,
    k: usize,
    with_b: bool,
}

/// Every d with every k (0: no projection; 13: a partial second group of directions), n and
/// the presence of b rotating through the combinations. The widths reach every launch variant
/// of both types (`NormLaunch`): 37 the scalar path; 24, 64, 1536, 2048 one chunk per thread
/// and 4 rows per block (f32 2048: two chunks, 2 rows); 3584 two chunks (f32: four); 6144,
/// bf16 only (f32 rows that wide are not supported), four chunks and one row.
fn shapes<T: Elem>() -> Vec<Shape> {
    const DS: [usize; 7] = [24, 37, 64, 1536, 2048, 3584, 6144];
    // k up to 64 (the issue's "at least 64 directions") where d has room for them: k < d, as
    // k = d projects out everything and leaves rounding noise, which rmsnorm then scales up.
    const KS: [usize; 5] = [0, 1, 8, 13, 64];
    const NS: [usize; 4] = [1, 3, 7, 9];
    let mut out = Vec::new();
    for (i, &d) in DS.iter().enumerate() {
        if NormLaunch::new::<T>("shapes", d).is_err() {
            continue;
        }
        for (j, &k) in KS.iter().enumerate().filter(|&(_, &k)| k < d) {
            out.push(Shape {
                n: NS[(i + j) % NS.len()],
                d,
                k,
                with_b: (i + j) % 2 == 0,
            });
        }
    }
    out
}

fn fwd_inputs<T: Elem>(rng: &mut Rng, s: Shape) -> FwdInputs {
    FwdInputs {
        n: s.n,
        d: s.d,
        a: draw::<T>(rng, s.n * s.d, 1.0),
        b: s.with_b.then(|| draw::<T>(rng, s.n * s.d, 1.0)),
        q: (s.k > 0).then(|| (directions(rng, s.k, s.d), s.k)),
        w: draw::<T>(rng, s.d, 1.0),
        eps: 1e-5,
    }
}

fn bwd_inputs<T: Elem>(rng: &mut Rng, s: Shape) -> BwdInputs {
    BwdInputs {
        n: s.n,
        d: s.d,
        dresid: draw::<T>(rng, s.n * s.d, 1.0),
        dnormed: draw::<T>(rng, s.n * s.d, 1.0),
        resid: draw::<T>(rng, s.n * s.d, 1.0),
        rstd: rng
            .normal_vec(s.n)
            .into_iter()
            .map(|x| 1.0 + (0.1 * x).abs())
            .collect(),
        q: (s.k > 0).then(|| (directions(rng, s.k, s.d), s.k)),
        w: draw::<T>(rng, s.d, 1.0),
    }
}

fn cpu_fwd(x: &FwdInputs) -> Outputs {
    let (n, d) = (x.n, x.d);
    let (mut resid, mut normed, mut rstd) = (
        vec![f32::NAN; n * d],
        vec![f32::NAN; n * d],
        vec![f32::NAN; n],
    );
    CpuBackend::new()
        .residual_ablate_norm(
            &mut resid,
            &mut normed,
            &mut rstd,
            &x.a,
            x.b.as_ref(),
            x.q.as_ref().map(|(q, k)| (q, *k)),
            &x.w,
            n,
            d,
            x.eps,
        )
        .expect("CPU forward");
    vec![resid, normed, rstd]
}

fn cpu_bwd(x: &BwdInputs) -> Outputs {
    let mut dresid = x.dresid.clone();
    CpuBackend::new()
        .residual_ablate_norm_bwd(
            &mut dresid,
            &x.dnormed,
            &x.resid,
            &x.rstd,
            x.q.as_ref().map(|(q, k)| (q, *k)),
            &x.w,
            x.n,
            x.d,
        )
        .expect("CPU backward");
    vec![dresid]
}

// ==== Building and comparing =================================================================

/// norm.cu under emulation, compiled once per test run.
fn norm_module() -> &'static Module {
    static M: OnceLock<Result<Module, String>> = OnceLock::new();
    M.get_or_init(|| common::build_module("norm", "norm.cu", &norm_entries(), |t| t))
        .as_ref()
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Every shape of [`shapes`] through `emulate` and `cpu` ([`common::check`]); the shapes
/// with the most directions run twice and must agree bit for bit.
fn check<T: Elem, I>(
    op: &str,
    seed: u64,
    make: fn(&mut Rng, Shape) -> I,
    emulate: fn(&Module, &I) -> Result<Outputs, String>,
    cpu: fn(&I) -> Outputs,
) {
    let shapes = shapes::<T>();
    let k_max = shapes.iter().map(|s| s.k).max().unwrap_or(0);
    common::check::<T, _, _>(common::Check {
        op,
        seed,
        shapes: &shapes,
        make: &|rng, s| make(rng, *s),
        emulate: &|x| emulate(norm_module(), x),
        cpu: &cpu,
        repeat: &|s| s.k == k_max,
    });
}

/// The forward for storage `T`, as test `test`.
fn fwd<T: Elem>(test: &str, seed: u64) {
    if have_compiler(test) {
        check::<T, _>(
            "resid_ablate_norm_fwd",
            seed,
            fwd_inputs::<T>,
            emulate_fwd::<T>,
            cpu_fwd,
        );
    }
}

/// The backward for storage `T`, as test `test`.
fn bwd<T: Elem>(test: &str, seed: u64) {
    if have_compiler(test) {
        check::<T, _>(
            "resid_ablate_norm_bwd",
            seed,
            bwd_inputs::<T>,
            emulate_bwd::<T>,
            cpu_bwd,
        );
    }
}

#[test]
fn resid_ablate_norm_fwd_f32() {
    fwd::<f32>("resid_ablate_norm_fwd_f32", 11);
}

#[test]
fn resid_ablate_norm_fwd_bf16() {
    fwd::<half::bf16>("resid_ablate_norm_fwd_bf16", 12);
}

#[test]
fn resid_ablate_norm_bwd_f32() {
    bwd::<f32>("resid_ablate_norm_bwd_f32", 13);
}

#[test]
fn resid_ablate_norm_bwd_bf16() {
    bwd::<half::bf16>("resid_ablate_norm_bwd_bf16", 14);
}

/// The harness can fail: with the last butterfly step of the block reduction in norm.cu
/// dropped (lanes 2i and 2i+1 never combine for the sums of squares), the forward must be out
/// of tolerance. If norm.cu changes shape, update `BROKEN_FROM`.
#[test]
fn a_broken_block_sum_is_caught() {
    if !have_compiler("a_broken_block_sum_is_caught") {
        return;
    }
    const BROKEN_FROM: &str = "o = LANES_PER_VALUE / 2; o > 0; o >>= 1";
    const BROKEN_TO: &str = "o = LANES_PER_VALUE / 2; o > 1; o >>= 1";
    let m = common::build_module("norm-broken", "norm.cu", &norm_entries(), |t| {
        common::mutate("norm.cu", t, BROKEN_FROM, BROKEN_TO)
    })
    .unwrap();
    let mut rng = Rng::new(5);
    let s = Shape {
        n: 3,
        d: 64,
        k: 8,
        with_b: true,
    };
    let x = fwd_inputs::<f32>(&mut rng, s);
    common::assert_caught::<f32>(
        "a broken block sum",
        &emulate_fwd::<f32>(&m, &x).unwrap(),
        &cpu_fwd(&x),
    );
}

// ==== The shim itself ========================================================================

/// A kernel with known answers: dynamic shared memory across a barrier (reversal), a block sum
/// from a float butterfly plus a static `__shared__` array, an int shuffle, and a read of
/// shared memory no thread wrote (NaN-filled by the emulator).
const SELF_TEST_CU: &str = r#"
extern "C" __global__ void self_test(float* rev, float* sums, int* partner, float* unwritten,
                                     const float* x) {
    extern __shared__ float buf[];
    __shared__ float part[32];
    const int t = threadIdx.x, i = blockIdx.x * blockDim.x + t;
    buf[t] = x[i];
    __syncthreads();
    rev[i] = buf[blockDim.x - 1 - t];
    float v = x[i];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if ((t & 31) == 0) part[t >> 5] = v;
    __syncthreads();
    if (t == 0) {
        float s = 0.0f;
        for (int w = 0; w < (int)(blockDim.x / 32); w++) s += part[w];
        sums[blockIdx.x] = s;
        unwritten[blockIdx.x] = buf[blockDim.x];
    }
    partner[i] = __shfl_xor_sync(0xffffffffu, (int)threadIdx.x, 5);
}
"#;

#[test]
fn shim_self_test() {
    if !have_compiler("shim_self_test") {
        return;
    }
    let files = vec![("self_test.cu".to_string(), SELF_TEST_CU.to_string())];
    let m = Module::build("self-test", &files, "self_test.cu", &["self_test"]).unwrap();
    for (grid, block) in [(3usize, 64usize), (2, 1024)] {
        let len = grid * block;
        // Small integers: every partial sum is exact, so the answers are too.
        let x: Vec<f32> = (0..len).map(|i| (i % 7) as f32 - 3.0).collect();
        let after = m
            .run(&Launch {
                entry: "self_test".into(),
                grid: [grid as u32, 1, 1],
                block: [block as u32, 1, 1],
                smem_bytes: (block + 1) * 4,
                args: vec![
                    Arg::buf(&vec![f32::NAN; len]),
                    Arg::buf(&vec![f32::NAN; grid]),
                    Arg::buf(&vec![-1i32; len]),
                    Arg::buf(&vec![0.0f32; grid]),
                    Arg::buf(&x),
                ],
            })
            .unwrap();
        let (rev, sums) = (after.get::<f32>(0), after.get::<f32>(1));
        let (partner, unwritten) = (after.get::<i32>(2), after.get::<f32>(3));
        for b in 0..grid {
            let row = &x[b * block..(b + 1) * block];
            let want_rev: Vec<f32> = row.iter().rev().copied().collect();
            assert_eq!(&rev[b * block..(b + 1) * block], &want_rev[..], "block {b}");
            assert_eq!(sums[b], row.iter().sum::<f32>(), "block {b} sum");
            assert!(
                unwritten[b].is_nan(),
                "block {b}: unwritten smem read {}",
                unwritten[b]
            );
        }
        for (i, &p) in partner.iter().enumerate() {
            assert_eq!(p as usize, (i % block) ^ 5, "thread {i}");
        }
    }
}

/// A launch whose arguments do not match the entry point's parameters is an error, not a
/// silent reinterpretation.
#[test]
fn argument_mismatch_is_reported() {
    if !have_compiler("argument_mismatch_is_reported") {
        return;
    }
    let mut rng = Rng::new(1);
    let s = Shape {
        n: 1,
        d: 24,
        k: 0,
        with_b: false,
    };
    let x = fwd_inputs::<f32>(&mut rng, s);
    let m = norm_module();
    let shape = NormLaunch::new::<f32>("argument_mismatch_is_reported", 24).unwrap();
    let mut launch = Launch {
        entry: shape.entry("fwd", "f32"),
        grid: [1, 1, 1],
        block: [shape.threads, 1, 1],
        smem_bytes: 0,
        args: vec![
            poisoned::<f32>(24),
            poisoned::<f32>(24),
            poisoned::<f32>(1),
            act::<f32>(&x.a),
            Arg::Null,
            Arg::Null,
            Arg::I32(0),
            act::<f32>(&x.w),
            Arg::I32(1),
            Arg::F32(24.0), // d passed as a float
            Arg::F32(1e-5),
        ],
    };
    let e = m.run(&launch).err().expect("a float for `int d` must fail");
    assert!(e.contains("argument 9 is i32"), "{e}");
    launch.args.pop();
    let e = m.run(&launch).err().expect("10 arguments for 11 must fail");
    assert!(e.contains("takes 11 arguments"), "{e}");
}
