//! The jail each QEMU process runs in, so that a guest which escapes into its VMM lands in a
//! process that can do little: Firecracker's `jailer` does the same for Firecracker.
//!
//! - **Its own uid and gid**, one per sandbox ([`UidLease`]), never root, and an empty
//!   directory as its root: QEMU's `-runas uid:gid` and `-chroot`, which it applies once its
//!   devices are set up and before the guest runs (it opens the disks and `/dev/kvm` as root
//!   first: `/dev/kvm` is often root's alone, and nothing needs chowning). Two QEMUs cannot
//!   signal or trace each other, and one cannot open another's disks or any host file.
//! - **Its own namespaces** (`unshare`): network (QEMU reaches the host only through the unix
//!   sockets it was handed), IPC, UTS and mount.
//! - **A seccomp filter**: QEMU's own `-sandbox on`, denying obsolete system calls, fork/exec
//!   and scheduler/resource control. Its set*id group stays allowed when QEMU drops to the
//!   uid itself (the drop is those calls); once dropped, with no capabilities and
//!   no-new-privs (which the filter sets), they cannot raise it again.
//!
//! - **A cgroup slot of its own** (made in `sandbox.rs` from the jail crate's slot pool): the
//!   sandbox's CPU quota, the guest's RAM plus QEMU's share, a task limit.

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

impl UidLease {
    /// The uid of `slot` under `state_dir` (a re-attached sandbox's), if no one holds it.
    pub fn take_slot(state_dir: &Path, slot: u32) -> Result<UidLease, MicrovmError> {
        if slot >= UID_SLOTS {
            return Err(MicrovmError::Invalid(format!("uid slot {slot}")));
        }
        let path = state_dir.join("uids").join(slot.to_string());
        let f = File::options().create(true).truncate(false).write(true).open(&path).map_err(
            |source| MicrovmError::Io { op: format!("open {}", path.display()), source },
        )?;
        let lock = Flock::lock(f, FlockArg::LockExclusiveNonblock).map_err(|_| {
            MicrovmError::Vmm(format!("uid slot {slot} is held by another sandbox"))
        })?;
        Ok(UidLease { jail: VmJail::with_uid(UID_BASE + slot), _lock: lock })
    }
}

/// The command prefix that puts a program in namespaces of its own (util-linux's `unshare`,
/// which execs it in place, so the pid the server holds is QEMU's).
pub fn wrapper() -> Vec<String> {
    ["unshare", "--net", "--ipc", "--uts", "--mount", "--"].iter().map(|s| s.to_string()).collect()
}

/// QEMU's own options for the rest of the jail: it sets itself up as root (opens the disks,
/// `/dev/kvm`, its sockets), then, before the guest runs its first instruction, changes root
/// to `chroot` (an empty directory) and drops to the jail's uid and gid (`-runas`, which also
/// leaves it no supplementary groups and no capabilities).
pub fn qemu_args(jail: VmJail, chroot: &Path) -> Vec<String> {
    vec![
        "-runas".into(),
        format!("{}:{}", jail.uid, jail.gid),
        "-chroot".into(),
        chroot.to_string_lossy().into_owned(),
    ]
}

/// Whether this process can drop to another uid (it is root).
pub fn running_as_root() -> bool {
    nix::unistd::geteuid().is_root()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn live_sandboxes_never_share_a_uid_and_a_freed_one_is_reused() {
        let dir = tempfile::tempdir().unwrap();
        let a = UidLease::take(dir.path()).unwrap();
        let b = UidLease::take(dir.path()).unwrap();
        assert_eq!(a.jail.uid, UID_BASE);
        assert_eq!(b.jail.uid, UID_BASE + 1);
        assert_eq!(b.jail.gid, b.jail.uid);
        drop(a);
        let c = UidLease::take(dir.path()).unwrap();
        assert_eq!(c.jail.uid, UID_BASE, "the freed uid, not a third one");
        // The probe's uid is outside the range.
        const { assert!(PROBE_UID >= UID_BASE + UID_SLOTS) };
    }

    #[test]
    fn qemu_is_told_to_drop_to_the_uid_and_an_empty_root() {
        let args = qemu_args(VmJail::with_uid(UID_BASE + 7), Path::new("/run/x/root"));
        let uid = UID_BASE + 7;
        assert_eq!(args, ["-runas", &format!("{uid}:{uid}"), "-chroot", "/run/x/root"]);
        assert_eq!(wrapper()[0], "unshare");
        assert!(wrapper().contains(&"--net".to_string()));
    }
}
