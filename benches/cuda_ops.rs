//! Criterion benchmarks of every CUDA op (bf16 storage) at training shapes: 8 × 1024 tokens,
//! d 2048, ffn 8192, 16/8 heads of 128, vocab 32768, LoRA r 32, 8 ablated directions; and
//! generation attention against a key/value cache (decoding 64 sequences with 4096 cached rows
//! and one with 8192, counted as the cache bytes read; a prefill of the same 8 × 1024 tokens).
//!
//! Each bench also prints the achieved rate against the counted work: GB/s for memory-bound
//! kernels (the bytes each op must read and write once) as a fraction of the measured
//! device-to-device copy bandwidth (the practical HBM ceiling, measured first), and TFLOP/s for
//! GEMMs and attention (2·m·n·k per product; causal pairs only for attention). Without a
//! usable GPU it prints a notice and exits 0.

use caft_fast::backend::cuda::{probe, CudaBackend, Runtime};
use caft_fast::backend::{AdamStep, AttnShape, Backend, CacheShape, LoraSlot};
use caft_fast::util::rng::Rng;
use criterion::Criterion;
use half::bf16;
use std::sync::Arc;
use std::time::{Duration, Instant};

const N: usize = 8 * 1024;
const D: usize = 2048;
const FFN: usize = 8192;
const VOCAB: usize = 32768;
const R: usize = 32;
const K: usize = 8;
const HEADS: usize = 16;
const KV_HEADS: usize = 8;
const HD: usize = 128;
const SEQ: usize = 1024;
/// LoRA parameters of a ~1.5B model at r 32 on seven projections and 28 layers.
const LORA_PARAMS: usize = 37_000_000;

type B = CudaBackend<bf16>;
type Act = <B as Backend>::Act;
type F32 = <B as Backend>::F32;

/// Seconds per call: a warm-up call, then as many calls as fit in ~0.2 s, synchronised.
fn secs_per_call(b: &B, f: &mut dyn FnMut()) -> f64 {
    f();
    b.synchronize().expect("sync");
    let mut iters = 1usize;
    loop {
        let t = Instant::now();
        for _ in 0..iters {
            f();
        }
        b.synchronize().expect("sync");
        let s = t.elapsed().as_secs_f64();
        if s > 0.2 || iters >= 1 << 16 {
            return s / iters as f64;
        }
        iters *= 4;
    }
}

struct Report {
    copy_gbs: f64,
}

impl Report {
    fn bytes(&self, name: &str, bytes: f64, secs: f64) {
        let gbs = bytes / secs / 1e9;
        println!(
            "  {name:<34} {:>9.1} us  {gbs:>8.1} GB/s  {:>5.1} % of copy bandwidth",
            secs * 1e6,
            100.0 * gbs / self.copy_gbs
        );
    }
    fn flops(&self, name: &str, flops: f64, secs: f64) {
        println!(
            "  {name:<34} {:>9.1} us  {:>8.1} TFLOP/s",
            secs * 1e6,
            flops / secs / 1e12
        );
    }
}

fn act(b: &B, rng: &mut Rng, len: usize, scale: f32) -> Act {
    let v: Vec<f32> = rng.normal_vec(len).into_iter().map(|x| x * scale).collect();
    b.upload_act(&v).expect("upload")
}

fn f32buf(b: &B, rng: &mut Rng, len: usize, scale: f32) -> F32 {
    let v: Vec<f32> = rng.normal_vec(len).into_iter().map(|x| x * scale).collect();
    b.upload_f32(&v).expect("upload")
}

/// Bench `f` with criterion under `name` and print its rate with `report`.
fn bench(c: &mut Criterion, b: &B, name: &str, mut f: impl FnMut(), report: impl FnOnce(f64)) {
    let secs = secs_per_call(b, &mut f);
    report(secs);
    c.bench_function(name, |bn| {
        bn.iter_custom(|iters| {
            let t = Instant::now();
            for _ in 0..iters {
                f();
            }
            b.synchronize().expect("sync");
            t.elapsed()
        })
    });
}

