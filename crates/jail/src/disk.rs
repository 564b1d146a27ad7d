//! Sandbox disks: each sandbox's writable layer on a filesystem of its own, on disk.
//!
//! A sandbox's writable layer used to be a tmpfs inside its mount namespace: tmpfs pages are
//! memory, charged to the sandbox's cgroup and never reclaimable without swap, so a sandbox with
//! `--disk 1G --memory 512M` was OOM-killed (PID 1 included) long before its disk was full.
//!
//! Here every sandbox gets an ext4 filesystem image of exactly its quota: a sparse file under
//! `<data-dir>/disks/<id>.img`, attached to a loop device (direct I/O, auto-clearing) and mounted
//! at `<data-dir>/disks/<id>/`, which holds the overlay's `upper/` and `work/`. So:
//! - the quota is the filesystem's size: a write beyond it fails with ENOSPC, and `df` inside
//!   shows the quota;
//! - what a sandbox writes is page cache, reclaimable (written back to the image) under its
//!   memory limit instead of pinned by it;
//! - the host reads the upper layer at a host path (snapshots, pauses), so the agent keeps no
//!   descriptor that leads outside the sandbox.
//!
//! Why not one filesystem with project quotas (the cheaper design: a directory and two syscalls
//! per sandbox)? Neither XFS nor ext4 can enforce project quotas on a kernel built without
//! `CONFIG_XFS_QUOTA` and `CONFIG_QFMT_V2`, which is what this project's kernel is; per-sandbox
//! images need only the loop driver and ext4.
//!
//! Making an image costs no `mkfs` per sandbox: one template image per size is formatted once
//! (`.templates/ext4-<bytes>.img`, about 0.6 MiB of data in a sparse file) and each sandbox's
//! image is a sparse copy of it. Removing a disk shuts its filesystem down first
//! (`FS_IOC_SHUTDOWN`), so what the sandbox left in the page cache is dropped, not written out.
//!
//! Ownership: a [`Disk`] holds an exclusive `flock` on its image for as long as it lives, so a
//! disk whose owner died (a SIGKILLed `ringfence run`, a crashed server whose sandboxes did not
//! come back) is recognisable and [`DiskPool::sweep`] removes it, while a server that restarts
//! re-takes the locks of the sandboxes it re-attaches ([`DiskPool::adopt`]) before sweeping.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use nix::fcntl::{Flock, FlockArg};
use nix::mount::{MntFlags, MsFlags, mount, umount2};

/// Errors making, adopting or removing a disk; each names what it was doing.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("disk: {op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("disk: {0}")]
    Sys(#[from] ringfence_sys::SysError),
    #[error("disk: formatting a template image with mkfs.ext4 failed: {0}")]
    Mkfs(String),
    #[error("disk: the disk of sandbox {0} is in use by another process")]
    InUse(String),
    #[error("disk: {0:?} is not a valid sandbox id for a disk")]
    BadId(String),
}

fn io_at<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> DiskError + 'a {
    move |source| DiskError::Io { op, path: path.to_path_buf(), source }
}

fn nix_at<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(nix::Error) -> DiskError + 'a {
    move |e| DiskError::Io { op, path: path.to_path_buf(), source: e.into() }
}

/// Where the writable layers of sandboxes live, when they live on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskBackend {
    /// One ext4 image per sandbox under this pool (see the module documentation).
    Image(DiskPool),
    /// A tmpfs inside the sandbox: no host state, but charged to the sandbox's memory (hosts
    /// without loop devices or ext4). The quota still holds, the separation from memory does not.
    Tmpfs,
}

impl DiskBackend {
    /// "image" or "tmpfs", for logs, reports and metrics.
    pub fn name(&self) -> &'static str {
        match self {
            DiskBackend::Image(_) => "image",
            DiskBackend::Tmpfs => "tmpfs",
        }
    }
}

/// What the operator asked for (`--disk-backend`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DiskChoice {
    /// Images where the host can make them, else tmpfs with a warning.
    #[default]
    Auto,
    /// Images or nothing: failing to make one is an error.
    Image,
    /// tmpfs, charged to memory (for hosts, or measurements, that want it).
    Tmpfs,
}

impl std::str::FromStr for DiskChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(DiskChoice::Auto),
            "image" => Ok(DiskChoice::Image),
            "tmpfs" => Ok(DiskChoice::Tmpfs),
            _ => Err(format!("invalid disk backend {s:?}: expected auto, image or tmpfs")),
        }
    }
}

/// The warning that goes with the tmpfs backend.
pub const TMPFS_WARNING: &str = "sandbox disks are tmpfs: what a sandbox writes counts against \
     its memory limit, so filling its disk can get its processes OOM-killed";

impl DiskChoice {
    /// Settles the choice for `data_dir`. `probe`: check by making and removing a disk (the
    /// server, once at start); otherwise only check that the pieces exist (one-shot runs, where
    /// a failing image is then reported as a setup failure). Returns the backend and, when it
    /// is tmpfs, why (for a warning).
    pub fn resolve(
        self,
        data_dir: &Path,
        probe: bool,
    ) -> Result<(DiskBackend, Option<String>), DiskError> {
        let pool = DiskPool::new(data_dir);
        match self {
            DiskChoice::Tmpfs => Ok((DiskBackend::Tmpfs, Some("--disk-backend tmpfs".into()))),
            DiskChoice::Image => {
                if probe {
                    pool.probe()?;
                } else {
                    pool.available()?;
                }
                Ok((DiskBackend::Image(pool), None))
            }
            DiskChoice::Auto => {
                let ok = if probe { pool.probe() } else { pool.available() };
                match ok {
                    Ok(()) => Ok((DiskBackend::Image(pool), None)),
                    Err(e) => Ok((DiskBackend::Tmpfs, Some(e.to_string()))),
                }
            }
        }
    }
}

/// The directory of sandbox disks (`<data-dir>/disks`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskPool {
    dir: PathBuf,
    /// How many made-ahead disks of a size to keep (see [`DiskPool::replenish`]); 0: none.
    spares: usize,
}

/// ext4 block size: also the loop device's logical block size, so direct I/O lines up.
const BLOCK: u64 = 4096;
/// Smallest disk an image can hold (the superblock, group descriptors, an inode table).
pub const MIN_IMAGE_BYTES: u64 = 1 << 20;

