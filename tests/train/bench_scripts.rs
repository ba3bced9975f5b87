//! The summary of scripts/gpu_compare.sh (scripts/compare_steps.py) on what its two sides
//! print: a real `caft-fast bench-step --json` line from the tiny Llama and PyTorch lines with
//! the keys scripts/pytorch_step.py writes, its own `"impl": "pytorch+peft"` included (the key
//! that once came twice in a merged row, so the PyTorch rows were never matched and no ratio
//! was printed).

use crate::support::*;
use std::path::Path;
use std::process::{Command, Output};

/// `python3 scripts/compare_steps.py <args>`; `None` (with a skip notice, or a failure under
/// `CI`) when there is no python3.
fn compare_steps(args: &[&str]) -> Option<Output> {
    let script = repo().join("scripts").join("compare_steps.py");
    match Command::new("python3").arg(script).args(args).output() {
        Ok(o) => Some(o),
        Err(e) => {
            let msg = format!("python3 does not run ({e}): scripts/compare_steps.py untested");
            if std::env::var_os("CI").is_some() {
                panic!("{msg}");
            }
            eprintln!("skipping: {msg}");
            None
        }
    }
}

/// One bench-step line: a CPU step of the tiny Llama with ablation at layers 1 and 2.
fn bench_step_line(json: &Path) -> serde_json::Value {
    assert_ok(&caft([
        "bench-step",
        "--device",
        "cpu",
        "--threads",
        "1",
        "--model",
        s(&tiny_llama()),
        "--batch",
        "1",
        "--seq",
        "8",
        "--lora-r",
        "2",
        "--ablate-layers",
        "1,2",
        "--ablate-k",
        "2",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--json",
        s(json),
    ]));
    serde_json::from_str(&std::fs::read_to_string(json).unwrap()).unwrap()
}

/// The PyTorch lines of `pytorch_step.py --both` (LoRA): with and without the hook, at
/// `tokens_per_s` each, with every key the summary reads.
fn pytorch_lines(tokens_per_s: [f64; 2]) -> String {
    let line = |ablate: bool, tps: f64| {
        serde_json::json!({
            "impl": "pytorch+peft", "method": "lora", "config": "tiny", "device": "cuda",
            "ablate": ablate, "ablate_layers": if ablate { vec![1, 2] } else { vec![] },
            "step_s": [8.0 / tps], "step_s_mean": 8.0 / tps, "step_s_median": 8.0 / tps,
            "tokens_per_s": tps, "achieved_tflops": 0.5, "peak_gpu_mem_mb": 1000.0,
        })
        .to_string()
    };
    format!(
        "{}\n{}\n",
        line(true, tokens_per_s[0]),
        line(false, tokens_per_s[1])
    )
}

/// Rows from both sides are told apart by the side given with their file, whatever `impl`
/// they carry: the ratio with ablation is caft-fast's tokens/s over the PyTorch row with the
/// hook (2.5 here by construction), every row keeps its own keys plus `side` and `shape`,
/// a missing file (a failed run) is skipped, and a row that names another side is refused.
#[test]
fn gpu_compare_summary_pairs_the_sides_by_file() {
    let dir = TempDir::new("compare-steps");
    let cf = bench_step_line(&dir.join("caft.json"));
    let tps = cf["tokens_per_s"]
        .as_f64()
        .expect("bench-step prints tokens_per_s");
    assert!(tps > 0.0 && tps.is_finite(), "{cf}");
    assert_eq!(cf["ablate_layers"], serde_json::json!([1, 2]));
    let pt = write(
        &dir.join("pytorch.jsonl"),
        &pytorch_lines([tps / 2.5, tps / 2.0]),
    );
    let merged = dir.join("compare.jsonl");
    let caft_in = format!("caft-fast:tiny:{}", dir.join("caft.json").display());
    let pt_in = format!("pytorch:tiny:{}", pt.display());
    let missing = format!("caft-fast:tiny:{}", dir.join("no-such.json").display());
    let Some(o) = compare_steps(&["--jsonl", s(&merged), &pt_in, &caft_in, &missing]) else {
        return;
    };
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(o.status.success(), "compare_steps.py failed:\n{out}\n{err}");
    assert!(
        out.contains("tiny ablation=yes: caft-fast/pytorch tokens/s = 2.50x"),
        "the ratio with ablation:\n{out}"
    );
    // Only the ablated caft-fast row exists: no ratio without ablation, no overhead line.
    assert!(!out.contains("ablation=no:"), "{out}");
    assert!(
        out.starts_with("shape "),
        "gpu_check.sh prints from the header on:\n{out}"
    );
    let rows: Vec<serde_json::Value> = std::fs::read_to_string(&merged)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let sides: Vec<&str> = rows.iter().map(|r| r["side"].as_str().unwrap()).collect();
    assert_eq!(sides, ["pytorch", "pytorch", "caft-fast"]);
    assert!(rows.iter().all(|r| r["shape"] == "tiny"));
    assert_eq!(rows[0]["impl"], "pytorch+peft", "the row's own keys stay");
    assert_eq!(rows[2]["tokens_per_s"], cf["tokens_per_s"]);

    let wrong = write(
        &dir.join("wrong.json"),
        "{\"side\": \"pytorch\", \"tokens_per_s\": 1.0}\n",
    );
    let o = compare_steps(&[&format!("caft-fast:tiny:{}", wrong.display())]).unwrap();
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(!o.status.success(), "a row of the other side was accepted");
    assert!(err.contains("side is 'pytorch'"), "{err}");
}
