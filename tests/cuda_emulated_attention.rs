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
//!   256 (smaller key tiles); and Gemma-2-like scores (scale, soft cap) split or not, windowed,
//!   at head_dim 64 and 256.
//! - `attention_fwd`: the tensor-core kernels (bf16, head_dim 64 and 128) and the generic
//!   kernels (f32; bf16 with head_dim 32, 40 and 256), on packed sequences of unequal lengths
//!   (a single row, lengths not multiples of the 64-row tile, several sequences within 64 rows),
//!   causal, windowed, GQA, and with Gemma-2-like scores (scale 2/sqrt(hd), soft cap 3, which
//!   a good share of the raw scores exceed).
//! - `attention_bwd`: preprocess, dK/dV, dQ after each side's own forward, for the same cases.
//! - Packed sequences are independent: with one sequence redrawn, the others' outputs (out,
//!   lse, dq, dk, dv) are bit-identical (tensor-core bf16 and generic f32).
//!
//! Tolerances (`parity::tolerance`, relative L2 over each output): f32 1e-5 (measured 1e-7 to
//! 5e-7: the same f32 math in another order); bf16 1e-2 against the CPU reference fed the same
//! bf16-rounded inputs (measured 1.4e-3 to 3.2e-3): the outputs are rounded to bf16 (2⁻⁹
//! relative, about 1.5e-3 in L2 alone), and the tensor-core kernels round P (forward) and P,
//! dS (backward) to bf16 for their products, so the backward chains two or three such
//! roundings; 1e-2 leaves a 3x margin, while every mutation below lands at 0.3 or more.
//!
//! Four mutation checks show the emulation can fail: a cp.async wait one group too late in the
//! decoding kernel, a wrong mma A fragment in the forward, the soft cap's factor 1 - t² missing
//! from the tensor-core dK/dV, and sequences that start one row early (reading across a
//! boundary).
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
    backward_launches, cached_plan, check_shape, forward_launch, Launch as AttnLaunch,
    DECODE_MODULE, MODULE, THREADS,
};
use caft_fast::backend::{AttnShape, Backend, CacheShape, Seqs};
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

/// One training attention case: packed sequences of these lengths, these heads.
#[derive(Clone, Debug)]
struct AttnCase {
    lens: Vec<usize>,
    shape: AttnShape,
}

/// Host-only sequences: what the launch plans and `check_shape` read (the device offsets are
/// the `cu` buffer argument).
fn host_seqs(lens: &[usize]) -> Seqs<()> {
    let mut cu = vec![0];
    for &l in lens {
        cu.push(cu[cu.len() - 1] + l);
    }
    Seqs {
        cu,
        max_len: lens.iter().copied().max().unwrap_or(0),
        cu_dev: (),
        pos_dev: (),
    }
}

/// The offsets as the kernels' `const int* cu` argument.
fn cu_arg(seqs: &Seqs<()>) -> Arg {
    let cu: Vec<i32> = seqs.cu.iter().map(|&c| c as i32).collect();
    Arg::buf(&cu)
}

/// The scalars every training kernel takes after `cu`, as `attention::check_shape` derives
/// them for the backend.
fn tail(s: &AttnShape, seqs: &Seqs<()>) -> Vec<Arg> {
    let sc = check_shape(s, seqs, seqs.cu.len(), seqs.rows()).expect("a valid shape");
    vec![
        Arg::I32(sc.n),
        Arg::I32(sc.n_heads),
        Arg::I32(sc.n_kv_heads),
        Arg::I32(sc.head_dim),
        Arg::I32(sc.window),
        Arg::F32(sc.scale),
        Arg::F32(sc.softcap),
    ]
}

struct AttnInputs {
    case: AttnCase,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    dout: Vec<f32>,
}

impl AttnInputs {
    fn rows(&self) -> usize {
        self.case.lens.iter().sum()
    }
}

