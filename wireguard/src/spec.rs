//! What the operator wants on the WireGuard interface: the device settings
//! and the peers, validated as a whole before anything touches the device.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::SocketAddr,
};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::key::{Key, KeyError};

/// A peer as written in the config file or sent by `tidectl`: plain strings,
/// so that every mistake is reported with the field and the peer it is in.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerEntry {
    /// A label for logs and errors (a user or device name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The peer's public key, base64.
    pub public_key: String,
    /// Tunnel networks routed to the peer, as CIDRs.
    #[serde(default)]
    pub allowed_ips: Vec<String>,
    /// The preshared key, base64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preshared_key: Option<String>,
    /// Keepalive interval in seconds (0 or absent: off).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub persistent_keepalive: Option<u16>,
    /// Where to reach the peer before it has sent anything (site-to-site
    /// peers; roaming clients have none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
}

/// A validated peer.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerSpec {
    pub name: Option<String>,
    pub public_key: Key,
    /// Networks in canonical form (no host bits), sorted.
    pub allowed_ips: BTreeSet<IpNet>,
    pub preshared_key: Option<Key>,
    /// `None` when off.
    pub persistent_keepalive: Option<u16>,
    pub endpoint: Option<SocketAddr>,
}

impl fmt::Debug for PeerSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PeerSpec")
            .field("name", &self.name)
            .field("public_key", &self.public_key.to_string())
            .field("allowed_ips", &self.allowed_ips)
            .field("preshared_key", &self.preshared_key.map(|_| "set"))
            .field("persistent_keepalive", &self.persistent_keepalive)
            .field("endpoint", &self.endpoint)
            .finish()
    }
}

impl PeerSpec {
    /// How errors and logs name this peer.
    pub fn label(&self) -> PeerLabel {
        PeerLabel::new(self.name.as_deref(), &self.public_key.to_string())
    }
}

/// How a peer is named in errors: its name and public key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerLabel(String);

impl PeerLabel {
    fn new(name: Option<&str>, public_key: &str) -> Self {
        Self(match name {
            Some(name) => format!("{name:?} ({public_key})"),
            None => public_key.to_owned(),
        })
    }
}

impl fmt::Display for PeerLabel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A peer, or a set of peers, that cannot be applied.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("peer {peer}: {field}")]
    Key {
        peer: PeerLabel,
        field: &'static str,
        #[source]
        source: KeyError,
    },
    #[error("peer {peer}: allowed_ips: {value:?} is not a CIDR (like 10.0.0.2/32)")]
    BadCidr {
        peer: PeerLabel,
        value: String,
        #[source]
        source: ipnet::AddrParseError,
    },
    #[error("peer {peer}: allowed_ips: {value:?} has host bits set; the network is {network}")]
    HostBits {
        peer: PeerLabel,
        value: String,
        network: IpNet,
    },
    #[error(
        "peer {peer}: endpoint: {value:?} is not an address and port (like 198.51.100.7:51820)"
    )]
    BadEndpoint {
        peer: PeerLabel,
        value: String,
        #[source]
        source: std::net::AddrParseError,
    },
    #[error("peer {peer}: public_key is also the key of peer {other}")]
    DuplicateKey { peer: PeerLabel, other: PeerLabel },
    #[error("peer {peer}: allowed_ips: {network} overlaps {other_network} of peer {other}")]
    Overlap {
        peer: PeerLabel,
        network: IpNet,
        other: PeerLabel,
        other_network: IpNet,
    },
    #[error("no peer with public key {0}")]
    Unknown(Key),
}

impl PeerError {
    /// The label of a peer known only by the key text it was given.
    pub fn label_of(public_key: &str) -> PeerLabel {
        PeerLabel::new(None, public_key.trim())
    }
}

