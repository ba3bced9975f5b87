//! CUDA-vs-CPU parity of every [`Backend`] op: the one way the doctor and `tests/cuda_parity.rs`
//! check the GPU.
//!
//! Each case draws random inputs, rounds the ones stored as activations to the GPU's element
//! type (so both backends see identical values), runs the op on the CPU reference and twice on
//! the GPU, and reports
//! - the relative error `‖gpu - cpu‖₂ / ‖cpu‖₂` over every output (NaN or inf fails);
//! - whether the two GPU runs are bit-identical (every kernel is meant to be deterministic).
//!
//! Outputs that an op overwrites start filled with NaN, so an element the kernel forgets to
//! write shows up as a failure; outputs it accumulates into start random.
//!
//! Tolerances: f32 storage 1e-5 (f32 math in a different summation order: a few ulps times
//! √(reduction length) stays far below it); bf16 storage 1e-2 (each stored value carries a
//! rounding error up to 2⁻⁹ ≈ 0.2 %, and an op chains at most a few such roundings).

use crate::backend::cpu::CpuBackend;
use crate::backend::cuda::backend::CudaBackend;
use crate::backend::cuda::runtime::DeviceElem;
use crate::backend::{AdamStep, AttnShape, Backend, CacheShape, LoraSlot};
use crate::linalg::gaussian_orthonormal;
use crate::util::rng::Rng;
use anyhow::{Context, Result};

/// Outcome of one op at one shape.
#[derive(Clone, Debug)]
pub struct CaseResult {
    pub op: String,
    pub shape: String,
    /// Largest relative error over the op's outputs.
    pub rel_err: f64,
    pub tol: f64,
    /// The two GPU runs gave bit-identical outputs.
    pub deterministic: bool,
    /// Set when the case could not run (an error from either backend).
    pub error: Option<String>,
}

impl CaseResult {
    pub fn pass(&self) -> bool {
        self.error.is_none()
            && self.rel_err.is_finite()
            && self.rel_err <= self.tol
            && self.deterministic
    }
}

/// Sizes one parity sweep uses. `d` deliberately includes values that are not multiples of the
/// 16-byte vector width, so the kernels' scalar paths run too.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    pub n: usize,
    pub d: usize,
    pub ffn: usize,
    pub vocab: usize,
    pub r: usize,
    pub k: usize,
    pub batch: usize,
    pub seq: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

impl Shape {
    fn label(&self) -> String {
        format!(
            "n{} d{} ffn{} V{} r{} k{}",
            self.n, self.d, self.ffn, self.vocab, self.r, self.k
        )
    }
}

/// The shapes of a standard sweep: tiny odd sizes, a mid size, and a SmolLM2-like layer.
pub fn standard_shapes() -> Vec<Shape> {
    vec![
        Shape {
            n: 7,
            d: 97,
            ffn: 61,
            vocab: 101,
            r: 3,
            k: 5,
            batch: 1,
            seq: 7,
            n_heads: 3,
            n_kv_heads: 1,
            head_dim: 32,
        },
        Shape {
            n: 26,
            d: 100,
            ffn: 270,
            vocab: 1003,
            r: 8,
            k: 9,
            batch: 2,
            seq: 13,
            n_heads: 4,
            n_kv_heads: 2,
            head_dim: 64,
        },
        Shape {
            n: 128,
            d: 576,
            ffn: 1536,
            vocab: 4096,
            r: 32,
            k: 20,
            batch: 2,
            seq: 64,
            n_heads: 9,
            n_kv_heads: 3,
            head_dim: 64,
        },
    ]
}

/// Real model widths for the row kernels, whose launch shape depends on d (the fused
/// residual/ablation/rmsnorm keeps 1, 2 or 4 16-byte chunks of a row per thread): Llama-3.2-1B
/// (2048), Qwen2.5-7B (3584), Llama-3-8B (4096, with 64 directions); a row count that is no
/// multiple of 4.
pub fn wide_row_shapes() -> Vec<Shape> {
    [2048, 3584, 4096]
        .into_iter()
        .map(|d| Shape {
            n: 9,
            d,
            ffn: 64,
            vocab: 64,
            r: 4,
            k: if d == 4096 { 64 } else { 8 },
            batch: 1,
            seq: 9,
            n_heads: 2,
            n_kv_heads: 1,
            head_dim: 64,
        })
        .collect()
}

pub use crate::linalg::rel_err;

/// Tolerance of the relative error for storage type `T`.
pub fn tolerance<T: DeviceElem>() -> f64 {
    if T::SUFFIX == "f32" {
        1e-5
    } else {
        1e-2
    }
}

fn bits_equal(a: &[Vec<f32>], b: &[Vec<f32>]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|(x, y)| {
            x.len() == y.len() && x.iter().zip(y).all(|(p, q)| p.to_bits() == q.to_bits())
        })
}

/// The outputs of one op, as host vectors, in a fixed order.
type Outputs = Vec<Vec<f32>>;

/// CPU outputs, then the outputs of two GPU runs.
type Compared = (Outputs, Outputs, Outputs);

fn nan(len: usize) -> Vec<f32> {
    vec![f32::NAN; len]
}

/// Run every op at every shape: CPU reference vs `gpu`, each case with fresh random inputs.
pub fn run_all<T: DeviceElem>(
    gpu: &CudaBackend<T>,
    cpu: &CpuBackend,
    shapes: &[Shape],
    seed: u64,
) -> Vec<CaseResult> {
    let mut out = Vec::new();
    let mut rng = Rng::new(seed);
    for s in shapes {
        for case in CASES {
            out.push(run_case::<T>(gpu, cpu, case, s, &mut rng));
        }
    }
    out
}

