//! The MCP tools, each carried out as the E2B request an SDK would send, through the E2B
//! router itself: control-plane calls with the caller's API key, sandbox calls with the
//! sandbox's access token (fetched with that key, so another key's sandbox is "not found").

use axum::Router;
use axum::body::{Body, Bytes};
use axum::http::{Method, Request, StatusCode};
use base64::Engine as _;
use serde_json::{Map, Value, json};
use tower::ServiceExt as _;

use super::INVALID_PARAMS;

/// envd's and the code interpreter's ports (as the SDKs address them).
const ENVD_PORT: &str = "49983";
const JUPYTER_PORT: &str = "49999";
/// Most bytes of a response body read back from the router (command output, a file).
const MAX_BODY: usize = 64 << 20;
/// Most characters of a stream (stdout, stderr, a file) put into a tool result: a model's
/// context is the limit, not the sandbox's output.
const MAX_TEXT: usize = 100_000;
/// A command's timeout when the caller names none, and the most it may ask for.
const DEFAULT_CMD_TIMEOUT_S: f64 = 60.0;
const MAX_CMD_TIMEOUT_S: f64 = 3600.0;

/// One MCP request's caller and the router its tools go through.
#[derive(Debug)]
pub struct Ctx {
    pub api: Router,
    pub key: String,
}

/// A JSON-RPC error: (code, message).
type RpcErr = (i64, String);

/// A tool's failure, reported to the model as a result with `isError` (the protocol's way
/// for errors a model can act on), not as a JSON-RPC error.
struct ToolError(String);

impl<T: Into<String>> From<T> for ToolError {
    fn from(s: T) -> Self {
        ToolError(s.into())
    }
}

type ToolResult = Result<Vec<Value>, ToolError>;

fn text(s: impl Into<String>) -> Value {
    json!({"type": "text", "text": s.into()})
}

fn schema(props: Value, required: &[&str]) -> Value {
    json!({"type": "object", "properties": props, "required": required, "additionalProperties": false})
}

/// The tool catalogue (`tools/list`).
pub fn list() -> Value {
    let id = json!({"type": "string", "description": "The sandbox's id (from create_sandbox)."});
    json!([
        {
            "name": "create_sandbox",
            "description": "Start a new isolated sandbox. Returns its id.",
            "inputSchema": schema(json!({
                "template": {"type": "string", "description": "Template name (default \"base\"; \"code-interpreter-v1\" for run_code)."},
                "tier": {"type": "string", "description": "Isolation tier (e.g. \"jail\", \"gvisor\"); default: the server's."},
                "timeout": {"type": "integer", "minimum": 0, "description": "Seconds until the sandbox is killed (default: the server's)."},
                "allow_internet_access": {"type": "boolean", "description": "false: no outbound network at all."},
                "allow_out": {"type": "array", "items": {"type": "string"}, "description": "Only these destinations (CIDRs, IPs or host names) may be reached."},
                "deny_out": {"type": "array", "items": {"type": "string"}, "description": "These destinations may not be reached."},
                "metadata": {"type": "object", "additionalProperties": {"type": "string"}}
            }), &[]),
        },
        {
            "name": "list_sandboxes",
            "description": "List this API key's sandboxes.",
            "inputSchema": schema(json!({}), &[]),
        },
        {
            "name": "kill_sandbox",
            "description": "Kill a sandbox and discard its files.",
            "inputSchema": schema(json!({"sandbox_id": id}), &["sandbox_id"]),
        },
        {
            "name": "run_command",
            "description": "Run a shell command (bash -l -c) in a sandbox; returns stdout, stderr and the exit code.",
            "inputSchema": schema(json!({
                "sandbox_id": id,
                "command": {"type": "string"},
                "timeout": {"type": "number", "exclusiveMinimum": 0, "description": "Seconds before the command is killed (default 60)."},
                "cwd": {"type": "string"},
                "envs": {"type": "object", "additionalProperties": {"type": "string"}}
            }), &["sandbox_id", "command"]),
        },
        {
            "name": "run_code",
            "description": "Run code in a code-interpreter sandbox (template code-interpreter-v1). State persists per context. Rich results (PNG charts) come back as images.",
            "inputSchema": schema(json!({
                "sandbox_id": id,
                "code": {"type": "string"},
                "language": {"type": "string", "description": "python (default), javascript or bash."},
                "context_id": {"type": "string", "description": "A context from an earlier run; default: the language's shared context."}
            }), &["sandbox_id", "code"]),
        },
        {
            "name": "read_file",
            "description": "Read a file from a sandbox.",
            "inputSchema": schema(json!({"sandbox_id": id, "path": {"type": "string"}}), &["sandbox_id", "path"]),
        },
        {
            "name": "write_file",
            "description": "Write a text file in a sandbox (parent directories are created).",
            "inputSchema": schema(json!({"sandbox_id": id, "path": {"type": "string"}, "content": {"type": "string"}}), &["sandbox_id", "path", "content"]),
        },
        {
            "name": "list_files",
            "description": "List a directory in a sandbox.",
            "inputSchema": schema(json!({"sandbox_id": id, "path": {"type": "string"}}), &["sandbox_id", "path"]),
        },
    ])
}

