//! The code interpreter's HTTP edge: E2B's port 49999 (`/execute`, `/contexts`), served by
//! kernels running inside the sandbox (`ringfence_core::interp`: the fork server, contexts and
//! kernels).
//!
//! Kernels speak JSON lines (`interp/PROTOCOL.md`); this module turns them into E2B's NDJSON
//! stream. Kernels run user code, so each line they send is parsed as hostile input:
//! size-capped, checked against the running execution, and reduced to the message types and
//! fields E2B defines (`sanitize`).
//!
//! Cancellation: an execution whose client goes away (the SDK's `timeout` closes its dedicated
//! connection) is interrupted; a kernel that does not stop within [`INTERRUPT_GRACE`] is killed
//! and its context starts afresh on next use.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::http::{Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

pub use ringfence_core::interp::*;

use crate::bounded;
use crate::e2b_error::{E2bError, Kind};
use crate::fault::internal_message;
use crate::manager::Live;

/// Largest `/execute` or `/contexts` request body.
const MAX_BODY: usize = 16 << 20;

/// How long an interrupted cell may take to stop before its kernel is killed.
const INTERRUPT_GRACE: Duration = Duration::from_secs(3);

/// A line to the client at least this often while a cell runs: proxies keep the stream open,
/// and a client that went away is noticed (its write fails) even when the cell is silent.
const KEEPALIVE: Duration = Duration::from_secs(1);

/// Bytes of a cell's output held for a client that does not read its response.
const CELL_BACKLOG: u32 = 4 << 20;

/// Port 49999's error answer: E2B's plain shape (the SDK reads 404 as `NotFoundException`,
/// 502 as a timeout).
fn error(kind: Kind, msg: impl Into<String>) -> Response {
    E2bError::new(kind, msg).into_response()
}

/// A request refused before anything ran.
type Refused = E2bError;

fn bad(msg: impl Into<String>) -> Refused {
    E2bError::invalid(msg)
}

/// Handles one request to port 49999 of `live`. Auth and routing happened before.
pub async fn handle(rt: Arc<Runtime>, live: Arc<Live>, req: Request) -> Response {
    let path = req.uri().path().trim_end_matches('/').to_string();
    let method = req.method().clone();
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match (&method, parts.as_slice()) {
        (&Method::GET, ["health"]) => (StatusCode::OK, axum::Json("OK")).into_response(),
        (&Method::POST, ["execute"]) => {
            crate::phases::timed("cell", async {
                match body_json(req).await {
                    Ok(v) => execute(rt, live, v).await,
                    Err(r) => r.into_response(),
                }
            })
            .await
        }
        (&Method::POST, ["contexts"]) => match body_json(req).await {
            Ok(v) => create_context(rt, live, v).await,
            Err(r) => r.into_response(),
        },
        (&Method::GET, ["contexts"]) => {
            for lang in LISTED_DEFAULTS {
                default_context(live.as_ref(), lang);
            }
            let mut list: Vec<Arc<Context>> = live
                .interp
                .defaults
                .lock()
                .map(|m| m.values().cloned().collect())
                .unwrap_or_default();
            list.sort_by(|a, b| a.id.cmp(&b.id));
            let mut created: Vec<Arc<Context>> =
                live.interp.by_id.lock().map(|m| m.values().cloned().collect()).unwrap_or_default();
            created.sort_by(|a, b| a.id.cmp(&b.id));
            list.extend(created);
            axum::Json(Value::Array(list.iter().map(|c| c.json()).collect())).into_response()
        }
        (&Method::DELETE, ["contexts", id]) => {
            let Some(ctx) = live.interp.by_id.lock().ok().and_then(|mut m| m.remove(*id)) else {
                return error(Kind::NotFound, format!("context {id} not found"));
            };
            stop_kernel(&ctx).await;
            StatusCode::NO_CONTENT.into_response()
        }
        (&Method::POST, ["contexts", id, "restart"]) => {
            let Some(ctx) = find(&live, id) else {
                return error(Kind::NotFound, format!("context {id} not found"));
            };
            stop_kernel(&ctx).await;
            match start_kernel(&rt, &live, &ctx).await {
                Ok(k) => {
                    *ctx.kernel.lock().await = Some(k);
                    StatusCode::NO_CONTENT.into_response()
                }
                Err(e) => kernel_start_failed(&live, &e),
            }
        }
        _ => error(Kind::NotFound, format!("no such endpoint {method} {path}")),
    }
}

fn find(live: &Live, id: &str) -> Option<Arc<Context>> {
    if let Some(c) = live.interp.by_id.lock().ok()?.get(id) {
        return Some(c.clone());
    }
    live.interp.defaults.lock().ok()?.values().find(|c| c.id == id).cloned()
}

