//! End-to-end: the HA agent of two or three gateways on one segment, seen
//! from a client that probes the VIP every 10 ms and learns from each
//! answer which gateway holds it. The election picks the highest priority;
//! a crashed master, a master whose link goes down, and a partition are
//! survived within bounded gaps; forged adverts change nothing and are
//! counted by reason; planned failover, maintenance and SIGTERM hand over
//! without losing a probe.
//!
//! A SIGKILLed or frozen daemon on a live host is fenced by its own XDP
//! program: the host stops answering ARP for the VIP, the backup takes
//! over, and a thawed master steps down before it may win again.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, ensure};
use nix::sys::socket::{IpMembershipRequest, setsockopt, sockopt};
use tidegate_gateway::{
    ha::{
        advert::{Advert, AdvertKey, HEALTH_OK, VERSION},
        machine::Role as WireRole,
        sharing::wire::{self, Kind, Message},
    },
    wireguard::PeerEndpoint,
};
use tidegate_tests::adverts::{AdvertWatch, StatusPolls, longest_gap, numbered_peer, reload_peers};
use tidegate_tests::flood::{Flood, advert_port_flood};
use tidegate_tests::gateway::Counters;
use tidegate_tests::ha::{
    ADVERT_GROUP, ADVERT_PORT, AdvertTransport, CLIENT_ADDR, HaGateway, KEY, LOCATION_ID, Role,
    TunnelOptions, VIP, VIP6, advert_interval_ms, gateway_addr, status_of,
};
use tidegate_tests::{
    HaLocation, HaOptions, HaStatus, KeyPair, PeerEntry, Probe, ProbeSummary, poll_until,
    require_root,
};

/// How long a role change may take after its cause (a few master-down
/// intervals of 350 ms).
const SWITCH: Duration = Duration::from_secs(5);
/// How long the client's neighbour entry may take to follow the master.
const NEIGHBOUR: Duration = Duration::from_secs(3);
/// Probes in flight before and after each event.
const SETTLE: Duration = Duration::from_millis(300);
/// How long a prober runs before the first operation when that operation
/// must come as early as it can: long enough for some answers.
const FIRST_ANSWERS: Duration = Duration::from_millis(60);
/// How long a state must hold to count as stable (about three master-down
/// intervals).
const HOLD: Duration = Duration::from_secs(1);
/// A bound on every prober: 60 s of probes at 10 ms. Tests stop theirs
/// much sooner with SIGTERM.
const PROBES: u64 = 6000;
/// The longest acceptable silence when a master dies (expected: one
/// master-down interval, about 350-450 ms).
const MAX_FAILOVER_GAP_MS: f64 = 1000.0;
/// Forged adverts of each kind.
const FORGED_EACH: u64 = 3;

/// Held by every test of this file: they measure gaps and timings, so they
/// do not share the machine's two cores with each other.
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

/// Unix time in ms (the clock of `tidectl status` transitions).
fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Builds a location, narrating it.
fn build(options: &HaOptions) -> Result<HaLocation> {
    let location = HaLocation::build(options)?;
    narrate(&format!(
        "location {}: gateways {:?} with priorities {:?}, {:?} adverts; gateway {} is MASTER",
        location.run().id(),
        location.ids(),
        options.priorities,
        options.transport,
        options.expected_master()
    ));
    Ok(location)
}

/// Narrates a prober's summary.
fn narrate_probes(what: &str, summary: &ProbeSummary) {
    narrate(&format!("{what}: {}", summary.brief()));
    for loss in summary.losses() {
        narrate(&format!("  {loss}"));
    }
}

/// Checks that every probe was answered, by `sequence` in this order.
fn ensure_no_loss(summary: &ProbeSummary, sequence: &[u32]) -> Result<()> {
    ensure!(
        summary.sent > 0 && summary.lost == 0,
        "probes lost: {} ({:?})",
        summary.brief(),
        summary.losses()
    );
    ensure!(
        summary.sequence == sequence,
        "answered by {:?}, expected {sequence:?}: {}",
        summary.sequence,
        summary.brief()
    );
    Ok(())
}

/// Runs `tidectl <args>` on gateway `id`; it must succeed and print
/// `expected`.
fn tidectl_prints(location: &HaLocation, id: u32, args: &[&str], expected: &str) -> Result<()> {
    let out = location.gateway(id).tidectl(args)?;
    ensure!(
        out.status.success() && out.stdout.contains(expected),
        "`tidectl {}` on gateway {id}: {} {:?} {:?} (expected {expected:?})",
        args.join(" "),
        out.status,
        out.stdout,
        out.stderr
    );
    narrate(&format!(
        "gateway {id}: tidectl {} -> {}",
        args.join(" "),
        out.stdout.trim()
    ));
    Ok(())
}

/// Runs `tidectl <args>` on gateway `id`; it must be refused with
/// `message`.
fn tidectl_refused(location: &HaLocation, id: u32, args: &[&str], message: &str) -> Result<()> {
    let out = location.gateway(id).tidectl(args)?;
    ensure!(
        !out.status.success() && out.stderr.contains(message),
        "`tidectl {}` on gateway {id} should be refused with {message:?}: {} {:?} {:?}",
        args.join(" "),
        out.status,
        out.stdout,
        out.stderr
    );
    narrate(&format!(
        "gateway {id}: tidectl {} refused: {}",
        args.join(" "),
        out.stderr.trim()
    ));
    Ok(())
}

/// Checks that gateway `id`'s last change into `role` gives a reason
/// containing `reason`, and returns its time.
fn changed_to(status: &HaStatus, role: Role, reason: &str) -> Result<u64> {
    let change = status.last_change_to(role).with_context(|| {
        format!(
            "gateway {} never became {role}: {:?}",
            status.gateway_id,
            status.changes()
        )
    })?;
    ensure!(
        change.reason.contains(reason),
        "gateway {} became {role} because {:?}, expected {reason:?}",
        status.gateway_id,
        change.reason
    );
    Ok(change.at_ms)
}

