//! A fake internet in network namespaces the test creates, and nothing outside them:
//!
//! ```text
//!  server's egress namespace "edge"        namespace "inet"
//!  e0 192.0.2.1/24  ───── veth ─────  i0 192.0.2.2/24
//!  default via 192.0.2.2                  on lo: 203.0.113.10  www.allowed.test (HTTP 80, HTTPS 443)
//!                                                203.0.113.20  other.test       (HTTP 80)
//!                                                203.0.113.30  pypi.fake.test   (a package index)
//!                                                198.51.100.53 DNS (UDP 53)
//!                                                169.254.169.254 "metadata" (HTTP 80)
//!                                                10.66.0.5     a "private" host (HTTP 80)
//!                                                203.0.113.40  proxy.fake.test: SOCKS5 (1080 open,
//!                                                              1081 user "rf" / "proxy-pw"),
//!                                                              HTTP CONNECT (3128, same user)
//!                                                10.66.0.5     the same proxies, at a private
//!                                                              address the ceiling refuses
//! ```
//!
//! The edge namespace routes everything to inet, so every address above is reachable from
//! it: when a sandbox cannot reach one, policy refused it, not routing. Documentation ranges
//! (RFC 5737) and `.test` names (RFC 2606) are never routed on the real internet.
//! Shared by the net crate's tests and the server's (`#[path]`).

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::process::Command;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{Name, RData, Record, RecordType};

pub const WWW: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
pub const OTHER: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 20);
pub const PYPI: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 30);
pub const DNS: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 53);
pub const METADATA: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);
pub const PRIVATE: Ipv4Addr = Ipv4Addr::new(10, 66, 0, 5);
pub const EDGE: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
pub const PROXY: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 40);
/// The proxies' credentials (on 1081 and 3128).
pub const PROXY_USER: &str = "rf";
pub const PROXY_PASS: &str = "proxy-pw";

/// Runs `ip ARGS`, panicking with its stderr on failure.
pub fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

static SEQ: AtomicU64 = AtomicU64::new(0);

/// A named network namespace, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(tag: &str) -> Netns {
        let name =
            format!("rft-{tag}-{}-{}", std::process::id(), SEQ.fetch_add(1, Ordering::SeqCst));
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        ip(&["netns", "add", &name]);
        ip(&["-n", &name, "link", "set", "lo", "up"]);
        Netns { name }
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.name))
    }

    /// Runs `f` on a thread inside this namespace (sockets made there stay in it).
    pub fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
    ) -> T {
        ringfence_net::netns::in_netns(&self.path(), f).expect("in namespace")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).output();
    }
}

/// What the fake internet saw and serves.
pub struct Internet {
    pub edge: Netns,
    pub inet: Netns,
    /// PEM of the CA that issued the HTTPS servers' certificates (www.allowed.test on 443,
    /// other.test on 443).
    pub cert_pem: String,
    /// Every request head an HTTP(S) server received, with the "addr:port" it came to.
    pub seen: Seen,
    /// Requests each HTTP server answered, by "addr:port".
    pub hits: Arc<Mutex<HashMap<String, u64>>>,
    /// A-queries the DNS server answered for rebind.test.
    pub rebinds: Arc<AtomicU64>,
    /// Every tunnel a fake proxy was asked for: "<proxy addr:port> <kind> <target> user=<u>".
    pub proxied: Arc<Mutex<Vec<String>>>,
    /// PEM of the CA of the TLS proxy's certificate (proxy.fake.test:1443).
    pub proxy_ca_pem: String,
    stop: Arc<AtomicBool>,
}

