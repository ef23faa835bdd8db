//! When to log in again: an MFA session that Core ends by its age is
//! renewed before it ends, and a failed login is tried again with backoff.
//! Pure: times are wall-clock milliseconds passed in.

use serde::{Deserialize, Serialize};

/// The renewal starts this long before the end, at most...
const MAX_MARGIN_MS: u64 = 5 * 60 * 1000;
/// ...and at most a quarter of the session's life before it.
const MARGIN_DIVISOR: u64 = 4;
/// The first pause after a failed login, doubling up to the second.
const RETRY_MIN_MS: u64 = 5_000;
const RETRY_MAX_MS: u64 = 60_000;

/// What happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// A login went through; Core ends the session after `expires_in_s`
    /// (`None`: it lasts while the tunnel is in use).
    LoggedIn { expires_in_s: Option<u32> },
    /// A login failed; the Edge may have said when to try again.
    Failed {
        error: String,
        retry_after_s: Option<u64>,
    },
}

/// The session as `status` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum State {
    /// No login yet.
    None,
    /// It lasts while the tunnel is in use.
    Open,
    /// It ends at a known time; the renewal is not due yet.
    Active,
    /// The renewal is due or being tried.
    Renewing,
    /// Its end passed without a renewal: the gateways no longer hold the
    /// device until a login goes through.
    Expired,
}

/// The session's schedule.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Session {
    logged_in_ms: Option<u64>,
    expires_ms: Option<u64>,
    /// When to log in next: the renewal, or a retry.
    next_ms: Option<u64>,
    /// Failed logins since the last one that went through.
    failures: u32,
    last_error: Option<String>,
}

impl Session {
    /// Takes in what happened at `now_ms`.
    pub fn step(&mut self, input: Input, now_ms: u64) {
        match input {
            Input::LoggedIn { expires_in_s } => {
                self.logged_in_ms = Some(now_ms);
                self.failures = 0;
                self.last_error = None;
                self.expires_ms = expires_in_s.map(|s| now_ms + u64::from(s) * 1000);
                self.next_ms = expires_in_s.map(|s| {
                    let life = u64::from(s) * 1000;
                    now_ms + life - (life / MARGIN_DIVISOR).min(MAX_MARGIN_MS)
                });
            }
            Input::Failed {
                error,
                retry_after_s,
            } => {
                let backoff = RETRY_MIN_MS
                    .saturating_mul(1 << self.failures.min(8))
                    .min(RETRY_MAX_MS);
                let asked = retry_after_s.unwrap_or(0).saturating_mul(1000);
                self.failures += 1;
                self.last_error = Some(error);
                self.next_ms = Some(now_ms + backoff.max(asked));
            }
        }
    }

    /// When to log in next, if ever.
    pub fn next_ms(&self) -> Option<u64> {
        self.next_ms
    }

    /// True when a login is due at `now_ms`.
    pub fn due(&self, now_ms: u64) -> bool {
        self.next_ms.is_some_and(|next| next <= now_ms)
    }

    pub fn expires_ms(&self) -> Option<u64> {
        self.expires_ms
    }

    pub fn logged_in_ms(&self) -> Option<u64> {
        self.logged_in_ms
    }

    pub fn last_error(&self) -> Option<&str> {
        self.last_error.as_deref()
    }

    pub fn state(&self, now_ms: u64) -> State {
        match (self.logged_in_ms, self.expires_ms) {
            (None, _) => State::None,
            (Some(_), None) => State::Open,
            (Some(_), Some(end)) if end <= now_ms => State::Expired,
            (Some(_), Some(_)) if self.due(now_ms) || self.failures > 0 => State::Renewing,
            (Some(_), Some(_)) => State::Active,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1000;

    fn failed(retry_after_s: Option<u64>) -> Input {
        Input::Failed {
            error: "Edge down".into(),
            retry_after_s,
        }
    }

    #[test]
    fn a_session_is_renewed_a_quarter_of_its_life_before_its_end_at_most_five_minutes() {
        // (life, renewal after the login)
        for (life_s, renew_s) in [(60, 45), (400, 300), (3600, 3300), (86_400, 86_100)] {
            let mut session = Session::default();
            session.step(
                Input::LoggedIn {
                    expires_in_s: Some(life_s),
                },
                1_000 * S,
            );
            assert_eq!(session.next_ms(), Some((1_000 + renew_s) * S), "{life_s}");
            assert_eq!(session.expires_ms(), Some((1_000 + u64::from(life_s)) * S));
            assert!(!session.due((1_000 + renew_s) * S - 1));
            assert!(session.due((1_000 + renew_s) * S));
        }
    }

    #[test]
    fn an_open_session_is_never_renewed() {
        let mut session = Session::default();
        assert_eq!(session.state(0), State::None);
        session.step(Input::LoggedIn { expires_in_s: None }, 5 * S);
        assert_eq!(session.next_ms(), None);
        assert!(!session.due(u64::MAX));
        assert_eq!(session.state(u64::MAX), State::Open);
    }

    #[test]
    fn failures_back_off_and_honour_retry_after_and_a_login_resets_them() {
        let mut session = Session::default();
        session.step(
            Input::LoggedIn {
                expires_in_s: Some(60),
            },
            0,
        );
        assert_eq!(session.state(10 * S), State::Active);
        assert_eq!(session.state(45 * S), State::Renewing);
        // (retry-after, pause) in a row
        let mut now = 45 * S;
        for (retry_after, pause_s) in [
            (None, 5),
            (None, 10),
            (Some(2), 20),
            (Some(90), 90),
            (None, 60),
            (None, 60),
        ] {
            session.step(failed(retry_after), now);
            assert_eq!(
                session.next_ms(),
                Some(now + pause_s * S),
                "{retry_after:?}"
            );
            now += pause_s * S;
        }
        assert_eq!(session.last_error(), Some("Edge down"));
        assert_eq!(session.state(now), State::Expired);
        session.step(
            Input::LoggedIn {
                expires_in_s: Some(60),
            },
            now,
        );
        assert_eq!(session.state(now), State::Active);
        assert_eq!(session.last_error(), None);
        session.step(failed(None), now + 45 * S);
        assert_eq!(
            session.next_ms(),
            Some(now + 50 * S),
            "the backoff starts again"
        );
    }
}
