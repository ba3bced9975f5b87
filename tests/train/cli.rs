//! `caft-fast train` end to end on the tiny Llama fixture (milliseconds a step): the loss falls,
//! --resume repeats an uninterrupted run bit for bit, Ctrl-C and divergence stop cleanly, the
//! config file works, and every bad input gives a clear error (exit 2, no panic) without
//! damaging earlier output.

use crate::support::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Flags of a small run on the tiny model with pre-tokenized data.
fn tiny_args(data: &Path, out: &Path) -> Vec<String> {
    [
        "--model",
        s(&tiny_llama()),
        "--data",
        s(data),
        "-o",
        s(out),
        "--lora-r",
        "4",
        "--lora-alpha",
        "8",
        "--batch-size",
        "3",
        "--grad-accum",
        "2",
        "--warmup-steps",
        "2",
        "--lr",
        "1e-2",
    ]
    .iter()
    .map(|x| x.to_string())
    .collect()
}

fn run_train(args: &[String], extra: &[&str]) -> std::process::Output {
    let mut all: Vec<&str> = args.iter().map(|x| x.as_str()).collect();
    all.extend_from_slice(extra);
    train(&all)
}

fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Every file under `dir` with its bytes (relative names), to show a folder is unchanged.
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push((p.strip_prefix(dir).unwrap().to_path_buf(), read(&p)));
            }
        }
    }
    out.sort();
    out
}

/// The loss of a short run falls: the mean of the last three steps is below 75% of the first
/// step's (measured on similar data: about 6.0 -> 3.1, i.e. 51%).
#[test]
fn loss_decreases_and_outputs_are_written() {
    let dir = TempDir::new("loss");
    let data = write(&dir.join("d.jsonl"), &memorizable_records(60, 6, 2));
    let out = dir.join("run");
    let mut args = tiny_args(&data, &out);
    args.extend(["--grad-accum", "1", "--max-steps", "30"].map(String::from));
    let msg = assert_ok(&run_train(&args, &["--merge"]));
    let m = metrics(&out);
    assert_eq!(m.len(), 30);
    let loss = |i: usize| m[i]["loss"].as_f64().unwrap();
    let last = (loss(27) + loss(28) + loss(29)) / 3.0;
    assert!(last < 0.75 * loss(0), "loss {} -> {last}", loss(0));
    let vals: Vec<f64> = m.iter().filter_map(|r| r["val_loss"].as_f64()).collect();
    assert!(vals.len() >= 3, "validation about ten times: {vals:?}");
    assert!(
        vals.last().unwrap() < &vals[0],
        "validation loss falls: {vals:?}"
    );
    for r in &m {
        for k in ["step", "loss", "lr", "grad_norm", "tokens_per_s"] {
            assert!(r.get(k).is_some(), "metrics row lacks {k}: {r}");
        }
    }
    // The summary names every output, and they exist.
    for f in [
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "metrics.jsonl",
        "loss.svg",
        "run.json",
        "config.toml",
        "merged/config.json",
        "merged/model.safetensors",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    for w in ["adapter", "metrics.jsonl", "loss.svg"] {
        assert!(
            msg.contains(w),
            "the summary should say where {w} is: {msg}"
        );
    }
    let svg = String::from_utf8(read(&out.join("loss.svg"))).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("<polyline"));
    let run: serde_json::Value = serde_json::from_slice(&read(&out.join("run.json"))).unwrap();
    assert_eq!(run["status"], "completed");
    assert_eq!(run["steps"], 30);
    assert!(run["program"].as_str().unwrap().starts_with("caft-fast "));
    assert_eq!(run["config"]["lora_r"], 4);
    assert_eq!(run["data"]["records"], 60);
    assert_eq!(run["data"]["train_examples"], 54, "10% held out");
    assert!(run["data"]["sha256"].as_str().unwrap().len() == 64);
}

/// The fields of a metrics row that depend on the run, not the clock.
fn deterministic(row: &serde_json::Value) -> serde_json::Value {
    let mut r = row.clone();
    let o = r.as_object_mut().unwrap();
    o.remove("step_s");
    o.remove("tokens_per_s");
    r
}

