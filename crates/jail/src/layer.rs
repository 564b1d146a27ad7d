//! Layers: a sandbox's writable (upper) layer saved as a read-only host directory.
//!
//! Snapshots, forks and filesystem-only pauses all work the same way: copy the sandbox's
//! upper layer (a tmpfs inside its mount namespace, reached through the agent's stage
//! descriptor, see [`crate::Sandbox::upper_dir`]) into `<data-dir>/layers/<id>`, then start
//! sandboxes with that directory as an extra read-only lower layer above the template. Every
//! sandbox made from a layer shares it; each gets its own fresh upper.
//!
//! The copy keeps what overlayfs needs to read the directory as a layer again: whiteouts
//! (character devices 0:0), `user.overlay.*` extended attributes (opaque directories; the
//! sandbox's overlay uses `userxattr`), symlinks, modes and owners. Owners are stored with
//! canonical ids (as seen inside: the sandbox's root is 0, its `user` 1000), shifted back from
//! the sandbox's own host range, so any later sandbox can mount the layer through its own
//! mapping (see [`crate::owner`]).
//!
//! Crash safety: a layer is written as `.<id>.partial` beside its final name, synced to disk
//! (`syncfs`), renamed into place and the rename synced (the parent directory), so a directory
//! under its final name is always complete. The caller records the layer (the server: in its
//! database, with the layer's first user) only after [`save`] returns; whatever a crash leaves
//! before that (a `.partial`, or a complete layer nothing records) is garbage to remove at the
//! next start ([`is_partial`]).

use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt, lchown, symlink};
use std::path::{Path, PathBuf};

/// Errors copying a layer; each names the path involved.
#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    #[error("layer {op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("layer {0}: a file type that cannot be saved")]
    Unsupported(PathBuf),
}

fn at<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> LayerError + 'a {
    move |source| LayerError::Io { op, path: path.to_path_buf(), source }
}

/// What a saved layer holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LayerStats {
    pub files: u64,
    pub bytes: u64,
}

