//! The CUDA kernels of `kernels/attention.cu` (training) and `kernels/attention_decode.cu`
//! (key/value cache), run on the CPU under emulation, against the CPU reference backend
//! (tests/cuda_emulated_norm.rs explains the emulator: one std::thread per CUDA thread, real
//! barriers, warp shuffles through an exchange, guard bytes after every buffer).
//!
//! The kernels' inline PTX sits in small wrapper functions in `kernels/ptx.cuh`; the harness
//! builds them with a `ptx.cuh` of its own holding the C++ of `cuda_emulated/ptx_emu.hpp`
//! (`ldmatrix` and `mma.m16n8k16` as warp-collective exchanges with the PTX ISA's fragment
//! layouts; `cp.async` poisons its 16 destination bytes when issued and lands at the
//! `cp.async.wait_group` that retires its group; `ex2.approx` as exp2f, `cvt.rn.bf16x2` with
//! round-to-nearest-even), so the tensor-core kernels' indexing, fragment bookkeeping, masking, online softmax, copy
//! pipelining and barrier placement run for real.
//!
//! Every launch is the backend's: grid and shared memory from `forward_launch`,
//! `backward_launches` and `cached_plan` (src/backend/cuda/attention.rs), arguments in the
//! order of its `attention_fwd`, `attention_bwd` and `attention_cached`. Outputs (and the
//! key/value caches and the split workspace) start NaN-poisoned; results are compared with
//! `caft_fast::backend::cpu` through the `Backend` trait as
//! `backend::cuda::diagnostics::parity` does: relative L2 error within 1e-2 (bf16) or 1e-5
//! (f32), NaN never passes.
//!
//! - `attention_cached` (append, split-K decoding kernel, split merge), bf16 and f32: a prefill
//!   (in one call or two) then single-row decoding steps, left-padded sequences (rows before a
//!   sequence's start see no key and must come out zero), sliding windows, GQA and MHA, with
//!   the key split of a 132-SM GPU (H200: small calls split their keys and run the merge) and
//!   of a 1-SM one (no split); also a group of 10 query heads, head_dim 34 (element copies) and
//!   256 (smaller key tiles).
//! - `attention_fwd`: the tensor-core kernels (bf16, head_dim 64 and 128) and the generic kernels (f32;
//!   bf16 with head_dim 32), causal, windowed, GQA, partial tiles.
//! - `attention_bwd`: preprocess, dK/dV, dQ after each side's own forward, for the same kernels.
//!
//! Two mutation checks show the emulation can fail: a cp.async wait one group too late in the
//! decoding kernel, and a wrong mma A fragment in the forward.
//!
//! What the emulation cannot check: the hardware's mma summation order and ex2 error (covered
//! by the tolerances), timing and register use.
//!
//! Same switches and skip policy as tests/cuda_emulated_norm.rs (`CXX`, `CAFT_EMU_SANITIZE`,
//! `CAFT_EMU_KERNELS`; without g++ skipped with a notice, failing when `CI` is set).

#[path = "cuda_emulated/common.rs"]
mod common;
#[path = "cuda_emulated/harness.rs"]
mod harness;
mod support;

use caft_fast::backend::cpu::CpuBackend;
use caft_fast::backend::cuda::attention::{
    backward_launches, cached_plan, forward_launch, Launch as AttnLaunch, DECODE_MODULE, MODULE,
    THREADS,
};
use caft_fast::backend::{AttnShape, Backend, CacheShape};
use caft_fast::util::rng::Rng;
use common::{act, draw, have_compiler, poisoned, to_f32, Elem, Outputs};
use half::bf16;
use harness::{After, Arg, Launch, Module};
use std::sync::OnceLock;

// ==== The module =============================================================================

/// The training entry points the tests launch (attention.cu).
fn entries() -> Vec<String> {
    let mut v = Vec::new();
    for family in ["fwd", "bwd_dkdv", "bwd_dq"] {
        for hd in [64, 128] {
            v.push(format!("attention_{family}_hd{hd}_bf16"));
        }
    }
    for t in ["bf16", "f32"] {
        for family in ["fwd", "bwd_preprocess", "bwd_dkdv", "bwd_dq"] {
            v.push(format!("attention_{family}_{t}"));
        }
    }
    v
}

