//! The agent as the init of a `microvm` guest: PID 1 of its own kernel, booted from an
//! initramfs that holds only this binary and a few kernel modules (see `ringfence_microvm`).
//!
//! Before the host can speak to it, it builds the guest's root itself: the kernel modules the
//! cloud kernel does not build in (virtio-mmio, console, block, network, overlayfs), the template's
//! read-only disk (`/dev/vda`) under an overlay whose writable layer is the sandbox's own disk
//! (`/dev/vdb`, already formatted by the host at the quota's size), then the usual `/proc`,
//! `/sys`, `/dev`. The control channel is the virtio-serial port the host named
//! [`PORT_NAME`]: a character device, not a socket, so a thread pair copies it to one end of
//! a socket pair and the rest of the agent speaks on the other end, unchanged. Once it has its
//! setup, it configures the NIC the host described ([`configure_nic`]).

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::mount::{MsFlags, mount};
use ringfence_proto::{GUEST_PARKED, WAKE_LEN, Wake};

/// The name the host gives the agent's virtio-serial port (`virtserialport,name=`).
pub const PORT_NAME: &str = "ringfence.agent";

/// How long the guest waits for a device the host attached to show up.
const DEVICE_WAIT: Duration = Duration::from_secs(20);

/// A boot step that failed, and why. PID 1 has no one to report to before its channel exists:
/// the message goes to the kernel console (the host keeps the console log).
#[derive(Debug)]
pub struct BootError(pub String);

fn fail(step: &str) -> impl Fn(nix::Error) -> BootError + '_ {
    move |e| BootError(format!("{step}: {e}"))
}

fn io_fail(step: &str) -> impl Fn(std::io::Error) -> BootError + '_ {
    move |e| BootError(format!("{step}: {e}"))
}

