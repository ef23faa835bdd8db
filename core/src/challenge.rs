//! MFA logins in progress: the opaque session an MfaStart hands out, valid
//! for a short time, a few wrong codes, and one successful MfaFinish.
//!
//! A device has at most one login per client address: a new start from
//! the same address replaces it, one from another address runs beside it
//! (so a stranger cannot cancel the user's login), up to
//! [`PER_DEVICE`]. Held in memory only: after a Core restart a client
//! starts its login again.

use std::collections::HashMap;

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};

use crate::lockout::Source;

/// Logins in progress of one device, from different addresses, at most.
pub const PER_DEVICE: usize = 4;
/// Logins in progress from one address (of any devices), at most.
pub const PER_SOURCE: usize = 64;

/// One login in progress.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    pub device_id: i64,
    pub location_id: u32,
    /// Where the login was started from.
    pub source: Source,
    pub expires_ms: i64,
    /// Wrong codes so far.
    pub attempts: u32,
}

/// What a session string refers to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    Found(Challenge),
    Expired,
    Unknown,
}

/// Why a login could not start.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChallengeError {
    #[error("too many logins in progress ({0}); try again shortly")]
    Full(usize),
    /// The device has [`PER_DEVICE`] logins from other addresses; the
    /// first of them expires then.
    #[error("the device has {PER_DEVICE} logins in progress from other addresses")]
    DeviceBusy { until_ms: i64 },
    /// The address has [`PER_SOURCE`] logins in progress.
    #[error("{PER_SOURCE} logins are in progress from this address")]
    SourceBusy { until_ms: i64 },
}

/// The logins in progress, by session.
#[derive(Debug, Default)]
pub struct Challenges {
    by_session: HashMap<String, Challenge>,
}

/// Length of a session string (32 random bytes, base64url).
pub const SESSION_LEN: usize = 43;

impl Challenges {
    /// Starts a login of `device_id` from `source`, replacing the
    /// device's login from the same address, and returns its session.
    pub fn start(
        &mut self,
        device_id: i64,
        location_id: u32,
        source: Source,
        now_ms: i64,
        ttl_ms: i64,
        max: usize,
    ) -> Result<String, ChallengeError> {
        self.by_session
            .retain(|_, c| !(c.device_id == device_id && c.source == source));
        let live = |c: &&Challenge| c.expires_ms > now_ms;
        let first_expiry = |matching: &dyn Fn(&Challenge) -> bool| {
            let found = self
                .by_session
                .values()
                .filter(live)
                .filter(|c| matching(c));
            (found.clone().count(), found.map(|c| c.expires_ms).min())
        };
        if let (count, Some(until_ms)) = first_expiry(&|c| c.device_id == device_id)
            && count >= PER_DEVICE
        {
            return Err(ChallengeError::DeviceBusy { until_ms });
        }
        if let (count, Some(until_ms)) = first_expiry(&|c| c.source == source)
            && count >= PER_SOURCE
        {
            return Err(ChallengeError::SourceBusy { until_ms });
        }
        if self.by_session.len() >= max {
            self.purge(now_ms, 0);
            if self.by_session.len() >= max {
                return Err(ChallengeError::Full(max));
            }
        }
        let session = URL_SAFE_NO_PAD.encode(crate::random::<32>());
        self.by_session.insert(
            session.clone(),
            Challenge {
                device_id,
                location_id,
                source,
                expires_ms: now_ms + ttl_ms,
                attempts: 0,
            },
        );
        Ok(session)
    }

    /// The login of `session` at `now_ms`.
    pub fn get(&self, session: &str, now_ms: i64) -> Lookup {
        match self.by_session.get(session) {
            None => Lookup::Unknown,
            Some(c) if c.expires_ms <= now_ms => Lookup::Expired,
            Some(c) => Lookup::Found(c.clone()),
        }
    }

    /// Counts a wrong code; after `max_attempts` the login is over. Returns
    /// the attempts left.
    pub fn fail(&mut self, session: &str, max_attempts: u32) -> u32 {
        let Some(challenge) = self.by_session.get_mut(session) else {
            return 0;
        };
        challenge.attempts += 1;
        let left = max_attempts.saturating_sub(challenge.attempts);
        if left == 0 {
            self.by_session.remove(session);
        }
        left
    }

    /// Ends a login (it succeeded).
    pub fn finish(&mut self, session: &str) -> Option<Challenge> {
        self.by_session.remove(session)
    }

