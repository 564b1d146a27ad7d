//! Observability end to end: a real `ringfence serve` (the binary, as operators run it) on a
//! loopback port, driven over HTTP. Hostile code runs inside sandboxes through the API, and the
//! tests check exactly what it left behind in `/metrics` (parsed with a Prometheus text
//! parser), in the audit trail (`GET /audit`, `ringfence audit`, `audit.jsonl`) and in the
//! JSON logs.
//!
//! Needs root and the binaries (`cargo build -p ringfence`): `RINGFENCE_BIN`, or
//! `target/<profile>/ringfence` beside this test. Without either, each test prints SKIPPED.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::BTreeMap;
use std::io::Write;
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::form_part;
use support::serve::{Sandbox, b64_text, frames};

/// A running `ringfence serve` (JSON logs) with its own data directory and two tenants' keys.
struct Server {
    serve: support::serve::Server,
    key_id: String,
    other_key: String,
    /// An operator's key: the only kind that reads `/metrics` series naming sandboxes.
    operator_key: String,
}

impl std::ops::Deref for Server {
    type Target = support::serve::Server;
    fn deref(&self) -> &Self::Target {
        &self.serve
    }
}

impl std::ops::DerefMut for Server {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.serve
    }
}

impl Server {
    fn start(test: &str, args: &[&str]) -> Option<Server> {
        if !support::root_or_skip(test) {
            return None;
        }
        let bin = support::serve::binary_or_skip(test, "cargo build -p ringfence")?;
        let mut serve = support::serve::Server::new(bin);
        serve.key = serve.new_key("tenant-a", &[]);
        let other_key = serve.new_key("tenant-b", &[]);
        let operator_key = serve.new_key("scraper", &["--operator"]);
        let mut s = Server { serve, key_id: String::new(), other_key, operator_key };
        s.spawn(args);
        s.key_id = s.key_id_of(&s.key.clone());
        Some(s)
    }

    /// Only the test that asks for it gets the code interpreter (and its fork server).
    fn spawn(&mut self, args: &[&str]) {
        let args: Vec<&str> =
            ["--log-format", "json"].into_iter().chain(args.iter().copied()).collect();
        self.serve.spawn(&args);
    }

    /// The id of an API key, as the audit trail's `user_id` names it.
    fn key_id_of(&self, key: &str) -> String {
        let store =
            ringfence_server::store::Store::open(&self.data.path().join("ringfence.db")).unwrap();
        let info = store.verify_key(key).unwrap().unwrap();
        info.id
    }

    fn create(&self, template: &str) -> Sandbox {
        let r = self.api("POST", "/v2/sandboxes", json!({"templateID": template}));
        assert_eq!(r.status, 201, "create: {}", r.text());
        Sandbox::from(&r.json())
    }

    /// Runs `bash -c script` through envd's `process.Process/Start`; returns stdout and the end
    /// event.
    fn run(&self, sb: &Sandbox, script: &str) -> (String, Value) {
        let msg = json!({"process": {"cmd": "/bin/bash", "args": ["-c", script]}, "stdin": false});
        let r = self.process_start(&sb.id, &sb.token, &msg, &[]);
        assert_eq!(r.status, 200, "start: {}", r.text());
        let mut stdout = String::new();
        let mut end = Value::Null;
        for (flags, v) in frames(&r.body) {
            if let Some(d) = v["event"]["data"]["stdout"].as_str() {
                stdout.push_str(&b64_text(d));
            }
            if !v["event"]["end"].is_null() {
                end = v["event"]["end"].clone();
            } else if flags & 2 != 0 && end.is_null() {
                // The end-of-stream frame: an error here means the process never ended.
                end = v.clone();
            }
        }
        (stdout, end)
    }

    fn kill(&self, sb: &Sandbox) {
        let r = self.api("DELETE", &format!("/sandboxes/{}", sb.id), Value::Null);
        assert_eq!(r.status, 204, "kill: {}", r.text());
    }

    /// Scrapes `/metrics` (as the operator's scraper) and parses it with a Prometheus
    /// text-format parser.
    fn scrape(&self) -> prometheus_parse::Scrape {
        let r = self.request(
            "GET",
            "/metrics",
            &[("Authorization", &format!("Bearer {}", self.operator_key))],
            b"",
        );
        assert_eq!(r.status, 200, "scrape: {}", r.text());
        let lines = r.text().lines().map(|l| Ok(l.to_string())).collect::<Vec<_>>();
        prometheus_parse::Scrape::parse(lines.into_iter()).expect("exposition parses")
    }

    /// Every audit record of this tenant, following the cursor.
    fn audit(&self, query: &str) -> Vec<Value> {
        let mut out = Vec::new();
        let mut cursor = String::new();
        loop {
            let path = format!("/audit?limit=2&{query}{cursor}");
            let r = self.request("GET", &path, &[("X-API-Key", &self.key)], b"");
            assert_eq!(r.status, 200, "audit: {}", r.text());
            let v = r.json();
            out.extend(v["records"].as_array().unwrap().iter().cloned());
            match v["next_cursor"].as_str() {
                Some(c) => {
                    assert_eq!(r.headers.get("x-next-cursor").map(String::as_str), Some(c));
                    cursor = format!("&cursor={c}");
                }
                None => return out,
            }
        }
    }

