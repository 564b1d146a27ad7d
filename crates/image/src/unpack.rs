//! Unpacking one layer (a tar stream) into an overlayfs lower directory, treating the stream
//! as hostile.
//!
//! The result is in the format the sandbox's overlay (mounted with `userxattr`) reads:
//! OCI whiteouts (`.wh.NAME`) become character devices 0:0, opaque markers (`.wh..wh..opq`)
//! become the xattr `user.overlay.opaque=y` on their directory. Owners are the tar's ids as
//! stored, which are canonical (as seen inside a sandbox: root 0, user 1000); each sandbox
//! mounts the layer through its own id mapping.
//!
//! What a layer cannot do, whatever its bytes:
//! - write outside the directory: absolute paths and `..` are refused, and every parent of an
//!   entry is opened one component at a time relative to the directory above it with
//!   `O_NOFOLLOW | O_DIRECTORY`, so a symlink unpacked earlier (`etc -> /etc`) is never followed,
//!   whether it points out of the layer or not;
//! - link to a host file: a hard link's target is looked up the same way inside this layer;
//! - create device nodes (they are skipped with a note) or set extended attributes (tar
//!   xattrs, file capabilities included, are dropped: an overlay `user.overlay.*` xattr of the
//!   layer's choosing could redirect lookups);
//! - fill the disk: a file's declared size (a sparse file's real size) is checked against the
//!   per-file cap and the free space before anything is written, the whole uncompressed stream
//!   against the per-layer and per-image caps as it is read (bounding decompression bombs),
//!   and the number of entries against its own cap;
//! - exhaust memory: the tar reader holds PAX records and GNU long names in memory, so what it
//!   reads between two entries (outside file data, which is streamed to disk) is capped at
//!   1 MiB;
//! - own files as a host id: ids above 65535 (outside every sandbox's range) become `nobody`
//!   (65534), counted in a note. Set-id bits are kept: they act only inside the sandbox's user
//!   namespace, and the jail mounts lower layers `nosuid` anyway.

use std::cell::Cell;
use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::rc::Rc;

use rustix::fs::{AtFlags, FileType, Mode, OFlags, Timestamps, XattrFlags};
use rustix::io::Errno;

use crate::error::{ImageError, at};

/// Caps on what an image may unpack to. See the module documentation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// One file's declared size (a sparse file counts with its full size).
    pub file_bytes: u64,
    /// One layer's uncompressed tar stream, headers included.
    pub layer_bytes: u64,
    /// All layers' uncompressed streams together.
    pub image_bytes: u64,
    /// Tar entries in one layer.
    pub entries: u64,
    /// Free space that must remain on the data directory's filesystem after each file.
    pub min_free: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            file_bytes: 4 << 30,
            layer_bytes: 10 << 30,
            image_bytes: 10 << 30,
            entries: 1_000_000,
            min_free: 1 << 30,
        }
    }
}

/// What a layer held once unpacked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LayerStats {
    /// Entries created (files, directories, links, whiteouts).
    pub entries: u64,
    /// Bytes of regular-file content.
    pub bytes: u64,
    /// Bytes of the uncompressed stream read (what counts against the caps).
    pub stream_bytes: u64,
    /// What was skipped or changed, for the operator.
    pub notes: Vec<String>,
}

/// The overlay xattr that marks a directory opaque for a `userxattr` overlay.
pub const OPAQUE_XATTR: &str = "user.overlay.opaque";
/// Ids at or above this are outside every sandbox's range.
const ID_LIMIT: u64 = 65536;
/// `nobody` inside every sandbox.
const NOBODY: u32 = 65534;
const WHITEOUT_PREFIX: &[u8] = b".wh.";
const OPAQUE_MARKER: &[u8] = b".wh..wh..opq";

