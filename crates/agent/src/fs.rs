//! Filesystem operations the host asks the agent to perform inside the sandbox.
//!
//! The agent is uid 0 of the sandbox's user namespace, so the kernel does not stop it from
//! touching files the sandbox user could not; what these functions add on top of the raw calls is
//! path resolution the way E2B clients expect it, ownership of whatever they create, and stable
//! [`ErrorKind`]s the server can translate into Connect codes.
//!
//! Everything here is synchronous and short; the request loop calls it directly.
//!
//! The agent is PID 1 and the sandbox's root, so a path a client names could lead it where the
//! client itself may not go: through a `/proc` magic link (`/proc/<pid>/fd/N`, `root`, `cwd`,
//! `exe`, `map_files`) to whatever a descriptor points at, or into the agent's own `/proc/1`
//! (its memory, its descriptors). Every client path is therefore resolved by the kernel with
//! `openat2(RESOLVE_NO_MAGICLINKS)` (or, where the kernel lacks it, the same rules applied by
//! [`resolve`]) into a descriptor ([`Pinned`]), the agent's own `/proc`
//! entries are refused, and the operation then goes through that descriptor, so a symlink
//! swapped in after the check cannot redirect it.

use std::collections::BTreeMap;
use std::collections::HashMap;
use std::fs::{self, DirBuilder, File, Metadata, OpenOptions, Permissions};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{AT_FDCWD, OFlag, ResolveFlag};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};
use nix::sys::stat::Mode;
use ringfence_proto::{
    AgentError, CHUNK, EntryInfo, ErrorKind, FileType, FsEventKind, SandboxUser,
};

const FILE_MODE: u32 = 0o644;
const DIR_MODE: u32 = 0o755;

/// Name reported for events on the watched directory itself (what `filepath.Rel(root, root)`
/// gives E2B's envd).
const ROOT_EVENT_NAME: &str = ".";

fn error(kind: ErrorKind, message: String) -> AgentError {
    AgentError { kind, message }
}

/// Turns an I/O failure on `path` into the error the host sees.
fn map_io(err: io::Error, path: &Path) -> AgentError {
    let p = path.display();
    let (kind, message) = match err.raw_os_error() {
        Some(libc::ENOENT) => (ErrorKind::NotFound, format!("no such file or directory: {p}")),
        Some(libc::EEXIST) => (ErrorKind::AlreadyExists, format!("already exists: {p}")),
        // Renaming a directory over a non-empty one: a conflict with what is there, not a bug.
        Some(libc::ENOTEMPTY) => (ErrorKind::AlreadyExists, format!("directory not empty: {p}")),
        Some(libc::EACCES | libc::EPERM) => {
            (ErrorKind::PermissionDenied, format!("permission denied: {p}"))
        }
        Some(libc::EROFS) => (ErrorKind::PermissionDenied, format!("read-only file system: {p}")),
        Some(libc::ENOTDIR) => (ErrorKind::NotADirectory, format!("not a directory: {p}")),
        Some(libc::EISDIR) => (ErrorKind::IsADirectory, format!("is a directory: {p}")),
        Some(libc::ENOSPC) => (ErrorKind::NoSpace, format!("no space left on device: {p}")),
        Some(libc::EDQUOT) => (ErrorKind::NoSpace, format!("disk quota exceeded: {p}")),
        Some(libc::EINVAL) => (ErrorKind::InvalidArgument, format!("invalid argument: {p}")),
        Some(libc::ENAMETOOLONG) => {
            (ErrorKind::InvalidArgument, format!("file name too long: {p}"))
        }
        Some(libc::ELOOP) => {
            (ErrorKind::InvalidArgument, format!("too many levels of symbolic links: {p}"))
        }
        Some(libc::EXDEV) => {
            (ErrorKind::InvalidArgument, format!("crosses a filesystem boundary: {p}"))
        }
        Some(libc::EFBIG) => (ErrorKind::InvalidArgument, format!("file too large: {p}")),
        Some(_) => (ErrorKind::Internal, format!("{p}: {err}")),
        // No errno: std refused before any syscall (e.g. a NUL byte in the path).
        None => match err.kind() {
            io::ErrorKind::NotFound => {
                (ErrorKind::NotFound, format!("no such file or directory: {p}"))
            }
            io::ErrorKind::AlreadyExists => {
                (ErrorKind::AlreadyExists, format!("already exists: {p}"))
            }
            io::ErrorKind::PermissionDenied => {
                (ErrorKind::PermissionDenied, format!("permission denied: {p}"))
            }
            io::ErrorKind::InvalidInput | io::ErrorKind::InvalidData => {
                (ErrorKind::InvalidArgument, format!("{p}: {err}"))
            }
            _ => (ErrorKind::Internal, format!("{p}: {err}")),
        },
    };
    error(kind, message)
}

/// Resolves a path as sent by a client into an absolute, lexically normalised one.
///
/// Normalisation is lexical on purpose: the kernel resolves symlinks when the path is used, and
/// the sandbox's mount namespace is what confines it, not this function.
pub fn resolve(path: &str, user: SandboxUser) -> Result<PathBuf, AgentError> {
    if path.is_empty() {
        return Err(error(ErrorKind::InvalidArgument, "empty path".into()));
    }
    if path.contains('\0') {
        return Err(error(
            ErrorKind::InvalidArgument,
            format!("path contains a NUL byte: {path:?}"),
        ));
    }
    let home = Path::new(user.home());
    let joined = if path == "~" {
        home.to_path_buf()
    } else if let Some(rest) = path.strip_prefix("~/") {
        home.join(rest)
    } else {
        // `~name` is not expanded: there is one user per sandbox, so it is a plain file name.
        home.join(path)
    };
    Ok(normalize(&joined))
}

fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for component in path.components() {
        match component {
            Component::Prefix(_) | Component::RootDir | Component::CurDir => {}
            // `pop` on `/` is a no-op, which is what keeps `..` from climbing above the root.
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(name) => out.push(name),
        }
    }
    out
}

/// A client path the kernel resolved once, with `/proc` magic links refused: `access` names the
/// same file through the descriptor kept here (`/proc/self/fd/N`, a link only the agent's own
/// descriptors are behind), so calls made on `access` land where the check did.
#[derive(Debug)]
struct Pinned {
    fd: OwnedFd,
    access: PathBuf,
}

impl Pinned {
    fn new(fd: OwnedFd, name: Option<&std::ffi::OsStr>) -> Pinned {
        let mut access = PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()));
        if let Some(n) = name {
            access.push(n);
        }
        Pinned { fd, access }
    }
}

fn no_magic(flags: OFlag) -> How {
    How {
        flags: flags | OFlag::O_CLOEXEC,
        mode: Mode::empty(),
        resolve: ResolveFlag::RESOLVE_NO_MAGICLINKS,
    }
}

fn magic_refused(path: &Path) -> AgentError {
    error(
        ErrorKind::PermissionDenied,
        format!("permission denied: {} leads through a /proc magic link", path.display()),
    )
}

