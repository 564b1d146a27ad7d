//! Volumes, in E2B's shapes: `/volumes` (create, list, get, destroy; API key) and the content
//! API `/volumecontent/{id}/{dir,path,file}` (the volume's bearer token), usable while no
//! sandbox runs.
//!
//! A volume is a directory `<data-dir>/volumes/<id>` on the host. Every path a client names is
//! resolved lexically inside it (`..` is refused, never followed) and each existing component
//! is checked not to be a symlink, so no request reaches outside the volume. Writes are
//! streamed to `<data-dir>/volumes/.tmp` and renamed into place: a reader never sees half a
//! file, and a `kill -9` mid-upload leaves only a temporary file (removed at the next start).
//! A volume holds at most as many bytes as a sandbox's disk (`ringfence serve --disk`); a write
//! that would go beyond is refused with 507 and leaves the old content.

use std::collections::HashMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path as FsPath, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;

use crate::api::{App, caller};
use crate::e2b_error::E2bError;
use crate::store::{StoreError, VolumeRecord};

pub use ringfence_core::volumes::host_mounts;

/// Where volumes live under the data directory.
pub fn root(app: &App) -> PathBuf {
    app.manager.config().data_dir.join("volumes")
}

/// Uploads in progress, inside each volume (left out of listings).
const UPLOADS: &str = ".rf-uploads";

fn tmp_dir(root: &FsPath) -> PathBuf {
    root.join(".tmp")
}

/// Removes what a crash may have left (upload temporaries; images and directories of
/// volumes whose row is gone) and mounts every volume's filesystem that is not mounted (after
/// a host reboot; a server restart finds them still mounted).
pub fn sweep(data_dir: &FsPath, store: &crate::store::Store) {
    let root = data_dir.join("volumes");
    let _ = std::fs::remove_dir_all(tmp_dir(&root));
    let Ok(ids) = store.volume_ids() else { return };
    if let Ok(entries) = std::fs::read_dir(&root) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let id = name.strip_suffix(".img").unwrap_or(&name).to_string();
            if name.starts_with('.') || ids.contains(&id) {
                continue;
            }
            tracing::info!(volume = %id, "removing what a destroyed volume left");
            remove_storage(&root, &id);
        }
    }
    for id in ids {
        if let Err(e) = mount_storage(&root, &id) {
            tracing::warn!(volume = %id, error = %e, "mounting a volume's filesystem");
        }
        let _ = std::fs::remove_dir_all(root.join(&id).join(UPLOADS));
    }
}

/// Unmounts every volume's filesystem at a clean shutdown (its sandboxes are gone by then):
/// the next start mounts them again, and a data directory removed after a clean stop leaves
/// no mount behind. A `kill -9` leaves them mounted; the next start adopts them as they are.
pub fn unmount_all(data_dir: &FsPath, store: &crate::store::Store) {
    let root = data_dir.join("volumes");
    for id in store.volume_ids().unwrap_or_default() {
        let dir = root.join(&id);
        if is_mountpoint(&dir)
            && let Err(e) = run(std::process::Command::new("umount").arg("-l").arg(&dir))
        {
            tracing::warn!(volume = %id, error = %e, "unmounting a volume at shutdown");
        }
    }
}

/// A volume's storage: an ext4 image of the quota's size (`<id>.img`), loop-mounted at
/// `<id>/`. The filesystem's size is the quota for every writer, the content API and sandboxes
/// that mount the volume alike (a write beyond it fails with ENOSPC). Its root belongs to
/// canonical uid/gid 1000, E2B's sandbox `user`, as sandboxes see it through their id mapping.
fn make_storage(root: &FsPath, id: &str, bytes: u64) -> Result<(), String> {
    std::fs::create_dir_all(root).map_err(|e| format!("mkdir {}: {e}", root.display()))?;
    let image = root.join(format!("{id}.img"));
    let f = std::fs::File::create(&image).map_err(|e| format!("create the image: {e}"))?;
    f.set_len(bytes).map_err(|e| format!("size the image: {e}"))?;
    drop(f);
    run(std::process::Command::new("mkfs.ext4")
        .args(["-q", "-F", "-m", "0", "-E", "root_owner=1000:1000"])
        .arg(&image))?;
    mount_storage(root, id)?;
    // Nothing of ext4's own in a volume's listing.
    let _ = std::fs::remove_dir(root.join(id).join("lost+found"));
    Ok(())
}

