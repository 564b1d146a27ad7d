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
pub mod ether;
pub mod intercept;
pub mod netns;
pub mod policy;
pub mod proxy;
pub mod sniff;
pub mod stack;
pub mod tun;

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::RecordType;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;

use crate::dns::{Pins, Upstream};
use crate::intercept::{HostRule, Interception, Redactor, SandboxCa, SecretLookup};
use crate::netns::Dialer;
use crate::policy::{Ceiling, Dest, Naming, SandboxPolicy, Verdict};
use crate::proxy::{EgressProxy, Upstream as UpStream};
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
    /// A PEM bundle trusted for upstream TLS besides the system's CAs, when the proxy
    /// terminates TLS (request rules). For tests that stand in for the internet, and for an
    /// operator's private CA.
    pub upstream_extra_ca: Option<PathBuf>,
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
    #[error(transparent)]
    Intercept(#[from] intercept::InterceptError),
    #[error(transparent)]
    Proxy(#[from] proxy::ProxyError),
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
    /// The request rule (its host key) under which the proxy terminated TLS and rewrote the
    /// request; absent for a connection relayed untouched.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    /// Names (never values) of the secrets substituted into the request.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub secrets: Vec<String>,
    /// The upstream proxy the connection went through (`scheme://host:port`, never its
    /// credentials); absent for a direct connection.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proxy: Option<String>,
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
    /// The upstream TLS client of terminated connections, made on first use (reading the
    /// system's CAs takes a while, and most servers never terminate anything).
    upstream_tls: OnceLock<Result<Arc<rustls::ClientConfig>, String>>,
    /// The CAs a proxy's TLS is verified against when it names none of its own.
    proxy_roots: OnceLock<Result<Arc<rustls::RootCertStore>, String>>,
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
        Ok(Arc::new(Egress {
            cfg,
            dialer,
            upstream,
            upstream_tls: OnceLock::new(),
            proxy_roots: OnceLock::new(),
        }))
    }

    fn upstream_tls(&self) -> Result<Arc<rustls::ClientConfig>, String> {
        self.upstream_tls
            .get_or_init(|| {
                let extra = match &self.cfg.upstream_extra_ca {
                    Some(p) => Some(std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()))?),
                    None => None,
                };
                intercept::upstream_config(extra.as_deref()).map_err(|e| e.to_string())
            })
            .clone()
    }

    fn proxy_roots(&self) -> Result<Arc<rustls::RootCertStore>, String> {
        self.proxy_roots
            .get_or_init(|| {
                let mut roots = rustls::RootCertStore::empty();
                roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
                if let Some(p) = &self.cfg.upstream_extra_ca {
                    let pem = std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()))?;
                    use rustls::pki_types::pem::PemObject;
                    let certs = rustls::pki_types::CertificateDer::pem_slice_iter(&pem);
                    roots.add_parsable_certificates(certs.filter_map(Result::ok));
                }
                Ok(Arc::new(roots))
            })
            .clone()
    }

    /// Where `proxy` may be dialed: its host resolved (by the sandboxes' upstream resolver,
    /// from the egress namespace) and each address held to the ceiling. Fails naming the
    /// proxy and why when no address is left: a proxy is never a way around the ceiling.
    pub async fn resolve_proxy(&self, proxy: &EgressProxy) -> Result<Vec<SocketAddr>, NetError> {
        let fail = |why: String| NetError::Proxy(proxy::ProxyError(format!("{proxy}: {why}")));
        let (ips, naming): (Vec<IpAddr>, Option<String>) = match proxy.literal() {
            Some(ip) => (vec![ip], None),
            None => {
                let mut q = Message::query();
                q.metadata.id = rand::random();
                q.metadata.recursion_desired = true;
                let name = hickory_proto::rr::Name::from_ascii(format!("{}.", proxy.host))
                    .map_err(|e| fail(format!("not a DNS name: {e}")))?;
                q.queries.push(hickory_proto::op::Query::query(name, RecordType::A));
                let a = self
                    .upstream
                    .ask(&q)
                    .await
                    .map_err(|e| fail(format!("the name did not resolve: {e}")))?;
                let ips: Vec<IpAddr> = a
                    .answers
                    .iter()
                    .filter_map(|r| match &r.data {
                        hickory_proto::rr::RData::A(a) => Some(IpAddr::V4(a.0)),
                        _ => None,
                    })
                    .collect();
                if ips.is_empty() {
                    return Err(fail("the name has no IPv4 address".into()));
                }
                (ips, Some(proxy.host.clone()))
            }
        };
        let mut own = self.dialer.own_addrs().await;
        own.push(IpAddr::V4(tun::GATEWAY_IP));
        // The proxy is judged as a destination of the server's: the ceiling only (the
        // sandbox's own allowOut/denyOut judge the destinations it reaches through it).
        let open = SandboxPolicy::default();
        let mut ok = Vec::new();
        let mut refused = Vec::new();
        for ip in ips {
            let naming = match &naming {
                Some(n) => Naming::Claimed { name: n.clone(), pinned: true },
                None => Naming::Unnamed,
            };
            let dest = Dest { ip, port: proxy.port, naming };
            let v = policy::decide(&self.cfg.ceiling, &own, &open, &dest);
            if v.allowed {
                ok.push(SocketAddr::new(ip, proxy.port));
            } else {
                refused.push(v.reason.trim_start_matches("denied: ").to_string());
            }
        }
        if ok.is_empty() {
            return Err(fail(format!(
                "the proxy's address is outside what this server lets sandboxes reach ({})",
                refused.join("; ")
            )));
        }
        Ok(ok)
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
        self.attach_link(fd, stack::Link::Ip, (policy, rate, sink))
    }

    /// As [`Egress::attach_device`], on a VM's NIC: one Ethernet frame per message (QEMU's
    /// `-netdev dgram` on a `SOCK_SEQPACKET` socket), the guest's NIC at [`ether::GUEST_MAC`]
    /// and [`tun::SANDBOX_IP`]. [`ether`] answers its ARP and frames the stack's packets;
    /// everything above is the jail's: the same policy, resolver, relay and audit.
    pub fn attach_nic(
        self: &Arc<Self>,
        fd: std::os::fd::OwnedFd,
        policy: SandboxPolicy,
        rate: Option<u64>,
        sink: EventSink,
    ) -> Result<SandboxNet, NetError> {
        let link = stack::Link::Ethernet { guest: tun::SANDBOX_IP };
        self.attach_link(fd, link, (policy, rate, sink))
    }

    fn attach_link(
        self: &Arc<Self>,
        fd: std::os::fd::OwnedFd,
        link: stack::Link,
        (policy, rate, sink): (SandboxPolicy, Option<u64>, EventSink),
    ) -> Result<SandboxNet, NetError> {
        let stack = Stack::on(
            stack::Budget {
                bytes: self.cfg.buffer_budget.unwrap_or(stack::DEFAULT_BUFFER_BUDGET),
                // The stack's receive and send buffers, and the relay's two copy buffers.
                buffers: 4,
                // The sniffed head of the stream, held until it is forwarded.
                overhead: sniff::MAX_SNIFF,
            },
            link,
        );
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
            interception: RwLock::new(None),
            ca: OnceLock::new(),
            proxy: RwLock::new(None),
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

/// Opens connections into a VM sandbox through its stack (inbound requests to its ports):
/// a VM has no network namespace on the host to connect from, as the jail's path does.
#[derive(Debug, Clone)]
pub struct GuestDialer(Arc<Stack>);

impl GuestDialer {
    /// A connection to `127.0.0.1:port` inside the guest, from the gateway's address: the
    /// guest's agent lets its NIC carry loopback traffic (`route_localnet`), so a service
    /// bound to loopback answers, as it does for the jail. Gives up after `within`.
    pub async fn connect(&self, port: u16, within: Duration) -> io::Result<SmolStream> {
        self.connect_to(std::net::Ipv4Addr::LOCALHOST, port, within).await
    }

    /// As [`GuestDialer::connect`], to `ip:port` inside the sandbox. gVisor's stack drops
    /// packets for a loopback address that arrive on a device (its IPv4 protocol is built
    /// without external loopback traffic, and it has no `route_localnet`), so the gvisor
    /// tier's inbound requests go to the sandbox's own address ([`tun::SANDBOX_IP`]).
    pub async fn connect_to(
        &self,
        ip: std::net::Ipv4Addr,
        port: u16,
        within: Duration,
    ) -> io::Result<SmolStream> {
        let dst = SocketAddrV4::new(ip, port);
        match tokio::time::timeout(within, self.0.connect(dst)).await {
            Ok(r) => r,
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("port {port} did not answer within {within:?}"),
            )),
        }
    }
}