/// `tools/call`.
pub async fn call(ctx: &Ctx, params: &Value) -> Result<Value, RpcErr> {
    let name = params
        .get("name")
        .and_then(Value::as_str)
        .ok_or((INVALID_PARAMS, "tools/call needs params.name (a string)".to_string()))?;
    let empty = Map::new();
    let args = match params.get("arguments") {
        None | Some(Value::Null) => &empty,
        Some(Value::Object(m)) => m,
        Some(_) => return Err((INVALID_PARAMS, "params.arguments must be an object".into())),
    };
    let known = list();
    let Some(tool) = known.as_array().and_then(|t| t.iter().find(|t| t["name"] == name)) else {
        return Err((INVALID_PARAMS, format!("unknown tool {name:?}")));
    };
    let out = match check_args(tool, args) {
        Err(e) => Err(e),
        Ok(()) => match name {
            "create_sandbox" => create(ctx, args).await,
            "list_sandboxes" => list_sandboxes(ctx).await,
            "kill_sandbox" => kill(ctx, args).await,
            "run_command" => run_command(ctx, args).await,
            "run_code" => run_code(ctx, args).await,
            "read_file" => read_file(ctx, args).await,
            "write_file" => write_file(ctx, args).await,
            "list_files" => list_files(ctx, args).await,
            _ => Err(ToolError(format!("tool {name:?} is not implemented"))),
        },
    };
    Ok(match out {
        Ok(content) => json!({"content": content, "isError": false}),
        Err(ToolError(m)) => json!({"content": [text(format!("error: {m}"))], "isError": true}),
    })
}

/// Checks `args` against the tool's schema as far as it constrains them: no unknown names,
/// every required one present, each of the declared JSON type.
fn check_args(tool: &Value, args: &Map<String, Value>) -> Result<(), ToolError> {
    let props = tool["inputSchema"]["properties"].as_object().cloned().unwrap_or_default();
    for k in args.keys() {
        if !props.contains_key(k) {
            let known: Vec<&str> = props.keys().map(String::as_str).collect();
            return Err(format!("unknown argument {k:?} (known: {})", known.join(", ")).into());
        }
    }
    for r in tool["inputSchema"]["required"].as_array().into_iter().flatten() {
        let r = r.as_str().unwrap_or_default();
        if args.get(r).is_none_or(Value::is_null) {
            return Err(format!("missing required argument {r:?}").into());
        }
    }
    for (k, v) in args {
        if v.is_null() {
            continue;
        }
        let ty = props[k]["type"].as_str().unwrap_or_default();
        let ok = match ty {
            "string" => v.is_string(),
            "integer" => v.is_i64() || v.is_u64(),
            "number" => v.is_number(),
            "boolean" => v.is_boolean(),
            "array" => v.as_array().is_some_and(|a| a.iter().all(Value::is_string)),
            "object" => v.as_object().is_some_and(|o| o.values().all(Value::is_string)),
            _ => true,
        };
        if !ok {
            let what = match ty {
                "array" => "an array of strings",
                "object" => "an object of string values",
                "integer" => "a whole number",
                other => other,
            };
            return Err(format!("argument {k:?} must be {what}, got {v}").into());
        }
    }
    Ok(())
}

