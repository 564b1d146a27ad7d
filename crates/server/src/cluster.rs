//! Cluster mode's routing layer: in front of the E2B router, every request for a sandbox
//! another node owns is proxied to that node (bodies streamed both ways, never buffered); a
//! create is placed on a node by free capacity and forwarded; lists and audit queries fan
//! out. Who owns what lives in etcd (`ringfence_cluster`); this module also keeps etcd in line
//! with what this node runs (a reconcile every second) and replicates API keys.
//!
//! A request forwarded by a peer carries [`HOP`] and is served here, never forwarded again.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use ringfence_cluster::{Capacity, Cluster, ClusterConfig, KeyRecord, SandboxRecord};
use serde_json::{Value, json};
use tower::ServiceExt;

use crate::api::App;
use crate::e2b_error::{E2bError, Kind};
use crate::store::{SandboxState, StoredKey};

mod fetch;
mod handoff;

/// Marks a request one node forwarded to another; its value is the sender's node id.
pub const HOP: &str = "x-ringfence-hop";

/// How long a proxied request waits for the owner's response head. A create answers once
/// its sandbox runs (well under this); envd answers a command's head before it runs.
const HEAD_TIMEOUT: Duration = Duration::from_secs(8);

/// Largest create body the placing node reads (it needs the template and tier).
const CREATE_BODY_LIMIT: usize = 1 << 20;

/// The routing layer's state.
#[derive(Clone)]
pub struct Routing {
    app: App,
    cluster: Arc<Cluster>,
    inner: Router,
    http: Client<HttpConnector, Body>,
    /// One template fetch at a time on this node: concurrent creates of a missing template
    /// wait for the first one's fetch rather than each pulling the same layers.
    fetching: Arc<tokio::sync::Mutex<()>>,
}

impl std::fmt::Debug for Routing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Routing").field("cluster", &self.cluster).finish_non_exhaustive()
    }
}

/// Joins the cluster and starts the loop that keeps etcd in line with this node.
pub async fn join(
    cfg: ClusterConfig,
    app: &App,
) -> Result<Arc<Cluster>, ringfence_cluster::ClusterError> {
    let cluster = Cluster::join(cfg, capacity(app)).await?;
    tokio::spawn(sync_loop(app.clone(), cluster.clone()));
    Ok(cluster)
}

/// Wraps the E2B router in the routing layer.
pub fn router(app: App, cluster: Arc<Cluster>, inner: Router) -> Router {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(Duration::from_secs(2)));
    let http = Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build(connector);
    let fetching = Arc::new(tokio::sync::Mutex::new(()));
    Router::new().fallback(route).with_state(Routing { app, cluster, inner, http, fetching })
}

fn error(kind: Kind, msg: impl Into<String>) -> Response {
    // A 500's detail may name host paths (a store, a layer directory): logged, not shown.
    if kind == Kind::Internal {
        return E2bError::internal(msg.into()).into_response();
    }
    E2bError::new(kind, msg).into_response()
}

/// The sandbox a request is about: E2B's sandbox-traffic headers, a `<port>-<id>.<domain>`
/// Host, or a control-plane path naming it.
fn sandbox_of(req: &Request) -> Option<String> {
    let h = req.headers();
    if let Some(id) = h.get("e2b-sandbox-id").and_then(|v| v.to_str().ok()) {
        return Some(id.to_string());
    }
    if let Some((_, id)) =
        h.get("host").and_then(|v| v.to_str().ok()).and_then(crate::network::parse_host)
    {
        return Some(id);
    }
    let path = req.uri().path();
    let rest = path
        .strip_prefix("/v2/sandboxes/")
        .or_else(|| path.strip_prefix("/sandboxes/"))
        .or_else(|| path.strip_prefix("/events/sandboxes/"))
        .or_else(|| path.strip_prefix("/v2/events/sandboxes/"))?;
    let id = rest.split('/').next().unwrap_or("");
    // `/sandboxes/metrics` is the batch route, not a sandbox.
    (!id.is_empty() && id != "metrics").then(|| id.to_string())
}

fn is_create(req: &Request) -> bool {
    req.method() == Method::POST && matches!(req.uri().path(), "/sandboxes" | "/v2/sandboxes")
}

