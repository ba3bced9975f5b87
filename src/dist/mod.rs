//! Data parallelism: one process (a rank) per GPU, all training one model on one global data
//! order. Every optimizer step's examples are split across the ranks ([`balance`]), each rank
//! runs the forward and backward of its share, the gradients are summed across ranks (NCCL
//! all-reduce, `Backend::all_reduce_f32`) and every rank applies the same AdamW update, so the
//! replicas stay identical and N ranks make the update one rank makes with N times the
//! accumulation.
//!
//! How the processes find each other follows the convention torchrun and SLURM scripts already
//! use: `RANK`, `WORLD_SIZE`, `LOCAL_RANK` (the rank's GPU on its node), `MASTER_ADDR` and
//! `MASTER_PORT` (where rank 0 listens). [`World::from_env`] reads them; [`rendezvous`] hands
//! NCCL's unique id from rank 0 to the others over TCP; [`launch`] is `train --gpus`, which
//! starts and supervises one worker per GPU of this node with those variables set.

pub mod launch;
pub mod rendezvous;

use crate::backend::Backend;
use anyhow::{bail, Context, Result};

/// This process's place in a data-parallel run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct World {
    /// 0 ..= size - 1; rank 0 writes every output.
    pub rank: usize,
    /// Number of ranks.
    pub size: usize,
    /// The rank's place on its node: its GPU when the node's GPUs are all visible.
    pub local_rank: usize,
}

/// Where rank 0 listens for the other ranks (`MASTER_ADDR`, `MASTER_PORT`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Master {
    pub addr: String,
    pub port: u16,
}

/// The environment of one rank: its place and, with more than one rank, rank 0's address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dist {
    pub world: World,
    pub master: Option<Master>,
}

impl World {
    /// A run of one process.
    pub const SINGLE: World = World {
        rank: 0,
        size: 1,
        local_rank: 0,
    };

    /// Whether this rank writes the outputs, metrics and progress.
    pub fn is_main(&self) -> bool {
        self.rank == 0
    }
}

impl Default for Dist {
    /// One process alone.
    fn default() -> Dist {
        Dist {
            world: World::SINGLE,
            master: None,
        }
    }
}

impl Dist {
    /// The launch environment of this process (see [`Dist::from_vars`]).
    pub fn from_env() -> Result<Dist> {
        Dist::from_vars(|k| std::env::var(k).ok())
    }

    /// The launch environment read through `get`: none of `RANK`/`WORLD_SIZE` set means a run
    /// of one process; otherwise `RANK`, `WORLD_SIZE` and, with more than one rank,
    /// `LOCAL_RANK`, `MASTER_ADDR` and `MASTER_PORT` must be set and consistent
    /// (`LOCAL_WORLD_SIZE`, when set, bounds `LOCAL_RANK`).
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Dist> {
        let num = |k: &str| -> Result<Option<usize>> {
            match get(k).filter(|v| !v.trim().is_empty()) {
                None => Ok(None),
                Some(v) => v.trim().parse().map(Some).with_context(|| {
                    format!("environment variable {k}={v:?} is not a non-negative integer")
                }),
            }
        };
        let (rank, size) = match (num("RANK")?, num("WORLD_SIZE")?) {
            (None, None) => {
                return Ok(Dist {
                    world: World::SINGLE,
                    master: None,
                })
            }
            (Some(_), None) => bail!("RANK is set but WORLD_SIZE is not: set both, or neither"),
            (None, Some(_)) => bail!("WORLD_SIZE is set but RANK is not: set both, or neither"),
            (Some(r), Some(s)) => (r, s),
        };
        if size == 0 {
            bail!("WORLD_SIZE=0: a run needs at least one rank");
        }
        if rank >= size {
            bail!(
                "RANK={rank} is not below WORLD_SIZE={size} (ranks are 0 ..= {})",
                size - 1
            );
        }
        if size == 1 {
            return Ok(Dist {
                world: World::SINGLE,
                master: None,
            });
        }
        let Some(local_rank) = num("LOCAL_RANK")? else {
            bail!(
                "RANK={rank} of WORLD_SIZE={size} needs LOCAL_RANK (this rank's place on its \
                 node, which picks its GPU); torchrun sets it, a SLURM script can export \
                 LOCAL_RANK=$SLURM_LOCALID"
            );
        };
        if local_rank > rank {
            bail!(
                "LOCAL_RANK={local_rank} is above RANK={rank}: a node's ranks count from the \
                 global rank of its first one"
            );
        }
        if let Some(local_size) = num("LOCAL_WORLD_SIZE")? {
            if local_rank >= local_size {
                bail!("LOCAL_RANK={local_rank} is not below LOCAL_WORLD_SIZE={local_size}");
            }
        }
        let addr = get("MASTER_ADDR").filter(|v| !v.trim().is_empty());
        let Some(addr) = addr else {
            bail!("WORLD_SIZE={size} needs MASTER_ADDR (the host of rank 0) and MASTER_PORT");
        };
        let Some(port) = num("MASTER_PORT")? else {
            bail!("WORLD_SIZE={size} needs MASTER_PORT (a free TCP port on {addr})");
        };
        let port = u16::try_from(port)
            .ok()
            .filter(|&p| p > 0)
            .with_context(|| format!("MASTER_PORT={port} is not a TCP port (1-65535)"))?;
        Ok(Dist {
            world: World {
                rank,
                size,
                local_rank,
            },
            master: Some(Master {
                addr: addr.trim().to_string(),
                port,
            }),
        })
    }
}

