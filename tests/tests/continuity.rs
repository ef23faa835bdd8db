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
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, ensure};
use tidegate_tests::continuity::{
    ClientOptions, TunnelLocation, detach_egress_guard, ensure_gateway_initiated, finish_probers,
    force_rekey,
};
use tidegate_tests::gateway::HookSection;
use tidegate_tests::ha::{Role, SERVICE_PORT, TunnelOptions, gateway_addr, status_of};
use tidegate_tests::handshakes::HandshakeWatch;
use tidegate_tests::wait::{Probe, poll_until};
use tidegate_tests::{HaOptions, ProbeSummary, require_root};

/// How long a role change may take after its cause.
const SWITCH: Duration = Duration::from_secs(5);
/// How long endpoints may take to reach the other gateway.
const SHARED: Duration = Duration::from_secs(5);
/// Probes before and after each event.
const SETTLE: Duration = Duration::from_millis(500);
/// A bound on every prober: 60 s of probes at 10 ms on the host; 10 min at
/// 25 ms where the CPUs are emulated and a test takes several times longer.
fn probes() -> u64 {
    tidegate_tests::pace::load(6000, 24_000)
}
/// The longest acceptable silence of any tunnel when the master crashes:
/// 2 s on the host (expected: the master-down interval, about 350-450 ms,
/// plus a round trip); 5 s where the CPUs are emulated and adverts go every
/// 200 ms. Without kicks it would be about 15 s, WireGuard's own retry.
fn max_crash_gap_ms() -> f64 {
    tidegate_tests::pace::load(2000.0, 5000.0)
}

/// Clients of the crash and planned-failover tests: 20 on the host; 8 where
/// the CPUs are emulated, whose two cores run every client's WireGuard.
fn many_clients() -> usize {
    tidegate_tests::pace::load(20, 8)
}

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
    let clients = many_clients();
    let mut location = build(clients, None, tunnel())?;
    let status = location.wait_shared(1, SHARED)?;
    narrate(&format!(
        "gateway 1's endpoint table: {:?}",
        status
            .endpoints
            .as_ref()
            .map(|e| (&e.entries, &e.by_gateway))
    ));
    let probers = location.start_probers(probes())?;
    let watches = location.watch_handshakes()?;
    std::thread::sleep(SETTLE);

    let crashed_at = Instant::now();
    let since = SystemTime::now();
    location.location_mut().gateway_mut(2).crash_all()?;
    narrate("gateway 2 crashed: daemon, WireGuard and echoes gone, link down");
    location.location_mut().wait_master(1, SWITCH)?;
    let status = location.wait_followed(1, since, Duration::from_secs(40))?;
    std::thread::sleep(SETTLE);
    let summaries = finish_probers(probers)?;
    let report = status.failovers.last().context("no failover report")?;
    narrate(&format!("failover: {report:?}"));
    ensure!(
        report.recently_active == clients
            && report.kicked == clients
            && report.completed == clients,
        "{report:?}"
    );
    location.ensure_endpoints_on_vip()?;
    ensure_resumed_by_kicks(&summaries, watches, crashed_at)?;
    let statuses = location.location_mut().statuses()?;
    ensure!(status_of(&statuses, 1)?.role == Role::Master);
    Ok(())
}

/// After gateway 2 went at `down_at`, every client's tunnel came back on
/// gateway 1 within [`max_crash_gap_ms`], on a session gateway 1 started
/// (a kick), not one the client's own timer did.
fn ensure_resumed_by_kicks(
    summaries: &[ProbeSummary],
    watches: Vec<HandshakeWatch>,
    down_at: Instant,
) -> Result<()> {
    let longest = narrate_tunnels(summaries);
    narrate(&format!(
        "longest tunnel gap of all clients: {longest:.1} ms"
    ));
    for (i, summary) in summaries.iter().enumerate() {
        ensure!(
            summary.sequence == [2, 1],
            "client {i} answered by {:?}: {}",
            summary.sequence,
            summary.brief()
        );
        ensure!(
            summary.longest_gap_ms < max_crash_gap_ms(),
            "client {i}: gap of {:.1} ms: {}",
            summary.longest_gap_ms,
            summary.brief()
        );
    }
    ensure_gateway_initiated(watches, down_at)?;
    narrate("every client's new session was started by gateway 1 (a kick)");
    Ok(())
}