fn is_list(req: &Request) -> bool {
    req.method() == Method::GET && matches!(req.uri().path(), "/sandboxes" | "/v2/sandboxes")
}

async fn route(State(r): State<Routing>, req: Request) -> Response {
    let hop = req.headers().contains_key(HOP);
    let id = sandbox_of(&req);
    // The node's own health check answers while it is cut off: it says the process is up.
    let plain_health = id.is_none() && req.uri().path() == "/health";
    if !plain_health && let Some(why) = r.cluster.unavailable() {
        return error(Kind::Unavailable, why);
    }
    if req.uri().path().starts_with(fetch::INTERNAL) {
        return fetch::internal(&r, req).await;
    }
    if let Some(id) = id {
        return sandbox_request(r, id, hop, req).await;
    }
    if hop {
        if is_create(&req) {
            return local_create(&r, req).await;
        }
        return local(&r, req).await;
    }
    if is_create(&req) {
        return place(r, req).await;
    }
    if is_list(&req) || (req.method() == Method::GET && req.uri().path() == "/audit") {
        return fan_out(r, req).await;
    }
    local(&r, req).await
}

async fn local(r: &Routing, req: Request) -> Response {
    match r.inner.clone().oneshot(req).await {
        Ok(resp) => resp,
        Err(never) => match never {},
    }
}

/// A request naming a sandbox: served here when this node owns it (or no node does: the
/// local answer is then the right 404), proxied to its owner otherwise.
async fn sandbox_request(r: Routing, id: String, hop: bool, req: Request) -> Response {
    let record = match r.cluster.lookup(&id).await {
        Ok(rec) => rec,
        Err(e) => {
            return error(
                Kind::Unavailable,
                format!("node {}: cannot read sandbox {id}'s owner: {e}", r.cluster.node_id()),
            );
        }
    };
    let me = r.cluster.node_id().to_string();
    let Some(rec) = record else { return local(&r, req).await };
    let orphan = rec.state == "lost" || (rec.owner != me && r.cluster.node(&rec.owner).is_none());
    // A paused sandbox of a lost node, its files on shared storage: a resume through any
    // node takes it over.
    if orphan
        && rec.owner != me
        && rec.snapshot.is_some()
        && r.cluster.config().shared_snapshots.is_some()
        && handoff::is_resume(&req, &id)
    {
        return handoff::resume_elsewhere(&r, &id, req).await;
    }
    if orphan {
        return error(
            Kind::Unavailable,
            format!(
                "sandbox {id} is lost: its node {} stopped renewing its cluster lease (down or \
                 cut off); it comes back if that node returns",
                rec.owner
            ),
        );
    }
    if rec.owner == me
        && rec.state == "paused"
        && rec.snapshot.is_some()
        && let Err(resp) = handoff::ensure_adopted(&r, &id).await
    {
        // Possibly taken over and not yet copied in (a request forwarded by a node that lost
        // the take-over race waits for the copy).
        return resp;
    }
    if rec.owner == me {
        let kill = req.method() == Method::DELETE;
        let resp = local(&r, req).await;
        if kill && resp.status() == StatusCode::NO_CONTENT {
            // The reconcile would also drop it within a second; now, so a list right after
            // the kill no longer shows it.
            if let Err(e) = r.cluster.release(&id).await {
                tracing::warn!(sandbox_id = %id, error = %e, "releasing a killed sandbox's record");
            }
        }
        return resp;
    }
    if hop {
        // A peer sent this here, but the record names a third node: never serve a sandbox
        // whose record names another owner, and never forward twice.
        return error(
            Kind::Misdirected,
            format!("sandbox {id} is owned by node {}, not {me}", rec.owner),
        );
    }
    let Some(node) = r.cluster.node(&rec.owner) else {
        return error(Kind::Unavailable, format!("node {} is gone", rec.owner));
    };
    forward(&r, &node.id, &node.addr, req).await
}

