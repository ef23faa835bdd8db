//! What a seed makes: a location (two to four gateways and their settings)
//! and a script of faults, in rounds: a stretch of chaos, then every fault
//! undone at once ([`Fault::Restore`]) and a quiet stretch in which the
//! location must settle.
//!
//! | fault | what happens | undone by |
//! |---|---|---|
//! | `Partition(side)` | the segment splits: `side` and the rest | `Heal` |
//! | `Weather(Lossy)` | adverts lost at a rate, delayed up to half an interval | `Weather(Calm)` |
//! | `Weather(Slow)` | adverts delayed up to two intervals, so reordered | `Weather(Calm)` |
//! | `Crash(id)` | the daemon is killed (SIGKILL); the kernel keeps its state | `Restart(id)` |
//! | `Freeze(id)` | the daemon is paused (SIGSTOP), shorter or longer than its lease | `Thaw(id)` |
//! | `Stop(id)` | the daemon is stopped (SIGTERM): it hands over or resigns | `Restart(id)` |
//! | `ClockStep(id, ms)` | the gateway's wall clock steps, forward or back | — |
//! | `Forge(forgery, id)` | a forged advert reaches the gateway | — |
//! | `Failover` | `tidectl failover` on the master | — |
//! | `Health(id, false)` | a health check fails | `Health(id, true)` |
//! | `Maintenance(id, true)` | `tidectl maintenance on` | `Maintenance(id, false)` |
//! | `Penalty(id, points)` | a tracked interface goes down | `Penalty(id, 0)` |
//! | `Drain(id, true)` | `tidectl drain` (director mode) | `Drain(id, false)` |
//! | `Upgrade(id)` | the daemon's binary is replaced by this release's, then it is stopped (rolling upgrades) | `Restart(id)` |
//!
//! `Restore` heals, calms, thaws, restarts (a daemon still stopping is
//! killed first, as systemd does at its stop timeout) and undoes every
//! operator request. Forged adverts arrive in quiet stretches too: they
//! must not disturb a settled location either.
//!
//! A rolling upgrade starts every gateway on the previous release (it reads
//! and writes advert version 1 only) and upgrades them one at a time, some
//! in the first round and the rest in the second: the first quiet stretch
//! settles a location of both releases, the second one of this release.

use std::time::Duration;

use tidegate_gateway::ha::{
    advert::{OLDEST_VERSION, VERSION},
    machine::Machine,
};

use crate::forge::Forgery;

/// How the location's gateways share the clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    ActiveStandby,
    Director,
    /// Active/standby, its gateways upgraded from the previous release
    /// one at a time.
    RollingUpgrade,
}

impl Mode {
    /// The test that runs this mode's seeds.
    pub fn test_name(self) -> &'static str {
        match self {
            Self::ActiveStandby => "active_standby",
            Self::Director => "director",
            Self::RollingUpgrade => "rolling_upgrade",
        }
    }
}

/// One gateway's election settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gateway {
    pub id: u32,
    pub priority: u8,
    pub preempt: bool,
    pub preempt_delay: Duration,
    /// The newest advert version its release reads and writes.
    pub release: u8,
}

/// How the segment treats adverts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Weather {
    /// Delivered within a tenth of an interval.
    Calm,
    /// Delivered within two intervals: adverts overtake each other.
    Slow,
    /// This percentage lost; the rest within half an interval.
    Lossy(u32),
}

/// Something the script does to the location.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// These gateways (by index, lowest id first) hear only each other;
    /// the rest only each other.
    Partition(&'static [u32]),
    Heal,
    Weather(Weather),
    Crash(u32),
    Restart(u32),
    Freeze(u32),
    Thaw(u32),
    Stop(u32),
    /// The gateway's wall clock steps by this many milliseconds.
    ClockStep(u32, i64),
    Forge(Forgery, u32),
    Failover,
    Health(u32, bool),
    Maintenance(u32, bool),
    Penalty(u32, u8),
    Drain(u32, bool),
    /// The daemon's binary is replaced by this release's: it runs from
    /// its next start.
    Upgrade(u32),
    Restore,
}

/// A stretch in which nothing fails: the location must settle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quiet {
    /// When every fault was undone.
    pub from: Duration,
    pub until: Duration,
}

/// A location and its script.
#[derive(Debug, Clone)]
pub struct Scenario {
    pub seed: u64,
    pub mode: Mode,
    pub interval: Duration,
    pub gateways: Vec<Gateway>,
    /// Failover continuity's second chance after a planned handover.
    pub handover_window: Duration,
    /// Simulated WireGuard clients in the endpoint table.
    pub clients: usize,
    /// The endpoint table knows every gateway's Ethernet address (else no
    /// handover window can open).
    pub macs_known: bool,
    /// Faults by time, in the order they happen.
    pub script: Vec<(Duration, Fault)>,
    pub quiet: Vec<Quiet>,
    pub end: Duration,
}

