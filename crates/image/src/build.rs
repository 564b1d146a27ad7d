//! Building a template from a Dockerfile: each step that changes files becomes a layer in the
//! store, cached by a content hash; the result is a [`Record`] like an imported image's.
//!
//! - Cache key of a step: sha256 over a version tag, the parent's key (the base image's layer
//!   ids for the first), the instruction after substitution, and what else decides its
//!   result: for RUN the environment, working directory, user and shell; for COPY/ADD the
//!   hash of the copied files' paths, types, modes and contents ([`crate::context`]) and the
//!   owners and mode it sets. The layer is stored under that key (`layers/sha256-<key>`):
//!   finding the directory *is* the cache lookup, so an unchanged Dockerfile rebuilds by
//!   hashing its context and reading a few small files. (The address is not an OCI diff_id:
//!   computing one would mean writing a tar of every layer; the record's `created_by` says
//!   which layers a build made.)
//! - RUN runs in a jail sandbox through a [`Runner`] (the CLI's, or later the server's): the
//!   layers so far as lowers, a fresh upper saved with canonical owners when the command
//!   succeeds. COPY/ADD and a WORKDIR that must create its directory write a layer on the
//!   host ([`crate::context`]). ENV, ARG, USER, LABEL, CMD, ENTRYPOINT, SHELL only change the
//!   template's config.
//! - Nothing half-made is registered: layers are written in a scratch directory and renamed
//!   into the store complete; the template record is written last, after every step passed.
//!   Layers of the steps that succeeded stay in the store as cache.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use sha2::{Digest as _, Sha256};

use crate::context::{self, Context, CopyOpts, Layered, NewLayer};
use crate::dockerfile::{self, Command, Op, Step};
use crate::error::ImageError;
use crate::oci::{Digest, RunConfig};
use crate::store::{LayerRecord, Record, Store};
use crate::unpack::Limits;

/// Bumped when the meaning of a key changes, so old cache entries stop matching.
const KEY_VERSION: &str = "ringfence-build-v1";

/// `PATH` for RUN when the image sets none (Docker's default).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Who a RUN step runs as: the jail runs the sandbox's root (0) or its `user` (1000).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunAs {
    Root,
    User,
}

/// One RUN step for the [`Runner`].
#[derive(Debug)]
pub struct RunRequest<'a> {
    pub argv: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub workdir: String,
    pub user: RunAs,
    /// The image's layers so far, topmost first.
    pub lowers: &'a [PathBuf],
    /// The store's bottom layer (mount points the jail needs).
    pub skeleton: &'a Path,
}

/// How a RUN step ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunOutcome {
    /// Exit 0; the sandbox's upper layer was saved to the requested directory.
    Saved { entries: u64, bytes: u64 },
    /// Anything else, said in words ("exit code 3", "timed out after 10m", ...).
    Failed(String),
}

/// Runs RUN steps in sandboxes.
pub trait Runner {
    /// Runs `req`; on success saves the writable layer to `save_to` (which does not exist)
    /// with canonical owners. Output goes to `progress.output` as it comes.
    fn run(
        &mut self,
        req: &RunRequest<'_>,
        save_to: &Path,
        progress: &mut dyn BuildProgress,
    ) -> Result<RunOutcome, String>;
}

/// What a build reports as it goes.
pub trait BuildProgress {
    /// Step `n` of `total` (1-based) starts.
    fn step(&mut self, n: usize, total: usize, text: &str);
    /// Output of the running step.
    fn output(&mut self, bytes: &[u8]);
    /// The step ended: `cached` if its layer came from the cache.
    fn step_done(&mut self, n: usize, total: usize, how: StepResult, took: Duration);
    fn note(&mut self, note: &str);
}

/// How a step ended, for the display.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepResult {
    /// A layer was made.
    Built,
    /// Its layer was in the cache.
    Cached,
    /// Config only: no layer.
    Config,
}