/// Unpacks the tar stream `reader` into the existing, empty directory `dest`. `layer` names the
/// layer in errors and notes; `budget` is what is left of the image's cap, reduced by what
/// this layer's stream used. The stream is read to its end (so a caller hashing it sees every
/// byte), still within the caps. On error `dest` holds a partial tree for the caller to remove.
pub fn unpack(
    reader: impl Read,
    dest: &Path,
    layer: &str,
    limits: &Limits,
    budget: &mut u64,
) -> Result<LayerStats, ImageError> {
    let cap = limits.layer_bytes.min(*budget);
    let meter = Rc::new(Meter::default());
    let capped = Capped { inner: reader, left: cap, meter: meter.clone() };
    let result = unpack_stream(capped, dest, layer, limits, &meter);
    *budget = budget.saturating_sub(meter.used.get());
    if meter.over_header.get() {
        return Err(ImageError::Layer {
            layer: layer.into(),
            reason: format!(
                "a tar header with its extensions (PAX records, GNU long names) or a skipped \
                 entry's data larger than {MAX_HEADER_BYTES} bytes (the tar reader would hold \
                 it in memory)"
            ),
        });
    }
    if meter.over.get() {
        let which = if cap < limits.layer_bytes { "the image's" } else { "the per-layer" };
        return Err(ImageError::Layer {
            layer: layer.into(),
            reason: format!(
                "uncompressed content exceeds {which} limit of {cap} bytes (refused while \
                 reading: a decompression bomb or an image too large for --max-size)"
            ),
        });
    }
    let mut stats = result?;
    stats.stream_bytes = meter.used.get();
    Ok(stats)
}

/// The most the tar reader may read between two entries it hands over: headers, PAX records
/// and GNU long names, which it collects in memory, and the data of entries it skips. Real
/// layers need a few KiB.
const MAX_HEADER_BYTES: u64 = 1 << 20;

fn unpack_stream(
    reader: impl Read,
    dest: &Path,
    layer: &str,
    limits: &Limits,
    meter: &Meter,
) -> Result<LayerStats, ImageError> {
    let root: OwnedFd = File::open(dest).map_err(at("open", dest))?.into();
    rustix::fs::fchmod(&root, Mode::from_raw_mode(0o755))
        .map_err(|e| at("chmod", dest)(e.into()))?;
    let mut archive = tar::Archive::new(reader);
    let mut stats = LayerStats::default();
    let mut remapped = 0u64;
    let layer_err = |reason: String| ImageError::Layer { layer: layer.into(), reason };
    {
        let entries = archive.entries().map_err(|e| layer_err(format!("not a tar stream: {e}")))?;
        let mut count = 0u64;
        meter.headers.set(true);
        for entry in entries {
            // From here until the next entry, only file data is read outside the header cap.
            meter.since_entry.set(0);
            let mut entry = entry.map_err(|e| layer_err(format!("bad tar stream: {e}")))?;
            count += 1;
            if count > limits.entries {
                return Err(layer_err(format!(
                    "more than {} entries (the per-layer limit)",
                    limits.entries
                )));
            }
            let raw = entry.path_bytes().into_owned();
            let name = String::from_utf8_lossy(&raw).into_owned();
            let entry_err = |reason: String| ImageError::Entry {
                layer: layer.into(),
                entry: name.clone(),
                reason,
            };
            match one_entry(&root, &raw, &mut entry, limits, meter, &mut stats, &mut remapped) {
                Ok(()) => {}
                Err(Refusal::Entry(reason)) => return Err(entry_err(reason)),
                Err(Refusal::Stream(e)) => {
                    return Err(layer_err(format!("bad tar stream at entry {name:?}: {e}")));
                }
            }
        }
    }
    // Whatever follows the end-of-archive blocks still belongs to the layer's digest; it is
    // streamed to nothing, within the layer cap only.
    meter.headers.set(false);
    io::copy(&mut archive.into_inner(), &mut io::sink())
        .map_err(|e| layer_err(format!("reading past the end of the archive: {e}")))?;
    if remapped > 0 {
        stats.notes.push(format!(
            "layer {layer}: {remapped} entries had owner ids above 65535 (outside every \
             sandbox's range); they belong to nobody (65534)"
        ));
    }
    Ok(stats)
}

