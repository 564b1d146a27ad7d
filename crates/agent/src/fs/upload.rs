//! Uploads: the bytes go to a temporary file in the target's directory, which replaces the
//! target in one rename at commit, so an upload cut short leaves the target as it was.

use super::*;

/// Most uploads one agent keeps in progress at once: each holds two descriptors.
pub const MAX_UPLOADS: usize = 64;

/// Symlinks followed from an upload's target, as the kernel would when opening it.
const MAX_LINK_HOPS: usize = 40;

/// An upload in progress: the content goes to a temporary file in the target's directory and
/// replaces the target only at [`Upload::commit`].
///
/// The temporary file is unnamed (`O_TMPFILE`) wherever the filesystem allows, so it is never
/// visible and vanishes with its descriptor, whatever happens to the agent. Where `O_TMPFILE` is
/// not supported it gets a hidden name, removed when the upload is dropped uncommitted. Either
/// way the file is named only for the instant of the commit (link, then rename over the target).
#[derive(Debug)]
pub struct Upload {
    /// The target as the client named it (resolved), for the entry reported at commit.
    path: PathBuf,
    /// The directory the file goes to, opened at begin: the commit lands there even if the
    /// path to it is changed in between.
    dir: File,
    /// The target's name in `dir` (after following a symlink at the target, as `open` would).
    name: std::ffi::OsString,
    file: File,
    written: u64,
    /// Owner, group and mode to give the file: the replaced file's, or the user's with 0644 for
    /// a new one.
    owner: (u32, u32, u32),
    /// Whether a file was there to replace when the upload began.
    replaces: bool,
    /// The temporary file's name in `dir` while it has one; unlinked on drop.
    temp_name: Option<std::ffi::OsString>,
}

impl Drop for Upload {
    fn drop(&mut self) {
        if let Some(name) = self.temp_name.take() {
            let _ = nix::unistd::unlinkat(
                self.dir.as_fd(),
                name.as_os_str(),
                nix::unistd::UnlinkatFlags::NoRemoveDir,
            );
        }
    }
}

/// What marks an upload's temporary names. Watches leave such names out and report the rename
/// that commits an upload as the in-place write clients expect (see [`CommitKind`]).
const UPLOAD_MARKER: &str = ".ringfence-upload-";

/// A name for the temporary file that no client names by accident; `n` varies it on collision
/// and `tag` says what the name is for.
fn temp_name(target: &std::ffi::OsStr, n: u32, tag: &str) -> std::ffi::OsString {
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let mut name = std::ffi::OsString::from(".");
    name.push(target);
    name.push(format!("{UPLOAD_MARKER}{}-{stamp:08x}-{n}.{tag}", std::process::id()));
    name
}

/// How a committed upload changed its target, carried in the name it is committed from, so a
/// watch reports what an in-place write would have: clients (and E2B's SDK tests) expect a
/// create and a write, not a rename from a name they never saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum CommitKind {
    /// A new file: created, given its owner, written (unless empty).
    New { empty: bool },
    /// An existing file replaced: written.
    Replace,
}

impl CommitKind {
    fn tag(self) -> &'static str {
        match self {
            CommitKind::New { empty: false } => "new",
            CommitKind::New { empty: true } => "new-empty",
            CommitKind::Replace => "replace",
        }
    }

    /// The kind of the commit name `name`; `None` for any other name.
    pub(super) fn of(name: &std::ffi::OsStr) -> Option<CommitKind> {
        let name = name.to_str()?;
        if !name.contains(UPLOAD_MARKER) {
            return None;
        }
        match name.rsplit('.').next()? {
            "new" => Some(CommitKind::New { empty: false }),
            "new-empty" => Some(CommitKind::New { empty: true }),
            "replace" => Some(CommitKind::Replace),
            _ => None,
        }
    }

    /// The events an in-place write would have produced.
    pub(super) fn events(self) -> &'static [FsEventKind] {
        match self {
            CommitKind::New { empty: false } => {
                &[FsEventKind::Create, FsEventKind::Chmod, FsEventKind::Write]
            }
            CommitKind::New { empty: true } => &[FsEventKind::Create, FsEventKind::Chmod],
            CommitKind::Replace => &[FsEventKind::Write],
        }
    }
}

/// Whether `name` is an upload's temporary name.
pub(super) fn is_upload_temp(name: &std::ffi::OsStr) -> bool {
    name.to_str().is_some_and(|n| n.contains(UPLOAD_MARKER))
}

