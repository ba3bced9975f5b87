//! The KV-cache path (`Model::prefill` / `Model::decode`) against the full forward.
//!
//! Tiny Llama (GQA, llama3 rope), Qwen2 (biases, tied) and Mistral (sliding window 8, shorter
//! than the sequences here), and random Llama-3.2-1B / Qwen2.5-1.5B shapes shrunk to 3 layers
//! (head_dim 64 / 128, which the bf16 GPU kernels run on tensor cores), with random LoRA
//! adapters and ablation at two layers: prompts of
//! different lengths share one left-padded cache, then every sequence decodes its own tokens.
//! The logits of each step must equal the full forward's logits at that position of that
//! sequence alone, within 1e-5 relative norm on the CPU (both sides f32; only summation orders
//! differ). The same check runs on the CUDA backend with `--include-ignored` on a GPU machine
//! (and on the emulated GPU of tests/cuda_emulated/gpu.rs everywhere else):
//! f32 storage within 1e-5, bf16 storage within 2e-2 (the cache and every activation rounded
//! to 8 mantissa bits; the full forward rounds differently, so the two paths differ by a few
//! bf16 ulps compounded over three layers).

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
use caft_fast::model::transformer::{Batch, Model, IGNORE};
use caft_fast::util::rng::Rng;
use support::*;

/// The CUDA tests below (ignored: they need a GPU) on the emulated GPU, the CPU standing in for
/// the driver and cuBLAS (tests/cuda_emulated/gpu.rs), so they run in CI too.
#[test]
fn on_the_emulated_gpu() {
    emulated_gpu::rerun_ignored("on_the_emulated_gpu", &["cuda"]);
}

/// The models the cache is checked on: the tiny fixtures (their own directions), and shrunk
/// random Llama-3.2-1B / Qwen2.5-1.5B shapes (head_dim 64 / 128: bf16 prefill takes the
/// tensor-core kernels; random directions).
const MODELS: [&str; 5] = ["llama", "qwen2", "mistral", "llama-3.2-1b", "qwen2.5-1.5b"];

fn test_model<B: Backend>(name: &str, be: &B, rng: &mut Rng) -> Model<B> {
    let dir = tiny_fixture(name);
    let loaded = match name {
        "llama-3.2-1b" => shrunk_random_model(name, 4, 2),
        "qwen2.5-1.5b" => shrunk_random_model(name, 2, 1),
        _ => load_model(&dir).unwrap(),
    };
    let cfg = loaded.config.clone();
    let mut model = Model::new(be, cfg.clone(), loaded.weights.as_ref()).unwrap();
    let lora = LoraConfig {
        r: 4,
        alpha: 8.0,
        rslora: false,
        targets: Target::ALL.to_vec(),
    };
    let layout = LoraLayout::new(&cfg, &lora).unwrap();
    // Both factors random (PEFT would start B at zero, which would hide the LoRA path).
    let params: Vec<f32> = rng.normal_vec(layout.len).iter().map(|x| 0.1 * x).collect();
    model.set_lora(be, layout, &params).unwrap();
    let dirs_file = dir.join("directions.safetensors");
    let dirs = if dirs_file.exists() {
        load_directions(&dirs_file, None, cfg.hidden_size, cfg.num_layers).unwrap()
    } else {
        caft_fast::model::ablation::random_directions(5, 4, cfg.hidden_size, &[0, 2]).unwrap()
    };
    model.set_ablation(be, &dirs).unwrap();
    model
}

/// Full-forward logits of one sequence, `[len, vocab]`.
fn full_logits<B: Backend>(model: &mut Model<B>, be: &B, ids: &[u32]) -> Vec<f32> {
    let b = Batch::padded(1, ids.len(), ids.to_vec(), vec![IGNORE; ids.len()]);
    model.forward(be, &b, true).unwrap().logits.unwrap()
}

#[test]
fn kv_cache_matches_full_forward() {
    check_kv_cache(&CpuBackend::new(), 1e-5);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn kv_cache_matches_full_forward_cuda_f32() {
    use caft_fast::backend::cuda::backend::CudaBackend;
    check_kv_cache(&CudaBackend::<f32>::new(0).expect("a CUDA GPU"), 1e-5);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn kv_cache_matches_full_forward_cuda_bf16() {
    use caft_fast::backend::cuda::backend::CudaBackend;
    check_kv_cache(
        &CudaBackend::<half::bf16>::new(0).expect("a CUDA GPU"),
        2e-2,
    );
}

fn check_kv_cache<B: Backend>(be: &B, tol: f64) {
    let mut rng = Rng::new(4242);
    for name in MODELS {
        let mut model = test_model(name, be, &mut rng);
        let v = model.cfg.vocab_size;
        let prompt_lens = [6usize, 11, 1];
        let steps = 7;
        let seqs: Vec<Vec<u32>> = prompt_lens
            .iter()
            .map(|&l| (0..l + steps).map(|_| rng.below(v) as u32).collect())
            .collect();
        let prompts: Vec<Vec<u32>> = seqs
            .iter()
            .zip(&prompt_lens)
            .map(|(s, &l)| s[..l].to_vec())
            .collect();
        let cap = 11 + steps;
        let mut cache = model.new_cache(be, seqs.len(), cap).unwrap();
        let mut got: Vec<Vec<f32>> = vec![model.prefill(be, &mut cache, &prompts).unwrap()];
        for t in 0..steps - 1 {
            let ids: Vec<u32> = seqs
                .iter()
                .zip(&prompt_lens)
                .map(|(s, &l)| s[l + t])
                .collect();
            got.push(model.decode(be, &mut cache, &ids).unwrap());
        }
        for (b, s) in seqs.iter().enumerate() {
            let full = full_logits(&mut model, be, &s[..prompt_lens[b] + steps - 1]);
            for (t, step) in got.iter().enumerate() {
                let pos = prompt_lens[b] - 1 + t;
                let want = &full[pos * v..(pos + 1) * v];
                let have = &step[b * v..(b + 1) * v];
                let e = rel_err(have, want);
                assert!(
                    e < tol,
                    "{name}: sequence {b} step {t} (position {pos}): relative error {e:.2e}"
                );
            }
        }
        // A full cache refuses another step instead of writing past its end.
        let mut small = model.new_cache(be, 1, 3).unwrap();
        model.prefill(be, &mut small, &[vec![1, 2, 3]]).unwrap();
        let err = model.decode(be, &mut small, &[4]).unwrap_err().to_string();
        assert!(err.contains("KV cache is full"), "{err}");
    }
}
