//! The one interface through which an isolation tier asks for a template in the form it runs
//! from ([`Store::export`]):
//!
//! - [`TemplateForm::Tree`]: the skeleton and the image's unpacked layer directories, topmost
//!   first, as overlayfs lower directories. The jail mounts them under each sandbox; gVisor's
//!   per-sandbox OCI bundle (`ringfence_gvisor`) is a `config.json` written for each start
//!   around a host overlay of the same directories, so the template-level part of its bundle
//!   is this tree too (the bundle's config carries per-sandbox ids, limits and environment and
//!   cannot be shared).
//! - [`TemplateForm::DiskImage`]: one read-only filesystem image of the merged tree, the root
//!   disk a microVM guest boots with (under its own writable disk).
//!
//! Artifacts that cost something to make (disk images) are cached under `images/exports/`,
//! named by a content key: the digests of the template's layers, the skeleton's version and
//! the form's format version. Two templates with the same layers share one; a rebuilt template
//! with new layers gets a new one. Each is built once, under a lock per key (a second create
//! asking meanwhile waits for the first one's result), aside and renamed, so no reader ever
//! sees half of one. An artifact is removed when no template has its layers any more (after
//! `template rm`, or when a rebuild replaced the template), which the store refuses while a
//! sandbox holds the template ([`Store::in_use`]).
//!
//! The built-in templates (`host`, the code interpreter's) are not in the store: they are a
//! host directory with host paths bound at their own places. [`tree_disk_image`] makes their
//! disk images with the same builder, keyed by the tree's shape and the bound paths' times.

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};
use sha2::Digest as _;

use crate::error::{ImageError, at};
use crate::store::{InUse, Record, SKELETON, Store};

/// The form a tier runs a template from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TemplateForm {
    /// Overlayfs lower directories (jail, gVisor).
    Tree,
    /// A read-only disk image of the merged tree (microVMs).
    DiskImage { fs: DiskFs },
}

/// The filesystem of a [`TemplateForm::DiskImage`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskFs {
    /// ext4, made by `mkfs.ext4 -d` (e2fsprogs), which the guest kernel mounts read-only.
    Ext4,
}

impl DiskFs {
    fn ext(self) -> &'static str {
        match self {
            DiskFs::Ext4 => "ext4",
        }
    }
}

/// Bump when the disk image's layout changes: the key changes, so old images are rebuilt (and
/// the stale ones swept with the next `template rm`).
const DISK_FORMAT: u32 = 1;

/// What a form is made of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Artifact {
    /// The bottom layer (mount points) and the image's layers above it, topmost first.
    Tree { skeleton: PathBuf, layers: Vec<PathBuf> },
    /// A read-only disk image file.
    DiskImage(PathBuf),
}

/// A template exported in one form, with what starting a sandbox from it also needs. Holds a
/// claim on the template ([`Store::in_use`]) until dropped: keep it for the sandbox's life.
#[derive(Debug)]
pub struct Exported {
    pub record: Record,
    pub artifact: Artifact,
    pub in_use: InUse,
}

impl Exported {
    /// The image's `Env` as a map (see [`crate::Runnable::env`]).
    pub fn env(&self) -> std::collections::BTreeMap<String, String> {
        crate::store::config_env(&self.record)
    }
}

/// What `exports/<key>.json` says of the artifact beside it: the layers it was made of, so
/// the store knows when no template needs it any more.
#[derive(Debug, Serialize, Deserialize)]
struct ExportMeta {
    layers: Vec<String>,
    skeleton: String,
    format: u32,
}

impl Store {
    fn exports_dir(&self) -> PathBuf {
        self.root().join("exports")
    }

    /// Template `name` in `form`, made (once, cached) if it is not yet, and claimed for the
    /// caller's sandbox. Refused with [`ImageError::NotFound`] for a name that is not an image
    /// template here.
    pub fn export(&self, name: &str, form: TemplateForm) -> Result<Exported, ImageError> {
        // The claim first: from here on `template rm` of it is refused, so the layers read
        // below stay.
        let in_use = self.in_use(name)?;
        let run = self.runnable(name)?;
        let artifact = match form {
            TemplateForm::Tree => Artifact::Tree { skeleton: run.skeleton, layers: run.layers },
            TemplateForm::DiskImage { fs } => {
                Artifact::DiskImage(self.disk_image(&run.record, &run.skeleton, &run.layers, fs)?)
            }
        };
        Ok(Exported { record: run.record, artifact, in_use })
    }

    /// The content key of a disk image of these layers.
    fn disk_key(record: &Record, fs: DiskFs) -> String {
        let mut h = sha2::Sha256::new();
        h.update(format!("ringfence-export {} v{DISK_FORMAT}\n{SKELETON}\n", fs.ext()));
        for l in &record.layers {
            h.update(l.diff_id.as_bytes());
            h.update(b"\n");
        }
        format!("{}-{}", fs.ext(), hex::encode(h.finalize()))
    }

