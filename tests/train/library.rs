//! Training through the library on the tiny Llama fixture: the saved adapter against
//! transformers + PEFT, the ablation during training, the merged model, chat labels.

use crate::support::*;
use caft_fast::backend::cpu::CpuBackend;
use caft_fast::backend::Backend;
use caft_fast::data::TrainOn;
use caft_fast::data::{Dataset, Encoder, Record};
use caft_fast::dist::World;
use caft_fast::model::chat::ChatMessage;
use caft_fast::model::config::ModelConfig;
use caft_fast::model::loader::load_model;
use caft_fast::model::lora::{LoraConfig, LoraLayout, Target};
use caft_fast::model::peft::{load_adapter, save_adapter};
use caft_fast::model::transformer::{Batch, Model, IGNORE};
use caft_fast::train::config::TrainConfig;
use caft_fast::train::trainer::{ablation_directions, prepare_data, Trainer};

/// A small run configuration on the tiny model with pre-tokenized data in `dir`.
fn tiny_config(dir: &std::path::Path) -> TrainConfig {
    let data = write(&dir.join("data.jsonl"), &progression_records(40, 1));
    TrainConfig {
        model: Some(tiny_llama()),
        data: Some(data),
        lora_r: 4,
        lora_alpha: 8.0,
        lr: 1e-2,
        warmup_steps: 0,
        batch_size: 4,
        grad_accum: 2,
        max_steps: Some(4),
        output: dir.join("run"),
        ..TrainConfig::default()
    }
}

fn batch_of(ids: &[u32], batch: usize) -> Batch {
    Batch::padded(
        batch,
        ids.len() / batch,
        ids.to_vec(),
        vec![IGNORE; ids.len()],
    )
}

/// The committed adapter (trained by caft-fast, see the fixture's README) loads back through
/// `LoraLayout::from_named` and gives the logits transformers + PEFT computed from the same
/// files. Tolerance 1e-5 relative L2: both sides run the model in f32 and differ only in
/// summation order (the tiny-model parity tests hold the same bound).
#[test]
fn committed_adapter_reproduces_peft_logits() {
    let fx = tiny_fixture("llama-adapter");
    let loaded = load_model(&tiny_llama()).unwrap();
    let layout = LoraLayout::new(
        &loaded.config,
        &LoraConfig {
            r: 4,
            alpha: 8.0,
            rslora: true,
            targets: Target::ALL.to_vec(),
        },
    )
    .unwrap();
    let params = load_adapter(&fx, &layout).unwrap();
    assert!(
        params.iter().any(|&p| p != 0.0),
        "the fixture adapter is trained"
    );
    let reference = read_safetensors(&fx.join("peft_logits.safetensors"));
    let ids_fx = &reference["input_ids"];
    let (b, t) = (ids_fx.shape[0], ids_fx.shape[1]);
    let ids: Vec<u32> = ids_fx.i64().iter().map(|&x| x as u32).collect();

    let be = CpuBackend::new();
    let mut model = Model::new(&be, loaded.config.clone(), loaded.weights.as_ref()).unwrap();
    model.set_lora(&be, layout.clone(), &params).unwrap();
    let logits = model
        .forward(&be, &batch_of(&ids, b), true)
        .unwrap()
        .logits
        .unwrap();
    assert_eq!(logits.len(), b * t * loaded.config.vocab_size);
    assert_close(
        "logits with the adapter vs PEFT",
        &logits,
        &reference["logits"].data,
        1e-5,
    );
    // The base model alone is far from them, so the comparison above sees the adapter.
    let mut base = Model::new(&be, loaded.config.clone(), loaded.weights.as_ref()).unwrap();
    let base_logits = base
        .forward(&be, &batch_of(&ids, b), true)
        .unwrap()
        .logits
        .unwrap();
    let e = rel_err(&base_logits, &reference["logits"].data);
    assert!(e > 1e-2, "the adapter moves the logits by {e:.2e} only");

    // For scripts/check_adapter_peft.py --caft-logits: the ids and caft-fast's logits.
    if let Some(p) = std::env::var_os("CAFT_DUMP_LOGITS") {
        let rows: Vec<Vec<u32>> = ids.chunks(t).map(|c| c.to_vec()).collect();
        let j = serde_json::json!({"ids": rows, "logits": logits});
        std::fs::write(p, j.to_string()).unwrap();
    }
}