/// What to build.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// `name[:tag]` of the template to register.
    pub name: String,
    /// The Dockerfile's bytes, and its path (for messages and the record's source).
    pub dockerfile: Vec<u8>,
    pub dockerfile_path: PathBuf,
    pub context: PathBuf,
    pub build_args: BTreeMap<String, String>,
    pub no_cache: bool,
    /// Run the step on this Dockerfile line and every later one uncached (E2B's per-step
    /// `skip_cache()`); the steps before it use the cache as usual.
    pub no_cache_from_line: Option<usize>,
    /// For a FROM that is a registry reference not in the store.
    pub pull: crate::registry::PullOptions,
    pub limits: Limits,
    /// The record's `source` (default: `build <dockerfile_path>`).
    pub source: Option<String>,
    /// Kept on the record: what a sandbox from it starts (E2B's `set_start_cmd`).
    pub start: Option<crate::store::StartCmd>,
    /// Kept on the record: the tenant that built it through the API.
    pub owner: Option<String>,
}

/// What a build made.
#[derive(Debug, Clone)]
pub struct Built {
    pub record: Record,
    /// Steps whose layer came from the cache, and steps that made one.
    pub cached: usize,
    pub built: usize,
}

/// The state the instructions build up.
struct State {
    layers: Vec<LayerRecord>,
    dirs: Vec<PathBuf>,
    key: String,
    env: Vec<(String, String)>,
    /// ARGs declared in this stage, with their values.
    args: BTreeMap<String, String>,
    workdir: String,
    user: String,
    config: RunConfig,
    shell: Vec<String>,
    /// The claim on the FROM template ([`Store::in_use`]): `template rm` of it is refused
    /// while its layers are this build's lower layers.
    base_claim: Option<crate::store::InUse>,
}

impl State {
    /// Variables for substitution: ARGs, then ENV over them (ENV wins, as in Docker).
    fn vars(&self) -> BTreeMap<String, String> {
        let mut v = self.args.clone();
        v.extend(self.env.iter().cloned());
        v
    }

    fn set_env(&mut self, k: String, v: String) {
        match self.env.iter_mut().find(|(ek, _)| *ek == k) {
            Some(e) => e.1 = v,
            None => self.env.push((k, v)),
        }
    }
}

fn key(parts: &[&str]) -> Digest {
    let mut h = Sha256::new();
    h.update(KEY_VERSION.as_bytes());
    for p in parts {
        h.update(b"\0");
        h.update(p.len().to_le_bytes());
        h.update(p.as_bytes());
    }
    match Digest::parse(&format!("sha256:{}", hex::encode(h.finalize()))) {
        Ok(d) => d,
        Err(_) => unreachable_digest(),
    }
}

/// A sha256 hex string always parses; this keeps the impossible branch free of a panic.
fn unreachable_digest() -> Digest {
    Digest::of(b"")
}

