//! The egress guard (see `tidegate_common::egress`): on the public
//! interface's egress, every UDP datagram from the WireGuard listen port
//! leaves from a VIP and only to a client this gateway owns.
//!
//! Reads go through the skb's linear data (pulled in when short); writes go
//! through the store and checksum helpers, which invalidate packet pointers,
//! so everything is read first.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, TC_ACT_OK, TC_ACT_SHOT},
    helpers::{bpf_csum_diff, bpf_jiffies64},
    programs::TcContext,
};
use tidegate_common::{
    client::ClientKey,
    egress::{EgressCounter, MODE_ALLOW, MODE_GRACE, MODE_TABLE},
    fence::MAX_VIPS,
    wireguard::{MESSAGE_INITIATION, MESSAGE_RESPONSE},
};

use crate::{
    client,
    continuity_maps::{EGRESS, EGRESS_COUNTERS, OWN_INDICES, OWNED},
    fence,
    maps::FENCE,
    parse::{self, ETH_P_IP, ETH_P_IPV6, Frame, IPPROTO_UDP},
    udp_wg::UdpWireguard,
};

/// What the guard reads: Ethernet with up to two VLAN tags, IPv6 (the
/// longer header), UDP, and the first twelve bytes of WireGuard.
const PULL_LEN: u32 = 14 + 8 + 40 + 8 + 12;

/// Offsets within the headers.
const V4_CHECK: usize = 10;
const V4_SADDR: usize = 12;
const V4_DADDR: usize = 16;
const V6_SADDR: usize = 8;
const V6_DADDR: usize = 24;
const UDP_CHECK: usize = 6;

/// Checks and fixes one datagram; returns the TC verdict.
#[inline(always)]
pub fn guard(ctx: &TcContext) -> i32 {
    let counter = decide(ctx);
    count(counter, ctx.len());
    if counter.dropped() {
        TC_ACT_SHOT
    } else {
        TC_ACT_OK
    }
}

/// A WireGuard datagram found in the frame.
struct Datagram {
    /// Offset of the IP header.
    ip_off: usize,
    /// Offset of the UDP header.
    udp_off: usize,
    ipv6: bool,
    /// The destination: the client.
    client: ClientKey,
    /// The WireGuard message type.
    kind: u8,
    /// The sender index of a handshake message (as on the wire, read
    /// natively).
    sender_index: u32,
}

#[inline(always)]
fn decide(ctx: &TcContext) -> EgressCounter {
    let port_be = EGRESS.listen_port_be();
    if port_be == 0 {
        return EgressCounter::Other;
    }
    if ctx.data_end() - ctx.data() < PULL_LEN as usize {
        // A datagram with its headers outside the linear data; short frames
        // stay short and are looked at as they are.
        let _ = ctx.pull_data(PULL_LEN.min(ctx.len()));
    }
    let frame = Frame {
        start: ctx.data(),
        end: ctx.data_end(),
    };
    let Some(datagram) = wireguard_datagram(&frame, port_be) else {
        return EgressCounter::Other;
    };
    if let Some(denied) = denied(&datagram) {
        return denied;
    }
    if datagram.kind == MESSAGE_INITIATION || datagram.kind == MESSAGE_RESPONSE {
        // SAFETY: takes nothing; returns the kernel's jiffies.
        let now = unsafe { bpf_jiffies64() };
        // A full map evicts its least recently used entry: cannot fail.
        let _ = OWN_INDICES.insert(datagram.sender_index, now, 0);
    }
    if datagram.ipv6 {
        rewrite_v6(ctx, &datagram)
    } else {
        rewrite_v4(ctx, &datagram)
    }
}

/// The UDP datagram from the listen port (`port_be`, network order) in
/// `frame`, with what the guard needs of it; `None` for anything else.
#[inline(always)]
fn wireguard_datagram(frame: &Frame, port_be: u16) -> Option<Datagram> {
    let (ether_type, ip_off) = parse::ethernet(frame).ok()?;
    let (udp_off, ipv6, client_addr) = match ether_type {
        ETH_P_IP => {
            let version_ihl: u8 = read(frame, ip_off)?;
            let proto: u8 = read(frame, ip_off + 9)?;
            let frag: [u8; 2] = read(frame, ip_off + 6)?;
            let ihl = usize::from(version_ihl & 0x0f);
            // Not first fragments: they carry no UDP header to look at.
            if version_ihl >> 4 != 4
                || ihl < 5
                || proto != IPPROTO_UDP
                || u16::from_be_bytes(frag) & 0x1fff != 0
            {
                return None;
            }
            let daddr: u32 = read(frame, ip_off + V4_DADDR)?;
            (ip_off + ihl * 4, false, client::v4_mapped(daddr))
        }
        ETH_P_IPV6 => {
            let next: u8 = read(frame, ip_off + 6)?;
            // WireGuard sends no extension headers.
            if next != IPPROTO_UDP {
                return None;
            }
            let daddr: [u8; 16] = read(frame, ip_off + V6_DADDR)?;
            (ip_off + 40, true, daddr)
        }
        _ => return None,
    };
    let header = UdpWireguard::at(frame, udp_off)?;
    if UdpWireguard::port(header.sport) != port_be {
        return None;
    }
    Some(Datagram {
        ip_off,
        udp_off,
        ipv6,
        client: ClientKey {
            addr_be: client_addr,
            port_be: UdpWireguard::port(header.dport),
            _pad: 0,
        },
        kind: header.kind,
        sender_index: UdpWireguard::index(header.index_4),
    })
}

