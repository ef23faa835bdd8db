//! Every map of the program. Names and sizes come from `tidegate_common::maps`.

use aya_ebpf::{
    macros::map,
    maps::{Array, PerCpuArray},
};
use tidegate_common::{maps, service::ServiceAddr, stats::CounterValue};

/// Bit `i` of entry `port` is set when service address slot `i` listens on
/// UDP `port` (host byte order index). Zero for every other port.
#[map]
pub static SERVICE_PORTS: Array<u32> = Array::with_max_entries(maps::SERVICE_PORTS_LEN, 0);

/// Service addresses by slot; IPv4 addresses are mapped into IPv6.
#[map]
pub static SERVICE_ADDRS: Array<ServiceAddr> = Array::with_max_entries(maps::SERVICE_ADDRS_LEN, 0);

/// Packets and bytes per outcome, per CPU, indexed by `Counter`.
#[map]
pub static COUNTERS: PerCpuArray<CounterValue> =
    PerCpuArray::with_max_entries(maps::COUNTERS_LEN, 0);
