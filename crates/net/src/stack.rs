//! A userspace TCP/IP stack (smoltcp) on the host end of a sandbox's TUN device.
//!
//! Every packet the sandbox sends to any address arrives here. The stack accepts TCP
//! connections to *any* destination ("AnyIP"): on each new SYN it first asks the [`Handler`]
//! whether the destination could be allowed at all (if not, smoltcp answers with a reset,
//! which the sandbox sees as "connection refused"), then opens a listening socket for exactly
//! that destination and feeds it the SYN. Once the handshake completes, the connection is
//! handed to the handler as a [`SmolStream`], together with its original destination. UDP to
//! port 53 is handed over as DNS queries; other UDP, ICMP and IPv6 are dropped.
//!
//! None of the sandbox's packets reach the host kernel's IP stack: the host only ever sees
//! the byte streams, which the handler relays through ordinary sockets of its own.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::OwnedFd;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant as StdInstant};

use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{self, Device, DeviceCapabilities, Medium};
use smoltcp::socket::{tcp, udp};
use smoltcp::time::Instant;
use smoltcp::wire::{
    HardwareAddress, IpAddress, IpCidr, IpEndpoint, IpListenEndpoint, IpProtocol, Ipv4Packet,
    TcpPacket, UdpPacket,
};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{Notify, oneshot};

use crate::ether::Inbound;

/// Largest receive and send buffer of one TCP connection. The window the sandbox sees is the
/// receive buffer; both bound the host memory a connection can pin.
pub const MAX_BUF: usize = 256 * 1024;
/// Smallest: below this a connection is refused rather than made uselessly slow.
pub const MIN_BUF: usize = 8 * 1024;
/// Connections one sandbox may hold open (and half-open) at once.
pub const MAX_CONNS: usize = 512;
/// Default of the host memory one sandbox's connections may hold in this process (see
/// [`Budget`]).
pub const DEFAULT_BUFFER_BUDGET: usize = 64 * 1024 * 1024;

/// The host memory one sandbox's TCP connections may hold in this process: the stack's
/// buffers and the relay's, none of which the kernel charges to the sandbox's cgroup. Each
/// connection is sized from what is left when it opens: the first get full windows
/// ([`MAX_BUF`]), later ones smaller, down to [`MIN_BUF`]; past that, new connections are
/// reset until others close. A connection costs `per_buffer * buffers + overhead` (see
/// [`Budget::cost`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    pub bytes: usize,
    /// Buffers of one buffer size a connection holds (the stack's two, plus the relay's).
    pub buffers: usize,
    /// Fixed bytes per connection besides them.
    pub overhead: usize,
}

impl Budget {
    /// The buffer size for a new connection when `open` connections hold `used` bytes, or
    /// `None` if the budget cannot hold one more.
    pub fn size_for(&self, used: usize, open: usize) -> Option<usize> {
        let left = self.bytes.saturating_sub(used);
        // Room kept for every connection that may still come, at the smallest size, so a
        // burst of full windows cannot starve the rest of the connection limit.
        let reserve = MAX_CONNS.saturating_sub(open + 1) * self.cost(MIN_BUF);
        // An eighth of what is free beyond that: full windows while the budget is ample,
        // shrinking geometrically as it fills.
        let free = left.saturating_sub(reserve).saturating_sub(self.overhead);
        let size = (free / 8 / self.buffers.max(1) / 1024 * 1024).clamp(MIN_BUF, MAX_BUF);
        (self.cost(size) <= left).then_some(size)
    }

    /// What a connection with buffers of `size` costs.
    pub fn cost(&self, size: usize) -> usize {
        size * self.buffers + self.overhead
    }
}

impl Default for Budget {
    fn default() -> Self {
        Budget { bytes: DEFAULT_BUFFER_BUDGET, buffers: 2, overhead: 0 }
    }
}
/// Packets read from the device before the stack runs once.
const BATCH: usize = 64;
/// A connection we closed whose peer never finishes closing is reset after this.
const LINGER: Duration = Duration::from_secs(30);
/// Local ports of the connections the stack opens into the sandbox ([`Stack::connect`]).
const EPHEMERAL: std::ops::Range<u16> = 49152..65535;

