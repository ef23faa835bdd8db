//! What the daemon must remember across restarts beyond the config file:
//! peers added at run time by `tidectl`, the location config Core sent last,
//! when each peer was added, the peers an MFA location has removed, and the
//! removal records, with how far Core has acknowledged them. One JSON file,
//! replaced atomically.

use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    fs::{self, File, OpenOptions},
    io::{self, Write as _},
    os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _},
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use serde::{Deserialize, Serialize};

use super::{activity::ExpiryReason, key::Key, location::Location, spec::PeerSpec};

/// Removal records kept; the oldest go first beyond this, acknowledged by
/// Core or not.
pub const MAX_REMOVALS: usize = 10_000;

/// The state file format version this daemon writes.
const VERSION: u32 = 1;

/// The state file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{op} state file {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("state file {path} is not valid (move it aside to start afresh)")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("state file {path} has version {found}; this daemon reads version {VERSION}")]
    Version { path: PathBuf, found: u32 },
}

/// A peer an MFA location removed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Removal {
    /// Numbers removals in the order they happened (1, 2, ...): Core
    /// acknowledges them by it.
    #[serde(default)]
    pub seq: u64,
    pub public_key: Key,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Unix seconds.
    pub removed_at: u64,
    /// `idle` or `no-handshake`.
    pub reason: String,
    /// Unix seconds of the last activity, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_active: Option<u64>,
}

impl Removal {
    /// A record of `peer` removed at `now` for `reason`.
    pub fn new(peer: &PeerSpec, reason: ExpiryReason, now: SystemTime) -> Self {
        let (reason, last_active) = match reason {
            ExpiryReason::Idle { last_active } => ("idle", Some(unix(last_active))),
            ExpiryReason::NoHandshake { .. } => ("no-handshake", None),
        };
        Self {
            seq: 0,
            public_key: peer.public_key,
            name: peer.name.clone(),
            removed_at: unix(now),
            reason: reason.to_owned(),
            last_active,
        }
    }
}

/// The remembered state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    #[serde(default)]
    pub version: u32,
    /// Peers added at run time, by key.
    #[serde(default)]
    pub dynamic_peers: BTreeMap<Key, PeerSpec>,
    /// When each peer was added, unix seconds.
    #[serde(default)]
    pub added_at: BTreeMap<Key, u64>,
    /// Peers an MFA location removed that must stay out until added again.
    #[serde(default)]
    pub expired: BTreeSet<Key>,
    /// Removal records, oldest first.
    #[serde(default)]
    pub removals: VecDeque<Removal>,
    /// The location config Core sent last, as applied: a gateway restarted
    /// without Core comes up on it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location: Option<Location>,
    /// Core's peers an MFA location removed, with the preshared key they
    /// had: they stay out until Core sends them with another one (a new
    /// MFA login).
    #[serde(default)]
    pub expired_location_peers: BTreeMap<Key, Option<Key>>,
    /// The `seq` of the last removal recorded.
    #[serde(default)]
    pub removal_seq: u64,
    /// Core has applied the removals up to this `seq`; the later ones are
    /// sent again with every status until it has. (Older files name it
    /// `reported_seq`: what was sent once then counts as acknowledged.)
    #[serde(default, alias = "reported_seq")]
    pub acked_seq: u64,
}

impl State {
    /// Records a removal, dropping the oldest beyond [`MAX_REMOVALS`];
    /// returns the dropped record when Core had not acknowledged it (Core
    /// will not hear of it).
    pub fn record(&mut self, mut removal: Removal) -> Option<Removal> {
        let dropped = if self.removals.len() >= MAX_REMOVALS {
            self.removals.pop_front()
        } else {
            None
        };
        self.removal_seq += 1;
        removal.seq = self.removal_seq;
        self.removals.push_back(removal);
        dropped.filter(|r| r.seq > self.acked_seq)
    }

    /// At most `limit` of the removals Core has not acknowledged, oldest
    /// first.
    pub fn unacked(&self, limit: usize) -> Vec<Removal> {
        self.removals
            .iter()
            .filter(|r| r.seq > self.acked_seq)
            .take(limit)
            .cloned()
            .collect()
    }

