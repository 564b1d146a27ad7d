//! HTTP surface: E2B's control plane (authenticated by API key) and, on the same listener,
//! sandbox traffic routed by the `E2b-Sandbox-Id`/`E2b-Sandbox-Port` headers (or, failing
//! those, by the `X-Access-Token` alone) to the sandbox's envd.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::extract::{MatchedPath, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use serde::Deserialize;
use serde_json::{Value, json};
use tracing::Instrument;

use crate::e2b_error::E2bError;
use crate::files_query::{FileQuery, parse_file_query};
use crate::manager::{CreateParams, ENVD_VERSION, Live, Manager};
use crate::observe::MetricsAuth;
use crate::store::{AuditQuery, KeyInfo, ListQuery, SandboxRecord, SandboxState};

/// Shared state of every handler.
#[derive(Debug, Clone)]
pub struct App {
    pub manager: Arc<Manager>,
    /// Template builds through the API (`crate::templates`).
    pub builds: Arc<crate::templates::Builds>,
}

/// Builds the router: E2B's API, and beside it `/mcp` (which sends its tool calls through
/// E2B's) and the dashboard.
///
/// Sandbox traffic is told apart by its headers before any route matches (the layers wrap
/// the whole router), so a sandbox's own `/mcp` or `/ui` paths still reach the sandbox.
pub fn router(app: App) -> Router {
    let e2b = e2b_router(app.clone());
    let own = e2b
        .clone()
        .merge(crate::mcp::routes(app.clone(), layered(e2b, &app)))
        .merge(crate::ui::routes(app.clone()));
    layered(own, &app)
}

fn layered(r: Router, app: &App) -> Router {
    r.layer(middleware::from_fn_with_state(app.clone(), sandbox_traffic))
        .layer(middleware::from_fn_with_state(app.clone(), track))
}

fn e2b_router(app: App) -> Router {
    Router::new()
        .route("/health", get(|| async { StatusCode::OK }))
        .route("/sandboxes", post(create).get(list))
        .route("/v2/sandboxes", post(create).get(list))
        .route("/sandboxes/{id}", get(detail).delete(kill))
        .route("/tiers", get(tiers))
        .route("/sandboxes/{id}/timeout", post(set_timeout))
        .route("/sandboxes/{id}/connect", post(connect))
        .route("/v2/sandboxes/{id}/connect", post(connect))
        .route("/sandboxes/{id}/kill", delete(kill))
        .route("/sandboxes/{id}/metrics", get(sandbox_metrics))
        .route("/sandboxes/metrics", get(batch_metrics))
        .route("/metrics", get(prometheus))
        .route("/audit", get(audit))
        .route("/sandboxes/{id}/network", put(update_network).get(get_network))
        .route("/sandboxes/{id}/pause", post(pause))
        .route("/sandboxes/{id}/resume", post(resume))
        .route("/sandboxes/{id}/snapshots", post(create_snapshot))
        .route("/sandboxes/{id}/fork", post(fork))
        .route("/snapshots", get(list_snapshots))
        .route("/templates/{id}", delete(delete_snapshot))
        .route("/templates", get(crate::templates::list))
        .route("/v3/templates", post(crate::templates::request))
        .route("/templates/{id}/files/{hash}", get(crate::templates::upload_link))
        .route(
            "/template-uploads/{token}",
            put(crate::templates::upload).post(crate::templates::upload),
        )
        .route("/v2/templates/{id}/builds/{build}", post(crate::templates::start))
        .route("/templates/{id}/builds/{build}/status", get(crate::templates::status))
        .route("/templates/aliases/{alias}", get(crate::templates::alias))
        .route(
            "/templates/tags",
            post(crate::templates::assign_tags).delete(crate::templates::remove_tags),
        )
        .route("/templates/{id}/tags", get(crate::templates::get_tags))
        // Lifecycle events and webhooks (crate::events).
        .route("/events/sandboxes", get(crate::events::team_events))
        .route("/events/sandboxes/{id}", get(crate::events::sandbox_events))
        .route(
            "/events/webhooks",
            post(crate::events::create_webhook).get(crate::events::list_webhooks),
        )
        .route(
            "/events/webhooks/{id}",
            get(crate::events::get_webhook)
                .patch(crate::events::update_webhook)
                .delete(crate::events::delete_webhook),
        )
        .route("/events/webhooks/{id}/deliveries", get(crate::events::deliveries))
        .route("/sandboxes/{id}/refreshes", post(crate::extras::refresh))
        .route("/sandboxes/{id}/logs", get(crate::extras::logs_v1))
        .route("/v2/sandboxes/{id}/logs", get(crate::extras::logs_v2))
        // Volumes and their content API (crate::volumes).
        // Secrets (crate::secrets): values write-only.
        .route("/secrets", post(crate::secrets::create).get(crate::secrets::list))
        .route(
            "/secrets/{id}",
            get(crate::secrets::get).post(crate::secrets::update).delete(crate::secrets::destroy),
        )
        .route("/volumes", post(crate::volumes::create).get(crate::volumes::list))
        .route("/volumes/{id}", get(crate::volumes::get).delete(crate::volumes::destroy))
        .route(
            "/volumecontent/{id}/dir",
            get(crate::volumes::list_dir).post(crate::volumes::make_dir),
        )
        .route(
            "/volumecontent/{id}/path",
            get(crate::volumes::stat)
                .patch(crate::volumes::update_meta)
                .delete(crate::volumes::remove),
        )
        .route(
            "/volumecontent/{id}/file",
            get(crate::volumes::read_file).put(crate::volumes::write_file),
        )
        .fallback(|| async { E2bError::not_found("no such route") })
        .with_state(app)
}

