//! The Ethernet side of a VM's NIC, in front of the IP stack ([`crate::stack`]).
//!
//! A microVM's virtio-net device speaks Ethernet frames (QEMU relays one frame per message on
//! a `SOCK_SEQPACKET` socket), while the stack speaks IP packets, as on a TUN. This adapter sits
//! between them with a fixed pair of addresses: the guest's NIC is [`GUEST_MAC`] (set on the
//! VMM's command line) and everything beyond it is [`GATEWAY_MAC`]. So there is nothing to
//! learn: frames from the guest lose their header, IPv4 packets to the guest get one, and the
//! guest's ARP requests are answered with the gateway's MAC for every address but its own (all
//! its traffic goes to our stack, which decides). Everything else a guest kernel sends on a
//! link (IPv6 neighbour discovery, LLDP, frames for other MACs) is dropped: the stack routes
//! IPv4 only, as for the jail.

use std::net::Ipv4Addr;

use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, EthernetAddress, EthernetFrame, EthernetProtocol,
    EthernetRepr, Ipv4Address,
};

/// The guest NIC's MAC (locally administered, unicast).
pub const GUEST_MAC: [u8; 6] = [0x02, 0x52, 0x46, 0x00, 0x00, 0x02];
/// The MAC the guest sees for its gateway, and so for every host it talks to.
pub const GATEWAY_MAC: [u8; 6] = [0x02, 0x52, 0x46, 0x00, 0x00, 0x01];
/// Ethernet's header, which the IP packets travel in.
pub const HEADER_LEN: usize = smoltcp::wire::ETHERNET_HEADER_LEN;
/// The guest NIC's MTU: the largest IP packet whose frame still fits the 64 KiB message the
/// stack reads (large packets mean fewer of them per byte; under TCG each one costs the
/// guest's driver and QEMU's device model a round).
pub const MTU: u32 = 65535 - HEADER_LEN as u32;

/// What to do with one frame from the guest.
#[derive(Debug, PartialEq, Eq)]
pub enum Inbound<'a> {
    /// An IPv4 packet for the stack.
    Packet(&'a [u8]),
    /// A frame to send straight back (the answer to an ARP request).
    Answer(Vec<u8>),
    /// Nothing for us.
    Drop,
}

/// Classifies a frame from the guest whose own address is `guest_ip`.
pub fn inbound(frame: &[u8], guest_ip: Ipv4Addr) -> Inbound<'_> {
    let Ok(f) = EthernetFrame::new_checked(frame) else { return Inbound::Drop };
    let to_us = f.dst_addr() == EthernetAddress(GATEWAY_MAC) || f.dst_addr().is_broadcast();
    if !to_us {
        return Inbound::Drop;
    }
    match f.ethertype() {
        EthernetProtocol::Ipv4 => Inbound::Packet(f.payload()),
        EthernetProtocol::Arp => {
            arp_answer(f.payload(), guest_ip).map_or(Inbound::Drop, Inbound::Answer)
        }
        _ => Inbound::Drop,
    }
}

/// The reply to an ARP request for any address but the guest's own (which the guest asks
/// about to detect duplicates: nobody else has it).
fn arp_answer(payload: &[u8], guest_ip: Ipv4Addr) -> Option<Vec<u8>> {
    let p = ArpPacket::new_checked(payload).ok()?;
    let ArpRepr::EthernetIpv4 {
        operation: ArpOperation::Request,
        source_hardware_addr,
        source_protocol_addr,
        target_protocol_addr,
        ..
    } = ArpRepr::parse(&p).ok()?
    else {
        return None;
    };
    if target_protocol_addr == guest_ip || target_protocol_addr == Ipv4Address::UNSPECIFIED {
        return None;
    }
    let reply = ArpRepr::EthernetIpv4 {
        operation: ArpOperation::Reply,
        source_hardware_addr: EthernetAddress(GATEWAY_MAC),
        source_protocol_addr: target_protocol_addr,
        target_hardware_addr: source_hardware_addr,
        target_protocol_addr: source_protocol_addr,
    };
    let mut out = vec![0u8; HEADER_LEN + reply.buffer_len()];
    let mut frame = EthernetFrame::new_unchecked(&mut out[..]);
    EthernetRepr {
        src_addr: EthernetAddress(GATEWAY_MAC),
        dst_addr: source_hardware_addr,
        ethertype: EthernetProtocol::Arp,
    }
    .emit(&mut frame);
    reply.emit(&mut ArpPacket::new_unchecked(frame.payload_mut()));
    Some(out)
}

