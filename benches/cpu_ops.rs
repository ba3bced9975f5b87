//! Criterion benchmarks of the CPU backend's hot ops at SmolLM2-135M training shapes
//! (batch 4 x 256 tokens, d 576, ffn 1536, 9/3 heads of 64, vocab 49152, LoRA r 32).
//!
//! Besides criterion's timings, each bench prints the achieved rate against the counted work:
//! GFLOP/s for products (2·m·n·k per GEMM, causal pairs only for attention), GB/s for
//! bandwidth-bound ops (bytes each op must read and write once). With
//! `CAFT_CPU_PEAK_GFLOPS` set (cores x FMA units x lanes x 2 x GHz) the GEMM figures are also
//! shown as a fraction of that ceiling. `RAYON_NUM_THREADS` sets the thread count.

use caft_fast::backend::cpu::CpuBackend;
use caft_fast::backend::{AdamStep, AttnShape, Backend, LoraSlot};
use caft_fast::util::rng::Rng;
use criterion::{criterion_group, criterion_main, Criterion};
use std::hint::black_box;
use std::time::{Duration, Instant};

const N: usize = 4 * 256;
const D: usize = 576;
const FFN: usize = 1536;
const VOCAB: usize = 49152;
const R: usize = 32;

/// Median seconds of a few runs after one warm-up run.
fn median_secs(mut f: impl FnMut()) -> f64 {
    f();
    let mut t: Vec<f64> = (0..5)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64()
        })
        .collect();
    t.sort_by(|a, b| a.total_cmp(b));
    t[2]
}

fn print_flops(name: &str, flops: f64, secs: f64) {
    let g = flops / secs / 1e9;
    let peak = std::env::var("CAFT_CPU_PEAK_GFLOPS")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .map(|p| format!(" ({:.0}% of {p} GFLOP/s peak)", 100.0 * g / p))
        .unwrap_or_default();
    println!("{name}: {:.3} ms, {g:.1} GFLOP/s{peak}", secs * 1e3);
}

fn print_bytes(name: &str, bytes: f64, secs: f64) {
    println!(
        "{name}: {:.3} ms, {:.1} GB/s",
        secs * 1e3,
        bytes / secs / 1e9
    );
}

fn randn(rng: &mut Rng, n: usize, s: f32) -> Vec<f32> {
    rng.normal_vec(n).iter().map(|x| x * s).collect()
}

fn linear(c: &mut Criterion) {
    let be = CpuBackend::new();
    let mut rng = Rng::new(1);
    let x = randn(&mut rng, N * D, 1.0);
    let w = randn(&mut rng, FFN * D, 0.05);
    let dy = randn(&mut rng, N * FFN, 1.0);
    let mut y = vec![0.0f32; N * FFN];
    let mut dx = vec![0.0f32; N * D];
    let flops = 2.0 * (N * D * FFN) as f64;

    let mut run = || be.linear(&mut y, &x, &w, None, N, D, FFN, false).unwrap();
    print_flops("linear 1024x576->1536", flops, median_secs(&mut run));
    c.bench_function("linear 1024x576->1536", |b| b.iter(&mut run));

    let mut run = || {
        be.linear_bwd_input(&mut dx, &dy, &w, N, D, FFN, false)
            .unwrap()
    };
    print_flops(
        "linear_bwd_input 1024x1536->576",
        flops,
        median_secs(&mut run),
    );
    c.bench_function("linear_bwd_input 1024x1536->576", |b| b.iter(&mut run));
}

fn lora(c: &mut Criterion) {
    let be = CpuBackend::new();
    let mut rng = Rng::new(2);
    let slot = LoraSlot {
        a_off: 0,
        b_off: R * D,
        r: R,
        d_in: D,
        d_out: FFN,
    };
    let params = randn(&mut rng, R * D + FFN * R, 0.05);
    let mut grads = vec![0.0f32; params.len()];
    let x = randn(&mut rng, N * D, 1.0);
    let dy = randn(&mut rng, N * FFN, 1.0);
    let mut y = vec![0.0f32; N * FFN];
    let mut u = vec![0.0f32; N * R];
    let mut dx = vec![0.0f32; N * D];
    // Forward: x Aᵀ and u Bᵀ; backward: dB, du, dA, dx — each 2·n·r·d.
    let fwd_flops = 2.0 * (N * R * (D + FFN)) as f64;
    let mut run = || {
        be.lora_fwd(&mut y, &mut u, &x, &params, &slot, 2.0, N)
            .unwrap()
    };
    print_flops("lora_fwd r32 576->1536", fwd_flops, median_secs(&mut run));
    c.bench_function("lora_fwd r32 576->1536", |b| b.iter(&mut run));
    let mut run = || {
        be.lora_bwd(&mut dx, &mut grads, &dy, &x, &u, &params, &slot, 2.0, N)
            .unwrap()
    };
    print_flops(
        "lora_bwd r32 576->1536",
        2.0 * fwd_flops,
        median_secs(&mut run),
    );
    c.bench_function("lora_bwd r32 576->1536", |b| b.iter(&mut run));
}

