//! `cargo xtask bench failover`: how long a client loses the VIP when the
//! master fails or hands over, for Tidegate's HA agent and for keepalived
//! (VRRPv3) on the same two-gateway lab, in one run.
//!
//! The lab is [`tidegate_tests::ha`]'s segment: gateways 1 (priority 100)
//! and 2 (priority 120, the master), adverts every 100 ms over multicast,
//! VIP 198.51.100.100, a UDP echo on the VIP of each gateway and a client
//! probing it every 10 ms. Every run builds a fresh location, the client
//! resolves the VIP first, the event comes 300 ms after probing starts
//! plus a random part of an advert interval, and the scenarios alternate
//! so that the machine's noise falls on all of them:
//!
//! * crash: the master's HA process dies with SIGKILL, its echo too, and
//!   its link goes down (Tidegate: [`HaGateway::crash`]; keepalived: the
//!   VRRP child, then the parent, by pid);
//! * planned: Tidegate `tidectl failover`; keepalived has no handover, so
//!   two stand-ins: its priority lowered below the backup's through a
//!   track file, and SIGTERM (it resigns with a priority-0 advert).
//!
//! For each run: when the backup recorded becoming MASTER (Tidegate: the
//! transition's `at_ms` in `tidectl status --json`; keepalived: its notify
//! script's `date +%s%N`), when the VIP appeared on the backup's interface
//! (`ip -ts monitor address` in its namespace, for both), both from just
//! before the event; and the prober's longest gap and lost probes.
//!
//! [`HaGateway::crash`]: tidegate_tests::ha::HaGateway::crash

use std::fmt::Write as _;
use std::net::IpAddr;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use tidegate_tests::failover::{AddrMonitor, Spread, unix_ms_now};
use tidegate_tests::ha::{Role, VIP, status_of};
use tidegate_tests::keepalived::{KEEPALIVED_BIN, KeepalivedLocation, VrrpState};
use tidegate_tests::{HaLocation, HaOptions, Netns, ProbeSummary, Prober, require_root};

#[path = "failover/tunnel.rs"]
mod tunnel;

/// Priorities of gateways 1 and 2.
const PRIORITIES: [u8; 2] = [100, 120];
/// The master before each event.
const MASTER: u32 = 2;
/// The gateway that takes over.
const BACKUP: u32 = 1;
/// Advert interval, for both systems.
const ADVERT_INTERVAL_MS: u64 = 100;
/// Runs of each scenario unless `--runs` says otherwise.
const DEFAULT_RUNS: usize = 10;
/// A bound on every prober (60 s at 10 ms); each is stopped much sooner.
const PROBES: u64 = 6000;
/// Probes answered before the event, and after the client follows.
const SETTLE: Duration = Duration::from_millis(300);
/// How long a takeover may take.
const SWITCH: Duration = Duration::from_secs(5);
/// How long the client's neighbour entry may take to follow.
const NEIGHBOUR: Duration = Duration::from_secs(3);
/// How long the address monitor may lag behind the state seen by polling.
const MONITOR_LAG: Duration = Duration::from_secs(2);
/// How long the warm-up ping waits for its answer.
const WARM_UP_WAIT: Duration = Duration::from_secs(3);
/// The target: a crash costs the client less than this.
const TARGET_CRASH_GAP_MS: f64 = 400.0;

const USAGE: &str = "usage: failover [--runs N] [--only SCENARIO] [--tunnel]

Measures failover of Tidegate's HA agent and of keepalived on the same
two-gateway namespace lab, N runs (default 10) of each scenario, and prints
min / median / max. --only runs one scenario: tidegate-crash,
tidegate-failover, keepalived-crash, keepalived-priority or
keepalived-sigterm. --tunnel measures tunnels instead: WireGuard clients
probing through their tunnels, crash and planned failover at 100 ms and
20 ms adverts, Tidegate beside keepalived + WireGuard (--only takes
tidegate-crash-100, tidegate-planned-100, tidegate-planned-nowindow-100,
keepalived-crash-100, keepalived-priority-100, tidegate-crash-20,
tidegate-planned-20 or keepalived-crash-20 then). Needs root, keepalived on PATH and the Tidegate
binaries in $TIDEGATE_BIN_DIR (`cargo xtask bench failover` sees to all
three).";

