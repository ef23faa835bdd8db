//! The VIP fence (see `tidegate_common::fence`): while the lease has
//! lapsed, ARP requests and neighbour solicitations for a VIP and WireGuard
//! traffic to a VIP are dropped. With no VIPs configured every check here is
//! one load and a branch. WireGuard to a VIP while the lease holds is the
//! director's to steer.

use core::hint::cold_path;

use aya_ebpf::helpers::bpf_jiffies64;
use tidegate_common::{
    fence::{HOLDS_VIPS, MAX_VIPS},
    stats::Counter,
};

use crate::{
    client,
    maps::FENCE,
    parse::{ETH_P_IP, Frame, IPPROTO_ICMPV6},
};

const ARP_REQUEST: u16 = 1;
const ARP_HW_ETHER: u16 = 1;
const NEIGHBOR_SOLICITATION: u8 = 135;

/// An ARP packet for IPv4 over Ethernet.
#[repr(C)]
struct ArpEth {
    htype: [u8; 2],
    ptype: [u8; 2],
    hlen: u8,
    plen: u8,
    oper: [u8; 2],
    sha: [u8; 6],
    spa: [u8; 4],
    tha: [u8; 6],
    tpa: [u8; 4],
}

/// The IPv6 header's next-header byte and destination, then an ICMPv6
/// neighbour solicitation's type and target, by offset from the IPv6 header.
const V6_NEXT_HEADER: usize = 6;
const V6_HEADER_LEN: usize = 40;
const NS_TARGET: usize = 8;

/// True when IPv4 VIPs are configured: ARP frames must then be checked.
#[inline(always)]
pub fn guards_v4() -> bool {
    FENCE.v4_count() != 0
}

/// True when IPv6 VIPs are configured: ICMPv6 must then be checked.
#[inline(always)]
pub fn guards_v6() -> bool {
    FENCE.v6_count() != 0
}

/// WireGuard to `dst_be` (IPv4) that the shield passed: fenced if `dst_be`
/// is a VIP and the lease has lapsed. WireGuard to a VIP while the lease
/// holds goes on to `held` (the director), whose counter is the answer.
#[inline(always)]
pub fn wireguard_v4(
    dst_be: u32,
    counter: Counter,
    held: impl FnOnce(Counter) -> Counter,
) -> Counter {
    if !guards_v4() {
        return counter;
    }
    cold_path();
    if !counter.is_wireguard() || !is_vip_v4(dst_be) {
        return counter;
    }
    if !lease_holds() {
        return Counter::Fenced;
    }
    held(counter)
}

/// As [`wireguard_v4`], for an IPv6 destination.
#[inline(always)]
pub fn wireguard_v6(
    dst: [u64; 2],
    counter: Counter,
    held: impl FnOnce(Counter) -> Counter,
) -> Counter {
    if !guards_v6() {
        return counter;
    }
    cold_path();
    if !counter.is_wireguard() || !is_vip_v6(&dst) {
        return counter;
    }
    if !lease_holds() {
        return Counter::Fenced;
    }
    held(counter)
}

/// An ARP frame at `off`: a request for a VIP is fenced unless this
/// gateway holds the VIPs and its lease holds.
#[inline(always)]
pub fn arp(frame: &Frame, off: usize) -> Counter {
    let Some(arp) = frame.ptr_at::<ArpEth>(off) else {
        return Counter::NotService;
    };
    // SAFETY: checked by `ptr_at`; the fields are byte arrays.
    let (htype, ptype, oper, tpa) =
        unsafe { ((*arp).htype, (*arp).ptype, (*arp).oper, (*arp).tpa) };
    let request = u16::from_be_bytes(htype) == ARP_HW_ETHER
        && u16::from_be_bytes(ptype) == ETH_P_IP
        && u16::from_be_bytes(oper) == ARP_REQUEST;
    if request && is_vip_v4(u32::from_ne_bytes(tpa)) && !answers_for_vips() {
        return Counter::Fenced;
    }
    Counter::NotService
}

/// An IPv6 packet at `off` that is not UDP: a neighbour solicitation for a
/// VIP (ICMPv6 right after the fixed header) is fenced as in [`arp`].
#[inline(always)]
pub fn icmpv6(frame: &Frame, off: usize) -> Counter {
    let Some(next) = frame.ptr_at::<u8>(off + V6_NEXT_HEADER) else {
        return Counter::Unparsed;
    };
    let icmp = off + V6_HEADER_LEN;
    let (Some(kind), Some(target)) = (
        frame.ptr_at::<u8>(icmp),
        frame.ptr_at::<[u8; 16]>(icmp + NS_TARGET),
    ) else {
        return Counter::NotService;
    };
    // SAFETY: all three checked by `ptr_at`; read unaligned.
    let (next, kind, target) = unsafe { (*next, *kind, client::v6_words(target)) };
    if next == IPPROTO_ICMPV6
        && kind == NEIGHBOR_SOLICITATION
        && is_vip_v6(&target)
        && !answers_for_vips()
    {
        return Counter::Fenced;
    }
    Counter::NotService
}

/// The lease holds: the agent renewed it recently enough.
#[inline(always)]
pub fn lease_holds() -> bool {
    // SAFETY: takes nothing; the kernel inlines it into one load of `jiffies`.
    let now = unsafe { bpf_jiffies64() };
    now < FENCE.expires()
}

/// This gateway is the master and its lease holds.
#[inline(always)]
fn answers_for_vips() -> bool {
    FENCE.flags() & HOLDS_VIPS != 0 && lease_holds()
}

#[inline(always)]
fn is_vip_v4(addr_be: u32) -> bool {
    let count = FENCE.v4_count() as usize;
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

/// `addr`: an IPv6 address as [`client::v6_words`] reads it.
#[inline(always)]
fn is_vip_v6(addr: &[u64; 2]) -> bool {
    let count = FENCE.v6_count() as usize;
    let mut i = 0;
    while i < count && i < MAX_VIPS {
        let vip = FENCE.vip_v6_words(i);
        if ((vip[0] ^ addr[0]) | (vip[1] ^ addr[1])) == 0 {
            return true;
        }
        i += 1;
    }
    false
}

/// The renew program's work: the lease from the [`tidegate_common::fence::Renewal`]
/// at the start of the frame, counted from now.
#[inline(always)]
pub fn renew(frame: &Frame) -> bool {
    let Some(renewal) = frame.ptr_at::<tidegate_common::fence::Renewal>(0) else {
        return false;
    };
    // SAFETY: checked by `ptr_at`; read unaligned.
    let renewal = unsafe { renewal.read_unaligned() };
    // SAFETY: takes nothing; returns the kernel's jiffies.
    let now = unsafe { bpf_jiffies64() };
    FENCE.renew(now, renewal.lease_jiffies, renewal.flags);
    true
}
