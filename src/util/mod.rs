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

/// A progress bar over `total` steps on a terminal; hidden otherwise (logs stay clean).
pub fn progress(total: u64, what: &str) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let b = indicatif::ProgressBar::new(total);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{msg} {bar:20.cyan/blue} {pos}/{len} [{elapsed_precise} ETA {eta_precise}]",
    ) {
        b.set_style(style.progress_chars("=> "));
    }
    b.set_message(what.to_string());
    b
}
