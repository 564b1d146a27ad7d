//! What the `ringfence` executable (the front: `src/main.rs`) and `ringfence-full` (every
//! command: `src/full/main.rs`) share: `ringfence run` and the options every command takes.
//!
//! Two executables because of what a start costs: `ringfence-full` carries the server, the
//! tiers, the template builders and Wasmtime, and as a static PIE it applies about a megabyte
//! of relocations (one copy-on-write page fault per 4 KiB) before `main` on every start,
//! about 0.8 ms on a host like the one docs/PERFORMANCE.md measures, for a one-shot run that
//! uses none of it. The front holds only what `run` reaches.

#![forbid(unsafe_code)]

use std::path::PathBuf;

pub mod resolve;
pub mod run;

/// Options shared by the commands that touch host state.
#[derive(Debug, Clone, clap::Args)]
pub struct Common {
    /// Directory for persistent state: templates and, for `serve`, the state database.
    #[arg(long, env = "RINGFENCE_DATA_DIR", default_value = "/var/lib/ringfence")]
    pub data_dir: PathBuf,
    /// Directory for volatile state (cgroup slot locks, mount staging).
    #[arg(long, env = "RINGFENCE_RUN_DIR", default_value = "/run/ringfence")]
    pub run_dir: PathBuf,
}

/// One of Ringfence's executables: the path `env` names, else `name` beside the running one
/// (they are installed side by side), else under `/usr/local/lib/ringfence/`.
pub fn executable(env: &str, name: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(env) {
        return PathBuf::from(p);
    }
    std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|d| d.join(name)))
        .unwrap_or_else(|| PathBuf::from("/usr/local/lib/ringfence").join(name))
}

/// The front's logging (`ringfence run`): `RINGFENCE_LOG` as `target=level` directives (a
/// level alone sets the default), `warn` without it or where it does not parse. Not
/// `EnvFilter`: its span and field filters bring a regular-expression engine whose Unicode
/// tables alone are 70 KB of pointers to relocate, paid at every start.
pub fn init_run_logging() {
    use tracing_subscriber::filter::{LevelFilter, Targets};
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = std::env::var("RINGFENCE_LOG")
        .ok()
        .and_then(|v| v.parse::<Targets>().ok())
        .unwrap_or_else(|| Targets::new().with_default(LevelFilter::WARN));
    let _ = tracing_subscriber::registry()
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
        .with(filter)
        .try_init();
}
