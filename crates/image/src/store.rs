//! The image store under `<data-dir>/images`:
//!
//! - `layers/sha256-<diff_id hex>/`: one unpacked layer, content-addressed by the digest of its
//!   uncompressed tar (so shared between images, and an existing one is reused, never
//!   unpacked again), with `sha256-<hex>.json` beside it (what it holds);
//! - `templates/<name>:<tag>.json`: one image template ([`Record`]);
//! - `skeleton-<n>/`: the bottom lower layer under every image (the mount points the jail
//!   needs, see [`Store::skeleton`]).
//!
//! Every directory is mode 0700: the host mounts the layers into sandboxes through each one's
//! id mapping; no sandbox id and no other host user needs a path in. A layer is unpacked into
//! `.sha256-<hex>.partial` and renamed when complete and verified, so a failure (or a crash)
//! leaves no directory under a final name; the partial ones are removed by the next import.
//! One lock (`.lock`) serialises the writers (import, pull, rm).

use std::collections::BTreeSet;
use std::fs;
use std::io::{BufReader, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::archive::{Blobs, Plan, PlannedLayer};
use crate::error::{ImageError, at};
use crate::oci::{Compression, Digest, Hashing, RunConfig, sniff};
use crate::unpack::{LayerStats, Limits, unpack};

/// Template names that are not images (built into the jail).
pub const RESERVED: &[&str] = &["host", "base", "code-interpreter-v1"];

/// One image template as recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// `name:tag`.
    pub name: String,
    /// Where it came from (`import FILE`, `pull REF`).
    pub source: String,
    pub manifest_digest: Option<String>,
    pub config_digest: String,
    /// Layers, topmost first (the order of overlayfs' `lowerdir`).
    pub layers: Vec<LayerRecord>,
    pub config: RunConfig,
    /// When the image itself says it was made.
    pub image_created: Option<String>,
    /// When it was imported (seconds since the epoch).
    pub imported_unix: u64,
    /// Bytes of file content over all layers.
    pub size: u64,
    /// Setuid binaries in the template may raise a process to the sandbox's own root (`sudo`
    /// in the Debian base `ringfence template bootstrap` makes). Off for every imported,
    /// pulled or built image: their setuid bits stay inert (see docs/SECURITY.md).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_setuid: bool,
    /// The start command and ready check of a template built with E2B's Template SDK
    /// (`set_start_cmd`): a sandbox from it runs the one and answers create once the other
    /// exits 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start: Option<StartCmd>,
    /// The API key that built it through the API (its tenant); `None`: the operator's, which
    /// every key may use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
}

/// A template's start command and the shell command that says it is ready.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StartCmd {
    pub start: String,
    pub ready: String,
}

/// One layer of a template, and what it holds (also kept beside the layer, for reuse).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerRecord {
    /// The layer's address: an OCI layer's diff_id, or for a layer a build made, the sha256
    /// of its build cache key (see [`crate::build`]).
    pub diff_id: String,
    pub entries: u64,
    pub bytes: u64,
    pub stream_bytes: u64,
    /// For a layer a build made: the instruction that made it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_by: Option<String>,
}

/// What an import reports as it goes (a terminal display, or nothing).
pub trait Progress {
    /// Layer `n` of `total` (1-based) starts; `reused` if it is already in the store.
    fn layer_start(
        &mut self,
        n: usize,
        total: usize,
        diff_id: &str,
        size: Option<u64>,
        reused: bool,
    );
    /// Compressed bytes of the current layer read so far.
    fn bytes(&mut self, read: u64);
    fn layer_done(&mut self, n: usize, total: usize, stats: &LayerStats);
    /// Something the operator should know (a skipped entry, a changed owner).
    fn note(&mut self, note: &str);
}

/// A [`Progress`] that reports nothing.
#[derive(Debug, Default)]
pub struct Quiet;

impl Progress for Quiet {
    fn layer_start(&mut self, _: usize, _: usize, _: &str, _: Option<u64>, _: bool) {}
    fn bytes(&mut self, _: u64) {}
    fn layer_done(&mut self, _: usize, _: usize, _: &LayerStats) {}
    fn note(&mut self, _: &str) {}
}

/// What removing a template did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Removed {
    pub layers_removed: usize,
    pub layers_kept: usize,
}