/// Names of every case (one or more per op).
pub fn case_names() -> Vec<&'static str> {
    CASES.iter().map(|c| c.name).collect()
}

/// Run only the cases whose name starts with `prefix`.
pub fn run_matching<T: DeviceElem>(
    gpu: &CudaBackend<T>,
    cpu: &CpuBackend,
    shapes: &[Shape],
    seed: u64,
    prefix: &str,
) -> Vec<CaseResult> {
    let mut out = Vec::new();
    let mut rng = Rng::new(seed);
    for s in shapes {
        for case in CASES.iter().filter(|c| c.name.starts_with(prefix)) {
            out.push(run_case::<T>(gpu, cpu, case, s, &mut rng));
        }
    }
    out
}

/// One op at one configuration: draws its inputs, builds a [`CaseBody`] and hands it to the
/// runner, which returns (CPU outputs, GPU run 1, GPU run 2).
struct Case {
    name: &'static str,
    run: fn(&Runner<'_>, &Shape, &mut Draw<'_>) -> Result<Compared>,
}

/// Runs a case body on the CPU reference and twice on the GPU under test.
struct Runner<'a> {
    run: &'a dyn Fn(&dyn CaseBody) -> Result<Compared>,
}

/// A case body generic over the backend: given inputs, produce outputs.
trait CaseBody {
    fn on_cpu(&self, b: &CpuBackend) -> Result<Outputs>;
    fn on_gpu_bf16(&self, b: &CudaBackend<half::bf16>) -> Result<Outputs>;
    fn on_gpu_f32(&self, b: &CudaBackend<f32>) -> Result<Outputs>;
}

fn run_case<T: DeviceElem>(
    gpu: &CudaBackend<T>,
    cpu: &CpuBackend,
    case: &Case,
    s: &Shape,
    rng: &mut Rng,
) -> CaseResult {
    let runner = |body: &dyn CaseBody| -> Result<Compared> {
        let want = body.on_cpu(cpu).context("CPU reference")?;
        let (g1, g2) = dispatch::<T>(gpu, body)?;
        Ok((want, g1, g2))
    };
    let runner = Runner { run: &runner };
    let mut draw = Draw {
        rng,
        round: |x| T::from_f32(x).to_f32(),
    };
    let mut res = CaseResult {
        op: case.name.to_string(),
        shape: s.label(),
        rel_err: f64::INFINITY,
        tol: tolerance::<T>(),
        deterministic: false,
        error: None,
    };
    match (case.run)(&runner, s, &mut draw) {
        Ok((want, g1, g2)) => {
            res.rel_err = if want.len() == g1.len() {
                want.iter()
                    .zip(&g1)
                    .map(|(w, g)| rel_err(g, w))
                    .fold(0.0, f64::max)
            } else {
                f64::INFINITY
            };
            res.deterministic = bits_equal(&g1, &g2);
        }
        Err(e) => res.error = Some(format!("{e:#}")),
    }
    res
}

/// Run `body` twice on `gpu`, picking the instantiation for `T`.
fn dispatch<T: DeviceElem>(
    gpu: &CudaBackend<T>,
    body: &dyn CaseBody,
) -> Result<(Outputs, Outputs)> {
    let any: &dyn std::any::Any = gpu;
    let twice = |f: &dyn Fn() -> Result<Outputs>| -> Result<(Outputs, Outputs)> {
        let a = f().context("GPU run 1")?;
        let b = f().context("GPU run 2")?;
        Ok((a, b))
    };
    if let Some(g) = any.downcast_ref::<CudaBackend<half::bf16>>() {
        twice(&|| body.on_gpu_bf16(g))
    } else if let Some(g) = any.downcast_ref::<CudaBackend<f32>>() {
        twice(&|| body.on_gpu_f32(g))
    } else {
        anyhow::bail!("no parity instantiation for element type {}", T::SUFFIX)
    }
}

/// Declare a case body: a struct of host inputs and one generic `fn run<B: Backend>` that
/// uploads them, runs the op and downloads the outputs.
macro_rules! body {
    ($ty:ident { $($field:ident : $fty:ty),* $(,)? } |$self:ident, $b:ident| $run:block) => {
        struct $ty { $($field: $fty),* }
        impl $ty {
            fn run<B: Backend>(&$self, $b: &B) -> Result<Outputs> $run
        }
        impl CaseBody for $ty {
            fn on_cpu(&self, b: &CpuBackend) -> Result<Outputs> { self.run(b) }
            fn on_gpu_bf16(&self, b: &CudaBackend<half::bf16>) -> Result<Outputs> { self.run(b) }
            fn on_gpu_f32(&self, b: &CudaBackend<f32>) -> Result<Outputs> { self.run(b) }
        }
    };
}

body!(EmbeddingCase { table: Vec<f32>, ids: Vec<u32>, d: usize } |self, b| {
    let table = b.upload_act(&self.table)?;
    let mut out = b.upload_act(&nan(self.ids.len() * self.d))?;
    b.embedding(&mut out, &table, &self.ids, self.d)?;
    Ok(vec![b.download_act(&out)?])
});

body!(LinearCase { x: Vec<f32>, w: Vec<f32>, bias: Option<Vec<f32>>, y0: Option<Vec<f32>>,
                   n: usize, d_in: usize, d_out: usize } |self, b| {
    let x = b.upload_act(&self.x)?;
    let w = b.upload_act(&self.w)?;
    let bias = self.bias.as_ref().map(|v| b.upload_act(v)).transpose()?;
    let mut y = match &self.y0 {
        Some(y0) => b.upload_act(y0)?,
        None => b.upload_act(&nan(self.n * self.d_out))?,
    };
    b.linear(&mut y, &x, &w, bias.as_ref(), self.n, self.d_in, self.d_out, self.y0.is_some())?;
    Ok(vec![b.download_act(&y)?])
});