/// A sandbox's disk, mounted. Dropping it removes the filesystem, the image and the mount point.
#[derive(Debug)]
pub struct Disk {
    id: String,
    root: PathBuf,
    image: PathBuf,
    /// The image, open and exclusively locked: the lock says someone owns this disk.
    _lock: Flock<File>,
    /// After [`Disk::detach`]: the filesystem's root, open (the host's only way to it).
    held: Option<File>,
    /// Taken from the disks made ahead ([`DiskPool::with_spares`]).
    made_ahead: bool,
    /// Tests only: let go of the lock and leave everything in place, as a dying owner does.
    #[cfg(test)]
    keep: bool,
}

impl Disk {
    /// The mounted filesystem's root (holds `upper/` and `work/`).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The sandbox's upper layer, as the host reaches it.
    pub fn upper(&self) -> PathBuf {
        match &self.held {
            Some(f) => {
                PathBuf::from(format!("/proc/self/fd/{}/upper", std::os::fd::AsRawFd::as_raw_fd(f)))
            }
            None => self.root.join("upper"),
        }
    }

    /// Takes the disk out of the host's mount namespace once the sandbox has bound it into its
    /// own: for sandboxes whose disk no other host process will look for (one-shot runs). The
    /// filesystem then lives in the sandbox's namespace and this handle only, so it goes with
    /// the sandbox even if this process is SIGKILLed (only the image file is left, for a
    /// sweep), and it adds no mount for other sandboxes' namespaces to copy.
    pub fn detach(&mut self) -> Result<(), DiskError> {
        if self.held.is_some() {
            return Ok(());
        }
        let root = File::open(&self.root).map_err(io_at("open", &self.root))?;
        umount2(&self.root, MntFlags::MNT_DETACH).map_err(nix_at("unmount", &self.root))?;
        self.held = Some(root);
        fs::remove_dir(&self.root).map_err(io_at("rmdir", &self.root))
    }

    /// Leaves the disk in place and closes the lock's descriptor without unlocking: what a
    /// process that dies leaves behind.
    #[cfg(test)]
    fn forget(mut self) {
        self.keep = true;
        let raw = std::os::fd::AsRawFd::as_raw_fd(&*self._lock);
        std::mem::forget(self);
        let _ = nix::unistd::close(raw);
    }

    /// Whether this disk was made ahead of its claim (a spare), for reports.
    pub fn made_ahead(&self) -> bool {
        self.made_ahead
    }

    /// (used, total) bytes of the filesystem: what `df` inside the sandbox shows.
    pub fn usage(&self) -> Option<(u64, u64)> {
        let st = match &self.held {
            Some(f) => nix::sys::statvfs::fstatvfs(f).ok()?,
            None => nix::sys::statvfs::statvfs(&self.root).ok()?,
        };
        let frag = st.fragment_size().max(1);
        let total = st.blocks().saturating_mul(frag);
        let free = st.blocks_free().saturating_mul(frag);
        Some((total.saturating_sub(free), total))
    }
}

impl Disk {
    fn new(id: &str, root: PathBuf, image: PathBuf, lock: Flock<File>) -> Disk {
        Disk {
            id: id.to_string(),
            root,
            image,
            _lock: lock,
            held: None,
            made_ahead: false,
            #[cfg(test)]
            keep: false,
        }
    }
}

impl Drop for Disk {
    fn drop(&mut self) {
        #[cfg(test)]
        if self.keep {
            return;
        }
        // Detached: the filesystem goes when this last handle closes (the sandbox is gone by
        // now); first dropping what it would otherwise write out, as for a mounted one.
        if let Some(f) = self.held.take()
            && f.metadata()
                .ok()
                .and_then(|m| pending_blocks(m.dev()))
                .is_none_or(|b| b > SHUTDOWN_ABOVE_BLOCKS)
        {
            let _ = ringfence_sys::fs_shutdown(&f);
        }
        if let Err(e) = remove(&self.root, &self.image) {
            tracing::warn!(sandbox_id = %self.id, error = %e, "removing the sandbox's disk");
        }
    }
}

/// Shuts down and unmounts the filesystem at `root` (if mounted), then removes the mount point
/// and the image. The caller holds the image's lock, or knows its owner is dead.
fn remove(root: &Path, image: &Path) -> Result<(), DiskError> {
    remove_with(root, image, false)
}

fn remove_with(root: &Path, image: &Path, always_shut_down: bool) -> Result<(), DiskError> {
    if is_mountpoint(root) {
        // Dropping the page cache instead of writing it to an image about to be deleted: the
        // unmount of a disk full of dirty pages takes milliseconds instead of seconds. Only
        // when there is much to drop: the kernel logs every shutdown on the console, which
        // costs more (0.5 ms on a serial console) than unmounting a disk with little dirty.
        let pending = fs::metadata(root).ok().and_then(|m| pending_blocks(m.dev()));
        if (always_shut_down || pending.is_none_or(|b| b > SHUTDOWN_ABOVE_BLOCKS))
            && let Ok(d) = File::open(root)
        {
            let _ = ringfence_sys::fs_shutdown(&d);
        }
        // Detached: a sandbox namespace that still holds the filesystem (being torn down by
        // the kernel) does not make the host's unmount fail; the loop device clears itself
        // once the last holder lets go.
        umount2(root, MntFlags::MNT_DETACH).map_err(nix_at("unmount", root))?;
    }
    match fs::remove_dir(root) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_at("rmdir", root)(e)),
    }
    match fs::remove_file(image) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_at("remove", image)(e)),
    }
}

/// In the spares' directory: held by whoever is making spares (see [`DiskPool::replenish`]).
/// Its name parses as neither a spare's image nor a mount point, so sweeps pass it by.
const MAKER_LOCK: &str = ".maker.lock";

/// Dirty data (4 KiB blocks) above which a disk is shut down rather than unmounted with it.
const SHUTDOWN_ABOVE_BLOCKS: u64 = 1024;

