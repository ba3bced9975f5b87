//! The emulated GPU: the CUDA backend's own GPU tests, run on the CPU with stand-ins for the
//! driver and cuBLAS, so its host code (cudarc calls, buffers, launch shapes, GEMM calls, the
//! generation KV cache) is exercised in CI, not only on a GPU.
//!
//! [`build`] makes one folder holding
//! - `libcuda.so` from `fake_libcuda.cpp` (device memory is host memory; launches run the
//!   kernel libraries below; guard bytes, NaN-filled allocations, range checks),
//! - `libcublas.so` from `fake_libcublas.cpp` (GemmEx by the definition),
//! - `libnccl.so` from `fake_libnccl.cpp` (collectives between processes through POSIX
//!   shared memory, summed in rank order; tests/cuda_emulated_nccl.rs),
//! - `kmod_<module>.so` per `kernels/<module>.cu`: the source under `cuda_shim.hpp` in its
//!   fiber mode (a block's threads switched at barriers and shuffles; `ptx_emu.hpp` for the
//!   inline PTX), with every entry point NVRTC finds in the module's PTX.
//!
//! [`rerun_ignored`] runs the calling test binary again with that folder first on
//! `LD_LIBRARY_PATH` (cudarc opens `libcuda.so`, `libcublas.so` and `libnccl.so` by name;
//! NVRTC stays the real one), `--include-ignored`, and `CAFT_EMULATED_GPU=1`, so the tests
//! marked "needs a CUDA GPU" run against the stand-ins. What this checks and what it cannot:
//! the kernels' logic and the host code, as on a GPU; not speed, not the GPU's memory model,
//! not the real cuBLAS or NCCL.
//!
//! The stand-in driver also plays a small GPU (`CAFT_EMU_DEVICE_MEM_MIB`), a faulting one
//! (`CAFT_EMU_FAIL_KERNEL=<kernel>:<n>`) or a node of several GPUs of which only device 0 is
//! free (`CAFT_EMU_DEVICE_COUNT`), and every process on it runs under a time limit
//! ([`output_with_timeout`]).
//!
//! A test file uses it with
//! ```ignore
//! #[path = "cuda_emulated/harness.rs"]
//! mod harness;
//! #[path = "cuda_emulated/gpu.rs"]
//! mod emulated_gpu;
//! ```

#![allow(dead_code)]

use crate::harness;
use caft_fast::backend::cuda::compile::{self, Output};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Set in the child process that runs under the emulated GPU.
pub const CHILD_ENV: &str = "CAFT_EMULATED_GPU";

/// Whether this process is the re-run under the emulated GPU.
pub fn is_child() -> bool {
    std::env::var_os(CHILD_ENV).is_some()
}

/// The stand-in libraries: file name, source, libraries to link besides libdl.
const FAKES: [(&str, &str, &[&str]); 3] = [
    ("libcuda.so", "fake_libcuda.cpp", &[]),
    ("libcublas.so", "fake_libcublas.cpp", &[]),
    // librt: shm_open (part of libc itself since glibc 2.34).
    ("libnccl.so", "fake_libnccl.cpp", &["-lrt"]),
];

/// The `.entry` names of a PTX text.
pub fn ptx_entries(ptx: &str) -> Vec<String> {
    ptx.lines()
        .filter_map(|l| {
            let rest = &l[l.find(".entry ")? + ".entry ".len()..];
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            (!name.is_empty()).then_some(name)
        })
        .collect()
}

