//! The one path every change takes: compare what is wanted with what the
//! device has, and produce the smallest set of operations that closes the
//! gap. Pure: no I/O, so it is tested without a device.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::SocketAddr,
    time::SystemTime,
};

use ipnet::IpNet;
use serde::Serialize;

use super::{key::Key, spec::PeerSpec};

/// The device as the operator wants it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Desired {
    /// `None`: not configured yet (a gateway waiting for Core's location
    /// config); the device's key is left as it is.
    pub private_key: Option<Key>,
    /// `None`: not configured yet; the device's port is left as it is.
    pub listen_port: Option<u16>,
    pub peers: BTreeMap<Key, PeerSpec>,
}

/// The device as it is, read back from WireGuard.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Actual {
    pub private_key: Option<Key>,
    pub listen_port: u16,
    pub peers: BTreeMap<Key, ActualPeer>,
}

/// One peer as WireGuard reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ActualPeer {
    pub preshared_key: Option<Key>,
    pub endpoint: Option<SocketAddr>,
    pub persistent_keepalive: Option<u16>,
    pub allowed_ips: BTreeSet<IpNet>,
    pub last_handshake: Option<SystemTime>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

/// What happens to one peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum OpKind {
    Add,
    Update,
    Remove,
}

/// One peer operation. `None` fields are left as they are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerOp {
    pub kind: OpKind,
    pub public_key: Key,
    /// `Some(zero key)` removes the preshared key.
    pub preshared_key: Option<Key>,
    /// `Some(0)` turns keepalives off.
    pub persistent_keepalive: Option<u16>,
    pub endpoint: Option<SocketAddr>,
    /// Replaces the peer's allowed IPs.
    pub allowed_ips: Option<Vec<IpNet>>,
}

impl PeerOp {
    fn remove(public_key: Key) -> Self {
        Self {
            kind: OpKind::Remove,
            public_key,
            preshared_key: None,
            persistent_keepalive: None,
            endpoint: None,
            allowed_ips: None,
        }
    }
}

/// The operations that take the device from actual to desired.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Applied first and on its own: a port in use then fails before
    /// anything else has changed.
    pub listen_port: Option<u16>,
    pub private_key: Option<Key>,
    /// The peers below replace every peer on the device (see
    /// [`replace_all`]).
    pub replace_peers: bool,
    pub peers: Vec<PeerOp>,
    /// The mark on the device's own packets (`None`: left as it is), so
    /// policy routing can send them around a tunnel that routes
    /// everything.
    pub fwmark: Option<u32>,
}

/// How many operations a plan holds, for logs and the benchmark.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct PlanSummary {
    pub added: usize,
    pub updated: usize,
    pub removed: usize,
    /// Device-level settings changed (listen port, private key).
    pub device: usize,
}

impl PlanSummary {
    /// Total operations.
    pub fn total(&self) -> usize {
        self.added + self.updated + self.removed + self.device
    }
}

impl Plan {
    /// True when the device already matches.
    pub fn is_empty(&self) -> bool {
        self.listen_port.is_none()
            && self.private_key.is_none()
            && !self.replace_peers
            && self.peers.is_empty()
    }

    /// Counts of each kind of operation.
    pub fn summary(&self) -> PlanSummary {
        let count = |kind| self.peers.iter().filter(|op| op.kind == kind).count();
        PlanSummary {
            added: count(OpKind::Add),
            updated: count(OpKind::Update),
            removed: count(OpKind::Remove),
            device: usize::from(self.listen_port.is_some())
                + usize::from(self.private_key.is_some()),
        }
    }
}

/// Computes the plan. `known_endpoints` are endpoints learned before the
/// device lost its peers (a restarted wireguard-go): a re-added peer gets
/// its last endpoint back, so the gateway can reach it before it speaks.
///
/// An endpoint is only ever set on a peer that has none: WireGuard learns a
/// roaming client's endpoint from its packets, and overwriting it with a
/// configured one would cut the client off.
pub fn plan(
    desired: &Desired,
    actual: &Actual,
    known_endpoints: &HashMap<Key, SocketAddr>,
) -> Plan {
    let mut plan = Plan {
        listen_port: desired
            .listen_port
            .filter(|&port| port != actual.listen_port),
        private_key: desired
            .private_key
            .filter(|&key| actual.private_key != Some(key)),
        replace_peers: false,
        peers: Vec::new(),
        fwmark: None,
    };
    for (key, want) in &desired.peers {
        let op = match actual.peers.get(key) {
            None => Some(PeerOp {
                kind: OpKind::Add,
                public_key: *key,
                preshared_key: want.preshared_key,
                persistent_keepalive: want.persistent_keepalive,
                endpoint: want.endpoint.or_else(|| known_endpoints.get(key).copied()),
                allowed_ips: Some(want.allowed_ips.iter().copied().collect()),
            }),
            Some(have) => update(*key, want, have),
        };
        plan.peers.extend(op);
    }
    plan.peers.extend(
        actual
            .peers
            .keys()
            .filter(|key| !desired.peers.contains_key(key))
            .map(|&key| PeerOp::remove(key)),
    );
    plan
}