/// Blocks the ext4 filesystem on device `dev` has written to but not yet allocated (delayed
/// allocation: most of what a sandbox wrote and the kernel has not written back yet).
fn pending_blocks(dev: u64) -> Option<u64> {
    let (major, minor) = (nix::sys::stat::major(dev), nix::sys::stat::minor(dev));
    let link = fs::read_link(format!("/sys/dev/block/{major}:{minor}")).ok()?;
    let name = link.file_name()?.to_str()?.to_string();
    let text = fs::read_to_string(format!("/sys/fs/ext4/{name}/delayed_allocation_blocks")).ok()?;
    text.trim().parse().ok()
}

/// Whether `dir` is the root of a mount (its device differs from its parent's).
fn is_mountpoint(dir: &Path) -> bool {
    let (Ok(m), Some(parent)) = (fs::symlink_metadata(dir), dir.parent()) else { return false };
    m.is_dir() && fs::metadata(parent).is_ok_and(|p| p.dev() != m.dev())
}

/// Sandbox ids become file names here: only the characters ids are made of.
fn check_id(id: &str) -> Result<(), DiskError> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && !id.starts_with('.')
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok { Ok(()) } else { Err(DiskError::BadId(id.to_string())) }
}

fn lock_exclusive(file: File) -> Option<Flock<File>> {
    Flock::lock(file, FlockArg::LockExclusiveNonblock).ok()
}

impl DiskPool {
    /// The pool under `data_dir` (nothing is created until the first disk).
    pub fn new(data_dir: &Path) -> DiskPool {
        DiskPool { dir: data_dir.join("disks"), spares: 0 }
    }

    /// The same pool, keeping `n` disks of each size a claim asked for made ahead: a claim then
    /// takes one (an `flock` and three `chown`s) instead of copying an image, attaching a loop
    /// device and mounting it (about 2 ms of a one-shot run's start), and the caller makes
    /// the next one with [`DiskPool::replenish`] while its sandbox runs. Only for disks that
    /// are detached before anyone could adopt them ([`Disk::detach`]): a spare's mount point
    /// is not named after its sandbox.
    pub fn with_spares(mut self, n: usize) -> DiskPool {
        self.spares = n;
        self
    }

