//! Core's messages into the gateway's own types, checked field by field so
//! that a refusal names the field at fault; and the gateway's status into
//! Core's messages. Pure: no I/O.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, SystemTime},
};

use ipnet::IpNet;
use tidegate_proto::gateway::v1 as pb;

use crate::{
    ha::status::HaSummary,
    wireguard::{
        PeerSpec, PeersReply,
        key::Key,
        location::{Location, LocationDevice, LocationUpdate, PeerChanges},
        spec::check_peers,
        state::Removal,
    },
};

/// MTU bounds, as for the config file.
const MTU_MIN_V4: u32 = 576;
const MTU_MIN_V6: u32 = 1280;
const MTU_MAX: u32 = 9000;
/// Longest peer-disconnect threshold accepted: one week.
const MAX_THRESHOLD_S: u32 = 7 * 24 * 3600;

/// A message field that cannot be used, named by its path in the message
/// (`config.peers[2].allowed_ips[0]`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct FieldError {
    pub field: String,
    pub reason: String,
}

fn bad(field: impl Into<String>, reason: impl Into<String>) -> FieldError {
    FieldError {
        field: field.into(),
        reason: reason.into(),
    }
}

fn key(field: &str, bytes: &[u8]) -> Result<Key, FieldError> {
    let bytes: [u8; 32] = bytes.try_into().map_err(|_| {
        bad(
            field,
            format!("{} bytes; a WireGuard key is 32", bytes.len()),
        )
    })?;
    Ok(Key::new(bytes))
}

/// A location config from Core, checked.
pub fn location(config: &pb::LocationConfig) -> Result<LocationUpdate, FieldError> {
    if config.version == 0 {
        return Err(bad("config.version", "0 means \"no config\"; start at 1"));
    }
    let interface = config
        .interface
        .as_ref()
        .ok_or_else(|| bad("config.interface", "missing"))?;
    let private_key = key("config.interface.private_key", &interface.private_key)?;
    if private_key.is_zero() {
        return Err(bad("config.interface.private_key", "all zero"));
    }
    let listen_port = u16::try_from(interface.listen_port)
        .ok()
        .filter(|&port| port != 0)
        .ok_or_else(|| {
            bad(
                "config.interface.listen_port",
                format!(
                    "{} is not a UDP port clients can reach",
                    interface.listen_port
                ),
            )
        })?;
    let mut addresses = Vec::new();
    for (i, text) in interface.addresses.iter().enumerate() {
        let field = format!("config.interface.addresses[{i}]");
        let net: IpNet = text.trim().parse().map_err(|_| {
            bad(
                &field,
                format!("{text:?} is not an address with a prefix (like 10.8.0.1/24)"),
            )
        })?;
        if addresses.contains(&net) {
            return Err(bad(field, format!("{text:?} is listed twice")));
        }
        addresses.push(net);
    }
    let mtu = match interface.mtu {
        0 => None,
        mtu => {
            let min = if addresses.iter().any(|a| matches!(a, IpNet::V6(_))) {
                MTU_MIN_V6
            } else {
                MTU_MIN_V4
            };
            if !(min..=MTU_MAX).contains(&mtu) {
                return Err(bad(
                    "config.interface.mtu",
                    format!("{mtu} is outside {min}..={MTU_MAX} (0: the gateway's default)"),
                ));
            }
            Some(mtu)
        }
    };
    let mfa_threshold_secs = if config.mfa {
        let threshold = config.peer_disconnect_threshold_s;
        if threshold == 0 || threshold > MAX_THRESHOLD_S {
            return Err(bad(
                "config.peer_disconnect_threshold_s",
                format!("{threshold} is outside 1..={MAX_THRESHOLD_S} on an MFA location"),
            ));
        }
        Some(u64::from(threshold))
    } else {
        None
    };
    let mut specs = Vec::with_capacity(config.peers.len());
    for (i, peer) in config.peers.iter().enumerate() {
        specs.push(peer_spec(&format!("config.peers[{i}]"), peer)?);
    }
    check_peers(&specs).map_err(|e| bad("config.peers", e.to_string()))?;
    let peers: BTreeMap<Key, PeerSpec> = specs.into_iter().map(|p| (p.public_key, p)).collect();
    Ok(LocationUpdate::Full(Box::new(Location {
        version: config.version,
        location_id: config.location_id,
        name: config.location_name.clone(),
        device: LocationDevice {
            private_key: private_key.clamped(),
            listen_port,
            addresses,
            mtu,
            mfa_threshold_secs,
        },
        peers,
    })))
}

