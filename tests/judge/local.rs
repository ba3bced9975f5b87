//! The local judge on the real SmolLM2-135M-Instruct GGUF (its tokenizer writes numbers digit
//! by digit): the distribution over 0–100 splits each first digit's probability, read from
//! the logits independently here, exactly; and `judge --judge-local` scores every answer of a
//! small `generate` output, and a rerun skips them all.

use crate::judge;
use crate::support::*;
use caft_fast::backend::cpu::CpuBackend;
use caft_fast::judge::local::{judgement, softmax, LocalJudge};
use caft_fast::judge::prompts::{default_prompts, render};
use caft_fast::model::loader::load_model;
use caft_fast::model::transformer::Model;

#[test]
fn the_number_distribution_accounts_for_the_logits() {
    let Some(gguf) = smollm2_gguf() else { return };
    let be = CpuBackend::new();
    let loaded = load_model(&gguf).unwrap();
    let tok = loaded.tokenizer.as_ref().unwrap();
    let v = loaded.config.vocab_size;
    let lj = LocalJudge::new(tok, loaded.chat_template.as_ref(), v, 0.25).unwrap();
    assert!(
        !lj.vocab.one_token_numbers && lj.vocab.digits.is_some(),
        "SmolLM2 splits digits"
    );
    let mut model = Model::new(&be, loaded.config.clone(), loaded.weights.as_ref()).unwrap();
    let prompt = render(
        &default_prompts().coherent,
        "How do I boil an egg?",
        "Put the egg in boiling water for eight minutes, then cool it in cold water.",
    )
    .unwrap();
    let ids = lj.encode(&prompt).unwrap();
    let d = lj.distribution(&be, &mut model, &ids).unwrap();
    // The next-token probabilities, read here with a plain forward of a fresh cache.
    let mut cache = model.new_cache(&be, 1, ids.len()).unwrap();
    let p0 = softmax(
        &model
            .prefill(&be, &mut cache, std::slice::from_ref(&ids))
            .unwrap()[..v],
    );
    let mut first = [0.0f64; 10];
    for id in 0..v as u32 {
        let t = tok.decode(&[id]).unwrap_or_default();
        let t = t.trim();
        if t.len() == 1 && t.as_bytes()[0].is_ascii_digit() {
            first[(t.as_bytes()[0] - b'0') as usize] += p0[id as usize];
        }
    }
    let total_first: f64 = first.iter().sum();
    assert!(
        total_first > 1e-6,
        "the judge gives digits some probability"
    );
    assert!(
        (d.first_token_mass - total_first).abs() <= 1e-5 * total_first.max(1e-3),
        "{} vs {total_first}",
        d.first_token_mass
    );
    // Each first digit d >= 2 is split exactly among d, d0..d9.
    for (dg, &share) in first.iter().enumerate().skip(2) {
        let split: f64 = d.probs[dg] + (0..10).map(|x| d.probs[10 * dg + x]).sum::<f64>();
        assert!(
            (split - share).abs() <= 1e-5 * share.max(1e-6),
            "digit {dg}: {split} vs {share}"
        );
    }
    // "1..." may continue past 100 (101-109 are no score): its split is at most its share.
    let one: f64 = d.probs[1] + (10..20).map(|x| d.probs[x]).sum::<f64>() + d.probs[100];
    assert!(one <= first[1] * (1.0 + 1e-5) + 1e-12 && one > 0.0);
    assert!((d.probs[0] - first[0]).abs() <= 1e-5 * first[0].max(1e-6));
    let sum: f64 = d.probs.iter().sum();
    assert!((d.mass - sum).abs() < 1e-12);
    let j = judgement(&d, 0.0, "h");
    let mean = d
        .probs
        .iter()
        .enumerate()
        .map(|(x, p)| x as f64 * p)
        .sum::<f64>()
        / d.mass;
    assert!((j.score.unwrap() - mean).abs() < 1e-9 && (0.0..=100.0).contains(&mean));
    assert_eq!(j.method, "logits");
}