/// Builds the Dockerfile in `opts` into template `opts.name`.
pub fn build(
    store: &Store,
    opts: &BuildOptions,
    runner: &mut dyn Runner,
    progress: &mut dyn BuildProgress,
) -> Result<Built, ImageError> {
    let name = crate::store::normalize_name(&opts.name)?;
    let file = dockerfile::parse(&opts.dockerfile)?;
    for n in &file.notes {
        progress.note(n);
    }
    let ctx = Context::open(&opts.context).map_err(ImageError::Format)?;
    let scratch = store.build_scratch()?;
    let skeleton = store.skeleton()?;
    let total = file.steps.len();
    let mut global_args: BTreeMap<String, String> = BTreeMap::new();
    let mut st: Option<State> = None;
    let (mut cached, mut built) = (0, 0);
    // A nonce in a step's cache key makes it (and, through the parent key, every later
    // step) miss the cache.
    let fresh = format!("{:?}", SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default());
    for (i, step) in file.steps.iter().enumerate() {
        let n = i + 1;
        let label = format!("[{n}/{total}] {} (line {})", short(&step.text), step.line);
        let fail =
            |reason: String| ImageError::Build { step: label.clone(), line: step.line, reason };
        progress.step(n, total, &step.text);
        let t = Instant::now();
        let how = match (&step.op, st.as_mut()) {
            (Op::Arg(list), None) => {
                for (k, v) in list {
                    let value = match (opts.build_args.get(k), v) {
                        (Some(b), _) => b.clone(),
                        (None, Some(d)) => dockerfile::word(d, &global_args).map_err(fail)?,
                        (None, None) => String::new(),
                    };
                    global_args.insert(k.clone(), value);
                }
                StepResult::Config
            }
            (Op::From { image }, None) => {
                let image = dockerfile::word(image, &global_args).map_err(fail)?;
                st = Some(from(store, &image, opts, progress).map_err(|e| fail(e.to_string()))?);
                StepResult::Config
            }
            (_, None) | (Op::From { .. }, Some(_)) => {
                return Err(fail("unexpected here (the parser should have refused it)".into()));
            }
            (_, Some(s)) => {
                let uncached =
                    opts.no_cache || opts.no_cache_from_line.is_some_and(|l| step.line >= l);
                let nonce = if uncached { fresh.as_str() } else { "" };
                let r = step_op(
                    store,
                    opts,
                    &ctx,
                    &scratch.dir,
                    &skeleton,
                    &global_args,
                    nonce,
                    s,
                    step,
                    runner,
                    progress,
                );
                r.map_err(fail)?
            }
        };
        match how {
            StepResult::Built => built += 1,
            StepResult::Cached => cached += 1,
            StepResult::Config => {}
        }
        progress.step_done(n, total, how, t.elapsed());
    }
    let declared: std::collections::BTreeSet<&str> = file
        .steps
        .iter()
        .filter_map(|s| match &s.op {
            Op::Arg(list) => Some(list.iter().map(|(k, _)| k.as_str())),
            _ => None,
        })
        .flatten()
        .collect();
    for k in opts.build_args.keys() {
        if !declared.contains(k.as_str()) {
            progress.note(&format!("--build-arg {k}: the Dockerfile declares no ARG {k}; unused"));
        }
    }
    let Some(mut s) = st else {
        return Err(ImageError::Dockerfile { line: 0, message: "no FROM instruction".into() });
    };
    s.config.env = Some(s.env.iter().map(|(k, v)| format!("{k}={v}")).collect());
    s.config.working_dir = Some(s.workdir.clone());
    s.config.user = Some(s.user.clone()).filter(|u| !u.is_empty());
    let config_text = serde_json::to_vec(&s.config).unwrap_or_default();
    let record = Record {
        name: name.clone(),
        source: opts
            .source
            .clone()
            .unwrap_or_else(|| format!("build {}", opts.dockerfile_path.display())),
        manifest_digest: None,
        config_digest: Digest::of(&config_text).to_string(),
        size: s.layers.iter().map(|l| l.bytes).sum(),
        layers: s.layers,
        config: s.config,
        image_created: None,
        imported_unix: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        // A build's own RUN steps could add setuid binaries; it asks for none of the base's
        // trust (see docs/SECURITY.md).
        allow_setuid: false,
        start: opts.start.clone(),
        owner: opts.owner.clone(),
    };
    drop(scratch);
    // Released before registering, so replacing the base itself (FROM x, built as x) can
    // collect its old layers.
    drop(s.base_claim.take());
    // Unchanged: nothing to write (a rebuild changes nothing, not even the record's time).
    let same = store.get(&name).is_ok_and(|old| {
        old.layers == record.layers
            && old.config == record.config
            && old.source == record.source
            && old.start == record.start
            && old.owner == record.owner
    });
    if same {
        let old = store.get(&name)?;
        return Ok(Built { record: old, cached, built });
    }
    store.register(&record)?;
    Ok(Built { record, cached, built })
}

fn short(text: &str) -> String {
    let one: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if one.chars().count() > 72 {
        format!("{}...", one.chars().take(69).collect::<String>())
    } else {
        one
    }
}

