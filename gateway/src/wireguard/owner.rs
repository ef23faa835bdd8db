//! The task that owns the WireGuard device. It creates or adopts the
//! interface, applies every change through the reconcile path, polls peer
//! stats, removes inactive peers on MFA locations, and restarts wireguard-go
//! if it dies. Other tasks talk to it through a [`WireguardHandle`].
//!
//! Peers come from three sources: the config file, `tidectl peer add`
//! (dynamic peers, kept in the state file) and Core's location config (also
//! kept in the state file). A public key, and an allowed IP, belong to one
//! source: what would make two sources claim the same is refused, naming
//! both, and nothing is applied. Core's device settings (private key,
//! listen port, addresses, MTU, MFA) replace the file's once Core's config
//! has been applied.
//!
//! It never deletes the interface and never flushes peers: when the daemon
//! stops, crashes or restarts, the device keeps serving its peers.
//!
//! A state file that cannot be written fails closed (see [`durability`]):
//! removals are applied all the same and the file catches up later.
//!
//! [`durability`]: super::durability

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    net::SocketAddr,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use ipnet::IpNet;

use super::{
    ApplyReport, BackendKind, BackendSetting, LocalPeers, PeerEndpoint, PeerSource, PeerStatus,
    PeersReply, WireguardConfig,
    activity::{Activity, ExpiryReason},
    backend::{Backend, BackendError},
    durability::{self, Origin, Saved, Verdict},
    kernel::Kernel,
    key::Key,
    kick::{self, FailoverReport, FailoverRun, KickRequest},
    link::{LinkError, Links},
    location::{self, LocationError, LocationUpdate},
    reconcile::{self, Actual, Desired},
    spec::{PeerError, PeerSpec, check_peers},
    state::{Removal, State, StateError, StateStore, from_unix, unix},
    userspace::{LaunchError, ProcessWatch, Userspace},
};
use crate::{error_chain, metrics::GatewayMetrics};

/// How often a failover's kicks go out, in batches of the rate's share.
const KICK_TICK: Duration = Duration::from_millis(20);
/// The least time between two publications of a followed failover's record.
const REPORT_SPACING: Duration = Duration::from_millis(100);

/// While a failover is followed, stats are read at least this far apart
/// (and at least twice as far apart as a read takes).
const FAST_POLL: Duration = Duration::from_millis(25);

/// Longest wait between attempts to bring back a dead wireguard-go.
const MAX_RESTART_DELAY: Duration = Duration::from_secs(30);

/// A restart this soon after the previous one backs off.
const QUICK_RESTART: Duration = Duration::from_secs(30);

/// Why the WireGuard device could not be set up or changed.
#[derive(Debug, thiserror::Error)]
pub enum WireguardError {
    #[error(transparent)]
    Link(#[from] LinkError),
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error(transparent)]
    Launch(#[from] LaunchError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(
        "not applied: a peer added or changed with tidectl must be recorded, and the state file cannot be written"
    )]
    Unsaved {
        #[source]
        source: StateError,
    },
    #[error(transparent)]
    Peer(#[from] PeerError),
    #[error("not applied: {count} peers, and {backend} holds at most {max}")]
    TooManyPeers {
        count: usize,
        max: usize,
        backend: BackendKind,
    },
    #[error(
        "interface {interface} exists but is not WireGuard (kind {kind}, and no wireguard-go answers on its socket)"
    )]
    NotWireguard { interface: String, kind: String },
    #[error(
        "interface {interface} is driven by {found}, but the config says backend = {setting:?}"
    )]
    BackendMismatch {
        interface: String,
        found: BackendKind,
        setting: BackendSetting,
    },
    #[error("backend = \"kernel\", but no kernel WireGuard interface {interface} could be created")]
    NoKernelModule {
        interface: String,
        #[source]
        source: LinkError,
    },
    #[error("interface {interface} disappeared")]
    Vanished { interface: String },
    #[error("peer {0} comes from the config file: change it there and reload")]
    FilePeer(String),
    #[error("peer {0} comes from Core's location config: change it in Core")]
    CorePeer(String),
    #[error(
        "peer {peer} of Core's location config is also a peer of {source_name} ({local}): a peer belongs to Core or to the gateway, not both"
    )]
    LocalConflict {
        peer: String,
        source_name: &'static str,
        local: String,
    },
    #[error(transparent)]
    Location(#[from] LocationError),
    #[error("peer {0} already exists: use `tidectl peer change` to change it")]
    Exists(String),
    #[error("{what} changed from {from} to {to}: restart the daemon to apply it")]
    NeedsRestart {
        what: &'static str,
        from: String,
        to: String,
    },
    #[error("the WireGuard task has stopped")]
    Stopped,
}

enum Command {
    Peers(oneshot::Sender<Result<PeersReply, WireguardError>>),
    Removals(oneshot::Sender<Result<Vec<Removal>, WireguardError>>),
    Add(
        PeerSpec,
        oneshot::Sender<Result<ApplyReport, WireguardError>>,
    ),
    Change(
        PeerSpec,
        oneshot::Sender<Result<ApplyReport, WireguardError>>,
    ),
    Remove(Key, oneshot::Sender<Result<ApplyReport, WireguardError>>),
    Reload(
        Box<WireguardConfig>,
        oneshot::Sender<Result<ApplyReport, WireguardError>>,
    ),
    RemoteActivity(Vec<(Key, SystemTime)>),
    Location(
        LocationUpdate,
        oneshot::Sender<Result<ApplyReport, WireguardError>>,
    ),
    Running(oneshot::Sender<Result<Option<Running>, WireguardError>>),
    Unacked(usize, oneshot::Sender<Result<Vec<Removal>, WireguardError>>),
    Acked(u64, oneshot::Sender<Result<(), WireguardError>>),
}

/// The location config a gateway runs, as Core sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Running {
    pub location_id: u32,
    pub version: u64,
}

/// What failover continuity asks of WireGuard, in order. Sent without
/// waiting (the HA agent never waits on this task), and never dropped.
#[derive(Debug)]
enum SessionCommand {
    Kick(Box<KickRequest>),
    DropSessions,
}

/// A cheap, cloneable way to ask the WireGuard task.
#[derive(Debug, Clone)]
pub struct WireguardHandle {
    tx: mpsc::Sender<Command>,
    sessions: mpsc::UnboundedSender<SessionCommand>,
    /// The records of the last failovers, as the task last published them.
    failovers: watch::Receiver<Vec<FailoverReport>>,
    /// Why the state file is behind the state in force, if it is.
    unsaved: watch::Receiver<Option<String>>,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Peers(_) => "Peers",
            Self::Removals(_) => "Removals",
            Self::Add(..) => "Add",
            Self::Change(..) => "Change",
            Self::Remove(..) => "Remove",
            Self::Reload(..) => "Reload",
            Self::RemoteActivity(..) => "RemoteActivity",
            Self::Location(..) => "Location",
            Self::Running(_) => "Running",
            Self::Unacked(..) => "Unacked",
            Self::Acked(..) => "Acked",
        })
    }
}

