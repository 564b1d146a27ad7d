//! The egress path end to end, on a plain network namespace standing in for a sandbox (the
//! server's tests repeat the essentials inside real sandboxes through the E2B API).
//!
//! Needs root (namespaces, veth, TUN) and `ip`, `curl`; without them each test prints
//! SKIPPED and returns.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod fakenet;

use std::process::{Command, Output};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fakenet::{Internet, Netns};
use ringfence_net::intercept::{HostRule, Interception, RequestRules};
use ringfence_net::policy::{SandboxPolicy, parse_rules};
use ringfence_net::{Egress, EgressEvent, NetConfig, SandboxNet};

fn can_run(test: &str) -> bool {
    let ok = ringfence_sys::euid() == 0
        && Command::new("ip").arg("-V").output().is_ok_and(|o| o.status.success())
        && Command::new("curl").arg("--version").output().is_ok_and(|o| o.status.success())
        && std::path::Path::new("/dev/net/tun").exists();
    if !ok {
        eprintln!("SKIPPED {test}: needs root, ip, curl and /dev/net/tun");
    }
    ok
}

struct Env {
    net: Internet,
    sbx: Netns,
    handle: Option<SandboxNet>,
    events: Arc<Mutex<Vec<EgressEvent>>>,
    rt: tokio::runtime::Runtime,
    cert: std::path::PathBuf,
    _dir: std::path::PathBuf,
}

impl Env {
    fn new(policy: SandboxPolicy, rate: Option<u64>) -> Env {
        let net = Internet::start(None);
        let sbx = Netns::new("sbx");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let dir =
            std::env::temp_dir().join(format!("rf-egress-{}-{}", std::process::id(), sbx.name));
        std::fs::create_dir_all(&dir).unwrap();
        let cert = dir.join("ca.pem");
        std::fs::write(&cert, &net.cert_pem).unwrap();
        let cfg = NetConfig {
            dns_upstreams: vec![(fakenet::DNS, 53).into()],
            egress_netns: Some(net.edge.path()),
            // The fake internet's CA stands in for the system's, for terminated connections.
            upstream_extra_ca: Some(cert.clone()),
            ..NetConfig::default()
        };
        let events: Arc<Mutex<Vec<EgressEvent>>> = Arc::default();
        let sink_events = events.clone();
        let handle = {
            let _g = rt.enter();
            let egress = Egress::new(cfg).unwrap();
            egress
                .attach(
                    &sbx.path(),
                    policy,
                    rate,
                    Arc::new(move |e| sink_events.lock().unwrap().push(e)),
                )
                .unwrap()
        };
        Env { net, sbx, handle: Some(handle), events, rt, cert, _dir: dir }
    }

    fn handle(&self) -> &SandboxNet {
        self.handle.as_ref().unwrap()
    }

    /// Runs a command inside the stand-in sandbox.
    fn sh(&self, script: &str) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.sbx.name, "sh", "-c", script])
            .output()
            .unwrap()
    }

    fn curl(&self, args: &str) -> (i32, String) {
        let o = self.sh(&format!("curl -sS -m 5 --cacert {} {args}", self.cert.display()));
        let text =
            format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
        (o.status.code().unwrap_or(-1), text)
    }

    fn events(&self) -> Vec<EgressEvent> {
        self.events.lock().unwrap().clone()
    }

    /// Waits for an event matching `pred` (events of closed connections come after the
    /// client sees the close).
    fn event(&self, pred: impl Fn(&EgressEvent) -> bool) -> EgressEvent {
        let until = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(e) = self.events().into_iter().find(&pred) {
                return e;
            }
            assert!(Instant::now() < until, "no such event among {:#?}", self.events());
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        drop(self.handle.take());
        let _ = std::fs::remove_dir_all(&self._dir);
        // Give the stack a turn to close its device before the runtime goes.
        self.rt.block_on(async { tokio::time::sleep(Duration::from_millis(20)).await });
    }
}

fn allowlist(allow: &[&str]) -> SandboxPolicy {
    SandboxPolicy {
        allow_internet_access: true,
        allow_out: parse_rules(allow).unwrap(),
        deny_out: parse_rules(&["0.0.0.0/0"]).unwrap(),
    }
}