/// Every prober lost nothing, and was answered by `sequence` in turn.
fn ensure_lossless(summaries: &[ProbeSummary], sequence: &[u32]) -> Result<()> {
    for (i, summary) in summaries.iter().enumerate() {
        ensure!(
            summary.sent > 0 && summary.lost == 0,
            "client {i} lost probes: {} ({:?})",
            summary.brief(),
            summary.losses()
        );
        ensure!(
            summary.sequence == sequence,
            "client {i} answered by {:?}, expected {sequence:?}: {}",
            summary.sequence,
            summary.brief()
        );
    }
    Ok(())
}

/// Runs `tidectl failover` on gateway `from`, waits for `to` to be master
/// and done with its kicks, and for the handover window to close.
fn hand_over(location: &mut TunnelLocation, from: u32, to: u32) -> Result<()> {
    let since = SystemTime::now();
    let out = location.location().gateway(from).tidectl(&["failover"])?;
    ensure!(
        out.status.success()
            && out
                .stdout
                .contains(&format!("handing over to gateway {to}")),
        "tidectl failover on gateway {from}: {out:?}"
    );
    location.location_mut().wait_master(to, SWITCH)?;
    let status = location.wait_followed(to, since, Duration::from_secs(40))?;
    let report = status.failovers.last().context("no failover report")?;
    narrate(&format!(
        "gateway {from} handed over to {to}: {} kicked, {} back, 95% back after {:?} ms",
        report.kicked, report.completed, report.fresh_95_ms
    ));
    ensure!(
        report.meta.planned && report.completed == location.clients().len(),
        "{report:?}"
    );
    // The window (2 s here) closes before the next event.
    std::thread::sleep(Duration::from_millis(2500));
    // The old master owns no client now, and holds no session: none can be
    // retried and race its kicks when it is master again.
    let gateway = location.location().gateway(from);
    let interface = gateway.wireguard_interface().context("no WireGuard")?;
    let holding = poll_until(
        &format!("gateway {from} to drop its WireGuard sessions"),
        Duration::from_secs(5),
        Duration::from_millis(100),
        || {
            let dump = gateway
                .netns()
                .exec_ok("wg", &["show", interface, "dump"])?;
            let holding = tidegate_tests::PeerStats::parse_dump(&dump)?
                .iter()
                .filter(|p| p.latest_handshake != 0)
                .count();
            Ok(if holding == 0 {
                Probe::Ready(holding)
            } else {
                Probe::NotYet(format!("{holding} peers with a session"))
            })
        },
    )?;
    ensure!(holding == 0);
    Ok(())
}

#[test]
fn planned_failovers_back_and_forth_and_sigterm_lose_no_probe() -> Result<()> {
    require_root();
    let _serial = serial();
    let mut location = build(many_clients(), None, tunnel())?;
    location.wait_shared(1, SHARED)?;
    location.wait_shared(2, SHARED)?;
    let probers = location.start_probers(probes())?;
    std::thread::sleep(SETTLE);

    hand_over(&mut location, 2, 1)?;
    location.ensure_endpoints_on_vip()?;
    hand_over(&mut location, 1, 2)?;
    location.ensure_endpoints_on_vip()?;
    narrate("after two handovers back and forth every client's endpoint is the VIP");

    // SIGTERM on the master hands over too, and the daemon keeps answering
    // for its sessions until the window closes before it exits.
    let since = SystemTime::now();
    let status = location.location_mut().gateway_mut(2).daemon_mut().stop()?;
    ensure!(status.success(), "gateway 2's daemon exited {status}");
    location.location_mut().wait_master(1, SWITCH)?;
    location.wait_followed(1, since, Duration::from_secs(40))?;
    std::thread::sleep(SETTLE);

    let summaries = finish_probers(probers)?;
    narrate_tunnels(&summaries);
    ensure_lossless(&summaries, &[2, 1, 2, 1])?;
    location.ensure_endpoints_on_vip()?;
    // The frames of the old sessions went the other way during each window.
    let counters = location
        .location_mut()
        .gateway_mut(1)
        .daemon_mut()
        .counters()?;
    narrate(&format!(
        "gateway 1 handed on {} frames of gateway 2's sessions",
        counters.counter("handed-over")?.packets
    ));
    Ok(())
}