body!(LinearBwdCase { dy: Vec<f32>, w: Vec<f32>, dx0: Option<Vec<f32>>,
                      n: usize, d_in: usize, d_out: usize } |self, b| {
    let dy = b.upload_act(&self.dy)?;
    let w = b.upload_act(&self.w)?;
    let mut dx = match &self.dx0 {
        Some(v) => b.upload_act(v)?,
        None => b.upload_act(&nan(self.n * self.d_in))?,
    };
    b.linear_bwd_input(&mut dx, &dy, &w, self.n, self.d_in, self.d_out, self.dx0.is_some())?;
    Ok(vec![b.download_act(&dx)?])
});

body!(LoraFwdCase { y0: Vec<f32>, x: Vec<f32>, params: Vec<f32>, slot: LoraSlot, scale: f32,
                    n: usize } |self, b| {
    let mut y = b.upload_act(&self.y0)?;
    let mut u = b.upload_f32(&nan(self.n * self.slot.r))?;
    let x = b.upload_act(&self.x)?;
    let p = b.upload_f32(&self.params)?;
    b.lora_fwd(&mut y, &mut u, &x, &p, &self.slot, self.scale, self.n)?;
    Ok(vec![b.download_act(&y)?, b.download_f32(&u)?])
});

body!(LoraBwdCase { dx0: Vec<f32>, grads0: Vec<f32>, dy: Vec<f32>, x: Vec<f32>, u: Vec<f32>,
                    params: Vec<f32>, slot: LoraSlot, scale: f32, n: usize } |self, b| {
    let mut dx = b.upload_act(&self.dx0)?;
    let mut g = b.upload_f32(&self.grads0)?;
    let dy = b.upload_act(&self.dy)?;
    let x = b.upload_act(&self.x)?;
    let u = b.upload_f32(&self.u)?;
    let p = b.upload_f32(&self.params)?;
    b.lora_bwd(&mut dx, &mut g, &dy, &x, &u, &p, &self.slot, self.scale, self.n)?;
    Ok(vec![b.download_act(&dx)?, b.download_f32(&g)?])
});

body!(NormFwdCase { a: Vec<f32>, bsum: Option<Vec<f32>>, q: Option<(Vec<f32>, usize)>,
                    w: Vec<f32>, n: usize, d: usize } |self, b| {
    let a = b.upload_act(&self.a)?;
    let bb = self.bsum.as_ref().map(|v| b.upload_act(v)).transpose()?;
    let q = self.q.as_ref().map(|(v, k)| b.upload_f32(v).map(|q| (q, *k))).transpose()?;
    let w = b.upload_act(&self.w)?;
    let mut resid = b.upload_act(&nan(self.n * self.d))?;
    let mut normed = b.upload_act(&nan(self.n * self.d))?;
    let mut rstd = b.upload_f32(&nan(self.n))?;
    b.residual_ablate_norm(&mut resid, &mut normed, &mut rstd, &a, bb.as_ref(),
        q.as_ref().map(|(q, k)| (q, *k)), &w, self.n, self.d, 1e-5)?;
    Ok(vec![b.download_act(&resid)?, b.download_act(&normed)?, b.download_f32(&rstd)?])
});

body!(NormBwdCase { dresid: Vec<f32>, dnormed: Vec<f32>, resid: Vec<f32>, rstd: Vec<f32>,
                    q: Option<(Vec<f32>, usize)>, w: Vec<f32>, n: usize, d: usize } |self, b| {
    let mut dr = b.upload_act(&self.dresid)?;
    let dn = b.upload_act(&self.dnormed)?;
    let resid = b.upload_act(&self.resid)?;
    let rstd = b.upload_f32(&self.rstd)?;
    let q = self.q.as_ref().map(|(v, k)| b.upload_f32(v).map(|q| (q, *k))).transpose()?;
    let w = b.upload_act(&self.w)?;
    b.residual_ablate_norm_bwd(&mut dr, &dn, &resid, &rstd, q.as_ref().map(|(q, k)| (q, *k)),
        &w, self.n, self.d)?;
    Ok(vec![b.download_act(&dr)?])
});

body!(RopeCase { x: Vec<f32>, table: Vec<f32>, pos: Vec<i32>, n_heads: usize, head_dim: usize,
                 inverse: bool } |self, b| {
    let mut x = b.upload_act(&self.x)?;
    let t = b.upload_f32(&self.table)?;
    let pos = b.upload_idx(&self.pos)?;
    b.rope(&mut x, &t, &pos, self.pos.len(), self.n_heads, self.head_dim, self.inverse)?;
    Ok(vec![b.download_act(&x)?])
});

body!(AttnFwdCase { q: Vec<f32>, k: Vec<f32>, v: Vec<f32>, lens: Vec<usize>, shape: AttnShape }
      |self, b| {
    let s = &self.shape;
    let seqs = b.seqs(&self.lens)?;
    let n = seqs.rows();
    let q = b.upload_act(&self.q)?;
    let k = b.upload_act(&self.k)?;
    let v = b.upload_act(&self.v)?;
    let mut out = b.upload_act(&nan(n * s.q_width()))?;
    let mut lse = b.upload_f32(&nan(s.n_heads * n))?;
    b.attention_fwd(&mut out, &mut lse, &q, &k, &v, &seqs, s)?;
    Ok(vec![b.download_act(&out)?, b.download_f32(&lse)?])
});

