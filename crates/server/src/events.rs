//! Sandbox lifecycle events (`GET /events/sandboxes[/{id}]`) and webhooks
//! (`/events/webhooks`), in E2B's shapes.
//!
//! Events are published by the store in the same transaction as the state change that causes
//! them, and each delivery is queued there too (the outbox, `SCHEMA_V7`). [`delivery_loop`]
//! sends what is due, signed as E2B signs (`e2b-signature`: unpadded base64 of
//! sha256(secret ‖ body)), retries failures with exponential backoff, and settles a delivery
//! only once the receiver answered 2xx: at least once, across restarts and `kill -9`.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::api::{App, caller};
use crate::e2b_error::E2bError;
use crate::store::{Attempt, DueDelivery, LifecycleEvent, Store, Webhook};

/// Every event type a webhook may subscribe to.
pub const EVENT_TYPES: [&str; 6] = [
    "sandbox.lifecycle.created",
    "sandbox.lifecycle.updated",
    "sandbox.lifecycle.paused",
    "sandbox.lifecycle.resumed",
    "sandbox.lifecycle.checkpointed",
    "sandbox.lifecycle.killed",
];

/// Attempts before a delivery is given up (marked `failed`): about an hour of backoff.
const MAX_ATTEMPTS: u32 = 16;
/// The first retry's delay; each further one doubles, up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// How long one attempt may take, connect to answer.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the outbox is looked at.
const POLL: Duration = Duration::from_millis(250);
/// Deliveries sent at once.
const BATCH: u32 = 32;
/// How long events (and their deliveries) are kept.
const RETENTION: Duration = Duration::from_secs(30 * 24 * 3600);

/// Why a lifecycle event happened, from what the server recorded with it.
fn cause(e: &LifecycleEvent) -> &'static str {
    let d = &e.detail;
    if let Some(c) = d.get("cause").and_then(Value::as_str) {
        return match c {
            "timeout" => "timeout",
            "idle" => "idle",
            "memory_pressure" => "memory_pressure",
            "traffic" => "traffic",
            "error" => "error",
            _ => "api",
        };
    }
    match d.get("reason").and_then(Value::as_str) {
        Some("timeout") => "timeout",
        Some("idle") => "idle",
        Some("server shutdown") => "shutdown",
        Some("agent exited") | Some("agent gone after server restart") => "error",
        _ => "api",
    }
}

/// The event in E2B's shape. The same event always renders to the same bytes: a retried
/// delivery carries the same body and signature.
pub fn event_json(e: &LifecycleEvent) -> Value {
    let mut data = Map::new();
    let why = cause(e);
    data.insert("cause".into(), json!(why));
    if why == "api" {
        // Only the owner's key may act on a sandbox: the key that called is the owner's.
        data.insert("api_key_id".into(), json!(e.key_id));
    }
    if let Some(r) = e.detail.get("reason") {
        data.insert("reason".into(), r.clone());
    }
    match e.kind.as_str() {
        "sandbox.lifecycle.created" => {
            data.insert("sandbox_metadata".into(), json!(e.metadata));
        }
        "sandbox.lifecycle.paused" | "sandbox.lifecycle.resumed" => {
            if let Some(m) = e.detail.get("memory") {
                data.insert("memory".into(), m.clone());
            }
        }
        "sandbox.lifecycle.checkpointed" => {
            if let Some(s) = e.detail.get("snapshot") {
                data.insert("snapshot_id".into(), s.clone());
            }
        }
        "sandbox.lifecycle.updated" => {
            if let Some(t) = e.detail.get("end_at").and_then(Value::as_i64) {
                data.insert("set_timeout".into(), json!(crate::time::rfc3339_ms(t)));
            }
            if let Some(n) = e.detail.get("network") {
                data.insert("network".into(), n.clone());
            }
        }
        _ => {}
    }
    json!({
        "version": "v1",
        "id": e.id,
        "type": e.kind,
        "eventData": data,
        "sandboxBuildId": e.template,
        "sandboxExecutionId": e.sandbox_id,
        "sandboxId": e.sandbox_id,
        "sandboxTeamId": e.key_id,
        "sandboxTemplateId": e.template,
        "timestamp": crate::time::rfc3339_ms(e.ts_ms),
    })
}