    /// Forgets logins expired for longer than `grace_ms` (kept that long to
    /// answer "expired" rather than "unknown").
    pub fn purge(&mut self, now_ms: i64, grace_ms: i64) {
        self.by_session
            .retain(|_, c| c.expires_ms + grace_ms > now_ms);
    }

    pub fn len(&self) -> usize {
        self.by_session.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_session.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn src(n: u8) -> Source {
        Source::parse(&format!("192.0.2.{n}"))
    }

    #[test]
    fn a_session_expires_and_is_purged_after_the_grace() {
        let mut c = Challenges::default();
        let s = c.start(1, 1, src(1), 1_000, 120_000, 10).unwrap();
        assert_eq!(s.len(), SESSION_LEN);
        assert!(matches!(c.get(&s, 1_000), Lookup::Found(_)));
        assert_eq!(c.get(&s, 121_000), Lookup::Expired);
        assert_eq!(c.get("other", 1_000), Lookup::Unknown);
        c.purge(121_000, 60_000);
        assert_eq!(c.get(&s, 121_000), Lookup::Expired);
        c.purge(181_000, 60_000);
        assert_eq!(c.get(&s, 181_000), Lookup::Unknown);
    }

    #[test]
    fn wrong_codes_use_up_the_attempts() {
        let mut c = Challenges::default();
        let s = c.start(1, 1, src(1), 0, 1_000, 10).unwrap();
        assert_eq!(c.fail(&s, 3), 2);
        assert_eq!(c.fail(&s, 3), 1);
        assert_eq!(c.fail(&s, 3), 0);
        assert_eq!(c.get(&s, 0), Lookup::Unknown);
    }

    #[test]
    fn a_new_login_replaces_the_devices_previous_one_and_the_count_is_bounded() {
        let mut c = Challenges::default();
        let first = c.start(1, 1, src(1), 0, 1_000, 2).unwrap();
        let second = c.start(1, 1, src(1), 0, 1_000, 2).unwrap();
        assert_ne!(first, second);
        assert_eq!(c.get(&first, 0), Lookup::Unknown);
        c.start(2, 1, src(1), 0, 1_000, 2).unwrap();
        assert_eq!(
            c.start(3, 1, src(1), 0, 1_000, 2),
            Err(ChallengeError::Full(2))
        );
        // Expired ones make room.
        c.start(3, 1, src(1), 2_000, 1_000, 2).unwrap();
        assert_eq!(c.len(), 1);
        assert!(
            c.finish(&c.by_session.keys().next().unwrap().clone())
                .is_some()
        );
        assert!(c.is_empty());
    }

    #[test]
    fn a_start_from_another_address_leaves_the_login_in_progress() {
        let mut c = Challenges::default();
        let user = c.start(1, 1, src(1), 0, 1_000, 100).unwrap();
        let mut others = Vec::new();
        for n in 2..=PER_DEVICE as u8 {
            others.push(
                c.start(1, 1, src(n), 10 * i64::from(n), 1_000, 100)
                    .unwrap(),
            );
            // Again from the same address: replaces only its own.
            others.push(
                c.start(1, 1, src(n), 10 * i64::from(n), 1_000, 100)
                    .unwrap(),
            );
        }
        assert!(matches!(c.get(&user, 100), Lookup::Found(_)));
        assert_eq!(c.len(), PER_DEVICE);
        assert_eq!(
            c.start(1, 1, src(99), 100, 1_000, 100),
            Err(ChallengeError::DeviceBusy { until_ms: 1_000 })
        );
        assert!(matches!(c.get(&user, 100), Lookup::Found(_)));
        // Another device is not held up; the first expiry makes room.
        c.start(2, 1, src(99), 100, 1_000, 100).unwrap();
        c.start(1, 1, src(99), 1_000, 1_000, 100).unwrap();
    }

    #[test]
    fn one_address_holds_a_bounded_share_of_logins() {
        let mut c = Challenges::default();
        for device in 0..PER_SOURCE as i64 {
            c.start(device, 1, src(1), device, 1_000, 10_000).unwrap();
        }
        assert_eq!(
            c.start(1_000, 1, src(1), 100, 1_000, 10_000),
            Err(ChallengeError::SourceBusy { until_ms: 1_000 })
        );
        c.start(1_000, 1, src(2), 100, 1_000, 10_000).unwrap();
    }
}