#[test]
fn domain_allowlist_holds() {
    if !can_run("domain_allowlist_holds") {
        return;
    }
    let env = Env::new(allowlist(&["www.allowed.test"]), None);
    if std::env::var_os("RF_DEBUG").is_some() {
        eprintln!("{}", String::from_utf8_lossy(&env.sh("ip addr; ip route; cat /etc/resolv.conf; getent hosts www.allowed.test; curl -v -m 3 http://203.0.113.10/ 2>&1").stdout));
        eprintln!("{:#?}", env.events());
    }
    // Allowed, over HTTP and HTTPS.
    let (rc, out) = env.curl("http://www.allowed.test/");
    assert_eq!(rc, 0, "{out}");
    assert!(out.contains("hello from 203.0.113.10:80 host=www.allowed.test"), "{out}");
    let (rc, out) = env.curl("https://www.allowed.test/");
    assert_eq!(rc, 0, "{out}");
    assert!(out.contains("hello from 203.0.113.10:443"), "{out}");
    let e = env.event(|e| e.port == 443 && e.outcome == Some("closed"));
    assert!(e.allowed && e.name.as_deref() == Some("www.allowed.test") && e.bytes_in > 0, "{e:?}");

    // Another domain: the resolver refuses to look it up.
    let (rc, out) = env.curl("http://other.test/");
    assert_eq!(rc, 6, "{out}");
    env.event(|e| e.protocol == "dns" && !e.allowed && e.reason.contains("other.test"));

    // A raw IP, even the allowed name's own address: the client named no host.
    for ip in ["203.0.113.20", "203.0.113.10"] {
        let (_, out) = env.curl(&format!("http://{ip}/"));
        assert!(out.contains("denied:") && out.contains("not in allowOut"), "{out}");
    }
    let (rc, out) = env.curl("https://203.0.113.10/");
    assert_ne!(rc, 0, "{out}");

    // The allowed name at an address our resolver never gave for it (a hosts-file trick).
    let (_, out) = env.curl("--resolve www.allowed.test:80:203.0.113.20 http://www.allowed.test/");
    assert!(out.contains("never returned 203.0.113.20"), "{out}");
    let (rc, _) = env.curl("--resolve www.allowed.test:443:203.0.113.20 https://www.allowed.test/");
    assert_ne!(rc, 0);
    assert_eq!(env.net.hits("203.0.113.20:80"), 0, "nothing reached other.test");

    // Blocked ranges are refused at the SYN, though the edge can reach them.
    for (ip, what) in [
        ("169.254.169.254", "metadata"),
        ("10.66.0.5", "private"),
        ("192.0.2.1", "this host"),
        ("100.96.0.1", "this host"),
    ] {
        let (rc, out) = env.curl(&format!("http://{ip}/"));
        assert_eq!(rc, 7, "{ip}: {out}");
        env.event(|e| e.address == ip && !e.allowed && e.reason.contains(what));
    }
    assert!(fakenet::reachable_from_edge(&env.net.edge, fakenet::METADATA));
    assert!(fakenet::reachable_from_edge(&env.net.edge, fakenet::PRIVATE));
    assert_eq!(env.net.hits("169.254.169.254:80"), 1, "only the edge's own probe");

    // Every connection attempt above is on record.
    let tcp: Vec<_> = env.events().into_iter().filter(|e| e.protocol == "tcp").collect();
    assert!(tcp.len() >= 11, "{tcp:#?}");
}

#[test]
fn rebinding_and_blocked_answers() {
    if !can_run("rebinding_and_blocked_answers") {
        return;
    }
    let env = Env::new(SandboxPolicy::default(), None);
    // Internet access: other domains work, blocked ranges still do not.
    let (rc, out) = env.curl("http://other.test/");
    assert_eq!(rc, 0, "{out}");
    let (rc, _) = env.curl("http://metadata.test/");
    assert_ne!(rc, 0);
    env.event(|e| e.protocol == "dns" && !e.allowed && e.address == "169.254.169.254");
    // rebind.test answers a public address first, then a private one.
    let (rc, out) = env.curl("http://rebind.test/");
    assert_eq!(rc, 0, "{out}");
    let (rc, out) = env.curl("http://rebind.test/");
    assert_eq!(rc, 6, "the rebound answer is removed: {out}");
    let e = env.event(|e| e.protocol == "dns" && e.address == "10.66.0.5");
    assert!(e.reason.contains("rebind.test") && e.reason.contains("private"), "{e:?}");
    assert_eq!(env.net.hits("10.66.0.5:80"), 0);
    // UDP other than DNS goes nowhere, and says so once.
    env.sh("bash -c 'for i in 1 2 3; do echo x > /dev/udp/203.0.113.10/443; done' 2>/dev/null; sleep 0.2");
    let udp: Vec<_> = env.events().into_iter().filter(|e| e.protocol == "udp").collect();
    assert_eq!(udp.len(), 1, "{udp:?}");
}

