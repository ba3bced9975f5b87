//! `caft-fast directions` end to end on the tiny Llama fixture: pca recovers a planted
//! direction and writes a well-formed file, and takes a fully fine-tuned model in place of an
//! adapter; select keeps exactly the picked rows; random and import write files that
//! `train --ablate` loads; bad input gives clear errors (exit 2).

use crate::support::*;
use caft_fast::model::ablation::{load_directions, random_directions};
use std::path::Path;

/// Write the planted adapter (layer 1) and data; run pca at layers 1 and 2, 3 components.
fn planted_pca(tmp: &TempDir) -> (Vec<f32>, std::path::PathBuf) {
    let cfg = tiny_config();
    let v = unit_vector(cfg.hidden_size, 5);
    let adapter = tmp.join("adapter");
    write_planted_adapter(&adapter, &cfg, 1, &v);
    let data = tmp.join("data.jsonl");
    write_tokens_jsonl(&data, 20, 3);
    let out = tmp.join("pcs.safetensors");
    let ran = directions(&[
        "pca",
        "--model",
        s(&tiny_llama()),
        "--adapter",
        s(&adapter),
        "--data",
        s(&data),
        "--layers",
        "1,2",
        "--components",
        "3",
        "--device",
        "cpu",
        "--batch-size",
        "3",
        "-o",
        s(&out),
    ]);
    assert_ok(&ran);
    let err = stderr(&ran);
    assert!(err.contains("layer 1:"), "summary per layer:\n{err}");
    (v, out)
}

/// The pca file: `layer.L` [3, 64] with orthonormal rows (f32: 1e-6), the planted direction
/// first at layer 1 (|cos| >= 0.9999, see tests/directions/pca.rs for the bound) with >= 99.99%
/// of the variance; variances descending, ratios in [0, 1] summing to <= 1; and the
/// metadata names the inputs.
#[test]
fn pca_recovers_the_planted_direction_and_writes_a_complete_file() {
    let tmp = TempDir::new("pca");
    let (v, out) = planted_pca(&tmp);
    let t = read_tensors(&out);
    let names: Vec<&String> = t.keys().collect();
    assert_eq!(
        names,
        [
            "explained_variance.1",
            "explained_variance.2",
            "explained_variance_ratio.1",
            "explained_variance_ratio.2",
            "layer.1",
            "layer.2"
        ]
    );
    for l in [1, 2] {
        let (shape, q) = &t[&format!("layer.{l}")];
        assert_eq!(shape, &[3, 64]);
        for i in 0..3 {
            for j in 0..3 {
                let g = dot(&q[i * 64..(i + 1) * 64], &q[j * 64..(j + 1) * 64]);
                let want = if i == j { 1.0 } else { 0.0 };
                assert!((g - want).abs() < 1e-6, "layer {l} gram ({i},{j}) = {g}");
            }
        }
        let (_, var) = &t[&format!("explained_variance.{l}")];
        let (_, ratio) = &t[&format!("explained_variance_ratio.{l}")];
        assert!(var.windows(2).all(|w| w[0] >= w[1]), "descending: {var:?}");
        assert!(ratio.iter().all(|&r| (0.0..=1.0).contains(&r)));
        assert!(ratio.iter().map(|&r| r as f64).sum::<f64>() <= 1.0 + 1e-6);
    }
    let (_, q1) = &t["layer.1"];
    let cos = dot(&q1[..64], &v).abs();
    assert!(cos >= 0.9999, "|cos(pc0, v)| = {cos}");
    assert!(t["explained_variance_ratio.1"].1[0] >= 0.9999);

    let bytes = std::fs::read(&out).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let about: serde_json::Value =
        serde_json::from_str(&meta.metadata().as_ref().unwrap()["caft_fast"]).unwrap();
    assert_eq!(about["layers"], serde_json::json!([1, 2]));
    assert_eq!(about["components"], 3);
    assert!(about["adapter"].as_str().unwrap().ends_with("adapter"));
}

