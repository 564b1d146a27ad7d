//! Memory snapshots to start sandboxes from: one guest per template and guest shape (RAM,
//! vCPUs, disk size) is booted to the point where its agent parks
//! ([`ringfence_proto::GUEST_PARKED`]: devices up, template mounted, the writable disk not yet
//! touched), saved (QMP `migrate` to a file), and ended. A sandbox then starts as a QEMU with
//! `-incoming defer` that loads the file: the same devices in the same order and sizes, only
//! the writable disk is its own, fresh one. The guest wakes with the host's clock and fresh
//! entropy (see the agent's `park`).
//!
//! Snapshots live in `<state_dir>/snapshots/<key>.vmstate`, shared by the servers on one state
//! directory (a lock per key: one builds, the others wait). The key covers everything the
//! saved guest depends on (QEMU, kernel, initramfs, template image, command line, shape), so
//! a rebuilt agent or template gets a new one; files unused for a day are removed.

use std::fs::{self, File};
use std::hash::{Hash, Hasher};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use nix::fcntl::{Flock, FlockArg};
use ringfence_jail::limits::Limits;

use crate::sandbox::{agent_of, guest_shape, guest_spec, read_byte};
use crate::vmm::{VmHandle, Vmm};
use crate::{MicrovmConfig, MicrovmError};

/// How long the snapshot's guest may take to boot to its parking point.
const BOOT_LIMIT: Duration = Duration::from_secs(120);

fn io(op: String) -> impl Fn(std::io::Error) -> MicrovmError {
    move |source| MicrovmError::Io { op: op.clone(), source }
}

/// A file's identity for the key: path, size, modification time.
fn stamp(p: &Path, h: &mut impl Hasher) {
    p.hash(h);
    if let Ok(m) = fs::metadata(p) {
        (m.len(), m.mtime(), m.mtime_nsec()).hash(h);
    }
}

/// The snapshot file for guests of `root_image` with `limits`' shape (not built).
pub fn snapshot_path(
    cfg: &MicrovmConfig,
    root_image: &Path,
    limits: &Limits,
    nic: Option<&ringfence_proto::GuestNic>,
) -> PathBuf {
    let (memory_mib, vcpus) = guest_shape(limits);
    // SipHash with fixed keys: every server computes the same key for the same inputs.
    let mut h = std::hash::DefaultHasher::new();
    stamp(&cfg.qemu.binary, &mut h);
    stamp(&cfg.kernel(), &mut h);
    stamp(&cfg.initramfs, &mut h);
    stamp(root_image, &mut h);
    cfg.cmdline().hash(&mut h);
    cfg.accel.as_str().hash(&mut h);
    (memory_mib, vcpus, crate::guest::disk_size(limits.disk)).hash(&mut h);
    // A restore needs the same devices: a guest with a NIC has its own snapshot.
    nic.map(|n| (n.mac, n.mtu)).hash(&mut h);
    cfg.state_dir.join("snapshots").join(format!("{:016x}.vmstate", h.finish()))
}

/// The snapshot to start guests of `root_image` with `limits`' shape from, built (one guest
/// boot and a save: seconds under TCG) if there is none yet.
pub fn template_snapshot(
    cfg: &MicrovmConfig,
    root_image: &Path,
    limits: &Limits,
    nic: Option<&ringfence_proto::GuestNic>,
) -> Result<PathBuf, MicrovmError> {
    let path = snapshot_path(cfg, root_image, limits, nic);
    let used = |p: &Path| {
        // Its age says when it was last used, for the clean-up below.
        let _ = File::options().write(true).open(p).and_then(|f| f.set_modified(SystemTime::now()));
    };
    if path.is_file() {
        used(&path);
        return Ok(path);
    }
    let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
    fs::create_dir_all(&dir).map_err(io(format!("mkdir {}", dir.display())))?;
    let lock_path = path.with_extension("lock");
    let lock = File::create(&lock_path).map_err(io(format!("create {}", lock_path.display())))?;
    let _lock = Flock::lock(lock, FlockArg::LockExclusive)
        .map_err(|(_, e)| MicrovmError::Io { op: "lock the snapshot".into(), source: e.into() })?;
    if path.is_file() {
        used(&path);
        return Ok(path);
    }
    let build = path.with_extension("build");
    let tmp = path.with_extension("tmp");
    let _ = fs::remove_dir_all(&build);
    let result = build_in(cfg, &build, root_image, limits, nic, &tmp).and_then(|()| {
        fs::rename(&tmp, &path).map_err(io(format!("rename to {}", path.display())))
    });
    let _ = fs::remove_dir_all(&build);
    let _ = fs::remove_file(&tmp);
    result?;
    remove_stale(&dir, &path);
    Ok(path)
}