impl WireguardHandle {
    async fn ask<T>(
        &self,
        command: impl FnOnce(oneshot::Sender<Result<T, WireguardError>>) -> Command,
    ) -> Result<T, WireguardError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(command(reply))
            .await
            .map_err(|_| WireguardError::Stopped)?;
        rx.await.map_err(|_| WireguardError::Stopped)?
    }

    /// The interface and its peers as of the last stats poll.
    pub async fn peers(&self) -> Result<PeersReply, WireguardError> {
        self.ask(Command::Peers).await
    }

    /// The peers an MFA location removed, oldest first.
    pub async fn removals(&self) -> Result<Vec<Removal>, WireguardError> {
        self.ask(Command::Removals).await
    }

    /// Adds a new peer.
    pub async fn add_peer(&self, peer: PeerSpec) -> Result<ApplyReport, WireguardError> {
        self.ask(|reply| Command::Add(peer, reply)).await
    }

    /// Replaces the settings of a peer added at run time.
    pub async fn change_peer(&self, peer: PeerSpec) -> Result<ApplyReport, WireguardError> {
        self.ask(|reply| Command::Change(peer, reply)).await
    }

    /// Removes a peer added at run time.
    pub async fn remove_peer(&self, key: Key) -> Result<ApplyReport, WireguardError> {
        self.ask(|reply| Command::Remove(key, reply)).await
    }

    /// Applies a re-read config file.
    pub async fn reload(&self, config: WireguardConfig) -> Result<ApplyReport, WireguardError> {
        self.ask(|reply| Command::Reload(Box::new(config), reply))
            .await
    }

    /// This gateway became master: kick handshakes to the recently active
    /// peers and follow their return. A failover still followed is
    /// replaced.
    pub fn kick(&self, request: KickRequest) -> Result<(), WireguardError> {
        self.sessions
            .send(SessionCommand::Kick(Box::new(request)))
            .map_err(|_| WireguardError::Stopped)
    }

    /// This gateway owns no client any more: the device drops every session
    /// it holds (each peer replaced by itself). Queued behind the kicks
    /// sent before it, ahead of a later one.
    pub fn drop_sessions(&self) -> Result<(), WireguardError> {
        self.sessions
            .send(SessionCommand::DropSessions)
            .map_err(|_| WireguardError::Stopped)
    }

    /// Handshakes other gateways of the location saw (for MFA timers).
    /// Never waits: when the task is busy, the next report carries them.
    pub fn remote_activity(&self, handshakes: Vec<(Key, SystemTime)>) {
        if !handshakes.is_empty() {
            let _ = self.tx.try_send(Command::RemoteActivity(handshakes));
        }
    }

    /// The records of the last failovers, oldest first (the one followed
    /// now last), as the task last published them.
    pub fn failovers(&self) -> Vec<FailoverReport> {
        self.failovers.borrow().clone()
    }

    /// The records of the last failovers; `changed()` wakes when the task
    /// publishes them anew.
    pub fn subscribe_failovers(&self) -> watch::Receiver<Vec<FailoverReport>> {
        self.failovers.clone()
    }

    /// Applies Core's location config or peer changes, whole or not at all.
    pub async fn apply_location(
        &self,
        update: LocationUpdate,
    ) -> Result<ApplyReport, WireguardError> {
        self.ask(|reply| Command::Location(update, reply)).await
    }

    /// The location config the gateway runs, if Core has sent one.
    pub async fn running(&self) -> Result<Option<Running>, WireguardError> {
        self.ask(Command::Running).await
    }

    /// At most `limit` of the MFA removals Core has not acknowledged,
    /// oldest first: they are sent with every status until it has.
    pub async fn unacked_removals(&self, limit: usize) -> Result<Vec<Removal>, WireguardError> {
        self.ask(|reply| Command::Unacked(limit, reply)).await
    }

    /// Core has applied the MFA removals up to `seq`: they are not sent
    /// again.
    pub async fn acknowledge_removals(&self, seq: u64) -> Result<(), WireguardError> {
        self.ask(|reply| Command::Acked(seq, reply)).await
    }

    /// Why the state file is behind the state in force (a failing or full
    /// disk), if it is, as the task last published it. Never waits.
    pub fn state_unsaved(&self) -> Option<String> {
        self.unsaved.borrow().clone()
    }

    /// A place in the task's queue, waited for here: what goes into it
    /// later goes in without waiting, so a caller can decide and enqueue
    /// under a lock that is never held across an await (Core's term fence:
    /// the task applies in the order the fence decided).
    pub async fn reserve(&self) -> Result<WireguardSlot<'_>, WireguardError> {
        self.tx
            .reserve()
            .await
            .map(|permit| WireguardSlot { permit })
            .map_err(|_| WireguardError::Stopped)
    }
}

/// A reserved place in the WireGuard task's queue ([`WireguardHandle::reserve`]).
/// Filling it never waits; the returned future waits for the task's answer.
/// Dropped unfilled, the place is given back.
#[derive(Debug)]
pub struct WireguardSlot<'a> {
    permit: mpsc::Permit<'a, Command>,
}

impl WireguardSlot<'_> {
    /// [`WireguardHandle::apply_location`], queued now.
    pub fn apply_location(
        self,
        update: LocationUpdate,
    ) -> impl Future<Output = Result<ApplyReport, WireguardError>> + Send + 'static {
        let (reply, rx) = oneshot::channel();
        self.permit.send(Command::Location(update, reply));
        async move { rx.await.map_err(|_| WireguardError::Stopped)? }
    }

    /// [`WireguardHandle::acknowledge_removals`], queued now.
    pub fn acknowledge_removals(
        self,
        seq: u64,
    ) -> impl Future<Output = Result<(), WireguardError>> + Send + 'static {
        let (reply, rx) = oneshot::channel();
        self.permit.send(Command::Acked(seq, reply));
        async move { rx.await.map_err(|_| WireguardError::Stopped)? }
    }
}

/// The device settings in force: Core's where it has sent a location
/// config, else the file's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    pub private_key: Option<Key>,
    pub listen_port: Option<u16>,
    pub addresses: Vec<IpNet>,
    pub mtu: u32,
    pub mfa_threshold: Option<Duration>,
}

