//! A running gVisor sandbox: start, the agent's channel, pause/resume, usage, the writable
//! layer, and cleanup.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ringfence_jail::launch::{MARK_ERROR, MARK_NO_LISTENER, rlimits_for, shm_bytes};
use ringfence_jail::limits::Limits;
use ringfence_jail::template::Template;
use ringfence_proto::{Event, Phase, ProtoError, Ready, SetupSpec, SpawnSpec, read_frame};

use crate::bundle::{self, BundleSpec, Network};
use crate::rootfs::{Rootfs, RootfsSpec};
use crate::{GvisorConfig, GvisorError, Runsc};

/// The descriptor number of the agent's control channel inside the sandbox (and in the runsc
/// process, which passes it on): where the agent looks for it, as in the jail.
const CONTROL_FD: i32 = ringfence_sys::CONTROL_FD;
/// The agent's end of the packet relay ([`Network::Relay`]), right after the control channel.
const RELAY_FD: i32 = CONTROL_FD + 1;

/// The sandbox directory's subdirectory bound into the sandbox for the reconnect sockets
/// (see [`bundle::CHAN_IN_SANDBOX`]), and the sockets' names in it: the agent's control
/// channel (stream) and the packet relay (`SOCK_SEQPACKET`).
const CHAN_DIR: &str = "chan";
const AGENT_SOCK: &str = "agent.sock";
const NET_SOCK: &str = "net.sock";

/// How long a start whose handshake failed waits for `runsc run` to exit by itself.
const RUNSC_EXIT_GRACE: Duration = Duration::from_secs(2);

/// What to start.
#[derive(Debug, Clone)]
pub struct StartSpec {
    /// Sandbox id: also the hostname, the runsc container id and the cgroup's name.
    pub id: String,
    pub template: Template,
    /// Read-only layers above the template, topmost first (the jail's layer format).
    pub layers: Vec<PathBuf>,
    pub limits: Limits,
    /// Host uid/gid that the sandbox's root maps to (the template's owner).
    pub uid_base: u32,
    /// Environment for every process in the sandbox.
    pub env: BTreeMap<String, String>,
    pub initial: Option<SpawnSpec>,
    pub exit_with_initial: bool,
    pub network: Network,
    pub setup_timeout: Duration,
}

impl StartSpec {
    /// A serve-mode sandbox with default limits and no network.
    pub fn new(id: String, template: Template, uid_base: u32) -> Self {
        StartSpec {
            id,
            template,
            layers: Vec::new(),
            limits: Limits::default(),
            uid_base,
            env: BTreeMap::new(),
            initial: None,
            exit_with_initial: false,
            network: Network::None,
            setup_timeout: Duration::from_secs(30),
        }
    }
}

/// Resource use of a sandbox, from its cgroup (which holds gVisor's sentry and gofer, so every
/// byte the sandbox's processes use is counted there) and its disk.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub memory_bytes: Option<u64>,
    pub memory_peak_bytes: Option<u64>,
    pub cpu_usec: Option<u64>,
    /// Host tasks (threads) of the sandbox: gVisor's, not the sandbox's own processes.
    pub host_tasks: Option<u64>,
    /// (used, total) bytes of the writable layer.
    pub disk: Option<(u64, u64)>,
}

/// A running gVisor sandbox. Dropping it deletes the container and everything it holds.
#[derive(Debug)]
pub struct Container {
    pub id: String,
    /// What the agent reported once ready.
    pub ready: Ready,
    control: UnixStream,
    runsc: Runsc,
    runsc_root: PathBuf,
    dir: PathBuf,
    rootfs: Option<Rootfs>,
    cgroup_path: String,
    phases: Vec<Phase>,
    deleted: bool,
    /// Host id of the sandbox's root: files it writes are stored shifted by this, and saved
    /// layers shifted back (see `ringfence_jail::layer::save`).
    uid_base: u32,
    /// The host's end of the packet relay, for [`Network::Relay`].
    relay: Option<OwnedFd>,
    /// This process's claim on the sandbox's directory (see [`own`]).
    _owner: Option<nix::fcntl::Flock<fs::File>>,
}