    fn disk_image(
        &self,
        record: &Record,
        skeleton: &Path,
        layers: &[PathBuf],
        fs: DiskFs,
    ) -> Result<PathBuf, ImageError> {
        let dir = self.exports_dir();
        fs::create_dir_all(&dir).map_err(at("mkdir", &dir))?;
        let key = Self::disk_key(record, fs);
        let image = dir.join(format!("{key}.{}", fs.ext()));
        let meta = dir.join(format!("{key}.json"));
        let fresh = || image.is_file() && meta.is_file();
        if fresh() {
            return Ok(image);
        }
        // One builder per key: a concurrent create waits here and then finds it made.
        let _lock = crate::store::nix_free_lock::Lock::take(&dir.join(format!(".{key}.lock")))?;
        if fresh() {
            return Ok(image);
        }
        let mut lowers: Vec<&Path> = layers.iter().map(PathBuf::as_path).collect();
        lowers.push(skeleton);
        let size: u64 = lowers.iter().map(|l| tree_bytes(l)).sum();
        let tmp = dir.join(format!(".{key}.{}.partial", std::process::id()));
        let mnt = dir.join(format!(".{key}.{}.mnt", std::process::id()));
        let built = build_ext4(&record.name, &lowers, &[], size, &tmp, &mnt);
        let _ = fs::remove_dir(&mnt);
        if let Err(e) = built {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        // The image's data reaches the disk before its name does; the meta file last, so an
        // image without one (a crash between the two) is rebuilt, never used half-described.
        fs::File::open(&tmp).and_then(|f| f.sync_all()).map_err(at("fsync", &tmp))?;
        fs::rename(&tmp, &image).map_err(at("rename", &tmp))?;
        let m = ExportMeta {
            layers: record.layers.iter().map(|l| l.diff_id.clone()).collect(),
            skeleton: SKELETON.to_string(),
            format: DISK_FORMAT,
        };
        let text = serde_json::to_vec_pretty(&m)
            .map_err(|e| ImageError::Format(format!("encode the export record: {e}")))?;
        crate::store::write_atomic(&meta, &text)?;
        Ok(image)
    }

    /// Removes the cached artifacts whose layers no template has any more, and what crashed
    /// builds left. An artifact being built (its lock held) is left alone. Called with the
    /// store's lock held, after a template went or was replaced.
    pub(crate) fn sweep_exports(&self) -> Result<usize, ImageError> {
        let dir = self.exports_dir();
        let Ok(rd) = fs::read_dir(&dir) else { return Ok(0) };
        let wanted: BTreeSet<Vec<String>> = self
            .list()?
            .iter()
            .map(|r| r.layers.iter().map(|l| l.diff_id.clone()).collect())
            .collect();
        let mut removed = 0;
        for e in rd.flatten() {
            let file = e.file_name().to_string_lossy().into_owned();
            let Some(key) = file.strip_suffix(".json") else { continue };
            if key.starts_with('.') {
                continue;
            }
            let meta: Option<ExportMeta> =
                fs::read(e.path()).ok().and_then(|b| serde_json::from_slice(&b).ok());
            let keep = meta.is_some_and(|m| {
                m.skeleton == SKELETON && m.format == DISK_FORMAT && wanted.contains(&m.layers)
            });
            if keep {
                continue;
            }
            let lock = dir.join(format!(".{key}.lock"));
            let Ok(f) = fs::OpenOptions::new().create(true).truncate(false).write(true).open(&lock)
            else {
                continue;
            };
            if f.try_lock().is_err() {
                continue;
            }
            let ext = key.split('-').next().unwrap_or_default();
            let _ = fs::remove_file(dir.join(format!("{key}.{ext}")));
            let _ = fs::remove_file(e.path());
            let _ = fs::remove_file(&lock);
            removed += 1;
        }
        // Partial images and mount points of builders that died (their pid is gone).
        if let Ok(rd) = fs::read_dir(&dir) {
            for e in rd.flatten() {
                let file = e.file_name().to_string_lossy().into_owned();
                let Some(rest) =
                    file.strip_suffix(".partial").or_else(|| file.strip_suffix(".mnt"))
                else {
                    continue;
                };
                let pid = rest.rsplit('.').next().and_then(|p| p.parse::<u32>().ok());
                if pid.is_some_and(|p| !Path::new(&format!("/proc/{p}")).exists()) {
                    let _ = fs::remove_file(e.path());
                    let _ = fs::remove_dir(e.path());
                }
            }
        }
        Ok(removed)
    }

    /// Bytes the cached artifacts of this store take on disk (allocated, the images being
    /// sparse).
    pub fn exports_bytes(&self) -> u64 {
        fs::read_dir(self.exports_dir())
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.metadata().ok())
            .map(|m| m.blocks() * 512)
            .sum()
    }
}

