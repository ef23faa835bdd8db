//! What the WireGuard task does when its state file cannot be written (a
//! full or failing disk): it fails closed. A change that only takes access
//! away (a peer removed: Core's removal, an MFA expiry, `tidectl peer
//! remove`) is applied all the same; a change that grants access is
//! applied only when its source keeps it on its own: Core's config (a
//! restarted gateway reports the version it saved and Core sends the rest
//! again) and the config file (read again at start). A peer added or
//! changed with `tidectl` is refused: nothing else would remember it.
//!
//! While the file is behind, the state is "unsaved": the error is shown in
//! `tidectl status` and `tidectl peers`, and the whole state in force is
//! written again on the next change and on a timer, so that once the disk
//! frees the file catches up with what the device runs.

use std::time::{Duration, Instant};

use super::reconcile::Desired;

/// How long after a failed write the task tries again on its own.
pub const RETRY_AFTER: Duration = Duration::from_secs(2);

/// Where a change comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Core's location config or peer changes.
    Core,
    /// The config file (start, reload).
    File,
    /// `tidectl peer add/change/remove`.
    Operator,
    /// An MFA location removing inactive peers.
    Expiry,
}

/// What to do with a change whose state could not be written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Apply it; the state stays unsaved until a write succeeds.
    Apply,
    /// Refuse it: nothing changes.
    Refuse,
}

/// The verdict on a change from `origin` that `grants` access (adds a peer,
/// changes one, or changes the device) when its state cannot be written.
pub fn when_unsaved(origin: Origin, grants: bool) -> Verdict {
    match (origin, grants) {
        (_, false) | (Origin::Core | Origin::File, true) => Verdict::Apply,
        (Origin::Operator | Origin::Expiry, true) => Verdict::Refuse,
    }
}

/// Whether going from `old` to `new` grants anything: a peer that is new
/// or whose settings differ, or other device settings.
pub fn grants(old: &Desired, new: &Desired) -> bool {
    let device = (old.private_key, old.listen_port) != (new.private_key, new.listen_port);
    device
        || new
            .peers
            .iter()
            .any(|(key, peer)| old.peers.get(key) != Some(peer))
}

/// Whether the state file holds the state in force.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Saved {
    #[default]
    Yes,
    /// The last write failed with `error`; the next try is due at `retry_at`.
    No { error: String, retry_at: Instant },
}

impl Saved {
    /// A write failed at `now`.
    pub fn failed(&mut self, error: String, now: Instant) {
        *self = Self::No {
            error,
            retry_at: now + RETRY_AFTER,
        };
    }

    /// A write succeeded: true when the file was behind until now.
    pub fn succeeded(&mut self) -> bool {
        std::mem::take(self) != Self::Yes
    }

    /// The error of the last failed write, while the file is behind.
    pub fn error(&self) -> Option<&str> {
        match self {
            Self::Yes => None,
            Self::No { error, .. } => Some(error),
        }
    }

    /// Whether a retry is due at `now`.
    pub fn retry_due(&self, now: Instant) -> bool {
        matches!(self, Self::No { retry_at, .. } if now >= *retry_at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wireguard::{Key, spec::PeerEntry, spec::PeerSpec};

    fn peer(n: u8, ip: &str) -> PeerSpec {
        PeerEntry {
            name: None,
            public_key: Key::new([n; 32]).to_string(),
            allowed_ips: vec![ip.into()],
            preshared_key: None,
            persistent_keepalive: None,
            endpoint: None,
        }
        .validate()
        .unwrap()
    }

    fn desired(peers: &[PeerSpec]) -> Desired {
        Desired {
            private_key: Some(Key::new([9; 32])),
            listen_port: Some(51820),
            peers: peers.iter().map(|p| (p.public_key, p.clone())).collect(),
        }
    }

    #[test]
    fn removals_always_apply_and_grants_only_from_a_source_that_keeps_them() {
        use Origin::*;
        use Verdict::*;
        let cases = [
            (Core, false, Apply),
            (Core, true, Apply),
            (File, false, Apply),
            (File, true, Apply),
            (Operator, false, Apply),
            (Operator, true, Refuse),
            (Expiry, false, Apply),
            (Expiry, true, Refuse),
        ];
        for (origin, grants, expect) in cases {
            assert_eq!(when_unsaved(origin, grants), expect, "{origin:?} {grants}");
        }
    }

    #[test]
    fn a_change_grants_when_a_peer_or_the_device_is_new_or_different() {
        let (a, b) = (peer(1, "10.0.0.2/32"), peer(2, "10.0.0.3/32"));
        let wider = peer(1, "10.0.0.0/24");
        let both = desired(&[a.clone(), b.clone()]);
        let mut port = both.clone();
        port.listen_port = Some(51821);
        let cases = [
            (
                "a peer removed",
                &both,
                desired(std::slice::from_ref(&a)),
                false,
            ),
            ("all removed", &both, desired(&[]), false),
            ("nothing", &both, both.clone(), false),
            (
                "a peer added",
                &desired(std::slice::from_ref(&a)),
                both.clone(),
                true,
            ),
            ("a peer widened", &both, desired(&[wider, b.clone()]), true),
            ("the port changed", &both, port, true),
        ];
        for (name, old, new, expect) in cases {
            assert_eq!(grants(old, &new), expect, "{name}");
        }
    }

    #[test]
    fn an_unsaved_state_is_retried_on_a_timer_until_a_write_succeeds() {
        let now = Instant::now();
        let mut saved = Saved::default();
        assert_eq!(saved.error(), None);
        assert!(!saved.retry_due(now + RETRY_AFTER * 10));
        assert!(!saved.succeeded(), "it was saved already");
        saved.failed("no space".into(), now);
        assert_eq!(saved.error(), Some("no space"));
        assert!(!saved.retry_due(now));
        assert!(saved.retry_due(now + RETRY_AFTER));
        saved.failed("still no space".into(), now + RETRY_AFTER);
        assert!(!saved.retry_due(now + RETRY_AFTER));
        assert_eq!(saved.error(), Some("still no space"));
        assert!(saved.succeeded(), "the file caught up");
        assert_eq!(saved.error(), None);
    }
}
