//! One gateway as its HA agent runs it (`gateway/src/ha/agent.rs`), with
//! the sockets, tasks and kernel replaced by plain state.
//!
//! A [`Node`] is the machine. Its [`Kernel`] outlives the daemon: the VIPs
//! on the public interface, the fence's lease, the egress guard's mode and
//! the director; so does its state directory's epoch file, from which each
//! start chooses its epoch by the daemon's rule ([`epoch::next`]). While the daemon runs it has a [`Process`]: the real
//! election [`Machine`] and continuity [`Controller`], the replay guard,
//! the epoch and the sequence. The process steps as the agent's loop does:
//! on each wake the pause check first (a gap since the last wake longer
//! than the lease is `Event::Stalled`), then the one input (a timer, an
//! advert, a command), then the machine's actions in order (an advert
//! renews the lease; the VIPs move with the controller's effects around
//! them), then, in director mode, the controller follows the location.

use std::{
    collections::{BTreeMap, VecDeque},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::Path,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use tidegate_gateway::{
    continuity::{self, Controller, ControllerConfig, Effect, Input as Step},
    director::{DirectorConfig, DirectorState, Mac},
    ha::{
        advert::{AdvertError, AdvertKey, VERSION},
        election::{Election, Identity, PeerExtra},
        epoch,
        machine::{Action, Cause, Event, PeerView, Role, Settings},
        sharing::table::EndpointView,
    },
    xdp::Ownership,
};

use crate::{
    forge::Forgery,
    network::Datagram,
    scenario::{Gateway, KICK_RATE, Mode, Scenario},
    world::Trace,
};

/// The simulated location.
pub const LOCATION_ID: u32 = 7;
/// Its VIPs.
pub const VIPS: [IpAddr; 2] = [
    IpAddr::V4(Ipv4Addr::new(198, 51, 100, 100)),
    IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x100)),
];
/// Entries of the director's Maglev table (a small prime: the table is
/// built on every change of the location).
pub const TABLE_SIZE: u32 = 251;
/// Most adverts a process remembers having accepted, for replays.
const REMEMBERED: usize = 8;

/// The location's shared key.
pub fn key() -> AdvertKey {
    AdvertKey::new(b"the simulated location's key".to_vec())
}

/// Gateway `id`'s Ethernet address.
pub fn mac_of(id: u32) -> Mac {
    let [.., a, b] = id.to_be_bytes();
    [2, 0, 0, 0, a, b]
}

/// A renewal of the fence's lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    pub until: Instant,
    pub holds_vips: bool,
}

/// What the kernel of a gateway holds, whether its daemon runs or not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kernel {
    /// The VIPs are on the public interface.
    pub vips_up: bool,
    /// The fence's lease as last renewed; `None` until the first renewal.
    pub lease: Option<Lease>,
    /// The egress guard's mode.
    pub ownership: Ownership,
    /// The XDP director's state as last written.
    pub director: Option<DirectorState>,
}

impl Kernel {
    fn new() -> Self {
        Self {
            vips_up: false,
            lease: None,
            ownership: Ownership::None,
            director: None,
        }
    }

    /// The lease holds: the egress guard and the fence let traffic through.
    pub fn lease_holds(&self, now: Instant) -> bool {
        self.lease.is_some_and(|lease| now < lease.until)
    }

    /// The gateway answers for the VIPs: they are on its public interface
    /// and the fence lets ARP and neighbour solicitations for them in.
    pub fn holds_vips(&self, now: Instant) -> bool {
        self.vips_up
            && self
                .lease
                .is_some_and(|lease| lease.holds_vips && now < lease.until)
    }

    /// The egress guard lets WireGuard out to every client.
    pub fn sends_to_all(&self, now: Instant) -> bool {
        self.ownership == Ownership::All && self.lease_holds(now)
    }

    /// The state in words, times relative to `now`.
    pub fn describe(&self, now: Instant) -> String {
        let lease = match self.lease {
            None => "none".to_owned(),
            Some(lease) => format!(
                "{} ms {}{}",
                ms_between(lease.until, now),
                if now < lease.until { "left" } else { "lapsed" },
                if lease.holds_vips {
                    ", holding the VIPs"
                } else {
                    ""
                }
            ),
        };
        let director = self.director.as_ref().map(|d| {
            let on = if d.on { "on" } else { "off" };
            format!(", director {on} {:?}", d.table_members())
        });
        format!(
            "VIPs {}, lease {lease}, egress {:?}{}",
            if self.vips_up { "up" } else { "down" },
            self.ownership,
            director.unwrap_or_default()
        )
    }
}

