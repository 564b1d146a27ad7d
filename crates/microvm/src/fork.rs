//! Snapshots of a running guest, and sandboxes started from them (forks).
//!
//! A snapshot ([`crate::MicroVm::snapshot_to`]) is a directory: the guest's memory and device
//! state ([`MEMORY`], QMP `migrate` to a file, as a pause to a file writes it), a sparse copy
//! of its writable disk ([`DISK`]) made while the guest was still stopped, so the disk and the
//! guest's page cache of it agree, and [`SavedGuest`] ([`MANIFEST`]): what a restore needs to
//! build the same devices (template image, guest shape, NIC). The guest runs on afterwards.
//!
//! A sandbox started from it ([`crate::StartSpec::fork_from`]) is a QEMU `-incoming` from the
//! memory file, on its own copy of the disk and a NIC socket of its own; once it runs, its
//! agent is asked to take an identity of its own (`Request::Reidentify`: hostname, machine
//! id, clock, entropy). What was running inside when the snapshot was taken runs on in every
//! sandbox started from it: that is what a memory fork is.

use std::fs::{self, File};
use std::path::{Path, PathBuf};

use ringfence_jail::limits::Limits;
use serde::{Deserialize, Serialize};

use crate::MicrovmError;

/// The memory and device state in a snapshot's directory.
pub const MEMORY: &str = "memory.vmstate";
/// The writable disk's copy.
pub const DISK: &str = "rw.ext4";
/// The [`SavedGuest`] record.
pub const MANIFEST: &str = "microvm.json";

/// What a restore needs besides the two files: the same devices in the same sizes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedGuest {
    /// The template's read-only root image the guest was started on.
    pub root_image: PathBuf,
    /// The limits that give the guest its shape (RAM, vCPUs, disk size).
    pub memory: Option<u64>,
    pub cpu_millis: Option<u64>,
    pub disk: u64,
    /// The guest's NIC (the restore attaches a fresh socket to the same device).
    pub nic: Option<ringfence_proto::GuestNic>,
}

impl SavedGuest {
    /// `limits` with this guest's shape (the restored devices must match the saved ones).
    pub fn shape(&self, limits: &Limits) -> Limits {
        Limits { memory: self.memory, cpu_millis: self.cpu_millis, disk: self.disk, ..*limits }
    }

    /// Reads the record of the snapshot in `dir`, checking its files are there.
    pub fn read(dir: &Path) -> Result<SavedGuest, MicrovmError> {
        let path = dir.join(MANIFEST);
        let text = fs::read(&path).map_err(|source| MicrovmError::Io {
            op: format!("read {} (not a microvm snapshot?)", path.display()),
            source,
        })?;
        let saved: SavedGuest = serde_json::from_slice(&text).map_err(|e| {
            MicrovmError::Invalid(format!("{}: not a microvm snapshot record: {e}", path.display()))
        })?;
        for f in [MEMORY, DISK] {
            if !dir.join(f).is_file() {
                return Err(MicrovmError::Invalid(format!(
                    "microvm snapshot {} lacks {f}",
                    dir.display()
                )));
            }
        }
        if !saved.root_image.is_file() {
            return Err(MicrovmError::Invalid(format!(
                "microvm snapshot {}: its template image {} is gone",
                dir.display(),
                saved.root_image.display()
            )));
        }
        Ok(saved)
    }

    pub(crate) fn write(&self, dir: &Path) -> Result<(), MicrovmError> {
        let text = serde_json::to_vec_pretty(self)
            .map_err(|e| MicrovmError::Vmm(format!("encode the snapshot record: {e}")))?;
        let path = dir.join(MANIFEST);
        fs::write(&path, text)
            .map_err(|source| MicrovmError::Io { op: format!("write {}", path.display()), source })
    }
}

/// Whether `dir` holds a microvm snapshot (its record).
pub fn is_snapshot(dir: &Path) -> bool {
    dir.join(MANIFEST).is_file()
}

/// Copies the data extents of `src` to a new file `dst` of the same length; holes stay holes
/// (a sandbox's disk is mostly holes: a plain copy would write gigabytes of zeroes). The same
/// walk as the jail's disk copy, which it is (`ringfence_jail::disk::copy_sparse`).
pub(crate) fn copy_sparse(src: &Path, dst: &Path) -> Result<(), MicrovmError> {
    let op = |what: &str| {
        let what = format!("{what} ({} to {})", src.display(), dst.display());
        move |source| MicrovmError::Io { op: what.clone(), source }
    };
    let from = File::open(src).map_err(op("open the disk to copy"))?;
    let to = File::create_new(dst).map_err(op("create the disk's copy"))?;
    let len = from.metadata().map_err(op("stat the disk"))?.len();
    ringfence_jail::disk::copy_sparse(&from, &to, len).map_err(op("copy the disk"))?;
    to.sync_all().map_err(op("sync the disk's copy"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek, SeekFrom, Write};

    #[test]
    fn a_sparse_copy_keeps_data_and_holes() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        let mut f = File::create(&src).unwrap();
        f.set_len(64 << 20).unwrap();
        f.seek(SeekFrom::Start(32 << 20)).unwrap();
        f.write_all(b"middle").unwrap();
        drop(f);
        let dst = d.path().join("dst");
        copy_sparse(&src, &dst).unwrap();
        let got = fs::read(&dst).unwrap();
        assert_eq!(got.len(), 64 << 20);
        assert_eq!(&got[32 << 20..(32 << 20) + 6], b"middle");
        assert!(got[..32 << 20].iter().all(|b| *b == 0));
        let blocks = std::os::unix::fs::MetadataExt::blocks(&fs::metadata(&dst).unwrap());
        assert!(blocks * 512 < 1 << 20, "the copy stays sparse: {} bytes", blocks * 512);
        // An existing destination is not overwritten.
        assert!(copy_sparse(&src, &dst).is_err());
    }

    #[test]
    fn a_directory_without_a_record_is_not_a_snapshot() {
        let d = tempfile::tempdir().unwrap();
        assert!(!is_snapshot(d.path()));
        let e = SavedGuest::read(d.path()).unwrap_err().to_string();
        assert!(e.contains("not a microvm snapshot"), "{e}");
        fs::write(d.path().join(MANIFEST), b"{}").unwrap();
        let e = SavedGuest::read(d.path()).unwrap_err().to_string();
        assert!(e.contains("not a microvm snapshot record"), "{e}");
    }
}
