//! Sandbox networking, host side.
//!
//! Each sandbox's network namespace gets one interface besides loopback: a TUN device
//! ([`tun`]) whose other end is held here. A userspace TCP/IP stack ([`stack`]) terminates
//! every connection the sandbox makes, whatever its destination; each connection is judged by
//! the egress [`policy`] (using the name the client presented, checked against what our own
//! resolver, [`dns`], told the sandbox) and, if allowed, relayed through an ordinary socket
//! opened by the server ([`netns::Dialer`]), at most at the sandbox's egress rate. Every
//! decision becomes an [`EgressEvent`].
//!
//! Nothing here changes the host's network configuration: no interfaces, routes or firewall
//! rules are added to the host's namespace, so a crash leaves nothing behind (the TUN device
//! dies with its descriptor).

#![forbid(unsafe_code)]

pub mod dns;
pub mod netns;
pub mod policy;
pub mod sniff;
pub mod stack;
pub mod tun;

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::RecordType;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;

use crate::dns::{Pins, Upstream};
use crate::netns::Dialer;
use crate::policy::{Ceiling, Dest, Naming, SandboxPolicy, Verdict};
use crate::sniff::Sniffed;
use crate::stack::{Handler, SmolStream, Stack};

/// The operator's network settings (`ringfence serve` flags).
#[derive(Debug, Clone, Default)]
pub struct NetConfig {
    pub ceiling: Ceiling,
    /// Where the sandboxes' resolver forwards queries.
    pub dns_upstreams: Vec<SocketAddr>,
    /// Open upstream connections from this network namespace instead of the server's.
    pub egress_netns: Option<PathBuf>,
    /// Default, and most, egress bytes per second of one sandbox; `None`: unlimited.
    pub egress_rate: Option<u64>,
    /// Most host memory one sandbox's TCP connections may hold in this process (buffers of
    /// the userspace stack and of the relay, which no cgroup of the sandbox's is charged
    /// for); `None`: [`stack::DEFAULT_BUFFER_BUDGET`].
    pub buffer_budget: Option<usize>,
}

/// Errors setting up sandbox networking.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("egress namespace {path}: {source}")]
    EgressNetns {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("sandbox network device: {0}")]
    Device(#[source] io::Error),
    #[error("egress rate {asked} B/s exceeds this server's maximum of {max} B/s")]
    RateAboveCeiling { asked: u64, max: u64 },
}

/// One egress decision, for the audit trail.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EgressEvent {
    /// Unix milliseconds of the decision.
    pub ts_ms: i64,
    /// `tcp`, `dns` or `udp`.
    pub protocol: &'static str,
    pub allowed: bool,
    /// A sentence: "denied: example.com (93.184.216.34:443) is not in allowOut ...".
    pub reason: String,
    /// The destination's name, when one is known (SNI, Host, the looked-up name).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub address: String,
    pub port: u16,
    /// Bytes the sandbox sent (after the rate limit) and received.
    pub bytes_out: u64,
    pub bytes_in: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    /// How an allowed connection ended: `closed`, `cut` (a policy change forbade it, reason
    /// says why), `failed` (upstream unreachable), `aborted`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outcome: Option<&'static str>,
    /// Decisions not recorded before this one because the sandbox made too many too fast.
    #[serde(skip_serializing_if = "is_zero")]
    pub suppressed: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// Where a sandbox's events go.
pub type EventSink = Arc<dyn Fn(EgressEvent) + Send + Sync>;

pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// Server-wide networking: the ceiling, the dialer and the DNS upstream.
#[derive(Debug)]
pub struct Egress {
    cfg: NetConfig,
    dialer: Arc<Dialer>,
    upstream: Upstream,
}