fn attn_inputs<T: Elem>(rng: &mut Rng, c: &AttnCase) -> AttnInputs {
    let n: usize = c.lens.iter().sum();
    let (nq, nkv) = (n * c.shape.q_width(), n * c.shape.kv_width());
    let x = AttnInputs {
        case: c.clone(),
        q: draw::<T>(rng, nq, 1.0),
        k: draw::<T>(rng, nkv, 1.0),
        v: draw::<T>(rng, nkv, 1.0),
        dout: draw::<T>(rng, nq, 1.0),
    };
    if let Some(cap) = c.shape.softcap {
        // The cap must bite: a good share of the raw scores (sequence 0, head 0) exceed it.
        let share = saturated_share(&x, cap);
        assert!(
            share > 0.05,
            "{c:?}: only {share:.3} of the scores exceed the cap"
        );
    }
    x
}

/// The share of raw scores `scale·q·k` of sequence 0, head 0, with `|s| > cap` (causal pairs).
fn saturated_share(x: &AttnInputs, cap: f32) -> f64 {
    let s = &x.case.shape;
    let (hd, qw, kw, len) = (s.head_dim, s.q_width(), s.kv_width(), x.case.lens[0]);
    let (mut over, mut all) = (0usize, 0usize);
    for i in 0..len {
        for j in 0..=i {
            let dot: f32 = (0..hd).map(|d| x.q[i * qw + d] * x.k[j * kw + d]).sum();
            over += usize::from((s.scale * dot).abs() > cap);
            all += 1;
        }
    }
    over as f64 / all as f64
}

/// `attention::attention_fwd`: (out, lse).
fn emulate_fwd<T: Elem>(m: &Module, x: &AttnInputs) -> Result<Outputs, String> {
    let (s, seqs) = (&x.case.shape, host_seqs(&x.case.lens));
    let n = x.rows();
    let l = forward_launch(s, &seqs, T::SUFFIX);
    let mut args = vec![
        poisoned::<T>(n * s.q_width()), // 0 out
        poisoned::<f32>(s.n_heads * n), // 1 lse
        act::<T>(&x.q),                 // 2 q
        act::<T>(&x.k),                 // 3 k
        act::<T>(&x.v),                 // 4 v
        cu_arg(&seqs),                  // 5 cu
    ];
    args.extend(tail(s, &seqs));
    let after = m.run(&launch(&l, args))?;
    Ok(vec![to_f32(&after.get::<T>(0)), after.get::<f32>(1)])
}

/// `attention::attention_bwd` after the emulated forward: (dq, dk, dv).
fn emulate_bwd<T: Elem>(m: &Module, x: &AttnInputs) -> Result<Outputs, String> {
    let (s, seqs) = (&x.case.shape, host_seqs(&x.case.lens));
    let n = x.rows();
    let fwd = emulate_fwd::<T>(m, x)?;
    let out = act::<T>(&fwd[0]);
    let lse = Arg::buf(&fwd[1]);
    let [pre, dkdv, dq] = backward_launches(s, &seqs, T::SUFFIX);
    let after = m.run(&launch(
        &pre,
        vec![
            Arg::buf(&vec![0.0f32; s.n_heads * n]), // 0 delta (alloc_zeros)
            act::<T>(&x.dout),                      // 1 dout
            out,                                    // 2 out
            Arg::I32(n as i32),                     // 3 rows
            Arg::I32(s.n_heads as i32),             // 4 n_heads
            Arg::I32(s.head_dim as i32),            // 5 head_dim
        ],
    ))?;
    let delta = after.get::<f32>(0);
    let mut args = vec![
        poisoned::<T>(n * s.kv_width()), // 0 dk
        poisoned::<T>(n * s.kv_width()), // 1 dv
        act::<T>(&x.dout),               // 2 dout
        lse.clone(),                     // 3 lse
        Arg::buf(&delta),                // 4 delta
        act::<T>(&x.q),                  // 5 q
        act::<T>(&x.k),                  // 6 k
        act::<T>(&x.v),                  // 7 v
        cu_arg(&seqs),                   // 8 cu
    ];
    args.extend(tail(s, &seqs));
    let a = m.run(&launch(&dkdv, args))?;
    let mut args = vec![
        poisoned::<T>(n * s.q_width()), // 0 dq
        act::<T>(&x.dout),              // 1 dout
        lse,                            // 2 lse
        Arg::buf(&delta),               // 3 delta
        act::<T>(&x.q),                 // 4 q
        act::<T>(&x.k),                 // 5 k
        act::<T>(&x.v),                 // 6 v
        cu_arg(&seqs),                  // 7 cu
    ];
    args.extend(tail(s, &seqs));
    let b = m.run(&launch(&dq, args))?;
    Ok(vec![
        to_f32(&b.get::<T>(0)),
        to_f32(&a.get::<T>(0)),
        to_f32(&a.get::<T>(1)),
    ])
}