#[test]
fn a_restarted_higher_priority_gateway_fails_back_by_a_handover_losing_no_probe() -> Result<()> {
    require_root();
    let _serial = serial();
    let mut location = build(many_clients(), None, tunnel())?;
    location.wait_shared(1, SHARED)?;
    location.wait_shared(2, SHARED)?;

    // Stopped (SIGTERM: a handover), gateway 2 comes back with a preempt
    // delay long enough to start the probers once it runs: they measure
    // the failback, not the daemon's start, which on an emulated CPU
    // starves the whole machine for seconds.
    let since = SystemTime::now();
    let status = location.location_mut().gateway_mut(2).daemon_mut().stop()?;
    ensure!(status.success(), "gateway 2's daemon exited {status}");
    location.location_mut().wait_master(1, SWITCH)?;
    location.wait_followed(1, since, Duration::from_secs(40))?;
    let daemon = location.location_mut().gateway_mut(2).daemon_mut();
    let mut config = daemon.config().clone();
    let delay = tidegate_tests::pace::stretch(Duration::from_secs(3));
    if let Some(ha) = config.ha.as_mut() {
        ha.preempt_delay_ms = Some(delay.as_millis() as u64);
    }
    daemon.write_config(config)?;
    let netns = location.location().gateway(2).netns().clone();
    let since = SystemTime::now();
    location
        .location_mut()
        .gateway_mut(2)
        .daemon_mut()
        .restart(&netns)?;
    let probers = location.start_probers(probes())?;
    std::thread::sleep(SETTLE);
    ensure!(
        location.location_mut().status(1)?.role == Role::Master,
        "gateway 2 took over before the probers ran"
    );

    // It outranks the master: past the delay it asks for the VIPs and
    // gets them by a handover, not a takeover.
    let statuses = location.location_mut().wait_master(2, SWITCH + delay)?;
    let change = status_of(&statuses, 2)?
        .last_change_to(Role::Master)
        .context("gateway 2 never became master again")?;
    ensure!(
        change.reason == "handover from gateway 1",
        "gateway 2 failed back because {:?}",
        change.reason
    );
    let status = location.wait_followed(2, since, Duration::from_secs(40))?;
    let report = status.failovers.last().context("no failover report")?;
    narrate(&format!(
        "gateway 2 restarted and failed back by a handover: {} kicked, {} back",
        report.kicked, report.completed
    ));
    ensure!(
        report.meta.planned && report.completed == location.clients().len(),
        "{report:?}"
    );
    std::thread::sleep(SETTLE);
    let summaries = finish_probers(probers)?;
    narrate_tunnels(&summaries);
    ensure_lossless(&summaries, &[1, 2])?;
    Ok(())
}

#[test]
fn clients_that_only_send_keepalives_resume_too() -> Result<()> {
    require_root();
    let _serial = serial();
    let clients = 8;
    let mut location = build(clients, Some(1), tunnel())?;
    location.wait_shared(1, SHARED)?;
    // Nothing but keepalives from here on.
    std::thread::sleep(Duration::from_secs(2));
    let since = SystemTime::now();
    location.location_mut().gateway_mut(2).crash_all()?;
    narrate("gateway 2 crashed; the clients send keepalives only, every second");
    location.location_mut().wait_master(1, SWITCH)?;
    let status = location.wait_followed(1, since, Duration::from_secs(40))?;
    let report = status.failovers.last().context("no failover report")?;
    narrate(&format!("failover: {report:?}"));
    ensure!(
        report.recently_active == clients && report.completed == clients,
        "{report:?}"
    );
    // Each client's keepalives now reach gateway 1 on the new session: its
    // received bytes grow past the handshake's.
    let before = location
        .location_mut()
        .gateway_mut(1)
        .daemon_mut()
        .peers()?;
    std::thread::sleep(Duration::from_millis(2500));
    let after = location
        .location_mut()
        .gateway_mut(1)
        .daemon_mut()
        .peers()?;
    for client in location.clients() {
        let key = client.wg().public_key();
        let rx = |reply: &tidegate_tests::PeersReply| reply.peer(key).map_or(0, |p| p.rx_bytes);
        ensure!(
            rx(&after) > rx(&before),
            "client {}: no keepalive reached gateway 1 ({} -> {} bytes)",
            client.index(),
            rx(&before),
            rx(&after)
        );
    }
    location.ensure_endpoints_on_vip()?;
    narrate("every client's keepalives reach gateway 1, and its endpoint is the VIP");
    Ok(())
}

