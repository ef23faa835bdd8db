//! The WireGuard data plane: the location's interface, its peers, and the
//! one reconcile path every change goes through.

pub mod activity;
pub mod durability;
pub mod kick;
pub mod location;
pub mod owner;
pub mod state;

pub use tidegate_wireguard::{backend, kernel, key, link, reconcile, spec, userspace};

use std::{
    net::SocketAddr,
    path::PathBuf,
    time::{Duration, SystemTime},
};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

pub use backend::{BackendKind, BackendSetting};
pub use key::Key;
pub use owner::{WireguardError, WireguardHandle, WireguardSlot};
pub use reconcile::PlanSummary;
pub use spec::{PeerEntry, PeerSpec};

/// One client as a gateway saw it: where its peer's last handshake came
/// from, and when.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerEndpoint {
    pub key: Key,
    pub endpoint: SocketAddr,
    /// The last completed handshake, to the millisecond.
    pub last_handshake: SystemTime,
    /// That handshake was kicked by the gateway after a failover.
    pub kicked: bool,
}

/// This gateway's WireGuard as of its last stats poll, published by the
/// WireGuard task.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LocalPeers {
    /// Every peer in the config.
    pub configured: Vec<Key>,
    /// The peers with an endpoint and a completed handshake.
    pub active: Vec<PeerEndpoint>,
    /// The listen port the device has (0 before the first read).
    pub listen_port: u16,
}

/// The location's WireGuard settings, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireguardConfig {
    /// The WireGuard interface.
    pub interface: String,
    /// Kernel module, wireguard-go, or whichever is there.
    pub backend: BackendSetting,
    /// `None` only on a gateway whose location config comes from Core
    /// (`[core]`): the key is set once Core's config arrives.
    pub private_key: Option<Key>,
    /// `None` as for `private_key`.
    pub listen_port: Option<u16>,
    /// The interface's own addresses, with their prefix (10.77.0.1/24).
    pub addresses: Vec<IpNet>,
    pub mtu: u32,
    /// How often peer stats are read.
    pub stats_interval: Duration,
    /// The peer-disconnect threshold when the location uses MFA.
    pub mfa_threshold: Option<Duration>,
    /// The peers from the config file.
    pub peers: Vec<PeerSpec>,
    /// Where state that outlives the daemon is kept.
    pub state_dir: PathBuf,
}

/// Where a peer comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PeerSource {
    /// The config file.
    File,
    /// Added at run time (`tidectl peer add`).
    Dynamic,
    /// Core's location config.
    Core,
    /// On the device but in no config: the next reconcile removes it.
    Unknown,
}

/// One peer as `tidectl peers` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerStatus {
    pub public_key: Key,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub source: PeerSource,
    pub endpoint: Option<String>,
    pub allowed_ips: Vec<IpNet>,
    /// Unix seconds of the last completed handshake.
    pub last_handshake: Option<u64>,
    /// Unix seconds of the last handshake or received data.
    pub last_active: Option<u64>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub persistent_keepalive: Option<u16>,
    pub preshared_key: bool,
}

/// The interface and its peers, as of the last stats poll.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeersReply {
    pub interface: String,
    pub backend: BackendKind,
    /// The wireguard-go process, for the userspace backend.
    pub backend_pid: Option<u32>,
    pub listen_port: u16,
    /// Unix seconds of the poll these figures come from.
    pub polled_at: u64,
    /// The MFA peer-disconnect threshold in seconds, if MFA is on.
    pub mfa_threshold_secs: Option<u64>,
    /// Why the state file is behind the state in force (a failing or full
    /// disk), while it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_unsaved: Option<String>,
    pub peers: Vec<PeerStatus>,
}

/// What a change did to the device.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApplyReport {
    pub added: usize,
    pub updated: usize,
    pub removed: usize,
    /// Device settings changed (listen port, private key).
    pub device: usize,
    /// Round trips to WireGuard.
    pub requests: usize,
}