fn mount_fs(
    src: &str,
    target: &str,
    fstype: &str,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<(), BootError> {
    fs::create_dir_all(target).map_err(io_fail(target))?;
    mount(Some(src), target, Some(fstype), flags, data)
        .map_err(|e| BootError(format!("mount {fstype} on {target}: {e}")))
}

/// Builds the guest's root and returns the agent's end of the control channel (and the
/// listener later connections come from, see [`bridge`]), with the root switched to the
/// overlay.
pub fn boot() -> Result<(UnixStream, std::os::unix::net::UnixListener), BootError> {
    let nosuid = MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC | MsFlags::MS_NODEV;
    mount_fs("devtmpfs", "/dev", "devtmpfs", MsFlags::MS_NOSUID, None)?;
    mount_fs("proc", "/proc", "proc", nosuid, None)?;
    mount_fs("sysfs", "/sys", "sysfs", nosuid, None)?;
    load_modules(Path::new("/lib/modules"))?;
    let port = find_port(PORT_NAME)?;
    let root_disk = wait_for(Path::new("/dev/vda"))?;
    let rw_disk = wait_for(Path::new("/dev/vdb"))?;

    // The template: read-only at the block layer too (the host attaches it read-only).
    let ro = MsFlags::MS_RDONLY | MsFlags::MS_NODEV;
    mount_fs(&root_disk, "/lower", "ext4", ro, Some("noload"))?;

    // The channel is opened here, on the initramfs's /dev (before the switch of root below).
    let port =
        OpenOptions::new().read(true).write(true).open(&port).map_err(io_fail("open port"))?;
    // Parked: everything so far is the same in every sandbox of this template, so a memory
    // snapshot of the guest is taken here. What follows is each sandbox's own.
    park(&port, &rw_disk)?;

    mount_fs(&rw_disk, "/rw", "ext4", MsFlags::MS_NODEV, None)?;
    for d in ["/rw/upper", "/rw/work"] {
        fs::create_dir_all(d).map_err(io_fail(d))?;
    }
    mount_fs(
        "overlay",
        "/newroot",
        "overlay",
        MsFlags::empty(),
        Some("lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work"),
    )?;
    mount_fs("proc", "/newroot/proc", "proc", nosuid, None)?;
    mount_fs("sysfs", "/newroot/sys", "sysfs", nosuid, None)?;
    mount_fs("devtmpfs", "/newroot/dev", "devtmpfs", MsFlags::MS_NOSUID, None)?;
    mount_fs(
        "devpts",
        "/newroot/dev/pts",
        "devpts",
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620"),
    )?;
    mount_fs("tmpfs", "/newroot/dev/shm", "tmpfs", nosuid, Some("mode=1777"))?;
    mount_fs("tmpfs", "/newroot/run", "tmpfs", nosuid, Some("mode=0755"))?;
    // /dev/ptmx of the new devpts instance, as the jail sets it up.
    let ptmx = Path::new("/newroot/dev/ptmx");
    let _ = fs::remove_file(ptmx);
    std::os::unix::fs::symlink("pts/ptmx", ptmx).map_err(io_fail("link /dev/ptmx"))?;

    // A machine id of this guest's own, not the template's (and not another restore's).
    if Path::new("/newroot/etc").is_dir() {
        new_machine_id(Path::new("/newroot/etc/machine-id"))?;
    }

    // The initramfs is the kernel's rootfs, which cannot be pivoted away: move the overlay
    // over it and chroot, as switch_root does. What stays behind (this binary, the modules)
    // is the guest's own; the VM is the boundary, not this root.
    std::env::set_current_dir("/newroot").map_err(io_fail("chdir /newroot"))?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .map_err(fail("move the root"))?;
    nix::unistd::chroot(".").map_err(fail("chroot"))?;
    std::env::set_current_dir("/").map_err(io_fail("chdir /"))?;

    bridge(port)
}

/// Tells the host the guest is parked ([`GUEST_PARKED`]) and waits for its [`Wake`]; then takes
/// this sandbox's identity from it: the host's wall clock, fresh entropy for the kernel's
/// generator (reseeded at once), and none of what the kernel cached of the writable disk.
///
/// A guest restored from a snapshot wakes here with the snapshot's clock and generator state
/// (shared with every other restore of it) and with the page cache of the disk that was
/// attached when the snapshot was taken (a placeholder: only the partition scan read it).
/// The boot id (`/proc/sys/kernel/random/boot_id`) is not set here: the kernel makes it on
/// its first read, which no one has done before this point, so each restore makes its own
/// from the reseeded generator.
fn park(port: &File, rw_disk: &str) -> Result<(), BootError> {
    let mut out = port;
    out.write_all(&[GUEST_PARKED]).map_err(io_fail("write to the port"))?;
    let mut msg = [0u8; WAKE_LEN];
    let mut got = 0;
    let mut input = port;
    while got < WAKE_LEN {
        match input.read(&mut msg[got..]) {
            // No host on the port's other end (yet, or between a snapshot and its restore):
            // the port reads end-of-file until one connects.
            Ok(0) => std::thread::sleep(Duration::from_millis(5)),
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(BootError(format!("read the host's wake: {e}"))),
        }
    }
    let wake = Wake::from_bytes(&msg).map_err(|e| BootError(format!("the host's wake: {e}")))?;
    apply_wake(&wake)?;
    let disk = File::open(rw_disk).map_err(io_fail("open the writable disk"))?;
    ringfence_sys::flush_block_cache(&disk)
        .map_err(|e| BootError(format!("drop the writable disk's cached blocks: {e}")))?;
    Ok(())
}

/// Steps the clock to the host's and reseeds the kernel's generator with the host's entropy.
fn apply_wake(wake: &Wake) -> Result<(), BootError> {
    let secs = i64::try_from(wake.unix_secs)
        .map_err(|_| BootError("the host's clock is out of range".into()))?;
    let now = nix::sys::time::TimeSpec::new(secs, i64::from(wake.nanos));
    nix::time::clock_settime(nix::time::ClockId::CLOCK_REALTIME, now)
        .map_err(fail("step the clock"))?;
    let random = OpenOptions::new()
        .write(true)
        .open("/dev/urandom")
        .map_err(io_fail("open /dev/urandom"))?;
    ringfence_sys::add_entropy_and_reseed(&random, &wake.entropy)
        .map_err(|e| BootError(format!("reseed the kernel's generator: {e}")))
}

/// Writes a fresh random machine id to `path`.
fn new_machine_id(path: &Path) -> Result<(), BootError> {
    let mut id = [0u8; 16];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut id))
        .map_err(io_fail("read /dev/urandom"))?;
    let hex: String = id.iter().map(|b| format!("{b:02x}")).collect();
    fs::write(path, format!("{hex}\n")).map_err(io_fail("write /etc/machine-id"))
}

