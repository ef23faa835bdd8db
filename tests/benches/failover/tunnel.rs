//! `cargo xtask bench failover --tunnel`: how long WireGuard tunnels stay
//! dead when the master fails or hands over, for Tidegate (endpoint
//! sharing, kicked handshakes, the egress guard, the handover's second
//! chance) and for keepalived moving the VIP in front of the same
//! WireGuard, on the same lab, in one run.
//!
//! The lab is [`tidegate_tests::continuity`]'s: gateways 1 (priority 100)
//! and 2 (priority 120, the master), the location's WireGuard on both (the
//! same key and peers), and [`CLIENTS`] WireGuard clients (wireguard-go),
//! each probing the echo on the gateways' tunnel address through its
//! tunnel every 10 ms. Every run builds a fresh location, every client
//! completes a handshake with the master, the probers start, and the event
//! comes 300 ms later plus a random part of an advert interval. The run
//! ends once every client is back: Tidegate's own record of the failover
//! says so (every recently active peer has a fresh handshake), and for
//! keepalived each client's WireGuard shows a new handshake (bounded by
//! [`RECOVERY`]). Scenarios alternate, run by run.
//!
//! For each run: the longest tunnel gap of all clients (each prober's
//! longest time without an answer), the median client's gap, the probes
//! lost by all clients together, and for Tidegate the time from taking the
//! VIP until 95% of the clients had a fresh handshake; and how many
//! clients' endpoint for the location was no longer the VIP at the end.
//!
//! One more Tidegate scenario, a planned failover with the handover window
//! off (`handover_window_ms = 0`), shows what kicks alone lose.

use std::fmt::Write as _;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, bail, ensure};
use std::net::SocketAddr;

use tidegate_tests::continuity::{
    ClientOptions, KeepalivedTunnel, TunnelClient, TunnelLocation, finish_probers,
    wait_fresh_handshakes, wait_tunnels_answer,
};
use tidegate_tests::failover::Spread;
use tidegate_tests::ha::{SERVICE_PORT, TunnelOptions, VIP};
use tidegate_tests::{HaOptions, ProbeSummary};

/// Priorities of gateways 1 and 2.
const PRIORITIES: [u8; 2] = [100, 120];
/// The master before each event.
const MASTER: u32 = 2;
/// The gateway that takes over.
const BACKUP: u32 = 1;
/// WireGuard clients per run.
const CLIENTS: usize = 10;
/// A bound on every prober (120 s at 10 ms); each is stopped much sooner.
const PROBES: u64 = 12_000;
/// Probes answered before the event, and after the last client is back.
const SETTLE: Duration = Duration::from_millis(300);
/// How long a takeover may take.
const SWITCH: Duration = Duration::from_secs(5);
/// How long the clients may take to come back (keepalived: their own
/// re-handshake, about 15 s).
const RECOVERY: Duration = Duration::from_secs(60);
/// The targets.
const TARGET_CRASH_MEDIAN_MS_100: f64 = 500.0;
const TARGET_CRASH_MAX_MS_100: f64 = 1000.0;
const TARGET_CRASH_MS_20: f64 = 150.0;

/// Which system.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum System {
    Tidegate,
    Keepalived,
}

/// What happens to the master.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Event {
    /// Its HA process, WireGuard and echo die, its link goes down.
    Crash,
    /// Tidegate: `tidectl failover`. keepalived: its priority lowered
    /// below the backup's (its closest thing to a handover).
    Planned,
    /// Tidegate: `tidectl failover` with no handover window
    /// (`handover_window_ms = 0`): kicks alone.
    PlannedNoWindow,
}

/// One measured scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scenario {
    system: System,
    event: Event,
    advert_ms: u64,
}

impl Scenario {
    pub const ALL: [Self; 8] = [
        Self::new(System::Tidegate, Event::Crash, 100),
        Self::new(System::Keepalived, Event::Crash, 100),
        Self::new(System::Tidegate, Event::Planned, 100),
        Self::new(System::Tidegate, Event::PlannedNoWindow, 100),
        Self::new(System::Keepalived, Event::Planned, 100),
        Self::new(System::Tidegate, Event::Crash, 20),
        Self::new(System::Keepalived, Event::Crash, 20),
        Self::new(System::Tidegate, Event::Planned, 20),
    ];