/// An uninterrupted run and one stopped, resumed, "crashed" (its newest checkpoint deleted,
/// so the metrics of the steps after the older one are redone) and resumed again give the same
/// metrics (losses, validation losses, grad norms, lr: bit-identical JSON numbers) and the
/// same adapter and optimizer bytes. The run crosses an epoch boundary (6 steps an epoch).
#[test]
fn resume_is_bit_identical() {
    let dir = TempDir::new("resume");
    let data = write(&dir.join("d.jsonl"), &progression_records(40, 3));
    let common = |out: &Path| {
        let mut a = tiny_args(&data, out);
        a.extend(["--max-steps", "9", "--save-every", "4", "--eval-every", "2"].map(String::from));
        a
    };
    let full = dir.join("full");
    assert_ok(&run_train(&common(&full), &[]));

    let part = dir.join("part");
    let msg = assert_ok(&run_train(&common(&part), &["--stop-after", "5"]));
    assert!(msg.contains("--resume"), "{msg}");
    let run: serde_json::Value = serde_json::from_slice(&read(&part.join("run.json"))).unwrap();
    assert_eq!(run["status"], "stopped");
    assert!(
        !part.join("adapter").exists(),
        "no final adapter before the end"
    );
    assert_ok(&train(&["--resume", s(&part), "--stop-after", "7"]));
    let ck = part.join("checkpoints");
    assert!(ck.join("step-00000005").is_dir() && ck.join("step-00000007").is_dir());
    assert!(
        !ck.join("step-00000004").exists(),
        "--keep-checkpoints 2 pruned step 4"
    );
    std::fs::remove_dir_all(ck.join("step-00000007")).unwrap();
    let msg = assert_ok(&train(&["--resume", s(&part)]));
    assert!(msg.contains("resuming at step 5"), "{msg}");

    let (a, b) = (metrics(&full), metrics(&part));
    assert_eq!(a.len(), 9);
    assert_eq!(b.len(), 9, "steps 6 and 7 were redone, not duplicated");
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(deterministic(x), deterministic(y));
    }
    assert_eq!(
        read(&full.join("adapter/adapter_model.safetensors")),
        read(&part.join("adapter/adapter_model.safetensors"))
    );
    assert_eq!(
        read(&full.join("checkpoints/step-00000009/optimizer.safetensors")),
        read(&part.join("checkpoints/step-00000009/optimizer.safetensors"))
    );
}

