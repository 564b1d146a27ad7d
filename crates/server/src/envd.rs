//! envd: E2B's in-sandbox API (port 49983), translated into the agent protocol.
//!
//! The SDKs speak Connect protocol v1 with the JSON codec (docs/e2b-compat.md §4): unary calls
//! are plain JSON bodies, server streams are 5-byte-framed envelopes ending with an
//! end-of-stream frame, and `/files` is plain HTTP. Auth and routing happened before
//! [`handle`]; everything here is about speaking the wire format faithfully:
//!
//! - streaming responses carry `Content-Type: application/connect+json` exactly (the Python
//!   client rejects a charset parameter) and report errors in the end-of-stream frame, never
//!   as an HTTP status;
//! - processes outlive their streams: a client that disconnects stops receiving, nothing more;
//!   only the `Connect-Timeout-Ms` of `Start` kills, as envd does;
//! - entries describe symlinks the way envd does: the type and mode of what the link finally
//!   points to, the permissions string of the link itself, and the resolved target path.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::http::header::{self, HeaderMap, HeaderValue};
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
use flate2::Compression;
use futures_util::StreamExt;
use ringfence_proto::{
    CHUNK, EntryInfo, ErrorKind, Event, ExitStatus, FileType, FsEventKind, ProcessInfo, Reply,
    Request as AgentRequest, SandboxUser, SpawnSpec, StdioMode,
};
use serde_json::{Map, Value, json};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::Instrument;

use crate::agent_client::{AgentClient, ClientError, EventStream};
use crate::codec::{EnvelopeError, EnvelopeReader, InflateError, gunzip_bounded};
use crate::e2b_error::{ConnectError, E2bError, Kind};
use crate::files_query::{FileQuery, parse_file_query};
use crate::observe::{Execution, Outcome};
use crate::upload::{AgentSink, receive_upload};

pub use ringfence_core::envd::{EnvdState, OpenStream, PendingEvents, PollWatcher};

/// The only content type a Connect streaming client accepts, byte for byte.
const CONNECT_JSON: &str = "application/connect+json";
/// Connect errors in envd: the E2B error rendered on the Connect wire.
type RpcError = ConnectError;

const APPLICATION_JSON: &str = "application/json";
/// Largest Connect message (a unary body or one envelope) accepted, after decompression.
const MAX_MESSAGE: usize = 16 << 20;
/// Keepalive interval when the client names none (envd's is 90 s; the SDKs ask for 50 s, and
/// proxies in between are happier with the shorter one).
const DEFAULT_KEEPALIVE: Duration = Duration::from_secs(50);
const MAX_KEEPALIVE_SECS: u64 = 3600;
/// Envelopes a streaming response holds that its client has not taken yet. Past them the
/// stream stops taking events, which stops the agent at its flow-control window, which stops
/// the process at its pipe: a client that does not read holds its process back, not memory.
const BODY_FRAMES: usize = 4;
/// Longest `SendSignal` waits for a SIGKILLed process to be reaped.
const REAP_WAIT: Duration = Duration::from_millis(500);
/// Links followed to describe a symlink (Linux's own limit).
const MAX_SYMLINK_HOPS: usize = 40;
const FLAG_COMPRESSED: u8 = 0x01;
const FLAG_END_STREAM: u8 = 0x02;

// ---------------------------------------------------------------------------------------------
// Errors.

/// A Connect error for an agent reply that does not fit the request (its detail is logged).
fn unexpected(reply: &Reply) -> RpcError {
    ConnectError(E2bError::internal(format!("unexpected agent reply: {reply:?}")))
}

