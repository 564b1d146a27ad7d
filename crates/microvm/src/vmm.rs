//! The VMM seam: what the tier needs from a virtual machine monitor, and QEMU's `microvm`
//! machine driven over QMP as the one implementation.
//!
//! A backend turns a [`VmSpec`] (kernel, initramfs, command line, disks, the agent's channel,
//! memory and vCPUs) into a running [`VmHandle`] that can pause, continue, save its memory and
//! device state to a file, and quit. Nothing above this module knows it is QEMU.
//!
//! How another VMM would plug in:
//! - **Firecracker**: `launch` starts `firecracker --api-sock <dir>/fc.sock` (under its
//!   `jailer`), then `PUT /boot-source` (the same `vmlinux`, initramfs and command line: it boots
//!   the PVH/ELF kernel directly), `PUT /drives/root` (read-only) and `/drives/rw`, `PUT
//!   /machine-config` (vCPUs, memory), `PUT /actions {InstanceStart}`. The agent channel would
//!   be Firecracker's vsock (a unix socket on the host: `CONNECT <port>`), since it has no
//!   virtio-serial; the agent would then open an `AF_VSOCK` socket instead of the port (the
//!   bridge in `ringfence_agent::microvm` already hands the rest of the agent a socket).
//!   `pause`/`resume` are `PATCH /vm {state}`, `save` is `PUT /snapshot/create` (memory file plus
//!   a state file), `quit` is `SendCtrlAltDel` then a kill. Firecracker needs real KVM: its
//!   probe is the same boot-with-a-deadline, with no TCG fallback.
//! - **Cloud Hypervisor**: `--api-socket`, `vm.create`/`vm.boot` with `payload.kernel` and
//!   `disks`, `console` or vsock for the agent; `vm.pause`, `vm.resume`, `vm.snapshot
//!   destination_url=file://…`, `vmm.shutdown`.
//!
//! Both speak HTTP over a unix socket where QEMU speaks QMP; the [`Vmm`] trait hides which.

use std::ffi::OsStr;
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::MicrovmError;
use crate::jail::VmJail;
use crate::qmp::Qmp;

/// How the VMM runs guest code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// Hardware virtualisation through `/dev/kvm`.
    Kvm,
    /// QEMU's binary translator: no host support needed, ~10-50x slower per instruction.
    Tcg,
}

