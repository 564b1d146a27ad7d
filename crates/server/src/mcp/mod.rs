//! MCP (Model Context Protocol) at `/mcp` on `ringfence serve`: streamable HTTP, JSON-RPC 2.0.
//!
//! Hand-written rather than built on `rmcp`: the surface is four methods (`initialize`, `ping`,
//! `tools/list`, `tools/call`) answered with plain JSON (the streamable-HTTP transport lets a
//! server answer a POST with `application/json` instead of an SSE stream), and pulling in an
//! SDK, its macros and schema generator cost more build time on our two CI cores than the
//! ~400 lines here. The server is stateless: no `Mcp-Session-Id` is issued, so any replica
//! (or a restarted server) answers any request.
//!
//! Every tool is carried out by sending the equivalent E2B request through the same router the
//! E2B SDKs reach (see [`tools`]): the same authentication, validation, quota, tenant
//! isolation and audit trail apply, and there is no second copy of any of it here.

pub mod stdio;
pub mod tools;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::{Value, json};

use crate::api::App;

/// Protocol revisions this server speaks, newest first.
pub const PROTOCOL_VERSIONS: &[&str] = &["2025-11-25", "2025-06-18", "2025-03-26", "2024-11-05"];

/// Largest JSON-RPC message accepted (a `write_file` carries the file inline).
const MAX_MESSAGE: usize = 32 << 20;

/// JSON-RPC error codes.
const PARSE_ERROR: i64 = -32700;
pub(crate) const INVALID_REQUEST: i64 = -32600;
pub(crate) const METHOD_NOT_FOUND: i64 = -32601;
pub(crate) const INVALID_PARAMS: i64 = -32602;
/// Ours (the implementation-defined range): the API key is missing or wrong.
const UNAUTHORIZED: i64 = -32001;

#[derive(Debug, Clone)]
struct McpState {
    app: App,
    /// The E2B API router every tool call goes through.
    api: Router,
}

/// The `/mcp` route, to be merged beside `api` (the E2B router it dispatches tool calls to).
pub fn routes(app: App, api: Router) -> Router {
    Router::new()
        .route("/mcp", post(handle).get(not_streaming).delete(not_streaming))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_MESSAGE))
        .with_state(McpState { app, api })
}

/// No server-initiated stream (GET) and no sessions to end (DELETE): the transport's answer
/// for a server that offers neither is 405.
async fn not_streaming() -> Response {
    (StatusCode::METHOD_NOT_ALLOWED, [(axum::http::header::ALLOW, "POST")]).into_response()
}

/// The API key of an MCP request: `X-API-Key`, or `Authorization: Bearer` (what MCP clients
/// configured with a token send).
pub fn api_key(headers: &HeaderMap) -> Option<String> {
    let bearer = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    headers.get("x-api-key").and_then(|v| v.to_str().ok()).or(bearer).map(str::to_string)
}

fn rpc_error(id: Value, code: i64, message: impl Into<String>) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "error": {"code": code, "message": message.into()}})
}

fn json_response(status: StatusCode, v: &Value) -> Response {
    (status, [(axum::http::header::CONTENT_TYPE, "application/json")], v.to_string())
        .into_response()
}

async fn handle(State(s): State<McpState>, headers: HeaderMap, body: Bytes) -> Response {
    // Authenticated before anything is parsed: an unauthenticated caller learns nothing.
    let Some(key) = api_key(&headers) else {
        return json_response(
            StatusCode::UNAUTHORIZED,
            &rpc_error(Value::Null, UNAUTHORIZED, "missing X-API-Key or Authorization: Bearer"),
        );
    };
    if let Err(e) = crate::api::caller(&s.app, &headers).await {
        return json_response(
            e.status(),
            &rpc_error(Value::Null, UNAUTHORIZED, e.message().to_string()),
        );
    }
    let msg: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            return json_response(
                StatusCode::BAD_REQUEST,
                &rpc_error(Value::Null, PARSE_ERROR, format!("invalid JSON: {e}")),
            );
        }
    };
    let ctx = tools::Ctx { api: s.api.clone(), key };
    match msg {
        Value::Array(batch) if !batch.is_empty() => {
            let mut out = Vec::new();
            for m in batch {
                if let Some(r) = one(&ctx, m).await {
                    out.push(r);
                }
            }
            if out.is_empty() {
                StatusCode::ACCEPTED.into_response()
            } else {
                json_response(StatusCode::OK, &Value::Array(out))
            }
        }
        m => match one(&ctx, m).await {
            Some(r) => json_response(StatusCode::OK, &r),
            // Notifications and responses: accepted, nothing to say.
            None => StatusCode::ACCEPTED.into_response(),
        },
    }
}

/// Answers one JSON-RPC message; `None` for a notification or a response.
pub(crate) async fn one(ctx: &tools::Ctx, msg: Value) -> Option<Value> {
    let Value::Object(m) = msg else {
        return Some(rpc_error(Value::Null, INVALID_REQUEST, "a JSON-RPC message is an object"));
    };
    let method = m.get("method").and_then(Value::as_str);
    let id = m.get("id").cloned();
    let (Some(method), Some(id)) = (method, id) else {
        if m.get("method").is_some_and(|v| !v.is_string()) {
            return Some(rpc_error(Value::Null, INVALID_REQUEST, "method must be a string"));
        }
        return None;
    };
    let params = m.get("params").cloned().unwrap_or(Value::Null);
    let result = match method {
        "initialize" => Ok(initialize(&params)),
        "ping" => Ok(json!({})),
        "tools/list" => Ok(json!({"tools": tools::list()})),
        "tools/call" => tools::call(ctx, &params).await,
        other => Err((METHOD_NOT_FOUND, format!("unknown method {other:?}"))),
    };
    Some(match result {
        Ok(r) => json!({"jsonrpc": "2.0", "id": id, "result": r}),
        Err((code, message)) => rpc_error(id, code, message),
    })
}

fn initialize(params: &Value) -> Value {
    // The client's revision when we speak it, else our newest (the client then decides).
    let asked = params.get("protocolVersion").and_then(Value::as_str);
    let version = asked.filter(|v| PROTOCOL_VERSIONS.contains(v)).unwrap_or(PROTOCOL_VERSIONS[0]);
    json!({
        "protocolVersion": version,
        "capabilities": {"tools": {"listChanged": false}},
        "serverInfo": {"name": "ringfence", "version": env!("CARGO_PKG_VERSION")},
        "instructions": "Ringfence sandboxes: create_sandbox, then run_command / run_code \
            (template code-interpreter-v1) / read_file / write_file / list_files, and \
            kill_sandbox when done. Everything runs isolated and is audited.",
    })
}

#[cfg(test)]
mod tests;