fn cpu_fwd(x: &AttnInputs) -> Outputs {
    let s = &x.case.shape;
    let b = CpuBackend::new();
    let seqs = b.seqs(&x.case.lens).expect("CPU seqs");
    let n = x.rows();
    let mut out = vec![f32::NAN; n * s.q_width()];
    let mut lse = vec![f32::NAN; s.n_heads * n];
    b.attention_fwd(&mut out, &mut lse, &x.q, &x.k, &x.v, &seqs, s)
        .expect("CPU attention_fwd");
    vec![out, lse]
}

fn cpu_bwd(x: &AttnInputs) -> Outputs {
    let s = &x.case.shape;
    let b = CpuBackend::new();
    let seqs = b.seqs(&x.case.lens).expect("CPU seqs");
    let n = x.rows();
    let fwd = cpu_fwd(x);
    let mut dq = vec![f32::NAN; n * s.q_width()];
    let mut dk = vec![f32::NAN; n * s.kv_width()];
    let mut dv = vec![f32::NAN; n * s.kv_width()];
    b.attention_bwd(
        &mut dq, &mut dk, &mut dv, &x.dout, &fwd[0], &fwd[1], &x.q, &x.k, &x.v, &seqs, s,
    )
    .expect("CPU attention_bwd");
    vec![dq, dk, dv]
}

/// Plain heads: scale 1/sqrt(head_dim), no cap.
fn plain(
    lens: &[usize],
    heads: (usize, usize),
    head_dim: usize,
    window: Option<usize>,
) -> AttnCase {
    AttnCase {
        lens: lens.to_vec(),
        shape: AttnShape::plain(heads.0, heads.1, head_dim, window),
    }
}

/// Gemma-2-like heads: scale 2/sqrt(head_dim) (raw scores of unit inputs have a standard
/// deviation near 2, not 1/sqrt(head_dim)'s 1) and a soft cap of 3, which about one raw score
/// in seven exceeds (checked when the inputs are drawn): there tanh saturates and its
/// derivative 1 - t² is far from 1.
fn capped(
    lens: &[usize],
    heads: (usize, usize),
    head_dim: usize,
    window: Option<usize>,
) -> AttnCase {
    let mut c = plain(lens, heads, head_dim, window);
    c.shape.scale = (2.0 / (head_dim as f64).sqrt()) as f32;
    c.shape.softcap = Some(3.0);
    c
}

/// Cases for storage `T` (packed sequences throughout):
/// - head_dim 64 (the tensor-core kernels in bf16): 70 + 1 + 5 rows (a partial second 64-row
///   tile, a single-row sequence, three sequences sharing the rows 64..76), GQA;
/// - two equal sequences of exactly one tile (the padded batch) with a window of 17 (run twice:
///   bit-identical);
/// - a window shorter than a sequence and straddling tiles, MHA, lengths 3, 90, 1, 20;
/// - soft cap + scale, windowed, on unequal sequences (3 of them, one of 130 rows: three
///   tiles, the last partial), and soft cap without window;
/// - bf16 also: the generic kernels at head_dim 32 (window) and at odd head_dim 40 (cap),
///   the head_dim-128 tensor-core kernels (window, and cap), and head_dim 256 (Gemma-2; the
///   generic kernels for now) with a cap; f32 also head_dims 40 and 256 with a cap.
fn attn_cases<T: Elem>() -> Vec<AttnCase> {
    let mut v = vec![
        plain(&[70, 1, 5], (4, 2), 64, None),
        plain(&[64, 64], (2, 1), 64, Some(17)),
        plain(&[3, 90, 1, 20], (2, 2), 64, Some(40)),
        capped(&[17, 130, 1], (4, 2), 64, Some(50)),
        capped(&[33, 2, 45], (2, 1), 64, None),
        capped(&[11, 1, 30], (2, 1), 40, Some(9)),
        capped(&[9, 20], (2, 1), 256, None),
    ];
    if T::SUFFIX == "bf16" {
        v.push(plain(&[23, 4, 1], (4, 2), 32, Some(6)));
        // The head_dim-128 tensor-core kernels (Qwen2.5, Llama-3-8B, Mistral-7B).
        v.push(plain(&[70, 1, 12], (2, 1), 128, Some(40)));
        v.push(capped(&[5, 66], (2, 1), 128, None));
    }
    v
}

