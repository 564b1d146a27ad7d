//! The gvisor tier's network device, made by the agent inside gVisor.
//!
//! runsc here cannot join a network namespace the host prepared (see
//! `ringfence_gvisor::Network`), so the sandbox's device is made on the inside: a TUN in
//! gVisor's own network stack, addressed on a `/0` prefix (every destination is on-link: a
//! default route without `RTM_NEWROUTE`, which this gVisor's netlink lacks, as it lacks the
//! interface ioctls; `RTM_NEWLINK` and `RTM_NEWADDR` it has). Two threads copy packets between
//! the TUN and an inherited `SOCK_SEQPACKET` descriptor whose other end is the host's
//! userspace stack, where the egress policy decides, exactly as for the jail's TUN.
//!
//! Nothing here is reachable from the sandbox's processes: the TUN and the relay descriptor
//! are close-on-exec, and gVisor's `/proc` will not reopen either (the code-interpreter suite
//! checks what `/proc/1/fd` lends). The agent needs `CAP_NET_ADMIN` to make the device and
//! drops it before it serves (see `gvisor_setup`).

use std::net::Ipv4Addr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::{Arc, Mutex};

use nix::sys::socket::{
    AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, recv, send, sendto,
    socket,
};
use ringfence_proto::PacketRelay;

/// Why the device could not be made.
#[derive(Debug, thiserror::Error)]
#[error("{step}: {message}")]
pub struct NetError {
    pub step: String,
    pub message: String,
}

fn err(step: &str) -> impl FnOnce(nix::Error) -> NetError + '_ {
    move |e| NetError { step: step.to_string(), message: e.to_string() }
}

/// Makes the device and starts relaying. The relay threads end when either side closes.
pub fn start(
    spec: &PacketRelay,
    relay: OwnedFd,
    phases: &mut Vec<ringfence_proto::Phase>,
) -> Result<(), NetError> {
    let tun = ringfence_sys::tun_create(&spec.iface)
        .map_err(|e| NetError { step: "create the TUN".into(), message: e.to_string() })?;
    // The relay threads block on it; made non-blocking for the host's poller elsewhere.
    nix::fcntl::fcntl(&tun, nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::empty()))
        .map_err(err("make the TUN blocking"))?;
    let index = nix::net::if_::if_nametoindex(spec.iface.as_str()).map_err(err("find the TUN"))?;
    ringfence_jail::phase(phases, "net_tun");
    let nl = socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkRoute,
    )
    .map_err(err("open netlink"))?;
    request(&nl, &link_up(index, spec.mtu), "bring the TUN up")?;
    request(&nl, &add_address(index, Ipv4Addr::from(spec.address)), "address the TUN")?;
    drop(nl);
    ringfence_jail::phase(phases, "net_netlink");
    let dup = |step: &str| {
        let step = step.to_string();
        move |e: std::io::Error| NetError { step, message: e.to_string() }
    };
    let listener = match &spec.listen {
        Some(path) => Some(listen(path)?),
        None => None,
    };
    ringfence_jail::phase(phases, "net_listen");
    let tun_out = tun.try_clone().map_err(dup("duplicate the TUN"))?;
    let current = Arc::new(Mutex::new(Arc::new(relay)));
    let out_relay = current.clone();
    let mtu = usize::try_from(spec.mtu).unwrap_or(65535).max(1500);
    let lasting = listener.is_some();
    spawn("ringfence-net-out", move || to_host(&tun_out, &out_relay, mtu, lasting))?;
    spawn("ringfence-net-in", move || from_host(&current, listener, &tun, mtu))?;
    ringfence_jail::phase(phases, "net_threads");
    Ok(())
}

/// The relay's current host end: replaced when a restarted server connects anew.
type Current = Arc<Mutex<Arc<OwnedFd>>>;

/// A `SOCK_SEQPACKET` listener at `path` (a host socket gVisor makes through its gofer:
/// `runsc --host-uds=create`), only root's.
fn listen(path: &str) -> Result<std::os::unix::net::UnixListener, NetError> {
    use nix::sys::socket::{Backlog, UnixAddr, bind};
    let _ = std::fs::remove_file(path);
    let sock = socket(AddressFamily::Unix, SockType::SeqPacket, SockFlag::SOCK_CLOEXEC, None)
        .map_err(err("open the relay's listener"))?;
    let addr = UnixAddr::new(path).map_err(err("the relay listener's path"))?;
    bind(sock.as_raw_fd(), &addr).map_err(err("bind the relay's listener"))?;
    nix::sys::socket::listen(&sock, Backlog::new(1).map_err(err("backlog"))?)
        .map_err(err("listen for the relay"))?;
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600)).map_err(
        |e| NetError { step: "chmod the relay's listener".into(), message: e.to_string() },
    )?;
    // std's listener accepts any socket type: accept4 with close-on-exec, as it should.
    Ok(std::os::unix::net::UnixListener::from(sock))
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> Result<(), NetError> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .map(drop)
        .map_err(|e| NetError { step: format!("start {name}"), message: e.to_string() })
}

/// Packets the sandbox sends, one message each to the host. With a relay that lasts
/// (`lasting`: a listener takes a replacement), a send that fails drops the packet, as a
/// link that is down does, while [`from_host`] waits for the next host.
fn to_host(tun: &OwnedFd, relay: &Current, mtu: usize, lasting: bool) {
    let mut buf = vec![0u8; mtu];
    loop {
        let n = match nix::unistd::read(tun.as_fd(), &mut buf) {
            Ok(0) => return,
            Ok(n) => n,
            Err(nix::Error::EINTR) => continue,
            Err(_) => return,
        };
        let Ok(fd) = relay.lock().map(|r| r.clone()) else { return };
        match send(fd.as_raw_fd(), &buf[..n], MsgFlags::MSG_NOSIGNAL) {
            Ok(_) | Err(nix::Error::EINTR) => {}
            // A full host queue drops the packet, as a full device queue does; TCP resends.
            Err(nix::Error::ENOBUFS | nix::Error::EAGAIN) => {}
            Err(_) if lasting => {}
            Err(_) => return,
        }
    }
}

