//! What the XDP program does for failover continuity with a WireGuard frame
//! the shield passed, when user space asked for it (one load of the
//! `HANDOVER` flags otherwise):
//!
//! * the second chance of a planned handover (see
//!   `tidegate_common::handover`): a handshake response, cookie reply or
//!   data message whose receiver index this gateway did not hand out goes
//!   to the other gateway (`forward`, as the director steers);
//! * director mode: the source of a handshake message passed to this
//!   gateway's WireGuard becomes a client it owns (`OWNED`), so the egress
//!   guard lets its answers out.

use core::hint::cold_path;

use aya_ebpf::helpers::bpf_jiffies64;
use tidegate_common::{
    client::ClientKey,
    egress::{OWNED_BY_XDP, Owned},
    handover::{NOTE_OWNERS, WINDOW},
    stats::Counter,
    wireguard::{MESSAGE_COOKIE_REPLY, MESSAGE_INITIATION, MESSAGE_RESPONSE, MESSAGE_TRANSPORT},
};

use crate::{
    continuity_maps::{HANDOVER, OWN_INDICES, OWNED},
    forward,
    parse::{self, ETH_P_IP, ETH_P_IPV6, EthHdr, Frame},
    udp_wg::UdpWireguard,
};

/// The frame's final counter: `counter` as the shield classified it, or
/// [`Counter::HandedOver`] when it goes on to the other gateway (its
/// Ethernet addresses are rewritten then).
#[inline(always)]
pub fn hook(frame: &Frame, counter: Counter) -> Counter {
    if !counter.is_wireguard() {
        return counter;
    }
    let flags = HANDOVER.flags();
    if flags == 0 {
        return counter;
    }
    cold_path();
    look(frame.start, frame.end, flags, counter)
}

/// The slow part, in a function of its own so that the fast path keeps its
/// registers.
#[inline(never)]
fn look(start: usize, end: usize, flags: u32, counter: Counter) -> Counter {
    let frame = Frame { start, end };
    let Some((header, client)) = wireguard_udp(&frame) else {
        return counter;
    };
    let kind = header.kind;
    if flags & NOTE_OWNERS != 0 && (kind == MESSAGE_INITIATION || kind == MESSAGE_RESPONSE) {
        note_owner(&client);
    }
    if flags & WINDOW != 0 && window_open() && hand_on(&frame, &header) {
        return Counter::HandedOver;
    }
    counter
}

/// The UDP and WireGuard header and the source (the client) of a frame
/// the shield classified as WireGuard.
#[inline(always)]
fn wireguard_udp(frame: &Frame) -> Option<(UdpWireguard, ClientKey)> {
    let (ether_type, off) = parse::ethernet(frame).ok()?;
    match ether_type {
        ETH_P_IP => {
            let udp = parse::ipv4_udp(frame, off).ok()?;
            let header = UdpWireguard::at(frame, udp.udp_off)?;
            let saddr: [u8; 4] = read(frame, off + 12)?;
            let client = ClientKey::v4(saddr, UdpWireguard::port(header.sport));
            Some((header, client))
        }
        ETH_P_IPV6 => {
            let udp = parse::ipv6_udp(frame, off).ok()?;
            let header = UdpWireguard::at(frame, udp.udp_off)?;
            let saddr: [u8; 16] = read(frame, off + 8)?;
            let client = ClientKey::v6(saddr, UdpWireguard::port(header.sport));
            Some((header, client))
        }
        _ => None,
    }
}

/// The `T` at `offset`, read as soon as its bounds are checked (the
/// verifier loses a check that the compiler moves away from its load).
#[inline(always)]
fn read<T: Copy>(frame: &Frame, offset: usize) -> Option<T> {
    let ptr = frame.ptr_at::<T>(offset)?;
    // SAFETY: checked by `ptr_at`; read unaligned.
    Some(unsafe { ptr.read_unaligned() })
}

/// Adds `client` to `OWNED` unless it is there already (an update on every
/// handshake would cost more than the lookup).
#[inline(always)]
fn note_owner(client: &ClientKey) {
    if OWNED.get_ptr(client).is_none() {
        let owned = Owned {
            source: OWNED_BY_XDP,
            _pad: 0,
        };
        // A full map evicts its least recently used entry: cannot fail.
        let _ = OWNED.insert(client, owned, 0);
    }
}

#[inline(always)]
fn window_open() -> bool {
    // SAFETY: takes nothing; returns the kernel's jiffies.
    let now = unsafe { bpf_jiffies64() };
    now < HANDOVER.until()
}

/// Sends the frame on to the other gateway if it belongs to a session this
/// gateway did not make; true when it did.
#[inline(always)]
fn hand_on(frame: &Frame, header: &UdpWireguard) -> bool {
    let receiver = match header.kind {
        MESSAGE_RESPONSE => UdpWireguard::index(header.index_8),
        MESSAGE_COOKIE_REPLY | MESSAGE_TRANSPORT => UdpWireguard::index(header.index_4),
        _ => return false,
    };
    if OWN_INDICES.get_ptr(receiver).is_some() {
        return false;
    }
    let Some(eth) = frame.ptr_at::<EthHdr>(0) else {
        return false;
    };
    let mut peer = 0u64;
    let mut own = 0u64;
    // SAFETY: checked by `ptr_at`; read byte by byte: a `[u8; 6]` copy
    // would become a memcpy call.
    unsafe {
        // Never back to where it came from: no loop between the two.
        let mut from_peer = true;
        for i in 0..6 {
            let byte = HANDOVER.peer_mac(i);
            from_peer &= (*eth).src[i] == byte;
            peer |= u64::from(byte) << (8 * i);
            own |= u64::from(HANDOVER.own_mac(i)) << (8 * i);
        }
        if from_peer {
            return false;
        }
    }
    forward::to_gateway(frame, peer, own)
}
