//! The rest of E2B's sandbox routes the SDK carries: `POST /sandboxes/{id}/refreshes`,
//! `GET /sandboxes/{id}/logs` and `GET /v2/sandboxes/{id}/logs`, and `Idempotency-Key` on
//! create.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::api::{App, caller};
use crate::e2b_error::E2bError;
use crate::store::{AuditQuery, AuditRecord};

#[derive(Debug, Default, Deserialize)]
pub struct RefreshBody {
    duration: Option<i64>,
}

/// `POST /sandboxes/{id}/refreshes` with `{duration}` (seconds, 0–3600): keeps the sandbox
/// alive at least that long from now; never shortens it. 204.
pub async fn refresh(
    State(app): State<App>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<StatusCode, E2bError> {
    let key = caller(&app, &headers).await?;
    let b: RefreshBody = crate::api::parse_body(&body)?;
    let secs = b.duration.unwrap_or(app.manager.config().default_timeout.as_secs() as i64);
    if !(0..=3600).contains(&secs) {
        return Err(E2bError::invalid(format!(
            "duration must be between 0 and 3600 seconds, got {secs}"
        )));
    }
    let live = app
        .manager
        .get(&id)
        .filter(|l| l.record.lock().is_ok_and(|r| r.key_id == key.id))
        .ok_or_else(|| E2bError::not_found(format!("sandbox {id:?} not found")))?;
    let want = crate::manager::deadline_after(Duration::from_secs(secs as u64));
    if live.record.lock().is_ok_and(|r| r.end_at < want) {
        app.manager.set_timeout(&id, Duration::from_secs(secs as u64))?;
    }
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Default, Deserialize)]
pub struct LogsQuery {
    start: Option<i64>,
    cursor: Option<i64>,
    limit: Option<u32>,
    direction: Option<String>,
    level: Option<String>,
    search: Option<String>,
}

/// An audit record as one of E2B's log entries: what ran in (or happened to) the sandbox.
fn entry(r: &AuditRecord) -> Value {
    let level = if r.action.starts_with("security.") || r.action.starts_with("alert.") {
        "warn"
    } else {
        "info"
    };
    let mut message = r.action.clone();
    for k in ["cmd", "command", "reason", "template"] {
        if let Some(v) = r.detail.get(k).and_then(Value::as_str) {
            message.push_str(&format!(" {k}={v:?}"));
        }
    }
    if let Some(code) = r.exit_code {
        message.push_str(&format!(" exit_code={code}"));
    }
    let mut fields = serde_json::Map::new();
    fields.insert("action".into(), json!(r.action));
    for (k, v) in &r.detail {
        fields.insert(k.clone(), json!(v.as_str().map_or_else(|| v.to_string(), str::to_string)));
    }
    json!({"timestamp": r.timestamp, "level": level, "message": message, "fields": fields})
}

/// The caller's sandbox's records, from `since_ms` on, oldest first (at most 1000).
async fn records(
    app: &App,
    headers: &HeaderMap,
    id: &str,
    since_ms: Option<i64>,
) -> Result<Vec<AuditRecord>, E2bError> {
    let key = caller(app, headers).await?;
    let store = app.manager.store().clone();
    let sid = id.to_string();
    let owned = tokio::task::spawn_blocking(move || store.get_sandbox(&sid))
        .await
        .map_err(E2bError::internal)?
        .map_err(E2bError::internal)?
        .is_some_and(|r| r.key_id == key.id);
    if !owned {
        return Err(E2bError::not_found(format!("sandbox {id:?} not found")));
    }
    let q = AuditQuery {
        key_id: Some(key.id),
        sandbox_id: Some(id.to_string()),
        since_ms,
        limit: 1000,
        ..AuditQuery::default()
    };
    let store = app.manager.store().clone();
    let (recs, _) = tokio::task::spawn_blocking(move || store.query_audit(&q))
        .await
        .map_err(E2bError::internal)?
        .map_err(E2bError::from)?;
    Ok(recs)
}

/// `GET /sandboxes/{id}/logs?start=&limit=` (v1): `logs` (timestamp, line) and `logEntries`.
pub async fn logs_v1(
    State(app): State<App>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<LogsQuery>,
) -> Result<Json<Value>, E2bError> {
    let recs = records(&app, &headers, &id, q.start).await?;
    let limit = q.limit.unwrap_or(1000).min(1000) as usize;
    let entries: Vec<Value> = recs.iter().take(limit).map(entry).collect();
    // A v1 `line` is a JSON object in text, as E2B's envd logs are: E2B's CLI
    // (`e2b sandbox logs`) parses it and reads `level` and `logger`.
    let lines: Vec<Value> = entries
        .iter()
        .map(|e| {
            let mut obj = e["fields"].as_object().cloned().unwrap_or_default();
            obj.insert("level".into(), e["level"].clone());
            obj.insert("logger".into(), json!("ringfence.audit"));
            obj.insert("message".into(), e["message"].clone());
            json!({"timestamp": e["timestamp"], "line": Value::Object(obj).to_string()})
        })
        .collect();
    Ok(Json(json!({"logs": lines, "logEntries": entries})))
}