    const fn new(system: System, event: Event, advert_ms: u64) -> Self {
        Self {
            system,
            event,
            advert_ms,
        }
    }

    /// The name `--only` takes.
    pub fn slug(self) -> String {
        let system = match self.system {
            System::Tidegate => "tidegate",
            System::Keepalived => "keepalived",
        };
        let event = match (self.system, self.event) {
            (_, Event::Crash) => "crash",
            (System::Tidegate, Event::Planned) => "planned",
            (_, Event::PlannedNoWindow) => "planned-nowindow",
            (System::Keepalived, Event::Planned) => "priority",
        };
        format!("{system}-{event}-{}", self.advert_ms)
    }

    fn system_name(self) -> &'static str {
        match self.system {
            System::Tidegate => "Tidegate",
            System::Keepalived => "keepalived + WireGuard",
        }
    }

    fn event_name(self) -> &'static str {
        match (self.system, self.event) {
            (_, Event::Crash) => "crash",
            (System::Tidegate, Event::Planned) => "planned: `tidectl failover`",
            (_, Event::PlannedNoWindow) => "planned, no handover window",
            (System::Keepalived, Event::Planned) => "planned: priority 120 -> 70",
        }
    }
}

/// What one run measured.
#[derive(Debug, Clone, Copy)]
struct Sample {
    /// The longest tunnel gap of any client.
    worst_gap_ms: f64,
    /// The median client's longest gap.
    median_gap_ms: f64,
    /// Probes lost by all clients together.
    lost: u64,
    /// Tidegate: from taking the VIP until 95% of the clients were back.
    fresh_95_ms: Option<f64>,
    /// Clients whose endpoint for the location was not the VIP at the end
    /// (an old master's WireGuard took them back from its host address).
    off_vip: usize,
}

/// Runs every scenario `runs` times, alternating, and prints the figures.
pub fn bench(scenarios: &[Scenario], runs: usize, keepalived: &str) -> Result<()> {
    println!(
        "failover --tunnel: 2 gateways (priorities {PRIORITIES:?}), {CLIENTS} WireGuard clients \
         (wireguard-go) probing through their tunnels every 10 ms; {runs} runs per scenario; \
         {keepalived}"
    );
    let started = Instant::now();
    let mut samples: Vec<(Scenario, Vec<Sample>)> =
        scenarios.iter().map(|&s| (s, Vec::new())).collect();
    for round in 1..=runs {
        for (scenario, list) in &mut samples {
            if tidegate_tests::stop::requested() {
                bail!("stopped by a signal after {:.0?}", started.elapsed());
            }
            let sample = measure(*scenario).with_context(|| {
                format!(
                    "run {round} of {} {} at {} ms adverts",
                    scenario.system_name(),
                    scenario.event_name(),
                    scenario.advert_ms
                )
            })?;
            println!(
                "  run {round:>2}/{runs} {:<22} {:<28} {:>3} ms adverts: worst gap {:>8.1} ms, \
                 median {:>8.1} ms, lost {:>5}, 95% back {}, off the VIP {}",
                scenario.system_name(),
                scenario.event_name(),
                scenario.advert_ms,
                sample.worst_gap_ms,
                sample.median_gap_ms,
                sample.lost,
                sample
                    .fresh_95_ms
                    .map_or_else(|| "-".to_owned(), |ms| format!("{ms:.0} ms")),
                sample.off_vip,
            );
            list.push(sample);
        }
    }
    println!(
        "\n{} runs in {:.0?}\n",
        runs * samples.len(),
        started.elapsed()
    );
    println!("{}", table(&samples)?);
    println!("{}", verdict(&samples)?);
    Ok(())
}

fn measure(scenario: Scenario) -> Result<Sample> {
    let options = HaOptions {
        advert_interval_ms: scenario.advert_ms,
        ..HaOptions::priorities(&PRIORITIES)
    };
    let clients = ClientOptions {
        count: CLIENTS,
        keepalive: None,
    };
    match scenario.system {
        System::Tidegate => tidegate(scenario, &options, &clients),
        System::Keepalived => keepalived(scenario, &options, &clients),
    }
}

