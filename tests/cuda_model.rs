//! The whole model on the CUDA backend against the CPU reference: forward (logits, every
//! layer's resid_post), backward (every LoRA gradient) and three AdamW steps of the tiny
//! fixture models, SmolLM2's logits, loss and gradients, and bit-identical repeat steps.
//!
//! Run on a GPU machine with `--include-ignored`; `on_the_emulated_gpu` runs the tiny-model
//! tests on the emulated GPU (tests/cuda_emulated/gpu.rs) everywhere else. The comparison
//! itself is generic: the first test runs it CPU-vs-CPU everywhere, so the harness is
//! exercised in CI too.
//!
//! Tolerances (relative norm error): f32 kernels 1e-5 for logits and states, 1e-4 for
//! gradients (cuBLAS and the kernels sum in other orders than the CPU; the per-op bound is
//! 1e-5). bf16 storage rounds every stored activation to 8 mantissa bits (2⁻⁹ relative); over
//! a forward through L layers and a backward that compounds to a few 1e-3 per layer, so the
//! whole model is held to 5e-2 on logits and states and 1e-1 on LoRA gradients.

#[path = "cuda_emulated/gpu.rs"]
mod emulated_gpu;
#[path = "cuda_emulated/harness.rs"]
mod harness;
mod support;

use caft_fast::backend::cpu::CpuBackend;
use caft_fast::backend::Backend;
use caft_fast::model::ablation::load_directions;
use caft_fast::model::loader::load_model;
use caft_fast::model::lora::{LoraConfig, LoraLayout, Target};
use caft_fast::model::transformer::{Batch, Model};
use caft_fast::train::optim::{optimizer_step, OptimConfig, Schedule};
use support::*;

/// The tiny-model and tensor-core tests below (ignored: they need a GPU) on the emulated GPU,
/// the CPU standing in for the driver and cuBLAS (tests/cuda_emulated/gpu.rs), so they run in
/// CI too. SmolLM2's size is left to real GPUs.
#[test]
fn on_the_emulated_gpu() {
    emulated_gpu::rerun_ignored("on_the_emulated_gpu", &["tiny_models", "tensor_core"]);
}

/// Everything one run of a model produces that the comparison looks at.
struct Outputs {
    logits: Vec<f32>,
    loss: f64,
    resid: Vec<Vec<f32>>,
    grads: Vec<f32>,
    after_steps: Vec<f32>,
    step_losses: Vec<f64>,
}

fn lora_for(cfg: &caft_fast::model::config::ModelConfig) -> LoraLayout {
    LoraLayout::new(
        cfg,
        &LoraConfig {
            r: 8,
            alpha: 16.0,
            rslora: true,
            targets: Target::ALL.to_vec(),
        },
    )
    .unwrap()
}

/// LoRA parameters with B non-zero (so the LoRA paths matter), the same on every backend.
fn lora_params(layout: &LoraLayout) -> Vec<f32> {
    let mut p = layout.init_params(7);
    let mut rng = caft_fast::util::rng::Rng::new(8);
    for (_, _, s) in layout.iter() {
        for x in &mut p[s.b_off..s.b_off + s.d_out * s.r] {
            *x = 0.02 * rng.normal() as f32;
        }
    }
    p
}

fn random_batch(vocab: usize, batch: usize, seq: usize, seed: u64) -> Batch {
    let mut rng = caft_fast::util::rng::Rng::new(seed);
    let ids: Vec<u32> = (0..batch * seq).map(|_| rng.below(vocab) as u32).collect();
    let mut labels: Vec<i32> = ids.iter().map(|&x| x as i32).collect();
    for b in 0..batch {
        for t in 0..(3 + b).min(seq) {
            labels[b * seq + t] = -100;
        }
    }
    Batch::padded(batch, seq, ids, labels)
}

