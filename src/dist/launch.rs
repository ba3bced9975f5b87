//! `train --gpus 0,1,2,3`: one worker process per GPU of this node, each the same program with
//! the same arguments and the launch environment of [`super::Dist`] (`RANK`, `WORLD_SIZE`,
//! `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`), its GPU given alone through
//! `CUDA_VISIBLE_DEVICES`.
//!
//! The launcher supervises: rank 0's output goes to this terminal (progress bar, summary), the
//! other ranks' standard error is kept (its last lines); when a worker fails or dies, the
//! others are stopped and the error names the rank, its GPU, how it ended and those lines.
//! Workers run in their own process group, so a Ctrl-C reaches them once, forwarded by the
//! launcher: they agree to stop after the current step and rank 0 saves a checkpoint (a second
//! Ctrl-C is forwarded too and ends them at once). A worker also ends when the launcher dies.

use anyhow::{bail, Context, Result};
use std::collections::VecDeque;
use std::ffi::OsString;
use std::io::BufRead;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Set in the environment of the workers the launcher starts (their `--gpus` is the
/// launcher's, already acted on).
pub const WORKER_ENV: &str = "CAFT_LAUNCHED_WORKER";

/// Lines of a worker's standard error kept for the failure message.
const TAIL_LINES: usize = 20;

/// How long the other workers may run on after rank 0 has ended without them.
const AFTER_RANK0: Duration = Duration::from_secs(120);

/// How long a worker asked to stop (SIGTERM) has before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// Whether this process is a worker started by [`run`].
pub fn is_worker() -> bool {
    std::env::var_os(WORKER_ENV).is_some()
}

/// What [`run`] starts.
pub struct Launch {
    /// The program (this executable) and its arguments, given to every worker unchanged.
    pub program: std::path::PathBuf,
    pub args: Vec<OsString>,
    /// The GPUs, by the numbers this process sees; worker `r` gets `gpus[r]`.
    pub gpus: Vec<usize>,
    /// More environment for every worker (e.g. a loader path holding libnccl).
    pub env: Vec<(String, OsString)>,
}

/// How the run ended when no worker failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ended {
    /// Every worker exited with status 0.
    Completed,
    /// The workers stopped early (status 1: `--stop-after`, Ctrl-C); a checkpoint was saved.
    Stopped,
}

struct Worker {
    rank: usize,
    gpu: usize,
    child: Child,
    status: Option<ExitStatus>,
    tail: Arc<Mutex<VecDeque<String>>>,
}

/// The device string a worker's `CUDA_VISIBLE_DEVICES` gets for GPU `gpu` of this process's
/// view: the `gpu`-th entry of this process's own `CUDA_VISIBLE_DEVICES` when it has one.
fn visible_device(gpu: usize, ours: Option<&str>) -> String {
    match ours.map(|v| v.split(',').map(str::trim).collect::<Vec<_>>()) {
        Some(list) if gpu < list.len() && !list[gpu].is_empty() => list[gpu].to_string(),
        _ => gpu.to_string(),
    }
}

/// A free TCP port on this host for rank 0 to listen on.
fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind(("127.0.0.1", 0))
        .context("finding a free TCP port for the ranks' rendezvous")?;
    Ok(l.local_addr()?.port())
}

/// Describe how a worker ended, for messages.
fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exited with status {c}"),
        (None, Some(s)) => format!("was killed by signal {s}{}", signal_name(s)),
        _ => format!("ended ({status})"),
    }
}

fn signal_name(s: i32) -> &'static str {
    match s {
        libc::SIGKILL => " (SIGKILL: out of host memory, or killed)",
        libc::SIGSEGV => " (SIGSEGV)",
        libc::SIGABRT => " (SIGABRT)",
        libc::SIGTERM => " (SIGTERM)",
        libc::SIGINT => " (SIGINT)",
        libc::SIGBUS => " (SIGBUS)",
        _ => "",
    }
}

/// Send `sig` to a worker's process group (each worker leads its own).
fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) with a process-group id of a child this process started; no memory is
    // touched. A group that is already gone makes it fail with ESRCH, which is ignored.
    unsafe {
        libc::kill(-(pid as i32), sig);
    }
}