/// Whether an event names an unnamed temporary file: the kernel reports changes to an
/// `O_TMPFILE` file in its directory's watch as `#<inode>`. Only a name of that shape with no
/// such entry in the directory counts, so a client's own file called `#16` is still reported
/// (unless it is gone by the time its events are read).
pub(super) fn is_unnamed_temp(name: &std::ffi::OsStr, dir: &Path) -> bool {
    let Some(digits) = name.to_str().and_then(|n| n.strip_prefix('#')) else { return false };
    !digits.is_empty()
        && digits.bytes().all(|b| b.is_ascii_digit())
        && fs::symlink_metadata(dir.join(name)).is_err_and(|e| e.kind() == io::ErrorKind::NotFound)
}

/// Follows symlinks at `path` itself (its parents are resolved by the kernel), returning the
/// path that an `open` with `O_CREAT` would write and what is there now.
fn final_target(path: &Path) -> Result<(PathBuf, Option<Metadata>), AgentError> {
    let mut cur = path.to_path_buf();
    for _ in 0..MAX_LINK_HOPS {
        match fs::symlink_metadata(&cur) {
            Ok(md) if md.file_type().is_symlink() => {
                let link = fs::read_link(&cur).map_err(|e| map_io(e, &cur))?;
                cur = match cur.parent() {
                    Some(parent) if link.is_relative() => parent.join(link),
                    _ => link,
                };
            }
            Ok(md) => return Ok((cur, Some(md))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((cur, None)),
            Err(e) => return Err(map_io(e, &cur)),
        }
    }
    Err(map_io(io::Error::from_raw_os_error(libc::ELOOP), path))
}

impl Upload {
    /// Starts an upload to `path`: creates missing parents (owned by `user`), checks that the
    /// target can be replaced by a regular file, and opens the temporary file. Returns the
    /// upload and the bytes free on the target's filesystem.
    pub fn begin(path: &Path, user: SandboxUser) -> Result<(Upload, u64), AgentError> {
        if let Some(parent) = path.parent() {
            create_dirs(parent, user)?;
        }
        let (target, existing) = final_target(path)?;
        if let Some(md) = &existing {
            require_regular(md, path)?;
        }
        let (Some(parent), Some(name)) = (target.parent(), target.file_name()) else {
            return Err(error(
                ErrorKind::IsADirectory,
                format!("is a directory: {}", path.display()),
            ));
        };
        // Resolved like every other client path: no magic links, not the agent's own /proc.
        let dir = File::from(open_checked(parent, OFlag::O_RDONLY | OFlag::O_DIRECTORY, 0)?);
        let free = nix::sys::statvfs::fstatvfs(&dir)
            .map(|st| st.blocks_available().saturating_mul(st.fragment_size()))
            .map_err(|e| map_io(e.into(), parent))?;
        let owner = match &existing {
            // The replaced file keeps its owner and mode, as an in-place write would have.
            Some(md) => (md.uid(), md.gid(), md.mode() & 0o7777),
            None => (user.uid(), user.uid(), FILE_MODE),
        };
        let (file, temp_name) = open_temp(&dir, name, parent)?;
        let upload = Upload {
            path: path.to_path_buf(),
            dir,
            name: name.to_os_string(),
            file,
            written: 0,
            owner,
            replaces: existing.is_some(),
            temp_name,
        };
        Ok((upload, free))
    }

    /// Appends `data`, which the host sends for `offset`.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), AgentError> {
        if offset != self.written {
            return Err(error(
                ErrorKind::InvalidArgument,
                format!(
                    "upload piece for offset {offset} does not follow the {} bytes written",
                    self.written
                ),
            ));
        }
        self.file.write_all_at(data, offset).map_err(|e| map_io(e, &self.path))?;
        self.written += data.len() as u64;
        Ok(())
    }

    /// Gives the file its owner, mode and metadata, and puts it in place of the target in one
    /// rename. On failure the target is untouched and the temporary file goes with `self`.
    pub fn commit(mut self, metadata: &BTreeMap<String, String>) -> Result<EntryInfo, AgentError> {
        let path = self.path.clone();
        for key in metadata.keys() {
            if key.is_empty() || key.contains('\0') {
                return Err(error(
                    ErrorKind::InvalidArgument,
                    format!("invalid metadata key {key:?}"),
                ));
            }
        }
        let (uid, gid, mode) = self.owner;
        std::os::unix::fs::fchown(&self.file, Some(uid), Some(gid))
            .map_err(|e| map_io(e, &path))?;
        // After the chown, which clears set-id bits.
        self.file.set_permissions(Permissions::from_mode(mode)).map_err(|e| map_io(e, &path))?;
        let kind = if self.replaces {
            CommitKind::Replace
        } else {
            CommitKind::New { empty: self.written == 0 }
        };
        let temp = self.link_temp(kind)?;
        // Metadata is set through the directory held open, on the still-hidden file.
        let named = PathBuf::from(format!("/proc/self/fd/{}", self.dir.as_raw_fd())).join(&temp);
        for (key, value) in metadata {
            ringfence_sys::set_xattr(
                &named,
                &format!("{METADATA_PREFIX}{key}"),
                Some(value.as_bytes()),
            )
            .map_err(|e| metadata_io(e, &path))?;
        }
        nix::fcntl::renameat(
            self.dir.as_fd(),
            temp.as_os_str(),
            self.dir.as_fd(),
            self.name.as_os_str(),
        )
        .map_err(|e| map_io(e.into(), &path))?;
        self.temp_name = None;
        let md = self.file.metadata().map_err(|e| map_io(e, &path))?;
        let mut info = entry(&path, &path, &md);
        info.kind = FileType::File;
        info.symlink_target = None;
        info.metadata = metadata.clone();
        Ok(info)
    }

    /// Gives the file its commit name in its directory (naming `kind`), so it can be renamed
    /// over the target: `linkat` cannot replace an existing name. An unnamed file is linked
    /// there; one that already has a temporary name is renamed to it.
    fn link_temp(&mut self, kind: CommitKind) -> Result<std::ffi::OsString, AgentError> {
        // Linking through /proc needs no capability, unlike AT_EMPTY_PATH on older kernels.
        let source = format!("/proc/self/fd/{}", self.file.as_raw_fd());
        for n in 0..100 {
            let name = temp_name(&self.name, n, kind.tag());
            let result = match &self.temp_name {
                // renameat2's RENAME_NOREPLACE is not in nix's safe API; the name is unique
                // enough that plain rename is only racing the sandbox's own processes, which
                // could as well write to the target directly.
                Some(old) => nix::fcntl::renameat(
                    self.dir.as_fd(),
                    old.as_os_str(),
                    self.dir.as_fd(),
                    name.as_os_str(),
                ),
                None => nix::unistd::linkat(
                    nix::fcntl::AT_FDCWD,
                    source.as_str(),
                    self.dir.as_fd(),
                    name.as_os_str(),
                    nix::fcntl::AtFlags::AT_SYMLINK_FOLLOW,
                ),
            };
            match result {
                Ok(()) => {
                    self.temp_name = Some(name.clone());
                    return Ok(name);
                }
                Err(Errno::EEXIST) => continue,
                Err(e) => return Err(map_io(e.into(), &self.path)),
            }
        }
        Err(error(ErrorKind::Internal, "no free temporary name".into()))
    }
}