/// E2B's webhook signature: unpadded standard base64 of sha256(secret ‖ body).
pub fn signature(secret: &str, body: &[u8]) -> String {
    use base64::Engine;
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(secret.as_bytes());
    h.update(body);
    base64::engine::general_purpose::STANDARD_NO_PAD.encode(h.finalize())
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EventsQuery {
    offset: Option<u32>,
    limit: Option<u32>,
    order_asc: Option<bool>,
}

async fn events(
    app: &App,
    headers: &HeaderMap,
    sandbox: Option<String>,
    q: EventsQuery,
) -> Result<Json<Value>, E2bError> {
    let key = caller(app, headers).await?;
    let limit = q.limit.unwrap_or(10);
    if !(1..=100).contains(&limit) {
        return Err(E2bError::invalid("limit must be between 1 and 100"));
    }
    let store = app.manager.store().clone();
    let rows = tokio::task::spawn_blocking(move || {
        store.lifecycle_events(
            &key.id,
            sandbox.as_deref(),
            q.offset.unwrap_or(0),
            limit,
            q.order_asc.unwrap_or(false),
        )
    })
    .await
    .map_err(E2bError::internal)?
    .map_err(E2bError::from)?;
    Ok(Json(Value::Array(rows.iter().map(event_json).collect())))
}

/// `GET /events/sandboxes`: the caller's sandboxes' events, newest first by default.
pub async fn team_events(
    State(app): State<App>,
    headers: HeaderMap,
    Query(q): Query<EventsQuery>,
) -> Result<Json<Value>, E2bError> {
    events(&app, &headers, None, q).await
}

/// `GET /events/sandboxes/{id}`: one sandbox's events (empty for another key's sandbox, as
/// for an unknown one: ids must not be probed).
pub async fn sandbox_events(
    State(app): State<App>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<EventsQuery>,
) -> Result<Json<Value>, E2bError> {
    events(&app, &headers, Some(id), q).await
}

fn webhook_json(w: &Webhook) -> Value {
    json!({
        "id": w.id,
        "teamID": w.key_id,
        "name": w.name,
        "createdAt": crate::time::rfc3339_ms(w.created_at),
        "enabled": w.enabled,
        "url": w.url,
        "events": w.events,
    })
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WebhookBody {
    name: Option<String>,
    url: Option<String>,
    enabled: Option<bool>,
    events: Option<Vec<String>>,
    signature_secret: Option<String>,
}

fn bad(msg: impl Into<String>) -> E2bError {
    E2bError::invalid(msg)
}

/// Applies `b` to `w`, checking each field given.
fn apply(w: &mut Webhook, b: WebhookBody) -> Result<(), E2bError> {
    if let Some(n) = b.name {
        if n.is_empty() || n.len() > 256 {
            return Err(bad("name must be 1 to 256 characters"));
        }
        w.name = n;
    }
    if let Some(u) = b.url {
        parse_url(&u).map_err(bad)?;
        w.url = u;
    }
    if let Some(e) = b.enabled {
        w.enabled = e;
    }
    if let Some(ev) = b.events {
        if let Some(unknown) = ev.iter().find(|e| !EVENT_TYPES.contains(&e.as_str())) {
            return Err(bad(format!(
                "unknown event type {unknown:?}: expected one of {}",
                EVENT_TYPES.join(", ")
            )));
        }
        w.events = ev;
    }
    if let Some(s) = b.signature_secret {
        if s.is_empty() || s.len() > 1024 {
            return Err(bad("signatureSecret must be 1 to 1024 characters"));
        }
        w.secret = s;
    }
    Ok(())
}

/// `POST /events/webhooks`: registers a webhook (201 with it, secret left out).
pub async fn create_webhook(
    State(app): State<App>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, E2bError> {
    let key = caller(&app, &headers).await?;
    let b: WebhookBody = crate::api::parse_body(&body)?;
    for (field, given) in
        [("url", b.url.is_some()), ("signatureSecret", b.signature_secret.is_some())]
    {
        if !given {
            return Err(bad(format!("{field} is required")));
        }
    }
    let mut w = Webhook {
        id: random_id(),
        key_id: key.id,
        name: "webhook".into(),
        url: String::new(),
        enabled: true,
        events: EVENT_TYPES.iter().map(|s| s.to_string()).collect(),
        secret: String::new(),
        created_at: crate::manager::now_ms(),
    };
    apply(&mut w, b)?;
    let store = app.manager.store().clone();
    let saved = w.clone();
    tokio::task::spawn_blocking(move || store.insert_webhook(&saved))
        .await
        .map_err(E2bError::internal)?
        .map_err(E2bError::internal)?;
    Ok((StatusCode::CREATED, Json(webhook_json(&w))).into_response())
}

async fn load(app: &App, key_id: &str, id: &str) -> Result<Webhook, E2bError> {
    let store = app.manager.store().clone();
    let (k, i) = (key_id.to_string(), id.to_string());
    tokio::task::spawn_blocking(move || store.get_webhook(&k, &i))
        .await
        .map_err(E2bError::internal)?
        .map_err(E2bError::internal)?
        .ok_or_else(|| E2bError::not_found(format!("webhook {id:?} not found")))
}

/// `GET /events/webhooks`.
pub async fn list_webhooks(
    State(app): State<App>,
    headers: HeaderMap,
) -> Result<Json<Value>, E2bError> {
    let key = caller(&app, &headers).await?;
    let store = app.manager.store().clone();
    let list = tokio::task::spawn_blocking(move || store.list_webhooks(&key.id))
        .await
        .map_err(E2bError::internal)?
        .map_err(E2bError::internal)?;
    Ok(Json(Value::Array(list.iter().map(webhook_json).collect())))
}

/// `GET /events/webhooks/{id}`.
pub async fn get_webhook(
    State(app): State<App>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Value>, E2bError> {
    let key = caller(&app, &headers).await?;
    Ok(Json(webhook_json(&load(&app, &key.id, &id).await?)))
}

/// `PATCH /events/webhooks/{id}`: changes the fields given.
pub async fn update_webhook(
    State(app): State<App>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Json<Value>, E2bError> {
    let key = caller(&app, &headers).await?;
    let b: WebhookBody = crate::api::parse_body(&body)?;
    let mut w = load(&app, &key.id, &id).await?;
    apply(&mut w, b)?;
    let store = app.manager.store().clone();
    let saved = w.clone();
    tokio::task::spawn_blocking(move || store.update_webhook(&saved))
        .await
        .map_err(E2bError::internal)?
        .map_err(E2bError::internal)?;
    Ok(Json(webhook_json(&w)))
}

/// `DELETE /events/webhooks/{id}`: its pending deliveries go with it.
pub async fn delete_webhook(
    State(app): State<App>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<StatusCode, E2bError> {
    let key = caller(&app, &headers).await?;
    let store = app.manager.store().clone();
    let i = id.clone();
    let gone = tokio::task::spawn_blocking(move || store.delete_webhook(&key.id, &i))
        .await
        .map_err(E2bError::internal)?
        .map_err(E2bError::internal)?;
    if !gone {
        return Err(E2bError::not_found(format!("webhook {id:?} not found")));
    }
    Ok(StatusCode::OK)
}

#[derive(Debug, Default, Deserialize)]
pub struct DeliveriesQuery {
    limit: Option<u32>,
}

/// `GET /events/webhooks/{id}/deliveries` (our extension): the delivery log, newest first.
pub async fn deliveries(
    State(app): State<App>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<DeliveriesQuery>,
) -> Result<Json<Value>, E2bError> {
    let key = caller(&app, &headers).await?;
    load(&app, &key.id, &id).await?;
    let store = app.manager.store().clone();
    let limit = q.limit.unwrap_or(100);
    let list = tokio::task::spawn_blocking(move || store.deliveries(&key.id, &id, limit))
        .await
        .map_err(E2bError::internal)?
        .map_err(E2bError::from)?;
    Ok(Json(json!(list)))
}

fn random_id() -> String {
    use rand::Rng;
    let b: [u8; 16] = rand::rng().random();
    let h = hex::encode(b);
    format!("{}-{}-{}-{}-{}", &h[..8], &h[8..12], &h[12..16], &h[16..20], &h[20..])
}

/// Where a webhook URL points: host, port and the path with its query.
#[derive(Debug, PartialEq)]
struct Target {
    host: String,
    port: u16,
    path: String,
}

/// Only `http://` URLs for now: HTTPS needs a TLS client this server does not carry yet
/// (docs/COMPATIBILITY.md).
fn parse_url(url: &str) -> Result<Target, String> {
    let uri: axum::http::Uri =
        url.parse().map_err(|e| format!("url {url:?} is not a valid URL: {e}"))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => {
            return Err(format!(
                "url {url:?}: https webhooks are not supported yet; use http:// (see docs/COMPATIBILITY.md)"
            ));
        }
        _ => return Err(format!("url {url:?} must start with http://")),
    }
    let host =
        uri.host().filter(|h| !h.is_empty()).ok_or_else(|| format!("url {url:?} has no host"))?;
    Ok(Target {
        host: host.trim_start_matches('[').trim_end_matches(']').to_string(),
        port: uri.port_u16().unwrap_or(80),
        path: uri.path_and_query().map_or("/".into(), |p| p.as_str().to_string()),
    })
}

/// Backoff before attempt `attempts + 1`, given `attempts` failed ones.
fn backoff(attempts: u32) -> Duration {
    FIRST_BACKOFF.saturating_mul(1u32 << attempts.min(20)).min(MAX_BACKOFF)
}

/// Sends one delivery; the receiver's status, or why none came.
async fn send(d: &DueDelivery) -> Result<u16, (Option<u16>, String)> {
    let t = parse_url(&d.webhook.url).map_err(|e| (None, e))?;
    let body = serde_json::to_vec(&event_json(&d.event)).map_err(|e| (None, e.to_string()))?;
    let sig = signature(&d.webhook.secret, &body);
    let attempt = async {
        let stream = tokio::net::TcpStream::connect((t.host.as_str(), t.port))
            .await
            .map_err(|e| (None, format!("connect: {e}")))?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|e| (None, format!("handshake: {e}")))?;
        tokio::spawn(conn);
        let host = if t.port == 80 { t.host.clone() } else { format!("{}:{}", t.host, t.port) };
        let req = axum::http::Request::post(t.path.as_str())
            .header("host", host)
            .header("content-type", "application/json")
            .header("user-agent", "ringfence-webhooks")
            .header("e2b-webhook-id", &d.webhook.id)
            .header("e2b-delivery-id", &d.delivery.id)
            .header("e2b-signature-version", "v1")
            .header("e2b-signature", sig)
            .body(axum::body::Body::from(body))
            .map_err(|e| (None, e.to_string()))?;
        let resp = sender.send_request(req).await.map_err(|e| (None, format!("request: {e}")))?;
        Ok::<u16, (Option<u16>, String)>(resp.status().as_u16())
    };
    let status = tokio::time::timeout(ATTEMPT_TIMEOUT, attempt)
        .await
        .map_err(|_| (None, format!("no answer within {} s", ATTEMPT_TIMEOUT.as_secs())))??;
    if (200..300).contains(&status) {
        Ok(status)
    } else {
        Err((Some(status), format!("receiver answered {status}")))
    }
}

/// Sends due deliveries forever. Pending ones left by an earlier server are due at once.
pub async fn delivery_loop(store: Arc<Store>) {
    let s = store.clone();
    let now = crate::manager::now_ms();
    if let Ok(Ok(n)) = tokio::task::spawn_blocking(move || s.retry_pending_now(now)).await
        && n > 0
    {
        tracing::info!(pending = n, "webhook deliveries left by the previous server: retrying");
    }
    let mut last_prune = 0;
    loop {
        tokio::time::sleep(POLL).await;
        let now = crate::manager::now_ms();
        if now - last_prune > 3_600_000 {
            last_prune = now;
            let (s, before) = (store.clone(), now - RETENTION.as_millis() as i64);
            let _ = tokio::task::spawn_blocking(move || s.prune_events(before)).await;
        }
        let s = store.clone();
        let due = match tokio::task::spawn_blocking(move || s.due_deliveries(now, BATCH)).await {
            Ok(Ok(d)) => d,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "reading the webhook outbox");
                continue;
            }
            Err(_) => continue,
        };
        if due.is_empty() {
            continue;
        }
        let sends = due.into_iter().map(|d| {
            let store = store.clone();
            async move {
                let attempt = match send(&d).await {
                    Ok(status) => Attempt::Delivered(status),
                    Err((status, error)) => {
                        let tried = d.delivery.attempts + 1;
                        let next_at = (tried < MAX_ATTEMPTS).then(|| {
                            crate::manager::now_ms() + backoff(d.delivery.attempts).as_millis() as i64
                        });
                        tracing::debug!(webhook = %d.webhook.id, delivery = %d.delivery.id, %error, "webhook delivery failed");
                        Attempt::Failed { status, error, next_at }
                    }
                };
                let id = d.delivery.id.clone();
                let _ = tokio::task::spawn_blocking(move || {
                    if let Err(e) = store.record_attempt(&id, &attempt) {
                        tracing::warn!(delivery = %id, error = %e, "recording a webhook attempt");
                    }
                })
                .await;
            }
        });
        futures_util::future::join_all(sends).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_is_unpadded_base64_of_sha256_of_secret_then_body() {
        // sha256("s" + "{}") computed independently (Python hashlib), base64 without '='.
        let sig = signature("s", b"{}");
        assert_eq!(sig, "20K7jJGyoJBULG3JejR3sgao028nqWw/BmRa+n3Gac8");
        assert_ne!(sig, signature("t", b"{}"));
        assert_ne!(sig, signature("s", b"{ }"));
    }

    #[test]
    fn urls_are_checked() {
        assert_eq!(
            parse_url("http://127.0.0.1:8080/hook?x=1").unwrap(),
            Target { host: "127.0.0.1".into(), port: 8080, path: "/hook?x=1".into() }
        );
        assert!(parse_url("https://example.com/").unwrap_err().contains("https"));
        assert!(parse_url("ftp://x/").is_err());
        assert!(parse_url("not a url").is_err());
    }

    #[test]
    fn backoff_doubles_and_is_capped() {
        assert_eq!(backoff(0), Duration::from_secs(1));
        assert_eq!(backoff(3), Duration::from_secs(8));
        assert_eq!(backoff(30), MAX_BACKOFF);
    }
}
