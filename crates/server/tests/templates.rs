//! The template build API (E2B's Template SDK wire) against a real `ringfence serve`, over raw
//! HTTP: bad input is refused with 4xx naming the problem (an unknown template or build, a bad
//! name, a bad step, files not uploaded, an upload that does not hash to what the step says,
//! a COPY source leaving the context, a build-in template as base, another tenant's build),
//! nothing is left behind, and the server keeps serving; a COPY-only build whose upload hashes
//! right becomes a template (no RUN step, so no build sandbox is needed). The SDK itself
//! drives the rest in tests/e2b/templates.py.
//!
//! Needs root and the binaries (`cargo build --workspace`); without them each test prints
//! SKIPPED.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::process::Command;

use ringfence_test_support::start_registry;
use serde_json::{Value, json};
use sha2::Digest as _;
use support::serve::{Resp, Server};

fn server(test: &str) -> Option<Server> {
    if !support::root_or_skip(test) {
        return None;
    }
    let bin = support::serve::binary_or_skip(test, "cargo build --workspace")?;
    let mut s = Server::new(bin);
    // Builds share this host with other builds and tests: a loaded host starts slowly.
    s.up_within = std::time::Duration::from_secs(60);
    s.key = s.new_key("builder", &[]);
    Some(s)
}

fn message(r: &Resp) -> String {
    r.json()["message"].as_str().unwrap_or_default().to_string()
}

/// A tar of `dir/a.txt` (mode 0644) made by the system's tar, as the SDK's upload is a tar of
/// the files relative to the context; and the SDK's files hash of `COPY a.txt DEST`.
fn upload_of(dir: &std::path::Path, content: &[u8], dest: &str) -> (Vec<u8>, String) {
    let f = dir.join("a.txt");
    std::fs::write(&f, content).unwrap();
    std::fs::set_permissions(&f, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let out = Command::new("tar").arg("-cf").arg("-").arg("-C").arg(dir).arg("a.txt").output();
    let out = out.unwrap();
    assert!(out.status.success());
    let mut h = sha2::Sha256::new();
    h.update(format!("COPY a.txt {dest}"));
    h.update("a.txt");
    h.update((0o100644u32).to_string());
    h.update(content.len().to_string());
    h.update(content);
    (out.stdout, hex::encode(h.finalize()))
}

/// A build id for template `name` (`POST /v3/templates`).
fn request(s: &Server, key: &str, name: &str) -> String {
    let r = s.api_as(key, "POST", "/v3/templates", json!({"name": name}));
    assert_eq!(r.status, 202, "{}", r.text());
    assert_eq!(r.json()["templateID"], json!(name.split(':').next().unwrap()));
    r.json()["buildID"].as_str().unwrap().to_string()
}

/// PUTs `body` to the upload link for `hash` of template `name`.
fn put_upload(s: &Server, name: &str, hash: &str, body: &[u8]) {
    let r = s.api("GET", &format!("/templates/{name}/files/{hash}"), Value::Null);
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(r.json()["present"], json!(false));
    let url = r.json()["url"].as_str().unwrap().to_string();
    let path = &url[url.find("/template-uploads/").unwrap()..];
    let r = s.request("PUT", path, &[], body);
    assert_eq!(r.status, 200, "{}", r.text());
}

/// Every path under `dir`.
fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if e.file_type().unwrap().is_dir() {
            out.extend(walk(&p));
        }
        out.push(p);
    }
    out
}

fn status(s: &Server, name: &str, build: &str) -> Value {
    let r = s.api("GET", &format!("/templates/{name}/builds/{build}/status"), Value::Null);
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()
}

