//! The HA agent task: it owns the election state machine, the advert socket
//! and the VIPs. It feeds the machine what it hears, the passing of time,
//! health changes and operator requests, and carries out the actions the
//! machine returns. Other tasks talk to it through an [`HaHandle`].
//!
//! In director mode it also keeps the XDP director in step with the
//! location: the gateways its adverts describe (healthy, draining, their
//! Ethernet addresses) are the backends, and the director steers while this
//! gateway is the master.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::{
    advert::{Advert, AdvertError, AdvertKey, HEALTH_OK, ReplayGuard},
    announce::{self, FrameSocket, Mac},
    endpoints::Recent,
    health::HealthEvent,
    machine::{
        Action, Cause, Event, HandoverError, Heard, Machine, PeerView, Role, Settings, Transition,
    },
    sync,
    syncer::{SyncHandle, SyncStatus},
    transport::{Destination, Transport},
    vip::{VipError, Vips, set_arp_sysctls},
};
use crate::{
    datapath::DatapathHandle,
    director::{Desired, DirectorConfig, Member, maglev},
    error_chain,
    wireguard::{
        WireguardHandle,
        kick::{Candidate, FailoverMeta, FailoverReport, KickRequest},
    },
    xdp::{
        FenceStatus, Ownership,
        director::{client_key, format_mac},
    },
};
use tidegate_common::director::{client_hash, table_index};

/// Times each announcement (gratuitous ARP, unsolicited NA) is sent.
const ANNOUNCE_COUNT: u32 = 5;
/// Time between two sends of an announcement.
const ANNOUNCE_SPACING: Duration = Duration::from_millis(100);
/// Largest advert read.
const MAX_ADVERT: usize = 2048;
/// The fence's lease lasts this many advert intervals. Every advert renews
/// it, and a master-down interval is longer, so a live master never lapses
/// and a dead one is fenced before a backup takes over.
const LEASE_INTERVALS: u32 = 3;

/// Failover continuity settings (`[ha]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Continuity {
    /// Handshakes kicked per second after becoming master; 0: none.
    pub kick_rate: u32,
    /// Peers with a handshake this recent are kicked.
    pub kick_window: Duration,
    /// How long after a planned handover frames of the other gateway's
    /// sessions are handed on (plus the time the kicks take); 0: never.
    pub handover_window: Duration,
    /// How often the whole endpoint table is sent to the other gateways.
    pub endpoint_refresh: Duration,
    /// Endpoints whose last handshake is older are forgotten.
    pub endpoint_max_age: Duration,
}

/// The agent's settings, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HaConfig {
    pub location_id: u32,
    pub election: Settings,
    pub key: AdvertKey,
    pub vips: Vec<IpAddr>,
    pub port: u16,
    pub destination: Destination,
    /// Interfaces whose failure lowers the priority, with their weights.
    pub track: Vec<(String, u8)>,
    /// The public interface: VIPs, adverts and announcements go here.
    pub interface: String,
    /// Failover continuity.
    pub continuity: Continuity,
    /// Director mode (`mode = "director"`); `None`: active/standby.
    pub director: Option<DirectorConfig>,
}

/// The agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum HaError {
    #[error(transparent)]
    Vip(#[from] VipError),
    #[error("{op} on {interface}")]
    Io {
        op: &'static str,
        interface: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Handover(#[from] HandoverError),
    #[error("the HA agent has stopped")]
    Stopped,
    #[error("draining needs director mode: this location runs active/standby ([ha] mode)")]
    NotDirector,
}

/// One role change, for `tidectl status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransitionStatus {
    /// Unix milliseconds.
    pub at_ms: u64,
    pub from: Role,
    pub to: Role,
    pub reason: String,
}

/// Another gateway as this one hears it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerStatus {
    pub gateway_id: u32,
    pub role: Role,
    pub priority: u8,
    pub healthy: bool,
    pub maintenance: bool,
    /// It takes no new clients (director mode).
    pub draining: bool,
    /// Its Ethernet address on the public segment.
    pub mac: String,
    /// Milliseconds since its last advert.
    pub last_seen_ms: u64,
}

/// What `tidectl status` shows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HaStatus {
    pub location_id: u32,
    pub gateway_id: u32,
    pub role: Role,
    pub priority: u8,
    pub advert_interval_ms: u64,
    pub master: Option<u32>,
    pub maintenance: bool,
    /// `active-standby` or `director`.
    pub mode: HaMode,
    /// This gateway takes no new clients (director mode).
    pub draining: bool,
    pub vips: Vec<IpAddr>,
    /// The VIPs the public interface holds now.
    pub vips_held: Vec<IpAddr>,
    pub peers: Vec<PeerStatus>,
    pub transitions: Vec<TransitionStatus>,
    /// Adverts dropped, by reason.
    pub dropped: BTreeMap<String, u64>,
    /// The VIP fence in the XDP program, as last renewed.
    pub fence: Option<FenceStatus>,
    /// How the clients came back after the last failovers to this
    /// gateway, oldest first.
    #[serde(default)]
    pub failovers: Vec<FailoverReport>,
    /// The location's endpoint table.
    #[serde(default)]
    pub endpoints: Option<SyncStatus>,
}

/// How the location's gateways share the clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HaMode {
    /// The master serves every client; the backups wait.
    ActiveStandby,
    /// The master steers each client to one of the healthy gateways.
    Director,
}