/// The key/value-cache entry points (attention_decode.cu).
fn decode_entries() -> Vec<String> {
    let mut v = Vec::new();
    for t in ["bf16", "f32"] {
        for family in ["cache_append", "cached", "cached_combine"] {
            v.push(format!("attention_{family}_{t}"));
        }
    }
    v
}

/// The kernel file of a module of the host side (`attention::MODULE`, `DECODE_MODULE`).
fn file(module: &str) -> String {
    format!("{module}.cu")
}

/// attention.cu under emulation, compiled once per test run.
fn module() -> &'static Module {
    static M: OnceLock<Result<Module, String>> = OnceLock::new();
    M.get_or_init(|| common::build_module("attention", &file(MODULE), &entries(), |t| t))
        .as_ref()
        .unwrap_or_else(|e| panic!("{e}"))
}

/// attention_decode.cu under emulation, compiled once per test run.
fn decode_module() -> &'static Module {
    static M: OnceLock<Result<Module, String>> = OnceLock::new();
    M.get_or_init(|| {
        common::build_module(
            "attention-decode",
            &file(DECODE_MODULE),
            &decode_entries(),
            |t| t,
        )
    })
    .as_ref()
    .unwrap_or_else(|e| panic!("{e}"))
}

/// `l` with these arguments (blocks of `THREADS`).
fn launch(l: &AttnLaunch, args: Vec<Arg>) -> Launch {
    Launch {
        entry: l.name.clone(),
        grid: [l.grid.0, l.grid.1, l.grid.2],
        block: [THREADS, 1, 1],
        smem_bytes: l.smem as usize,
        args,
    }
}

/// Argument `i` after a launch, as the buffer argument of the next one.
fn pass<T: bytemuck::Pod>(after: &After, i: usize) -> Arg {
    Arg::buf(&after.get::<T>(i))
}

// ==== Forward and backward (training) ========================================================

/// The window and scale arguments as `attention::check_shape` derives them.
fn scalars(s: &AttnShape) -> (i32, f32) {
    let window = match s.window {
        Some(w) if w < s.seq => w as i32,
        _ => 0,
    };
    (window, (1.0 / (s.head_dim as f64).sqrt()) as f32)
}

/// The scalars every training kernel takes after its buffers.
fn tail(s: &AttnShape) -> Vec<Arg> {
    let (window, scale) = scalars(s);
    vec![
        Arg::I32(s.seq as i32),
        Arg::I32(s.n_heads as i32),
        Arg::I32(s.n_kv_heads as i32),
        Arg::I32(s.head_dim as i32),
        Arg::I32(window),
        Arg::F32(scale),
    ]
}

struct AttnInputs {
    shape: AttnShape,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    dout: Vec<f32>,
}

fn attn_inputs<T: Elem>(rng: &mut Rng, shape: &AttnShape) -> AttnInputs {
    let (nq, nkv) = (
        shape.rows() * shape.q_width(),
        shape.rows() * shape.kv_width(),
    );
    AttnInputs {
        shape: *shape,
        q: draw::<T>(rng, nq, 1.0),
        k: draw::<T>(rng, nkv, 1.0),
        v: draw::<T>(rng, nkv, 1.0),
        dout: draw::<T>(rng, nq, 1.0),
    }
}

/// `attention::attention_fwd`: (out, lse).
fn emulate_fwd<T: Elem>(m: &Module, x: &AttnInputs) -> Result<Outputs, String> {
    let s = &x.shape;
    let l = forward_launch(s, T::SUFFIX);
    let mut args = vec![
        poisoned::<T>(s.rows() * s.q_width()),        // 0 out
        poisoned::<f32>(s.batch * s.n_heads * s.seq), // 1 lse
        act::<T>(&x.q),                               // 2 q
        act::<T>(&x.k),                               // 3 k
        act::<T>(&x.v),                               // 4 v
    ];
    args.extend(tail(s));
    let after = m.run(&launch(&l, args))?;
    Ok(vec![to_f32(&after.get::<T>(0)), after.get::<f32>(1)])
}