/// Why the datagram may not leave, if it may not.
#[inline(always)]
fn denied(datagram: &Datagram) -> Option<EgressCounter> {
    let fenced = FENCE.v4_count() != 0 || FENCE.v6_count() != 0;
    if fenced && !fence::lease_holds() {
        return Some(EgressCounter::DeniedFenced);
    }
    match EGRESS.mode() {
        MODE_ALLOW => None,
        MODE_TABLE => OWNED
            .get_ptr(datagram.client)
            .is_none()
            .then_some(EgressCounter::DeniedNotOwned),
        MODE_GRACE => (datagram.kind == MESSAGE_INITIATION).then_some(EgressCounter::DeniedGrace),
        _ => Some(EgressCounter::DeniedBackup),
    }
}

/// An IPv4 datagram: a source that is not a VIP becomes the first VIP.
#[inline(always)]
fn rewrite_v4(ctx: &TcContext, datagram: &Datagram) -> EgressCounter {
    let count = FENCE.v4_count() as usize;
    let Ok(saddr) = ctx.load::<u32>(datagram.ip_off + V4_SADDR) else {
        return EgressCounter::Failed;
    };
    if count == 0 || is_vip_v4(saddr, count) {
        return EgressCounter::Allowed;
    }
    let vip = FENCE.vip_v4(0);
    let udp_check = datagram.udp_off + UDP_CHECK;
    let flags = u64::from(BPF_F_PSEUDO_HDR | BPF_F_MARK_MANGLED_0) | 4;
    let rewritten = ctx
        .l4_csum_replace(udp_check, u64::from(saddr), u64::from(vip), flags)
        .and_then(|()| {
            ctx.l3_csum_replace(
                datagram.ip_off + V4_CHECK,
                u64::from(saddr),
                u64::from(vip),
                4,
            )
        })
        .and_then(|()| ctx.store(datagram.ip_off + V4_SADDR, &vip, 0));
    match rewritten {
        Ok(()) => EgressCounter::Rewritten,
        Err(_) => EgressCounter::Failed,
    }
}

/// An IPv6 datagram: a source that is not a VIP becomes the first VIP.
#[inline(always)]
fn rewrite_v6(ctx: &TcContext, datagram: &Datagram) -> EgressCounter {
    let count = FENCE.v6_count() as usize;
    let Ok(mut saddr) = ctx.load::<[u32; 4]>(datagram.ip_off + V6_SADDR) else {
        return EgressCounter::Failed;
    };
    if count == 0 || is_vip_v6(&saddr, count) {
        return EgressCounter::Allowed;
    }
    let mut vip = FENCE.vip_v6(0);
    // SAFETY: both buffers are 16-byte stack arrays, as the sizes say.
    let diff = unsafe { bpf_csum_diff(saddr.as_mut_ptr(), 16, vip.as_mut_ptr(), 16, 0) };
    if diff < 0 {
        return EgressCounter::Failed;
    }
    let udp_check = datagram.udp_off + UDP_CHECK;
    // Size 0: `to` is a checksum difference, not a value.
    let flags = u64::from(BPF_F_PSEUDO_HDR | BPF_F_MARK_MANGLED_0);
    let rewritten = ctx
        .l4_csum_replace(udp_check, 0, diff as u64, flags)
        .and_then(|()| ctx.store(datagram.ip_off + V6_SADDR, &vip, 0));
    match rewritten {
        Ok(()) => EgressCounter::Rewritten,
        Err(_) => EgressCounter::Failed,
    }
}

#[inline(always)]
fn is_vip_v4(addr_be: u32, count: usize) -> bool {
    let mut i = 0;
    // The `MAX_VIPS` bound gives the verifier a loop it can prove ends.
    while i < count && i < MAX_VIPS {
        if FENCE.vip_v4(i) == addr_be {
            return true;
        }
        i += 1;
    }
    false
}

#[inline(always)]
fn is_vip_v6(addr: &[u32; 4], count: usize) -> bool {
    let mut i = 0;
    while i < count && i < MAX_VIPS {
        let vip = FENCE.vip_v6(i);
        if ((vip[0] ^ addr[0]) | (vip[1] ^ addr[1]) | (vip[2] ^ addr[2]) | (vip[3] ^ addr[3])) == 0
        {
            return true;
        }
        i += 1;
    }
    false
}

/// The `T` at `offset` in the frame, if it lies inside.
#[inline(always)]
fn read<T: Copy>(frame: &Frame, offset: usize) -> Option<T> {
    let ptr = frame.ptr_at::<T>(offset)?;
    // SAFETY: checked by `ptr_at`; read unaligned.
    Some(unsafe { ptr.read_unaligned() })
}

/// Adds one datagram of `bytes` to `counter` on this CPU.
#[inline(always)]
fn count(counter: EgressCounter, bytes: u32) {
    if let Some(counters) = EGRESS_COUNTERS.get_ptr_mut(0) {
        // SAFETY: this CPU's entry of a per-CPU array; TC programs run with
        // preemption disabled, so nothing else writes it now. Counter
        // values are all below the array length.
        unsafe {
            let value = &mut (*counters).by_counter[counter as usize];
            value.packets += 1;
            value.bytes += u64::from(bytes);
        }
    }
}
