//! Ablation directions: orthonormalisation, the safetensors and .npy readers, saving, random
//! control directions, and every bad-input case, through the public API only.

use crate::support::*;
use caft_fast::linalg::orthonormalize;
use caft_fast::model::ablation::{
    load_directions, random_directions, save_directions, DirectionSet, Directions,
};
use caft_fast::util::rng::Rng;
use safetensors::Dtype;
use sha2::{Digest, Sha256};
use std::path::PathBuf;

const D_MODEL: usize = 64;
const N_LAYERS: usize = 8;

/// Orthonormality bound for f32 directions. The f64 Gram–Schmidt result is orthonormal to
/// ~1e-15; rounding each entry to f32 perturbs it by at most 2^-24 relative, so for unit rows
/// `|q_i·q_j - δ_ij|` grows by at most `2·2^-24·Σ|q_i||q_j| <= 2·2^-24 ≈ 1.2e-7`
/// (Cauchy–Schwarz). The products are taken in f64 here, adding nothing; 1e-6 leaves margin.
const ORTHO_TOL_F32: f64 = 1e-6;

/// Span bound: each input row `x` must satisfy `|x - QᵀQx| <= 1e-5 |x|`. With f32 `Q`,
/// `QᵀQ` is a projector up to ~`k·2^-24`; 1e-5 is 100x that for the k used here.
const SPAN_TOL: f64 = 1e-5;

/// Gaussian rows `[k, d]` as f64.
fn gaussian(rng: &mut Rng, k: usize, d: usize) -> Vec<f64> {
    (0..k * d).map(|_| rng.normal()).collect()
}

fn f32_bytes(v: &[f64]) -> Vec<u8> {
    v.iter().flat_map(|&x| (x as f32).to_le_bytes()).collect()
}

fn f64_bytes(v: &[f64]) -> Vec<u8> {
    v.iter().flat_map(|&x| x.to_le_bytes()).collect()
}

/// `max |QQᵀ - I|` in f64.
fn ortho_err(s: &DirectionSet) -> f64 {
    let mut worst = 0.0f64;
    for i in 0..s.k {
        for j in 0..s.k {
            let dot: f64 = (0..s.d)
                .map(|c| s.q[i * s.d + c] as f64 * s.q[j * s.d + c] as f64)
                .sum();
            let want = if i == j { 1.0 } else { 0.0 };
            worst = worst.max((dot - want).abs());
        }
    }
    worst
}

/// Largest `|x - P x| / |x|` over the rows `x` of `rows`, where `P` projects onto the span of
/// the first `prefix(i)` rows of `q` for input row `i`.
fn span_err(q: &[f64], d: usize, rows: &[f64], prefix: impl Fn(usize) -> usize) -> f64 {
    let mut worst = 0.0f64;
    for (i, x) in rows.chunks_exact(d).enumerate() {
        let mut r = x.to_vec();
        for qj in q.chunks_exact(d).take(prefix(i)) {
            let c: f64 = qj.iter().zip(x).map(|(a, b)| a * b).sum();
            for (rv, qv) in r.iter_mut().zip(qj) {
                *rv -= c * qv;
            }
        }
        let nr = r.iter().map(|v| v * v).sum::<f64>().sqrt();
        let nx = x.iter().map(|v| v * v).sum::<f64>().sqrt();
        worst = worst.max(nr / nx);
    }
    worst
}

fn q64(s: &DirectionSet) -> Vec<f64> {
    s.q.iter().map(|&x| x as f64).collect()
}

/// The whole error chain as one string, as the binary prints it.
fn msg<T: std::fmt::Debug>(r: anyhow::Result<T>) -> String {
    format!("{:#}", r.expect_err("expected an error"))
}

fn assert_mentions(m: &str, parts: &[&str]) {
    for p in parts {
        assert!(m.contains(p), "error message {m:?} does not mention {p:?}");
    }
}

// ---- orthonormalize ---------------------------------------------------------------------------