/// Peer changes from Core, checked on their own (the version they apply
/// to is checked by the WireGuard task, against what it runs).
pub fn changes(changes: &pb::PeerChanges) -> Result<LocationUpdate, FieldError> {
    if changes.version <= changes.base_version {
        return Err(bad(
            "changes.version",
            format!(
                "{} does not follow base_version {}",
                changes.version, changes.base_version
            ),
        ));
    }
    let mut upsert = Vec::with_capacity(changes.upsert.len());
    let mut seen = BTreeSet::new();
    for (i, peer) in changes.upsert.iter().enumerate() {
        let field = format!("changes.upsert[{i}]");
        let spec = peer_spec(&field, peer)?;
        if !seen.insert(spec.public_key) {
            return Err(bad(
                format!("{field}.public_key"),
                format!("{} is upserted twice", spec.public_key),
            ));
        }
        upsert.push(spec);
    }
    check_peers(&upsert).map_err(|e| bad("changes.upsert", e.to_string()))?;
    let mut remove = Vec::with_capacity(changes.remove.len());
    for (i, bytes) in changes.remove.iter().enumerate() {
        let field = format!("changes.remove[{i}]");
        let key = key(&field, bytes)?;
        if seen.contains(&key) {
            return Err(bad(field, format!("{key} is both upserted and removed")));
        }
        remove.push(key);
    }
    Ok(LocationUpdate::Changes(PeerChanges {
        base_version: changes.base_version,
        version: changes.version,
        upsert,
        remove,
    }))
}

fn peer_spec(field: &str, peer: &pb::Peer) -> Result<PeerSpec, FieldError> {
    let public_key = key(&format!("{field}.public_key"), &peer.public_key)?;
    let preshared_key = match peer.preshared_key.as_slice() {
        [] => None,
        bytes => Some(key(&format!("{field}.preshared_key"), bytes)?).filter(|k| !k.is_zero()),
    };
    let mut allowed_ips = BTreeSet::new();
    for (i, text) in peer.allowed_ips.iter().enumerate() {
        let field = format!("{field}.allowed_ips[{i}]");
        let net: IpNet = text
            .trim()
            .parse()
            .map_err(|_| bad(&field, format!("{text:?} is not a CIDR (like 10.8.0.2/32)")))?;
        if net.trunc() != net {
            return Err(bad(
                field,
                format!("{text:?} has host bits set; the network is {}", net.trunc()),
            ));
        }
        allowed_ips.insert(net);
    }
    let keepalive = u16::try_from(peer.persistent_keepalive_s).map_err(|_| {
        bad(
            format!("{field}.persistent_keepalive_s"),
            format!("{} is above 65535", peer.persistent_keepalive_s),
        )
    })?;
    Ok(PeerSpec {
        name: None,
        public_key,
        allowed_ips,
        preshared_key,
        persistent_keepalive: Some(keepalive).filter(|&s| s != 0),
        endpoint: None,
    })
}

/// The HA part of a status message.
pub fn ha_status(summary: &HaSummary) -> pb::HaStatus {
    pb::HaStatus {
        role: summary.role.name().to_owned(),
        priority: u32::from(summary.priority),
        effective_priority: u32::from(summary.effective_priority),
        healthy: summary.healthy,
        faults: summary.faults.clone(),
        master_id: summary.master.unwrap_or(0),
        maintenance: summary.maintenance,
    }
}

/// Peer stats for a status message.
pub fn peer_statuses(reply: &PeersReply) -> Vec<pb::PeerStatus> {
    reply
        .peers
        .iter()
        .map(|peer| pb::PeerStatus {
            public_key: peer.public_key.as_bytes().to_vec(),
            endpoint: peer.endpoint.clone().unwrap_or_default(),
            last_handshake_unix_ms: peer.last_handshake.map_or(0, secs_to_ms),
            rx_bytes: peer.rx_bytes,
            tx_bytes: peer.tx_bytes,
        })
        .collect()
}