/// What the stack asks of its owner.
pub trait Handler: Send + Sync + 'static {
    /// `Some(reason)` refuses a new connection to `dst` at its SYN (the sandbox gets a reset);
    /// the handler records it.
    fn refuse_early(&self, dst: SocketAddrV4) -> Option<String>;
    /// A new connection from the sandbox to `dst`, its handshake done.
    fn connection(self: Arc<Self>, stream: SmolStream, dst: SocketAddrV4);
    /// A DNS query over UDP from `src` to `dst` (any address, port 53); answer with
    /// [`Stack::send_udp`].
    fn dns_query(
        self: Arc<Self>,
        stack: Arc<Stack>,
        query: Vec<u8>,
        src: SocketAddrV4,
        dst: SocketAddrV4,
    );
    /// UDP to something other than port 53 was dropped.
    fn udp_dropped(&self, dst: SocketAddrV4);
    /// A new connection to `dst` was reset: the sandbox's connections hold all the memory
    /// they may (`open` of them).
    fn buffers_exhausted(&self, dst: SocketAddrV4, open: usize);
}

/// What the device's messages carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Link {
    /// One IPv4 packet per message (a TUN, or a relayed one).
    Ip,
    /// One Ethernet frame per message (a VM's NIC): [`crate::ether`] answers ARP and adds
    /// and strips the headers around the same IP stack. `guest` is the guest's address.
    Ethernet { guest: Ipv4Addr },
}

impl Link {
    /// The largest IP packet the device carries.
    fn mtu(self) -> usize {
        match self {
            Link::Ip => crate::tun::MTU as usize,
            Link::Ethernet { .. } => crate::ether::MTU as usize,
        }
    }
}

/// Packets between the TUN descriptor and smoltcp.
#[derive(Debug)]
struct Queue {
    rx: VecDeque<Vec<u8>>,
    tx: VecDeque<Vec<u8>>,
    mtu: usize,
}

struct RxTok(Vec<u8>);
struct TxTok<'a>(&'a mut VecDeque<Vec<u8>>);

impl phy::RxToken for RxTok {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl phy::TxToken for TxTok<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut buf = vec![0u8; len];
        let r = f(&mut buf);
        self.0.push_back(buf);
        r
    }
}

impl Device for Queue {
    type RxToken<'a> = RxTok;
    type TxToken<'a> = TxTok<'a>;

    fn receive(&mut self, _t: Instant) -> Option<(RxTok, TxTok<'_>)> {
        let p = self.rx.pop_front()?;
        Some((RxTok(p), TxTok(&mut self.tx)))
    }

    fn transmit(&mut self, _t: Instant) -> Option<TxTok<'_>> {
        Some(TxTok(&mut self.tx))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ip;
        caps.max_transmission_unit = self.mtu;
        caps
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    /// Handshake under way.
    Pending,
    /// Handed to the handler as a stream.
    Open,
    /// The stream is gone; the socket finishes closing (since then).
    Released(StdInstant),
    /// A connection we opened into the sandbox ([`Stack::connect`]), its handshake under way.
    Dialing,
}

type Tuple = (IpEndpoint, IpEndpoint);

struct Inner {
    iface: Interface,
    sockets: SocketSet<'static>,
    dev: Queue,
    dns: SocketHandle,
    slots: HashMap<SocketHandle, Slot>,
    tuples: HashMap<Tuple, SocketHandle>,
    closed: bool,
    budget: Budget,
    /// Bytes the open connections cost, and each one's buffer size.
    used: usize,
    sizes: HashMap<SocketHandle, usize>,
    /// Who waits for each [`Slot::Dialing`] connection's handshake.
    dials: HashMap<SocketHandle, oneshot::Sender<io::Result<()>>>,
    /// The next local port [`Stack::connect`] tries.
    next_port: u16,
}