    /// Waits until the background writer has stored what `pred` looks for.
    fn audit_until(&self, query: &str, pred: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let recs = self.audit(query);
            if pred(&recs) || Instant::now() > deadline {
                return recs;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// The value of the sample of `name` whose labels include all of `labels`.
fn value(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    scrape.samples.iter().find_map(|s| {
        let matches = s.metric == name
            && labels.iter().all(|(k, v)| s.labels.get(k).is_some_and(|x| x == *v));
        match (&s.value, matches) {
            (prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Gauge(v), true) => {
                Some(*v)
            }
            (prometheus_parse::Value::Untyped(v), true) => Some(*v),
            _ => None,
        }
    })
}

fn of_action<'a>(recs: &'a [Value], action: &str) -> Vec<&'a Value> {
    recs.iter().filter(|r| r["action"] == action).collect()
}

fn sha256(s: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(s.as_bytes()))
}

macro_rules! server_or_skip {
    ($args:expr) => {
        match Server::start(module_path!(), $args) {
            Some(s) => s,
            None => return,
        }
    };
}

const MOUNT: &str = "python3 -c \"import ctypes; print(ctypes.CDLL(None, use_errno=True).mount(b'x', b'/mnt', b'tmpfs', 0, None), ctypes.get_errno())\"";
const PTRACE: &str = "python3 -c \"import ctypes; print(ctypes.CDLL(None, use_errno=True).ptrace(0, 0, None, None), ctypes.get_errno())\"";
/// Forks until the pids limit refuses, keeps the children until done, prints the refusals.
const FORK_BOMB: &str = "python3 -c \"
import os, time
kids, refused = [], 0
for _ in range(200):
    try:
        pid = os.fork()
    except OSError:
        refused += 1
        continue
    if pid == 0:
        time.sleep(30)
        os._exit(0)
    kids.append(pid)
for k in kids:
    os.kill(k, 9)
    os.waitpid(k, 0)
print(refused)
\"";
/// Grows until the memory limit kills it.
const MEMORY_HOG: &str =
    "python3 -c \"\nblocks = []\nwhile True:\n    blocks.append(bytearray(8 << 20))\n\"";

#[test]
fn hostile_code_leaves_exact_metrics_events_and_records() {
    let srv = server_or_skip!(&["--memory", "128M", "--pids", "32"]);
    let sb = srv.create("base");

    let (out, end) = srv.run(&sb, MOUNT);
    assert_eq!(out.trim(), "-1 1", "mount fails with EPERM: {end}");
    let (out, _) = srv.run(&sb, PTRACE);
    assert_eq!(out.trim(), "-1 1", "ptrace fails with EPERM");
    let (out, _) = srv.run(&sb, FORK_BOMB);
    let refused: u64 = out.trim().parse().unwrap_or_else(|_| panic!("fork bomb printed {out:?}"));
    assert!(refused > 100, "the pids limit (32) refused most of 200 forks, got {refused}");
    let (_, end) = srv.run(&sb, MEMORY_HOG);
    assert_eq!(end["status"], "signal: killed", "the hog is OOM-killed: {end}");

    // Metrics: every blocked action, by sandbox, syscall and kind, exactly once each.
    let m = srv.scrape();
    let escapes = |syscall: &str, kind: &str| {
        value(
            &m,
            "ringfence_escape_attempts_total",
            &[("sandbox", &sb.id), ("syscall", syscall), ("kind", kind)],
        )
    };
    assert_eq!(escapes("mount", "seccomp"), Some(1.0));
    assert_eq!(escapes("ptrace", "seccomp"), Some(1.0));
    assert_eq!(escapes("fork", "pids"), Some(refused as f64), "one event per refused fork");
    assert_eq!(escapes("none", "oom"), Some(1.0));
    let attempts: Vec<_> = m
        .samples
        .iter()
        .filter(|s| {
            s.metric == "ringfence_escape_attempts_total" && s.labels.get("sandbox") == Some(&sb.id)
        })
        .collect();
    assert_eq!(attempts.len(), 4, "nothing else was blocked: {attempts:?}");
    assert_eq!(value(&m, "ringfence_execution_seconds_count", &[("kind", "command")]), Some(4.0));
    assert_eq!(value(&m, "ringfence_alerts_total", &[("alert", "escape_attempt")]), Some(4.0));

    // Audit: each execution carries its own events, with the command's hash and exit code.
    let recs = srv.audit_until(&format!("sandbox={}", sb.id), |r| {
        of_action(r, "alert.escape_attempt").len() == 4
    });
    let execs = of_action(&recs, "exec.command");
    assert_eq!(execs.len(), 4);
    let line = |script: &str| format!("/bin/bash -c {script}");
    for (rec, script, syscall, kind, exit) in [
        (execs[0], MOUNT, "mount", "seccomp", 0),
        (execs[1], PTRACE, "ptrace", "seccomp", 0),
        (execs[2], FORK_BOMB, "fork", "pids", 0),
        (execs[3], MEMORY_HOG, "none", "oom", 137),
    ] {
        assert_eq!(rec["code_hash"], sha256(&line(script)), "{rec}");
        assert_eq!(rec["detail"]["command"], line(script));
        assert_eq!(rec["exit_code"], exit, "{rec}");
        assert_eq!(rec["user_id"], srv.key_id);
        assert!(rec["duration_ms"].as_u64().is_some());
        assert!(rec["resource_usage"]["cpu_ms"].as_u64().is_some(), "{rec}");
        let evs = rec["security_events"].as_array().unwrap();
        // Refused forks are counted from the cgroup's counter each time it is sampled: a fork
        // bomb that spans two samples (a loaded host) is two events of its own kind, whose
        // counts add up to the refusals. Every other layer reports each denial once.
        if kind == "pids" {
            assert!(!evs.is_empty(), "its own events: {rec}");
        } else {
            assert_eq!(evs.len(), 1, "exactly its own event: {rec}");
        }
        assert!(evs.iter().all(|e| e["syscall"] == syscall && e["kind"] == kind), "{rec}");
        let count: u64 = evs.iter().map(|e| e["count"].as_u64().unwrap()).sum();
        assert_eq!(count, if kind == "pids" { refused } else { 1 }, "{rec}");
        if kind == "seccomp" {
            assert_eq!(evs[0]["comm"], "python3", "attributed to the process: {rec}");
            assert!(evs[0]["pid"].as_u64().is_some_and(|p| p > 1));
        }
    }
    assert!(execs[3]["resource_usage"]["memory_mb"].as_u64().unwrap() > 64, "{}", execs[3]);
    // The security events themselves, as they happened (before the commands ended).
    for (kind, syscall) in
        [("seccomp", "mount"), ("seccomp", "ptrace"), ("pids", "fork"), ("oom", "none")]
    {
        let sec: Vec<_> = of_action(&recs, &format!("security.{kind}"))
            .into_iter()
            .filter(|r| r["security_events"][0]["syscall"] == syscall)
            .collect();
        let total: u64 =
            sec.iter().map(|r| r["security_events"][0]["count"].as_u64().unwrap()).sum();
        let want = if kind == "pids" { refused } else { 1 };
        assert_eq!(total, want, "{kind}/{syscall}: {sec:?}");
        let alerts: Vec<_> = of_action(&recs, "alert.escape_attempt")
            .into_iter()
            .filter(|r| r["detail"]["syscall"] == syscall && r["detail"]["kind"] == kind)
            .collect();
        assert_eq!(alerts.len(), 1, "one alert per kind of attempt");
    }

    srv.kill(&sb);
    let recs = srv.audit(&format!("sandbox={}&action=sandbox.kill", sb.id));
    assert_eq!(recs.len(), 1);
    let summary = recs[0]["security_events"].as_array().unwrap();
    assert_eq!(summary.len(), 4, "the sandbox's whole life: {}", recs[0]);
    assert_eq!(recs[0]["detail"]["reason"], "killed by API");
    // A killed sandbox's gauges go at once; its escape counters stay for late scrapes.
    let m = srv.scrape();
    assert_eq!(value(&m, "ringfence_sandbox_memory_bytes", &[("sandbox", &sb.id)]), None);
    assert_eq!(escapes_after(&m, &sb.id, "mount"), Some(1.0));
    let log = srv.log();
    assert!(
        log.lines().any(|l| l.contains("\"alert\":\"escape_attempt\"") && l.contains("WARN")),
        "alerts are warnings in the log"
    );
}