impl Accel {
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// A block device of the guest.
#[derive(Debug, Clone)]
pub struct Disk {
    pub path: PathBuf,
    pub read_only: bool,
}

/// Everything a backend needs to start one guest.
#[derive(Debug, Clone)]
pub struct VmSpec {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub memory_mib: u64,
    pub vcpus: u32,
    /// In order: the guest sees `/dev/vda`, `/dev/vdb`, ...
    pub disks: Vec<Disk>,
    /// A unix socket the VMM listens on for the host, connected to the guest's agent port. The
    /// VMM waits for the host's connection before the guest runs (nothing the guest writes is
    /// lost), and takes a new one when a host goes and another comes (a restarted server).
    pub agent_socket: Option<PathBuf>,
    /// The guest's network interface, if it has one.
    pub nic: Option<Nic>,
    /// The VM's own directory: the VMM's control socket and the console log go here.
    pub dir: PathBuf,
    pub accel: Accel,
    /// Who the VMM runs as and in which namespaces ([`crate::jail`]); `None` runs it as the
    /// caller (a host without root, where there is no uid to drop to).
    pub jail: Option<VmJail>,
    /// Start with no guest running, waiting for [`VmHandle::restore`] to load a saved one
    /// (the devices above must be those the saved guest had, in the same order and sizes).
    pub incoming: bool,
}

/// The guest's NIC: a virtio-net device whose Ethernet frames the VMM exchanges, one per
/// message, over a `SOCK_SEQPACKET` socket it inherits (QEMU's `-netdev dgram` on a
/// descriptor). The socket's other end is the host's userspace stack: the VMM's own network
/// namespace has nothing but loopback, so this is the guest's only way out.
#[derive(Debug, Clone, Copy)]
pub struct Nic {
    /// The caller's end for the VMM (close-on-exec; [`Qemu`] passes it as [`NIC_FD`]).
    pub fd: RawFd,
    pub mac: [u8; 6],
    pub mtu: u32,
}

/// The descriptor number the VMM finds the NIC's socket at.
pub const NIC_FD: RawFd = 3;

impl VmSpec {
    /// The guest's serial console, kept for diagnostics.
    pub fn console_log(&self) -> PathBuf {
        self.dir.join("console.log")
    }
}

/// A VMM that can start guests.
pub trait Vmm: Send + Sync + std::fmt::Debug {
    type Vm: VmHandle;
    /// Starts a guest; returns once its control channel (QMP, an API socket) answers.
    fn launch(&self, spec: &VmSpec) -> Result<Self::Vm, MicrovmError>;
}

/// One running guest.
pub trait VmHandle: Send + std::fmt::Debug {
    /// The VMM process's host pid.
    fn pid(&self) -> u32;
    /// Stops every vCPU where it is.
    fn pause(&mut self) -> Result<(), MicrovmError>;
    /// Lets the vCPUs run again.
    fn resume(&mut self) -> Result<(), MicrovmError>;
    /// Writes the guest's memory and device state to `dest` (the guest is paused for it and
    /// stays paused).
    fn save(&mut self, dest: &Path) -> Result<(), MicrovmError>;
    /// Loads the guest saved at `src` by [`VmHandle::save`] into a VM launched with
    /// [`VmSpec::incoming`], and runs it.
    fn restore(&mut self, src: &Path) -> Result<(), MicrovmError>;
    /// Whether the VMM process has exited.
    fn exited(&mut self) -> bool;
    /// Ends the guest and waits for the VMM process to exit (killed if it does not quit).
    fn quit(&mut self) -> Result<(), MicrovmError>;
}

/// QEMU's `microvm` machine.
#[derive(Debug, Clone)]
pub struct Qemu {
    pub binary: PathBuf,
}

/// Where QEMU is looked for: `$RINGFENCE_QEMU`, then the PATH.
pub const QEMU_ENV: &str = "RINGFENCE_QEMU";

impl Qemu {
    /// QEMU's x86-64 system emulator, if installed.
    pub fn find() -> Option<Qemu> {
        if let Some(p) = std::env::var_os(QEMU_ENV) {
            let p = PathBuf::from(p);
            return p.is_file().then_some(Qemu { binary: p });
        }
        let path = std::env::var_os("PATH")?;
        std::env::split_paths(&path)
            .map(|d| d.join("qemu-system-x86_64"))
            .find(|p| p.is_file())
            .map(|binary| Qemu { binary })
    }

