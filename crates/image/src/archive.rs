//! Image files on disk: a docker-archive (`docker save`: `manifest.json`, a config and layer
//! tars) or an OCI image layout (`oci-layout`, `index.json`, `blobs/sha256/...`), each either
//! a directory or a tar of one. Both are read in place: a tar is indexed once (entry offsets)
//! and blobs are read from it by seeking, never unpacked to a temporary copy.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use crate::error::{ImageError, at};
use crate::oci::{self, ConfigFile, Descriptor, Digest, Index, Manifest};

/// Largest manifest, index or config read into memory.
pub const MAX_JSON: u64 = 16 << 20;

/// Where an image's blobs come from (an archive, a directory, a registry).
pub trait Blobs {
    /// Whether `path` (a path in an archive, or a digest for a registry) exists.
    fn exists(&mut self, path: &str) -> bool;
    /// Opens `path` for streaming, with its size where known.
    fn open(&mut self, path: &str) -> Result<(Box<dyn Read + '_>, Option<u64>), ImageError>;
    /// Reads a small file (JSON), refusing one larger than `max`.
    fn read_small(&mut self, path: &str, max: u64) -> Result<Vec<u8>, ImageError> {
        let (mut r, _) = self.open(path)?;
        let mut out = Vec::new();
        r.by_ref()
            .take(max + 1)
            .read_to_end(&mut out)
            .map_err(|e| ImageError::Format(format!("{path}: {e}")))?;
        if out.len() as u64 > max {
            return Err(ImageError::Format(format!("{path}: larger than {max} bytes")));
        }
        Ok(out)
    }
}

/// One layer to fetch: where its blob is, and what it must hash to.
#[derive(Debug, Clone)]
pub struct PlannedLayer {
    /// The blob's path in the archive, or its digest for a registry.
    pub location: String,
    /// The compressed blob's digest, where the format gives one (not legacy docker-archives,
    /// whose layers are checked by their diff_id alone).
    pub blob: Option<Digest>,
    pub size: Option<u64>,
    pub media_type: String,
}

/// What an import will install: the verified config and the layers to fetch, bottom first.
#[derive(Debug, Clone)]
pub struct Plan {
    pub config: ConfigFile,
    pub config_digest: Digest,
    pub manifest_digest: Option<Digest>,
    pub layers: Vec<PlannedLayer>,
    /// A name the archive carries (`RepoTags`, `org.opencontainers.image.ref.name`).
    pub suggested_name: Option<String>,
}

/// Opens an image file or directory as a source of blobs.
pub fn open(path: &Path) -> Result<Box<dyn Blobs>, ImageError> {
    let meta = std::fs::metadata(path).map_err(at("open", path))?;
    if meta.is_dir() {
        return Ok(Box::new(DirBlobs { root: path.to_path_buf() }));
    }
    let mut file = File::open(path).map_err(at("open", path))?;
    let mut magic = [0u8; 4];
    let n = file.read(&mut magic).map_err(at("read", path))?;
    if magic[..n].starts_with(&[0x1f, 0x8b]) || magic[..n].starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        return Err(ImageError::Format(format!(
            "{}: a compressed file; decompress it first (`docker save` writes a plain tar)",
            path.display()
        )));
    }
    file.seek(SeekFrom::Start(0)).map_err(at("seek", path))?;
    TarBlobs::index(file, path).map(|t| Box::new(t) as Box<dyn Blobs>)
}

/// Reads the plan out of an OCI layout or a docker-archive.
pub fn plan(blobs: &mut dyn Blobs) -> Result<Plan, ImageError> {
    if blobs.exists("oci-layout") && blobs.exists("index.json") {
        plan_oci(blobs)
    } else if blobs.exists("manifest.json") {
        plan_docker(blobs)
    } else {
        Err(ImageError::Format(
            "neither an OCI image layout (oci-layout, index.json) nor a docker-archive \
             (manifest.json)"
                .into(),
        ))
    }
}

fn blob_path(d: &Digest) -> String {
    format!("blobs/sha256/{}", d.hex())
}

fn plan_oci(blobs: &mut dyn Blobs) -> Result<Plan, ImageError> {
    let index: Index = oci::json(&blobs.read_small("index.json", MAX_JSON)?, "index.json")?;
    if index.manifests.is_empty() {
        return Err(ImageError::Format("index.json lists no image".into()));
    }
    let mut desc: Descriptor = if index.manifests.len() == 1 {
        index.manifests[0].clone()
    } else {
        oci::pick_platform(&index, "index.json")?.clone()
    };
    let suggested = desc.annotations.get("org.opencontainers.image.ref.name").cloned();
    // Nested indexes (a multi-platform image saved whole): descend to linux/amd64.
    for _ in 0..4 {
        let digest = Digest::parse(&desc.digest)?;
        let bytes = blobs.read_small(&blob_path(&digest), MAX_JSON)?;
        digest.verify(&bytes, "manifest", desc.digest.as_str())?;
        let is_index =
            desc.media_type == oci::MT_OCI_INDEX || desc.media_type == oci::MT_DOCKER_LIST;
        if is_index {
            let inner: Index = oci::json(&bytes, "image index")?;
            desc = oci::pick_platform(&inner, "image index")?.clone();
            continue;
        }
        let manifest: Manifest = oci::json(&bytes, "manifest")?;
        let mut plan = plan_manifest(blobs, &manifest, Some(digest))?;
        plan.suggested_name = suggested;
        return Ok(plan);
    }
    Err(ImageError::Format("image indexes nested more than 4 deep".into()))
}

