//! SAE latents as directions: every activation function against a hand computation, both file
//! layouts, and the ranking on the tiny model with a planted adapter, given as an adapter and
//! merged into a whole model.

use crate::support::*;
use caft_fast::directions::sae::{Activation, Sae};
use safetensors::Dtype;
use std::path::Path;

/// Write tensors (F32 unless given as I64) as safetensors.
fn write_st(path: &Path, f32s: &[(&str, Vec<usize>, Vec<f32>)], i64s: &[(&str, i64)]) {
    let mut tensors: Vec<(&str, Dtype, Vec<usize>, Vec<u8>)> = f32s
        .iter()
        .map(|(n, s, d)| (*n, Dtype::F32, s.clone(), f32_le(d)))
        .collect();
    tensors.extend(
        i64s.iter()
            .map(|(n, v)| (*n, Dtype::I64, vec![], v.to_le_bytes().to_vec())),
    );
    write_safetensors(path, &tensors);
}

/// d = 2, m = 3: W_enc columns (1,0), (0,1), (1,1); b_enc (0, -1, 0.5); b_dec (0.5, 0).
fn small_saelens(path: &Path, threshold: Option<Vec<f32>>) {
    let mut t = vec![
        ("W_enc", vec![2, 3], vec![1.0, 0.0, 1.0, 0.0, 1.0, 1.0]),
        ("b_enc", vec![3], vec![0.0, -1.0, 0.5]),
        ("W_dec", vec![3, 2], vec![1.0, 0.0, 0.0, 1.0, 0.6, 0.8]),
        ("b_dec", vec![2], vec![0.5, 0.0]),
    ];
    if let Some(th) = threshold {
        t.push(("threshold", vec![3], th));
    }
    write_st(path, &t, &[]);
}

/// The pre-activations of x = (2, 0.5) and x = (-1, 3) for the SAE above (no b_dec
/// subtraction): (2, -0.5, 3) and (-1, 2, 2.5).
const X: [f32; 4] = [2.0, 0.5, -1.0, 3.0];

#[test]
fn activations_match_hand_computation() {
    let tmp = TempDir::new("sae-act");
    let p = tmp.join("sae.safetensors");
    small_saelens(&p, None);
    let relu = Sae::load(&p, None, None).unwrap();
    assert_eq!(relu.act, Activation::Relu);
    assert_eq!(relu.encode(&X), [2.0, 0.0, 3.0, 0.0, 2.0, 2.5]);

    small_saelens(&p, Some(vec![2.5, 0.0, 2.6]));
    let jump = Sae::load(&p, None, None).unwrap();
    assert!(matches!(jump.act, Activation::JumpRelu(_)));
    // Kept where pre > θ_j: 2 > 2.5 no, -0.5 > 0 no, 3 > 2.6 yes; -1 no, 2 > 0 yes, 2.5 no.
    assert_eq!(jump.encode(&X), [0.0, 0.0, 3.0, 0.0, 2.0, 0.0]);

    let topk = Sae::load(&p, Some("topk"), Some(1)).unwrap();
    assert_eq!(topk.encode(&X), [0.0, 0.0, 3.0, 0.0, 0.0, 2.5]);

    // dictionary_learning layout: encoder.weight [m, d] = W_encᵀ, decoder.weight [d, m]; b_dec
    // is subtracted first: x - b_dec = (1.5, 0.5), (-1.5, 3) -> pre (1.5, -0.5, 2.5),
    // (-1.5, 2, 2); BatchTopK's global threshold 1.8 keeps 2.5; 2, 2.
    let q = tmp.join("dl.safetensors");
    write_st(
        &q,
        &[
            (
                "encoder.weight",
                vec![3, 2],
                vec![1.0, 0.0, 0.0, 1.0, 1.0, 1.0],
            ),
            ("encoder.bias", vec![3], vec![0.0, -1.0, 0.5]),
            (
                "decoder.weight",
                vec![2, 3],
                vec![1.0, 0.0, 0.6, 0.0, 1.0, 0.8],
            ),
            ("b_dec", vec![2], vec![0.5, 0.0]),
            ("threshold", vec![], vec![1.8]),
        ],
        &[("k", 2)],
    );
    let btk = Sae::load(&q, None, None).unwrap();
    assert_eq!(btk.act, Activation::BatchTopK(1.8));
    assert_eq!(
        btk.w_dec, relu.w_dec,
        "decoder rows read through the transpose"
    );
    assert_eq!(btk.encode(&X), [0.0, 0.0, 2.5, 0.0, 2.0, 2.0]);

    // Older dictionary_learning files call the decoder bias `bias`: the same SAE.
    let q2 = tmp.join("dl-bias.safetensors");
    write_st(
        &q2,
        &[
            (
                "encoder.weight",
                vec![3, 2],
                vec![1.0, 0.0, 0.0, 1.0, 1.0, 1.0],
            ),
            ("encoder.bias", vec![3], vec![0.0, -1.0, 0.5]),
            (
                "decoder.weight",
                vec![2, 3],
                vec![1.0, 0.0, 0.6, 0.0, 1.0, 0.8],
            ),
            ("bias", vec![2], vec![0.5, 0.0]),
            ("threshold", vec![], vec![1.8]),
        ],
        &[("k", 2)],
    );
    let btk2 = Sae::load(&q2, None, None).unwrap();
    assert_eq!(btk2.encode(&X), [0.0, 0.0, 2.5, 0.0, 2.0, 2.0]);

    // Bad files say what is wrong.
    let e = Sae::load(&p, Some("batchtopk"), None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("scalar `threshold`"), "{e}");
    let e = Sae::load(&p, Some("gated"), None).unwrap_err().to_string();
    assert!(e.contains("expected relu, jumprelu"), "{e}");
    let r = tmp.join("r.safetensors");
    write_st(&r, &[("x", vec![1], vec![0.0])], &[]);
    let e = Sae::load(&r, None, None).unwrap_err().to_string();
    assert!(e.contains("not an SAE file"), "{e}");
}

