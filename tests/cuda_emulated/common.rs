//! What the emulated-kernel test files share: kernel sources and module builds, the skip
//! policy, inputs (bf16-rounded draws, NaN-poisoned outputs) and the comparison with the CPU
//! reference (worst relative error, bit-identical repeats, a table of cases).
//!
//! A test file declares both modules at its root and this one uses the harness from there:
//! ```ignore
//! #[path = "cuda_emulated/harness.rs"]
//! mod harness;
//! #[path = "cuda_emulated/common.rs"]
//! mod common;
//! ```

// Shared by several test binaries: not every one uses every part.
#![allow(dead_code)]

use crate::harness::{self, Arg, Module};
use caft_fast::backend::cuda::compile::kernel_sources;
use caft_fast::backend::cuda::diagnostics::parity::{rel_err, tolerance};
use caft_fast::backend::cuda::DeviceElem;
use caft_fast::util::rng::Rng;
use std::fmt::Debug;

/// A storage type of the kernels (bf16 or f32) that can also be sent as bytes.
pub trait Elem: DeviceElem + bytemuck::Pod {}
impl<T: DeviceElem + bytemuck::Pod> Elem for T {}

/// The outputs of one op, as f32, in a fixed order.
pub type Outputs = Vec<Vec<f32>>;

// ==== Sources and builds =====================================================================

/// The skip policy: false (after a notice) without a C++ compiler, a failure when `CI` is set.
pub fn have_compiler(test: &str) -> bool {
    if harness::compiler().is_some() {
        return true;
    }
    let msg = "no C++ compiler: install g++ (or set CXX) to run the kernels under emulation";
    if std::env::var_os("CI").is_some() {
        panic!("{msg}");
    }
    eprintln!("SKIPPED {}::{test}: {msg}", env!("CARGO_CRATE_NAME"));
    false
}

/// The kernel sources as NVRTC sees them (embedded by build.rs), or the `*.cu` / `*.cuh` files
/// of `$CAFT_EMU_KERNELS` when set (to try other kernel sources without rebuilding), each
/// passed through `edit(file name, text)`.
pub fn sources(edit: impl Fn(&str, String) -> String) -> Vec<(String, String)> {
    let files: Vec<(String, String)> = match std::env::var_os("CAFT_EMU_KERNELS") {
        Some(dir) => std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("CAFT_EMU_KERNELS={}: {e}", dir.to_string_lossy()))
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "cu" || x == "cuh"))
            .map(|p| {
                let name = p.file_name().unwrap().to_string_lossy().into_owned();
                let text =
                    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
                (name, text)
            })
            .collect(),
        None => kernel_sources()
            .iter()
            .map(|(name, text)| (name.to_string(), text.to_string()))
            .collect(),
    };
    files
        .into_iter()
        .map(|(name, text)| {
            let text = edit(&name, text);
            (name, text)
        })
        .collect()
}

/// `main_file` (e.g. "loss.cu") under emulation with the entry points `entries`, its source
/// passed through `edit(text)` (a mutation check breaks a line; `|t| t` for the real one).
pub fn build_module(
    label: &str,
    main_file: &str,
    entries: &[String],
    edit: impl Fn(String) -> String,
) -> Result<Module, String> {
    let files = sources(|name, text| if name == main_file { edit(text) } else { text });
    let entries: Vec<&str> = entries.iter().map(String::as_str).collect();
    Module::build(label, &files, main_file, &entries)
}

/// `text` with the first `from` replaced by `to`; panics (naming `file`) when `from` is not
/// there, so a mutation check notices that the kernel changed shape.
pub fn mutate(file: &str, text: String, from: &str, to: &str) -> String {
    assert!(
        text.contains(from),
        "{file} no longer contains `{from}`: update the mutation check"
    );
    text.replacen(from, to, 1)
}

// ==== Inputs =================================================================================

/// `v` stored as `T`, as a buffer argument.
pub fn act<T: Elem>(v: &[f32]) -> Arg {
    let t: Vec<T> = v.iter().map(|&x| T::from_f32(x)).collect();
    Arg::buf(&t)
}

/// An output buffer filled with NaN, so an element the kernel does not write fails the test.
pub fn poisoned<T: Elem>(len: usize) -> Arg {
    Arg::buf(&vec![T::from_f32(f32::NAN); len])
}

