//! The shield: is this frame for a service, and if so, is it WireGuard?

use aya_ebpf::programs::XdpContext;
use tidegate_common::{service::MAX_SERVICE_ADDRS, stats::Counter};

use crate::{
    maps::{SERVICE_PORTS, SERVICE_V4, SERVICE_V6},
    parse::{self, ETH_P_IP, ETH_P_IPV6},
    wireguard,
};

/// The one counter that describes this frame; its verdict follows from it.
#[inline(always)]
pub fn classify(ctx: &XdpContext) -> Counter {
    let (ether_type, off) = match parse::ethernet(ctx) {
        Ok(l3) => l3,
        Err(counter) => return counter,
    };
    let found = match ether_type {
        ETH_P_IP => parse::ipv4_udp(ctx, off)
            .map(|udp| (is_v4_service(udp.dst, udp.port), udp.udp_off, udp.udp_len)),
        ETH_P_IPV6 => parse::ipv6_udp(ctx, off)
            .map(|udp| (is_v6_service(udp.dst, udp.port), udp.udp_off, udp.udp_len)),
        _ => return Counter::NotService,
    };
    match found {
        Ok((Some(true), udp_off, udp_len)) => wireguard::check(ctx, udp_off, udp_len),
        Ok((Some(false), ..)) => Counter::NotService,
        Ok((None, ..)) => Counter::Aborted,
        Err(counter) => counter,
    }
}

/// Whether (`dst_be`, `port`) is an IPv4 service. `None` if an array lookup
/// fails, which for in-range indexes it cannot.
#[inline(always)]
fn is_v4_service(dst_be: u32, port: u16) -> Option<bool> {
    let mut mask = SERVICE_PORTS.get(u32::from(port))?.v4;
    let mut slot = 0;
    // The slot bound gives the verifier a loop it can prove ends.
    while mask != 0 && slot < MAX_SERVICE_ADDRS {
        if mask & 1 != 0 && *SERVICE_V4.get(slot)? == dst_be {
            return Some(true);
        }
        mask >>= 1;
        slot += 1;
    }
    Some(false)
}

/// Whether (`*dst`, `port`) is an IPv6 service; `dst` points into the frame.
#[inline(always)]
fn is_v6_service(dst: *const [u32; 4], port: u16) -> Option<bool> {
    let mut mask = SERVICE_PORTS.get(u32::from(port))?.v6;
    let mut slot = 0;
    while mask != 0 && slot < MAX_SERVICE_ADDRS {
        if mask & 1 != 0 {
            let want = SERVICE_V6.get(slot)?.addr_be;
            // SAFETY: `dst` is the address field of an IPv6 header that
            // `ptr_at` checked lies inside the frame.
            let got = unsafe { dst.read_unaligned() };
            // Word-wise: a derived `==` on arrays may become a `bcmp` call, which BPF cannot link.
            let diff =
                (got[0] ^ want[0]) | (got[1] ^ want[1]) | (got[2] ^ want[2]) | (got[3] ^ want[3]);
            if diff == 0 {
                return Some(true);
            }
        }
        mask >>= 1;
        slot += 1;
    }
    Some(false)
}
