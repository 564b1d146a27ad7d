//! Template contents node to node, on demand, verified by digest.
//!
//! Every node publishes, for each image template of its store, the template's record and the
//! content digest of each layer (the sha256 of the layer's canonical tar, see
//! `ringfence_image::transfer`) under `templates/<name:tag>` in etcd; the first node to
//! publish a name is its origin, and only the origin replaces it. A create for an image
//! template this node lacks fetches each missing layer from a live node that advertises the
//! template, over the internal endpoint [`INTERNAL`], and keeps a layer only if its stream
//! hashes to the digest in etcd (not the one the sending peer might claim). Only when every
//! layer is stored is the template registered; a refused or broken fetch removes the layers it
//! added, so nothing half-registered stays.
//!
//! The internal endpoint is not part of the E2B surface: each request is signed with an
//! HMAC-SHA256 over the sending node, a millisecond timestamp and the path, keyed by the
//! cluster secret that lives in etcd (whoever can read the cluster's etcd is a node already:
//! it can rewrite every ownership record). A request without a valid, fresh signature is
//! refused before anything is read from the store.

use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::http::{HeaderValue, Method, StatusCode, Uri};
use axum::response::Response;
use futures_util::StreamExt;
use ringfence_cluster::{Cluster, NodeInfo, TemplateMeta};
use ringfence_image::oci::Digest;
use ringfence_image::{LayerRecord, Limits, Record, Store};
use tokio::io::AsyncWriteExt;

use super::{Routing, error};
use crate::api::App;
use crate::e2b_error::Kind;

/// Path prefix of the node-to-node endpoints.
pub const INTERNAL: &str = "/_cluster/";

/// The header carrying a node's signature: `<node>:<unix ms>:<hex HMAC>`.
const AUTH: &str = "x-ringfence-node-auth";

/// How far a signed request's clock may be from ours (both ways).
const SKEW_MS: i64 = 60_000;

/// The image store name of template `name`, or None for the built-in ones (every node has
/// them) and names that are no image template's.
pub fn store_name(name: &str) -> Option<String> {
    if ringfence_image::store::RESERVED.contains(&name) {
        return None;
    }
    ringfence_image::normalize_name(name).ok()
}

pub fn is_image(name: &str) -> bool {
    store_name(name).is_some()
}

fn store(app: &App) -> Result<Store, String> {
    Store::open(&app.manager.config().data_dir).map_err(|e| e.to_string())
}

/// The image templates in this node's store (what it advertises).
pub fn local_templates(app: &App) -> Vec<String> {
    store(app)
        .and_then(|s| s.list().map_err(|e| e.to_string()))
        .map(|l| l.into_iter().map(|r| r.name).collect())
        .unwrap_or_default()
}

/// Publishes the metadata (with layer content digests) of each local template etcd lacks.
/// `done` remembers what was handled (by name, config and layers), so a template's layers
/// are hashed once, not every round.
pub async fn publish(
    app: &App,
    cluster: &Cluster,
    done: &mut HashSet<String>,
) -> Result<(), String> {
    let st = store(app)?;
    let s = st.clone();
    let records = tokio::task::spawn_blocking(move || s.list())
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    for rec in records {
        let layers: Vec<&str> = rec.layers.iter().map(|l| l.diff_id.as_str()).collect();
        let tag = format!("{}@{}@{}", rec.name, rec.config_digest, layers.join(","));
        if done.contains(&tag) {
            continue;
        }
        match cluster.template(&rec.name).await.map_err(|e| e.to_string())? {
            // Another node's (or one fetched from it): nothing to publish.
            Some(meta) if meta.origin != cluster.node_id() => {
                done.insert(tag);
                continue;
            }
            _ => {}
        }
        let s = st.clone();
        let ids: Vec<String> = rec.layers.iter().map(|l| l.diff_id.clone()).collect();
        let content = tokio::task::spawn_blocking(move || {
            let mut out = BTreeMap::new();
            for id in ids {
                let d = Digest::parse(&id).map_err(|e| e.to_string())?;
                let c = ringfence_image::transfer::content_digest(&s.layer_dir(&d))
                    .map_err(|e| e.to_string())?;
                out.insert(id, c.to_string());
            }
            Ok::<_, String>(out)
        })
        .await
        .map_err(|e| e.to_string())??;
        let meta = TemplateMeta {
            name: rec.name.clone(),
            origin: cluster.node_id().to_string(),
            record: serde_json::to_value(&rec).map_err(|e| e.to_string())?,
            content,
        };
        if cluster.publish_template(&meta).await.map_err(|e| e.to_string())? {
            tracing::info!(template = %rec.name, "template metadata published to the cluster");
        }
        done.insert(tag);
    }
    Ok(())
}

fn sign(secret: &str, node: &str, ts: i64, path: &str) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    hex::encode(ring::hmac::sign(&key, format!("{node}\n{ts}\n{path}").as_bytes()).as_ref())
}

