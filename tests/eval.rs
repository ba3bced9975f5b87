//! `caft-fast eval`: multiple-choice scoring against a brute-force forward pass per prompt, the
//! held-out loss against a cross-entropy computed by hand from the logits, the data errors,
//! and the double multiple-choice task generator.
//!
//! The model is the tiny Llama fixture with the byte-level chat tokenizer of tests/support
//! (bytes 0..=253 are ids 0..=253, so tokens can be written down by hand).

mod support;
use caft_fast::backend::cpu::CpuBackend;
use caft_fast::data::{read_jsonl, Record};
use caft_fast::eval::loss::{self, LossOptions};
use caft_fast::eval::mc::{self, McItem, McPrompt};
use caft_fast::eval::task::{self, Split, TaskConfig, TaskItem, TEST_WORDS, TRAIN_WORDS};
use caft_fast::model::chat::ChatMessage;
use caft_fast::model::loader::load_model;
use caft_fast::model::spec::ModelSpec;
use caft_fast::model::transformer::{Batch, Model, IGNORE};
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use support::*;

const IM_START_ID: u32 = 254;
const IM_END_ID: u32 = 255;

/// The next-token logits after `ids`, from one unpadded forward pass of `ids` alone.
fn last_logits(be: &CpuBackend, model: &mut Model<CpuBackend>, ids: &[u32]) -> Vec<f32> {
    let out = model
        .forward(
            be,
            &Batch::padded(1, ids.len(), ids.to_vec(), vec![IGNORE; ids.len()]),
            true,
        )
        .unwrap();
    let v = model.cfg.vocab_size;
    out.logits.unwrap()[(ids.len() - 1) * v..].to_vec()
}

fn log_softmax_at(z: &[f32], t: usize) -> f64 {
    let m = z.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
    let lse = m + z.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln();
    z[t] as f64 - lse
}

/// One item to construct: a prompt, options starting with the given letters, the option
/// declared correct, and its split.
struct Plan {
    prompt: McPrompt,
    letters: Vec<u8>,
    /// Rank (0 = highest logit) among `letters`' logits of the option declared correct.
    answer_rank: usize,
    split: Option<&'static str>,
}

fn json_line(item: &McItem) -> String {
    let mut v = serde_json::json!({
        "id": item.id,
        "options": item.options,
        "answer": item.answer,
    });
    match &item.prompt {
        McPrompt::Text(p) => v["prompt"] = p.clone().into(),
        McPrompt::Chat(m) => v["messages"] = serde_json::to_value(m).unwrap(),
    }
    if item.split != mc::DEFAULT_SPLIT {
        v["split"] = item.split.clone().into();
    }
    v.to_string()
}

/// Prompt token ids as the tiny tokenizer gives them, written down independently: ChatML
/// with the special ids and one id per byte.
fn prompt_ids_by_hand(p: &McPrompt) -> Vec<u32> {
    let bytes = |s: &str| s.bytes().map(u32::from).collect::<Vec<u32>>();
    match p {
        McPrompt::Text(t) => bytes(t),
        McPrompt::Chat(msgs) => {
            let mut ids = Vec::new();
            for m in msgs {
                ids.push(IM_START_ID);
                ids.extend(bytes(&format!("{}\n{}", m.role, m.content)));
                ids.push(IM_END_ID);
                ids.push(b'\n' as u32);
            }
            ids.push(IM_START_ID);
            ids.extend(bytes("assistant\n"));
            ids
        }
    }
}