/// The state after `FROM image`.
fn from(
    store: &Store,
    image: &str,
    opts: &BuildOptions,
    progress: &mut dyn BuildProgress,
) -> Result<State, ImageError> {
    let mut st = State {
        layers: Vec::new(),
        dirs: Vec::new(),
        key: String::new(),
        env: Vec::new(),
        args: BTreeMap::new(),
        workdir: "/".into(),
        user: String::new(),
        config: RunConfig::default(),
        shell: vec!["/bin/sh".into(), "-c".into()],
        base_claim: None,
    };
    if image == "scratch" {
        st.key = key(&["scratch"]).to_string();
        return Ok(st);
    }
    if crate::store::RESERVED.contains(&image) {
        return Err(ImageError::Format(format!(
            "FROM {image}: a built-in template, which runs on the host's /usr and cannot be a \
             build base; build FROM an image (`ringfence template pull debian:trixie`, then \
             FROM debian:trixie), or FROM scratch"
        )));
    }
    let record = if crate::store::normalize_name(image).is_ok() && store.contains(image) {
        store.get(image)?
    } else {
        // A registry reference: its local copy if an earlier build (or `template pull`)
        // fetched it, else pulled now and registered under its default name, as `docker
        // pull` leaves it (`from-NAME` where that name is a built-in one).
        let r = crate::registry::Reference::parse(image).map_err(|e| {
            ImageError::Format(format!(
                "FROM {image}: not a template here, nor a registry reference: {e}"
            ))
        })?;
        let mut local = r.template_name();
        if crate::store::normalize_name(&local).is_err() {
            local = format!("from-{local}");
        }
        let origin = format!("pull {}/{}@", r.registry, r.repository);
        match store.get(&local) {
            Ok(rec) if rec.source.starts_with(&origin) => rec,
            Ok(rec) => {
                return Err(ImageError::Format(format!(
                    "FROM {image}: it would be pulled as template {:?}, which exists here from \
                     another source ({}); build FROM {:?} by name, or remove it first",
                    rec.name, rec.source, rec.name
                )));
            }
            Err(_) => {
                progress.note(&format!(
                    "{image} is not a template here: pulling it from its registry as {local}"
                ));
                crate::registry::pull(
                    store,
                    image,
                    Some(&local),
                    &opts.pull,
                    &opts.limits,
                    &mut crate::Quiet,
                )
                .map_err(|e| {
                    ImageError::Format(format!(
                        "FROM {image}: not a template here, and pulling it failed: {e}"
                    ))
                })?
            }
        }
    };
    // Claimed, then read again: a `template rm` between the two reads is seen here (not
    // found) rather than as layers vanishing under a RUN step.
    st.base_claim = Some(store.in_use(&record.name)?);
    let record = store.get(&record.name)?;
    let run = store.runnable(&record.name)?;
    let ids: Vec<&str> = record.layers.iter().map(|l| l.diff_id.as_str()).collect();
    let mut parts = vec!["from"];
    parts.extend(ids);
    st.key = key(&parts).to_string();
    st.layers = record.layers.clone();
    st.dirs = run.layers;
    let c = &record.config;
    st.env = c
        .env
        .iter()
        .flatten()
        .filter_map(|kv| kv.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())))
        .collect();
    st.workdir = c.working_dir.clone().filter(|w| w.starts_with('/')).unwrap_or_else(|| "/".into());
    st.user = c.user.clone().unwrap_or_default();
    st.config = RunConfig {
        entrypoint: c.entrypoint.clone(),
        cmd: c.cmd.clone(),
        labels: c.labels.clone(),
        ..RunConfig::default()
    };
    Ok(st)
}

/// Joins `path` to the working directory.
fn absolute(workdir: &str, path: &str) -> String {
    if path.starts_with('/') {
        path.to_string()
    } else if workdir.ends_with('/') {
        format!("{workdir}{path}")
    } else {
        format!("{workdir}/{path}")
    }
}

