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

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
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
    CHUNK, EntryInfo, ErrorKind, Event, ExitStatus, FileType, FsEventKind, ProcessInfo, ProtoError,
    Reply, Request as AgentRequest, SandboxUser, SpawnSpec, StdioMode,
};
use serde_json::{Map, Value, json};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::Instrument;

use crate::agent_client::{AgentClient, ClientError, EventStream};
use crate::codec::{EnvelopeError, EnvelopeReader, InflateError, gunzip_bounded};
use crate::fault::internal_message;
use crate::files_query::{FileQuery, parse_file_query};
use crate::observe::{Execution, Outcome, SandboxObs};
use crate::upload::{AgentSink, receive_upload};

/// The only content type a Connect streaming client accepts, byte for byte.
const CONNECT_JSON: &str = "application/connect+json";
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
// State.

/// Agent events waiting for a `GetWatcherEvents`.
type PendingEvents = Arc<tokio::sync::Mutex<EventStream>>;

/// A `CreateWatcher` watch: its events wait in the agent client's stream until
/// `GetWatcherEvents` drains them. The stream's flow-control window bounds that backlog: past
/// it the watch stops reading the kernel's queue, which drops what overflows.
#[derive(Debug)]
struct PollWatcher {
    watch: u64,
    /// The watched directory, resolved; set when entries are to be included.
    root: Option<String>,
    user: SandboxUser,
    events: PendingEvents,
}

/// Per-sandbox envd state: the polling watchers of `CreateWatcher`/`GetWatcherEvents`, and
/// how many `WatchDir` streams are open.
#[derive(Debug, Default)]
pub struct EnvdState {
    watchers: Mutex<HashMap<String, PollWatcher>>,
    streams: AtomicUsize,
    /// Where executions and file changes are reported (none in tests of envd alone).
    obs: Option<Arc<SandboxObs>>,
}

impl EnvdState {
    pub fn new() -> Self {
        Self::default()
    }

    /// State whose executions and file changes are audited.
    pub fn observed(obs: Arc<SandboxObs>) -> Self {
        EnvdState { watchers: Mutex::default(), streams: AtomicUsize::new(0), obs: Some(obs) }
    }

    /// Records a file change through the API before it is acknowledged.
    pub(crate) async fn audit(&self, action: &str, detail: Value) {
        if let Some(obs) = &self.obs {
            obs.record_action(action, detail).await;
        }
    }

    /// Whether any watch is open in this sandbox.
    fn watching(&self) -> bool {
        self.streams.load(Ordering::Relaxed) > 0
            || self.watchers.lock().map(|w| !w.is_empty()).unwrap_or(false)
    }
}

/// Counts an open `WatchDir` stream for as long as it lives.
#[derive(Debug)]
struct OpenStream(Arc<EnvdState>);

impl OpenStream {
    fn new(state: Arc<EnvdState>) -> Self {
        state.streams.fetch_add(1, Ordering::Relaxed);
        OpenStream(state)
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0.streams.fetch_sub(1, Ordering::Relaxed);
    }
}

// ---------------------------------------------------------------------------------------------
// Errors.

/// Connect error codes (the subset envd's clients can meet here).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Code {
    InvalidArgument,
    DeadlineExceeded,
    NotFound,
    AlreadyExists,
    PermissionDenied,
    ResourceExhausted,
    Unimplemented,
    Internal,
    Unavailable,
    Unauthenticated,
}

impl Code {
    fn as_str(self) -> &'static str {
        match self {
            Code::InvalidArgument => "invalid_argument",
            Code::DeadlineExceeded => "deadline_exceeded",
            Code::NotFound => "not_found",
            Code::AlreadyExists => "already_exists",
            Code::PermissionDenied => "permission_denied",
            Code::ResourceExhausted => "resource_exhausted",
            Code::Unimplemented => "unimplemented",
            Code::Internal => "internal",
            Code::Unavailable => "unavailable",
            Code::Unauthenticated => "unauthenticated",
        }
    }

    /// The Connect protocol's HTTP status for a unary error with this code.
    fn http_status(self) -> StatusCode {
        match self {
            Code::InvalidArgument => StatusCode::BAD_REQUEST,
            Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
            Code::NotFound => StatusCode::NOT_FOUND,
            Code::AlreadyExists => StatusCode::CONFLICT,
            Code::PermissionDenied => StatusCode::FORBIDDEN,
            Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
            Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
            Code::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        }
    }
}

/// The Connect code for an agent error kind.
fn code_for_kind(kind: ErrorKind) -> Code {
    match kind {
        ErrorKind::NotFound => Code::NotFound,
        ErrorKind::AlreadyExists => Code::AlreadyExists,
        ErrorKind::PermissionDenied => Code::PermissionDenied,
        ErrorKind::InvalidArgument | ErrorKind::NotADirectory | ErrorKind::IsADirectory => {
            Code::InvalidArgument
        }
        ErrorKind::NoSpace | ErrorKind::LimitReached => Code::ResourceExhausted,
        ErrorKind::Internal => Code::Internal,
    }
}

/// A Connect error: `{"code": "...", "message": "..."}`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct RpcError {
    code: Code,
    message: String,
}

impl RpcError {
    fn new(code: Code, message: impl Into<String>) -> Self {
        RpcError { code, message: message.into() }
    }

    fn invalid(message: impl Into<String>) -> Self {
        Self::new(Code::InvalidArgument, message)
    }

    fn unexpected(reply: &Reply) -> Self {
        Self::new(Code::Internal, internal_message(&format!("unexpected agent reply: {reply:?}")))
    }

    fn to_json(&self) -> Value {
        json!({"code": self.code.as_str(), "message": self.message})
    }
}

impl IntoResponse for RpcError {
    fn into_response(self) -> Response {
        json_response(self.code.http_status(), &self.to_json())
    }
}

impl From<ClientError> for RpcError {
    fn from(e: ClientError) -> Self {
        match e {
            ClientError::Agent(a) => RpcError::new(code_for_kind(a.kind), a.message),
            ClientError::Proto(ProtoError::TooLarge(n)) => {
                RpcError::invalid(format!("request of {n} bytes is too large"))
            }
            other => RpcError::new(Code::Unavailable, other.to_string()),
        }
    }
}

fn json_response(status: StatusCode, v: &Value) -> Response {
    let body = serde_json::to_vec(v).unwrap_or_default();
    let mut resp = Response::new(Body::from(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(APPLICATION_JSON));
    resp
}

/// envd's plain-HTTP error shape (`/files`): `{"code": <status>, "message": "..."}`.
fn http_error(status: StatusCode, message: impl Into<String>) -> Response {
    json_response(status, &json!({"code": status.as_u16(), "message": message.into()}))
}

/// A `/files` failure: an HTTP status with envd's JSON body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileError {
    status: StatusCode,
    message: String,
    /// The request body broke off: the client went away (or its connection did).
    client_gone: bool,
}

impl FileError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        FileError { status, message: message.into(), client_gone: false }
    }

    /// A request body that broke off before its end.
    pub fn client_gone(message: impl Into<String>) -> Self {
        FileError { status: StatusCode::BAD_REQUEST, message: message.into(), client_gone: true }
    }

    pub fn is_client_gone(&self) -> bool {
        self.client_gone
    }

    pub fn status(&self) -> StatusCode {
        self.status
    }

    pub fn message(&self) -> &str {
        &self.message
    }
}

impl IntoResponse for FileError {
    fn into_response(self) -> Response {
        http_error(self.status, self.message)
    }
}