impl Egress {
    pub fn new(cfg: NetConfig) -> Result<Arc<Egress>, NetError> {
        let dialer = match &cfg.egress_netns {
            Some(p) => Dialer::in_netns(p).map_err(|source| NetError::EgressNetns {
                path: p.display().to_string(),
                source,
            })?,
            None => Dialer::here(),
        };
        let dialer = Arc::new(dialer);
        let upstream = Upstream::new(cfg.dns_upstreams.clone(), dialer.clone());
        Ok(Arc::new(Egress { cfg, dialer, upstream }))
    }

    pub fn config(&self) -> &NetConfig {
        &self.cfg
    }

    /// Checks a sandbox's requested rate against the ceiling; `None` asks for the default.
    pub fn rate_for(&self, asked: Option<u64>) -> Result<Option<u64>, NetError> {
        match (asked, self.cfg.egress_rate) {
            (Some(a), Some(max)) if a > max || a == 0 => {
                Err(NetError::RateAboveCeiling { asked: a, max })
            }
            (Some(0), None) => Ok(None),
            (Some(a), _) => Ok(Some(a)),
            (None, d) => Ok(d),
        }
    }

    /// Gives the sandbox whose network namespace is `netns` its interface, and starts serving
    /// it (on the current tokio runtime). Dropping the result tears it down.
    pub fn attach(
        self: &Arc<Self>,
        netns: &Path,
        policy: SandboxPolicy,
        rate: Option<u64>,
        sink: EventSink,
    ) -> Result<SandboxNet, NetError> {
        let fd = tun::create(netns).map_err(NetError::Device)?;
        self.attach_device(fd, policy, rate, sink)
    }

    /// As [`Egress::attach`], on a device the caller made: one IPv4 packet per read and
    /// write, as a TUN gives them. A tier whose sandbox makes its own TUN (gVisor's agent)
    /// relays it here over a `SOCK_SEQPACKET` socket, which keeps those boundaries; the
    /// device closing (end of file) ends the stack. Non-blocking, as the stack polls it.
    pub fn attach_device(
        self: &Arc<Self>,
        fd: std::os::fd::OwnedFd,
        policy: SandboxPolicy,
        rate: Option<u64>,
        sink: EventSink,
    ) -> Result<SandboxNet, NetError> {
        let stack = Stack::new(stack::Budget {
            bytes: self.cfg.buffer_budget.unwrap_or(stack::DEFAULT_BUFFER_BUDGET),
            // The stack's receive and send buffers, and the relay's two copy buffers.
            buffers: 4,
            // The sniffed head of the stream, held until it is forwarded.
            overhead: sniff::MAX_SNIFF,
        });
        let shared = Arc::new(Shared {
            egress: self.clone(),
            stack: stack.clone(),
            policy: RwLock::new(policy),
            pins: Mutex::default(),
            conns: Mutex::default(),
            next_conn: AtomicU64::new(1),
            limiter: Limiter::new(rate),
            sink,
            budget: Mutex::new(EventBudget::new()),
            udp_seen: Mutex::default(),
            exhausted_at: Mutex::default(),
        });
        let handler: Arc<dyn Handler> = shared.clone();
        tokio::spawn(async move {
            if let Err(e) = stack.run(fd, handler).await {
                tracing::warn!(error = %e, "sandbox network stack ended");
            }
        });
        Ok(SandboxNet { shared })
    }
}

/// A sandbox's network. Dropping it resets every connection and removes the interface.
#[derive(Debug)]
pub struct SandboxNet {
    shared: Arc<Shared>,
}

/// A connection in flight, as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct OpenConn {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub address: String,
    pub port: u16,
    pub bytes_out: u64,
    pub bytes_in: u64,
    pub since_ms: i64,
}

impl SandboxNet {
    pub fn policy(&self) -> SandboxPolicy {
        self.shared.policy()
    }

    pub fn rate(&self) -> Option<u64> {
        self.shared.limiter.rate()
    }

