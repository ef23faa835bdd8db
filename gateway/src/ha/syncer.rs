//! The endpoint-sharing task: it owns the location's endpoint table. It
//! sends what changed on this gateway's WireGuard after each stats poll,
//! and the whole of it every refresh interval; it takes in the other
//! gateways' messages (the agent hands it the datagrams that arrive on the
//! HA socket with the endpoint magic); and it answers the agent, which asks
//! for the peers to kick when this gateway becomes master and for the
//! other gateways' MAC addresses.

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{
    advert::AdvertKey,
    endpoints::{EndpointTable, Merged, Recent},
    sync::{self, Entry, Kind, Message, ReplayWindow, SyncError},
    transport::Transport,
};
use crate::wireguard::{Key, WireguardHandle};

/// Datagrams waiting for the task; more are dropped (and counted).
const QUEUE: usize = 1024;
/// How soon a full refresh goes out after a gateway is heard for the first
/// time (or restarted): it learns the table at once, not a refresh
/// interval later.
const WELCOME_DELAY: Duration = Duration::from_millis(50);

/// This gateway's WireGuard as of its last stats poll, published by the
/// WireGuard task.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LocalPeers {
    /// Every peer in the config.
    pub configured: Vec<Key>,
    /// The peers with an endpoint and a completed handshake.
    pub active: Vec<Entry>,
    /// The listen port the device has (0 before the first read).
    pub listen_port: u16,
}

/// The endpoint-sharing settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncConfig {
    pub location_id: u32,
    pub gateway_id: u32,
    pub key: AdvertKey,
    /// This gateway's public interface MAC address.
    pub mac: [u8; 6],
    /// How often the whole table is sent.
    pub refresh: Duration,
    /// Entries whose last handshake is older go.
    pub max_age: Duration,
}

/// Another gateway, as its endpoint messages describe it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncPeer {
    pub gateway_id: u32,
    /// Its public interface MAC address.
    pub mac: String,
    /// The address its messages come from.
    pub address: String,
    /// Milliseconds since its last message.
    pub last_heard_ms: u64,
}

/// The endpoint table, as `tidectl status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncStatus {
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
    pub gateways: Vec<SyncPeer>,
}

enum Command {
    Recent(Duration, oneshot::Sender<Vec<Recent>>),
    Mac(u32, oneshot::Sender<Option<[u8; 6]>>),
    Status(oneshot::Sender<SyncStatus>),
}

/// A cheap, cloneable way to talk to the task.
#[derive(Debug, Clone)]
pub struct SyncHandle {
    datagrams: mpsc::Sender<(Vec<u8>, SocketAddr, bool)>,
    commands: mpsc::Sender<Command>,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Recent(..) => "Recent",
            Self::Mac(..) => "Mac",
            Self::Status(_) => "Status",
        })
    }
}

/// The task has stopped.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the endpoint-sharing task has stopped")]
pub struct SyncStopped;

impl SyncHandle {
    /// Hands over a datagram that arrived on the HA socket with the
    /// endpoint magic; `known`: its sender is one the transport listens to.
    /// Never waits: a full queue drops it (and the task counts it).
    pub fn deliver(&self, bytes: Vec<u8>, from: SocketAddr, known: bool) -> bool {
        self.datagrams.try_send((bytes, from, known)).is_ok()
    }

    /// The peers with a handshake within `window`, most recent first.
    pub async fn recent(&self, window: Duration) -> Result<Vec<Recent>, SyncStopped> {
        let (reply, rx) = oneshot::channel();
        self.commands
            .send(Command::Recent(window, reply))
            .await
            .map_err(|_| SyncStopped)?;
        rx.await.map_err(|_| SyncStopped)
    }

    /// Gateway `id`'s MAC address, if its messages were heard.
    pub async fn mac_of(&self, id: u32) -> Result<Option<[u8; 6]>, SyncStopped> {
        let (reply, rx) = oneshot::channel();
        self.commands
            .send(Command::Mac(id, reply))
            .await
            .map_err(|_| SyncStopped)?;
        rx.await.map_err(|_| SyncStopped)
    }

