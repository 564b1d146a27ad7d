//! Moving a stored layer from one node's store to another's (cluster mode), verified.
//!
//! A stored layer is an unpacked directory; the tar it came from is gone, and a layer a build
//! made never had one, so its `diff_id` cannot check a copy. The sending node therefore
//! serialises the directory as a *canonical* tar ([`export_layer`]: entries in byte order of
//! their paths, headers from the files' own metadata, overlay whiteouts and opaque markers
//! turned back into their OCI spellings), and the sha256 of that stream is the layer's
//! *content digest*. The node that has a template publishes the content digest of each of its
//! layers with the template's metadata (in etcd); a node that fetches the layer from any peer
//! unpacks the stream with the same hostile-input unpacker as an import ([`crate::unpack`])
//! while hashing it, and keeps it only if the hash is the published one
//! ([`Store::receive_layer`]). A corrupt or substituted transfer is refused naming both
//! digests, and its partial directory removed.

use std::collections::HashMap;
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use sha2::{Digest as _, Sha256};

use crate::error::{ImageError, at};
use crate::oci::{Digest, Hashing};
use crate::store::{LayerRecord, Store};
use crate::unpack::{Limits, OPAQUE_XATTR, unpack};

/// Writes the layer directory `dir` to `out` as its canonical tar (see the module
/// documentation). Returns the bytes written.
pub fn export_layer(dir: &Path, out: impl Write) -> Result<u64, ImageError> {
    let counted = CountingWrite { inner: out, n: 0 };
    let mut tar = tar::Builder::new(counted);
    tar.mode(tar::HeaderMode::Complete);
    tar.follow_symlinks(false);
    let root = fs::symlink_metadata(dir).map_err(at("stat", dir))?;
    let mut h = header(&root, tar::EntryType::Directory, 0);
    tar.append_data(&mut h, "./", io::empty()).map_err(at("write the tar of", dir))?;
    let mut links: HashMap<(u64, u64), Vec<u8>> = HashMap::new();
    walk(dir, b"", &mut tar, &mut links)?;
    let counted = tar.into_inner().map_err(at("finish the tar of", dir))?;
    Ok(counted.n)
}

/// The sha256 of `dir`'s canonical tar: what a peer's copy of the layer must hash to.
pub fn content_digest(dir: &Path) -> Result<Digest, ImageError> {
    let mut sink = HashingWrite { hasher: Sha256::new() };
    export_layer(dir, &mut sink)?;
    Digest::parse(&format!("sha256:{}", hex::encode(sink.hasher.finalize())))
}

fn header(md: &fs::Metadata, kind: tar::EntryType, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(md.mode() & 0o7777);
    h.set_uid(u64::from(md.uid()));
    h.set_gid(u64::from(md.gid()));
    // Negative (pre-1970) times clamp to 0: the unpacker reads unsigned times anyway.
    h.set_mtime(u64::try_from(md.mtime()).unwrap_or(0));
    h.set_size(size);
    h
}

fn walk<W: Write>(
    dir: &Path,
    rel: &[u8],
    tar: &mut tar::Builder<W>,
    links: &mut HashMap<(u64, u64), Vec<u8>>,
) -> Result<(), ImageError> {
    let mut names: Vec<_> = fs::read_dir(dir)
        .map_err(at("list", dir))?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<Result<_, _>>()
        .map_err(at("list", dir))?;
    // Byte order, not the directory's: the stream (and so its digest) must not depend on the
    // filesystem that holds the copy.
    names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
    for name in names {
        let path = dir.join(&name);
        let mut r = rel.to_vec();
        if !r.is_empty() {
            r.push(b'/');
        }
        r.extend_from_slice(name.as_bytes());
        let md = fs::symlink_metadata(&path).map_err(at("stat", &path))?;
        let ft = md.file_type();
        let w = |e: io::Error| at("write the tar entry for", &path)(e);
        if ft.is_dir() {
            let mut p = r.clone();
            p.push(b'/');
            let mut h = header(&md, tar::EntryType::Directory, 0);
            tar.append_data(&mut h, bytes_path(&p), io::empty()).map_err(w)?;
            let opaque =
                matches!(rustix::fs::lgetxattr(&path, OPAQUE_XATTR, &mut [0u8; 4][..]), Ok(1));
            if opaque {
                let mut m = r.clone();
                m.extend_from_slice(b"/.wh..wh..opq");
                let mut h = header(&md, tar::EntryType::Regular, 0);
                h.set_mode(0o644);
                tar.append_data(&mut h, bytes_path(&m), io::empty()).map_err(w)?;
            }
            walk(&path, &r, tar, links)?;
        } else if ft.is_symlink() {
            let target = fs::read_link(&path).map_err(at("readlink", &path))?;
            let mut h = header(&md, tar::EntryType::Symlink, 0);
            tar.append_link(&mut h, bytes_path(&r), &target).map_err(w)?;
        } else if ft.is_file() {
            if md.nlink() > 1 {
                let k = (md.dev(), md.ino());
                if let Some(first) = links.get(&k) {
                    let mut h = header(&md, tar::EntryType::Link, 0);
                    tar.append_link(&mut h, bytes_path(&r), bytes_path(first)).map_err(w)?;
                    continue;
                }
                links.insert(k, r.clone());
            }
            let f = fs::File::open(&path).map_err(at("open", &path))?;
            let mut h = header(&md, tar::EntryType::Regular, md.len());
            // Exactly the size in the header: a file that changes while being sent makes the
            // stream short or long, and the receiver's digest check refuses it.
            tar.append_data(&mut h, bytes_path(&r), f.take(md.len())).map_err(w)?;
        } else if ft.is_char_device() && md.rdev() == 0 {
            // An overlay whiteout: its OCI spelling, `.wh.NAME`, beside it.
            let mut p = rel.to_vec();
            if !p.is_empty() {
                p.push(b'/');
            }
            p.extend_from_slice(b".wh.");
            p.extend_from_slice(name.as_bytes());
            let mut h = header(&md, tar::EntryType::Regular, 0);
            h.set_mode(0o644);
            tar.append_data(&mut h, bytes_path(&p), io::empty()).map_err(w)?;
        } else if ft.is_fifo() {
            let mut h = header(&md, tar::EntryType::Fifo, 0);
            tar.append_data(&mut h, bytes_path(&r), io::empty()).map_err(w)?;
        }
        // Other device nodes and sockets: the unpacker never creates them, so no stored layer
        // holds one; nothing to send.
    }
    Ok(())
}

