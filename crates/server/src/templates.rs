//! Template builds through the API, in the shapes E2B's Template SDK (`e2b` 2.63's `Template`)
//! sends: request a build (`POST /v3/templates`), upload the files of each COPY step (`GET
//! /templates/{id}/files/{hash}` hands out a link on this server; the SDK PUTs a tar there),
//! start it (`POST /v2/templates/{id}/builds/{buildID}` with the steps), poll it (`GET
//! /templates/{id}/builds/{buildID}/status?logsOffset=`); aliases, tags, list and delete.
//!
//! - A template here is an image template of the store (`ringfence_image`), named after the
//!   SDK's name (`name:tag`, the tag `latest` by default); its template id is the name. One
//!   built through the API belongs to the key that built it (`Record::owner`): other keys
//!   cannot see, use, tag, rebuild or delete it. Templates the operator made on the command
//!   line (no owner) every key may use, none may change.
//! - The steps become a Dockerfile (`ringfence_image::sdk`) that the same builder as `ringfence
//!   template build` runs, with the same per-step layer cache, RUN steps in one-shot jail
//!   sandboxes ([`crate::builder::JailRunner`]), with the operator's build egress
//!   (`serve --build-egress`, [`crate::network::BuildEgress`]).
//! - Bad input is refused when the build is started (400 naming the step): an unknown step,
//!   a COPY whose files were not uploaded or do not hash to what the SDK computed, a path
//!   leaving the upload. Everything else is the build's: it runs in the background (a tokio
//!   task, the blocking work on the blocking pool), one build of a template at a time, and
//!   ends `ready` or `error` with the failing step and its output. A failed build registers
//!   nothing (the builder writes the record last).
//! - Each build's state (status, logs, reason) is kept in the image store as
//!   `images/builds/<build id>.json`, written (atomically) when it is requested, started and
//!   finished, so status and logs of finished builds survive a server restart. A build that
//!   was running when the server died (its sandbox died with it) reads `error` after the
//!   restart, with that as its reason ([`Builds::recover`]); nothing of it was registered.