/// Run forward, backward and `steps` AdamW steps of the model at `dir` (a tiny fixture folder
/// or the SmolLM2 GGUF) on `be`, with ablation of the fixture's directions when present.
fn run<B: Backend>(
    be: &B,
    path: &std::path::Path,
    batch: usize,
    seq: usize,
    steps: usize,
) -> Outputs {
    let loaded = load_model(path).unwrap();
    run_loaded(be, &loaded, path, batch, seq, steps)
}

fn run_loaded<B: Backend>(
    be: &B,
    loaded: &caft_fast::model::loader::LoadedModel,
    path: &std::path::Path,
    batch: usize,
    seq: usize,
    steps: usize,
) -> Outputs {
    let cfg = loaded.config.clone();
    let mut model = Model::new(be, cfg.clone(), loaded.weights.as_ref()).unwrap();
    let layout = lora_for(&cfg);
    let init = lora_params(&layout);
    model.set_lora(be, layout.clone(), &init).unwrap();
    let dirs_file = path.join("directions.safetensors");
    let dirs = if dirs_file.exists() {
        load_directions(&dirs_file, None, cfg.hidden_size, cfg.num_layers).unwrap()
    } else {
        caft_fast::model::ablation::random_directions(
            3,
            8,
            cfg.hidden_size,
            &[cfg.num_layers / 3, 2 * cfg.num_layers / 3],
        )
        .unwrap()
    };
    model.set_ablation(be, &dirs).unwrap();
    let b = random_batch(cfg.vocab_size, batch, seq, 11);
    let out = model.forward(be, &b, true).unwrap();
    let resid = (0..cfg.num_layers)
        .map(|l| model.resid_post(be, l).unwrap())
        .collect();
    let n = b.n_targets();
    model.forward_backward(be, &b, 1.0 / n as f32).unwrap();
    let grads = be
        .download_f32(&model.lora.as_ref().unwrap().grads)
        .unwrap();
    // Training from the same start: `steps` AdamW steps on fresh batches.
    model.set_lora(be, layout, &init).unwrap();
    let opt = OptimConfig {
        lr: 1e-3,
        warmup_steps: 0,
        total_steps: steps as u64,
        schedule: Schedule::Constant,
        ..OptimConfig::default()
    };
    let mut step_losses = Vec::new();
    for s in 0..steps {
        let b = random_batch(cfg.vocab_size, batch, seq, 100 + s as u64);
        let n = b.n_targets();
        let o = model.forward_backward(be, &b, 1.0 / n as f32).unwrap();
        step_losses.push(o.loss_sum / n as f64);
        optimizer_step(be, &mut model, &opt).unwrap();
    }
    let after_steps = be
        .download_f32(&model.lora.as_ref().unwrap().params)
        .unwrap();
    Outputs {
        logits: out.logits.unwrap(),
        loss: out.loss_sum / out.n_targets as f64,
        resid,
        grads,
        after_steps,
        step_losses,
    }
}

fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

/// Compare `got` (a backend under test) with `want` (the CPU); print and check every error.
fn compare(what: &str, got: &Outputs, want: &Outputs, tol_state: f64, tol_grad: f64) {
    let e = rel_err(&got.logits, &f64s(&want.logits));
    println!(
        "{what}: logits {e:.2e}, loss {:.5} vs {:.5}",
        got.loss, want.loss
    );
    assert!(
        e <= tol_state,
        "{what}: logits error {e:.2e} > {tol_state:.0e}"
    );
    assert!(
        (got.loss - want.loss).abs() <= tol_state * want.loss.abs().max(1.0),
        "{what}: loss"
    );
    for (l, (g, w)) in got.resid.iter().zip(&want.resid).enumerate() {
        let e = rel_err(g, &f64s(w));
        assert!(
            e <= tol_state,
            "{what}: resid_post.{l} error {e:.2e} > {tol_state:.0e}"
        );
    }
    let e = rel_err(&got.grads, &f64s(&want.grads));
    println!("{what}: LoRA gradients {e:.2e}");
    assert!(
        e <= tol_grad,
        "{what}: gradient error {e:.2e} > {tol_grad:.0e}"
    );
    for (s, (g, w)) in got.step_losses.iter().zip(&want.step_losses).enumerate() {
        assert!(
            (g - w).abs() <= tol_state * w.abs().max(1.0),
            "{what}: step {s} loss {g} vs {w}"
        );
    }
    // Adam normalises each update to ~lr, so parameters after a few steps stay close even where
    // gradients differ by a few per cent.
    let e = rel_err(&got.after_steps, &f64s(&want.after_steps));
    println!(
        "{what}: parameters after {} steps {e:.2e}",
        got.step_losses.len()
    );
    assert!(
        e <= tol_grad,
        "{what}: parameters after training differ by {e:.2e}"
    );
}