#[test]
fn orthonormalize_gives_orthonormal_basis_of_each_prefix_span() {
    let mut rng = Rng::new(11);
    let (k, d) = (12, 48);
    let rows: Vec<f64> = gaussian(&mut rng, k, d).iter().map(|x| 3.0 * x).collect();
    let q = orthonormalize(&rows, k, d).unwrap();
    let set = DirectionSet {
        layer: 0,
        k,
        d,
        q: q.iter().map(|&x| x as f32).collect(),
    };
    let e = ortho_err(&set);
    assert!(
        e <= ORTHO_TOL_F32,
        "|QQᵀ - I|_max = {e:e} after f32 rounding"
    );
    // Row i of Q lies in span(rows 0..=i) and vice versa: input row i is reproduced by
    // projecting onto Q rows 0..=i (the f64 basis, so only Gram–Schmidt rounding enters).
    let e = span_err(&q, d, &rows, |i| i + 1);
    assert!(e <= 1e-12, "prefix span error {e:e}");
    // And without row i's own direction, row i is not reproduced (a test of the test).
    let e = span_err(&q, d, &rows[d..], |i| i + 1);
    assert!(
        e > 0.1,
        "dropping a direction should leave a large residual, got {e:e}"
    );
}

#[test]
fn orthonormalize_stays_orthogonal_on_nearly_dependent_rows() {
    // Rows = one common vector + 1e-5 noise: condition number ~1e5. One Gram–Schmidt pass
    // leaves an orthogonality error of order eps·cond (~1e-11 here); the second pass brings it
    // back to a few ulps, which the 1e-13 bound checks in f64.
    let mut rng = Rng::new(12);
    let (k, d) = (10, 200);
    let base = gaussian(&mut rng, 1, d);
    let rows: Vec<f64> = (0..k * d)
        .map(|i| base[i % d] + 1e-5 * rng.normal())
        .collect();
    let q = orthonormalize(&rows, k, d).unwrap();
    let mut worst = 0.0f64;
    for i in 0..k {
        for j in 0..k {
            let dot: f64 = (0..d).map(|c| q[i * d + c] * q[j * d + c]).sum();
            worst = worst.max((dot - if i == j { 1.0 } else { 0.0 }).abs());
        }
    }
    assert!(worst <= 1e-13, "|QQᵀ - I|_max = {worst:e} in f64");
    let e = span_err(&q, d, &rows, |_| k);
    assert!(e <= 1e-9, "span error {e:e}");
}

#[test]
fn orthonormalize_handles_extreme_scales() {
    // Rows scaled by 1e200 and 1e-200: a naive norm would overflow or underflow.
    let mut rng = Rng::new(13);
    let (k, d) = (3, 16);
    let rows = gaussian(&mut rng, k, d);
    let reference = orthonormalize(&rows, k, d).unwrap();
    for scale in [1e200, 1e-200] {
        let scaled: Vec<f64> = rows.iter().map(|x| x * scale).collect();
        let q = orthonormalize(&scaled, k, d).unwrap();
        let diff = q
            .iter()
            .zip(&reference)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        assert!(diff <= 1e-12, "scale {scale:e}: basis differs by {diff:e}");
    }
}

#[test]
fn orthonormalize_rejects_bad_rows() {
    let mut rng = Rng::new(14);
    let (k, d) = (4, 10);
    let good = gaussian(&mut rng, k, d);

    // Row 2 = row 0 - 2 row 1 (+ a perturbation far below the 1e-6 dependence threshold).
    let mut dep = good.clone();
    for c in 0..d {
        dep[2 * d + c] = dep[c] - 2.0 * dep[d + c] + 1e-12 * rng.normal();
    }
    assert_mentions(
        &msg(orthonormalize(&dep, k, d)),
        &["row 2", "linearly dependent"],
    );
    // A perturbation well above the threshold is accepted.
    let mut near = good.clone();
    for c in 0..d {
        near[2 * d + c] = near[c] - 2.0 * near[d + c] + 1e-3 * rng.normal();
    }
    assert!(orthonormalize(&near, k, d).is_ok());

    let mut zero = good.clone();
    zero[3 * d..4 * d].fill(0.0);
    assert_mentions(&msg(orthonormalize(&zero, k, d)), &["row 3", "zero"]);

    let mut nan = good.clone();
    nan[d + 7] = f64::NAN;
    assert_mentions(&msg(orthonormalize(&nan, k, d)), &["row 1", "column 7"]);

    assert_mentions(&msg(orthonormalize(&good[..d * 3], k, d)), &["30", "40"]);
    assert!(orthonormalize(&good, 0, d).is_err());
    assert!(orthonormalize(&[], 0, 0).is_err());
    // 4 rows of width 3 cannot be independent.
    assert!(orthonormalize(&good[..12], 4, 3).is_err());
}