impl Device {
    /// The settings of `config`, overridden by `state`'s location config.
    pub fn of(config: &WireguardConfig, state: &State) -> Self {
        match &state.location {
            Some(location) => {
                let device = &location.device;
                Self {
                    private_key: Some(device.private_key),
                    listen_port: Some(device.listen_port),
                    addresses: device.addresses.clone(),
                    mtu: device.mtu.unwrap_or(config.mtu),
                    mfa_threshold: device.mfa_threshold_secs.map(Duration::from_secs),
                }
            }
            None => Self {
                private_key: config.private_key,
                listen_port: config.listen_port,
                addresses: config.addresses.clone(),
                mtu: config.mtu,
                mfa_threshold: config.mfa_threshold,
            },
        }
    }
}

/// The WireGuard device and everything known about it.
#[derive(Debug)]
pub struct Owner {
    config: WireguardConfig,
    backend: Backend,
    links: Links,
    /// The wireguard-go process, for the userspace backend.
    watch: Option<ProcessWatch>,
    store: StateStore,
    state: State,
    activity: Activity,
    last_poll: Option<(SystemTime, Actual)>,
    /// Endpoints last seen, to give back to peers re-added to a restarted
    /// wireguard-go.
    known_endpoints: HashMap<Key, SocketAddr>,
    last_restart: Option<Instant>,
    restart_delay: Duration,
    /// What the endpoint-sharing task learns of this device.
    local: watch::Sender<LocalPeers>,
    /// The failover being followed.
    run: Option<FailoverRun>,
    /// Kicks per second of the failover being followed.
    kick_rate: u32,
    /// Records of the last failovers.
    reports: VecDeque<FailoverReport>,
    /// Failovers started and finished: the records changed since they
    /// were last published when this did.
    failover_changes: u64,
    /// Handshakes this gateway kicked, by peer, until a newer one: not
    /// counted as activity.
    kicked_handshakes: HashMap<Key, SystemTime>,
    /// When stats were last read and how long that took.
    polled: Option<(Instant, Duration)>,
    /// Whether the state file holds `state`.
    saved: Saved,
    /// Publishes the error while it does not.
    unsaved: watch::Sender<Option<String>>,
    /// Kicks and the clients' return after failovers, counted here.
    metrics: Option<Arc<GatewayMetrics>>,
}

impl Owner {
    /// Creates or adopts the interface and brings it to `config`, touching
    /// only what differs. Must run on a multi-threaded runtime.
    pub async fn start(config: WireguardConfig) -> Result<Self, WireguardError> {
        let store = StateStore::new(&config.state_dir, &config.interface);
        store.ensure_dir()?;
        let state = store.load()?;
        let links = Links::connect()?;
        let backend = open_backend(&config, &links).await?;
        let mut owner = Self {
            config,
            backend,
            links,
            watch: None,
            store,
            state,
            activity: Activity::default(),
            last_poll: None,
            known_endpoints: HashMap::new(),
            last_restart: None,
            restart_delay: Duration::ZERO,
            local: watch::Sender::new(LocalPeers::default()),
            run: None,
            kick_rate: 0,
            reports: VecDeque::new(),
            failover_changes: 0,
            kicked_handshakes: HashMap::new(),
            polled: None,
            saved: Saved::default(),
            unsaved: watch::Sender::new(None),
            metrics: None,
        };
        let mut state = owner.state.clone();
        local_conflicts(&owner.config, &state)?;
        let desired = desired_from(&owner.config, &state)?;
        owner.track(&mut state, &desired, SystemTime::now());
        // A disk that cannot take the state does not keep the device from
        // its config (MFA expiry must go on): unsaved until it can.
        let saved = owner.store.save(&state);
        owner.saved_as(saved);
        owner.state = state;
        owner.track_current(SystemTime::now());
        let report = owner.reconcile(&desired)?;
        owner.configure_link().await?;
        owner.watch_backend()?;
        info!(
            interface = %owner.config.interface,
            backend = %owner.backend.kind(),
            peers = desired.peers.len(),
            ?report,
            "WireGuard interface ready"
        );
        Ok(owner)
    }

    /// Serves `commands`, polls stats and watches wireguard-go until
    /// `cancel` fires; the device is left as it is.
    async fn run(
        mut self,
        mut commands: mpsc::Receiver<Command>,
        mut sessions: mpsc::UnboundedReceiver<SessionCommand>,
        failovers: watch::Sender<Vec<FailoverReport>>,
        cancel: CancellationToken,
    ) {
        let mut poll = tokio::time::interval(self.config.stats_interval);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut next_kick = Instant::now();
        let mut reported = (Instant::now(), self.failover_changes);
        loop {
            let following = self.run.is_some();
            tokio::select! {
                () = cancel.cancelled() => break,
                Some(command) = sessions.recv() => match command {
                    SessionCommand::Kick(request) => self.start_kicks(*request),
                    SessionCommand::DropSessions => self.drop_sessions(),
                },
                () = tokio::time::sleep_until(next_kick.into()), if following => {
                    self.follow();
                    next_kick = Instant::now() + KICK_TICK;
                }
                command = commands.recv() => match command {
                    Some(command) => {
                        let interval = self.config.stats_interval;
                        self.handle(command).await;
                        if self.config.stats_interval != interval {
                            poll = tokio::time::interval(self.config.stats_interval);
                            poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                        }
                    }
                    None => break,
                },
                _ = poll.tick() => {
                    self.poll();
                    if self.saved.retry_due(Instant::now()) {
                        let saved = self.store.save(&self.state);
                        self.saved_as(saved);
                    }
                }
                () = exited(self.watch.as_ref()) => self.restart_backend(&cancel).await,
            }
            // The records change while a failover is followed: published
            // when one starts or ends, and every `REPORT_SPACING` in between.
            let (at, changes) = reported;
            if changes != self.failover_changes
                || (self.run.is_some() && at.elapsed() >= REPORT_SPACING)
            {
                failovers.send_replace(self.failovers());
                reported = (Instant::now(), self.failover_changes);
            }
        }
        info!(
            interface = %self.config.interface,
            "leaving the WireGuard interface and its peers in place"
        );
    }