fn is_mountpoint(dir: &FsPath) -> bool {
    let (Ok(m), Some(Ok(p))) = (std::fs::metadata(dir), dir.parent().map(std::fs::metadata)) else {
        return false;
    };
    m.dev() != p.dev()
}

fn mount_storage(root: &FsPath, id: &str) -> Result<(), String> {
    let dir = root.join(id);
    if is_mountpoint(&dir) {
        return Ok(());
    }
    std::fs::create_dir_all(&dir).map_err(|e| format!("mkdir {}: {e}", dir.display()))?;
    run(std::process::Command::new("mount")
        .args(["-t", "ext4", "-o", "loop,nodev,nosuid"])
        .arg(root.join(format!("{id}.img")))
        .arg(&dir))
}

/// Unmounts (lazily: a sandbox ending at this moment may still hold it) and removes both.
fn remove_storage(root: &FsPath, id: &str) {
    let dir = root.join(id);
    if is_mountpoint(&dir) {
        let _ = run(std::process::Command::new("umount").arg("-l").arg(&dir));
    }
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_file(root.join(format!("{id}.img")));
}

fn run(cmd: &mut std::process::Command) -> Result<(), String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr).trim()))
    }
}

/// Where a volume may be attached: an absolute path, no `.`/`..`, not the root and not under a
/// directory the sandbox's own setup owns.
fn check_mount_path(path: &str) -> Result<String, E2bError> {
    let bad = |why: &str| E2bError::invalid(format!("volume mount path {path:?}: {why}"));
    if !path.starts_with('/') {
        return Err(bad("must be absolute"));
    }
    let parts: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();
    if parts.is_empty() {
        return Err(bad("cannot be the root"));
    }
    if parts.iter().any(|c| *c == "." || *c == ".." || c.contains('\0')) {
        return Err(bad("must not contain '.' or '..'"));
    }
    if ["proc", "dev", "sys", "etc", "usr", "bin", "sbin", "lib", "lib64", "run", "tmp"]
        .contains(&parts[0])
        && parts.len() == 1
        || ["proc", "dev", "sys", "usr"].contains(&parts[0])
    {
        return Err(bad("is a system directory"));
    }
    Ok(format!("/{}", parts.join("/")))
}

/// Resolves create's `volumeMounts` (`[{name, path}]`, by the caller's volume names) and takes
/// each volume's lock, held until the create is recorded, so no destroy runs in between.
pub async fn resolve_mounts(
    app: &App,
    key_id: &str,
    raw: Option<&Value>,
) -> Result<(Vec<crate::store::VolumeMount>, Vec<tokio::sync::OwnedMutexGuard<()>>), E2bError> {
    let Some(raw) = raw.filter(|v| !v.is_null()) else { return Ok((Vec::new(), Vec::new())) };
    let list = raw
        .as_array()
        .ok_or_else(|| E2bError::invalid("volumeMounts must be a list of {name, path}"))?;
    let store = app.manager.store().clone();
    let k = key_id.to_string();
    let owned = blocking(move || store.list_volumes(&k)).await?;
    let mut out: Vec<crate::store::VolumeMount> = Vec::new();
    for m in list {
        let (Some(name), Some(path)) =
            (m.get("name").and_then(Value::as_str), m.get("path").and_then(Value::as_str))
        else {
            return Err(E2bError::invalid("each volumeMounts entry needs a name and a path"));
        };
        let v = owned
            .iter()
            .find(|v| v.name == name)
            .ok_or_else(|| E2bError::invalid(format!("no volume named {name:?}")))?;
        let path = check_mount_path(path)?;
        if out.iter().any(|o| o.path == path || o.id == v.id) {
            return Err(E2bError::invalid(format!(
                "volume {name:?} or path {path:?} is named twice"
            )));
        }
        out.push(crate::store::VolumeMount { id: v.id.clone(), path });
    }
    let mut ids: Vec<String> = out.iter().map(|m| m.id.clone()).collect();
    ids.sort();
    let mut held = Vec::new();
    for id in ids {
        held.push(volume_lock(&id).lock_owned().await);
    }
    Ok((out, held))
}