// ---- safetensors ------------------------------------------------------------------------------

#[test]
fn safetensors_round_trip() {
    let dir = TempDir::new("st-round-trip");
    let mut rng = Rng::new(21);
    let r3 = gaussian(&mut rng, 4, D_MODEL);
    let r7 = gaussian(&mut rng, 2, D_MODEL);
    let r5 = gaussian(&mut rng, 1, D_MODEL);
    let path = dir.join("dirs.safetensors");
    write_safetensors(
        &path,
        &[
            ("layer.7", Dtype::F32, vec![2, D_MODEL], f32_bytes(&r7)),
            ("layer.3", Dtype::F32, vec![4, D_MODEL], f32_bytes(&r3)),
            // A 1-D tensor is a single direction (k = 1), here stored as F64.
            ("layer.5", Dtype::F64, vec![D_MODEL], f64_bytes(&r5)),
        ],
    );
    let dirs = load_directions(&path, None, D_MODEL, N_LAYERS).unwrap();
    assert_eq!(dirs.layers(), vec![3, 5, 7]);
    let file_sha: String = Sha256::digest(std::fs::read(&path).unwrap())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(dirs.sha256, file_sha);
    assert!(dirs.source.contains("dirs.safetensors"));
    assert!(dirs.get(4).is_none());
    for (layer, rows, k, f32_input) in [(3, &r3, 4, true), (5, &r5, 1, false), (7, &r7, 2, true)] {
        let s = dirs.get(layer).unwrap();
        assert_eq!(
            (s.layer, s.k, s.d, s.q.len()),
            (layer, k, D_MODEL, k * D_MODEL)
        );
        let e = ortho_err(s);
        assert!(e <= ORTHO_TOL_F32, "layer {layer}: |QQᵀ - I|_max = {e:e}");
        // The file holds the rows rounded to f32 (layer 5: exact f64); compare the span
        // against what the file holds.
        let stored: Vec<f64> = if f32_input {
            rows.iter().map(|&x| x as f32 as f64).collect()
        } else {
            rows.to_vec()
        };
        let e = span_err(&q64(s), D_MODEL, &stored, |_| k);
        assert!(e <= SPAN_TOL, "layer {layer}: span error {e:e}");
    }

    // Save and load again: same layers and (already orthonormal) rows reproduced to f32
    // rounding: re-orthonormalising f32-orthonormal rows changes them by ~1e-7.
    let saved = dir.join("saved.safetensors");
    save_directions(&saved, &dirs).unwrap();
    let again = load_directions(&saved, None, D_MODEL, N_LAYERS).unwrap();
    assert_eq!(again.layers(), dirs.layers());
    for (a, b) in again.sets.iter().zip(&dirs.sets) {
        assert_eq!((a.k, a.d), (b.k, b.d));
        let diff =
            a.q.iter()
                .zip(&b.q)
                .map(|(x, y)| (x - y).abs())
                .fold(0.0f32, f32::max);
        assert!(
            diff <= 1e-6,
            "layer {}: saved rows moved by {diff:e}",
            a.layer
        );
    }
    // The atomic write leaves only the two files behind.
    let mut names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, vec!["dirs.safetensors", "saved.safetensors"]);
}

