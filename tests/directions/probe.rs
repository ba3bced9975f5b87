//! `directions probe-select`: the component along which labelled probes differ is chosen first,
//! its score matches one computed independently (each probe run alone, no padding), the file
//! holds the chosen rows bit for bit, and bad probe files are errors naming file and line.

use crate::support::*;
use caft_fast::backend::cpu::CpuBackend;
use caft_fast::directions::probe::separation;
use caft_fast::linalg::orthonormalize;
use caft_fast::model::ablation::{save_directions, DirectionSet, Directions};
use caft_fast::model::loader::load_model;
use caft_fast::model::transformer::{Batch, Model};
use caft_fast::util::rng::Rng;
use std::path::Path;

/// The layer the probes are scored at, and the row the planted direction is put in.
const LAYER: usize = 2;
const PLANTED_ROW: usize = 3;
const K: usize = 6;

/// `n` probes: random ids (3..253), lengths 8..=13, label `pos` or `neg` alternately; a `pos`
/// probe carries token 200 and a `neg` probe token 100 at three random positions after the
/// first, so the two labels differ in what the tokens say and nothing else.
fn probes(n: usize, seed: u64) -> Vec<(Vec<u32>, &'static str)> {
    let mut rng = Rng::new(seed);
    (0..n)
        .map(|i| {
            let len = 8 + rng.below(6);
            let mut ids: Vec<u32> = (0..len).map(|_| 3 + rng.below(250) as u32).collect();
            let (tok, label) = if i % 2 == 0 {
                (200, "pos")
            } else {
                (100, "neg")
            };
            for _ in 0..3 {
                ids[1 + rng.below(len - 1)] = tok;
            }
            (ids, label)
        })
        .collect()
}

fn write_probes(path: &Path, ps: &[(Vec<u32>, &str)]) {
    let s: String = ps
        .iter()
        .map(|(ids, l)| format!("{}\n", serde_json::json!({"input_ids": ids, "label": l})))
        .collect();
    std::fs::write(path, s).unwrap();
}

/// Each probe's base-model resid_post at LAYER averaged over positions >= 1, one probe per
/// forward pass (no padding, unlike the batched code under test).
fn features(ps: &[(Vec<u32>, &str)]) -> Vec<Vec<f64>> {
    let be = CpuBackend::new();
    let loaded = load_model(&tiny_llama()).unwrap();
    let d = loaded.config.hidden_size;
    let mut model = Model::new(&be, loaded.config.clone(), loaded.weights.as_ref()).unwrap();
    ps.iter()
        .map(|(ids, _)| {
            let b = Batch::padded(1, ids.len(), ids.clone(), vec![-100; ids.len()]);
            model.forward(&be, &b, false).unwrap();
            let x = model.resid_post(&be, LAYER).unwrap();
            let mut m = vec![0f64; d];
            for t in 1..ids.len() {
                for (a, &v) in m.iter_mut().zip(&x[t * d..(t + 1) * d]) {
                    *a += v as f64 / (ids.len() - 1) as f64;
                }
            }
            m
        })
        .collect()
}

/// Cohen's d of the features projected on `u` (unit), `pos` minus `neg`.
fn cohen_d(feats: &[Vec<f64>], ps: &[(Vec<u32>, &str)], u: &[f32]) -> f64 {
    let mut g: [Vec<f64>; 2] = [vec![], vec![]];
    for (f, (_, l)) in feats.iter().zip(ps) {
        let p: f64 = f.iter().zip(u).map(|(&a, &b)| a * b as f64).sum();
        g[usize::from(*l == "pos")].push(p);
    }
    separation(&g[0], &g[1]).0
}

/// A PCA-like file at LAYER: K orthonormal rows. PLANTED_ROW is the normalised mean
/// difference of the two labels' features tilted by half a random unit vector (cos 0.89 with
/// it), so the other rows, orthogonal to it, still carry some of the difference and their
/// ranking is not a tie at zero.
fn write_components(path: &Path, feats: &[Vec<f64>], ps: &[(Vec<u32>, &str)]) -> Vec<f32> {
    let d = feats[0].len();
    let mut delta = vec![0f64; d];
    for (f, (_, l)) in feats.iter().zip(ps) {
        let s = if *l == "pos" { 1.0 } else { -1.0 };
        for (a, &v) in delta.iter_mut().zip(f) {
            *a += s * v;
        }
    }
    let n = delta.iter().map(|x| x * x).sum::<f64>().sqrt();
    let tilt = unit_vector(d, 99);
    let mut rows: Vec<f64> = delta
        .iter()
        .zip(&tilt)
        .map(|(&a, &t)| a / n + 0.5 * t as f64)
        .collect();
    for i in 1..K {
        rows.extend(unit_vector(d, 100 + i as u64).iter().map(|&x| x as f64));
    }
    // Gram–Schmidt with the planted direction first keeps it; then move it to its row.
    let q = orthonormalize(&rows, K, d).unwrap();
    let mut order: Vec<usize> = (1..K).collect();
    order.insert(PLANTED_ROW, 0);
    let q: Vec<f32> = order
        .iter()
        .flat_map(|&r| q[r * d..(r + 1) * d].iter().map(|&x| x as f32))
        .collect();
    let dirs = Directions {
        sets: vec![DirectionSet {
            layer: LAYER,
            k: K,
            d,
            q: q.clone(),
        }],
        sha256: String::new(),
        source: "test".into(),
    };
    save_directions(path, &dirs).unwrap();
    q
}

