//! NCCL collectives between processes on the emulated GPU (tests/cuda_emulated/gpu.rs, with
//! `fake_libnccl.cpp` standing in for libnccl.so), through cudarc's `nccl` API as data-parallel
//! training will use it: one process per rank, rank 0 makes the unique id, every rank joins
//! with `Comm::from_rank`.
//!
//! Why: CI has no GPU and no libnccl, and a data-parallel step is only right when every rank
//! ends with the same bits: all-reduced gradients that differ in one ulp between ranks let the
//! replicas drift apart. Each test here starts N processes of this test binary
//! ([`rank_worker`], with the emulated GPU first on `LD_LIBRARY_PATH`), which exchange the id
//! through a file of a scratch folder, run a scenario and write their results there.
//!
//! `collectives_on_{1,2,3}_ranks`: every collective the product needs, on fresh random data
//! seeded by rank and case (receive buffers filled with a sentinel first, so an element never
//! written shows): all-reduce of f32, f64, bf16 and f16, out of place and in place;
//! reduce and broadcast to the last rank (non-zero when there are several); reduce-scatter
//! and all-gather, also in place (ZeRO-1's form: the rank's own part of the buffer, through
//! cudarc's raw `result` calls on a second communicator, since the safe `Comm` cannot alias
//! them); the same collectives inside one `comm.group()`. Sizes: 1, odd (1001) and larger
//! than two of the fake's staging chunks, so a call runs in several steps with a short last
//! one. The parent checks every rank's result bit for bit against its own rank-order sum
//! (bf16 and f16 summed in f32, rounded once): tolerance 0, as the fake promises.
//!
//! Failures must be loud and quick: `a_rank_that_exits_fails_its_peer` (rank 1 exits before
//! an all-reduce; rank 0's call fails within seconds, not after the 120 s timeout, naming
//! rank 1, and again on the next call, and its process exits non-zero),
//! `ranks_calling_different_collectives_fail` (both ranks name both calls),
//! `a_rank_that_never_joins_times_out` (`$CAFT_EMU_NCCL_TIMEOUT_S` of 2 s; the rank is named).
//!
//! The tests can fail: `a_rank_dependent_summation_order_fails` builds the fake with each
//! rank starting its sum at its own contribution (what a naive ring would do) and requires
//! the bit-for-bit check of the 3-rank collectives to fail. Measured: rank 1's first
//! all-reduce (n = 1) already differs in the last bit.
//!
//! What it cannot check: real NCCL's summation order (rings and trees give other bits; the
//! product may rely on every rank agreeing and on a run repeating itself, not on these bits),
//! overlap with compute, NVLink or network speed. Nothing here runs against real NCCL yet.
//!
//! Without g++ or NVRTC the tests fail when `CI` is set and are skipped with a notice
//! otherwise ([`emulated_gpu::available`]). The emulated GPU is built with one kernel library
//! (optim.cu: the fake driver wants one; no kernel runs). Measured on 2 cores: the file's
//! tests take about 5 s together (the mutant's g++ build most of it), plus the emulated GPU's
//! build the first time.

#[path = "cuda_emulated/gpu.rs"]
mod emulated_gpu;
#[path = "cuda_emulated/harness.rs"]
mod harness;
mod support;

use caft_fast::util::rng::Rng;
use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtrMut, DeviceRepr};
use cudarc::nccl::{result, sys, Comm, Id, NcclType, ReduceOp};
use half::{bf16, f16};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use support::TempDir;

// ==== The cases ===============================================================================