/// FNV-1a over everything a build depends on: kernel sources, the emulator's files (shim,
/// stand-ins, the Rust that generates the build), the compiler's version.
fn build_key(cxx: &Path) -> String {
    let mut h: u64 = 0xcbf29ce484222325;
    let mut eat = |bytes: &[u8]| {
        for &b in bytes {
            h = (h ^ b as u64).wrapping_mul(0x100000001b3);
        }
    };
    eat(compile::sources_hash().as_bytes());
    let mut names: Vec<PathBuf> = std::fs::read_dir(harness::shim_dir())
        .map(|rd| rd.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    names.sort();
    for p in names {
        if p.extension()
            .is_some_and(|x| x == "hpp" || x == "cpp" || x == "rs")
        {
            eat(&std::fs::read(&p).unwrap_or_default());
        }
    }
    if let Ok(out) = Command::new(cxx).arg("--version").output() {
        eat(&out.stdout);
    }
    format!("{h:016x}")
}

/// The emulated GPU's folder, built on first use and kept (keyed by [`build_key`]) under the
/// system temp dir, so the test binaries that use it share one build.
pub fn build() -> Result<PathBuf, String> {
    build_edited("", &[], &|_, text| text)
}

/// [`build`] with every kernel source passed through `edit(file name, text)` for the kernel
/// libraries (NVRTC still compiles the real sources: their cubins only supply the names), and
/// only the modules `only` when it is not empty. `tag` names the variant (part of the key): a
/// mutation check uses it to prove the tests on the emulated GPU can fail.
pub fn build_edited(
    tag: &str,
    only: &[&str],
    edit: &dyn Fn(&str, String) -> String,
) -> Result<PathBuf, String> {
    let cxx = harness::compiler().ok_or("no C++ compiler (g++ or $CXX)")?;
    let root = std::env::temp_dir().join("caft-emulated-gpu");
    let dir = root.join(format!("{}{tag}", build_key(&cxx)));
    if dir.join("complete").exists() {
        return Ok(dir);
    }
    remove_stale(&root);
    // Unique per process and build: two tests of one binary may build variants at once.
    static SEQ: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = root.join(format!("building-{}-{seq}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
    let files: Vec<(String, String)> = compile::kernel_sources()
        .iter()
        .map(|(n, t)| (n.to_string(), edit(n, t.to_string())))
        .collect();
    let modules: Vec<&str> = compile::module_names()
        .into_iter()
        .filter(|m| only.is_empty() || only.contains(m))
        .collect();
    // Each module's entries from its PTX; then the g++ builds, two at a time.
    let mut jobs = Vec::new();
    for m in &modules {
        let ptx = compile::compile(m, "sm_90a", Output::Ptx, &[])
            .map_err(|e| format!("NVRTC on kernels/{m}.cu: {e:#}"))?;
        let entries = ptx_entries(&String::from_utf8_lossy(&ptx.image));
        if entries.is_empty() {
            return Err(format!("kernels/{m}.cu: no .entry in its PTX"));
        }
        jobs.push((m.to_string(), entries));
    }
    let results: Vec<Result<(), String>> = std::thread::scope(|s| {
        let handles: Vec<_> = jobs
            .chunks(jobs.len().div_ceil(2).max(1))
            .map(|chunk| {
                let (files, tmp) = (&files, &tmp);
                s.spawn(move || {
                    chunk
                        .iter()
                        .map(|(m, entries)| {
                            let entries: Vec<&str> = entries.iter().map(String::as_str).collect();
                            harness::build_kernel_library(
                                &tmp.join(format!("src-{m}")),
                                files,
                                &format!("{m}.cu"),
                                &entries,
                                &tmp.join(format!("kmod_{m}.so")),
                            )
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("build thread"))
            .collect()
    });
    for r in results {
        r?;
    }
    for (lib, src, libs) in FAKES {
        let mut flags: Vec<String> = vec!["-shared".into(), "-fPIC".into(), "-ldl".into()];
        flags.extend(libs.iter().map(|l| l.to_string()));
        harness::compile_cpp(
            &cxx,
            &tmp,
            &[harness::shim_dir().join(src)],
            &tmp.join(lib),
            &flags,
            src,
        )?;
    }
    std::fs::write(tmp.join("complete"), b"").map_err(|e| e.to_string())?;
    if dir.join("complete").exists() {
        // Another process finished the same build first (and may be using it): keep that one.
        let _ = std::fs::remove_dir_all(&tmp);
        return Ok(dir);
    }
    let _ = std::fs::remove_dir_all(&dir); // a partial leftover, if any
    std::fs::rename(&tmp, &dir)
        .map_err(|e| format!("{} -> {}: {e}", tmp.display(), dir.display()))?;
    Ok(dir)
}

/// Longest a process on the emulated GPU may run: `$CAFT_EMU_RUN_TIMEOUT_S`, default 900 s
/// (a kernel that loops forever must fail the test, not hang CI).
pub fn run_timeout() -> std::time::Duration {
    let s = std::env::var("CAFT_EMU_RUN_TIMEOUT_S")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(900);
    std::time::Duration::from_secs(s)
}

/// `cmd`'s output, or a failure after [`run_timeout`] (the child is killed).
pub fn output_with_timeout(cmd: &mut Command) -> std::process::Output {
    use std::io::Read;
    use std::process::Stdio;
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting a process on the emulated GPU");
    // Drain both pipes on threads, so a chatty child cannot block on a full pipe.
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = r.read_to_end(&mut v);
            v
        })
    };
    let out = drain(Box::new(child.stdout.take().unwrap()));
    let err = drain(Box::new(child.stderr.take().unwrap()));
    let start = std::time::Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("waiting for the child") {
            break s;
        }
        if start.elapsed() > run_timeout() {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "a process on the emulated GPU ran past {:?} and was killed: a kernel that \
                 never finishes? ({cmd:?})",
                run_timeout()
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    std::process::Output {
        status,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    }
}

/// Remove builds (and abandoned partial ones) under `root` untouched for a day: the key changes
/// with every kernel edit.
fn remove_stale(root: &Path) {
    let Ok(rd) = std::fs::read_dir(root) else {
        return;
    };
    for e in rd.flatten() {
        let old = e
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| std::time::SystemTime::now().duration_since(t).ok())
            .is_some_and(|age| age > std::time::Duration::from_secs(24 * 3600));
        if old {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// Whether the emulated GPU can be built here: a C++ compiler and NVRTC. Without them a
/// notice and false, or a failure when `CI` is set (CI must run these tests).
pub fn available(test: &str) -> bool {
    let missing = if harness::compiler().is_none() {
        Some("no C++ compiler: install g++ (or set CXX)")
    } else if !compile::nvrtc_present() {
        Some("libnvrtc not found (scripts/test.sh fetches it)")
    } else {
        None
    };
    let Some(msg) = missing else { return true };
    if std::env::var_os("CI").is_some() {
        panic!("{test}: the emulated GPU cannot be built: {msg}");
    }
    eprintln!("SKIPPED {test} on the emulated GPU: {msg}");
    false
}

/// The emulated GPU's folder ([`build`], once per test process), or None (after a notice; a
/// failure under CI) where it cannot be built.
pub fn folder(test: &str) -> Option<PathBuf> {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    if !available(test) {
        return None;
    }
    Some(
        DIR.get_or_init(|| build().expect("building the emulated GPU"))
            .clone(),
    )
}

/// `program` set up to run on the emulated GPU in `dir`: the folder first on LD_LIBRARY_PATH
/// (ahead of NVRTC's and anything else already there) and in CAFT_EMU_MODULES.
pub fn command_on(dir: &Path, program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut ld = dir.as_os_str().to_owned();
    if let Some(old) = std::env::var_os("LD_LIBRARY_PATH").filter(|v| !v.is_empty()) {
        ld.push(":");
        ld.push(old);
    }
    let mut cmd = Command::new(program);
    cmd.env("LD_LIBRARY_PATH", ld).env("CAFT_EMU_MODULES", dir);
    cmd
}

/// Run this test binary's ignored GPU tests matching `filters` (all of them when empty) on the
/// emulated GPU in `dir`, in a child process: whether they passed, and the child's output.
/// `this_test` is the calling test's name, skipped in the child.
pub fn run_ignored(dir: &Path, this_test: &str, filters: &[&str]) -> (bool, String) {
    let exe = std::env::current_exe().expect("the test executable");
    let start = std::time::Instant::now();
    let out = output_with_timeout(
        command_on(dir, &exe)
            .args(["--include-ignored", "--test-threads=1", "--nocapture"])
            .args(["--skip", this_test])
            .args(filters)
            .env(CHILD_ENV, "1"),
    );
    let mut text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    text.push_str(&format!(
        "\nemulated GPU run: {:.1} s, {} ({})\n",
        start.elapsed().as_secs_f64(),
        out.status,
        dir.display()
    ));
    let ran = text.contains("test result: ok") && !text.contains(" 0 passed");
    (out.status.success() && ran, text)
}

/// Run this test binary's ignored GPU tests matching `filters` on the emulated GPU ([`build`],
/// [`run_ignored`]); panic with the child's output when any fails or none ran. Returns at once
/// in the child itself, and skips (see [`available`]) without a compiler or NVRTC.
pub fn rerun_ignored(this_test: &str, filters: &[&str]) {
    if is_child() || !available(this_test) {
        return;
    }
    let dir = build().unwrap_or_else(|e| panic!("building the emulated GPU: {e}"));
    let (ok, text) = run_ignored(&dir, this_test, filters);
    println!("{text}");
    assert!(
        ok,
        "the GPU tests failed (or none ran) on the emulated GPU:\n{text}"
    );
}