fn json_response(status: StatusCode, v: &Value) -> Response {
    let body = serde_json::to_vec(v).unwrap_or_default();
    let mut resp = Response::new(Body::from(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(APPLICATION_JSON));
    resp
}

/// The `/files` answer for an agent failure (docs/e2b-compat.md §3: 404, 400, 507, and 502
/// for a sandbox whose agent is gone).
pub(crate) fn files_error(e: ClientError) -> E2bError {
    E2bError::from(e)
}

// ---------------------------------------------------------------------------------------------
// Routing.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum UnaryRpc {
    List,
    SendInput,
    CloseStdin,
    SendSignal,
    Update,
    Stat,
    ListDir,
    MakeDir,
    Move,
    Remove,
    CreateWatcher,
    GetWatcherEvents,
    RemoveWatcher,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    Health,
    FilesGet,
    FilesPost,
    Start,
    Connect,
    StreamInput,
    WatchDir,
    Unary(UnaryRpc),
    UnknownRpc,
    MethodNotAllowed,
    NotFound,
}

/// Routes by the last path segments, so a path prefix in `E2B_SANDBOX_URL` still works.
/// Whether envd would serve this request as `/files` (download or upload): the API layer
/// parses and authorises the query of exactly these.
pub(crate) fn is_files(method: &Method, path: &str) -> bool {
    matches!(route(method, path), Route::FilesGet | Route::FilesPost)
}

/// Whether envd would answer this request as its health check.
pub(crate) fn is_health(method: &Method, path: &str) -> bool {
    route(method, path) == Route::Health
}

fn route(method: &Method, path: &str) -> Route {
    let mut segments = path.trim_end_matches('/').rsplit('/');
    let last = segments.next().unwrap_or("");
    let service = segments.next().unwrap_or("");
    let rpc = match (service, last) {
        ("process.Process", "Start") => Some(Route::Start),
        ("process.Process", "Connect") => Some(Route::Connect),
        ("process.Process", "StreamInput") => Some(Route::StreamInput),
        ("process.Process", "List") => Some(Route::Unary(UnaryRpc::List)),
        ("process.Process", "SendInput") => Some(Route::Unary(UnaryRpc::SendInput)),
        ("process.Process", "CloseStdin") => Some(Route::Unary(UnaryRpc::CloseStdin)),
        ("process.Process", "SendSignal") => Some(Route::Unary(UnaryRpc::SendSignal)),
        ("process.Process", "Update") => Some(Route::Unary(UnaryRpc::Update)),
        ("filesystem.Filesystem", "WatchDir") => Some(Route::WatchDir),
        ("filesystem.Filesystem", "Stat") => Some(Route::Unary(UnaryRpc::Stat)),
        ("filesystem.Filesystem", "ListDir") => Some(Route::Unary(UnaryRpc::ListDir)),
        ("filesystem.Filesystem", "MakeDir") => Some(Route::Unary(UnaryRpc::MakeDir)),
        ("filesystem.Filesystem", "Move") => Some(Route::Unary(UnaryRpc::Move)),
        ("filesystem.Filesystem", "Remove") => Some(Route::Unary(UnaryRpc::Remove)),
        ("filesystem.Filesystem", "CreateWatcher") => Some(Route::Unary(UnaryRpc::CreateWatcher)),
        ("filesystem.Filesystem", "GetWatcherEvents") => {
            Some(Route::Unary(UnaryRpc::GetWatcherEvents))
        }
        ("filesystem.Filesystem", "RemoveWatcher") => Some(Route::Unary(UnaryRpc::RemoveWatcher)),
        ("process.Process" | "filesystem.Filesystem", _) => Some(Route::UnknownRpc),
        _ => None,
    };
    if let Some(rpc) = rpc {
        return if method == Method::POST { rpc } else { Route::MethodNotAllowed };
    }
    match (last, method) {
        ("health", &Method::GET | &Method::HEAD) => Route::Health,
        ("files", &Method::GET) => Route::FilesGet,
        ("files", &Method::POST) => Route::FilesPost,
        ("health" | "files", _) => Route::MethodNotAllowed,
        _ => Route::NotFound,
    }
}

