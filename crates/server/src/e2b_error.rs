//! The E2B edge's one error type, and how each of E2B's wires renders it.
//!
//! A failure is a [`Kind`] and a message; where it is answered decides its bytes
//! (docs/e2b-compat.md):
//!
//! - the control plane (§2.3), envd's plain-HTTP `/files` (§3) and the code interpreter's
//!   port 49999 (§5) all answer with the HTTP status and `{"code": <status>, "message": "…"}`
//!   (plus `sandboxId` for the "sandbox was not found" 502 of sandbox traffic): [`E2bError`]'s
//!   own `IntoResponse`;
//! - envd's Connect RPCs answer a unary call with the Connect status and `{"code":
//!   "not_found", "message": "…"}`, and a stream with the same object inside its end-of-stream
//!   frame: [`ConnectError`], a wrapper that only picks that rendering, so a Connect handler
//!   cannot answer in the REST shape by mistake.
//!
//! Handlers name a kind (`E2bError::not_found(…)`), never a status and a string, and the
//! `From` impls carry the manager's, the agent's and the store's errors over with one mapping
//! each, so a message is built once ("sandbox \"x\" not found", never "… not found not found").

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use ringfence_proto::{ErrorKind, ProtoError};
use serde_json::{Value, json};

use crate::agent_client::ClientError;
use crate::fault::internal_message;
use crate::manager::ManagerError;

/// What went wrong, as far as a client is concerned. Each wire maps it to its own code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The request is malformed or names something invalid (400, `invalid_argument`).
    InvalidArgument,
    /// No or a wrong credential (401, `unauthenticated`).
    Unauthenticated,
    /// The credential may not do this (403, `permission_denied`).
    PermissionDenied,
    /// What the request names is not there (404, `not_found`).
    NotFound,
    /// An RPC path no procedure serves (Connect's mux: 404 with `unimplemented`).
    UnknownProcedure,
    /// The path exists, the method does not (405, `unimplemented`).
    MethodNotAllowed,
    /// The request conflicts with the current state, or the thing exists (409,
    /// `already_exists`).
    Conflict,
    /// The request (or one message of it) is larger than accepted (413,
    /// `resource_exhausted`).
    TooLarge,
    /// This node does not serve the request (421, `unavailable`).
    Misdirected,
    /// A quota or rate limit refused it (429, `resource_exhausted`).
    ResourceExhausted,
    /// A failure inside the server; the message names no host detail (500, `internal`).
    Internal,
    /// Not implemented here (501, `unimplemented`).
    Unimplemented,
    /// The sandbox (or its agent) is gone: the SDKs read 502 as that (502, `unavailable`).
    SandboxGone,
    /// A dependency is unavailable for now; retrying may work (503, `unavailable`).
    Unavailable,
    /// A deadline passed (504, `deadline_exceeded`).
    DeadlineExceeded,
    /// The sandbox's disk is full (507, `resource_exhausted`).
    NoSpace,
}

impl Kind {
    /// The HTTP status of the plain JSON wires (control plane, `/files`, interpreter).
    pub fn http_status(self) -> StatusCode {
        match self {
            Kind::InvalidArgument => StatusCode::BAD_REQUEST,
            Kind::Unauthenticated => StatusCode::UNAUTHORIZED,
            Kind::PermissionDenied => StatusCode::FORBIDDEN,
            Kind::NotFound | Kind::UnknownProcedure => StatusCode::NOT_FOUND,
            Kind::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Kind::Conflict => StatusCode::CONFLICT,
            Kind::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Kind::Misdirected => StatusCode::MISDIRECTED_REQUEST,
            Kind::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
            Kind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            Kind::Unimplemented => StatusCode::NOT_IMPLEMENTED,
            Kind::SandboxGone => StatusCode::BAD_GATEWAY,
            Kind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Kind::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
            Kind::NoSpace => StatusCode::INSUFFICIENT_STORAGE,
        }
    }

