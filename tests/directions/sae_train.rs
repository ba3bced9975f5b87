//! Training a BatchTopK SAE recovers a planted sparse dictionary, and the saved file loads back
//! as the same BatchTopK SAE.

use crate::support::*;
use caft_fast::directions::sae::{Activation, Sae};
use caft_fast::directions::sae_train::{
    save, save_jumprelu, train, train_jumprelu, JumpReluConfig, TrainConfig,
};
use caft_fast::util::rng::Rng;

/// `rows` tokens `x = Σ_{j∈S} a_j D_j + b` from `atoms` random unit atoms in width `d`,
/// |S| = 2 per token, `a_j ~ U(1, 3)`, a shared random offset `b`.
fn planted_dictionary(d: usize, atoms: usize, rows: usize) -> (Vec<Vec<f32>>, Vec<f32>) {
    let mut rng = Rng::new(12);
    let dict: Vec<Vec<f32>> = (0..atoms).map(|j| unit_vector(d, 500 + j as u64)).collect();
    let offset: Vec<f32> = rng.normal_vec(d);
    let mut data = Vec::with_capacity(rows * d);
    for _ in 0..rows {
        let a = rng.below(atoms);
        let mut b = rng.below(atoms - 1);
        if b >= a {
            b += 1;
        }
        let (ca, cb) = (rng.uniform(1.0, 3.0) as f32, rng.uniform(1.0, 3.0) as f32);
        for i in 0..d {
            data.push(offset[i] + ca * dict[a][i] + cb * dict[b][i]);
        }
    }
    (dict, data)
}

/// Atoms with a decoder row at |cos| >= `min_cos`.
fn recovered(dict: &[Vec<f32>], w_dec: &[f32], d: usize, min_cos: f64) -> usize {
    dict.iter()
        .filter(|atom| {
            w_dec
                .chunks_exact(d)
                .any(|row| dot(row, atom).abs() >= min_cos)
        })
        .count()
}

/// Data `x = Σ_{j∈S} a_j D_j + b` from 24 random unit atoms in d = 32, |S| = 2 per token,
/// `a_j ~ U(1, 3)`, a shared offset `b`, no noise: the sparsest explanation is the dictionary
/// itself. A BatchTopK SAE with 48 latents and k = 2 trained for 3000 Adam steps must leave
/// <= 0.1% of the variance unexplained, and every atom must have a decoder row with
/// |cos| >= 0.99 (a random unit row in d = 32 has |cos| ~ 0.18; measured: FVU < 5e-5 and all
/// 24 atoms). The thresholded inference encoding of the saved, reloaded SAE must reconstruct
/// held-out data as well (<= 1% unexplained; measured < 5e-5).
#[test]
fn batchtopk_recovers_a_planted_dictionary() {
    let (d, atoms, n) = (32, 24, 6000);
    let (dict, data) = planted_dictionary(d, atoms, n + 500);
    let (train_x, test_x) = data.split_at(n * d);
    let cfg = TrainConfig {
        m: 48,
        k: 2,
        lr: 3e-3,
        batch: 256,
        steps: 3000,
        seed: 1,
    };
    let mut last = 1.0;
    let sae = train(train_x, d, &cfg, |_, fvu| last = fvu).unwrap();
    assert!(last <= 1e-3, "fraction of variance unexplained {last}");
    let found = dict
        .iter()
        .filter(|atom| {
            sae.w_dec
                .chunks_exact(d)
                .any(|row| dot(row, atom).abs() >= 0.99)
        })
        .count();
    eprintln!("train FVU {last:.4}, atoms recovered {found}/{atoms}");
    assert!(found == atoms, "only {found} of {atoms} atoms recovered");

    let tmp = TempDir::new("saetrain");
    let p = tmp.join("sae.safetensors");
    save(&p, &sae, 2).unwrap();
    let back = Sae::load(&p, None, None).unwrap();
    assert_eq!(back.w_dec, sae.w_dec);
    assert_eq!(back.w_enc, sae.w_enc);
    assert!(matches!(back.act, Activation::BatchTopK(t) if t > 0.0));
    let f = back.encode(test_x);
    let (mut err, mut var) = (0f64, 0f64);
    let rows = test_x.len() / d;
    let mean: Vec<f64> = (0..d)
        .map(|i| (0..rows).map(|r| test_x[r * d + i] as f64).sum::<f64>() / rows as f64)
        .collect();
    for r in 0..rows {
        for i in 0..d {
            let xh: f64 = back.b_dec[i] as f64
                + (0..back.m)
                    .map(|j| f[r * back.m + j] as f64 * back.w_dec[j * d + i] as f64)
                    .sum::<f64>();
            err += (xh - test_x[r * d + i] as f64).powi(2);
            var += (test_x[r * d + i] as f64 - mean[i]).powi(2);
        }
    }
    eprintln!("held-out FVU {:.4}", err / var);
    assert!(
        err / var <= 1e-2,
        "held-out FVU with the threshold: {}",
        err / var
    );
}