    /// The pool's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn image_path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.img"))
    }

    fn ensure_dirs(&self) -> Result<(), DiskError> {
        let templates = self.dir.join(".templates");
        if templates.is_dir() {
            return Ok(());
        }
        fs::create_dir_all(&templates).map_err(io_at("mkdir", &templates))?;
        // Sandbox agents (unmapped "others" here) must traverse to bind their own disk, never
        // list the directory or reach the templates.
        fs::set_permissions(&self.dir, fs::Permissions::from_mode(0o711))
            .map_err(io_at("chmod", &self.dir))?;
        fs::set_permissions(&templates, fs::Permissions::from_mode(0o700))
            .map_err(io_at("chmod", &templates))
    }

    /// Cheap check that the pieces for disks exist: the loop driver's control device, and
    /// mkfs.ext4 (or an image formatted earlier).
    pub fn available(&self) -> Result<(), DiskError> {
        let ctl = Path::new("/dev/loop-control");
        if !ctl.exists() {
            return Err(io_at("open", ctl)(io::Error::from(io::ErrorKind::NotFound)));
        }
        let formatted = fs::read_dir(self.dir.join(".templates")).is_ok_and(|mut rd| {
            rd.any(|e| e.is_ok_and(|e| !e.file_name().to_string_lossy().starts_with('.')))
        });
        if !formatted && !mkfs_program().is_absolute() {
            return Err(DiskError::Mkfs("mkfs.ext4 not found (install e2fsprogs)".into()));
        }
        Ok(())
    }

    /// Checks that this host can make disks, by making and removing one. Returns why not.
    pub fn probe(&self) -> Result<(), DiskError> {
        let id = format!("probe-{}", std::process::id());
        drop(self.claim(&id, 16 << 20, 0)?);
        Ok(())
    }

    /// Makes and mounts a disk of `bytes` for sandbox `id`, its root, `upper/` and `work/`
    /// owned by `owner` (the host uid the sandbox's root maps to), no one else allowed in.
    /// A leftover disk of the same id whose owner is gone (a sandbox resumed under its old id)
    /// is removed first.
    pub fn claim(&self, id: &str, bytes: u64, owner: u32) -> Result<Disk, DiskError> {
        check_id(id)?;
        self.ensure_dirs()?;
        let bytes = bytes.max(MIN_IMAGE_BYTES).div_ceil(BLOCK) * BLOCK;
        let image = self.image_path(id);
        let root = self.dir.join(id);
        if image.exists() || root.exists() {
            self.remove_if_orphan(id)?;
        }
        if self.spares > 0
            && let Some(disk) = self.take_spare(id, bytes, owner)?
        {
            return Ok(disk);
        }
        let template = self.template(bytes)?;
        let lock = self.create_image(&template, &image, bytes)?;
        match mount_image(lock.as_fd(), &root, owner) {
            Ok(()) => Ok(Disk::new(id, root, image, lock)),
            Err(e) => {
                let _ = remove(&root, &image);
                Err(e)
            }
        }
    }

    /// Takes over the disk of sandbox `id` that an earlier process made (a server restart).
    /// `None` if it has none (started with the tmpfs backend, or its disk was swept).
    pub fn adopt(&self, id: &str) -> Result<Option<Disk>, DiskError> {
        check_id(id)?;
        let image = self.image_path(id);
        let root = self.dir.join(id);
        let file = match OpenOptions::new().read(true).write(true).open(&image) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_at("open", &image)(e)),
        };
        let lock = lock_exclusive(file).ok_or_else(|| DiskError::InUse(id.to_string()))?;
        // A disk that was made ahead is still mounted where it was made (by its image's inode).
        let root = match lock.metadata() {
            Ok(m) if !is_mountpoint(&root) && is_mountpoint(&self.spare_root(m.ino())) => {
                self.spare_root(m.ino())
            }
            _ => root,
        };
        if !is_mountpoint(&root) {
            // The filesystem is gone (host reboot): what is left is an orphan image.
            let _ = remove(&root, &image);
            return Ok(None);
        }
        Ok(Some(Disk::new(id, root, image, lock)))
    }

    /// Removes the disk of `id` if no one holds it.
    fn remove_if_orphan(&self, id: &str) -> Result<(), DiskError> {
        let image = self.image_path(id);
        let root = self.dir.join(id);
        let lock = match OpenOptions::new().read(true).write(true).open(&image) {
            Ok(f) => Some(lock_exclusive(f).ok_or_else(|| DiskError::InUse(id.to_string()))?),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(io_at("open", &image)(e)),
        };
        let r = remove(&root, &image);
        drop(lock);
        r
    }

    /// Removes every disk whose owner is gone (its image unlocked), and mount points left
    /// without an image. Returns how many disks were removed. Disks of live sandboxes, in this
    /// process or any other, are locked and left alone.
    pub fn sweep(&self) -> Result<usize, DiskError> {
        let Ok(entries) = fs::read_dir(&self.dir) else { return Ok(0) };
        let mut removed = 0;
        let mut dirs = Vec::new();
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                continue;
            }
            if let Some(id) = name.strip_suffix(".img") {
                if check_id(id).is_ok() && self.remove_if_orphan(id).is_ok() {
                    removed += 1;
                }
            } else if entry.file_type().is_ok_and(|t| t.is_dir()) {
                dirs.push(name);
            }
        }
        // A mount point whose image is gone (removed above, or lost mid-teardown). Every live
        // disk's image exists before its mount point and outlives it, so this is never one.
        for name in dirs {
            let root = self.dir.join(&name);
            if check_id(&name).is_ok()
                && root.exists()
                && !self.image_path(&name).exists()
                && remove(&root, &self.image_path(&name)).is_ok()
            {
                removed += 1;
            }
        }
        Ok(removed + self.sweep_spares())
    }

    /// The formatted template image for disks of `bytes` (made once, under a lock, written
    /// beside its name and renamed, so a half-made template is never used).
    fn template(&self, bytes: u64) -> Result<PathBuf, DiskError> {
        let dir = self.dir.join(".templates");
        let path = dir.join(format!("ext4-i8192-{bytes}.img"));
        if path.exists() {
            return Ok(path);
        }
        let lock_path = dir.join(".lock");
        let lock_file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io_at("open", &lock_path))?;
        let _lock = Flock::lock(lock_file, FlockArg::LockExclusive)
            .map_err(|(_, e)| nix_at("flock", &lock_path)(e))?;
        if path.exists() {
            return Ok(path);
        }
        let tmp = dir.join(format!(".ext4-{bytes}.img.{}", std::process::id()));
        let f = File::create(&tmp).map_err(io_at("create", &tmp))?;
        f.set_len(bytes).map_err(io_at("size", &tmp))?;
        drop(f);
        let made = mkfs(&tmp);
        if let Err(e) = made {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        fs::rename(&tmp, &path).map_err(io_at("rename", &path))?;
        Ok(path)
    }

    /// A sparse copy of `template` at `image`, returned open and locked. The file is made
    /// unnamed (O_TMPFILE), locked, filled, and only then linked under its name, so no sweep
    /// can ever see it unlocked.
    fn create_image(
        &self,
        template: &Path,
        image: &Path,
        bytes: u64,
    ) -> Result<Flock<File>, DiskError> {
        let lock = new_image(&self.dir, template, bytes)?;
        link_image(&lock, image)?;
        Ok(lock)
    }

    fn spare_dir(&self) -> PathBuf {
        self.dir.join(".spare")
    }

    /// Where the spare whose image is inode `ino` is mounted (for as long as it lives: a mount
    /// point cannot be renamed, so a claimed spare keeps it until it is detached).
    fn spare_root(&self, ino: u64) -> PathBuf {
        self.spare_dir().join(format!("m{ino}"))
    }

    /// Spares of `bytes` ready to be claimed: `(inode, image path)`, by their names
    /// `<bytes>-<inode>.img`.
    fn spares_of(&self, bytes: u64) -> Vec<(u64, PathBuf)> {
        let Ok(entries) = fs::read_dir(self.spare_dir()) else { return Vec::new() };
        let prefix = format!("{bytes}-");
        entries
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                let ino = name.strip_prefix(&prefix)?.strip_suffix(".img")?.parse().ok()?;
                Some((ino, e.path()))
            })
            .collect()
    }

    /// Takes a made-ahead disk of `bytes` for sandbox `id`, if one is ready: its image is
    /// renamed to the sandbox's (under its lock, so exactly one claimant can) and its root,
    /// `upper/` and `work/` given to `owner`.
    fn take_spare(&self, id: &str, bytes: u64, owner: u32) -> Result<Option<Disk>, DiskError> {
        let image = self.image_path(id);
        for (ino, path) in self.spares_of(bytes) {
            let Ok(file) = OpenOptions::new().read(true).write(true).open(&path) else { continue };
            let Some(lock) = lock_exclusive(file) else { continue };
            // Another claimant that held the lock before us has renamed it away: not ours.
            if fs::rename(&path, &image).is_err() {
                continue;
            }
            let root = self.spare_root(ino);
            let same = lock.metadata().is_ok_and(|m| m.ino() == ino);
            if !same || !is_mountpoint(&root) {
                // Not what its name says (or its filesystem went with a reboot): discard it.
                let _ = remove(&root, &image);
                continue;
            }
            return match own_root(&root, owner, false) {
                Ok(()) => {
                    let mut disk = Disk::new(id, root, image, lock);
                    disk.made_ahead = true;
                    Ok(Some(disk))
                }
                Err(e) => {
                    let _ = remove(&root, &image);
                    Err(e)
                }
            };
        }
        Ok(None)
    }

    /// Makes spare disks of `bytes` until as many as [`DiskPool::with_spares`] asked for are
    /// ready; returns how many it made. A spare is made whole before it is seen: a locked,
    /// unnamed image, copied, attached and mounted (owned by root until claimed), then linked
    /// under its name and unlocked.
    pub fn replenish(&self, bytes: u64) -> Result<usize, DiskError> {
        if self.spares == 0 {
            return Ok(0);
        }
        let bytes = bytes.max(MIN_IMAGE_BYTES).div_ceil(BLOCK) * BLOCK;
        self.discard_spares_not_of(bytes);
        if self.spares_of(bytes).len() >= self.spares {
            return Ok(0);
        }
        self.ensure_dirs()?;
        let dir = self.spare_dir();
        match fs::create_dir(&dir) {
            Ok(()) => fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))
                .map_err(io_at("chmod", &dir))?,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io_at("mkdir", &dir)(e)),
        }
        // One maker at a time per data directory: spares being made are not seen until they
        // are whole, so makers side by side (one-shot runs ending close together) would each
        // make the full count. The next maker waits, then counts what the last one made.
        let lock_path = dir.join(MAKER_LOCK);
        let lock_file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&lock_path)
            .map_err(io_at("open", &lock_path))?;
        let _maker = Flock::lock(lock_file, FlockArg::LockExclusive)
            .map_err(|(_, e)| nix_at("flock", &lock_path)(e))?;
        let ready = self.spares_of(bytes).len();
        if ready >= self.spares {
            return Ok(0);
        }
        let template = self.template(bytes)?;
        let mut made = 0;
        for _ in ready..self.spares {
            let lock = new_image(&dir, &template, bytes)?;
            let ino = lock.metadata().map_err(io_at("stat new image in", &dir))?.ino();
            let root = self.spare_root(ino);
            let name = dir.join(format!("{bytes}-{ino}.img"));
            if let Err(e) = mount_image(lock.as_fd(), &root, 0) {
                // Its mount point, if made; the unnamed image goes with its descriptor.
                let _ = remove(&root, &name);
                return Err(e);
            }
            if let Err(e) = link_image(&lock, &name) {
                let _ = remove(&root, &name);
                return Err(e);
            }
            made += 1;
        }
        Ok(made)
    }

    /// Removes the spares of other sizes nobody is claiming: spares are kept for the size in
    /// use, so a host where runs change `--disk` holds at most one size's worth.
    fn discard_spares_not_of(&self, bytes: u64) {
        self.discard_free_spares(Some(bytes));
    }

    /// Removes every spare nobody is claiming (a server shutting down, `ringfence gc`): a
    /// spare is a mounted filesystem and a loop device, which would otherwise keep the data
    /// directory from being removed. Returns how many it removed.
    pub fn discard_spares(&self) -> usize {
        self.discard_free_spares(None)
    }

    fn discard_free_spares(&self, keep: Option<u64>) -> usize {
        let Ok(entries) = fs::read_dir(self.spare_dir()) else { return 0 };
        let keep = keep.map(|b| format!("{b}-"));
        let mut removed = 0;
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(ino) = name
                .strip_suffix(".img")
                .filter(|n| keep.as_ref().is_none_or(|k| !n.starts_with(k.as_str())))
                .and_then(|n| n.rsplit_once('-'))
                .and_then(|(_, i)| i.parse::<u64>().ok())
            else {
                continue;
            };
            let path = e.path();
            let Ok(f) = OpenOptions::new().read(true).write(true).open(&path) else { continue };
            if let Some(_lock) = lock_exclusive(f)
                && remove(&self.spare_root(ino), &path).is_ok()
            {
                removed += 1;
            }
        }
        removed
    }

    /// Removes spares that cannot be used (their filesystem gone) and the mount points of
    /// claimed spares whose owner is gone; spares ready to be claimed, and claimed ones whose
    /// owner lives, are left. Returns how many it removed.
    fn sweep_spares(&self) -> usize {
        let dir = self.spare_dir();
        let Ok(entries) = fs::read_dir(&dir) else { return 0 };
        let (mut images, mut roots) = (Vec::new(), Vec::new());
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(ino) = name.strip_prefix('m').and_then(|n| n.parse::<u64>().ok()) {
                roots.push(ino);
            } else if let Some(ino) = name
                .strip_suffix(".img")
                .and_then(|n| n.rsplit_once('-'))
                .and_then(|(_, i)| i.parse::<u64>().ok())
            {
                images.push((ino, e.path()));
            }
        }
        let mut removed = 0;
        for (ino, path) in &images {
            let root = self.spare_root(*ino);
            let Ok(f) = OpenOptions::new().read(true).write(true).open(path) else { continue };
            // Locked: a claim is taking it right now.
            let Some(_lock) = lock_exclusive(f) else { continue };
            if !is_mountpoint(&root) && remove(&root, path).is_ok() {
                removed += 1;
            }
        }
        // A mount point without a spare image belongs to a claimed spare: its image now has the
        // sandbox's name (same inode), locked while its owner lives.
        let claimed: Vec<(u64, PathBuf)> = fs::read_dir(&self.dir)
            .map(|rd| {
                rd.flatten()
                    .filter(|e| e.file_name().to_string_lossy().ends_with(".img"))
                    .filter_map(|e| Some((e.metadata().ok()?.ino(), e.path())))
                    .collect()
            })
            .unwrap_or_default();
        for ino in roots {
            if images.iter().any(|(i, _)| *i == ino) {
                continue;
            }
            let live = claimed.iter().any(|(i, path)| {
                *i == ino
                    && OpenOptions::new()
                        .read(true)
                        .write(true)
                        .open(path)
                        .ok()
                        .is_some_and(|f| lock_exclusive(f).is_none())
            });
            // Its image (if any) is removed by the sweep of sandbox disks.
            if !live && remove(&self.spare_root(ino), &dir.join(".none")).is_ok() {
                removed += 1;
            }
        }
        removed
    }
}