/// Who the jail runs for USER `spec`, or why it cannot.
fn run_as(spec: &str, lowers: &Layered, dirs: &[PathBuf]) -> Result<RunAs, String> {
    if spec.is_empty() {
        return Ok(RunAs::Root);
    }
    let (uid, gid) = context::resolve_ids(spec, lowers, dirs)?;
    match (uid, gid) {
        (0, _) => Ok(RunAs::Root),
        (1000, 1000) => Ok(RunAs::User),
        _ => Err(format!(
            "USER {spec} is uid {uid} gid {gid}: build steps run as root (0) or the sandbox's \
             user (1000:1000) only; add the user with uid 1000 (`useradd -u 1000 NAME`) or run \
             as root"
        )),
    }
}

#[allow(clippy::too_many_arguments)]
fn step_op(
    store: &Store,
    opts: &BuildOptions,
    ctx: &Context,
    scratch: &Path,
    skeleton: &Path,
    global_args: &BTreeMap<String, String>,
    nonce: &str,
    s: &mut State,
    step: &Step,
    runner: &mut dyn Runner,
    progress: &mut dyn BuildProgress,
) -> Result<StepResult, String> {
    let vars = s.vars();
    match &step.op {
        Op::Arg(list) => {
            for (k, v) in list {
                let value = match (opts.build_args.get(k), v, global_args.get(k)) {
                    (Some(b), _, _) => b.clone(),
                    (None, Some(d), _) => dockerfile::word(d, &vars)?,
                    (None, None, Some(g)) => g.clone(),
                    (None, None, None) => String::new(),
                };
                s.args.insert(k.clone(), value);
            }
            Ok(StepResult::Config)
        }
        Op::Env(raw) => {
            for (k, v) in dockerfile::pairs(raw, &vars, true)? {
                s.set_env(k, v);
            }
            Ok(StepResult::Config)
        }
        Op::Label(raw) => {
            let labels = s.config.labels.get_or_insert_with(BTreeMap::new);
            for (k, v) in dockerfile::pairs(raw, &vars, false)? {
                labels.insert(k, v);
            }
            Ok(StepResult::Config)
        }
        Op::User(raw) => {
            let user = dockerfile::word(raw, &vars)?;
            let lowers = Layered::open(&s.dirs)?;
            run_as(&user, &lowers, &s.dirs)?;
            s.user = user;
            Ok(StepResult::Config)
        }
        Op::Cmd(c) => {
            s.config.cmd = Some(argv(c, &s.shell));
            Ok(StepResult::Config)
        }
        Op::Entrypoint(c) => {
            s.config.entrypoint = Some(argv(c, &s.shell));
            // As in Docker: a new ENTRYPOINT drops the base image's CMD.
            s.config.cmd = None;
            Ok(StepResult::Config)
        }
        Op::Shell(v) => {
            s.shell = v.clone();
            Ok(StepResult::Config)
        }
        Op::Ignored(_) => Ok(StepResult::Config),
        Op::Workdir(raw) => {
            let dir = absolute(&s.workdir, &dockerfile::word(raw, &vars)?);
            let lowers = Layered::open(&s.dirs)?;
            let resolved = lowers.resolve(&dir)?;
            s.workdir = format!("/{}", context::comps(&dir).join("/"));
            match lowers.lookup(&resolved) {
                Some(f) if f.kind == rustix::fs::FileType::Directory => Ok(StepResult::Config),
                Some(_) => {
                    Err(format!("WORKDIR {dir}: exists in the image and is not a directory"))
                }
                None => {
                    // Docker creates a missing WORKDIR; here that is a small layer.
                    let owner = match run_as(&s.user, &lowers, &s.dirs)? {
                        RunAs::Root => (0, 0),
                        RunAs::User => (1000, 1000),
                    };
                    let owner_text = format!("{}:{}", owner.0, owner.1);
                    let k = key(&["workdir", &s.key, &s.workdir, &owner_text, nonce]);
                    layer_step(store, s, &k, &step.text, scratch, progress, |dest| {
                        let mut layer = NewLayer::open(dest, &lowers)?;
                        layer.dir_owner = owner;
                        layer.ensure_dir(&resolved)?;
                        Ok((layer.entries, layer.bytes))
                    })
                }
            }
        }
        Op::Copy(spec) => {
            let mut args = Vec::new();
            for a in &spec.args {
                args.push(if spec.json {
                    dockerfile::word(
                        &format!("\"{}\"", a.replace('\\', "\\\\").replace('"', "\\\"")),
                        &vars,
                    )?
                } else {
                    dockerfile::word(a, &vars)?
                });
            }
            let Some((dest, srcs)) = args.split_last() else {
                return Err("needs a source and a destination".into());
            };
            let lowers = Layered::open(&s.dirs)?;
            let (uid, gid) = match &spec.chown {
                Some(c) => context::resolve_ids(&dockerfile::word(c, &vars)?, &lowers, &s.dirs)?,
                None => (0, 0),
            };
            let chmod = spec.chmod.as_deref().map(context::parse_chmod).transpose()?;
            let mut sources = Vec::new();
            for src in srcs {
                for found in ctx.sources(src)? {
                    if spec.add && !found.is_dir && is_archive(ctx, &found.rel) {
                        return Err(format!(
                            "ADD of the local archive {:?}: unpacking archives is not supported; \
                             COPY it and RUN tar, or unpack it into the context and COPY the directory",
                            found.rel
                        ));
                    }
                    sources.push(found);
                }
            }
            let dest = if dest.ends_with('/') {
                format!("{}/", absolute(&s.workdir, dest).trim_end_matches('/'))
            } else {
                absolute(&s.workdir, dest)
            };
            let files = ctx.hash(&sources)?;
            let line = format!(
                "{} {:?} -> {dest} {uid}:{gid} {chmod:?}",
                if spec.add { "ADD" } else { "COPY" },
                srcs
            );
            let k = key(&["copy", &s.key, &line, &files, nonce]);
            layer_step(store, s, &k, &step.text, scratch, progress, |dir| {
                let mut layer = NewLayer::open(dir, &lowers)?;
                let opts = CopyOpts { uid, gid, chmod };
                let wrote = context::copy(ctx, &sources, &dest, opts, &mut layer)?;
                if wrote != files {
                    return Err(
                        "the build context changed while it was being copied; run the build again"
                            .into(),
                    );
                }
                Ok((layer.entries, layer.bytes))
            })
        }
        Op::Run(c) => {
            let argv = argv(c, &s.shell);
            let lowers = Layered::open(&s.dirs)?;
            let user = run_as(&s.user, &lowers, &s.dirs)?;
            let mut env: BTreeMap<String, String> = s.args.clone();
            env.extend(s.env.iter().cloned());
            env.entry("PATH".into()).or_insert_with(|| DEFAULT_PATH.into());
            if !s.workdir_exists(&lowers) {
                return Err(format!(
                    "the working directory {} does not exist in the image",
                    s.workdir
                ));
            }
            let env_text = serde_json::to_string(&env).unwrap_or_default();
            let argv_text = serde_json::to_string(&argv).unwrap_or_default();
            let user_text = format!("{user:?}");
            let k = key(&["run", &s.key, &argv_text, &env_text, &s.workdir, &user_text, nonce]);
            let dirs = s.dirs.clone();
            let workdir = s.workdir.clone();
            let text = step.text.clone();
            layer_step_run(store, s, &k, &text, scratch, progress, |dest, progress| {
                let req = RunRequest { argv, env, workdir, user, lowers: &dirs, skeleton };
                runner.run(&req, dest, progress)
            })
        }
        Op::From { .. } => Err("a second FROM".into()),
    }
}