/// Sends `req` to node `node` at `addr` and relays its answer; bodies stream both ways. An
/// upgrade (WebSocket to an inbound port, say) is passed on with its headers, and once the
/// owner answers 101 the two upgraded connections are spliced together.
async fn forward(r: &Routing, node: &str, addr: &str, mut req: Request) -> Response {
    let upgrade = req.headers().get(axum::http::header::UPGRADE).cloned();
    let client_side = upgrade.as_ref().map(|_| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    let pq = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let uri: Uri = match format!("http://{addr}{pq}").parse() {
        Ok(u) => u,
        Err(e) => {
            return error(
                Kind::SandboxGone,
                format!("node {node}'s address {addr:?} is not usable: {e}"),
            );
        }
    };
    parts.uri = uri;
    strip_hop_by_hop(&mut parts.headers);
    if let Some(u) = &upgrade {
        // Hop-by-hop, but the upgrade is what this request is for: asked of the next hop too.
        parts.headers.insert(axum::http::header::CONNECTION, HeaderValue::from_static("upgrade"));
        parts.headers.insert(axum::http::header::UPGRADE, u.clone());
    }
    if let Ok(v) = HeaderValue::from_str(r.cluster.node_id()) {
        parts.headers.insert(HOP, v);
    }
    let req = Request::from_parts(parts, body);
    // Bounds the wait for the answer's head only (streams then run as long as they run): a
    // pooled connection to a node cut off mid-way would otherwise hang until TCP gives up.
    match tokio::time::timeout(HEAD_TIMEOUT, r.http.request(req)).await {
        Ok(Ok(mut resp)) => {
            if resp.status() == StatusCode::SWITCHING_PROTOCOLS
                && let Some(client_side) = client_side
            {
                let owner_side = hyper::upgrade::on(&mut resp);
                let (n, a) = (node.to_string(), addr.to_string());
                tokio::spawn(async move {
                    match (client_side.await, owner_side.await) {
                        (Ok(c), Ok(o)) => {
                            let mut c = hyper_util::rt::TokioIo::new(c);
                            let mut o = hyper_util::rt::TokioIo::new(o);
                            let _ = tokio::io::copy_bidirectional(&mut c, &mut o).await;
                        }
                        (c, o) => tracing::debug!(
                            node = %n, addr = %a, client = ?c.err(), owner = ?o.err(),
                            "an upgraded connection through the cluster did not start"
                        ),
                    }
                });
                // The 101 keeps its Connection/Upgrade headers: they are the answer.
                let (parts, _) = resp.into_parts();
                return Response::from_parts(parts, Body::empty());
            }
            let (mut parts, body) = resp.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            Response::from_parts(parts, Body::new(body))
        }
        Ok(Err(e)) => {
            error(Kind::SandboxGone, format!("node {node} at {addr} did not answer: {e}"))
        }
        Err(_) => error(
            Kind::DeadlineExceeded,
            format!("node {node} at {addr} did not answer within {} s", HEAD_TIMEOUT.as_secs()),
        ),
    }
}

/// Headers about one connection, not the request (RFC 9110 §7.6.1).
fn strip_hop_by_hop(h: &mut HeaderMap) {
    for name in [
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    ] {
        h.remove(name);
    }
}

/// A create that arrived here from a client: pick the node, forward, relay.
async fn place(r: Routing, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let bytes = match axum::body::to_bytes(body, CREATE_BODY_LIMIT).await {
        Ok(b) => b,
        Err(e) => {
            return error(
                Kind::InvalidArgument,
                format!("create body unreadable or over 1 MiB: {e}"),
            );
        }
    };
    let parsed: Value = if bytes.iter().all(u8::is_ascii_whitespace) {
        json!({})
    } else {
        match serde_json::from_slice(&bytes) {
            Ok(v) => v,
            Err(e) => return error(Kind::InvalidArgument, format!("invalid JSON body: {e}")),
        }
    };
    let requested = parsed.get("templateID").and_then(Value::as_str).unwrap_or("base");
    let metadata: std::collections::BTreeMap<String, String> = parsed
        .get("metadata")
        .and_then(|m| serde_json::from_value(m.clone()).ok())
        .unwrap_or_default();
    let (template, tier) = match crate::tier::requested(requested, &metadata) {
        Ok((t, k)) => (t, k.unwrap_or(r.app.manager.tiers().default_kind())),
        // The local create gives the precise refusal.
        Err(_) => (requested.to_string(), r.app.manager.tiers().default_kind()),
    };
    let me = r.cluster.node_id().to_string();
    let template = fetch::store_name(&template).unwrap_or(template);
    // A template some node published can be fetched by any node: all of them qualify.
    let fetchable =
        fetch::is_image(&template) && matches!(r.cluster.template(&template).await, Ok(Some(_)));
    let mut target =
        r.cluster.place(&template, tier.as_str(), fetchable).map_or_else(|| me.clone(), |n| n.id);
    if let Some(k) = parts.headers.get("idempotency-key").and_then(|v| v.to_str().ok()) {
        // The tenant is the presented key's hash: the node pinning the create need not know
        // the key (the node that creates checks it).
        let presented = parts
            .headers
            .get("x-api-key")
            .or_else(|| parts.headers.get("authorization"))
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let tenant = {
            use sha2::Digest;
            hex::encode(&sha2::Sha256::digest(presented.as_bytes())[..16])
        };
        let valid = (1..=255).contains(&k.len())
            && k.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if valid {
            match r.cluster.idempotent_target(&tenant, k, &target).await {
                Ok(t) => target = t,
                Err(e) => {
                    return error(
                        Kind::Unavailable,
                        format!("node {me}: cannot record the Idempotency-Key: {e}"),
                    );
                }
            }
        }
    }
    let req = Request::from_parts(parts, Body::from(bytes));
    if target == me {
        return local_create(&r, req).await;
    }
    let Some(node) = r.cluster.node(&target) else {
        return error(
            Kind::Unavailable,
            format!("node {target}, which this create is pinned to, is not in the cluster now"),
        );
    };
    forward(&r, &node.id, &node.addr, req).await
}

/// A create run on this node: the sandbox's ownership record is written before the answer
/// goes out, so an acknowledged sandbox always has one. If etcd refuses it, the sandbox is
/// killed and the create fails.
async fn local_create(r: &Routing, req: Request) -> Response {
    // An image template this node lacks is fetched from a peer first (verified layer by
    // layer); the create then runs as on a single server.
    let (parts, body) = req.into_parts();
    let bytes = match axum::body::to_bytes(body, CREATE_BODY_LIMIT).await {
        Ok(b) => b,
        Err(e) => {
            return error(
                Kind::InvalidArgument,
                format!("create body unreadable or over 1 MiB: {e}"),
            );
        }
    };
    let requested = serde_json::from_slice::<Value>(&bytes)
        .ok()
        .and_then(|v| v.get("templateID").and_then(Value::as_str).map(str::to_string));
    if let Some(requested) = requested {
        let name = requested.rsplit_once('@').map_or(requested.as_str(), |(n, _)| n);
        if let Some(name) = fetch::store_name(name)
            && let Err((status, msg)) = fetch::ensure(r, &name).await
        {
            return error(status, msg);
        }
    }
    // The key's sandbox quota, cluster-wide: a unit of its count in etcd is taken before the
    // sandbox starts (a compare-and-swap, so nodes creating at once never overshoot together)
    // and given back if the create fails; the record then carries it until deleted.
    let mut reserved = None;
    // At the limit, a create under an Idempotency-Key still runs locally: a retry of one
    // already made replays its answer (its sandbox holds its unit); a new one is undone below.
    let mut over: Option<String> = None;
    let idempotent = parts.headers.contains_key("idempotency-key");
    if let Ok(key) = crate::api::caller(&r.app, &parts.headers).await {
        let max = match r.app.manager.max_sandboxes_of(&key.id) {
            Ok(m) => m,
            Err(e) => return error(Kind::Internal, e.to_string()),
        };
        match r.cluster.reserve(&key.id, u64::from(max)).await {
            Ok(Ok(())) if max > 0 => reserved = Some(key.id),
            Ok(Ok(())) => {}
            Ok(Err(n)) => {
                let msg = format!(
                    "API key {} holds {n} sandboxes across the cluster; its limit is {max} (kill \
                     one first)",
                    key.id
                );
                if !idempotent {
                    return error(Kind::ResourceExhausted, msg);
                }
                over = Some(msg);
            }
            Err(e) => {
                return error(
                    Kind::Unavailable,
                    format!(
                        "node {}: cannot check the key's cluster-wide quota: {e}",
                        r.cluster.node_id()
                    ),
                );
            }
        }
    }
    let unreserve = |tenant: Option<String>| async move {
        if let Some(t) = tenant
            && let Err(e) = r.cluster.unreserve(&t).await
        {
            tracing::warn!(key_id = %t, error = %e, "giving back a cluster quota unit");
        }
    };
    let req = Request::from_parts(parts, Body::from(bytes));
    let resp = local(r, req).await;
    if resp.status() != StatusCode::CREATED {
        unreserve(reserved).await;
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, CREATE_BODY_LIMIT).await else {
        return error(Kind::Internal, "create answer unreadable");
    };
    let id = serde_json::from_slice::<Value>(&bytes)
        .ok()
        .and_then(|v| v.get("sandboxID").and_then(Value::as_str).map(str::to_string));
    let Some(id) = id else {
        unreserve(reserved).await;
        return Response::from_parts(parts, Body::from(bytes));
    };
    if let Some(msg) = over {
        if matches!(r.cluster.lookup(&id).await, Ok(Some(_))) {
            // The replay of a create made before: its sandbox is recorded (and counted).
            return Response::from_parts(parts, Body::from(bytes));
        }
        r.app.manager.kill(&id, "over the key's cluster-wide sandbox quota").await;
        return error(Kind::ResourceExhausted, msg);
    }
    // An Idempotency-Key replay answers the first create's sandbox, whose record already
    // holds its unit.
    if reserved.is_some() && matches!(r.cluster.lookup(&id).await, Ok(Some(rec)) if rec.counted) {
        unreserve(reserved.take()).await;
    }
    if let Some(rec) = r.app.manager.get(&id).and_then(|l| l.snapshot()) {
        let mut record = record_of(r.cluster.node_id(), &rec);
        record.counted = reserved.is_some();
        if let Err(e) = r.cluster.claim(&record).await {
            r.app.manager.kill(&id, "its cluster ownership record could not be written").await;
            unreserve(reserved).await;
            return error(
                Kind::Unavailable,
                format!(
                    "node {}: recording sandbox {id} in the cluster failed: {e}",
                    r.cluster.node_id()
                ),
            );
        }
    } else {
        // Answered 201 but gone already (killed at once): no record, no unit.
        unreserve(reserved).await;
    }
    Response::from_parts(parts, Body::from(bytes))
}

fn record_of(node: &str, r: &crate::store::SandboxRecord) -> SandboxRecord {
    SandboxRecord {
        id: r.id.clone(),
        owner: node.to_string(),
        tenant: r.key_id.clone(),
        state: match r.state {
            SandboxState::Paused => "paused",
            _ => "running",
        }
        .into(),
        template: r.template.clone(),
        tier: r.tier.clone(),
        end_at: r.end_at,
        lost_reason: None,
        counted: false,
        snapshot: None,
    }
}

/// `GET /sandboxes` and `GET /audit` through any node: the same request to every live node
/// (this one in-process), the answers joined. Lists also show the caller's `lost` sandboxes
/// (from etcd). Nodes that did not answer are named in `X-Ringfence-Partial`.
async fn fan_out(r: Routing, req: Request) -> Response {
    let (parts, _) = req.into_parts();
    let me = r.cluster.node_id().to_string();
    let audit = parts.uri.path() == "/audit";
    let mut calls = Vec::new();
    for node in r.cluster.nodes() {
        let mut p = parts.clone();
        if let Ok(v) = HeaderValue::from_str(&me) {
            p.headers.insert(HOP, v);
        }
        let req = Request::from_parts(p, Body::empty());
        let r2 = r.clone();
        calls.push(async move {
            let resp = if node.id == r2.cluster.node_id() {
                local(&r2, req).await
            } else {
                forward(&r2, &node.id, &node.addr, req).await
            };
            (node.id, resp)
        });
    }
    let answers = futures_util::future::join_all(calls).await;
    let mut items = Vec::new();
    let mut partial = Vec::new();
    // Some node has more after its page (see `paginate`).
    let mut node_more = false;
    for (node, resp) in answers {
        let status = resp.status();
        node_more |= resp.headers().contains_key("x-next-token");
        let Ok(bytes) = axum::body::to_bytes(resp.into_body(), 64 << 20).await else {
            partial.push(node);
            continue;
        };
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::BAD_REQUEST {
            // The caller's mistake reads the same on every node: answer it as it is.
            return Response::builder()
                .status(status)
                .header("content-type", "application/json")
                .body(Body::from(bytes))
                .unwrap_or_else(|_| {
                    let kind = match status {
                        StatusCode::UNAUTHORIZED => Kind::Unauthenticated,
                        _ => Kind::InvalidArgument,
                    };
                    error(kind, "bad request")
                });
        }
        let v: Value = match serde_json::from_slice(&bytes) {
            Ok(v) if status.is_success() => v,
            _ => {
                partial.push(node);
                continue;
            }
        };
        let list = if audit { v.get("records").cloned().unwrap_or(Value::Null) } else { v };
        if let Value::Array(a) = list {
            items.extend(a);
        }
    }
    let query = parts.uri.query().unwrap_or("");
    let mut next_token = None;
    if !audit {
        match paginate(&mut items, query, node_more) {
            Ok(t) => next_token = t,
            Err(msg) => return error(Kind::InvalidArgument, msg),
        }
    }
    // `lost` records carry no position in the list's order: they go with its first page.
    if !audit && !query.contains("state=") && !query.contains("nextToken=") {
        let tenant = crate::api::caller(&r.app, &parts.headers).await.ok().map(|k| k.id);
        let alive: std::collections::HashSet<String> =
            r.cluster.nodes().into_iter().map(|n| n.id).collect();
        for rec in r.cluster.records() {
            let lost = rec.state == "lost" || !alive.contains(&rec.owner);
            if lost && tenant.as_deref() == Some(rec.tenant.as_str()) {
                items.push(json!({
                    "sandboxID": rec.id,
                    "templateID": rec.template,
                    "state": "lost",
                    "endAt": rec.end_at,
                    "node": rec.owner,
                    "message": rec.lost_reason.unwrap_or_else(|| format!(
                        "its node {} stopped renewing its cluster lease", rec.owner)),
                }));
            }
        }
    }
    let body =
        if audit { json!({"records": items, "next_cursor": null}) } else { Value::Array(items) };
    let mut resp = axum::Json(body).into_response();
    if let Some(t) = next_token
        && let Ok(v) = HeaderValue::from_str(&t)
    {
        resp.headers_mut().insert("x-next-token", v);
    }
    if !partial.is_empty()
        && let Ok(v) = HeaderValue::from_str(&partial.join(","))
    {
        resp.headers_mut().insert("x-ringfence-partial", v);
    }
    resp
}

/// One page of a list across nodes. The list's token is a position in one total order
/// (`(created_at, id)`, newest first unless `order=asc`), the same on every node, so each node
/// was asked for `limit` items after the same position: the first `limit` of their union, in
/// that order, are exactly the cluster's page. Keeps those in `items`; returns the next token
/// (the last one's position) when anything is left after them.
fn paginate(
    items: &mut Vec<Value>,
    query: &str,
    node_more: bool,
) -> Result<Option<String>, String> {
    let mut limit = crate::store::DEFAULT_LIST_LIMIT as usize;
    let mut asc = false;
    for (k, v) in query.split('&').filter_map(|kv| kv.split_once('=')) {
        match k {
            // Each node already refused a bad limit or order; these parse as they did there.
            "limit" => limit = v.parse().map_err(|_| format!("invalid limit {v:?}"))?,
            "order" => asc = v == "asc",
            _ => {}
        }
    }
    let pos = |x: &Value| {
        let at = x
            .get("startedAt")
            .and_then(Value::as_str)
            .and_then(crate::time::parse_rfc3339_ms)
            .unwrap_or(0);
        let id = x.get("sandboxID").and_then(Value::as_str).unwrap_or("").to_string();
        (at, id)
    };
    items.sort_by_cached_key(|x| pos(x));
    if !asc {
        items.reverse();
    }
    let more = node_more || items.len() > limit;
    items.truncate(limit);
    Ok(match items.last() {
        Some(last) if more => {
            let (at, id) = pos(last);
            Some(crate::store::encode_token(at, &id))
        }
        _ => None,
    })
}

/// What this node offers now.
fn capacity(app: &App) -> Capacity {
    let (starting, running) = app.manager.counts();
    let mem_available = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemAvailable:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .unwrap_or(0)
        * 1024;
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u64);
    Capacity {
        mem_available,
        cpus,
        running: u64::try_from(starting + running).unwrap_or(0),
        // The built-in templates every node has, and the image templates of this node's store
        // (published with their layers' digests by the sync loop, fetchable by the others).
        templates: {
            let mut t = vec!["base".to_string(), ringfence_jail::template::INTERP_TEMPLATE.into()];
            t.extend(fetch::local_templates(app));
            t
        },
        tiers: app.manager.tiers().available().map(|t| t.kind().as_str().to_string()).collect(),
    }
}

