//! Every map of the program. Names and sizes come from `tidegate_common::maps`.

use aya_ebpf::{
    macros::map,
    maps::{Array, PerCpuArray},
};
use tidegate_common::{
    maps,
    service::{PortEntry, ServiceAddrV6},
    stats::Counters,
};

/// Indexed by UDP port (host byte order): the service addresses on that port,
/// the first of each family inline. All zero for every other port.
#[map]
pub static SERVICE_PORTS: Array<PortEntry> = Array::with_max_entries(maps::SERVICE_PORTS_LEN, 0);

/// IPv4 service addresses by slot, as the word in the IPv4 header.
#[map]
pub static SERVICE_V4: Array<u32> = Array::with_max_entries(maps::SERVICE_ADDRS_LEN, 0);

/// IPv6 service addresses by slot.
#[map]
pub static SERVICE_V6: Array<ServiceAddrV6> = Array::with_max_entries(maps::SERVICE_ADDRS_LEN, 0);

/// Packets and bytes per outcome, per CPU: one entry holding every counter.
#[map]
pub static COUNTERS: PerCpuArray<Counters> = PerCpuArray::with_max_entries(maps::COUNTERS_LEN, 0);
