//! The election as a pure state machine: events in (adverts heard, timer
//! ticks, health, operator requests), actions out (advertise, take or
//! release the VIPs). No I/O and no clock of its own, so every timing rule
//! is tested without privileges.
//!
//! The rules are those of VRRP (RFC 5798) with two additions: every gateway
//! advertises, not only the master, so the master knows its backups; and a
//! planned failover is a handover: the master names its best backup, which
//! claims the VIPs at once, and the old master releases them only when it
//! hears the new one. Preemption is a handover too: a backup that outranks
//! a live master asks for the VIPs in its adverts, and the master hands
//! them over; only a master that does not answer is taken over from.

use std::{
    collections::{BTreeMap, VecDeque},
    fmt,
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

use super::advert::{PREEMPT_VERSION, VERSION};

/// Transitions kept for `tidectl status`.
pub const MAX_TRANSITIONS: usize = 32;

/// A gateway leaves the peer table after this many of its intervals
/// without an advert.
const PEER_TIMEOUT_INTERVALS: u32 = 4;

/// A gateway's role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    Init,
    Backup,
    Master,
    Fault,
}

impl Role {
    /// The role's number in an advert.
    pub fn code(self) -> u8 {
        match self {
            Self::Init => 0,
            Self::Backup => 1,
            Self::Master => 2,
            Self::Fault => 3,
        }
    }

    /// The role of advert code `code`.
    pub fn from_code(code: u8) -> Option<Self> {
        Some(match code {
            0 => Self::Init,
            1 => Self::Backup,
            2 => Self::Master,
            3 => Self::Fault,
            _ => return None,
        })
    }
}

impl Role {
    /// The role in lower case, as the control protocols spell it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Init => "init",
            Self::Backup => "backup",
            Self::Master => "master",
            Self::Fault => "fault",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Init => "INIT",
            Self::Backup => "BACKUP",
            Self::Master => "MASTER",
            Self::Fault => "FAULT",
        })
    }
}

/// This gateway's election settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    pub gateway_id: u32,
    /// 1 to 255; 0 is reserved for "resigning".
    pub priority: u8,
    /// How often every gateway advertises.
    pub interval: Duration,
    /// Take over from a lower-priority master (by asking it to hand over).
    pub preempt: bool,
    /// After start, no preemption for this long.
    pub preempt_delay: Duration,
}

/// What an authenticated, fresh advert from another gateway says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heard {
    pub from: u32,
    pub role: Role,
    /// 0 when the sender resigns.
    pub priority: u8,
    pub interval: Duration,
    /// The gateway a master hands over to.
    pub handover_to: Option<u32>,
    pub maintenance: bool,
    pub healthy: bool,
    /// A backup that outranks the master asks it to hand over.
    pub preempt: bool,
    /// The advert format the sender wrote.
    pub version: u8,
}

/// Something that happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The agent starts.
    Start,
    /// Time passed; due timers fire.
    Tick,
    /// An advert from another gateway of the location.
    Heard(Heard),
    /// Health changed: unhealthy makes the gateway FAULT at once.
    Health { healthy: bool, reason: String },
    /// The agent did not run for `paused` (it was frozen, or starved),
    /// longer than its lease: whatever it knew is stale.
    Stalled { paused: Duration },
    /// The daemon stops: hand over if a backup is alive, else resign.
    Shutdown,
    /// The operator asks for a planned failover: answered with
    /// [`Action::HandOver`] or [`Action::Refuse`].
    Failover,
    /// The operator turns maintenance on or off: in maintenance the
    /// gateway stays BACKUP. A master hands over first
    /// ([`Action::HandOver`]); with no backup to take over, that is refused
    /// ([`Action::Refuse`]) and nothing changes.
    Maintenance { on: bool },
    /// Tracked checks take `points` off the configured priority (0: all
    /// pass). The new priority is advertised at once; a backup that now
    /// outranks a master asks a lower-priority master to hand over.
    Penalty { points: u8, reason: String },
}

/// What the I/O layer must do, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Send an advert now, with these fields.
    Advertise(AdvertFields),
    /// Put the VIPs on the public interface and announce them
    /// (gratuitous ARP, unsolicited neighbour adverts).
    TakeVips,
    /// Take the VIPs off the public interface (they stay on `lo`).
    ReleaseVips,
    /// Announce the VIPs again (another master was heard).
    Announce,
    /// Shutdown is complete: the daemon may exit.
    Exit,
    /// A handover to that gateway started: it is named in the adverts from
    /// now on (a planned failover, maintenance, shutdown, or a backup that
    /// outranks this master asked for the VIPs).
    HandOver(u32),
    /// The operator's request ([`Event::Failover`], [`Event::Maintenance`])
    /// cannot be carried out; nothing changed.
    Refuse(HandoverError),
}

/// What an operator's request ([`Event::Failover`], [`Event::Maintenance`])
/// came to, from the actions it returned: the gateway handed over to, if
/// any, or why it was refused.
pub fn answer(actions: &[Action]) -> Result<Option<u32>, HandoverError> {
    let mut to = None;
    for action in actions {
        match action {
            Action::Refuse(error) => return Err(*error),
            Action::HandOver(gateway) => to = Some(*gateway),
            _ => {}
        }
    }
    Ok(to)
}

/// Why a planned failover cannot start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HandoverError {
    #[error("this gateway is {0}, not MASTER: only the master can hand over")]
    NotMaster(Role),
    #[error("no healthy backup to hand over to")]
    NoBackup,
    #[error("a handover to gateway {0} is already under way")]
    InProgress(u32),
}

/// The fields of this gateway's next advert.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdvertFields {
    pub role: Role,
    pub priority: u8,
    pub handover_to: Option<u32>,
    pub maintenance: bool,
    pub healthy: bool,
    /// BACKUP: this gateway outranks the master it follows and asks it to
    /// hand over.
    pub preempt: bool,
    /// The oldest advert format a gateway of the location reads
    /// ([`Machine::oldest_version`]): the adverts go out in each format
    /// from the newest down to it.
    pub oldest_version: u8,
}

/// A role change, for `tidectl status` and the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    pub at: Instant,
    pub from: Role,
    pub to: Role,
    /// Why, in a few words of a bounded set (a metric's label).
    pub kind: TransitionKind,
    /// Why, in words, with the gateways and figures involved.
    pub reason: String,
}

/// Why the role changed (or, for a note, what happened), from a bounded
/// set: what `tidegate_ha_transitions_total` counts by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum TransitionKind {
    /// The agent started.
    Started,
    /// No master was heard for a master-down interval, or the master
    /// resigned: this gateway took the VIPs.
    MasterDown,
    /// A master asked to hand over did not: this higher priority took over.
    PreemptionUnanswered,
    /// The master handed the VIPs to this gateway.
    HandoverFrom,
    /// This master handed the VIPs to another gateway.
    HandedOver,
    /// A higher-priority master was heard.
    Outranked,
    /// The gateway's own health checks failed, or pass again.
    Health,
    /// The agent was paused past its lease.
    Stalled,
    /// Stopping with no backup, or a handover that timed out: resigned.
    Resigned,
    /// No role changed: a note in the history.
    Note,
}

impl TransitionKind {
    /// The name in metrics and `tidectl status --json`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Started => "started",
            Self::MasterDown => "master-down",
            Self::PreemptionUnanswered => "preemption-unanswered",
            Self::HandoverFrom => "handover-from",
            Self::HandedOver => "handed-over",
            Self::Outranked => "outranked",
            Self::Health => "health",
            Self::Stalled => "stalled",
            Self::Resigned => "resigned",
            Self::Note => "note",
        }
    }
}

/// Why the VIPs last moved to or from this gateway, for failover
/// continuity (what to kick, where to hand frames on, what to report).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// Nothing yet, or a change that is neither of the others.
    Other,
    /// This gateway took over: no master was heard for a master-down
    /// interval. `last_heard`: the last advert of any master.
    Takeover {
        master: Option<u32>,
        last_heard: Option<Instant>,
    },
    /// This gateway claimed the VIPs that gateway handed over.
    HandoverFrom(u32),
    /// This gateway handed the VIPs over to that gateway.
    HandedOverTo(u32),
}

/// Another gateway, as its adverts describe it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerView {
    pub role: Role,
    pub priority: u8,
    pub maintenance: bool,
    pub healthy: bool,
    pub interval: Duration,
    pub last_seen: Instant,
    /// The newest advert format heard from it lately: a gateway of this
    /// release writes the previous release's format too while the location
    /// needs it, and this is its newest.
    pub version: u8,
    /// When it last wrote `version`: an older format alone for the peer
    /// table's timeout means it runs the older release now.
    pub version_at: Instant,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Handover {
    to: u32,
    deadline: Instant,
    /// `to` asked for the VIPs (it outranks this gateway): once it holds
    /// them, this gateway may ask for them back if it outranks it again.
    asked: bool,
}

/// BACKUP: asking a lower-priority master to hand over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Preemption {
    master: u32,
    /// With no handover by then, the master is taken over from.
    deadline: Instant,
}