/// Handles one request addressed to the sandbox's envd (port 49983). Auth and routing were
/// done by the caller.
pub async fn handle(client: Arc<AgentClient>, state: Arc<EnvdState>, req: Request) -> Response {
    match route(req.method(), req.uri().path()) {
        Route::Health => StatusCode::NO_CONTENT.into_response(),
        Route::FilesGet => download(client, req).await,
        Route::FilesPost => upload(client, state, req).await,
        Route::Start => start_process(client, state, req).await,
        Route::Connect => connect_process(client, req).await,
        Route::StreamInput => stream_input(client, req).await,
        Route::WatchDir => watch_dir(client, state, req).await,
        Route::Unary(rpc) => unary(client, state, rpc, req).await,
        // As a Connect server's mux answers: an unknown procedure is 404 with `unimplemented`,
        // a wrong method 405.
        Route::UnknownRpc => {
            RpcError::new(Kind::UnknownProcedure, format!("unknown procedure {}", req.uri().path()))
                .into_response()
        }
        Route::MethodNotAllowed => RpcError::new(
            Kind::MethodNotAllowed,
            format!("method {} not allowed on {}", req.method(), req.uri().path()),
        )
        .into_response(),
        Route::NotFound => {
            RpcError::new(Kind::NotFound, format!("no such endpoint {}", req.uri().path()))
                .into_response()
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Request decoding.

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// The user of an RPC: `Authorization: Basic base64("<user>:")`, else the default user.
/// Everything envd reads from a request before anything reaches the agent: the user (Basic
/// auth), Connect's timeout and keepalive headers, `Accept-Encoding`, and a process `Start`
/// message. One entry point for the fuzz harness (`crates/fuzz`); `Err` carries the message a
/// client would get.
pub fn check_request(headers: &HeaderMap, start: &Value) -> Result<(), String> {
    let user = rpc_user(headers).map_err(|e| e.message().to_string())?;
    stream_opts(headers).map_err(|e| e.message().to_string())?;
    accept_gzip(headers)?;
    parse_start(start, user).map_err(|e| e.message().to_string())?;
    Ok(())
}

fn rpc_user(headers: &HeaderMap) -> Result<SandboxUser, RpcError> {
    let Some(value) = header_str(headers, "authorization") else {
        return Ok(SandboxUser::default());
    };
    let value = value.trim();
    let unauthenticated = |m: String| RpcError::new(Kind::Unauthenticated, m);
    let credentials = match value.get(..6) {
        Some(scheme) if scheme.eq_ignore_ascii_case("basic ") => value.get(6..).unwrap_or(""),
        _ => return Err(unauthenticated("unsupported authorization scheme".into())),
    };
    let raw = decode_base64(credentials.trim())
        .ok_or_else(|| unauthenticated("malformed basic credentials".into()))?;
    let text = String::from_utf8(raw)
        .map_err(|_| unauthenticated("malformed basic credentials".into()))?;
    let name = text.split_once(':').map_or(text.as_str(), |(user, _)| user);
    if name.is_empty() {
        return Ok(SandboxUser::default());
    }
    SandboxUser::parse(name)
        .ok_or_else(|| unauthenticated(format!("invalid username: user {name:?} does not exist")))
}

/// The user of a `/files` call: `?username=`, else the default user.
fn files_user(query: &FileQuery) -> Result<SandboxUser, E2bError> {
    match query.username.as_deref() {
        None | Some("") => Ok(SandboxUser::default()),
        Some(name) => SandboxUser::parse(name).ok_or_else(|| {
            E2bError::unauthenticated(format!("error looking up user '{name}': unknown user"))
        }),
    }
}

/// The `/files` query: the value the API layer parsed and checked any signature over (in the
/// request's extensions), so what is served is exactly what was authorised. Only when envd
/// is driven without the API layer (its tests) is the URI read, by the same parser.
fn query(req: &Request) -> Result<FileQuery, E2bError> {
    if let Some(q) = req.extensions().get::<FileQuery>() {
        return Ok(q.clone());
    }
    parse_file_query(req.uri().query().unwrap_or("")).map_err(E2bError::from)
}

/// proto3 JSON `bytes`: standard or URL-safe base64, padded or not.
fn decode_base64(s: &str) -> Option<Vec<u8>> {
    [&STANDARD, &STANDARD_NO_PAD, &URL_SAFE, &URL_SAFE_NO_PAD]
        .iter()
        .find_map(|engine| engine.decode(s).ok())
}

fn camel_to_snake(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 4);
    for c in name.chars() {
        if c.is_ascii_uppercase() {
            out.push('_');
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

/// A field by its lowerCamelCase name or its proto (snake_case) name; `null` counts as absent.
fn field<'a>(v: &'a Value, name: &str) -> Option<&'a Value> {
    let obj = v.as_object()?;
    obj.get(name).or_else(|| obj.get(&camel_to_snake(name))).filter(|f| !f.is_null())
}

fn str_field(v: &Value, name: &str) -> Result<Option<String>, RpcError> {
    match field(v, name) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(RpcError::invalid(format!("{name} must be a string"))),
    }
}

/// A 32-bit unsigned field, as a number or (as protojson allows) a decimal string.
fn u32_field(v: &Value, name: &str) -> Result<Option<u32>, RpcError> {
    let Some(f) = field(v, name) else { return Ok(None) };
    let n = match f {
        Value::Number(n) => n.as_u64().and_then(|n| u32::try_from(n).ok()),
        Value::String(s) => s.trim().parse::<u32>().ok(),
        _ => None,
    };
    n.map(Some)
        .ok_or_else(|| RpcError::invalid(format!("{name} must be a 32-bit unsigned integer")))
}

fn bool_field(v: &Value, name: &str) -> Result<Option<bool>, RpcError> {
    match field(v, name) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(_) => Err(RpcError::invalid(format!("{name} must be a boolean"))),
    }
}

fn parse_json(data: &[u8]) -> Result<Value, RpcError> {
    if data.iter().all(u8::is_ascii_whitespace) {
        return Ok(json!({}));
    }
    let v: Value = serde_json::from_slice(data)
        .map_err(|e| RpcError::invalid(format!("malformed JSON message: {e}")))?;
    if !v.is_object() {
        return Err(RpcError::invalid("the message must be a JSON object"));
    }
    Ok(v)
}

/// Decompresses a gzip message, refusing to grow past [`MAX_MESSAGE`] (it stops inflating
/// there: a small bomb never expands in full).
fn gunzip_all(data: Vec<u8>) -> Result<Vec<u8>, RpcError> {
    gunzip_bounded(Bytes::from(data), MAX_MESSAGE).map_err(|e| match e {
        InflateError::TooLarge { .. } => RpcError::new(
            Kind::TooLarge,
            format!("message too large: it inflates past the {MAX_MESSAGE}-byte limit"),
        ),
        other => RpcError::invalid(format!("malformed gzip message: {other}")),
    })
}

/// Applies a content encoding (`Content-Encoding` or `Connect-Content-Encoding`).
fn decode_encoding(encoding: Option<&str>, data: Vec<u8>) -> Result<Vec<u8>, RpcError> {
    match encoding.map(|e| e.trim().to_ascii_lowercase()).as_deref() {
        None | Some("" | "identity") => Ok(data),
        Some("gzip") => gunzip_all(data),
        Some(other) => {
            Err(RpcError::new(Kind::Unimplemented, format!("unsupported encoding {other:?}")))
        }
    }
}

/// Request bytes every envd request together may hold while reading its body (a Connect
/// message is read whole before it is parsed, up to `MAX_MESSAGE` each). Without it the
/// server's memory would grow with the number of clients sending at once; past it a request
/// is refused (`resource_exhausted`, to retry) instead.
const BUFFERED_BUDGET_KIB: usize = 256 << 10;
static BUFFERED: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(BUFFERED_BUDGET_KIB);

async fn read_body(body: Body, limit: usize) -> Result<Bytes, RpcError> {
    read_body_within(&BUFFERED, body, limit).await
}

/// Reads `body` whole (at most `limit` bytes), holding a permit of `budget` per KiB read until
/// the bytes are handed over.
async fn read_body_within(
    budget: &tokio::sync::Semaphore,
    body: Body,
    limit: usize,
) -> Result<Bytes, RpcError> {
    let mut stream = body.into_data_stream();
    let mut buf: Vec<u8> = Vec::new();
    let mut held: Option<tokio::sync::SemaphorePermit<'_>> = None;
    let mut held_kib = 0usize;
    while let Some(chunk) = stream.next().await {
        let chunk =
            chunk.map_err(|e| RpcError::invalid(format!("reading the request body: {e}")))?;
        let len = buf.len() + chunk.len();
        if len > limit {
            return Err(RpcError::invalid(format!(
                "reading the request body: longer than the {limit}-byte limit"
            )));
        }
        let want = len.div_ceil(1024);
        if want > held_kib {
            let more = u32::try_from(want - held_kib).unwrap_or(u32::MAX);
            let permit = budget.try_acquire_many(more).map_err(|_| {
                RpcError::new(
                    Kind::ResourceExhausted,
                    "the server is reading too many request bodies at once; retry",
                )
            })?;
            match held.as_mut() {
                Some(h) => h.merge(permit),
                None => held = Some(permit),
            }
            held_kib = want;
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(Bytes::from(buf))
}

/// A unary request message.
async fn read_unary_message(headers: &HeaderMap, body: Body) -> Result<Value, RpcError> {
    let raw = read_body(body, MAX_MESSAGE).await?;
    let raw = decode_encoding(header_str(headers, "content-encoding"), raw.to_vec())?;
    parse_json(&raw)
}

/// A Connect envelope reader with this server's message limit.
fn envelope_reader() -> EnvelopeReader {
    EnvelopeReader::new(MAX_MESSAGE)
}

impl From<EnvelopeError> for RpcError {
    fn from(e: EnvelopeError) -> Self {
        RpcError::new(Kind::TooLarge, e.to_string())
    }
}

/// Decodes the JSON of one request envelope.
fn frame_message(flags: u8, data: Vec<u8>, headers: &HeaderMap) -> Result<Value, RpcError> {
    let data = if flags & FLAG_COMPRESSED != 0 {
        match header_str(headers, "connect-content-encoding") {
            Some(enc) if !enc.trim().eq_ignore_ascii_case("identity") => {
                decode_encoding(Some(enc), data)?
            }
            _ => {
                return Err(RpcError::new(
                    Kind::Internal,
                    "compressed message without a Connect-Content-Encoding",
                ));
            }
        }
    } else {
        data
    };
    parse_json(&data)
}

fn is_plain_json(headers: &HeaderMap) -> bool {
    header_str(headers, "content-type").is_some_and(|ct| {
        let media = ct.split(';').next().unwrap_or("").trim();
        media.eq_ignore_ascii_case(APPLICATION_JSON)
    })
}

/// The one request message of a server-streaming call: an envelope, or (for robustness) a
/// bare JSON body.
fn single_message(headers: &HeaderMap, raw: &[u8]) -> Result<Value, RpcError> {
    if is_plain_json(headers) || raw.first() == Some(&b'{') {
        let raw = decode_encoding(header_str(headers, "content-encoding"), raw.to_vec())?;
        return parse_json(&raw);
    }
    let mut reader = envelope_reader();
    reader.push(raw);
    while let Some((flags, data)) = reader.next_frame()? {
        if flags & FLAG_END_STREAM != 0 {
            continue;
        }
        return frame_message(flags, data, headers);
    }
    if reader.is_empty() {
        Err(RpcError::invalid("the request carries no message"))
    } else {
        Err(RpcError::invalid("truncated request envelope"))
    }
}

async fn read_stream_request(headers: &HeaderMap, body: Body) -> Result<Value, RpcError> {
    let raw = read_body(body, MAX_MESSAGE + 5).await?;
    single_message(headers, &raw)
}

/// Stream settings the client asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct StreamOpts {
    keepalive: Duration,
    deadline: Option<Instant>,
}

/// The stream settings in the request's headers. A value that is not a plain number, or is
/// out of range, is refused (naming the header) rather than read as "none": a client that
/// asked for a limit must not silently get none, and no value may overflow a deadline.
fn stream_opts(headers: &HeaderMap) -> Result<StreamOpts, RpcError> {
    let keepalive = match header_str(headers, "keepalive-ping-interval").map(str::trim) {
        None => DEFAULT_KEEPALIVE,
        Some(v) => match v.parse::<u64>() {
            Ok(0) => DEFAULT_KEEPALIVE,
            Ok(s) if s <= MAX_KEEPALIVE_SECS => Duration::from_secs(s),
            _ => {
                return Err(RpcError::invalid(format!(
                    "Keepalive-Ping-Interval must be whole seconds from 0 to \
                     {MAX_KEEPALIVE_SECS}, got {:?}",
                    v.chars().take(32).collect::<String>()
                )));
            }
        },
    };
    // The Connect protocol's own bound: at most 10 digits of milliseconds (about 115 days).
    let deadline = match header_str(headers, "connect-timeout-ms").map(str::trim) {
        None => None,
        Some(v) => match v.parse::<u64>() {
            Ok(0) => None,
            Ok(ms) if v.len() <= 10 => Instant::now().checked_add(Duration::from_millis(ms)),
            _ => {
                return Err(RpcError::invalid(format!(
                    "Connect-Timeout-Ms must be whole milliseconds of at most 10 digits, got {:?}",
                    v.chars().take(32).collect::<String>()
                )));
            }
        },
    };
    Ok(StreamOpts { keepalive, deadline })
}

// ---------------------------------------------------------------------------------------------
// Request messages.

/// Maps a `StartRequest` to the agent's spawn. `stdin` defaults to open, as in envd (the
/// field is optional for backwards compatibility; new SDKs send `false` explicitly).
fn parse_start(msg: &Value, user: SandboxUser) -> Result<SpawnSpec, RpcError> {
    let process = field(msg, "process").ok_or_else(|| RpcError::invalid("process is required"))?;
    let cmd = str_field(process, "cmd")?
        .filter(|c| !c.is_empty())
        .ok_or_else(|| RpcError::invalid("process.cmd is required"))?;
    let args = match field(process, "args") {
        None => Vec::new(),
        Some(Value::Array(items)) => items
            .iter()
            .map(|a| {
                a.as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| RpcError::invalid("process.args must be strings"))
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(RpcError::invalid("process.args must be a list")),
    };
    let env = match field(process, "envs") {
        None => BTreeMap::new(),
        Some(Value::Object(m)) => m
            .iter()
            .map(|(k, v)| match v {
                Value::String(s) => Ok((k.clone(), s.clone())),
                _ => Err(RpcError::invalid("process.envs values must be strings")),
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(RpcError::invalid("process.envs must be an object")),
    };
    crate::validate::check_env("process.envs", env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .map_err(RpcError::invalid)?;
    let cwd = str_field(process, "cwd")?.filter(|c| !c.is_empty());
    let tag = str_field(msg, "tag")?;
    let stdio = match field(msg, "pty") {
        Some(pty) => {
            let size = field(pty, "size");
            let dim = |name: &str| -> Result<u16, RpcError> {
                let n = match size {
                    Some(s) => u32_field(s, name)?.unwrap_or(0),
                    None => 0,
                };
                u16::try_from(n)
                    .map_err(|_| RpcError::invalid(format!("pty.size.{name} is too large")))
            };
            StdioMode::Pty { cols: dim("cols")?, rows: dim("rows")? }
        }
        None => StdioMode::Pipe { stdin: bool_field(msg, "stdin")?.unwrap_or(true) },
    };
    Ok(SpawnSpec { cmd, args, env, cwd, user, stdio, tag })
}

/// A `ProcessSelector`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Selector {
    Pid(u32),
    Tag(String),
}

/// Reads `msg.process` as a selector.
fn parse_selector(msg: &Value) -> Result<Selector, RpcError> {
    let p = field(msg, "process").ok_or_else(|| RpcError::invalid("process is required"))?;
    if let Some(pid) = u32_field(p, "pid")? {
        return Ok(Selector::Pid(pid));
    }
    if let Some(tag) = str_field(p, "tag")? {
        return Ok(Selector::Tag(tag));
    }
    Err(RpcError::invalid("the process selector needs a pid or a tag"))
}

async fn resolve_pid(client: &AgentClient, sel: Selector) -> Result<u32, RpcError> {
    match sel {
        Selector::Pid(pid) => Ok(pid),
        Selector::Tag(tag) => match client.call(AgentRequest::ListProcesses).await? {
            Reply::Processes(list) => list
                .iter()
                .find(|p| p.spec.tag.as_deref() == Some(tag.as_str()))
                .map(|p| p.pid)
                .ok_or_else(|| {
                    RpcError::new(Kind::NotFound, format!("process with tag {tag} not found"))
                }),
            other => Err(unexpected(&other)),
        },
    }
}

/// `SendSignalRequest.signal`: envd knows SIGKILL and SIGTERM only.
fn parse_signal(msg: &Value) -> Result<i32, RpcError> {
    let invalid = |s: &str| RpcError::new(Kind::Unimplemented, format!("invalid signal: {s}"));
    match field(msg, "signal") {
        None => Err(invalid("SIGNAL_UNSPECIFIED")),
        Some(Value::String(s)) => match s.as_str() {
            "SIGNAL_SIGKILL" | "SIGKILL" | "9" => Ok(libc::SIGKILL),
            "SIGNAL_SIGTERM" | "SIGTERM" | "15" => Ok(libc::SIGTERM),
            other => Err(invalid(other)),
        },
        Some(Value::Number(n)) => match n.as_i64() {
            Some(9) => Ok(libc::SIGKILL),
            Some(15) => Ok(libc::SIGTERM),
            _ => Err(invalid(&n.to_string())),
        },
        Some(other) => Err(invalid(&other.to_string())),
    }
}

/// `ProcessInput`: the bytes of its `stdin` or `pty` member.
fn parse_input(msg: &Value) -> Result<Vec<u8>, RpcError> {
    let no_input = || RpcError::new(Kind::Unimplemented, "invalid input type <nil>");
    let input = field(msg, "input").ok_or_else(no_input)?;
    for key in ["stdin", "pty"] {
        if let Some(v) = field(input, key) {
            let s = v
                .as_str()
                .ok_or_else(|| RpcError::invalid(format!("input.{key} must be base64")))?;
            return decode_base64(s)
                .ok_or_else(|| RpcError::invalid(format!("input.{key} is not valid base64")));
        }
    }
    Err(no_input())
}

/// Relative and empty paths resolve against the user's home in the agent; envd treats an
/// empty path as the home directory itself.
fn fs_path(path: Option<String>) -> String {
    match path {
        Some(p) if !p.is_empty() => p,
        _ => "~".to_owned(),
    }
}

fn required_path(msg: &Value, name: &str) -> Result<String, RpcError> {
    str_field(msg, name)?
        .filter(|p| !p.is_empty())
        .ok_or_else(|| RpcError::invalid(format!("{name} is required")))
}

// ---------------------------------------------------------------------------------------------
// Response messages (crates/server/src/envd/messages.rs).

mod messages;
use messages::*;

// ---------------------------------------------------------------------------------------------
// Streaming responses (crates/server/src/envd/streams.rs).

mod streams;
use streams::*;

// ---------------------------------------------------------------------------------------------
// Unary calls (crates/server/src/envd/unary.rs).

mod unary;
use unary::*;

// ---------------------------------------------------------------------------------------------
// /files (crates/server/src/envd/files.rs).

mod files;
use files::{accept_gzip, download, upload};

#[cfg(test)]
mod tests;