/// Bytes one rank moves per step in the fake (`kChunkBytes` of fake_libnccl.cpp; held to it
/// by `the_sizes_exceed_the_fakes_chunk`).
const CHUNK_BYTES: usize = 1 << 19;
const ODD: usize = 1001;
/// Two f32 chunks and a bit: three steps for f32, five for f64, the last one short.
const BIG: usize = 2 * (CHUNK_BYTES / 4) + 7;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Op {
    AllReduce,
    Reduce,
    Broadcast,
    ReduceScatter,
    AllGather,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    OutOfPlace,
    InPlace,
    /// In place through cudarc's raw calls (reduce-scatter and all-gather).
    RawInPlace,
    /// Out of place, inside one `comm.group()` with the other `Group` cases (f32 only).
    Group,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Ty {
    F32,
    F64,
    Bf16,
    F16,
}

/// One collective call. `n` is NCCL's count: the elements of each rank's result for
/// reduce-scatter, of each rank's contribution for all-gather, of the buffer otherwise.
struct Case {
    name: &'static str,
    op: Op,
    ty: Ty,
    n: usize,
    mode: Mode,
}

const fn case(name: &'static str, op: Op, ty: Ty, n: usize, mode: Mode) -> Case {
    Case {
        name,
        op,
        ty,
        n,
        mode,
    }
}

use Mode::*;
use Op::*;
use Ty::*;

const CASES: &[Case] = &[
    case("all_reduce_f32_1", AllReduce, F32, 1, OutOfPlace),
    case("all_reduce_f32_odd", AllReduce, F32, ODD, OutOfPlace),
    case("all_reduce_f32_big", AllReduce, F32, BIG, OutOfPlace),
    case("all_reduce_f32_big_in_place", AllReduce, F32, BIG, InPlace),
    case("all_reduce_f64_1_in_place", AllReduce, F64, 1, InPlace),
    case("all_reduce_f64_odd", AllReduce, F64, ODD, OutOfPlace),
    case("all_reduce_f64_big_in_place", AllReduce, F64, BIG, InPlace),
    case("all_reduce_bf16_odd", AllReduce, Bf16, ODD, OutOfPlace),
    case("all_reduce_f16_odd_in_place", AllReduce, F16, ODD, InPlace),
    case("reduce_f32_odd", Reduce, F32, ODD, OutOfPlace),
    case("reduce_f64_big_in_place", Reduce, F64, BIG, InPlace),
    case("broadcast_f32_big", Broadcast, F32, BIG, OutOfPlace),
    case("broadcast_f64_odd_in_place", Broadcast, F64, ODD, InPlace),
    case("reduce_scatter_f32_1", ReduceScatter, F32, 1, OutOfPlace),
    case(
        "reduce_scatter_f32_big",
        ReduceScatter,
        F32,
        BIG,
        OutOfPlace,
    ),
    case(
        "reduce_scatter_bf16_odd",
        ReduceScatter,
        Bf16,
        ODD,
        OutOfPlace,
    ),
    case("all_gather_f32_odd", AllGather, F32, ODD, OutOfPlace),
    case("all_gather_f64_big", AllGather, F64, BIG, OutOfPlace),
    case(
        "reduce_scatter_f32_big_raw",
        ReduceScatter,
        F32,
        BIG,
        RawInPlace,
    ),
    case("all_gather_f32_big_raw", AllGather, F32, BIG, RawInPlace),
    case("group_all_reduce_f32_odd", AllReduce, F32, ODD, Group),
    case(
        "group_reduce_scatter_f32_odd",
        ReduceScatter,
        F32,
        ODD,
        Group,
    ),
    case("group_all_gather_f32_odd", AllGather, F32, ODD, Group),
    case("group_broadcast_f32_big", Broadcast, F32, BIG, Group),
];

/// The root of reduce and broadcast: the last rank (not rank 0, where a mix-up of "my rank"
/// and "the root" would go unseen).
fn root(world: usize) -> usize {
    world - 1
}

/// An element type of the cases: drawn at random, and summed as the fake sums.
trait Elem: NcclType + DeviceRepr + bytemuck::Pod + std::fmt::Debug {
    fn draw(rng: &mut Rng) -> Self;
    /// What a receive buffer holds before the call.
    fn sentinel() -> Self;
    /// `parts[0] + parts[1] + ...` in that order (bf16 and f16 in f32, rounded once).
    fn rank_order_sum(parts: &[Self]) -> Self;
}

impl Elem for f32 {
    fn draw(rng: &mut Rng) -> Self {
        rng.normal() as f32
    }
    fn sentinel() -> Self {
        -12345.0
    }
    fn rank_order_sum(parts: &[Self]) -> Self {
        parts[1..].iter().fold(parts[0], |acc, &x| acc + x)
    }
}

impl Elem for f64 {
    fn draw(rng: &mut Rng) -> Self {
        rng.normal()
    }
    fn sentinel() -> Self {
        -12345.0
    }
    fn rank_order_sum(parts: &[Self]) -> Self {
        parts[1..].iter().fold(parts[0], |acc, &x| acc + x)
    }
}

impl Elem for bf16 {
    fn draw(rng: &mut Rng) -> Self {
        bf16::from_f64(rng.normal())
    }
    fn sentinel() -> Self {
        bf16::from_f32(-12345.0)
    }
    fn rank_order_sum(parts: &[Self]) -> Self {
        bf16::from_f32(
            parts[1..]
                .iter()
                .fold(parts[0].to_f32(), |a, x| a + x.to_f32()),
        )
    }
}

impl Elem for f16 {
    fn draw(rng: &mut Rng) -> Self {
        f16::from_f64(rng.normal())
    }
    fn sentinel() -> Self {
        f16::from_f32(-12345.0)
    }
    fn rank_order_sum(parts: &[Self]) -> Self {
        f16::from_f32(
            parts[1..]
                .iter()
                .fold(parts[0].to_f32(), |a, x| a + x.to_f32()),
        )
    }
}

/// Rank `rank`'s contribution to `case`: fresh random values, different per case and rank.
fn input<T: Elem>(case: &Case, world: usize, rank: usize) -> Vec<T> {
    let len = if case.op == ReduceScatter {
        world * case.n
    } else {
        case.n
    };
    let seed = case.name.bytes().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100000001b3)
    });
    let mut rng = Rng::new(seed ^ (rank as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    (0..len).map(|_| T::draw(&mut rng)).collect()
}

/// Elements of rank `rank`'s result buffer.
fn result_len(case: &Case, world: usize) -> usize {
    if case.op == AllGather {
        world * case.n
    } else {
        case.n
    }
}

/// What rank `rank` must hold after `case`, None where it has no result (reduce off the root).
fn expected<T: Elem>(case: &Case, world: usize, rank: usize) -> Option<Vec<T>> {
    let inputs: Vec<Vec<T>> = (0..world).map(|q| input(case, world, q)).collect();
    let sum_at = |i: usize| T::rank_order_sum(&inputs.iter().map(|v| v[i]).collect::<Vec<T>>());
    let n = case.n;
    match case.op {
        AllReduce => Some((0..n).map(sum_at).collect()),
        Reduce => (rank == root(world)).then(|| (0..n).map(sum_at).collect()),
        Broadcast => Some(inputs[root(world)].clone()),
        ReduceScatter => Some((rank * n..(rank + 1) * n).map(sum_at).collect()),
        AllGather => Some(inputs.concat()),
    }
}

// ==== The ranks ===============================================================================

const RANK_ENV: &str = "CAFT_NCCL_TEST_RANK";
const WORLD_ENV: &str = "CAFT_NCCL_TEST_WORLD";
const DIR_ENV: &str = "CAFT_NCCL_TEST_DIR";
const SCENARIO_ENV: &str = "CAFT_NCCL_TEST_SCENARIO";

/// One rank of the tests below, in a process of its own; does nothing unless they started it.
#[test]
#[ignore = "one rank of the tests of this file, started by them"]
fn rank_worker() {
    let Some(rank) = std::env::var(RANK_ENV)
        .ok()
        .map(|v| v.parse::<usize>().unwrap())
    else {
        return;
    };
    let world: usize = std::env::var(WORLD_ENV).unwrap().parse().unwrap();
    let scratch = PathBuf::from(std::env::var_os(DIR_ENV).unwrap());
    let scenario = std::env::var(SCENARIO_ENV).unwrap();
    let ids = exchange_ids(&scratch, rank);
    let ctx = CudaContext::new(0).expect("a context on the emulated GPU");
    let stream = ctx.default_stream();
    let comm = match Comm::from_rank(stream.clone(), rank, world, ids[0]) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("rank {rank}: Comm::from_rank failed: {:?}", e.0);
            std::process::exit(1);
        }
    };
    match scenario.as_str() {
        "collectives" => collectives(&comm, &stream, ids[1], &scratch),
        "rank1_exits" => rank1_exits(&comm, &stream),
        "mismatch" => mismatch(&comm, &stream),
        _ => panic!("unknown scenario {scenario}"),
    }
}

