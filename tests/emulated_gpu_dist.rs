//! Data-parallel training on the emulated GPU (tests/cuda_emulated/: the CPU standing in for
//! the driver, cuBLAS and libnccl; the real kernels, host code, rendezvous and launcher), in
//! separate processes as on a node of GPUs.
//!
//! - In f32 (`CudaBackend<f32>`, each rank a child process running `train::run` with the
//!   torchrun-style environment): N ranks make the updates one rank makes with the whole step
//!   (1, 2 and 3 ranks; packed and padded; LoRA and full fine-tuning), and a run checkpointed
//!   at 2 ranks resumes at 3 and ends as the uninterrupted one-rank run.
//! - The binary (bf16): `train --gpus` starts and supervises the workers, rank 0 alone writes;
//!   a worker killed mid-run ends the run with its rank named and the last checkpoint intact,
//!   from which `--resume` ends as an uninterrupted run; bad launch input is refused clearly.
//!
//! What the emulated GPU cannot show: NCCL's own summation order (the stand-in adds ranks in
//! rank order), overlap of communication with compute, and any speed.

#[path = "cuda_emulated/gpu.rs"]
mod emulated_gpu;
#[path = "cuda_emulated/harness.rs"]
mod harness;
mod support;

use std::path::Path;
use std::process::Output;
use support::*;

use emulated_gpu::folder as gpu_dir;

