//! The endpoint-sharing task: it owns the location's endpoint table. It
//! sends what changed on this gateway's WireGuard after each stats poll,
//! and the whole of it every refresh interval; it takes in the other
//! gateways' messages (the agent hands it the datagrams that arrive on the
//! HA socket with the endpoint magic); and it publishes the table and the
//! other gateways' MAC addresses as a snapshot, which the agent reads when
//! this gateway becomes master (the peers to kick) and status requests
//! read for the channel's figures. The table is [`table`], the messages
//! [`wire`].

pub mod table;
pub mod wire;

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use self::{
    table::{EndpointTable, EndpointView, Merged},
    wire::{Kind, Message, ReplayWindow, WireError},
};
use super::{advert::AdvertKey, transport::Transport};
use crate::wireguard::{Key, LocalPeers, PeerEndpoint, WireguardHandle};

/// Datagrams waiting for the task; more are dropped (and counted).
const QUEUE: usize = 1024;
/// The least time between two snapshots published.
const PUBLISH_SPACING: Duration = Duration::from_millis(100);
/// How soon a full refresh goes out after a gateway is heard for the first
/// time (or restarted): it learns the table at once, not a refresh
/// interval later.
const WELCOME_DELAY: Duration = Duration::from_millis(50);

/// The endpoint-sharing settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharingConfig {
    pub location_id: u32,
    pub gateway_id: u32,
    pub key: AdvertKey,
    /// This gateway's public interface MAC address.
    pub mac: [u8; 6],
    /// How often the whole table is sent.
    pub refresh: Duration,
    /// Entries whose last handshake is older go.
    pub max_age: Duration,
    /// This start's epoch, the adverts' ([`super::epoch`]): messages carry
    /// it with their own sequence.
    pub epoch: u64,
}

/// Another gateway, as its endpoint messages describe it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SharingPeer {
    pub gateway_id: u32,
    /// Its public interface MAC address.
    pub mac: String,
    /// The address its messages come from.
    pub address: String,
    /// Milliseconds since its last message.
    pub last_heard_ms: u64,
}

/// The endpoint table, as `tidectl status` shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SharingStatus {
    /// Peers with a known endpoint.
    pub entries: usize,
    /// Of those, how many each gateway reported.
    pub by_gateway: BTreeMap<u32, usize>,
    /// Entries received from the other gateways, by outcome.
    pub merged: Merged,
    /// Messages sent and datagrams sent.
    pub messages_sent: u64,
    pub datagrams_sent: u64,
    /// Datagrams received and believed.
    pub datagrams_received: u64,
    /// Datagrams dropped, by reason.
    pub dropped: BTreeMap<String, u64>,
    /// The other gateways heard on the endpoint channel.
    pub gateways: Vec<SharingPeer>,
}

/// What the task knows, as it last published it.
#[derive(Debug, Clone, Default)]
pub struct SharingSnapshot {
    /// The endpoint table and the other gateways' MAC addresses.
    pub view: Arc<EndpointView>,
    /// The channel's figures; `gateways[].last_heard_ms` as of `at`.
    status: SharingStatus,
    /// When `status` was taken.
    at: Option<Instant>,
}

impl SharingSnapshot {
    /// The table and the channel, for `tidectl status`, at `now`.
    pub fn status(&self, now: Instant) -> SharingStatus {
        let mut status = self.status.clone();
        let since = self
            .at
            .map_or(0, |at| now.saturating_duration_since(at).as_millis() as u64);
        for gateway in &mut status.gateways {
            gateway.last_heard_ms += since;
        }
        status
    }
}

/// A cheap, cloneable way to talk to the task.
#[derive(Debug, Clone)]
pub struct SharingHandle {
    datagrams: mpsc::Sender<(Vec<u8>, SocketAddr, bool)>,
    snapshot: watch::Receiver<SharingSnapshot>,
}

impl SharingHandle {
    /// Hands over a datagram that arrived on the HA socket with the
    /// endpoint magic; `known`: its sender is one the transport listens to.
    /// Never waits: a full queue drops it (and the task counts it).
    pub fn deliver(&self, bytes: Vec<u8>, from: SocketAddr, known: bool) -> bool {
        self.datagrams.try_send((bytes, from, known)).is_ok()
    }

    /// What the task last published; `changed()` on the receiver wakes
    /// when it publishes again.
    pub fn subscribe(&self) -> watch::Receiver<SharingSnapshot> {
        self.snapshot.clone()
    }
}

/// A gateway heard on the channel.
#[derive(Debug, Clone, Copy)]
struct HeardGateway {
    mac: [u8; 6],
    from: SocketAddr,
    epoch: u64,
    at: Instant,
}

