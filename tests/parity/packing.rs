//! Padding-free packing on the CPU reference: sequences laid end to end in one micro-batch
//! (attention within each sequence, rope positions restarting at 0) give the loss and LoRA
//! gradients of the same sequences padded, and never see each other.
//!
//! Models: the tiny Llama (GQA, llama3 rope scaling) and Mistral (sliding window 8, shorter
//! than most sequences here) fixtures, with their LoRA init perturbed so that every gradient
//! is non-zero, and their ablation on.

use crate::support::*;
use crate::tiny::setup;
use caft_fast::backend::cpu::CpuBackend;
use caft_fast::backend::Backend;
use caft_fast::data::{make_batch, pack_step, packed_batch, Example};
use caft_fast::model::transformer::{Batch, Model, IGNORE};
use caft_fast::util::rng::Rng;

/// Examples of uneven lengths with the first few labels ignored, as a chat prompt would be.
pub fn examples(rng: &mut Rng, lens: &[usize], vocab: usize) -> Vec<Example> {
    lens.iter()
        .map(|&l| {
            let ids: Vec<u32> = (0..l).map(|_| rng.below(vocab) as u32).collect();
            let prompt = rng.below(l.div_ceil(2));
            let labels = ids
                .iter()
                .enumerate()
                .map(|(t, &x)| if t < prompt { IGNORE } else { x as i32 })
                .collect();
            Example { ids, labels }
        })
        .collect()
}

/// A fixture model whose LoRA parameters are the fixture's init plus noise (PEFT's init has
/// B = 0, which would leave the A gradients zero and untested).
pub fn model(name: &str, seed: u64) -> (CpuBackend, Model<CpuBackend>) {
    let c = setup(name);
    let mut rng = Rng::new(seed);
    let params: Vec<f32> = c
        .init
        .iter()
        .map(|p| p + 0.05 * rng.normal() as f32)
        .collect();
    let mut model = c.model;
    model.set_lora(&c.be, c.layout, &params).unwrap();
    (c.be, model)
}

/// `(Σ CE, LoRA gradients)` of one optimizer step made of `micro`, normalised by the labelled
/// tokens of the whole step, as `Trainer::step` does.
fn step_grads(be: &CpuBackend, model: &mut Model<CpuBackend>, micro: &[Batch]) -> (f64, Vec<f32>) {
    let n_step: usize = micro.iter().map(|b| b.n_targets()).sum();
    let lora = model.lora.as_mut().unwrap();
    be.zero_f32(&mut lora.grads).unwrap();
    let mut loss = 0.0;
    for b in micro {
        loss += model
            .forward_backward(be, b, 1.0 / n_step as f32)
            .unwrap()
            .loss_sum;
    }
    let g = be
        .download_f32(&model.lora.as_ref().unwrap().grads)
        .unwrap();
    (loss, g)
}

/// The same 9 examples as 5 padded micro-batches of 2 (what `--no-packing` runs), as one packed
/// micro-batch, and packed under a token budget (several micro-batches): the loss and every
/// LoRA gradient agree within 1e-6 relative (f32; only the summation order differs, and the
/// padded run also computes the padding rows, which carry no loss). The gradients are far from
/// zero (checked), so a skipped sequence or a leak across a boundary cannot pass.
#[test]
fn packed_equals_padded() {
    for (name, seed) in [("llama", 71), ("mistral", 72)] {
        let (be, mut m) = model(name, seed);
        let mut rng = Rng::new(seed);
        let ex = examples(&mut rng, &[5, 16, 1, 9, 12, 23, 3, 14, 8], m.cfg.vocab_size);
        let idx: Vec<u32> = (0..ex.len() as u32).collect();
        let padded: Vec<Batch> = idx.chunks(2).map(|c| make_batch(&ex, c, 0)).collect();
        let (loss_pad, g_pad) = step_grads(&be, &mut m, &padded);
        let norm = g_pad.iter().map(|g| (g * g) as f64).sum::<f64>().sqrt();
        assert!(norm > 1e-3, "{name}: gradient norm {norm}");

        let one = [packed_batch(&ex, &idx)];
        let (loss_one, g_one) = step_grads(&be, &mut m, &one);
        let groups = pack_step(&ex, &idx, 30);
        assert!(groups.len() >= 4, "{groups:?}");
        let budgeted: Vec<Batch> = groups.iter().map(|g| packed_batch(&ex, g)).collect();
        let (loss_b, g_b) = step_grads(&be, &mut m, &budgeted);
        for (what, loss, g) in [("one", loss_one, &g_one), ("budget 30", loss_b, &g_b)] {
            let le = ((loss - loss_pad) / loss_pad).abs();
            assert!(le < 1e-6, "{name} {what}: loss {loss} vs padded {loss_pad}");
            let ge = rel_err(g, &g_pad);
            assert!(
                ge < 1e-6,
                "{name} {what}: gradients differ by {ge:e} relative"
            );
        }
    }
}

