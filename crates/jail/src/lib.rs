//! The `jail` isolation tier: a sandbox made of Linux namespaces, a private overlay root with a
//! disk quota, cgroup limits, a seccomp-bpf allowlist and a Landlock ruleset.
//!
//! The tier is split by where the code runs:
//! - host side ([`launch`], [`cgroup`], [`template`], [`seccomp`], [`preflight`]) prepares
//!   everything that can be prepared ahead, forks the sandbox's first process into new
//!   namespaces and supervises it;
//! - sandbox side ([`inside`]) runs as the first act of `ringfence-agent`, PID 1 of the new
//!   namespaces, and turns them into the sandbox before the agent serves anything.
//!
//! No `unsafe` here: raw syscalls live in `ringfence-sys`.

#![forbid(unsafe_code)]

pub mod bpf;
pub mod cgroup;
pub mod disk;
pub mod inside;
pub mod keeper;
pub mod launch;
pub mod layer;
pub mod limits;
pub mod monitor;
pub mod owner;
pub mod preflight;
pub mod seccomp;
pub mod spawner;
mod syscall_names;
pub mod template;
pub mod zygote;

use std::path::PathBuf;

pub use launch::{JailError, Sandbox, SandboxSpec, Seccomp};

/// Where sandboxes' sockets, stages and slot locks live unless configured otherwise.
pub const DEFAULT_RUN_DIR: &str = "/run/ringfence";

/// Where owner-uid claims live, whatever the run directory (see [`JailConfig::owner_dir`]).
pub const DEFAULT_OWNER_DIR: &str = "/run/ringfence/owners";

/// Host-wide settings of the jail tier.
#[derive(Debug, Clone)]
pub struct JailConfig {
    /// Persistent state: templates.
    pub data_dir: PathBuf,
    /// Volatile state (a tmpfs on most hosts): cgroup slot locks, the staging mount point.
    pub run_dir: PathBuf,
    /// First host uid/gid of the range that sandbox ids 0..65536 map to. Never 0.
    pub uid_base: u32,
    /// The `ringfence-agent` executable.
    pub agent_path: PathBuf,
    /// Name of the cgroup subtree Ringfence owns in every hierarchy.
    pub cgroup_name: String,
    /// Claim files of sandbox owner uids (see [`owner`]). Host-wide on purpose, unlike
    /// `run_dir`: every process starting sandboxes on a host must draw from one set of claims.
    pub owner_dir: PathBuf,
    /// Where sandboxes' writable layers live (see [`disk`]).
    pub disk: disk::DiskBackend,
}

/// Width of the id range mapped into every sandbox.
pub const ID_RANGE: u32 = 65536;

impl JailConfig {
    /// Defaults for a root-run host: `/var/lib/ringfence`, `/run/ringfence`, ids from 100000000.
    pub fn with_agent(agent_path: PathBuf) -> Self {
        JailConfig {
            data_dir: PathBuf::from("/var/lib/ringfence"),
            run_dir: PathBuf::from(DEFAULT_RUN_DIR),
            uid_base: 100_000_000,
            agent_path,
            cgroup_name: "ringfence".into(),
            owner_dir: PathBuf::from(DEFAULT_OWNER_DIR),
            // Callers that can (the CLI, the server) choose images after probing the host.
            disk: disk::DiskBackend::Tmpfs,
        }
    }
}

/// CLOCK_MONOTONIC in nanoseconds; the same clock in every process, so host and agent phases
/// line up.
pub fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| (t.tv_sec() as u64) * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}

/// Records a phase named `name` now.
pub fn phase(phases: &mut Vec<ringfence_proto::Phase>, name: &str) {
    phases.push(ringfence_proto::Phase { name: name.into(), at_ns: monotonic_ns() });
}

/// Generates a sandbox id: 20 lowercase alphanumerics, the shape E2B uses, from the kernel's
/// random pool (`ringfence_sys::random_bytes` says why not `rand` here), each character
/// uniform (bytes of 252 and above, past the last whole multiple of 36, are drawn again).
pub fn new_sandbox_id() -> String {
    use rand::Rng;
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    const LIMIT: u8 = (256 / ALPHABET.len() * ALPHABET.len()) as u8;
    let mut id = String::with_capacity(20);
    let mut buf = [0u8; 32];
    while id.len() < 20 {
        if ringfence_sys::random_bytes(&mut buf).is_err() {
            // No getrandom(2) (a kernel before 3.17): the thread-local generator.
            let mut rng = rand::rng();
            while id.len() < 20 {
                id.push(ALPHABET[rng.random_range(0..ALPHABET.len())] as char);
            }
            break;
        }
        for b in buf.iter().filter(|b| **b < LIMIT) {
            if id.len() == 20 {
                break;
            }
            id.push(ALPHABET[usize::from(*b) % ALPHABET.len()] as char);
        }
    }
    id
}

#[cfg(test)]
mod tests {
    #[test]
    fn ids_are_hostname_safe_and_distinct() {
        let a = super::new_sandbox_id();
        let b = super::new_sandbox_id();
        assert_eq!(a.len(), 20);
        assert!(a.bytes().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit()));
        assert_ne!(a, b);
    }
}
