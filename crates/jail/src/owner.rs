//! Owner uids: one host uid per live sandbox, owning its user namespace.
//!
//! The kernel keeps per-user counts (inotify instances and watches, user and other namespaces,
//! fanotify groups, message-queue bytes, pending signals, locked shared memory). A process in
//! a user namespace is charged twice: as itself in its namespace, and as the namespace's
//! *owner* (the euid that created it) in the parent namespace, against the parent's limits
//! (`inc_ucount` and `inc_rlimit_ucounts` in kernel/ucount.c walk the chain). Sandboxes created
//! by host root would all be charged to root, so one sandbox reaching a limit (128 inotify
//! instances by default) would take it away from every other sandbox and from the host's own
//! root processes. Each sandbox's namespace is instead created under an owner uid of its own,
//! which no host account and no sandbox id uses, so its charges stop at its own budget.
//!
//! Owner uids are claimed like cgroup slots: an exclusive `flock` on a claim file per uid. The
//! claim's open file description is handed to the sandbox's first process (kept at
//! [`ringfence_proto::OWNER_LOCK_FD`]), so the claim lasts exactly as long as the sandbox:
//! through a restart of the host process that started it, and no longer than its agent lives.
//! The directory of claim files is host-wide (not per run directory), because uids are.

use std::fs::{File, OpenOptions, TryLockError};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use crate::ID_RANGE;

/// How many owner uids there are: at most this many sandboxes live at once on a host.
pub const OWNER_IDS: u32 = 65536;

/// Errors claiming an owner uid; each names the file or range involved.
#[derive(Debug, thiserror::Error)]
pub enum OwnerError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("all {0} sandbox owner ids are in use")]
    Exhausted(u32),
    #[error("uid base {0} leaves no room for sandbox owner ids below 2^32-1")]
    Range(u32),
}

/// The owner uids of hosts whose sandboxes map ids `uid_base..uid_base + ID_RANGE`: the range
/// right above the mapped one, so no process in any sandbox ever runs as an owner uid.
pub fn owner_range(uid_base: u32) -> Result<std::ops::Range<u32>, OwnerError> {
    let first = uid_base.checked_add(ID_RANGE).ok_or(OwnerError::Range(uid_base))?;
    // An end that fits in u32 keeps the last owner below (uid_t)-1, which means "no change"
    // to the set*id calls and can never be an owner.
    let end = first.checked_add(OWNER_IDS).ok_or(OwnerError::Range(uid_base))?;
    Ok(first..end)
}

/// A claimed owner uid. Dropping it releases this process's hold; the sandbox's agent keeps
/// its own until it exits.
#[derive(Debug)]
pub struct OwnerClaim {
    uid: u32,
    file: File,
}

impl OwnerClaim {
    pub fn uid(&self) -> u32 {
        self.uid
    }

    /// The locked claim file, to be kept open by the sandbox's first process.
    pub fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

/// Where in the range the next claim of this process starts looking: past the uids it claimed
/// last, which are the likeliest to be still in use, so a busy host is not rescanned from the
/// start on every sandbox.
static NEXT: AtomicU32 = AtomicU32::new(0);

/// Claims an owner uid that no live sandbox on this host holds.
pub fn claim(dir: &Path, uid_base: u32) -> Result<OwnerClaim, OwnerError> {
    let range = owner_range(uid_base)?;
    std::fs::create_dir_all(dir).map_err(|source| OwnerError::Io {
        op: "mkdir",
        path: dir.to_path_buf(),
        source,
    })?;
    let start = NEXT.load(Ordering::Relaxed) % OWNER_IDS;
    for i in 0..OWNER_IDS {
        let offset = (start + i) % OWNER_IDS;
        let uid = range.start + offset;
        let path = dir.join(format!("{uid}.lock"));
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|source| OwnerError::Io { op: "open", path: path.clone(), source })?;
        match file.try_lock() {
            Ok(()) => {
                NEXT.store(offset + 1, Ordering::Relaxed);
                return Ok(OwnerClaim { uid, file });
            }
            Err(TryLockError::WouldBlock) => continue,
            Err(TryLockError::Error(source)) => {
                return Err(OwnerError::Io { op: "flock", path, source });
            }
        }
    }
    Err(OwnerError::Exhausted(OWNER_IDS))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_range_sits_above_the_mapped_ids_and_below_minus_one() {
        let r = owner_range(100_000_000).unwrap();
        assert_eq!(r.start, 100_000_000 + ID_RANGE);
        assert_eq!(r.len(), OWNER_IDS as usize);
        assert!(matches!(owner_range(u32::MAX - ID_RANGE), Err(OwnerError::Range(_))));
        let top = owner_range(u32::MAX - ID_RANGE - OWNER_IDS).unwrap();
        assert_eq!(top.end - 1, u32::MAX - 1, "the last owner is not (uid_t)-1");
        assert!(matches!(
            owner_range(u32::MAX - ID_RANGE - OWNER_IDS + 1),
            Err(OwnerError::Range(_))
        ));
    }

    #[test]
    fn claims_are_exclusive_until_every_holder_is_gone() {
        let dir = tempfile::tempdir().unwrap();
        let a = claim(dir.path(), 100_000_000).unwrap();
        let b = claim(dir.path(), 100_000_000).unwrap();
        assert_ne!(a.uid(), b.uid());
        // A second holder of the same open file (as the sandbox's agent is) keeps the claim.
        let held = a.file.try_clone().unwrap();
        let a_uid = a.uid();
        drop(a);
        let path = dir.path().join(format!("{a_uid}.lock"));
        let probe = File::options().write(true).open(&path).unwrap();
        assert!(matches!(probe.try_lock(), Err(TryLockError::WouldBlock)));
        drop(held);
        probe.try_lock().expect("free once the last holder closed it");
    }
}
