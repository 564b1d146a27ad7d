//! A sandbox's directory on the host: everything its guest sees as `/` (the stdlib aside).
//!
//! It is a tmpfs of the sandbox's disk size, so the quota is the kernel's: a guest write past
//! it fails with `ENOSPC` (CPython raises `OSError`), and so does an upload through the files
//! API. Paths from the API are resolved with `openat2(RESOLVE_IN_ROOT)`: `..` stops at the
//! directory and symlinks resolve inside it, as they would in a chroot, so no path names a host
//! file outside it (the same rule Wasmtime's WASI applies to the guest's own opens).

use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::Mode;

use crate::WasmError;

/// Directories every sandbox starts with (E2B's user home and a scratch directory).
pub const SKELETON: [&str; 3] = ["home/user", "tmp", "root"];

/// A sandbox's directory; dropping it unmounts and removes it.
#[derive(Debug)]
pub struct Root {
    dir: PathBuf,
    fd: OwnedFd,
    quota: u64,
}

impl Root {
    /// Makes `dir` (which must not exist) a fresh tmpfs of `quota` bytes with the skeleton.
    pub fn create(dir: &Path, quota: u64) -> Result<Root, WasmError> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(dir)
            .map_err(|e| WasmError::Io { step: "making the sandbox directory", source: e })?;
        let opts = format!("size={quota},mode=0755,nr_inodes=65536");
        let mounted = nix::mount::mount(
            Some("ringfence-wasm"),
            dir,
            Some("tmpfs"),
            nix::mount::MsFlags::MS_NOSUID
                | nix::mount::MsFlags::MS_NODEV
                | nix::mount::MsFlags::MS_NOEXEC,
            Some(opts.as_str()),
        );
        if let Err(e) = mounted {
            let _ = std::fs::remove_dir(dir);
            return Err(WasmError::Io {
                step: "mounting the sandbox's tmpfs (the disk quota; needs root)",
                source: e.into(),
            });
        }
        let fd = match nix::fcntl::open(dir, OFlag::O_PATH | OFlag::O_DIRECTORY, Mode::empty()) {
            Ok(fd) => fd,
            Err(e) => {
                unmount(dir);
                return Err(WasmError::Io {
                    step: "opening the sandbox directory",
                    source: e.into(),
                });
            }
        };
        let root = Root { dir: dir.to_path_buf(), fd, quota };
        for d in SKELETON {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(root.dir.join(d))
                .map_err(|e| WasmError::Io { step: "making the sandbox's skeleton", source: e })?;
        }
        Ok(root)
    }

    /// The host path (for the guest's preopen only: the API resolves through [`Root::open`]).
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// (used, total) bytes.
    pub fn usage(&self) -> (u64, u64) {
        match nix::sys::statvfs::fstatvfs(&self.fd) {
            Ok(s) => {
                let frsize = s.fragment_size();
                let total = s.blocks() * frsize;
                (total.saturating_sub(s.blocks_free() * frsize), total)
            }
            Err(_) => (0, self.quota),
        }
    }

    /// Opens sandbox path `path` (absolute, or relative to `/home/user`) inside the root.
    pub fn open(&self, path: &str, flags: OFlag, mode: u32) -> Result<OwnedFd, Errno> {
        let rel = relative(path);
        let how = OpenHow::new()
            .flags(flags | OFlag::O_CLOEXEC)
            .mode(Mode::from_bits_truncate(mode))
            .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS);
        nix::fcntl::openat2(self.fd.as_fd(), rel.as_str(), how)
    }

    /// The directory holding `path`'s last component (resolved inside the root) and that
    /// component's name. A path whose last component is `.`/`..` or empty has none.
    pub fn parent(&self, path: &str) -> Result<(OwnedFd, String), Errno> {
        let rel = relative(path);
        let trimmed = rel.trim_end_matches('/');
        let (dir, name) = match trimmed.rsplit_once('/') {
            Some((d, n)) => (if d.is_empty() { "/".to_string() } else { d.to_string() }, n),
            None => ("/".to_string(), trimmed),
        };
        if name.is_empty() || name == "." || name == ".." {
            return Err(Errno::EINVAL);
        }
        let fd = self.open(&dir, OFlag::O_PATH | OFlag::O_DIRECTORY, 0)?;
        Ok((fd, name.to_string()))
    }
}

/// `path` as the root-relative form `openat2` wants: absolute paths keep their leading `/`
/// (`RESOLVE_IN_ROOT` anchors it at the root), relative ones start at the user's home.
pub fn relative(path: &str) -> String {
    if path.starts_with('/') { path.to_string() } else { format!("/home/user/{path}") }
}

fn unmount(dir: &Path) {
    if let Err(e) = nix::mount::umount2(dir, nix::mount::MntFlags::MNT_DETACH) {
        tracing::warn!(dir = %dir.display(), error = %e, "unmounting a wasm sandbox's tmpfs");
    }
    let _ = std::fs::remove_dir(dir);
}

impl Drop for Root {
    fn drop(&mut self) {
        // The tmpfs goes with its contents: nothing to delete file by file.
        unmount(&self.dir);
    }
}
