//! What the HA agent publishes: the summary Core follows, and the view
//! `tidectl status` reads, completed with what the other owners publish.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    time::{Duration, Instant, SystemTime},
};

use serde::{Deserialize, Serialize};

use super::{
    agent::HaMode,
    election::PeerExtra,
    machine::{PeerView, Role, Transition, TransitionKind},
    sharing::SharingStatus,
};
use crate::{
    wireguard::kick::FailoverReport,
    xdp::{FenceStatus, director::format_mac},
};

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
    /// The newest advert format it writes.
    #[serde(default)]
    pub advert_version: u8,
}

/// What `tidectl status` shows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HaStatus {
    pub location_id: u32,
    pub gateway_id: u32,
    pub role: Role,
    pub priority: u8,
    pub advert_interval_ms: u64,
    /// The oldest advert format a gateway of the location reads: this
    /// gateway's adverts go out in every format from its newest down to it
    /// (below the newest during a rolling upgrade).
    #[serde(default)]
    pub advert_version: u8,
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
    /// Adverts dropped, by reason: by the agent (`bad-mac`, `replay`...),
    /// and by the kernel when the socket's queue was full
    /// (`socket-queue-full`). The shield's drops are among its counters
    /// (`advert-ttl`, `advert-stranger`, `advert-throttled`).
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
    /// Why the WireGuard state file is behind the state in force (a
    /// failing or full disk), while it is. Filled in by the control socket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_unsaved: Option<String>,
    /// Core's Links and the term fence (none without a `[core]`
    /// section). Filled in by the control socket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub core_links: Option<crate::core_link::CoreLinksStatus>,
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

/// What a metrics scrape reads of the agent's published view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HaMetricsView {
    pub role: Role,
    /// The priority advertised.
    pub priority: u8,
    /// Other gateways heard recently.
    pub gateways_heard: usize,
    /// Role changes since the start, by (from, to, why).
    pub transitions: BTreeMap<(Role, Role, TransitionKind), u64>,
    /// Adverts dropped since the start, by reason (with the socket's).
    pub dropped: BTreeMap<String, u64>,
    /// The fence's lease as last renewed.
    pub fence: Option<FenceStatus>,
}

/// What the agent knows, published after each of its steps.
#[derive(Debug, Clone)]
pub(super) struct AgentView {
    pub(super) location_id: u32,
    pub(super) gateway_id: u32,
    pub(super) role: Role,
    pub(super) priority: u8,
    pub(super) interval: Duration,
    pub(super) advert_version: u8,
    pub(super) master: Option<u32>,
    pub(super) maintenance: bool,
    pub(super) mode: HaMode,
    pub(super) draining: bool,
    pub(super) vips: Vec<IpAddr>,
    pub(super) peers: Vec<(u32, PeerView, Option<PeerExtra>)>,
    pub(super) transitions: Vec<Transition>,
    pub(super) dropped: BTreeMap<String, u64>,
    /// Role changes since the start, by (from, to).
    pub(super) transition_counts: BTreeMap<(Role, Role, TransitionKind), u64>,
    /// The lease as last renewed: when, for how long, holding the VIPs.
    pub(super) renewed: Option<(Instant, Duration, bool)>,
    /// An instant and the wall-clock time at that instant.
    pub(super) anchor: (Instant, SystemTime),
}

/// The parts of the status other tasks own.
pub(super) struct Owned {
    pub(super) vips_held: Vec<IpAddr>,
    pub(super) failovers: Vec<FailoverReport>,
    pub(super) endpoints: Option<SharingStatus>,
    /// Datagrams the advert socket's queue dropped.
    pub(super) socket_dropped: u32,
}

impl AgentView {
    /// What a metrics scrape reads, at `now`; `socket_dropped` from the
    /// advert socket.
    pub(super) fn metrics(&self, now: Instant, socket_dropped: u32) -> HaMetricsView {
        let mut dropped = self.dropped.clone();
        if socket_dropped > 0 {
            dropped.insert("socket-queue-full".into(), socket_dropped.into());
        }
        HaMetricsView {
            role: self.role,
            priority: self.priority,
            gateways_heard: self.peers.len(),
            transitions: self.transition_counts.clone(),
            dropped,
            fence: self.renewed.map(|(at, lease, holds_vips)| FenceStatus {
                holds_vips,
                lease_left_ms: lease
                    .saturating_sub(now.saturating_duration_since(at))
                    .as_millis() as u64,
            }),
        }
    }

    /// The whole status at `now`, with what the other tasks own.
    pub(super) fn status(self, now: Instant, owned: Owned) -> HaStatus {
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
            advert_version: self.advert_version,
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
                    advert_version: peer.version,
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
            dropped: {
                let mut dropped = self.dropped;
                if owned.socket_dropped > 0 {
                    dropped.insert("socket-queue-full".into(), owned.socket_dropped.into());
                }
                dropped
            },
            fence: self.renewed.map(|(at, lease, holds_vips)| FenceStatus {
                holds_vips,
                lease_left_ms: lease
                    .saturating_sub(now.saturating_duration_since(at))
                    .as_millis() as u64,
            }),
            failovers: owned.failovers,
            endpoints: owned.endpoints,
            state_unsaved: None,
            core_links: None,
        }
    }
}