/// Why one entry failed: refused (named with the entry), or the stream itself broke.
enum Refusal {
    Entry(String),
    Stream(io::Error),
}

fn refuse<T>(reason: impl Into<String>) -> Result<T, Refusal> {
    Err(Refusal::Entry(reason.into()))
}

fn sys(op: &str) -> impl FnOnce(Errno) -> Refusal + '_ {
    move |e| Refusal::Entry(format!("{op}: {}", io::Error::from(e)))
}

/// Deepest path an entry may have. Nothing deeper is reachable by path inside a sandbox
/// (`PATH_MAX` is 4096 bytes), and it bounds the depth of the tree a layer can build, so
/// removing a refused layer never recurses without end.
const MAX_DEPTH: usize = 512;
const MAX_PATH: usize = 4096;

/// Splits a tar path into components: `.` and empty ones dropped, absolute paths and `..`
/// refused.
fn components(raw: &[u8], what: &str) -> Result<Vec<Vec<u8>>, Refusal> {
    if raw.first() == Some(&b'/') {
        return refuse(format!("{what} is absolute (it would leave the image's root)"));
    }
    if raw.len() > MAX_PATH {
        return refuse(format!("{what} is longer than {MAX_PATH} bytes"));
    }
    let mut out = Vec::new();
    for c in raw.split(|b| *b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => {
                return refuse(format!("{what} contains '..' (it would leave the image's root)"));
            }
            c => out.push(c.to_vec()),
        }
    }
    if out.len() > MAX_DEPTH {
        return refuse(format!("{what} is deeper than {MAX_DEPTH} directories"));
    }
    Ok(out)
}