/// A guest restored from a running guest's memory (`Request::Reidentify`) becomes a machine
/// of its own: the same as a parked guest's wake (clock, generator), plus what a running guest
/// already had set up: its hostname and machine id. Everything else, processes included, is
/// the saved guest's, which is what a memory fork is. Only PID 1 of a guest does this: an
/// agent of another tier refuses (its host's clock is not its to step).
pub(crate) fn reidentify(hostname: &str, wake: &[u8]) -> Result<(), String> {
    if std::process::id() != 1 {
        return Err("re-identify is for a microvm guest's agent (PID 1) only".into());
    }
    let bytes: &[u8; WAKE_LEN] =
        wake.try_into().map_err(|_| format!("a wake is {WAKE_LEN} bytes, not {}", wake.len()))?;
    let wake = Wake::from_bytes(bytes).map_err(|e| format!("the host's wake: {e}"))?;
    apply_wake(&wake).map_err(|e| e.0)?;
    nix::unistd::sethostname(hostname).map_err(|e| format!("sethostname: {e}"))?;
    // After the boot's chroot, the guest's root is the overlay: /etc is its own.
    if Path::new("/etc").is_dir() {
        new_machine_id(Path::new("/etc/machine-id")).map_err(|e| e.0)?;
    }
    Ok(())
}

/// Loads the modules listed in `dir/order`, in that order (each after what it needs).
fn load_modules(dir: &Path) -> Result<(), BootError> {
    let order = fs::read_to_string(dir.join("order")).map_err(io_fail("read module order"))?;
    for name in order.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let path = dir.join(format!("{name}.ko"));
        let file = File::open(&path).map_err(io_fail(name))?;
        match nix::kmod::finit_module(&file, c"", nix::kmod::ModuleInitFlags::empty()) {
            Ok(()) | Err(nix::Error::EEXIST) => {}
            Err(e) => return Err(BootError(format!("load module {name}: {e}"))),
        }
    }
    Ok(())
}

