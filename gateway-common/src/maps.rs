//! Names and capacities of the maps in the BPF object, in one place.
//!
//! The XDP program declares each map under exactly these names; user space
//! looks them up by the same constants, and a test checks each one resolves.

/// Name of the XDP program in the BPF object.
pub const PROGRAM: &str = "tidegate";

/// Per-port bitmask of the service address slots that listen on the port.
pub const SERVICE_PORTS: &str = "SERVICE_PORTS";
/// Entries in [`SERVICE_PORTS`]: one per UDP port.
pub const SERVICE_PORTS_LEN: u32 = 1 << 16;

/// Service addresses, indexed by slot.
pub const SERVICE_ADDRS: &str = "SERVICE_ADDRS";
/// Entries in [`SERVICE_ADDRS`]: one per bit of a port mask.
pub const SERVICE_ADDRS_LEN: u32 = crate::service::MAX_SERVICE_ADDRS;

/// Per-CPU packet and byte counters, indexed by [`crate::stats::Counter`].
pub const COUNTERS: &str = "COUNTERS";
/// Entries in [`COUNTERS`].
pub const COUNTERS_LEN: u32 = crate::stats::Counter::ALL.len() as u32;

/// Every map the object must define, for checks in user space.
pub const ALL: [&str; 3] = [SERVICE_PORTS, SERVICE_ADDRS, COUNTERS];
