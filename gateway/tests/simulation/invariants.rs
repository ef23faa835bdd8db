//! The invariants, checked after every step of the simulation. They say
//! what the README's "High availability" section and docs/FAILOVER.md
//! promise, no more. Terms: i is the advert interval, MDI the longest
//! master-down interval (3 i plus the lowest priority's skew), the lease is
//! 3 i from the last renewal, and a gateway *holds* the VIPs when they are
//! on its public interface and its lease, renewed to hold them, has not
//! lapsed (its fence then answers ARP and neighbour solicitations for them).
//!
//! 1. **Fenced single holder.**
//!    - (a) Two gateways that hear each other (both daemons running and not
//!      paused, on the same side of any partition, the segment losing
//!      nothing) are never both holders for longer than 2 (i + the longest
//!      delay): within an interval and a delivery the lower-ranked master
//!      hears the other and steps down, and a handover's offer and claim
//!      take one more exchange. The same for two gateways whose egress
//!      guards both let everything out. A partition, a lossy segment or a
//!      pause may leave two masters; the bound counts from when they hear
//!      each other again.
//!    - (b) A gateway that takes the VIPs over from silence (not while
//!      asking a live master to hand over; after the skew only, when the
//!      master it followed stepped down or resigned and no other master was
//!      heard) never finds another gateway, paused or dead, still holding
//!      them, unless that gateway's last advert never reached it: the lease
//!      ends 3 i after the last advert, before the master-down interval
//!      counted from hearing it.
//!    - (c) A gateway whose lease lapsed while it was paused, or that
//!      restarted, has nothing on its interface until it takes the VIPs
//!      again: it steps down first.
//! 2. **Settled.** From the settle time after every fault was undone
//!    ([`Scenario::settle_time`]) to the end of the quiet stretch, every
//!    daemon runs, BACKUP or MASTER, and hears every other; exactly one is
//!    MASTER, holds the VIPs, and every gateway believes in it; no other
//!    has them on its interface. Active/standby: the master's egress guard
//!    lets everything out, every other's nothing. Director: the master
//!    steers and no other does; every gateway's director has every gateway
//!    as table member; each client maps to one of them, which serves it
//!    (owning its table's clients, with a live lease).
//! 3. **Forgeries change nothing.** A forged advert is dropped, and the
//!    gateway's role, master, peer table and peers' addresses stay as they
//!    were.
//! 4. **Grace is served.** A gateway answering for its old sessions after
//!    handing over (egress guard in grace), its daemon unpaused for a lease
//!    or more, keeps a live lease, so the guard lets those answers out
//!    (FAILOVER.md: the old master answers for its sessions until the
//!    window closes, and a master stopped with SIGTERM waits for its window
//!    to close before it exits).
//! 5. **A stop ends.** A gateway asked to stop ends its election loop
//!    within MDI + 2 i of running time (a handover's deadline is MDI), not
//!    counting pauses.
//! 6. **Epochs only grow.** Each start of a gateway's daemon has an epoch
//!    above the one before, whatever its wall clock did in between (the
//!    others refuse a lower (epoch, sequence) for as long as they run, so a
//!    lower epoch would leave it unheard; invariant 2 then fails too).

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    time::{Duration, Instant},
};

use tidegate_common::director::{client_hash, table_index};
use tidegate_gateway::{
    director::maglev,
    ha::machine::{Cause, Role},
    xdp::{Ownership, director::client_key},
};

use crate::{
    host::{Node, TABLE_SIZE, Took, Verdict, describe_cause},
    network::Segment,
    scenario::{Mode, Scenario},
};

/// An invariant broken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub at: Duration,
    pub invariant: &'static str,
    pub what: String,
}

/// What the invariants remember between steps, for one pair of gateways.
#[derive(Debug, Default, Clone, Copy)]
struct Pair {
    /// Since when they hear each other.
    hearing: Option<Instant>,
    /// Since when both hold the VIPs.
    holding: Option<Instant>,
    /// Since when both egress guards let everything out.
    sending: Option<Instant>,
}

/// The invariants' memory and bounds.
#[derive(Debug)]
pub struct Monitor {
    mode: Mode,
    base: Instant,
    /// 1a: two gateways hearing each other both hold no longer than this.
    overlap: Duration,
    /// 5: a stop ends within this much running time.
    stop_bound: Duration,
    /// 2: (settled from, until).
    settled: Vec<(Duration, Duration)>,
    clients: Vec<SocketAddr>,
    pairs: BTreeMap<(u32, u32), Pair>,
    /// The (epoch, sequence) of each gateway's last advert.
    last_sent: BTreeMap<u32, (u64, u64)>,
    /// (receiver, sender): the last advert accepted.
    last_heard: BTreeMap<(u32, u32), (u64, u64)>,
    /// 1c: gateways that must take the VIPs before they hold anything.
    fenced_out: BTreeMap<u32, &'static str>,
    /// 6: each gateway's epoch at its last start.
    epochs: BTreeMap<u32, u64>,
    /// 5: gateways stopping, and since when they run.
    stopping: BTreeMap<u32, Instant>,
    /// When each gateway's daemon last started or resumed from a pause.
    resumed: BTreeMap<u32, Instant>,
    lease: Duration,
    /// The director's table for the last set of members seen.
    table: Option<(Vec<u32>, Vec<u8>)>,
}