#[test]
fn f16_and_bf16_inputs_match_their_exact_values() {
    let dir = TempDir::new("half");
    let mut rng = Rng::new(22);
    let rows = gaussian(&mut rng, 3, D_MODEL);
    let h: Vec<half::f16> = rows.iter().map(|&x| half::f16::from_f64(x)).collect();
    let b: Vec<half::bf16> = rows.iter().map(|&x| half::bf16::from_f64(x)).collect();
    let path = dir.join("half.safetensors");
    write_safetensors(
        &path,
        &[
            (
                "layer.1",
                Dtype::F16,
                vec![3, D_MODEL],
                h.iter().flat_map(|v| v.to_bits().to_le_bytes()).collect(),
            ),
            (
                "layer.2",
                Dtype::BF16,
                vec![3, D_MODEL],
                b.iter().flat_map(|v| v.to_bits().to_le_bytes()).collect(),
            ),
        ],
    );
    let dirs = load_directions(&path, None, D_MODEL, N_LAYERS).unwrap();
    // f16 and bf16 widen to f64 exactly, so the loaded basis must be exactly the f32 rounding
    // of orthonormalising the widened values.
    let widened_h: Vec<f64> = h.iter().map(|v| v.to_f64()).collect();
    let widened_b: Vec<f64> = b.iter().map(|v| v.to_f64()).collect();
    for (layer, widened) in [(1, widened_h), (2, widened_b)] {
        let want: Vec<f32> = orthonormalize(&widened, 3, D_MODEL)
            .unwrap()
            .iter()
            .map(|&x| x as f32)
            .collect();
        let s = dirs.get(layer).unwrap();
        assert_eq!(s.q, want, "layer {layer}");
        assert!(ortho_err(s) <= ORTHO_TOL_F32);
        // And the half-precision rows still span (to their own rounding) the original rows:
        // f16 keeps 11 bits, bf16 8, so the residual is below 2^-8 relative.
        let e = span_err(&q64(s), D_MODEL, &rows, |_| 3);
        assert!(
            e <= 2f64.powi(-8),
            "layer {layer}: span error vs unrounded rows {e:e}"
        );
    }
}

// ---- .npy -------------------------------------------------------------------------------------

#[test]
fn npy_matches_safetensors() {
    let dir = TempDir::new("npy");
    let mut rng = Rng::new(31);
    let rows = gaussian(&mut rng, 5, D_MODEL);
    let st = dir.join("ref.safetensors");
    write_safetensors(
        &st,
        &[("layer.6", Dtype::F32, vec![5, D_MODEL], f32_bytes(&rows))],
    );
    let reference = load_directions(&st, None, D_MODEL, N_LAYERS).unwrap();

    let shape = format!("(5, {D_MODEL})");
    for (major, name) in [(1u8, "v1.npy"), (2, "v2.npy"), (3, "v3.npy")] {
        let p = dir.join(name);
        write_npy(&p, major, "<f4", false, &shape, &f32_bytes(&rows));
        let d = load_directions(&p, Some(6), D_MODEL, N_LAYERS).unwrap();
        assert_eq!(d.sets, reference.sets, "{name}");
        assert_eq!(d.layers(), vec![6]);
    }

    // f64 data: compare with orthonormalising the exact values.
    let p = dir.join("f64.npy");
    write_npy(&p, 1, "<f8", false, &shape, &f64_bytes(&rows));
    let d = load_directions(&p, Some(0), D_MODEL, N_LAYERS).unwrap();
    let want: Vec<f32> = orthonormalize(&rows, 5, D_MODEL)
        .unwrap()
        .iter()
        .map(|&x| x as f32)
        .collect();
    assert_eq!(d.sets[0].q, want);
    assert_eq!(d.sets[0].layer, 0);

    // 1-D array: one direction, the row normalised.
    let p = dir.join("one.npy");
    write_npy(
        &p,
        1,
        "<f8",
        false,
        &format!("({D_MODEL},)"),
        &f64_bytes(&rows[..D_MODEL]),
    );
    let d = load_directions(&p, Some(2), D_MODEL, N_LAYERS).unwrap();
    let s = &d.sets[0];
    assert_eq!((s.k, s.d), (1, D_MODEL));
    let n = rows[..D_MODEL].iter().map(|x| x * x).sum::<f64>().sqrt();
    for (got, x) in s.q.iter().zip(&rows[..D_MODEL]) {
        assert!((*got as f64 - x / n).abs() <= 1e-7, "{got} vs {}", x / n);
    }
}