/// The part of the agent's state Core follows; it changes only on events
/// that matter to an operator, so each change is worth a status message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HaSummary {
    pub role: Role,
    /// The configured priority.
    pub priority: u8,
    /// The priority advertised, after penalties of tracked interfaces.
    pub effective_priority: u8,
    pub healthy: bool,
    /// What makes the gateway unhealthy or costs it priority, in words.
    pub faults: Vec<String>,
    /// The master this gateway believes in.
    pub master: Option<u32>,
    pub maintenance: bool,
}

/// One thing the agent's loop woke up for.
enum Input {
    Shutdown,
    Tick,
    Advert {
        len: usize,
        from: SocketAddr,
        known: bool,
    },
    Health(HealthEvent),
    Command(Command),
    Nothing,
}

enum Command {
    Failover(oneshot::Sender<Result<u32, HandoverError>>),
    Maintenance(bool, oneshot::Sender<Result<(), HandoverError>>),
    Drain(bool, oneshot::Sender<Result<(), HaError>>),
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Failover(_) => "Failover",
            Self::Maintenance(..) => "Maintenance",
            Self::Drain(..) => "Drain",
        })
    }
}

/// A cheap, cloneable way to ask the agent.
#[derive(Debug, Clone)]
pub struct HaHandle {
    tx: mpsc::Sender<Command>,
    summary: watch::Receiver<HaSummary>,
    /// What the agent knows, as of its last step.
    view: watch::Receiver<AgentView>,
    /// The owners of the rest of the status, asked directly: a status
    /// request never reaches the agent's loop, which keeps the adverts
    /// and the lease going whatever the others are busy with.
    vips: Vips,
    datapath: DatapathHandle,
    links: Option<Links>,
}

impl HaHandle {
    /// The summary as it is now; `changed()` on the receiver wakes on
    /// every change of role, priority, health, master or maintenance.
    pub fn subscribe(&self) -> watch::Receiver<HaSummary> {
        self.summary.clone()
    }

    /// The election state.
    pub async fn status(&self) -> Result<HaStatus, HaError> {
        if self.tx.is_closed() {
            return Err(HaError::Stopped);
        }
        let view = self.view.borrow().clone();
        let (vips_held, fence, failovers, endpoints) = tokio::join!(
            async {
                self.vips.held().await.unwrap_or_else(|error| {
                    warn!(error = %error_chain(&error), "reading the VIPs failed");
                    Vec::new()
                })
            },
            async { self.datapath.fence_status().await.ok().flatten() },
            async {
                match &self.links {
                    Some(links) => links.wireguard.failovers().await.unwrap_or_default(),
                    None => Vec::new(),
                }
            },
            async {
                match &self.links {
                    Some(links) => links.sync.status().await.ok(),
                    None => None,
                }
            },
        );
        Ok(view.status(
            Instant::now(),
            Owned {
                vips_held,
                fence,
                failovers,
                endpoints,
            },
        ))
    }

    /// Starts a planned handover; returns the gateway taking over.
    pub async fn failover(&self) -> Result<u32, HaError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Failover(reply))
            .await
            .map_err(|_| HaError::Stopped)?;
        Ok(rx.await.map_err(|_| HaError::Stopped)??)
    }

    /// Turns maintenance mode on or off.
    pub async fn maintenance(&self, on: bool) -> Result<(), HaError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Maintenance(on, reply))
            .await
            .map_err(|_| HaError::Stopped)?;
        Ok(rx.await.map_err(|_| HaError::Stopped)??)
    }

    /// Starts or stops draining: a draining gateway keeps the clients
    /// pinned to it and gets no new ones.
    pub async fn drain(&self, on: bool) -> Result<(), HaError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Drain(on, reply))
            .await
            .map_err(|_| HaError::Stopped)?;
        rx.await.map_err(|_| HaError::Stopped)?
    }
}

/// What a gateway's adverts say beyond the election: for the director.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct PeerExtra {
    mac: Mac,
    draining: bool,
}

/// The agent and everything it owns.
#[derive(Debug)]
pub struct Agent {
    config: HaConfig,
    machine: Machine,
    transport: Arc<Transport>,
    vips: Vips,
    frames: FrameSocket,
    mac: Mac,
    guard: ReplayGuard,
    /// New at each start: the start time in ms, so it grows across restarts.
    epoch: u64,
    sequence: u64,
    dropped: BTreeMap<String, u64>,
    /// Stops the announcements in flight when the VIPs are released.
    announcing: Option<CancellationToken>,
    /// Converts the machine's instants into wall-clock times.
    anchor: (Instant, SystemTime),
    /// The XDP program's owner, which renews the fence's lease.
    datapath: DatapathHandle,
    /// When the agent last ran: a longer gap than the lease means it was
    /// frozen.
    last_wake: Instant,
    /// This gateway takes no new clients (director mode).
    draining: bool,
    /// Draining flags and addresses from the other gateways' adverts.
    extras: BTreeMap<u32, PeerExtra>,
    /// The director state last written, and gateway ids already warned
    /// about (too large to be backends).
    director_sent: Option<Desired>,
    warned_ids: Vec<u32>,
    /// The backends of the last director state computed (director mode):
    /// a gateway that drops out of it leaves its clients to the others.
    director_backends: Vec<u32>,
    /// Why the gateway is unhealthy, while it is.
    fault: Option<String>,
    /// Why the priority is lowered, while it is.
    penalty: Option<String>,
    /// The endpoint-sharing task and the WireGuard task, for failover
    /// continuity (none without `[wireguard]`).
    links: Option<Links>,
    /// After a handover: when this gateway stops answering for its old
    /// sessions (grace ends, window closes).
    grace_until: Option<Instant>,
    /// After claiming a handover: when the window closes.
    window_until: Option<Instant>,
}