/// Opens the temporary file of an upload in `dir`: unnamed where the filesystem supports it,
/// else under a hidden name (returned, to be removed if the upload does not complete).
fn open_temp(
    dir: &File,
    target: &std::ffi::OsStr,
    dir_path: &Path,
) -> Result<(File, Option<std::ffi::OsString>), AgentError> {
    use nix::fcntl::OFlag;
    use nix::sys::stat::Mode;
    let mode = Mode::from_bits_truncate(0o600);
    match nix::fcntl::openat(
        dir.as_fd(),
        ".",
        OFlag::O_TMPFILE | OFlag::O_WRONLY | OFlag::O_CLOEXEC,
        mode,
    ) {
        Ok(fd) => return Ok((File::from(fd), None)),
        // Filesystems without O_TMPFILE answer EOPNOTSUPP (old kernels: EISDIR or EINVAL).
        Err(Errno::EOPNOTSUPP | Errno::EISDIR | Errno::EINVAL) => {}
        Err(e) => return Err(map_io(e.into(), dir_path)),
    }
    for n in 0..100 {
        let name = temp_name(target, n, "part");
        let flags =
            OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_WRONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        match nix::fcntl::openat(dir.as_fd(), name.as_os_str(), flags, mode) {
            Ok(fd) => return Ok((File::from(fd), Some(name))),
            Err(Errno::EEXIST) => continue,
            Err(e) => return Err(map_io(e.into(), dir_path)),
        }
    }
    Err(error(ErrorKind::Internal, format!("no free temporary name in {}", dir_path.display())))
}