/// The disk image of a built-in template (a host directory `rootfs` with the host directories
/// `binds` bound at their own paths in it), in `cache/images/<name>.ext4`, made on first use
/// (minutes for a root of gigabytes: once per template and host, shared by every server). Its
/// key covers the root's shape (paths, sizes, modes, link targets: each server builds its own
/// copy of the same skeleton) and the bound directories' modification times, so a changed
/// template gets a new image.
pub fn tree_disk_image(
    cache: &Path,
    name: &str,
    rootfs: &Path,
    binds: &[String],
) -> Result<PathBuf, ImageError> {
    let images = cache.join("images");
    fs::create_dir_all(&images).map_err(at("mkdir", &images))?;
    let mut key = format!("{DISK_FORMAT}:{:016x}", tree_digest(rootfs));
    for l in binds {
        key.push_str(&format!(":{l}={}", stamp(Path::new(l))));
    }
    let safe: String =
        name.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '_' }).collect();
    let image = images.join(format!("{safe}.ext4"));
    let key_file = images.join(format!("{safe}.key"));
    let fresh = || image.is_file() && fs::read_to_string(&key_file).is_ok_and(|k| k == key);
    if fresh() {
        return Ok(image);
    }
    let _lock = crate::store::nix_free_lock::Lock::take(&images.join(format!("{safe}.lock")))?;
    if fresh() {
        return Ok(image);
    }
    let mut size = tree_bytes(rootfs);
    for l in binds {
        size += tree_bytes(Path::new(l));
    }
    let tmp = images.join(format!("{safe}.ext4.tmp"));
    let _ = fs::remove_file(&tmp);
    if let Err(e) = build_ext4(name, &[rootfs], binds, size, &tmp, rootfs) {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    fs::rename(&tmp, &image).map_err(at("rename", &tmp))?;
    fs::write(&key_file, &key).map_err(at("write", &key_file))?;
    Ok(image)
}

/// Writes an ext4 image of a tree to `dest` with `mkfs.ext4 -d`, inside a private mount
/// namespace of `unshare` (so nothing stays mounted whatever happens):
///
/// - one lower (`lowers == [root]`): `root` itself, with each of `binds` (host directories)
///   bound at its own path in it; `mnt` must be `root`;
/// - several (topmost first): their read-only overlay (`userxattr`, the format the layers are
///   stored in: whiteouts hide what is below, opaque directories hide their lower contents),
///   mounted on `mnt` (made here), copied from there.
///
/// `bytes`: what the tree occupies; the image gets that plus ext4's metadata and slack (the
/// file is sparse: the slack costs nothing). Paths reach the script as arguments, never as
/// code. mkfs copies symlinks as symlinks and follows none; the layers were checked when they
/// were unpacked (no device nodes, nothing pointing out of them that the host would open).
fn build_ext4(
    name: &str,
    lowers: &[&Path],
    binds: &[String],
    bytes: u64,
    dest: &Path,
    mnt: &Path,
) -> Result<(), ImageError> {
    const SCRIPT: &str = r#"set -e
lower="$1"; mnt="$2"; img="$3"; size="$4"; shift 4
case "$lower" in
  *:*) mount -t overlay overlay -o "ro,userxattr,lowerdir=$lower" "$mnt" ;;
esac
for l in "$@"; do
  [ -d "$mnt$l" ] || { echo "the template has no mount point $l" >&2; exit 3; }
  mount --bind "$l" "$mnt$l"
done
exec mkfs.ext4 -q -F -L ringfence -E root_owner=0:0 -d "$mnt" "$img" "$((size / 1024))k""#;
    let mut joined = Vec::with_capacity(lowers.len());
    for l in lowers {
        let s = l.to_string_lossy().into_owned();
        // overlayfs splits lowerdir on ':' and reads ',' as the next option.
        if s.contains([':', ',']) {
            return Err(ImageError::Format(format!(
                "layer path {s:?} contains ':' or ',', which overlayfs cannot take"
            )));
        }
        joined.push(s);
    }
    if lowers.len() > 1 {
        fs::create_dir_all(mnt).map_err(at("mkdir", mnt))?;
    }
    let size = bytes + bytes / 4 + (256 << 20);
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", SCRIPT, "sh"])
        .arg(joined.join(":"))
        .arg(mnt)
        .arg(dest)
        .arg(size.to_string())
        .args(binds)
        .output()
        .map_err(at("run unshare/mkfs.ext4 for", dest))?;
    if !out.status.success() {
        return Err(ImageError::Format(format!(
            "the disk image of template {name}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// A cheap fingerprint of a tree's top: its own and its entries' modification times.
fn stamp(dir: &Path) -> String {
    let mut newest =
        fs::metadata(dir).map(|m| m.mtime_nsec() + m.mtime() * 1_000_000_000).unwrap_or(0);
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            if let Ok(m) = e.metadata() {
                newest = newest.max(m.mtime() * 1_000_000_000 + m.mtime_nsec());
            }
        }
    }
    newest.to_string()
}

/// A digest of a small tree's shape and sizes (not its times: copies of one skeleton agree).
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

/// Bytes a tree occupies (allocated blocks, symlinks not followed, other mounts included).
fn tree_bytes(dir: &Path) -> u64 {
    let mut total = 0u64;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let Ok(m) = e.path().symlink_metadata() else { continue };
            total += m.blocks() * 512 + 4096;
            if m.is_dir() {
                stack.push(e.path());
            }
        }
    }
    total
}
