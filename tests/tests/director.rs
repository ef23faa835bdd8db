//! End-to-end: the director of a three-gateway location in front of real
//! WireGuard clients (wireguard-go, one namespace and one interface each).
//! The master pins every client to one gateway, as the Maglev table of the
//! healthy gateways says, and each client's packets reach that gateway
//! only; when the master crashes, the next one steers, and every client
//! whose gateway survived goes on with no new handshake; a draining
//! gateway keeps its clients and gets no new ones.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use tidegate_tests::director::{
    DirectorClient, DirectorLocation, DirectorOptions, VIP, WG_PORT, predicted,
};
use tidegate_tests::require_root;
use tidegate_tests::wait::{Probe, poll_until};

/// Clients that connect first: 20 on the host; 12 where the CPUs are
/// emulated (the one emulated core runs every client's WireGuard).
fn clients() -> usize {
    tidegate_tests::pace::load(20, 12)
}
/// Clients that connect only while a gateway drains.
const LATE: usize = 4;
/// Priorities of gateways 1, 2 and 3: 3 is the first master, 2 the next.
const PRIORITIES: [u8; 3] = [100, 110, 120];
/// How long a takeover may take to steer.
const TAKEOVER: Duration = Duration::from_secs(10);
/// How long a client whose gateway survived may take to be answered again.
const RESUME: Duration = Duration::from_secs(10);
/// How long a client whose gateway died may take to be answered again: it
/// starts a new handshake 15 s (keepalive plus rekey timeout) after it
/// last heard its gateway.
const REHANDSHAKE: Duration = Duration::from_secs(40);
/// How long peer stats may take to show what the clients sent.
const STATS: Duration = Duration::from_secs(5);

/// Prints a step to the test's captured output.
fn narrate(line: &str) {
    println!("  {line}");
}

