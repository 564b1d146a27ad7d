//! One microVM sandbox: its directory, its QEMU and its agent.

use std::fs;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ringfence_jail::launch::{MARK_ERROR, MARK_NO_LISTENER, rlimits_for, shm_bytes};
use ringfence_jail::limits::Limits;
use ringfence_proto::{Event, ProtoError, Ready, SetupSpec, read_frame};

use crate::vmm::{Disk, QemuVm, VmHandle, VmSpec, Vmm};
use crate::{MicrovmConfig, MicrovmError};

/// What it takes to start one sandbox.
#[derive(Debug, Clone)]
pub struct StartSpec {
    pub id: String,
    /// The template's read-only root image (`ringfence_image::export`).
    pub root_image: PathBuf,
    pub limits: Limits,
    pub env: std::collections::BTreeMap<String, String>,
    /// How long the guest may take from launch to its agent's `Ready` (a TCG boot on a
    /// contended host takes several seconds).
    pub setup_timeout: Duration,
    /// The guest's NIC, configured by its agent; its frames come out of
    /// [`MicroVm::nic`]. `None`: the guest has no network device at all.
    pub nic: Option<ringfence_proto::GuestNic>,
}

impl StartSpec {
    pub fn new(id: String, root_image: PathBuf) -> Self {
        StartSpec {
            id,
            root_image,
            limits: Limits::default(),
            env: Default::default(),
            setup_timeout: Duration::from_secs(90),
            nic: None,
        }
    }
}

/// Host-side figures of a sandbox: the QEMU process (guest RAM it touched plus the VMM's own).
#[derive(Debug, Clone, Copy, Default)]
pub struct Usage {
    pub rss_bytes: Option<u64>,
    pub cpu_ns: Option<u64>,
    /// (used, total) bytes of the writable disk as the host sees it (allocated blocks).
    pub disk: Option<(u64, u64)>,
}

/// Guest RAM when the sandbox names no memory limit.
const DEFAULT_MEMORY_MIB: u64 = 512;
/// Below this the cloud kernel and the agent do not fit.
const MIN_MEMORY_MIB: u64 = 128;
/// QEMU's own memory beside the guest's RAM, in its cgroup's limit: TCG's translation cache
/// (64 MiB), QEMU's copies of the kernel and initramfs (~90 MB with a debug agent), its heap.
/// Measured RSS of an idle 512 MiB guest: 266-334 MiB (docs/PERFORMANCE.md), well inside.
const VMM_MEMORY: u64 = 384 << 20;
/// QEMU's tasks: a thread per vCPU, its main loop, RCU and I/O workers; it cannot fork
/// (its seccomp filter denies it).
const VMM_TASKS: u64 = 128;

/// A running microVM sandbox. Dropping it ends the guest and removes its directory.
#[derive(Debug)]
pub struct MicroVm {
    id: String,
    dir: PathBuf,
    vm: Mutex<Option<QemuVm>>,
    pid: u32,
    control: UnixStream,
    /// The host's end of the NIC's socket (one Ethernet frame per message).
    nic: Option<Arc<OwnedFd>>,
    disk_bytes: u64,
    pub ready: Ready,
    /// Wall time from launch to the agent's `Ready`.
    pub boot: Duration,
    /// This server's claim on the directory, held for the sandbox's life: [`sweep`] (run by
    /// any server sharing the state directory) passes by a directory whose claim is held.
    _owner: Option<nix::fcntl::Flock<fs::File>>,
    /// The uid QEMU runs as; freed when the sandbox ends.
    _uid: Option<crate::jail::UidLease>,
    /// QEMU's cgroup slot; dropped after QEMU has quit (its drop kills what is left).
    _cgroup: Option<ringfence_jail::cgroup::Lease>,
}

fn io_op(op: impl Into<String>) -> impl Fn(io::Error) -> MicrovmError {
    let op = op.into();
    move |source| MicrovmError::Io { op: op.clone(), source }
}

/// A sandbox id becomes a directory name and the guest's hostname: nothing else gets in.
fn check_id(id: &str) -> Result<(), MicrovmError> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if ok { Ok(()) } else { Err(MicrovmError::Invalid(format!("sandbox id {id:?}"))) }
}