/// A sandbox that outlives a `kill -9` of its server is supervised again once a new server
/// re-attaches it: its denied calls still fail with EPERM (not ENOSYS, as with no listener)
/// and are counted and audited exactly as before the restart.
#[test]
fn denials_after_a_server_restart_are_recorded_like_before() {
    let mut srv = server_or_skip!(&[]);
    let sb = srv.create("base");
    let (out, _) = srv.run(&sb, MOUNT);
    assert_eq!(out.trim(), "-1 1", "before: mount fails with EPERM");
    // Let the keeper get its copy (parked off the create's path).
    std::thread::sleep(Duration::from_millis(300));
    srv.kill9();
    srv.spawn(&[]);
    let (out, _) = srv.run(&sb, MOUNT);
    assert_eq!(out.trim(), "-1 1", "after the restart: EPERM, not ENOSYS (38): {}", srv.log());
    let (out, _) = srv.run(&sb, PTRACE);
    assert_eq!(out.trim(), "-1 1");
    let m = srv.scrape();
    let escapes = |syscall: &str| {
        value(
            &m,
            "ringfence_escape_attempts_total",
            &[("sandbox", &sb.id), ("syscall", syscall), ("kind", "seccomp")],
        )
    };
    // Counters start again with the new server; what it saw is exact.
    assert_eq!(escapes("mount"), Some(1.0), "the denial after the restart was counted");
    assert_eq!(escapes("ptrace"), Some(1.0));
    let recs = srv.audit_until(&format!("sandbox={}", sb.id), |r| {
        of_action(r, "security.seccomp").len() >= 3
    });
    let sec = of_action(&recs, "security.seccomp");
    let calls: Vec<_> = sec.iter().map(|r| r["security_events"][0]["syscall"].clone()).collect();
    assert_eq!(calls, [json!("mount"), json!("mount"), json!("ptrace")], "{recs:?}");
    assert_eq!(sec[2]["security_events"][0]["comm"], "python3", "attributed after the restart");
}

/// Layer 4: a command that decodes a payload into a shell carries the static signal in its
/// audit record and in the metrics; a plain one carries none; and one written to hide says
/// nothing to the analysis yet is still stopped by the sandbox (the signal is never the
/// boundary).
#[test]
fn risk_signals_join_the_record_and_hidden_code_is_still_contained() {
    let srv = server_or_skip!(&[]);
    let sb = srv.create("base");
    let (out, _) = srv.run(&sb, "echo ZWNobyBkZWNvZGVk | base64 -d | sh");
    assert_eq!(out, "decoded\n", "the payload ran");
    srv.run(&sb, "echo plain");
    // Hidden: the tool's name is assembled at run time; the mount still fails (EPERM).
    let (out, _) = srv.run(&sb, "a=mou; b=nt; $a$b -t tmpfs none /mnt 2>&1; echo rc=$?");
    assert!(out.contains("rc=") && !out.contains("rc=0"), "{out}");
    let recs = srv.audit_until(&format!("sandbox={}&action=exec.command", sb.id), |r| r.len() >= 3);
    let risk = |i: usize| recs[i]["detail"].get("risk").cloned();
    let decoded = risk(0).expect("a risk report on the decoding command");
    assert_eq!(decoded["signals"][0]["rule"], "sh.decode-to-shell", "{decoded}");
    assert_eq!(decoded["signals"][0]["severity"], "high");
    assert_eq!(risk(1), None, "a plain command has no signal: {}", recs[1]);
    assert_eq!(risk(2), None, "the hidden one says nothing to the analysis: {}", recs[2]);
    let m = srv.scrape();
    assert_eq!(
        value(
            &m,
            "ringfence_risk_signals_total",
            &[("rule", "sh.decode-to-shell"), ("severity", "high")]
        ),
        Some(1.0)
    );
}