#[test]
fn npy_bad_inputs() {
    let dir = TempDir::new("npy-bad");
    let mut rng = Rng::new(32);
    let rows = gaussian(&mut rng, 2, D_MODEL);
    let data = f32_bytes(&rows);
    let shape = format!("(2, {D_MODEL})");
    let case = |name: &str, bytes: Option<Vec<u8>>| -> PathBuf {
        let p = dir.join(name);
        if let Some(b) = bytes {
            std::fs::write(&p, b).unwrap();
        }
        p
    };

    // No layer given for a .npy file.
    let p = case("good.npy", None);
    write_npy(&p, 1, "<f4", false, &shape, &data);
    assert_mentions(
        &msg(load_directions(&p, None, D_MODEL, N_LAYERS)),
        &["good.npy", "layer"],
    );
    // Layer out of range.
    assert_mentions(
        &msg(load_directions(&p, Some(N_LAYERS), D_MODEL, N_LAYERS)),
        &["good.npy", "layer 8", "8 layers", "0..7"],
    );
    // Width for another model.
    assert_mentions(
        &msg(load_directions(&p, Some(1), D_MODEL + 1, N_LAYERS)),
        &["good.npy", "layer 1", "64", "65", "another model"],
    );

    let bad = |name: &str, major: u8, descr: &str, fortran: bool, shape: &str, data: &[u8]| {
        let p = dir.join(name);
        write_npy(&p, major, descr, fortran, shape, data);
        msg(load_directions(&p, Some(4), D_MODEL, N_LAYERS))
    };
    assert_mentions(
        &bad("be.npy", 1, ">f4", false, &shape, &data),
        &["be.npy", "big-endian"],
    );
    assert_mentions(
        &bad("i4.npy", 1, "<i4", false, &shape, &data),
        &["i4.npy", "<i4"],
    );
    assert_mentions(
        &bad("f.npy", 1, "<f4", true, &shape, &data),
        &["f.npy", "Fortran"],
    );
    assert_mentions(
        &bad(
            "short.npy",
            1,
            "<f4",
            false,
            &shape,
            &data[..data.len() - 4],
        ),
        &["short.npy", "512", "508"],
    );
    // A corrupt shape claiming ~2^62 x 2^62 elements must fail before allocating anything.
    assert_mentions(
        &bad(
            "huge.npy",
            1,
            "<f4",
            false,
            "(4611686018427387904, 4611686018427387904)",
            &data,
        ),
        &["huge.npy", "overflow"],
    );
    assert_mentions(
        &bad(
            "big.npy",
            1,
            "<f4",
            false,
            "(1000000000, 1000000000)",
            &data,
        ),
        &["big.npy", "needs"],
    );
    assert_mentions(
        &bad("3d.npy", 1, "<f4", false, "(1, 2, 32)", &data),
        &["3d.npy", "dimensions"],
    );
    assert_mentions(
        &bad("0d.npy", 1, "<f4", false, "()", &data),
        &["0d.npy", "dimensions"],
    );

    // NaN in row 1, column 5, named with the layer.
    let mut nan = rows.clone();
    nan[D_MODEL + 5] = f64::NAN;
    assert_mentions(
        &bad("nan.npy", 1, "<f4", false, &shape, &f32_bytes(&nan)),
        &["nan.npy", "layer 4", "row 1", "column 5"],
    );

    // Header damage.
    let mut good = std::fs::read(dir.join("good.npy")).unwrap();
    let p = case("magic.npy", Some(b"NOTNUMPY\x01\x00".to_vec()));
    assert_mentions(
        &msg(load_directions(&p, Some(0), D_MODEL, N_LAYERS)),
        &["magic.npy", "magic"],
    );
    let mut long = good.clone();
    long[8..10].copy_from_slice(&60000u16.to_le_bytes());
    let p = case("hlen.npy", Some(long));
    assert_mentions(
        &msg(load_directions(&p, Some(0), D_MODEL, N_LAYERS)),
        &["hlen.npy", "header"],
    );
    let mut v9 = good.clone();
    v9[6] = 9;
    let p = case("v9.npy", Some(v9));
    assert_mentions(
        &msg(load_directions(&p, Some(0), D_MODEL, N_LAYERS)),
        &["v9.npy", "9.0"],
    );
    // Replace the key 'descr' by 'dtype!' (same length): an unknown key.
    let pos = good.windows(5).position(|w| w == b"descr").unwrap();
    good[pos..pos + 5].copy_from_slice(b"dtype");
    let p = case("key.npy", Some(good));
    assert_mentions(
        &msg(load_directions(&p, Some(0), D_MODEL, N_LAYERS)),
        &["key.npy", "dtype"],
    );
    let p = case("empty.npy", Some(Vec::new()));
    assert_mentions(
        &msg(load_directions(&p, Some(0), D_MODEL, N_LAYERS)),
        &["empty.npy", "empty"],
    );
}

