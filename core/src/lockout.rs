//! Limits on wrong MFA codes that outlive a login: each wrong code is a
//! failure counted against the device and against the client's address.
//! Past a few, each next attempt waits a backoff that doubles; past a
//! limit the key is locked out until the lockout passes or an operator
//! lifts it. Failures are forgotten a while after the last one.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv6Addr},
};

/// How failures turn into waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Failures allowed without a wait.
    pub free: u32,
    /// The wait after the first failure past the free ones; each further
    /// failure doubles it.
    pub backoff_ms: i64,
    /// The longest backoff.
    pub backoff_max_ms: i64,
    /// Failures that lock the key out. Once there, every further failure
    /// (one per lockout) locks it out again.
    pub lockout_after: u32,
    /// How long a lockout lasts, from the failure that caused it.
    pub lockout_ms: i64,
    /// Failures are forgotten this long after the last one.
    pub forget_ms: i64,
}

impl Policy {
    /// A device: five wrong codes free, then 1 s doubling to a minute, and
    /// locked out for an hour at twenty.
    pub const DEVICE: Self = Self {
        free: 5,
        backoff_ms: 1_000,
        backoff_max_ms: 60_000,
        lockout_after: 20,
        lockout_ms: 3_600_000,
        forget_ms: 86_400_000,
    };

    /// A client address (many users may share one behind NAT): ten free,
    /// then 1 s doubling to five minutes, locked out for an hour at fifty.
    pub const SOURCE: Self = Self {
        free: 10,
        backoff_ms: 1_000,
        backoff_max_ms: 300_000,
        lockout_after: 50,
        lockout_ms: 3_600_000,
        forget_ms: 86_400_000,
    };

    /// The failures that still count at `now_ms`.
    pub fn failures(&self, record: Failures, now_ms: i64) -> u32 {
        if record.count == 0 || now_ms - record.last_ms >= self.forget_ms {
            0
        } else {
            record.count
        }
    }

    /// Whether an attempt may go ahead at `now_ms`.
    pub fn verdict(&self, record: Failures, now_ms: i64) -> Verdict {
        let count = self.failures(record, now_ms);
        if count >= self.lockout_after {
            let until_ms = record.last_ms.saturating_add(self.lockout_ms);
            if now_ms < until_ms {
                return Verdict::LockedOut { until_ms };
            }
        } else if count >= self.free {
            let doublings = (count - self.free).min(32);
            let wait = self
                .backoff_ms
                .saturating_mul(1_i64 << doublings)
                .min(self.backoff_max_ms);
            let until_ms = record.last_ms.saturating_add(wait);
            if now_ms < until_ms {
                return Verdict::Wait { until_ms };
            }
        }
        Verdict::Allowed
    }

    /// Counts a failure at `now_ms`: the new record, and whether it locks
    /// the key out.
    pub fn fail(&self, record: Failures, now_ms: i64) -> (Failures, bool) {
        let count = self.failures(record, now_ms).saturating_add(1);
        let record = Failures {
            count,
            last_ms: now_ms,
        };
        (record, count >= self.lockout_after)
    }
}

/// A key's failures: how many, and when the last was.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Failures {
    pub count: u32,
    pub last_ms: i64,
}

/// Whether an attempt may go ahead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Allowed,
    /// In backoff until then.
    Wait {
        until_ms: i64,
    },
    /// Locked out until then (or until an operator lifts it).
    LockedOut {
        until_ms: i64,
    },
}

impl Verdict {
    /// When the next attempt can count, if not now.
    pub fn until_ms(self) -> Option<i64> {
        match self {
            Self::Allowed => None,
            Self::Wait { until_ms } | Self::LockedOut { until_ms } => Some(until_ms),
        }
    }

    /// The later of two verdicts' blocks (a lockout wins a tie).
    pub fn max(self, other: Self) -> Self {
        match (self.until_ms(), other.until_ms()) {
            (None, _) => other,
            (_, None) => self,
            (Some(a), Some(b)) if a > b => self,
            (Some(a), Some(b)) if b > a => other,
            _ if matches!(self, Self::LockedOut { .. }) => self,
            _ => other,
        }
    }
}

/// A client address as limits count it: an IPv4 address, or an IPv6 /64
/// (one host's or one site's usual share).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Source(IpAddr);

impl Source {
    /// The source of the address an Edge reported; what does not parse
    /// (an Edge that sent none) counts as one unknown source.
    pub fn parse(client_addr: &str) -> Self {
        match client_addr.parse::<IpAddr>().map(|a| a.to_canonical()) {
            Ok(IpAddr::V6(v6)) => {
                let bits = u128::from(v6) & !((1_u128 << 64) - 1);
                Self(IpAddr::V6(Ipv6Addr::from(bits)))
            }
            Ok(v4) => Self(v4),
            Err(_) => Self(IpAddr::V6(Ipv6Addr::UNSPECIFIED)),
        }
    }
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            IpAddr::V6(v6) if v6.is_unspecified() => f.write_str("an unknown address"),
            IpAddr::V6(v6) => write!(f, "{v6}/64"),
            IpAddr::V4(v4) => write!(f, "{v4}"),
        }
    }
}

/// Failures by client address, in memory (a Core restart forgets them;
/// the device's own count is stored). At most `capacity` addresses: when
/// full, forgotten ones go first, then the one idle longest.
#[derive(Debug)]
pub struct Sources {
    policy: Policy,
    capacity: usize,
    by_source: HashMap<Source, Failures>,
}

impl Sources {
    pub fn new(policy: Policy, capacity: usize) -> Self {
        Self {
            policy,
            capacity,
            by_source: HashMap::new(),
        }
    }