    /// The table and the channel, for `tidectl status`.
    pub async fn status(&self) -> Result<SyncStatus, SyncStopped> {
        let (reply, rx) = oneshot::channel();
        self.commands
            .send(Command::Status(reply))
            .await
            .map_err(|_| SyncStopped)?;
        rx.await.map_err(|_| SyncStopped)
    }
}

/// A gateway heard on the channel.
#[derive(Debug, Clone, Copy)]
struct Heard {
    mac: [u8; 6],
    from: SocketAddr,
    epoch: u64,
    at: Instant,
}

/// The task's state.
struct Syncer {
    config: SyncConfig,
    transport: Arc<Transport>,
    wireguard: WireguardHandle,
    table: EndpointTable,
    replay: ReplayWindow,
    /// What this gateway last told the others of each peer.
    told: HashMap<Key, (SocketAddr, SystemTime)>,
    /// The latest local snapshot.
    local: Vec<Entry>,
    epoch: u64,
    sequence: u64,
    heard: BTreeMap<u32, Heard>,
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
    config: SyncConfig,
    transport: Arc<Transport>,
    local: watch::Receiver<LocalPeers>,
    wireguard: WireguardHandle,
    cancel: CancellationToken,
) -> (SyncHandle, impl Future<Output = ()>) {
    let (datagram_tx, datagrams) = mpsc::channel(QUEUE);
    let (command_tx, commands) = mpsc::channel(16);
    let epoch = sync::unix_ms(SystemTime::now());
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
    let handle = SyncHandle {
        datagrams: datagram_tx,
        commands: command_tx,
    };
    (handle, syncer.run(datagrams, commands, local, cancel))
}

impl Syncer {
    async fn run(
        mut self,
        mut datagrams: mpsc::Receiver<(Vec<u8>, SocketAddr, bool)>,
        mut commands: mpsc::Receiver<Command>,
        mut local: watch::Receiver<LocalPeers>,
        cancel: CancellationToken,
    ) {
        // The first refresh goes out at once: the others learn this
        // gateway's MAC and its table now.
        let mut refresh_at = Instant::now();
        let snapshot = local.borrow_and_update().clone();
        self.on_local(snapshot, false).await;
        loop {
            tokio::select! {
                () = cancel.cancelled() => break,
                Some((bytes, from, known)) = datagrams.recv() => {
                    if self.receive(&bytes, from, known) {
                        refresh_at = refresh_at.min(Instant::now() + WELCOME_DELAY);
                    }
                }
                changed = local.changed() => {
                    if changed.is_err() {
                        // The WireGuard task is gone: the daemon is stopping.
                        break;
                    }
                    let snapshot = local.borrow_and_update().clone();
                    self.on_local(snapshot, true).await;
                }
                () = tokio::time::sleep_until(refresh_at.into()) => {
                    self.table.expire(SystemTime::now());
                    self.refresh().await;
                    refresh_at = Instant::now() + self.config.refresh;
                }
                Some(command) = commands.recv() => self.command(command),
            }
        }
        debug!("endpoint sharing stopped");
    }

    fn command(&mut self, command: Command) {
        match command {
            Command::Recent(window, reply) => {
                let now = SystemTime::now();
                self.table.expire(now);
                let _ = reply.send(self.table.recent(window, now));
            }
            Command::Mac(id, reply) => {
                let _ = reply.send(self.heard.get(&id).map(|heard| heard.mac));
            }
            Command::Status(reply) => {
                let _ = reply.send(self.status());
            }
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
        let changed: Vec<Entry> = snapshot
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
        let entries: Vec<Entry> = self
            .local
            .iter()
            .filter(|e| now.duration_since(e.last_handshake).unwrap_or_default() <= max_age)
            .copied()
            .collect();
        self.send(Kind::Refresh, &entries).await;
    }

    async fn send(&mut self, kind: Kind, entries: &[Entry]) {
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
        let messages = sync::split(&template, kind, entries);
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
                return Err(SyncError::Location(message.location_id));
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
            Heard {
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

    fn status(&self) -> SyncStatus {
        let now = Instant::now();
        SyncStatus {
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
                .map(|(id, heard)| SyncPeer {
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
