//! One gateway link: Core sends the location's whole config, then the
//! changes as they are committed (merged while a message is in flight, one
//! message in flight at a time), and takes in Hello, Applied, Status and
//! failover results.

use std::{collections::HashMap, sync::Arc, time::Duration};

use tidegate_proto::gateway::v1::{
    self as gateway, CoreMessage, core_message, gateway_client::GatewayClient, gateway_message,
};
use tidegate_proto::limits;
use tokio::{
    sync::{broadcast, mpsc, oneshot, watch},
    time::Instant,
};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{
    GatewayCommand, LinkContext, LinkError, Reconnect,
    budget::{EventBudget, with_left_out},
    coalesce::{Coalescer, Next},
    connect, ended,
    status::{GatewayState, PeerSeen, fold_peers},
};
use crate::{
    keys::Key,
    leader::Leadership,
    now_ms,
    store::{EventKind, GatewayTarget, Notice, RemovalOutcome},
};

/// A message at this Core's term.
fn at_term(leadership: &Leadership, msg: core_message::Msg) -> CoreMessage {
    CoreMessage {
        term: leadership.term,
        msg: Some(msg),
    }
}

/// The CoreHello that says what this Core is.
fn core_hello(ctx: &LinkContext, leadership: &Leadership) -> CoreMessage {
    at_term(
        leadership,
        core_message::Msg::Hello(gateway::CoreHello {
            core_id: ctx.core_id.clone(),
            leading: leadership.leading,
        }),
    )
}

/// The link task of one gateway, until `cancel`.
pub(super) async fn run(
    target: GatewayTarget,
    ctx: LinkContext,
    status: watch::Sender<GatewayState>,
    mut commands: mpsc::Receiver<GatewayCommand>,
    cancel: CancellationToken,
) {
    let mut reconnect = Reconnect::new(&ctx.settings());
    let mut events = EventBudget::new(now_ms());
    loop {
        reconnect.attempt();
        let result = session(&target, &ctx, &status, &mut commands, &mut events, &cancel).await;
        let was_up = status.borrow().connected;
        let why = ended(&result);
        status.send_modify(|s| {
            if s.connected {
                s.since_ms = now_ms();
            }
            s.connected = false;
            s.link_error = why.clone();
        });
        if was_up {
            warn!(gateway = %target.name, error = %why, "gateway link down");
            log(
                &ctx,
                &mut events,
                EventKind::GatewayDisconnected,
                &target,
                why,
            )
            .await;
        } else {
            debug!(gateway = %target.name, error = %why, "gateway not reached");
        }
        if result.is_ok() || !reconnect.pause(was_up, &cancel).await {
            return;
        }
    }
}

/// Writes an event of the gateway, within its budget.
async fn log(
    ctx: &LinkContext,
    budget: &mut EventBudget,
    kind: EventKind,
    target: &GatewayTarget,
    message: String,
) {
    if !ctx.leadership.borrow().leading {
        // A standby writes nothing to the shared database.
        debug!(gateway = %target.name, kind = kind.as_str(), %message, "a standby's event: not logged");
        return;
    }
    let Some(left_out) = budget.take(now_ms()) else {
        debug!(gateway = %target.name, kind = kind.as_str(), %message, "over the event budget: not logged");
        return;
    };
    let message = with_left_out(message, left_out);
    let (location, subject) = (target.location.clone(), target.name.clone());
    let result = ctx
        .state
        .call(move |s| s.log_event(kind, &location, &subject, &message, now_ms()))
        .await;
    if let Ok(Err(e)) = result {
        warn!(error = %crate::error_chain(&e), "logging an event");
    }
}

/// What was sent and awaits its Applied.
#[derive(Debug, Clone, Copy)]
struct InFlight {
    version: u64,
    full: bool,
    deadline: Instant,
}

