//! The ranks' meeting: rank 0 listens on `MASTER_ADDR:MASTER_PORT`, every other rank connects
//! and says who it is, and once all have come rank 0 hands each the NCCL unique id (128 bytes
//! that NCCL's `ncclCommInitRank` needs on every rank). Rank 0 also checks that every rank
//! runs the same world size and the same training configuration (a fingerprint of it), so a
//! rank started with other flags is refused instead of training something else.
//!
//! The wire format (all integers little-endian): a rank sends `CAFTRDV1`, its rank (u32), the
//! world size (u32) and the fingerprint (u64); rank 0 answers with one byte, 0 followed by the
//! id, or 1 followed by a u32 length and a message saying why the rank is refused.
//! Everything is bounded by one deadline: a rank that never shows up, or a rank 0 that cannot
//! be reached, ends in an error naming the missing ranks or the address.

use super::{Master, World};
use anyhow::{bail, Context, Result};
use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

/// The bytes NCCL's unique id holds.
pub const ID_BYTES: usize = 128;

const MAGIC: &[u8; 8] = b"CAFTRDV1";
const HELLO_BYTES: usize = 8 + 4 + 4 + 8;

/// How long the ranks wait for each other: `$CAFT_RENDEZVOUS_TIMEOUT_S`, default 300 s (a
/// large model's load before the meeting can take minutes on a busy node).
pub fn timeout() -> Duration {
    let s = std::env::var("CAFT_RENDEZVOUS_TIMEOUT_S")
        .ok()
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|s| *s > 0.0)
        .unwrap_or(300.0);
    Duration::from_secs_f64(s)
}

/// Exchange the id: rank 0 passes `Some(id)` and gets it back once every rank has joined;
/// every other rank passes `None` and gets rank 0's. `fingerprint` must be equal on all ranks.
pub fn exchange(
    world: &World,
    master: &Master,
    id: Option<[u8; ID_BYTES]>,
    fingerprint: u64,
    timeout: Duration,
) -> Result<[u8; ID_BYTES]> {
    let deadline = Instant::now() + timeout;
    match (world.rank, id) {
        (0, Some(id)) => serve(world.size, master, id, fingerprint, deadline, timeout),
        (0, None) => bail!("rendezvous: rank 0 must bring the id"),
        (_, Some(_)) => bail!("rendezvous: only rank 0 brings the id"),
        (_, None) => join(world, master, fingerprint, deadline, timeout),
    }
}