impl State {
    fn workdir_exists(&self, lowers: &Layered) -> bool {
        self.workdir == "/"
            || lowers.resolve(&self.workdir).is_ok_and(|c| {
                lowers.lookup(&c).is_some_and(|f| f.kind == rustix::fs::FileType::Directory)
            })
    }
}

fn argv(c: &Command, shell: &[String]) -> Vec<String> {
    match c {
        Command::Exec(v) => v.clone(),
        Command::Shell(s) => {
            let mut v = shell.to_vec();
            v.push(s.clone());
            v
        }
    }
}

fn is_archive(ctx: &Context, rel: &str) -> bool {
    let lower = rel.to_ascii_lowercase();
    let by_name = [".tar", ".tar.gz", ".tgz", ".tar.xz", ".txz", ".tar.bz2", ".tbz2", ".tar.zst"]
        .iter()
        .any(|e| lower.ends_with(e));
    by_name || {
        let mut head = [0u8; 262];
        let path = ctx.path().join(rel);
        // Only sniffing: the file was already checked to be a regular file beneath the
        // context, and nothing read here is used beyond the magic numbers.
        std::fs::File::open(&path)
            .and_then(|mut f| std::io::Read::read(&mut f, &mut head))
            .is_ok_and(|n| {
                (n >= 2 && head[..2] == [0x1f, 0x8b])
                    || (n >= 6 && head[..6] == [0xfd, b'7', b'z', b'X', b'Z', 0])
                    || (n >= 3 && &head[..3] == b"BZh")
                    || (n >= 262 && &head[257..262] == b"ustar")
            })
    }
}

