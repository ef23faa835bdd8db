//! What a gateway link sends next: changes committed while the previous
//! message was in flight are merged into one PeerChanges, so a burst costs
//! one round trip; a gap in versions, a lagged notice stream, an interface
//! change or a refused message asks for the whole config instead.

use std::collections::{BTreeMap, BTreeSet};

use tidegate_proto::gateway::v1 as gateway;

use crate::{
    keys::Key,
    store::{Change, ChangeKind, PeerSpec},
};

/// The next message for the gateway.
#[derive(Debug, Clone, PartialEq)]
pub enum Next {
    /// Read the whole config from the store and send it.
    Full,
    Changes(gateway::PeerChanges),
}

/// Changes not yet sent to one gateway.
#[derive(Debug, Clone, Default)]
pub struct Coalescer {
    /// The version the gateway is at once everything sent is applied.
    sent: u64,
    /// The newest version merged.
    target: u64,
    full: bool,
    /// A whole config was refused at `sent`: wait for a newer version
    /// before trying again.
    held: bool,
    upsert: BTreeMap<Key, PeerSpec>,
    remove: BTreeSet<Key>,
}

impl Coalescer {
    /// Starts with the whole config to send.
    pub fn new() -> Self {
        Self {
            full: true,
            ..Self::default()
        }
    }

    /// Merges a committed change of the gateway's location.
    pub fn push(&mut self, change: &Change) {
        if change.version <= self.target {
            // Already in what was sent (a whole config read after it).
            return;
        }
        if change.base_version != self.target {
            self.full = true;
        }
        self.target = change.version;
        self.held = false;
        if self.full {
            return;
        }
        match &change.kind {
            ChangeKind::Config => self.full = true,
            ChangeKind::Peers { upsert, remove } => {
                for key in remove {
                    self.upsert.remove(key);
                    self.remove.insert(*key);
                }
                for peer in upsert {
                    self.remove.remove(&peer.public_key);
                    self.upsert.insert(peer.public_key, peer.clone());
                }
            }
        }
        if self.full {
            self.upsert.clear();
            self.remove.clear();
        }
    }

    /// Notices were lost: only a whole config is safe.
    pub fn lagged(&mut self) {
        self.full = true;
        self.held = false;
        self.upsert.clear();
        self.remove.clear();
    }

    /// What to send now, if anything.
    pub fn take(&mut self) -> Option<Next> {
        if self.full {
            return (!self.held).then_some(Next::Full);
        }
        if self.target == self.sent {
            return None;
        }
        let changes = gateway::PeerChanges {
            base_version: self.sent,
            version: self.target,
            upsert: std::mem::take(&mut self.upsert)
                .into_values()
                .map(|p| p.to_proto())
                .collect(),
            remove: std::mem::take(&mut self.remove)
                .into_iter()
                .map(|k| k.as_bytes().to_vec())
                .collect(),
        };
        self.sent = self.target;
        Some(Next::Changes(changes))
    }

    /// A whole config at `version` was sent.
    pub fn sent_full(&mut self, version: u64) {
        self.full = false;
        self.held = false;
        self.sent = version;
        self.target = self.target.max(version);
        if self.target > version {
            // Cannot happen (notices follow commits), but never guess.
            self.full = true;
        }
        self.upsert.clear();
        self.remove.clear();
    }

    /// The gateway refused what it was sent at `version`; `was_full` tells
    /// whether that was a whole config.
    pub fn refused(&mut self, version: u64, was_full: bool) {
        self.lagged();
        if was_full && self.target <= version {
            self.held = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(n: u8) -> PeerSpec {
        PeerSpec {
            public_key: Key::new([n; 32]),
            preshared_key: None,
            allowed_ips: vec![format!("10.0.0.{n}/32")],
        }
    }

    fn peers(base: u64, upsert: &[u8], remove: &[u8]) -> Change {
        Change {
            location_id: 1,
            base_version: base,
            version: base + 1,
            kind: ChangeKind::Peers {
                upsert: upsert.iter().map(|n| peer(*n)).collect(),
                remove: remove.iter().map(|n| Key::new([*n; 32])).collect(),
            },
        }
    }

    fn changes(next: Option<Next>) -> gateway::PeerChanges {
        match next {
            Some(Next::Changes(c)) => c,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn starts_with_a_whole_config_then_sends_changes() {
        let mut c = Coalescer::new();
        assert_eq!(c.take(), Some(Next::Full));
        c.sent_full(5);
        assert_eq!(c.take(), None);
        // Changes already in the config are skipped.
        c.push(&peers(4, &[1], &[]));
        assert_eq!(c.take(), None);
        c.push(&peers(5, &[1], &[]));
        let sent = changes(c.take());
        assert_eq!((sent.base_version, sent.version), (5, 6));
        assert_eq!(sent.upsert.len(), 1);
        assert_eq!(c.take(), None);
    }

    #[test]
    fn a_burst_is_merged_into_one_message() {
        let mut c = Coalescer::new();
        c.sent_full(1);
        c.push(&peers(1, &[1, 2], &[]));
        c.push(&peers(2, &[], &[1]));
        c.push(&peers(3, &[3], &[9]));
        c.push(&peers(4, &[9], &[]));
        let sent = changes(c.take());
        assert_eq!((sent.base_version, sent.version), (1, 5));
        let upserted: Vec<u8> = sent.upsert.iter().map(|p| p.public_key[0]).collect();
        assert_eq!(upserted, [2, 3, 9]);
        let removed: Vec<u8> = sent.remove.iter().map(|k| k[0]).collect();
        assert_eq!(removed, [1]);
    }

    #[test]
    fn gaps_lags_and_interface_changes_ask_for_the_whole_config() {
        let mut c = Coalescer::new();
        c.sent_full(1);
        c.push(&peers(2, &[1], &[]));
        assert_eq!(c.take(), Some(Next::Full));
        c.sent_full(3);
        c.push(&Change {
            location_id: 1,
            base_version: 3,
            version: 4,
            kind: ChangeKind::Config,
        });
        c.push(&peers(4, &[1], &[]));
        assert_eq!(c.take(), Some(Next::Full));
        c.sent_full(5);
        c.lagged();
        assert_eq!(c.take(), Some(Next::Full));
    }

    #[test]
    fn a_refused_config_waits_for_a_newer_version() {
        let mut c = Coalescer::new();
        c.sent_full(3);
        c.refused(3, true);
        assert_eq!(c.take(), None);
        c.push(&peers(3, &[1], &[]));
        assert_eq!(c.take(), Some(Next::Full));
        c.sent_full(4);
        // Refused changes: the whole config at once.
        c.push(&peers(4, &[2], &[]));
        changes(c.take());
        c.refused(5, false);
        assert_eq!(c.take(), Some(Next::Full));
    }
}