/// Rounds of chaos and quiet per seed.
const ROUNDS: usize = 2;
/// The length of a stretch of chaos, in intervals.
const CHAOS_INTERVALS: u32 = 24;
/// How long the settled location is watched, in intervals.
const WATCH_INTERVALS: u32 = 6;
/// Kicks per second (failover continuity).
pub const KICK_RATE: u32 = 1000;
/// The wall clock at the start of every seed (Unix ms).
pub const WALL_START_MS: i64 = 1_700_000_000_000;

/// The side of a partition: a non-empty, proper subset of the gateways.
/// (Kept as static slices so that faults stay `Copy`.)
const SIDES: [&[u32]; 14] = [
    &[0],
    &[1],
    &[2],
    &[3],
    &[0, 1],
    &[0, 2],
    &[0, 3],
    &[1, 2],
    &[1, 3],
    &[2, 3],
    &[0, 1, 2],
    &[0, 1, 3],
    &[0, 2, 3],
    &[1, 2, 3],
];

impl Scenario {
    /// The scenario of `seed`.
    pub fn generate(seed: u64, mode: Mode) -> Self {
        let mut rng = fastrand::Rng::with_seed(seed);
        let interval = Duration::from_millis(*pick(&mut rng, &[50, 100, 200]));
        let mut gateways = gateways(&mut rng, interval);
        if mode == Mode::RollingUpgrade {
            for gateway in &mut gateways {
                gateway.release = OLDEST_VERSION;
            }
        }
        let handover_window = interval * *pick(&mut rng, &[0, 2, 8]);
        let mut generator = Generator {
            rng,
            mode,
            interval,
            ids: gateways.iter().map(|g| g.id).collect(),
            pauses: Vec::new(),
            script: Vec::new(),
        };
        let mut quiet = Vec::new();
        let mut at = Duration::ZERO;
        let mut scenario = Self {
            seed,
            mode,
            interval,
            gateways,
            handover_window,
            clients: generator.rng.usize(4..=12),
            macs_known: generator.rng.u8(0..4) != 0,
            script: Vec::new(),
            quiet: Vec::new(),
            end: Duration::ZERO,
        };
        let settle = scenario.settle_time();
        let upgrades = generator.upgrade_order();
        for round in 0..ROUNDS {
            let chaos = interval * CHAOS_INTERVALS;
            generator.chaos(at, chaos);
            if let Some(ids) = upgrades.get(round) {
                generator.upgrades(at, chaos, ids);
            }
            at += chaos;
            generator.push(at, Fault::Restore);
            let until = at + settle + interval * WATCH_INTERVALS;
            generator.forgeries(at, until - at);
            quiet.push(Quiet { from: at, until });
            at = until;
        }
        generator.script.sort_by_key(|&(at, _)| at);
        scenario.script = generator.script;
        scenario.quiet = quiet;
        scenario.end = at;
        scenario
    }

    /// `fault` in words: a partition names its side's gateways.
    pub fn describe(&self, fault: Fault) -> String {
        match fault {
            Fault::Partition(side) => {
                let ids: Vec<u32> = side.iter().map(|&i| self.gateways[i as usize].id).collect();
                format!("Partition({ids:?} | the rest)")
            }
            other => format!("{other:?}"),
        }
    }

    /// The longest master-down interval of the location: its lowest
    /// priority waits the longest skew.
    pub fn master_down(&self) -> Duration {
        let lowest = self.gateways.iter().map(|g| g.priority).min().unwrap_or(1);
        3 * self.interval + Machine::skew(lowest, self.interval)
    }

    /// The longest a gateway answers for its old sessions after handing
    /// over: the window plus the time its kicks take.
    pub fn grace(&self) -> Duration {
        if self.handover_window.is_zero() {
            return Duration::ZERO;
        }
        self.handover_window + Duration::from_secs_f64(self.clients as f64 / f64::from(KICK_RATE))
    }

    /// The lease every advert renews.
    pub fn lease(&self) -> Duration {
        tidegate_gateway::ha::election::LEASE_INTERVALS * self.interval
    }

