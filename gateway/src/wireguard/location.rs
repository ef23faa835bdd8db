//! The location config Core manages on a gateway: the device settings it
//! shares with every gateway of the location, its peers, the version they
//! carry, and how peer changes apply on top of it. Pure: no I/O.

use std::collections::BTreeMap;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::{key::Key, spec::PeerSpec};

/// The device settings of a location, as Core sends them.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocationDevice {
    /// Shared by every gateway of the location.
    pub private_key: Key,
    pub listen_port: u16,
    /// The gateway side's tunnel addresses, with their prefix.
    pub addresses: Vec<IpNet>,
    /// `None`: the gateway's own MTU (its file's, else the default).
    pub mtu: Option<u32>,
    /// The MFA peer-disconnect threshold in seconds; `None` without MFA.
    pub mfa_threshold_secs: Option<u64>,
}

impl std::fmt::Debug for LocationDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocationDevice")
            .field("private_key", &"set")
            .field("listen_port", &self.listen_port)
            .field("addresses", &self.addresses)
            .field("mtu", &self.mtu)
            .field("mfa_threshold_secs", &self.mfa_threshold_secs)
            .finish()
    }
}

/// A whole location config from Core.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Location {
    /// Grows with every change Core makes; never 0.
    pub version: u64,
    pub location_id: u32,
    pub name: String,
    pub device: LocationDevice,
    /// The peers Core manages, by key.
    pub peers: BTreeMap<Key, PeerSpec>,
}

/// Peer changes on top of the config version they name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerChanges {
    pub base_version: u64,
    /// The version once applied; greater than `base_version`.
    pub version: u64,
    /// Added or changed peers, whole.
    pub upsert: Vec<PeerSpec>,
    /// Keys of removed peers. A key the gateway does not have is no error:
    /// an MFA location may have removed it already.
    pub remove: Vec<Key>,
}

/// What Core asks a gateway to apply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LocationUpdate {
    /// Replaces everything Core manages.
    Full(Box<Location>),
    /// On top of the version the gateway runs.
    Changes(PeerChanges),
}

impl LocationUpdate {
    /// The version the gateway runs once this is applied.
    pub fn version(&self) -> u64 {
        match self {
            Self::Full(location) => location.version,
            Self::Changes(changes) => changes.version,
        }
    }
}

/// Why an update cannot be applied to the config the gateway runs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LocationError {
    #[error(
        "changes: base_version {base} names a config, but this gateway has none yet: send the full config"
    )]
    NoConfig { base: u64 },
    #[error(
        "changes: base_version {base} differs from the version this gateway runs, {current}: send the full config"
    )]
    Version { base: u64, current: u64 },
}

impl Location {
    /// The location with `changes` applied, or why they do not apply. A
    /// key removed and upserted in one message is refused earlier, when
    /// the message is read.
    pub fn with_changes(&self, changes: &PeerChanges) -> Result<Self, LocationError> {
        if changes.base_version != self.version {
            return Err(LocationError::Version {
                base: changes.base_version,
                current: self.version,
            });
        }
        let mut next = self.clone();
        next.version = changes.version;
        for key in &changes.remove {
            next.peers.remove(key);
        }
        for peer in &changes.upsert {
            next.peers.insert(peer.public_key, peer.clone());
        }
        Ok(next)
    }
}

/// The location config after `update`, given the one the gateway runs.
pub fn updated(
    current: Option<&Location>,
    update: &LocationUpdate,
) -> Result<Location, LocationError> {
    match (update, current) {
        (LocationUpdate::Full(location), _) => Ok((**location).clone()),
        (LocationUpdate::Changes(changes), Some(current)) => current.with_changes(changes),
        (LocationUpdate::Changes(changes), None) => Err(LocationError::NoConfig {
            base: changes.base_version,
        }),
    }
}

/// Core's peers an MFA location removed, with the preshared key each had.
pub type Expired = BTreeMap<Key, Option<Key>>;