fn attention(c: &mut Criterion) {
    let be = CpuBackend::new();
    let mut rng = Rng::new(3);
    let (batch, seq) = (4, 256);
    let sh = AttnShape::plain(9, 3, 64, None);
    let seqs = be.seqs(&[seq; 4]).unwrap();
    let q = randn(&mut rng, N * sh.q_width(), 1.0);
    let k = randn(&mut rng, N * sh.kv_width(), 1.0);
    let v = randn(&mut rng, N * sh.kv_width(), 1.0);
    let dout = randn(&mut rng, N * sh.q_width(), 1.0);
    let mut out = vec![0.0f32; q.len()];
    let mut lse = vec![0.0f32; 4 * 9 * 256];
    let (mut dq, mut dk, mut dv) = (
        vec![0.0f32; q.len()],
        vec![0.0f32; k.len()],
        vec![0.0f32; v.len()],
    );
    // Useful work: T(T+1)/2 visible (query, key) pairs per (sequence, head), 2·hd FLOPs per
    // pair per product; 2 products forward, 5 backward (S again, dV, dP, dQ, dK).
    let pairs = (batch * sh.n_heads * seq * (seq + 1) / 2) as f64;
    let per_product = pairs * 2.0 * sh.head_dim as f64;
    let mut run = || {
        be.attention_fwd(&mut out, &mut lse, &q, &k, &v, &seqs, &sh)
            .unwrap()
    };
    print_flops(
        "attention_fwd 4x256 9/3x64",
        2.0 * per_product,
        median_secs(&mut run),
    );
    c.bench_function("attention_fwd 4x256 9/3x64", |b| b.iter(&mut run));
    be.attention_fwd(&mut out, &mut lse, &q, &k, &v, &seqs, &sh)
        .unwrap();
    let mut run = || {
        be.attention_bwd(
            &mut dq, &mut dk, &mut dv, &dout, &out, &lse, &q, &k, &v, &seqs, &sh,
        )
        .unwrap()
    };
    print_flops(
        "attention_bwd 4x256 9/3x64",
        5.0 * per_product,
        median_secs(&mut run),
    );
    c.bench_function("attention_bwd 4x256 9/3x64", |b| b.iter(&mut run));
}

fn residual_ablate_norm(c: &mut Criterion) {
    let be = CpuBackend::new();
    let mut rng = Rng::new(4);
    let a = randn(&mut rng, N * D, 1.0);
    let b = randn(&mut rng, N * D, 1.0);
    let w = randn(&mut rng, D, 1.0);
    // Orthonormal-ish directions are not needed for timing; random rows do the same work.
    let k = 8;
    let q = randn(&mut rng, k * D, 0.04);
    let (mut resid, mut normed, mut rstd) =
        (vec![0.0f32; N * D], vec![0.0f32; N * D], vec![0.0f32; N]);
    let mut dresid = randn(&mut rng, N * D, 1.0);
    let dnormed = randn(&mut rng, N * D, 1.0);
    // Forward reads a, b and writes resid, normed; backward reads dresid, dnormed, resid and
    // writes dresid (4 bytes each).
    let fwd_bytes = (4 * N * D * 4) as f64;
    let bwd_bytes = (4 * N * D * 4) as f64;
    for (label, dirs) in [("k=0", None), ("k=8", Some((&q, k)))] {
        let name = format!("residual_ablate_norm 1024x576 {label}");
        let mut run = || {
            be.residual_ablate_norm(
                &mut resid,
                &mut normed,
                &mut rstd,
                &a,
                Some(&b),
                dirs,
                &w,
                N,
                D,
                1e-5,
            )
            .unwrap()
        };
        print_bytes(&name, fwd_bytes, median_secs(&mut run));
        c.bench_function(&name, |bch| bch.iter(&mut run));
        let name = format!("residual_ablate_norm_bwd 1024x576 {label}");
        let mut run = || {
            be.residual_ablate_norm_bwd(&mut dresid, &dnormed, &resid, &rstd, dirs, &w, N, D)
                .unwrap()
        };
        print_bytes(&name, bwd_bytes, median_secs(&mut run));
        c.bench_function(&name, |bch| bch.iter(&mut run));
    }
}

