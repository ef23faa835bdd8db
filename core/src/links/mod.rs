//! Core's links: it dials every enabled gateway and every Edge (gRPC over
//! mutual TLS; they are the servers) and keeps each link up, reconnecting
//! with backoff.
//!
//! The supervisor owns the set of link tasks and publishes a [`Directory`]
//! of them; each link task owns its own state (a watch channel others
//! read) and is the only one talking to its peer.

pub mod backoff;
pub mod budget;
pub mod coalesce;
mod edge;
mod gateway;
pub mod requests;
pub mod status;

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use tidegate_proto::{
    expiry::{EXPIRY_WARNING, Expiry, classify, now_unix},
    tls::Pki,
};
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tonic::transport::{Channel, Endpoint};
use tracing::{error, info, warn};

pub use self::status::{EdgeState, GatewayState};
use crate::{
    config::LinkSettings,
    leader::Leadership,
    metrics::CoreMetrics,
    state::{StateGone, StateHandle},
    store::{EdgeTarget, GatewayTarget, Notice, StoreError},
};

/// HTTP/2 pings on an idle link, and how long a ping may go unanswered
/// before the link counts as lost.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// A link that stayed up this long starts its next backoff from the
/// minimum.
const STABLE_LINK: Duration = Duration::from_secs(10);

