//! The `ringfence` executable. It runs `ringfence run` (in the jail) itself and hands every
//! other command, unchanged, to `ringfence-full` beside it, by `execve` (same process, same
//! pid, same arguments): see `src/lib.rs` for why there are two.

#![forbid(unsafe_code)]

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use ringfence::run;
use ringfence_server::tier::TierKind;

/// Ringfence: self-hosted sandboxes for AI agents' code.
#[derive(Debug, Parser)]
#[command(name = "ringfence", version, about)]
struct Front {
    #[command(subcommand)]
    command: FrontCommand,
}

#[derive(Debug, Subcommand)]
enum FrontCommand {
    Run(run::RunArgs),
}

/// The executable holding every command: `$RINGFENCE_FULL`, else `ringfence-full` beside this
/// one.
fn full_path() -> PathBuf {
    ringfence::executable("RINGFENCE_FULL", "ringfence-full")
}

fn main() -> ExitCode {
    let t0 = ringfence_jail::monotonic_ns();
    let mut argv = std::env::args_os();
    let arg0 = argv.next().unwrap_or_else(|| OsString::from("ringfence"));
    let rest: Vec<OsString> = argv.collect();
    if rest.first().is_some_and(|a| a == "run") {
        let FrontCommand::Run(args) = Front::parse().command;
        if args.tier() == TierKind::Jail {
            ringfence::init_run_logging();
            return run::main(args, t0);
        }
    }
    let full = full_path();
    let err = std::process::Command::new(&full).arg0(arg0).args(rest).exec();
    eprintln!("ringfence: cannot start {}: {err}", full.display());
    ExitCode::from(127)
}
