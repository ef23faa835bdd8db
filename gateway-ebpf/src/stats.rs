//! Counting: one per-CPU entry holding every counter, so no atomics are needed.

use tidegate_common::stats::{Counter, Counters};

use crate::maps::COUNTERS;

/// This CPU's counters. Looked up before parsing, with a constant key, so
/// the lookup runs alongside the parse instead of after it.
#[inline(always)]
pub fn this_cpu() -> Option<*mut Counters> {
    COUNTERS.get_ptr_mut(0)
}

/// Adds one frame of `bytes` to `counter`.
#[inline(always)]
pub fn record(counters: *mut Counters, counter: Counter, bytes: usize) {
    // SAFETY: `counters` is this CPU's entry of a per-CPU array, and XDP runs
    // with preemption disabled, so nothing else writes it now. `Counter`
    // values are all below the array length.
    unsafe {
        let value = &mut (*counters).by_counter[counter as usize];
        value.packets += 1;
        value.bytes += bytes as u64;
    }
}