fn str_arg<'a>(args: &'a Map<String, Value>, k: &str) -> Option<&'a str> {
    args.get(k).and_then(Value::as_str)
}

/// A sandbox id goes into a request path: only the characters ids are made of.
fn check_id(id: &str) -> Result<(), ToolError> {
    if id.is_empty() || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
        return Err(format!("sandbox_id {id:?} is not a sandbox id").into());
    }
    Ok(())
}

/// A response from the router.
struct Resp {
    status: StatusCode,
    body: Bytes,
}

impl Resp {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }

    /// The error an E2B or Connect answer carries, as one line for the model.
    fn error(&self, what: &str) -> ToolError {
        let v = self.json();
        let msg = v
            .get("message")
            .and_then(Value::as_str)
            .map(str::to_string)
            .unwrap_or_else(|| String::from_utf8_lossy(&self.body).chars().take(500).collect());
        ToolError(format!("{what}: {msg} (HTTP {})", self.status.as_u16()))
    }
}

impl Ctx {
    async fn send(&self, req: Request<Body>) -> Result<Resp, ToolError> {
        let resp = match self.api.clone().oneshot(req).await {
            Ok(r) => r,
            Err(never) => match never {},
        };
        let status = resp.status();
        let body = axum::body::to_bytes(resp.into_body(), MAX_BODY)
            .await
            .map_err(|e| ToolError(format!("reading the answer failed: {e}")))?;
        Ok(Resp { status, body })
    }