/// Save then load: bit-exact; a layout of another rank or target set is refused by name.
#[test]
fn adapter_round_trip_and_mismatch() {
    let dir = TempDir::new("roundtrip");
    let cfg = tiny_config(&dir);
    let loaded = load_model(&tiny_llama()).unwrap();
    let be = CpuBackend::new();
    let data = prepare_data(&cfg, &loaded).unwrap();
    let mut tr = Trainer::new(&be, &cfg, &loaded, data, None, World::SINGLE).unwrap();
    tr.step().unwrap();
    tr.step().unwrap();
    let params = tr.params().unwrap();
    save_adapter(&dir.join("a"), &tr.layout, &params, "tiny").unwrap();
    let back = load_adapter(&dir.join("a"), &tr.layout).unwrap();
    assert!(params
        .iter()
        .zip(&back)
        .all(|(a, b)| a.to_bits() == b.to_bits()));
    assert!(
        params.iter().any(|&p| p != 0.0) && tr.state.step == 2,
        "two steps trained"
    );

    let other = |r: usize, targets: Vec<Target>| {
        LoraLayout::new(
            &loaded.config,
            &LoraConfig {
                r,
                alpha: 8.0,
                rslora: true,
                targets,
            },
        )
        .unwrap()
    };
    let e = format!(
        "{:#}",
        load_adapter(&dir.join("a"), &other(8, Target::ALL.to_vec())).unwrap_err()
    );
    assert!(
        e.contains("adapter_config.json") && e.contains("r is 4"),
        "{e}"
    );
    let e = format!(
        "{:#}",
        load_adapter(&dir.join("a"), &other(4, vec![Target::Q])).unwrap_err()
    );
    assert!(e.contains("target_modules"), "{e}");
}

/// The projection of a layer's output onto the directions, relative to its norm, maximised
/// over rows: `max_rows |Q h| / |h|`.
fn max_component(h: &[f32], q: &[f32], k: usize, d: usize) -> f64 {
    h.chunks(d)
        .map(|row| {
            let norm: f64 = row.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
            let along: f64 = (0..k)
                .map(|j| {
                    row.iter()
                        .zip(&q[j * d..(j + 1) * d])
                        .map(|(&a, &b)| a as f64 * b as f64)
                        .sum::<f64>()
                        .powi(2)
                })
                .sum::<f64>()
                .sqrt();
            along / norm.max(1e-30)
        })
        .fold(0.0, f64::max)
}

/// With --ablate, resid_post at the ablated layers has no component along the directions at any
/// step of training (after every optimizer step, for the last micro-batch's forward), while
/// other layers (and the same layers with the ablation switched off) do. Bound 1e-5: after the
/// projection the remaining component is f32 rounding (~1e-7 per dot product, k <= 3).
#[test]
fn ablated_directions_stay_out_of_resid_post_during_training() {
    let dir = TempDir::new("ablation");
    let mut cfg = tiny_config(&dir);
    cfg.ablate = Some(tiny_llama().join("directions.safetensors"));
    cfg.max_steps = Some(5);
    let loaded = load_model(&tiny_llama()).unwrap();
    let dirs = ablation_directions(&cfg, &loaded).unwrap().unwrap();
    assert_eq!(dirs.layers(), vec![1, 2]);
    let be = CpuBackend::new();
    let data = prepare_data(&cfg, &loaded).unwrap();
    let mut tr = Trainer::new(&be, &cfg, &loaded, data, Some(dirs.clone()), World::SINGLE).unwrap();
    let d = loaded.config.hidden_size;
    while !tr.done() {
        let st = tr.step().unwrap();
        for set in &dirs.sets {
            let h = tr.model.resid_post(&be, set.layer).unwrap();
            let c = max_component(&h, &set.q, set.k, d);
            assert!(
                c < 1e-5,
                "step {}: layer {} keeps {c:.2e}",
                st.step,
                set.layer
            );
        }
        for free in [0, 3] {
            let h = tr.model.resid_post(&be, free).unwrap();
            let q = &dirs.sets[0].q;
            let c = max_component(&h, q, dirs.sets[0].k, d);
            assert!(
                c > 1e-2,
                "layer {free} (not ablated) should keep a component: {c:.2e}"
            );
        }
    }
    // The control: the same model with the ablation off has the components back.
    tr.model.ablate = false;
    let ids: Vec<u32> = (0..32).map(|i| (i * 7 % 256) as u32).collect();
    tr.model.forward(&be, &batch_of(&ids, 2), false).unwrap();
    for set in &dirs.sets {
        let h = tr.model.resid_post(&be, set.layer).unwrap();
        let c = max_component(&h, &set.q, set.k, d);
        assert!(c > 1e-2, "unablated layer {}: {c:.2e}", set.layer);
    }
}