    /// Replaces the policy; open connections the new one forbids are cut (reset). Returns
    /// how many were.
    pub fn set_policy(&self, policy: SandboxPolicy) -> usize {
        if let Ok(mut p) = self.shared.policy.write() {
            *p = policy.clone();
        }
        let own = self.shared.own_cached();
        let Ok(conns) = self.shared.conns.lock() else { return 0 };
        let mut cut = 0;
        for c in conns.values() {
            let v = policy::decide(&self.shared.egress.cfg.ceiling, &own, &policy, &c.dest);
            if !v.allowed {
                let _ = c.cut.send(Some(format!("{} (policy changed)", v.reason)));
                cut += 1;
            }
        }
        cut
    }

    pub fn set_rate(&self, rate: Option<u64>) {
        self.shared.limiter.set(rate);
    }

    /// Bytes of the sandbox's connection-buffer budget its open connections hold.
    pub fn buffered_bytes(&self) -> usize {
        self.shared.stack.buffered_bytes()
    }

    pub fn connections(&self) -> Vec<OpenConn> {
        let Ok(conns) = self.shared.conns.lock() else { return Vec::new() };
        conns
            .values()
            .map(|c| OpenConn {
                name: c.dest.name().map(str::to_string),
                address: c.dest.ip.to_string(),
                port: c.dest.port,
                bytes_out: c.bytes_out.load(Ordering::Relaxed),
                bytes_in: c.bytes_in.load(Ordering::Relaxed),
                since_ms: c.since_ms,
            })
            .collect()
    }
}

impl Drop for SandboxNet {
    fn drop(&mut self) {
        if let Ok(conns) = self.shared.conns.lock() {
            for c in conns.values() {
                let _ = c.cut.send(Some("sandbox ended".into()));
            }
        }
        self.shared.stack.close();
    }
}

struct Conn {
    dest: Dest,
    cut: watch::Sender<Option<String>>,
    bytes_out: Arc<AtomicU64>,
    bytes_in: Arc<AtomicU64>,
    since_ms: i64,
}

/// Decisions a sandbox may record per second, and in a burst: a sandbox opening connections
/// in a tight loop must not flood the audit trail. What is over is counted, not lost.
const EVENTS_PER_SEC: f64 = 100.0;
const EVENTS_BURST: f64 = 1000.0;

#[derive(Debug)]
struct EventBudget {
    tokens: f64,
    at: Instant,
    suppressed: u64,
}

impl EventBudget {
    fn new() -> EventBudget {
        EventBudget { tokens: EVENTS_BURST, at: Instant::now(), suppressed: 0 }
    }
}

struct Shared {
    egress: Arc<Egress>,
    stack: Arc<Stack>,
    policy: RwLock<SandboxPolicy>,
    pins: Mutex<Pins>,
    conns: Mutex<HashMap<u64, Conn>>,
    next_conn: AtomicU64,
    limiter: Limiter,
    sink: EventSink,
    budget: Mutex<EventBudget>,
    /// Dropped UDP destinations recently recorded (one record per destination per minute).
    udp_seen: Mutex<HashMap<SocketAddrV4, Instant>>,
    /// When a connection was last refused for want of buffer memory (recorded at most once a
    /// second).
    exhausted_at: Mutex<Option<Instant>>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SandboxNet").finish_non_exhaustive()
    }
}

/// How long we wait for a client's first bytes when its name decides.
const SNIFF_WAIT: Duration = Duration::from_secs(1);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const COPY_BUF: usize = 64 * 1024;

impl Shared {
    fn policy(&self) -> SandboxPolicy {
        self.policy.read().map(|p| p.clone()).unwrap_or_else(|_| SandboxPolicy {
            allow_internet_access: false,
            ..SandboxPolicy::default()
        })
    }

    fn ceiling(&self) -> &Ceiling {
        &self.egress.cfg.ceiling
    }

    /// The host's addresses (last read) and the sandbox's gateway.
    fn own_cached(&self) -> Vec<IpAddr> {
        let mut own = self.egress.dialer.own_addrs_cached();
        own.push(IpAddr::V4(tun::GATEWAY_IP));
        own
    }