fn build_in(
    cfg: &MicrovmConfig,
    dir: &Path,
    root_image: &Path,
    limits: &Limits,
    nic: Option<&ringfence_proto::GuestNic>,
    dest: &Path,
) -> Result<(), MicrovmError> {
    fs::create_dir_all(dir).map_err(io(format!("mkdir {}", dir.display())))?;
    // The writable disk's stand-in: the size the sandboxes' disks will have (the guest reads
    // its capacity once, at boot), blank. Only the kernel's partition scan reads it; the
    // guest drops what it cached of it when it wakes.
    let rw = dir.join("rw.img");
    File::create(&rw)
        .and_then(|f| f.set_len(crate::guest::disk_size(limits.disk)))
        .map_err(io(format!("create {}", rw.display())))?;
    let agent_sock = dir.join("agent.sock");
    let uid = if crate::jail::running_as_root() {
        Some(crate::jail::UidLease::take(&cfg.state_dir)?)
    } else {
        None
    };
    // The NIC device as the sandboxes will have it, on a socket nobody reads: the guest
    // sends nothing before its agent configures the link, which happens after the wake.
    let nic_pair = nic.map(crate::sandbox::nic_socket).transpose()?;
    let spec = guest_spec(
        cfg,
        dir,
        root_image,
        &rw,
        limits,
        &agent_sock,
        uid.as_ref().map(|l| l.jail),
        crate::sandbox::nic_device(nic, nic_pair.as_ref().map(|(_, vm_end)| vm_end)),
        false,
    );
    let started = Instant::now();
    let mut vm = cfg.qemu.launch(&spec)?;
    let result = (|| {
        let mut control = agent_of(&mut vm)?;
        let mut exited = || false;
        let b = read_byte(&mut control, &mut exited, started, BOOT_LIMIT).map_err(|e| {
            let console = crate::vmm::console_tail(&spec.console_log(), 400);
            MicrovmError::Boot(format!("the snapshot's guest: {e}; console: {}", console.trim()))
        })?;
        if b != ringfence_proto::GUEST_PARKED {
            return Err(MicrovmError::Protocol(format!(
                "the snapshot's guest sent {b:#x} instead of parking"
            )));
        }
        vm.save(dest)
    })();
    let _ = vm.quit();
    result
}

/// Removes snapshots (and leftovers of builds) in `dir` unused for a day, but `keep`: they
/// belong to builds, templates or shapes no server has started lately, and each is the
/// guest's touched memory (tens to hundreds of MB).
fn remove_stale(dir: &Path, keep: &Path) {
    let day = Duration::from_secs(24 * 3600);
    for e in fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        let old = e
            .metadata()
            .and_then(|m| m.modified())
            .is_ok_and(|t| t.elapsed().is_ok_and(|age| age > day));
        let ours = p.extension().is_some_and(|x| x == "vmstate" || x == "tmp" || x == "lock");
        if old && p != keep && p != keep.with_extension("lock") && ours {
            let _ = fs::remove_file(p);
        }
    }
}