impl Monitor {
    /// The invariants of `scenario`, its clock starting at `base`, with
    /// the clients at `clients`.
    pub fn new(scenario: &Scenario, base: Instant, clients: Vec<SocketAddr>) -> Self {
        let i = scenario.interval;
        let settle = scenario.settle_time();
        Self {
            mode: scenario.mode,
            base,
            overlap: 2 * (i + Segment::max_delay(i)),
            stop_bound: scenario.master_down() + 2 * i,
            settled: scenario
                .quiet
                .iter()
                .map(|q| (q.from + settle, q.until))
                .collect(),
            clients,
            pairs: BTreeMap::new(),
            last_sent: BTreeMap::new(),
            last_heard: BTreeMap::new(),
            fenced_out: BTreeMap::new(),
            epochs: BTreeMap::new(),
            stopping: BTreeMap::new(),
            resumed: BTreeMap::new(),
            lease: scenario.lease(),
            table: None,
        }
    }

    fn fail(&self, now: Instant, invariant: &'static str, what: String) -> Result<(), Failure> {
        Err(Failure {
            at: now - self.base,
            invariant,
            what,
        })
    }

    /// Gateway `id` (re)started with `epoch`: 6, its epoch grew; 1c until
    /// it takes the VIPs; its stop, if any, is over.
    pub fn started(&mut self, id: u32, now: Instant, epoch: u64) -> Result<(), Failure> {
        if let Some(last) = self.epochs.insert(id, epoch)
            && epoch <= last
        {
            return self.fail(
                now,
                "6 epochs only grow",
                format!("gateway {id} restarted with epoch {epoch}, not above its last {last}"),
            );
        }
        self.fenced_out.insert(id, "restarted");
        self.stopping.remove(&id);
        self.resumed.insert(id, now);
        Ok(())
    }

    /// Gateway `id` died, or stopped.
    pub fn gone(&mut self, id: u32) {
        self.stopping.remove(&id);
    }

    /// Gateway `id` was asked to stop at `now`.
    pub fn stop_asked(&mut self, id: u32, now: Instant) {
        self.stopping.entry(id).or_insert(now);
    }

    /// Gateway `id` runs again at `now` after a pause; `lapsed` when its
    /// lease lapsed meanwhile.
    pub fn thawed(&mut self, id: u32, now: Instant, lapsed: bool) {
        if lapsed {
            self.fenced_out.insert(id, "paused past its lease");
        }
        if let Some(since) = self.stopping.get_mut(&id) {
            *since = now;
        }
        self.resumed.insert(id, now);
    }

    /// Gateway `id` sent an advert with this (epoch, sequence).
    pub fn sent(&mut self, id: u32, stamp: (u64, u64)) {
        self.last_sent.insert(id, stamp);
    }

    /// Gateway `to` accepted an advert of `from` with this stamp.
    pub fn heard(&mut self, to: u32, from: u32, stamp: (u64, u64)) {
        self.last_heard.insert((to, from), stamp);
    }

    /// 1b: gateway `id` took the VIPs at `now`.
    pub fn took(
        &mut self,
        id: u32,
        took: Took,
        nodes: &[Node],
        now: Instant,
    ) -> Result<(), Failure> {
        self.fenced_out.remove(&id);
        let from_silence = matches!(took.cause, Cause::Takeover { .. }) && !took.was_asking;
        if !from_silence {
            return Ok(());
        }
        for other in nodes.iter().filter(|n| n.id != id && !n.live()) {
            let sent = self.last_sent.get(&other.id);
            let heard_last = sent.is_some() && sent == self.last_heard.get(&(id, other.id));
            if other.kernel.holds_vips(now) && heard_last {
                let left = other
                    .kernel
                    .lease
                    .map(|l| l.until - now)
                    .unwrap_or_default();
                return self.fail(
                    now,
                    "1b fenced single holder: a lease lapses before a takeover",
                    format!(
                        "gateway {id} took over ({}) while gateway {} (paused or dead) held the VIPs \
                         with {} ms of lease left, though its last advert had reached {id}",
                        describe_cause(took.cause, now),
                        other.id,
                        left.as_millis()
                    ),
                );
            }
        }
        Ok(())
    }