/// The time between `at` and `now` in whole ms, whichever is first.
fn ms_between(at: Instant, now: Instant) -> u128 {
    if at >= now {
        (at - now).as_millis()
    } else {
        (now - at).as_millis()
    }
}

/// Why the VIPs moved, in words (times relative to `now`).
pub fn describe_cause(cause: Cause, now: Instant) -> String {
    match cause {
        Cause::Other => "other".into(),
        Cause::Takeover { master, last_heard } => format!(
            "takeover from master {master:?}, a master last heard {}",
            last_heard.map_or("never".into(), |at| format!(
                "{} ms before",
                ms_between(at, now)
            ))
        ),
        Cause::HandoverFrom(id) => format!("handover from {id}"),
        Cause::HandedOverTo(id) => format!("handed over to {id}"),
    }
}

/// An operator's or the health monitor's request to the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Failover,
    Maintenance(bool),
    Drain(bool),
    Health(bool),
    Penalty(u8),
    /// SIGTERM: hand over or resign, then exit.
    Shutdown,
}

/// What wakes the agent besides its timer.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Input {
    Datagram(Datagram),
    Command(Command),
}

/// What a gateway believes about the election: a forged advert must
/// change none of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Belief {
    pub role: Role,
    pub master: Option<u32>,
    pub peers: BTreeMap<u32, PeerView>,
    pub extras: BTreeMap<u32, PeerExtra>,
}

impl Belief {
    /// The belief in words, times relative to `now`.
    pub fn describe(&self, now: Instant) -> String {
        let peers: Vec<String> = self
            .peers
            .iter()
            .map(|(id, p)| {
                let ago = ms_between(p.last_seen, now);
                format!("{id}: {} p{} {ago} ms ago", p.role, p.priority)
            })
            .collect();
        format!(
            "{} following {:?}, peers [{}], extras {:?}",
            self.role,
            self.master,
            peers.join(", "),
            self.extras
        )
    }
}

/// How a gateway took a forged advert.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub forgery: Forgery,
    /// `Ok` if it was believed.
    pub outcome: Result<(), AdvertError>,
    pub before: Belief,
    pub after: Belief,
}

/// This gateway took the VIPs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Took {
    pub cause: Cause,
    /// It was asking the master to hand over (preemption) just before.
    pub was_asking: bool,
}

/// What a wake produced, for the segment and the invariants.
#[derive(Debug, Default)]
pub struct Outbox {
    /// Adverts sent, in order.
    pub sent: Vec<Vec<u8>>,
    /// Adverts accepted: (sender, epoch, sequence).
    pub heard: Vec<(u32, u64, u64)>,
    pub took: Option<Took>,
    /// How a forged advert was taken.
    pub verdict: Option<Verdict>,
}

/// What a process is for.
#[derive(Debug, Clone)]
struct Config {
    id: u32,
    mac: Mac,
    election: Settings,
    controller: ControllerConfig,
    key: AdvertKey,
}

/// The daemon's HA agent while it runs.
#[derive(Debug)]
pub struct Process {
    config: Config,
    /// The election and its adverts, as the agent runs them.
    pub election: Election,
    controller: Controller,
    /// When the loop last ran: a longer gap than the lease is a pause.
    last_wake: Instant,
    /// When the loop wakes with no input: the next deadline.
    timer: Instant,
    /// SIGTERM was taken.
    stopping: bool,
    /// The loop ended; the agent waits out its grace, then the daemon
    /// stops.
    exited: bool,
    /// Waiting out the grace: when the agent next renews the lease.
    grace_renewal: Instant,
    /// The machine was asking the master to hand over, as this wake began.
    was_asking: bool,
    /// Adverts accepted lately, oldest first.
    pub accepted: VecDeque<Vec<u8>>,
}

/// One gateway: its kernel and, while it runs, its daemon.
#[derive(Debug)]
pub struct Node {
    pub id: u32,
    config: Config,
    pub process: Option<Process>,
    pub kernel: Kernel,
    /// The daemon is paused (SIGSTOP).
    pub frozen: bool,
    /// What reached the daemon and waits to be read, with when.
    inbox: VecDeque<(Instant, Input)>,
    /// The wall clock's offset from the simulation's (ms).
    pub wall_offset_ms: i64,
    /// The epoch file in the state directory: the last start's epoch.
    epoch_file: Option<u64>,
    /// The newest advert version the installed release reads and writes.
    release: u8,
}