/// Times every request into the API latency histogram, labelled by route template (never the
/// raw path) and status.
async fn track(State(app): State<App>, req: Request, next: Next) -> Response {
    let started = std::time::Instant::now();
    let matched = req.extensions().get::<MatchedPath>().map(|m| m.as_str().to_string());
    let port = req
        .headers()
        .get("e2b-sandbox-port")
        .and_then(|v| v.to_str().ok())
        .and_then(|p| p.parse::<u16>().ok());
    let route = crate::metrics::route_label(matched.as_deref(), req.uri().path(), port);
    let method = req.method().as_str().to_string();
    let resp = next.run(req).await;
    app.manager
        .observer()
        .metrics
        .api
        .with_label_values(&[route.as_str(), method.as_str(), resp.status().as_str()])
        .observe(started.elapsed().as_secs_f64());
    resp
}

/// The code interpreter's port (E2B's Jupyter server).
const JUPYTER_PORT: u16 = 49999;

pub use ringfence_core::manager::ENVD_PORT;

/// Why a sandbox request may proceed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    /// The sandbox's token, or a URL signed with it: full use, counts as activity and may
    /// resume an `autoResume` sandbox.
    Token,
    /// A port of a sandbox made public (`allowPublicTraffic`): its creator asked for its
    /// services to be reachable by anyone, so this traffic is treated like the owner's.
    Public,
    /// envd's own health check, which E2B leaves unauthenticated: it answers whether a running
    /// sandbox is there and nothing more (never resumes, never counts as activity).
    Health,
}

/// Sends sandbox traffic to the sandbox's envd; everything else continues to the control plane.
///
/// Order matters: the target is identified, then the request is authorised against the
/// sandbox's record (read without effect), and only then may anything happen to the sandbox
/// (resume, activity). An unknown id and a wrong or missing token get the same answer.
async fn sandbox_traffic(State(app): State<App>, mut req: Request, next: Next) -> Response {
    let headers = req.headers();
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
    let token = header("x-access-token");
    let id_header = header("e2b-sandbox-id");
    // `get_host(port)` URLs (`<port>-<id>.<domain>`) name the sandbox and port in the Host.
    let by_host = match &id_header {
        None => header("host").and_then(|h| crate::network::parse_host(&h)),
        Some(_) => None,
    };
    let port_header = header("e2b-sandbox-port").map(|p| p.trim().parse::<u16>());
    // Refused once the request turns out to be sandbox traffic (below); the control plane
    // ignores the header.
    let bad_port = matches!(port_header, Some(Err(_)));
    let port = match port_header {
        Some(Ok(p)) => p,
        _ => by_host.as_ref().map_or(ENVD_PORT, |(p, _)| *p),
    };
    // The code interpreter SDK sends only `E2B-Traffic-Access-Token` on its context calls
    // (docs/e2b-compat.md §5.3); create returns the same secret under that name. Other ports
    // (a sandbox's own services) take it too.
    let traffic = if port != ENVD_PORT { header("e2b-traffic-access-token") } else { None };
    let presented = token.clone().or(traffic);
    let files = port == ENVD_PORT && crate::envd::is_files(req.method(), req.uri().path());
    // envd's `/files` query, parsed once: the signature is checked over this value and envd
    // serves exactly this value (it is passed on in the request's extensions).
    let file_query = if files {
        match parse_file_query(req.uri().query().unwrap_or("")) {
            Ok(q) => Some(q),
            Err(e) => return E2bError::from(e).into_response(),
        }
    } else {
        None
    };
    let signed = file_query.as_ref().and_then(|q| SignedUrl::from_query(q, req.method()));
    let health = port == ENVD_PORT && is_bare_health(&req);
    let id = match id_header.or_else(|| by_host.as_ref().map(|(_, id)| id.clone())) {
        Some(id) => id,
        None => match presented.as_deref().and_then(|t| app.manager.by_token(t)) {
            Some(l) => match l.snapshot() {
                Some(r) => r.id,
                None => return not_running(""),
            },
            None => match &signed {
                // A signed download/upload URL carries no sandbox id: the signature names it.
                Some(sig) => match app.manager.find(|r| sig.matches(&r.access_token)) {
                    Some(l) => match l.snapshot() {
                        Some(r) => r.id,
                        None => return not_running(""),
                    },
                    None => {
                        return E2bError::unauthenticated("invalid signature").into_response();
                    }
                },
                None => return next.run(req).await,
            },
        },
    };
    if bad_port {
        return E2bError::invalid("E2b-Sandbox-Port must be a port number").into_response();
    }
    let record = app.manager.peek(&id);
    let access = match &record {
        Some(r) => match (&signed, presented.as_deref()) {
            (_, Some(t)) if crate::manager::ct_eq(t, &r.access_token) => Some(Access::Token),
            (Some(sig), _) if sig.matches(&r.access_token) => {
                if sig.expired() {
                    return E2bError::unauthenticated("signature is already expired")
                        .into_response();
                }
                Some(Access::Token)
            }
            _ if port != ENVD_PORT && port != JUPYTER_PORT && app.manager.is_public(&id) => {
                Some(Access::Public)
            }
            _ if health => Some(Access::Health),
            _ => None,
        },
        // Nothing to authorise against; the health check reads as "not running", as it would
        // for a sandbox that ended.
        None if health => return not_running(&id),
        None => None,
    };
    let Some(access) = access else {
        return E2bError::unauthenticated("missing or wrong X-Access-Token").into_response();
    };
    let live = match access {
        Access::Health => match app.manager.get(&id) {
            Some(l) if l.state() == Some(SandboxState::Running) => l,
            _ => return not_running(&id),
        },
        Access::Token | Access::Public => match app.manager.auto_resume(&id).await {
            Some(l) => l,
            None => return not_running(&id),
        },
    };
    let Some(record) = live.snapshot() else { return not_running(&id) };
    if let Some(q) = file_query {
        req.extensions_mut().insert(q);
    }
    // Everything logged while serving this request names the sandbox.
    let span = tracing::info_span!("sandbox", sandbox_id = %record.id);
    match port {
        ENVD_PORT => {
            crate::envd::handle(live.client.clone(), live.envd.clone(), req).instrument(span).await
        }
        JUPYTER_PORT if record.template == ringfence_jail::template::INTERP_TEMPLATE => {
            crate::interp::handle(app.manager.interp().clone(), live, req).instrument(span).await
        }
        other => {
            let target = (
                record.id.as_str(),
                live.with_instance(|i| i.net()),
                crate::network::host_mask(&live.net),
                crate::network::port_speaks_tls(&live.net, other),
            );
            let dialer = crate::network::guest_dialer(&live.net);
            crate::network::inbound(target, dialer, other, req).instrument(span).await
        }
    }
}

