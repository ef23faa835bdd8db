//! The HA agent task: it owns the [`Election`], the advert socket and the
//! VIPs. It feeds the election what it hears, the passing of time, health
//! changes and operator requests, and carries out the actions the machine
//! returns. Other tasks talk to it through an [`HaHandle`] and read what it
//! publishes ([`super::status`]).
//!
//! Failover continuity around each change of role is the
//! [`Controller`]'s: the agent feeds it the machine's actions, the location
//! its adverts describe (in director mode, the gateways that are backends)
//! and the endpoint table, and carries out its effects. The loop never
//! waits on a task that can be busy: WireGuard gets its kicks without an
//! answer, the endpoint table is read from its published snapshot, and
//! status requests read the agent's own snapshot.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::{
    advert::{self, AdvertKey},
    announce::{self, FrameSocket, Mac},
    election::{Election, Identity},
    health::HealthEvent,
    machine::{Action, Cause, Event, HandoverError, Role, Settings, TransitionKind, answer},
    sharing::{SharingHandle, SharingSnapshot, wire},
    status::{AgentView, HaMetricsView, HaStatus, HaSummary, Owned},
    transport::{Destination, Transport},
    vip::{VipError, Vips, set_arp_sysctls},
};
use crate::{
    continuity::{self, Controller, ControllerConfig, Effect, Input},
    datapath::DatapathHandle,
    director::DirectorConfig,
    error_chain,
    metrics::GatewayMetrics,
    wireguard::{WireguardHandle, kick::FailoverReport},
};

/// Times each announcement (gratuitous ARP, unsolicited NA) is sent.
const ANNOUNCE_COUNT: u32 = 5;
/// Time between two sends of an announcement.
const ANNOUNCE_SPACING: Duration = Duration::from_millis(100);
/// Largest advert read.
const MAX_ADVERT: usize = 2048;
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

/// How the location's gateways share the clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HaMode {
    /// The master serves every client; the backups wait.
    ActiveStandby,
    /// The master steers each client to one of the healthy gateways.
    Director,
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

/// A reserved place in the agent's queue ([`HaHandle::reserve`]). Filling
/// it never waits; dropped unfilled, the place is given back.
#[derive(Debug)]
pub struct HaSlot<'a> {
    permit: mpsc::Permit<'a, Command>,
}

impl HaSlot<'_> {
    /// [`HaHandle::failover`], queued now.
    pub fn failover(self) -> impl Future<Output = Result<u32, HaError>> + Send + 'static {
        let (reply, rx) = oneshot::channel();
        self.permit.send(Command::Failover(reply));
        async move { Ok(rx.await.map_err(|_| HaError::Stopped)??) }
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
    /// The advert socket, for the datagrams its queue dropped.
    transport: Arc<Transport>,
}

impl HaHandle {
    /// The summary as it is now; `changed()` on the receiver wakes on
    /// every change of role, priority, health, master or maintenance.
    pub fn subscribe(&self) -> watch::Receiver<HaSummary> {
        self.summary.clone()
    }

    /// The records of the last failovers to this gateway, with failover
    /// continuity (`[wireguard]`); `changed()` wakes on each update.
    pub fn subscribe_failovers(&self) -> Option<watch::Receiver<Vec<FailoverReport>>> {
        self.tasks
            .as_ref()
            .map(|tasks| tasks.wireguard.subscribe_failovers())
    }

    /// Waits until the agent has taken its first step of the election
    /// (started, and sent its first advert or taken the VIPs), so that the
    /// daemon can say it is ready; or until the agent is gone.
    pub async fn first_step(&self) -> Result<(), HaError> {
        // The view is published after every step, the first one included;
        // this receiver has seen none of them.
        let mut view = self.view.clone();
        view.changed().await.map_err(|_| HaError::Stopped)
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
        let socket_dropped = self.transport.dropped().unwrap_or_else(|error| {
            warn!(%error, "reading the advert socket's drops failed");
            0
        });
        Ok(view.status(
            now,
            Owned {
                vips_held,
                failovers,
                endpoints,
                socket_dropped,
            },
        ))
    }

