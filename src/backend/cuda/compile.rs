//! NVRTC compilation of the embedded kernel sources (no GPU needed).
//!
//! `build.rs` embeds every `kernels/*.cu` and `kernels/*.cuh`; a module named `m` is the file
//! `kernels/m.cu`, compiled with every `.cuh` available to `#include "x.cuh"`. The output is a
//! cubin for one real architecture (`sm_XY`, `sm_90a` on Hopper), which any driver that knows the
//! architecture loads regardless of the PTX ISA version the NVRTC writes, or PTX as a fallback.
//!
//! IEEE math stays on (no `--use_fast_math`): the softmax and cross-entropy paths rely on
//! accurate `expf`/`logf`, and fused multiply-add (the NVRTC default) is kept.

use anyhow::{anyhow, bail, Context, Result};
use cudarc::nvrtc::sys as nv;
use std::ffi::{c_char, c_int, CStr, CString};

mod sources {
    include!(concat!(env!("OUT_DIR"), "/kernel_sources.rs"));
}

/// `(file name, contents)` of every embedded kernel source, sorted by name.
pub fn kernel_sources() -> &'static [(&'static str, &'static str)] {
    sources::KERNEL_SOURCES
}

/// Hash of all embedded kernel sources (part of the disk-cache key).
pub fn sources_hash() -> &'static str {
    sources::KERNEL_SOURCES_HASH
}

/// Names of every kernel module (`kernels/<name>.cu`), sorted.
pub fn module_names() -> Vec<&'static str> {
    kernel_sources()
        .iter()
        .filter_map(|(name, _)| name.strip_suffix(".cu"))
        .collect()
}

/// Why the CUDA backend cannot run without NVRTC, for people.
pub const NVRTC_MISSING: &str =
    "libnvrtc not found (needed to compile the kernels; put its folder on LD_LIBRARY_PATH)";

/// Whether libnvrtc can be loaded.
pub fn nvrtc_present() -> bool {
    // SAFETY: only tries to dlopen the library by its usual names; no symbol is called.
    unsafe { nv::is_culib_present() }
}

fn check(r: nv::nvrtcResult, what: &str) -> Result<()> {
    if r == nv::nvrtcResult::NVRTC_SUCCESS {
        return Ok(());
    }
    // SAFETY: nvrtcGetErrorString returns a pointer to a static NUL-terminated string.
    let msg = unsafe {
        let p = nv::nvrtcGetErrorString(r);
        if p.is_null() {
            format!("{r:?}")
        } else {
            CStr::from_ptr(p).to_string_lossy().into_owned()
        }
    };
    bail!("{what}: {msg}")
}

/// NVRTC's `(major, minor)` version. Fails (without panicking) when libnvrtc is absent.
pub fn nvrtc_version() -> Result<(i32, i32)> {
    if !nvrtc_present() {
        bail!("libnvrtc not found (put the folder holding libnvrtc.so on LD_LIBRARY_PATH)");
    }
    let (mut major, mut minor) = (0 as c_int, 0 as c_int);
    check(
        // SAFETY: the library is present; both pointers are valid for writes.
        unsafe { nv::nvrtcVersion(&mut major, &mut minor) },
        "nvrtcVersion",
    )?;
    Ok((major, minor))
}

/// The `--gpu-architecture` value for a compute capability: `sm_90a` on Hopper (so kernels may
/// use its architecture-specific instructions), `sm_XY` elsewhere.
pub fn arch_name(major: u32, minor: u32) -> String {
    if (major, minor) == (9, 0) {
        "sm_90a".to_string()
    } else {
        format!("sm_{major}{minor}")
    }
}

/// What to produce.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    /// Machine code for the real architecture.
    Cubin,
    /// PTX for the matching virtual architecture (`compute_XY`), JIT-compiled by the driver.
    Ptx,
}

/// Result of one compilation.
#[derive(Debug)]
pub struct Compiled {
    /// Cubin bytes, or PTX text (NUL-free) for [`Output::Ptx`].
    pub image: Vec<u8>,
    pub output: Output,
    /// The compiler's log (warnings; ptxas statistics with `-Xptxas=-v`).
    pub log: String,
}

/// The options every compilation uses, plus the architecture.
pub fn base_options(arch: &str, output: Output) -> Vec<String> {
    let arch = match output {
        Output::Cubin => arch.to_string(),
        Output::Ptx => arch.replace("sm_", "compute_"),
    };
    vec![
        format!("--gpu-architecture={arch}"),
        "--std=c++17".to_string(),
        "-default-device".to_string(),
    ]
}