    /// The Connect code name (docs/e2b-compat.md §4.1).
    pub fn connect_code(self) -> &'static str {
        match self {
            Kind::InvalidArgument => "invalid_argument",
            Kind::Unauthenticated => "unauthenticated",
            Kind::PermissionDenied => "permission_denied",
            Kind::NotFound => "not_found",
            Kind::UnknownProcedure | Kind::MethodNotAllowed | Kind::Unimplemented => {
                "unimplemented"
            }
            Kind::Conflict => "already_exists",
            Kind::TooLarge | Kind::ResourceExhausted | Kind::NoSpace => "resource_exhausted",
            Kind::Internal => "internal",
            Kind::Misdirected | Kind::SandboxGone | Kind::Unavailable => "unavailable",
            Kind::DeadlineExceeded => "deadline_exceeded",
        }
    }

    /// The HTTP status of a unary Connect error: the protocol's code↔status table, except
    /// where a Connect server's mux answers before any procedure (unknown path: 404; wrong
    /// method: 405).
    pub fn connect_status(self) -> StatusCode {
        match self {
            Kind::UnknownProcedure => StatusCode::NOT_FOUND,
            Kind::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            other => match other.connect_code() {
                "invalid_argument" => StatusCode::BAD_REQUEST,
                "unauthenticated" => StatusCode::UNAUTHORIZED,
                "permission_denied" => StatusCode::FORBIDDEN,
                "not_found" => StatusCode::NOT_FOUND,
                "already_exists" => StatusCode::CONFLICT,
                "resource_exhausted" => StatusCode::TOO_MANY_REQUESTS,
                "unimplemented" => StatusCode::NOT_IMPLEMENTED,
                "unavailable" => StatusCode::SERVICE_UNAVAILABLE,
                "deadline_exceeded" => StatusCode::GATEWAY_TIMEOUT,
                _ => StatusCode::INTERNAL_SERVER_ERROR,
            },
        }
    }
}

/// A failure answered to an E2B client. Its `IntoResponse` is the plain JSON shape; wrap it
/// in [`ConnectError`] for a Connect RPC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct E2bError {
    kind: Kind,
    message: String,
    /// Sandbox traffic for a sandbox that is not there names it, as E2B's proxy does.
    sandbox_id: Option<String>,
    /// An upload's body broke off: the client went away (or its connection did), so nobody
    /// reads the answer; the upload records it as aborted, not failed.
    client_gone: bool,
}

impl E2bError {
    pub fn new(kind: Kind, message: impl Into<String>) -> Self {
        E2bError { kind, message: message.into(), sandbox_id: None, client_gone: false }
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(Kind::InvalidArgument, message)
    }

    pub fn unauthenticated(message: impl Into<String>) -> Self {
        Self::new(Kind::Unauthenticated, message)
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(Kind::PermissionDenied, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(Kind::NotFound, message)
    }

    pub fn method_not_allowed(message: impl Into<String>) -> Self {
        Self::new(Kind::MethodNotAllowed, message)
    }

    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(Kind::Conflict, message)
    }

    pub fn too_large(message: impl Into<String>) -> Self {
        Self::new(Kind::TooLarge, message)
    }

    pub fn misdirected(message: impl Into<String>) -> Self {
        Self::new(Kind::Misdirected, message)
    }

    pub fn exhausted(message: impl Into<String>) -> Self {
        Self::new(Kind::ResourceExhausted, message)
    }

    pub fn unimplemented(message: impl Into<String>) -> Self {
        Self::new(Kind::Unimplemented, message)
    }

    pub fn sandbox_gone(message: impl Into<String>) -> Self {
        Self::new(Kind::SandboxGone, message)
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(Kind::Unavailable, message)
    }

    pub fn deadline(message: impl Into<String>) -> Self {
        Self::new(Kind::DeadlineExceeded, message)
    }

    pub fn no_space(message: impl Into<String>) -> Self {
        Self::new(Kind::NoSpace, message)
    }

    /// A 500 whose message is safe to show as it is (it names no host detail).
    pub fn internal_plain(message: impl Into<String>) -> Self {
        Self::new(Kind::Internal, message)
    }

    /// A 500 for a failure whose detail may name host paths or state: the detail is logged
    /// and the client gets an id to quote (see `crate::fault`).
    pub fn internal(detail: impl std::fmt::Display) -> Self {
        Self::new(Kind::Internal, internal_message(&detail))
    }

