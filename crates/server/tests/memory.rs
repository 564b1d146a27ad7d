//! Memory bounds end to end (issue 12, findings 3 and 6): hostile or merely careless clients
//! drive `envd::handle` against a real serve-mode sandbox while a counting allocator measures
//! what the server side holds. The agent is another process, so only the server's own buffers
//! count.
//!
//! Tests share the process-wide counter, so they take turns (`SERIAL`). Needs root and the agent
//! binary, like `tests/envd.rs`; without them each test prints SKIPPED and returns.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::io::Write;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::http::StatusCode;
use axum::response::Response;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use ringfence_jail::launch::Sandbox;
use ringfence_jail::monitor::Supervisor;
use ringfence_server::agent_client::AgentClient;
use ringfence_server::envd::{self, EnvdState};
use ringfence_sys::CountingAlloc;
use serde_json::{Value, json};
use support::jail::{FrameStream, envelope, request};

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

/// One test at a time: they measure the same process-wide counter.
static SERIAL: Mutex<()> = Mutex::new(());

const POOL_PREFIX: &str = "memtest";
const WAIT: Duration = Duration::from_secs(30);
const MIB: usize = 1 << 20;

/// A serve-mode sandbox with its agent client and envd state.
struct Box_ {
    client: Arc<AgentClient>,
    state: Arc<EnvdState>,
    _sandbox: Sandbox,
    _supervisor: Option<Supervisor>,
}

struct Env {
    boxes: Vec<Box_>,
    rt: tokio::runtime::Runtime,
    _serial: MutexGuard<'static, ()>,
}

fn start(test: &str, sandboxes: usize) -> Option<Env> {
    let serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let cfg = support::jail::config_or_skip(test)?;
    let rt = support::jail::runtime();
    let mut boxes = Vec::new();
    for _ in 0..sandboxes {
        let (sandbox, supervisor) =
            support::jail::launch(&cfg, POOL_PREFIX, ringfence_jail::limits::Limits::default());
        let client = support::jail::client(&rt, &sandbox);
        boxes.push(Box_ {
            client,
            state: Arc::new(EnvdState::new()),
            _sandbox: sandbox,
            _supervisor: supervisor,
        });
    }
    Some(Env { boxes, rt, _serial: serial })
}

macro_rules! env_or_skip {
    ($n:expr) => {
        match start(module_path!(), $n) {
            Some(env) => env,
            None => return,
        }
    };
}

impl Env {
    fn block<F: std::future::Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }

    async fn send(&self, sb: usize, req: Request) -> Response {
        let b = &self.boxes[sb];
        envd::handle(b.client.clone(), b.state.clone(), req).await
    }

    async fn stream(&self, sb: usize, method: &str, msg: Value) -> Response {
        let h = [("content-type", "application/connect+json"), ("connect-protocol-version", "1")];
        let req = request("POST", &format!("/{method}"), &h, Body::from(envelope(0, &msg)));
        let resp = self.send(sb, req).await;
        assert_eq!(resp.status(), StatusCode::OK);
        resp
    }

    async fn start_sh(&self, sb: usize, script: &str) -> FrameStream {
        let msg = json!({"process": {"cmd": "/bin/sh", "args": ["-c", script]}, "stdin": false});
        FrameStream::cut_ok(self.stream(sb, "process.Process/Start", msg).await, WAIT)
    }

    /// Runs `script` to its end; its stdout and exit code.
    async fn sh(&self, sb: usize, script: &str) -> (String, i64) {
        let mut s = self.start_sh(sb, script).await;
        let mut out = Vec::new();
        let mut code = None;
        while let Some((_, f)) = s.next().await {
            if let Some(d) = f["event"]["data"]["stdout"].as_str() {
                out.extend(STANDARD.decode(d).unwrap());
            }
            if let Some(end) = f["event"].get("end") {
                code = Some(end["exitCode"].as_i64().unwrap_or(0));
            }
        }
        (String::from_utf8_lossy(&out).into_owned(), code.expect("the process ended"))
    }

    async fn unary(&self, sb: usize, method: &str, msg: Value) -> Value {
        let h = [("content-type", "application/json")];
        let req = request(
            "POST",
            &format!("/{method}"),
            &h,
            Body::from(serde_json::to_vec(&msg).unwrap()),
        );
        let resp = self.send(sb, req).await;
        assert_eq!(resp.status(), StatusCode::OK);
        let body = axum::body::to_bytes(resp.into_body(), usize::MAX).await.unwrap();
        serde_json::from_slice(&body).unwrap()
    }

    async fn pids(&self, sb: usize) -> Vec<u64> {
        let v = self.unary(sb, "process.Process/List", json!({})).await;
        v["processes"].as_array().unwrap().iter().map(|p| p["pid"].as_u64().unwrap()).collect()
    }
}