/// The tasks failover continuity talks to.
#[derive(Debug, Clone)]
struct Links {
    sync: SyncHandle,
    wireguard: WireguardHandle,
}

impl Agent {
    /// Opens the sockets and puts the VIPs on `lo`. A VIP a previous run
    /// left on the public interface is removed first, before anything else:
    /// this gateway owns nothing until it wins an election.
    pub async fn start(config: HaConfig, datapath: DatapathHandle) -> Result<Self, HaError> {
        let io_err = |op| {
            let interface = config.interface.clone();
            move |source| HaError::Io {
                op,
                interface,
                source,
            }
        };
        let vips = Vips::new(&config.interface, config.vips.clone()).await?;
        let stale = vips.held().await?;
        if !stale.is_empty() {
            warn!(vips = ?stale, "removing VIPs left on the public interface by an earlier run");
        }
        vips.release().await?;
        vips.keep_on_lo().await?;
        set_arp_sysctls(&config.interface)?;
        let mac = read_mac(&config.interface).map_err(io_err("reading the MAC address"))?;
        let frames =
            FrameSocket::open(vips.public_index()).map_err(io_err("opening a packet socket"))?;
        let transport = Arc::new(
            Transport::open(
                &config.interface,
                vips.public_index(),
                config.port,
                &config.destination,
            )
            .map_err(io_err("opening the advert socket"))?,
        );
        let now = SystemTime::now();
        let epoch = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis() as u64;
        Ok(Self {
            machine: Machine::new(config.election),
            config,
            transport,
            vips,
            frames,
            mac,
            guard: ReplayGuard::default(),
            epoch,
            sequence: 0,
            dropped: BTreeMap::new(),
            announcing: None,
            anchor: (Instant::now(), now),
            datapath,
            last_wake: Instant::now(),
            links: None,
            grace_until: None,
            window_until: None,
            draining: false,
            extras: BTreeMap::new(),
            director_sent: None,
            director_backends: Vec::new(),
            warned_ids: Vec::new(),
            fault: None,
            penalty: None,
        })
    }

    /// The advert socket, which endpoint sharing sends on too.
    pub fn transport(&self) -> Arc<Transport> {
        Arc::clone(&self.transport)
    }

    /// The public interface's MAC address.
    pub fn mac(&self) -> Mac {
        self.mac
    }

    /// Connects failover continuity: endpoint messages go to `sync`; on
    /// becoming master the agent asks it for the recently active peers and
    /// `wireguard` kicks them.
    pub fn connect(&mut self, sync: SyncHandle, wireguard: WireguardHandle) {
        self.links = Some(Links { sync, wireguard });
    }

    /// Runs the election until `cancel` fires, then hands over or resigns
    /// and returns once the machine says so.
    async fn run(
        mut self,
        mut commands: mpsc::Receiver<Command>,
        mut health: mpsc::Receiver<HealthEvent>,
        published: Published,
        cancel: CancellationToken,
    ) {
        // In director mode every gateway serves the clients pinned to it,
        // master or not: the egress guard lets out what it owns.
        if self.config.director.is_some() {
            self.set_ownership(Ownership::Table).await;
        } else {
            // Sessions a run before this one left are of no use: another
            // gateway serves the clients now, or will kick them when this
            // one wins the election.
            self.drop_sessions().await;
        }
        let actions = self.machine.on_event(Event::Start, Instant::now());
        self.execute(actions).await;
        self.publish(&published);
        let mut buf = vec![0u8; MAX_ADVERT];
        let mut stopping = false;
        loop {
            let deadline = [
                self.machine.next_deadline(),
                self.grace_until,
                self.window_until,
            ]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or_else(|| Instant::now() + self.config.election.interval);
            // The select only takes the input; the machine sees it after the
            // pause check below.
            let input = tokio::select! {
                () = cancel.cancelled(), if !stopping => {
                    stopping = true;
                    info!("stopping: handing over or resigning");
                    Input::Shutdown
                }
                () = tokio::time::sleep_until(deadline.into()) => Input::Tick,
                received = self.transport.recv(&mut buf) => match received {
                    Ok((len, from, known)) => Input::Advert { len, from, known },
                    Err(error) => {
                        warn!(%error, "receiving adverts failed");
                        Input::Nothing
                    }
                },
                Some(event) = health.recv() => Input::Health(event),
                Some(command) = commands.recv() => Input::Command(command),
            };
            // First on waking: a pause longer than the lease (SIGSTOP, a
            // starved CPU) means what the machine knows is stale, and the
            // fence has cut this gateway off already.
            let now = Instant::now();
            let paused = now.saturating_duration_since(self.last_wake);
            if paused > self.lease() {
                warn!(
                    paused_ms = paused.as_millis() as u64,
                    "the agent was paused past its lease"
                );
                let stalled = self.machine.on_event(Event::Stalled { paused }, now);
                if self.execute(stalled).await {
                    break;
                }
            }
            let actions = match input {
                Input::Shutdown => self.machine.on_event(Event::Shutdown, Instant::now()),
                Input::Tick => {
                    self.end_windows(Instant::now()).await;
                    self.machine.on_event(Event::Tick, Instant::now())
                }
                Input::Advert { len, from, known } => self.receive(&buf[..len], from, known),
                Input::Health(HealthEvent::Fault { healthy, reason }) => {
                    self.fault = (!healthy).then(|| reason.clone());
                    self.machine
                        .on_event(Event::Health { healthy, reason }, Instant::now())
                }
                Input::Health(HealthEvent::Penalty { points, reason }) => {
                    self.penalty = (points > 0).then(|| reason.clone());
                    self.machine.set_penalty(points, &reason, Instant::now())
                }
                Input::Command(command) => self.command(command).await,
                Input::Nothing => Vec::new(),
            };
            let exit = self.execute(actions).await;
            self.publish(&published);
            if exit {
                break;
            }
            // Gateways come, go, drain and change health with any event.
            self.sync_director().await;
            self.last_wake = Instant::now();
        }
        // A gateway that handed over keeps answering for its old sessions
        // until the window closes, even when it is stopping.
        if let Some(until) = self.grace_until {
            info!(
                left_ms = until.saturating_duration_since(Instant::now()).as_millis() as u64,
                "answering for the sessions handed over until the window closes"
            );
            tokio::time::sleep_until(until.into()).await;
            self.end_windows(until).await;
        }
        info!("HA agent stopped");
    }