/// Ctrl-C (SIGINT) saves a checkpoint at the next step boundary and exits with status 1; the
/// run then resumes from it.
#[test]
fn ctrl_c_saves_a_checkpoint_and_exits() {
    let dir = TempDir::new("sigint");
    let data = write(&dir.join("d.jsonl"), &progression_records(40, 4));
    let out = dir.join("run");
    let mut args = tiny_args(&data, &out);
    args.extend(
        [
            "--max-steps",
            "100000",
            "--save-every",
            "0",
            "--device",
            "cpu",
        ]
        .map(String::from),
    );
    let child = Command::new(exe())
        .arg("train")
        .args(&args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    // Wait until a few steps are logged, then interrupt.
    loop {
        let n = std::fs::read_to_string(out.join("metrics.jsonl"))
            .map(|s| s.lines().count())
            .unwrap_or(0);
        if n >= 3 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "no progress in 60 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let st = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let o = child.wait_with_output().unwrap();
    let err = stderr(&o);
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(o.status.code(), Some(1), "{err}{}", stdout(&o));
    assert!(stdout(&o).contains("interrupted at step"), "{}", stdout(&o));
    let run: serde_json::Value = serde_json::from_slice(&read(&out.join("run.json"))).unwrap();
    assert_eq!(run["status"], "interrupted");
    let step = run["steps"].as_u64().unwrap();
    assert!(step >= 3);
    let ck = out.join(format!("checkpoints/step-{step:08}"));
    assert!(ck.join("trainer_state.json").is_file(), "{}", ck.display());
    assert_eq!(metrics(&out).len() as u64, step);
    // It continues from there.
    let msg = assert_ok(&train(&[
        "--resume",
        s(&out),
        "--stop-after",
        &(step + 2).to_string(),
    ]));
    assert!(msg.contains(&format!("resuming at step {step}")), "{msg}");
    assert_eq!(metrics(&out).len() as u64, step + 2);
}

/// A diverging run (a huge learning rate) stops with a message naming the step and the last
/// good checkpoint, which stays loadable; run.json says so.
#[test]
fn nan_loss_stops_and_keeps_the_last_checkpoint() {
    let dir = TempDir::new("nan");
    let data = write(&dir.join("d.jsonl"), &progression_records(40, 5));
    let out = dir.join("run");
    let mut args = tiny_args(&data, &out);
    args.extend(
        [
            "--lr",
            "1e30",
            "--warmup-steps",
            "0",
            "--max-grad-norm",
            "0",
            "--save-every",
            "1",
            "--max-steps",
            "20",
        ]
        .map(String::from),
    );
    let err = assert_error(&run_train(&args, &[]), &["diverged at step", "NaN or Inf"]);
    let run: serde_json::Value = serde_json::from_slice(&read(&out.join("run.json"))).unwrap();
    assert_eq!(run["status"], "diverged");
    let bad = run["steps"].as_u64().unwrap() + 1;
    assert!(err.contains(&format!("step {bad}")), "{err}");
    let good = format!("step-{:08}", bad - 1);
    assert!(
        err.contains(&good),
        "the message names the checkpoint: {err}"
    );
    let state: serde_json::Value = serde_json::from_slice(&read(
        &out.join("checkpoints")
            .join(&good)
            .join("trainer_state.json"),
    ))
    .unwrap();
    assert_eq!(state["step"].as_u64(), Some(bad - 1));
    assert!(!out.join("adapter").exists());
}

/// A TOML config file sets the run; flags override it; the run writes its resolved config.
#[test]
fn config_file_and_flag_precedence() {
    let dir = TempDir::new("config");
    let data = write(&dir.join("d.jsonl"), &progression_records(20, 6));
    let out = dir.join("run");
    let cfg = write(
        &dir.join("c.toml"),
        &format!(
            "model = {:?}\ndata = {:?}\noutput = {:?}\nlora_r = 2\nlora_targets = [\"q\", \"v\"]\n\
             lr = 1e-3\nmax_steps = 2\nbatch_size = 2\ngrad_accum = 1\nschedule = \"cosine\"\n",
            s(&tiny_llama()),
            s(&data),
            s(&out)
        ),
    );
    assert_ok(&train(&["--config", s(&cfg), "--lr", "5e-3"]));
    let run: serde_json::Value = serde_json::from_slice(&read(&out.join("run.json"))).unwrap();
    assert_eq!(run["config"]["lora_r"], 2);
    assert_eq!(run["config"]["lr"], 5e-3, "the flag wins over the file");
    assert_eq!(run["config"]["schedule"], "cosine");
    let adapter: serde_json::Value =
        serde_json::from_slice(&read(&out.join("adapter/adapter_config.json"))).unwrap();
    assert_eq!(
        adapter["target_modules"],
        serde_json::json!(["q_proj", "v_proj"])
    );
    // config.toml reproduces the run: the same losses from it alone.
    let out2 = dir.join("run2");
    assert_ok(&train(&[
        "--config",
        s(&out.join("config.toml")),
        "-o",
        s(&out2),
    ]));
    let (a, b) = (metrics(&out), metrics(&out2));
    assert_eq!(a.len(), 2);
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(deterministic(x), deterministic(y));
    }
    // Unknown keys are refused, naming the key and the file.
    let bad = write(&dir.join("bad.toml"), "lora_rank = 8\n");
    assert_error(
        &train(&["--config", s(&bad), "-o", s(&dir.join("x"))]),
        &["bad.toml", "lora_rank"],
    );
}

/// Chat records on a chat-capable tiny model train end to end, assistant tokens only.
#[test]
fn chat_data_trains_on_a_model_with_a_template() {
    let dir = TempDir::new("chat");
    let model = tiny_chat_model("chat", true);
    let data = write(&dir.join("chat.jsonl"), &chat_records(12));
    let out = dir.join("run");
    let msg = assert_ok(&train(&[
        "--model",
        s(&model),
        "--data",
        s(&data),
        "-o",
        s(&out),
        "--lora-r",
        "2",
        "--batch-size",
        "2",
        "--grad-accum",
        "1",
        "--max-steps",
        "3",
        "--max-seq-len",
        "40",
    ]));
    let run: serde_json::Value = serde_json::from_slice(&read(&out.join("run.json"))).unwrap();
    let d = &run["data"];
    assert!(
        d["train_label_tokens"].as_u64().unwrap() * 3 < d["train_tokens"].as_u64().unwrap(),
        "assistant-only labels are a minority of the tokens: {d}"
    );
    // Conversations with a system turn are longer than 40 tokens: truncated and reported.
    assert!(d["truncated"].as_u64().unwrap() > 0, "{d}");
    assert!(msg.contains("truncated at 40 tokens"), "{msg}");
}

// ---------------------------------------------------------------------------------------------
// Bad input: exit 2, a clear message, no panic, no earlier output damaged.

/// A finished run in `dir/run` whose files the bad-input cases must leave untouched.
fn earlier_run(dir: &Path) -> (PathBuf, Vec<(PathBuf, Vec<u8>)>) {
    let data = write(&dir.join("good.jsonl"), &progression_records(12, 9));
    let out = dir.join("run");
    let mut a = tiny_args(&data, &out);
    a.extend(["--max-steps", "2", "--lora-r", "2"].map(String::from));
    assert_ok(&run_train(&a, &[]));
    let snap = snapshot(&out);
    (out, snap)
}

#[test]
fn bad_data_files_name_file_and_line() {
    let dir = TempDir::new("baddata");
    let (out, snap) = earlier_run(&dir);
    let chat = tiny_chat_model("baddata", true);
    let cases: Vec<(&str, String, Vec<&str>)> = vec![
        (
            "malformed",
            format!("{}\n{{\"input_ids\": [1, 2,\n", progression_records(1, 1).trim()),
            vec!["malformed.jsonl:2", "malformed JSON"],
        ),
        (
            "noassistant",
            "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}\n".into(),
            vec!["noassistant.jsonl:1", "no assistant turn"],
        ),
        (
            "role",
            format!(
                "{}{{\"messages\": [{{\"role\": \"robot\", \"content\": \"x\"}}, {{\"role\": \"assistant\", \"content\": \"y\"}}]}}\n",
                chat_records(2)
            ),
            vec!["role.jsonl:3", "unknown role \"robot\""],
        ),
        (
            "unknownkeys",
            "{\"question\": \"a\", \"answer\": \"b\"}\n".into(),
            vec!["unknownkeys.jsonl:1", "\"messages\""],
        ),
        (
            "filtered",
            // Labels only after position 10; --max-seq-len 8 cuts them all off.
            format!(
                "{{\"input_ids\": {:?}, \"labels\": {:?}}}\n",
                (0..16).collect::<Vec<i32>>(),
                (0..16).map(|i| if i < 10 { -100 } else { i }).collect::<Vec<i32>>()
            ),
            vec!["empty after filtering", "--max-seq-len 8"],
        ),
        ("empty", "\n\n".into(), vec!["empty after filtering", "0 records"]),
    ];
    for (name, text, needles) in cases {
        let data = write(&dir.join(format!("{name}.jsonl")), &text);
        let o = train(&[
            "--model",
            s(&chat),
            "--data",
            s(&data),
            "-o",
            s(&out),
            "--overwrite",
            "--max-seq-len",
            "8",
        ]);
        assert_error(&o, &needles);
        assert_eq!(snapshot(&out), snap, "{name}: the earlier run was changed");
    }
}

#[test]
fn chat_data_needs_a_tokenizer_and_a_template() {
    let dir = TempDir::new("notemplate");
    let (out, snap) = earlier_run(&dir);
    let data = write(&dir.join("chat.jsonl"), &chat_records(4));
    let no_template = tiny_chat_model("notemplate", false);
    assert_error(
        &train(&[
            "--model",
            s(&no_template),
            "--data",
            s(&data),
            "-o",
            s(&out),
            "--overwrite",
        ]),
        &["chat.jsonl:1", "no chat template"],
    );
    // The tiny fixture has no tokenizer at all: text records are refused, pre-tokenized ones
    // suggested.
    let text = write(&dir.join("text.jsonl"), "{\"text\": \"hello\"}\n");
    assert_error(
        &train(&[
            "--model",
            s(&tiny_llama()),
            "--data",
            s(&text),
            "-o",
            s(&out),
            "--overwrite",
        ]),
        &["text.jsonl:1", "no tokenizer", "input_ids"],
    );
    assert_eq!(snapshot(&out), snap);
}

#[test]
fn existing_output_is_refused_without_overwrite() {
    let dir = TempDir::new("exists");
    let (out, snap) = earlier_run(&dir);
    let data = write(&dir.join("d.jsonl"), &progression_records(12, 1));
    let o = run_train(&tiny_args(&data, &out), &["--max-steps", "1"]);
    assert_error(&o, &["exists", "--overwrite"]);
    assert_eq!(snapshot(&out), snap);
}

#[test]
fn directions_for_another_model_are_refused() {
    let dir = TempDir::new("dirs");
    let (out, snap) = earlier_run(&dir);
    let data = write(&dir.join("d.jsonl"), &progression_records(12, 1));
    let save = |name: &str, layer: usize, width: usize| -> PathBuf {
        let mut rng = caft_fast::util::rng::Rng::new(1);
        let q = rng.normal_vec(2 * width);
        let dirs = caft_fast::model::ablation::Directions {
            sets: vec![caft_fast::model::ablation::DirectionSet {
                layer,
                k: 2,
                d: width,
                q,
            }],
            sha256: String::new(),
            source: "test".into(),
        };
        let p = dir.join(name);
        caft_fast::model::ablation::save_directions(&p, &dirs).unwrap();
        p
    };
    let wide = save("wide.safetensors", 1, 96);
    let deep = save("deep.safetensors", 9, 64);
    for (f, needles) in [
        (&wide, vec!["wide.safetensors", "96", "64"]),
        (&deep, vec!["deep.safetensors", "9", "4 layers"]),
    ] {
        let o = run_train(
            &tiny_args(&data, &out),
            &["--overwrite", "--ablate", s(f), "--max-steps", "1"],
        );
        assert_error(&o, &needles);
        assert_eq!(snapshot(&out), snap);
    }
    // --ablate-random at a layer the model lacks.
    let o = run_train(
        &tiny_args(&data, &out),
        &[
            "--overwrite",
            "--ablate-random",
            "2",
            "--ablate-layers",
            "1,7",
        ],
    );
    assert_error(&o, &["ablation layer 7", "4 layers"]);
    assert_eq!(snapshot(&out), snap);
}

#[test]
fn resume_refuses_another_configuration() {
    let dir = TempDir::new("resumecfg");
    let data = write(&dir.join("d.jsonl"), &progression_records(30, 1));
    let other = write(&dir.join("other.jsonl"), &progression_records(30, 2));
    let out = dir.join("run");
    let mut a = tiny_args(&data, &out);
    a.extend(["--max-steps", "6"].map(String::from));
    assert_ok(&run_train(&a, &["--stop-after", "2"]));
    let snap = snapshot(&out);
    assert_error(
        &train(&["--resume", s(&out), "--lora-r", "8"]),
        &["another configuration", "lora_r: 8 (now) vs 4 (checkpoint)"],
    );
    assert_error(
        &train(&["--resume", s(&out), "--data", s(&other)]),
        &["another configuration", "data"],
    );
    // The same path with other contents: caught by the data fingerprint.
    std::fs::copy(&other, &data).unwrap();
    assert_error(&train(&["--resume", s(&out)]), &["training data differs"]);
    assert_error(
        &train(&["--resume", s(&dir.join("nothing-here"))]),
        &["nothing-here", "no such folder"],
    );
    assert_eq!(snapshot(&out), snap, "the refused resumes changed the run");
}

/// A full disk while saving a checkpoint: the run stops with the OS error and the path, the
/// earlier checkpoint stays complete and loadable, and no partial folder is left. The disk is a
/// tmpfs sized for one checkpoint and a half (needs root to mount; skipped with a notice
/// otherwise).
#[test]
fn disk_full_while_saving_keeps_the_earlier_checkpoint() {
    let dir = TempDir::new("diskfull");
    let data = write(&dir.join("d.jsonl"), &progression_records(30, 1));
    let extra = [
        "--max-steps",
        "4",
        "--save-every",
        "1",
        "--keep-checkpoints",
        "1",
    ];
    // Measure one checkpoint on an ordinary disk first.
    let probe = dir.join("probe");
    assert_ok(&run_train(
        &tiny_args(&data, &probe),
        &["--max-steps", "4", "--stop-after", "1"],
    ));
    let ck_bytes: u64 = snapshot(&probe.join("checkpoints"))
        .iter()
        .map(|(_, b)| (b.len() as u64).div_ceil(4096) * 4096)
        .sum();
    let mnt = dir.join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let size = (ck_bytes * 3 / 2 + 16384).div_ceil(4096) * 4096;
    let mounted = Command::new("mount")
        .args([
            "-t",
            "tmpfs",
            "-o",
            &format!("size={size}"),
            "tmpfs",
            s(&mnt),
        ])
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !mounted {
        eprintln!("skipping: cannot mount a tmpfs here (needs root)");
        return;
    }
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _guard = Unmount(mnt.clone());
    let out = mnt.join("run");
    let o = run_train(&tiny_args(&data, &out), &extra);
    assert_error(
        &o,
        &["saving the checkpoint of step 2", "No space left on device"],
    );
    let ck = out.join("checkpoints");
    let names: Vec<String> = std::fs::read_dir(&ck)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    assert_eq!(
        names,
        vec!["step-00000001".to_string()],
        "no partial folder is left"
    );
    let state: serde_json::Value =
        serde_json::from_slice(&read(&ck.join("step-00000001/trainer_state.json"))).unwrap();
    assert_eq!(state["step"], 1);
    // The surviving checkpoint is whole: it resumes (on a disk with room) from a copy.
    let copy = dir.join("copy");
    std::fs::create_dir_all(copy.join("checkpoints")).unwrap();
    for (rel, bytes) in snapshot(&ck.join("step-00000001")) {
        let p = copy.join("checkpoints/step-00000001").join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, bytes).unwrap();
    }
    let msg = assert_ok(&train(&[
        "--resume",
        s(&copy),
        "--stop-after",
        "2",
        "-o",
        s(&copy),
    ]));
    assert!(msg.contains("resuming at step 1"), "{msg}");
}

