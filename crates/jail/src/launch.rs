//! Host side of starting a sandbox: fork into new namespaces, map ids, join the cgroup slot,
//! hand the agent its setup, and wait for it to report ready.

use std::ffi::CString;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};
use ringfence_proto::{
    Event, HostLayer, Phase, ProtoError, Ready, Rlimits, SetupSpec, SpawnSpec, read_frame,
};
use ringfence_sys::SysError;

use crate::cgroup::{CgroupError, Lease, Pool};
use crate::disk::{Disk, DiskBackend, DiskError};
use crate::limits::Limits;
use crate::preflight::Missing;
use crate::seccomp::{Compiled, SeccompError};
use crate::template::{Template, TemplateError};
use crate::{ID_RANGE, JailConfig};

/// Everything that can go wrong starting or running a jail.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error(transparent)]
    Missing(#[from] Missing),
    #[error("cgroups: {0}")]
    Cgroup(#[from] CgroupError),
    #[error("sandbox owner uid: {0}")]
    Owner(#[from] crate::owner::OwnerError),
    #[error(transparent)]
    Disk(#[from] DiskError),
    #[error(transparent)]
    Template(#[from] TemplateError),
    #[error(transparent)]
    Seccomp(#[from] SeccompError),
    #[error(transparent)]
    Sys(#[from] SysError),
    #[error("{op}: {source}")]
    Io {
        op: String,
        #[source]
        source: io::Error,
    },
    #[error("agent channel: {0}")]
    Proto(#[from] ProtoError),
    #[error("{step}: {message}")]
    Setup { step: String, message: String },
    #[error("the sandbox agent exited during setup (wait status {0:#x})")]
    AgentDied(i32),
    #[error("the sandbox agent sent an unexpected message during setup: {0}")]
    Protocol(String),
    #[error("sandbox setup did not finish within {0:?}")]
    SetupTimeout(Duration),
}

fn io_op(op: impl Into<String>) -> impl FnOnce(io::Error) -> JailError {
    let op = op.into();
    move |source| JailError::Io { op, source }
}

/// What to build. The defaults give a `jail` sandbox with every layer on.
#[derive(Debug)]
pub struct SandboxSpec {
    pub id: String,
    pub template: Template,
    pub limits: Limits,
    /// Which seccomp filter the sandbox's processes get.
    pub seccomp: Seccomp,
    pub landlock: bool,
    /// Paths inside the sandbox where Landlock allows writes.
    pub writable: Vec<String>,
    /// Read-only layers above the template, topmost first (see [`crate::layer`]).
    pub layers: Vec<std::path::PathBuf>,
    /// Environment for every process in the sandbox (see [`SetupSpec::env`]).
    pub env: std::collections::BTreeMap<String, String>,
    pub initial: Option<SpawnSpec>,
    pub exit_with_initial: bool,
    /// Become the agent's fds 0, 1, 2 (and so the initial process's, with inherited stdio).
    pub stdio: [RawFd; 3],
    /// Kill the sandbox if the calling thread dies (one-shot CLI runs).
    pub die_with_parent: bool,
    /// Let a new host process reconnect to the agent after this one's channel closes (the
    /// server, so sandboxes survive its restart). See [`Sandbox::adopt`].
    pub reconnectable: bool,
    /// Give up if the agent is not ready within this time.
    pub setup_timeout: Duration,
    /// Let setuid binaries raise processes to the sandbox's own root (templates that ship
    /// `sudo`, see [`SetupSpec::allow_setuid`]); also lets Landlock allow writes beneath
    /// [`SETUID_WRITABLE`], where a package manager run as that root installs.
    pub allow_setuid: bool,
    /// Volumes: a host directory (files kept with canonical ids) and where it is attached
    /// inside, writable through the sandbox's id mapping (see `ringfence_sys::idmapped_writable_tree`).
    pub volumes: Vec<(std::path::PathBuf, String)>,
    /// Let a spawner give the sandbox the network namespace it made ahead, while idle,
    /// instead of a new one made by the sandbox's own `clone` (see
    /// [`crate::spawner::SpawnRequest::net_ahead`]). For sandboxes whose network only the host
    /// administers: one-shot runs (only `lo`) and a server's (a TUN made by a host thread).
    pub net_ahead: bool,
}

/// The seccomp filter of a sandbox ([`SandboxSpec::seccomp`]).
#[derive(Debug, Clone)]
pub enum Seccomp {
    /// None (for layer-cost measurement only).
    Off,
    /// The built-in default profile, with user notification, installed from the agent's own
    /// copy ([`crate::seccomp::builtin`], compiled once by the spawner that forks it): this
    /// process need not compile it, nor send it.
    Builtin,
    /// This compiled filter, sent in the setup message.
    Compiled(Compiled),
}

impl Seccomp {
    fn compiled(&self) -> Option<&Compiled> {
        match self {
            Seccomp::Compiled(c) => Some(c),
            Seccomp::Off | Seccomp::Builtin => None,
        }
    }
}

impl SandboxSpec {
    /// A sandbox with every layer on: default limits and writable paths, no initial process,
    /// serving requests until its channel closes. Callers adjust fields from there.
    pub fn new(id: String, template: Template, seccomp: Seccomp, stdio: [RawFd; 3]) -> Self {
        SandboxSpec {
            id,
            template,
            limits: Limits::default(),
            seccomp,
            landlock: true,
            writable: DEFAULT_WRITABLE.iter().map(|s| (*s).to_string()).collect(),
            layers: Vec::new(),
            env: Default::default(),
            initial: None,
            exit_with_initial: false,
            stdio,
            die_with_parent: false,
            reconnectable: false,
            setup_timeout: Duration::from_secs(30),
            allow_setuid: false,
            volumes: Vec::new(),
            net_ahead: false,
        }
    }
}

/// More paths Landlock lets processes write beneath in sandboxes whose template allows setuid
/// (`sudo`): `apt-get install` as the sandbox's root writes to `/usr` and `/etc`. The writes
/// land in the sandbox's own writable layer (the template's layers are read-only mounts);
/// `/proc`, `/sys` and `/dev` stay out of reach as before.
pub const SETUID_WRITABLE: &[&str] = &["/etc", "/usr"];

/// Paths inside the sandbox that Landlock lets processes write beneath.
pub const DEFAULT_WRITABLE: &[&str] = &[
    "/home",
    "/tmp",
    "/var",
    "/root",
    "/run",
    "/opt",
    "/srv",
    "/mnt",
    "/dev/shm",
    "/dev/pts",
    "/dev/null",
    "/dev/zero",
    "/dev/full",
    "/dev/tty",
    "/dev/random",
    "/dev/urandom",
];

/// Size of a sandbox's `/dev/shm`. It is a tmpfs, so memory charged to the sandbox: at most
/// half its memory limit (filling it then fails with ENOSPC while processes still have room,
/// rather than ending in the OOM killer) and at most 256 MiB.
pub fn shm_bytes(limits: &Limits) -> u64 {
    let cap = 256 << 20;
    limits.memory.map_or(cap, |m| (m / 2).min(cap)).max(1 << 20)
}

/// The resource limits every process in a sandbox starts under.
pub fn rlimits_for(limits: &Limits) -> Rlimits {
    Rlimits { nofile: limits.nofile, nproc: limits.pids.unwrap_or(65536).max(64), core: 0 }
}

/// A running sandbox. Dropping it kills everything inside and frees its cgroup slot.
#[derive(Debug)]
pub struct Sandbox {
    pub id: String,
    /// Host pid of the agent (PID 1 inside).
    pub pid: i32,
    pub ready: Ready,
    control: UnixStream,
    listener: Option<OwnedFd>,
    lease: Option<Lease>,
    reaped: bool,
    started: std::time::Instant,
    /// Host-side start-up phases, then the agent's (see [`Sandbox::phases`]).
    phases: Vec<Phase>,
    /// Directory of the agent's reconnect socket, removed with the sandbox.
    socket_dir: Option<std::path::PathBuf>,
    /// Started by another host process: not our child, so it cannot be waited for.
    adopted: bool,
    /// The tmpfs upper layer's parent, handed over by the agent (no disk of its own).
    stage: Option<OwnedFd>,
    /// The sandbox's own disk. Last, so it is removed after the lease has killed everything.
    disk: Option<Disk>,
    /// The host id the sandbox's root maps to (see [`crate::owner`]).
    id_base: u32,
    /// Set when the slot's spawner started the agent: it is not our child, so it is watched
    /// and signalled through this instead of `wait4` and its pid.
    pidfd: Option<OwnedFd>,
    /// The spawner gave it the network namespace it made ahead.
    net_made_ahead: bool,
}

/// Marker bytes the agent sends, with or without a descriptor, before any frame.
pub const MARK_LISTENER: u8 = b'F';
pub const MARK_NO_LISTENER: u8 = b'N';
pub const MARK_ERROR: u8 = b'E';
/// The agent has descriptors for the host: the numbers of its seccomp listener and of its
/// stage directory (a tmpfs disk's) follow as two 4-byte little-endian integers, -1 for none,
/// for the host to take with `pidfd_getfd`; it closes its copies on [`ACK_TAKEN`], or sends
/// them (marker [`MARK_LISTENER`] or [`MARK_NO_LISTENER`]) on [`ACK_SEND`].
///
/// Descriptors passed over unix sockets count against their sender's uid until received
/// (`unix_inflight`, checked against the sender's RLIMIT_NOFILE), and every sandbox's root is
/// the same host uid: one sandbox holding a few thousand descriptors in flight would make every
/// later agent's `SCM_RIGHTS` send fail, and with it every sandbox start on the host. Taking
/// the descriptor from the host side involves no send from a sandbox uid.
pub const MARK_PULL: u8 = b'P';
/// Host to agent, after [`MARK_PULL`]: the host has its copy.
pub const ACK_TAKEN: u8 = b'K';
/// Host to agent, after [`MARK_PULL`]: `pidfd_getfd` is refused here (Yama's ptrace_scope 3,
/// an LSM): send it instead.
pub const ACK_SEND: u8 = b'S';

/// What [`Sandbox::recv_marker`] received: the marker, the descriptors it carried and, where
/// the agent's event came ahead of them, that event (see there).
type Handover = (u8, Vec<OwnedFd>, Option<Option<Event>>);

impl Sandbox {
    /// Starts a sandbox and waits until its agent is ready.
    pub fn start(
        cfg: &JailConfig,
        pool: Option<&Pool>,
        spec: SandboxSpec,
    ) -> Result<Sandbox, JailError> {
        let mut phases = Vec::new();
        crate::phase(&mut phases, "start");
        let lease = pool.map(|p| p.claim(&spec.limits)).transpose()?;
        crate::phase(&mut phases, "cgroup_claimed");
        let owner = crate::owner::claim(&cfg.owner_dir, cfg.uid_base)?;
        let id_base = owner.id_base();
        let disk = match &cfg.disk {
            // The sandbox's root maps to its slot's id base: it owns its disk, no other uid may
            // enter.
            DiskBackend::Image(disks) => Some(disks.claim(&spec.id, spec.limits.disk, id_base)?),
            DiskBackend::Tmpfs => None,
        };
        crate::phase(&mut phases, "disk_claimed");
        std::fs::create_dir_all(cfg.run_dir.join("stage")).map_err(io_op("create stage dir"))?;
        let (parent_end, child_end) =
            socketpair(AddressFamily::Unix, SockType::Stream, None, SockFlag::SOCK_CLOEXEC)
                .map_err(|e| JailError::Io { op: "socketpair".into(), source: e.into() })?;
        let exe = CString::new(cfg.agent_path.as_os_str().as_bytes())
            .map_err(|e| JailError::Io { op: "agent path".into(), source: io::Error::other(e) })?;
        let argv = [c"ringfence-agent".to_owned(), c"--init".to_owned()];
        // Born in its cgroup slot by the slot's spawner where there is one; the host's own
        // clone (then moved into the slot) otherwise, or if the spawner fails.
        let spawned = match lease.as_ref().and_then(Lease::spawner) {
            Some(spawner) if spec.stdio.iter().all(|fd| *fd >= 0) => {
                let req = crate::spawner::SpawnRequest {
                    flags: ringfence_sys::SANDBOX_NAMESPACES,
                    owner: Some(owner.uid()),
                    keep_target: Some(ringfence_proto::OWNER_LOCK_FD),
                    exec: spawner.execs(),
                    net_ahead: spec.net_ahead,
                    // What the agent reaches by host path (see `inside::setup`).
                    paths: spec
                        .template
                        .meta
                        .host_layers
                        .iter()
                        .cloned()
                        .chain([cfg.run_dir.join("stage").to_string_lossy().into_owned()])
                        .chain(spec.reconnectable.then(|| {
                            agent_socket_dir(cfg, &spec.id).to_string_lossy().into_owned()
                        }))
                        .collect(),
                };
                let [i, o, e] = spec.stdio;
                match spawner.spawn(&req, &[child_end.as_raw_fd(), i, o, e, owner.fd()]) {
                    Ok(p) => Some(p),
                    Err(e) => {
                        tracing::info!(error = %e, "spawner failed; starting the sandbox directly");
                        None
                    }
                }
            }
            _ => None,
        };
        let (pid, pidfd, net_made_ahead) = match spawned {
            Some((pid, pidfd, net)) => (pid, Some(pidfd), net),
            None => {
                let pid = ringfence_sys::spawn_in_namespaces(&ringfence_sys::NsSpawn {
                    flags: ringfence_sys::SANDBOX_NAMESPACES,
                    exe: &exe,
                    argv: &argv,
                    control: child_end.as_raw_fd(),
                    parent_end: parent_end.as_raw_fd(),
                    stdio: spec.stdio,
                    die_with_parent: spec.die_with_parent,
                    owner: Some(owner.uid()),
                    keep: Some((owner.fd(), ringfence_proto::OWNER_LOCK_FD)),
                })?;
                (pid, None, false)
            }
        };
        drop(child_end);
        // The agent holds the claim from here on, for as long as it lives.
        drop(owner);
        crate::phase(&mut phases, "cloned");
        let mut sandbox = Sandbox {
            id: spec.id.clone(),
            pid,
            ready: Ready { phases: Vec::new(), landlock_abi: None, initial_pid: None },
            control: UnixStream::from(parent_end),
            listener: None,
            lease,
            reaped: false,
            started: std::time::Instant::now(),
            phases,
            socket_dir: None,
            adopted: false,
            stage: None,
            disk,
            id_base,
            pidfd,
            net_made_ahead,
        };
        // On any error below, dropping `sandbox` kills the child and frees the slot.
        sandbox.configure(cfg, spec)?;
        Ok(sandbox)
    }

    fn configure(&mut self, cfg: &JailConfig, spec: SandboxSpec) -> Result<(), JailError> {
        let map = format!("0 {} {ID_RANGE}\n", self.id_base);
        for file in ["uid_map", "gid_map"] {
            std::fs::write(format!("/proc/{}/{file}", self.pid), &map)
                .map_err(io_op(format!("write {file}")))?;
        }
        crate::phase(&mut self.phases, "id_maps");
        // A spawner's child was born in the slot.
        if let (Some(lease), None) = (&self.lease, &self.pidfd) {
            lease.add(self.pid)?;
        }
        crate::phase(&mut self.phases, "cgroup_attached");
        let listen = if spec.reconnectable {
            let dir = agent_socket_dir(cfg, &spec.id);
            std::fs::create_dir_all(&dir).map_err(io_op(format!("create {}", dir.display())))?;
            // Only the sandbox's root (which binds the socket) and host root may enter.
            nix::unistd::chown(
                &dir,
                Some(nix::unistd::Uid::from_raw(self.id_base)),
                Some(nix::unistd::Gid::from_raw(self.id_base)),
            )
            .map_err(|e| JailError::Io {
                op: format!("chown {}", dir.display()),
                source: e.into(),
            })?;
            std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
                .map_err(io_op(format!("chmod {}", dir.display())))?;
            self.socket_dir = Some(dir.clone());
            Some(dir.join("agent.sock").to_string_lossy().into_owned())
        } else {
            None
        };
        let setup = SetupSpec {
            listen,
            sandbox_id: spec.id,
            stage_dir: cfg.run_dir.join("stage").to_string_lossy().into_owned(),
            lowers: u32::try_from(spec.layers.len() + 1)
                .map_err(|_| JailError::Protocol(format!("{} lower layers", spec.layers.len())))?,
            host_layers: spec
                .template
                .meta
                .host_layers
                .iter()
                .map(|p| HostLayer { path: p.clone() })
                .collect(),
            volumes: spec.volumes.iter().map(|(_, inside)| inside.clone()).collect(),
            own_disk: self.disk.is_some(),
            disk_bytes: spec.limits.disk,
            disk_inodes: (spec.limits.disk / 8192).max(16384),
            shm_bytes: shm_bytes(&spec.limits),
            writable: match (spec.landlock, spec.allow_setuid) {
                (false, _) => Vec::new(),
                (true, setuid) => {
                    let mut w = spec.writable;
                    if setuid {
                        w.extend(SETUID_WRITABLE.iter().map(|s| (*s).to_string()));
                    }
                    // A volume is written where it is attached.
                    w.extend(spec.volumes.iter().map(|(_, inside)| inside.clone()));
                    w
                }
            },
            require_landlock: false,
            rlimits: rlimits_for(&spec.limits),
            seccomp_notify: spec.seccomp.compiled().map(|c| c.sandbox.clone()).unwrap_or_default(),
            seccomp_errno: spec.seccomp.compiled().map(|c| c.clone3.clone()).unwrap_or_default(),
            seccomp_builtin: matches!(spec.seccomp, Seccomp::Builtin),
            env: spec.env,
            initial: spec.initial,
            exit_with_initial: spec.exit_with_initial,
            allow_setuid: spec.allow_setuid,
            packet_relay: None,
            guest_nic: None,
        };
        // The agent may send `Ready` right after offering its descriptors (see
        // `recv_marker`).
        let early_ready = setup.ready_before_answer();
        let mut msg = vec![1u8];
        msg.extend_from_slice(&ringfence_proto::encode(&setup)?);
        self.control.write_all(&msg).map_err(io_op("send setup to agent"))?;
        self.send_trees(&spec.template.rootfs, &spec.layers, spec.allow_setuid, &spec.volumes)?;
        crate::phase(&mut self.phases, "lowers_sent");
        self.control.set_read_timeout(Some(spec.setup_timeout)).map_err(io_op("set timeout"))?;
        let (mark, mut fds, early) = self.recv_marker(spec.setup_timeout, early_ready)?;
        // Without a disk of its own, the agent hands over its stage (the tmpfs upper layer's
        // parent) after the listener, and keeps no copy.
        if self.disk.is_none() && mark != MARK_ERROR {
            self.stage = fds.pop();
        }
        if mark == MARK_LISTENER {
            self.listener = fds.pop();
        }
        if !fds.is_empty() {
            return Err(JailError::Protocol(format!("marker {mark:#x} with extra descriptors")));
        }
        let event: Option<Event> = match early {
            Some(event) => event,
            None => {
                read_frame(&mut self.control).map_err(|e| self.timeout_or(e, spec.setup_timeout))?
            }
        };
        self.control.set_read_timeout(None).map_err(io_op("clear timeout"))?;
        match (mark, event) {
            (MARK_LISTENER | MARK_NO_LISTENER, Some(Event::Ready(r))) => {
                self.ready = r;
                crate::phase(&mut self.phases, "ready");
                Ok(())
            }
            (_, Some(Event::SetupFailed { step, message })) => {
                Err(JailError::Setup { step, message })
            }
            (_, None) => Err(self.died()),
            (_, Some(other)) => Err(JailError::Protocol(format!("{other:?}"))),
        }
    }

    fn timeout_or(&mut self, e: ProtoError, limit: Duration) -> JailError {
        match &e {
            ProtoError::Io(io)
                if matches!(io.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut)
                    && self.started.elapsed() >= limit =>
            {
                JailError::SetupTimeout(limit)
            }
            _ => e.into(),
        }
    }

    fn died(&mut self) -> JailError {
        if self.pidfd.is_some() {
            self.wait_pidfd();
            return JailError::Protocol("the agent exited during setup".into());
        }
        match ringfence_sys::wait4(self.pid, false) {
            Ok(Some(r)) => {
                self.reaped = true;
                JailError::AgentDied(r.status)
            }
            _ => JailError::Protocol("agent closed its channel".into()),
        }
    }

    /// Receives one marker byte and any descriptors sent with it.
    fn recv_marker_byte(&mut self, limit: Duration) -> Result<(u8, Vec<OwnedFd>), JailError> {
        let mut byte = [0u8; 1];
        let (n, fds) = match ringfence_sys::recv_with_fds(self.control.as_raw_fd(), &mut byte) {
            Ok(r) => r,
            Err(e) if e.errno() == Some(libc::EAGAIN) && self.started.elapsed() >= limit => {
                return Err(JailError::SetupTimeout(limit));
            }
            Err(e) => return Err(e.into()),
        };
        if n == 0 {
            return Err(self.died());
        }
        Ok((byte[0], fds))
    }

    /// Receives the agent's marker and, with it, the seccomp listener (marker `F`) and, for a
    /// tmpfs disk, the stage directory, in that order: taken with `pidfd_getfd` when the agent
    /// offers them ([`MARK_PULL`]), sent by it only where that is refused.
    ///
    /// With `early_ready` (no initial process), an agent that offers descriptors sends its
    /// next event right after the offer, without waiting for the answer: one round trip
    /// fewer per start. That event is read here where it precedes the descriptors (the
    /// refused case) and returned as the third value; `None` there means the caller reads it
    /// next from the channel.
    fn recv_marker(&mut self, limit: Duration, early_ready: bool) -> Result<Handover, JailError> {
        let stage = usize::from(self.disk.is_none());
        let (byte, fds) = self.recv_marker_byte(limit)?;
        if byte != MARK_PULL || !fds.is_empty() {
            return Self::check_sent(byte, fds, stage).map(|(b, f)| (b, f, None));
        }
        let mut nums = [0u8; 8];
        self.control.read_exact(&mut nums).map_err(io_op("read descriptor numbers"))?;
        let listener = i32::from_le_bytes([nums[0], nums[1], nums[2], nums[3]]);
        let stage_fd = i32::from_le_bytes([nums[4], nums[5], nums[6], nums[7]]);
        if usize::from(stage_fd >= 0) != stage {
            return Err(JailError::Protocol("stage descriptor offered or missing".into()));
        }
        let wanted: Vec<i32> = [listener, stage_fd].into_iter().filter(|n| *n >= 0).collect();
        let taken: Result<Vec<OwnedFd>, _> = ringfence_sys::pidfd_open(self.pid)
            .and_then(|p| wanted.iter().map(|n| ringfence_sys::pidfd_getfd(&p, *n)).collect());
        match taken {
            Ok(fds) => {
                self.control.write_all(&[ACK_TAKEN]).map_err(io_op("ack descriptors"))?;
                Ok((if listener >= 0 { MARK_LISTENER } else { MARK_NO_LISTENER }, fds, None))
            }
            Err(e) => {
                tracing::debug!(error = %e, "taking the agent's descriptors failed; asking for them");
                self.control.write_all(&[ACK_SEND]).map_err(io_op("ask for descriptors"))?;
                // The agent's early event is ahead of the descriptors in the stream; read
                // exactly its frame, so the marker byte that carries them is left whole.
                let early = if early_ready {
                    Some(read_frame(&mut self.control).map_err(|e| self.timeout_or(e, limit))?)
                } else {
                    None
                };
                let (byte, fds) = self.recv_marker_byte(limit)?;
                Self::check_sent(byte, fds, stage).map(|(b, f)| (b, f, early))
            }
        }
    }

    /// Checks a marker and the descriptors sent with it: the listener (marker `F`) and the
    /// stage (`stage` of them) or, with an error, none.
    fn check_sent(
        byte: u8,
        fds: Vec<OwnedFd>,
        stage: usize,
    ) -> Result<(u8, Vec<OwnedFd>), JailError> {
        match byte {
            MARK_LISTENER if fds.len() == 1 + stage => Ok((MARK_LISTENER, fds)),
            MARK_NO_LISTENER if fds.len() == stage => Ok((MARK_NO_LISTENER, fds)),
            MARK_ERROR if fds.is_empty() => Ok((MARK_ERROR, fds)),
            b => Err(JailError::Protocol(format!("marker {b:#x} with {} descriptors", fds.len()))),
        }
    }

    /// Reattaches to a sandbox started (with `reconnectable`) by an earlier host process:
    /// verifies that `pid` is still the agent in the slot `lease` holds, and connects to its
    /// reconnect socket. The seccomp listener of the old process is gone: denied calls now fail
    /// with ENOSYS instead of EPERM and are no longer attributed.
    pub fn adopt(cfg: &JailConfig, id: &str, pid: i32, lease: Lease) -> Result<Sandbox, JailError> {
        if !lease.procs().contains(&pid) {
            return Err(JailError::Protocol(format!(
                "agent {pid} is no longer in its cgroup slot"
            )));
        }
        let dir = agent_socket_dir(cfg, id);
        let id_base = read_id_base(pid)?;
        let control = UnixStream::connect(dir.join("agent.sock"))
            .map_err(io_op(format!("connect to {}", dir.join("agent.sock").display())))?;
        // Its disk, if it was started with one: locked again, so no sweep takes it.
        let disk = match &cfg.disk {
            DiskBackend::Image(disks) => disks.adopt(id)?,
            DiskBackend::Tmpfs => None,
        };
        Ok(Sandbox {
            id: id.to_string(),
            pid,
            ready: Ready { phases: Vec::new(), landlock_abi: None, initial_pid: None },
            control,
            listener: None,
            lease: Some(lease),
            reaped: false,
            started: std::time::Instant::now(),
            phases: Vec::new(),
            socket_dir: Some(dir),
            adopted: true,
            stage: None,
            disk,
            id_base,
            pidfd: None,
            // Not known after a restart; only a one-shot run's report says it.
            net_made_ahead: false,
        })
    }

    /// Sends the agent its lower layers (topmost first, the template last) as detached,
    /// read-only mounts shown through this sandbox's id mapping: files stored with canonical
    /// ids (`0..ID_RANGE`, see [`crate::owner`]) read as this sandbox's own ids, and no path
    /// to the host's template or layer directories is needed inside. Then its disk, if it has
    /// one, as a plain detached mount (its files already carry the sandbox's host ids).
    fn send_trees(
        &mut self,
        template: &std::path::Path,
        layers: &[std::path::PathBuf],
        allow_setuid: bool,
        volumes: &[(std::path::PathBuf, String)],
    ) -> Result<(), JailError> {
        let userns: OwnedFd = std::fs::File::open(format!("/proc/{}/ns/user", self.pid))
            .map_err(io_op("open the sandbox's user namespace"))?
            .into();
        for dir in layers.iter().map(|p| p.as_path()).chain([template]) {
            let tree = ringfence_sys::idmapped_tree(dir, &userns, allow_setuid).map_err(|e| {
                // EINVAL: the filesystem cannot do idmapped mounts (overlayfs, NFS, FUSE; tmpfs
                // before Linux 6.3); say what to do rather than only what failed.
                let hint = if e.errno() == Some(libc::EINVAL) {
                    " (the data directory's filesystem cannot do idmapped mounts: put \
                     --data-dir on ext4, xfs, btrfs or, on Linux 6.3 and later, tmpfs)"
                } else {
                    ""
                };
                JailError::Io {
                    op: format!(
                        "mount layer {} through the sandbox's id mapping{hint}",
                        layer_name(dir)
                    ),
                    source: e.source,
                }
            })?;
            self.send_tree(&tree)?;
        }
        if let Some(disk) = &self.disk {
            let tree = ringfence_sys::detached_tree(disk.root()).map_err(|e| JailError::Io {
                op: "clone the disk's mount".into(),
                source: e.source,
            })?;
            self.send_tree(&tree)?;
        }
        for (dir, inside) in volumes {
            let tree =
                ringfence_sys::idmapped_writable_tree(dir, &userns).map_err(|e| JailError::Io {
                    op: format!("mount the volume for {inside} through the sandbox's id mapping"),
                    source: e.source,
                })?;
            self.send_tree(&tree)?;
        }
        Ok(())
    }

    fn send_tree(&self, tree: &OwnedFd) -> Result<(), JailError> {
        ringfence_sys::send_with_fd(
            self.control.as_raw_fd(),
            &[ringfence_proto::LOWER_MARK],
            Some(tree.as_raw_fd()),
        )
        .map_err(|e| JailError::Io { op: "send a mount to the agent".into(), source: e.source })
    }

    /// The first host id of this sandbox's range: what its root maps to.
    pub fn id_base(&self) -> u32 {
        self.id_base
    }

    /// The host uid owning this sandbox's user namespace, which the kernel charges with the
    /// sandbox's per-user counts (see [`crate::owner`]). `None` once the agent is gone.
    pub fn owner_uid(&self) -> Option<u32> {
        if !self.agent_is_current() {
            return None;
        }
        ringfence_sys::userns_owner(self.pid).ok()
    }

    /// The cgroup slot this sandbox holds.
    pub fn slot(&self) -> Option<u32> {
        self.lease.as_ref().map(Lease::slot)
    }

    /// Start-up phases of this sandbox, host's and agent's merged in time order.
    pub fn phases(&self) -> Vec<Phase> {
        let mut all: Vec<Phase> = self.phases.iter().chain(&self.ready.phases).cloned().collect();
        all.sort_by_key(|p| p.at_ns);
        all
    }

    /// The control channel to the agent.
    pub fn control(&self) -> &UnixStream {
        &self.control
    }

    /// A second handle to the control channel (for a reader thread).
    pub fn control_clone(&self) -> Result<UnixStream, JailError> {
        self.control.try_clone().map_err(io_op("clone control channel"))
    }

    /// The sandbox's writable layer as the host sees it: on its disk, or (tmpfs) through the
    /// stage descriptor the agent handed over. `None` for a tmpfs sandbox this process adopted:
    /// the descriptor stayed with the process that started it.
    pub fn upper_dir(&self) -> Option<std::path::PathBuf> {
        if let Some(d) = &self.disk {
            return Some(d.upper());
        }
        let fd = self.stage.as_ref()?.as_raw_fd();
        Some(std::path::PathBuf::from(format!("/proc/self/fd/{fd}/upper")))
    }

    /// Takes the sandbox's disk out of the host's mount namespace (see [`Disk::detach`]): for
    /// one-shot sandboxes, whose upper layer the host never reads.
    pub fn detach_disk(&mut self) -> Result<(), JailError> {
        match &mut self.disk {
            Some(d) => Ok(d.detach()?),
            None => Ok(()),
        }
    }

    /// Hands the sandbox's disk to the caller once the sandbox has ended (after
    /// [`Sandbox::wait`]), so that its removal can happen after this handle is gone: a one-shot
    /// run leaves it to a process of its own and exits without waiting for the filesystem's
    /// teardown. `None` while the sandbox may still run (its disk is still in use).
    pub fn take_disk(&mut self) -> Option<Disk> {
        if !self.reaped {
            return None;
        }
        self.disk.take()
    }

    /// Whether the sandbox was given the network namespace its spawner made ahead
    /// ([`SandboxSpec::net_ahead`]).
    pub fn net_made_ahead(&self) -> bool {
        self.net_made_ahead
    }

    /// Whether the sandbox's disk was made ahead of its start
    /// ([`crate::disk::DiskPool::with_spares`]).
    pub fn disk_made_ahead(&self) -> bool {
        self.disk.as_ref().is_some_and(Disk::made_ahead)
    }

    /// Where this sandbox's writable layer lives: "image" or "tmpfs".
    pub fn disk_backend(&self) -> &'static str {
        if self.disk.is_some() { "image" } else { "tmpfs" }
    }

    /// Stops every process in the sandbox (cgroup freezer) until [`Sandbox::thaw`].
    pub fn freeze(&self) -> Result<(), JailError> {
        match &self.lease {
            Some(lease) => Ok(lease.freeze()?),
            None => Err(JailError::Setup {
                step: "freeze".into(),
                message: "the sandbox has no cgroup".into(),
            }),
        }
    }

    /// Lets a frozen sandbox run again.
    pub fn thaw(&self) -> Result<(), JailError> {
        match &self.lease {
            Some(lease) => Ok(lease.thaw()?),
            None => Ok(()),
        }
    }

    /// Puts `pid` (a process entering from outside, see [`crate::zygote`]) into this sandbox's
    /// cgroup slot, so its limits and its kill apply to it.
    pub fn add_process(&self, pid: i32) -> Result<(), JailError> {
        match &self.lease {
            Some(lease) => Ok(lease.add(pid)?),
            None => Ok(()),
        }
    }

    /// Whether the agent's pid still names this sandbox's agent. For our own child the pid
    /// cannot be reused before we reap it; an adopted agent is checked against the cgroup.
    pub fn agent_is_current(&self) -> bool {
        if self.reaped {
            return false;
        }
        if let Some(fd) = &self.pidfd {
            return !exited(fd);
        }
        if !self.adopted {
            return true;
        }
        self.lease.as_ref().is_some_and(|l| l.procs().contains(&self.pid))
    }

    /// Takes the seccomp user-notification descriptor (the supervisor owns it from then on).
    pub fn take_listener(&mut self) -> Option<OwnedFd> {
        self.listener.take()
    }

    /// SIGKILLs the agent; the kernel then kills everything else in its pid namespace.
    pub fn kill(&self) {
        if self.reaped {
            return;
        }
        if self.adopted {
            // Not our child: make sure the pid still is the agent before signalling it.
            if let Some(lease) = &self.lease {
                let _ = lease.kill_all();
            }
            return;
        }
        match &self.pidfd {
            Some(fd) => {
                let _ = ringfence_sys::pidfd_send_signal(fd, libc::SIGKILL);
            }
            None => {
                let _ = ringfence_sys::kill(self.pid, libc::SIGKILL);
            }
        }
        // A paused (frozen) sandbox takes its SIGKILL only once thawed.
        if let Some(lease) = &self.lease {
            let _ = lease.thaw_if_frozen();
        }
    }

    /// Kills the sandbox and lets its cgroup slot go without waiting for the agent to end
    /// (see [`Lease::release_unwaited`]): its end, once killed, is mostly the kernel's
    /// teardown of its namespaces (the mount namespace's unmounts), which a caller that only
    /// wants the command's outcome need not wait for. What is left to wait for, the agent's
    /// pidfd and the disk it still has mounted, comes back in the [`Ending`].
    ///
    /// Only for an agent a slot's spawner started, which is watched through its pidfd from
    /// any process; an agent that is this process's own child can be reaped only here, and
    /// comes back as `Err` (as does an adopted one).
    pub fn let_go(mut self) -> Result<Ending, Box<Sandbox>> {
        if self.reaped || self.adopted || self.pidfd.is_none() {
            return Err(Box::new(self));
        }
        self.kill();
        let pidfd = self.pidfd.take();
        let disk = self.disk.take();
        if let Some(lease) = self.lease.take() {
            lease.release_unwaited();
        }
        // Nothing left here to wait for: the `Ending` carries it.
        self.reaped = true;
        match pidfd {
            Some(pidfd) => Ok(Ending { pidfd, disk }),
            None => Err(Box::new(self)),
        }
    }

    /// Waits for the agent to exit and reaps it.
    pub fn wait(&mut self) -> Result<Option<ringfence_sys::Reaped>, JailError> {
        if self.reaped || self.adopted {
            return Ok(None);
        }
        if self.pidfd.is_some() {
            // Its parent, the spawner, reaps it; we learn only that it ended.
            self.wait_pidfd();
            return Ok(None);
        }
        let r = ringfence_sys::wait4(self.pid, false)?;
        self.reaped = true;
        Ok(r)
    }

    /// Blocks until the agent a spawner started has exited.
    fn wait_pidfd(&mut self) {
        if let Some(fd) = &self.pidfd {
            use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
            loop {
                let mut fds = [PollFd::new(std::os::fd::AsFd::as_fd(fd), PollFlags::POLLIN)];
                match poll(&mut fds, PollTimeout::NONE) {
                    Ok(n) if n > 0 => break,
                    Err(nix::Error::EINTR) | Ok(_) => continue,
                    Err(_) => break,
                }
            }
            self.reaped = true;
        }
    }

    /// OOM kills inside the sandbox so far.
    pub fn oom_kills(&self) -> u64 {
        self.lease.as_ref().map_or(0, Lease::oom_kills)
    }

    /// Peak memory of the sandbox (bytes), where cgroups are on.
    pub fn memory_peak(&self) -> Option<u64> {
        self.lease.as_ref().and_then(Lease::memory_peak)
    }

    /// Resource use from the sandbox's cgroup slot, where cgroups are on.
    pub fn usage(&self) -> Option<crate::cgroup::Usage> {
        self.lease.as_ref().map(Lease::usage)
    }

    /// See [`Lease::limit_events`]; (0, 0) without cgroups.
    pub fn limit_events(&self) -> (u64, u64) {
        self.lease.as_ref().map_or((0, 0), Lease::limit_events)
    }

    /// See [`Lease::memory_cpu`].
    pub fn memory_cpu(&self) -> Option<(u64, Option<u64>)> {
        self.lease.as_ref().map(Lease::memory_cpu)
    }

    /// (used, total) bytes of the sandbox's writable layer: its disk's, or (tmpfs) the
    /// agent's root's, an overlay whose `statfs` reports the upper layer's tmpfs, sized to the
    /// quota, as seen through `/proc` without entering the sandbox.
    pub fn disk_usage(&self) -> Option<(u64, u64)> {
        if self.reaped {
            return None;
        }
        if let Some(d) = &self.disk {
            return d.usage();
        }
        let st = nix::sys::statvfs::statvfs(format!("/proc/{}/root", self.pid).as_str()).ok()?;
        let frag = st.fragment_size().max(1);
        let total = st.blocks().saturating_mul(frag);
        let free = st.blocks_free().saturating_mul(frag);
        Some((total.saturating_sub(free), total))
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        self.kill();
        if !self.reaped && !self.adopted {
            if self.pidfd.is_some() {
                self.wait_pidfd();
            } else {
                let _ = ringfence_sys::wait4(self.pid, false);
            }
            self.reaped = true;
        }
        if let Some(dir) = &self.socket_dir {
            let _ = std::fs::remove_dir_all(dir);
        }
        // The lease drops after this, killing anything that escaped the pid namespace's
        // teardown (nothing should) and freeing the slot.
    }
}

/// A killed sandbox whose slot is free already ([`Sandbox::let_go`]): its agent, until it
/// has ended, and its disk, which stays mounted inside until then.
#[derive(Debug)]
pub struct Ending {
    pidfd: OwnedFd,
    disk: Option<Disk>,
}

impl Ending {
    /// Whether the sandbox had a disk of its own (else nothing of it needs removing).
    pub fn has_disk(&self) -> bool {
        self.disk.is_some()
    }

    /// Blocks until the agent has exited (its namespaces torn down, every process of the
    /// sandbox gone), then hands over the disk, free to be removed.
    pub fn wait(self) -> Option<Disk> {
        use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
        loop {
            let mut fds = [PollFd::new(std::os::fd::AsFd::as_fd(&self.pidfd), PollFlags::POLLIN)];
            match poll(&mut fds, PollTimeout::NONE) {
                Ok(n) if n > 0 => break,
                Err(nix::Error::EINTR) | Ok(_) => continue,
                Err(_) => break,
            }
        }
        self.disk
    }
}

/// Where a reconnectable sandbox's agent listens.
pub fn agent_socket_dir(cfg: &JailConfig, id: &str) -> std::path::PathBuf {
    cfg.run_dir.join("agents").join(id)
}

/// A layer directory's last component, for messages that must not show host paths.
fn layer_name(dir: &std::path::Path) -> String {
    dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

/// The host id that uid 0 of process `pid`'s user namespace maps to (a sandbox's id base).
fn read_id_base(pid: i32) -> Result<u32, JailError> {
    let path = format!("/proc/{pid}/uid_map");
    let text = std::fs::read_to_string(&path).map_err(io_op(format!("read {path}")))?;
    text.lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace().map(str::parse::<u32>);
            match (f.next(), f.next()) {
                (Some(Ok(0)), Some(Ok(base))) => Some(base),
                _ => None,
            }
        })
        .next()
        .ok_or_else(|| JailError::Protocol(format!("process {pid} maps no root: {text:?}")))
}

/// Whether the process behind `pidfd` has exited (its pidfd polls readable).
fn exited(pidfd: &OwnedFd) -> bool {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    let mut fds = [PollFd::new(std::os::fd::AsFd::as_fd(pidfd), PollFlags::POLLIN)];
    matches!(poll(&mut fds, PollTimeout::ZERO), Ok(n) if n > 0)
}