fn check_attn<T: Elem>(
    op: &str,
    seed: u64,
    cases: &[AttnCase],
    emulate: fn(&Module, &AttnInputs) -> Result<Outputs, String>,
    cpu: fn(&AttnInputs) -> Outputs,
) {
    common::check::<T, _, _>(common::Check {
        op,
        seed,
        shapes: cases,
        make: &|rng, c| attn_inputs::<T>(rng, c),
        emulate: &|x| emulate(module(), x),
        cpu: &cpu,
        repeat: &|c| c.lens == [64, 64],
    });
}

/// The rows `cu[z] .. cu[z+1]` of every output of a training call (out/dq/dk/dv: `width`
/// elements a row; lse: `[n_heads, n]`), as one vector per output.
fn seq_rows(x: &AttnInputs, outs: &Outputs, z: usize, lse_at: Option<usize>) -> Outputs {
    let seqs = host_seqs(&x.case.lens);
    let (r0, r1, n) = (seqs.cu[z], seqs.cu[z + 1], seqs.rows());
    outs.iter()
        .enumerate()
        .map(|(i, o)| {
            if Some(i) == lse_at {
                (0..x.case.shape.n_heads)
                    .flat_map(|h| o[h * n + r0..h * n + r1].to_vec())
                    .collect()
            } else {
                let w = o.len() / n;
                o[r0 * w..r1 * w].to_vec()
            }
        })
        .collect()
}

/// Redraw sequence `z`'s rows of q, k, v and dout.
fn redraw_seq<T: Elem>(rng: &mut Rng, x: &mut AttnInputs, z: usize) {
    let seqs = host_seqs(&x.case.lens);
    let (r0, r1) = (seqs.cu[z], seqs.cu[z + 1]);
    let s = x.case.shape;
    for (buf, w) in [
        (&mut x.q, s.q_width()),
        (&mut x.k, s.kv_width()),
        (&mut x.v, s.kv_width()),
        (&mut x.dout, s.q_width()),
    ] {
        let fresh = draw::<T>(rng, (r1 - r0) * w, 1.0);
        buf[r0 * w..r1 * w].copy_from_slice(&fresh);
    }
}

/// A query never sees another sequence's keys, and a key's gradient never gathers another
/// sequence's queries: with sequence 1 of a packed batch redrawn, every output row of
/// sequences 0 and 2 (out, lse, dq, dk, dv) is bit-identical, and sequence 1's rows change.
fn check_isolation<T: Elem>(seed: u64, case: AttnCase) {
    let mut rng = Rng::new(seed);
    let mut x = attn_inputs::<T>(&mut rng, &case);
    let run = |x: &AttnInputs| -> Outputs {
        let mut o = emulate_fwd::<T>(module(), x).unwrap_or_else(|e| panic!("{e}"));
        o.extend(emulate_bwd::<T>(module(), x).unwrap_or_else(|e| panic!("{e}")));
        o
    };
    let before = run(&x);
    redraw_seq::<T>(&mut rng, &mut x, 1);
    let after = run(&x);
    for z in 0..case.lens.len() {
        let same = common::bits_equal(
            &seq_rows(&x, &before, z, Some(1)),
            &seq_rows(&x, &after, z, Some(1)),
        );
        println!("{case:?} {}: sequence {z} bit-identical: {same}", T::SUFFIX);
        assert_eq!(same, z != 1, "{case:?} ({}): sequence {z}", T::SUFFIX);
    }
}

// ==== Cached attention (generation) ==========================================================

