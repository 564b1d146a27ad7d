//! Builders for test images: raw tar entries (any path bytes, including hostile ones the
//! `tar` crate's own builder refuses), gzip, docker-archives and OCI layouts.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::path::Path;

use sha2::{Digest, Sha256};

pub fn sha(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// A tar stream built entry by entry.
#[derive(Default)]
pub struct Tar {
    pub bytes: Vec<u8>,
}

pub struct E<'a> {
    pub path: &'a [u8],
    pub kind: tar::EntryType,
    pub link: &'a [u8],
    pub data: &'a [u8],
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    pub dev: (u32, u32),
}

impl Default for E<'_> {
    fn default() -> Self {
        E {
            path: b"",
            kind: tar::EntryType::Regular,
            link: b"",
            data: b"",
            mode: 0o644,
            uid: 0,
            gid: 0,
            dev: (0, 0),
        }
    }
}

impl Tar {
    pub fn entry(&mut self, e: E<'_>) -> &mut Self {
        let mut h = tar::Header::new_gnu();
        {
            let g = h.as_gnu_mut().unwrap();
            g.name[..e.path.len()].copy_from_slice(e.path);
            g.linkname[..e.link.len()].copy_from_slice(e.link);
        }
        h.set_entry_type(e.kind);
        h.set_size(e.data.len() as u64);
        h.set_mode(e.mode);
        h.set_uid(e.uid);
        h.set_gid(e.gid);
        h.set_mtime(1_700_000_000);
        if matches!(e.kind, tar::EntryType::Char | tar::EntryType::Block) {
            h.set_device_major(e.dev.0).unwrap();
            h.set_device_minor(e.dev.1).unwrap();
        }
        h.set_cksum();
        self.raw(h.as_bytes(), e.data);
        self
    }

    pub fn file(&mut self, path: &str, data: &[u8], mode: u32) -> &mut Self {
        self.entry(E { path: path.as_bytes(), data, mode, ..E::default() })
    }

    pub fn dir(&mut self, path: &str) -> &mut Self {
        self.entry(E {
            path: path.as_bytes(),
            kind: tar::EntryType::Directory,
            mode: 0o755,
            ..E::default()
        })
    }

    pub fn symlink(&mut self, path: &str, target: &str) -> &mut Self {
        self.entry(E {
            path: path.as_bytes(),
            kind: tar::EntryType::Symlink,
            link: target.as_bytes(),
            mode: 0o777,
            ..E::default()
        })
    }

    pub fn hardlink(&mut self, path: &str, target: &str) -> &mut Self {
        self.entry(E {
            path: path.as_bytes(),
            kind: tar::EntryType::Link,
            link: target.as_bytes(),
            ..E::default()
        })
    }

    /// A GNU sparse file of `real` bytes whose only data is 512 bytes at its end.
    pub fn sparse(&mut self, path: &str, real: u64) -> &mut Self {
        let mut h = tar::Header::new_gnu();
        {
            let g = h.as_gnu_mut().unwrap();
            g.name[..path.len()].copy_from_slice(path.as_bytes());
            g.set_real_size(real);
            g.sparse[0].offset = octal12(real - 512);
            g.sparse[0].numbytes = octal12(512);
        }
        h.set_entry_type(tar::EntryType::GNUSparse);
        h.set_size(512);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_cksum();
        self.raw(h.as_bytes(), &[7u8; 512]);
        self
    }

    pub fn raw(&mut self, header: &[u8], data: &[u8]) {
        self.bytes.extend_from_slice(header);
        self.bytes.extend_from_slice(data);
        let pad = (512 - data.len() % 512) % 512;
        self.bytes.extend(std::iter::repeat_n(0u8, pad));
    }

    pub fn finish(&mut self) -> Vec<u8> {
        let mut out = std::mem::take(&mut self.bytes);
        out.extend(std::iter::repeat_n(0u8, 1024));
        out
    }
}

/// A 12-byte tar numeric field (NUL-terminated where it fits).
fn octal12(v: u64) -> [u8; 12] {
    let text = format!("{v:011o}");
    let mut out = [0u8; 12];
    out[..text.len()].copy_from_slice(text.as_bytes());
    out
}

pub fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

fn config_json(diff_ids: &[String], env: &[&str], workdir: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "created": "2026-01-01T00:00:00Z",
        "config": {
            "Env": env,
            "WorkingDir": workdir,
            "Cmd": ["sh"],
            "Labels": {"test": "yes"}
        },
        "rootfs": {"type": "layers", "diff_ids": diff_ids}
    }))
    .unwrap()
}

/// A `docker save` archive (legacy layout: `<n>/layer.tar`) of plain tar layers, bottom first.
pub fn docker_archive(out: &Path, layers: &[Vec<u8>], env: &[&str], workdir: &str) {
    let diff_ids: Vec<String> = layers.iter().map(|l| sha(l)).collect();
    let config = config_json(&diff_ids, env, workdir);
    let config_name = format!("{}.json", &sha(&config)[7..]);
    let mut b = tar::Builder::new(std::fs::File::create(out).unwrap());
    let mut add = |name: &str, data: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, name, data).unwrap();
    };
    let mut paths = Vec::new();
    for (i, l) in layers.iter().enumerate() {
        let p = format!("layer{i}/layer.tar");
        add(&p, l);
        paths.push(p);
    }
    add(&config_name, &config);
    let manifest = serde_json::to_vec(&serde_json::json!([{
        "Config": config_name, "RepoTags": ["example/test:v1"], "Layers": paths
    }]))
    .unwrap();
    add("manifest.json", &manifest);
    b.into_inner().unwrap().flush().unwrap();
}

/// An OCI image layout directory with gzip layers (given uncompressed, bottom first).
/// `tamper` changes one byte of the stored blob of that layer after its digest is taken.
pub fn oci_layout(dir: &Path, layers: &[Vec<u8>], tamper: Option<usize>) -> String {
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let put = |bytes: &[u8]| -> String {
        let d = sha(bytes);
        std::fs::write(blobs.join(&d[7..]), bytes).unwrap();
        d
    };
    let diff_ids: Vec<String> = layers.iter().map(|l| sha(l)).collect();
    let mut descs = Vec::new();
    for (i, l) in layers.iter().enumerate() {
        let gz = gzip(l);
        let d = put(&gz);
        if tamper == Some(i) {
            // Valid gzip of the same content, other bytes: only the blob digest tells.
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
            e.write_all(l).unwrap();
            let other = e.finish().unwrap();
            assert_ne!(other, gz);
            std::fs::write(blobs.join(&d[7..]), other).unwrap();
        }
        descs.push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": d, "size": gz.len()
        }));
    }
    let config = config_json(&diff_ids, &["PATH=/bin", "GREETING=hi"], "/");
    let cd = put(&config);
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": config.len()},
        "layers": descs
    }))
    .unwrap();
    let md = put(&manifest);
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": md, "size": manifest.len(),
            "annotations": {"org.opencontainers.image.ref.name": "latest"}
        }]
    });
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    md
}

/// Tars up a directory (an OCI layout as a single file).
pub fn tar_dir(dir: &Path, out: &Path) {
    let mut b = tar::Builder::new(std::fs::File::create(out).unwrap());
    b.append_dir_all(".", dir).unwrap();
    b.into_inner().unwrap().flush().unwrap();
}