    /// A control-plane request with the caller's key.
    async fn api(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Resp, ToolError> {
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("x-api-key", &self.key)
            .header("content-type", "application/json")
            .body(body.map_or_else(Body::empty, |b| Body::from(b.to_string())))
            .map_err(|e| ToolError(format!("bad request: {e}")))?;
        self.send(req).await
    }

    /// The caller's sandbox `id` (its detail): "not found" for another key's.
    async fn sandbox(&self, id: &str) -> Result<Value, ToolError> {
        check_id(id)?;
        let r = self.api(Method::GET, &format!("/sandboxes/{id}"), None).await?;
        if r.status != StatusCode::OK {
            return Err(r.error(&format!("sandbox {id}")));
        }
        let v = r.json();
        if v["state"] != "running" {
            return Err(format!("sandbox {id} is {} (not running)", v["state"]).into());
        }
        Ok(v)
    }

    /// A request to a port of sandbox `sb` (its detail), with its access token.
    fn sandbox_req(
        sb: &Value,
        port: &str,
        method: Method,
        path: &str,
        content_type: &str,
    ) -> axum::http::request::Builder {
        Request::builder()
            .method(method)
            .uri(path)
            .header("e2b-sandbox-id", sb["sandboxID"].as_str().unwrap_or_default())
            .header("e2b-sandbox-port", port)
            .header("x-access-token", sb["envdAccessToken"].as_str().unwrap_or_default())
            .header("content-type", content_type)
    }
}

async fn create(ctx: &Ctx, args: &Map<String, Value>) -> ToolResult {
    let mut template = str_arg(args, "template").unwrap_or("base").to_string();
    if let Some(tier) = str_arg(args, "tier") {
        if template.contains('@') {
            return Err(
                "give the tier either as \"tier\" or in the template (name@tier), not both".into(),
            );
        }
        template = format!("{template}@{tier}");
    }
    let mut body = json!({"templateID": template});
    if let Some(t) = args.get("timeout").filter(|v| !v.is_null()) {
        body["timeout"] = t.clone();
    }
    if let Some(m) = args.get("metadata").filter(|v| !v.is_null()) {
        body["metadata"] = m.clone();
    }
    let mut network = Map::new();
    if let Some(a) = args.get("allow_out").filter(|v| !v.is_null()) {
        network.insert("allowOut".into(), a.clone());
    }
    if let Some(d) = args.get("deny_out").filter(|v| !v.is_null()) {
        network.insert("denyOut".into(), d.clone());
    }
    if !network.is_empty() {
        body["network"] = Value::Object(network);
    }
    if let Some(i) = args.get("allow_internet_access").filter(|v| !v.is_null()) {
        body["allow_internet_access"] = i.clone();
    }
    let r = ctx.api(Method::POST, "/sandboxes", Some(body)).await?;
    if r.status != StatusCode::CREATED {
        return Err(r.error("create_sandbox"));
    }
    let v = r.json();
    let id = v["sandboxID"].as_str().unwrap_or_default();
    Ok(vec![text(json!({"sandbox_id": id, "template": v["templateID"]}).to_string())])
}

async fn list_sandboxes(ctx: &Ctx) -> ToolResult {
    let r = ctx.api(Method::GET, "/sandboxes", None).await?;
    if r.status != StatusCode::OK {
        return Err(r.error("list_sandboxes"));
    }
    let list: Vec<Value> = r
        .json()
        .as_array()
        .into_iter()
        .flatten()
        .map(|s| {
            json!({
                "sandbox_id": s["sandboxID"], "template": s["templateID"], "state": s["state"],
                "started_at": s["startedAt"], "end_at": s["endAt"], "metadata": s["metadata"],
            })
        })
        .collect();
    Ok(vec![text(Value::Array(list).to_string())])
}

async fn kill(ctx: &Ctx, args: &Map<String, Value>) -> ToolResult {
    let id = str_arg(args, "sandbox_id").unwrap_or_default();
    check_id(id)?;
    let r = ctx.api(Method::DELETE, &format!("/sandboxes/{id}"), None).await?;
    if r.status != StatusCode::NO_CONTENT {
        return Err(r.error(&format!("kill_sandbox {id}")));
    }
    Ok(vec![text(format!("sandbox {id} killed"))])
}

/// `s` cut to [`MAX_TEXT`] characters, saying so.
fn capped(s: &str) -> String {
    match s.char_indices().nth(MAX_TEXT) {
        None => s.to_string(),
        Some((at, _)) => format!("{}\n[... {} more bytes not shown]", &s[..at], s.len() - at),
    }
}

/// One Connect envelope of JSON.
fn envelope(msg: &Value) -> Vec<u8> {
    let data = msg.to_string().into_bytes();
    let mut out = Vec::with_capacity(data.len() + 5);
    out.push(0);
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(&data);
    out
}

/// The (flags, JSON) envelopes of a Connect stream.
fn frames(mut rest: &[u8]) -> Vec<(u8, Value)> {
    let mut out = Vec::new();
    while rest.len() >= 5 {
        let len = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
        let Some(data) = rest.get(5..5 + len) else { break };
        out.push((rest[0], serde_json::from_slice(data).unwrap_or(Value::Null)));
        rest = &rest[5 + len..];
    }
    out
}

async fn run_command(ctx: &Ctx, args: &Map<String, Value>) -> ToolResult {
    let sb = ctx.sandbox(str_arg(args, "sandbox_id").unwrap_or_default()).await?;
    let command = str_arg(args, "command").unwrap_or_default();
    let timeout = args.get("timeout").and_then(Value::as_f64).unwrap_or(DEFAULT_CMD_TIMEOUT_S);
    if !(timeout > 0.0 && timeout <= MAX_CMD_TIMEOUT_S) {
        return Err(format!(
            "timeout must be more than 0 and at most {MAX_CMD_TIMEOUT_S} seconds, got {timeout}"
        )
        .into());
    }
    let mut process = json!({"cmd": "/bin/bash", "args": ["-l", "-c", command]});
    if let Some(cwd) = str_arg(args, "cwd") {
        process["cwd"] = json!(cwd);
    }
    if let Some(envs) = args.get("envs").filter(|v| !v.is_null()) {
        process["envs"] = envs.clone();
    }
    let ms = (timeout * 1000.0).ceil() as u64;
    let req = Ctx::sandbox_req(
        &sb,
        ENVD_PORT,
        Method::POST,
        "/process.Process/Start",
        "application/connect+json",
    )
    .header("connect-timeout-ms", ms.to_string())
    .body(Body::from(envelope(&json!({"process": process, "stdin": false}))))
    .map_err(|e| ToolError(format!("bad request: {e}")))?;
    let r = ctx.send(req).await?;
    if r.status != StatusCode::OK {
        return Err(r.error("run_command"));
    }
    let b64 = base64::engine::general_purpose::STANDARD;
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    let (mut end, mut failure) = (None, None);
    for (flags, v) in frames(&r.body) {
        let data = &v["event"]["data"];
        if let Some(d) = data["stdout"].as_str().and_then(|d| b64.decode(d).ok()) {
            stdout.extend(d);
        }
        if let Some(d) = data["stderr"].as_str().and_then(|d| b64.decode(d).ok()) {
            stderr.extend(d);
        }
        if !v["event"]["end"].is_null() {
            end = Some(v["event"]["end"].clone());
        }
        if flags & 2 != 0 && !v["error"].is_null() {
            failure = Some(v["error"].clone());
        }
    }
    let stdout = capped(&String::from_utf8_lossy(&stdout));
    let stderr = capped(&String::from_utf8_lossy(&stderr));
    let exit = end.as_ref().and_then(|e| e["exitCode"].as_i64());
    let status = match (&end, &failure) {
        (_, Some(f)) if f["code"] == "deadline_exceeded" => {
            return Err(format!(
                "command timed out after {timeout} s and was killed\nstdout:\n{stdout}\nstderr:\n{stderr}"
            )
            .into());
        }
        (None, Some(f)) => {
            return Err(
                format!("run_command: {}", f["message"].as_str().unwrap_or("failed")).into()
            );
        }
        (Some(e), _) => match exit {
            Some(c) => format!("exit code {c}"),
            None => format!("ended: {}", e["status"].as_str().unwrap_or("unknown")),
        },
        (None, None) => "ended without an exit status".to_string(),
    };
    let summary = json!({"exit_code": exit, "stdout": stdout, "stderr": stderr, "status": status});
    Ok(vec![text(summary.to_string())])
}

async fn run_code(ctx: &Ctx, args: &Map<String, Value>) -> ToolResult {
    let id = str_arg(args, "sandbox_id").unwrap_or_default();
    let sb = ctx.sandbox(id).await?;
    if sb["templateID"] != ringfence_jail::template::INTERP_TEMPLATE {
        return Err(format!(
            "sandbox {id} runs template {}; run_code needs one created with template {:?}",
            sb["templateID"],
            ringfence_jail::template::INTERP_TEMPLATE
        )
        .into());
    }
    let mut body = json!({"code": str_arg(args, "code").unwrap_or_default()});
    if let Some(l) = str_arg(args, "language") {
        body["language"] = json!(l);
    }
    if let Some(c) = str_arg(args, "context_id") {
        body["context_id"] = json!(c);
    }
    let req = Ctx::sandbox_req(&sb, JUPYTER_PORT, Method::POST, "/execute", "application/json")
        .body(Body::from(body.to_string()))
        .map_err(|e| ToolError(format!("bad request: {e}")))?;
    let r = ctx.send(req).await?;
    if r.status != StatusCode::OK {
        return Err(r.error("run_code"));
    }
    let (mut stdout, mut stderr) = (String::new(), String::new());
    let mut content = Vec::new();
    let mut error = None;
    for line in r.body.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
        let v: Value = serde_json::from_slice(line).unwrap_or(Value::Null);
        match v["type"].as_str() {
            Some("stdout") => stdout.push_str(v["text"].as_str().unwrap_or_default()),
            Some("stderr") => stderr.push_str(v["text"].as_str().unwrap_or_default()),
            Some("result") => content.extend(result_content(&v)),
            Some("error") => {
                error = Some(format!(
                    "{}: {}\n{}",
                    v["name"].as_str().unwrap_or("Error"),
                    v["value"].as_str().unwrap_or_default(),
                    v["traceback"].as_str().unwrap_or_default()
                ));
            }
            _ => {}
        }
    }
    let mut out = Vec::new();
    if !stdout.is_empty() {
        out.push(text(format!("stdout:\n{}", capped(&stdout))));
    }
    if !stderr.is_empty() {
        out.push(text(format!("stderr:\n{}", capped(&stderr))));
    }
    out.extend(content);
    if let Some(e) = error {
        // The cell raised: the output so far and the traceback, flagged as an error.
        let mut msg = capped(&e);
        for c in &out {
            if let Some(t) = c["text"].as_str() {
                msg = format!("{t}\n{msg}");
            }
        }
        return Err(msg.into());
    }
    if out.is_empty() {
        out.push(text("(no output)"));
    }
    Ok(out)
}

