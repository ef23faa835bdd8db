//! The common frame shapes in straight-line code: untagged Ethernet, then
//! IPv4 without options or IPv6 with UDP right after the fixed header. Every
//! field sits at a constant offset, so one bounds check per family covers
//! all the loads.
//!
//! Whatever this path does not settle (VLAN tags, IPv4 options, IPv6
//! extension headers, short or malformed headers, a port whose service
//! addresses are not all inline) it leaves to [`crate::shield::classify`],
//! which walks the headers in full and gives the same answer on every frame.

use core::hint::cold_path;

use tidegate_common::stats::Counter;

use crate::{
    director, fence,
    maps::SERVICE_PORTS,
    parse::{
        ETH_P_8021AD, ETH_P_8021Q, ETH_P_ARP, ETH_P_IP, ETH_P_IPV6, Frame, IPPROTO_ICMPV6,
        IPPROTO_UDP, IPV6_DEST_OPTIONS, IPV6_FRAGMENT, IPV6_HOP_BY_HOP, IPV6_ROUTING,
    },
    wireguard,
};

/// Ethernet, IP and UDP headers and the WireGuard type word: the bytes the
/// loads below may touch, per family. Shorter frames take the full walk.
const V4_LEN: usize = 14 + 20 + 8 + 4;
const V6_LEN: usize = 14 + 40 + 8 + 4;

/// Offsets from the start of the frame.
const ETHER_TYPE: usize = 12;
const V4_IP: usize = 14;
const V4_PROTO_WORD: usize = 20;
const V4_DADDR: usize = 30;
const V4_UDP: usize = 34;
const V6_IP: usize = 14;
const V6_NEXT_HEADER: usize = 20;
const V6_DADDR: usize = 38;
const V6_UDP: usize = 54;

/// Bytes 12..15 of an untagged IPv4 frame with a 20-byte header, read as a
/// little-endian word, with the type-of-service byte masked off.
const V4_ETHER_TYPE_VERSION_IHL: u32 = u32::from_le_bytes([0x08, 0x00, 0x45, 0]);
const V4_ETHER_TYPE_VERSION_IHL_MASK: u32 = 0x00ff_ffff;
/// Bytes 12..15 of an untagged IPv6 frame, masked to EtherType and version.
const V6_ETHER_TYPE_VERSION: u32 = u32::from_le_bytes([0x86, 0xdd, 0x60, 0]);
const V6_ETHER_TYPE_VERSION_MASK: u32 = 0x00f0_ffff;
/// IPv4 bytes 6..9 (flags and fragment offset, TTL, protocol) as a
/// little-endian word: the protocol must be UDP and the More-fragments flag
/// and fragment offset zero; Don't-fragment and TTL may be anything.
const V4_UDP_UNFRAGMENTED: u32 = u32::from_le_bytes([0, 0, 0, IPPROTO_UDP]);
const V4_PROTO_FRAGMENT_MASK: u32 = u32::from_le_bytes([0x3f, 0xff, 0, 0xff]);

/// The frame's counter, or `None` when the full walk must decide. With
/// `STEER`, WireGuard to a VIP goes on to the director.
#[inline(always)]
pub fn classify<const STEER: bool>(frame: &Frame) -> Option<Counter> {
    let Some(frame) = Holds::<V4_LEN>::new(frame) else {
        cold_path();
        return short(frame);
    };
    let head: u32 = frame.load(ETHER_TYPE);
    if head & V4_ETHER_TYPE_VERSION_IHL_MASK == V4_ETHER_TYPE_VERSION_IHL {
        return ipv4::<STEER>(frame);
    }
    if head & V6_ETHER_TYPE_VERSION_MASK == V6_ETHER_TYPE_VERSION {
        let Some(frame) = Holds::<V6_LEN>::new(frame.0) else {
            cold_path();
            return None;
        };
        return ipv6::<STEER>(frame);
    }
    cold_path();
    other(u16::from_be_bytes((head as u16).to_le_bytes()))
}