/// Runs `f` for each client in `indexes` on a thread of its own; every one
/// must succeed.
fn each_client<T: Send>(
    location: &DirectorLocation,
    indexes: &[usize],
    f: impl Fn(&DirectorClient) -> Result<T> + Sync,
) -> Result<Vec<T>> {
    let clients = location.clients();
    std::thread::scope(|scope| {
        let handles: Vec<_> = indexes
            .iter()
            .map(|&j| {
                let f = &f;
                let client = &clients[j];
                scope.spawn(move || f(client).with_context(|| format!("client {j}")))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    })
}

/// Every client's endpoint and the gateway `members` give it.
fn expected(
    location: &DirectorLocation,
    indexes: &[usize],
    members: &[u32],
) -> Result<BTreeMap<usize, u32>> {
    indexes
        .iter()
        .map(|&j| Ok((j, predicted(members, location.clients()[j].endpoint())?)))
        .collect()
}

/// The director's pins, by client index (clients it has no pin for left
/// out).
fn pins(location: &mut DirectorLocation, director: u32) -> Result<BTreeMap<usize, u32>> {
    let by_endpoint: BTreeMap<SocketAddr, usize> = location
        .clients()
        .iter()
        .map(|c| (c.endpoint(), c.index()))
        .collect();
    let sessions = location.gateway(director).sessions()?;
    let mut out = BTreeMap::new();
    for session in sessions {
        let j = by_endpoint
            .get(&session.client)
            .with_context(|| format!("a pin for {}, which is no client", session.client))?;
        out.insert(*j, session.gateway_id);
    }
    Ok(out)
}

/// Waits until the peer stats of every running gateway in `gateways` show
/// each client in `expected` at its gateway (a handshake and bytes
/// received) and at no other (no handshake, no bytes).
fn wait_one_gateway_each(
    location: &mut DirectorLocation,
    gateways: &[u32],
    expected: &BTreeMap<usize, u32>,
) -> Result<()> {
    let keys: BTreeMap<usize, String> = expected
        .keys()
        .map(|&j| (j, location.clients()[j].public_key().to_owned()))
        .collect();
    poll_until(
        "every client to be seen by its gateway only",
        STATS,
        Duration::from_millis(200),
        || {
            let mut wrong = Vec::new();
            for &g in gateways {
                let peers = location.gateway(g).peers()?;
                for (&j, &home) in expected {
                    let peer = peers
                        .peer(&keys[&j])
                        .with_context(|| format!("gateway {g} has no peer for client {j}"))?;
                    let seen = peer.last_handshake.is_some() || peer.rx_bytes > 0;
                    let served = peer.last_handshake.is_some() && peer.rx_bytes > 0;
                    if (home == g && !served) || (home != g && seen) {
                        wrong.push(format!(
                            "client {j} (gateway {home}) at gateway {g}: handshake {:?}, {} bytes",
                            peer.last_handshake, peer.rx_bytes
                        ));
                    }
                }
            }
            Ok(if wrong.is_empty() {
                Probe::Ready(())
            } else {
                Probe::NotYet(wrong.join("; "))
            })
        },
    )
}

#[test]
fn the_director_spreads_clients_survives_its_crash_and_drains() -> Result<()> {
    require_root();
    let mut location = DirectorLocation::build(&DirectorOptions {
        priorities: PRIORITIES.to_vec(),
        clients: clients() + LATE,
    })?;
    narrate(&format!(
        "location {}: gateways 1-3 in director mode, gateway 3 MASTER steering across 1, 2, 3; {} clients",
        location.run().id(),
        clients() + LATE
    ));

    // 1. The first clients connect: pinned as the table says, spread over
    // every gateway, each seen by its gateway alone.
    let first: Vec<usize> = (0..clients()).collect();
    each_client(&location, &first, |c| c.ping(3))?;
    let want = expected(&location, &first, &[1, 2, 3])?;
    let spread: BTreeSet<u32> = want.values().copied().collect();
    ensure!(
        spread.len() == 3,
        "the table gives the clients to {spread:?} only"
    );
    let got = pins(&mut location, 3)?;
    ensure!(
        got == want,
        "pins on gateway 3: {got:?}, the table says {want:?}"
    );
    let per_gateway = |pins: &BTreeMap<usize, u32>| {
        let mut count = BTreeMap::<u32, usize>::new();
        for g in pins.values() {
            *count.entry(*g).or_default() += 1;
        }
        count
    };
    narrate(&format!(
        "{} clients answered through their tunnels; clients per gateway {:?}",
        clients(),
        per_gateway(&got)
    ));
    wait_one_gateway_each(&mut location, &[1, 2, 3], &want)?;
    // Every gateway answered from the VIP: a client that heard another
    // address would have moved its endpoint there, past the director.
    let vip = SocketAddr::from((VIP, WG_PORT)).to_string();
    each_client(&location, &first, |c| {
        let endpoint = c.peer_endpoint()?;
        ensure!(
            endpoint.as_deref() == Some(vip.as_str()),
            "its gateway's endpoint is {endpoint:?}, not the VIP"
        );
        Ok(())
    })?;
    let director = location.gateway(3).director()?;
    for backend in &director.backends {
        ensure!(
            backend.packets > 0 && backend.new_pins > 0,
            "gateway {} got no frames or pins from the director: {backend:?}",
            backend.gateway_id
        );
    }
    narrate(&format!(
        "each client seen by its own gateway only; director counters (packets, new pins): {:?}",
        director
            .backends
            .iter()
            .map(|b| (b.gateway_id, b.packets, b.new_pins))
            .collect::<Vec<_>>()
    ));

    // 2. The director crashes; gateway 2 takes over and steers across 1
    // and 2. Every client whose gateway survived goes on as it was.
    let survivors: Vec<usize> = want
        .iter()
        .filter(|(_, g)| **g != 3)
        .map(|(j, _)| *j)
        .collect();
    let orphans: Vec<usize> = want
        .iter()
        .filter(|(_, g)| **g == 3)
        .map(|(j, _)| *j)
        .collect();
    let after = expected(&location, &first, &[1, 2])?;
    for &j in &survivors {
        ensure!(
            after[&j] == want[&j],
            "the table without gateway 3 moves client {j} from gateway {} to {}",
            want[&j],
            after[&j]
        );
    }
    let handshakes = each_client(&location, &survivors, DirectorClient::latest_handshake)?;
    // Read before the crash: the gateways the orphans fall to kick a
    // handshake to each of them as soon as gateway 3 leaves.
    let before = each_client(&location, &orphans, DirectorClient::latest_handshake)?;
    location.gateway(3).crash()?;
    narrate("gateway 3 (the director) crashed: SIGKILL, link down");
    location.wait_steering(2, &[1, 2], &[], TAKEOVER)?;
    each_client(&location, &survivors, |c| {
        c.ping_until_answered(RESUME)?;
        c.ping(3)
    })?;
    let now = each_client(&location, &survivors, DirectorClient::latest_handshake)?;
    ensure!(
        now == handshakes,
        "clients whose gateway survived made new handshakes: before {handshakes:?}, after {now:?}"
    );
    let got = pins(&mut location, 2)?;
    for &j in &survivors {
        ensure!(
            got.get(&j) == Some(&want[&j]),
            "client {j} is pinned to {:?} on gateway 2, not to its gateway {}",
            got.get(&j),
            want[&j]
        );
    }
    narrate(&format!(
        "gateway 2 steers; the {} clients of gateways 1 and 2 were answered again with no new handshake",
        survivors.len()
    ));
    each_client(&location, &orphans, |c| c.ping_until_answered(REHANDSHAKE))?;
    let after_orphans = each_client(&location, &orphans, DirectorClient::latest_handshake)?;
    for ((j, old), new) in orphans.iter().zip(&before).zip(&after_orphans) {
        ensure!(
            new > old,
            "client {j} of gateway 3 is answered with no new handshake"
        );
    }
    let got = pins(&mut location, 2)?;
    for &j in &orphans {
        ensure!(
            got.get(&j) == Some(&after[&j]),
            "client {j} of gateway 3 is pinned to {:?}, the table says {}",
            got.get(&j),
            after[&j]
        );
    }
    narrate(&format!(
        "the {} clients of gateway 3 came back after a new handshake, pinned to gateways 1 and 2",
        orphans.len()
    ));

    // 3. Gateway 1 drains: new clients go to gateway 2 only; gateway 1's
    // clients stay with it, with no new handshake.
    let drained = location.gateway(1).tidectl_ok(&["drain"])?;
    ensure!(
        drained.contains("draining"),
        "tidectl drain printed {drained:?}"
    );
    location.wait_steering(2, &[1, 2], &[1], TAKEOVER)?;
    let seen_by_2 = location.gateway(2).status()?;
    ensure!(
        location.gateway(1).status()?.draining
            && seen_by_2
                .peers
                .iter()
                .any(|p| p.gateway_id == 1 && p.draining),
        "gateway 1 does not show, or advertise, that it drains"
    );
    let pinned_to_1: Vec<usize> = pins(&mut location, 2)?
        .into_iter()
        .filter(|(_, g)| *g == 1)
        .map(|(j, _)| j)
        .collect();
    ensure!(!pinned_to_1.is_empty(), "no client is pinned to gateway 1");
    let handshakes = each_client(&location, &pinned_to_1, DirectorClient::latest_handshake)?;
    let late: Vec<usize> = (clients()..clients() + LATE).collect();
    each_client(&location, &late, |c| c.ping(3))?;
    each_client(&location, &pinned_to_1, |c| c.ping(3))?;
    let now = each_client(&location, &pinned_to_1, DirectorClient::latest_handshake)?;
    ensure!(
        now == handshakes,
        "gateway 1's clients made new handshakes while it drained"
    );
    let got = pins(&mut location, 2)?;
    let late_pins: BTreeMap<usize, u32> = late
        .iter()
        .map(|&j| (j, got.get(&j).copied().unwrap_or(0)))
        .collect();
    ensure!(
        late_pins.values().all(|&g| g == 2),
        "new clients while gateway 1 drains: {late_pins:?}"
    );
    for &j in &pinned_to_1 {
        ensure!(
            got.get(&j) == Some(&1),
            "client {j} left draining gateway 1"
        );
    }
    let late_want: BTreeMap<usize, u32> = late.iter().map(|&j| (j, 2)).collect();
    wait_one_gateway_each(&mut location, &[1, 2], &late_want)?;
    narrate(&format!(
        "gateway 1 drains: {LATE} new clients all went to gateway 2; its {} clients stayed, no new handshake",
        pinned_to_1.len()
    ));
    let text = location.gateway(2).tidectl_ok(&["director"])?;
    ensure!(
        text.lines()
            .any(|l| l.starts_with("1 ") && l.contains("draining")),
        "tidectl director does not show gateway 1 draining:\n{text}"
    );
    let sessions = location.gateway(2).tidectl_ok(&["sessions"])?;
    let endpoint = location.clients()[late[0]].endpoint().to_string();
    ensure!(
        sessions.contains(&endpoint),
        "tidectl sessions does not list {endpoint}:\n{sessions}"
    );
    let undrained = location.gateway(1).tidectl_ok(&["undrain"])?;
    ensure!(
        undrained.contains("not draining"),
        "tidectl undrain printed {undrained:?}"
    );
    location.wait_steering(2, &[1, 2], &[], TAKEOVER)?;
    narrate("gateway 1 takes new clients again");
    Ok(())
}
