//! Spawners: a process parked in each cgroup slot that clones new sandboxes into it.
//!
//! A child is born in its parent's cgroups. Moving a process into a cgroup afterwards takes the
//! kernel's global threadgroup lock for writing, and on cgroup v1 (and v2 without
//! `favordynmods`) that first waits for an RCU grace period: about 14 ms of every sandbox start
//! on a host as it comes, more than all the rest of the start put together. So the move is paid
//! once per slot, by a spawner: a small host process (the agent's executable in
//! `--spawner` mode: root, the host's namespaces, never any sandbox code) that the slot's first
//! claimant starts and moves into the slot, and that from then on makes each sandbox of the
//! slot with the same `clone` the host would have made ([`ringfence_sys::spawn_in_namespaces`]),
//! so the sandbox starts inside its cgroups with no move.
//!
//! One request per connection on `<lock dir>/<prefix>-<slot>.<binary>.spawner` (mode 0600; the
//! peer must be host root): a JSON [`SpawnRequest`] with the control channel's child end, the
//! three stdio descriptors and the owner claim attached; the answer is the new agent's pid
//! with a pidfd for it. The spawner reaps its children; the host, which is not their parent,
//! watches each through its pidfd, and a sandbox whose host goes away ends through its control
//! channel (the agent exits when it reads end-of-file), which stands in for the parent-death
//! signal a spawner's child cannot have.
//!
//! The spawner stays in the slot while sandboxes run there. It is not one of theirs: it never
//! counts as one of the slot's processes, cleanup never kills it ([`is_spawner`]: a process
//! of the host's user namespace running as host root, which nothing made inside a sandbox can
//! be), it is exempt from the OOM killer, and the slot's pids limit has room for it. Idle for
//! [`IDLE_EXIT`], it exits; the slot's next claimant starts another.

use std::io::{self, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Errors starting or asking a spawner.
#[derive(Debug, thiserror::Error)]
pub enum SpawnerError {
    #[error("spawner {op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("spawner at {0} did not start")]
    NotStarted(PathBuf),
    #[error("spawner: {0}")]
    Refused(String),
}

/// How long a spawner with no request stays up.
pub const IDLE_EXIT: Duration = Duration::from_secs(600);

/// What the host asks a spawner for: everything [`ringfence_sys::NsSpawn`] takes that is not
/// a descriptor (those travel beside it, in the order of [`Spawner::spawn`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SpawnRequest {
    pub flags: i32,
    pub owner: Option<u32>,
    /// Where the owner claim (the last descriptor sent) stays open in the child.
    pub keep_target: Option<i32>,
    /// Exec a fresh agent in the child, as sandboxes started before spawners forked them
    /// (benchmarking of what forking saves only; see [`serve`]).
    #[serde(default)]
    pub exec: bool,
}

/// The spawner answers with this (and, on success, a pidfd).
#[derive(Debug, Clone, Serialize, Deserialize)]
enum SpawnReply {
    Started { pid: i32 },
    Failed { error: String },
}