/// Layer 4's operator deny rules (`--risk-deny`): a command whose analysis matches a rule is
/// refused before it runs (permission_denied, naming the rule), and the refusal is audited
/// with the analysis; one matching nothing runs; code written to hide from the analysis runs
/// and is contained by the other layers, as without rules.
#[test]
fn risk_deny_rules_refuse_a_matching_command_and_audit_it() {
    let srv = server_or_skip!(&["--risk-deny", "sh.pipe-to-shell,sh.decode-to-shell"]);
    let sb = srv.create("base");
    let marker = "/tmp/ran-it";
    let script = format!("echo dG91Y2ggL3RtcC9yYW4taXQ= | base64 -d | sh; touch {marker}");
    let msg = json!({"process": {"cmd": "/bin/bash", "args": ["-c", script]}, "stdin": false});
    let r = srv.process_start(&sb.id, &sb.token, &msg, &[]);
    let text = r.text();
    assert!(
        text.contains("permission_denied") && text.contains("sh.decode-to-shell (line 1)"),
        "refused, naming the rule: {} {text}",
        r.status
    );
    let (out, _) = srv.run(&sb, &format!("test -e {marker} && echo ran || echo never-ran"));
    assert_eq!(out, "never-ran\n", "nothing of the refused command ran");
    let recs =
        srv.audit_until(&format!("sandbox={}&action=exec.refused", sb.id), |r| !r.is_empty());
    assert_eq!(recs[0]["detail"]["denied_by"], json!(["sh.decode-to-shell (line 1)"]), "{recs:?}");
    assert_eq!(recs[0]["detail"]["risk"]["signals"][0]["rule"], "sh.decode-to-shell");
    assert!(recs[0]["detail"]["command"].as_str().unwrap().contains("base64 -d"), "{recs:?}");
    // Hidden from the analysis: allowed through, and the sandbox still stops the mount.
    let (out, _) = srv.run(&sb, "a=mou; b=nt; $a$b -t tmpfs none /mnt 2>&1; echo rc=$?");
    assert!(out.contains("rc=") && !out.contains("rc=0"), "{out}");
    let m = srv.scrape();
    assert_eq!(
        value(
            &m,
            "ringfence_risk_signals_total",
            &[("rule", "sh.decode-to-shell"), ("severity", "high")]
        ),
        Some(1.0)
    );
}

fn escapes_after(m: &prometheus_parse::Scrape, sb: &str, syscall: &str) -> Option<f64> {
    value(m, "ringfence_escape_attempts_total", &[("sandbox", sb), ("syscall", syscall)])
}

#[test]
fn prometheus_scrape_parses_and_needs_a_key() {
    let srv = server_or_skip!(&[]);
    let sb = srv.create("base");
    let (out, _) = srv.run(&sb, "echo hi");
    assert_eq!(out, "hi\n");
    // Let the sampler see the sandbox once.
    std::thread::sleep(Duration::from_millis(1500));

    assert_eq!(srv.request("GET", "/metrics", &[], b"").status, 401);
    assert_eq!(srv.request("GET", "/metrics", &[("X-API-Key", "e2b_nope")], b"").status, 401);
    let r = srv.request("GET", "/metrics", &[("X-API-Key", &srv.key)], b"");
    assert_eq!(r.status, 200);
    assert!(r.headers["content-type"].starts_with("text/plain; version=0.0.4"));
    let m = srv.scrape();
    let types: BTreeMap<&str, String> =
        m.docs.keys().map(|k| (k.as_str(), String::new())).collect();
    for name in [
        "ringfence_sandbox_startup_seconds",
        "ringfence_execution_seconds",
        "ringfence_api_request_duration_seconds",
        "ringfence_sandbox_memory_bytes",
        "ringfence_sandbox_cpu_percent",
        "ringfence_sandbox_cpu_seconds_total",
        "ringfence_sandboxes",
        "ringfence_pool_size",
    ] {
        assert!(types.contains_key(name), "{name} is documented: {:?}", m.docs.keys());
    }
    let histogram = |name: &str, labels: &[(&str, &str)]| {
        m.samples.iter().find_map(|s| match &s.value {
            prometheus_parse::Value::Histogram(h)
                if s.metric == name
                    && labels.iter().all(|(k, v)| s.labels.get(k).is_some_and(|x| x == *v)) =>
            {
                Some(h.clone())
            }
            _ => None,
        })
    };
    let startup = histogram(
        "ringfence_sandbox_startup_seconds",
        &[("tier", "jail"), ("template", "base"), ("pool", "miss")],
    )
    .expect("startup histogram");
    assert_eq!(startup.last().map(|b| b.count), Some(1.0), "one start: {startup:?}");
    let exec = histogram("ringfence_execution_seconds", &[("kind", "command")]).unwrap();
    assert_eq!(exec.last().map(|b| b.count), Some(1.0));
    // Routes are templates, never raw paths with ids in them.
    assert!(
        histogram(
            "ringfence_api_request_duration_seconds",
            &[("route", "/v2/sandboxes"), ("status", "201")]
        )
        .is_some()
    );
    assert!(
        histogram(
            "ringfence_api_request_duration_seconds",
            &[("route", "envd:/process.Process/Start"), ("status", "200")]
        )
        .is_some()
    );
    assert!(m.samples.iter().all(|s| !s.labels.get("route").is_some_and(|r| r.contains(&sb.id))));
    assert_eq!(value(&m, "ringfence_sandboxes", &[("state", "running")]), Some(1.0));
    assert_eq!(value(&m, "ringfence_pool_size", &[("template", "base")]), Some(0.0));
    let mem = value(&m, "ringfence_sandbox_memory_bytes", &[("sandbox", &sb.id)]).unwrap();
    assert!(mem > 0.0);
    assert_eq!(
        value(&m, "ringfence_sandbox_memory_limit_bytes", &[("sandbox", &sb.id)]),
        Some((512u64 << 20) as f64)
    );

    // E2B's per-sandbox metrics, from the cgroup and the writable layer.
    let (out, _) = srv.run(&sb, "head -c 20000000 /dev/zero > /home/user/blob && echo ok");
    assert_eq!(out, "ok\n");
    let r = srv.api("GET", &format!("/sandboxes/{}/metrics", sb.id), Value::Null);
    assert_eq!(r.status, 200, "{}", r.text());
    let samples = r.json();
    let last = samples.as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["cpuCount"], 1);
    assert_eq!(last["memTotal"], 512u64 << 20);
    // The filesystem's size as `df` inside shows it: the quota less the disk's own metadata
    // (an image disk's inode tables take about 3 %), never more than the quota.
    let total = last["diskTotal"].as_u64().unwrap();
    assert!(((1u64 << 30) / 100 * 95..=1 << 30).contains(&total), "{last}");
    assert!(last["diskUsed"].as_u64().unwrap() >= 20_000_000, "{last}");
    assert!(last["memUsed"].as_u64().unwrap() > 0);
    for k in ["timestamp", "timestampUnix", "cpuUsedPct", "memCache"] {
        assert!(!last[k].is_null(), "{k} in {last}");
    }
    let r = srv.api("GET", &format!("/sandboxes/metrics?sandbox_ids={},nope", sb.id), Value::Null);
    let batch = r.json();
    assert_eq!(batch["sandboxes"].as_object().unwrap().len(), 1, "{batch}");
    assert!(batch["sandboxes"][&sb.id]["diskUsed"].as_u64().unwrap() >= 20_000_000);
    // Another tenant's sandbox is not found.
    let r = srv.request(
        "GET",
        &format!("/sandboxes/{}/metrics", sb.id),
        &[("X-API-Key", &srv.other_key)],
        b"",
    );
    assert_eq!(r.status, 404);
    srv.kill(&sb);
}