/// A generation run as `parity::AttnCachedCase` makes it: caches NaN-poisoned, one
/// `attention_cached` call per chunk of new rows (a prefill, possibly in pieces, then one-row
/// decoding steps). q, k, v hold every sequence's whole timeline `[batch, total, width]`.
#[derive(Clone, Debug)]
struct CachedCase {
    batch: usize,
    chunks: Vec<usize>,
    /// Heads, scale, soft cap, window.
    heads: AttnShape,
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
        let (cap, w, total) = (self.shape.cap, self.shape.heads.kv_width(), self.total());
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
        heads: c.heads,
    };
    CachedInputs {
        case: c.clone(),
        q: draw::<T>(rng, c.batch * total * c.heads.q_width(), 1.0),
        k: draw::<T>(rng, c.batch * total * c.heads.kv_width(), 1.0),
        v: draw::<T>(rng, c.batch * total * c.heads.kv_width(), 1.0),
        start,
        shape,
    }
}

/// `attention::attention_cached` for every chunk: each call's `out`, then the written rows of
/// both caches.
fn emulate_cached<T: Elem>(m: &Module, x: &CachedInputs) -> Result<Outputs, String> {
    let s = x.shape;
    let h = s.heads;
    let (qw, kvw) = (h.q_width(), h.kv_width());
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
                poisoned::<T>(rows * qw),             // 0 out
                workspace,                            // 1 part
                act::<T>(&x.rows(&x.q, qw, past, n)), // 2 q
                kc.clone(),                           // 3 k_cache
                vc.clone(),                           // 4 v_cache
                Arg::buf(&x.start),                   // 5 start
                Arg::I32(n as i32),                   // 6 new_rows
                Arg::I32(past as i32),                // 7 past
                Arg::I32(s.cap as i32),               // 8 cap
                Arg::I32(h.n_heads as i32),           // 9 n_heads
                Arg::I32(h.n_kv_heads as i32),        // 10 n_kv_heads
                Arg::I32(h.head_dim as i32),          // 11 head_dim
                Arg::I32(plan.window),                // 12 window
                Arg::F32(h.scale),                    // 13 scale
                Arg::F32(h.softcap.unwrap_or(0.0)),   // 14 softcap
                Arg::I32(plan.rows_per_cta as i32),   // 15 rows_per_cta
                Arg::I32(plan.heads_per_cta as i32),  // 16 heads_per_cta
                Arg::I32(plan.splits as i32),         // 17 splits
                Arg::I32(plan.key_tile as i32),       // 18 kt
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
                        Arg::I32(h.n_heads as i32),   // 3 n_heads
                        Arg::I32(h.head_dim as i32),  // 4 head_dim
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
    let (qw, kvw) = (s.heads.q_width(), s.heads.kv_width());
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
        heads: AttnShape::plain(heads.0, heads.1, head_dim, window),
        sm_count,
    }
}

/// `cached` with Gemma-2-like scores: scale 2/sqrt(head_dim) and a soft cap of 3 (as the
/// training cases' `capped`).
fn cached_capped(
    batch: usize,
    chunks: &[usize],
    steps: usize,
    heads: (usize, usize),
    head_dim: usize,
    window: Option<usize>,
    sm_count: usize,
) -> CachedCase {
    let mut c = cached(batch, chunks, steps, heads, head_dim, window, sm_count);
    c.heads.scale = (2.0 / (head_dim as f64).sqrt()) as f32;
    c.heads.softcap = Some(3.0);
    c
}

/// Prefill and decoding, GQA and MHA, left padding (batches of 2 and 3: the last sequence's
/// prompt is one token, so its prefill rows but the last see no key, and one of its key splits
/// is empty), sliding windows shorter than the prompt and than a key tile, a prefill in two
/// calls (the second with past > 0). With 132 SMs the calls of the first three cases split
/// their keys in 2 or 3 and run the merge (all but the 40-row prefill); the fourth and fifth
/// have no split. Then: a group of 10 query heads (two CTAs of 5), a head dim that is no
/// multiple of the 16-byte vector (element copies instead of cp.async), and head_dim 256
/// (key tiles of 32 rows in bf16, 16 in f32). Last, Gemma-2-like scores (scale 2/sqrt(hd), soft
/// cap 3): split decoding with the merge, a window without split, head_dim 256.
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
        // Soft cap and scale: split decoding with merge, a window, no split; head_dim 256.
        cached_capped(2, &[70], 3, (4, 2), 64, None, 132),
        cached_capped(3, &[40], 2, (4, 1), 64, Some(17), 1),
        cached_capped(1, &[24], 2, (4, 2), 256, None, 132),
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
        repeat: &|c| c.heads.window == Some(17),
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
            &attn_cases::<bf16>(),
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
            &attn_cases::<f32>(),
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
            &attn_cases::<bf16>(),
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
            &attn_cases::<f32>(),
            emulate_bwd::<f32>,
            cpu_bwd,
        );
    }
}