/// A new unnamed image in `dir` (an `O_TMPFILE`, so a crash leaves nothing), locked, holding
/// a sparse copy of `template`.
fn new_image(dir: &Path, template: &Path, bytes: u64) -> Result<Flock<File>, DiskError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_TMPFILE)
        .open(dir)
        .map_err(io_at("create image in", dir))?;
    let lock = lock_exclusive(file).ok_or_else(|| DiskError::InUse(dir.display().to_string()))?;
    let src = File::open(template).map_err(io_at("open", template))?;
    copy_sparse(&src, &lock, bytes).map_err(io_at("copy template to image in", dir))?;
    Ok(lock)
}

/// Gives the unnamed image `lock` holds the name `image`.
fn link_image(lock: &Flock<File>, image: &Path) -> Result<(), DiskError> {
    // Linking an O_TMPFILE into place goes through its /proc/self/fd name.
    let fd_path = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&**lock));
    nix::unistd::linkat(
        nix::fcntl::AT_FDCWD,
        fd_path.as_str(),
        nix::fcntl::AT_FDCWD,
        image,
        nix::fcntl::AtFlags::AT_SYMLINK_FOLLOW,
    )
    .map_err(nix_at("link", image))
}

/// Copies the data extents of `src` into `dst` (which becomes `len` long); holes stay holes
/// (a disk image is mostly holes: a plain copy would write gigabytes of zeroes). Also the
/// microvm tier's copy of a guest's disk.
pub fn copy_sparse(src: &File, dst: &File, len: u64) -> io::Result<()> {
    use nix::unistd::{Whence, lseek};
    use std::io::{Read, Seek, SeekFrom};
    dst.set_len(len)?;
    let end = i64::try_from(len).map_err(io::Error::other)?;
    let mut at = 0i64;
    while at < end {
        let data = match lseek(src.as_fd(), at, Whence::SeekData) {
            Ok(d) => d,
            Err(nix::Error::ENXIO) => break,
            Err(e) => return Err(e.into()),
        };
        let hole = lseek(src.as_fd(), data, Whence::SeekHole)?.min(end);
        let start = u64::try_from(data).map_err(io::Error::other)?;
        let count = u64::try_from(hole - data).map_err(io::Error::other)?;
        let (mut s, mut d) = (src, dst);
        s.seek(SeekFrom::Start(start))?;
        d.seek(SeekFrom::Start(start))?;
        // std copies file to file with copy_file_range: no pass through user space.
        let copied = io::copy(&mut s.take(count), &mut d)?;
        if copied != count {
            return Err(io::Error::other("the file changed while being copied"));
        }
        at = hole;
    }
    Ok(())
}