#[test]
fn the_highest_priority_wins_and_holds_the_vip_alone() -> Result<()> {
    require_root();
    let _serial = serial();
    let mut location = build(&HaOptions::priorities(&[100, 110, 120]))?;
    let statuses = location.wait_master(3, SWITCH)?;

    for status in &statuses {
        let gateway = location.gateway(status.gateway_id);
        ensure!(
            status.location_id == LOCATION_ID
                && status.priority == gateway.priority()
                && status.advert_interval_ms == 100
                && status.vips == [IpAddr::V4(VIP)]
                && !status.maintenance,
            "{status:?}"
        );
        let mut peers: Vec<u32> = status.peers.iter().map(|p| p.gateway_id).collect();
        peers.sort_unstable();
        let others: Vec<u32> = [1, 2, 3]
            .into_iter()
            .filter(|&id| id != status.gateway_id)
            .collect();
        ensure!(
            peers == others && status.peers.iter().all(|p| p.healthy),
            "gateway {} hears {:?}",
            status.gateway_id,
            status.peers
        );
        let held = status.vips_held == [IpAddr::V4(VIP)];
        ensure!(
            held == (status.gateway_id == 3),
            "gateway {} reports holding {:?}",
            status.gateway_id,
            status.vips_held
        );
        ensure!(
            status.dropped.is_empty(),
            "adverts dropped: {:?}",
            status.dropped
        );
        // Every gateway keeps the VIP on lo and answers ARP only for the
        // public interface's own addresses.
        ensure!(
            gateway.vip_on_lo()?,
            "gateway {}: no VIP on lo",
            gateway.id()
        );
        for (name, value) in [("arp_ignore", "1"), ("arp_announce", "2")] {
            let key = format!("net.ipv4.conf.{}.{name}", gateway.ifname());
            let got = gateway.netns().exec_ok("sysctl", &["-n", &key])?;
            ensure!(
                got.trim() == value,
                "gateway {}: {key} = {got}",
                gateway.id()
            );
        }
    }
    changed_to(status_of(&statuses, 3)?, Role::Master, "")?;
    narrate(&format!(
        "roles: {}",
        statuses
            .iter()
            .map(HaStatus::brief)
            .collect::<Vec<_>>()
            .join("; ")
    ));
    for id in [1, 2] {
        ensure!(
            !location.gateway(id).vip_on_public()?,
            "gateway {id} has the VIP"
        );
    }

    let summary = location.start_prober(50)?.wait(Duration::from_secs(10))?;
    narrate_probes("50 probes", &summary);
    ensure_no_loss(&summary, &[3])?;
    ensure!(summary.answers == BTreeMap::from([(3, 50)]));

    let neighbour = location.client_neighbour()?;
    ensure!(
        neighbour.as_deref() == Some(location.gateway(3).mac()),
        "the client's entry for {VIP} is {neighbour:?} ({}), not gateway 3's {}",
        location.mac_owner(neighbour.as_deref()),
        location.gateway(3).mac()
    );
    narrate(&format!(
        "client: {VIP} is at {} (gateway 3)",
        location.gateway(3).mac()
    ));
    let polls = location.ensure_single_master_for(HOLD)?;
    narrate(&format!("one MASTER throughout {polls} polls"));
    Ok(())
}

#[test]
fn a_crashed_master_is_replaced_by_the_next_priority_within_a_second() -> Result<()> {
    require_root();
    let _serial = serial();
    let mut location = build(&HaOptions::priorities(&[100, 110, 120]))?;
    let prober = location.start_prober(PROBES)?;
    std::thread::sleep(SETTLE);

    let crashed_at = unix_ms();
    location.gateway_mut(3).crash()?;
    narrate("gateway 3 crashed: daemon and echo killed (SIGKILL), link down");
    let statuses = location.wait_master(2, SWITCH)?;
    let took_over = changed_to(status_of(&statuses, 2)?, Role::Master, "master 3 down")?;
    location.wait_client_neighbour(2, NEIGHBOUR)?;
    std::thread::sleep(SETTLE);
    let summary = prober.finish()?;
    narrate_probes("probes", &summary);
    narrate(&format!(
        "gateway 2 MASTER {} ms after the crash",
        took_over.saturating_sub(crashed_at)
    ));

    ensure!(
        summary.sequence == [3, 2],
        "answered by {:?}: {}",
        summary.sequence,
        summary.brief()
    );
    ensure!(
        summary.lost > 0,
        "no probe lost: the crash did not cut gateway 3 off"
    );
    ensure!(
        summary.longest_gap_ms < MAX_FAILOVER_GAP_MS,
        "gap of {:.1} ms: {}",
        summary.longest_gap_ms,
        summary.brief()
    );
    let polls = location.ensure_single_master_for(HOLD)?;
    narrate(&format!("one MASTER among the survivors in {polls} polls"));
    Ok(())
}

#[test]
fn a_master_whose_link_fails_resigns_and_takes_over_again_when_it_returns() -> Result<()> {
    require_root();
    let _serial = serial();
    let mut location = build(&HaOptions::priorities(&[100, 110, 120]))?;
    let prober = location.start_prober(PROBES)?;
    std::thread::sleep(SETTLE);

    let down_at = unix_ms();
    location.gateway(3).set_link(false)?;
    narrate("gateway 3: public link down");
    let statuses = location.wait_state(
        "gateway 3 FAULT without the VIP, gateway 2 MASTER",
        SWITCH,
        |statuses, holders| {
            let role = |id| status_of(statuses, id).map(|s| (s.role, s.master)).ok();
            holders == [2]
                && role(3).is_some_and(|(role, _)| role == Role::Fault)
                && role(2) == Some((Role::Master, Some(2)))
                && role(1) == Some((Role::Backup, Some(2)))
        },
    )?;
    let fault = changed_to(status_of(&statuses, 3)?, Role::Fault, "is down")?;
    let took_over = changed_to(status_of(&statuses, 2)?, Role::Master, "master 3 down")?;
    ensure!(
        status_of(&statuses, 3)?.vips_held.is_empty(),
        "gateway 3 in FAULT reports holding the VIP"
    );
    narrate(&format!(
        "gateway 3 FAULT after {} ms; gateway 2 MASTER after {} ms",
        fault.saturating_sub(down_at),
        took_over.saturating_sub(down_at)
    ));
    location.wait_client_neighbour(2, NEIGHBOUR)?;
    std::thread::sleep(SETTLE);

    let up_at = unix_ms();
    location.gateway(3).set_link(true)?;
    narrate("gateway 3: public link up");
    let statuses = location.wait_master(3, SWITCH)?;
    let gateway3 = status_of(&statuses, 3)?;
    let backup = changed_to(gateway3, Role::Backup, "health check")?;
    let master = changed_to(gateway3, Role::Master, "")?;
    ensure!(
        up_at <= backup && backup <= master,
        "gateway 3 went BACKUP at {backup}, MASTER at {master}, link up at {up_at}: {:?}",
        gateway3.changes()
    );
    // Back, it asks for the VIPs and gets them by a handover.
    changed_to(
        status_of(&statuses, 2)?,
        Role::Backup,
        "handed over to gateway 3",
    )?;
    narrate(&format!(
        "gateway 3 BACKUP after {} ms, MASTER again after {} ms",
        backup - up_at,
        master - up_at
    ));
    location.wait_client_neighbour(3, NEIGHBOUR)?;
    std::thread::sleep(SETTLE);
    let summary = prober.finish()?;
    narrate_probes("probes", &summary);

    ensure!(
        summary.sequence == [3, 2, 3],
        "answered by {:?}: {}",
        summary.sequence,
        summary.brief()
    );
    // One outage (link down); taking back over is lossless.
    ensure!(
        summary.losses().len() == 1,
        "losses {:?}: {}",
        summary.losses(),
        summary.brief()
    );
    ensure!(
        summary.longest_gap_ms < MAX_FAILOVER_GAP_MS,
        "gap of {:.1} ms: {}",
        summary.longest_gap_ms,
        summary.brief()
    );
    Ok(())
}