    /// Ends the grace after a handover and closes the window, when due.
    async fn end_windows(&mut self, now: Instant) {
        if self.grace_until.is_some_and(|until| now >= until) {
            self.grace_until = None;
            self.window_until = None;
            // Unless this gateway became master again meanwhile.
            if self.machine.role() != Role::Master {
                self.set_ownership(self.ownership(false)).await;
                self.drop_sessions().await;
            }
            self.close_window().await;
            info!("handover window closed: this gateway owns no client");
        }
        if self.window_until.is_some_and(|until| now >= until) {
            self.window_until = None;
            self.close_window().await;
            info!("handover window closed");
        }
    }

    /// What Core follows of the state.
    /// Publishes the summary (waking its subscribers only when it
    /// changed) and the view status requests read.
    fn publish(&self, published: &Published) {
        let summary = self.summary();
        published.summary.send_if_modified(|current| {
            let changed = *current != summary;
            *current = summary;
            changed
        });
        published.view.send_replace(self.view());
    }

    fn summary(&self) -> HaSummary {
        HaSummary {
            role: self.machine.role(),
            priority: self.config.election.priority,
            effective_priority: self.machine.priority(),
            healthy: self.machine.healthy(),
            faults: self
                .fault
                .iter()
                .chain(self.penalty.iter())
                .cloned()
                .collect(),
            master: self.machine.master(),
            maintenance: self.machine.maintenance(),
        }
    }

    /// Decodes, authenticates and checks an advert; drops and counts it on
    /// any fault.
    fn receive(&mut self, bytes: &[u8], from: SocketAddr, known: bool) -> Vec<Action> {
        if sync::is_sync(bytes) {
            match &self.links {
                Some(links) => {
                    if !links.sync.deliver(bytes.to_vec(), from, known) {
                        self.drop_advert("endpoint-queue-full", from);
                    }
                }
                None => self.drop_advert("endpoint-message-unused", from),
            }
            return Vec::new();
        }
        if !known {
            self.drop_advert("unknown-sender", from);
            return Vec::new();
        }
        let advert = Advert::decode(bytes, &self.config.key).and_then(|advert| {
            if advert.location_id != self.config.location_id {
                return Err(AdvertError::Location(advert.location_id));
            }
            self.guard.check(&advert)?;
            Ok(advert)
        });
        match advert {
            Ok(advert) => {
                self.extras.insert(
                    advert.gateway_id,
                    PeerExtra {
                        mac: advert.mac,
                        draining: advert.draining,
                    },
                );
                let heard = Heard {
                    from: advert.gateway_id,
                    role: advert.role,
                    priority: advert.priority,
                    interval: advert.interval,
                    handover_to: advert.handover_to,
                    maintenance: advert.maintenance,
                    healthy: advert.health & HEALTH_OK != 0,
                    preempt: advert.preempt,
                };
                self.machine.on_event(Event::Heard(heard), Instant::now())
            }
            Err(error) => {
                debug!(%from, %error, "advert dropped");
                self.drop_advert(error.name(), from);
                Vec::new()
            }
        }
    }

    fn drop_advert(&mut self, reason: &str, from: SocketAddr) {
        let count = self.dropped.entry(reason.to_owned()).or_default();
        *count += 1;
        if count.is_power_of_two() {
            warn!(%from, reason, count = *count, "dropped adverts");
        }
    }

    async fn command(&mut self, command: Command) -> Vec<Action> {
        let now = Instant::now();
        match command {
            Command::Failover(reply) => match self.machine.failover(now) {
                Ok((to, actions)) => {
                    info!(to, "planned failover: handing over");
                    let _ = reply.send(Ok(to));
                    actions
                }
                Err(error) => {
                    let _ = reply.send(Err(error));
                    Vec::new()
                }
            },
            Command::Drain(on, reply) => {
                if self.config.director.is_none() {
                    let _ = reply.send(Err(HaError::NotDirector));
                    return Vec::new();
                }
                if self.draining != on {
                    self.draining = on;
                    info!(on, "draining");
                }
                let _ = reply.send(Ok(()));
                // Tell the others at once; the director follows after this.
                vec![Action::Advertise(self.machine.advert())]
            }
            Command::Maintenance(on, reply) => match self.machine.set_maintenance(on, now) {
                Ok(actions) => {
                    info!(on, "maintenance");
                    let _ = reply.send(Ok(()));
                    actions
                }
                Err(error) => {
                    let _ = reply.send(Err(error));
                    Vec::new()
                }
            },
        }
    }