impl Drop for Internet {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// The zone the fake DNS serves. `rebind.test` answers a public address, then a private one,
/// alternately: a rebinding attack.
fn lookup(name: &str, rebinds: &AtomicU64) -> Option<Ipv4Addr> {
    match name {
        "www.allowed.test" | "allowed.test" => Some(WWW),
        "other.test" | "sub.other.test" => Some(OTHER),
        "pypi.fake.test" => Some(PYPI),
        "proxy.fake.test" => Some(PROXY),
        "private.test" => Some(PRIVATE),
        "metadata.test" => Some(METADATA),
        "rebind.test" => {
            let n = rebinds.fetch_add(1, Ordering::SeqCst);
            Some(if n.is_multiple_of(2) { WWW } else { PRIVATE })
        }
        _ => None,
    }
}

impl Internet {
    /// Builds the namespaces and starts every server. `wheel` is served as the only
    /// distribution of `tinypkg` by the package index.
    pub fn start(wheel: Option<(String, Vec<u8>)>) -> Internet {
        let edge = Netns::new("edge");
        let inet = Netns::new("inet");
        let n = SEQ.fetch_add(1, Ordering::SeqCst);
        let (e0, i0) = (
            format!("rfe{}x{n}", std::process::id() % 100000),
            format!("rfi{}x{n}", std::process::id() % 100000),
        );
        ip(&["link", "add", &e0, "type", "veth", "peer", "name", &i0]);
        ip(&["link", "set", &e0, "netns", &edge.name]);
        ip(&["link", "set", &i0, "netns", &inet.name]);
        ip(&["-n", &edge.name, "addr", "add", "192.0.2.1/24", "dev", &e0]);
        ip(&["-n", &edge.name, "link", "set", &e0, "up"]);
        ip(&["-n", &edge.name, "route", "add", "default", "via", "192.0.2.2"]);
        ip(&["-n", &inet.name, "addr", "add", "192.0.2.2/24", "dev", &i0]);
        ip(&["-n", &inet.name, "link", "set", &i0, "up"]);
        for a in [WWW, OTHER, PYPI, DNS, METADATA, PRIVATE, PROXY] {
            ip(&["-n", &inet.name, "addr", "add", &format!("{a}/32"), "dev", "lo"]);
        }
        let stop = Arc::new(AtomicBool::new(false));
        let hits: Arc<Mutex<HashMap<String, u64>>> = Arc::default();
        let rebinds = Arc::new(AtomicU64::new(0));

        // DNS
        let udp = inet.run(|| UdpSocket::bind((DNS, 53)));
        udp.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
        let (r, st) = (rebinds.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while !st.load(Ordering::SeqCst) {
                let Ok((n, from)) = udp.recv_from(&mut buf) else { continue };
                let Ok(q) = Message::from_vec(&buf[..n]) else { continue };
                let mut m = Message::response(q.metadata.id, q.metadata.op_code);
                m.metadata.message_type = MessageType::Response;
                m.metadata.recursion_available = true;
                m.queries = q.queries.clone();
                if let Some(question) = q.queries.first() {
                    let name = question.name().to_ascii().trim_end_matches('.').to_string();
                    let found = if question.query_type() == RecordType::A {
                        lookup(&name, &r)
                    } else {
                        None
                    };
                    match found {
                        Some(a) => {
                            let owner = Name::from_str(&format!("{name}.")).unwrap();
                            m.answers.push(Record::from_rdata(owner, 1, RData::A(A(a))));
                        }
                        None if lookup(&name, &AtomicU64::new(0)).is_none() => {
                            m.metadata.response_code = ResponseCode::NXDomain;
                        }
                        None => {}
                    }
                }
                let _ = udp.send_to(&m.to_vec().unwrap(), from);
            }
        });

        // HTTP on every web address.
        for a in [WWW, OTHER, PYPI, METADATA, PRIVATE] {
            let l = inet.run(move || TcpListener::bind((a, 80)));
            let (h, st, wheel) = (hits.clone(), stop.clone(), wheel.clone());
            std::thread::spawn(move || serve_http(l, h, st, wheel, None));
        }

        // HTTPS for www.allowed.test and other.test, certificates from one test CA.
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params.distinguished_name.push(rcgen::DnType::CommonName, "fake internet CA");
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let cert_pem = ca_cert.pem();
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        for (addr, name) in [(WWW, "www.allowed.test"), (OTHER, "other.test")] {
            let key = rcgen::KeyPair::generate().unwrap();
            let leaf = rcgen::CertificateParams::new(vec![name.to_string()])
                .unwrap()
                .signed_by(&key, &issuer)
                .unwrap();
            let pkey = rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap();
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let cfg = rustls::ServerConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(vec![leaf.der().clone(), ca_cert.der().clone()], pkey)
                .unwrap();
            let tls = Arc::new(cfg);
            let l = inet.run(move || TcpListener::bind((addr, 443)));
            let (h, st) = (hits.clone(), stop.clone());
            std::thread::spawn(move || serve_http(l, h, st, None, Some(tls)));
        }

