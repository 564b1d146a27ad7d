//! Secrets, in E2B's shapes: `/secrets` (create, list, get, update, destroy; API key), values
//! write-only. Sealing and the egress lookup are the core's (`ringfence_core::secrets`).

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

pub use ringfence_core::secrets::{Vault, VaultError, default_key_path, lookup};

use crate::api::{App, caller};
use crate::e2b_error::E2bError;
use crate::store::{SecretRecord, StoreError};

const MAX_VALUE: usize = 16 * 1024;
const MAX_META_ENTRIES: usize = 32;

fn bad(msg: impl Into<String>) -> E2bError {
    E2bError::invalid(msg)
}

/// E2B's rule (`e2b/secret/base.py`): a name goes into `${e2b.secrets.<name>}`, so no braces
/// or control characters; names are lower-cased; `sec_` is the ids' prefix.
fn check_name(name: &str) -> Result<String, E2bError> {
    let n = name.to_lowercase();
    if n.is_empty() || n.len() > 128 {
        return Err(bad("secret name must be 1 to 128 characters"));
    }
    if n.chars().any(|c| c == '{' || c == '}' || c.is_control()) {
        return Err(bad(format!(
            "secret name {name:?} cannot contain '{{', '}}' or control characters: it goes into \
             the ${{e2b.secrets.<name>}} placeholder"
        )));
    }
    if n.starts_with("sec_") {
        return Err(bad("the sec_ prefix is reserved for secret ids"));
    }
    Ok(n)
}

/// A value goes into HTTP header values: no line breaks or other control characters (which
/// would let it add headers of its own), at most 16 KiB.
fn check_value(v: &str) -> Result<(), E2bError> {
    if v.is_empty() || v.len() > MAX_VALUE {
        return Err(bad(format!("secret value must be 1 to {MAX_VALUE} bytes")));
    }
    if v.chars().any(|c| c.is_control() && c != '\t') {
        return Err(bad(
            "secret value cannot contain control characters (it is sent in HTTP headers)",
        ));
    }
    Ok(())
}

fn check_meta(m: &BTreeMap<String, String>) -> Result<(), E2bError> {
    let total: usize = m.iter().map(|(k, v)| k.len() + v.len()).sum();
    if m.len() > MAX_META_ENTRIES
        || m.iter().any(|(k, v)| k.len() > 128 || v.len() > 1024)
        || total > 8192
    {
        return Err(bad(
            "secret metadata: at most 32 entries, keys 128 bytes, values 1024, 8192 in all",
        ));
    }
    Ok(())
}

fn iso(ms: i64) -> String {
    crate::time::rfc3339_ms(ms)
}

/// E2B's `Secret` model: never the value.
fn secret_json(s: &SecretRecord) -> Value {
    json!({
        "secretID": s.id,
        "name": s.name,
        "currentVersion": s.version,
        "metadata": s.metadata,
        "createdAt": iso(s.created_at),
        "updatedAt": iso(s.updated_at),
    })
}

fn not_found(which: &str) -> E2bError {
    E2bError::not_found(format!("secret {which:?} not found"))
}