/// `--ablate FILE --ablate-layers L` keeps only layer L of the file; run.json records the
/// file's hash and the layers; a layer the file lacks is refused.
#[test]
fn ablate_layers_restricts_a_directions_file() {
    let dir = TempDir::new("restrict");
    let data = write(&dir.join("d.jsonl"), &progression_records(12, 1));
    let file = tiny_llama().join("directions.safetensors");
    let out = dir.join("run");
    let extra = [
        "--ablate",
        s(&file),
        "--ablate-layers",
        "2",
        "--max-steps",
        "1",
    ];
    assert_ok(&run_train(&tiny_args(&data, &out), &extra));
    let run: serde_json::Value = serde_json::from_slice(&read(&out.join("run.json"))).unwrap();
    assert_eq!(run["directions"]["layers"], serde_json::json!([2]));
    assert_eq!(run["directions"]["k"], serde_json::json!([2]));
    let sha = {
        use sha2::Digest;
        let d = sha2::Sha256::digest(read(&file));
        d.iter().map(|b| format!("{b:02x}")).collect::<String>()
    };
    assert_eq!(run["directions"]["sha256"], sha.as_str());
    let o = run_train(
        &tiny_args(&data, &dir.join("run3")),
        &[
            "--ablate",
            s(&file),
            "--ablate-layers",
            "3",
            "--max-steps",
            "1",
        ],
    );
    assert_error(&o, &["no directions for layer 3"]);
    assert!(
        !dir.join("run3").exists(),
        "nothing is written on a refused run"
    );
}