/// A step whose layer is written on the host by `write` (into an empty directory).
fn layer_step(
    store: &Store,
    s: &mut State,
    k: &Digest,
    text: &str,
    scratch: &Path,
    _progress: &mut dyn BuildProgress,
    write: impl FnOnce(&Path) -> Result<(u64, u64), String>,
) -> Result<StepResult, String> {
    if let Some(rec) = store.known_layer(k) {
        push(s, k, rec, store);
        return Ok(StepResult::Cached);
    }
    let tmp = scratch.join(k.hex());
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir(&tmp).map_err(|e| format!("mkdir {}: {e}", tmp.display()))?;
    // The layer's root directory is the image's `/`: owned by root like every layer root.
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755));
    let (entries, bytes) = match write(&tmp) {
        Ok(v) => v,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
    };
    commit(store, s, k, text, &tmp, entries, bytes)
}

/// A RUN step: the runner saves the sandbox's upper layer.
fn layer_step_run(
    store: &Store,
    s: &mut State,
    k: &Digest,
    text: &str,
    scratch: &Path,
    progress: &mut dyn BuildProgress,
    run: impl FnOnce(&Path, &mut dyn BuildProgress) -> Result<RunOutcome, String>,
) -> Result<StepResult, String> {
    if let Some(rec) = store.known_layer(k) {
        push(s, k, rec, store);
        return Ok(StepResult::Cached);
    }
    let tmp = scratch.join(k.hex());
    let _ = std::fs::remove_dir_all(&tmp);
    let outcome = run(&tmp, progress);
    match outcome {
        Ok(RunOutcome::Saved { entries, bytes }) => commit(store, s, k, text, &tmp, entries, bytes),
        Ok(RunOutcome::Failed(why)) => {
            let _ = std::fs::remove_dir_all(&tmp);
            Err(format!("the command failed: {why}"))
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            Err(e)
        }
    }
}

fn commit(
    store: &Store,
    s: &mut State,
    k: &Digest,
    text: &str,
    tmp: &Path,
    entries: u64,
    bytes: u64,
) -> Result<StepResult, String> {
    let rec = LayerRecord {
        diff_id: k.to_string(),
        entries,
        bytes,
        stream_bytes: 0,
        created_by: Some(short(text)),
    };
    let rec = store.commit_layer(tmp, k, rec).map_err(|e| e.to_string())?;
    push(s, k, rec, store);
    Ok(StepResult::Built)
}

fn push(s: &mut State, k: &Digest, rec: LayerRecord, store: &Store) {
    s.layers.insert(0, rec);
    s.dirs.insert(0, store.layer_dir(k));
    s.key = k.to_string();
}