/// `ELOOP` from a magic-link-refusing lookup is either a symlink loop or the refusal; a plain
/// lookup (`O_PATH`: a name lookup, nothing is opened) of the same path tells them apart. A
/// plain lookup that fails some other way counts as the refusal too: gVisor, for one, cannot
/// reopen a descriptor backed by a host file (`/proc/1/fd/0`), yet only the magic-link rule
/// turns that into `ELOOP`.
fn loop_or_magic(path: &Path, flags: OFlag) -> AgentError {
    let mut p = path;
    loop {
        let plain = How {
            resolve: ResolveFlag::empty(),
            ..no_magic(OFlag::O_PATH | (flags & OFlag::O_NOFOLLOW))
        };
        let strict = open_how(AT_FDCWD, p, no_magic(OFlag::O_PATH | (flags & OFlag::O_NOFOLLOW)));
        let plain = open_how(AT_FDCWD, p, plain);
        if !matches!(plain, Err(Errno::ELOOP)) && matches!(strict, Err(Errno::ELOOP)) {
            return magic_refused(path);
        }
        match p.parent() {
            Some(q) if q != p => p = q,
            _ => break,
        }
    }
    map_io(io::Error::from_raw_os_error(libc::ELOOP), path)
}

/// Whether `fd` is the agent's own `/proc` entry (`/proc/1/...`, which `/proc/self` and
/// `/proc/thread-self` lead to as well): its memory, descriptors and maps are not a client's.
fn is_agent_proc(fd: &OwnedFd) -> bool {
    let on_proc = nix::sys::statfs::fstatfs(fd)
        .is_ok_and(|st| st.filesystem_type() == nix::sys::statfs::PROC_SUPER_MAGIC);
    if !on_proc {
        return false;
    }
    // The agent is PID 1 of the sandbox's pid namespace, so its entries are under /proc/1.
    fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).is_ok_and(|p| {
        let p = p.to_string_lossy();
        p == "/proc/1" || p.starts_with("/proc/1/")
    })
}

/// Opens `path` (following an ordinary final symlink unless `O_NOFOLLOW`) with magic links and
/// the agent's own `/proc` entries refused.
fn open_checked(path: &Path, flags: OFlag, mode: u32) -> Result<OwnedFd, AgentError> {
    let how = How { mode: Mode::from_bits_truncate(mode), ..no_magic(flags) };
    let fd = match open_how(AT_FDCWD, path, how) {
        Ok(fd) => fd,
        Err(Errno::ELOOP) => return Err(loop_or_magic(path, flags)),
        Err(e) => return Err(map_io(e.into(), path)),
    };
    if is_agent_proc(&fd) {
        return Err(magic_refused(path));
    }
    Ok(fd)
}

/// `path` itself, for calls that follow a final symlink (listing, watching).
fn pin_target(path: &Path) -> Result<Pinned, AgentError> {
    Ok(Pinned::new(open_checked(path, OFlag::O_PATH, 0)?, None))
}

/// `path`'s parent, pinned, plus its last name: for calls that act on the name itself and do
/// not follow it (stat, mkdir, remove, rename, metadata).
fn pin_entry(path: &Path) -> Result<Pinned, AgentError> {
    match (path.parent(), path.file_name()) {
        (Some(parent), Some(name)) => {
            let dir = open_checked(parent, OFlag::O_PATH | OFlag::O_DIRECTORY, 0)?;
            let pinned = Pinned::new(dir, Some(name));
            // The name itself may be the agent's /proc/1 (`/proc/1`, `/proc/self`).
            if let Ok(fd) = open_how(
                pinned.fd.as_fd(),
                Path::new(name),
                no_magic(OFlag::O_PATH | OFlag::O_NOFOLLOW),
            ) && is_agent_proc(&fd)
            {
                return Err(magic_refused(path));
            }
            Ok(pinned)
        }
        _ => pin_target(path),
    }
}

fn file_type(md: &Metadata) -> FileType {
    let ft = md.file_type();
    if ft.is_symlink() {
        FileType::Symlink
    } else if ft.is_dir() {
        FileType::Directory
    } else if ft.is_file() {
        FileType::File
    } else {
        FileType::Other
    }
}

/// Builds the wire description of `path` from metadata already fetched.
///
/// `mode` carries the permission bits (with setuid/setgid/sticky) only; the type is in `kind`.
fn entry(path: &Path, access: &Path, md: &Metadata) -> EntryInfo {
    let name =
        path.file_name().map_or_else(|| "/".to_owned(), |n| n.to_string_lossy().into_owned());
    let symlink_target = if md.file_type().is_symlink() {
        fs::read_link(access).ok().map(|t| t.to_string_lossy().into_owned())
    } else {
        None
    };
    EntryInfo {
        name,
        path: path.to_string_lossy().into_owned(),
        kind: file_type(md),
        size: md.size(),
        mode: md.mode() & 0o7777,
        uid: md.uid(),
        gid: md.gid(),
        mtime: (md.mtime(), u32::try_from(md.mtime_nsec()).unwrap_or(0)),
        symlink_target,
        metadata: read_metadata(access),
    }
}

/// The namespace E2B keeps file metadata in.
const METADATA_PREFIX: &str = "user.e2b.";

/// An error from storing metadata: a filesystem without user extended attributes (gVisor's
/// gofer-backed root has none) is the client's to know about, named as such, not an internal
/// failure.
fn metadata_io(err: ringfence_sys::SysError, path: &Path) -> AgentError {
    if err.source.raw_os_error() == Some(libc::EOPNOTSUPP) {
        return error(
            ErrorKind::InvalidArgument,
            format!(
                "file metadata cannot be stored at {}: its filesystem has no extended \
                 attributes (the gvisor tier's has none)",
                path.display()
            ),
        );
    }
    map_io(err.source, path)
}

fn read_metadata(path: &Path) -> BTreeMap<String, String> {
    ringfence_sys::xattrs_with_prefix(path, METADATA_PREFIX)
        .map(|v| {
            v.into_iter().map(|(k, v)| (k, String::from_utf8_lossy(&v).into_owned())).collect()
        })
        .unwrap_or_default()
}

/// Replaces the file's metadata with `metadata` (clearing stale keys) and returns its entry.
pub fn set_metadata(
    path: &Path,
    metadata: &BTreeMap<String, String>,
) -> Result<EntryInfo, AgentError> {
    let io = |e: ringfence_sys::SysError| metadata_io(e, path);
    let pinned = pin_entry(path)?;
    let at = pinned.access.as_path();
    for (key, _) in ringfence_sys::xattrs_with_prefix(at, METADATA_PREFIX).map_err(io)? {
        if !metadata.contains_key(&key) {
            ringfence_sys::set_xattr(at, &format!("{METADATA_PREFIX}{key}"), None).map_err(io)?;
        }
    }
    for (key, value) in metadata {
        if key.is_empty() || key.contains('\0') {
            return Err(AgentError {
                kind: ErrorKind::InvalidArgument,
                message: format!("invalid metadata key {key:?}"),
            });
        }
        ringfence_sys::set_xattr(at, &format!("{METADATA_PREFIX}{key}"), Some(value.as_bytes()))
            .map_err(io)?;
    }
    stat(path)
}