/// The task's state.
struct Syncer {
    config: SharingConfig,
    transport: Arc<Transport>,
    wireguard: WireguardHandle,
    table: EndpointTable,
    replay: ReplayWindow,
    /// What this gateway last told the others of each peer.
    told: HashMap<Key, (SocketAddr, SystemTime)>,
    /// The latest local snapshot.
    local: Vec<PeerEndpoint>,
    epoch: u64,
    sequence: u64,
    heard: BTreeMap<u32, HeardGateway>,
    messages_sent: u64,
    datagrams_sent: u64,
    datagrams_received: u64,
    dropped: BTreeMap<String, u64>,
    /// What the other gateways' entries did to the table.
    merged: Merged,
}

/// Starts the task: returns its handle and its future, which runs until
/// `cancel` fires. `local` is the WireGuard task's published snapshot;
/// `wireguard` gets the handshakes other gateways saw (so an MFA timer on
/// this gateway counts a client active on another).
pub fn spawn(
    config: SharingConfig,
    transport: Arc<Transport>,
    local: watch::Receiver<LocalPeers>,
    wireguard: WireguardHandle,
    cancel: CancellationToken,
) -> (SharingHandle, impl Future<Output = ()>) {
    let (datagram_tx, datagrams) = mpsc::channel(QUEUE);
    let (publish, snapshot) = watch::channel(SharingSnapshot::default());
    let epoch = config.epoch;
    let syncer = Syncer {
        table: EndpointTable::new(config.max_age),
        config,
        transport,
        wireguard,
        replay: ReplayWindow::default(),
        told: HashMap::new(),
        local: Vec::new(),
        epoch,
        sequence: 0,
        heard: BTreeMap::new(),
        messages_sent: 0,
        datagrams_sent: 0,
        datagrams_received: 0,
        dropped: BTreeMap::new(),
        merged: Merged::default(),
    };
    let handle = SharingHandle {
        datagrams: datagram_tx,
        snapshot,
    };
    (handle, syncer.run(datagrams, publish, local, cancel))
}

impl Syncer {
    async fn run(
        mut self,
        mut datagrams: mpsc::Receiver<(Vec<u8>, SocketAddr, bool)>,
        publish: watch::Sender<SharingSnapshot>,
        mut local: watch::Receiver<LocalPeers>,
        cancel: CancellationToken,
    ) {
        // The first refresh goes out at once: the others learn this
        // gateway's MAC and its table now.
        let mut refresh_at = Instant::now();
        let snapshot = local.borrow_and_update().clone();
        self.on_local(snapshot, false).await;
        // A change is published at once, then at most every
        // `PUBLISH_SPACING`: a table of many peers arrives in many
        // datagrams, and each would otherwise copy it whole.
        let mut last_published = Instant::now();
        let mut publish_at = Some(last_published);
        loop {
            let changed = tokio::select! {
                () = cancel.cancelled() => break,
                Some((bytes, from, known)) = datagrams.recv() => {
                    if self.receive(&bytes, from, known) {
                        refresh_at = refresh_at.min(Instant::now() + WELCOME_DELAY);
                    }
                    true
                }
                changed = local.changed() => {
                    if changed.is_err() {
                        // The WireGuard task is gone: the daemon is stopping.
                        break;
                    }
                    let snapshot = local.borrow_and_update().clone();
                    self.on_local(snapshot, true).await;
                    true
                }
                () = tokio::time::sleep_until(refresh_at.into()) => {
                    self.table.expire(SystemTime::now());
                    self.refresh().await;
                    refresh_at = Instant::now() + self.config.refresh;
                    true
                }
                () = sleep_until_some(publish_at) => {
                    last_published = Instant::now();
                    publish_at = None;
                    publish.send_replace(self.snapshot(last_published));
                    false
                }
            };
            if changed && publish_at.is_none() {
                publish_at = Some((last_published + PUBLISH_SPACING).max(Instant::now()));
            }
        }
        debug!("endpoint sharing stopped");
    }

    /// What the task knows now, for readers in other tasks.
    fn snapshot(&self, now: Instant) -> SharingSnapshot {
        let macs = self
            .heard
            .iter()
            .map(|(id, heard)| (*id, heard.mac))
            .collect();
        SharingSnapshot {
            view: Arc::new(self.table.view(macs)),
            status: self.status(now),
            at: Some(now),
        }
    }

    /// A new local snapshot: the configured peers bound the table; what
    /// changed is merged and, when `send`, told to the others.
    async fn on_local(&mut self, snapshot: LocalPeers, send: bool) {
        self.table.set_peers(snapshot.configured.iter().copied());
        self.told.retain(|key, _| self.table.knows_peer(key));
        let now = SystemTime::now();
        self.table
            .merge(self.config.gateway_id, &snapshot.active, now);
        let changed: Vec<PeerEndpoint> = snapshot
            .active
            .iter()
            .filter(|entry| {
                self.told.get(&entry.key) != Some(&(entry.endpoint, entry.last_handshake))
            })
            .copied()
            .collect();
        self.local = snapshot.active;
        if send && !changed.is_empty() {
            self.send(Kind::Changes, &changed).await;
        }
    }

