//! `openat2` with its resolve flags, and the same rules walked by hand where the kernel has no
//! `openat2` (gVisor answers ENOSYS).
//!
//! The walk opens one component at a time with `O_PATH | O_NOFOLLOW` and follows symlinks
//! itself, so it can apply what `RESOLVE_NO_MAGICLINKS` means: a procfs symlink whose target is
//! not a path relative to procfs (`/proc/<pid>/fd/N`, `cwd`, `root`, `exe`, `map_files`, `ns`:
//! they read back as absolute paths or `socket:[…]`-style names) is refused with ELOOP, while
//! `/proc/self` (`1`) and `/proc/mounts` (`self/mounts`) are ordinary. With
//! `RESOLVE_NO_SYMLINKS` every symlink is refused. The last component is opened with the
//! caller's flags plus `O_NOFOLLOW` from the directory the walk reached, so a symlink swapped in
//! after the walk looked fails instead of being followed.

use std::collections::VecDeque;
use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path};
use std::sync::atomic::{AtomicBool, Ordering};

use nix::errno::Errno;
use nix::fcntl::{AT_FDCWD, OFlag, OpenHow, ResolveFlag, openat, readlinkat};
use nix::sys::stat::{Mode, SFlag, fstat};

/// How to open a path: `openat2`'s `open_how`, readable again for the fallback.
#[derive(Debug, Clone, Copy)]
pub struct How {
    pub flags: OFlag,
    pub mode: Mode,
    pub resolve: ResolveFlag,
}

/// Symlinks followed in one lookup before ELOOP, as the kernel's MAXSYMLINKS.
const MAX_SYMLINKS: u32 = 40;

/// Set once `openat2` answered ENOSYS: every later call walks by hand.
static NO_OPENAT2: AtomicBool = AtomicBool::new(false);

/// Opens `path` relative to `dirfd` as `openat2` would with `how`.
pub fn open<Fd: AsFd>(dirfd: Fd, path: &Path, how: How) -> nix::Result<OwnedFd> {
    if !NO_OPENAT2.load(Ordering::Relaxed) {
        let h = OpenHow::new().flags(how.flags).mode(how.mode).resolve(how.resolve);
        match nix::fcntl::openat2(dirfd.as_fd(), path, h) {
            Err(Errno::ENOSYS) => NO_OPENAT2.store(true, Ordering::Relaxed),
            other => return other,
        }
    }
    walk(dirfd, path, how)
}

fn is_procfs(fd: &OwnedFd) -> bool {
    nix::sys::statfs::fstatfs(fd)
        .is_ok_and(|st| st.filesystem_type() == nix::sys::statfs::PROC_SUPER_MAGIC)
}

fn components(path: &Path) -> VecDeque<OsString> {
    path.components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_os_string()),
            Component::ParentDir => Some(OsString::from("..")),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => None,
        })
        .collect()
}

fn open_path(dir: &OwnedFd, name: &OsStr) -> nix::Result<OwnedFd> {
    openat(dir, name, OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC, Mode::empty())
}

fn root() -> nix::Result<OwnedFd> {
    openat(AT_FDCWD, "/", OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, Mode::empty())
}

