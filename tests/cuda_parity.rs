//! Every CUDA op against the CPU reference, on fresh random inputs at several shapes (odd
//! sizes included), for bf16 and f32 storage; and determinism (two runs, bit-identical).
//!
//! The comparison itself is `caft_fast::backend::cuda::diagnostics::parity` (shared with
//! `caft-fast doctor`): relative L2 error within 1e-2 (bf16) or 1e-5 (f32), NaN never passes, outputs NaN-poisoned
//! before every run. Needs a CUDA GPU: run with `--include-ignored` on one. Without one,
//! `on_the_emulated_gpu` runs them all on the emulated GPU (tests/cuda_emulated/gpu.rs).

use caft_fast::backend::cpu::CpuBackend;
use caft_fast::backend::cuda::diagnostics::parity::{self, CaseResult, Shape};
use caft_fast::backend::cuda::{probe, CudaBackend, DeviceElem, Runtime};
use std::sync::{Arc, OnceLock};

#[path = "cuda_emulated/gpu.rs"]
mod emulated_gpu;
#[path = "cuda_emulated/harness.rs"]
mod harness;
mod support;

/// Every test of this file (all ignored: they need a GPU) on the emulated GPU, the CPU standing
/// in for the driver and cuBLAS (tests/cuda_emulated/gpu.rs), so they run in CI too.
#[test]
fn on_the_emulated_gpu() {
    emulated_gpu::rerun_ignored("on_the_emulated_gpu", &[]);
}

/// The run above can fail: with swiglu's tail loop (sizes not a multiple of the vector width)
/// stopping one element short in the emulated kernel library, the swiglu tests must fail on
/// the element left as the driver's NaN fill.
#[test]
fn on_the_emulated_gpu_a_broken_kernel_fails() {
    let name = "on_the_emulated_gpu_a_broken_kernel_fails";
    if emulated_gpu::is_child() || !emulated_gpu::available(name) {
        return;
    }
    let from =
        "for (long long i = nvec * N + threadIdx.x; i < len; i += blockDim.x)\n            out[i]";
    let to = "for (long long i = nvec * N + threadIdx.x; i + 1 < len; i += blockDim.x)\n            out[i]";
    let dir = emulated_gpu::build_edited("-mutant-swiglu", &["elementwise"], &|file, text| {
        if file != "elementwise.cu" {
            return text;
        }
        assert!(
            text.contains(from),
            "elementwise.cu changed: update this mutation"
        );
        text.replacen(from, to, 1)
    })
    .expect("building the mutant emulated GPU");
    let (ok, text) = emulated_gpu::run_ignored(&dir, "on_the_emulated_gpu", &["::swiglu"]);
    println!("{text}");
    assert!(
        !ok,
        "swiglu with a missing tail element passed on the emulated GPU"
    );
    assert!(text.contains("swiglu") && text.contains("FAIL"), "{text}");
}

fn runtime() -> Arc<Runtime> {
    static RT: OnceLock<Arc<Runtime>> = OnceLock::new();
    RT.get_or_init(|| {
        let p = probe();
        assert!(p.usable(), "{}", p.summary());
        Arc::new(Runtime::new(0).expect("opening CUDA device 0"))
    })
    .clone()
}

fn check<T: DeviceElem>(prefix: &str, seed: u64) {
    let gpu = CudaBackend::<T>::with_runtime(runtime()).expect("CUDA backend");
    let cpu = CpuBackend::new();
    let mut shapes = parity::standard_shapes();
    // One more odd shape per test, drawn from the seed, so repeated runs cover more sizes.
    shapes.push(Shape {
        n: 5 + (seed as usize % 11),
        d: 33 + 2 * (seed as usize % 17),
        ffn: 41 + (seed as usize % 23),
        vocab: 257 + (seed as usize % 31),
        r: 1 + (seed as usize % 4),
        k: 1 + (seed as usize % 7),
        batch: 2,
        seq: 3 + (seed as usize % 9),
        n_heads: 2,
        n_kv_heads: 1,
        head_dim: 64,
    });
    if prefix == "resid_" {
        // The fused norm kernels choose their launch variant from d: cover every variant.
        shapes.extend(parity::wide_row_shapes());
    }
    let results: Vec<CaseResult> = parity::run_matching(&gpu, &cpu, &shapes, seed, prefix);
    assert!(!results.is_empty(), "no parity case matches {prefix:?}");
    let ok = parity::print_table(T::SUFFIX, &results);
    let failed: Vec<String> = results
        .iter()
        .filter(|r| !r.pass())
        .map(|r| {
            format!(
                "{} [{}] rel.err {:.3e} (tol {:.0e}), deterministic {}{}",
                r.op,
                r.shape,
                r.rel_err,
                r.tol,
                r.deterministic,
                r.error
                    .as_ref()
                    .map(|e| format!(", error: {e}"))
                    .unwrap_or_default()
            )
        })
        .collect();
    assert!(
        ok && failed.is_empty(),
        "{} failing case(s):\n{}",
        failed.len(),
        failed.join("\n")
    );
}

macro_rules! parity_tests {
    ($($name:ident: $prefix:literal),* $(,)?) => {
        mod bf16 {
            $(
                #[test]
                #[ignore = "needs a CUDA GPU"]
                fn $name() {
                    super::check::<half::bf16>($prefix, 11);
                }
            )*
        }
        mod f32 {
            $(
                #[test]
                #[ignore = "needs a CUDA GPU"]
                fn $name() {
                    super::check::<f32>($prefix, 12);
                }
            )*
        }
    };
}

parity_tests! {
    embedding: "embedding",
    linear: "linear",
    lora_fwd: "lora_fwd",
    lora_bwd: "lora_bwd",
    resid_norm: "resid_",
    rope: "rope",
    attention: "attention",
    swiglu: "swiglu",
    geglu: "geglu",
    softcap: "softcap",
    cross_entropy: "cross_entropy",
    weight_grad: "grad_",
    params_to_act: "params_to_act",
    sum_squares: "sum_squares",
    adamw: "adamw",
}

/// Every case name is covered by one of the prefixes above (a new case cannot go untested).
#[test]
fn every_case_is_covered() {
    let prefixes = [
        "embedding",
        "linear",
        "lora_fwd",
        "lora_bwd",
        "resid_",
        "rope",
        "attention",
        "swiglu",
        "geglu",
        "softcap",
        "cross_entropy",
        "grad_",
        "params_to_act",
        "sum_squares",
        "adamw",
    ];
    for name in parity::case_names() {
        assert!(
            prefixes.iter().any(|p| name.starts_with(p)),
            "parity case {name} is not run by any test"
        );
    }
}

/// rel_err is what the tests rely on: NaN never passes, zero error is zero.
#[test]
fn rel_err_rejects_nan() {
    assert_eq!(parity::rel_err(&[1.0, 2.0], &[1.0, 2.0]), 0.0);
    assert!(parity::rel_err(&[f32::NAN, 2.0], &[1.0, 2.0]).is_infinite());
    assert!(parity::rel_err(&[1.0], &[1.0, 2.0]).is_infinite());
    assert!((parity::rel_err(&[1.1], &[1.0]) - 0.1).abs() < 1e-6);
}