/// select keeps exactly the picked rows, bit for bit and in the order given; the result loads
/// as ablation directions for the model; ranges work.
#[test]
fn select_keeps_exactly_the_picked_rows() {
    let tmp = TempDir::new("select");
    let (_, pcs) = planted_pca(&tmp);
    let out = tmp.join("ablate.safetensors");
    assert_ok(&directions(&[
        "select",
        "--from",
        s(&pcs),
        "--pick",
        "1:0",
        "2:2,0-1",
        "-o",
        s(&out),
    ]));
    let src = read_tensors(&pcs);
    let got = read_tensors(&out);
    assert_eq!(got.keys().collect::<Vec<_>>(), ["layer.1", "layer.2"]);
    let row = |l: usize, r: usize| src[&format!("layer.{l}")].1[r * 64..(r + 1) * 64].to_vec();
    assert_eq!(got["layer.1"].0, [1, 64]);
    assert_eq!(got["layer.1"].1, row(1, 0));
    assert_eq!(got["layer.2"].0, [3, 64]);
    let want2: Vec<f32> = [2, 0, 1].iter().flat_map(|&r| row(2, r)).collect();
    assert_eq!(got["layer.2"].1, want2);
    let dirs = load_directions(&out, None, 64, 4).expect("loads as ablation directions");
    assert_eq!(dirs.layers(), [1, 2]);
    assert_eq!(dirs.get(2).unwrap().k, 3);
}

/// Every bad pick names the problem.
#[test]
fn bad_picks_give_clear_errors() {
    let tmp = TempDir::new("badpick");
    let (_, pcs) = planted_pca(&tmp);
    let out = tmp.join("x.safetensors");
    let sel = |pick: &[&str]| {
        let mut a = vec!["select", "--from", s(&pcs), "-o", s(&out), "--pick"];
        a.extend_from_slice(pick);
        directions(&a)
    };
    assert_error(&sel(&["3:0"]), &["no components for layer 3"]);
    assert_error(&sel(&["1:3"]), &["row 3 does not exist"]);
    assert_error(&sel(&["1:x"]), &["is not a number"]);
    assert_error(&sel(&["1"]), &["expected LAYER:ROWS"]);
    assert_error(&sel(&["1:0,0"]), &["picked twice"]);
    assert_error(&sel(&["1:0", "1:1"]), &["layer 1 is picked twice"]);
    assert_error(&sel(&["2:2-1"]), &["runs backwards"]);
    assert!(!out.exists(), "no output after an error");
    let missing = tmp.join("missing.safetensors");
    let o = directions(&[
        "select",
        "--from",
        s(&missing),
        "--pick",
        "1:0",
        "-o",
        s(&out),
    ]);
    assert_error(&o, &["missing.safetensors"]);
}

/// random writes the library's random directions (the same seed gives the same bits) and the
/// file loads for the model; a layer past the model is refused.
#[test]
fn random_directions_file() {
    let tmp = TempDir::new("random");
    let out = tmp.join("rand.safetensors");
    let args = |layers: &'static str| {
        vec![
            "random".to_string(),
            "--model".into(),
            s(&tiny_llama()).into(),
            "--k".into(),
            "8".into(),
            "--layers".into(),
            layers.into(),
            "--seed".into(),
            "3".into(),
            "-o".into(),
            s(&out).into(),
        ]
    };
    let run = |a: Vec<String>| directions(&a.iter().map(|x| x.as_str()).collect::<Vec<_>>());
    assert_ok(&run(args("2,1")));
    let want = random_directions(3, 8, 64, &[1, 2]).unwrap();
    let got = read_tensors(&out);
    for set in &want.sets {
        assert_eq!(got[&format!("layer.{}", set.layer)].1, set.q);
    }
    let dirs = load_directions(&out, None, 64, 4).unwrap();
    assert_eq!(dirs.sha256, want.sha256, "file bytes are the library's");
    assert_error(&run(args("1,4")), &["layer 4 does not exist"]);
}

/// Span of rows `a` ([ka, d]) contains each row of `b`: `|x - QᵀQx| <= 1e-5 |x|` for an
/// orthonormal `a` (f32 rounding, see tests/model/ablation_directions.rs for the bound).
fn assert_same_span(a: &[f32], b: &[f32], d: usize) {
    for x in b.chunks_exact(d) {
        let mut r: Vec<f64> = x.iter().map(|&v| v as f64).collect();
        for q in a.chunks_exact(d) {
            let c = dot(q, x);
            for (ri, qi) in r.iter_mut().zip(q) {
                *ri -= c * *qi as f64;
            }
        }
        let res = r.iter().map(|v| v * v).sum::<f64>().sqrt();
        let nx = dot(x, x).sqrt();
        assert!(res <= 1e-5 * nx, "row outside the span: {res} of {nx}");
    }
}

