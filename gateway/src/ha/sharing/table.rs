//! The location's endpoint table: for each configured peer, where its
//! client was last seen and when it last completed a handshake, on
//! whichever gateway. Fed by this gateway's own WireGuard and by the
//! others' endpoint messages; read when this gateway becomes master, to
//! kick handshakes. Pure: no I/O, no clock of its own.
//!
//! Bounded: only peers in the current config have entries (at most
//! [`MAX_ENTRIES`]), and an entry whose last handshake is older than the
//! table's maximum age goes.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::SocketAddr,
    time::{Duration, SystemTime},
};

use serde::{Deserialize, Serialize};

use crate::wireguard::{Key, PeerEndpoint};

/// The most entries a table holds, whatever the config says.
pub const MAX_ENTRIES: usize = 200_000;

/// A handshake this far in the future (clock skew between gateways) is
/// taken as now; further than this, the entry is refused.
pub const MAX_SKEW: Duration = Duration::from_secs(60);

/// What the table knows of one peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Known {
    pub endpoint: SocketAddr,
    pub last_handshake: SystemTime,
    /// The gateway that saw it.
    pub gateway_id: u32,
}

/// What a merge did with the entries it was given.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Merged {
    /// New or newer than what the table had.
    pub taken: u64,
    /// Not newer than what the table had.
    pub older: u64,
    /// Of a peer that is not in this gateway's config.
    pub unknown_peer: u64,
    /// Older than the table's maximum age, or too far in the future.
    pub stale: u64,
    /// The table was full.
    pub full: u64,
}

impl Merged {
    /// Adds `other`'s counts to these.
    pub fn add(&mut self, other: Merged) {
        self.taken += other.taken;
        self.older += other.older;
        self.unknown_peer += other.unknown_peer;
        self.stale += other.stale;
        self.full += other.full;
    }
}

/// One candidate for a kick, most recently active first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recent {
    pub key: Key,
    pub endpoint: SocketAddr,
    pub last_handshake: SystemTime,
    /// The gateway that saw it.
    pub gateway_id: u32,
}

/// The table as the endpoint-sharing task last published it, with the
/// other gateways' MAC addresses from their endpoint messages: what the
/// continuity controller reads.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EndpointView {
    /// Every entry, most recently active first.
    entries: Vec<Recent>,
    macs: BTreeMap<u32, [u8; 6]>,
}

impl EndpointView {
    /// The peers with a handshake within `window` of `now`, most recently
    /// active first.
    pub fn recent(&self, window: Duration, now: SystemTime) -> Vec<Recent> {
        self.entries
            .iter()
            .take_while(|r| within(r.last_handshake, window, now))
            .copied()
            .collect()
    }

