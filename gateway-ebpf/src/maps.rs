//! Every map of the program. Names and sizes come from `tidegate_common::maps`.
//!
//! The port table and the counter rows, which every packet touches, are
//! globals rather than `#[map]`s: the program finds them at a constant
//! address, with no lookup helper, and the loader turns each one's section
//! into a one-entry array map, which user space reads or writes whole. Each
//! sits alone in a section named as in `tidegate_common::maps` (a
//! `link_section` takes only a literal).

use core::{cell::UnsafeCell, ptr};

use aya_ebpf::{
    macros::map,
    maps::{Array, LpmTrie, LruHashMap, PerCpuArray},
};
use tidegate_common::{
    client::ClientKey,
    director::{
        BACKEND_DRAINING, BACKEND_LOCAL, BACKEND_PRESENT, Backend, BackendCounters, BackendTable,
        DEFAULT_MAX_SESSIONS, DIRECTOR_ON, Director, MAX_BACKENDS, MAX_TABLE_SIZE, MaglevTable,
        Session,
    },
    fence::{Fence, MAX_VIPS},
    maps,
    service::{PORTS, PortEntry, PortTable, ServiceAddrV6, port_index},
    shield::{DROP_FRAGMENTS, MAX_ADVERT_SOURCES, Shield, StrangerBudget},
    stats::{COUNTER_ROWS as ROWS, CounterRow, CounterRows, Counters},
};

/// Indexed by `port_index(port)`: the service addresses on that port, the
/// first of each family inline. All zero for every other port. User space
/// writes it (`maps::SERVICE_PORTS`); the program only reads it.
#[unsafe(link_section = ".bss.ports")]
pub static SERVICE_PORTS: Global<PortTable> = Global::new([PortEntry::EMPTY; PORTS]);

/// The VIP fence: the VIPs (written by user space) and the lease (written
/// by the renew program). The shield only reads it.
#[unsafe(link_section = ".bss.fence")]
pub static FENCE: Global<Fence> = Global::new(Fence::EMPTY);

/// The shield's settings (fragments to a service address dropped or
/// passed). User space writes it; the program only reads it.
#[unsafe(link_section = ".bss.shield")]
pub static SHIELD: Global<Shield> = Global::new(Shield::DEFAULT);

/// Who may send to the HA advert port: IPv4 prefixes (address bytes in
/// network order) to `SOURCE_GATEWAY` or `SOURCE_SEGMENT`. User space
/// writes it; the program only reads it.
#[map]
pub static ADVERT_SOURCES: LpmTrie<[u8; 4], u32> = LpmTrie::with_max_entries(MAX_ADVERT_SOURCES, 0);

/// Per CPU, the budget of datagrams to the advert port from strangers on
/// the segment. Each CPU writes only its own.
#[map]
pub static STRANGER_BUDGET: PerCpuArray<StrangerBudget> = PerCpuArray::with_max_entries(1, 0);

/// IPv4 service addresses by slot, as the word in the IPv4 header.
#[map]
pub static SERVICE_V4: Array<u32> = Array::with_max_entries(maps::SERVICE_ADDRS_LEN, 0);

/// IPv6 service addresses by slot.
#[map]
pub static SERVICE_V6: Array<ServiceAddrV6> = Array::with_max_entries(maps::SERVICE_ADDRS_LEN, 0);

/// Packets and bytes per outcome of CPUs below `COUNTER_ROWS`, a row each,
/// indexed by CPU number. User space reads it (`maps::COUNTER_ROWS`).
#[unsafe(link_section = ".bss.counters")]
pub static COUNTER_ROWS: Global<CounterRows> = Global::new([CounterRow::ZERO; ROWS]);

/// Packets and bytes per outcome of any further CPU, per CPU: one entry
/// holding every counter.
#[map]
pub static COUNTERS: PerCpuArray<Counters> = PerCpuArray::with_max_entries(maps::COUNTERS_LEN, 0);

