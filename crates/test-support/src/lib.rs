//! Fixtures the workspace's integration tests share: skipping (with a printed reason) where a
//! test cannot run here, locating the binaries Cargo built beside a test, loopback ports,
//! child processes that end with the test, a loopback registry, host process lookups and the
//! SDKs' percent-encoding.
//!
//! A dev-dependency only (each user lists it under `[dev-dependencies]`), so none of this is
//! in the `ringfence` binary. It depends on no workspace crate: every test crate can use it
//! without a dependency cycle or a rebuild of the crate under test.

// Test code: a fixture that cannot be set up fails the test that asked for it, with the
// message given here.
#![allow(clippy::expect_used)]

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Prints the line CI's log is searched for: `SKIPPED <test>: <reason>`.
pub fn skip(test: &str, reason: &str) {
    eprintln!("SKIPPED {test}: {reason}");
}

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Whether `test` runs as root; without root it says why it skips.
pub fn root_or_skip(test: &str) -> bool {
    let root = is_root();
    if !root {
        skip(test, "needs root for namespaces, cgroups and mounts");
    }
    root
}

/// A binary Cargo built into the same profile directory as the running test
/// (`target/<profile>/deps/<test>-<hash>` → `target/<profile>/<name>`), or the path in the
/// environment variable `env` when that is set.
pub fn sibling_binary(name: &str, env: &str) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(env) {
        return Some(PathBuf::from(p));
    }
    let exe = std::env::current_exe().ok()?;
    let candidate = exe.parent()?.parent()?.join(name);
    candidate.is_file().then_some(candidate)
}

/// The sandbox agent (`RINGFENCE_AGENT`, or `ringfence-agent` beside the test).
pub fn agent_binary() -> Option<PathBuf> {
    sibling_binary("ringfence-agent", "RINGFENCE_AGENT")
}

/// A loopback port free at the time of asking, below the kernel's ephemeral range
/// (`net.ipv4.ip_local_port_range`). A port from `bind(":0")` would be one the kernel hands
/// out again, to any process's outgoing connection or `bind(":0")`: CI saw a server's port,
/// free between a test's kill -9 and its restart, taken by another test's listener, and a free
/// port taken by an outgoing connection before the bind. Below that range only a fixed bind
/// like this one can take it.
pub fn free_port() -> u16 {
    use std::hash::{BuildHasher, Hasher};
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    const FLOOR: u16 = 10000;
    if low > FLOOR + 1000 {
        // Random, so that test processes asking at once start from different ports.
        let seed = std::collections::hash_map::RandomState::new();
        for i in 0u64..200 {
            let mut h = seed.build_hasher();
            h.write_u64(i);
            let port = FLOOR + (h.finish() % u64::from(low - FLOOR)) as u16;
            if TcpListener::bind(("127.0.0.1", port)).is_ok() {
                return port;
            }
        }
    }
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind a loopback port")
}

/// Whether something accepts TCP connections at `addr` within `timeout` (polled).
pub fn wait_for_tcp(addr: &str, timeout: Duration) -> bool {
    let end = Instant::now() + timeout;
    loop {
        if TcpStream::connect(addr).is_ok() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A child process killed and reaped when the test lets go of it (also on a panic), so a
/// failing test leaves no helper running.
#[derive(Debug)]
pub struct ChildGuard(pub Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A per-process unique name: `t-<tag>-<pid>-<n>`.
pub fn unique_id(tag: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    format!("t-{tag}-{}-{}", std::process::id(), N.fetch_add(1, Ordering::SeqCst))
}

/// Host pids (not this process) whose command line, arguments joined by spaces, is exactly
/// `cmdline`.
pub fn host_pids_running(cmdline: &str) -> Vec<i32> {
    let me = i32::try_from(std::process::id()).unwrap_or(-1);
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| *pid != me)
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                String::from_utf8_lossy(&c).trim_end_matches('\0').replace('\0', " ") == cmdline
            })
        })
        .collect()
}

/// Percent-encodes every byte but the unreserved characters, as the SDKs' URL builders do.
pub fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A registry on loopback (Debian's `docker-registry`) for the test's lifetime.
#[derive(Debug)]
pub struct Registry {
    _child: ChildGuard,
    _dir: tempfile::TempDir,
    /// `127.0.0.1:<port>`.
    pub addr: String,
}

/// Starts a [`Registry`]; `Err` names why it cannot (the caller skips with it).
pub fn start_registry() -> Result<Registry, String> {
    let bin = ["/usr/bin/docker-registry", "/usr/sbin/docker-registry"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .ok_or("docker-registry missing (scripts/setup.sh installs it)")?;
    let dir = tempfile::tempdir().map_err(|e| format!("temporary directory: {e}"))?;
    let addr = format!("127.0.0.1:{}", free_port());
    let config = dir.path().join("config.yml");
    let storage = dir.path().join("data");
    std::fs::write(
        &config,
        format!(
            "version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {}\n\
             http:\n  addr: {addr}\nlog:\n  level: error\n",
            storage.display()
        ),
    )
    .map_err(|e| format!("registry config: {e}"))?;
    let child = Command::new(bin)
        .arg("serve")
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("{bin}: {e}"))?;
    let registry = Registry { _child: ChildGuard(child), _dir: dir, addr };
    if !wait_for_tcp(&registry.addr, Duration::from_secs(10)) {
        return Err(format!("{bin} did not listen on {} within 10 s", registry.addr));
    }
    Ok(registry)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_encoding_keeps_only_unreserved_bytes() {
        assert_eq!(percent_encode("a b/ü~"), "a%20b%2F%C3%BC~");
    }

    #[test]
    fn a_guarded_child_is_gone_after_the_guard() {
        let child = Command::new("sleep").arg("30").spawn().expect("spawn sleep");
        let pid = child.id();
        drop(ChildGuard(child));
        assert!(!Path::new(&format!("/proc/{pid}")).exists(), "pid {pid} still there");
    }

    #[test]
    fn free_ports_accept_a_listener() {
        // A port is free only when asked: another test may bind it first. Of three fresh
        // ones, one must bind.
        let bound = (0..3).find_map(|_| {
            let port = free_port();
            TcpListener::bind(("127.0.0.1", port)).ok().map(|l| (port, l))
        });
        let (port, l) = bound.expect("none of three free ports could be bound");
        assert!(wait_for_tcp(&format!("127.0.0.1:{port}"), Duration::from_secs(1)));
        drop(l);
    }

    #[test]
    fn free_ports_lie_below_the_ephemeral_range() {
        let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap();
        let low: u16 = range.split_whitespace().next().unwrap().parse().unwrap();
        if low <= 11000 {
            skip("free_ports_lie_below_the_ephemeral_range", "the ephemeral range starts low");
            return;
        }
        let ports: std::collections::BTreeSet<u16> = (0..20).map(|_| free_port()).collect();
        assert!(ports.iter().all(|p| (10000..low).contains(p)), "{ports:?} vs {low}");
        assert!(ports.len() > 15, "not spread: {ports:?}");
    }
}