#[test]
fn live_policy_change_cuts_connections() {
    if !can_run("live_policy_change_cuts_connections") {
        return;
    }
    let env = Env::new(SandboxPolicy::default(), None);
    let sbx = env.sbx.name.clone();
    let child = std::thread::spawn(move || {
        Command::new("ip")
            .args(["netns", "exec", &sbx, "curl", "-sS", "-m", "20", "http://other.test/stream"])
            .output()
            .unwrap()
    });
    let until = Instant::now() + Duration::from_secs(5);
    while env.handle().connections().is_empty() {
        assert!(Instant::now() < until, "the stream never opened");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    let began = Instant::now();
    let cut = env.handle().set_policy(allowlist(&["www.allowed.test"]));
    assert_eq!(cut, 1);
    let out = child.join().unwrap();
    assert!(began.elapsed() < Duration::from_secs(3), "the cut took {:?}", began.elapsed());
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("tick 1"));
    let e = env.event(|e| e.outcome == Some("cut"));
    assert!(!e.allowed && e.reason.contains("policy changed") && e.bytes_in > 0, "{e:?}");
    // The new policy holds for new connections too.
    let (rc, _) = env.curl("http://other.test/");
    assert_eq!(rc, 6);
    let (rc, _) = env.curl("http://www.allowed.test/");
    assert_eq!(rc, 0);
    let until = Instant::now() + Duration::from_secs(5);
    while !env.handle().connections().is_empty() {
        assert!(Instant::now() < until, "connections left open: {:?}", env.handle().connections());
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn egress_rate_limit() {
    if !can_run("egress_rate_limit") {
        return;
    }
    let env = Env::new(SandboxPolicy::default(), Some(1_000_000));
    let file = env._dir.join("upload");
    std::fs::write(&file, vec![b'u'; 3_000_000]).unwrap();
    let began = Instant::now();
    let (rc, out) =
        env.curl(&format!("-m 20 --data-binary @{} http://other.test/up", file.display()));
    let took = began.elapsed();
    assert_eq!(rc, 0, "{out}");
    assert!(out.contains("uploaded=3000000"), "{out}");
    // 3 MB at 1 MB/s: about three seconds (the first tenth of a second may burst).
    assert!(took >= Duration::from_millis(2500), "took {took:?}");
    let e = env.event(|e| e.port == 80 && e.outcome.is_some());
    assert!(e.bytes_out >= 3_000_000, "{e:?}");
}

/// Throughput and connection latency through the egress path, against the same commands in a
/// namespace with a plain veth route to the same servers. Numbers go to docs/PERFORMANCE.md:
/// `cargo test --release -p ringfence-net --test egress -- --ignored --nocapture egress_overhead`
#[test]
#[ignore]
fn egress_overhead() {
    if !can_run("egress_overhead") {
        return;
    }
    let env = Env::new(SandboxPolicy::default(), None);
    // The baseline: a namespace wired straight to the fake internet.
    let direct = Netns::new("direct");
    let (a, b) = (
        format!("rfd{}", std::process::id() % 100000),
        format!("rfD{}", std::process::id() % 100000),
    );
    fakenet::ip(&["link", "add", &a, "type", "veth", "peer", "name", &b]);
    fakenet::ip(&["link", "set", &a, "netns", &direct.name]);
    fakenet::ip(&["link", "set", &b, "netns", &env.net.inet.name]);
    fakenet::ip(&["-n", &direct.name, "addr", "add", "192.0.3.1/24", "dev", &a]);
    fakenet::ip(&["-n", &direct.name, "link", "set", &a, "up"]);
    fakenet::ip(&["-n", &direct.name, "route", "add", "default", "via", "192.0.3.2"]);
    fakenet::ip(&["-n", &env.net.inet.name, "addr", "add", "192.0.3.2/24", "dev", &b]);
    fakenet::ip(&["-n", &env.net.inet.name, "link", "set", &b, "up"]);
    let upload = env._dir.join("upload");
    std::fs::write(&upload, vec![b'u'; 512 << 20]).unwrap();
    let latency = r#"
import socket, time, sys
n = 500
t0 = time.perf_counter(); conn = 0.0; req = 0.0
for i in range(n):
    a = time.perf_counter()
    s = socket.create_connection(("203.0.113.20", 80))
    b = time.perf_counter()
    s.sendall(b"GET / HTTP/1.1\r\nHost: other.test\r\n\r\n")
    s.recv(4096)
    c = time.perf_counter()
    s.close()
    conn += b - a; req += c - b
print(f"connect_us={conn / n * 1e6:.0f} first_response_us={req / n * 1e6:.0f}")
"#;
    let script = format!(
        "curl -sS -o /dev/null -w 'download_MBps=%{{speed_download}}\\n' http://203.0.113.20/blob/{}; \
         curl -sS -o /dev/null -w 'upload_MBps=%{{speed_upload}}\\n' --data-binary @{} http://203.0.113.20/up; \
         python3 -c '{}'",
        2u64 << 30,
        upload.display(),
        latency.replace('\'', "\"")
    );
    for (label, ns) in [("direct veth", &direct.name), ("ringfence egress", &env.sbx.name)] {
        for round in 0..3 {
            let o = Command::new("ip")
                .args(["netns", "exec", ns, "sh", "-c", &script])
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&o.stdout).replace('\n', " ");
            let mb = |key: &str| -> String {
                text.split_whitespace()
                    .find_map(|w| w.strip_prefix(key))
                    .and_then(|v| v.parse::<f64>().ok())
                    .map(|v| format!("{:.0} MB/s", v / 1e6))
                    .unwrap_or_else(|| "?".into())
            };
            let lat: Vec<&str> = text.split_whitespace().filter(|w| w.contains("_us=")).collect();
            println!(
                "{label} #{round}: download {} upload {} {}",
                mb("download_MBps="),
                mb("upload_MBps="),
                lat.join(" ")
            );
            if !o.status.success() {
                println!("  stderr: {}", String::from_utf8_lossy(&o.stderr));
            }
        }
    }
}

/// Resident memory of this process (the stacks and relays run here), in bytes.
fn rss() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: usize = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kb * 1024
}

/// In the sandbox: as many connections as it can to a server that sends without end, none of
/// them read (a tiny receive buffer, so the data piles up on our side), held until stdin
/// closes. Reports how many connected.
const HOARD: &str = r#"
import socket, sys
held, refused = [], 0
for _ in range(CONNS):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    try:
        s.connect(("203.0.113.20", 9000))
        held.append(s)
    except OSError:
        refused += 1
print("held", len(held), refused, flush=True)
sys.stdin.read()
"#;