/// Join the data-parallel group of `dist` on `be`: rank 0 makes the NCCL id, the rendezvous
/// hands it to the others (checking they all bring the same `fingerprint` of what they run),
/// every rank joins.
/// Nothing for a process alone.
pub fn join<B: Backend>(be: &B, dist: &Dist, fingerprint: u64) -> Result<()> {
    let w = dist.world;
    if w.size == 1 {
        return Ok(());
    }
    let master = dist
        .master
        .as_ref()
        .context("a group needs MASTER_ADDR and MASTER_PORT")?;
    let id = if w.is_main() {
        Some(be.group_id()?)
    } else {
        None
    };
    let id = rendezvous::exchange(&w, master, id, fingerprint, rendezvous::timeout())?;
    be.join_group(w.rank, w.size, &id)
        .with_context(|| format!("rank {} joining the group of {}", w.rank, w.size))
}

/// "host device" of every rank, gathered from all (a collective call: every rank makes it).
/// Alone: the backend's name.
pub fn describe_ranks<B: Backend>(be: &B, world: World) -> Result<Vec<String>> {
    if world.size == 1 {
        return Ok(vec![be.name()]);
    }
    // Each rank writes its text's bytes into its own block of a zeroed vector; the sum across
    // ranks holds every block (bytes are exact in f64).
    const BLOCK: usize = 96;
    let mut host = [0u8; 256];
    // SAFETY: gethostname writes at most `host.len()` bytes into the buffer it is given.
    let ok = unsafe { libc::gethostname(host.as_mut_ptr().cast(), host.len()) } == 0;
    let host = if ok {
        let end = host.iter().position(|&b| b == 0).unwrap_or(host.len());
        String::from_utf8_lossy(&host[..end]).into_owned()
    } else {
        "?".to_string()
    };
    let gpu = std::env::var("CUDA_VISIBLE_DEVICES")
        .ok()
        .filter(|v| !v.contains(','))
        .map(|v| format!("GPU {v}"))
        .unwrap_or_else(|| format!("GPU {}", world.local_rank));
    let mine = format!("{host} {gpu} ({})", be.name());
    let mut all = vec![0.0f64; world.size * BLOCK];
    for (k, b) in mine.bytes().take(BLOCK).enumerate() {
        all[world.rank * BLOCK + k] = b as f64;
    }
    be.all_reduce_host(&mut all)
        .context("gathering the ranks' devices")?;
    Ok(all
        .chunks(BLOCK)
        .map(|c| {
            let bytes: Vec<u8> = c.iter().map(|&x| x as u8).take_while(|&b| b != 0).collect();
            String::from_utf8_lossy(&bytes).into_owned()
        })
        .collect())
}