body!(AttnBwdCase { q: Vec<f32>, k: Vec<f32>, v: Vec<f32>, dout: Vec<f32>, lens: Vec<usize>,
                    shape: AttnShape } |self, b| {
    // The forward runs on the same backend, so out and lse are each backend's own.
    let s = &self.shape;
    let seqs = b.seqs(&self.lens)?;
    let n = seqs.rows();
    let q = b.upload_act(&self.q)?;
    let k = b.upload_act(&self.k)?;
    let v = b.upload_act(&self.v)?;
    let dout = b.upload_act(&self.dout)?;
    let mut out = b.alloc_act(n * s.q_width())?;
    let mut lse = b.alloc_f32(s.n_heads * n)?;
    b.attention_fwd(&mut out, &mut lse, &q, &k, &v, &seqs, s)?;
    let mut dq = b.upload_act(&nan(n * s.q_width()))?;
    let mut dk = b.upload_act(&nan(n * s.kv_width()))?;
    let mut dv = b.upload_act(&nan(n * s.kv_width()))?;
    b.attention_bwd(&mut dq, &mut dk, &mut dv, &dout, &out, &lse, &q, &k, &v, &seqs, s)?;
    Ok(vec![b.download_act(&dq)?, b.download_act(&dk)?, b.download_act(&dv)?])
});

body!(AttnCachedCase { q: Vec<f32>, k: Vec<f32>, v: Vec<f32>, start: Vec<u32>,
                       shape: CacheShape, chunks: Vec<usize> } |self, b| {
    // Generation as the model runs it: the caches start NaN-poisoned (a read of a row that was
    // never written shows up as NaN), then one call per chunk of new rows (a prefill, possibly in
    // pieces, then single-row decoding steps). q, k, v hold every sequence's whole timeline,
    // [batch, total, width]; outputs are each call's `out`, then the written cache rows.
    let s = self.shape;
    let total: usize = self.chunks.iter().sum();
    let (qw, kvw) = (s.heads.q_width(), s.heads.kv_width());
    let rows = |x: &[f32], width: usize, t0: usize, n: usize| -> Vec<f32> {
        (0..s.batch)
            .flat_map(|bb| x[(bb * total + t0) * width..(bb * total + t0 + n) * width].to_vec())
            .collect()
    };
    let mut kc = b.upload_act(&nan(s.batch * s.cap * kvw))?;
    let mut vc = b.upload_act(&nan(s.batch * s.cap * kvw))?;
    let mut outs = Vec::new();
    let mut past = 0;
    for &n in &self.chunks {
        let q = b.upload_act(&rows(&self.q, qw, past, n))?;
        let k = b.upload_act(&rows(&self.k, kvw, past, n))?;
        let v = b.upload_act(&rows(&self.v, kvw, past, n))?;
        let mut out = b.upload_act(&nan(s.batch * n * qw))?;
        let sh = CacheShape { new: n, past, ..s };
        b.attention_cached(&mut out, &q, &k, &v, &mut kc, &mut vc, &self.start, &sh)?;
        outs.push(b.download_act(&out)?);
        past += n;
    }
    for c in [&kc, &vc] {
        let c = b.download_act(c)?;
        outs.push(
            (0..s.batch)
                .flat_map(|bb| c[bb * s.cap * kvw..(bb * s.cap + total) * kvw].to_vec())
                .collect(),
        );
    }
    Ok(outs)
});

body!(GluCase { gate: Vec<f32>, up: Vec<f32>, gelu: bool } |self, b| {
    let g = b.upload_act(&self.gate)?;
    let u = b.upload_act(&self.up)?;
    let mut out = b.upload_act(&nan(self.gate.len()))?;
    match self.gelu {
        false => b.swiglu(&mut out, &g, &u)?,
        true => b.geglu(&mut out, &g, &u)?,
    }
    Ok(vec![b.download_act(&out)?])
});

body!(GluBwdCase { dout: Vec<f32>, gate: Vec<f32>, up: Vec<f32>, gelu: bool } |self, b| {
    let d = b.upload_act(&self.dout)?;
    let g = b.upload_act(&self.gate)?;
    let u = b.upload_act(&self.up)?;
    let mut dg = b.upload_act(&nan(self.gate.len()))?;
    let mut du = b.upload_act(&nan(self.gate.len()))?;
    match self.gelu {
        false => b.swiglu_bwd(&mut dg, &mut du, &d, &g, &u)?,
        true => b.geglu_bwd(&mut dg, &mut du, &d, &g, &u)?,
    }
    Ok(vec![b.download_act(&dg)?, b.download_act(&du)?])
});

// Soft-cap forward, its backward from the capped values, and the embedding scale.
body!(SoftcapCase { x: Vec<f32>, dy: Vec<f32>, cap: f32 } |self, b| {
    let mut y = b.upload_act(&self.x)?;
    b.softcap(&mut y, self.cap)?;
    let mut dx = b.upload_act(&self.dy)?;
    b.softcap_bwd(&mut dx, &y, self.cap)?;
    let mut s = b.upload_act(&self.x)?;
    b.scale_act(&mut s, self.cap)?;
    Ok(vec![b.download_act(&y)?, b.download_act(&dx)?, b.download_act(&s)?])
});

body!(CeCase { logits: Vec<f32>, targets: Vec<i32>, vocab: usize, grad: Option<f32> } |self, b| {
    let mut l = b.upload_act(&self.logits)?;
    let mut acc = b.upload_f32(&[1.5])?;
    b.cross_entropy(&mut l, &mut acc, &self.targets, self.vocab, self.grad)?;
    let mut out = vec![b.download_f32(&acc)?];
    if self.grad.is_some() {
        out.push(b.download_act(&l)?);
    }
    Ok(out)
});

body!(SumSqCase { g: Vec<f32> } |self, b| {
    let g = b.upload_f32(&self.g)?;
    let s = b.sum_squares(&g)?;
    // Compared in f32: the reduction's own precision is f32 per block.
    Ok(vec![vec![s as f32]])
});