/// The lock file in each sandbox's directory.
const OWNER_LOCK: &str = "owner.lock";

/// Claims sandbox directory `dir` for this process: an exclusive lock held as long as the
/// container value lives, so that another server sharing the run directory (tests run several
/// at once) does not take a live sandbox of ours for a dead server's leftover in [`sweep`].
fn own(dir: &Path) -> Result<nix::fcntl::Flock<fs::File>, GvisorError> {
    let path = dir.join(OWNER_LOCK);
    let f = fs::File::create(&path).map_err(io_op(format!("create {}", path.display())))?;
    nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock)
        .map_err(|(_, e)| io_op(format!("lock {}", path.display()))(e.into()))
}

fn io_op(op: impl Into<String>) -> impl FnOnce(io::Error) -> GvisorError {
    let op = op.into();
    move |source| GvisorError::Io { op, source }
}

/// runsc takes ids of letters, digits, `-`, `_`, `.`; ours also become a directory and a cgroup
/// name, so a conservative subset.
fn check_id(id: &str) -> Result<(), GvisorError> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && !id.starts_with(['-', '.'])
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(GvisorError::Invalid(format!(
            "sandbox id {id:?}: expected 1-64 letters, digits, '-' or '_', not starting with '-'"
        )))
    }
}

/// The relay's two ends: the host's non-blocking (the host stack polls it), the sandbox's
/// blocking (the agent's relay threads wait on it). Both numbered above the two descriptors
/// runsc's child is given: a precaution from when they were placed by `dup2` in turn, where a
/// source that is 3 or 4 itself could be overwritten before it is moved (`pspawn` now copies
/// every source above 99 before it places any).
fn relay_pair() -> Result<(OwnedFd, OwnedFd), GvisorError> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};
    let (host, sandbox) =
        socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC)
            .map_err(|e| io_op("socketpair(SOCK_SEQPACKET)")(e.into()))?;
    let flags = nix::fcntl::OFlag::O_NONBLOCK;
    nix::fcntl::fcntl(&host, nix::fcntl::FcntlArg::F_SETFL(flags))
        .map_err(|e| io_op("make the relay non-blocking")(e.into()))?;
    Ok((above_passed(host)?, above_passed(sandbox)?))
}

/// `fd`, renumbered above [`RELAY_FD`] if it is not already (the low copies held meanwhile
/// make each duplicate take a higher number).
fn above_passed(fd: OwnedFd) -> Result<OwnedFd, GvisorError> {
    let mut held = Vec::new();
    let mut fd = fd;
    while fd.as_raw_fd() <= RELAY_FD {
        let higher = fd.try_clone().map_err(io_op("duplicate a descriptor"))?;
        held.push(fd);
        fd = higher;
    }
    Ok(fd)
}

/// A new host end for the packet relay: a `SOCK_SEQPACKET` connection to the agent's relay
/// listener at `path`, non-blocking (the host stack polls it).
fn connect_relay(path: &Path) -> Result<OwnedFd, GvisorError> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, UnixAddr, connect, socket};
    let op = || format!("connect to the packet relay at {}", path.display());
    let sock = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )
    .map_err(|e| io_op(op())(e.into()))?;
    let addr = UnixAddr::new(path).map_err(|e| io_op(op())(e.into()))?;
    match connect(sock.as_raw_fd(), &addr) {
        // Non-blocking: a connection the listener has not taken yet completes in its backlog.
        Ok(()) | Err(nix::Error::EINPROGRESS) => Ok(sock),
        Err(e) => Err(io_op(op())(e.into())),
    }
}

/// A runsc command with the global flags every call of this tier shares.
fn runsc_cmd(runsc: &Runsc, root: &Path) -> Command {
    let mut cmd = Command::new(&runsc.path);
    cmd.args(global_args(runsc, root)).stdin(Stdio::null());
    cmd
}

/// The flags every runsc command of ours starts with: its state directory and platform.
fn global_args(runsc: &Runsc, root: &Path) -> [String; 2] {
    [format!("--root={}", root.display()), format!("--platform={}", runsc.platform.as_str())]
}

