//! The `gvisor` isolation tier: the same sandbox agent (`ringfence-agent`) runs as the init of a
//! gVisor container (`runsc`, systrap platform), so commands, files, PTYs and watches work as in
//! the jail, while every system call of the sandbox is served by gVisor's user-space kernel
//! instead of the host's.
//!
//! - [`probe`] finds runsc and the platform that works here (never kvm).
//! - [`Container::start`] builds the root ([`rootfs`]: a host overlay of the template and layers
//!   under a writable layer on a tmpfs of the disk quota), writes the OCI bundle ([`bundle`]),
//!   starts `runsc run --detach` with the agent's control channel passed in as its fd 3
//!   (`--pass-fd`), sends the agent its `SetupSpec` and waits for `Ready`.
//! - The returned [`Container`] carries the control channel (a `UnixStream` speaking the agent
//!   protocol of `ringfence-proto`), pause/resume, usage, the writable layer for snapshots, and
//!   cleanup (`runsc delete`, unmounts, state directory) on [`Container::delete`] or drop.
//!
//! No `unsafe` here: raw syscalls live in `ringfence-sys`.

#![forbid(unsafe_code)]

pub mod bundle;
mod container;
pub mod probe;
pub mod rootfs;

use std::path::PathBuf;

pub use bundle::{Network, RelaySpec};
pub use container::{Container, StartSpec, Usage, sweep};
pub use probe::{Platform, Probe, Runsc, probe};

/// Everything that can go wrong starting or running a gVisor sandbox.
#[derive(Debug, thiserror::Error)]
pub enum GvisorError {
    #[error("{op}: {source}")]
    Io {
        op: String,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid sandbox spec: {0}")]
    Invalid(String),
    #[error("runsc {command} failed ({status}): {message}")]
    Runsc { command: String, status: String, message: String },
    #[error("agent channel: {0}")]
    Proto(#[from] ringfence_proto::ProtoError),
    #[error("{step}: {message}")]
    Setup { step: String, message: String },
    #[error("the sandbox agent sent an unexpected message during setup: {0}")]
    Protocol(String),
    #[error("sandbox setup did not finish within {0:?}")]
    SetupTimeout(std::time::Duration),
    #[error("sandbox {0} is not running")]
    Gone(String),
    #[error(transparent)]
    Layer(#[from] ringfence_jail::layer::LayerError),
}

/// Host-wide settings of the gvisor tier.
#[derive(Debug, Clone)]
pub struct GvisorConfig {
    /// The runsc and platform [`probe`] found.
    pub runsc: Runsc,
    /// Volatile state: runsc's own (`runsc/`, its `--root`) and each sandbox's directory
    /// (`sandboxes/<id>/`: bundle, root mounts, runsc's log). A tmpfs on most hosts.
    pub state_dir: PathBuf,
    /// The `ringfence-agent` executable, statically linked (it is bound into the sandbox and
    /// runs on the template's root, which need not carry the host's libraries).
    pub agent_path: PathBuf,
    /// Parent of every sandbox's cgroup (absolute, the same in every hierarchy). runsc creates
    /// `<parent>/<id>` with the sandbox's limits and removes it on delete.
    pub cgroup_parent: String,
}

impl GvisorConfig {
    /// Defaults for a root-run host: state under `/run/ringfence/gvisor`, cgroups under
    /// `/ringfence-gvisor`.
    pub fn new(runsc: Runsc, agent_path: PathBuf) -> Self {
        GvisorConfig {
            runsc,
            state_dir: PathBuf::from("/run/ringfence/gvisor"),
            agent_path,
            cgroup_parent: "/ringfence-gvisor".into(),
        }
    }

    /// runsc's `--root`.
    pub fn runsc_root(&self) -> PathBuf {
        self.state_dir.join("runsc")
    }

    /// Where sandbox `id`'s bundle and root live.
    pub fn sandbox_dir(&self, id: &str) -> PathBuf {
        self.state_dir.join("sandboxes").join(id)
    }
}
