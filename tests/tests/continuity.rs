//! End-to-end failover continuity: a location of two gateways running the
//! location's WireGuard, and real WireGuard clients (wireguard-go in their
//! own namespaces) probing through their tunnels every 10 ms. When the
//! master crashes, the new master kicks a handshake to every recently
//! active client from the endpoint table the gateways share, so every
//! tunnel resumes within about a failover's detection time; a planned
//! failover loses no probe; clients that only send keepalives come back
//! too; after failovers back and forth every client still talks to the
//! VIP; and the egress guard stops an old master's WireGuard from
//! re-handshaking its clients from its host address.

use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use tidegate_tests::continuity::{ClientOptions, TunnelLocation, finish_probers};
use tidegate_tests::ha::{Role, TunnelOptions, status_of};
use tidegate_tests::{HaOptions, ProbeSummary, require_root};

/// How long a role change may take after its cause.
const SWITCH: Duration = Duration::from_secs(5);
/// How long endpoints may take to reach the other gateway.
const SHARED: Duration = Duration::from_secs(5);
/// Probes before and after each event.
const SETTLE: Duration = Duration::from_millis(500);
/// A bound on every prober: 60 s of probes at 10 ms.
const PROBES: u64 = 6000;
/// The longest acceptable silence of any tunnel when the master crashes
/// (expected: the master-down interval, about 350-450 ms, plus a round
/// trip). Without kicks it would be about 15 s.
const MAX_CRASH_GAP_MS: f64 = 2000.0;

/// Held by every test of this file: they measure gaps, so they do not
/// share the machine's two cores with each other.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(PoisonError::into_inner)
}

fn narrate(line: &str) {
    println!("  {line}");
}

fn tunnel() -> TunnelOptions {
    TunnelOptions {
        private_key: String::new(),
        stats_interval_ms: Some(200),
        kick_rate: None,
        handover_window_ms: None,
    }
}

/// The gateways 1 (priority 100) and 2 (120, the master) and `clients`.
fn build(clients: usize, keepalive: Option<u16>, tunnel: TunnelOptions) -> Result<TunnelLocation> {
    let location = TunnelLocation::build(
        &HaOptions::priorities(&[100, 120]),
        tunnel,
        &ClientOptions {
            count: clients,
            keepalive,
        },
    )?;
    narrate(&format!(
        "location {}: gateways 1 and 2 (MASTER), {clients} WireGuard clients{}",
        location.location().run().id(),
        keepalive.map_or_else(String::new, |k| format!(" (keepalive {k} s)"))
    ));
    Ok(location)
}

/// One line per prober, and the longest gap of all.
fn narrate_tunnels(summaries: &[ProbeSummary]) -> f64 {
    let mut longest: f64 = 0.0;
    for (i, summary) in summaries.iter().enumerate() {
        narrate(&format!("client {i}: {}", summary.brief()));
        longest = longest.max(summary.longest_gap_ms);
    }
    longest
}

#[test]
fn a_crashed_master_is_replaced_and_every_tunnel_resumes() -> Result<()> {
    require_root();
    let _serial = serial();
    let mut location = build(20, None, tunnel())?;
    let status = location.wait_shared(1, SHARED)?;
    narrate(&format!(
        "gateway 1's endpoint table: {:?}",
        status.endpoints.as_ref().map(|e| (&e.entries, &e.by_gateway))
    ));
    let probers = location.start_probers(PROBES)?;
    std::thread::sleep(SETTLE);

    location.location_mut().gateway_mut(2).crash_all()?;
    narrate("gateway 2 crashed: daemon, wireguard-go and echoes killed, link down");
    location.location_mut().wait_master(1, SWITCH)?;
    let status = location.wait_followed(1, Duration::from_secs(40))?;
    std::thread::sleep(SETTLE);
    let summaries = finish_probers(probers)?;
    let longest = narrate_tunnels(&summaries);
    let report = status.failovers.last().context("no failover report")?;
    narrate(&format!("failover: {report:?}"));
    narrate(&format!("longest tunnel gap of all clients: {longest:.1} ms"));
    ensure!(
        report.recently_active == 20 && report.kicked == 20 && report.completed == 20,
        "{report:?}"
    );
    for (i, summary) in summaries.iter().enumerate() {
        ensure!(
            summary.sequence == [2, 1],
            "client {i} answered by {:?}: {}",
            summary.sequence,
            summary.brief()
        );
        ensure!(
            summary.longest_gap_ms < MAX_CRASH_GAP_MS,
            "client {i}: gap of {:.1} ms: {}",
            summary.longest_gap_ms,
            summary.brief()
        );
    }
    location.ensure_endpoints_on_vip()?;
    let statuses = location.location_mut().statuses()?;
    ensure!(status_of(&statuses, 1)?.role == Role::Master);
    Ok(())
}
