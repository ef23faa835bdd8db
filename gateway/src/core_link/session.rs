//! One Link stream with Core: Hello first, then each CoreMessage answered
//! in order, and a status on connect, on every HA change and periodically.
//! Each status carries the MFA removals Core has not acknowledged yet.
//! Every Core gets the Hello and the statuses, leader or standby; what
//! changes the gateway passes the term fence first ([`super::links`]).

use std::time::{Duration, SystemTime};

use tidegate_proto::{
    gateway::v1::{self as pb, core_message::Msg, gateway_message},
    limits,
};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tonic::{Status, Streaming};
use tracing::{debug, info, warn};

use super::{
    convert::{self, FieldError},
    fence::Kind,
    links::CoreLinks,
};
use crate::{
    error_chain,
    ha::{agent::HaHandle, status::HaSummary},
    wireguard::{WireguardHandle, location::LocationUpdate},
};

/// What a session works with: the daemon's tasks and its settings.
#[derive(Debug, Clone)]
pub struct Parts {
    /// `None` without a `[wireguard]` section.
    pub wireguard: Option<WireguardHandle>,
    /// `None` without an `[ha]` section.
    pub ha: Option<HaHandle>,
    pub gateway_id: u32,
    /// How often a status goes to Core; a reload may change it.
    pub status_interval: watch::Receiver<Duration>,
    /// Every Core's Link sessions and the term fence they share.
    pub links: CoreLinks,
}

/// The stream half towards Core.
pub type Outbound = mpsc::Sender<Result<pb::GatewayMessage, Status>>;

/// The stream ended; why, for the log.
#[derive(Debug)]
enum End {
    Cancelled,
    CoreClosed,
    CoreError(Status),
    OutboundClosed,
}

/// Runs session `number` (registered in `parts.links`) until Core closes
/// the stream, the stream fails, or `cancel` fires (a newer Link of the
/// same Core replaced it, or the daemon stops).
pub async fn run(
    parts: Parts,
    number: u64,
    cert_not_after_unix_s: i64,
    mut inbound: Streaming<pb::CoreMessage>,
    out: Outbound,
    cancel: CancellationToken,
) {
    let end = tokio::select! {
        () = cancel.cancelled() => End::Cancelled,
        end = serve(&parts, number, cert_not_after_unix_s, &mut inbound, &out) => end,
    };
    match end {
        End::CoreError(status) => warn!(session = number, %status, "the link with Core failed"),
        other => info!(session = number, end = ?other, "the link with Core ended"),
    }
}

async fn serve(
    parts: &Parts,
    number: u64,
    cert_not_after_unix_s: i64,
    inbound: &mut Streaming<pb::CoreMessage>,
    out: &Outbound,
) -> End {
    let running = match &parts.wireguard {
        Some(wireguard) => wireguard.running().await.ok().flatten(),
        None => None,
    };
    let hello = pb::Hello {
        gateway_id: parts.gateway_id,
        location_id: running.map_or(0, |r| r.location_id),
        config_version: running.map_or(0, |r| r.version),
        software_version: env!("CARGO_PKG_VERSION").to_owned(),
        cert_not_after_unix_s,
    };
    if send(out, gateway_message::Msg::Hello(hello)).await.is_err() {
        return End::OutboundClosed;
    }
    let mut ha = parts.ha.as_ref().map(HaHandle::subscribe);
    let mut interval = Some(parts.status_interval.clone());
    let period = *parts.status_interval.borrow();
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick is at once: the status on connect.
    loop {
        let result = tokio::select! {
            changed = interval_changed(interval.as_mut()) => {
                match changed {
                    Some(period) => {
                        info!(?period, "the status interval follows the reloaded config");
                        tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
                        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    }
                    // Nobody changes it any more.
                    None => interval = None,
                }
                continue;
            },
            message = inbound.message() => match message {
                Ok(Some(message)) => handle(parts, number, message).await,
                Ok(None) => return End::CoreClosed,
                Err(status) => return End::CoreError(status),
            },
            changed = ha_changed(ha.as_mut()) => match changed {
                true => status(parts).await,
                // The agent stopped: the daemon is going down.
                false => {
                    ha = None;
                    continue;
                }
            },
            _ = tick.tick() => status(parts).await,
        };
        if let Some(message) = result
            && send(out, message).await.is_err()
        {
            return End::OutboundClosed;
        }
    }
}

async fn send(out: &Outbound, message: gateway_message::Msg) -> Result<(), ()> {
    out.send(Ok(pb::GatewayMessage { msg: Some(message) }))
        .await
        .map_err(|_| ())
}

/// The new status interval when a reload changes it; `None` when nothing
/// can change it any more; never without a watch.
async fn interval_changed(interval: Option<&mut watch::Receiver<Duration>>) -> Option<Duration> {
    match interval {
        Some(interval) => match interval.changed().await {
            Ok(()) => Some(*interval.borrow_and_update()),
            Err(_) => None,
        },
        None => std::future::pending().await,
    }
}

/// Resolves when the HA summary changes (true) or the agent is gone
/// (false); never without HA.
async fn ha_changed(ha: Option<&mut watch::Receiver<HaSummary>>) -> bool {
    match ha {
        Some(ha) => ha.changed().await.is_ok(),
        None => std::future::pending().await,
    }
}