use std::collections::HashMap;
use std::path::{Path as FsPath, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use ringfence_image::build::{BuildOptions, BuildProgress, StepResult};
use ringfence_image::sdk::{self, BuildSpec, Translated};
use ringfence_image::{ImageError, Record, StartCmd, Store};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;

use crate::api::{App, caller, parse_body};
use crate::e2b_error::E2bError;
use crate::manager::now_ms;
use crate::store::{AuditRecord, KeyInfo};

pub use ringfence_core::manager::BuildConfig;

/// Most bytes of one uploaded archive.
const MAX_UPLOAD: u64 = 2 << 30;

/// Log entries a status call returns at most (as E2B's API does).
const LOGS_PAGE: usize = 100;
/// Log entries kept per build; older ones are dropped, with a note.
const MAX_LOGS: usize = 20_000;
/// How long one RUN step may take.
const STEP_TIMEOUT: Duration = Duration::from_secs(600);
/// How long a sandbox's ready check may take to pass after its start command started.
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// Builds whose states (status, logs) are kept; see [`Inner::forget_old`].
const MAX_BUILDS: usize = 1000;
/// How long an upload link stays valid.
const UPLOAD_LINK_TTL_MS: i64 = 3600 * 1000;

/// Builds in flight and done (since the server started), and upload links.
#[derive(Debug, Default)]
pub struct Builds {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Where builds' states are kept (`<data-dir>/images/builds`); `None` until
    /// [`Builds::recover`] (tests of the handlers alone).
    dir: Option<PathBuf>,
    builds: HashMap<String, Arc<Mutex<BuildState>>>,
    /// Template name → the lock that serialises its builds.
    locks: HashMap<String, Arc<tokio::sync::Mutex<()>>>,
    /// Upload token → what it may upload.
    uploads: HashMap<String, UploadLink>,
}

impl Inner {
    /// Keeps at most [`MAX_BUILDS`] builds' states: the oldest of those not running go first
    /// (finished ones, and requests whose steps never came); their status then reads 404, the
    /// templates stay. Running builds are never forgotten.
    fn forget_old(&mut self) {
        if self.builds.len() < MAX_BUILDS {
            return;
        }
        let mut finished: Vec<(u64, String)> = self
            .builds
            .iter()
            .filter_map(|(id, b)| {
                b.lock().ok().filter(|b| b.status != Status::Building).map(|b| (b.seq, id.clone()))
            })
            .collect();
        finished.sort();
        let excess = self.builds.len() + 1 - MAX_BUILDS;
        for (_, id) in finished.into_iter().take(excess) {
            self.builds.remove(&id);
            if let Some(dir) = &self.dir {
                let _ = std::fs::remove_file(dir.join(format!("{id}.json")));
            }
        }
    }
}

/// Why a build that was running when the server stopped reads `error` afterwards.
const INTERRUPTED: &str = "the server stopped while this build ran (killed, crashed or \
     restarted); its sandbox ended with it and nothing was registered: start the build again";

impl Builds {
    /// Loads the builds' states kept under `<data_dir>/images/builds` (from now on new ones
    /// are kept there too). One that was building reads `error` with the reason
    /// [`INTERRUPTED`]; one whose steps never came stays waiting for them. Unreadable files
    /// are logged and removed. Returns how many builds were interrupted.
    pub fn recover(&self, data_dir: &FsPath) -> usize {
        let dir = data_dir.join("images").join("builds");
        if let Err(e) = std::fs::create_dir_all(&dir) {
            tracing::warn!(dir = %dir.display(), error = %e, "template builds will not be kept");
            return 0;
        }
        let mut loaded = Vec::new();
        for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(id) = name.strip_suffix(".json").filter(|n| !n.starts_with('.')) else {
                // A temporary file a crash left mid-write.
                let _ = std::fs::remove_file(&path);
                continue;
            };
            match std::fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice::<BuildState>(&b).map_err(|e| e.to_string()))
            {
                Ok(state) => loaded.push((id.to_string(), state)),
                Err(e) => {
                    tracing::warn!(file = %path.display(), error = %e, "unreadable build state removed");
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        let mut interrupted = 0;
        let mut max_seq = 0;
        let Ok(mut i) = self.inner.lock() else { return 0 };
        for (id, mut state) in loaded {
            max_seq = max_seq.max(state.seq + 1);
            if state.status == Status::Building {
                state.log("error", INTERRUPTED.to_string(), None);
                state.reason =
                    Some(Reason { message: INTERRUPTED.into(), step: None, entries: Vec::new() });
                state.status = Status::Error;
                persist(Some(&dir), &id, &state);
                interrupted += 1;
            }
            i.builds.insert(id, Arc::new(Mutex::new(state)));
        }
        SEQ.fetch_max(max_seq, std::sync::atomic::Ordering::Relaxed);
        i.dir = Some(dir);
        interrupted
    }

    fn dir(&self) -> Option<PathBuf> {
        self.inner.lock().ok().and_then(|i| i.dir.clone())
    }
}

/// Order of build requests (for forgetting the oldest), continued after a restart.
static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Writes build `id`'s state to `dir` (temporary file, fsync, rename); a failure is logged:
/// the build goes on, only its record after a restart is lost.
fn persist(dir: Option<&FsPath>, id: &str, state: &BuildState) {
    let Some(dir) = dir else { return };
    let path = dir.join(format!("{id}.json"));
    let tmp = dir.join(format!(".{id}.json.tmp"));
    let write = || -> std::io::Result<()> {
        let bytes = serde_json::to_vec(state).map_err(std::io::Error::other)?;
        let mut f = std::fs::File::create(&tmp)?;
        std::io::Write::write_all(&mut f, &bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_file(&tmp);
        tracing::warn!(build = id, error = %e, "could not keep the build's state");
    }
}

/// Keeps build `id`'s current state (see [`persist`]).
fn save(app: &App, id: &str, state: &Arc<Mutex<BuildState>>) {
    let dir = app.builds.dir();
    if let Ok(s) = state.lock() {
        persist(dir.as_deref(), id, &s);
    }
}

#[derive(Debug, Clone)]
struct UploadLink {
    owner: String,
    template: String,
    hash: String,
    expires_ms: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Status {
    Waiting,
    Building,
    Ready,
    Error,
}

impl Status {
    fn as_str(self) -> &'static str {
        match self {
            Status::Waiting => "waiting",
            Status::Building => "building",
            Status::Ready => "ready",
            Status::Error => "error",
        }
    }
}

#[derive(Debug, Clone, serde::Serialize, Deserialize)]
struct LogEntry {
    ts_ms: i64,
    level: String,
    message: String,
    step: Option<String>,
}

impl LogEntry {
    fn json(&self) -> Value {
        let mut v = json!({
            "timestamp": crate::time::rfc3339_ms(self.ts_ms),
            "level": self.level,
            "message": self.message,
        });
        if let Some(s) = &self.step {
            v["step"] = json!(s);
        }
        v
    }
}

/// Why a build ended in error: the message, the failing step, its last output lines.
#[derive(Debug, Clone, serde::Serialize, Deserialize)]
struct Reason {
    message: String,
    step: Option<String>,
    entries: Vec<LogEntry>,
}

#[derive(Debug, serde::Serialize, Deserialize)]
struct BuildState {
    /// Order of requests, for forgetting the oldest.
    seq: u64,
    owner: String,
    /// The template's id: its name without the tag.
    template: String,
    tag: String,
    /// More tags to give the result.
    tags: Vec<String>,
    status: Status,
    logs: Vec<LogEntry>,
    dropped: usize,
    reason: Option<Reason>,
}

impl BuildState {
    fn done(&self) -> bool {
        matches!(self.status, Status::Ready | Status::Error)
    }

    fn log(&mut self, level: &'static str, message: String, step: Option<String>) {
        if self.logs.len() >= MAX_LOGS {
            self.dropped += 1;
            return;
        }
        self.logs.push(LogEntry { ts_ms: now_ms(), level: level.to_string(), message, step });
    }
}

fn bad(msg: impl Into<String>) -> E2bError {
    E2bError::invalid(msg)
}

fn not_found(what: &str) -> E2bError {
    E2bError::not_found(format!("template {what:?} not found"))
}

fn uuid() -> String {
    use rand::Rng;
    let b: [u8; 16] = rand::rng().random();
    let h = hex::encode(b);
    format!("{}-{}-4{}-a{}-{}", &h[..8], &h[8..12], &h[13..16], &h[17..20], &h[20..])
}

fn store_of(app: &App) -> Result<Store, E2bError> {
    Store::open(&app.manager.config().data_dir).map_err(E2bError::internal)
}

fn uploads_dir(app: &App, owner: &str, template: &str) -> PathBuf {
    // The key id and template name are both file-name safe (hex; the name's own rules).
    app.manager.config().data_dir.join("template-uploads").join(owner).join(template)
}

/// `name` or `name:tag` → (name, tag), validated by the store's rules.
fn split_name(name: &str) -> Result<(String, String), E2bError> {
    let full = ringfence_image::normalize_name(name).map_err(|e| bad(e.to_string()))?;
    let (n, t) = full.split_once(':').unwrap_or((&full, "latest"));
    Ok((n.to_string(), t.to_string()))
}

/// The build id a record answers to: the one the API gave its build, or one derived from the
/// record (templates made on the command line) so that it is stable.
fn build_id_of(r: &Record) -> String {
    if let Some(id) = r.source.strip_prefix("sdk build ") {
        return id.to_string();
    }
    use sha2::Digest as _;
    let h = hex::encode(sha2::Sha256::digest(format!("{}\0{}", r.name, r.config_digest)));
    format!("{}-{}-{}-{}-{}", &h[..8], &h[8..12], &h[12..16], &h[16..20], &h[20..32])
}

/// Every tag of template `name` in the store: (tag, record).
fn tags_of(store: &Store, name: &str) -> Result<Vec<(String, Record)>, E2bError> {
    let all = store.list().map_err(E2bError::internal)?;
    Ok(all
        .into_iter()
        .filter_map(|r| {
            let (n, t) = r.name.split_once(':')?;
            (n == name).then(|| (t.to_string(), r.clone()))
        })
        .collect())
}

/// Who template `name` belongs to, as `key` sees it.
enum Owner {
    Nobody,
    Caller,
    Operator,
    Other,
}

fn owner_of(tags: &[(String, Record)], key: &KeyInfo) -> Owner {
    match tags.first() {
        None => Owner::Nobody,
        Some((_, r)) => match &r.owner {
            None => Owner::Operator,
            Some(o) if *o == key.id => Owner::Caller,
            Some(_) => Owner::Other,
        },
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, E2bError> + Send + 'static,
) -> Result<T, E2bError> {
    tokio::task::spawn_blocking(f).await.map_err(E2bError::internal)?
}

async fn audit(app: &App, key: &KeyInfo, action: &str, detail: Value) {
    let mut rec = AuditRecord::new(action, now_ms());
    rec.user_id = Some(key.id.clone());
    if let Value::Object(m) = detail {
        rec.detail = m;
    }
    app.manager.observer().record(rec).await;
}

/// Whether `key` may start sandboxes from template `name`: 404 for another tenant's image
/// template (never revealing it), as for one that does not exist. Returns its record, if it
/// is an image template.
pub async fn check_use(app: &App, key: &KeyInfo, name: &str) -> Result<Option<Record>, E2bError> {
    if ringfence_image::normalize_name(name).is_err() {
        return Ok(None);
    }
    let store = store_of(app)?;
    let n = name.to_string();
    let rec = blocking(move || Ok(store.get(&n).ok())).await?;
    match rec {
        Some(r) if r.owner.as_ref().is_some_and(|o| *o != key.id) => Err(not_found(name)),
        other => Ok(other),
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RequestBody {
    name: Option<String>,
    alias: Option<String>,
    #[serde(default)]
    tags: Option<Vec<String>>,
    #[serde(rename = "cpuCount")]
    _cpu_count: Option<u32>,
    #[serde(rename = "memoryMB")]
    _memory_mb: Option<u32>,
}

/// `POST /v3/templates`: a build id for template `name[:tag]`, waiting for its steps.
pub async fn request(
    State(app): State<App>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, E2bError> {
    let key = caller(&app, &headers).await?;
    let b: RequestBody = parse_body(&body)?;
    let name = b.name.or(b.alias).ok_or_else(|| bad("name is required"))?;
    let (template, tag) = split_name(&name)?;
    let mut tags = Vec::new();
    for t in b.tags.unwrap_or_default() {
        let (_, t) = split_name(&format!("{template}:{t}"))?;
        if t != tag && !tags.contains(&t) {
            tags.push(t);
        }
    }
    let store = store_of(&app)?;
    let t2 = template.clone();
    let existing = blocking(move || tags_of(&store, &t2)).await?;
    match owner_of(&existing, &key) {
        Owner::Nobody | Owner::Caller => {}
        Owner::Operator => {
            return Err(E2bError::conflict(format!(
                "template {template:?} is the operator's; choose another name"
            )));
        }
        Owner::Other => {
            return Err(E2bError::conflict(format!(
                "template name {template:?} is taken; choose another name"
            )));
        }
    }
    let build_id = uuid();
    let state = BuildState {
        seq: SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        owner: key.id.clone(),
        template: template.clone(),
        tag: tag.clone(),
        tags: tags.clone(),
        status: Status::Waiting,
        logs: Vec::new(),
        dropped: 0,
        reason: None,
    };
    {
        let mut i = app.builds.inner.lock().map_err(E2bError::internal)?;
        // A name another key is building now is taken too (the store knows it only once that
        // build registers): checked and claimed under one lock.
        let theirs = i.builds.values().any(|b| {
            b.lock().is_ok_and(|b| b.template == template && b.owner != key.id && !b.done())
        });
        if theirs {
            return Err(E2bError::conflict(format!(
                "template name {template:?} is taken; choose another name"
            )));
        }
        i.forget_old();
        persist(i.dir.as_deref(), &build_id, &state);
        i.builds.insert(build_id.clone(), Arc::new(Mutex::new(state)));
    }
    audit(
        &app,
        &key,
        "template.build.request",
        json!({"template": template, "tag": tag, "build_id": build_id}),
    )
    .await;
    let mut all_tags = vec![tag];
    all_tags.extend(tags);
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({
            "templateID": template,
            "buildID": build_id,
            "public": false,
            "names": [template],
            "aliases": [template],
            "tags": all_tags,
        })),
    )
        .into_response())
}

fn build_of(
    app: &App,
    key: &KeyInfo,
    template: &str,
    build_id: &str,
) -> Result<Arc<Mutex<BuildState>>, E2bError> {
    let i = app.builds.inner.lock().map_err(E2bError::internal)?;
    i.builds
        .get(build_id)
        .filter(|b| b.lock().is_ok_and(|b| b.owner == key.id && b.template == template))
        .cloned()
        .ok_or_else(|| {
            E2bError::not_found(format!("build {build_id:?} of template {template:?} not found"))
        })
}

/// Whether `key` has a build of `template` requested or the template itself.
fn may_upload(app: &App, key: &KeyInfo, template: &str) -> bool {
    app.builds.inner.lock().is_ok_and(|i| {
        i.builds
            .values()
            .any(|b| b.lock().is_ok_and(|b| b.owner == key.id && b.template == template))
    })
}

/// `GET /templates/{id}/files/{hash}`: whether the files of a COPY step are here, and if not
/// where to PUT them (a link on this server, good for an hour).
pub async fn upload_link(
    State(app): State<App>,
    headers: HeaderMap,
    Path((template, hash)): Path<(String, String)>,
) -> Result<Response, E2bError> {
    let key = caller(&app, &headers).await?;
    if !may_upload(&app, &key, &template) {
        return Err(not_found(&template));
    }
    if !sdk::valid_hash(&hash) {
        return Err(bad(format!("files hash {hash:?} is not a sha256 (64 hex digits)")));
    }
    let present = uploads_dir(&app, &key.id, &template).join(&hash).is_file();
    let host = headers
        .get(axum::http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .filter(|h| !h.is_empty() && h.chars().all(|c| c.is_ascii_graphic()))
        .ok_or_else(|| bad("no Host header: cannot say where to upload"))?;
    let token = crate::manager::new_token();
    if let Ok(mut i) = app.builds.inner.lock() {
        let now = now_ms();
        i.uploads.retain(|_, u| u.expires_ms > now);
        i.uploads.insert(
            token.clone(),
            UploadLink {
                owner: key.id,
                template: template.clone(),
                hash: hash.clone(),
                expires_ms: now + UPLOAD_LINK_TTL_MS,
            },
        );
    }
    let scheme = headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .filter(|p| *p == "https")
        .unwrap_or("http");
    let link = json!({
        "present": present,
        "url": format!("{scheme}://{host}/template-uploads/{token}"),
    });
    Ok((StatusCode::CREATED, Json(link)).into_response())
}

/// `PUT /template-uploads/{token}`: the archive of one COPY step's files, stored under its
/// files hash. Checked against the hash when a build uses it (the hash covers the step's
/// destination, which the upload does not name).
pub async fn upload(
    State(app): State<App>,
    Path(token): Path<String>,
    body: axum::body::Body,
) -> Result<StatusCode, E2bError> {
    let link = {
        let i = app.builds.inner.lock().map_err(E2bError::internal)?;
        i.uploads.get(&token).filter(|u| u.expires_ms > now_ms()).cloned()
    };
    let link = link
        .ok_or_else(|| E2bError::forbidden("unknown or expired upload link; ask for a new one"))?;
    let dir = uploads_dir(&app, &link.owner, &link.template);
    tokio::fs::create_dir_all(&dir).await.map_err(E2bError::internal)?;
    let quota = app.manager.config().builds.upload_quota;
    let key_dir = app.manager.config().data_dir.join("template-uploads").join(&link.owner);
    let used = blocking(move || Ok(uploads_bytes(&key_dir))).await?;
    let tmp = dir.join(format!(".{}.part", crate::manager::new_token()));
    let mut file = tokio::fs::File::create(&tmp).await.map_err(E2bError::internal)?;
    let mut stream = body.into_data_stream();
    let mut total = 0u64;
    let result: Result<(), E2bError> = async {
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| bad(format!("the upload broke off: {e}")))?;
            total += chunk.len() as u64;
            if used + total > quota {
                return Err(E2bError::no_space(format!(
                    "upload quota exceeded: this key keeps {used} bytes of template uploads \
                         and may keep {quota} (uploads no build used for {}s are removed; \
                         deleting a template removes its uploads)",
                    app.manager.config().builds.upload_ttl.as_secs()
                )));
            }
            if total > MAX_UPLOAD {
                return Err(E2bError::too_large(format!(
                    "an upload is at most {MAX_UPLOAD} bytes"
                )));
            }
            file.write_all(&chunk).await.map_err(E2bError::internal)?;
        }
        file.flush().await.map_err(E2bError::internal)?;
        Ok(())
    }
    .await;
    drop(file);
    if let Err(e) = result {
        let _ = tokio::fs::remove_file(&tmp).await;
        return Err(e);
    }
    tokio::fs::rename(&tmp, dir.join(&link.hash)).await.map_err(E2bError::internal)?;
    let mut rec = AuditRecord::new("template.upload", now_ms());
    rec.user_id = Some(link.owner.clone());
    rec.detail.insert("template".into(), json!(link.template));
    rec.detail.insert("files_hash".into(), json!(link.hash));
    rec.detail.insert("bytes".into(), json!(total));
    app.manager.observer().record(rec).await;
    Ok(StatusCode::OK)
}

/// The FROM of a build: the template named by `fromTemplate` (one this key may use), or the
/// image of `fromImage` (a template here of that name, else pulled from its registry by the
/// builder). Returns it and its USER.
fn resolve_from(
    store: &Store,
    spec: &BuildSpec,
    key: &KeyInfo,
) -> Result<(String, String), E2bError> {
    if spec.from_image_registry.is_some() {
        return Err(bad(
            "fromImageRegistry (private registry credentials) is not supported: pull the image \
             with `ringfence template pull` and build from_template it",
        ));
    }
    let from = match (&spec.from_template, &spec.from_image) {
        (Some(t), _) => t.clone(),
        (None, Some(i)) => i.clone(),
        (None, None) => return Err(bad("neither fromTemplate nor fromImage is set")),
    };
    if ringfence_image::store::RESERVED.contains(&from.as_str()) {
        return Err(bad(format!(
            "{from:?} is a built-in template that runs on the host's /usr and cannot be a build \
             base; build from an image template (`ringfence template ls`)"
        )));
    }
    let local = ringfence_image::normalize_name(&from).ok().and_then(|n| store.get(&n).ok());
    match local {
        Some(r) if r.owner.as_ref().is_some_and(|o| *o != key.id) => Err(not_found(&from)),
        Some(r) => Ok((r.name, r.config.user.unwrap_or_default())),
        None if spec.from_template.is_some() => Err(not_found(&from)),
        // A registry reference: the builder pulls it (or finds its earlier pull).
        None => Ok((from, String::new())),
    }
}

/// `POST /v2/templates/{id}/builds/{buildID}`: the steps; checks them and the uploads, then
/// builds in the background.
pub async fn start(
    State(app): State<App>,
    headers: HeaderMap,
    Path((template, build_id)): Path<(String, String)>,
    body: axum::body::Bytes,
) -> Result<StatusCode, E2bError> {
    let key = caller(&app, &headers).await?;
    let state = build_of(&app, &key, &template, &build_id)?;
    if state.lock().map_err(E2bError::internal)?.status != Status::Waiting {
        return Err(E2bError::conflict(format!("build {build_id:?} was started already")));
    }
    let spec: BuildSpec =
        serde_json::from_slice(&body).map_err(|e| bad(format!("invalid build request: {e}")))?;
    if spec.start_cmd.is_some() != spec.ready_cmd.is_some() && spec.start_cmd.is_some() {
        return Err(bad("startCmd needs a readyCmd (set_start_cmd(start, ready))"));
    }
    if spec.start_cmd.is_none() && spec.ready_cmd.is_some() {
        return Err(bad("readyCmd without a startCmd is not supported (set_start_cmd)"));
    }
    let data_dir = app.manager.config().data_dir.clone();
    let uploads = uploads_dir(&app, &key.id, &template);
    // The build context: each upload unpacked once, after its hash checked out, under
    // `ctx/<hash>` (the hash covers the step's source and destination, so one directory
    // serves every build that names it; a rebuild does not unpack again).
    let context = uploads.join("ctx");
    let key2 = key.clone();
    let spec2 = spec.clone();
    let ctx = context.clone();
    let translated = blocking(move || {
        let store = Store::open(&data_dir).map_err(E2bError::internal)?;
        let (from, user) = resolve_from(&store, &spec2, &key2)?;
        let t = sdk::translate(&spec2, &from, &user).map_err(bad)?;
        std::fs::create_dir_all(&ctx).map_err(E2bError::internal)?;
        for (hash, src, dest) in &t.copies {
            let up = uploads.join(hash);
            if !up.is_file() {
                return Err(bad(format!(
                    "COPY {src} {dest}: its files (hash {hash}) were not uploaded"
                )));
            }
            // Used now: the upload's expiry counts from here.
            let _ = std::fs::File::options()
                .append(true)
                .open(&up)
                .and_then(|f| f.set_modified(std::time::SystemTime::now()));
            let into = ctx.join(hash);
            if into.is_dir() {
                continue;
            }
            // Unpacked beside its place and renamed in whole: a concurrent start of another
            // build of the same files never sees half of them.
            let tmp = ctx.join(format!(".{hash}.{}", crate::manager::new_token()));
            sdk::unpack_upload(&up, &tmp, src, dest, hash)
                .map_err(|e| bad(format!("COPY {src} {dest}: {e}")))?;
            if std::fs::rename(&tmp, &into).is_err() {
                let _ = std::fs::remove_dir_all(&tmp);
            }
        }
        Ok(t)
    })
    .await?;
    {
        let mut s = state.lock().map_err(E2bError::internal)?;
        if s.status != Status::Waiting {
            return Err(E2bError::conflict(format!("build {build_id:?} was started already")));
        }
        s.status = Status::Building;
        let tag = s.tag.clone();
        s.log("info", format!("Build {build_id} of {template}:{tag} queued"), None);
    }
    save(&app, &build_id, &state);
    audit(
        &app,
        &key,
        "template.build.start",
        json!({"template": template, "build_id": build_id, "steps": spec.steps.len()}),
    )
    .await;
    let start = spec
        .start_cmd
        .clone()
        .zip(spec.ready_cmd.clone())
        .map(|(s, r)| StartCmd { start: s, ready: r });
    tokio::spawn(run_build(app, key, state, build_id, context, translated, start));
    Ok(StatusCode::ACCEPTED)
}

/// The log sink of one build: steps, their output line by line, results.
struct Sink {
    state: Arc<Mutex<BuildState>>,
    translated: Translated,
    /// Dockerfile line of each builder step (1-based step → line), from the parsed file.
    lines: Vec<usize>,
    step: Option<String>,
    partial: Vec<u8>,
    /// The running step's last output lines, for the error's reason.
    tail: std::collections::VecDeque<String>,
}

impl Sink {
    fn push(&mut self, level: &'static str, msg: String) {
        if let Ok(mut s) = self.state.lock() {
            s.log(level, msg, self.step.clone());
        }
    }

    fn flush_line(&mut self, line: &[u8]) {
        let text = String::from_utf8_lossy(line).trim_end().to_string();
        if text.is_empty() {
            return;
        }
        self.tail.push_back(text.clone());
        while self.tail.len() > 20 {
            self.tail.pop_front();
        }
        self.push("info", text);
    }
}

impl BuildProgress for Sink {
    fn step(&mut self, n: usize, total: usize, text: &str) {
        self.step =
            self.lines.get(n.wrapping_sub(1)).and_then(|l| sdk::step_name(&self.translated, *l));
        self.tail.clear();
        self.partial.clear();
        let one: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
        self.push("info", format!("[{n}/{total}] {one}"));
    }

    fn output(&mut self, bytes: &[u8]) {
        self.partial.extend_from_slice(bytes);
        while let Some(i) = self.partial.iter().position(|b| *b == b'\n' || *b == b'\r') {
            let line: Vec<u8> = self.partial.drain(..=i).collect();
            self.flush_line(&line[..line.len() - 1]);
        }
        if self.partial.len() > 4096 {
            let l = std::mem::take(&mut self.partial);
            self.flush_line(&l);
        }
    }

    fn step_done(&mut self, n: usize, total: usize, how: StepResult, took: Duration) {
        if !self.partial.is_empty() {
            let l = std::mem::take(&mut self.partial);
            self.flush_line(&l);
        }
        match how {
            StepResult::Cached => self.push("info", format!("[{n}/{total}] CACHED")),
            StepResult::Built => {
                self.push("info", format!("[{n}/{total}] DONE {:.2}s", took.as_secs_f64()))
            }
            StepResult::Config => {}
        }
    }

    fn note(&mut self, note: &str) {
        self.push("warn", note.to_string());
    }
}

async fn run_build(
    app: App,
    key: KeyInfo,
    state: Arc<Mutex<BuildState>>,
    build_id: String,
    context: PathBuf,
    translated: Translated,
    start: Option<StartCmd>,
) {
    let (template, tag, tags) = match state.lock() {
        Ok(s) => (s.template.clone(), s.tag.clone(), s.tags.clone()),
        Err(_) => return,
    };
    let lock = match app.builds.inner.lock() {
        Ok(mut i) => i.locks.entry(template.clone()).or_default().clone(),
        Err(_) => return,
    };
    let waited = std::time::Instant::now();
    let _one_at_a_time = lock.lock().await;
    if waited.elapsed() > Duration::from_millis(50)
        && let Ok(mut s) = state.lock()
    {
        s.log("info", "Another build of this template finished; starting".into(), None);
    }
    let began = std::time::Instant::now();
    let (cfg, pool, seccomp) = app.manager.build_parts();
    let mut limits = app.manager.config().limits;
    limits.pids = Some(4096);
    let data_dir = app.manager.config().data_dir.clone();
    let st = state.clone();
    let owner = key.id.clone();
    let name = format!("{template}:{tag}");
    let bid = build_id.clone();
    let tpl = template.clone();
    if let Some(sc) = &start
        && let Ok(mut s) = state.lock()
    {
        s.log(
            "info",
            format!(
                "Start command {:?} runs in each sandbox created from this template, and \
                 create answers once {:?} exits 0 (not run at build: no memory snapshot here)",
                sc.start, sc.ready
            ),
            None,
        );
    }
    let rt = tokio::runtime::Handle::current();
    let insecure_registries = app.manager.config().builds.insecure_registries.clone();
    let (net_app, net_owner, net_build, net_name) =
        (app.clone(), key.id.clone(), build_id.clone(), name.clone());
    let result = tokio::task::spawn_blocking(move || {
        let store = Store::open(&data_dir).map_err(|e| (e.to_string(), None, Vec::new()))?;
        let parsed = ringfence_image::dockerfile::parse(translated.dockerfile.as_bytes())
            .map_err(|e| (e.to_string(), None, Vec::new()))?;
        let lines = parsed.steps.iter().map(|s| s.line).collect();
        let mut sink = Sink {
            state: st,
            translated: translated.clone(),
            lines,
            step: None,
            partial: Vec::new(),
            tail: Default::default(),
        };
        let opts = BuildOptions {
            name: name.clone(),
            dockerfile: translated.dockerfile.clone().into_bytes(),
            dockerfile_path: PathBuf::from("template.json"),
            context,
            build_args: Default::default(),
            no_cache: translated.no_cache,
            no_cache_from_line: translated.no_cache_from_line,
            pull: ringfence_image::registry::PullOptions { insecure: insecure_registries },
            limits: Default::default(),
            source: Some(format!("sdk build {bid}")),
            start,
            owner: Some(owner),
        };
        let hook: crate::builder::NetHook = Box::new(move |netns, sandbox| {
            net_app.manager.network().attach_build(
                &rt,
                netns,
                sandbox,
                Some(&net_owner),
                (&net_build, &net_name),
            )
        });
        let mut runner =
            crate::builder::JailRunner::new(cfg, Some(pool), seccomp, limits, STEP_TIMEOUT)
                .with_network(hook);
        match ringfence_image::build::build(&store, &opts, &mut runner, &mut sink) {
            Ok(b) => {
                // The extra tags: the same record under each name.
                for t in &tags {
                    let mut r = b.record.clone();
                    r.name = format!("{tpl}:{t}");
                    store.register(&r).map_err(|e| (e.to_string(), None, Vec::new()))?;
                }
                Ok((b.cached, b.built))
            }
            Err(e) => {
                let step = match &e {
                    ImageError::Build { line, .. } => sdk::step_name(&translated, *line),
                    _ => None,
                };
                let tail: Vec<String> = sink.tail.iter().cloned().collect();
                Err((e.to_string(), step, tail))
            }
        }
    })
    .await
    .unwrap_or_else(|e| Err((format!("the build task failed: {e}"), None, Vec::new())));
    let took = began.elapsed();
    let mut detail = json!({
        "template": template,
        "tag": tag,
        "build_id": build_id,
        "duration_ms": took.as_millis() as u64,
    });
    if let Ok(mut s) = state.lock() {
        match &result {
            Ok((cached, built)) => {
                s.log(
                    "info",
                    format!(
                        "Build finished: {cached} steps cached, {built} built, in {:.2}s",
                        took.as_secs_f64()
                    ),
                    None,
                );
                s.status = Status::Ready;
                detail["status"] = json!("ready");
            }
            Err((msg, step, tail)) => {
                let mut message = msg.clone();
                if !tail.is_empty() {
                    message.push_str("\noutput:\n");
                    message.push_str(&tail.join("\n"));
                }
                s.log("error", msg.clone(), step.clone());
                let entries = tail
                    .iter()
                    .map(|t| LogEntry {
                        ts_ms: now_ms(),
                        level: "error".into(),
                        message: t.clone(),
                        step: step.clone(),
                    })
                    .collect();
                s.reason = Some(Reason { message, step: step.clone(), entries });
                s.status = Status::Error;
                detail["status"] = json!("error");
                detail["reason"] = json!(msg);
            }
        }
    }
    save(&app, &build_id, &state);
    let mut rec = AuditRecord::new("template.build", now_ms());
    rec.user_id = Some(key.id.clone());
    rec.duration_ms = Some(took.as_millis() as u64);
    if let Value::Object(m) = detail {
        rec.detail = m;
    }
    app.manager.observer().record(rec).await;
}

#[derive(Debug, Deserialize)]
pub struct StatusQuery {
    #[serde(rename = "logsOffset")]
    logs_offset: Option<usize>,
    limit: Option<usize>,
}

/// `GET /templates/{id}/builds/{buildID}/status?logsOffset=`.
pub async fn status(
    State(app): State<App>,
    headers: HeaderMap,
    Path((template, build_id)): Path<(String, String)>,
    Query(q): Query<StatusQuery>,
) -> Result<Json<Value>, E2bError> {
    let key = caller(&app, &headers).await?;
    let state = build_of(&app, &key, &template, &build_id)?;
    let s = state.lock().map_err(E2bError::internal)?;
    let from = q.logs_offset.unwrap_or(0);
    let limit = q.limit.unwrap_or(LOGS_PAGE).clamp(1, LOGS_PAGE);
    let entries: Vec<Value> = s.logs.iter().skip(from).take(limit).map(LogEntry::json).collect();
    let mut v = json!({
        "templateID": s.template,
        "buildID": build_id,
        "status": s.status.as_str(),
        "logEntries": entries,
        "logs": [],
    });
    if let Some(Reason { message, step, entries }) = &s.reason {
        let mut r = json!({
            "message": message,
            "logEntries": entries.iter().map(LogEntry::json).collect::<Vec<_>>(),
        });
        if let Some(step) = step {
            r["step"] = json!(step);
        }
        v["reason"] = r;
    }
    Ok(Json(v))
}

fn template_json(name: &str, tags: &[(String, Record)], app: &App, public: bool) -> Value {
    let latest = tags.iter().find(|(t, _)| t == "latest").or(tags.first());
    let (created, updated) = tags.iter().fold((i64::MAX, 0i64), |(c, u), (_, r)| {
        let t = (r.imported_unix as i64).saturating_mul(1000);
        (c.min(t), u.max(t))
    });
    let limits = app.manager.config().limits;
    json!({
        "templateID": name,
        "buildID": latest.map(|(_, r)| build_id_of(r)).unwrap_or_default(),
        "cpuCount": limits.cpu_millis.map_or(1, |m| (m / 1000).max(1)),
        "memoryMB": limits.memory.map_or(0, |m| m >> 20),
        "diskSizeMB": limits.disk >> 20,
        "public": public,
        "aliases": [name],
        "names": [name],
        "createdAt": crate::time::rfc3339_ms(if created == i64::MAX { 0 } else { created }),
        "updatedAt": crate::time::rfc3339_ms(updated),
        "createdBy": null,
        "lastSpawnedAt": null,
        "spawnCount": 0,
        "buildCount": tags.len(),
        "envdVersion": crate::manager::ENVD_VERSION,
        "buildStatus": "ready",
    })
}

/// `GET /templates`: this key's templates and the operator's (public).
pub async fn list(State(app): State<App>, headers: HeaderMap) -> Result<Json<Value>, E2bError> {
    let key = caller(&app, &headers).await?;
    let store = store_of(&app)?;
    let all = blocking(move || store.list().map_err(E2bError::internal)).await?;
    let mut by_name: std::collections::BTreeMap<String, Vec<(String, Record)>> = Default::default();
    for r in all {
        if r.owner.as_ref().is_some_and(|o| *o != key.id) {
            continue;
        }
        if let Some((n, t)) = r.name.split_once(':') {
            by_name.entry(n.to_string()).or_default().push((t.to_string(), r.clone()));
        }
    }
    let out: Vec<Value> = by_name
        .iter()
        .map(|(n, tags)| template_json(n, tags, &app, tags[0].1.owner.is_none()))
        .collect();
    Ok(Json(Value::Array(out)))
}

/// `GET /templates/aliases/{alias}`: 200 for this key's template (or the operator's), 403 for
/// another tenant's (as E2B answers for a name taken by another team), 404 for none.
pub async fn alias(
    State(app): State<App>,
    headers: HeaderMap,
    Path(alias): Path<String>,
) -> Result<Json<Value>, E2bError> {
    let key = caller(&app, &headers).await?;
    let Ok((name, _)) = split_name(&alias) else { return Err(not_found(&alias)) };
    let store = store_of(&app)?;
    let n2 = name.clone();
    let tags = blocking(move || tags_of(&store, &n2)).await?;
    match owner_of(&tags, &key) {
        Owner::Nobody => Err(not_found(&alias)),
        Owner::Other => {
            Err(E2bError::forbidden(format!("template {alias:?} belongs to another tenant")))
        }
        Owner::Caller => Ok(Json(json!({"templateID": name, "public": false}))),
        Owner::Operator => Ok(Json(json!({"templateID": name, "public": true}))),
    }
}

/// `GET /templates/{id}/tags`.
pub async fn get_tags(
    State(app): State<App>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Value>, E2bError> {
    let key = caller(&app, &headers).await?;
    let (name, _) = split_name(&id).map_err(|_| not_found(&id))?;
    let store = store_of(&app)?;
    let tags = blocking(move || tags_of(&store, &name)).await?;
    if matches!(owner_of(&tags, &key), Owner::Nobody | Owner::Other) {
        return Err(not_found(&id));
    }
    Ok(Json(Value::Array(
        tags.iter()
            .map(|(t, r)| {
                json!({
                    "tag": t,
                    "buildID": build_id_of(r),
                    "createdAt": crate::time::rfc3339_ms((r.imported_unix as i64).saturating_mul(1000)),
                })
            })
            .collect(),
    )))
}

#[derive(Debug, Default, Deserialize)]
pub struct AssignBody {
    target: Option<String>,
    #[serde(default)]
    tags: Vec<String>,
}

/// `POST /templates/tags`: gives the build `target` (`name:tag`) more tags.
pub async fn assign_tags(
    State(app): State<App>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, E2bError> {
    let key = caller(&app, &headers).await?;
    let b: AssignBody = parse_body(&body)?;
    let target = b.target.ok_or_else(|| bad("target (name:tag) is required"))?;
    if b.tags.is_empty() {
        return Err(bad("tags is empty"));
    }
    let (name, tag) = split_name(&target)?;
    let mut new = Vec::new();
    for t in &b.tags {
        new.push(split_name(&format!("{name}:{t}"))?.1);
    }
    let store = store_of(&app)?;
    let k2 = key.clone();
    let (n2, new2) = (name.clone(), new.clone());
    let rec = blocking(move || {
        let tags = tags_of(&store, &n2)?;
        if !matches!(owner_of(&tags, &k2), Owner::Caller) {
            return Err(not_found(&n2));
        }
        let rec = tags
            .into_iter()
            .find(|(t, _)| *t == tag)
            .map(|(_, r)| r)
            .ok_or_else(|| not_found(&format!("{n2}:{tag}")))?;
        for t in &new2 {
            let mut r = rec.clone();
            r.name = format!("{n2}:{t}");
            store.register(&r).map_err(E2bError::internal)?;
        }
        Ok(rec)
    })
    .await?;
    audit(&app, &key, "template.tags.assign", json!({"template": name, "tags": new})).await;
    let v = json!({"tags": new, "buildID": build_id_of(&rec)});
    Ok((StatusCode::CREATED, Json(v)).into_response())
}

#[derive(Debug, Default, Deserialize)]
pub struct RemoveTagsBody {
    name: Option<String>,
    #[serde(default)]
    tags: Vec<String>,
}

/// `DELETE /templates/tags`: removes tags (the builds only they name go with them).
pub async fn remove_tags(
    State(app): State<App>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<StatusCode, E2bError> {
    let key = caller(&app, &headers).await?;
    let b: RemoveTagsBody = parse_body(&body)?;
    let name = b.name.ok_or_else(|| bad("name is required"))?;
    let (name, _) = split_name(&name)?;
    if b.tags.is_empty() {
        return Err(bad("tags is empty"));
    }
    let store = store_of(&app)?;
    let (k2, n2, t2, app2) = (key.clone(), name.clone(), b.tags.clone(), app.clone());
    blocking(move || {
        let tags = tags_of(&store, &n2)?;
        if !matches!(owner_of(&tags, &k2), Owner::Caller) {
            return Err(not_found(&n2));
        }
        for t in &t2 {
            if !tags.iter().any(|(have, _)| have == t) {
                return Err(not_found(&format!("{n2}:{t}")));
            }
        }
        for t in &t2 {
            check_unused(&app2, &format!("{n2}:{t}"))?;
        }
        for t in &t2 {
            store.remove(&format!("{n2}:{t}")).map_err(|e| in_use(&store, e))?;
        }
        Ok(())
    })
    .await?;
    audit(&app, &key, "template.tags.remove", json!({"template": name, "tags": b.tags})).await;
    Ok(StatusCode::NO_CONTENT)
}

/// A store refusal to remove a template in use is the client's to retry (409); anything
/// else is internal. The processes holding the template's claim are logged (not told to
/// the client: host pids), for the case where no sandbox or build of this server names it.
fn in_use(store: &ringfence_image::store::Store, e: ImageError) -> E2bError {
    match e {
        ImageError::InUse(name) => {
            let holders = store.claim_holders(&name);
            tracing::warn!(template = %name, ?holders, "template removal refused: its claim is held");
            E2bError::conflict(ImageError::InUse(name).to_string())
        }
        other => E2bError::internal(other),
    }
}

/// Refuses (409, naming them) removing template `name` (`name:tag`) while a sandbox that is
/// not killed (a paused one included: it holds no claim on the store while stopped) or a
/// snapshot was made from it: they need its layers to run or resume.
pub fn check_unused(app: &App, name: &str) -> Result<(), E2bError> {
    match users_of(app.manager.store(), name).map_err(E2bError::internal)? {
        None => Ok(()),
        Some(why) => Err(E2bError::conflict(why)),
    }
}

/// Why template `name` cannot be removed now, if a sandbox not killed or a snapshot of the
/// server's store `store` was made from it (`None`: nothing is). `ringfence template rm`
/// asks this too.
pub fn users_of(
    store: &crate::store::Store,
    name: &str,
) -> Result<Option<String>, crate::store::StoreError> {
    let Ok(want) = ringfence_image::normalize_name(name) else { return Ok(None) };
    let mut by: Vec<String> = store
        .template_users()?
        .into_iter()
        .filter(|(_, _, t)| ringfence_image::normalize_name(t).is_ok_and(|t| t == want))
        .map(|(kind, id, _)| format!("{kind} {id}"))
        .collect();
    if by.is_empty() {
        return Ok(None);
    }
    by.sort();
    let more = by.len().saturating_sub(5);
    by.truncate(5);
    Ok(Some(format!(
        "template {want:?} is in use by {}{}: kill the sandboxes and delete the snapshots first",
        by.join(", "),
        if more > 0 { format!(" and {more} more") } else { String::new() }
    )))
}

/// `DELETE /templates/{id}` for an image template of this key's: every tag of it. Returns
/// `Ok(false)` when `id` names none (the caller then tries snapshots).
pub async fn delete(app: &App, key: &KeyInfo, id: &str) -> Result<bool, E2bError> {
    let Ok((name, _)) = split_name(id) else { return Ok(false) };
    let store = store_of(app)?;
    let (k2, n2, app2) = (key.clone(), name.clone(), app.clone());
    let removed = blocking(move || {
        let tags = tags_of(&store, &n2)?;
        match owner_of(&tags, &k2) {
            Owner::Caller => {}
            Owner::Operator => {
                return Err(E2bError::forbidden(format!(
                    "template {n2:?} is the operator's (`ringfence template rm`)"
                )));
            }
            Owner::Nobody | Owner::Other => return Ok(false),
        }
        for (t, _) in &tags {
            check_unused(&app2, &format!("{n2}:{t}"))?;
        }
        for (t, _) in &tags {
            store.remove(&format!("{n2}:{t}")).map_err(|e| in_use(&store, e))?;
        }
        Ok(true)
    })
    .await?;
    if removed {
        let dir = uploads_dir(app, &key.id, &name);
        let _ = tokio::fs::remove_dir_all(dir).await;
        audit(app, key, "template.delete", json!({"template": name})).await;
    }
    Ok(removed)
}

/// Runs template `rec`'s start command in the new sandbox `live` and waits until its ready
/// check exits 0, for at most [`READY_TIMEOUT`]. A template without one: nothing to do.
pub async fn start_command(live: &Arc<crate::manager::Live>, rec: &Record) -> Result<(), String> {
    let Some(sc) = rec.start.clone() else { return Ok(()) };
    run_start(live, rec, &sc, READY_TIMEOUT).await
}

async fn run_start(
    live: &Arc<crate::manager::Live>,
    rec: &Record,
    sc: &StartCmd,
    timeout: Duration,
) -> Result<(), String> {
    use ringfence_proto::{Event, ExitStatus, Reply, Request, SandboxUser, SpawnSpec, StdioMode};
    let user = match rec.config.user.as_deref() {
        Some("root" | "0" | "0:0") => SandboxUser::Root,
        _ => SandboxUser::User,
    };
    let cwd = rec.config.working_dir.clone().filter(|w| w.starts_with('/'));
    let spec = |cmd: &str, tag: Option<String>| SpawnSpec {
        cmd: "/bin/sh".into(),
        args: vec!["-c".into(), cmd.to_string()],
        env: Default::default(),
        cwd: cwd.clone(),
        user,
        stdio: StdioMode::Pipe { stdin: false },
        tag,
    };
    let (reply, mut started) = live
        .client
        .stream(Request::Spawn(spec(&sc.start, Some("start-cmd".into()))))
        .await
        .map_err(|e| format!("the start command could not start: {e}"))?;
    if !matches!(reply, Reply::Spawned { .. }) {
        return Err(format!("the start command could not start: {reply:?}"));
    }
    let mut start_out: Vec<u8> = Vec::new();
    let keep = |buf: &mut Vec<u8>, data: &[u8]| {
        buf.extend_from_slice(data);
        if buf.len() > 4096 {
            let cut = buf.len() - 4096;
            buf.drain(..cut);
        }
    };
    let deadline = tokio::time::Instant::now() + timeout;
    let last_ready: String;
    loop {
        for ev in started.drain() {
            match ev {
                Event::Stdout { data, .. } | Event::Stderr { data, .. } => {
                    keep(&mut start_out, &data)
                }
                Event::Exited { status, .. } => {
                    let how = match status {
                        ExitStatus::Code(c) => format!("exit code {c}"),
                        ExitStatus::Signal(s) => format!("signal {s}"),
                    };
                    return Err(format!(
                        "the start command {:?} ended ({how}) before the ready check {:?} \
                         passed; its output: {}",
                        sc.start,
                        sc.ready,
                        String::from_utf8_lossy(&start_out).trim()
                    ));
                }
                _ => {}
            }
        }
        let (reply, mut check) = live
            .client
            .stream(Request::Spawn(spec(&sc.ready, None)))
            .await
            .map_err(|e| format!("the ready check could not start: {e}"))?;
        if !matches!(reply, Reply::Spawned { .. }) {
            return Err(format!("the ready check could not start: {reply:?}"));
        }
        let mut out = Vec::new();
        let mut code = None;
        while let Some(ev) = tokio::time::timeout_at(deadline, check.recv()).await.ok().flatten() {
            match ev {
                Event::Stdout { data, .. } | Event::Stderr { data, .. } => keep(&mut out, &data),
                Event::Exited { status, .. } => {
                    code = Some(status);
                    break;
                }
                _ => {}
            }
        }
        if code == Some(ExitStatus::Code(0)) {
            // The start command runs on; nobody reads its output any more.
            started.detach();
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            last_ready = String::from_utf8_lossy(&out).trim().to_string();
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Err(format!(
        "the ready check {:?} did not pass within {}s of the start command {:?}; its last \
         output: {last_ready:?}; the start command's: {:?}",
        sc.ready,
        timeout.as_secs(),
        sc.start,
        String::from_utf8_lossy(&start_out).trim()
    ))
}

/// Bytes of the uploaded archives under one key's upload directory (`<key>/<template>/<hash>`;
/// partial uploads count too, the unpacked `ctx` copies do not).
fn uploads_bytes(key_dir: &FsPath) -> u64 {
    let mut total = 0;
    for t in std::fs::read_dir(key_dir).into_iter().flatten().flatten() {
        for f in std::fs::read_dir(t.path()).into_iter().flatten().flatten() {
            if let Ok(m) = f.metadata()
                && m.is_file()
            {
                total += m.len();
            }
        }
    }
    total
}

/// Removes uploads (archives, and their unpacked copies under `ctx/`) not used for `ttl`:
/// written or last read by a build's start longer ago than that. The SDK asks whether its
/// files are here before each build and uploads them again if not. Returns how many went.
pub fn expire_uploads(data_dir: &FsPath, ttl: Duration) -> usize {
    let root = data_dir.join("template-uploads");
    let Some(cutoff) = std::time::SystemTime::now().checked_sub(ttl) else { return 0 };
    let old = |p: &FsPath| {
        std::fs::symlink_metadata(p).and_then(|m| m.modified()).is_ok_and(|t| t < cutoff)
    };
    let mut removed = 0;
    for owner in std::fs::read_dir(&root).into_iter().flatten().flatten() {
        for t in std::fs::read_dir(owner.path()).into_iter().flatten().flatten() {
            for e in std::fs::read_dir(t.path()).into_iter().flatten().flatten() {
                let p = e.path();
                let name = e.file_name().to_string_lossy().into_owned();
                if name == "ctx" || name.starts_with('.') || !old(&p) {
                    continue;
                }
                if std::fs::remove_file(&p).is_ok() {
                    removed += 1;
                    // Its unpacked copy goes with it (the next build unpacks a new upload).
                    let _ = std::fs::remove_dir_all(t.path().join("ctx").join(&name));
                }
            }
            // A template directory left with nothing (or only an empty ctx) goes too.
            let _ = std::fs::remove_dir(t.path().join("ctx"));
            let _ = std::fs::remove_dir(t.path());
        }
        let _ = std::fs::remove_dir(owner.path());
    }
    removed
}

/// Removes what a crash left: partial uploads (`.*.part`) and half-unpacked contexts
/// (`ctx/.<hash>.*`).
pub fn sweep(data_dir: &FsPath) {
    let root = data_dir.join("template-uploads");
    let Ok(owners) = std::fs::read_dir(&root) else { return };
    for owner in owners.flatten() {
        let Ok(templates) = std::fs::read_dir(owner.path()) else { continue };
        for t in templates.flatten() {
            for dir in [t.path(), t.path().join("ctx")] {
                let Ok(entries) = std::fs::read_dir(&dir) else { continue };
                for e in entries.flatten() {
                    if e.file_name().to_string_lossy().starts_with('.') {
                        let p = e.path();
                        let _ = std::fs::remove_dir_all(&p).or_else(|_| std::fs::remove_file(&p));
                    }
                }
            }
        }
    }
}