fn bytes_path(b: &[u8]) -> &Path {
    Path::new(std::ffi::OsStr::from_bytes(b))
}

struct CountingWrite<W> {
    inner: W,
    n: u64,
}

impl<W: Write> Write for CountingWrite<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.n += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

struct HashingWrite {
    hasher: Sha256,
}

impl Write for HashingWrite {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.hasher.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Unpacks a canonical tar from `reader` into `dest` (which must not exist yet) if the
/// stream hashes to `content`; otherwise refuses with [`ImageError::Digest`] and leaves
/// nothing behind. The tree is written under a `.NAME.partial` sibling and renamed when
/// complete and verified.
pub fn receive_dir(
    dest: &Path,
    content: &Digest,
    reader: impl Read,
    limits: &Limits,
) -> Result<(), ImageError> {
    let name = dest.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let partial = dest.with_file_name(format!(".{name}.partial"));
    if partial.exists() {
        fs::remove_dir_all(&partial).map_err(at("remove", &partial))?;
    }
    fs::create_dir(&partial).map_err(at("mkdir", &partial))?;
    let done = (|| {
        let mut budget = limits.image_bytes;
        let mut hashing = Hashing::new(reader);
        let unpacked = unpack(&mut hashing, &partial, &name, limits, &mut budget);
        let (actual, _, _) = hashing.finish().map_err(|e| ImageError::Layer {
            layer: name.clone(),
            reason: format!("reading the copy: {e}"),
        })?;
        if &actual != content {
            return Err(ImageError::Digest {
                what: "layer copy (canonical tar)",
                name: name.clone(),
                expected: content.to_string(),
                actual: actual.to_string(),
            });
        }
        unpacked?;
        let root = fs::File::open(&partial).map_err(at("open", &partial))?;
        rustix::fs::syncfs(&root).map_err(|e| at("syncfs", &partial)(e.into()))?;
        fs::rename(&partial, dest).map_err(at("rename", &partial))
    })();
    if done.is_err() {
        let _ = fs::remove_dir_all(&partial);
    }
    done
}

impl Store {
    /// Stores layer `rec` (its `diff_id` names it, as on the sending node) from `reader`, a
    /// peer's canonical tar of it, if the stream hashes to `content`; otherwise refuses with
    /// [`ImageError::Digest`] and leaves nothing behind. A layer already stored is kept as it
    /// is (the stream is not read). Returns whether the layer was added.
    pub fn receive_layer(
        &self,
        rec: &LayerRecord,
        content: &Digest,
        reader: impl Read,
        limits: &Limits,
    ) -> Result<bool, ImageError> {
        let diff_id = Digest::parse(&rec.diff_id)?;
        if self.known_layer(&diff_id).is_some() {
            return Ok(false);
        }
        let scratch = self.build_scratch()?;
        let tmp = scratch.dir.join("layer");
        fs::create_dir(&tmp).map_err(at("mkdir", &tmp))?;
        let mut budget = limits.image_bytes;
        let mut hashing = Hashing::new(reader);
        let unpacked = unpack(&mut hashing, &tmp, &rec.diff_id, limits, &mut budget);
        // Hashed to the end even when unpacking failed: a tampered stream is reported as that,
        // not as whatever its bytes broke.
        let (actual, _, _) = hashing.finish().map_err(|e| ImageError::Layer {
            layer: rec.diff_id.clone(),
            reason: format!("reading the transfer: {e}"),
        })?;
        if &actual != content {
            return Err(ImageError::Digest {
                what: "layer transfer (canonical tar)",
                name: rec.diff_id.clone(),
                expected: content.to_string(),
                actual: actual.to_string(),
            });
        }
        let stats = unpacked?;
        let mut stored = rec.clone();
        stored.entries = stats.entries;
        stored.bytes = stats.bytes;
        // The scratch directory (and `tmp` in it, if the commit did not move it) goes with
        // `scratch` when it drops.
        self.commit_layer(&tmp, &diff_id, stored)?;
        Ok(true)
    }

    /// Removes layer `diff_id` if no template names it (a fetch that failed part way removes
    /// the layers it added).
    pub fn forget_layer(&self, diff_id: &str) -> Result<(), ImageError> {
        let d = Digest::parse(diff_id)?;
        let _lock = self.lock()?;
        for t in self.list()? {
            if t.layers.iter().any(|l| l.diff_id == diff_id) {
                return Ok(());
            }
        }
        let dir = self.layer_dir(&d);
        if dir.exists() {
            fs::remove_dir_all(&dir).map_err(at("remove", &dir))?;
        }
        let side = dir.with_extension("json");
        if side.exists() {
            fs::remove_file(&side).map_err(at("remove", &side))?;
        }
        Ok(())
    }
}
