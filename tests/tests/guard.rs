//! The egress guard on a real interface, through each hook the kernel has
//! (a tcx link from Linux 6.6, a TC clsact filter on every kernel): it
//! outlives the daemon that attached it, and the next daemon takes it over
//! without a moment where nothing guards.
//!
//! A sender on the gateway blasts UDP from the WireGuard listen port to a
//! client while daemons come and go (each a loaded program that attaches,
//! then is dropped as a dead daemon's is); a gateway that owns no client
//! lets none of it out. Removing the guard at the end lets it through, so
//! the sender is seen to work.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use tidegate_gateway::xdp::{
    Datapath, EgressHook, Kernel,
    continuity::{self, CLSACT_HANDLE},
};
use tidegate_tests::netns::{Netns, veth};
use tidegate_tests::{Run, require_root};

const GATEWAY: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
const CLIENT: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
const LISTEN_PORT: u16 = 51820;
const CLIENT_PORT: u16 = 40000;
/// Daemons that take the guard over in turn: 8 on the host; 3 where the
/// CPUs are emulated and loading the programs takes seconds each time.
fn takeovers() -> usize {
    tidegate_tests::pace::load(8, 3)
}
/// How long the guard is left without a daemon before the next one comes.
const ORPHANED: Duration = Duration::from_millis(150);
/// Bounds on the sender: it stops at whichever comes first (the time
/// stretched to the machine's speed).
const MAX_SECONDS: Duration = Duration::from_secs(60);
const MAX_DATAGRAMS: u64 = 20_000_000;

fn narrate(line: &str) {
    println!("  {line}");
}

/// A gateway and a client on one veth pair.
struct Pair {
    gateway: Netns,
    client: Netns,
    interface: String,
    // Dropped last: the namespaces hold nothing of it, the BPF filesystem
    // holds the tcx pins.
    run: Run,
}

fn pair() -> Result<Pair> {
    let run = Run::new()?;
    let gateway = Netns::create(&run.netns_name("gw"))?;
    let client = Netns::create(&run.netns_name("client"))?;
    let interface = run.ifname("g");
    let client_if = run.ifname("c");
    veth(&gateway, &interface, &client, &client_if)?;
    gateway.add_addr(&interface, &format!("{GATEWAY}/24"))?;
    client.add_addr(&client_if, &format!("{CLIENT}/24"))?;
    gateway.set_up(&interface)?;
    client.set_up(&client_if)?;
    Ok(Pair {
        gateway,
        client,
        interface,
        run,
    })
}

/// A daemon's data path with the guard attached through `hook`, owning no
/// client (as a backup, or a daemon not yet elected).
fn daemon(pair: &Pair, hook: EgressHook, pin_dir: &Path) -> Result<Datapath> {
    pair.gateway.run(|| -> Result<Datapath> {
        let mut datapath = Datapath::load().context("loading the programs")?;
        datapath
            .attach_egress(&pair.interface, LISTEN_PORT, pin_dir, hook)
            .context("attaching the egress guard")?;
        Ok(datapath)
    })?
}

/// Datagrams the guard dropped, by this daemon's program.
fn denied(datapath: &Datapath) -> Result<u64> {
    let counters = datapath.continuity().counters()?;
    Ok(counters
        .get("egress-denied-backup")
        .context("no egress-denied-backup counter")?
        .packets)
}

/// Counts datagrams arriving at the client until `stop`.
fn receiver(socket: UdpSocket, stop: Arc<AtomicBool>, got: Arc<AtomicU64>) -> Result<()> {
    socket.set_read_timeout(Some(Duration::from_millis(50)))?;
    let mut buf = [0u8; 256];
    while !stop.load(Ordering::Relaxed) {
        if socket.recv(&mut buf).is_ok() {
            got.fetch_add(1, Ordering::Relaxed);
        }
    }
    Ok(())
}

/// Sends WireGuard-shaped datagrams from the listen port until `stop`, a
/// time limit or a count limit; returns how many it sent.
fn sender(socket: UdpSocket, stop: Arc<AtomicBool>) -> u64 {
    // A transport message's header: type 4, reserved, receiver index.
    let mut datagram = [0u8; 48];
    datagram[0] = 4;
    let target = SocketAddr::V4(SocketAddrV4::new(CLIENT, CLIENT_PORT));
    let started = Instant::now();
    let limit = tidegate_tests::pace::stretch(MAX_SECONDS);
    let mut sent = 0;
    while !stop.load(Ordering::Relaxed) && sent < MAX_DATAGRAMS && started.elapsed() < limit {
        if socket.send_to(&datagram, target).is_ok() {
            sent += 1;
        }
    }
    sent
}