body!(AdamCase { p: Vec<f32>, g: Vec<f32>, m: Vec<f32>, v: Vec<f32>, hp: AdamStep } |self, b| {
    let mut p = b.upload_f32(&self.p)?;
    let g = b.upload_f32(&self.g)?;
    let mut m = b.upload_f32(&self.m)?;
    let mut v = b.upload_f32(&self.v)?;
    b.adamw(&mut p, &g, &mut m, &mut v, &self.hp)?;
    Ok(vec![b.download_f32(&p)?, b.download_f32(&m)?, b.download_f32(&v)?])
});

// Full fine-tuning: each gradient op accumulates into a slice (at `off`) of a buffer of random
// prior contents; the output is the whole buffer, so a write outside the slice shows too.
body!(LinearWeightCase { dw0: Vec<f32>, off: usize, dy: Vec<f32>, x: Vec<f32>, n: usize,
                         d_in: usize, d_out: usize } |self, b| {
    let mut dw = b.upload_f32(&self.dw0)?;
    let dy = b.upload_act(&self.dy)?;
    let x = b.upload_act(&self.x)?;
    b.linear_bwd_weight(&mut dw, self.off, &dy, &x, self.n, self.d_in, self.d_out)?;
    Ok(vec![b.download_f32(&dw)?])
});

body!(BiasGradCase { db0: Vec<f32>, off: usize, dy: Vec<f32>, n: usize, d: usize } |self, b| {
    let mut db = b.upload_f32(&self.db0)?;
    let dy = b.upload_act(&self.dy)?;
    b.bias_bwd(&mut db, self.off, &dy, self.n, self.d)?;
    Ok(vec![b.download_f32(&db)?])
});

body!(NormGainGradCase { dw0: Vec<f32>, off: usize, dnormed: Vec<f32>, x: Vec<f32>,
                         rstd: Vec<f32>, n: usize, d: usize } |self, b| {
    let mut dw = b.upload_f32(&self.dw0)?;
    let dn = b.upload_act(&self.dnormed)?;
    let x = b.upload_act(&self.x)?;
    let rstd = b.upload_f32(&self.rstd)?;
    b.norm_weight_bwd(&mut dw, self.off, &dn, &x, &rstd, self.n, self.d)?;
    Ok(vec![b.download_f32(&dw)?])
});

body!(EmbeddingGradCase { dt0: Vec<f32>, off: usize, dx: Vec<f32>, ids: Vec<u32>, d: usize }
      |self, b| {
    let mut dt = b.upload_f32(&self.dt0)?;
    let dx = b.upload_act(&self.dx)?;
    b.embedding_bwd(&mut dt, self.off, &dx, &self.ids, self.d)?;
    Ok(vec![b.download_f32(&dt)?])
});

body!(ParamsToActCase { src: Vec<f32>, off: usize, len: usize, add: f32 } |self, b| {
    let src = b.upload_f32(&self.src)?;
    let mut dst = b.upload_act(&nan(self.len))?;
    b.params_to_act(&mut dst, &src, self.off, self.add)?;
    Ok(vec![b.download_act(&dst)?])
});

/// A flat LoRA buffer with one slot at deliberately odd offsets.
fn lora_layout(s: &Shape, g: &mut Draw<'_>) -> (Vec<f32>, LoraSlot) {
    let (r, d_in, d_out) = (s.r, s.d, s.ffn);
    let a_off = 3;
    let b_off = a_off + r * d_in + 5;
    let len = b_off + d_out * r + 2;
    let params = g.f32(len, 0.1);
    (
        params,
        LoraSlot {
            a_off,
            b_off,
            r,
            d_in,
            d_out,
        },
    )
}

fn attn_shape(s: &Shape, window: Option<usize>) -> AttnShape {
    AttnShape::plain(s.n_heads, s.n_kv_heads, s.head_dim, window)
}

/// Gemma-2-like heads: a scale other than 1/sqrt(head_dim) (twice it, so raw scores have a
/// standard deviation near 2 on unit inputs) and a soft cap of 3 that a good share of them
/// exceed (the tanh saturates there).
fn capped_shape(s: &Shape, window: Option<usize>) -> AttnShape {
    AttnShape {
        scale: (2.0 / (s.head_dim as f64).sqrt()) as f32,
        softcap: Some(3.0),
        ..attn_shape(s, window)
    }
}

/// The sweep's `batch·seq` rows packed as sequences of unequal lengths: `seq/2 + 1`, a single
/// row, then the rest (so short sequences share a 64-row span and the last one is longer than
/// `seq`), cut where the rows run out.
fn packed_lens(s: &Shape) -> Vec<usize> {
    let mut left = s.batch * s.seq;
    let mut lens = Vec::new();
    for want in [s.seq / 2 + 1, 1, usize::MAX] {
        let l = want.min(left);
        if l > 0 {
            lens.push(l);
            left -= l;
        }
    }
    lens
}

/// Each row's position in its sequence, as `Backend::seqs` lays them out.
fn positions(lens: &[usize]) -> Vec<i32> {
    lens.iter().flat_map(|&l| 0..l as i32).collect()
}

fn attn_fwd_case(g: &mut Draw<'_>, lens: Vec<usize>, shape: AttnShape) -> AttnFwdCase {
    let n: usize = lens.iter().sum();
    AttnFwdCase {
        q: g.act(n * shape.q_width(), 1.0),
        k: g.act(n * shape.kv_width(), 1.0),
        v: g.act(n * shape.kv_width(), 1.0),
        lens,
        shape,
    }
}

