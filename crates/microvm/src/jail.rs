//! The jail each QEMU process runs in, so that a guest which escapes into its VMM lands in a
//! process that can do little: Firecracker's `jailer` does the same for Firecracker.
//!
//! - **Its own uid and gid**, one per sandbox ([`UidLease`]), never root: two QEMUs cannot
//!   signal or trace each other, nor read each other's disks (each sandbox's directory is its
//!   uid's alone). Dropped with util-linux's `setpriv` before QEMU runs, with no-new-privs
//!   and no supplementary groups (but `/dev/kvm`'s group under KVM).
//! - **Its own namespaces** (`unshare`): network (QEMU reaches the host only through the unix
//!   sockets it is handed), IPC, UTS and mount.
//! - **A seccomp filter**: QEMU's own `-sandbox on` with every optional group denied
//!   (obsolete system calls, set*uid, fork/exec, scheduler and resource control).
//!
//! Both helpers exec in place, so the pid the server holds is QEMU's.
//! Not done: a cgroup of QEMU's own (guest RAM is bounded by `-m`; QEMU's own memory and
//! CPU are not capped on the host side).

use std::fs::{self, File};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

use crate::MicrovmError;

/// The first uid (and gid) handed to a sandbox's QEMU: high, far from login users and from
/// the usual `/etc/subuid` ranges (100000 + 65536 k for the first thousands of users).
pub const UID_BASE: u32 = 0x7e00_0000;
/// How many sandboxes' QEMUs may run at once on one state directory.
pub const UID_SLOTS: u32 = 16384;
/// The uid of the start-up probe's throwaway guest (runs no tenant code).
pub const PROBE_UID: u32 = UID_BASE + UID_SLOTS;

/// Who a QEMU process runs as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmJail {
    pub uid: u32,
    pub gid: u32,
}

impl VmJail {
    /// The jail with `uid` as both uid and gid.
    pub fn with_uid(uid: u32) -> VmJail {
        VmJail { uid, gid: uid }
    }
}

/// A uid held for one sandbox's life: a lock on `<state_dir>/uids/<slot>` that every server
/// sharing the state directory honours. Dropping it frees the uid.
#[derive(Debug)]
pub struct UidLease {
    pub jail: VmJail,
    _lock: Flock<File>,
}

impl UidLease {
    /// The first free uid under `state_dir`.
    pub fn take(state_dir: &Path) -> Result<UidLease, MicrovmError> {
        let dir = state_dir.join("uids");
        fs::create_dir_all(&dir).map_err(|source| MicrovmError::Io {
            op: format!("mkdir {}", dir.display()),
            source,
        })?;
        for slot in 0..UID_SLOTS {
            let path: PathBuf = dir.join(slot.to_string());
            let f = File::options().create(true).truncate(false).write(true).open(&path).map_err(
                |source| MicrovmError::Io { op: format!("open {}", path.display()), source },
            )?;
            if let Ok(lock) = Flock::lock(f, FlockArg::LockExclusiveNonblock) {
                return Ok(UidLease { jail: VmJail::with_uid(UID_BASE + slot), _lock: lock });
            }
        }
        Err(MicrovmError::Vmm(format!(
            "all {UID_SLOTS} QEMU uids under {} are in use",
            dir.display()
        )))
    }
}

/// Gives `path` to the jail's uid (the VM's directory, its writable disk, the agent's socket).
pub fn give(path: &Path, jail: VmJail) -> Result<(), MicrovmError> {
    std::os::unix::fs::chown(path, Some(jail.uid), Some(jail.gid)).map_err(|source| {
        MicrovmError::Io { op: format!("chown {} to the VM's uid", path.display()), source }
    })
}

/// The command prefix that runs a program in `jail`: `unshare` for the namespaces, then
/// `setpriv` for the uid; `kvm_gid` is `/dev/kvm`'s group, kept when the guest uses KVM.
pub fn wrapper(jail: VmJail, kvm_gid: Option<u32>) -> Vec<String> {
    let mut a: Vec<String> = ["unshare", "--net", "--ipc", "--uts", "--mount", "--", "setpriv"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    a.push(format!("--reuid={}", jail.uid));
    a.push(format!("--regid={}", jail.gid));
    match kvm_gid {
        Some(g) => a.push(format!("--groups={g}")),
        None => a.push("--clear-groups".into()),
    }
    a.push("--no-new-privs".into());
    a.push("--".into());
    a
}

/// Whether this process can drop to another uid (it is root).
pub fn running_as_root() -> bool {
    nix::unistd::geteuid().is_root()
}