/// The `/files` status for an agent failure.
pub(crate) fn files_error(e: ClientError) -> FileError {
    match e {
        ClientError::Agent(a) => {
            let status = match a.kind {
                ErrorKind::NotFound => StatusCode::NOT_FOUND,
                ErrorKind::IsADirectory | ErrorKind::NotADirectory | ErrorKind::InvalidArgument => {
                    StatusCode::BAD_REQUEST
                }
                ErrorKind::AlreadyExists => StatusCode::CONFLICT,
                ErrorKind::PermissionDenied => StatusCode::FORBIDDEN,
                ErrorKind::NoSpace => StatusCode::INSUFFICIENT_STORAGE,
                ErrorKind::LimitReached => StatusCode::TOO_MANY_REQUESTS,
                ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            };
            FileError::new(status, a.message)
        }
        ClientError::Proto(ProtoError::TooLarge(n)) => FileError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request of {n} bytes is too large"),
        ),
        // The SDK reads 502 as "the sandbox is gone", which is what a closed channel means.
        other => FileError::new(StatusCode::BAD_GATEWAY, other.to_string()),
    }
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
        Route::UnknownRpc => {
            // As a Connect server's mux answers an unknown procedure: 404, code unimplemented.
            let err = RpcError::new(
                Code::Unimplemented,
                format!("unknown procedure {}", req.uri().path()),
            );
            json_response(StatusCode::NOT_FOUND, &err.to_json())
        }
        Route::MethodNotAllowed => {
            let err = RpcError::new(
                Code::Unimplemented,
                format!("method {} not allowed on {}", req.method(), req.uri().path()),
            );
            json_response(StatusCode::METHOD_NOT_ALLOWED, &err.to_json())
        }
        Route::NotFound => {
            let err =
                RpcError::new(Code::NotFound, format!("no such endpoint {}", req.uri().path()));
            json_response(StatusCode::NOT_FOUND, &err.to_json())
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
    let user = rpc_user(headers).map_err(|e| e.message)?;
    stream_opts(headers).map_err(|e| e.message)?;
    accept_gzip(headers)?;
    parse_start(start, user).map_err(|e| e.message)?;
    Ok(())
}

fn rpc_user(headers: &HeaderMap) -> Result<SandboxUser, RpcError> {
    let Some(value) = header_str(headers, "authorization") else {
        return Ok(SandboxUser::default());
    };
    let value = value.trim();
    let unauthenticated = |m: String| RpcError::new(Code::Unauthenticated, m);
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
fn files_user(query: &FileQuery) -> Result<SandboxUser, FileError> {
    match query.username.as_deref() {
        None | Some("") => Ok(SandboxUser::default()),
        Some(name) => SandboxUser::parse(name).ok_or_else(|| {
            FileError::new(
                StatusCode::UNAUTHORIZED,
                format!("error looking up user '{name}': unknown user"),
            )
        }),
    }
}

/// The `/files` query: the value the API layer parsed and checked any signature over (in the
/// request's extensions), so what is served is exactly what was authorised. Only when envd
/// is driven without the API layer (its tests) is the URI read, by the same parser.
fn query(req: &Request) -> Result<FileQuery, FileError> {
    if let Some(q) = req.extensions().get::<FileQuery>() {
        return Ok(q.clone());
    }
    parse_file_query(req.uri().query().unwrap_or(""))
        .map_err(|e| FileError::new(StatusCode::BAD_REQUEST, e.to_string()))
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
            Code::ResourceExhausted,
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
            Err(RpcError::new(Code::Unimplemented, format!("unsupported encoding {other:?}")))
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
                    Code::ResourceExhausted,
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
        RpcError::new(Code::ResourceExhausted, e.to_string())
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
                    Code::Internal,
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
                    RpcError::new(Code::NotFound, format!("process with tag {tag} not found"))
                }),
            other => Err(RpcError::unexpected(&other)),
        },
    }
}

/// `SendSignalRequest.signal`: envd knows SIGKILL and SIGTERM only.
fn parse_signal(msg: &Value) -> Result<i32, RpcError> {
    let invalid = |s: &str| RpcError::new(Code::Unimplemented, format!("invalid signal: {s}"));
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
    let no_input = || RpcError::new(Code::Unimplemented, "invalid input type <nil>");
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
// Streaming responses.

fn stream_response(body: Body) -> Response {
    let mut resp = Response::new(body);
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(CONNECT_JSON));
    resp
}

/// A streaming call that failed before its first message.
fn stream_error(err: RpcError) -> Response {
    stream_response(Body::from(end_stream(Some(&err))))
}

fn channel_body(rx: mpsc::Receiver<Bytes>) -> Body {
    Body::from_stream(futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<Bytes, Infallible>(b), rx))
    }))
}

/// A far-away instant for a disabled `select!` branch.
fn never() -> Instant {
    let now = Instant::now();
    now.checked_add(Duration::from_secs(100 * 365 * 86_400)).unwrap_or(now)
}

/// Relays a process's events as `StartResponse`/`ConnectResponse` envelopes.
#[derive(Debug)]
struct ProcessStream {
    client: Arc<AgentClient>,
    pid: u32,
    events: EventStream,
    out: mpsc::Sender<Bytes>,
    opts: StreamOpts,
    /// `Start`: the request's deadline ends the process too (envd runs it under that context).
    kill_at_deadline: bool,
    /// `Start`, audited: recorded when the process ends, before the client hears of it.
    exec: Option<Execution>,
}

/// The audit trail's view of how a process ended: the shell's exit code convention (128+N
/// for signal N) and the process's own resource use.
fn exec_outcome(status: ExitStatus, usage: &ringfence_proto::Usage) -> Outcome {
    let mut out = Outcome::default();
    match status {
        ExitStatus::Code(c) => out.exit_code = Some(c),
        ExitStatus::Signal(sig) => {
            out.exit_code = Some(128 + sig);
            out.detail.insert("signal".into(), json!(signal_name(sig)));
        }
    }
    out.usage = Some(crate::store::ResourceUsage {
        memory_mb: usage.max_rss_kib / 1024,
        cpu_ms: (usage.user_cpu_us + usage.sys_cpu_us) / 1000,
    });
    out
}

/// The data event of an output chunk; `None` for other events.
fn output_frame(ev: &Event) -> Option<Bytes> {
    let (stream, data) = match ev {
        Event::Stdout { data, .. } => ("stdout", data),
        Event::Stderr { data, .. } => ("stderr", data),
        Event::Pty { data, .. } => ("pty", data),
        _ => return None,
    };
    Some(envelope(0, &data_event(stream, data)))
}

