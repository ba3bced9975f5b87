//! The PCA of resid_post differences through the library: a direction planted by an adapter is
//! recovered, layers before it see no difference, the streaming covariance + eigensolver
//! equals an exact SVD of the centred difference matrix on real differences, and a whole
//! fine-tuned model beside its base gives what the same fine-tune as an adapter gives.

use crate::support::*;
use caft_fast::backend::cpu::CpuBackend;
use caft_fast::data::token_batches;
use caft_fast::data::Example;
use caft_fast::data::TokenBatch;
use caft_fast::directions::pca::{differences, pca, TwoModels};
use caft_fast::model::loader::load_model;
use caft_fast::model::peft::load_peft_adapter;
use caft_fast::model::transformer::Model;
use caft_fast::train::merge::write_merged;
use caft_fast::util::rng::Rng;

/// Random examples, labels on the second half of each.
fn examples(n: usize, seed: u64) -> Vec<Example> {
    let mut rng = Rng::new(seed);
    (0..n)
        .map(|_| {
            let len = 6 + rng.below(15);
            let ids: Vec<u32> = (0..len).map(|_| 3 + rng.below(250) as u32).collect();
            let labels = ids
                .iter()
                .enumerate()
                .map(|(i, &t)| if i >= len / 2 { t as i32 } else { -100 })
                .collect();
            Example { ids, labels }
        })
        .collect()
}

/// A direction planted at layer 1 by an adapter (written as a PEFT folder and read back) is
/// the first component there: |cos| >= 0.9999 and >= 99.99% of the variance. The difference
/// rows are `s_t v` plus f32 rounding of resid_post (~1e-7 of |resid| ~ 1); with |s_t| ~ 1
/// the rounding carries < 1e-10 of the variance, so both bounds hold with a wide margin and
/// fail for any wrong layer, sign or missing adapter. Layer 0 runs identical arithmetic in
/// both passes, so its differences are exactly zero (total variance 0, ratios 0).
#[test]
fn planted_direction_is_the_first_component() {
    let be = CpuBackend::new();
    let loaded = load_model(&tiny_llama()).unwrap();
    let cfg = loaded.config.clone();
    let d = cfg.hidden_size;
    let v = unit_vector(d, 11);
    let tmp = TempDir::new("planted");
    let adapter = tmp.join("adapter");
    write_planted_adapter(&adapter, &cfg, 1, &v);
    let (layout, params) = load_peft_adapter(&adapter, &cfg).unwrap();
    let mut model = Model::new(&be, cfg, loaded.weights.as_ref()).unwrap();
    model.set_lora(&be, layout, &params).unwrap();

    let ex = examples(24, 1);
    let batches = token_batches(&ex, 5, false);
    let answer_tokens: usize = ex
        .iter()
        .map(|e| e.labels.iter().filter(|&&l| l >= 0).count())
        .sum();
    let mut calls = 0;
    let r = pca(&be, &mut model, &batches, &[0, 1, 2], 3, |_| calls += 1).unwrap();
    assert_eq!(calls, batches.len());
    assert_eq!(r.tokens as usize, answer_tokens, "one row per answer token");

    let l0 = &r.layers[0];
    assert_eq!(l0.total_variance, 0.0, "layer 0 is before the adapter");
    assert!(l0.ratio.iter().all(|&x| x == 0.0));

    let l1 = &r.layers[1];
    let pc0: Vec<f32> = l1.components[..d].iter().map(|&x| x as f32).collect();
    let cos = dot(&pc0, &v).abs();
    assert!(cos >= 0.9999, "|cos(pc0, v)| = {cos}");
    assert!(l1.ratio[0] >= 0.9999, "variance share {}", l1.ratio[0]);
    // Components are orthonormal (f64, before rounding) to 1e-12.
    for i in 0..3 {
        for j in 0..3 {
            let g: f64 = (0..d)
                .map(|c| l1.components[i * d + c] * l1.components[j * d + c])
                .sum();
            let want = if i == j { 1.0 } else { 0.0 };
            assert!((g - want).abs() < 1e-12, "gram ({i},{j}) = {g}");
        }
    }
    // Layer 2 is downstream: it changes too, but not along a single direction.
    assert!(r.layers[2].total_variance > 0.0);
}