impl Inner {
    /// Forgets connection `h` and gives its memory back to the budget.
    fn forget(&mut self, h: SocketHandle) {
        self.slots.remove(&h);
        self.tuples.retain(|_, v| *v != h);
        self.sockets.remove(h);
        self.dials.remove(&h);
        if let Some(size) = self.sizes.remove(&h) {
            self.used = self.used.saturating_sub(self.budget.cost(size));
        }
    }
}

/// One sandbox's stack. Dropping the last reference closes the TUN descriptor.
pub struct Stack {
    inner: Mutex<Inner>,
    wake: Notify,
    epoch: StdInstant,
    link: Link,
}

impl std::fmt::Debug for Stack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stack").finish_non_exhaustive()
    }
}

fn v4(ep: IpEndpoint) -> SocketAddrV4 {
    let IpAddress::Ipv4(a) = ep.addr;
    SocketAddrV4::new(a, ep.port)
}

impl Stack {
    pub fn new(budget: Budget) -> Arc<Stack> {
        Stack::on(budget, Link::Ip)
    }

    /// A stack on a device whose messages are `link`'s.
    pub fn on(budget: Budget, link: Link) -> Arc<Stack> {
        let mut dev = Queue { rx: VecDeque::new(), tx: VecDeque::new(), mtu: link.mtu() };
        let cfg = Config::new(HardwareAddress::Ip);
        let epoch = StdInstant::now();
        let mut iface = Interface::new(cfg, &mut dev, Instant::from_millis(0));
        let gw = crate::tun::GATEWAY_IP;
        iface.update_ip_addrs(|a| {
            let _ = a.push(IpCidr::new(IpAddress::Ipv4(gw), 32));
        });
        // AnyIP: accept packets for every address routed through one of our own addresses.
        let _ = iface.routes_mut().add_default_ipv4_route(gw);
        iface.set_any_ip(true);
        let mut sockets = SocketSet::new(Vec::new());
        let meta = || vec![udp::PacketMetadata::EMPTY; 64];
        let mut dns = udp::Socket::new(
            udp::PacketBuffer::new(meta(), vec![0; 64 * 1024]),
            udp::PacketBuffer::new(meta(), vec![0; 64 * 1024]),
        );
        let _ = dns.bind(IpListenEndpoint { addr: None, port: 53 });
        let dns = sockets.add(dns);
        Arc::new(Stack {
            inner: Mutex::new(Inner {
                iface,
                sockets,
                dev,
                dns,
                slots: HashMap::new(),
                tuples: HashMap::new(),
                closed: false,
                budget,
                used: 0,
                sizes: HashMap::new(),
                dials: HashMap::new(),
                // A random start: a stack that replaces another on the same sandbox (a
                // re-attach after a server restart) must not reuse the old one's first
                // 4-tuples, which the sandbox may still hold in TIME_WAIT (gVisor then answers
                // a new SYN with the old connection's ACK about half the time, by ISN).
                next_port: EPHEMERAL.start + rand::random_range(0..EPHEMERAL.end - EPHEMERAL.start),
            }),
            wake: Notify::new(),
            epoch,
            link,
        })
    }

    fn now(&self) -> Instant {
        Instant::from_micros(self.epoch.elapsed().as_micros() as i64)
    }