    /// How long after [`Fault::Restore`] the location must have settled,
    /// from the election's timers (MDI: the longest master-down interval;
    /// i: the interval; n: the gateways):
    ///
    /// | term | why |
    /// |---|---|
    /// | max(preempt delay, MDI) + i | a restarted gateway that outranks the master asks for the VIPs no sooner, at its first master advert after |
    /// | 2 MDI | a master that does not hand over is taken over from then |
    /// | MDI | with no master at all, a backup takes over |
    /// | n × 2i | each handover of a chain of preemptions: an advert, an offer, a claim |
    /// | grace | the old master answers for its sessions until then |
    /// | 2i | the last adverts in flight |
    pub fn settle_time(&self) -> Duration {
        let i = self.interval;
        let mdi = self.master_down();
        let delay = self
            .gateways
            .iter()
            .map(|g| g.preempt_delay)
            .max()
            .unwrap_or_default();
        let n = self.gateways.len() as u32;
        delay.max(mdi) + i + 3 * mdi + n * 2 * i + self.grace() + 2 * i
    }
}

/// The gateways of a seed: distinct ids (director mode needs 1 to 255),
/// priorities sometimes tied (ties go to the higher id).
fn gateways(rng: &mut fastrand::Rng, interval: Duration) -> Vec<Gateway> {
    let n = rng.usize(2..=4);
    let mut ids: Vec<u32> = (1..=12).collect();
    rng.shuffle(&mut ids);
    ids.truncate(n);
    ids.sort_unstable();
    let tied = rng.u8(0..4) == 0;
    ids.into_iter()
        .map(|id| Gateway {
            id,
            priority: if tied { 100 } else { rng.u8(1..=255) },
            preempt: rng.u8(0..4) != 0,
            preempt_delay: interval * *pick(rng, &[0, 2, 6]),
            release: VERSION,
        })
        .collect()
}

fn pick<'a, T>(rng: &mut fastrand::Rng, items: &'a [T]) -> &'a T {
    &items[rng.usize(..items.len())]
}

/// Writes the script.
struct Generator {
    rng: fastrand::Rng,
    mode: Mode,
    interval: Duration,
    ids: Vec<u32>,
    /// (gateway, from, until): pauses never overlap.
    pauses: Vec<(u32, Duration, Duration)>,
    script: Vec<(Duration, Fault)>,
}

impl Generator {
    fn push(&mut self, at: Duration, fault: Fault) {
        self.script.push((at, fault));
    }

    /// A fault at `at` and its undoing `after` later, unless that falls at
    /// or past `end` (then [`Fault::Restore`] undoes it).
    fn pair(&mut self, at: Duration, fault: Fault, after: Duration, undo: Fault, end: Duration) {
        self.push(at, fault);
        if at + after < end {
            self.push(at + after, undo);
        }
    }

    fn lease(&self) -> Duration {
        tidegate_gateway::ha::election::LEASE_INTERVALS * self.interval
    }

    fn id(&mut self) -> u32 {
        *pick(&mut self.rng, &self.ids)
    }

    /// Between `a` and `b` intervals.
    fn intervals(&mut self, a: u32, b: u32) -> Duration {
        self.interval * self.rng.u32(a..=b)
    }

    /// A stretch of chaos of `length` from `start`: two to seven faults.
    fn chaos(&mut self, start: Duration, length: Duration) {
        let end = start + length;
        for _ in 0..self.rng.usize(2..=7) {
            let at = start + Duration::from_micros(self.rng.u64(..length.as_micros() as u64));
            self.fault(at, end);
        }
    }

    fn fault(&mut self, at: Duration, end: Duration) {
        let id = self.id();
        let lease = self.lease();
        match self.rng.u8(0..14) {
            0 => {
                let n = self.ids.len();
                let sides: Vec<&'static [u32]> = SIDES
                    .iter()
                    .copied()
                    .filter(|side| side.len() < n && side.iter().all(|&i| (i as usize) < n))
                    .collect();
                let side = *pick(&mut self.rng, &sides);
                let after = self.intervals(3, 30);
                self.pair(at, Fault::Partition(side), after, Fault::Heal, end);
            }
            1 => {
                let weather = if self.rng.bool() {
                    Weather::Slow
                } else {
                    Weather::Lossy(self.rng.u32(5..=50))
                };
                let after = self.intervals(3, 30);
                self.pair(
                    at,
                    Fault::Weather(weather),
                    after,
                    Fault::Weather(Weather::Calm),
                    end,
                );
            }
            4 | 5 => {
                // Well within the lease, about as long, or much longer.
                let i = self.interval;
                let after = match self.rng.u8(0..3) {
                    0 => (lease - i).mul_f64(self.rng.f64()),
                    1 => lease - 2 * i + (3 * i).mul_f64(self.rng.f64()),
                    _ => self.intervals(4, 20),
                };
                self.freeze(at, id, after, end);
            }
            6 => self.stop(at, id, end),
            2 | 3 => {
                let after = self.intervals(1, 20);
                self.pair(at, Fault::Crash(id), after, Fault::Restart(id), end);
            }
            7 => self.clock_step(at, id),
            8 => {
                let forgery = *pick(&mut self.rng, &Forgery::ALL);
                self.push(at, Fault::Forge(forgery, id));
            }
            9 => self.push(at, Fault::Failover),
            10 => {
                let after = self.intervals(2, 20);
                self.pair(
                    at,
                    Fault::Health(id, false),
                    after,
                    Fault::Health(id, true),
                    end,
                );
            }
            11 => {
                let after = self.intervals(2, 20);
                let (on, off) = (Fault::Maintenance(id, true), Fault::Maintenance(id, false));
                self.pair(at, on, after, off, end);
            }
            12 => {
                let points = self.rng.u8(1..=255);
                let after = self.intervals(2, 20);
                self.pair(
                    at,
                    Fault::Penalty(id, points),
                    after,
                    Fault::Penalty(id, 0),
                    end,
                );
            }
            _ => match self.mode {
                Mode::Director => {
                    let after = self.intervals(2, 20);
                    self.pair(
                        at,
                        Fault::Drain(id, true),
                        after,
                        Fault::Drain(id, false),
                        end,
                    );
                }
                Mode::ActiveStandby | Mode::RollingUpgrade => self.push(at, Fault::Failover),
            },
        }
    }

