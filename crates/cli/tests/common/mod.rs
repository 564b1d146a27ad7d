//! Shared helpers for tests that drive the real binaries. They need root (namespaces, cgroups,
//! mounts); without it each test prints why it skipped and returns.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Command, Output, Stdio};

/// Root (or a printed SKIPPED line); shared with every test crate. Each test binary uses
/// only its part of this module.
#[allow(unused_imports)]
pub use ringfence_test_support::{host_pids_running, is_root, root_or_skip as require_root};

pub fn ringfence() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ringfence"));
    c.env("RINGFENCE_AGENT", env!("CARGO_BIN_EXE_ringfence-agent"));
    c.stdin(Stdio::null());
    c
}

pub fn agent_path() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_ringfence-agent"))
}

#[derive(Debug)]
pub struct Out {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
    pub report: serde_json::Value,
}

fn finish(out: Output, report: &Path) -> Out {
    let report = std::fs::read(report)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(serde_json::Value::Null);
    Out {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        report,
    }
}

/// `ringfence run OPTS --report R -- CMD...`
pub fn run(opts: &[&str], cmd: &[&str]) -> Out {
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("report.json");
    let out = ringfence()
        .arg("run")
        .args(opts)
        .arg("--report")
        .arg(&report)
        .arg("--")
        .args(cmd)
        .output()
        .unwrap();
    finish(out, &report)
}

pub fn sh(opts: &[&str], script: &str) -> Out {
    run(opts, &["/bin/sh", "-c", script])
}

/// Python preamble giving `sc(nr, *args) -> (ret, errno)` for raw syscalls.
pub const PY_SYSCALL: &str = r#"
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
def sc(nr, *a):
    ctypes.set_errno(0)
    r = libc.syscall(ctypes.c_long(nr), *[ctypes.c_long(x) for x in a])
    return r, ctypes.get_errno()
"#;

pub fn py(opts: &[&str], code: &str) -> Out {
    let full = format!("{PY_SYSCALL}\n{code}");
    run(opts, &["/usr/bin/python3", "-c", &full])
}

/// Names of the syscalls the report lists as denied.
pub fn denied(out: &Out) -> Vec<String> {
    out.report["security_events"]
        .as_array()
        .map(|a| a.iter().map(|e| e["syscall"].as_str().unwrap_or("").to_string()).collect())
        .unwrap_or_default()
}