/// The plan for an OCI or Docker schema 2 manifest whose blobs are at `blobs/sha256/<hex>`
/// (an OCI layout) or reachable by digest (a registry: see [`Blobs`]).
pub fn plan_manifest(
    blobs: &mut dyn Blobs,
    manifest: &Manifest,
    manifest_digest: Option<Digest>,
) -> Result<Plan, ImageError> {
    plan_manifest_at(blobs, manifest, manifest_digest, blob_path)
}

pub(crate) fn plan_manifest_at(
    blobs: &mut dyn Blobs,
    manifest: &Manifest,
    manifest_digest: Option<Digest>,
    locate: fn(&Digest) -> String,
) -> Result<Plan, ImageError> {
    let config_digest = Digest::parse(&manifest.config.digest)?;
    let bytes = blobs.read_small(&locate(&config_digest), MAX_JSON)?;
    config_digest.verify(&bytes, "config", config_digest.as_str())?;
    let config: ConfigFile = oci::json(&bytes, "image config")?;
    let mut layers = Vec::with_capacity(manifest.layers.len());
    for l in &manifest.layers {
        let d = Digest::parse(&l.digest)?;
        layers.push(PlannedLayer {
            location: locate(&d),
            blob: Some(d),
            size: Some(l.size),
            media_type: l.media_type.clone(),
        });
    }
    Ok(Plan { config, config_digest, manifest_digest, layers, suggested_name: None })
}

#[derive(Debug, serde::Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerManifest {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

fn plan_docker(blobs: &mut dyn Blobs) -> Result<Plan, ImageError> {
    let list: Vec<DockerManifest> =
        oci::json(&blobs.read_small("manifest.json", MAX_JSON)?, "manifest.json")?;
    let m = match list.as_slice() {
        [one] => one,
        [] => return Err(ImageError::Format("manifest.json lists no image".into())),
        many => {
            return Err(ImageError::Format(format!(
                "manifest.json lists {} images; save one image per archive",
                many.len()
            )));
        }
    };
    let bytes = blobs.read_small(&m.config, MAX_JSON)?;
    // The config's name is its digest (`<hex>.json`, or `blobs/sha256/<hex>` since Docker 25);
    // an archive that names it otherwise is still checked through its diff_ids.
    let config_digest = match digest_in_name(&m.config) {
        Some(d) => {
            d.verify(&bytes, "config", &m.config)?;
            d
        }
        None => Digest::of(&bytes),
    };
    let config: ConfigFile = oci::json(&bytes, "image config")?;
    let layers = m
        .layers
        .iter()
        .map(|p| PlannedLayer {
            location: p.clone(),
            blob: p
                .strip_prefix("blobs/sha256/")
                .and_then(|h| Digest::parse(&format!("sha256:{h}")).ok()),
            size: None,
            media_type: String::new(),
        })
        .collect();
    let suggested_name = m.repo_tags.as_ref().and_then(|t| t.first().cloned());
    Ok(Plan { config, config_digest, manifest_digest: None, layers, suggested_name })
}

fn digest_in_name(path: &str) -> Option<Digest> {
    let base = path.rsplit('/').next()?;
    let hex = base.strip_suffix(".json").unwrap_or(base);
    Digest::parse(&format!("sha256:{hex}")).ok()
}

/// Normalises a path inside an archive: relative, no `..`, no empty or `.` parts.
fn normalize(path: &str) -> Option<String> {
    let mut parts = Vec::new();
    for c in path.split('/') {
        match c {
            "" | "." => {}
            ".." => return None,
            c => parts.push(c),
        }
    }
    (!path.starts_with('/') && !parts.is_empty()).then(|| parts.join("/"))
}

/// An image directory.
#[derive(Debug)]
struct DirBlobs {
    root: PathBuf,
}

impl DirBlobs {
    fn path(&self, path: &str) -> Result<PathBuf, ImageError> {
        normalize(path)
            .map(|p| self.root.join(p))
            .ok_or_else(|| ImageError::Format(format!("path {path:?} leaves the image directory")))
    }
}

impl Blobs for DirBlobs {
    fn exists(&mut self, path: &str) -> bool {
        self.path(path).is_ok_and(|p| p.is_file())
    }