#[test]
fn metrics_can_be_open() {
    let srv = server_or_skip!(&["--metrics-auth", "none"]);
    let r = srv.request("GET", "/metrics", &[], b"");
    assert_eq!(r.status, 200);
    assert!(r.text().contains("ringfence_pool_size"));
}

#[test]
fn audit_trail_is_durable_filtered_paged_and_per_tenant() {
    let mut srv = server_or_skip!(&[]);
    let t0 = ringfence_server::manager::now_ms();
    let sb = srv.create("base");
    let (out, _) = srv.run(&sb, "echo audited");
    assert_eq!(out, "audited\n");
    let r = srv.api("POST", &format!("/sandboxes/{}/timeout", sb.id), json!({"timeout": 120}));
    assert_eq!(r.status, 204);
    let r = srv.api("POST", &format!("/sandboxes/{}/connect", sb.id), json!({"timeout": 60}));
    assert_eq!(r.status, 200);
    let r = srv.request(
        "POST",
        "/files?path=/home/user/note.txt&username=user",
        &[
            ("E2b-Sandbox-Id", &sb.id),
            ("E2b-Sandbox-Port", "49983"),
            ("X-Access-Token", &sb.token),
            ("Content-Type", "application/octet-stream"),
        ],
        b"hello",
    );
    assert_eq!(r.status, 200, "{}", r.text());
    // The other tenant's sandbox and actions never show in this tenant's trail.
    let other = srv.request(
        "POST",
        "/v2/sandboxes",
        &[("X-API-Key", &srv.other_key), ("Content-Type", "application/json")],
        b"{}",
    );
    assert_eq!(other.status, 201);
    let other_id = other.json()["sandboxID"].as_str().unwrap().to_string();
    // Acknowledged means stored: a kill -9 right after the last answer loses nothing.
    let mut child = srv.child.take().unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    srv.spawn(&[]);

    let recs = srv.audit("");
    let actions: Vec<&str> = recs.iter().map(|r| r["action"].as_str().unwrap()).collect();
    assert_eq!(
        actions,
        ["sandbox.create", "exec.command", "sandbox.timeout", "sandbox.connect", "file.write"],
        "{recs:?}"
    );
    assert!(recs.iter().all(|r| r["user_id"] == srv.key_id && r["sandbox_id"] == sb.id.as_str()));
    let ids: Vec<i64> = recs.iter().map(|r| r["id"].as_i64().unwrap()).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "trail order: {ids:?}");
    assert_eq!(recs[1]["code_hash"], sha256("/bin/bash -c echo audited"));
    assert_eq!(recs[1]["exit_code"], 0);
    assert_eq!(recs[2]["detail"]["timeout_s"], 120);
    assert_eq!(recs[4]["detail"]["paths"], json!(["/home/user/note.txt"]));
    for r in &recs {
        for field in ["timestamp", "sandbox_id", "user_id", "action", "security_events"] {
            assert!(!r[field].is_null(), "{field} in {r}");
        }
        assert!(r.get("code_hash").is_some() && r.get("resource_usage").is_some());
        assert!(r.get("duration_ms").is_some() && r.get("exit_code").is_some());
    }

    // Filters.
    assert_eq!(srv.audit("action=exec.command").len(), 1);
    assert_eq!(srv.audit("action=sandbox.*").len(), 3);
    assert_eq!(srv.audit(&format!("sandbox={}", sb.id)).len(), 5);
    assert_eq!(srv.audit(&format!("sandbox={other_id}")).len(), 0, "another tenant's sandbox");
    assert_eq!(srv.audit(&format!("key={}", srv.key_id)).len(), 5);
    let other_key_id = srv.key_id_of(&srv.other_key.clone());
    assert_eq!(srv.audit(&format!("key={other_key_id}")).len(), 0, "another tenant's key");
    let t_exec = recs[1]["timestamp"].as_str().unwrap().to_string();
    let after = srv.audit(&format!("since={t_exec}"));
    assert_eq!(after.len(), 4, "since is inclusive: {after:?}");
    let before = srv.audit(&format!("until={t_exec}"));
    assert_eq!(before.len(), 1, "until is exclusive");
    assert_eq!(srv.audit(&format!("since={}", t0 / 1000 - 1)).len(), 5);
    assert_eq!(srv.audit("until=1000").len(), 0);
    let r = srv.request("GET", "/audit?since=yesterday", &[("X-API-Key", &srv.key)], b"");
    assert_eq!(r.status, 400);
    assert_eq!(srv.request("GET", "/audit", &[], b"").status, 401);
    // The other tenant sees its own create only.
    let r = srv.request("GET", "/audit", &[("X-API-Key", &srv.other_key)], b"");
    let theirs = r.json()["records"].as_array().unwrap().clone();
    assert_eq!(theirs.len(), 1);
    assert_eq!(theirs[0]["sandbox_id"], other_id.as_str());

    // The operator's CLI reads the database directly: every tenant, same filters, JSON lines.
    let cli = |args: &[&str]| -> Vec<Value> {
        let out = Command::new(&srv.bin)
            .arg("audit")
            .arg("--data-dir")
            .arg(srv.data.path())
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    assert_eq!(cli(&[]).len(), 6);
    assert_eq!(cli(&["--key", &srv.key_id]).len(), 5);
    assert_eq!(cli(&["--sandbox", &other_id]).len(), 1);
    assert_eq!(cli(&["--action", "exec.command"]), srv.audit("action=exec.command"));
    assert_eq!(cli(&["--since", &t_exec, "--key", &srv.key_id]).len(), 4);
    assert_eq!(cli(&["--limit", "2"]).len(), 2);
    let first = cli(&["--limit", "1"]);
    let cursor = first[0]["id"].as_i64().unwrap().to_string();
    assert_eq!(cli(&["--cursor", &cursor]).len(), 5);

    // And the JSON-lines file holds the same records.
    let file = std::fs::read_to_string(srv.data.path().join("audit.jsonl")).unwrap();
    let lines: Vec<Value> = file.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines, cli(&[]));
}