impl MicroVm {
    /// Boots the sandbox's guest and waits for its agent. On failure nothing is left (the
    /// error carries the end of the guest's console).
    pub fn start(cfg: &MicrovmConfig, spec: StartSpec) -> Result<MicroVm, MicrovmError> {
        check_id(&spec.id)?;
        let dir = cfg.sandbox_dir(&spec.id);
        if dir.exists() {
            return Err(MicrovmError::Invalid(format!("sandbox {} exists already", spec.id)));
        }
        fs::create_dir_all(&dir).map_err(io_op(format!("mkdir {}", dir.display())))?;
        let owner = fs::File::create(dir.join("owner.lock"))
            .map_err(io_op("create the owner lock"))
            .and_then(|f| {
                nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock)
                    .map_err(|(_, e)| io_op("claim the sandbox directory")(e.into()))
            });
        let result = owner.and_then(|o| Self::start_in(cfg, &dir, spec, o));
        if result.is_err() {
            let _ = fs::remove_dir_all(&dir);
        }
        result
    }

    fn start_in(
        cfg: &MicrovmConfig,
        dir: &Path,
        spec: StartSpec,
        owner: nix::fcntl::Flock<fs::File>,
    ) -> Result<MicroVm, MicrovmError> {
        let started = Instant::now();
        let rw = dir.join("rw.ext4");
        crate::guest::writable_disk(&rw, spec.limits.disk)?;
        let agent_sock = dir.join("agent.sock");
        let listener = UnixListener::bind(&agent_sock).map_err(io_op("bind the agent socket"))?;
        // A uid of its own for QEMU, held as long as the sandbox (see `crate::jail`).
        let uid = if crate::jail::running_as_root() {
            Some(crate::jail::UidLease::take(&cfg.state_dir)?)
        } else {
            None
        };
        let memory_mib =
            spec.limits.memory.map_or(DEFAULT_MEMORY_MIB, |b| (b >> 20).max(MIN_MEMORY_MIB));
        let vcpus = spec.limits.cpu_millis.map_or(1, |m| m.div_ceil(1000).clamp(1, 64)) as u32;
        let nic = spec.nic.as_ref().map(nic_socket).transpose()?;
        let vm_spec = VmSpec {
            kernel: cfg.kernel(),
            initrd: Some(cfg.initramfs.clone()),
            cmdline: cfg.cmdline(),
            memory_mib,
            vcpus,
            disks: vec![
                Disk { path: spec.root_image.clone(), read_only: true },
                Disk { path: rw, read_only: false },
            ],
            agent_socket: Some(agent_sock.clone()),
            nic: spec.nic.as_ref().zip(nic.as_ref()).map(|(n, (_, vm_end))| crate::vmm::Nic {
                fd: vm_end.as_raw_fd(),
                mac: n.mac,
                mtu: n.mtu,
            }),
            dir: dir.to_path_buf(),
            accel: cfg.accel,
            jail: uid.as_ref().map(|l| l.jail),
        };
        // QEMU's cgroup: the sandbox's CPU quota (a vCPU is a whole host core otherwise),
        // room for the guest's RAM plus the VMM's own, few tasks; claimed before the launch so
        // a full host fails before a guest boots. Its drop ends whatever is still inside.
        let cgroup = match &cfg.cgroups {
            Some(pool) => {
                let limits = Limits {
                    memory: Some((memory_mib << 20) + VMM_MEMORY),
                    pids: Some(VMM_TASKS),
                    cpu_millis: spec.limits.cpu_millis,
                    ..spec.limits
                };
                Some(pool.claim(&limits).map_err(|e| MicrovmError::Setup {
                    step: "QEMU's cgroup".into(),
                    message: e.to_string(),
                })?)
            }
            None => None,
        };
        let mut vm = cfg.qemu.launch(&vm_spec)?;
        let pid = vm.pid();
        // QEMU has its end now; ours closing is what tells the stack the guest is gone.
        let nic = nic.map(|(host_end, _vm_end)| Arc::new(host_end));
        // Moved in at once, before the guest has run much: what QEMU charged while setting
        // up (its own allocations, the kernel and initramfs copied into guest RAM) stays with
        // the server's cgroup (v1 moves no charges), everything the guest touches after is here.
        if let Some(cg) = &cgroup
            && let Err(e) = cg.add(pid as i32)
        {
            let _ = vm.quit();
            return Err(MicrovmError::Setup {
                step: "QEMU's cgroup".into(),
                message: e.to_string(),
            });
        }
        // QEMU connects its chardev while starting, before the guest runs.
        listener.set_nonblocking(true).map_err(io_op("agent socket"))?;
        let control = loop {
            match listener.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if vm.exited() || started.elapsed() > Duration::from_secs(10) {
                        let _ = vm.quit();
                        return Err(MicrovmError::Boot(format!(
                            "QEMU never connected the agent's port: {}",
                            crate::vmm::console_tail(&dir.join("qemu.log"), 400).trim()
                        )));
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => return Err(io_op("accept the agent's port")(e)),
            }
        };
        drop(listener);
        let _ = fs::remove_file(&agent_sock);
        control.set_nonblocking(false).map_err(io_op("agent socket"))?;
        let mut m = MicroVm {
            id: spec.id.clone(),
            dir: dir.to_path_buf(),
            vm: Mutex::new(Some(vm)),
            pid,
            control,
            nic,
            disk_bytes: spec.limits.disk,
            ready: Ready { phases: Vec::new(), landlock_abi: None, initial_pid: None },
            boot: Duration::ZERO,
            _owner: Some(owner),
            _uid: uid,
            _cgroup: cgroup,
        };
        if let Err(e) = m.handshake(&spec, started) {
            let console = crate::vmm::console_tail(&vm_spec.console_log(), 600);
            m.end();
            let last: Vec<&str> = console.lines().rev().take(3).collect();
            let last: Vec<&str> = last.into_iter().rev().collect();
            return Err(match e {
                MicrovmError::Boot(why) => {
                    MicrovmError::Boot(format!("{why}; guest console: {}", last.join(" | ")))
                }
                other => other,
            });
        }
        m.boot = started.elapsed();
        Ok(m)
    }

    fn handshake(&mut self, spec: &StartSpec, started: Instant) -> Result<(), MicrovmError> {
        let setup = SetupSpec {
            sandbox_id: spec.id.clone(),
            // The guest built its own root (see the agent's microvm mode).
            stage_dir: String::new(),
            lowers: 0,
            host_layers: Vec::new(),
            volumes: Vec::new(),
            own_disk: true,
            disk_bytes: spec.limits.disk,
            disk_inodes: 0,
            shm_bytes: shm_bytes(&spec.limits),
            writable: Vec::new(),
            require_landlock: false,
            rlimits: rlimits_for(&spec.limits),
            seccomp_notify: Vec::new(),
            seccomp_errno: Vec::new(),
            env: spec.env.clone(),
            listen: None,
            initial: None,
            exit_with_initial: false,
            allow_setuid: false,
            packet_relay: None,
            guest_nic: spec.nic.clone(),
        };
        let limit = spec.setup_timeout;
        let msg = ringfence_proto::encode(&setup)?;
        // The bytes wait in QEMU's chardev until the guest opens its port.
        self.control.write_all(&msg).map_err(io_op("send setup to the agent"))?;
        self.control
            .set_read_timeout(Some(Duration::from_millis(200)))
            .map_err(io_op("set timeout"))?;
        let mut mark = [0u8; 1];
        loop {
            match self.control.read(&mut mark) {
                Ok(1) => break,
                Ok(_) => return Err(MicrovmError::Boot("the guest closed its channel".into())),
                Err(e)
                    if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) =>
                {
                    if self.vm_exited() {
                        return Err(MicrovmError::Boot("the guest powered off during boot".into()));
                    }
                    if started.elapsed() > limit {
                        return Err(MicrovmError::Boot(format!("no agent within {limit:?}")));
                    }
                }
                Err(e) => return Err(io_op("read the agent's marker")(e)),
            }
        }
        self.control.set_read_timeout(Some(limit)).map_err(io_op("set timeout"))?;
        let event: Option<Event> = read_frame(&mut self.control).map_err(|e| match e {
            ProtoError::Io(io) => MicrovmError::Boot(format!("reading the agent's ready: {io}")),
            other => other.into(),
        })?;
        self.control.set_read_timeout(None).map_err(io_op("clear timeout"))?;
        match (mark[0], event) {
            (MARK_NO_LISTENER, Some(Event::Ready(r))) => {
                self.ready = r;
                Ok(())
            }
            (MARK_ERROR, Some(Event::SetupFailed { step, message })) => {
                Err(MicrovmError::Setup { step, message })
            }
            (_, None) => Err(MicrovmError::Boot("the guest closed its channel".into())),
            (m, Some(other)) => Err(MicrovmError::Protocol(format!("marker {m:#x}, {other:?}"))),
        }
    }

    fn vm_exited(&self) -> bool {
        self.vm.lock().ok().and_then(|mut g| g.as_mut().map(|v| v.exited())).unwrap_or(true)
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// The QEMU process's pid.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The host's end of the guest NIC's socket (one Ethernet frame per message,
    /// non-blocking), for the userspace stack; `None` if the guest has no NIC.
    pub fn nic(&self) -> Option<Arc<OwnedFd>> {
        self.nic.clone()
    }

    /// A second handle on the agent's channel.
    pub fn control_clone(&self) -> Result<UnixStream, MicrovmError> {
        self.control.try_clone().map_err(io_op("clone the agent channel"))
    }

    fn with_vm<T>(
        &self,
        f: impl FnOnce(&mut QemuVm) -> Result<T, MicrovmError>,
    ) -> Result<T, MicrovmError> {
        let mut g = self.vm.lock().map_err(|_| MicrovmError::Vmm("VM lock poisoned".into()))?;
        match g.as_mut() {
            Some(vm) => {
                if vm.exited() {
                    return Err(MicrovmError::Vmm(format!("sandbox {} is not running", self.id)));
                }
                f(vm)
            }
            None => Err(MicrovmError::Vmm(format!("sandbox {} is not running", self.id))),
        }
    }

    /// Stops the guest's vCPUs (QMP `stop`): everything inside stays where it is.
    pub fn pause(&self) -> Result<(), MicrovmError> {
        self.with_vm(|vm| vm.pause())
    }

    /// QMP `cont`.
    pub fn resume(&self) -> Result<(), MicrovmError> {
        self.with_vm(|vm| vm.resume())
    }

    /// Saves memory and device state to `dest` (the guest stays paused afterwards).
    pub fn save_memory(&self, dest: &Path) -> Result<(), MicrovmError> {
        self.with_vm(|vm| vm.save(dest))
    }

    /// QEMU's memory and CPU (from `/proc/<pid>`), and the writable disk's allocation.
    pub fn usage(&self) -> Usage {
        let status = fs::read_to_string(format!("/proc/{}/status", self.pid)).unwrap_or_default();
        let rss_bytes = status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<u64>().ok())
            .map(|kb| kb * 1024);
        let stat = fs::read_to_string(format!("/proc/{}/stat", self.pid)).unwrap_or_default();
        // Fields after the command's closing parenthesis: utime and stime are 12th and 13th.
        let cpu_ns = stat.rsplit_once(')').and_then(|(_, rest)| {
            let f: Vec<&str> = rest.split_whitespace().collect();
            let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
            let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok().flatten()?;
            Some(ticks * (1_000_000_000 / u64::try_from(hz).ok()?.max(1)))
        });
        let disk = fs::metadata(self.dir.join("rw.ext4"))
            .ok()
            .map(|m| (std::os::unix::fs::MetadataExt::blocks(&m) * 512, self.disk_bytes));
        Usage { rss_bytes, cpu_ns, disk }
    }

    fn end(&mut self) {
        if let Ok(mut g) = self.vm.lock()
            && let Some(mut vm) = g.take()
        {
            let _ = vm.quit();
        }
        let _ = fs::remove_dir_all(&self.dir);
    }

    /// Ends the guest and removes everything it held.
    pub fn delete(mut self) {
        self.end();
    }
}