/// Start the workers and supervise them until all have ended. `Err` when one failed (after
/// stopping the others), naming it.
pub fn run(l: &Launch) -> Result<Ended> {
    let size = l.gpus.len();
    if size == 0 {
        bail!("--gpus names no GPU");
    }
    let port = free_port()?;
    let ours = std::env::var("CUDA_VISIBLE_DEVICES").ok();
    let pids: Arc<Mutex<Vec<u32>>> = Arc::new(Mutex::new(Vec::new()));
    install_forwarding(pids.clone());
    let mut workers: Vec<Worker> = Vec::with_capacity(size);
    for (rank, &gpu) in l.gpus.iter().enumerate() {
        let mut cmd = Command::new(&l.program);
        cmd.args(&l.args)
            .envs(l.env.iter().map(|(k, v)| (k, v)))
            .env(WORKER_ENV, "1")
            .env("RANK", rank.to_string())
            .env("WORLD_SIZE", size.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("LOCAL_WORLD_SIZE", size.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string())
            .env("CUDA_VISIBLE_DEVICES", visible_device(gpu, ours.as_deref()))
            .stdin(Stdio::null())
            .process_group(0);
        if rank == 0 {
            cmd.stdout(Stdio::inherit()).stderr(Stdio::inherit());
        } else {
            cmd.stdout(Stdio::null()).stderr(Stdio::piped());
        }
        // SAFETY: the closure runs in the child between fork and exec and only calls prctl(2),
        // which is async-signal-safe; it allocates nothing.
        unsafe {
            cmd.pre_exec(|| {
                // The worker gets SIGTERM when the launcher dies, instead of training on alone.
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                stop_all(&mut workers);
                return Err(e).with_context(|| {
                    format!(
                        "starting the worker of rank {rank} ({})",
                        l.program.display()
                    )
                });
            }
        };
        let tail = Arc::new(Mutex::new(VecDeque::new()));
        if let Some(err) = child.stderr.take() {
            let tail = tail.clone();
            std::thread::spawn(move || {
                for line in std::io::BufReader::new(err).lines() {
                    let Ok(line) = line else { break };
                    let mut t = tail.lock().unwrap_or_else(|e| e.into_inner());
                    if t.len() == TAIL_LINES {
                        t.pop_front();
                    }
                    t.push_back(line);
                }
            });
        }
        pids.lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(child.id());
        workers.push(Worker {
            rank,
            gpu,
            child,
            status: None,
            tail,
        });
    }
    supervise(&mut workers)
}

/// Wait for every worker; on the first failure stop the rest and report it.
fn supervise(workers: &mut [Worker]) -> Result<Ended> {
    let mut rank0_done: Option<Instant> = None;
    loop {
        let mut failed = Vec::new();
        for w in workers.iter_mut().filter(|w| w.status.is_none()) {
            if let Some(st) = w.child.try_wait().context("waiting for a worker")? {
                w.status = Some(st);
                if w.rank == 0 {
                    rank0_done = Some(Instant::now());
                }
                if !matches!(st.code(), Some(0) | Some(1)) {
                    failed.push(w.rank);
                }
            }
        }
        if !failed.is_empty() {
            // A worker that died takes the others down with it (they fail in the next
            // collective): name the one killed by a signal, else the lowest rank.
            let first = failed
                .iter()
                .copied()
                .find(|&r| workers[r].status.is_some_and(|s| s.signal().is_some()))
                .unwrap_or(failed[0]);
            stop_all(workers);
            return Err(failure(&workers[first], workers.len()));
        }
        if workers.iter().all(|w| w.status.is_some()) {
            let all_zero = workers
                .iter()
                .all(|w| w.status.is_some_and(|s| s.success()));
            return Ok(if all_zero {
                Ended::Completed
            } else {
                Ended::Stopped
            });
        }
        if rank0_done.is_some_and(|t| t.elapsed() > AFTER_RANK0) {
            let stuck: Vec<String> = workers
                .iter()
                .filter(|w| w.status.is_none())
                .map(|w| w.rank.to_string())
                .collect();
            stop_all(workers);
            bail!(
                "rank 0 ended {} s ago, but rank(s) {} did not: stopped them",
                AFTER_RANK0.as_secs(),
                stuck.join(", ")
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The error for a failed worker: who, how it ended, its last lines of standard error.
fn failure(w: &Worker, size: usize) -> anyhow::Error {
    let how = w.status.map(describe).unwrap_or_default();
    let tail = w.tail.lock().unwrap_or_else(|e| e.into_inner());
    let lines = if w.rank == 0 {
        "its output is above".to_string()
    } else if tail.is_empty() {
        "it wrote nothing to standard error".to_string()
    } else {
        format!(
            "its last lines of standard error:\n{}",
            tail.iter()
                .map(|l| format!("    {l}"))
                .collect::<Vec<_>>()
                .join("\n")
        )
    };
    anyhow::anyhow!(
        "rank {} of {size} (GPU {}) {how}; the other workers were stopped; {lines}",
        w.rank,
        w.gpu
    )
}

/// Ask every running worker to stop (SIGTERM), then kill what is left after a grace period.
fn stop_all(workers: &mut [Worker]) {
    for w in workers.iter().filter(|w| w.status.is_none()) {
        signal(w.child.id(), libc::SIGTERM);
    }
    let t = Instant::now();
    while t.elapsed() < STOP_GRACE {
        let mut running = false;
        for w in workers.iter_mut().filter(|w| w.status.is_none()) {
            match w.child.try_wait() {
                Ok(Some(st)) => w.status = Some(st),
                _ => running = true,
            }
        }
        if !running {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    for w in workers.iter_mut().filter(|w| w.status.is_none()) {
        signal(w.child.id(), libc::SIGKILL);
        w.status = w.child.wait().ok();
    }
}

/// Ctrl-C in the launcher goes on to every worker (each is in its own process group, so the
/// terminal's SIGINT does not reach them directly).
fn install_forwarding(pids: Arc<Mutex<Vec<u32>>>) {
    let r = ctrlc::set_handler(move || {
        eprintln!(
            "\ninterrupt: the workers save a checkpoint after this step (Ctrl-C again to quit now)"
        );
        for &pid in pids.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            signal(pid, libc::SIGINT);
        }
    });
    if let Err(e) = r {
        eprintln!("note: Ctrl-C will not reach the workers ({e})");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_worker_sees_its_gpu_through_the_launchers_own_view() {
        assert_eq!(visible_device(2, None), "2");
        assert_eq!(visible_device(1, Some("4,6, 7")), "6");
        assert_eq!(visible_device(2, Some("4,6, 7")), "7");
        assert_eq!(visible_device(5, Some("4")), "5");
    }

    #[test]
    fn endings_are_described_for_people() {
        let code = ExitStatus::from_raw(2 << 8);
        assert_eq!(describe(code), "exited with status 2");
        let killed = ExitStatus::from_raw(libc::SIGKILL);
        assert!(describe(killed).starts_with("was killed by signal 9 (SIGKILL"));
    }
}