#[test]
fn separation_matches_hand_computed_values() {
    // means 1 and 3, pooled sd 1: d = 2; AUC: 8.5 of 9 pairs (one tie counted half).
    let (d, auc) = separation(&[0.0, 1.0, 2.0], &[2.0, 3.0, 4.0]);
    assert!((d - 2.0).abs() < 1e-12, "d = {d}");
    assert!((auc - 8.5 / 9.0).abs() < 1e-12, "auc = {auc}");
    let (d, auc) = separation(&[2.0, 3.0, 4.0], &[0.0, 1.0, 2.0]);
    assert!((d + 2.0).abs() < 1e-12 && (auc - 0.5 / 9.0).abs() < 1e-12);
    assert_eq!(separation(&[1.0, 1.0], &[1.0, 1.0]), (0.0, 0.5));
}

/// The planted row (near the labels' mean-difference direction) is chosen first, with the d an
/// independent computation gives (to 1e-6 relative: f32 directions, f64 sums, the same f32
/// activations whatever the batching), the second choice is the best of the rest by the same
/// independent |d|, and the output holds exactly those rows.
#[test]
fn the_separating_component_is_chosen_first() {
    let tmp = TempDir::new("probe-planted");
    let ps = probes(40, 7);
    let feats = features(&ps);
    let probes_path = tmp.join("probes.jsonl");
    write_probes(&probes_path, &ps);
    let pcs = tmp.join("pcs.safetensors");
    let q = write_components(&pcs, &feats, &ps);
    let d = feats[0].len();
    let want: Vec<f64> = (0..K)
        .map(|r| cohen_d(&feats, &ps, &q[r * d..(r + 1) * d]))
        .collect();
    let mut rank: Vec<usize> = (0..K).collect();
    rank.sort_by(|&a, &b| want[b].abs().total_cmp(&want[a].abs()));
    assert_eq!(rank[0], PLANTED_ROW, "independent |d| per row: {want:?}");
    // A real margin, so the test says something about the rule and not about rounding.
    assert!(want[rank[0]].abs() > 1.5 * want[rank[1]].abs(), "{want:?}");

    let out = tmp.join("ablate.safetensors");
    let json = tmp.join("scores.json");
    let run = directions(&[
        "probe-select",
        "--model",
        s(&tiny_llama()),
        "--from",
        s(&pcs),
        "--probes",
        s(&probes_path),
        "--per-layer",
        "2",
        "--batch-size",
        "7",
        "--device",
        "cpu",
        "--threads",
        "1",
        "-o",
        s(&out),
        "--json",
        s(&json),
    ]);
    assert_ok(&run);
    let err = stderr(&run);
    assert!(err.contains("layer 2: chosen 3"), "{err}");

    let t = read_tensors(&out);
    let (shape, rows) = &t[&format!("layer.{LAYER}")];
    assert_eq!(shape, &vec![2, d]);
    assert_eq!(&rows[..d], &q[PLANTED_ROW * d..(PLANTED_ROW + 1) * d]);
    assert_eq!(&rows[d..], &q[rank[1] * d..(rank[1] + 1) * d]);

    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let layer = &v["layers"][0];
    assert_eq!(layer["layer"], LAYER);
    assert_eq!(layer["chosen"], serde_json::json!([PLANTED_ROW, rank[1]]));
    assert_eq!(v["labels"], serde_json::json!(["neg", "pos"]));
    for (r, w) in want.iter().enumerate() {
        let got = layer["scores"][r]["cohen_d"].as_f64().unwrap();
        assert!(
            (got - w).abs() <= 1e-6 * w.abs().max(1.0),
            "row {r}: {got} vs {w}"
        );
    }
    let auc = layer["scores"][PLANTED_ROW]["auc"].as_f64().unwrap();
    assert!(
        auc > 0.95,
        "the planted row separates the labels: AUC {auc}"
    );
}

#[test]
fn bad_probe_files_are_errors_naming_the_problem() {
    let tmp = TempDir::new("probe-errors");
    let ps = probes(8, 3);
    let pcs = tmp.join("pcs.safetensors");
    write_components(&pcs, &features(&ps), &ps);
    let run = |name: &str, body: &str| {
        let p = tmp.join(name);
        std::fs::write(&p, body).unwrap();
        directions(&[
            "probe-select",
            "--model",
            s(&tiny_llama()),
            "--from",
            s(&pcs),
            "--probes",
            s(&p),
            "--device",
            "cpu",
            "-o",
            s(&tmp.join("out.safetensors")),
        ])
    };
    assert_error(&run("empty.jsonl", "\n\n"), &["no probe sentences"]);
    let one = "{\"input_ids\": [5, 6, 7], \"label\": \"pos\"}\n".repeat(4);
    assert_error(&run("one.jsonl", &one), &["exactly two are needed"]);
    let bad = format!("{one}{{\"input_ids\": [5, 6], \"label\": \"neg\"}}\n{{not json\n");
    assert_error(&run("bad.jsonl", &bad), &["bad.jsonl:6: malformed JSON"]);
    let nolabel = format!("{one}{{\"input_ids\": [5, 6]}}\n");
    assert_error(
        &run("nolabel.jsonl", &nolabel),
        &["nolabel.jsonl:5: missing \"label\""],
    );
    let lonely = format!("{one}{{\"input_ids\": [5, 6], \"label\": \"neg\"}}\n");
    assert_error(
        &run("lonely.jsonl", &lonely),
        &["label \"neg\" has 1 probe(s)"],
    );
    assert!(!tmp.join("out.safetensors").exists(), "no output on error");
}
