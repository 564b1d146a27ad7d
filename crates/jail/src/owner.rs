//! Identity slots: each live sandbox's own host ids, and the host uid owning its user
//! namespace.
//!
//! The kernel keeps per-user counts in two places, and a sandbox must have its own entry in
//! both, or one sandbox reaching a limit takes it away from every other:
//!
//! - *ucounts* (inotify instances and watches, user and other namespaces, fanotify groups,
//!   message-queue bytes, pending signals, locked shared memory) charge a process in a user
//!   namespace twice: as itself in its namespace, and as the namespace's *owner* (the euid that
//!   created it) in the parent namespace (`inc_ucount` and `inc_rlimit_ucounts` in
//!   kernel/ucount.c walk the chain). Sandboxes created by host root would all be charged to
//!   root (128 inotify instances by default, shared by every sandbox and the host's own root
//!   processes). Each sandbox's namespace is instead created under an owner uid of its own.
//! - the *user_struct* of a host uid (descriptors in flight over unix sockets, checked against
//!   the sender's `RLIMIT_NOFILE`; pipe buffer pages against `pipe-user-pages-soft`; epoll
//!   watches) is keyed by the process's host uid itself. Sandboxes mapping the same host ids
//!   would share it: one sandbox holding descriptors in flight would stop fd passing (Python's
//!   multiprocessing, browsers) by the same user in every other. Each sandbox therefore maps
//!   its ids `0..ID_RANGE` onto a host range of its own, `id_base(slot)..+ID_RANGE`.
//!
//! Files that outlive a sandbox (templates, saved layers) are stored with canonical ids, the
//! ids as seen inside (`0..ID_RANGE`), and shown to each sandbox through its own mapping
//! (idmapped mounts, see `ringfence_sys::idmapped_tree`); a saved writable layer is shifted
//! back to canonical ids as it is copied ([`crate::layer::save`]).
//!
//! Slots are claimed like cgroup slots: an exclusive `flock` on a claim file per slot. The
//! claim's open file description is handed to the sandbox's first process (kept at
//! [`ringfence_proto::OWNER_LOCK_FD`]), so the claim lasts exactly as long as the sandbox:
//! through a restart of the host process that started it, and no longer than its agent lives.
//! The directory of claim files is host-wide (not per run directory), because uids are.
//!
//! Layout above `uid_base`: `SLOTS` id ranges of `ID_RANGE` ids (slot 0's is the range every
//! sandbox shared before slots existed), then `SLOTS` owner uids, so no process in any sandbox
//! ever runs as an owner uid or as another sandbox's id.

use std::fs::{File, OpenOptions, TryLockError};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use crate::ID_RANGE;

/// How many identity slots there are: at most this many sandboxes live at once on a host.
pub const SLOTS: u32 = 16384;

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
    #[error("all {0} sandbox identity slots are in use")]
    Exhausted(u32),
    #[error("uid base {0} leaves no room for sandbox id ranges and owner ids below 2^32-1")]
    Range(u32),
}

/// The owner uids of hosts whose sandboxes' id ranges start at `uid_base`: right above the
/// last slot's range, so no process in any sandbox ever runs as an owner uid.
pub fn owner_range(uid_base: u32) -> Result<std::ops::Range<u32>, OwnerError> {
    let first = SLOTS
        .checked_mul(ID_RANGE)
        .and_then(|ids| uid_base.checked_add(ids))
        .ok_or(OwnerError::Range(uid_base))?;
    // An end that fits in u32 keeps the last owner below (uid_t)-1, which means "no change"
    // to the set*id calls and can never be an owner.
    let end = first.checked_add(SLOTS).ok_or(OwnerError::Range(uid_base))?;
    Ok(first..end)
}

/// The first host id of slot `slot`'s range (what the sandbox's root maps to).
pub fn id_base(uid_base: u32, slot: u32) -> u32 {
    // In range whenever `owner_range(uid_base)` is, which every claim checks first.
    uid_base.saturating_add(slot.saturating_mul(ID_RANGE))
}

/// The slot whose id range holds host id `id`, if any.
pub fn slot_of(uid_base: u32, id: u32) -> Option<u32> {
    let slot = id.checked_sub(uid_base)? / ID_RANGE;
    (slot < SLOTS).then_some(slot)
}

/// A claimed identity slot. Dropping it releases this process's hold; the sandbox's agent
/// keeps its own until it exits.
#[derive(Debug)]
pub struct OwnerClaim {
    uid: u32,
    id_base: u32,
    file: File,
}

impl OwnerClaim {
    /// The host uid that creates (owns) the sandbox's user namespace.
    pub fn uid(&self) -> u32 {
        self.uid
    }

    /// The host id the sandbox's root maps to; its ids are `id_base..id_base + ID_RANGE`.
    pub fn id_base(&self) -> u32 {
        self.id_base
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

/// Claims an identity slot that no live sandbox on this host holds.
pub fn claim(dir: &Path, uid_base: u32) -> Result<OwnerClaim, OwnerError> {
    let range = owner_range(uid_base)?;
    std::fs::create_dir_all(dir).map_err(|source| OwnerError::Io {
        op: "mkdir",
        path: dir.to_path_buf(),
        source,
    })?;
    let start = NEXT.load(Ordering::Relaxed) % SLOTS;
    for i in 0..SLOTS {
        let offset = (start + i) % SLOTS;
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
                return Ok(OwnerClaim { uid, id_base: id_base(uid_base, offset), file });
            }
            Err(TryLockError::WouldBlock) => continue,
            Err(TryLockError::Error(source)) => {
                return Err(OwnerError::Io { op: "flock", path, source });
            }
        }
    }
    Err(OwnerError::Exhausted(SLOTS))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ranges_are_disjoint_and_owners_sit_above_them_below_minus_one() {
        let base = 100_000_000;
        let r = owner_range(base).unwrap();
        assert_eq!(r.start, base + SLOTS * ID_RANGE);
        assert_eq!(r.len(), SLOTS as usize);
        // Every slot's range lies below the owners and touches no other slot's.
        assert_eq!(id_base(base, 0), base);
        assert_eq!(id_base(base, 1), base + ID_RANGE);
        assert_eq!(id_base(base, SLOTS - 1) + ID_RANGE, r.start);
        assert_eq!(slot_of(base, base + 5), Some(0));
        assert_eq!(slot_of(base, base + ID_RANGE), Some(1));
        assert_eq!(slot_of(base, r.start), None, "an owner uid is in no slot");
        assert_eq!(slot_of(base, base - 1), None);
        let limit = u32::MAX - SLOTS * ID_RANGE - SLOTS;
        assert!(matches!(owner_range(limit + 1), Err(OwnerError::Range(_))));
        let top = owner_range(limit).unwrap();
        assert_eq!(top.end - 1, u32::MAX - 1, "the last owner is not (uid_t)-1");
    }

    #[test]
    fn claims_are_exclusive_until_every_holder_is_gone() {
        let dir = tempfile::tempdir().unwrap();
        let a = claim(dir.path(), 100_000_000).unwrap();
        let b = claim(dir.path(), 100_000_000).unwrap();
        assert_ne!(a.uid(), b.uid());
        assert_ne!(a.id_base(), b.id_base());
        for c in [&a, &b] {
            let slot = slot_of(100_000_000, c.id_base()).unwrap();
            assert_eq!(c.uid(), owner_range(100_000_000).unwrap().start + slot);
        }
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