/// `attention::attention_bwd` after the emulated forward: (dq, dk, dv).
fn emulate_bwd<T: Elem>(m: &Module, x: &AttnInputs) -> Result<Outputs, String> {
    let s = &x.shape;
    let fwd = emulate_fwd::<T>(m, x)?;
    let out = act::<T>(&fwd[0]);
    let lse = Arg::buf(&fwd[1]);
    let n_stats = s.batch * s.n_heads * s.seq;
    let [pre, dkdv, dq] = backward_launches(s, T::SUFFIX);
    let after = m.run(&launch(
        &pre,
        vec![
            Arg::buf(&vec![0.0f32; n_stats]), // 0 delta (alloc_zeros)
            act::<T>(&x.dout),                // 1 dout
            out,                              // 2 out
            Arg::I32(s.rows() as i32),        // 3 rows
            Arg::I32(s.seq as i32),           // 4 seq
            Arg::I32(s.n_heads as i32),       // 5 n_heads
            Arg::I32(s.head_dim as i32),      // 6 head_dim
        ],
    ))?;
    let delta = after.get::<f32>(0);
    let mut args = vec![
        poisoned::<T>(s.rows() * s.kv_width()), // 0 dk
        poisoned::<T>(s.rows() * s.kv_width()), // 1 dv
        act::<T>(&x.dout),                      // 2 dout
        lse.clone(),                            // 3 lse
        Arg::buf(&delta),                       // 4 delta
        act::<T>(&x.q),                         // 5 q
        act::<T>(&x.k),                         // 6 k
        act::<T>(&x.v),                         // 7 v
    ];
    args.extend(tail(s));
    let a = m.run(&launch(&dkdv, args))?;
    let mut args = vec![
        poisoned::<T>(s.rows() * s.q_width()), // 0 dq
        act::<T>(&x.dout),                     // 1 dout
        lse,                                   // 2 lse
        Arg::buf(&delta),                      // 3 delta
        act::<T>(&x.q),                        // 4 q
        act::<T>(&x.k),                        // 5 k
        act::<T>(&x.v),                        // 6 v
    ];
    args.extend(tail(s));
    let b = m.run(&launch(&dq, args))?;
    Ok(vec![
        to_f32(&b.get::<T>(0)),
        to_f32(&a.get::<T>(0)),
        to_f32(&a.get::<T>(1)),
    ])
}

fn cpu_fwd(x: &AttnInputs) -> Outputs {
    let s = &x.shape;
    let mut out = vec![f32::NAN; s.rows() * s.q_width()];
    let mut lse = vec![f32::NAN; s.batch * s.n_heads * s.seq];
    CpuBackend::new()
        .attention_fwd(&mut out, &mut lse, &x.q, &x.k, &x.v, s)
        .expect("CPU attention_fwd");
    vec![out, lse]
}

fn cpu_bwd(x: &AttnInputs) -> Outputs {
    let s = &x.shape;
    let b = CpuBackend::new();
    let fwd = cpu_fwd(x);
    let mut dq = vec![f32::NAN; s.rows() * s.q_width()];
    let mut dk = vec![f32::NAN; s.rows() * s.kv_width()];
    let mut dv = vec![f32::NAN; s.rows() * s.kv_width()];
    b.attention_bwd(
        &mut dq, &mut dk, &mut dv, &x.dout, &fwd[0], &fwd[1], &x.q, &x.k, &x.v, s,
    )
    .expect("CPU attention_bwd");
    vec![dq, dk, dv]
}

fn attn(
    batch: usize,
    seq: usize,
    heads: (usize, usize),
    head_dim: usize,
    window: Option<usize>,
) -> AttnShape {
    AttnShape {
        batch,
        seq,
        n_heads: heads.0,
        n_kv_heads: heads.1,
        head_dim,
        window,
    }
}

