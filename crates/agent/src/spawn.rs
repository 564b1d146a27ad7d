//! Starting user processes: a clean environment, the caller's identity, no capabilities (and,
//! unless the template allows setuid, no way to gain any).

use std::collections::BTreeMap;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

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

/// A process ready to start: its program's candidate paths, arguments, environment and the
/// identity it drops to. Started by [`Prepared::spawn`] with a vfork-style clone
/// (`ringfence_sys::spawn_hardened`), not `std::process::Command`, whose fork copies the
/// agent's address space: under gVisor that copy is a new host stub process for the sentry,
/// thrown away at the exec (see `ringfence_sys::spawn_hardened` for the measurement).
#[derive(Debug)]
pub struct Prepared {
    candidates: Vec<CString>,
    argv: Vec<CString>,
    envp: Vec<CString>,
    hardening: ringfence_sys::Hardening,
}

impl Prepared {
    /// Starts it with these standard descriptors; returns its pid. The agent (PID 1) reaps it.
    pub fn spawn(&self, stdio: [ringfence_sys::SpawnStdio; 3]) -> std::io::Result<u32> {
        ringfence_sys::spawn_hardened(
            &self.candidates,
            &self.argv,
            &self.envp,
            stdio,
            &self.hardening,
        )
        .map(|pid| pid.unsigned_abs())
    }
}

fn c_string(what: &str, s: &str) -> Result<CString, AgentError> {
    CString::new(s).map_err(|_| err(ErrorKind::InvalidArgument, format!("{what} contains NUL")))
}

/// Prepares the process for `spec`: environment cleared to `PATH`, `HOME`, `LANG` plus the
/// sandbox's and the caller's (later ones win, as with `Command::envs`); identity, session
/// and capabilities as `ringfence_sys::spawn_hardened`'s child sets them. `controlling_tty` makes fd 0
/// the session's terminal (PTY sessions). A program without a `/` is looked up in the final
/// environment's `PATH`, as `execvp` does.
pub fn command(spec: &SpawnSpec, controlling_tty: bool) -> Result<Prepared, AgentError> {
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
    let mut env: BTreeMap<String, String> = BTreeMap::new();
    env.insert("PATH".into(), PATH.into());
    env.insert("HOME".into(), home.into());
    env.insert("LANG".into(), "C.UTF-8".into());
    if let Ok(sandbox) = SANDBOX_ENV.read() {
        env.extend(sandbox.iter().map(|(k, v)| (k.clone(), v.clone())));
    }
    env.extend(spec.env.iter().map(|(k, v)| (k.clone(), v.clone())));
    let mut envp = Vec::with_capacity(env.len());
    for (k, v) in &env {
        if k.is_empty() || k.contains('=') {
            return Err(err(
                ErrorKind::InvalidArgument,
                format!("environment variable name {k:?} is empty or contains '='"),
            ));
        }
        envp.push(c_string("an environment variable", &format!("{k}={v}"))?);
    }
    let candidates = if spec.cmd.contains('/') {
        vec![c_string("the command", &spec.cmd)?]
    } else {
        let path = env.get("PATH").map(String::as_str).unwrap_or(PATH);
        path.split(':')
            .map(|dir| if dir.is_empty() { "." } else { dir })
            .map(|dir| c_string("the command's PATH lookup", &format!("{dir}/{}", spec.cmd)))
            .collect::<Result<Vec<_>, _>>()?
    };
    let mut argv = vec![c_string("the command", &spec.cmd)?];
    for a in &spec.args {
        argv.push(c_string("an argument", a)?);
    }
    let uid = spec.user.uid();
    Ok(Prepared {
        candidates,
        argv,
        envp,
        hardening: ringfence_sys::Hardening {
            uid,
            gid: uid,
            cwd: Some(cwd_c),
            controlling_tty,
            allow_setuid: ALLOW_SETUID.load(std::sync::atomic::Ordering::Relaxed),
        },
    })
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
    // PID 1 reaps it by wait4(-1).
    let keep = ringfence_sys::SpawnStdio::Keep;
    command(spec, false)?.spawn([keep, keep, keep]).map_err(|e| spawn_error(spec, &e))
}