    fn open(&mut self, path: &str) -> Result<(Box<dyn Read + '_>, Option<u64>), ImageError> {
        let p = self.path(path)?;
        // Beneath the image directory and through no symlink: a path named in the image's
        // own JSON never reaches another host file.
        let root = File::open(&self.root).map_err(at("open", &self.root))?;
        let rel = p.strip_prefix(&self.root).unwrap_or(&p);
        let how = rustix::fs::ResolveFlags::BENEATH | rustix::fs::ResolveFlags::NO_SYMLINKS;
        let fd = rustix::fs::openat2(
            &root,
            rel,
            rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
            how,
        )
        .map_err(|e| at("open (no symlinks, inside the image directory)", &p)(e.into()))?;
        let f = File::from(fd);
        let size = f.metadata().map_err(at("stat", &p))?.len();
        Ok((Box::new(f), Some(size)))
    }
}

/// An image tar, indexed: each regular file's data offset and size.
#[derive(Debug)]
struct TarBlobs {
    file: File,
    path: PathBuf,
    files: HashMap<String, (u64, u64)>,
    links: HashMap<String, String>,
}

impl TarBlobs {
    fn index(file: File, path: &Path) -> Result<TarBlobs, ImageError> {
        let bad = |e: io::Error| {
            ImageError::Format(format!("{}: not a readable tar: {e}", path.display()))
        };
        let mut files = HashMap::new();
        let mut links = HashMap::new();
        {
            // Indexing reads only headers (bodies are skipped by seeking), and the tar reader
            // holds PAX records and long names in memory: both are bounded here.
            let headers = HeaderReader { file: &file, left: MAX_INDEX_READ };
            let mut archive = tar::Archive::new(headers);
            for (n, entry) in archive.entries_with_seek().map_err(bad)?.enumerate() {
                if n >= MAX_ARCHIVE_ENTRIES {
                    return Err(ImageError::Format(format!(
                        "{}: more than {MAX_ARCHIVE_ENTRIES} files in the image archive",
                        path.display()
                    )));
                }
                let entry = entry.map_err(bad)?;
                let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
                let Some(name) = normalize(&name) else { continue };
                match entry.header().entry_type() {
                    tar::EntryType::Regular | tar::EntryType::Continuous => {
                        files.insert(name, (entry.raw_file_position(), entry.size()));
                    }
                    // Legacy `docker save` links a layer that repeats to its first copy.
                    tar::EntryType::Symlink | tar::EntryType::Link => {
                        if let Some(target) = entry.link_name_bytes() {
                            let target = String::from_utf8_lossy(&target).into_owned();
                            let base = match (entry.header().entry_type(), name.rsplit_once('/')) {
                                (tar::EntryType::Symlink, Some((dir, _))) => {
                                    format!("{dir}/{target}")
                                }
                                _ => target,
                            };
                            if let Some(t) = normalize_dots(&base) {
                                links.insert(name, t);
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
        Ok(TarBlobs { file, path: path.to_path_buf(), files, links })
    }

    fn find(&self, path: &str) -> Option<(u64, u64)> {
        let mut name = normalize(path)?;
        for _ in 0..8 {
            if let Some(found) = self.files.get(&name) {
                return Some(*found);
            }
            name = self.links.get(&name)?.clone();
        }
        None
    }
}

/// Most files an image archive may hold (blobs, manifests, configs).
const MAX_ARCHIVE_ENTRIES: usize = 100_000;
/// Most header bytes (headers, PAX records, long names) read while indexing an archive.
const MAX_INDEX_READ: u64 = 64 << 20;

/// The archive file as the indexer reads it: seeks pass through, reads are capped.
struct HeaderReader<'f> {
    file: &'f File,
    left: u64,
}

impl Read for HeaderReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.left == 0 {
            return Err(io::Error::other(format!(
                "more than {MAX_INDEX_READ} bytes of tar headers (PAX records, long names)"
            )));
        }
        let room = usize::try_from(self.left).unwrap_or(usize::MAX).min(buf.len());
        let n = self.file.read(&mut buf[..room])?;
        self.left -= n as u64;
        Ok(n)
    }
}

impl Seek for HeaderReader<'_> {
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        self.file.seek(pos)
    }
}

/// Resolves `..` lexically within the archive (a link's target); `None` if it climbs out.
fn normalize_dots(path: &str) -> Option<String> {
    let mut parts: Vec<&str> = Vec::new();
    for c in path.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop()?;
            }
            c => parts.push(c),
        }
    }
    (!parts.is_empty()).then(|| parts.join("/"))
}

impl Blobs for TarBlobs {
    fn exists(&mut self, path: &str) -> bool {
        self.find(path).is_some()
    }

    fn open(&mut self, path: &str) -> Result<(Box<dyn Read + '_>, Option<u64>), ImageError> {
        let (offset, size) = self.find(path).ok_or_else(|| {
            ImageError::Format(format!("{}: has no file {path:?}", self.path.display()))
        })?;
        self.file.seek(SeekFrom::Start(offset)).map_err(at("seek", &self.path))?;
        Ok((Box::new((&self.file).take(size)), Some(size)))
    }
}
