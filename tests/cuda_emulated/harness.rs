//! Builds CUDA kernel sources as C++ against `cuda_shim.hpp` and runs launches on the CPU.
//!
//! [`Module::build`] copies the sources into a fresh directory (rewriting dynamic shared memory
//! declarations, which C++ cannot spell, and replacing the inline-PTX header `ptx.cuh` by one
//! that includes `ptx_emu.hpp`: [`emulated_source`]), generates a `main.cpp` with a table of
//! the named `extern "C" __global__` entry points, and compiles it with g++ once.
//! [`Module::run`] sends one [`Launch`] to the executable (a file in, a file out) and returns
//! every buffer argument as it was after the kernel ran. A launch that hangs (a barrier not every thread reaches) is killed
//! after [`timeout`].
//!
//! Another test file uses it with `#[path = "cuda_emulated/harness.rs"] mod harness;` and a
//! [`Launch`] per kernel call (entry name, grid, block, dynamic shared bytes, arguments in the
//! kernel's parameter order: [`Arg::Buf`] for pointers, [`Arg::Null`] for null ones, scalars
//! by their C type).

// A toolkit shared by emulation tests: not every test binary uses every part.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

/// One kernel argument, as the host passes it to `cuLaunchKernel`.
#[derive(Clone, Debug)]
pub enum Arg {
    /// A device buffer with these initial bytes (256-byte aligned in the emulator).
    Buf(Vec<u8>),
    /// A null pointer.
    Null,
    I32(i32),
    U32(u32),
    I64(i64),
    F32(f32),
}

impl Arg {
    /// A buffer holding `v`.
    pub fn buf<T: bytemuck::Pod>(v: &[T]) -> Arg {
        Arg::Buf(bytemuck::cast_slice(v).to_vec())
    }
}

/// A kernel launch: entry point, grid and block shape, dynamic shared memory, arguments.
#[derive(Clone, Debug)]
pub struct Launch {
    pub entry: String,
    pub grid: [u32; 3],
    pub block: [u32; 3],
    pub smem_bytes: usize,
    pub args: Vec<Arg>,
}

/// The buffer arguments after a launch, by argument index (`None` for scalars and nulls).
pub struct After(Vec<Option<Vec<u8>>>);

impl After {
    /// Argument `i`, which must be a buffer, as elements of `T`.
    pub fn get<T: bytemuck::Pod>(&self, i: usize) -> Vec<T> {
        let bytes = self.0[i]
            .as_ref()
            .unwrap_or_else(|| panic!("argument {i} is not a buffer"));
        let mut v = vec![T::zeroed(); bytes.len() / std::mem::size_of::<T>()];
        bytemuck::cast_slice_mut(&mut v).copy_from_slice(bytes);
        v
    }
}

/// Where `cuda_shim.hpp` and `cuda_driver.hpp` live (under `$CAFT_REPO` when the tests run
/// from a copied executable: `support::repo`).
pub fn shim_dir() -> PathBuf {
    crate::support::repo().join("tests").join("cuda_emulated")
}

/// The C++ compiler: `$CXX`, else `g++`, when it runs.
pub fn compiler() -> Option<PathBuf> {
    let cxx = std::env::var_os("CXX").map_or_else(|| PathBuf::from("g++"), PathBuf::from);
    let ok = Command::new(&cxx)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    ok.then_some(cxx)
}

/// Longest a launch may run: `$CAFT_EMU_TIMEOUT_S`, default 120 s.
pub fn timeout() -> Duration {
    let s = std::env::var("CAFT_EMU_TIMEOUT_S")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(120);
    Duration::from_secs(s)
}

/// `extern __shared__ [__align__(n)] T name[];` -> a pointer to the launch's dynamic shared
/// memory: inside a function (an indented declaration) a local variable, at file scope (a
/// declaration at the start of a line) a macro, evaluated where the kernel uses the name.
pub fn rewrite_dynamic_smem(src: &str) -> String {
    const KEY: &str = "extern __shared__";
    let mut out = String::with_capacity(src.len());
    let mut rest = src;
    while let Some(at) = rest.find(KEY) {
        out.push_str(&rest[..at]);
        let decl_end = at + rest[at..].find(';').expect("extern __shared__ without ';'");
        let decl = rest[at + KEY.len()..decl_end].trim();
        let mut words: Vec<&str> = decl.split_whitespace().collect();
        words.retain(|w| !w.starts_with("__align__"));
        let (name, ty) = words.split_last().expect("extern __shared__ declaration");
        let name = name
            .strip_suffix("[]")
            .unwrap_or_else(|| panic!("extern __shared__ {decl}: expected `name[]`"));
        let ty = ty.join(" ");
        let file_scope = out.is_empty() || out.ends_with('\n');
        if file_scope {
            out.push_str(&format!(
                "#define {name} (reinterpret_cast<{ty}*>(cuda_emu::dynamic_smem()))"
            ));
            rest = &rest[decl_end + 1..]; // without the ';'
        } else {
            out.push_str(&format!(
                "{ty}* const {name} = reinterpret_cast<{ty}*>(cuda_emu::dynamic_smem())"
            ));
            rest = &rest[decl_end..];
        }
    }
    out.push_str(rest);
    out
}