        // Proxies, at a public and at a private address.
        let proxied: Arc<Mutex<Vec<String>>> = Arc::default();
        for a in [PROXY, PRIVATE] {
            for (port, http, auth) in
                [(1080, false, false), (1081, false, true), (3128, true, true)]
            {
                let l = inet.run(move || TcpListener::bind((a, port)));
                let (log, st, ns) = (proxied.clone(), stop.clone(), inet.path());
                // Blocking accept, as serve_http: no polling delay in latency numbers.
                std::thread::spawn(move || {
                    while !st.load(Ordering::SeqCst) {
                        let Ok((c, _)) = l.accept() else { continue };
                        let _ = c.set_nodelay(true);
                        let (log, ns) = (log.clone(), ns.clone());
                        let me = format!("{a}:{port}");
                        std::thread::spawn(move || proxy_one(c, &me, http, auth, &log, &ns));
                    }
                });
            }
        }

        // SOCKS5 over TLS on 1443 (no credentials), its certificate for proxy.fake.test from
        // its own CA (`proxy_ca_pem`).
        let pca_key = rcgen::KeyPair::generate().unwrap();
        let mut pca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        pca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        pca.distinguished_name.push(rcgen::DnType::CommonName, "fake proxy CA");
        let pca_cert = pca.self_signed(&pca_key).unwrap();
        let proxy_ca_pem = pca_cert.pem();
        let pissuer = rcgen::Issuer::new(pca, pca_key);
        let pkey = rcgen::KeyPair::generate().unwrap();
        let pleaf = rcgen::CertificateParams::new(vec!["proxy.fake.test".to_string()])
            .unwrap()
            .signed_by(&pkey, &pissuer)
            .unwrap();
        let pk = rustls::pki_types::PrivateKeyDer::try_from(pkey.serialize_der()).unwrap();
        let pcfg = Arc::new(
            rustls::ServerConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![pleaf.der().clone()], pk)
            .unwrap(),
        );
        let l = inet.run(|| TcpListener::bind((PROXY, 1443)));
        let (log, st, ns) = (proxied.clone(), stop.clone(), inet.path());
        std::thread::spawn(move || {
            while !st.load(Ordering::SeqCst) {
                let Ok((c, _)) = l.accept() else { continue };
                let (log, ns, cfg) = (log.clone(), ns.clone(), pcfg.clone());
                std::thread::spawn(move || tls_socks_one(c, cfg, &log, &ns));
            }
        });

        Internet {
            edge,
            inet,
            cert_pem,
            proxy_ca_pem,
            seen: SEEN.clone(),
            hits,
            rebinds,
            proxied,
            stop,
        }
    }

    /// The tunnels proxies were asked for, one a line.
    pub fn proxied(&self) -> String {
        self.proxied.lock().unwrap().join("\n")
    }

    pub fn hits(&self, key: &str) -> u64 {
        self.hits.lock().unwrap().get(key).copied().unwrap_or(0)
    }
}

fn serve_http(
    l: TcpListener,
    hits: Arc<Mutex<HashMap<String, u64>>>,
    stop: Arc<AtomicBool>,
    wheel: Option<(String, Vec<u8>)>,
    tls: Option<Arc<rustls::ServerConfig>>,
) {
    let local = l.local_addr().unwrap();
    // Blocking accept (no polling delay in latency numbers); the thread ends with the process.
    while !stop.load(Ordering::SeqCst) {
        let Ok((s, _)) = l.accept() else { continue };
        let _ = s.set_nodelay(true);
        let (hits, wheel, tls, stop) = (hits.clone(), wheel.clone(), tls.clone(), stop.clone());
        std::thread::spawn(move || {
            let _ = match tls {
                Some(cfg) => {
                    let conn = rustls::ServerConnection::new(cfg).unwrap();
                    let mut t = rustls::StreamOwned::new(conn, s);
                    one_request(&mut t, local, &hits, &wheel, &stop)
                }
                None => {
                    let mut s = s;
                    one_request(&mut s, local, &hits, &wheel, &stop)
                }
            };
        });
    }
}

/// Request heads seen by every fake server of this process (tests filter by address).
static SEEN: std::sync::LazyLock<Seen> = std::sync::LazyLock::new(Arc::default);

/// ("addr:port", request head) of every request answered.
pub type Seen = Arc<Mutex<Vec<(String, String)>>>;