fn walk<Fd: AsFd>(dirfd: Fd, path: &Path, how: How) -> nix::Result<OwnedFd> {
    let mut cur = if path.is_absolute() {
        root()?
    } else {
        openat(dirfd, ".", OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, Mode::empty())?
    };
    let mut rest = components(path);
    let final_flags = how.flags | OFlag::O_CLOEXEC;
    let follow_last = !how.flags.contains(OFlag::O_NOFOLLOW);
    let mut links = 0;
    if rest.is_empty() {
        return openat(&cur, ".", final_flags, how.mode);
    }
    while let Some(name) = rest.pop_front() {
        let last = rest.is_empty();
        let next = match open_path(&cur, &name) {
            Ok(fd) => fd,
            // A name to be created: opened (with O_CREAT) from its directory below.
            Err(Errno::ENOENT) if last && how.flags.contains(OFlag::O_CREAT) => {
                return openat(&cur, name.as_os_str(), final_flags | OFlag::O_NOFOLLOW, how.mode);
            }
            Err(e) => return Err(e),
        };
        let is_link = SFlag::from_bits_truncate(fstat(&next)?.st_mode).contains(SFlag::S_IFLNK);
        if is_link && (!last || follow_last) {
            if how.resolve.contains(ResolveFlag::RESOLVE_NO_SYMLINKS) {
                return Err(Errno::ELOOP);
            }
            links += 1;
            if links > MAX_SYMLINKS {
                return Err(Errno::ELOOP);
            }
            let target = readlinkat(&cur, name.as_os_str())?;
            let magic = is_procfs(&cur)
                && (target.as_bytes().first() == Some(&b'/') || target.as_bytes().contains(&b':'));
            if magic && how.resolve.contains(ResolveFlag::RESOLVE_NO_MAGICLINKS) {
                return Err(Errno::ELOOP);
            }
            let target = Path::new(&target);
            if target.is_absolute() {
                cur = root()?;
            }
            for c in components(target).into_iter().rev() {
                rest.push_front(c);
            }
            if rest.is_empty() {
                return openat(&cur, ".", final_flags, how.mode);
            }
            continue;
        }
        if last {
            if is_link && how.resolve.contains(ResolveFlag::RESOLVE_NO_SYMLINKS) {
                return Err(Errno::ELOOP);
            }
            if how.flags.contains(OFlag::O_PATH) {
                // Already open as asked (O_PATH, not following a final symlink).
                return Ok(next);
            }
            return openat(&cur, name.as_os_str(), final_flags | OFlag::O_NOFOLLOW, how.mode);
        }
        cur = next;
    }
    Err(Errno::ENOENT)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use std::os::unix::fs::symlink;

    fn how(flags: OFlag, resolve: ResolveFlag) -> How {
        How { flags: flags | OFlag::O_CLOEXEC, mode: Mode::from_bits_truncate(0o644), resolve }
    }

    fn same_file(a: &OwnedFd, b: &Path) -> bool {
        let sa = fstat(a).unwrap();
        let sb = nix::sys::stat::stat(b).unwrap();
        sa.st_ino == sb.st_ino && sa.st_dev == sb.st_dev
    }

    #[test]
    fn the_hand_walk_follows_ordinary_symlinks_and_dotdot() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("a/b")).unwrap();
        std::fs::write(d.path().join("a/b/f"), "x").unwrap();
        symlink("a/b", d.path().join("rel")).unwrap();
        symlink(d.path().join("a"), d.path().join("abs")).unwrap();
        let h = how(OFlag::O_RDONLY, ResolveFlag::RESOLVE_NO_MAGICLINKS);
        for p in ["rel/f", "abs/b/f", "a/b/../b/f"] {
            let fd = walk(AT_FDCWD, &d.path().join(p), h).unwrap();
            assert!(same_file(&fd, &d.path().join("a/b/f")), "{p}");
        }
        let nofollow = how(OFlag::O_PATH | OFlag::O_NOFOLLOW, ResolveFlag::RESOLVE_NO_MAGICLINKS);
        let fd = walk(AT_FDCWD, &d.path().join("rel"), nofollow).unwrap();
        assert!(SFlag::from_bits_truncate(fstat(&fd).unwrap().st_mode).contains(SFlag::S_IFLNK));
        let no_links = how(OFlag::O_RDONLY, ResolveFlag::RESOLVE_NO_SYMLINKS);
        assert_eq!(walk(AT_FDCWD, &d.path().join("rel/f"), no_links).err(), Some(Errno::ELOOP));
        symlink("loop", d.path().join("loop")).unwrap();
        assert_eq!(walk(AT_FDCWD, &d.path().join("loop"), h).err(), Some(Errno::ELOOP));
    }

    #[test]
    fn the_hand_walk_creates_and_refuses_magic_links() {
        let d = tempfile::tempdir().unwrap();
        let create = how(OFlag::O_WRONLY | OFlag::O_CREAT, ResolveFlag::RESOLVE_NO_MAGICLINKS);
        walk(AT_FDCWD, &d.path().join("new"), create).unwrap();
        assert!(d.path().join("new").is_file());
        let h = how(OFlag::O_RDONLY, ResolveFlag::RESOLVE_NO_MAGICLINKS);
        // /proc/self/cwd is a magic link; /proc/self is an ordinary one.
        assert_eq!(walk(AT_FDCWD, Path::new("/proc/self/cwd"), h).err(), Some(Errno::ELOOP));
        assert_eq!(walk(AT_FDCWD, Path::new("/proc/self/fd/0"), h).err(), Some(Errno::ELOOP));
        walk(AT_FDCWD, Path::new("/proc/self/status"), h).unwrap();
        walk(AT_FDCWD, Path::new("/proc/mounts"), h).unwrap();
    }
}