/// Host memory for a sandbox's connections is bounded per sandbox: twenty sandboxes opening
/// connections as fast as they can to a server that floods them, reading nothing, leave this
/// process no more than twenty budgets larger, and a quiet sandbox's request is not slowed.
#[test]
fn connection_buffers_are_bounded_per_sandbox_under_a_flood() {
    if !can_run("connection_buffers_are_bounded_per_sandbox_under_a_flood") {
        return;
    }
    const SANDBOXES: usize = 20;
    const CONNS: usize = 64;
    const BUDGET: usize = 2 * 1024 * 1024;
    let net = Internet::start(None);
    // The flood: every connection gets a megabyte, written until the sandbox's window closes.
    let listener = net.inet.run(|| std::net::TcpListener::bind((fakenet::OTHER, 9000)));
    let blob = Arc::new(vec![b'f'; 1 << 20]);
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let blob = blob.clone();
            std::thread::spawn(move || {
                use std::io::Write;
                let _ = conn.write_all(&blob);
                // Hold the connection open until the peer goes.
                let _ = std::io::Read::read(&mut conn, &mut [0u8; 1]);
            });
        }
    });
    let rt =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let cfg = NetConfig {
        dns_upstreams: vec![(fakenet::DNS, 53).into()],
        egress_netns: Some(net.edge.path()),
        buffer_budget: Some(BUDGET),
        ..NetConfig::default()
    };
    let events: Arc<Mutex<Vec<EgressEvent>>> = Arc::default();
    let egress = {
        let _g = rt.enter();
        Egress::new(cfg).unwrap()
    };
    let attach = |ns: &Netns| {
        let _g = rt.enter();
        let sink = events.clone();
        egress
            .attach(
                &ns.path(),
                SandboxPolicy::default(),
                None,
                Arc::new(move |e| sink.lock().unwrap().push(e)),
            )
            .unwrap()
    };
    let quiet = Netns::new("quiet");
    let _quiet_net = attach(&quiet);
    let fetch = |ns: &Netns| {
        let began = Instant::now();
        let o = Command::new("ip")
            .args([
                "netns",
                "exec",
                &ns.name,
                "curl",
                "-sS",
                "-m",
                "10",
                "-o",
                "/dev/null",
                "http://203.0.113.20/",
            ])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        began.elapsed()
    };
    let calm = (0..5).map(|_| fetch(&quiet)).min().unwrap();
    let before = rss();

    let sandboxes: Vec<(Netns, SandboxNet)> = (0..SANDBOXES)
        .map(|i| {
            let ns = Netns::new(&format!("hoard{i}"));
            let h = attach(&ns);
            (ns, h)
        })
        .collect();
    let script = HOARD.replace("CONNS", &CONNS.to_string());
    let mut hoarders: Vec<std::process::Child> = sandboxes
        .iter()
        .map(|(ns, _)| {
            Command::new("ip")
                .args(["netns", "exec", &ns.name, "python3", "-c", &script])
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut held = 0;
    for child in &mut hoarders {
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.as_mut().unwrap()),
            &mut line,
        )
        .unwrap();
        let f: Vec<usize> = line.split_whitespace().skip(1).map(|w| w.parse().unwrap()).collect();
        assert_eq!(f.len(), 2, "{line}");
        held += f[0];
    }
    // Let the flood fill every window and buffer it can.
    std::thread::sleep(Duration::from_secs(2));
    let during = fetch(&quiet);
    let grown = rss().saturating_sub(before);
    let buffered: usize = sandboxes.iter().map(|(_, h)| h.buffered_bytes()).sum();
    drop(hoarders);

    assert!(held > SANDBOXES, "the sandboxes opened only {held} connections");
    assert!(buffered <= SANDBOXES * BUDGET, "{buffered} bytes buffered");
    // Twenty budgets, and room for the per-connection bookkeeping and the runtime's own.
    let bound = SANDBOXES * BUDGET + 24 * 1024 * 1024;
    assert!(grown <= bound, "this process grew by {grown} bytes (bound {bound})");
    assert!(
        during < calm * 5 + Duration::from_millis(200),
        "a quiet sandbox's request took {during:?} under the flood (calm: {calm:?})"
    );
    // What the budget turned away is on the record.
    let refusals =
        events.lock().unwrap().iter().filter(|e| e.reason.contains("buffer memory")).count();
    assert!(refusals > 0, "no refusal was recorded");
    eprintln!(
        "held {held} connections; grew {grown} B; buffered {buffered} B; quiet request {during:?} (calm {calm:?})"
    );
}

/// What the fake internet's servers received (request heads), as one text.
fn seen_at(env: &Env, addr: &str) -> String {
    env.net
        .seen
        .lock()
        .unwrap()
        .iter()
        .filter(|(a, _)| a == addr)
        .map(|(_, h)| h.clone())
        .collect::<Vec<_>>()
        .join("\n")
}