impl Node {
    /// Gateway `gateway` of `scenario`, not started.
    pub fn new(gateway: &Gateway, scenario: &Scenario) -> Self {
        let director = (scenario.mode == Mode::Director).then_some(DirectorConfig {
            table_size: TABLE_SIZE,
            max_sessions: 1024,
        });
        let config = Config {
            id: gateway.id,
            mac: mac_of(gateway.id),
            election: Settings {
                gateway_id: gateway.id,
                priority: gateway.priority,
                interval: scenario.interval,
                preempt: gateway.preempt,
                preempt_delay: gateway.preempt_delay,
            },
            controller: ControllerConfig {
                gateway_id: gateway.id,
                mac: mac_of(gateway.id),
                settings: continuity::Settings {
                    kick_rate: KICK_RATE,
                    kick_window: Duration::from_secs(180),
                    handover_window: scenario.handover_window,
                    endpoint_refresh: Duration::from_secs(30),
                    endpoint_max_age: Duration::from_secs(600),
                },
                director,
                wireguard: true,
            },
            key: key(),
        };
        Self {
            id: gateway.id,
            config,
            process: None,
            kernel: Kernel::new(),
            frozen: false,
            inbox: VecDeque::new(),
            wall_offset_ms: 0,
            epoch_file: None,
            release: gateway.release,
        }
    }

    /// The daemon runs and has not ended its loop.
    pub fn running(&self) -> bool {
        self.process.as_ref().is_some_and(|p| !p.exited)
    }

    /// The daemon runs, is not paused and has not ended its loop: it
    /// advertises and hears adverts.
    pub fn live(&self) -> bool {
        self.running() && !self.frozen
    }

    /// SIGTERM was taken and the daemon has not stopped yet.
    pub fn stopping(&self) -> bool {
        self.process.as_ref().is_some_and(|p| p.stopping)
    }

    /// SIGTERM was taken, or waits to be read.
    pub fn stop_pending(&self) -> bool {
        self.stopping()
            || self
                .inbox
                .iter()
                .any(|(_, input)| *input == Input::Command(Command::Shutdown))
    }

    /// The role, while the daemon runs.
    pub fn role(&self) -> Option<Role> {
        self.process.as_ref().map(|p| p.election.machine().role())
    }

    /// The daemon starts at `now`, its wall clock reading `wall`, with the
    /// endpoint table `endpoints` (endpoint sharing has converged, so the
    /// table is there from the first step). As `Agent::start` and the top
    /// of `Agent::run`.
    pub fn start(
        &mut self,
        now: Instant,
        wall: SystemTime,
        endpoints: Arc<EndpointView>,
        out: &mut Outbox,
        trace: &mut Trace,
    ) {
        // main: the epoch is chosen, and on disk, before the agent starts.
        let clock_ms = wall
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis() as u64;
        let epoch = epoch::next(Path::new(epoch::FILE_NAME), clock_ms, self.epoch_file)
            .expect("an epoch below u64::MAX");
        self.epoch_file = Some(epoch);
        let config = self.config.clone();
        // Agent::start: VIPs an earlier run left on the interface go first.
        self.kernel.vips_up = false;
        // A new datapath: the lease lapsed until the first renewal, the
        // egress guard owning no client, the director off.
        self.kernel.lease = None;
        self.kernel.ownership = Ownership::None;
        self.kernel.director = None;
        self.inbox.clear();
        self.frozen = false;
        let identity = Identity {
            location_id: LOCATION_ID,
            key: config.key.clone(),
            mac: config.mac,
            vips: VIPS.to_vec(),
            epoch,
        };
        let mut process = Process {
            election: Election::new(config.election, identity).speaking_at_most(self.release),
            controller: Controller::new(config.controller, (now, wall)),
            last_wake: now,
            timer: now,
            stopping: false,
            exited: false,
            grace_renewal: now,
            was_asking: false,
            accepted: VecDeque::new(),
            config,
        };
        trace.note(self.id, || {
            format!("starts at wall clock {clock_ms} ms, epoch {epoch}")
        });
        process.controller.step(Step::Endpoints(endpoints), now);
        let effects = process.controller.step(Step::Start, now);
        let kernel = &mut self.kernel;
        process.apply(effects, kernel, trace);
        let actions = process.election.on_event(Event::Start, now);
        process.execute(actions, now, kernel, out, trace);
        process.end_wake(now);
        self.process = Some(process);
    }