/// Singular values and right singular vectors of `x: [n, d]` (row-major, f64) by one-sided
/// Jacobi (Hestenes): rotate column pairs of `x` until all are orthogonal; the column norms
/// are then the singular values and the accumulated rotations `V` the right singular vectors.
/// It never forms `xᵀx`, so it is an independent reference for the covariance route.
fn svd_values_vectors(x: &[f64], n: usize, d: usize) -> (Vec<f64>, Vec<Vec<f64>>) {
    let mut a = x.to_vec();
    let mut v = vec![0.0; d * d];
    for i in 0..d {
        v[i * d + i] = 1.0;
    }
    for _sweep in 0..60 {
        let mut rotated = false;
        for p in 0..d {
            for q in p + 1..d {
                let (mut alpha, mut beta, mut gamma) = (0.0, 0.0, 0.0);
                for r in 0..n {
                    let (ap, aq) = (a[r * d + p], a[r * d + q]);
                    alpha += ap * ap;
                    beta += aq * aq;
                    gamma += ap * aq;
                }
                if gamma.abs() <= 1e-15 * (alpha * beta).sqrt() || gamma == 0.0 {
                    continue;
                }
                rotated = true;
                let zeta = (beta - alpha) / (2.0 * gamma);
                let t = zeta.signum() / (zeta.abs() + (1.0 + zeta * zeta).sqrt());
                let c = 1.0 / (1.0 + t * t).sqrt();
                let s = c * t;
                for r in 0..n {
                    let (ap, aq) = (a[r * d + p], a[r * d + q]);
                    a[r * d + p] = c * ap - s * aq;
                    a[r * d + q] = s * ap + c * aq;
                }
                for r in 0..d {
                    let (vp, vq) = (v[r * d + p], v[r * d + q]);
                    v[r * d + p] = c * vp - s * vq;
                    v[r * d + q] = s * vp + c * vq;
                }
            }
        }
        if !rotated {
            break;
        }
    }
    let mut pairs: Vec<(f64, Vec<f64>)> = (0..d)
        .map(|j| {
            let sigma = (0..n)
                .map(|r| a[r * d + j] * a[r * d + j])
                .sum::<f64>()
                .sqrt();
            (sigma, (0..d).map(|r| v[r * d + j]).collect())
        })
        .collect();
    pairs.sort_by(|x, y| y.0.total_cmp(&x.0));
    pairs.into_iter().unzip()
}

/// On real differences (the committed fixture adapter, all seven projections adapted, over
/// 200-odd answer tokens, every layer), the streaming covariance + eigensolver equals an
/// exact SVD of the centred difference matrix: `λ_i = σ_i² / (n - 1)` to 1e-9 of `λ_1`, and
/// `|cos| >= 1 - 1e-6` for every vector whose eigenvalue is separated from its neighbours by
/// more than 1e-4 of `λ_1`. Both routes are f64 on the same f32 differences, so they agree to
/// rounding (~1e-13 relative); the vector bound follows from Davis–Kahan (error <= rounding /
/// gap ~ 1e-9).
#[test]
fn covariance_pca_equals_svd_of_the_differences() {
    let be = CpuBackend::new();
    let loaded = load_model(&tiny_llama()).unwrap();
    let cfg = loaded.config.clone();
    let d = cfg.hidden_size;
    let adapter = tiny_fixture("llama-adapter");
    let (layout, params) = load_peft_adapter(&adapter, &cfg).unwrap();
    let mut model = Model::new(&be, cfg, loaded.weights.as_ref()).unwrap();
    model.set_lora(&be, layout, &params).unwrap();
    let ex = examples(30, 2);
    let batches: Vec<TokenBatch> = token_batches(&ex, 4, false);
    let layers = [0usize, 1, 2, 3];
    let k = 8;
    let r = pca(&be, &mut model, &batches, &layers, k, |_| {}).unwrap();

    for (li, &layer) in layers.iter().enumerate() {
        // The reference: the same differences, kept whole.
        let mut rows: Vec<f64> = Vec::new();
        for tb in &batches {
            rows.extend(
                differences(&be, &mut model, tb, &[layer])
                    .unwrap()
                    .remove(0),
            );
        }
        let n = rows.len() / d;
        assert_eq!(n as u64, r.tokens);
        let mean: Vec<f64> = (0..d)
            .map(|j| (0..n).map(|i| rows[i * d + j]).sum::<f64>() / n as f64)
            .collect();
        for i in 0..n {
            for j in 0..d {
                rows[i * d + j] -= mean[j];
            }
        }
        let (sigma, vecs) = svd_values_vectors(&rows, n, d);
        let lam: Vec<f64> = sigma.iter().map(|s| s * s / (n - 1) as f64).collect();
        let got = &r.layers[li];
        assert!(
            lam[0] > 0.0,
            "layer {layer}: the adapter changes every layer"
        );
        let total: f64 = lam.iter().sum();
        assert!((got.total_variance - total).abs() <= 1e-9 * total);
        let mut checked = 0;
        for i in 0..k {
            let err = (got.variance[i] - lam[i]).abs();
            assert!(
                err <= 1e-9 * lam[0],
                "layer {layer} eigenvalue {i}: {} vs SVD {} (err {err:e})",
                got.variance[i],
                lam[i]
            );
            let gap = (if i > 0 {
                lam[i - 1] - lam[i]
            } else {
                f64::INFINITY
            })
            .min(lam[i] - lam[i + 1]);
            if gap > 1e-4 * lam[0] {
                let c: f64 = (0..d)
                    .map(|j| got.components[i * d + j] * vecs[i][j])
                    .sum::<f64>()
                    .abs();
                assert!(c >= 1.0 - 1e-6, "layer {layer} vector {i}: |cos| = {c}");
                checked += 1;
            }
        }
        assert!(
            checked >= k / 2,
            "layer {layer}: only {checked} vectors separated"
        );
    }
}