/// Copies the upper layer at `upper` of a sandbox whose ids start at host id `id_base` to
/// `dest` (which must not exist), with canonical owners. The caller freezes the sandbox first
/// if it wants a consistent copy.
pub fn save(upper: &Path, dest: &Path, id_base: u32) -> Result<LayerStats, LayerError> {
    let name = dest.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dest.with_file_name(format!(".{name}.partial"));
    if tmp.exists() {
        fs::remove_dir_all(&tmp).map_err(at("remove", &tmp))?;
    }
    if let Some(parent) = dest.parent() {
        fs::create_dir_all(parent).map_err(at("mkdir", parent))?;
    }
    let mut stats = LayerStats::default();
    let copied = copy(upper, &tmp, &mut stats, id_base);
    if let Err(e) = copied {
        let _ = fs::remove_dir_all(&tmp);
        return Err(e);
    }
    // The files' data and metadata reach the disk before the name says the layer is complete:
    // one syncfs for the whole tree instead of an fsync per file.
    if let Err(e) = sync_filesystem(&tmp) {
        let _ = fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if let Err(e) = fs::rename(&tmp, dest) {
        let _ = fs::remove_dir_all(&tmp);
        return Err(at("rename", dest)(e));
    }
    // And the rename itself, before the caller records the layer as saved.
    if let Some(parent) = dest.parent() {
        fs::File::open(parent).and_then(|d| d.sync_all()).map_err(at("fsync", parent))?;
    }
    Ok(stats)
}

/// Whether a directory entry under the layers directory is a layer being written (or left
/// half-written by a crash): `.<id>.partial`.
pub fn is_partial(name: &str) -> bool {
    name.starts_with('.') && name.ends_with(".partial")
}

/// Flushes the filesystem holding `path` to disk.
fn sync_filesystem(path: &Path) -> Result<(), LayerError> {
    let dir = fs::File::open(path).map_err(at("open", path))?;
    nix::unistd::syncfs(&dir).map_err(|e| at("syncfs", path)(e.into()))
}

/// The canonical id of host id `id` in a sandbox whose range starts at `id_base`. Nothing in a
/// sandbox can create a file owned by an id outside its range; should one appear anyway, it
/// becomes `nobody`, never an id of the host's.
fn canonical(id: u32, id_base: u32) -> u32 {
    match id.checked_sub(id_base) {
        Some(c) if c < crate::ID_RANGE => c,
        _ => NOBODY,
    }
}

/// `nobody`/`nogroup` inside every sandbox.
const NOBODY: u32 = 65534;

fn copy(src: &Path, dst: &Path, stats: &mut LayerStats, id_base: u32) -> Result<(), LayerError> {
    let m = fs::symlink_metadata(src).map_err(at("stat", src))?;
    let ft = m.file_type();
    use std::os::unix::fs::FileTypeExt;
    if ft.is_symlink() {
        let target = fs::read_link(src).map_err(at("readlink", src))?;
        symlink(&target, dst).map_err(at("symlink", dst))?;
    } else if ft.is_dir() {
        fs::create_dir(dst).map_err(at("mkdir", dst))?;
        for entry in fs::read_dir(src).map_err(at("readdir", src))? {
            let entry = entry.map_err(at("readdir", src))?;
            copy(&entry.path(), &dst.join(entry.file_name()), stats, id_base)?;
        }
    } else if ft.is_file() {
        fs::copy(src, dst).map_err(at("copy", src))?;
        stats.bytes += m.len();
    } else if ft.is_char_device() && m.rdev() == 0 {
        // An overlay whiteout: the file was deleted in the sandbox.
        use nix::sys::stat::{Mode, SFlag, mknod};
        mknod(dst, SFlag::S_IFCHR, Mode::from_bits_truncate(0o000), 0)
            .map_err(|e| at("mknod", dst)(e.into()))?;
    } else if ft.is_fifo() {
        use nix::sys::stat::{Mode, SFlag, mknod};
        mknod(dst, SFlag::S_IFIFO, Mode::from_bits_truncate(0o600), 0)
            .map_err(|e| at("mknod", dst)(e.into()))?;
    } else if ft.is_socket() {
        // A socket file is meaningless without its listener; leave it out.
        return Ok(());
    } else {
        return Err(LayerError::Unsupported(src.to_path_buf()));
    }
    stats.files += 1;
    for (name, value) in ringfence_sys::xattrs_with_prefix(src, "user.").unwrap_or_default() {
        let full = format!("user.{name}");
        ringfence_sys::set_xattr(dst, &full, Some(&value))
            .map_err(|e| at("setxattr", dst)(e.source))?;
    }
    let (uid, gid) = (canonical(m.uid(), id_base), canonical(m.gid(), id_base));
    lchown(dst, Some(uid), Some(gid)).map_err(at("chown", dst))?;
    if !ft.is_symlink() {
        fs::set_permissions(dst, fs::Permissions::from_mode(m.mode() & 0o7777))
            .map_err(at("chmod", dst))?;
    }
    Ok(())
}

/// Brings a layer saved before layers had canonical owners (with the ids of the one range
/// every sandbox shared, `legacy_base..legacy_base + ID_RANGE`) to canonical owners, in place.
/// Returns whether anything changed. Idempotent and safe to interrupt: only ids in the legacy
/// range are shifted (canonical ids are below it), and the layer's root, which tells a legacy
/// layer apart, is shifted last.
pub fn canonicalize(dir: &Path, legacy_base: u32) -> Result<bool, LayerError> {
    let legacy = |id: u32| id.checked_sub(legacy_base).filter(|c| *c < crate::ID_RANGE);
    let root = fs::symlink_metadata(dir).map_err(at("stat", dir))?;
    if legacy(root.uid()).is_none() && legacy(root.gid()).is_none() {
        return Ok(false);
    }
    fn walk(p: &Path, shift: &dyn Fn(u32) -> Option<u32>) -> Result<(), LayerError> {
        let m = fs::symlink_metadata(p).map_err(at("stat", p))?;
        if m.is_dir() {
            for e in fs::read_dir(p).map_err(at("readdir", p))? {
                walk(&e.map_err(at("readdir", p))?.path(), shift)?;
            }
        }
        let (uid, gid) = (shift(m.uid()), shift(m.gid()));
        if uid.is_some() || gid.is_some() {
            let mode = m.mode() & 0o7777;
            lchown(p, uid.or(Some(m.uid())), gid.or(Some(m.gid()))).map_err(at("chown", p))?;
            // chown clears set-id bits; what the sandbox set stays set.
            if !m.file_type().is_symlink() && mode & 0o6000 != 0 {
                fs::set_permissions(p, fs::Permissions::from_mode(mode)).map_err(at("chmod", p))?;
            }
        }
        Ok(())
    }
    walk(dir, &legacy)?;
    Ok(true)
}

/// Disk space a layer uses (allocated blocks), for reports.
pub fn disk_usage(dir: &Path) -> u64 {
    fn walk(p: &Path, total: &mut u64) {
        let Ok(m) = fs::symlink_metadata(p) else { return };
        *total += m.blocks() * 512;
        if m.is_dir()
            && let Ok(rd) = fs::read_dir(p)
        {
            for e in rd.flatten() {
                walk(&e.path(), total);
            }
        }
    }
    let mut total = 0;
    walk(dir, &mut total);
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_saved_layer_keeps_whiteouts_xattrs_links_and_modes() {
        if ringfence_sys::euid() != 0 {
            eprintln!("SKIPPED: needs root (mknod, chown)");
            return;
        }
        let t = tempfile::tempdir().unwrap();
        let up = t.path().join("upper");
        fs::create_dir_all(up.join("d/e")).unwrap();
        fs::write(up.join("d/f.txt"), b"hello").unwrap();
        fs::set_permissions(up.join("d/f.txt"), fs::Permissions::from_mode(0o640)).unwrap();
        symlink("f.txt", up.join("d/link")).unwrap();
        use nix::sys::stat::{Mode, SFlag, mknod};
        mknod(&up.join("gone"), SFlag::S_IFCHR, Mode::empty(), 0).unwrap();
        ringfence_sys::set_xattr(&up.join("d/e"), "user.overlay.opaque", Some(b"y")).unwrap();
        // A sandbox in slot 3: its user (1000 inside) is host id base + 1000.
        let base = 100_000_000 + 3 * crate::ID_RANGE;
        lchown(up.join("d/f.txt"), Some(base + 1000), Some(base + 1000)).unwrap();
        lchown(up.join("d/e"), Some(base), Some(base)).unwrap();
        // An id outside the sandbox's range (it cannot make one) is stored as nobody.
        lchown(up.join("d/link"), Some(7), Some(7)).unwrap();
        let dest = t.path().join("layers/l1");
        let stats = save(&up, &dest, base).unwrap();
        assert_eq!(stats.bytes, 5);
        assert_eq!(fs::read(dest.join("d/f.txt")).unwrap(), b"hello");
        let m = fs::metadata(dest.join("d/f.txt")).unwrap();
        assert_eq!((m.mode() & 0o777, m.uid(), m.gid()), (0o640, 1000, 1000));
        assert_eq!(fs::metadata(dest.join("d/e")).unwrap().uid(), 0);
        assert_eq!(fs::symlink_metadata(dest.join("d/link")).unwrap().uid(), NOBODY);
        assert_eq!(fs::read_link(dest.join("d/link")).unwrap(), Path::new("f.txt"));
        let w = fs::symlink_metadata(dest.join("gone")).unwrap();
        use std::os::unix::fs::FileTypeExt;
        assert!(w.file_type().is_char_device() && w.rdev() == 0);
        let x = ringfence_sys::xattrs_with_prefix(&dest.join("d/e"), "user.overlay.").unwrap();
        assert_eq!(x, vec![("opaque".to_string(), b"y".to_vec())]);
        assert!(!t.path().join("layers/.l1.partial").exists());
        assert!(is_partial(".l1.partial") && !is_partial("l1") && !is_partial("l1.partial"));
        // A destination that exists is refused rather than merged into.
        assert!(save(&up, &dest, base).is_err());
    }

    #[test]
    fn a_legacy_layer_is_shifted_to_canonical_ids_once() {
        if ringfence_sys::euid() != 0 {
            eprintln!("SKIPPED: needs root (chown)");
            return;
        }
        let legacy = 100_000_000;
        let t = tempfile::tempdir().unwrap();
        let l = t.path().join("l");
        fs::create_dir_all(l.join("home/user")).unwrap();
        fs::write(l.join("home/user/x"), b"x").unwrap();
        fs::set_permissions(l.join("home/user/x"), fs::Permissions::from_mode(0o4755)).unwrap();
        lchown(&l, Some(legacy), Some(legacy)).unwrap();
        lchown(l.join("home"), Some(legacy), Some(legacy)).unwrap();
        lchown(l.join("home/user"), Some(legacy + 1000), Some(legacy + 1000)).unwrap();
        lchown(l.join("home/user/x"), Some(legacy + 1000), Some(legacy + 1000)).unwrap();
        fs::set_permissions(l.join("home/user/x"), fs::Permissions::from_mode(0o4755)).unwrap();
        assert!(canonicalize(&l, legacy).unwrap());
        let ids = |p: &str| {
            let m = fs::symlink_metadata(l.join(p)).unwrap();
            (m.uid(), m.gid())
        };
        assert_eq!(ids(""), (0, 0));
        assert_eq!(ids("home"), (0, 0));
        assert_eq!(ids("home/user/x"), (1000, 1000));
        let mode = fs::metadata(l.join("home/user/x")).unwrap().mode() & 0o7777;
        assert_eq!(mode, 0o4755, "the set-id bit survives the chown");
        // A canonical layer is left alone.
        assert!(!canonicalize(&l, legacy).unwrap());
        assert_eq!(ids("home/user"), (1000, 1000));
    }
}
