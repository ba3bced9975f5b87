//! SmolLM2-135M-Instruct loaded from its GGUF (Q4_1 projections, Q8_0 embedding) through our
//! loader, run on the CPU backend, against transformers loading the same file (dequantised to
//! f32): full logits at two positions per prompt within 1e-4 relative norm, the log-sum-exp at
//! every position within 1e-4 relative, and the same argmax wherever transformers' top two
//! logits are more than 1e-3 apart (a closer race can flip under f32 summation order).
//! 30 layers of f32 with different summation orders drift by ~1e-6 relative; the 1e-4 bound is
//! the issue's, with margin for that.

use crate::support::*;
use caft_fast::backend::cpu::CpuBackend;
use caft_fast::model::loader::load_model;
use caft_fast::model::transformer::{Batch, Model};

#[test]
fn smollm2_logits_match_transformers() {
    let Some(gguf) = smollm2_gguf() else { return };
    let fx = read_safetensors(&fixtures().join("smollm2/logits.safetensors"));
    let be = CpuBackend::new();
    let loaded = load_model(&gguf).unwrap();
    let mut model = Model::new(&be, loaded.config.clone(), loaded.weights.as_ref()).unwrap();
    let v = loaded.config.vocab_size;
    let mut i = 0;
    while let Some(ids) = fx.get(&format!("p{i}.ids")) {
        let ids: Vec<u32> = ids.i64().iter().map(|&x| x as u32).collect();
        let t = ids.len();
        let labels = ids.iter().map(|&x| x as i32).collect();
        let batch = Batch::padded(1, t, ids, labels);
        let out = model.forward(&be, &batch, true).unwrap();
        let logits = out.logits.unwrap();
        let positions = fx[&format!("p{i}.positions")].i64();
        let want = &fx[&format!("p{i}.logits_at")].data;
        for (j, &p) in positions.iter().enumerate() {
            let p = p as usize;
            assert_close(
                &format!("prompt {i} logits at {p}"),
                &logits[p * v..(p + 1) * v],
                &want[j * v..(j + 1) * v],
                1e-4,
            );
        }
        let lse_want = &fx[&format!("p{i}.lse")].data;
        let argmax_want = fx[&format!("p{i}.argmax")].i64();
        for p in 0..t {
            let row = &logits[p * v..(p + 1) * v];
            let m = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
            let lse = m + row.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln();
            assert!(
                (lse - lse_want[p]).abs() <= 1e-4 * lse_want[p].abs(),
                "prompt {i} position {p}: lse {lse} vs {}",
                lse_want[p]
            );
            let am = row
                .iter()
                .enumerate()
                .fold(
                    (0, f32::NEG_INFINITY),
                    |a, (k, &x)| if x > a.1 { (k, x) } else { a },
                )
                .0;
            if am as i64 != argmax_want[p] {
                let gap = (row[am] - row[argmax_want[p] as usize]).abs();
                assert!(
                    gap < 1e-3,
                    "prompt {i} position {p}: argmax {am} vs {}",
                    argmax_want[p]
                );
            }
        }
        i += 1;
    }
    assert!(
        i >= 3,
        "expected at least 3 prompts in the fixture, found {i}"
    );
}