/// Whether `req` is envd's plain health check: `GET /health` with no query, no body and no
/// upgrade. Only that is answered without the sandbox's token; a `HEAD`, a `POST`, a body or
/// a WebSocket upgrade on the same path needs the token like everything else.
fn is_bare_health(req: &Request) -> bool {
    let h = req.headers();
    let no_body = h.get(axum::http::header::TRANSFER_ENCODING).is_none()
        && h.get(axum::http::header::CONTENT_LENGTH).is_none_or(|v| v.as_bytes() == b"0");
    req.method() == axum::http::Method::GET
        && crate::envd::is_health(req.method(), req.uri().path())
        && req.uri().query().is_none()
        && no_body
        && h.get(axum::http::header::UPGRADE).is_none()
}

/// The signature of a `download_url()`/`upload_url()` link: `v1_` + unpadded base64 of
/// sha256("{path}:{read|write}:{user}:{envdAccessToken}[:{expiration}]").
#[derive(Debug)]
struct SignedUrl {
    path: String,
    operation: &'static str,
    user: String,
    signature: String,
    expiration: Option<i64>,
}

impl SignedUrl {
    /// The signature a parsed `/files` query carries, over exactly the path and user that
    /// query names (and envd will use).
    fn from_query(q: &FileQuery, method: &axum::http::Method) -> Option<SignedUrl> {
        let operation = match *method {
            axum::http::Method::GET => "read",
            axum::http::Method::POST => "write",
            _ => return None,
        };
        let signature = q.signature.clone().filter(|s| s.starts_with("v1_"))?;
        Some(SignedUrl {
            path: q.path.clone().unwrap_or_default(),
            operation,
            user: q.username.clone().unwrap_or_default(),
            signature,
            expiration: q.signature_expiration,
        })
    }

    fn matches(&self, token: &str) -> bool {
        use base64::Engine;
        use sha2::Digest;
        let raw = match self.expiration {
            Some(exp) => format!("{}:{}:{}:{token}:{exp}", self.path, self.operation, self.user),
            None => format!("{}:{}:{}:{token}", self.path, self.operation, self.user),
        };
        let digest = sha2::Sha256::digest(raw.as_bytes());
        let want =
            format!("v1_{}", base64::engine::general_purpose::STANDARD_NO_PAD.encode(digest));
        crate::manager::ct_eq(&want, &self.signature)
    }

    fn expired(&self) -> bool {
        self.expiration.is_some_and(|e| e < crate::manager::now_ms() / 1000)
    }
}

fn not_running(id: &str) -> Response {
    E2bError::sandbox_not_found(id).into_response()
}

/// Authenticates the control-plane caller by its API key, in `X-API-Key` (what the SDKs send)
/// or `Authorization: Bearer` (what scrapers such as Prometheus send).
pub(crate) async fn caller(app: &App, headers: &HeaderMap) -> Result<KeyInfo, E2bError> {
    let bearer = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let key = headers
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .or(bearer)
        .ok_or_else(|| E2bError::unauthenticated("missing X-API-Key header"))?
        .to_string();
    let store = app.manager.store().clone();
    tokio::task::spawn_blocking(move || store.verify_key(&key))
        .await
        .map_err(E2bError::internal)?
        .map_err(E2bError::internal)?
        .ok_or_else(|| E2bError::unauthenticated("invalid API key"))
}

/// The caller's own live sandbox, or 404 (never revealing another tenant's).
fn owned(app: &App, key: &KeyInfo, id: &str) -> Result<Arc<Live>, E2bError> {
    app.manager
        .get(id)
        .filter(|l| l.record.lock().is_ok_and(|r| r.key_id == key.id))
        .ok_or_else(|| E2bError::not_found(format!("sandbox {id:?} not found")))
}

pub(crate) fn parse_body<T: for<'de> Deserialize<'de> + Default>(
    body: &[u8],
) -> Result<T, E2bError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(body).map_err(|e| E2bError::invalid(format!("invalid JSON body: {e}")))
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct CreateBody {
    #[serde(rename = "templateID")]
    template_id: Option<String>,
    timeout: Option<i64>,
    #[serde(default)]
    metadata: Option<BTreeMap<String, String>>,
    #[serde(default)]
    env_vars: Option<BTreeMap<String, String>>,
    /// E2B's snake_case field (the other fields are camelCase).
    #[serde(rename = "allow_internet_access", alias = "allowInternetAccess")]
    allow_internet_access: Option<bool>,
    network: Option<Value>,
    auto_pause: Option<bool>,
    auto_pause_memory: Option<bool>,
    lifecycle: Option<Value>,
    auto_resume: Option<Value>,
    /// Our extension: pause or kill after this many seconds without activity.
    idle_timeout: Option<i64>,
    on_idle: Option<String>,
    volume_mounts: Option<Value>,
}