    /// Sandbox traffic for a sandbox that is unknown or killed: E2B's proxy answer, whose
    /// "was not found" the SDKs turn into `SandboxNotRunningException`.
    pub fn sandbox_not_found(id: impl Into<String>) -> Self {
        let mut e = Self::new(Kind::SandboxGone, "The sandbox was not found");
        e.sandbox_id = Some(id.into());
        e
    }

    /// Sandbox traffic to a port nothing listens on: E2B's proxy answer, whose "port is not
    /// open" the SDKs turn into `SandboxUnreachableException`.
    pub fn port_not_open(id: impl Into<String>, port: u16, why: &str) -> Self {
        let message = format!("The sandbox is running but port is not open ({port}: {why})");
        let mut e = Self::new(Kind::SandboxGone, message);
        e.sandbox_id = Some(id.into());
        e
    }

    /// An upload body that broke off before its end.
    pub fn client_gone(message: impl Into<String>) -> Self {
        let mut e = Self::invalid(message);
        e.client_gone = true;
        e
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    pub fn message(&self) -> &str {
        &self.message
    }

    pub fn is_client_gone(&self) -> bool {
        self.client_gone
    }

    /// The status of the plain JSON wires.
    pub fn status(&self) -> StatusCode {
        self.kind.http_status()
    }

    /// The plain JSON body: `{"code": <status>, "message": "…"}` (and `sandboxId`).
    pub fn to_json(&self) -> Value {
        let mut v = json!({"code": self.status().as_u16(), "message": self.message});
        if let (Some(id), Some(o)) = (&self.sandbox_id, v.as_object_mut()) {
            o.insert("sandboxId".into(), Value::String(id.clone()));
        }
        v
    }

    /// The Connect error object: `{"code": "not_found", "message": "…"}`.
    pub fn connect_json(&self) -> Value {
        json!({"code": self.kind.connect_code(), "message": self.message})
    }

    /// Prefixes the message with what was being done (`"{context}: {message}"`).
    pub fn context(mut self, context: impl std::fmt::Display) -> Self {
        self.message = format!("{context}: {}", self.message);
        self
    }
}

impl std::fmt::Display for E2bError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.message, self.kind.connect_code())
    }
}

impl std::error::Error for E2bError {}

impl IntoResponse for E2bError {
    fn into_response(self) -> Response {
        (self.status(), Json(self.to_json())).into_response()
    }
}

/// The same error answered on a Connect RPC (unary: Connect status and error JSON).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectError(pub E2bError);

impl ConnectError {
    pub fn new(kind: Kind, message: impl Into<String>) -> Self {
        ConnectError(E2bError::new(kind, message))
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(Kind::InvalidArgument, message)
    }

    pub fn kind(&self) -> Kind {
        self.0.kind
    }

    pub fn message(&self) -> &str {
        &self.0.message
    }

    /// The error object (also the `error` of an end-of-stream frame).
    pub fn to_json(&self) -> Value {
        self.0.connect_json()
    }
}

impl IntoResponse for ConnectError {
    fn into_response(self) -> Response {
        let body = serde_json::to_vec(&self.to_json()).unwrap_or_default();
        let mut resp = (self.kind().connect_status(), body).into_response();
        // Connect's unary errors are `application/json` (docs/e2b-compat.md §4.1).
        resp.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        resp
    }
}

impl<E: Into<E2bError>> From<E> for ConnectError {
    fn from(e: E) -> Self {
        ConnectError(e.into())
    }
}

/// The kind of an error the sandbox's agent reported.
pub fn agent_kind(kind: ErrorKind) -> Kind {
    match kind {
        ErrorKind::NotFound => Kind::NotFound,
        ErrorKind::AlreadyExists => Kind::Conflict,
        ErrorKind::PermissionDenied => Kind::PermissionDenied,
        ErrorKind::InvalidArgument | ErrorKind::NotADirectory | ErrorKind::IsADirectory => {
            Kind::InvalidArgument
        }
        ErrorKind::NoSpace => Kind::NoSpace,
        ErrorKind::LimitReached => Kind::ResourceExhausted,
        ErrorKind::Internal => Kind::Internal,
    }
}

