//! Stepping the machine's wall clock (`CLOCK_REALTIME`), for tests of what
//! a gateway does after NTP steps it. Every process on the machine sees the
//! step (time namespaces do not virtualise `CLOCK_REALTIME`), so such a
//! test runs only where the machine is its own: inside the kernel suite's
//! VMs, whose runner sets [`STEPPABLE_ENV`]. Those tests are `#[ignore]`d
//! on the host and run with `--include-ignored` in the VMs.

use std::time::Duration;

use anyhow::{Result, bail, ensure};

/// Set (to `1`) where the wall clock may be stepped: the kernel suite's
/// guest sets it (`xtask/src/vm.rs`).
pub const STEPPABLE_ENV: &str = "TIDEGATE_TEST_CLOCK_STEPPABLE";

/// Whether this machine's wall clock may be stepped.
pub fn steppable() -> bool {
    std::env::var(STEPPABLE_ENV).is_ok_and(|v| v == "1")
}

/// The wall clock, stepped by `by_ms` (negative: back) for as long as this
/// lives; on drop it steps by the opposite, so the time that passed in
/// between still counts.
#[derive(Debug)]
pub struct ClockStep {
    by_ms: i64,
}

impl ClockStep {
    /// Steps the clock by `by_ms`. Fails, stepping nothing, unless
    /// [`steppable`].
    pub fn by(by_ms: i64) -> Result<Self> {
        ensure!(
            steppable(),
            "refusing to step this machine's wall clock: {STEPPABLE_ENV} is not 1 (the test \
             runs in the kernel suite's VMs: cargo xtask test-kernels <name>)"
        );
        step(by_ms)?;
        Ok(Self { by_ms })
    }
}

impl Drop for ClockStep {
    fn drop(&mut self) {
        if let Err(error) = step(-self.by_ms) {
            eprintln!(
                "stepping the wall clock back by {} ms: {error:#}",
                self.by_ms
            );
        }
    }
}

/// Steps `CLOCK_REALTIME` by `by_ms`.
fn step(by_ms: i64) -> Result<()> {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into `now`, which lives
    // for the call.
    if unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut now) } != 0 {
        bail!("clock_gettime: {}", std::io::Error::last_os_error());
    }
    let nanos = i128::from(now.tv_sec) * 1_000_000_000
        + i128::from(now.tv_nsec)
        + i128::from(by_ms) * 1_000_000;
    ensure!(nanos > 0, "stepping by {by_ms} ms would go before 1970");
    let target = Duration::from_nanos(u64::try_from(nanos)?);
    let stepped = libc::timespec {
        tv_sec: target.as_secs().try_into()?,
        tv_nsec: target.subsec_nanos().into(),
    };
    // SAFETY: clock_settime reads one timespec from `stepped`, which lives
    // for the call.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &stepped) } != 0 {
        bail!("clock_settime: {}", std::io::Error::last_os_error());
    }
    Ok(())
}
