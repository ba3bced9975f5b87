//! Choosing the next token from one row of logits.
//!
//! With temperature `τ > 0` the distribution is `p_i ∝ exp((z_i - max z) / τ)` (in f64);
//! nucleus sampling keeps the smallest set of most probable tokens whose mass reaches `top_p`
//! (ties in probability broken by the lower id, so the set is deterministic) and samples
//! within it. `τ = 0` is greedy: the highest logit, the lowest id on a tie, as `argmax` does in
//! PyTorch.

use crate::util::rng::Rng;

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SampleOpts {
    pub temperature: f64,
    pub top_p: f64,
    pub max_tokens: usize,
}

impl SampleOpts {
    pub fn greedy(max_tokens: usize) -> SampleOpts {
        SampleOpts {
            temperature: 0.0,
            top_p: 1.0,
            max_tokens,
        }
    }
}

/// The index of the largest logit (the first one on a tie).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &z) in logits.iter().enumerate() {
        if z > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Draw the next token.
pub fn sample(logits: &[f32], opts: &SampleOpts, rng: &mut Rng) -> u32 {
    if opts.temperature <= 0.0 {
        return argmax(logits);
    }
    let m = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let p: Vec<f64> = logits
        .iter()
        .map(|&z| ((z as f64 - m) / opts.temperature).exp())
        .collect();
    let total: f64 = p.iter().sum();
    if opts.top_p >= 1.0 {
        let mut u = rng.next_f64() * total;
        for (i, &pi) in p.iter().enumerate() {
            u -= pi;
            if u < 0.0 {
                return i as u32;
            }
        }
        return argmax(logits); // rounding left u at ~0: the mass ran out on the last token
    }
    let mut order: Vec<u32> = (0..p.len() as u32).collect();
    order.sort_by(|&a, &b| p[b as usize].total_cmp(&p[a as usize]).then(a.cmp(&b)));
    let want = opts.top_p.max(0.0) * total;
    let mut kept = 0.0;
    let mut n = 0;
    for &i in &order {
        kept += p[i as usize];
        n += 1;
        if kept >= want {
            break;
        }
    }
    let mut u = rng.next_f64() * kept;
    for &i in &order[..n] {
        u -= p[i as usize];
        if u < 0.0 {
            return i;
        }
    }
    order[n - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(t: f64, p: f64) -> SampleOpts {
        SampleOpts {
            temperature: t,
            top_p: p,
            max_tokens: 1,
        }
    }

    /// Frequencies over many draws match the softmax within 4 standard errors, and top-p
    /// never draws outside the nucleus.
    #[test]
    fn frequencies_follow_the_distribution() {
        let mut rng = Rng::new(5);
        let logits: Vec<f32> = rng.normal_vec(7).iter().map(|x| 2.0 * x).collect();
        let t = 0.8;
        let m = logits.iter().cloned().fold(f32::MIN, f32::max) as f64;
        let w: Vec<f64> = logits.iter().map(|&z| ((z as f64 - m) / t).exp()).collect();
        let z: f64 = w.iter().sum();
        let n = 40_000;
        let mut counts = [0usize; 7];
        for _ in 0..n {
            counts[sample(&logits, &opts(t, 1.0), &mut rng) as usize] += 1;
        }
        for i in 0..7 {
            let p = w[i] / z;
            let f = counts[i] as f64 / n as f64;
            let se = (p * (1.0 - p) / n as f64).sqrt();
            assert!((f - p).abs() < 4.0 * se + 1e-9, "token {i}: {f} vs {p}");
        }
        // Nucleus of 0.5: the smallest prefix of the sorted probabilities reaching 0.5.
        let mut order: Vec<usize> = (0..7).collect();
        order.sort_by(|&a, &b| w[b].total_cmp(&w[a]));
        let mut acc = 0.0;
        let mut nucleus = vec![];
        for &i in &order {
            acc += w[i] / z;
            nucleus.push(i);
            if acc >= 0.5 {
                break;
            }
        }
        for _ in 0..2000 {
            let s = sample(&logits, &opts(t, 0.5), &mut rng) as usize;
            assert!(
                nucleus.contains(&s),
                "{s} is outside the nucleus {nucleus:?}"
            );
        }
    }

    #[test]
    fn greedy_and_seeded_draws_are_reproducible() {
        let mut rng = Rng::new(9);
        let logits = rng.normal_vec(50);
        let best = logits
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .unwrap()
            .0 as u32;
        assert_eq!(sample(&logits, &opts(0.0, 1.0), &mut rng), best);
        assert_eq!(argmax(&[1.0, 3.0, 3.0]), 1, "ties go to the lower id");
        let draw = |seed| {
            let mut r = Rng::new(seed);
            (0..20)
                .map(|_| sample(&logits, &opts(1.0, 0.9), &mut r))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(3), draw(3));
        assert_ne!(draw(3), draw(4));
    }
}