fn hooks() -> Result<Vec<EgressHook>> {
    let kernel = Kernel::probe()?;
    narrate(&format!(
        "kernel {}, tcx links: {}",
        kernel.release, kernel.tcx
    ));
    // The probe, not the version, decides; on Debian's kernels (and this
    // machine's) the two agree: tcx links arrived in Linux 6.6.
    let version = aya::util::KernelVersion::current()?;
    ensure!(
        kernel.tcx == (version >= aya::util::KernelVersion::new(6, 6, 0)),
        "tcx links probed {} on {version:?}",
        kernel.tcx
    );
    Ok(if kernel.tcx {
        vec![EgressHook::Tcx, EgressHook::Clsact]
    } else {
        vec![EgressHook::Clsact]
    })
}

/// The guard's hooks on the interface, as the kernel lists them: tcx
/// programs on its egress, and clsact filters named after the program.
fn hooks_listed(pair: &Pair) -> Result<(usize, usize)> {
    let tcx = pair.gateway.run(|| {
        aya::programs::SchedClassifier::query_tcx(
            &pair.interface,
            aya::programs::TcAttachType::Egress,
        )
        .map(|(_, programs)| programs.len())
        .unwrap_or(0)
    })?;
    let filters = pair
        .gateway
        .exec_ok("tc", &["filter", "show", "dev", &pair.interface, "egress"])?;
    let clsact = filters
        .lines()
        .filter(|l| l.contains(&format!("handle {CLSACT_HANDLE:#x}")))
        .count();
    Ok((tcx, clsact))
}

fn takeovers_leave_no_gap(hook: EgressHook) -> Result<()> {
    let pair = pair()?;
    let pin_dir = pair.run.bpffs()?;
    let stop = Arc::new(AtomicBool::new(false));
    let got = Arc::new(AtomicU64::new(0));
    let receive = pair
        .client
        .run(|| UdpSocket::bind((CLIENT, CLIENT_PORT)))??;
    let send = pair
        .gateway
        .run(|| UdpSocket::bind((GATEWAY, LISTEN_PORT)))??;

    let mut current = Some(daemon(&pair, hook, &pin_dir)?);
    let (sent, received_guarded) = std::thread::scope(|scope| -> Result<(u64, u64)> {
        let receiving = {
            let (stop, got) = (stop.clone(), got.clone());
            scope.spawn(move || receiver(receive, stop, got))
        };
        let sending = {
            let stop = stop.clone();
            scope.spawn(move || sender(send, stop))
        };
        let guarded = (|| -> Result<u64> {
            std::thread::sleep(ORPHANED);
            for round in 0..takeovers() {
                // The daemon dies: its program and maps stay with the hook.
                let before = current.as_ref().map(denied).transpose()?.unwrap_or(0);
                current = None;
                std::thread::sleep(ORPHANED);
                let next = daemon(&pair, hook, &pin_dir)?;
                std::thread::sleep(ORPHANED);
                let by_next = denied(&next)?;
                current = Some(next);
                ensure!(
                    by_next > 0,
                    "round {round}: the new daemon's program dropped nothing: it is not in the hook"
                );
                narrate(&format!(
                    "{hook}: daemon {round} took over (the one before had dropped {before}, the new one {by_next})"
                ));
            }
            let listed = hooks_listed(&pair)?;
            let expected = match hook {
                EgressHook::Tcx => (1, 0),
                EgressHook::Clsact => (0, 1),
            };
            ensure!(
                listed == expected,
                "{hook}: (tcx programs, clsact filters) on the interface: {listed:?}, expected {expected:?}"
            );
            Ok(got.load(Ordering::Relaxed))
        })();
        // With the guard gone (its pin or filter removed, the last daemon's
        // hold dropped), the same datagrams reach the client.
        let removed = pair
            .gateway
            .run(|| continuity::remove_stale(&pair.interface, &pin_dir));
        current = None;
        let deadline = Instant::now() + Duration::from_secs(10);
        while got.load(Ordering::Relaxed) < 1000 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        stop.store(true, Ordering::Relaxed);
        let sent = sending.join().expect("the sender panicked");
        receiving.join().expect("the receiver panicked")?;
        removed??;
        Ok((sent, guarded?))
    })?;
    let unguarded = got.load(Ordering::Relaxed) - received_guarded;
    narrate(&format!(
        "{hook}: {sent} datagrams sent; {received_guarded} reached the client while guarded, \
         {unguarded} after the guard was removed"
    ));
    ensure!(
        received_guarded == 0,
        "{hook}: {received_guarded} datagrams got past the guard"
    );
    ensure!(
        unguarded > 0,
        "{hook}: nothing reached the client once the guard was gone: the sender proved nothing"
    );
    Ok(())
}

#[test]
fn the_egress_guard_outlives_its_daemon_and_each_takeover_leaves_no_gap() -> Result<()> {
    require_root();
    for hook in hooks()? {
        takeovers_leave_no_gap(hook)?;
    }
    Ok(())
}