#[test]
fn a_partition_makes_two_masters_and_healing_leaves_the_higher_one() -> Result<()> {
    require_root();
    let _serial = serial();
    let mut location = build(&HaOptions::priorities(&[110, 120]))?;
    let prober = location.start_prober(PROBES)?;
    std::thread::sleep(SETTLE);

    let cut_at = unix_ms();
    for id in [1, 2] {
        location.set_advert_flood(id, false)?;
    }
    narrate("partition: the switch stops flooding multicast (adverts) to both gateways");
    let statuses = location.wait_state("both gateways MASTER", SWITCH, |statuses, holders| {
        holders == [1, 2] && statuses.iter().all(|s| s.role == Role::Master)
    })?;
    let dual_from = changed_to(status_of(&statuses, 1)?, Role::Master, "master 2 down")?;
    narrate(&format!(
        "gateway 1 MASTER too, {} ms after the cut",
        dual_from.saturating_sub(cut_at)
    ));
    // The last to announce was gateway 1: the client follows it.
    location.wait_client_neighbour(1, NEIGHBOUR)?;
    std::thread::sleep(HOLD);

    let healed_at = unix_ms();
    for id in [1, 2] {
        location.set_advert_flood(id, true)?;
    }
    narrate("healed");
    let statuses = location.wait_master(2, SWITCH)?;
    let dual_to = changed_to(status_of(&statuses, 1)?, Role::Backup, "gateway 2 outranks")?;
    location.wait_client_neighbour(2, NEIGHBOUR)?;
    let neighbour_back = unix_ms();
    // Announcing again: on hearing gateway 1 as a lower master, or (when
    // gateway 1 heard it first and stepped down) as a gateway back from
    // silence.
    let winner = location.status(2)?;
    let reannounced = winner
        .transitions
        .iter()
        .find(|t| t.at_ms >= healed_at && t.reason.contains("announcing"))
        .cloned();
    std::thread::sleep(SETTLE);
    let summary = prober.finish()?;
    narrate_probes("probes", &summary);
    narrate(&format!(
        "dual-master window {} ms; gateway 1 BACKUP {} ms after healing; \
         gateway 2 re-announced: {}; client back on gateway 2 within {} ms of healing",
        dual_to.saturating_sub(dual_from),
        dual_to.saturating_sub(healed_at),
        reannounced.as_ref().map_or_else(
            || "no".to_owned(),
            |t| format!("after {} ms ({})", t.at_ms - healed_at, t.reason)
        ),
        neighbour_back - healed_at
    ));
    ensure!(
        reannounced.is_some(),
        "gateway 2 did not announce the VIP again after healing: {:?}",
        winner.transitions
    );

    ensure!(
        dual_to >= healed_at && dual_to - healed_at < 1000,
        "gateway 1 went BACKUP at {dual_to}, healed at {healed_at}"
    );
    ensure_no_loss(&summary, &[2, 1, 2])?;
    Ok(())
}

/// The advert versions gateways 1 and 2 write within `within` (what
/// `capture` queued before is dropped), each advert decoded with the
/// location's key.
/// Long enough for two adverts of each gateway in each version.
fn window() -> Duration {
    Duration::from_millis(advert_interval_ms() * 5 / 2)
}

/// The interval gateway 9 of the previous release advertises: it stays in
/// the peer tables four of them after its last advert.
const OLD_INTERVAL: Duration = Duration::from_secs(1);

fn captured_versions(
    capture: &UdpSocket,
    key: &AdvertKey,
    within: Duration,
) -> Result<[BTreeSet<u8>; 2]> {
    capture.set_nonblocking(true)?;
    let mut buf = [0u8; 2048];
    while capture.recv_from(&mut buf).is_ok() {}
    capture.set_nonblocking(false)?;
    let mut versions = [BTreeSet::new(), BTreeSet::new()];
    let end = Instant::now() + within;
    while Instant::now() < end {
        let Ok((len, from)) = capture.recv_from(&mut buf) else {
            continue;
        };
        for (id, seen) in (1..).zip(&mut versions) {
            if from.ip() == IpAddr::V4(gateway_addr(id)) {
                seen.insert(Advert::decode(&buf[..len], key)?.version);
            }
        }
    }
    Ok(versions)
}

#[test]
fn a_gateway_of_the_previous_release_is_heard_and_answered_in_its_format() -> Result<()> {
    require_root();
    let _serial = serial();
    let mut location = build(&HaOptions::priorities(&[110, 120]))?;
    let before = location.wait_master(2, SWITCH)?;
    let (capture, sender) = advert_sockets(&location)?;
    let key = AdvertKey::new(KEY.as_bytes().to_vec());
    let newest = || BTreeSet::from([VERSION]);
    let versions = captured_versions(&capture, &key, window())?;
    ensure!(versions == [newest(), newest()], "{versions:?}");

    // Gateway 9 of the previous release joins as BACKUP: its adverts are
    // version 1, 15 of them 100 ms apart (and the capture's window).
    let group = SocketAddr::from((ADVERT_GROUP, ADVERT_PORT));
    let epoch = unix_ms();
    let old = |sequence| Advert {
        version: 1,
        interval: OLD_INTERVAL,
        epoch,
        ..advert(9, WireRole::Backup, 50, sequence)
    };
    let mut answered = None;
    for sequence in 1..=15 {
        let bytes = old(sequence).encode(&key);
        ensure!(bytes[4] == 1 && bytes.len() == 44 + 17 + 32, "{bytes:?}");
        sender.send_to(&bytes, group)?;
        if sequence == 5 {
            // Two intervals, each gateway's adverts in each version.
            answered = Some(captured_versions(&capture, &key, window())?);
        } else {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let both = BTreeSet::from([1, VERSION]);
    ensure!(
        answered == Some([both.clone(), both]),
        "while gateway 9 is heard the gateways write version 1 too: {answered:?}"
    );
    let during = location.statuses()?;
    for status in &during {
        let nine = status.peers.iter().find(|p| p.gateway_id == 9);
        ensure!(
            status.advert_version == 1 && nine.is_some_and(|p| p.advert_version == 1),
            "gateway {}: version {}, peers {:?}",
            status.gateway_id,
            status.advert_version,
            status.peers
        );
    }
    narrate("gateway 9 (version 1) heard: both gateways advertise in versions 2 and 1");

    // Gone for four of its intervals, it leaves the peer tables, and the
    // location writes the newest version alone again; nobody changed role.
    std::thread::sleep(4 * OLD_INTERVAL + 2 * Duration::from_millis(advert_interval_ms()));
    let versions = captured_versions(&capture, &key, window())?;
    ensure!(versions == [newest(), newest()], "{versions:?}");
    let after = location.wait_master(2, Duration::ZERO)?;
    for (old, new) in before.iter().zip(&after) {
        ensure!(
            old.changes() == new.changes() && new.advert_version == VERSION,
            "gateway {}: {:?} -> {:?}, version {}",
            new.gateway_id,
            old.changes(),
            new.changes(),
            new.advert_version
        );
    }
    narrate("gateway 9 gone: version 2 again, no role changed");
    Ok(())
}

/// Sockets in the client namespace: one joined to the advert group (to
/// capture real adverts), one to send from, with TTL 255 as a gateway's
/// adverts (the shield drops the rest), a stranger on the segment.
fn advert_sockets(location: &HaLocation) -> Result<(UdpSocket, UdpSocket)> {
    location
        .client()
        .run(|| -> Result<(UdpSocket, UdpSocket)> {
            let capture = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, ADVERT_PORT))?;
            setsockopt(
                &capture,
                sockopt::IpAddMembership,
                &IpMembershipRequest::new(ADVERT_GROUP, Some(CLIENT_ADDR)),
            )?;
            capture.set_read_timeout(Some(Duration::from_millis(50)))?;
            let sender = UdpSocket::bind((CLIENT_ADDR, 0))?;
            setsockopt(&sender, sockopt::IpMulticastTtl, &255)?;
            setsockopt(&sender, sockopt::Ipv4Ttl, &255)?;
            Ok((capture, sender))
        })?
}