/// Rank 0 makes two ids and writes them (atomically: a temporary name, then a rename); the
/// others wait for the file.
fn exchange_ids(scratch: &Path, rank: usize) -> [Id; 2] {
    let path = scratch.join("ids");
    if rank == 0 {
        let ids = [Id::new().unwrap(), Id::new().unwrap()];
        let bytes: Vec<u8> = ids
            .iter()
            .flat_map(|id| id.internal().map(|c| c as u8))
            .collect();
        let tmp = scratch.join("ids.tmp");
        std::fs::write(&tmp, bytes).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        return ids;
    }
    let start = Instant::now();
    let bytes = loop {
        if let Ok(b) = std::fs::read(&path) {
            break b;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "rank {rank}: no id from rank 0 in 60 s"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    let id = |k: usize| Id::uninit(std::array::from_fn(|i| bytes[128 * k + i] as _));
    [id(0), id(1)]
}

/// Every case; each rank writes `r<rank>-<case>.bin` (the result's bytes) where it has one.
fn collectives(comm: &Comm, stream: &Arc<CudaStream>, raw_id: Id, scratch: &Path) {
    let (world, rank) = (comm.world_size(), comm.rank());
    let save = |case: &Case, bytes: Option<Vec<u8>>| {
        if let Some(b) = bytes {
            std::fs::write(scratch.join(format!("r{rank}-{}.bin", case.name)), b).unwrap();
        }
    };
    for c in CASES
        .iter()
        .filter(|c| c.mode == OutOfPlace || c.mode == InPlace)
    {
        let out = match c.ty {
            F32 => run_case::<f32>(comm, stream, c),
            F64 => run_case::<f64>(comm, stream, c),
            Bf16 => run_case::<bf16>(comm, stream, c),
            F16 => run_case::<f16>(comm, stream, c),
        };
        save(c, out);
    }
    let group: Vec<&Case> = CASES.iter().filter(|c| c.mode == Group).collect();
    for (c, out) in group.iter().zip(run_group(comm, stream, &group)) {
        save(c, Some(out));
    }
    // A second communicator, owned raw: cudarc's safe `Comm` hides its handle.
    let mut raw: sys::ncclComm_t = std::ptr::null_mut();
    // SAFETY: `raw` is a valid place for the new communicator; the id is 128 plain bytes.
    unsafe {
        let id = sys::ncclUniqueId {
            internal: *raw_id.internal(),
        };
        result::comm_init_rank(&mut raw, world as i32, id, rank as i32).unwrap();
    }
    for c in CASES.iter().filter(|c| c.mode == RawInPlace) {
        save(c, Some(run_raw_in_place(raw, stream, c, world, rank)));
    }
    // SAFETY: `raw` came from comm_init_rank and is not used again.
    unsafe { result::comm_destroy(raw).unwrap() };
}

fn bytes<T: Elem>(v: &[T]) -> Vec<u8> {
    bytemuck::cast_slice(v).to_vec()
}

fn run_case<T: Elem>(comm: &Comm, stream: &Arc<CudaStream>, c: &Case) -> Option<Vec<u8>> {
    let (world, rank) = (comm.world_size(), comm.rank());
    let root = root(world);
    let sum = ReduceOp::Sum;
    let x = input::<T>(c, world, rank);
    let fresh = |v: &[T]| stream.clone_htod(v).unwrap();
    let mut recv = fresh(&vec![T::sentinel(); result_len(c, world)]);
    let out: Option<&CudaSlice<T>> = match (c.op, c.mode) {
        (AllReduce, OutOfPlace) => {
            comm.all_reduce(&fresh(&x), &mut recv, &sum).unwrap();
            Some(&recv)
        }
        (AllReduce, InPlace) => {
            recv = fresh(&x);
            comm.all_reduce_in_place(&mut recv, &sum).unwrap();
            Some(&recv)
        }
        (Reduce, OutOfPlace) => {
            let dst = (rank == root).then_some(&mut recv);
            comm.reduce(&fresh(&x), dst, &sum, root as i32).unwrap();
            (rank == root).then_some(&recv)
        }
        (Reduce, InPlace) => {
            recv = fresh(&x);
            comm.reduce_in_place(&mut recv, &sum, root as i32).unwrap();
            (rank == root).then_some(&recv)
        }
        (Broadcast, OutOfPlace) => {
            let send = fresh(&x);
            let src = (rank == root).then_some(&send);
            comm.broadcast(src, &mut recv, root as i32).unwrap();
            Some(&recv)
        }
        (Broadcast, InPlace) => {
            if rank == root {
                recv = fresh(&x);
            }
            comm.broadcast_in_place(&mut recv, root as i32).unwrap();
            Some(&recv)
        }
        (ReduceScatter, OutOfPlace) => {
            comm.reduce_scatter(&fresh(&x), &mut recv, &sum).unwrap();
            Some(&recv)
        }
        (AllGather, OutOfPlace) => {
            comm.all_gather(&fresh(&x), &mut recv).unwrap();
            Some(&recv)
        }
        other => panic!("{}: no such case {other:?}", c.name),
    };
    out.map(|b| bytes(&stream.clone_dtoh(b).unwrap()))
}

/// The `Group` cases (f32, out of place) inside one group.
fn run_group(comm: &Comm, stream: &Arc<CudaStream>, cases: &[&Case]) -> Vec<Vec<u8>> {
    let (world, rank) = (comm.world_size(), comm.rank());
    let root = root(world) as i32;
    let sends: Vec<CudaSlice<f32>> = cases
        .iter()
        .map(|c| stream.clone_htod(&input::<f32>(c, world, rank)).unwrap())
        .collect();
    let mut recvs: Vec<CudaSlice<f32>> = cases
        .iter()
        .map(|c| {
            stream
                .clone_htod(&vec![f32::sentinel(); result_len(c, world)])
                .unwrap()
        })
        .collect();
    {
        let views = sends.iter().zip(recvs.iter_mut());
        let views: Vec<_> = views.map(|(s, r)| (s.slice(..), r.slice_mut(..))).collect();
        let mut group = comm.group();
        for (c, (s, r)) in cases.iter().zip(views) {
            assert_eq!(c.ty, F32, "{}: group cases are f32", c.name);
            let sum = ReduceOp::Sum;
            match c.op {
                AllReduce => group.all_reduce(s, r, &sum),
                ReduceScatter => group.reduce_scatter(s, r, &sum),
                AllGather => group.all_gather(s, r),
                Broadcast => group.broadcast((rank == root as usize).then_some(s), r, root),
                Reduce => panic!("{}: no reduce in the group", c.name),
            }
            .unwrap();
        }
    } // ncclGroupEnd
    recvs
        .iter()
        .map(|r| bytes(&stream.clone_dtoh(r).unwrap()))
        .collect()
}

/// Reduce-scatter or all-gather in place (f32), as ZeRO-1 calls them: one buffer of `world`
/// parts, this rank's part the result (reduce-scatter) or the contribution (all-gather).
fn run_raw_in_place(
    comm: sys::ncclComm_t,
    stream: &Arc<CudaStream>,
    c: &Case,
    world: usize,
    rank: usize,
) -> Vec<u8> {
    assert_eq!(c.ty, F32, "{}: raw cases are f32", c.name);
    let n = c.n;
    let x = input::<f32>(c, world, rank);
    let mut buf = match c.op {
        ReduceScatter => stream.clone_htod(&x).unwrap(),
        AllGather => {
            let mut v = vec![f32::sentinel(); world * n];
            v[rank * n..(rank + 1) * n].copy_from_slice(&x);
            stream.clone_htod(&v).unwrap()
        }
        other => panic!("{}: no raw {other:?}", c.name),
    };
    {
        let (p, _sync) = buf.device_ptr_mut(stream);
        let mine = p + (rank * n * 4) as u64;
        let st = stream.cu_stream() as sys::cudaStream_t;
        let f32_type = sys::ncclDataType_t::ncclFloat32;
        // SAFETY: `buf` holds world·n f32 and outlives the (synchronous on this fake, and
        // stream-ordered on a GPU) call; `mine` is its rank-th part of n elements.
        unsafe {
            match c.op {
                ReduceScatter => {
                    let sum = sys::ncclRedOp_t::ncclSum;
                    result::reduce_scatter(p as _, mine as _, n, f32_type, sum, comm, st)
                }
                _ => result::all_gather(mine as _, p as _, n, f32_type, comm, st),
            }
            .unwrap();
        }
    }
    let all = stream.clone_dtoh(&buf).unwrap();
    match c.op {
        ReduceScatter => bytes(&all[rank * n..(rank + 1) * n]),
        _ => bytes(&all),
    }
}

fn status(r: &Result<result::NcclStatus, result::NcclError>) -> String {
    match r {
        Ok(_) => "Ok".into(),
        Err(e) => format!("Err({:?})", e.0),
    }
}

/// Both ranks all-reduce once; then rank 1 exits, and rank 0 all-reduces twice: both calls
/// must fail (exit 1), else a panic (exit 101).
fn rank1_exits(comm: &Comm, stream: &Arc<CudaStream>) {
    let mut buf = stream.clone_htod(&[1.5f32; 100]).unwrap();
    comm.all_reduce_in_place(&mut buf, &ReduceOp::Sum).unwrap();
    if comm.rank() == 1 {
        eprintln!("rank 1: exiting before the second all-reduce");
        std::process::exit(3);
    }
    let first = comm.all_reduce_in_place(&mut buf, &ReduceOp::Sum);
    let again = comm.all_reduce_in_place(&mut buf, &ReduceOp::Sum);
    eprintln!(
        "rank 0 after rank 1 exited: {}, then {}",
        status(&first),
        status(&again)
    );
    if first.is_err() && again.is_err() {
        std::process::exit(1);
    }
    panic!("rank 0's all-reduce went through without rank 1");
}

/// Rank 0 all-reduces 5 elements, rank 1 all-gathers 5: both must fail (exit 1).
fn mismatch(comm: &Comm, stream: &Arc<CudaStream>) {
    let send = stream.clone_htod(&[2.5f32; 5]).unwrap();
    let mut recv = stream.clone_htod(&[0.5f32; 10]).unwrap();
    let r = if comm.rank() == 0 {
        comm.all_reduce(&send, &mut recv.slice_mut(..5), &ReduceOp::Sum)
    } else {
        comm.all_gather(&send, &mut recv)
    };
    eprintln!("rank {}: {}", comm.rank(), status(&r));
    std::process::exit(if r.is_err() { 1 } else { 0 });
}

// ==== The tests ===============================================================================

/// The emulated GPU with the optim.cu kernel library only (the fake driver wants one; no
/// kernel runs here), or None (after a notice; a failure under CI) where it cannot be built.
fn gpu_dir(test: &str) -> Option<PathBuf> {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    if !emulated_gpu::available(test) {
        return None;
    }
    Some(
        DIR.get_or_init(|| {
            emulated_gpu::build_edited("-nccl", &["optim"], &|_, t| t)
                .unwrap_or_else(|e| panic!("building the emulated GPU: {e}"))
        })
        .clone(),
    )
}

/// One rank's process: its output and how long it ran.
struct Ran {
    rank: usize,
    out: std::process::Output,
    took: Duration,
}

impl Ran {
    fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.out.stderr).into_owned()
    }
    fn text(&self) -> String {
        format!(
            "rank {} ({}, {:.1} s):\n{}{}",
            self.rank,
            self.out.status,
            self.took.as_secs_f64(),
            String::from_utf8_lossy(&self.out.stdout),
            self.stderr()
        )
    }
}

