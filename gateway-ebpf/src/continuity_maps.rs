//! The maps and globals of failover continuity: the egress guard's
//! settings and counters, the clients this gateway owns, the session
//! indices it handed out, and the handover window. Names and sizes come
//! from `tidegate_common::maps`.

use core::{cell::UnsafeCell, ptr};

use aya_ebpf::{
    macros::map,
    maps::{LruHashMap, PerCpuArray},
};
use tidegate_common::{
    client::ClientKey,
    egress::{Egress, EgressCounters, Owned},
    handover::{Handover, OWN_INDICES_LEN},
    maps,
};

/// The egress guard's mode and the WireGuard listen port. User space
/// writes it (`maps::EGRESS`); the programs only read it.
#[unsafe(link_section = ".bss.egress")]
pub static EGRESS: Setting<Egress> = Setting::new(Egress::OFF);

/// The handover window and the flags that tell the XDP program to look at
/// WireGuard frames at all. User space writes it (`maps::HANDOVER`).
#[unsafe(link_section = ".bss.handover")]
pub static HANDOVER: Setting<Handover> = Setting::new(Handover::CLOSED);

/// Per-CPU egress counters: one entry, every `EgressCounter`.
#[map]
pub static EGRESS_COUNTERS: PerCpuArray<EgressCounters> = PerCpuArray::with_max_entries(1, 0);

/// Director mode: the clients this gateway owns. The XDP program adds a
/// client when it passes one of its handshake messages here; user space
/// adds one before it kicks a handshake to it.
#[map]
pub static OWNED: LruHashMap<ClientKey, Owned> = LruHashMap::with_max_entries(maps::OWNED_LEN, 0);

/// Sender indices of the handshake messages this gateway sent (the egress
/// program adds them), valued by the `jiffies` they were seen at.
#[map]
pub static OWN_INDICES: LruHashMap<u32, u64> = LruHashMap::with_max_entries(OWN_INDICES_LEN, 0);

/// A global that user space writes whole and the programs only read, field
/// by field, with volatile loads (nothing in the object stores to it, so
/// the compiler would fold plain reads to the initializer).
#[repr(transparent)]
pub struct Setting<T>(UnsafeCell<T>);

// SAFETY: the programs only read these globals; user space replaces them
// whole through their section's map.
unsafe impl<T> Sync for Setting<T> {}

impl<T> Setting<T> {
    const fn new(value: T) -> Self {
        Self(UnsafeCell::new(value))
    }
}

impl Setting<Egress> {
    /// The `MODE_*` in force.
    #[inline(always)]
    pub fn mode(&self) -> u32 {
        // SAFETY: a field of the global, read whole.
        unsafe { ptr::addr_of!((*self.0.get()).mode).read_volatile() }
    }

    /// The listen port in network order, 0 when the guard is off.
    #[inline(always)]
    pub fn listen_port_be(&self) -> u16 {
        // SAFETY: as in `mode`.
        unsafe { ptr::addr_of!((*self.0.get()).listen_port_be).read_volatile() }
    }
}

impl Setting<Handover> {
    /// `WINDOW | NOTE_OWNERS`, or 0.
    #[inline(always)]
    pub fn flags(&self) -> u32 {
        // SAFETY: a field of the global, read whole.
        unsafe { ptr::addr_of!((*self.0.get()).flags).read_volatile() }
    }

    /// When the window closes, in jiffies.
    #[inline(always)]
    pub fn until(&self) -> u64 {
        // SAFETY: as in `flags`.
        unsafe { ptr::addr_of!((*self.0.get()).until_jiffies).read_volatile() }
    }

    /// Byte `i` (masked into range) of the other gateway's MAC.
    #[inline(always)]
    pub fn peer_mac(&self, i: usize) -> u8 {
        // SAFETY: as in `flags`; `i % 6` is in bounds.
        unsafe { ptr::addr_of!((*self.0.get()).peer_mac[i % 6]).read_volatile() }
    }

    /// Byte `i` (masked into range) of this gateway's MAC.
    #[inline(always)]
    pub fn own_mac(&self, i: usize) -> u8 {
        // SAFETY: as in `flags`; `i % 6` is in bounds.
        unsafe { ptr::addr_of!((*self.0.get()).own_mac[i % 6]).read_volatile() }
    }
}