    /// Core has applied the removals up to `seq`: true when that is news.
    /// A `seq` beyond the last recorded counts up to the last.
    pub fn acknowledge(&mut self, seq: u64) -> bool {
        let seq = seq.min(self.removal_seq);
        if seq <= self.acked_seq {
            return false;
        }
        self.acked_seq = seq;
        true
    }
}

/// Where the state lives.
#[derive(Debug, Clone)]
pub struct StateStore {
    path: PathBuf,
}

impl StateStore {
    /// The state of interface `interface` under `dir`.
    pub fn new(dir: &Path, interface: &str) -> Self {
        Self {
            path: dir.join(format!("wireguard-{interface}.json")),
        }
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads the state; a missing file is an empty state.
    pub fn load(&self) -> Result<State, StateError> {
        let text = match fs::read_to_string(&self.path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Ok(State {
                    version: VERSION,
                    ..State::default()
                });
            }
            Err(source) => return Err(self.io("reading", source)),
        };
        let state: State = serde_json::from_str(&text).map_err(|source| StateError::Parse {
            path: self.path.clone(),
            source,
        })?;
        if state.version != VERSION {
            return Err(StateError::Version {
                path: self.path.clone(),
                found: state.version,
            });
        }
        Ok(state)
    }

    /// Creates the state directory (mode 0700) if it is missing.
    pub fn ensure_dir(&self) -> Result<(), StateError> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(self.dir())
            .map_err(|e| self.io("creating the directory of", e))
    }

    fn dir(&self) -> &Path {
        self.path.parent().unwrap_or(Path::new("."))
    }

    /// Writes `state` to a temporary file, syncs it and renames it over the
    /// old one, so a crash leaves either the old or the new state.
    pub fn save(&self, state: &State) -> Result<(), StateError> {
        self.ensure_dir()?;
        let dir = self.dir();
        let tmp = self.path.with_extension("json.tmp");
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| self.io("creating", e))?;
        let mut state = state.clone();
        state.version = VERSION;
        let json = serde_json::to_vec_pretty(&state).map_err(io::Error::other);
        let written = json
            .and_then(|json| file.write_all(&json))
            .and_then(|()| file.sync_all())
            .map_err(|e| self.io("writing", e))
            .and_then(|()| fs::rename(&tmp, &self.path).map_err(|e| self.io("replacing", e)));
        if let Err(error) = written {
            // A full disk: give back what the partial copy took.
            drop(file);
            let _ = fs::remove_file(&tmp);
            return Err(error);
        }
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| self.io("syncing the directory of", e))
    }

    fn io(&self, op: &'static str, source: io::Error) -> StateError {
        StateError::Io {
            op,
            path: self.path.clone(),
            source,
        }
    }
}