/// Keeps the peers an MFA location removed out of `next` (the config after
/// `update`) until Core sends them with another preshared key, a new MFA
/// login: a config that crossed the removal on the wire must not bring
/// the old session back. Forgets a removal once Core has dropped the peer
/// or sent it anew. Returns the keys kept out.
pub fn keep_out_expired(
    expired: &mut Expired,
    update: &LocationUpdate,
    next: &mut Location,
) -> Vec<Key> {
    match update {
        LocationUpdate::Full(location) => expired.retain(|key, psk| {
            location
                .peers
                .get(key)
                .is_some_and(|peer| peer.preshared_key == *psk)
        }),
        LocationUpdate::Changes(changes) => {
            for key in &changes.remove {
                expired.remove(key);
            }
            for peer in &changes.upsert {
                if expired.get(&peer.public_key) != Some(&peer.preshared_key) {
                    expired.remove(&peer.public_key);
                }
            }
        }
    }
    let kept_out: Vec<Key> = next
        .peers
        .keys()
        .filter(|key| expired.contains_key(key))
        .copied()
        .collect();
    for key in &kept_out {
        next.peers.remove(key);
    }
    kept_out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    fn peer(n: u8) -> PeerSpec {
        PeerSpec {
            name: None,
            public_key: Key::new([n; 32]),
            allowed_ips: BTreeSet::from([format!("10.8.0.{n}/32").parse().unwrap()]),
            preshared_key: None,
            persistent_keepalive: None,
            endpoint: None,
        }
    }

    fn location(version: u64, peers: &[u8]) -> Location {
        Location {
            version,
            location_id: 1,
            name: "lab".into(),
            device: LocationDevice {
                private_key: Key::new([9; 32]),
                listen_port: 51820,
                addresses: vec!["10.8.0.1/24".parse().unwrap()],
                mtu: None,
                mfa_threshold_secs: None,
            },
            peers: peers
                .iter()
                .map(|&n| (Key::new([n; 32]), peer(n)))
                .collect(),
        }
    }

    #[test]
    fn changes_apply_on_their_base_version() {
        let current = location(4, &[1, 2]);
        let mut changed = peer(2);
        changed.persistent_keepalive = Some(25);
        let changes = PeerChanges {
            base_version: 4,
            version: 5,
            upsert: vec![peer(3), changed.clone()],
            remove: vec![Key::new([1; 32]), Key::new([77; 32])],
        };
        let next = updated(Some(&current), &LocationUpdate::Changes(changes)).unwrap();
        assert_eq!(next.version, 5);
        assert_eq!(
            next.peers.keys().copied().collect::<Vec<_>>(),
            [Key::new([2; 32]), Key::new([3; 32])]
        );
        assert_eq!(next.peers[&Key::new([2; 32])], changed);
        assert_eq!(next.device, current.device);
    }

    #[test]
    fn changes_on_another_version_are_refused() {
        let current = location(4, &[1]);
        let changes = |base| {
            LocationUpdate::Changes(PeerChanges {
                base_version: base,
                version: base + 1,
                upsert: vec![peer(3)],
                remove: Vec::new(),
            })
        };
        assert_eq!(
            updated(Some(&current), &changes(3)),
            Err(LocationError::Version {
                base: 3,
                current: 4
            })
        );
        assert_eq!(
            updated(Some(&current), &changes(5)),
            Err(LocationError::Version {
                base: 5,
                current: 4
            })
        );
        let error = updated(None, &changes(4)).unwrap_err();
        assert_eq!(error, LocationError::NoConfig { base: 4 });
        assert!(
            error.to_string().contains("send the full config"),
            "{error}"
        );
    }

    #[test]
    fn a_full_config_replaces_whatever_runs() {
        let full = location(2, &[5]);
        let update = LocationUpdate::Full(Box::new(full.clone()));
        assert_eq!(update.version(), 2);
        assert_eq!(
            updated(Some(&location(9, &[1, 2])), &update),
            Ok(full.clone())
        );
        assert_eq!(updated(None, &update), Ok(full));
    }

    fn with_psk(n: u8, psk: u8) -> PeerSpec {
        PeerSpec {
            preshared_key: Some(Key::new([psk; 32])),
            ..peer(n)
        }
    }

    #[test]
    fn an_expired_session_stays_out_until_a_new_login() {
        let key = Key::new([2; 32]);
        let mut expired = Expired::from([(key, Some(Key::new([50; 32])))]);
        // A full config with the old session: kept out, still remembered.
        let mut full = location(3, &[1]);
        full.peers.insert(key, with_psk(2, 50));
        let update = LocationUpdate::Full(Box::new(full.clone()));
        let mut next = full.clone();
        assert_eq!(keep_out_expired(&mut expired, &update, &mut next), [key]);
        assert!(!next.peers.contains_key(&key) && next.peers.len() == 1);
        assert!(expired.contains_key(&key));
        // Changes upserting the old session: kept out too.
        let same = LocationUpdate::Changes(PeerChanges {
            base_version: 3,
            version: 4,
            upsert: vec![with_psk(2, 50)],
            remove: Vec::new(),
        });
        let mut next = next
            .with_changes(&PeerChanges {
                base_version: 3,
                version: 4,
                upsert: vec![with_psk(2, 50)],
                remove: Vec::new(),
            })
            .unwrap();
        assert_eq!(keep_out_expired(&mut expired, &same, &mut next), [key]);
        // A new login (another preshared key): back in, forgotten.
        let fresh = PeerChanges {
            base_version: 4,
            version: 5,
            upsert: vec![with_psk(2, 51)],
            remove: Vec::new(),
        };
        let mut next = next.with_changes(&fresh).unwrap();
        assert!(
            keep_out_expired(&mut expired, &LocationUpdate::Changes(fresh), &mut next).is_empty()
        );
        assert!(next.peers.contains_key(&key) && expired.is_empty());
    }

    #[test]
    fn a_removal_is_forgotten_once_core_drops_the_peer() {
        let key = Key::new([2; 32]);
        let mut expired = Expired::from([(key, None)]);
        let full = location(3, &[1]);
        let mut next = full.clone();
        keep_out_expired(
            &mut expired,
            &LocationUpdate::Full(Box::new(full)),
            &mut next,
        );
        assert!(expired.is_empty());
        let mut expired = Expired::from([(key, None)]);
        let removal = PeerChanges {
            base_version: 3,
            version: 4,
            upsert: Vec::new(),
            remove: vec![key],
        };
        let mut next = location(4, &[1]);
        keep_out_expired(&mut expired, &LocationUpdate::Changes(removal), &mut next);
        assert!(expired.is_empty());
    }

    #[test]
    fn the_private_key_is_not_printed() {
        let text = format!("{:?}", location(1, &[]));
        assert!(!text.contains(&Key::new([9; 32]).to_string()), "{text}");
    }
}