/// A fine-tune given as a whole model equals the same fine-tune given as an adapter: the
/// planted adapter merged into a model folder (`W + B·A` in f32, `train --merge`'s writer) and
/// read beside the base ([`TwoModels`]) gives the PCA of the base with the adapter. Layer 0's
/// weights are bit for bit the base's (B is zero there, so the merge adds exact zeros), so its
/// differences are exactly zero again; at layer 1 both routes put the planted direction first
/// (bounds as above) and agree on the first variance to 1e-4 and the first component to
/// |cos| >= 1 - 1e-6: the merged weight rounds `W + BA` once to f32 (relative 6e-8), where the
/// adapter route rounds `xWᵀ` and `(xAᵀ)Bᵀ` separately, so the two differ by f32 rounding of
/// resid_post (~1e-7 of it), far inside both bounds. A model of another shape is refused with
/// every difference named.
#[test]
fn a_merged_model_beside_its_base_gives_the_adapter_pca() {
    let be = CpuBackend::new();
    let loaded = load_model(&tiny_llama()).unwrap();
    let cfg = loaded.config.clone();
    let d = cfg.hidden_size;
    let v = unit_vector(d, 11);
    let tmp = TempDir::new("merged-pca");
    let (layout, params) = planted_adapter(&cfg, 1, &v);
    let merged_dir = tmp.join("merged");
    write_merged(&merged_dir, &loaded, &layout, &params).unwrap();
    let merged = load_model(&merged_dir).unwrap();

    let batches = token_batches(&examples(24, 1), 5, false);
    let layers = [0, 1, 2];
    let mut with_adapter = Model::new(&be, cfg.clone(), loaded.weights.as_ref()).unwrap();
    with_adapter.set_lora(&be, layout, &params).unwrap();
    let a = pca(&be, &mut with_adapter, &batches, &layers, 3, |_| {}).unwrap();
    let mut pair = TwoModels::new(&be, &loaded, &merged).unwrap();
    let m = pca(&be, &mut pair, &batches, &layers, 3, |_| {}).unwrap();

    assert_eq!(m.tokens, a.tokens);
    assert_eq!(m.layers[0].total_variance, 0.0, "layer 0 is the base's");
    let (ma, mm) = (&a.layers[1], &m.layers[1]);
    let pc0 = |l: &caft_fast::directions::pca::LayerPca| -> Vec<f32> {
        l.components[..d].iter().map(|&x| x as f32).collect()
    };
    let cos_v = dot(&pc0(mm), &v).abs();
    assert!(cos_v >= 0.9999, "|cos(pc0, v)| = {cos_v}");
    assert!(mm.ratio[0] >= 0.9999, "variance share {}", mm.ratio[0]);
    let cos = (0..d)
        .map(|j| ma.components[j] * mm.components[j])
        .sum::<f64>()
        .abs();
    assert!(cos >= 1.0 - 1e-6, "adapter vs merged pc0: |cos| = {cos}");
    let rel = (mm.variance[0] - ma.variance[0]).abs() / ma.variance[0];
    assert!(
        rel <= 1e-4,
        "first variance {} vs {} (rel {rel:e})",
        mm.variance[0],
        ma.variance[0]
    );
    assert!(m.layers[2].total_variance > 0.0);

    let qwen = load_model(&tiny_fixture("qwen2")).unwrap();
    let e = TwoModels::new(&be, &loaded, &qwen)
        .err()
        .expect("another shape")
        .to_string();
    assert!(e.contains("is not a fine-tune of"), "{e}");
    assert!(
        e.contains("architecture Qwen2 (fine-tuned) vs Llama (base)"),
        "{e}"
    );
    assert!(e.contains("intermediate_size"), "{e}");
}