pub fn to_f32<T: Elem>(v: &[T]) -> Vec<f32> {
    v.iter().map(|x| x.to_f32()).collect()
}

/// Normal values times `scale`, rounded through `T` so both sides see the same inputs.
pub fn draw<T: Elem>(rng: &mut Rng, len: usize, scale: f32) -> Vec<f32> {
    rng.normal_vec(len)
        .into_iter()
        .map(|x| T::from_f32(x * scale).to_f32())
        .collect()
}

// ==== Comparing ==============================================================================

/// Largest relative error over the outputs (infinite on NaN or a length mismatch).
pub fn worst(got: &[Vec<f32>], want: &[Vec<f32>]) -> f64 {
    assert_eq!(got.len(), want.len());
    got.iter()
        .zip(want)
        .map(|(g, w)| rel_err(g, w))
        .fold(0.0, f64::max)
}

pub fn bits_equal(a: &[Vec<f32>], b: &[Vec<f32>]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|(x, y)| {
            x.len() == y.len() && x.iter().zip(y).all(|(p, q)| p.to_bits() == q.to_bits())
        })
}

/// How one op is compared: inputs per shape, the emulated launch(es), the CPU reference.
pub struct Check<'a, S, I> {
    /// The op's name in the printed table and the failure message.
    pub op: &'a str,
    /// Seed of the inputs (each shape draws fresh ones from it in turn).
    pub seed: u64,
    pub shapes: &'a [S],
    pub make: &'a dyn Fn(&mut Rng, &S) -> I,
    pub emulate: &'a dyn Fn(&I) -> Result<Outputs, String>,
    pub cpu: &'a dyn Fn(&I) -> Outputs,
    /// Shapes that run a second time and must agree bit for bit: the kernels' sums have a
    /// fixed order, so however the OS interleaves the threads the result is the same.
    pub repeat: &'a dyn Fn(&S) -> bool,
}

/// Run every shape through the emulator and the CPU reference, printing one line each; panic
/// listing the shapes out of `tolerance::<T>()`, failed launches and repeats that differ.
pub fn check<T: Elem, S: Debug, I>(c: Check<'_, S, I>) {
    let tol = tolerance::<T>();
    let mut rng = Rng::new(c.seed);
    let mut failures = Vec::new();
    for s in c.shapes {
        let inputs = (c.make)(&mut rng, s);
        let want = (c.cpu)(&inputs);
        let run = || (c.emulate)(&inputs).map_err(|e| format!("{s:?}: {e}"));
        let got = match run() {
            Ok(got) => got,
            Err(e) => {
                failures.push(e);
                continue;
            }
        };
        let err = worst(&got, &want);
        let repeat = (c.repeat)(s).then(|| run().map(|again| bits_equal(&got, &again)));
        let ok = err.is_finite() && err <= tol;
        println!(
            "{:<22} {:<5} {s:?}  rel.err {err:.2e}{}{}",
            c.op,
            T::SUFFIX,
            match repeat {
                Some(Ok(true)) => "  (repeat: bit-identical)",
                Some(_) => "  (repeat: DIFFERS)",
                None => "",
            },
            if ok { "" } else { "  FAIL" }
        );
        if !ok {
            failures.push(format!("{s:?}: rel.err {err:.3e} (tol {tol:.0e})"));
        }
        match repeat {
            Some(Err(e)) => failures.push(e),
            Some(Ok(false)) => failures.push(format!(
                "{s:?}: a second run gave other bits: the result depends on how the threads \
                 interleave, a race (CAFT_EMU_SANITIZE=thread names the accesses)"
            )),
            _ => {}
        }
    }
    assert!(
        failures.is_empty(),
        "{} ({}) under emulation:\n{}",
        c.op,
        T::SUFFIX,
        failures.join("\n")
    );
}

/// A mutation check's verdict: the outputs of a deliberately broken kernel must be out of
/// `tolerance::<T>()` (or NaN), else the tests could not have caught the break.
pub fn assert_caught<T: Elem>(what: &str, got: &[Vec<f32>], want: &[Vec<f32>]) {
    let err = worst(got, want);
    println!("{what}: rel.err {err:.2e}");
    let passes = err.is_finite() && err <= tolerance::<T>();
    assert!(!passes, "{what} passed (rel.err {err:.2e})");
}