/// An IPv4 packet from the stack as a frame to the guest.
pub fn outbound(packet: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; HEADER_LEN + packet.len()];
    let mut frame = EthernetFrame::new_unchecked(&mut out[..]);
    EthernetRepr {
        src_addr: EthernetAddress(GATEWAY_MAC),
        dst_addr: EthernetAddress(GUEST_MAC),
        ethertype: EthernetProtocol::Ipv4,
    }
    .emit(&mut frame);
    frame.payload_mut().copy_from_slice(packet);
    out
}

/// `aa:bb:...`, as QEMU's `mac=` option and the guest's sysfs write it.
pub fn mac_string(mac: [u8; 6]) -> String {
    mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    const GUEST: Ipv4Addr = Ipv4Addr::new(100, 96, 0, 2);

    fn arp_request(target: Ipv4Addr) -> Vec<u8> {
        let req = ArpRepr::EthernetIpv4 {
            operation: ArpOperation::Request,
            source_hardware_addr: EthernetAddress(GUEST_MAC),
            source_protocol_addr: GUEST,
            target_hardware_addr: EthernetAddress([0; 6]),
            target_protocol_addr: target,
        };
        let mut out = vec![0u8; HEADER_LEN + req.buffer_len()];
        let mut f = EthernetFrame::new_unchecked(&mut out[..]);
        EthernetRepr {
            src_addr: EthernetAddress(GUEST_MAC),
            dst_addr: EthernetAddress::BROADCAST,
            ethertype: EthernetProtocol::Arp,
        }
        .emit(&mut f);
        req.emit(&mut ArpPacket::new_unchecked(f.payload_mut()));
        out
    }

    #[test]
    fn the_gateway_answers_arp_for_others_but_not_for_the_guest() {
        let Inbound::Answer(reply) = inbound(&arp_request(Ipv4Addr::new(100, 96, 0, 1)), GUEST)
        else {
            panic!("no answer");
        };
        let f = EthernetFrame::new_checked(&reply[..]).unwrap();
        assert_eq!(f.dst_addr(), EthernetAddress(GUEST_MAC));
        assert_eq!(f.src_addr(), EthernetAddress(GATEWAY_MAC));
        let ArpRepr::EthernetIpv4 {
            operation,
            source_hardware_addr,
            source_protocol_addr,
            target_protocol_addr,
            ..
        } = ArpRepr::parse(&ArpPacket::new_checked(f.payload()).unwrap()).unwrap()
        else {
            panic!()
        };
        assert_eq!(operation, ArpOperation::Reply);
        assert_eq!(source_hardware_addr, EthernetAddress(GATEWAY_MAC));
        assert_eq!(source_protocol_addr, Ipv4Addr::new(100, 96, 0, 1));
        assert_eq!(target_protocol_addr, GUEST);
        // Duplicate address detection: nobody else has the guest's address.
        assert_eq!(inbound(&arp_request(GUEST), GUEST), Inbound::Drop);
    }

    #[test]
    fn ip_packets_lose_and_gain_their_header_and_the_rest_is_dropped() {
        let packet = [0x45u8, 0, 0, 20, 1, 2, 3, 4, 64, 6, 0, 0, 100, 96, 0, 2, 1, 1, 1, 1];
        let frame = outbound(&packet);
        assert_eq!(frame.len(), HEADER_LEN + packet.len());
        assert_eq!(&frame[0..6], &GUEST_MAC);
        // The guest's frames come addressed to the gateway: the same bytes, other way round.
        let mut from_guest = frame;
        from_guest[0..6].copy_from_slice(&GATEWAY_MAC);
        from_guest[6..12].copy_from_slice(&GUEST_MAC);
        assert_eq!(inbound(&from_guest, GUEST), Inbound::Packet(&packet[..]));
        // Another MAC's frame, IPv6, and a runt are not ours.
        let mut other = from_guest.clone();
        other[0..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 9]);
        assert_eq!(inbound(&other, GUEST), Inbound::Drop);
        let mut v6 = from_guest.clone();
        v6[12..14].copy_from_slice(&[0x86, 0xdd]);
        assert_eq!(inbound(&v6, GUEST), Inbound::Drop);
        assert_eq!(inbound(&[0u8; 5], GUEST), Inbound::Drop);
        assert_eq!(mac_string(GUEST_MAC), "02:52:46:00:00:02");
    }
}