/// Packets the host sends, into the sandbox's stack. When the host's end closes (its server
/// ended), the next connection on `listener` becomes the relay; without one, relaying ends.
fn from_host(
    relay: &Current,
    listener: Option<std::os::unix::net::UnixListener>,
    tun: &OwnedFd,
    mtu: usize,
) {
    let mut buf = vec![0u8; mtu];
    loop {
        let Ok(fd) = relay.lock().map(|r| r.clone()) else { return };
        loop {
            let n = match recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty()) {
                Ok(0) => break,
                Ok(n) => n,
                Err(nix::Error::EINTR) => continue,
                Err(_) => break,
            };
            // A packet the sandbox's stack refuses is dropped, as on a wire.
            let _ = nix::unistd::write(tun.as_fd(), &buf[..n]);
        }
        let Some(l) = &listener else { return };
        let next = loop {
            match l.accept() {
                Ok((s, _)) => break OwnedFd::from(s),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        };
        match relay.lock() {
            Ok(mut r) => *r = Arc::new(next),
            Err(_) => return,
        }
    }
}

const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
const NLMSG_ERROR: u16 = 2;
const RTM_NEWLINK: u16 = 16;
const RTM_NEWADDR: u16 = 20;
const IFLA_MTU: u16 = 4;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const IFF_UP: u32 = 1;

/// One netlink message: header, fixed body, attributes (each 4-byte aligned).
fn message(kind: u16, flags: u16, body: &[u8], attrs: &[(u16, &[u8])]) -> Vec<u8> {
    let mut payload = body.to_vec();
    for (t, v) in attrs {
        let len = 4 + v.len();
        payload.extend_from_slice(&(len as u16).to_ne_bytes());
        payload.extend_from_slice(&t.to_ne_bytes());
        payload.extend_from_slice(v);
        payload.resize(payload.len().next_multiple_of(4), 0);
    }
    let mut m = Vec::with_capacity(16 + payload.len());
    m.extend_from_slice(&((16 + payload.len()) as u32).to_ne_bytes());
    m.extend_from_slice(&kind.to_ne_bytes());
    m.extend_from_slice(&(flags | NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
    m.extend_from_slice(&1u32.to_ne_bytes()); // sequence: one request at a time
    m.extend_from_slice(&0u32.to_ne_bytes()); // port: the kernel's
    m.extend_from_slice(&payload);
    m
}

/// `ip link set IFACE up mtu MTU`.
fn link_up(index: u32, mtu: u32) -> Vec<u8> {
    // ifinfomsg: family, pad, type, index, flags, change.
    let mut body = vec![libc::AF_UNSPEC as u8, 0, 0, 0];
    body.extend_from_slice(&(index as i32).to_ne_bytes());
    body.extend_from_slice(&IFF_UP.to_ne_bytes());
    body.extend_from_slice(&IFF_UP.to_ne_bytes());
    message(RTM_NEWLINK, 0, &body, &[(IFLA_MTU, &mtu.to_ne_bytes())])
}

/// `ip addr add ADDRESS/0 dev IFACE`.
fn add_address(index: u32, address: Ipv4Addr) -> Vec<u8> {
    // ifaddrmsg: family, prefix length, flags, scope (universe), index.
    let mut body = vec![libc::AF_INET as u8, 0, 0, 0];
    body.extend_from_slice(&index.to_ne_bytes());
    let a = address.octets();
    message(RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL, &body, &[(IFA_LOCAL, &a), (IFA_ADDRESS, &a)])
}

/// Sends one request and reads its acknowledgement (an `NLMSG_ERROR` carrying 0 or -errno).
fn request(nl: &OwnedFd, msg: &[u8], step: &str) -> Result<(), NetError> {
    sendto(nl.as_raw_fd(), msg, &NetlinkAddr::new(0, 0), MsgFlags::empty()).map_err(err(step))?;
    let mut buf = [0u8; 4096];
    let n = recv(nl.as_raw_fd(), &mut buf, MsgFlags::empty()).map_err(err(step))?;
    let ack = &buf[..n];
    let kind = ack.get(4..6).map(|b| u16::from_ne_bytes([b[0], b[1]]));
    let code = ack.get(16..20).map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
    match (kind, code) {
        (Some(NLMSG_ERROR), Some(0)) => Ok(()),
        (Some(NLMSG_ERROR), Some(e)) => Err(err(step)(nix::Error::from_raw(-e))),
        _ => Err(NetError { step: step.into(), message: format!("unexpected reply {ack:?}") }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_sized_and_aligned_as_netlink_reads_them() {
        let m = add_address(7, Ipv4Addr::new(100, 96, 0, 2));
        // header 16 + ifaddrmsg 8 + two 8-byte attributes.
        assert_eq!(m.len(), 40);
        assert_eq!(u32::from_ne_bytes(m[0..4].try_into().unwrap()), 40);
        assert_eq!(u16::from_ne_bytes(m[4..6].try_into().unwrap()), RTM_NEWADDR);
        assert_eq!(&m[28..32], &[100, 96, 0, 2]);
        let l = link_up(7, 65535);
        assert_eq!(l.len(), 16 + 16 + 8);
        assert_eq!(i32::from_ne_bytes(l[20..24].try_into().unwrap()), 7);
    }
}