/// Packing (the default) and `--no-packing` train on the same examples per step with the same
/// normalisation: the first step's loss, computed before any update, agrees within 1e-6
/// relative (only summation order differs); later steps stay within 1e-4 (AdamW's first steps
/// divide by |g|, so rounding-level gradient differences move parameters by up to lr).
#[test]
fn packed_and_padded_runs_agree() {
    let dir = TempDir::new("packing");
    let data = write(&dir.join("d.jsonl"), &progression_records(40, 3));
    let losses = |out: &Path, extra: &[&str]| -> Vec<f64> {
        let mut args = tiny_args(&data, out);
        args.extend(["--max-steps", "4"].map(String::from));
        assert_ok(&run_train(&args, extra));
        metrics(out)
            .iter()
            .map(|r| r["loss"].as_f64().unwrap())
            .collect()
    };
    let packed = losses(&dir.join("packed"), &[]);
    let padded = losses(&dir.join("padded"), &["--no-packing"]);
    let budget = losses(&dir.join("budget"), &["--max-tokens-per-batch", "40"]);
    assert_eq!(packed.len(), 4);
    for (what, other) in [("--no-packing", &padded), ("budget 40", &budget)] {
        let rel = |i: usize| ((packed[i] - other[i]) / other[i]).abs();
        assert!(
            rel(0) < 1e-6,
            "{what}: step 1 {} vs {}",
            packed[0],
            other[0]
        );
        for i in 1..4 {
            assert!(
                rel(i) < 1e-4,
                "{what}: step {} {packed:?} vs {other:?}",
                i + 1
            );
        }
    }
    let cfg = std::fs::read_to_string(dir.join("padded/config.toml")).unwrap();
    assert!(cfg.contains("packing = false"), "{cfg}");
}

