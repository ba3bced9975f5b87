//! The CUDA kernels of `kernels/elementwise.cu`, `kernels/loss.cu` and `kernels/optim.cu`, run
//! on the CPU under emulation, against the CPU reference backend (tests/cuda_emulated_norm.rs
//! does norm.cu and explains the emulator: one std::thread per CUDA thread, real barriers, warp
//! shuffles through an exchange, guard bytes after every buffer).
//!
//! Each kernel runs with the grid and block the backend computes (`KernelLaunch` in
//! src/backend/cuda/launch.rs, which the backend itself calls) and the arguments in the
//! backend's order, for bf16 and f32 where it has both; outputs start NaN-poisoned; results are
//! compared with `caft_fast::backend::cpu` through the `Backend` trait as
//! `backend::cuda::diagnostics::parity` compares a GPU (relative L2 error within 1e-5 for f32,
//! 1e-2 for bf16, NaN never passes); the cases with reductions run twice and must agree bit
//! for bit.
//!
//! - elementwise.cu: `embedding`; `add_bias` as the bias half of `linear` (the GPU runs cuBLAS,
//!   here the CPU product, then the kernel); `swiglu_fwd` / `swiglu_bwd` and `geglu_fwd` /
//!   `geglu_bwd` (lengths below one 16-byte vector, with a tail, over several blocks); `scale`,
//!   `softcap_fwd`, `softcap_bwd` (saturating); `rope` forward and inverse at per-row
//!   positions (packed sequences of unequal lengths, generation positions out of order), and
//!   a position past the table, which must trap; `cast_from_f32` / `cast_to_f32` bit for bit
//!   against the host's own
//!   conversion (`DeviceElem`), NaN payloads, infinities, ties and subnormals included. The
//!   backend launches only `cast_from_f32_bf16` (LoRA factors as bf16); the others run with the
//!   same flat launch shape.
//! - loss.cu: `cross_entropy` with and without the in-place gradient, ignored rows (target -1,
//!   all rows ignored), targets at both ends of the vocabulary, vector and scalar paths up to a
//!   49152-token vocabulary, followed by `ce_loss_accumulate_f32` as the backend runs them;
//!   `ce_loss_accumulate_f32` alone over more rows than its block has threads.
//! - optim.cu: `adamw_f32` (vector and scalar paths, several blocks, steps 1 to 1000) with the
//!   step's constants from `AdamStep::scalars` (the ones the CPU reference uses too), including
//!   a first step from zero moments; `sum_squares_partial_f32` then the host's f64 sum of the
//!   partials (past the grid limit, where every thread loops, only in a slow test left to
//!   `--ignored`).
//! - One mutation check per source file: a broken line must make its test fail.
//!
//! `kernels/attention.cu` and `kernels/attention_decode.cu` (inline PTX in `kernels/ptx.cuh`:
//! `mma.sync`, `ldmatrix`, `cp.async`, replaced by tests/cuda_emulated/ptx_emu.hpp) are
//! tests/cuda_emulated_attention.rs. The emulator's other
//! limits (timing, the GPU memory model beyond barriers, FMA contraction) are listed in
//! tests/cuda_emulated_norm.rs.
//!
//! The same switches and skip policy as tests/cuda_emulated_norm.rs: without g++ the tests fail
//! when `CI` is set and are skipped with a notice otherwise; `CXX`, `CAFT_EMU_SANITIZE`,
//! `CAFT_EMU_KERNELS`.
//!
//! When a kernel changes, adapt its `emulate_*` function (entry name and argument order; the
//! launch shape comes from `KernelLaunch`) and, if the mutated line moved, its mutation check.

#[path = "cuda_emulated/common.rs"]
mod common;
#[path = "cuda_emulated/harness.rs"]
mod harness;
mod support;

use caft_fast::backend::cpu::CpuBackend;
use caft_fast::backend::cuda::KernelLaunch;
use caft_fast::backend::{AdamStep, Backend};
use caft_fast::util::rng::Rng;
use common::{act, draw, have_compiler, poisoned, to_f32, Check, Elem, Outputs};
use half::bf16;
use harness::{Arg, Launch, Module};
use std::sync::OnceLock;

// ==== The kernel modules =====================================================================

#[derive(Clone, Copy)]
enum Kernels {
    Elementwise,
    Loss,
    Optim,
}

impl Kernels {
    fn file(self) -> &'static str {
        match self {
            Kernels::Elementwise => "elementwise.cu",
            Kernels::Loss => "loss.cu",
            Kernels::Optim => "optim.cu",
        }
    }

    /// Every entry point the file defines (macro-made names cannot be found by scanning it).
    fn entries(self) -> Vec<String> {
        let typed = |ops: &[&str]| -> Vec<String> {
            ["bf16", "f32"]
                .iter()
                .flat_map(|t| ops.iter().map(move |op| format!("{op}_{t}")))
                .collect()
        };
        match self {
            Kernels::Elementwise => typed(&[
                "embedding",
                "add_bias",
                "swiglu_fwd",
                "swiglu_bwd",
                "geglu_fwd",
                "geglu_bwd",
                "scale",
                "softcap_fwd",
                "softcap_bwd",
                "rope",
                "cast_from_f32",
                "cast_to_f32",
            ]),
            Kernels::Loss => {
                let mut v = typed(&["cross_entropy"]);
                v.push("ce_loss_accumulate_f32".into());
                v
            }
            Kernels::Optim => vec!["adamw_f32".into(), "sum_squares_partial_f32".into()],
        }
    }

    /// The file with one line broken (a mutation check).
    fn build_mutated(self, from: &str, to: &str) -> Module {
        let file = self.file();
        let label = format!("{}-broken", file.trim_end_matches(".cu"));
        common::build_module(&label, file, &self.entries(), |t| {
            common::mutate(file, t, from, to)
        })
        .unwrap_or_else(|e| panic!("{e}"))
    }

    /// The real file under emulation, compiled once per test run.
    fn module(self) -> &'static Module {
        static CELLS: [OnceLock<Result<Module, String>>; 3] =
            [OnceLock::new(), OnceLock::new(), OnceLock::new()];
        let file = self.file();
        CELLS[self as usize]
            .get_or_init(|| {
                common::build_module(file.trim_end_matches(".cu"), file, &self.entries(), |t| t)
            })
            .as_ref()
            .unwrap_or_else(|e| panic!("{e}"))
    }
}