/// Packed sequences are independent on the tensor-core kernels (bf16, head_dim 64; soft cap
/// and window so every masking path runs): sequence 1 (two tiles long) sits between a short
/// sequence and a single-row one.
#[test]
fn packed_sequences_do_not_see_each_other_bf16() {
    if have_compiler("packed_sequences_do_not_see_each_other_bf16") {
        check_isolation::<bf16>(31, capped(&[20, 75, 1], (4, 2), 64, Some(40)));
    }
}

/// The same on the generic kernels (f32, GQA, no window).
#[test]
fn packed_sequences_do_not_see_each_other_f32() {
    if have_compiler("packed_sequences_do_not_see_each_other_f32") {
        check_isolation::<f32>(32, plain(&[6, 9, 3], (4, 2), 24, None));
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
    let x = attn_inputs::<bf16>(&mut rng, &plain(&[20], (2, 1), 64, None));
    common::assert_caught::<bf16>(
        "a wrong mma fragment",
        &emulate_fwd::<bf16>(&m, &x).unwrap(),
        &cpu_fwd(&x),
    );
}

/// The soft cap's chain factor dropped from the tensor-core dK/dV kernel (dS instead of
/// dS·(1 - t²)) must be out of tolerance: the capped cases saturate the tanh on purpose. If
/// attention.cu changes shape, update `FROM`.
#[test]
fn a_missing_softcap_factor_is_caught() {
    if !have_compiler("a_missing_softcap_factor_is_caught") {
        return;
    }
    const FROM: &str = "dpt[nt][e] = p * (dpt[nt][e] - sDelta[ii]) * g;";
    const TO: &str = "dpt[nt][e] = p * (dpt[nt][e] - sDelta[ii]);";
    let entries: Vec<String> = ["fwd_hd64", "bwd_preprocess", "bwd_dkdv_hd64", "bwd_dq_hd64"]
        .iter()
        .map(|f| format!("attention_{f}_bf16"))
        .collect();
    let main = file(MODULE);
    let m = common::build_module("attention-no-cap-factor", &main, &entries, |t| {
        common::mutate(&main, t, FROM, TO)
    })
    .unwrap_or_else(|e| panic!("{e}"));
    let x = attn_inputs::<bf16>(&mut Rng::new(9), &capped(&[33, 2, 45], (2, 1), 64, None));
    common::assert_caught::<bf16>(
        "a missing soft-cap factor",
        &emulate_bwd::<bf16>(&m, &x).unwrap(),
        &cpu_bwd(&x),
    );
}

/// Sequences that reach one row back (every sequence but the first also takes the previous
/// sequence's last row as its position 0: its tiles read across the boundary, its queries see
/// that foreign key) must be out of tolerance, with every output still written. If attention.cu
/// changes shape, update `FROM`.
#[test]
fn a_read_across_sequences_is_caught() {
    if !have_compiler("a_read_across_sequences_is_caught") {
        return;
    }
    const FROM: &str = ": s0(cu[z]), len(cu[z + 1] - cu[z]) {}";
    const TO: &str =
        ": s0(cu[z] > 0 ? cu[z] - 1 : 0), len(cu[z + 1] - (cu[z] > 0 ? cu[z] - 1 : 0)) {}";
    let entries = vec!["attention_fwd_f32".to_string()];
    let main = file(MODULE);
    let m = common::build_module("attention-across", &main, &entries, |t| {
        common::mutate(&main, t, FROM, TO)
    })
    .unwrap_or_else(|e| panic!("{e}"));
    let x = attn_inputs::<f32>(&mut Rng::new(10), &plain(&[6, 9, 3], (4, 2), 24, None));
    let got = emulate_fwd::<f32>(&m, &x).unwrap();
    assert!(
        got.iter().flatten().all(|v| v.is_finite()),
        "the mutant must fail on values, not on unwritten (NaN) rows"
    );
    common::assert_caught::<f32>("a read across sequences", &got, &cpu_fwd(&x));
}