/// Shapes for storage `T`: head_dim 64 (the tensor-core kernels in bf16), 70 rows (a partial
/// second 64-row tile), exactly one tile, a few rows, windows narrower than a tile and
/// straddling tiles, GQA and MHA; bf16 also head_dim 32 (its generic kernels) and 128 (its
/// other tensor-core kernels).
fn attn_shapes<T: Elem>() -> Vec<AttnShape> {
    let mut v = vec![
        attn(1, 70, (4, 2), 64, None),
        attn(2, 64, (2, 1), 64, Some(17)),
        attn(1, 70, (2, 2), 64, Some(40)),
        attn(2, 5, (2, 1), 64, None),
    ];
    if T::SUFFIX == "bf16" {
        v.push(attn(1, 23, (4, 2), 32, Some(6)));
        // The head_dim-128 tensor-core kernels (Qwen2.5, Llama-3-8B, Mistral-7B).
        v.push(attn(1, 70, (2, 1), 128, Some(40)));
    }
    v
}

fn check_attn<T: Elem>(
    op: &str,
    seed: u64,
    shapes: &[AttnShape],
    emulate: fn(&Module, &AttnInputs) -> Result<Outputs, String>,
    cpu: fn(&AttnInputs) -> Outputs,
) {
    common::check::<T, _, _>(common::Check {
        op,
        seed,
        shapes,
        make: &|rng, s| attn_inputs::<T>(rng, s),
        emulate: &|x| emulate(module(), x),
        cpu: &cpu,
        repeat: &|s| s.seq == 64,
    });
}

// ==== Cached attention (generation) ==========================================================

/// A generation run as `parity::AttnCachedCase` makes it: caches NaN-poisoned, one
/// `attention_cached` call per chunk of new rows (a prefill, possibly in pieces, then one-row
/// decoding steps). q, k, v hold every sequence's whole timeline `[batch, total, width]`.
#[derive(Clone, Debug)]
struct CachedCase {
    batch: usize,
    chunks: Vec<usize>,
    heads: (usize, usize),
    head_dim: usize,
    window: Option<usize>,
    /// The SM count `cached_plan` sizes the key split for (132: an H200).
    sm_count: usize,
}

struct CachedInputs {
    case: CachedCase,
    shape: CacheShape,
    start: Vec<u32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
}

impl CachedInputs {
    fn total(&self) -> usize {
        self.case.chunks.iter().sum()
    }

    /// Rows `t0 .. t0 + n` of every sequence of `x` (`width` per row).
    fn rows(&self, x: &[f32], width: usize, t0: usize, n: usize) -> Vec<f32> {
        let total = self.total();
        (0..self.shape.batch)
            .flat_map(|b| x[(b * total + t0) * width..(b * total + t0 + n) * width].to_vec())
            .collect()
    }

    /// The written cache rows of every sequence.
    fn written(&self, cache: &[f32]) -> Vec<f32> {
        let (cap, w, total) = (self.shape.cap, self.shape.kv_width(), self.total());
        (0..self.shape.batch)
            .flat_map(|b| cache[b * cap * w..(b * cap + total) * w].to_vec())
            .collect()
    }
}

/// Sequence 0 unpadded, the last one a single prompt token, the others half padding (as
/// parity's `cached_case`); the cache has a few spare rows.
fn cached_inputs<T: Elem>(rng: &mut Rng, c: &CachedCase) -> CachedInputs {
    let prompt = c.chunks[0];
    let total: usize = c.chunks.iter().sum();
    let start = (0..c.batch)
        .map(|b| match b {
            0 => 0,
            b if b + 1 == c.batch => prompt - 1,
            _ => prompt / 2,
        } as u32)
        .collect();
    let shape = CacheShape {
        batch: c.batch,
        new: 0,
        past: 0,
        cap: total + 3,
        n_heads: c.heads.0,
        n_kv_heads: c.heads.1,
        head_dim: c.head_dim,
        window: c.window,
    };
    CachedInputs {
        case: c.clone(),
        q: draw::<T>(rng, c.batch * total * shape.q_width(), 1.0),
        k: draw::<T>(rng, c.batch * total * shape.kv_width(), 1.0),
        v: draw::<T>(rng, c.batch * total * shape.kv_width(), 1.0),
        start,
        shape,
    }
}

