//! The sandbox's only network interface besides loopback: a TUN device whose other end is a
//! descriptor held by the server.
//!
//! Created from a thread that joined the sandbox's network namespace, so the device never
//! exists in the host's namespace. It is not persistent: when the server closes the descriptor
//! (sandbox end, network teardown, or the server process dying) the kernel removes the device
//! and its route, so nothing can leak.

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::OwnedFd;
use std::path::Path;

/// The device's name inside the sandbox.
pub const IFACE: &str = "eth0";
/// The sandbox's address.
pub const SANDBOX_IP: Ipv4Addr = Ipv4Addr::new(100, 96, 0, 2);
/// The address the sandbox's resolver (ours) answers on; `/etc/resolv.conf` names it.
pub const GATEWAY_IP: Ipv4Addr = Ipv4Addr::new(100, 96, 0, 1);
/// Large packets: fewer of them per byte, and the host side copies whole packets anyway.
pub const MTU: u32 = 65535;

/// Creates and configures the sandbox's TUN device in the network namespace at `netns`
/// (`/proc/<agent pid>/ns/net`), with the namespace's default route through it.
pub fn create(netns: &Path) -> io::Result<OwnedFd> {
    crate::netns::in_netns(netns, || {
        let fd = ringfence_sys::tun_create(IFACE).map_err(sys)?;
        ringfence_sys::iface_up_ipv4(IFACE, SANDBOX_IP, Ipv4Addr::BROADCAST, MTU).map_err(sys)?;
        ringfence_sys::route_default_via(IFACE).map_err(sys)?;
        Ok(fd)
    })
}

fn sys(e: ringfence_sys::SysError) -> io::Error {
    io::Error::new(e.source.kind(), e.to_string())
}