    /// The command line for `spec`.
    pub fn args(spec: &VmSpec) -> Vec<String> {
        let mut a: Vec<String> = Vec::new();
        let mut push = |s: &[&str]| a.extend(s.iter().map(|s| s.to_string()));
        // microvm: virtio-mmio devices only, no PCI, no firmware (the kernel's PVH entry).
        push(&["-M", "microvm,x-option-roms=off,rtc=on"]);
        match spec.accel {
            // This host's KVM rejects the arch-capabilities MSR QEMU sets for `-cpu host`.
            Accel::Kvm => push(&["-accel", "kvm", "-cpu", "host,-arch-capabilities"]),
            // A 64 MiB translation cache instead of the default 1 GiB: far less host memory
            // per guest, and a sandbox's code paths fit in it.
            Accel::Tcg => push(&["-accel", "tcg,tb-size=64", "-cpu", "max"]),
        }
        push(&["-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"]);
        // QEMU's own seccomp filter. set*id stays allowed only for QEMU's own drop to the
        // jail's uid (`crate::jail`).
        let elevate = if spec.jail.is_some() { "allow" } else { "deny" };
        let sandbox =
            format!("on,obsolete=deny,elevateprivileges={elevate},spawn=deny,resourcecontrol=deny");
        push(&["-sandbox", &sandbox]);
        if let Some(jail) = spec.jail {
            let args = crate::jail::qemu_args(jail, &spec.dir.join("root"));
            push(&args.iter().map(String::as_str).collect::<Vec<_>>());
        }
        let mem = spec.memory_mib.to_string();
        let smp = spec.vcpus.max(1).to_string();
        push(&["-m", &mem, "-smp", &smp]);
        let console = format!("file:{}", spec.console_log().display());
        push(&["-serial", &console]);
        let qmp = format!("unix:{},server=on,wait=off", spec.dir.join("qmp.sock").display());
        push(&["-qmp", &qmp]);
        let kernel = spec.kernel.to_string_lossy().into_owned();
        push(&["-kernel", &kernel, "-append", &spec.cmdline]);
        if let Some(initrd) = &spec.initrd {
            let initrd = initrd.to_string_lossy().into_owned();
            push(&["-initrd", &initrd]);
        }
        for (i, d) in spec.disks.iter().enumerate() {
            // QEMU's option syntax doubles commas in values; our paths have none, but a
            // directory name with one must not split the option.
            let path = d.path.to_string_lossy().replace(',', ",,");
            // A writable disk keeps its read-write descriptor for good (`auto-read-only=off`):
            // otherwise saving the guest, which drops the disk's write permission at its end,
            // makes QEMU reopen the image read-only, which its jail (another uid, an empty
            // root) cannot, and the save fails ("bdrv_inactivate_all() failed").
            let ro = if d.read_only { ",readonly=on" } else { ",auto-read-only=off" };
            let drive = format!("id=disk{i},file={path},format=raw,if=none,cache=unsafe{ro}");
            let dev = format!("virtio-blk-device,drive=disk{i}");
            push(&["-drive", &drive, "-device", &dev]);
        }
        let incoming = incoming_args(spec);
        push(&incoming.iter().map(String::as_str).collect::<Vec<_>>());
        if let Some(sock) = &spec.agent_socket {
            let path = sock.to_string_lossy().replace(',', ",,");
            // QEMU listens (bound as root, before it drops to its uid and empty root, so a later
            // server can still connect); `wait=on`: it waits for the first host at start-up.
            let chardev = format!("socket,id=agent,path={path},server=on,wait=on");
            push(&["-chardev", &chardev, "-device", "virtio-serial-device"]);
            push(&["-device", "virtserialport,chardev=agent,name=ringfence.agent"]);
        }
        if let Some(nic) = &spec.nic {
            a.extend(Qemu::nic_args(nic));
        }
        a
    }

    /// The NIC's options: the `dgram` backend on the inherited socket (no path to resolve,
    /// so QEMU's chroot does not matter, and no host interface), and virtio-net on microvm's
    /// virtio-mmio bus with our MAC and MTU (`host_mtu`: the guest's driver takes it as its
    /// largest; big packets mean fewer of them to emulate).
    pub fn nic_args(nic: &Nic) -> Vec<String> {
        let mac = nic.mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":");
        vec![
            "-netdev".into(),
            format!("dgram,id=net0,local.type=fd,local.str={NIC_FD}"),
            "-device".into(),
            format!("virtio-net-device,netdev=net0,mac={mac},host_mtu={}", nic.mtu),
        ]
    }
}

/// The options of a VM that starts by loading a saved guest: `-incoming defer` waits for the
/// stream's URI over QMP (a descriptor we pass, see [`VmHandle::restore`]), so no path or
/// shell command goes on the command line.
fn incoming_args(spec: &VmSpec) -> Vec<String> {
    if spec.incoming { vec!["-incoming".into(), "defer".into()] } else { Vec::new() }
}