/// The fields of an existing peer that differ, or `None` if none do.
/// The plan that puts every desired peer on the device in place of all it
/// has, in one request: WireGuard drops the sessions of each peer it
/// replaces (and any handshake it was retrying), whatever their number.
/// Each peer gets its settings and its last known endpoint back.
pub fn replace_all(
    desired: &Desired,
    actual: &Actual,
    known_endpoints: &HashMap<Key, SocketAddr>,
) -> Plan {
    let empty = Actual {
        peers: BTreeMap::new(),
        ..actual.clone()
    };
    Plan {
        replace_peers: true,
        ..plan(desired, &empty, known_endpoints)
    }
}

fn update(key: Key, want: &PeerSpec, have: &ActualPeer) -> Option<PeerOp> {
    let op = PeerOp {
        kind: OpKind::Update,
        public_key: key,
        preshared_key: (want.preshared_key != have.preshared_key)
            .then(|| want.preshared_key.unwrap_or(Key::new([0; 32]))),
        persistent_keepalive: (want.persistent_keepalive != have.persistent_keepalive)
            .then(|| want.persistent_keepalive.unwrap_or(0)),
        endpoint: want.endpoint.filter(|_| have.endpoint.is_none()),
        allowed_ips: (want.allowed_ips != have.allowed_ips)
            .then(|| want.allowed_ips.iter().copied().collect()),
    };
    let changed = op.preshared_key.is_some()
        || op.persistent_keepalive.is_some()
        || op.endpoint.is_some()
        || op.allowed_ips.is_some();
    changed.then_some(op)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(n: u8) -> Key {
        Key::new([n; 32])
    }

    fn spec(n: u8, ip: &str) -> PeerSpec {
        PeerSpec {
            name: None,
            public_key: k(n),
            allowed_ips: [ip.parse().unwrap()].into(),
            preshared_key: None,
            persistent_keepalive: None,
            endpoint: None,
        }
    }

    fn actual_of(spec: &PeerSpec) -> ActualPeer {
        ActualPeer {
            preshared_key: spec.preshared_key,
            endpoint: spec.endpoint,
            persistent_keepalive: spec.persistent_keepalive,
            allowed_ips: spec.allowed_ips.clone(),
            ..ActualPeer::default()
        }
    }

    fn desired(peers: &[PeerSpec]) -> Desired {
        Desired {
            private_key: Some(k(100)),
            listen_port: Some(51820),
            peers: peers.iter().map(|p| (p.public_key, p.clone())).collect(),
        }
    }

    fn in_sync(desired: &Desired) -> Actual {
        Actual {
            private_key: desired.private_key,
            listen_port: desired.listen_port.unwrap_or(0),
            peers: desired
                .peers
                .iter()
                .map(|(key, p)| (*key, actual_of(p)))
                .collect(),
        }
    }

    #[test]
    fn an_empty_device_gets_everything() {
        let want = desired(&[spec(1, "10.0.0.2/32"), spec(2, "10.0.0.3/32")]);
        let plan = plan(&want, &Actual::default(), &HashMap::new());
        assert_eq!(plan.listen_port, Some(51820));
        assert_eq!(plan.private_key, Some(k(100)));
        assert_eq!(
            plan.summary(),
            PlanSummary {
                added: 2,
                updated: 0,
                removed: 0,
                device: 2
            }
        );
        assert_eq!(
            plan.peers[0].allowed_ips,
            Some(vec!["10.0.0.2/32".parse().unwrap()])
        );
    }

    #[test]
    fn a_device_in_sync_needs_nothing() {
        let want = desired(&[spec(1, "10.0.0.2/32")]);
        let mut have = in_sync(&want);
        // Traffic and a learned endpoint are not differences.
        let peer = have.peers.get_mut(&k(1)).unwrap();
        peer.endpoint = Some("198.51.100.9:4000".parse().unwrap());
        peer.rx_bytes = 1000;
        assert!(plan(&want, &have, &HashMap::new()).is_empty());
    }

    #[test]
    fn only_what_changed_is_touched() {
        let before = desired(&[
            spec(1, "10.0.0.2/32"),
            spec(2, "10.0.0.3/32"),
            spec(3, "10.0.0.4/32"),
        ]);
        let have = in_sync(&before);
        let mut changed = spec(2, "10.0.0.3/32");
        changed.preshared_key = Some(k(50));
        changed.persistent_keepalive = Some(25);
        let want = desired(&[spec(1, "10.0.0.2/32"), changed, spec(4, "10.0.0.5/32")]);
        let plan = plan(&want, &have, &HashMap::new());
        assert_eq!(plan.listen_port, None);
        assert_eq!(plan.private_key, None);
        assert_eq!(
            plan.peers,
            vec![
                PeerOp {
                    kind: OpKind::Update,
                    public_key: k(2),
                    preshared_key: Some(k(50)),
                    persistent_keepalive: Some(25),
                    endpoint: None,
                    allowed_ips: None,
                },
                PeerOp {
                    kind: OpKind::Add,
                    public_key: k(4),
                    preshared_key: None,
                    persistent_keepalive: None,
                    endpoint: None,
                    allowed_ips: Some(vec!["10.0.0.5/32".parse().unwrap()]),
                },
                PeerOp::remove(k(3)),
            ]
        );
    }

    #[test]
    fn clearing_a_psk_and_keepalive_writes_zeroes() {
        let mut with = spec(1, "10.0.0.2/32");
        with.preshared_key = Some(k(7));
        with.persistent_keepalive = Some(10);
        let have = in_sync(&desired(&[with]));
        let plan = plan(&desired(&[spec(1, "10.0.0.2/32")]), &have, &HashMap::new());
        assert_eq!(plan.peers[0].preshared_key, Some(k(0)));
        assert_eq!(plan.peers[0].persistent_keepalive, Some(0));
    }

    #[test]
    fn allowed_ips_are_replaced_as_a_set() {
        let have = in_sync(&desired(&[spec(1, "10.0.0.2/32")]));
        let plan = plan(&desired(&[spec(1, "10.0.0.9/32")]), &have, &HashMap::new());
        assert_eq!(
            plan.peers[0].allowed_ips,
            Some(vec!["10.0.0.9/32".parse().unwrap()])
        );
    }

    #[test]
    fn endpoints_never_overwrite_a_learned_one() {
        let mut configured = spec(1, "10.0.0.2/32");
        configured.endpoint = Some("198.51.100.7:51820".parse().unwrap());
        let want = desired(&[configured]);
        let mut have = in_sync(&want);
        have.peers.get_mut(&k(1)).unwrap().endpoint = Some("198.51.100.8:3000".parse().unwrap());
        assert!(plan(&want, &have, &HashMap::new()).is_empty());
        have.peers.get_mut(&k(1)).unwrap().endpoint = None;
        let plan = plan(&want, &have, &HashMap::new());
        assert_eq!(
            plan.peers[0].endpoint,
            Some("198.51.100.7:51820".parse().unwrap())
        );
    }

    #[test]
    fn replacing_every_peer_puts_each_back_with_its_settings_and_nothing_else() {
        let want = desired(&[spec(1, "10.0.0.2/32"), spec(2, "10.0.0.3/32")]);
        let mut have = in_sync(&want);
        have.peers.insert(k(3), actual_of(&spec(3, "10.0.0.4/32")));
        let known = HashMap::from([(k(2), "198.51.100.2:40000".parse().unwrap())]);
        let plan = replace_all(&want, &have, &known);
        assert!(plan.replace_peers && !plan.is_empty());
        // The device keeps its key and port: no device-level change.
        assert_eq!((plan.listen_port, plan.private_key), (None, None));
        let added: Vec<_> = plan
            .peers
            .iter()
            .map(|op| (op.kind, op.public_key, op.endpoint))
            .collect();
        assert_eq!(
            added,
            [
                (OpKind::Add, k(1), None),
                (OpKind::Add, k(2), known.get(&k(2)).copied()),
            ],
            "the unwanted peer goes with the replacement, not by an op of its own"
        );
        let none = desired(&[]);
        let emptied = replace_all(&none, &have, &HashMap::new());
        assert!(emptied.replace_peers && emptied.peers.is_empty() && !emptied.is_empty());
    }

    #[test]
    fn re_added_peers_get_their_last_endpoint() {
        let want = desired(&[spec(1, "10.0.0.2/32"), spec(2, "10.0.0.3/32")]);
        let known = HashMap::from([(k(1), "198.51.100.2:40000".parse().unwrap())]);
        let plan = plan(&want, &Actual::default(), &known);
        assert_eq!(known.get(&k(1)).copied(), plan.peers[0].endpoint);
        assert_eq!(plan.peers[1].endpoint, None);
    }

    #[test]
    fn an_unconfigured_key_and_port_are_left_alone() {
        let mut want = desired(&[spec(1, "10.0.0.2/32")]);
        want.private_key = None;
        want.listen_port = None;
        let have = Actual {
            private_key: Some(k(7)),
            listen_port: 40000,
            ..Actual::default()
        };
        let plan = plan(&want, &have, &HashMap::new());
        assert_eq!(plan.private_key, None);
        assert_eq!(plan.listen_port, None);
        assert_eq!(plan.summary().added, 1);
    }

    #[test]
    fn a_new_key_or_port_is_a_device_change() {
        let want = desired(&[]);
        let mut have = in_sync(&want);
        have.listen_port = 1;
        have.private_key = Some(k(1));
        let plan = plan(&want, &have, &HashMap::new());
        assert_eq!(plan.summary().device, 2);
        assert_eq!(plan.summary().total(), 2);
    }
}