#[test]
fn harness_cpu_against_itself() {
    let dir = tiny_llama();
    let be = CpuBackend::new();
    let a = run(&be, &dir, 2, 16, 2);
    let b = run(&be, &dir, 2, 16, 2);
    compare("cpu vs cpu", &a, &b, 0.0, 0.0);
    assert!(a.grads.iter().any(|&g| g != 0.0));
}

mod gpu {
    use super::*;
    use caft_fast::backend::cuda::backend::CudaBackend;
    use half::bf16;

    fn tiny<T: caft_fast::backend::cuda::runtime::DeviceElem>(tol_state: f64, tol_grad: f64) {
        let gpu = CudaBackend::<T>::new(0).expect("a CUDA GPU");
        let cpu = CpuBackend::new();
        for name in ["llama", "qwen2", "mistral", "qwen3", "gemma2"] {
            let dir = tiny_fixture(name);
            // seq 40 crosses attention tile edges and, for Mistral, its window of 8.
            let want = run(&cpu, &dir, 3, 40, 3);
            let got = run(&gpu, &dir, 3, 40, 3);
            compare(
                &format!("{name} {}", T::SUFFIX),
                &got,
                &want,
                tol_state,
                tol_grad,
            );
        }
    }

    /// A fixture model on the GPU in bf16 with non-zero LoRA B and its directions.
    fn gpu_model(name: &str) -> (CudaBackend<bf16>, Model<CudaBackend<bf16>>) {
        let gpu = CudaBackend::<bf16>::new(0).expect("a CUDA GPU");
        let model = fixture_model(&gpu, name, |m, loaded| {
            let layout = lora_for(&loaded.config);
            m.set_lora(&gpu, layout.clone(), &lora_params(&layout))
                .unwrap()
        });
        (gpu, model)
    }

    /// Examples of uneven lengths (1 to 70: across the 64-row attention tiles), the first
    /// tokens unlabelled.
    fn examples(vocab: usize, lens: &[usize], seed: u64) -> Vec<caft_fast::data::Example> {
        let mut rng = caft_fast::util::rng::Rng::new(seed);
        lens.iter()
            .map(|&l| {
                let ids: Vec<u32> = (0..l).map(|_| rng.below(vocab) as u32).collect();
                let labels = ids
                    .iter()
                    .enumerate()
                    .map(|(t, &x)| if t < 2 { -100 } else { x as i32 })
                    .collect();
                caft_fast::data::Example { ids, labels }
            })
            .collect()
    }

    fn grads_of<B: Backend>(be: &B, m: &mut Model<B>, micro: &[Batch]) -> (f64, Vec<f32>) {
        let n: usize = micro.iter().map(|b| b.n_targets()).sum();
        be.zero_f32(&mut m.lora.as_mut().unwrap().grads).unwrap();
        let loss = micro
            .iter()
            .map(|b| m.forward_backward(be, b, 1.0 / n as f32).unwrap().loss_sum)
            .sum();
        (
            loss,
            be.download_f32(&m.lora.as_ref().unwrap().grads).unwrap(),
        )
    }

