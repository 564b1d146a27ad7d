//! A real `ringfence serve` (the binary, as operators run it) with its own data directory and
//! keys, and one-shot HTTP/1.1 requests to it.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::Value;

/// `RINGFENCE_BIN`, or `target/<profile>/ringfence` beside the test binary when the agent is
/// there too.
pub fn binary() -> Option<PathBuf> {
    let bin = ringfence_test_support::sibling_binary("ringfence", "RINGFENCE_BIN")?;
    (std::env::var_os("RINGFENCE_BIN").is_some()
        || ringfence_test_support::agent_binary().is_some())
    .then_some(bin)
}

/// [`binary`], or a SKIPPED line naming `build` (the command that makes it).
pub fn binary_or_skip(test: &str, build: &str) -> Option<PathBuf> {
    let bin = binary();
    if bin.is_none() {
        eprintln!("SKIPPED {test}: no ringfence binary ({build})");
    }
    bin
}

pub use ringfence_test_support::free_port;

/// A `ringfence serve` with its own data directory and an API key; SIGTERMed on drop.
pub struct Server {
    pub bin: PathBuf,
    pub child: Option<Child>,
    pub port: u16,
    pub data: tempfile::TempDir,
    pub key: String,
    /// `RINGFENCE_LOG` for the server; `None` leaves the test's environment as it is.
    pub log_level: Option<&'static str>,
    /// How long [`Server::spawn`] waits for the port to open.
    pub up_within: Duration,
    /// How [`Server::request`] talks to it.
    pub http: Http,
    /// Extra environment for the server process.
    pub env: Vec<(String, String)>,
}

