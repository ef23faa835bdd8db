//! The HA agent task: it owns the election state machine, the advert socket
//! and the VIPs. It feeds the machine what it hears, the passing of time,
//! health changes and operator requests, and carries out the actions the
//! machine returns. Other tasks talk to it through an [`HaHandle`].
//!
//! Failover continuity around each change of role is the
//! [`Controller`]'s: the agent feeds it the machine's actions, the location
//! its adverts describe (in director mode, the gateways that are backends)
//! and the endpoint table, and carries out its effects. The loop never
//! waits on a task that can be busy: WireGuard gets its kicks without an
//! answer, the endpoint table is read from its published snapshot, and
//! status requests read the agent's own snapshot.

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
    health::HealthEvent,
    machine::{Action, Event, HandoverError, Heard, Machine, PeerView, Role, Settings, Transition},
    sharing::{SharingHandle, SharingSnapshot, SharingStatus, wire},
    transport::{Destination, Transport},
    vip::{VipError, Vips, set_arp_sysctls},
};
use crate::{
    continuity::{self, Controller, ControllerConfig, Effect, Input},
    datapath::DatapathHandle,
    director::{DirectorConfig, Member},
    error_chain,
    wireguard::{WireguardHandle, kick::FailoverReport},
    xdp::{FenceStatus, director::format_mac},
};