/// Compile module `module` (`kernels/<module>.cu`) for `arch` (e.g. `"sm_90a"`).
/// `extra` options are appended (e.g. `-Xptxas=-v`).
pub fn compile(module: &str, arch: &str, output: Output, extra: &[&str]) -> Result<Compiled> {
    let file = format!("{module}.cu");
    let src = kernel_sources()
        .iter()
        .find(|(name, _)| *name == file)
        .map(|(_, s)| *s)
        .ok_or_else(|| anyhow!("no kernel module {module:?} (kernels/{file} is not embedded)"))?;
    if !nvrtc_present() {
        bail!("libnvrtc not found: cannot compile kernels/{file}");
    }
    let headers: Vec<(CString, CString)> = kernel_sources()
        .iter()
        .filter(|(name, _)| name.ends_with(".cuh"))
        .map(|(name, text)| {
            Ok((
                CString::new(*text).with_context(|| format!("kernels/{name} contains NUL"))?,
                CString::new(*name)?,
            ))
        })
        .collect::<Result<_>>()?;
    let header_srcs: Vec<*const c_char> = headers.iter().map(|(t, _)| t.as_ptr()).collect();
    let header_names: Vec<*const c_char> = headers.iter().map(|(_, n)| n.as_ptr()).collect();
    let c_src = CString::new(src).with_context(|| format!("kernels/{file} contains NUL"))?;
    let c_name = CString::new(file.clone())?;

    let mut opts = base_options(arch, output);
    opts.extend(extra.iter().map(|s| s.to_string()));
    let c_opts: Vec<CString> = opts
        .iter()
        .map(|o| CString::new(o.as_str()))
        .collect::<Result<_, _>>()?;
    let opt_ptrs: Vec<*const c_char> = c_opts.iter().map(|o| o.as_ptr()).collect();

    let mut prog: nv::nvrtcProgram = std::ptr::null_mut();
    check(
        // SAFETY: all strings are NUL-terminated and outlive the call; the header arrays have
        // `headers.len()` entries each; `prog` is a valid out-pointer.
        unsafe {
            nv::nvrtcCreateProgram(
                &mut prog,
                c_src.as_ptr(),
                c_name.as_ptr(),
                headers.len() as c_int,
                header_srcs.as_ptr(),
                header_names.as_ptr(),
            )
        },
        "nvrtcCreateProgram",
    )?;
    let result = (|| {
        // SAFETY: `prog` was created above; the option pointers are valid C strings.
        let rc =
            unsafe { nv::nvrtcCompileProgram(prog, opt_ptrs.len() as c_int, opt_ptrs.as_ptr()) };
        let log = program_log(prog)?;
        if rc != nv::nvrtcResult::NVRTC_SUCCESS {
            bail!("NVRTC failed to compile kernels/{file} for {arch} ({rc:?}):\n{log}");
        }
        let image = match output {
            Output::Cubin => {
                let mut size = 0usize;
                check(
                    // SAFETY: `prog` compiled successfully; `size` is a valid out-pointer.
                    unsafe { nv::nvrtcGetCUBINSize(prog, &mut size) },
                    "nvrtcGetCUBINSize",
                )?;
                let mut buf = vec![0u8; size];
                check(
                    // SAFETY: `buf` has exactly the size NVRTC reported.
                    unsafe { nv::nvrtcGetCUBIN(prog, buf.as_mut_ptr() as *mut c_char) },
                    "nvrtcGetCUBIN",
                )?;
                if buf.is_empty() {
                    bail!("NVRTC produced no cubin for kernels/{file} ({arch} is not a real architecture?)");
                }
                buf
            }
            Output::Ptx => {
                let mut size = 0usize;
                check(
                    // SAFETY: as above.
                    unsafe { nv::nvrtcGetPTXSize(prog, &mut size) },
                    "nvrtcGetPTXSize",
                )?;
                let mut buf = vec![0u8; size];
                check(
                    // SAFETY: `buf` has exactly the size NVRTC reported.
                    unsafe { nv::nvrtcGetPTX(prog, buf.as_mut_ptr() as *mut c_char) },
                    "nvrtcGetPTX",
                )?;
                while buf.last() == Some(&0) {
                    buf.pop();
                }
                buf
            }
        };
        Ok(Compiled { image, output, log })
    })();
    // SAFETY: `prog` is a valid program, destroyed exactly once.
    unsafe { nv::nvrtcDestroyProgram(&mut prog) };
    result
}

