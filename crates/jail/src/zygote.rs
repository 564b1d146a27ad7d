//! The fork server: interpreters with their libraries already imported, entering running
//! sandboxes.
//!
//! Importing IPython, numpy, pandas and matplotlib costs about a second of CPU. Paying it per
//! sandbox would put it on the path of every first `run_code`, so one long-lived process (the
//! zygote, `interp/python/ringfence_zygote.py`) imports everything once, outside every sandbox,
//! and forks a kernel into a sandbox on request. The entry sequence and its checks are
//! described in that file; this module is the host's half:
//!
//! 1. open the sandbox's namespaces through its agent's `/proc/<pid>/ns/*` and send them, with
//!    one end of a fresh socket and the sandbox's policy ([`EntryPlan`]), to the zygote;
//! 2. when the zygote's child reports its pid, hold a pidfd for it and move it into the
//!    sandbox's cgroup before it joins anything;
//! 3. when it reports the kernel's pid, hold a pidfd for that too (signals can then never hit a
//!    reused pid) and let the first child exit;
//! 4. take the kernel's seccomp listener, so its denials are reported like the agent's.
//!
//! The zygote runs as root in the host's namespaces because joining a sandbox's user namespace
//! needs privilege over it; it never runs user code and never receives a secret. Its children
//! shed every privilege before the first byte of user code runs and verify that they did.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use landlock::{ABI, AccessFs, Scope};
use nix::sys::socket::{
    self, AddressFamily, MsgFlags, SockFlag, SockType, UnixAddr, sockopt::PeerCredentials,
};
use serde::Serialize;

use crate::launch::{DEFAULT_WRITABLE, Sandbox, rlimits_for};
use crate::limits::Limits;
use crate::seccomp::Compiled;

/// Namespaces a kernel joins, in the order the zygote expects their descriptors. The network
/// namespace first, while the zygote's child is still host root: one its spawner made ahead
/// belongs to the host's user namespace (see `crate::spawner::SpawnRequest::net_ahead`), which
/// a process in the sandbox's user namespace may not join.
const NAMESPACES: [&str; 7] = ["net", "user", "mnt", "pid", "uts", "ipc", "cgroup"];

/// The uid and gid kernels run as inside (the template's `user`).
pub const KERNEL_UID: u32 = 1000;

/// Errors starting the zygote or entering a sandbox.
#[derive(Debug, thiserror::Error)]
pub enum ZygoteError {
    #[error("interpreter fork server: {op}: {source}")]
    Io {
        op: String,
        #[source]
        source: io::Error,
    },
    #[error("interpreter fork server did not become ready within {0:?}")]
    NotReady(Duration),
    #[error("interpreter fork server exited")]
    Gone,
    #[error("entering the sandbox failed at {step}: {message}")]
    Entry { step: String, message: String },
    #[error("the sandbox is gone")]
    SandboxGone,
}

fn io_op(op: impl Into<String>) -> impl FnOnce(io::Error) -> ZygoteError {
    let op = op.into();
    move |source| ZygoteError::Io { op, source }
}

fn nix_op(op: &'static str) -> impl FnOnce(nix::Error) -> ZygoteError {
    move |e| ZygoteError::Io { op: op.into(), source: e.into() }
}

/// How to start the zygote.
#[derive(Debug, Clone)]
pub struct ZygoteConfig {
    /// The interpreter (the environment's `bin/python3`), at the same path inside sandboxes.
    pub python: PathBuf,
    /// Directory holding `ringfence_zygote.py` and `ringfence_kernel.py`.
    pub script_dir: PathBuf,
    /// Where the zygote connects back to us; its directory must be private to root.
    pub socket_path: PathBuf,
}

/// Landlock as the agent applies it, as numbers for the zygote's child.
#[derive(Debug, Clone, Serialize)]
pub struct LandlockPolicy {
    pub write: u64,
    pub file: u64,
    pub scopes: u64,
}

#[derive(Debug, Clone, Serialize)]
struct RlimitPlan {
    nofile: u64,
    nproc: u64,
    core: u64,
}

/// Everything a kernel needs to become a process of one sandbox.
#[derive(Debug, Clone, Serialize)]
pub struct EntryPlan {
    pub lang: String,
    pub cwd: String,
    pub uid: u32,
    pub gid: u32,
    pub env: BTreeMap<String, String>,
    writable: Vec<String>,
    landlock: Option<LandlockPolicy>,
    rlimits: RlimitPlan,
    /// Filters as raw `sock_filter` arrays, hex-encoded.
    seccomp_errno: String,
    seccomp_notify: String,
    last_cap: u32,
}