// ---- bad safetensors inputs -------------------------------------------------------------------

#[test]
fn safetensors_bad_inputs() {
    let dir = TempDir::new("st-bad");
    let mut rng = Rng::new(41);
    let rows = gaussian(&mut rng, 3, D_MODEL);
    let one = |name: &str, tensor: &str, dtype: Dtype, shape: Vec<usize>, bytes: Vec<u8>| {
        let p = dir.join(name);
        write_safetensors(&p, &[(tensor, dtype, shape, bytes)]);
        msg(load_directions(&p, None, D_MODEL, N_LAYERS))
    };
    let shape = vec![3, D_MODEL];

    // Width of another model: 3 x 32 values read as [3, 32].
    assert_mentions(
        &one(
            "w.safetensors",
            "layer.3",
            Dtype::F32,
            vec![3, 32],
            f32_bytes(&rows[..96]),
        ),
        &["w.safetensors", "layer.3", "32", "64", "another model"],
    );
    // NaN and Inf, named by tensor, row and column.
    for (bad_value, file) in [
        (f64::NAN, "nan.safetensors"),
        (f64::INFINITY, "inf.safetensors"),
    ] {
        let mut r = rows.clone();
        r[2 * D_MODEL + 9] = bad_value;
        assert_mentions(
            &one(file, "layer.2", Dtype::F32, shape.clone(), f32_bytes(&r)),
            &[file, "layer.2", "row 2", "column 9"],
        );
    }
    // bf16 overflow to Inf is caught too (a value beyond bf16's range).
    let mut bf: Vec<u16> = rows
        .iter()
        .map(|&x| half::bf16::from_f64(x).to_bits())
        .collect();
    bf[D_MODEL] = half::bf16::INFINITY.to_bits();
    assert_mentions(
        &one(
            "bfinf.safetensors",
            "layer.1",
            Dtype::BF16,
            shape.clone(),
            bf.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ),
        &["layer.1", "row 1", "column 0"],
    );
    // Zero row.
    let mut z = rows.clone();
    z[D_MODEL..2 * D_MODEL].fill(0.0);
    assert_mentions(
        &one(
            "zero.safetensors",
            "layer.4",
            Dtype::F32,
            shape.clone(),
            f32_bytes(&z),
        ),
        &["layer.4", "row 1", "zero"],
    );
    // Linearly dependent rows: row 2 = row 0 / 2 + row 1 / 4, formed in f32. The scalings are
    // exact and the sum rounds by at most 2^-24 relative per entry, so the part of row 2 outside
    // span(row 0, row 1) is ~6e-8 of its norm, well below the 1e-6 dependence threshold.
    let mut dep: Vec<f32> = rows.iter().map(|&x| x as f32).collect();
    for c in 0..D_MODEL {
        dep[2 * D_MODEL + c] = 0.5 * dep[c] + 0.25 * dep[D_MODEL + c];
    }
    assert_mentions(
        &one(
            "dep.safetensors",
            "layer.5",
            Dtype::F32,
            shape.clone(),
            dep.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ),
        &["layer.5", "row 2", "linearly dependent"],
    );
    // k >= d_model.
    let square = gaussian(&mut rng, D_MODEL, D_MODEL);
    assert_mentions(
        &one(
            "square.safetensors",
            "layer.0",
            Dtype::F32,
            vec![D_MODEL, D_MODEL],
            f32_bytes(&square),
        ),
        &["layer.0", "64 directions", "k < d_model"],
    );
    // No rows.
    assert_mentions(
        &one(
            "k0.safetensors",
            "layer.0",
            Dtype::F32,
            vec![0, D_MODEL],
            Vec::new(),
        ),
        &["layer.0", "no rows"],
    );
    // Layer past the model's end.
    assert_mentions(
        &one(
            "deep.safetensors",
            "layer.9",
            Dtype::F32,
            shape.clone(),
            f32_bytes(&rows),
        ),
        &["layer.9", "8 layers", "0..7"],
    );
    // Names not of the form layer.<L>, listed with the expected pattern.
    for bad_name in [
        "model.layers.3",
        "layer.03",
        "layer.",
        "layer.-1",
        "layer.3.q",
    ] {
        assert_mentions(
            &one(
                "name.safetensors",
                bad_name,
                Dtype::F32,
                shape.clone(),
                f32_bytes(&rows),
            ),
            &[bad_name, "layer.<L>"],
        );
    }
    // Unsupported dtype and rank.
    assert_mentions(
        &one(
            "i32.safetensors",
            "layer.1",
            Dtype::I32,
            shape.clone(),
            f32_bytes(&rows),
        ),
        &["layer.1", "I32"],
    );
    assert_mentions(
        &one(
            "3d.safetensors",
            "layer.1",
            Dtype::F32,
            vec![1, 3, D_MODEL],
            f32_bytes(&rows),
        ),
        &["layer.1", "dimensions"],
    );

    // A file with no tensors at all, and a zero-byte file.
    let p = dir.join("none.safetensors");
    write_safetensors(&p, &[]);
    assert_mentions(
        &msg(load_directions(&p, None, D_MODEL, N_LAYERS)),
        &["none.safetensors", "no tensors"],
    );
    let p = dir.join("zero-bytes.safetensors");
    std::fs::write(&p, b"").unwrap();
    assert_mentions(
        &msg(load_directions(&p, None, D_MODEL, N_LAYERS)),
        &["zero-bytes.safetensors", "empty"],
    );
    // Garbage bytes.
    let p = dir.join("junk.safetensors");
    std::fs::write(&p, b"\xff\xff\xff\xff\xff\xff\xff\xffjunk").unwrap();
    assert_mentions(
        &msg(load_directions(&p, None, D_MODEL, N_LAYERS)),
        &["junk.safetensors", "not a valid safetensors"],
    );
    // A layer index given for a safetensors file, an unknown extension, a missing file.
    let p = dir.join("good.safetensors");
    write_safetensors(
        &p,
        &[("layer.1", Dtype::F32, shape.clone(), f32_bytes(&rows))],
    );
    assert!(load_directions(&p, None, D_MODEL, N_LAYERS).is_ok());
    assert_mentions(
        &msg(load_directions(&p, Some(1), D_MODEL, N_LAYERS)),
        &["good.safetensors"],
    );
    let p = dir.join("dirs.pt");
    std::fs::write(&p, b"x").unwrap();
    assert_mentions(
        &msg(load_directions(&p, None, D_MODEL, N_LAYERS)),
        &["dirs.pt", ".safetensors", ".npy"],
    );
    assert_mentions(
        &msg(load_directions(
            &dir.join("missing.safetensors"),
            None,
            D_MODEL,
            N_LAYERS,
        )),
        &["missing.safetensors"],
    );
}