impl PeerEntry {
    /// Parses and checks every field.
    pub fn validate(&self) -> Result<PeerSpec, PeerError> {
        let label = || PeerLabel::new(self.name.as_deref(), self.public_key.trim());
        let key = |field, text: &str| {
            text.parse::<Key>().map_err(|source| PeerError::Key {
                peer: label(),
                field,
                source,
            })
        };
        let public_key = key("public_key", &self.public_key)?;
        let preshared_key = self
            .preshared_key
            .as_deref()
            .map(|text| key("preshared_key", text))
            .transpose()?
            .filter(|psk| !psk.is_zero());
        let mut allowed_ips = BTreeSet::new();
        for value in &self.allowed_ips {
            let network: IpNet = value.trim().parse().map_err(|source| PeerError::BadCidr {
                peer: label(),
                value: value.clone(),
                source,
            })?;
            if network.trunc() != network {
                return Err(PeerError::HostBits {
                    peer: label(),
                    value: value.clone(),
                    network: network.trunc(),
                });
            }
            allowed_ips.insert(network);
        }
        let endpoint = self
            .endpoint
            .as_deref()
            .map(|value| {
                value
                    .trim()
                    .parse()
                    .map_err(|source| PeerError::BadEndpoint {
                        peer: label(),
                        value: value.to_owned(),
                        source,
                    })
            })
            .transpose()?;
        Ok(PeerSpec {
            name: self.name.clone(),
            public_key,
            allowed_ips,
            preshared_key,
            persistent_keepalive: self.persistent_keepalive.filter(|&s| s != 0),
            endpoint,
        })
    }
}

/// Checks that `peers` have distinct keys and that no two peers' allowed
/// IPs overlap, and returns them by key. Errors name first the peer that
/// comes later in `peers`: put a new peer last to have it named.
pub fn check_peers<'a>(
    peers: impl IntoIterator<Item = &'a PeerSpec>,
) -> Result<BTreeMap<Key, &'a PeerSpec>, PeerError> {
    let mut by_key: BTreeMap<Key, (usize, &PeerSpec)> = BTreeMap::new();
    for (order, peer) in peers.into_iter().enumerate() {
        if let Some((_, other)) = by_key.insert(peer.public_key, (order, peer)) {
            return Err(PeerError::DuplicateKey {
                peer: peer.label(),
                other: other.label(),
            });
        }
    }
    check_overlaps(&by_key)?;
    Ok(by_key
        .into_iter()
        .map(|(key, (_, peer))| (key, peer))
        .collect())
}

/// CIDR blocks are either nested or disjoint, so after sorting by start a
/// block overlaps an earlier one exactly when it starts before the widest
/// earlier block ends.
fn check_overlaps(peers: &BTreeMap<Key, (usize, &PeerSpec)>) -> Result<(), PeerError> {
    let mut blocks: Vec<(bool, u128, u128, IpNet, Key)> = peers
        .values()
        .flat_map(|(_, peer)| {
            peer.allowed_ips.iter().map(|&net| {
                let (v6, start, end) = range(net);
                (v6, start, end, net, peer.public_key)
            })
        })
        .collect();
    blocks.sort_unstable_by_key(|&(v6, start, end, ..)| (v6, start, std::cmp::Reverse(end)));
    let mut open: Option<(bool, u128, IpNet, Key)> = None;
    for (v6, start, end, net, key) in blocks {
        if let Some((open_v6, open_end, open_net, open_key)) = open
            && open_v6 == v6
            && start <= open_end
        {
            if open_key != key {
                let (this, other) = (peers[&key], peers[&open_key]);
                let ((_, later), later_net, (_, earlier), earlier_net) = if this.0 > other.0 {
                    (this, net, other, open_net)
                } else {
                    (other, open_net, this, net)
                };
                return Err(PeerError::Overlap {
                    peer: later.label(),
                    network: later_net,
                    other: earlier.label(),
                    other_network: earlier_net,
                });
            }
            continue;
        }
        open = Some((v6, end, net, key));
    }
    Ok(())
}

