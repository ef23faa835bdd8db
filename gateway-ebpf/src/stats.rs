//! Counting: one per-CPU slot per outcome, so no atomics are needed.

use tidegate_common::stats::Counter;

use crate::maps::COUNTERS;

/// Adds one frame of `bytes` to `counter`. False only if the map lookup
/// fails, which for an in-range array index it cannot.
#[inline(always)]
pub fn record(counter: Counter, bytes: usize) -> bool {
    match COUNTERS.get_ptr_mut(counter as u32) {
        Some(value) => {
            // SAFETY: the pointer is this CPU's slot of a per-CPU array, and
            // XDP runs with preemption disabled, so nothing else writes it now.
            unsafe {
                (*value).packets += 1;
                (*value).bytes += bytes as u64;
            }
            true
        }
        None => false,
    }
}