/// Bad packing options fail before the model loads or any output is touched: a token budget
/// below the longest example names the file, the line and the length; zero, and a budget
/// without packing, are refused.
#[test]
fn bad_packing_options_are_named() {
    let dir = TempDir::new("badpacking");
    let (out, snap) = earlier_run(&dir);
    let long = format!(
        "{}{{\"input_ids\": {:?}}}\n",
        progression_records(2, 1),
        (0..40).collect::<Vec<i32>>()
    );
    let data = write(&dir.join("long.jsonl"), &long);
    let model = tiny_llama();
    let base = [
        "--model",
        s(&model),
        "--data",
        s(&data),
        "-o",
        s(&out),
        "--overwrite",
    ];
    let with = |extra: &[&str]| {
        let mut a = base.to_vec();
        a.extend_from_slice(extra);
        train(&a)
    };
    assert_error(
        &with(&["--max-tokens-per-batch", "35"]),
        &["long.jsonl:3", "40 tokens", "--max-tokens-per-batch 35"],
    );
    assert_error(
        &with(&["--max-tokens-per-batch", "0"]),
        &["--max-tokens-per-batch must be at least 1"],
    );
    assert_error(
        &with(&["--no-packing", "--max-tokens-per-batch", "64"]),
        &["--max-tokens-per-batch applies to packed micro-batches"],
    );
    assert_eq!(snapshot(&out), snap, "the earlier run was changed");
    // The longest example fits: accepted.
    assert_ok(&with(&["--max-tokens-per-batch", "40", "--max-steps", "1"]));
}

/// `--checkpointing selective|full` (or the TOML key) trains bit-identically to keeping every
/// activation: the same losses and gradient norms at every step, the same adapter bytes.
#[test]
fn checkpointing_modes_train_identically() {
    let dir = TempDir::new("ckpt-modes");
    let data = write(&dir.join("d.jsonl"), &progression_records(30, 4));
    let run = |name: &str, extra: &[&str]| -> (Vec<serde_json::Value>, Vec<u8>) {
        let out = dir.join(name);
        let mut args = tiny_args(&data, &out);
        args.extend(["--max-steps", "3"].map(String::from));
        assert_ok(&run_train(&args, extra));
        let rows = metrics(&out).iter().map(deterministic).collect();
        (rows, read(&out.join("adapter/adapter_model.safetensors")))
    };
    let none = run("none", &[]);
    let cfg = write(&dir.join("full.toml"), "checkpointing = \"full\"\n");
    for (name, extra) in [
        ("selective", vec!["--checkpointing", "selective"]),
        ("full", vec!["--config", s(&cfg)]),
    ] {
        let got = run(name, &extra);
        assert_eq!(got.0, none.0, "{name}: metrics differ");
        assert!(got.1 == none.1, "{name}: adapter bytes differ");
    }
    assert_error(
        &train(&["--checkpointing", "sometimes"]),
        &["sometimes", "none", "selective", "full"],
    );
}