/// MFA removals for a status message.
pub fn removals(removals: &[Removal]) -> Vec<pb::MfaRemoval> {
    removals
        .iter()
        .map(|removal| pb::MfaRemoval {
            public_key: removal.public_key.as_bytes().to_vec(),
            at_unix_ms: secs_to_ms(removal.removed_at),
            seq: removal.seq,
            reason: match removal.reason.as_str() {
                "idle" => {
                    "no handshake or data for longer than the peer-disconnect threshold".to_owned()
                }
                "no-handshake" => {
                    "no handshake within the peer-disconnect threshold after it was added"
                        .to_owned()
                }
                other => other.to_owned(),
            },
        })
        .collect()
}

fn secs_to_ms(secs: u64) -> i64 {
    i64::try_from(secs.saturating_mul(1000)).unwrap_or(i64::MAX)
}

/// `time` in Unix milliseconds.
pub fn unix_ms(time: SystemTime) -> i64 {
    let since = time
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or(Duration::ZERO);
    i64::try_from(since.as_millis()).unwrap_or(i64::MAX)
}

/// Cuts a status down to `limit` bytes encoded, dropping the peers whose
/// last handshake is oldest (the ones Core learns least from). Returns
/// how many were dropped.
pub fn fit_status(status: &mut pb::Status, limit: usize) -> usize {
    use prost::Message as _;
    let len = status.encoded_len();
    if len <= limit || status.peers.is_empty() {
        return 0;
    }
    // Peers are about the same size: drop a share, then trim one by one.
    let each = (len / status.peers.len()).max(1);
    let excess = (len - limit).div_ceil(each);
    status
        .peers
        .sort_unstable_by_key(|p| std::cmp::Reverse(p.last_handshake_unix_ms));
    let before = status.peers.len();
    status.peers.truncate(before.saturating_sub(excess));
    while status.encoded_len() > limit && status.peers.pop().is_some() {}
    before - status.peers.len()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ha::machine::Role;

    fn pb_peer(n: u8) -> pb::Peer {
        pb::Peer {
            public_key: vec![n; 32],
            preshared_key: vec![n + 100; 32],
            allowed_ips: vec![format!("10.8.0.{n}/32")],
            persistent_keepalive_s: 25,
        }
    }

    fn config() -> pb::LocationConfig {
        pb::LocationConfig {
            version: 3,
            location_id: 7,
            location_name: "lab".into(),
            interface: Some(pb::WireguardInterface {
                private_key: vec![1; 32],
                listen_port: 51820,
                addresses: vec!["10.8.0.1/24".into()],
                mtu: 0,
            }),
            mfa: true,
            peer_disconnect_threshold_s: 300,
            peers: vec![pb_peer(2), pb_peer(3)],
        }
    }

    #[test]
    fn a_good_config_converts() {
        let LocationUpdate::Full(location) = location(&config()).unwrap() else {
            panic!("not a full config");
        };
        assert_eq!(location.version, 3);
        assert_eq!(location.location_id, 7);
        assert_eq!(location.device.listen_port, 51820);
        assert_eq!(location.device.private_key, Key::new([1; 32]).clamped());
        assert_eq!(location.device.mtu, None);
        assert_eq!(location.device.mfa_threshold_secs, Some(300));
        let peer = &location.peers[&Key::new([2; 32])];
        assert_eq!(peer.preshared_key, Some(Key::new([102; 32])));
        assert_eq!(peer.persistent_keepalive, Some(25));
    }

    #[test]
    fn config_errors_name_the_field() {
        type Edit = fn(&mut pb::LocationConfig);
        let cases: [(Edit, &str); 11] = [
            (|c| c.version = 0, "config.version: 0 means"),
            (|c| c.interface = None, "config.interface: missing"),
            (
                |c| c.interface.as_mut().unwrap().private_key = vec![1; 31],
                "config.interface.private_key: 31 bytes",
            ),
            (
                |c| c.interface.as_mut().unwrap().listen_port = 70000,
                "config.interface.listen_port: 70000",
            ),
            (
                |c| c.interface.as_mut().unwrap().addresses = vec!["10.8.0.1".into()],
                "config.interface.addresses[0]: \"10.8.0.1\" is not an address with a prefix",
            ),
            (
                |c| c.interface.as_mut().unwrap().mtu = 100,
                "config.interface.mtu: 100 is outside",
            ),
            (
                |c| c.peer_disconnect_threshold_s = 0,
                "config.peer_disconnect_threshold_s: 0 is outside",
            ),
            (
                |c| c.peers[1].public_key = vec![],
                "config.peers[1].public_key: 0 bytes",
            ),
            (
                |c| c.peers[0].allowed_ips = vec!["10.8.0.0/16".into(), "10.8.0.5/24".into()],
                "config.peers[0].allowed_ips[1]: \"10.8.0.5/24\" has host bits set",
            ),
            (
                |c| c.peers[0].persistent_keepalive_s = 70000,
                "config.peers[0].persistent_keepalive_s: 70000 is above 65535",
            ),
            (
                |c| c.peers[1].allowed_ips = vec!["10.8.0.2/32".into()],
                "config.peers: peer",
            ),
        ];
        for (edit, expected) in cases {
            let mut c = config();
            edit(&mut c);
            let error = location(&c).unwrap_err().to_string();
            assert!(error.starts_with(expected), "{expected}: {error}");
        }
        let mut no_mfa = config();
        no_mfa.mfa = false;
        no_mfa.peer_disconnect_threshold_s = 0;
        assert!(location(&no_mfa).is_ok());
    }

    #[test]
    fn changes_are_checked_on_their_own() {
        let good = pb::PeerChanges {
            base_version: 3,
            version: 4,
            upsert: vec![pb_peer(4)],
            remove: vec![vec![2; 32]],
        };
        let LocationUpdate::Changes(ok) = changes(&good).unwrap() else {
            panic!("not changes");
        };
        assert_eq!((ok.base_version, ok.version), (3, 4));
        assert_eq!(ok.remove, [Key::new([2; 32])]);

        let mut same = good.clone();
        same.version = 3;
        let error = changes(&same).unwrap_err().to_string();
        assert!(
            error.starts_with("changes.version: 3 does not follow"),
            "{error}"
        );

        let mut twice = good.clone();
        twice.upsert.push(pb_peer(4));
        let error = changes(&twice).unwrap_err().to_string();
        assert!(error.starts_with("changes.upsert[1].public_key"), "{error}");

        let mut both = good.clone();
        both.remove.push(vec![4; 32]);
        let error = changes(&both).unwrap_err().to_string();
        assert!(
            error.starts_with("changes.remove[1]: ") && error.contains("both upserted and removed"),
            "{error}"
        );

        let mut short = good;
        short.remove = vec![vec![1; 3]];
        let error = changes(&short).unwrap_err().to_string();
        assert!(error.starts_with("changes.remove[0]: 3 bytes"), "{error}");
    }

    #[test]
    fn status_parts_convert() {
        let summary = HaSummary {
            role: Role::Master,
            priority: 150,
            effective_priority: 100,
            healthy: true,
            faults: vec!["uplink0 down".into()],
            master: Some(2),
            maintenance: false,
        };
        let ha = ha_status(&summary);
        assert_eq!(ha.role, "master");
        assert_eq!(
            (ha.priority, ha.effective_priority, ha.master_id),
            (150, 100, 2)
        );
        let removal = Removal {
            seq: 1,
            public_key: Key::new([5; 32]),
            name: None,
            removed_at: 1_700_000_000,
            reason: "idle".into(),
            last_active: Some(1),
        };
        let out = removals(&[removal]);
        assert_eq!(out[0].at_unix_ms, 1_700_000_000_000);
        assert!(out[0].reason.contains("peer-disconnect threshold"));
        assert_eq!(out[0].public_key, vec![5; 32]);
    }

    #[test]
    fn a_status_over_the_limit_keeps_the_peers_heard_from_last() {
        use prost::Message as _;
        let peer = |n: u8| pb::PeerStatus {
            public_key: vec![n; 32],
            endpoint: "198.51.100.7:51820".into(),
            last_handshake_unix_ms: i64::from(n),
            rx_bytes: 1,
            tx_bytes: 1,
        };
        let mut status = pb::Status {
            peers: (1..=100).map(peer).collect(),
            at_unix_ms: 1,
            ..Default::default()
        };
        let whole = status.encoded_len();
        assert_eq!(fit_status(&mut status, whole), 0);
        assert_eq!(status.peers.len(), 100);
        let limit = whole * 3 / 10;
        let dropped = fit_status(&mut status, limit);
        assert!(status.encoded_len() <= limit);
        assert_eq!(dropped + status.peers.len(), 100);
        assert!(status.peers.len() >= 29, "{}", status.peers.len());
        assert!(
            status
                .peers
                .iter()
                .all(|p| p.last_handshake_unix_ms > 100 - 30)
        );
    }
}
