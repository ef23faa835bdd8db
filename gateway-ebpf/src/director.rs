//! The director (see `tidegate_common::director`): on the gateway holding
//! the VIPs, in director mode, WireGuard to a VIP that the shield and the
//! fence let through goes to the gateway its client is pinned to. A pin is
//! made on a client's first frame, from the Maglev table; a pin to a
//! gateway that has gone, or from an earlier term of this director, is made
//! again. Frames for this gateway keep their
//! WireGuard counter and pass to the local stack like any the shield
//! passes; frames for another gateway go back out to it ([`forward`]).
//!
//! Only the `tidegate_director` program steers (user space attaches it in
//! place of `tidegate` while this gateway is the master in director mode);
//! the director is inlined into it whole, since a BPF function call and its
//! return cost about 8 ns here. With the `DIRECTOR` flag off it behaves as
//! `tidegate` does, at the cost of one load and a branch.

use aya_ebpf::helpers::bpf_jiffies64;
use tidegate_common::{
    client::ClientKey,
    director::{Session, client_hash, table_index},
    stats::Counter,
};

use crate::{
    client, forward,
    maps::{BACKEND_COUNTERS, BACKENDS, BackendWord, DIRECTOR, MAGLEV, SESSIONS},
    parse::Frame,
};

/// Offset of the source address in an IPv4 header.
const V4_SADDR: usize = 12;
/// Offset of the source address in an IPv6 header.
const V6_SADDR: usize = 8;

/// WireGuard that the shield and the fence passed, from the IPv4 client
/// whose IP header is at `ip_off` and UDP header at `udp_off`, to a VIP:
/// `counter` to pass it locally, or [`Counter::Steered`] once it is
/// rewritten for `XDP_TX`.
#[inline(always)]
pub fn steer_v4(frame: &Frame, ip_off: usize, udp_off: usize, counter: Counter) -> Counter {
    if !DIRECTOR.is_on() {
        return counter;
    }
    steer_v4_on(frame, ip_off + V4_SADDR, udp_off, counter)
}

/// As [`steer_v4`], for an IPv6 client.
#[inline(always)]
pub fn steer_v6(frame: &Frame, ip_off: usize, udp_off: usize, counter: Counter) -> Counter {
    if !DIRECTOR.is_on() {
        return counter;
    }
    steer_v6_on(frame, ip_off + V6_SADDR, udp_off, counter)
}

/// A key on the stack, 8-aligned: the compiler writes it with word stores,
/// and the verifier refuses a misaligned stack access.
#[repr(C, align(8))]
struct Key(ClientKey);

#[inline(always)]
fn steer_v4_on(frame: &Frame, saddr_off: usize, udp_off: usize, counter: Counter) -> Counter {
    let (Some(saddr), Some(sport)) = (
        frame.ptr_at::<[u8; 4]>(saddr_off),
        frame.ptr_at::<u16>(udp_off),
    ) else {
        return counter;
    };
    // SAFETY: both checked by `ptr_at`; read unaligned.
    let key = unsafe {
        Key(ClientKey {
            addr_be: client::v4_mapped(saddr.cast::<u32>().read_unaligned()),
            port_be: sport.read_unaligned(),
            _pad: 0,
        })
    };
    steer(frame, &key.0, counter)
}

#[inline(always)]
fn steer_v6_on(frame: &Frame, saddr_off: usize, udp_off: usize, counter: Counter) -> Counter {
    let (Some(saddr), Some(sport)) = (
        frame.ptr_at::<[u8; 16]>(saddr_off),
        frame.ptr_at::<u16>(udp_off),
    ) else {
        return counter;
    };
    // SAFETY: both checked by `ptr_at`; read unaligned.
    let key = unsafe {
        Key(ClientKey {
            addr_be: client::v6_bytes(client::v6_words(saddr)),
            port_be: sport.read_unaligned(),
            _pad: 0,
        })
    };
    steer(frame, &key.0, counter)
}

/// Finds or makes the client's pin and delivers the frame to its backend.
#[inline(always)]
fn steer(frame: &Frame, key: &ClientKey, counter: Counter) -> Counter {
    // The clock and the term are read after the lookup, not kept across it:
    // the lookup call would make the compiler spill them to the stack.
    if let Some(session) = SESSIONS.get_ptr_mut(key) {
        let generation = DIRECTOR.generation();
        // SAFETY: takes nothing; the kernel inlines it into one load of
        // `jiffies`.
        let now = unsafe { bpf_jiffies64() };
        // SAFETY: a value of the LRU map, valid while the program runs; a
        // pin is plain words, so a concurrent writer on another CPU leaves
        // each of them either old or new.
        unsafe {
            let slot = (*session).backend;
            let backend = BACKENDS.get(slot);
            if backend.present() && (*session).generation == generation {
                // Written only when it changed (once per tick at most), so a
                // busy client does not bounce the cache line between CPUs.
                if (*session).last_seen_jiffies != now {
                    (*session).last_seen_jiffies = now;
                }
                return deliver(frame, slot, backend, counter, false);
            }
            // Pinned to a gateway that has gone, or in an earlier term:
            // pin again.
            let Some((slot, backend)) = pick(key) else {
                return unpinned(frame, counter);
            };
            (*session).backend = slot;
            (*session).generation = generation;
            (*session).last_seen_jiffies = now;
            return deliver(frame, slot, backend, counter, true);
        }
    }
    let Some((slot, backend)) = pick(key) else {
        return unpinned(frame, counter);
    };
    let session = Session {
        // SAFETY: as above.
        last_seen_jiffies: unsafe { bpf_jiffies64() },
        backend: slot,
        generation: DIRECTOR.generation(),
    };
    // The only map update the director makes, once per new client. If it
    // fails the client stays unpinned and its next frame tries again; the
    // pick is the same.
    let _ = SESSIONS.insert(key, session, 0);
    deliver(frame, slot, backend, counter, true)
}

/// The backend the Maglev table names for `key`, if it takes new clients.
#[inline(always)]
fn pick(key: &ClientKey) -> Option<(u32, BackendWord)> {
    let index = table_index(client_hash(key), DIRECTOR.table_size());
    let slot = MAGLEV.slot(index);
    if slot == 0 {
        return None;
    }
    let backend = BACKENDS.get(slot);
    backend.takes_new().then_some((slot, backend))
}

/// Counts the frame for backend `slot` and sends it there.
#[inline(always)]
fn deliver(
    frame: &Frame,
    slot: u32,
    backend: BackendWord,
    counter: Counter,
    new_pin: bool,
) -> Counter {
    count(slot, frame.len(), new_pin);
    if backend.local() {
        return counter;
    }
    if forward::to_gateway(frame, backend.mac(), DIRECTOR.mac()) {
        Counter::Steered
    } else {
        Counter::Aborted
    }
}

/// No backend could be picked (an empty table, or one that names a gateway
/// that has just gone): this gateway serves the client, without a pin.
#[inline(always)]
fn unpinned(frame: &Frame, counter: Counter) -> Counter {
    count(0, frame.len(), false);
    counter
}

#[inline(always)]
fn count(slot: u32, bytes: usize, new_pin: bool) {
    let Some(counters) = BACKEND_COUNTERS.get_ptr_mut(slot) else {
        return;
    };
    // SAFETY: this CPU's entry of a per-CPU map; XDP runs with preemption
    // disabled, so nothing else writes it now.
    unsafe {
        (*counters).packets += 1;
        (*counters).bytes += bytes as u64;
        if new_pin {
            (*counters).new_pins += 1;
        }
    }
}