/// The device node of the virtio-serial port named `name`, once the driver has made it.
fn find_port(name: &str) -> Result<PathBuf, BootError> {
    let started = Instant::now();
    loop {
        if let Ok(entries) = fs::read_dir("/sys/class/virtio-ports") {
            for e in entries.flatten() {
                let named = fs::read_to_string(e.path().join("name")).unwrap_or_default();
                if named.trim() == name {
                    let dev = Path::new("/dev").join(e.file_name());
                    if dev.exists() {
                        return Ok(dev);
                    }
                }
            }
        }
        if started.elapsed() > DEVICE_WAIT {
            return Err(BootError(format!("no virtio-serial port named {name}")));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn wait_for(dev: &Path) -> Result<String, BootError> {
    let started = Instant::now();
    while !dev.exists() {
        if started.elapsed() > DEVICE_WAIT {
            return Err(BootError(format!("no {}", dev.display())));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(dev.to_string_lossy().into_owned())
}

/// Where the bridge connects the agent anew when a host comes back (a directory only root may
/// enter: the agent's channel is root's; root in the guest is the sandbox's anyway).
const RECONNECT_DIR: &str = "/run/ringfence-agent";

/// Copies between the port and the agent; returns the agent's first connection and the
/// listener its serve loop takes later ones from.
///
/// A host that goes (the server ended, even killed with -9; QEMU keeps running) makes the
/// port read end-of-file: the bridge ends that connection (the agent drops what belonged to
/// it) and waits. When a host is back and writes, the bridge connects to the agent's
/// listener and carries on with a fresh connection, so a re-attaching server starts on a frame
/// boundary; anything of the old connection still on its way to the port is dropped.
fn bridge(port: File) -> Result<(UnixStream, std::os::unix::net::UnixListener), BootError> {
    use std::os::unix::fs::PermissionsExt;
    use std::sync::{Arc, Mutex};
    fs::create_dir_all(RECONNECT_DIR).map_err(io_fail(RECONNECT_DIR))?;
    fs::set_permissions(RECONNECT_DIR, fs::Permissions::from_mode(0o700))
        .map_err(io_fail(RECONNECT_DIR))?;
    let path = Path::new(RECONNECT_DIR).join("agent.sock");
    let _ = fs::remove_file(&path);
    let listener =
        std::os::unix::net::UnixListener::bind(&path).map_err(io_fail("bind the agent socket"))?;
    let (agent, relay) = UnixStream::pair().map_err(io_fail("socketpair"))?;
    // The port's writer, with the connection allowed to write to it now.
    let out: Arc<Mutex<(File, u64)>> =
        Arc::new(Mutex::new((port.try_clone().map_err(io_fail("dup port"))?, 0)));
    to_port(relay.try_clone().map_err(io_fail("dup relay"))?, out.clone(), 0);
    let mut port_in = port;
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        let mut session = Some(relay);
        let mut generation = 0u64;
        loop {
            match port_in.read(&mut buf) {
                Ok(0) => {
                    // No host on the port: end the agent's connection, wait for the next.
                    if let Some(s) = session.take() {
                        let _ = s.shutdown(std::net::Shutdown::Both);
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                Ok(n) => {
                    if session.is_none() {
                        let Ok(s) = UnixStream::connect(&path) else { continue };
                        generation += 1;
                        if let Ok(mut o) = out.lock() {
                            o.1 = generation;
                        }
                        if let Ok(w) = s.try_clone() {
                            to_port(w, out.clone(), generation);
                        }
                        session = Some(s);
                    }
                    if let Some(s) = session.as_mut()
                        && s.write_all(&buf[..n]).is_err()
                    {
                        session = None;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    });
    Ok((agent, listener))
}

/// Copies what the agent writes on connection `generation` to the port, while that is the
/// current connection.
fn to_port(
    mut from: UnixStream,
    out: std::sync::Arc<std::sync::Mutex<(File, u64)>>,
    generation: u64,
) {
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let Ok(mut o) = out.lock() else { break };
                    if o.1 != generation || o.0.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
    });
}

/// Sets up the guest's NIC as the host described it: found by its MAC (the virtio-net driver
/// names it), addressed, its MTU, a default route through the gateway (the host's stack
/// answers ARP for it), our resolver in `/etc/resolv.conf`, and loopback up. The NIC may
/// carry loopback addresses (`route_localnet`): the host reaches a service bound to
/// `127.0.0.1` inside by connecting to it through the NIC, as the jail's inbound path
/// connects from inside the namespace; only the host's stack is on the other end of the
/// wire. IPv6 is off on it: the host's stack routes IPv4 only.
pub fn configure_nic(nic: &ringfence_proto::GuestNic) -> Result<(), BootError> {
    use std::net::Ipv4Addr;
    let sys =
        |step: &'static str| move |e: ringfence_sys::SysError| BootError(format!("{step}: {e}"));
    ringfence_sys::loopback_up().map_err(sys("bring up loopback"))?;
    let name = find_nic(nic.mac)?;
    let prefix = u32::from(nic.prefix.min(32));
    let mask = if prefix == 0 { 0 } else { u32::MAX << (32 - prefix) };
    let conf = |family: &str, key: &str| format!("/proc/sys/net/{family}/conf/{name}/{key}");
    // Before the link is up, so it never sends a router solicitation.
    let _ = fs::write(conf("ipv6", "disable_ipv6"), "1");
    fs::write(conf("ipv4", "route_localnet"), "1").map_err(io_fail("route_localnet"))?;
    ringfence_sys::iface_up_ipv4(&name, Ipv4Addr::from(nic.address), Ipv4Addr::from(mask), nic.mtu)
        .map_err(sys("configure the NIC"))?;
    ringfence_sys::route_default_gateway(&name, Ipv4Addr::from(nic.gateway))
        .map_err(sys("default route"))?;
    // Replaced, not written through: a template's resolv.conf may be a link elsewhere.
    let resolv = format!("nameserver {}\noptions timeout:2 attempts:2\n", Ipv4Addr::from(nic.dns));
    let _ = fs::remove_file("/etc/resolv.conf");
    fs::write("/etc/resolv.conf", resolv).map_err(io_fail("write /etc/resolv.conf"))?;
    Ok(())
}

/// The name of the interface whose MAC is `mac`, once its driver has made it.
fn find_nic(mac: [u8; 6]) -> Result<String, BootError> {
    let want = mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":");
    let started = Instant::now();
    loop {
        if let Ok(entries) = fs::read_dir("/sys/class/net") {
            for e in entries.flatten() {
                let addr = fs::read_to_string(e.path().join("address")).unwrap_or_default();
                if addr.trim() == want {
                    return Ok(e.file_name().to_string_lossy().into_owned());
                }
            }
        }
        if started.elapsed() > DEVICE_WAIT {
            return Err(BootError(format!("no network interface with MAC {want}")));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Ends the guest: the host sees QEMU exit. PID 1 returning would panic the kernel, which
/// also ends it (`panic=-1`, `-no-reboot`), but with a frightening log.
pub fn power_off() -> ! {
    nix::unistd::sync();
    let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF);
    std::process::exit(1)
}
