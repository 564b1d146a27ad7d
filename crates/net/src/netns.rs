//! Making sockets in other network namespaces.
//!
//! A socket belongs to the network namespace of the thread that created it, for its whole
//! life, whichever thread uses it later. So a thread joins a namespace (`setns`, which affects
//! only that thread), creates the socket and hands it over; the async runtime's threads never
//! change namespace.

use std::fs::File;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nix::sched::{CloneFlags, setns};
use nix::sys::socket::{AddressFamily, SockFlag, SockType, socket};
use tokio::net::{TcpSocket, TcpStream, UdpSocket};
use tokio::sync::oneshot;

/// Runs `f` on a fresh thread that has joined the network namespace at `ns` (for example
/// `/proc/<pid>/ns/net` or `/run/netns/<name>`), and returns what it returns. The thread ends
/// with `f`, so no thread is ever left in a namespace it should not be in.
pub fn in_netns<T, F>(ns: &Path, f: F) -> io::Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> io::Result<T> + Send + 'static,
{
    let file = File::open(ns)?;
    std::thread::Builder::new()
        .name("rf-netns".into())
        .spawn(move || {
            setns(&file, CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
            f()
        })?
        .join()
        .map_err(|_| io::Error::other("namespace thread panicked"))?
}

fn tcp_socket(ip: IpAddr) -> io::Result<OwnedFd> {
    let family = if ip.is_ipv4() { AddressFamily::Inet } else { AddressFamily::Inet6 };
    socket(family, SockType::Stream, SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC, None)
        .map_err(io::Error::from)
}

fn udp_socket() -> io::Result<std::net::UdpSocket> {
    let s = std::net::UdpSocket::bind("0.0.0.0:0")?;
    s.set_nonblocking(true)?;
    Ok(s)
}

fn local_addrs() -> Vec<IpAddr> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else { return Vec::new() };
    addrs
        .filter_map(|a| {
            let a = a.address?;
            if let Some(v4) = a.as_sockaddr_in() {
                Some(IpAddr::V4(v4.ip()))
            } else {
                a.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
            }
        })
        .collect()
}

enum Job {
    Tcp(IpAddr, oneshot::Sender<io::Result<OwnedFd>>),
    Udp(oneshot::Sender<io::Result<std::net::UdpSocket>>),
    Addrs(oneshot::Sender<Vec<IpAddr>>),
}

/// Opens the sandboxes' upstream connections, from the server's own namespace or from the
/// operator's egress namespace (`serve --egress-netns`).
#[derive(Debug)]
pub struct Dialer {
    /// A thread living in the egress namespace, serving socket requests; `None`: our own.
    worker: Option<Mutex<std::sync::mpsc::Sender<Job>>>,
    netns: Option<PathBuf>,
    /// The addresses of this host (and of the egress namespace), refreshed now and then:
    /// sandboxes never reach them.
    own: Mutex<(Instant, Vec<IpAddr>)>,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Job")
    }
}

/// How often the host's own addresses are read again.
const OWN_REFRESH: Duration = Duration::from_secs(5);

impl Dialer {
    /// Dials from the server's own network namespace.
    pub fn here() -> Dialer {
        Dialer { worker: None, netns: None, own: Mutex::new((Instant::now(), local_addrs())) }
    }

    /// Dials from the network namespace at `path`.
    pub fn in_netns(path: &Path) -> io::Result<Dialer> {
        let file = File::open(path)?;
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<io::Result<()>>();
        std::thread::Builder::new().name("rf-egress-ns".into()).spawn(move || {
            if let Err(e) = setns(&file, CloneFlags::CLONE_NEWNET) {
                let _ = ready_tx.send(Err(io::Error::from(e)));
                return;
            }
            let _ = ready_tx.send(Ok(()));
            // Ends when the Dialer (the only sender) is dropped.
            while let Ok(job) = rx.recv() {
                match job {
                    Job::Tcp(ip, reply) => drop(reply.send(tcp_socket(ip))),
                    Job::Udp(reply) => drop(reply.send(udp_socket())),
                    Job::Addrs(reply) => drop(reply.send(local_addrs())),
                }
            }
        })?;
        ready_rx.recv().map_err(|_| io::Error::other("egress namespace thread died"))??;
        let d = Dialer {
            worker: Some(Mutex::new(tx)),
            netns: Some(path.to_path_buf()),
            own: Mutex::new((Instant::now() - OWN_REFRESH * 2, Vec::new())),
        };
        Ok(d)
    }

    pub fn netns(&self) -> Option<&Path> {
        self.netns.as_deref()
    }

    async fn ask<T>(&self, job: impl FnOnce(oneshot::Sender<T>) -> Job) -> io::Result<T> {
        let (tx, rx) = oneshot::channel();
        let sent = match &self.worker {
            Some(w) => w.lock().map_err(|_| io::Error::other("dialer lock"))?.send(job(tx)).is_ok(),
            None => false,
        };
        if !sent {
            return Err(io::Error::other("egress namespace thread is gone"));
        }
        rx.await.map_err(|_| io::Error::other("egress namespace thread is gone"))
    }

    /// Connects to `addr`, failing after `timeout`.
    pub async fn connect(&self, addr: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
        let fd = match &self.worker {
            None => tcp_socket(addr.ip())?,
            Some(_) => self.ask(|tx| Job::Tcp(addr.ip(), tx)).await??,
        };
        let sock = TcpSocket::from_std_stream(std::net::TcpStream::from(fd));
        let stream = tokio::time::timeout(timeout, sock.connect(addr))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
        stream.set_nodelay(true)?;
        Ok(stream)
    }

    /// An unconnected UDP socket (for DNS upstream queries).
    pub async fn udp(&self) -> io::Result<UdpSocket> {
        let s = match &self.worker {
            None => udp_socket()?,
            Some(_) => self.ask(Job::Udp).await??,
        };
        UdpSocket::from_std(s)
    }

    /// This host's addresses as last read (no waiting).
    pub fn own_addrs_cached(&self) -> Vec<IpAddr> {
        self.own.lock().map(|g| g.1.clone()).unwrap_or_default()
    }

    /// This host's addresses (the server's namespace and the egress one).
    pub async fn own_addrs(&self) -> Vec<IpAddr> {
        if let Ok(g) = self.own.lock()
            && g.0.elapsed() < OWN_REFRESH
        {
            return g.1.clone();
        }
        let mut addrs = local_addrs();
        if self.worker.is_some()
            && let Ok(more) = self.ask(Job::Addrs).await
        {
            addrs.extend(more);
        }
        addrs.sort();
        addrs.dedup();
        if let Ok(mut g) = self.own.lock() {
            *g = (Instant::now(), addrs.clone());
        }
        addrs
    }
}

/// Connects to `127.0.0.1:port` inside the network namespace at `ns` (a sandbox's), for
/// inbound traffic to a sandbox's own services.
pub async fn connect_inside(ns: &Path, port: u16, timeout: Duration) -> io::Result<TcpStream> {
    let ns = ns.to_path_buf();
    let fd = tokio::task::spawn_blocking(move || {
        in_netns(&ns, || tcp_socket(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST)))
    })
    .await
    .map_err(io::Error::other)??;
    let sock = TcpSocket::from_std_stream(std::net::TcpStream::from(fd));
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let stream = tokio::time::timeout(timeout, sock.connect(addr))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
    stream.set_nodelay(true)?;
    Ok(stream)
}
