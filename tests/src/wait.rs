//! Bounded polling: every wait in the harness has a deadline and a maximum
//! number of attempts, and says what it waited for when it gives up.

use std::time::{Duration, Instant};

use anyhow::{Result, bail};

/// What one attempt of [`poll_until`] found.
#[derive(Debug)]
pub enum Probe<T> {
    /// The condition holds; polling stops with this value.
    Ready(T),
    /// Not yet; the text describes the current state for the timeout message.
    NotYet(String),
}

/// Calls `probe` every `interval` until it returns [`Probe::Ready`], at most
/// `timeout` long (stretched to the machine's speed, see [`crate::pace`])
/// and at most `timeout / interval + 1` times.
///
/// An `Err` from `probe` stops polling at once (a condition that can no
/// longer become true, e.g. the process being waited on has exited). On
/// timeout the error names `what`, the time waited and the last state seen.
pub fn poll_until<T>(
    what: &str,
    timeout: Duration,
    interval: Duration,
    mut probe: impl FnMut() -> Result<Probe<T>>,
) -> Result<T> {
    let interval = interval.max(Duration::from_millis(1));
    let timeout = crate::pace::stretch(timeout);
    let max_attempts = timeout.as_millis() / interval.as_millis() + 1;
    let start = Instant::now();
    let mut last = String::from("never probed");
    let mut attempts = 0_u128;
    while attempts < max_attempts {
        attempts += 1;
        match probe()? {
            Probe::Ready(value) => return Ok(value),
            Probe::NotYet(state) => last = state,
        }
        if start.elapsed() >= timeout {
            break;
        }
        std::thread::sleep(interval);
    }
    bail!(
        "timed out after {:.1?} ({attempts} attempts) waiting for {what}; last state: {last}",
        start.elapsed()
    )
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use anyhow::anyhow;

    use super::*;

    #[test]
    fn returns_the_ready_value() {
        let calls = Cell::new(0);
        let value = poll_until(
            "three calls",
            Duration::from_secs(5),
            Duration::from_millis(1),
            || {
                calls.set(calls.get() + 1);
                Ok(if calls.get() == 3 {
                    Probe::Ready(calls.get() * 10)
                } else {
                    Probe::NotYet(format!("call {}", calls.get()))
                })
            },
        )
        .unwrap();
        assert_eq!(value, 30);
        assert_eq!(calls.get(), 3);
    }

    #[test]
    fn times_out_with_the_last_state() {
        let calls = Cell::new(0_u32);
        let err = poll_until::<()>(
            "something that never happens",
            Duration::from_millis(50),
            Duration::from_millis(10),
            || {
                calls.set(calls.get() + 1);
                Ok(Probe::NotYet(format!(
                    "still nothing after call {}",
                    calls.get()
                )))
            },
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("something that never happens"), "{err}");
        assert!(err.contains(&format!("call {}", calls.get())), "{err}");
        assert!(
            calls.get() <= 6,
            "at most 50/10 + 1 attempts, got {}",
            calls.get()
        );
    }

    #[test]
    fn an_error_stops_polling() {
        let calls = Cell::new(0_u32);
        let err = poll_until::<()>(
            "a dead process",
            Duration::from_secs(5),
            Duration::from_millis(1),
            || {
                calls.set(calls.get() + 1);
                Err(anyhow!("process exited"))
            },
        )
        .unwrap_err();
        assert_eq!(err.to_string(), "process exited");
        assert_eq!(calls.get(), 1);
    }
}
