//! `caft-fast doctor`: what GPU support this machine has, and whether every CUDA op agrees with
//! the CPU reference here.

use super::parity;
use crate::backend::cpu::CpuBackend;
use crate::backend::cuda::backend::CudaBackend;
use crate::backend::cuda::probe::probe;
use crate::backend::cuda::runtime::Runtime;
use crate::backend::cuda::{collective, compile};
use anyhow::Result;
use std::sync::Arc;
use std::time::Instant;

/// Print the GPU, driver, NVRTC and cuBLAS found; compile every kernel; run every op of
/// `CudaBackend<bf16>` and `CudaBackend<f32>` against the CPU reference. `Ok(false)` when any
/// step fails (including: no usable GPU).
pub fn doctor() -> Result<bool> {
    let p = probe();
    let yes = |b: bool| if b { "found" } else { "NOT FOUND" };
    println!("libcuda    {}", yes(p.libcuda));
    if let Some((ma, mi)) = p.driver_version {
        println!("driver     CUDA {ma}.{mi}");
    }
    println!(
        "libnvrtc   {}{}",
        yes(p.libnvrtc),
        p.nvrtc_version
            .map(|(a, b)| format!(" (NVRTC {a}.{b})"))
            .unwrap_or_default()
    );
    println!("libcublas  {}", yes(p.libcublas));
    // NCCL is optional: only data parallelism (`train --gpus`, torchrun) needs it.
    match (collective::library_path(), collective::version()) {
        (Some(path), Some((a, b, c))) => {
            println!("libnccl    found (NCCL {a}.{b}.{c}, {})", path.display())
        }
        (Some(path), None) => println!(
            "libnccl    found as {} but not under the name libnccl.so (train --gpus links \
             it for its workers; under torchrun put a libnccl.so link on LD_LIBRARY_PATH)",
            path.display()
        ),
        (None, Some((a, b, c))) => println!("libnccl    found (NCCL {a}.{b}.{c})"),
        (None, None) => println!(
            "libnccl    not found (needed only to train on several GPUs: {})",
            collective::INSTALL_HINT
        ),
    }
    for g in &p.gpus {
        println!(
            "gpu {}      {} (compute {}.{}, {:.1} GiB)",
            g.ordinal,
            g.name,
            g.compute_capability.0,
            g.compute_capability.1,
            g.total_mem_bytes as f64 / (1u64 << 30) as f64
        );
    }
    if let Some(problem) = &p.problem {
        println!("cannot use the GPU: {problem}");
        return Ok(false);
    }

    let rt = Arc::new(Runtime::new(0)?);
    let mut ok = true;
    println!(
        "kernels    sources hash {}, compiled for {}",
        compile::sources_hash(),
        compile::arch_name(rt.arch().0, rt.arch().1)
    );
    for m in compile::module_names() {
        let t = Instant::now();
        match rt.module(m) {
            Ok(_) => println!("  {m:<14} ok ({:.2} s)", t.elapsed().as_secs_f64()),
            Err(e) => {
                ok = false;
                println!("  {m:<14} FAILED: {e:#}");
            }
        }
    }

    let cpu = CpuBackend::new();
    let shapes = parity::standard_shapes();
    let bf16 = CudaBackend::<half::bf16>::with_runtime(rt.clone())?;
    match bf16.gemm().version() {
        Ok(v) => println!("cuBLAS     {v}"),
        Err(e) => println!("cuBLAS     version unknown: {e:#}"),
    }
    let t = Instant::now();
    let wide = parity::wide_row_shapes();
    let mut res = parity::run_all(&bf16, &cpu, &shapes, 1);
    res.extend(parity::run_matching(&bf16, &cpu, &wide, 3, "resid_"));
    ok &= parity::print_table("bf16", &res);
    if collective::version().is_some() {
        ok &= nccl_check(&bf16);
    }
    let f32b = CudaBackend::<f32>::with_runtime(rt.clone())?;
    let mut res = parity::run_all(&f32b, &cpu, &shapes, 2);
    res.extend(parity::run_matching(&f32b, &cpu, &wide, 4, "resid_"));
    ok &= parity::print_table("f32", &res);
    println!(
        "parity     {} ({:.1} s)",
        if ok { "all ops pass" } else { "FAILURES above" },
        t.elapsed().as_secs_f64()
    );
    Ok(ok)
}