/// Forces gateway 2 (a backup) to start a handshake with every client, as
/// its rekey timer would; returns the clients whose endpoint for the
/// location then moved to gateway 2's host address.
fn steal_attempt(location: &TunnelLocation) -> Result<Vec<usize>> {
    for client in 0..location.clients().len() {
        force_rekey(location, 2, client)?;
    }
    // A handshake takes a round trip; the client roams on the response.
    std::thread::sleep(Duration::from_millis(500));
    let host = std::net::SocketAddr::from((gateway_addr(2), SERVICE_PORT)).to_string();
    let mut stolen = Vec::new();
    for client in location.clients() {
        if client.gateway_endpoint()?.as_deref() == Some(host.as_str()) {
            stolen.push(client.index());
        }
    }
    Ok(stolen)
}

#[test]
fn the_egress_guard_stops_an_old_master_stealing_its_clients_back() -> Result<()> {
    require_root();
    let _serial = serial();
    let clients = 4;
    let rounds = 5;

    // With the guard: gateway 2 hands over (and stays BACKUP in
    // maintenance), then its WireGuard tries again and again.
    let mut location = build(clients, None, tunnel())?;
    location.wait_shared(1, SHARED)?;
    let since = SystemTime::now();
    let out = location
        .location()
        .gateway(2)
        .tidectl(&["maintenance", "on"])?;
    ensure!(out.status.success(), "maintenance on: {out:?}");
    location.location_mut().wait_master(1, SWITCH)?;
    let followed = location.wait_followed(1, since, Duration::from_secs(40))?;
    let report = followed.failovers.last().context("no failover report")?;
    narrate(&format!("gateway 1's failover: {report:?}"));
    // Peers written to the config just before the handover are kicked too.
    ensure!(
        report.kicked == clients,
        "gateway 1 kicked {} of {clients} clients",
        report.kicked
    );
    std::thread::sleep(Duration::from_millis(2500));
    let probers = location.start_probers(probes())?;
    let before = location
        .location_mut()
        .gateway_mut(2)
        .daemon_mut()
        .counters_table()?;
    let mut stolen_with = 0;
    for round in 0..rounds {
        let stolen = steal_attempt(&location)?;
        narrate(&format!("guarded round {round}: clients stolen {stolen:?}"));
        stolen_with += stolen.len();
    }
    let after = location
        .location_mut()
        .gateway_mut(2)
        .daemon_mut()
        .counters_table()?;
    let summaries = finish_probers(probers)?;
    narrate_tunnels(&summaries);
    let gateway_1 = location
        .location_mut()
        .gateway_mut(1)
        .daemon_mut()
        .counters_table()?;
    narrate(&format!(
        "gateway 2 before:\n{before}\ngateway 2 after:\n{after}\ngateway 1 after:\n{gateway_1}"
    ));
    ensure!(
        stolen_with == 0,
        "{stolen_with} of {} attempts stole a client despite the guard",
        rounds * clients
    );
    ensure_lossless(&summaries, &[1])?;
    location.ensure_endpoints_on_vip()?;
    let denied = |table: &str| -> u64 {
        table
            .lines()
            .find(|l| l.contains("egress-denied-backup"))
            .and_then(|l| l.split_whitespace().nth(2))
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    ensure!(
        denied(&after) >= denied(&before) + (rounds * clients) as u64,
        "gateway 2's guard did not drop the handshake initiations"
    );

    // The same without the guard: the first attempt steals every client.
    detach_egress_guard(location.location(), 2)?;
    narrate("gateway 2's egress guard detached");
    let stolen = steal_attempt(&location)?;
    narrate(&format!("unguarded: clients stolen {stolen:?}"));
    ensure!(
        stolen.len() == clients,
        "without the guard only {stolen:?} were stolen: the test did not reproduce the problem"
    );
    Ok(())
}

#[test]
fn a_killed_daemon_on_a_live_master_is_fenced_and_its_clients_resume_on_the_backup() -> Result<()> {
    require_root();
    let _serial = serial();
    let clients = many_clients();
    let mut location = build(clients, None, tunnel())?;
    location.wait_shared(1, SHARED)?;
    let probers = location.start_probers(probes())?;
    let watches = location.watch_handshakes()?;
    std::thread::sleep(SETTLE);

    // Only the daemon dies: the host, its link, its WireGuard (with every
    // session) and its tunnel echo stay. The pinned XDP program's lease
    // lapses and fences the VIP; the egress guard lets nothing out.
    let killed_at = Instant::now();
    let since = SystemTime::now();
    location.location_mut().gateway_mut(2).daemon_mut().kill()?;
    narrate("gateway 2's daemon killed (SIGKILL); host, link, WireGuard and echo up");
    location.location_mut().wait_master(1, SWITCH)?;
    let status = location.wait_followed(1, since, Duration::from_secs(40))?;
    let report = status.failovers.last().context("no failover report")?;
    narrate(&format!("gateway 1's failover: {report:?}"));
    ensure!(
        report.recently_active == clients && report.completed == clients,
        "{report:?}"
    );
    std::thread::sleep(SETTLE);
    let summaries = finish_probers(probers)?;
    ensure_resumed_by_kicks(&summaries, watches, killed_at)?;
    location.ensure_endpoints_on_vip()?;

    // The restarted daemon adopts the interface it left, with its peers,
    // takes over its pinned programs and wins the VIP back by priority;
    // every client is then served by it again.
    let netns = location.location().gateway(2).netns().clone();
    let since = SystemTime::now();
    let offset = location
        .location_mut()
        .gateway_mut(2)
        .daemon_mut()
        .restart(&netns)?;
    location.location_mut().wait_master(2, SWITCH)?;
    location.wait_followed(2, since, Duration::from_secs(40))?;
    let log = location.location().gateway(2).daemon().log_since(offset);
    for expected in [
        "XDP shield replaced in the pinned link",
        "egress guard replaced in",
    ] {
        ensure!(log.contains(expected), "no {expected:?} in the log:\n{log}");
    }
    ensure!(
        !log.contains("created a kernel WireGuard interface")
            && !log.contains("started wireguard-go"),
        "the restarted daemon made a new WireGuard device:\n{log}"
    );
    let probers = location.start_probers(probes())?;
    std::thread::sleep(SETTLE);
    let summaries = finish_probers(probers)?;
    for (i, summary) in summaries.iter().enumerate() {
        ensure!(
            summary.sent > 0 && summary.lost == 0 && summary.sequence == [2],
            "client {i} after gateway 2 came back: {}",
            summary.brief()
        );
    }
    narrate("gateway 2's restarted daemon adopted its WireGuard and serves every client again");
    Ok(())
}

/// Writes the `TIDEGATE_*` environment of each run to
/// `DIR/GATEWAY-EVENT-NANOS.env` (DIR is the first argument).
const RECORD_HOOK: &str = "#!/bin/sh\n\
out=\"$1/$TIDEGATE_GATEWAY_ID-$TIDEGATE_EVENT-$(date +%s%N)\"\n\
env | grep '^TIDEGATE_' | sort > \"$out.tmp\" && mv \"$out.tmp\" \"$out.env\"\n";
/// Records its pid, then waits until DIR/release exists.
const GATE_HOOK: &str = "#!/bin/sh\n\
echo $$ > \"$1/gate-$TIDEGATE_GATEWAY_ID.pid\"\n\
while [ ! -e \"$1/release\" ]; do sleep 0.05; done\n";
/// Records its pid and sleeps far past its timeout.
const STUCK_HOOK: &str = "#!/bin/sh\n\
echo $$ > \"$1/stuck-$TIDEGATE_GATEWAY_ID.pid\"\n\
exec sleep 60\n";

/// The records of `event` on gateway `id`, oldest first, each as its
/// `NAME=value` lines.
fn hook_records(dir: &std::path::Path, id: u32, event: &str) -> Result<Vec<String>> {
    let prefix = format!("{id}-{event}-");
    let mut names: Vec<String> = std::fs::read_dir(dir)?
        .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
        .filter(|name| name.starts_with(&prefix) && name.ends_with(".env"))
        .collect();
    names.sort();
    names
        .iter()
        .map(|name| std::fs::read_to_string(dir.join(name)).map_err(Into::into))
        .collect()
}

/// The value of `name` in a record.
fn record_value<'a>(record: &'a str, name: &str) -> Option<&'a str> {
    record
        .lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix('='))
}

