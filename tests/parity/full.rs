//! Full fine-tuning on the CPU backend: the gradients of every weight of the tiny fixture
//! models (with ablation at two layers) against finite differences of the whole model's loss,
//! and against transformers (scripts/make_fixtures.py `--only full`): every weight's gradient,
//! and every weight after 3 AdamW steps with gradient accumulation, clipping and the Trainer's
//! weight-decay groups.
//!
//! Finite differences: the loss is a sum of f32 cross-entropies accumulated in f64, so it
//! carries ~1e-7 relative rounding noise; a central difference with step `h` along a unit
//! direction `u` then has noise ~1e-7·L/h and truncation error O(h²). With `u` the normalised
//! gradient of one group of weights (the largest directional derivative, `‖g‖`), `h = 1e-2`
//! keeps both below 1% of `‖g‖` for these models, so the test checks 2e-2 relative. A gradient
//! with a dropped term (the rstd factor of a norm gain, one occurrence of a repeated token, the
//! lm head's share of tied embeddings) is off by far more.

use crate::support::*;
use caft_fast::backend::cpu::CpuBackend;
use caft_fast::model::full::{Freeze, Param, DECAY, NO_DECAY};
use caft_fast::model::transformer::{Batch, Model};
use caft_fast::train::optim::{optimizer_step, OptimConfig, Schedule};

const MODELS: [&str; 5] = ["llama", "qwen2", "mistral", "qwen3", "gemma2"];

/// A fixture model on the CPU, fully trainable, with the fixture's ablation, and its batch.
fn setup(name: &str, freeze: Freeze) -> (Model<CpuBackend>, CpuBackend, Batch) {
    let fx = read_safetensors(&tiny_fixture(name).join("fixture.safetensors"));
    let be = CpuBackend::new();
    let model = fixture_model(&be, name, |m, loaded| {
        m.set_full(&be, loaded.weights.as_ref(), freeze).unwrap()
    });
    let (b, t) = (fx["input_ids"].shape[0], fx["input_ids"].shape[1]);
    let batch = Batch::padded(
        b,
        t,
        fx["input_ids"].i64().iter().map(|&x| x as u32).collect(),
        fx["labels"].i64().iter().map(|&x| x as i32).collect(),
    );
    (model, be, batch)
}

fn mean_loss(model: &mut Model<CpuBackend>, be: &CpuBackend, b: &Batch) -> f64 {
    let out = model.forward(be, b, false).unwrap();
    out.loss_sum / out.n_targets as f64
}

/// The roles whose gradients one check covers.
#[derive(Clone, Copy, Debug)]
enum Kind {
    Norms,
    Embeddings,
    Projections,
    Biases,
    LmHead,
}

fn kind_of(p: Param) -> Kind {
    match p {
        Param::Embed => Kind::Embeddings,
        Param::LmHead => Kind::LmHead,
        Param::Proj(..) => Kind::Projections,
        Param::Bias(..) => Kind::Biases,
        _ => Kind::Norms,
    }
}

fn gradients_match_finite_differences(name: &str) {
    let (mut model, be, batch) = setup(name, Freeze::default());
    let n = batch.n_targets();
    model.forward_backward(&be, &batch, 1.0 / n as f32).unwrap();
    let full = model.full.as_ref().unwrap();
    let grads = [
        full.groups[DECAY].grads.clone(),
        full.groups[NO_DECAY].grads.clone(),
    ];
    let slots = full.layout.slots.clone();
    let kinds = [
        Kind::Norms,
        Kind::Embeddings,
        Kind::Projections,
        Kind::Biases,
        Kind::LmHead,
    ];
    for kind in kinds {
        let chosen: Vec<_> = slots
            .iter()
            .filter(|s| std::mem::discriminant(&kind_of(s.param)) == std::mem::discriminant(&kind))
            .collect();
        if chosen.is_empty() {
            continue; // e.g. biases outside Qwen2, the lm head of tied models
        }
        // u = g / ‖g‖ over this kind's weights: the directional derivative is ‖g‖.
        let g_norm = chosen
            .iter()
            .flat_map(|s| &grads[s.group][s.off..s.off + s.len])
            .map(|&g| g as f64 * g as f64)
            .sum::<f64>()
            .sqrt();
        assert!(g_norm > 0.0, "{name} {kind:?}: zero gradient");
        let h = 1e-2;
        let mut at = |sign: f64| -> f64 {
            let f = model.full.as_mut().unwrap();
            for s in &chosen {
                let (p, g) = (&mut f.groups[s.group].params, &grads[s.group]);
                for i in s.off..s.off + s.len {
                    p[i] += (sign * h * g[i] as f64 / g_norm) as f32;
                }
            }
            model.refresh_weights(&be).unwrap();
            let l = mean_loss(&mut model, &be, &batch);
            let f = model.full.as_mut().unwrap();
            for s in &chosen {
                let (p, g) = (&mut f.groups[s.group].params, &grads[s.group]);
                for i in s.off..s.off + s.len {
                    p[i] -= (sign * h * g[i] as f64 / g_norm) as f32;
                }
            }
            model.refresh_weights(&be).unwrap();
            l
        };
        let fd = (at(1.0) - at(-1.0)) / (2.0 * h);
        let rel = (fd - g_norm).abs() / g_norm;
        assert!(
            rel < 2e-2,
            "{name} {kind:?}: finite difference {fd:.6e} vs |g| {g_norm:.6e} (rel {rel:.2e})"
        );
    }
}