/// A launch of `entry` with the backend's grid and block (these kernels take no dynamic
/// shared memory).
fn launch(entry: String, shape: KernelLaunch, args: Vec<Arg>) -> Launch {
    Launch {
        entry,
        grid: [shape.grid, 1, 1],
        block: [shape.block, 1, 1],
        smem_bytes: 0,
        args,
    }
}

/// `<op>_<bf16|f32>`, as `CudaBackend::func` names a typed kernel.
fn typed<T: Elem>(op: &str) -> String {
    format!("{op}_{}", T::SUFFIX)
}

/// Compare `shapes` of one op (see [`common::check`]), `emulate` running on the real
/// `kernels` (built on first use); skipped without a compiler (see [`have_compiler`]).
#[allow(clippy::too_many_arguments)]
fn run_check<T: Elem, S: std::fmt::Debug, I>(
    test: &str,
    op: &str,
    seed: u64,
    shapes: &[S],
    make: &dyn Fn(&mut Rng, &S) -> I,
    kernels: Kernels,
    emulate: &dyn Fn(&Module, &I) -> Result<Outputs, String>,
    cpu: &dyn Fn(&I) -> Outputs,
    repeat: &dyn Fn(&S) -> bool,
) {
    if have_compiler(test) {
        common::check::<T, S, I>(Check {
            op,
            seed,
            shapes,
            make,
            emulate: &|x| emulate(kernels.module(), x),
            cpu,
            repeat,
        });
    }
}

// ==== elementwise.cu: embedding ==============================================================

#[derive(Debug)]
struct EmbeddingShape {
    n: usize,
    d: usize,
    vocab: usize,
}

struct EmbeddingInputs {
    table: Vec<f32>,
    ids: Vec<u32>,
    d: usize,
}

/// 37 and 100/bf16 take the element path, the rest 16-byte vectors; at 4104 a row has more
/// chunks (bf16 513, f32 1026) than the block has threads.
const EMBEDDING_SHAPES: [EmbeddingShape; 6] = [
    EmbeddingShape {
        n: 1,
        d: 24,
        vocab: 101,
    },
    EmbeddingShape {
        n: 3,
        d: 37,
        vocab: 101,
    },
    EmbeddingShape {
        n: 7,
        d: 64,
        vocab: 257,
    },
    EmbeddingShape {
        n: 3,
        d: 100,
        vocab: 257,
    },
    EmbeddingShape {
        n: 9,
        d: 576,
        vocab: 101,
    },
    EmbeddingShape {
        n: 2,
        d: 4104,
        vocab: 7,
    },
];

fn embedding_inputs<T: Elem>(rng: &mut Rng, s: &EmbeddingShape) -> EmbeddingInputs {
    let table = draw::<T>(rng, s.vocab * s.d, 1.0);
    // The first and last rows of the table, then random ones.
    let ids = (0..s.n)
        .map(|i| match i {
            0 => s.vocab - 1,
            1 => 0,
            _ => rng.below(s.vocab),
        } as u32)
        .collect();
    EmbeddingInputs { table, ids, d: s.d }
}

/// `CudaBackend::<T>::embedding`.
fn emulate_embedding<T: Elem>(m: &Module, x: &EmbeddingInputs) -> Result<Outputs, String> {
    let (n, d) = (x.ids.len(), x.d);
    let after = m.run(&launch(
        typed::<T>("embedding"),
        KernelLaunch::embedding::<T>(n, d),
        vec![
            poisoned::<T>(n * d), // 0 T* out
            act::<T>(&x.table),   // 1 const T* table
            Arg::buf(&x.ids),     // 2 const u32* ids
            Arg::I32(d as i32),   // 3 int d
        ],
    ))?;
    Ok(vec![to_f32(&after.get::<T>(0))])
}

fn cpu_embedding(x: &EmbeddingInputs) -> Outputs {
    let mut out = vec![f32::NAN; x.ids.len() * x.d];
    CpuBackend::new()
        .embedding(&mut out, &x.table, &x.ids, x.d)
        .expect("CPU embedding");
    vec![out]
}

fn embedding<T: Elem>(test: &str, seed: u64) {
    run_check::<T, _, _>(
        test,
        "embedding",
        seed,
        &EMBEDDING_SHAPES,
        &embedding_inputs::<T>,
        Kernels::Elementwise,
        &emulate_embedding::<T>,
        &cpu_embedding,
        &|_| false,
    );
}

#[test]
fn embedding_f32() {
    embedding::<f32>("embedding_f32", 21);
}

#[test]
fn embedding_bf16() {
    embedding::<bf16>("embedding_bf16", 22);
}

// ==== elementwise.cu: add_bias (the bias of `linear`) ========================================

#[derive(Debug)]
struct BiasShape {
    n: usize,
    d_in: usize,
    d_out: usize,
}

/// Widths below, at and above the 256 threads of a row block (1000: each thread loops).
const BIAS_SHAPES: [BiasShape; 5] = [
    BiasShape {
        n: 1,
        d_in: 8,
        d_out: 24,
    },
    BiasShape {
        n: 3,
        d_in: 5,
        d_out: 37,
    },
    BiasShape {
        n: 7,
        d_in: 8,
        d_out: 64,
    },
    BiasShape {
        n: 3,
        d_in: 3,
        d_out: 100,
    },
    BiasShape {
        n: 5,
        d_in: 4,
        d_out: 1000,
    },
];

struct BiasInputs {
    x: Vec<f32>,
    w: Vec<f32>,
    bias: Vec<f32>,
    n: usize,
    d_in: usize,
    d_out: usize,
}

fn bias_inputs<T: Elem>(rng: &mut Rng, s: &BiasShape) -> BiasInputs {
    BiasInputs {
        x: draw::<T>(rng, s.n * s.d_in, 1.0),
        w: draw::<T>(rng, s.d_out * s.d_in, 0.1),
        bias: draw::<T>(rng, s.d_out, 1.0),
        n: s.n,
        d_in: s.d_in,
        d_out: s.d_out,
    }
}