/// Describes `path` itself, not what it points to when it is a symlink.
pub fn stat(path: &Path) -> Result<EntryInfo, AgentError> {
    let pinned = pin_entry(path)?;
    let md = fs::symlink_metadata(&pinned.access).map_err(|e| map_io(e, path))?;
    Ok(entry(path, &pinned.access, &md))
}

/// Lists `path` down to `depth` levels (0 and 1 both mean direct children), sorted by path.
///
/// `path` itself may be a symlink to a directory, as a user would expect from `ls`; symlinks met
/// below it are reported but never descended into, so a link cycle cannot make the walk loop.
pub fn list_dir(path: &Path, depth: u32) -> Result<Vec<EntryInfo>, AgentError> {
    let root = pin_target(path)?;
    let md = fs::metadata(&root.access).map_err(|e| map_io(e, path))?;
    if !md.is_dir() {
        return Err(error(
            ErrorKind::NotADirectory,
            format!("not a directory: {}", path.display()),
        ));
    }
    let max_depth = depth.max(1);
    let mut out = Vec::new();
    // An explicit stack rather than recursion: `depth` is client-controlled. Each directory is
    // opened from its parent's descriptor, never by path, and never through a symlink, so a
    // directory swapped for a link mid-walk cannot take the walk elsewhere.
    let mut pending = vec![(path.to_path_buf(), std::rc::Rc::new(root), 1u32)];
    while let Some((dir, pinned, level)) = pending.pop() {
        let entries = match fs::read_dir(&pinned.access) {
            Ok(entries) => entries,
            // A subdirectory removed since we saw it is not the caller's error.
            Err(e) if level > 1 && e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(map_io(e, &dir)),
        };
        for dirent in entries {
            let dirent = dirent.map_err(|e| map_io(e, &dir))?;
            let child = dir.join(dirent.file_name());
            let access = pinned.access.join(dirent.file_name());
            let md = match fs::symlink_metadata(&access) {
                Ok(md) => md,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(map_io(e, &child)),
            };
            if md.file_type().is_dir() && level < max_depth {
                let sub = open_how(
                    pinned.fd.as_fd(),
                    Path::new(&dirent.file_name()),
                    How {
                        resolve: ResolveFlag::RESOLVE_NO_MAGICLINKS
                            | ResolveFlag::RESOLVE_NO_SYMLINKS,
                        ..no_magic(OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW)
                    },
                );
                // Gone or replaced since: skipped. The agent's own /proc/1 is not descended.
                if let Ok(fd) = sub
                    && !is_agent_proc(&fd)
                {
                    pending.push((
                        child.clone(),
                        std::rc::Rc::new(Pinned::new(fd, None)),
                        level + 1,
                    ));
                }
            }
            out.push(entry(&child, &access, &md));
        }
    }
    // Component-wise order keeps each directory's contents right after it.
    out.sort_by(|a, b| Path::new(&a.path).cmp(Path::new(&b.path)));
    Ok(out)
}

/// Flags for opening client-named paths: never block on a FIFO with no peer, and never let a
/// terminal device become the agent's controlling terminal.
const OPEN_FLAGS: i32 = libc::O_NONBLOCK | libc::O_NOCTTY;

fn open_flags() -> OFlag {
    OFlag::from_bits_truncate(OPEN_FLAGS)
}

fn require_regular(md: &Metadata, path: &Path) -> Result<(), AgentError> {
    if md.is_dir() {
        Err(error(ErrorKind::IsADirectory, format!("is a directory: {}", path.display())))
    } else if !md.is_file() {
        Err(error(ErrorKind::InvalidArgument, format!("not a regular file: {}", path.display())))
    } else {
        Ok(())
    }
}

/// Reads up to [`CHUNK`] bytes of `path` at `offset`; the flag is true when nothing follows.
pub fn read_chunk(path: &Path, offset: u64) -> Result<(Vec<u8>, bool), AgentError> {
    let file = File::from(open_checked(path, OFlag::O_RDONLY | open_flags(), 0)?);
    let md = file.metadata().map_err(|e| map_io(e, path))?;
    require_regular(&md, path)?;
    // One byte past the chunk tells whether more follows without trusting `st_size`, which is 0
    // for /proc files and stale for files still being written.
    let mut buf = vec![0u8; CHUNK + 1];
    let mut filled = 0;
    while filled < buf.len() {
        let at = offset.checked_add(filled as u64).ok_or_else(|| {
            error(ErrorKind::InvalidArgument, format!("offset out of range: {}", path.display()))
        })?;
        match file.read_at(&mut buf[filled..], at) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(map_io(e, path)),
        }
    }
    let eof = filled <= CHUNK;
    buf.truncate(filled.min(CHUNK));
    Ok((buf, eof))
}

/// Opens a directory we just created without following a symlink swapped in since, so that the
/// chown/chmod land on it and nowhere else.
fn own_dir(dir: &Path, access: &Path, user: SandboxUser) -> Result<(), AgentError> {
    let handle = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
        .open(access)
        .map_err(|e| map_io(e, dir))?;
    own(&handle, dir, DIR_MODE, user)
}

/// `metadata` (following a final symlink) of a client path, resolved as [`pin_target`] does.
fn checked_metadata(path: &Path) -> Result<Metadata, AgentError> {
    let pinned = pin_target(path)?;
    fs::metadata(&pinned.access).map_err(|e| map_io(e, path))
}

fn own(file: &File, path: &Path, mode: u32, user: SandboxUser) -> Result<(), AgentError> {
    let id = user.uid();
    std::os::unix::fs::fchown(file, Some(id), Some(id)).map_err(|e| map_io(e, path))?;
    // Explicit because the agent's umask is not the client's business.
    file.set_permissions(Permissions::from_mode(mode)).map_err(|e| map_io(e, path))
}

/// `mkdir -p` that hands every directory it creates (and only those) to `user`.
fn create_dirs(dir: &Path, user: SandboxUser) -> Result<(), AgentError> {
    let mut missing = Vec::new();
    let mut cur = dir;
    loop {
        // Following symlinks: a symlinked directory is a fine parent.
        match checked_metadata(cur) {
            Ok(md) if md.is_dir() => break,
            Ok(_) => {
                return Err(error(
                    ErrorKind::NotADirectory,
                    format!("not a directory: {}", cur.display()),
                ));
            }
            Err(e) if e.kind == ErrorKind::NotFound => {
                missing.push(cur);
                match cur.parent() {
                    Some(parent) => cur = parent,
                    None => break,
                }
            }
            Err(e) => return Err(e),
        }
    }
    for d in missing.into_iter().rev() {
        let pinned = pin_entry(d)?;
        match DirBuilder::new().mode(DIR_MODE).create(&pinned.access) {
            Ok(()) => own_dir(d, &pinned.access, user)?,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                // Either a concurrent mkdir (fine, and not ours to chown) or a dangling symlink.
                if !checked_metadata(d).is_ok_and(|md| md.is_dir()) {
                    return Err(error(
                        ErrorKind::NotADirectory,
                        format!("not a directory: {}", d.display()),
                    ));
                }
            }
            Err(e) => return Err(map_io(e, d)),
        }
    }
    Ok(())
}