    async fn own(&self) -> Vec<IpAddr> {
        let mut own = self.egress.dialer.own_addrs().await;
        own.push(IpAddr::V4(tun::GATEWAY_IP));
        own
    }

    fn record(&self, mut ev: EgressEvent) {
        if let Ok(mut b) = self.budget.lock() {
            let now = Instant::now();
            b.tokens = (b.tokens + now.duration_since(b.at).as_secs_f64() * EVENTS_PER_SEC)
                .min(EVENTS_BURST);
            b.at = now;
            if b.tokens < 1.0 {
                b.suppressed += 1;
                return;
            }
            b.tokens -= 1.0;
            ev.suppressed = std::mem::take(&mut b.suppressed);
        }
        (self.sink)(ev);
    }

    fn event(
        &self,
        protocol: &'static str,
        v: &Verdict,
        name: Option<&str>,
        ip: IpAddr,
        port: u16,
    ) -> EgressEvent {
        EgressEvent {
            ts_ms: now_ms(),
            protocol,
            allowed: v.allowed,
            reason: v.reason.clone(),
            name: name.map(str::to_string),
            address: ip.to_string(),
            port,
            bytes_out: 0,
            bytes_in: 0,
            duration_ms: None,
            outcome: None,
            suppressed: 0,
        }
    }

    /// Does any rule name a domain? Then a connection's name can change its fate, and we wait
    /// for the client's first bytes before deciding.
    fn names_matter(&self, p: &SandboxPolicy) -> bool {
        let c = self.ceiling();
        c.deny
            .iter()
            .chain(c.allow.iter().flatten())
            .chain(&p.allow_out)
            .chain(&p.deny_out)
            .any(|r| r.is_domain())
    }

    /// Answers one DNS query (wire format); `None` drops it.
    async fn resolve(&self, query: &[u8]) -> Option<Vec<u8>> {
        let q = Message::from_vec(query).ok()?;
        if q.metadata.message_type != MessageType::Query {
            return None;
        }
        let Some(question) = q.queries.first() else {
            return dns::reply(&q, ResponseCode::FormErr).to_vec().ok();
        };
        let qtype = question.query_type();
        let raw = question.name().to_ascii();
        let Some(name) = policy::normalize_name(&raw) else {
            return dns::reply(&q, ResponseCode::Refused).to_vec().ok();
        };
        let gw = IpAddr::V4(tun::GATEWAY_IP);
        let policy = self.policy();
        let v = policy::decide_lookup(self.ceiling(), &policy, &name);
        if !v.allowed {
            self.record(self.event("dns", &v, Some(&name), gw, 53));
            return dns::reply(&q, ResponseCode::Refused).to_vec().ok();
        }
        // IPv4 only inside: an empty AAAA answer sends clients straight to the A records.
        if qtype == RecordType::AAAA {
            return dns::reply(&q, ResponseCode::NoError).to_vec().ok();
        }
        let mut fwd = Message::query();
        fwd.metadata.id = rand::random();
        fwd.metadata.recursion_desired = true;
        fwd.queries = q.queries.clone();
        let mut answer = match self.egress.upstream.ask(&fwd).await {
            Ok(a) => a,
            Err(e) => {
                let v = Verdict {
                    allowed: true,
                    reason: format!("{} (upstream failed: {e})", v.reason),
                };
                self.record(self.event("dns", &v, Some(&name), gw, 53));
                return dns::reply(&q, ResponseCode::ServFail).to_vec().ok();
            }
        };
        let own = self.own().await;
        let ceiling = self.ceiling();
        let f = dns::filter_answer(&mut answer, |ip| ceiling.blocked(ip, &own));
        if let Ok(mut pins) = self.pins.lock() {
            for (owner, ip) in &f.kept {
                pins.add(owner, *ip);
                pins.add(&name, *ip);
            }
        }
        let mut reason = v.reason.clone();
        if !f.kept.is_empty() {
            let ips: Vec<String> = f.kept.iter().map(|(_, ip)| ip.to_string()).collect();
            reason.push_str(&format!(" -> {}", ips.join(", ")));
        }
        for (ip, why) in &f.removed {
            // Each removed address is its own denial: that is the rebinding attempt.
            let d = Verdict {
                allowed: false,
                reason: format!(
                    "denied: the answer for {name} pointed at {ip}: {why}; removed from the answer"
                ),
            };
            self.record(self.event("dns", &d, Some(&name), *ip, 53));
        }
        if qtype == RecordType::A || !f.kept.is_empty() {
            self.record(self.event("dns", &Verdict { allowed: true, reason }, Some(&name), gw, 53));
        }
        answer.metadata.id = q.metadata.id;
        answer.metadata.recursion_desired = q.metadata.recursion_desired;
        answer.to_vec().ok()
    }

