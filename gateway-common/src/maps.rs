//! Names and capacities of the maps in the BPF object, in one place.
//!
//! The XDP program declares each map under exactly these names; user space
//! looks them up by the same constants, and a test checks each one resolves.

/// Name of the XDP program in the BPF object.
pub const PROGRAM: &str = "tidegate";

/// Name of the program that renews the fence's lease (run through
/// `BPF_PROG_TEST_RUN`, never attached).
pub const RENEW_PROGRAM: &str = "tidegate_renew";

/// The VIP fence: the program's `FENCE` global, a [`crate::fence::Fence`],
/// alone in this section (a one-entry array map, as [`SERVICE_PORTS`]).
pub const FENCE: &str = ".bss.fence";

/// Per-port service addresses: the program's `SERVICE_PORTS` global, a
/// [`crate::service::PortTable`], alone in this section. The loader makes the
/// section a one-entry array map of this name, whose one value is the table.
pub const SERVICE_PORTS: &str = ".bss.ports";

/// IPv4 service addresses, indexed by slot.
pub const SERVICE_V4: &str = "SERVICE_V4";
/// IPv6 service addresses, indexed by slot.
pub const SERVICE_V6: &str = "SERVICE_V6";
/// Entries in [`SERVICE_V4`] and [`SERVICE_V6`]: one per bit of a mask.
/// They hold every service address; a port's first ones are also inline in
/// its [`SERVICE_PORTS`] entry.
pub const SERVICE_ADDRS_LEN: u32 = crate::service::MAX_SERVICE_ADDRS;

/// Packet and byte counters of CPUs below [`crate::stats::COUNTER_ROWS`]:
/// the program's `COUNTER_ROWS` global, a [`crate::stats::CounterRows`],
/// alone in this section (a one-entry array map, as [`SERVICE_PORTS`]).
pub const COUNTER_ROWS: &str = ".bss.counters";

/// Per-CPU packet and byte counters of any further CPU: one
/// [`crate::stats::Counters`] entry.
pub const COUNTERS: &str = "COUNTERS";
/// Entries in [`COUNTERS`].
pub const COUNTERS_LEN: u32 = 1;

/// Every map the object must define, for checks in user space.
pub const ALL: [&str; 6] = [
    FENCE,
    SERVICE_PORTS,
    SERVICE_V4,
    SERVICE_V6,
    COUNTER_ROWS,
    COUNTERS,
];