/// Writes `data` at `offset` and describes the file afterwards.
///
/// Offset 0 creates (with missing parents) or truncates. A later offset requires the file to
/// exist: a file that vanished in the middle of an upload is reported, not silently recreated
/// with a hole where the first chunks were.
pub fn write_chunk(
    path: &Path,
    offset: u64,
    data: &[u8],
    user: SandboxUser,
) -> Result<EntryInfo, AgentError> {
    let (file, created) = if offset == 0 {
        if let Some(parent) = path.parent() {
            create_dirs(parent, user)?;
        }
        // O_EXCL tells us whether the file is new (and so ours to chown) without a racy stat.
        let flags = OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | open_flags();
        match open_checked(path, flags, FILE_MODE) {
            Ok(fd) => (File::from(fd), true),
            Err(e) if e.kind == ErrorKind::AlreadyExists => (open_existing(path)?, false),
            Err(e) => return Err(e),
        }
    } else {
        (open_existing(path)?, false)
    };
    let md = file.metadata().map_err(|e| map_io(e, path))?;
    require_regular(&md, path)?;
    if created {
        own(&file, path, FILE_MODE, user)?;
    } else if offset == 0 {
        // Truncating only now, after the type check, so a device or FIFO is never truncated.
        file.set_len(0).map_err(|e| map_io(e, path))?;
    }
    file.write_all_at(data, offset).map_err(|e| map_io(e, path))?;
    let md = file.metadata().map_err(|e| map_io(e, path))?;
    let access = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
    Ok(entry(path, &access, &md))
}

fn open_existing(path: &Path) -> Result<File, AgentError> {
    open_checked(path, OFlag::O_WRONLY | open_flags(), 0).map(File::from)
}

mod resolve;
mod upload;

use resolve::{How, open as open_how};
use upload::{CommitKind, is_unnamed_temp, is_upload_temp};
pub use upload::{MAX_UPLOADS, Upload};

/// Creates `path` and any missing parents, all owned by `user`.
pub fn make_dir(path: &Path, user: SandboxUser) -> Result<EntryInfo, AgentError> {
    let exists = match pin_entry(path) {
        Ok(pinned) => match fs::symlink_metadata(&pinned.access) {
            Ok(_) => true,
            Err(e) if e.kind() == io::ErrorKind::NotFound => false,
            Err(e) => return Err(map_io(e, path)),
        },
        // A missing parent: created below.
        Err(e) if e.kind == ErrorKind::NotFound => false,
        Err(e) => return Err(e),
    };
    if exists {
        return Err(error(ErrorKind::AlreadyExists, format!("already exists: {}", path.display())));
    }
    create_dirs(path, user)?;
    stat(path)
}

/// Removes a file, a symlink (never its target) or a whole directory tree.
pub fn remove(path: &Path) -> Result<(), AgentError> {
    if path.parent().is_none() {
        // Would empty the sandbox's whole filesystem: never what an API caller meant.
        return Err(error(
            ErrorKind::InvalidArgument,
            format!("refusing to remove {}", path.display()),
        ));
    }
    let pinned = pin_entry(path)?;
    let at = &pinned.access;
    let md = fs::symlink_metadata(at).map_err(|e| map_io(e, path))?;
    // `remove_dir_all` does not follow symlinks inside the tree.
    let result = if md.file_type().is_dir() { fs::remove_dir_all(at) } else { fs::remove_file(at) };
    result.map_err(|e| map_io(e, path))
}

/// Moves `from` to `to`, creating `to`'s missing parents (owned by `user`).
///
/// Moves across filesystems fail with `InvalidArgument`, as `rename(2)` does.
pub fn rename(from: &Path, to: &Path, user: SandboxUser) -> Result<EntryInfo, AgentError> {
    // Checked first so that a failed rename leaves no new directories behind.
    let src = pin_entry(from)?;
    fs::symlink_metadata(&src.access).map_err(|e| map_io(e, from))?;
    if let Some(parent) = to.parent() {
        create_dirs(parent, user)?;
    }
    let dst = pin_entry(to)?;
    // `from` is known to exist, so whatever fails now is about the destination.
    fs::rename(&src.access, &dst.access).map_err(|e| map_io(e, to))?;
    stat(to)
}

/// What every watched directory reports. `IN_CLOSE_WRITE` is left out on purpose: it would
/// duplicate the `IN_MODIFY` that every write already produced.
fn watch_mask() -> AddWatchFlags {
    AddWatchFlags::IN_CREATE
        | AddWatchFlags::IN_MODIFY
        | AddWatchFlags::IN_DELETE
        | AddWatchFlags::IN_DELETE_SELF
        | AddWatchFlags::IN_MOVED_FROM
        | AddWatchFlags::IN_MOVED_TO
        | AddWatchFlags::IN_ATTRIB
        | AddWatchFlags::IN_ONLYDIR
}

fn map_errno(errno: Errno, path: &Path) -> AgentError {
    match errno {
        // ENOSPC/EMFILE from inotify mean exhausted inotify limits, not a full disk.
        Errno::ENOSPC => error(
            ErrorKind::LimitReached,
            format!("inotify watch limit reached watching {}", path.display()),
        ),
        Errno::EMFILE => error(
            ErrorKind::LimitReached,
            format!("inotify instance limit reached watching {}", path.display()),
        ),
        other => map_io(io::Error::from(other), path),
    }
}

/// Reports changes below one directory, relative to it.
///
/// The descriptor is non-blocking: register it with `tokio::io::unix::AsyncFd` and call
/// [`Watcher::read_events`] when it is readable.
#[derive(Debug)]
pub struct Watcher {
    inotify: Inotify,
    /// The client's path: messages, and directories created later (a watch yields only names
    /// and event kinds, so those are added by path).
    root: PathBuf,
    root_wd: WatchDescriptor,
    recursive: bool,
    /// Each watched directory, relative to `root` (the root itself is the empty path).
    dirs: HashMap<WatchDescriptor, PathBuf>,
    /// Renames away from an upload's commit name, by cookie: the matching arrival is reported
    /// as the write the upload was.
    commits: HashMap<u32, CommitKind>,
}

