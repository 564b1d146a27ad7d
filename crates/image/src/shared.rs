//! Snapshot layers in the same content-addressed layer store as image layers.
//!
//! A server saves a sandbox's upper layer (a snapshot, a pause without memory, a fork) as a
//! directory `<data-dir>/layers/<id>`; its database counts the references to `<id>`. The
//! directory's content is then moved here as `images/layers/sha256-<digest>` (where the digest
//! is [`tree_digest`] of it) and `<data-dir>/layers/<id>` becomes a symbolic link to it
//! ([`Store::adopt_saved_layer`]): two saved layers with the same content are stored once,
//! and a snapshot of a sandbox from an image template shares the store with that template.
//! The server's ids stay what its database references; the store keeps a snapshot layer while
//! any link in `<data-dir>/layers` points to it or a template lists it
//! ([`Store::collect_unlinked`]).
//!
//! Crash safety: the link is made aside (`.<id>.cas`) before the directory moves and renamed
//! into place after; [`Store::finish_adoptions`] (run when the server starts) completes or
//! undoes what a crash interrupted, so `<id>` always names either the directory or a link to
//! its content.

use std::collections::BTreeSet;
use std::fs;
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use sha2::Digest as _;

use crate::error::{ImageError, at};
use crate::oci::Digest;
use crate::store::{LayerRecord, Store};

/// What a saved layer's record says made it (`LayerRecord::created_by`): such a layer goes
/// when nothing links to it and no template lists it.
pub const SAVED_LAYER: &str = "ringfence: saved sandbox layer";

/// Bump if what [`tree_digest`] covers changes (the digest then names other content).
const TREE_DIGEST_FORMAT: &str = "ringfence-tree-digest v1 (no times)";

impl Store {
    /// The server's layer directory beside this store (`<data-dir>/layers`).
    fn links_dir(&self) -> PathBuf {
        self.root()
            .parent()
            .map_or_else(|| self.root().join("..").join("layers"), |d| d.join("layers"))
    }

    /// Moves the saved layer directory `dir` (`<data-dir>/layers/<id>`) into the store by its
    /// content and leaves a link to it in its place. A layer already stored under that digest
    /// is kept and `dir` removed. Returns the digest.
    pub fn adopt_saved_layer(&self, dir: &Path) -> Result<Digest, ImageError> {
        let digest = tree_digest(dir)?;
        let (entries, bytes) = tree_counts(dir);
        let id = Digest::parse(&digest)?;
        let target = self.layer_dir(&id);
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .ok_or_else(|| ImageError::Format(format!("{}: no file name", dir.display())))?;
        let aside = dir.with_file_name(format!(".{name}.cas"));
        // Under the store's lock: `template rm` and the collection of unlinked layers see the
        // link and the layer together, never one without the other.
        let _lock = self.lock()?;
        let _ = fs::remove_file(&aside);
        std::os::unix::fs::symlink(&target, &aside).map_err(at("symlink", &aside))?;
        if self.known_layer(&id).is_some() {
            fs::remove_dir_all(dir).map_err(at("remove", dir))?;
        } else {
            if target.exists() {
                // A directory without its record: a crash between the two writes.
                fs::remove_dir_all(&target).map_err(at("remove", &target))?;
            }
            if let Err(e) = fs::rename(dir, &target) {
                let _ = fs::remove_file(&aside);
                return Err(at("rename", dir)(e));
            }
            let rec = LayerRecord {
                diff_id: id.to_string(),
                entries,
                bytes,
                stream_bytes: 0,
                created_by: Some(SAVED_LAYER.to_string()),
            };
            let text = serde_json::to_vec_pretty(&rec)
                .map_err(|e| ImageError::Format(format!("encode the layer record: {e}")))?;
            crate::store::write_atomic(&target.with_extension("json"), &text)?;
        }
        fs::rename(&aside, dir).map_err(at("rename", &aside))?;
        Ok(id)
    }

    /// Completes what a crash left of adoptions in `<data-dir>/layers`: a `.<id>.cas` link
    /// whose layer is in the store replaces `<id>` (the directory, or what is left of it); one
    /// whose layer is not (the crash came before the move) is dropped and `<id>` stays.
    /// Returns how many were completed.
    pub fn finish_adoptions(&self) -> usize {
        let dir = self.links_dir();
        let Ok(rd) = fs::read_dir(&dir) else { return 0 };
        let mut done = 0;
        for e in rd.flatten() {
            let file = e.file_name().to_string_lossy().into_owned();
            let Some(id) = file.strip_prefix('.').and_then(|f| f.strip_suffix(".cas")) else {
                continue;
            };
            let aside = e.path();
            let own = dir.join(id);
            if fs::metadata(&aside).is_ok_and(|m| m.is_dir()) {
                if fs::symlink_metadata(&own).is_ok_and(|m| m.is_dir()) {
                    let _ = fs::remove_dir_all(&own);
                }
                if fs::rename(&aside, &own).is_ok() {
                    done += 1;
                }
            } else {
                let _ = fs::remove_file(&aside);
            }
        }
        done
    }

