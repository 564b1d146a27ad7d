//! envd end to end: hand-built HTTP requests through `envd::handle` into a real serve-mode
//! sandbox, checked at the wire level the SDKs see (Connect envelopes, status codes, JSON
//! shapes).
//!
//! Needs root (namespaces, cgroups, mounts) and the agent binary: `RINGFENCE_AGENT`, or
//! `target/<profile>/ringfence-agent` (`cargo build -p ringfence --bin ringfence-agent`).
//! Without either, each test prints SKIPPED and returns.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::io::{Read, Write};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::Request;
use axum::http::StatusCode;
use axum::response::Response;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use ringfence_jail::launch::Sandbox;
use ringfence_jail::monitor::Supervisor;
use ringfence_server::agent_client::AgentClient;
use ringfence_server::envd::{self, EnvdState};
use serde_json::{Value, json};
use support::jail::{FrameStream, envelope, request};

/// Cgroup slots of these tests, apart from the CLI's and its tests'.
const POOL_PREFIX: &str = "envdtest";
/// Longest any single wait may take before the test fails instead of hanging.
const WAIT: Duration = Duration::from_secs(20);

/// A serve-mode sandbox, its agent client and envd state. Fields drop in order.
struct Env {
    client: Arc<AgentClient>,
    state: Arc<EnvdState>,
    sandbox: Sandbox,
    _supervisor: Option<Supervisor>,
    rt: tokio::runtime::Runtime,
}

/// How a test's sandbox differs from the default (tmpfs disk, default limits).
#[derive(Debug, Default, Clone, Copy)]
struct Opts {
    /// Its disk is a filesystem image (`ringfence_jail::disk`) rather than a tmpfs.
    image: bool,
    memory: Option<u64>,
    disk: Option<u64>,
}

fn start(test: &str) -> Option<Env> {
    start_with(test, Opts::default())
}

fn start_with(test: &str, opts: Opts) -> Option<Env> {
    let mut cfg = support::jail::config_or_skip(test)?;
    if opts.image {
        match ringfence_jail::disk::DiskChoice::Image.resolve(&cfg.data_dir, true) {
            Ok((backend, _)) => cfg.disk = backend,
            Err(e) => {
                eprintln!("SKIPPED {test}: this host cannot make disk images: {e}");
                return None;
            }
        }
    }
    let mut limits = ringfence_jail::limits::Limits::default();
    limits.memory = opts.memory.or(limits.memory);
    limits.disk = opts.disk.unwrap_or(limits.disk);
    let (sandbox, supervisor) = support::jail::launch(&cfg, POOL_PREFIX, limits);
    let rt = support::jail::runtime();
    let client = support::jail::client(&rt, &sandbox);
    Some(Env { client, state: Arc::new(EnvdState::new()), sandbox, _supervisor: supervisor, rt })
}

macro_rules! env_or_skip {
    () => {
        match start(module_path!()) {
            Some(env) => env,
            None => return,
        }
    };
    ($opts:expr) => {
        match start_with(module_path!(), $opts) {
            Some(env) => env,
            None => return,
        }
    };
}

// ---------------------------------------------------------------------------------------------
// Wire helpers.

/// Splits a complete body into (flags, JSON) frames.
fn split_frames(bytes: &[u8]) -> Vec<(u8, Value)> {
    let mut out = Vec::new();
    let mut rest = bytes;
    while !rest.is_empty() {
        assert!(rest.len() >= 5, "truncated envelope prefix");
        let len = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
        let json = serde_json::from_slice(&rest[5..5 + len]).unwrap();
        out.push((rest[0], json));
        rest = &rest[5 + len..];
    }
    out
}

/// What a process stream carried.
#[derive(Debug, Default)]
struct Output {
    pid: Option<u64>,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    pty: Vec<u8>,
    end: Option<Value>,
    trailer: Option<Value>,
}

fn collect(frames: &[(u8, Value)]) -> Output {
    let mut out = Output::default();
    for (i, (flags, msg)) in frames.iter().enumerate() {
        if flags & 2 != 0 {
            assert_eq!(i, frames.len() - 1, "end of stream must come last");
            out.trailer = Some(msg.clone());
            continue;
        }
        let ev = &msg["event"];
        if let Some(start) = ev.get("start") {
            assert_eq!(i, 0, "start must be the first event");
            out.pid = start["pid"].as_u64();
        } else if let Some(data) = ev.get("data") {
            let take = |k: &str| data.get(k).map(|v| STANDARD.decode(v.as_str().unwrap()).unwrap());
            if let Some(b) = take("stdout") {
                out.stdout.extend(b);
            }
            if let Some(b) = take("stderr") {
                out.stderr.extend(b);
            }
            if let Some(b) = take("pty") {
                out.pty.extend(b);
            }
        } else if let Some(end) = ev.get("end") {
            out.end = Some(end.clone());
        } else {
            assert!(ev.get("keepalive").is_some(), "unknown event {msg}");
        }
    }
    out
}