/// The director's settings: on or off, this gateway's Ethernet address,
/// the Maglev table's size. User space writes it; the program only reads it.
#[unsafe(link_section = ".bss.director")]
pub static DIRECTOR: Global<Director> = Global::new(Director::OFF);

/// The director's backends by slot (gateway id): Ethernet address and
/// flags. User space writes it whole; the program only reads it.
#[unsafe(link_section = ".bss.backends")]
pub static BACKENDS: Global<BackendTable> = Global::new([Backend::ABSENT; MAX_BACKENDS]);

/// The director's Maglev table: a backend slot per entry. User space
/// writes it whole; the program only reads it.
#[unsafe(link_section = ".bss.maglev")]
pub static MAGLEV: Global<MaglevTable> = Global::new([0; MAX_TABLE_SIZE]);

/// The director's pins: client (address, port) to backend slot and when
/// it was last seen. The program inserts a pin on a miss only; user space
/// sets the capacity at load time and reads the pins.
#[map]
pub static SESSIONS: LruHashMap<ClientKey, Session> =
    LruHashMap::with_max_entries(DEFAULT_MAX_SESSIONS, 0);

/// Frames, bytes and new pins per backend slot, per CPU; slot 0 counts
/// frames the director passed locally without a pin.
#[map]
pub static BACKEND_COUNTERS: PerCpuArray<BackendCounters> =
    PerCpuArray::with_max_entries(maps::BACKEND_COUNTERS_LEN, 0);

/// A global shared with user space through its section's map.
#[repr(transparent)]
pub struct Global<T>(UnsafeCell<T>);

// SAFETY: the shield only reads `SERVICE_PORTS` and `FENCE`, field by field,
// as it reads map values that user space updates; the renew program writes
// `FENCE`'s lease fields, each with one store. Of `COUNTER_ROWS` the shield
// writes only the row of the CPU it runs on, which nothing else writes. The
// director only reads `DIRECTOR`, `BACKENDS` and `MAGLEV`, and the shield
// `SHIELD`.
unsafe impl<T> Sync for Global<T> {}

impl<T> Global<T> {
    const fn new(value: T) -> Self {
        Self(UnsafeCell::new(value))
    }
}

impl Global<PortTable> {
    /// The entry of `port` (host byte order).
    #[inline(always)]
    pub fn entry(&self, port: u16) -> Entry {
        // SAFETY: `port_index` is below `PORTS` for every port; only the address is computed.
        Entry(unsafe { ptr::addr_of!((*self.0.get())[port_index(port)]) })
    }
}

impl Global<Shield> {
    /// Whether fragments to a service address are dropped.
    #[inline(always)]
    pub fn drops_fragments(&self) -> bool {
        // SAFETY: a field of the global, read with one load.
        let flags = unsafe { ptr::addr_of!((*self.0.get()).flags).read_volatile() };
        flags & DROP_FRAGMENTS != 0
    }

    /// Datagrams from strangers on the segment admitted per second, per CPU.
    #[inline(always)]
    pub fn stranger_rate(&self) -> u32 {
        // SAFETY: a field of the global, read with one load.
        unsafe { ptr::addr_of!((*self.0.get()).stranger_rate).read_volatile() }
    }
}

impl Global<CounterRows> {
    /// The counters of CPU `cpu`, if it has a row.
    #[inline(always)]
    pub fn row(&self, cpu: u32) -> Option<*mut Counters> {
        let row = cpu as usize;
        // SAFETY: `row` is in bounds; only the address is computed.
        (row < ROWS).then(|| unsafe { ptr::addr_of_mut!((*self.0.get())[row].counters) })
    }
}

/// Fields are read with volatile loads: nothing in the shield stores to
/// them, so the compiler would fold plain reads to the initializer.
impl Global<Fence> {
    /// IPv4 VIPs in use.
    #[inline(always)]
    pub fn v4_count(&self) -> u32 {
        // SAFETY: a field of `FENCE`, read whole.
        unsafe { ptr::addr_of!((*self.0.get()).v4_count).read_volatile() }
    }