    /// Carries out `actions` in order; true when the agent may exit.
    async fn execute(&mut self, actions: Vec<Action>) -> bool {
        let mut exit = false;
        for action in actions {
            match action {
                Action::Advertise(fields) => {
                    self.sequence += 1;
                    let advert = Advert {
                        role: fields.role,
                        priority: fields.priority,
                        maintenance: fields.maintenance,
                        location_id: self.config.location_id,
                        gateway_id: self.config.election.gateway_id,
                        interval: self.config.election.interval,
                        epoch: self.epoch,
                        sequence: self.sequence,
                        health: if fields.healthy { HEALTH_OK } else { 0 },
                        handover_to: fields.handover_to,
                        draining: self.draining,
                        preempt: fields.preempt,
                        mac: self.mac,
                        vips: self.config.vips.clone(),
                    };
                    if let Err(error) = self.transport.send(&advert.encode(&self.config.key)).await
                    {
                        warn!(%error, "sending an advert failed");
                    }
                    // Every advert renews the lease: the agent is alive.
                    self.renew(self.machine.role() == Role::Master).await;
                }
                Action::TakeVips => {
                    self.log_transition();
                    let became = Instant::now();
                    // The fence must let ARP for the VIPs through before they
                    // are announced, the egress guard the answers out, the
                    // director must steer before clients' frames arrive, and
                    // (after a handover) the old sessions' frames must go on
                    // to the old master from the first one the announcement
                    // brings.
                    self.renew(true).await;
                    self.grace_until = None;
                    self.set_ownership(self.ownership(true)).await;
                    let recent = self.before_master().await;
                    self.sync_director().await;
                    if let Err(error) = self.vips.take().await {
                        error!(error = %error_chain(&error), "adding the VIPs failed");
                    }
                    self.announce();
                    let vip_move = became.elapsed();
                    self.on_master(became, vip_move, recent).await;
                }
                Action::ReleaseVips => {
                    self.log_transition();
                    if let Some(announcing) = self.announcing.take() {
                        announcing.cancel();
                    }
                    self.renew(false).await;
                    self.on_release().await;
                    if let Err(error) = self.vips.release().await {
                        error!(error = %error_chain(&error), "removing the VIPs failed");
                    }
                    self.sync_director().await;
                }
                Action::Announce => self.announce(),
                Action::Exit => exit = true,
            }
        }
        exit
    }

    /// Failover continuity on becoming master: the second-chance window
    /// toward the gateway that handed over, and handshakes kicked to the
    /// recently active peers.
    /// Before the VIPs move here: the recently active peers, and after a
    /// handover the second-chance window toward the old master.
    async fn before_master(&mut self) -> Vec<Recent> {
        self.window_until = None;
        // In director mode the clients stay on the gateways they are pinned
        // to; those of a gateway that left are kicked by the gateways they
        // fall to (`kick_inherited`).
        if self.config.director.is_some() {
            return Vec::new();
        }
        let Some(links) = self.links.clone() else {
            return Vec::new();
        };
        let recent = match links.sync.recent(self.config.continuity.kick_window).await {
            Ok(recent) => recent,
            Err(error) => {
                error!(%error, "no endpoint table: no handshakes kicked");
                Vec::new()
            }
        };
        if let Cause::HandoverFrom(from) = self.machine.cause() {
            let window = self.window_for(recent.len());
            if self.open_window(&links, from, window).await {
                self.window_until = Some(Instant::now() + window);
            }
        }
        recent
    }

    async fn on_master(&mut self, became: Instant, vip_move: Duration, recent: Vec<Recent>) {
        let Some(links) = self.links.clone() else {
            return;
        };
        if self.config.director.is_some() {
            return;
        }
        let settings = self.config.continuity;
        let cause = self.machine.cause();
        let reason = self
            .machine
            .transitions()
            .last()
            .map(|t| t.reason.clone())
            .unwrap_or_default();
        let (detection_ms, planned) = match cause {
            Cause::Takeover { last_heard, .. } => (
                last_heard.map(|at| became.saturating_duration_since(at).as_millis() as u64),
                false,
            ),
            Cause::HandoverFrom(_) => (None, true),
            Cause::HandedOverTo(_) | Cause::Other => (None, false),
        };
        let at = SystemTime::now() - became.elapsed();
        let request = KickRequest {
            meta: FailoverMeta {
                at,
                cause: reason,
                planned,
                detection_ms,
                vip_move_ms: vip_move.as_millis() as u64,
            },
            candidates: recent
                .iter()
                .map(|r| Candidate {
                    key: r.key,
                    endpoint: r.endpoint,
                    last_handshake: r.last_handshake,
                })
                .collect(),
            rate: settings.kick_rate,
        };
        info!(
            recently_active = request.candidates.len(),
            detection_ms,
            vip_move_ms = request.meta.vip_move_ms,
            planned,
            "MASTER: kicking handshakes to the recently active peers"
        );
        if let Err(error) = links.wireguard.kick(request).await {
            error!(error = %error_chain(&error), "kicking handshakes failed");
        }
    }

    /// Failover continuity on giving the VIPs up: after a handover, grace
    /// (answers but no new handshakes) and the window toward the new
    /// master; otherwise, nothing goes out to clients any more.
    async fn on_release(&mut self) {
        self.window_until = None;
        let handed_to = match self.machine.cause() {
            Cause::HandedOverTo(to) => Some(to),
            _ => None,
        };
        let window = self.config.continuity.handover_window;
        if self.config.director.is_some() {
            // A backend still: it keeps serving the clients pinned to it.
            self.grace_until = None;
            self.set_ownership(Ownership::Table).await;
            self.close_window().await;
            return;
        }
        if let (Some(to), Some(links), false) = (handed_to, self.links.clone(), window.is_zero()) {
            let peers = links
                .sync
                .recent(self.config.continuity.kick_window)
                .await
                .map_or(0, |recent| recent.len());
            let window = self.window_for(peers);
            self.set_ownership(Ownership::Grace).await;
            self.open_window(&links, to, window).await;
            self.grace_until = Some(Instant::now() + window);
            info!(
                to,
                window_ms = window.as_millis() as u64,
                "handed over: answering for this gateway's sessions until the window closes"
            );
        } else {
            self.grace_until = None;
            self.set_ownership(Ownership::None).await;
            self.close_window().await;
            self.drop_sessions().await;
        }
    }