/// A network's family and first and last address as integers.
fn range(net: IpNet) -> (bool, u128, u128) {
    match net {
        IpNet::V4(n) => (
            false,
            u32::from(n.network()).into(),
            u32::from(n.broadcast()).into(),
        ),
        IpNet::V6(n) => (true, n.network().into(), n.broadcast().into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidegate_proto::error_chain;

    pub(crate) fn key(n: u8) -> String {
        Key::new([n; 32]).to_string()
    }

    fn entry(n: u8, ips: &[&str]) -> PeerEntry {
        PeerEntry {
            name: Some(format!("p{n}")),
            public_key: key(n),
            allowed_ips: ips.iter().map(|s| (*s).to_owned()).collect(),
            ..PeerEntry::default()
        }
    }

    #[test]
    fn validates_a_full_entry() {
        let mut e = entry(1, &["10.0.0.2/32", "2001:db8::/64"]);
        e.preshared_key = Some(key(9));
        e.persistent_keepalive = Some(25);
        e.endpoint = Some("198.51.100.7:51820".into());
        let spec = e.validate().unwrap();
        assert_eq!(spec.public_key, Key::new([1; 32]));
        assert_eq!(spec.preshared_key, Some(Key::new([9; 32])));
        assert_eq!(spec.persistent_keepalive, Some(25));
        assert_eq!(spec.allowed_ips.len(), 2);
        assert_eq!(spec.endpoint, Some("198.51.100.7:51820".parse().unwrap()));
    }

    #[test]
    fn zero_keepalive_and_zero_psk_mean_none() {
        let mut e = entry(1, &[]);
        e.preshared_key = Some(Key::new([0; 32]).to_string());
        e.persistent_keepalive = Some(0);
        let spec = e.validate().unwrap();
        assert_eq!(spec.preshared_key, None);
        assert_eq!(spec.persistent_keepalive, None);
    }

    #[test]
    fn errors_name_the_peer_and_the_field() {
        let cases: Vec<(PeerEntry, &str)> = vec![
            (
                PeerEntry {
                    public_key: "abc".into(),
                    ..entry(1, &[])
                },
                "peer \"p1\" (abc): public_key: not valid base64",
            ),
            (
                PeerEntry {
                    public_key: "AAAA".into(),
                    ..entry(1, &[])
                },
                "public_key: decodes to 3 bytes, a WireGuard key is 32",
            ),
            (
                PeerEntry {
                    preshared_key: Some("!!".into()),
                    ..entry(1, &[])
                },
                "preshared_key: not valid base64",
            ),
            (
                entry(1, &["10.0.0.300/32"]),
                "allowed_ips: \"10.0.0.300/32\" is not a CIDR",
            ),
            (entry(1, &["10.0.0.2"]), "is not a CIDR"),
            (
                entry(1, &["10.0.0.1/24"]),
                "\"10.0.0.1/24\" has host bits set; the network is 10.0.0.0/24",
            ),
            (
                PeerEntry {
                    endpoint: Some("example.org:51820".into()),
                    ..entry(1, &[])
                },
                "endpoint: \"example.org:51820\" is not an address and port",
            ),
        ];
        for (e, expected) in cases {
            let error = error_chain(&e.validate().unwrap_err());
            assert!(error.contains(expected), "{error}");
            assert!(error.starts_with("peer \"p1\""), "{error}");
        }
    }

    fn specs(entries: &[PeerEntry]) -> Vec<PeerSpec> {
        entries.iter().map(|e| e.validate().unwrap()).collect()
    }

    #[test]
    fn duplicate_keys_are_refused() {
        let mut second = entry(1, &["10.0.0.3/32"]);
        second.name = Some("again".into());
        let peers = specs(&[entry(1, &["10.0.0.2/32"]), second]);
        let error = check_peers(&peers).unwrap_err().to_string();
        assert!(
            error.starts_with("peer \"again\"") && error.contains("also the key of peer \"p1\""),
            "{error}"
        );
    }

    #[test]
    fn overlaps_between_peers_are_refused() {
        let cases = [
            (
                &["10.0.0.0/24"][..],
                &["10.0.0.5/32"][..],
                "10.0.0.5/32 overlaps 10.0.0.0/24",
            ),
            (
                &["10.0.0.5/32"],
                &["10.0.0.5/32"],
                "10.0.0.5/32 overlaps 10.0.0.5/32",
            ),
            (
                &["10.0.0.0/8", "10.1.0.0/16"],
                &["10.1.2.0/24"],
                "overlaps 10.0.0.0/8",
            ),
            (
                &["2001:db8::/32"],
                &["2001:db8:1::/48"],
                "2001:db8:1::/48 overlaps",
            ),
        ];
        for (a, b, expected) in cases {
            let peers = specs(&[entry(1, a), entry(2, b)]);
            let error = check_peers(&peers).unwrap_err().to_string();
            assert!(error.contains(expected), "{a:?} {b:?}: {error}");
        }
        // The later peer is the one named first, whichever block is wider.
        let peers = specs(&[entry(1, &["10.0.0.5/32"]), entry(2, &["10.0.0.0/24"])]);
        let error = check_peers(&peers).unwrap_err().to_string();
        assert!(
            error.starts_with("peer \"p2\"")
                && error.contains("10.0.0.0/24 overlaps 10.0.0.5/32 of peer \"p1\""),
            "{error}"
        );
    }

    #[test]
    fn disjoint_and_same_peer_blocks_are_fine() {
        let peers = specs(&[
            entry(1, &["10.0.0.0/25", "10.0.0.0/24"]),
            entry(2, &["10.0.1.0/24", "0.0.0.0/32"]),
            entry(3, &["::/0"]),
        ]);
        assert_eq!(check_peers(&peers).unwrap().len(), 3);
    }
}