#[test]
fn build_api_refuses_bad_input_and_builds_good_input() {
    let Some(mut s) = server("build_api_refuses_bad_input_and_builds_good_input") else { return };
    let other = s.new_key("other-tenant", &[]);
    // An operator's base: a Dockerfile with COPY only (no RUN: no sandbox needed).
    let ctx = tempfile::tempdir().unwrap();
    std::fs::write(ctx.path().join("base.txt"), "base\n").unwrap();
    std::fs::write(ctx.path().join("Dockerfile"), "FROM scratch\nCOPY base.txt /base.txt\n")
        .unwrap();
    let out = Command::new(&s.bin)
        .args(["template", "build", "--name", "opbase", "-f"])
        .arg(ctx.path().join("Dockerfile"))
        .arg("--data-dir")
        .arg(s.data.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    s.spawn(&[]);
    let uuid = "0b5e3c1e-0000-4000-a000-000000000000";
    let hash = "ab".repeat(32);

    // Unknown templates and builds: 404 naming them.
    for (method, path) in [
        ("GET", format!("/templates/nope/builds/{uuid}/status")),
        ("POST", format!("/v2/templates/nope/builds/{uuid}")),
        ("GET", format!("/templates/nope/files/{hash}")),
        ("DELETE", "/templates/nope".to_string()),
        ("GET", "/templates/aliases/nope".to_string()),
        ("GET", "/templates/nope/tags".to_string()),
    ] {
        let body = if method == "POST" { json!({"fromTemplate": "opbase"}) } else { Value::Null };
        let r = s.api(method, &path, body);
        assert_eq!(r.status, 404, "{method} {path}: {}", r.text());
        assert!(message(&r).contains("not found"), "{method} {path}: {}", r.text());
    }
    // Bad names.
    let r = s.api("POST", "/v3/templates", json!({"name": "Bad Name!"}));
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(message(&r).contains("invalid template name"), "{}", r.text());
    let r = s.api("POST", "/v3/templates", json!({}));
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(message(&r).contains("name is required"), "{}", r.text());
    let r = s.api("POST", "/v3/templates", json!({"name": "opbase"}));
    assert_eq!(r.status, 409, "the operator's name: {}", r.text());

    // Bad steps and bases, each refused when the build starts, naming the problem.
    let bad: Vec<(Value, u16, &str)> = vec![
        (json!({"fromTemplate": "no-such-base", "steps": []}), 404, "not found"),
        (json!({"fromTemplate": "base", "steps": []}), 400, "built-in template"),
        (json!({"steps": []}), 400, "neither fromTemplate nor fromImage"),
        (
            json!({"fromTemplate": "opbase", "steps": [{"type": "FROB", "args": []}]}),
            400,
            "unknown step type \"FROB\"",
        ),
        (json!({"fromTemplate": "opbase", "steps": [{"type": "RUN"}]}), 400, "no command"),
        (json!({"fromTemplate": "opbase", "steps": "not a list"}), 400, "invalid build request"),
        (
            json!({"fromTemplate": "opbase",
                "steps": [{"type": "COPY", "args": ["a.txt", "/a"], "filesHash": hash}]}),
            400,
            "were not uploaded",
        ),
        (
            json!({"fromTemplate": "opbase",
                "steps": [{"type": "COPY", "args": ["../../etc/passwd", "/x"], "filesHash": hash}]}),
            400,
            "leaves the build context",
        ),
        (
            json!({"fromTemplate": "opbase",
                "steps": [{"type": "COPY", "args": ["/etc/passwd", "/x"], "filesHash": hash}]}),
            400,
            "leaves the build context",
        ),
        (json!({"fromTemplate": "opbase", "startCmd": "x"}), 400, "needs a readyCmd"),
        (
            json!({"fromTemplate": "opbase", "fromImageRegistry": {"type": "registry"}}),
            400,
            "not supported",
        ),
    ];
    let build = request(&s, &s.key, "mine");
    for (body, code, want) in bad {
        let r = s.api("POST", &format!("/v2/templates/mine/builds/{build}"), body.clone());
        assert_eq!(r.status, code, "{body}: {}", r.text());
        assert!(message(&r).contains(want), "{body}: wanted {want:?}: {}", r.text());
        // Refused before anything started: the build still waits for its steps.
        assert_eq!(status(&s, "mine", &build)["status"], json!("waiting"));
    }
    let r = s.api("GET", &format!("/templates/mine/files/{}", "xyz"), Value::Null);
    assert_eq!(r.status, 400, "a bad hash: {}", r.text());
    let r = s.request("PUT", "/template-uploads/not-a-token", &[], b"x");
    assert_eq!(r.status, 403, "an unknown upload link: {}", r.text());

    // An upload that is not what the step's hash says: refused, naming both hashes.
    let (tar, good) = upload_of(ctx.path(), b"hello\n", "/opt/a.txt");
    put_upload(&s, "mine", &good, &tar);
    let (_, other_hash) = upload_of(ctx.path(), b"hello\n", "/elsewhere.txt");
    let (tar2, _) = upload_of(ctx.path(), b"something else\n", "/opt/a.txt");
    put_upload(&s, "mine", &other_hash, &tar2);
    let mismatch = json!({"fromTemplate": "opbase",
        "steps": [{"type": "COPY", "args": ["a.txt", "/elsewhere.txt"], "filesHash": other_hash}]});
    let r = s.api("POST", &format!("/v2/templates/mine/builds/{build}"), mismatch);
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(message(&r).contains("do not match their hash"), "{}", r.text());
    // Nothing of the refused upload was unpacked into a build context (nor half of it).
    let left = walk(&s.data.path().join("template-uploads"))
        .into_iter()
        .filter(|p| p.is_dir() && p.file_name().unwrap().to_string_lossy().contains(&other_hash))
        .collect::<Vec<_>>();
    assert!(left.is_empty(), "a refused upload left {left:?}");

    // Another tenant sees none of it, and cannot take the name while the build is open.
    let r = s.api_as(&other, "POST", "/v3/templates", json!({"name": "mine"}));
    assert_eq!(r.status, 409, "a name another key is building: {}", r.text());
    let r = s.api_as(&other, "GET", &format!("/templates/mine/builds/{build}/status"), Value::Null);
    assert_eq!(r.status, 404, "{}", r.text());
    let r = s.api_as(&other, "POST", &format!("/v2/templates/mine/builds/{build}"), json!({}));
    assert_eq!(r.status, 404, "{}", r.text());

    // The right upload builds: COPY only, then ENV and WORKDIR.
    let good_steps = json!({"fromTemplate": "opbase", "steps": [
        {"type": "COPY", "args": ["a.txt", "/opt/a.txt"], "filesHash": good},
        {"type": "ENV", "args": ["K", "v"]},
        {"type": "WORKDIR", "args": ["/opt"]},
    ]});
    let r = s.api("POST", &format!("/v2/templates/mine/builds/{build}"), good_steps.clone());
    assert_eq!(r.status, 202, "{}", r.text());
    let r = s.api("POST", &format!("/v2/templates/mine/builds/{build}"), good_steps);
    assert_eq!(r.status, 409, "started twice: {}", r.text());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let st = loop {
        let st = status(&s, "mine", &build);
        if st["status"] != json!("building") {
            break st;
        }
        assert!(std::time::Instant::now() < deadline, "build never ended: {st}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert_eq!(st["status"], json!("ready"), "{st}");
    let logs = st["logEntries"].as_array().unwrap();
    assert!(logs.iter().any(|l| l["message"].as_str().unwrap().contains("COPY")), "{st}");
    let later = s.api(
        "GET",
        &format!("/templates/mine/builds/{build}/status?logsOffset=1000"),
        Value::Null,
    );
    assert_eq!(later.json()["logEntries"], json!([]));
    let r = s.api("GET", "/templates/aliases/mine", Value::Null);
    assert_eq!((r.status, r.json()["public"].clone()), (200, json!(false)), "{}", r.text());
    let r = s.api_as(&other, "GET", "/templates/aliases/mine", Value::Null);
    assert_eq!(r.status, 403, "another tenant's name: {}", r.text());
    let listed = |key: &str| {
        let r = s.api_as(key, "GET", "/templates", Value::Null);
        assert_eq!(r.status, 200, "{}", r.text());
        r.json().as_array().unwrap().iter().map(|t| t["templateID"].clone()).collect::<Vec<_>>()
    };
    assert!(listed(&s.key).contains(&json!("mine")));
    assert!(!listed(&other).contains(&json!("mine")), "listed to another tenant");
    assert!(listed(&other).contains(&json!("opbase")), "the operator's template is everyone's");
    let r = s.api_as(&other, "DELETE", "/templates/mine", Value::Null);
    assert_eq!(r.status, 404, "another tenant deleting: {}", r.text());
    let r = s.api("DELETE", "/templates/opbase", Value::Null);
    assert_eq!(r.status, 403, "the operator's template: {}", r.text());
    let r = s.api("DELETE", "/templates/mine", Value::Null);
    assert_eq!(r.status, 204, "{}", r.text());
    let r = s.api("GET", "/templates/aliases/mine", Value::Null);
    assert_eq!(r.status, 404, "{}", r.text());
    // Deleted and no build open: the name is free again.
    let r = s.api_as(&other, "POST", "/v3/templates", json!({"name": "mine"}));
    assert_eq!(r.status, 202, "{}", r.text());
    assert_eq!(s.api("GET", "/health", Value::Null).status, 200);
}

/// Template `opbase` in `s`'s data directory: Debian's static busybox with its applets (the
/// base tests/e2b/templates.py builds on), made with `ringfence template build`. `None` (and
/// SKIPPED printed) without /bin/busybox (package busybox-static).
fn busybox_base(s: &Server, test: &str) -> Option<()> {
    if !std::path::Path::new("/bin/busybox").exists() {
        println!("SKIPPED {test}: no /bin/busybox (scripts/setup.sh installs busybox-static)");
        return None;
    }
    let ctx = tempfile::tempdir().unwrap();
    std::fs::copy("/bin/busybox", ctx.path().join("busybox")).unwrap();
    std::fs::write(
        ctx.path().join("Dockerfile"),
        "FROM scratch\nCOPY busybox /bin/busybox\nRUN [\"/bin/busybox\", \"--install\", \"-s\", \"/bin\"]\n",
    )
    .unwrap();
    let out = Command::new(&s.bin)
        .args(["template", "build", "--name", "opbase", "-f"])
        .arg(ctx.path().join("Dockerfile"))
        .arg("--data-dir")
        .arg(s.data.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    Some(())
}

/// Starts build `build` of `name` with `steps` and waits (up to `secs`) until it ends.
fn build_and_wait(s: &Server, name: &str, build: &str, steps: Value, secs: u64) -> Value {
    let r = s.api("POST", &format!("/v2/templates/{name}/builds/{build}"), steps);
    assert_eq!(r.status, 202, "{}", r.text());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    loop {
        let st = status(s, name, build);
        if st["status"] != json!("building") {
            return st;
        }
        assert!(std::time::Instant::now() < deadline, "build never ended: {st}");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// Every log message of a build (paged through `logsOffset`).
fn all_logs(s: &Server, name: &str, build: &str) -> Vec<String> {
    let mut out = Vec::new();
    loop {
        let r = s.api(
            "GET",
            &format!("/templates/{name}/builds/{build}/status?logsOffset={}", out.len()),
            Value::Null,
        );
        let page = r.json()["logEntries"].as_array().unwrap().clone();
        if page.is_empty() {
            return out;
        }
        out.extend(page.iter().map(|l| l["message"].as_str().unwrap_or_default().to_string()));
    }
}

#[test]
fn run_steps_reach_the_package_archives_and_nothing_private_every_connection_audited() {
    let test = "run_steps_reach_the_package_archives_and_nothing_private_every_connection_audited";
    let Some(mut s) = server(test) else { return };
    let Some(()) = busybox_base(&s, test) else { return };
    // Whether this host reaches the Debian archive at all (CI does); without it the allowed
    // half cannot be shown, the refusals still are.
    let archive = std::net::ToSocketAddrs::to_socket_addrs(&("deb.debian.org", 80))
        .ok()
        .and_then(|mut a| a.next())
        .is_some_and(|a| {
            std::net::TcpStream::connect_timeout(&a, std::time::Duration::from_secs(5)).is_ok()
        });
    // A service on the host's loopback: a build must not reach it.
    let host_svc = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let host_port = host_svc.local_addr().unwrap().port();
    host_svc.set_nonblocking(true).unwrap();
    s.spawn(&[]);
    // Busybox's nc (its static wget crashes in name lookups): an HTTP request, and whether an
    // answer came. The markers are split in the script so the echoed command line (the step's
    // log header) never contains them.
    let script = format!(
        "get() {{ (printf 'GET %s HTTP/1.1\\r\\nHost: %s\\r\\nConnection: close\\r\\n\\r\\n' \"$3\" \"$1\"; \
           sleep \"$4\") | nc -w 5 \"$1\" \"$2\" 2>&1; }}; \
         if get deb.debian.org 80 /debian/dists/bookworm/Release 5 | grep -q '^Origin: Debian'; \
           then echo FETCH''ED; else echo NOT-FETCH''ED; fi; \
         for d in example.com:80 127.0.0.1:{host_port} 100.96.0.1:80 169.254.169.254:80 10.0.0.1:80; do \
           if get \"${{d%:*}}\" \"${{d##*:}}\" / 2 | grep -q '^HTTP/'; \
             then echo \"REACH\"\"ED $d\"; else echo \"BLOCK\"\"ED $d\"; fi; \
         done"
    );
    let build = request(&s, &s.key, "egress");
    let st = build_and_wait(
        &s,
        "egress",
        &build,
        json!({"fromTemplate": "opbase", "steps": [{"type": "RUN", "args": [script]}]}),
        180,
    );
    assert_eq!(st["status"], json!("ready"), "{st}");
    let logs = all_logs(&s, "egress", &build).join("\n");
    assert!(!logs.contains("REACHED"), "a build reached a forbidden address:\n{logs}");
    for d in [
        "example.com:80",
        &format!("127.0.0.1:{host_port}"),
        "100.96.0.1:80",
        "169.254.169.254:80",
        "10.0.0.1:80",
    ] {
        assert!(logs.lines().any(|l| l == format!("BLOCKED {d}")), "{d}:\n{logs}");
    }
    assert!(host_svc.accept().is_err(), "the host's loopback service was reached");
    if archive {
        assert!(logs.lines().any(|l| l == "FETCHED"), "{logs}");
    } else {
        println!("SKIPPED the archive half of {test}: deb.debian.org:80 is not reachable here");
    }

    // Every decision is audited under the build's id and template, with its reason.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let recs = loop {
        let r = s.api("GET", "/audit?action=network.egress&limit=1000", Value::Null);
        assert_eq!(r.status, 200, "{}", r.text());
        let recs: Vec<Value> = r.json()["records"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["detail"]["build_id"] == json!(build))
            .cloned()
            .collect();
        let enough = recs.iter().any(|r| r["detail"]["address"] == "10.0.0.1");
        if enough || std::time::Instant::now() > deadline {
            break recs;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    let find = |pred: &dyn Fn(&Value) -> bool| recs.iter().find(|r| pred(&r["detail"])).cloned();
    for r in &recs {
        assert_eq!(r["detail"]["template"], json!("egress:latest"), "{r}");
        let reason = r["detail"]["reason"].as_str().unwrap();
        assert!(reason.starts_with("allowed: ") || reason.starts_with("denied: "), "{r}");
    }
    find(&|d| d["allowed"] == false && d["protocol"] == "dns" && d["name"] == "example.com")
        .unwrap_or_else(|| panic!("example.com's lookup refused: {recs:#?}"));
    // (127.0.0.1 is the build sandbox's own loopback, its own network namespace: nothing
    // there reaches the host, and nothing goes through the egress to audit.)
    for (addr, why) in
        [("100.96.0.1", "denied"), ("169.254.169.254", "metadata"), ("10.0.0.1", "private")]
    {
        find(&|d| {
            d["allowed"] == false
                && d["address"] == addr
                && d["reason"].as_str().unwrap().contains(why)
        })
        .unwrap_or_else(|| panic!("{addr} refused as {why}: {recs:#?}"));
    }
    if archive {
        find(&|d| d["allowed"] == true && d["protocol"] == "tcp" && d["name"] == "deb.debian.org")
            .unwrap_or_else(|| panic!("the archive allowed: {recs:#?}"));
    }
    assert_eq!(s.api("GET", "/health", Value::Null).status, 200);
}

#[test]
fn build_status_and_logs_survive_a_restart_and_a_killed_build_reads_error() {
    let test = "build_status_and_logs_survive_a_restart_and_a_killed_build_reads_error";
    let Some(mut s) = server(test) else { return };
    let Some(()) = busybox_base(&s, test) else { return };
    s.spawn(&[]);
    // A finished build, and one running (a step that sleeps) when the server is killed.
    let done = request(&s, &s.key, "kept");
    let st = build_and_wait(
        &s,
        "kept",
        &done,
        json!({"fromTemplate": "opbase",
               "steps": [{"type": "RUN", "args": ["echo marker-of-the-step > /marker; cat /marker"]}]}),
        120,
    );
    assert_eq!(st["status"], json!("ready"), "{st}");
    let before = all_logs(&s, "kept", &done);
    assert!(before.iter().any(|l| l == "marker-of-the-step"), "{before:?}");
    let running = request(&s, &s.key, "cut");
    let r = s.api(
        "POST",
        &format!("/v2/templates/cut/builds/{running}"),
        json!({"fromTemplate": "opbase",
               "steps": [{"type": "RUN", "args": ["echo sleeping; sleep 600"]}]}),
    );
    assert_eq!(r.status, 202, "{}", r.text());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !all_logs(&s, "cut", &running).iter().any(|l| l == "sleeping") {
        assert!(std::time::Instant::now() < deadline, "the step never started");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    s.kill9();
    s.spawn(&[]);
    let st = status(&s, "kept", &done);
    assert_eq!(st["status"], json!("ready"), "{st}");
    assert_eq!(all_logs(&s, "kept", &done), before, "the logs after the restart");
    let st = status(&s, "cut", &running);
    assert_eq!(st["status"], json!("error"), "{st}");
    let why = st["reason"]["message"].as_str().unwrap_or_default();
    assert!(why.contains("the server stopped while this build ran"), "{st}");
    // Nothing of it was registered, and its name can be built again.
    let r = s.api("GET", "/templates/aliases/cut", Value::Null);
    assert_eq!(r.status, 404, "{}", r.text());
    let again = request(&s, &s.key, "cut");
    let st = build_and_wait(
        &s,
        "cut",
        &again,
        json!({"fromTemplate": "opbase", "steps": [{"type": "RUN", "args": ["true"]}]}),
        120,
    );
    assert_eq!(st["status"], json!("ready"), "{st}");
}

#[test]
fn a_step_marked_skip_cache_reruns_with_those_after_it_and_the_earlier_ones_stay_cached() {
    let test =
        "a_step_marked_skip_cache_reruns_with_those_after_it_and_the_earlier_ones_stay_cached";
    let Some(mut s) = server(test) else { return };
    let Some(()) = busybox_base(&s, test) else { return };
    s.spawn(&[]);
    let steps = json!({"fromTemplate": "opbase", "steps": [
        {"type": "RUN", "args": ["echo one > /one"]},
        {"type": "RUN", "args": ["date +%s%N > /two"], "force": true},
        {"type": "RUN", "args": ["echo three > /three"]},
    ]});
    let first = request(&s, &s.key, "skips");
    assert_eq!(build_and_wait(&s, "skips", &first, steps.clone(), 120)["status"], json!("ready"));
    let second = request(&s, &s.key, "skips");
    assert_eq!(build_and_wait(&s, "skips", &second, steps, 120)["status"], json!("ready"));
    let logs = all_logs(&s, "skips", &second);
    let line = |n: usize, what: &str| {
        logs.iter().any(|l| l.starts_with(&format!("[{n}/")) && l.contains(what))
    };
    // Dockerfile steps: 1 FROM, 2 RUN one, 3 RUN two (forced), 4 RUN three.
    assert!(line(2, "CACHED"), "the step before the forced one: {logs:?}");
    assert!(line(3, "DONE") && line(4, "DONE"), "the forced step and the one after: {logs:?}");
}

/// An OCI image layout at `dir` (tag `latest`) of one layer: busybox with its `sh` link.
fn busybox_layout(dir: &std::path::Path) {
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir(root.path().join("bin")).unwrap();
    std::fs::copy("/bin/busybox", root.path().join("bin/busybox")).unwrap();
    std::os::unix::fs::symlink("busybox", root.path().join("bin/sh")).unwrap();
    let layer = Command::new("tar")
        .args(["--numeric-owner", "--owner=0", "--group=0", "-cf", "-", "-C"])
        .arg(root.path())
        .arg("bin")
        .output()
        .unwrap();
    assert!(layer.status.success());
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let put = |bytes: &[u8]| {
        let hex = hex::encode(sha2::Sha256::digest(bytes));
        std::fs::write(blobs.join(&hex), bytes).unwrap();
        (format!("sha256:{hex}"), bytes.len())
    };
    let (layer_digest, layer_size) = put(&layer.stdout);
    let config = json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Env": ["PATH=/bin"], "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
    });
    let (config_digest, config_size) = put(config.to_string().as_bytes());
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": config_digest, "size": config_size},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": layer_digest, "size": layer_size}],
    });
    let (m_digest, m_size) = put(manifest.to_string().as_bytes());
    std::fs::write(
        dir.join("index.json"),
        json!({"schemaVersion": 2, "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": m_digest, "size": m_size,
            "annotations": {"org.opencontainers.image.ref.name": "latest"},
        }]})
        .to_string(),
    )
    .unwrap();
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion": "1.0.0"}"#).unwrap();
}