// ---- restrict ---------------------------------------------------------------------------------

#[test]
fn restrict_keeps_the_requested_layers() {
    let dirs = random_directions(5, 2, D_MODEL, &[1, 4, 6]).unwrap();
    let r = dirs.restrict(&[6, 1, 6]).unwrap();
    assert_eq!(r.layers(), vec![1, 6]);
    assert_eq!(r.get(1), dirs.get(1));
    assert_eq!(r.get(6), dirs.get(6));
    assert!(r.get(4).is_none());
    assert_eq!(r.sha256, dirs.sha256);
    assert_mentions(&msg(dirs.restrict(&[1, 5])), &["layer 5", "[1, 4, 6]"]);
}

// ---- random directions ------------------------------------------------------------------------

#[test]
fn random_directions_are_reproducible_orthonormal_and_seed_dependent() {
    let layers = [5, 2];
    let a = random_directions(7, 3, D_MODEL, &layers).unwrap();
    let b = random_directions(7, 3, D_MODEL, &layers).unwrap();
    let c = random_directions(8, 3, D_MODEL, &layers).unwrap();
    assert_eq!(a, b);
    assert_eq!(a.layers(), vec![2, 5]);
    assert_eq!(a.source, "random(seed=7,k=3)");
    assert_eq!(a.sha256.len(), 64);
    assert_ne!(a.sha256, c.sha256);
    for s in &a.sets {
        assert_eq!((s.k, s.d), (3, D_MODEL));
        assert!(ortho_err(s) <= ORTHO_TOL_F32);
    }
    // Another seed gives another subspace: for random 3-dim subspaces of R^64 the overlap
    // |Q_a Q_cᵀ|_F² averages k²/d = 0.14; nearly equal spans would give ~3.
    for (sa, sc) in a.sets.iter().zip(&c.sets) {
        let mut overlap = 0.0f64;
        for i in 0..3 {
            for j in 0..3 {
                let dot: f64 = (0..D_MODEL)
                    .map(|t| sa.q[i * D_MODEL + t] as f64 * sc.q[j * D_MODEL + t] as f64)
                    .sum();
                overlap += dot * dot;
            }
        }
        assert!(
            overlap < 1.5,
            "layer {}: seeds 7 and 8 overlap {overlap}",
            sa.layer
        );
    }
    // Different layers of one run differ too.
    assert_ne!(a.sets[0].q, a.sets[1].q);
    // A layer's directions do not depend on which other layers were requested.
    let single = random_directions(7, 3, D_MODEL, &[5]).unwrap();
    assert_eq!(single.get(5), a.get(5));

    // Saved and reloaded, the file's hash is the generated hash.
    let dir = TempDir::new("random");
    let p = dir.join("random.safetensors");
    save_directions(&p, &a).unwrap();
    let loaded: Directions = load_directions(&p, None, D_MODEL, N_LAYERS).unwrap();
    assert_eq!(loaded.sha256, a.sha256);
    assert!(loaded.source.contains("random(seed=7,k=3)"));

    assert!(random_directions(7, 0, D_MODEL, &[1]).is_err());
    assert!(random_directions(7, D_MODEL, D_MODEL, &[1]).is_err());
    assert!(random_directions(7, 2, D_MODEL, &[]).is_err());
    assert_mentions(
        &msg(random_directions(7, 2, D_MODEL, &[3, 3])),
        &["layer 3"],
    );
}