    async fn handle(&mut self, command: Command) {
        match command {
            Command::Peers(reply) => {
                let _ = reply.send(Ok(self.peers_reply()));
            }
            Command::Removals(reply) => {
                let _ = reply.send(Ok(self.state.removals.iter().cloned().collect()));
            }
            Command::Add(peer, reply) => {
                let _ = reply.send(self.add_peer(peer));
            }
            Command::Change(peer, reply) => {
                let _ = reply.send(self.change_peer(peer));
            }
            Command::Remove(key, reply) => {
                let _ = reply.send(self.remove_peer(key));
            }
            Command::Reload(config, reply) => {
                let _ = reply.send(self.reload(*config).await);
            }
            Command::RemoteActivity(handshakes) => {
                for (key, at) in handshakes {
                    self.activity.observe_remote(&key, at);
                }
            }
            Command::Location(update, reply) => {
                let _ = reply.send(self.apply_location(update).await);
            }
            Command::Running(reply) => {
                let running = self.state.location.as_ref().map(|l| Running {
                    location_id: l.location_id,
                    version: l.version,
                });
                let _ = reply.send(Ok(running));
            }
            Command::Unacked(limit, reply) => {
                let _ = reply.send(Ok(self.state.unacked(limit)));
            }
            Command::Acked(seq, reply) => {
                self.acknowledge(seq);
                let _ = reply.send(Ok(()));
            }
        }
    }

    /// Starts following a failover: the candidates still in the config, in
    /// the order given.
    fn start_kicks(&mut self, request: KickRequest) {
        if let Some(mut old) = self.run.take() {
            old.interrupt();
            self.finish(old);
        }
        let desired = match desired_from(&self.config, &self.state) {
            Ok(desired) => desired,
            Err(error) => {
                error!(error = %error_chain(&error), "no kicks: the config does not check");
                return;
            }
        };
        let mut run = FailoverRun::new(request.meta, request.candidates, |key| {
            desired.peers.contains_key(key)
        });
        if request.rate == 0 {
            run.kick_none();
        }
        info!(
            recently_active = run.pending(),
            rate = request.rate,
            "failover: kicking handshakes, most recently active first"
        );
        self.kick_rate = request.rate;
        self.run = Some(run);
        self.failover_changes += 1;
        // A kick needs the device's view of each peer, and the last
        // periodic read may predate peers added since: read it now.
        self.poll();
        // The first batch at once.
        self.follow();
    }

    /// One step of the failover followed: the next batch of kicks, and
    /// stats read often enough to see the clients come back.
    fn follow(&mut self) {
        let Some(run) = self.run.as_mut() else {
            return;
        };
        let per_tick =
            (u64::from(self.kick_rate) * KICK_TICK.as_millis() as u64).div_ceil(1000) as usize;
        let batch = if self.kick_rate == 0 {
            Vec::new()
        } else {
            run.next_batch(per_tick.max(1))
        };
        if !batch.is_empty() {
            self.kick_batch(&batch);
        }
        let due = self
            .polled
            .is_none_or(|(at, took)| at.elapsed() >= FAST_POLL.max(2 * took));
        if due {
            self.poll();
        }
    }

    /// Kicks one batch: the endpoint and the keepalive toggle (or the
    /// peer again) in one request, keepalives back off in a second.
    fn kick_batch(&mut self, batch: &[kick::Candidate]) {
        let now = SystemTime::now();
        let desired = match desired_from(&self.config, &self.state) {
            Ok(desired) => desired,
            Err(_) => return,
        };
        let empty = Actual::default();
        let actual = self.last_poll.as_ref().map_or(&empty, |(_, actual)| actual);
        let kicks = kick::resolve(batch, &desired.peers, actual, now);
        let (kick_plan, restore) = kick::plans(&kicks);
        let keys: Vec<Key> = kicks.iter().map(|(spec, _, _)| spec.public_key).collect();
        debug!(
            kicks = ?kicks.iter().map(|(spec, endpoint, method)| (spec.public_key, *endpoint, *method)).collect::<Vec<_>>(),
            "kicking a batch"
        );
        for (spec, endpoint, _) in &kicks {
            self.known_endpoints.insert(spec.public_key, *endpoint);
        }
        let backend = &self.backend;
        let result = tokio::task::block_in_place(|| {
            backend.apply(&kick_plan)?;
            if !restore.is_empty() {
                backend.apply(&restore)?;
            }
            Ok::<_, BackendError>(())
        });
        let Some(run) = self.run.as_mut() else {
            return;
        };
        run.not_kicked(batch.len() - kicks.len());
        match result {
            Ok(()) => {
                if let Some(metrics) = &self.metrics {
                    metrics.kicks.inc_by(keys.len() as u64);
                }
                run.kicked(keys, now)
            }
            Err(error) => {
                warn!(error = %error_chain(&error), peers = keys.len(), "kicking handshakes failed");
                run.not_kicked(keys.len());
            }
        }
    }

    /// Drops every session the device holds, when it holds any: each peer
    /// is put back in its own place in one request (sessions and handshake
    /// retries go with the peer WireGuard replaces), with its settings and
    /// last known endpoint. A failover still followed ends here. Traffic
    /// counters start again, which activity tracking takes as no activity.
    /// The records of the last failovers, oldest first, the one followed
    /// now last.
    fn failovers(&self) -> Vec<FailoverReport> {
        let mut reports: Vec<FailoverReport> = self.reports.iter().cloned().collect();
        reports.extend(self.run.as_ref().map(|run| run.report(false)));
        reports
    }

    fn drop_sessions(&mut self) {
        if let Some(run) = self.run.take() {
            self.finish(run);
        }
        let now = SystemTime::now();
        let backend = &self.backend;
        let actual = match tokio::task::block_in_place(|| backend.get()) {
            Ok(actual) => actual,
            Err(error) => {
                warn!(error = %error_chain(&error), "reading the device to drop its sessions failed");
                return;
            }
        };
        let holding = actual
            .peers
            .values()
            .filter(|peer| kick::method(peer, now) == kick::Method::Readd)
            .count();
        if holding == 0 {
            return;
        }
        let desired = match desired_from(&self.config, &self.state) {
            Ok(desired) => desired,
            Err(error) => {
                warn!(error = %error_chain(&error), "no config to drop the sessions with");
                return;
            }
        };
        let plan = reconcile::replace_all(&desired, &actual, &self.known_endpoints);
        match tokio::task::block_in_place(|| backend.apply(&plan)) {
            Ok(_) => {
                self.kicked_handshakes.clear();
                info!(
                    sessions = holding,
                    peers = plan.peers.len(),
                    "owning no client: the WireGuard sessions of the last term dropped"
                );
            }
            Err(error) => {
                warn!(error = %error_chain(&error), "dropping the WireGuard sessions failed");
            }
        }
    }

