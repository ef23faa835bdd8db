//! The shield: is this frame for a service, and if so, is it WireGuard?
//! (And, with VIPs configured, does the VIP fence stop it, and does the
//! director steer it?)

use tidegate_common::{
    service::{MAX_SERVICE_ADDRS, PORT_ADVERTS},
    stats::Counter,
};

use crate::{
    advert, client, director, fence,
    maps::{SERVICE_PORTS, SERVICE_V4, SERVICE_V6, SHIELD},
    parse::{self, ETH_P_ARP, ETH_P_IP, ETH_P_IPV6, Frame},
    wireguard,
};

/// The one counter that describes this frame; its verdict follows from it.
/// With `STEER`, WireGuard to a VIP goes on to the director.
#[inline(always)]
pub fn classify<const STEER: bool>(frame: &Frame) -> Counter {
    let (ether_type, off) = match parse::ethernet(frame) {
        Ok(l3) => l3,
        Err(counter) => return counter,
    };
    match ether_type {
        ETH_P_IP => match parse::ipv4_udp(frame, off) {
            Ok(udp) => match is_v4_service(udp.dst, udp.port) {
                Some(true) => fence::wireguard_v4(
                    udp.dst,
                    wireguard::check(frame, udp.udp_off, udp.udp_len),
                    |counter| {
                        if STEER {
                            director::steer_v4(frame, off, udp.udp_off, counter)
                        } else {
                            counter
                        }
                    },
                ),
                Some(false) if SERVICE_PORTS.entry(udp.port).flags() & PORT_ADVERTS != 0 => {
                    advert::check_v4(frame, off)
                }
                Some(false) => Counter::NotService,
                None => Counter::Aborted,
            },
            Err(Counter::Fragment) => {
                fragment(parse::ipv4_dst(frame, off).and_then(is_v4_service_addr))
            }
            Err(counter) => counter,
        },
        ETH_P_IPV6 => match parse::ipv6_udp(frame, off) {
            Ok(udp) => match is_v6_service(udp.dst, udp.port) {
                Some(true) => {
                    let counter = wireguard::check(frame, udp.udp_off, udp.udp_len);
                    // SAFETY: `ipv6_udp` checked the address lies inside the frame.
                    fence::wireguard_v6(
                        unsafe { client::v6_words(udp.dst.cast()) },
                        counter,
                        |counter| {
                            if STEER {
                                director::steer_v6(frame, off, udp.udp_off, counter)
                            } else {
                                counter
                            }
                        },
                    )
                }
                Some(false) => Counter::NotService,
                None => Counter::Aborted,
            },
            Err(Counter::NotService) if fence::guards_v6() => fence::icmpv6(frame, off),
            Err(Counter::Fragment) => {
                fragment(parse::ipv6_dst(frame, off).and_then(is_v6_service_addr))
            }
            Err(Counter::DeepHeaders) => {
                match parse::ipv6_dst(frame, off).and_then(is_v6_service_addr) {
                    Some(true) => Counter::DeepHeaders,
                    Some(false) => Counter::Unparsed,
                    None => Counter::Aborted,
                }
            }
            Err(counter) => counter,
        },
        ETH_P_ARP if fence::guards_v4() => fence::arp(frame, off),
        _ => Counter::NotService,
    }
}

/// A fragment, to a service address or not (`None`: a lookup that cannot
/// fail failed): dropped or passed as the settings say.
#[inline(always)]
fn fragment(to_service: Option<bool>) -> Counter {
    match to_service {
        Some(true) if SHIELD.drops_fragments() => Counter::FragmentDropped,
        Some(_) => Counter::Fragment,
        None => Counter::Aborted,
    }
}

/// Whether `dst_be` is an IPv4 service address, on any port: every one has
/// a slot. Only fragments ask, so the loop costs the common path nothing.
#[inline(always)]
fn is_v4_service_addr(dst_be: u32) -> Option<bool> {
    if dst_be == 0 {
        return Some(false);
    }
    let mut slot = 0;
    while slot < MAX_SERVICE_ADDRS {
        if *SERVICE_V4.get(slot)? == dst_be {
            return Some(true);
        }
        slot += 1;
    }
    Some(false)
}

/// Whether `dst` is an IPv6 service address, on any port.
#[inline(always)]
fn is_v6_service_addr(dst: [u32; 4]) -> Option<bool> {
    if (dst[0] | dst[1] | dst[2] | dst[3]) == 0 {
        return Some(false);
    }
    let mut slot = 0;
    while slot < MAX_SERVICE_ADDRS {
        if same_v6(&dst, &SERVICE_V6.get(slot)?.addr_be) {
            return Some(true);
        }
        slot += 1;
    }
    Some(false)
}

/// Whether (`dst_be`, `port`) is an IPv4 service. `None` if an array lookup
/// fails, which for in-range indexes it cannot.
#[inline(always)]
fn is_v4_service(dst_be: u32, port: u16) -> Option<bool> {
    let entry = SERVICE_PORTS.entry(port);
    if dst_be != 0 && entry.v4_first_be() == dst_be {
        return Some(true);
    }
    let mut mask = entry.v4_more();
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
    let entry = SERVICE_PORTS.entry(port);
    // SAFETY: `dst` is the address field of an IPv6 header that `ptr_at`
    // checked lies inside the frame.
    let (dst, dst_words) = unsafe {
        (
            dst.read_unaligned(),
            dst.cast::<[u64; 2]>().read_unaligned(),
        )
    };
    let first = entry.v6_first_be();
    if (dst_words[0] | dst_words[1]) != 0
        && ((dst_words[0] ^ first[0]) | (dst_words[1] ^ first[1])) == 0
    {
        return Some(true);
    }
    let mut mask = entry.v6_more();
    let mut slot = 0;
    while mask != 0 && slot < MAX_SERVICE_ADDRS {
        if mask & 1 != 0 && same_v6(&dst, &SERVICE_V6.get(slot)?.addr_be) {
            return Some(true);
        }
        mask >>= 1;
        slot += 1;
    }
    Some(false)
}

/// Word-wise: a derived `==` on arrays may become a `bcmp` call, which BPF cannot link.
#[inline(always)]
fn same_v6(a: &[u32; 4], b: &[u32; 4]) -> bool {
    ((a[0] ^ b[0]) | (a[1] ^ b[1]) | (a[2] ^ b[2]) | (a[3] ^ b[3])) == 0
}
