//! Counting: each CPU in its own counters, so no atomics are needed.

use core::{hint::cold_path, ptr};

use aya_ebpf::helpers::{bpf_get_smp_processor_id, bpf_map_lookup_elem};
use tidegate_common::stats::{Counter, Counters};

use crate::maps::{COUNTER_ROWS, COUNTERS};

/// The key of the one entry, in read-only data: the inlined lookup loads it
/// from there rather than from a stack slot stored just before.
static KEY: u32 = 0;

/// This CPU's counters: its row, or past the rows its `COUNTERS` entry.
/// The kernel inlines the CPU-number helper into one per-CPU load.
#[inline(always)]
pub fn this_cpu() -> Option<*mut Counters> {
    // SAFETY: takes nothing; returns the number of the CPU running the program.
    if let Some(row) = COUNTER_ROWS.row(unsafe { bpf_get_smp_processor_id() }) {
        return Some(row);
    }
    cold_path();
    // SAFETY: `COUNTERS` is a map definition and `KEY` a `u32`, its key type;
    // the helper returns null or a pointer to this CPU's `Counters`.
    let value = unsafe {
        bpf_map_lookup_elem(
            ptr::from_ref(&COUNTERS).cast_mut().cast(),
            ptr::from_ref(&KEY).cast(),
        )
    };
    (!value.is_null()).then_some(value.cast())
}

/// Adds one frame of `bytes` to `counter`.
#[inline(always)]
pub fn record(counters: *mut Counters, counter: Counter, bytes: usize) {
    // SAFETY: `counters` is this CPU's row or per-CPU entry, and XDP runs
    // with preemption disabled, so nothing else writes it now. `Counter`
    // values are all below the array length.
    unsafe {
        let value = &mut (*counters).by_counter[counter as usize];
        value.packets += 1;
        value.bytes += bytes as u64;
    }
}