/// `attention::attention_cached` for every chunk: each call's `out`, then the written rows of
/// both caches.
fn emulate_cached<T: Elem>(m: &Module, x: &CachedInputs) -> Result<Outputs, String> {
    let s = x.shape;
    let (qw, kvw) = (s.q_width(), s.kv_width());
    let mut kc = poisoned::<T>(s.batch * s.cap * kvw);
    let mut vc = poisoned::<T>(s.batch * s.cap * kvw);
    let mut outs = Vec::new();
    let mut past = 0;
    for &n in &x.case.chunks {
        let sh = CacheShape { new: n, past, ..s };
        let plan = cached_plan(&sh, T::SUFFIX, x.case.sm_count).map_err(|e| e.to_string())?;
        let rows = s.batch * n;
        let appended = m.run(&launch(
            &plan.append,
            vec![
                kc,                                    // 0 k_cache
                vc,                                    // 1 v_cache
                act::<T>(&x.rows(&x.k, kvw, past, n)), // 2 k
                act::<T>(&x.rows(&x.v, kvw, past, n)), // 3 v
                Arg::I64(rows as i64),                 // 4 rows
                Arg::I32(n as i32),                    // 5 new
                Arg::I32(past as i32),                 // 6 past
                Arg::I32(s.cap as i32),                // 7 cap
                Arg::I32(kvw as i32),                  // 8 kv_ld
            ],
        ))?;
        kc = pass::<T>(&appended, 0);
        vc = pass::<T>(&appended, 1);
        let workspace = match plan.workspace {
            0 => Arg::Null,
            len => poisoned::<f32>(len),
        };
        let attended = m.run(&launch(
            &plan.attend,
            vec![
                poisoned::<T>(rows * qw),                            // 0 out
                workspace,                                           // 1 part
                act::<T>(&x.rows(&x.q, qw, past, n)),                // 2 q
                kc.clone(),                                          // 3 k_cache
                vc.clone(),                                          // 4 v_cache
                Arg::buf(&x.start),                                  // 5 start
                Arg::I32(n as i32),                                  // 6 new_rows
                Arg::I32(past as i32),                               // 7 past
                Arg::I32(s.cap as i32),                              // 8 cap
                Arg::I32(s.n_heads as i32),                          // 9 n_heads
                Arg::I32(s.n_kv_heads as i32),                       // 10 n_kv_heads
                Arg::I32(s.head_dim as i32),                         // 11 head_dim
                Arg::I32(plan.window),                               // 12 window
                Arg::F32((1.0 / (s.head_dim as f64).sqrt()) as f32), // 13 scale
                Arg::I32(plan.rows_per_cta as i32),                  // 14 rows_per_cta
                Arg::I32(plan.heads_per_cta as i32),                 // 15 heads_per_cta
                Arg::I32(plan.splits as i32),                        // 16 splits
                Arg::I32(plan.key_tile as i32),                      // 17 kt
            ],
        ))?;
        let out = match &plan.combine {
            None => attended.get::<T>(0),
            Some(combine) => {
                let merged = m.run(&launch(
                    combine,
                    vec![
                        pass::<T>(&attended, 0),      // 0 out
                        pass::<f32>(&attended, 1),    // 1 part
                        Arg::I32(rows as i32),        // 2 rows
                        Arg::I32(s.n_heads as i32),   // 3 n_heads
                        Arg::I32(s.head_dim as i32),  // 4 head_dim
                        Arg::I32(plan.splits as i32), // 5 splits
                    ],
                ))?;
                merged.get::<T>(0)
            }
        };
        outs.push(to_f32(&out));
        past += n;
    }
    for c in [&kc, &vc] {
        let Arg::Buf(bytes) = c else { unreachable!() };
        let c: Vec<T> = bytemuck::cast_slice(bytes).to_vec();
        outs.push(x.written(&to_f32(&c)));
    }
    Ok(outs)
}