/// A template ready to start sandboxes from.
#[derive(Debug, Clone)]
pub struct Runnable {
    pub record: Record,
    /// The image's layer directories, topmost first.
    pub layers: Vec<PathBuf>,
    /// The bottom layer: mount points the jail needs.
    pub skeleton: PathBuf,
    /// Whether the image's `/etc/passwd` has a user with uid 1000 (the sandbox's `user`).
    pub has_user_1000: bool,
}

impl Runnable {
    /// The image's `Env` as a map (`K=V` entries; malformed and nameless ones dropped): the
    /// defaults a sandbox from this image starts with.
    pub fn env(&self) -> std::collections::BTreeMap<String, String> {
        config_env(&self.record)
    }
}

/// A record's `Env` as a map (`K=V` entries; malformed and nameless ones dropped).
pub(crate) fn config_env(record: &Record) -> std::collections::BTreeMap<String, String> {
    record
        .config
        .env
        .iter()
        .flatten()
        .filter_map(|kv| kv.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())))
        .filter(|(k, _)| !k.is_empty())
        .collect()
}

/// The image store of one data directory.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

pub(crate) const SKELETON: &str = "skeleton-4";

impl Store {
    /// The store under `data_dir/images`, created (mode 0700) if missing.
    pub fn open(data_dir: &Path) -> Result<Store, ImageError> {
        let root = data_dir.join("images");
        for dir in [root.clone(), root.join("layers"), root.join("templates")] {
            fs::create_dir_all(&dir).map_err(at("mkdir", &dir))?;
            fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))
                .map_err(at("chmod", &dir))?;
        }
        Ok(Store { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn layer_dir(&self, diff_id: &Digest) -> PathBuf {
        self.root.join("layers").join(format!("sha256-{}", diff_id.hex()))
    }

    fn record_path(&self, name: &str) -> PathBuf {
        self.root.join("templates").join(format!("{name}.json"))
    }

    pub(crate) fn lock(&self) -> Result<nix_free_lock::Lock, ImageError> {
        nix_free_lock::Lock::take(&self.root.join(".lock"))
    }

    /// The record of template `name` (`name` or `name:tag`; the tag defaults to `latest`).
    pub fn get(&self, name: &str) -> Result<Record, ImageError> {
        let full = normalize_name(name)?;
        let path = self.record_path(&full);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(ImageError::NotFound(full));
            }
            Err(e) => return Err(at("read", &path)(e)),
        };
        serde_json::from_slice(&bytes)
            .map_err(|e| ImageError::Format(format!("{}: {e}", path.display())))
    }

    /// Whether `name` names an image template here.
    pub fn contains(&self, name: &str) -> bool {
        normalize_name(name).is_ok_and(|n| self.record_path(&n).is_file())
    }

    /// Every template, by name.
    pub fn list(&self) -> Result<Vec<Record>, ImageError> {
        let dir = self.root.join("templates");
        let mut out = Vec::new();
        for e in fs::read_dir(&dir).map_err(at("readdir", &dir))? {
            let e = e.map_err(at("readdir", &dir))?;
            let file = e.file_name().to_string_lossy().into_owned();
            if let Some(name) = file.strip_suffix(".json")
                && !file.starts_with('.')
            {
                out.push(self.get(name)?);
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Removes template `name`, and the layers no other template uses. Refused while a
    /// sandbox runs from it or a build uses it as its base (see [`Store::in_use`]); other
    /// templates in use do not stop it.
    pub fn remove(&self, name: &str) -> Result<Removed, ImageError> {
        let _lock = self.lock()?;
        let record = self.get(name)?;
        let Some(_idle) = self.idle(&record.name)? else {
            return Err(ImageError::InUse(record.name));
        };
        let path = self.record_path(&record.name);
        fs::remove_file(&path).map_err(at("remove", &path))?;
        let removed = self.collect(&record)?;
        // Its cached disk images go with it, unless another template has the same layers.
        self.sweep_exports()?;
        Ok(removed)
    }

    /// A shared claim on template `name`, held by whoever runs a sandbox from it (or builds
    /// on it): while any is held, the template is not removed, nor are the layers of the
    /// version it replaced collected when it is rebuilt (their directories are the sandbox's
    /// lower layers). One lock file per template (`inuse/<name>:<tag>`, kept: removing it
    /// could split holders and a remover across two inodes), so claims on one template never
    /// hold up removing another.
    pub fn in_use(&self, name: &str) -> Result<InUse, ImageError> {
        let f = self.claim_file(name)?;
        f.lock_shared().map_err(at("lock", self.claim_path(name)?))?;
        Ok(InUse { _held: f })
    }

    /// The processes that hold a lock on template `name`'s claim file now (from the kernel's
    /// `/proc/locks`), each as its pid and command name: what an operator needs when a
    /// removal is refused as [`ImageError::InUse`] although no sandbox or build names it.
    pub fn claim_holders(&self, name: &str) -> Vec<(i32, String)> {
        use std::os::unix::fs::MetadataExt;
        let Ok(meta) = self.claim_path(name).and_then(|p| fs::metadata(&p).map_err(at("stat", &p)))
        else {
            return Vec::new();
        };
        let locks = fs::read_to_string("/proc/locks").unwrap_or_default();
        let mut pids: Vec<i32> = locks
            .lines()
            .filter_map(|l| {
                // "1: FLOCK  ADVISORY  READ 1234 08:01:5678 0 EOF" (a "->" marks a waiter).
                let f: Vec<&str> = l.split_whitespace().filter(|w| *w != "->").collect();
                // The device as MAJ:MIN in hex, then the inode in decimal.
                let mut id = f.get(5)?.split(':');
                let major = u32::from_str_radix(id.next()?, 16).ok()?;
                let minor = u32::from_str_radix(id.next()?, 16).ok()?;
                let inode = id.next()?.parse::<u64>().ok()?;
                let dev = rustix::fs::makedev(major, minor);
                (inode == meta.ino() && dev == meta.dev()).then(|| f.get(4)?.parse().ok()).flatten()
            })
            .collect();
        pids.sort_unstable();
        pids.dedup();
        pids.into_iter()
            .map(|p| {
                let comm = fs::read_to_string(format!("/proc/{p}/comm")).unwrap_or_default();
                (p, comm.trim().to_string())
            })
            .collect()
    }

    fn claim_path(&self, name: &str) -> Result<PathBuf, ImageError> {
        Ok(self.root.join("inuse").join(normalize_name(name)?))
    }

    fn claim_file(&self, name: &str) -> Result<fs::File, ImageError> {
        let path = self.claim_path(name)?;
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir).map_err(at("mkdir", dir))?;
        }
        fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(at("create", &path))
    }

    /// Whether anything holds a claim on template `name` now ([`Store::in_use`]).
    pub fn is_in_use(&self, name: &str) -> Result<bool, ImageError> {
        Ok(self.idle(name)?.is_none())
    }

    /// The exclusive side of [`Store::in_use`] for template `name`, if nothing holds it.
    fn idle(&self, name: &str) -> Result<Option<InUse>, ImageError> {
        let path = self.claim_path(name)?;
        let f = self.claim_file(name)?;
        match f.try_lock() {
            Ok(()) => Ok(Some(InUse { _held: f })),
            Err(fs::TryLockError::WouldBlock) => Ok(None),
            Err(fs::TryLockError::Error(e)) => Err(at("lock", &path)(e)),
        }
    }

    /// Removes the layers of `old` that no template references any more.
    fn collect(&self, old: &Record) -> Result<Removed, ImageError> {
        let mut used: BTreeSet<String> =
            self.list()?.iter().flat_map(|r| r.layers.iter().map(|l| l.diff_id.clone())).collect();
        // A snapshot's saved layer with the same content links to the same directory.
        used.extend(self.linked_layers());
        let mut out = Removed::default();
        let mut seen = BTreeSet::new();
        for l in &old.layers {
            if !seen.insert(l.diff_id.clone()) {
                continue;
            }
            if used.contains(&l.diff_id) {
                out.layers_kept += 1;
                continue;
            }
            let d = Digest::parse(&l.diff_id)?;
            let dir = self.layer_dir(&d);
            // Renamed aside first: a crash mid-removal leaves a `.partial` (swept), never a
            // half-deleted layer under its final name.
            let doomed = self.partial(&d);
            if dir.exists() {
                fs::rename(&dir, &doomed).map_err(at("rename", &dir))?;
                fs::remove_dir_all(&doomed).map_err(at("remove", &doomed))?;
            }
            let _ = fs::remove_file(dir.with_extension("json"));
            out.layers_removed += 1;
        }
        Ok(out)
    }

    fn partial(&self, d: &Digest) -> PathBuf {
        self.root.join("layers").join(format!(".sha256-{}.partial", d.hex()))
    }

    /// Removes what interrupted imports left.
    fn sweep_partials(&self) {
        let dir = self.root.join("layers");
        let Ok(rd) = fs::read_dir(&dir) else { return };
        for e in rd.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if n.starts_with('.') && n.ends_with(".partial") {
                let _ = fs::remove_dir_all(e.path());
            }
        }
    }

    /// Installs the image `plan` describes as template `name`, fetching its layers from
    /// `blobs` (those not already in the store). Replaces an existing template of that name.
    pub fn install(
        &self,
        plan: &Plan,
        blobs: &mut dyn Blobs,
        name: &str,
        source: String,
        limits: &Limits,
        progress: &mut dyn Progress,
    ) -> Result<Record, ImageError> {
        let name = normalize_name(name)?;
        let config = &plan.config;
        if !config.os.is_empty() && config.os != "linux" {
            return Err(ImageError::Format(format!("image is for {:?}, not linux", config.os)));
        }
        if !config.architecture.is_empty() && config.architecture != "amd64" {
            return Err(ImageError::Format(format!(
                "image is for {:?}, not amd64 (this host)",
                config.architecture
            )));
        }
        let diff_ids = &config.rootfs.diff_ids;
        if diff_ids.len() != plan.layers.len() {
            return Err(ImageError::Format(format!(
                "the manifest lists {} layers but the config's rootfs has {} diff_ids",
                plan.layers.len(),
                diff_ids.len()
            )));
        }
        let _lock = self.lock()?;
        self.sweep_partials();
        let mut budget = limits.image_bytes;
        let total = plan.layers.len();
        let mut layers = Vec::with_capacity(total);
        for (i, (layer, diff)) in plan.layers.iter().zip(diff_ids).enumerate() {
            let diff_id = Digest::parse(diff)?;
            let dir = self.layer_dir(&diff_id);
            let sidecar = dir.with_extension("json");
            let known: Option<LayerRecord> = fs::read(&sidecar)
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
                .filter(|_| dir.is_dir());
            let rec = match known {
                Some(rec) => {
                    progress.layer_start(i + 1, total, diff, layer.size, true);
                    if rec.stream_bytes > budget {
                        return Err(ImageError::Layer {
                            layer: diff.clone(),
                            reason: format!(
                                "the image exceeds its limit of {} bytes",
                                limits.image_bytes
                            ),
                        });
                    }
                    budget -= rec.stream_bytes;
                    rec
                }
                None => {
                    // A layer without its record beside it was left by a crash between the two
                    // writes; no template names it (records are written last): unpack afresh.
                    if dir.is_dir() {
                        fs::remove_dir_all(&dir).map_err(at("remove", &dir))?;
                    }
                    progress.layer_start(i + 1, total, diff, layer.size, false);
                    let stats =
                        self.fetch_layer(blobs, layer, &diff_id, limits, &mut budget, progress)?;
                    for n in &stats.notes {
                        progress.note(n);
                    }
                    progress.layer_done(i + 1, total, &stats);
                    let rec = LayerRecord {
                        diff_id: diff.clone(),
                        entries: stats.entries,
                        bytes: stats.bytes,
                        stream_bytes: stats.stream_bytes,
                        created_by: None,
                    };
                    write_atomic(&sidecar, &serde_json::to_vec_pretty(&rec).unwrap_or_default())?;
                    rec
                }
            };
            layers.push(rec);
        }
        layers.reverse();
        let record = Record {
            name: name.clone(),
            source,
            manifest_digest: plan.manifest_digest.as_ref().map(|d| d.to_string()),
            config_digest: plan.config_digest.to_string(),
            size: layers.iter().map(|l| l.bytes).sum(),
            layers,
            config: config.config.clone().unwrap_or_default(),
            image_created: config.created.clone(),
            imported_unix: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            allow_setuid: false,
            start: None,
            owner: None,
        };
        let old = self.get(&name).ok();
        let text = serde_json::to_vec_pretty(&record)
            .map_err(|e| ImageError::Format(format!("encode the record: {e}")))?;
        write_atomic(&self.record_path(&name), &text)?;
        // The replaced template's own layers go, unless a sandbox runs from it now (then they
        // stay until a later `rm`).
        if let Some(old) = old
            && let Some(_idle) = self.idle(&name)?
        {
            self.collect(&old)?;
        }
        Ok(record)
    }

    /// Streams one layer blob into `.partial`, checking its digests, and renames it into place.
    fn fetch_layer(
        &self,
        blobs: &mut dyn Blobs,
        layer: &PlannedLayer,
        diff_id: &Digest,
        limits: &Limits,
        budget: &mut u64,
        progress: &mut dyn Progress,
    ) -> Result<LayerStats, ImageError> {
        let name = layer.blob.as_ref().unwrap_or(diff_id).to_string();
        let partial = self.partial(diff_id);
        if partial.exists() {
            fs::remove_dir_all(&partial).map_err(at("remove", &partial))?;
        }
        fs::create_dir(&partial).map_err(at("mkdir", &partial))?;
        let result = self.fill(blobs, layer, diff_id, &name, &partial, limits, budget, progress);
        let done = result.and_then(|stats| {
            // The files' data reaches the disk before the name says the layer is complete
            // (one syncfs for the tree rather than an fsync per file), and the rename before
            // the template's record names the layer.
            let root = fs::File::open(&partial).map_err(at("open", &partial))?;
            rustix::fs::syncfs(&root).map_err(|e| at("syncfs", &partial)(e.into()))?;
            let dir = self.layer_dir(diff_id);
            fs::rename(&partial, &dir).map_err(at("rename", &partial))?;
            sync_parent(&dir)?;
            Ok(stats)
        });
        if done.is_err() {
            let _ = fs::remove_dir_all(&partial);
        }
        done
    }

    #[allow(clippy::too_many_arguments)]
    fn fill(
        &self,
        blobs: &mut dyn Blobs,
        layer: &PlannedLayer,
        diff_id: &Digest,
        name: &str,
        partial: &Path,
        limits: &Limits,
        budget: &mut u64,
        progress: &mut dyn Progress,
    ) -> Result<LayerStats, ImageError> {
        let (reader, size) = blobs.open(&layer.location)?;
        let layer_err = |reason: String| ImageError::Layer { layer: name.into(), reason };
        // A blob is never read past the size its descriptor (or the archive) gives, nor past
        // the layer cap where it has none.
        let bound = layer.size.or(size).unwrap_or(limits.layer_bytes);
        let counted = Counting { inner: reader.take(bound), read: 0, progress };
        let mut blob = Hashing::new(counted);
        let mut buffered = BufReader::with_capacity(256 << 10, &mut blob);
        let comp = sniff(&mut buffered).map_err(|e| layer_err(format!("read: {e}")))?;
        let unpacked = match comp {
            Compression::Gzip => {
                let mut d = Hashing::new(flate2::read::MultiGzDecoder::new(&mut buffered));
                unpack(&mut d, partial, name, limits, budget).and_then(|stats| {
                    let (digest, _, _) = d.finish().map_err(|e| layer_err(format!("gzip: {e}")))?;
                    Ok((stats, digest))
                })
            }
            Compression::None => {
                let mut d = Hashing::new(&mut buffered);
                unpack(&mut d, partial, name, limits, budget).and_then(|stats| {
                    let (digest, _, _) = d.finish().map_err(|e| layer_err(format!("read: {e}")))?;
                    Ok((stats, digest))
                })
            }
            Compression::Zstd => {
                let mut d = Hashing::new(crate::oci::Zstd::new(&mut buffered));
                unpack(&mut d, partial, name, limits, budget).and_then(|stats| {
                    let (digest, _, _) = d.finish().map_err(|e| layer_err(format!("zstd: {e}")))?;
                    Ok((stats, digest))
                })
            }
        };
        drop(buffered);
        // The blob's digest is checked even when unpacking failed: a corrupt or substituted
        // blob is reported as what it is, not as whatever its bytes broke. (Reading the rest
        // stays within the blob's declared size.)
        let digest = match (&layer.blob, blob.finish()) {
            (Some(expected), Ok((actual, _, _))) if &actual != expected => {
                return Err(ImageError::Digest {
                    what: "layer",
                    name: name.into(),
                    expected: expected.to_string(),
                    actual: actual.to_string(),
                });
            }
            (_, Ok((_, read, _))) => Ok(read),
            (_, Err(e)) => Err(layer_err(format!("read: {e}"))),
        };
        let (stats, actual_diff) = unpacked?;
        let read = digest?;
        if let Some(want) = layer.size.filter(|s| *s != read) {
            return Err(layer_err(format!("blob is {read} bytes, its descriptor says {want}")));
        }
        if &actual_diff != diff_id {
            return Err(ImageError::Digest {
                what: "layer (uncompressed, the config's diff_id)",
                name: name.into(),
                expected: diff_id.to_string(),
                actual: actual_diff.to_string(),
            });
        }
        Ok(stats)
    }

    /// A layer already in the store under `id` (its directory and its record beside it).
    pub fn known_layer(&self, id: &Digest) -> Option<LayerRecord> {
        let dir = self.layer_dir(id);
        fs::read(dir.with_extension("json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .filter(|_| dir.is_dir())
    }

    /// A scratch directory for one build, beside the layers (same filesystem, so finished
    /// layers are renamed into place), locked while the build lives; scratch directories whose
    /// build is gone (a crash) are removed first.
    pub fn build_scratch(&self) -> Result<Scratch, ImageError> {
        let base = self.root.join("build");
        fs::create_dir_all(&base).map_err(at("mkdir", &base))?;
        fs::set_permissions(&base, fs::Permissions::from_mode(0o700))
            .map_err(at("chmod", &base))?;
        if let Ok(rd) = fs::read_dir(&base) {
            for e in rd.flatten() {
                let p = e.path();
                if p.extension().is_some_and(|x| x == "lock") {
                    continue;
                }
                let lock = p.with_extension("lock");
                let idle =
                    fs::File::open(&lock).is_ok_and(|f| f.try_lock().is_ok()) || !lock.exists();
                if idle {
                    let _ = fs::remove_dir_all(&p);
                    let _ = fs::remove_file(&lock);
                }
            }
        }
        let name = format!(
            "{}-{}",
            std::process::id(),
            SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0)
        );
        let dir = base.join(&name);
        let lock_path = dir.with_extension("lock");
        let lock = fs::File::create(&lock_path).map_err(at("create", &lock_path))?;
        lock.lock().map_err(at("lock", &lock_path))?;
        fs::create_dir(&dir).map_err(at("mkdir", &dir))?;
        Ok(Scratch { dir, lock_path, _lock: lock })
    }

    /// Moves a complete layer directory `tmp` (written by a build) into the store as layer
    /// `id`, with its record. If another build stored the same layer meanwhile, that one stays
    /// and `tmp` is removed. The layer's data reaches the disk before its name does.
    pub fn commit_layer(
        &self,
        tmp: &Path,
        id: &Digest,
        mut rec: LayerRecord,
    ) -> Result<LayerRecord, ImageError> {
        rec.diff_id = id.to_string();
        let root = fs::File::open(tmp).map_err(at("open", tmp))?;
        rustix::fs::syncfs(&root).map_err(|e| at("syncfs", tmp)(e.into()))?;
        let _lock = self.lock()?;
        if let Some(existing) = self.known_layer(id) {
            let _ = fs::remove_dir_all(tmp);
            return Ok(existing);
        }
        let dir = self.layer_dir(id);
        if dir.exists() {
            // A directory without its record: left by a crash between the two writes.
            fs::remove_dir_all(&dir).map_err(at("remove", &dir))?;
        }
        fs::rename(tmp, &dir).map_err(at("rename", tmp))?;
        sync_parent(&dir)?;
        let text = serde_json::to_vec_pretty(&rec)
            .map_err(|e| ImageError::Format(format!("encode the layer record: {e}")))?;
        write_atomic(&dir.with_extension("json"), &text)?;
        Ok(rec)
    }

    /// Registers `record` (whose layers are all in the store), replacing a template of the same
    /// name; the replaced template's layers no other template uses are removed (unless a
    /// sandbox runs from the store now).
    pub fn register(&self, record: &Record) -> Result<(), ImageError> {
        let name = normalize_name(&record.name)?;
        let _lock = self.lock()?;
        for l in &record.layers {
            if self.known_layer(&Digest::parse(&l.diff_id)?).is_none() {
                return Err(ImageError::Format(format!(
                    "template {name:?}: layer {} is missing from the store",
                    l.diff_id
                )));
            }
        }
        let old = self.get(&name).ok();
        let text = serde_json::to_vec_pretty(record)
            .map_err(|e| ImageError::Format(format!("encode the record: {e}")))?;
        write_atomic(&self.record_path(&name), &text)?;
        if let Some(old) = old
            && let Some(_idle) = self.idle(&name)?
        {
            self.collect(&old)?;
            self.sweep_exports()?;
        }
        Ok(())
    }

    /// The bottom layer of every image template: the mount points the jail mounts over
    /// (`/proc`, `/dev`, `/sys`), `/tmp`, and the homes of the sandbox's two users (`/root`,
    /// `/home/user` owned by 1000). It sits below the image, so the image's own directories
    /// win where both have one. Built once, atomically.
    pub fn skeleton(&self) -> Result<PathBuf, ImageError> {
        let dir = self.root.join(SKELETON);
        if dir.is_dir() {
            return Ok(dir);
        }
        let _lock = self.lock()?;
        if dir.is_dir() {
            return Ok(dir);
        }
        let tmp = self.root.join(format!(".{SKELETON}.partial"));
        let _ = fs::remove_dir_all(&tmp);
        let build = || -> Result<(), ImageError> {
            let mk = |rel: &str, mode: u32, owner: u32| -> Result<(), ImageError> {
                let p = if rel.is_empty() { tmp.clone() } else { tmp.join(rel) };
                fs::create_dir_all(&p).map_err(at("mkdir", &p))?;
                std::os::unix::fs::chown(&p, Some(owner), Some(owner)).map_err(at("chown", &p))?;
                fs::set_permissions(&p, fs::Permissions::from_mode(mode)).map_err(at("chmod", &p))
            };
            mk("", 0o755, 0)?;
            for d in ["proc", "sys", "dev", "etc", "run", "var", "home"] {
                mk(d, 0o755, 0)?;
            }
            mk("tmp", 0o1777, 0)?;
            mk("var/tmp", 0o1777, 0)?;
            mk("root", 0o700, 0)?;
            mk("home/user", 0o755, 1000)?;
            // The sandbox's resolver is its gateway (ringfence_net::tun::GATEWAY_IP), as in
            // the `host` template: images rarely carry a resolv.conf (Docker mounts one), and
            // one the image has wins, being above this layer.
            let rc = tmp.join("etc/resolv.conf");
            fs::write(&rc, "nameserver 100.96.0.1\noptions timeout:2 attempts:2\n")
                .map_err(at("write", &rc))?;
            fs::set_permissions(&rc, fs::Permissions::from_mode(0o644))
                .map_err(at("chmod", &rc))?;
            // apt (Debian, Ubuntu images) drops to its `_apt` user (uid 42) to download, into
            // `partial/` directories that user owns (mode 0700). A sandbox maps only ids 0 and
            // 1000: the drop fails, and its root cannot enter a directory of an unmapped
            // owner, so every `apt-get update`/`install` would (a build's, the SDK's
            // `apt_install`, `sudo apt-get` in a sandbox). The sandbox's root is already an
            // unprivileged id on the host: apt downloads as it, into directories it owns.
            for d in ["etc/apt", "etc/apt/apt.conf.d", "var/cache", "var/cache/apt", "var/lib"] {
                mk(d, 0o755, 0)?;
            }
            for d in ["var/lib/apt", "var/lib/apt/lists-sandbox", "var/cache/apt/archives-sandbox"]
            {
                mk(d, 0o755, 0)?;
            }
            mk("var/lib/apt/lists-sandbox/partial", 0o700, 0)?;
            mk("var/cache/apt/archives-sandbox/partial", 0o700, 0)?;
            let apt = tmp.join("etc/apt/apt.conf.d/00ringfence-sandbox");
            fs::write(
                &apt,
                "// Ringfence sandboxes map only uids 0 and 1000: apt cannot drop to _apt, nor\n\
                 // enter the _apt-owned partial/ directories of the image.\n\
                 APT::Sandbox::User \"root\";\n\
                 Dir::State::Lists \"/var/lib/apt/lists-sandbox/\";\n\
                 Dir::Cache::Archives \"/var/cache/apt/archives-sandbox/\";\n",
            )
            .map_err(at("write", &apt))?;
            fs::set_permissions(&apt, fs::Permissions::from_mode(0o644)).map_err(at("chmod", &apt))
        };
        if let Err(e) = build() {
            let _ = fs::remove_dir_all(&tmp);
            return Err(e);
        }
        fs::rename(&tmp, &dir).map_err(at("rename", &tmp))?;
        Ok(dir)
    }

    /// What starting a sandbox from template `name` needs.
    pub fn runnable(&self, name: &str) -> Result<Runnable, ImageError> {
        let record = self.get(name)?;
        let mut layers = Vec::with_capacity(record.layers.len());
        for l in &record.layers {
            let dir = self.layer_dir(&Digest::parse(&l.diff_id)?);
            if !dir.is_dir() {
                return Err(ImageError::Format(format!(
                    "template {:?}: layer {} is missing from the store; import the image again",
                    record.name, l.diff_id
                )));
            }
            layers.push(dir);
        }
        let has_user_1000 = crate::passwd::has_uid(&layers, 1000);
        Ok(Runnable { record, layers, skeleton: self.skeleton()?, has_user_1000 })
    }
}

