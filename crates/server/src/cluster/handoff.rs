//! A paused sandbox resumable on another node (`--shared-snapshots DIR`).
//!
//! A sandbox paused to its files (`{"memory": false}`: its upper layer saved, nothing left
//! running) is copied by its owner's sync loop to the shared directory, which every node
//! mounts: each saved layer as its canonical tar (`layers/<layer>.tar`, written once: layers
//! are immutable), and the sandbox's own record with each layer's sha256
//! (`sandboxes/<id>.json`). The ownership record in etcd then names that file (`snapshot`).
//!
//! If the owner is lost (its record reads `lost`, or its registration is gone), a resume
//! (`POST /sandboxes/{id}/resume` or `/connect`) through any node takes the sandbox over in
//! one etcd transaction compared on the record's revision ([`Cluster::take_over`]): of nodes
//! trying at once, one wins; the others forward the request to it. The winner unpacks each
//! layer (verified against the digest in the copied record), adds the sandbox to its store as
//! paused, and the ordinary resume starts it from those files. The old owner, if it returns,
//! finds the record naming another node and kills its copy (the reconcile's `foreign` rule).

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use axum::extract::Request;
use axum::http::Method;
use axum::response::Response;
use ringfence_cluster::Cluster;
use ringfence_image::oci::Digest;
use serde::{Deserialize, Serialize};
use sha2::Digest as _;

use super::{Routing, error, forward, local, record_of};
use crate::api::App;
use crate::e2b_error::Kind;
use crate::store::{SandboxRecord, SandboxState};

/// What `sandboxes/<id>.json` on the shared storage holds.
#[derive(Debug, Serialize, Deserialize)]
struct Copied {
    /// The node that paused it.
    node: String,
    record: SandboxRecord,
    /// Layer id → sha256 of its canonical tar under `layers/`.
    layers: BTreeMap<String, String>,
}

/// Whether `req` asks to resume sandbox `id` (E2B's resume and connect).
pub fn is_resume(req: &Request, id: &str) -> bool {
    req.method() == Method::POST
        && [format!("/sandboxes/{id}/resume"), format!("/sandboxes/{id}/connect")]
            .iter()
            .chain(std::iter::once(&format!("/v2/sandboxes/{id}/connect")))
            .any(|p| req.uri().path() == p)
}

fn mkdir(p: &Path) -> Result<(), String> {
    fs::create_dir_all(p).map_err(|e| format!("mkdir {}: {e}", p.display()))?;
    fs::set_permissions(p, fs::Permissions::from_mode(0o700))
        .map_err(|e| format!("chmod {}: {e}", p.display()))
}