/// import: a .npy array becomes one layer's orthonormalised directions; a safetensors file
/// with other tensor names is renamed by a pattern; mismatches are refused.
#[test]
fn import_npy_and_renamed_safetensors() {
    let tmp = TempDir::new("import");
    let mut rng = caft_fast::util::rng::Rng::new(9);
    let raw = rng.normal_vec(2 * 64);
    let npy = tmp.join("dirs.npy");
    write_npy_f32(&npy, &raw, 2, 64);
    let out = tmp.join("out.safetensors");
    let m = s(&tiny_llama()).to_string();
    assert_ok(&directions(&[
        "import",
        "--npy",
        s(&npy),
        "--layer",
        "2",
        "--model",
        &m,
        "-o",
        s(&out),
    ]));
    let dirs = load_directions(&out, None, 64, 4).unwrap();
    assert_eq!(dirs.layers(), [2]);
    assert_same_span(&dirs.get(2).unwrap().q, &raw, 64);
    // Without a model the width must be given; a wrong width is refused.
    assert_error(
        &directions(&["import", "--npy", s(&npy), "--layer", "2", "-o", s(&out)]),
        &["--d-model"],
    );
    assert_error(
        &directions(&[
            "import",
            "--npy",
            s(&npy),
            "--layer",
            "2",
            "--d-model",
            "32",
            "-o",
            s(&out),
        ]),
        &["width 64"],
    );

    // Safetensors under other names: blocks.{L}.dir, plus an unrelated tensor.
    let raw3 = rng.normal_vec(3 * 64);
    let other = tmp.join("other.safetensors");
    let st = caft_fast::io::f32_safetensors(&[
        ("blocks.1.dir".into(), vec![2, 64], raw.clone()),
        ("blocks.3.dir".into(), vec![3, 64], raw3.clone()),
        ("scale".into(), vec![1], vec![1.0]),
    ])
    .unwrap();
    std::fs::write(&other, st).unwrap();
    assert_ok(&directions(&[
        "import",
        "--from",
        s(&other),
        "--rename",
        "blocks.{L}.dir",
        "--model",
        &m,
        "-o",
        s(&out),
    ]));
    let dirs = load_directions(&out, None, 64, 4).unwrap();
    assert_eq!(dirs.layers(), [1, 3]);
    assert_same_span(&dirs.get(1).unwrap().q, &raw, 64);
    assert_same_span(&dirs.get(3).unwrap().q, &raw3, 64);
    let imp = |pat: &str| {
        directions(&[
            "import",
            "--from",
            s(&other),
            "--rename",
            pat,
            "--model",
            &m,
            "-o",
            s(&out),
        ])
    };
    assert_error(&imp("heads.{L}"), &["no tensor name matches"]);
    assert_error(&imp("blocks.dir"), &["exactly once"]);
}

/// pca refuses bad requests before loading data: a layer past the model, zero components, a
/// missing adapter folder, and an adapter for another width.
#[test]
fn pca_bad_input() {
    let tmp = TempDir::new("pcabad");
    let cfg = tiny_config();
    let adapter = tmp.join("adapter");
    write_planted_adapter(&adapter, &cfg, 1, &unit_vector(64, 1));
    let data = tmp.join("data.jsonl");
    write_tokens_jsonl(&data, 4, 1);
    let out = tmp.join("pcs.safetensors");
    let m = s(&tiny_llama()).to_string();
    let run = |layers: &str, k: &str, adapter: &Path| {
        directions(&[
            "pca",
            "--model",
            &m,
            "--adapter",
            s(adapter),
            "--data",
            s(&data),
            "--layers",
            layers,
            "--components",
            k,
            "--device",
            "cpu",
            "-o",
            s(&out),
        ])
    };
    assert_error(&run("1,4", "2", &adapter), &["layer 4 does not exist"]);
    assert_error(&run("1", "0", &adapter), &["--components 0"]);
    assert_error(&run("1,1", "2", &adapter), &["listed twice"]);
    assert_error(&run("1", "2", &tmp.join("nope")), &["adapter_config.json"]);
    // The Qwen2 fixture's adapter shapes (ffn 80) do not fit the Llama fixture (ffn 96).
    let qcfg = caft_fast::model::loader::load_model(&tiny_fixture("qwen2"))
        .unwrap()
        .config;
    let other = tmp.join("qwen-adapter");
    write_planted_adapter(&other, &qcfg, 0, &unit_vector(qcfg.hidden_size, 1));
    assert_ne!(qcfg.intermediate_size, cfg.intermediate_size);
    assert_error(&run("1", "2", &other), &["has shape"]);
    assert!(!out.exists());
}