    /// This release replaces the installed one; a running daemon goes on
    /// with the old until it is started again.
    pub fn upgrade(&mut self) {
        self.release = VERSION;
    }

    /// SIGKILL: the daemon is gone; the kernel keeps what it had.
    pub fn crash(&mut self) {
        self.process = None;
        self.inbox.clear();
        self.frozen = false;
    }

    /// A datagram reaches the daemon's socket at `now`.
    pub fn deliver(&mut self, datagram: Datagram, now: Instant) {
        if self.running() {
            self.inbox.push_back((now, Input::Datagram(datagram)));
        }
    }

    /// A request reaches the daemon at `now` (it waits while the daemon is
    /// paused).
    pub fn command(&mut self, command: Command, now: Instant) {
        if self.running() {
            self.inbox.push_back((now, Input::Command(command)));
        }
    }

    /// When the daemon next runs, if it can.
    pub fn next_wake(&self) -> Option<Instant> {
        let process = self.process.as_ref().filter(|_| !self.frozen)?;
        if process.exited {
            // Waiting out the grace, the agent renews the lease every
            // interval.
            let grace = process.controller.grace_until()?;
            return Some(grace.min(process.grace_renewal));
        }
        let input = self.inbox.front().map(|&(at, _)| at);
        Some(input.map_or(process.timer, |at| at.min(process.timer)))
    }

    /// Runs the daemon once at `now`: one turn of the agent's loop, or,
    /// once the loop has ended, the end of its grace and the stop.
    pub fn wake(&mut self, now: Instant, out: &mut Outbox, trace: &mut Trace) {
        let Some(process) = self.process.as_mut() else {
            return;
        };
        if process.exited {
            let grace = process.controller.grace_until();
            if grace.is_some_and(|until| now < until) {
                process.renew(false, now, &mut self.kernel);
                process.grace_renewal = now + process.config.election.interval;
                return;
            }
            let effects = process.controller.step(Step::Tick, now);
            process.apply(effects, &mut self.kernel, trace);
            self.stopped(trace);
            return;
        }
        let input = match self.inbox.front() {
            Some(&(at, _)) if at <= process.timer => self.inbox.pop_front().map(|(_, input)| input),
            _ => None,
        };
        let role = process.election.machine().role();
        let exit = process.turn(input, now, &mut self.kernel, out, trace);
        if process.election.machine().role() != role {
            let reason = process.election.last_reason();
            let to = process.election.machine().role();
            trace.note(self.id, || format!("{role} -> {to}: {reason}"));
        }
        if !exit {
            return;
        }
        trace.note(self.id, || "the agent's loop ends".into());
        process.exited = true;
        process.renew(false, now, &mut self.kernel);
        process.grace_renewal = now + process.config.election.interval;
        if process.controller.grace_until().is_none() {
            self.stopped(trace);
        }
    }

    /// The daemon has stopped: the datapath detaches the XDP program (no
    /// fence, no director) and leaves the egress guard owning no client.
    fn stopped(&mut self, trace: &mut Trace) {
        trace.note(self.id, || "stopped".into());
        self.process = None;
        self.inbox.clear();
        self.kernel.lease = None;
        self.kernel.director = None;
        self.kernel.ownership = Ownership::None;
    }
}

impl Process {
    /// One turn of the agent's loop with `input` (`None`: the timer);
    /// true when the loop ends.
    fn turn(
        &mut self,
        input: Option<Input>,
        now: Instant,
        kernel: &mut Kernel,
        out: &mut Outbox,
        trace: &mut Trace,
    ) -> bool {
        self.was_asking = self.election.machine().advert().preempt;
        let id = self.config.id;
        // First on waking: paused past the lease, what the machine knows
        // is stale and the fence has cut this gateway off. A master counts
        // from its last renewal of the lease, as the fence does.
        let renewed_at = match kernel.lease {
            Some(lease) => Some(lease.until - self.election.lease()),
            None => None,
        };
        if let Some(paused) = self.election.paused(now, self.last_wake, renewed_at) {
            trace.note(id, || {
                format!("paused for {} ms: stalled", paused.as_millis())
            });
            let actions = self.election.on_event(Event::Stalled { paused }, now);
            if self.execute(actions, now, kernel, out, trace) {
                return true;
            }
        }
        let actions = match input {
            None => {
                let effects = self.controller.step(Step::Tick, now);
                self.apply(effects, kernel, trace);
                self.election.on_event(Event::Tick, now)
            }
            Some(Input::Datagram(datagram)) => self.datagram(datagram, now, out, trace),
            Some(Input::Command(command)) => self.command(command, now, trace),
        };
        if self.execute(actions, now, kernel, out, trace) {
            return true;
        }
        // Gateways come, go, drain and change health with any event.
        self.sync_director(now, kernel, trace);
        self.end_wake(now);
        false
    }