/// Runs a short runsc subcommand, failing with its stderr.
fn runsc_ok(runsc: &Runsc, root: &Path, args: &[&str]) -> Result<String, GvisorError> {
    let out = runsc_cmd(runsc, root)
        .args(args)
        .output()
        .map_err(io_op(format!("run {}", runsc.path.display())))?;
    if out.status.success() {
        return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
    }
    Err(GvisorError::Runsc {
        command: args.first().copied().unwrap_or("").to_string(),
        status: out.status.to_string(),
        message: last_line(&String::from_utf8_lossy(&out.stderr)),
    })
}

fn last_line(text: &str) -> String {
    text.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("").trim().to_string()
}

impl Container {
    /// Starts a sandbox and waits until its agent is ready.
    pub fn start(cfg: &GvisorConfig, spec: StartSpec) -> Result<Container, GvisorError> {
        let mut phases = Vec::new();
        ringfence_jail::phase(&mut phases, "start");
        check_id(&spec.id)?;
        let dir = cfg.sandbox_dir(&spec.id);
        let parent = dir.parent().unwrap_or(&cfg.state_dir);
        fs::create_dir_all(parent).map_err(io_op(format!("create {}", parent.display())))?;
        fs::create_dir_all(cfg.runsc_root())
            .map_err(io_op(format!("create {}", cfg.runsc_root().display())))?;
        fs::create_dir(&dir).map_err(|e| match e.kind() {
            io::ErrorKind::AlreadyExists => {
                GvisorError::Invalid(format!("sandbox {} already exists on this host", spec.id))
            }
            _ => io_op(format!("create {}", dir.display()))(e),
        })?;
        let (control, agent_end) = UnixStream::pair().map_err(io_op("socketpair"))?;
        // From here on, dropping `c` undoes everything (runsc delete, unmounts, directory).
        let mut c = Container {
            id: spec.id.clone(),
            ready: Ready { phases: Vec::new(), landlock_abi: None, initial_pid: None },
            control,
            runsc: cfg.runsc.clone(),
            runsc_root: cfg.runsc_root(),
            dir: dir.clone(),
            rootfs: None,
            cgroup_path: format!("{}/{}", cfg.cgroup_parent.trim_end_matches('/'), spec.id),
            phases,
            deleted: false,
            uid_base: spec.uid_base,
            relay: None,
            _owner: None,
        };
        c._owner = Some(own(&dir)?);
        let rootfs = Rootfs::mount(
            &dir,
            &RootfsSpec {
                template: &spec.template.rootfs,
                layers: &spec.layers,
                disk_bytes: spec.limits.disk,
                disk_inodes: (spec.limits.disk / 8192).max(16384),
                uid_base: spec.uid_base,
                hostname: &spec.id,
            },
        )?;
        let merged = rootfs.merged().to_path_buf();
        c.rootfs = Some(rootfs);
        ringfence_jail::phase(&mut c.phases, "rootfs");
        let chan = dir.join(CHAN_DIR);
        fs::create_dir(&chan).map_err(io_op(format!("create {}", chan.display())))?;
        fs::set_permissions(&chan, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .map_err(io_op(format!("chmod {}", chan.display())))?;
        let config = bundle::config(&BundleSpec {
            hostname: &spec.id,
            rootfs: &merged,
            host_layers: &spec.template.meta.host_layers,
            agent_path: &cfg.agent_path,
            uid_base: spec.uid_base,
            limits: &spec.limits,
            cgroup_path: &c.cgroup_path,
            network: &spec.network,
            shm_bytes: shm_bytes(&spec.limits),
            chan_dir: Some(&chan),
        });
        let config_path = dir.join("config.json");
        let text = serde_json::to_vec(&config)
            .map_err(|e| GvisorError::Invalid(format!("config.json: {e}")))?;
        fs::write(&config_path, text).map_err(io_op(format!("write {}", config_path.display())))?;
        ringfence_jail::phase(&mut c.phases, "bundle");
        let relay_end = match spec.network {
            Network::Relay(_) => {
                let (host, sandbox) = relay_pair()?;
                c.relay = Some(host);
                Some(sandbox)
            }
            Network::None => None,
        };
        let mut runsc = c.run(&agent_end, relay_end.as_ref())?;
        // runsc holds the agent's ends now; with ours closed, they end when runsc's do.
        drop(agent_end);
        drop(relay_end);
        ringfence_jail::phase(&mut c.phases, "runsc_spawned");
        // The handshake does not wait for `runsc run --detach` to return: the agent is often
        // ready before runsc has finished its own bookkeeping. If runsc fails instead, it exits
        // and closes the channel, and its status and log say why.
        let shook = c.handshake(spec);
        let status = if shook.is_ok() {
            runsc.wait().map_err(io_op("wait for runsc run"))?
        } else {
            // A failing runsc closes the channel as it exits: give it a moment to do so, for
            // its status and log. One that hangs (a timed-out setup) must not hang us too;
            // what it started is removed by `delete` when `c` drops.
            let deadline = Instant::now() + RUNSC_EXIT_GRACE;
            loop {
                match runsc.try_wait().map_err(io_op("wait for runsc run"))? {
                    Some(status) => break status,
                    None if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(5))
                    }
                    None => {
                        let _ = runsc.kill();
                        break runsc.wait().map_err(io_op("wait for runsc run"))?;
                    }
                }
            }
        };
        ringfence_jail::phase(&mut c.phases, "runsc_returned");
        // runsc's own failure explains more than the agent's closed channel; a runsc we killed
        // above leaves the handshake's error.
        let runsc_failed = status.code().is_some_and(|code| code != 0);
        if runsc_failed || (!status.success() && shook.is_ok()) {
            let log = fs::read_to_string(c.dir.join("runsc.log")).unwrap_or_default();
            return Err(GvisorError::Runsc {
                command: "run".into(),
                status: status.to_string(),
                message: last_line(&log),
            });
        }
        shook?;
        Ok(c)
    }

    /// Starts `runsc run --detach`, which returns once the container runs. The agent's end of
    /// the channel becomes the runsc process's fd 3 and, through `--pass-fd`, the agent's.
    /// `runsc run --detach` exits as soon as the container is started; the sandbox's processes
    /// are not its children and are reaped by init.
    fn run(
        &mut self,
        agent_end: &UnixStream,
        relay_end: Option<&OwnedFd>,
    ) -> Result<ringfence_sys::pspawn::Child, GvisorError> {
        let log_path = self.dir.join("runsc.log");
        let log =
            fs::File::create(&log_path).map_err(io_op(format!("create {}", log_path.display())))?;
        let null = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/null")
            .map_err(io_op("open /dev/null"))?;
        let global = global_args(&self.runsc, &self.runsc_root);
        let control = format!("{CONTROL_FD}:{CONTROL_FD}");
        let relay = format!("{RELAY_FD}:{RELAY_FD}");
        // gVisor's own stack either way (see `Network`): a relayed device is the agent's.
        // --overlay2=none: the root's writable layer is ours (see `rootfs`), not runsc's
        // default memory-file overlay, which the host could not read back as a directory.
        // --host-uds=create: the agent's reconnect sockets, bound in the chan directory, are
        // host sockets a restarted server can connect to. Only creating is allowed: nothing
        // inside may connect to a host socket (that would be `open`).
        let head = [
            global[0].as_str(),
            global[1].as_str(),
            "--network=none",
            "--overlay2=none",
            "--host-uds=create",
            "run",
            "--detach",
            "--bundle",
        ];
        let mut args: Vec<&std::ffi::OsStr> = head.iter().map(std::ffi::OsStr::new).collect();
        args.push(self.dir.as_os_str());
        args.extend(["--pass-fd", control.as_str()].map(std::ffi::OsStr::new));
        // The container's stdio is runsc's: the agent never writes there, and runsc's own
        // errors go to the log, read back if the start fails.
        let mut fds = vec![
            (null.as_raw_fd(), 0),
            (null.as_raw_fd(), 1),
            (log.as_raw_fd(), 2),
            (agent_end.as_raw_fd(), CONTROL_FD),
        ];
        if let Some(fd) = relay_end {
            args.extend(["--pass-fd", relay.as_str()].map(std::ffi::OsStr::new));
            fds.push((fd.as_raw_fd(), RELAY_FD));
        }
        args.push(std::ffi::OsStr::new(&self.id));
        // Not `Command`: placing the descriptors takes a `pre_exec` hook, with which it forks,
        // copying the server's page tables (see `ringfence_sys::pspawn`).
        ringfence_sys::pspawn::spawn(&self.runsc.path, &args, &fds)
            .map_err(io_op(format!("run {}", self.runsc.path.display())))
    }

    /// Sends the agent its setup and waits for it to report ready.
    fn handshake(&mut self, spec: StartSpec) -> Result<(), GvisorError> {
        let setup = SetupSpec {
            sandbox_id: spec.id,
            // runsc built the root: nothing for the agent to mount (see the agent's gvisor mode).
            stage_dir: String::new(),
            lowers: 0,
            host_layers: Vec::new(),
            volumes: Vec::new(),
            own_disk: false,
            disk_bytes: spec.limits.disk,
            disk_inodes: 0,
            shm_bytes: shm_bytes(&spec.limits),
            writable: Vec::new(),
            require_landlock: false,
            rlimits: rlimits_for(&spec.limits),
            seccomp_notify: Vec::new(),
            seccomp_errno: Vec::new(),
            seccomp_builtin: false,
            env: spec.env,
            listen: Some(format!("{}/{AGENT_SOCK}", bundle::CHAN_IN_SANDBOX)),
            initial: spec.initial,
            exit_with_initial: spec.exit_with_initial,
            // Setuid templates are the jail's alone for now (see docs/SECURITY.md).
            allow_setuid: false,
            packet_relay: match &spec.network {
                Network::Relay(r) => Some(ringfence_proto::PacketRelay {
                    fd: RELAY_FD,
                    iface: r.iface.clone(),
                    address: r.address.octets(),
                    mtu: r.mtu,
                    listen: Some(format!("{}/{NET_SOCK}", bundle::CHAN_IN_SANDBOX)),
                }),
                Network::None => None,
            },
            guest_nic: None,
        };
        let started = Instant::now();
        let limit = spec.setup_timeout;
        let msg = ringfence_proto::encode(&setup)?;
        self.control.write_all(&msg).map_err(io_op("send setup to agent"))?;
        self.control.set_read_timeout(Some(limit)).map_err(io_op("set timeout"))?;
        let timed_out = |e: &io::Error| {
            matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut)
                && started.elapsed() >= limit
        };
        let mut mark = [0u8; 1];
        match self.control.read(&mut mark) {
            Ok(1) => {}
            Ok(_) => return Err(self.died()),
            Err(e) if timed_out(&e) => return Err(GvisorError::SetupTimeout(limit)),
            Err(e) => return Err(io_op("read the agent's marker")(e)),
        }
        let event: Option<Event> = read_frame(&mut self.control).map_err(|e| match e {
            ProtoError::Io(io) if timed_out(&io) => GvisorError::SetupTimeout(limit),
            other => other.into(),
        })?;
        self.control.set_read_timeout(None).map_err(io_op("clear timeout"))?;
        match (mark[0], event) {
            (MARK_NO_LISTENER, Some(Event::Ready(r))) => {
                self.ready = r;
                ringfence_jail::phase(&mut self.phases, "ready");
                Ok(())
            }
            (MARK_ERROR, Some(Event::SetupFailed { step, message })) => {
                Err(GvisorError::Setup { step, message })
            }
            (_, None) => Err(self.died()),
            (m, Some(other)) => Err(GvisorError::Protocol(format!("marker {m:#x}, {other:?}"))),
        }
    }

    /// Re-attaches to sandbox `id` that an earlier host process started and left running (it
    /// died without deleting it: `kill -9`, a crash): runsc must still show the container
    /// running or paused; the agent's control channel is a new connection to the socket it
    /// listens on for this ([`SetupSpec::listen`]), and a networked sandbox's packet relay a
    /// new connection to the relay's ([`ringfence_proto::PacketRelay::listen`]), so nothing
    /// of the old host process's ends is needed. The directory is claimed for this process as
    /// a start claims it. On any failure nothing is held: the caller ends the sandbox (or
    /// [`sweep`] does), never serving it half attached.
    pub fn adopt(cfg: &GvisorConfig, id: &str) -> Result<Container, GvisorError> {
        check_id(id)?;
        let dir = cfg.sandbox_dir(id);
        if !dir.join("config.json").is_file() {
            return Err(GvisorError::Gone(id.to_string()));
        }
        let owner = match own(&dir) {
            Ok(o) => o,
            Err(_) => {
                return Err(GvisorError::Invalid(format!(
                    "sandbox {id} is held by another live process sharing this run directory"
                )));
            }
        };
        let runsc_root = cfg.runsc_root();
        let state = runsc_ok(&cfg.runsc, &runsc_root, &["state", id])?;
        let status = serde_json::from_str::<serde_json::Value>(&state)
            .ok()
            .and_then(|v| v["status"].as_str().map(str::to_string))
            .unwrap_or_default();
        if status != "running" && status != "paused" {
            return Err(GvisorError::Gone(format!("{id} (runsc reports it {status:?})")));
        }
        let chan = dir.join(CHAN_DIR);
        let agent = chan.join(AGENT_SOCK);
        let control = UnixStream::connect(&agent)
            .map_err(io_op(format!("connect to the agent at {}", agent.display())))?;
        // The relay's listener exists exactly when the sandbox was started with a network.
        let net = chan.join(NET_SOCK);
        let relay = if net.exists() { Some(connect_relay(&net)?) } else { None };
        let config: serde_json::Value = fs::read(dir.join("config.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        let uid_base = config["linux"]["uidMappings"][0]["hostID"].as_u64().unwrap_or(0);
        Ok(Container {
            id: id.to_string(),
            ready: Ready { phases: Vec::new(), landlock_abi: None, initial_pid: None },
            control,
            runsc: cfg.runsc.clone(),
            runsc_root,
            dir: dir.clone(),
            rootfs: Some(Rootfs::adopt(&dir)),
            cgroup_path: format!("{}/{}", cfg.cgroup_parent.trim_end_matches('/'), id),
            phases: Vec::new(),
            deleted: false,
            uid_base: u32::try_from(uid_base).unwrap_or(0),
            relay,
            _owner: Some(owner),
        })
    }

    /// The memory limit the sandbox was started with (its bundle's), if any.
    pub fn memory_limit(&self) -> Option<u64> {
        let config: serde_json::Value = fs::read(self.dir.join("config.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())?;
        config["linux"]["resources"]["memory"]["limit"].as_u64()
    }

    /// The error for an agent that closed its channel during setup: runsc's log says why.
    fn died(&self) -> GvisorError {
        let log = fs::read_to_string(self.dir.join("runsc.log")).unwrap_or_default();
        let last = last_line(&log);
        GvisorError::Protocol(if last.is_empty() {
            "the agent closed its channel during setup".into()
        } else {
            format!("the agent closed its channel during setup; runsc: {last}")
        })
    }

    /// The control channel to the agent (the agent protocol of `ringfence-proto`).
    /// Leaves the container running and its directory in place, as a host process that dies
    /// would, releasing only the claim a live process holds on it: what [`sweep`] is for
    /// (and what its tests make).
    pub fn abandon(mut self) {
        drop(self._owner.take());
        std::mem::forget(self);
    }

    /// A descriptor of the host's end of the packet relay ([`Network::Relay`]): one IPv4
    /// packet per message, non-blocking. `None` without a relayed network.
    pub fn relay(&self) -> Option<Result<OwnedFd, GvisorError>> {
        self.relay.as_ref().map(|fd| fd.try_clone().map_err(io_op("duplicate the relay")))
    }

    pub fn control(&self) -> &UnixStream {
        &self.control
    }

    /// A second handle to the control channel (for a reader thread).
    pub fn control_clone(&self) -> Result<UnixStream, GvisorError> {
        self.control.try_clone().map_err(io_op("clone control channel"))
    }

    /// Host-side start-up phases (CLOCK_MONOTONIC of the host). The agent's own phases in
    /// [`Container::ready`] are on gVisor's clock, which does not line up with the host's.
    pub fn phases(&self) -> &[Phase] {
        &self.phases
    }

    /// The container's cgroup (absolute, the same in every hierarchy).
    pub fn cgroup_path(&self) -> &str {
        &self.cgroup_path
    }

    /// runsc's view of the container: `created`, `running`, `paused` or `stopped`.
    pub fn status(&self) -> Result<String, GvisorError> {
        let out = runsc_ok(&self.runsc, &self.runsc_root, &["state", &self.id])?;
        let v: serde_json::Value = serde_json::from_str(&out).map_err(|e| GvisorError::Runsc {
            command: "state".into(),
            status: "ok".into(),
            message: format!("unreadable state: {e}"),
        })?;
        Ok(v["status"].as_str().unwrap_or("unknown").to_string())
    }

    /// Stops every process in the sandbox (`runsc pause`) until [`Container::resume`]; its
    /// memory stays as it is.
    pub fn pause(&self) -> Result<(), GvisorError> {
        runsc_ok(&self.runsc, &self.runsc_root, &["pause", &self.id]).map(drop)
    }

    /// Lets a paused sandbox run again.
    pub fn resume(&self) -> Result<(), GvisorError> {
        runsc_ok(&self.runsc, &self.runsc_root, &["resume", &self.id]).map(drop)
    }

    /// Resource use, read from the sandbox's cgroup files and its disk.
    pub fn usage(&self) -> Usage {
        let cg = CgroupFiles::detect(&self.cgroup_path);
        Usage {
            memory_bytes: cg.read(cg.memory_current()),
            memory_peak_bytes: cg.read(cg.memory_peak()),
            cpu_usec: cg.cpu_usec(),
            host_tasks: cg.read(cg.pids_current()),
            disk: self.rootfs.as_ref().and_then(Rootfs::usage),
        }
    }

    /// The writable layer as a host directory, in the jail's layer format: what
    /// `ringfence_jail::layer::save` copies for snapshots and forks.
    pub fn upper_dir(&self) -> Option<PathBuf> {
        self.rootfs.as_ref().map(Rootfs::upper)
    }

    /// Saves the writable layer to `dest` (see `ringfence_jail::layer::save`), pausing the
    /// sandbox around the copy so it is consistent, unless it is paused already.
    pub fn save_layer(
        &self,
        dest: &Path,
    ) -> Result<ringfence_jail::layer::LayerStats, GvisorError> {
        let upper = self.upper_dir().ok_or_else(|| GvisorError::Gone(self.id.clone()))?;
        let was_paused = self.status()? == "paused";
        if !was_paused {
            self.pause()?;
        }
        let saved = ringfence_jail::layer::save(&upper, dest, self.uid_base);
        if !was_paused {
            self.resume()?;
        }
        Ok(saved?)
    }

    /// Kills every process in the sandbox and removes everything it held: runsc's sandbox,
    /// gofer and state, the cgroup, the root's mounts and the sandbox's directory.
    /// Idempotent; also done on drop.
    pub fn delete(&mut self) -> Result<(), GvisorError> {
        if self.deleted {
            return Ok(());
        }
        // --force: kills a running (or paused) container first. A container runsc never
        // created is "not found", which leaves nothing to delete.
        let deleted = runsc_ok(&self.runsc, &self.runsc_root, &["delete", "--force", &self.id]);
        let deleted = match deleted {
            Err(GvisorError::Runsc { message, .. }) if message.contains("does not exist") => Ok(()),
            other => other.map(drop),
        };
        let unmounted = match &mut self.rootfs {
            Some(r) => r.unmount(),
            None => Ok(()),
        };
        deleted?;
        unmounted?;
        self.rootfs = None;
        fs::remove_dir_all(&self.dir)
            .or_else(|e| if e.kind() == io::ErrorKind::NotFound { Ok(()) } else { Err(e) })
            .map_err(io_op(format!("remove {}", self.dir.display())))?;
        self.deleted = true;
        Ok(())
    }
}

/// Removes every sandbox under `cfg.state_dir` whose id is not in `keep`: what a host process
/// that died without dropping its containers left (runsc's sandbox, gofer and state, the
/// cgroup, the root's mounts, the directory). Call at start-up, before starting sandboxes.
/// Returns the ids removed.
pub fn sweep(cfg: &GvisorConfig, keep: &[&str]) -> Result<Vec<String>, GvisorError> {
    let dir = cfg.state_dir.join("sandboxes");
    let entries = match fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_op(format!("list {}", dir.display()))(e)),
    };
    let mut removed = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io_op(format!("list {}", dir.display())))?;
        let id = entry.file_name().to_string_lossy().into_owned();
        if keep.contains(&id.as_str()) || check_id(&id).is_err() {
            continue;
        }
        // A sandbox a live process holds (another server sharing this run directory) is not
        // a leftover. No lock file: its server died before it made one.
        let owner = match fs::File::open(entry.path().join(OWNER_LOCK)) {
            Ok(f) => {
                match nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock) {
                    Ok(lock) => Some(lock),
                    Err((_, nix::Error::EWOULDBLOCK)) => continue,
                    Err((_, e)) => return Err(io_op(format!("lock in {id}"))(e.into())),
                }
            }
            Err(_) => None,
        };
        // A container value for it, whose delete does the work.
        let mut c = Container {
            id: id.clone(),
            ready: Ready { phases: Vec::new(), landlock_abi: None, initial_pid: None },
            control: UnixStream::pair().map_err(io_op("socketpair"))?.0,
            runsc: cfg.runsc.clone(),
            runsc_root: cfg.runsc_root(),
            dir: entry.path(),
            rootfs: Some(Rootfs::adopt(&entry.path())),
            cgroup_path: format!("{}/{}", cfg.cgroup_parent.trim_end_matches('/'), id),
            phases: Vec::new(),
            deleted: false,
            uid_base: 0,
            relay: None,
            _owner: owner,
        };
        c.delete()?;
        removed.push(id);
    }
    Ok(removed)
}