    pub fn verdict(&self, source: Source, now_ms: i64) -> Verdict {
        let record = self.by_source.get(&source).copied().unwrap_or_default();
        self.policy.verdict(record, now_ms)
    }

    /// Counts a failure from `source`; returns whether it locks it out.
    pub fn fail(&mut self, source: Source, now_ms: i64) -> bool {
        if !self.by_source.contains_key(&source) && self.by_source.len() >= self.capacity {
            let policy = self.policy;
            self.by_source
                .retain(|_, record| policy.failures(*record, now_ms) > 0);
            if self.by_source.len() >= self.capacity {
                let idlest = self
                    .by_source
                    .iter()
                    .min_by_key(|(_, record)| record.last_ms)
                    .map(|(source, _)| *source);
                if let Some(idlest) = idlest {
                    self.by_source.remove(&idlest);
                }
            }
        }
        let record = self.by_source.entry(source).or_default();
        let (next, locked) = self.policy.fail(*record, now_ms);
        *record = next;
        locked
    }

    pub fn len(&self) -> usize {
        self.by_source.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_source.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: Policy = Policy {
        free: 2,
        backoff_ms: 1_000,
        backoff_max_ms: 4_000,
        lockout_after: 6,
        lockout_ms: 60_000,
        forget_ms: 600_000,
    };

    fn after(count: u32, last_ms: i64) -> Failures {
        Failures { count, last_ms }
    }

    #[test]
    fn failures_wait_a_doubling_backoff_then_lock_out() {
        use Verdict::*;
        for (record, now, want) in [
            (after(0, 0), 0, Allowed),
            (after(1, 100), 100, Allowed),
            // At the free count: 1 s, 2 s, 4 s, capped at 4 s.
            (after(2, 100), 100, Wait { until_ms: 1_100 }),
            (after(2, 100), 1_100, Allowed),
            (after(3, 100), 1_100, Wait { until_ms: 2_100 }),
            (after(4, 100), 1_100, Wait { until_ms: 4_100 }),
            (after(5, 100), 1_100, Wait { until_ms: 4_100 }),
            (after(5, 100), 4_100, Allowed),
            // Locked out for a minute, then one attempt at a time.
            (after(6, 100), 59_000, LockedOut { until_ms: 60_100 }),
            (after(6, 100), 60_100, Allowed),
            (after(9, 100), 30_000, LockedOut { until_ms: 60_100 }),
            // Forgotten ten minutes after the last.
            (after(9, 100), 600_100, Allowed),
            (after(5, 100), 600_099, Allowed),
        ] {
            assert_eq!(P.verdict(record, now), want, "{record:?} at {now}");
        }
    }

    #[test]
    fn a_failure_counts_up_from_what_is_not_forgotten() {
        assert_eq!(P.fail(after(0, 0), 50), (after(1, 50), false));
        assert_eq!(P.fail(after(5, 0), 50), (after(6, 50), true));
        // Past a lockout, each failure locks out again.
        assert_eq!(P.fail(after(6, 0), 60_000), (after(7, 60_000), true));
        assert_eq!(P.fail(after(6, 0), 600_000), (after(1, 600_000), false));
    }

    #[test]
    fn verdicts_combine_to_the_longer_block() {
        use Verdict::*;
        let wait = Wait { until_ms: 10 };
        let lock = LockedOut { until_ms: 10 };
        assert_eq!(Allowed.max(wait), wait);
        assert_eq!(wait.max(Allowed), wait);
        assert_eq!(wait.max(Wait { until_ms: 20 }), Wait { until_ms: 20 });
        assert_eq!(wait.max(lock), lock);
        assert_eq!(lock.max(wait), lock);
        assert_eq!(LockedOut { until_ms: 5 }.max(wait), wait);
    }

    #[test]
    fn sources_are_addresses_and_ipv6_slash_64s() {
        for (text, shown) in [
            ("192.0.2.7", "192.0.2.7"),
            ("::ffff:192.0.2.7", "192.0.2.7"),
            ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
            ("", "an unknown address"),
            ("nonsense", "an unknown address"),
        ] {
            assert_eq!(Source::parse(text).to_string(), shown, "{text}");
        }
        assert_eq!(
            Source::parse("2001:db8:1:2::1"),
            Source::parse("2001:db8:1:2:ffff::9")
        );
    }

    #[test]
    fn sources_count_apart_and_stay_bounded() {
        let mut sources = Sources::new(P, 2);
        let (a, b, c) = (
            Source::parse("192.0.2.1"),
            Source::parse("192.0.2.2"),
            Source::parse("192.0.2.3"),
        );
        for now in [0, 1] {
            assert!(!sources.fail(a, now));
        }
        assert_eq!(sources.verdict(a, 2), Verdict::Wait { until_ms: 1_001 });
        assert_eq!(sources.verdict(b, 2), Verdict::Allowed);
        sources.fail(b, 5);
        // Full: the one idle longest (a) makes room.
        sources.fail(c, 6);
        assert_eq!(sources.len(), 2);
        assert_eq!(sources.verdict(a, 7), Verdict::Allowed);
        assert_eq!(sources.verdict(b, 7), Verdict::Allowed);
        // Forgotten ones go first, however recent the others.
        let mut sources = Sources::new(P, 2);
        sources.fail(a, 0);
        sources.fail(b, 700_000);
        sources.fail(c, 700_001);
        assert_eq!(sources.verdict(b, 700_002), Verdict::Allowed);
        assert_eq!(sources.len(), 2);
        sources.fail(b, 700_003);
        assert_eq!(
            sources.verdict(b, 700_004),
            Verdict::Wait { until_ms: 701_003 }
        );
    }
}