/// One execution result as MCP content: images as image content, the rest as text.
fn result_content(v: &Value) -> Vec<Value> {
    let mut out = Vec::new();
    for (field, mime) in [("png", "image/png"), ("jpeg", "image/jpeg")] {
        if let Some(d) = v[field].as_str() {
            out.push(json!({"type": "image", "data": d, "mimeType": mime}));
        }
    }
    for field in ["text", "markdown", "json", "latex"] {
        match &v[field] {
            Value::Null => {}
            Value::String(s) => out.push(text(capped(s))),
            other => out.push(text(capped(&other.to_string()))),
        }
        if !out.is_empty() && field == "text" {
            break;
        }
    }
    out
}

fn files_path(path: &str) -> String {
    let mut q = String::from("/files?path=");
    for b in path.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            q.push(b as char);
        } else {
            q.push_str(&format!("%{b:02X}"));
        }
    }
    q
}

async fn read_file(ctx: &Ctx, args: &Map<String, Value>) -> ToolResult {
    let sb = ctx.sandbox(str_arg(args, "sandbox_id").unwrap_or_default()).await?;
    let path = str_arg(args, "path").unwrap_or_default();
    let req = Ctx::sandbox_req(&sb, ENVD_PORT, Method::GET, &files_path(path), "text/plain")
        .body(Body::empty())
        .map_err(|e| ToolError(format!("bad request: {e}")))?;
    let r = ctx.send(req).await?;
    if r.status != StatusCode::OK {
        return Err(r.error(&format!("read_file {path:?}")));
    }
    Ok(vec![match std::str::from_utf8(&r.body) {
        Ok(s) => text(capped(s)),
        Err(_) if r.body.starts_with(b"\x89PNG\r\n\x1a\n") => json!({
            "type": "image",
            "data": base64::engine::general_purpose::STANDARD.encode(&r.body),
            "mimeType": "image/png",
        }),
        Err(_) => json!({
            "type": "resource",
            "resource": {
                "uri": format!("file://{path}"),
                "mimeType": "application/octet-stream",
                "blob": base64::engine::general_purpose::STANDARD.encode(&r.body),
            },
        }),
    }])
}