#[test]
fn alerts_fire_once_on_crossing() {
    let srv = server_or_skip!(&[
        "--memory",
        "256M",
        "--alert-startup",
        "0ms",
        "--alert-execution",
        "1s",
        "--alert-memory-pct",
        "30",
        "--alert-cpu-pct",
        "40",
    ]);
    let sb = srv.create("base");
    // ~100 MiB held (over 30 % of 256 MiB) while spinning for 3 s of CPU time (not wall time:
    // on a busy host the sandbox may get less than a core), then released.
    let script = "python3 -c \"
import time
block = bytearray(100 << 20)
for i in range(0, len(block), 4096):
    block[i] = 1
t = time.process_time()
while time.process_time() - t < 3:
    pass
del block
time.sleep(2)
print('done')
\"";
    let (out, end) = srv.run(&sb, script);
    assert_eq!(out, "done\n", "{end}");
    let recs = srv.audit_until("action=alert.*", |r| {
        !of_action(r, "alert.memory").is_empty() && !of_action(r, "alert.cpu").is_empty()
    });
    let count = |a: &str| of_action(&recs, a).len();
    assert_eq!(count("alert.startup"), 1, "{recs:?}");
    assert_eq!(count("alert.execution"), 1, "alerted while running, not again at the end");
    assert_eq!(count("alert.memory"), 1, "one crossing, one alert: {recs:?}");
    assert!(count("alert.cpu") >= 1, "{recs:?}");
    let mem = of_action(&recs, "alert.memory")[0];
    assert!(mem["detail"]["value"].as_f64().unwrap() > 30.0);
    assert_eq!(mem["detail"]["threshold"], 30.0);
    assert_eq!(mem["sandbox_id"], sb.id.as_str());
    let exec = of_action(&recs, "alert.execution")[0];
    assert_eq!(exec["detail"]["kind"], "command");
    assert_eq!(exec["detail"]["threshold"], 1000.0);
    let m = srv.scrape();
    assert_eq!(value(&m, "ringfence_alerts_total", &[("alert", "memory")]), Some(1.0));
    let warns: Vec<Value> = srv
        .log()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["level"] == "WARN" && v["fields"]["alert"].is_string())
        .collect();
    assert_eq!(warns.iter().filter(|w| w["fields"]["alert"] == "memory").count(), 1);
    assert!(warns.iter().all(|w| w["fields"]["sandbox_id"] == sb.id.as_str()), "{warns:?}");
    srv.kill(&sb);
    // The sandbox's CPU time over its life covers the 3 s spin (procfs or cgroup accounting).
    let kill = srv.audit(&format!("sandbox={}&action=sandbox.kill", sb.id));
    let cpu_ms = kill[0]["resource_usage"]["cpu_ms"].as_u64().unwrap();
    assert!((2500..20_000).contains(&cpu_ms), "{}", kill[0]);
}