/// The fingerprint of this process's command line (every rank of a launch gets the same).
pub fn args_fingerprint() -> u64 {
    let args: Vec<String> = std::env::args_os()
        .skip(1)
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    fingerprint(args.join("\0").as_bytes())
}

/// FNV-1a of `bytes`: the ranks compare what they run by it.
pub fn fingerprint(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf29ce484222325, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x100000001b3)
    })
}

/// Split items of the given weights (tokens) across `ranks`: heaviest first, each to the rank
/// with the least weight so far (ties to the lower rank), so the ranks' loads differ by at most
/// one item's weight. Deterministic: every rank computes the same split. Each rank's items
/// keep their original order. A rank may get nothing when there are fewer items than ranks.
pub fn balance(weights: &[usize], ranks: usize) -> Vec<Vec<usize>> {
    assert!(ranks > 0, "balance: no ranks");
    let mut order: Vec<usize> = (0..weights.len()).collect();
    // Stable: equal weights keep their order.
    order.sort_by_key(|&i| std::cmp::Reverse(weights[i]));
    let mut load = vec![0usize; ranks];
    let mut out = vec![Vec::new(); ranks];
    for i in order {
        let r = (0..ranks).min_by_key(|&r| (load[r], r)).unwrap_or(0);
        load[r] += weights[i];
        out[r].push(i);
    }
    for v in &mut out {
        v.sort_unstable();
    }
    out
}

