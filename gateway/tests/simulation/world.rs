//! The simulation's loop. The clock is virtual: an `Instant` taken once as
//! the base, plus an offset that jumps to whatever happens next (the next
//! fault of the script, the next datagram to arrive, the next gateway to
//! wake), earliest first and in that order on a tie. One such thing is one
//! step; the invariants are checked after each. Nothing reads a real clock
//! or iterates a hash map, so a seed always runs the same way.

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use tidegate_gateway::{
    ha::sharing::table::{EndpointTable, EndpointView},
    wireguard::{Key, PeerEndpoint},
};

use crate::{
    host::{Command, Node, Outbox, mac_of},
    invariants::{Failure, Monitor},
    network::Segment,
    scenario::{Fault, Mode, Scenario, WALL_START_MS, Weather},
};

/// More steps than any seed needs: the simulation is stuck.
const MAX_STEPS: u64 = 2_000_000;

/// What happened, line by line, when asked for.
#[derive(Debug)]
pub struct Trace {
    lines: Option<Vec<String>>,
    now: Duration,
}

impl Trace {
    /// A trace that records (`on`) or only counts nothing.
    pub fn new(on: bool) -> Self {
        Self {
            lines: on.then(Vec::new),
            now: Duration::ZERO,
        }
    }

    /// Something gateway `id` did.
    pub fn note(&mut self, id: u32, what: impl FnOnce() -> String) {
        if let Some(lines) = &mut self.lines {
            lines.push(format!(
                "{:>10.3} ms  gw {id:<2}  {}",
                millis(self.now),
                what()
            ));
        }
    }

    /// Something the script did.
    fn script(&mut self, what: impl FnOnce() -> String) {
        if let Some(lines) = &mut self.lines {
            lines.push(format!("{:>10.3} ms  ----   {}", millis(self.now), what()));
        }
    }

    /// The lines recorded, oldest first.
    pub fn lines(&self) -> &[String] {
        self.lines.as_deref().unwrap_or_default()
    }
}

/// Milliseconds, with fractions.
pub fn millis(at: Duration) -> f64 {
    at.as_secs_f64() * 1000.0
}

/// A simulated WireGuard client.
#[derive(Debug, Clone, Copy)]
struct Client {
    key: Key,
    endpoint: SocketAddr,
    /// Its last handshake, this long before a gateway's start.
    age: Duration,
    /// The gateway that saw it.
    seen_by: u32,
}

/// The next thing to happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Next {
    Fault,
    Arrival,
    Wake(usize),
}

/// The location under simulation.
#[derive(Debug)]
pub struct World<'a> {
    scenario: &'a Scenario,
    base: Instant,
    now: Duration,
    nodes: Vec<Node>,
    ids: Vec<u32>,
    segment: Segment,
    rng: fastrand::Rng,
    next_fault: usize,
    clients: Vec<Client>,
    monitor: Monitor,
    trace: Trace,
}

impl<'a> World<'a> {
    /// The location of `scenario`, nothing started; `trace` records what
    /// happens.
    pub fn new(scenario: &'a Scenario, trace: bool) -> Self {
        let base = Instant::now();
        let mut rng = fastrand::Rng::with_seed(scenario.seed ^ 0x5eed_f0ca);
        let ids: Vec<u32> = scenario.gateways.iter().map(|g| g.id).collect();
        let clients: Vec<Client> = (0..scenario.clients)
            .map(|i| Client {
                key: Key::new([i as u8 + 1; 32]),
                endpoint: SocketAddr::from(([198, 51, 100, i as u8 + 1], 40_000 + i as u16)),
                age: Duration::from_secs(rng.u64(0..400)),
                seen_by: ids[rng.usize(..ids.len())],
            })
            .collect();
        let endpoints = clients.iter().map(|c| c.endpoint).collect();
        Self {
            scenario,
            base,
            now: Duration::ZERO,
            nodes: scenario
                .gateways
                .iter()
                .map(|g| Node::new(g, scenario))
                .collect(),
            ids,
            segment: Segment::new(scenario.interval),
            rng,
            next_fault: 0,
            clients,
            monitor: Monitor::new(scenario, base, endpoints),
            trace: Trace::new(trace),
        }
    }

    /// Runs the script to its end: the first invariant broken, if any, and
    /// the trace.
    pub fn run(mut self) -> (Result<(), Failure>, Trace) {
        let result = self.simulate();
        (result, self.trace)
    }