/// Times each announcement (gratuitous ARP, unsolicited NA) is sent.
const ANNOUNCE_COUNT: u32 = 5;
/// Time between two sends of an announcement.
const ANNOUNCE_SPACING: Duration = Duration::from_millis(100);
/// Largest advert read.
const MAX_ADVERT: usize = 2048;
/// The fence's lease lasts this many advert intervals. Every advert renews
/// it, and a master-down interval is longer, so a live master never lapses
/// and a dead one is fenced before a backup takes over. Public for the
/// simulation (`gateway/tests/simulation`), which renews it as the agent does.
pub const LEASE_INTERVALS: u32 = 3;

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
    pub continuity: continuity::Settings,
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
pub struct GatewayStatus {
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
    pub peers: Vec<GatewayStatus>,
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
    pub endpoints: Option<SharingStatus>,
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
enum Wake {
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
    tasks: Option<Tasks>,
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
        // The kernel's word on the VIPs; the rest from published snapshots.
        let vips_held = self.vips.held().await.unwrap_or_else(|error| {
            warn!(error = %error_chain(&error), "reading the VIPs failed");
            Vec::new()
        });
        let now = Instant::now();
        let (failovers, endpoints) = match &self.tasks {
            Some(tasks) => (
                tasks.wireguard.failovers(),
                Some(tasks.sharing.subscribe().borrow().status(now)),
            ),
            None => (Vec::new(), None),
        };
        Ok(view.status(
            now,
            Owned {
                vips_held,
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
    /// The lease as last renewed: when, for how long, holding the VIPs.
    renewed: Option<(Instant, Duration, bool)>,
    /// When the agent last ran: a longer gap than the lease means it was
    /// frozen.
    last_wake: Instant,
    /// This gateway takes no new clients (director mode).
    draining: bool,
    /// Draining flags and addresses from the other gateways' adverts.
    extras: BTreeMap<u32, PeerExtra>,
    /// Why the gateway is unhealthy, while it is.
    fault: Option<String>,
    /// Why the priority is lowered, while it is.
    penalty: Option<String>,
    /// The endpoint-sharing task and the WireGuard task, for failover
    /// continuity (none without `[wireguard]`).
    tasks: Option<Tasks>,
    /// The endpoint table as last published, while it changes.
    endpoints: Option<watch::Receiver<SharingSnapshot>>,
    /// Failover continuity and the director.
    controller: Controller,
}

/// The tasks failover continuity talks to.
#[derive(Debug, Clone)]
struct Tasks {
    sharing: SharingHandle,
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
        let anchor = (Instant::now(), now);
        let controller = Controller::new(controller_config(&config, mac, false), anchor);
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
            anchor,
            datapath,
            renewed: None,
            last_wake: Instant::now(),
            tasks: None,
            endpoints: None,
            controller,
            draining: false,
            extras: BTreeMap::new(),
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

    /// Connects failover continuity: endpoint messages go to `sharing`,
    /// whose published table the controller reads for the peers to kick;
    /// `wireguard` kicks them.
    pub fn connect(&mut self, sharing: SharingHandle, wireguard: WireguardHandle) {
        self.endpoints = Some(sharing.subscribe());
        self.tasks = Some(Tasks { sharing, wireguard });
        self.controller =
            Controller::new(controller_config(&self.config, self.mac, true), self.anchor);
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
        let effects = self.controller.step(Input::Start, Instant::now());
        self.apply(effects).await;
        let actions = self.machine.on_event(Event::Start, Instant::now());
        self.execute(actions).await;
        self.publish(&published);
        let mut buf = vec![0u8; MAX_ADVERT];
        let mut stopping = false;
        loop {
            let deadline = [
                self.machine.next_deadline(),
                self.controller.next_deadline(),
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
                    Wake::Shutdown
                }
                () = tokio::time::sleep_until(deadline.into()) => Wake::Tick,
                received = self.transport.recv(&mut buf) => match received {
                    Ok((len, from, known)) => Wake::Advert { len, from, known },
                    Err(error) => {
                        warn!(%error, "receiving adverts failed");
                        Wake::Nothing
                    }
                },
                Some(event) = health.recv() => Wake::Health(event),
                Some(command) = commands.recv() => Wake::Command(command),
            };
            self.read_endpoints();
            // First on waking: a pause longer than the lease (SIGSTOP, a
            // starved CPU) means what the machine knows is stale, and the
            // fence has cut this gateway off already.
            let now = Instant::now();
            if let Some(paused) = self.paused(now) {
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
                Wake::Shutdown => self.machine.on_event(Event::Shutdown, Instant::now()),
                Wake::Tick => {
                    let effects = self.controller.step(Input::Tick, Instant::now());
                    self.apply(effects).await;
                    self.machine.on_event(Event::Tick, Instant::now())
                }
                Wake::Advert { len, from, known } => self.receive(&buf[..len], from, known),
                Wake::Health(HealthEvent::Fault { healthy, reason }) => {
                    self.fault = (!healthy).then(|| reason.clone());
                    self.machine
                        .on_event(Event::Health { healthy, reason }, Instant::now())
                }
                Wake::Health(HealthEvent::Penalty { points, reason }) => {
                    self.penalty = (points > 0).then(|| reason.clone());
                    self.machine.set_penalty(points, &reason, Instant::now())
                }
                Wake::Command(command) => self.command(command).await,
                Wake::Nothing => Vec::new(),
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
        if let Some(until) = self.controller.grace_until() {
            info!(
                left_ms = until.saturating_duration_since(Instant::now()).as_millis() as u64,
                "answering for the sessions handed over until the window closes"
            );
            // The lease goes on being renewed, every interval: the egress
            // guard lets the answers out only while it is live.
            loop {
                self.renew(false);
                let next = Instant::now() + self.config.election.interval;
                if next >= until {
                    break;
                }
                tokio::time::sleep_until(next.into()).await;
            }
            tokio::time::sleep_until(until.into()).await;
            let effects = self.controller.step(Input::Tick, until);
            self.apply(effects).await;
        }
        info!("HA agent stopped");
    }

    /// Hands the controller the endpoint table when it was published anew.
    fn read_endpoints(&mut self) {
        let Some(endpoints) = &mut self.endpoints else {
            return;
        };
        if endpoints.has_changed().unwrap_or(false) {
            let view = endpoints.borrow_and_update().view.clone();
            self.controller.step(Input::Endpoints(view), Instant::now());
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
        if wire::is_endpoint_message(bytes) {
            match &self.tasks {
                Some(tasks) => {
                    if !tasks.sharing.deliver(bytes.to_vec(), from, known) {
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
                    self.renew(self.machine.role() == Role::Master);
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
                    self.renew_in_order(true).await;
                    let cause = self.machine.cause();
                    let effects = self.controller.step(Input::Promoted { cause }, became);
                    self.apply(effects).await;
                    self.sync_director().await;
                    if let Err(error) = self.vips.take().await {
                        error!(error = %error_chain(&error), "adding the VIPs failed");
                    }
                    self.announce();
                    let moved = Input::VipsMoved {
                        became,
                        vip_move: became.elapsed(),
                        reason: self.last_reason(),
                    };
                    let effects = self.controller.step(moved, Instant::now());
                    self.apply(effects).await;
                }
                Action::ReleaseVips => {
                    self.log_transition();
                    if let Some(announcing) = self.announcing.take() {
                        announcing.cancel();
                    }
                    self.renew_in_order(false).await;
                    let cause = self.machine.cause();
                    let effects = self
                        .controller
                        .step(Input::Demoted { cause }, Instant::now());
                    self.apply(effects).await;
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

    /// Carries out the controller's effects, in order: the XDP maps through
    /// the datapath task, WireGuard's without waiting for it.
    async fn apply(&mut self, effects: Vec<Effect>) {
        let wireguard = self.tasks.as_ref().map(|tasks| tasks.wireguard.clone());
        // Kicks to clients this gateway failed to own would be refused by
        // the egress guard: they are not sent.
        let mut owned = true;
        for effect in effects {
            let (what, result) = match effect {
                Effect::SetOwnership(ownership) => (
                    "setting the egress guard",
                    self.datapath.set_ownership(ownership).await,
                ),
                Effect::OpenWindow { peer_mac, window } => (
                    "opening the handover window",
                    self.datapath
                        .open_handover(peer_mac, self.mac, window)
                        .await,
                ),
                Effect::CloseWindow => (
                    "closing the handover window",
                    self.datapath.close_handover().await,
                ),
                Effect::SetDirector(desired) => {
                    let backends: Vec<String> = desired
                        .backends
                        .iter()
                        .map(|b| {
                            let draining = if b.draining { " (draining)" } else { "" };
                            format!("{}{draining}", b.gateway_id)
                        })
                        .collect();
                    let on = desired.on;
                    let result = self.datapath.set_director(desired).await;
                    match &result {
                        Ok(()) => info!(on, ?backends, "director updated"),
                        // Written again with the next event.
                        Err(_) => {
                            self.controller
                                .step(Input::DirectorNotWritten, Instant::now());
                        }
                    }
                    ("updating the director", result)
                }
                Effect::Own(clients) => {
                    let result = self.datapath.own(clients).await;
                    owned = result.is_ok();
                    ("owning the inherited clients", result)
                }
                Effect::Kick(request) => {
                    if owned
                        && let Some(wireguard) = &wireguard
                        && let Err(error) = wireguard.kick(request)
                    {
                        error!(error = %error_chain(&error), "kicking handshakes failed");
                    }
                    continue;
                }
                Effect::DropSessions => {
                    if let Some(wireguard) = &wireguard
                        && let Err(error) = wireguard.drop_sessions()
                    {
                        error!(error = %error_chain(&error), "dropping the WireGuard sessions failed");
                    }
                    continue;
                }
            };
            if let Err(error) = result {
                error!(error = %error_chain(&error), "{what} failed");
            }
        }
    }

    /// The reason of the last role change.
    fn last_reason(&self) -> String {
        self.machine
            .transitions()
            .last()
            .map(|t| t.reason.clone())
            .unwrap_or_default()
    }

    /// The location's gateways as the adverts describe them, this one
    /// among them, for the director.
    fn members(&self) -> Vec<Member> {
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
        members
    }

    /// Director mode: the controller follows the location (a no-op in
    /// active/standby mode).
    async fn sync_director(&mut self) {
        if self.config.director.is_none() {
            return;
        }
        let location = Input::Location {
            steering: self.machine.role() == Role::Master,
            members: self.members(),
        };
        let effects = self.controller.step(location, Instant::now());
        self.apply(effects).await;
    }

    /// How long the agent was away, when that is past the lease: since
    /// its last wake, and for a master since its last renewal of the lease
    /// (up to an interval before that wake), from which the fence counts.
    fn paused(&self, now: Instant) -> Option<Duration> {
        let since_wake = now.saturating_duration_since(self.last_wake);
        let since_renewal = match (self.machine.role(), self.renewed) {
            (Role::Master, Some((at, _, _))) => now.saturating_duration_since(at),
            _ => Duration::ZERO,
        };
        let paused = since_wake.max(since_renewal);
        (paused > self.lease()).then_some(paused)
    }

    /// How long a renewal of the fence's lease lasts.
    fn lease(&self) -> Duration {
        LEASE_INTERVALS * self.config.election.interval
    }

    /// Renews the lease for a change of role, and waits until the fence
    /// has it: what follows (the VIPs, their announcements) relies on it.
    async fn renew_in_order(&mut self, holds_vips: bool) {
        self.renew(holds_vips);
        if let Err(error) = self.datapath.lease_applied().await {
            error!(error = %error_chain(&error), "renewing the VIP fence's lease failed");
        }
    }

    /// Renews the fence's lease without waiting; `holds_vips` when this
    /// gateway answers for the VIPs (MASTER).
    fn renew(&mut self, holds_vips: bool) {
        self.datapath.renew_lease(self.lease(), holds_vips);
        self.renewed = Some((Instant::now(), self.lease(), holds_vips));
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
            renewed: self.renewed,
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
    /// The lease as last renewed: when, for how long, holding the VIPs.
    renewed: Option<(Instant, Duration, bool)>,
    /// An instant and the wall-clock time at that instant.
    anchor: (Instant, SystemTime),
}

/// The parts of the status other tasks own.
struct Owned {
    vips_held: Vec<IpAddr>,
    failovers: Vec<FailoverReport>,
    endpoints: Option<SharingStatus>,
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
                .map(|(id, peer, extra)| GatewayStatus {
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
            fence: self.renewed.map(|(at, lease, holds_vips)| FenceStatus {
                holds_vips,
                lease_left_ms: lease
                    .saturating_sub(now.saturating_duration_since(at))
                    .as_millis() as u64,
            }),
            failovers: owned.failovers,
            endpoints: owned.endpoints,
        }
    }
}

/// A thread of the agent's own, with a single-threaded runtime that nothing
/// else of the daemon's runs on but the datapath task (short map writes,
/// the lease renewals among them): however busy the other tasks are (a
/// reload of many peers parses and plans on theirs), adverts, the lease and
/// the timers of the election keep their times. Its sockets (adverts, the
/// VIPs' netlink) are made on it, so that what arrives wakes it alone. The
/// thread runs at a real-time priority ([`REALTIME_PRIORITY`], `SCHED_RR`,
/// as keepalived's `vrrp_rt_priority`) where the daemon may, so that a
/// host whose CPUs are all busy still runs it on time; it is idle but for
/// a few microseconds each advert. It runs until this is dropped.
#[derive(Debug)]
pub struct AgentThread {
    runtime: tokio::runtime::Handle,
    /// Dropped with this: the thread's runtime stops.
    _stop: oneshot::Sender<()>,
}

impl AgentThread {
    /// Starts the thread.
    pub fn start() -> std::io::Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("ha-agent".into())
            .spawn(move || {
                if let Err(error) = set_realtime(REALTIME_PRIORITY) {
                    warn!(
                        %error,
                        "the HA agent runs at normal priority: busy CPUs may delay its adverts"
                    );
                }
                let _ = runtime.block_on(stopped);
            })?;
        Ok(Self {
            runtime: handle,
            _stop: stop,
        })
    }

    /// Starts the agent on the thread (see [`Agent::start`]).
    pub async fn start_agent(
        &self,
        config: HaConfig,
        datapath: DatapathHandle,
    ) -> Result<Agent, HaError> {
        self.runtime
            .spawn(Agent::start(config, datapath))
            .await
            .map_err(|_| HaError::Stopped)?
    }

    /// Runs `task` (the agent's, from [`spawn`], or the datapath task's)
    /// on the thread; the handle resolves when it ends.
    pub fn run<T: Send + 'static>(
        &self,
        task: impl Future<Output = T> + Send + 'static,
    ) -> tokio::task::JoinHandle<T> {
        self.runtime.spawn(task)
    }
}

/// The agent thread's `SCHED_RR` priority: above every normal thread, low
/// among real-time ones (the kernel's own threads run at 50).
pub const REALTIME_PRIORITY: i32 = 10;

/// Puts the calling thread in the `SCHED_RR` class at `priority`.
fn set_realtime(priority: i32) -> std::io::Result<()> {
    let param = libc::sched_param {
        sched_priority: priority,
    };
    // SAFETY: `param` is a valid sched_param that outlives the call; pid 0
    // is the calling thread.
    let result = unsafe { libc::sched_setscheduler(0, libc::SCHED_RR, &param) };
    if result == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
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
        tasks: agent.tasks.clone(),
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

/// The controller's settings for a gateway with `config` and Ethernet
/// address `mac`; `wireguard` when it runs the location's WireGuard.
fn controller_config(config: &HaConfig, mac: Mac, wireguard: bool) -> ControllerConfig {
    ControllerConfig {
        gateway_id: config.election.gateway_id,
        mac,
        settings: config.continuity,
        director: config.director,
        wireguard,
    }
}