    /// IPv6 VIPs in use.
    #[inline(always)]
    pub fn v6_count(&self) -> u32 {
        // SAFETY: as in `v4_count`.
        unsafe { ptr::addr_of!((*self.0.get()).v6_count).read_volatile() }
    }

    /// IPv4 VIP `i`; the index is masked into the array.
    #[inline(always)]
    pub fn vip_v4(&self, i: usize) -> u32 {
        // SAFETY: as in `v4_count`; `i % MAX_VIPS` is in bounds.
        unsafe { ptr::addr_of!((*self.0.get()).vip_v4_be[i % MAX_VIPS]).read_volatile() }
    }

    /// IPv6 VIP `i`; the index is masked into the array.
    #[inline(always)]
    pub fn vip_v6(&self, i: usize) -> [u32; 4] {
        // SAFETY: as in `vip_v4`.
        unsafe { ptr::addr_of!((*self.0.get()).vip_v6_be[i % MAX_VIPS]).read_volatile() }
    }

    /// IPv6 VIP `i` as two words, in the order of its bytes: two loads and
    /// two compares where four 32-bit words would take four.
    #[inline(always)]
    pub fn vip_v6_words(&self, i: usize) -> [u64; 2] {
        // SAFETY: as in `vip_v4`; each VIP starts 8-aligned (at byte
        // 96 + 16 i of the 8-aligned `Fence`), and two words and four have
        // the same bytes.
        unsafe {
            let vip = ptr::addr_of!((*self.0.get()).vip_v6_be[i % MAX_VIPS]).cast::<u64>();
            [vip.read_volatile(), vip.add(1).read_volatile()]
        }
    }

    /// When the lease lapses, in jiffies.
    #[inline(always)]
    pub fn expires(&self) -> u64 {
        // SAFETY: as in `v4_count`.
        unsafe { ptr::addr_of!((*self.0.get()).expires_jiffies).read_volatile() }
    }

    /// The flags of the last renewal.
    #[inline(always)]
    pub fn flags(&self) -> u32 {
        // SAFETY: as in `v4_count`.
        unsafe { ptr::addr_of!((*self.0.get()).flags).read_volatile() }
    }

    /// Grants the lease until `now + lease` with `flags`. Only the renew
    /// program calls this.
    #[inline(always)]
    pub fn renew(&self, now: u64, lease: u64, flags: u32) {
        let fence = self.0.get();
        // SAFETY: one store to each field of `FENCE`.
        unsafe {
            ptr::addr_of_mut!((*fence).flags).write_volatile(flags);
            ptr::addr_of_mut!((*fence).renewed_jiffies).write_volatile(now);
            ptr::addr_of_mut!((*fence).expires_jiffies).write_volatile(now + lease);
        }
    }
}

/// Read with volatile loads, as `FENCE` is: the program never stores to
/// them.
impl Global<Director> {
    /// Whether the director steers.
    #[inline(always)]
    pub fn is_on(&self) -> bool {
        // SAFETY: a field of `DIRECTOR`, read whole.
        unsafe { ptr::addr_of!((*self.0.get()).flags).read_volatile() & DIRECTOR_ON != 0 }
    }

    /// This gateway's Ethernet address, in the low six bytes.
    #[inline(always)]
    pub fn mac(&self) -> u64 {
        // SAFETY: the address and its two pad bytes are the first eight
        // bytes of the 8-aligned `DIRECTOR`.
        unsafe { self.0.get().cast::<u64>().read_volatile() }
    }

    /// Entries of the Maglev table in use.
    #[inline(always)]
    pub fn table_size(&self) -> u32 {
        // SAFETY: as in `is_on`.
        unsafe { ptr::addr_of!((*self.0.get()).table_size).read_volatile() }
    }

    /// The director's term.
    #[inline(always)]
    pub fn generation(&self) -> u32 {
        // SAFETY: as in `is_on`.
        unsafe { ptr::addr_of!((*self.0.get()).generation).read_volatile() }
    }
}