#[test]
fn full_gradients_match_finite_differences() {
    for name in MODELS {
        gradients_match_finite_differences(name);
    }
}

#[test]
fn frozen_groups_get_no_slot_and_keep_their_weights() {
    let (model, ..) = setup(
        "gemma2",
        Freeze {
            embeddings: true,
            norms: true,
        },
    );
    let l = &model.full.as_ref().unwrap().layout;
    assert!(l.slot(Param::Embed).is_none());
    assert!(l.slot(Param::FinalNorm).is_none());
    assert!(l.slot(Param::InputNorm(0)).is_none());
    assert!(l
        .slot(Param::Proj(1, caft_fast::model::lora::Target::Down))
        .is_some());
    // Nothing but linear weights left, all in the decay group.
    assert_eq!(l.group_len[NO_DECAY], 0);
}

/// `‖got - want‖ / ‖want - base‖`: the error relative to how far the weights moved.
fn rel_to_update(got: &[f32], want: &[f32], base: &[f32]) -> f64 {
    let (mut e, mut u) = (0.0f64, 0.0f64);
    for ((g, w), b) in got.iter().zip(want).zip(base) {
        e += (*g as f64 - *w as f64).powi(2);
        u += (*w as f64 - *b as f64).powi(2);
    }
    (e / u).sqrt()
}

/// The trained weights by Hugging Face name (master values: Gemma's gains as `w`).
fn named_params(model: &Model<CpuBackend>) -> Vec<(String, Vec<f32>)> {
    let f = model.full.as_ref().unwrap();
    f.layout
        .slots
        .iter()
        .map(|s| {
            let p = &f.groups[s.group].params;
            (s.name.clone(), p[s.off..s.off + s.len].to_vec())
        })
        .collect()
}