async fn pump_process(s: ProcessStream) {
    let ProcessStream { client, pid, mut events, out, opts, kill_at_deadline, mut exec } = s;
    // The one envelope waiting for room in the body. Events are taken only once it is sent, so
    // a client that does not read stops its process's output instead of filling memory.
    let mut next = Some(envelope(0, &start_event(pid)));
    let mut open = true;
    // Past its client, a stream lives on to enforce the deadline and to see the end of an
    // audited execution.
    let watch_deadline = kill_at_deadline && opts.deadline.is_some();
    let mut keepalive_at = Instant::now() + opts.keepalive;
    loop {
        if !open && !watch_deadline && exec.is_none() {
            return;
        }
        tokio::select! {
            permit = out.reserve(), if open && next.is_some() => match permit {
                Ok(permit) => {
                    if let Some(frame) = next.take() {
                        permit.send(frame);
                    }
                    keepalive_at = Instant::now() + opts.keepalive;
                }
                Err(_) => {
                    open = false;
                    next = None;
                    events.detach();
                }
            },
            ev = events.recv(), if next.is_none() => match ev {
                Some(Event::Exited { status, usage, .. }) => {
                    if let Some(x) = exec.take() {
                        x.finish(exec_outcome(status, &usage)).await;
                    }
                    if open && out.send(envelope(0, &end_event(status))).await.is_ok() {
                        let _ = out.send(end_stream(None)).await;
                    }
                    return;
                }
                Some(ev) => {
                    // Once the client is gone, output (what was in flight when it left) is
                    // dropped.
                    if open {
                        next = output_frame(&ev);
                    }
                }
                None => {
                    if let Some(x) = exec.take() {
                        let mut o = Outcome::default();
                        o.detail.insert("ended".into(), json!("the sandbox ended first"));
                        x.finish(o).await;
                    }
                    let err = RpcError::new(Code::Unavailable, "the sandbox agent is gone");
                    let _ = out.send(end_stream(Some(&err))).await;
                    return;
                }
            },
            () = tokio::time::sleep_until(keepalive_at), if open && next.is_none() => {
                next = Some(envelope(0, &keepalive_event()));
                keepalive_at = Instant::now() + opts.keepalive;
            }
            () = tokio::time::sleep_until(opts.deadline.unwrap_or_else(never)), if opts.deadline.is_some() => {
                let message = if kill_at_deadline {
                    let signal = AgentRequest::Signal { pid, signal: libc::SIGKILL };
                    if let Err(e) = client.call(signal).await {
                        tracing::debug!(pid, error = %e, "killing a process past its deadline");
                    }
                    if let Some(x) = exec.take() {
                        let mut o = Outcome::default();
                        o.detail.insert("killed".into(), json!("ran past its request timeout"));
                        x.finish(o).await;
                    }
                    "the command ran past its timeout and was killed"
                } else {
                    "the stream ran past its timeout"
                };
                let _ = out.send(end_stream(Some(&RpcError::new(Code::DeadlineExceeded, message)))).await;
                return;
            }
            () = out.closed(), if open => {
                open = false;
                next = None;
                events.detach();
            }
        }
    }
}

fn spawn_process_stream(
    client: Arc<AgentClient>,
    pid: u32,
    events: EventStream,
    opts: StreamOpts,
    kill_at_deadline: bool,
    exec: Option<Execution>,
) -> Response {
    let (out, rx) = mpsc::channel(BODY_FRAMES);
    let s = ProcessStream { client, pid, events, out, opts, kill_at_deadline, exec };
    // Spawned streams keep the request's span, so their log lines name the sandbox.
    tokio::spawn(pump_process(s).in_current_span());
    stream_response(channel_body(rx))
}

async fn start_spec(headers: &HeaderMap, body: Body) -> Result<SpawnSpec, RpcError> {
    let user = rpc_user(headers)?;
    let msg = read_stream_request(headers, body).await?;
    parse_start(&msg, user)
}

/// The command line of a spawn as the audit trail hashes it: the command and its arguments
/// joined by single spaces.
pub fn command_line(spec: &SpawnSpec) -> String {
    std::iter::once(spec.cmd.as_str())
        .chain(spec.args.iter().map(String::as_str))
        .collect::<Vec<_>>()
        .join(" ")
}

/// `process.Process/Start`.
async fn start_process(client: Arc<AgentClient>, state: Arc<EnvdState>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let opts = match stream_opts(&parts.headers) {
        Ok(o) => o,
        Err(e) => return stream_error(e),
    };
    let spec = match start_spec(&parts.headers, body).await {
        Ok(spec) => spec,
        Err(e) => return stream_error(e),
    };
    let line = command_line(&spec);
    let exec = state.obs.as_ref().map(|o| o.execution("command", &line));
    match client.stream(AgentRequest::Spawn(spec)).await {
        Ok((Reply::Spawned { pid }, events)) => {
            spawn_process_stream(client, pid, events, opts, true, exec)
        }
        Ok((other, _)) => stream_error(RpcError::unexpected(&other)),
        Err(e) => stream_error(e.into()),
    }
}

async fn connect_pid(
    client: &AgentClient,
    headers: &HeaderMap,
    body: Body,
) -> Result<u32, RpcError> {
    rpc_user(headers)?;
    let msg = read_stream_request(headers, body).await?;
    resolve_pid(client, parse_selector(&msg)?).await
}

/// `process.Process/Connect`.
async fn connect_process(client: Arc<AgentClient>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let opts = match stream_opts(&parts.headers) {
        Ok(o) => o,
        Err(e) => return stream_error(e),
    };
    let pid = match connect_pid(&client, &parts.headers, body).await {
        Ok(pid) => pid,
        Err(e) => return stream_error(e),
    };
    match client.stream(AgentRequest::Attach { pid }).await {
        Ok((Reply::Spawned { pid }, events)) => {
            spawn_process_stream(client, pid, events, opts, false, None)
        }
        Ok((other, _)) => stream_error(RpcError::unexpected(&other)),
        Err(e) => stream_error(e.into()),
    }
}

/// Writes process input in frame-sized pieces, in order.
async fn write_input(client: &AgentClient, pid: u32, data: Vec<u8>) -> Result<(), RpcError> {
    if data.is_empty() {
        client.call(AgentRequest::WriteStdin { pid, data }).await?;
        return Ok(());
    }
    for piece in data.chunks(CHUNK) {
        client.call(AgentRequest::WriteStdin { pid, data: piece.to_vec() }).await?;
    }
    Ok(())
}

async fn stream_input_message(
    client: &AgentClient,
    msg: &Value,
    pid: &mut Option<u32>,
) -> Result<(), RpcError> {
    if let Some(start) = field(msg, "start") {
        *pid = Some(resolve_pid(client, parse_selector(start)?).await?);
    } else if let Some(data) = field(msg, "data") {
        let p = pid.ok_or_else(|| RpcError::invalid("input before the start message"))?;
        write_input(client, p, parse_input(data)?).await?;
    } else if field(msg, "keepalive").is_none() {
        return Err(RpcError::new(Code::Unimplemented, "invalid event type"));
    }
    Ok(())
}

async fn stream_input_messages(
    client: &AgentClient,
    headers: &HeaderMap,
    body: Body,
) -> Result<(), RpcError> {
    let mut pid = None;
    if is_plain_json(headers) {
        let msg = read_unary_message(headers, body).await?;
        return stream_input_message(client, &msg, &mut pid).await;
    }
    let mut data = body.into_data_stream();
    let mut reader = envelope_reader();
    while let Some(chunk) = data.next().await {
        let chunk = chunk.map_err(|e| RpcError::invalid(format!("reading the request: {e}")))?;
        reader.push(&chunk);
        while let Some((flags, frame)) = reader.next_frame()? {
            if flags & FLAG_END_STREAM != 0 {
                continue;
            }
            let msg = frame_message(flags, frame, headers)?;
            stream_input_message(client, &msg, &mut pid).await?;
        }
    }
    if !reader.is_empty() {
        return Err(RpcError::invalid("truncated request envelope"));
    }
    Ok(())
}

/// `process.Process/StreamInput` (client streaming): one `{}` message, then end of stream.
async fn stream_input(client: Arc<AgentClient>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let result = match rpc_user(&parts.headers) {
        Ok(_) => stream_input_messages(&client, &parts.headers, body).await,
        Err(e) => Err(e),
    };
    match result {
        Ok(()) => {
            let mut bytes = envelope(0, &json!({})).to_vec();
            bytes.extend_from_slice(&end_stream(None));
            stream_response(Body::from(bytes))
        }
        Err(e) => stream_error(e),
    }
}

/// Relays a watch's events as `WatchDirResponse` envelopes.
#[derive(Debug)]
struct WatchStream {
    client: Arc<AgentClient>,
    watch: u64,
    /// The watched directory, resolved; set when entries are to be included.
    root: Option<String>,
    user: SandboxUser,
    events: EventStream,
    out: mpsc::Sender<Bytes>,
    opts: StreamOpts,
    _open: OpenStream,
}