    /// The store's layers that links in `<data-dir>/layers` point to.
    pub fn linked_layers(&self) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        let Ok(rd) = fs::read_dir(self.links_dir()) else { return out };
        for e in rd.flatten() {
            let Ok(target) = fs::read_link(e.path()) else { continue };
            let Some(name) = target.file_name().map(|n| n.to_string_lossy().into_owned()) else {
                continue;
            };
            if let Some(hex) = name.strip_prefix("sha256-") {
                out.insert(format!("sha256:{hex}"));
            }
        }
        out
    }

    /// Removes the saved layers ([`SAVED_LAYER`]) that no link points to and no template
    /// lists. Returns how many went.
    pub fn collect_unlinked(&self) -> Result<usize, ImageError> {
        let _lock = self.lock()?;
        self.collect_unlinked_locked()
    }

    pub(crate) fn collect_unlinked_locked(&self) -> Result<usize, ImageError> {
        let mut used = self.linked_layers();
        for r in self.list()? {
            used.extend(r.layers.into_iter().map(|l| l.diff_id));
        }
        let mut removed = 0;
        for rec in self.all_layers() {
            if rec.created_by.as_deref() != Some(SAVED_LAYER) || used.contains(&rec.diff_id) {
                continue;
            }
            let Ok(d) = Digest::parse(&rec.diff_id) else { continue };
            let dir = self.layer_dir(&d);
            let _ = fs::remove_file(dir.with_extension("json"));
            let _ = fs::remove_dir_all(&dir);
            removed += 1;
        }
        Ok(removed)
    }

    /// Every layer record in the store (image layers, build layers, saved layers).
    pub fn all_layers(&self) -> Vec<LayerRecord> {
        let dir = self.root().join("layers");
        let mut out: Vec<LayerRecord> = fs::read_dir(&dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".json"))
            .filter_map(|e| fs::read(e.path()).ok())
            .filter_map(|b| serde_json::from_slice::<LayerRecord>(&b).ok())
            .collect();
        out.sort_by(|a, b| a.diff_id.cmp(&b.diff_id));
        out
    }
}

/// Entries and bytes of file content in a tree (symlinks not followed).
fn tree_counts(dir: &Path) -> (u64, u64) {
    let (mut entries, mut bytes) = (0u64, 0u64);
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let Ok(m) = e.path().symlink_metadata() else { continue };
            entries += 1;
            if m.is_file() {
                bytes += m.len();
            }
            if m.is_dir() {
                stack.push(e.path());
            }
        }
    }
    (entries, bytes)
}

/// The sha256 of a layer directory's content, as `sha256:<hex>`: for every entry, in path
/// order, its path, type, mode, owner, extended attributes (sorted; the overlay's opaque
/// markers among them), a device's number (whiteouts), a link's target and a file's content.
/// Times are left out: a saved layer's are those of its copy (`ringfence_jail::layer::save`
/// does not keep the sandbox's), so two saves of the same files would never match on them,
/// and they say nothing about what the sandbox wrote.
pub fn tree_digest(dir: &Path) -> Result<String, ImageError> {
    let mut h = sha2::Sha256::new();
    h.update(TREE_DIGEST_FORMAT.as_bytes());
    h.update([0]);
    entry(&mut h, dir, b"")?;
    Ok(format!("sha256:{}", hex::encode(h.finalize())))
}

fn entry(h: &mut sha2::Sha256, path: &Path, rel: &[u8]) -> Result<(), ImageError> {
    use std::os::unix::ffi::OsStrExt;
    let m = fs::symlink_metadata(path).map_err(at("stat", path))?;
    let ft = m.file_type();
    let kind: u8 = if ft.is_dir() {
        b'd'
    } else if ft.is_file() {
        b'f'
    } else if ft.is_symlink() {
        b'l'
    } else if ft.is_char_device() {
        b'c'
    } else if ft.is_block_device() {
        b'b'
    } else if ft.is_fifo() {
        b'p'
    } else {
        b's'
    };
    h.update((rel.len() as u64).to_le_bytes());
    h.update(rel);
    h.update([kind]);
    for n in [u64::from(m.mode()), u64::from(m.uid()), u64::from(m.gid())] {
        h.update(n.to_le_bytes());
    }
    // Extended attributes, sorted, without following a link.
    let mut names = vec![0u8; 4096];
    let n = rustix::fs::llistxattr(path, &mut names[..]).unwrap_or(0);
    let mut list: Vec<&[u8]> = names[..n].split(|b| *b == 0).filter(|s| !s.is_empty()).collect();
    list.sort();
    for name in list {
        let mut value = vec![0u8; 65536];
        let Ok(cname) = std::ffi::CString::new(name) else { continue };
        let len = rustix::fs::lgetxattr(path, cname.as_c_str(), &mut value[..]).unwrap_or(0);
        h.update(b"x");
        h.update((name.len() as u64).to_le_bytes());
        h.update(name);
        h.update((len as u64).to_le_bytes());
        h.update(&value[..len]);
    }
    match kind {
        b'f' => {
            h.update(m.len().to_le_bytes());
            let mut f = fs::File::open(path).map_err(at("open", path))?;
            let mut buf = vec![0u8; 1 << 16];
            loop {
                let n = f.read(&mut buf).map_err(at("read", path))?;
                if n == 0 {
                    break;
                }
                h.update(&buf[..n]);
            }
        }
        b'l' => {
            let t = fs::read_link(path).map_err(at("readlink", path))?;
            let t = t.as_os_str().as_bytes();
            h.update((t.len() as u64).to_le_bytes());
            h.update(t);
        }
        b'c' | b'b' => h.update(m.rdev().to_le_bytes()),
        b'd' => {
            let mut kids: Vec<Vec<u8>> = fs::read_dir(path)
                .map_err(at("readdir", path))?
                .map(|e| e.map(|e| e.file_name().as_bytes().to_vec()))
                .collect::<Result<_, _>>()
                .map_err(at("readdir", path))?;
            kids.sort();
            h.update((kids.len() as u64).to_le_bytes());
            for k in kids {
                let mut r = rel.to_vec();
                if !r.is_empty() {
                    r.push(b'/');
                }
                r.extend_from_slice(&k);
                entry(h, &path.join(std::ffi::OsStr::from_bytes(&k)), &r)?;
            }
        }
        _ => {}
    }
    Ok(())
}