/// A short name for the agent executable's identity (device, inode, modification time), so
/// that a spawner of an older build is never asked to start a newer build's sandboxes.
pub fn binary_tag(exe: &Path) -> Result<String, SpawnerError> {
    let m = std::fs::metadata(exe).map_err(|source| SpawnerError::Io {
        op: "stat",
        path: exe.to_path_buf(),
        source,
    })?;
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for v in [m.dev(), m.ino(), m.mtime() as u64, m.mtime_nsec() as u64, m.size()] {
        for b in v.to_le_bytes() {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
    Ok(format!("{h:016x}"))
}

/// Whether host pid `pid` is a spawner rather than a sandbox's process: it runs as host root
/// in the host's user namespace. Every process of a sandbox is in the sandbox's own user
/// namespace from its first instruction (`CLONE_NEWUSER`), so none can pass.
pub fn is_spawner(pid: i32) -> bool {
    let Ok(ours) = std::fs::metadata("/proc/self/ns/user") else { return false };
    let Ok(theirs) = std::fs::metadata(format!("/proc/{pid}/ns/user")) else { return false };
    if (ours.dev(), ours.ino()) != (theirs.dev(), theirs.ino()) {
        return false;
    }
    std::fs::metadata(format!("/proc/{pid}")).is_ok_and(|m| m.uid() == 0)
}

/// Stops the spawner listening at `socket` (its peer credentials name it) and removes the
/// socket; a spawner whose socket is gone also ends by itself within a poll interval.
pub fn stop(socket: &Path) {
    if let Ok(s) = UnixStream::connect(socket)
        && let Ok(cred) =
            nix::sys::socket::getsockopt(&s, nix::sys::socket::sockopt::PeerCredentials)
        && is_spawner(cred.pid())
    {
        let _ = ringfence_sys::kill(cred.pid(), libc::SIGKILL);
    }
    let _ = std::fs::remove_file(socket);
}

/// A client of one slot's spawner.
#[derive(Debug, Clone)]
pub struct Spawner {
    path: PathBuf,
    exec: bool,
}

/// The agent's own start, run in a spawner's forked child in place of an exec of
/// `ringfence-agent --init` (see [`serve`]).
/// It returns the process's exit status.
pub type Init = fn() -> i32;

impl Spawner {
    /// The spawner listening at `socket`, if one answers.
    pub fn existing(socket: &Path) -> Option<Spawner> {
        UnixStream::connect(socket)
            .ok()
            .map(|_| Spawner { path: socket.to_path_buf(), exec: false })
    }

    /// Whether this spawner's sandboxes exec a fresh agent (see [`SpawnRequest::exec`]).
    pub fn exec_agents(self, exec: bool) -> Spawner {
        Spawner { exec, ..self }
    }

    /// What [`exec_agents`](Spawner::exec_agents) set.
    pub fn execs(&self) -> bool {
        self.exec
    }

    /// Starts `exe --spawner --socket SOCKET` and hands its pid to `park`, which moves it into
    /// the slot, before waiting for it to listen. The caller holds the slot.
    pub fn start(
        socket: &Path,
        exe: &Path,
        park: impl FnOnce(i32) -> Result<(), SpawnerError>,
    ) -> Result<Spawner, SpawnerError> {
        let _ = std::fs::remove_file(socket);
        let mut cmd = std::process::Command::new(exe);
        cmd.arg("--spawner")
            .arg("--socket")
            .arg(socket)
            .env_clear()
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        ringfence_sys::detach_command(&mut cmd);
        let mut child = cmd.spawn().map_err(|source| SpawnerError::Io {
            op: "start",
            path: exe.to_path_buf(),
            source,
        })?;
        let pid = child.id() as i32;
        if let Err(e) = park(pid) {
            let _ = child.kill();
            let _ = child.wait();
            return Err(e);
        }
        let until = Instant::now() + Duration::from_secs(5);
        while Instant::now() < until {
            if let Some(s) = Spawner::existing(socket) {
                // Reaped when it exits, for as long as this process lives; after that by init.
                std::thread::spawn(move || child.wait());
                return Ok(s);
            }
            // Not a spawner at all (another program at the agent's path): no use waiting.
            if let Ok(Some(_)) = child.try_wait() {
                return Err(SpawnerError::NotStarted(socket.to_path_buf()));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let _ = child.kill();
        let _ = child.wait();
        Err(SpawnerError::NotStarted(socket.to_path_buf()))
    }

    /// Asks for a new sandbox: `fds` are the control channel's child end, stdin, stdout,
    /// stderr and, with `req.keep_target`, the owner claim. Returns its pid and a pidfd.
    pub fn spawn(&self, req: &SpawnRequest, fds: &[RawFd]) -> Result<(i32, OwnedFd), SpawnerError> {
        let io = |op| {
            let path = self.path.clone();
            move |source| SpawnerError::Io { op, path, source }
        };
        let s = UnixStream::connect(&self.path).map_err(io("connect"))?;
        s.set_read_timeout(Some(Duration::from_secs(10))).map_err(io("timeout"))?;
        let mut line = serde_json::to_vec(req).map_err(|e| io("encode")(e.into()))?;
        line.push(b'\n');
        ringfence_sys::send_with_fds(s.as_raw_fd(), &line, fds)
            .map_err(|e| io("send")(e.source))?;
        let mut buf = vec![0u8; 512];
        let (n, mut got) = ringfence_sys::recv_with_fds(s.as_raw_fd(), &mut buf)
            .map_err(|e| io("receive")(e.source))?;
        let reply: SpawnReply = serde_json::from_slice(&buf[..n])
            .map_err(|e| SpawnerError::Refused(format!("unreadable answer: {e}")))?;
        match (reply, got.pop()) {
            (SpawnReply::Started { pid }, Some(pidfd)) => Ok((pid, pidfd)),
            (SpawnReply::Failed { error }, _) => Err(SpawnerError::Refused(error)),
            (SpawnReply::Started { .. }, None) => {
                Err(SpawnerError::Refused("no pidfd with the answer".into()))
            }
        }
    }
}

/// Runs a spawner on `socket` (the `--spawner` mode of the agent's executable) until it has
/// been idle for [`IDLE_EXIT`] or its socket is gone.
///
/// Each sandbox is a fork of this process that runs `init`, the agent's start, without an
/// exec: the spawner is the agent's executable already, single-threaded (one request at a
/// time, no threads, checked at each fork by [`ringfence_sys::fork_into_namespaces`]), with
/// an empty environment, and it holds nothing of any sandbox (each request's descriptors are
/// closed in the child but for the sandbox's own; the child's command line is rewritten to
/// the exec'd agent's). What a fork keeps that an exec would renew: the address-space layout
/// (ASLR) and the stack canary are the spawner's, shared by the agents it starts; no process
/// inside a sandbox can read its agent's memory or maps (the agent is the namespace's root,
/// user code runs as another uid without capabilities, and `ptrace` is not in the seccomp
/// allowlist), and every command the agent starts is exec'd afresh. A request with `exec`
/// execs `ringfence-agent --init` instead.
pub fn serve(socket: &Path, init: Init) -> Result<(), SpawnerError> {
    let io = |op| {
        let path = socket.to_path_buf();
        move |source| SpawnerError::Io { op, path, source }
    };
    // The OOM killer of the slot's memory cgroup picks among the sandbox's processes only.
    let _ = std::fs::write("/proc/self/oom_score_adj", "-1000");
    let exe = std::fs::read_link("/proc/self/exe").map_err(io("readlink /proc/self/exe"))?;
    let exe = std::ffi::CString::new(exe.as_os_str().as_encoded_bytes())
        .map_err(|e| io("exe path")(io::Error::other(e)))?;
    let _ = std::fs::remove_file(socket);
    let listener = UnixListener::bind(socket).map_err(io("bind"))?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))
        .map_err(io("chmod"))?;
    let bound = std::fs::metadata(socket).map_err(io("stat"))?.ino();
    listener.set_nonblocking(true).map_err(io("nonblocking"))?;
    let mut last = Instant::now();
    loop {
        match listener.accept() {
            Ok((conn, _)) => {
                last = Instant::now();
                let _ = answer(conn, &exe, init);
                continue;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(io("accept")(e)),
        }
        // Our children are sandbox agents, watched by their hosts through pidfds.
        while let Ok(Some(_)) = ringfence_sys::wait4(-1, true) {}
        let ours = std::fs::metadata(socket).is_ok_and(|m| m.ino() == bound);
        if !ours || last.elapsed() > IDLE_EXIT {
            if ours {
                let _ = std::fs::remove_file(socket);
            }
            return Ok(());
        }
        let mut fds = [nix::poll::PollFd::new(
            std::os::fd::AsFd::as_fd(&listener),
            nix::poll::PollFlags::POLLIN,
        )];
        let _ = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(200u16));
    }
}

fn answer(conn: UnixStream, exe: &std::ffi::CStr, init: Init) -> Result<(), SpawnerError> {
    let refuse = |m: &str| SpawnerError::Refused(m.to_string());
    conn.set_nonblocking(false).map_err(|_| refuse("blocking"))?;
    conn.set_read_timeout(Some(Duration::from_secs(2))).map_err(|_| refuse("timeout"))?;
    let cred = nix::sys::socket::getsockopt(&conn, nix::sys::socket::sockopt::PeerCredentials)
        .map_err(|_| refuse("peer credentials"))?;
    if cred.uid() != 0 {
        return Err(refuse("peer is not root"));
    }
    let mut buf = vec![0u8; 4096];
    let (n, fds) =
        ringfence_sys::recv_with_fds(conn.as_raw_fd(), &mut buf).map_err(|_| refuse("recv"))?;
    let reply = match started(&buf[..n], &fds, exe, init) {
        Ok((pid, pidfd)) => {
            let text =
                serde_json::to_vec(&SpawnReply::Started { pid }).map_err(|_| refuse("encode"))?;
            return ringfence_sys::send_with_fd(conn.as_raw_fd(), &text, Some(pidfd.as_raw_fd()))
                .map_err(|_| refuse("reply"));
        }
        Err(error) => SpawnReply::Failed { error },
    };
    let text = serde_json::to_vec(&reply).map_err(|_| refuse("encode"))?;
    let mut conn = conn;
    conn.write_all(&text).map_err(|_| refuse("reply"))
}

fn started(
    line: &[u8],
    fds: &[OwnedFd],
    exe: &std::ffi::CStr,
    init: Init,
) -> Result<(i32, OwnedFd), String> {
    let line = line.strip_suffix(b"\n").ok_or("unterminated request")?;
    let req: SpawnRequest = serde_json::from_slice(line).map_err(|e| e.to_string())?;
    let want = 4 + usize::from(req.keep_target.is_some());
    if fds.len() != want {
        return Err(format!("expected {want} descriptors, got {}", fds.len()));
    }
    let argv = [c"ringfence-agent".to_owned(), c"--init".to_owned()];
    let keep = req.keep_target.map(|t| (fds[4].as_raw_fd(), t));
    let spec = ringfence_sys::NsSpawn {
        flags: req.flags,
        exe,
        argv: &argv,
        control: fds[0].as_raw_fd(),
        parent_end: -1,
        stdio: [fds[1].as_raw_fd(), fds[2].as_raw_fd(), fds[3].as_raw_fd()],
        // This process is not the host: the agent ends with its control channel instead.
        die_with_parent: false,
        owner: req.owner,
        keep,
    };
    let pid = if req.exec {
        ringfence_sys::spawn_in_namespaces(&spec).map_err(|e| e.to_string())?
    } else {
        match ringfence_sys::fork_into_namespaces(&spec).map_err(|e| e.to_string())? {
            ringfence_sys::Forked::Parent(pid) => pid,
            ringfence_sys::Forked::Child => {
                // The sandbox's PID 1 from here on, never back into the spawner's loop. Its
                // command line is what an exec'd agent's is, not the spawner's (host paths).
                let args: Vec<&std::ffi::CStr> = argv.iter().map(|a| a.as_c_str()).collect();
                if ringfence_sys::set_cmdline(&args).is_err() {
                    std::process::exit(1);
                }
                // A panic must not unwind into the spawner's frames (their descriptors are
                // closed, their numbers the agent's now): it ends the agent as it would have
                // ended an exec'd one.
                match std::panic::catch_unwind(init) {
                    Ok(code) => std::process::exit(code),
                    Err(_) => std::process::exit(101),
                }
            }
        }
    };
    let pidfd = ringfence_sys::pidfd_open(pid).map_err(|e| e.to_string())?;
    Ok((pid, pidfd))
}