/// Whether `header` is a valid, fresh signature of `path` by a node holding `secret`.
fn verify(secret: &str, header: &str, path: &str) -> Result<String, String> {
    let mut it = header.splitn(3, ':');
    let (Some(node), Some(ts), Some(mac)) = (it.next(), it.next(), it.next()) else {
        return Err("malformed node signature".into());
    };
    let ts: i64 = ts.parse().map_err(|_| "malformed node signature timestamp".to_string())?;
    if (crate::manager::now_ms() - ts).abs() > SKEW_MS {
        return Err("node signature expired (or the clocks differ by over 60 s)".into());
    }
    let mac = hex::decode(mac).map_err(|_| "malformed node signature".to_string())?;
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    ring::hmac::verify(&key, format!("{node}\n{ts}\n{path}").as_bytes(), &mac)
        .map_err(|_| "bad node signature".to_string())?;
    Ok(node.to_string())
}

/// `GET /_cluster/layers/sha256-<hex>` from a node: the layer's canonical tar, streamed.
pub async fn internal(r: &Routing, req: Request) -> Response {
    let path = req.uri().path().to_string();
    let auth = req.headers().get(AUTH).and_then(|v| v.to_str().ok()).unwrap_or("");
    // Unsigned or badly signed: the same 404 as any unknown path, naming no internals.
    let node = match verify(&r.cluster.secret(), auth, &path) {
        Ok(n) => n,
        Err(why) => {
            tracing::warn!(path = %path, why = %why, "refused an internal request");
            return error(Kind::NotFound, format!("no route {path}"));
        }
    };
    let Some(id) = path.strip_prefix("/_cluster/layers/sha256-") else {
        return error(Kind::NotFound, format!("no route {path}"));
    };
    if req.method() != Method::GET {
        return error(Kind::MethodNotAllowed, "GET only");
    }
    let Ok(digest) = Digest::parse(&format!("sha256:{id}")) else {
        return error(Kind::InvalidArgument, format!("{id:?} is not a sha256 digest"));
    };
    let st = match store(&r.app) {
        Ok(s) => s,
        Err(e) => return error(Kind::Internal, e),
    };
    if st.known_layer(&digest).is_none() {
        return error(Kind::NotFound, format!("no layer {digest} on this node"));
    }
    tracing::info!(layer = %digest, to = %node, "sending a layer to a node");
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(8);
    let dir = st.layer_dir(&digest);
    tokio::task::spawn_blocking(move || {
        let sender = Sender { tx: tx.clone() };
        let mut out = std::io::BufWriter::with_capacity(256 << 10, sender);
        let res = ringfence_image::transfer::export_layer(&dir, &mut out)
            .map_err(|e| std::io::Error::other(e.to_string()))
            .and_then(|_| out.flush());
        if let Err(e) = res {
            // The receiver sees a broken body, never a short stream read as complete.
            let _ = tx.blocking_send(Err(e));
        }
    });
    let stream =
        futures_util::stream::unfold(
            rx,
            |mut rx| async move { rx.recv().await.map(|item| (item, rx)) },
        );
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/x-tar")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| error(Kind::Internal, "response"))
}

struct Sender {
    tx: tokio::sync::mpsc::Sender<Result<Bytes, std::io::Error>>,
}