/// The agent's own errors keep its message (it describes the sandbox's files, not the
/// host's); a closed or broken channel means the sandbox is gone.
impl From<ClientError> for E2bError {
    fn from(e: ClientError) -> Self {
        match e {
            ClientError::Agent(a) => E2bError::new(agent_kind(a.kind), a.message),
            ClientError::Proto(ProtoError::TooLarge(n)) => {
                E2bError::too_large(format!("request of {n} bytes is too large"))
            }
            other => E2bError::sandbox_gone(other.to_string()),
        }
    }
}

impl From<ManagerError> for E2bError {
    fn from(e: ManagerError) -> Self {
        match e {
            ManagerError::BadRequest(m) => E2bError::invalid(m),
            ManagerError::NotFound(m) => E2bError::not_found(m.to_string()),
            ManagerError::Conflict(m) => E2bError::conflict(m),
            ManagerError::Quota(m) => E2bError::exhausted(m),
            ManagerError::Tier(e) => e.into(),
            ManagerError::Store(e) => E2bError::internal(e),
            ManagerError::Agent(e) => E2bError::internal(e),
            ManagerError::Network(e) => E2bError::internal(e),
            ManagerError::Task(e) => E2bError::internal(e),
            ManagerError::Internal(m) => E2bError::internal(m),
        }
    }
}

/// A tier's refusal is the client's to fix (400; 403 for a tier its key may not use; 409 for
/// an operation this sandbox's tier cannot do); its failures are internal.
impl From<crate::tier::TierError> for E2bError {
    fn from(e: crate::tier::TierError) -> Self {
        use crate::tier::TierError;
        match e {
            TierError::Unknown(_)
            | TierError::Unavailable { .. }
            | TierError::Conflicting { .. }
            | TierError::TemplateUnavailable(_) => E2bError::invalid(e.to_string()),
            TierError::NotAllowed { .. } => E2bError::forbidden(e.to_string()),
            TierError::Unsupported { .. } => E2bError::conflict(e.to_string()),
            other => E2bError::internal(other),
        }
    }
}

/// A store failure of a read the client shaped: its own mistakes (a bad page token or limit)
/// are 400 with their text, anything else is internal.
impl From<crate::store::StoreError> for E2bError {
    fn from(e: crate::store::StoreError) -> Self {
        use crate::store::StoreError;
        match e {
            StoreError::InvalidToken | StoreError::InvalidLimit(_) | StoreError::InvalidName(_) => {
                E2bError::invalid(e.to_string())
            }
            other => E2bError::internal(other),
        }
    }
}

impl From<crate::files_query::FileQueryError> for E2bError {
    fn from(e: crate::files_query::FileQueryError) -> Self {
        E2bError::invalid(e.to_string())
    }
}