    /// 3: how a gateway took a forged advert.
    pub fn forged(&self, id: u32, verdict: &Verdict, now: Instant) -> Result<(), Failure> {
        if verdict.outcome.is_ok() || verdict.before != verdict.after {
            return self.fail(
                now,
                "3 forgeries change nothing",
                format!(
                    "gateway {id} took a forged advert ({:?}): {:?}; before: {}; after: {}",
                    verdict.forgery,
                    verdict.outcome,
                    verdict.before.describe(now),
                    verdict.after.describe(now)
                ),
            );
        }
        Ok(())
    }

    /// Every invariant that holds between steps, at `now`.
    pub fn check(
        &mut self,
        nodes: &[Node],
        segment: &Segment,
        now: Instant,
    ) -> Result<(), Failure> {
        self.pairs_overlap(nodes, segment, now)?;
        self.fenced_out_hold_nothing(nodes, now)?;
        self.grace_is_served(nodes, now)?;
        self.stops_end(nodes, now)?;
        let at = now - self.base;
        if self
            .settled
            .iter()
            .any(|&(from, until)| from <= at && at < until)
        {
            self.settled(nodes, now)?;
        }
        Ok(())
    }

    /// 1a.
    fn pairs_overlap(
        &mut self,
        nodes: &[Node],
        segment: &Segment,
        now: Instant,
    ) -> Result<(), Failure> {
        for (n, a) in nodes.iter().enumerate() {
            for b in &nodes[n + 1..] {
                let hear = a.live() && b.live() && segment.joins(a.id, b.id) && segment.lossless();
                let pair = self.pairs.entry((a.id, b.id)).or_default();
                pair.hearing = hear.then(|| pair.hearing.unwrap_or(now));
                let holding = a.kernel.holds_vips(now) && b.kernel.holds_vips(now);
                pair.holding = holding.then(|| pair.holding.unwrap_or(now));
                let sending = a.kernel.sends_to_all(now) && b.kernel.sends_to_all(now);
                pair.sending = sending.then(|| pair.sending.unwrap_or(now));
                let pair = *pair;
                for (since, what) in [
                    (pair.holding, "hold the VIPs"),
                    (pair.sending, "send to every client"),
                ] {
                    let (Some(hearing), Some(since)) = (pair.hearing, since) else {
                        continue;
                    };
                    let overlap = now - since.max(hearing);
                    if overlap > self.overlap {
                        return self.fail(
                            now,
                            "1a fenced single holder: two that hear each other",
                            format!(
                                "gateways {} and {} both {what} for {} ms while hearing each other (bound {} ms)",
                                a.id,
                                b.id,
                                overlap.as_millis(),
                                self.overlap.as_millis()
                            ),
                        );
                    }
                }
            }
        }
        Ok(())
    }

    /// 1c.
    fn fenced_out_hold_nothing(&self, nodes: &[Node], now: Instant) -> Result<(), Failure> {
        for node in nodes {
            if let Some(why) = self.fenced_out.get(&node.id)
                && node.kernel.vips_up
                && node.running()
            {
                let holders: Vec<u32> = nodes
                    .iter()
                    .filter(|n| n.id != node.id && n.kernel.holds_vips(now))
                    .map(|n| n.id)
                    .collect();
                return self.fail(
                    now,
                    "1c fenced single holder: no VIPs without taking them",
                    format!(
                        "gateway {} ({why}) has the VIPs on its interface without having taken them \
                         since (role {:?}; the others holding them: {holders:?})",
                        node.id,
                        node.role()
                    ),
                );
            }
        }
        Ok(())
    }

    /// 4: of daemons that ran, unpaused, for a whole lease.
    fn grace_is_served(&self, nodes: &[Node], now: Instant) -> Result<(), Failure> {
        for node in nodes {
            let ran = self
                .resumed
                .get(&node.id)
                .is_some_and(|&at| now - at >= self.lease);
            if node.process.is_some()
                && !node.frozen
                && ran
                && node.kernel.ownership == Ownership::Grace
                && !node.kernel.lease_holds(now)
            {
                let lapsed = node.kernel.lease.map(|l| now - l.until).unwrap_or_default();
                return self.fail(
                    now,
                    "4 grace is served",
                    format!(
                        "gateway {} answers for its old sessions (egress grace), but its lease lapsed \
                         {} ms ago: the egress guard drops the answers (running: {}, stopping: {})",
                        node.id,
                        lapsed.as_millis(),
                        node.running(),
                        node.stopping()
                    ),
                );
            }
        }
        Ok(())
    }