async fn body_json(req: Request) -> Result<Value, Refused> {
    let bytes = axum::body::to_bytes(req.into_body(), MAX_BODY)
        .await
        .map_err(|e| bad(format!("request body: {e}")))?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(json!({}));
    }
    serde_json::from_slice(&bytes).map_err(|e| bad(format!("request body is not JSON: {e}")))
}

fn opt_str<'a>(v: &'a Value, key: &str) -> Result<Option<&'a str>, Refused> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(bad(format!("{key} must be a string"))),
    }
}

fn new_context_id() -> String {
    use rand::Rng;
    let n: u128 = rand::rng().random();
    format!("{n:032x}")
}

async fn create_context(rt: Arc<Runtime>, live: Arc<Live>, body: Value) -> Response {
    let (lang, cwd) = match (opt_str(&body, "language"), opt_str(&body, "cwd")) {
        (Ok(l), Ok(c)) => (l.unwrap_or("python"), c.unwrap_or(DEFAULT_CWD)),
        (Err(r), _) | (_, Err(r)) => return r.into_response(),
    };
    let Some(language) = normalize(lang) else {
        return error(
            Kind::InvalidArgument,
            format!(
                "language {lang:?} is not supported here (python, javascript, typescript, bash, java, r, rust)"
            ),
        );
    };
    if !cwd.starts_with('/') {
        return error(Kind::InvalidArgument, format!("cwd {cwd:?} must be an absolute path"));
    }
    let ctx = Arc::new(Context {
        id: new_context_id(),
        language,
        cwd: cwd.to_string(),
        user: user_for(cwd),
        kernel: Arc::default(),
    });
    match start_kernel(&rt, &live, &ctx).await {
        Ok(k) => *ctx.kernel.lock().await = Some(k),
        Err(e) => return kernel_start_failed(&live, &e),
    }
    if let Ok(mut m) = live.interp.by_id.lock() {
        m.insert(ctx.id.clone(), ctx.clone());
    }
    axum::Json(ctx.json()).into_response()
}

/// The answer to a kernel that did not start: the sandbox having ended under it (its agent
/// gone: killed, or, on the gvisor tier, ended whole by its memory limit) is the client's to
/// know, not an internal error.
fn kernel_start_failed(live: &Live, e: &str) -> Response {
    if e.starts_with(BAD_CWD) || e.starts_with(NOT_ON_TIER) {
        return error(Kind::InvalidArgument, e);
    }
    if live.client.is_closed() {
        return error(Kind::SandboxGone, "the sandbox has ended: its agent is gone");
    }
    error(Kind::Internal, internal_message(&e))
}

static EXEC_SEQ: AtomicU64 = AtomicU64::new(1);