/// Items whose correct answers are known from the model itself: for each prompt, the
/// next-token logits of a lone forward pass rank candidate letters; each option starts with
/// one letter, and the option declared correct is the top-ranked one (the model must get it
/// right) or a lower-ranked one (the model must get it wrong). The scorer, batching prompts of
/// different lengths with right padding, must reproduce every logit, log-probability,
/// prediction and per-split count.
#[test]
fn mc_predictions_and_scores_match_brute_force() {
    let dir = tiny_chat_model("eval-mc", true);
    let loaded = load_model(&dir).unwrap();
    let be = CpuBackend::new();
    let mut model = Model::new(&be, loaded.config.clone(), loaded.weights.as_ref()).unwrap();
    let chat = |s: &str| McPrompt::Chat(vec![ChatMessage::new("user", s)]);
    let chat2 = McPrompt::Chat(vec![
        ChatMessage::new("system", "Be brief."),
        ChatMessage::new("user", "Name a colour."),
    ]);
    let plans = [
        Plan {
            prompt: McPrompt::Text("The quick brown fox".into()),
            letters: b"abcd".to_vec(),
            answer_rank: 0,
            split: Some("alpha"),
        },
        Plan {
            prompt: McPrompt::Text("Hi".into()),
            letters: b"xyz".to_vec(),
            answer_rank: 0,
            split: Some("alpha"),
        },
        Plan {
            prompt: chat("Which one?"),
            letters: b"AB".to_vec(),
            answer_rank: 1,
            split: Some("alpha"),
        },
        Plan {
            prompt: McPrompt::Text("A longer prompt, so that batches need padding: 12345".into()),
            letters: b"pqrst".to_vec(),
            answer_rank: 2,
            split: Some("beta"),
        },
        Plan {
            prompt: chat2,
            letters: b"mno".to_vec(),
            answer_rank: 0,
            split: Some("beta"),
        },
        Plan {
            prompt: McPrompt::Text("Numbers: 7 8".into()),
            letters: b"ef".to_vec(),
            answer_rank: 1,
            split: None,
        },
    ];
    // Build the items from brute-force logits.
    let mut items = Vec::new();
    let mut truth = Vec::new();
    for (k, p) in plans.iter().enumerate() {
        let ids = prompt_ids_by_hand(&p.prompt);
        let z = last_logits(&be, &mut model, &ids);
        let mut ranked = p.letters.clone();
        ranked.sort_by(|a, b| z[*b as usize].total_cmp(&z[*a as usize]));
        // The options in a fixed order unrelated to rank: by letter.
        let options: Vec<String> = p
            .letters
            .iter()
            .map(|&c| format!("{}{}", c as char, "-rest of the option"))
            .collect();
        let answer = p
            .letters
            .iter()
            .position(|&c| c == ranked[p.answer_rank])
            .unwrap();
        let top = p.letters.iter().position(|&c| c == ranked[0]).unwrap();
        items.push(McItem {
            id: format!("q{k}"),
            line: 0,
            prompt: p.prompt.clone(),
            options,
            answer,
            split: p.split.unwrap_or(mc::DEFAULT_SPLIT).to_string(),
        });
        truth.push((ids, z, top));
    }
    let scratch = TempDir::new("eval-mc-data");
    let data = scratch.join("mc.jsonl");
    let text: Vec<String> = items.iter().map(json_line).collect();
    // A blank line in the middle: skipped, and line numbers still count it.
    write(
        &data,
        &format!("{}\n\n{}\n", text[..2].join("\n"), text[2..].join("\n")),
    );
    let read = mc::read_items(&data).unwrap();
    assert_eq!(
        read.iter().map(|i| i.line).collect::<Vec<_>>(),
        vec![1, 2, 4, 5, 6, 7]
    );
    let spec = ModelSpec {
        model: Some(dir.to_path_buf()),
        ..ModelSpec::default()
    };
    for batch_size in [1, 2, 4] {
        let report =
            mc::evaluate_on(&be, &spec, &loaded, &data, &read, batch_size, |_, _| {}).unwrap();
        for (k, (r, (item, (ids, z, top)))) in report
            .items
            .iter()
            .zip(items.iter().zip(&truth))
            .enumerate()
        {
            assert_eq!(r.id, item.id);
            let enc = mc::encode_item(
                &read[k],
                loaded.tokenizer.as_ref().unwrap(),
                loaded.chat_template.as_ref(),
            )
            .unwrap();
            assert_eq!(&enc.prompt_ids, ids, "{}: prompt tokens", r.id);
            let letters: Vec<u32> = item
                .options
                .iter()
                .map(|o| o.as_bytes()[0] as u32)
                .collect();
            assert_eq!(r.option_tokens, letters, "{}: first tokens", r.id);
            assert_eq!(r.predicted, *top, "{} (batch {batch_size})", r.id);
            assert_eq!(r.correct, *top == item.answer);
            for (i, &t) in letters.iter().enumerate() {
                // Padded batches of other shapes vs one unpadded pass: the same f32 math in
                // another blocking; 1e-4 is ~100x the differences seen, far below the logit
                // gaps that decide the predictions.
                let want = z[t as usize];
                assert!(
                    (r.logits[i] - want).abs() <= 1e-4 * want.abs().max(1.0),
                    "{} option {i}: logit {} vs brute force {want}",
                    r.id,
                    r.logits[i]
                );
                let lp = log_softmax_at(z, t as usize);
                assert!(
                    (r.log_probs[i] - lp).abs() <= 1e-4,
                    "{} option {i}: log-prob {} vs {lp}",
                    r.id,
                    r.log_probs[i]
                );
            }
            let p: Vec<f64> = r.log_probs.iter().map(|l| l.exp()).collect();
            let want_p = p[item.answer] / p.iter().sum::<f64>();
            assert!((r.p_answer - want_p).abs() < 1e-9);
        }
        // alpha: ranks 0, 0, 1 -> 2 of 3; beta: ranks 2, 0 -> 1 of 2; all: rank 1 -> 0 of 1.
        let counts: Vec<(String, usize, usize)> = report
            .splits
            .iter()
            .map(|s| (s.split.clone(), s.n, s.correct))
            .collect();
        assert_eq!(
            counts,
            vec![
                ("alpha".to_string(), 3, 2),
                ("beta".to_string(), 2, 1),
                ("all".to_string(), 1, 0)
            ]
        );
        assert_eq!((report.overall.n, report.overall.correct), (6, 3));
        assert!((report.overall.accuracy - 0.5).abs() < 1e-12);
        assert!((report.splits[0].accuracy - 2.0 / 3.0).abs() < 1e-12);
        let table = mc::format_table(&report);
        assert!(
            table.contains("alpha") && table.contains("overall"),
            "{table}"
        );
    }
}