/// Waits [`SETTLE`] and then a random part of an advert interval (see the
/// VIP benchmark's `settle_then_jitter`).
fn settle_then_jitter(advert_ms: u64) {
    let nanos = SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let jitter_us = u64::from(nanos / 1000) % (advert_ms * 1000);
    std::thread::sleep(SETTLE + Duration::from_micros(jitter_us));
}

fn tidegate(scenario: Scenario, options: &HaOptions, clients: &ClientOptions) -> Result<Sample> {
    let tunnel = TunnelOptions {
        private_key: String::new(),
        stats_interval_ms: Some(200),
        kick_rate: None,
        handover_window_ms: (scenario.event == Event::PlannedNoWindow).then_some(0),
    };
    let mut location = TunnelLocation::build(options, tunnel, clients)?;
    location.wait_shared(BACKUP, SWITCH)?;
    let probers = location.start_probers(PROBES)?;
    settle_then_jitter(scenario.advert_ms);
    let since = SystemTime::now();
    match scenario.event {
        Event::Crash => location.location_mut().gateway_mut(MASTER).crash_all()?,
        Event::Planned | Event::PlannedNoWindow => {
            let out = location.location().gateway(MASTER).tidectl(&["failover"])?;
            ensure!(out.status.success(), "tidectl failover: {out:?}");
        }
    }
    location.location_mut().wait_master(BACKUP, SWITCH)?;
    let status = location.wait_followed(BACKUP, since, RECOVERY)?;
    std::thread::sleep(SETTLE);
    let summaries = finish_probers(probers)?;
    served_by_both(&summaries, true)?;
    let report = status.failovers.last().context("no failover report")?;
    ensure!(
        report.completed == CLIENTS,
        "not every client came back: {report:?}"
    );
    let off_vip = off_vip(location.clients())?;
    ensure!(off_vip == 0, "{off_vip} clients are off the VIP");
    sample(&summaries, report.fresh_95_ms.map(|ms| ms as f64), off_vip)
}

fn keepalived(scenario: Scenario, options: &HaOptions, clients: &ClientOptions) -> Result<Sample> {
    let mut location = KeepalivedTunnel::build(options, clients)?;
    location.location_mut().wait_master(MASTER, SWITCH)?;
    let before: Vec<u64> = location
        .clients()
        .iter()
        .map(|c| c.latest_handshake())
        .collect::<Result<_>>()?;
    let probers = location.start_probers(PROBES)?;
    settle_then_jitter(scenario.advert_ms);
    match scenario.event {
        Event::Crash => location.crash(MASTER)?,
        Event::Planned | Event::PlannedNoWindow => {
            location.location().gateway(MASTER).lower_priority()?;
        }
    }
    location.location_mut().wait_master(BACKUP, SWITCH)?;
    wait_fresh_handshakes(location.clients(), &before, RECOVERY)?;
    wait_tunnels_answer(location.clients(), RECOVERY)?;
    std::thread::sleep(SETTLE);
    let summaries = finish_probers(probers)?;
    served_by_both(&summaries, false)?;
    let off_vip = off_vip(location.clients())?;
    sample(&summaries, None, off_vip)
}

/// How many clients' endpoint for the location is not the VIP.
fn off_vip(clients: &[TunnelClient]) -> Result<usize> {
    let vip = SocketAddr::from((VIP, SERVICE_PORT)).to_string();
    let mut off = 0;
    for client in clients {
        if client.gateway_endpoint()?.as_deref() != Some(vip.as_str()) {
            off += 1;
        }
    }
    Ok(off)
}

/// Every client was served by the master, then by the backup (`only`);
/// or, with keepalived, whose old master may take a client back, by the
/// master first and by someone at the end.
fn served_by_both(summaries: &[ProbeSummary], only: bool) -> Result<()> {
    for (i, summary) in summaries.iter().enumerate() {
        let served = if only {
            summary.sequence == [MASTER, BACKUP]
        } else {
            summary.sequence.first() == Some(&MASTER)
                && summary.runs.last().is_some_and(|run| run.gateway.is_some())
        };
        ensure!(
            served,
            "client {i} answered by {:?}: {}",
            summary.sequence,
            summary.brief()
        );
    }
    Ok(())
}

