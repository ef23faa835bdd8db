//! The two ways to drive a WireGuard device, behind one interface: the
//! kernel module over generic netlink, and `wireguard-go` over its UAPI
//! socket. Both read back into [`Actual`] and apply a [`Plan`].

use std::{
    collections::BTreeMap,
    fmt,
    net::SocketAddr,
    time::{Duration, SystemTime},
};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use wireguard_uapi::get;

use super::{
    kernel::Kernel,
    key::Key,
    reconcile::{Actual, ActualPeer, Plan},
    userspace::Userspace,
};

/// Which implementation the config asks for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum BackendSetting {
    /// The kernel module when it is there, else wireguard-go.
    #[default]
    Auto,
    /// The kernel module only.
    Kernel,
    /// wireguard-go only.
    Userspace,
}

/// Which implementation drives the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BackendKind {
    Kernel,
    Userspace,
}

impl BackendKind {
    /// Peers one device holds at most: the kernel's MAX_PEERS_PER_DEVICE
    /// (2^20) and wireguard-go's MaxPeers (2^16), past which a device takes
    /// part of a configuration and refuses the rest.
    pub const fn max_peers(self) -> usize {
        match self {
            Self::Kernel => 1 << 20,
            Self::Userspace => 1 << 16,
        }
    }
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Kernel => "kernel",
            Self::Userspace => "wireguard-go",
        })
    }
}

/// A request to the device that failed.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("listen_port {port}: the port is in use on this host")]
    PortInUse { port: u16 },
    #[error("{op} {interface} through {socket}")]
    Uapi {
        op: &'static str,
        interface: String,
        socket: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("{op} {interface} through netlink")]
    Netlink {
        op: &'static str,
        interface: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// How much talking to the device a plan took.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ApplyCost {
    /// Round trips to WireGuard (UAPI transactions or netlink requests).
    pub requests: usize,
}

/// A WireGuard device we drive.
#[derive(Debug)]
pub enum Backend {
    Kernel(Kernel),
    Userspace(Userspace),
}

impl Backend {
    /// Which implementation this is.
    pub fn kind(&self) -> BackendKind {
        match self {
            Self::Kernel(_) => BackendKind::Kernel,
            Self::Userspace(_) => BackendKind::Userspace,
        }
    }

    /// Reads the device. Blocks on a socket.
    pub fn get(&self) -> Result<Actual, BackendError> {
        match self {
            Self::Kernel(k) => k.get(),
            Self::Userspace(u) => u.get(),
        }
    }

    /// Applies `plan`. Blocks on a socket. The listen port goes first, on
    /// its own, so a port in use fails before anything else changes.
    pub fn apply(&self, plan: &Plan) -> Result<ApplyCost, BackendError> {
        match self {
            Self::Kernel(k) => k.apply(plan),
            Self::Userspace(u) => u.apply(plan),
        }
    }
}

/// Converts what either backend reads into [`Actual`].
pub(super) fn actual_from(device: get::Device) -> Actual {
    let key = |bytes: [u8; 32]| Some(Key::new(bytes)).filter(|k| !k.is_zero());
    let peers = device
        .peers
        .into_iter()
        .map(|peer| {
            let actual = ActualPeer {
                preshared_key: key(peer.preshared_key),
                endpoint: peer.endpoint.map(unmap_endpoint),
                persistent_keepalive: Some(peer.persistent_keepalive_interval).filter(|&s| s != 0),
                allowed_ips: peer
                    .allowed_ips
                    .iter()
                    .filter_map(|ip| IpNet::new(ip.ipaddr, ip.cidr_mask).ok())
                    .map(|net| net.trunc())
                    .collect(),
                last_handshake: (peer.last_handshake_time != Duration::ZERO)
                    .then(|| SystemTime::UNIX_EPOCH + peer.last_handshake_time),
                rx_bytes: peer.rx_bytes,
                tx_bytes: peer.tx_bytes,
            };
            (Key::new(peer.public_key), actual)
        })
        .collect::<BTreeMap<_, _>>();
    Actual {
        private_key: device.private_key.and_then(key),
        listen_port: device.listen_port,
        peers,
    }
}

/// An IPv4 client seen on a dual-stack socket shows as `[::ffff:a.b.c.d]`.
fn unmap_endpoint(endpoint: SocketAddr) -> SocketAddr {
    match endpoint {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), v6.port()),
            None => endpoint,
        },
        SocketAddr::V4(_) => endpoint,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_device_into_actual() {
        let device = get::Device {
            ifindex: 3,
            ifname: "wg0".into(),
            private_key: Some([7; 32]),
            public_key: None,
            listen_port: 51820,
            fwmark: 0,
            peers: vec![
                get::Peer {
                    public_key: [1; 32],
                    preshared_key: [0; 32],
                    endpoint: Some("[::ffff:198.51.100.2]:4000".parse().unwrap()),
                    persistent_keepalive_interval: 0,
                    last_handshake_time: Duration::from_secs(1_700_000_000),
                    rx_bytes: 10,
                    tx_bytes: 20,
                    allowed_ips: vec!["10.0.0.2/32".parse().unwrap()],
                    protocol_version: 1,
                },
                get::Peer {
                    public_key: [2; 32],
                    preshared_key: [9; 32],
                    endpoint: None,
                    persistent_keepalive_interval: 25,
                    last_handshake_time: Duration::ZERO,
                    rx_bytes: 0,
                    tx_bytes: 0,
                    allowed_ips: vec![],
                    protocol_version: 1,
                },
            ],
        };
        let actual = actual_from(device);
        assert_eq!(actual.private_key, Some(Key::new([7; 32])));
        let first = &actual.peers[&Key::new([1; 32])];
        assert_eq!(first.preshared_key, None);
        assert_eq!(first.endpoint, Some("198.51.100.2:4000".parse().unwrap()));
        assert_eq!(first.persistent_keepalive, None);
        assert_eq!(
            first.last_handshake,
            Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000))
        );
        let second = &actual.peers[&Key::new([2; 32])];
        assert_eq!(second.preshared_key, Some(Key::new([9; 32])));
        assert_eq!(second.persistent_keepalive, Some(25));
        assert_eq!(second.last_handshake, None);
    }
}
