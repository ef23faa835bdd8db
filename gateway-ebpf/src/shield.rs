//! The shield: is this frame for a service, and if so, is it WireGuard?

use aya_ebpf::programs::XdpContext;
use tidegate_common::{
    service::{MAX_SERVICE_ADDRS, ServiceAddr},
    stats::Counter,
};

use crate::{
    maps::{SERVICE_ADDRS, SERVICE_PORTS},
    parse, wireguard,
};

/// The one counter that describes this frame; its verdict follows from it.
#[inline(always)]
pub fn classify(ctx: &XdpContext) -> Counter {
    let dest = match parse::udp_dest(ctx) {
        Ok(dest) => dest,
        Err(counter) => return counter,
    };
    match is_service(&dest.addr, dest.port) {
        Some(true) => wireguard::check(ctx, dest.udp_off, dest.udp_len),
        Some(false) => Counter::NotService,
        None => Counter::Aborted,
    }
}

/// Whether (`addr`, `port`) is a service. `None` if an array lookup fails,
/// which for in-range indexes it cannot.
#[inline(always)]
fn is_service(addr: &ServiceAddr, port: u16) -> Option<bool> {
    let mut mask = *SERVICE_PORTS.get(u32::from(port))?;
    let mut slot = 0;
    // The slot bound gives the verifier a loop it can prove ends.
    while mask != 0 && slot < MAX_SERVICE_ADDRS {
        if mask & 1 != 0 && same_addr(SERVICE_ADDRS.get(slot)?, addr) {
            return Some(true);
        }
        mask >>= 1;
        slot += 1;
    }
    Some(false)
}

/// Word-wise comparison; a derived `==` on arrays may become a `bcmp` call,
/// which BPF cannot link.
#[inline(always)]
fn same_addr(a: &ServiceAddr, b: &ServiceAddr) -> bool {
    let (a, b) = (a.addr_be, b.addr_be);
    ((a[0] ^ b[0]) | (a[1] ^ b[1]) | (a[2] ^ b[2]) | (a[3] ^ b[3])) == 0
}