impl From<crate::quota::QuotaError> for E2bError {
    fn from(e: crate::quota::QuotaError) -> Self {
        E2bError::exhausted(e.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manager::Missing;
    use axum::body::to_bytes;
    use ringfence_proto::AgentError;

    async fn parts(r: Response) -> (StatusCode, Option<String>, Value) {
        let status = r.status();
        let ct =
            r.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).map(str::to_string);
        let body = to_bytes(r.into_body(), 1 << 20).await.expect("body");
        (status, ct, serde_json::from_slice(&body).expect("json body"))
    }

    #[tokio::test]
    async fn rest_wire_is_status_and_integer_code() {
        let e = E2bError::from(ManagerError::no_sandbox("abc"));
        let (status, ct, v) = parts(e.into_response()).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(ct.as_deref(), Some("application/json"));
        assert_eq!(v, json!({"code": 404, "message": "sandbox \"abc\" not found"}));
    }

    #[tokio::test]
    async fn no_message_is_doubled() {
        // The manager's message is the whole message: no wire adds "not found" again.
        for e in [
            E2bError::from(ManagerError::NotFound(Missing::Template("t".into()))),
            E2bError::from(ManagerError::no_sandbox("s")),
        ] {
            assert_eq!(e.message().matches("not found").count(), 1, "{}", e.message());
            assert_eq!(ConnectError(e.clone()).to_json()["message"], e.message());
        }
    }

    #[tokio::test]
    async fn connect_unary_wire_is_code_name_and_connect_status() {
        let e = ConnectError::from(ClientError::Agent(AgentError {
            kind: ErrorKind::NotFound,
            message: "/nope: no such file".into(),
        }));
        let (status, ct, v) = parts(e.into_response()).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(ct.as_deref(), Some("application/json"));
        assert_eq!(v, json!({"code": "not_found", "message": "/nope: no such file"}));

        // A 429 quota on the REST side is resource_exhausted with 429 on Connect; a disk-full
        // (507 on /files) is resource_exhausted too.
        let (status, _, v) = parts(ConnectError::new(Kind::NoSpace, "full").into_response()).await;
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(v["code"], "resource_exhausted");
        // The mux's answers keep their own statuses.
        let (status, _, v) =
            parts(ConnectError::new(Kind::UnknownProcedure, "x").into_response()).await;
        assert_eq!((status, v["code"].clone()), (StatusCode::NOT_FOUND, json!("unimplemented")));
    }

    #[test]
    fn connect_end_stream_object() {
        let e = ConnectError::new(Kind::DeadlineExceeded, "ran past its timeout");
        assert_eq!(
            json!({"error": e.to_json()}),
            json!({"error": {"code": "deadline_exceeded", "message": "ran past its timeout"}})
        );
    }

    #[tokio::test]
    async fn files_wire_maps_agent_failures_to_envd_statuses() {
        let agent = |kind| {
            E2bError::from(ClientError::Agent(AgentError { kind, message: "m".into() })).status()
        };
        assert_eq!(agent(ErrorKind::NotFound), StatusCode::NOT_FOUND);
        assert_eq!(agent(ErrorKind::IsADirectory), StatusCode::BAD_REQUEST);
        assert_eq!(agent(ErrorKind::AlreadyExists), StatusCode::CONFLICT);
        assert_eq!(agent(ErrorKind::PermissionDenied), StatusCode::FORBIDDEN);
        assert_eq!(agent(ErrorKind::NoSpace), StatusCode::INSUFFICIENT_STORAGE);
        assert_eq!(agent(ErrorKind::LimitReached), StatusCode::TOO_MANY_REQUESTS);
        // A closed channel: 502, which the SDK reads as "the sandbox is gone".
        let (status, _, v) = parts(E2bError::from(ClientError::Closed).into_response()).await;
        assert_eq!(status, StatusCode::BAD_GATEWAY);
        assert_eq!(v["code"], 502);
    }

    #[tokio::test]
    async fn sandbox_traffic_not_found_is_e2bs_proxy_body() {
        let (status, _, v) = parts(E2bError::sandbox_not_found("sbx1").into_response()).await;
        assert_eq!(status, StatusCode::BAD_GATEWAY);
        assert_eq!(
            v,
            json!({"sandboxId": "sbx1", "message": "The sandbox was not found", "code": 502})
        );
    }

    #[tokio::test]
    async fn sandbox_traffic_closed_port_names_the_port() {
        let (status, _, v) =
            parts(E2bError::port_not_open("sbx1", 8080, "connection refused").into_response())
                .await;
        assert_eq!(status, StatusCode::BAD_GATEWAY);
        assert_eq!(v["sandboxId"], "sbx1");
        assert_eq!(v["code"], 502);
        let m = v["message"].as_str().unwrap_or_default();
        assert!(m.contains("port is not open") && m.contains("8080"), "{m}");
    }

    #[tokio::test]
    async fn interpreter_wire_is_the_plain_shape() {
        // Port 49999 errors: the SDK reads 404 as NotFoundException and 502 as a timeout.
        let (status, _, v) =
            parts(E2bError::not_found("context c1 not found").into_response()).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(v, json!({"code": 404, "message": "context c1 not found"}));
    }

    #[test]
    fn internal_failures_hide_their_detail() {
        let e = E2bError::from(ManagerError::Internal("open /var/lib/ringfence/x".into()));
        assert_eq!(e.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert!(!e.message().contains("/var/lib"), "{}", e.message());
    }
}