    /// The loop's bookkeeping at the end of a turn: the pause check's
    /// reference, and the next deadline.
    fn end_wake(&mut self, now: Instant) {
        self.last_wake = now;
        self.timer = [
            self.election.machine().next_deadline(),
            self.controller.next_deadline(),
        ]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(now + self.config.election.interval);
    }

    /// A datagram: an advert to receive; a forged one is watched.
    fn datagram(
        &mut self,
        datagram: Datagram,
        now: Instant,
        out: &mut Outbox,
        trace: &mut Trace,
    ) -> Vec<Action> {
        let before = datagram.forged.map(|_| self.belief());
        let (outcome, actions) = match self.receive(&datagram.bytes, now, out) {
            Ok(actions) => (Ok(()), actions),
            Err(error) => (Err(error), Vec::new()),
        };
        let id = self.config.id;
        trace.note(id, || match (&outcome, datagram.forged) {
            (Ok(()), None) => format!("heard {}", datagram.describe()),
            (Ok(()), Some(forgery)) => format!("BELIEVED forged {forgery:?}"),
            (Err(error), None) => format!("dropped {}: {error}", datagram.describe()),
            (Err(error), Some(forgery)) => format!("dropped forged {forgery:?}: {error}"),
        });
        if let (Some(forgery), Some(before)) = (datagram.forged, before) {
            out.verdict = Some(Verdict {
                forgery,
                outcome,
                before,
                after: self.belief(),
            });
        }
        actions
    }

    /// Decodes, authenticates and checks an advert as `Agent::receive`
    /// does; the machine hears it only if all passes.
    fn receive(
        &mut self,
        bytes: &[u8],
        now: Instant,
        out: &mut Outbox,
    ) -> Result<Vec<Action>, AdvertError> {
        let (advert, actions) = self.election.receive(bytes, now)?;
        if self.accepted.len() == REMEMBERED {
            self.accepted.pop_front();
        }
        self.accepted.push_back(bytes.to_vec());
        out.heard
            .push((advert.gateway_id, advert.epoch, advert.sequence));
        Ok(actions)
    }

    /// A request, as `Agent::command` and the health channel take it.
    fn command(&mut self, command: Command, now: Instant, trace: &mut Trace) -> Vec<Action> {
        let id = self.config.id;
        trace.note(id, || format!("{command:?}"));
        match command {
            Command::Failover => self.election.on_event(Event::Failover, now),
            Command::Maintenance(on) => self.election.on_event(Event::Maintenance { on }, now),
            Command::Drain(on) => {
                if self.config.controller.director.is_none() {
                    trace.note(id, || "refused: not in director mode".into());
                    return Vec::new();
                }
                self.election.set_draining(on);
                vec![Action::Advertise(self.election.machine().advert())]
            }
            Command::Health(healthy) => {
                let reason = if healthy { "checks pass" } else { "link down" };
                let health = Event::Health {
                    healthy,
                    reason: reason.into(),
                };
                self.election.on_event(health, now)
            }
            Command::Penalty(points) => {
                let penalty = Event::Penalty {
                    points,
                    reason: "tracked link".into(),
                };
                self.election.on_event(penalty, now)
            }
            Command::Shutdown if self.stopping => Vec::new(),
            Command::Shutdown => {
                self.stopping = true;
                self.election.on_event(Event::Shutdown, now)
            }
        }
    }