/// Against transformers: the base model's logits and loss with ablation, every weight's
/// gradient (1e-4 relative, as LoRA's), then 3 AdamW steps: losses within 1e-6, gradient
/// norms 1e-4 relative, every weight within 1e-4 of its norm and within 5e-3 of its update
/// (`‖got - want‖ / ‖want - start‖`). The fixture records that dropped weight decay, wrong
/// decay groups or no clipping move the update by >= 2.6e-3 .. 1.2e-1 on these models.
///
/// Measured: every weight within 1.5e-6 .. 6.4e-6 of its norm, except Qwen2's k_proj biases
/// (5.4e-5, 3.6e-3 of the update): some of their gradient elements are ~1e-7 (a k bias moves
/// every score of a query almost alike, which softmax cancels), below the f32 rounding of the
/// rest of the gradient, and Adam scales each element's update to ~lr whatever its size, so
/// rounding decides those few updates on both sides.
fn full_matches_transformers(name: &str) {
    let dir = tiny_fixture(name);
    let fx = read_safetensors(&dir.join("full.safetensors"));
    let base = read_safetensors(&dir.join("fixture.safetensors"));
    let (mut model, be, batch) = setup(name, Freeze::default());
    let out = model.forward(&be, &batch, true).unwrap();
    assert_close(
        &format!("{name} full logits"),
        out.logits.as_ref().unwrap(),
        &fx["full_logits"].data,
        1e-5,
    );
    let loss = out.loss_sum / out.n_targets as f64;
    let want = fx["full_loss"].data[0];
    assert!((loss - want).abs() <= 1e-6, "{name} loss {loss} vs {want}");
    let n = batch.n_targets();
    model.forward_backward(&be, &batch, 1.0 / n as f32).unwrap();
    {
        let f = model.full.as_ref().unwrap();
        for s in &f.layout.slots {
            let g = &f.groups[s.group].grads[s.off..s.off + s.len];
            assert_close(
                &format!("{name} grad {}", s.name),
                g,
                &fx[&format!("full_grad.{}", s.name)].data,
                1e-4,
            );
        }
    }
    model.zero_grads(&be).unwrap();
    let start = named_params(&model);

    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("full.json")).unwrap()).unwrap();
    let o = &meta["training"]["optimizer"];
    let steps = meta["training"]["steps"].as_u64().unwrap() as usize;
    let opt = OptimConfig {
        lr: o["lr"].as_f64().unwrap(),
        beta1: o["betas"][0].as_f64().unwrap(),
        beta2: o["betas"][1].as_f64().unwrap(),
        eps: o["eps"].as_f64().unwrap(),
        weight_decay: o["weight_decay"].as_f64().unwrap(),
        max_grad_norm: meta["training"]["clip_value"].as_f64(),
        schedule: Schedule::Linear,
        warmup_steps: 0,
        total_steps: steps as u64,
    };
    let ids = &base["train.input_ids"];
    let labels = base["train.labels"].i64();
    let (accum, b, t) = (ids.shape[1], ids.shape[2], ids.shape[3]);
    let ids = ids.i64();
    let per = b * t;
    for s in 0..steps {
        let micro: Vec<Batch> = (0..accum)
            .map(|m| {
                let o = (s * accum + m) * per;
                Batch::padded(
                    b,
                    t,
                    ids[o..o + per].iter().map(|&x| x as u32).collect(),
                    labels[o..o + per].iter().map(|&x| x as i32).collect(),
                )
            })
            .collect();
        let n_step: usize = micro.iter().map(|m| m.n_targets()).sum();
        let mut loss = 0.0;
        for m in &micro {
            loss += model
                .forward_backward(&be, m, 1.0 / n_step as f32)
                .unwrap()
                .loss_sum;
        }
        loss /= n_step as f64;
        let want = fx["full_train.losses"].data[s];
        assert!(
            (loss - want).abs() <= 1e-6,
            "{name} step {s} loss {loss} vs {want}"
        );
        let rep = optimizer_step(&be, &mut model, &opt).unwrap();
        let gn = fx["full_train.grad_norms"].data[s];
        assert!(
            (rep.grad_norm - gn).abs() <= 1e-4 * gn,
            "{name} step {s} grad norm {} vs {gn}",
            rep.grad_norm
        );
        let lr = fx["full_train.lrs"].data[s];
        assert!((rep.lr - lr).abs() <= 1e-9, "{name} step {s} lr {}", rep.lr);
    }
    let mut worst = (0.0f64, 0.0f64);
    for ((tensor, got), (_, p0)) in named_params(&model).iter().zip(&start) {
        let want = &fx[&format!("full_step3.{tensor}")].data;
        let wf: Vec<f32> = want.iter().map(|&w| w as f32).collect();
        let ru = rel_to_update(got, &wf, p0);
        assert_close(&format!("{name} step3 {tensor}"), got, want, 1e-4);
        worst = (worst.0.max(rel_err(got, want)), worst.1.max(ru));
        assert!(
            ru <= 5e-3,
            "{name} step3 {tensor}: error {ru:.2e} of the update (tolerance 5e-3)"
        );
    }
    eprintln!(
        "{name}: step3 worst relative error {:.2e}, of the update {:.2e}",
        worst.0, worst.1
    );
}

#[test]
fn llama_full_matches_transformers() {
    full_matches_transformers("llama");
}
#[test]
fn qwen2_full_matches_transformers() {
    full_matches_transformers("qwen2");
}
#[test]
fn mistral_full_matches_transformers() {
    full_matches_transformers("mistral");
}
#[test]
fn qwen3_full_matches_transformers() {
    full_matches_transformers("qwen3");
}
#[test]
fn gemma2_full_matches_transformers() {
    full_matches_transformers("gemma2");
}