    /// An active/standby gateway that owns no client holds no WireGuard
    /// session: the sessions of its last term would still be retried
    /// (WireGuard re-initiates for up to 90 s after it stops hearing a
    /// client, which the egress guard drops), and one such retry getting
    /// out just as this gateway becomes master again would race its kick.
    async fn drop_sessions(&self) {
        if let Some(links) = &self.links
            && let Err(error) = links.wireguard.drop_sessions().await
        {
            error!(error = %error_chain(&error), "dropping the WireGuard sessions failed");
        }
    }

    /// How long the handover window stays open: the configured time plus
    /// what kicking `peers` takes at the kick rate.
    fn window_for(&self, peers: usize) -> Duration {
        let settings = self.config.continuity;
        let kicking = match settings.kick_rate {
            0 => Duration::ZERO,
            rate => Duration::from_secs_f64(peers as f64 / f64::from(rate)),
        };
        if settings.handover_window.is_zero() {
            Duration::ZERO
        } else {
            settings.handover_window + kicking
        }
    }

    /// Opens the second-chance window toward gateway `to` for `window`;
    /// false when it cannot (no window configured, `to`'s MAC address not
    /// known yet).
    async fn open_window(&self, links: &Links, to: u32, window: Duration) -> bool {
        if window.is_zero() {
            return false;
        }
        let mac = match links.sync.mac_of(to).await {
            Ok(Some(mac)) => mac,
            Ok(None) => {
                warn!(
                    gateway = to,
                    "no endpoint message from that gateway yet: its MAC address is unknown, no handover window"
                );
                return false;
            }
            Err(error) => {
                warn!(%error, "no handover window");
                return false;
            }
        };
        match self.datapath.open_handover(mac, self.mac, window).await {
            Ok(()) => true,
            Err(error) => {
                error!(error = %error_chain(&error), "opening the handover window failed");
                false
            }
        }
    }

    async fn close_window(&self) {
        if self.links.is_none() {
            return;
        }
        if let Err(error) = self.datapath.close_handover().await {
            error!(error = %error_chain(&error), "closing the handover window failed");
        }
    }

    /// What the egress guard lets out: in director mode the clients this
    /// gateway owns, master or not; otherwise everything on the master and
    /// nothing on a backup.
    fn ownership(&self, master: bool) -> Ownership {
        match (self.config.director.is_some(), master) {
            (true, _) => Ownership::Table,
            (false, true) => Ownership::All,
            (false, false) => Ownership::None,
        }
    }

    /// Tells the egress guard what this gateway may send (a no-op without
    /// failover continuity: the guard is not attached then).
    async fn set_ownership(&self, ownership: Ownership) {
        if self.links.is_none() {
            return;
        }
        if let Err(error) = self.datapath.set_ownership(ownership).await {
            error!(error = %error_chain(&error), ?ownership, "setting the egress guard failed");
        }
    }

    /// The director state the location calls for now: this gateway and
    /// every gateway heard recently, steering while this one is MASTER.
    fn desired_director(&mut self) -> Desired {
        let role = self.machine.role();
        let own = self.machine.advert();
        let mut members = vec![Member {
            gateway_id: self.config.election.gateway_id,
            mac: self.mac,
            local: true,
            healthy: own.healthy && matches!(role, Role::Backup | Role::Master),
            draining: self.draining,
        }];
        for (&id, peer) in self.machine.peers() {
            let Some(extra) = self.extras.get(&id) else {
                continue;
            };
            members.push(Member {
                gateway_id: id,
                mac: extra.mac,
                local: false,
                healthy: peer.healthy
                    && peer.priority > 0
                    && matches!(peer.role, Role::Backup | Role::Master),
                draining: extra.draining,
            });
        }
        let (desired, unusable) = Desired::new(role == Role::Master, self.mac, members);
        for id in unusable {
            if !self.warned_ids.contains(&id) {
                warn!(
                    gateway_id = id,
                    "a gateway id above 255 cannot be a director backend; it gets no clients"
                );
                self.warned_ids.push(id);
            }
        }
        desired
    }

    /// Writes the director state into the XDP program if it changed. A
    /// no-op in active/standby mode.
    async fn sync_director(&mut self) {
        if self.config.director.is_none() {
            return;
        }
        let desired = self.desired_director();
        let backends: Vec<u32> = desired.backends.iter().map(|b| b.gateway_id).collect();
        let left: Vec<u32> = self
            .director_backends
            .iter()
            .copied()
            .filter(|id| !backends.contains(id))
            .collect();
        self.director_backends = backends;
        if !left.is_empty() {
            self.kick_inherited(&left, &desired).await;
        }
        if self.director_sent.as_ref() == Some(&desired) {
            return;
        }
        let backends: Vec<String> = desired
            .backends
            .iter()
            .map(|b| {
                format!(
                    "{}{}",
                    b.gateway_id,
                    if b.draining { " (draining)" } else { "" }
                )
            })
            .collect();
        match self.datapath.set_director(desired.clone()).await {
            Ok(()) => {
                info!(on = desired.on, ?backends, "director updated");
                self.director_sent = Some(desired);
            }
            // Tried again with the next event.
            Err(error) => error!(error = %error_chain(&error), "updating the director failed"),
        }
    }