/// A build's scratch directory ([`Store::build_scratch`]), removed on drop.
#[derive(Debug)]
pub struct Scratch {
    pub dir: PathBuf,
    lock_path: PathBuf,
    _lock: fs::File,
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
        let _ = fs::remove_file(&self.lock_path);
    }
}

/// A held claim on the store's layers ([`Store::in_use`]); released on drop.
#[derive(Debug)]
pub struct InUse {
    _held: fs::File,
}

/// Counts compressed bytes for the progress display.
struct Counting<'p, R> {
    inner: R,
    read: u64,
    progress: &'p mut dyn Progress,
}

impl<R: Read> Read for Counting<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read += n as u64;
        self.progress.bytes(self.read);
        Ok(n)
    }
}

pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), ImageError> {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    fs::write(&tmp, bytes).map_err(at("write", &tmp))?;
    fs::File::open(&tmp).and_then(|f| f.sync_all()).map_err(at("fsync", &tmp))?;
    fs::rename(&tmp, path).map_err(at("rename", &tmp))?;
    sync_parent(path)
}

/// Makes a rename in `path`'s directory durable.
fn sync_parent(path: &Path) -> Result<(), ImageError> {
    match path.parent() {
        Some(dir) => fs::File::open(dir).and_then(|d| d.sync_all()).map_err(at("fsync", dir)),
        None => Ok(()),
    }
}