// ---------------------------------------------------------------------------------------------
// Full fine-tuning and the optimizer knobs: bad combinations are refused before anything is
// written, naming the flag (or the config key and its file).

/// `caft-fast train` on the tiny model with `extra`, into `dir/out`.
fn train_in(dir: &Path, data: &Path, extra: &[&str]) -> std::process::Output {
    let out = dir.join("out");
    let model = tiny_llama();
    let mut a = vec!["--model", s(&model), "--data", s(data), "-o", s(&out)];
    a.extend_from_slice(extra);
    train(&a)
}

/// Each case: the flags, what the error must name. The run is refused with exit 2 and no
/// output folder.
fn assert_refused(dir: &Path, data: &Path, cases: &[(Vec<&str>, Vec<&str>)]) {
    for (extra, needles) in cases {
        let o = train_in(dir, data, extra);
        let err = assert_error(&o, needles);
        assert!(!err.contains("panicked"), "{extra:?}: {err}");
        assert!(
            !dir.join("out").exists(),
            "{extra:?}: an output folder was created"
        );
    }
}

#[test]
fn lora_flags_are_refused_with_method_full() {
    let dir = TempDir::new("full-lora");
    let data = write(&dir.join("d.jsonl"), &progression_records(12, 1));
    let cfg = write(
        &dir.join("lora.toml"),
        "lora_alpha = 16.0\nlora_targets = \"q,v\"\n",
    );
    let full = ["--method", "full", "--save-dtype", "f32"];
    let cases = vec![
        (
            [&full[..], &["--lora-r", "4"]].concat(),
            vec!["--lora-r", "LoRA-only"],
        ),
        (
            [&full[..], &["--lora-alpha", "8"]].concat(),
            vec!["--lora-alpha", "LoRA-only"],
        ),
        (
            [&full[..], &["--rslora"]].concat(),
            vec!["--rslora", "LoRA-only"],
        ),
        (
            [&full[..], &["--rslora", "false"]].concat(),
            vec!["--rslora", "LoRA-only"],
        ),
        (
            [&full[..], &["--lora-targets", "q,v"]].concat(),
            vec!["--lora-targets", "LoRA-only"],
        ),
        (
            [&full[..], &["--merge"]].concat(),
            vec!["--merge", "complete model folder"],
        ),
        // Given in the config file: the keys and the file are named.
        (
            [&full[..], &["--config", s(&cfg)]].concat(),
            vec!["`lora_alpha`", "`lora_targets`", "lora.toml"],
        ),
    ];
    assert_refused(&dir, &data, &cases);
    // Defaults are not explicit: the same run without LoRA flags passes every check and stops
    // only at the (missing) data file, after the model loaded and before any output.
    let missing = dir.join("missing.jsonl");
    let o = train_in(&dir, &missing, &full);
    assert_error(&o, &["missing.jsonl"]);
    assert!(!dir.join("out").exists());
}

#[test]
fn freeze_and_save_dtype_are_checked() {
    let dir = TempDir::new("full-freeze");
    let data = write(&dir.join("d.jsonl"), &progression_records(12, 1));
    let bad_dtype = write(
        &dir.join("dtype.toml"),
        "method = \"full\"\nsave_dtype = \"f8\"\n",
    );
    let cases = vec![
        (
            vec![
                "--method",
                "full",
                "--save-dtype",
                "f32",
                "--freeze",
                "embeddings,bias",
            ],
            vec!["--freeze", "\"bias\"", "embeddings, norms"],
        ),
        (
            vec!["--freeze", "norms"],
            vec!["--freeze applies to --method full"],
        ),
        (
            vec!["--method", "full", "--save-dtype", "f8"],
            vec!["--save-dtype", "f8", "bf16"],
        ),
        (
            vec!["--config", s(&bad_dtype)],
            vec!["--save-dtype", "\"f8\"", "bf16, f16, f32"],
        ),
        (
            vec!["--save-dtype", "bf16"],
            vec!["--save-dtype applies to --method full"],
        ),
        (vec!["--method", "half"], vec!["--method", "half", "full"]),
    ];
    assert_refused(&dir, &data, &cases);
}