/// Where e2fsprogs puts mkfs.ext4; a server started with a bare PATH still finds it.
fn mkfs_program() -> PathBuf {
    ["/usr/sbin/mkfs.ext4", "/sbin/mkfs.ext4"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("mkfs.ext4"))
}

/// Formats `image` (already sized) as ext4 for a sandbox disk.
fn mkfs(image: &Path) -> Result<(), DiskError> {
    // No journal: the filesystem lives as long as its sandbox, and a host crash takes the
    // sandbox with it. No reserved blocks: the quota is the sandbox's to use. 256-byte inodes
    // hold the overlay's xattrs inline; one per 8 KiB, as many as the tmpfs disk allowed
    // (a tree of small files, node_modules say, runs out of inodes long before blocks). The
    // ratio is part of the template image's name, so images formatted otherwise are not reused. The image is a fresh sparse file, so its inode tables
    // read as zeroes already: nothing needs initialising at mount (older e2fsprogs lack that
    // option: then the tables are left uninitialised and the mount skips the zeroing thread).
    let run = |ext: &str| {
        Command::new(mkfs_program())
            .args(["-q", "-F", "-t", "ext4", "-b", "4096", "-I", "256", "-i", "8192", "-m", "0"])
            .args(["-O", "^has_journal,^resize_inode", "-E", ext, "-L", "ringfence"])
            .arg(image)
            .output()
    };
    let mut last = String::new();
    for ext in ["assume_storage_prezeroed=1,nodiscard", "lazy_itable_init=1,nodiscard"] {
        match run(ext) {
            Ok(o) if o.status.success() => return Ok(()),
            Ok(o) => last = String::from_utf8_lossy(&o.stderr).trim().to_string(),
            Err(e) => return Err(DiskError::Mkfs(format!("{}: {e}", mkfs_program().display()))),
        }
    }
    Err(DiskError::Mkfs(last))
}

/// Attaches `image` to a loop device and mounts it at `root`, owned by `owner`.
fn mount_image(
    image: std::os::fd::BorrowedFd<'_>,
    root: &Path,
    owner: u32,
) -> Result<(), DiskError> {
    // A new open of the image, not a duplicate: the loop device keeps what it is given for as
    // long as it is attached, and a lock lives as long as its open file description. Given
    // ours, the lock would outlive its owner and no sweep could ever take the disk.
    let reopen = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&image));
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&reopen)
        .map_err(io_at("reopen image for", root))?;
    let (dev, dev_path) = ringfence_sys::loop_attach(&file)?;
    drop(file);
    fs::create_dir(root).map_err(io_at("mkdir", root))?;
    // The device clears itself when this mount goes; until then our descriptor keeps it.
    let mounted = mount(
        Some(dev_path.as_str()),
        root,
        Some("ext4"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOATIME,
        // nobarrier: no cache flushes (each an fsync of the image on the host) for data that
        // dies with the sandbox.
        Some("noinit_itable,errors=remount-ro,nobarrier"),
    );
    drop(dev);
    mounted.map_err(nix_at("mount ext4 image on", root))?;
    own_root(root, owner, true)
}

