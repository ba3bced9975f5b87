//! Full fine-tuning on the CUDA backend against the CPU reference, on the tiny fixture models
//! with the fixture's ablation: every weight's gradient of one packed micro-batch, then three
//! AdamW steps with accumulation, clipping and the decay groups; and, in bf16, bit-identical
//! gradients under every checkpointing mode.
//!
//! Run on a GPU with `--include-ignored`; `on_the_emulated_gpu` runs them on the emulated GPU
//! (tests/cuda_emulated/gpu.rs) everywhere else, so in CI.
//!
//! Tolerances. f32: gradients within 1e-4 relative norm per tensor (cuBLAS and the kernels
//! sum in other orders than the CPU; the whole-model LoRA gradients are held to the same), the
//! weights after 3 steps within 5e-3 of their update, `‖gpu - cpu‖ / ‖cpu - start‖` (measured:
//! 7e-5 to 1.1e-3; on these settings a dropped weight decay, wrong decay groups or no clipping
//! move the update by >= 1.1e-2, as the transformers fixture records for its own).
//!
//! bf16: the forward and backward read bf16 copies of the weights and store bf16 activations,
//! so gradients differ from the f32 CPU's by the compounded rounding (measured on the emulated
//! GPU: 2.5e-2 to 4.2e-2 per model's worst tensor); held to 6e-2, which a gradient with a dropped term (a norm gain without its
//! rstd, one of a token's embedding rows, the tied lm head's share) exceeds by far (0.3 to 1 on
//! the CPU mutants). After 3 steps the f32 masters must follow the CPU's update within 0.5 of
//! its size (measured up to 0.27): a skipped or doubled update (1.0) fails; finer errors
//! (decay, clipping) are the f32 test's to catch, since Adam normalises each element and the
//! bf16 gradient noise decides the updates of near-zero gradient elements.
//!
//! Qwen2's k_proj biases are held to the weights' norm instead (1/10 of the update tolerance:
//! measured 1e-5..6e-5 in f32, 1.1e-2 in bf16): a k bias shifts a query's scores almost
//! uniformly, which softmax cancels, so its gradient elements are near zero and Adam turns
//! rounding into updates of ~lr (4e-3 of the update in f32, 0.77 in bf16; the CPU against
//! transformers shows the same, tests/parity/full.rs).

#[path = "cuda_emulated/gpu.rs"]
mod emulated_gpu;
#[path = "cuda_emulated/harness.rs"]
mod harness;
mod support;

use caft_fast::backend::cpu::CpuBackend;
use caft_fast::backend::Backend;
use caft_fast::model::full::Freeze;
use caft_fast::model::transformer::{Batch, Model};
use caft_fast::train::optim::{optimizer_step, OptimConfig, Schedule};
use support::*;

#[test]
fn on_the_emulated_gpu() {
    emulated_gpu::rerun_ignored("on_the_emulated_gpu", &["full_"]);
}

const MODELS: [&str; 5] = ["llama", "qwen2", "mistral", "qwen3", "gemma2"];

/// A tiny fixture model on `be`, fully trained, with the fixture's ablation.
fn model<B: Backend>(be: &B, name: &str) -> Model<B> {
    fixture_model(be, name, |m, loaded| {
        m.set_full(be, loaded.weights.as_ref(), Freeze::default())
            .unwrap()
    })
}

/// Packed micro-batches of random examples (lengths `lens[i]`), the first tokens unlabelled.
fn micro_batches(vocab: usize, split: &[&[usize]], seed: u64) -> Vec<Batch> {
    let mut rng = caft_fast::util::rng::Rng::new(seed);
    split
        .iter()
        .map(|lens| {
            let n: usize = lens.iter().sum();
            let ids: Vec<u32> = (0..n).map(|_| rng.below(vocab) as u32).collect();
            let mut labels: Vec<i32> = ids.iter().map(|&x| x as i32).collect();
            let mut r0 = 0;
            for &l in lens.iter() {
                labels[r0] = -100;
                r0 += l;
            }
            Batch {
                lens: lens.to_vec(),
                ids,
                labels,
            }
        })
        .collect()
}

/// Per trained tensor: its name and values in `bufs` (one flat buffer per group, as
/// `Model::download_trained` concatenates them).
fn by_tensor<B: Backend>(m: &Model<B>, flat: &[f32]) -> Vec<(String, Vec<f32>)> {
    let f = m.full.as_ref().unwrap();
    let decay = f.layout.group_len[0];
    f.layout
        .slots
        .iter()
        .map(|s| {
            let o = s.off + if s.group == 0 { 0 } else { decay };
            (s.name.clone(), flat[o..o + s.len].to_vec())
        })
        .collect()
}

fn grads<B: Backend>(be: &B, m: &Model<B>) -> Vec<f32> {
    let f = m.full.as_ref().unwrap();
    let mut g = be.download_f32(&f.groups[0].grads).unwrap();
    g.extend(be.download_f32(&f.groups[1].grads).unwrap());
    g
}

/// What one backend produces: the gradient of the first micro-batches, the masters before and
/// after 3 steps, the step losses.
struct Run {
    grads: Vec<f32>,
    start: Vec<f32>,
    after: Vec<f32>,
    losses: Vec<f64>,
}