    /// What a metrics scrape reads: the agent's published view and the
    /// advert socket's drops, never the agent's loop.
    pub fn metrics_view(&self) -> HaMetricsView {
        let socket_dropped = self.transport.dropped().unwrap_or_else(|error| {
            warn!(%error, "reading the advert socket's drops failed");
            0
        });
        self.view.borrow().metrics(Instant::now(), socket_dropped)
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

    /// A place in the agent's queue, waited for here: a failover put into
    /// it later goes in without waiting, so Core's term fence can decide
    /// and enqueue under a lock never held across an await.
    pub async fn reserve(&self) -> Result<HaSlot<'_>, HaError> {
        self.tx
            .reserve()
            .await
            .map(|permit| HaSlot { permit })
            .map_err(|_| HaError::Stopped)
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

/// The agent and everything it owns.
#[derive(Debug)]
pub struct Agent {
    config: HaConfig,
    /// The election and its adverts.
    election: Election,
    transport: Arc<Transport>,
    vips: Vips,
    frames: FrameSocket,
    dropped: BTreeMap<String, u64>,
    /// Gateways heard in authenticated adverts and admitted to the advert
    /// port by the shield.
    admitted: BTreeSet<Ipv4Addr>,
    /// Stops the announcements in flight when the VIPs are released.
    announcing: Option<CancellationToken>,
    /// Converts the machine's instants into wall-clock times.
    anchor: (Instant, SystemTime),
    /// The XDP program's owner, which renews the fence's lease.
    datapath: DatapathHandle,
    /// The lease as last renewed: when, for how long, holding the VIPs.
    renewed: Option<(Instant, Duration, bool)>,
    /// The advert format of the last advert sent.
    advert_version: u8,
    /// When the agent last ran: a longer gap than the lease means it was
    /// frozen.
    last_wake: Instant,
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
    /// Role changes since the start, by (from, to, why), and how many of the
    /// machine's records they count.
    transition_counts: BTreeMap<(Role, Role, TransitionKind), u64>,
    counted: u64,
    /// The failover histograms this agent observes.
    metrics: Option<Arc<GatewayMetrics>>,
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
    /// this gateway owns nothing until it wins an election. `epoch` opens
    /// every advert's (epoch, sequence): this start's, already on disk
    /// ([`super::epoch::advance`]).
    pub async fn start(
        config: HaConfig,
        datapath: DatapathHandle,
        epoch: u64,
    ) -> Result<Self, HaError> {
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
        let anchor = (Instant::now(), SystemTime::now());
        let controller = Controller::new(controller_config(&config, mac, false), anchor);
        let identity = Identity {
            location_id: config.location_id,
            key: config.key.clone(),
            mac,
            vips: config.vips.clone(),
            epoch,
        };
        Ok(Self {
            election: Election::new(config.election, identity),
            config,
            transport,
            vips,
            frames,
            dropped: BTreeMap::new(),
            admitted: BTreeSet::new(),
            announcing: None,
            anchor,
            datapath,
            renewed: None,
            advert_version: advert::VERSION,
            last_wake: Instant::now(),
            tasks: None,
            endpoints: None,
            controller,
            fault: None,
            penalty: None,
            transition_counts: BTreeMap::new(),
            counted: 0,
            metrics: None,
        })
    }

    /// The advert socket, which endpoint sharing sends on too.
    pub fn transport(&self) -> Arc<Transport> {
        Arc::clone(&self.transport)
    }

    /// The public interface's MAC address.
    pub fn mac(&self) -> Mac {
        self.election.identity().mac
    }

    /// This start's epoch, which endpoint sharing's messages carry too.
    pub fn epoch(&self) -> u64 {
        self.election.identity().epoch
    }

    /// Observes each failover to this gateway in `metrics`.
    pub fn set_metrics(&mut self, metrics: Arc<GatewayMetrics>) {
        self.metrics = Some(metrics);
    }

    /// Connects failover continuity: endpoint messages go to `sharing`,
    /// whose published table the controller reads for the peers to kick;
    /// `wireguard` kicks them.
    pub fn connect(&mut self, sharing: SharingHandle, wireguard: WireguardHandle) {
        self.endpoints = Some(sharing.subscribe());
        self.tasks = Some(Tasks { sharing, wireguard });
        self.controller = Controller::new(
            controller_config(&self.config, self.election.identity().mac, true),
            self.anchor,
        );
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
        let actions = self.election.on_event(Event::Start, Instant::now());
        self.execute(actions).await;
        self.publish(&published);
        let mut buf = vec![0u8; MAX_ADVERT];
        let mut stopping = false;
        loop {
            let deadline = [
                self.election.machine().next_deadline(),
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
            if let Some(paused) =
                self.election
                    .paused(now, self.last_wake, self.renewed.map(|(at, _, _)| at))
            {
                warn!(
                    paused_ms = paused.as_millis() as u64,
                    "the agent was paused past its lease"
                );
                let stalled = self.election.on_event(Event::Stalled { paused }, now);
                if self.execute(stalled).await {
                    break;
                }
            }
            let actions = match input {
                Wake::Shutdown => self.election.on_event(Event::Shutdown, Instant::now()),
                Wake::Tick => {
                    let effects = self.controller.step(Input::Tick, Instant::now());
                    self.apply(effects).await;
                    self.election.on_event(Event::Tick, Instant::now())
                }
                Wake::Advert { len, from, known } => self.receive(&buf[..len], from, known),
                Wake::Health(HealthEvent::Fault { healthy, reason }) => {
                    self.fault = (!healthy).then(|| reason.clone());
                    self.election
                        .on_event(Event::Health { healthy, reason }, Instant::now())
                }
                Wake::Health(HealthEvent::Penalty { points, reason }) => {
                    self.penalty = (points > 0).then(|| reason.clone());
                    self.election
                        .on_event(Event::Penalty { points, reason }, Instant::now())
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
    fn publish(&mut self, published: &Published) {
        self.count_transitions();
        let summary = self.summary();
        published.summary.send_if_modified(|current| {
            let changed = *current != summary;
            *current = summary;
            changed
        });
        published.view.send_replace(self.view());
    }

    /// Counts the role changes the machine recorded since the last call
    /// (notes, which change no role, are not counted).
    fn count_transitions(&mut self) {
        let machine = self.election.machine();
        let new = machine.recorded().saturating_sub(self.counted);
        self.counted = machine.recorded();
        let kept: Vec<(Role, Role, TransitionKind)> = machine
            .transitions()
            .map(|t| (t.from, t.to, t.kind))
            .collect();
        let start = kept
            .len()
            .saturating_sub(usize::try_from(new).unwrap_or(usize::MAX));
        for &(from, to, kind) in &kept[start..] {
            if from != to {
                *self.transition_counts.entry((from, to, kind)).or_default() += 1;
            }
        }
    }

    fn summary(&self) -> HaSummary {
        HaSummary {
            role: self.election.machine().role(),
            priority: self.config.election.priority,
            effective_priority: self.election.machine().priority(),
            healthy: self.election.machine().healthy(),
            faults: self
                .fault
                .iter()
                .chain(self.penalty.iter())
                .cloned()
                .collect(),
            master: self.election.machine().master(),
            maintenance: self.election.machine().maintenance(),
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
        match self.election.receive(bytes, Instant::now()) {
            Ok((_, actions)) => {
                // A gateway of the location: the shield lets it through
                // from now on, whatever strangers send.
                if let IpAddr::V4(source) = from.ip()
                    && !self.admitted.contains(&source)
                    && self.datapath.admit_advert_source(source)
                {
                    self.admitted.insert(source);
                }
                actions
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
            Command::Failover(reply) => {
                let actions = self.election.on_event(Event::Failover, now);
                // A failover that is not refused names the backup.
                let _ =
                    reply.send(answer(&actions).and_then(|to| to.ok_or(HandoverError::NoBackup)));
                actions
            }
            Command::Drain(on, reply) => {
                if self.config.director.is_none() {
                    let _ = reply.send(Err(HaError::NotDirector));
                    return Vec::new();
                }
                if self.election.set_draining(on) {
                    info!(on, "draining");
                }
                let _ = reply.send(Ok(()));
                // Tell the others at once; the director follows after this.
                vec![Action::Advertise(self.election.machine().advert())]
            }
            Command::Maintenance(on, reply) => {
                let actions = self.election.on_event(Event::Maintenance { on }, now);
                let answered = answer(&actions).map(drop);
                if answered.is_ok() {
                    info!(on, "maintenance");
                }
                let _ = reply.send(answered);
                actions
            }
        }
    }

    /// Carries out `actions` in order; true when the agent may exit.
    async fn execute(&mut self, actions: Vec<Action>) -> bool {
        let mut exit = false;
        for action in actions {
            match action {
                Action::Advertise(fields) => {
                    let oldest = fields.oldest_version;
                    if oldest != self.advert_version {
                        self.advert_version = oldest;
                        if oldest < advert::VERSION {
                            warn!(
                                version = oldest,
                                "a gateway of the previous release is heard: adverts in its \
                                 version too, and no preemption, until every gateway runs this one"
                            );
                        } else {
                            info!(
                                "every gateway heard runs this release: adverts in its version only"
                            );
                        }
                    }
                    for advert in self.election.encode(fields) {
                        if let Err(error) = self.transport.send(&advert).await {
                            warn!(%error, "sending an advert failed");
                        }
                    }
                    // Every advert renews the lease: the agent is alive.
                    self.renew(self.election.machine().role() == Role::Master);
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
                    let cause = self.election.machine().cause();
                    let effects = self.controller.step(Input::Promoted { cause }, became);
                    self.apply(effects).await;
                    self.sync_director().await;
                    if let Err(error) = self.vips.take().await {
                        error!(error = %error_chain(&error), "adding the VIPs failed");
                    }
                    self.announce();
                    let vip_move = became.elapsed();
                    if let Some(metrics) = &self.metrics {
                        if let Cause::Takeover {
                            last_heard: Some(heard),
                            ..
                        } = cause
                        {
                            GatewayMetrics::observe(
                                &metrics.failover_detection,
                                became.saturating_duration_since(heard),
                            );
                        }
                        GatewayMetrics::observe(&metrics.failover_vip_move, vip_move);
                    }
                    let moved = Input::VipsMoved {
                        became,
                        vip_move,
                        reason: self.election.last_reason(),
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
                    let cause = self.election.machine().cause();
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
                Action::HandOver(to) => info!(to, "handing over"),
                Action::Refuse(error) => info!(%error, "request refused"),
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
                        .open_handover(peer_mac, self.election.identity().mac, window)
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

    /// Director mode: the controller follows the location (a no-op in
    /// active/standby mode).
    async fn sync_director(&mut self) {
        if self.config.director.is_none() {
            return;
        }
        let now = Instant::now();
        let effects = self.controller.step(self.election.location(now), now);
        self.apply(effects).await;
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
        self.datapath.renew_lease(self.election.lease(), holds_vips);
        self.renewed = Some((Instant::now(), self.election.lease(), holds_vips));
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
            .map(|vip| announce::frame(*vip, self.election.identity().mac))
            .collect();
        let socket = match self.frames.try_clone() {
            Ok(socket) => socket,
            Err(error) => {
                error!(%error, "announcing the VIPs failed");
                return;
            }
        };
        let lease = self.election.lease();
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
        if let Some(last) = self.election.machine().transitions().last() {
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
            role: self.election.machine().role(),
            priority: self.election.machine().priority(),
            interval: self.config.election.interval,
            advert_version: self.election.machine().oldest_version(),
            master: self.election.machine().master(),
            maintenance: self.election.machine().maintenance(),
            mode: if self.config.director.is_some() {
                HaMode::Director
            } else {
                HaMode::ActiveStandby
            },
            draining: self.election.draining(),
            vips: self.config.vips.clone(),
            peers: self
                .election
                .machine()
                .peers()
                .iter()
                .map(|(id, peer)| (*id, *peer, self.election.extras().get(id).copied()))
                .collect(),
            transitions: self.election.machine().transitions().cloned().collect(),
            dropped: self.dropped.clone(),
            transition_counts: self.transition_counts.clone(),
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
        transport: agent.transport.clone(),
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