impl Env {
    fn block<F: std::future::Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }

    async fn send(&self, req: Request) -> Response {
        envd::handle(self.client.clone(), self.state.clone(), req).await
    }

    /// A unary Connect call: (status, JSON body).
    async fn unary(&self, method: &str, msg: Value) -> (StatusCode, Value) {
        let req = request(
            "POST",
            &format!("/{method}"),
            &[("content-type", "application/json"), ("connect-protocol-version", "1")],
            serde_json::to_vec(&msg).unwrap(),
        );
        let resp = self.send(req).await;
        let status = resp.status();
        assert_eq!(resp.headers()["content-type"], "application/json");
        let body = axum::body::to_bytes(resp.into_body(), usize::MAX).await.unwrap();
        (status, serde_json::from_slice(&body).unwrap())
    }

    async fn ok(&self, method: &str, msg: Value) -> Value {
        let (status, v) = self.unary(method, msg).await;
        assert_eq!(status, StatusCode::OK, "{method}: {v}");
        v
    }

    /// A server-streaming call; checks the exact content type.
    async fn stream(&self, method: &str, msg: Value, headers: &[(&str, &str)]) -> FrameStream {
        let mut h =
            vec![("content-type", "application/connect+json"), ("connect-protocol-version", "1")];
        h.extend_from_slice(headers);
        let req = request("POST", &format!("/{method}"), &h, envelope(0, &msg));
        let resp = self.send(req).await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers()["content-type"], "application/connect+json");
        FrameStream::new(resp, WAIT)
    }

    async fn run(&self, msg: Value) -> Output {
        collect(&self.stream("process.Process/Start", msg, &[]).await.rest().await)
    }

    async fn sh(&self, script: &str) -> Output {
        self.run(json!({"process": {"cmd": "/bin/sh", "args": ["-c", script]}, "stdin": false}))
            .await
    }

    async fn pids(&self) -> Vec<u64> {
        let v = self.ok("process.Process/List", json!({})).await;
        v["processes"].as_array().unwrap().iter().map(|p| p["pid"].as_u64().unwrap()).collect()
    }

    /// Polls (bounded) until `pred` holds for the process list.
    async fn until_pids(&self, what: &str, pred: impl Fn(&[u64]) -> bool) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if pred(&self.pids().await) {
                return;
            }
            assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn get_file(&self, query: &str, headers: &[(&str, &str)]) -> Response {
        self.send(request("GET", &format!("/files?{query}"), headers, Vec::new())).await
    }

    async fn post_file(&self, query: &str, headers: &[(&str, &str)], body: Vec<u8>) -> Response {
        self.send(request("POST", &format!("/files?{query}"), headers, body)).await
    }
}

async fn json_body(resp: Response) -> Value {
    let body = axum::body::to_bytes(resp.into_body(), usize::MAX).await.unwrap();
    serde_json::from_slice(&body).unwrap()
}