/// Every second: publishes capacity, replicates API keys, and reconciles etcd with the
/// sandboxes this node holds (the node serves again after a lease loss only once this has
/// run, and kills what another node owns now).
async fn sync_loop(app: App, cluster: Arc<Cluster>) {
    let mut keys = KeySync::default();
    let mut published = HashSet::new();
    let mut exported = HashSet::new();
    loop {
        let rejoined = cluster.take_rejoined();
        cluster.set_capacity(capacity(&app));
        if let Err(e) = sync_keys(&app, &cluster, &mut keys).await {
            tracing::warn!(error = %e, "replicating API keys");
        }
        if let Err(e) = fetch::publish(&app, &cluster, &mut published).await {
            tracing::warn!(error = %e, "publishing template metadata");
        }
        // Without a live registration the leader would mark what a pass restores lost again.
        let pass = if cluster.lease_fresh() {
            reconcile(&app, &cluster).await
        } else {
            Err("no live cluster lease".to_string())
        };
        if pass.is_ok()
            && let Err(e) = handoff::export(&app, &cluster, &mut exported).await
        {
            tracing::warn!(error = %e, "copying paused sandboxes to shared storage");
        }
        match pass {
            // Only a pass that began after the (re)registration lets the node serve: one
            // already under way when the lease was replaced may have read stale records.
            Ok(()) if rejoined => cluster.settle(),
            Ok(()) => {}
            Err(e) => {
                if rejoined {
                    // Again next round; the node keeps refusing until one succeeds.
                    cluster.mark_rejoined();
                    tracing::warn!(error = %e, "reconcile after joining the cluster failed");
                } else {
                    tracing::debug!(error = %e, "cluster reconcile");
                }
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

async fn reconcile(app: &App, cluster: &Cluster) -> Result<(), String> {
    let before = cluster.owned_ids();
    let store = app.manager.store().clone();
    let held = tokio::task::spawn_blocking(move || store.live_sandboxes())
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    let local: Vec<SandboxRecord> = held.iter().map(|r| record_of(cluster.node_id(), r)).collect();
    let done = cluster.reconcile(&local, &before).await.map_err(|e| e.to_string())?;
    for id in &done.foreign {
        tracing::warn!(sandbox_id = %id, "another node owns this sandbox now: killing the local copy");
        // A sandbox paused to its files is not running: its stored copy ends instead (the
        // node that took it over resumed it from the shared copy).
        if !app.manager.kill(id, "another cluster node owns it").await
            && let Some(rec) = held.iter().find(|r| &r.id == id)
            && let Err(e) = app.manager.kill_paused(&rec.key_id, id).await
        {
            tracing::warn!(sandbox_id = %id, error = %e, "ending the local paused copy");
        }
    }
    if done.claimed + done.restored + done.released > 0 {
        tracing::info!(
            claimed = done.claimed,
            restored = done.restored,
            released = done.released,
            "cluster records reconciled"
        );
    }
    Ok(())
}

/// A local key as published to the cluster (the two crates keep their own type: the cluster
/// crate does not depend on the server's store).
fn key_record(k: &StoredKey) -> KeyRecord {
    KeyRecord {
        id: k.id.clone(),
        name: k.name.clone(),
        key_hash: k.key_hash.clone(),
        created_at: k.created_at,
        operator: k.operator,
        limits: k.limits.clone(),
        tiers: k.tiers.clone(),
        revoked: false,
    }
}

/// A published key as the local store keeps it.
fn stored_key(k: KeyRecord) -> StoredKey {
    StoredKey {
        id: k.id,
        name: k.name,
        key_hash: k.key_hash,
        created_at: k.created_at,
        operator: k.operator,
        limits: k.limits,
        tiers: k.tiers,
    }
}

/// What key replication remembers between rounds: the keys this node held last round, and
/// the ids revoked here (seeded from the audit trail's `key.revoke` records, which
/// `ringfence keys revoke` writes, so a revocation made while the node was down counts too).
#[derive(Default)]
struct KeySync {
    seeded: bool,
    held: HashSet<String>,
    revoked_here: HashSet<String>,
}

/// Publishes this node's keys, adds the cluster's to the local store, and replicates
/// revocations both ways (a key revoked on any node is refused by every node and never
/// imported again).
async fn sync_keys(app: &App, cluster: &Cluster, st: &mut KeySync) -> Result<(), String> {
    let store = app.manager.store().clone();
    if !st.seeded {
        let s = store.clone();
        let ids = tokio::task::spawn_blocking(move || {
            let q = crate::store::AuditQuery {
                key_id: None,
                sandbox_id: None,
                action: Some("key.revoke".into()),
                since_ms: None,
                until_ms: None,
                after: None,
                limit: 1000,
            };
            s.query_audit(&q).map(|(recs, _)| {
                recs.into_iter().filter_map(|r| r.user_id).collect::<Vec<String>>()
            })
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
        st.revoked_here.extend(ids);
        st.seeded = true;
    }
    let s = store.clone();
    let mine = tokio::task::spawn_blocking(move || s.export_keys())
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    let mine_ids: HashSet<String> = mine.iter().map(|k| k.id.clone()).collect();
    // A key held last round and gone now was revoked here (`ringfence keys revoke`).
    st.revoked_here.extend(st.held.difference(&mine_ids).cloned());
    let cluster_keys = cluster.keys();
    let tombstones: HashSet<String> =
        cluster_keys.iter().filter(|k| k.revoked).map(|k| k.id.clone()).collect();
    for id in &st.revoked_here {
        if !tombstones.contains(id) && cluster_keys.iter().any(|k| &k.id == id) {
            cluster.revoke_key(id).await.map_err(|e| e.to_string())?;
        }
    }
    // Revoked elsewhere: revoke here too, audited.
    let to_revoke: Vec<String> = mine_ids.intersection(&tombstones).cloned().collect();
    if !to_revoke.is_empty() {
        let s = store.clone();
        let ids = to_revoke.clone();
        tokio::task::spawn_blocking(move || {
            for id in &ids {
                if let Err(e) = s.revoke_key(id) {
                    tracing::warn!(key_id = %id, error = %e, "revoking a key the cluster revoked");
                    continue;
                }
                let mut rec =
                    crate::store::AuditRecord::new("key.revoke", crate::manager::now_ms());
                rec.user_id = Some(id.clone());
                rec.detail.insert("by".into(), json!("cluster"));
                if let Err(e) = s.insert_audit(&mut rec) {
                    tracing::warn!(key_id = %id, error = %e, "auditing a cluster revocation");
                }
            }
        })
        .await
        .map_err(|e| e.to_string())?;
        st.revoked_here.extend(to_revoke.iter().cloned());
    }
    let known: HashSet<String> = cluster_keys.iter().map(|k| k.id.clone()).collect();
    for k in &mine {
        if !known.contains(&k.id) && !st.revoked_here.contains(&k.id) {
            cluster.publish_key(&key_record(k)).await.map_err(|e| e.to_string())?;
        }
    }
    let missing: Vec<StoredKey> = cluster_keys
        .into_iter()
        .filter(|k| !k.revoked && !mine_ids.contains(&k.id) && !st.revoked_here.contains(&k.id))
        .map(stored_key)
        .collect();
    let mut held: HashSet<String> =
        mine_ids.into_iter().filter(|id| !to_revoke.contains(id)).collect();
    if !missing.is_empty() {
        let imported = tokio::task::spawn_blocking(move || {
            let mut ok = Vec::new();
            for k in &missing {
                match store.import_key(k) {
                    Ok(_) => ok.push(k.id.clone()),
                    Err(e) => {
                        tracing::warn!(key_id = %k.id, error = %e, "importing a cluster API key")
                    }
                }
            }
            ok
        })
        .await
        .map_err(|e| e.to_string())?;
        held.extend(imported);
    }
    st.held = held;
    Ok(())
}
