//! Running the `caft-fast` binary and judging how it ended.
//!
//! Every run checks that nothing panicked: a bad input must end in an error (exit status 2
//! and a message), never in a panic, and a panic in a run that should succeed is a bug too.

use std::ffi::OsStr;
use std::process::{Command, Output};

/// The `caft-fast` executable cargo built for these tests.
pub fn exe() -> &'static str {
    env!("CARGO_BIN_EXE_caft-fast")
}

/// `caft-fast <args>`, after checking that it did not panic.
pub fn caft<I, A>(args: I) -> Output
where
    I: IntoIterator<Item = A>,
    A: AsRef<OsStr>,
{
    no_panic(
        Command::new(exe())
            .args(args)
            .output()
            .expect("running caft-fast"),
    )
}

/// `out` unchanged, after checking that its stderr shows no panic.
pub fn no_panic(out: Output) -> Output {
    let err = stderr(&out);
    assert!(!err.contains("panicked"), "the binary panicked:\n{err}");
    out
}

/// `caft-fast train --device cpu --threads 1 <args>` (later flags override these).
pub fn train(args: &[&str]) -> Output {
    caft(
        ["train", "--device", "cpu", "--threads", "1"]
            .iter()
            .chain(args),
    )
}

/// `caft-fast directions <args>`.
pub fn directions(args: &[&str]) -> Output {
    caft(["directions"].iter().chain(args))
}

/// `caft-fast eval <args>`.
pub fn eval(args: &[&str]) -> Output {
    caft(["eval"].iter().chain(args))
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).to_string()
}

/// Assert success; return stderr followed by stdout (for checking messages).
pub fn assert_ok(o: &Output) -> String {
    let msg = format!("{}{}", stderr(o), stdout(o));
    assert!(
        o.status.success(),
        "caft-fast failed ({}):\n--- stderr\n{}\n--- stdout\n{}",
        o.status,
        stderr(o),
        stdout(o)
    );
    msg
}

/// Assert an error, not a panic: exit status 2, no panic, and a stderr that mentions every
/// one of `needles`; return stderr.
pub fn assert_error(o: &Output, needles: &[&str]) -> String {
    let err = stderr(o);
    assert_eq!(
        o.status.code(),
        Some(2),
        "expected exit 2 (an error), got {}:\n--- stderr\n{err}\n--- stdout\n{}",
        o.status,
        stdout(o)
    );
    assert!(!err.contains("panicked"), "the binary panicked:\n{err}");
    for n in needles {
        assert!(err.contains(n), "the error should mention {n:?}:\n{err}");
    }
    err
}