#[test]
fn json_logs_name_the_sandbox_on_every_line() {
    let srv = server_or_skip!(&[]);
    let sb = srv.create("base");
    srv.run(&sb, "echo hi");
    srv.kill(&sb);
    // Let the last lines reach the file.
    std::thread::sleep(Duration::from_millis(200));
    let lines: Vec<Value> =
        srv.log().lines().map(|l| serde_json::from_str(l).expect("every line is JSON")).collect();
    let about: Vec<&Value> = lines.iter().filter(|l| l.to_string().contains(&sb.id)).collect();
    let messages: Vec<&str> =
        about.iter().filter_map(|l| l["fields"]["message"].as_str()).collect();
    assert!(messages.contains(&"sandbox created"), "{messages:?}");
    assert!(messages.contains(&"sandbox killed"), "{messages:?}");
    for l in about {
        let field = &l["fields"]["sandbox_id"];
        let span = &l["span"]["sandbox_id"];
        assert!(
            field == sb.id.as_str() || span == sb.id.as_str(),
            "a line about the sandbox without its sandbox_id field: {l}"
        );
    }
}

/// The deny rules hold for code cells too: a cell whose analysis matches is answered 403
/// naming the rule, never reaches the kernel, and is audited; the next plain cell runs.
#[test]
fn risk_deny_rules_refuse_a_matching_cell() {
    let env = Path::new(ringfence_jail::template::DEFAULT_INTERP_ENV);
    if !env.join("bin/python3").exists() {
        eprintln!("SKIPPED risk_deny_rules_refuse_a_matching_cell: no interpreter environment");
        return;
    }
    let srv = server_or_skip!(&[
        "--interp-env",
        ringfence_jail::template::DEFAULT_INTERP_ENV,
        "--risk-deny",
        "py.native-code"
    ]);
    let sb = srv.create("code-interpreter-v1");
    let cell = |code: &str| {
        let body = json!({"code": code}).to_string();
        srv.request(
            "POST",
            "/execute",
            &[
                ("E2b-Sandbox-Id", &sb.id),
                ("E2b-Sandbox-Port", "49999"),
                ("X-Access-Token", &sb.token),
                ("Content-Type", "application/json"),
            ],
            body.as_bytes(),
        )
    };
    let denied = "import ctypes\nopen('/tmp/cell-ran', 'w').write('x')";
    let r = cell(denied);
    assert_eq!(r.status, 403, "{}", r.text());
    assert!(r.text().contains("py.native-code (line 1)"), "{}", r.text());
    let r = cell("import os\nprint(os.path.exists('/tmp/cell-ran'))");
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.text().contains("False"), "the refused cell never ran: {}", r.text());
    let recs =
        srv.audit_until(&format!("sandbox={}&action=exec.refused", sb.id), |r| !r.is_empty());
    assert_eq!(recs[0]["detail"]["kind"], "cell", "{recs:?}");
    assert_eq!(recs[0]["detail"]["code"], denied);
    assert_eq!(recs[0]["code_hash"], sha256(denied));
}

#[test]
fn interpreter_cells_are_audited() {
    let env = Path::new(ringfence_jail::template::DEFAULT_INTERP_ENV);
    if !env.join("bin/python3").exists() {
        eprintln!("SKIPPED interpreter_cells_are_audited: no interpreter environment");
        return;
    }
    let srv = server_or_skip!(&["--interp-env", ringfence_jail::template::DEFAULT_INTERP_ENV]);
    let sb = srv.create("code-interpreter-v1");
    let cell = |code: &str| {
        let body = json!({"code": code}).to_string();
        let r = srv.request(
            "POST",
            "/execute",
            &[
                ("E2b-Sandbox-Id", &sb.id),
                ("E2b-Sandbox-Port", "49999"),
                ("X-Access-Token", &sb.token),
                ("Content-Type", "application/json"),
            ],
            body.as_bytes(),
        );
        assert_eq!(r.status, 200, "{}", r.text());
        r.text()
    };
    let out = cell("print(6 * 7)");
    assert!(out.contains("42"), "{out}");
    let mount = "import ctypes\nctypes.CDLL(None).mount(b'x', b'/mnt', b'tmpfs', 0, None)\n1/0";
    let out = cell(mount);
    assert!(out.contains("ZeroDivisionError"), "{out}");
    let recs = srv.audit_until(&format!("sandbox={}", sb.id), |r| {
        !of_action(r, "security.seccomp").is_empty()
    });
    let cells = of_action(&recs, "exec.cell");
    assert_eq!(cells.len(), 2, "{recs:?}");
    assert_eq!(cells[0]["code_hash"], sha256("print(6 * 7)"));
    assert_eq!(cells[0]["exit_code"], 0);
    assert_eq!(cells[0]["detail"]["error"], Value::Null);
    assert_eq!(cells[1]["code_hash"], sha256(mount));
    assert_eq!(cells[1]["detail"]["code"], mount);
    assert_eq!(cells[1]["exit_code"], 1);
    assert_eq!(cells[1]["detail"]["error"], "ZeroDivisionError");
    let evs = cells[1]["security_events"].as_array().unwrap();
    assert_eq!(evs.len(), 1, "{}", cells[1]);
    assert_eq!(evs[0]["syscall"], "mount", "the kernel's own supervisor reports it");
    let m = srv.scrape();
    assert_eq!(value(&m, "ringfence_execution_seconds_count", &[("kind", "cell")]), Some(2.0));
    assert_eq!(
        value(
            &m,
            "ringfence_escape_attempts_total",
            &[("sandbox", &sb.id), ("syscall", "mount"), ("kind", "seccomp")]
        ),
        Some(1.0)
    );
    srv.kill(&sb);
}