/// The answer to one message from Core, if it needs one.
async fn handle(
    parts: &Parts,
    number: u64,
    message: pb::CoreMessage,
) -> Option<gateway_message::Msg> {
    let term = message.term;
    match message.msg {
        Some(Msg::Hello(hello)) => {
            let kind = Kind::Hello {
                leading: hello.leading,
            };
            match parts
                .links
                .decide(number, term, kind, Some(&hello.core_id), || ())
            {
                Ok(()) => info!(
                    session = number,
                    core_id = %hello.core_id,
                    term,
                    leading = hello.leading,
                    "Core said who it is"
                ),
                Err(refusal) => warn!(session = number, %refusal, "a CoreHello refused"),
            }
            None
        }
        Some(Msg::Config(config)) => {
            let update = convert::location(&config);
            Some(applied(parts, number, term, Kind::Config, config.version, update).await)
        }
        Some(Msg::Changes(changes)) => {
            let update = convert::changes(&changes);
            Some(applied(parts, number, term, Kind::Changes, changes.version, update).await)
        }
        Some(Msg::Failover(request)) => {
            let slot = match &parts.ha {
                Some(ha) => Some(ha.reserve().await),
                None => None,
            };
            let decided =
                parts
                    .links
                    .decide(number, term, Kind::Failover, None, move || {
                        match slot {
                    None => Err(
                        "this gateway takes part in no election (its config has no [ha] section)"
                            .to_owned(),
                    ),
                    Some(Err(error)) => Err(error_chain(&error)),
                    Some(Ok(slot)) => Ok(slot.failover()),
                }
                    });
            let error = match decided {
                Err(refusal) => refusal.to_string(),
                Ok(Err(error)) => error,
                Ok(Ok(handover)) => match handover.await {
                    Ok(to) => {
                        info!(
                            id = request.id,
                            to, "Core asked for a planned failover: handing over"
                        );
                        String::new()
                    }
                    Err(error) => error_chain(&error),
                },
            };
            if !error.is_empty() {
                warn!(id = request.id, %error, "Core's failover request refused");
            }
            Some(gateway_message::Msg::Failover(pb::FailoverResult {
                id: request.id,
                error,
            }))
        }
        Some(Msg::RemovalsAcked(acked)) => {
            let slot = match &parts.wireguard {
                Some(wireguard) => Some(wireguard.reserve().await),
                None => None,
            };
            let decided = parts
                .links
                .decide(number, term, Kind::RemovalsAcked, None, move || {
                    slot.map(|slot| slot.map(|slot| slot.acknowledge_removals(acked.through_seq)))
                });
            let result = match decided {
                Err(refusal) => {
                    debug!(session = number, %refusal, "Core's acknowledgement of MFA removals ignored");
                    return None;
                }
                Ok(None) => return None,
                Ok(Some(Err(error))) => Err(error),
                Ok(Some(Ok(acknowledged))) => acknowledged.await,
            };
            if let Err(error) = result {
                warn!(error = %error_chain(&error), "recording Core's acknowledgement of MFA removals failed");
            }
            None
        }
        None => {
            let _ = parts.links.decide(number, term, Kind::Empty, None, || ());
            warn!("Core sent an empty message; ignored");
            None
        }
    }
}

/// Passes a config or changes through the fence and, if it is accepted,
/// applies them; the Applied answer either way.
async fn applied(
    parts: &Parts,
    number: u64,
    term: u64,
    kind: Kind,
    version: u64,
    update: Result<LocationUpdate, FieldError>,
) -> gateway_message::Msg {
    // The queue place first, outside the fence's lock (this may wait).
    let slot = match (&update, &parts.wireguard) {
        (Ok(_), Some(wireguard)) => Some(wireguard.reserve().await),
        _ => None,
    };
    let decided = parts
        .links
        .decide(number, term, kind, None, move || match (update, slot) {
            (Err(error), _) => Err(error.to_string()),
            (Ok(update), Some(Ok(slot))) => Ok(slot.apply_location(update)),
            (Ok(_), Some(Err(error))) => Err(error_chain(&error)),
            (Ok(_), None) => {
                Err("this gateway runs no WireGuard interface (no [wireguard] section)".to_owned())
            }
        });
    let result = match decided {
        Err(refusal) => Err(refusal.to_string()),
        Ok(Err(error)) => Err(error),
        Ok(Ok(applying)) => applying
            .await
            .map(|report| debug!(version, ?report, "applied"))
            .map_err(|error| error_chain(&error)),
    };
    let error = match result {
        Ok(()) => String::new(),
        Err(error) => {
            warn!(session = number, version, term, %error, "Core's update refused; nothing applied");
            error
        }
    };
    gateway_message::Msg::Applied(pb::Applied { version, error })
}

/// A status snapshot: HA, peers, and the MFA removals Core has not
/// acknowledged.
async fn status(parts: &Parts) -> Option<gateway_message::Msg> {
    let ha = parts
        .ha
        .as_ref()
        .map(|ha| convert::ha_status(&ha.subscribe().borrow()));
    let (peers, removals) = match &parts.wireguard {
        Some(wireguard) => {
            let peers = match wireguard.peers().await {
                Ok(reply) => convert::peer_statuses(&reply),
                Err(error) => {
                    warn!(error = %error_chain(&error), "reading peers for Core failed");
                    Vec::new()
                }
            };
            let removals = match wireguard
                .unacked_removals(limits::MAX_REMOVALS_PER_STATUS)
                .await
            {
                Ok(removals) => convert::removals(&removals),
                Err(error) => {
                    warn!(error = %error_chain(&error), "reading MFA removals for Core failed");
                    Vec::new()
                }
            };
            (peers, removals)
        }
        None => (Vec::new(), Vec::new()),
    };
    let mut status = pb::Status {
        ha,
        peers,
        removals,
        at_unix_ms: convert::unix_ms(SystemTime::now()),
    };
    let dropped = convert::fit_status(&mut status, limits::MAX_STATUS_BYTES);
    if dropped > 0 {
        warn!(
            dropped,
            limit = limits::MAX_STATUS_BYTES,
            "the status to Core is over its size limit; the peers heard from longest ago are left out"
        );
    }
    Some(gateway_message::Msg::Status(status))
}