impl Server {
    /// A data directory and a port, no key and no process yet.
    pub fn new(bin: PathBuf) -> Server {
        let data = tempfile::tempdir().unwrap();
        // Sandboxes mount the template from here as an unprivileged user.
        std::fs::set_permissions(data.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        Server {
            bin,
            child: None,
            port: free_port(),
            data,
            key: String::new(),
            log_level: Some("info"),
            up_within: Duration::from_secs(20),
            http: Http::default(),
            env: Vec::new(),
        }
    }

    /// `ringfence keys create --name NAME EXTRA...`; returns the key.
    pub fn new_key(&self, name: &str, extra: &[&str]) -> String {
        let out = Command::new(&self.bin)
            .args(["keys", "create", "--name", name, "--data-dir"])
            .arg(self.data.path())
            .args(extra)
            .output()
            .unwrap();
        assert!(out.status.success(), "keys create: {out:?}");
        String::from_utf8(out.stdout).unwrap().lines().last().unwrap().trim().to_string()
    }

    /// Starts `ringfence serve ARGS` (stderr appended to `serve.log`) and waits for its port.
    /// Without `--interp-env` in `args` there is no code interpreter (and no fork server).
    pub fn spawn(&mut self, args: &[&str]) {
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(self.data.path().join("serve.log"))
            .unwrap();
        let mut cmd = Command::new(&self.bin);
        cmd.arg("serve")
            .args(["--listen", &format!("127.0.0.1:{}", self.port), "--data-dir"])
            .arg(self.data.path())
            .args(args)
            .stdout(Stdio::null())
            .stderr(log);
        if !args.contains(&"--interp-env") {
            cmd.args(["--interp-env", "/nonexistent"]);
        }
        if let Some(level) = self.log_level {
            cmd.env("RINGFENCE_LOG", level);
        }
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        // Kept before the wait, so that a panic below still ends it (on drop).
        let child = self.child.insert(cmd.spawn().unwrap());
        let pid = child.id();
        let deadline = Instant::now() + self.up_within;
        // Up means this child holds the listening socket, not that the port answers: between
        // a kill9 and this spawn another test's `bind(":0")` may take the port (CI once saw
        // the probe connect to such a listener, this server fail to bind, and the next
        // request reset when that listener closed), and a connect to a port nobody holds can
        // meet itself (a loopback self-connect when the kernel picks the same source port).
        while !listens(pid, self.port) {
            let exited = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten());
            if let Some(status) = exited {
                panic!("server exited ({status}) before it listened: {}", self.log());
            }
            assert!(Instant::now() < deadline, "server did not come up: {}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL: the server gets no chance to clean up (its sandboxes keep running).
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data.path().join("serve.log")).unwrap_or_default()
    }

    pub fn request(&self, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Resp {
        self.http.try_send(self.port, method, path, headers, body).unwrap_or_else(|e| {
            let log = self.log();
            let mut from = log.len().saturating_sub(4000);
            while !log.is_char_boundary(from) {
                from += 1;
            }
            let tail = &log[from..];
            panic!("{method} {path} on port {}: {e}; the server's log ends: {tail}", self.port)
        })
    }

    /// A JSON API call with `key` (`Value::Null`: no body).
    pub fn api_as(&self, key: &str, method: &str, path: &str, body: Value) -> Resp {
        let body = if body.is_null() { Vec::new() } else { body.to_string().into_bytes() };
        self.request(
            method,
            path,
            &[("X-API-Key", key), ("Content-Type", "application/json")],
            &body,
        )
    }

    /// A JSON API call with the server's key.
    pub fn api(&self, method: &str, path: &str, body: Value) -> Resp {
        self.api_as(&self.key, method, path, body)
    }

    /// `msg` to envd's `process.Process/Start` in sandbox `id` (with its access `token` and
    /// `extra` headers), as one Connect envelope.
    pub fn process_start(
        &self,
        id: &str,
        token: &str,
        msg: &Value,
        extra: &[(&str, &str)],
    ) -> Resp {
        let mut headers = vec![
            ("Content-Type", "application/connect+json"),
            ("E2b-Sandbox-Id", id),
            ("E2b-Sandbox-Port", "49983"),
            ("X-Access-Token", token),
        ];
        headers.extend_from_slice(extra);
        self.request("POST", "/process.Process/Start", &headers, &super::jail::envelope(0, msg))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SIGTERM: an orderly shutdown kills the server's sandboxes.
            let _ = ringfence_sys::kill(c.id() as i32, libc::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(15);
            while c.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub struct Sandbox {
    pub id: String,
    pub token: String,
}

impl Sandbox {
    /// From a create (or resume, or fork) answer.
    pub fn from(v: &Value) -> Sandbox {
        Sandbox {
            id: v["sandboxID"].as_str().unwrap().to_string(),
            token: v["envdAccessToken"].as_str().unwrap().to_string(),
        }
    }
}

/// The (flags, JSON) envelopes of a streamed answer, as far as whole prefixes go.
pub fn frames(body: &[u8]) -> Vec<(u8, Value)> {
    let mut out = Vec::new();
    let mut rest = body;
    while rest.len() >= 5 {
        let n = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
        out.push((rest[0], serde_json::from_slice(&rest[5..5 + n]).unwrap()));
        rest = &rest[5 + n..];
    }
    out
}

/// A process event's base64 `data` field, decoded and as text.
pub fn b64_text(d: &str) -> String {
    String::from_utf8_lossy(&base64::engine::general_purpose::STANDARD.decode(d).unwrap())
        .into_owned()
}

#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    /// Lower-case names.
    pub headers: BTreeMap<String, String>,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.text()))
    }
}

/// How [`http`] reads answers.
#[derive(Debug, Clone, Copy)]
pub struct Http {
    pub read_timeout: Duration,
    /// A failed read ends the answer (and a chunked body ends where its chunks do) instead of
    /// failing the test: for requests the server may cut off.
    pub lenient: bool,
}

impl Default for Http {
    fn default() -> Http {
        Http { read_timeout: Duration::from_secs(60), lenient: false }
    }
}

impl Http {
    /// One HTTP/1.1 request on a fresh connection (`Connection: close`), chunked bodies
    /// decoded. `Host: 127.0.0.1` and the body's `Content-Length` unless the caller sends its
    /// own.
    pub fn send(
        self,
        port: u16,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Resp {
        self.try_send(port, method, path, headers, body)
            .unwrap_or_else(|e| panic!("{method} {path} on port {port}: {e}"))
    }

    /// [`Http::send`], with a failure to connect, send or read (when not lenient) returned.
    pub fn try_send(
        self,
        port: u16,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> std::io::Result<Resp> {
        let mut s = TcpStream::connect(("127.0.0.1", port))?;
        s.set_read_timeout(Some(self.read_timeout))?;
        let mut req = format!("{method} {path} HTTP/1.1\r\nConnection: close\r\n");
        if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
            req.push_str("Host: 127.0.0.1\r\n");
        }
        if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("content-length")) {
            req.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        s.write_all(req.as_bytes())?;
        s.write_all(body)?;
        let mut raw = Vec::new();
        let read = s.read_to_end(&mut raw);
        if !self.lenient {
            read?;
        }
        let split = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("response head");
        let head = String::from_utf8_lossy(&raw[..split]).into_owned();
        let mut lines = head.lines();
        let status = lines.next().unwrap().split_whitespace().nth(1).unwrap().parse().unwrap();
        let headers: BTreeMap<String, String> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        let mut rest = &raw[split + 4..];
        let body = if headers.get("transfer-encoding").is_some_and(|t| t == "chunked") {
            let mut out = Vec::new();
            loop {
                let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") else {
                    assert!(self.lenient, "chunked body cut short");
                    break;
                };
                let n =
                    usize::from_str_radix(std::str::from_utf8(&rest[..eol]).unwrap().trim(), 16)
                        .unwrap();
                rest = &rest[eol + 2..];
                if n == 0 {
                    break;
                }
                out.extend_from_slice(&rest[..n]);
                rest = &rest[n + 2..];
            }
            out
        } else {
            rest.to_vec()
        };
        Ok(Resp { status, headers, body })
    }
}

/// Whether process `pid` holds a socket listening on TCP port `port` (what /proc/net/tcp and
/// /proc/net/tcp6 list in state LISTEN, matched by inode against the process's descriptors).
fn listens(pid: u32, port: u16) -> bool {
    let port = format!(":{port:04X}");
    let mut inodes = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = std::fs::read_to_string(table).unwrap_or_default();
        for line in text.lines().skip(1) {
            // sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() > 9 && f[1].ends_with(&port) && f[3] == "0A" {
                inodes.push(format!("socket:[{}]", f[9]));
            }
        }
    }
    if inodes.is_empty() {
        return false;
    }
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { return false };
    fds.flatten().any(|fd| {
        std::fs::read_link(fd.path())
            .is_ok_and(|target| inodes.iter().any(|i| target.as_os_str() == i.as_str()))
    })
}

/// [`Http::send`] with the defaults: a minute to answer, every read must succeed.
pub fn http(port: u16, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Resp {
    Http::default().send(port, method, path, headers, body)
}