#[test]
fn from_image_with_a_registry_reference_pulls_the_base_through_the_api() {
    let test = "from_image_with_a_registry_reference_pulls_the_base_through_the_api";
    let Some(mut s) = server(test) else { return };
    if !std::path::Path::new("/bin/busybox").exists()
        || !std::path::Path::new("/usr/bin/skopeo").exists()
    {
        println!(
            "SKIPPED {test}: busybox-static or skopeo missing (scripts/setup.sh installs them)"
        );
        return;
    }
    let reg = match start_registry() {
        Ok(r) => r,
        Err(why) => {
            println!("SKIPPED {test}: {why}");
            return;
        }
    };
    let layout = tempfile::tempdir().unwrap();
    busybox_layout(layout.path());
    let o = Command::new("/usr/bin/skopeo")
        .args(["copy", "--dest-tls-verify=false", "--insecure-policy"])
        .arg(format!("oci:{}:latest", layout.path().display()))
        .arg(format!("docker://{}/test/bb:v1", reg.addr))
        .output()
        .unwrap();
    assert!(o.status.success(), "skopeo push: {}", String::from_utf8_lossy(&o.stderr));
    s.spawn(&["--insecure-registry", &reg.addr]);
    let reference = format!("{}/test/bb:v1", reg.addr);
    let build = request(&s, &s.key, "pulled");
    let st = build_and_wait(
        &s,
        "pulled",
        &build,
        json!({"fromImage": reference,
               "steps": [{"type": "RUN", "args": ["echo from-the-registry > /proof"]}]}),
        120,
    );
    assert_eq!(st["status"], json!("ready"), "{st}");
    let logs = all_logs(&s, "pulled", &build).join("\n");
    assert!(logs.contains("pulling it"), "{logs}");
    // A sandbox from it runs the registry's busybox with the step's file.
    let r = s.api("POST", "/v2/sandboxes", json!({"templateID": "pulled", "timeout": 60}));
    assert_eq!(r.status, 201, "{}", r.text());
    let sb = support::serve::Sandbox::from(&r.json());
    let msg = json!({"process": {"cmd": "/bin/sh", "args": ["-c", "cat /proof"]}, "stdin": false});
    let r = s.process_start(&sb.id, &sb.token, &msg, &[]);
    assert_eq!(r.status, 200, "{}", r.text());
    let out: String = support::serve::frames(&r.body)
        .iter()
        .filter_map(|(_, v)| v["event"]["data"]["stdout"].as_str().map(support::serve::b64_text))
        .collect();
    assert_eq!(out, "from-the-registry\n");
    // Not deleted while a sandbox runs from it (409 naming it); once it is gone, deleted.
    let r = s.api("DELETE", "/templates/pulled", Value::Null);
    assert_eq!(r.status, 409, "{}", r.text());
    assert!(message(&r).contains(&sb.id), "{}", r.text());
    // A snapshot of that sandbox sits on the template's layers: the template stays while the
    // snapshot does, after the sandbox is gone.
    let r = s.api("POST", &format!("/sandboxes/{}/snapshots", sb.id), json!({}));
    assert_eq!(r.status, 201, "{}", r.text());
    let snap = r.json()["snapshotID"].as_str().unwrap().to_string();
    let r = s.api("DELETE", &format!("/sandboxes/{}", sb.id), Value::Null);
    assert_eq!(r.status, 204, "{}", r.text());
    let r = s.api("DELETE", "/templates/pulled", Value::Null);
    assert_eq!(r.status, 409, "{}", r.text());
    assert!(message(&r).contains(&format!("snapshot {snap}")), "{}", r.text());
    let r = s.api("DELETE", &format!("/templates/{snap}"), Value::Null);
    assert_eq!(r.status, 204, "the snapshot: {}", r.text());
    let r = s.api("DELETE", "/templates/pulled", Value::Null);
    assert_eq!(r.status, 204, "{}", r.text());
    // A registry this server does not talk plain HTTP to: the build fails naming it.
    drop(reg);
    let other = request(&s, &s.key, "unreachable");
    let st = build_and_wait(
        &s,
        "unreachable",
        &other,
        json!({"fromImage": "127.0.0.1:1/nothing/here:v1", "steps": []}),
        120,
    );
    assert_eq!(st["status"], json!("error"), "{st}");
    assert!(st["reason"]["message"].as_str().unwrap().contains("127.0.0.1:1"), "{st}");
}