fn random_hex(bytes: usize) -> String {
    use rand::Rng;
    let mut b = vec![0u8; bytes];
    rand::rng().fill(&mut b[..]);
    hex::encode(b)
}

fn volume_json(v: &VolumeRecord, with_token: bool) -> Value {
    let mut out = json!({"volumeID": v.id, "name": v.name});
    if with_token {
        out["token"] = json!(v.token);
    }
    out
}

fn not_found(id: &str) -> E2bError {
    E2bError::not_found(format!("volume {id:?} not found"))
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, E2bError> {
    tokio::task::spawn_blocking(f).await.map_err(E2bError::internal)?.map_err(|e| match e {
        StoreError::InvalidName(m) => E2bError::invalid(m),
        other => E2bError::internal(other),
    })
}

#[derive(Debug, Default, Deserialize)]
pub struct NewVolume {
    name: Option<String>,
}

/// `POST /volumes`: 201 with the volume and its token.
pub async fn create(
    State(app): State<App>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, E2bError> {
    let key = caller(&app, &headers).await?;
    let b: NewVolume = crate::api::parse_body(&body)?;
    let name = b.name.ok_or_else(|| E2bError::invalid("name is required"))?;
    let v = VolumeRecord {
        id: format!("vol_{}", random_hex(10)),
        key_id: key.id,
        name,
        token: format!("rfv_{}", random_hex(24)),
        created_at: crate::manager::now_ms(),
    };
    // The storage first: a row never names a volume without one.
    let (r, id, quota) = (root(&app), v.id.clone(), app.manager.config().limits.disk);
    tokio::task::spawn_blocking(move || {
        make_storage(&r, &id, quota).inspect_err(|_| remove_storage(&r, &id))
    })
    .await
    .map_err(E2bError::internal)?
    .map_err(E2bError::internal)?;
    let (store, saved) = (app.manager.store().clone(), v.clone());
    if let Err(e) = blocking(move || store.insert_volume(&saved)).await {
        let (r, id) = (root(&app), v.id.clone());
        let _ = tokio::task::spawn_blocking(move || remove_storage(&r, &id)).await;
        return Err(e);
    }
    Ok((StatusCode::CREATED, Json(volume_json(&v, true))).into_response())
}

/// `GET /volumes`: the caller's volumes (no tokens).
pub async fn list(State(app): State<App>, headers: HeaderMap) -> Result<Json<Value>, E2bError> {
    let key = caller(&app, &headers).await?;
    let store = app.manager.store().clone();
    let list = blocking(move || store.list_volumes(&key.id)).await?;
    Ok(Json(Value::Array(list.iter().map(|v| volume_json(v, false)).collect())))
}

/// `GET /volumes/{id}`: the volume and its token (what `Volume.connect` needs).
pub async fn get(
    State(app): State<App>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Value>, E2bError> {
    let key = caller(&app, &headers).await?;
    let (store, i) = (app.manager.store().clone(), id.clone());
    let v = blocking(move || store.get_volume(&key.id, &i)).await?.ok_or_else(|| not_found(&id))?;
    Ok(Json(volume_json(&v, true)))
}

/// `DELETE /volumes/{id}`: the row goes first (the volume is gone for every client from
/// then), then its directory.
pub async fn destroy(
    State(app): State<App>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<StatusCode, E2bError> {
    let key = caller(&app, &headers).await?;
    let lock = volume_lock(&id);
    let _held = lock.lock().await;
    let (store, i) = (app.manager.store().clone(), id.clone());
    let k = key.id.clone();
    if blocking(move || store.get_volume(&k, &i)).await?.is_none() {
        return Err(not_found(&id));
    }
    let (store, i) = (app.manager.store().clone(), id.clone());
    if blocking(move || store.volume_in_use(&i)).await? {
        return Err(E2bError::conflict(format!(
            "volume {id:?} is mounted by a sandbox that is running or paused"
        )));
    }
    let (store, i) = (app.manager.store().clone(), id.clone());
    if !blocking(move || store.delete_volume(&key.id, &i)).await? {
        return Err(not_found(&id));
    }
    // The row is gone: what remains on disk goes now, or at the next start's sweep.
    let (r, i) = (root(&app), id.clone());
    let _ = tokio::task::spawn_blocking(move || remove_storage(&r, &i)).await;
    Ok(StatusCode::NO_CONTENT)
}

/// One writer per volume at a time, so the quota check and the write cannot interleave with
/// another's.
fn volume_lock(id: &str) -> Arc<tokio::sync::Mutex<()>> {
    static LOCKS: OnceLock<Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>> = OnceLock::new();
    let map = LOCKS.get_or_init(Default::default);
    let mut m = map.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    // Locks nobody holds or waits on are dropped as the map grows.
    if m.len() > 1024 {
        m.retain(|_, l| Arc::strong_count(l) > 1);
    }
    m.entry(id.to_string()).or_default().clone()
}

// ---- The content API ---------------------------------------------------------------------

/// The volume a content request is for, if its bearer token is that volume's.
async fn authorise(app: &App, headers: &HeaderMap, id: &str) -> Result<PathBuf, E2bError> {
    let token = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .ok_or_else(|| E2bError::unauthenticated("missing Authorization: Bearer <volume token>"))?
        .to_string();
    let (store, i) = (app.manager.store().clone(), id.to_string());
    let v = blocking(move || store.volume_by_id(&i)).await?;
    match v {
        Some(v) if crate::manager::ct_eq(&token, &v.token) => Ok(root(app).join(&v.id)),
        // An unknown volume and a wrong token answer alike: ids must not be probed.
        _ => Err(E2bError::unauthenticated("invalid volume token")),
    }
}

/// The components of a client's path, checked: no `..`, no NUL, nothing empty once `.` and
/// repeated slashes are dropped (the root is the empty list).
fn components(path: &str) -> Result<Vec<&str>, E2bError> {
    let mut out = Vec::new();
    for c in path.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                return Err(E2bError::invalid(format!("path {path:?} must not contain '..'")));
            }
            c if c.contains('\0') => {
                return Err(E2bError::invalid("path must not contain NUL"));
            }
            UPLOADS => {
                return Err(E2bError::invalid(format!("path {path:?}: {UPLOADS} is reserved")));
            }
            c => out.push(c),
        }
    }
    Ok(out)
}

/// The host path of `parts` inside `vol`, refusing a symlink anywhere before the last
/// component (a link inside a volume must never lead a request outside it).
fn resolve(vol: &FsPath, parts: &[&str]) -> Result<PathBuf, E2bError> {
    let mut p = vol.to_path_buf();
    for (i, c) in parts.iter().enumerate() {
        p.push(c);
        if i + 1 < parts.len()
            && std::fs::symlink_metadata(&p).is_ok_and(|m| m.file_type().is_symlink())
        {
            return Err(E2bError::invalid(format!(
                "/{} is a symbolic link",
                parts[..=i].join("/")
            )));
        }
    }
    Ok(p)
}

fn display(parts: &[&str]) -> String {
    format!("/{}", parts.join("/"))
}

fn path_missing(parts: &[&str]) -> E2bError {
    E2bError::not_found(format!("path {} not found", display(parts)))
}

fn io_error(parts: &[&str], e: std::io::Error) -> E2bError {
    match e.kind() {
        std::io::ErrorKind::NotFound => path_missing(parts),
        std::io::ErrorKind::AlreadyExists => {
            E2bError::conflict(format!("path {} already exists", display(parts)))
        }
        _ if e.raw_os_error() == Some(libc::ENOTDIR) => {
            E2bError::invalid(format!("a parent of {} is not a directory", display(parts)))
        }
        _ if e.raw_os_error() == Some(libc::ENOTEMPTY)
            || e.raw_os_error() == Some(libc::EISDIR) =>
        {
            E2bError::conflict(format!("{}: {e}", display(parts)))
        }
        _ => E2bError::internal(e),
    }
}

/// E2B's `VolumeEntryStat` of the entry at `host` (named `parts` in the volume).
fn stat_json(host: &FsPath, parts: &[&str]) -> Result<Value, std::io::Error> {
    let m = std::fs::symlink_metadata(host)?;
    let ft = m.file_type();
    let kind = if ft.is_dir() {
        "directory"
    } else if ft.is_file() {
        "file"
    } else if ft.is_symlink() {
        "symlink"
    } else {
        "unknown"
    };
    let ts = |secs: i64, nsec: i64| crate::time::rfc3339_ms(secs * 1000 + nsec / 1_000_000);
    let mut v = json!({
        "name": parts.last().copied().unwrap_or(""),
        "type": kind,
        "path": display(parts),
        "size": m.size(),
        "mode": m.mode() & 0o7777,
        "uid": m.uid(),
        "gid": m.gid(),
        "atime": ts(m.atime(), m.atime_nsec()),
        "mtime": ts(m.mtime(), m.mtime_nsec()),
        "ctime": ts(m.ctime(), m.ctime_nsec()),
    });
    if ft.is_symlink() {
        v["target"] = json!(std::fs::read_link(host)?.to_string_lossy());
    }
    Ok(v)
}

#[derive(Debug, Default, Deserialize)]
pub struct ContentQuery {
    path: Option<String>,
    depth: Option<u32>,
    uid: Option<u32>,
    gid: Option<u32>,
    mode: Option<u32>,
    force: Option<bool>,
}

impl ContentQuery {
    fn path(&self) -> Result<&str, E2bError> {
        self.path.as_deref().ok_or_else(|| E2bError::invalid("path is required"))
    }
}

/// Applies the owner and mode a client asked for. Only permission bits: no setuid, setgid or
/// sticky bit on host files a sandbox may later see.
fn set_meta(
    host: &FsPath,
    uid: Option<u32>,
    gid: Option<u32>,
    mode: Option<u32>,
) -> std::io::Result<()> {
    if uid.is_some() || gid.is_some() {
        std::os::unix::fs::lchown(host, uid, gid)?;
    }
    if let Some(m) = mode {
        std::fs::set_permissions(host, std::fs::Permissions::from_mode(m & 0o777))?;
    }
    Ok(())
}

/// `GET /volumecontent/{id}/dir?path=&depth=`: the entries below a directory, `depth` levels
/// deep (default 1).
pub async fn list_dir(
    State(app): State<App>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<ContentQuery>,
) -> Result<Json<Value>, E2bError> {
    let vol = authorise(&app, &headers, &id).await?;
    let parts: Vec<String> = components(q.path()?)?.into_iter().map(String::from).collect();
    let depth = q.depth.unwrap_or(1).clamp(1, 32);
    let out = tokio::task::spawn_blocking(move || {
        let parts: Vec<&str> = parts.iter().map(String::as_str).collect();
        let host = resolve(&vol, &parts)?;
        let m = std::fs::symlink_metadata(&host).map_err(|e| io_error(&parts, e))?;
        if !m.is_dir() {
            return Err(E2bError::invalid(format!("{} is not a directory", display(&parts))));
        }
        let mut out = Vec::new();
        walk(&host, &parts.iter().map(|s| s.to_string()).collect::<Vec<_>>(), depth, &mut out)
            .map_err(|e| io_error(&parts, e))?;
        Ok::<_, E2bError>(out)
    })
    .await
    .map_err(E2bError::internal)??;
    Ok(Json(Value::Array(out)))
}

fn walk(dir: &FsPath, parts: &[String], depth: u32, out: &mut Vec<Value>) -> std::io::Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)?.flatten().collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let name = e.file_name().to_string_lossy().into_owned();
        if name == UPLOADS {
            continue;
        }
        let mut child = parts.to_vec();
        child.push(name);
        let refs: Vec<&str> = child.iter().map(String::as_str).collect();
        out.push(stat_json(&e.path(), &refs)?);
        let is_dir = e.file_type().is_ok_and(|t| t.is_dir());
        if depth > 1 && is_dir {
            walk(&e.path(), &child, depth - 1, out)?;
        }
    }
    Ok(())
}

