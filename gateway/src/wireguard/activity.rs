//! When each peer was last active, and which peers an MFA location must
//! drop. Pure: fed with what each stats poll reads.
//!
//! A peer is active when it completes a handshake or when data arrives from
//! it. Handshakes alone are not enough: a busy session rekeys only every two
//! minutes, so a shorter threshold would cut off peers in full use.

use std::{
    collections::HashMap,
    time::{Duration, SystemTime},
};

use serde::Serialize;

use super::{key::Key, reconcile::ActualPeer};

/// Why a peer is due for removal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "reason", rename_all = "kebab-case")]
pub enum ExpiryReason {
    /// Active once, idle for longer than the threshold since.
    Idle { last_active: SystemTime },
    /// No handshake within the threshold after it was added.
    NoHandshake { added_at: SystemTime },
}

#[derive(Debug, Clone, Copy)]
struct Seen {
    added_at: SystemTime,
    last_active: Option<SystemTime>,
    /// Received bytes at the last poll; `None` before the first.
    rx_bytes: Option<u64>,
}

/// Per-peer activity.
#[derive(Debug, Default)]
pub struct Activity {
    peers: HashMap<Key, Seen>,
}

impl Activity {
    /// Starts tracking `key`, added to the device at `added_at`. A peer
    /// already tracked keeps what is known of it.
    pub fn track(&mut self, key: Key, added_at: SystemTime) {
        self.peers.entry(key).or_insert(Seen {
            added_at,
            last_active: None,
            rx_bytes: None,
        });
    }

    /// Restarts the clock of `key` (the peer was added again).
    pub fn rearm(&mut self, key: Key, added_at: SystemTime) {
        self.peers.insert(
            key,
            Seen {
                added_at,
                last_active: None,
                rx_bytes: None,
            },
        );
    }

    /// Stops tracking `key`.
    pub fn forget(&mut self, key: &Key) {
        self.peers.remove(key);
    }

    /// Stops tracking every peer for which `keep` is false.
    pub fn retain(&mut self, mut keep: impl FnMut(&Key) -> bool) {
        self.peers.retain(|key, _| keep(key));
    }

    /// Records what a poll at `now` read for `key`.
    pub fn observe(&mut self, key: &Key, peer: &ActualPeer, now: SystemTime) {
        if let (Some(seen), Some(handshake)) = (self.peers.get_mut(key), peer.last_handshake) {
            seen.last_active = seen.last_active.max(Some(handshake));
        }
        self.observe_traffic(key, peer, now);
    }

    /// Records what a poll at `now` read for `key`, leaving out its last
    /// handshake: one this gateway kicked, which says nothing of the
    /// client's use of the tunnel.
    pub fn observe_traffic(&mut self, key: &Key, peer: &ActualPeer, now: SystemTime) {
        let Some(seen) = self.peers.get_mut(key) else {
            return;
        };
        // Counters that went down belong to a restarted device (or a peer
        // added again): a new baseline.
        if seen.rx_bytes.is_some_and(|before| peer.rx_bytes > before) {
            seen.last_active = seen.last_active.max(Some(now));
        }
        seen.rx_bytes = Some(peer.rx_bytes);
    }

    /// Takes `peer`'s received bytes as the new baseline, counting nothing:
    /// the bytes of a kicked handshake are no sign of use.
    pub fn rebaseline(&mut self, key: &Key, peer: &ActualPeer) {
        if let Some(seen) = self.peers.get_mut(key) {
            seen.rx_bytes = Some(peer.rx_bytes);
        }
    }

    /// Records a handshake another gateway of the location saw at `at`:
    /// a client active there is active for this gateway's MFA timer too.
    pub fn observe_remote(&mut self, key: &Key, at: SystemTime) {
        if let Some(seen) = self.peers.get_mut(key) {
            seen.last_active = seen.last_active.max(Some(at));
        }
    }

    /// When `key` was last active, if ever.
    pub fn last_active(&self, key: &Key) -> Option<SystemTime> {
        self.peers.get(key).and_then(|seen| seen.last_active)
    }

    /// When `key` was added.
    pub fn added_at(&self, key: &Key) -> Option<SystemTime> {
        self.peers.get(key).map(|seen| seen.added_at)
    }