/// One measured scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scenario {
    TidegateCrash,
    TidegateFailover,
    KeepalivedCrash,
    KeepalivedLowerPriority,
    KeepalivedSigterm,
}

impl Scenario {
    const ALL: [Self; 5] = [
        Self::TidegateCrash,
        Self::KeepalivedCrash,
        Self::TidegateFailover,
        Self::KeepalivedLowerPriority,
        Self::KeepalivedSigterm,
    ];

    fn system(self) -> &'static str {
        match self {
            Self::TidegateCrash | Self::TidegateFailover => "Tidegate",
            _ => "keepalived",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::TidegateCrash | Self::KeepalivedCrash => "crash: SIGKILL + link down",
            Self::TidegateFailover => "planned: `tidectl failover`",
            Self::KeepalivedLowerPriority => "planned: priority 120 -> 70 (track file)",
            Self::KeepalivedSigterm => "planned: SIGTERM (priority 0)",
        }
    }

    /// The name `--only` takes.
    fn slug(self) -> &'static str {
        match self {
            Self::TidegateCrash => "tidegate-crash",
            Self::TidegateFailover => "tidegate-failover",
            Self::KeepalivedCrash => "keepalived-crash",
            Self::KeepalivedLowerPriority => "keepalived-priority",
            Self::KeepalivedSigterm => "keepalived-sigterm",
        }
    }

    fn planned(self) -> bool {
        !matches!(self, Self::TidegateCrash | Self::KeepalivedCrash)
    }
}

/// What one run measured, in ms from just before the event.
#[derive(Debug, Clone, Copy)]
struct Sample {
    /// The backup's own record of becoming MASTER.
    master_ms: f64,
    /// The VIP added to the backup's public interface.
    vip_ms: f64,
    /// The prober's longest time without an answer.
    gap_ms: f64,
    /// When that gap began (may be before the event).
    gap_from_ms: f64,
    /// Probes never answered.
    lost: u64,
}

