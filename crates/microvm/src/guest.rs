//! What a guest boots from: the initramfs (the agent as `/init` and the kernel modules it
//! loads) and the sandbox's writable disk. (The template's read-only root image is the image
//! store's: `ringfence_image::export`.)

use std::fs::{self, File};
use std::io::{BufWriter, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::MicrovmError;

fn io(op: String) -> impl Fn(std::io::Error) -> MicrovmError {
    move |source| MicrovmError::Io { op: op.clone(), source }
}

/// A `newc` cpio archive writer: the format the kernel unpacks an initramfs from. A few lines
/// against the format's fixed ASCII header; the archive crates on crates.io read more than
/// they write, and this needs only regular files and directories.
#[derive(Debug)]
struct Cpio<W: Write> {
    out: W,
    ino: u32,
    written: u64,
}

impl<W: Write> Cpio<W> {
    fn new(out: W) -> Self {
        Cpio { out, ino: 1, written: 0 }
    }

    fn entry(&mut self, name: &str, mode: u32, data: &[u8]) -> std::io::Result<()> {
        let namesize = name.len() + 1;
        let header = format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            self.ino,
            mode,
            0,
            0,
            1,
            0,
            data.len(),
            0,
            0,
            0,
            0,
            namesize,
            0
        );
        self.ino += 1;
        self.write(header.as_bytes())?;
        self.write(name.as_bytes())?;
        self.write(&[0])?;
        self.pad()?;
        self.write(data)?;
        self.pad()
    }

    fn write(&mut self, b: &[u8]) -> std::io::Result<()> {
        self.written += b.len() as u64;
        self.out.write_all(b)
    }

    fn pad(&mut self) -> std::io::Result<()> {
        let rem = (4 - (self.written % 4) as usize) % 4;
        self.write(&[0u8; 3][..rem])
    }

    fn finish(mut self) -> std::io::Result<W> {
        self.entry("TRAILER!!!", 0, &[])?;
        self.out.flush()?;
        Ok(self.out)
    }
}

const DIR: u32 = 0o040_755;
const EXEC: u32 = 0o100_755;
const FILE: u32 = 0o100_644;

/// The initramfs for this agent binary and these modules, in `cache/initramfs/`, built if
/// missing. Named by a digest of what goes in (the agent's size and modification time, the
/// modules' list and sizes), so servers of one build share it and a rebuilt agent gets its own.
pub fn initramfs(cache: &Path, agent: &Path, modules: &Path) -> Result<PathBuf, MicrovmError> {
    use std::hash::{Hash, Hasher};
    let dir = cache.join("initramfs");
    fs::create_dir_all(&dir).map_err(io(format!("mkdir {}", dir.display())))?;
    let meta = fs::metadata(agent).map_err(io(format!("stat {}", agent.display())))?;
    let mut h = std::hash::DefaultHasher::new();
    (meta.len(), meta.mtime(), meta.mtime_nsec()).hash(&mut h);
    tree_digest(modules).hash(&mut h);
    let dest = dir.join(format!("{:016x}.cpio", h.finish()));
    if !dest.is_file() {
        build_initramfs(agent, modules, &dest)?;
        // Each rebuilt agent leaves one behind: those untouched for a day belong to builds
        // no server is likely to run any more (QEMU reads the file only at launch).
        let day = std::time::Duration::from_secs(24 * 3600);
        for e in fs::read_dir(&dir).into_iter().flatten().flatten() {
            let old = e
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| t.elapsed().is_ok_and(|age| age > day));
            if old && e.path() != dest {
                let _ = fs::remove_file(e.path());
            }
        }
    }
    Ok(dest)
}

/// Writes the guest's initramfs at `dest`: `/init` (the static agent), `/lib/modules/` (the
/// `order` file and each module it names, from `modules`), and the directories the agent
/// mounts on. Built aside and renamed, so a concurrent reader never boots half of one.
pub fn build_initramfs(agent: &Path, modules: &Path, dest: &Path) -> Result<(), MicrovmError> {
    let read = |p: &Path| -> Result<Vec<u8>, MicrovmError> {
        let mut v = Vec::new();
        File::open(p)
            .and_then(|mut f| f.read_to_end(&mut v))
            .map_err(io(format!("read {}", p.display())))?;
        Ok(v)
    };
    let order_path = modules.join("order");
    let order = read(&order_path)?;
    let order_text = String::from_utf8_lossy(&order).into_owned();
    // Per process: two servers may build the same one at once; the rename settles it.
    let tmp = dest.with_extension(format!("tmp{}", std::process::id()));
    let file = File::create(&tmp).map_err(io(format!("create {}", tmp.display())))?;
    let mut c = Cpio::new(BufWriter::new(file));
    let w = |e| MicrovmError::Io { op: format!("write {}", tmp.display()), source: e };
    for d in ["dev", "proc", "sys", "lib", "lib/modules", "newroot", "lower", "rw"] {
        c.entry(d, DIR, &[]).map_err(w)?;
    }
    c.entry("lib/modules/order", FILE, &order).map_err(w)?;
    for name in order_text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if name.contains('/') {
            return Err(MicrovmError::Invalid(format!(
                "module name {name:?} in {}",
                order_path.display()
            )));
        }
        let ko = read(&modules.join(format!("{name}.ko")))?;
        c.entry(&format!("lib/modules/{name}.ko"), FILE, &ko).map_err(w)?;
    }
    c.entry("init", EXEC, &without_debug_info(agent, &tmp).map_or_else(|| read(agent), Ok)?)
        .map_err(w)?;
    c.finish().map_err(w)?;
    fs::rename(&tmp, dest).map_err(io(format!("rename to {}", dest.display())))
}