/// E2B's lifecycle fields (`autoPause`, `lifecycle.onTimeout`, `autoResume`) and ours
/// (`idleTimeout` seconds with `onIdle`: `pause` or `kill`).
fn lifecycle_from(
    b: &CreateBody,
    max_timeout: Duration,
) -> Result<crate::store::Lifecycle, E2bError> {
    let lc = b.lifecycle.as_ref();
    let on_timeout = lc.and_then(|l| l.get("onTimeout").or_else(|| l.get("on_timeout")));
    let pause_on_timeout = b.auto_pause == Some(true)
        || on_timeout.is_some_and(|v| {
            v.as_str() == Some("pause") || v.get("action").and_then(Value::as_str) == Some("pause")
        });
    let auto_resume = match b.auto_resume.as_ref().or(lc.and_then(|l| l.get("autoResume"))) {
        Some(Value::Bool(v)) => *v,
        Some(v) => v.get("enabled").and_then(Value::as_bool).unwrap_or(false),
        None => false,
    };
    // Bounded like `timeout`: an idle period longer than a sandbox may live means nothing,
    // and anything near 2^61 s would wrap when turned into milliseconds.
    let idle = b.idle_timeout.unwrap_or(0);
    let max_idle = max_timeout.as_secs();
    if u64::try_from(idle).map_or(true, |i| i > max_idle) {
        return Err(E2bError::invalid(format!(
            "idleTimeout must be between 0 and {max_idle} seconds, got {idle}"
        )));
    }
    let idle_action_pause = match b.on_idle.as_deref() {
        None | Some("kill") => false,
        Some("pause") => true,
        Some(other) => {
            return Err(E2bError::invalid(format!(
                "onIdle must be \"pause\" or \"kill\", got {other:?}"
            )));
        }
    };
    Ok(crate::store::Lifecycle {
        pause_on_timeout,
        timeout_pause_files_only: b.auto_pause_memory == Some(false),
        auto_resume,
        idle_timeout_ms: (idle as u64).saturating_mul(1000),
        idle_action_pause,
        ..Default::default()
    })
}

fn timeout_from(app: &App, secs: Option<i64>) -> Result<Duration, E2bError> {
    let cfg = app.manager.config();
    match secs {
        None => Ok(cfg.default_timeout),
        // 0 is valid, as in E2B's API: the sandbox ends at once.
        Some(s) if s < 0 => Err(E2bError::invalid(format!(
            "timeout must be zero or a positive number of seconds, got {s}"
        ))),
        Some(s) => {
            let d = Duration::from_secs(s as u64);
            if d > cfg.max_timeout {
                return Err(E2bError::invalid(format!(
                    "timeout {s} s exceeds the maximum of {} s",
                    cfg.max_timeout.as_secs()
                )));
            }
            Ok(d)
        }
    }
}

pub(crate) fn sandbox_json(r: &SandboxRecord) -> Value {
    json!({
        "templateID": r.template,
        "sandboxID": r.id,
        "clientID": "ringfence",
        "alias": r.alias,
        "envdVersion": ENVD_VERSION,
        "envdAccessToken": r.access_token,
        "trafficAccessToken": r.access_token,
        "domain": null,
    })
}

fn rfc3339(ms: i64) -> String {
    crate::time::rfc3339_ms(ms)
}

fn listed_json(r: &SandboxRecord) -> Value {
    json!({
        "templateID": r.template,
        "sandboxID": r.id,
        "clientID": "ringfence",
        "alias": r.alias,
        "startedAt": rfc3339(r.created_at),
        "endAt": rfc3339(r.end_at),
        "cpuCount": r.cpu_count,
        "memoryMB": r.memory_mb,
        "diskSizeMB": r.disk_mb,
        "state": match r.state { SandboxState::Paused => "paused", _ => "running" },
        "envdVersion": ENVD_VERSION,
        "metadata": r.metadata,
    })
}