async fn pump_watch(s: WatchStream) {
    let WatchStream { client, watch, root, user, mut events, out, opts, _open } = s;
    // As for processes: an event is taken only once the previous envelope is in the body.
    let mut next = Some(envelope(0, &json!({"start": {}})));
    let mut keepalive_at = Instant::now() + opts.keepalive;
    loop {
        tokio::select! {
            permit = out.reserve(), if next.is_some() => match permit {
                Ok(permit) => {
                    if let Some(frame) = next.take() {
                        permit.send(frame);
                    }
                    keepalive_at = Instant::now() + opts.keepalive;
                }
                Err(_) => break,
            },
            ev = events.recv(), if next.is_none() => match ev {
                Some(Event::Fs { name, kind, .. }) => {
                    let ev = fs_event(&client, root.as_deref(), user, name, kind).await;
                    next = Some(envelope(0, &json!({"filesystem": ev})));
                }
                Some(_) => {}
                None => {
                    let err = RpcError::new(Code::Unavailable, "the sandbox agent is gone");
                    let _ = out.send(end_stream(Some(&err))).await;
                    return;
                }
            },
            () = tokio::time::sleep_until(keepalive_at), if next.is_none() => {
                next = Some(envelope(0, &json!({"keepalive": {}})));
                keepalive_at = Instant::now() + opts.keepalive;
            }
            () = tokio::time::sleep_until(opts.deadline.unwrap_or_else(never)), if opts.deadline.is_some() => {
                let err = RpcError::new(Code::DeadlineExceeded, "the watch ran past its timeout");
                let _ = out.send(end_stream(Some(&err))).await;
                break;
            }
            () = out.closed() => break,
        }
    }
    if let Err(e) = client.call(AgentRequest::Unwatch { watch }).await {
        tracing::debug!(watch, error = %e, "ending a watch");
    }
}

/// Parameters shared by `WatchDir` and `CreateWatcher`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct WatchParams {
    path: String,
    recursive: bool,
    include_entry: bool,
}

fn parse_watch(msg: &Value) -> Result<WatchParams, RpcError> {
    Ok(WatchParams {
        path: fs_path(str_field(msg, "path")?),
        recursive: bool_field(msg, "recursive")?.unwrap_or(false),
        include_entry: bool_field(msg, "includeEntry")?.unwrap_or(false),
    })
}

/// Starts an agent watch; returns its id, the resolved root (when entries are wanted) and its
/// events.
async fn start_watch(
    client: &Arc<AgentClient>,
    user: SandboxUser,
    p: WatchParams,
) -> Result<(u64, Option<String>, EventStream), RpcError> {
    let request = AgentRequest::Watch { path: p.path.clone(), user, recursive: p.recursive };
    let (watch, events) = match client.stream(request).await? {
        (Reply::Watching { watch }, events) => (watch, events),
        (other, _) => return Err(RpcError::unexpected(&other)),
    };
    let root = if p.include_entry {
        match client.call(AgentRequest::Stat { path: p.path, user }).await {
            Ok(Reply::Entry(e)) => Some(e.path),
            _ => None,
        }
    } else {
        None
    };
    Ok((watch, root, events))
}

async fn watch_request(
    client: &Arc<AgentClient>,
    headers: &HeaderMap,
    body: Body,
) -> Result<(SandboxUser, u64, Option<String>, EventStream), RpcError> {
    let user = rpc_user(headers)?;
    let msg = read_stream_request(headers, body).await?;
    let (watch, root, events) = start_watch(client, user, parse_watch(&msg)?).await?;
    Ok((user, watch, root, events))
}

/// `filesystem.Filesystem/WatchDir`.
async fn watch_dir(client: Arc<AgentClient>, state: Arc<EnvdState>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let opts = match stream_opts(&parts.headers) {
        Ok(o) => o,
        Err(e) => return stream_error(e),
    };
    let (user, watch, root, events) = match watch_request(&client, &parts.headers, body).await {
        Ok(w) => w,
        Err(e) => return stream_error(e),
    };
    let (out, rx) = mpsc::channel(BODY_FRAMES);
    let _open = OpenStream::new(state);
    let s = WatchStream { client, watch, root, user, events, out, opts, _open };
    tokio::spawn(pump_watch(s).in_current_span());
    stream_response(channel_body(rx))
}

// ---------------------------------------------------------------------------------------------
// Unary calls.

async fn unary(
    client: Arc<AgentClient>,
    state: Arc<EnvdState>,
    rpc: UnaryRpc,
    req: Request,
) -> Response {
    let (parts, body) = req.into_parts();
    let msg = match rpc_user(&parts.headers) {
        Ok(_) => read_unary_message(&parts.headers, body).await,
        Err(e) => Err(e),
    };
    let result = match &msg {
        Ok(m) => unary_call(&client, &state, rpc, &parts.headers, m).await,
        Err(e) => Err(e.clone()),
    };
    let change = match rpc {
        UnaryRpc::MakeDir => Some("file.mkdir"),
        UnaryRpc::Move => Some("file.move"),
        UnaryRpc::Remove => Some("file.remove"),
        _ => None,
    };
    if let Some(action) = change {
        settle(&client, &state).await;
        if let (Ok(_), Ok(m)) = (&result, &msg) {
            let mut detail = Map::new();
            for f in ["path", "source", "destination"] {
                if let Some(v) = field(m, f) {
                    detail.insert(f.into(), v.clone());
                }
            }
            state.audit(action, Value::Object(detail)).await;
        }
    }
    match result {
        Ok(v) => json_response(StatusCode::OK, &v),
        Err(e) => e.into_response(),
    }
}