/// The kernel header holding every inline-PTX wrapper (kernels/ptx.cuh).
pub const PTX_HEADER: &str = "ptx.cuh";

/// What the emulator compiles under [`PTX_HEADER`]'s name: the C++ stand-ins of
/// `ptx_emu.hpp`, which define the same functions.
const PTX_HEADER_EMULATED: &str = "\
// ptx.cuh as the emulator builds it (tests/cuda_emulated/harness.rs): the inline-PTX wrappers
// of kernels/ptx.cuh replaced by their C++ stand-ins.
#pragma once
#include \"common.cuh\"
#include \"ptx_emu.hpp\"
";

/// `src` (kernel file `name`) as the emulator compiles it: [`PTX_HEADER`] is replaced by
/// [`PTX_HEADER_EMULATED`]; any other file comes back unchanged. An error when a file other
/// than [`PTX_HEADER`] has an `asm` statement (the emulator cannot run it), or when
/// [`PTX_HEADER`] has none (it no longer holds the wrappers the stand-ins replace).
pub fn emulated_source(name: &str, src: &str) -> Result<String, String> {
    if name == PTX_HEADER {
        if !has_asm(src) {
            return Err(format!(
                "{name}: no inline PTX; the emulator replaces this header expecting the wrappers"
            ));
        }
        return Ok(PTX_HEADER_EMULATED.to_string());
    }
    if has_asm(src) {
        return Err(format!(
            "{name}: inline PTX outside {PTX_HEADER}; the emulator cannot run it (put the \
             instruction in a wrapper in {PTX_HEADER} and its C++ stand-in in ptx_emu.hpp)"
        ));
    }
    Ok(src.to_string())
}

/// Whether `text` has an `asm` statement (`asm(`, `asm volatile`, `asm (`).
fn has_asm(text: &str) -> bool {
    text.match_indices("asm").any(|(i, _)| {
        let before = text[..i].chars().next_back();
        let after = text[i + 3..].trim_start();
        !before.is_some_and(|c| c.is_alphanumeric() || c == '_')
            && (after.starts_with('(') || after.starts_with("volatile"))
    })
}

/// A compiled emulator executable for one kernel source.
pub struct Module {
    exe: PathBuf,
    dir: PathBuf,
}

impl Module {
    /// Compile `main_file` (one of `files`: `(file name, contents)`, e.g. every kernels/*.cu
    /// and *.cuh) with the shim. `entries`: the entry points to put in the table (each must be
    /// an `extern "C" __global__` function of the source once macros are expanded).
    pub fn build(
        label: &str,
        files: &[(String, String)],
        main_file: &str,
        entries: &[&str],
    ) -> Result<Module, String> {
        let cxx = compiler().ok_or("no C++ compiler (g++ or $CXX)")?;
        let dir = fresh_dir(label)?;
        write_sources(&dir, files)?;
        let mut main = entry_table(
            &["cuda_shim.hpp", "cuda_driver.hpp", main_file],
            "cuda_emu::Entry",
            "CUDA_EMU_ENTRY",
            entries,
        );
        main.push_str(
            "\nint main(int argc, char** argv) {\n    return cuda_emu::driver_main(argc, \
             argv, entries, sizeof entries / sizeof entries[0]);\n}\n",
        );
        std::fs::write(dir.join("main.cpp"), main).map_err(|e| e.to_string())?;
        let exe = dir.join("emu");
        compile_cpp(
            &cxx,
            &dir,
            &[dir.join("main.cpp")],
            &exe,
            &sanitizer_flags(),
            label,
        )?;
        Ok(Module { exe, dir })
    }