impl EntryPlan {
    /// The policy of a sandbox started with [`crate::SandboxSpec::new`]'s defaults and `limits`.
    pub fn new(
        lang: &str,
        cwd: &str,
        env: BTreeMap<String, String>,
        limits: &Limits,
        seccomp: Option<&Compiled>,
    ) -> EntryPlan {
        let r = rlimits_for(limits);
        let hex = |prog: &[ringfence_proto::BpfInsn]| {
            let mut out = String::with_capacity(prog.len() * 16);
            for i in prog {
                let mut raw = [0u8; 8];
                raw[..2].copy_from_slice(&i.code.to_ne_bytes());
                raw[2] = i.jt;
                raw[3] = i.jf;
                raw[4..].copy_from_slice(&i.k.to_ne_bytes());
                for b in raw {
                    out.push_str(&format!("{b:02x}"));
                }
            }
            out
        };
        EntryPlan {
            lang: lang.into(),
            cwd: cwd.into(),
            uid: KERNEL_UID,
            gid: KERNEL_UID,
            env,
            writable: DEFAULT_WRITABLE.iter().map(|s| (*s).to_string()).collect(),
            landlock: landlock_policy(),
            rlimits: RlimitPlan { nofile: r.nofile, nproc: r.nproc, core: r.core },
            seccomp_errno: seccomp.map(|c| hex(&c.clone3)).unwrap_or_default(),
            seccomp_notify: seccomp.map(|c| hex(&c.sandbox)).unwrap_or_default(),
            last_cap: ringfence_sys::last_cap(),
        }
    }
}

/// The agent's Landlock policy (see `inside::apply_landlock`) as bit masks.
fn landlock_policy() -> Option<LandlockPolicy> {
    let version = ringfence_sys::landlock_abi()?;
    let abi = ABI::from(i32::try_from(version.min(6)).unwrap_or(6));
    let scopes = if version >= 6 { (Scope::Signal | Scope::AbstractUnixSocket).bits() } else { 0 };
    Some(LandlockPolicy {
        write: AccessFs::from_write(abi).bits(),
        file: AccessFs::from_file(abi).bits(),
        scopes,
    })
}

/// A kernel now running inside a sandbox.
#[derive(Debug)]
pub struct Injected {
    /// The kernel's channel (JSON lines, see `interp/PROTOCOL.md`). Untrusted from here on.
    pub channel: UnixStream,
    /// Bound to the kernel process itself: kill through this, never by pid.
    pub pidfd: OwnedFd,
    pub host_pid: i32,
    /// Its seccomp user-notification descriptor.
    pub listener: Option<OwnedFd>,
}

/// The running fork server.
#[derive(Debug)]
pub struct Zygote {
    child: Child,
    control: OwnedFd,
}

