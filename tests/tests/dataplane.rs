//! End-to-end: the gateway daemon runs the location's WireGuard interface
//! (`backend = "auto"`, as on a real host: kernel WireGuard where the
//! kernel has the module, else wireguard-go started detached) and real
//! WireGuard clients in their own namespaces connect through it. Peers
//! change at run time without disturbing others, the device survives the
//! daemon being killed and is adopted by the next one, the daemon brings
//! back a dead wireguard-go, MFA locations remove inactive peers, and bad
//! input is refused without touching the device.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, UdpSocket};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::thread::ScopedJoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, ensure};
use nix::sys::signal::Signal;
use tidegate_tests::location::GATEWAY_TUNNEL;
use tidegate_tests::shield::WG_PORT;
use tidegate_tests::wireguard::{auto_backend, pid_alive, signal_wireguard_go};
use tidegate_tests::{
    BackgroundPing, CmdOutput, KeyPair, Location, LocationOptions, PeerEntry, PeerStats,
    PeersReply, PingReport, WgBackend, dump_config, poll_until, require_root, wait::Probe,
};

/// The interval of the pings that run across a change, from before it
/// starts until after it is done.
const FAST_INTERVAL: Duration = Duration::from_millis(10);
/// How long those pings run before and after the change.
const AROUND: Duration = Duration::from_millis(300);
/// How long `tidectl peers` may take to show a fresh handshake (stats are
/// polled every 200 ms in these locations).
const STATS_WAIT: Duration = Duration::from_secs(5);
/// How long clients get to reach the gateway again after wireguard-go was
/// killed and restarted.
const RECOVERY: Duration = Duration::from_secs(60);
/// The MFA peer-disconnect threshold of the MFA test, in seconds: 3 on the
/// host, 8 where the CPUs are emulated (a client's first handshake after
/// its peer is added takes longer there than 3 s allow).
fn mfa_threshold_secs() -> u64 {
    tidegate_tests::pace::load(3, 8)
}

/// How late after the threshold an idle peer may go: the stats poll and
/// the check that follows it (2 s; 4 s where the CPUs are emulated).
fn mfa_slack_secs() -> u64 {
    tidegate_tests::pace::load(2, 4)
}
/// A UDP port the bad-input test holds in the gateway's namespace.
const BUSY_PORT: u16 = 51821;
/// What `tidectl` prints before a refusal.
const REFUSED: &str = "tidectl: the daemon refused: ";

/// Held by every test of this file: they count lost replies and time
/// removals, so they do not share the machine's two cores with each other
/// even when cargo runs tests in parallel.
static SERIAL: Mutex<()> = Mutex::new(());

/// Takes [`SERIAL`] (a test that failed while holding it does not block
/// the others).
fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Prints a step to the test's captured output.
fn narrate(line: &str) {
    println!("  {line}");
}

/// Seconds since the epoch.
fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Polls `tidectl peers --json` until `ready` accepts it.
fn wait_peers(
    location: &mut Location,
    what: &str,
    timeout: Duration,
    mut ready: impl FnMut(&PeersReply) -> Result<(), String>,
) -> Result<PeersReply> {
    poll_until(what, timeout, Duration::from_millis(100), || {
        let peers = location.daemon_mut().peers()?;
        Ok(match ready(&peers) {
            Ok(()) => Probe::Ready(peers),
            Err(why) => Probe::NotYet(format!("{why}; peers: {peers:?}")),
        })
    })
}

/// Starts every client pinging the gateway's tunnel address every
/// [`FAST_INTERVAL`], until [`finish_pings`].
fn start_pings(clients: &[tidegate_tests::Client]) -> Result<Vec<BackgroundPing>> {
    clients
        .iter()
        .map(|client| client.start_ping(GATEWAY_TUNNEL, FAST_INTERVAL))
        .collect()
}

/// Stops the pings and returns their reports, in order.
fn finish_pings(pings: Vec<BackgroundPing>) -> Result<Vec<PingReport>> {
    pings.into_iter().map(BackgroundPing::finish).collect()
}