#[test]
fn annotation_tensors_of_directions_outputs_are_skipped() {
    // A PCA output (`caft-fast directions pca`) carries explained variances beside the
    // directions; it can be given to `--ablate` as it is. Other names are still refused.
    let dir = TempDir::new("annotations");
    let mut rng = Rng::new(33);
    let rows = gaussian(&mut rng, 3, D_MODEL);
    let var: Vec<f64> = vec![3.0, 2.0, 1.0];
    let path = dir.join("pcs.safetensors");
    write_safetensors(
        &path,
        &[
            ("layer.2", Dtype::F32, vec![3, D_MODEL], f32_bytes(&rows)),
            ("explained_variance.2", Dtype::F32, vec![3], f32_bytes(&var)),
            (
                "explained_variance_ratio.2",
                Dtype::F32,
                vec![3],
                f32_bytes(&var),
            ),
        ],
    );
    let dirs = load_directions(&path, None, D_MODEL, N_LAYERS).unwrap();
    assert_eq!(dirs.layers(), vec![2]);
    assert_eq!(dirs.get(2).unwrap().k, 3);

    let bad = dir.join("bad.safetensors");
    write_safetensors(
        &bad,
        &[
            ("layer.2", Dtype::F32, vec![3, D_MODEL], f32_bytes(&rows)),
            ("explained_variance.x", Dtype::F32, vec![3], f32_bytes(&var)),
        ],
    );
    assert_mentions(
        &msg(load_directions(&bad, None, D_MODEL, N_LAYERS)),
        &["explained_variance.x"],
    );
}
