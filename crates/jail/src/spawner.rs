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
use std::os::unix::ffi::OsStrExt;
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
    /// Host paths the new agent uses by name before it leaves the host's mount tree: its
    /// stage directory, its reconnect socket's directory, its template's host layers. A
    /// spawner whose own mount namespace lacks one refuses (see [`serve`]); the host then
    /// starts the sandbox itself.
    #[serde(default)]
    pub paths: Vec<String>,
    /// The sandbox may take the network namespace this spawner made ahead (with only `lo`,
    /// up) instead of making one in its `clone`. That namespace belongs to the host's user
    /// namespace, not the sandbox's: nothing inside may administer it (no interface, route,
    /// firewall or `net.*` sysctl changes, no `sysfs` mount), and host code that joins the
    /// sandbox's user namespace first cannot join it afterwards. So only a sandbox whose
    /// network only the host administers asks (one-shot runs, which have only `lo`; a
    /// server's, whose TUN a host thread makes and whose interpreter kernels join the network
    /// namespace first); the namespace is made once the sandboxes the spawner started have all
    /// ended (so it is ready for the slot's next), off the path of a start, and each is given
    /// to one sandbox only.
    #[serde(default)]
    pub net_ahead: bool,
}

/// The spawner answers with this (and, on success, a pidfd).
#[derive(Debug, Clone, Serialize, Deserialize)]
enum SpawnReply {
    Started {
        pid: i32,
        /// It was given the network namespace made ahead ([`SpawnRequest::net_ahead`]).
        #[serde(default)]
        net_ahead: bool,
    },
    Failed {
        error: String,
    },
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
    // This process's user namespace never changes (it is the host's: only host root calls
    // this), so it is looked up once; the server asks at every claim and kill.
    static OURS: std::sync::OnceLock<Option<(u64, u64)>> = std::sync::OnceLock::new();
    let ours = OURS
        .get_or_init(|| std::fs::metadata("/proc/self/ns/user").ok().map(|m| (m.dev(), m.ino())));
    let Some(ours) = *ours else { return false };
    let Ok(theirs) = std::fs::metadata(format!("/proc/{pid}/ns/user")) else { return false };
    if ours != (theirs.dev(), theirs.ino()) {
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

/// The socket the spawner with host pid `pid` listens on (its `--socket` argument), if `pid`
/// runs a spawner. Read from its command line, not asked over the socket: a connection only
/// to learn who listens woke the spawner for nothing, on the path of every claim.
pub fn socket_of(pid: i32) -> Option<std::path::PathBuf> {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let mut args = cmdline.split(|b| *b == 0);
    args.find(|a| *a == b"--socket")?;
    let path = args.next().filter(|p| !p.is_empty())?;
    Some(std::path::PathBuf::from(std::ffi::OsStr::from_bytes(path)))
}

/// Stops the spawner with host pid `pid` (`is_spawner` checked by the caller) and removes
/// its socket, where it has one.
pub fn stop_pid(pid: i32, socket: Option<&Path>) {
    let _ = ringfence_sys::kill(pid, libc::SIGKILL);
    if let Some(socket) = socket {
        let _ = std::fs::remove_file(socket);
    }
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

    /// The spawner listening at `socket`, which the caller knows to be there.
    pub fn at(socket: &Path) -> Spawner {
        Spawner { path: socket.to_path_buf(), exec: false }
    }

    /// [`Spawner::existing`], with the pid of the process that answers (its peer
    /// credentials), to check where it is parked.
    pub fn existing_with_pid(socket: &Path) -> Option<(Spawner, i32)> {
        let s = UnixStream::connect(socket).ok()?;
        let cred =
            nix::sys::socket::getsockopt(&s, nix::sys::socket::sockopt::PeerCredentials).ok()?;
        Some((Spawner { path: socket.to_path_buf(), exec: false }, cred.pid()))
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
    /// the slot, before waiting for it to listen. The caller holds the slot. With `reap`, a
    /// thread of this process reaps the spawner when it exits; without (a one-shot run, which
    /// exits long before its spawner and must stay single-threaded to fork as it exits), it is
    /// left to be reaped by whoever inherits it once this process is gone.
    pub fn start(
        socket: &Path,
        exe: &Path,
        park: impl FnOnce(i32) -> Result<(), SpawnerError>,
        reap: bool,
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
                if reap {
                    // Reaped when it exits, for as long as this process lives; after that by
                    // init.
                    std::thread::spawn(move || child.wait());
                }
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
    /// stderr and, with `req.keep_target`, the owner claim. Returns its pid, a pidfd, and
    /// whether it was given the network namespace made ahead.
    pub fn spawn(
        &self,
        req: &SpawnRequest,
        fds: &[RawFd],
    ) -> Result<(i32, OwnedFd, bool), SpawnerError> {
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
            (SpawnReply::Started { pid, net_ahead }, Some(pidfd)) => Ok((pid, pidfd, net_ahead)),
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
    // Before anything else: each sandbox's mount namespace starts as a copy of this one.
    let kept = keep_list(socket);
    let kept = if prune_mounts(&kept) { Some(kept) } else { None };
    // The OOM killer of the slot's memory cgroup picks among the sandbox's processes only.
    let _ = std::fs::write("/proc/self/oom_score_adj", "-1000");
    // Compiled once here, so that every agent forked below has it (`SetupSpec::seccomp_builtin`).
    let _ = crate::seccomp::builtin();
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
    let mut net = NetAhead::default();
    // The sandboxes this spawner started that have not ended, each with a pidfd of its own
    // (the host holds another) so that the poll below wakes when one ends.
    let mut live: Vec<(i32, OwnedFd)> = Vec::new();
    loop {
        match listener.accept() {
            Ok((conn, _)) => {
                last = Instant::now();
                let _ = answer(conn, &exe, init, kept.as_deref(), &mut net, &mut live);
                continue;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(io("accept")(e)),
        }
        // Our children are sandbox agents, watched by their hosts through pidfds.
        while let Ok(Some(r)) = ringfence_sys::wait4(-1, true) {
            live.retain(|(pid, _)| *pid != r.pid);
        }
        // The next sandbox's network namespace, if one is wanted, once every sandbox this
        // spawner started has ended: a slot holds one sandbox at a time, so the next request
        // comes after that, and a spawner in `unshare` (which can sleep on the kernel's
        // network mutexes, where the freezer does not stop it) is never in the way of its
        // live sandbox's freeze.
        if net.wanted && !net.ready && live.is_empty() {
            net.ready = make_net_ahead();
            // One try per request that wanted it: a host out of namespaces is not asked again
            // and again while idle.
            net.wanted = false;
        }
        let ours = std::fs::metadata(socket).is_ok_and(|m| m.ino() == bound);
        if !ours || last.elapsed() > IDLE_EXIT {
            if ours {
                let _ = std::fs::remove_file(socket);
            }
            return Ok(());
        }
        let mut fds = vec![nix::poll::PollFd::new(
            std::os::fd::AsFd::as_fd(&listener),
            nix::poll::PollFlags::POLLIN,
        )];
        // A pidfd reads as ready once its process has ended.
        fds.extend(live.iter().map(|(_, fd)| {
            nix::poll::PollFd::new(std::os::fd::AsFd::as_fd(fd), nix::poll::PollFlags::POLLIN)
        }));
        let _ = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(200u16));
    }
}

/// The spawner's network namespace made ahead (see [`SpawnRequest::net_ahead`]).
#[derive(Debug, Default)]
struct NetAhead {
    /// This process's own network namespace is fresh, made for the next sandbox that asks,
    /// with `lo` up. False from the moment a sandbox has been given it: the spawner then sits
    /// in that sandbox's namespace until it makes another, and every sandbox started
    /// meanwhile makes its own in its `clone`.
    ready: bool,
    /// A request asked for one since the last was made.
    wanted: bool,
}

/// Moves this process into a new network namespace, owned by the host's user namespace, and
/// brings its `lo` up. False where either step failed (the namespace is then not used).
fn make_net_ahead() -> bool {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).is_ok()
        && ringfence_sys::loopback_up().is_ok()
}

/// Host paths a sandbox's setup reaches by name, by prefix: `/proc` (a fresh proc mount in a
/// user namespace needs a fully visible one beside it), `/dev` (its device nodes are bound
/// in), the host's `/usr` and its merged directories (the host template's layers), the run
/// directory (the socket's directory's parent: stages and reconnect sockets) and the agent's
/// own directory (`--exec-agent` execs it).
fn keep_list(socket: &Path) -> Vec<PathBuf> {
    let mut keep: Vec<PathBuf> =
        ["/proc", "/dev", "/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"]
            .iter()
            .map(PathBuf::from)
            .collect();
    keep.extend(socket.parent().and_then(Path::parent).map(Path::to_path_buf));
    if let Ok(exe) = std::fs::read_link("/proc/self/exe") {
        keep.extend(exe.parent().map(Path::to_path_buf));
    }
    keep
}

/// Whether `path` is `prefix` or beneath it, by whole components.
fn beneath(path: &Path, prefix: &Path) -> bool {
    path.starts_with(prefix)
}

/// Gives this spawner a mount namespace of its own holding only the host's mounts that
/// sandbox setup reaches (`keep`, what is beneath it, and the mounts it sits on), all
/// private. A sandbox's `CLONE_NEWNS` copies its parent's whole mount table, and the agent
/// detaches all of it again after `pivot_root`: with the host's table (58 mounts on the dev
/// VM: other sandboxes' disks, cgroup hierarchies, test directories) both cost on every start.
/// Returns false where the namespace could not be made; sandboxes then copy the host's table,
/// as before.
fn prune_mounts(keep: &[PathBuf]) -> bool {
    use nix::mount::{MntFlags, MsFlags, mount, umount2};
    if nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).is_err() {
        return false;
    }
    // Private first, so that nothing done here reaches the host.
    if mount(None::<&str>, "/", None::<&str>, MsFlags::MS_REC | MsFlags::MS_PRIVATE, None::<&str>)
        .is_err()
    {
        return false;
    }
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else { return true };
    let mut points: Vec<PathBuf> =
        info.lines().filter_map(|l| l.split(' ').nth(4)).map(unescape_mount_point).collect();
    // Deepest first; a mount point listed twice (stacked mounts) is detached twice.
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for p in points {
        let needed = keep.iter().any(|k| beneath(&p, k) || beneath(k, &p));
        if !needed {
            // Fails for a mount already gone with its parent's detach: nothing to do.
            let _ = umount2(&p, MntFlags::MNT_DETACH);
        }
    }
    true
}

/// A mount point as `/proc/self/mountinfo` writes it, with space, tab, newline and backslash
/// escaped in octal.
fn unescape_mount_point(field: &str) -> PathBuf {
    use std::os::unix::ffi::OsStringExt;
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b.get(i + 1..i + 4).filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match (b[i], octal) {
            (b'\\', Some(d)) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    PathBuf::from(std::ffi::OsString::from_vec(out))
}

fn answer(
    conn: UnixStream,
    exe: &std::ffi::CStr,
    init: Init,
    kept: Option<&[PathBuf]>,
    net: &mut NetAhead,
    live: &mut Vec<(i32, OwnedFd)>,
) -> Result<(), SpawnerError> {
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
    let reply = match started(&buf[..n], &fds, exe, init, kept, net) {
        Ok((pid, pidfd, net_ahead)) => {
            // Tracked before the reply: a sandbox whose host is gone still lives until its
            // control channel closes.
            let fd = pidfd.as_raw_fd();
            live.push((pid, pidfd));
            let text = serde_json::to_vec(&SpawnReply::Started { pid, net_ahead })
                .map_err(|_| refuse("encode"))?;
            return ringfence_sys::send_with_fd(conn.as_raw_fd(), &text, Some(fd))
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
    kept: Option<&[PathBuf]>,
    net: &mut NetAhead,
) -> Result<(i32, OwnedFd, bool), String> {
    let line = line.strip_suffix(b"\n").ok_or("unterminated request")?;
    let req: SpawnRequest = serde_json::from_slice(line).map_err(|e| e.to_string())?;
    net.wanted |= req.net_ahead;
    if let Some(kept) = kept
        && let Some(p) =
            req.paths.iter().find(|p| !kept.iter().any(|k| beneath(Path::new(p.as_str()), k)))
    {
        return Err(format!("{p} is not in this spawner's mount namespace"));
    }
    let want = 4 + usize::from(req.keep_target.is_some());
    if fds.len() != want {
        return Err(format!("expected {want} descriptors, got {}", fds.len()));
    }
    let argv = [c"ringfence-agent".to_owned(), c"--init".to_owned()];
    let keep = req.keep_target.map(|t| (fds[4].as_raw_fd(), t));
    // The namespace made ahead is this process's own: a child cloned without CLONE_NEWNET
    // shares it. Given once: `ready` is cleared before the clone, so a failed clone does not
    // leave it to be shared by the next.
    let mut flags = req.flags;
    let net_ahead = req.net_ahead && net.ready && flags & libc::CLONE_NEWNET != 0;
    if net_ahead {
        net.ready = false;
        flags &= !libc::CLONE_NEWNET;
    }
    let spec = ringfence_sys::NsSpawn {
        flags,
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
    Ok((pid, pidfd, net_ahead))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_points_are_unescaped_as_mountinfo_escapes_them() {
        assert_eq!(unescape_mount_point("/a\\040b\\011c\\134d"), Path::new("/a b\tc\\d"));
        assert_eq!(unescape_mount_point("/plain/path"), Path::new("/plain/path"));
        // Not an escape: left as it is.
        assert_eq!(unescape_mount_point("/x\\9y\\04"), Path::new("/x\\9y\\04"));
    }

    #[test]
    fn the_kept_mounts_are_the_run_directory_the_hosts_usr_proc_and_dev() {
        let keep = keep_list(Path::new("/run/rf/cgroups/run-0.abc.spawner"));
        for p in ["/proc", "/dev", "/usr", "/run/rf"] {
            assert!(keep.contains(&PathBuf::from(p)), "{p} in {keep:?}");
        }
        // Whole components: /usrx is not beneath /usr, nor /run/rfx beneath /run/rf.
        assert!(beneath(Path::new("/usr/lib/python3"), Path::new("/usr")));
        assert!(!beneath(Path::new("/usrx"), Path::new("/usr")));
        assert!(!beneath(Path::new("/run/rfx/stage"), Path::new("/run/rf")));
        assert!(!keep.iter().any(|k| beneath(Path::new("/sys/fs/cgroup/memory"), k)));
    }

    #[test]
    fn a_request_naming_a_path_outside_the_spawners_mounts_is_refused() {
        let kept = [PathBuf::from("/usr"), PathBuf::from("/run/rf")];
        let req = |paths: &[&str]| {
            let r = SpawnRequest {
                flags: 0,
                owner: None,
                keep_target: None,
                exec: false,
                paths: paths.iter().map(|p| p.to_string()).collect(),
                net_ahead: false,
            };
            let mut line = serde_json::to_vec(&r).unwrap();
            line.push(b'\n');
            line
        };
        let never: Init = || unreachable!("no sandbox is started here");
        let net = &mut NetAhead::default();
        let refused = started(&req(&["/usr", "/srv/layer"]), &[], c"x", never, Some(&kept), net);
        assert_eq!(refused.unwrap_err(), "/srv/layer is not in this spawner's mount namespace");
        // Paths it has pass that check (and fail the next: no descriptors were sent).
        let next = started(&req(&["/usr", "/run/rf/stage"]), &[], c"x", never, Some(&kept), net);
        assert!(next.unwrap_err().starts_with("expected 4 descriptors"));
    }
}