/// The election state of one gateway.
#[derive(Debug, Clone)]
pub struct Machine {
    settings: Settings,
    role: Role,
    started: Option<Instant>,
    next_advert: Option<Instant>,
    /// BACKUP: when the master is deemed down.
    master_down_at: Option<Instant>,
    /// The master this gateway follows, if any.
    master: Option<u32>,
    peers: BTreeMap<u32, PeerView>,
    healthy: bool,
    /// Points taken off the configured priority by failing tracked checks.
    penalty: u8,
    maintenance: bool,
    /// MASTER: handing over to another gateway.
    handover: Option<Handover>,
    /// BACKUP after a handover the operator asked for: the master this
    /// gateway handed over to, which it does not preempt.
    yielded_to: Option<u32>,
    /// BACKUP: asking the master to hand over.
    preemption: Option<Preemption>,
    shutting_down: bool,
    transitions: VecDeque<Transition>,
    /// Transitions and notes recorded since the start (the history keeps
    /// the last few).
    recorded: u64,
    /// Why the VIPs last moved.
    cause: Cause,
    /// The newest advert format this gateway writes.
    newest: u8,
}

impl Machine {
    /// A machine in INIT.
    pub fn new(settings: Settings) -> Self {
        Self {
            settings,
            role: Role::Init,
            started: None,
            next_advert: None,
            master_down_at: None,
            master: None,
            peers: BTreeMap::new(),
            healthy: true,
            penalty: 0,
            maintenance: false,
            handover: None,
            yielded_to: None,
            preemption: None,
            shutting_down: false,
            transitions: VecDeque::new(),
            recorded: 0,
            cause: Cause::Other,
            newest: VERSION,
        }
    }

    /// A machine that writes advert formats up to `version` only, as a
    /// gateway of the release that introduced it does (the HA simulation's
    /// gateways of the previous release).
    pub fn speaking_at_most(mut self, version: u8) -> Self {
        self.newest = version.min(VERSION);
        self
    }

    /// The newest advert format this gateway reads and writes.
    pub fn newest(&self) -> u8 {
        self.newest
    }

    /// The oldest advert format a gateway in the peer table reads (the
    /// newest each writes), this gateway's newest when they all read it.
    /// During a rolling upgrade a gateway writes every format from its
    /// newest down to this one, so every gateway understands every other.
    pub fn oldest_version(&self) -> u8 {
        self.peers
            .values()
            .map(|peer| peer.version)
            .fold(self.newest, u8::min)
    }

    /// Whether this gateway may ask a master for the VIPs: only when every
    /// gateway it hears reads the preempt flag. Otherwise it stays BACKUP
    /// (an older master would not answer, and taking over from a live one
    /// would make two masters).
    fn may_ask(&self) -> bool {
        self.oldest_version() >= PREEMPT_VERSION
    }

    /// Why the VIPs last moved to or from this gateway: read it when
    /// carrying out [`Action::TakeVips`] or [`Action::ReleaseVips`].
    pub fn cause(&self) -> Cause {
        self.cause
    }

    /// The current role.
    pub fn role(&self) -> Role {
        self.role
    }

    /// The settings.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// The master: this gateway when MASTER, else the one it follows.
    pub fn master(&self) -> Option<u32> {
        match self.role {
            Role::Master => Some(self.settings.gateway_id),
            _ => self.master,
        }
    }

    /// The priority this gateway runs with: the configured one less the
    /// penalty of failing tracked checks, never below 1.
    pub fn priority(&self) -> u8 {
        self.settings.priority.saturating_sub(self.penalty).max(1)
    }

    /// Whether the gateway's own checks pass (public link, XDP, WireGuard).
    pub fn healthy(&self) -> bool {
        self.healthy
    }

    /// Whether maintenance mode is on.
    pub fn maintenance(&self) -> bool {
        self.maintenance
    }

    /// The other gateways heard recently.
    pub fn peers(&self) -> &BTreeMap<u32, PeerView> {
        &self.peers
    }

    /// How many transitions and notes were recorded since the start:
    /// the newest `recorded() - n` of [`transitions`](Self::transitions)
    /// came after the first `n`.
    pub fn recorded(&self) -> u64 {
        self.recorded
    }

    /// Role changes, oldest first.
    pub fn transitions(&self) -> impl Iterator<Item = &Transition> {
        self.transitions.iter()
    }

    /// What the next advert says.
    pub fn advert(&self) -> AdvertFields {
        let resigning = self.role == Role::Fault || (self.shutting_down && self.handover.is_none());
        AdvertFields {
            role: self.role,
            priority: if resigning { 0 } else { self.priority() },
            handover_to: self.handover.map(|h| h.to),
            maintenance: self.maintenance,
            healthy: self.healthy,
            preempt: self.role == Role::Backup
                && self.preemption.is_some()
                && self.eligible()
                && self.may_ask(),
            oldest_version: self.oldest_version(),
        }
    }