    fn simulate(&mut self) -> Result<(), Failure> {
        for index in 0..self.nodes.len() {
            self.start(index)?;
        }
        self.check()?;
        let mut steps = 0;
        while let Some((at, next)) = self.next() {
            if at > self.scenario.end {
                return Ok(());
            }
            self.now = at;
            self.trace.now = at;
            match next {
                Next::Fault => self.fault()?,
                Next::Arrival => self.arrival()?,
                Next::Wake(index) => self.wake(index)?,
            }
            self.check()?;
            steps += 1;
            if steps > MAX_STEPS {
                return Err(Failure {
                    at,
                    invariant: "progress",
                    what: format!("more than {MAX_STEPS} steps: a deadline that never moves?"),
                });
            }
        }
        Ok(())
    }

    fn instant(&self) -> Instant {
        self.base + self.now
    }

    /// The earliest of the next fault, arrival and wake.
    fn next(&self) -> Option<(Duration, Next)> {
        let fault = self
            .scenario
            .script
            .get(self.next_fault)
            .map(|&(at, _)| (at, Next::Fault));
        let arrival = self.segment.next_arrival().map(|at| (at, Next::Arrival));
        let wakes = self.nodes.iter().enumerate().filter_map(|(index, node)| {
            let at = node.next_wake()?.saturating_duration_since(self.base);
            Some((at.max(self.now), Next::Wake(index)))
        });
        // `min_by_key` keeps the first of equals: faults, arrivals, wakes.
        fault
            .into_iter()
            .chain(arrival)
            .chain(wakes)
            .min_by_key(|&(at, _)| at)
    }

    fn index(&self, id: u32) -> usize {
        self.ids
            .iter()
            .position(|&i| i == id)
            .expect("a gateway of the location")
    }

    /// The invariants between steps.
    fn check(&mut self) -> Result<(), Failure> {
        let now = self.instant();
        self.monitor.check(&self.nodes, &self.segment, now)
    }

    /// Gateway `index`'s wall clock now.
    fn wall(&self, index: usize) -> SystemTime {
        let ms = WALL_START_MS + self.nodes[index].wall_offset_ms;
        SystemTime::UNIX_EPOCH + Duration::from_millis(ms as u64) + self.now
    }

    /// The endpoint table as endpoint sharing would have it, at `wall`.
    fn endpoints(&self, wall: SystemTime) -> Arc<EndpointView> {
        let mut table = EndpointTable::new(Duration::from_secs(600));
        table.set_peers(self.clients.iter().map(|c| c.key));
        for client in &self.clients {
            let entry = PeerEndpoint {
                key: client.key,
                endpoint: client.endpoint,
                last_handshake: wall - client.age,
                kicked: false,
            };
            table.merge(client.seen_by, &[entry], wall);
        }
        let macs = self
            .ids
            .iter()
            .filter(|_| self.scenario.macs_known)
            .map(|&id| (id, mac_of(id)))
            .collect();
        Arc::new(table.view(macs))
    }

    /// Gateway `index`'s daemon starts.
    fn start(&mut self, index: usize) -> Result<(), Failure> {
        let wall = self.wall(index);
        let endpoints = self.endpoints(wall);
        let mut out = Outbox::default();
        let now = self.instant();
        self.nodes[index].start(now, wall, endpoints, &mut out, &mut self.trace);
        let epoch = self.nodes[index]
            .process
            .as_ref()
            .map_or(0, |process| process.election.identity().epoch);
        self.monitor.started(self.nodes[index].id, now, epoch)?;
        self.publish(index, out)
    }

    /// Gateway `index` runs once.
    fn wake(&mut self, index: usize) -> Result<(), Failure> {
        let mut out = Outbox::default();
        let now = self.instant();
        self.nodes[index].wake(now, &mut out, &mut self.trace);
        if self.nodes[index].process.is_none() {
            self.monitor.gone(self.nodes[index].id);
        }
        self.publish(index, out)
    }

    /// What gateway `index`'s step produced: adverts onto the segment, and
    /// what the invariants follow.
    fn publish(&mut self, index: usize, out: Outbox) -> Result<(), Failure> {
        let now = self.instant();
        let id = self.nodes[index].id;
        if let Some(process) = &self.nodes[index].process
            && !out.sent.is_empty()
        {
            self.monitor.sent(
                id,
                (
                    process.election.identity().epoch,
                    process.election.sequence(),
                ),
            );
        }
        for bytes in &out.sent {
            self.segment
                .broadcast(&mut self.rng, self.now, id, &self.ids, bytes);
        }
        for (from, epoch, sequence) in out.heard {
            self.monitor.heard(id, from, (epoch, sequence));
        }
        if let Some(took) = out.took {
            self.monitor.took(id, took, &self.nodes, now)?;
        }
        if let Some(verdict) = &out.verdict {
            self.monitor.forged(id, verdict, now)?;
        }
        Ok(())
    }