    /// Run one launch; the buffers afterwards, or the emulator's error output.
    pub fn run(&self, launch: &Launch) -> Result<After, String> {
        static SEQ: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let id = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let input = self.dir.join(format!("launch{id}.bin"));
        let output = self.dir.join(format!("after{id}.bin"));
        // stderr to a file, not a pipe: a long sanitizer report must not block the child.
        let errors = self.dir.join(format!("stderr{id}.txt"));
        std::fs::write(&input, encode(launch)).map_err(|e| e.to_string())?;
        let err_file = std::fs::File::create(&errors).map_err(|e| e.to_string())?;
        let mut child = Command::new(&self.exe)
            .arg(&input)
            .arg(&output)
            .stdout(Stdio::null())
            .stderr(err_file)
            .spawn()
            .map_err(|e| format!("starting {}: {e}", self.exe.display()))?;
        let start = Instant::now();
        let status = loop {
            if let Some(s) = child.try_wait().map_err(|e| e.to_string())? {
                break s;
            }
            if start.elapsed() > timeout() {
                let _ = child.kill();
                let _ = child.wait();
                let _ = std::fs::remove_file(&input);
                let stderr = std::fs::read_to_string(&errors).unwrap_or_default();
                return Err(format!(
                    "{} did not finish in {:?}: a __syncthreads or shuffle that not every \
                     thread reaches?\n{stderr}",
                    launch.entry,
                    timeout()
                ));
            }
            std::thread::sleep(Duration::from_millis(2));
        };
        let stderr = std::fs::read_to_string(&errors).unwrap_or_default();
        let _ = std::fs::remove_file(&errors);
        let _ = std::fs::remove_file(&input);
        if !status.success() {
            return Err(format!("{} failed ({status}): {stderr}", launch.entry));
        }
        let bytes = std::fs::read(&output).map_err(|e| e.to_string())?;
        let _ = std::fs::remove_file(&output);
        decode(launch, &bytes)
    }
}

/// Write `files` into `dir` as the emulator compiles them: dynamic shared memory declarations
/// rewritten, the inline-PTX header replaced ([`rewrite_dynamic_smem`], [`emulated_source`]).
fn write_sources(dir: &std::path::Path, files: &[(String, String)]) -> Result<(), String> {
    for (name, text) in files {
        let text = rewrite_dynamic_smem(&emulated_source(name, text)?);
        std::fs::write(dir.join(name), text).map_err(|e| format!("writing {name}: {e}"))?;
    }
    Ok(())
}

/// The start of a generated C++ file: `includes` in order, then `static const <ty> entries[]`
/// holding `<entry_macro>(name)` for each of `entries`.
fn entry_table(includes: &[&str], ty: &str, entry_macro: &str, entries: &[&str]) -> String {
    let mut text = String::from("// Generated by tests/cuda_emulated/harness.rs.\n");
    for i in includes {
        text.push_str(&format!("#include \"{i}\"\n"));
    }
    text.push_str(&format!("\nstatic const {ty} entries[] = {{\n"));
    for e in entries {
        text.push_str(&format!("    {entry_macro}({e}),\n"));
    }
    text.push_str("};\n");
    text
}