/// Secrets named by a request rule reach that rule's host and nothing else; the sandbox
/// never reads the value back, whatever it tries.
#[test]
fn secrets_reach_only_their_hosts() {
    if !can_run("secrets_reach_only_their_hosts") {
        return;
    }
    const VALUE: &str = "sk-live-9f8e7d6c5b4a";
    let env = Env::new(SandboxPolicy::default(), None);
    let rules = RequestRules::new(vec![HostRule {
        host: "www.allowed.test".into(),
        headers: vec![("Authorization".into(), "Bearer ${e2b.secrets.tok}".into())],
    }])
    .unwrap();
    env.handle().set_interception(Some(Interception {
        rules,
        lookup: Arc::new(|name| (name == "tok").then(|| VALUE.to_string())),
    }));
    // The sandbox's trust: its own CA (for terminated hosts) plus the fake internet's CA
    // (standing in for the public roots, for everything passed through).
    let ca = env.handle().ca_pem("test sandbox").unwrap();
    let bundle = env._dir.join("bundle.pem");
    std::fs::write(&bundle, format!("{ca}{}", env.net.cert_pem)).unwrap();
    let curl = |args: &str| {
        let o = env.sh(&format!("curl -sS -m 5 --cacert {} {args}", bundle.display()));
        let text =
            format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
        assert!(!text.contains(VALUE), "the value reached the sandbox: {text}");
        (o.status.code().unwrap_or(-1), text)
    };
    let www = "203.0.113.10:443";
    let other = "203.0.113.20:443";

    // In scope: the rule's header goes out with the value; the echo comes back masked.
    let (rc, out) = curl("https://www.allowed.test/headers");
    assert_eq!(rc, 0, "{out}");
    assert!(out.contains(&"*".repeat(VALUE.len())), "{out}");
    assert!(seen_at(&env, www).contains(&format!("Authorization: Bearer {VALUE}")));
    let e = env.event(|e| e.rule.is_some() && e.outcome == Some("closed"));
    assert!(e.allowed && e.secrets == ["tok"], "{e:?}");
    assert!(e.reason.contains("rule for www.allowed.test") && !e.reason.contains(VALUE), "{e:?}");

    // The sandbox's own placeholder: substituted for the in-scope host ...
    let (rc, out) = curl("-H 'X-Key: ${e2b.secrets.tok}' https://www.allowed.test/headers");
    assert_eq!(rc, 0, "{out}");
    assert!(seen_at(&env, www).contains(&format!("X-Key: {VALUE}")));
    // ... and sent as written to a host outside the scope.
    let (rc, out) = curl("-H 'X-Key: ${e2b.secrets.tok}' https://other.test/headers");
    assert_eq!(rc, 0, "{out}");
    assert!(out.contains("X-Key: ${e2b.secrets.tok}"), "{out}");

    // A redirect to another host: the client's second request is a new connection, outside
    // the scope.
    let (rc, out) =
        curl("-L -H 'X-Key: ${e2b.secrets.tok}' https://www.allowed.test/redirect/other.test");
    assert_eq!(rc, 0, "{out}");
    assert!(out.contains("X-Key: ${e2b.secrets.tok}"), "{out}");

    // TLS to the in-scope name, HTTP for another: refused before anything goes upstream.
    let before = seen_at(&env, www).len();
    let (_, out) = curl("-H 'Host: other.test' https://www.allowed.test/headers");
    assert!(out.contains("differs from the TLS server name"), "{out}");
    let (_, out) = curl("--request-target https://other.test/headers https://www.allowed.test/");
    assert!(out.contains("not forwarded"), "{out}");
    assert_eq!(seen_at(&env, www).len(), before, "nothing went upstream");
    env.event(|e| !e.allowed && e.reason.contains("differs from the TLS server name"));

    // The in-scope name at an address our resolver never gave for it (a hosts-file or
    // rebinding trick): not terminated, so no value; the other host's certificate fails.
    let (rc, _) =
        curl("--resolve www.allowed.test:443:203.0.113.20 https://www.allowed.test/headers");
    assert_ne!(rc, 0);
    env.event(|e| e.address == "203.0.113.20" && e.port == 443 && e.rule.is_none());

    // Every server saw the value only where the rule put it.
    for (addr, heads) in env.net.seen.lock().unwrap().iter() {
        if heads.contains(VALUE) {
            assert_eq!(addr, www, "the value reached {addr}: {heads}");
        }
    }
    assert!(!seen_at(&env, other).contains(VALUE));

    // No rule: TLS passes through untouched (the fake internet's own certificate verifies).
    env.handle().set_interception(None);
    let o = env.sh(&format!(
        "curl -sS -m 5 --cacert {} https://www.allowed.test/headers",
        env.cert.display()
    ));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(!String::from_utf8_lossy(&o.stdout).contains("Authorization"));
}

/// A rule naming a secret that does not exist: the request is refused, not sent without it.
#[test]
fn missing_secret_refuses_the_request() {
    if !can_run("missing_secret_refuses_the_request") {
        return;
    }
    let env = Env::new(SandboxPolicy::default(), None);
    let rules = RequestRules::new(vec![HostRule {
        host: "*.allowed.test".into(),
        headers: vec![("Authorization".into(), "${e2b.secrets.gone}".into())],
    }])
    .unwrap();
    env.handle().set_interception(Some(Interception { rules, lookup: Arc::new(|_| None) }));
    let ca = env.handle().ca_pem("test sandbox").unwrap();
    let path = env._dir.join("sbx-ca.pem");
    std::fs::write(&path, ca).unwrap();
    let o = env
        .sh(&format!("curl -sS -m 5 --cacert {} https://www.allowed.test/headers", path.display()));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("does not exist"), "{out}");
    assert_eq!(env.net.hits("203.0.113.10:443"), 0);
}