/// A packed batch never attends across examples: changing every token of one example leaves
/// the logits of the others bit for bit the same, and changes its own; and every example's
/// logits equal that example run alone (1e-5 relative: the GEMMs see other row counts).
#[test]
fn packed_examples_do_not_see_each_other() {
    for (name, seed) in [("llama", 73), ("mistral", 74)] {
        let (be, mut m) = model(name, seed);
        let v = m.cfg.vocab_size;
        let mut rng = Rng::new(seed);
        let ex = examples(&mut rng, &[7, 1, 19, 12], v);
        let idx: Vec<u32> = (0..ex.len() as u32).collect();
        let logits =
            |m: &mut Model<CpuBackend>, b: &Batch| m.forward(&be, b, true).unwrap().logits.unwrap();
        let base = logits(&mut m, &packed_batch(&ex, &idx));
        let mut changed = ex.clone();
        for t in changed[2].ids.iter_mut() {
            *t = (*t + 1 + rng.below(v - 1) as u32) % v as u32;
        }
        let other = logits(&mut m, &packed_batch(&changed, &idx));
        let mut r0 = 0;
        for (i, e) in ex.iter().enumerate() {
            let rows = r0 * v..(r0 + e.ids.len()) * v;
            let same = base[rows.clone()] == other[rows.clone()];
            assert_eq!(same, i != 2, "{name}: example {i} (changed: 2)");
            let alone = logits(&mut m, &packed_batch(&ex, &[i as u32]));
            let err = rel_err(&base[rows], &alone);
            assert!(err < 1e-5, "{name}: example {i} packed vs alone: {err:e}");
            r0 += e.ids.len();
        }
    }
}

/// transformers' padding-free path (`DataCollatorWithFlattening`: one row, `position_ids`
/// restarting at 0 for each sequence; tests/fixtures/tiny/llama_packed) on the tiny Llama with
/// its LoRA init and ablation: the packed batch's logits and every resid_post within 1e-5
/// relative, the loss within 1e-6, the LoRA gradients within 1e-5 (f32 on both sides, only
/// summation orders differ).
#[test]
fn matches_transformers_padding_free() {
    let mut c = setup("llama");
    let fx = read_safetensors(&tiny_fixture("llama_packed").join("fixture.safetensors"));
    let lens: Vec<usize> = fx["seq_lens"].i64().iter().map(|&x| x as usize).collect();
    let cu: Vec<i64> = fx["cu_seqlens"].i64();
    assert_eq!(cu.len(), lens.len() + 1);
    // Our layout is theirs: the same boundaries, positions restarting at 0.
    let pos: Vec<i64> = lens.iter().flat_map(|&l| 0..l as i64).collect();
    assert_eq!(pos, fx["position_ids"].i64());
    let batch = Batch {
        lens,
        ids: fx["input_ids"].i64().iter().map(|&x| x as u32).collect(),
        labels: fx["labels"].i64().iter().map(|&x| x as i32).collect(),
    };
    let out = c.model.forward(&c.be, &batch, true).unwrap();
    assert_close(
        "packed logits",
        out.logits.as_ref().unwrap(),
        &fx["logits"].data,
        1e-5,
    );
    let loss = out.loss_sum / out.n_targets as f64;
    let want = fx["loss"].data[0];
    assert!((loss - want).abs() <= 1e-6, "packed loss {loss} vs {want}");
    for l in 0..c.model.cfg.num_layers {
        let r = c.model.resid_post(&c.be, l).unwrap();
        assert_close(
            &format!("packed resid_post.{l}"),
            &r,
            &fx[&format!("resid_post.{l}")].data,
            1e-5,
        );
    }
    c.model
        .forward_backward(&c.be, &batch, 1.0 / batch.n_targets() as f32)
        .unwrap();
    let grads =
        c.be.download_f32(&c.model.lora.as_ref().unwrap().grads)
            .unwrap();
    for (tensor, _, g) in c.layout.to_named(&grads) {
        assert_close(
            &format!("packed grad {tensor}"),
            &g,
            &fx[&format!("grad.{tensor}")].data,
            1e-5,
        );
    }
}