/// The next advert `capture` receives from gateway `id`.
fn capture_from(capture: &UdpSocket, id: u32) -> Result<Vec<u8>> {
    let mut buf = [0u8; 2048];
    for _ in 0..100 {
        if let Ok((len, from)) = capture.recv_from(&mut buf)
            && from.ip() == IpAddr::V4(gateway_addr(id))
        {
            return Ok(buf[..len].to_vec());
        }
    }
    anyhow::bail!("no advert from gateway {id} captured")
}

/// An advert as a gateway would send it, from gateway `from`.
fn advert(from: u32, role: WireRole, priority: u8, sequence: u64) -> Advert {
    Advert {
        version: VERSION,
        role,
        priority,
        maintenance: false,
        location_id: LOCATION_ID,
        gateway_id: from,
        interval: Duration::from_millis(100),
        epoch: unix_ms(),
        sequence,
        health: HEALTH_OK,
        handover_to: None,
        draining: false,
        preempt: false,
        mac: [0x02, 0, 0, 0, 0, from as u8],
        vips: vec![IpAddr::V4(VIP)],
    }
}

#[test]
fn forged_adverts_change_nothing_and_are_counted_by_reason() -> Result<()> {
    require_root();
    let _serial = serial();
    let mut location = build(&HaOptions::priorities(&[110, 120]))?;
    let before = location.wait_master(2, SWITCH)?;
    let prober = location.start_prober(PROBES)?;
    let (capture, sender) = advert_sockets(&location)?;
    let master_advert = capture_from(&capture, 2)?;
    let backup_advert = capture_from(&capture, 1)?;
    let key = AdvertKey::new(KEY.as_bytes().to_vec());
    for (bytes, id, role) in [
        (&master_advert, 2, WireRole::Master),
        (&backup_advert, 1, WireRole::Backup),
    ] {
        let decoded = Advert::decode(bytes, &key)?;
        ensure!(
            decoded.gateway_id == id && decoded.role == role,
            "{decoded:?}"
        );
    }
    narrate(&format!(
        "captured a {}-byte advert from gateway 2 (MASTER) and one from gateway 1",
        master_advert.len()
    ));

    let wrong_key = AdvertKey::new(b"not the location's key at all".to_vec());
    let takeover = |sequence| advert(9, WireRole::Master, 255, sequence);
    let mut tampered = master_advert.clone();
    tampered[6] = 255; // the priority, under the MAC
    let mut bad_magic = master_advert.clone();
    bad_magic[..4].copy_from_slice(b"VRRP");
    let mut bad_version = master_advert.clone();
    bad_version[4] = VERSION + 1;
    let mut too_long = master_advert.clone();
    too_long.push(0);
    // A gateway never hears its own adverts, so the first replay of its
    // own is news to its replay guard (and then ignored as its own); the
    // later copies are replays to every gateway.
    let replayed_by = |sender: u32, copy: u64| -> Vec<u32> {
        [1, 2]
            .into_iter()
            .filter(|&id| id != sender || copy > 0)
            .collect()
    };
    // (what, bytes, the reason it is dropped for, gateways that count it)
    let mut forgeries: Vec<(&str, Vec<u8>, &str, Vec<u32>)> = Vec::new();
    for n in 0..FORGED_EACH {
        forgeries.extend([
            (
                "MASTER priority 255, wrong key",
                takeover(n + 1).encode(&wrong_key),
                "bad-mac",
                vec![1, 2],
            ),
            (
                "the master's advert, priority raised",
                tampered.clone(),
                "bad-mac",
                vec![1, 2],
            ),
            (
                "replay of the master's advert",
                master_advert.clone(),
                "replay",
                replayed_by(2, n),
            ),
            (
                "replay of the backup's advert",
                backup_advert.clone(),
                "replay",
                replayed_by(1, n),
            ),
            (
                "MASTER priority 255, right key, location 8",
                Advert {
                    location_id: LOCATION_ID + 1,
                    ..takeover(n + 1)
                }
                .encode(&key),
                "wrong-location",
                vec![1, 2],
            ),
            (
                "right key, gateway id 0",
                Advert {
                    gateway_id: 0,
                    ..takeover(n + 1)
                }
                .encode(&key),
                "malformed",
                vec![1, 2],
            ),
            (
                "first 40 bytes",
                master_advert[..40].to_vec(),
                "truncated",
                vec![1, 2],
            ),
            ("bad magic", bad_magic.clone(), "bad-magic", vec![1, 2]),
            (
                "a version newer than this release's",
                bad_version.clone(),
                "bad-version",
                vec![1, 2],
            ),
            (
                "one byte too long",
                too_long.clone(),
                "bad-length",
                vec![1, 2],
            ),
        ]);
    }
    let mut expected: BTreeMap<u32, BTreeMap<String, u64>> = BTreeMap::new();
    let group = SocketAddr::from((ADVERT_GROUP, ADVERT_PORT));
    for (what, bytes, reason, counted_by) in &forgeries {
        sender
            .send_to(bytes, group)
            .with_context(|| format!("sending {what}"))?;
        for id in counted_by {
            *expected
                .entry(*id)
                .or_default()
                .entry((*reason).to_owned())
                .or_default() += 1;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    narrate(&format!(
        "sent {} forged adverts to {group} from the client",
        forgeries.len()
    ));

    let counted = |statuses: &[HaStatus]| {
        statuses
            .iter()
            .all(|s| expected.get(&s.gateway_id) == Some(&s.dropped))
    };
    location.wait_state("the drops counted by reason", SWITCH, |statuses, _| {
        counted(statuses)
    })?;
    // Time for a believed forgery to show: a takeover, a transition.
    std::thread::sleep(HOLD);
    let after = location.wait_master(2, Duration::ZERO)?;
    ensure!(counted(&after), "drops changed: {after:?}");
    for (old, new) in before.iter().zip(&after) {
        ensure!(
            old.changes() == new.changes(),
            "gateway {} changed role: {:?} -> {:?}",
            new.gateway_id,
            old.changes(),
            new.changes()
        );
        ensure!(
            new.peers.iter().all(|p| p.gateway_id <= 2),
            "gateway {} believes in {:?}",
            new.gateway_id,
            new.peers
        );
    }
    for status in &after {
        narrate(&format!(
            "gateway {} dropped {:?}",
            status.gateway_id, status.dropped
        ));
    }
    let summary = prober.finish()?;
    narrate_probes("probes", &summary);
    ensure_no_loss(&summary, &[2])?;

    // The control: the same advert with the right key and location is
    // believed, so the forgeries reached the agents and were refused for
    // what was wrong with them.
    sender.send_to(&takeover(1).encode(&key), group)?;
    location.wait_state(
        "every gateway to follow a real gateway 9 of priority 255",
        SWITCH,
        |statuses, _| statuses.iter().all(|s| s.master == Some(9)),
    )?;
    narrate("control: a well-formed advert from \"gateway 9\" at priority 255 was followed");
    Ok(())
}

#[test]
fn planned_failover_and_maintenance_lose_no_probe() -> Result<()> {
    require_root();
    let _serial = serial();
    let mut location = build(&HaOptions::priorities(&[100, 110, 120]))?;
    let prober = location.start_prober(PROBES)?;
    std::thread::sleep(SETTLE);

    tidectl_refused(
        &location,
        1,
        &["failover"],
        "this gateway is BACKUP, not MASTER",
    )?;
    tidectl_prints(&location, 3, &["failover"], "handing over to gateway 2")?;
    let statuses = location.wait_master(2, SWITCH)?;
    changed_to(
        status_of(&statuses, 2)?,
        Role::Master,
        "handover from gateway 3",
    )?;
    changed_to(
        status_of(&statuses, 3)?,
        Role::Backup,
        "handed over to gateway 2",
    )?;
    location.wait_client_neighbour(2, NEIGHBOUR)?;
    // The old master does not take back what it handed over.
    location.ensure_single_master_for(HOLD)?;
    location.wait_master(2, Duration::ZERO)?;

    // Gateway 3 (the highest priority) in maintenance: a handover skips
    // it, and it does not preempt the lower master it would otherwise.
    tidectl_prints(&location, 3, &["maintenance", "on"], "maintenance on")?;
    tidectl_prints(&location, 2, &["failover"], "handing over to gateway 1")?;
    location.wait_master(1, SWITCH)?;
    location.wait_client_neighbour(1, NEIGHBOUR)?;
    location.ensure_single_master_for(HOLD)?;
    let statuses = location.wait_master(1, Duration::ZERO)?;
    ensure!(
        status_of(&statuses, 3)?.maintenance,
        "gateway 3 not in maintenance"
    );
    narrate("gateway 3 (priority 120) stayed BACKUP in maintenance under gateway 1 (100)");

    tidectl_prints(&location, 3, &["maintenance", "off"], "maintenance off")?;
    let statuses = location.wait_master(3, SWITCH)?;
    changed_to(
        status_of(&statuses, 1)?,
        Role::Backup,
        "handed over to gateway 3",
    )?;
    location.wait_client_neighbour(3, NEIGHBOUR)?;

    // Maintenance on the master hands over first.
    tidectl_prints(&location, 3, &["maintenance", "on"], "maintenance on")?;
    let statuses = location.wait_master(2, SWITCH)?;
    changed_to(
        status_of(&statuses, 2)?,
        Role::Master,
        "handover from gateway 3",
    )?;
    location.wait_client_neighbour(2, NEIGHBOUR)?;

    // No eligible backup left: refused, and nothing changes.
    tidectl_prints(&location, 1, &["maintenance", "on"], "maintenance on")?;
    location.wait_state(
        "gateway 2 to see both backups in maintenance",
        SWITCH,
        |statuses, _| {
            status_of(statuses, 2)
                .is_ok_and(|s| s.peers.len() == 2 && s.peers.iter().all(|p| p.maintenance))
        },
    )?;
    tidectl_refused(
        &location,
        2,
        &["failover"],
        "no healthy backup to hand over to",
    )?;
    tidectl_refused(
        &location,
        2,
        &["maintenance", "on"],
        "no healthy backup to hand over to",
    )?;
    std::thread::sleep(SETTLE);
    let statuses = location.wait_master(2, Duration::ZERO)?;
    ensure!(
        !status_of(&statuses, 2)?.maintenance,
        "a refused maintenance request took effect"
    );

    let summary = prober.finish()?;
    narrate_probes("probes", &summary);
    ensure_no_loss(&summary, &[3, 2, 1, 3, 2])?;
    Ok(())
}

/// Sends a well-formed advert of the location to gateway `to`'s address
/// from the client, which is not on the unicast peer list.
fn advert_from_a_stranger(location: &HaLocation, to: &HaGateway) -> Result<()> {
    let (_, sender) = advert_sockets(location)?;
    let key = AdvertKey::new(KEY.as_bytes().to_vec());
    sender.send_to(
        &advert(9, WireRole::Master, 255, 1).encode(&key),
        (to.addr(), ADVERT_PORT),
    )?;
    Ok(())
}

#[test]
fn sigterm_on_the_master_hands_over_without_losing_a_probe() -> Result<()> {
    require_root();
    let _serial = serial();
    let mut location = build(&HaOptions {
        transport: AdvertTransport::Unicast,
        ..HaOptions::priorities(&[110, 120])
    })?;

    // Unicast adverts are heard from the listed peers only: the shield
    // drops the rest before the socket.
    for id in [1, 2] {
        advert_from_a_stranger(&location, location.gateway(id))?;
    }
    for id in [1, 2] {
        let gateway = location.gateway_mut(id);
        poll_until(
            &format!("gateway {id}'s shield to drop the stranger's advert"),
            SWITCH,
            Duration::from_millis(25),
            || {
                let dropped = gateway
                    .daemon_mut()
                    .counters()?
                    .counter("advert-stranger")?;
                Ok(match dropped.packets {
                    1 => Probe::Ready(()),
                    n => Probe::NotYet(format!("advert-stranger {n}")),
                })
            },
        )?;
    }
    let statuses = location.wait_master(2, Duration::ZERO)?;
    ensure!(
        statuses.iter().all(|s| s.dropped.is_empty()),
        "an agent saw the stranger's advert: {statuses:?}"
    );
    narrate("unicast: an advert from the client was dropped by the shield as advert-stranger");

    let prober = location.start_prober(PROBES)?;
    std::thread::sleep(SETTLE);
    let started = Instant::now();
    let status = location.gateway_mut(2).daemon_mut().stop()?;
    let took = started.elapsed();
    ensure!(status.success(), "gateway 2's daemon exited {status}");
    ensure!(
        !location.gateway(2).vip_on_public()?,
        "gateway 2 exited holding the VIP"
    );
    narrate(&format!(
        "gateway 2's daemon handed over and exited {took:.1?} after SIGTERM"
    ));
    let statuses = location.wait_master(1, SWITCH)?;
    changed_to(
        status_of(&statuses, 1)?,
        Role::Master,
        "handover from gateway 2",
    )?;
    location.wait_client_neighbour(1, NEIGHBOUR)?;
    std::thread::sleep(SETTLE);
    let summary = prober.finish()?;
    narrate_probes("probes", &summary);
    ensure_no_loss(&summary, &[2, 1])?;
    Ok(())
}

/// The probes were answered by `sequence` of gateways in turn, and no
/// silence was longer than [`MAX_FAILOVER_GAP_MS`].
fn ensure_failover(summary: &ProbeSummary, sequence: &[u32]) -> Result<()> {
    ensure!(
        summary.sequence == sequence,
        "answered by {:?}: {}",
        summary.sequence,
        summary.brief()
    );
    ensure!(
        summary.longest_gap_ms < MAX_FAILOVER_GAP_MS,
        "gap of {:.1} ms: {}",
        summary.longest_gap_ms,
        summary.brief()
    );
    Ok(())
}

/// ARP resolutions of the VIP made afresh while a dead or frozen master's
/// kernel still has the VIP on its interface.
const RESOLUTIONS: u32 = 10;

/// Resolves the VIP [`RESOLUTIONS`] times from scratch: every answer must
/// come from gateway `id` (a host whose agent is gone is fenced).
fn every_resolution_is(location: &HaLocation, id: u32) -> Result<()> {
    let mac = location.gateway(id).mac().to_owned();
    for round in 0..RESOLUTIONS {
        let answered = location.resolve_vip_afresh()?;
        ensure!(
            answered.as_deref() == Some(mac.as_str()),
            "resolution {round}: the VIP resolved to {answered:?} ({}), not gateway {id}",
            location.mac_owner(answered.as_deref())
        );
    }
    narrate(&format!(
        "{RESOLUTIONS} fresh ARP resolutions of the VIP: all gateway {id}"
    ));
    Ok(())
}

#[test]
fn a_killed_daemon_on_a_live_host_is_fenced_and_replaced() -> Result<()> {
    require_root();
    let _serial = serial();
    let mut location = build(&HaOptions::priorities(&[100, 120]))?;
    let prober = location.start_prober(PROBES)?;
    std::thread::sleep(SETTLE);

    // Only the daemon dies: the host, its link, its echo and the VIP on
    // its interface stay; the pinned XDP program stays and its lease lapses.
    location.gateway_mut(2).daemon_mut().kill()?;
    narrate("gateway 2's daemon killed (SIGKILL); host, link and echo up");
    ensure!(
        location.gateway(2).vip_on_public()?,
        "the killed daemon's VIP is gone from its interface: nothing left to fence"
    );
    let statuses = location.wait_master(1, SWITCH)?;
    changed_to(status_of(&statuses, 1)?, Role::Master, "master 2 down")?;
    location.wait_client_neighbour(1, NEIGHBOUR)?;
    every_resolution_is(&location, 1)?;
    std::thread::sleep(SETTLE);
    let summary = prober.finish()?;
    narrate_probes("probes", &summary);
    ensure_failover(&summary, &[2, 1])?;

    // The restarted daemon first drops the stale VIP, takes over its
    // pinned program, and wins back the VIP by priority.
    let netns = location.gateway(2).netns().clone();
    let offset = location.gateway_mut(2).daemon_mut().restart(&netns)?;
    let log = location.gateway(2).daemon().log_since(offset);
    for expected in [
        "removing VIPs left on the public interface",
        "XDP shield replaced in the pinned link",
    ] {
        ensure!(log.contains(expected), "no {expected:?} in the log:\n{log}");
    }
    location.wait_master(2, SWITCH)?;
    location.wait_client_neighbour(2, NEIGHBOUR)?;
    location.ensure_single_master_for(HOLD)?;
    Ok(())
}

#[test]
fn a_frozen_master_is_fenced_and_steps_down_when_thawed() -> Result<()> {
    require_root();
    let _serial = serial();
    let mut location = build(&HaOptions::priorities(&[100, 120]))?;
    let prober = location.start_prober(PROBES)?;
    std::thread::sleep(FIRST_ANSWERS);

    // Frozen while its announcements of the VIP are still going out: none
    // of those left may go out after the thaw, or the segment would point
    // at a gateway that no longer holds the VIP.
    let took_over_ms = location
        .status(2)?
        .last_change_to(Role::Master)
        .map(|t| t.at_ms)
        .context("gateway 2 never became master")?;
    location
        .gateway_mut(2)
        .signal_daemon(nix::sys::signal::Signal::SIGSTOP)?;
    narrate(&format!(
        "gateway 2's daemon frozen (SIGSTOP) {} ms after it took over",
        unix_ms().saturating_sub(took_over_ms)
    ));
    // Only gateway 1 answers on its socket while gateway 2 is frozen.
    let started = Instant::now();
    loop {
        let status = location.status(1)?;
        if status.role == Role::Master {
            break;
        }
        ensure!(
            started.elapsed() < SWITCH,
            "gateway 1 did not take over from the frozen master: {}",
            status.brief()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    location.wait_client_neighbour(1, NEIGHBOUR)?;
    every_resolution_is(&location, 1)?;

    // Thawed: the agent sees it slept past its lease, steps down and
    // releases the VIP, then wins back by priority through an election.
    let claims = location.watch_vip_claims()?;
    let thawed = Instant::now();
    let thawed_at = unix_ms();
    location
        .gateway_mut(2)
        .signal_daemon(nix::sys::signal::Signal::SIGCONT)?;
    narrate("gateway 2's daemon thawed (SIGCONT)");
    let statuses = location.wait_master(2, SWITCH)?;
    let status = status_of(&statuses, 2)?;
    let after_thaw: Vec<_> = status
        .transitions
        .iter()
        .filter(|t| t.at_ms + 50 >= thawed_at)
        .collect();
    ensure!(
        after_thaw
            .first()
            .is_some_and(|t| t.to == Role::Backup && t.reason.contains("past the lease")),
        "the thawed master did not step down first: {after_thaw:?}"
    );
    let won_back_at = after_thaw
        .iter()
        .find(|t| t.to == Role::Master)
        .context("no change to master after the thaw")?
        .at_ms;
    location.wait_client_neighbour(2, NEIGHBOUR)?;
    location.ensure_single_master_for(HOLD)?;
    std::thread::sleep(SETTLE);
    let summary = prober.finish()?;
    narrate_probes("probes", &summary);

    // Between the thaw and winning back, gateway 2 claimed nothing.
    let won_back = thawed + Duration::from_millis(won_back_at.saturating_sub(thawed_at));
    let mac = location.gateway(2).mac().to_owned();
    let stale: Vec<u128> = claims
        .finish()?
        .iter()
        .filter(|c| c.mac == mac && c.at < won_back)
        .map(|c| c.at.duration_since(thawed).as_millis())
        .collect();
    ensure!(
        stale.is_empty(),
        "gateway 2 claimed the VIP {stale:?} ms after the thaw, before it won it back at {} ms",
        won_back_at.saturating_sub(thawed_at)
    );
    ensure_failover(&summary, &[2, 1, 2])?;
    Ok(())
}

#[test]
fn a_tracked_uplink_going_down_lowers_the_priority_and_moves_the_vip() -> Result<()> {
    require_root();
    let _serial = serial();
    let options = HaOptions {
        tracked_uplink: Some((2, 50)),
        ..HaOptions::priorities(&[100, 120])
    };
    let mut location = build(&options)?;
    let prober = location.start_prober(PROBES)?;
    std::thread::sleep(SETTLE);

    location.gateway(2).set_uplink(false)?;
    narrate("gateway 2's tracked uplink down (weight 50): priority 120 -> 70");
    location.wait_master(1, SWITCH)?;
    let status = location.status(2)?;
    ensure!(
        status.priority == 70,
        "gateway 2 runs at priority {} with its uplink down",
        status.priority
    );
    location.wait_client_neighbour(1, NEIGHBOUR)?;

    location.gateway(2).set_uplink(true)?;
    narrate("gateway 2's uplink up again: priority 120, it takes the VIP back");
    location.wait_master(2, SWITCH)?;
    ensure!(location.status(2)?.priority == 120, "priority not restored");
    location.wait_client_neighbour(2, NEIGHBOUR)?;
    location.ensure_single_master_for(HOLD)?;
    std::thread::sleep(SETTLE);
    let summary = prober.finish()?;
    narrate_probes("probes", &summary);
    ensure_failover(&summary, &[2, 1, 2])?;
    Ok(())
}

#[test]
fn an_ipv6_vip_moves_with_unsolicited_neighbour_adverts_and_is_fenced() -> Result<()> {
    require_root();
    let _serial = serial();
    let options = HaOptions {
        ipv6: true,
        ..HaOptions::priorities(&[100, 120])
    };
    let mut location = build(&options)?;
    ensure!(
        location.gateway(2).vip6_on_public()? && !location.gateway(1).vip6_on_public()?,
        "{VIP6} is not on the master's interface alone"
    );
    ensure!(
        location.resolve_vip6_afresh()?.as_deref() == Some(location.gateway(2).mac()),
        "{VIP6} does not resolve to the master"
    );

    // A handover: the new master's unsolicited neighbour adverts (override
    // flag) move the client's existing entry; no solicitation needed.
    tidectl_prints(&location, 2, &["failover"], "handing over to gateway 1")?;
    location.wait_master(1, SWITCH)?;
    location.wait_client_neighbour6(1, NEIGHBOUR)?;
    ensure!(
        location.gateway(1).vip6_on_public()? && !location.gateway(2).vip6_on_public()?,
        "{VIP6} did not move with the handover"
    );
    narrate("handover: the client's IPv6 neighbour entry moved to gateway 1");

    // The new master's daemon dies on a live host: its neighbour
    // solicitations for the VIP are fenced, so every fresh resolution finds
    // gateway 2, which takes over.
    location.gateway_mut(1).daemon_mut().kill()?;
    location.wait_master(2, SWITCH)?;
    let mac = location.gateway(2).mac().to_owned();
    for round in 0..RESOLUTIONS {
        let answered = location.resolve_vip6_afresh()?;
        ensure!(
            answered.as_deref() == Some(mac.as_str()),
            "resolution {round}: {VIP6} resolved to {answered:?} ({})",
            location.mac_owner(answered.as_deref())
        );
    }
    narrate(&format!(
        "{RESOLUTIONS} fresh IPv6 resolutions of the VIP: all gateway 2"
    ));
    Ok(())
}

/// Peers of the location: how many the load test gives gateway 1, and how
/// many more its reload adds.
const LOAD_PEERS: usize = 10_000;
/// How long the load test watches the adverts once the load starts.
const LOAD_WATCH: Duration = Duration::from_secs(8);

/// The master keeps its advert pace, and no other gateway takes over,
/// while it is asked for its status every 100 ms, kicks 10,000 handshakes
/// and reloads a config with 10,000 more peers, all at once: nothing the
/// adverts and the lease depend on waits on the tasks that are busy.
#[test]
fn adverts_keep_their_pace_through_status_polls_a_large_reload_and_a_kick_storm() -> Result<()> {
    require_root();
    let _serial = serial();
    let interval = Duration::from_millis(100);
    let mut options = HaOptions::priorities(&[150, 200, 100]);
    options.advert_interval_ms = interval.as_millis() as u64;
    options.wireguard = Some(TunnelOptions {
        private_key: KeyPair::generate()?.private,
        stats_interval_ms: None,
        kick_rate: None,
        handover_window_ms: None,
    });
    let mut location = build(&options)?;
    location.wait_master(2, SWITCH)?;

    // Gateway 1 has 10,000 peers, each recently active by its endpoint
    // table (as another gateway of the location reports them).
    let first: Vec<PeerEntry> = (0..LOAD_PEERS).map(numbered_peer).collect();
    reload_peers(location.gateway_mut(1), first.clone())?;
    share_endpoints(&location, &first)?;
    poll_until(
        "gateway 1's endpoint table to hold every peer",
        Duration::from_secs(20),
        Duration::from_millis(200),
        || {
            let entries = location
                .status(1)?
                .endpoints
                .map_or(0, |endpoints| endpoints.entries);
            Ok(if entries >= LOAD_PEERS {
                Probe::Ready(())
            } else {
                Probe::NotYet(format!("{entries} entries"))
            })
        },
    )?;
    narrate(&format!(
        "gateway 1 has {LOAD_PEERS} peers, all recently active by its endpoint table"
    ));

    // The load: gateway 2 goes into maintenance and hands over to gateway
    // 1, which kicks every peer; meanwhile its status is asked for every
    // 100 ms and it reloads a config with 10,000 more peers.
    let adverts = AdvertWatch::start(&location)?;
    let polls = StatusPolls::start(location.gateway(1), interval)?;
    let started = Instant::now();
    location
        .gateway_mut(2)
        .daemon_mut()
        .tidectl_ok(&["maintenance", "on"])?;
    let mut both = first;
    both.extend((LOAD_PEERS..2 * LOAD_PEERS).map(numbered_peer));
    let reload_started = Instant::now();
    reload_peers(location.gateway_mut(1), both)?;
    let reload_took = reload_started.elapsed();
    std::thread::sleep(LOAD_WATCH.saturating_sub(started.elapsed()));
    let answered = polls.finish()?;
    let adverts = adverts.finish()?;

    let status = location.status(1)?;
    ensure!(status.role == Role::Master, "{}", status.brief());
    let storm = status
        .failovers
        .last()
        .context("gateway 1 kicked nothing")?;
    let master_from = adverts
        .iter()
        .find(|a| a.gateway_id == 1 && a.role == WireRole::Master)
        .map(|a| a.at)
        .context("gateway 1 never advertised as MASTER")?;
    let (sent, longest) = longest_gap(&adverts, 1, master_from);
    let others: Vec<u32> = adverts
        .iter()
        .filter(|a| a.gateway_id != 1 && a.role == WireRole::Master && a.at > master_from)
        .map(|a| a.gateway_id)
        .collect();
    narrate(&format!(
        "{sent} adverts from gateway 1 as MASTER, the longest gap {} ms (interval {} ms); \
         {answered} status answers; the reload took {} ms; {} of {} peers kicked",
        longest.as_millis(),
        interval.as_millis(),
        reload_took.as_millis(),
        storm.kicked,
        storm.recently_active
    ));
    ensure!(
        storm.recently_active == LOAD_PEERS && storm.kicked > 0,
        "not a kick storm: {storm:?}"
    );
    ensure!(
        longest < interval * 3 / 2,
        "gateway 1 went {} ms without an advert (interval {} ms)",
        longest.as_millis(),
        interval.as_millis()
    );
    ensure!(
        others.is_empty(),
        "other gateways advertised as MASTER: {others:?}"
    );
    ensure!(
        answered >= 40,
        "only {answered} status requests answered in {} s",
        LOAD_WATCH.as_secs()
    );
    for id in [2, 3] {
        let status = location.status(id)?;
        ensure!(
            status
                .last_change_to(Role::Master)
                .is_none_or(|t| t.at_ms < unix_ms() - started.elapsed().as_millis() as u64),
            "gateway {id} became MASTER under the load: {:?}",
            status.changes()
        );
    }
    Ok(())
}

/// Tells the location, as a gateway 9 of it would, that `peers` completed
/// a handshake a second ago, each at an address of the segment that no
/// host has (a kick to it goes nowhere).
fn share_endpoints(location: &HaLocation, peers: &[PeerEntry]) -> Result<()> {
    let now = SystemTime::now() - Duration::from_secs(1);
    let entries: Vec<PeerEndpoint> = peers
        .iter()
        .enumerate()
        .map(|(i, peer)| -> Result<PeerEndpoint> {
            Ok(PeerEndpoint {
                key: peer.public_key.parse()?,
                endpoint: SocketAddr::from(([198, 51, 100, 77], 20_000 + i as u16)),
                last_handshake: now,
                kicked: false,
            })
        })
        .collect::<Result<_>>()?;
    let template = Message {
        kind: Kind::Refresh,
        location_id: LOCATION_ID,
        gateway_id: 9,
        epoch: unix_ms(),
        sequence: 1,
        mac: [2, 0, 0, 0, 0, 9],
        part: 0,
        parts: 1,
        entries: Vec::new(),
    };
    let key = AdvertKey::new(KEY.as_bytes().to_vec());
    let (_, sender) = advert_sockets(location)?;
    for message in wire::split(&template, Kind::Refresh, &entries) {
        sender.send_to(&message.encode(&key), (ADVERT_GROUP, ADVERT_PORT))?;
        // Paced: each gateway's queue for endpoint messages is bounded.
        std::thread::sleep(Duration::from_micros(500));
    }
    Ok(())
}

/// How long the flood on the advert port lasts.
const FLOOD: Duration = Duration::from_secs(10);
/// Threads sending it.
const FLOOD_THREADS: usize = 4;

/// A host on the segment floods the advert port of the backup, of the
/// master, of the VIP and of the advert group with junk, endpoint-shaped
/// junk and adverts signed with the wrong key, half with TTL 255, as fast
/// as this machine sends: the shield drops it before the sockets (all but
/// a budget of strangers on the segment), real adverts keep flowing, and
/// nothing changes role.
#[test]
fn a_flood_on_the_advert_port_moves_nothing() -> Result<()> {
    require_root();
    let _serial = serial();
    let interval = Duration::from_millis(100);
    let mut location = build(&HaOptions::priorities(&[150, 200]))?;
    let before = location.wait_master(2, SWITCH)?;
    let shield_before: Vec<Counters> = [1, 2]
        .into_iter()
        .map(|id| location.gateway_mut(id).daemon_mut().counters())
        .collect::<Result<_>>()?;

    let adverts = AdvertWatch::start(&location)?;
    let started = Instant::now();
    let spec = advert_port_flood(FLOOD_THREADS, FLOOD);
    let flood = Flood::start(location.client(), CLIENT_ADDR, &spec)?;
    let flooded = flood.finish()?;
    let adverts = adverts.finish()?;

    let after = location.wait_master(2, Duration::ZERO)?;
    let (sent, longest) = longest_gap(&adverts, 2, started);
    let others: Vec<u32> = adverts
        .iter()
        .filter(|a| a.gateway_id != 2 && a.role == WireRole::Master && a.at > started)
        .map(|a| a.gateway_id)
        .collect();
    narrate(&format!(
        "{} datagrams in {:.1} s ({:.0}/s) from {FLOOD_THREADS} threads; gateway 2 sent {sent} \
         adverts as MASTER meanwhile, the longest gap {} ms (interval {} ms)",
        flooded.sent,
        flooded.elapsed.as_secs_f64(),
        flooded.rate(),
        longest.as_millis(),
        interval.as_millis()
    ));
    for (id, before) in [1, 2].into_iter().zip(&shield_before) {
        let now = location.gateway_mut(id).daemon_mut().counters()?;
        let moved = |name: &str| -> Result<u64> {
            Ok(now.counter(name)?.packets - before.counter(name)?.packets)
        };
        let status = status_of(&after, id)?;
        narrate(&format!(
            "gateway {id}: the shield passed {} and dropped {} (TTL), {} (not on the segment), {} \
             (past the strangers' budget); the agent dropped {:?}",
            moved("advert")?,
            moved("advert-ttl")?,
            moved("advert-stranger")?,
            moved("advert-throttled")?,
            status.dropped
        ));
        ensure!(
            moved("advert-ttl")? > 0 && moved("advert-throttled")? > 0,
            "gateway {id}'s shield did not see the flood"
        );
        ensure!(
            status.dropped("socket-queue-full") == 0,
            "gateway {id}'s advert socket overflowed: {:?}",
            status.dropped
        );
    }
    for (old, new) in before.iter().zip(&after) {
        ensure!(
            old.changes() == new.changes(),
            "gateway {} changed role under the flood: {:?} -> {:?}",
            new.gateway_id,
            old.changes(),
            new.changes()
        );
    }
    ensure!(
        others.is_empty(),
        "other gateways advertised as MASTER: {others:?}"
    );
    ensure!(
        sent > 0 && longest < interval * 3,
        "gateway 2's adverts stalled under the flood: {sent} sent, longest gap {} ms",
        longest.as_millis()
    );
    Ok(())
}

/// How far the wall clock steps back before a restart: an hour, far below
/// any epoch the gateway used before.
const CLOCK_BACK_MS: i64 = 3_600_000;

/// The epoch in gateway `id`'s epoch file, if it has one.
fn epoch_file(location: &HaLocation, id: u32) -> Option<u64> {
    let path = location.gateway(id).dir().join("state").join("ha-epoch");
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

#[test]
#[ignore = "steps the wall clock: runs in the kernel suite's VMs (cargo xtask test-kernels clock)"]
fn a_gateway_restarted_after_its_clock_stepped_back_is_heard_and_no_split_brain() -> Result<()> {
    require_root();
    // Before anything is built: on the host this stops here, clock untouched.
    ensure!(
        tidegate_tests::clock::steppable(),
        "this test steps the wall clock; it runs in the kernel suite's VMs \
         (cargo xtask test-kernels clock), where {} is 1",
        tidegate_tests::clock::STEPPABLE_ENV
    );
    let _serial = serial();
    let options = HaOptions::priorities(&[100, 110]);
    let interval = Duration::from_millis(options.advert_interval_ms);
    let mut location = build(&options)?;
    location.wait_master(2, SWITCH)?;
    let first = epoch_file(&location, 2);
    narrate(&format!("gateway 2's epoch file: {first:?}"));

    location.gateway_mut(2).daemon_mut().kill()?;
    location.wait_master(1, SWITCH)?;
    narrate("gateway 2's daemon killed (SIGKILL): gateway 1 took over");

    let clock = tidegate_tests::clock::ClockStep::by(-CLOCK_BACK_MS)?;
    narrate(&format!(
        "wall clock stepped back {} s (NTP correcting a fast clock)",
        CLOCK_BACK_MS / 1000
    ));
    let gateway = location.gateway_mut(2);
    let netns = gateway.netns().clone();
    gateway.daemon_mut().restart(&netns)?;
    narrate("gateway 2's daemon restarted, outranking the master");

    // Gateway 1 must hear the restarted gateway: it hands the VIP over to
    // it (gateway 2 outranks it and preempts), and only one holds it.
    let statuses = location.wait_master(2, SWITCH)?;
    let one = status_of(&statuses, 1)?;
    let heard = one
        .peers
        .iter()
        .find(|p| p.gateway_id == 2)
        .map(|p| p.last_seen_ms);
    ensure!(
        heard.is_some_and(|ms| ms < 3 * interval.as_millis() as u64),
        "gateway 1 does not hear gateway 2 (last seen {heard:?} ms ago); it dropped {:?}",
        one.dropped
    );
    ensure!(
        one.dropped("replay") == 0,
        "gateway 1 refused gateway 2's adverts as replays: {:?}",
        one.dropped
    );
    // Long enough for a few polls where status requests are slow (TCG).
    let mut polls = 0;
    while polls < 5 {
        polls += location.ensure_single_master_for(interval * 10)?;
    }
    narrate(&format!(
        "gateway 1 hears gateway 2 and handed over; one MASTER throughout {polls} polls"
    ));
    let second = epoch_file(&location, 2);
    narrate(&format!("gateway 2's epoch file: {second:?}"));
    ensure!(
        first.is_some() && second == first.map(|e| e + 1),
        "gateway 2's epoch went from {first:?} to {second:?}, not to the last one plus one"
    );
    drop(clock);
    Ok(())
}