/// Unix seconds of `time` (0 before the epoch).
pub fn unix(time: SystemTime) -> u64 {
    time.duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

/// The time of unix seconds `secs`.
pub fn from_unix(secs: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wireguard::{location::LocationDevice, spec::PeerEntry};

    fn peer() -> PeerSpec {
        PeerEntry {
            name: Some("alice".into()),
            public_key: Key::new([1; 32]).to_string(),
            allowed_ips: vec!["10.0.0.2/32".into()],
            preshared_key: Some(Key::new([2; 32]).to_string()),
            persistent_keepalive: Some(25),
            endpoint: None,
        }
        .validate()
        .unwrap()
    }

    #[test]
    fn a_missing_file_is_an_empty_state_and_saves_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::new(&dir.path().join("sub"), "wg0");
        let mut state = store.load().unwrap();
        assert!(state.dynamic_peers.is_empty());
        let peer = peer();
        state.dynamic_peers.insert(peer.public_key, peer.clone());
        state.added_at.insert(peer.public_key, 1_700_000_000);
        state.expired.insert(Key::new([3; 32]));
        state.record(Removal::new(
            &peer,
            ExpiryReason::NoHandshake {
                added_at: from_unix(1),
            },
            from_unix(100),
        ));
        state.location = Some(Location {
            version: 4,
            location_id: 7,
            name: "lab".into(),
            device: LocationDevice {
                private_key: Key::new([9; 32]),
                listen_port: 51820,
                addresses: vec!["10.8.0.1/24".parse().unwrap()],
                mtu: Some(1380),
                mfa_threshold_secs: Some(300),
            },
            peers: [(peer.public_key, peer.clone())].into(),
        });
        state
            .expired_location_peers
            .insert(Key::new([4; 32]), Some(Key::new([5; 32])));
        state.acked_seq = 1;
        store.save(&state).unwrap();
        assert_eq!(store.load().unwrap(), state);
        let mode = fs::metadata(store.path()).unwrap().permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
    }

    #[test]
    fn a_corrupt_file_names_itself() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::new(dir.path(), "wg0");
        fs::write(store.path(), "{not json").unwrap();
        let error = crate::error_chain(&store.load().unwrap_err());
        assert!(error.contains("wireguard-wg0.json is not valid"), "{error}");
        fs::write(store.path(), r#"{"version": 7}"#).unwrap();
        let error = store.load().unwrap_err().to_string();
        assert!(error.contains("version 7"), "{error}");
    }

    #[test]
    fn removals_are_bounded() {
        let mut state = State::default();
        let peer = peer();
        for n in 0..MAX_REMOVALS + 5 {
            let reason = ExpiryReason::NoHandshake {
                added_at: from_unix(0),
            };
            state.record(Removal::new(&peer, reason, from_unix(n as u64)));
        }
        assert_eq!(state.removals.len(), MAX_REMOVALS);
        assert_eq!(state.removals.front().unwrap().removed_at, 5);
        assert_eq!(state.removals.back().unwrap().seq, MAX_REMOVALS as u64 + 5);
    }

    #[test]
    fn removals_are_sent_until_core_acknowledges_them() {
        let mut state = State::default();
        let peer = peer();
        let reason = ExpiryReason::NoHandshake {
            added_at: from_unix(0),
        };
        let seqs = |removals: Vec<Removal>| removals.iter().map(|r| r.seq).collect::<Vec<_>>();
        for at in 1..=3 {
            assert_eq!(
                state.record(Removal::new(&peer, reason, from_unix(at))),
                None
            );
        }
        // Sent, not acknowledged: sent again, within the limit.
        assert_eq!(seqs(state.unacked(10)), [1, 2, 3]);
        assert_eq!(seqs(state.unacked(10)), [1, 2, 3]);
        assert_eq!(seqs(state.unacked(2)), [1, 2]);
        assert!(state.acknowledge(2));
        assert!(!state.acknowledge(2), "an old acknowledgement is no news");
        assert!(!state.acknowledge(1));
        assert_eq!(seqs(state.unacked(10)), [3]);
        // An acknowledgement beyond the last record stops at it.
        assert!(state.acknowledge(99));
        assert_eq!(state.acked_seq, 3);
        assert!(state.unacked(10).is_empty());
        state.record(Removal::new(&peer, reason, from_unix(4)));
        assert_eq!(state.unacked(10)[0].removed_at, 4);
    }

    #[test]
    fn a_full_record_drops_the_oldest_and_says_when_core_never_heard_of_it() {
        let mut state = State::default();
        let peer = peer();
        let reason = ExpiryReason::NoHandshake {
            added_at: from_unix(0),
        };
        for n in 0..MAX_REMOVALS {
            state.record(Removal::new(&peer, reason, from_unix(n as u64)));
        }
        state.acknowledge(1);
        let dropped = state.record(Removal::new(&peer, reason, from_unix(0)));
        assert_eq!(dropped, None, "seq 1 was acknowledged");
        let dropped = state.record(Removal::new(&peer, reason, from_unix(0)));
        assert_eq!(dropped.map(|r| r.seq), Some(2));
    }

    #[test]
    fn an_older_file_counts_what_it_reported_as_acknowledged() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::new(dir.path(), "wg0");
        fs::write(
            store.path(),
            r#"{"version":1,"removal_seq":4,"reported_seq":3}"#,
        )
        .unwrap();
        assert_eq!(store.load().unwrap().acked_seq, 3);
    }

    #[test]
    fn an_older_state_file_without_location_fields_loads() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::new(dir.path(), "wg0");
        fs::write(
            store.path(),
            r#"{"version":1,"dynamic_peers":{},"added_at":{},"expired":[],
                "removals":[{"public_key":"AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=","removed_at":5,"reason":"idle"}]}"#,
        )
        .unwrap();
        let state = store.load().unwrap();
        assert_eq!(state.location, None);
        assert_eq!(state.removals[0].seq, 0);
        assert_eq!(state.removal_seq, 0);
    }
}
