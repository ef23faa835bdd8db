//! Which failures of a request are worth another try, and after how long:
//! a bounded schedule with a doubling back-off. Pure; the caller sleeps.

use std::time::Duration;

/// Tries of one request, the first included.
pub const TRIES: u32 = 4;
/// The wait before the second try; each later one doubles it.
pub const FIRST_WAIT: Duration = Duration::from_millis(500);
/// The longest `Retry-After` honoured; a longer one ends the tries (the
/// refusal says when to try again).
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(10);

/// What became of one try, as far as trying again goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// No connection, one that broke, or no answer in time.
    Transport,
    /// An answer with this HTTP status (and `Retry-After`, in seconds).
    Status {
        status: u16,
        retry_after_s: Option<u64>,
    },
    /// Anything that another try would not change (an untrusted
    /// certificate, a malformed answer, a bad URL).
    Final,
}

impl Failure {
    /// Why another try may work, for the user; `None`: it would not.
    pub fn transient_reason(self) -> Option<&'static str> {
        match self {
            Self::Transport => Some("the connection failed or timed out"),
            Self::Status { status: 502, .. } => Some("bad gateway (502)"),
            Self::Status { status: 503, .. } => Some("unavailable (503)"),
            Self::Status { status: 504, .. } => Some("gateway timeout (504)"),
            Self::Status { .. } | Self::Final => None,
        }
    }
}

/// What to do after a failed try.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Try again after this wait.
    Retry(Duration),
    /// Give up: report this failure.
    GiveUp,
}

/// After try number `tried` (1-based) failed with `failure`: another try
/// after `FIRST_WAIT · 2^(tried-1)` (or the `Retry-After` asked, when
/// longer and at most `MAX_RETRY_AFTER`), while fewer than `TRIES` were
/// made and the failure is transient.
pub fn next(tried: u32, failure: Failure) -> Next {
    if tried >= TRIES || failure.transient_reason().is_none() {
        return Next::GiveUp;
    }
    let backoff = FIRST_WAIT.saturating_mul(1 << (tried.max(1) - 1).min(16));
    let asked = match failure {
        Failure::Status {
            retry_after_s: Some(s),
            ..
        } => Duration::from_secs(s),
        _ => Duration::ZERO,
    };
    if asked > MAX_RETRY_AFTER {
        return Next::GiveUp;
    }
    Next::Retry(backoff.max(asked))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transient_failures_are_retried_on_a_doubling_schedule_and_the_rest_fail_at_once() {
        let ms = |ms| Next::Retry(Duration::from_millis(ms));
        let status = |status| Failure::Status {
            status,
            retry_after_s: None,
        };
        let after = |status, s| Failure::Status {
            status,
            retry_after_s: Some(s),
        };
        let cases = [
            (
                "a broken connection, first try",
                1,
                Failure::Transport,
                ms(500),
            ),
            (
                "a broken connection, second try",
                2,
                Failure::Transport,
                ms(1_000),
            ),
            (
                "a broken connection, third try",
                3,
                Failure::Transport,
                ms(2_000),
            ),
            (
                "a broken connection, last try",
                TRIES,
                Failure::Transport,
                Next::GiveUp,
            ),
            (
                "past the last try",
                TRIES + 1,
                Failure::Transport,
                Next::GiveUp,
            ),
            ("nginx's bad gateway", 1, status(502), ms(500)),
            ("no Core behind the Edge", 2, status(503), ms(1_000)),
            ("a gateway timeout", 3, status(504), ms(2_000)),
            (
                "a gateway timeout, last try",
                TRIES,
                status(504),
                Next::GiveUp,
            ),
            (
                "Retry-After longer than the back-off",
                1,
                after(503, 3),
                ms(3_000),
            ),
            (
                "Retry-After shorter than the back-off",
                3,
                after(503, 1),
                ms(2_000),
            ),
            ("Retry-After at the cap", 1, after(503, 10), ms(10_000)),
            ("Retry-After past the cap", 1, after(503, 11), Next::GiveUp),
            ("a used token", 1, status(401), Next::GiveUp),
            ("a malformed request", 1, status(400), Next::GiveUp),
            ("a conflict", 1, status(409), Next::GiveUp),
            ("an expired token", 1, status(410), Next::GiveUp),
            ("too many tries", 1, after(429, 1), Next::GiveUp),
            ("an internal error", 1, status(500), Next::GiveUp),
            ("an untrusted certificate", 1, Failure::Final, Next::GiveUp),
        ];
        for (name, tried, failure, want) in cases {
            assert_eq!(next(tried, failure), want, "{name}");
        }
    }

    #[test]
    fn the_whole_schedule_is_bounded() {
        let mut waited = Duration::ZERO;
        let mut tries = 1;
        while let Next::Retry(wait) = next(tries, Failure::Transport) {
            waited += wait;
            tries += 1;
        }
        assert_eq!(tries, TRIES);
        assert_eq!(waited, Duration::from_millis(3_500));
    }
}