fn program_log(prog: nv::nvrtcProgram) -> Result<String> {
    let mut size = 0usize;
    check(
        // SAFETY: `prog` is a valid program; `size` is a valid out-pointer.
        unsafe { nv::nvrtcGetProgramLogSize(prog, &mut size) },
        "nvrtcGetProgramLogSize",
    )?;
    let mut buf = vec![0u8; size.max(1)];
    check(
        // SAFETY: `buf` holds at least the reported size.
        unsafe { nv::nvrtcGetProgramLog(prog, buf.as_mut_ptr() as *mut c_char) },
        "nvrtcGetProgramLog",
    )?;
    while buf.last() == Some(&0) {
        buf.pop();
    }
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// ptxas statistics of one kernel, parsed from a `-Xptxas=-v` log.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelStats {
    pub name: String,
    pub registers: u32,
    pub spill_stores: u32,
    pub spill_loads: u32,
    pub stack_bytes: u32,
    pub shared_bytes: u32,
}

/// Parse a ptxas `-v` log into per-kernel statistics (entry points only, in log order).
///
/// ptxas writes, per function: `Compiling entry function 'NAME' for 'sm_90a'`, then
/// `N bytes stack frame, S bytes spill stores, L bytes spill loads` and
/// `Used R registers, ... S bytes smem, ...`.
pub fn parse_ptxas_log(log: &str) -> Vec<KernelStats> {
    let mut out: Vec<KernelStats> = Vec::new();
    let mut current: Option<KernelStats> = None;
    for line in log.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            if let Some(k) = current.take() {
                out.push(k);
            }
            let name = rest.split('\'').next().unwrap_or("").to_string();
            current = Some(KernelStats {
                name,
                ..Default::default()
            });
            continue;
        }
        if line.contains("Function properties for") {
            // Properties of a non-entry (device) function follow; attribute them to nothing
            // unless they name the current entry.
            let name = line
                .split("Function properties for ")
                .nth(1)
                .unwrap_or("")
                .trim();
            if current.as_ref().map(|k| k.name.as_str()) != Some(name) {
                if let Some(k) = current.take() {
                    out.push(k);
                }
            }
            continue;
        }
        let Some(k) = current.as_mut() else { continue };
        if line.contains("stack frame") {
            k.stack_bytes = number_before(line, "bytes stack frame").unwrap_or(0);
            k.spill_stores = number_before(line, "bytes spill stores").unwrap_or(0);
            k.spill_loads = number_before(line, "bytes spill loads").unwrap_or(0);
        }
        if line.contains("Used") && line.contains("registers") {
            k.registers = number_before(line, "registers").unwrap_or(0);
            k.shared_bytes = number_before(line, "bytes smem").unwrap_or(0);
        }
    }
    if let Some(k) = current.take() {
        out.push(k);
    }
    out
}

/// The integer immediately before `marker` in `line`.
fn number_before(line: &str, marker: &str) -> Option<u32> {
    let idx = line.find(marker)?;
    line[..idx]
        .trim_end()
        .rsplit(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|s| s.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ptxas_statistics() {
        let log = "ptxas info    : 0 bytes gmem\n\
ptxas info    : Compiling entry function 'rmsnorm_fwd_bf16' for 'sm_90a'\n\
ptxas info    : Function properties for rmsnorm_fwd_bf16\n\
    8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads\n\
ptxas info    : Used 40 registers, used 1 barriers, 128 bytes smem, 380 bytes cmem[0]\n\
ptxas info    : Compiling entry function 'adamw_f32' for 'sm_90a'\n\
ptxas info    : Function properties for adamw_f32\n\
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n\
ptxas info    : Used 18 registers, 380 bytes cmem[0]\n";
        let s = parse_ptxas_log(log);
        assert_eq!(s.len(), 2);
        assert_eq!(
            s[0],
            KernelStats {
                name: "rmsnorm_fwd_bf16".into(),
                registers: 40,
                spill_stores: 4,
                spill_loads: 12,
                stack_bytes: 8,
                shared_bytes: 128
            }
        );
        assert_eq!(s[1].registers, 18);
        assert_eq!(s[1].spill_stores, 0);
    }
}