/// Gives the mounted disk at `root` (with its `upper/` and `work/`, made first if `create`) to
/// `owner`, no one else allowed in.
fn own_root(root: &Path, owner: u32, create: bool) -> Result<(), DiskError> {
    let id = Some(nix::unistd::Uid::from_raw(owner));
    let gid = Some(nix::unistd::Gid::from_raw(owner));
    for (dir, mode) in
        [(root.to_path_buf(), 0o700), (root.join("upper"), 0o755), (root.join("work"), 0o755)]
    {
        if create && dir != root {
            fs::create_dir(&dir).map_err(io_at("mkdir", &dir))?;
        }
        nix::unistd::chown(&dir, id, gid).map_err(nix_at("chown", &dir))?;
        fs::set_permissions(&dir, fs::Permissions::from_mode(mode))
            .map_err(io_at("chmod", &dir))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(tag: &str) -> Option<(tempfile::TempDir, DiskPool)> {
        if ringfence_sys::euid() != 0 {
            eprintln!("SKIPPED {tag}: needs root (loop devices, mounts)");
            return None;
        }
        // Under /var/tmp rather than /tmp: the image needs a filesystem that supports
        // O_DIRECT and holes, which a tmpfs /tmp may not offer for loop devices.
        let t = tempfile::Builder::new().prefix("ringfence-disk-").tempdir_in("/var/tmp").unwrap();
        let p = DiskPool::new(t.path());
        if let Err(e) = p.probe() {
            eprintln!("SKIPPED {tag}: this host cannot make disk images: {e}");
            return None;
        }
        Some((t, p))
    }

    fn fill(dir: &Path, name: &str, mib: usize) -> io::Result<usize> {
        use std::io::Write;
        let mut f = File::create(dir.join(name))?;
        let chunk = vec![7u8; 1 << 20];
        for _ in 0..mib {
            f.write_all(&chunk)?;
        }
        f.sync_all()?;
        Ok(mib)
    }

    /// Waits for the loop devices of images under `image_dir` to clear themselves (they do so
    /// asynchronously after the last unmount), failing after two seconds.
    fn assert_loop_devices_go(image_dir: &Path) {
        for _ in 0..100 {
            if loop_devices_of(image_dir) == 0 {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert_eq!(loop_devices_of(image_dir), 0);
    }

    fn loop_devices_of(image_dir: &Path) -> usize {
        // /sys/block/loopN/loop/backing_file names each attached device's image.
        let Ok(rd) = fs::read_dir("/sys/block") else { return 0 };
        rd.flatten()
            .filter_map(|e| fs::read_to_string(e.path().join("loop/backing_file")).ok())
            .filter(|b| b.starts_with(&*image_dir.to_string_lossy()))
            .count()
    }

    #[test]
    fn writes_beyond_the_quota_fail_with_enospc_and_df_shows_the_quota() {
        let Some((_t, p)) = pool("enospc") else { return };
        let d = p.claim("enospc", 16 << 20, 100_000_000).unwrap();
        let (_, total) = d.usage().unwrap();
        assert!(total <= 16 << 20 && total > 12 << 20, "total {total}");
        let e = fill(&d.upper(), "big", 64).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "{e}");
        let m = fs::metadata(d.root()).unwrap();
        assert_eq!((m.uid(), m.mode() & 0o777), (100_000_000, 0o700));
    }

    #[test]
    fn two_disks_are_independent() {
        let Some((_t, p)) = pool("independent") else { return };
        let a = p.claim("a", 16 << 20, 100_000_000).unwrap();
        let b = p.claim("b", 32 << 20, 100_000_000).unwrap();
        assert!(fill(&a.upper(), "big", 64).is_err());
        // A is full; B still takes 20 MiB, more than A's whole quota.
        assert_eq!(fill(&b.upper(), "f", 20).unwrap(), 20);
        assert!(b.usage().unwrap().1 > a.usage().unwrap().1);
    }

    #[test]
    fn dropping_a_disk_leaves_no_mount_image_or_loop_device() {
        let Some((t, p)) = pool("teardown") else { return };
        let d = p.claim("gone", 16 << 20, 100_000_000).unwrap();
        let root = d.root().to_path_buf();
        assert!(is_mountpoint(&root));
        assert_eq!(loop_devices_of(t.path()), 1);
        // Dirty pages in the cache do not slow the teardown down: they are dropped.
        let _ = fill(&d.upper(), "f", 8);
        drop(d);
        assert!(!root.exists());
        assert!(!p.image_path("gone").exists());
        let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap();
        assert!(!mounts.contains(&*root.to_string_lossy()), "{mounts}");
        assert_loop_devices_go(t.path());
    }

    #[test]
    fn sweep_removes_orphans_and_keeps_disks_someone_holds() {
        let Some((_t, p)) = pool("sweep") else { return };
        let live = p.claim("live", 16 << 20, 100_000_000).unwrap();
        let orphan = p.claim("orphan", 16 << 20, 100_000_000).unwrap();
        let orphan_root = orphan.root().to_path_buf();
        // An owner that died: its lock is gone, its mount and image are not.
        orphan.forget();
        assert!(is_mountpoint(&orphan_root));
        // A leftover mount point with no image.
        fs::create_dir(p.dir().join("stray")).unwrap();
        assert_eq!(p.sweep().unwrap(), 2);
        assert!(!orphan_root.exists() && !p.image_path("orphan").exists());
        assert!(!p.dir().join("stray").exists());
        assert!(is_mountpoint(live.root()) && p.image_path("live").exists());
        assert!(matches!(p.adopt("live"), Err(DiskError::InUse(_))));
    }

    #[test]
    fn a_disk_is_adopted_after_its_owner_lets_go_and_ids_are_checked() {
        let Some((_t, p)) = pool("adopt") else { return };
        for bad in ["../x", ".templates", "a/b", ""] {
            assert!(matches!(p.claim(bad, 16 << 20, 0), Err(DiskError::BadId(_))), "{bad}");
        }
        assert!(p.adopt("nothing").unwrap().is_none());
        let d = p.claim("kept", 16 << 20, 100_000_000).unwrap();
        fs::write(d.upper().join("f"), b"data").unwrap();
        assert!(matches!(p.adopt("kept"), Err(DiskError::InUse(_))));
        // A claim of an id whose disk someone holds is refused, not merged into.
        assert!(matches!(p.claim("kept", 16 << 20, 0), Err(DiskError::InUse(_))));
        d.forget();
        let again = p.adopt("kept").unwrap().unwrap();
        assert_eq!(fs::read(again.upper().join("f")).unwrap(), b"data");
        drop(again);
        // Claiming the id of an orphan starts from an empty disk.
        let fresh = p.claim("kept", 16 << 20, 100_000_000).unwrap();
        assert!(!fresh.upper().join("f").exists());
    }

    /// What a disk costs, step by step (`cargo test --release -p ringfence-jail --lib
    /// disk_costs -- --ignored --nocapture`; numbers in docs/PERFORMANCE.md).
    #[test]
    #[ignore = "a measurement, not a check"]
    fn disk_costs() {
        let Some((_t, p)) = pool("costs") else { return };
        let median = |mut v: Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let ms = |t: std::time::Instant| t.elapsed().as_secs_f64() * 1e3;
        for always in [false, true] {
            let (mut claim, mut write, mut rm) = (Vec::new(), Vec::new(), Vec::new());
            for i in 0..200 {
                let t = std::time::Instant::now();
                let d = p.claim(&format!("c{i}"), 1 << 30, 100_000_000).unwrap();
                claim.push(ms(t));
                let t = std::time::Instant::now();
                fs::create_dir(d.upper().join("etc")).unwrap();
                fs::write(d.upper().join("etc/hostname"), b"x\n").unwrap();
                write.push(ms(t));
                let t = std::time::Instant::now();
                let (root, image) = (d.root.clone(), d.image.clone());
                d.forget();
                remove_with(&root, &image, always).unwrap();
                rm.push(ms(t));
            }
            eprintln!(
                "shutdown {}: claim {:.3} ms, first write {:.3} ms, remove {:.3} ms (medians of 200)",
                if always { "always" } else { "if dirty" },
                median(claim),
                median(write),
                median(rm)
            );
        }
    }

    #[test]
    fn a_spare_is_claimed_once_whole_empty_and_owned_by_its_claimant() {
        let Some((t, p)) = pool("spares") else { return };
        let p = p.with_spares(1);
        assert_eq!(p.replenish(16 << 20).unwrap(), 1);
        assert_eq!(p.replenish(16 << 20).unwrap(), 0, "one is kept, not more");
        let mut a = p.claim("a", 16 << 20, 100_000_000).unwrap();
        assert!(a.root().starts_with(p.spare_dir()), "{}", a.root().display());
        assert!(p.image_path("a").exists());
        let m = fs::metadata(a.root()).unwrap();
        assert_eq!((m.uid(), m.mode() & 0o777), (100_000_000, 0o700));
        assert_eq!(fs::metadata(a.upper()).unwrap().uid(), 100_000_000);
        assert_eq!(fs::read_dir(a.upper()).unwrap().count(), 0);
        // None left: the next claim makes its disk the ordinary way.
        let b = p.claim("b", 16 << 20, 100_000_001).unwrap();
        assert_eq!(b.root(), p.dir().join("b"));
        // A spare of another size is not handed out for this one.
        assert_eq!(p.replenish(32 << 20).unwrap(), 1);
        let c = p.claim("c", 16 << 20, 100_000_002).unwrap();
        assert_eq!(c.root(), p.dir().join("c"));
        // The quota is the spare's size, and what `a` writes is gone with it.
        assert!(fill(&a.upper(), "big", 64).is_err());
        a.detach().unwrap();
        drop(a);
        assert_eq!(p.replenish(16 << 20).unwrap(), 1);
        // Spares are kept for the size in use only: the 32 MiB one is gone.
        assert!(p.spares_of(32 << 20).is_empty());
        let d = p.claim("d", 16 << 20, 100_000_003).unwrap();
        assert!(d.root().starts_with(p.spare_dir()));
        assert_eq!(fs::read_dir(d.upper()).unwrap().count(), 0, "a fresh filesystem");
        assert!(d.usage().unwrap().0 < 1 << 20);
        drop((b, c, d));
        // A ready spare (and its loop device) is kept by a sweep.
        assert_eq!(p.replenish(16 << 20).unwrap(), 1);
        assert_eq!(p.sweep().unwrap(), 0);
        assert_eq!(p.spares_of(16 << 20).len(), 1);
        assert_eq!(loop_devices_of(t.path()), 1);
        // Discarded (a server shutting down), it leaves nothing mounted behind.
        let taken = p.claim("e", 16 << 20, 100_000_000).unwrap();
        assert_eq!(p.replenish(16 << 20).unwrap(), 1);
        assert_eq!(p.discard_spares(), 1);
        assert!(p.spares_of(16 << 20).is_empty());
        assert!(is_mountpoint(taken.root()), "a claimed spare is not discarded");
        drop(taken);
        assert_loop_devices_go(t.path());
    }

    #[test]
    fn a_claimed_spare_is_adopted_where_it_was_made() {
        let Some((_t, p)) = pool("spare-adopt") else { return };
        let p = p.with_spares(1);
        p.replenish(16 << 20).unwrap();
        let d = p.claim("kept", 16 << 20, 100_000_000).unwrap();
        assert!(d.made_ahead());
        fs::write(d.upper().join("f"), b"data").unwrap();
        let root = d.root().to_path_buf();
        // Its owner dies (a server killed with -9); the next server takes it back.
        d.forget();
        let again = p.adopt("kept").unwrap().unwrap();
        assert_eq!(again.root(), root);
        assert_eq!(fs::read(again.upper().join("f")).unwrap(), b"data");
        // Held again: a sweep leaves it.
        assert_eq!(p.sweep().unwrap(), 0);
        assert!(is_mountpoint(&root));
        drop(again);
        assert!(!root.exists() && !p.image_path("kept").exists());
    }

    #[test]
    fn a_sweep_removes_a_claimed_spare_whose_owner_died() {
        let Some((t, p)) = pool("spare-sweep") else { return };
        let p = p.with_spares(1);
        p.replenish(16 << 20).unwrap();
        let dead = p.claim("dead", 16 << 20, 100_000_000).unwrap();
        let root = dead.root().to_path_buf();
        p.replenish(16 << 20).unwrap();
        let live = p.claim("live", 16 << 20, 100_000_000).unwrap();
        dead.forget();
        p.replenish(16 << 20).unwrap();
        // The dead one's image and mount point go; the live claim and the free spare stay.
        assert_eq!(p.sweep().unwrap(), 2);
        assert!(!root.exists() && !p.image_path("dead").exists());
        assert!(is_mountpoint(live.root()));
        assert_eq!(p.spares_of(16 << 20).len(), 1);
        drop(live);
        let spare = p.claim("next", 16 << 20, 100_000_000).unwrap();
        assert!(spare.root().starts_with(p.spare_dir()));
        drop(spare);
        assert_loop_devices_go(t.path());
    }

    #[test]
    fn a_detached_disk_leaves_no_mount_and_still_works_through_its_handle() {
        let Some((t, p)) = pool("detach") else { return };
        let mut d = p.claim("det", 16 << 20, 100_000_000).unwrap();
        d.detach().unwrap();
        let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap();
        assert!(!mounts.contains("/disks/det"), "{mounts}");
        assert!(!p.dir().join("det").exists());
        // Still the sandbox's disk: written, measured, and full at its quota.
        fs::write(d.upper().join("f"), b"x").unwrap();
        assert!(d.usage().unwrap().1 <= 16 << 20);
        assert!(fill(&d.upper(), "big", 64).is_err());
        drop(d);
        assert!(!p.image_path("det").exists());
        assert_loop_devices_go(t.path());
    }
}
