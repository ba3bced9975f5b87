//! Small shared helpers: seeded random numbers, the default model's cache, process stats.

pub mod fetch;
pub mod rng;

/// Peak resident memory of this process in MiB (Linux `VmHWM`), if the OS tells.
pub fn peak_rss_mib() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}
