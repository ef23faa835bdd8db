//! The continuity controller: `step(input, now) -> effects`, free of I/O.
//!
//! It owns the state that outlives one event: the grace after a handover
//! (this gateway still answers for its old sessions), the second-chance
//! window (frames of the other gateway's sessions are handed on), the
//! director state last written and its backends, and the endpoint table as
//! last published. Effects come back in the order the kernel needs them:
//! the egress guard and the window are in place before the VIPs move, the
//! kicks go out after.

use std::{
    collections::BTreeSet,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use tracing::{debug, error, info, warn};

use super::Settings;
use crate::{
    director::{DirectorConfig, DirectorState, Mac, Member, maglev},
    ha::{
        machine::Cause,
        sharing::table::{EndpointView, Recent},
    },
    wireguard::kick::{Candidate, FailoverMeta, KickRequest},
    xdp::{Ownership, director::client_key},
};
use tidegate_common::{
    client::ClientKey,
    director::{client_hash, table_index},
};

/// What the controller is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ControllerConfig {
    pub gateway_id: u32,
    /// This gateway's Ethernet address on the public segment.
    pub mac: Mac,
    pub settings: Settings,
    /// Director mode; `None`: active/standby.
    pub director: Option<DirectorConfig>,
    /// The gateway runs the location's WireGuard (`[wireguard]`): the
    /// egress guard is attached and there are sessions to carry over.
    /// Without it only the director is kept.
    pub wireguard: bool,
}

/// What the controller is told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// The agent starts, before the election's first step.
    Start,
    /// The election made this gateway MASTER, for `cause`; the VIPs move
    /// here once the effects are carried out.
    Promoted { cause: Cause },
    /// The VIPs are on the public interface and announced: `vip_move`
    /// after the gateway `became` MASTER, for the transition's `reason`.
    VipsMoved {
        became: Instant,
        vip_move: Duration,
        reason: String,
    },
    /// The election took the VIPs from this gateway, for `cause`.
    Demoted { cause: Cause },
    /// The location as the adverts describe it now (director mode): its
    /// gateways, this one among them, whether this one steers, and the
    /// master this gateway hears (itself when it is the master).
    Location {
        steering: bool,
        members: Vec<Member>,
        master: Option<u32>,
    },
    /// The endpoint-sharing task published its table.
    Endpoints(Arc<EndpointView>),
    /// The director state could not be written; it is written again with
    /// the next [`Input::Location`].
    DirectorNotWritten,
    /// Time passed: a deadline of [`Controller::next_deadline`] is due.
    Tick,
}

/// What the agent and the other owners carry out, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// What the egress guard lets this gateway send to clients.
    SetOwnership(Ownership),
    /// Frames of sessions this gateway did not make go to `peer_mac`, for
    /// `window`.
    OpenWindow { peer_mac: Mac, window: Duration },
    /// No frame is handed on any more.
    CloseWindow,
    /// The XDP director's state.
    SetDirector(DirectorState),
    /// Clients this gateway owns from now on (director mode), before they
    /// are kicked.
    Own(Vec<ClientKey>),
    /// Handshakes to kick, paced.
    Kick(KickRequest),
    /// WireGuard drops every session it holds: this gateway owns no client.
    DropSessions,
}

/// The controller.
#[derive(Debug)]
pub struct Controller {
    config: ControllerConfig,
    /// Converts instants into wall-clock times (handshakes are wall-clock).
    anchor: (Instant, SystemTime),
    /// This gateway holds the VIPs.
    master: bool,
    /// After handing over: until then this gateway answers for its old
    /// sessions; then it owns nothing and the window closes.
    grace_until: Option<Instant>,
    /// After claiming a handover: when the window closes.
    window_until: Option<Instant>,
    /// Why this gateway last became MASTER.
    promoted_by: Cause,
    /// Picked on promotion, kicked once the VIPs have moved.
    to_kick: Vec<Recent>,
    /// The director state last written.
    director_sent: Option<DirectorState>,
    /// The backends of the last location seen (director mode): a gateway
    /// that drops out leaves its clients to the others.
    backends: Vec<u32>,
    /// Gateways that left whose clients are not inherited yet: a client
    /// answers a kicked handshake at the VIPs, so the kicks wait until a
    /// master that is still there holds them.
    orphans: Vec<u32>,
    /// The master this gateway last heard (itself when MASTER).
    master_heard: Option<u32>,
    /// This gateway is MASTER and its VIPs have moved here.
    vips_here: bool,
    /// Director mode, after handing over: until then this gateway keeps
    /// steering, for the clients whose frames still come here until the
    /// new master's announcement reaches them.
    steer_until: Option<Instant>,
    /// Gateway ids already warned about (too large to be backends).
    warned_ids: BTreeSet<u32>,
    endpoints: Arc<EndpointView>,
}

