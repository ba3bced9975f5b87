//! The transformer on the CPU backend against transformers + PEFT fixtures
//! (scripts/make_fixtures.py): tiny random Llama (GQA, llama3 rope scaling, untied), Qwen2
//! (q/k/v biases, tied), Mistral (explicit head_dim, sliding window), Qwen3 (per-head q/k
//! norms, head_dim 24 with hidden 64) and Gemma-2 ((1 + w) sandwich norms, GeGLU, soft-capped
//! attention and logits that saturate, sliding and global layers alternating,
//! query_pre_attn_scalar, tied), each with LoRA and ablation at two layers.
//!
//! Tolerances (f32 against f32): logits and resid_post within 1e-5 relative norm, LoRA
//! gradients within 1e-4, the loss within 1e-6 absolute. Both sides compute in f32 with
//! different summation orders; over 3-4 layers that differs by ~1e-7 relative per op.

use crate::support::*;
use caft_fast::backend::cpu::CpuBackend;
use caft_fast::backend::Backend;
use caft_fast::generate::sample::SampleOpts;
use caft_fast::generate::{generate, Request};
use caft_fast::model::ablation::load_directions;
use caft_fast::model::loader::load_model;
use caft_fast::model::lora::{LoraConfig, LoraLayout, Target};
use caft_fast::model::transformer::{Batch, Model};
use caft_fast::train::optim::{optimizer_step, OptimConfig, Schedule};
use std::collections::BTreeMap;

/// A fixture model on the CPU with the fixture's LoRA init and ablation, and its tensors.
pub struct Case {
    pub model: Model<CpuBackend>,
    pub be: CpuBackend,
    pub fx: BTreeMap<String, Fx>,
    pub layout: LoraLayout,
    pub init: Vec<f32>,
}

pub fn setup(name: &str) -> Case {
    let dir = tiny_fixture(name);
    let fx = read_safetensors(&dir.join("fixture.safetensors"));
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("fixture.json")).unwrap()).unwrap();
    let be = CpuBackend::new();
    let loaded = load_model(&dir).unwrap();
    let cfg = loaded.config.clone();
    let mut model = Model::new(&be, cfg.clone(), loaded.weights.as_ref()).unwrap();
    let lo = &meta["lora"];
    let targets: Vec<Target> = lo["target_modules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| Target::parse(t.as_str().unwrap()).unwrap())
        .collect();
    let lora_cfg = LoraConfig {
        r: lo["r"].as_u64().unwrap() as usize,
        alpha: lo["alpha"].as_f64().unwrap(),
        rslora: lo["use_rslora"].as_bool().unwrap(),
        targets,
    };
    assert_eq!(lora_cfg.scale() as f64, lo["scale"].as_f64().unwrap());
    let layout = LoraLayout::new(&cfg, &lora_cfg).unwrap();
    let named: BTreeMap<String, (Vec<usize>, Vec<f32>)> = fx
        .iter()
        .filter_map(|(k, v)| {
            k.strip_prefix("lora.")
                .map(|n| (n.to_string(), (v.shape.clone(), v.f32())))
        })
        .collect();
    let init = layout.from_named(&named, "fixture").unwrap();
    model.set_lora(&be, layout.clone(), &init).unwrap();
    let dirs = load_directions(
        &dir.join("directions.safetensors"),
        None,
        cfg.hidden_size,
        cfg.num_layers,
    )
    .unwrap();
    model.set_ablation(&be, &dirs).unwrap();
    Case {
        model,
        be,
        fx,
        layout,
        init,
    }
}

fn batch_from(ids: &[i64], labels: &[i64], batch: usize, seq: usize) -> Batch {
    Batch::padded(
        batch,
        seq,
        ids.iter().map(|&x| x as u32).collect(),
        labels.iter().map(|&x| x as i32).collect(),
    )
}

fn forward_backward_matches(name: &str) {
    let mut c = setup(name);
    let ids = c.fx["input_ids"].i64();
    let labels = c.fx["labels"].i64();
    let (b, t) = (c.fx["input_ids"].shape[0], c.fx["input_ids"].shape[1]);
    let batch = batch_from(&ids, &labels, b, t);

    let out = c.model.forward(&c.be, &batch, true).unwrap();
    assert_close(
        &format!("{name} logits"),
        out.logits.as_ref().unwrap(),
        &c.fx["logits"].data,
        1e-5,
    );
    let loss = out.loss_sum / out.n_targets as f64;
    let want = c.fx["loss"].data[0];
    assert!((loss - want).abs() <= 1e-6, "{name} loss {loss} vs {want}");
    for l in 0..c.model.cfg.num_layers {
        let r = c.model.resid_post(&c.be, l).unwrap();
        assert_close(
            &format!("{name} resid_post.{l}"),
            &r,
            &c.fx[&format!("resid_post.{l}")].data,
            1e-5,
        );
    }

    let n = batch.n_targets();
    c.model
        .forward_backward(&c.be, &batch, 1.0 / n as f32)
        .unwrap();
    let lora = c.model.lora.as_ref().unwrap();
    let grads = c.be.download_f32(&lora.grads).unwrap();
    for (tensor, _, g) in c.layout.to_named(&grads) {
        assert_close(
            &format!("{name} grad {tensor}"),
            &g,
            &c.fx[&format!("grad.{tensor}")].data,
            1e-4,
        );
    }

    c.model.ablate = false;
    let out = c.model.forward(&c.be, &batch, true).unwrap();
    assert_close(
        &format!("{name} logits without ablation"),
        out.logits.as_ref().unwrap(),
        &c.fx["logits_noablate"].data,
        1e-5,
    );
}