    /// Files the record of a failover and logs it.
    fn finish(&mut self, run: FailoverRun) {
        self.failover_changes += 1;
        let report = run.report(true);
        info!(
            cause = %report.meta.cause,
            planned = report.meta.planned,
            detection_ms = report.meta.detection_ms,
            vip_move_ms = report.meta.vip_move_ms,
            recently_active = report.recently_active,
            kicked = report.kicked,
            completed = report.completed,
            fresh = report.fresh,
            fresh_95_ms = report.fresh_95_ms,
            interrupted = report.interrupted,
            "failover: clients back"
        );
        if let (Some(metrics), Some(ms)) = (&self.metrics, report.fresh_95_ms) {
            GatewayMetrics::observe(&metrics.failover_clients_back, Duration::from_millis(ms));
        }
        kick::keep(&mut self.reports, report);
    }

    /// Applies Core's update: the location config after it, less the MFA
    /// removals Core has not caught up with, checked against the local
    /// peers, saved and reconciled; on any error nothing changes.
    async fn apply_location(
        &mut self,
        update: LocationUpdate,
    ) -> Result<ApplyReport, WireguardError> {
        let mut next = location::updated(self.state.location.as_ref(), &update)?;
        let mut state = self.state.clone();
        let kept_out =
            location::keep_out_expired(&mut state.expired_location_peers, &update, &mut next);
        if let Some(old) = &self.state.location
            && old.location_id != next.location_id
        {
            info!(
                from = old.location_id,
                to = next.location_id,
                name = %next.name,
                "Core moves this gateway to another location"
            );
        }
        let version = next.version;
        state.location = Some(next);
        local_conflicts(&self.config, &state)?;
        let desired = desired_from(&self.config, &state)?;
        let report = self.commit(state, &desired, Origin::Core)?;
        self.configure_link().await?;
        info!(
            version,
            ?report,
            kept_out = kept_out.len(),
            "Core's location config applied"
        );
        Ok(report)
    }

    /// Core has applied the removals up to `seq`: they are not sent again,
    /// once the state file says so (until then, a restart sends them again,
    /// which Core takes as it took them).
    fn acknowledge(&mut self, seq: u64) {
        if self.state.acknowledge(seq) {
            debug!(seq, "Core acknowledged the MFA removals");
            let saved = self.store.save(&self.state);
            self.saved_as(saved);
        }
    }

    /// Follows the outcome of a write of the state in force: logs and
    /// publishes a failure, and the file catching up.
    fn saved_as(&mut self, result: Result<(), StateError>) {
        match result {
            Ok(()) => {
                if self.saved.succeeded() {
                    info!(
                        path = %self.store.path().display(),
                        "state file written again: it holds the state in force"
                    );
                    self.unsaved.send_replace(None);
                }
            }
            Err(error) => {
                let error = error_chain(&error);
                if self.saved.error() != Some(error.as_str()) {
                    error!(
                        path = %self.store.path().display(),
                        %error,
                        "the state file cannot be written: removals are applied all the same (failing closed), peers added with tidectl are refused, and the file is written again on the next change and every {:?}",
                        durability::RETRY_AFTER
                    );
                }
                self.saved.failed(error.clone(), Instant::now());
                self.unsaved.send_replace(Some(error));
            }
        }
    }

    /// The device settings in force.
    fn device(&self) -> Device {
        Device::of(&self.config, &self.state)
    }

    fn location_peer(&self, key: &Key) -> Option<&PeerSpec> {
        self.state.location.as_ref()?.peers.get(key)
    }

    fn add_peer(&mut self, peer: PeerSpec) -> Result<ApplyReport, WireguardError> {
        let key = peer.public_key;
        if self.location_peer(&key).is_some() {
            return Err(WireguardError::CorePeer(peer.label().to_string()));
        }
        if self.state.dynamic_peers.contains_key(&key) || self.file_peer(&key).is_some() {
            return Err(WireguardError::Exists(peer.label().to_string()));
        }
        self.check_against_others(&peer)?;
        let label = peer.label();
        let report = self.change(Origin::Operator, |state| {
            state.expired.remove(&key);
            state.added_at.remove(&key);
            state.dynamic_peers.insert(key, peer);
        })?;
        info!(peer = %label, ?report, "peer added");
        Ok(report)
    }

    fn change_peer(&mut self, peer: PeerSpec) -> Result<ApplyReport, WireguardError> {
        let key = peer.public_key;
        self.require_dynamic(&key)?;
        self.check_against_others(&peer)?;
        let label = peer.label();
        let report = self.change(Origin::Operator, |state| {
            state.dynamic_peers.insert(key, peer);
        })?;
        info!(peer = %label, ?report, "peer changed");
        Ok(report)
    }

    fn remove_peer(&mut self, key: Key) -> Result<ApplyReport, WireguardError> {
        let label = self.require_dynamic(&key)?;
        let report = self.change(Origin::Operator, |state| {
            state.dynamic_peers.remove(&key);
        })?;
        info!(peer = %label, ?report, "peer removed");
        Ok(report)
    }

    /// Checks `peer` against every other desired peer, so that an error
    /// names it first.
    fn check_against_others(&self, peer: &PeerSpec) -> Result<(), PeerError> {
        let others = desired_from(&self.config, &self.state)?;
        let others = others
            .peers
            .values()
            .filter(|p| p.public_key != peer.public_key);
        check_peers(others.chain(std::iter::once(peer)))?;
        Ok(())
    }

    /// The label of dynamic peer `key`, or why it cannot be changed.
    fn require_dynamic(&self, key: &Key) -> Result<String, WireguardError> {
        if let Some(peer) = self.state.dynamic_peers.get(key) {
            return Ok(peer.label().to_string());
        }
        if let Some(peer) = self.location_peer(key) {
            return Err(WireguardError::CorePeer(peer.label().to_string()));
        }
        match self.file_peer(key) {
            Some(peer) => Err(WireguardError::FilePeer(peer.label().to_string())),
            None => Err(PeerError::Unknown(*key).into()),
        }
    }

    fn file_peer(&self, key: &Key) -> Option<&PeerSpec> {
        self.config.peers.iter().find(|p| p.public_key == *key)
    }