/// Answers requests on one connection (keep-alive) until the client closes.
fn one_request<S: Read + Write>(
    s: &mut S,
    local: SocketAddr,
    hits: &Mutex<HashMap<String, u64>>,
    wheel: &Option<(String, Vec<u8>)>,
    stop: &AtomicBool,
) -> std::io::Result<()> {
    let mut r = BufReader::new(&mut *s);
    loop {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let mut parts = line.split_whitespace();
        let method = parts.next().unwrap_or("").to_string();
        let path = parts.next().unwrap_or("/").to_string();
        let mut host = String::new();
        let mut len = 0usize;
        let mut head = line.clone();
        loop {
            let mut h = String::new();
            r.read_line(&mut h)?;
            head.push_str(&h);
            if h.trim().is_empty() {
                break;
            }
            let (k, v) = h.split_once(':').unwrap_or((&h, ""));
            match k.trim().to_ascii_lowercase().as_str() {
                "host" => host = v.trim().to_string(),
                "content-length" => len = v.trim().parse().unwrap_or(0),
                _ => {}
            }
        }
        // Uploads: count and discard the body.
        let mut left = len;
        let mut sink = vec![0u8; 65536];
        while left > 0 {
            let n = r.read(&mut sink[..left.min(65536)])?;
            if n == 0 {
                break;
            }
            left -= n;
        }
        *hits.lock().unwrap().entry(local.to_string()).or_default() += 1;
        SEEN.lock().unwrap().push((local.to_string(), head.clone()));
        let w = r.get_mut();
        if path == "/headers" {
            // An echo: the request head, as received, in the body.
            w.write_all(
                format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n{head}",
                    head.len()
                )
                .as_bytes(),
            )?;
            w.flush()?;
            continue;
        }
        if let Some(to) = path.strip_prefix("/redirect/") {
            w.write_all(
                format!("HTTP/1.1 302 Found\r\nlocation: https://{to}/headers\r\ncontent-length: 0\r\n\r\n")
                    .as_bytes(),
            )?;
            w.flush()?;
            continue;
        }
        if path == "/stream" {
            // One line a tenth of a second, forever: a connection to cut.
            w.write_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\n")?;
            for i in 0.. {
                if stop.load(Ordering::SeqCst) {
                    return Ok(());
                }
                w.write_all(format!("tick {i}\n").as_bytes())?;
                w.flush()?;
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        if let Some(n) = path.strip_prefix("/blob/") {
            // Streamed in chunks: benchmarks ask for gigabytes.
            let n: usize = n.parse().unwrap_or(0);
            w.write_all(format!("HTTP/1.1 200 OK\r\ncontent-length: {n}\r\n\r\n").as_bytes())?;
            let chunk = vec![b'x'; 256 * 1024];
            let mut left = n;
            while left > 0 {
                let k = left.min(chunk.len());
                w.write_all(&chunk[..k])?;
                left -= k;
            }
            w.flush()?;
            continue;
        }
        let (ctype, body): (&str, Vec<u8>) = if path.starts_with("/simple/tinypkg") {
            let (file, _) =
                wheel.as_ref().map(|(f, b)| (f.as_str(), b.len())).unwrap_or(("none", 0));
            ("text/html", format!("<!DOCTYPE html><html><body><a href=\"/packages/{file}\">{file}</a></body></html>\n").into_bytes())
        } else if let (Some(f), Some((file, bytes))) =
            (path.strip_prefix("/packages/"), wheel.as_ref())
        {
            if f == file {
                ("application/octet-stream", bytes.clone())
            } else {
                ("text/plain", b"no such file\n".to_vec())
            }
        } else {
            (
                "text/plain",
                format!(
                    "hello from {local} host={host} method={method} path={path} uploaded={len}\n"
                )
                .into_bytes(),
            )
        };
        let head = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: {ctype}\r\ncontent-length: {}\r\n\r\n",
            body.len()
        );
        w.write_all(head.as_bytes())?;
        w.write_all(&body)?;
        w.flush()?;
    }
}

/// Connects from the edge namespace (where the server dials from) to `a:80` and reads the
/// greeting: proof that a destination is reachable, so a refusal is the policy's doing.
pub fn reachable_from_edge(edge: &Netns, a: Ipv4Addr) -> bool {
    edge.run(move || {
        let mut s = TcpStream::connect_timeout(
            &SocketAddr::new(IpAddr::V4(a), 80),
            Duration::from_secs(2),
        )?;
        s.write_all(b"GET / HTTP/1.1\r\nHost: probe\r\nConnection: close\r\n\r\n")?;
        let mut out = String::new();
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        let _ = s.read_to_string(&mut out);
        Ok(out.contains("hello from"))
    })
}