    /// A pause of gateway `id` from `at` for `after` (cut short at `end`),
    /// unless it would overlap another of its pauses.
    fn freeze(&mut self, at: Duration, id: u32, after: Duration, end: Duration) {
        let until = (at + after).min(end);
        if self
            .pauses
            .iter()
            .any(|&(other, from, to)| other == id && at < to && from < until)
        {
            return;
        }
        self.pauses.push((id, at, until));
        self.pair(at, Fault::Freeze(id), after, Fault::Thaw(id), end);
    }

    /// A stop (SIGTERM) of gateway `id`: a master hands over, a backup
    /// leaves at once.
    fn stop(&mut self, at: Duration, id: u32, end: Duration) {
        let after = self.intervals(4, 20);
        self.pair(at, Fault::Stop(id), after, Fault::Restart(id), end);
        // Sometimes paused right after, before a handover on the segment's
        // calm delays completes: a master paused past its lease while
        // handing over steps down on waking, and its stop ends there.
        if self.rng.u8(0..4) == 0 {
            let soon = self.interval / 20;
            let pause = at + Duration::from_micros(self.rng.u64(..soon.as_micros() as u64));
            let thaw = self.intervals(4, 10);
            if pause < end {
                self.freeze(pause, id, thaw, end);
            }
        }
    }

    /// A wall-clock step: forward by up to an hour, or back by up to five
    /// seconds (a restart after it keeps a growing epoch: the epoch file).
    fn clock_step(&mut self, at: Duration, id: u32) {
        let ms = if self.rng.bool() {
            self.rng.i64(1..=3_600_000)
        } else {
            -self.rng.i64(1..=5_000)
        };
        self.push(at, Fault::ClockStep(id, ms));
    }

    /// Rolling upgrades: the gateways in a random order, split into the
    /// rounds' upgrades (at least one in each). Other modes: none.
    fn upgrade_order(&mut self) -> Vec<Vec<u32>> {
        if self.mode != Mode::RollingUpgrade {
            return Vec::new();
        }
        let mut ids = self.ids.clone();
        self.rng.shuffle(&mut ids);
        let later = ids.split_off(self.rng.usize(1..ids.len()));
        vec![ids, later]
    }

    /// Upgrades `ids` one at a time within a stretch of chaos: each is
    /// stopped (SIGTERM: a master hands over) and started again on this
    /// release a few intervals later, the next one after that.
    fn upgrades(&mut self, start: Duration, length: Duration, ids: &[u32]) {
        let end = start + length;
        let slot = length / ids.len() as u32;
        for (n, &id) in ids.iter().enumerate() {
            let at = start + slot * n as u32 + self.intervals(0, 2);
            self.push(at, Fault::Upgrade(id));
            self.push(at, Fault::Stop(id));
            let after = self.intervals(4, 8);
            if at + after < end {
                self.push(at + after, Fault::Restart(id));
            }
        }
    }

    /// Forged adverts in a quiet stretch.
    fn forgeries(&mut self, start: Duration, length: Duration) {
        for _ in 0..self.rng.usize(0..=3) {
            let at = start + Duration::from_micros(self.rng.u64(..length.as_micros() as u64));
            let forgery = *pick(&mut self.rng, &Forgery::ALL);
            let id = self.id();
            self.push(at, Fault::Forge(forgery, id));
        }
    }
}