/// `name` or `name:tag` → `name:tag` (tag `latest` by default), validated: lower-case
/// letters, digits, `.`, `_`, `-` (no `/`: the name is a file name), at most 128 characters
/// each; the built-in template names are refused.
pub fn normalize_name(name: &str) -> Result<String, ImageError> {
    let bad = |reason: &str| ImageError::Name { name: name.into(), reason: reason.into() };
    let (base, tag) = name.split_once(':').unwrap_or((name, "latest"));
    let ok_base = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(c);
    if base.is_empty()
        || base.len() > 128
        || !base.chars().all(ok_base)
        || base.starts_with(['.', '-'])
    {
        return Err(bad(
            "a name is 1 to 128 of a-z, 0-9, '.', '_', '-', not starting with '.' or '-'",
        ));
    }
    let ok_tag = |c: char| c.is_ascii_alphanumeric() || "._-".contains(c);
    if tag.is_empty() || tag.len() > 128 || !tag.chars().all(ok_tag) || tag.starts_with(['.', '-'])
    {
        return Err(bad(
            "a tag is 1 to 128 of A-Z, a-z, 0-9, '.', '_', '-', not starting with '.' or '-'",
        ));
    }
    if RESERVED.contains(&base) {
        return Err(bad("the name of a built-in template"));
    }
    Ok(format!("{base}:{tag}"))
}

/// An exclusive `flock` on a file, released on drop (std's own file locks).
pub(crate) mod nix_free_lock {
    use std::fs::File;
    use std::path::Path;

    use crate::error::{ImageError, at};

    #[derive(Debug)]
    pub struct Lock {
        _held: File,
    }

    impl Lock {
        pub fn take(path: &Path) -> Result<Lock, ImageError> {
            let f = File::create(path).map_err(at("create", path))?;
            f.lock().map_err(at("lock", path))?;
            Ok(Lock { _held: f })
        }
    }
}