/// `directions pca --model BASE --tuned-model DIR` with `--layers` 1,3 and 3 components.
fn pca_tuned(base: &Path, tuned: &Path, data: &Path, out: &Path) -> std::process::Output {
    directions(&[
        "pca",
        "--model",
        s(base),
        "--tuned-model",
        s(tuned),
        "--data",
        s(data),
        "--layers",
        "1,3",
        "--components",
        "3",
        "--device",
        "cpu",
        "--batch-size",
        "3",
        "-o",
        s(out),
    ])
}

/// The folder `train --method full` writes (<run>/model, 2 steps on the tiny Llama) is what
/// `pca --tuned-model` reads: the file has the layers asked for with orthonormal rows (f32:
/// 1e-6), names the tuned model in its metadata, and holds what the library computes from
/// the same two models on the same batches (`TwoModels`, the same code in f64 on the same
/// CPU, so equal up to the file's f32 rounding: variances to 1e-6 relative, components whose
/// variance stands apart from their neighbours' by more than 1e-3 of the first to |cos| >=
/// 1 - 1e-6, the first at least). The base given as its own fine-tune runs identical
/// arithmetic on both sides: total variance exactly 0.
#[test]
fn pca_takes_a_fully_fine_tuned_model() {
    use caft_fast::data::{load_examples, token_batches};
    use caft_fast::directions::pca::{pca, TwoModels};
    use caft_fast::model::loader::load_model;
    let tmp = TempDir::new("pca-full");
    let base = tiny_llama();
    let data = tmp.join("data.jsonl");
    write_tokens_jsonl(&data, 20, 3);
    let run = tmp.join("run");
    assert_ok(&train(&[
        "--model",
        s(&base),
        "--data",
        s(&data),
        "-o",
        s(&run),
        "--method",
        "full",
        "--max-steps",
        "2",
        "--batch-size",
        "4",
        "--lr",
        "1e-3",
    ]));
    let tuned = run.join("model");
    let out = tmp.join("pcs.safetensors");
    assert_ok(&pca_tuned(&base, &tuned, &data, &out));
    let t = read_tensors(&out);
    let bytes = std::fs::read(&out).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let about: serde_json::Value =
        serde_json::from_str(&meta.metadata().as_ref().unwrap()["caft_fast"]).unwrap();
    assert_eq!(about["tuned_model"], s(&tuned));
    assert!(about["adapter"].is_null());

    let be = caft_fast::backend::cpu::CpuBackend::new();
    let (b, m) = (load_model(&base).unwrap(), load_model(&tuned).unwrap());
    let examples = load_examples(&data, &b, false, 2048).unwrap();
    let batches = token_batches(&examples, 3, false);
    let mut pair = TwoModels::new(&be, &b, &m).unwrap();
    let r = pca(&be, &mut pair, &batches, &[1, 3], 3, |_| {}).unwrap();
    for l in &r.layers {
        let (shape, q) = &t[&format!("layer.{}", l.layer)];
        assert_eq!(shape, &[3, 64]);
        let var = &t[&format!("explained_variance.{}", l.layer)].1;
        assert!(
            l.variance[0] > 0.0,
            "layer {}: the fine-tune changed it",
            l.layer
        );
        let mut checked = 0;
        for i in 0..3 {
            let row = &q[i * 64..(i + 1) * 64];
            for j in 0..3 {
                let g = dot(row, &q[j * 64..(j + 1) * 64]);
                let want = if i == j { 1.0 } else { 0.0 };
                assert!(
                    (g - want).abs() < 1e-6,
                    "layer {} gram ({i},{j}) = {g}",
                    l.layer
                );
            }
            let rel = (var[i] as f64 - l.variance[i]).abs() / l.variance[i];
            assert!(
                rel <= 1e-6,
                "layer {} variance {i}: {} vs {}",
                l.layer,
                var[i],
                l.variance[i]
            );
            let prev = if i > 0 {
                l.variance[i - 1]
            } else {
                f64::INFINITY
            };
            let next = l.variance.get(i + 1).copied().unwrap_or(0.0);
            if (prev - l.variance[i]).min(l.variance[i] - next) > 1e-3 * l.variance[0] {
                let lib: Vec<f32> = l.components[i * 64..(i + 1) * 64]
                    .iter()
                    .map(|&x| x as f32)
                    .collect();
                let c = dot(row, &lib).abs();
                assert!(
                    c >= 1.0 - 1e-6,
                    "layer {} component {i}: |cos| = {c}",
                    l.layer
                );
                checked += 1;
            }
        }
        assert!(checked >= 1, "layer {}: no component stands apart", l.layer);
    }

    let same = tmp.join("same.safetensors");
    assert_ok(&pca_tuned(&base, &base, &data, &same));
    let t = read_tensors(&same);
    for l in [1, 3] {
        let var = &t[&format!("explained_variance.{l}")].1;
        assert!(var.iter().all(|&x| x == 0.0), "layer {l}: {var:?}");
    }
}