    async fn reload(&mut self, config: WireguardConfig) -> Result<ApplyReport, WireguardError> {
        let restart = |what, from: &dyn std::fmt::Debug, to: &dyn std::fmt::Debug| {
            Err(WireguardError::NeedsRestart {
                what,
                from: format!("{from:?}"),
                to: format!("{to:?}"),
            })
        };
        if config.interface != self.config.interface {
            return restart("interface", &self.config.interface, &config.interface);
        }
        if config.backend != self.config.backend {
            return restart("backend", &self.config.backend, &config.backend);
        }
        if config.state_dir != self.config.state_dir {
            return restart("state_dir", &self.config.state_dir, &config.state_dir);
        }
        // Reloading the file brings back file peers an MFA location removed.
        let rearmed: Vec<Key> = config
            .peers
            .iter()
            .map(|p| p.public_key)
            .filter(|key| self.state.expired.contains(key))
            .collect();
        let mut state = self.state.clone();
        for key in &rearmed {
            state.expired.remove(key);
            state.added_at.remove(key);
        }
        local_conflicts(&config, &state)?;
        let desired = desired_from(&config, &state)?;
        let old = std::mem::replace(&mut self.config, config);
        let result = self.commit(state, &desired, Origin::File);
        let report = match result {
            Ok(report) => report,
            Err(error) => {
                self.config = old;
                return Err(error);
            }
        };
        self.configure_link().await?;
        info!(?report, rearmed = rearmed.len(), "config reloaded");
        Ok(report)
    }

    /// Applies a change to the remembered state: validate, save, reconcile;
    /// on failure the old state is put back, on disk too.
    fn change(
        &mut self,
        origin: Origin,
        edit: impl FnOnce(&mut State),
    ) -> Result<ApplyReport, WireguardError> {
        let mut state = self.state.clone();
        edit(&mut state);
        let desired = desired_from(&self.config, &state)?;
        self.commit(state, &desired, origin)
    }

    /// Saves `state` and brings the device to `desired`. Saved first, so
    /// that a crash in between comes back to the new state. When the file
    /// cannot be written the change is still applied unless it grants
    /// access that only the file would remember ([`durability`]); the state
    /// is then unsaved until a later write succeeds.
    ///
    /// [`durability`]: super::durability
    fn commit(
        &mut self,
        mut state: State,
        desired: &Desired,
        origin: Origin,
    ) -> Result<ApplyReport, WireguardError> {
        // Checked first: a device that takes part of the peers and then
        // refuses the rest would be left half-applied.
        let backend = self.backend.kind();
        if desired.peers.len() > backend.max_peers() {
            return Err(WireguardError::TooManyPeers {
                count: desired.peers.len(),
                max: backend.max_peers(),
                backend,
            });
        }
        self.track(&mut state, desired, SystemTime::now());
        let saved = match self.store.save(&state) {
            Ok(()) => true,
            Err(source) => {
                let grants = desired_from(&self.config, &self.state)
                    .map_or(true, |old| durability::grants(&old, desired));
                if durability::when_unsaved(origin, grants) == Verdict::Refuse {
                    // Nothing changes: the file is as far behind as it was.
                    return Err(WireguardError::Unsaved { source });
                }
                self.saved_as(Err(source));
                false
            }
        };
        match self.reconcile(desired) {
            Ok(report) => {
                self.state = state;
                self.track_current(SystemTime::now());
                if saved {
                    self.saved_as(Ok(()));
                }
                Ok(report)
            }
            Err(error) => {
                if saved {
                    let restored = self.store.save(&self.state);
                    if let Err(save) = &restored {
                        error!(error = %error_chain(save), "restoring the state file failed");
                    }
                    self.saved_as(restored);
                }
                Err(error)
            }
        }
    }

    /// Records when each desired peer was added and forgets peers that left.
    fn track(&self, state: &mut State, desired: &Desired, now: SystemTime) {
        for key in desired.peers.keys() {
            state.added_at.entry(*key).or_insert_with(|| unix(now));
        }
        state
            .added_at
            .retain(|key, _| desired.peers.contains_key(key));
    }

    /// Tracks the activity of exactly the peers in the current state.
    fn track_current(&mut self, now: SystemTime) {
        let added_at = &self.state.added_at;
        self.activity.retain(|key| added_at.contains_key(key));
        self.known_endpoints
            .retain(|key, _| added_at.contains_key(key));
        for (key, added) in added_at {
            self.activity.track(*key, from_unix(*added).min(now));
        }
        let added_at = &self.state.added_at;
        self.kicked_handshakes
            .retain(|key, _| added_at.contains_key(key));
        let configured: Vec<Key> = added_at.keys().copied().collect();
        self.local
            .send_modify(|local| local.configured = configured);
    }

    /// Tells the endpoint-sharing task what the device has: the peers with
    /// an endpoint and a completed handshake.
    fn publish(&self, actual: &Actual) {
        let active: Vec<PeerEndpoint> = actual
            .peers
            .iter()
            .filter_map(|(key, peer)| {
                let (endpoint, handshake) = (peer.endpoint?, peer.last_handshake?);
                Some(PeerEndpoint {
                    key: *key,
                    endpoint,
                    last_handshake: handshake,
                    kicked: self.kicked_handshakes.get(key) == Some(&handshake),
                })
            })
            .collect();
        self.local.send_modify(|local| {
            local.active = active;
            local.listen_port = actual.listen_port;
        });
    }

    /// The listen port in force (from the file, or Core's location config).
    pub fn listen_port(&self) -> Option<u16> {
        self.device().listen_port
    }

    /// Counts kicks and the clients' return after failovers in `metrics`.
    pub fn set_metrics(&mut self, metrics: Arc<GatewayMetrics>) {
        self.metrics = Some(metrics);
    }

    /// What the endpoint-sharing task reads of this device.
    pub fn local_peers(&self) -> watch::Receiver<LocalPeers> {
        self.local.subscribe()
    }

    /// Reads the device and applies what differs from `desired`.
    fn reconcile(&mut self, desired: &Desired) -> Result<ApplyReport, WireguardError> {
        let backend = &self.backend;
        let actual = tokio::task::block_in_place(|| backend.get())?;
        let plan = reconcile::plan(desired, &actual, &self.known_endpoints);
        let summary = plan.summary();
        if plan.is_empty() {
            return Ok(ApplyReport::default());
        }
        let cost = tokio::task::block_in_place(|| backend.apply(&plan)).inspect_err(|error| {
            // wireguard-go closes its socket before it tries the new port:
            // when that fails the device is left with no port at all (and
            // reading it then fails). Put the old port back.
            if let BackendError::PortInUse { .. } = error
                && actual.listen_port != 0
            {
                let restore = reconcile::Plan {
                    listen_port: Some(actual.listen_port),
                    ..reconcile::Plan::default()
                };
                if let Err(restore_error) = tokio::task::block_in_place(|| backend.apply(&restore))
                {
                    error!(
                        port = actual.listen_port,
                        error = %error_chain(&restore_error),
                        "putting the listen port back failed"
                    );
                }
            }
        })?;
        Ok(ApplyReport {
            added: summary.added,
            updated: summary.updated,
            removed: summary.removed,
            device: summary.device,
            requests: cost.requests,
        })
    }