// ---------------------------------------------------------------------------------------------
// Uploads cut short (issue 12, finding 7).

/// Starts a request that claims `len` body bytes and sends only `sent` of them; the caller
/// drops the connection (a client going away) or keeps it while the server dies.
fn start_partial(
    port: u16,
    path: &str,
    headers: &[(&str, &str)],
    len: usize,
    sent: &[u8],
) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let mut req = format!("POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len}\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    s.write_all(sent).unwrap();
    s.flush().unwrap();
    // Long enough for the server to have written what it got into the sandbox.
    std::thread::sleep(Duration::from_millis(1500));
    s
}

fn sandbox_headers(sb: &Sandbox, content_type: &str) -> Vec<(&'static str, String)> {
    vec![
        ("E2b-Sandbox-Id", sb.id.clone()),
        ("E2b-Sandbox-Port", "49983".to_string()),
        ("X-Access-Token", sb.token.clone()),
        ("Content-Type", content_type.to_string()),
    ]
}

fn h<'a>(v: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    v.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

#[test]
fn uploads_cut_short_leave_targets_as_they_were_and_are_audited() {
    let mut srv = server_or_skip!(&[]);
    let sb = srv.create("base");
    let raw = sandbox_headers(&sb, "application/octet-stream");
    let read = |srv: &Server, path: &str| {
        let r = srv.request(
            "GET",
            &format!("/files?path={path}"),
            &h(&sandbox_headers(&sb, "text/plain")),
            b"",
        );
        (r.status, r.body)
    };
    let r = srv.request("POST", "/files?path=/home/user/keep.txt", &h(&raw), b"old");
    assert_eq!(r.status, 200, "{}", r.text());

    // A raw upload over an existing file, cut off after 3 of its 8 MB.
    let big = vec![b'n'; 8 << 20];
    drop(start_partial(
        srv.port,
        "/files?path=/home/user/keep.txt",
        &h(&raw),
        big.len(),
        &big[..3 << 20],
    ));
    // One to a new file, cut off too.
    drop(start_partial(
        srv.port,
        "/files?path=/home/user/new/fresh.bin",
        &h(&raw),
        big.len(),
        &big[..3 << 20],
    ));
    // A form of three files: the first whole, the second cut off in its data.
    let form = sandbox_headers(&sb, "multipart/form-data; boundary=XX");
    let mut body = form_part("XX", "/home/user/a.txt", b"first");
    body.extend(form_part("XX", "/home/user/b.bin", &big));
    body.extend(form_part("XX", "/home/user/c.txt", b"third"));
    body.extend_from_slice(b"--XX--\r\n");
    let cut = body.len() - (4 << 20);
    drop(start_partial(srv.port, "/files", &h(&form), body.len(), &body[..cut]));

    let recs = srv.audit_until("action=file.write", |r| {
        r.iter().filter(|x| x["detail"]["outcome"] == "aborted").count() >= 3
    });
    let aborted: Vec<&Value> =
        recs.iter().filter(|x| x["detail"]["outcome"] == "aborted").collect();
    assert_eq!(aborted.len(), 3, "{recs:?}");
    let file = |rec: &Value, i: usize| rec["detail"]["files"][i].clone();
    // Each names the file, its bytes received, and that it was discarded.
    for (rec, path) in aborted[..2].iter().zip(["/home/user/keep.txt", "/home/user/new/fresh.bin"])
    {
        let f = file(rec, 0);
        assert_eq!(
            (f["path"].as_str(), f["outcome"].as_str()),
            (Some(path), Some("aborted")),
            "{rec}"
        );
        assert!(f["bytes"].as_u64().unwrap() >= 1 << 20, "{rec}");
        assert_eq!(rec["detail"]["paths"], json!([]), "nothing was written: {rec}");
    }
    let multi = aborted[2];
    assert_eq!(file(multi, 0)["path"], "/home/user/a.txt");
    assert_eq!(file(multi, 0)["outcome"], "written");
    assert_eq!(file(multi, 1)["path"], "/home/user/b.bin");
    assert_eq!(file(multi, 1)["outcome"], "aborted");
    assert_eq!(multi["detail"]["paths"], json!(["/home/user/a.txt"]));

    // The targets: as they were, absent, or (the form's first file) whole.
    assert_eq!(read(&srv, "/home/user/keep.txt"), (200, b"old".to_vec()));
    assert_eq!(read(&srv, "/home/user/new/fresh.bin").0, 404);
    assert_eq!(read(&srv, "/home/user/a.txt"), (200, b"first".to_vec()));
    assert_eq!(read(&srv, "/home/user/b.bin").0, 404);
    assert_eq!(read(&srv, "/home/user/c.txt").0, 404);
    // And nothing else, hidden or not.
    let (ls, _) = srv.run(&sb, "ls -A /home/user /home/user/new");
    assert_eq!(ls, "/home/user:\na.txt\nkeep.txt\nnew\n\n/home/user/new:\n", "{ls}");

    // The server dies mid-upload: the agent drops the upload with the connection.
    let conn = start_partial(
        srv.port,
        "/files?path=/home/user/keep.txt",
        &h(&raw),
        big.len(),
        &big[..3 << 20],
    );
    let mut child = srv.child.take().unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    drop(conn);
    srv.spawn(&[]);
    assert_eq!(read(&srv, "/home/user/keep.txt"), (200, b"old".to_vec()));
    let (ls, _) = srv.run(&sb, "ls -A /home/user");
    assert_eq!(ls, "a.txt\nkeep.txt\nnew\n", "{ls}");
}