/// One connection: returns `Ok` when cancelled.
async fn session(
    target: &GatewayTarget,
    ctx: &LinkContext,
    status: &watch::Sender<GatewayState>,
    commands: &mut mpsc::Receiver<GatewayCommand>,
    events: &mut EventBudget,
    cancel: &CancellationToken,
) -> Result<(), LinkError> {
    let channel = tokio::select! {
        () = cancel.cancelled() => return Ok(()),
        channel = connect(&target.address, &target.identity, ctx) => channel?,
    };
    let mut client = GatewayClient::new(channel)
        .max_decoding_message_size(limits::MAX_STATUS_BYTES)
        .max_encoding_message_size(limits::MAX_CONFIG_BYTES);
    let (out, out_rx) = mpsc::channel::<CoreMessage>(16);
    let Some((mut leadership, mut lead)) = super::with_a_term(ctx, cancel).await else {
        return Ok(());
    };
    out.send(core_hello(ctx, &lead))
        .await
        .map_err(|_| LinkError::Closed)?;
    let timeout = ctx.settings().connect_timeout;
    let mut inbound = tokio::select! {
        () = cancel.cancelled() => return Ok(()),
        response = tokio::time::timeout(timeout, client.link(ReceiverStream::new(out_rx))) => response
            .map_err(|_| LinkError::Timeout(format!("the gateway did not open the link within {timeout:?}")))?
            .map_err(LinkError::from)?
            .into_inner(),
    };
    let hello = tokio::select! {
        () = cancel.cancelled() => return Ok(()),
        first = tokio::time::timeout(timeout, inbound.message()) => first
            .map_err(|_| LinkError::Timeout(format!("no Hello within {timeout:?}")))?
            .map_err(LinkError::from)?
            .ok_or(LinkError::Closed)?,
    };
    let Some(gateway_message::Msg::Hello(hello)) = hello.msg else {
        return Err(LinkError::Protocol(
            "the gateway's first message is not a Hello".into(),
        ));
    };
    if hello.location_id != 0 && hello.location_id != target.location_id {
        warn!(
            gateway = %target.name,
            theirs = hello.location_id,
            ours = target.location_id,
            "the gateway runs another location's config; sending this location's"
        );
    }
    super::certificate_expiry("gateway", &target.name, hello.cert_not_after_unix_s);
    let now = now_ms();
    info!(
        gateway = %target.name,
        gateway_id = hello.gateway_id,
        running_version = hello.config_version,
        software = %hello.software_version,
        "gateway link up"
    );
    status.send_modify(|s| {
        s.connected = true;
        s.since_ms = now;
        s.last_seen_ms = now;
        s.link_error.clear();
        s.hello = Some(hello.clone());
    });
    log(
        ctx,
        events,
        EventKind::GatewayConnected,
        target,
        format!(
            "gateway id {}, running config version {}, {}",
            hello.gateway_id, hello.config_version, hello.software_version
        ),
    )
    .await;

    let mut notices = ctx.state.subscribe();
    let mut coalescer = Coalescer::new();
    let mut in_flight: Option<InFlight> = None;
    let mut failovers: HashMap<u64, oneshot::Sender<Result<(), String>>> = HashMap::new();
    let mut next_failover_id = 1u64;
    let mut seen: HashMap<Key, PeerSeen> = HashMap::new();
    let mut threshold_ms = 0i64;
    // When this link heard of each version not yet applied, for the push
    // latency: an acknowledgement covers every version up to its own.
    let mut heard = PushTimes::default();
    let applied_timeout = ctx.settings().applied_timeout;
    loop {
        // A standby only listens: the leader sends what changes.
        if lead.leading
            && in_flight.is_none()
            && let Some(next) = coalescer.take()
        {
            let (message, version, full) = match next {
                Next::Full => {
                    let location = target.location_id;
                    let config = ctx
                        .state
                        .call(move |s| s.location_config(location))
                        .await??
                        .ok_or(LinkError::LocationGone)?;
                    let len = prost::Message::encoded_len(&config);
                    if len > limits::MAX_CONFIG_BYTES {
                        return Err(LinkError::Protocol(format!(
                            "the location's config is {len} bytes, over the {} a link carries \
                             (sized for {} devices)",
                            limits::MAX_CONFIG_BYTES,
                            limits::MAX_DEVICES
                        )));
                    }
                    coalescer.sent_full(config.version);
                    threshold_ms = i64::from(config.peer_disconnect_threshold_s) * 1000;
                    let version = config.version;
                    (core_message::Msg::Config(config), version, true)
                }
                Next::Changes(changes) => {
                    let version = changes.version;
                    (core_message::Msg::Changes(changes), version, false)
                }
            };
            out.send(at_term(&lead, message))
                .await
                .map_err(|_| LinkError::Closed)?;
            status.send_modify(|s| s.sent_version = version);
            in_flight = Some(InFlight {
                version,
                full,
                deadline: Instant::now() + applied_timeout,
            });
        }
        let deadline = in_flight.map(|f| f.deadline);
        tokio::select! {
            biased;
            () = cancel.cancelled() => return Ok(()),
            message = inbound.message() => {
                let message = message.map_err(LinkError::from)?.ok_or(LinkError::Closed)?;
                let now = now_ms();
                status.send_modify(|s| s.last_seen_ms = now);
                match message.msg {
                    Some(gateway_message::Msg::Applied(applied)) => {
                        let Some(sent) = in_flight.take() else {
                            return Err(LinkError::Protocol(format!("Applied for version {} that was not sent", applied.version)));
                        };
                        if applied.version != sent.version {
                            return Err(LinkError::Protocol(format!(
                                "Applied for version {}, expected {}", applied.version, sent.version
                            )));
                        }
                        if applied.error.is_empty() {
                            if let Some(latency) = heard.applied(applied.version, Instant::now()) {
                                ctx.metrics.pushed(latency);
                            }
                            status.send_modify(|s| s.applied_version = s.applied_version.max(applied.version));
                        } else {
                            warn!(gateway = %target.name, version = applied.version, error = %applied.error, "the gateway refused the config");
                            coalescer.refused(applied.version, sent.full);
                            status.send_modify(|s| s.apply_error = Some((applied.version, applied.error.clone())));
                            log(ctx, events, EventKind::ApplyError, target, format!("version {}: {}", applied.version, applied.error)).await;
                        }
                    }
                    Some(gateway_message::Msg::Status(report)) => {
                        let acked = on_status(target, ctx, status, &mut seen, events, threshold_ms, report).await;
                        if let Some(through_seq) = acked {
                            let acked = gateway::RemovalsAcked { through_seq };
                            out.send(at_term(&lead, core_message::Msg::RemovalsAcked(acked)))
                                .await
                                .map_err(|_| LinkError::Closed)?;
                        }
                    }
                    Some(gateway_message::Msg::Failover(result)) => {
                        if let Some(reply) = failovers.remove(&result.id) {
                            let message = if result.error.is_empty() {
                                "planned handover started".to_owned()
                            } else {
                                format!("handover refused: {}", result.error)
                            };
                            log(ctx, events, EventKind::Failover, target, message).await;
                            let _ = reply.send(if result.error.is_empty() { Ok(()) } else { Err(result.error) });
                        }
                    }
                    Some(gateway_message::Msg::Hello(_)) => {
                        return Err(LinkError::Protocol("a second Hello on one link".into()));
                    }
                    None => {}
                }
            }
            notice = notices.recv() => match notice {
                Ok(Notice::Location(change)) if change.location_id == target.location_id => {
                    heard.heard(change.version, Instant::now());
                    coalescer.push(&change);
                }
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(_)) => coalescer.lagged(),
                Err(broadcast::error::RecvError::Closed) => return Ok(()),
            },
            Ok(()) = leadership.changed() => {
                let now = leadership.borrow_and_update().clone();
                if now.leading && !lead.leading {
                    // Whatever an earlier leader sent, the gateway gets the
                    // whole config at this term.
                    coalescer = Coalescer::new();
                    info!(gateway = %target.name, term = now.term, "leading: sending the whole config");
                }
                lead = now;
                out.send(core_hello(ctx, &lead)).await.map_err(|_| LinkError::Closed)?;
            }
            Some(command) = commands.recv() => match command {
                GatewayCommand::Failover { reply } if !lead.leading => {
                    let _ = reply.send(Err(super::standby_refusal(ctx, &lead)));
                }
                GatewayCommand::Failover { reply } => {
                    let id = next_failover_id;
                    next_failover_id += 1;
                    out.send(at_term(&lead, core_message::Msg::Failover(gateway::FailoverRequest { id })))
                        .await
                        .map_err(|_| LinkError::Closed)?;
                    failovers.insert(id, reply);
                }
            },
            () = sleep_until(deadline) => {
                return Err(LinkError::Timeout(format!(
                    "the gateway applied nothing within {applied_timeout:?}"
                )));
            }
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// Takes in a status; returns the seq through which its MFA removals are
/// applied and committed, to acknowledge (none when it numbers none).
async fn on_status(
    target: &GatewayTarget,
    ctx: &LinkContext,
    status: &watch::Sender<GatewayState>,
    seen: &mut HashMap<Key, PeerSeen>,
    events: &mut EventBudget,
    threshold_ms: i64,
    report: gateway::Status,
) -> Option<u64> {
    let (peers, recent) = fold_peers(seen, &report);
    let activity: HashMap<Key, i64> = seen.iter().map(|(k, p)| (*k, p.last_active_ms)).collect();
    let old_role = status.borrow().role().map(str::to_owned);
    let new_role = report.ha.as_ref().map(|ha| ha.role.clone());
    status.send_modify(|s| {
        s.ha = report.ha.clone();
        s.status_ms = report.at_unix_ms;
        s.peers = peers;
        s.peers_recent_handshake = recent;
        s.activity = Arc::new(activity);
    });
    if let (Some(old), Some(new)) = (&old_role, &new_role)
        && old != new
    {
        info!(gateway = %target.name, from = %old, to = %new, "role change");
        log(
            ctx,
            events,
            EventKind::RoleChange,
            target,
            format!("{old} -> {new}"),
        )
        .await;
    }
    let mut acked = None;
    if !ctx.leadership.borrow().leading {
        // The leader records and acknowledges removals.
        return acked;
    }
    // A bounded share per status: what is left is not acknowledged, and the
    // gateway sends it again.
    for removal in report
        .removals
        .into_iter()
        .take(limits::MAX_REMOVALS_PER_STATUS)
    {
        let seq = removal.seq;
        let Ok(key) = Key::from_slice(&removal.public_key) else {
            warn!(gateway = %target.name, "an MFA removal with a malformed key");
            acked = Some(seq).filter(|seq| *seq > 0);
            continue;
        };
        let active_elsewhere = {
            let directory = ctx.directory.borrow();
            directory
                .location(target.location_id)
                .filter(|g| g.target.name != target.name)
                .any(|g| {
                    let state = g.state.borrow();
                    state.connected
                        && state
                            .activity
                            .get(&key)
                            .is_some_and(|at| removal.at_unix_ms - at < threshold_ms)
                })
        };
        let (location, gateway, reason, at) = (
            target.location_id,
            target.name.clone(),
            removal.reason.clone(),
            removal.at_unix_ms,
        );
        let outcome = ctx
            .state
            .call(move |s| s.mfa_removed(location, &key, &gateway, &reason, at, active_elsewhere))
            .await;
        match outcome {
            Ok(Ok(RemovalOutcome::Ended)) => {
                info!(gateway = %target.name, peer = %key, "MFA session ended by an inactivity removal");
            }
            Ok(Ok(RemovalOutcome::Kept)) => {
                debug!(gateway = %target.name, peer = %key, "MFA removal on one gateway; the device is active on another, its session goes on");
            }
            Ok(Ok(RemovalOutcome::Ignored)) => {}
            Ok(Err(e)) => {
                // Not acknowledged: the gateway sends it again.
                warn!(error = %crate::error_chain(&e), "recording an MFA removal");
                break;
            }
            Err(_) => break,
        }
        acked = Some(seq).filter(|seq| *seq > 0);
    }
    acked
}
/// Changes heard and not yet applied: version -> when this link heard of
/// it. Bounded: past [`PushTimes::MAX`] the oldest are forgotten.
#[derive(Debug, Default)]
struct PushTimes {
    heard: std::collections::BTreeMap<u64, Instant>,
}

impl PushTimes {
    /// Versions remembered at most (a gateway that acknowledges nothing
    /// for this long is dropped by the applied timeout anyway).
    const MAX: usize = 4096;

    fn heard(&mut self, version: u64, at: Instant) {
        self.heard.entry(version).or_insert(at);
        while self.heard.len() > Self::MAX {
            self.heard.pop_first();
        }
    }

    /// `version` is applied at `now`: the time since the oldest change it
    /// covers was heard, if one was; those changes are forgotten.
    fn applied(&mut self, version: u64, now: Instant) -> Option<Duration> {
        let later = self.heard.split_off(&(version + 1));
        let covered = std::mem::replace(&mut self.heard, later);
        covered
            .values()
            .min()
            .map(|oldest| now.saturating_duration_since(*oldest))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn push_latency_runs_from_the_oldest_change_an_ack_covers() {
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        // (heard: version at ms), then (applied version at ms, latency ms)
        type Heard = &'static [(u64, u64)];
        type Acks = &'static [(u64, u64, Option<u64>)];
        let cases: &[(&str, Heard, Acks)] = &[
            ("one change", &[(5, 0)], &[(5, 40, Some(40))]),
            (
                "coalesced changes: the oldest counts",
                &[(5, 0), (6, 10), (7, 20)],
                &[(7, 50, Some(50))],
            ),
            (
                "acks in steps",
                &[(5, 0), (6, 10), (7, 20)],
                &[(5, 30, Some(30)), (7, 60, Some(50))],
            ),
            ("an ack of a version never heard", &[], &[(3, 10, None)]),
            (
                "a version heard twice keeps its first time",
                &[(5, 0), (5, 30)],
                &[(5, 40, Some(40))],
            ),
            (
                "an ack covers no later version",
                &[(5, 0), (9, 10)],
                &[(5, 20, Some(20)), (9, 100, Some(90))],
            ),
        ];
        for (name, heard, acks) in cases {
            let mut times = PushTimes::default();
            for (version, ms) in *heard {
                times.heard(*version, at(*ms));
            }
            for (version, ms, want) in *acks {
                let got = times
                    .applied(*version, at(*ms))
                    .map(|d| d.as_millis() as u64);
                assert_eq!(got, *want, "{name}: ack of {version}");
            }
        }
    }
}