/// Whether process `pid` still runs (not a zombie).
fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit(')')
            .next()
            .is_some_and(|rest| !rest.trim_start().starts_with('Z'))
    })
}

/// The pid a hook recorded in `file`, once it exists.
fn hook_pid(file: &std::path::Path, timeout: Duration) -> Result<i32> {
    poll_until(
        &format!("{} to be written", file.display()),
        timeout,
        Duration::from_millis(20),
        || {
            Ok(match std::fs::read_to_string(file) {
                Ok(text) if text.ends_with('\n') => Probe::Ready(text.trim().parse()?),
                _ => Probe::NotYet(String::new()),
            })
        },
    )
}

/// Ends the hook processes this test's gateways started that still run
/// (a crashed daemon leaves its hooks behind), by the pids they recorded.
struct HookCleanup(std::path::PathBuf);

impl Drop for HookCleanup {
    fn drop(&mut self) {
        let _ = std::fs::write(self.0.join("release"), "");
        let Ok(entries) = std::fs::read_dir(&self.0) else {
            return;
        };
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy().ends_with(".pid")
                && let Ok(text) = std::fs::read_to_string(entry.path())
                && let Ok(pid) = text.trim().parse::<i32>()
                && alive(pid)
            {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

#[test]
fn hooks_run_beside_the_election_with_the_role_vips_cause_and_timings() -> Result<()> {
    require_root();
    let _serial = serial();
    let scripts = tempfile::tempdir()?;
    let records = scripts.path().join("records");
    std::fs::create_dir(&records)?;
    let _cleanup = HookCleanup(records.clone());
    let script = |name: &str, text: &str| -> Result<String> {
        use std::os::unix::fs::PermissionsExt as _;
        let path = scripts.path().join(name);
        std::fs::write(&path, text)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
        Ok(path.display().to_string())
    };
    let dir = records.display().to_string();
    let hook = |on: &[&'static str], program: String, timeout_ms| HookSection {
        on: on.to_vec(),
        command: vec![program, dir.clone()],
        timeout_ms,
    };
    let options = HaOptions {
        hooks: vec![
            hook(
                &["master", "backup", "fault", "failover-complete"],
                script("record", RECORD_HOOK)?,
                5_000,
            ),
            hook(&["backup"], script("gate", GATE_HOOK)?, 120_000),
            hook(&["failover-complete"], script("stuck", STUCK_HOOK)?, 1_000),
        ],
        ..HaOptions::priorities(&[100, 120])
    };
    let clients = 2;
    let mut location = TunnelLocation::build(
        &options,
        tunnel(),
        &ClientOptions {
            count: clients,
            keepalive: None,
        },
    )?;
    location.wait_shared(1, SHARED)?;
    // Gateway 1 ran its BACKUP hooks at start; the gate holds its queue.
    let started = hook_records(&records, 1, "backup")?;
    ensure!(
        started.len() == 1 && record_value(&started[0], "TIDEGATE_CAUSE") == Some("started"),
        "gateway 1's backup records: {started:?}"
    );
    let gate = hook_pid(&records.join("gate-1.pid"), SWITCH)?;
    ensure!(alive(gate), "gateway 1's gate hook ended early");

    // The election does not wait for hooks: with gateway 1's gate hook
    // still running, it takes over from the crashed master in the usual
    // time, and its MASTER hooks wait their turn.
    let crashed_at = Instant::now();
    let since = SystemTime::now();
    location.location_mut().gateway_mut(2).crash_all()?;
    location.location_mut().wait_master(1, SWITCH)?;
    let took_over = crashed_at.elapsed();
    narrate(&format!(
        "gateway 1 MASTER {} ms after the crash, its gate hook still running",
        took_over.as_millis()
    ));
    ensure!(alive(gate), "the gate hook ended before it was released");
    ensure!(
        hook_records(&records, 1, "master")?.is_empty(),
        "a MASTER hook ran before the gate hook ahead of it ended"
    );

    std::fs::write(records.join("release"), "")?;
    let master = poll_until(
        "gateway 1's MASTER record",
        SWITCH,
        Duration::from_millis(20),
        || {
            let found = hook_records(&records, 1, "master")?;
            let crash = |r: &String| record_value(r, "TIDEGATE_CAUSE") == Some("master 2 down");
            Ok(match found.into_iter().find(crash) {
                Some(record) => Probe::Ready(record),
                None => Probe::NotYet(String::new()),
            })
        },
    )?;
    for (name, want) in [
        ("TIDEGATE_EVENT", "master"),
        ("TIDEGATE_ROLE", "MASTER"),
        ("TIDEGATE_PREVIOUS_ROLE", "BACKUP"),
        ("TIDEGATE_CAUSE", "master 2 down"),
        ("TIDEGATE_VIPS", "198.51.100.100"),
        ("TIDEGATE_GATEWAY_ID", "1"),
        ("TIDEGATE_MASTER", "1"),
    ] {
        ensure!(
            record_value(&master, name) == Some(want),
            "{name} is not {want:?} in\n{master}"
        );
    }

    // When the clients are back, the failover-complete hooks run with the
    // failover's timings: those of its record in `tidectl status`.
    let followed = location.wait_followed(1, since, Duration::from_secs(40))?;
    let record = followed
        .failovers
        .last()
        .context("no failover record on gateway 1")?
        .clone();
    let complete = poll_until(
        "gateway 1's failover-complete record",
        SWITCH,
        Duration::from_millis(20),
        || {
            let found = hook_records(&records, 1, "failover-complete")?;
            let crash = |r: &String| record_value(r, "TIDEGATE_CAUSE") == Some("master 2 down");
            Ok(match found.into_iter().find(crash) {
                Some(record) => Probe::Ready(record),
                None => Probe::NotYet(String::new()),
            })
        },
    )?;
    let number = |name: &str| -> Result<u64> {
        record_value(&complete, name)
            .with_context(|| format!("{name} missing in\n{complete}"))?
            .parse()
            .with_context(|| format!("{name} in\n{complete}"))
    };
    ensure!(record_value(&complete, "TIDEGATE_CAUSE") == Some("master 2 down"));
    ensure!(record_value(&complete, "TIDEGATE_PLANNED") == Some("0"));
    ensure!(
        record.meta.detection_ms == Some(number("TIDEGATE_DETECTION_MS")?)
            && record.meta.vip_move_ms == number("TIDEGATE_VIP_MOVE_MS")?
            && record.fresh_95_ms == Some(number("TIDEGATE_FRESH_95_MS")?),
        "the hook's timings differ from the record {:?}:\n{complete}",
        record
    );
    ensure!(
        number("TIDEGATE_RECENTLY_ACTIVE")? == clients as u64,
        "{complete}"
    );
    ensure!(number("TIDEGATE_KICKED")? == clients as u64, "{complete}");

    // A hook past its timeout is killed, with what it started.
    let stuck = hook_pid(&records.join("stuck-1.pid"), SWITCH)?;
    poll_until(
        "the stuck hook to be killed at its 1 s timeout",
        SWITCH,
        Duration::from_millis(50),
        || {
            Ok(if alive(stuck) {
                Probe::NotYet(String::new())
            } else {
                Probe::Ready(())
            })
        },
    )?;
    let log = location.location().gateway(1).log_tail();
    ensure!(log.contains("hook timed out"), "gateway 1's log:\n{log}");
    Ok(())
}