/// Waits (bounded) until the server's allocations drop to within `slack` of `baseline`.
async fn settles_to(baseline: usize, slack: usize) -> usize {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = CountingAlloc::current();
        if now <= baseline + slack || Instant::now() > deadline {
            return now;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn mib(n: usize) -> String {
    format!("{:.1} MiB", n as f64 / MIB as f64)
}

// ---------------------------------------------------------------------------------------------
// Finding 3: output nobody reads.

#[test]
fn unread_output_keeps_server_memory_bounded_and_is_freed_when_the_client_leaves() {
    let env = env_or_skip!(1);
    env.block(async {
        let baseline = CountingAlloc::current();
        CountingAlloc::reset_peak();
        // Three background commands, 300 MB each, whose clients never read (an SDK handle
        // never waited on): their response bodies are held, not polled.
        let mut held = Vec::new();
        let mut pids = Vec::new();
        for _ in 0..3 {
            let mut s = env.start_sh(0, "head -c 300000000 /dev/zero; echo done").await;
            let (_, start) = s.next().await.unwrap();
            pids.push(start["event"]["start"]["pid"].as_u64().unwrap());
            held.push(s);
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
        let grown = CountingAlloc::peak().saturating_sub(baseline);
        eprintln!("peak growth with 3 unread 300 MB streams: {}", mib(grown));
        assert!(grown < 16 * MIB, "the server held {} for unread output", mib(grown));
        // The writers wait on their pipes, not on the server's memory.
        let running = env.pids(0).await;
        assert!(pids.iter().all(|p| running.contains(p)), "{pids:?} not all in {running:?}");

        // The clients leave: what was held for them goes, and the processes are no longer
        // held back (their output is dropped, as envd drops output nobody subscribes to).
        drop(held);
        let after = settles_to(baseline, 2 * MIB).await;
        assert!(
            after <= baseline + 2 * MIB,
            "{} still held after the clients left",
            mib(after - baseline)
        );
        let deadline = Instant::now() + WAIT;
        while env.pids(0).await.iter().any(|p| pids.contains(p)) {
            assert!(Instant::now() < deadline, "detached writers never finished");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
}

/// Checks `seq 1 N` output as it arrives, keeping only the partial last line.
struct SeqCheck {
    next: u64,
    partial: Vec<u8>,
}

impl SeqCheck {
    fn feed(&mut self, data: &[u8]) {
        self.partial.extend_from_slice(data);
        let Some(end) = self.partial.iter().rposition(|b| *b == b'\n') else { return };
        for line in self.partial[..end].split(|b| *b == b'\n') {
            let n: u64 = std::str::from_utf8(line).unwrap().parse().unwrap();
            assert_eq!(n, self.next, "output out of order or lost");
            self.next += 1;
        }
        self.partial.drain(..=end);
    }
}

#[test]
fn a_fast_reader_gets_every_byte_in_order_in_bounded_memory() {
    let env = env_or_skip!(1);
    env.block(async {
        let baseline = CountingAlloc::current();
        CountingAlloc::reset_peak();
        let n = 6_000_000u64; // about 47 MB of output
        let mut s = env.start_sh(0, &format!("seq 1 {n}")).await;
        let mut check = SeqCheck { next: 1, partial: Vec::new() };
        let mut code = None;
        while let Some((_, f)) = s.next().await {
            if let Some(d) = f["event"]["data"]["stdout"].as_str() {
                check.feed(&STANDARD.decode(d).unwrap());
            }
            if let Some(end) = f["event"].get("end") {
                code = end["exitCode"].as_i64().or(Some(0));
            }
        }
        assert_eq!(code, Some(0));
        assert!(check.partial.is_empty());
        assert_eq!(check.next, n + 1, "every line arrived");
        let grown = CountingAlloc::peak().saturating_sub(baseline);
        eprintln!("peak growth reading {n} lines: {}", mib(grown));
        assert!(grown < 16 * MIB, "reading held {}", mib(grown));
    });
}

#[test]
fn connect_after_the_first_client_left_streams_the_rest() {
    let env = env_or_skip!(1);
    env.block(async {
        // The first client leaves at once, with 8 MB still to come.
        let mut s = env.start_sh(0, "head -c 8000000 /dev/zero; sleep 1; echo tail").await;
        let (_, start) = s.next().await.unwrap();
        let pid = start["event"]["start"]["pid"].as_u64().unwrap();
        drop(s);
        // The process is not held back by the departed client, and a later Connect gets what
        // follows and the end, as with envd.
        let msg = json!({"process": {"pid": pid}});
        let mut c = FrameStream::cut_ok(env.stream(0, "process.Process/Connect", msg).await, WAIT);
        let mut tail = Vec::new();
        let mut code = None;
        while let Some((_, f)) = c.next().await {
            if let Some(d) = f["event"]["data"]["stdout"].as_str() {
                tail.extend(STANDARD.decode(d).unwrap());
            }
            if let Some(end) = f["event"].get("end") {
                code = Some(end["exitCode"].as_i64().unwrap_or(0));
            }
        }
        assert!(tail.ends_with(b"tail\n"), "connect saw {} bytes", tail.len());
        assert_eq!(code, Some(0));
    });
}

#[test]
fn a_stalled_stream_does_not_stall_other_streams_or_sandboxes() {
    let env = env_or_skip!(2);
    env.block(async {
        let mut stalled = env.start_sh(0, "cat /dev/zero").await;
        let (_, start) = stalled.next().await.unwrap();
        let pid = start["event"]["start"]["pid"].as_u64().unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
        // The same sandbox and another one answer as usual meanwhile.
        for sb in [0, 1] {
            let t = Instant::now();
            let (out, code) = env.sh(sb, "seq 1 20000 | tail -n 1").await;
            assert_eq!((out.as_str(), code), ("20000\n", 0));
            assert!(t.elapsed() < Duration::from_secs(10), "sandbox {sb} took {:?}", t.elapsed());
        }
        let v = env
            .unary(
                0,
                "process.Process/SendSignal",
                json!({"process": {"pid": pid}, "signal": "SIGNAL_SIGKILL"}),
            )
            .await;
        assert_eq!(v, json!({}));
        drop(stalled);
    });
}

#[test]
fn an_unread_watch_keeps_server_memory_bounded() {
    let env = env_or_skip!(1);
    env.block(async {
        env.unary(0, "filesystem.Filesystem/MakeDir", json!({"path": "/tmp/many"})).await;
        let baseline = CountingAlloc::current();
        CountingAlloc::reset_peak();
        let msg = json!({"path": "/tmp/many", "recursive": true});
        let held = env.stream(0, "filesystem.Filesystem/WatchDir", msg).await;
        let (out, code) =
            env.sh(0, "cd /tmp/many && for i in $(seq 30000); do : > f$i; done; echo ok").await;
        assert_eq!((out.as_str(), code), ("ok\n", 0));
        tokio::time::sleep(Duration::from_millis(500)).await;
        let grown = CountingAlloc::peak().saturating_sub(baseline);
        eprintln!("peak growth with an unread watch of 30000 files: {}", mib(grown));
        assert!(grown < 8 * MIB, "an unread watch held {}", mib(grown));
        drop(held);
        let after = settles_to(baseline, MIB).await;
        assert!(after <= baseline + MIB, "{} still held", mib(after - baseline));
    });
}

// ---------------------------------------------------------------------------------------------
// Finding 6: gzip bombs.

/// A single-member gzip stream of `copies` × 16 MiB of zeros, compressed as hard as deflate
/// allows (about 1000:1), built without compressing it all: a 16 MiB block sequence ending in
/// a full flush (which resets the compressor, so each copy stands alone) is repeated, then
/// closed with an empty final block and the right trailer.
fn zeros_bomb(copies: u32) -> Vec<u8> {
    use flate2::{Compress, Compression, Crc, FlushCompress};
    let chunk = vec![0u8; 16 * MIB];
    let mut c = Compress::new(Compression::best(), false);
    let mut blocks = Vec::with_capacity(64 << 10);
    c.compress_vec(&chunk, &mut blocks, FlushCompress::Full).unwrap();
    assert_eq!(c.total_in(), chunk.len() as u64, "one call takes the whole chunk");
    let mut fin = Compress::new(Compression::best(), false);
    let mut last = Vec::with_capacity(64);
    fin.compress_vec(&[], &mut last, FlushCompress::Finish).unwrap();
    let mut one = Crc::new();
    one.update(&chunk);
    let mut crc = Crc::new();
    for _ in 0..copies {
        crc.combine(&one);
    }
    let mut out = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 2, 0xff];
    for _ in 0..copies {
        out.extend_from_slice(&blocks);
    }
    out.extend_from_slice(&last);
    out.extend_from_slice(&crc.sum().to_le_bytes());
    out.extend_from_slice(&crc.amount().to_le_bytes());
    out
}

#[test]
fn the_bomb_builder_builds_a_valid_stream() {
    // It allocates tens of megabytes: not while another test measures.
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    // Checked on a small one by a reference decoder, so the big one is a real bomb.
    let small = zeros_bomb(2);
    let mut out = Vec::new();
    std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&small[..]), &mut out).unwrap();
    assert_eq!(out.len(), 32 * MIB);
    assert!(out.iter().all(|b| *b == 0));
}

/// A whole form of one file part.
fn multipart_of(boundary: &str, name: &str, data: &[u8]) -> Vec<u8> {
    let mut body = support::form_part(boundary, name, data);
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    body
}

async fn post(
    env: &Env,
    query: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> (StatusCode, Value) {
    let req = request("POST", &format!("/files?{query}"), headers, Body::from(body));
    let resp = env.send(0, req).await;
    let status = resp.status();
    let body = axum::body::to_bytes(resp.into_body(), usize::MAX).await.unwrap();
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

#[test]
fn gzip_bombs_are_refused_in_bounded_memory_and_leave_nothing() {
    let env = env_or_skip!(1);
    // 1 GiB of zeros in about a megabyte.
    let bomb = zeros_bomb(64);
    eprintln!("bomb: {} compressed bytes for 1 GiB", bomb.len());
    env.block(async {
        let baseline = CountingAlloc::current();
        CountingAlloc::reset_peak();
        let raw = [("content-type", "application/octet-stream"), ("content-encoding", "gzip")];
        let t = Instant::now();
        let (status, v) = post(&env, "path=/tmp/bomb", &raw, bomb.clone()).await;
        eprintln!("raw bomb refused in {:?}: {v}", t.elapsed());
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{v}");
        assert!(v["message"].as_str().unwrap().contains("decompression bomb"), "{v}");
        // Refused early: far from inflating the whole gigabyte.
        assert!(t.elapsed() < Duration::from_secs(60), "took {:?}", t.elapsed());
        eprintln!("peak growth, one bomb: {}", mib(CountingAlloc::peak().saturating_sub(baseline)));

        // A gzip-encoded form whose inflated body carries the gigabyte: the form's opening,
        // the bomb, its closing, as three gzip members (one stream to a multi-member reader).
        let gz = |data: &[u8]| {
            let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            enc.write_all(data).unwrap();
            enc.finish().unwrap()
        };
        let form = multipart_of("bb", "/tmp/bomb-form", b"@");
        let at = form.iter().position(|b| *b == b'@').unwrap();
        let mut body = gz(&form[..at]);
        body.extend_from_slice(&bomb);
        body.extend(gz(&form[at + 1..]));
        let form_headers =
            [("content-type", "multipart/form-data; boundary=bb"), ("content-encoding", "gzip")];
        let (status, v) = post(&env, "", &form_headers, body).await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{v}");
        assert!(v["message"].as_str().unwrap().contains("decompression bomb"), "{v}");
        eprintln!(
            "peak growth, with the form: {}",
            mib(CountingAlloc::peak().saturating_sub(baseline))
        );

        // Four at once.
        let queries: Vec<String> = (0..4).map(|i| format!("path=/tmp/bomb-{i}")).collect();
        let reqs = queries.iter().map(|q| post(&env, q, &raw, bomb.clone()));
        for (status, v) in futures_util::future::join_all(reqs).await {
            assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{v}");
        }
        let grown = CountingAlloc::peak().saturating_sub(baseline);
        eprintln!("peak growth over six bombs: {}", mib(grown));
        assert!(grown < 24 * MIB, "the bombs made the server hold {}", mib(grown));

        // Nothing of the refused uploads is left in the sandbox, not even hidden.
        let (out, _) = env.sh(0, "ls -A /tmp | grep -i -e bomb -e ringfence || true").await;
        assert_eq!(out, "", "left behind");
    });
}

#[test]
fn a_large_multipart_upload_is_not_buffered_ahead_of_its_writes() {
    let env = env_or_skip!(1);
    env.block(async {
        let baseline = CountingAlloc::current();
        CountingAlloc::reset_peak();
        // 128 MiB in a form whose chunks are always ready, made as they are taken.
        let size = 128 * MIB;
        let head = multipart_of("pp", "/tmp/big.bin", b"@");
        let at = head.iter().position(|b| *b == b'@').unwrap();
        let (open, close) =
            (Bytes::copy_from_slice(&head[..at]), Bytes::copy_from_slice(&head[at + 1..]));
        let chunks = (0..size / (64 << 10)).map(|_| Bytes::from(vec![7u8; 64 << 10]));
        let parts = std::iter::once(open).chain(chunks).chain(std::iter::once(close));
        let body =
            Body::from_stream(futures_util::stream::iter(parts.map(Ok::<_, std::io::Error>)));
        let req = request(
            "POST",
            "/files",
            &[("content-type", "multipart/form-data; boundary=pp")],
            body,
        );
        let resp = env.send(0, req).await;
        assert_eq!(resp.status(), StatusCode::OK);
        let grown = CountingAlloc::peak().saturating_sub(baseline);
        eprintln!("peak growth uploading 128 MiB as a form: {}", mib(grown));
        assert!(grown < 16 * MIB, "the upload held {}", mib(grown));
        let (out, _) = env.sh(0, "stat -c %s /tmp/big.bin; rm /tmp/big.bin").await;
        assert_eq!(out.trim(), size.to_string());
    });
}