async fn execute(rt: Arc<Runtime>, live: Arc<Live>, body: Value) -> Response {
    let code = match body.get("code") {
        Some(Value::String(s)) => s.clone(),
        _ => return error(Kind::InvalidArgument, "code must be a string"),
    };
    let (context_id, language) = match (opt_str(&body, "context_id"), opt_str(&body, "language")) {
        (Ok(c), Ok(l)) => (c.map(str::to_string), l.map(str::to_string)),
        (Err(r), _) | (_, Err(r)) => return r.into_response(),
    };
    let env_vars = match body.get("env_vars") {
        None | Some(Value::Null) => Value::Null,
        Some(Value::Object(m)) if m.values().all(Value::is_string) => {
            let pairs = m.iter().map(|(k, v)| (k.as_str(), v.as_str().unwrap_or("")));
            if let Err(e) = crate::validate::check_env("env_vars", pairs) {
                return error(Kind::InvalidArgument, e);
            }
            Value::Object(m.clone())
        }
        Some(_) => return error(Kind::InvalidArgument, "env_vars must map names to strings"),
    };
    let ctx = match (context_id, language) {
        (Some(_), Some(_)) => {
            return error(Kind::InvalidArgument, "provide either context_id or language, not both");
        }
        (Some(id), None) => match find(&live, &id) {
            Some(c) => c,
            None => return error(Kind::NotFound, format!("context {id} not found")),
        },
        (None, lang) => {
            let lang = lang.unwrap_or_else(|| "python".into());
            let Some(language) = normalize(&lang) else {
                return error(
                    Kind::InvalidArgument,
                    format!(
                        "language {lang:?} is not supported here (python, javascript, typescript, bash, java, r, rust)"
                    ),
                );
            };
            match default_context(live.as_ref(), language) {
                Some(c) => c,
                None => return error(Kind::Internal, "state poisoned"),
            }
        }
    };
    crate::phases::mark("parse");
    let lang = ringfence_risk::Language::from_name(ctx.language);
    if let Some(why) = live.obs.refusal("cell", &code, lang).await {
        return error(Kind::PermissionDenied, why);
    }
    crate::phases::mark("risk_check");
    let mut guard = ctx.kernel.clone().lock_owned().await;
    crate::phases::mark("context_wait");
    if guard.is_none() {
        match start_kernel(&rt, &live, &ctx).await {
            Ok(k) => *guard = Some(k),
            Err(e) => return kernel_start_failed(&live, &e),
        }
    }
    let id = format!("e{}", EXEC_SEQ.fetch_add(1, Ordering::Relaxed));
    let started_ms = crate::manager::now_ms();
    let sent = guard.as_ref().is_some_and(|k| {
        k.send(&json!({"op": "execute", "id": id, "code": code, "env_vars": env_vars}))
    });
    if !sent {
        *guard = None;
        return error(Kind::SandboxGone, "the kernel is gone; retry to start a new one");
    }
    crate::phases::mark("sent");
    let (tx, rx) = bounded::channel::<Result<Bytes, Infallible>>(CELL_BACKLOG);
    let sent_at = std::time::Instant::now();
    tokio::spawn(async move {
        let outcome = pump(&mut guard, &id, &tx).await;
        crate::phases::span("cell_sent_to_end", sent_at);
        match outcome {
            Pumped::Done => {}
            Pumped::KernelDied => {
                *guard = None;
                send_line(
                    &tx,
                    &json!({"type": "error", "name": "KernelDied",
                    "value": "the kernel exited during this execution; the context starts afresh \
                              (its state is lost) on next use", "traceback": ""}),
                )
                .await;
                send_line(&tx, &json!({"type": "end_of_execution"})).await;
            }
            Pumped::ClientGone => {
                // Interrupt, then give the cell a moment to stop before killing the kernel.
                if let Some(k) = guard.as_mut() {
                    k.send(&json!({"op": "interrupt", "id": id}));
                    let stopped = tokio::time::timeout(INTERRUPT_GRACE, drain(k, &id)).await;
                    if !matches!(stopped, Ok(true)) {
                        k.killer.kill().await;
                        *guard = None;
                    }
                }
            }
        }
    });
    let stream = crate::observe::cell(&live.obs, &code, lang, started_ms, tokio_stream_from(rx));
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/x-ndjson")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| error(Kind::Internal, "response"))
}

enum Pumped {
    Done,
    KernelDied,
    ClientGone,
}

fn line(v: &Value) -> Bytes {
    let mut s = v.to_string().into_bytes();
    s.push(b'\n');
    Bytes::from(s)
}

/// The response body's side of a cell: NDJSON lines, bounded in bytes.
type CellSender = bounded::Sender<Result<Bytes, Infallible>>;

/// Sends one line to the client; false once it is gone.
async fn send_line(tx: &CellSender, v: &Value) -> bool {
    let l = line(v);
    let n = l.len();
    tx.send(Ok(l), n).await.is_ok()
}

/// Forwards the execution's messages to the client until its end.
async fn pump(guard: &mut Option<Kernel>, id: &str, tx: &CellSender) -> Pumped {
    let Some(k) = guard.as_mut() else { return Pumped::KernelDied };
    loop {
        let msg = match tokio::time::timeout(KEEPALIVE, k.output.recv()).await {
            Ok(Some(m)) => m,
            Ok(None) => return Pumped::KernelDied,
            Err(_) => {
                if !send_line(tx, &json!({"type": "keepalive"})).await {
                    return Pumped::ClientGone;
                }
                continue;
            }
        };
        let Value::Object(mut m) = msg else { continue };
        // Lines of an earlier, abandoned execution are not this one's.
        if m.remove("id").and_then(|v| v.as_str().map(str::to_string)).as_deref() != Some(id) {
            continue;
        }
        let end = m.get("type").and_then(Value::as_str) == Some("end_of_execution");
        if let Some(clean) = sanitize(m)
            && !send_line(tx, &clean).await
        {
            return Pumped::ClientGone;
        }
        if end {
            return Pumped::Done;
        }
    }
}

/// Reads until execution `id` ends; false if the kernel died first.
async fn drain(k: &mut Kernel, id: &str) -> bool {
    while let Some(m) = k.output.recv().await {
        if m.get("id").and_then(Value::as_str) == Some(id)
            && m.get("type").and_then(Value::as_str) == Some("end_of_execution")
        {
            return true;
        }
    }
    false
}

fn tokio_stream_from(
    mut rx: bounded::Receiver<Result<Bytes, Infallible>>,
) -> impl futures_util::Stream<Item = Result<Bytes, Infallible>> {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}