impl Controller {
    /// A controller for a gateway that holds nothing yet; `anchor` pairs an
    /// instant with the wall-clock time at that instant.
    pub fn new(config: ControllerConfig, anchor: (Instant, SystemTime)) -> Self {
        Self {
            config,
            anchor,
            master: false,
            grace_until: None,
            window_until: None,
            promoted_by: Cause::Other,
            to_kick: Vec::new(),
            director_sent: None,
            backends: Vec::new(),
            orphans: Vec::new(),
            master_heard: None,
            vips_here: false,
            steer_until: None,
            warned_ids: BTreeSet::new(),
            endpoints: Arc::default(),
        }
    }

    /// Takes `input` at `now`; returns what to carry out, in order.
    pub fn step(&mut self, input: Input, now: Instant) -> Vec<Effect> {
        let mut effects = Vec::new();
        match input {
            Input::Start => self.start(&mut effects),
            Input::Promoted { cause } => self.promoted(cause, now, &mut effects),
            Input::VipsMoved {
                became,
                vip_move,
                reason,
            } => self.vips_moved(became, vip_move, reason, now, &mut effects),
            Input::Demoted { cause } => self.demoted(cause, now, &mut effects),
            Input::Location {
                steering,
                members,
                master,
            } => {
                self.master_heard = master;
                self.location(steering, members, now, &mut effects);
            }
            Input::Endpoints(view) => self.endpoints = view,
            Input::DirectorNotWritten => self.director_sent = None,
            Input::Tick => self.tick(now, &mut effects),
        }
        effects
    }