fn cpu_linear(x: &BiasInputs, bias: Option<&Vec<f32>>) -> Vec<f32> {
    let mut y = vec![f32::NAN; x.n * x.d_out];
    CpuBackend::new()
        .linear(&mut y, &x.x, &x.w, bias, x.n, x.d_in, x.d_out, false)
        .expect("CPU linear");
    y
}

/// `CudaBackend::<T>::linear` with a bias: the product (cuBLAS there, the CPU's here) stored as
/// `T`, then `add_bias` over it in place.
fn emulate_bias<T: Elem>(m: &Module, x: &BiasInputs) -> Result<Outputs, String> {
    let after = m.run(&launch(
        typed::<T>("add_bias"),
        KernelLaunch::add_bias(x.n, x.d_out),
        vec![
            act::<T>(&cpu_linear(x, None)), // 0 T* y (in and out)
            act::<T>(&x.bias),              // 1 const T* bias
            Arg::I32(x.d_out as i32),       // 2 int d
        ],
    ))?;
    Ok(vec![to_f32(&after.get::<T>(0))])
}

fn bias<T: Elem>(test: &str, seed: u64) {
    run_check::<T, _, _>(
        test,
        "linear+bias",
        seed,
        &BIAS_SHAPES,
        &bias_inputs::<T>,
        Kernels::Elementwise,
        &emulate_bias::<T>,
        &|x| vec![cpu_linear(x, Some(&x.bias))],
        &|_| false,
    );
}

#[test]
fn add_bias_f32() {
    bias::<f32>("add_bias_f32", 23);
}

#[test]
fn add_bias_bf16() {
    bias::<bf16>("add_bias_bf16", 24);
}

// ==== elementwise.cu: swiglu, geglu ============================================================

/// Flat lengths: less than one 16-byte vector, one row of an odd width (a tail after the
/// vectors), several rows, several blocks (270 and SmolLM2's 1536 wide rows).
const GLU_LENS: [usize; 6] = [3, 61, 3 * 61, 7 * 270, 9 * 1536, 1];

struct GluInputs {
    dout: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
}

fn glu_inputs<T: Elem>(rng: &mut Rng, &len: &usize) -> GluInputs {
    GluInputs {
        dout: draw::<T>(rng, len, 1.0),
        gate: draw::<T>(rng, len, 2.0),
        up: draw::<T>(rng, len, 1.0),
    }
}

/// `CudaBackend::<T>::swiglu` / `geglu` (`kernel`).
fn emulate_glu<T: Elem>(kernel: &str, m: &Module, x: &GluInputs) -> Result<Outputs, String> {
    let len = x.gate.len();
    let after = m.run(&launch(
        typed::<T>(&format!("{kernel}_fwd")),
        KernelLaunch::swiglu::<T>(len),
        vec![
            poisoned::<T>(len),   // 0 T* out
            act::<T>(&x.gate),    // 1 const T* gate
            act::<T>(&x.up),      // 2 const T* up
            Arg::I64(len as i64), // 3 long long len
        ],
    ))?;
    Ok(vec![to_f32(&after.get::<T>(0))])
}

fn cpu_glu(kernel: &str, x: &GluInputs) -> Outputs {
    let mut out = vec![f32::NAN; x.gate.len()];
    let be = CpuBackend::new();
    match kernel {
        "swiglu" => be.swiglu(&mut out, &x.gate, &x.up),
        _ => be.geglu(&mut out, &x.gate, &x.up),
    }
    .expect("CPU glu");
    vec![out]
}

/// `CudaBackend::<T>::swiglu_bwd` / `geglu_bwd`: (dgate, dup).
fn emulate_glu_bwd<T: Elem>(kernel: &str, m: &Module, x: &GluInputs) -> Result<Outputs, String> {
    let len = x.gate.len();
    let after = m.run(&launch(
        typed::<T>(&format!("{kernel}_bwd")),
        KernelLaunch::swiglu::<T>(len),
        vec![
            poisoned::<T>(len),   // 0 T* dgate
            poisoned::<T>(len),   // 1 T* dup
            act::<T>(&x.dout),    // 2 const T* dout
            act::<T>(&x.gate),    // 3 const T* gate
            act::<T>(&x.up),      // 4 const T* up
            Arg::I64(len as i64), // 5 long long len
        ],
    ))?;
    Ok(vec![to_f32(&after.get::<T>(0)), to_f32(&after.get::<T>(1))])
}

fn cpu_glu_bwd(kernel: &str, x: &GluInputs) -> Outputs {
    let len = x.gate.len();
    let (mut dg, mut du) = (vec![f32::NAN; len], vec![f32::NAN; len]);
    let be = CpuBackend::new();
    match kernel {
        "swiglu" => be.swiglu_bwd(&mut dg, &mut du, &x.dout, &x.gate, &x.up),
        _ => be.geglu_bwd(&mut dg, &mut du, &x.dout, &x.gate, &x.up),
    }
    .expect("CPU glu_bwd");
    vec![dg, du]
}

/// The forward (`bwd` false) or the backward of `kernel` (swiglu, geglu) for storage `T`.
fn glu<T: Elem>(kernel: &str, test: &str, seed: u64, bwd: bool) {
    let emulate = |m: &Module, x: &GluInputs| {
        if bwd {
            emulate_glu_bwd::<T>(kernel, m, x)
        } else {
            emulate_glu::<T>(kernel, m, x)
        }
    };
    let cpu = |x: &GluInputs| {
        if bwd {
            cpu_glu_bwd(kernel, x)
        } else {
            cpu_glu(kernel, x)
        }
    };
    let op = format!("{kernel}{}", if bwd { "_bwd" } else { "" });
    run_check::<T, _, _>(
        test,
        &op,
        seed,
        &GLU_LENS,
        &glu_inputs::<T>,
        Kernels::Elementwise,
        &emulate,
        &cpu,
        &|_| false,
    );
}

#[test]
fn swiglu_fwd_f32() {
    glu::<f32>("swiglu", "swiglu_fwd_f32", 25, false);
}

#[test]
fn swiglu_fwd_bf16() {
    glu::<bf16>("swiglu", "swiglu_fwd_bf16", 26, false);
}

#[test]
fn swiglu_bwd_f32() {
    glu::<f32>("swiglu", "swiglu_bwd_f32", 27, true);
}