impl Write for Sender {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.tx
            .blocking_send(Ok(Bytes::copy_from_slice(buf)))
            .map_err(|_| std::io::Error::other("the receiving node went away"))?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Makes template `name` (a store name) available locally: nothing if the store has it or
/// no node published it (the create then answers its ordinary 404); otherwise every missing
/// layer fetched and verified, then the template registered.
pub async fn ensure(r: &Routing, name: &str) -> Result<(), (Kind, String)> {
    let unavailable = |m: String| (Kind::Unavailable, m);
    let st = store(&r.app).map_err(|e| (Kind::Internal, e))?;
    if st.get(name).is_ok() {
        return Ok(());
    }
    let _one = r.fetching.lock().await;
    if st.get(name).is_ok() {
        return Ok(());
    }
    let me = r.cluster.node_id().to_string();
    let meta = match r.cluster.template(name).await {
        Ok(Some(m)) => m,
        Ok(None) => return Ok(()),
        Err(e) => return Err(unavailable(format!("node {me}: reading template {name}: {e}"))),
    };
    let record: Record = serde_json::from_value(meta.record.clone()).map_err(|e| {
        (Kind::SandboxGone, format!("template {name}'s cluster record is unreadable: {e}"))
    })?;
    // Nodes advertising it, and its origin (which may not have republished its capacity yet
    // when the metadata is new); the digests in etcd decide what is kept, whoever sends.
    let sources: Vec<NodeInfo> = r
        .cluster
        .nodes()
        .into_iter()
        .filter(|n| n.id != me && (n.templates.iter().any(|t| t == name) || n.id == meta.origin))
        .collect();
    if sources.is_empty() {
        return Err(unavailable(format!(
            "template {name} is known to the cluster (from node {}) but no live node holds its \
             files now",
            meta.origin
        )));
    }
    let started = std::time::Instant::now();
    let mut added: Vec<String> = Vec::new();
    let mut result = Ok(());
    for layer in &record.layers {
        let Ok(d) = Digest::parse(&layer.diff_id) else {
            result = Err((Kind::SandboxGone, format!("bad layer id {}", layer.diff_id)));
            break;
        };
        if st.known_layer(&d).is_some() {
            continue;
        }
        let Some(content) = meta.content.get(&layer.diff_id).and_then(|c| Digest::parse(c).ok())
        else {
            result = Err((
                Kind::SandboxGone,
                format!("template {name}: the cluster record has no digest for layer {d}"),
            ));
            break;
        };
        // Each source in turn: a peer with a damaged copy must not stop a good one serving.
        let mut errors = Vec::new();
        let mut got = false;
        for node in &sources {
            match fetch_layer(r, &st, node, layer, &content).await {
                Ok(new) => {
                    if new {
                        added.push(layer.diff_id.clone());
                    }
                    got = true;
                    break;
                }
                Err(e) => errors.push(e),
            }
        }
        if !got {
            result = Err((
                Kind::SandboxGone,
                format!(
                    "template {name}: layer {} could not be fetched from any node: {}",
                    d,
                    errors.join("; ")
                ),
            ));
            break;
        }
    }
    let mut record = record;
    record.source = format!("cluster: fetched (origin node {})", meta.origin);
    if result.is_ok() {
        let s = st.clone();
        let rec = record.clone();
        result = tokio::task::spawn_blocking(move || s.register(&rec))
            .await
            .map_err(|e| (Kind::Internal, e.to_string()))
            .and_then(|r| r.map_err(|e| (Kind::Internal, format!("registering: {e}"))));
    }
    if result.is_err() {
        let s = st.clone();
        let ids = added.clone();
        let _ = tokio::task::spawn_blocking(move || {
            for id in ids {
                if let Err(e) = s.forget_layer(&id) {
                    tracing::warn!(layer = %id, error = %e, "removing a fetched layer");
                }
            }
        })
        .await;
        if let Err((_, m)) = &result {
            tracing::warn!(template = %name, error = %m, "template fetch refused");
        }
    } else {
        tracing::info!(
            template = %name,
            layers = added.len(),
            ms = started.elapsed().as_millis() as u64,
            "template fetched from the cluster"
        );
    }
    result
}

/// One layer from `node` into the store, verified against `content`. Returns whether it
/// was added (false: it was there already).
async fn fetch_layer(
    r: &Routing,
    st: &Store,
    node: &NodeInfo,
    layer: &LayerRecord,
    content: &Digest,
) -> Result<bool, String> {
    let hex = layer.diff_id.strip_prefix("sha256:").unwrap_or(&layer.diff_id);
    let path = format!("{INTERNAL}layers/sha256-{hex}");
    let uri: Uri = format!("http://{}{path}", node.addr)
        .parse()
        .map_err(|e| format!("node {}'s address {:?}: {e}", node.id, node.addr))?;
    let me = r.cluster.node_id();
    let ts = crate::manager::now_ms();
    let mac = sign(&r.cluster.secret(), me, ts, &path);
    let mut req = Request::new(Body::empty());
    *req.uri_mut() = uri;
    let v = HeaderValue::from_str(&format!("{me}:{ts}:{mac}")).map_err(|e| e.to_string())?;
    req.headers_mut().insert(AUTH, v);
    let resp = tokio::time::timeout(Duration::from_secs(8), r.http.request(req))
        .await
        .map_err(|_| format!("node {} did not answer within 8 s", node.id))?
        .map_err(|e| format!("node {}: {e}", node.id))?;
    if resp.status() != StatusCode::OK {
        return Err(format!("node {} answered {}", node.id, resp.status()));
    }
    // Spooled to a file beside the store (same filesystem, root-only) and unpacked from it:
    // the unpacker is synchronous, and a file bounds memory whatever the layer's size.
    let tmp =
        st.root().join(format!(".fetch-{}-{}.tar", std::process::id(), rand::random::<u64>()));
    let limit = Limits::default().layer_bytes;
    let spooled = async {
        let mut f = tokio::fs::File::create(&tmp).await.map_err(|e| e.to_string())?;
        let mut body = Body::new(resp.into_body()).into_data_stream();
        let mut n = 0u64;
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| format!("node {}: transfer broke: {e}", node.id))?;
            n += chunk.len() as u64;
            if n > limit {
                return Err(format!("node {}: layer over {limit} bytes", node.id));
            }
            f.write_all(&chunk).await.map_err(|e| e.to_string())?;
        }
        f.flush().await.map_err(|e| e.to_string())
    }
    .await;
    let result = match spooled {
        Ok(()) => {
            let (s, l, c, p) = (st.clone(), layer.clone(), content.clone(), tmp.clone());
            tokio::task::spawn_blocking(move || {
                let f = std::fs::File::open(&p).map_err(|e| e.to_string())?;
                s.receive_layer(&l, &c, std::io::BufReader::new(f), &Limits::default())
                    .map_err(|e| e.to_string())
            })
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r)
            .map_err(|e| format!("from node {}: {e}", node.id))
        }
        Err(e) => Err(e),
    };
    let _ = tokio::fs::remove_file(&tmp).await;
    result
}