    /// Every checkpointing mode recomputes with the same kernels on the same inputs, so in bf16
    /// on the GPU too the loss and every LoRA gradient are bit-identical to keeping everything
    /// (two packed micro-batches, so the shared recomputation buffers are reused).
    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn tiny_models_checkpointing_bf16_bit_identical() {
        use caft_fast::model::transformer::Checkpointing;
        for name in ["llama", "mistral", "qwen3", "gemma2"] {
            let (gpu, mut m) = gpu_model(name);
            let ex = examples(m.cfg.vocab_size, &[13, 70, 1, 40, 22], 5);
            let micro = [
                caft_fast::data::packed_batch(&ex, &[0, 1, 2]),
                caft_fast::data::packed_batch(&ex, &[3, 4]),
            ];
            m.checkpointing = Checkpointing::None;
            let (l0, g0) = grads_of(&gpu, &mut m, &micro);
            assert!(g0.iter().any(|&g| g != 0.0));
            for mode in [Checkpointing::Selective, Checkpointing::Full] {
                m.checkpointing = mode;
                let (l, g) = grads_of(&gpu, &mut m, &micro);
                assert_eq!(l.to_bits(), l0.to_bits(), "{name} {mode}: loss");
                let diff = g
                    .iter()
                    .zip(&g0)
                    .filter(|(a, b)| a.to_bits() != b.to_bits())
                    .count();
                assert_eq!(diff, 0, "{name} {mode}: {diff} gradients differ");
            }
        }
    }

    /// Packing on the GPU in bf16. A packed micro-batch never attends across examples:
    /// changing one example leaves every other example's logits bit for bit the same. And the
    /// same examples packed or padded give the same step: loss within 1e-6 and LoRA gradients
    /// within 1e-3 relative. Per row both layouts run the same kernels on the same values (the
    /// attention tiles start at each sequence's first row), so what differs is the f32 order
    /// in which rows are summed into the loss and the gradients, and, on a real GPU, a cuBLAS
    /// algorithm chosen for another row count (a bf16 ulp, 4e-3, on single values). A dropped
    /// or leaking example moves the gradients by O(10%).
    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn tiny_models_packed_bf16() {
        for name in ["llama", "mistral"] {
            let (gpu, mut m) = gpu_model(name);
            let v = m.cfg.vocab_size;
            let ex = examples(v, &[13, 70, 1, 40, 22, 9], 6);
            let idx: Vec<u32> = (0..ex.len() as u32).collect();
            let packed = caft_fast::data::packed_batch(&ex, &idx);
            let logits = |m: &mut Model<CudaBackend<bf16>>, b: &Batch| {
                m.forward(&gpu, b, true).unwrap().logits.unwrap()
            };
            let base = logits(&mut m, &packed);
            let mut changed = ex.clone();
            changed[3]
                .ids
                .iter_mut()
                .for_each(|t| *t = (*t + 7) % v as u32);
            let other = logits(&mut m, &caft_fast::data::packed_batch(&changed, &idx));
            let mut r0 = 0;
            for (i, e) in ex.iter().enumerate() {
                let rows = r0 * v..(r0 + e.ids.len()) * v;
                assert_eq!(
                    base[rows.clone()] == other[rows],
                    i != 3,
                    "{name}: example {i} (changed: 3)"
                );
                r0 += e.ids.len();
            }
            let padded: Vec<Batch> = idx
                .chunks(2)
                .map(|c| caft_fast::data::make_batch(&ex, c, 0))
                .collect();
            let (lp, gp) = grads_of(&gpu, &mut m, &padded);
            let (lk, gk) = grads_of(&gpu, &mut m, &[packed]);
            assert!(
                ((lk - lp) / lp).abs() < 1e-6,
                "{name}: loss packed {lk} vs padded {lp}"
            );
            let err = caft_fast::linalg::rel_err(&gk, &gp);
            println!("{name}: packed vs padded gradients, relative error {err:.2e}");
            assert!(
                err < 1e-3,
                "{name}: packed vs padded gradients differ by {err:e}"
            );
        }
    }

    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn tiny_models_f32_match_cpu() {
        tiny::<f32>(1e-5, 1e-4);
    }

    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn tiny_models_bf16_match_cpu() {
        tiny::<bf16>(5e-2, 1e-1);
    }