impl Global<BackendTable> {
    /// The backend in slot `slot`, as one word: the Ethernet address in the
    /// low six bytes, the flags in the seventh. The slot is masked into the
    /// table.
    #[inline(always)]
    pub fn get(&self, slot: u32) -> BackendWord {
        let slot = slot as usize % MAX_BACKENDS;
        // SAFETY: `slot` is in bounds and each `Backend` is eight bytes,
        // 8-aligned.
        BackendWord(unsafe {
            ptr::addr_of!((*self.0.get())[slot])
                .cast::<u64>()
                .read_volatile()
        })
    }
}

impl Global<MaglevTable> {
    /// The backend slot of table entry `index`, or 0 past the table.
    #[inline(always)]
    pub fn slot(&self, index: u32) -> u32 {
        let index = index as usize;
        if index >= MAX_TABLE_SIZE {
            return 0;
        }
        // SAFETY: `index` is in bounds.
        u32::from(unsafe { ptr::addr_of!((*self.0.get())[index]).read_volatile() })
    }
}

/// A [`Backend`] read as one little-endian word.
#[derive(Clone, Copy)]
pub struct BackendWord(u64);

impl BackendWord {
    const FLAGS_SHIFT: u32 = 48;

    /// The Ethernet address, in the low six bytes.
    #[inline(always)]
    pub fn mac(self) -> u64 {
        self.0
    }

    /// Whether the slot holds a gateway.
    #[inline(always)]
    pub fn present(self) -> bool {
        (self.0 >> Self::FLAGS_SHIFT) as u8 & BACKEND_PRESENT != 0
    }

    /// Whether the gateway takes new clients: present and not draining.
    #[inline(always)]
    pub fn takes_new(self) -> bool {
        (self.0 >> Self::FLAGS_SHIFT) as u8 & (BACKEND_PRESENT | BACKEND_DRAINING)
            == BACKEND_PRESENT
    }

    /// Whether the gateway is this one.
    #[inline(always)]
    pub fn local(self) -> bool {
        (self.0 >> Self::FLAGS_SHIFT) as u8 & BACKEND_LOCAL != 0
    }
}

/// One port's entry. Its fields are read with volatile loads: nothing in the
/// program stores to the table, so the compiler would fold plain reads to the
/// all-zero initializer.
#[derive(Clone, Copy)]
pub struct Entry(*const PortEntry);

impl Entry {
    /// The first IPv4 service address on the port, or 0.
    #[inline(always)]
    pub fn v4_first_be(self) -> u32 {
        // SAFETY: `self.0` points into `SERVICE_PORTS`.
        unsafe { ptr::addr_of!((*self.0).v4_first_be).read_volatile() }
    }

    /// The first IPv6 service address on the port, as two words, or 0s.
    #[inline(always)]
    pub fn v6_first_be(self) -> [u64; 2] {
        let words = self.0.cast::<u64>();
        // SAFETY: `v6_first_be` is the first 16 bytes (offset asserted in
        // `tidegate_common`) of an 8-aligned entry in `SERVICE_PORTS`.
        unsafe { [words.read_volatile(), words.add(1).read_volatile()] }
    }

    /// Slots of further IPv4 service addresses on the port.
    #[inline(always)]
    pub fn v4_more(self) -> u32 {
        // SAFETY: as in `v4_first_be`.
        unsafe { ptr::addr_of!((*self.0).v4_more).read_volatile() }
    }

    /// `PORT_ADVERTS` or 0.
    #[inline(always)]
    pub fn flags(self) -> u32 {
        // SAFETY: as in `v4_first_be`.
        unsafe { ptr::addr_of!((*self.0).flags).read_volatile() }
    }

    /// Slots of further IPv6 service addresses on the port.
    #[inline(always)]
    pub fn v6_more(self) -> u32 {
        // SAFETY: as in `v4_first_be`.
        unsafe { ptr::addr_of!((*self.0).v6_more).read_volatile() }
    }
}