impl Zygote {
    /// Starts the zygote and waits until it has imported everything.
    pub fn start(cfg: &ZygoteConfig, ready_within: Duration) -> Result<Zygote, ZygoteError> {
        let _ = std::fs::remove_file(&cfg.socket_path);
        let listener = socket::socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            None,
        )
        .map_err(nix_op("socket"))?;
        let addr = UnixAddr::new(&cfg.socket_path).map_err(nix_op("socket address"))?;
        socket::bind(listener.as_raw_fd(), &addr).map_err(nix_op("bind"))?;
        socket::listen(&listener, socket::Backlog::new(1).map_err(nix_op("listen"))?)
            .map_err(nix_op("listen"))?;
        let mut child = Command::new(&cfg.python)
            .arg(cfg.script_dir.join("ringfence_zygote.py"))
            .arg(&cfg.socket_path)
            .env_clear()
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .env("LANG", "C.UTF-8")
            .env("PYTHONPATH", &cfg.script_dir)
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(io_op(format!("start {}", cfg.python.display())))?;
        let deadline = Instant::now() + ready_within;
        let accepted = loop {
            match ringfence_sys::accept(&listener) {
                Ok(fd) => break fd,
                Err(e) if matches!(e.source.raw_os_error(), Some(libc::EAGAIN | libc::EINTR)) => {}
                Err(e) => return Err(io_op("accept")(e.source)),
            }
            if child.try_wait().ok().flatten().is_some() {
                return Err(ZygoteError::Gone);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(ZygoteError::NotReady(ready_within));
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let _ = std::fs::remove_file(&cfg.socket_path);
        let control = accepted;
        // Only the process we started may drive sandbox entries.
        let cred = socket::getsockopt(&control, PeerCredentials).map_err(nix_op("peer cred"))?;
        if cred.pid() as u32 != child.id() {
            let _ = child.kill();
            let _ = child.wait();
            return Err(ZygoteError::Io {
                op: "connect".into(),
                source: io::Error::other(format!("unexpected peer pid {}", cred.pid())),
            });
        }
        let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
        set_blocking(&control, left)?;
        let mut buf = [0u8; 256];
        let n = socket::recv(control.as_raw_fd(), &mut buf, MsgFlags::empty())
            .map_err(|_| ZygoteError::NotReady(ready_within))?;
        let ready = serde_json::from_slice::<Step>(&buf[..n]).is_ok_and(|s| s.kind == "ready");
        if !ready {
            let _ = child.kill();
            let _ = child.wait();
            return Err(ZygoteError::Gone);
        }
        Ok(Zygote { child, control })
    }

    /// Whether the zygote is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Forks a kernel into `target`. On failure nothing of the attempt is left running.
    pub fn inject(
        &self,
        target: &Sandbox,
        plan: &EntryPlan,
        within: Duration,
    ) -> Result<Injected, ZygoteError> {
        let mut ns = Vec::with_capacity(NAMESPACES.len());
        for name in NAMESPACES {
            let path = format!("/proc/{}/ns/{name}", target.pid);
            ns.push(File::open(&path).map_err(io_op(format!("open {path}")))?);
        }
        // Opened through a pid: make sure it still was this sandbox's agent.
        if !target.agent_is_current() {
            return Err(ZygoteError::SandboxGone);
        }
        let (ours, theirs) = UnixStream::pair().map_err(io_op("socketpair"))?;
        let plan_json = serde_json::to_vec(plan).map_err(|e| io_op("encode plan")(e.into()))?;
        let mut fds = vec![theirs.as_raw_fd()];
        fds.extend(ns.iter().map(AsRawFd::as_raw_fd));
        ringfence_sys::send_with_fds(self.control.as_raw_fd(), &plan_json, &fds)
            .map_err(|e| io_op("send plan")(e.source))?;
        drop(theirs);
        drop(ns);
        ours.set_read_timeout(Some(within)).map_err(io_op("set timeout"))?;
        let mut entry = Entry { chan: ours, first: None, kernel: None };
        match entry.run(target) {
            Ok((listener, host_pid, pidfd)) => {
                Ok(Injected { channel: entry.chan, pidfd, host_pid, listener })
            }
            Err(e) => {
                entry.abort();
                Err(e)
            }
        }
    }
}

impl Drop for Zygote {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn set_blocking(fd: &OwnedFd, timeout: Duration) -> Result<(), ZygoteError> {
    use nix::fcntl::{FcntlArg, OFlag, fcntl};
    let flags = fcntl(fd, FcntlArg::F_GETFL).map_err(nix_op("fcntl"))?;
    let flags = OFlag::from_bits_truncate(flags) & !OFlag::O_NONBLOCK;
    fcntl(fd, FcntlArg::F_SETFL(flags)).map_err(nix_op("fcntl"))?;
    let tv =
        nix::sys::time::TimeVal::new(timeout.as_secs() as i64, i64::from(timeout.subsec_micros()));
    socket::setsockopt(fd, socket::sockopt::ReceiveTimeout, &tv).map_err(nix_op("timeout"))
}

/// One entry in progress: the processes it has made so far, killed if it fails.
struct Entry {
    chan: UnixStream,
    first: Option<OwnedFd>,
    kernel: Option<OwnedFd>,
}

#[derive(serde::Deserialize)]
struct Step {
    #[serde(rename = "type")]
    kind: String,
    pid: Option<i32>,
    step: Option<String>,
    message: Option<String>,
}

impl Entry {
    /// Drives the entry; returns the kernel's listener, pid and pidfd.
    fn run(&mut self, target: &Sandbox) -> Result<(Option<OwnedFd>, i32, OwnedFd), ZygoteError> {
        let first = self.expect("forked")?;
        self.first = Some(pidfd(first)?);
        target
            .add_process(first)
            .map_err(|e| ZygoteError::Entry { step: "cgroup".into(), message: e.to_string() })?;
        self.chan.write_all(b"go\n").map_err(io_op("write"))?;
        let kernel = self.expect("child")?;
        self.kernel = Some(pidfd(kernel)?);
        self.chan.write_all(b"ok\n").map_err(io_op("write"))?;
        let (byte, mut fds) = self.read_bytes(1)?;
        let listener = match byte.first() {
            Some(b'L') if fds.len() == 1 => fds.pop(),
            Some(b'N') => None,
            // The kernel names its listener's descriptor and we take it: see
            // `crate::launch::MARK_PULL` for why nothing is sent from the sandbox's uid.
            Some(b'P') if fds.is_empty() => Some(self.take_listener()?),
            Some(b'{') => {
                let (rest, _) = self.read_line()?;
                return Err(failure(&format!("{{{rest}")));
            }
            _ => {
                return Err(ZygoteError::Entry {
                    step: "listener".into(),
                    message: "unexpected reply".into(),
                });
            }
        };
        // From here on the kernel, not this entry, owns its process.
        self.first = None;
        let pidfd = self.kernel.take().ok_or(ZygoteError::SandboxGone)?;
        Ok((listener, kernel, pidfd))
    }