fn vault(app: &App) -> Result<Arc<Vault>, E2bError> {
    app.manager
        .vault()
        .ok_or_else(|| E2bError::unavailable("secrets are not available on this server"))
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, E2bError> {
    tokio::task::spawn_blocking(f).await.map_err(E2bError::internal)?.map_err(|e| match e {
        StoreError::InvalidName(m) => E2bError::conflict(m),
        other => E2bError::internal(other),
    })
}

/// An audit record of a change to secret `s` by `key`: its id, name and version, never the
/// value.
async fn audit(app: &App, action: &str, key: &str, s: &SecretRecord) {
    let mut rec = crate::store::AuditRecord::new(action, crate::manager::now_ms());
    rec.user_id = Some(key.to_string());
    rec.detail.insert("secret_id".into(), json!(s.id));
    rec.detail.insert("name".into(), json!(s.name));
    rec.detail.insert("version".into(), json!(s.version));
    app.manager.observer().record(rec).await;
}

#[derive(Debug, Default, Deserialize)]
pub struct NewSecret {
    name: Option<String>,
    value: Option<String>,
    metadata: Option<BTreeMap<String, String>>,
}

/// `POST /secrets`: 201 with the secret's metadata.
pub async fn create(
    State(app): State<App>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, E2bError> {
    let key = caller(&app, &headers).await?;
    let vault = vault(&app)?;
    let b: NewSecret = crate::api::parse_body(&body)?;
    let name = check_name(&b.name.ok_or_else(|| bad("name is required"))?)?;
    let value = b.value.ok_or_else(|| bad("value is required"))?;
    check_value(&value)?;
    let metadata = b.metadata.unwrap_or_default();
    check_meta(&metadata)?;
    let now = crate::manager::now_ms();
    let mut rec = SecretRecord {
        id: format!("sec_{}", hex::encode(rand::random::<[u8; 10]>())),
        key_id: key.id,
        name,
        version: 1,
        metadata,
        sealed: Vec::new(),
        created_at: now,
        updated_at: now,
    };
    rec.sealed = vault.seal(&rec, value.as_bytes()).map_err(E2bError::internal)?;
    let (store, saved) = (app.manager.store().clone(), rec.clone());
    blocking(move || store.insert_secret(&saved)).await?;
    audit(&app, "secret.create", &rec.key_id, &rec).await;
    Ok((StatusCode::CREATED, Json(secret_json(&rec))).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ListQuery {
    limit: Option<usize>,
    next_token: Option<String>,
}

/// `GET /secrets?limit&nextToken`: a page, with `x-next-token` when more follow.
pub async fn list(
    State(app): State<App>,
    headers: HeaderMap,
    Query(q): Query<ListQuery>,
) -> Result<Response, E2bError> {
    let key = caller(&app, &headers).await?;
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    let store = app.manager.store().clone();
    let after = q.next_token.clone();
    let mut page =
        blocking(move || store.list_secrets(&key.id, after.as_deref(), limit + 1)).await?;
    let more = page.len() > limit;
    page.truncate(limit);
    let mut resp = Json(Value::Array(page.iter().map(secret_json).collect())).into_response();
    if more
        && let Some(last) = page.last()
        && let Ok(v) = HeaderValue::from_str(&last.id)
    {
        resp.headers_mut().insert("x-next-token", v);
    }
    Ok(resp)
}

/// `GET /secrets/{id or name}`.
pub async fn get(
    State(app): State<App>,
    headers: HeaderMap,
    Path(which): Path<String>,
) -> Result<Json<Value>, E2bError> {
    let key = caller(&app, &headers).await?;
    let (store, w) = (app.manager.store().clone(), which.clone());
    let s =
        blocking(move || store.get_secret(&key.id, &w)).await?.ok_or_else(|| not_found(&which))?;
    Ok(Json(secret_json(&s)))
}

#[derive(Debug, Default, Deserialize)]
pub struct SecretUpdate {
    value: Option<String>,
    metadata: Option<BTreeMap<String, String>>,
}

/// `POST /secrets/{id or name}`: a new version (and metadata, when given).
pub async fn update(
    State(app): State<App>,
    headers: HeaderMap,
    Path(which): Path<String>,
    body: axum::body::Bytes,
) -> Result<Json<Value>, E2bError> {
    let key = caller(&app, &headers).await?;
    let vault = vault(&app)?;
    let b: SecretUpdate = crate::api::parse_body(&body)?;
    let value = b.value.ok_or_else(|| bad("value is required"))?;
    check_value(&value)?;
    if let Some(m) = &b.metadata {
        check_meta(m)?;
    }
    let (store, w, k) = (app.manager.store().clone(), which.clone(), key.id.clone());
    let mut s =
        blocking(move || store.get_secret(&k, &w)).await?.ok_or_else(|| not_found(&which))?;
    s.version += 1;
    s.updated_at = crate::manager::now_ms();
    if let Some(m) = b.metadata {
        s.metadata = m;
    }
    s.sealed = vault.seal(&s, value.as_bytes()).map_err(E2bError::internal)?;
    let (store, saved) = (app.manager.store().clone(), s.clone());
    if !blocking(move || store.update_secret(&saved)).await? {
        return Err(E2bError::conflict(format!(
            "secret {which:?} changed or was deleted meanwhile; retry"
        )));
    }
    audit(&app, "secret.update", &s.key_id, &s).await;
    Ok(Json(secret_json(&s)))
}

/// `DELETE /secrets/{id or name}`: 204, or 404. Sandboxes whose rules name it get no value
/// from then on (their requests to that host are refused, not sent without it).
pub async fn destroy(
    State(app): State<App>,
    headers: HeaderMap,
    Path(which): Path<String>,
) -> Result<StatusCode, E2bError> {
    let key = caller(&app, &headers).await?;
    let (store, w, k) = (app.manager.store().clone(), which.clone(), key.id.clone());
    let Some(found) = blocking(move || store.get_secret(&k, &w)).await? else {
        return Err(not_found(&which));
    };
    let (store, id, k) = (app.manager.store().clone(), found.id.clone(), key.id.clone());
    if blocking(move || store.delete_secret(&k, &id)).await? {
        audit(&app, "secret.destroy", &key.id, &found).await;
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(not_found(&which))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn names_and_values_that_could_break_a_header_are_refused() {
        assert!(check_name("OpenAI-Key").is_ok_and(|n| n == "openai-key"));
        assert!(check_name("a}b").is_err());
        assert!(check_name("sec_x").is_err());
        assert!(check_value("line\r\nX-Injected: 1").is_err());
        assert!(check_value("").is_err());
        assert!(check_value("sk-abc\tdef").is_ok());
    }
}