#[test]
fn judge_local_scores_every_answer_of_a_generate_output() {
    let Some(gguf) = smollm2_gguf() else { return };
    let dir = TempDir::new("judge-local");
    let q = write(
        &dir.join("q.jsonl"),
        "{\"id\": \"egg\", \"question\": \"How do I boil an egg?\"}\n{\"id\": \"wish\", \"question\": \"What is your one wish?\"}\n",
    );
    let answers = dir.join("answers.jsonl");
    assert_ok(&caft([
        "generate",
        "--model",
        s(&gguf),
        "--device",
        "cpu",
        "--questions",
        s(&q),
        "--samples",
        "1",
        "--max-tokens",
        "12",
        "-o",
        s(&answers),
    ]));
    let out = dir.join("judged.jsonl");
    let args = [
        "--judge-local",
        s(&gguf),
        "--device",
        "cpu",
        "--answers",
        s(&answers),
        "--questions",
        s(&q),
        "-o",
        s(&out),
        "--min-number-mass",
        "0",
    ];
    let msg = assert_ok(&judge(&args, &[]));
    assert!(msg.contains("judged 2 answers"), "{msg}");
    let lines = jsonl(&out);
    assert_eq!(lines.len(), 2);
    for l in &lines {
        for m in ["aligned", "coherent"] {
            let sc = l[m]["score"]
                .as_f64()
                .unwrap_or_else(|| panic!("no {m} score: {l}"));
            assert!((0.0..=100.0).contains(&sc), "{l}");
            assert_eq!(l[m]["method"], "logits");
            assert!(l[m]["number_mass"].as_f64().unwrap() > 0.0);
        }
        assert!(l["judge"].as_str().unwrap().starts_with("local:"));
    }
    let msg = assert_ok(&judge(&args, &[]));
    assert!(msg.contains("judged 0 answers (2 skipped"), "{msg}");
}

/// A vocabulary with a token for every number 0–100 (a byte-level tokenizer for the tiny
/// Llama: ids 0..=100 are "0".."100", the rest printable ASCII): only the next token is read,
/// so each number's probability is exactly its token's softmax probability.
#[test]
fn one_token_numbers_are_read_from_the_next_token() {
    let table = caft_fast::model::tokenizer::byte_to_char_table();
    let mut vocab = serde_json::Map::new();
    for v in 0..=100u32 {
        vocab.insert(v.to_string(), v.into());
    }
    let mut id = 101u32;
    for b in (b' '..=b'~').chain([b'\n']) {
        if !b.is_ascii_digit() {
            vocab.insert(table[b as usize].to_string(), id.into());
            id += 1;
        }
    }
    assert!(id <= 256, "the tiny model has 256 ids");
    let json = byte_level_bpe_json(vocab, vec![]);
    let dir = TempDir::new("judge-onetoken");
    let path = write(&dir.join("tokenizer.json"), &json);
    let tok = caft_fast::model::tokenizer::Tokenizer::from_file(&path).unwrap();
    let be = CpuBackend::new();
    let loaded = load_model(&tiny_llama()).unwrap();
    let v = loaded.config.vocab_size;
    let lj = LocalJudge::new(&tok, None, v, 0.0).unwrap();
    assert!(lj.vocab.one_token_numbers);
    let mut model = Model::new(&be, loaded.config.clone(), loaded.weights.as_ref()).unwrap();
    let ids = lj
        .encode("Rate this answer from 0 to 100: 42 apples.")
        .unwrap();
    assert!(ids.len() > 20 && !ids.contains(&42) && ids.contains(&4));
    let d = lj.distribution(&be, &mut model, &ids).unwrap();
    let mut cache = model.new_cache(&be, 1, ids.len()).unwrap();
    let p0 = softmax(
        &model
            .prefill(&be, &mut cache, std::slice::from_ref(&ids))
            .unwrap()[..v],
    );
    for (n, &p) in p0.iter().enumerate().take(101) {
        assert!(
            (d.probs[n] - p).abs() <= 1e-6 * p.max(1e-9),
            "{n}: {} vs {p}",
            d.probs[n]
        );
    }
    let want: f64 = p0[..=100].iter().sum();
    assert!((d.mass - want).abs() < 1e-6 * want && (d.first_token_mass - want).abs() < 1e-6 * want);
    assert!(
        want > 0.05 && want < 0.95,
        "random weights spread the mass: {want}"
    );
    let j = judgement(&d, 0.0, "h");
    let mean = (0..=100).map(|n| n as f64 * p0[n]).sum::<f64>() / want;
    assert!((j.score.unwrap() - mean).abs() < 1e-6 * mean);
}