    fn lock(&self) -> io::Result<MutexGuard<'_, Inner>> {
        self.inner.lock().map_err(|_| io::Error::other("network stack lock poisoned"))
    }

    /// Stops the stack: every connection is reset, the loop ends and drops the device.
    pub fn close(&self) {
        if let Ok(mut g) = self.inner.lock() {
            g.closed = true;
            // Whoever waits for a connection into the sandbox hears that it will not come.
            g.dials.clear();
            let handles: Vec<SocketHandle> = g.slots.keys().copied().collect();
            for h in handles {
                g.sockets.get_mut::<tcp::Socket>(h).abort();
            }
        }
        self.wake.notify_one();
    }

    /// Sends a UDP datagram to the sandbox, from `from` (the address it queried).
    pub fn send_udp(&self, data: &[u8], to: SocketAddrV4, from: SocketAddrV4) {
        if let Ok(mut g) = self.inner.lock() {
            let h = g.dns;
            let meta = udp::UdpMetadata {
                endpoint: IpEndpoint::new(IpAddress::Ipv4(*to.ip()), to.port()),
                local_address: Some(IpAddress::Ipv4(*from.ip())),
                meta: Default::default(),
            };
            let _ = g.sockets.get_mut::<udp::Socket>(h).send_slice(data, meta);
        }
        self.wake.notify_one();
    }

    /// Opens a TCP connection from the gateway's address to `dst` inside the sandbox (an
    /// inbound request to one of its ports) and returns it once the sandbox has accepted it.
    /// It takes the same buffer budget as the sandbox's own connections. Dropping the future
    /// before then resets the attempt.
    pub async fn connect(self: &Arc<Self>, dst: SocketAddrV4) -> io::Result<SmolStream> {
        let (tx, rx) = oneshot::channel();
        let h = {
            let mut g = self.lock()?;
            if g.closed {
                return Err(io::Error::new(io::ErrorKind::NotConnected, "sandbox network closed"));
            }
            let inner = &mut *g;
            let full = || {
                io::Error::new(
                    io::ErrorKind::OutOfMemory,
                    "the sandbox's connections hold all the memory they may",
                )
            };
            if inner.slots.len() >= MAX_CONNS {
                return Err(full());
            }
            let size = inner.budget.size_for(inner.used, inner.slots.len()).ok_or_else(full)?;
            let remote = IpEndpoint::new(IpAddress::Ipv4(*dst.ip()), dst.port());
            // A local port no connection to the same destination holds.
            let span = EPHEMERAL.end - EPHEMERAL.start;
            let mut local = None;
            for _ in 0..span {
                let port = inner.next_port;
                inner.next_port =
                    if port >= EPHEMERAL.end - 1 { EPHEMERAL.start } else { port + 1 };
                let ep = IpEndpoint::new(IpAddress::Ipv4(crate::tun::GATEWAY_IP), port);
                if !inner.tuples.contains_key(&(remote, ep)) {
                    local = Some(ep);
                    break;
                }
            }
            let local = local
                .ok_or_else(|| io::Error::new(io::ErrorKind::AddrInUse, "no free local port"))?;
            let mut s = socket(size);
            s.connect(inner.iface.context(), remote, local)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
            let h = inner.sockets.add(s);
            inner.slots.insert(h, Slot::Dialing);
            inner.tuples.insert((remote, local), h);
            inner.sizes.insert(h, size);
            inner.used += inner.budget.cost(size);
            inner.dials.insert(h, tx);
            h
        };
        // Held from here: dropped (the caller gave up, or the handshake failed) it resets.
        let stream = SmolStream::new(self.clone(), h);
        self.wake.notify_one();
        match rx.await {
            Ok(Ok(())) => Ok(stream),
            Ok(Err(e)) => Err(e),
            Err(_) => {
                Err(io::Error::new(io::ErrorKind::ConnectionAborted, "sandbox network closed"))
            }
        }
    }

    /// Runs the stack on the TUN descriptor until [`Stack::close`] or a device error.
    pub async fn run(self: Arc<Self>, tun: OwnedFd, handler: Arc<dyn Handler>) -> io::Result<()> {
        let tun = ringfence_sys::async_fd(tun)?;
        let ended = self.pump(&tun, handler).await;
        // The last close of a TUN unregisters its device: `synchronize_net` under the RTNL
        // lock, then an `rcu_barrier` (waits for an RCU grace period, ~15-25 ms on a host as
        // it comes). On this task's runtime worker that stalled every request the worker
        // served (with 8 clients on 2 workers, two sandboxes ending blocked the whole API;
        // docs/PERFORMANCE.md). On the blocking pool, closes that overlap also share one
        // barrier (a waiter that finds a barrier completed since it asked returns at once).
        let fd = tun.into_inner();
        tokio::task::spawn_blocking(move || drop(fd));
        ended
    }

    async fn pump(
        self: &Arc<Self>,
        tun: &tokio::io::unix::AsyncFd<OwnedFd>,
        handler: Arc<dyn Handler>,
    ) -> io::Result<()> {
        let mut buf = vec![0u8; 65536];
        let mut next: Option<Duration> = None;
        loop {
            let mut got: Vec<Vec<u8>> = Vec::new();
            let sleep = tokio::time::sleep(next.unwrap_or(Duration::from_secs(3600)));
            tokio::select! {
                guard = tun.readable() => {
                    let mut guard = guard?;
                    while got.len() < BATCH {
                        match guard.try_io(|fd| read(fd, &mut buf)) {
                            // A TUN never reads empty; a relayed device does when the
                            // sandbox's end has closed: the device is gone.
                            Ok(Ok(0)) => return Ok(()),
                            Ok(Ok(n)) => match self.link {
                                Link::Ip => got.push(buf[..n].to_vec()),
                                Link::Ethernet { guest } => {
                                    match crate::ether::inbound(&buf[..n], guest) {
                                        Inbound::Packet(p) => got.push(p.to_vec()),
                                        Inbound::Answer(a) => {
                                            let _ = nix::unistd::write(tun.get_ref(), &a);
                                        }
                                        Inbound::Drop => {}
                                    }
                                }
                            },
                            Ok(Err(e)) => return Err(e),
                            Err(_would_block) => break,
                        }
                    }
                }
                _ = self.wake.notified() => {}
                _ = sleep => {}
            }
            let step = self.step(got, &handler)?;
            let Some(step) = step else { return Ok(()) };
            for p in &step.tx {
                // A full device queue drops the packet; TCP sends it again.
                let _ = match self.link {
                    Link::Ip => nix::unistd::write(tun.get_ref(), p),
                    Link::Ethernet { .. } => {
                        nix::unistd::write(tun.get_ref(), &crate::ether::outbound(p))
                    }
                };
            }
            for (stream, dst) in step.accepted {
                handler.clone().connection(stream, dst);
            }
            for (q, src, dst) in step.queries {
                handler.clone().dns_query(self.clone(), q, src, dst);
            }
            next = step.next;
        }
    }

    /// One turn: ingest packets, run smoltcp, collect what to send and whom to tell.
    fn step(
        self: &Arc<Self>,
        got: Vec<Vec<u8>>,
        handler: &Arc<dyn Handler>,
    ) -> io::Result<Option<Step>> {
        let now = self.now();
        let mut g = self.lock()?;
        if g.closed {
            return Ok(None);
        }
        let inner = &mut *g;
        for p in got {
            let fresh = self.inspect(inner, &p, handler);
            inner.dev.rx.push_back(p);
            inner.iface.poll_ingress_single(now, &mut inner.dev, &mut inner.sockets);
            if let Some((h, tuple)) = fresh {
                // The listener took its SYN (then it has the tuple) or it did not: then it
                // must not linger and catch someone else's.
                let s = inner.sockets.get_mut::<tcp::Socket>(h);
                if s.state() == tcp::State::Listen {
                    inner.forget(h);
                } else {
                    inner.tuples.insert(tuple, h);
                }
            }
        }
        inner.iface.poll(now, &mut inner.dev, &mut inner.sockets);
        let mut accepted = Vec::new();
        let mut gone = Vec::new();
        let mut dialed = Vec::new();
        for (h, slot) in inner.slots.iter_mut() {
            let s = inner.sockets.get_mut::<tcp::Socket>(*h);
            match (*slot, s.state()) {
                (Slot::Dialing, tcp::State::Established | tcp::State::CloseWait) => {
                    *slot = Slot::Open;
                    dialed.push((*h, Ok(())));
                }
                (Slot::Dialing, tcp::State::Closed) => {
                    dialed.push((
                        *h,
                        Err(io::Error::new(
                            io::ErrorKind::ConnectionRefused,
                            "the sandbox refused the connection (nothing listens on the port)",
                        )),
                    ));
                    gone.push(*h);
                }
                (Slot::Pending, tcp::State::Established | tcp::State::CloseWait) => {
                    if let Some(local) = s.local_endpoint() {
                        *slot = Slot::Open;
                        accepted.push((SmolStream::new(self.clone(), *h), v4(local)));
                    }
                }
                (Slot::Pending, tcp::State::Closed) => gone.push(*h),
                (Slot::Released(_), tcp::State::Closed | tcp::State::TimeWait) => gone.push(*h),
                (Slot::Released(since), _) if since.elapsed() > LINGER => {
                    s.abort();
                }
                _ => {}
            }
        }
        for (h, result) in dialed {
            if let Some(tx) = inner.dials.remove(&h) {
                let _ = tx.send(result);
            }
        }
        for h in gone {
            inner.forget(h);
        }
        let mut queries = Vec::new();
        let dns = inner.sockets.get_mut::<udp::Socket>(inner.dns);
        let mut qbuf = vec![0u8; 65536];
        while let Ok((n, meta)) = dns.recv_slice(&mut qbuf) {
            let dst = match meta.local_address {
                Some(IpAddress::Ipv4(a)) => SocketAddrV4::new(a, 53),
                None => SocketAddrV4::new(crate::tun::GATEWAY_IP, 53),
            };
            queries.push((qbuf[..n].to_vec(), v4(meta.endpoint), dst));
        }
        // The poll above may have queued answers and window updates; send them with this turn.
        inner.iface.poll(now, &mut inner.dev, &mut inner.sockets);
        let tx: Vec<Vec<u8>> = inner.dev.tx.drain(..).collect();
        let next = inner
            .iface
            .poll_delay(now, &inner.sockets)
            .map(|d| Duration::from_micros(d.total_micros()));
        Ok(Some(Step { tx, accepted, queries, next }))
    }

    /// Looks at a packet before smoltcp does: a new SYN gets a listener for its exact
    /// destination (or is refused); UDP that is not DNS is reported.
    fn inspect(
        &self,
        inner: &mut Inner,
        p: &[u8],
        handler: &Arc<dyn Handler>,
    ) -> Option<(SocketHandle, Tuple)> {
        let ip = Ipv4Packet::new_checked(p).ok()?;
        let (src, dst) = (ip.src_addr(), ip.dst_addr());
        match ip.next_header() {
            IpProtocol::Tcp => {
                let tcp = TcpPacket::new_checked(ip.payload()).ok()?;
                if !tcp.syn() || tcp.ack() || tcp.dst_port() == 0 {
                    return None;
                }
                let local = IpEndpoint::new(IpAddress::Ipv4(dst), tcp.dst_port());
                let remote = IpEndpoint::new(IpAddress::Ipv4(src), tcp.src_port());
                if inner.tuples.contains_key(&(remote, local)) {
                    return None; // a retransmitted SYN: its socket answers
                }
                let dst_v4 = SocketAddrV4::new(dst, tcp.dst_port());
                if inner.slots.len() >= MAX_CONNS {
                    return None; // no listener: smoltcp resets it
                }
                if handler.refuse_early(dst_v4).is_some() {
                    return None;
                }
                let Some(size) = inner.budget.size_for(inner.used, inner.slots.len()) else {
                    handler.buffers_exhausted(dst_v4, inner.slots.len());
                    return None;
                };
                let mut s = socket(size);
                s.listen(IpListenEndpoint {
                    addr: Some(IpAddress::Ipv4(dst)),
                    port: tcp.dst_port(),
                })
                .ok()?;
                let h = inner.sockets.add(s);
                inner.slots.insert(h, Slot::Pending);
                inner.sizes.insert(h, size);
                inner.used += inner.budget.cost(size);
                Some((h, (remote, local)))
            }
            IpProtocol::Udp => {
                let udp = UdpPacket::new_checked(ip.payload()).ok()?;
                if udp.dst_port() != 53 {
                    handler.udp_dropped(SocketAddrV4::new(dst, udp.dst_port()));
                }
                None
            }
            _ => None,
        }
    }

    fn release(&self, h: SocketHandle, abort: bool) {
        if let Ok(mut g) = self.inner.lock()
            && g.slots.contains_key(&h)
        {
            if abort {
                g.sockets.get_mut::<tcp::Socket>(h).abort();
            }
            g.slots.insert(h, Slot::Released(StdInstant::now()));
        }
        self.wake.notify_one();
    }

    /// Open connections (for tests and diagnostics).
    pub fn connections(&self) -> usize {
        self.inner.lock().map(|g| g.slots.len()).unwrap_or(0)
    }

    /// Bytes of the buffer budget the open connections hold (for tests and diagnostics).
    pub fn buffered_bytes(&self) -> usize {
        self.inner.lock().map(|g| g.used).unwrap_or(0)
    }

    /// The buffer size connection `h` was given.
    fn buffer_size(&self, h: SocketHandle) -> usize {
        self.inner.lock().ok().and_then(|g| g.sizes.get(&h).copied()).unwrap_or(MIN_BUF)
    }
}

