//! `cargo xtask bench adverts`: whether a loaded master keeps its advert
//! pace, at 100 ms and at 20 ms adverts.
//!
//! The lab is [`TunnelLocation`]: gateways 1 (priority 100) and 2 (priority
//! 120, the master) run the location's WireGuard (wireguard-go), and
//! [`CLIENTS`] WireGuard clients are peered with the VIP. For each advert
//! interval it first watches the adverts of the idle location for
//! [`IDLE`] (the baseline), then for [`LOADED`] while both CPUs are busy:
//! every client sends datagrams through its tunnel to the master's echo as
//! fast as it can (`tidegate-blast`), the master reloads a config of
//! [`PEERS`] peers and then another, over and over, and its status is asked
//! for every 100 ms. Adverts are read on the segment, from the client's
//! namespace.
//!
//! Measured: the master's longest time between two adverts as they arrive
//! in the client's namespace (in ms and in intervals: it includes the
//! segment's own delivery delays), false failovers (the backup's record of
//! becoming MASTER) and the backup's adverts as MASTER, the CPUs' busy share
//! from `/proc/stat`, the reloads done and the status requests answered.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use tidegate_tests::adverts::{
    AdvertWatch, CpuTimes, StatusPolls, longest_gap, numbered_peer, others_as_master, reload_peers,
    unix_ms_at,
};
use tidegate_tests::continuity::{ClientOptions, TunnelLocation};
use tidegate_tests::ha::{ECHO_PORT, TUNNEL_ADDR, TunnelOptions};
use tidegate_tests::process::Process;
use tidegate_tests::steer_lab::BLAST_BIN;
use tidegate_tests::{HaOptions, binary, require_root};

/// Gateway priorities; gateway 2 is the master.
const PRIORITIES: [u8; 2] = [100, 120];
const MASTER: u32 = 2;
const BACKUP: u32 = 1;
/// WireGuard clients, each sending through its tunnel.
const CLIENTS: usize = 2;
/// Peers of each config the master reloads.
const PEERS: usize = 10_000;
/// The idle baseline, and the loaded watch.
const IDLE: Duration = Duration::from_secs(15);
const LOADED: Duration = Duration::from_secs(60);
/// The advert intervals measured.
const INTERVALS_MS: [u64; 2] = [100, 20];