/// Builds a tiny wheel for `tinypkg` 0.1 with Python's zipfile; returns (file name, bytes).
pub fn build_wheel(dir: &std::path::Path) -> (String, Vec<u8>) {
    let file = "tinypkg-0.1-py3-none-any.whl".to_string();
    let path = dir.join(&file);
    let script = r#"
import sys, zipfile, hashlib, base64
out = sys.argv[1]
files = {
  "tinypkg/__init__.py": b"ANSWER = 42\n",
  "tinypkg-0.1.dist-info/METADATA": b"Metadata-Version: 2.1\nName: tinypkg\nVersion: 0.1\n",
  "tinypkg-0.1.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: ringfence-test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
}
record = []
for name, data in files.items():
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    record.append(f"{name},sha256={digest},{len(data)}")
record.append("tinypkg-0.1.dist-info/RECORD,,")
files["tinypkg-0.1.dist-info/RECORD"] = ("\n".join(record) + "\n").encode()
with zipfile.ZipFile(out, "w") as z:
    for name, data in files.items():
        z.writestr(name, data)
"#;
    let st = Command::new("python3").arg("-c").arg(script).arg(&path).status().expect("python3");
    assert!(st.success(), "building the wheel");
    (file, std::fs::read(&path).unwrap())
}

/// One client of a fake proxy: the SOCKS5 or CONNECT handshake, the tunnel it asks for
/// logged, then bytes copied both ways (from inside the fake internet).
fn proxy_one(
    mut c: TcpStream,
    me: &str,
    http: bool,
    auth: bool,
    log: &Mutex<Vec<String>>,
    ns: &std::path::Path,
) -> std::io::Result<()> {
    c.set_read_timeout(Some(Duration::from_secs(10)))?;
    let (target, user) = if http {
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            c.read_exact(&mut b)?;
            head.push(b[0]);
        }
        let text = String::from_utf8_lossy(&head).to_string();
        let target = text.split_whitespace().nth(1).unwrap_or_default().to_string();
        use base64::Engine;
        let want =
            base64::engine::general_purpose::STANDARD.encode(format!("{PROXY_USER}:{PROXY_PASS}"));
        let given = text
            .lines()
            .find_map(|l| l.strip_prefix("Proxy-Authorization: Basic "))
            .map(str::trim)
            .map(str::to_string);
        if auth && given.as_deref() != Some(want.as_str()) {
            log.lock().unwrap().push(format!("{me} connect {target} refused: bad credentials"));
            c.write_all(
                b"HTTP/1.1 407 Proxy Authentication Required\r\ncontent-length: 0\r\n\r\n",
            )?;
            return Ok(());
        }
        (target, if given.is_some() { PROXY_USER } else { "-" })
    } else {
        let mut g = [0u8; 2];
        c.read_exact(&mut g)?;
        let mut methods = vec![0u8; usize::from(g[1])];
        c.read_exact(&mut methods)?;
        let method = if auth { 2 } else { 0 };
        if g[0] != 5 || !methods.contains(&method) {
            c.write_all(&[5, 0xff])?;
            return Ok(());
        }
        c.write_all(&[5, method])?;
        let mut user = "-";
        if auth {
            let mut v = [0u8; 2];
            c.read_exact(&mut v)?;
            let mut u = vec![0u8; usize::from(v[1])];
            c.read_exact(&mut u)?;
            let mut pl = [0u8; 1];
            c.read_exact(&mut pl)?;
            let mut pw = vec![0u8; usize::from(pl[0])];
            c.read_exact(&mut pw)?;
            if u != PROXY_USER.as_bytes() || pw != PROXY_PASS.as_bytes() {
                log.lock().unwrap().push(format!("{me} socks5 refused: bad credentials"));
                c.write_all(&[1, 1])?;
                return Ok(());
            }
            c.write_all(&[1, 0])?;
            user = PROXY_USER;
        }
        let mut r = [0u8; 4];
        c.read_exact(&mut r)?;
        let host = match r[3] {
            1 => {
                let mut a = [0u8; 4];
                c.read_exact(&mut a)?;
                Ipv4Addr::from(a).to_string()
            }
            3 => {
                let mut l = [0u8; 1];
                c.read_exact(&mut l)?;
                let mut n = vec![0u8; usize::from(l[0])];
                c.read_exact(&mut n)?;
                format!("name:{}", String::from_utf8_lossy(&n))
            }
            _ => return Ok(()),
        };
        let mut port = [0u8; 2];
        c.read_exact(&mut port)?;
        (format!("{host}:{}", u16::from_be_bytes(port)), user)
    };
    log.lock()
        .unwrap()
        .push(format!("{me} {} {target} user={user}", if http { "connect" } else { "socks5" }));
    let dst: SocketAddr = match target.parse() {
        Ok(d) => d,
        Err(_) => return Ok(()),
    };
    let up = ringfence_net::netns::in_netns(ns, move || {
        TcpStream::connect_timeout(&dst, Duration::from_secs(5))
    });
    let up = match up {
        Ok(u) => u,
        Err(_) => {
            let _ = if http {
                c.write_all(b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\n\r\n")
            } else {
                c.write_all(&[5, 5, 0, 1, 0, 0, 0, 0, 0, 0])
            };
            return Ok(());
        }
    };
    let _ = up.set_nodelay(true);
    if http {
        c.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")?;
    } else {
        c.write_all(&[5, 0, 0, 1, 0, 0, 0, 0, 0, 0])?;
    }
    c.set_read_timeout(None)?;
    let (mut c2, mut up2) = (c.try_clone()?, up.try_clone()?);
    let mut up = up;
    let t = std::thread::spawn(move || {
        let _ = std::io::copy(&mut c2, &mut up2);
        let _ = up2.shutdown(std::net::Shutdown::Write);
    });
    let _ = std::io::copy(&mut up, &mut c);
    let _ = c.shutdown(std::net::Shutdown::Write);
    let _ = t.join();
    Ok(())
}