/// Which fine-tune: exactly one of --adapter and --tuned-model; a model folder given as
/// --adapter, or an adapter folder as --tuned-model, is named for what it is; a tuned model of
/// another shape is refused with the differences; nothing is written.
#[test]
fn pca_tuned_model_bad_input() {
    let tmp = TempDir::new("pcatunedbad");
    let cfg = tiny_config();
    let adapter = tmp.join("adapter");
    write_planted_adapter(&adapter, &cfg, 1, &unit_vector(64, 1));
    let data = tmp.join("data.jsonl");
    write_tokens_jsonl(&data, 4, 1);
    let out = tmp.join("pcs.safetensors");
    let base = tiny_llama();
    let run = |which: &[&str]| {
        let mut args = vec!["pca", "--model", s(&base), "--data", s(&data)];
        args.extend_from_slice(&["--layers", "1", "--device", "cpu", "-o", s(&out)]);
        args.extend_from_slice(which);
        directions(&args)
    };
    assert_error(&run(&[]), &["--adapter", "--tuned-model"]);
    assert_error(
        &run(&["--adapter", s(&adapter), "--tuned-model", s(&base)]),
        &["cannot be used with"],
    );
    assert_error(
        &run(&["--adapter", s(&base)]),
        &["model folder", "--tuned-model"],
    );
    assert_error(
        &run(&["--tuned-model", s(&adapter)]),
        &["adapter folder", "--adapter"],
    );
    assert_error(
        &run(&["--tuned-model", s(&tiny_fixture("qwen2"))]),
        &[
            "is not a fine-tune of",
            "intermediate_size 80 (fine-tuned) vs 96 (base)",
        ],
    );
    assert_error(
        &run(&["--tuned-model", s(&tmp.join("nope"))]),
        &["--tuned-model", "nope"],
    );
    assert!(!out.exists());
}

/// `--all-tokens` compares every real token (the metadata counts them), the default only the
/// labelled half of each record.
#[test]
fn all_tokens_uses_every_real_token() {
    let tmp = TempDir::new("alltok");
    let cfg = tiny_config();
    let adapter = tmp.join("adapter");
    write_planted_adapter(&adapter, &cfg, 1, &unit_vector(64, 2));
    let data = tmp.join("data.jsonl");
    write_tokens_jsonl(&data, 7, 4);
    let model = tiny_llama();
    let (mut all, mut answers) = (0u64, 0u64);
    for line in std::fs::read_to_string(&data).unwrap().lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        all += v["input_ids"].as_array().unwrap().len() as u64;
        answers += v["labels"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|l| l.as_i64().unwrap() >= 0)
            .count() as u64;
    }
    for (flag, want) in [(None, answers), (Some("--all-tokens"), all)] {
        let out = tmp.join("pcs.safetensors");
        let mut args = vec![
            "pca",
            "--model",
            s(&model),
            "--adapter",
            s(&adapter),
            "--data",
            s(&data),
            "--layers",
            "1",
            "--components",
            "2",
            "--device",
            "cpu",
            "-o",
            s(&out),
        ];
        args.extend(flag);
        assert_ok(&directions(&args));
        let bytes = std::fs::read(&out).unwrap();
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        let about: serde_json::Value =
            serde_json::from_str(&meta.metadata().as_ref().unwrap()["caft_fast"]).unwrap();
        assert_eq!(about["tokens"], want, "{flag:?}");
    }
}