/// Start `ranks` of a `world` at once, each running `scenario` in this test binary on the
/// emulated GPU in `gpu` (behind `lib_first`, a folder of replacement libraries, when given),
/// with `env` added; wait for all.
fn launch(
    gpu: &Path,
    lib_first: Option<&Path>,
    scratch: &Path,
    (scenario, world, ranks): (&str, usize, &[usize]),
    env: &[(&str, &str)],
) -> Vec<Ran> {
    let exe = std::env::current_exe().expect("the test executable");
    std::thread::scope(|s| {
        let handles: Vec<_> = ranks
            .iter()
            .map(|&rank| {
                let mut cmd = emulated_gpu::command_on(gpu, &exe);
                if let Some(first) = lib_first {
                    let mut ld = first.as_os_str().to_owned();
                    ld.push(":");
                    ld.push(gpu);
                    if let Some(old) = std::env::var_os("LD_LIBRARY_PATH") {
                        ld.push(":");
                        ld.push(old);
                    }
                    cmd.env("LD_LIBRARY_PATH", ld);
                }
                cmd.args(["rank_worker", "--exact", "--ignored", "--nocapture"])
                    .env(RANK_ENV, rank.to_string())
                    .env(WORLD_ENV, world.to_string())
                    .env(DIR_ENV, scratch)
                    .env(SCENARIO_ENV, scenario)
                    .envs(env.iter().copied());
                s.spawn(move || {
                    let start = Instant::now();
                    let out = emulated_gpu::output_with_timeout(&mut cmd);
                    Ran {
                        rank,
                        out,
                        took: start.elapsed(),
                    }
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// Every rank's saved result of every case against [`expected`], bit for bit.
fn check_collectives(scratch: &Path, world: usize) -> Result<(), String> {
    for c in CASES {
        for rank in 0..world {
            let want = match c.ty {
                F32 => expected::<f32>(c, world, rank).map(|v| bytes(&v)),
                F64 => expected::<f64>(c, world, rank).map(|v| bytes(&v)),
                Bf16 => expected::<bf16>(c, world, rank).map(|v| bytes(&v)),
                F16 => expected::<f16>(c, world, rank).map(|v| bytes(&v)),
            };
            let got = std::fs::read(scratch.join(format!("r{rank}-{}.bin", c.name))).ok();
            let (want, got) = match (want, got) {
                (None, None) => continue,
                (Some(w), Some(g)) => (w, g),
                (w, _) => {
                    let what = if w.is_some() {
                        "no result"
                    } else {
                        "a result it should not have"
                    };
                    return Err(format!("{} ranks, rank {rank}, {}: {what}", world, c.name));
                }
            };
            if got.len() != want.len() {
                return Err(format!(
                    "{world} ranks, rank {rank}, {}: {} bytes, expected {}",
                    c.name,
                    got.len(),
                    want.len()
                ));
            }
            let size = match c.ty {
                F32 => 4,
                F64 => 8,
                Bf16 | F16 => 2,
            };
            if let Some(i) = (0..want.len() / size)
                .find(|&i| got[i * size..][..size] != want[i * size..][..size])
            {
                let hex = |b: &[u8]| {
                    b.iter()
                        .rev()
                        .map(|x| format!("{x:02x}"))
                        .collect::<String>()
                };
                return Err(format!(
                    "{world} ranks, rank {rank}, {} (n = {}): element {i} is 0x{}, the rank-order \
                     sum is 0x{} ({} of {} elements differ)",
                    c.name,
                    c.n,
                    hex(&got[i * size..][..size]),
                    hex(&want[i * size..][..size]),
                    (0..want.len() / size)
                        .filter(|&i| got[i * size..][..size] != want[i * size..][..size])
                        .count(),
                    want.len() / size
                ));
            }
        }
    }
    Ok(())
}

/// Run the collectives on `world` ranks (with the fake in `lib_first` when given) and check
/// them; the ranks' outputs on a failure to run.
fn collectives_on(gpu: &Path, lib_first: Option<&Path>, world: usize) -> Result<(), String> {
    let scratch = TempDir::new(&format!("nccl-{world}"));
    let ranks: Vec<usize> = (0..world).collect();
    let start = Instant::now();
    let runs = launch(
        gpu,
        lib_first,
        &scratch,
        ("collectives", world, &ranks),
        &[],
    );
    for r in &runs {
        assert!(r.out.status.success(), "{}", r.text());
    }
    println!(
        "{world} ranks: {:.1} s ({})",
        start.elapsed().as_secs_f64(),
        runs.iter()
            .map(|r| format!("rank {}: {:.1} s", r.rank, r.took.as_secs_f64()))
            .collect::<Vec<_>>()
            .join(", ")
    );
    check_collectives(&scratch, world)
}

fn assert_collectives(test: &str, world: usize) {
    let Some(gpu) = gpu_dir(test) else { return };
    if let Err(e) = collectives_on(&gpu, None, world) {
        panic!("{e}");
    }
}

#[test]
fn collectives_on_1_rank() {
    assert_collectives("collectives_on_1_rank", 1);
}

#[test]
fn collectives_on_2_ranks() {
    assert_collectives("collectives_on_2_ranks", 2);
}

#[test]
fn collectives_on_3_ranks() {
    assert_collectives("collectives_on_3_ranks", 3);
}

#[test]
fn the_sizes_exceed_the_fakes_chunk() {
    let src = std::fs::read_to_string(harness::shim_dir().join("fake_libnccl.cpp")).unwrap();
    assert!(
        src.contains("constexpr std::size_t kChunkBytes = std::size_t(1) << 19;"),
        "fake_libnccl.cpp's kChunkBytes changed: update CHUNK_BYTES here"
    );
    const { assert!(BIG * 4 > 2 * CHUNK_BYTES && ODD % 2 == 1) };
}

#[test]
fn a_rank_that_exits_fails_its_peer() {
    let test = "a_rank_that_exits_fails_its_peer";
    let Some(gpu) = gpu_dir(test) else { return };
    let scratch = TempDir::new("nccl-exit");
    let runs = launch(&gpu, None, &scratch, ("rank1_exits", 2, &[0, 1]), &[]);
    let (r0, r1) = (&runs[0], &runs[1]);
    assert_eq!(r1.out.status.code(), Some(3), "{}", r1.text());
    assert_eq!(r0.out.status.code(), Some(1), "{}", r0.text());
    let err = r0.stderr();
    for needle in [
        "fake libnccl: rank 0: rank 1 (pid ",
        ") exited during ncclAllReduce",
        "rank 0 after rank 1 exited: Err(ncclRemoteError), then Err(ncclRemoteError)",
    ] {
        assert!(err.contains(needle), "no `{needle}` in\n{}", r0.text());
    }
    // Found by the liveness check (every 10 ms), not the 120 s timeout.
    assert!(!err.contains("did not arrive"), "{}", r0.text());
    assert!(r0.took < Duration::from_secs(30), "{}", r0.text());
    println!("{}", r0.text());
}

#[test]
fn ranks_calling_different_collectives_fail() {
    let test = "ranks_calling_different_collectives_fail";
    let Some(gpu) = gpu_dir(test) else { return };
    let scratch = TempDir::new("nccl-mismatch");
    let runs = launch(&gpu, None, &scratch, ("mismatch", 2, &[0, 1]), &[]);
    for r in &runs {
        assert_eq!(r.out.status.code(), Some(1), "{}", r.text());
        for needle in [
            "collective #1 differs between ranks",
            "called ncclAllReduce(count 5, float32, sum)",
            "called ncclAllGather(count 5, float32)",
            "Err(ncclInvalidUsage)",
        ] {
            assert!(
                r.stderr().contains(needle),
                "no `{needle}` in\n{}",
                r.text()
            );
        }
        println!("{}", r.text());
    }
}

#[test]
fn a_rank_that_never_joins_times_out() {
    let test = "a_rank_that_never_joins_times_out";
    let Some(gpu) = gpu_dir(test) else { return };
    let scratch = TempDir::new("nccl-timeout");
    let env = [("CAFT_EMU_NCCL_TIMEOUT_S", "2")];
    let runs = launch(&gpu, None, &scratch, ("collectives", 3, &[0, 1]), &env);
    for r in &runs {
        assert_eq!(r.out.status.code(), Some(1), "{}", r.text());
        let needle = "ncclCommInitRank: rank 2 never joined within 2 s";
        assert!(
            r.stderr().contains(needle),
            "no `{needle}` in\n{}",
            r.text()
        );
        assert!(r
            .stderr()
            .contains("Comm::from_rank failed: ncclSystemError"));
        assert!(r.took < Duration::from_secs(20), "{}", r.text());
        println!("{}", r.text());
    }
}

/// fake_libnccl.cpp with each rank's sum starting at its own contribution: the 3-rank
/// collectives must fail the bit-for-bit check.
#[test]
fn a_rank_dependent_summation_order_fails() {
    let test = "a_rank_dependent_summation_order_fails";
    let Some(gpu) = gpu_dir(test) else { return };
    let cxx = harness::compiler().expect("a C++ compiler");
    let scratch = TempDir::new("nccl-mutant");
    let src = std::fs::read_to_string(harness::shim_dir().join("fake_libnccl.cpp")).unwrap();
    let from = "parts[q] = stage(c, q, half) + off;";
    assert!(
        src.contains(from),
        "fake_libnccl.cpp no longer contains `{from}`: update the mutation"
    );
    let mutant = src.replacen(
        from,
        "parts[q] = stage(c, (q + c.rank) % c.nranks, half) + off;",
        1,
    );
    let (file, lib) = (scratch.join("fake_libnccl.cpp"), scratch.join("lib"));
    std::fs::write(&file, mutant).unwrap();
    std::fs::create_dir_all(&lib).unwrap();
    let flags: Vec<String> = ["-shared", "-fPIC", "-lrt"].map(String::from).to_vec();
    harness::compile_cpp(
        &cxx,
        &scratch,
        &[file],
        &lib.join("libnccl.so"),
        &flags,
        "the mutant",
    )
    .unwrap();
    let err = collectives_on(&gpu, Some(&lib), 3).expect_err("the mutant passed");
    println!("the mutant fails: {err}");
    assert!(err.contains("rank 1") || err.contains("rank 2"), "{err}");
}