async fn raw_body(resp: Response) -> Vec<u8> {
    axum::body::to_bytes(resp.into_body(), usize::MAX).await.unwrap().to_vec()
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn gunzip(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(data).read_to_end(&mut out).unwrap();
    out
}

fn multipart(boundary: &str, parts: &[(&str, &str, &[u8])]) -> Vec<u8> {
    let mut body = Vec::new();
    for (name, filename, data) in parts {
        body.extend_from_slice(
            format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"{filename}\"\r\nContent-Type: application/octet-stream\r\n\r\n"
            )
            .as_bytes(),
        );
        body.extend_from_slice(data);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    body
}

// ---------------------------------------------------------------------------------------------
// Tests.

#[test]
fn health_and_unknown_routes() {
    let env = env_or_skip!();
    env.block(async {
        let r = env.send(request("GET", "/health", &[], Vec::new())).await;
        assert_eq!(r.status(), StatusCode::NO_CONTENT);
        let r = env.send(request("POST", "/process.Process/Nope", &[], Vec::new())).await;
        assert_eq!(r.status(), StatusCode::NOT_FOUND);
        assert_eq!(json_body(r).await["code"], "unimplemented");
        let r = env.send(request("GET", "/nope", &[], Vec::new())).await;
        assert_eq!(r.status(), StatusCode::NOT_FOUND);
    });
}

#[test]
fn commands_run_like_the_capture() {
    let env = env_or_skip!();
    env.block(async {
        // The SDK's `commands.run('echo hi')`.
        let out = env
            .run(json!({"process": {"cmd": "/bin/bash", "args": ["-l", "-c", "echo hi"]}, "stdin": false}))
            .await;
        assert!(out.pid.is_some_and(|p| p > 0));
        assert_eq!(out.stdout, b"hi\n");
        assert_eq!(out.end, Some(json!({"exited": true, "status": "exit status 0"})));
        assert_eq!(out.trailer, Some(json!({})));

        let out = env.sh("echo oops >&2; exit 3").await;
        assert_eq!(out.stderr, b"oops\n");
        let end = out.end.unwrap();
        assert_eq!(end["exitCode"], 3);
        assert_eq!(end["status"], "exit status 3");

        // Environment, working directory and user.
        let out = env
            .run(json!({
                "process": {"cmd": "/bin/sh", "args": ["-c", "echo $FOO; pwd; id -u"], "envs": {"FOO": "bar"}, "cwd": "/tmp"},
                "stdin": false
            }))
            .await;
        assert_eq!(String::from_utf8_lossy(&out.stdout), "bar\n/tmp\n1000\n");

        // A bare JSON body is accepted too.
        let req = request(
            "POST",
            "/process.Process/Start",
            &[("content-type", "application/json")],
            serde_json::to_vec(&json!({"process": {"cmd": "/bin/echo", "args": ["x"]}})).unwrap(),
        );
        let out = collect(&FrameStream::new(env.send(req).await, WAIT).rest().await);
        assert_eq!(out.stdout, b"x\n");

        // Root by Basic auth.
        let mut s = env
            .stream(
                "process.Process/Start",
                json!({"process": {"cmd": "/bin/sh", "args": ["-c", "id -u"]}, "stdin": false}),
                &[("authorization", "Basic cm9vdDo=")],
            )
            .await;
        assert_eq!(collect(&s.rest().await).stdout, b"0\n");

        // Spawn failures end the stream with an error, status 200.
        let frames = env
            .stream("process.Process/Start", json!({"process": {"cmd": "/no/such/cmd"}}), &[])
            .await
            .rest()
            .await;
        assert_eq!(frames.len(), 1);
        assert_eq!(frames[0].0, 2);
        assert_eq!(frames[0].1["error"]["code"], "not_found");
        let frames = env
            .stream(
                "process.Process/Start",
                json!({"process": {"cmd": "/bin/true"}}),
                &[("authorization", "Basic Ym9iOg==")],
            )
            .await
            .rest()
            .await;
        assert_eq!(frames[0].1["error"]["code"], "unauthenticated");
    });
}

#[test]
fn stdin_signals_tags_and_reconnects() {
    let env = env_or_skip!();
    env.block(async {
        // stdin defaults to open; SendInput, then CloseStdin ends `cat`.
        let mut s = env
            .stream("process.Process/Start", json!({"process": {"cmd": "/bin/cat"}}), &[])
            .await;
        let (_, start) = s.next().await.unwrap();
        let pid = start["event"]["start"]["pid"].as_u64().unwrap();
        let sel = json!({"pid": pid});
        env.ok("process.Process/SendInput", json!({"process": sel, "input": {"stdin": "aGkK"}}))
            .await;
        let (_, data) = s.next().await.unwrap();
        assert_eq!(data["event"]["data"]["stdout"], "aGkK");
        env.ok("process.Process/CloseStdin", json!({"process": sel})).await;
        let out = collect(&s.rest().await);
        assert_eq!(out.end.unwrap()["exited"], true);

        // A tagged process shows in List, is found by tag, and SIGKILL ends it.
        let mut s = env
            .stream(
                "process.Process/Start",
                json!({"process": {"cmd": "/bin/sleep", "args": ["30"]}, "tag": "sleeper", "stdin": false}),
                &[],
            )
            .await;
        let (_, start) = s.next().await.unwrap();
        let pid = start["event"]["start"]["pid"].as_u64().unwrap();
        let list = env.ok("process.Process/List", json!({})).await;
        let mine = list["processes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["pid"] == pid)
            .cloned()
            .unwrap();
        assert_eq!(mine["tag"], "sleeper");
        assert_eq!(mine["config"]["cmd"], "/bin/sleep");
        assert_eq!(mine["config"]["args"], json!(["30"]));
        env.ok(
            "process.Process/SendSignal",
            json!({"process": {"tag": "sleeper"}, "signal": "SIGNAL_SIGKILL"}),
        )
        .await;
        let end = collect(&s.rest().await).end.unwrap();
        assert_eq!(end, json!({"exitCode": -1, "exited": false, "status": "signal: killed", "error": "signal: killed"}));
        // Reaped by the time SendSignal answers.
        assert!(!env.pids().await.contains(&pid));
        // Gone: the SDK's kill() returns False on not_found.
        let (status, v) = env
            .unary(
                "process.Process/SendSignal",
                json!({"process": {"pid": pid}, "signal": "SIGNAL_SIGKILL"}),
            )
            .await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(v["code"], "not_found");

        // A process outlives its stream; Connect reattaches and sees the end.
        let mut s = env
            .stream(
                "process.Process/Start",
                json!({"process": {"cmd": "/bin/sh", "args": ["-c", "read x; echo got $x"]}}),
                &[],
            )
            .await;
        let (_, start) = s.next().await.unwrap();
        let pid = start["event"]["start"]["pid"].as_u64().unwrap();
        drop(s);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(env.pids().await.contains(&pid), "the process died with its stream");
        let mut c = env.stream("process.Process/Connect", json!({"process": {"pid": pid}}), &[]).await;
        let (_, first) = c.next().await.unwrap();
        assert_eq!(first["event"]["start"]["pid"], pid);
        env.ok("process.Process/SendInput", json!({"process": {"pid": pid}, "input": {"stdin": "eW8K"}}))
            .await;
        let out = collect(&c.rest().await);
        assert_eq!(out.stdout, b"got yo\n");
        assert_eq!(out.end.unwrap()["exited"], true);

        // Connect to nothing.
        let frames = env
            .stream("process.Process/Connect", json!({"process": {"pid": 999_999}}), &[])
            .await
            .rest()
            .await;
        assert_eq!(frames[0].1["error"]["code"], "not_found");

        // StreamInput: client streaming, then a single `{}` and the end of stream.
        let mut s = env
            .stream("process.Process/Start", json!({"process": {"cmd": "/bin/cat"}, "tag": "c2"}), &[])
            .await;
        s.next().await.unwrap();
        let mut body = envelope(0, &json!({"start": {"process": {"tag": "c2"}}}));
        body.extend(envelope(0, &json!({"keepalive": {}})));
        body.extend(envelope(0, &json!({"data": {"input": {"stdin": "YWI="}}})));
        body.extend(envelope(0, &json!({"data": {"input": {"stdin": "Ywo="}}})));
        let req = request(
            "POST",
            "/process.Process/StreamInput",
            &[("content-type", "application/connect+json")],
            body,
        );
        let resp = env.send(req).await;
        assert_eq!(resp.headers()["content-type"], "application/connect+json");
        assert_eq!(split_frames(&raw_body(resp).await), vec![(0, json!({})), (2, json!({}))]);
        let mut got = Vec::new();
        while got.len() < 4 {
            let (_, data) = s.next().await.unwrap();
            got.extend(STANDARD.decode(data["event"]["data"]["stdout"].as_str().unwrap()).unwrap());
        }
        assert_eq!(got, b"abc\n");
        env.ok("process.Process/SendSignal", json!({"process": {"tag": "c2"}, "signal": "SIGNAL_SIGTERM"}))
            .await;
        assert_eq!(collect(&s.rest().await).end.unwrap()["status"], "signal: terminated");
    });
}

#[test]
fn pty_sessions() {
    let env = env_or_skip!();
    env.block(async {
        let mut s = env
            .stream(
                "process.Process/Start",
                json!({
                    "process": {"cmd": "/bin/sh", "args": ["-c", "stty size; read x; echo got $x; stty size"], "envs": {"TERM": "xterm"}},
                    "pty": {"size": {"cols": 100, "rows": 30}},
                    "stdin": false
                }),
                &[],
            )
            .await;
        let (_, start) = s.next().await.unwrap();
        let pid = start["event"]["start"]["pid"].as_u64().unwrap();
        let mut seen = Vec::new();
        while !String::from_utf8_lossy(&seen).contains("30 100") {
            let (_, f) = s.next().await.unwrap();
            let pty = f["event"]["data"]["pty"].as_str().expect("pty data");
            seen.extend(STANDARD.decode(pty).unwrap());
        }
        env.ok(
            "process.Process/Update",
            json!({"process": {"pid": pid}, "pty": {"size": {"cols": 120, "rows": 40}}}),
        )
        .await;
        env.ok("process.Process/SendInput", json!({"process": {"pid": pid}, "input": {"pty": "aGkK"}}))
            .await;
        let out = collect(&s.rest().await);
        let text = String::from_utf8_lossy(&out.pty);
        assert!(text.contains("got hi"), "{text:?}");
        assert!(text.contains("40 120"), "{text:?}");
        assert_eq!(out.end.unwrap()["exited"], true);
    });
}

#[test]
fn deadlines_and_keepalives() {
    let env = env_or_skip!();
    env.block(async {
        // Start's Connect-Timeout-Ms kills the command, as envd does.
        let mut s = env
            .stream(
                "process.Process/Start",
                json!({"process": {"cmd": "/bin/sleep", "args": ["30"]}, "stdin": false}),
                &[("connect-timeout-ms", "1500"), ("keepalive-ping-interval", "1")],
            )
            .await;
        let frames = s.rest().await;
        let pid = frames[0].1["event"]["start"]["pid"].as_u64().unwrap();
        assert!(
            frames.iter().any(|(_, f)| f["event"].get("keepalive").is_some()),
            "no keepalive in {frames:?}"
        );
        let (flags, last) = frames.last().unwrap();
        assert_eq!(*flags, 2);
        assert_eq!(last["error"]["code"], "deadline_exceeded");
        env.until_pids("the timed-out command to die", |p| !p.contains(&pid)).await;

        // Even when the client went away first.
        let mut s = env
            .stream(
                "process.Process/Start",
                json!({"process": {"cmd": "/bin/sleep", "args": ["30"]}, "stdin": false}),
                &[("connect-timeout-ms", "1000")],
            )
            .await;
        let (_, start) = s.next().await.unwrap();
        let pid = start["event"]["start"]["pid"].as_u64().unwrap();
        drop(s);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(env.pids().await.contains(&pid));
        env.until_pids("the abandoned command to die", |p| !p.contains(&pid)).await;
    });
}

#[test]
fn files_upload_and_download() {
    let env = env_or_skip!();
    env.block(async {
        // The SDK's multipart write with `path`.
        let body = multipart("XyZ", &[("file", "/tmp/a", b"x")]);
        let r = env
            .post_file(
                "path=/tmp/a",
                &[("content-type", "multipart/form-data; boundary=XyZ")],
                body,
            )
            .await;
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(json_body(r).await, json!([{"name": "a", "type": "file", "path": "/tmp/a"}]));
        let r = env.get_file("path=/tmp/a", &[("accept-encoding", "identity")]).await;
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()["content-disposition"], "inline; filename=\"a\"");
        assert_eq!(raw_body(r).await, b"x");

        // Several files, targets from the file names; relative ones land in the home.
        let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let body = multipart("b0", &[("file", "d/one.txt", b"1"), ("file", "/tmp/big.bin", &big)]);
        let r = env
            .post_file(
                "username=user",
                &[("content-type", "multipart/form-data; boundary=b0")],
                body,
            )
            .await;
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(
            json_body(r).await,
            json!([
                {"name": "one.txt", "type": "file", "path": "/home/user/d/one.txt"},
                {"name": "big.bin", "type": "file", "path": "/tmp/big.bin"}
            ])
        );
        let r = env.get_file("path=d/one.txt", &[]).await;
        assert_eq!(r.headers()["content-type"], "text/plain; charset=utf-8");
        assert_eq!(raw_body(r).await, b"1");

        // Large downloads stream, with and without gzip.
        let r = env.get_file("path=/tmp/big.bin", &[]).await;
        assert_eq!(r.status(), StatusCode::OK);
        assert!(r.headers().get("content-encoding").is_none());
        assert_eq!(raw_body(r).await, big);
        let r = env.get_file("path=/tmp/big.bin", &[("accept-encoding", "gzip, deflate")]).await;
        assert_eq!(r.headers()["content-encoding"], "gzip");
        assert_eq!(gunzip(&raw_body(r).await), big);

        // Octet-stream, gzip-encoded, into a new directory; then an empty file.
        let r = env
            .post_file(
                "path=/tmp/new/dir/z.txt",
                &[("content-type", "application/octet-stream"), ("content-encoding", "gzip")],
                gzip(&big),
            )
            .await;
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(json_body(r).await[0]["path"], "/tmp/new/dir/z.txt");
        let r = env.get_file("path=/tmp/new/dir/z.txt", &[]).await;
        assert_eq!(raw_body(r).await, big);
        let r = env
            .post_file("path=/tmp/a", &[("content-type", "application/octet-stream")], Vec::new())
            .await;
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(raw_body(env.get_file("path=/tmp/a", &[]).await).await, b"");

        // Ownership follows the user.
        let r = env
            .post_file(
                "path=/tmp/rootfile&username=root",
                &[("content-type", "application/octet-stream")],
                b"r".to_vec(),
            )
            .await;
        assert_eq!(r.status(), StatusCode::OK);
        let v = env.ok("filesystem.Filesystem/Stat", json!({"path": "/tmp/rootfile"})).await;
        assert_eq!(v["entry"]["owner"], "root");

        // Errors: missing file, directory, unknown user, missing path, bad content type.
        let r = env.get_file("path=/tmp/nope", &[]).await;
        assert_eq!(r.status(), StatusCode::NOT_FOUND);
        assert_eq!(json_body(r).await["code"], 404);
        assert_eq!(env.get_file("path=/tmp", &[]).await.status(), StatusCode::BAD_REQUEST);
        assert_eq!(
            env.get_file("path=/tmp/a&username=bob", &[]).await.status(),
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(env.get_file("", &[]).await.status(), StatusCode::BAD_REQUEST);
        let r =
            env.post_file("", &[("content-type", "application/octet-stream")], b"x".to_vec()).await;
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
        let r =
            env.post_file("path=/tmp/q", &[("content-type", "text/plain")], b"x".to_vec()).await;
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
        let r = env
            .post_file("path=/tmp", &[("content-type", "application/octet-stream")], b"x".to_vec())
            .await;
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    });
}

#[test]
fn filesystem_rpcs() {
    let env = env_or_skip!();
    env.block(async {
        let v = env.ok("filesystem.Filesystem/MakeDir", json!({"path": "test_dir"})).await;
        let e = &v["entry"];
        assert_eq!(e["name"], "test_dir");
        assert_eq!(e["type"], "FILE_TYPE_DIRECTORY");
        assert_eq!(e["path"], "/home/user/test_dir");
        assert_eq!(e["mode"], 0o755);
        assert_eq!(e["permissions"], "drwxr-xr-x");
        assert_eq!(e["owner"], "user");
        assert_eq!(e["group"], "user");
        assert!(e["modifiedTime"].as_str().unwrap().ends_with('Z'));
        let (status, v) =
            env.unary("filesystem.Filesystem/MakeDir", json!({"path": "test_dir"})).await;
        assert_eq!(status, StatusCode::CONFLICT);
        assert_eq!(v["code"], "already_exists");

        let body = multipart("b", &[("file", "test_dir/test.txt", b"test")]);
        let r =
            env.post_file("", &[("content-type", "multipart/form-data; boundary=b")], body).await;
        assert_eq!(r.status(), StatusCode::OK);
        let v = env.ok("filesystem.Filesystem/Stat", json!({"path": "test_dir/test.txt"})).await;
        let e = &v["entry"];
        assert_eq!(e["type"], "FILE_TYPE_FILE");
        assert_eq!(e["size"], "4");
        assert_eq!(e["mode"], 0o644);
        assert_eq!(e["permissions"], "-rw-r--r--");

        // Symlinks report their target, as envd does (the SDK's test_file_symlink).
        let out = env.sh("cd ~/test_dir && ln -s test.txt link && ln -s nowhere dangling").await;
        assert_eq!(out.end.unwrap()["exited"], true);
        let v = env.ok("filesystem.Filesystem/Stat", json!({"path": "test_dir/link"})).await;
        let e = &v["entry"];
        assert_eq!(e["type"], "FILE_TYPE_FILE");
        assert_eq!(e["symlinkTarget"], "/home/user/test_dir/test.txt");
        assert_eq!(e["permissions"], "Lrwxrwxrwx");
        assert_eq!(e["mode"], 0o644);

        let v = env.ok("filesystem.Filesystem/ListDir", json!({"path": "test_dir"})).await;
        let names: Vec<&str> =
            v["entries"].as_array().unwrap().iter().map(|e| e["name"].as_str().unwrap()).collect();
        assert_eq!(names, ["dangling", "link", "test.txt"]);
        assert_eq!(v["entries"][0]["type"], "FILE_TYPE_UNSPECIFIED");
        let v = env.ok("filesystem.Filesystem/ListDir", json!({"path": "", "depth": 2})).await;
        assert!(
            v["entries"]
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e["path"] == "/home/user/test_dir/test.txt")
        );

        let v = env
            .ok(
                "filesystem.Filesystem/Move",
                json!({"source": "test_dir/test.txt", "destination": "moved/t.txt"}),
            )
            .await;
        assert_eq!(v["entry"]["path"], "/home/user/moved/t.txt");
        env.ok("filesystem.Filesystem/Remove", json!({"path": "moved"})).await;
        let (status, v) = env.unary("filesystem.Filesystem/Stat", json!({"path": "moved"})).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(v["code"], "not_found");
        // As envd's os.RemoveAll: nothing to remove is no error.
        env.ok("filesystem.Filesystem/Remove", json!({"path": "moved"})).await;
        let (status, _) = env.unary("filesystem.Filesystem/Remove", json!({"path": ""})).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        let (status, _) =
            env.unary("filesystem.Filesystem/ListDir", json!({"path": "/etc/passwd"})).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
    });
}

#[test]
fn watches() {
    let env = env_or_skip!();
    env.block(async {
        env.ok("filesystem.Filesystem/MakeDir", json!({"path": "/tmp/w"})).await;

        // Polling watcher.
        let v = env
            .ok(
                "filesystem.Filesystem/CreateWatcher",
                json!({"path": "/tmp/w", "includeEntry": true}),
            )
            .await;
        let id = v["watcherId"].as_str().unwrap().to_owned();
        env.sh("echo hi > /tmp/w/f").await;
        let deadline = tokio::time::Instant::now() + WAIT;
        let mut events = Vec::new();
        while !events.iter().any(|e: &Value| e["type"] == "EVENT_TYPE_WRITE") {
            assert!(tokio::time::Instant::now() < deadline, "no events: {events:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
            let v =
                env.ok("filesystem.Filesystem/GetWatcherEvents", json!({"watcherId": id})).await;
            events.extend(v["events"].as_array().unwrap().iter().cloned());
        }
        let create = events.iter().find(|e| e["type"] == "EVENT_TYPE_CREATE").unwrap();
        assert_eq!(create["name"], "f");
        assert_eq!(create["entry"]["path"], "/tmp/w/f");
        env.ok("filesystem.Filesystem/RemoveWatcher", json!({"watcherId": id})).await;
        let (status, _) =
            env.unary("filesystem.Filesystem/GetWatcherEvents", json!({"watcherId": id})).await;
        assert_eq!(status, StatusCode::NOT_FOUND);

        // Changes made through envd are visible to a poll right after them, even in a
        // directory made just before (a recursive watch must have picked it up).
        for i in 0..20 {
            let dir = format!("/tmp/r{i}");
            env.ok("filesystem.Filesystem/MakeDir", json!({"path": dir})).await;
            let v = env
                .ok("filesystem.Filesystem/CreateWatcher", json!({"path": dir, "recursive": true}))
                .await;
            let id = v["watcherId"].clone();
            env.ok("filesystem.Filesystem/MakeDir", json!({"path": format!("{dir}/sub")})).await;
            let r = env
                .post_file(
                    &format!("path={dir}/sub/f"),
                    &[("content-type", "application/octet-stream")],
                    b"x".to_vec(),
                )
                .await;
            assert_eq!(r.status(), StatusCode::OK);
            let v =
                env.ok("filesystem.Filesystem/GetWatcherEvents", json!({"watcherId": id})).await;
            let events = v["events"].as_array().unwrap();
            assert!(
                events.iter().any(|e| e["name"] == "sub" && e["type"] == "EVENT_TYPE_CREATE"),
                "{events:?}"
            );
            assert!(
                events.iter().any(|e| e["name"] == "sub/f" && e["type"] == "EVENT_TYPE_WRITE"),
                "{events:?}"
            );
            // The upload's temporary file (unnamed, or hidden) never shows.
            assert!(
                events.iter().all(|e| {
                    let n = e["name"].as_str().unwrap();
                    !n.contains('#') && !n.contains("ringfence")
                }),
                "{events:?}"
            );
            env.ok("filesystem.Filesystem/RemoveWatcher", json!({"watcherId": id})).await;
        }

        // Streaming watcher.
        let mut s = env
            .stream(
                "filesystem.Filesystem/WatchDir",
                json!({"path": "/tmp/w", "recursive": true}),
                &[("keepalive-ping-interval", "50")],
            )
            .await;
        assert_eq!(s.next().await.unwrap(), (0, json!({"start": {}})));
        env.sh("mkdir /tmp/w/sub && rm /tmp/w/f").await;
        let mut seen = Vec::new();
        while !seen.iter().any(|e: &Value| e["type"] == "EVENT_TYPE_REMOVE") {
            let (_, f) = s.next().await.unwrap();
            seen.push(f["filesystem"].clone());
        }
        assert!(seen.iter().any(|e| e["name"] == "sub" && e["type"] == "EVENT_TYPE_CREATE"));
        assert!(seen.iter().any(|e| e["name"] == "f" && e.get("entry").is_none()));

        // Not a directory.
        let frames = env
            .stream("filesystem.Filesystem/WatchDir", json!({"path": "/etc/passwd"}), &[])
            .await
            .rest()
            .await;
        assert_eq!(frames[0].1["error"]["code"], "invalid_argument");
    });
}

/// `CreateWatcher` until the kernel refuses: one sandbox's watchers count against its own
/// owner's inotify budget, so another sandbox and host root still get theirs (they used to
/// share root's 128 instances).
#[test]
fn watchers_exhausted_in_one_sandbox_leave_others_and_the_host_theirs() {
    let a = env_or_skip!();
    let b = env_or_skip!();
    let (made, refusal) = a.block(async {
        for made in 0..300 {
            let (status, v) =
                a.unary("filesystem.Filesystem/CreateWatcher", json!({"path": "/tmp"})).await;
            if status != StatusCode::OK {
                return (made, v);
            }
        }
        panic!("300 watchers and no limit");
    });
    assert!(made <= 128, "{made} watchers in one sandbox");
    let message = refusal["message"].as_str().unwrap_or_default();
    assert!(message.contains("inotify instance limit"), "{refusal}");
    assert_eq!(refusal["code"], "resource_exhausted", "{refusal}");
    assert!(!message.contains("/run") && !message.contains("/proc"), "{refusal}");
    // A still serves everything else.
    assert_eq!(a.block(a.sh("echo alive")).stdout, b"alive\n");
    b.block(async {
        b.ok("filesystem.Filesystem/CreateWatcher", json!({"path": "/tmp"})).await;
    });
    let host = nix::sys::inotify::Inotify::init(nix::sys::inotify::InitFlags::IN_CLOEXEC);
    assert!(host.is_ok(), "host root lost inotify: {host:?}");
}

// ---------------------------------------------------------------------------------------------
// Disks (issue 12, findings 11 and 13).

const OCTETS: (&str, &str) = ("content-type", "application/octet-stream");

/// A sandbox's disk is disk, not memory: with a quota four times its memory limit, an upload
/// beyond the quota answers 507, `dd` inside gets ENOSPC, nothing is OOM-killed, and the
/// sandbox, its PID 1 included, goes on (with a tmpfs disk, the same test gets 502: the upload
/// got PID 1 OOM-killed).
#[test]
fn a_full_disk_is_enospc_and_507_not_an_oom_kill() {
    let env = env_or_skip!(Opts { image: true, memory: Some(32 << 20), disk: Some(128 << 20) });
    env.block(async {
        let r = env.post_file("path=/tmp/big.bin", &[OCTETS], vec![0x5a; 160 << 20]).await;
        assert_eq!(r.status(), StatusCode::INSUFFICIENT_STORAGE);
        let v = json_body(r).await;
        assert_eq!(v["code"], 507, "{v}");
        let msg = v["message"].as_str().unwrap();
        // Refused up front when the body's length is known to exceed the free space, else
        // when the disk fills mid-write; either way nothing of it stays.
        assert!(
            msg.contains("no space left on device: /tmp/big.bin")
                || msg.contains("not enough disk space"),
            "{msg}"
        );
        assert!(!msg.contains("/var/lib") && !msg.contains("/run/"), "host path in {msg}");
        // PID 1 survived and serves; the disk fills from inside too, with ENOSPC.
        let o = env
            .sh("rm /tmp/big.bin; dd if=/dev/zero of=/home/user/f bs=1M count=200 2>&1 | \
                 grep -o 'No space left on device'; df -k / | tail -1; rm /home/user/f; echo alive")
            .await;
        let out = String::from_utf8_lossy(&o.stdout).into_owned();
        assert!(out.starts_with("No space left on device\n") && out.ends_with("alive\n"), "{o:?}");
        // What df inside shows is the quota.
        let total_kib: u64 =
            out.lines().nth(1).unwrap().split_whitespace().nth(1).unwrap().parse().unwrap();
        assert!((100 << 10..=128 << 10).contains(&total_kib), "{out}");
        assert_eq!(env.sandbox.oom_kills(), 0, "an OOM kill while filling the disk");
        let (used, total) = env.sandbox.disk_usage().unwrap();
        assert!(total <= 128 << 20 && used < 16 << 20, "{used} of {total}");
        // Space freed is space again.
        let r = env.post_file("path=/tmp/ok", &[OCTETS], vec![1; 64 << 20]).await;
        assert_eq!(r.status(), StatusCode::OK);
    });
}

/// Two sandboxes' quotas are their own: one full disk does not take space from another.
#[test]
fn two_sandboxes_disks_are_independent() {
    let opts = Opts { image: true, memory: None, disk: Some(64 << 20) };
    let a = env_or_skip!(opts);
    let b = env_or_skip!(Opts { disk: Some(128 << 20), ..opts });
    a.block(async {
        let r = a.post_file("path=/tmp/fill", &[OCTETS], vec![0; 100 << 20]).await;
        assert_eq!(r.status(), StatusCode::INSUFFICIENT_STORAGE);
    });
    b.block(async {
        // More than A's whole quota still fits in B, while A is full.
        let r = b.post_file("path=/tmp/fill", &[OCTETS], vec![0; 100 << 20]).await;
        assert_eq!(r.status(), StatusCode::OK);
    });
    assert_ne!(a.sandbox.upper_dir(), b.sandbox.upper_dir());
}

/// The agent keeps no descriptor that leads out of the sandbox's root: every directory it holds
/// open, from the host's view, is none (the tmpfs upper layer's parent, which it used to keep at
/// fd 1000, is the host's now). The host still reaches the upper layer, in either backend.
#[test]
fn the_agent_holds_no_directory_and_the_host_reaches_the_upper_layer() {
    for image in [false, true] {
        let env = env_or_skip!(Opts { image, ..Opts::default() });
        let pid = env.sandbox.pid;
        for fd in std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().flatten() {
            let target = std::fs::read_link(fd.path()).unwrap_or_default();
            let is_dir = std::fs::metadata(fd.path()).is_ok_and(|m| m.is_dir());
            assert!(
                !is_dir,
                "image={image}: agent fd {:?} is the directory {target:?}",
                fd.file_name()
            );
        }
        let upper = env.sandbox.upper_dir().expect("upper layer reachable from the host");
        let host_name = std::fs::read_to_string(upper.join("etc/hostname")).unwrap();
        assert_eq!(host_name.trim(), env.sandbox.id, "image={image}");
        assert_eq!(env.sandbox.disk_backend(), if image { "image" } else { "tmpfs" });
    }
}

/// Finding 13: the files API runs as the agent, so it must not follow a path to what only the
/// agent can reach: its descriptors (/proc/1/fd/N, where the upper layer used to be), its memory
/// and environment, or any /proc magic link (a process's root, cwd, fd), however named.
#[test]
fn the_files_api_refuses_the_agents_proc_and_magic_links() {
    for image in [false, true] {
        let env = env_or_skip!(Opts { image, ..Opts::default() });
        env.block(async {
            let o = env
                .sh("ln -s /proc/1/fd /tmp/fds; ln -s /proc/self/root /tmp/root; \
                            sleep 60 >/dev/null 2>&1 & echo $!")
                .await;
            let user_pid = String::from_utf8_lossy(&o.stdout).trim().to_string();
            assert!(!user_pid.is_empty(), "{o:?}");
            let mut paths: Vec<String> = [
                "/proc/1/fd/1000/upper/etc/hostname",
                "/proc/1/fd/1000/work",
                "/proc/1/fd/0",
                "/proc/1/fd/3",
                "/proc/self/fd/3",
                "/proc/thread-self/fd/0",
                "/proc/1/root/etc/hostname",
                "/proc/1/cwd/etc/hostname",
                "/proc/1/mem",
                "/proc/1/environ",
                "/proc/1/maps",
                "/tmp/fds/0",
                "/tmp/root/etc/hostname",
                "/tmp/../proc/1/fd/../fd/1000/upper/etc/hosts",
            ]
            .iter()
            .map(|s| (*s).to_string())
            .collect();
            // Through a user process's magic links (a stat of the link itself is only a
            // description of it, as `ls -l` gives the user, and is left out).
            let user_links: Vec<String> = ["root/etc/hostname", "cwd/x", "fd/0/x", "exe/x"]
                .iter()
                .map(|m| format!("/proc/{user_pid}/{m}"))
                .collect();
            paths.extend(user_links);
            for p in &paths {
                let q = format!("path={p}&username=root");
                let r = env.get_file(&q, &[]).await;
                let status = r.status();
                let body = raw_body(r).await;
                assert!(
                    matches!(status, StatusCode::FORBIDDEN | StatusCode::NOT_FOUND),
                    "image={image} GET {p}: {status} {}",
                    String::from_utf8_lossy(&body)
                );
                let r = env.post_file(&q, &[OCTETS], b"x".to_vec()).await;
                assert!(
                    matches!(r.status(), StatusCode::FORBIDDEN | StatusCode::NOT_FOUND),
                    "image={image} POST {p}: {}",
                    r.status()
                );
                for (method, msg) in [
                    ("filesystem.Filesystem/Stat", json!({"path": p})),
                    ("filesystem.Filesystem/ListDir", json!({"path": p, "depth": 1})),
                    ("filesystem.Filesystem/MakeDir", json!({"path": format!("{p}/d")})),
                    ("filesystem.Filesystem/Move", json!({"source": p, "destination": "/tmp/m"})),
                ] {
                    let (status, v) = env.unary(method, msg).await;
                    assert_ne!(status, StatusCode::OK, "image={image} {method} {p}: {v}");
                    assert!(
                        ["permission_denied", "not_found", "invalid_argument"]
                            .contains(&v["code"].as_str().unwrap_or("")),
                        "image={image} {method} {p}: {v}"
                    );
                }
            }
            // Paths that exist are refused as such, not reported missing (a remove of what is
            // missing succeeds, as envd's does, so it is tried here only).
            for p in ["/proc/1/fd/0", "/proc/1/mem", "/proc/1/root/etc/hostname", "/tmp/fds/0"] {
                let r = env.get_file(&format!("path={p}"), &[]).await;
                assert_eq!(r.status(), StatusCode::FORBIDDEN, "image={image} {p}");
                for method in ["filesystem.Filesystem/Stat", "filesystem.Filesystem/Remove"] {
                    let (_, v) = env.unary(method, json!({"path": p})).await;
                    assert_eq!(v["code"], "permission_denied", "image={image} {method} {p}: {v}");
                }
            }
            let r = env.get_file(&format!("path=/proc/{user_pid}/root/etc/hostname"), &[]).await;
            assert_eq!(r.status(), StatusCode::FORBIDDEN, "image={image}");
            // The same files by their own names are fine.
            let r = env.get_file("path=/etc/hostname", &[]).await;
            assert_eq!(r.status(), StatusCode::OK);
            let r = env.get_file(&format!("path=/proc/{user_pid}/status"), &[]).await;
            assert_eq!(r.status(), StatusCode::OK);
            // Nothing was written through any of them.
            let upper = env.sandbox.upper_dir().unwrap();
            assert!(!upper.join("d").exists() && !upper.join("m").exists());
            assert!(!std::path::Path::new(&format!("{}/tmp/m", upper.display())).exists());
        });
    }
}