impl Watcher {
    /// Starts watching `path`; with `recursive`, every directory below it is watched as well,
    /// including those created later.
    pub fn new(path: &Path, recursive: bool) -> Result<Watcher, AgentError> {
        let pinned = pin_target(path)?;
        let md = fs::metadata(&pinned.access).map_err(|e| map_io(e, path))?;
        if !md.is_dir() {
            return Err(error(
                ErrorKind::NotADirectory,
                format!("not a directory: {}", path.display()),
            ));
        }
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)
            .map_err(|e| map_errno(e, path))?;
        // The root may be a symlink to a directory; everything below is watched without following.
        let root_wd =
            inotify.add_watch(&pinned.access, watch_mask()).map_err(|e| map_errno(e, path))?;
        let mut watcher = Watcher {
            inotify,
            root: path.to_path_buf(),
            root_wd,
            recursive,
            dirs: HashMap::from([(root_wd, PathBuf::new())]),
            commits: HashMap::new(),
        };
        if recursive {
            // The tree as it is now, through the pinned root. The pin is dropped afterwards:
            // holding the directory open would hold back its IN_DELETE_SELF.
            watcher.watch_children(&pinned.access, Path::new(""), None)?;
        }
        Ok(watcher)
    }

    /// The inotify descriptor, for readiness polling.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.inotify.as_fd()
    }

    /// Watches every directory below `rel` (which is already watched).
    ///
    /// With `created`, everything found is also reported as created: those entries appeared in
    /// a directory before its watch existed, so inotify never saw them.
    fn watch_children(
        &mut self,
        base: &Path,
        rel: &Path,
        mut created: Option<&mut Vec<(String, FsEventKind)>>,
    ) -> Result<(), AgentError> {
        let mut pending = vec![rel.to_path_buf()];
        while let Some(dir_rel) = pending.pop() {
            let dir = self.root.join(&dir_rel);
            let entries = match fs::read_dir(base.join(&dir_rel)) {
                Ok(entries) => entries,
                // Gone or replaced since it was seen; its removal event is queued already.
                Err(e) if is_vanished(&e) => continue,
                Err(e) => return Err(map_io(e, &dir)),
            };
            for dirent in entries {
                let Ok(dirent) = dirent else { continue };
                let child_rel = dir_rel.join(dirent.file_name());
                if let Some(out) = created.as_deref_mut() {
                    push_event(out, &child_rel, FsEventKind::Create);
                }
                // `DirEntry::file_type` does not follow symlinks: linked directories stay unwatched.
                if !dirent.file_type().is_ok_and(|t| t.is_dir()) {
                    continue;
                }
                let child = self.root.join(&child_rel);
                // Watch before listing, so nothing created in between is missed.
                let at = base.join(&child_rel);
                match self.inotify.add_watch(&at, watch_mask() | AddWatchFlags::IN_DONT_FOLLOW) {
                    Ok(wd) => {
                        self.dirs.insert(wd, child_rel.clone());
                        pending.push(child_rel);
                    }
                    Err(Errno::ENOENT | Errno::ENOTDIR) => {}
                    Err(e) => return Err(map_errno(e, &child)),
                }
            }
        }
        Ok(())
    }

    /// Drops the watches on `rel` and everything below it.
    fn forget(&mut self, rel: &Path) {
        let gone: Vec<WatchDescriptor> =
            self.dirs.iter().filter(|(_, p)| p.starts_with(rel)).map(|(wd, _)| *wd).collect();
        for wd in gone {
            self.dirs.remove(&wd);
            // Fails only if the kernel already dropped it, which is the outcome wanted.
            let _ = self.inotify.rm_watch(wd);
        }
    }

    /// Drains the kernel's queue, returning `(path relative to the root, kind)` pairs; the root
    /// itself is named `"."`.
    ///
    /// Returns only once the queue is empty, so an `AsyncFd` caller may clear readiness after.
    pub fn read_events(&mut self) -> Result<Vec<(String, FsEventKind)>, AgentError> {
        let mut out = Vec::new();
        loop {
            let events = match self.inotify.read_events() {
                Ok(events) => events,
                Err(Errno::EAGAIN) => break,
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(map_errno(e, &self.root)),
            };
            if events.is_empty() {
                break;
            }
            for ev in events {
                let mask = ev.mask;
                if mask.contains(AddWatchFlags::IN_IGNORED) {
                    self.dirs.remove(&ev.wd);
                    continue;
                }
                // Unknown descriptors belong to watches already forgotten (moved-away trees);
                // an overflow (wd -1) has no path to report and the events are lost regardless.
                let Some(dir_rel) = self.dirs.get(&ev.wd) else { continue };
                // An upload's temporary names are not the client's business; the rename that
                // commits one is reported as the write it stands for.
                if let Some(name) = &ev.name
                    && is_unnamed_temp(name, &self.root.join(dir_rel))
                {
                    continue;
                }
                if let Some(name) = &ev.name
                    && is_upload_temp(name)
                {
                    if mask.contains(AddWatchFlags::IN_MOVED_FROM)
                        && let Some(kind) = CommitKind::of(name)
                    {
                        if self.commits.len() >= 64 {
                            self.commits.clear();
                        }
                        self.commits.insert(ev.cookie, kind);
                    }
                    continue;
                }
                let rel = match &ev.name {
                    Some(name) => dir_rel.join(name),
                    // A subdirectory's own events duplicate what its parent's watch reports.
                    None if ev.wd == self.root_wd => PathBuf::new(),
                    None => continue,
                };
                if mask.contains(AddWatchFlags::IN_MOVED_TO)
                    && let Some(kind) = self.commits.remove(&ev.cookie)
                {
                    for k in kind.events() {
                        push_event(&mut out, &rel, *k);
                    }
                    continue;
                }
                let kind = if mask.contains(AddWatchFlags::IN_CREATE) {
                    FsEventKind::Create
                } else if mask.contains(AddWatchFlags::IN_MODIFY) {
                    FsEventKind::Write
                } else if mask.intersects(AddWatchFlags::IN_DELETE | AddWatchFlags::IN_DELETE_SELF)
                {
                    FsEventKind::Remove
                } else if mask.intersects(AddWatchFlags::IN_MOVED_FROM | AddWatchFlags::IN_MOVED_TO)
                {
                    FsEventKind::Rename
                } else if mask.contains(AddWatchFlags::IN_ATTRIB) {
                    FsEventKind::Chmod
                } else {
                    continue;
                };
                push_event(&mut out, &rel, kind);

                if !self.recursive || ev.name.is_none() || !mask.contains(AddWatchFlags::IN_ISDIR) {
                    continue;
                }
                if mask.contains(AddWatchFlags::IN_MOVED_FROM) {
                    // The watches follow the inodes, so their recorded paths are stale now; a
                    // matching IN_MOVED_TO re-adds them under the new name.
                    self.forget(&rel);
                } else if mask.intersects(AddWatchFlags::IN_CREATE | AddWatchFlags::IN_MOVED_TO) {
                    let dir = self.root.join(&rel);
                    match self.inotify.add_watch(&dir, watch_mask() | AddWatchFlags::IN_DONT_FOLLOW)
                    {
                        Ok(wd) => {
                            self.dirs.insert(wd, rel.clone());
                            // A moved-in tree was not created; only a new one needs backfilling.
                            let created =
                                mask.contains(AddWatchFlags::IN_CREATE).then_some(&mut out);
                            let base = self.root.clone();
                            self.watch_children(&base, &rel, created)?;
                        }
                        Err(Errno::ENOENT | Errno::ENOTDIR) => {}
                        Err(e) => return Err(map_errno(e, &dir)),
                    }
                }
            }
        }
        Ok(out)
    }
}

fn is_vanished(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENOTDIR))
}

fn push_event(out: &mut Vec<(String, FsEventKind)>, rel: &Path, kind: FsEventKind) {
    let name = if rel.as_os_str().is_empty() {
        ROOT_EVENT_NAME.to_owned()
    } else {
        rel.to_string_lossy().into_owned()
    };
    // A large write arrives as several IN_MODIFYs; one is enough for the client.
    if out.last().is_some_and(|(n, k)| *n == name && *k == kind) {
        return;
    }
    out.push((name, kind));
}

