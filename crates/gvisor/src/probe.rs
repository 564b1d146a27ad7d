//! Finding `runsc` and the platform it can run here, once per host process.
//!
//! Only systrap and ptrace are ever tried. The kvm platform is never offered: on hosts whose
//! `/dev/kvm` is PVM (nested cloud VMs) it hangs instead of failing, and where it works it needs
//! a `/dev/kvm` the sandbox host would have to grant to runsc; systrap needs nothing.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Where `scripts/install-runsc.sh` installs runsc.
pub const DEFAULT_RUNSC: &str = "/usr/local/lib/ringfence/runsc";

/// Environment variable naming a runsc to use instead of the default locations.
pub const RUNSC_ENV: &str = "RINGFENCE_RUNSC";

/// How long one probe run (`runsc do /bin/true`) may take before the platform counts as
/// unusable. Measured: ~0.2 s on systrap; a hanging platform never finishes.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// gVisor's way of intercepting the sandbox's system calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Platform {
    /// seccomp traps plus a shared-memory stub: ~4 µs per syscall on a nested host.
    Systrap,
    /// ptrace: ~80 µs per syscall on a nested host; offered only where systrap fails.
    Ptrace,
}

impl Platform {
    /// The name runsc's `--platform` takes.
    pub fn as_str(self) -> &'static str {
        match self {
            Platform::Systrap => "systrap",
            Platform::Ptrace => "ptrace",
        }
    }
}

/// A runsc that was found and ran a probe container on `platform`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Runsc {
    pub path: PathBuf,
    /// What `runsc --version` reports on its first line (e.g. `0.0~20240729.0`).
    pub version: String,
    pub platform: Platform,
}

/// The outcome of [`probe`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    Available(Runsc),
    /// Why the tier cannot run here, worded for the operator (what to install or fix).
    Unavailable {
        reason: String,
    },
}

/// Finds runsc (`$RINGFENCE_RUNSC`, then [`DEFAULT_RUNSC`], then `runsc` on `PATH`), reads its
/// version and runs `/bin/true` in a throwaway sandbox on systrap, then ptrace. `scratch` is a
/// directory for the probe's runsc state (removed afterwards). Takes ~0.2 s where it works.
pub fn probe(scratch: &Path) -> Probe {
    let Some(path) = find_runsc() else {
        return Probe::Unavailable {
            reason: format!(
                "runsc (gVisor) is not installed: run scripts/install-runsc.sh (installs {DEFAULT_RUNSC}), or set {RUNSC_ENV} to a runsc with the systrap platform"
            ),
        };
    };
    probe_at(&path, scratch)
}

/// [`probe`] for a given runsc binary.
pub fn probe_at(path: &Path, scratch: &Path) -> Probe {
    let version = match version_of(path) {
        Ok(v) => v,
        Err(reason) => return Probe::Unavailable { reason },
    };
    if !nix::unistd::Uid::effective().is_root() {
        return Probe::Unavailable {
            reason: "the gvisor tier needs root (runsc creates namespaces and cgroups)".into(),
        };
    }
    let mut failures = Vec::new();
    for platform in [Platform::Systrap, Platform::Ptrace] {
        match try_platform(path, platform, scratch) {
            Ok(()) => {
                return Probe::Available(Runsc { path: path.to_path_buf(), version, platform });
            }
            Err(e) => failures.push(format!("{}: {e}", platform.as_str())),
        }
    }
    Probe::Unavailable {
        reason: format!(
            "{} (version {version}) cannot run a sandbox here ({}); runsc releases before 2023 \
             lack systrap: run scripts/install-runsc.sh",
            path.display(),
            failures.join("; ")
        ),
    }
}

pub fn find_runsc() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(RUNSC_ENV) {
        return Some(PathBuf::from(p));
    }
    let default = PathBuf::from(DEFAULT_RUNSC);
    if default.is_file() {
        return Some(default);
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths).map(|d| d.join("runsc")).find(|p| p.is_file())
    })
}

fn version_of(path: &Path) -> Result<String, String> {
    let out = Command::new(path)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", path.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    match text.lines().next().and_then(|l| l.strip_prefix("runsc version ")) {
        Some(v) if out.status.success() => Ok(v.trim().to_string()),
        _ => Err(format!(
            "{} is not a working runsc (`--version` printed {:?})",
            path.display(),
            text.lines().next().unwrap_or("")
        )),
    }
}

/// Runs `/bin/true` in a sandbox on `platform` (host root, no network, no cgroups), killed
/// after [`PROBE_TIMEOUT`].
fn try_platform(path: &Path, platform: Platform, scratch: &Path) -> Result<(), String> {
    let root = scratch.join(format!("probe-{}-{}", std::process::id(), platform.as_str()));
    std::fs::create_dir_all(&root).map_err(|e| format!("mkdir {}: {e}", root.display()))?;
    let result = run_with_timeout(
        Command::new(path)
            .arg(format!("--root={}", root.display()))
            .arg(format!("--platform={}", platform.as_str()))
            .args(["--network=none", "--ignore-cgroups", "do", "/bin/true"]),
    );
    let _ = std::fs::remove_dir_all(&root);
    result
}

fn run_with_timeout(cmd: &mut Command) -> Result<(), String> {
    // Its own process group: a hanging platform leaves runsc's sandbox and gofer processes
    // too, and the timeout kills them all.
    let mut child = std::os::unix::process::CommandExt::process_group(cmd, 0)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("spawn: {e}"))?;
    let started = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => return Ok(()),
            Ok(Some(status)) => {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut e, &mut err);
                }
                let last = err.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("");
                return Err(format!("{status}: {}", last.trim()));
            }
            Ok(None) if started.elapsed() > PROBE_TIMEOUT => {
                if let Ok(pgid) = i32::try_from(child.id()) {
                    let _ = ringfence_sys::kill(-pgid, libc::SIGKILL);
                }
                let _ = child.wait();
                return Err(format!("no result within {PROBE_TIMEOUT:?}"));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => return Err(format!("wait: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_or_wrong_binary_is_unavailable_with_a_reason() {
        let scratch = std::env::temp_dir();
        match probe_at(Path::new("/nonexistent/runsc"), &scratch) {
            Probe::Unavailable { reason } => assert!(reason.contains("cannot run"), "{reason}"),
            other => panic!("{other:?}"),
        }
        match probe_at(Path::new("/bin/true"), &scratch) {
            Probe::Unavailable { reason } => {
                assert!(reason.contains("not a working runsc"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
    }
}