    /// The next time [`Input::Tick`] is due, if any.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.grace_until
            .into_iter()
            .chain(self.window_until)
            .chain(self.steer_until)
            .min()
    }

    /// Until when this gateway answers for the sessions it handed over.
    pub fn grace_until(&self) -> Option<Instant> {
        self.grace_until
    }

    fn start(&self, effects: &mut Vec<Effect>) {
        if !self.config.wireguard {
            return;
        }
        if self.config.director.is_some() {
            // Every gateway serves the clients pinned to it, master or not.
            effects.push(Effect::SetOwnership(Ownership::Table));
        } else {
            // Sessions a run before this one left are of no use: another
            // gateway serves the clients now, or will kick them when this
            // one wins the election.
            effects.push(Effect::DropSessions);
        }
    }

    /// Before the VIPs move here: the egress guard lets the answers out,
    /// the recently active peers are picked for kicks, and after a
    /// handover the old sessions' frames go on to the old master from the
    /// first one the announcement brings.
    fn promoted(&mut self, cause: Cause, now: Instant, effects: &mut Vec<Effect>) {
        self.master = true;
        self.vips_here = false;
        self.steer_until = None;
        self.promoted_by = cause;
        self.grace_until = None;
        self.window_until = None;
        self.to_kick.clear();
        if !self.config.wireguard {
            return;
        }
        effects.push(Effect::SetOwnership(self.ownership()));
        // In director mode the clients stay on the gateways they are pinned
        // to; those of a gateway that left are kicked by the gateways they
        // fall to (see `inherit`).
        if self.config.director.is_some() {
            return;
        }
        self.to_kick = self.recent(now);
        if let Cause::HandoverFrom(from) = cause {
            let window = self.window_for(self.to_kick.len());
            if self.open_window(from, window, effects) {
                self.window_until = Some(now + window);
            }
        }
    }

    /// The VIPs have moved: kick the peers picked on promotion.
    fn vips_moved(
        &mut self,
        became: Instant,
        vip_move: Duration,
        reason: String,
        now: Instant,
        effects: &mut Vec<Effect>,
    ) {
        self.vips_here = self.master;
        if self.config.director.is_some() && self.master {
            self.master_heard = Some(self.config.gateway_id);
            if let Some(desired) = self.director_sent.clone() {
                self.inherit_when_served(&desired, now, effects);
            }
            return;
        }
        if !self.config.wireguard || self.config.director.is_some() || !self.master {
            return;
        }
        let (detection_ms, planned) = match self.promoted_by {
            Cause::Takeover { last_heard, .. } => (
                last_heard.map(|at| became.saturating_duration_since(at).as_millis() as u64),
                false,
            ),
            Cause::HandoverFrom(_) => (None, true),
            Cause::HandedOverTo(_) | Cause::Other => (None, false),
        };
        let candidates = std::mem::take(&mut self.to_kick);
        info!(
            recently_active = candidates.len(),
            detection_ms,
            vip_move_ms = vip_move.as_millis() as u64,
            planned,
            "MASTER: kicking handshakes to the recently active peers"
        );
        let meta = FailoverMeta {
            at: self.wall(became),
            cause: reason,
            planned,
            detection_ms,
            vip_move_ms: vip_move.as_millis() as u64,
        };
        effects.push(self.kick(meta, &candidates));
    }

    /// The VIPs left: after a handover, grace (answers but no new
    /// handshakes) and the window toward the new master; otherwise nothing
    /// goes out to clients any more. In director mode the gateway is a
    /// backend still and keeps serving the clients pinned to it.
    fn demoted(&mut self, cause: Cause, now: Instant, effects: &mut Vec<Effect>) {
        self.master = false;
        self.vips_here = false;
        self.window_until = None;
        self.grace_until = None;
        self.to_kick.clear();
        if !self.config.wireguard {
            return;
        }
        let handover_window = self.config.settings.handover_window;
        if self.config.director.is_some() {
            effects.push(Effect::SetOwnership(Ownership::Table));
            effects.push(Effect::CloseWindow);
            if matches!(cause, Cause::HandedOverTo(_)) && !handover_window.is_zero() {
                self.steer_until = Some(now + handover_window);
                info!(
                    window_ms = handover_window.as_millis() as u64,
                    "handed over: steering the clients that still arrive here until the window closes"
                );
            }
            return;
        }
        match cause {
            Cause::HandedOverTo(to) if !handover_window.is_zero() => {
                let window = self.window_for(self.recent(now).len());
                effects.push(Effect::SetOwnership(Ownership::Grace));
                self.open_window(to, window, effects);
                self.grace_until = Some(now + window);
                info!(
                    to,
                    window_ms = window.as_millis() as u64,
                    "handed over: answering for this gateway's sessions until the window closes"
                );
            }
            _ => {
                effects.push(Effect::SetOwnership(Ownership::None));
                effects.push(Effect::CloseWindow);
                effects.push(Effect::DropSessions);
            }
        }
    }

    /// Ends the grace after a handover and closes the window, when due.
    fn tick(&mut self, now: Instant, effects: &mut Vec<Effect>) {
        if self.steer_until.is_some_and(|until| now >= until) {
            self.steer_until = None;
            if let Some(mut desired) = self.director_sent.clone()
                && desired.on
                && !self.master
            {
                desired.on = false;
                self.director_sent = Some(desired.clone());
                effects.push(Effect::SetDirector(desired));
                info!("handover window closed: steering ends");
            }
        }
        if self.grace_until.is_some_and(|until| now >= until) {
            self.grace_until = None;
            self.window_until = None;
            effects.push(Effect::SetOwnership(self.ownership()));
            effects.push(Effect::DropSessions);
            effects.push(Effect::CloseWindow);
            info!("handover window closed: this gateway owns no client");
        }
        if self.window_until.is_some_and(|until| now >= until) {
            self.window_until = None;
            effects.push(Effect::CloseWindow);
            info!("handover window closed");
        }
    }

    /// Director mode: the backends follow the location; the clients of a
    /// gateway that left fall to the others, and those that fall here are
    /// owned and kicked; the director state is written when it changed.
    fn location(
        &mut self,
        steering: bool,
        members: Vec<Member>,
        now: Instant,
        effects: &mut Vec<Effect>,
    ) {
        if self.config.director.is_none() {
            return;
        }
        let steering = steering || self.steer_until.is_some_and(|until| now < until);
        let (desired, unusable) = DirectorState::new(steering, self.config.mac, members);
        for id in unusable {
            if self.warned_ids.insert(id) {
                warn!(
                    gateway_id = id,
                    "a gateway id above 255 cannot be a director backend; it gets no clients"
                );
            }
        }
        let backends: Vec<u32> = desired.backends.iter().map(|b| b.gateway_id).collect();
        let left: Vec<u32> = self
            .backends
            .iter()
            .copied()
            .filter(|id| !backends.contains(id))
            .collect();
        if self.config.wireguard {
            for id in left {
                if !self.orphans.contains(&id) {
                    self.orphans.push(id);
                }
            }
        }
        // A gateway back before its clients were inherited keeps them.
        self.orphans.retain(|id| !backends.contains(id));
        self.backends = backends;
        self.inherit_when_served(&desired, now, effects);
        if self.director_sent.as_ref() != Some(&desired) {
            self.director_sent = Some(desired.clone());
            effects.push(Effect::SetDirector(desired));
        }
    }

    /// Inherits the clients of the gateways that left once a master that
    /// is still there holds the VIPs: this gateway, after its VIPs moved,
    /// or another that it hears as master (a master advertises only after
    /// taking the VIPs). A kick sent while the VIPs are on no live gateway
    /// is answered into the void, and WireGuard tries again only after
    /// five seconds.
    fn inherit_when_served(
        &mut self,
        desired: &DirectorState,
        now: Instant,
        effects: &mut Vec<Effect>,
    ) {
        let Some(director) = self.config.director else {
            return;
        };
        if self.orphans.is_empty() {
            return;
        }
        let served = match self.master_heard {
            Some(id) if id == self.config.gateway_id => self.vips_here,
            Some(id) => !self.orphans.contains(&id),
            None => false,
        };
        if !served {
            debug!(
                from = ?self.orphans,
                "clients of gateways that left: waiting for a master to hold the VIPs before kicking"
            );
            return;
        }
        let left = std::mem::take(&mut self.orphans);
        self.inherit(&left, desired, director, now, effects);
    }

    /// Gateways `left` dropped out of the backends: this gateway owns and
    /// kicks their clients that the Maglev table now gives it, so that they
    /// handshake here at once rather than after WireGuard's timers.
    fn inherit(
        &self,
        left: &[u32],
        desired: &DirectorState,
        director: DirectorConfig,
        now: Instant,
        effects: &mut Vec<Effect>,
    ) {
        let table = match maglev::build(&desired.table_members(), director.table_size) {
            Ok(table) => table,
            Err(error) => {
                error!(%error, "no Maglev table: no inherited clients kicked");
                return;
            }
        };
        let inherited = inherited(&self.recent(now), left, &table, self.config.gateway_id);
        if inherited.is_empty() {
            return;
        }
        let gone = left
            .iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        info!(
            inherited = inherited.len(),
            from = %gone,
            "kicking handshakes to the clients inherited from gateways that left"
        );
        effects.push(Effect::Own(
            inherited.iter().map(|r| client_key(r.endpoint)).collect(),
        ));
        let meta = FailoverMeta {
            at: self.wall(now),
            cause: format!("clients inherited from gateway {gone}"),
            planned: false,
            detection_ms: None,
            vip_move_ms: 0,
        };
        effects.push(self.kick(meta, &inherited));
    }

    /// Opens the window toward gateway `to` for `window`; false when it
    /// cannot (no window configured, `to`'s MAC address not known yet).
    fn open_window(&self, to: u32, window: Duration, effects: &mut Vec<Effect>) -> bool {
        if window.is_zero() {
            return false;
        }
        let Some(peer_mac) = self.endpoints.mac_of(to) else {
            warn!(
                gateway = to,
                "no endpoint message from that gateway yet: its MAC address is unknown, no handover window"
            );
            return false;
        };
        effects.push(Effect::OpenWindow { peer_mac, window });
        true
    }

    /// How long the handover window stays open: the configured time plus
    /// what kicking `peers` takes at the kick rate.
    fn window_for(&self, peers: usize) -> Duration {
        let settings = self.config.settings;
        if settings.handover_window.is_zero() {
            return Duration::ZERO;
        }
        let kicking = match settings.kick_rate {
            0 => Duration::ZERO,
            rate => Duration::from_secs_f64(peers as f64 / f64::from(rate)),
        };
        settings.handover_window + kicking
    }

    /// What the egress guard lets out: in director mode the clients this
    /// gateway owns, master or not; otherwise everything on the master and
    /// nothing on a backup.
    fn ownership(&self) -> Ownership {
        match (self.config.director.is_some(), self.master) {
            (true, _) => Ownership::Table,
            (false, true) => Ownership::All,
            (false, false) => Ownership::None,
        }
    }

    /// The peers with a handshake within the kick window, most recent first.
    fn recent(&self, now: Instant) -> Vec<Recent> {
        self.endpoints
            .recent(self.config.settings.kick_window, self.wall(now))
    }

    /// Kicks `peers` at the configured pace, recorded as `meta`.
    fn kick(&self, meta: FailoverMeta, peers: &[Recent]) -> Effect {
        let candidates = peers
            .iter()
            .map(|recent| Candidate {
                key: recent.key,
                endpoint: recent.endpoint,
                last_handshake: recent.last_handshake,
            })
            .collect();
        Effect::Kick(KickRequest {
            meta,
            candidates,
            rate: self.config.settings.kick_rate,
        })
    }

    fn wall(&self, at: Instant) -> SystemTime {
        let (anchor, wall) = self.anchor;
        if at >= anchor {
            wall + (at - anchor)
        } else {
            wall - (anchor - at)
        }
    }
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
    use std::{collections::BTreeMap, net::SocketAddr};

    use super::*;
    use crate::{
        ha::sharing::table::EndpointTable,
        wireguard::{Key, PeerEndpoint},
        xdp::director::format_mac,
    };

    const HOUR: Duration = Duration::from_secs(3600);

    fn mac(id: u8) -> Mac {
        [2, 0, 0, 0, 0, id]
    }

    fn config(director: bool, wireguard: bool) -> ControllerConfig {
        ControllerConfig {
            gateway_id: 1,
            mac: mac(1),
            settings: Settings {
                kick_rate: 100,
                kick_window: Duration::from_secs(180),
                handover_window: Duration::from_secs(1),
                endpoint_refresh: Duration::from_secs(10),
                endpoint_max_age: HOUR,
            },
            director: director.then_some(DirectorConfig {
                table_size: 251,
                max_sessions: 1024,
            }),
            wireguard,
        }
    }

    /// The instant the tests start at, and the wall-clock time then.
    fn anchor() -> (Instant, SystemTime) {
        (
            Instant::now(),
            SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
        )
    }

    /// An endpoint table of `clients` (gateway id, seconds since their last
    /// handshake), as gateway 2 and 3 describe them, with the MAC addresses
    /// of the gateways in `heard`.
    fn endpoints(clients: &[(u32, u64)], heard: &[u8], wall: SystemTime) -> Arc<EndpointView> {
        let mut table = EndpointTable::new(HOUR);
        let entry = |i: usize, age: u64| PeerEndpoint {
            key: Key::new([i as u8 + 1; 32]),
            endpoint: SocketAddr::from(([198, 51, 100, 7], 40_000 + i as u16)),
            last_handshake: wall - Duration::from_secs(age),
            kicked: false,
        };
        table.set_peers((0..clients.len()).map(|i| Key::new([i as u8 + 1; 32])));
        for (i, &(gateway, age)) in clients.iter().enumerate() {
            table.merge(gateway, &[entry(i, age)], wall);
        }
        let macs: BTreeMap<u32, Mac> = heard.iter().map(|&id| (u32::from(id), mac(id))).collect();
        Arc::new(table.view(macs))
    }

    fn member(id: u8, healthy: bool) -> Member {
        Member {
            gateway_id: u32::from(id),
            mac: mac(id),
            local: id == 1,
            healthy,
            draining: false,
        }
    }

    /// The location with this gateway (1) as the master.
    fn location(healthy: &[(u8, bool)]) -> Input {
        location_led_by(healthy, Some(1))
    }

    fn location_led_by(healthy: &[(u8, bool)], master: Option<u32>) -> Input {
        Input::Location {
            steering: master == Some(1),
            members: healthy.iter().map(|&(id, up)| member(id, up)).collect(),
            master,
        }
    }

    /// An effect in a few words, for the tables.
    fn show(effect: &Effect) -> String {
        match effect {
            Effect::SetOwnership(ownership) => format!("own {ownership:?}"),
            Effect::OpenWindow { peer_mac, window } => {
                format!(
                    "window to {} for {} ms",
                    format_mac(peer_mac),
                    window.as_millis()
                )
            }
            Effect::CloseWindow => "close window".into(),
            Effect::SetDirector(desired) => format!(
                "director {} {:?}",
                if desired.on { "on" } else { "off" },
                desired.table_members()
            ),
            Effect::Own(clients) => format!("own {} clients", clients.len()),
            Effect::Kick(request) => format!(
                "kick {}{}{}",
                request.candidates.len(),
                if request.meta.planned { " planned" } else { "" },
                request
                    .meta
                    .detection_ms
                    .map(|ms| format!(" detected in {ms} ms"))
                    .unwrap_or_default()
            ),
            Effect::DropSessions => "drop sessions".into(),
        }
    }

    /// One scenario: the controller's mode, and each step's time (ms from
    /// the start), input, and the effects it must return.
    struct Case {
        name: &'static str,
        director: bool,
        wireguard: bool,
        steps: Vec<(u64, Input, Vec<&'static str>)>,
    }

    fn takeover(heard_ms_before: u64, at: Instant) -> Cause {
        Cause::Takeover {
            master: Some(2),
            last_heard: Some(at - Duration::from_millis(heard_ms_before)),
        }
    }

    fn moved(became: Instant) -> Input {
        Input::VipsMoved {
            became,
            vip_move: Duration::from_millis(4),
            reason: "test".into(),
        }
    }

    #[test]
    fn the_controller_table() {
        let (start, wall) = anchor();
        let at = |ms: u64| start + Duration::from_millis(ms);
        // Three clients active within the kick window, one long idle.
        let table = || endpoints(&[(2, 5), (2, 30), (3, 100), (2, 1000)], &[2], wall);
        let cases = vec![
            Case {
                name: "an active/standby gateway starts with no session",
                director: false,
                wireguard: true,
                steps: vec![(0, Input::Start, vec!["drop sessions"])],
            },
            Case {
                name: "a director gateway starts serving the clients it owns",
                director: true,
                wireguard: true,
                steps: vec![(0, Input::Start, vec!["own Table"])],
            },
            Case {
                name: "without WireGuard there is nothing to carry over",
                director: false,
                wireguard: false,
                steps: vec![
                    (0, Input::Start, vec![]),
                    (0, Input::Endpoints(table()), vec![]),
                    (
                        10,
                        Input::Promoted {
                            cause: takeover(300, at(10)),
                        },
                        vec![],
                    ),
                    (14, moved(at(10)), vec![]),
                    (
                        20,
                        Input::Demoted {
                            cause: Cause::HandedOverTo(2),
                        },
                        vec![],
                    ),
                ],
            },
            Case {
                name: "a takeover lets everything out and kicks the recently active",
                director: false,
                wireguard: true,
                steps: vec![
                    (0, Input::Endpoints(table()), vec![]),
                    (
                        10,
                        Input::Promoted {
                            cause: takeover(300, at(10)),
                        },
                        vec!["own All"],
                    ),
                    (14, moved(at(10)), vec!["kick 3 detected in 300 ms"]),
                ],
            },
            Case {
                name: "a claimed handover hands the old master's frames on until the window closes",
                director: false,
                wireguard: true,
                steps: vec![
                    (0, Input::Endpoints(table()), vec![]),
                    (
                        0,
                        Input::Promoted {
                            cause: Cause::HandoverFrom(2),
                        },
                        // One second, and 3 kicks at 100 per second.
                        vec!["own All", "window to 02:00:00:00:00:02 for 1030 ms"],
                    ),
                    (4, moved(at(0)), vec!["kick 3 planned"]),
                    (1029, Input::Tick, vec![]),
                    (1030, Input::Tick, vec!["close window"]),
                    (2000, Input::Tick, vec![]),
                ],
            },
            Case {
                name: "no window toward a gateway whose address was never heard",
                director: false,
                wireguard: true,
                steps: vec![
                    (0, Input::Endpoints(table()), vec![]),
                    (
                        0,
                        Input::Promoted {
                            cause: Cause::HandoverFrom(3),
                        },
                        vec!["own All"],
                    ),
                    (4, moved(at(0)), vec!["kick 3 planned"]),
                ],
            },
            Case {
                name: "after handing over the old master answers until its grace ends",
                director: false,
                wireguard: true,
                steps: vec![
                    (0, Input::Endpoints(table()), vec![]),
                    (
                        0,
                        Input::Demoted {
                            cause: Cause::HandedOverTo(2),
                        },
                        vec!["own Grace", "window to 02:00:00:00:00:02 for 1030 ms"],
                    ),
                    (1029, Input::Tick, vec![]),
                    (
                        1030,
                        Input::Tick,
                        vec!["own None", "drop sessions", "close window"],
                    ),
                ],
            },
            Case {
                name: "master again during the grace: the grace ends with nothing dropped",
                director: false,
                wireguard: true,
                steps: vec![
                    (0, Input::Endpoints(table()), vec![]),
                    (
                        0,
                        Input::Demoted {
                            cause: Cause::HandedOverTo(2),
                        },
                        vec!["own Grace", "window to 02:00:00:00:00:02 for 1030 ms"],
                    ),
                    (
                        500,
                        Input::Promoted {
                            cause: takeover(400, at(500)),
                        },
                        vec!["own All"],
                    ),
                    (2000, Input::Tick, vec![]),
                ],
            },
            Case {
                name: "losing the VIPs any other way leaves nothing going out",
                director: false,
                wireguard: true,
                steps: vec![(
                    0,
                    Input::Demoted {
                        cause: takeover(0, at(0)),
                    },
                    vec!["own None", "close window", "drop sessions"],
                )],
            },
            Case {
                name: "a director backend keeps serving its pinned clients, master or not",
                director: true,
                wireguard: true,
                steps: vec![
                    (0, Input::Endpoints(table()), vec![]),
                    (
                        0,
                        Input::Promoted {
                            cause: takeover(300, at(0)),
                        },
                        vec!["own Table"],
                    ),
                    (4, moved(at(0)), vec![]),
                    (
                        10,
                        Input::Demoted {
                            cause: Cause::HandedOverTo(2),
                        },
                        vec!["own Table", "close window"],
                    ),
                    (2000, Input::Tick, vec![]),
                ],
            },
            Case {
                name: "after handing over in director mode the old master steers until the window closes",
                director: true,
                wireguard: true,
                steps: vec![
                    (
                        0,
                        Input::Promoted {
                            cause: takeover(300, at(0)),
                        },
                        vec!["own Table"],
                    ),
                    (
                        0,
                        location(&[(1, true), (2, true)]),
                        vec!["director on [1, 2]"],
                    ),
                    (
                        10,
                        Input::Demoted {
                            cause: Cause::HandedOverTo(2),
                        },
                        vec!["own Table", "close window"],
                    ),
                    (
                        10,
                        location_led_by(&[(1, true), (2, true)], Some(2)),
                        vec![],
                    ),
                    (1009, Input::Tick, vec![]),
                    (1010, Input::Tick, vec!["director off [1, 2]"]),
                    (
                        1011,
                        location_led_by(&[(1, true), (2, true)], Some(2)),
                        vec![],
                    ),
                ],
            },
            Case {
                name: "the director is written when the location changes, and again after a failed write",
                director: true,
                wireguard: true,
                steps: vec![
                    (
                        0,
                        location(&[(1, true), (2, true)]),
                        vec!["director on [1, 2]"],
                    ),
                    (1, location(&[(2, true), (1, true)]), vec![]),
                    (2, Input::DirectorNotWritten, vec![]),
                    (
                        3,
                        location(&[(1, true), (2, true)]),
                        vec!["director on [1, 2]"],
                    ),
                    (
                        4,
                        location(&[(1, true), (2, true), (3, true)]),
                        vec!["director on [1, 2, 3]"],
                    ),
                ],
            },
        ];
        for case in cases {
            let mut controller =
                Controller::new(config(case.director, case.wireguard), (start, wall));
            for (i, (ms, input, expected)) in case.steps.into_iter().enumerate() {
                let input_text = format!("{input:?}");
                let effects: Vec<String> =
                    controller.step(input, at(ms)).iter().map(show).collect();
                assert_eq!(
                    effects, expected,
                    "{}: step {i} at {ms} ms ({input_text:.60})",
                    case.name
                );
            }
        }
    }

    #[test]
    fn the_director_owns_and_kicks_the_clients_a_gone_gateway_leaves_here() {
        let (start, wall) = anchor();
        // 200 clients active on gateway 3, and one idle past the window.
        let mut clients = vec![(3, 10); 200];
        clients.push((3, 1000));
        let mut controller = Controller::new(config(true, true), (start, wall));
        controller.step(Input::Endpoints(endpoints(&clients, &[2, 3], wall)), start);
        // Gateway 2 is the master.
        let all = location_led_by(&[(1, true), (2, true), (3, true)], Some(2));
        assert_eq!(controller.step(all, start).len(), 1);
        let without_3 = [(1, true), (2, true), (3, false)];
        let effects = controller.step(location_led_by(&without_3, Some(2)), start);
        let [
            Effect::Own(owned),
            Effect::Kick(kick),
            Effect::SetDirector(desired),
        ] = &effects[..]
        else {
            panic!("own, kick, then the director: {effects:?}");
        };
        // Gateways 1 and 2 share gateway 3's clients.
        assert!(
            (60..140).contains(&owned.len()),
            "{} of 200 inherited",
            owned.len()
        );
        assert_eq!(kick.candidates.len(), owned.len());
        assert_eq!(kick.meta.cause, "clients inherited from gateway 3");
        assert_eq!(desired.table_members(), vec![1, 2]);
        // Each is one the table now gives to this gateway.
        let table = maglev::build(&[1, 2], 251).unwrap();
        for candidate in &kick.candidates {
            let key = client_key(candidate.endpoint);
            assert_eq!(table[table_index(client_hash(&key), 251) as usize], 1);
        }
        // Nothing more is inherited while the location stays as it is.
        assert!(
            controller
                .step(location_led_by(&without_3, Some(2)), start)
                .is_empty()
        );
    }

    #[test]
    fn the_clients_of_a_gone_master_are_kicked_once_a_live_master_holds_the_vips() {
        let (start, wall) = anchor();
        let all = [(1, true), (2, true), (3, true)];
        let without_3 = [(1, true), (2, true), (3, false)];
        let kicked = |effects: &[Effect]| -> Vec<String> {
            effects
                .iter()
                .filter(|e| matches!(e, Effect::Kick(_)))
                .map(show)
                .collect()
        };
        // (what gateway 1 is told, after gateway 3, the master, died;
        // whether it kicks then)
        type Steps = Vec<(Input, bool)>;
        let cases: Vec<(&str, Steps)> = vec![
            (
                "a backup waits for the new master's advert",
                vec![
                    (location_led_by(&without_3, Some(3)), false),
                    (location_led_by(&without_3, None), false),
                    (location_led_by(&without_3, Some(2)), true),
                    (location_led_by(&without_3, Some(2)), false),
                ],
            ),
            (
                "the new master waits for its VIPs to move",
                vec![
                    (
                        Input::Promoted {
                            cause: takeover(300, start),
                        },
                        false,
                    ),
                    (location_led_by(&without_3, Some(1)), false),
                    (moved(start), true),
                ],
            ),
            (
                "a gateway back before a master is heard keeps its clients",
                vec![
                    (location_led_by(&without_3, Some(3)), false),
                    (location_led_by(&all, Some(3)), false),
                    (location_led_by(&all, Some(2)), false),
                ],
            ),
        ];
        for (name, steps) in cases {
            let mut controller = Controller::new(config(true, true), (start, wall));
            controller.step(
                Input::Endpoints(endpoints(&vec![(3, 10); 200], &[2, 3], wall)),
                start,
            );
            controller.step(location_led_by(&all, Some(3)), start);
            for (i, (input, kicks)) in steps.into_iter().enumerate() {
                let effects = controller.step(input, start);
                assert_eq!(
                    kicked(&effects).len(),
                    usize::from(kicks),
                    "{name}: step {i}: {effects:?}"
                );
            }
        }
    }

    #[test]
    fn inherited_clients_are_those_of_the_gone_gateways_the_table_gives_here() {
        let table = maglev::build(&[1, 2], 251).unwrap();
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let recent: Vec<Recent> = (0..200u16)
            .map(|i| Recent {
                key: Key::new([i as u8; 32]),
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