    /// DNS over TCP (to any address, port 53): length-prefixed queries, answered in order.
    async fn serve_dns_tcp(&self, mut s: SmolStream) {
        loop {
            let Ok(Ok(n)) = tokio::time::timeout(Duration::from_secs(10), s.read_u16()).await
            else {
                break;
            };
            let mut q = vec![0u8; usize::from(n)];
            if s.read_exact(&mut q).await.is_err() {
                break;
            }
            let Some(a) = self.resolve(&q).await else { break };
            let Ok(len) = u16::try_from(a.len()) else { break };
            if s.write_all(&len.to_be_bytes()).await.is_err() || s.write_all(&a).await.is_err() {
                break;
            }
        }
        let _ = s.shutdown().await;
    }

    async fn handle(self: Arc<Self>, mut s: SmolStream, dst: SocketAddrV4) {
        if dst.port() == 53 {
            return self.serve_dns_tcp(s).await;
        }
        let began = Instant::now();
        let ip = IpAddr::V4(*dst.ip());
        let port = dst.port();
        let policy = self.policy();
        let mut head = vec![0u8; sniff::MAX_SNIFF];
        let mut have = 0;
        let wait = if self.names_matter(&policy) { SNIFF_WAIT } else { Duration::ZERO };
        let deadline = tokio::time::Instant::now() + wait;
        let mut sniffed = Sniffed::Incomplete;
        loop {
            // With no wait, one poll: whatever the client already sent names the log entry.
            match tokio::time::timeout_at(deadline, s.read(&mut head[have..])).await {
                Ok(Ok(0)) | Ok(Err(_)) => break,
                Ok(Ok(n)) => {
                    have += n;
                    sniffed = sniff::sniff(&head[..have]);
                    if sniffed != Sniffed::Incomplete || have == head.len() {
                        break;
                    }
                }
                Err(_) => break,
            }
        }
        head.truncate(have);
        let claimed = match &sniffed {
            Sniffed::Tls(n) | Sniffed::Http(n) => {
                Some(n.as_deref().and_then(policy::normalize_name))
            }
            _ => None,
        };
        let naming = match claimed {
            // An IP literal (Host: 203.0.113.7) names no host: a direct-IP connection.
            Some(Some(n)) if n.parse::<IpAddr>().is_ok() => Naming::Unnamed,
            Some(Some(n)) => {
                let pinned = self.pins.lock().is_ok_and(|p| p.has(&n, ip));
                Naming::Claimed { name: n, pinned }
            }
            Some(None) => Naming::Unnamed,
            None => Naming::Resolved(self.pins.lock().map(|p| p.names(ip)).unwrap_or_default()),
        };
        let dest = Dest { ip, port, naming };
        let own = self.own().await;
        let v = policy::decide(self.ceiling(), &own, &policy, &dest);
        let name = dest.name().map(str::to_string);
        let mut ev = self.event("tcp", &v, name.as_deref(), ip, port);
        if !v.allowed {
            if matches!(sniffed, Sniffed::Http(_)) {
                // An HTTP client gets the reason in words; anything else a reset.
                let body = format!("{}\n", v.reason);
                let resp = format!(
                    "HTTP/1.1 403 Forbidden\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\nx-ringfence-egress: denied\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
                let _ = s.shutdown().await;
            }
            self.record(ev);
            return;
        }
        let up = match self.egress.dialer.connect(SocketAddr::new(ip, port), CONNECT_TIMEOUT).await
        {
            Ok(u) => u,
            Err(e) => {
                ev.outcome = Some("failed");
                ev.reason = format!("{} (connecting failed: {e})", v.reason);
                ev.duration_ms = Some(began.elapsed().as_millis() as u64);
                self.record(ev);
                return; // dropping the stream resets the sandbox's connection
            }
        };
        let id = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let (cut_tx, mut cut_rx) = watch::channel(None::<String>);
        let bytes_out = Arc::new(AtomicU64::new(0));
        let bytes_in = Arc::new(AtomicU64::new(0));
        if let Ok(mut c) = self.conns.lock() {
            c.insert(
                id,
                Conn {
                    dest,
                    cut: cut_tx,
                    bytes_out: bytes_out.clone(),
                    bytes_in: bytes_in.clone(),
                    since_ms: ev.ts_ms,
                },
            );
        }
        let relay = relay(s, up, head, &self.limiter, &bytes_out, &bytes_in);
        let outcome = tokio::select! {
            r = relay => if r.is_ok() { "closed" } else { "aborted" },
            _ = cut_rx.wait_for(|c| c.is_some()) => "cut",
        };
        if let Ok(mut c) = self.conns.lock() {
            c.remove(&id);
        }
        if outcome == "cut" {
            let why = cut_rx.borrow().clone().unwrap_or_default();
            ev.allowed = false;
            ev.reason = format!("{why}; was {}", v.reason.trim_start_matches("allowed: "));
        }
        ev.outcome = Some(outcome);
        ev.bytes_out = bytes_out.load(Ordering::Relaxed);
        ev.bytes_in = bytes_in.load(Ordering::Relaxed);
        ev.duration_ms = Some(began.elapsed().as_millis() as u64);
        self.record(ev);
    }
}

/// Relays both directions until both have ended; the sandbox's side is limited in rate.
async fn relay(
    s: SmolStream,
    up: tokio::net::TcpStream,
    head: Vec<u8>,
    limiter: &Limiter,
    out: &AtomicU64,
    inb: &AtomicU64,
) -> io::Result<()> {
    // Copy buffers no bigger than the connection's own: they count against the same budget.
    let size = s.buffer_size().min(COPY_BUF);
    let (mut sr, mut sw) = tokio::io::split(s);
    let (mut ur, mut uw) = up.into_split();
    let outbound = async move {
        limiter.take(head.len()).await;
        uw.write_all(&head).await?;
        out.fetch_add(head.len() as u64, Ordering::Relaxed);
        drop(head);
        pump(&mut sr, &mut uw, Some(limiter), out, size).await
    };
    let inbound = pump(&mut ur, &mut sw, None, inb, size);
    tokio::try_join!(outbound, inbound).map(drop)
}

/// Copies `r` to `w` until end of stream, then shuts `w` down (a half-close).
async fn pump<R, W>(
    r: &mut R,
    w: &mut W,
    limiter: Option<&Limiter>,
    count: &AtomicU64,
    size: usize,
) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; size];
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            return w.shutdown().await;
        }
        if let Some(l) = limiter {
            l.take(n).await;
        }
        w.write_all(&buf[..n]).await?;
        count.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// A token bucket over bytes, shared by every connection of one sandbox.