/// One client of the TLS SOCKS5 proxy (no credentials): the handshake inside TLS, then bytes
/// copied both ways by polling each side with a short timeout (one thread; a test's traffic).
fn tls_socks_one(
    c: TcpStream,
    cfg: Arc<rustls::ServerConfig>,
    log: &Mutex<Vec<String>>,
    ns: &std::path::Path,
) -> std::io::Result<()> {
    c.set_read_timeout(Some(Duration::from_secs(10)))?;
    let conn = rustls::ServerConnection::new(cfg).map_err(std::io::Error::other)?;
    let mut t = rustls::StreamOwned::new(conn, c);
    let mut g = [0u8; 2];
    t.read_exact(&mut g)?;
    let mut m = vec![0u8; usize::from(g[1])];
    t.read_exact(&mut m)?;
    t.write_all(&[5, 0])?;
    let mut r = [0u8; 10];
    t.read_exact(&mut r)?;
    if r[3] != 1 {
        return Ok(());
    }
    let dst =
        SocketAddr::from((Ipv4Addr::new(r[4], r[5], r[6], r[7]), u16::from_be_bytes([r[8], r[9]])));
    log.lock().unwrap().push(format!("{PROXY}:1443 socks5+tls {dst} user=-"));
    let mut up = ringfence_net::netns::in_netns(ns, move || {
        TcpStream::connect_timeout(&dst, Duration::from_secs(5))
    })?;
    t.write_all(&[5, 0, 0, 1, 0, 0, 0, 0, 0, 0])?;
    t.flush()?;
    let tick = Some(Duration::from_millis(5));
    t.sock.set_read_timeout(tick)?;
    up.set_read_timeout(tick)?;
    let mut buf = vec![0u8; 64 * 1024];
    let (mut client_open, mut up_open) = (true, true);
    let quiet = |e: &std::io::Error| {
        matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut)
    };
    while client_open || up_open {
        if client_open {
            match t.read(&mut buf) {
                Ok(0) => {
                    client_open = false;
                    let _ = up.shutdown(std::net::Shutdown::Write);
                }
                Ok(n) => up.write_all(&buf[..n])?,
                Err(e) if quiet(&e) => {}
                Err(_) => client_open = false,
            }
        }
        if up_open {
            match up.read(&mut buf) {
                Ok(0) => {
                    t.conn.send_close_notify();
                    let _ = t.flush();
                    return Ok(());
                }
                Ok(n) => {
                    t.write_all(&buf[..n])?;
                    t.flush()?;
                }
                Err(e) if quiet(&e) => {}
                Err(_) => up_open = false,
            }
        }
    }
    Ok(())
}