    async fn configure_link(&self) -> Result<(), WireguardError> {
        let name = &self.config.interface;
        let device = self.device();
        let link = self
            .links
            .find(name)
            .await?
            .ok_or_else(|| WireguardError::Vanished {
                interface: name.clone(),
            })?;
        let changes = self
            .links
            .configure(name, &link, &device.addresses, device.mtu)
            .await?;
        if !changes.is_empty() {
            info!(interface = %name, ?changes, "interface configured");
        }
        Ok(())
    }

    fn watch_backend(&mut self) -> Result<(), WireguardError> {
        self.watch = match &self.backend {
            Backend::Userspace(userspace) => Some(ProcessWatch::new(userspace.server_pid()?)?),
            Backend::Kernel(_) => None,
        };
        Ok(())
    }

    /// Reads peer stats; follows a failover; tells the endpoint-sharing
    /// task; on MFA locations, removes inactive peers.
    fn poll(&mut self) {
        let now = SystemTime::now();
        let started = Instant::now();
        let backend = &self.backend;
        let result = tokio::task::block_in_place(|| backend.get());
        self.polled = Some((Instant::now(), started.elapsed()));
        let actual = match result {
            Ok(actual) => actual,
            Err(error) => {
                warn!(error = %error_chain(&error), "reading peer stats failed");
                return;
            }
        };
        if let Some(run) = self.run.as_mut() {
            run.observe(&actual);
        }
        for (key, peer) in &actual.peers {
            let kicked = peer.last_handshake.is_some_and(|handshake| {
                self.kicked_handshakes.get(key) == Some(&handshake)
                    || self
                        .run
                        .as_ref()
                        .is_some_and(|run| run.kicked_handshake(key, handshake))
            });
            match (kicked, peer.last_handshake) {
                (true, Some(handshake)) => {
                    if self.kicked_handshakes.insert(*key, handshake) != Some(handshake) {
                        self.activity.rebaseline(key, peer);
                    } else {
                        self.activity.observe_traffic(key, peer, now);
                    }
                }
                _ => {
                    self.kicked_handshakes.remove(key);
                    self.activity.observe(key, peer, now);
                }
            }
            if let Some(endpoint) = peer.endpoint {
                self.known_endpoints.insert(*key, endpoint);
            }
        }
        self.publish(&actual);
        self.last_poll = Some((now, actual));
        if self.run.as_ref().is_some_and(|run| run.done(now))
            && let Some(run) = self.run.take()
        {
            self.finish(run);
        }
        if let Some(threshold) = self.device().mfa_threshold {
            self.expire(threshold, now);
        }
    }

    /// Removes the peers inactive for longer than `threshold`, and keeps a
    /// record of each for Core.
    fn expire(&mut self, threshold: Duration, now: SystemTime) {
        let due: Vec<(PeerSpec, ExpiryReason)> = self
            .activity
            .expired(threshold, now)
            .into_iter()
            .filter_map(|(key, reason)| Some((self.peer_spec(&key)?.clone(), reason)))
            .collect();
        if due.is_empty() {
            return;
        }
        let result = self.change(Origin::Expiry, |state| {
            for (peer, reason) in &due {
                if let Some(lost) = state.record(Removal::new(peer, *reason, now)) {
                    warn!(
                        seq = lost.seq,
                        peer = %lost.public_key,
                        kept = super::state::MAX_REMOVALS,
                        "MFA: a removal record Core has not acknowledged was dropped to keep the record bounded; Core will not end that session from it"
                    );
                }
                let key = peer.public_key;
                let from_core = state
                    .location
                    .as_mut()
                    .and_then(|location| location.peers.remove(&key));
                if let Some(core_peer) = from_core {
                    state
                        .expired_location_peers
                        .insert(key, core_peer.preshared_key);
                } else if state.dynamic_peers.remove(&key).is_none() {
                    state.expired.insert(key);
                }
            }
        });
        match result {
            Ok(_) => {
                for (peer, reason) in &due {
                    info!(
                        peer = %peer.label(),
                        ?reason,
                        threshold_secs = threshold.as_secs(),
                        "MFA: removed an inactive peer"
                    );
                }
            }
            Err(error) => {
                error!(error = %error_chain(&error), "MFA: removing inactive peers failed")
            }
        }
    }

    /// The desired settings of `key`, wherever they come from.
    fn peer_spec(&self, key: &Key) -> Option<&PeerSpec> {
        self.state
            .dynamic_peers
            .get(key)
            .or_else(|| self.location_peer(key))
            .or_else(|| {
                self.file_peer(key)
                    .filter(|_| !self.state.expired.contains(key))
            })
    }

    fn peers_reply(&mut self) -> PeersReply {
        if self.last_poll.is_none() {
            self.poll();
        }
        let (polled_at, actual) = self
            .last_poll
            .as_ref()
            .map(|(at, actual)| (unix(*at), actual.clone()))
            .unwrap_or_default();
        let peers = actual
            .peers
            .iter()
            .map(|(key, peer)| {
                let (name, source) = if let Some(p) = self.state.dynamic_peers.get(key) {
                    (p.name.clone(), PeerSource::Dynamic)
                } else if let Some(p) = self.location_peer(key) {
                    (p.name.clone(), PeerSource::Core)
                } else if let Some(p) = self.file_peer(key) {
                    (p.name.clone(), PeerSource::File)
                } else {
                    (None, PeerSource::Unknown)
                };
                PeerStatus {
                    public_key: *key,
                    name,
                    source,
                    endpoint: peer.endpoint.map(|e| e.to_string()),
                    allowed_ips: peer.allowed_ips.iter().copied().collect(),
                    last_handshake: peer.last_handshake.map(unix),
                    last_active: self.activity.last_active(key).map(unix),
                    rx_bytes: peer.rx_bytes,
                    tx_bytes: peer.tx_bytes,
                    persistent_keepalive: peer.persistent_keepalive,
                    preshared_key: peer.preshared_key.is_some(),
                }
            })
            .collect();
        PeersReply {
            interface: self.config.interface.clone(),
            backend: self.backend.kind(),
            backend_pid: self.watch.as_ref().map(ProcessWatch::pid),
            listen_port: actual.listen_port,
            polled_at,
            mfa_threshold_secs: self.device().mfa_threshold.map(|t| t.as_secs()),
            state_unsaved: self.saved.error().map(str::to_owned),
            peers,
        }
    }