fn serve(
    size: usize,
    master: &Master,
    id: [u8; ID_BYTES],
    fingerprint: u64,
    deadline: Instant,
    timeout: Duration,
) -> Result<[u8; ID_BYTES]> {
    let here = format!("{}:{}", master.addr, master.port);
    // MASTER_ADDR names this host; listen on all of its addresses when the name does not
    // resolve to one it can bind (a name other hosts see through another interface).
    let listener = TcpListener::bind((master.addr.as_str(), master.port))
        .or_else(|_| TcpListener::bind(("0.0.0.0", master.port)))
        .with_context(|| {
            format!(
                "rank 0 cannot listen on {here} (MASTER_ADDR:MASTER_PORT): is the port taken \
                 by another run?"
            )
        })?;
    listener
        .set_nonblocking(true)
        .context("rendezvous: setting the listener non-blocking")?;
    let mut joined: Vec<Option<TcpStream>> = (0..size).map(|_| None).collect();
    let mut waiting = size - 1;
    while waiting > 0 {
        match listener.accept() {
            Ok((mut s, peer)) => {
                s.set_nonblocking(false)
                    .context("rendezvous: a connection")?;
                s.set_read_timeout(Some(Duration::from_secs(10)))
                    .context("rendezvous: a connection")?;
                let mut hello = [0u8; HELLO_BYTES];
                if s.read_exact(&mut hello).is_err() || &hello[..8] != MAGIC {
                    // Not one of ours (a port scanner, another program): ignore it.
                    continue;
                }
                let word = |a: usize| u32::from_le_bytes(hello[a..a + 4].try_into().unwrap());
                let (rank, their_size) = (word(8) as usize, word(12) as usize);
                let their_fp = u64::from_le_bytes(hello[16..24].try_into().unwrap());
                let refuse = if their_size != size {
                    Some(format!(
                        "rank {rank} (from {peer}) has WORLD_SIZE={their_size}, rank 0 has {size}"
                    ))
                } else if rank == 0 || rank >= size {
                    Some(format!(
                        "a process from {peer} claims RANK={rank} of {size}"
                    ))
                } else if joined[rank].is_some() {
                    Some(format!(
                        "two processes claim RANK={rank} (the second from {peer})"
                    ))
                } else if their_fp != fingerprint {
                    Some(format!(
                        "rank {rank} (from {peer}) runs another training configuration than \
                         rank 0 (every rank must get the same flags and files)"
                    ))
                } else {
                    None
                };
                if let Some(why) = refuse {
                    let _ = send_refusal(&mut s, &why);
                    bail!("rendezvous on {here}: {why}");
                }
                joined[rank] = Some(s);
                waiting -= 1;
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    let missing: Vec<String> = (1..size)
                        .filter(|&r| joined[r].is_none())
                        .map(|r| r.to_string())
                        .collect();
                    bail!(
                        "rendezvous on {here}: after {:.0} s rank{} {} of WORLD_SIZE={size} did \
                         not join (did they start, with MASTER_ADDR and MASTER_PORT naming this \
                         host? $CAFT_RENDEZVOUS_TIMEOUT_S sets the wait)",
                        timeout.as_secs_f64(),
                        if missing.len() > 1 { "s" } else { "" },
                        missing.join(", ")
                    );
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(e).with_context(|| format!("rendezvous on {here}: accept")),
        }
    }
    for (rank, s) in joined.iter_mut().enumerate() {
        if let Some(s) = s {
            let mut msg = vec![0u8];
            msg.extend_from_slice(&id);
            s.write_all(&msg)
                .with_context(|| format!("rendezvous on {here}: sending the id to rank {rank}"))?;
        }
    }
    Ok(id)
}

fn send_refusal(s: &mut TcpStream, why: &str) -> std::io::Result<()> {
    let mut msg = vec![1u8];
    msg.extend_from_slice(&(why.len() as u32).to_le_bytes());
    msg.extend_from_slice(why.as_bytes());
    s.write_all(&msg)
}

fn join(
    world: &World,
    master: &Master,
    fingerprint: u64,
    deadline: Instant,
    timeout: Duration,
) -> Result<[u8; ID_BYTES]> {
    let there = format!("{}:{}", master.addr, master.port);
    let rank = world.rank;
    // Rank 0 may still be loading the model: retry until the deadline.
    let mut stream = loop {
        let last = match there.to_socket_addrs() {
            Ok(addrs) => {
                let addrs: Vec<_> = addrs.collect();
                let mut err = None;
                let mut ok = None;
                for a in &addrs {
                    match TcpStream::connect_timeout(a, Duration::from_secs(2)) {
                        Ok(s) => {
                            ok = Some(s);
                            break;
                        }
                        Err(e) => err = Some(e.to_string()),
                    }
                }
                match ok {
                    Some(s) => break s,
                    None => err.unwrap_or_else(|| "the name resolves to no address".into()),
                }
            }
            Err(e) => format!("cannot resolve the address: {e}"),
        };
        if Instant::now() >= deadline {
            bail!(
                "rank {rank}: cannot reach rank 0 at {there} (MASTER_ADDR:MASTER_PORT) within \
                 {:.0} s: {last}",
                timeout.as_secs_f64()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut hello = Vec::with_capacity(HELLO_BYTES);
    hello.extend_from_slice(MAGIC);
    hello.extend_from_slice(&(rank as u32).to_le_bytes());
    hello.extend_from_slice(&(world.size as u32).to_le_bytes());
    hello.extend_from_slice(&fingerprint.to_le_bytes());
    stream
        .write_all(&hello)
        .with_context(|| format!("rank {rank}: writing to rank 0 at {there}"))?;
    let left = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_secs(1));
    stream
        .set_read_timeout(Some(left))
        .context("rendezvous: setting a read timeout")?;
    let gone = |e: std::io::Error| {
        anyhow::anyhow!(
            "rank {rank}: rank 0 at {there} did not send the NCCL id within {:.0} s ({e}); \
             did every rank start, and did rank 0 fail (see its output)?",
            timeout.as_secs_f64()
        )
    };
    let mut status = [0u8; 1];
    stream.read_exact(&mut status).map_err(gone)?;
    if status[0] != 0 {
        let mut len = [0u8; 4];
        stream.read_exact(&mut len).map_err(gone)?;
        let mut why = vec![0u8; (u32::from_le_bytes(len) as usize).min(1 << 16)];
        stream.read_exact(&mut why).map_err(gone)?;
        bail!(
            "rank {rank}: rank 0 refused this rank: {}",
            String::from_utf8_lossy(&why)
        );
    }
    let mut id = [0u8; ID_BYTES];
    stream.read_exact(&mut id).map_err(gone)?;
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn free_port() -> u16 {
        TcpListener::bind(("127.0.0.1", 0))
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    fn world(rank: usize, size: usize) -> World {
        World {
            rank,
            size,
            local_rank: rank,
        }
    }

    /// Run `size` ranks on threads; rank r uses fingerprint `fps[r]` and is skipped when
    /// `absent` names it.
    fn meet(size: usize, fps: &[u64], absent: &[usize], secs: f64) -> Vec<Result<[u8; 128]>> {
        let master = Master {
            addr: "127.0.0.1".into(),
            port: free_port(),
        };
        let mut id = [0u8; ID_BYTES];
        for (i, b) in id.iter_mut().enumerate() {
            *b = (i * 7 + 3) as u8;
        }
        std::thread::scope(|s| {
            let hs: Vec<_> = (0..size)
                .filter(|r| !absent.contains(r))
                .map(|r| {
                    let master = master.clone();
                    let fp = fps[r];
                    s.spawn(move || {
                        let mine = (r == 0).then_some(id);
                        exchange(
                            &world(r, size),
                            &master,
                            mine,
                            fp,
                            Duration::from_secs_f64(secs),
                        )
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    #[test]
    fn every_rank_gets_rank_0s_id() {
        for size in [2, 3, 5] {
            let out = meet(size, &vec![42; size], &[], 20.0);
            let first = *out[0].as_ref().unwrap();
            assert_eq!(first[5], 38);
            for o in &out {
                assert_eq!(o.as_ref().unwrap(), &first);
            }
        }
    }

    #[test]
    fn a_missing_rank_is_named_after_the_timeout() {
        let t = Instant::now();
        let out = meet(4, &[1; 4], &[2], 1.0);
        let e = format!("{:#}", out[0].as_ref().unwrap_err());
        assert!(e.contains("rank 2 of WORLD_SIZE=4 did not join"), "{e}");
        assert!(t.elapsed() < Duration::from_secs(15));
        // The ranks that came learn that rank 0 gave up.
        let e1 = format!("{:#}", out[1].as_ref().unwrap_err());
        assert!(e1.contains("did not send the NCCL id"), "{e1}");
    }

    #[test]
    fn an_unreachable_rank_0_is_named() {
        let out = meet(2, &[1; 2], &[0], 0.5);
        let e = format!("{:#}", out[0].as_ref().unwrap_err());
        assert!(
            e.contains("rank 1: cannot reach rank 0 at 127.0.0.1:"),
            "{e}"
        );
    }

    #[test]
    fn a_rank_with_another_configuration_is_refused() {
        let out = meet(3, &[1, 1, 2], &[], 20.0);
        let e = format!("{:#}", out[0].as_ref().unwrap_err());
        assert!(
            e.contains("rank 2") && e.contains("another training configuration"),
            "{e}"
        );
        let e2 = format!("{:#}", out[2].as_ref().unwrap_err());
        assert!(e2.contains("refused this rank"), "{e2}");
    }
}
