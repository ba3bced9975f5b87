//! scripts/demo_caft_mc.sh end to end at toy size, so that the demo of docs/demo.md cannot rot:
//! two seeds of the neutral-question task on SmolLM2-135M-Instruct (8 training records, one
//! optimizer step, 4 questions per test split, 10 probe sentences), through every stage (make-task, the plain
//! fine-tune, PCA, probe-select, CAFT, the random control, eval mc of the four models, the
//! per-seed chart and `eval seeds` over both seeds). The numbers mean nothing at this size;
//! the test checks that every output is there and names every arm and seed. It runs the
//! binary cargo built for the tests (CAFT_BIN) on the real model (a failure under CI when
//! the model is missing, as for the other real-model tests).

mod support;
use std::path::Path;
use std::process::{Command, Output};
use support::*;

const ARMS: [&str; 4] = ["base", "plain", "caft", "random"];

fn demo(out: &Path, gguf: &Path, args: &[&str]) -> Output {
    Command::new("bash")
        .arg(repo().join("scripts").join("demo_caft_mc.sh"))
        .args(args)
        .arg(out)
        .env("CAFT_BIN", exe())
        .env("CAFT_SMOLLM2_GGUF", gguf)
        .env("CAFT_THREADS", "2")
        .env("CAFT_DEVICE", "cpu")
        .env("CAFT_SEED", "0")
        .env("CAFT_DEMO_TRAIN", "8")
        .env("CAFT_DEMO_TEST", "4")
        .env("CAFT_DEMO_PROBES", "10")
        .env("CAFT_DEMO_STEPS", "1")
        .output()
        .expect("running bash scripts/demo_caft_mc.sh")
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[test]
fn demo_script_runs_end_to_end_at_toy_size() {
    let Some(gguf) = smollm2_gguf() else { return };
    let dir = TempDir::new("demo");
    let out = dir.join("out");
    let o = no_panic(demo(&out, &gguf, &["--neutral", "--seeds", "2"]));
    let log = assert_ok(&o);

    for seed in ["seed0", "seed1"] {
        let d = out.join(seed);
        assert!(read(&d.join("task").join("VARIANT")).contains("Which one do you choose?"));
        for arm in ARMS {
            let report: serde_json::Value =
                serde_json::from_str(&read(&d.join(format!("mc_{arm}.json")))).unwrap();
            let splits: Vec<&str> = report["splits"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| s["split"].as_str().unwrap())
                .collect();
            assert_eq!(splits, ["id", "ood"], "{seed} {arm}");
        }
        for arm in ["plain", "caft", "random"] {
            assert!(
                d.join(arm).join("adapter").is_dir(),
                "{seed}: no {arm} adapter"
            );
        }
        assert!(read(&d.join("results.md")).contains("| random |"));
        assert!(read(&d.join("chart.svg")).contains("</svg>"));
        assert!(read(&d.join("timing.txt")).contains("done"));
    }

    let md = read(&out.join("results.md"));
    // The script ends by printing the summary.
    assert!(stdout(&o).ends_with(&md), "{log}");
    assert!(md.contains("neutral question") && md.contains("2 seed(s) (0 to 1)"));
    for row in ["| seed0 |", "| seed1 |"] {
        let line = md.lines().find(|l| l.starts_with(row)).expect(row);
        // The seed, then id and ood of each of the four arms, each a percentage.
        let cells: Vec<&str> = line.trim_matches('|').split('|').map(str::trim).collect();
        assert_eq!(cells.len(), 9, "{line}");
        for c in &cells[1..] {
            let v: f64 = c.parse().unwrap_or_else(|_| panic!("{c:?} in {line}"));
            assert!((0.0..=100.0).contains(&v), "{line}");
        }
    }
    for arm in ARMS {
        assert!(md.contains(&format!("| {arm} |")), "no {arm} row:\n{md}");
    }
    for pair in ["| caft − random | ood |", "| caft − plain | ood |"] {
        assert!(md.contains(pair), "no {pair}:\n{md}");
    }
    assert!(md.contains("sign test p") && md.contains("permutation p"));

    let svg = read(&out.join("chart.svg"));
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    for arm in ARMS {
        assert!(svg.contains(&format!(">{arm}</text>")), "no {arm} label");
    }
    // Two seeds: a whisker per bar (4 arms x 2 splits) and a dot per seed and bar.
    assert_eq!(svg.matches(r#"class="whisker""#).count(), 8);
    assert_eq!(svg.matches(r#"class="seed""#).count(), 16);
    assert!(read(&out.join("commands.txt")).contains("eval seeds"));
    assert!(read(&out.join("timing.txt")).contains("total:"));

    // A second run into the same folder is refused without --overwrite, and --seeds 0 at once.
    let again = demo(&out, &gguf, &["--seeds", "1"]);
    assert_eq!(again.status.code(), Some(2), "{}", stderr(&again));
    assert!(stderr(&again).contains("--overwrite"));
    let zero = demo(&dir.join("other"), &gguf, &["--seeds", "0"]);
    assert_eq!(zero.status.code(), Some(2), "{}", stderr(&zero));
}