/// The agent without its debug information (`objcopy --strip-debug`), or `None` where that
/// cannot be made. The initramfs is unpacked into guest memory: a debug build's agent carries
/// ~200 MB of DWARF (every crate the workspace links, wasmtime's included), which left a
/// 256 MiB guest without room to run it; the guest has no use for it.
fn without_debug_info(agent: &Path, beside: &Path) -> Option<Vec<u8>> {
    let out = beside.with_extension("agent");
    let ok = std::process::Command::new("objcopy")
        .arg("--strip-debug")
        .arg(agent)
        .arg(&out)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    let bytes = if ok { fs::read(&out).ok() } else { None };
    let _ = fs::remove_file(&out);
    bytes
}

/// A digest of a small tree's shape and sizes (not its times: copies of one tree agree), to
/// name the initramfs after the modules that go in.
fn tree_digest(dir: &Path) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut entries = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let p = e.path();
            let Ok(m) = p.symlink_metadata() else { continue };
            let rel = p.strip_prefix(dir).unwrap_or(&p).to_string_lossy().into_owned();
            let link =
                fs::read_link(&p).map(|l| l.to_string_lossy().into_owned()).unwrap_or_default();
            entries.push((rel, m.mode(), if m.is_dir() { 0 } else { m.size() }, link));
            if m.is_dir() {
                stack.push(p);
            }
        }
    }
    entries.sort();
    // SipHash with fixed keys: the same tree gives the same digest in every process.
    let mut h = std::hash::DefaultHasher::new();
    entries.hash(&mut h);
    h.finish()
}

/// The size of a writable disk for a quota of `bytes`: ext4 needs a few MiB of its own (a
/// quota below that is refused by the caller's limits).
pub fn disk_size(bytes: u64) -> u64 {
    bytes.max(16 << 20)
}

/// Creates the sandbox's writable disk at `path`: a sparse file of `bytes` formatted ext4 (the
/// guest mounts it as its overlay's upper layer), so the disk quota is the filesystem's size.
pub fn writable_disk(path: &Path, bytes: u64) -> Result<(), MicrovmError> {
    let bytes = disk_size(bytes);
    let f = File::create(path).map_err(io(format!("create {}", path.display())))?;
    f.set_len(bytes).map_err(io(format!("size {}", path.display())))?;
    drop(f);
    let out = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-E", "root_owner=0:0,lazy_itable_init=1,lazy_journal_init=1"])
        .arg(path)
        .output()
        .map_err(io("run mkfs.ext4".into()))?;
    if !out.status.success() {
        return Err(MicrovmError::Build {
            what: "the sandbox's disk".into(),
            message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The archive the kernel reads: headers in order, names and data 4-byte aligned, and a
    /// trailer. Checked against busybox's cpio where it is installed.
    #[test]
    fn newc_archives_list_back() {
        let dir = tempfile::tempdir().unwrap();
        let modules = dir.path().join("m");
        fs::create_dir(&modules).unwrap();
        fs::write(modules.join("order"), "a\nb\n").unwrap();
        fs::write(modules.join("a.ko"), b"12345").unwrap();
        fs::write(modules.join("b.ko"), b"").unwrap();
        let agent = dir.path().join("agent");
        fs::write(&agent, b"#!agent").unwrap();
        let dest = dir.path().join("initrd");
        build_initramfs(&agent, &modules, &dest).unwrap();
        let bytes = fs::read(&dest).unwrap();
        assert!(bytes.starts_with(b"070701"));
        assert_eq!(bytes.len() % 4, 0);
        assert!(bytes.windows(10).any(|w| w == b"TRAILER!!!"));
        let Ok(out) =
            Command::new("busybox").args(["cpio", "-t"]).stdin(File::open(&dest).unwrap()).output()
        else {
            eprintln!("SKIPPED: listing with busybox cpio (no busybox)");
            return;
        };
        let listed = String::from_utf8_lossy(&out.stdout);
        for name in ["init", "lib/modules/order", "lib/modules/a.ko", "lib/modules/b.ko", "rw"] {
            assert!(listed.lines().any(|l| l == name), "{name} missing from {listed}");
        }
        // A module name that climbs out of the directory is refused.
        fs::write(modules.join("order"), "../x\n").unwrap();
        assert!(build_initramfs(&agent, &modules, &dest).is_err());
    }
}