/// `GET /v2/sandboxes/{id}/logs?cursor=&limit=&direction=&level=&search=`.
pub async fn logs_v2(
    State(app): State<App>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<LogsQuery>,
) -> Result<Json<Value>, E2bError> {
    let backward = match q.direction.as_deref() {
        None | Some("forward") => false,
        Some("backward") => true,
        Some(other) => {
            return Err(E2bError::invalid(format!(
                "direction must be forward or backward, got {other:?}"
            )));
        }
    };
    let min_level = match q.level.as_deref() {
        None | Some("debug") | Some("info") => 0,
        Some("warn") => 1,
        Some("error") => 2,
        Some(other) => {
            return Err(E2bError::invalid(format!(
                "level must be debug, info, warn or error, got {other:?}"
            )));
        }
    };
    let since = if backward { None } else { q.cursor };
    let mut recs = records(&app, &headers, &id, since).await?;
    if backward {
        if let Some(c) = q.cursor {
            recs.retain(|r| r.ts_ms <= c);
        }
        recs.reverse();
    }
    let limit = q.limit.unwrap_or(1000).min(1000) as usize;
    let out: Vec<Value> = recs
        .iter()
        .map(entry)
        .filter(|e| min_level == 0 || (min_level == 1 && e["level"] == "warn"))
        .filter(|e| {
            q.search.as_deref().is_none_or(|s| e["message"].as_str().is_some_and(|m| m.contains(s)))
        })
        .take(limit)
        .collect();
    Ok(Json(json!({"logs": out})))
}

/// Whether the sandbox's agent answers within 2 s (E2B's `requireHealthyGuest`).
pub async fn guest_answers(live: &crate::manager::Live) -> bool {
    let call = live.client.call(ringfence_proto::Request::ListProcesses);
    matches!(
        tokio::time::timeout(Duration::from_secs(2), call).await,
        Ok(Ok(ringfence_proto::Reply::Processes(_)))
    )
}

// ---- Idempotency-Key on create ---------------------------------------------------------

/// How long a create's `Idempotency-Key` names its sandbox.
pub const IDEMPOTENCY_WINDOW_MS: i64 = 24 * 3600 * 1000;

/// A create under an `Idempotency-Key`: holds the key's lock until the create is recorded, so
/// a retry sent while the first is still starting waits for it instead of making another.
#[derive(Debug)]
pub struct Idempotent {
    key: Option<(String, String)>,
    _held: Option<tokio::sync::OwnedMutexGuard<()>>,
}

fn lock_for(k: &str) -> Arc<tokio::sync::Mutex<()>> {
    static LOCKS: OnceLock<Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>> = OnceLock::new();
    let mut m = LOCKS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if m.len() > 1024 {
        m.retain(|_, l| Arc::strong_count(l) > 1);
    }
    m.entry(k.to_string()).or_default().clone()
}

impl Idempotent {
    /// Takes the request's `Idempotency-Key` (1–255 of `a-z0-9-`, E2B's rule) and returns the
    /// sandbox an earlier create under it made, if any (within the window).
    pub async fn begin(
        app: &App,
        key_id: &str,
        headers: &HeaderMap,
    ) -> Result<(Idempotent, Option<String>), E2bError> {
        let Some(raw) = headers.get("idempotency-key") else {
            return Ok((Idempotent { key: None, _held: None }, None));
        };
        let k = raw.to_str().unwrap_or("");
        let valid = (1..=255).contains(&k.len())
            && k.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !valid {
            return Err(E2bError::invalid(
                "Idempotency-Key must be 1 to 255 characters of a-z, 0-9 and '-'",
            ));
        }
        let held = lock_for(&format!("{key_id}\n{k}")).lock_owned().await;
        let store = app.manager.store().clone();
        let (kid, kk) = (key_id.to_string(), k.to_string());
        let since = crate::manager::now_ms() - IDEMPOTENCY_WINDOW_MS;
        let earlier =
            tokio::task::spawn_blocking(move || store.idempotent_sandbox(&kid, &kk, since))
                .await
                .map_err(E2bError::internal)?
                .map_err(E2bError::internal)?;
        Ok((
            Idempotent { key: Some((key_id.to_string(), k.to_string())), _held: Some(held) },
            earlier,
        ))
    }

    /// Records the sandbox a create under this key made.
    pub async fn record(self, app: &App, sandbox_id: &str) -> Result<(), E2bError> {
        let Some((kid, k)) = self.key else { return Ok(()) };
        let store = app.manager.store().clone();
        let sid = sandbox_id.to_string();
        let now = crate::manager::now_ms();
        tokio::task::spawn_blocking(move || store.record_idempotent(&kid, &k, &sid, now))
            .await
            .map_err(E2bError::internal)?
            .map_err(E2bError::internal)?;
        Ok(())
    }
}

/// The reply a retried create gets: the first one's sandbox, as create described it.
pub fn replay(app: &App, key_id: &str, sandbox_id: &str) -> Result<Response, E2bError> {
    let rec = match app.manager.get(sandbox_id).and_then(|l| l.snapshot()) {
        Some(r) => r,
        None => app
            .manager
            .store()
            .get_sandbox(sandbox_id)
            .map_err(E2bError::internal)?
            .ok_or_else(|| E2bError::not_found("the sandbox of this Idempotency-Key is gone"))?,
    };
    if rec.key_id != key_id {
        return Err(E2bError::not_found("unknown Idempotency-Key"));
    }
    let mut v = crate::api::sandbox_json(&rec);
    v["domain"] = json!(app.manager.network().domain());
    Ok((StatusCode::CREATED, Json(v)).into_response())
}