/// TLS termination (a request rule on the host) against pass-through, in one run: download
/// MB/s of a 256 MiB body and connect → first response byte over 200 fresh HTTPS connections.
/// `cargo test -p ringfence-net --test egress tls_termination_overhead -- --ignored --nocapture`
#[test]
#[ignore]
fn tls_termination_overhead() {
    if !can_run("tls_termination_overhead") {
        return;
    }
    let env = Env::new(SandboxPolicy::default(), None);
    let ca = env.handle().ca_pem("bench").unwrap();
    let bundle = env._dir.join("bundle.pem");
    std::fs::write(&bundle, format!("{ca}{}", env.net.cert_pem)).unwrap();
    let latency = format!(
        r#"
import socket, ssl, time
ctx = ssl.create_default_context(cafile="{}")
n = 200; total = 0.0
for i in range(n):
    a = time.perf_counter()
    s = ctx.wrap_socket(socket.create_connection(("www.allowed.test", 443)), server_hostname="www.allowed.test")
    s.sendall(b"GET / HTTP/1.1\r\nHost: www.allowed.test\r\nConnection: close\r\n\r\n")
    s.recv(1)
    total += time.perf_counter() - a
    s.close()
print(f"first_byte_us={{total / n * 1e6:.0f}}")
"#,
        bundle.display()
    );
    let script = format!(
        "curl -sS -o /dev/null --cacert {} -w 'download_MBps=%{{speed_download}}\\n' https://www.allowed.test/blob/{}; python3 -c '{}'",
        bundle.display(),
        256u64 << 20,
        latency.replace('\'', "\"")
    );
    for round in 0..2 {
        for (label, rules) in [("pass-through", false), ("terminated", true)] {
            env.handle().set_interception(rules.then(|| {
                Interception {
                    rules: RequestRules::new(vec![HostRule {
                        host: "www.allowed.test".into(),
                        headers: vec![("Authorization".into(), "Bearer ${e2b.secrets.t}".into())],
                    }])
                    .unwrap(),
                    lookup: Arc::new(|_| Some("bench-secret-value".into())),
                }
            }));
            let o = env.sh(&script);
            let text = String::from_utf8_lossy(&o.stdout).replace('\n', " ");
            let mb = text
                .split_whitespace()
                .find_map(|w| w.strip_prefix("download_MBps="))
                .and_then(|v| v.parse::<f64>().ok())
                .map(|v| format!("{:.0} MB/s", v / 1e6))
                .unwrap_or_else(|| "?".into());
            let fb =
                text.split_whitespace().find(|w| w.starts_with("first_byte_us=")).unwrap_or("?");
            println!("{label} #{round}: download {mb} {fb}");
            if !o.status.success() {
                println!("  stderr: {}", String::from_utf8_lossy(&o.stderr));
            }
        }
    }
}

/// Egress through an upstream proxy against direct, in one run: download MB/s of a 256 MiB
/// body over HTTPS (passed through) and connect → first response byte over 200 fresh HTTPS
/// connections; the proxies are the fake internet's (a thread per tunnel, `std::io::copy`).
/// `cargo test -p ringfence-net --test egress proxy_overhead -- --ignored --nocapture`
#[test]
#[ignore]
fn proxy_overhead() {
    if !can_run("proxy_overhead") {
        return;
    }
    use ringfence_net::proxy::EgressProxy;
    let env = Env::new(SandboxPolicy::default(), None);
    let latency = format!(
        r#"
import socket, ssl, time
ctx = ssl.create_default_context(cafile="{}")
n = 200; total = 0.0
for i in range(n):
    a = time.perf_counter()
    s = ctx.wrap_socket(socket.create_connection(("www.allowed.test", 443)), server_hostname="www.allowed.test")
    s.sendall(b"GET / HTTP/1.1\r\nHost: www.allowed.test\r\nConnection: close\r\n\r\n")
    s.recv(1)
    total += time.perf_counter() - a
    s.close()
print(f"first_byte_us={{total / n * 1e6:.0f}}")
"#,
        env.cert.display()
    );
    let script = format!(
        "curl -sS -o /dev/null --cacert {} -w 'download_MBps=%{{speed_download}}\\n' https://www.allowed.test/blob/{}; python3 -c '{}'",
        env.cert.display(),
        256u64 << 20,
        latency.replace('\'', "\"")
    );
    let (u, p) = (Some(fakenet::PROXY_USER.to_string()), Some(fakenet::PROXY_PASS.to_string()));
    for round in 0..2 {
        for (label, proxy) in [
            ("direct", None),
            ("SOCKS5", Some(EgressProxy::new("203.0.113.40:1081", u.clone(), p.clone(), None))),
            (
                "HTTP CONNECT",
                Some(EgressProxy::new("http://203.0.113.40:3128", u.clone(), p.clone(), None)),
            ),
        ] {
            env.handle().set_proxy(proxy.map(Result::unwrap));
            let o = env.sh(&script);
            let text = String::from_utf8_lossy(&o.stdout).replace('\n', " ");
            let mb = text
                .split_whitespace()
                .find_map(|w| w.strip_prefix("download_MBps="))
                .and_then(|v| v.parse::<f64>().ok())
                .map(|v| format!("{:.0} MB/s", v / 1e6))
                .unwrap_or_else(|| "?".into());
            let fb =
                text.split_whitespace().find(|w| w.starts_with("first_byte_us=")).unwrap_or("?");
            println!("{label} #{round}: download {mb} {fb}");
            if !o.status.success() {
                println!("  stderr: {}", String::from_utf8_lossy(&o.stderr));
            }
        }
    }
}