/// `POST /volumecontent/{id}/dir?path=&uid=&gid=&mode=&force=`: makes a directory (`force`:
/// its missing parents too, and no error if it exists). 201 with its stat.
pub async fn make_dir(
    State(app): State<App>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<ContentQuery>,
) -> Result<Response, E2bError> {
    let vol = authorise(&app, &headers, &id).await?;
    let parts: Vec<String> = components(q.path()?)?.into_iter().map(String::from).collect();
    let v = tokio::task::spawn_blocking(move || {
        let parts: Vec<&str> = parts.iter().map(String::as_str).collect();
        if parts.is_empty() {
            return Err(E2bError::conflict("the volume's root already exists"));
        }
        let host = resolve(&vol, &parts)?;
        let made = if q.force == Some(true) {
            std::fs::create_dir_all(&host)
        } else {
            std::fs::create_dir(&host)
        };
        made.map_err(|e| io_error(&parts, e))?;
        set_meta(&host, q.uid, q.gid, q.mode).map_err(|e| io_error(&parts, e))?;
        stat_json(&host, &parts).map_err(|e| io_error(&parts, e))
    })
    .await
    .map_err(E2bError::internal)??;
    Ok((StatusCode::CREATED, Json(v)).into_response())
}

/// `GET /volumecontent/{id}/path?path=`: one entry's stat.
pub async fn stat(
    State(app): State<App>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<ContentQuery>,
) -> Result<Json<Value>, E2bError> {
    let vol = authorise(&app, &headers, &id).await?;
    let parts: Vec<String> = components(q.path()?)?.into_iter().map(String::from).collect();
    let v = tokio::task::spawn_blocking(move || {
        let parts: Vec<&str> = parts.iter().map(String::as_str).collect();
        let host = resolve(&vol, &parts)?;
        stat_json(&host, &parts).map_err(|e| io_error(&parts, e))
    })
    .await
    .map_err(E2bError::internal)??;
    Ok(Json(v))
}