impl Drop for Container {
    fn drop(&mut self) {
        if let Err(e) = self.delete() {
            tracing::warn!(sandbox = %self.id, error = %e, "gvisor: cleanup incomplete");
        }
    }
}

/// The sandbox cgroup's files on a v2 or v1 host.
struct CgroupFiles {
    v2: bool,
    path: String,
}

impl CgroupFiles {
    fn detect(path: &str) -> CgroupFiles {
        let v2 = Path::new("/sys/fs/cgroup/cgroup.controllers").exists();
        CgroupFiles { v2, path: path.trim_start_matches('/').to_string() }
    }

    fn file(&self, v1_controller: &str, name: &str) -> PathBuf {
        let base = Path::new("/sys/fs/cgroup");
        if self.v2 {
            base.join(&self.path).join(name)
        } else {
            base.join(v1_controller).join(&self.path).join(name)
        }
    }

    fn memory_current(&self) -> PathBuf {
        if self.v2 {
            self.file("", "memory.current")
        } else {
            self.file("memory", "memory.usage_in_bytes")
        }
    }

    fn memory_peak(&self) -> PathBuf {
        if self.v2 {
            self.file("", "memory.peak")
        } else {
            self.file("memory", "memory.max_usage_in_bytes")
        }
    }

    fn pids_current(&self) -> PathBuf {
        self.file("pids", "pids.current")
    }

    fn read(&self, path: PathBuf) -> Option<u64> {
        fs::read_to_string(path).ok()?.trim().parse().ok()
    }

    fn cpu_usec(&self) -> Option<u64> {
        if self.v2 {
            let stat = fs::read_to_string(self.file("", "cpu.stat")).ok()?;
            return stat
                .lines()
                .find_map(|l| l.strip_prefix("usage_usec "))
                .and_then(|v| v.trim().parse().ok());
        }
        let ns = [self.file("cpuacct", "cpuacct.usage"), self.file("cpu,cpuacct", "cpuacct.usage")]
            .into_iter()
            .find_map(|p| self.read(p))?;
        Some(ns / 1000)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_that_could_escape_their_directory_or_confuse_runsc_are_refused() {
        for bad in ["", "../x", "a/b", "-rf", ".hidden", "a b", "a:b", &"x".repeat(65)] {
            assert!(check_id(bad).is_err(), "{bad:?} accepted");
        }
        for good in ["abc", "sbx-1_2", "i2m6d8ahxcnlsrjaoqxs"] {
            assert!(check_id(good).is_ok(), "{good:?} refused");
        }
    }
}