    /// Director mode: gateways `left` dropped out of the backends, and the
    /// clients they served fall to the gateways the Maglev table now names.
    /// This gateway owns and kicks those that fall to it, so that they
    /// handshake here at once rather than after WireGuard's timers.
    async fn kick_inherited(&mut self, left: &[u32], desired: &Desired) {
        let (Some(director), Some(links)) = (self.config.director, self.links.clone()) else {
            return;
        };
        let own_id = self.config.election.gateway_id;
        let table = match maglev::build(&desired.table_members(), director.table_size) {
            Ok(table) => table,
            Err(error) => {
                error!(%error, "no Maglev table: no inherited clients kicked");
                return;
            }
        };
        let recent = match links.sync.recent(self.config.continuity.kick_window).await {
            Ok(recent) => recent,
            Err(error) => {
                error!(%error, "no endpoint table: no inherited clients kicked");
                return;
            }
        };
        let inherited = inherited(&recent, left, &table, own_id);
        if inherited.is_empty() {
            return;
        }
        let clients: Vec<_> = inherited.iter().map(|r| client_key(r.endpoint)).collect();
        if let Err(error) = self.datapath.own(clients).await {
            error!(error = %error_chain(&error), "owning the inherited clients failed");
            return;
        }
        let gone = left
            .iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        let request = KickRequest {
            meta: FailoverMeta {
                at: SystemTime::now(),
                cause: format!("clients inherited from gateway {gone}"),
                planned: false,
                detection_ms: None,
                vip_move_ms: 0,
            },
            candidates: inherited
                .iter()
                .map(|r| Candidate {
                    key: r.key,
                    endpoint: r.endpoint,
                    last_handshake: r.last_handshake,
                })
                .collect(),
            rate: self.config.continuity.kick_rate,
        };
        info!(
            inherited = request.candidates.len(),
            from = %gone,
            "kicking handshakes to the clients inherited from gateways that left"
        );
        if let Err(error) = links.wireguard.kick(request).await {
            error!(error = %error_chain(&error), "kicking handshakes failed");
        }
    }

    /// How long a renewal of the fence's lease lasts.
    fn lease(&self) -> Duration {
        LEASE_INTERVALS * self.config.election.interval
    }

    /// Renews the fence's lease; `holds_vips` when this gateway answers for
    /// the VIPs (MASTER).
    async fn renew(&self, holds_vips: bool) {
        if let Err(error) = self.datapath.renew_lease(self.lease(), holds_vips).await {
            error!(error = %error_chain(&error), "renewing the VIP fence's lease failed");
        }
    }

    /// Sends the announcements for every VIP several times, spaced, on a
    /// task of its own; a new announcement replaces one in flight.
    fn announce(&mut self) {
        if let Some(previous) = self.announcing.take() {
            previous.cancel();
        }
        let cancel = CancellationToken::new();
        self.announcing = Some(cancel.clone());
        let frames: Vec<Vec<u8>> = self
            .config
            .vips
            .iter()
            .map(|vip| announce::frame(*vip, self.mac))
            .collect();
        let socket = match self.frames.try_clone() {
            Ok(socket) => socket,
            Err(error) => {
                error!(%error, "announcing the VIPs failed");
                return;
            }
        };
        let lease = self.lease();
        tokio::spawn(async move {
            let start = tokio::time::Instant::now();
            for round in 0..ANNOUNCE_COUNT {
                let due = start + ANNOUNCE_SPACING * round;
                tokio::select! {
                    () = cancel.cancelled() => return,
                    () = tokio::time::sleep_until(due) => {}
                }
                // Woken past the lease, the process was paused (SIGSTOP, a
                // starved CPU): the fence has cut this gateway off and
                // another may hold the VIPs now. The agent, which sees the
                // pause too, announces again if they are still this one's.
                if due.elapsed() > lease {
                    warn!(
                        late_ms = due.elapsed().as_millis() as u64,
                        "announcements stopped: paused past the lease"
                    );
                    return;
                }
                for frame in &frames {
                    if let Err(error) = socket.send(frame) {
                        warn!(%error, "sending an announcement failed");
                    }
                }
            }
        });
    }

    fn log_transition(&self) {
        if let Some(last) = self.machine.transitions().last() {
            info!(
                from = %last.from,
                to = %last.to,
                reason = %last.reason,
                "HA role"
            );
        }
    }

    /// What the agent knows now, for status readers.
    fn view(&self) -> AgentView {
        AgentView {
            location_id: self.config.location_id,
            gateway_id: self.config.election.gateway_id,
            role: self.machine.role(),
            priority: self.machine.priority(),
            interval: self.config.election.interval,
            master: self.machine.master(),
            maintenance: self.machine.maintenance(),
            mode: if self.config.director.is_some() {
                HaMode::Director
            } else {
                HaMode::ActiveStandby
            },
            draining: self.draining,
            vips: self.config.vips.clone(),
            peers: self
                .machine
                .peers()
                .iter()
                .map(|(id, peer)| (*id, *peer, self.extras.get(id).copied()))
                .collect(),
            transitions: self.machine.transitions().cloned().collect(),
            dropped: self.dropped.clone(),
            anchor: self.anchor,
        }
    }
}

/// Where the agent publishes what it knows.
struct Published {
    summary: watch::Sender<HaSummary>,
    view: watch::Sender<AgentView>,
}