fn run(c: &mut Criterion, b: &B) {
    let mut rng = Rng::new(0);
    let e = 2.0; // bytes per bf16 element

    // Ceiling: a large device-to-device copy (read + write).
    let len = 256 << 20;
    let src: Act = b.alloc_act(len / 2).expect("alloc");
    let mut dst: Act = b.alloc_act(len / 2).expect("alloc");
    let secs = secs_per_call(b, &mut || {
        b.copy_act(&mut dst, 0, &src, 0, len / 2).expect("copy")
    });
    let rep = Report {
        copy_gbs: 2.0 * len as f64 / secs / 1e9,
    };
    println!(
        "device-to-device copy: {:.1} GB/s (the ceiling below)",
        rep.copy_gbs
    );
    drop((src, dst));

    // Embedding gather.
    let table = act(b, &mut rng, VOCAB * D, 1.0);
    let ids: Vec<u32> = (0..N).map(|_| rng.below(VOCAB) as u32).collect();
    let mut x = b.alloc_act(N * D).expect("alloc");
    bench(
        c,
        b,
        "embedding",
        || b.embedding(&mut x, &table, &ids, D).expect("op"),
        |s| rep.bytes("embedding", 2.0 * (N * D) as f64 * e, s),
    );
    drop(table);

    // The fused residual + ablation + rmsnorm, without and with directions.
    let a = act(b, &mut rng, N * D, 1.0);
    let h = act(b, &mut rng, N * D, 1.0);
    let w = act(b, &mut rng, D, 1.0);
    let q: F32 = {
        // Orthonormality does not matter for speed; any Q of the right shape will do.
        f32buf(b, &mut rng, K * D, (1.0 / D as f32).sqrt())
    };
    let mut resid = b.alloc_act(N * D).expect("alloc");
    let mut normed = b.alloc_act(N * D).expect("alloc");
    let mut rstd = b.alloc_f32(N).expect("alloc");
    let fused_bytes = 4.0 * (N * D) as f64 * e + 4.0 * N as f64;
    for (name, dirs) in [
        ("resid_norm_fwd", None),
        ("resid_ablate_norm_fwd_k8", Some((&q, K))),
    ] {
        bench(
            c,
            b,
            name,
            || {
                b.residual_ablate_norm(
                    &mut resid,
                    &mut normed,
                    &mut rstd,
                    &a,
                    Some(&h),
                    dirs,
                    &w,
                    N,
                    D,
                    1e-5,
                )
                .expect("op")
            },
            |s| rep.bytes(name, fused_bytes, s),
        );
    }
    let mut dres = act(b, &mut rng, N * D, 1.0);
    for (name, dirs) in [
        ("resid_norm_bwd", None),
        ("resid_ablate_norm_bwd_k8", Some((&q, K))),
    ] {
        bench(
            c,
            b,
            name,
            || {
                b.residual_ablate_norm_bwd(&mut dres, &normed, &resid, &rstd, dirs, &w, N, D)
                    .expect("op")
            },
            |s| rep.bytes(name, 4.0 * (N * D) as f64 * e + 4.0 * N as f64, s),
        );
    }
    drop((a, h, resid, normed, dres));

    // Rope on q.
    let mut qa = act(b, &mut rng, N * HEADS * HD, 1.0);
    let table: Vec<f32> = (0..SEQ * HD)
        .map(|i| ((i % 7) as f32 * 0.1).cos())
        .collect();
    let table = b.upload_f32(&table).expect("upload");
    // N / SEQ sequences of SEQ rows, packed.
    let seqs = b.seqs(&[SEQ; N / SEQ]).expect("seqs");
    bench(
        c,
        b,
        "rope",
        || {
            b.rope(&mut qa, &table, &seqs.pos_dev, N, HEADS, HD, false)
                .expect("op")
        },
        |s| rep.bytes("rope", 2.0 * (N * HEADS * HD) as f64 * e, s),
    );

    // Attention (flash-style, causal).
    let shape = AttnShape::plain(HEADS, KV_HEADS, HD, None);
    let kk = act(b, &mut rng, N * KV_HEADS * HD, 1.0);
    let vv = act(b, &mut rng, N * KV_HEADS * HD, 1.0);
    let mut out = b.alloc_act(N * HEADS * HD).expect("alloc");
    let mut lse = b.alloc_f32(N * HEADS).expect("alloc");
    let causal_pairs = (seqs.n_seqs() * HEADS) as f64 * (SEQ * (SEQ + 1) / 2) as f64;
    bench(
        c,
        b,
        "attention_fwd",
        || {
            b.attention_fwd(&mut out, &mut lse, &qa, &kk, &vv, &seqs, &shape)
                .expect("op")
        },
        |s| rep.flops("attention_fwd", 4.0 * causal_pairs * HD as f64, s),
    );
    let dout = act(b, &mut rng, N * HEADS * HD, 1.0);
    let mut dq = b.alloc_act(N * HEADS * HD).expect("alloc");
    let mut dk = b.alloc_act(N * KV_HEADS * HD).expect("alloc");
    let mut dv = b.alloc_act(N * KV_HEADS * HD).expect("alloc");
    bench(
        c,
        b,
        "attention_bwd",
        || {
            b.attention_bwd(
                &mut dq, &mut dk, &mut dv, &dout, &out, &lse, &qa, &kk, &vv, &seqs, &shape,
            )
            .expect("op")
        },
        |s| rep.flops("attention_bwd", 10.0 * causal_pairs * HD as f64, s),
    );
    drop((qa, kk, vv, out, lse, dout, dq, dk, dv, seqs));

    // Generation: one decoding step against a key/value cache (memory-bound: every cached K/V
    // row of a sequence is read once per kv head), and a prefill of the same 8 x 1024 tokens
    // as above through the cached path (FMA kernel; compare with attention_fwd's TFLOP/s).
    for (batch, cache) in [(64, 4096), (1, 8192)] {
        let shape = CacheShape {
            batch,
            new: 1,
            past: cache - 1,
            cap: cache,
            heads: AttnShape::plain(HEADS, KV_HEADS, HD, None),
        };
        let mut kc = act(b, &mut rng, batch * cache * KV_HEADS * HD, 1.0);
        let mut vc = act(b, &mut rng, batch * cache * KV_HEADS * HD, 1.0);
        let q1 = act(b, &mut rng, batch * HEADS * HD, 1.0);
        let k1 = act(b, &mut rng, batch * KV_HEADS * HD, 1.0);
        let v1 = act(b, &mut rng, batch * KV_HEADS * HD, 1.0);
        let mut o1 = b.alloc_act(batch * HEADS * HD).expect("alloc");
        let start = vec![0u32; batch];
        let name = format!("attention_decode_b{batch}_kv{cache}");
        let cache_bytes = 2.0 * (batch * cache * KV_HEADS * HD) as f64 * e;
        bench(
            c,
            b,
            &name,
            || {
                b.attention_cached(&mut o1, &q1, &k1, &v1, &mut kc, &mut vc, &start, &shape)
                    .expect("op")
            },
            |s| rep.bytes(&name, cache_bytes, s),
        );
    }
    {
        let shape = CacheShape {
            batch: N / SEQ,
            new: SEQ,
            past: 0,
            cap: SEQ,
            heads: AttnShape::plain(HEADS, KV_HEADS, HD, None),
        };
        let qa = act(b, &mut rng, N * HEADS * HD, 1.0);
        let kk = act(b, &mut rng, N * KV_HEADS * HD, 1.0);
        let vv = act(b, &mut rng, N * KV_HEADS * HD, 1.0);
        let mut kc = b.alloc_act(N * KV_HEADS * HD).expect("alloc");
        let mut vc = b.alloc_act(N * KV_HEADS * HD).expect("alloc");
        let mut out = b.alloc_act(N * HEADS * HD).expect("alloc");
        let start = vec![0u32; shape.batch];
        let causal_pairs = (shape.batch * HEADS) as f64 * (SEQ * (SEQ + 1) / 2) as f64;
        bench(
            c,
            b,
            "attention_cached_prefill",
            || {
                b.attention_cached(&mut out, &qa, &kk, &vv, &mut kc, &mut vc, &start, &shape)
                    .expect("op")
            },
            |s| {
                rep.flops(
                    "attention_cached_prefill",
                    4.0 * causal_pairs * HD as f64,
                    s,
                )
            },
        );
    }

    // SwiGLU.
    let gate = act(b, &mut rng, N * FFN, 1.0);
    let up = act(b, &mut rng, N * FFN, 1.0);
    let mut o = b.alloc_act(N * FFN).expect("alloc");
    bench(
        c,
        b,
        "swiglu_fwd",
        || b.swiglu(&mut o, &gate, &up).expect("op"),
        |s| rep.bytes("swiglu_fwd", 3.0 * (N * FFN) as f64 * e, s),
    );
    let mut dg = b.alloc_act(N * FFN).expect("alloc");
    let mut du = b.alloc_act(N * FFN).expect("alloc");
    bench(
        c,
        b,
        "swiglu_bwd",
        || b.swiglu_bwd(&mut dg, &mut du, &o, &gate, &up).expect("op"),
        |s| rep.bytes("swiglu_bwd", 5.0 * (N * FFN) as f64 * e, s),
    );
    drop((gate, up, dg, du));

    // GEMMs: a frozen projection D -> FFN, its input gradient, and LoRA on it.
    let xin = act(b, &mut rng, N * D, 1.0);
    let wt = act(b, &mut rng, FFN * D, 0.02);
    bench(
        c,
        b,
        "linear_fwd",
        || {
            b.linear(&mut o, &xin, &wt, None, N, D, FFN, false)
                .expect("op")
        },
        |s| rep.flops("linear_fwd", 2.0 * (N * D * FFN) as f64, s),
    );
    let mut dx = b.alloc_act(N * D).expect("alloc");
    bench(
        c,
        b,
        "linear_bwd_input",
        || {
            b.linear_bwd_input(&mut dx, &o, &wt, N, D, FFN, false)
                .expect("op")
        },
        |s| rep.flops("linear_bwd_input", 2.0 * (N * D * FFN) as f64, s),
    );
    let slot = LoraSlot {
        a_off: 0,
        b_off: R * D,
        r: R,
        d_in: D,
        d_out: FFN,
    };
    let params = f32buf(b, &mut rng, R * D + FFN * R, 0.01);
    let mut grads = b.alloc_f32(R * D + FFN * R).expect("alloc");
    let mut u = b.alloc_f32(N * R).expect("alloc");
    bench(
        c,
        b,
        "lora_fwd",
        || {
            b.lora_fwd(&mut o, &mut u, &xin, &params, &slot, 2.0, N)
                .expect("op")
        },
        |s| rep.flops("lora_fwd", 2.0 * (N * R * (D + FFN)) as f64, s),
    );
    bench(
        c,
        b,
        "lora_bwd",
        || {
            b.lora_bwd(&mut dx, &mut grads, &o, &xin, &u, &params, &slot, 2.0, N)
                .expect("op")
        },
        |s| rep.flops("lora_bwd", 4.0 * (N * R * (D + FFN)) as f64, s),
    );
    drop((xin, wt, o, dx, params, grads, u));

    // Cross-entropy with the gradient written in place.
    let mut logits = act(b, &mut rng, N * VOCAB, 2.0);
    let targets: Vec<i32> = (0..N).map(|_| rng.below(VOCAB) as i32).collect();
    let mut acc = b.alloc_f32(1).expect("alloc");
    bench(
        c,
        b,
        "cross_entropy+grad",
        || {
            b.cross_entropy(&mut logits, &mut acc, &targets, VOCAB, Some(1.0 / N as f32))
                .expect("op")
        },
        |s| rep.bytes("cross_entropy+grad", 3.0 * (N * VOCAB) as f64 * e, s),
    );
    drop(logits);

    // Optimizer over the flat LoRA buffer.
    let mut p = f32buf(b, &mut rng, LORA_PARAMS, 0.01);
    let g = f32buf(b, &mut rng, LORA_PARAMS, 0.01);
    let mut m = b.alloc_f32(LORA_PARAMS).expect("alloc");
    let mut v = b.alloc_f32(LORA_PARAMS).expect("alloc");
    let hp = AdamStep {
        lr: 1e-5,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.01,
        step: 1,
        grad_scale: 1.0,
    };
    bench(
        c,
        b,
        "adamw",
        || b.adamw(&mut p, &g, &mut m, &mut v, &hp).expect("op"),
        |s| rep.bytes("adamw", 28.0 * LORA_PARAMS as f64, s),
    );
    bench(
        c,
        b,
        "sum_squares",
        || {
            let _ = b.sum_squares(&g).expect("op");
        },
        |s| rep.bytes("sum_squares", 4.0 * LORA_PARAMS as f64, s),
    );
}

fn main() {
    let p = probe();
    if !p.usable() {
        println!("cuda_ops: skipped, {}", p.summary());
        return;
    }
    println!("cuda_ops on {}", p.summary());
    let rt = Arc::new(Runtime::new(0).expect("opening CUDA device 0"));
    let b = B::with_runtime(rt).expect("CUDA backend");
    let mut c = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(200))
        .measurement_time(Duration::from_millis(600))
        .configure_from_args();
    run(&mut c, &b);
    c.final_summary();
}