    /// Whole-model forward, backward and AdamW steps in bf16 with the tensor-core attention
    /// kernels (Llama-3.2-1B's head_dim 64 with GQA and llama3 rope; Qwen2.5's head_dim 128
    /// with q/k/v biases), against the CPU; seq 70 crosses the 64-row tiles. Tolerances as for
    /// the tiny models.
    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn tensor_core_head_dims_bf16_match_cpu() {
        let gpu = CudaBackend::<bf16>::new(0).expect("a CUDA GPU");
        let cpu = CpuBackend::new();
        for (preset, heads, kv) in [("llama-3.2-1b", 4, 2), ("qwen2.5-1.5b", 2, 1)] {
            let m = shrunk_random_model(preset, heads, kv);
            assert_eq!(m.config.head_dim * heads, 256);
            let none = std::path::Path::new("");
            let want = run_loaded(&cpu, &m, none, 2, 70, 2);
            let got = run_loaded(&gpu, &m, none, 2, 70, 2);
            let name = format!("{preset} shape (head_dim {}) bf16", m.config.head_dim);
            compare(&name, &got, &want, 5e-2, 1e-1);
        }
    }

    /// SmolLM2 from its GGUF when the file is here; else (the GGUF machine copy is limited in
    /// size) random weights of exactly SmolLM2's shape, which exercise the same kernels.
    fn smollm2() -> (caft_fast::model::loader::LoadedModel, std::path::PathBuf) {
        let p = caft_fast::util::fetch::smollm2_path();
        if p.exists() {
            return (load_model(&p).unwrap(), p);
        }
        println!("SmolLM2 GGUF not found: using random weights of its shape");
        let config = caft_fast::model::random::preset("smollm2-135m").unwrap();
        let loaded = caft_fast::model::loader::LoadedModel {
            weights: Box::new(caft_fast::model::random::RandomWeights::new(
                config.clone(),
                5,
            )),
            config,
            tokenizer: None,
            chat_template: None,
            source: "random:smollm2-135m".into(),
        };
        (loaded, p)
    }

    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn smollm2_bf16_matches_cpu() {
        let (m, p) = smollm2();
        let gpu = CudaBackend::<bf16>::new(0).expect("a CUDA GPU");
        let want = run_loaded(&CpuBackend::new(), &m, &p, 2, 64, 2);
        let got = run_loaded(&gpu, &m, &p, 2, 64, 2);
        compare("smollm2 bf16", &got, &want, 5e-2, 1e-1);
    }

    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn smollm2_f32_matches_cpu() {
        let (m, p) = smollm2();
        let gpu = CudaBackend::<f32>::new(0).expect("a CUDA GPU");
        let want = run_loaded(&CpuBackend::new(), &m, &p, 2, 64, 1);
        let got = run_loaded(&gpu, &m, &p, 2, 64, 1);
        compare("smollm2 f32", &got, &want, 1e-4, 1e-3);
    }

    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn same_step_twice_is_bit_identical() {
        let (m, p) = smollm2();
        let gpu = CudaBackend::<bf16>::new(0).expect("a CUDA GPU");
        let a = run_loaded(&gpu, &m, &p, 2, 128, 2);
        let b = run_loaded(&gpu, &m, &p, 2, 128, 2);
        assert_eq!(
            a.loss.to_bits(),
            b.loss.to_bits(),
            "loss differs between runs"
        );
        assert!(
            a.grads
                .iter()
                .zip(&b.grads)
                .all(|(x, y)| x.to_bits() == y.to_bits()),
            "gradients differ"
        );
        assert!(
            a.after_steps
                .iter()
                .zip(&b.after_steps)
                .all(|(x, y)| x.to_bits() == y.to_bits()),
            "parameters after training differ"
        );
    }
}