/// A TCP socket with buffers of `size`, set up as every connection of the stack is.
fn socket(size: usize) -> tcp::Socket<'static> {
    let mut s = tcp::Socket::new(
        tcp::SocketBuffer::new(vec![0u8; size]),
        tcp::SocketBuffer::new(vec![0u8; size]),
    );
    s.set_nagle_enabled(false);
    s.set_ack_delay(None);
    // A sandbox that vanishes mid-connection must not pin the socket forever.
    s.set_keep_alive(Some(smoltcp::time::Duration::from_secs(60)));
    s.set_timeout(Some(smoltcp::time::Duration::from_secs(180)));
    s
}

struct Step {
    tx: Vec<Vec<u8>>,
    accepted: Vec<(SmolStream, SocketAddrV4)>,
    queries: Vec<(Vec<u8>, SocketAddrV4, SocketAddrV4)>,
    next: Option<Duration>,
}

fn read(fd: &AsyncFd<OwnedFd>, buf: &mut [u8]) -> io::Result<usize> {
    nix::unistd::read(fd.get_ref(), buf).map_err(io::Error::from)
}

/// One sandbox connection as a byte stream. Dropping it without a shutdown resets the
/// connection; after a shutdown it closes in an orderly way.
pub struct SmolStream {
    stack: Arc<Stack>,
    handle: SocketHandle,
    shut: bool,
}

