//! Activation checkpointing on the CPU reference: every mode recomputes with the very same ops
//! on the very same inputs, so the loss and every LoRA gradient are bit-identical to keeping
//! every activation, over several micro-batches of different shapes (buffers of the shared
//! recomputation slots are reused across layers and micro-batches).

use crate::tiny::setup;
use caft_fast::backend::Backend;
use caft_fast::data::{packed_batch, Example};
use caft_fast::model::transformer::{Batch, Checkpointing};
use caft_fast::util::rng::Rng;

#[test]
fn every_mode_gives_identical_gradients() {
    for (name, seed) in [("llama", 81), ("qwen2", 82), ("mistral", 83)] {
        let mut c = setup(name);
        let mut rng = Rng::new(seed);
        // Perturb B (PEFT's init is 0) so every gradient is non-zero.
        let params: Vec<f32> = c
            .init
            .iter()
            .map(|p| p + 0.05 * rng.normal() as f32)
            .collect();
        c.model.set_lora(&c.be, c.layout.clone(), &params).unwrap();
        let v = c.model.cfg.vocab_size;
        let ex: Vec<Example> = [11usize, 3, 20, 7, 16]
            .iter()
            .map(|&l| {
                let ids: Vec<u32> = (0..l).map(|_| rng.below(v) as u32).collect();
                let labels = ids.iter().map(|&x| x as i32).collect();
                Example { ids, labels }
            })
            .collect();
        let micro: Vec<Batch> = vec![packed_batch(&ex, &[0, 1, 2]), packed_batch(&ex, &[3, 4])];
        let mut run = |mode: Checkpointing| {
            c.model.checkpointing = mode;
            let lora = c.model.lora.as_mut().unwrap();
            c.be.zero_f32(&mut lora.grads).unwrap();
            let n: usize = micro.iter().map(|b| b.n_targets()).sum();
            let losses: Vec<f64> = micro
                .iter()
                .map(|b| {
                    c.model
                        .forward_backward(&c.be, b, 1.0 / n as f32)
                        .unwrap()
                        .loss_sum
                })
                .collect();
            let g =
                c.be.download_f32(&c.model.lora.as_ref().unwrap().grads)
                    .unwrap();
            (losses, g)
        };
        let (l0, g0) = run(Checkpointing::None);
        assert!(
            g0.iter().filter(|&&x| x != 0.0).count() > g0.len() / 2,
            "{name}"
        );
        for mode in [
            Checkpointing::Selective,
            Checkpointing::Full,
            Checkpointing::None,
        ] {
            let (l, g) = run(mode);
            assert_eq!(l, l0, "{name} {mode}: losses");
            let diff = g
                .iter()
                .zip(&g0)
                .filter(|(a, b)| a.to_bits() != b.to_bits())
                .count();
            assert_eq!(diff, 0, "{name} {mode}: {diff} gradients differ from none");
        }
    }
}