#[test]
fn swiglu_bwd_bf16() {
    glu::<bf16>("swiglu", "swiglu_bwd_bf16", 28, true);
}

#[test]
fn geglu_fwd_f32() {
    glu::<f32>("geglu", "geglu_fwd_f32", 125, false);
}

#[test]
fn geglu_fwd_bf16() {
    glu::<bf16>("geglu", "geglu_fwd_bf16", 126, false);
}

#[test]
fn geglu_bwd_f32() {
    glu::<f32>("geglu", "geglu_bwd_f32", 127, true);
}

#[test]
fn geglu_bwd_bf16() {
    glu::<bf16>("geglu", "geglu_bwd_bf16", 128, true);
}

// ==== elementwise.cu: scale, soft-cap =========================================================

/// `scale` (`cap` is the factor), `softcap_fwd` and `softcap_bwd` against the CPU: values
/// spread to 4x the cap so tanh saturates; the capped `y` of the backward is the CPU's forward.
fn scale_cap<T: Elem>(kernel: &'static str, test: &str, seed: u64) {
    let cap = 1.5f32;
    let make = |rng: &mut Rng, &len: &usize| -> GluInputs {
        let x = draw::<T>(rng, len, 6.0);
        let mut y = x.clone();
        CpuBackend::new().softcap(&mut y, cap).expect("CPU softcap");
        // y as the kernel would have stored it.
        let y: Vec<f32> = y.iter().map(|&v| T::from_f32(v).to_f32()).collect();
        GluInputs {
            dout: draw::<T>(rng, len, 1.0),
            gate: x,
            up: y,
        }
    };
    let emulate = |m: &Module, x: &GluInputs| -> Result<Outputs, String> {
        let len = x.gate.len();
        let args = match kernel {
            "softcap_bwd" => vec![
                act::<T>(&x.dout),
                act::<T>(&x.up),
                Arg::F32(cap),
                Arg::I64(len as i64),
            ],
            _ => vec![act::<T>(&x.gate), Arg::F32(cap), Arg::I64(len as i64)],
        };
        let after = m.run(&launch(typed::<T>(kernel), KernelLaunch::cast(len), args))?;
        Ok(vec![to_f32(&after.get::<T>(0))])
    };
    let cpu = |x: &GluInputs| -> Outputs {
        let be = CpuBackend::new();
        let out = match kernel {
            "scale" => {
                let mut v = x.gate.clone();
                be.scale_act(&mut v, cap).map(|_| v)
            }
            "softcap_fwd" => {
                let mut v = x.gate.clone();
                be.softcap(&mut v, cap).map(|_| v)
            }
            _ => {
                let mut v = x.dout.clone();
                be.softcap_bwd(&mut v, &x.up, cap).map(|_| v)
            }
        };
        vec![out.expect("CPU op")]
    };
    run_check::<T, _, _>(
        test,
        kernel,
        seed,
        &GLU_LENS,
        &make,
        Kernels::Elementwise,
        &emulate,
        &cpu,
        &|_| false,
    );
}

#[test]
fn scale_and_softcap_f32() {
    scale_cap::<f32>("scale", "scale_and_softcap_f32", 131);
    scale_cap::<f32>("softcap_fwd", "scale_and_softcap_f32", 132);
    scale_cap::<f32>("softcap_bwd", "scale_and_softcap_f32", 133);
}

#[test]
fn scale_and_softcap_bf16() {
    scale_cap::<bf16>("scale", "scale_and_softcap_bf16", 134);
    scale_cap::<bf16>("softcap_fwd", "scale_and_softcap_bf16", 135);
    scale_cap::<bf16>("softcap_bwd", "scale_and_softcap_bf16", 136);
}

// ==== elementwise.cu: rope ===================================================================