/// The QEMU process: our child, or one an earlier server started (re-attached).
#[derive(Debug)]
enum Proc {
    Child(ringfence_sys::pspawn::Child),
    Adopted { pid: u32, pidfd: std::os::fd::OwnedFd },
}

/// A QEMU process and its QMP connection.
#[derive(Debug)]
pub struct QemuVm {
    proc: Proc,
    qmp: Qmp,
    /// The host's first connection to the agent's port (taken by [`QemuVm::take_agent`]).
    agent: Option<std::os::unix::net::UnixStream>,
}

impl QemuVm {
    /// The connection to the guest's agent port made at launch.
    pub fn take_agent(&mut self) -> Option<std::os::unix::net::UnixStream> {
        self.agent.take()
    }

    /// Re-attaches to a QEMU an earlier server launched for `dir` (its pid `pid`): a pidfd
    /// on it (so a recycled pid is never signalled) and a new QMP connection.
    pub fn adopt(pid: u32, dir: &Path) -> Result<QemuVm, MicrovmError> {
        let pidfd = ringfence_sys::pidfd_open(pid as i32)
            .map_err(|e| MicrovmError::Vmm(format!("QEMU {pid} is gone: {e}")))?;
        // The pid must still be this sandbox's QEMU, not a recycled one.
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let needle = format!("unix:{},server=on", dir.join("qmp.sock").display());
        if !String::from_utf8_lossy(&cmd).contains(&needle) {
            return Err(MicrovmError::Vmm(format!("process {pid} is not this sandbox's QEMU")));
        }
        let qmp = Qmp::connect(&dir.join("qmp.sock"), Duration::from_secs(10))?;
        Ok(QemuVm { proc: Proc::Adopted { pid, pidfd }, qmp, agent: None })
    }
}