/// An upstream proxy (E2B's `egressProxy`): allowed connections leave through it, asked for
/// the address the policy judged; a denied destination never reaches it; its credentials
/// never appear in a record; it changes live; a failing proxy fails the connection (no
/// direct fallback); a proxy at an address the ceiling refuses is refused when set and at
/// each dial.
#[test]
fn egress_through_an_upstream_proxy() {
    if !can_run("egress_through_an_upstream_proxy") {
        return;
    }
    use ringfence_net::proxy::EgressProxy;
    let env = Env::new(allowlist(&["www.allowed.test", "proxy.fake.test"]), None);
    let socks = EgressProxy::new(
        "proxy.fake.test:1081",
        Some(fakenet::PROXY_USER.into()),
        Some(fakenet::PROXY_PASS.into()),
        None,
    )
    .unwrap();
    // Resolved by the sandboxes' resolver and held to the ceiling.
    let egress = Egress::new(NetConfig {
        dns_upstreams: vec![(fakenet::DNS, 53).into()],
        egress_netns: Some(env.net.edge.path()),
        ..NetConfig::default()
    })
    .unwrap();
    let addrs = env.rt.block_on(egress.resolve_proxy(&socks)).unwrap();
    assert_eq!(addrs, vec![std::net::SocketAddr::from((fakenet::PROXY, 1081))]);
    for bad in ["10.66.0.5:1080", "127.0.0.1:1080", "169.254.169.254:80", "private.test:1080"] {
        let p = EgressProxy::new(bad, None, None, None).unwrap();
        let e = env.rt.block_on(egress.resolve_proxy(&p)).unwrap_err().to_string();
        let host = bad.split(':').next().unwrap();
        assert!(e.contains(host) && e.contains("outside what this server lets"), "{bad}: {e}");
    }

    // SOCKS5 with credentials: HTTP and HTTPS (passed through) to an allowed host.
    env.handle().set_proxy(Some(socks.clone()));
    let hits = env.net.hits("203.0.113.10:80");
    let (rc, out) = env.curl("http://www.allowed.test/");
    assert_eq!(rc, 0, "{out}");
    assert_eq!(env.net.hits("203.0.113.10:80"), hits + 1);
    let (rc, out) = env.curl("https://www.allowed.test/");
    assert_eq!(rc, 0, "{out}");
    let log = env.net.proxied();
    assert!(log.contains("203.0.113.40:1081 socks5 203.0.113.10:80 user=rf"), "{log}");
    assert!(log.contains("203.0.113.40:1081 socks5 203.0.113.10:443 user=rf"), "{log}");
    let e = env.event(|e| e.port == 80 && e.outcome == Some("closed"));
    assert!(e.allowed, "{e:?}");
    assert_eq!(e.proxy.as_deref(), Some("socks5://proxy.fake.test:1081"));
    assert!(e.reason.contains("through proxy socks5://proxy.fake.test:1081"), "{e:?}");

    // A denied destination is refused here and never reaches the proxy.
    let (rc, _) = env.curl("http://other.test/");
    assert_ne!(rc, 0);
    let (_, out) = env.curl("http://203.0.113.20/");
    assert!(out.contains("not in allowOut"), "{out}");
    assert!(!env.net.proxied().contains("203.0.113.20"), "{}", env.net.proxied());

    // Live change to HTTP CONNECT (same credentials).
    let connect = EgressProxy::new(
        "http://203.0.113.40:3128",
        Some(fakenet::PROXY_USER.into()),
        Some(fakenet::PROXY_PASS.into()),
        None,
    )
    .unwrap();
    env.handle().set_proxy(Some(connect));
    let (rc, out) = env.curl("https://www.allowed.test/");
    assert_eq!(rc, 0, "{out}");
    assert!(env.net.proxied().contains("203.0.113.40:3128 connect 203.0.113.10:443 user=rf"));

    // Wrong password: the connection fails; nothing goes out directly.
    let bad = EgressProxy::new(
        "203.0.113.40:1081",
        Some(fakenet::PROXY_USER.into()),
        Some("wrong".into()),
        None,
    )
    .unwrap();
    env.handle().set_proxy(Some(bad));
    let hits = env.net.hits("203.0.113.10:80");
    let (rc, _) = env.curl("http://www.allowed.test/");
    assert_ne!(rc, 0);
    assert_eq!(env.net.hits("203.0.113.10:80"), hits, "no direct fallback");
    env.event(|e| e.outcome == Some("failed") && e.reason.contains("SOCKS5 proxy"));

    // A proxy at a private address set anyway (as a restored sandbox might have): refused at
    // dial time, and never contacted.
    env.handle().set_proxy(Some(EgressProxy::new("10.66.0.5:1080", None, None, None).unwrap()));
    let (rc, _) = env.curl("http://www.allowed.test/");
    assert_ne!(rc, 0);
    assert!(!env.net.proxied().contains("10.66.0.5"), "{}", env.net.proxied());

    // The TLS-terminating path (a request rule) goes through the proxy too.
    env.handle().set_proxy(Some(socks));
    env.handle().set_interception(Some(Interception {
        rules: RequestRules::new(vec![HostRule {
            host: "www.allowed.test".into(),
            headers: vec![("X-Through".into(), "rule".into())],
        }])
        .unwrap(),
        lookup: Arc::new(|_| None),
    }));
    let ca = env.handle().ca_pem("test sandbox").unwrap();
    let bundle = env._dir.join("bundle.pem");
    std::fs::write(&bundle, format!("{ca}{}", env.net.cert_pem)).unwrap();
    let before = env.net.proxied().matches("10:443").count();
    let o = env.sh(&format!(
        "curl -sS -m 5 --cacert {} https://www.allowed.test/headers",
        bundle.display()
    ));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("X-Through: rule"));
    assert_eq!(env.net.proxied().matches("10:443").count(), before + 1, "{}", env.net.proxied());
    let e = env.event(|e| e.rule.is_some() && e.outcome == Some("closed"));
    assert_eq!(e.proxy.as_deref(), Some("socks5://proxy.fake.test:1081"), "{e:?}");
    env.handle().set_interception(None);

    // No proxy: direct again, and the proxy sees nothing new.
    env.handle().set_proxy(None);
    let before = env.net.proxied();
    let (rc, out) = env.curl("http://www.allowed.test/");
    assert_eq!(rc, 0, "{out}");
    assert_eq!(env.net.proxied(), before);

    // TLS to the proxy: verified against the proxy's own CA (`caCert`), its name from the
    // address; a CA that did not issue its certificate fails the connection (closed).
    let tls = |ca: &str| {
        EgressProxy::new(
            "proxy.fake.test:1443",
            None,
            None,
            Some(ringfence_net::proxy::ProxyTls { server_name: None, ca_pem: Some(ca.into()) }),
        )
        .unwrap()
    };
    env.handle().set_proxy(Some(tls(&env.net.proxy_ca_pem)));
    let (rc, out) = env.curl("http://www.allowed.test/");
    assert_eq!(rc, 0, "{out}");
    assert!(env.net.proxied().contains("203.0.113.40:1443 socks5+tls 203.0.113.10:80"));
    env.handle().set_proxy(Some(tls(&env.net.cert_pem)));
    let before = env.net.proxied().matches("socks5+tls").count();
    let (rc, _) = env.curl("http://www.allowed.test/");
    assert_ne!(rc, 0, "a proxy certificate from another CA is refused");
    assert_eq!(env.net.proxied().matches("socks5+tls").count(), before);
    env.event(|e| e.outcome == Some("failed") && e.reason.contains("TLS to the proxy"));

    // No record ever holds a password.
    for e in env.events() {
        let text = serde_json::to_string(&e).unwrap();
        assert!(!text.contains(fakenet::PROXY_PASS) && !text.contains("wrong"), "{text}");
    }
}