/// The planted adapter adds `s_t v` to resid_post at layer 1. An SAE whose decoder rows are
/// unit vectors `w_j` with `w_5 = v`, encoder `W_dec ᵀ` and a bias of 10 (so the ReLU never
/// clips: |x·w| stays below 10 on this model) has `f_j = x·w_j + 10`, so the score of latent j
/// is exactly `mean(s)·(v·w_j)`: latent 5 first, every other score in the ratio `v·w_j` to it.
/// Checked to 1e-3 of latent 5's score: f32 activations near 10 round by <= 4.8e-7 each, so a
/// difference of two, and its mean over tokens, is off by <= 1e-6, which is < 2e-4 of the
/// |mean s| >= 5e-3 asserted first.
#[test]
fn planted_direction_ranks_its_latent_first() {
    let tmp = TempDir::new("sae-rank");
    let cfg = tiny_config();
    let d = cfg.hidden_size;
    let v = unit_vector(d, 21);
    let adapter = tmp.join("adapter");
    write_planted_adapter(&adapter, &cfg, 1, &v);
    let m = 16;
    let mut w_dec: Vec<f32> = Vec::new();
    for j in 0..m {
        if j == 5 {
            w_dec.extend_from_slice(&v);
        } else {
            w_dec.extend(unit_vector(d, 100 + j as u64));
        }
    }
    let mut w_enc = vec![0f32; d * m];
    for j in 0..m {
        for i in 0..d {
            w_enc[i * m + j] = w_dec[j * d + i];
        }
    }
    let sae = tmp.join("sae1.safetensors");
    write_st(
        &sae,
        &[
            ("W_enc", vec![d, m], w_enc),
            ("b_enc", vec![m], vec![10.0; m]),
            ("W_dec", vec![m, d], w_dec.clone()),
            ("b_dec", vec![d], vec![0.0; d]),
        ],
        &[],
    );
    let data = tmp.join("data.jsonl");
    write_tokens_jsonl(&data, 20, 5);
    let out = tmp.join("latents.safetensors");
    let ran = directions(&[
        "sae",
        "--model",
        s(&tiny_llama()),
        "--adapter",
        s(&adapter),
        "--data",
        s(&data),
        "--sae",
        &format!("1={}", s(&sae)),
        "--top",
        "4",
        "--device",
        "cpu",
        "-o",
        s(&out),
    ]);
    assert_ok(&ran);
    let err = stderr(&ran);
    assert!(err.contains("layer 1: top latents 5 "), "{err}");
    let t = read_tensors(&out);
    let latents = &t["sae_latent.1"].1;
    let scores = &t["sae_score.1"].1;
    assert_eq!(latents[0], 5.0);
    let s5 = scores[0] as f64;
    assert!(s5.abs() > 5e-3, "mean shift along v is {s5}");
    for (&j, &sc) in latents.iter().zip(scores) {
        let j = j as usize;
        let want = s5 * dot(&v, &w_dec[j * d..(j + 1) * d]);
        assert!(
            (sc as f64 - want).abs() <= 1e-3 * s5.abs(),
            "latent {j}: {sc} vs {want}"
        );
    }
    assert_eq!(t["layer.1"].0, [4, d]);
    assert_eq!(t["layer.1"].1[..d], v[..], "decoder row of latent 5");
    // The same fine-tune as a whole model (the adapter merged into the weights by
    // `train --merge`'s writer, read with --tuned-model): latent 5 first again, every score
    // within the same bound (the merged weights differ from the adapter route by f32 rounding
    // of W + BA, ~1e-7 of resid_post, far below it).
    let loaded = caft_fast::model::loader::load_model(&tiny_llama()).unwrap();
    let (layout, params) = planted_adapter(&cfg, 1, &v);
    let merged = tmp.join("merged");
    caft_fast::train::merge::write_merged(&merged, &loaded, &layout, &params).unwrap();
    let out_merged = tmp.join("latents-merged.safetensors");
    assert_ok(&directions(&[
        "sae",
        "--model",
        s(&tiny_llama()),
        "--tuned-model",
        s(&merged),
        "--data",
        s(&data),
        "--sae",
        &format!("1={}", s(&sae)),
        "--top",
        "4",
        "--device",
        "cpu",
        "-o",
        s(&out_merged),
    ]));
    let tm = read_tensors(&out_merged);
    assert_eq!(tm["sae_latent.1"].1[0], 5.0);
    for (&j, &sc) in tm["sae_latent.1"].1.iter().zip(&tm["sae_score.1"].1) {
        let j = j as usize;
        let want = s5 * dot(&v, &w_dec[j * d..(j + 1) * d]);
        assert!(
            (sc as f64 - want).abs() <= 1e-3 * s5.abs(),
            "merged, latent {j}: {sc} vs {want}"
        );
    }
    // explain names the latents.
    let corpus = tmp.join("corpus.jsonl");
    write_tokens_jsonl(&corpus, 6, 2);
    let report = tmp.join("report");
    assert_ok(&directions(&[
        "explain",
        "--model",
        s(&tiny_llama()),
        "--directions",
        s(&out),
        "--corpus",
        s(&corpus),
        "-o",
        s(&report),
        "--device",
        "cpu",
    ]));
    let html = std::fs::read_to_string(report.join("index.html")).unwrap();
    assert!(
        html.contains("component 0 (SAE latent 5)"),
        "latent named in the heading"
    );
    // Bad --sae specs.
    let bad = |spec: &str| {
        directions(&[
            "sae",
            "--model",
            s(&tiny_llama()),
            "--adapter",
            s(&adapter),
            "--data",
            s(&data),
            "--sae",
            spec,
            "--device",
            "cpu",
            "-o",
            s(&tmp.join("x.safetensors")),
        ])
    };
    assert_error(&bad(s(&sae)), &["expected LAYER=FILE"]);
    assert_error(&bad(&format!("x={}", s(&sae))), &["is not a number"]);
    assert_error(&bad(&format!("7={}", s(&sae))), &["layer 7 does not exist"]);
    // The output selects like a PCA file.
    let sel = tmp.join("sel.safetensors");
    assert_ok(&directions(&[
        "select",
        "--from",
        s(&out),
        "--pick",
        "1:0",
        "-o",
        s(&sel),
    ]));
    let dirs = caft_fast::model::ablation::load_directions(&sel, None, d, 4).unwrap();
    assert_eq!(dirs.layers(), [1]);
}

