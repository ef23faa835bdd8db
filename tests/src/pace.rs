//! How fast the machine under the tests is.
//!
//! On the host the tests run at full speed. The kernel suite's VMs emulate
//! their CPUs (qemu's TCG) and run several times slower; their runner sets
//! [`SLOWDOWN_ENV`]. Every wait of the harness for something to happen (a
//! command to finish, a daemon to answer, a state to be reached) stretches
//! by that factor: such a wait bounds a hang and proves nothing. What a test
//! proves stays the same (no probe lost on a planned failover, a tunnel back
//! well before WireGuard's own 15 s retry); a test may lighten the load it
//! puts on the machine (fewer clients, slower probes) where it is emulated.

use std::time::Duration;

/// How many times slower than the host the machine runs (a whole number,
/// 1 when unset).
pub const SLOWDOWN_ENV: &str = "TIDEGATE_TEST_SLOWDOWN";

/// The factor in [`SLOWDOWN_ENV`], clamped to 1..=20.
pub fn slowdown() -> u32 {
    std::env::var(SLOWDOWN_ENV)
        .ok()
        .and_then(|v| v.trim().parse::<u32>().ok())
        .map_or(1, |v| v.clamp(1, 20))
}

/// Whether the CPUs are emulated (the kernel suite's VMs).
pub fn emulated() -> bool {
    slowdown() > 1
}

/// A wait of `base` on the host, stretched to the machine's speed.
pub fn stretch(base: Duration) -> Duration {
    base * slowdown()
}

/// `host` on the host, `emulated` where the CPUs are emulated: a load a test
/// puts on the machine.
pub fn load<T>(host: T, emulated: T) -> T {
    if self::emulated() { emulated } else { host }
}