fn one_entry<R: Read>(
    root: &OwnedFd,
    raw: &[u8],
    entry: &mut tar::Entry<'_, R>,
    limits: &Limits,
    meter: &Meter,
    stats: &mut LayerStats,
    remapped: &mut u64,
) -> Result<(), Refusal> {
    let header = entry.header();
    let kind = header.entry_type();
    let mut owner = |id: io::Result<u64>| -> Result<u32, Refusal> {
        let id = id.map_err(|e| Refusal::Entry(format!("unreadable owner: {e}")))?;
        if id >= ID_LIMIT {
            *remapped += 1;
            return Ok(NOBODY);
        }
        Ok(u32::try_from(id).unwrap_or(NOBODY))
    };
    let uid = owner(header.uid())?;
    let gid = owner(header.gid())?;
    let mode = header.mode().map_err(|e| Refusal::Entry(format!("unreadable mode: {e}")))? & 0o7777;
    let mtime = header.mtime().unwrap_or(0);
    let comps = components(raw, "path")?;
    let Some((last, parents)) = comps.split_last() else {
        // The layer's own root ("./"): only its metadata.
        if kind.is_dir() {
            rustix::fs::fchown(root, Some(uid_of(uid)), Some(gid_of(gid)))
                .map_err(sys("chown /"))?;
            rustix::fs::fchmod(root, Mode::from_raw_mode(mode)).map_err(sys("chmod /"))?;
            return Ok(());
        }
        return refuse("a non-directory entry for the image's root");
    };
    let last = last.as_slice();
    if kind == tar::EntryType::XGlobalHeader {
        return Ok(());
    }
    if last == OPAQUE_MARKER {
        let dir = open_parent(root, parents, true)?;
        rustix::fs::fsetxattr(&dir, OPAQUE_XATTR, b"y", XattrFlags::empty())
            .map_err(sys("mark the directory opaque"))?;
        stats.entries += 1;
        return Ok(());
    }
    if let Some(hidden) = last.strip_prefix(WHITEOUT_PREFIX) {
        if hidden.is_empty() || hidden == b"." || hidden == b".." {
            return refuse("a whiteout with no name");
        }
        let dir = open_parent(root, parents, true)?;
        clear(&dir, hidden)?;
        rustix::fs::mknodat(
            &dir,
            OsStr::from_bytes(hidden),
            FileType::CharacterDevice,
            Mode::empty(),
            0,
        )
        .map_err(sys("create the whiteout"))?;
        stats.entries += 1;
        return Ok(());
    }
    let name = OsStr::from_bytes(last);
    use tar::EntryType as T;
    match kind {
        T::Directory => {
            let dir = open_parent(root, parents, true)?;
            match rustix::fs::statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW) {
                Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Directory => {}
                Ok(_) => {
                    rustix::fs::unlinkat(&dir, name, AtFlags::empty()).map_err(sys("replace"))?;
                    rustix::fs::mkdirat(&dir, name, Mode::from_raw_mode(0o700))
                        .map_err(sys("mkdir"))?;
                }
                Err(Errno::NOENT) => {
                    rustix::fs::mkdirat(&dir, name, Mode::from_raw_mode(0o700))
                        .map_err(sys("mkdir"))?;
                }
                Err(e) => return Err(sys("stat")(e)),
            }
            let fd = open_dir(&dir, name).map_err(sys("open the directory"))?;
            // Owner first: chown clears set-id bits, which the image may want kept.
            rustix::fs::fchown(&fd, Some(uid_of(uid)), Some(gid_of(gid))).map_err(sys("chown"))?;
            rustix::fs::fchmod(&fd, Mode::from_raw_mode(mode)).map_err(sys("chmod"))?;
        }
        T::Regular | T::Continuous | T::GNUSparse => {
            let mut declared = entry.size().max(header.entry_size().unwrap_or(0));
            if let Some(real) = header.as_gnu().and_then(|g| g.real_size().ok()) {
                declared = declared.max(real);
            }
            if declared > limits.file_bytes {
                return refuse(format!(
                    "declares {declared} bytes, over the per-file limit of {} bytes (nothing \
                     was written)",
                    limits.file_bytes
                ));
            }
            let dir = open_parent(root, parents, true)?;
            let st = rustix::fs::fstatvfs(&dir).map_err(sys("statvfs"))?;
            let free = st.f_bavail.saturating_mul(st.f_frsize);
            if declared > free.saturating_sub(limits.min_free) {
                return refuse(format!(
                    "declares {declared} bytes, but the data directory's filesystem has {free} \
                     bytes free and keeps {} in reserve (nothing was written)",
                    limits.min_free
                ));
            }
            clear(&dir, last)?;
            let fd = rustix::fs::openat(
                &dir,
                name,
                OFlags::CREATE | OFlags::EXCL | OFlags::WRONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::from_raw_mode(0o600),
            )
            .map_err(sys("create"))?;
            let mut file = File::from(fd);
            let written = {
                let _body = Body::enter(meter);
                io::copy(&mut entry.by_ref().take(declared), &mut file).map_err(Refusal::Stream)?
            };
            stats.bytes += written;
            rustix::fs::fchown(&file, Some(uid_of(uid)), Some(gid_of(gid)))
                .map_err(sys("chown"))?;
            rustix::fs::fchmod(&file, Mode::from_raw_mode(mode)).map_err(sys("chmod"))?;
            let t = rustix::fs::Timespec { tv_sec: i64::try_from(mtime).unwrap_or(0), tv_nsec: 0 };
            let _ =
                rustix::fs::futimens(&file, &Timestamps { last_access: t, last_modification: t });
        }
        T::Symlink => {
            let target = entry
                .link_name_bytes()
                .ok_or_else(|| Refusal::Entry("a symlink with no target".into()))?
                .into_owned();
            // The target is text the sandbox resolves inside its own root; the unpacker never
            // follows it.
            let dir = open_parent(root, parents, true)?;
            clear(&dir, last)?;
            rustix::fs::symlinkat(OsStr::from_bytes(&target), &dir, name)
                .map_err(sys("symlink"))?;
            rustix::fs::chownat(
                &dir,
                name,
                Some(uid_of(uid)),
                Some(gid_of(gid)),
                AtFlags::SYMLINK_NOFOLLOW,
            )
            .map_err(sys("chown"))?;
        }
        T::Link => {
            let target = entry
                .link_name_bytes()
                .ok_or_else(|| Refusal::Entry("a hard link with no target".into()))?
                .into_owned();
            let tcomps = components(&target, "hard link target")?;
            let Some((tlast, tparents)) = tcomps.split_last() else {
                return refuse("a hard link to the image's root");
            };
            let shown = String::from_utf8_lossy(&target);
            let not_here = || {
                Refusal::Entry(format!(
                    "hard link to {shown:?}, which is not a file unpacked earlier in this layer \
                     (links may only point inside the layer)"
                ))
            };
            let tdir = open_parent(root, tparents, false).map_err(|_| not_here())?;
            let tname = OsStr::from_bytes(tlast);
            match rustix::fs::statat(&tdir, tname, AtFlags::SYMLINK_NOFOLLOW) {
                Ok(st) if FileType::from_raw_mode(st.st_mode) != FileType::Directory => {}
                _ => return Err(not_here()),
            }
            let dir = open_parent(root, parents, true)?;
            clear(&dir, last)?;
            // No AT_SYMLINK_FOLLOW: a link to a symlink links the symlink itself.
            rustix::fs::linkat(&tdir, tname, &dir, name, AtFlags::empty()).map_err(sys("link"))?;
        }
        T::Fifo => {
            let dir = open_parent(root, parents, true)?;
            clear(&dir, last)?;
            rustix::fs::mknodat(&dir, name, FileType::Fifo, Mode::from_raw_mode(mode & 0o777), 0)
                .map_err(sys("mkfifo"))?;
            rustix::fs::chownat(
                &dir,
                name,
                Some(uid_of(uid)),
                Some(gid_of(gid)),
                AtFlags::SYMLINK_NOFOLLOW,
            )
            .map_err(sys("chown"))?;
        }
        T::Char | T::Block => {
            // A device node in a lower layer would be a host device to whatever can open it;
            // the jail gives each sandbox its own /dev instead.
            stats.notes.push(format!(
                "skipped device node {:?} (device nodes are never unpacked)",
                String::from_utf8_lossy(raw)
            ));
            return Ok(());
        }
        other => {
            return refuse(format!("unsupported tar entry type {:?}", other.as_byte() as char));
        }
    }
    stats.entries += 1;
    Ok(())
}