    /// Carries out `actions` in order, as `Agent::execute`; true when the
    /// agent may exit.
    fn execute(
        &mut self,
        actions: Vec<Action>,
        now: Instant,
        kernel: &mut Kernel,
        out: &mut Outbox,
        trace: &mut Trace,
    ) -> bool {
        let id = self.config.id;
        let mut exit = false;
        for action in actions {
            match action {
                Action::Advertise(fields) => {
                    let adverts = self.election.encode(fields);
                    trace.note(id, || {
                        let to = fields
                            .handover_to
                            .map(|to| format!(" handing over to {to}"));
                        let asking = if fields.preempt { " asking" } else { "" };
                        let versions = if adverts.len() > 1 {
                            format!(" (also in version {})", fields.oldest_version)
                        } else {
                            String::new()
                        };
                        format!(
                            "advertises {} p{} #{}{}{asking}{versions}",
                            fields.role,
                            fields.priority,
                            self.election.sequence(),
                            to.unwrap_or_default()
                        )
                    });
                    out.sent.extend(adverts);
                    // Every advert renews the lease: the agent is alive.
                    self.renew(self.election.machine().role() == Role::Master, now, kernel);
                }
                Action::TakeVips => {
                    trace.note(id, || {
                        format!(
                            "takes the VIPs ({})",
                            describe_cause(self.election.machine().cause(), now)
                        )
                    });
                    self.renew(true, now, kernel);
                    let cause = self.election.machine().cause();
                    let effects = self.controller.step(Step::Promoted { cause }, now);
                    self.apply(effects, kernel, trace);
                    self.sync_director(now, kernel, trace);
                    kernel.vips_up = true;
                    out.took = Some(Took {
                        cause,
                        was_asking: self.was_asking,
                    });
                    let moved = Step::VipsMoved {
                        became: now,
                        vip_move: Duration::ZERO,
                        reason: self.election.last_reason(),
                    };
                    let effects = self.controller.step(moved, now);
                    self.apply(effects, kernel, trace);
                }
                Action::ReleaseVips => {
                    trace.note(id, || {
                        format!(
                            "releases the VIPs ({})",
                            describe_cause(self.election.machine().cause(), now)
                        )
                    });
                    self.renew(false, now, kernel);
                    let cause = self.election.machine().cause();
                    let effects = self.controller.step(Step::Demoted { cause }, now);
                    self.apply(effects, kernel, trace);
                    kernel.vips_up = false;
                    self.sync_director(now, kernel, trace);
                }
                Action::Announce => trace.note(id, || "announces the VIPs".into()),
                Action::Exit => exit = true,
                Action::HandOver(to) => trace.note(id, || format!("hands over to {to}")),
                Action::Refuse(error) => trace.note(id, || format!("refused: {error}")),
            }
        }
        exit
    }

    /// Renews the fence's lease for [`LEASE_INTERVALS`] intervals from
    /// `now`; `holds_vips` when this gateway answers for the VIPs.
    fn renew(&self, holds_vips: bool, now: Instant, kernel: &mut Kernel) {
        kernel.lease = Some(Lease {
            until: now + self.election.lease(),
            holds_vips,
        });
    }

    /// Carries out the controller's effects, in order, as `Agent::apply`:
    /// what the invariants read goes into the kernel, the rest into the
    /// trace.
    fn apply(&mut self, effects: Vec<Effect>, kernel: &mut Kernel, trace: &mut Trace) {
        let id = self.config.id;
        for effect in effects {
            match effect {
                Effect::SetOwnership(ownership) => {
                    trace.note(id, || format!("egress guard: {ownership:?}"));
                    kernel.ownership = ownership;
                }
                Effect::SetDirector(desired) => {
                    trace.note(id, || {
                        let on = if desired.on { "on" } else { "off" };
                        format!("director {on}, table {:?}", desired.table_members())
                    });
                    kernel.director = Some(desired);
                }
                Effect::OpenWindow { window, .. } => {
                    trace.note(id, || format!("window open for {} ms", window.as_millis()));
                }
                Effect::CloseWindow => trace.note(id, || "window closed".into()),
                Effect::Own(clients) => {
                    trace.note(id, || format!("owns {} clients", clients.len()))
                }
                Effect::Kick(request) => {
                    trace.note(id, || format!("kicks {}", request.candidates.len()));
                }
                Effect::DropSessions => trace.note(id, || "drops its sessions".into()),
            }
        }
    }

    /// Director mode: the controller follows the location, as
    /// `Agent::sync_director`.
    fn sync_director(&mut self, now: Instant, kernel: &mut Kernel, trace: &mut Trace) {
        if self.config.controller.director.is_none() {
            return;
        }
        let effects = self.controller.step(self.election.location(now), now);
        self.apply(effects, kernel, trace);
    }

    fn belief(&self) -> Belief {
        Belief {
            role: self.election.machine().role(),
            master: self.election.machine().master(),
            peers: self.election.machine().peers().clone(),
            extras: self.election.extras().clone(),
        }
    }
}