/// Connects to the agent socket QEMU listens on, retrying while it starts.
fn connect_agent(
    path: &Path,
    child: &mut ringfence_sys::pspawn::Child,
) -> Result<std::os::unix::net::UnixStream, MicrovmError> {
    let started = Instant::now();
    loop {
        match std::os::unix::net::UnixStream::connect(path) {
            Ok(s) => return Ok(s),
            Err(e) => {
                if started.elapsed() > Duration::from_secs(10)
                    || !matches!(child.try_wait(), Ok(None))
                {
                    return Err(MicrovmError::Io {
                        op: "connect to the agent's port".into(),
                        source: e,
                    });
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
}

impl Vmm for Qemu {
    type Vm = QemuVm;

    fn launch(&self, spec: &VmSpec) -> Result<QemuVm, MicrovmError> {
        // The program and its arguments: QEMU, or the jail's wrapper in front of it.
        let mut argv: Vec<std::ffi::OsString> = Vec::new();
        let program = match spec.jail {
            Some(_) => {
                // The empty directory QEMU changes root to (see `crate::jail`).
                let root = spec.dir.join("root");
                std::fs::create_dir_all(&root).map_err(|source| MicrovmError::Io {
                    op: format!("mkdir {}", root.display()),
                    source,
                })?;
                let mut wrapper = crate::jail::wrapper();
                let program = PathBuf::from(wrapper.remove(0));
                argv.extend(wrapper.into_iter().map(Into::into));
                argv.push(self.binary.clone().into());
                program
            }
            None => self.binary.clone(),
        };
        argv.extend(Qemu::args(spec).into_iter().map(Into::into));
        let args: Vec<&OsStr> = argv.iter().map(|a| a.as_os_str()).collect();
        let null = File::options()
            .read(true)
            .write(true)
            .open("/dev/null")
            .map_err(|source| MicrovmError::Io { op: "open /dev/null".into(), source })?;
        let log = File::create(spec.dir.join("qemu.log"))
            .map_err(|source| MicrovmError::Io { op: "create qemu.log".into(), source })?;
        let mut fds = vec![(null.as_raw_fd(), 0), (null.as_raw_fd(), 1), (log.as_raw_fd(), 2)];
        if let Some(nic) = &spec.nic {
            // Only this child gets it, at the number its options name.
            fds.push((nic.fd, NIC_FD));
        }
        // `posix_spawn`, not `Command`: placing the NIC's descriptor takes a `pre_exec` hook,
        // with which `Command` forks the server, copying its page tables (4-13 ms for runsc,
        // see `ringfence_sys::pspawn`). Its own process group, so a signal to the server's
        // group (a terminal's ^C) does not kill guests the server still has to clean up.
        let opts = ringfence_sys::pspawn::Options { own_process_group: true };
        let spawning = Instant::now();
        let mut child =
            ringfence_sys::pspawn::spawn_with(&program, &args, &fds, opts).map_err(|source| {
                MicrovmError::Io { op: format!("run {}", program.display()), source }
            })?;
        drop((null, log));
        tracing::debug!(spawn_us = spawning.elapsed().as_micros() as u64, "qemu started");
        // QEMU waits for the agent's connection before it serves QMP (`wait=on`).
        let agent = match &spec.agent_socket {
            Some(path) => match connect_agent(path, &mut child) {
                Ok(s) => Some(s),
                Err(e) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    let log =
                        std::fs::read_to_string(spec.dir.join("qemu.log")).unwrap_or_default();
                    return Err(MicrovmError::Vmm(format!("{e}; qemu: {}", log.trim())));
                }
            },
            None => None,
        };
        let qmp = match Qmp::connect(&spec.dir.join("qmp.sock"), Duration::from_secs(10)) {
            Ok(q) => q,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                let log = std::fs::read_to_string(spec.dir.join("qemu.log")).unwrap_or_default();
                return Err(MicrovmError::Vmm(format!("{e}; qemu: {}", log.trim())));
            }
        };
        Ok(QemuVm { proc: Proc::Child(child), qmp, agent })
    }
}

impl VmHandle for QemuVm {
    fn pid(&self) -> u32 {
        match &self.proc {
            Proc::Child(c) => c.id().unsigned_abs(),
            Proc::Adopted { pid, .. } => *pid,
        }
    }

    fn pause(&mut self) -> Result<(), MicrovmError> {
        self.qmp.execute("stop", None).map(drop)
    }

    fn resume(&mut self) -> Result<(), MicrovmError> {
        self.qmp.execute("cont", None).map(drop)
    }

    fn save(&mut self, dest: &Path) -> Result<(), MicrovmError> {
        self.pause()?;
        // QEMU 7.2 has no `file:` migration URI: it writes the stream to a descriptor we
        // open and pass over QMP, so no shell command line is ever built from a path.
        let file = File::create(dest).map_err(|source| MicrovmError::Io {
            op: format!("create {}", dest.display()),
            source,
        })?;
        self.qmp.send_fd("snapshot", &file)?;
        self.qmp.execute("migrate", Some(serde_json::json!({ "uri": "fd:snapshot" })))?;
        let started = Instant::now();
        loop {
            let status = self.qmp.execute("query-migrate", None)?;
            match status.get("status").and_then(|s| s.as_str()) {
                Some("completed") => return Ok(()),
                Some("failed") | Some("cancelled") => {
                    let why = status.get("error-desc").and_then(|s| s.as_str()).unwrap_or("");
                    return Err(MicrovmError::Vmm(format!("saving the guest failed: {why}")));
                }
                _ if started.elapsed() > Duration::from_secs(120) => {
                    let _ = self.qmp.execute("migrate_cancel", None);
                    return Err(MicrovmError::Vmm("saving the guest took over 120 s".into()));
                }
                _ => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    fn restore(&mut self, src: &Path) -> Result<(), MicrovmError> {
        let file = File::open(src)
            .map_err(|source| MicrovmError::Io { op: format!("open {}", src.display()), source })?;
        self.qmp.send_fd("incoming", &file)?;
        self.qmp.execute("migrate-incoming", Some(serde_json::json!({ "uri": "fd:incoming" })))?;
        // QEMU loads the stream in its main loop and starts the guest when it is complete
        // (no `-S`); `inmigrate` until then.
        let started = Instant::now();
        loop {
            let status = self.qmp.execute("query-status", None)?;
            match status.get("status").and_then(|s| s.as_str()) {
                Some("running") => return Ok(()),
                Some("inmigrate") | Some("prelaunch") => {}
                Some("paused") | Some("postmigrate") => {
                    self.qmp.execute("cont", None)?;
                }
                other => {
                    let m = self.qmp.execute("query-migrate", None).unwrap_or_default();
                    let why = m.get("error-desc").and_then(|s| s.as_str()).unwrap_or("");
                    return Err(MicrovmError::Vmm(format!(
                        "restoring the guest failed (state {}): {why}",
                        other.unwrap_or("unknown")
                    )));
                }
            }
            if self.exited() {
                return Err(MicrovmError::Vmm("QEMU exited while restoring the guest".into()));
            }
            if started.elapsed() > Duration::from_secs(120) {
                return Err(MicrovmError::Vmm("restoring the guest took over 120 s".into()));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn exited(&mut self) -> bool {
        match &mut self.proc {
            Proc::Child(c) => !matches!(c.try_wait(), Ok(None)),
            // Signal 0 checks the process exists; not our child, so no zombie to reap.
            Proc::Adopted { pidfd, .. } => ringfence_sys::pidfd_send_signal(pidfd, 0).is_err(),
        }
    }

    fn quit(&mut self) -> Result<(), MicrovmError> {
        if self.exited() {
            return Ok(());
        }
        // `quit` ends QEMU at once (the guest's disks are ours to throw away, nothing to
        // flush); a QEMU that does not go within a second is killed.
        let _ = self.qmp.execute("quit", None);
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(1) {
            if self.exited() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        match &mut self.proc {
            Proc::Child(c) => {
                let _ = c.kill();
                c.wait()
                    .map(drop)
                    .map_err(|source| MicrovmError::Io { op: "wait for qemu".into(), source })
            }
            Proc::Adopted { pidfd, .. } => {
                let _ = ringfence_sys::pidfd_send_signal(pidfd, libc::SIGKILL);
                let started = Instant::now();
                while !self.exited() && started.elapsed() < Duration::from_secs(5) {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Ok(())
            }
        }
    }
}

impl Drop for QemuVm {
    fn drop(&mut self) {
        let _ = self.quit();
    }
}

/// Reads what a guest printed on its console (the last `max` bytes), for error messages.
pub fn console_tail(path: &Path, max: usize) -> String {
    let mut s = String::new();
    if let Ok(mut f) = File::open(path) {
        let mut buf = Vec::new();
        let _ = f.read_to_end(&mut buf);
        let start = buf.len().saturating_sub(max);
        s = String::from_utf8_lossy(&buf[start..]).into_owned();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_nic_is_virtio_net_on_the_inherited_socket_with_our_mac_and_mtu() {
        let nic = Nic { fd: 9, mac: [0x02, 0x52, 0x46, 0, 0, 2], mtu: 65521 };
        let a = Qemu::nic_args(&nic);
        assert_eq!(a[0], "-netdev");
        // QEMU finds the socket at NIC_FD (where `launch` puts it), whatever the caller's number.
        assert_eq!(a[1], format!("dgram,id=net0,local.type=fd,local.str={NIC_FD}"));
        assert_eq!(a[2], "-device");
        assert_eq!(a[3], "virtio-net-device,netdev=net0,mac=02:52:46:00:00:02,host_mtu=65521");
    }
}