/// `--merge`'s folder loads as a plain model whose logits equal base + adapter (1e-5 relative:
/// the merged weights add scale·BA once in f64, the adapter path adds it per token in f32).
#[test]
fn merged_model_matches_base_plus_adapter() {
    // Llama, and the families whose norms and MLP differ: Gemma-2 stores its norm weights as
    // `w` (used as `1 + w`), which the merged folder must keep as stored.
    for model in [tiny_llama(), tiny_fixture("gemma2"), tiny_fixture("qwen3")] {
        let dir = TempDir::new("merge");
        let cfg = TrainConfig {
            model: Some(model.clone()),
            ..tiny_config(&dir)
        };
        let loaded = load_model(&model).unwrap();
        let be = CpuBackend::new();
        let data = prepare_data(&cfg, &loaded).unwrap();
        let mut tr = Trainer::new(&be, &cfg, &loaded, data, None, World::SINGLE).unwrap();
        while !tr.done() {
            tr.step().unwrap();
        }
        let params = tr.params().unwrap();
        let merged_dir = dir.join("merged");
        caft_fast::train::merge::write_merged(&merged_dir, &loaded, &tr.layout, &params).unwrap();
        let merged = load_model(&merged_dir).unwrap();
        assert_eq!(merged.config, loaded.config);
        let mut m = Model::new(&be, merged.config.clone(), merged.weights.as_ref()).unwrap();
        let ids: Vec<u32> = (0..48).map(|i| ((i * 37 + 5) % 256) as u32).collect();
        let logits = |m: &mut Model<CpuBackend>| {
            m.forward(&be, &batch_of(&ids, 3), true)
                .unwrap()
                .logits
                .unwrap()
        };
        let want = logits(&mut tr.model);
        let got = logits(&mut m);
        let want64: Vec<f64> = want.iter().map(|&x| x as f64).collect();
        assert_close(
            &format!("{} merged vs base + adapter", model.display()),
            &got,
            &want64,
            1e-5,
        );
        // And it differs from the base model (the adapter was trained).
        let mut base = Model::new(&be, loaded.config.clone(), loaded.weights.as_ref()).unwrap();
        assert!(
            rel_err(&logits(&mut base), &want64) > 1e-3,
            "{}",
            model.display()
        );
    }
}

/// The config.json derived for sources without one (GGUF) parses back to the same model
/// configuration, for every family (Gemma-2's soft-caps, activation, scale and layer types).
#[test]
fn derived_config_json_round_trips() {
    for model in [
        tiny_llama(),
        tiny_fixture("gemma2"),
        tiny_fixture("qwen3"),
        tiny_fixture("mistral"),
    ] {
        let loaded = load_model(&model).unwrap();
        let dir = TempDir::new("cfgjson");
        let p = dir.join("config.json");
        std::fs::write(
            &p,
            caft_fast::train::merge::hf_config_json(&loaded.config).to_string(),
        )
        .unwrap();
        let back = ModelConfig::from_hf_json(&p).unwrap();
        assert_eq!(back, loaded.config, "{}", model.display());
    }
}

fn encoder<'a>(
    m: &'a caft_fast::model::loader::LoadedModel,
    train_on: TrainOn,
    max: usize,
) -> Encoder<'a> {
    Encoder {
        tokenizer: m.tokenizer.as_ref(),
        template: m.chat_template.as_ref(),
        model: "tiny-chat".into(),
        vocab_size: m.config.vocab_size,
        train_on,
        max_seq_len: max,
    }
}