impl std::fmt::Debug for SmolStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SmolStream").field("handle", &self.handle).finish()
    }
}

impl SmolStream {
    /// The size of this connection's buffers: the relay sizes its own to match.
    pub fn buffer_size(&self) -> usize {
        self.stack.buffer_size(self.handle)
    }

    fn new(stack: Arc<Stack>, handle: SocketHandle) -> SmolStream {
        SmolStream { stack, handle, shut: false }
    }

    fn with<R>(&self, f: impl FnOnce(&mut tcp::Socket<'static>) -> R) -> io::Result<R> {
        let mut g = self.stack.lock()?;
        if g.closed {
            return Err(io::Error::new(io::ErrorKind::ConnectionAborted, "sandbox network closed"));
        }
        Ok(f(g.sockets.get_mut::<tcp::Socket>(self.handle)))
    }
}

impl AsyncRead for SmolStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let r = self.with(|s| {
            if s.can_recv() {
                match s.recv_slice(buf.initialize_unfilled()) {
                    Ok(n) => {
                        buf.advance(n);
                        Poll::Ready(Ok(n))
                    }
                    Err(e) => Poll::Ready(Err(io::Error::other(e.to_string()))),
                }
            } else if !s.may_recv() {
                if s.state() == tcp::State::Closed {
                    Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::ConnectionReset,
                        "reset by the sandbox",
                    )))
                } else {
                    Poll::Ready(Ok(0))
                }
            } else {
                s.register_recv_waker(cx.waker());
                Poll::Pending
            }
        });
        match r {
            Ok(Poll::Ready(Ok(n))) => {
                if n > 0 {
                    // Room in the receive buffer: the window update goes out with the next turn.
                    self.stack.wake.notify_one();
                }
                Poll::Ready(Ok(()))
            }
            Ok(Poll::Ready(Err(e))) | Err(e) => Poll::Ready(Err(e)),
            Ok(Poll::Pending) => Poll::Pending,
        }
    }
}