fn main() -> ExitCode {
    match bench() {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("adverts: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// One watch of the master's adverts.
struct Watch {
    adverts: usize,
    longest: Duration,
    false_failovers: usize,
    backup_as_master: usize,
    busy: f64,
    reloads: u32,
    status_answers: u32,
}

fn bench() -> Result<()> {
    require_root();
    binary(BLAST_BIN)?;
    println!(
        "adverts: {CLIENTS} WireGuard clients sending through their tunnels to the master, \
         which reloads {PEERS} peers over and over and is asked for its status every 100 ms; \
         {} s idle, then {} s loaded, at each advert interval",
        IDLE.as_secs(),
        LOADED.as_secs()
    );
    let mut table = String::from(
        "| adverts | phase | watched (s) | CPUs busy | master's adverts | longest gap (ms) | longest gap (intervals) | false failovers | backup's adverts as MASTER | reloads | status answers |\n\
         |---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    let mut failures = Vec::new();
    for interval_ms in INTERVALS_MS {
        let interval = Duration::from_millis(interval_ms);
        let mut options = HaOptions::priorities(&PRIORITIES);
        options.advert_interval_ms = interval_ms;
        let tunnel = TunnelOptions {
            private_key: String::new(),
            stats_interval_ms: Some(200),
            kick_rate: None,
            handover_window_ms: None,
        };
        let clients = ClientOptions {
            count: CLIENTS,
            keepalive: None,
        };
        let mut lab = TunnelLocation::build(&options, tunnel, &clients)?;
        lab.location_mut()
            .wait_master(MASTER, Duration::from_secs(5))?;
        for (phase, duration, loaded) in [("idle", IDLE, false), ("loaded", LOADED, true)] {
            let watch = watch(&mut lab, duration, loaded)?;
            let intervals = watch.longest.as_secs_f64() / interval.as_secs_f64();
            let _ = writeln!(
                table,
                "| {interval_ms} ms | {phase} | {} | {:.0}% | {} | {:.1} | {intervals:.2} | {} | {} | {} | {} |",
                duration.as_secs(),
                watch.busy * 100.0,
                watch.adverts,
                watch.longest.as_secs_f64() * 1000.0,
                watch.false_failovers,
                watch.backup_as_master,
                watch.reloads,
                watch.status_answers,
            );
            println!(
                "  {interval_ms} ms adverts, {phase}: longest gap {intervals:.2} intervals, {} false failovers",
                watch.false_failovers
            );
            if watch.false_failovers > 0 {
                failures.push(format!(
                    "{interval_ms} ms {phase}: {} false failovers",
                    watch.false_failovers
                ));
            }
        }
    }
    println!("\n{table}");
    ensure!(failures.is_empty(), "false failovers: {failures:?}");
    Ok(())
}

/// Watches the master's adverts for `duration`, with the load when `loaded`.
fn watch(lab: &mut TunnelLocation, duration: Duration, loaded: bool) -> Result<Watch> {
    let adverts = AdvertWatch::start(lab.location())?;
    let cpu = CpuTimes::read()?;
    let started = Instant::now();
    let mut reloads = 0;
    let mut status_answers = 0;
    if loaded {
        let polls = StatusPolls::start(lab.location().gateway(MASTER), Duration::from_millis(100))?;
        let blasts = lab
            .clients()
            .iter()
            .map(|client| blast(client.netns(), duration))
            .collect::<Result<Vec<_>>>()?;
        // The clients' peers stay; 10,000 others come and go.
        let clients = lab
            .location()
            .gateway(MASTER)
            .daemon()
            .config()
            .peers
            .clone();
        let set = |range: std::ops::Range<usize>| -> Vec<_> {
            clients
                .iter()
                .cloned()
                .chain(range.map(numbered_peer))
                .collect()
        };
        let sets = [set(0..PEERS), set(PEERS..2 * PEERS)];
        while started.elapsed() < duration {
            let peers = sets[reloads as usize % 2].clone();
            reload_peers(lab.location_mut().gateway_mut(MASTER), peers)?;
            reloads += 1;
        }
        std::thread::sleep(duration.saturating_sub(started.elapsed()));
        status_answers = polls.finish()?;
        for mut process in blasts {
            process.ensure_stopped()?;
        }
    } else {
        std::thread::sleep(duration);
    }
    let busy = cpu.busy_since()?;
    let seen = adverts.finish()?;
    let (count, longest) = longest_gap(&seen, MASTER, started);
    let took_over = lab
        .location_mut()
        .status(BACKUP)?
        .became_master_since(unix_ms_at(started));
    Ok(Watch {
        adverts: count,
        longest,
        false_failovers: took_over,
        backup_as_master: others_as_master(&seen, MASTER, started),
        busy,
        reloads,
        status_answers,
    })
}

/// `tidegate-blast` in `netns`, through the client's tunnel to the
/// master's echo, for `duration`.
fn blast(netns: &tidegate_tests::Netns, duration: Duration) -> Result<Process> {
    let log = std::env::temp_dir().join(format!("tidegate-blast-{}.log", netns.name()));
    let mut command = netns.command(binary(BLAST_BIN)?);
    command
        .args([
            "--target",
            &SocketAddr::from((TUNNEL_ADDR, ECHO_PORT)).to_string(),
        ])
        .args(["--seconds", &duration.as_secs().to_string()])
        .args(["--sources", "2", "--len", "256"]);
    Process::spawn(BLAST_BIN, netns, command, &log)
}