#[derive(Debug)]
struct Limiter {
    state: Mutex<(Option<u64>, f64, Instant)>,
}

impl Limiter {
    fn new(rate: Option<u64>) -> Limiter {
        Limiter { state: Mutex::new((rate, 0.0, Instant::now())) }
    }

    fn rate(&self) -> Option<u64> {
        self.state.lock().ok().and_then(|s| s.0)
    }

    fn set(&self, rate: Option<u64>) {
        if let Ok(mut s) = self.state.lock() {
            *s = (rate, 0.0, Instant::now());
        }
    }

    /// Waits until `n` bytes may pass. The bucket holds at most a tenth of a second's worth,
    /// so a sandbox idle for a while cannot burst far above its rate.
    async fn take(&self, n: usize) {
        let wait = {
            let Ok(mut s) = self.state.lock() else { return };
            let Some(rate) = s.0 else { return };
            let rate = rate as f64;
            let now = Instant::now();
            let tokens = (s.1 + now.duration_since(s.2).as_secs_f64() * rate).min(rate / 10.0);
            let left = tokens - n as f64;
            *s = (s.0, left, now);
            // In debt: wait until the debt is paid back.
            (left < 0.0).then(|| Duration::from_secs_f64(-left / rate))
        };
        if let Some(w) = wait {
            tokio::time::sleep(w).await;
        }
    }
}