    /// When the machine next needs a [`Event::Tick`].
    pub fn next_deadline(&self) -> Option<Instant> {
        [
            self.next_advert,
            self.master_down_at,
            self.handover.map(|h| h.deadline),
            self.preemption.map(|p| p.deadline),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Skew time: a higher priority waits less before taking over.
    pub fn skew(priority: u8, interval: Duration) -> Duration {
        interval * (256 - u32::from(priority)) / 256
    }

    /// Master-down interval for a master advertising every `interval`.
    pub fn master_down_interval(&self, interval: Duration) -> Duration {
        3 * interval + Self::skew(self.priority(), interval)
    }

    /// Feeds one event at `now`; returns the actions to take, in order.
    pub fn on_event(&mut self, event: Event, now: Instant) -> Vec<Action> {
        let mut actions = Vec::new();
        match event {
            Event::Start => self.start(now, &mut actions),
            Event::Tick => self.tick(now, &mut actions),
            Event::Heard(heard) => self.heard(heard, now, &mut actions),
            Event::Health { healthy, reason } => self.health(healthy, reason, now, &mut actions),
            Event::Stalled { paused } => self.stalled(paused, now, &mut actions),
            Event::Shutdown => self.shutdown(now, &mut actions),
            Event::Failover => {
                if let Err(error) = self.start_handover(now, &mut actions) {
                    actions.push(Action::Refuse(error));
                }
            }
            Event::Maintenance { on } => self.set_maintenance(on, now, &mut actions),
            Event::Penalty { points, reason } => {
                self.set_penalty(points, &reason, now, &mut actions)
            }
        }
        actions
    }

    fn start_handover(
        &mut self,
        now: Instant,
        actions: &mut Vec<Action>,
    ) -> Result<u32, HandoverError> {
        if self.role != Role::Master {
            return Err(HandoverError::NotMaster(self.role));
        }
        if let Some(handover) = self.handover {
            return Err(HandoverError::InProgress(handover.to));
        }
        let to = self.best_backup(now).ok_or(HandoverError::NoBackup)?;
        self.hand_over_to(to, false, now, actions);
        Ok(to)
    }

    /// Names `to` in the adverts, from this one on, until it claims the
    /// VIPs or the deadline passes; `asked` when `to` asked for them.
    fn hand_over_to(&mut self, to: u32, asked: bool, now: Instant, actions: &mut Vec<Action>) {
        self.handover = Some(Handover {
            to,
            deadline: now + self.master_down_interval(self.settings.interval),
            asked,
        });
        actions.push(Action::HandOver(to));
        self.advertise_now(now, actions);
    }

    fn set_maintenance(&mut self, on: bool, now: Instant, actions: &mut Vec<Action>) {
        if on
            && self.role == Role::Master
            && self.handover.is_none()
            && let Err(error) = self.start_handover(now, actions)
        {
            actions.push(Action::Refuse(error));
            return;
        }
        if self.maintenance != on {
            self.maintenance = on;
            let state = if on { "on" } else { "off" };
            self.note(format!("maintenance {state}"), now);
        }
        if !on && self.role == Role::Backup && self.master_down_at.is_none() {
            self.master_down_at = Some(now + self.master_down_interval(self.settings.interval));
        }
        self.advertise_now(now, actions);
    }

    fn set_penalty(&mut self, penalty: u8, reason: &str, now: Instant, actions: &mut Vec<Action>) {
        if penalty == self.penalty {
            return;
        }
        let before = self.priority();
        self.penalty = penalty;
        self.note(
            format!("priority {before} -> {}: {reason}", self.priority()),
            now,
        );
        if self.role != Role::Init {
            self.advertise_now(now, actions);
        }
    }

    fn start(&mut self, now: Instant, actions: &mut Vec<Action>) {
        if self.role != Role::Init {
            return;
        }
        self.started = Some(now);
        let role = if self.healthy {
            Role::Backup
        } else {
            Role::Fault
        };
        self.transition(role, TransitionKind::Started, "started", now);
        if role == Role::Backup {
            self.master_down_at = Some(now + self.master_down_interval(self.settings.interval));
        }
        // A restarted gateway must not hold the VIPs it may have held.
        actions.push(Action::ReleaseVips);
        self.advertise_now(now, actions);
    }

    fn tick(&mut self, now: Instant, actions: &mut Vec<Action>) {
        if self.role == Role::Init {
            return;
        }
        self.peers.retain(|_, peer| {
            now.saturating_duration_since(peer.last_seen) <= PEER_TIMEOUT_INTERVALS * peer.interval
        });
        if let Some(handover) = self.handover
            && now >= handover.deadline
        {
            self.handover = None;
            if self.shutting_down {
                self.resign(
                    TransitionKind::Resigned,
                    format!("handover to gateway {} timed out; resigning", handover.to),
                    now,
                    actions,
                );
                actions.push(Action::Exit);
                return;
            }
            self.note(
                format!(
                    "handover to gateway {} timed out; still MASTER",
                    handover.to
                ),
                now,
            );
        }
        if self.role == Role::Backup
            && let Some(preemption) = self.preemption
            && now >= preemption.deadline
        {
            self.preemption = None;
            if self.eligible() && self.may_ask() {
                let last_heard = self.peers.get(&preemption.master).map(|p| p.last_seen);
                self.cause = Cause::Takeover {
                    master: Some(preemption.master),
                    last_heard,
                };
                self.master = None;
                self.become_master(
                    TransitionKind::PreemptionUnanswered,
                    format!(
                        "master {} did not hand over to this higher priority; taking over",
                        preemption.master
                    ),
                    now,
                    actions,
                );
            }
        }
        if self.role == Role::Backup && self.master_down_at.is_some_and(|at| now >= at) {
            self.master_down_at = None;
            if self.eligible() {
                let master = self.master.take();
                let reason = match master {
                    Some(id) => format!("master {id} down"),
                    None => "no master heard".to_owned(),
                };
                let last_heard = self
                    .peers
                    .values()
                    .filter(|peer| peer.role == Role::Master)
                    .map(|peer| peer.last_seen)
                    .max();
                self.cause = Cause::Takeover { master, last_heard };
                self.become_master(TransitionKind::MasterDown, reason, now, actions);
            }
        }
        if self.next_advert.is_some_and(|at| now >= at) {
            self.advertise_now(now, actions);
        }
    }

    fn heard(&mut self, heard: Heard, now: Instant, actions: &mut Vec<Action>) {
        if heard.from == self.settings.gateway_id || self.role == Role::Init {
            return;
        }
        // Silent for 3 intervals: it may have become master meanwhile.
        let known = self.peers.get(&heard.from);
        let back_from_silence = known
            .is_none_or(|peer| now.saturating_duration_since(peer.last_seen) >= 3 * peer.interval);
        // Its newest format stands until it has written only older ones for
        // the peer table's timeout.
        let (version, version_at) = match known {
            Some(peer)
                if peer.version > heard.version
                    && now.saturating_duration_since(peer.version_at)
                        <= PEER_TIMEOUT_INTERVALS * peer.interval =>
            {
                (peer.version, peer.version_at)
            }
            _ => (heard.version, now),
        };
        self.peers.insert(
            heard.from,
            PeerView {
                role: heard.role,
                priority: heard.priority,
                maintenance: heard.maintenance,
                healthy: heard.healthy,
                interval: heard.interval,
                last_seen: now,
                version,
                version_at,
            },
        );
        if heard.role != Role::Master && back_from_silence && self.role == Role::Master {
            // After a partition, the other side's master may step down on
            // hearing this one before this one hears it as master: the
            // segment still points at it, so claim the VIPs again.
            self.note(
                format!("gateway {} heard after a silence; announcing", heard.from),
                now,
            );
            actions.push(Action::Announce);
        }
        if heard.role == Role::Backup && heard.preempt && self.role == Role::Master {
            self.backup_asks_for_the_vips(heard, now, actions);
        }
        if heard.role != Role::Master {
            if self.master == Some(heard.from) && self.role == Role::Backup {
                // Our master stepped down without a priority-0 advert.
                self.master_left(heard.from, now);
            }
            return;
        }
        match self.role {
            Role::Backup => self.backup_heard_master(heard, now, actions),
            Role::Master => self.master_heard_master(heard, now, actions),
            Role::Init | Role::Fault => {}
        }
    }

    fn backup_heard_master(&mut self, heard: Heard, now: Instant, actions: &mut Vec<Action>) {
        if heard.priority == 0 {
            if self.master.is_none_or(|master| master == heard.from) {
                self.master_left(heard.from, now);
            }
            return;
        }
        if heard.handover_to == Some(self.settings.gateway_id) && self.eligible() {
            self.master = None;
            self.cause = Cause::HandoverFrom(heard.from);
            self.become_master(
                TransitionKind::HandoverFrom,
                format!("handover from gateway {}", heard.from),
                now,
                actions,
            );
            return;
        }
        // Just started, a gateway learns the location first (the others
        // send it their endpoint tables as soon as they hear it, and it
        // kicks from them): it asks no sooner than it would have taken over
        // from silence.
        let settle = self
            .settings
            .preempt_delay
            .max(self.master_down_interval(self.settings.interval));
        let in_delay = self.started.is_some_and(|started| now < started + settle);
        let preempt = self.settings.preempt
            && !in_delay
            && self.eligible()
            && self.may_ask()
            && self.yielded_to != Some(heard.from)
            && !outranks(
                heard.priority,
                heard.from,
                self.priority(),
                self.settings.gateway_id,
            );
        self.master = Some(heard.from);
        self.master_down_at = Some(now + self.master_down_interval(heard.interval));
        if !preempt {
            self.preemption = None;
            return;
        }
        // A lower-priority master: ask it to hand over, at once, and take
        // over from it only if it does not.
        if self.preemption.is_none_or(|p| p.master != heard.from) {
            self.preemption = Some(Preemption {
                master: heard.from,
                deadline: now + 2 * self.master_down_interval(heard.interval),
            });
            self.note(
                format!(
                    "master {} has a lower priority; asking it to hand over",
                    heard.from
                ),
                now,
            );
            self.advertise_now(now, actions);
        }
    }

    /// BACKUP: the master this gateway followed stepped down or resigned.
    /// Another master heard within its master-down interval (the one that
    /// took over from it, whose claim arrived first) is followed; with none,
    /// RFC 5798: take over after the skew only.
    fn master_left(&mut self, left: u32, now: Instant) {
        self.preemption = None;
        let other = self
            .peers
            .iter()
            .filter(|&(&id, peer)| {
                id != left
                    && peer.role == Role::Master
                    && peer.priority > 0
                    && now < peer.last_seen + self.master_down_interval(peer.interval)
            })
            .max_by_key(|(_, peer)| peer.last_seen);
        match other {
            Some((&id, peer)) => {
                self.master = Some(id);
                self.master_down_at =
                    Some(peer.last_seen + self.master_down_interval(peer.interval));
            }
            None => {
                self.master = None;
                self.master_down_at =
                    Some(now + Self::skew(self.priority(), self.settings.interval));
            }
        }
    }

    /// MASTER: a backup that outranks this one asks for the VIPs: hand them
    /// over, as a planned failover, unless a handover is under way.
    fn backup_asks_for_the_vips(&mut self, heard: Heard, now: Instant, actions: &mut Vec<Action>) {
        let asks = heard.healthy
            && !heard.maintenance
            && outranks(
                heard.priority,
                heard.from,
                self.priority(),
                self.settings.gateway_id,
            );
        if !asks || self.handover.is_some() || self.shutting_down {
            return;
        }
        self.note(
            format!(
                "gateway {} outranks this one and asks for the VIPs; handing over",
                heard.from
            ),
            now,
        );
        self.hand_over_to(heard.from, true, now, actions);
    }

    fn master_heard_master(&mut self, heard: Heard, now: Instant, actions: &mut Vec<Action>) {
        if heard.priority == 0 {
            // Let the backups hear a live master at once.
            self.advertise_now(now, actions);
            return;
        }
        if heard.handover_to == Some(self.settings.gateway_id) {
            // The old master's offer, still in flight, or sent again before
            // it heard this gateway claim: it steps down on hearing this
            // gateway, so make sure it does now; yielding back would leave
            // the VIPs with nobody.
            self.advertise_now(now, actions);
            return;
        }
        if let Some(handover) = self.handover
            && handover.to == heard.from
        {
            self.handover = None;
            self.yielded_to = (!handover.asked).then_some(heard.from);
            self.cause = Cause::HandedOverTo(heard.from);
            self.become_backup(
                heard,
                TransitionKind::HandedOver,
                format!("handed over to gateway {}", heard.from),
                now,
                actions,
            );
            if self.shutting_down {
                actions.push(Action::Exit);
            }
            return;
        }
        if outranks(
            heard.priority,
            heard.from,
            self.priority(),
            self.settings.gateway_id,
        ) {
            self.become_backup(
                heard,
                TransitionKind::Outranked,
                format!("gateway {} outranks this one", heard.from),
                now,
                actions,
            );
        } else {
            // Two masters, and this one wins (say, after a partition
            // healed): claim the VIPs again at once.
            self.note(
                format!("lower-priority master {} heard; announcing", heard.from),
                now,
            );
            actions.push(Action::Announce);
            self.advertise_now(now, actions);
        }
    }

    fn health(&mut self, healthy: bool, reason: String, now: Instant, actions: &mut Vec<Action>) {
        if healthy == self.healthy {
            return;
        }
        self.healthy = healthy;
        match (healthy, self.role) {
            (false, Role::Master) => {
                self.handover = None;
                self.resign(TransitionKind::Health, reason, now, actions);
                // Stopping: the handover is moot, and the stop completes.
                if self.shutting_down {
                    actions.push(Action::Exit);
                }
            }
            (false, Role::Backup) => {
                self.master_down_at = None;
                self.transition(Role::Fault, TransitionKind::Health, reason, now);
                self.advertise_now(now, actions);
            }
            (true, Role::Fault) => {
                self.transition(Role::Backup, TransitionKind::Health, reason, now);
                self.master_down_at = Some(now + self.master_down_interval(self.settings.interval));
                self.advertise_now(now, actions);
            }
            _ => {}
        }
    }

    /// A master that was frozen longer than its lease has been fenced and
    /// most likely replaced: it steps down and takes part in the election
    /// again from BACKUP. A backup's timers are stale too: it waits a whole
    /// master-down interval before it may take over.
    fn stalled(&mut self, paused: Duration, now: Instant, actions: &mut Vec<Action>) {
        match self.role {
            Role::Master => {
                self.handover = None;
                self.cause = Cause::Other;
                self.transition(
                    Role::Backup,
                    TransitionKind::Stalled,
                    format!(
                        "paused for {} ms, past the lease: stepping down",
                        paused.as_millis()
                    ),
                    now,
                );
                self.master = None;
                self.master_down_at = Some(now + self.master_down_interval(self.settings.interval));
                actions.push(Action::ReleaseVips);
                self.advertise_now(now, actions);
                // A master stopping (handing over) holds nothing now: the
                // handover is moot, and the stop completes.
                if self.shutting_down {
                    actions.push(Action::Exit);
                }
            }
            Role::Backup => {
                self.master_down_at = Some(now + self.master_down_interval(self.settings.interval));
            }
            Role::Init | Role::Fault => {}
        }
    }

    fn shutdown(&mut self, now: Instant, actions: &mut Vec<Action>) {
        self.shutting_down = true;
        if self.role == Role::Master {
            if self.handover.is_some() || self.start_handover(now, actions).is_ok() {
                // Exit once the backup has taken over, or at the deadline.
                return;
            }
            self.resign(
                TransitionKind::Resigned,
                "shutting down with no backup".into(),
                now,
                actions,
            );
        } else {
            self.advertise_now(now, actions);
        }
        actions.push(Action::Exit);
    }

    /// MASTER → FAULT, or BACKUP on shutdown: one last advert as master
    /// with priority 0, so the backups take over after their skew only.
    fn resign(
        &mut self,
        kind: TransitionKind,
        reason: String,
        now: Instant,
        actions: &mut Vec<Action>,
    ) {
        let last = AdvertFields {
            role: Role::Master,
            priority: 0,
            handover_to: None,
            ..self.advert()
        };
        actions.retain(|a| !matches!(a, Action::Advertise(_)));
        actions.push(Action::Advertise(last));
        self.next_advert = Some(now + self.settings.interval);
        let to = if self.healthy {
            Role::Backup
        } else {
            Role::Fault
        };
        self.cause = Cause::Other;
        self.transition(to, kind, reason, now);
        actions.push(Action::ReleaseVips);
    }

    fn become_master(
        &mut self,
        kind: TransitionKind,
        reason: String,
        now: Instant,
        actions: &mut Vec<Action>,
    ) {
        self.transition(Role::Master, kind, reason, now);
        self.master_down_at = None;
        self.yielded_to = None;
        actions.push(Action::TakeVips);
        self.advertise_now(now, actions);
    }

    fn become_backup(
        &mut self,
        heard: Heard,
        kind: TransitionKind,
        reason: String,
        now: Instant,
        actions: &mut Vec<Action>,
    ) {
        if !matches!(self.cause, Cause::HandedOverTo(id) if id == heard.from) {
            self.cause = Cause::Other;
        }
        self.transition(Role::Backup, kind, reason, now);
        self.master = Some(heard.from);
        self.master_down_at = Some(now + self.master_down_interval(heard.interval));
        actions.push(Action::ReleaseVips);
        self.advertise_now(now, actions);
    }

    /// Sends an advert with the current fields, replacing one queued
    /// earlier in the same step.
    fn advertise_now(&mut self, now: Instant, actions: &mut Vec<Action>) {
        actions.retain(|a| !matches!(a, Action::Advertise(_)));
        actions.push(Action::Advertise(self.advert()));
        self.next_advert = Some(now + self.settings.interval);
    }

    /// Whether this gateway may become MASTER.
    fn eligible(&self) -> bool {
        self.healthy && !self.maintenance && !self.shutting_down
    }

    /// The backup a handover goes to: healthy, not in maintenance, heard
    /// recently; the highest priority, ties to the higher id.
    fn best_backup(&self, now: Instant) -> Option<u32> {
        self.peers
            .iter()
            .filter(|(_, p)| {
                p.role == Role::Backup
                    && p.healthy
                    && !p.maintenance
                    && p.priority > 0
                    && now.saturating_duration_since(p.last_seen) <= 3 * p.interval
            })
            .max_by_key(|(id, p)| (p.priority, **id))
            .map(|(id, _)| *id)
    }

    fn transition(
        &mut self,
        to: Role,
        kind: TransitionKind,
        reason: impl Into<String>,
        now: Instant,
    ) {
        let from = self.role;
        self.role = to;
        self.preemption = None;
        self.record(from, to, kind, reason.into(), now);
    }

    /// Records an event that changes no role (shown in the history).
    fn note(&mut self, reason: String, now: Instant) {
        self.record(self.role, self.role, TransitionKind::Note, reason, now);
    }

    fn record(&mut self, from: Role, to: Role, kind: TransitionKind, reason: String, at: Instant) {
        self.recorded += 1;
        if self.transitions.len() == MAX_TRANSITIONS {
            self.transitions.pop_front();
        }
        self.transitions.push_back(Transition {
            at,
            from,
            to,
            kind,
            reason,
        });
    }
}

/// Whether a gateway (`priority`, `id`) wins over (`mine`, `my_id`): the
/// higher priority, and on a tie the higher gateway id.
fn outranks(priority: u8, id: u32, mine: u8, my_id: u32) -> bool {
    (priority, id) > (mine, my_id)
}

#[cfg(test)]
mod tests {
    use super::*;

    const INTERVAL: Duration = Duration::from_millis(100);

    fn settings(id: u32, priority: u8) -> Settings {
        Settings {
            gateway_id: id,
            priority,
            interval: INTERVAL,
            preempt: true,
            preempt_delay: Duration::ZERO,
        }
    }

    fn ms(t0: Instant, n: u64) -> Instant {
        t0 + Duration::from_millis(n)
    }

    fn master(from: u32, priority: u8) -> Event {
        Event::Heard(Heard {
            from,
            role: Role::Master,
            priority,
            interval: INTERVAL,
            handover_to: None,
            maintenance: false,
            healthy: true,
            preempt: false,
            version: VERSION,
        })
    }

    fn backup(from: u32, priority: u8) -> Event {
        Event::Heard(Heard {
            role: Role::Backup,
            ..heard(master(from, priority))
        })
    }

    fn heard(event: Event) -> Heard {
        match event {
            Event::Heard(heard) => heard,
            other => panic!("not an advert: {other:?}"),
        }
    }

    fn started(id: u32, priority: u8, t0: Instant) -> Machine {
        let mut m = Machine::new(settings(id, priority));
        m.on_event(Event::Start, t0);
        m
    }

    /// Ticks every millisecond from `from` to `to`; returns when the role
    /// first became `role`, if it did.
    fn tick_until(m: &mut Machine, t0: Instant, from: u64, to: u64, role: Role) -> Option<u64> {
        (from..=to).find(|&n| {
            m.on_event(Event::Tick, ms(t0, n));
            m.role() == role
        })
    }

    fn penalty(points: u8, reason: &str) -> Event {
        Event::Penalty {
            points,
            reason: reason.to_owned(),
        }
    }

    fn advert(actions: &[Action]) -> Option<AdvertFields> {
        actions.iter().find_map(|a| match a {
            Action::Advertise(fields) => Some(*fields),
            _ => None,
        })
    }

    #[test]
    fn skew_and_master_down_follow_rfc_5798() {
        assert_eq!(
            Machine::skew(100, INTERVAL),
            Duration::from_nanos(60_937_500)
        );
        assert_eq!(Machine::skew(255, INTERVAL), Duration::from_nanos(390_625));
        let m = Machine::new(settings(1, 200));
        assert_eq!(
            m.master_down_interval(INTERVAL),
            Duration::from_micros(321_875)
        );
    }

    #[test]
    fn a_lone_gateway_becomes_master_after_the_master_down_interval() {
        let t0 = Instant::now();
        let mut m = Machine::new(settings(1, 100));
        let actions = m.on_event(Event::Start, t0);
        assert_eq!(m.role(), Role::Backup);
        assert_eq!(
            actions[0],
            Action::ReleaseVips,
            "a restarted agent drops old VIPs first"
        );
        assert_eq!(advert(&actions).unwrap().role, Role::Backup);
        // 3 x 100 ms + 60.9 ms.
        assert_eq!(tick_until(&mut m, t0, 1, 1000, Role::Master), Some(361));
        assert_eq!(m.transitions().last().unwrap().reason, "no master heard");
    }

    #[test]
    fn every_gateway_advertises_every_interval() {
        let t0 = Instant::now();
        let mut m = started(1, 100, t0);
        assert_eq!(m.next_deadline(), Some(ms(t0, 100)));
        assert!(m.on_event(Event::Tick, ms(t0, 99)).is_empty());
        let actions = m.on_event(Event::Tick, ms(t0, 100));
        assert_eq!(advert(&actions).unwrap().priority, 100);
    }

    #[test]
    fn a_backup_follows_a_higher_master_and_takes_over_when_it_falls_silent() {
        let t0 = Instant::now();
        let mut m = started(1, 100, t0);
        for n in (0..1000).step_by(100) {
            m.on_event(master(2, 200), ms(t0, n));
            m.on_event(Event::Tick, ms(t0, n + 50));
            assert_eq!(m.role(), Role::Backup);
        }
        assert_eq!(m.master(), Some(2));
        // Last advert at 900 ms: master down at 900 + 360.9.
        assert_eq!(tick_until(&mut m, t0, 951, 2000, Role::Master), Some(1261));
        assert_eq!(m.transitions().last().unwrap().reason, "master 2 down");
    }

    #[test]
    fn a_resigning_master_is_replaced_after_the_skew_only() {
        let t0 = Instant::now();
        let mut m = started(1, 100, t0);
        m.on_event(master(2, 200), ms(t0, 0));
        m.on_event(master(2, 0), ms(t0, 50));
        assert_eq!(tick_until(&mut m, t0, 51, 1000, Role::Master), Some(111));
    }

    /// A backup (id 1, priority 200) that has heard master 2 (priority
    /// 100), and that master.
    fn failback(t0: Instant) -> (Machine, Machine, Vec<Action>) {
        let mut low = started(2, 100, t0);
        low.on_event(Event::Tick, ms(t0, 400));
        assert_eq!(low.role(), Role::Master);
        let mut high = started(1, 200, ms(t0, 1000));
        // Followed without asking while it settles: a master-down interval
        // (321.875 ms) from its start.
        let early = high.on_event(master(2, 100), ms(t0, 1010));
        assert!(!advert(&early).is_some_and(|a| a.preempt), "{early:?}");
        assert_eq!(high.master(), Some(2));
        let asked = high.on_event(master(2, 100), ms(t0, 1330));
        (high, low, asked)
    }

    fn preempting(from: u32, priority: u8) -> Event {
        Event::Heard(Heard {
            preempt: true,
            ..heard(backup(from, priority))
        })
    }

    #[test]
    fn a_higher_backup_asks_the_lower_master_to_hand_over() {
        let t0 = Instant::now();
        let (mut high, mut low, asked) = failback(t0);
        // It follows the live master and asks at once.
        assert_eq!((high.role(), high.master()), (Role::Backup, Some(2)));
        let ask = advert(&asked).unwrap();
        assert_eq!((ask.role, ask.preempt), (Role::Backup, true));
        // Asks that do not count: no flag, a lower priority, maintenance,
        // a sick backup.
        for (why, event) in [
            ("no flag", backup(1, 200)),
            ("lower", preempting(1, 50)),
            (
                "maintenance",
                Event::Heard(Heard {
                    maintenance: true,
                    ..heard(preempting(1, 200))
                }),
            ),
            (
                "sick",
                Event::Heard(Heard {
                    healthy: false,
                    ..heard(preempting(1, 200))
                }),
            ),
        ] {
            let mut m = low.clone();
            let actions = m.on_event(event, ms(t0, 1331));
            assert_eq!(advert(&actions).map(|a| a.handover_to), None, "{why}");
            assert_eq!(m.advert().handover_to, None, "{why}");
        }
        // The master hands over as in a planned failover...
        let offer = advert(&low.on_event(preempting(1, 200), ms(t0, 1331))).unwrap();
        assert_eq!((offer.role, offer.handover_to), (Role::Master, Some(1)));
        assert!(
            low.transitions()
                .last()
                .unwrap()
                .reason
                .contains("asks for the VIPs"),
        );
        // ...the backup claims the VIPs at once...
        let handover = Event::Heard(Heard {
            handover_to: Some(1),
            ..heard(master(2, 100))
        });
        let claim = high.on_event(handover, ms(t0, 1332));
        assert_eq!(high.role(), Role::Master);
        assert_eq!(high.cause(), Cause::HandoverFrom(2));
        assert!(claim.contains(&Action::TakeVips));
        assert!(!advert(&claim).unwrap().preempt);
        // ...and the old master releases them when it hears the claim.
        let release = low.on_event(master(1, 200), ms(t0, 1333));
        assert_eq!(low.role(), Role::Backup);
        assert_eq!(low.cause(), Cause::HandedOverTo(1));
        assert!(release.contains(&Action::ReleaseVips));
    }

    #[test]
    fn a_master_that_does_not_hand_over_is_taken_over_from() {
        let t0 = Instant::now();
        let (mut high, _, _) = failback(t0);
        let mut took_over = None;
        for n in 1331..3000 {
            if n % 100 == 30 {
                high.on_event(master(2, 100), ms(t0, n));
            }
            high.on_event(Event::Tick, ms(t0, n));
            if high.role() == Role::Master {
                took_over.get_or_insert(n);
            }
        }
        // Twice the master-down interval (2 x 321.875 ms) after it asked,
        // though the master is heard all along.
        assert_eq!(took_over, Some(1974));
        assert_eq!(
            high.cause(),
            Cause::Takeover {
                master: Some(2),
                last_heard: Some(ms(t0, 1930)),
            }
        );
        let claim = high.transitions().find(|t| t.to == Role::Master).unwrap();
        assert!(claim.reason.contains("did not hand over"), "{claim:?}");
        // The lower master steps down on hearing it, as from any higher one.
        let (_, mut low, _) = failback(t0);
        low.on_event(master(1, 200), ms(t0, 1975));
        assert_eq!(low.role(), Role::Backup);
    }

    #[test]
    fn without_preemption_or_within_the_delay_a_lower_master_is_followed() {
        let t0 = Instant::now();
        let mut patient = Machine::new(Settings {
            preempt: false,
            ..settings(1, 200)
        });
        patient.on_event(Event::Start, t0);
        let mut delayed = Machine::new(Settings {
            preempt_delay: Duration::from_secs(1),
            ..settings(1, 200)
        });
        delayed.on_event(Event::Start, t0);
        let mut took_over = None;
        for n in 0..3000 {
            for m in [&mut patient, &mut delayed] {
                if n % 100 == 0 {
                    m.on_event(master(2, 100), ms(t0, n));
                }
                m.on_event(Event::Tick, ms(t0, n));
            }
            if delayed.role() == Role::Master {
                took_over.get_or_insert(n);
            }
        }
        assert_eq!(patient.role(), Role::Backup);
        assert!(!patient.advert().preempt);
        // Followed without asking until 1 s; asked at the first advert
        // after it, and taken over from (this master never hands over)
        // twice the master-down interval (2 x 321.875 ms) later.
        assert_eq!(took_over, Some(1644));
    }

    /// A master of the previous release: it writes version 1 adverts.
    fn old_master(from: u32, priority: u8) -> Event {
        Event::Heard(Heard {
            version: 1,
            ..heard(master(from, priority))
        })
    }

    #[test]
    fn during_a_rolling_upgrade_adverts_include_the_oldest_version_and_nobody_preempts() {
        let t0 = Instant::now();
        let mut new = started(1, 200, t0);
        assert_eq!(new.advert().oldest_version, VERSION, "alone: the newest");
        // An upgraded gateway outranking a previous-release master follows
        // it, writes its version too, and never asks or takes over: that
        // master would not answer, and two masters would hold the VIPs.
        for n in 0..3000 {
            if n % 100 == 0 {
                new.on_event(old_master(2, 100), ms(t0, n));
            }
            new.on_event(Event::Tick, ms(t0, n));
            assert_eq!(new.role(), Role::Backup, "{n} ms");
            let advert = new.advert();
            assert_eq!(
                (advert.oldest_version, advert.preempt),
                (1, false),
                "{n} ms"
            );
        }
        // The master is upgraded: version 2 from its first advert, and this
        // gateway asks for the VIPs at once.
        let asked = new.on_event(master(2, 100), ms(t0, 3000));
        let ask = advert(&asked).unwrap();
        assert_eq!((ask.oldest_version, ask.preempt), (VERSION, true));
        // While the location needs version 1 an upgraded gateway writes it
        // beside version 2: its newest is what counts, whichever copy
        // arrives last.
        let mut m = new.clone();
        m.on_event(old_master(2, 100), ms(t0, 3001));
        assert_eq!(m.advert().oldest_version, VERSION);

        // A previous-release backup keeps version 1 in while it is in the
        // peer table (4 of its intervals after its last advert), and a
        // pending ask is dropped, not turned into a takeover.
        let mut m = new.clone();
        m.on_event(
            Event::Heard(Heard {
                version: 1,
                ..heard(backup(3, 50))
            }),
            ms(t0, 3010),
        );
        assert_eq!((m.advert().oldest_version, m.advert().preempt), (1, false));
        for n in 3011..3400 {
            if n % 100 == 0 {
                m.on_event(master(2, 100), ms(t0, n));
            }
            m.on_event(Event::Tick, ms(t0, n));
            assert_eq!(m.role(), Role::Backup, "{n} ms");
        }
        m.on_event(Event::Tick, ms(t0, 3411));
        assert_eq!(m.advert().oldest_version, VERSION, "the old backup left");

        // Rolled back to the previous release, a gateway writes version 1
        // alone: a peer table's timeout later, that is its newest.
        let mut m = new.clone();
        for n in (3100..=3600).step_by(100) {
            m.on_event(old_master(2, 100), ms(t0, n));
            m.on_event(Event::Tick, ms(t0, n));
        }
        assert_eq!(m.advert().oldest_version, 1);

        // A gateway of the previous release writes version 1 even alone.
        let old = Machine::new(settings(3, 100)).speaking_at_most(1);
        assert_eq!(old.advert().oldest_version, 1);
    }

    /// Role changes: the role taken and why.
    type Changes = Vec<(Role, TransitionKind)>;

    /// The kinds of the role changes a machine recorded, oldest first.
    fn kinds(m: &Machine) -> Changes {
        m.transitions()
            .filter(|t| t.from != t.to)
            .map(|t| (t.to, t.kind))
            .collect()
    }

    #[test]
    fn each_role_change_says_why_from_a_bounded_set() {
        use TransitionKind::*;
        let t0 = Instant::now();
        let health = |healthy| Event::Health {
            healthy,
            reason: "wg0 down".into(),
        };
        // (what happened, the machine's role changes)
        let mut cases: Vec<(&str, Machine, Changes)> = Vec::new();
        let (a, mut b, _) = trio(t0);
        cases.push((
            "alone past the master-down interval",
            a.clone(),
            vec![(Role::Backup, Started), (Role::Master, MasterDown)],
        ));
        let mut handing = a.clone();
        handing.on_event(Event::Failover, ms(t0, 400));
        handing.on_event(master(2, 150), ms(t0, 401));
        cases.push((
            "a planned handover, on the old master",
            handing,
            vec![
                (Role::Backup, Started),
                (Role::Master, MasterDown),
                (Role::Backup, HandedOver),
            ],
        ));
        b.on_event(
            Event::Heard(Heard {
                handover_to: Some(2),
                ..heard(master(1, 200))
            }),
            ms(t0, 400),
        );
        cases.push((
            "a planned handover, on the new master",
            b,
            vec![(Role::Backup, Started), (Role::Master, HandoverFrom)],
        ));
        let mut outranked = a.clone();
        outranked.on_event(master(9, 250), ms(t0, 400));
        cases.push((
            "a higher master heard",
            outranked,
            vec![
                (Role::Backup, Started),
                (Role::Master, MasterDown),
                (Role::Backup, Outranked),
            ],
        ));
        let mut sick = a.clone();
        sick.on_event(health(false), ms(t0, 400));
        sick.on_event(health(true), ms(t0, 500));
        cases.push((
            "health fails, then passes",
            sick,
            vec![
                (Role::Backup, Started),
                (Role::Master, MasterDown),
                (Role::Fault, Health),
                (Role::Backup, Health),
            ],
        ));
        let mut paused = a.clone();
        let stall = Event::Stalled {
            paused: Duration::from_secs(2),
        };
        paused.on_event(stall, ms(t0, 2400));
        cases.push((
            "paused past the lease",
            paused,
            vec![
                (Role::Backup, Started),
                (Role::Master, MasterDown),
                (Role::Backup, Stalled),
            ],
        ));
        let mut alone = started(1, 100, t0);
        alone.on_event(Event::Tick, ms(t0, 400));
        alone.on_event(Event::Shutdown, ms(t0, 500));
        cases.push((
            "stopping with no backup",
            alone,
            vec![
                (Role::Backup, Started),
                (Role::Master, MasterDown),
                (Role::Backup, Resigned),
            ],
        ));
        let (mut high, ..) = failback(t0);
        for n in 1331..2000 {
            if n % 100 == 30 {
                high.on_event(master(2, 100), ms(t0, n));
            }
            high.on_event(Event::Tick, ms(t0, n));
        }
        cases.push((
            "a preemption the master ignores",
            high,
            vec![
                (Role::Backup, Started),
                (Role::Master, PreemptionUnanswered),
            ],
        ));
        for (what, machine, expected) in cases {
            assert_eq!(kinds(&machine), expected, "{what}");
        }
        let names: std::collections::BTreeSet<&str> = [
            Started,
            MasterDown,
            PreemptionUnanswered,
            HandoverFrom,
            HandedOver,
            Outranked,
            Health,
            Stalled,
            Resigned,
            Note,
        ]
        .iter()
        .map(|k| k.name())
        .collect();
        assert_eq!(names.len(), 10, "each kind has its own name");
    }

    #[test]
    fn ties_go_to_the_higher_gateway_id() {
        let t0 = Instant::now();
        let mut low_id = started(1, 100, t0);
        let mut high_id = started(2, 100, t0);
        low_id.on_event(Event::Tick, ms(t0, 400));
        high_id.on_event(Event::Tick, ms(t0, 400));
        assert_eq!(
            (low_id.role(), high_id.role()),
            (Role::Master, Role::Master)
        );
        let actions = high_id.on_event(master(1, 100), ms(t0, 401));
        assert_eq!(high_id.role(), Role::Master);
        assert!(actions.contains(&Action::Announce), "{actions:?}");
        low_id.on_event(master(2, 100), ms(t0, 401));
        assert_eq!(low_id.role(), Role::Backup);
    }

    #[test]
    fn a_master_hearing_a_lower_master_announces_at_once() {
        let t0 = Instant::now();
        let mut m = started(1, 200, t0);
        m.on_event(Event::Tick, ms(t0, 400));
        let actions = m.on_event(master(2, 100), ms(t0, 450));
        assert_eq!(actions[0], Action::Announce);
        assert_eq!(advert(&actions).unwrap().role, Role::Master);
        assert_eq!(m.role(), Role::Master);
    }

    #[test]
    fn an_unhealthy_master_resigns_at_once_and_comes_back_as_backup() {
        let t0 = Instant::now();
        let mut m = started(1, 100, t0);
        m.on_event(Event::Tick, ms(t0, 400));
        let actions = m.on_event(
            Event::Health {
                healthy: false,
                reason: "public link down".into(),
            },
            ms(t0, 500),
        );
        assert_eq!(m.role(), Role::Fault);
        let last = advert(&actions).unwrap();
        assert_eq!((last.role, last.priority), (Role::Master, 0));
        assert_eq!(actions.last(), Some(&Action::ReleaseVips));
        // Faulty: never master, and adverts say priority 0.
        assert_eq!(tick_until(&mut m, t0, 501, 2000, Role::Master), None);
        assert_eq!(m.advert().priority, 0);
        m.on_event(
            Event::Health {
                healthy: true,
                reason: "public link up".into(),
            },
            ms(t0, 2000),
        );
        assert_eq!(m.role(), Role::Backup);
        assert_eq!(tick_until(&mut m, t0, 2001, 3000, Role::Master), Some(2361));
    }

    #[test]
    fn a_master_announces_again_when_a_silent_gateway_is_heard_as_backup() {
        let t0 = Instant::now();
        let mut m = started(1, 200, t0);
        for n in [0, 100, 200, 300] {
            m.on_event(backup(2, 100), ms(t0, n));
        }
        m.on_event(Event::Tick, ms(t0, 330));
        assert_eq!(m.role(), Role::Master);
        // Heard regularly: nothing to announce.
        let actions = m.on_event(backup(2, 100), ms(t0, 400));
        assert!(!actions.contains(&Action::Announce), "{actions:?}");
        // A partition: 2 took over on its side, then heard this master
        // first and stepped down. Its first advert after the silence is
        // BACKUP, and the segment may still point at it.
        m.on_event(Event::Tick, ms(t0, 1000));
        let actions = m.on_event(backup(2, 100), ms(t0, 1000));
        assert_eq!(actions, [Action::Announce]);
        assert_eq!(
            m.transitions().last().unwrap().reason,
            "gateway 2 heard after a silence; announcing"
        );
        // Still in the table but silent for 3 intervals: the same.
        let actions = m.on_event(backup(2, 100), ms(t0, 1300));
        assert_eq!(actions, [Action::Announce]);
        // A backup has nothing to announce.
        let mut b = started(3, 100, t0);
        let actions = b.on_event(backup(2, 50), ms(t0, 1000));
        assert!(actions.is_empty(), "{actions:?}");
    }

    /// A master (id 1, priority 200) with backups 2 (150) and 3 (120).
    fn trio(t0: Instant) -> (Machine, Machine, Machine) {
        let mut a = started(1, 200, t0);
        let mut b = started(2, 150, t0);
        let mut c = started(3, 120, t0);
        a.on_event(Event::Tick, ms(t0, 330));
        assert_eq!(a.role(), Role::Master);
        for m in [&mut b, &mut c] {
            m.on_event(master(1, 200), ms(t0, 330));
        }
        a.on_event(backup(2, 150), ms(t0, 331));
        a.on_event(backup(3, 120), ms(t0, 331));
        (a, b, c)
    }

    #[test]
    fn a_planned_failover_hands_over_to_the_best_backup() {
        let t0 = Instant::now();
        let (mut a, mut b, mut c) = trio(t0);
        let actions = a.on_event(Event::Failover, ms(t0, 400));
        assert_eq!(answer(&actions), Ok(Some(2)));
        let offer = advert(&actions).unwrap();
        assert_eq!((offer.role, offer.handover_to), (Role::Master, Some(2)));
        assert_eq!(a.role(), Role::Master, "the old master keeps serving");

        let handover = Event::Heard(Heard {
            handover_to: Some(2),
            ..heard(master(1, 200))
        });
        c.on_event(handover.clone(), ms(t0, 401));
        assert_eq!(c.role(), Role::Backup, "only the named backup claims");
        let actions = b.on_event(handover, ms(t0, 401));
        assert_eq!(b.role(), Role::Master);
        assert_eq!(actions[0], Action::TakeVips);
        assert_eq!(b.cause(), Cause::HandoverFrom(1));
        assert_eq!(
            b.transitions().last().unwrap().reason,
            "handover from gateway 1"
        );

        // The old master releases only once it hears the new one.
        let actions = a.on_event(master(2, 150), ms(t0, 402));
        assert_eq!(a.role(), Role::Backup);
        assert_eq!(actions[0], Action::ReleaseVips);
        assert_eq!(a.cause(), Cause::HandedOverTo(2));
        c.on_event(master(2, 150), ms(t0, 402));
        assert_eq!(c.master(), Some(2));

        // The old master does not preempt back while the new one lives...
        for n in (500..2000).step_by(100) {
            a.on_event(master(2, 150), ms(t0, n));
            a.on_event(Event::Tick, ms(t0, n + 50));
        }
        assert_eq!(a.role(), Role::Backup);
        // ...and takes over when it dies.
        assert_eq!(tick_until(&mut a, t0, 2000, 3000, Role::Master), Some(2222));
    }

    #[test]
    fn a_handover_offer_arriving_after_the_claim_does_not_take_it_back() {
        let t0 = Instant::now();
        let (mut a, mut b, _) = trio(t0);
        a.on_event(Event::Failover, ms(t0, 400));
        let offer = Event::Heard(Heard {
            handover_to: Some(2),
            ..heard(master(1, 200))
        });
        b.on_event(offer.clone(), ms(t0, 401));
        assert_eq!(b.role(), Role::Master);
        // The old master offered again before it heard the new one (or the
        // segment delayed its offer): the new master stays and answers at
        // once, so the old one steps down.
        for late in [405, 450, 520] {
            let actions = b.on_event(offer.clone(), ms(t0, late));
            assert_eq!(b.role(), Role::Master, "at {late} ms");
            let answer = advert(&actions).expect("an advert at once");
            assert_eq!((answer.role, answer.handover_to), (Role::Master, None));
        }
        a.on_event(master(2, 150), ms(t0, 521));
        assert_eq!(a.role(), Role::Backup);
        // A higher-priority master that is not handing over still wins.
        b.on_event(master(1, 200), ms(t0, 600));
        assert_eq!(b.role(), Role::Backup);
    }

    #[test]
    fn a_backup_whose_master_steps_down_follows_the_master_that_claimed() {
        let t0 = Instant::now();
        let (mut a, _, mut c) = trio(t0);
        a.on_event(Event::Failover, ms(t0, 400));
        // The new master's claim reaches the third gateway before the old
        // master's offer, which the segment delayed; then the old master
        // steps down.
        c.on_event(master(2, 150), ms(t0, 402));
        let offer = Event::Heard(Heard {
            handover_to: Some(2),
            ..heard(master(1, 200))
        });
        c.on_event(offer, ms(t0, 403));
        assert_eq!(c.master(), Some(1));
        c.on_event(backup(1, 200), ms(t0, 404));
        assert_eq!(c.master(), Some(2), "the master that claimed");
        // No takeover after the skew only: the new master is deemed down a
        // master-down interval after it was last heard.
        let down = 402 + c.master_down_interval(INTERVAL).as_millis() as u64;
        assert_eq!(
            tick_until(&mut c, t0, 405, 2000, Role::Master),
            Some(down + 1)
        );
    }

    #[test]
    fn a_backup_whose_master_resigns_with_no_other_takes_over_after_the_skew() {
        let t0 = Instant::now();
        let (_, mut b, _) = trio(t0);
        b.on_event(master(1, 0), ms(t0, 400));
        assert_eq!(b.master(), None);
        let skew = Machine::skew(150, INTERVAL).as_millis() as u64;
        assert_eq!(
            tick_until(&mut b, t0, 401, 2000, Role::Master),
            Some(400 + skew + 1)
        );
    }

    #[test]
    fn a_failover_needs_a_master_and_a_healthy_backup() {
        let t0 = Instant::now();
        let mut lone = started(1, 100, t0);
        assert_eq!(
            answer(&lone.on_event(Event::Failover, t0)).unwrap_err(),
            HandoverError::NotMaster(Role::Backup)
        );
        lone.on_event(Event::Tick, ms(t0, 400));
        assert_eq!(
            answer(&lone.on_event(Event::Failover, ms(t0, 400))).unwrap_err(),
            HandoverError::NoBackup
        );
        let sick = Event::Heard(Heard {
            healthy: false,
            ..heard(backup(2, 150))
        });
        lone.on_event(sick, ms(t0, 410));
        let resting = Event::Heard(Heard {
            maintenance: true,
            ..heard(backup(3, 150))
        });
        lone.on_event(resting, ms(t0, 410));
        assert_eq!(
            answer(&lone.on_event(Event::Failover, ms(t0, 420))).unwrap_err(),
            HandoverError::NoBackup
        );
        lone.on_event(backup(4, 10), ms(t0, 430));
        assert_eq!(
            answer(&lone.on_event(Event::Failover, ms(t0, 440)))
                .unwrap()
                .unwrap(),
            4
        );
        assert_eq!(
            answer(&lone.on_event(Event::Failover, ms(t0, 450))).unwrap_err(),
            HandoverError::InProgress(4)
        );
    }

    #[test]
    fn a_handover_that_is_not_taken_times_out() {
        let t0 = Instant::now();
        let (mut a, ..) = trio(t0);
        a.on_event(Event::Failover, ms(t0, 400));
        let timed_out = tick_until(&mut a, t0, 401, 1000, Role::Master);
        assert_eq!(timed_out, Some(401));
        a.on_event(Event::Tick, ms(t0, 800));
        assert!(
            a.transitions()
                .last()
                .unwrap()
                .reason
                .contains("handover to gateway 2 timed out"),
            "{:?}",
            a.transitions().last()
        );
        assert_eq!(a.advert().handover_to, None);
    }

    #[test]
    fn maintenance_keeps_a_gateway_backup() {
        let t0 = Instant::now();
        let mut m = started(1, 100, t0);
        m.on_event(Event::Maintenance { on: true }, t0);
        assert!(m.advert().maintenance);
        assert_eq!(tick_until(&mut m, t0, 1, 2000, Role::Master), None);
        m.on_event(Event::Maintenance { on: false }, ms(t0, 2000));
        assert_eq!(tick_until(&mut m, t0, 2001, 3000, Role::Master), Some(2361));
    }

    #[test]
    fn maintenance_on_a_master_hands_over_or_is_refused() {
        let t0 = Instant::now();
        let mut lone = started(1, 100, t0);
        lone.on_event(Event::Tick, ms(t0, 400));
        assert_eq!(
            answer(&lone.on_event(Event::Maintenance { on: true }, ms(t0, 400))).unwrap_err(),
            HandoverError::NoBackup
        );
        assert!(!lone.maintenance());

        let (mut a, ..) = trio(t0);
        let actions = a.on_event(Event::Maintenance { on: true }, ms(t0, 400));
        assert_eq!(advert(&actions).unwrap().handover_to, Some(2));
        a.on_event(master(2, 150), ms(t0, 401));
        assert_eq!(a.role(), Role::Backup);
    }

    #[test]
    fn a_stopping_master_paused_past_its_lease_steps_down_and_exits() {
        let t0 = Instant::now();
        let (mut a, ..) = trio(t0);
        let actions = a.on_event(Event::Shutdown, ms(t0, 400));
        assert!(!actions.contains(&Action::Exit));
        let paused = Duration::from_secs(2);
        let actions = a.on_event(Event::Stalled { paused }, ms(t0, 2400));
        assert_eq!(a.role(), Role::Backup);
        assert_eq!(actions.first(), Some(&Action::ReleaseVips));
        assert_eq!(actions.last(), Some(&Action::Exit));
    }

    #[test]
    fn a_stopping_master_whose_health_fails_while_handing_over_exits() {
        let t0 = Instant::now();
        let (mut a, ..) = trio(t0);
        a.on_event(Event::Shutdown, ms(t0, 400));
        let health = Event::Health {
            healthy: false,
            reason: "link down".into(),
        };
        let actions = a.on_event(health, ms(t0, 450));
        assert_eq!(a.role(), Role::Fault);
        assert!(actions.contains(&Action::ReleaseVips), "{actions:?}");
        assert_eq!(actions.last(), Some(&Action::Exit));
    }

    #[test]
    fn shutdown_hands_over_then_exits() {
        let t0 = Instant::now();
        let (mut a, ..) = trio(t0);
        let actions = a.on_event(Event::Shutdown, ms(t0, 400));
        assert!(!actions.contains(&Action::Exit));
        assert_eq!(advert(&actions).unwrap().handover_to, Some(2));
        let actions = a.on_event(master(2, 150), ms(t0, 401));
        assert_eq!(actions.first(), Some(&Action::ReleaseVips));
        assert_eq!(actions.last(), Some(&Action::Exit));
    }

    #[test]
    fn shutdown_without_a_backup_resigns_with_priority_zero() {
        let t0 = Instant::now();
        let mut m = started(1, 100, t0);
        m.on_event(Event::Tick, ms(t0, 400));
        let actions = m.on_event(Event::Shutdown, ms(t0, 500));
        let last = advert(&actions).unwrap();
        assert_eq!((last.role, last.priority), (Role::Master, 0));
        assert_eq!(&actions[1..], [Action::ReleaseVips, Action::Exit]);
    }

    #[test]
    fn shutdown_whose_handover_times_out_resigns() {
        let t0 = Instant::now();
        let (mut a, ..) = trio(t0);
        a.on_event(Event::Shutdown, ms(t0, 400));
        let mut exit = None;
        for n in 401..1000 {
            let actions = a.on_event(Event::Tick, ms(t0, n));
            if actions.contains(&Action::Exit) {
                assert!(actions.contains(&Action::ReleaseVips));
                exit = Some(n);
                break;
            }
        }
        assert_eq!(
            exit,
            Some(722),
            "at the handover deadline (master-down interval)"
        );
    }

    #[test]
    fn a_backup_shuts_down_at_once() {
        let t0 = Instant::now();
        let mut m = started(1, 100, t0);
        let actions = m.on_event(Event::Shutdown, ms(t0, 10));
        assert_eq!(advert(&actions).unwrap().priority, 0);
        assert_eq!(actions.last(), Some(&Action::Exit));
    }

    #[test]
    fn silent_peers_leave_the_table_and_history_is_bounded() {
        let t0 = Instant::now();
        let mut m = started(1, 100, t0);
        m.on_event(backup(2, 50), t0);
        m.on_event(Event::Tick, ms(t0, 400));
        assert!(m.peers().contains_key(&2));
        m.on_event(Event::Tick, ms(t0, 401));
        assert!(m.peers().is_empty());

        let mut m = started(1, 100, t0);
        for n in 0..(MAX_TRANSITIONS as u64 + 5) {
            m.on_event(Event::Maintenance { on: n % 2 == 0 }, ms(t0, n));
        }
        assert_eq!(m.transitions().count(), MAX_TRANSITIONS);
        assert_eq!(m.transitions().last().unwrap().reason, "maintenance on");
    }

    #[test]
    fn a_master_paused_past_its_lease_steps_down_and_a_backup_waits() {
        let t0 = Instant::now();
        let mut m = started(1, 200, t0);
        m.on_event(Event::Tick, ms(t0, 400));
        assert_eq!(m.role(), Role::Master);
        let paused = Event::Stalled {
            paused: Duration::from_secs(2),
        };
        let actions = m.on_event(paused.clone(), ms(t0, 2400));
        assert_eq!(m.role(), Role::Backup);
        assert_eq!(actions[0], Action::ReleaseVips);
        assert!(
            m.transitions()
                .last()
                .unwrap()
                .reason
                .starts_with("paused for 2000 ms"),
            "{:?}",
            m.transitions().last()
        );
        // It may win again, but only through a whole master-down interval.
        assert_eq!(tick_until(&mut m, t0, 2401, 4000, Role::Master), Some(2722));

        let mut b = started(2, 100, t0);
        b.on_event(master(1, 200), ms(t0, 0));
        // Frozen past its master-down time: no instant takeover on waking.
        b.on_event(paused, ms(t0, 2000));
        b.on_event(Event::Tick, ms(t0, 2001));
        assert_eq!(b.role(), Role::Backup);
        assert_eq!(tick_until(&mut b, t0, 2002, 3000, Role::Master), Some(2361));
    }

    #[test]
    fn a_penalty_lowers_the_priority_and_a_backup_that_asks_gets_the_vips() {
        let t0 = Instant::now();
        let mut a = started(1, 200, t0);
        a.on_event(Event::Tick, ms(t0, 400));
        assert_eq!(a.role(), Role::Master);
        let actions = a.on_event(penalty(150, "uplink eth1 down"), ms(t0, 410));
        assert_eq!(a.priority(), 50);
        assert_eq!(advert(&actions).unwrap().priority, 50);
        assert!(
            a.transitions()
                .last()
                .unwrap()
                .reason
                .contains("priority 200 -> 50")
        );
        // A backup of priority 100 now outranks it: it asks for the VIPs,
        // and the master hands them over.
        let mut b = started(2, 100, t0);
        b.on_event(master(1, 200), ms(t0, 300));
        assert!(!b.advert().preempt);
        let ask = advert(&b.on_event(master(1, 50), ms(t0, 500))).unwrap();
        assert!(ask.preempt);
        let preempting = Event::Heard(Heard {
            preempt: true,
            ..heard(backup(2, 100))
        });
        let offer = advert(&a.on_event(preempting, ms(t0, 501))).unwrap();
        assert_eq!(offer.handover_to, Some(2));
        let handover = Event::Heard(Heard {
            handover_to: Some(2),
            ..heard(master(1, 50))
        });
        b.on_event(handover, ms(t0, 502));
        assert_eq!(
            (b.role(), b.cause()),
            (Role::Master, Cause::HandoverFrom(1))
        );
        a.on_event(master(2, 100), ms(t0, 503));
        assert_eq!(
            (a.role(), a.cause()),
            (Role::Backup, Cause::HandedOverTo(2))
        );
        // Never below 1; and back to normal when the check passes again.
        a.on_event(penalty(255, "everything down"), ms(t0, 2100));
        assert_eq!(a.priority(), 1);
        a.on_event(penalty(0, "all tracked checks pass"), ms(t0, 2200));
        assert_eq!(a.priority(), 200);
        assert!(a.on_event(penalty(0, "again"), ms(t0, 2300)).is_empty());
        // It handed over because it was asked: with its priority back, it
        // asks in turn.
        let ask = advert(&a.on_event(master(2, 100), ms(t0, 2400))).unwrap();
        assert!(ask.preempt);
    }

    #[test]
    fn a_takeover_names_the_master_and_when_it_was_last_heard() {
        let t0 = Instant::now();
        let mut b = started(2, 100, t0);
        b.on_event(master(1, 200), ms(t0, 100));
        b.on_event(master(1, 200), ms(t0, 200));
        assert_eq!(b.cause(), Cause::Other);
        let took_over = tick_until(&mut b, t0, 201, 2000, Role::Master);
        assert_eq!(took_over, Some(561));
        assert_eq!(
            b.cause(),
            Cause::Takeover {
                master: Some(1),
                last_heard: Some(ms(t0, 200)),
            }
        );
        // Stepping down for a higher master forgets it.
        b.on_event(master(3, 255), ms(t0, 600));
        assert_eq!(b.role(), Role::Backup);
        assert_eq!(b.cause(), Cause::Other);
    }

    #[test]
    fn own_adverts_and_adverts_before_start_are_ignored() {
        let t0 = Instant::now();
        let mut m = Machine::new(settings(1, 100));
        assert!(m.on_event(master(2, 200), t0).is_empty());
        m.on_event(Event::Start, t0);
        m.on_event(master(1, 255), t0);
        assert!(m.peers().is_empty());
    }
}