async fn create(
    State(app): State<App>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, E2bError> {
    crate::phases::timed("create", create_timed(app, headers, body)).await
}

async fn create_timed(
    app: App,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, E2bError> {
    let key = caller(&app, &headers).await?;
    crate::phases::mark("api_key");
    let b: CreateBody = parse_body(&body)?;
    let mut lifecycle = lifecycle_from(&b, app.manager.config().max_timeout)?;
    // Volumes, held against destroy until the sandbox is recorded (crate::volumes).
    let (mounts, _volumes_held) =
        crate::volumes::resolve_mounts(&app, &key.id, b.volume_mounts.as_ref()).await?;
    lifecycle.volumes = mounts;
    if let Some(env) = &b.env_vars {
        crate::validate::check_env("envVars", env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .map_err(E2bError::invalid)?;
    }
    // A retried create (same Idempotency-Key) gets the first one's sandbox (crate::extras).
    let (idem, earlier) = crate::extras::Idempotent::begin(&app, &key.id, &headers).await?;
    if let Some(sid) = earlier {
        return crate::extras::replay(&app, &key.id, &sid);
    }
    let metadata = b.metadata.unwrap_or_default();
    let requested = b.template_id.unwrap_or_else(|| "base".into());
    let (template, tier) = crate::tier::requested(&requested, &metadata)
        .map_err(|e| E2bError::invalid(e.to_string()))?;
    let params = CreateParams {
        template,
        tier,
        timeout: timeout_from(&app, b.timeout)?,
        metadata,
        env: b.env_vars.unwrap_or_default(),
        network: crate::network::parse(b.allow_internet_access, b.network.as_ref())?,
        lifecycle,
        reuse: None,
    };
    app.manager.network().validate(&params.network)?;
    app.manager.network().check_proxy(&params.network).await?;
    // Another tenant's template is as absent as one that does not exist.
    let image = crate::templates::check_use(&app, &key, &params.template).await?;
    crate::phases::mark("request_checks");
    let live = app.manager.create(&key.id, params).await?;
    let r = live.snapshot().ok_or_else(|| E2bError::internal_plain("lost sandbox"))?;
    // A template with a start command (E2B's `set_start_cmd`): create answers once its ready
    // check passes; a sandbox whose check never passes is ended, not handed out.
    if let Some(rec) = &image
        && let Err(why) = crate::templates::start_command(&live, rec).await
    {
        app.manager.kill(&r.id, "the template's ready check failed").await;
        return Err(E2bError::invalid(format!("template {:?}: {why}", rec.name)));
    }
    idem.record(&app, &r.id).await?;
    let mut v = sandbox_json(&r);
    v["domain"] = json!(app.manager.network().domain());
    let response = (StatusCode::CREATED, Json(v)).into_response();
    crate::phases::mark("response");
    Ok(response)
}

async fn detail(
    State(app): State<App>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Value>, E2bError> {
    let key = caller(&app, &headers).await?;
    let live =
        match owned(&app, &key, &id) {
            Ok(l) => l,
            Err(e) => {
                // Paused with only its files kept: described from its record.
                let Some(r) = app.manager.store().get_sandbox(&id).ok().flatten().filter(|r| {
                    r.key_id == key.id && r.state == crate::store::SandboxState::Paused
                }) else {
                    return Err(e);
                };
                let mut v = listed_json(&r);
                v["envdAccessToken"] = json!(r.access_token);
                v["domain"] = json!(app.manager.network().domain());
                add_tier(&app, &mut v, &r);
                return Ok(Json(v));
            }
        };
    let r = live.snapshot().ok_or_else(|| E2bError::not_found("gone"))?;
    let mut v = listed_json(&r);
    v["envdAccessToken"] = json!(r.access_token);
    v["domain"] = json!(app.manager.network().domain());
    add_tier(&app, &mut v, &r);
    let net = app.manager.network().describe(&live.net);
    if net.is_null() {
        // No network attached (a tier without one yet): the SDK parses a present `network` as
        // an object, so it is left out, and the sandbox truthfully has no internet access.
        v["allowInternetAccess"] = json!(false);
    } else {
        v["allowInternetAccess"] = net["allowInternetAccess"].clone();
        v["network"] = net;
    }
    Ok(Json(v))
}

/// Our extension beside E2B's fields: `tier` and what it guarantees (`tierCapabilities`,
/// null for a tier this server no longer runs).
fn add_tier(app: &App, v: &mut Value, r: &SandboxRecord) {
    v["tier"] = json!(r.tier);
    let caps = crate::tier::TierKind::parse(&r.tier)
        .ok()
        .and_then(|k| app.manager.tiers().get(k).ok())
        .map(|t| t.capabilities());
    v["tierCapabilities"] = json!(caps);
}

/// `GET /tiers` (our extension): every tier Ringfence knows, whether this host runs it (and
/// why not), what it guarantees, its measured start cost, and which the caller's key may use.
async fn tiers(State(app): State<App>, headers: HeaderMap) -> Result<Json<Value>, E2bError> {
    let key = caller(&app, &headers).await?;
    let list: Vec<Value> = app
        .manager
        .tiers()
        .info()
        .into_iter()
        .map(|t| {
            let allowed = crate::tier::permitted(key.tiers.as_deref(), t.tier).is_ok();
            let mut v = json!(t);
            v["allowedForKey"] = json!(allowed);
            v
        })
        .collect();
    Ok(Json(json!({ "tiers": list })))
}

async fn kill(
    State(app): State<App>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<StatusCode, E2bError> {
    let key = caller(&app, &headers).await?;
    if owned(&app, &key, &id).is_err() {
        // Paused with only its files kept: nothing runs, but it still exists.
        return match app.manager.kill_paused(&key.id, &id).await? {
            true => Ok(StatusCode::NO_CONTENT),
            false => Err(E2bError::not_found(format!("sandbox {id:?} not found"))),
        };
    }
    app.manager.kill(&id, "killed by API").await;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PauseBody {
    /// Keep processes in memory (default) or only the files.
    memory: Option<bool>,
    /// E2B's `pause(strict=True)`: refuse (503) while the agent does not answer.
    require_healthy_guest: Option<bool>,
}

async fn pause(
    State(app): State<App>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<StatusCode, E2bError> {
    let key = caller(&app, &headers).await?;
    let b: PauseBody = parse_body(&body)?;
    if b.require_healthy_guest == Some(true)
        && let Ok(live) = owned(&app, &key, &id)
        && !crate::extras::guest_answers(&live).await
    {
        return Err(E2bError::unavailable(format!(
            "sandbox {id}'s agent does not answer: not paused (strict)"
        )));
    }
    match app.manager.pause(&key.id, &id, b.memory.unwrap_or(true)).await? {
        true => Ok(StatusCode::NO_CONTENT),
        false => Err(E2bError::conflict(format!("sandbox {id} is already paused"))),
    }
}

async fn resume(
    State(app): State<App>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Response, E2bError> {
    let key = caller(&app, &headers).await?;
    let b: TimeoutBody = parse_body(&body)?;
    let timeout = timeout_from(&app, b.timeout)?;
    let (live, was_paused) = app.manager.resume(&key.id, &id, timeout).await?;
    if !was_paused {
        return Err(E2bError::conflict(format!("sandbox {id} is already running")));
    }
    let r = live.snapshot().ok_or_else(|| E2bError::not_found("gone"))?;
    let mut v = sandbox_json(&r);
    v["domain"] = json!(app.manager.network().domain());
    Ok((StatusCode::CREATED, Json(v)).into_response())
}

#[derive(Debug, Default, Deserialize)]
struct SnapshotBody {
    name: Option<String>,
    /// E2B's `mode="full"` (`true`): snapshots here keep the files only.
    memory: Option<bool>,
}

fn snapshot_json(s: &crate::store::SnapshotRecord) -> Value {
    json!({"snapshotID": s.id, "names": [s.name]})
}

async fn create_snapshot(
    State(app): State<App>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Response, E2bError> {
    let key = caller(&app, &headers).await?;
    let b: SnapshotBody = parse_body(&body)?;
    if b.memory == Some(true) {
        return Err(E2bError::invalid(
            "snapshots keep the files only: mode=\"full\" (memory) is not supported; use \
             mode=\"filesystem\" or pause() to keep memory",
        ));
    }
    let snap = app.manager.snapshot(&key.id, &id, b.name).await?;
    Ok((StatusCode::CREATED, Json(snapshot_json(&snap))).into_response())
}

#[derive(Debug, Deserialize)]
struct SnapshotQuery {
    #[serde(rename = "sandboxID")]
    sandbox_id: Option<String>,
    name: Option<String>,
}

async fn list_snapshots(
    State(app): State<App>,
    headers: HeaderMap,
    axum::extract::Query(q): axum::extract::Query<SnapshotQuery>,
) -> Result<Json<Value>, E2bError> {
    let key = caller(&app, &headers).await?;
    let list = app.manager.list_snapshots(&key.id, q.sandbox_id.as_deref())?;
    let out: Vec<Value> = list
        .iter()
        .filter(|s| q.name.as_ref().is_none_or(|n| &s.name == n))
        .map(snapshot_json)
        .collect();
    Ok(Json(Value::Array(out)))
}

async fn delete_snapshot(
    State(app): State<App>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<StatusCode, E2bError> {
    let key = caller(&app, &headers).await?;
    match app.manager.delete_snapshot(&key.id, &id).await? {
        true => Ok(StatusCode::NO_CONTENT),
        // Not a snapshot: a template this key built through the API (crate::templates).
        false if crate::templates::delete(&app, &key, &id).await? => Ok(StatusCode::NO_CONTENT),
        false => Err(E2bError::not_found(format!("template {id:?} not found"))),
    }
}

#[derive(Debug, Default, Deserialize)]
struct ForkBody {
    timeout: Option<i64>,
    count: Option<i64>,
}

async fn fork(
    State(app): State<App>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Response, E2bError> {
    let key = caller(&app, &headers).await?;
    let b: ForkBody = parse_body(&body)?;
    let count = b.count.unwrap_or(1);
    if !(1..=20).contains(&count) {
        return Err(E2bError::invalid("count must be between 1 and 20"));
    }
    let timeout = timeout_from(&app, b.timeout)?;
    let results = app.manager.fork(&key.id, &id, count as u32, timeout).await?;
    let domain = app.manager.network().domain();
    let out: Vec<Value> = results
        .into_iter()
        .map(|r| match r.map(|l| l.snapshot()) {
            Ok(Some(rec)) => {
                let mut v = sandbox_json(&rec);
                v["domain"] = json!(domain);
                json!({"sandbox": v})
            }
            Ok(None) => json!({"error": E2bError::internal_plain("fork vanished").to_json()}),
            Err(e) => {
                json!({"error": E2bError::from(e).to_json()})
            }
        })
        .collect();
    Ok((StatusCode::CREATED, Json(Value::Array(out))).into_response())
}

#[derive(Debug, Default, Deserialize)]
struct TimeoutBody {
    timeout: Option<i64>,
    /// Connect's `memory` (E2B `on_resume`): `false` restarts from the files.
    memory: Option<bool>,
}

async fn set_timeout(
    State(app): State<App>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<StatusCode, E2bError> {
    let key = caller(&app, &headers).await?;
    owned(&app, &key, &id)?;
    let b: TimeoutBody = parse_body(&body)?;
    let secs = b.timeout.ok_or_else(|| E2bError::invalid("timeout is required"))?;
    app.manager.set_timeout(&id, timeout_from(&app, Some(secs))?)?;
    if let Some(live) = app.manager.get(&id) {
        live.obs.record_action("sandbox.timeout", json!({"timeout_s": secs})).await;
    }
    Ok(StatusCode::NO_CONTENT)
}

async fn connect(
    State(app): State<App>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Json<Value>, E2bError> {
    let key = caller(&app, &headers).await?;
    let b: TimeoutBody = parse_body(&body)?;
    // `on_resume="reboot"` (`memory: false`): a sandbox paused in memory lets go of it first,
    // so it starts again from its files.
    if b.memory == Some(false)
        && app
            .manager
            .get(&id)
            .and_then(|l| l.snapshot())
            .is_some_and(|r| r.key_id == key.id && r.lifecycle.paused_with_memory == Some(true))
    {
        app.manager.pause(&key.id, &id, false).await?;
    }
    // Connecting to a paused sandbox resumes it (E2B's behaviour).
    let paused = app
        .manager
        .get(&id)
        .and_then(|l| l.snapshot())
        .is_none_or(|r| r.state == crate::store::SandboxState::Paused);
    if paused {
        let timeout = timeout_from(&app, b.timeout)?;
        app.manager.resume(&key.id, &id, timeout).await?;
    }
    let live = owned(&app, &key, &id)?;
    if let Some(secs) = b.timeout {
        // Connecting never shortens a sandbox's life.
        let want = crate::manager::deadline_after(timeout_from(&app, Some(secs))?);
        if live.record.lock().is_ok_and(|r| r.end_at < want) {
            app.manager.set_timeout(&id, Duration::from_secs(secs as u64))?;
        }
    }
    let r = live.snapshot().ok_or_else(|| E2bError::not_found("gone"))?;
    live.obs.record_action("sandbox.connect", json!({"timeout_s": b.timeout})).await;
    let mut v = sandbox_json(&r);
    v["domain"] = json!(app.manager.network().domain());
    Ok(Json(v))
}

/// `PUT /sandboxes/{id}/network`: replaces the egress policy (E2B's `update_network`);
/// connections the new policy forbids are cut.
async fn update_network(
    State(app): State<App>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<StatusCode, E2bError> {
    let key = caller(&app, &headers).await?;
    let live = owned(&app, &key, &id)?;
    let b: Value = parse_body(&body)?;
    let params = crate::network::parse(None, Some(&b))?;
    app.manager.network().check_proxy(&params).await?;
    // The audit record shows the settings without credentials; the saved ones keep the
    // proxy's password sealed.
    let detail = crate::network::Network::persisted_public(&params);
    let saved = app.manager.network().persisted(&params);
    let rules = !params.rules.is_empty();
    let cut = app.manager.network().update(&live.key_id(), &live.net, params)?;
    if rules {
        app.manager.trust_egress_ca(&live).await?;
    }
    let mut rec = live.obs.action("network.update");
    if let Value::Object(m) = detail.clone() {
        rec.detail = m;
    }
    rec.detail.insert("connections_cut".into(), json!(cut));
    app.manager.observer().record(rec).await;
    // The saved settings follow, so a restarted server restores these.
    let store = app.manager.store().clone();
    let _ = tokio::task::spawn_blocking(move || {
        store.record_event(&id, "network", &json!({"network": saved}))
    })
    .await;
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /sandboxes/{id}/network`: the policy in force and the connections open now.
async fn get_network(
    State(app): State<App>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Value>, E2bError> {
    let key = caller(&app, &headers).await?;
    let live = owned(&app, &key, &id)?;
    Ok(Json(app.manager.network().describe(&live.net)))
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ListParams {
    metadata: Option<String>,
    state: Option<String>,
    limit: Option<u32>,
    next_token: Option<String>,
    order: Option<String>,
    template: Option<String>,
    started_after: Option<String>,
}

/// Parses E2B's metadata filter: `k1=v1&k2=v2`, URL-encoded as one query value.
fn parse_metadata_filter(s: &str) -> Result<BTreeMap<String, String>, E2bError> {
    let mut out = BTreeMap::new();
    for pair in s.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').ok_or_else(|| {
            E2bError::invalid(format!("invalid metadata filter {pair:?}: expected key=value"))
        })?;
        out.insert(url_decode(k), url_decode(v));
    }
    Ok(out)
}

fn url_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
        match (bytes[i], hex.and_then(|h| u8::from_str_radix(h, 16).ok())) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
                continue;
            }
            (b'+', _) => out.push(b' '),
            (b, _) => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn list(
    State(app): State<App>,
    headers: HeaderMap,
    Query(q): Query<ListParams>,
) -> Result<Response, E2bError> {
    let key = caller(&app, &headers).await?;
    let mut query = ListQuery::default();
    if let Some(m) = &q.metadata {
        query.metadata = parse_metadata_filter(m)?;
    }
    if let Some(states) = &q.state {
        let mut v = Vec::new();
        for s in states.split(',') {
            v.push(match s {
                "running" => SandboxState::Running,
                "paused" => SandboxState::Paused,
                other => {
                    return Err(E2bError::invalid(format!("unknown state {other:?}")));
                }
            });
        }
        query.state = Some(v);
    } else {
        query.state = Some(vec![SandboxState::Running, SandboxState::Paused]);
    }
    if let Some(l) = q.limit {
        if l == 0 || l > 1000 {
            return Err(E2bError::invalid("limit must be between 1 and 1000"));
        }
        query.limit = l;
    }
    query.next_token = q.next_token.filter(|t| !t.is_empty());
    query.newest_first = match q.order.as_deref() {
        None | Some("desc") => true,
        Some("asc") => false,
        Some(other) => {
            return Err(E2bError::invalid(format!(
                "unknown order {other:?}: expected asc or desc"
            )));
        }
    };
    query.template = q.template.filter(|t| !t.is_empty());
    if let Some(t) = q.started_after.filter(|t| !t.is_empty()) {
        query.started_after_ms = Some(crate::time::parse_rfc3339_ms(&t).ok_or_else(|| {
            E2bError::invalid(format!("startedAfter {t:?} is not an RFC 3339 time"))
        })?);
    }
    let store = app.manager.store().clone();
    let key_id = key.id.clone();
    let (rows, next) = tokio::task::spawn_blocking(move || store.list_sandboxes(&key_id, &query))
        .await
        .map_err(E2bError::internal)?
        .map_err(E2bError::from)?;
    let body: Vec<Value> = rows.iter().map(listed_json).collect();
    let mut resp = Json(body).into_response();
    if let Some(t) = next
        && let Ok(v) = HeaderValue::from_str(&t)
    {
        resp.headers_mut().insert("x-next-token", v);
    }
    Ok(resp)
}

/// `GET /metrics`: the Prometheus exposition.
async fn prometheus(State(app): State<App>, headers: HeaderMap) -> Result<Response, E2bError> {
    let obs = app.manager.observer();
    let full = match obs.config().metrics_auth {
        MetricsAuth::None => true,
        MetricsAuth::Key => caller(&app, &headers).await?.operator,
        MetricsAuth::Operator => {
            if !caller(&app, &headers).await?.operator {
                return Err(E2bError::forbidden(
                    "GET /metrics needs an operator key (ringfence keys create --operator)",
                ));
            }
            true
        }
    };
    let (starting, _) = app.manager.counts();
    let store = app.manager.store().clone();
    let by_state = tokio::task::spawn_blocking(move || store.count_by_state())
        .await
        .map_err(E2bError::internal)?
        .map_err(E2bError::internal)?;
    obs.metrics.sandboxes.with_label_values(&["starting"]).set(starting);
    for state in [SandboxState::Running, SandboxState::Paused] {
        let n = by_state.get(&state).copied().unwrap_or(0);
        obs.metrics.sandboxes.with_label_values(&[state.as_str()]).set(n);
    }
    // A tenant's key: no series that names a sandbox (every tenant's ids and usage).
    let text = if full { obs.metrics.render() } else { obs.metrics.render_shared() }
        .map_err(E2bError::internal)?;
    Ok(([(axum::http::header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], text).into_response())
}

#[derive(Debug, Default, Deserialize)]
struct MetricsRange {
    start: Option<i64>,
    end: Option<i64>,
}

/// `GET /sandboxes/{id}/metrics?start=&end=` (Unix seconds): E2B's `get_metrics()`.
async fn sandbox_metrics(
    State(app): State<App>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<MetricsRange>,
) -> Result<Json<Value>, E2bError> {
    let key = caller(&app, &headers).await?;
    let live = owned(&app, &key, &id)?;
    let bound = |field: &str, v: Option<i64>| {
        v.map(|s| crate::validate::unix_secs_ms(field, s)).transpose().map_err(E2bError::invalid)
    };
    let (start, end) = (bound("start", q.start)?, bound("end", q.end)?.map(|e| e + 999));
    let samples = tokio::task::spawn_blocking(move || live.obs.samples(start, end))
        .await
        .map_err(E2bError::internal)?;
    Ok(Json(Value::Array(samples.iter().map(|s| s.json()).collect())))
}

#[derive(Debug, Default, Deserialize)]
struct BatchMetrics {
    sandbox_ids: Option<String>,
}

/// `GET /sandboxes/metrics?sandbox_ids=a,b`: the latest sample of each of the caller's
/// sandboxes named (others' and unknown ids are left out, as ids must not be probed).
async fn batch_metrics(
    State(app): State<App>,
    headers: HeaderMap,
    Query(q): Query<BatchMetrics>,
) -> Result<Json<Value>, E2bError> {
    let key = caller(&app, &headers).await?;
    let ids: Vec<String> = q
        .sandbox_ids
        .unwrap_or_default()
        .split(',')
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect();
    if ids.len() > 100 {
        return Err(E2bError::invalid("at most 100 sandbox_ids"));
    }
    let lives: Vec<Arc<Live>> = ids.iter().filter_map(|id| owned(&app, &key, id).ok()).collect();
    let out = tokio::task::spawn_blocking(move || {
        let mut m = serde_json::Map::new();
        for l in lives {
            if let Some(s) = l.obs.sample() {
                m.insert(l.obs.id.clone(), s.json());
            }
        }
        m
    })
    .await
    .map_err(E2bError::internal)?;
    Ok(Json(json!({"sandboxes": out})))
}

#[derive(Debug, Default, Deserialize)]
struct AuditParams {
    sandbox: Option<String>,
    key: Option<String>,
    action: Option<String>,
    since: Option<String>,
    until: Option<String>,
    limit: Option<u32>,
    cursor: Option<String>,
}

/// A time bound of `/audit` and `ringfence audit`: RFC 3339, or Unix seconds (fractions
/// allowed). Returns Unix milliseconds.
/// Out of range (before 1970, after 9999, not finite): None, like a value that does not parse.
pub fn parse_time_bound(s: &str) -> Option<i64> {
    let max_ms = crate::validate::MAX_UNIX_SECS * 1000;
    if let Ok(secs) = s.parse::<f64>() {
        let ms = secs * 1000.0;
        return (ms.is_finite() && (0.0..=max_ms as f64).contains(&ms)).then(|| ms.round() as i64);
    }
    crate::time::parse_rfc3339_ms(s).filter(|ms| (0..=max_ms).contains(ms))
}

/// `GET /audit`: the caller's own audit records, oldest first, a page at a time.
async fn audit(
    State(app): State<App>,
    headers: HeaderMap,
    Query(p): Query<AuditParams>,
) -> Result<Response, E2bError> {
    let key = caller(&app, &headers).await?;
    let bound = |name: &str, v: Option<String>| -> Result<Option<i64>, E2bError> {
        match v.filter(|v| !v.is_empty()) {
            None => Ok(None),
            Some(v) => parse_time_bound(&v).map(Some).ok_or_else(|| {
                E2bError::invalid(format!(
                    "{name} {v:?} is not a time from 1970 to 9999 in RFC 3339 or Unix seconds"
                ))
            }),
        }
    };
    // The tenant boundary: a `key` filter can only narrow to the caller's own key.
    if p.key.as_deref().is_some_and(|k| !k.is_empty() && k != key.id) {
        return Ok(Json(json!({"records": [], "next_cursor": null})).into_response());
    }
    let q = AuditQuery {
        key_id: Some(key.id.clone()),
        sandbox_id: p.sandbox.filter(|s| !s.is_empty()),
        action: p.action.filter(|s| !s.is_empty()),
        since_ms: bound("since", p.since)?,
        until_ms: bound("until", p.until)?,
        after: p.cursor.filter(|s| !s.is_empty()),
        limit: p.limit.unwrap_or(crate::store::DEFAULT_AUDIT_LIMIT),
    };
    let store = app.manager.store().clone();
    let (records, next) = tokio::task::spawn_blocking(move || store.query_audit(&q))
        .await
        .map_err(E2bError::internal)?
        .map_err(E2bError::from)?;
    let mut resp = Json(json!({"records": records, "next_cursor": next})).into_response();
    if let Some(c) = next
        && let Ok(v) = HeaderValue::from_str(&c)
    {
        resp.headers_mut().insert("x-next-cursor", v);
    }
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_bounds_take_rfc3339_or_unix_seconds() {
        assert_eq!(parse_time_bound("1700000000"), Some(1_700_000_000_000));
        assert_eq!(parse_time_bound("1700000000.5"), Some(1_700_000_000_500));
        assert_eq!(parse_time_bound("2023-11-14T22:13:20Z"), Some(1_700_000_000_000));
        assert_eq!(parse_time_bound("yesterday"), None);
        for absurd in ["-1", "1e300", "inf", "NaN", "9223372036854775807", "0001-01-01T00:00:00Z"] {
            assert_eq!(parse_time_bound(absurd), None, "{absurd}");
        }
    }

    #[test]
    fn metadata_filter_parses_and_decodes() {
        let m = parse_metadata_filter("user=alice&env=dev%20box").unwrap();
        assert_eq!(m.get("env").map(String::as_str), Some("dev box"));
        let m = parse_metadata_filter("a=b&c=d").unwrap();
        assert_eq!(m.len(), 2);
        assert!(parse_metadata_filter("novalue").is_err());
    }

    #[test]
    fn url_decoding_is_lenient() {
        assert_eq!(url_decode("a%2Fb+c%"), "a/b c%");
        assert_eq!(url_decode("%zz"), "%zz");
    }
}
