//! `ringfence-full`: every command of the `ringfence` command line. The `ringfence`
//! executable runs `ringfence run` itself and hands every other command to this one
//! (`src/main.rs`): a one-shot run then does not load the server's code.

#![forbid(unsafe_code)]

mod bootstrap;
mod build;
mod mcp;
mod serve;
mod template;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use ringfence::{Common, run};

/// Ringfence: self-hosted sandboxes for AI agents' code.
#[derive(Debug, Parser)]
#[command(name = "ringfence", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    Run(run::RunArgs),
    Serve(Box<serve::ServeArgs>),
    /// Manage API keys for `ringfence serve`.
    Keys {
        #[command(subcommand)]
        command: serve::KeysCommand,
    },
    Audit(serve::AuditArgs),
    /// Serve MCP (Model Context Protocol) on stdio, bridged to a `ringfence serve`.
    Mcp(mcp::McpArgs),
    /// Image templates: build from a Dockerfile, import and pull OCI images, list, inspect, remove.
    Template {
        #[command(subcommand)]
        command: template::TemplateCommand,
    },
    /// Kill processes left in cgroup slots nobody holds and remove those slots, and remove the
    /// disks of sandboxes whose owner is gone and the disks `run` made ahead.
    Gc {
        #[command(flatten)]
        common: Common,
    },
    /// Compile the wasm tier's modules (CPython, QuickJS) into the host's cache, as `serve`
    /// does on its first load (minutes for CPython's 100 MB: setup and CI run this once).
    WasmPrepare,
    /// Holds sandboxes' seccomp listeners across server restarts (started by `serve`).
    #[command(hide = true)]
    Keeper {
        #[arg(long)]
        socket: PathBuf,
    },
}

/// Logging to stderr, filtered by `RINGFENCE_LOG` with every directive `EnvFilter` takes
/// (default: `info` for `serve`, else `warn`), as JSON lines where `serve` is asked to.
fn init_logging(serving: bool, json: bool) {
    let default = if serving { "info" } else { "warn" };
    let filter = tracing_subscriber::EnvFilter::try_from_env("RINGFENCE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = if json { builder.json().try_init() } else { builder.try_init() };
}

fn main() -> ExitCode {
    let t0 = ringfence_jail::monotonic_ns();
    let cli = Cli::parse();
    match &cli.command {
        Command::Serve(a) => init_logging(true, a.json_logs()),
        _ => init_logging(false, false),
    }
    match cli.command {
        Command::Run(args) => match ringfence_server::tier::unavailable_reason(args.tier()) {
            Some(reason) => run::refuse(args.tier(), &reason),
            None => run::main(args, t0),
        },
        Command::Serve(args) => serve::main(*args),
        Command::Keys { command } => serve::keys(command),
        Command::Audit(args) => serve::audit(args),
        Command::Mcp(args) => mcp::main(args),
        Command::Template { command } => template::main(command),
        Command::Gc { common } => gc(&common),
        Command::WasmPrepare => wasm_prepare(),
        Command::Keeper { socket } => match ringfence_jail::keeper::serve(&socket) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("ringfence keeper: {e}");
                ExitCode::FAILURE
            }
        },
    }
}

fn wasm_prepare() -> ExitCode {
    let t = std::time::Instant::now();
    match ringfence_server::tier::wasm::prepare() {
        Ok((load, js)) => {
            let compiled = |c: Option<std::time::Duration>| {
                c.map_or("cached".to_string(), |d| format!("compiled in {:.1} s", d.as_secs_f64()))
            };
            println!(
                "python: {} ({} bytes, {}; load {:.0} ms)",
                load.cwasm.display(),
                load.cwasm_bytes,
                compiled(load.compiled),
                load.deserialize.as_secs_f64() * 1e3
            );
            match (&load.js, js) {
                (Some((path, c)), _) => {
                    println!("javascript: {} ({})", path.display(), compiled(*c))
                }
                (None, Err(why)) => println!("javascript: not available: {why}"),
                (None, Ok(())) => {}
            }
            println!("wasm-prepare: {:.1} s", t.elapsed().as_secs_f64());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("ringfence wasm-prepare: {e}");
            ExitCode::FAILURE
        }
    }
}

fn gc(common: &Common) -> ExitCode {
    let result = (|| -> anyhow::Result<(usize, usize)> {
        let layout = ringfence_jail::cgroup::Layout::detect()?;
        let pool = ringfence_jail::cgroup::Pool::new(
            layout,
            "ringfence",
            run::POOL_PREFIX,
            common.run_dir.join("cgroups"),
        );
        let killed = pool.collect_garbage()?;
        // Disks of sandboxes whose owner died (a SIGKILLed run, a server that did not come
        // back); disks someone holds are locked and left alone.
        let pool = ringfence_jail::disk::DiskPool::new(&common.data_dir);
        let disks = pool.sweep()? + pool.discard_spares();
        Ok((killed, disks))
    })();
    match result {
        Ok((n, disks)) => {
            println!(
                "killed {n} leftover process(es); removed idle cgroup slots and {disks} orphaned or spare disk(s)"
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("ringfence: gc failed: {e:#}");
            ExitCode::from(1)
        }
    }
}
