//! The device-memory plan (`train::plan`) against what the CUDA backend really allocates: real
//! `forward_backward` and AdamW steps of small random-weight models on the emulated GPU
//! (tests/cuda_emulated/gpu.rs), whose driver counts the bytes of live allocations and their
//! peak. For several shapes (Llama-like untied, Qwen2-like with biases and tied embeddings,
//! Qwen3-like with q/k norms), batch compositions (padded, packed, micro-batches of different
//! sizes, a validation forward), LoRA targets, ablation, and every checkpointing mode, the
//! measured peak must equal the plan within 2% (the errors are printed; they are 0 when the
//! plan mirrors the code exactly).
//!
//! On a real GPU (`--include-ignored`) the same cases run, but the peak is not measured there:
//! the driver has no such counter.

#[path = "cuda_emulated/gpu.rs"]
mod emulated_gpu;
#[path = "cuda_emulated/harness.rs"]
mod harness;
mod support;

use caft_fast::backend::cuda::CudaBackend;
use caft_fast::backend::Backend;
use caft_fast::model::ablation::random_directions;
use caft_fast::model::config::{Arch, ModelConfig};
use caft_fast::model::full::{Freeze, FullLayout};
use caft_fast::model::lora::{LoraConfig, LoraLayout, Target};
use caft_fast::model::random::{preset, RandomWeights};
use caft_fast::model::transformer::{Batch, Checkpointing, Model};
use caft_fast::train::optim::{optimizer_step, OptimConfig};
use caft_fast::train::plan::{plan, PlanInput, MODES};

#[test]
fn on_the_emulated_gpu() {
    emulated_gpu::rerun_ignored("on_the_emulated_gpu", &["plan_"]);
}

/// The emulated driver's memory counters: (reset the peak, returning live bytes; read it).
struct Counters {
    _lib: libloading::Library,
    reset: unsafe extern "C" fn() -> usize,
    peak: unsafe extern "C" fn() -> usize,
}

fn counters() -> Option<Counters> {
    let dir = std::env::var_os("CAFT_EMU_MODULES")?;
    let path = std::path::Path::new(&dir).join("libcuda.so");
    // SAFETY: the emulated driver library, already loaded by cudarc (the same object is
    // returned); the two symbols are `size_t f(void)` (fake_libcuda.cpp).
    unsafe {
        let lib = libloading::Library::new(&path).ok()?;
        let reset = *lib
            .get::<unsafe extern "C" fn() -> usize>(b"caft_emu_mem_reset_peak")
            .ok()?;
        let peak = *lib
            .get::<unsafe extern "C" fn() -> usize>(b"caft_emu_mem_peak")
            .ok()?;
        Some(Counters {
            _lib: lib,
            reset,
            peak,
        })
    }
}

fn shape(arch: Arch) -> ModelConfig {
    let base = preset("smollm2-135m").unwrap();
    match arch {
        Arch::Qwen2 => ModelConfig {
            arch,
            vocab_size: 256,
            hidden_size: 48,
            intermediate_size: 96,
            num_layers: 2,
            num_heads: 3,
            num_kv_heads: 1,
            head_dim: 16,
            attention_bias: true,
            tie_word_embeddings: true,
            ..base
        },
        Arch::Qwen3 => ModelConfig {
            arch,
            vocab_size: 200,
            hidden_size: 32,
            intermediate_size: 80,
            num_layers: 2,
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: 16,
            qk_norm: true,
            tie_word_embeddings: false,
            ..base
        },
        _ => ModelConfig {
            arch: Arch::Llama,
            vocab_size: 300,
            hidden_size: 64,
            intermediate_size: 160,
            num_layers: 3,
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: 16,
            tie_word_embeddings: false,
            ..base
        },
    }
}

/// A packed micro-batch of sequences `lens` with random tokens (the first token of each
/// sequence unlabelled).
fn batch(vocab: usize, lens: &[usize], seed: u64) -> Batch {
    let mut rng = caft_fast::util::rng::Rng::new(seed);
    let n: usize = lens.iter().sum();
    let ids: Vec<u32> = (0..n).map(|_| rng.below(vocab) as u32).collect();
    let mut labels: Vec<i32> = ids.iter().map(|&x| x as i32).collect();
    let mut r0 = 0;
    for &l in lens {
        labels[r0] = -100;
        r0 += l;
    }
    Batch {
        lens: lens.to_vec(),
        ids,
        labels,
    }
}

struct Case {
    arch: Arch,
    /// Full fine-tuning (every weight) instead of LoRA on `targets`.
    full: bool,
    targets: Vec<Target>,
    /// (layers, k)
    ablation: Option<(Vec<usize>, usize)>,
    /// The micro-batches of one optimizer step (sequence lengths each); two steps run.
    step: Vec<Vec<usize>>,
    /// A validation forward after the steps.
    val: Vec<usize>,
}