fn cpu_cached(x: &CachedInputs) -> Outputs {
    let s = x.shape;
    let (qw, kvw) = (s.q_width(), s.kv_width());
    let b = CpuBackend::new();
    let mut kc = vec![f32::NAN; s.batch * s.cap * kvw];
    let mut vc = vec![f32::NAN; s.batch * s.cap * kvw];
    let mut outs = Vec::new();
    let mut past = 0;
    for &n in &x.case.chunks {
        let mut out = vec![f32::NAN; s.batch * n * qw];
        let sh = CacheShape { new: n, past, ..s };
        b.attention_cached(
            &mut out,
            &x.rows(&x.q, qw, past, n),
            &x.rows(&x.k, kvw, past, n),
            &x.rows(&x.v, kvw, past, n),
            &mut kc,
            &mut vc,
            &x.start,
            &sh,
        )
        .expect("CPU attention_cached");
        outs.push(out);
        past += n;
    }
    outs.push(x.written(&kc));
    outs.push(x.written(&vc));
    outs
}

/// `batch` sequences, prefill `chunks` then `steps` decoding steps.
fn cached(
    batch: usize,
    chunks: &[usize],
    steps: usize,
    heads: (usize, usize),
    head_dim: usize,
    window: Option<usize>,
    sm_count: usize,
) -> CachedCase {
    let mut chunks = chunks.to_vec();
    chunks.extend(std::iter::repeat_n(1, steps));
    CachedCase {
        batch,
        chunks,
        heads,
        head_dim,
        window,
        sm_count,
    }
}

/// Prefill and decoding, GQA and MHA, left padding (batches of 2 and 3: the last sequence's
/// prompt is one token, so its prefill rows but the last see no key, and one of its key splits
/// is empty), sliding windows shorter than the prompt and than a key tile, a prefill in two
/// calls (the second with past > 0). With 132 SMs the calls of the first three cases split
/// their keys in 2 or 3 and run the merge (all but the 40-row prefill); the fourth and fifth
/// have no split. Then: a group of 10 query heads (two CTAs of 5), a head dim that is no
/// multiple of the 16-byte vector (element copies instead of cp.async), and head_dim 256
/// (key tiles of 32 rows in bf16, 16 in f32).
fn cached_cases() -> Vec<CachedCase> {
    vec![
        cached(2, &[70], 3, (4, 2), 64, None, 132),
        cached(3, &[40, 30], 3, (4, 1), 64, Some(66), 132),
        cached(1, &[140], 2, (2, 2), 64, None, 132),
        cached(3, &[40], 3, (4, 1), 64, Some(17), 132),
        cached(2, &[9, 60], 2, (4, 2), 64, None, 1),
        cached(2, &[20], 2, (10, 1), 64, None, 132),
        cached(2, &[25], 2, (2, 2), 34, Some(9), 132),
        cached(1, &[24], 2, (4, 2), 256, None, 132),
    ]
}

fn check_cached<T: Elem>(seed: u64, cases: &[CachedCase]) {
    common::check::<T, _, _>(common::Check {
        op: "attention_cached",
        seed,
        shapes: cases,
        make: &|rng, c| cached_inputs::<T>(rng, c),
        emulate: &|x| emulate_cached::<T>(decode_module(), x),
        cpu: &cpu_cached,
        repeat: &|c| c.window == Some(17),
    });
}

// ==== Tests ==================================================================================

#[test]
fn attention_cached_bf16() {
    if have_compiler("attention_cached_bf16") {
        check_cached::<bf16>(21, &cached_cases());
    }
}

#[test]
fn attention_cached_f32() {
    if have_compiler("attention_cached_f32") {
        check_cached::<f32>(22, &cached_cases());
    }
}