    /// 5.
    fn stops_end(&self, nodes: &[Node], now: Instant) -> Result<(), Failure> {
        for node in nodes.iter().filter(|n| n.live()) {
            if let Some(&since) = self.stopping.get(&node.id)
                && now - since > self.stop_bound
            {
                return self.fail(
                    now,
                    "5 a stop ends",
                    format!(
                        "gateway {} was asked to stop {} ms (running) ago and is still {:?} \
                         (bound {} ms)",
                        node.id,
                        (now - since).as_millis(),
                        node.role(),
                        self.stop_bound.as_millis()
                    ),
                );
            }
        }
        Ok(())
    }

    /// 2.
    fn settled(&mut self, nodes: &[Node], now: Instant) -> Result<(), Failure> {
        let fail =
            |what: String| self.fail(now, "2 settled: one master, every client owned once", what);
        let roles: Vec<(u32, Option<Role>)> = nodes.iter().map(|n| (n.id, n.role())).collect();
        if let Some(node) = nodes.iter().find(|n| !n.live() || n.stopping()) {
            return fail(format!("gateway {} is not running: {roles:?}", node.id));
        }
        let masters: Vec<&Node> = nodes
            .iter()
            .filter(|n| n.role() == Some(Role::Master))
            .collect();
        let [master] = masters[..] else {
            return fail(format!("not exactly one master: {roles:?}"));
        };
        if let Some(node) = nodes
            .iter()
            .find(|n| !matches!(n.role(), Some(Role::Backup | Role::Master)))
        {
            return fail(format!(
                "gateway {} is {:?}: {roles:?}",
                node.id,
                node.role()
            ));
        }
        if !master.kernel.holds_vips(now) {
            return fail(format!(
                "master {} does not hold the VIPs: {}",
                master.id,
                master.kernel.describe(now)
            ));
        }
        for node in nodes {
            let machine = &node.process.as_ref().expect("running").election.machine();
            if machine.master() != Some(master.id) {
                return fail(format!(
                    "gateway {} believes in master {:?}, not {}",
                    node.id,
                    machine.master(),
                    master.id
                ));
            }
            let heard: Vec<u32> = machine.peers().keys().copied().collect();
            let others: Vec<u32> = nodes
                .iter()
                .map(|n| n.id)
                .filter(|&id| id != node.id)
                .collect();
            if heard != others {
                return fail(format!(
                    "gateway {} hears {heard:?}, not {others:?}",
                    node.id
                ));
            }
            if node.id != master.id && node.kernel.vips_up {
                return fail(format!("backup {} has the VIPs on its interface", node.id));
            }
        }
        match self.mode {
            Mode::ActiveStandby | Mode::RollingUpgrade => {
                for node in nodes {
                    let owns = if node.id == master.id {
                        Ownership::All
                    } else {
                        Ownership::None
                    };
                    if node.kernel.ownership != owns {
                        return fail(format!(
                            "gateway {} owns {:?}, not {owns:?} (master {})",
                            node.id, node.kernel.ownership, master.id
                        ));
                    }
                }
                Ok(())
            }
            Mode::Director => self.director_settled(nodes, master.id, now),
        }
    }

    /// 2, director mode.
    fn director_settled(
        &mut self,
        nodes: &[Node],
        master: u32,
        now: Instant,
    ) -> Result<(), Failure> {
        let all: Vec<u32> = nodes.iter().map(|n| n.id).collect();
        for node in nodes {
            let Some(director) = &node.kernel.director else {
                return self.fail(
                    now,
                    "2 settled (director)",
                    format!("gateway {} has no director", node.id),
                );
            };
            if director.on != (node.id == master) || director.table_members() != all {
                return self.fail(
                    now,
                    "2 settled (director)",
                    format!(
                        "gateway {}'s director is {} with table {:?} (master {master}, gateways {all:?})",
                        node.id,
                        if director.on { "on" } else { "off" },
                        director.table_members()
                    ),
                );
            }
        }
        if self
            .table
            .as_ref()
            .is_none_or(|(members, _)| *members != all)
        {
            let table = maglev::build(&all, TABLE_SIZE).expect("a prime table, ids 1 to 255");
            self.table = Some((all, table));
        }
        let (_, table) = self.table.as_ref().expect("built above");
        for client in &self.clients {
            let index = table_index(client_hash(&client_key(*client)), TABLE_SIZE) as usize;
            let id = u32::from(table[index]);
            let serves = nodes.iter().find(|n| n.id == id).is_some_and(|n| {
                n.kernel.ownership == Ownership::Table && n.kernel.lease_holds(now)
            });
            if !serves {
                return self.fail(
                    now,
                    "2 settled (director)",
                    format!("client {client} maps to gateway {id}, which does not serve it"),
                );
            }
        }
        Ok(())
    }
}
