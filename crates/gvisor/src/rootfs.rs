//! The sandbox's root as runsc sees it: an overlay, mounted on the host, of the template's
//! skeleton and any snapshot layers under a writable upper layer on a tmpfs of the disk quota.
//!
//! Why a host overlay rather than runsc's own (`--overlay2=root:memory`): the upper layer is then
//! an ordinary host directory in the jail's format (`userxattr` overlay: whiteouts are 0:0
//! character devices, opaque directories carry `user.overlay.opaque`), so snapshots and forks
//! are saved with the jail's `layer::save` and layers move freely between the two tiers. The
//! tmpfs bounds the disk (writes past it fail with ENOSPC) and is charged to the memory cgroup
//! of whoever writes: gVisor's sentry, inside the sandbox's cgroup.
//!
//! Layout under the sandbox's directory: `disk/` (the tmpfs: `upper/`, `work/`) and `rootfs/`
//! (the overlay). Both are unmounted, and the directory removed, by [`Rootfs::remove`] or drop.

use std::fs;
use std::os::unix::fs::{PermissionsExt, lchown};
use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags, mount, umount2};

use crate::GvisorError;

/// A mounted root; unmounted on drop.
#[derive(Debug)]
pub struct Rootfs {
    disk: PathBuf,
    merged: PathBuf,
    mounted: bool,
}

/// What the root is made of.
#[derive(Debug)]
pub struct RootfsSpec<'a> {
    /// The template's read-only skeleton.
    pub template: &'a Path,
    /// Read-only layers above the template, topmost first.
    pub layers: &'a [PathBuf],
    pub disk_bytes: u64,
    pub disk_inodes: u64,
    /// Host uid/gid of the sandbox's root, owner of the upper layer's root and identity files.
    pub uid_base: u32,
    pub hostname: &'a str,
}

fn io(op: &str, path: &Path) -> impl FnOnce(std::io::Error) -> GvisorError {
    let op = format!("{op} {}", path.display());
    move |source| GvisorError::Io { op, source }
}

fn sys(op: &str, path: &Path) -> impl FnOnce(nix::Error) -> GvisorError {
    let op = format!("{op} {}", path.display());
    move |e| GvisorError::Io { op, source: e.into() }
}

impl Rootfs {
    /// Mounts the root under `dir` (which exists and is empty).
    pub fn mount(dir: &Path, spec: &RootfsSpec<'_>) -> Result<Rootfs, GvisorError> {
        let disk = dir.join("disk");
        let merged = dir.join("rootfs");
        for d in [&disk, &merged] {
            fs::create_dir(d).map_err(io("mkdir", d))?;
        }
        let opts = format!("size={},nr_inodes={},mode=0755", spec.disk_bytes, spec.disk_inodes);
        mount(
            Some("tmpfs"),
            &disk,
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some(opts.as_str()),
        )
        .map_err(sys("mount tmpfs on", &disk))?;
        // From here on, dropping `root` undoes what was mounted.
        let mut root = Rootfs { disk, merged, mounted: false };
        let upper = root.upper();
        let work = root.disk.join("work");
        for d in [&upper, &work] {
            fs::create_dir(d).map_err(io("mkdir", d))?;
        }
        let owner = Some(spec.uid_base);
        // The merged root takes the upper directory's owner: the sandbox's root, as in the jail.
        lchown(&upper, owner, owner).map_err(io("chown", &upper))?;
        // Per-sandbox identity files live in the upper layer, so the template stays shared.
        let etc = upper.join("etc");
        fs::create_dir(&etc).map_err(io("mkdir", &etc))?;
        fs::set_permissions(&etc, fs::Permissions::from_mode(0o755)).map_err(io("chmod", &etc))?;
        lchown(&etc, owner, owner).map_err(io("chown", &etc))?;
        for (name, text) in [
            ("hostname", format!("{}\n", spec.hostname)),
            (
                "hosts",
                format!("127.0.0.1\tlocalhost\n::1\tlocalhost\n127.0.1.1\t{}\n", spec.hostname),
            ),
        ] {
            let p = etc.join(name);
            fs::write(&p, text).map_err(io("write", &p))?;
            lchown(&p, owner, owner).map_err(io("chown", &p))?;
        }
        let mut lowers: Vec<String> =
            spec.layers.iter().map(|l| l.to_string_lossy().into_owned()).collect();
        lowers.push(spec.template.to_string_lossy().into_owned());
        for l in &lowers {
            // overlayfs splits lowerdir on ':' and treats ',' as the next option.
            if l.contains([':', ',']) {
                return Err(GvisorError::Invalid(format!(
                    "layer path {l:?} contains ':' or ',', which overlayfs cannot take"
                )));
            }
        }
        // userxattr: the jail's format (see the module comment). volatile: the upper layer lives
        // as long as the sandbox, so no syncs through to it.
        let opts = format!(
            "lowerdir={},upperdir={},workdir={},userxattr,volatile",
            lowers.join(":"),
            upper.display(),
            work.display()
        );
        mount(
            Some("overlay"),
            &root.merged,
            Some("overlay"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some(opts.as_str()),
        )
        .map_err(sys("mount overlay on", &root.merged))?;
        root.mounted = true;
        Ok(root)
    }

    /// The root a dead host process mounted under `dir`, to unmount (see `sweep`).
    pub(crate) fn adopt(dir: &Path) -> Rootfs {
        Rootfs { disk: dir.join("disk"), merged: dir.join("rootfs"), mounted: true }
    }

    /// The merged root, runsc's `root.path`.
    pub fn merged(&self) -> &Path {
        &self.merged
    }

    /// The writable layer as a host directory (see [`crate::Container::upper_dir`]).
    pub fn upper(&self) -> PathBuf {
        self.disk.join("upper")
    }

    /// (used, total) bytes of the writable layer.
    pub fn usage(&self) -> Option<(u64, u64)> {
        let st = nix::sys::statvfs::statvfs(&self.disk).ok()?;
        let frag = st.fragment_size().max(1);
        let total = st.blocks().saturating_mul(frag);
        let free = st.blocks_free().saturating_mul(frag);
        Some((total.saturating_sub(free), total))
    }

    /// Unmounts the overlay, then the tmpfs (freeing the writable layer's memory).
    pub fn unmount(&mut self) -> Result<(), GvisorError> {
        if self.mounted {
            unmount_if_mounted(&self.merged)?;
            self.mounted = false;
        }
        unmount_if_mounted(&self.disk)
    }
}

/// Unmounts `path` unless nothing is mounted there (EINVAL) or it is gone (ENOENT). Lazily
/// (MNT_DETACH): a runsc gofer that has not quite exited may still hold it, and it must not
/// stay on the host either way.
pub fn unmount_if_mounted(path: &Path) -> Result<(), GvisorError> {
    match umount2(path, MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::Error::EINVAL) | Err(nix::Error::ENOENT) => Ok(()),
        Err(e) => Err(sys("unmount", path)(e)),
    }
}

impl Drop for Rootfs {
    fn drop(&mut self) {
        if let Err(e) = self.unmount() {
            tracing::warn!(error = %e, "gvisor: leaving a sandbox root mounted");
        }
    }
}