async fn unary_call(
    client: &Arc<AgentClient>,
    state: &EnvdState,
    rpc: UnaryRpc,
    headers: &HeaderMap,
    msg: &Value,
) -> Result<Value, RpcError> {
    let user = rpc_user(headers)?;
    let done = |reply: Reply| match reply {
        Reply::Done => Ok(json!({})),
        other => Err(RpcError::unexpected(&other)),
    };
    match rpc {
        UnaryRpc::List => match client.call(AgentRequest::ListProcesses).await? {
            Reply::Processes(list) => {
                Ok(json!({"processes": list.iter().map(process_info_json).collect::<Vec<_>>()}))
            }
            other => Err(RpcError::unexpected(&other)),
        },
        UnaryRpc::SendInput => {
            let pid = resolve_pid(client, parse_selector(msg)?).await?;
            write_input(client, pid, parse_input(msg)?).await?;
            Ok(json!({}))
        }
        UnaryRpc::CloseStdin => {
            let pid = resolve_pid(client, parse_selector(msg)?).await?;
            done(client.call(AgentRequest::CloseStdin { pid }).await?)
        }
        UnaryRpc::SendSignal => {
            let sel = parse_selector(msg)?;
            let signal = parse_signal(msg)?;
            let pid = resolve_pid(client, sel).await?;
            let reply = done(client.call(AgentRequest::Signal { pid, signal }).await?)?;
            if signal == libc::SIGKILL {
                await_reaped(client, pid).await;
            }
            Ok(reply)
        }
        UnaryRpc::Update => {
            let pid = resolve_pid(client, parse_selector(msg)?).await?;
            let Some(pty) = field(msg, "pty") else { return Ok(json!({})) };
            let size =
                field(pty, "size").ok_or_else(|| RpcError::invalid("pty.size is required"))?;
            let dim = |name: &str| -> Result<u16, RpcError> {
                let n = u32_field(size, name)?.unwrap_or(0);
                u16::try_from(n)
                    .map_err(|_| RpcError::invalid(format!("pty.size.{name} is too large")))
            };
            let (cols, rows) = (dim("cols")?, dim("rows")?);
            done(client.call(AgentRequest::ResizePty { pid, cols, rows }).await?)
        }
        UnaryRpc::Stat => {
            let path = fs_path(str_field(msg, "path")?);
            match client.call(AgentRequest::Stat { path, user }).await? {
                Reply::Entry(e) => Ok(json!({"entry": describe(client, user, &e).await})),
                other => Err(RpcError::unexpected(&other)),
            }
        }
        UnaryRpc::ListDir => {
            let path = fs_path(str_field(msg, "path")?);
            let depth = u32_field(msg, "depth")?.filter(|d| *d > 0).unwrap_or(1);
            match client.call(AgentRequest::ListDir { path, user, depth }).await? {
                Reply::Entries(list) => {
                    Ok(json!({"entries": describe_all(client, user, &list).await}))
                }
                other => Err(RpcError::unexpected(&other)),
            }
        }
        UnaryRpc::MakeDir => {
            let path = fs_path(str_field(msg, "path")?);
            match client.call(AgentRequest::MakeDir { path, user }).await? {
                Reply::Entry(e) => Ok(json!({"entry": describe(client, user, &e).await})),
                other => Err(RpcError::unexpected(&other)),
            }
        }
        UnaryRpc::Move => {
            let from = required_path(msg, "source")?;
            let to = required_path(msg, "destination")?;
            match client.call(AgentRequest::Rename { from, to, user }).await? {
                Reply::Entry(e) => Ok(json!({"entry": describe(client, user, &e).await})),
                other => Err(RpcError::unexpected(&other)),
            }
        }
        UnaryRpc::Remove => {
            // No empty-path-means-home here: that would remove the home directory.
            let path = required_path(msg, "path")?;
            // envd's `os.RemoveAll`: removing what is not there succeeds.
            match client.call(AgentRequest::Remove { path, user }).await {
                Err(ClientError::Agent(e)) if e.kind == ErrorKind::NotFound => Ok(json!({})),
                result => done(result?),
            }
        }
        UnaryRpc::CreateWatcher => create_watcher(client, state, user, msg).await,
        UnaryRpc::GetWatcherEvents => {
            let id = str_field(msg, "watcherId")?.unwrap_or_default();
            let (root, user, events) = {
                let watchers = state
                    .watchers
                    .lock()
                    .map_err(|_| RpcError::new(Code::Internal, "watcher table poisoned"))?;
                let w = watchers.get(&id).ok_or_else(|| watcher_not_found(&id))?;
                (w.root.clone(), w.user, w.events.clone())
            };
            // Events of writes the client saw complete must be in this answer, as with envd:
            // the agent flushes its watches before answering the ping, and its frames arrive
            // in order, so those events precede the pong.
            sync_agent(client).await?;
            let taken = events.lock().await.drain();
            let mut out = Vec::new();
            for ev in taken {
                if let Event::Fs { name, kind, .. } = ev {
                    out.push(fs_event(client, root.as_deref(), user, name, kind).await);
                }
            }
            Ok(json!({"events": out}))
        }
        UnaryRpc::RemoveWatcher => {
            let id = str_field(msg, "watcherId")?.unwrap_or_default();
            let removed = state
                .watchers
                .lock()
                .map_err(|_| RpcError::new(Code::Internal, "watcher table poisoned"))?
                .remove(&id);
            let w = removed.ok_or_else(|| watcher_not_found(&id))?;
            if let Err(e) = client.call(AgentRequest::Unwatch { watch: w.watch }).await {
                tracing::debug!(watch = w.watch, error = %e, "removing a watcher");
            }
            Ok(json!({}))
        }
    }
}

/// After a change made through envd, lets the sandbox's watches catch up before answering, as
/// envd's own watcher does in the time a reply takes to cross the network: a recursive watch
/// must have added the directory just made before the client writes into it, and a poll right
/// after a write must see its events.
async fn settle(client: &AgentClient, state: &EnvdState) {
    if state.watching()
        && let Err(e) = sync_agent(client).await
    {
        tracing::debug!(error = ?e, "letting watches settle");
    }
}

/// One round trip to the agent: it flushes every watch's pending events before answering any
/// request, so once the reply is in, the events of every earlier change are too.
async fn sync_agent(client: &AgentClient) -> Result<(), RpcError> {
    match client.call(AgentRequest::Ping).await? {
        Reply::Pong => Ok(()),
        other => Err(RpcError::unexpected(&other)),
    }
}

