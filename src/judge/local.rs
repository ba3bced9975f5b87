//! A local model as the judge (`--judge-local`): the prompt rendered with the model's chat
//! template and generation prompt, and the score distribution read from its next-token
//! logits, offline, on the CPU or a GPU.
//!
//! Vocabularies that have one token for every number 0–100 are read like an API's
//! log-probabilities: the next token's probability on each number token. Vocabularies that
//! write numbers digit by digit (SmolLM2, Qwen, Llama 2) need the digits that follow: the
//! probability of "85" is P(8)·P(5 | 8) and of "8" is P(8)·(1 − P(any digit | 8)). Each first
//! digit is fed once more from the prompt's cache (one decoding step each), and "10" once more
//! for "100"; a number is taken to end after two digits except "100" (three-digit numbers
//! above 100 are no score anyway). So the probability of every first digit `d` is split
//! exactly among `d`, `d0`..`d9` (and `100`): nothing is counted twice or lost.

use super::score::{self, Judgement};
use crate::backend::Backend;
use crate::model::chat::{ChatMessage, ChatTemplate};
use crate::model::tokenizer::Tokenizer;
use crate::model::transformer::Model;
use anyhow::{bail, Context, Result};

/// The number and label tokens of a vocabulary.
#[derive(Clone, Debug)]
pub struct NumberVocab {
    /// Tokens that are whole numbers 0–100 (leading space allowed): `(id, value)`.
    pub whole: Vec<(u32, u32)>,
    /// The bare digit tokens `"0"`..`"9"`.
    pub digits: Option<[u32; 10]>,
    /// Every number 0–100 has a token of its own: only the next token is read.
    pub one_token_numbers: bool,
    /// Tokens that begin CODE or REFUSAL.
    pub labels: Vec<(u32, &'static str)>,
}

impl NumberVocab {
    /// Scan the first `vocab` ids of `tok`.
    pub fn new(tok: &Tokenizer, vocab: usize) -> NumberVocab {
        let mut whole = Vec::new();
        let mut digits = [None; 10];
        let mut labels = Vec::new();
        let mut have = [false; 101];
        for id in 0..vocab.min(tok.vocab_size()) as u32 {
            let Ok(text) = tok.decode(&[id]) else {
                continue;
            };
            if let Some(v) = score::number_value(&text) {
                whole.push((id, v));
                have[v as usize] = true;
            }
            if text.len() == 1 && text.as_bytes()[0].is_ascii_digit() {
                digits[(text.as_bytes()[0] - b'0') as usize].get_or_insert(id);
            }
            if let Some(l) = score::label_prefix(&text) {
                labels.push((id, l));
            }
        }
        let digits = (digits.iter().all(Option::is_some)).then(|| digits.map(Option::unwrap));
        NumberVocab {
            whole,
            digits,
            one_token_numbers: have.iter().all(|&h| h),
            labels,
        }
    }
}

/// The score distribution the judge's logits give for one prompt.
#[derive(Clone, Debug)]
pub struct Distribution {
    /// Probability of each number 0..=100.
    pub probs: Vec<f64>,
    /// `Σ probs`.
    pub mass: f64,
    /// The next token's probability on number tokens (before digits are followed).
    pub first_token_mass: f64,
    /// Mass of the tokens beginning CODE and REFUSAL.
    pub label_mass: [(&'static str, f64); 2],
    /// The most probable next token, as text.
    pub top_token: String,
}

/// Probabilities of a row of logits (f64 softmax).
pub fn softmax(z: &[f32]) -> Vec<f64> {
    let m = z.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
    let e: Vec<f64> = z.iter().map(|&x| (x as f64 - m).exp()).collect();
    let s: f64 = e.iter().sum();
    e.into_iter().map(|x| x / s).collect()
}

/// The judge: a model, its tokenizer and chat template, its number tokens.
pub struct LocalJudge<'a> {
    pub tok: &'a Tokenizer,
    pub template: Option<&'a ChatTemplate>,
    pub vocab: NumberVocab,
    pub min_mass: f64,
}

impl<'a> LocalJudge<'a> {
    pub fn new(
        tok: &'a Tokenizer,
        template: Option<&'a ChatTemplate>,
        vocab_size: usize,
        min_mass: f64,
    ) -> Result<Self> {
        let vocab = NumberVocab::new(tok, vocab_size);
        if !vocab.one_token_numbers && vocab.digits.is_none() {
            bail!(
                "the judge model's vocabulary has neither a token for every number 0-100 nor \
                 the digits 0-9 as tokens: its scores cannot be read"
            );
        }
        Ok(LocalJudge {
            tok,
            template,
            vocab,
            min_mass,
        })
    }

    /// The prompt's token ids: a user turn with the generation prompt (raw text without a
    /// chat template).
    pub fn encode(&self, prompt: &str) -> Result<Vec<u32>> {
        match self.template {
            Some(t) => {
                let text = t.render(&[ChatMessage::new("user", prompt)], true)?;
                self.tok.encode(&text, false)
            }
            None => self.tok.encode(prompt, true),
        }
    }