fn run<B: Backend>(be: &B, name: &str) -> Run {
    let mut m = model(be, name);
    let v = m.cfg.vocab_size;
    let first = micro_batches(v, &[&[13, 1, 40], &[22, 9]], 1);
    let n: usize = first.iter().map(|b| b.n_targets()).sum();
    for b in &first {
        m.forward_backward(be, b, 1.0 / n as f32).unwrap();
    }
    let grads = grads(be, &m);
    m.zero_grads(be).unwrap();
    let start = m.download_trained(be).unwrap()[0].clone();
    let opt = OptimConfig {
        lr: 1e-3,
        beta1: 0.9,
        beta2: 0.95,
        weight_decay: 0.1,
        max_grad_norm: Some(1.0),
        schedule: Schedule::Linear,
        warmup_steps: 0,
        total_steps: 3,
        ..OptimConfig::default()
    };
    let mut losses = Vec::new();
    for s in 0..3 {
        let micro = micro_batches(v, &[&[17, 5], &[30]], 10 + s);
        let n: usize = micro.iter().map(|b| b.n_targets()).sum();
        let mut l = 0.0;
        for b in &micro {
            l += m.forward_backward(be, b, 1.0 / n as f32).unwrap().loss_sum;
        }
        losses.push(l / n as f64);
        optimizer_step(be, &mut m, &opt).unwrap();
    }
    let after = m.download_trained(be).unwrap()[0].clone();
    Run {
        grads,
        start,
        after,
        losses,
    }
}

fn rel_to_update(got: &[f32], want: &[f32], start: &[f32]) -> f64 {
    let (mut e, mut u) = (0.0f64, 0.0f64);
    for ((g, w), s) in got.iter().zip(want).zip(start) {
        e += (*g as f64 - *w as f64).powi(2);
        u += (*w as f64 - *s as f64).powi(2);
    }
    (e / u).sqrt()
}

/// The GPU against the CPU, per tensor: (worst gradient error, worst update error).
fn compare<T: caft_fast::backend::cuda::DeviceElem>(
    name: &str,
    grad_tol: f64,
    update_tol: f64,
) -> (f64, f64) {
    let cpu_be = CpuBackend::new();
    let gpu_be = caft_fast::backend::cuda::CudaBackend::<T>::new(0).unwrap();
    let cpu = run(&cpu_be, name);
    let gpu = run(&gpu_be, name);
    let m = model(&cpu_be, name);
    let (mut worst_g, mut worst_u) = (0.0f64, 0.0f64);
    let tensors = |x: &[f32]| by_tensor(&m, x);
    let (cg, gg) = (tensors(&cpu.grads), tensors(&gpu.grads));
    let (cs, ca, ga) = (
        tensors(&cpu.start),
        tensors(&cpu.after),
        tensors(&gpu.after),
    );
    for i in 0..cg.len() {
        let t = &cg[i].0;
        let want: Vec<f64> = cg[i].1.iter().map(|&x| x as f64).collect();
        let e = rel_err(&gg[i].1, &want);
        worst_g = worst_g.max(e);
        assert!(e <= grad_tol, "{name} grad {t}: {e:.3e} > {grad_tol:.0e}");
        let u = rel_to_update(&ga[i].1, &ca[i].1, &cs[i].1);
        if t.ends_with("k_proj.bias") {
            // Ill-conditioned under Adam (see the module comment): held to the weights' norm.
            let want: Vec<f64> = ca[i].1.iter().map(|&x| x as f64).collect();
            let e = rel_err(&ga[i].1, &want);
            eprintln!("{name} {t}: {u:.2e} of the update, {e:.2e} of the weights");
            assert!(
                e <= update_tol / 10.0,
                "{name} step3 {t}: {e:.3e} of the weights"
            );
            continue;
        }
        worst_u = worst_u.max(u);
        assert!(
            u <= update_tol,
            "{name} step3 {t}: {u:.3e} of the update > {update_tol}"
        );
    }
    for (a, b) in gpu.losses.iter().zip(&cpu.losses) {
        assert!(
            (a - b).abs() <= 10.0 * grad_tol * b.abs(),
            "{name} loss {a} vs {b}"
        );
    }
    eprintln!("{name}: worst gradient error {worst_g:.2e}, worst update error {worst_u:.2e}");
    (worst_g, worst_u)
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn full_f32_matches_the_cpu() {
    for name in MODELS {
        compare::<f32>(name, 1e-4, 5e-3);
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn full_bf16_follows_the_cpu() {
    for name in MODELS {
        compare::<half::bf16>(name, 6e-2, 0.6);
    }
}

/// Recomputation reproduces the saved forward bit for bit in full fine-tuning too (the weight
/// gradients read the same saved or recomputed inputs).
#[test]
#[ignore = "needs a CUDA GPU"]
fn full_checkpointing_bf16_bit_identical() {
    use caft_fast::model::transformer::Checkpointing;
    let be = caft_fast::backend::cuda::CudaBackend::<half::bf16>::new(0).unwrap();
    for name in ["qwen2", "gemma2"] {
        let mut m = model(&be, name);
        let micro = micro_batches(m.cfg.vocab_size, &[&[13, 1, 40], &[22, 9]], 3);
        let n: usize = micro.iter().map(|b| b.n_targets()).sum();
        let run = |m: &mut Model<_>, mode| {
            m.checkpointing = mode;
            for b in &micro {
                m.forward_backward(&be, b, 1.0 / n as f32).unwrap();
            }
            let g = grads(&be, m);
            m.zero_grads(&be).unwrap();
            g
        };
        let g0 = run(&mut m, Checkpointing::None);
        assert!(g0.iter().any(|&g| g != 0.0));
        for mode in [Checkpointing::Selective, Checkpointing::Full] {
            let g = run(&mut m, mode);
            let diff = g
                .iter()
                .zip(&g0)
                .filter(|(a, b)| a.to_bits() != b.to_bits())
                .count();
            assert_eq!(diff, 0, "{name} {mode}: {diff} gradients differ");
        }
    }
}