    /// Sends every local entry still within the maximum age.
    async fn refresh(&mut self) {
        let now = SystemTime::now();
        let max_age = self.config.max_age;
        let entries: Vec<PeerEndpoint> = self
            .local
            .iter()
            .filter(|e| now.duration_since(e.last_handshake).unwrap_or_default() <= max_age)
            .copied()
            .collect();
        self.send(Kind::Refresh, &entries).await;
    }

    async fn send(&mut self, kind: Kind, entries: &[PeerEndpoint]) {
        let template = Message {
            kind,
            location_id: self.config.location_id,
            gateway_id: self.config.gateway_id,
            epoch: self.epoch,
            sequence: self.sequence + 1,
            mac: self.config.mac,
            part: 0,
            parts: 1,
            entries: Vec::new(),
        };
        let messages = wire::split(&template, kind, entries);
        self.sequence += messages.len() as u64;
        self.messages_sent += 1;
        for message in &messages {
            let bytes = message.encode(&self.config.key);
            match self.transport.send(&bytes).await {
                Ok(()) => self.datagrams_sent += 1,
                Err(error) => warn!(%error, "sending endpoints failed"),
            }
        }
        for entry in entries {
            self.told
                .insert(entry.key, (entry.endpoint, entry.last_handshake));
        }
    }

    /// Decodes, authenticates, checks and merges one datagram; true when
    /// its sender is new (or restarted) and should get the table soon.
    fn receive(&mut self, bytes: &[u8], from: SocketAddr, known: bool) -> bool {
        if !known {
            self.drop_datagram("unknown-sender", from);
            return false;
        }
        let message = Message::decode(bytes, &self.config.key).and_then(|message| {
            if message.location_id != self.config.location_id {
                return Err(WireError::Location(message.location_id));
            }
            self.replay
                .check(message.gateway_id, message.epoch, message.sequence)?;
            Ok(message)
        });
        let message = match message {
            Ok(message) => message,
            Err(error) => {
                debug!(%from, %error, "endpoint message dropped");
                self.drop_datagram(error.name(), from);
                return false;
            }
        };
        if message.gateway_id == self.config.gateway_id {
            // Another gateway with this one's id, or this one's own
            // message looped back: not believed.
            self.drop_datagram("own-id", from);
            return false;
        }
        self.datagrams_received += 1;
        let fresh = self
            .heard
            .get(&message.gateway_id)
            .is_none_or(|heard| heard.epoch != message.epoch);
        if fresh {
            info!(
                gateway = message.gateway_id,
                %from,
                "endpoint sharing: hearing a gateway"
            );
        }
        self.heard.insert(
            message.gateway_id,
            HeardGateway {
                mac: message.mac,
                from,
                epoch: message.epoch,
                at: Instant::now(),
            },
        );
        let now = SystemTime::now();
        let merged = self.table.merge(message.gateway_id, &message.entries, now);
        self.merged.add(merged);
        if merged.taken > 0 {
            let handshakes: Vec<(Key, SystemTime)> = message
                .entries
                .iter()
                .filter(|e| {
                    !e.kicked
                        && self
                            .table
                            .get(&e.key)
                            .is_some_and(|known| known.gateway_id == message.gateway_id)
                })
                .map(|e| (e.key, e.last_handshake.min(now)))
                .collect();
            self.wireguard.remote_activity(handshakes);
        }
        fresh
    }

    fn drop_datagram(&mut self, reason: &str, from: SocketAddr) {
        let count = self.dropped.entry(reason.to_owned()).or_default();
        *count += 1;
        if count.is_power_of_two() {
            warn!(%from, reason, count = *count, "dropped endpoint messages");
        }
    }

    fn status(&self, now: Instant) -> SharingStatus {
        SharingStatus {
            entries: self.table.len(),
            by_gateway: self.table.by_gateway(),
            merged: self.merged,
            messages_sent: self.messages_sent,
            datagrams_sent: self.datagrams_sent,
            datagrams_received: self.datagrams_received,
            dropped: self.dropped.clone(),
            gateways: self
                .heard
                .iter()
                .map(|(id, heard)| SharingPeer {
                    gateway_id: *id,
                    mac: format_mac(heard.mac),
                    address: heard.from.ip().to_string(),
                    last_heard_ms: now.saturating_duration_since(heard.at).as_millis() as u64,
                })
                .collect(),
        }
    }
}

/// `02:00:00:00:00:01`.
pub fn format_mac(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Sleeps until `at`; never wakes when `None`.
async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}