    /// The next datagram reaches its gateway's socket, and the gateway
    /// reads it at once unless it is paused.
    fn arrival(&mut self) -> Result<(), Failure> {
        let now = self.instant();
        let Some(datagram) = self.segment.arrive() else {
            return Ok(());
        };
        let index = self.index(datagram.to);
        self.nodes[index].deliver(datagram, now);
        if self.nodes[index].next_wake().is_some_and(|at| at <= now) {
            self.wake(index)?;
        }
        Ok(())
    }

    /// The script's next fault.
    fn fault(&mut self) -> Result<(), Failure> {
        let (_, fault) = self.scenario.script[self.next_fault];
        self.next_fault += 1;
        let scenario = self.scenario;
        self.trace.script(|| scenario.describe(fault));
        match fault {
            Fault::Partition(side) => {
                let side = side.iter().map(|&i| self.ids[i as usize]).collect();
                self.segment.partition(side);
            }
            Fault::Heal => self.segment.heal(),
            Fault::Weather(weather) => self.segment.weather = weather,
            Fault::Crash(id) => self.crash(self.index(id)),
            Fault::Restart(id) => {
                let index = self.index(id);
                if self.nodes[index].process.is_none() {
                    self.start(index)?;
                }
            }
            Fault::Freeze(id) => {
                let index = self.index(id);
                let node = &mut self.nodes[index];
                node.frozen = node.process.is_some();
            }
            Fault::Thaw(id) => self.thaw(self.index(id))?,
            Fault::Stop(id) => self.command(self.index(id), Command::Shutdown),
            Fault::ClockStep(id, ms) => {
                let index = self.index(id);
                self.nodes[index].wall_offset_ms += ms;
            }
            Fault::Forge(forgery, id) => {
                let index = self.index(id);
                let claimed = self.ids[self.rng.usize(..self.ids.len())];
                let accepted = self.nodes[index].process.as_ref().and_then(|p| {
                    let n = p.accepted.len();
                    (n > 0).then(|| p.accepted[self.rng.usize(..n)].as_slice())
                });
                let seen = self.segment.last_seen.as_deref();
                if let Some(bytes) = forgery.make(&mut self.rng, id, claimed, seen, accepted) {
                    self.segment.inject(self.now, id, bytes, forgery);
                }
            }
            Fault::Failover => {
                let master = self.nodes.iter().position(|n| {
                    n.running() && n.role() == Some(tidegate_gateway::ha::machine::Role::Master)
                });
                if let Some(index) = master {
                    self.command(index, Command::Failover);
                }
            }
            Fault::Health(id, healthy) => self.command(self.index(id), Command::Health(healthy)),
            Fault::Maintenance(id, on) => self.command(self.index(id), Command::Maintenance(on)),
            Fault::Penalty(id, points) => self.command(self.index(id), Command::Penalty(points)),
            Fault::Drain(id, on) => self.command(self.index(id), Command::Drain(on)),
            Fault::Upgrade(id) => {
                let index = self.index(id);
                self.nodes[index].upgrade();
            }
            Fault::Restore => self.restore()?,
        }
        Ok(())
    }

    /// Gateway `index` is killed.
    fn crash(&mut self, index: usize) {
        self.nodes[index].crash();
        self.monitor.gone(self.nodes[index].id);
    }

    /// Gateway `index` runs again after a pause, at once if it is due.
    fn thaw(&mut self, index: usize) -> Result<(), Failure> {
        if !self.nodes[index].frozen {
            return Ok(());
        }
        let now = self.instant();
        let node = &mut self.nodes[index];
        node.frozen = false;
        let lapsed = !node.kernel.lease_holds(now);
        self.monitor.thawed(node.id, now, lapsed);
        if node.next_wake().is_some_and(|at| at <= now) {
            self.wake(index)?;
        }
        Ok(())
    }

    /// A request reaches gateway `index`.
    fn command(&mut self, index: usize, command: Command) {
        let now = self.instant();
        let node = &mut self.nodes[index];
        if command == Command::Shutdown && node.running() {
            self.monitor.stop_asked(node.id, now);
        }
        node.command(command, now);
    }

    /// Every fault is undone: the segment heals and calms, every daemon
    /// runs again (one still stopping is killed first, as at systemd's stop
    /// timeout), and every request is taken back.
    fn restore(&mut self) -> Result<(), Failure> {
        self.segment.heal();
        self.segment.weather = Weather::Calm;
        for index in 0..self.nodes.len() {
            self.thaw(index)?;
            let node = &self.nodes[index];
            if node.process.is_some() && !node.running() || node.stop_pending() {
                self.crash(index);
            }
            if self.nodes[index].process.is_none() {
                self.start(index)?;
                continue;
            }
            let mut requests = vec![
                Command::Health(true),
                Command::Maintenance(false),
                Command::Penalty(0),
            ];
            if self.scenario.mode == Mode::Director {
                requests.push(Command::Drain(false));
            }
            for command in requests {
                self.command(index, command);
            }
        }
        Ok(())
    }
}