/// The GPUs `--gpus` names: `all` (every visible GPU, `count` of them) or a comma-separated
/// list of distinct device numbers below `count`.
pub fn parse_gpus(spec: &str, count: usize) -> Result<Vec<usize>> {
    let spec = spec.trim();
    if spec.eq_ignore_ascii_case("all") {
        if count == 0 {
            bail!("--gpus all: no CUDA GPU is visible (see `caft-fast doctor`)");
        }
        return Ok((0..count).collect());
    }
    let mut gpus = Vec::new();
    for part in spec.split(',') {
        let p = part.trim();
        let g: usize = p.parse().with_context(|| {
            format!("--gpus {spec:?}: {p:?} is not a GPU number (expected e.g. 0,1,2,3 or all)")
        })?;
        if gpus.contains(&g) {
            bail!("--gpus {spec:?} names GPU {g} twice");
        }
        if g >= count {
            bail!(
                "--gpus {spec:?}: GPU {g} does not exist; {}",
                match count {
                    0 => "no CUDA GPU is visible (see `caft-fast doctor`)".to_string(),
                    1 => "this machine has one GPU, number 0".to_string(),
                    n => format!("this machine has {n} GPUs, numbered 0 to {}", n - 1),
                }
            );
        }
        gpus.push(g);
    }
    Ok(gpus)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn dist(vars: &[(&str, &str)]) -> Result<Dist> {
        let m: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Dist::from_vars(|k| m.get(k).cloned())
    }

    fn err(vars: &[(&str, &str)]) -> String {
        format!("{:#}", dist(vars).unwrap_err())
    }

    const FULL: [(&str, &str); 5] = [
        ("RANK", "3"),
        ("WORLD_SIZE", "4"),
        ("LOCAL_RANK", "1"),
        ("MASTER_ADDR", "node-a"),
        ("MASTER_PORT", "29500"),
    ];

    #[test]
    fn the_launch_environment_is_read_as_torchrun_sets_it() {
        let d = dist(&FULL).unwrap();
        assert_eq!(
            d.world,
            World {
                rank: 3,
                size: 4,
                local_rank: 1
            }
        );
        assert_eq!(
            d.master,
            Some(Master {
                addr: "node-a".into(),
                port: 29500
            })
        );
        assert_eq!(dist(&[]).unwrap().world, World::SINGLE);
        let one = dist(&[("RANK", "0"), ("WORLD_SIZE", "1")]).unwrap();
        assert_eq!((one.world, one.master), (World::SINGLE, None));
    }

    #[test]
    fn an_inconsistent_launch_environment_is_refused_naming_the_variable() {
        let with = |k: &str, v: &str| -> Vec<(&'static str, String)> {
            FULL.iter()
                .map(|&(a, b)| (a, if a == k { v.to_string() } else { b.to_string() }))
                .collect()
        };
        let e = |vars: Vec<(&str, String)>| {
            let v: Vec<(&str, &str)> = vars.iter().map(|(a, b)| (*a, b.as_str())).collect();
            err(&v)
        };
        assert!(err(&[("RANK", "1")]).contains("WORLD_SIZE is not"));
        assert!(err(&[("WORLD_SIZE", "2")]).contains("RANK is not"));
        assert!(e(with("RANK", "4")).contains("RANK=4 is not below WORLD_SIZE=4"));
        assert!(e(with("RANK", "x")).contains("RANK=\"x\""));
        assert!(e(with("WORLD_SIZE", "0")).contains("WORLD_SIZE=0"));
        assert!(e(with("LOCAL_RANK", "5")).contains("LOCAL_RANK=5 is above RANK=3"));
        assert!(e(with("MASTER_PORT", "70000")).contains("MASTER_PORT=70000"));
        let no_local: Vec<_> = FULL
            .iter()
            .filter(|(k, _)| *k != "LOCAL_RANK")
            .copied()
            .collect();
        assert!(err(&no_local).contains("needs LOCAL_RANK"));
        let no_addr: Vec<_> = FULL
            .iter()
            .filter(|(k, _)| *k != "MASTER_ADDR")
            .copied()
            .collect();
        assert!(err(&no_addr).contains("needs MASTER_ADDR"));
        let mut local_size = FULL.to_vec();
        local_size.push(("LOCAL_WORLD_SIZE", "1"));
        assert!(err(&local_size).contains("LOCAL_RANK=1 is not below LOCAL_WORLD_SIZE=1"));
    }

    #[test]
    fn balance_gives_every_item_to_one_rank_and_evens_the_load() {
        let mut rng = crate::util::rng::Rng::new(7);
        for ranks in 1..=5 {
            for n in [0, 1, 2, 3, 7, 16, 33] {
                let w: Vec<usize> = (0..n).map(|_| 1 + rng.below(500)).collect();
                let split = balance(&w, ranks);
                assert_eq!(split.len(), ranks);
                let mut all: Vec<usize> = split.iter().flatten().copied().collect();
                all.sort_unstable();
                assert_eq!(all, (0..n).collect::<Vec<_>>(), "each item exactly once");
                let loads: Vec<usize> = split
                    .iter()
                    .map(|s| s.iter().map(|&i| w[i]).sum())
                    .collect();
                let heaviest = w.iter().copied().max().unwrap_or(0);
                let (lo, hi) = (loads.iter().min().unwrap(), loads.iter().max().unwrap());
                assert!(hi - lo <= heaviest, "loads {loads:?} for weights {w:?}");
                for s in &split {
                    assert!(s.windows(2).all(|p| p[0] < p[1]), "order kept: {s:?}");
                }
            }
        }
        assert_eq!(balance(&[5, 1, 4], 1), vec![vec![0, 1, 2]]);
        assert_eq!(balance(&[5, 1, 4], 2), vec![vec![0], vec![1, 2]]);
    }

    #[test]
    fn gpu_lists_are_parsed_and_bad_ones_refused() {
        assert_eq!(parse_gpus("0,2, 3", 4).unwrap(), vec![0, 2, 3]);
        assert_eq!(parse_gpus("all", 3).unwrap(), vec![0, 1, 2]);
        let e = |s: &str, n: usize| format!("{:#}", parse_gpus(s, n).unwrap_err());
        assert!(e("0,1,0", 4).contains("names GPU 0 twice"));
        assert!(
            e("0,4", 4).contains("GPU 4 does not exist; this machine has 4 GPUs, numbered 0 to 3")
        );
        assert!(e("1", 1).contains("this machine has one GPU, number 0"));
        assert!(e("0", 0).contains("no CUDA GPU is visible"));
        assert!(e("all", 0).contains("no CUDA GPU is visible"));
        assert!(e("0,x", 2).contains("\"x\" is not a GPU number"));
    }
}