impl AsyncWrite for SmolStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = self.with(|s| {
            if !s.may_send() {
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::BrokenPipe,
                    "the sandbox closed the connection",
                )))
            } else if s.can_send() {
                Poll::Ready(s.send_slice(data).map_err(|e| io::Error::other(e.to_string())))
            } else {
                s.register_send_waker(cx.waker());
                Poll::Pending
            }
        });
        match r {
            Ok(Poll::Ready(Ok(n))) => {
                self.stack.wake.notify_one();
                Poll::Ready(Ok(n))
            }
            Ok(other) => other,
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = self.with(|s| s.close());
        self.shut = true;
        self.stack.wake.notify_one();
        Poll::Ready(r)
    }
}

impl Drop for SmolStream {
    fn drop(&mut self) {
        self.stack.release(self.handle, !self.shut);
    }
}

/// An address as a socket address (for handlers that want std types).
pub fn sock(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(ip), port)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Opens connections until the budget refuses one, as the stack does.
    fn fill(b: &Budget) -> (Vec<usize>, usize) {
        let (mut sizes, mut used) = (Vec::new(), 0);
        while let Some(size) = b.size_for(used, sizes.len()) {
            used += b.cost(size);
            sizes.push(size);
            assert!(sizes.len() < 100_000, "the budget never fills");
        }
        (sizes, used)
    }

    #[test]
    fn connections_shrink_as_the_budget_fills_and_never_exceed_it() {
        let b = Budget { bytes: DEFAULT_BUFFER_BUDGET, buffers: 4, overhead: 16 * 1024 };
        let (sizes, used) = fill(&b);
        assert!(used <= b.bytes, "{used} > {}", b.bytes);
        assert_eq!(sizes[0], MAX_BUF, "the first connections get full windows");
        assert!(sizes.windows(2).all(|w| w[1] <= w[0]), "sizes never grow: {sizes:?}");
        assert_eq!(*sizes.last().unwrap(), MIN_BUF);
        // The default holds every connection a sandbox may open, at the smallest size at
        // worst; what it refuses is past the connection limit anyway.
        assert!(sizes.len() >= MAX_CONNS, "only {} connections fit", sizes.len());
        assert!(sizes.iter().filter(|s| **s == MAX_BUF).count() >= 4, "{sizes:?}");
        // What is left cannot hold one more at the smallest size.
        assert!(b.bytes - used < b.cost(MIN_BUF));
    }

    #[test]
    fn a_small_budget_refuses_rather_than_overcommits() {
        let b = Budget { bytes: 100 * 1024, buffers: 4, overhead: 16 * 1024 };
        let (sizes, used) = fill(&b);
        assert_eq!(sizes, vec![MIN_BUF, MIN_BUF], "{sizes:?}");
        assert!(used <= b.bytes);
        let none = Budget { bytes: 1024, ..b };
        assert_eq!(none.size_for(0, 0), None);
    }
}