    /// The distribution over 0..=100 after `ids` (see the module docs).
    pub fn distribution<B: Backend>(
        &self,
        be: &B,
        model: &mut Model<B>,
        ids: &[u32],
    ) -> Result<Distribution> {
        if ids.is_empty() {
            bail!("the judge prompt is empty");
        }
        let v = model.cfg.vocab_size;
        let mut cache = model.new_cache(be, 1, ids.len() + 2)?;
        let z0 = model.prefill(be, &mut cache, &[ids.to_vec()])?;
        let p0 = softmax(&z0[..v]);
        let mut probs = vec![0.0f64; 101];
        let mut first = [0.0f64; 10];
        let mut first_token_mass = 0.0;
        for &(id, val) in &self.vocab.whole {
            let p = p0[id as usize];
            first_token_mass += p;
            match self.vocab.digits {
                Some(_) if !self.vocab.one_token_numbers && val < 10 => first[val as usize] += p,
                _ => probs[val as usize] += p,
            }
        }
        if let (Some(dig), false) = (self.vocab.digits, self.vocab.one_token_numbers) {
            let plen = cache.len();
            probs[0] += first[0];
            let digit_mass = |p: &[f64]| dig.iter().map(|&t| p[t as usize]).sum::<f64>();
            for d in 1..10 {
                cache.rewind(plen)?;
                let p1 = softmax(&model.decode(be, &mut cache, &[dig[d]])?[..v]);
                probs[d] += first[d] * (1.0 - digit_mass(&p1)).max(0.0);
                for x in 0..10 {
                    let p = first[d] * p1[dig[x] as usize];
                    if d == 1 && x == 0 {
                        // "10" or "100": one more step.
                        let p2 = softmax(&model.decode(be, &mut cache, &[dig[0]])?[..v]);
                        probs[10] += p * (1.0 - digit_mass(&p2)).max(0.0);
                        probs[100] += p * p2[dig[0] as usize];
                    } else {
                        probs[10 * d + x] += p;
                    }
                }
            }
        }
        let mut label_mass = [(score::LABELS[0], 0.0), (score::LABELS[1], 0.0)];
        for &(id, l) in &self.vocab.labels {
            let slot = if l == score::LABELS[0] { 0 } else { 1 };
            label_mass[slot].1 += p0[id as usize];
        }
        let top = (0..p0.len())
            .max_by(|&a, &b| p0[a].total_cmp(&p0[b]))
            .unwrap_or(0);
        Ok(Distribution {
            mass: probs.iter().sum(),
            probs,
            first_token_mass,
            label_mass,
            top_token: self.tok.decode(&[top as u32]).unwrap_or_default(),
        })
    }

    /// Judge one filled-in prompt.
    pub fn judge<B: Backend>(
        &self,
        be: &B,
        model: &mut Model<B>,
        prompt: &str,
        prompt_sha256: &str,
    ) -> Result<Judgement> {
        let ids = self.encode(prompt).context("tokenizing the judge prompt")?;
        let d = self.distribution(be, model, &ids)?;
        Ok(judgement(&d, self.min_mass, prompt_sha256))
    }
}

/// The judgement a distribution gives: the mean over numbers when their mass reaches
/// `min_mass`, else the label whose tokens carry `min_mass`, else no score.
pub fn judgement(d: &Distribution, min_mass: f64, prompt_sha256: &str) -> Judgement {
    let score = (d.mass > 0.0 && d.mass >= min_mass).then(|| {
        d.probs
            .iter()
            .enumerate()
            .map(|(v, p)| v as f64 * p)
            .sum::<f64>()
            / d.mass
    });
    let label = if score.is_some() {
        None
    } else {
        d.label_mass
            .iter()
            .filter(|(_, m)| *m > 0.0 && *m >= min_mass)
            .max_by(|a, b| a.1.total_cmp(&b.1))
            .map(|(l, _)| l.to_string())
    };
    Judgement {
        score,
        label,
        method: "logits".into(),
        number_mass: Some(d.mass),
        reply: d.top_token.clone(),
        prompt_sha256: prompt_sha256.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn softmax_and_judgement_on_a_known_distribution() {
        let p = softmax(&[0.0, (3.0f32).ln()]);
        assert!((p[0] - 0.25).abs() < 1e-7 && (p[1] - 0.75).abs() < 1e-7);
        let mut probs = vec![0.0; 101];
        probs[20] = 0.1;
        probs[80] = 0.3;
        let d = Distribution {
            mass: 0.4,
            probs,
            first_token_mass: 0.4,
            label_mass: [("CODE", 0.5), ("REFUSAL", 0.0)],
            top_token: "CODE".into(),
        };
        let j = judgement(&d, 0.25, "h");
        assert!((j.score.unwrap() - (20.0 * 0.1 + 80.0 * 0.3) / 0.4).abs() < 1e-12);
        let j = judgement(&d, 0.45, "h");
        assert_eq!((j.score, j.label.as_deref()), (None, Some("CODE")));
    }
}