    /// Takes the kernel's listener, whose descriptor number follows, with `pidfd_getfd`; where
    /// that is refused, asks the kernel to send it.
    fn take_listener(&mut self) -> Result<OwnedFd, ZygoteError> {
        let mut num = Vec::with_capacity(4);
        while num.len() < 4 {
            let (b, _) = self.read_bytes(4 - num.len())?;
            num.extend(b);
        }
        let fd = i32::from_le_bytes([num[0], num[1], num[2], num[3]]);
        let kernel = self.kernel.as_ref().ok_or(ZygoteError::SandboxGone)?;
        match ringfence_sys::pidfd_getfd(kernel, fd) {
            Ok(listener) => {
                self.chan.write_all(b"K").map_err(io_op("write"))?;
                Ok(listener)
            }
            Err(e) => {
                tracing::debug!(error = %e, "taking the kernel's listener failed; asking for it");
                self.chan.write_all(b"S").map_err(io_op("write"))?;
                match self.read_bytes(1)? {
                    (b, mut fds) if b.first() == Some(&b'L') && fds.len() == 1 => {
                        fds.pop().ok_or(ZygoteError::SandboxGone)
                    }
                    _ => Err(ZygoteError::Entry {
                        step: "listener".into(),
                        message: "unexpected reply".into(),
                    }),
                }
            }
        }
    }

    /// Reads one step line; an `entry_failed` line becomes the error it reports.
    fn expect(&mut self, kind: &str) -> Result<i32, ZygoteError> {
        let (line, _) = self.read_line()?;
        let step: Step = serde_json::from_str(&line).map_err(|_| ZygoteError::Entry {
            step: kind.into(),
            message: format!("unreadable reply {line:?}"),
        })?;
        match (step.kind.as_str(), step.pid) {
            (k, Some(pid)) if k == kind && pid > 1 => Ok(pid),
            _ => Err(failure(&line)),
        }
    }

    fn read_line(&mut self) -> Result<(String, Vec<OwnedFd>), ZygoteError> {
        let mut line = Vec::new();
        let mut fds = Vec::new();
        loop {
            let (b, f) = self.read_bytes(1)?;
            fds.extend(f);
            if b[0] == b'\n' {
                break;
            }
            line.push(b[0]);
            if line.len() > 4096 {
                return Err(ZygoteError::Entry {
                    step: "read".into(),
                    message: "line too long".into(),
                });
            }
        }
        Ok((String::from_utf8_lossy(&line).into_owned(), fds))
    }

    fn read_bytes(&mut self, n: usize) -> Result<(Vec<u8>, Vec<OwnedFd>), ZygoteError> {
        let mut buf = vec![0u8; n];
        let (got, fds) = ringfence_sys::recv_with_fds(self.chan.as_raw_fd(), &mut buf)
            .map_err(|e| io_op("read")(e.source))?;
        if got == 0 {
            return Err(ZygoteError::Entry {
                step: "enter".into(),
                message: "the entering process exited".into(),
            });
        }
        buf.truncate(got);
        Ok((buf, fds))
    }

    fn abort(&mut self) {
        for fd in [self.kernel.take(), self.first.take()].into_iter().flatten() {
            let _ = ringfence_sys::pidfd_send_signal(&fd, libc::SIGKILL);
        }
    }
}

fn pidfd(pid: i32) -> Result<OwnedFd, ZygoteError> {
    ringfence_sys::pidfd_open(pid).map_err(|e| io_op("pidfd_open")(e.source))
}

fn failure(line: &str) -> ZygoteError {
    match serde_json::from_str::<Step>(line) {
        Ok(s) if s.kind == "entry_failed" => ZygoteError::Entry {
            step: s.step.unwrap_or_default(),
            message: s.message.unwrap_or_default(),
        },
        _ => {
            ZygoteError::Entry { step: "protocol".into(), message: format!("unexpected {line:?}") }
        }
    }
}

/// Where the zygote's scripts are written for it: `<run_dir>/interp`, private to root.
pub fn script_dir(run_dir: &Path) -> PathBuf {
    run_dir.join("interp")
}