/// Joins a ping thread, propagating its panic or error.
fn join_ping(handle: ScopedJoinHandle<'_, Result<PingReport>>) -> Result<PingReport> {
    match handle.join() {
        Ok(report) => report,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// Checks that `report` lost no reply.
fn ensure_no_loss(who: &str, report: &PingReport, log_tail: &str) -> Result<()> {
    ensure!(
        report.transmitted > 0 && report.lost() == 0,
        "{who}: {} of {} echoes lost\n{}\ngateway log tail:\n{log_tail}",
        report.lost(),
        report.transmitted,
        report.summary
    );
    Ok(())
}

/// The peer lines of `wg show dump` with key, endpoint, allowed IPs and
/// latest handshake (no byte counters), sorted.
fn peers_and_handshakes(peers: &[PeerStats]) -> BTreeSet<String> {
    peers
        .iter()
        .map(|p| {
            format!(
                "{} endpoint={:?} allowed={:?} handshake={}",
                p.public_key, p.endpoint, p.allowed_ips, p.latest_handshake
            )
        })
        .collect()
}

/// A new peer for `tidectl peer add`, not behind any client.
fn new_peer(name: &str, allowed: &str) -> Result<PeerEntry> {
    Ok(PeerEntry {
        name: Some(name.into()),
        public_key: KeyPair::generate()?.public,
        allowed_ips: vec![allowed.into()],
        ..PeerEntry::default()
    })
}

#[test]
fn three_clients_connect_and_reach_each_other_through_the_gateway() -> Result<()> {
    require_root();
    let _serial = serial();
    let started = Instant::now();
    let mut location = Location::build(&LocationOptions {
        clients: 3,
        ip_forward: true,
        ..LocationOptions::default()
    })?;
    narrate(&format!(
        "location {} built in {:.1?}",
        location.run().id(),
        started.elapsed()
    ));

    for client in location.clients() {
        let report = client.ping(GATEWAY_TUNNEL, 3)?;
        narrate(&format!(
            "{} -> {GATEWAY_TUNNEL}: {}",
            client.name(),
            report.summary.lines().next().unwrap_or_default()
        ));
    }

    // Client A to client B's tunnel address: forwarded by the gateway, so
    // every reply comes back with the TTL one lower than B sent it (64).
    let (a, b) = (location.client(0), location.client(1));
    let out = a.netns().exec(
        "ping",
        &[
            "-n",
            "-c",
            "3",
            "-i",
            "0.2",
            "-W",
            "2",
            &b.tunnel().to_string(),
        ],
        Duration::from_secs(15),
    )?;
    let report = PingReport::parse(&out.stdout)?;
    ensure!(
        report.received == 3 && out.status.success(),
        "client0 -> client1 ({}) through the gateway: {}\n{}",
        b.tunnel(),
        out.stdout,
        out.stderr
    );
    let replies = out
        .stdout
        .lines()
        .filter(|l| l.contains("bytes from"))
        .count();
    let forwarded = out.stdout.lines().filter(|l| l.contains("ttl=63")).count();
    ensure!(
        replies == 3 && forwarded == 3,
        "replies from {} did not all come through one router (ttl=63):\n{}",
        b.tunnel(),
        out.stdout
    );
    narrate(&format!(
        "client0 -> client1 {} via the gateway: {}",
        b.tunnel(),
        report.summary.lines().next().unwrap_or_default()
    ));

    // tidectl shows each client with its handshake and its real endpoint.
    let mut expected = Vec::new();
    for client in location.clients() {
        expected.push((
            client.public_key().to_owned(),
            client.name(),
            format!("{}:{}", client.underlay(), client.listen_port()?),
            format!("{}/32", client.tunnel()),
        ));
    }
    let since = unix_now().saturating_sub(60);
    let peers = wait_peers(
        &mut location,
        "a handshake and an endpoint for every client in `tidectl peers`",
        STATS_WAIT,
        |peers| {
            for (key, name, _, _) in &expected {
                let Some(peer) = peers.peer(key) else {
                    return Err(format!("{name} missing"));
                };
                if peer.last_handshake.is_none_or(|t| t < since) || peer.endpoint.is_none() {
                    return Err(format!("{name} has no fresh handshake or endpoint yet"));
                }
            }
            Ok(())
        },
    )?;
    assert_eq!(peers.interface, location.wg_interface());
    assert_eq!(peers.listen_port, WG_PORT);
    assert_eq!(peers.mfa_threshold_secs, None);
    assert_eq!(peers.peers.len(), 3, "{peers:#?}");
    // `auto` made what this machine's kernel offers.
    let wg_pid = location.wireguard_go_pid()?;
    let (_, kernel_link) = location.wg_link()?;
    match auto_backend() {
        WgBackend::Kernel => {
            assert_eq!(peers.backend, "kernel");
            assert!(kernel_link, "the interface is not a kernel WireGuard link");
            assert_eq!(wg_pid, None, "a wireguard-go serves a kernel interface");
            assert_eq!(peers.backend_pid, None);
        }
        WgBackend::WireguardGo => {
            assert_eq!(peers.backend, "userspace");
            assert!(
                !kernel_link,
                "a kernel link where the kernel has no WireGuard"
            );
            assert!(
                wg_pid.is_some(),
                "no wireguard-go serves the gateway's socket"
            );
            assert_eq!(
                peers.backend_pid, wg_pid,
                "backend_pid vs the process holding the UAPI socket"
            );
        }
    }
    narrate(&format!("the gateway's WireGuard: {}", peers.backend));
    for (key, name, endpoint, allowed) in &expected {
        let peer = peers.peer(key).context("peer vanished")?;
        assert_eq!(peer.name.as_deref(), Some(name.as_str()));
        assert_eq!(peer.source, "file", "{name}");
        assert_eq!(peer.endpoint.as_deref(), Some(endpoint.as_str()), "{name}");
        assert_eq!(peer.allowed_ips, std::slice::from_ref(allowed), "{name}");
        assert!(peer.rx_bytes > 0 && peer.tx_bytes > 0, "{name}: {peer:?}");
        assert!(peer.last_active.is_some(), "{name}: {peer:?}");
        narrate(&format!(
            "{name}: endpoint {endpoint}, handshake at {:?}, rx {} tx {}",
            peer.last_handshake, peer.rx_bytes, peer.tx_bytes
        ));
    }
    // The device agrees.
    let device = location.wg_peers()?;
    for (key, name, endpoint, _) in &expected {
        let peer = device
            .iter()
            .find(|p| &p.public_key == key)
            .with_context(|| format!("{name} not on the device"))?;
        assert_eq!(peer.endpoint.as_deref(), Some(endpoint.as_str()));
        assert!(peer.latest_handshake > 0, "{name}: {peer:?}");
    }
    narrate(&format!("done in {:.1?}", started.elapsed()));
    Ok(())
}

#[test]
fn adding_changing_and_removing_a_peer_loses_no_reply_of_others() -> Result<()> {
    require_root();
    let _serial = serial();
    let started = Instant::now();
    let mut location = Location::build(&LocationOptions {
        clients: 2,
        ..LocationOptions::default()
    })?;
    for client in location.clients() {
        client.ping(GATEWAY_TUNNEL, 2)?;
    }
    let before = location.wg_peers()?;
    let mut third = new_peer("third", "10.77.0.50/32")?;
    let gateway = location.gateway().clone();
    let interface = location.wg_interface().to_owned();
    let device_peer = |key: &str| -> Result<Option<PeerStats>> {
        let dump = gateway.exec_ok("wg", &["show", &interface, "dump"])?;
        Ok(PeerStats::parse_dump(&dump)?
            .into_iter()
            .find(|p| p.public_key == key))
    };

    let (daemon, clients) = location.split_mut();
    let pings = start_pings(clients)?;
    // Let the pings run a moment before touching the device.
    std::thread::sleep(AROUND);
    let ops = Instant::now();

    let added = daemon.peer_ok("add", &third)?;
    ensure!(
        added.contains("applied: 1 added, 0 changed, 0 removed, 0 device settings"),
        "peer add: {added}"
    );
    let on_device = device_peer(&third.public_key)?.context("added peer not on the device")?;
    ensure!(
        on_device.allowed_ips == ["10.77.0.50/32"],
        "added: {on_device:?}"
    );

    third.allowed_ips = vec!["10.77.0.51/32".into(), "10.77.1.0/24".into()];
    third.persistent_keepalive = Some(25);
    let changed = daemon.peer_ok("change", &third)?;
    ensure!(
        changed.contains("applied: 0 added, 1 changed, 0 removed"),
        "peer change: {changed}"
    );
    let on_device = device_peer(&third.public_key)?.context("changed peer not on the device")?;
    let allowed: BTreeSet<&str> = on_device.allowed_ips.iter().map(String::as_str).collect();
    ensure!(
        allowed == BTreeSet::from(["10.77.0.51/32", "10.77.1.0/24"]),
        "changed: {on_device:?}"
    );

    let removed = daemon.tidectl_ok(&["peer", "remove", &third.public_key])?;
    ensure!(
        removed.contains("applied: 0 added, 0 changed, 1 removed"),
        "peer remove: {removed}"
    );
    ensure!(
        device_peer(&third.public_key)?.is_none(),
        "removed peer still on the device"
    );
    let ops_took = ops.elapsed();
    std::thread::sleep(AROUND);
    narrate(&format!(
        "add, change, remove took {ops_took:.1?} while both clients pinged every 10 ms"
    ));
    let reports = finish_pings(pings)?;
    for (client, report) in clients.iter().zip(&reports) {
        narrate(&format!(
            "{}: {}",
            client.name(),
            report.summary.lines().next().unwrap_or_default()
        ));
        ensure_no_loss(&client.name(), report, &daemon.log_tail())?;
    }

    // The two clients' peers were not touched: same settings, same session.
    let after = location.wg_peers()?;
    let keys: Vec<&str> = location.clients().iter().map(|c| c.public_key()).collect();
    let strip = |peers: &[PeerStats]| -> BTreeSet<String> {
        peers_and_handshakes(peers)
            .into_iter()
            .filter(|line| keys.iter().any(|k| line.starts_with(k)))
            .collect()
    };
    assert_eq!(strip(&after), strip(&before), "the clients' peers changed");
    assert_eq!(after.len(), 2, "the third peer is still there: {after:?}");
    narrate(&format!("done in {:.1?}", started.elapsed()));
    Ok(())
}

#[test]
fn killing_and_restarting_the_daemon_leaves_the_tunnels_up() -> Result<()> {
    require_root();
    let _serial = serial();
    let started = Instant::now();
    let mut location = Location::build(&LocationOptions {
        clients: 2,
        ..LocationOptions::default()
    })?;
    for client in location.clients() {
        client.ping(GATEWAY_TUNNEL, 2)?;
    }
    let before = location.wg_peers()?;
    ensure!(
        before.len() == 2 && before.iter().all(|p| p.latest_handshake > 0),
        "no handshake on the gateway before the kill: {before:?}"
    );
    let backend = auto_backend();
    let wg_pid = location.wireguard_go_pid()?;
    ensure!(
        wg_pid.is_some() == (backend == WgBackend::WireguardGo),
        "{backend}: wireguard-go pid {wg_pid:?}"
    );
    let (link_index, _) = location.wg_link()?;
    let old_daemon = location.daemon().process().pid();
    let gateway = location.gateway().clone();

    let (daemon, clients) = location.split_mut();
    let pings = start_pings(clients)?;
    std::thread::sleep(AROUND);
    let kill_at = Instant::now();
    let status = daemon.kill()?;
    if let Some(pid) = wg_pid {
        ensure!(
            pid_alive(pid),
            "wireguard-go (pid {pid}) died with the daemon"
        );
    }
    let offset = daemon.restart(&gateway)?;
    let restart_took = kill_at.elapsed();
    std::thread::sleep(AROUND);
    narrate(&format!(
        "tidegate-gateway (pid {old_daemon}) killed ({status}); pid {} answering {restart_took:.1?} later",
        daemon.process().pid()
    ));
    let reports = finish_pings(pings)?;
    for (client, report) in clients.iter().zip(&reports) {
        narrate(&format!(
            "{}: {}",
            client.name(),
            report.summary.lines().next().unwrap_or_default()
        ));
        ensure_no_loss(&client.name(), report, &daemon.log_tail())?;
    }

    // The restarted daemon adopted the running device and its peers: the
    // same kernel link, or the same wireguard-go.
    let new_log = location.daemon().log_since(offset);
    let adopted = match backend {
        WgBackend::Kernel => "adopting the existing kernel WireGuard interface",
        WgBackend::WireguardGo => "adopting the running wireguard-go",
    };
    ensure!(
        new_log.contains(adopted),
        "the restarted daemon did not log {adopted:?}:\n{new_log}"
    );
    ensure!(
        !new_log.contains("started wireguard-go")
            && !new_log.contains("created a kernel WireGuard interface"),
        "the restarted daemon made a second device:\n{new_log}"
    );
    assert_eq!(
        location.wireguard_go_pid()?,
        wg_pid,
        "another wireguard-go serves the gateway"
    );
    assert_eq!(
        location.wg_link()?.0,
        link_index,
        "the interface was made anew"
    );
    let peers = location.daemon_mut().peers()?;
    assert_eq!(peers.backend_pid, wg_pid);
    let after = location.wg_peers()?;
    assert_eq!(
        peers_and_handshakes(&after),
        peers_and_handshakes(&before),
        "peers or their sessions changed across the daemon restart"
    );
    narrate(&format!("done in {:.1?}", started.elapsed()));
    Ok(())
}

/// wireguard-go only: a kernel device has no process to die. The gateway
/// runs `backend = "userspace"` here, whatever the kernel offers.
#[test]
fn the_daemon_brings_back_a_killed_wireguard_go() -> Result<()> {
    require_root();
    let _serial = serial();
    let started = Instant::now();
    let mut location = Location::build(&LocationOptions {
        clients: 2,
        backend: "userspace",
        ..LocationOptions::default()
    })?;
    for client in location.clients() {
        client.ping(GATEWAY_TUNNEL, 2)?;
    }
    let before = location.wg_peers()?;
    let peers = location.daemon_mut().peers()?;
    let old_pid = peers
        .backend_pid
        .context("no backend_pid in tidectl peers")?;
    assert_eq!(
        location.wireguard_go_pid()?,
        Some(old_pid),
        "backend_pid is not the process serving the UAPI socket"
    );
    let offset = location.daemon().process().log().len();

    signal_wireguard_go(old_pid, Signal::SIGKILL)?;
    let killed_at = Instant::now();
    location.daemon_mut().wait_for_log(
        "wireguard-go restarted and the config re-applied",
        offset,
        Duration::from_secs(20),
    )?;
    let log = location.daemon().log_since(offset);
    ensure!(
        log.contains("wireguard-go exited; restarting it and re-applying the config"),
        "no log line about the exit:\n{log}"
    );
    narrate(&format!(
        "wireguard-go (pid {old_pid}) killed; the daemon restarted it in {:.1?}",
        killed_at.elapsed()
    ));
    let new_pid = location
        .wireguard_go_pid()?
        .context("no wireguard-go serves the gateway after the restart")?;
    ensure!(
        new_pid != old_pid,
        "the same pid {old_pid} serves the socket"
    );
    let peers = wait_peers(
        &mut location,
        "tidectl peers to show the new wireguard-go",
        STATS_WAIT,
        |peers| {
            if peers.backend_pid == Some(new_pid) {
                Ok(())
            } else {
                Err(format!("backend_pid {:?}", peers.backend_pid))
            }
        },
    )?;
    assert_eq!(peers.peers.len(), 2, "{peers:#?}");
    // Same peers, allowed IPs and endpoints (the endpoints last seen are
    // given back); the sessions are new.
    let config = |peers: &[PeerStats]| -> BTreeSet<String> {
        peers
            .iter()
            .map(|p| format!("{} {:?} {:?}", p.public_key, p.endpoint, p.allowed_ips))
            .collect()
    };
    assert_eq!(config(&location.wg_peers()?), config(&before));

    // Clients recover once they re-handshake (WireGuard retries after about
    // 15 s without a reply).
    let recovered = std::thread::scope(|scope| -> Result<Vec<Duration>> {
        let waits: Vec<_> = location
            .clients()
            .iter()
            .map(|client| {
                scope.spawn(move || {
                    let what = format!("{} to reach {GATEWAY_TUNNEL} again", client.name());
                    poll_until(&what, RECOVERY, Duration::from_millis(200), || {
                        Ok(if client.netns().ping_once(IpAddr::V4(GATEWAY_TUNNEL))? {
                            Probe::Ready(killed_at.elapsed())
                        } else {
                            Probe::NotYet("no reply".into())
                        })
                    })
                })
            })
            .collect();
        waits
            .into_iter()
            .map(|h| match h.join() {
                Ok(r) => r,
                Err(panic) => std::panic::resume_unwind(panic),
            })
            .collect()
    });
    let recovered = recovered
        .with_context(|| format!("gateway log tail:\n{}", location.daemon().log_tail()))?;
    for (client, took) in location.clients().iter().zip(&recovered) {
        narrate(&format!(
            "{} reached the gateway again {took:.1?} after the kill",
            client.name()
        ));
    }
    for client in location.clients() {
        client.ping(GATEWAY_TUNNEL, 3)?;
    }
    narrate(&format!("done in {:.1?}", started.elapsed()));
    Ok(())
}

#[test]
fn mfa_removes_idle_and_silent_peers_and_keeps_active_ones() -> Result<()> {
    require_root();
    let _serial = serial();
    let started = Instant::now();
    let never_mfa = KeyPair::generate()?.public;
    let never_plain = KeyPair::generate()?.public;
    let silent = |key: &str| PeerEntry {
        name: Some("never".into()),
        public_key: key.to_owned(),
        allowed_ips: vec!["10.77.0.40/32".into()],
        ..PeerEntry::default()
    };
    let mfa_threshold = mfa_threshold_secs();
    // The same threshold without MFA: nothing is ever removed.
    let mut plain = Location::build(&LocationOptions {
        clients: 1,
        extra_peers: vec![silent(&never_plain)],
        mfa: false,
        threshold_secs: Some(mfa_threshold),
        stats_interval_ms: Some(200),
        ..LocationOptions::default()
    })?;
    let mfa_start = unix_now();
    // Client 0 pings throughout, client 1 once; "never" has no client.
    // Their pings start as soon as the location is up: a peer without a
    // handshake within the threshold of its addition goes as silent.
    let mut mfa = Location::build(&LocationOptions {
        clients: 2,
        extra_peers: vec![silent(&never_mfa)],
        mfa: true,
        threshold_secs: Some(mfa_threshold),
        stats_interval_ms: Some(200),
        ..LocationOptions::default()
    })?;
    narrate(&format!(
        "MFA location {} and plain location {} built in {:.1?}",
        mfa.run().id(),
        plain.run().id(),
        started.elapsed()
    ));
    let threshold = Duration::from_secs(mfa_threshold);

    let (active_key, idle_key) = (
        mfa.client(0).public_key().to_owned(),
        mfa.client(1).public_key().to_owned(),
    );
    let plain_idle_key = plain.client(0).public_key().to_owned();
    let (mfa_daemon, mfa_clients) = mfa.split_mut();
    let (idle_at, active_report, removals) = std::thread::scope(|scope| -> Result<_> {
        // Pings every 200 ms for 4 thresholds: active all along.
        let active = &mfa_clients[0];
        let pinger = scope.spawn(move || {
            active.ping_paced(
                GATEWAY_TUNNEL,
                mfa_threshold as u32 * 4 * 5,
                Duration::from_millis(200),
            )
        });
        // One handshake, then silence.
        mfa_clients[1].ping(GATEWAY_TUNNEL, 1)?;
        plain.client(0).ping(GATEWAY_TUNNEL, 1)?;
        let idle_at = Instant::now();

        let removals = poll_until(
            "the MFA location to remove the idle and the silent peer",
            threshold * 3,
            Duration::from_millis(200),
            || {
                let removals = mfa_daemon.removals()?;
                Ok(if removals.len() >= 2 {
                    Probe::Ready(removals)
                } else {
                    Probe::NotYet(format!("removals: {removals:?}"))
                })
            },
        )
        .with_context(|| format!("gateway log tail:\n{}", mfa_daemon.log_tail()))?;
        narrate(&format!(
            "two peers removed {:.1?} after the idle client's last ping",
            idle_at.elapsed()
        ));
        let still_pinging = !pinger.is_finished();
        let report = join_ping(pinger)?;
        ensure!(
            still_pinging,
            "the active client stopped pinging before the removals"
        );
        Ok((idle_at, report, removals))
    })?;

    // The active client never lost a reply and is still a peer.
    ensure_no_loss("active client", &active_report, &mfa.daemon().log_tail())?;
    ensure!(
        removals.len() == 2,
        "more than two peers removed: {removals:#?}"
    );
    ensure!(
        removals.iter().all(|r| r.public_key != active_key),
        "the active peer was removed: {removals:#?}"
    );
    let idle = removals
        .iter()
        .find(|r| r.public_key == idle_key)
        .with_context(|| format!("the idle peer is not among the removals: {removals:#?}"))?;
    assert_eq!(idle.reason, "idle", "{idle:?}");
    assert_eq!(idle.name.as_deref(), Some("client1"));
    let last_active = idle
        .last_active
        .context("idle removal without last_active")?;
    let idle_for = idle.removed_at.saturating_sub(last_active);
    ensure!(
        (mfa_threshold..=mfa_threshold + mfa_slack_secs()).contains(&idle_for),
        "idle peer removed {idle_for} s after its last activity, threshold {mfa_threshold} s: {idle:?}"
    );
    let never = removals
        .iter()
        .find(|r| r.public_key == never_mfa)
        .with_context(|| format!("the silent peer is not among the removals: {removals:#?}"))?;
    assert_eq!(never.reason, "no-handshake", "{never:?}");
    ensure!(
        never.removed_at >= mfa_start + mfa_threshold,
        "silent peer removed before the threshold: {never:?} (location started at {mfa_start})"
    );
    let log = mfa.daemon().log_since(0);
    ensure!(
        log.matches("MFA: removed an inactive peer").count() == 2,
        "expected two removal log lines:\n{log}"
    );
    // On the device: only the active client left.
    let device: Vec<String> = mfa.wg_peers()?.into_iter().map(|p| p.public_key).collect();
    assert_eq!(
        device,
        std::slice::from_ref(&active_key),
        "MFA device peers"
    );
    let shown = mfa.daemon_mut().peers()?;
    assert_eq!(shown.mfa_threshold_secs, Some(mfa_threshold));
    mfa.client(0).ping(GATEWAY_TUNNEL, 2)?;

    // The plain location keeps its idle and its silent peer well past the
    // threshold.
    let waited = idle_at.elapsed();
    let keep = threshold * 3;
    if waited < keep {
        std::thread::sleep(keep - waited);
    }
    let removals = plain.daemon_mut().removals()?;
    ensure!(
        removals.is_empty(),
        "the non-MFA location removed peers: {removals:#?}"
    );
    let device: BTreeSet<String> = plain
        .wg_peers()?
        .into_iter()
        .map(|p| p.public_key)
        .collect();
    assert_eq!(
        device,
        BTreeSet::from([plain_idle_key, never_plain]),
        "non-MFA device peers {:.1?} after the idle client's last ping",
        idle_at.elapsed()
    );
    let shown = plain.daemon_mut().peers()?;
    assert_eq!(shown.mfa_threshold_secs, None);
    plain.client(0).ping(GATEWAY_TUNNEL, 1)?;
    narrate(&format!(
        "non-MFA location kept both peers {:.1?} after the idle client's last ping; done in {:.1?}",
        idle_at.elapsed(),
        started.elapsed()
    ));
    Ok(())
}

/// Checks that `out` is a refusal carrying every one of `needles`.
fn ensure_refused(case: &str, out: &CmdOutput, needles: &[&str]) -> Result<()> {
    ensure!(
        !out.status.success(),
        "{case}: `{}` succeeded: {}",
        out.command,
        out.stdout
    );
    let stderr = out.stderr.trim();
    ensure!(
        stderr.starts_with(REFUSED),
        "{case}: stderr does not start with {REFUSED:?}: {stderr}"
    );
    for needle in needles {
        ensure!(
            stderr.contains(needle),
            "{case}: {needle:?} not in the message: {stderr}"
        );
    }
    Ok(())
}

#[test]
fn bad_input_is_refused_and_leaves_the_device_unchanged() -> Result<()> {
    require_root();
    let _serial = serial();
    let started = Instant::now();
    let mut location = Location::build(&LocationOptions {
        clients: 1,
        ..LocationOptions::default()
    })?;
    location.client(0).ping(GATEWAY_TUNNEL, 2)?;
    let reference = dump_config(&location.wg_dump()?);
    ensure!(
        reference.len() == 2,
        "expected the device line and one peer: {reference:#?}"
    );
    let original = location.daemon().config().clone();
    let client_key = location.client(0).public_key().to_owned();
    let fresh = KeyPair::generate()?.public;
    let peer = |key: &str, allowed: &str| PeerEntry {
        name: Some("bad".into()),
        public_key: key.to_owned(),
        allowed_ips: vec![allowed.to_owned()],
        ..PeerEntry::default()
    };

    let tidectl_cases: [(&str, PeerEntry, Vec<&str>); 6] = [
        (
            "key that is not base64",
            peer("abc", "10.77.0.60/32"),
            vec!["peer ", "abc", "public_key: not valid base64"],
        ),
        (
            "key of 3 bytes",
            peer("AAAA", "10.77.0.60/32"),
            vec!["public_key", "decodes to 3 bytes, a WireGuard key is 32"],
        ),
        (
            "address that is not a CIDR",
            peer(&fresh, "10.77.0.300/32"),
            vec![r#"allowed_ips: "10.77.0.300/32" is not a CIDR"#],
        ),
        (
            "CIDR with host bits",
            peer(&fresh, "10.77.0.5/24"),
            vec!["allowed_ips: \"10.77.0.5/24\" has host bits set"],
        ),
        (
            "allowed IPs overlapping another peer's",
            peer(&fresh, "10.77.0.0/30"),
            vec![
                r#"peer "bad" ("#,
                r#"allowed_ips: 10.77.0.0/30 overlaps 10.77.0.2/32 of peer "client0""#,
            ],
        ),
        (
            "public key of an existing peer",
            peer(&client_key, "10.77.0.60/32"),
            vec!["already exists: use `tidectl peer change`"],
        ),
    ];
    for (case, entry, needles) in &tidectl_cases {
        let out = location.daemon().peer_command("add", entry)?;
        ensure_refused(case, &out, needles)?;
        let now = dump_config(&location.wg_dump()?);
        assert_eq!(now, reference, "{case}: the device changed");
        narrate(&format!("{case}: {}", out.stderr.trim()));
    }

    // The same public key twice in the file, then `tidectl reload`.
    let mut duplicate = original.clone();
    duplicate.peers.push(PeerEntry {
        name: Some("twin".into()),
        ..peer(&client_key, "10.77.0.61/32")
    });
    // A listen port already bound in the gateway's namespace.
    let mut port_taken = original.clone();
    if let Some(wg) = port_taken.wireguard.as_mut() {
        wg.listen_port = Some(BUSY_PORT);
    }
    let holder = location
        .gateway()
        .run(|| UdpSocket::bind((Ipv4Addr::UNSPECIFIED, BUSY_PORT)))??;
    let busy = format!("listen_port {BUSY_PORT}: the port is in use on this host");
    let file_cases = [
        (
            "the same public key twice in the file",
            duplicate,
            vec!["public_key is also the key of peer"],
        ),
        ("a listen port in use", port_taken, vec![busy.as_str()]),
    ];
    for (case, config, needles) in file_cases {
        location.daemon_mut().write_config(config)?;
        let out = location.daemon().tidectl(&["reload"])?;
        location.daemon_mut().write_config(original.clone())?;
        ensure_refused(case, &out, &needles)
            .with_context(|| format!("gateway log tail:\n{}", location.daemon().log_tail()))?;
        let now = dump_config(&location.wg_dump()?);
        assert_eq!(now, reference, "{case}: the device changed");
        narrate(&format!("{case}: {}", out.stderr.trim()));
    }
    drop(holder);

    // Nothing is pending: reloading the original file changes nothing, and
    // the tunnel still carries traffic on the original port.
    let reloaded = location.daemon_mut().tidectl_ok(&["reload"])?;
    ensure!(
        reloaded.contains("applied: 0 added, 0 changed, 0 removed, 0 device settings"),
        "reload of the unchanged file: {reloaded}"
    );
    assert_eq!(dump_config(&location.wg_dump()?), reference);
    let peers = location.daemon_mut().peers()?;
    assert_eq!(peers.listen_port, WG_PORT);
    assert_eq!(peers.peers.len(), 1, "{peers:#?}");
    location.client(0).ping(GATEWAY_TUNNEL, 3)?;
    narrate(&format!("done in {:.1?}", started.elapsed()));
    Ok(())
}