    /// Gateway `id`'s MAC address, if its endpoint messages were heard.
    pub fn mac_of(&self, id: u32) -> Option<[u8; 6]> {
        self.macs.get(&id).copied()
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the view holds no entry.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// A handshake at `at` is within `window` of `now` (one in the future is).
fn within(at: SystemTime, window: Duration, now: SystemTime) -> bool {
    now.duration_since(at).unwrap_or_default() <= window
}

/// The table.
#[derive(Debug, Clone)]
pub struct EndpointTable {
    entries: HashMap<Key, Known>,
    peers: HashSet<Key>,
    max_age: Duration,
}

impl EndpointTable {
    /// An empty table whose entries live `max_age` past their handshake.
    pub fn new(max_age: Duration) -> Self {
        Self {
            entries: HashMap::new(),
            peers: HashSet::new(),
            max_age,
        }
    }

    /// Makes `peers` the configured peers: entries of any other go.
    pub fn set_peers(&mut self, peers: impl IntoIterator<Item = Key>) {
        self.peers = peers.into_iter().take(MAX_ENTRIES).collect();
        let peers = &self.peers;
        self.entries.retain(|key, _| peers.contains(key));
    }

    /// Whether `key` is a configured peer.
    pub fn knows_peer(&self, key: &Key) -> bool {
        self.peers.contains(key)
    }

    /// Takes what gateway `gateway_id` reports, at `now`: an entry replaces
    /// the table's if its handshake is at least as recent.
    pub fn merge(&mut self, gateway_id: u32, entries: &[PeerEndpoint], now: SystemTime) -> Merged {
        let mut merged = Merged::default();
        for entry in entries {
            if !self.peers.contains(&entry.key) {
                merged.unknown_peer += 1;
                continue;
            }
            let handshake = if entry.last_handshake > now {
                if entry.last_handshake.duration_since(now).unwrap_or_default() > MAX_SKEW {
                    merged.stale += 1;
                    continue;
                }
                now
            } else {
                entry.last_handshake
            };
            if now.duration_since(handshake).unwrap_or_default() > self.max_age {
                merged.stale += 1;
                continue;
            }
            let known = Known {
                endpoint: entry.endpoint,
                last_handshake: handshake,
                gateway_id,
            };
            let full = self.entries.len() >= MAX_ENTRIES;
            match self.entries.get_mut(&entry.key) {
                Some(have) if have.last_handshake > handshake => merged.older += 1,
                Some(have) => {
                    *have = known;
                    merged.taken += 1;
                }
                None if full => merged.full += 1,
                None => {
                    self.entries.insert(entry.key, known);
                    merged.taken += 1;
                }
            }
        }
        merged
    }

    /// Drops the entries whose handshake is older than the maximum age.
    pub fn expire(&mut self, now: SystemTime) -> usize {
        let before = self.entries.len();
        let max_age = self.max_age;
        self.entries.retain(|_, known| {
            now.duration_since(known.last_handshake).unwrap_or_default() <= max_age
        });
        before - self.entries.len()
    }

    /// The peers with a handshake within `window` of `now`, most recently
    /// active first (ties by key, so the order is stable).
    pub fn recent(&self, window: Duration, now: SystemTime) -> Vec<Recent> {
        self.sorted(|known| within(known.last_handshake, window, now))
    }

    /// What the table holds now, with the other gateways' MAC addresses,
    /// for readers in other tasks.
    pub fn view(&self, macs: BTreeMap<u32, [u8; 6]>) -> EndpointView {
        EndpointView {
            entries: self.sorted(|_| true),
            macs,
        }
    }

    /// The entries `keep` takes, most recently active first (ties by key,
    /// so the order is stable).
    fn sorted(&self, keep: impl Fn(&Known) -> bool) -> Vec<Recent> {
        let mut recent: Vec<Recent> = self
            .entries
            .iter()
            .filter(|(_, known)| keep(known))
            .map(|(key, known)| Recent {
                key: *key,
                endpoint: known.endpoint,
                last_handshake: known.last_handshake,
                gateway_id: known.gateway_id,
            })
            .collect();
        recent.sort_unstable_by(|a, b| {
            b.last_handshake
                .cmp(&a.last_handshake)
                .then_with(|| a.key.cmp(&b.key))
        });
        recent
    }

    /// What the table has for `key`.
    pub fn get(&self, key: &Key) -> Option<&Known> {
        self.entries.get(key)
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Entries by the gateway that saw them.
    pub fn by_gateway(&self) -> BTreeMap<u32, usize> {
        let mut out = BTreeMap::new();
        for known in self.entries.values() {
            *out.entry(known.gateway_id).or_default() += 1;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(n: u8) -> Key {
        Key::new([n; 32])
    }

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000 + secs)
    }

    fn entry(n: u8, endpoint: &str, secs: u64) -> PeerEndpoint {
        PeerEndpoint {
            key: k(n),
            endpoint: endpoint.parse().unwrap(),
            last_handshake: at(secs),
            kicked: false,
        }
    }

    fn table() -> EndpointTable {
        let mut table = EndpointTable::new(Duration::from_secs(600));
        table.set_peers([k(1), k(2), k(3), k(4)]);
        table
    }

    #[test]
    fn the_newest_handshake_wins_whoever_saw_it() {
        let mut table = table();
        let merged = table.merge(1, &[entry(1, "198.51.100.7:4000", 100)], at(100));
        assert_eq!(merged.taken, 1);
        // Another gateway saw the client later, elsewhere.
        table.merge(2, &[entry(1, "198.51.100.8:5000", 200)], at(200));
        assert_eq!(
            table.get(&k(1)),
            Some(&Known {
                endpoint: "198.51.100.8:5000".parse().unwrap(),
                last_handshake: at(200),
                gateway_id: 2,
            })
        );
        // An older report changes nothing.
        let merged = table.merge(1, &[entry(1, "198.51.100.7:4000", 150)], at(210));
        assert_eq!((merged.taken, merged.older), (0, 1));
        assert_eq!(table.get(&k(1)).unwrap().gateway_id, 2);
        // The same handshake, a new endpoint (the client roamed): taken.
        table.merge(2, &[entry(1, "198.51.100.9:6000", 200)], at(220));
        assert_eq!(
            table.get(&k(1)).unwrap().endpoint,
            "198.51.100.9:6000".parse().unwrap()
        );
    }

    #[test]
    fn only_configured_peers_and_fresh_handshakes_are_taken() {
        let mut table = table();
        let merged = table.merge(
            1,
            &[
                entry(9, "198.51.100.7:1", 1000),
                entry(2, "198.51.100.7:2", 1000),
                entry(3, "198.51.100.7:3", 1000 - 601),
                entry(4, "198.51.100.7:4", 1000 + 3600),
            ],
            at(1000),
        );
        assert_eq!(
            merged,
            Merged {
                taken: 1,
                older: 0,
                unknown_peer: 1,
                stale: 2,
                full: 0
            }
        );
        // A small clock skew is taken as now.
        table.merge(1, &[entry(4, "198.51.100.7:4", 1030)], at(1000));
        assert_eq!(table.get(&k(4)).unwrap().last_handshake, at(1000));
        // A peer leaving the config takes its entry with it.
        table.set_peers([k(4)]);
        assert_eq!(table.len(), 1);
        assert!(table.get(&k(2)).is_none());
    }

    #[test]
    fn entries_age_out() {
        let mut table = table();
        table.merge(
            1,
            &[
                entry(1, "198.51.100.7:1", 0),
                entry(2, "198.51.100.7:2", 500),
            ],
            at(500),
        );
        assert_eq!(table.expire(at(600)), 0);
        assert_eq!(table.expire(at(601)), 1);
        assert!(table.get(&k(1)).is_none() && table.get(&k(2)).is_some());
    }

    #[test]
    fn recent_peers_come_most_recent_first() {
        let mut table = table();
        table.merge(
            1,
            &[
                entry(1, "198.51.100.7:1", 100),
                entry(2, "198.51.100.7:2", 300),
                entry(3, "198.51.100.7:3", 200),
                entry(4, "198.51.100.7:4", 10),
            ],
            at(300),
        );
        let keys: Vec<Key> = table
            .recent(Duration::from_secs(250), at(300))
            .iter()
            .map(|r| r.key)
            .collect();
        assert_eq!(keys, [k(2), k(3), k(1)]);
        assert_eq!(table.by_gateway().get(&1), Some(&4));
    }
}