fn attn_bwd_case(g: &mut Draw<'_>, lens: Vec<usize>, shape: AttnShape) -> AttnBwdCase {
    let n: usize = lens.iter().sum();
    AttnBwdCase {
        q: g.act(n * shape.q_width(), 1.0),
        k: g.act(n * shape.kv_width(), 1.0),
        v: g.act(n * shape.kv_width(), 1.0),
        dout: g.act(n * shape.q_width(), 1.0),
        lens,
        shape,
    }
}

/// A generation sequence for `attention_cached`: `batch` sequences left-padded to a common
/// prompt (sequence 0 unpadded, the last one a single prompt token, the others half padding),
/// the prompt fed in `prefill` chunks, then `steps` single-row decoding steps; the cache has a
/// few spare rows.
#[allow(clippy::too_many_arguments)]
fn cached_case(
    g: &mut Draw<'_>,
    batch: usize,
    prefill: &[usize],
    steps: usize,
    heads: AttnShape,
) -> AttnCachedCase {
    let prompt: usize = prefill.iter().sum();
    let mut chunks = prefill.to_vec();
    chunks.extend(std::iter::repeat_n(1, steps));
    let total = prompt + steps;
    let start = (0..batch)
        .map(|b| match b {
            0 => 0,
            b if b + 1 == batch => prompt - 1,
            _ => prompt / 2,
        } as u32)
        .collect();
    let shape = CacheShape {
        batch,
        new: 0,
        past: 0,
        cap: total + 3,
        heads,
    };
    AttnCachedCase {
        q: g.act(batch * total * heads.q_width(), 1.0),
        k: g.act(batch * total * heads.kv_width(), 1.0),
        v: g.act(batch * total * heads.kv_width(), 1.0),
        start,
        shape,
        chunks,
    }
}

fn rope_table(seq: usize, head_dim: usize) -> Vec<f32> {
    let half = head_dim / 2;
    let mut t = Vec::with_capacity(seq * head_dim);
    for p in 0..seq {
        for i in 0..half {
            let inv = 10000f64.powf(-(2.0 * i as f64) / head_dim as f64);
            let a = p as f64 * inv;
            t.push(a.cos() as f32);
            t.push(a.sin() as f32);
        }
    }
    t
}

/// The random source of one case: activations come out rounded through the GPU's element
/// type (`round`), so both backends start from identical values.
struct Draw<'a> {
    rng: &'a mut Rng,
    round: fn(f32) -> f32,
}

impl Draw<'_> {
    /// Normal values times `scale`, rounded to the activation type.
    fn act(&mut self, len: usize, scale: f32) -> Vec<f32> {
        let round = self.round;
        self.rng
            .normal_vec(len)
            .into_iter()
            .map(|x| round(x * scale))
            .collect()
    }
    /// Normal values times `scale` (f32 state).
    fn f32(&mut self, len: usize, scale: f32) -> Vec<f32> {
        self.rng
            .normal_vec(len)
            .into_iter()
            .map(|x| x * scale)
            .collect()
    }
    fn below(&mut self, n: usize) -> usize {
        self.rng.below(n)
    }
    /// `k` random orthonormal rows of length `d`.
    fn directions(&mut self, k: usize, d: usize) -> Vec<f32> {
        gaussian_orthonormal(self.rng, k, d).expect("k <= d Gaussian rows are independent")
    }
}

macro_rules! case {
    ($name:literal, |$s:ident, $g:ident| $make:expr) => {
        Case {
            name: $name,
            run: |runner, $s, $g| {
                let body = $make;
                (runner.run)(&body)
            },
        }
    };
}