fn sha256_file(p: &Path) -> Result<String, String> {
    let mut f = fs::File::open(p).map_err(|e| format!("open {}: {e}", p.display()))?;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 256 << 10];
    loop {
        let n = f.read(&mut buf).map_err(|e| format!("read {}: {e}", p.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(format!("sha256:{}", hex::encode(h.finalize())))
}

/// Copies paused sandbox `rec` (its layers under `data_dir/layers`) to `shared`. Returns the
/// path of its record there.
fn write_copy(
    shared: &Path,
    data_dir: &Path,
    node: &str,
    rec: &SandboxRecord,
) -> Result<String, String> {
    let layers_dir = shared.join("layers");
    let recs_dir = shared.join("sandboxes");
    mkdir(&layers_dir)?;
    mkdir(&recs_dir)?;
    let mut layers = BTreeMap::new();
    for l in &rec.lifecycle.layers {
        let tar = layers_dir.join(format!("{l}.tar"));
        if !tar.exists() {
            let tmp = layers_dir.join(format!(".{l}.tar.tmp"));
            let f = fs::File::create(&tmp).map_err(|e| format!("create {}: {e}", tmp.display()))?;
            let mut w = std::io::BufWriter::new(f);
            ringfence_image::transfer::export_layer(&data_dir.join("layers").join(l), &mut w)
                .map_err(|e| e.to_string())?;
            let f = w.into_inner().map_err(|e| e.to_string())?;
            f.sync_all().map_err(|e| e.to_string())?;
            fs::rename(&tmp, &tar).map_err(|e| format!("rename {}: {e}", tmp.display()))?;
        }
        layers.insert(l.clone(), sha256_file(&tar)?);
    }
    let mut record = rec.clone();
    record.agent_pid = None;
    record.cgroup_slot = None;
    let copied = Copied { node: node.to_string(), record, layers };
    let path = recs_dir.join(format!("{}.json", rec.id));
    let tmp = recs_dir.join(format!(".{}.json.tmp", rec.id));
    let mut f = fs::File::create(&tmp).map_err(|e| format!("create {}: {e}", tmp.display()))?;
    f.write_all(&serde_json::to_vec(&copied).map_err(|e| e.to_string())?)
        .and_then(|()| f.sync_all())
        .map_err(|e| format!("write {}: {e}", tmp.display()))?;
    fs::rename(&tmp, &path).map_err(|e| format!("rename {}: {e}", tmp.display()))?;
    Ok(path.display().to_string())
}

/// Sync-loop work: copies each sandbox paused to its files (not yet copied) to the shared
/// directory and names the copy in its etcd record. `done` remembers what was copied (by id
/// and layers: a sandbox paused again has a new top layer).
pub async fn export(
    app: &App,
    cluster: &Cluster,
    done: &mut HashSet<String>,
) -> Result<(), String> {
    let Some(shared) = cluster.config().shared_snapshots.clone() else { return Ok(()) };
    let store = app.manager.store().clone();
    let held = tokio::task::spawn_blocking(move || store.live_sandboxes())
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    let me = cluster.node_id().to_string();
    for rec in held {
        if rec.state != SandboxState::Paused || rec.lifecycle.paused_with_memory != Some(false) {
            continue;
        }
        let tag = format!("{}@{}", rec.id, rec.lifecycle.layers.join(","));
        if done.contains(&tag) {
            continue;
        }
        let (sh, dd, node, r) =
            (shared.clone(), app.manager.config().data_dir.clone(), me.clone(), rec.clone());
        let path = tokio::task::spawn_blocking(move || write_copy(&sh, &dd, &node, &r))
            .await
            .map_err(|e| e.to_string())??;
        let mut record = record_of(&me, &rec);
        record.snapshot = Some(path);
        match cluster.claim(&record).await {
            Ok(_) => {
                tracing::info!(sandbox_id = %rec.id, "paused sandbox copied to shared storage")
            }
            // Taken over by another node while this one was away: the reconcile kills the
            // local copy.
            Err(ringfence_cluster::ClusterError::OwnedElsewhere { .. }) => {}
            Err(e) => return Err(e.to_string()),
        }
        done.insert(tag);
    }
    Ok(())
}

/// A resume through this node of a sandbox whose owner is lost and whose files are on
/// shared storage: take it over (one node wins), copy it in, resume it here; a node that
/// lost the race forwards to the winner.
pub async fn resume_elsewhere(r: &Routing, id: &str, req: Request) -> Response {
    match r.cluster.take_over(id).await {
        Ok(Some(_)) => {
            tracing::info!(sandbox_id = %id, "took over a paused sandbox of a lost node");
            serve_adopted(r, id, req).await
        }
        Ok(None) => {
            // Another node won (or the record changed): send it there.
            match r.cluster.lookup(id).await {
                Ok(Some(rec)) if rec.owner != r.cluster.node_id() => {
                    match r.cluster.node(&rec.owner) {
                        Some(n) if rec.state != "lost" => forward(r, &n.id, &n.addr, req).await,
                        _ => error(
                            Kind::Unavailable,
                            format!("sandbox {id} is lost: its node {} is gone", rec.owner),
                        ),
                    }
                }
                Ok(Some(_)) => serve_adopted(r, id, req).await,
                Ok(None) => local(r, req).await,
                Err(e) => error(Kind::Unavailable, e.to_string()),
            }
        }
        Err(e) => error(
            Kind::Unavailable,
            format!("node {}: taking over sandbox {id}: {e}", r.cluster.node_id()),
        ),
    }
}

/// Serves a request for sandbox `id`, which this node took over.
async fn serve_adopted(r: &Routing, id: &str, req: Request) -> Response {
    match ensure_adopted(r, id).await {
        Ok(()) => local(r, req).await,
        Err(resp) => resp,
    }
}

/// For sandbox `id`, which this node owns by take-over: copies it in if the local store does
/// not hold it yet (one copy at a time; a request arriving meanwhile waits for it).
pub async fn ensure_adopted(r: &Routing, id: &str) -> Result<(), Response> {
    {
        let _one = r.fetching.lock().await;
        let store = r.app.manager.store().clone();
        let i = id.to_string();
        let held = tokio::task::spawn_blocking(move || store.get_sandbox(&i))
            .await
            .ok()
            .and_then(Result::ok)
            .flatten()
            .is_some_and(|s| s.state != SandboxState::Killed);
        if !held {
            r.cluster.adopting(id);
            let res = copy_in(r, id).await;
            r.cluster.adopted(id);
            if let Err(e) = res {
                tracing::warn!(sandbox_id = %id, error = %e, "copying in a paused sandbox failed");
                return Err(error(
                    Kind::SandboxGone,
                    format!(
                        "node {}: resuming sandbox {id} from shared storage: {e}",
                        r.cluster.node_id()
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// Unpacks sandbox `id`'s layers from the shared directory (each verified by its digest)
/// and adds it to the local store as paused. Layers it added are removed if it fails.
async fn copy_in(r: &Routing, id: &str) -> Result<(), String> {
    let rec = r.cluster.lookup(id).await.map_err(|e| e.to_string())?;
    let Some(path) = rec.and_then(|x| x.snapshot) else {
        return Err("its record names no copy on shared storage".into());
    };
    let shared = r
        .cluster
        .config()
        .shared_snapshots
        .clone()
        .ok_or("this node has no --shared-snapshots directory")?;
    let path = PathBuf::from(path);
    if !path.starts_with(&shared) {
        return Err(format!("its copy {} is outside --shared-snapshots", path.display()));
    }
    let data_dir = r.app.manager.config().data_dir.clone();
    let store = r.app.manager.store().clone();
    // A template this node lacks comes from a peer first (as for a create).
    let copied: Copied = serde_json::from_slice(
        &fs::read(&path).map_err(|e| format!("read {}: {e}", path.display()))?,
    )
    .map_err(|e| format!("{}: {e}", path.display()))?;
    if let Some(name) = super::fetch::store_name(&copied.record.template) {
        super::fetch::ensure(r, &name).await.map_err(|(_, m)| m)?;
    }
    tokio::task::spawn_blocking(move || {
        let mut added = Vec::new();
        let res = (|| {
            for l in &copied.record.lifecycle.layers {
                let dest = data_dir.join("layers").join(l);
                if dest.exists() {
                    continue;
                }
                let want = copied
                    .layers
                    .get(l)
                    .and_then(|d| Digest::parse(d).ok())
                    .ok_or_else(|| format!("the copy names no digest for layer {l}"))?;
                let tar = shared.join("layers").join(format!("{l}.tar"));
                let f = fs::File::open(&tar).map_err(|e| format!("open {}: {e}", tar.display()))?;
                ringfence_image::transfer::receive_dir(
                    &dest,
                    &want,
                    std::io::BufReader::new(f),
                    &ringfence_image::Limits::default(),
                )
                .map_err(|e| e.to_string())?;
                added.push(dest);
            }
            let mut rec = copied.record.clone();
            rec.state = SandboxState::Paused;
            rec.agent_pid = None;
            rec.cgroup_slot = None;
            store.adopt_paused(&rec, &copied.node).map_err(|e| e.to_string())
        })();
        if res.is_err() {
            for d in added {
                let _ = fs::remove_dir_all(d);
            }
        }
        res
    })
    .await
    .map_err(|e| e.to_string())?
}
