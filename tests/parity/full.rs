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
use caft_fast::model::ablation::load_directions;
use caft_fast::model::full::{Freeze, Param, DECAY, NO_DECAY};
use caft_fast::model::loader::load_model;
use caft_fast::model::transformer::{Batch, Model};

const MODELS: [&str; 5] = ["llama", "qwen2", "mistral", "qwen3", "gemma2"];

/// A fixture model on the CPU, fully trainable, with the fixture's ablation, and its batch.
fn setup(name: &str, freeze: Freeze) -> (Model<CpuBackend>, CpuBackend, Batch) {
    let dir = tiny_fixture(name);
    let fx = read_safetensors(&dir.join("fixture.safetensors"));
    let be = CpuBackend::new();
    let loaded = load_model(&dir).unwrap();
    let cfg = loaded.config.clone();
    let mut model = Model::new(&be, cfg.clone(), loaded.weights.as_ref()).unwrap();
    model
        .set_full(&be, loaded.weights.as_ref(), freeze)
        .unwrap();
    let dirs = load_directions(
        &dir.join("directions.safetensors"),
        None,
        cfg.hidden_size,
        cfg.num_layers,
    )
    .unwrap();
    model.set_ablation(&be, &dirs).unwrap();
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
    assert!(l.slot(Param::Proj(1, caft_fast::model::lora::Target::Down)).is_some());
    // Nothing but linear weights left, all in the decay group.
    assert_eq!(l.group_len[NO_DECAY], 0);
}