/// Compile `sources` with the emulator's flags (include paths: `dir` and the shim's folder)
/// into `out`, plus `extra` flags (`-shared`, sanitizers). `label` names the build in errors.
pub fn compile_cpp(
    cxx: &std::path::Path,
    dir: &std::path::Path,
    sources: &[PathBuf],
    out: &std::path::Path,
    extra: &[String],
    label: &str,
) -> Result<(), String> {
    let output = Command::new(cxx)
        .args(["-std=c++20", "-O2", "-pthread", "-g0"])
        // CUDA code reads vectors through reinterpret_cast (uint4 over float or bf16),
        // which ISO C++ aliasing rules forbid; keep g++ from optimising on them.
        .arg("-fno-strict-aliasing")
        // No a*b+c -> fma contraction: the emulator does the arithmetic as written.
        .arg("-ffp-contract=off")
        .args(["-Wall", "-Wno-unknown-pragmas", "-Wno-unused-function"])
        .args(extra)
        .arg("-I")
        .arg(dir)
        .arg("-I")
        .arg(shim_dir())
        .args(sources)
        .arg("-o")
        .arg(out)
        .output()
        .map_err(|e| format!("running {}: {e}", cxx.display()))?;
    if !output.status.success() {
        return Err(format!(
            "{} failed to compile {label} ({}):\n{}",
            cxx.display(),
            dir.display(),
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    Ok(())
}

/// Build `main_file` (one of `files`, as in [`Module::build`]) as a shared library `out` that
/// exports `caft_emu_launch` over `entries` (tests/cuda_emulated/cuda_module.hpp), for the
/// emulated driver (fake_libcuda.cpp). The sources are written to `dir`.
pub fn build_kernel_library(
    dir: &std::path::Path,
    files: &[(String, String)],
    main_file: &str,
    entries: &[&str],
    out: &std::path::Path,
) -> Result<(), String> {
    let cxx = compiler().ok_or("no C++ compiler (g++ or $CXX)")?;
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    write_sources(dir, files)?;
    let mut main = entry_table(
        &["cuda_shim.hpp", main_file, "cuda_module.hpp"],
        "cuda_emu::RawEntry",
        "CUDA_EMU_RAW_ENTRY",
        entries,
    );
    main.push_str("\nCUDA_EMU_MODULE_EXPORT(entries)\n");
    let src = dir.join(format!("{main_file}.module.cpp"));
    std::fs::write(&src, main).map_err(|e| e.to_string())?;
    // Fibers: a launch costs context switches, not OS threads (cuda_shim.hpp).
    let flags = ["-shared", "-fPIC", "-DCUDA_EMU_FIBERS"].map(String::from);
    compile_cpp(&cxx, dir, &[src], out, &flags, main_file)
}

/// `$CAFT_EMU_SANITIZE` (`address`, `thread`, `undefined`, ...) as g++ `-fsanitize=` flags.
fn sanitizer_flags() -> Vec<String> {
    match std::env::var("CAFT_EMU_SANITIZE") {
        // No recovery: a report must fail the launch (UBSan would print and go on).
        Ok(s) if !s.is_empty() => vec![
            format!("-fsanitize={s}"),
            "-fno-sanitize-recover=all".into(),
            "-fno-omit-frame-pointer".into(),
            "-g".into(), // line numbers in reports
        ],
        _ => Vec::new(),
    }
}

/// A new directory for one build under the system temp dir; builds older than an hour from
/// earlier runs are removed (nothing is reused across runs).
fn fresh_dir(label: &str) -> Result<PathBuf, String> {
    let root = std::env::temp_dir().join("caft-cuda-emulated");
    std::fs::create_dir_all(&root).map_err(|e| format!("{}: {e}", root.display()))?;
    if let Ok(rd) = std::fs::read_dir(&root) {
        for e in rd.flatten() {
            let old = e
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| SystemTime::now().duration_since(t).ok())
                .is_some_and(|age| age > Duration::from_secs(3600));
            if old {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let dir = root.join(format!("{label}-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    Ok(dir)
}

fn encode(l: &Launch) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend((l.entry.len() as u32).to_le_bytes());
    v.extend(l.entry.as_bytes());
    for x in l.grid.iter().chain(&l.block) {
        v.extend(x.to_le_bytes());
    }
    v.extend((l.smem_bytes as u64).to_le_bytes());
    v.extend((l.args.len() as u32).to_le_bytes());
    for a in &l.args {
        match a {
            Arg::Buf(b) => {
                v.push(0);
                v.extend((b.len() as u64).to_le_bytes());
                v.extend(b);
            }
            Arg::Null => v.push(1),
            Arg::I32(x) => {
                v.push(2);
                v.extend(x.to_le_bytes());
            }
            Arg::U32(x) => {
                v.push(3);
                v.extend(x.to_le_bytes());
            }
            Arg::I64(x) => {
                v.push(4);
                v.extend(x.to_le_bytes());
            }
            Arg::F32(x) => {
                v.push(5);
                v.extend(x.to_le_bytes());
            }
        }
    }
    v
}

fn decode(l: &Launch, mut bytes: &[u8]) -> Result<After, String> {
    let mut out = Vec::with_capacity(l.args.len());
    for a in &l.args {
        let Arg::Buf(b) = a else {
            out.push(None);
            continue;
        };
        let short = || format!("{}: output file truncated", l.entry);
        let len = u64::from_le_bytes(bytes.get(..8).ok_or_else(short)?.try_into().unwrap());
        let len = len as usize;
        if len != b.len() {
            return Err(format!("{}: buffer came back with {len} bytes", l.entry));
        }
        out.push(Some(bytes.get(8..8 + len).ok_or_else(short)?.to_vec()));
        bytes = &bytes[8 + len..];
    }
    Ok(After(out))
}