/// Waits (briefly) until a killed process has been reaped, so that what the caller does next
/// (the SDK's own tests run `kill -0 <pid>` right away) no longer finds it, not even as a
/// zombie. The agent reaps on SIGCHLD, so this is a few milliseconds.
async fn await_reaped(client: &AgentClient, pid: u32) {
    let deadline = Instant::now() + REAP_WAIT;
    while Instant::now() < deadline {
        match client.call(AgentRequest::ListProcesses).await {
            Ok(Reply::Processes(list)) if list.iter().any(|p| p.pid == pid) => {}
            _ => return,
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn watcher_not_found(id: &str) -> RpcError {
    RpcError::new(Code::NotFound, format!("watcher {id} not found"))
}

async fn create_watcher(
    client: &Arc<AgentClient>,
    state: &EnvdState,
    user: SandboxUser,
    msg: &Value,
) -> Result<Value, RpcError> {
    let (watch, root, events) = start_watch(client, user, parse_watch(msg)?).await?;
    let events = Arc::new(tokio::sync::Mutex::new(events));
    let id = watch.to_string();
    let mut watchers = state
        .watchers
        .lock()
        .map_err(|_| RpcError::new(Code::Internal, "watcher table poisoned"))?;
    watchers.insert(id.clone(), PollWatcher { watch, root, user, events });
    Ok(json!({"watcherId": id}))
}

// ---------------------------------------------------------------------------------------------
// /files (crates/server/src/envd/files.rs).

mod files;
use files::{accept_gzip, download, upload};

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::files::{basename, content_disposition, gzip_all, mime_for};
    use super::*;

    #[tokio::test]
    async fn request_bodies_share_a_bounded_buffer() {
        // 64 KiB of budget: a body that would take more is refused while it is held, and a
        // body over its own limit is refused whatever the budget.
        let budget = tokio::sync::Semaphore::new(64);
        let hog = budget.try_acquire_many(60).unwrap();
        let e = read_body_within(&budget, Body::from(vec![1u8; 8 << 10]), MAX_MESSAGE).await;
        assert_eq!(e.unwrap_err().code, Code::ResourceExhausted);
        assert_eq!(budget.available_permits(), 4, "a refused read keeps nothing");
        drop(hog);
        let ok = read_body_within(&budget, Body::from(vec![1u8; 8 << 10]), MAX_MESSAGE).await;
        assert_eq!(ok.unwrap().len(), 8 << 10);
        assert_eq!(budget.available_permits(), 64, "the budget returns with the bytes");
        let e = read_body_within(&budget, Body::from(vec![1u8; 2048]), 1024).await;
        assert_eq!(e.unwrap_err().code, Code::InvalidArgument);
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_static(v));
        }
        h
    }

    fn frames(bytes: &[u8]) -> Vec<(u8, Value)> {
        let mut r = envelope_reader();
        r.push(bytes);
        let mut out = Vec::new();
        while let Some((flags, data)) = r.next_frame().unwrap() {
            out.push((flags, serde_json::from_slice(&data).unwrap()));
        }
        assert!(r.is_empty(), "trailing bytes");
        out
    }

    #[test]
    fn envelopes_round_trip_and_match_the_capture() {
        let e = envelope(0, &start_event(3234));
        assert_eq!(&e[..5], &[0, 0, 0, 0, 0x20]);
        assert_eq!(&e[5..], br#"{"event":{"start":{"pid":3234}}}"#);
        assert_eq!(&end_stream(None)[..], &[2, 0, 0, 0, 2, b'{', b'}']);
        let err = RpcError::new(Code::NotFound, "gone");
        let mut all = e.to_vec();
        all.extend_from_slice(&end_stream(Some(&err)));
        let f = frames(&all);
        assert_eq!(f[0], (0, json!({"event": {"start": {"pid": 3234}}})));
        assert_eq!(f[1], (2, json!({"error": {"code": "not_found", "message": "gone"}})));
    }

    #[test]
    fn envelope_reader_is_incremental_and_bounded() {
        let e = envelope(0, &json!({"a": 1}));
        let mut r = envelope_reader();
        r.push(&e[..3]);
        assert_eq!(r.next_frame().unwrap(), None);
        r.push(&e[3..8]);
        assert_eq!(r.next_frame().unwrap(), None);
        r.push(&e[8..]);
        assert_eq!(r.next_frame().unwrap(), Some((0, br#"{"a":1}"#.to_vec())));
        assert!(r.is_empty());
        let mut big = envelope_reader();
        big.push(&[0, 0xff, 0xff, 0xff, 0xff]);
        assert_eq!(RpcError::from(big.next_frame().unwrap_err()).code, Code::ResourceExhausted);
    }

    #[test]
    fn single_message_accepts_envelopes_bare_json_and_gzip() {
        let h = headers(&[("content-type", CONNECT_JSON)]);
        let e = envelope(0, &json!({"process": {"pid": 7}}));
        assert_eq!(single_message(&h, &e).unwrap(), json!({"process": {"pid": 7}}));
        let bare = headers(&[("content-type", "application/json")]);
        assert_eq!(single_message(&bare, br#"{"x":true}"#).unwrap(), json!({"x": true}));
        assert_eq!(single_message(&h, br#"{"x":1}"#).unwrap(), json!({"x": 1}));
        assert_eq!(single_message(&h, &e[..4]).unwrap_err().code, Code::InvalidArgument);
        assert_eq!(single_message(&h, b"").unwrap_err().code, Code::InvalidArgument);
        // A compressed envelope.
        let z = gzip_all(br#"{"z":2}"#).unwrap();
        let mut frame = vec![FLAG_COMPRESSED];
        frame.extend_from_slice(&u32::try_from(z.len()).unwrap().to_be_bytes());
        frame.extend_from_slice(&z);
        let hz = headers(&[("content-type", CONNECT_JSON), ("connect-content-encoding", "gzip")]);
        assert_eq!(single_message(&hz, &frame).unwrap(), json!({"z": 2}));
        assert_eq!(single_message(&h, &frame).unwrap_err().code, Code::Internal);
    }

    #[test]
    fn start_requests_map_to_spawns() {
        let msg = json!({
            "process": {"cmd": "/bin/bash", "args": ["-l", "-c", "echo hi"], "envs": {"A": "1"}},
            "stdin": false
        });
        let spec = parse_start(&msg, SandboxUser::User).unwrap();
        assert_eq!(spec.cmd, "/bin/bash");
        assert_eq!(spec.args, ["-l", "-c", "echo hi"]);
        assert_eq!(spec.env.get("A").map(String::as_str), Some("1"));
        assert_eq!(spec.cwd, None);
        assert_eq!(spec.tag, None);
        assert_eq!(spec.stdio, StdioMode::Pipe { stdin: false });
        assert_eq!(spec.user, SandboxUser::User);

        // stdin is open unless refused (envd's backwards-compatible default).
        let msg = json!({"process": {"cmd": "cat", "cwd": "/tmp"}, "tag": "t1"});
        let spec = parse_start(&msg, SandboxUser::Root).unwrap();
        assert_eq!(spec.stdio, StdioMode::Pipe { stdin: true });
        assert_eq!(spec.cwd.as_deref(), Some("/tmp"));
        assert_eq!(spec.tag.as_deref(), Some("t1"));
        assert_eq!(spec.user, SandboxUser::Root);

        let msg = json!({
            "process": {"cmd": "/bin/bash", "args": ["-i", "-l"], "envs": {"TERM": "xterm-256color"}},
            "pty": {"size": {"cols": 80, "rows": "24"}},
            "stdin": false
        });
        let spec = parse_start(&msg, SandboxUser::User).unwrap();
        assert_eq!(spec.stdio, StdioMode::Pty { cols: 80, rows: 24 });

        // snake_case names and nulls are accepted; an empty cwd means none.
        let msg = json!({"process": {"cmd": "ls", "cwd": ""}, "pty": null, "tag": null});
        let spec = parse_start(&msg, SandboxUser::User).unwrap();
        assert_eq!(spec.cwd, None);
        assert_eq!(spec.stdio, StdioMode::Pipe { stdin: true });

        for bad in [
            json!({}),
            json!({"process": {}}),
            json!({"process": {"cmd": "x", "args": "y"}}),
            json!({"process": {"cmd": "x", "args": [1]}}),
            json!({"process": {"cmd": "x", "envs": {"A": 1}}}),
            json!({"process": {"cmd": "x"}, "stdin": "no"}),
            json!({"process": {"cmd": "x"}, "pty": {"size": {"cols": 70000, "rows": 1}}}),
        ] {
            assert_eq!(
                parse_start(&bad, SandboxUser::User).unwrap_err().code,
                Code::InvalidArgument,
                "{bad}"
            );
        }
    }

    #[test]
    fn selectors_signals_and_input() {
        assert_eq!(parse_selector(&json!({"process": {"pid": 12}})).unwrap(), Selector::Pid(12));
        assert_eq!(parse_selector(&json!({"process": {"pid": "12"}})).unwrap(), Selector::Pid(12));
        assert_eq!(
            parse_selector(&json!({"process": {"tag": "web"}})).unwrap(),
            Selector::Tag("web".into())
        );
        assert!(parse_selector(&json!({"process": {}})).is_err());
        assert!(parse_selector(&json!({})).is_err());

        assert_eq!(parse_signal(&json!({"signal": "SIGNAL_SIGKILL"})).unwrap(), 9);
        assert_eq!(parse_signal(&json!({"signal": "SIGNAL_SIGTERM"})).unwrap(), 15);
        assert_eq!(parse_signal(&json!({"signal": 9})).unwrap(), 9);
        assert_eq!(parse_signal(&json!({"signal": 15})).unwrap(), 15);
        for bad in [json!({}), json!({"signal": "SIGNAL_UNSPECIFIED"}), json!({"signal": 2})] {
            assert_eq!(parse_signal(&bad).unwrap_err().code, Code::Unimplemented);
        }

        assert_eq!(parse_input(&json!({"input": {"stdin": "aGkK"}})).unwrap(), b"hi\n");
        assert_eq!(parse_input(&json!({"input": {"pty": "AQ"}})).unwrap(), [1]);
        assert_eq!(parse_input(&json!({"input": {"stdin": ""}})).unwrap(), b"");
        assert_eq!(parse_input(&json!({"input": {}})).unwrap_err().code, Code::Unimplemented);
        assert_eq!(
            parse_input(&json!({"input": {"stdin": "!!"}})).unwrap_err().code,
            Code::InvalidArgument
        );
    }

    #[test]
    fn process_events_have_envd_shapes() {
        assert_eq!(data_event("stdout", b"hi\n"), json!({"event": {"data": {"stdout": "aGkK"}}}));
        assert_eq!(
            end_event(ExitStatus::Code(0)),
            json!({"event": {"end": {"exited": true, "status": "exit status 0"}}})
        );
        assert_eq!(
            end_event(ExitStatus::Code(3)),
            json!({"event": {"end": {"exitCode": 3, "exited": true, "status": "exit status 3", "error": "exit status 3"}}})
        );
        assert_eq!(
            end_event(ExitStatus::Signal(9)),
            json!({"event": {"end": {"exitCode": -1, "exited": false, "status": "signal: killed", "error": "signal: killed"}}})
        );
        assert_eq!(signal_name(15), "terminated");
        assert_eq!(signal_name(64), "signal 64");
        assert_eq!(keepalive_event(), json!({"event": {"keepalive": {}}}));
        // The captured `echo hi` end event, byte for byte.
        let e = envelope(0, &end_event(ExitStatus::Code(0)));
        assert_eq!(&e[5..], br#"{"event":{"end":{"exited":true,"status":"exit status 0"}}}"#);
        assert_eq!(e[4], 0x3a);
    }

    #[test]
    fn process_list_shape() {
        let p = ProcessInfo {
            pid: 5,
            spec: SpawnSpec {
                cmd: "sleep".into(),
                args: vec!["9".into()],
                env: BTreeMap::from([("A".into(), "b".into())]),
                cwd: None,
                user: SandboxUser::User,
                stdio: StdioMode::Pipe { stdin: false },
                tag: Some("t".into()),
            },
        };
        assert_eq!(
            process_info_json(&p),
            json!({"config": {"cmd": "sleep", "args": ["9"], "envs": {"A": "b"}}, "pid": 5, "tag": "t"})
        );
    }

    #[test]
    fn timestamps_are_rfc3339() {
        assert_eq!(rfc3339(0, 1).as_deref(), Some("1970-01-01T00:00:00.000000001Z"));
        assert_eq!(rfc3339(951_782_400, 0).as_deref(), Some("2000-02-29T00:00:00Z"));
        assert_eq!(
            rfc3339(1_795_737_600, 123_000_000).as_deref(),
            Some("2026-11-27T00:00:00.123Z")
        );
        assert_eq!(rfc3339(1_700_000_000, 5_000).as_deref(), Some("2023-11-14T22:13:20.000005Z"));
        assert_eq!(rfc3339(-1, 0).as_deref(), Some("1969-12-31T23:59:59Z"));
        assert_eq!(rfc3339(253_402_300_800, 0), None); // year 10000
        assert_eq!(rfc3339(-62_135_596_801, 0), None); // year 0
    }

    #[test]
    fn permissions_follow_go_file_mode() {
        assert_eq!(permissions_string(FileType::File, 0o644), "-rw-r--r--");
        assert_eq!(permissions_string(FileType::Directory, 0o755), "drwxr-xr-x");
        assert_eq!(permissions_string(FileType::Symlink, 0o777), "Lrwxrwxrwx");
        assert_eq!(permissions_string(FileType::Directory, 0o1777), "dtrwxrwxrwx");
        assert_eq!(permissions_string(FileType::File, 0o4755), "urwxr-xr-x");
        assert_eq!(permissions_string(FileType::Other, 0o600), "?rw-------");
    }

    fn entry(kind: FileType) -> EntryInfo {
        EntryInfo {
            name: "a.txt".into(),
            path: "/home/user/a.txt".into(),
            kind,
            size: 4,
            mode: 0o644,
            uid: 1000,
            gid: 1000,
            mtime: (1_700_000_000, 0),
            symlink_target: None,
            metadata: Default::default(),
        }
    }

    #[test]
    fn entry_info_shape() {
        assert_eq!(
            entry_json(&entry(FileType::File), None),
            json!({
                "name": "a.txt", "type": "FILE_TYPE_FILE", "path": "/home/user/a.txt",
                "size": "4", "mode": 0o644, "permissions": "-rw-r--r--",
                "owner": "user", "group": "user", "modifiedTime": "2023-11-14T22:13:20Z"
            })
        );
        let mut dir = entry(FileType::Directory);
        dir.mode = 0o1777;
        dir.uid = 0;
        dir.gid = 5;
        dir.mtime = (0, 0);
        let v = entry_json(&dir, None);
        assert_eq!(v["type"], "FILE_TYPE_DIRECTORY");
        assert_eq!(v["mode"], 0o777);
        assert_eq!(v["owner"], "root");
        assert_eq!(v["group"], "5");
        assert!(v.get("modifiedTime").is_none());
        assert_eq!(entry_json(&entry(FileType::Other), None)["type"], "FILE_TYPE_UNSPECIFIED");

        // A symlink: the target's type and mode, the link's permissions, the resolved target.
        let mut link = entry(FileType::Symlink);
        link.mode = 0o777;
        link.symlink_target = Some("b.txt".into());
        let target =
            LinkTarget { path: "/home/user/b.txt".into(), kind: Some(FileType::File), mode: 0o600 };
        let v = entry_json(&link, Some(&target));
        assert_eq!(v["type"], "FILE_TYPE_FILE");
        assert_eq!(v["mode"], 0o600);
        assert_eq!(v["permissions"], "Lrwxrwxrwx");
        assert_eq!(v["symlinkTarget"], "/home/user/b.txt");
        let dangling = LinkTarget { path: link.path.clone(), kind: None, mode: 0 };
        assert_eq!(entry_json(&link, Some(&dangling))["type"], "FILE_TYPE_UNSPECIFIED");
    }

    #[test]
    fn link_targets_resolve_lexically() {
        assert_eq!(join_link("/home/user/d/l", "t.txt"), "/home/user/d/t.txt");
        assert_eq!(join_link("/home/user/d/l", "../t"), "/home/user/t");
        assert_eq!(join_link("/a/l", "/etc/./x/../passwd"), "/etc/passwd");
        assert_eq!(join_link("/l", "../../x"), "/x");
        assert_eq!(normalize("/"), "/");
    }

    #[test]
    fn errors_map_to_connect_codes() {
        use ringfence_proto::AgentError;
        let agent =
            |kind| RpcError::from(ClientError::Agent(AgentError { kind, message: "m".into() }));
        assert_eq!(agent(ErrorKind::NotFound).code, Code::NotFound);
        assert_eq!(agent(ErrorKind::AlreadyExists).code, Code::AlreadyExists);
        assert_eq!(agent(ErrorKind::PermissionDenied).code, Code::PermissionDenied);
        assert_eq!(agent(ErrorKind::InvalidArgument).code, Code::InvalidArgument);
        assert_eq!(agent(ErrorKind::NotADirectory).code, Code::InvalidArgument);
        assert_eq!(agent(ErrorKind::IsADirectory).code, Code::InvalidArgument);
        assert_eq!(agent(ErrorKind::NoSpace).code, Code::ResourceExhausted);
        assert_eq!(agent(ErrorKind::Internal).code, Code::Internal);
        assert_eq!(agent(ErrorKind::LimitReached).code, Code::ResourceExhausted);
        assert_eq!(RpcError::from(ClientError::Closed).code, Code::Unavailable);
        assert_eq!(Code::NotFound.http_status(), StatusCode::NOT_FOUND);
        assert_eq!(Code::AlreadyExists.http_status(), StatusCode::CONFLICT);
        assert_eq!(Code::Unavailable.http_status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(Code::ResourceExhausted.http_status(), StatusCode::TOO_MANY_REQUESTS);
        let r = RpcError::new(Code::NotFound, "x").into_response();
        assert_eq!(r.status(), StatusCode::NOT_FOUND);
        assert_eq!(r.headers()[header::CONTENT_TYPE], APPLICATION_JSON);
        let files =
            |kind| files_error(ClientError::Agent(AgentError { kind, message: "m".into() })).status;
        assert_eq!(files(ErrorKind::NotFound), StatusCode::NOT_FOUND);
        assert_eq!(files(ErrorKind::IsADirectory), StatusCode::BAD_REQUEST);
        assert_eq!(files(ErrorKind::NoSpace), StatusCode::INSUFFICIENT_STORAGE);
        assert_eq!(files_error(ClientError::Closed).status, StatusCode::BAD_GATEWAY);
    }

    #[test]
    fn users_come_from_basic_auth_or_the_query() {
        assert_eq!(rpc_user(&HeaderMap::new()).unwrap(), SandboxUser::User);
        assert_eq!(
            rpc_user(&headers(&[("authorization", "Basic dXNlcjo=")])).unwrap(),
            SandboxUser::User
        );
        assert_eq!(
            rpc_user(&headers(&[("authorization", "basic cm9vdDo=")])).unwrap(),
            SandboxUser::Root
        );
        assert_eq!(
            rpc_user(&headers(&[("authorization", "Basic Ym9iOg==")])).unwrap_err().code,
            Code::Unauthenticated
        );
        assert!(rpc_user(&headers(&[("authorization", "Bearer x")])).is_err());
        let q = |raw: &str| crate::files_query::parse_file_query(raw).unwrap();
        assert_eq!(files_user(&q("")).unwrap(), SandboxUser::User);
        assert_eq!(files_user(&q("username=root")).unwrap(), SandboxUser::Root);
        assert_eq!(files_user(&q("username=bob")).unwrap_err().status, StatusCode::UNAUTHORIZED);
    }

    #[test]
    fn stream_options_come_from_headers() {
        let o = stream_opts(&HeaderMap::new()).unwrap();
        assert_eq!(o.keepalive, DEFAULT_KEEPALIVE);
        assert_eq!(o.deadline, None);
        let o = stream_opts(&headers(&[
            ("keepalive-ping-interval", "7"),
            ("connect-timeout-ms", "60000"),
        ]))
        .unwrap();
        assert_eq!(o.keepalive, Duration::from_secs(7));
        assert!(o.deadline.is_some());
        let o =
            stream_opts(&headers(&[("keepalive-ping-interval", "0"), ("connect-timeout-ms", "0")]))
                .unwrap();
        assert_eq!(o.keepalive, DEFAULT_KEEPALIVE);
        assert_eq!(o.deadline, None);
        let o = stream_opts(&headers(&[("connect-timeout-ms", "9999999999")])).unwrap();
        assert!(o.deadline.is_some_and(|d| d > Instant::now() + Duration::from_secs(86_400)));
    }

    #[test]
    fn absurd_stream_options_are_refused_naming_the_header() {
        for (name, value) in [
            ("connect-timeout-ms", "18446744073709551615"),
            ("connect-timeout-ms", "99999999999"),
            ("connect-timeout-ms", "-1"),
            ("connect-timeout-ms", "1.5"),
            ("connect-timeout-ms", "soon"),
            ("keepalive-ping-interval", "-5"),
            ("keepalive-ping-interval", "3601"),
            ("keepalive-ping-interval", "18446744073709551616"),
            ("keepalive-ping-interval", "x"),
        ] {
            let e = stream_opts(&headers(&[(name, value)])).unwrap_err();
            assert_eq!(e.code, Code::InvalidArgument, "{name}: {value}");
            assert!(e.message.to_ascii_lowercase().starts_with(name), "{e:?}");
        }
    }

    #[test]
    fn routes() {
        let post = Method::POST;
        assert_eq!(route(&post, "/process.Process/Start"), Route::Start);
        assert_eq!(route(&post, "/prefix/process.Process/List"), Route::Unary(UnaryRpc::List));
        assert_eq!(
            route(&post, "/filesystem.Filesystem/GetWatcherEvents"),
            Route::Unary(UnaryRpc::GetWatcherEvents)
        );
        assert_eq!(route(&post, "/process.Process/Nope"), Route::UnknownRpc);
        assert_eq!(route(&Method::GET, "/process.Process/List"), Route::MethodNotAllowed);
        assert_eq!(route(&Method::GET, "/health"), Route::Health);
        assert_eq!(route(&Method::GET, "/files"), Route::FilesGet);
        assert_eq!(route(&post, "/files"), Route::FilesPost);
        assert_eq!(route(&Method::DELETE, "/files"), Route::MethodNotAllowed);
        assert_eq!(route(&Method::GET, "/envs"), Route::NotFound);
    }

    #[test]
    fn accept_encoding_follows_envd() {
        let g = |v: &'static str| accept_gzip(&headers(&[("accept-encoding", v)]));
        assert_eq!(accept_gzip(&HeaderMap::new()), Ok(false));
        assert_eq!(g("gzip"), Ok(true));
        assert_eq!(g("gzip, deflate"), Ok(true));
        assert_eq!(g("identity"), Ok(false));
        assert_eq!(g("deflate, br"), Ok(false));
        assert_eq!(g("gzip;q=0, identity"), Ok(false));
        assert_eq!(g("identity;q=0.5, gzip;q=0.9"), Ok(true));
        assert_eq!(g("*"), Ok(false));
        assert_eq!(g("identity;q=0, *"), Ok(true));
        assert!(g("identity;q=0, br").is_err());
    }

    #[test]
    fn download_headers() {
        assert_eq!(basename("/tmp/a.txt"), "a.txt");
        assert_eq!(basename("rel"), "rel");
        assert_eq!(mime_for("a.TXT"), "text/plain; charset=utf-8");
        assert_eq!(mime_for("a"), "application/octet-stream");
        assert_eq!(content_disposition("a b.txt"), "inline; filename=\"a b.txt\"");
        assert_eq!(content_disposition("é\"x"), "inline; filename*=UTF-8''%C3%A9%22x");
    }

    #[test]
    fn compressed_envelopes_stop_inflating_at_the_message_limit() {
        // 17 members of 1 MiB of zeros each: 17 MiB inflated from a few kilobytes.
        let member = gzip_all(&vec![0u8; 1 << 20]).unwrap();
        let z = member.repeat((MAX_MESSAGE >> 20) + 1);
        let mut frame = vec![FLAG_COMPRESSED];
        frame.extend_from_slice(&u32::try_from(z.len()).unwrap().to_be_bytes());
        frame.extend_from_slice(&z);
        let hz = headers(&[("content-type", CONNECT_JSON), ("connect-content-encoding", "gzip")]);
        let err = single_message(&hz, &frame).unwrap_err();
        assert_eq!(err.code, Code::ResourceExhausted);
        assert!(err.message.contains("inflates past"), "{}", err.message);
        // A unary body with Content-Encoding: gzip takes the same path.
        assert_eq!(decode_encoding(Some("gzip"), z).unwrap_err().code, Code::ResourceExhausted);
    }

    #[test]
    fn field_names_accept_both_casings() {
        let v = json!({"watcher_id": "3", "includeEntry": true, "n": "42"});
        assert_eq!(str_field(&v, "watcherId").unwrap().as_deref(), Some("3"));
        assert_eq!(bool_field(&v, "includeEntry").unwrap(), Some(true));
        assert_eq!(u32_field(&v, "n").unwrap(), Some(42));
        assert!(u32_field(&json!({"n": -1}), "n").is_err());
        assert_eq!(fs_path(None), "~");
        assert_eq!(fs_path(Some(String::new())), "~");
        assert_eq!(fs_path(Some("a".into())), "a");
    }
}
