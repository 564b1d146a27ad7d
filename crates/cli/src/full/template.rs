//! `ringfence template`: import, pull, list, inspect and remove image templates (turning one
//! into what `ringfence run --template` starts is `ringfence::resolve`).

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use ringfence_image::{LayerStats, Limits, Progress, Record, Store};
use ringfence_jail::limits;

use ringfence::Common;

#[derive(Debug, clap::Subcommand)]
pub enum TemplateCommand {
    Build(Box<crate::build::BuildArgs>),
    /// Make a Debian base from Debian's archive (debootstrap): user `user` (uid 1000) with
    /// passwordless sudo to the sandbox's own root, python3, node, git, curl.
    Bootstrap(Box<crate::bootstrap::BootstrapArgs>),
    /// Import an image: a `docker save` archive or an OCI image layout (a tar or a directory).
    Import {
        /// The archive or layout directory.
        path: PathBuf,
        /// Template name (NAME or NAME:TAG; the tag defaults to `latest`). Default: the name
        /// the archive carries.
        #[arg(long)]
        name: Option<String>,
        #[command(flatten)]
        caps: Caps,
        #[command(flatten)]
        common: Common,
    },
    /// Pull an image from an OCI registry (Docker Registry HTTP API v2), linux/amd64.
    Pull {
        /// Reference: [REGISTRY/]REPOSITORY[:TAG|@DIGEST] (Docker Hub by default).
        reference: String,
        /// Template name (NAME or NAME:TAG). Default: the repository's last part and tag.
        #[arg(long)]
        name: Option<String>,
        /// Talk plain HTTP to this registry (HOST:PORT; repeatable). For local test registries.
        #[arg(long = "insecure-registry", value_name = "HOST:PORT")]
        insecure: Vec<String>,
        #[command(flatten)]
        caps: Caps,
        #[command(flatten)]
        common: Common,
    },
    /// List image templates: name, layers, size.
    Ls {
        #[command(flatten)]
        common: Common,
    },
    /// Show a template's record (layers, config, digests) as JSON.
    Inspect {
        name: String,
        #[command(flatten)]
        common: Common,
    },
    /// Remove a template and the layers no other template uses.
    Rm {
        name: String,
        #[command(flatten)]
        common: Common,
    },
}

/// Caps on what an image may unpack to.
#[derive(Debug, Clone, clap::Args)]
pub struct Caps {
    /// Largest total uncompressed size of the image (all layers).
    #[arg(long, default_value = "10G", value_parser = limits::parse_size)]
    max_size: u64,
    /// Largest single file in the image.
    #[arg(long, default_value = "4G", value_parser = limits::parse_size)]
    max_file_size: u64,
}

impl Caps {
    pub(crate) fn limits(&self) -> Limits {
        Limits {
            file_bytes: self.max_file_size,
            layer_bytes: self.max_size,
            image_bytes: self.max_size,
            ..Limits::default()
        }
    }
}