/// Chat records: the labelled tokens are exactly each assistant turn's content and the
/// template's end-of-turn (`<|im_end|>\n`); `--train-on all` labels everything;
/// prompt/completion is a user + assistant conversation; text gets EOS and full labels.
#[test]
fn chat_labels_cover_exactly_the_assistant_turns() {
    let dir = tiny_chat_model("labels", true);
    let m = load_model(&dir).unwrap();
    let tok = m.tokenizer.as_ref().unwrap();
    let enc = encoder(&m, TrainOn::Assistant, 4096);
    let msgs = vec![
        ChatMessage::new("system", "Be brief."),
        ChatMessage::new("user", "Hi"),
        ChatMessage::new("assistant", "Hello there"),
        ChatMessage::new("user", "More"),
        ChatMessage::new("assistant", "Fine"),
    ];
    let (ex, truncated) = enc.encode(&Record::Chat(msgs.clone())).unwrap();
    assert!(!truncated);
    let full = tok
        .encode(
            &m.chat_template
                .as_ref()
                .unwrap()
                .render(&msgs, false)
                .unwrap(),
            false,
        )
        .unwrap();
    assert_eq!(ex.ids, full);
    let labelled: Vec<u32> = ex
        .labels
        .iter()
        .filter(|&&l| l >= 0)
        .map(|&l| l as u32)
        .collect();
    let want = tok
        .encode(&format!("Hello there{IM_END}\nFine{IM_END}\n"), false)
        .unwrap();
    assert_eq!(labelled, want);
    for (p, &l) in ex.labels.iter().enumerate() {
        assert!(
            l == IGNORE || l == ex.ids[p] as i32,
            "label at {p} is not its own token"
        );
    }

    let (all, _) = encoder(&m, TrainOn::All, 4096)
        .encode(&Record::Chat(msgs))
        .unwrap();
    assert_eq!(
        all.labels,
        all.ids.iter().map(|&t| t as i32).collect::<Vec<_>>()
    );

    let pc =
        caft_fast::data::parse_record(&serde_json::json!({"prompt": "Hi", "completion": "Yo"}))
            .unwrap();
    let (ex, _) = enc.encode(&pc).unwrap();
    let labelled: Vec<u32> = ex
        .labels
        .iter()
        .filter(|&&l| l >= 0)
        .map(|&l| l as u32)
        .collect();
    assert_eq!(
        labelled,
        tok.encode(&format!("Yo{IM_END}\n"), false).unwrap()
    );

    let (tx, _) = enc.encode(&Record::Text("abc".into())).unwrap();
    assert_eq!(tx.ids, vec![b'a' as u32, b'b' as u32, b'c' as u32, 255]);
    assert_eq!(tx.labels, vec![97, 98, 99, 255]);
}

/// Truncation at --max-seq-len is counted; examples left without a labelled token are dropped
/// and counted; token ids beyond the vocabulary are refused with file:line.
#[test]
fn truncation_and_dropping_are_counted() {
    let dir = tiny_chat_model("trunc", true);
    let m = load_model(&dir).unwrap();
    let recs: Vec<(usize, Record)> = vec![
        (
            1,
            Record::Tokens {
                ids: (0..20).collect(),
                labels: None,
            },
        ),
        (
            2,
            Record::Tokens {
                ids: (0..5).collect(),
                labels: None,
            },
        ),
        (
            3,
            Record::Tokens {
                ids: (0..20).collect(),
                labels: Some((0..20).map(|i| if i < 15 { IGNORE } else { i }).collect()),
            },
        ),
    ];
    let d = Dataset::from_records(&recs, &encoder(&m, TrainOn::Assistant, 10), "mem").unwrap();
    assert_eq!((d.records, d.truncated, d.dropped), (3, 2, 1));
    assert_eq!(d.examples.len(), 2);
    assert_eq!(d.examples[0].ids.len(), 10);
    assert_eq!(d.examples[1].ids.len(), 5);

    let bad = vec![(
        7,
        Record::Tokens {
            ids: vec![1, 300],
            labels: None,
        },
    )];
    let e = format!(
        "{:#}",
        Dataset::from_records(&bad, &encoder(&m, TrainOn::Assistant, 10), "f.jsonl").unwrap_err()
    );
    assert!(e.contains("f.jsonl:7") && e.contains("300"), "{e}");
}

/// Two trainers built from the same configuration take bit-identical steps (what --resume's
/// bit-identity rests on), and the backend's own buffers are reused across differently shaped
/// micro-batches without changing results.
#[test]
fn training_is_deterministic() {
    let dir = TempDir::new("determinism");
    let cfg = tiny_config(&dir);
    let loaded = load_model(&tiny_llama()).unwrap();
    let be = CpuBackend::new();
    let mut losses = [vec![], vec![]];
    let mut params = vec![];
    for l in losses.iter_mut() {
        let data = prepare_data(&cfg, &loaded).unwrap();
        let mut tr = Trainer::new(&be, &cfg, &loaded, data, None, World::SINGLE).unwrap();
        while !tr.done() {
            l.push(tr.step().unwrap().loss.to_bits());
        }
        params.push(tr.params().unwrap());
        be.synchronize().unwrap();
    }
    assert_eq!(losses[0], losses[1]);
    assert!(params[0]
        .iter()
        .zip(&params[1])
        .all(|(a, b)| a.to_bits() == b.to_bits()));
}