/// The TLS-terminating path keeps the connection alive: several requests on one connection,
/// each checked (Host against SNI) and rewritten, bodies forwarded by their length; a request
/// that fails the check on a kept-alive connection is refused and never goes upstream.
#[test]
fn terminated_connections_serve_several_requests() {
    if !can_run("terminated_connections_serve_several_requests") {
        return;
    }
    const VALUE: &str = "sk-keepalive-0a1b2c3d";
    let env = Env::new(SandboxPolicy::default(), None);
    env.handle().set_interception(Some(Interception {
        rules: RequestRules::new(vec![HostRule {
            host: "www.allowed.test".into(),
            headers: vec![("Authorization".into(), "Bearer ${e2b.secrets.tok}".into())],
        }])
        .unwrap(),
        lookup: Arc::new(|name| (name == "tok").then(|| VALUE.to_string())),
    }));
    let ca = env.handle().ca_pem("test sandbox").unwrap();
    let bundle = env._dir.join("bundle.pem");
    std::fs::write(&bundle, format!("{ca}{}", env.net.cert_pem)).unwrap();
    let script = format!(
        r#"
import http.client, ssl
c = http.client.HTTPSConnection("www.allowed.test", context=ssl.create_default_context(cafile="{}"), timeout=10)
for i in range(3):
    c.request("GET", "/headers", headers={{"X-N": f"n={{i}}"}})
    r = c.getresponse(); body = r.read().decode()
    print("get", i, r.status, "masked" if "*" * {} in body else "clear")
c.request("POST", "/headers", body=b"x" * 5000, headers={{"X-N": "n=post"}})
r = c.getresponse(); body = r.read().decode(); print("post", r.status, "masked" if "*" * {} in body else "clear")
c.request("GET", "/headers", headers={{"X-N": "n=after-post"}})
r = c.getresponse(); r.read(); print("after-post", r.status)
c.request("GET", "/headers", headers={{"Host": "other.test", "X-N": "n=smuggled"}})
r = c.getresponse(); print("wrong-host", r.status, r.read().decode().strip())
"#,
        bundle.display(),
        VALUE.len(),
        VALUE.len()
    );
    let o = env.sh(&format!("python3 -c '{}'", script.replace('\'', "\"")));
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(o.status.success(), "{out}{}", String::from_utf8_lossy(&o.stderr));
    assert!(!out.contains(VALUE), "{out}");
    for i in 0..3 {
        assert!(out.contains(&format!("get {i} 200 masked")), "{out}");
    }
    assert!(out.contains("post 200 masked") && out.contains("after-post 200"), "{out}");
    assert!(out.contains("wrong-host 421") && out.contains("differs from the TLS server name"));
    let seen = seen_at(&env, "203.0.113.10:443");
    for n in ["n=0", "n=1", "n=2", "n=post", "n=after-post"] {
        assert!(seen.contains(n), "{n} not upstream: {seen}");
    }
    assert!(!seen.contains("n=smuggled"), "the refused request went upstream: {seen}");
    assert_eq!(seen.matches(&format!("Authorization: Bearer {VALUE}")).count(), 5, "{seen}");
    // One connection, one record: five requests, then the refusal.
    let e = env.event(|e| e.rule.is_some() && e.reason.contains("differs"));
    assert!(!e.allowed && e.secrets == ["tok"], "{e:?}");
    let all: Vec<_> = env.events().into_iter().filter(|e| e.rule.is_some()).collect();
    assert_eq!(all.len(), 1, "one terminated connection: {all:#?}");
}