#[inline(always)]
fn ipv4<const STEER: bool>(frame: Holds<'_, V4_LEN>) -> Option<Counter> {
    let proto: u32 = frame.load(V4_PROTO_WORD);
    if proto & V4_PROTO_FRAGMENT_MASK != V4_UDP_UNFRAGMENTED {
        cold_path();
        // Protocol first, as the full walk checks them; a fragment is the
        // walk's, which looks up its destination.
        return ((proto >> 24) as u8 != IPPROTO_UDP).then_some(Counter::NotService);
    }
    let dst_be: u32 = frame.load(V4_DADDR);
    let entry = SERVICE_PORTS.entry(udp_dest(frame, V4_UDP));
    if dst_be != entry.v4_first_be() {
        // The advert port's flag sends its datagrams to the walk too.
        if entry.v4_more() | entry.flags() == 0 {
            return Some(Counter::NotService);
        }
        cold_path();
        return None;
    }
    if dst_be == 0 {
        // The zero entry of a port with no IPv4 service.
        cold_path();
        return None;
    }
    let counter = wireguard_check(frame, V4_UDP);
    Some(fence::wireguard_v4(dst_be, counter, |counter| {
        if STEER {
            director::steer_v4(frame.0, V4_IP, V4_UDP, counter)
        } else {
            counter
        }
    }))
}

#[inline(always)]
fn ipv6<const STEER: bool>(frame: Holds<'_, V6_LEN>) -> Option<Counter> {
    let next: u8 = frame.load(V6_NEXT_HEADER);
    if next != IPPROTO_UDP {
        cold_path();
        return match next {
            IPV6_HOP_BY_HOP | IPV6_ROUTING | IPV6_FRAGMENT | IPV6_DEST_OPTIONS => None,
            // Neighbour solicitations for a VIP: the walk checks them.
            IPPROTO_ICMPV6 if fence::guards_v6() => None,
            _ => Some(Counter::NotService),
        };
    }
    let entry = SERVICE_PORTS.entry(udp_dest(frame, V6_UDP));
    let first = entry.v6_first_be();
    let dst_hi: u64 = frame.load(V6_DADDR);
    let dst_lo: u64 = frame.load(V6_DADDR + 8);
    if dst_hi != first[0] || dst_lo != first[1] {
        if entry.v6_more() == 0 {
            return Some(Counter::NotService);
        }
        cold_path();
        return None;
    }
    if dst_hi | dst_lo == 0 {
        // The zero entry of a port with no IPv6 service.
        cold_path();
        return None;
    }
    let counter = wireguard_check(frame, V6_UDP);
    Some(fence::wireguard_v6([dst_hi, dst_lo], counter, |counter| {
        if STEER {
            director::steer_v6(frame.0, V6_IP, V6_UDP, counter)
        } else {
            counter
        }
    }))
}

/// The UDP destination port (host byte order) of the header at `udp_off`.
#[inline(always)]
fn udp_dest<const LEN: usize>(frame: Holds<'_, LEN>, udp_off: usize) -> u16 {
    u16::from_be(frame.load(udp_off + 2))
}

#[inline(always)]
fn wireguard_check<const LEN: usize>(frame: Holds<'_, LEN>, udp_off: usize) -> Counter {
    let udp_len = u16::from_be(frame.load(udp_off + 4));
    let word: u32 = frame.load(udp_off + 8);
    wireguard::classify(usize::from(udp_len), word, frame.0.len() - udp_off)
}

/// A frame too short for the fast path: anything but IP passes at once.
#[inline(always)]
fn short(frame: &Frame) -> Option<Counter> {
    let ether_type = frame.ptr_at::<[u8; 2]>(ETHER_TYPE)?;
    // SAFETY: checked by `ptr_at`; a byte array has no alignment.
    other(u16::from_be_bytes(unsafe { *ether_type }))
}

/// Frames that are neither untagged IPv4 without options nor untagged IPv6:
/// their EtherType says whether to walk them.
#[inline(always)]
fn other(ether_type: u16) -> Option<Counter> {
    match ether_type {
        ETH_P_IP | ETH_P_IPV6 | ETH_P_8021Q | ETH_P_8021AD => None,
        // ARP requests for a VIP: the walk checks them.
        ETH_P_ARP if fence::guards_v4() => None,
        _ => Some(Counter::NotService),
    }
}

/// A frame that holds at least `LEN` bytes.
#[derive(Clone, Copy)]
struct Holds<'a, const LEN: usize>(&'a Frame);

impl<'a, const LEN: usize> Holds<'a, LEN> {
    #[inline(always)]
    fn new(frame: &'a Frame) -> Option<Self> {
        // Compare pointers (not lengths): the form the verifier learns packet bounds from.
        (frame.start + LEN <= frame.end).then_some(Self(frame))
    }

    /// The `T` at `offset`. Offsets here are constants, so the assert
    /// compiles away; a load past `LEN` would fail to build or verify.
    #[inline(always)]
    fn load<T: Copy>(self, offset: usize) -> T {
        assert!(offset + size_of::<T>() <= LEN);
        // SAFETY: inside the frame, which holds `LEN` bytes; unaligned, since
        // headers sit at any byte offset.
        unsafe { ((self.0.start + offset) as *const T).read_unaligned() }
    }
}