#[test]
fn optimizer_knobs_are_checked() {
    let dir = TempDir::new("adam-knobs");
    let data = write(&dir.join("d.jsonl"), &progression_records(12, 1));
    let steps = write(&dir.join("steps.toml"), "warmup_steps = 3\n");
    let cases = vec![
        (
            vec!["--warmup-ratio", "1"],
            vec!["--warmup-ratio 1", "[0, 1)"],
        ),
        (vec!["--warmup-ratio=-0.5"], vec!["--warmup-ratio -0.5"]),
        (
            vec!["--warmup-ratio", "0.1", "--warmup-steps", "2"],
            vec!["--warmup-steps", "--warmup-ratio", "not both"],
        ),
        (
            vec!["--warmup-ratio", "0.1", "--config", s(&steps)],
            vec!["`warmup_steps`", "steps.toml", "--warmup-ratio"],
        ),
        (
            vec!["--adam-beta1", "0.4"],
            vec!["--adam-beta1 0.4", "above 0.5", "AdamW kernel"],
        ),
        (vec!["--adam-beta1", "1"], vec!["--adam-beta1 1"]),
        (vec!["--adam-beta2", "1"], vec!["--adam-beta2 1", "[0, 1)"]),
        (vec!["--adam-beta2=-0.1"], vec!["--adam-beta2 -0.1"]),
        (vec!["--adam-eps", "0"], vec!["--adam-eps 0", "above 0"]),
        (vec!["--adam-eps=-1e-8"], vec!["--adam-eps -0.00000001"]),
    ];
    assert_refused(&dir, &data, &cases);
}

/// A full fine-tune of a GGUF base (the default model is one) needs --save-dtype; with it the
/// run goes on and says that it starts from dequantised weights.
#[test]
fn full_fine_tuning_of_a_gguf_needs_save_dtype() {
    let dir = TempDir::new("full-gguf");
    let out = dir.join("out");
    let gguf = dir.join("model.Q4_1.gguf");
    for model in [None, Some(&gguf)] {
        let mut a = vec!["--method", "full", "-o", s(&out)];
        if let Some(m) = model {
            a.extend(["--model", s(m)]);
        }
        assert_error(
            &train(&a),
            &["GGUF", "quantized", "dequantised", "--save-dtype"],
        );
        assert!(!out.exists());
    }
    // With --save-dtype the checks pass: the notice, then the (absent) file stops the run.
    let err = assert_error(
        &train(&[
            "--method",
            "full",
            "--save-dtype",
            "bf16",
            "--model",
            s(&gguf),
            "-o",
            s(&out),
        ]),
        &["model.Q4_1.gguf"],
    );
    assert!(
        err.contains("notice") && err.contains("dequantised") && err.contains("bf16"),
        "{err}"
    );
    assert!(!out.exists());
}

/// Every recipe of docs/recipes/ is a configuration `train --config` accepts: its keys parse,
/// its values validate, and its explicit keys suit its method. Only files are read: the
/// recipes' models are Hub ids or folders (no GGUF), so no path needs replacing.
#[test]
fn recipes_are_valid_train_configs() {
    use caft_fast::train::config::{Explicit, Method, TrainConfig};
    let dir = repo().join("docs/recipes");
    let mut recipes: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    recipes.sort();
    assert_eq!(recipes.len(), 3, "{recipes:?}");
    for p in &recipes {
        let (cfg, keys) = TrainConfig::merge_toml_file_keys(&TrainConfig::default(), p)
            .unwrap_or_else(|e| panic!("{}: {e:#}", p.display()));
        let mut given = Explicit::default();
        for k in &keys {
            given.file(k, p);
        }
        cfg.validate()
            .and_then(|_| cfg.validate_explicit(&given))
            .and_then(|_| cfg.validate_base())
            .unwrap_or_else(|e| panic!("{}: {e:#}", p.display()));
        let name = p.file_name().unwrap().to_string_lossy().to_string();
        assert!(cfg.ablate.is_some(), "{name}: a CAFT run ablates");
        if name.starts_with("em-") {
            assert_eq!(cfg.method, Method::Lora, "{name}");
            assert_eq!(
                (
                    cfg.lora_r,
                    cfg.lora_alpha,
                    cfg.rslora,
                    cfg.lora_targets.as_str()
                ),
                (32, 64.0, true, "q,k,v,o,gate,up,down"),
                "{name}"
            );
            assert_eq!(
                (cfg.batch_size, cfg.grad_accum, cfg.max_seq_len, cfg.lr),
                (2, 8, 2048, 1e-5),
                "{name}"
            );
            assert_eq!(
                cfg.ablate_layers.as_ref().map(|l| l.len()),
                Some(3),
                "{name}"
            );
        } else {
            assert_eq!(cfg.method, Method::Full, "{name}");
            assert_eq!(
                (cfg.lr, cfg.adam_beta1, cfg.adam_beta2, cfg.weight_decay),
                (5e-6, 0.9, 0.95, 0.01),
                "{name}"
            );
            assert_eq!(
                (
                    cfg.warmup_ratio,
                    cfg.batch_size,
                    cfg.grad_accum,
                    cfg.max_seq_len
                ),
                (Some(0.5), 16, 1, 512),
                "{name}"
            );
        }
    }
}
