//! Reading an image's `/etc/passwd` across its layers, to choose who runs commands.

use std::ffi::OsStr;
use std::fs::File;
use std::io::Read;
use std::os::fd::OwnedFd;
use std::path::PathBuf;

use rustix::fs::{AtFlags, FileType, Mode, OFlags};

use crate::unpack::OPAQUE_XATTR;

/// Whether the image whose layers are `layers` (topmost first) has a passwd entry with uid
/// `uid`. The file is found as overlayfs would: the topmost layer that has it, unless a
/// whiteout or an opaque `/etc` hides the layers below. Nothing is followed through a
/// symlink (a layer's `/etc/passwd -> /host/...` reads as "no such user").
pub fn has_uid(layers: &[PathBuf], uid: u32) -> bool {
    for layer in layers {
        let Ok(root) = File::open(layer) else { return false };
        let root = OwnedFd::from(root);
        let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        match rustix::fs::statat(&root, "etc", AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Directory => {}
            Ok(_) => return false,
            Err(_) => continue,
        }
        let Ok(etc) = rustix::fs::openat(&root, "etc", flags | OFlags::DIRECTORY, Mode::empty())
        else {
            return false;
        };
        match rustix::fs::statat(&etc, "passwd", AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::RegularFile => {
                let Ok(fd) = rustix::fs::openat(&etc, OsStr::new("passwd"), flags, Mode::empty())
                else {
                    return false;
                };
                let mut text = String::new();
                let _ = File::from(fd).take(1 << 20).read_to_string(&mut text);
                return text.lines().any(|l| l.split(':').nth(2) == Some(uid.to_string().as_str()));
            }
            Ok(_) => return false,
            Err(_) => {}
        }
        let mut v = [0u8; 1];
        if rustix::fs::fgetxattr(&etc, OPAQUE_XATTR, &mut v).is_ok_and(|n| n == 1 && v[0] == b'y') {
            return false;
        }
    }
    false
}