fn free_port() -> u16 {
    std::net::TcpListener::bind(("127.0.0.1", 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

// ---- f32: the library's run, one process per rank -----------------------------------------

/// Set in a rank's process: the TOML configuration of its run.
const JOB_TOML: &str = "CAFT_TEST_RANK_TOML";
/// Set in a rank's process to resume from this checkpoint folder.
const JOB_RESUME: &str = "CAFT_TEST_RANK_RESUME";

/// One rank of a run: `train::run` on `CudaBackend<f32>` with the configuration in
/// `$CAFT_TEST_RANK_TOML` and the launch environment (`RANK`, ...). Runs only as a child of
/// [`run_ranks`].
#[test]
#[ignore = "one rank of a data-parallel run; started by the tests below"]
fn rank_worker() {
    let Ok(text) = std::env::var(JOB_TOML) else {
        return;
    };
    use caft_fast::backend::cuda::backend::CudaBackend;
    use caft_fast::train::config::TrainConfig;
    let cfg = TrainConfig::merge_toml_str(&TrainConfig::default(), &text).unwrap();
    let loaded = caft_fast::model::loader::load_model(cfg.model.as_deref().unwrap()).unwrap();
    let be = CudaBackend::<f32>::new(0).unwrap();
    let opts = caft_fast::train::RunOptions {
        resume: std::env::var_os(JOB_RESUME).map(|p| {
            caft_fast::train::checkpoint::resolve_resume(Path::new(&p))
                .unwrap()
                .1
        }),
        overwrite: true,
        stop_after: cfg_stop_after(),
        dist: caft_fast::dist::Dist::from_env().unwrap(),
    };
    let base = device_peak(true);
    let world = opts.dist.world;
    if let Err(e) = caft_fast::train::run(&be, &cfg, &loaded, &opts) {
        eprintln!("rank failed: {e:#}");
        std::process::exit(2);
    }
    // The run's memory plan for this rank (what `train` checks before loading; no
    // checkpointing on the emulated GPU's 80 GiB), against the device memory it used.
    use caft_fast::train::plan;
    let data = caft_fast::train::trainer::prepare_data(&cfg, &loaded).unwrap();
    let lens = |ex: &[caft_fast::data::Example]| ex.iter().map(|e| e.ids.len()).collect::<Vec<_>>();
    let (train, val) = (lens(&data.train), lens(&data.val));
    let known = plan::KnownData {
        train: &train,
        val: &val,
    };
    let ks = vec![3; cfg.ablate_layers.as_ref().map_or(0, |l| l.len())];
    let input = plan::run_input(&cfg, &loaded.config, ks, Some(known), 4, 0, world.size).unwrap();
    let planned = plan::plan(&input, caft_fast::model::transformer::Checkpointing::None).allocated;
    println!(
        "rank {} device peak {} planned {planned}",
        world.rank,
        device_peak(false) - base
    );
}

/// The emulated driver's peak of live device bytes (`reset`: restart it at the live bytes and
/// return those).
fn device_peak(reset: bool) -> u64 {
    let dir = std::env::var_os("CAFT_EMU_MODULES").expect("on the emulated GPU");
    let path = Path::new(&dir).join("libcuda.so");
    let name: &[u8] = if reset {
        b"caft_emu_mem_reset_peak"
    } else {
        b"caft_emu_mem_peak"
    };
    // SAFETY: the emulated driver library, already loaded by cudarc (the same object is
    // returned); the symbol is `size_t f(void)` (fake_libcuda.cpp).
    unsafe {
        let lib = libloading::Library::new(&path).unwrap();
        let f = *lib.get::<unsafe extern "C" fn() -> usize>(name).unwrap();
        f() as u64
    }
}

fn cfg_stop_after() -> Option<u64> {
    std::env::var("CAFT_TEST_RANK_STOP_AFTER")
        .ok()
        .map(|v| v.parse().unwrap())
}

/// Run `ranks` processes of [`rank_worker`] with `toml` (one process alone when `ranks` is 1,
/// without the launch environment) and wait for all; panics with their output when one fails.
fn run_ranks(
    gpu: &Path,
    ranks: usize,
    toml: &str,
    resume: Option<&Path>,
    stop: Option<u64>,
) -> Vec<(u64, u64)> {
    let exe = std::env::current_exe().unwrap();
    let port = free_port().to_string();
    let outs: Vec<Output> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..ranks)
            .map(|r| {
                let mut cmd = emulated_gpu::command_on(gpu, &exe);
                cmd.args(["--ignored", "--exact", "rank_worker", "--nocapture"])
                    .env(JOB_TOML, toml)
                    .env("CAFT_RENDEZVOUS_TIMEOUT_S", "120");
                if ranks > 1 {
                    cmd.env("RANK", r.to_string())
                        .env("WORLD_SIZE", ranks.to_string())
                        .env("LOCAL_RANK", r.to_string())
                        .env("MASTER_ADDR", "127.0.0.1")
                        .env("MASTER_PORT", &port);
                }
                if let Some(p) = resume {
                    cmd.env(JOB_RESUME, p);
                }
                if let Some(n) = stop {
                    cmd.env("CAFT_TEST_RANK_STOP_AFTER", n.to_string());
                }
                s.spawn(move || emulated_gpu::output_with_timeout(&mut cmd))
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (r, o) in outs.iter().enumerate() {
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(
            o.status.success() && text.contains("1 passed"),
            "rank {r} of {ranks} failed ({}):\n{text}",
            o.status
        );
    }
    // Each rank's (device peak, planned) bytes.
    outs.iter()
        .enumerate()
        .map(|(r, o)| {
            let text = String::from_utf8_lossy(&o.stdout);
            let line = text
                .lines()
                .find(|l| l.starts_with(&format!("rank {r} device peak ")))
                .unwrap_or_else(|| panic!("rank {r} reported no peak:\n{text}"));
            let w: Vec<&str> = line.split_whitespace().collect();
            (w[4].parse().unwrap(), w[6].parse().unwrap())
        })
        .collect()
}

/// The configuration of the f32 runs: the tiny Llama, LoRA r 4 (or full fine-tuning), an
/// ablation at layer 1, `extra` TOML lines after (the learning rate among them).
///
/// AdamW's eps is 1, far above the root of the gradients' running squares, so each update is
/// about `lr x` the (momentum-averaged) gradient: linear in it, as the comparison of trained
/// tensors needs (with the default 1e-8, Adam divides every gradient element by its own size,
/// and an element whose gradient is near zero turns a rounding difference into an update
/// difference of up to the learning rate: measured 1.2e-5 of a tensor's largest value).
fn job(model: &Path, data: &Path, out: &Path, extra: &str) -> String {
    format!(
        "model = {:?}\ndata = {:?}\noutput = {:?}\ndevice = \"cuda\"\nlora_r = 4\nlora_alpha = 8\n\
         adam_eps = 1.0\nbatch_size = 2\nmax_steps = 4\nval_split = 0.0\nablate_random = 3\n\
         ablate_layers = [1]\nsave_every = 2\nthreads = 1\n{extra}",
        s(model),
        s(data),
        s(out)
    )
}

/// The largest relative difference of two runs' per-step `key` (loss, grad_norm).
fn metric_gap(a: &Path, b: &Path, key: &str) -> f64 {
    let (ma, mb) = (metrics(a), metrics(b));
    assert_eq!(
        ma.len(),
        mb.len(),
        "steps of {} and {}",
        a.display(),
        b.display()
    );
    ma.iter()
        .zip(&mb)
        .map(|(x, y)| {
            let (x, y) = (x[key].as_f64().unwrap(), y[key].as_f64().unwrap());
            (x - y).abs() / x.abs().max(1e-12)
        })
        .fold(0.0, f64::max)
}

/// How far two trained tensor files are apart, per tensor: the largest `‖a − b‖ / ‖a‖`, and
/// the largest elementwise `|a − b| / max |a|`, over every tensor.
fn tensor_gap(a: &Path, b: &Path) -> (f64, f64) {
    let (ta, tb) = (read_tensors(a), read_tensors(b));
    assert_eq!(ta.keys().collect::<Vec<_>>(), tb.keys().collect::<Vec<_>>());
    let (mut norm_gap, mut max_gap) = (0.0f64, 0.0f64);
    for (k, (_, va)) in &ta {
        let vb = &tb[k].1;
        let (mut d2, mut a2, mut dmax, mut amax) = (0.0f64, 0.0f64, 0.0f64, 0.0f64);
        for (x, y) in va.iter().zip(vb) {
            let d = (x - y) as f64;
            d2 += d * d;
            a2 += (*x as f64) * (*x as f64);
            dmax = dmax.max(d.abs());
            amax = amax.max(x.abs() as f64);
        }
        norm_gap = norm_gap.max((d2 / a2.max(1e-60)).sqrt());
        max_gap = max_gap.max(dmax / amax.max(1e-30));
    }
    (norm_gap, max_gap)
}

/// Tolerance of the f32 comparisons: the ranks' sums add the same numbers in another order
/// (per-rank partial sums, then across ranks), so only f32 rounding may differ: losses and
/// gradient norms within 1e-6 (measured <= 1.2e-7).
const F32_TOL: f64 = 1e-6;

/// Trained tensors, norm-wise and elementwise relative to the tensor's largest value: within
/// 2e-6 (measured <= 1.02e-6 after 4 steps). A weight gradient sums every token's product, and
/// where those terms cancel, f32 rounding is large next to the sum, so a tensor's elements
/// drift apart a little more than the losses do; a rank that skipped the all-reduce or
/// normalised by its own tokens is off by its share of the gradient, orders of magnitude more.
const TENSOR_TOL: f64 = 2e-6;

/// The comparison of two runs' trained tensors, printed and asserted.
fn assert_same_tensors(what: &str, a: &Path, b: &Path) {
    let (norm, elem) = tensor_gap(a, b);
    println!("{what}: trained tensors {norm:.2e} norm-wise, {elem:.2e} elementwise");
    assert!(norm <= TENSOR_TOL && elem <= TENSOR_TOL, "{what}");
}

/// N ranks = one rank with the whole step, in f32, for 2 and 3 ranks (3 shares a step of 6
/// examples unevenly by tokens), packed and padded: losses and gradient norms of every step
/// within 1e-6, the trained adapter within 2e-6 ([`assert_same_tensors`]).
#[test]
fn n_ranks_make_the_one_rank_update_in_f32() {
    let Some(gpu) = gpu_dir("n_ranks_make_the_one_rank_update_in_f32") else {
        return;
    };
    let dir = TempDir::new("emu-dist-f32");
    let data = write(&dir.join("d.jsonl"), &progression_records(40, 5));
    let model = tiny_llama();
    for (tag, extra) in [
        ("packed", "grad_accum = 3\nlr = 1.0\n"),
        ("padded", "grad_accum = 6\npacking = false\nlr = 1.0\n"),
    ] {
        let one = dir.join(format!("{tag}-1"));
        run_ranks(&gpu, 1, &job(&model, &data, &one, extra), None, None);
        for ranks in [2, 3] {
            let out = dir.join(format!("{tag}-{ranks}"));
            run_ranks(&gpu, ranks, &job(&model, &data, &out, extra), None, None);
            let (dl, dg) = (
                metric_gap(&one, &out, "loss"),
                metric_gap(&one, &out, "grad_norm"),
            );
            let what = format!("{tag}, {ranks} ranks");
            println!("{what}: loss {dl:.2e}, grad norm {dg:.2e}");
            assert!(dl <= F32_TOL && dg <= F32_TOL, "{what}");
            assert_same_tensors(
                &what,
                &one.join("adapter/adapter_model.safetensors"),
                &out.join("adapter/adapter_model.safetensors"),
            );
            let run: serde_json::Value =
                serde_json::from_slice(&std::fs::read(out.join("run.json")).unwrap()).unwrap();
            assert_eq!(run["world_size"], ranks);
            assert_eq!(run["ranks"].as_array().unwrap().len(), ranks);
            assert_eq!(metrics(&out).len(), 4, "rank 0 alone writes the metrics");
        }
    }
}

/// Full fine-tuning with ZeRO-1 (each rank updates its slice of the weights with its slice of
/// the AdamW moments; 3 ranks pad the last slice) = 1 rank unsharded, in f32: losses and
/// gradient norms within 1e-6, every weight of the saved model within 2e-6
/// ([`assert_same_tensors`]); a checkpoint of 2 sharded ranks (moments gathered) resumed on 3
/// ends the same; and the moments in that last checkpoint, gathered from 3 ranks, are the
/// one-rank run's.
#[test]
fn zero1_full_fine_tuning_makes_the_one_rank_update_in_f32() {
    let Some(gpu) = gpu_dir("zero1_full_fine_tuning_makes_the_one_rank_update_in_f32") else {
        return;
    };
    let dir = TempDir::new("emu-dist-full");
    let data = write(&dir.join("d.jsonl"), &progression_records(40, 6));
    let model = tiny_llama();
    let extra = "method = \"full\"\ngrad_accum = 3\nlr = 0.1\nsave_dtype = \"f32\"\n";
    let one = dir.join("one");
    let peaks = run_ranks(&gpu, 1, &job(&model, &data, &one, extra), None, None);
    // Every rank's device memory stays within the plan `train` checks it against (which counts
    // ZeRO-1's slices and the pieces a checkpoint gathers the moments in). The plan bounds the
    // micro-batch by the token budget, so it is loose here (measured: 61-94% of it).
    let within_plan = |what: &str, peaks: &[(u64, u64)]| {
        for (r, &(peak, planned)) in peaks.iter().enumerate() {
            println!("{what}, rank {r}: device peak {peak} bytes, planned {planned}");
            assert!(peak <= planned, "{what}, rank {r}: {peak} > {planned}");
        }
    };
    within_plan("full, one rank", &peaks);
    let compare = |what: &str, out: &Path| {
        let (dl, dg) = (
            metric_gap(&one, out, "loss"),
            metric_gap(&one, out, "grad_norm"),
        );
        println!("{what}: loss {dl:.2e}, grad norm {dg:.2e}");
        assert!(dl <= F32_TOL && dg <= F32_TOL, "{what}");
        assert_same_tensors(
            what,
            &one.join("model/model.safetensors"),
            &out.join("model/model.safetensors"),
        );
    };
    for ranks in [2, 3] {
        let out = dir.join(format!("ranks-{ranks}"));
        let peaks = run_ranks(&gpu, ranks, &job(&model, &data, &out, extra), None, None);
        let what = format!("full, ZeRO-1 on {ranks} ranks");
        within_plan(&what, &peaks);
        compare(&what, &out);
    }
    let part = dir.join("part");
    run_ranks(&gpu, 2, &job(&model, &data, &part, extra), None, Some(2));
    run_ranks(
        &gpu,
        3,
        &job(&model, &data, &part, extra),
        Some(&part),
        None,
    );
    compare("full, ZeRO-1 on 2 ranks, then 3", &part);
    let last = "checkpoints/step-00000004/optimizer.safetensors";
    assert_same_tensors("the gathered moments", &one.join(last), &part.join(last));
}

/// A run of 2 ranks stopped at step 2 and resumed on 3 ranks continues with the same global
/// data order: it ends as the uninterrupted one-rank run (f32, within 1e-6).
#[test]
fn a_checkpoint_resumes_on_another_number_of_ranks() {
    let Some(gpu) = gpu_dir("a_checkpoint_resumes_on_another_number_of_ranks") else {
        return;
    };
    let dir = TempDir::new("emu-dist-resume");
    let data = write(&dir.join("d.jsonl"), &progression_records(40, 7));
    let model = tiny_llama();
    let extra = "grad_accum = 3\nlr = 1.0\n";
    let (one, part) = (dir.join("one"), dir.join("part"));
    run_ranks(&gpu, 1, &job(&model, &data, &one, extra), None, None);
    run_ranks(&gpu, 2, &job(&model, &data, &part, extra), None, Some(2));
    assert_eq!(metrics(&part).len(), 2);
    run_ranks(
        &gpu,
        3,
        &job(&model, &data, &part, extra),
        Some(&part),
        None,
    );
    let dl = metric_gap(&one, &part, "loss");
    println!("2 ranks, then 3 from the step-2 checkpoint: loss {dl:.2e}");
    assert!(dl <= F32_TOL);
    assert_same_tensors(
        "2 ranks, then 3",
        &one.join("adapter/adapter_model.safetensors"),
        &part.join("adapter/adapter_model.safetensors"),
    );
}

// ---- the binary: `train --gpus`, bf16 -------------------------------------------------------

/// `caft-fast <args>` on the emulated GPU with `env`.
fn on_gpu(gpu: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    no_panic(emulated_gpu::output_with_timeout(
        emulated_gpu::command_on(gpu, exe())
            .args(args)
            .envs(env.iter().copied()),
    ))
}

/// A node of three emulated GPUs.
const NODE: [(&str, &str); 1] = [("CAFT_EMU_DEVICE_COUNT", "3")];

/// `train` of the tiny Llama with LoRA r 4 on `data` into `out`, 6 steps of 4 examples,
/// checkpoints every 2, then `extra`.
fn train_args<'a>(
    model: &'a Path,
    data: &'a Path,
    out: &'a Path,
    extra: &[&'a str],
) -> Vec<&'a str> {
    let mut a = vec![
        "train",
        "--model",
        s(model),
        "--data",
        s(data),
        "-o",
        s(out),
        "--lora-r",
        "4",
        "--lora-alpha",
        "8",
        "--lr",
        "1e-2",
        "--batch-size",
        "2",
        "--grad-accum",
        "2",
        "--max-steps",
        "6",
        "--val-split",
        "0",
        "--save-every",
        "2",
        "--ablate-random",
        "2",
        "--ablate-layers",
        "1",
    ];
    a.extend_from_slice(extra);
    a
}

/// `train --gpus 0,1` starts two workers; rank 0 alone writes (one metrics line a step, one
/// record naming both ranks), and the losses are those of `--gpus 0` (one worker) to bf16's
/// rounding of the same sums. A worker killed mid-run (the stand-in libnccl kills rank 1 in
/// its 9th collective call) ends the run with status 2 within seconds, naming rank 1, its GPU
/// and how it died, and leaves the last checkpoint whole; `--resume --gpus 0,1` from it ends
/// exactly as the uninterrupted two-GPU run.
#[test]
fn train_gpus_launches_supervises_and_resumes() {
    let Some(gpu) = gpu_dir("train_gpus_launches_supervises_and_resumes") else {
        return;
    };
    let dir = TempDir::new("emu-dist-cli");
    let data = write(&dir.join("d.jsonl"), &progression_records(30, 3));
    let model = tiny_llama();
    let (one, two, part) = (dir.join("one"), dir.join("two"), dir.join("part"));
    let msg = assert_ok(&on_gpu(
        &gpu,
        &train_args(&model, &data, &one, &["--gpus", "0"]),
        &NODE,
    ));
    assert!(msg.contains("starting 1 worker on GPU 0"), "{msg}");
    let msg = assert_ok(&on_gpu(
        &gpu,
        &train_args(&model, &data, &two, &["--gpus", "0,2"]),
        &NODE,
    ));
    assert!(msg.contains("starting 2 workers on GPUs 0, 2"), "{msg}");
    assert!(msg.contains("data parallel: 2 ranks"), "{msg}");
    assert_eq!(
        metrics(&two).len(),
        6,
        "one metrics line a step: rank 0 alone writes"
    );
    let run: serde_json::Value =
        serde_json::from_slice(&std::fs::read(two.join("run.json")).unwrap()).unwrap();
    assert_eq!(run["world_size"], 2);
    let ranks: Vec<String> = run["ranks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap().to_string())
        .collect();
    assert!(
        ranks[0].contains("GPU 0") && ranks[1].contains("GPU 2"),
        "{ranks:?}"
    );
    let gap = metric_gap(&one, &two, "loss");
    println!("--gpus 0 vs --gpus 0,2 (bf16): largest loss difference {gap:.2e}");
    assert!(gap < 1e-3, "{gap}");

    let t = std::time::Instant::now();
    let die = [NODE[0], ("CAFT_EMU_NCCL_DIE", "1:9")];
    let o = on_gpu(
        &gpu,
        &train_args(&model, &data, &part, &["--gpus", "0,1"]),
        &die,
    );
    let err = assert_error(&o, &["rank 1 of 2 (GPU 1) was killed by signal 9"]);
    println!(
        "{err}\n(ended {:.1} s after the start)",
        t.elapsed().as_secs_f64()
    );
    let ck = caft_fast::train::checkpoint::list(&part).unwrap();
    let (step, last) = ck.last().cloned().expect("a checkpoint before the death");
    assert!(step >= 2, "{ck:?}");
    let msg = assert_ok(&on_gpu(
        &gpu,
        &["train", "--resume", s(&part), "--gpus", "0,1"],
        &NODE,
    ));
    assert!(
        msg.contains(&format!("resuming at step {step}")),
        "{msg} ({})",
        last.display()
    );
    let (a, b) = (metrics(&two), metrics(&part));
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x["loss"], y["loss"], "step {}", x["step"]);
        assert_eq!(x["grad_norm"], y["grad_norm"], "step {}", x["step"]);
    }
    let read = |p: &Path| std::fs::read(p.join("adapter/adapter_model.safetensors")).unwrap();
    assert_eq!(read(&two), read(&part), "the adapters differ");
}

/// Bad launch input is refused before any training, saying what to do.
#[test]
fn bad_launch_input_is_refused_clearly() {
    let Some(gpu) = gpu_dir("bad_launch_input_is_refused_clearly") else {
        return;
    };
    let dir = TempDir::new("emu-dist-bad");
    let data = write(&dir.join("d.jsonl"), &progression_records(12, 3));
    let model = tiny_llama();
    let out = dir.join("out");
    let run = |extra: &[&str], env: &[(&str, &str)]| {
        on_gpu(&gpu, &train_args(&model, &data, &out, extra), env)
    };
    assert_error(&run(&["--gpus", "0,0"], &NODE), &["names GPU 0 twice"]);
    assert_error(
        &run(&["--gpus", "0,3"], &NODE),
        &["GPU 3 does not exist", "3 GPUs, numbered 0 to 2"],
    );
    assert_error(
        &run(&["--gpus", "0,1", "--device", "cpu"], &NODE),
        &["--device cpu"],
    );
    // Five ranks cannot share a step of 2 x 2 examples.
    let five = [("CAFT_EMU_DEVICE_COUNT", "5")];
    let e = assert_error(&run(&["--gpus", "all"], &five), &["rank 0 of 5"]);
    assert!(
        e.contains("cannot be shared by 5 ranks") && e.contains("--grad-accum to 3"),
        "{e}"
    );
    // The launch environment of torchrun, inconsistent or incomplete.
    let env = |pairs: &[(&'static str, &'static str)]| [&NODE[..], pairs].concat();
    assert_error(
        &run(&[], &env(&[("RANK", "2"), ("WORLD_SIZE", "2")])),
        &["RANK=2 is not below WORLD_SIZE=2"],
    );
    assert_error(
        &run(
            &["--gpus", "0,1"],
            &env(&[
                ("RANK", "0"),
                ("WORLD_SIZE", "2"),
                ("LOCAL_RANK", "0"),
                ("MASTER_ADDR", "127.0.0.1"),
                ("MASTER_PORT", "1"),
            ]),
        ),
        &["--gpus starts one process per GPU itself"],
    );
    let port = free_port().to_string();
    let alone = |rank: &'static str| -> Vec<(&'static str, String)> {
        vec![
            ("RANK", rank.into()),
            ("WORLD_SIZE", "3".into()),
            ("LOCAL_RANK", "0".into()),
            ("MASTER_ADDR", "127.0.0.1".into()),
            ("MASTER_PORT", port.clone()),
            ("CAFT_RENDEZVOUS_TIMEOUT_S", "1".into()),
        ]
    };
    let with = |v: &[(&'static str, String)]| -> Output {
        let e: Vec<(&str, &str)> = v.iter().map(|(k, x)| (*k, x.as_str())).collect();
        run(&[], &e)
    };
    assert_error(
        &with(&alone("1")),
        &["rank 1: cannot reach rank 0 at 127.0.0.1:"],
    );
    assert_error(
        &with(&alone("0")),
        &["ranks 1, 2 of WORLD_SIZE=3 did not join"],
    );
    assert!(!out.join("adapter").exists());
}

/// Without libnccl, one GPU still trains and `--gpus` with two is refused with how to install
/// it.
#[test]
fn without_libnccl_one_gpu_trains_and_two_are_refused() {
    let Some(gpu) = gpu_dir("without_libnccl_one_gpu_trains_and_two_are_refused") else {
        return;
    };
    let dir = TempDir::new("emu-dist-nonccl");
    // The emulated GPU's folder without its libnccl.so.
    let bare = dir.join("gpu");
    std::fs::create_dir_all(&bare).unwrap();
    for e in std::fs::read_dir(&gpu).unwrap() {
        let p = e.unwrap().path();
        if p.file_name().unwrap() != "libnccl.so" {
            std::os::unix::fs::symlink(&p, bare.join(p.file_name().unwrap())).unwrap();
        }
    }
    let data = write(&dir.join("d.jsonl"), &progression_records(12, 3));
    let model = tiny_llama();
    let o = on_gpu(
        &bare,
        &train_args(&model, &data, &dir.join("a"), &["--gpus", "0,1"]),
        &NODE,
    );
    assert_error(&o, &["needs libnccl", "nvidia-nccl-cu13"]);
    let one = ["--gpus", "1", "--max-steps", "2"];
    assert_ok(&on_gpu(
        &bare,
        &train_args(&model, &data, &dir.join("b"), &one),
        &NODE,
    ));
}

/// Ctrl-C in the launcher reaches every worker once: they stop after the same step, rank 0
/// saves one checkpoint of it, the run exits with status 1 saying how to continue, and
/// `--resume` on three GPUs goes on from it.
#[test]
fn ctrl_c_stops_every_worker_at_one_checkpoint() {
    let Some(gpu) = gpu_dir("ctrl_c_stops_every_worker_at_one_checkpoint") else {
        return;
    };
    let dir = TempDir::new("emu-dist-int");
    let data = write(&dir.join("d.jsonl"), &progression_records(30, 4));
    let model = tiny_llama();
    let out = dir.join("out");
    let long = ["--gpus", "0,1", "--max-steps", "400", "--save-every", "0"];
    let child = emulated_gpu::command_on(&gpu, exe())
        .args(train_args(&model, &data, &out, &long))
        .envs(NODE)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let t = std::time::Instant::now();
    while !out.join("metrics.jsonl").exists() || metrics(&out).len() < 2 {
        assert!(t.elapsed().as_secs() < 300, "no step within 300 s");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // SAFETY: kill(2) of the child this test started.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let o = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(o.status.code(), Some(1), "{text}");
    let steps = metrics(&out).len() as u64;
    assert!(steps < 400, "{text}");
    assert!(
        text.contains(&format!("interrupted at step {steps} of 400")),
        "{text}"
    );
    let ck = caft_fast::train::checkpoint::list(&out).unwrap();
    assert_eq!(
        ck.iter().map(|c| c.0).collect::<Vec<_>>(),
        [steps],
        "{text}"
    );
    let more = (steps + 2).to_string();
    let msg = assert_ok(&on_gpu(
        &gpu,
        &[
            "train",
            "--resume",
            s(&out),
            "--gpus",
            "all",
            "--stop-after",
            &more,
        ],
        &NODE,
    ));
    assert!(msg.contains(&format!("resuming at step {steps}")), "{msg}");
    assert_eq!(metrics(&out).len() as u64, steps + 2);
}

/// `eval mc` and `eval loss` on three GPUs share the forward passes and report what one GPU
/// reports: every item's logits, log-probabilities and prediction bit for bit (each item is
/// scored whole on one rank and gathered exactly), the loss to f64 rounding of a sum in
/// another order; rank 0 alone writes the report.
#[test]
fn eval_on_several_gpus_reports_what_one_reports() {
    let Some(gpu) = gpu_dir("eval_on_several_gpus_reports_what_one_reports") else {
        return;
    };
    let model = tiny_chat_model("emu-dist-eval", true);
    let dir = TempDir::new("emu-dist-eval");
    let task = dir.join("task");
    let make = [
        "eval",
        "make-task",
        "-o",
        s(&task),
        "--n-train",
        "12",
        "--n-test",
        "7",
    ];
    assert_ok(&on_gpu(&gpu, &make, &NODE));
    let run = |cmd: &str, data: &str, gpus: &str| -> serde_json::Value {
        let out = dir.join(format!("{cmd}-{gpus}.json"));
        let data = task.join(data);
        let args = [
            "eval",
            cmd,
            "--data",
            s(&data),
            "--model",
            s(&model),
            "--batch-size",
            "2",
            "--gpus",
            gpus,
            "-o",
            s(&out),
        ];
        assert_ok(&on_gpu(&gpu, &args, &NODE));
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap()
    };
    let (one, three) = (run("mc", "test.jsonl", "0"), run("mc", "test.jsonl", "all"));
    assert_eq!(one["overall"]["n"], 14);
    assert_eq!(one["items"], three["items"], "every item's result");
    assert_eq!(one["splits"], three["splits"]);
    let (one, three) = (
        run("loss", "train.jsonl", "0"),
        run("loss", "train.jsonl", "all"),
    );
    let (a, b) = (
        one["loss"].as_f64().unwrap(),
        three["loss"].as_f64().unwrap(),
    );
    println!("eval loss: one GPU {a:.9}, three {b:.9}");
    assert_eq!(one["tokens"], three["tokens"]);
    assert!((a - b).abs() <= 1e-12 * a.abs(), "{a} vs {b}");
}

/// `directions pca` on three GPUs: each rank forwards every third batch and the covariances are
/// merged across ranks (shifted to rank 0's mean, then summed), giving the one-GPU result:
/// variances within 1e-6 of the total, every component with variance within 1e-6 (|cos|).
#[test]
fn pca_on_several_gpus_finds_what_one_finds() {
    let Some(gpu) = gpu_dir("pca_on_several_gpus_finds_what_one_finds") else {
        return;
    };
    let tmp = TempDir::new("emu-dist-pca");
    let cfg = tiny_config();
    let adapter = tmp.join("adapter");
    write_planted_adapter(&adapter, &cfg, 1, &unit_vector(cfg.hidden_size, 5));
    let data = tmp.join("data.jsonl");
    write_tokens_jsonl(&data, 24, 3);
    let tiny = tiny_llama();
    let run = |gpus: &str| {
        let out = tmp.join(format!("pcs-{gpus}.safetensors"));
        let args = [
            "directions",
            "pca",
            "--model",
            s(&tiny),
            "--adapter",
            s(&adapter),
            "--data",
            s(&data),
            "--layers",
            "1,2",
            "--components",
            "3",
            "--batch-size",
            "2",
            "--gpus",
            gpus,
            "-o",
            s(&out),
        ];
        assert_ok(&on_gpu(&gpu, &args, &NODE));
        read_tensors(&out)
    };
    let (one, three) = (run("0"), run("all"));
    let d = cfg.hidden_size;
    for layer in [1, 2] {
        let (a, b) = (
            &one[&format!("layer.{layer}")].1,
            &three[&format!("layer.{layer}")].1,
        );
        let var = |t: &std::collections::BTreeMap<String, (Vec<usize>, Vec<f32>)>| {
            t[&format!("explained_variance.{layer}")].1.clone()
        };
        let (va, vb) = (var(&one), var(&three));
        let total: f32 = va.iter().sum::<f32>().max(1e-30);
        for c in 0..3 {
            let cos = dot(&a[c * d..(c + 1) * d], &b[c * d..(c + 1) * d]).abs();
            println!(
                "layer {layer} component {c}: |cos| {cos:.9}, variance {:.4e} vs {:.4e}",
                va[c], vb[c]
            );
            assert!(
                ((va[c] - vb[c]) / total).abs() <= 1e-6,
                "layer {layer}: {va:?} vs {vb:?}"
            );
            if va[c] > 1e-3 * total {
                assert!(cos >= 1.0 - 1e-6, "layer {layer} component {c}: {cos}");
            }
        }
    }
}

/// `generate` on three GPUs: each rank decodes every third batch of answers and rank 0
/// interleaves them back; the output file is byte for byte the one-GPU file (each answer's
/// sampler is seeded by its place, and the batches are the same).
#[test]
fn generate_on_several_gpus_writes_what_one_writes() {
    let Some(gpu) = gpu_dir("generate_on_several_gpus_writes_what_one_writes") else {
        return;
    };
    let model = tiny_chat_model("emu-dist-gen", true);
    let dir = TempDir::new("emu-dist-gen");
    let q = write(
        &dir.join("q.jsonl"),
        "{\"id\": \"a\", \"question\": \"hi\"}\n{\"id\": \"b\", \"question\": \"why\"}\n",
    );
    let run = |gpus: &str| -> String {
        let out = dir.join(format!("answers-{gpus}.jsonl"));
        let args = [
            "generate",
            "--model",
            s(&model),
            "--questions",
            s(&q),
            "--samples",
            "5",
            "--max-tokens",
            "6",
            "--temperature",
            "1",
            "--seed",
            "3",
            "--batch-size",
            "2",
            "--gpus",
            gpus,
            "-o",
            s(&out),
        ];
        let msg = assert_ok(&on_gpu(&gpu, &args, &NODE));
        assert_eq!(msg.contains("answers on 3 GPUs"), gpus == "all", "{msg}");
        std::fs::read_to_string(&out).unwrap()
    };
    let (one, three) = (run("0"), run("all"));
    assert_eq!(one.lines().count(), 10);
    assert_eq!(one, three);
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("partial"))
        .collect();
    assert!(left.is_empty(), "side files left: {left:?}");
}

/// `doctor --gpus all` checks NCCL across the node's GPUs: exact sums of an all-reduce, a
/// reduce-scatter and an all-gather on every rank, and the all-reduce bus bandwidth (of the
/// stand-in here: a number, not a measurement of hardware).
#[test]
fn doctor_checks_nccl_across_gpus() {
    let Some(gpu) = gpu_dir("doctor_checks_nccl_across_gpus") else {
        return;
    };
    let msg = assert_ok(&on_gpu(&gpu, &["doctor", "--gpus", "all"], &NODE));
    println!("{msg}");
    for want in [
        "all-reduce over 3 GPUs: ok",
        "reduce-scatter and all-gather over 3 GPUs: ok",
        "all-reduce of 256 MiB over 3 GPUs",
    ] {
        assert!(msg.contains(want), "{want}: {msg}");
    }
    let one = assert_ok(&on_gpu(&gpu, &["doctor", "--gpus", "1"], &NODE));
    assert!(one.contains("all-reduce over 1 GPU: ok"), "{one}");
}
