//! Reconnect backoff: doubling from a minimum to a maximum, with jitter so
//! that links lost together do not all come back at the same instant.

use std::time::Duration;

/// The delays between attempts to reach one peer.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max,
            next: min,
        }
    }

    /// The delay before the next attempt: between half and all of the
    /// current step (`jitter` in 0..1 picks where), then the step doubles.
    pub fn next_delay(&mut self, jitter: f64) -> Duration {
        let step = self.next;
        self.next = (self.next * 2).min(self.max);
        step.mul_f64(0.5 + 0.5 * jitter.clamp(0.0, 1.0))
    }

    /// Back to the minimum, after a link that stayed up.
    pub fn reset(&mut self) {
        self.next = self.min;
    }

    /// A jitter value from the system's random source.
    pub fn random_jitter() -> f64 {
        let bits = u64::from_le_bytes(crate::random::<8>());
        (bits >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_maximum_with_jitter_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(200), Duration::from_secs(1));
        assert_eq!(b.next_delay(1.0), Duration::from_millis(200));
        assert_eq!(b.next_delay(0.0), Duration::from_millis(200));
        assert_eq!(b.next_delay(1.0), Duration::from_millis(800));
        assert_eq!(b.next_delay(1.0), Duration::from_secs(1));
        assert_eq!(b.next_delay(0.5), Duration::from_millis(750));
        b.reset();
        assert_eq!(b.next_delay(1.0), Duration::from_millis(200));
        for _ in 0..100 {
            let j = Backoff::random_jitter();
            assert!((0.0..1.0).contains(&j));
        }
    }
}