/// Write `arrays` (f32, C order) as an `.npz`: a zip of `NAME.npy` members, as numpy's
/// `savez` writes it (stored, uncompressed).
fn write_npz(path: &Path, arrays: &[(&str, Vec<usize>, Vec<f32>)]) {
    use std::io::Write;
    let dir = path.parent().unwrap();
    let mut zip = zip::ZipWriter::new(std::fs::File::create(path).unwrap());
    let opts =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    for (name, shape, data) in arrays {
        let tmp = dir.join(format!("{name}.npy"));
        let dims: Vec<String> = shape.iter().map(|n| n.to_string()).collect();
        let shape_text = match dims.len() {
            1 => format!("({},)", dims[0]),
            _ => format!("({})", dims.join(", ")),
        };
        write_npy(&tmp, 1, "<f4", false, &shape_text, &f32_le(data));
        zip.start_file(format!("{name}.npy"), opts).unwrap();
        zip.write_all(&std::fs::read(&tmp).unwrap()).unwrap();
        std::fs::remove_file(&tmp).unwrap();
    }
    zip.finish().unwrap();
}

/// A Gemma Scope `params.npz` (W_enc [d, m], W_dec [m, d], b_enc, b_dec, threshold: JumpReLU)
/// read as published ranks the latents exactly as the same arrays in SAELens safetensors do;
/// missing or mis-shaped arrays and a width that is not the model's are named.
#[test]
fn gemma_scope_npz_ranks_as_the_saelens_form() {
    let tmp = TempDir::new("sae-npz");
    let cfg = tiny_config();
    let d = cfg.hidden_size;
    let v = unit_vector(d, 7);
    let adapter = tmp.join("adapter");
    write_planted_adapter(&adapter, &cfg, 1, &v);
    let m = 24;
    let mut rng = caft_fast::util::rng::Rng::new(3);
    let w_enc = rng.normal_vec(d * m);
    let w_dec = rng.normal_vec(m * d);
    let b_enc: Vec<f32> = rng.normal_vec(m).iter().map(|x| 0.5 * x).collect();
    let b_dec = rng.normal_vec(d);
    // Thresholds low enough that most latents fire on some tokens, not all on every token.
    let threshold: Vec<f32> = rng.normal_vec(m).iter().map(|x| 0.2 * x.abs()).collect();
    let arrays = [
        ("W_enc", vec![d, m], w_enc.clone()),
        ("W_dec", vec![m, d], w_dec.clone()),
        ("b_enc", vec![m], b_enc),
        ("b_dec", vec![d], b_dec),
        ("threshold", vec![m], threshold),
    ];
    let npz = tmp.join("params.npz");
    write_npz(&npz, &arrays);
    let st = tmp.join("params.safetensors");
    write_st(&st, &arrays, &[]);
    let data = tmp.join("data.jsonl");
    write_tokens_jsonl(&data, 12, 9);
    let rank = |sae: &Path, out: &str| {
        let out = tmp.join(out);
        let ran = directions(&[
            "sae",
            "--model",
            s(&tiny_llama()),
            "--adapter",
            s(&adapter),
            "--data",
            s(&data),
            "--sae",
            &format!("1={}", s(sae)),
            "--top",
            "8",
            "--device",
            "cpu",
            "-o",
            s(&out),
        ]);
        assert_ok(&ran);
        read_tensors(&out)
    };
    let (a, b) = (
        rank(&npz, "from-npz.safetensors"),
        rank(&st, "from-st.safetensors"),
    );
    for name in ["sae_latent.1", "sae_score.1", "layer.1"] {
        assert_eq!(a[name], b[name], "{name}");
    }
    let scores = &a["sae_score.1"].1;
    assert!(
        scores.iter().any(|x| x.abs() > 1e-4),
        "the adapter moves some latent: {scores:?}"
    );
    // The loader read it as JumpReLU with per-latent thresholds.
    let sae = Sae::load(&npz, None, None).unwrap();
    assert!(matches!(sae.act, Activation::JumpRelu(ref t) if t.len() == m));

    // Bad input: a missing array, a mis-shaped one, a width that is not the model's.
    let bad = |name: &str, arrays: &[(&str, Vec<usize>, Vec<f32>)], needles: &[&str]| {
        let p = tmp.join(name);
        write_npz(&p, arrays);
        let ran = directions(&[
            "sae",
            "--model",
            s(&tiny_llama()),
            "--adapter",
            s(&adapter),
            "--data",
            s(&data),
            "--sae",
            &format!("1={}", s(&p)),
            "--device",
            "cpu",
            "-o",
            s(&tmp.join("x.st")),
        ]);
        assert_error(&ran, needles);
    };
    bad(
        "no-dec.npz",
        &[arrays[0].clone(), arrays[2].clone(), arrays[3].clone()],
        &["no-dec.npz", "W_dec", "missing"],
    );
    let mut shaped = arrays.to_vec();
    shaped[1] = ("W_dec", vec![d, m], w_dec.clone());
    bad(
        "shape.npz",
        &shaped,
        &["shape.npz", "W_dec", &format!("[{m}, {d}]")],
    );
    let wide = d + 2;
    let narrow = [
        ("W_enc", vec![wide, m], vec![0.1; wide * m]),
        ("W_dec", vec![m, wide], vec![0.1; m * wide]),
        ("b_enc", vec![m], vec![0.0; m]),
        ("b_dec", vec![wide], vec![0.0; wide]),
    ];
    bad(
        "wide.npz",
        &narrow,
        &["wide.npz", &wide.to_string(), &d.to_string()],
    );
}