fn sample(summaries: &[ProbeSummary], fresh_95_ms: Option<f64>, off_vip: usize) -> Result<Sample> {
    let gaps: Vec<f64> = summaries.iter().map(|s| s.longest_gap_ms).collect();
    let spread = Spread::of(&gaps)?;
    Ok(Sample {
        worst_gap_ms: spread.max,
        median_gap_ms: spread.median,
        lost: summaries.iter().map(|s| s.lost).sum(),
        fresh_95_ms,
        off_vip,
    })
}

/// The figures as a Markdown table: min / median / max per scenario.
fn table(samples: &[(Scenario, Vec<Sample>)]) -> Result<String> {
    let mut out = String::from(
        "| system | event | adverts | runs | worst client's tunnel gap (ms) \
         | median client's gap (ms) | probes lost (all clients) | 95% of clients back (ms) \
         | clients off the VIP at the end |\n\
         |---|---|---:|---:|---|---|---|---|---|\n",
    );
    for (scenario, list) in samples {
        let spread = |f: fn(&Sample) -> f64| Spread::of(&list.iter().map(f).collect::<Vec<_>>());
        let fresh: Vec<f64> = list.iter().filter_map(|s| s.fresh_95_ms).collect();
        let _ = writeln!(
            out,
            "| {} | {} | {} ms | {} | {} | {} | {} | {} | {} |",
            scenario.system_name(),
            scenario.event_name(),
            scenario.advert_ms,
            list.len(),
            spread(|s| s.worst_gap_ms)?.show(1),
            spread(|s| s.median_gap_ms)?.show(1),
            spread(|s| s.lost as f64)?.show(0),
            if fresh.is_empty() {
                "-".to_owned()
            } else {
                Spread::of(&fresh)?.show(0)
            },
            spread(|s| s.off_vip as f64)?.show(0),
        );
    }
    out.push_str("\neach cell: min / median / max over the runs");
    Ok(out)
}

/// Whether Tidegate meets the targets, with the numbers.
fn verdict(samples: &[(Scenario, Vec<Sample>)]) -> Result<String> {
    let mut lines = Vec::new();
    for (scenario, list) in samples {
        if scenario.system != System::Tidegate {
            continue;
        }
        let gaps = Spread::of(&list.iter().map(|s| s.worst_gap_ms).collect::<Vec<_>>())?;
        let line = match (scenario.event, scenario.advert_ms) {
            (Event::Crash, 100) => {
                let met =
                    gaps.median < TARGET_CRASH_MEDIAN_MS_100 && gaps.max < TARGET_CRASH_MAX_MS_100;
                format!(
                    "crash at 100 ms adverts: worst-client gap median {:.1} ms (target < {TARGET_CRASH_MEDIAN_MS_100:.0}), \
                     max {:.1} ms (target < {TARGET_CRASH_MAX_MS_100:.0}): {}",
                    gaps.median,
                    gaps.max,
                    if met { "met" } else { "MISSED" }
                )
            }
            (Event::Crash, advert) => format!(
                "crash at {advert} ms adverts: worst-client gap median {:.1} ms, max {:.1} ms \
                 (target < {TARGET_CRASH_MS_20:.0}): median {}, max {}",
                gaps.median,
                gaps.max,
                if gaps.median < TARGET_CRASH_MS_20 {
                    "met"
                } else {
                    "MISSED"
                },
                if gaps.max < TARGET_CRASH_MS_20 {
                    "met"
                } else {
                    "MISSED"
                },
            ),
            (Event::PlannedNoWindow, advert) => {
                let lost = Spread::of(&list.iter().map(|s| s.lost as f64).collect::<Vec<_>>())?;
                format!(
                    "planned at {advert} ms adverts without the handover window (kicks alone): \
                     probes lost {} (min / median / max): the window is what makes it lossless",
                    lost.show(0)
                )
            }
            (Event::Planned, advert) => {
                let lossy: Vec<u64> = list.iter().map(|s| s.lost).filter(|&l| l > 0).collect();
                format!(
                    "planned at {advert} ms adverts: probes lost in {} of {} runs {lossy:?} (target: none): {}",
                    lossy.len(),
                    list.len(),
                    if lossy.is_empty() { "met" } else { "MISSED" }
                )
            }
        };
        lines.push(format!("Tidegate {line}"));
    }
    Ok(lines.join("\n"))
}