impl SandboxNet {
    /// Connections into the sandbox through its stack (used for a VM's NIC).
    pub fn dialer(&self) -> GuestDialer {
        GuestDialer(self.shared.stack.clone())
    }

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

    /// Sets (or, with `None`, clears) the request rules and the secrets they may name. New
    /// connections to a host with a rule are terminated and rewritten; open ones go on as
    /// they began.
    pub fn set_interception(&self, i: Option<Interception>) {
        if let Ok(mut cur) = self.shared.interception.write() {
            *cur = i.filter(|i| !i.rules.is_empty());
        }
    }

    pub fn interception(&self) -> Option<Interception> {
        self.shared.interception()
    }

    /// Sets (or, with `None`, clears) the upstream proxy. New connections take the new path;
    /// open ones go on as they began (their destination was allowed, and the policy change
    /// that would forbid one cuts it).
    pub fn set_proxy(&self, p: Option<EgressProxy>) {
        if let Ok(mut cur) = self.shared.proxy.write() {
            *cur = p.map(Arc::new);
        }
    }

    pub fn proxy(&self) -> Option<EgressProxy> {
        self.shared.proxy().map(|p| (*p).clone())
    }

    /// This sandbox's CA certificate (PEM), made on first call: what its trust store must
    /// list for terminated connections to verify.
    pub fn ca_pem(&self, label: &str) -> Result<String, NetError> {
        Ok(self.shared.ca(label)?.pem().to_string())
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
    /// Request rules and secrets; `None`: every connection is relayed untouched.
    interception: RwLock<Option<Interception>>,
    /// The sandbox's CA (only in this process's memory), made when first needed.
    ca: OnceLock<Arc<SandboxCa>>,
    /// The upstream proxy new connections leave through; `None`: straight from this host.
    proxy: RwLock<Option<Arc<EgressProxy>>>,
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
/// How long a terminated connection's response may pause before the bytes held back for the
/// secret mask are sent (see [`intercept::Redactor`]).
const REDACT_IDLE_FLUSH: Duration = Duration::from_millis(20);

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
            rule: None,
            secrets: Vec::new(),
            proxy: None,
        }
    }

    fn interception(&self) -> Option<Interception> {
        self.interception.read().ok().and_then(|i| i.clone())
    }

    fn proxy(&self) -> Option<Arc<EgressProxy>> {
        self.proxy.read().ok().and_then(|p| p.clone())
    }

    /// Opens the upstream connection to `ip:port` (already allowed): directly, or through the
    /// sandbox's proxy, asked for the address (never the name: the proxy's resolver must not
    /// pick another destination than the one the policy judged). The proxy's address is
    /// resolved and held to the ceiling again at each dial; it failing fails the connection
    /// (no fallback to a direct one). Returns the proxy's `scheme://host:port` too.
    async fn dial(&self, ip: IpAddr, port: u16) -> io::Result<(UpStream, Option<String>)> {
        let target = SocketAddr::new(ip, port);
        let Some(p) = self.proxy() else {
            let s = self.egress.dialer.connect(target, CONNECT_TIMEOUT).await?;
            return Ok((Box::new(s), None));
        };
        let via = p.to_string();
        let work = async {
            let addrs = self.egress.resolve_proxy(&p).await.map_err(io::Error::other)?;
            let mut last = io::Error::other("no address");
            for a in addrs {
                match self.egress.dialer.connect(a, CONNECT_TIMEOUT).await {
                    Ok(conn) => {
                        return proxy::handshake(&p, conn, target, || self.egress.proxy_roots())
                            .await;
                    }
                    Err(e) => last = io::Error::new(e.kind(), format!("proxy {via} ({a}): {e}")),
                }
            }
            Err(last)
        };
        match tokio::time::timeout(CONNECT_TIMEOUT, work).await {
            Ok(Ok(s)) => Ok((s, Some(via))),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("proxy {via} did not open a tunnel in time"),
            )),
        }
    }

    fn ca(&self, label: &str) -> Result<Arc<SandboxCa>, NetError> {
        if let Some(ca) = self.ca.get() {
            return Ok(ca.clone());
        }
        let ca = Arc::new(SandboxCa::new(label)?);
        Ok(self.ca.get_or_init(|| ca).clone())
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
            // Request rules pick connections by their TLS server name.
            || self.interception().is_some()
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
        // A TLS connection to a name with a request rule, at an address our resolver gave for
        // that name, is terminated and rewritten; anything else is relayed untouched.
        let terminate = match (&sniffed, &dest.naming) {
            (Sniffed::Tls(Some(_)), Naming::Claimed { name, pinned: true }) => self
                .interception()
                .and_then(|i| i.rules.matching(name).cloned().map(|r| (name.clone(), r, i.lookup))),
            _ => None,
        };
        if let Some((name, rule, lookup)) = terminate {
            return self.terminated(s, head, dest, ev, began, (name, rule, lookup)).await;
        }
        let up = match self.dial(ip, port).await {
            Ok((u, via)) => {
                if let Some(via) = via {
                    ev.reason = format!("{} (through proxy {via})", v.reason);
                    ev.proxy = Some(via);
                }
                u
            }
            Err(e) => {
                ev.outcome = Some("failed");
                ev.reason = format!("{} (connecting failed: {e})", v.reason);
                ev.duration_ms = Some(began.elapsed().as_millis() as u64);
                self.record(ev);
                return; // dropping the stream resets the sandbox's connection
            }
        };
        let (guard, mut cut_rx, bytes_out, bytes_in) = self.open(dest, ev.ts_ms);
        let relay = relay(s, up, head, &self.limiter, &bytes_out, &bytes_in);
        let outcome = tokio::select! {
            r = relay => if r.is_ok() { "closed" } else { "aborted" },
            _ = cut_rx.wait_for(|c| c.is_some()) => "cut",
        };
        drop(guard);
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

impl Shared {
    /// Registers an open connection; the guard removes it.
    fn open(
        &self,
        dest: Dest,
        since_ms: i64,
    ) -> (ConnGuard<'_>, watch::Receiver<Option<String>>, Arc<AtomicU64>, Arc<AtomicU64>) {
        let id = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let (cut_tx, cut_rx) = watch::channel(None::<String>);
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
                    since_ms,
                },
            );
        }
        (ConnGuard { shared: self, id }, cut_rx, bytes_out, bytes_in)
    }

    /// A connection under a request rule: TLS terminated with the sandbox's CA, one request
    /// read and rewritten (see [`intercept`]), sent on over verified TLS to the pinned
    /// address, the response masked on its way back.
    async fn terminated(
        &self,
        s: SmolStream,
        head: Vec<u8>,
        dest: Dest,
        mut ev: EgressEvent,
        began: Instant,
        (name, rule, lookup): (String, HostRule, SecretLookup),
    ) {
        let (ip, port) = (dest.ip, dest.port);
        ev.rule = Some(rule.host.clone());
        let allowed = ev.reason.clone();
        let (guard, mut cut_rx, bytes_out, bytes_in) = self.open(dest, ev.ts_ms);
        let mut report = intercept::Report::default();
        let work = self.rewrite(
            s,
            head,
            (ip, port),
            (&name, &rule, &lookup),
            (&bytes_out, &bytes_in),
            &mut report,
        );
        let outcome = tokio::select! {
            r = work => match r {
                Ok(()) => "closed",
                Err(e) => {
                    report.refused.get_or_insert_with(|| e.to_string());
                    "aborted"
                }
            },
            _ = cut_rx.wait_for(|c| c.is_some()) => "cut",
        };
        drop(guard);
        let mut reason = format!(
            "{allowed}; TLS terminated under the rule for {}, {} request(s)",
            rule.host, report.requests
        );
        if !report.set.is_empty() {
            reason.push_str(&format!(", set {}", report.set.join(", ")));
        }
        if !report.secrets.is_empty() {
            reason.push_str(&format!("; secrets substituted: {}", report.secrets.join(", ")));
        }
        if let Some(via) = &report.proxy {
            reason.push_str(&format!(" (through proxy {via})"));
        }
        if report.masked > 0 {
            reason.push_str(&format!(
                "; {} echo(es) of a secret masked in the response",
                report.masked
            ));
        }
        if let Some(why) = &report.refused {
            ev.allowed = false;
            reason = format!("denied: {why} (rule for {})", rule.host);
        }
        if outcome == "cut" {
            let why = cut_rx.borrow().clone().unwrap_or_default();
            ev.allowed = false;
            reason = format!("{why}; was {}", reason.trim_start_matches("allowed: "));
        }
        ev.reason = reason;
        ev.secrets = report.secrets;
        ev.proxy = report.proxy;
        ev.outcome = Some(outcome);
        ev.bytes_out = bytes_out.load(Ordering::Relaxed);
        ev.bytes_in = bytes_in.load(Ordering::Relaxed);
        ev.duration_ms = Some(began.elapsed().as_millis() as u64);
        self.record(ev);
    }

    async fn rewrite(
        &self,
        s: SmolStream,
        head: Vec<u8>,
        (ip, port): (IpAddr, u16),
        (name, rule, lookup): (&str, &HostRule, &SecretLookup),
        (out, inb): (&AtomicU64, &AtomicU64),
        report: &mut intercept::Report,
    ) -> io::Result<()> {
        let size = s.buffer_size().min(COPY_BUF);
        let ca = self.ca("a sandbox").map_err(io::Error::other)?;
        let cfg = ca.server_config(name).map_err(io::Error::other)?;
        let accept = intercept::TlsAcceptor::from(cfg).accept(intercept::Rewind::new(head, s));
        let client = tokio::time::timeout(CONNECT_TIMEOUT, accept)
            .await
            .map_err(|_| io::Error::other("the sandbox's TLS handshake timed out"))?
            .map_err(|e| io::Error::other(format!("the sandbox's TLS handshake: {e}")))?;
        let (mut cr, mut cw) = tokio::io::split(client);
        let mut inp = intercept::Input::new(&mut cr);
        let req = match intercept::rewrite_request(&mut inp, name, rule, lookup).await {
            Ok(r) => r,
            Err((status, why)) => {
                intercept::answer(&mut cw, status, &why).await;
                report.refused = Some(why);
                return Ok(());
            }
        };
        report.set = req.set.clone();
        let upstream = async {
            let tls = self.egress.upstream_tls().map_err(io::Error::other)?;
            let (tcp, via) = self.dial(ip, port).await?;
            report.proxy = via;
            let sn = intercept::server_name(name).map_err(io::Error::other)?;
            tokio::time::timeout(
                CONNECT_TIMEOUT,
                intercept::TlsConnector::from(tls).connect(sn, tcp),
            )
            .await
            .map_err(|_| io::Error::other("upstream TLS handshake timed out"))?
        };
        let up = match upstream.await {
            Ok(u) => u,
            Err(e) => {
                let why = format!("upstream {name} ({ip}:{port}): {e}");
                intercept::answer(&mut cw, "502 Bad Gateway", &why).await;
                report.refused = Some(why);
                return Ok(());
            }
        };
        // Every value a request on this connection may carry (the rule's secrets): masked in
        // whatever comes back, whichever request it answers.
        let values: Vec<Vec<u8>> =
            rule.secrets().iter().filter_map(|n| lookup(n)).map(String::into_bytes).collect();
        let (mut ur, mut uw) = tokio::io::split(up);
        let masked = AtomicU64::new(0);
        let requests = AtomicU64::new(0);
        let used: Mutex<Vec<String>> = Mutex::new(Vec::new());
        // Requests, one after another: each head checked and rewritten, its body passed as
        // framed. Ends at the client's close, after a request that asked to close, or at a
        // request refused (returned, answered once the earlier answers are through).
        let outbound = async {
            let mut req = req;
            loop {
                requests.fetch_add(1, Ordering::Relaxed);
                if let Ok(mut u) = used.lock() {
                    u.extend(req.secrets.iter().cloned());
                }
                intercept::put(&mut uw, &req.head, &self.limiter, out).await?;
                inp.body(req.body, &mut uw, &self.limiter, out).await?;
                uw.flush().await?;
                if req.last || !inp.more().await? {
                    uw.shutdown().await?;
                    return Ok(None);
                }
                req = match intercept::rewrite_request(&mut inp, name, rule, lookup).await {
                    Ok(r) => r,
                    Err(refusal) => {
                        uw.shutdown().await?;
                        return Ok(Some(refusal));
                    }
                };
            }
        };
        let inbound = async {
            let mut redactor = Redactor::new(values);
            let mut buf = vec![0u8; size];
            loop {
                // Bytes held back to catch a split value go out once the server pauses: a
                // kept-alive answer must not wait for the next one to be complete.
                let read = ur.read(&mut buf);
                let n = if redactor.holding() {
                    match tokio::time::timeout(REDACT_IDLE_FLUSH, read).await {
                        Ok(r) => r,
                        Err(_) => {
                            let held = redactor.finish();
                            masked.store(redactor.masked, Ordering::Relaxed);
                            cw.write_all(&held).await?;
                            cw.flush().await?;
                            inb.fetch_add(held.len() as u64, Ordering::Relaxed);
                            continue;
                        }
                    }
                } else {
                    read.await
                };
                let n = match n {
                    Ok(n) => n,
                    // A server that closes without TLS's close_notify (common after
                    // `Connection: close`) has still sent its whole answer.
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => 0,
                    Err(e) => return Err(e),
                };
                let chunk = if n == 0 { redactor.finish() } else { redactor.feed(&buf[..n]) };
                masked.store(redactor.masked, Ordering::Relaxed);
                cw.write_all(&chunk).await?;
                cw.flush().await?;
                inb.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                if n == 0 {
                    return Ok::<(), io::Error>(());
                }
            }
        };
        let (refusal, r) = {
            tokio::pin!(outbound);
            tokio::pin!(inbound);
            // The upstream closing ends the exchange; the client closing (or a refusal) lets
            // the answers already asked for finish first.
            tokio::select! {
                r = &mut inbound => (None, r),
                o = &mut outbound => match o {
                    Ok(refusal) => (refusal, inbound.await),
                    Err(e) => (None, Err(e)),
                },
            }
        };
        match refusal {
            Some((status, why)) => {
                intercept::answer(&mut cw, status, &why).await;
                report.refused = Some(why);
            }
            None => {
                let _ = cw.shutdown().await;
            }
        }
        let mut used = used.into_inner().unwrap_or_default();
        used.sort();
        used.dedup();
        report.secrets = used;
        report.requests = requests.load(Ordering::Relaxed);
        report.masked = masked.load(Ordering::Relaxed);
        r
    }
}

struct ConnGuard<'a> {
    shared: &'a Shared,
    id: u64,
}

impl Drop for ConnGuard<'_> {
    fn drop(&mut self) {
        if let Ok(mut c) = self.shared.conns.lock() {
            c.remove(&self.id);
        }
    }
}

/// Relays both directions until both have ended; the sandbox's side is limited in rate.
async fn relay(
    s: SmolStream,
    up: UpStream,
    head: Vec<u8>,
    limiter: &Limiter,
    out: &AtomicU64,
    inb: &AtomicU64,
) -> io::Result<()> {
    // Copy buffers no bigger than the connection's own: they count against the same budget.
    let size = s.buffer_size().min(COPY_BUF);
    let (mut sr, mut sw) = tokio::io::split(s);
    let (mut ur, mut uw) = tokio::io::split(up);
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