#[derive(Debug, Default, Deserialize)]
pub struct MetaBody {
    uid: Option<u32>,
    gid: Option<u32>,
    mode: Option<u32>,
}

/// `PATCH /volumecontent/{id}/path?path=` with `{uid, gid, mode}`.
pub async fn update_meta(
    State(app): State<App>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<ContentQuery>,
    body: axum::body::Bytes,
) -> Result<Json<Value>, E2bError> {
    let vol = authorise(&app, &headers, &id).await?;
    let b: MetaBody = crate::api::parse_body(&body)?;
    let parts: Vec<String> = components(q.path()?)?.into_iter().map(String::from).collect();
    let v = tokio::task::spawn_blocking(move || {
        let parts: Vec<&str> = parts.iter().map(String::as_str).collect();
        let host = resolve(&vol, &parts)?;
        std::fs::symlink_metadata(&host).map_err(|e| io_error(&parts, e))?;
        set_meta(&host, b.uid, b.gid, b.mode).map_err(|e| io_error(&parts, e))?;
        stat_json(&host, &parts).map_err(|e| io_error(&parts, e))
    })
    .await
    .map_err(E2bError::internal)??;
    Ok(Json(v))
}

/// `DELETE /volumecontent/{id}/path?path=`: a file, or a directory with all it holds.
pub async fn remove(
    State(app): State<App>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<ContentQuery>,
) -> Result<StatusCode, E2bError> {
    let vol = authorise(&app, &headers, &id).await?;
    let parts: Vec<String> = components(q.path()?)?.into_iter().map(String::from).collect();
    let lock = volume_lock(&id);
    let _held = lock.lock().await;
    tokio::task::spawn_blocking(move || {
        let parts: Vec<&str> = parts.iter().map(String::as_str).collect();
        if parts.is_empty() {
            return Err(E2bError::invalid("the volume's root cannot be removed"));
        }
        let host = resolve(&vol, &parts)?;
        let m = std::fs::symlink_metadata(&host).map_err(|e| io_error(&parts, e))?;
        let res =
            if m.is_dir() { std::fs::remove_dir_all(&host) } else { std::fs::remove_file(&host) };
        res.map_err(|e| io_error(&parts, e))
    })
    .await
    .map_err(E2bError::internal)??;
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /volumecontent/{id}/file?path=`: the file's bytes, streamed.
pub async fn read_file(
    State(app): State<App>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<ContentQuery>,
) -> Result<Response, E2bError> {
    let vol = authorise(&app, &headers, &id).await?;
    let parts: Vec<String> = components(q.path()?)?.into_iter().map(String::from).collect();
    let refs: Vec<&str> = parts.iter().map(String::as_str).collect();
    let host = resolve(&vol, &refs)?;
    let m = tokio::fs::symlink_metadata(&host).await.map_err(|e| io_error(&refs, e))?;
    if !m.is_file() {
        return Err(E2bError::invalid(format!("{} is not a file", display(&refs))));
    }
    let file = tokio::fs::File::open(&host).await.map_err(|e| io_error(&refs, e))?;
    let stream = futures_util::stream::unfold(file, |mut f| async move {
        use tokio::io::AsyncReadExt;
        let mut buf = vec![0u8; 64 * 1024];
        match f.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok::<_, std::io::Error>(bytes::Bytes::from(buf)), f))
            }
            Err(e) => Some((Err(e), f)),
        }
    });
    Ok((
        [
            (axum::http::header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (axum::http::header::CONTENT_LENGTH, m.len().to_string()),
        ],
        Body::from_stream(stream),
    )
        .into_response())
}

/// Bytes the files under `dir` hold, leaving out `except` (the file a write replaces).
fn usage(dir: &FsPath, except: &FsPath) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let Ok(m) = e.metadata() else { continue };
            if m.is_dir() {
                stack.push(e.path());
            } else if e.path() != except {
                total += m.len();
            }
        }
    }
    total
}

/// `PUT /volumecontent/{id}/file?path=&uid=&gid=&mode=&force=`: writes (or replaces) a file
/// from the raw body; `force` makes missing parent directories. 201 with its stat.
pub async fn write_file(
    State(app): State<App>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<ContentQuery>,
    body: Body,
) -> Result<Response, E2bError> {
    let vol = authorise(&app, &headers, &id).await?;
    let parts: Vec<String> = components(q.path()?)?.into_iter().map(String::from).collect();
    let refs: Vec<&str> = parts.iter().map(String::as_str).collect();
    if refs.is_empty() {
        return Err(E2bError::invalid("path names the volume's root"));
    }
    let host = resolve(&vol, &refs)?;
    let parent = host.parent().map(FsPath::to_path_buf).unwrap_or_else(|| vol.clone());
    if q.force == Some(true) {
        tokio::fs::create_dir_all(&parent).await.map_err(|e| io_error(&refs, e))?;
    } else if !tokio::fs::metadata(&parent).await.is_ok_and(|m| m.is_dir()) {
        return Err(E2bError::not_found(format!(
            "the directory of {} does not exist",
            display(&refs)
        )));
    }
    if tokio::fs::symlink_metadata(&host).await.is_ok_and(|m| m.is_dir()) {
        return Err(E2bError::conflict(format!("{} is a directory", display(&refs))));
    }
    let quota = app.manager.config().limits.disk;
    let lock = volume_lock(&id);
    let _held = lock.lock().await;
    let (v2, h2) = (vol.clone(), host.clone());
    let used =
        tokio::task::spawn_blocking(move || usage(&v2, &h2)).await.map_err(E2bError::internal)?;
    let room = quota.saturating_sub(used);
    // On the volume's own filesystem, so the rename is atomic (and the bytes count there).
    let tmp_root = vol.join(UPLOADS);
    tokio::fs::create_dir_all(&tmp_root).await.map_err(E2bError::internal)?;
    let tmp = tmp_root.join(random_hex(8));
    let written = async {
        let mut f = tokio::fs::File::create(&tmp).await.map_err(E2bError::internal)?;
        let mut n: u64 = 0;
        let mut stream = body.into_data_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| E2bError::invalid(format!("reading the upload: {e}")))?;
            n += chunk.len() as u64;
            if n > room {
                return Err(E2bError::no_space(format!(
                    "volume quota of {quota} bytes exceeded ({used} bytes used)"
                )));
            }
            f.write_all(&chunk).await.map_err(|e| match e.raw_os_error() {
                Some(libc::ENOSPC) => {
                    E2bError::no_space(format!("volume quota of {quota} bytes exceeded"))
                }
                _ => E2bError::internal(e),
            })?;
        }
        f.sync_all().await.map_err(E2bError::internal)?;
        Ok(())
    }
    .await;
    if let Err(e) = written {
        let _ = tokio::fs::remove_file(&tmp).await;
        return Err(e);
    }
    let v = tokio::task::spawn_blocking(move || {
        let refs: Vec<&str> = parts.iter().map(String::as_str).collect();
        let mode = q.mode.or(Some(0o644));
        set_meta(&tmp, q.uid, q.gid, mode).map_err(E2bError::internal)?;
        std::fs::rename(&tmp, &host).map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            io_error(&refs, e)
        })?;
        // The rename is durable once its directory is.
        if let Ok(d) = std::fs::File::open(host.parent().unwrap_or(&vol)) {
            let _ = d.sync_all();
        }
        stat_json(&host, &refs).map_err(|e| io_error(&refs, e))
    })
    .await
    .map_err(E2bError::internal)??;
    Ok((StatusCode::CREATED, Json(v)).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_resolved_inside_the_volume() {
        assert_eq!(components("/a//b/./c").unwrap(), ["a", "b", "c"]);
        assert!(components("/").unwrap().is_empty());
        assert!(components("a/../../etc").is_err());
        assert!(components("..").is_err());
    }

    #[test]
    fn a_symlink_on_the_way_is_refused() {
        let d = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink("/etc", d.path().join("out")).unwrap();
        assert!(resolve(d.path(), &["out", "passwd"]).is_err());
        // The last component may be a link: it is described, never followed.
        assert!(resolve(d.path(), &["out"]).is_ok());
        assert!(stat_json(&d.path().join("out"), &["out"]).unwrap()["type"] == "symlink");
    }

    #[test]
    fn usage_counts_files_but_the_one_replaced() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("x")).unwrap();
        std::fs::write(d.path().join("x/a"), [0u8; 100]).unwrap();
        std::fs::write(d.path().join("b"), [0u8; 50]).unwrap();
        assert_eq!(usage(d.path(), &d.path().join("nothing")), 150);
        assert_eq!(usage(d.path(), &d.path().join("b")), 100);
    }
}