impl Handler for Shared {
    fn refuse_early(&self, dst: SocketAddrV4) -> Option<String> {
        let ip = IpAddr::V4(*dst.ip());
        let own = self.own_cached();
        let v = policy::refuse_early(self.ceiling(), &own, &self.policy(), ip, dst.port())?;
        let reason = v.reason.clone();
        let name = self.pins.lock().ok().and_then(|p| p.names(ip).into_iter().next());
        self.record(self.event("tcp", &v, name.as_deref(), ip, dst.port()));
        Some(reason)
    }

    fn connection(self: Arc<Self>, stream: SmolStream, dst: SocketAddrV4) {
        tokio::spawn(self.handle(stream, dst));
    }

    fn dns_query(
        self: Arc<Self>,
        stack: Arc<Stack>,
        query: Vec<u8>,
        src: SocketAddrV4,
        dst: SocketAddrV4,
    ) {
        tokio::spawn(async move {
            if let Some(a) = self.resolve(&query).await {
                stack.send_udp(&a, src, dst);
            }
        });
    }

    fn buffers_exhausted(&self, dst: SocketAddrV4, open: usize) {
        // One record a second at most: a sandbox hammering its limit must not flood the trail.
        let fresh = self.exhausted_at.lock().is_ok_and(|mut at| {
            let fresh = at.is_none_or(|t| t.elapsed() >= Duration::from_secs(1));
            if fresh {
                *at = Some(Instant::now());
            }
            fresh
        });
        if fresh {
            let v = Verdict {
                allowed: false,
                reason: format!(
                    "refused: the sandbox's {open} open connections hold all the buffer memory \
                     they may; close some"
                ),
            };
            let name = self
                .pins
                .lock()
                .ok()
                .and_then(|p| p.names(IpAddr::V4(*dst.ip())).into_iter().next());
            self.record(self.event("tcp", &v, name.as_deref(), IpAddr::V4(*dst.ip()), dst.port()));
        }
    }

    fn udp_dropped(&self, dst: SocketAddrV4) {
        let fresh = self.udp_seen.lock().is_ok_and(|mut seen| {
            seen.retain(|_, at| at.elapsed() < Duration::from_secs(60));
            seen.insert(dst, Instant::now()).is_none()
        });
        if fresh {
            let v = Verdict {
                allowed: false,
                reason: format!("denied: UDP to {dst}: only TCP and DNS leave a sandbox"),
            };
            let name = self
                .pins
                .lock()
                .ok()
                .and_then(|p| p.names(IpAddr::V4(*dst.ip())).into_iter().next());
            self.record(self.event("udp", &v, name.as_deref(), IpAddr::V4(*dst.ip()), dst.port()));
        }
    }
}