/// Why a link went down.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("{address} is not a usable address")]
    Endpoint {
        address: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("connecting to {address}")]
    Connect {
        address: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("the link failed ({code:?}): {detail}")]
    Rpc { code: tonic::Code, detail: String },
    #[error("the peer closed the link")]
    Closed,
    #[error("protocol: {0}")]
    Protocol(String),
    #[error("{0}")]
    Timeout(String),
    #[error("the location is gone")]
    LocationGone,
    #[error(transparent)]
    State(#[from] StateGone),
    #[error("store")]
    Store(#[from] StoreError),
}

impl From<tonic::Status> for LinkError {
    /// The status's code, message and the errors under it, on one line.
    fn from(status: tonic::Status) -> Self {
        let mut detail = status.message().to_owned();
        if let Some(source) = std::error::Error::source(&status) {
            let chain = crate::error_chain(source);
            if chain.contains(&detail) {
                detail = chain;
            } else if !detail.contains(&chain) {
                detail = if detail.is_empty() {
                    chain
                } else {
                    format!("{detail}: {chain}")
                };
            }
        }
        Self::Rpc {
            code: status.code(),
            detail,
        }
    }
}

/// A command for a gateway link.
#[derive(Debug)]
pub enum GatewayCommand {
    /// Ask the gateway for a planned handover; the answer is the gateway's
    /// error, if any.
    Failover {
        reply: oneshot::Sender<Result<(), String>>,
    },
}

/// A running gateway link, as others see it.
#[derive(Debug, Clone)]
pub struct GatewayHandle {
    pub target: GatewayTarget,
    pub state: watch::Receiver<GatewayState>,
    pub commands: mpsc::Sender<GatewayCommand>,
}

/// A running Edge link, as others see it.
#[derive(Debug, Clone)]
pub struct EdgeHandle {
    pub target: EdgeTarget,
    pub state: watch::Receiver<EdgeState>,
}

/// The links running now, by name.
#[derive(Debug, Default)]
pub struct Directory {
    pub gateways: BTreeMap<String, GatewayHandle>,
    pub edges: BTreeMap<String, EdgeHandle>,
}

impl Directory {
    /// The gateway links of a location.
    pub fn location(&self, location_id: u32) -> impl Iterator<Item = &GatewayHandle> {
        self.gateways
            .values()
            .filter(move |g| g.target.location_id == location_id)
    }

    /// Links up and links dialled: (gateways up, gateways, Edges up, Edges).
    pub fn counts(&self) -> (u32, u32, u32, u32) {
        let up_gateways = self
            .gateways
            .values()
            .filter(|g| g.state.borrow().connected)
            .count();
        let up_edges = self
            .edges
            .values()
            .filter(|e| e.state.borrow().connected)
            .count();
        let n = |count: usize| u32::try_from(count).unwrap_or(u32::MAX);
        (
            n(up_gateways),
            n(self.gateways.len()),
            n(up_edges),
            n(self.edges.len()),
        )
    }

    /// Whether any gateway of the location has its link up.
    pub fn any_connected(&self, location_id: u32) -> bool {
        self.location(location_id)
            .any(|g| g.state.borrow().connected)
    }
}

/// What a reload (SIGHUP) may change under running links: the TLS files
/// (a new CA or certificate) and the link timings. Each dial reads it
/// afresh; a link that is up keeps the session it has.
#[derive(Debug, Clone)]
pub struct Live {
    pub pki: Pki,
    pub settings: LinkSettings,
}

/// What every link task shares.
#[derive(Debug, Clone)]
pub(crate) struct LinkContext {
    pub state: StateHandle,
    pub live: watch::Receiver<Live>,
    pub core_id: String,
    /// This Core's leadership: every message carries its term, and only
    /// the leader sends what changes.
    pub leadership: watch::Receiver<Leadership>,
    pub directory: watch::Receiver<Arc<Directory>>,
    pub tracker: TaskTracker,
    pub metrics: Arc<CoreMetrics>,
}

/// This Core's leadership once the lease has given it a term, and its
/// receiver; `None` when cancelled first (or Core stops). A Core that has
/// not heard its lease yet has no term to speak at: a peer takes term 0
/// for a Core from before terms, which leads.
pub(crate) async fn with_a_term(
    ctx: &LinkContext,
    cancel: &CancellationToken,
) -> Option<(watch::Receiver<Leadership>, Leadership)> {
    let mut leadership = ctx.leadership.clone();
    tokio::select! {
        () = cancel.cancelled() => return None,
        known = leadership.wait_for(|l| l.term > 0) => known.ok()?,
    };
    let lead = leadership.borrow_and_update().clone();
    Some((leadership, lead))
}

/// What a standby answers a request only the leader may carry out.
pub(crate) fn standby_refusal(ctx: &LinkContext, lead: &Leadership) -> String {
    match &lead.leader {
        Some(leader) => format!(
            "this Core ({}) is a standby: {leader} leads at term {}",
            ctx.core_id, lead.term
        ),
        None => format!(
            "this Core ({}) is a standby and no Core leads now{}",
            ctx.core_id,
            if lead.problem.is_empty() {
                String::new()
            } else {
                format!(" ({})", lead.problem)
            }
        ),
    }
}

impl LinkContext {
    /// The link timings in force now.
    pub fn settings(&self) -> LinkSettings {
        self.live.borrow().settings
    }

    /// The TLS files in force now.
    pub fn pki(&self) -> Pki {
        self.live.borrow().pki.clone()
    }
}

/// Dials `address` (host:port) over mutual TLS, requiring `identity` in
/// the server's certificate.
pub(crate) async fn connect(
    address: &str,
    identity: &str,
    ctx: &LinkContext,
) -> Result<Channel, LinkError> {
    let endpoint_err = |source| LinkError::Endpoint {
        address: address.to_owned(),
        source,
    };
    let endpoint = Endpoint::from_shared(format!("https://{address}"))
        .map_err(endpoint_err)?
        .tls_config(ctx.pki().client(identity))
        .map_err(endpoint_err)?
        .connect_timeout(ctx.settings().connect_timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true);
    match tokio::time::timeout(ctx.settings().connect_timeout * 2, endpoint.connect()).await {
        Ok(Ok(channel)) => Ok(channel),
        Ok(Err(source)) => Err(LinkError::Connect {
            address: address.to_owned(),
            source,
        }),
        Err(_) => Err(LinkError::Timeout(format!(
            "connecting to {address}: no TLS session within {:?}",
            ctx.settings().connect_timeout * 2
        ))),
    }
}

/// One running link task.
struct Running<T> {
    target: T,
    cancel: CancellationToken,
}

/// Keeps one link per enabled gateway and per Edge, following the store.
#[derive(Debug)]
pub struct Supervisor;

impl Supervisor {
    /// Starts the supervisor; the directory it publishes is in the returned
    /// receiver. It stops (with every link) when `cancel` fires.
    pub fn spawn(
        state: StateHandle,
        live: watch::Receiver<Live>,
        core_id: String,
        leadership: watch::Receiver<Leadership>,
        metrics: Arc<CoreMetrics>,
        tracker: &TaskTracker,
        cancel: CancellationToken,
    ) -> watch::Receiver<Arc<Directory>> {
        let (directory_tx, directory) = watch::channel(Arc::new(Directory::default()));
        let ctx = LinkContext {
            state,
            live,
            core_id,
            leadership,
            directory: directory.clone(),
            tracker: tracker.clone(),
            metrics,
        };
        tracker.spawn(supervise(ctx, directory_tx, cancel));
        directory
    }
}

async fn supervise(
    ctx: LinkContext,
    directory_tx: watch::Sender<Arc<Directory>>,
    cancel: CancellationToken,
) {
    let mut notices = ctx.state.subscribe();
    let mut gateways: BTreeMap<String, (Running<GatewayTarget>, GatewayHandle)> = BTreeMap::new();
    let mut edges: BTreeMap<String, (Running<EdgeTarget>, EdgeHandle)> = BTreeMap::new();
    loop {
        match ctx.state.call(|s| s.link_targets()).await {
            Ok(Ok((gateway_targets, edge_targets))) => {
                reconcile_gateways(&ctx, &cancel, &mut gateways, gateway_targets);
                reconcile_edges(&ctx, &cancel, &mut edges, edge_targets);
                let _ = directory_tx.send(Arc::new(Directory {
                    gateways: gateways
                        .iter()
                        .map(|(name, (_, handle))| (name.clone(), handle.clone()))
                        .collect(),
                    edges: edges
                        .iter()
                        .map(|(name, (_, handle))| (name.clone(), handle.clone()))
                        .collect(),
                }));
            }
            Ok(Err(e)) => warn!(error = %crate::error_chain(&e), "reading the links to dial"),
            Err(StateGone) => break,
        }
        // Wait for a change to gateways or Edges.
        loop {
            tokio::select! {
                () = cancel.cancelled() => {
                    for (running, _) in gateways.values() {
                        running.cancel.cancel();
                    }
                    for (running, _) in edges.values() {
                        running.cancel.cancel();
                    }
                    return;
                }
                notice = notices.recv() => match notice {
                    Ok(Notice::Links) | Err(broadcast::error::RecvError::Lagged(_)) => break,
                    Ok(Notice::Location(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => return,
                },
            }
        }
    }
}

fn reconcile_gateways(
    ctx: &LinkContext,
    cancel: &CancellationToken,
    running: &mut BTreeMap<String, (Running<GatewayTarget>, GatewayHandle)>,
    targets: Vec<GatewayTarget>,
) {
    let wanted: BTreeMap<String, GatewayTarget> =
        targets.into_iter().map(|t| (t.name.clone(), t)).collect();
    running.retain(|name, (link, _)| {
        let keep = wanted.get(name) == Some(&link.target);
        if !keep {
            info!(gateway = %name, "closing the gateway link (removed, disabled or changed)");
            link.cancel.cancel();
        }
        keep
    });
    for (name, target) in wanted {
        if running.contains_key(&name) {
            continue;
        }
        info!(gateway = %name, address = %target.address, location = %target.location, "dialling the gateway");
        let link_cancel = cancel.child_token();
        let (state_tx, state_rx) = watch::channel(GatewayState::default());
        let (commands_tx, commands_rx) = mpsc::channel(8);
        ctx.tracker.spawn(gateway::run(
            target.clone(),
            ctx.clone(),
            state_tx,
            commands_rx,
            link_cancel.clone(),
        ));
        running.insert(
            name,
            (
                Running {
                    target: target.clone(),
                    cancel: link_cancel,
                },
                GatewayHandle {
                    target,
                    state: state_rx,
                    commands: commands_tx,
                },
            ),
        );
    }
}

fn reconcile_edges(
    ctx: &LinkContext,
    cancel: &CancellationToken,
    running: &mut BTreeMap<String, (Running<EdgeTarget>, EdgeHandle)>,
    targets: Vec<EdgeTarget>,
) {
    let wanted: BTreeMap<String, EdgeTarget> =
        targets.into_iter().map(|t| (t.name.clone(), t)).collect();
    running.retain(|name, (link, _)| {
        let keep = wanted.get(name) == Some(&link.target);
        if !keep {
            info!(edge = %name, "closing the Edge link (removed, disabled or changed)");
            link.cancel.cancel();
        }
        keep
    });
    for (name, target) in wanted {
        if running.contains_key(&name) {
            continue;
        }
        info!(edge = %name, address = %target.address, "dialling the Edge");
        let link_cancel = cancel.child_token();
        let (state_tx, state_rx) = watch::channel(EdgeState::default());
        ctx.tracker.spawn(edge::run(
            target.clone(),
            ctx.clone(),
            state_tx,
            link_cancel.clone(),
        ));
        running.insert(
            name,
            (
                Running {
                    target: target.clone(),
                    cancel: link_cancel,
                },
                EdgeHandle {
                    target,
                    state: state_rx,
                },
            ),
        );
    }
}

/// The pause between connections of one link: backoff with jitter, from
/// the minimum again after a link that stayed up.
pub(crate) struct Reconnect {
    backoff: backoff::Backoff,
    started: tokio::time::Instant,
}

impl Reconnect {
    pub(crate) fn new(settings: &LinkSettings) -> Self {
        Self {
            backoff: backoff::Backoff::new(settings.reconnect_min, settings.reconnect_max),
            started: tokio::time::Instant::now(),
        }
    }

    /// A connection attempt starts.
    pub(crate) fn attempt(&mut self) {
        self.started = tokio::time::Instant::now();
    }

    /// Waits before the next attempt; false when cancelled meanwhile.
    pub(crate) async fn pause(&mut self, was_up: bool, cancel: &CancellationToken) -> bool {
        if was_up && self.started.elapsed() >= STABLE_LINK {
            self.backoff.reset();
        }
        let delay = self.backoff.next_delay(backoff::Backoff::random_jitter());
        tokio::select! {
            () = cancel.cancelled() => false,
            () = tokio::time::sleep(delay) => true,
        }
    }
}

/// Why a session ended, for the link's state and the log.
pub(crate) fn ended(result: &Result<(), LinkError>) -> String {
    match result {
        Ok(()) => "Core is shutting down".to_owned(),
        Err(e) => crate::error_chain(e),
    }
}

/// Logs a linked gateway's or Edge's certificate that expires within
/// [`EXPIRY_WARNING`] (a warning) or has expired (an error): renewing it is
/// the operator's, and every link it carries drops at its notAfter.
pub(super) fn certificate_expiry(kind: &str, name: &str, not_after_unix_s: i64) {
    if not_after_unix_s == 0 {
        return;
    }
    match classify(not_after_unix_s, now_unix(), EXPIRY_WARNING) {
        Expiry::Valid { .. } => {}
        Expiry::ExpiresSoon { days_left } => warn!(
            kind,
            name,
            days_left,
            "the {kind}'s link certificate expires soon: renew it (tidegate-core issue {name} --renew)"
        ),
        Expiry::Expired { days_ago } => error!(
            kind,
            name,
            days_ago,
            "the {kind}'s link certificate has expired: renew it (tidegate-core issue {name} --renew)"
        ),
    }
}