async fn write_file(ctx: &Ctx, args: &Map<String, Value>) -> ToolResult {
    let sb = ctx.sandbox(str_arg(args, "sandbox_id").unwrap_or_default()).await?;
    let path = str_arg(args, "path").unwrap_or_default();
    let content = str_arg(args, "content").unwrap_or_default();
    let boundary = format!("ringfence-mcp-{}", crate::manager::new_token());
    let mut body = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"file\"\r\n\
         Content-Type: application/octet-stream\r\n\r\n"
    )
    .into_bytes();
    body.extend_from_slice(content.as_bytes());
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    let req = Ctx::sandbox_req(
        &sb,
        ENVD_PORT,
        Method::POST,
        &files_path(path),
        &format!("multipart/form-data; boundary={boundary}"),
    )
    .body(Body::from(body))
    .map_err(|e| ToolError(format!("bad request: {e}")))?;
    let r = ctx.send(req).await?;
    if r.status != StatusCode::OK {
        return Err(r.error(&format!("write_file {path:?}")));
    }
    Ok(vec![text(format!("wrote {} bytes to {path}", content.len()))])
}

async fn list_files(ctx: &Ctx, args: &Map<String, Value>) -> ToolResult {
    let sb = ctx.sandbox(str_arg(args, "sandbox_id").unwrap_or_default()).await?;
    let path = str_arg(args, "path").unwrap_or_default();
    let req = Ctx::sandbox_req(
        &sb,
        ENVD_PORT,
        Method::POST,
        "/filesystem.Filesystem/ListDir",
        "application/json",
    )
    .body(Body::from(json!({"path": path, "depth": 1}).to_string()))
    .map_err(|e| ToolError(format!("bad request: {e}")))?;
    let r = ctx.send(req).await?;
    if r.status != StatusCode::OK {
        return Err(r.error(&format!("list_files {path:?}")));
    }
    let entries: Vec<Value> = r.json()["entries"]
        .as_array()
        .into_iter()
        .flatten()
        .map(
            |e| json!({"name": e["name"], "type": e["type"], "path": e["path"], "size": e["size"]}),
        )
        .collect();
    Ok(vec![text(Value::Array(entries).to_string())])
}