/// What the agent knows, published after each of its steps.
#[derive(Debug, Clone)]
struct AgentView {
    location_id: u32,
    gateway_id: u32,
    role: Role,
    priority: u8,
    interval: Duration,
    master: Option<u32>,
    maintenance: bool,
    mode: HaMode,
    draining: bool,
    vips: Vec<IpAddr>,
    peers: Vec<(u32, PeerView, Option<PeerExtra>)>,
    transitions: Vec<Transition>,
    dropped: BTreeMap<String, u64>,
    /// An instant and the wall-clock time at that instant.
    anchor: (Instant, SystemTime),
}

/// The parts of the status other tasks own.
struct Owned {
    vips_held: Vec<IpAddr>,
    fence: Option<FenceStatus>,
    failovers: Vec<FailoverReport>,
    endpoints: Option<SyncStatus>,
}

impl AgentView {
    /// The whole status at `now`, with what the other tasks own.
    fn status(self, now: Instant, owned: Owned) -> HaStatus {
        let (anchor, wall) = self.anchor;
        let to_unix_ms = |at: Instant| {
            let wall = if at >= anchor {
                wall + (at - anchor)
            } else {
                wall - (anchor - at)
            };
            wall.duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default()
                .as_millis() as u64
        };
        HaStatus {
            location_id: self.location_id,
            gateway_id: self.gateway_id,
            role: self.role,
            priority: self.priority,
            advert_interval_ms: self.interval.as_millis() as u64,
            master: self.master,
            maintenance: self.maintenance,
            mode: self.mode,
            draining: self.draining,
            vips: self.vips,
            vips_held: owned.vips_held,
            peers: self
                .peers
                .into_iter()
                .map(|(id, peer, extra)| PeerStatus {
                    gateway_id: id,
                    role: peer.role,
                    priority: peer.priority,
                    healthy: peer.healthy,
                    maintenance: peer.maintenance,
                    draining: extra.is_some_and(|e| e.draining),
                    mac: extra.map(|e| format_mac(&e.mac)).unwrap_or_default(),
                    last_seen_ms: now.saturating_duration_since(peer.last_seen).as_millis() as u64,
                })
                .collect(),
            transitions: self
                .transitions
                .into_iter()
                .map(|t| TransitionStatus {
                    at_ms: to_unix_ms(t.at),
                    from: t.from,
                    to: t.to,
                    reason: t.reason,
                })
                .collect(),
            dropped: self.dropped,
            fence: owned.fence,
            failovers: owned.failovers,
            endpoints: owned.endpoints,
        }
    }
}

/// Starts the agent task: returns its handle, a sender for health changes,
/// and the task's future.
pub fn spawn(
    agent: Agent,
    cancel: CancellationToken,
) -> (
    HaHandle,
    mpsc::Sender<HealthEvent>,
    impl Future<Output = ()>,
) {
    let (tx, commands) = mpsc::channel(16);
    let (health_tx, health) = mpsc::channel(16);
    let (summary_tx, summary) = watch::channel(agent.summary());
    let (view_tx, view) = watch::channel(agent.view());
    let handle = HaHandle {
        tx,
        summary,
        view,
        vips: agent.vips.clone(),
        datapath: agent.datapath.clone(),
        links: agent.links.clone(),
    };
    let published = Published {
        summary: summary_tx,
        view: view_tx,
    };
    (
        handle,
        health_tx,
        agent.run(commands, health, published, cancel),
    )
}

/// The MAC address of `interface`, from sysfs.
fn read_mac(interface: &str) -> std::io::Result<Mac> {
    let text = std::fs::read_to_string(format!("/sys/class/net/{interface}/address"))?;
    let bytes: Vec<u8> = text
        .trim()
        .split(':')
        .map(|byte| u8::from_str_radix(byte, 16))
        .collect::<Result<_, _>>()
        .map_err(std::io::Error::other)?;
    bytes
        .try_into()
        .map_err(|_| std::io::Error::other(format!("{interface} has no Ethernet address")))
}

/// The recently active clients that gateways `left` served and that the
/// Maglev `table` (an entry per slot: a gateway id, 0 for none) now gives
/// to gateway `own_id`, as the director picks: by the client's hash.
fn inherited(recent: &[Recent], left: &[u32], table: &[u8], own_id: u32) -> Vec<Recent> {
    let Ok(size) = u32::try_from(table.len()) else {
        return Vec::new();
    };
    recent
        .iter()
        .filter(|r| left.contains(&r.gateway_id))
        .filter(|r| {
            let key = client_key(r.endpoint);
            let index = table_index(client_hash(&key), size) as usize;
            table.get(index).is_some_and(|&id| u32::from(id) == own_id)
        })
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;

    #[test]
    fn inherited_clients_are_those_of_the_gone_gateways_the_table_gives_here() {
        let table = maglev::build(&[1, 2], 251).unwrap();
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let recent: Vec<Recent> = (0..200u16)
            .map(|i| Recent {
                key: crate::wireguard::Key::new([i as u8; 32]),
                endpoint: SocketAddr::from(([198, 51, 100, 7], 40_000 + i)),
                last_handshake: at,
                gateway_id: if i % 2 == 0 { 3 } else { 1 },
            })
            .collect();
        let mine = inherited(&recent, &[3], &table, 1);
        let theirs = inherited(&recent, &[3], &table, 2);
        // Every client of gateway 3 falls to exactly one of the two.
        assert_eq!(mine.len() + theirs.len(), 100);
        assert!(!mine.is_empty() && !theirs.is_empty());
        for r in &mine {
            assert_eq!(r.gateway_id, 3);
            let key = client_key(r.endpoint);
            assert_eq!(table[table_index(client_hash(&key), 251) as usize], 1);
        }
        // Nothing is inherited from a gateway that is still there.
        assert!(inherited(&recent, &[2], &table, 1).is_empty());
    }
}