impl AsFd for Watcher {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.inotify.as_fd()
    }
}

impl AsRawFd for Watcher {
    fn as_raw_fd(&self) -> RawFd {
        self.inotify.as_fd().as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::time::{Duration, Instant};

    /// A fresh directory under the system temp dir, removed on drop.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(tag: &str) -> Scratch {
            static NEXT: AtomicU32 = AtomicU32::new(0);
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let dir =
                std::env::temp_dir().join(format!("ringfence-fs-{}-{tag}-{n}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).unwrap();
            Scratch(dir)
        }

        fn path(&self, rel: &str) -> PathBuf {
            self.0.join(rel)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    // These tests chown to uid 1000, so, like the agent itself, they need to run as root.
    const USER: SandboxUser = SandboxUser::User;

    fn kind_of<T: std::fmt::Debug>(r: Result<T, AgentError>) -> ErrorKind {
        r.unwrap_err().kind
    }

    #[test]
    fn resolve_rules() {
        let r = |p: &str| resolve(p, USER).unwrap();
        assert_eq!(r("x"), Path::new("/home/user/x"));
        assert_eq!(r("a/./b/"), Path::new("/home/user/a/b"));
        assert_eq!(r("~"), Path::new("/home/user"));
        assert_eq!(r("~/"), Path::new("/home/user"));
        assert_eq!(r("~/a/../b"), Path::new("/home/user/b"));
        assert_eq!(r("~x"), Path::new("/home/user/~x"));
        assert_eq!(r("/etc/../var//log/."), Path::new("/var/log"));
        assert_eq!(r("/../../etc"), Path::new("/etc"));
        assert_eq!(r("../../../.."), Path::new("/"));
        assert_eq!(r("/"), Path::new("/"));
        assert_eq!(resolve("~", SandboxUser::Root).unwrap(), Path::new("/root"));
        assert_eq!(resolve("x", SandboxUser::Root).unwrap(), Path::new("/root/x"));
        assert_eq!(kind_of(resolve("", USER)), ErrorKind::InvalidArgument);
        assert_eq!(kind_of(resolve("a\0b", USER)), ErrorKind::InvalidArgument);
    }

    #[test]
    fn round_trip_across_chunk_boundary() {
        let s = Scratch::new("chunks");
        let path = s.path("big.bin");
        let data: Vec<u8> = (0..CHUNK + CHUNK / 2).map(|i| (i % 251) as u8).collect();
        write_chunk(&path, 0, &data[..CHUNK], USER).unwrap();
        let info = write_chunk(&path, CHUNK as u64, &data[CHUNK..], USER).unwrap();
        assert_eq!(info.size, data.len() as u64);
        assert_eq!(info.kind, FileType::File);

        let (first, eof) = read_chunk(&path, 0).unwrap();
        assert_eq!(first.len(), CHUNK);
        assert!(!eof);
        let (second, eof) = read_chunk(&path, CHUNK as u64).unwrap();
        assert_eq!(second.len(), CHUNK / 2);
        assert!(eof);
        assert_eq!([first, second].concat(), data);

        let (past, eof) = read_chunk(&path, 10 * CHUNK as u64).unwrap();
        assert!(past.is_empty() && eof);
    }

    #[test]
    fn exact_chunk_is_eof_in_one_read() {
        let s = Scratch::new("exact");
        let path = s.path("f");
        write_chunk(&path, 0, &vec![7u8; CHUNK], USER).unwrap();
        let (data, eof) = read_chunk(&path, 0).unwrap();
        assert_eq!(data.len(), CHUNK);
        assert!(eof);
    }

    #[test]
    fn offset_zero_truncates_and_later_offsets_need_the_file() {
        let s = Scratch::new("trunc");
        let path = s.path("f");
        write_chunk(&path, 0, b"hello world", USER).unwrap();
        let info = write_chunk(&path, 0, b"bye", USER).unwrap();
        assert_eq!(info.size, 3);
        assert_eq!(read_chunk(&path, 0).unwrap(), (b"bye".to_vec(), true));
        let info = write_chunk(&path, 3, b"!", USER).unwrap();
        assert_eq!(info.size, 4);

        let err = write_chunk(&s.path("missing"), 5, b"x", USER).unwrap_err();
        assert_eq!(err.kind, ErrorKind::NotFound);
        assert!(!s.path("missing").exists());
    }

    #[test]
    fn write_creates_parents_owned_by_user() {
        let s = Scratch::new("parents");
        let path = s.path("a/b/c.txt");
        let info = write_chunk(&path, 0, b"x", USER).unwrap();
        assert_eq!((info.uid, info.gid, info.mode), (1000, 1000, 0o644));
        assert_eq!(info.name, "c.txt");
        assert_eq!(info.path, path.to_string_lossy());
        for dir in ["a", "a/b"] {
            let md = fs::metadata(s.path(dir)).unwrap();
            assert_eq!((md.uid(), md.gid(), md.mode() & 0o7777), (1000, 1000, 0o755), "{dir}");
        }
        // Only what was created changes hands.
        assert_eq!(fs::metadata(&s.0).unwrap().uid(), 0);

        let info = write_chunk(&s.path("r/f"), 0, b"x", SandboxUser::Root).unwrap();
        assert_eq!((info.uid, info.gid), (0, 0));

        // Rewriting an existing file keeps its owner.
        fs::write(s.path("mine"), b"x").unwrap();
        let info = write_chunk(&s.path("mine"), 0, b"y", USER).unwrap();
        assert_eq!(info.uid, 0);
    }

    #[test]
    fn write_error_kinds() {
        let s = Scratch::new("werr");
        fs::create_dir(s.path("d")).unwrap();
        assert_eq!(kind_of(write_chunk(&s.path("d"), 0, b"x", USER)), ErrorKind::IsADirectory);
        fs::write(s.path("file"), b"x").unwrap();
        let err = write_chunk(&s.path("file/below"), 0, b"x", USER).unwrap_err();
        assert_eq!(err.kind, ErrorKind::NotADirectory);
        assert!(err.message.contains("file"), "{}", err.message);
    }

    #[test]
    fn read_error_kinds() {
        let s = Scratch::new("rerr");
        let err = read_chunk(&s.path("nope"), 0).unwrap_err();
        assert_eq!(err.kind, ErrorKind::NotFound);
        assert_eq!(err.message, format!("no such file or directory: {}", s.path("nope").display()));
        assert_eq!(kind_of(read_chunk(&s.0, 0)), ErrorKind::IsADirectory);
        assert_eq!(kind_of(stat(&s.path("nope"))), ErrorKind::NotFound);
    }

    #[test]
    fn fifo_is_refused_without_blocking() {
        let s = Scratch::new("fifo");
        let path = s.path("pipe");
        nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();
        assert_eq!(kind_of(read_chunk(&path, 0)), ErrorKind::InvalidArgument);
    }

    #[test]
    fn list_depths() {
        let s = Scratch::new("list");
        fs::write(s.path("a.txt"), b"a").unwrap();
        fs::create_dir_all(s.path("d/e")).unwrap();
        fs::write(s.path("d/b.txt"), b"b").unwrap();
        fs::write(s.path("d/e/c.txt"), b"c").unwrap();
        fs::create_dir(s.path("d-z")).unwrap();
        symlink(s.path("d"), s.path("link")).unwrap();

        let names = |depth| -> Vec<String> {
            list_dir(&s.0, depth)
                .unwrap()
                .into_iter()
                .map(|e| e.path.strip_prefix(&*s.0.to_string_lossy()).unwrap().to_owned())
                .collect()
        };
        let one = ["/a.txt", "/d", "/d-z", "/link"];
        assert_eq!(names(0), one);
        assert_eq!(names(1), one);
        assert_eq!(names(2), ["/a.txt", "/d", "/d/b.txt", "/d/e", "/d-z", "/link"]);
        assert_eq!(names(9), ["/a.txt", "/d", "/d/b.txt", "/d/e", "/d/e/c.txt", "/d-z", "/link"]);

        let entries = list_dir(&s.0, 1).unwrap();
        let link = entries.iter().find(|e| e.name == "link").unwrap();
        assert_eq!(link.kind, FileType::Symlink);
        let d = entries.iter().find(|e| e.name == "d").unwrap();
        assert_eq!(d.kind, FileType::Directory);

        // A symlinked directory can itself be listed.
        assert_eq!(list_dir(&s.path("link"), 1).unwrap().len(), 2);

        assert_eq!(kind_of(list_dir(&s.path("a.txt"), 1)), ErrorKind::NotADirectory);
        assert_eq!(kind_of(list_dir(&s.path("missing"), 1)), ErrorKind::NotFound);
    }

    #[test]
    fn stat_symlink_is_not_followed() {
        let s = Scratch::new("stat");
        fs::write(s.path("target"), b"12345").unwrap();
        symlink("target", s.path("ln")).unwrap();
        let info = stat(&s.path("ln")).unwrap();
        assert_eq!(info.kind, FileType::Symlink);
        assert_eq!(info.name, "ln");
        assert_eq!(info.symlink_target.as_deref(), Some("target"));
        let target = stat(&s.path("target")).unwrap();
        assert_eq!((target.kind, target.size, target.symlink_target), (FileType::File, 5, None));
        assert!(target.mtime.0 > 0);
        assert_eq!(stat(Path::new("/")).unwrap().name, "/");
    }

    #[test]
    fn remove_files_links_and_trees() {
        let s = Scratch::new("remove");
        fs::create_dir_all(s.path("tree/a/b")).unwrap();
        fs::write(s.path("tree/a/b/f"), b"x").unwrap();
        fs::write(s.path("keep"), b"x").unwrap();
        symlink(s.path("keep"), s.path("tree/a/ln")).unwrap();
        symlink(s.path("keep"), s.path("ln")).unwrap();

        remove(&s.path("ln")).unwrap();
        assert!(s.path("keep").exists());
        remove(&s.path("tree")).unwrap();
        assert!(!s.path("tree").exists());
        assert!(s.path("keep").exists());
        remove(&s.path("keep")).unwrap();
        assert!(!s.path("keep").exists());
        assert_eq!(kind_of(remove(&s.path("keep"))), ErrorKind::NotFound);
    }

    #[test]
    fn rename_creates_destination_parents() {
        let s = Scratch::new("rename");
        fs::write(s.path("src"), b"abc").unwrap();
        let info = rename(&s.path("src"), &s.path("x/y/dst"), USER).unwrap();
        assert_eq!((info.name.as_str(), info.size), ("dst", 3));
        assert!(!s.path("src").exists());
        assert_eq!(fs::read(s.path("x/y/dst")).unwrap(), b"abc");
        assert_eq!(fs::metadata(s.path("x/y")).unwrap().uid(), 1000);

        let err = rename(&s.path("src"), &s.path("z/dst"), USER).unwrap_err();
        assert_eq!(err.kind, ErrorKind::NotFound);
        assert!(!s.path("z").exists(), "a failed rename must not create parents");
    }

    #[test]
    fn make_dir_rules() {
        let s = Scratch::new("mkdir");
        let info = make_dir(&s.path("p/q"), USER).unwrap();
        assert_eq!((info.kind, info.uid, info.mode), (FileType::Directory, 1000, 0o755));
        assert_eq!(fs::metadata(s.path("p")).unwrap().uid(), 1000);
        assert_eq!(kind_of(make_dir(&s.path("p/q"), USER)), ErrorKind::AlreadyExists);
        fs::write(s.path("f"), b"").unwrap();
        assert_eq!(kind_of(make_dir(&s.path("f"), USER)), ErrorKind::AlreadyExists);
        assert_eq!(kind_of(make_dir(&s.path("f/sub"), USER)), ErrorKind::NotADirectory);
    }

    #[test]
    fn map_io_kinds() {
        let p = Path::new("/x");
        let k = |errno| map_io(io::Error::from_raw_os_error(errno), p).kind;
        assert_eq!(k(libc::ENOENT), ErrorKind::NotFound);
        assert_eq!(k(libc::EEXIST), ErrorKind::AlreadyExists);
        assert_eq!(k(libc::EACCES), ErrorKind::PermissionDenied);
        assert_eq!(k(libc::EPERM), ErrorKind::PermissionDenied);
        assert_eq!(k(libc::ENOTDIR), ErrorKind::NotADirectory);
        assert_eq!(k(libc::EISDIR), ErrorKind::IsADirectory);
        assert_eq!(k(libc::ENOSPC), ErrorKind::NoSpace);
        assert_eq!(k(libc::EDQUOT), ErrorKind::NoSpace);
        assert_eq!(k(libc::EINVAL), ErrorKind::InvalidArgument);
        assert_eq!(k(libc::EIO), ErrorKind::Internal);
        let e = map_io(io::Error::from_raw_os_error(libc::ENOSPC), p);
        assert_eq!(e.message, "no space left on device: /x");
    }

    /// Polls until every wanted event has arrived, returning all that did.
    fn wait_for(w: &mut Watcher, want: &[(&str, FsEventKind)]) -> Vec<(String, FsEventKind)> {
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut got = Vec::new();
        loop {
            got.extend(w.read_events().unwrap());
            let done = want.iter().all(|(n, k)| got.iter().any(|(gn, gk)| gn == n && gk == k));
            if done {
                return got;
            }
            assert!(Instant::now() < deadline, "wanted {want:?}, got {got:?}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn watcher_recursive_sees_file_in_subdir() {
        let s = Scratch::new("watch");
        fs::create_dir(s.path("sub")).unwrap();
        let mut w = Watcher::new(&s.0, true).unwrap();
        assert!(w.read_events().unwrap().is_empty());
        let f = s.path("sub/f");
        write_chunk(&f, 0, b"hello", USER).unwrap();
        wait_for(&mut w, &[("sub/f", FsEventKind::Create), ("sub/f", FsEventKind::Write)]);
        fs::set_permissions(&f, Permissions::from_mode(0o600)).unwrap();
        wait_for(&mut w, &[("sub/f", FsEventKind::Chmod)]);
        remove(&f).unwrap();
        wait_for(&mut w, &[("sub/f", FsEventKind::Remove)]);
    }

    #[test]
    fn watcher_follows_new_and_moved_directories() {
        let s = Scratch::new("watchnew");
        let mut w = Watcher::new(&s.0, true).unwrap();
        // Created before the watcher learns of `a`: reported from the backfill.
        write_chunk(&s.path("a/b/f"), 0, b"x", USER).unwrap();
        wait_for(
            &mut w,
            &[
                ("a", FsEventKind::Create),
                ("a/b", FsEventKind::Create),
                ("a/b/f", FsEventKind::Create),
            ],
        );
        write_chunk(&s.path("a/b/g"), 0, b"x", USER).unwrap();
        wait_for(&mut w, &[("a/b/g", FsEventKind::Create), ("a/b/g", FsEventKind::Write)]);

        rename(&s.path("a"), &s.path("m"), USER).unwrap();
        wait_for(&mut w, &[("a", FsEventKind::Rename), ("m", FsEventKind::Rename)]);
        write_chunk(&s.path("m/b/h"), 0, b"x", USER).unwrap();
        let got = wait_for(&mut w, &[("m/b/h", FsEventKind::Create)]);
        assert!(!got.iter().any(|(n, _)| n.starts_with("a/")), "{got:?}");

        // A subdirectory's removal is reported once, by its parent.
        remove(&s.path("m/b")).unwrap();
        let got = wait_for(&mut w, &[("m/b", FsEventKind::Remove)]);
        assert_eq!(got.iter().filter(|e| e.0 == "m/b").count(), 1, "{got:?}");
    }

    #[test]
    fn watcher_non_recursive_ignores_subdirs() {
        let s = Scratch::new("watchflat");
        fs::create_dir(s.path("sub")).unwrap();
        let mut w = Watcher::new(&s.0, false).unwrap();
        write_chunk(&s.path("sub/f"), 0, b"x", USER).unwrap();
        write_chunk(&s.path("top"), 0, b"x", USER).unwrap();
        let got = wait_for(&mut w, &[("top", FsEventKind::Create)]);
        assert!(!got.iter().any(|(n, _)| n.starts_with("sub/")), "{got:?}");
        fs::remove_dir_all(&s.0).unwrap();
        wait_for(&mut w, &[(".", FsEventKind::Remove)]);
    }

    /// Every operation, on a path that reaches a directory only through a /proc magic link:
    /// refused as permission denied, naming the client's path, with nothing done.
    #[test]
    fn magic_links_are_refused_by_every_operation() {
        let s = Scratch::new("magic");
        let outside = Scratch::new("magic-outside");
        fs::write(outside.path("secret"), b"s").unwrap();
        // A descriptor of ours to a directory: /proc/self/fd/N is a magic link to it, the way
        // /proc/1/fd/N led to the agent's stage.
        let dir = File::open(&outside.0).unwrap();
        let fd_link = format!("/proc/self/fd/{}", dir.as_raw_fd());
        symlink(&fd_link, s.path("ln")).unwrap();
        let via = |rel: &str| PathBuf::from(format!("{fd_link}/{rel}"));
        let ln = |rel: &str| s.path(&format!("ln/{rel}"));
        let refused = |what: &str, r: Result<(), AgentError>| {
            let e = r.expect_err(what);
            assert_eq!(e.kind, ErrorKind::PermissionDenied, "{what}: {e:?}");
            assert!(e.message.contains("magic link"), "{what}: {e:?}");
        };
        for p in [via("secret"), ln("secret"), PathBuf::from("/proc/self/root/etc/hostname")] {
            refused("read", read_chunk(&p, 0).map(drop));
            refused("stat", stat(&p).map(drop));
            refused("write", write_chunk(&p, 0, b"x", USER).map(drop));
            refused("metadata", set_metadata(&p, &BTreeMap::new()).map(drop));
            refused("remove", remove(&p));
            refused("rename from", rename(&p, &s.path("moved"), USER).map(drop));
            refused("rename to", rename(&s.path("ln"), &p, USER).map(drop));
        }
        for p in [PathBuf::from(&fd_link), s.path("ln"), PathBuf::from("/proc/self/cwd")] {
            refused("list", list_dir(&p, 1).map(drop));
            refused("watch", Watcher::new(&p, true).map(drop));
        }
        refused("mkdir", make_dir(&via("newdir"), USER).map(drop));
        refused("mkdir -p", make_dir(&ln("a/b"), USER).map(drop));
        refused("write new", write_chunk(&via("new"), 0, b"x", USER).map(drop));
        assert_eq!(fs::read(outside.path("secret")).unwrap(), b"s");
        let left: Vec<_> =
            fs::read_dir(&outside.0).unwrap().flatten().map(|e| e.file_name()).collect();
        assert_eq!(left, vec![std::ffi::OsString::from("secret")]);
        // The link itself may still be described (it is a name in the client's directory), and
        // listing its directory shows it without following it.
        assert_eq!(stat(&s.path("ln")).unwrap().kind, FileType::Symlink);
        assert_eq!(list_dir(&s.0, 3).unwrap().len(), 1);
        // A real symlink loop is still reported as one.
        symlink("loop", s.path("loop")).unwrap();
        assert_eq!(kind_of(read_chunk(&s.path("loop"), 0)), ErrorKind::InvalidArgument);
    }

    /// The agent is PID 1: its /proc entries (memory, descriptors, environment) are refused
    /// whichever way they are named, while the rest of /proc stays readable.
    #[test]
    fn the_agents_own_proc_entries_are_refused() {
        for p in ["/proc/1/mem", "/proc/1/environ", "/proc/1/fd", "/proc/1/task/1/maps"] {
            let p = Path::new(p);
            let e = read_chunk(p, 0).map(drop).and(list_dir(p, 1).map(drop)).unwrap_err();
            assert_eq!(e.kind, ErrorKind::PermissionDenied, "{p:?}: {e:?}");
        }
        assert_eq!(kind_of(stat(Path::new("/proc/1/fd/0"))), ErrorKind::PermissionDenied);
        assert_eq!(kind_of(stat(Path::new("/proc/1"))), ErrorKind::PermissionDenied);
        assert_eq!(kind_of(list_dir(Path::new("/proc/1/"), 1)), ErrorKind::PermissionDenied);
        assert!(read_chunk(Path::new("/proc/meminfo"), 0).unwrap().0.starts_with(b"MemTotal"));
        // Listing /proc shows PID 1's entry but does not descend into it.
        let all = list_dir(Path::new("/proc"), 2).unwrap();
        assert!(all.iter().any(|e| e.path == "/proc/1"));
        assert!(!all.iter().any(|e| e.path.starts_with("/proc/1/")));
    }

    #[test]
    fn watcher_errors() {
        let s = Scratch::new("watcherr");
        fs::write(s.path("f"), b"").unwrap();
        assert_eq!(kind_of(Watcher::new(&s.path("f"), true)), ErrorKind::NotADirectory);
        assert_eq!(kind_of(Watcher::new(&s.path("missing"), false)), ErrorKind::NotFound);
        let w = Watcher::new(&s.0, false).unwrap();
        assert_eq!(w.fd().as_raw_fd(), w.as_raw_fd());
    }
}