    /// The peers inactive for longer than `threshold` at `now`, oldest first.
    pub fn expired(&self, threshold: Duration, now: SystemTime) -> Vec<(Key, ExpiryReason)> {
        let mut out: Vec<(SystemTime, Key, ExpiryReason)> = self
            .peers
            .iter()
            .filter_map(|(key, seen)| {
                let (since, reason) = match seen.last_active {
                    Some(active) if active >= seen.added_at => (
                        active,
                        ExpiryReason::Idle {
                            last_active: active,
                        },
                    ),
                    _ => (
                        seen.added_at,
                        ExpiryReason::NoHandshake {
                            added_at: seen.added_at,
                        },
                    ),
                };
                let idle = now.duration_since(since).unwrap_or_default();
                (idle > threshold).then_some((since, *key, reason))
            })
            .collect();
        out.sort_unstable_by_key(|(since, key, _)| (*since, *key));
        out.into_iter()
            .map(|(_, key, reason)| (key, reason))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000 + secs)
    }

    fn k(n: u8) -> Key {
        Key::new([n; 32])
    }

    fn peer(handshake: Option<u64>, rx: u64) -> ActualPeer {
        ActualPeer {
            last_handshake: handshake.map(at),
            rx_bytes: rx,
            ..ActualPeer::default()
        }
    }

    const THRESHOLD: Duration = Duration::from_secs(60);

    #[test]
    fn a_peer_that_never_handshakes_expires_after_the_threshold() {
        let mut activity = Activity::default();
        activity.track(k(1), at(0));
        activity.observe(&k(1), &peer(None, 0), at(30));
        assert!(activity.expired(THRESHOLD, at(60)).is_empty());
        assert_eq!(
            activity.expired(THRESHOLD, at(61)),
            vec![(k(1), ExpiryReason::NoHandshake { added_at: at(0) })]
        );
    }

    #[test]
    fn handshakes_and_received_data_keep_a_peer() {
        let mut activity = Activity::default();
        activity.track(k(1), at(0));
        activity.observe(&k(1), &peer(Some(10), 100), at(10));
        // No new handshake, but data keeps arriving.
        activity.observe(&k(1), &peer(Some(10), 200), at(100));
        assert_eq!(activity.last_active(&k(1)), Some(at(100)));
        assert!(activity.expired(THRESHOLD, at(150)).is_empty());
        // Then silence.
        activity.observe(&k(1), &peer(Some(10), 200), at(170));
        assert_eq!(
            activity.expired(THRESHOLD, at(170)),
            vec![(
                k(1),
                ExpiryReason::Idle {
                    last_active: at(100)
                }
            )]
        );
    }

    #[test]
    fn the_first_poll_is_only_a_baseline() {
        let mut activity = Activity::default();
        activity.track(k(1), at(0));
        activity.observe(&k(1), &peer(None, 5000), at(100));
        assert_eq!(activity.last_active(&k(1)), None);
        // A device restart resets its counters: a new baseline, not activity.
        activity.observe(&k(1), &peer(None, 10), at(101));
        assert_eq!(activity.last_active(&k(1)), None);
        activity.observe(&k(1), &peer(None, 20), at(102));
        assert_eq!(activity.last_active(&k(1)), Some(at(102)));
    }

    #[test]
    fn rearming_restarts_the_clock_and_tracking_does_not() {
        let mut activity = Activity::default();
        activity.track(k(1), at(0));
        activity.track(k(1), at(50));
        assert_eq!(activity.added_at(&k(1)), Some(at(0)));
        activity.rearm(k(1), at(50));
        assert!(activity.expired(THRESHOLD, at(100)).is_empty());
        activity.forget(&k(1));
        assert!(activity.expired(THRESHOLD, at(1000)).is_empty());
        activity.track(k(2), at(0));
        activity.track(k(3), at(0));
        activity.retain(|key| *key == k(3));
        assert_eq!(activity.expired(THRESHOLD, at(1000)).len(), 1);
    }

    #[test]
    fn kicked_handshakes_do_not_count_but_traffic_and_other_gateways_do() {
        let mut activity = Activity::default();
        activity.track(k(1), at(0));
        activity.observe(&k(1), &peer(Some(10), 100), at(10));
        // A kick: its handshake and bytes are taken as a baseline only.
        activity.rebaseline(&k(1), &peer(Some(200), 250));
        activity.observe_traffic(&k(1), &peer(Some(200), 250), at(201));
        assert_eq!(activity.last_active(&k(1)), Some(at(10)));
        // Data after it counts.
        activity.observe_traffic(&k(1), &peer(Some(200), 300), at(202));
        assert_eq!(activity.last_active(&k(1)), Some(at(202)));
        // So does a handshake another gateway saw, and only a later one.
        activity.observe_remote(&k(1), at(300));
        activity.observe_remote(&k(1), at(250));
        assert_eq!(activity.last_active(&k(1)), Some(at(300)));
        activity.observe_remote(&k(9), at(300));
        assert_eq!(activity.last_active(&k(9)), None);
    }

    #[test]
    fn the_oldest_comes_first() {
        let mut activity = Activity::default();
        activity.track(k(1), at(20));
        activity.track(k(2), at(10));
        let keys: Vec<Key> = activity
            .expired(THRESHOLD, at(500))
            .into_iter()
            .map(|(key, _)| key)
            .collect();
        assert_eq!(keys, [k(2), k(1)]);
    }
}
