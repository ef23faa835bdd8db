//! `cargo xtask bench flood`: a flood on the HA advert port against the
//! advert pace of the master, at 100 ms and at 20 ms adverts.
//!
//! The lab is [`HaLocation`]: gateways 1 (priority 150) and 2 (priority
//! 200, the master), multicast adverts. For each advert interval it first
//! watches the adverts of the idle location for [`IDLE`] (the baseline),
//! then for [`FLOODED`] while a host on the segment (the client's
//! namespace) floods the advert port of both gateways, of the VIP and of
//! the advert group from [`THREADS`] threads with `sendmmsg`, as fast as
//! this machine sends: junk, endpoint-shaped junk and adverts signed with
//! the wrong key, half of the threads with TTL 255 (past the shield's TTL
//! check, into the strangers' budget), half with TTL 64.
//!
//! Measured: the flood's rate, what each gateway's shield passed and
//! dropped by reason, what the agents' sockets dropped, the master's
//! longest time between two adverts as they arrive in the client's
//! namespace (a host that is itself flooding), false failovers (the
//! backup's record of becoming MASTER), and the CPUs' busy share.

use std::fmt::Write as _;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use tidegate_tests::adverts::{AdvertWatch, CpuTimes, longest_gap, others_as_master, unix_ms_at};
use tidegate_tests::flood::{Flood, advert_port_flood};
use tidegate_tests::gateway::Counters;
use tidegate_tests::ha::CLIENT_ADDR;
use tidegate_tests::{HaLocation, HaOptions, require_root};

/// Gateway priorities; gateway 2 is the master.
const PRIORITIES: [u8; 2] = [150, 200];
const MASTER: u32 = 2;
const BACKUP: u32 = 1;
/// The idle baseline, and the flooded watch.
const IDLE: Duration = Duration::from_secs(10);
const FLOODED: Duration = Duration::from_secs(30);
/// Threads sending the flood.
const THREADS: usize = 4;
/// The advert intervals measured.
const INTERVALS_MS: [u64; 2] = [100, 20];
/// The shield's counters of the advert port, as the table names them.
const ADVERT_COUNTERS: [&str; 4] = [
    "advert",
    "advert-ttl",
    "advert-stranger",
    "advert-throttled",
];

fn main() -> ExitCode {
    match bench() {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("flood: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// One watch of the master's adverts.
struct Watch {
    sent: u64,
    rate: f64,
    adverts: usize,
    longest: Duration,
    false_failovers: usize,
    backup_as_master: usize,
    busy: f64,
    /// Per gateway: the shield's advert counters' packets, then the
    /// socket's drops.
    dropped: Vec<(u32, [u64; 4], u64)>,
}

fn bench() -> Result<()> {
    require_root();
    println!(
        "flood: a host on the segment floods the advert port from {THREADS} threads; \
         {} s idle, then {} s flooded, at each advert interval",
        IDLE.as_secs(),
        FLOODED.as_secs()
    );
    let mut table = String::from(
        "| adverts | phase | flood (datagrams/s) | CPUs busy | master's adverts | longest gap (ms) | longest gap (intervals) | false failovers | backup's adverts as MASTER | gateway: shield passed / TTL / stranger / throttled; socket drops |\n\
         |---:|---|---:|---:|---:|---:|---:|---:|---:|---|\n",
    );
    let mut failures = Vec::new();
    for interval_ms in INTERVALS_MS {
        let interval = Duration::from_millis(interval_ms);
        let mut options = HaOptions::priorities(&PRIORITIES);
        options.advert_interval_ms = interval_ms;
        let mut location = HaLocation::build(&options)?;
        location.wait_master(MASTER, Duration::from_secs(5))?;
        for (phase, duration, flooded) in [("idle", IDLE, false), ("flooded", FLOODED, true)] {
            let watch = watch(&mut location, duration, flooded)?;
            let intervals = watch.longest.as_secs_f64() / interval.as_secs_f64();
            let dropped: Vec<String> = watch
                .dropped
                .iter()
                .map(|(id, shield, socket)| {
                    let shield: Vec<String> = shield.iter().map(u64::to_string).collect();
                    format!("{id}: {}; {socket}", shield.join(" / "))
                })
                .collect();
            let _ = writeln!(
                table,
                "| {interval_ms} ms | {phase} | {:.0} | {:.0}% | {} | {:.1} | {intervals:.2} | {} | {} | {} |",
                watch.rate,
                watch.busy * 100.0,
                watch.adverts,
                watch.longest.as_secs_f64() * 1000.0,
                watch.false_failovers,
                watch.backup_as_master,
                dropped.join("<br>"),
            );
            println!(
                "  {interval_ms} ms adverts, {phase}: {} datagrams ({:.0}/s), longest gap {intervals:.2} intervals, {} false failovers",
                watch.sent, watch.rate, watch.false_failovers
            );
            if watch.false_failovers > 0 || watch.backup_as_master > 0 {
                failures.push(format!(
                    "{interval_ms} ms {phase}: {} false failovers, {} adverts of the backup as MASTER",
                    watch.false_failovers, watch.backup_as_master
                ));
            }
        }
    }
    println!("\n{table}");
    ensure!(failures.is_empty(), "{failures:?}");
    Ok(())
}

/// Watches the master's adverts for `duration`, flooded when `flooded`.
fn watch(location: &mut HaLocation, duration: Duration, flooded: bool) -> Result<Watch> {
    let before = counters(location)?;
    let adverts = AdvertWatch::start(location)?;
    let cpu = CpuTimes::read()?;
    let started = Instant::now();
    let (sent, rate) = if flooded {
        let report = Flood::start(
            location.client(),
            CLIENT_ADDR,
            &advert_port_flood(THREADS, duration),
        )?
        .finish()?;
        (report.sent, report.rate())
    } else {
        std::thread::sleep(duration);
        (0, 0.0)
    };
    let busy = cpu.busy_since()?;
    let seen = adverts.finish()?;
    let (count, longest) = longest_gap(&seen, MASTER, started);
    let after = counters(location)?;
    let mut dropped = Vec::new();
    for ((id, before), (_, after)) in before.iter().zip(&after) {
        let mut shield = [0; 4];
        for (moved, name) in shield.iter_mut().zip(ADVERT_COUNTERS) {
            *moved = after.counter(name)?.packets - before.counter(name)?.packets;
        }
        let socket = location.status(*id)?.dropped("socket-queue-full");
        dropped.push((*id, shield, socket));
    }
    let took_over = location
        .status(BACKUP)?
        .became_master_since(unix_ms_at(started));
    Ok(Watch {
        sent,
        rate,
        adverts: count,
        longest,
        false_failovers: took_over,
        backup_as_master: others_as_master(&seen, MASTER, started),
        busy,
        dropped,
    })
}

/// Both gateways' shield counters.
fn counters(location: &mut HaLocation) -> Result<Vec<(u32, Counters)>> {
    [BACKUP, MASTER]
        .into_iter()
        .map(|id| Ok((id, location.gateway_mut(id).daemon_mut().counters()?)))
        .collect()
}