/// Where the rows' positions come from.
#[derive(Debug, Clone, Copy)]
enum Positions {
    /// Packed training sequences of these lengths: positions restart at 0 in each.
    Packed(&'static [usize]),
    /// Generation: every row its own timeline position (these, cycled over the rows).
    Given(&'static [i32]),
}

#[derive(Debug, Clone, Copy)]
struct RopeShape {
    rows: usize,
    n_heads: usize,
    head_dim: usize,
    pos: Positions,
    inverse: bool,
}

/// Each forward and inverse: one sequence; packed sequences of unequal lengths (one of a single
/// row), with an odd half head dim; generation positions (decoding steps of sequences at
/// different timeline rows, prefill continuations, position 0), out of order.
fn rope_shapes() -> Vec<RopeShape> {
    use Positions::*;
    let base = [
        (7, 3, 32, Packed(&[7])),
        (26, 4, 64, Packed(&[13, 1, 12])),
        (15, 2, 10, Packed(&[5, 9, 1])),
        (2, 9, 64, Given(&[17, 3])),
        (12, 2, 128, Given(&[0, 1, 2, 40, 41, 7, 0, 3, 3, 2, 1, 39])),
    ];
    base.iter()
        .flat_map(|&(rows, n_heads, head_dim, pos)| {
            [false, true].map(|inverse| RopeShape {
                rows,
                n_heads,
                head_dim,
                pos,
                inverse,
            })
        })
        .collect()
}

struct RopeInputs {
    x: Vec<f32>,
    table: Vec<f32>,
    pos: Vec<i32>,
    s: RopeShape,
}

/// Every row's position, as the caller of `Backend::rope` passes them.
fn rope_positions(s: &RopeShape) -> Vec<i32> {
    let pos: Vec<i32> = match s.pos {
        Positions::Packed(lens) => lens.iter().flat_map(|&l| 0..l as i32).collect(),
        Positions::Given(p) => p.iter().copied().cycle().take(s.rows).collect(),
    };
    assert_eq!(pos.len(), s.rows, "{s:?}");
    pos
}

fn rope_inputs<T: Elem>(rng: &mut Rng, s: &RopeShape) -> RopeInputs {
    let pos = rope_positions(s);
    // A table a few positions longer than needed (the kernel must not need it exact).
    let n_pos = pos.iter().copied().max().unwrap_or(0) as usize + 3;
    // (cos, sin) of p·10000^(-2i/hd): the angles the models use.
    let half = s.head_dim / 2;
    let table = (0..n_pos)
        .flat_map(|p| {
            (0..half).flat_map(move |i| {
                let a = p as f64 * 10000f64.powf(-2.0 * i as f64 / s.head_dim as f64);
                [a.cos() as f32, a.sin() as f32]
            })
        })
        .collect();
    RopeInputs {
        x: draw::<T>(rng, s.rows * s.n_heads * s.head_dim, 1.0),
        table,
        pos,
        s: *s,
    }
}

/// `CudaBackend::<T>::rope`.
fn emulate_rope<T: Elem>(m: &Module, x: &RopeInputs) -> Result<Outputs, String> {
    let s = &x.s;
    let sign: f32 = if s.inverse { -1.0 } else { 1.0 };
    let after = m.run(&launch(
        typed::<T>("rope"),
        KernelLaunch::rope::<T>(s.rows * s.n_heads, s.head_dim),
        vec![
            act::<T>(&x.x),                                // 0 T* x (in and out)
            Arg::buf(&x.table),                            // 1 const float* table
            Arg::buf(&x.pos),                              // 2 const int* pos
            Arg::I64(s.rows as i64),                       // 3 long long rows
            Arg::I32(s.n_heads as i32),                    // 4 int n_heads
            Arg::I32(s.head_dim as i32),                   // 5 int hd
            Arg::I32((x.table.len() / s.head_dim) as i32), // 6 int n_pos
            Arg::F32(sign),                                // 7 float sign
        ],
    ))?;
    Ok(vec![to_f32(&after.get::<T>(0))])
}

fn cpu_rope(x: &RopeInputs) -> Outputs {
    let s = &x.s;
    let mut out = x.x.clone();
    CpuBackend::new()
        .rope(
            &mut out, &x.table, &x.pos, s.rows, s.n_heads, s.head_dim, s.inverse,
        )
        .expect("CPU rope");
    vec![out]
}

fn rope<T: Elem>(test: &str, seed: u64) {
    run_check::<T, _, _>(
        test,
        "rope",
        seed,
        &rope_shapes(),
        &rope_inputs::<T>,
        Kernels::Elementwise,
        &emulate_rope::<T>,
        &cpu_rope,
        &|_| false,
    );
}

#[test]
fn rope_f32() {
    rope::<f32>("rope_f32", 29);
}

#[test]
fn rope_bf16() {
    rope::<bf16>("rope_bf16", 30);
}

/// The host cannot see device positions, so the kernel keeps the table read in bounds: a
/// position past the table (or negative) must trap, not read outside it.
#[test]
fn rope_traps_on_a_position_outside_the_table() {
    if !have_compiler("rope_traps_on_a_position_outside_the_table") {
        return;
    }
    let shape = rope_shapes()[4];
    let mut x = rope_inputs::<f32>(&mut Rng::new(9), &shape);
    let n_pos = (x.table.len() / shape.head_dim) as i32;
    assert!(emulate_rope::<f32>(Kernels::Elementwise.module(), &x).is_ok());
    for bad in [n_pos, -1] {
        x.pos[3] = bad;
        let err = emulate_rope::<f32>(Kernels::Elementwise.module(), &x)
            .expect_err("a position outside the table must fail the launch");
        assert!(err.contains("__trap"), "position {bad}: {err}");
    }
}

// ==== elementwise.cu: casts ==================================================================

/// f32 values whose conversion has edge cases: signed zeros and infinities, NaNs with payloads
/// (neither is the poison's bit pattern), ties to even either way, values that round up into
/// the next binade or to infinity, subnormals; then random ones at several scales.
fn cast_inputs(rng: &mut Rng, len: usize) -> Vec<f32> {
    let special = [
        0x0000_0000u32, // +0
        0x8000_0000,    // -0
        0x7f80_0000,    // +inf
        0xff80_0000,    // -inf
        0xffa1_2345,    // -NaN, signalling, with a payload
        0x7fc0_0001,    // +NaN, quiet, payload in the low half only
        0x3f80_8000,    // 1 + 2^-8: a tie, rounds down to even
        0x3f81_8000,    // a tie that rounds up to even
        0x3f80_8001,    // just above a tie
        0x3fff_ffff,    // rounds up into the next binade
        0x7f7f_ffff,    // f32::MAX: rounds to +inf in bf16
        0x0000_0001,    // smallest subnormal
        0x807f_ffff,    // largest negative subnormal
    ];
    let scales = [1.0f32, 1e-3, 1e4, 1e-39];
    (0..len)
        .map(|i| match special.get(i) {
            Some(&b) => f32::from_bits(b),
            None => rng.normal() as f32 * scales[i % scales.len()],
        })
        .collect()
}

const CAST_LENS: [usize; 4] = [1, 37, 1000, 4099];

/// Bits of `v` (2 or 4 bytes each).
fn bits<T: Elem>(v: &[T]) -> Vec<u8> {
    bytemuck::cast_slice(v).to_vec()
}

/// Where `got` and `want` first differ, as elements of `size` bytes.
fn first_difference(got: &[u8], want: &[u8], size: usize) -> Option<usize> {
    if got.len() != want.len() {
        return Some(0);
    }
    (0..got.len() / size).find(|&i| got[i * size..(i + 1) * size] != want[i * size..(i + 1) * size])
}

/// `cast_from_f32_<T>` (launched as `CudaBackend::f32_as_t` does) and `cast_to_f32_<T>` (not
/// launched by the backend; the same flat shape): bit-identical to `DeviceElem::from_f32` /
/// `to_f32`, the conversions the host uses for uploads and downloads.
fn casts<T: Elem>(test: &str, seed: u64) {
    if !have_compiler(test) {
        return;
    }
    let m = Kernels::Elementwise.module();
    let mut rng = Rng::new(seed);
    let size = std::mem::size_of::<T>();
    let mut failures = Vec::new();
    for len in CAST_LENS {
        let src = cast_inputs(&mut rng, len);
        let stored: Vec<T> = src.iter().map(|&x| T::from_f32(x)).collect();
        let widened: Vec<f32> = stored.iter().map(|x| x.to_f32()).collect();
        let from = m.run(&launch(
            typed::<T>("cast_from_f32"),
            KernelLaunch::cast(len),
            vec![
                poisoned::<T>(len),   // 0 T* dst
                Arg::buf(&src),       // 1 const float* src
                Arg::I64(len as i64), // 2 long long len
            ],
        ));
        let to = m.run(&launch(
            typed::<T>("cast_to_f32"),
            KernelLaunch::cast(len),
            vec![
                poisoned::<f32>(len), // 0 float* dst
                Arg::buf(&stored),    // 1 const T* src
                Arg::I64(len as i64), // 2 long long len
            ],
        ));
        for (op, run, want, size) in [
            ("cast_from_f32", from, bits(&stored), size),
            ("cast_to_f32", to, bits(&widened), 4),
        ] {
            let verdict = match run {
                Err(e) => Some(e),
                Ok(after) => first_difference(&after.get::<u8>(0), &want, size)
                    .map(|i| format!("element {i} (input {:#010x}) differs", src[i].to_bits())),
            };
            println!(
                "{op:<22} {:<5} len {len:<5} {}",
                T::SUFFIX,
                verdict.as_deref().unwrap_or("bit-identical")
            );
            if let Some(v) = verdict {
                failures.push(format!("{op} len {len}: {v}"));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "casts ({}):\n{}",
        T::SUFFIX,
        failures.join("\n")
    );
}

#[test]
fn casts_f32() {
    casts::<f32>("casts_f32", 31);
}

#[test]
fn casts_bf16() {
    casts::<bf16>("casts_bf16", 32);
}

// ==== loss.cu: cross-entropy =================================================================

#[derive(Debug)]
struct CeShape {
    n: usize,
    vocab: usize,
    grad: Option<f32>,
    all_ignored: bool,
}

/// Vocabularies that are no multiple of 4 (101, 257: the element path for both types), a
/// multiple of 4 but not 8 (1004: vectors for f32 only), multiples of 8 (64, 4096 and
/// SmolLM2's 49152: vectors for both); with and without the gradient; rows ignored.
const CE_SHAPES: [CeShape; 10] = [
    CeShape {
        n: 1,
        vocab: 101,
        grad: None,
        all_ignored: false,
    },
    CeShape {
        n: 3,
        vocab: 101,
        grad: Some(0.25),
        all_ignored: false,
    },
    CeShape {
        n: 7,
        vocab: 257,
        grad: Some(0.25),
        all_ignored: false,
    },
    CeShape {
        n: 3,
        vocab: 64,
        grad: None,
        all_ignored: false,
    },
    CeShape {
        n: 7,
        vocab: 64,
        grad: Some(1.0),
        all_ignored: false,
    },
    CeShape {
        n: 3,
        vocab: 1004,
        grad: Some(0.25),
        all_ignored: false,
    },
    CeShape {
        n: 2,
        vocab: 4096,
        grad: Some(0.25),
        all_ignored: false,
    },
    CeShape {
        n: 2,
        vocab: 4096,
        grad: None,
        all_ignored: true,
    },
    CeShape {
        n: 3,
        vocab: 257,
        grad: Some(0.5),
        all_ignored: true,
    },
    CeShape {
        n: 2,
        vocab: 49152,
        grad: Some(0.125),
        all_ignored: false,
    },
];

struct CeInputs {
    logits: Vec<f32>,
    targets: Vec<i32>,
    vocab: usize,
    grad: Option<f32>,
}

/// The loss accumulator's value before the call: the op adds to it.
const CE_ACC0: f32 = 1.5;

fn ce_inputs<T: Elem>(rng: &mut Rng, s: &CeShape) -> CeInputs {
    let logits = draw::<T>(rng, s.n * s.vocab, 3.0);
    // Row 0 targets the last logit, row 1 the first, every fifth from row 2 is ignored.
    let targets = (0..s.n)
        .map(|i| match i % 5 {
            _ if s.all_ignored => -1,
            2 => -1,
            _ if i == 0 => s.vocab as i32 - 1,
            _ if i == 1 => 0,
            _ => rng.below(s.vocab) as i32,
        })
        .collect();
    CeInputs {
        logits,
        targets,
        vocab: s.vocab,
        grad: s.grad,
    }
}

/// `CudaBackend::<T>::cross_entropy`: the per-row kernel, then the accumulation; returns the
/// accumulator and the logits afterwards (the gradient, or unchanged).
fn emulate_ce<T: Elem>(m: &Module, x: &CeInputs) -> Result<Outputs, String> {
    let n = x.targets.len();
    let after = m.run(&launch(
        typed::<T>("cross_entropy"),
        KernelLaunch::cross_entropy(n),
        vec![
            act::<T>(&x.logits),               // 0 T* logits (in and out)
            poisoned::<f32>(n),                // 1 float* row_loss
            Arg::buf(&x.targets),              // 2 const int* targets
            Arg::I32(x.vocab as i32),          // 3 int vocab
            Arg::F32(x.grad.unwrap_or(0.0)),   // 4 float grad_scale
            Arg::I32(x.grad.is_some().into()), // 5 int write_grad
        ],
    ))?;
    let logits = to_f32(&after.get::<T>(0));
    let acc = emulate_ce_accumulate(m, CE_ACC0, &after.get::<f32>(1))?;
    Ok(vec![acc, logits])
}

/// The second launch of `CudaBackend::cross_entropy`: `acc[0] += Σ row_loss`.
fn emulate_ce_accumulate(m: &Module, acc0: f32, row_loss: &[f32]) -> Result<Vec<f32>, String> {
    let after = m.run(&launch(
        "ce_loss_accumulate_f32".into(),
        KernelLaunch::ce_loss_accumulate(),
        vec![
            Arg::buf(&[acc0]),               // 0 float* acc
            Arg::buf(row_loss),              // 1 const float* row_loss
            Arg::I32(row_loss.len() as i32), // 2 int n
        ],
    ))?;
    Ok(after.get::<f32>(0))
}

fn cpu_ce(x: &CeInputs) -> Outputs {
    let mut logits = x.logits.clone();
    let mut acc = vec![CE_ACC0];
    CpuBackend::new()
        .cross_entropy(&mut logits, &mut acc, &x.targets, x.vocab, x.grad)
        .expect("CPU cross_entropy");
    vec![acc, logits]
}

fn cross_entropy<T: Elem>(test: &str, seed: u64) {
    run_check::<T, _, _>(
        test,
        "cross_entropy",
        seed,
        &CE_SHAPES,
        &ce_inputs::<T>,
        Kernels::Loss,
        &emulate_ce::<T>,
        &cpu_ce,
        &|s| s.vocab >= 4096,
    );
}

#[test]
fn cross_entropy_f32() {
    cross_entropy::<f32>("cross_entropy_f32", 33);
}

#[test]
fn cross_entropy_bf16() {
    cross_entropy::<bf16>("cross_entropy_bf16", 34);
}

/// `ce_loss_accumulate_f32` alone, over up to 16 times as many row losses as its block has
/// threads (the backend runs it after every cross-entropy call), against an f64 sum in row
/// order as the CPU backend adds its row losses.
#[test]
fn ce_loss_accumulate() {
    run_check::<f32, _, _>(
        "ce_loss_accumulate",
        "ce_loss_accumulate",
        35,
        &[1usize, 255, 256, 257, 1000, 4097],
        &|rng, &n| {
            // Ignored rows (every fifth) have loss 0.
            let rows: Vec<f32> = (0..n)
                .map(|i| {
                    if i % 5 == 2 {
                        0.0
                    } else {
                        3.0 * rng.normal().abs() as f32
                    }
                })
                .collect();
            rows
        },
        Kernels::Loss,
        &|m, rows| Ok(vec![emulate_ce_accumulate(m, CE_ACC0, rows)?]),
        &|rows| {
            let total: f64 = rows.iter().map(|&x| x as f64).sum();
            vec![vec![(CE_ACC0 as f64 + total) as f32]]
        },
        &|&n| n == 4097,
    );
}

/// The cross-entropy tests can fail: with the rescaling of the running sum dropped when two
/// (max, sum) pairs merge, the losses and gradients must be out of tolerance.
#[test]
fn a_broken_logsumexp_merge_is_caught() {
    if !have_compiler("a_broken_logsumexp_merge_is_caught") {
        return;
    }
    let m = Kernels::Loss.build_mutated(
        "s = s * expf(m - mx) + s2 * expf(m2 - mx);",
        "s = s + s2 * expf(m2 - mx);",
    );
    let x = ce_inputs::<f32>(&mut Rng::new(6), &CE_SHAPES[5]);
    common::assert_caught::<f32>(
        "a broken logsumexp merge",
        &emulate_ce::<f32>(&m, &x).unwrap(),
        &cpu_ce(&x),
    );
}

// ==== optim.cu: AdamW ========================================================================

#[derive(Debug)]
struct AdamShape {
    len: usize,
    step: u64,
    weight_decay: f32,
}

/// Lengths that are no multiple of 4 (the scalar path) and multiples (float4), one block and
/// 65 of them; the first step, an early one and a late one (bias corrections near 1).
const ADAM_SHAPES: [AdamShape; 7] = [
    AdamShape {
        len: 1,
        step: 1,
        weight_decay: 0.01,
    },
    AdamShape {
        len: 3,
        step: 3,
        weight_decay: 0.0,
    },
    AdamShape {
        len: 4,
        step: 2,
        weight_decay: 0.01,
    },
    AdamShape {
        len: 7 * 97 + 1,
        step: 3,
        weight_decay: 0.01,
    },
    AdamShape {
        len: 26 * 100,
        step: 1000,
        weight_decay: 0.1,
    },
    AdamShape {
        len: 1023,
        step: 1,
        weight_decay: 0.01,
    },
    AdamShape {
        len: 65540,
        step: 7,
        weight_decay: 0.01,
    },
];

struct AdamInputs {
    p: Vec<f32>,
    g: Vec<f32>,
    m: Vec<f32>,
    v: Vec<f32>,
    hp: AdamStep,
}

/// Parameters, gradients and moments as parity.rs draws them (moments mid-training: nonzero).
fn adam_inputs(rng: &mut Rng, s: &AdamShape) -> AdamInputs {
    let mut f = |scale: f32| -> Vec<f32> {
        rng.normal_vec(s.len)
            .into_iter()
            .map(|x| x * scale)
            .collect()
    };
    AdamInputs {
        p: f(1.0),
        g: f(1.0),
        m: f(0.1),
        v: f(0.1).into_iter().map(|x| x * x).collect(),
        hp: AdamStep {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: s.weight_decay,
            step: s.step,
            grad_scale: 0.5,
        },
    }
}

/// `CudaBackend::adamw`: (params, m, v) afterwards.
fn emulate_adam(m: &Module, x: &AdamInputs) -> Result<Outputs, String> {
    let len = x.p.len();
    let mut args = vec![
        Arg::buf(&x.p),       // 0 float* p
        Arg::buf(&x.g),       // 1 const float* g
        Arg::buf(&x.m),       // 2 float* m
        Arg::buf(&x.v),       // 3 float* v
        Arg::I64(len as i64), // 4 long long len
    ];
    // 5..12: grad_scale, decay, w1, beta2, one_minus_beta2, bc2_sqrt, eps, neg_step
    args.extend(x.hp.scalars().to_array().map(Arg::F32));
    let after = m.run(&launch("adamw_f32".into(), KernelLaunch::adamw(len), args))?;
    Ok(vec![
        after.get::<f32>(0),
        after.get::<f32>(2),
        after.get::<f32>(3),
    ])
}

fn cpu_adam(x: &AdamInputs) -> Outputs {
    let (mut p, mut m, mut v) = (x.p.clone(), x.m.clone(), x.v.clone());
    CpuBackend::new()
        .adamw(&mut p, &x.g, &mut m, &mut v, &x.hp)
        .expect("CPU adamw");
    vec![p, m, v]
}

#[test]
fn adamw() {
    run_check::<f32, _, _>(
        "adamw",
        "adamw",
        36,
        &ADAM_SHAPES,
        &adam_inputs,
        Kernels::Optim,
        &emulate_adam,
        &cpu_adam,
        &|_| false,
    );
}

/// The very first step of a run: moments still zero, so all of `v` is `(1 - β2)·g²` and any
/// error in the host's `1 - β2` shows undiluted. (It once did: the CUDA host widened 0.999f32
/// to f64 directly, 1.3e-5 off the CPU's decimal 0.999; both now share `AdamStep::scalars`.)
#[test]
fn adamw_first_step_from_zero_moments() {
    run_check::<f32, _, _>(
        "adamw_first_step_from_zero_moments",
        "adamw (m = v = 0)",
        37,
        &[AdamShape {
            len: 1000,
            step: 1,
            weight_decay: 0.01,
        }],
        &|rng, s| {
            let x = adam_inputs(rng, s);
            AdamInputs {
                m: vec![0.0; s.len],
                v: vec![0.0; s.len],
                ..x
            }
        },
        Kernels::Optim,
        &emulate_adam,
        &cpu_adam,
        &|_| false,
    );
}

// ==== optim.cu: sum of squares ===============================================================

/// Lengths: tiny, no multiple of 4 (the scalar path), multiples (float4); one block, several.
const SUMSQ_LENS: [usize; 6] = [1, 3, 7 * 97 + 3, 1027, 4096, 26 * 100 + 3];

/// Past 4·256·1024 the grid stops growing at `SUMSQ_MAX_BLOCKS` (1024) and every thread loops,
/// on both paths. 262144 emulated threads a launch: about half a minute each.
const SUMSQ_LONG_LENS: [usize; 2] = [1 << 21, 3 << 20 | 1];

/// `CudaBackend::sum_squares`: the partial sums, then the host's f64 sum of them.
fn emulate_sumsq(m: &Module, g: &[f32]) -> Result<Outputs, String> {
    let shape = KernelLaunch::sum_squares(g.len());
    let after = m.run(&launch(
        "sum_squares_partial_f32".into(),
        shape,
        vec![
            poisoned::<f32>(shape.grid as usize), // 0 float* partial
            Arg::buf(g),                          // 1 const float* g
            Arg::I64(g.len() as i64),             // 2 long long len
        ],
    ))?;
    let s: f64 = after.get::<f32>(0).iter().map(|&x| x as f64).sum();
    // Compared in f32, as parity does: each block's sum is f32.
    Ok(vec![vec![s as f32]])
}

fn cpu_sumsq(g: &Vec<f32>) -> Outputs {
    vec![vec![
        CpuBackend::new().sum_squares(g).expect("CPU sum_squares") as f32,
    ]]
}

fn sum_squares(test: &str, lens: &[usize], repeat: usize) {
    run_check::<f32, _, _>(
        test,
        "sum_squares",
        38,
        lens,
        &|rng, &len| rng.normal_vec(len),
        Kernels::Optim,
        &|m, g: &Vec<f32>| emulate_sumsq(m, g),
        &cpu_sumsq,
        &|&len| len == repeat,
    );
}

#[test]
fn sum_squares_f32() {
    sum_squares("sum_squares_f32", &SUMSQ_LENS, 4096);
}

#[test]
#[ignore = "slow: about a minute (two launches of 1024 blocks); run with --ignored"]
fn sum_squares_f32_past_the_grid_limit() {
    sum_squares("sum_squares_f32_past_the_grid_limit", &SUMSQ_LONG_LENS, 0);
}

/// The optimizer tests can fail: with the fourth lane of each float4 left out of the sum of
/// squares, the result must be out of tolerance.
#[test]
fn a_broken_sum_of_squares_is_caught() {
    if !have_compiler("a_broken_sum_of_squares_is_caught") {
        return;
    }
    let m = Kernels::Optim.build_mutated("acc = fmaf(x.w, x.w, acc);", "");
    let g = Rng::new(7).normal_vec(4096);
    common::assert_caught::<f32>(
        "a broken sum of squares",
        &emulate_sumsq(&m, &g).unwrap(),
        &cpu_sumsq(&g),
    );
}

/// The elementwise tests can fail: with the second half's rotation turned the wrong way, rope
/// must be out of tolerance (shown on an inverse rotation at generation positions).
#[test]
fn a_broken_rope_is_caught() {
    if !have_compiler("a_broken_rope_is_caught") {
        return;
    }
    let m = Kernels::Elementwise.build_mutated(
        "y2[e] = x2[e] * c[e] + x1[e] * s[e];",
        "y2[e] = x2[e] * c[e] - x1[e] * s[e];",
    );
    let shape = rope_shapes()
        .into_iter()
        .find(|s| s.inverse && matches!(s.pos, Positions::Given(_)))
        .unwrap();
    let x = rope_inputs::<f32>(&mut Rng::new(8), &shape);
    common::assert_caught::<f32>(
        "a broken rope",
        &emulate_rope::<f32>(&m, &x).unwrap(),
        &cpu_rope(&x),
    );
}

/// The GeGLU and soft-cap backward tests can fail: a wrong factor in GELU's derivative, and
/// the soft-cap's `1 - t²` taken as `1 - t`, must each be out of tolerance.
#[test]
fn a_broken_geglu_or_softcap_is_caught() {
    if !have_compiler("a_broken_geglu_or_softcap_is_caught") {
        return;
    }
    let m = Kernels::Elementwise.build_mutated("(1.0f + 3.0f * B * g * g)", "(1.0f + B * g * g)");
    let x = glu_inputs::<f32>(&mut Rng::new(9), &(7 * 270));
    common::assert_caught::<f32>(
        "a broken geglu_bwd",
        &emulate_glu_bwd::<f32>("geglu", &m, &x).unwrap(),
        &cpu_glu_bwd("geglu", &x),
    );
    let m = Kernels::Elementwise.build_mutated("(1.0f - t * t));", "(1.0f - t));");
    let mut rng = Rng::new(10);
    let len = 7 * 270;
    let cap = 1.5f32;
    let dx = draw::<f32>(&mut rng, len, 1.0);
    let mut y = draw::<f32>(&mut rng, len, 6.0);
    CpuBackend::new().softcap(&mut y, cap).unwrap();
    let after = m
        .run(&launch(
            typed::<f32>("softcap_bwd"),
            KernelLaunch::cast(len),
            vec![
                act::<f32>(&dx),
                act::<f32>(&y),
                Arg::F32(cap),
                Arg::I64(len as i64),
            ],
        ))
        .unwrap();
    let mut want = dx.clone();
    CpuBackend::new().softcap_bwd(&mut want, &y, cap).unwrap();
    common::assert_caught::<f32>(
        "a broken softcap_bwd",
        &[to_f32(&after.get::<f32>(0))],
        &[want],
    );
}