    /// wireguard-go died: start it again and re-apply everything, with the
    /// endpoints last seen, retrying with backoff until it works.
    async fn restart_backend(&mut self, cancel: &CancellationToken) {
        let pid = self.watch.take().map(|w| w.pid());
        warn!(
            interface = %self.config.interface,
            pid,
            "wireguard-go exited; restarting it and re-applying the config"
        );
        self.restart_delay = match self.last_restart {
            Some(at) if at.elapsed() < QUICK_RESTART => (self.restart_delay * 2)
                .max(Duration::from_millis(250))
                .min(MAX_RESTART_DELAY),
            _ => Duration::ZERO,
        };
        loop {
            if !self.restart_delay.is_zero() {
                warn!(delay = ?self.restart_delay, "waiting before restarting wireguard-go");
                tokio::select! {
                    () = cancel.cancelled() => return,
                    () = tokio::time::sleep(self.restart_delay) => {}
                }
            }
            self.last_restart = Some(Instant::now());
            match self.revive().await {
                Ok(report) => {
                    info!(
                        interface = %self.config.interface,
                        pid = self.watch.as_ref().map(ProcessWatch::pid),
                        ?report,
                        "wireguard-go restarted and the config re-applied"
                    );
                    return;
                }
                Err(error) => {
                    error!(error = %error_chain(&error), "restarting wireguard-go failed");
                    self.restart_delay = (self.restart_delay * 2)
                        .max(Duration::from_millis(250))
                        .min(MAX_RESTART_DELAY);
                }
            }
        }
    }

    async fn revive(&mut self) -> Result<ApplyReport, WireguardError> {
        if let Backend::Userspace(userspace) = &self.backend
            && !userspace.is_running()
        {
            let log = wireguard_go_log(&self.config);
            tokio::task::block_in_place(|| userspace.launch(&log))?;
        }
        let desired = desired_from(&self.config, &self.state)?;
        let report = self.reconcile(&desired)?;
        self.configure_link().await?;
        self.watch_backend()?;
        Ok(report)
    }
}

/// Starts the task: returns the handle and the task's future.
pub fn spawn(
    owner: Owner,
    cancel: CancellationToken,
) -> (WireguardHandle, impl Future<Output = ()>) {
    let (tx, rx) = mpsc::channel(64);
    let (sessions, sessions_rx) = mpsc::unbounded_channel();
    let (failovers_tx, failovers) = watch::channel(owner.failovers());
    let handle = WireguardHandle {
        tx,
        sessions,
        failovers,
        unsaved: owner.unsaved.subscribe(),
    };
    (handle, owner.run(rx, sessions_rx, failovers_tx, cancel))
}

/// Resolves when the watched process exits; never without one.
async fn exited(watch: Option<&ProcessWatch>) {
    match watch {
        Some(watch) => watch.exited().await,
        None => std::future::pending().await,
    }
}

/// The file peers (less those an MFA location removed), the dynamic peers
/// and Core's, checked together; Core's come last, so that an overlap
/// names Core's peer first.
fn desired_from(config: &WireguardConfig, state: &State) -> Result<Desired, PeerError> {
    let file = config
        .peers
        .iter()
        .filter(|p| !state.expired.contains(&p.public_key));
    let core = state.location.iter().flat_map(|l| l.peers.values());
    let all = file.chain(state.dynamic_peers.values()).chain(core);
    let peers: BTreeMap<Key, PeerSpec> = check_peers(all)?
        .into_iter()
        .map(|(key, peer)| (key, peer.clone()))
        .collect();
    let device = Device::of(config, state);
    Ok(Desired {
        private_key: device.private_key,
        listen_port: device.listen_port,
        peers,
    })
}

/// Refuses a Core peer whose key is also a file or dynamic peer's.
fn local_conflicts(config: &WireguardConfig, state: &State) -> Result<(), WireguardError> {
    let Some(location) = &state.location else {
        return Ok(());
    };
    for peer in location.peers.values() {
        let key = &peer.public_key;
        let local = match (
            config.peers.iter().find(|p| p.public_key == *key),
            state.dynamic_peers.get(key),
        ) {
            (Some(file), _) => Some(("the config file", file)),
            (None, Some(dynamic)) => Some(("`tidectl peer add`", dynamic)),
            (None, None) => None,
        };
        if let Some((source_name, local)) = local {
            return Err(WireguardError::LocalConflict {
                peer: peer.label().to_string(),
                source_name,
                local: local.label().to_string(),
            });
        }
    }
    Ok(())
}

fn wireguard_go_log(config: &WireguardConfig) -> PathBuf {
    config
        .state_dir
        .join(format!("wireguard-go-{}.log", config.interface))
}

/// Finds or creates the interface and picks the backend that drives it.
async fn open_backend(config: &WireguardConfig, links: &Links) -> Result<Backend, WireguardError> {
    let name = &config.interface;
    let mismatch = |found| WireguardError::BackendMismatch {
        interface: name.clone(),
        found,
        setting: config.backend,
    };
    match links.find(name).await? {
        Some(link) if link.kind.as_deref() == Some("wireguard") => {
            if config.backend == BackendSetting::Userspace {
                return Err(mismatch(BackendKind::Kernel));
            }
            info!(interface = %name, "adopting the existing kernel WireGuard interface");
            Ok(Backend::Kernel(Kernel::new(name)))
        }
        Some(link) => {
            let userspace = Userspace::new(name);
            if !userspace.is_running() {
                return Err(WireguardError::NotWireguard {
                    interface: name.clone(),
                    kind: link.kind.unwrap_or_else(|| "unknown".into()),
                });
            }
            if config.backend == BackendSetting::Kernel {
                return Err(mismatch(BackendKind::Userspace));
            }
            info!(
                interface = %name,
                pid = userspace.server_pid().ok(),
                "adopting the running wireguard-go and its peers"
            );
            Ok(Backend::Userspace(userspace))
        }
        None => {
            if config.backend != BackendSetting::Userspace {
                match links.add_wireguard(name).await {
                    Ok(()) => {
                        info!(interface = %name, "created a kernel WireGuard interface");
                        return Ok(Backend::Kernel(Kernel::new(name)));
                    }
                    Err(source) if config.backend == BackendSetting::Kernel => {
                        return Err(WireguardError::NoKernelModule {
                            interface: name.clone(),
                            source,
                        });
                    }
                    Err(error) => info!(
                        reason = %error_chain(&error),
                        "no kernel WireGuard here; using wireguard-go"
                    ),
                }
            }
            let userspace = Userspace::new(name);
            let log = wireguard_go_log(config);
            tokio::task::block_in_place(|| userspace.launch(&log))?;
            info!(
                interface = %name,
                pid = userspace.server_pid().ok(),
                log = %log.display(),
                "started wireguard-go"
            );
            Ok(Backend::Userspace(userspace))
        }
    }
}