/// `sae-train` then `sae` end to end on the tiny model: the SAE file loads as BatchTopK with
/// the asked shape, training lowers the unexplained variance well below the first step's
/// (reported on stderr), and the ranking command accepts the file. A layer past the model is
/// refused.
#[test]
fn sae_train_then_rank_on_the_tiny_model() {
    let tmp = TempDir::new("saetrain-cli");
    let corpus = tmp.join("corpus.jsonl");
    write_tokens_jsonl(&corpus, 40, 9);
    let sae_path = tmp.join("sae1.safetensors");
    let m = s(&tiny_llama()).to_string();
    let args = |layer: &str| {
        directions(&[
            "sae-train",
            "--model",
            &m,
            "--corpus",
            s(&corpus),
            "--layer",
            layer,
            "--latents",
            "32",
            "--k",
            "4",
            "--steps",
            "200",
            "--batch-tokens",
            "64",
            "--lr",
            "1e-3",
            "--device",
            "cpu",
            "-o",
            s(&sae_path),
        ])
    };
    let ran = args("1");
    assert_ok(&ran);
    let err = stderr(&ran);
    assert!(err.contains("32 latents, k = 4"), "{err}");
    let sae = Sae::load(&sae_path, None, None).unwrap();
    assert_eq!((sae.d, sae.m), (64, 32));
    assert!(matches!(sae.act, Activation::BatchTopK(_)));
    let fvu: f64 = err
        .split("last batch left ")
        .nth(1)
        .and_then(|r| r.split('%').next())
        .and_then(|v| v.trim().parse().ok())
        .expect("FVU in the report");
    // Measured: 89% unexplained after 1 step, 50% after 200 (random-token activations of a
    // random model are not sparse; the point is that training makes progress).
    assert!(fvu < 75.0, "unexplained variance after 200 steps: {fvu}%");
    assert_error(&args("4"), &["layer 4 does not exist"]);
    let jr = tmp.join("jr.safetensors");
    let train_jr = |arch: &str| {
        directions(&[
            "sae-train",
            "--model",
            &m,
            "--corpus",
            s(&corpus),
            "--layer",
            "1",
            "--arch",
            arch,
            "--latents",
            "16",
            "--steps",
            "50",
            "--batch-tokens",
            "64",
            "--lr",
            "1e-3",
            "--device",
            "cpu",
            "-o",
            s(&jr),
        ])
    };
    let jr_out = train_jr("jumprelu");
    assert_ok(&jr_out);
    assert!(stderr(&jr_out).contains("jumprelu, λ = 1"));
    let j = Sae::load(&jr, None, None).unwrap();
    assert!(
        matches!(&j.act, Activation::JumpRelu(th) if th.len() == 16 && th.iter().all(|&t| t > 0.0))
    );
    assert_error(&train_jr("gated"), &["expected batchtopk or jumprelu"]);

    let adapter = tmp.join("adapter");
    write_planted_adapter(&adapter, &tiny_config(), 1, &unit_vector(64, 3));
    let out = tmp.join("latents.safetensors");
    assert_ok(&directions(&[
        "sae",
        "--model",
        &m,
        "--adapter",
        s(&adapter),
        "--data",
        s(&corpus),
        "--sae",
        &format!("1={}", s(&sae_path)),
        "--top",
        "5",
        "--device",
        "cpu",
        "-o",
        s(&out),
    ]));
    assert_eq!(read_tensors(&out)["layer.1"].0, [5, 64]);
}

/// JumpReLU on the same planted dictionary (λ = 1, ε = 0.1, 3000 steps). The L0 penalty must
/// bring the mean active latents to the true 2 (within [1.8, 2.3]), the reconstruction must
/// leave <= 2% of the variance unexplained, and >= 22 of the 24 atoms must have a decoder row
/// at |cos| >= 0.95. Measured: L0 2.00, FVU 1.0%, 23 atoms at |cos| >= 0.99. JumpReLU is
/// more sensitive to λ than BatchTopK to k: at λ = 0.6 the rows settle ~0.96 from the atoms.
#[test]
fn jumprelu_recovers_a_planted_dictionary() {
    let (d, atoms, n) = (32, 24, 6000);
    let (dict, data) = planted_dictionary(d, atoms, n);
    let cfg = JumpReluConfig {
        m: 48,
        l0_coeff: 1.0,
        bandwidth: 0.1,
        init_threshold: 0.3,
        lr: 3e-3,
        batch: 256,
        steps: 3000,
        seed: 1,
    };
    let (mut fvu, mut l0) = (1.0, 0.0);
    let sae = train_jumprelu(&data, d, &cfg, |_, f, l| {
        fvu = f;
        l0 = l;
    })
    .unwrap();
    let found = recovered(&dict, &sae.w_dec, d, 0.95);
    eprintln!("jumprelu FVU {fvu:.5}, L0 {l0:.2}, atoms {found}/{atoms} at 0.95");
    assert!((1.8..=2.3).contains(&l0), "L0 {l0}");
    assert!(fvu <= 0.02, "FVU {fvu}");
    assert!(found >= 22, "only {found} atoms");

    let tmp = TempDir::new("jumprelu");
    let p = tmp.join("sae.safetensors");
    save_jumprelu(&p, &sae).unwrap();
    let back = Sae::load(&p, None, None).unwrap();
    assert_eq!(
        back.act, sae.act,
        "loads back as JumpReLU with the same thresholds"
    );
    assert_eq!(back.encode(&data[..64 * d]), sae.encode(&data[..64 * d]));
}
