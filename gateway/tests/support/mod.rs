//! Helpers shared by the gateway's integration tests and its benchmark.

pub mod frames;
pub mod harness;

use std::time::Duration;

/// `base` stretched to the machine's speed: the kernel suite's VMs emulate
/// their CPUs and set `TIDEGATE_TEST_SLOWDOWN` (the factor the namespace
/// tests' `tidegate_tests::pace` reads too); 1 elsewhere.
pub fn stretch(base: Duration) -> Duration {
    let factor = std::env::var("TIDEGATE_TEST_SLOWDOWN")
        .ok()
        .and_then(|v| v.trim().parse::<u32>().ok())
        .map_or(1, |v| v.clamp(1, 20));
    base * factor
}
