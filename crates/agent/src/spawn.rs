//! Starting user processes: a clean environment, the caller's identity, no capabilities (and,
//! unless the template allows setuid, no way to gain any).

use std::collections::BTreeMap;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::process::{Command, Stdio};

use ringfence_proto::{AgentError, ErrorKind, SpawnSpec};

/// The `PATH` every sandbox process starts with.
pub const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The sandbox-wide environment: from setup, replaced when a pooled sandbox is handed to its
/// owner ([`ringfence_proto::Request::SetEnv`]).
static SANDBOX_ENV: std::sync::RwLock<BTreeMap<String, String>> =
    std::sync::RwLock::new(BTreeMap::new());

/// Whether the template lets setuid binaries raise privileges (see
/// [`ringfence_proto::SetupSpec::allow_setuid`]); set once at setup.
static ALLOW_SETUID: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Lets processes started from now on gain the sandbox's root through setuid binaries.
pub fn set_allow_setuid(allow: bool) {
    ALLOW_SETUID.store(allow, std::sync::atomic::Ordering::Relaxed);
}

/// Sets the sandbox-wide environment for processes started from now on.
pub fn set_sandbox_env(env: BTreeMap<String, String>) {
    if let Ok(mut g) = SANDBOX_ENV.write() {
        *g = env;
    }
}

fn err(kind: ErrorKind, message: String) -> AgentError {
    AgentError { kind, message }
}

/// Builds the command for `spec`: environment cleared to `PATH`, `HOME`, `LANG` plus what the
/// caller passed; identity, session and capabilities set by `ringfence_sys::harden_command`.
/// `controlling_tty` makes fd 0 the session's terminal (PTY sessions).
pub fn command(spec: &SpawnSpec, controlling_tty: bool) -> Result<Command, AgentError> {
    if spec.cmd.is_empty() {
        return Err(err(ErrorKind::InvalidArgument, "empty command".into()));
    }
    let home = spec.user.home();
    let cwd = match &spec.cwd {
        Some(c) if !c.is_empty() => crate::fs::resolve(c, spec.user)?,
        _ => Path::new(home).to_path_buf(),
    };
    if !cwd.is_dir() {
        return Err(err(
            ErrorKind::InvalidArgument,
            format!("working directory does not exist: {}", cwd.display()),
        ));
    }
    let cwd_c = CString::new(cwd.as_os_str().as_bytes())
        .map_err(|_| err(ErrorKind::InvalidArgument, "working directory contains NUL".into()))?;
    let mut cmd = Command::new(&spec.cmd);
    cmd.args(&spec.args).env_clear().env("PATH", PATH).env("HOME", home).env("LANG", "C.UTF-8");
    if let Ok(env) = SANDBOX_ENV.read() {
        cmd.envs(env.iter());
    }
    cmd.envs(&spec.env);
    let uid = spec.user.uid();
    ringfence_sys::harden_command(
        &mut cmd,
        ringfence_sys::Hardening {
            uid,
            gid: uid,
            cwd: Some(cwd_c),
            controlling_tty,
            allow_setuid: ALLOW_SETUID.load(std::sync::atomic::Ordering::Relaxed),
        },
    );
    Ok(cmd)
}

/// Maps a failed spawn to the error the caller sees (127/126 semantics for the CLI).
pub fn spawn_error(spec: &SpawnSpec, e: &std::io::Error) -> AgentError {
    match e.kind() {
        std::io::ErrorKind::NotFound => {
            err(ErrorKind::NotFound, format!("command not found: {}", spec.cmd))
        }
        std::io::ErrorKind::PermissionDenied => {
            err(ErrorKind::PermissionDenied, format!("permission denied: {}", spec.cmd))
        }
        _ => err(ErrorKind::Internal, format!("cannot start {}: {e}", spec.cmd)),
    }
}

/// Starts `spec` sharing the agent's own stdio (the one-shot `ringfence run` path).
pub fn spawn_inherit(spec: &SpawnSpec) -> Result<u32, AgentError> {
    let mut cmd = command(spec, false)?;
    cmd.stdin(Stdio::inherit()).stdout(Stdio::inherit()).stderr(Stdio::inherit());
    // The Child handle is dropped on purpose: PID 1 reaps by wait4(-1).
    cmd.spawn().map(|c| c.id()).map_err(|e| spawn_error(spec, &e))
}
