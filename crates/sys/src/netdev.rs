//! Network devices inside a sandbox's namespace: a TUN, an interface's address and MTU, the
//! default route (ioctls on a datagram socket).

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use crate::{Result, SysError, check};

/// An `ifreq` naming `name` (at most 15 bytes), every other field zero.
fn ifreq_named(name: &str) -> Result<libc::ifreq> {
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ || bytes.contains(&0) {
        return Err(SysError {
            call: "ifreq",
            source: io::Error::new(io::ErrorKind::InvalidInput, "bad interface name"),
        });
    }
    // SAFETY: ifreq is plain old data; all zeroes is valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    Ok(req)
}

/// Creates a layer-3 TUN device named `name` (no packet-information header) in the calling
/// thread's network namespace and returns its non-blocking descriptor. The device is not
/// persistent: it disappears when the descriptor is closed.
pub fn tun_create(name: &str) -> Result<OwnedFd> {
    let path = c"/dev/net/tun";
    // SAFETY: path is a valid C string; the result is checked and owned immediately.
    let fd =
        unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC | libc::O_NONBLOCK) };
    if fd < 0 {
        return Err(SysError::last("open(/dev/net/tun)"));
    }
    // SAFETY: fd is a fresh descriptor that nothing else owns.
    let tun = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut req = ifreq_named(name)?;
    req.ifr_ifru.ifru_flags = (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short;
    // SAFETY: req is a valid ifreq with a name and flags, which TUNSETIFF reads (and writes
    // back the name it chose).
    let ret = unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF as _, &mut req) };
    check("ioctl(TUNSETIFF)", ret.into())?;
    Ok(tun)
}

fn sockaddr_v4(addr: std::net::Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(addr.octets()) },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size on Linux and both are plain old
    // data; the kernel reads the family to know which one it got.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

/// Gives interface `name` (in the calling thread's network namespace) the IPv4 address
/// `addr/netmask` and `mtu`, and brings it up.
pub fn iface_up_ipv4(
    name: &str,
    addr: std::net::Ipv4Addr,
    netmask: std::net::Ipv4Addr,
    mtu: u32,
) -> Result<()> {
    // SAFETY: socket takes integers; the result is checked and owned immediately.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(SysError::last("socket"));
    }
    // SAFETY: fd is a fresh descriptor that nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut req = ifreq_named(name)?;
    req.ifr_ifru.ifru_mtu = mtu as libc::c_int;
    // SAFETY: req names an interface and carries the MTU, which SIOCSIFMTU reads.
    let ret = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFMTU, &req) };
    check("ioctl(SIOCSIFMTU)", ret.into())?;
    let mut req = ifreq_named(name)?;
    req.ifr_ifru.ifru_addr = sockaddr_v4(addr);
    // SAFETY: req names an interface and carries an AF_INET address.
    let ret = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFADDR, &req) };
    check("ioctl(SIOCSIFADDR)", ret.into())?;
    let mut req = ifreq_named(name)?;
    req.ifr_ifru.ifru_netmask = sockaddr_v4(netmask);
    // SAFETY: as above, with the netmask.
    let ret = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFNETMASK, &req) };
    check("ioctl(SIOCSIFNETMASK)", ret.into())?;
    let mut req = ifreq_named(name)?;
    // SAFETY: req names an interface; SIOCGIFFLAGS fills ifru_flags.
    let ret = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) };
    check("ioctl(SIOCGIFFLAGS)", ret.into())?;
    // SAFETY: the flags member was just written by the kernel.
    unsafe {
        req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
    }
    // SAFETY: as above; SIOCSIFFLAGS reads ifru_flags.
    let ret = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) };
    check("ioctl(SIOCSIFFLAGS)", ret.into()).map(drop)
}

/// The kernel's `struct rtentry` (include/uapi/linux/route.h), which the libc crate does not
/// declare for glibc targets.
#[repr(C)]
struct RtEntry {
    rt_pad1: libc::c_ulong,
    rt_dst: libc::sockaddr,
    rt_gateway: libc::sockaddr,
    rt_genmask: libc::sockaddr,
    rt_flags: libc::c_ushort,
    rt_pad2: libc::c_short,
    rt_pad3: libc::c_ulong,
    rt_pad4: *mut libc::c_void,
    rt_metric: libc::c_short,
    rt_dev: *mut libc::c_char,
    rt_mtu: libc::c_ulong,
    rt_window: libc::c_ulong,
    rt_irtt: libc::c_ushort,
}

/// Adds a default route through interface `name` (no gateway: the interface is
/// point-to-point), in the calling thread's network namespace.
pub fn route_default_via(name: &str) -> Result<()> {
    add_default_route(name, None)
}

/// Adds a default route through `gateway` on interface `name` (an Ethernet link: only the
/// gateway's address is resolved), in the calling thread's network namespace.
pub fn route_default_gateway(name: &str, gateway: std::net::Ipv4Addr) -> Result<()> {
    add_default_route(name, Some(gateway))
}

fn add_default_route(name: &str, gateway: Option<std::net::Ipv4Addr>) -> Result<()> {
    let dev = CString::new(name)
        .map_err(|e| SysError { call: "SIOCADDRT", source: io::Error::other(e) })?;
    // SAFETY: socket takes integers; the result is checked and owned immediately.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(SysError::last("socket"));
    }
    // SAFETY: fd is a fresh descriptor that nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let any = sockaddr_v4(std::net::Ipv4Addr::UNSPECIFIED);
    let mut rt = RtEntry {
        rt_pad1: 0,
        rt_dst: any,
        rt_gateway: gateway.map_or(any, sockaddr_v4),
        rt_genmask: any,
        rt_flags: if gateway.is_some() { libc::RTF_UP | libc::RTF_GATEWAY } else { libc::RTF_UP },
        rt_pad2: 0,
        rt_pad3: 0,
        rt_pad4: std::ptr::null_mut(),
        rt_metric: 0,
        rt_dev: dev.as_ptr().cast_mut(),
        rt_mtu: 0,
        rt_window: 0,
        rt_irtt: 0,
    };
    // SAFETY: rt is a valid rtentry; rt_dev points at a NUL-terminated name that outlives the
    // call; the kernel only reads the structure.
    let ret = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCADDRT, &mut rt) };
    check("ioctl(SIOCADDRT)", ret.into()).map(drop)
}
