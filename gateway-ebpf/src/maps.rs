//! Every map of the program. Names and sizes come from `tidegate_common::maps`.

use aya_ebpf::{
    macros::map,
    maps::{Array, PerCpuArray},
};
use tidegate_common::{
    maps,
    service::{PortMasks, ServiceAddrV6},
    stats::CounterValue,
};

/// Indexed by UDP port (host byte order): which IPv4 and IPv6 address slots
/// serve it. Zero masks for every other port.
#[map]
pub static SERVICE_PORTS: Array<PortMasks> = Array::with_max_entries(maps::SERVICE_PORTS_LEN, 0);

/// IPv4 service addresses by slot, as the word in the IPv4 header.
#[map]
pub static SERVICE_V4: Array<u32> = Array::with_max_entries(maps::SERVICE_ADDRS_LEN, 0);

/// IPv6 service addresses by slot.
#[map]
pub static SERVICE_V6: Array<ServiceAddrV6> = Array::with_max_entries(maps::SERVICE_ADDRS_LEN, 0);

/// Packets and bytes per outcome, per CPU, indexed by `Counter`.
#[map]
pub static COUNTERS: PerCpuArray<CounterValue> =
    PerCpuArray::with_max_entries(maps::COUNTERS_LEN, 0);