fn uid_of(id: u32) -> rustix::fs::Uid {
    rustix::fs::Uid::from_raw(id)
}

fn gid_of(id: u32) -> rustix::fs::Gid {
    rustix::fs::Gid::from_raw(id)
}

fn open_dir(dir: &OwnedFd, name: &OsStr) -> Result<OwnedFd, Errno> {
    rustix::fs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
}

/// Opens the directory `comps` under `root`, one component at a time without following any
/// symlink, creating missing ones (owned by root, mode 0755) if `create`.
fn open_parent(root: &OwnedFd, comps: &[Vec<u8>], create: bool) -> Result<OwnedFd, Refusal> {
    let mut cur = open_dir(root, OsStr::new(".")).map_err(sys("open the layer"))?;
    for c in comps {
        let name = OsStr::from_bytes(c);
        let next = match open_dir(&cur, name) {
            Err(Errno::NOENT) if create => {
                rustix::fs::mkdirat(&cur, name, Mode::from_raw_mode(0o755))
                    .map_err(sys("mkdir"))?;
                open_dir(&cur, name)
            }
            other => other,
        };
        cur = match next {
            Ok(fd) => fd,
            Err(Errno::LOOP) | Err(Errno::NOTDIR) if is_symlink(&cur, name) => {
                return refuse(format!(
                    "its parent {:?} is a symlink in this layer (never followed: it could lead \
                     out of the image's root)",
                    String::from_utf8_lossy(c)
                ));
            }
            Err(Errno::NOTDIR) => {
                return refuse(format!(
                    "its parent {:?} is not a directory",
                    String::from_utf8_lossy(c)
                ));
            }
            Err(e) => return Err(sys("open a parent directory")(e)),
        };
    }
    Ok(cur)
}