fn err_of<T: std::fmt::Debug>(r: anyhow::Result<T>) -> String {
    format!("{:#}", r.unwrap_err())
}

/// Malformed lines, missing fields, out-of-range answers, empty options, a conversation not
/// ending with the user, an empty file: each error names the file and line.
#[test]
fn mc_data_errors_name_file_and_line() {
    let d = TempDir::new("eval-mc-errors");
    let good = r#"{"prompt": "x", "options": ["a", "b"], "answer": 1}"#;
    let cases: &[(&str, &str)] = &[
        (r#"{"prompt": "x", "options": ["a", "b"]"#, "malformed JSON"),
        (r#"{"prompt": "x", "answer": 0}"#, "missing \"options\""),
        (
            r#"{"prompt": "x", "options": ["a", "b"]}"#,
            "missing \"answer\"",
        ),
        (r#"{"options": ["a", "b"], "answer": 0}"#, "\"messages\""),
        (
            r#"{"prompt": "x", "options": ["a", "b"], "answer": 2}"#,
            "out of range",
        ),
        (
            r#"{"prompt": "x", "options": ["a", "b"], "answer": -1}"#,
            "not an option index",
        ),
        (
            r#"{"prompt": "x", "options": ["a"], "answer": 0}"#,
            "at least two",
        ),
        (
            r#"{"prompt": "x", "options": ["a", ""], "answer": 0}"#,
            "options[1] is empty",
        ),
        (
            r#"{"prompt": "x", "options": ["a", 3], "answer": 0}"#,
            "options[1]",
        ),
        (
            r#"{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "options": ["a", "b"], "answer": 0}"#,
            "end with the user",
        ),
        (
            r#"{"messages": [{"role": "robot", "content": "q"}], "options": ["a", "b"], "answer": 0}"#,
            "robot",
        ),
        (
            r#"{"messages": [{"role": "user"}], "options": ["a", "b"], "answer": 0}"#,
            "\"content\"",
        ),
        (
            r#"{"prompt": "x", "messages": [], "options": ["a", "b"], "answer": 0}"#,
            "not both",
        ),
        (
            r#"{"prompt": "x", "options": ["a", "b"], "answer": 0, "split": 3}"#,
            "\"split\"",
        ),
    ];
    for (k, (bad, needle)) in cases.iter().enumerate() {
        let p = d.join(format!("bad{k}.jsonl"));
        write(&p, &format!("{good}\n\n{bad}\n{good}\n"));
        let e = err_of(mc::read_items(&p));
        let at = format!("{}:3", p.display());
        assert!(e.contains(&at), "{bad}: the error should name {at}: {e}");
        assert!(
            e.contains(needle),
            "{bad}: the error should say {needle:?}: {e}"
        );
    }
    for (name, text) in [("empty.jsonl", ""), ("blank.jsonl", "\n  \n")] {
        let p = d.join(name);
        write(&p, text);
        let e = err_of(mc::read_items(&p));
        assert!(
            e.contains(&p.display().to_string()) && e.contains("no items"),
            "{e}"
        );
    }
    assert!(err_of(mc::read_items(&d.join("missing.jsonl"))).contains("missing.jsonl"));
}

/// Options that share their first token cannot be scored apart: refused, naming the line;
/// a chat item on a model without a chat template is refused too.
#[test]
fn mc_shared_first_tokens_and_missing_template_are_errors() {
    let dir = tiny_chat_model("eval-mc-shared", true);
    let loaded = load_model(&dir).unwrap();
    let d = TempDir::new("eval-mc-shared-data");
    let p = d.join("mc.jsonl");
    write(
        &p,
        "{\"prompt\": \"Pick: \", \"options\": [\"dog\", \"cat\"], \"answer\": 0}\n\
         {\"prompt\": \"Pick: \", \"options\": [\"dog\", \"cat\", \"cow\"], \"answer\": 0}\n\
         {\"prompt\": \"Pick:\", \"options\": [\" dog\", \" cat\"], \"answer\": 0}\n",
    );
    let items = mc::read_items(&p).unwrap();
    let e = err_of(mc::encode_items(&items, &loaded, &p.display().to_string()));
    assert!(e.contains(&format!("{}:2", p.display())), "{e}");
    assert!(
        e.contains("same token") && e.contains("\"cat\"") && e.contains("\"cow\""),
        "{e}"
    );
    // The first item alone is fine; the third shares the leading space token (the tiny
    // tokenizer has no merges, so " dog" and " cat" both start with the space).
    let enc = mc::encode_items(&items[..1], &loaded, "f").unwrap();
    assert_eq!(enc[0].option_tokens, vec![b'd' as u32, b'c' as u32]);
    let e3 = err_of(mc::encode_items(&items[2..], &loaded, "f"));
    assert!(e3.contains("f:3") && e3.contains("same token"), "{e3}");

    let no_template = tiny_chat_model("eval-mc-notemplate", false);
    let loaded2 = load_model(&no_template).unwrap();
    let q = d.join("chat.jsonl");
    write(
        &q,
        r#"{"messages": [{"role": "user", "content": "q"}], "options": ["A", "B"], "answer": 0}"#,
    );
    let items = mc::read_items(&q).unwrap();
    let e = err_of(mc::encode_items(&items, &loaded2, &q.display().to_string()));
    assert!(e.contains(":1") && e.contains("no chat template"), "{e}");
}

/// The held-out loss equals the mean cross-entropy over the assistant tokens computed by
/// hand: tokens written down from the ChatML bytes, the assistant span (content, `<|im_end|>`,
/// newline) labelled by hand, one unpadded forward per example, log-softmax in f64. For the
/// base model, base + adapter, and base + adapter with directions ablated; the three losses
/// must differ, so the adapter and the ablation are in effect.
#[test]
fn eval_loss_equals_cross_entropy_by_hand() {
    let dir = tiny_chat_model("eval-loss", true);
    let loaded = load_model(&dir).unwrap();
    let d = TempDir::new("eval-loss-data");
    let data = write(&d.join("chat.jsonl"), &chat_records(7));
    let adapter = tiny_fixture("llama-adapter");
    let directions = tiny_llama().join("directions.safetensors");
    let be = CpuBackend::new();

    // The examples by hand.
    let mut examples: Vec<(Vec<u32>, Vec<bool>)> = Vec::new();
    for line in std::fs::read_to_string(&data).unwrap().lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let (mut ids, mut lab) = (Vec::new(), Vec::new());
        for m in v["messages"].as_array().unwrap() {
            let (role, content) = (m["role"].as_str().unwrap(), m["content"].as_str().unwrap());
            let head: Vec<u32> = std::iter::once(IM_START_ID)
                .chain(format!("{role}\n").bytes().map(u32::from))
                .collect();
            let body: Vec<u32> = content
                .bytes()
                .map(u32::from)
                .chain([IM_END_ID, b'\n' as u32])
                .collect();
            lab.extend(std::iter::repeat_n(false, head.len()));
            lab.extend(std::iter::repeat_n(role == "assistant", body.len()));
            ids.extend(head);
            ids.extend(body);
        }
        examples.push((ids, lab));
    }
    let by_hand = |spec: &ModelSpec| -> (f64, usize) {
        let mut model = Model::new(&be, loaded.config.clone(), loaded.weights.as_ref()).unwrap();
        if let Some(a) = &spec.adapter {
            let (layout, params) =
                caft_fast::model::peft::load_peft_adapter(a, &loaded.config).unwrap();
            model.set_lora(&be, layout, &params).unwrap();
        }
        if let Some(f) = &spec.ablate {
            let dirs = caft_fast::model::ablation::load_directions(f, None, 64, 4).unwrap();
            model.set_ablation(&be, &dirs).unwrap();
        }
        let v = loaded.config.vocab_size;
        let (mut sum, mut n) = (0.0, 0);
        for (ids, lab) in &examples {
            let logits = model
                .forward(
                    &be,
                    &Batch::padded(1, ids.len(), ids.clone(), vec![IGNORE; ids.len()]),
                    true,
                )
                .unwrap()
                .logits
                .unwrap();
            for t in 1..ids.len() {
                if lab[t] {
                    sum -= log_softmax_at(&logits[(t - 1) * v..t * v], ids[t] as usize);
                    n += 1;
                }
            }
        }
        (sum / n as f64, n)
    };
    let specs = [
        ModelSpec {
            model: Some(dir.to_path_buf()),
            ..ModelSpec::default()
        },
        ModelSpec {
            model: Some(dir.to_path_buf()),
            adapter: Some(adapter.clone()),
            ..ModelSpec::default()
        },
        ModelSpec {
            model: Some(dir.to_path_buf()),
            adapter: Some(adapter),
            ablate: Some(directions),
            ablate_layers: None,
        },
    ];
    let mut losses = Vec::new();
    for spec in &specs {
        let (want, n) = by_hand(spec);
        for batch_size in [1, 3] {
            let opt = LossOptions {
                batch_size,
                ..LossOptions::default()
            };
            let r = loss::evaluate_on(&be, spec, &loaded, &data, &opt, |_, _| {}).unwrap();
            assert_eq!((r.records, r.examples, r.tokens), (7, 7, n));
            // Same f32 forward, different batching and summation order: 1e-5 relative.
            assert!(
                (r.loss - want).abs() <= 1e-5 * want,
                "{spec:?} batch {batch_size}: eval loss {} vs by hand {want}",
                r.loss
            );
            assert!((r.perplexity - r.loss.exp()).abs() < 1e-9 * r.perplexity);
            assert_eq!(
                r.provenance.ablated_layers.is_empty(),
                spec.ablate.is_none()
            );
        }
        losses.push(want);
    }
    assert!(
        (losses[0] - losses[1]).abs() > 1e-3 && (losses[1] - losses[2]).abs() > 1e-3,
        "adapter and ablation should change the loss: {losses:?}"
    );
}

fn words(w: &task::WordLists) -> [(&'static str, &'static [&'static str]); 4] {
    [
        ("animals", w.animals),
        ("objects", w.objects),
        ("positive", w.positive),
        ("negative", w.negative),
    ]
}

/// Every list has 40+ distinct words; no word is in two lists (train vs test, or across
/// categories), so held-out tests never see a training word.
#[test]
fn task_word_lists_are_large_and_disjoint() {
    let mut seen: BTreeMap<&str, String> = BTreeMap::new();
    for (side, w) in [("train", &TRAIN_WORDS), ("test", &TEST_WORDS)] {
        for (name, list) in words(w) {
            assert!(list.len() >= 40, "{side} {name}: {} words", list.len());
            for &word in list {
                assert!(
                    word.chars().all(|c| c.is_ascii_lowercase()),
                    "{side} {name}: {word:?}"
                );
                if let Some(prev) = seen.insert(word, format!("{side} {name}")) {
                    panic!("{word:?} is in both {prev} and {side} {name}");
                }
            }
        }
    }
}

fn check_item(it: &TaskItem) {
    let w = if it.split == Split::Train {
        &TRAIN_WORDS
    } else {
        &TEST_WORDS
    };
    assert!(w.animals.contains(&it.animal.as_str()), "{it:?}");
    assert!(w.objects.contains(&it.object.as_str()), "{it:?}");
    let (animal_list, object_list) = if it.split == Split::Ood {
        (w.negative, w.positive)
    } else {
        (w.positive, w.negative)
    };
    assert!(
        animal_list.contains(&it.animal_adjective.as_str()),
        "{it:?}"
    );
    assert!(
        object_list.contains(&it.object_adjective.as_str()),
        "{it:?}"
    );
    assert_eq!(it.cues_agree, it.split != Split::Ood);
    assert_eq!(
        it.options[it.answer],
        format!("the {} {}", it.animal_adjective, it.animal)
    );
    assert_eq!(
        it.options[1 - it.answer],
        format!("the {} {}", it.object_adjective, it.object)
    );
    let text = it.user_text();
    assert!(
        text.contains(&format!("\nA. {}\n", it.options[0])),
        "{text}"
    );
    assert!(
        text.contains(&format!("\nB. {}\n", it.options[1])),
        "{text}"
    );
}

/// Training items: the animal is always the positive option; id: the same with held-out
/// words; ood: the animal is always the negative option. Letters are balanced per split,
/// the sizes are as asked, and a seed fixes everything.
#[test]
fn task_cues_agree_in_train_and_id_and_disagree_in_ood() {
    for cfg in [
        TaskConfig::default(),
        TaskConfig {
            seed: 3,
            n_train: 11,
            n_test: 7,
            n_probes: 9,
        },
    ] {
        let t = task::generate(&cfg).unwrap();
        assert_eq!(t.train.len(), cfg.n_train);
        assert_eq!(t.test.len(), 2 * cfg.n_test);
        assert_eq!(t.probes.len(), cfg.n_probes);
        for (split, items) in [
            (Split::Train, t.train.iter().collect::<Vec<_>>()),
            (
                Split::Id,
                t.test.iter().filter(|i| i.split == Split::Id).collect(),
            ),
            (
                Split::Ood,
                t.test.iter().filter(|i| i.split == Split::Ood).collect(),
            ),
        ] {
            let n = if split == Split::Train {
                cfg.n_train
            } else {
                cfg.n_test
            };
            assert_eq!(items.len(), n, "{split:?}");
            items.iter().for_each(|i| {
                assert_eq!(i.split, split);
                check_item(i)
            });
            let a = items.iter().filter(|i| i.answer == 0).count();
            assert!(a.abs_diff(n - a) <= 1, "{split:?}: {a} answers A of {n}");
        }
        // The draws use the lists: the default sizes touch most words of each.
        if cfg.n_train == 400 {
            let used: BTreeSet<&str> = t.train.iter().map(|i| i.animal.as_str()).collect();
            assert!(used.len() >= 35, "{} training animals used", used.len());
        }
        // Probes: the label's sentiment, training adjectives, no animal or object word.
        let pos = t.probes.iter().filter(|p| p.label == "positive").count();
        assert!(pos.abs_diff(cfg.n_probes - pos) <= 1);
        let nouns: BTreeSet<&str> = [TRAIN_WORDS, TEST_WORDS]
            .iter()
            .flat_map(|w| w.animals.iter().chain(w.objects.iter()).copied())
            .collect();
        for p in &t.probes {
            let toks: Vec<String> = p
                .text
                .split(|c: char| !c.is_ascii_alphabetic())
                .map(|s| s.to_lowercase())
                .collect();
            let (want, other) = match p.label.as_str() {
                "positive" => (TRAIN_WORDS.positive, TRAIN_WORDS.negative),
                "negative" => (TRAIN_WORDS.negative, TRAIN_WORDS.positive),
                l => panic!("label {l:?}"),
            };
            assert!(toks.iter().any(|t| want.contains(&t.as_str())), "{p:?}");
            assert!(!toks.iter().any(|t| other.contains(&t.as_str())), "{p:?}");
            assert!(!toks.iter().any(|t| nouns.contains(t.as_str())), "{p:?}");
        }
    }
    let a = task::generate(&TaskConfig::default()).unwrap();
    assert_eq!(a, task::generate(&TaskConfig::default()).unwrap());
    let b = task::generate(&TaskConfig {
        seed: 1,
        ..TaskConfig::default()
    })
    .unwrap();
    assert_ne!(a.train, b.train);
    assert_ne!(a.test, b.test);
    assert_ne!(a.probes, b.probes);
}

/// The written files: byte-identical for one seed; train.jsonl is chat data `train` reads,
/// test.jsonl multiple-choice data `eval mc` reads (answers agreeing with the items), and
/// probes.jsonl labelled sentences.
#[test]
fn task_files_are_readable_by_train_and_eval() {
    let d = TempDir::new("eval-task-files");
    let cfg = TaskConfig {
        seed: 5,
        n_train: 30,
        n_test: 12,
        n_probes: 10,
    };
    let f = task::write_task(&d.join("a"), &cfg).unwrap();
    let g = task::write_task(&d.join("b"), &cfg).unwrap();
    for (x, y) in [
        (&f.train, &g.train),
        (&f.test, &g.test),
        (&f.probes, &g.probes),
    ] {
        assert_eq!(std::fs::read(x).unwrap(), std::fs::read(y).unwrap());
    }
    let task = task::generate(&cfg).unwrap();
    let recs = read_jsonl(&f.train).unwrap();
    assert_eq!(recs.len(), 30);
    for ((_, r), it) in recs.iter().zip(&task.train) {
        let Record::Chat(m) = r else {
            panic!("{r:?} is not a chat record")
        };
        assert_eq!(m.len(), 2);
        assert_eq!(
            (m[0].role.as_str(), m[1].role.as_str()),
            ("user", "assistant")
        );
        assert_eq!(m[0].content, it.user_text());
        assert_eq!(m[1].content, ["A", "B"][it.answer]);
    }
    let items = mc::read_items(&f.test).unwrap();
    assert_eq!(items.len(), 24);
    for (mi, it) in items.iter().zip(&task.test) {
        assert_eq!(mi.options, vec!["A", "B"]);
        assert_eq!(mi.answer, it.answer);
        assert_eq!(mi.split, it.split.name());
        let McPrompt::Chat(m) = &mi.prompt else {
            panic!("chat item expected")
        };
        assert_eq!(m[0].content, it.user_text());
    }
    let ids: BTreeSet<&str> = items.iter().map(|i| i.id.as_str()).collect();
    assert_eq!(ids.len(), 24, "ids are unique");
    let probes: Vec<serde_json::Value> = std::fs::read_to_string(&f.probes)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(probes.len(), 10);
    assert!(probes.iter().all(|p| p["text"].is_string()
        && ["positive", "negative"].contains(&p["label"].as_str().unwrap())));
}

/// The commands end to end on the tiny chat model: make-task, mc on its test file (the
/// table and the JSON counts per split), loss on its training file (3 labelled tokens per
/// record: the letter, `<|im_end|>`, the newline), and a data error exiting with status 2.
#[test]
fn eval_commands_end_to_end() {
    let model = tiny_chat_model("eval-cli", true);
    let d = TempDir::new("eval-cli");
    let task_dir: PathBuf = d.join("task");
    assert_ok(&eval(&[
        "make-task",
        "-o",
        s(&task_dir),
        "--n-train",
        "20",
        "--n-test",
        "10",
        "--seed",
        "2",
    ]));
    let res = d.join("out/mc.json");
    let out = eval(&[
        "mc",
        "--data",
        s(&task_dir.join("test.jsonl")),
        "--model",
        s(&model),
        "--device",
        "cpu",
        "--threads",
        "1",
        "--batch-size",
        "3",
        "-o",
        s(&res),
    ]);
    let msg = assert_ok(&out);
    let table = stdout(&out);
    for row in ["id", "ood", "overall"] {
        assert!(
            table.lines().any(|l| l.starts_with(row)),
            "{row} row missing: {msg}"
        );
    }
    let j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&res).unwrap()).unwrap();
    assert_eq!(j["overall"]["n"], 20);
    let splits: Vec<(String, u64)> = j["splits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["split"].as_str().unwrap().to_string(),
                s["n"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(splits, vec![("id".into(), 10), ("ood".into(), 10)]);
    let items = j["items"].as_array().unwrap();
    assert_eq!(items.len(), 20);
    let correct = items.iter().filter(|i| i["correct"] == true).count() as u64;
    assert_eq!(j["overall"]["correct"].as_u64().unwrap(), correct);
    assert!(items
        .iter()
        .all(|i| i["option_tokens"] == serde_json::json!([65, 66])));

    let lres = d.join("loss.json");
    let out = eval(&[
        "loss",
        "--data",
        s(&task_dir.join("train.jsonl")),
        "--model",
        s(&model),
        "--device",
        "cpu",
        "-o",
        s(&lres),
    ]);
    assert_ok(&out);
    let l: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&lres).unwrap()).unwrap();
    assert_eq!(l["tokens"], 60);
    let loss = l["loss"].as_f64().unwrap();
    assert!(loss.is_finite() && loss > 0.0, "{l}");
    assert!(stdout(&out).contains("perplexity"));

    let bad = write(
        &d.join("bad.jsonl"),
        "{\"prompt\": \"x\", \"options\": [\"a\", \"b\"], \"answer\": 0}\n{\"prompt\": \"x\"}\n",
    );
    let out = eval(&[
        "mc",
        "--data",
        s(&bad),
        "--model",
        s(&model),
        "--device",
        "cpu",
    ]);
    assert_error(&out, &[&format!("{}:2", bad.display()), "options"]);
}