/// Run two optimizer steps of `case` under `mode` on a fresh backend: (measured peak, plan).
fn measure(c: &Counters, case: &Case, mode: Checkpointing) -> (u64, u64) {
    let cfg = shape(case.arch);
    let layout = LoraLayout::new(
        &cfg,
        &LoraConfig {
            r: 4,
            alpha: 8.0,
            rslora: false,
            targets: case.targets.clone(),
        },
    )
    .unwrap();
    let base = unsafe { (c.reset)() } as u64;
    {
        let be = CudaBackend::<half::bf16>::new(0).unwrap();
        let w = RandomWeights::new(cfg.clone(), 1);
        let mut model = Model::new(&be, cfg.clone(), &w).unwrap();
        model.checkpointing = mode;
        match case.full {
            true => model.set_full(&be, &w, Freeze::default()).unwrap(),
            false => model
                .set_lora(&be, layout.clone(), &layout.init_params(2))
                .unwrap(),
        }
        if let Some((layers, k)) = &case.ablation {
            let d = random_directions(3, *k, cfg.hidden_size, layers).unwrap();
            model.set_ablation(&be, &d).unwrap();
        }
        let opt = OptimConfig {
            total_steps: 2,
            ..OptimConfig::default()
        };
        for s in 0..2u64 {
            let micro: Vec<Batch> = case
                .step
                .iter()
                .enumerate()
                .map(|(i, l)| batch(cfg.vocab_size, l, 10 * s + i as u64))
                .collect();
            let n: usize = micro.iter().map(|m| m.n_targets()).sum();
            for m in &micro {
                model
                    .forward_backward(&be, m, 1.0 / n.max(1) as f32)
                    .unwrap();
            }
            optimizer_step(&be, &mut model, &opt).unwrap();
        }
        model
            .forward(&be, &batch(cfg.vocab_size, &case.val, 99), false)
            .unwrap();
        be.synchronize().unwrap();
    }
    let measured = unsafe { (c.peak)() } as u64 - base;
    let all = case.step.iter().chain([&case.val]);
    let input = PlanInput {
        full: case.full.then(|| FullLayout::new(&cfg, Freeze::default())),
        model: cfg,
        lora: layout,
        ablation: case
            .ablation
            .as_ref()
            .map_or(vec![], |(l, k)| vec![*k; l.len()]),
        rows: all.clone().map(|l| l.iter().sum::<usize>()).max().unwrap(),
        seqs: all.clone().map(|l| l.len()).max().unwrap(),
        max_len: all.flatten().copied().max().unwrap(),
        act_bytes: 2,
        reserve: 0,
        ranks: 1,
    };
    (measured, plan(&input, mode).allocated)
}

#[test]
#[ignore = "needs the emulated GPU (its memory counters)"]
fn plan_equals_the_measured_peak() {
    let Some(c) = counters() else {
        eprintln!("no memory counters: not on the emulated GPU; nothing to compare");
        return;
    };
    let cases = [
        // Llama-like, untied, every target, ablation at one layer; padded then packed.
        Case {
            full: false,
            arch: Arch::Llama,
            targets: Target::ALL.to_vec(),
            ablation: Some((vec![1], 4)),
            step: vec![vec![16, 16], vec![20, 7, 5]],
            val: vec![9, 9],
        },
        // The same with micro-batches of different sizes (the buffers are reallocated) and a
        // validation batch smaller than the largest.
        Case {
            full: false,
            arch: Arch::Llama,
            targets: vec![Target::Q, Target::V],
            ablation: Some((vec![0, 2], 2)),
            step: vec![vec![24, 8], vec![16]],
            val: vec![12],
        },
        // Qwen2-like: biases, tied embeddings, MLP targets only, no ablation.
        Case {
            full: false,
            arch: Arch::Qwen2,
            targets: vec![Target::Gate, Target::Up, Target::Down],
            ablation: None,
            step: vec![vec![30, 10]],
            val: vec![5, 5, 5],
        },
        // Qwen3-like: q/k norms, attention targets, ablation.
        Case {
            full: false,
            arch: Arch::Qwen3,
            targets: Target::ATTENTION.to_vec(),
            ablation: Some((vec![1], 3)),
            step: vec![vec![12, 12, 8]],
            val: vec![8],
        },
        // Full fine-tuning: Qwen2-like (biases, tied embeddings: the lm head's gradient is the
        // embedding's) and Qwen3-like (q/k norm gains), packed, with ablation.
        Case {
            full: true,
            arch: Arch::Qwen2,
            targets: vec![Target::Q], // unused: nothing is adapted
            ablation: Some((vec![1], 2)),
            step: vec![vec![20, 9, 3], vec![12]],
            val: vec![6, 6],
        },
        Case {
            full: true,
            arch: Arch::Qwen3,
            targets: vec![Target::Q], // unused: nothing is adapted
            ablation: None,
            step: vec![vec![16, 16]],
            val: vec![10],
        },
    ];
    let mut worst = 0.0f64;
    let mut report = String::new();
    for (i, case) in cases.iter().enumerate() {
        for mode in MODES {
            let (measured, planned) = measure(&c, case, mode);
            let err = (planned as f64 - measured as f64) / measured as f64;
            worst = worst.max(err.abs());
            report.push_str(&format!(
                "case {i} ({:?}) {mode:>9}: measured {measured} B, planned {planned} B, error \
                 {:+.4}% ({:+} B)\n",
                case.arch,
                100.0 * err,
                planned as i64 - measured as i64
            ));
        }
    }
    println!("{report}worst relative error {:.4}%", 100.0 * worst);
    assert!(worst <= 0.02, "the plan is off by more than 2%:\n{report}");
}