/// An all-reduce through libnccl in a group of one (this GPU): the library loads, a
/// communicator forms and the sum leaves the numbers as they were. Prints a line; false on a
/// failure.
fn nccl_check(be: &CudaBackend<half::bf16>) -> bool {
    let run = || -> Result<()> {
        let id = collective::unique_id()?;
        be.join(0, 1, &id)?;
        let host: Vec<f32> = (0..1000).map(|i| (i as f32 * 0.37).sin()).collect();
        let mut dev = be.rt.upload(&host, || "the NCCL check's buffer".into())?;
        be.all_reduce_f32(&mut dev)?;
        let back = be.rt.stream.clone_dtoh(&dev)?;
        anyhow::ensure!(back == host, "a group of one changed the numbers it summed");
        Ok(())
    };
    let t = Instant::now();
    match run() {
        Ok(()) => {
            println!(
                "nccl       all-reduce in a group of one: ok ({:.2} s)",
                t.elapsed().as_secs_f64()
            );
            true
        }
        Err(e) => {
            println!("nccl       all-reduce FAILED: {e:#}");
            false
        }
    }
}

/// The data-parallel check, on every rank of a group `be` has joined: an all-reduce, a
/// reduce-scatter and an all-gather of integers (exact in f32, so every rank can check the
/// sums), then the bus bandwidth of an all-reduce of 256 MiB (NCCL's definition: bytes x
/// 2(n-1)/n / time). Rank 0 prints; false on any failure.
pub fn group_check(be: &CudaBackend<half::bf16>) -> Result<bool> {
    let (rank, n) = crate::backend::Backend::group(be);
    let gpus = if n == 1 {
        "1 GPU".to_string()
    } else {
        format!("{n} GPUs")
    };
    let say = |s: String| {
        if rank == 0 {
            println!("{s}");
        }
    };
    let len = 1000 * n + 7 - (7 % n);
    let mine: Vec<f32> = (0..len).map(|i| ((i % 97) * (rank + 1)) as f32).collect();
    let want: Vec<f32> = (0..len)
        .map(|i| ((i % 97) * n * (n + 1) / 2) as f32)
        .collect();
    let mut ok = true;
    let mut dev = be.rt.upload(&mine, || "the group check's buffer".into())?;
    be.all_reduce_f32(&mut dev)?;
    let got = be.rt.stream.clone_dtoh(&dev)?;
    ok &= got == want;
    say(format!(
        "nccl       all-reduce over {gpus}: {}",
        if got == want { "ok" } else { "WRONG SUMS" }
    ));
    let src = be.rt.upload(&mine, || "the group check's buffer".into())?;
    let mut part = be.rt.upload(&vec![0f32; len / n], || "a shard".into())?;
    be.reduce_scatter_f32(&src, &mut part)?;
    let got = be.rt.stream.clone_dtoh(&part)?;
    let right = got[..] == want[rank * len / n..(rank + 1) * len / n];
    let mut all = be
        .rt
        .upload(&vec![0f32; len], || "the gathered buffer".into())?;
    be.all_gather_f32(&part, &mut all)?;
    let gathered = be.rt.stream.clone_dtoh(&all)?;
    let mut flags = [(!right) as u8 as f64, (gathered != want) as u8 as f64];
    crate::backend::Backend::all_reduce_host(be, &mut flags)?;
    ok &= flags == [0.0, 0.0];
    say(format!(
        "nccl       reduce-scatter and all-gather over {gpus}: {}",
        if flags == [0.0, 0.0] { "ok" } else { "WRONG" }
    ));
    let big = 64 << 20; // floats: 256 MiB
    let mut buf = be
        .rt
        .upload(&vec![1f32; big], || "the bandwidth buffer".into())?;
    be.all_reduce_f32(&mut buf)?; // warm-up
    be.rt.stream.synchronize()?;
    let t = Instant::now();
    let reps = 5;
    for _ in 0..reps {
        be.all_reduce_f32(&mut buf)?;
    }
    be.rt.stream.synchronize()?;
    let s = t.elapsed().as_secs_f64() / reps as f64;
    let bytes = (big * 4) as f64;
    say(format!(
        "nccl       all-reduce of 256 MiB over {gpus}: {:.2} ms, bus bandwidth {:.1} GB/s",
        s * 1e3,
        bytes * 2.0 * (n as f64 - 1.0) / n as f64 / s / 1e9
    ));
    Ok(ok)
}