const CASES: &[Case] = &[
    case!("embedding", |s, g| {
        let vocab = s.vocab;
        let table = g.act(vocab * s.d, 1.0);
        let ids = (0..s.n).map(|_| g.below(vocab) as u32).collect();
        EmbeddingCase { table, ids, d: s.d }
    }),
    case!("linear+bias", |s, g| {
        LinearCase {
            x: g.act(s.n * s.d, 1.0),
            w: g.act(s.ffn * s.d, 0.1),
            bias: Some(g.act(s.ffn, 1.0)),
            y0: None,
            n: s.n,
            d_in: s.d,
            d_out: s.ffn,
        }
    }),
    case!("linear+=", |s, g| {
        LinearCase {
            x: g.act(s.n * s.d, 1.0),
            w: g.act(s.ffn * s.d, 0.1),
            bias: None,
            y0: Some(g.act(s.n * s.ffn, 1.0)),
            n: s.n,
            d_in: s.d,
            d_out: s.ffn,
        }
    }),
    case!("linear_bwd_input", |s, g| {
        LinearBwdCase {
            dy: g.act(s.n * s.ffn, 1.0),
            w: g.act(s.ffn * s.d, 0.1),
            dx0: None,
            n: s.n,
            d_in: s.d,
            d_out: s.ffn,
        }
    }),
    case!("linear_bwd_input+=", |s, g| {
        LinearBwdCase {
            dy: g.act(s.n * s.ffn, 1.0),
            w: g.act(s.ffn * s.d, 0.1),
            dx0: Some(g.act(s.n * s.d, 1.0)),
            n: s.n,
            d_in: s.d,
            d_out: s.ffn,
        }
    }),
    case!("lora_fwd", |s, g| {
        let (params, slot) = lora_layout(s, g);
        LoraFwdCase {
            y0: g.act(s.n * s.ffn, 1.0),
            x: g.act(s.n * s.d, 1.0),
            params,
            slot,
            scale: 2.0,
            n: s.n,
        }
    }),
    case!("lora_bwd", |s, g| {
        let (params, slot) = lora_layout(s, g);
        let grads0 = g.f32(params.len(), 1.0);
        LoraBwdCase {
            dx0: g.act(s.n * s.d, 1.0),
            grads0,
            dy: g.act(s.n * s.ffn, 1.0),
            x: g.act(s.n * s.d, 1.0),
            u: g.f32(s.n * s.r, 1.0),
            params,
            slot,
            scale: 2.0,
            n: s.n,
        }
    }),
    case!("resid_norm", |s, g| {
        NormFwdCase {
            a: g.act(s.n * s.d, 1.0),
            bsum: None,
            q: None,
            w: g.act(s.d, 1.0),
            n: s.n,
            d: s.d,
        }
    }),
    case!("resid_ablate_norm", |s, g| {
        NormFwdCase {
            a: g.act(s.n * s.d, 1.0),
            bsum: Some(g.act(s.n * s.d, 1.0)),
            q: Some((g.directions(s.k, s.d), s.k)),
            w: g.act(s.d, 1.0),
            n: s.n,
            d: s.d,
        }
    }),
    case!("resid_norm_bwd", |s, g| {
        NormBwdCase {
            dresid: g.act(s.n * s.d, 1.0),
            dnormed: g.act(s.n * s.d, 1.0),
            resid: g.act(s.n * s.d, 1.0),
            rstd: g.f32(s.n, 0.1).into_iter().map(|x| 1.0 + x.abs()).collect(),
            q: None,
            w: g.act(s.d, 1.0),
            n: s.n,
            d: s.d,
        }
    }),
    case!("resid_ablate_norm_bwd", |s, g| {
        NormBwdCase {
            dresid: g.act(s.n * s.d, 1.0),
            dnormed: g.act(s.n * s.d, 1.0),
            resid: g.act(s.n * s.d, 1.0),
            rstd: g.f32(s.n, 0.1).into_iter().map(|x| 1.0 + x.abs()).collect(),
            q: Some((g.directions(s.k, s.d), s.k)),
            w: g.act(s.d, 1.0),
            n: s.n,
            d: s.d,
        }
    }),
    case!("rope", |s, g| {
        // Packed sequences: positions restart at each sequence.
        let pos = positions(&packed_lens(s));
        RopeCase {
            x: g.act(pos.len() * s.n_heads * s.head_dim, 1.0),
            table: rope_table(s.seq * s.batch, s.head_dim),
            pos,
            n_heads: s.n_heads,
            head_dim: s.head_dim,
            inverse: false,
        }
    }),
    case!("rope_inverse", |s, g| {
        // Generation-like positions: every row its own, not in order.
        let n = s.batch * s.seq;
        let pos = (0..n).map(|_| g.below(n + 5) as i32).collect();
        RopeCase {
            x: g.act(n * s.n_heads * s.head_dim, 1.0),
            table: rope_table(n + 5, s.head_dim),
            pos,
            n_heads: s.n_heads,
            head_dim: s.head_dim,
            inverse: true,
        }
    }),
    case!("attention_fwd", |s, g| {
        attn_fwd_case(g, vec![s.seq; s.batch], attn_shape(s, None))
    }),
    case!("attention_fwd_packed_window", |s, g| {
        // Unequal packed sequences, a window shorter than the longest.
        let sh = attn_shape(s, Some(s.seq.div_ceil(3)));
        attn_fwd_case(g, packed_lens(s), sh)
    }),
    case!("attention_fwd_softcap", |s, g| {
        attn_fwd_case(g, packed_lens(s), capped_shape(s, None))
    }),
    case!("attention_bwd", |s, g| {
        attn_bwd_case(g, vec![s.seq; s.batch], attn_shape(s, None))
    }),
    case!("attention_bwd_packed_softcap", |s, g| {
        // Packed, soft-capped, windowed: every new term of the backward at once.
        let sh = capped_shape(s, Some(s.seq.div_ceil(2)));
        attn_bwd_case(g, packed_lens(s), sh)
    }),
    // Cached attention. With 132 SMs (H200) the decoding steps of the first case's largest
    // shape and of the last two cases split their keys (merge kernel); "long" also splits its
    // multi-row prefill chunks; odd head dims take the scalar (non-16-byte) load path.
    case!("attention_cached", |s, g| {
        // The shape's GQA and head dim, a one-call prefill, no window.
        let heads = attn_shape(s, None);
        cached_case(g, s.batch + 1, &[s.seq], 3, heads)
    }),
    case!("attention_cached_softcap", |s, g| {
        // Gemma-2-like scores (scale, soft cap), a window.
        let heads = capped_shape(s, Some(s.seq / 2 + 1));
        cached_case(g, s.batch + 1, &[s.seq], 3, heads)
    }),
    case!("attention_cached_window", |s, g| {
        // MHA (8 rows per CTA), a head dim that is no multiple of 4 or 8, a sliding window.
        let h = s.n_heads;
        let window = Some(s.seq / 3 + 1);
        let heads = AttnShape::plain(h, h, s.head_dim / 2 + 2, window);
        cached_case(g, s.batch + 1, &[s.seq], 3, heads)
    }),
    case!("attention_cached_long", |s, g| {
        // A few hundred keys, the prefill in two calls (the second with past > 0), a window
        // shorter than the sequence, head dims up to 256 (smaller key tiles).
        let prompt = 256 + s.seq;
        let hd = (4 * s.head_dim).min(256);
        let chunks = [prompt / 2 + 1, prompt - prompt / 2 - 1];
        let heads = AttnShape::plain(4, 2, hd, Some(3 * prompt / 4));
        cached_case(g, 2, &chunks, 3, heads)
    }),
    case!("attention_cached_wide_group", |s, g| {
        // One kv head shared by more than 8 query heads: split over two CTAs.
        let prompt = 70 + s.seq;
        let heads = AttnShape::plain(s.n_heads + 7, 1, s.head_dim, None);
        cached_case(g, s.batch, &[prompt], 2, heads)
    }),
    case!("swiglu", |s, g| {
        GluCase {
            gate: g.act(s.n * s.ffn, 2.0),
            up: g.act(s.n * s.ffn, 1.0),
            gelu: false,
        }
    }),
    case!("swiglu_bwd", |s, g| {
        GluBwdCase {
            dout: g.act(s.n * s.ffn, 1.0),
            gate: g.act(s.n * s.ffn, 2.0),
            up: g.act(s.n * s.ffn, 1.0),
            gelu: false,
        }
    }),
    case!("geglu", |s, g| {
        GluCase {
            gate: g.act(s.n * s.ffn, 2.0),
            up: g.act(s.n * s.ffn, 1.0),
            gelu: true,
        }
    }),
    case!("geglu_bwd", |s, g| {
        GluBwdCase {
            dout: g.act(s.n * s.ffn, 1.0),
            gate: g.act(s.n * s.ffn, 2.0),
            up: g.act(s.n * s.ffn, 1.0),
            gelu: true,
        }
    }),
    case!("softcap+scale", |s, g| {
        SoftcapCase {
            x: g.act(s.n * s.vocab, 4.0),
            dy: g.act(s.n * s.vocab, 1.0),
            cap: 1.5,
        }
    }),
    case!("cross_entropy", |s, g| {
        let logits = g.act(s.n * s.vocab, 3.0);
        let targets = (0..s.n)
            .map(|i| {
                if i % 5 == 2 {
                    -1
                } else {
                    g.below(s.vocab) as i32
                }
            })
            .collect();
        CeCase {
            logits,
            targets,
            vocab: s.vocab,
            grad: None,
        }
    }),
    case!("cross_entropy+grad", |s, g| {
        let logits = g.act(s.n * s.vocab, 3.0);
        let targets = (0..s.n)
            .map(|i| {
                if i % 5 == 2 {
                    -1
                } else {
                    g.below(s.vocab) as i32
                }
            })
            .collect();
        CeCase {
            logits,
            targets,
            vocab: s.vocab,
            grad: Some(0.25),
        }
    }),
    // Full fine-tuning's gradients: W [ffn, d] of a projection, a bias of ffn, a norm gain of
    // d, an embedding table whose ids repeat (about three rows each, the table's last row
    // included); each slice at an odd offset of a buffer with prior contents.
    case!("grad_linear_weight", |s, g| {
        let off = 3;
        LinearWeightCase {
            dw0: g.f32(off + s.ffn * s.d + 2, 1.0),
            off,
            dy: g.act(s.n * s.ffn, 1.0),
            x: g.act(s.n * s.d, 1.0),
            n: s.n,
            d_in: s.d,
            d_out: s.ffn,
        }
    }),
    case!("grad_bias", |s, g| {
        let off = 5;
        BiasGradCase {
            db0: g.f32(off + s.ffn + 2, 1.0),
            off,
            dy: g.act(s.n * s.ffn, 1.0),
            n: s.n,
            d: s.ffn,
        }
    }),
    case!("grad_norm_gain", |s, g| {
        let off = 7;
        NormGainGradCase {
            dw0: g.f32(off + s.d + 2, 1.0),
            off,
            dnormed: g.act(s.n * s.d, 1.0),
            x: g.act(s.n * s.d, 1.0),
            rstd: g.f32(s.n, 0.1).into_iter().map(|x| 1.0 + x.abs()).collect(),
            n: s.n,
            d: s.d,
        }
    }),
    case!("grad_embedding", |s, g| {
        let off = 2;
        let vocab = s.vocab;
        let ids = (0..s.n)
            .map(|i| match i {
                0 => vocab - 1,
                _ => g.below(s.n.div_ceil(3)).min(vocab - 1),
            } as u32)
            .collect();
        EmbeddingGradCase {
            dt0: g.f32(off + vocab * s.d + 2, 1.0),
            off,
            dx: g.act(s.n * s.d, 1.0),
            ids,
            d: s.d,
        }
    }),
    case!("params_to_act", |s, g| {
        // Gemma's `1 + w` from master weights at an odd offset.
        let (off, len) = (7, s.n * s.d + 1);
        ParamsToActCase {
            src: g.f32(off + len + 2, 0.1),
            off,
            len,
            add: 1.0,
        }
    }),
    case!("sum_squares", |s, g| {
        SumSqCase {
            g: g.f32(s.n * s.d + 3, 1.0),
        }
    }),
    case!("adamw", |s, g| {
        let len = s.n * s.d + 1;
        AdamCase {
            p: g.f32(len, 1.0),
            g: g.f32(len, 1.0),
            m: g.f32(len, 0.1),
            v: g.f32(len, 0.1).into_iter().map(|x| x * x).collect(),
            hp: AdamStep {
                lr: 1e-3,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: 0.01,
                step: 3,
                grad_scale: 0.5,
            },
        }
    }),
];

/// Print a results table; returns whether every case passed.
pub fn print_table(label: &str, results: &[CaseResult]) -> bool {
    println!(
        "{:<6} {:<24} {:<34} {:>11} {:>8} {:>6}  result",
        "type", "op", "shape", "rel.err", "tol", "det."
    );
    let mut ok = true;
    for r in results {
        let pass = r.pass();
        ok &= pass;
        println!(
            "{:<6} {:<24} {:<34} {:>11.3e} {:>8.0e} {:>6}  {}",
            label,
            r.op,
            r.shape,
            r.rel_err,
            r.tol,
            if r.deterministic { "yes" } else { "NO" },
            match (&r.error, pass) {
                (Some(e), _) => format!("ERROR {e}"),
                (None, true) => "pass".to_string(),
                (None, false) => "FAIL".to_string(),
            }
        );
    }
    ok
}