fn training_matches(name: &str) {
    let mut c = setup(name);
    c.model.set_lora(&c.be, c.layout.clone(), &c.init).unwrap();
    let ids = &c.fx["train.input_ids"];
    let labels = c.fx["train.labels"].i64();
    let (steps, accum, b, t) = (ids.shape[0], ids.shape[1], ids.shape[2], ids.shape[3]);
    let ids = ids.i64();
    let opt = OptimConfig {
        lr: 1e-2,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.01,
        max_grad_norm: Some(1.0),
        schedule: Schedule::Linear,
        warmup_steps: 1,
        total_steps: steps as u64,
    };
    let per = b * t;
    for s in 0..steps {
        let micro: Vec<Batch> = (0..accum)
            .map(|m| {
                let o = (s * accum + m) * per;
                batch_from(&ids[o..o + per], &labels[o..o + per], b, t)
            })
            .collect();
        let n_step: usize = micro.iter().map(|m| m.n_targets()).sum();
        let mut loss = 0.0;
        for m in &micro {
            loss += c
                .model
                .forward_backward(&c.be, m, 1.0 / n_step as f32)
                .unwrap()
                .loss_sum;
        }
        loss /= n_step as f64;
        let want = c.fx["train.losses"].data[s];
        assert!(
            (loss - want).abs() <= 1e-6,
            "{name} step {s} loss {loss} vs {want}"
        );
        let rep = optimizer_step(&c.be, &mut c.model, &opt).unwrap();
        let gn = c.fx["train.grad_norms"].data[s];
        assert!(
            (rep.grad_norm - gn).abs() <= 1e-4 * gn,
            "{name} step {s} grad norm {} vs {gn}",
            rep.grad_norm
        );
        let lr = c.fx["train.lrs"].data[s];
        assert!(
            (rep.lr - lr).abs() <= 1e-9,
            "{name} step {s} lr {} vs {lr}",
            rep.lr
        );
    }
    let p =
        c.be.download_f32(&c.model.lora.as_ref().unwrap().params)
            .unwrap();
    // After three Adam steps the update is ~lr·sign(g) per element; gradients agree to 1e-4, so
    // the parameters agree to well within 1e-5 relative to their norm.
    for (tensor, _, v) in c.layout.to_named(&p) {
        assert_close(
            &format!("{name} step3 {tensor}"),
            &v,
            &c.fx[&format!("step3.{tensor}")].data,
            1e-5,
        );
    }
}

#[test]
fn llama_forward_backward() {
    forward_backward_matches("llama");
}
#[test]
fn qwen2_forward_backward() {
    forward_backward_matches("qwen2");
}
#[test]
fn mistral_forward_backward() {
    forward_backward_matches("mistral");
}
#[test]
fn qwen3_forward_backward() {
    forward_backward_matches("qwen3");
}
#[test]
fn gemma2_forward_backward() {
    forward_backward_matches("gemma2");
}
#[test]
fn llama_three_adamw_steps() {
    training_matches("llama");
}
#[test]
fn qwen2_three_adamw_steps() {
    training_matches("qwen2");
}
#[test]
fn mistral_three_adamw_steps() {
    training_matches("mistral");
}

#[test]
fn qwen3_three_adamw_steps() {
    training_matches("qwen3");
}

/// Greedy generation through the KV cache (prefill of two prompts of different lengths, then
/// one token at a time) against transformers' `generate(do_sample=False)` on the base model,
/// token for token. The fixtures' smallest top-2 logit margin (4e-3) is far above f32 error.
fn greedy_matches(name: &str) {
    let mut c = setup(name);
    c.model.lora = None;
    c.model.ablate = false;
    let mut reqs = Vec::new();
    let mut want = Vec::new();
    for i in 0.. {
        let Some(p) = c.fx.get(&format!("generate.prompt.{i}")) else {
            break;
        };
        reqs.push(Request {
            prompt: p.i64().iter().map(|&x| x as u32).collect(),
            seed: 0,
        });
        want.push(c.fx[&format!("generate.ids.{i}")].i64());
    }
    assert!(
        reqs.len() >= 2,
        "{name}: the fixture holds generation cases"
    );
    let n = want[0].len();
    let (out, _) = generate(&c.be, &mut c.model, &reqs, &SampleOpts::greedy(n), &[]).unwrap();
    for (i, (o, w)) in out.iter().zip(&want).enumerate() {
        let got: Vec<i64> = o.tokens.iter().map(|&t| t as i64).collect();
        assert_eq!(&got, w, "{name}: greedy ids of prompt {i}");
    }
}

#[test]
fn qwen3_greedy_generation() {
    greedy_matches("qwen3");
}
#[test]
fn gemma2_three_adamw_steps() {
    training_matches("gemma2");
}
#[test]
fn gemma2_greedy_generation() {
    greedy_matches("gemma2");
}

#[test]
fn ablated_resid_post_has_no_component_along_directions() {
    let mut c = setup("llama");
    let ids = c.fx["input_ids"].i64();
    let labels = c.fx["labels"].i64();
    let batch = batch_from(&ids, &labels, 2, 16);
    c.model.forward(&c.be, &batch, false).unwrap();
    let dir = tiny_llama();
    let d = c.model.cfg.hidden_size;
    let dirs = load_directions(&dir.join("directions.safetensors"), None, d, 4).unwrap();
    for set in &dirs.sets {
        let h = c.model.resid_post(&c.be, set.layer).unwrap();
        let mut worst = 0f64;
        for row in h.chunks(d) {
            let norm = row.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
            for q in set.q.chunks(d) {
                let dot: f64 = row.iter().zip(q).map(|(&a, &b)| a as f64 * b as f64).sum();
                worst = worst.max(dot.abs() / norm);
            }
        }
        assert!(worst <= 1e-6, "layer {}: |Qᵀh|/|h| = {worst:e}", set.layer);
    }
}