fn main() -> ExitCode {
    let options = match parse_args(std::env::args().skip(1)) {
        Ok(options) => options,
        Err(error) => {
            eprintln!("failover: {error:#}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match bench(&options) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("failover: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// What to run.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Options {
    runs: usize,
    scenarios: Vec<Scenario>,
    /// `--tunnel`: the tunnel scenarios instead.
    tunnel: Option<Vec<tunnel::Scenario>>,
}

fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Options> {
    let mut runs = DEFAULT_RUNS;
    let mut scenarios = Scenario::ALL.to_vec();
    let mut tunnel = false;
    let mut only = None;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            // cargo bench passes this to every harness = false bench.
            "--bench" => {}
            "--tunnel" => tunnel = true,
            "--runs" => {
                runs = args
                    .next()
                    .context("--runs needs a value")?
                    .parse()
                    .context("--runs")?;
                ensure!(runs > 0, "--runs must be at least 1");
            }
            "--only" => only = Some(args.next().context("--only needs a scenario")?),
            other => bail!("unknown argument {other:?}"),
        }
    }
    if tunnel {
        let mut list = tunnel::Scenario::ALL.to_vec();
        if let Some(slug) = only {
            let scenario = tunnel::Scenario::ALL
                .into_iter()
                .find(|s| s.slug() == slug)
                .with_context(|| format!("no tunnel scenario {slug:?}"))?;
            list = vec![scenario];
        }
        return Ok(Options {
            runs,
            scenarios: Vec::new(),
            tunnel: Some(list),
        });
    }
    if let Some(slug) = only {
        let scenario = Scenario::ALL
            .into_iter()
            .find(|s| s.slug() == slug)
            .with_context(|| format!("no scenario {slug:?}"))?;
        scenarios = vec![scenario];
    }
    Ok(Options {
        runs,
        scenarios,
        tunnel: None,
    })
}

fn bench(options: &Options) -> Result<()> {
    let runs = options.runs;
    require_root();
    tidegate_tests::stop::install()?;
    if let Some(scenarios) = &options.tunnel {
        return tunnel::bench(scenarios, runs, &keepalived_version()?);
    }
    let version = keepalived_version()?;
    println!(
        "failover: 2 gateways (priorities {PRIORITIES:?}), adverts every {ADVERT_INTERVAL_MS} ms \
         (multicast), probes every 10 ms; {runs} runs per scenario; {version}"
    );

    let started = Instant::now();
    let mut samples: Vec<(Scenario, Vec<Sample>)> =
        options.scenarios.iter().map(|&s| (s, Vec::new())).collect();
    for round in 1..=runs {
        for (scenario, list) in &mut samples {
            if tidegate_tests::stop::requested() {
                bail!("stopped by a signal after {:.0?}", started.elapsed());
            }
            let sample = measure(*scenario).with_context(|| {
                format!("run {round} of {} {}", scenario.system(), scenario.name())
            })?;
            println!(
                "  run {round:>2}/{runs} {:<10} {:<40} MASTER {:>6.1} ms, VIP {:>6.1} ms, \
                 gap {:>6.1} ms from {:>+6.1} ms, lost {:>3}",
                scenario.system(),
                scenario.name(),
                sample.master_ms,
                sample.vip_ms,
                sample.gap_ms,
                sample.gap_from_ms,
                sample.lost
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

/// keepalived's version line, or an error saying to install it.
fn keepalived_version() -> Result<String> {
    let version = std::process::Command::new(KEEPALIVED_BIN)
        .arg("--version")
        .output()
        .with_context(|| {
            format!("running `{KEEPALIVED_BIN} --version`: install the Debian package keepalived")
        })?;
    Ok(String::from_utf8_lossy(&version.stderr)
        .lines()
        .chain(String::from_utf8_lossy(&version.stdout).lines())
        .find(|line| line.starts_with("Keepalived"))
        .map(str::to_owned)
        .unwrap_or_else(|| "keepalived (version unknown)".to_owned()))
}

/// One run of `scenario` on a fresh location.
fn measure(scenario: Scenario) -> Result<Sample> {
    let options = HaOptions {
        advert_interval_ms: ADVERT_INTERVAL_MS,
        ..HaOptions::priorities(&PRIORITIES)
    };
    match scenario {
        Scenario::TidegateCrash | Scenario::TidegateFailover => {
            tidegate(&options, scenario.planned())
        }
        _ => keepalived(&options, scenario),
    }
}

/// Starts the address monitor in the backup's namespace.
fn monitor(netns: &Netns, dir: &std::path::Path) -> Result<AddrMonitor> {
    AddrMonitor::start(netns, &dir.join("backup-addresses.log"))
}

/// When the VIP appeared on `ifname` after `t0`, as the monitor saw it.
fn vip_added(monitor: &mut AddrMonitor, ifname: &str, t0: f64) -> Result<f64> {
    let started = Instant::now();
    loop {
        if let Some(at) = monitor.first_add_after(ifname, VIP, t0)? {
            return Ok(at);
        }
        ensure!(
            started.elapsed() < MONITOR_LAG,
            "the address monitor saw no {VIP} added to {ifname}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits [`SETTLE`] and then a random part of an advert interval, so that
/// the event falls at a random phase of the master's advert cycle: the
/// steps before it take about the same time in every run, which would
/// otherwise put it at nearly the same time after an advert each time (and
/// a crash's detection time depends on how long ago the last advert was).
fn settle_then_jitter() {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let jitter_us = u64::from(nanos / 1000) % (ADVERT_INTERVAL_MS * 1000);
    std::thread::sleep(SETTLE + Duration::from_micros(jitter_us));
}

/// Makes the client resolve the VIP before probing starts, so that every
/// run begins with the client's neighbour entry on the master: a ping
/// with time for one ARP retransmission (the first ARP request on a
/// segment this young is often unanswered).
fn warm_up(client: &Netns) -> Result<()> {
    let report = client.ping_paced(IpAddr::V4(VIP), 1, Duration::from_millis(200), WARM_UP_WAIT)?;
    ensure!(
        report.received == 1,
        "the client could not reach {VIP}: {}",
        report.summary
    );
    Ok(())
}

/// When the prober's longest gap began, in ms from `t0` (Unix ms).
fn gap_start(summary: &ProbeSummary, t0: f64) -> f64 {
    summary.started_unix_ms as f64 + summary.longest_gap_from_ms - t0
}

/// Checks that the client was served by the master, then by the backup,
/// and returns its summary.
fn served_by_both(prober: Prober) -> Result<ProbeSummary> {
    let summary = prober.finish()?;
    ensure!(
        summary.sequence == [MASTER, BACKUP],
        "answered by {:?}, expected [{MASTER}, {BACKUP}]: {}",
        summary.sequence,
        summary.brief()
    );
    Ok(summary)
}

fn tidegate(options: &HaOptions, planned: bool) -> Result<Sample> {
    let mut location = HaLocation::build(options)?;
    warm_up(location.client())?;
    location.wait_client_neighbour(MASTER, NEIGHBOUR)?;
    let backup = location.gateway(BACKUP);
    let ifname = backup.ifname().to_owned();
    let mut monitor = monitor(backup.netns(), location.run().dir())?;
    let prober = location.start_prober(PROBES)?;
    settle_then_jitter();

    let t0 = unix_ms_now();
    if planned {
        let out = location.gateway(MASTER).tidectl(&["failover"])?;
        ensure!(
            out.status.success()
                && out
                    .stdout
                    .contains(&format!("handing over to gateway {BACKUP}")),
            "tidectl failover: {} {:?} {:?}",
            out.status,
            out.stdout,
            out.stderr
        );
    } else {
        location.gateway_mut(MASTER).crash()?;
    }
    let statuses = location.wait_master(BACKUP, SWITCH)?;
    let became = status_of(&statuses, BACKUP)?
        .last_change_to(Role::Master)
        .context("the backup has no transition to MASTER")?
        .at_ms;
    location.wait_client_neighbour(BACKUP, NEIGHBOUR)?;
    std::thread::sleep(SETTLE);
    let summary = served_by_both(prober).map_err(|e| e.context(location.log_tails()))?;
    let vip = vip_added(&mut monitor, &ifname, t0)?;
    // Transitions carry whole ms: compare with the event's whole ms.
    let master_ms = became as f64 - t0.floor();
    ensure!(
        master_ms >= 0.0,
        "the backup became MASTER {master_ms} ms before the event"
    );
    Ok(Sample {
        master_ms,
        vip_ms: vip - t0,
        gap_ms: summary.longest_gap_ms,
        gap_from_ms: gap_start(&summary, t0),
        lost: summary.lost,
    })
}

fn keepalived(options: &HaOptions, scenario: Scenario) -> Result<Sample> {
    let mut location = KeepalivedLocation::build(options)?;
    warm_up(location.client())?;
    location.wait_client_neighbour(MASTER, NEIGHBOUR)?;
    let backup = location.gateway(BACKUP);
    let ifname = backup.ifname().to_owned();
    let mut monitor = monitor(backup.netns(), location.run().dir())?;
    let prober = location.start_prober(PROBES)?;
    settle_then_jitter();

    let t0 = unix_ms_now();
    let master = location.gateway_mut(MASTER);
    match scenario {
        Scenario::KeepalivedCrash => master.crash()?,
        Scenario::KeepalivedLowerPriority => master.lower_priority()?,
        Scenario::KeepalivedSigterm => {
            let status = master.stop_keepalived()?;
            ensure!(status.success(), "keepalived exited {status} on SIGTERM");
        }
        other => bail!("{other:?} is not a keepalived scenario"),
    }
    location.wait_master(BACKUP, SWITCH)?;
    let became = location
        .gateway(BACKUP)
        .first_notification_after(VrrpState::Master, t0)?
        .context("keepalived on the backup reported no MASTER")?;
    location.wait_client_neighbour(BACKUP, NEIGHBOUR)?;
    std::thread::sleep(SETTLE);
    let summary = served_by_both(prober).map_err(|e| e.context(location.log_tails()))?;
    let vip = vip_added(&mut monitor, &ifname, t0)?;
    Ok(Sample {
        master_ms: became - t0,
        vip_ms: vip - t0,
        gap_ms: summary.longest_gap_ms,
        gap_from_ms: gap_start(&summary, t0),
        lost: summary.lost,
    })
}

/// The figures as a Markdown table: min / median / max per scenario.
fn table(samples: &[(Scenario, Vec<Sample>)]) -> Result<String> {
    let mut out = String::from(
        "| system | scenario | runs | backup MASTER after (ms) | VIP on backup after (ms) \
         | longest probe gap (ms) | probes lost |\n|---|---|---:|---|---|---|---|\n",
    );
    for (scenario, list) in samples {
        let spread = |f: fn(&Sample) -> f64| Spread::of(&list.iter().map(f).collect::<Vec<_>>());
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} |",
            scenario.system(),
            scenario.name(),
            list.len(),
            spread(|s| s.master_ms)?.show(1),
            spread(|s| s.vip_ms)?.show(1),
            spread(|s| s.gap_ms)?.show(1),
            spread(|s| s.lost as f64)?.show(0),
        );
    }
    out.push_str("\neach cell: min / median / max over the runs; times from just before the event");
    Ok(out)
}

/// Whether Tidegate meets the targets, with the numbers (for the
/// Tidegate scenarios that ran).
fn verdict(samples: &[(Scenario, Vec<Sample>)]) -> Result<String> {
    let of = |wanted: Scenario| {
        samples
            .iter()
            .find(|(s, _)| *s == wanted)
            .map(|(_, list)| list.as_slice())
    };
    let mut lines = Vec::new();
    if let Some(crash) = of(Scenario::TidegateCrash) {
        let gaps = Spread::of(&crash.iter().map(|s| s.gap_ms).collect::<Vec<_>>())?;
        let over = crash
            .iter()
            .filter(|s| s.gap_ms >= TARGET_CRASH_GAP_MS)
            .count();
        lines.push(if over == 0 {
            format!(
                "Tidegate target met: crash gap under {TARGET_CRASH_GAP_MS:.0} ms in all {} runs \
                 (max {:.1} ms)",
                crash.len(),
                gaps.max
            )
        } else {
            format!(
                "Tidegate target MISSED: crash gap of {TARGET_CRASH_GAP_MS:.0} ms or more in {over} \
                 of {} runs (max {:.1} ms, median {:.1} ms)",
                crash.len(),
                gaps.max,
                gaps.median
            )
        });
    }
    if let Some(planned) = of(Scenario::TidegateFailover) {
        let lossy: Vec<u64> = planned
            .iter()
            .map(|s| s.lost)
            .filter(|&lost| lost > 0)
            .collect();
        lines.push(if lossy.is_empty() {
            format!(
                "Tidegate target met: planned failover lost no probe in all {} runs",
                planned.len()
            )
        } else {
            format!(
                "Tidegate target MISSED: planned failover lost probes in {} of {} runs ({lossy:?})",
                lossy.len(),
                planned.len()
            )
        });
    }
    Ok(lines.join("\n"))
}