fn elementwise(c: &mut Criterion) {
    let be = CpuBackend::new();
    let mut rng = Rng::new(5);
    let g = randn(&mut rng, N * FFN, 2.0);
    let u = randn(&mut rng, N * FFN, 1.0);
    let d = randn(&mut rng, N * FFN, 1.0);
    let (mut out, mut dg, mut du) = (
        vec![0.0f32; N * FFN],
        vec![0.0f32; N * FFN],
        vec![0.0f32; N * FFN],
    );
    let mut run = || be.swiglu(&mut out, &g, &u).unwrap();
    print_bytes(
        "swiglu 1024x1536",
        (3 * N * FFN * 4) as f64,
        median_secs(&mut run),
    );
    c.bench_function("swiglu 1024x1536", |b| b.iter(&mut run));
    let mut run = || be.swiglu_bwd(&mut dg, &mut du, &d, &g, &u).unwrap();
    print_bytes(
        "swiglu_bwd 1024x1536",
        (5 * N * FFN * 4) as f64,
        median_secs(&mut run),
    );
    c.bench_function("swiglu_bwd 1024x1536", |b| b.iter(&mut run));

    let table: Vec<f32> = (0..256 * 32)
        .flat_map(|i| [(i as f32).cos(), (i as f32).sin()])
        .collect();
    let mut x = randn(&mut rng, N * 9 * 64, 1.0);
    let pos: Vec<i32> = (0..4 * 256).map(|r| r % 256).collect();
    let mut run = || {
        be.rope(&mut x, &table, &pos, 4 * 256, 9, 64, false)
            .unwrap()
    };
    print_bytes(
        "rope 1024x9x64",
        (2 * N * 9 * 64 * 4) as f64,
        median_secs(&mut run),
    );
    c.bench_function("rope 1024x9x64", |b| b.iter(&mut run));
}

fn cross_entropy(c: &mut Criterion) {
    let be = CpuBackend::new();
    let mut rng = Rng::new(6);
    // Uniform logits: 50M Box–Muller normals would dominate the bench's start-up.
    let logits: Vec<f32> = (0..N * VOCAB)
        .map(|_| rng.uniform(-6.0, 6.0) as f32)
        .collect();
    let targets: Vec<i32> = (0..N).map(|_| rng.below(VOCAB) as i32).collect();
    let mut work = logits.clone();
    let mut acc = vec![0.0f32];
    // Read the logits once and write the gradient once.
    let bytes = (2 * N * VOCAB * 4) as f64;
    let mut run = || {
        work.copy_from_slice(&logits);
        be.cross_entropy(&mut work, &mut acc, &targets, VOCAB, Some(1.0 / N as f32))
            .unwrap()
    };
    let secs = median_secs(&mut run);
    let mut scratch = logits.clone();
    let copy = median_secs(|| scratch.copy_from_slice(black_box(&logits)));
    let secs = secs - copy;
    print_bytes(
        "cross_entropy 1024x49152 (+grad, copy excluded)",
        bytes,
        secs,
    );
    c.bench_function("cross_entropy 1024x49152 (+grad, incl. refill copy)", |b| {
        b.iter(&mut run)
    });
}

fn adamw(c: &mut Criterion) {
    let be = CpuBackend::new();
    let mut rng = Rng::new(7);
    // SmolLM2-135M, r 32 on q,k,v,o,gate,up,down: 325,632 LoRA parameters per layer x 30.
    let n = 30 * 325_632;
    let mut p = randn(&mut rng, n, 0.02);
    let g = randn(&mut rng, n, 1e-3);
    let (mut m, mut v) = (vec![0.0f32; n], vec![0.0f32; n]);
    let hp = AdamStep {
        lr: 1e-5,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.01,
        step: 1,
        grad_scale: 1.0,
    };
    let mut run = || be.adamw(&mut p, &g, &mut m, &mut v, &hp).unwrap();
    // Reads p, g, m, v; writes p, m, v.
    print_bytes(
        "adamw 9.77M params",
        (7 * n * 4) as f64,
        median_secs(&mut run),
    );
    c.bench_function("adamw 9.77M params", |b| b.iter(&mut run));
    let mut run = || {
        black_box(be.sum_squares(&g).unwrap());
    };
    print_bytes("sum_squares 9.77M", (n * 4) as f64, median_secs(&mut run));
    c.bench_function("sum_squares 9.77M", |b| b.iter(&mut run));
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1))
}

criterion_group! {
    name = benches;
    config = config();
    targets = linear, lora, attention, residual_ablate_norm, elementwise, cross_entropy, adamw
}
criterion_main!(benches);
