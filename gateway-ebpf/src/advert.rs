//! The HA advert port's gate: adverts and endpoint-sharing messages pass
//! only with TTL 255 and from a source `ADVERT_SOURCES` names (see
//! `tidegate_common::shield`), before any socket sees them.

use aya_ebpf::{helpers::bpf_ktime_get_ns, maps::lpm_trie::Key};
use tidegate_common::{
    shield::{SOURCE_GATEWAY, SOURCE_SEGMENT},
    stats::Counter,
};

use crate::{
    maps::{ADVERT_SOURCES, SHIELD, STRANGER_BUDGET},
    parse::{Frame, Ipv4Hdr},
};

/// The counter of an IPv4 datagram to the advert port, whose IP header is
/// at `off`.
#[inline(always)]
pub fn check_v4(frame: &Frame, off: usize) -> Counter {
    let Some(ip) = frame.ptr_at::<Ipv4Hdr>(off) else {
        return Counter::Unparsed;
    };
    // SAFETY: checked by `ptr_at`.
    let (ttl, saddr) = unsafe { ((*ip).ttl, (*ip).saddr) };
    if ttl != u8::MAX {
        return Counter::AdvertTtl;
    }
    match ADVERT_SOURCES.get(Key::new(32, saddr)).copied() {
        Some(SOURCE_GATEWAY) => Counter::Advert,
        Some(SOURCE_SEGMENT) => admit_stranger(),
        _ => Counter::AdvertStranger,
    }
}

/// A stranger on the segment: admitted within this CPU's budget.
#[inline(always)]
fn admit_stranger() -> Counter {
    let Some(budget) = STRANGER_BUDGET.get_ptr_mut(0) else {
        return Counter::Aborted;
    };
    // SAFETY: no argument; reads the clock.
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: this CPU's entry of a per-CPU array, which nothing else
    // writes while the program runs on this CPU.
    if unsafe { (*budget).spend(SHIELD.stranger_rate(), now) } {
        Counter::Advert
    } else {
        Counter::AdvertThrottled
    }
}
