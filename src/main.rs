//! The `caft-fast` binary: parse the command line, run it, map the outcome to an exit status
//! (0 done, 1 stopped early or a check failed, 2 error).

use clap::Parser;
use std::process::ExitCode;

use caft_fast::cli::{self, Cli};

fn main() -> ExitCode {
    match cli::run(Cli::parse()) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