#[test]
fn attention_fwd_bf16() {
    if have_compiler("attention_fwd_bf16") {
        check_attn::<bf16>(
            "attention_fwd",
            23,
            &attn_shapes::<bf16>(),
            emulate_fwd::<bf16>,
            cpu_fwd,
        );
    }
}

#[test]
fn attention_fwd_f32() {
    if have_compiler("attention_fwd_f32") {
        check_attn::<f32>(
            "attention_fwd",
            24,
            &attn_shapes::<f32>(),
            emulate_fwd::<f32>,
            cpu_fwd,
        );
    }
}

#[test]
fn attention_bwd_bf16() {
    if have_compiler("attention_bwd_bf16") {
        check_attn::<bf16>(
            "attention_bwd",
            25,
            &attn_shapes::<bf16>(),
            emulate_bwd::<bf16>,
            cpu_bwd,
        );
    }
}

#[test]
fn attention_bwd_f32() {
    if have_compiler("attention_bwd_f32") {
        check_attn::<f32>(
            "attention_bwd",
            26,
            &attn_shapes::<f32>(),
            emulate_bwd::<f32>,
            cpu_bwd,
        );
    }
}

// ==== The emulation can fail =================================================================

/// A wait for the wrong cp.async group in the decoding kernel (tile `it` used while its copies
/// are still in flight) must be caught: the emulated cp.async poisons its destination and lands
/// only at the wait that retires it (the NaN scores end as all-zero rows, as the kernel gives
/// a row whose sum is not positive). If attention_decode.cu changes shape, update `FROM`.
#[test]
fn a_late_cp_async_wait_is_caught() {
    if !have_compiler("a_late_cp_async_wait_is_caught") {
        return;
    }
    const FROM: &str = "attn_cp_async_wait<1>();  // this thread's copies of tile `it` have landed";
    const TO: &str = "attn_cp_async_wait<2>();";
    let entries: Vec<String> = ["cache_append", "cached", "cached_combine"]
        .iter()
        .map(|f| format!("attention_{f}_f32"))
        .collect();
    let main = file(DECODE_MODULE);
    let m = common::build_module("attention-late-wait", &main, &entries, |t| {
        common::mutate(&main, t, FROM, TO)
    })
    .unwrap_or_else(|e| panic!("{e}"));
    let mut rng = Rng::new(7);
    let x = cached_inputs::<f32>(&mut rng, &cached(1, &[12], 1, (2, 1), 64, None, 132));
    common::assert_caught::<f32>(
        "a late cp.async wait",
        &emulate_cached::<f32>(&m, &x).unwrap(),
        &cpu_cached(&x),
    );
}

/// The P fragment of the forward's P·V product built from the wrong accumulators (the second
/// 8-column tile's rows g instead of the first tile's rows g+8) must be out of tolerance: the
/// emulated mma and ldmatrix follow the PTX fragment layouts. If attention.cu changes shape,
/// update `FROM`.
#[test]
fn a_wrong_mma_fragment_is_caught() {
    if !have_compiler("a_wrong_mma_fragment_is_caught") {
        return;
    }
    const FROM: &str = "a[1] = attn_pack_bf16x2(c0[2], c0[3]);";
    const TO: &str = "a[1] = attn_pack_bf16x2(c1[0], c1[1]);";
    let entries = vec!["attention_fwd_hd64_bf16".to_string()];
    let main = file(MODULE);
    let m = common::build_module("attention-bad-fragment", &main, &entries, |t| {
        common::mutate(&main, t, FROM, TO)
    })
    .unwrap_or_else(|e| panic!("{e}"));
    let mut rng = Rng::new(8);
    let x = attn_inputs::<bf16>(&mut rng, &attn(1, 20, (2, 1), 64, None));
    common::assert_caught::<bf16>(
        "a wrong mma fragment",
        &emulate_fwd::<bf16>(&m, &x).unwrap(),
        &cpu_fwd(&x),
    );
}
