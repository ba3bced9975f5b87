//! One LoRA training step of SmolLM2-135M-Instruct from its GGUF: LoRA r=32 alpha=64 on all
//! seven projections, batch 4 x 256 tokens, 8 random directions ablated at layers 10 and 20,
//! AdamW — on a CUDA GPU (bf16) when one is usable, else on the CPU with 2 threads (the machine
//! kind the PyTorch baseline in docs/benchmarks.md was measured on). Reports tokens/s and the
//! achieved model FLOP/s (MFU: divide by the device's peak).
//!
//!     cargo bench --bench train_step

use caft_fast::backend::cpu::CpuBackend;
use caft_fast::backend::Backend;
use caft_fast::model::loader::load_model;
use caft_fast::model::lora::Target;
use caft_fast::model::transformer::Checkpointing;
use caft_fast::train::bench::{step_flops, StepBench, StepSpec};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use std::time::Duration;

fn run<B: Backend>(c: &mut Criterion, be: &B) {
    let path = caft_fast::util::fetch::smollm2().expect("SmolLM2 GGUF");
    let loaded = load_model(&path).expect("load SmolLM2");
    let spec = StepSpec {
        batch: 4,
        seq: 256,
        lora_r: 32,
        lora_alpha: 64.0,
        targets: Target::ALL.to_vec(),
        ablate_layers: vec![10, 20],
        ablate_k: 8,
        checkpointing: Checkpointing::None,
    };
    let mut bench = StepBench::new(be, &loaded.config, loaded.weights.as_ref(), &spec).unwrap();
    bench.step(be).unwrap(); // warm-up: allocations, kernel compilation
    let tokens = (spec.batch * spec.seq) as u64;
    let mut g = c.benchmark_group("train_step");
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(1))
        .measurement_time(Duration::from_secs(5))
        .throughput(Throughput::Elements(tokens));
    let mut total = Duration::ZERO;
    let mut iters = 0u64;
    g.bench_function(
        format!("smollm2_lora32_ablate2x8_4x256/{}", be.name()),
        |b| {
            b.iter_custom(|n| {
                let t = std::time::Instant::now();
                for _ in 0..n {
                    bench.step(be).unwrap();
                }
                let dt = t.elapsed();
                total += dt;
                iters += n;
                dt
            })
        },
    );
    g.finish();
    let per = total.as_secs_f64() / iters.max(1) as f64;
    let flops = step_flops(&loaded.config, spec.batch, spec.seq);
    println!(
        "train_step on {}: {:.3} s/step, {:.1} tokens/s, {:.3} TFLOP/s of model FLOPs, peak RSS {:.0} MiB",
        be.name(),
        per,
        tokens as f64 / per,
        flops / per / 1e12,
        caft_fast::util::peak_rss_mib().unwrap_or(f64::NAN)
    );
}

fn bench(c: &mut Criterion) {
    let _ = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build_global();
    run(c, &CpuBackend::new());
}

criterion_group!(benches, bench);
criterion_main!(benches);