fn is_symlink(dir: &OwnedFd, name: &OsStr) -> bool {
    rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)
        .is_ok_and(|st| FileType::from_raw_mode(st.st_mode) == FileType::Symlink)
}

/// Makes room for a new non-directory entry `name` in `dir`: a later entry replaces an earlier
/// one of the same path, but never a directory (with its contents).
fn clear(dir: &OwnedFd, name: &[u8]) -> Result<(), Refusal> {
    let name = OsStr::from_bytes(name);
    match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Err(Errno::NOENT) => Ok(()),
        Err(e) => Err(sys("stat")(e)),
        Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Directory => {
            refuse("replaces a directory unpacked earlier in this layer")
        }
        Ok(_) => rustix::fs::unlinkat(dir, name, AtFlags::empty()).map_err(sys("replace")),
    }
}

/// What the capped reader has seen, shared with the unpacker.
#[derive(Debug, Default)]
struct Meter {
    /// Bytes read in all.
    used: Cell<u64>,
    /// The layer cap was passed.
    over: Cell<bool>,
    /// Whether reads outside file data count against [`MAX_HEADER_BYTES`].
    headers: Cell<bool>,
    /// Reading a file's data now.
    in_body: Cell<bool>,
    /// Bytes read outside file data since the last entry was handed over.
    since_entry: Cell<u64>,
    over_header: Cell<bool>,
}

/// Marks a file's data being read, for as long as it lives.
struct Body<'m>(&'m Meter);

impl<'m> Body<'m> {
    fn enter(meter: &'m Meter) -> Self {
        meter.in_body.set(true);
        Body(meter)
    }
}

impl Drop for Body<'_> {
    fn drop(&mut self) {
        self.0.in_body.set(false);
    }
}

/// A reader that fails once more than `left` bytes come through, or more than
/// [`MAX_HEADER_BYTES`] between two entries outside file data, recording which.
struct Capped<R> {
    inner: R,
    left: u64,
    meter: Rc<Meter>,
}

impl<R: Read> Read for Capped<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let m = &self.meter;
        // Outside file data, read no further than the header cap allows, so the tar reader
        // never holds more than that in memory.
        let counted = m.headers.get() && !m.in_body.get();
        let room = if counted {
            let left = MAX_HEADER_BYTES.saturating_sub(m.since_entry.get());
            if left == 0 {
                m.over_header.set(true);
                return Err(io::Error::other("tar header limit reached"));
            }
            usize::try_from(left).unwrap_or(usize::MAX).min(buf.len())
        } else {
            buf.len()
        };
        let n = self.inner.read(&mut buf[..room])?;
        let n64 = n as u64;
        if n64 > self.left {
            m.over.set(true);
            return Err(io::Error::other("size limit reached"));
        }
        self.left -= n64;
        m.used.set(m.used.get() + n64);
        if counted {
            m.since_entry.set(m.since_entry.get() + n64);
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_split_and_escapes_refused() {
        let ok = |p: &str| components(p.as_bytes(), "path").ok();
        assert_eq!(ok("./a//b/./c"), Some(vec![b"a".to_vec(), b"b".to_vec(), b"c".to_vec()]));
        assert_eq!(ok("./"), Some(vec![]));
        assert!(ok("/etc").is_none());
        assert!(ok("a/../b").is_none());
        assert!(ok("..").is_none());
        assert!(ok(&"d/".repeat(MAX_DEPTH + 1)).is_none(), "too deep");
        assert!(ok(&"d/".repeat(MAX_DEPTH)).is_some());
        assert!(ok(&"x".repeat(MAX_PATH + 1)).is_none(), "too long");
    }
}
