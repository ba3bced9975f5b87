//! Activation checkpointing on the CPU reference: every mode recomputes with the very same ops
//! on the very same inputs, so the loss and every LoRA gradient are bit-identical to keeping
//! every activation, over several micro-batches of different shapes (buffers of the shared
//! recomputation slots are reused across layers and micro-batches).

use crate::packing::{examples, model};
use caft_fast::backend::Backend;
use caft_fast::data::packed_batch;
use caft_fast::model::transformer::{Batch, Checkpointing};
use caft_fast::util::rng::Rng;

#[test]
fn every_mode_gives_identical_gradients() {
    for (name, seed) in [
        ("llama", 81),
        ("qwen2", 82),
        ("mistral", 83),
        ("qwen3", 84),
        ("gemma2", 85),
    ] {
        let (be, mut model) = model(name, seed);
        let mut rng = Rng::new(seed);
        let ex = examples(&mut rng, &[11, 3, 20, 7, 16], model.cfg.vocab_size);
        let micro: Vec<Batch> = vec![packed_batch(&ex, &[0, 1, 2]), packed_batch(&ex, &[3, 4])];
        let mut run = |mode: Checkpointing| {
            model.checkpointing = mode;
            be.zero_f32(&mut model.lora.as_mut().unwrap().grads)
                .unwrap();
            let n: usize = micro.iter().map(|b| b.n_targets()).sum();
            let losses: Vec<f64> = micro
                .iter()
                .map(|b| {
                    model
                        .forward_backward(&be, b, 1.0 / n as f32)
                        .unwrap()
                        .loss_sum
                })
                .collect();
            let g = be
                .download_f32(&model.lora.as_ref().unwrap().grads)
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