impl Drop for MicroVm {
    fn drop(&mut self) {
        self.end();
    }
}

/// The socket pair of a guest's NIC: (the host's end, QEMU's end). `SOCK_SEQPACKET` keeps
/// each frame one message and tells the host's end when QEMU's closes (a datagram socket
/// would not); both ends close on exec, QEMU's is passed on purpose ([`crate::vmm::Nic`]).
fn nic_socket(nic: &ringfence_proto::GuestNic) -> Result<(OwnedFd, OwnedFd), MicrovmError> {
    if nic.mtu < 576 || nic.mtu > 65535 - 14 {
        return Err(MicrovmError::Invalid(format!("NIC MTU {} (576 to 65521)", nic.mtu)));
    }
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};
    socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
    )
    .map_err(|e| io_op("socketpair for the guest's NIC")(e.into()))
}

/// Removes what an earlier server left under `state_dir/sandboxes`: QEMU processes whose
/// command line names a sandbox directory there, and the directories. Returns their ids.
pub fn sweep(cfg: &MicrovmConfig) -> Vec<String> {
    let root = cfg.state_dir.join("sandboxes");
    let Ok(rd) = fs::read_dir(&root) else { return Vec::new() };
    // A directory whose claim another live server holds is its sandbox, not a leftover.
    let dirs: Vec<PathBuf> = rd
        .flatten()
        .map(|e| e.path())
        .filter(|d| {
            let Ok(f) = fs::File::open(d.join("owner.lock")) else { return true };
            nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock).is_ok()
        })
        .collect();
    if dirs.is_empty() {
        return Vec::new();
    }
    // QEMU processes of those directories: their `-qmp unix:<dir>/qmp.sock` names them.
    if let Ok(procs) = fs::read_dir("/proc") {
        for p in procs.flatten() {
            let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            let Ok(cmd) = fs::read(p.path().join("cmdline")) else { continue };
            let cmd = String::from_utf8_lossy(&cmd);
            if dirs.iter().any(|d| cmd.contains(&format!("unix:{}/qmp.sock", d.display()))) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
    let mut gone = Vec::new();
    for d in dirs {
        if fs::remove_dir_all(&d).is_ok() {
            gone.extend(d.file_name().map(|n| n.to_string_lossy().into_owned()));
        }
    }
    gone
}