#[test]
fn uploads_past_the_quota_are_refused_and_unused_ones_expire() {
    let test = "uploads_past_the_quota_are_refused_and_unused_ones_expire";
    let Some(mut s) = server(test) else { return };
    s.spawn(&["--template-upload-quota", "30K"]);
    let ctx = tempfile::tempdir().unwrap();
    let _build = request(&s, &s.key, "quota");
    let (tar, hash) = upload_of(ctx.path(), &[b'a'; 12 << 10], "/a");
    put_upload(&s, "quota", &hash, &tar);
    let (tar2, hash2) = upload_of(ctx.path(), &[b'b'; 12 << 10], "/b");
    let r = s.api("GET", &format!("/templates/quota/files/{hash2}"), Value::Null);
    let url = r.json()["url"].as_str().unwrap().to_string();
    let r = s.request("PUT", &url[url.find("/template-uploads/").unwrap()..], &[], &tar2);
    assert_eq!(r.status, 507, "over the quota: {}", r.text());
    assert!(r.text().contains("upload quota exceeded"), "{}", r.text());
    // Nothing of the refused one is kept; the first is.
    let r = s.api("GET", &format!("/templates/quota/files/{hash2}"), Value::Null);
    assert_eq!(r.json()["present"], json!(false));
    let r = s.api("GET", &format!("/templates/quota/files/{hash}"), Value::Null);
    assert_eq!(r.json()["present"], json!(true));
    // Unused past the time to live: gone after the next sweep (at start).
    s.kill9();
    std::thread::sleep(std::time::Duration::from_millis(2100));
    s.spawn(&["--template-upload-ttl", "2s"]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let r = s.api("GET", &format!("/templates/quota/files/{hash}"), Value::Null);
        if r.json()["present"] == json!(false) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the old upload was not removed");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}