pub fn main(cmd: TemplateCommand) -> ExitCode {
    match run(cmd) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ringfence: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn run(cmd: TemplateCommand) -> anyhow::Result<()> {
    match cmd {
        TemplateCommand::Build(args) => crate::build::build(*args)?,
        TemplateCommand::Bootstrap(args) => crate::bootstrap::bootstrap(*args)?,
        TemplateCommand::Import { path, name, caps, common } => {
            let store = Store::open(&common.data_dir)?;
            let t = Instant::now();
            let mut progress = Display::new();
            let rec = ringfence_image::import(
                &store,
                &path,
                name.as_deref(),
                &caps.limits(),
                &mut progress,
            )
            .with_context(|| format!("import {}", path.display()))?;
            progress.clear();
            summary("imported", &rec, t.elapsed());
        }
        TemplateCommand::Pull { reference, name, insecure, caps, common } => {
            let store = Store::open(&common.data_dir)?;
            let t = Instant::now();
            let mut progress = Display::new();
            let opts = ringfence_image::registry::PullOptions { insecure };
            let rec = ringfence_image::registry::pull(
                &store,
                &reference,
                name.as_deref(),
                &opts,
                &caps.limits(),
                &mut progress,
            )
            .with_context(|| format!("pull {reference}"))?;
            progress.clear();
            summary("pulled", &rec, t.elapsed());
        }
        TemplateCommand::Ls { common } => {
            let store = Store::open(&common.data_dir)?;
            let list = store.list()?;
            // How many templates use each layer: a layer used by one only is what `rm` frees.
            let mut users: std::collections::BTreeMap<&str, (usize, u64)> = Default::default();
            for r in &list {
                let distinct: std::collections::BTreeSet<&str> =
                    r.layers.iter().map(|l| l.diff_id.as_str()).collect();
                for l in &r.layers {
                    if distinct.contains(l.diff_id.as_str()) {
                        users.entry(l.diff_id.as_str()).or_insert((0, l.bytes));
                    }
                }
                for d in distinct {
                    if let Some(u) = users.get_mut(d) {
                        u.0 += 1;
                    }
                }
            }
            println!("{:<40} {:>6} {:>10} {:>10}  SOURCE", "NAME", "LAYERS", "SIZE", "OWN");
            for r in &list {
                let distinct: std::collections::BTreeSet<&str> =
                    r.layers.iter().map(|l| l.diff_id.as_str()).collect();
                let own: u64 = distinct
                    .iter()
                    .filter_map(|d| users.get(d))
                    .filter(|(n, _)| *n == 1)
                    .map(|(_, b)| b)
                    .sum();
                println!(
                    "{:<40} {:>6} {:>10} {:>10}  {}",
                    r.name,
                    r.layers.len(),
                    human(r.size),
                    human(own),
                    r.source
                );
            }
            let total: u64 = users.values().map(|(_, b)| b).sum();
            println!(
                "{} layers, {} of file content in all (SIZE: the template's layers; OWN: those \
                 no other template uses, what `template rm` frees)",
                users.len(),
                human(total)
            );
            // Sandboxes' saved layers (snapshots, pauses, forks) live in the same store by
            // content: each counted once however many snapshots link to it, and not again
            // where a template has the same layer.
            let saved: Vec<_> = store
                .all_layers()
                .into_iter()
                .filter(|l| l.created_by.as_deref() == Some(ringfence_image::shared::SAVED_LAYER))
                .filter(|l| !users.contains_key(l.diff_id.as_str()))
                .collect();
            if !saved.is_empty() {
                let bytes: u64 = saved.iter().map(|l| l.bytes).sum();
                let links = std::fs::read_dir(common.data_dir.join("layers"))
                    .map(|rd| rd.flatten().filter(|e| e.path().is_symlink()).count())
                    .unwrap_or(0);
                println!(
                    "{} saved sandbox layers (snapshots, pauses, forks: {links} ids), {}, \
                     each stored once; {} in the store in all",
                    saved.len(),
                    human(bytes),
                    human(total + bytes)
                );
            }
        }
        TemplateCommand::Inspect { name, common } => {
            let store = Store::open(&common.data_dir)?;
            let rec = store.get(&name)?;
            println!("{}", serde_json::to_string_pretty(&rec)?);
        }
        TemplateCommand::Rm { name, common } => {
            let store = Store::open(&common.data_dir)?;
            // Sandboxes (paused ones too) and snapshots of a server on this data directory.
            let db = ringfence_server::db_path(&common.data_dir);
            if db.is_file() {
                let server = ringfence_server::store::Store::open(&db)?;
                if let Some(why) = ringfence_server::templates::users_of(&server, &name)? {
                    anyhow::bail!(why);
                }
            }
            let removed = store.remove(&name)?;
            println!(
                "removed {name}: {} layer(s) deleted, {} kept (used by other templates)",
                removed.layers_removed, removed.layers_kept
            );
        }
    }
    Ok(())
}

fn summary(what: &str, rec: &Record, took: Duration) {
    println!(
        "{what} {} ({} layers, {}) in {:.2}s",
        rec.name,
        rec.layers.len(),
        human(rec.size),
        took.as_secs_f64()
    );
}

pub(crate) fn human(bytes: u64) -> String {
    const UNITS: &[&str] = &["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 { format!("{bytes} B") } else { format!("{v:.1} {}", UNITS[u]) }
}

/// Progress on stderr: one line rewritten in place on a terminal, plain lines otherwise.
struct Display {
    tty: bool,
    line: String,
    last: Option<Instant>,
    size: Option<u64>,
}

impl Display {
    fn new() -> Self {
        Display {
            tty: std::io::stderr().is_terminal(),
            line: String::new(),
            last: None,
            size: None,
        }
    }

    fn clear(&mut self) {
        if self.tty && !self.line.is_empty() {
            eprint!("\r\x1b[K");
            self.line.clear();
        }
    }
}

fn short(digest: &str) -> &str {
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    &hex[..hex.len().min(12)]
}

impl Progress for Display {
    fn layer_start(
        &mut self,
        n: usize,
        total: usize,
        diff_id: &str,
        size: Option<u64>,
        reused: bool,
    ) {
        self.size = size;
        self.last = None;
        let text = if reused {
            format!("layer {n}/{total} {}: already present", short(diff_id))
        } else {
            let of = size.map(|s| format!(" ({})", human(s))).unwrap_or_default();
            format!("layer {n}/{total} {}{of}: unpacking", short(diff_id))
        };
        if self.tty {
            self.clear();
            eprint!("{text}");
            self.line = text;
        } else {
            eprintln!("{text}");
        }
    }

    fn bytes(&mut self, read: u64) {
        if !self.tty || self.last.is_some_and(|t| t.elapsed() < Duration::from_millis(100)) {
            return;
        }
        self.last = Some(Instant::now());
        let of = self.size.map(|s| format!(" / {}", human(s))).unwrap_or_default();
        eprint!("\r\x1b[K{} {}{of}", self.line, human(read));
        let _ = std::io::stderr().flush();
    }

    fn layer_done(&mut self, n: usize, total: usize, stats: &LayerStats) {
        let text = format!("layer {n}/{total}: {} entries, {}", stats.entries, human(stats.bytes));
        if self.tty {
            self.clear();
            eprintln!("{text}");
        } else {
            eprintln!("{text}");
        }
    }

    fn note(&mut self, note: &str) {
        self.clear();
        eprintln!("note: {note}");
    }
}
