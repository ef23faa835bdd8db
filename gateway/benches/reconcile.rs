//! `cargo xtask bench reconcile`: the reconcile path against a real
//! WireGuard device. Applies 10,000 peers to an empty device, then a change
//! of 1% of them (adds, changes, removals), then nothing at all, and prints
//! for each the time, the requests and the peer operations.
//!
//! `--backend userspace` (the default) drives a wireguard-go it starts;
//! `--backend kernel` a kernel WireGuard interface it creates, and also
//! counts the generic netlink messages each step sends and receives, as the
//! kernel's netlink tap (an `nlmon` interface) sees them. `--counts-only`
//! leaves the times out (in an emulated VM they mean nothing). The bench
//! runs in a network namespace of its own, which takes every interface it
//! made with it, and ends the wireguard-go it started.

use std::{
    collections::{BTreeMap, HashMap},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use nix::sched::{CloneFlags, unshare};
use tidegate_gateway::wireguard::{
    Key, PeerSpec,
    backend::Backend,
    kernel::Kernel,
    reconcile::{self, Desired, PlanSummary},
    userspace::Userspace,
};

#[path = "support/nlmon.rs"]
mod nlmon;

/// Peers in the full apply.
const PEERS: u32 = 10_000;
/// Peers touched by the small change: a third added, a third changed, a
/// third removed.
const CHANGED: u32 = PEERS / 100;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // cargo bench adds --bench; only these two are ours.
    let kernel = args
        .windows(2)
        .any(|w| w[0] == "--backend" && w[1] == "kernel");
    let counts_only = args.iter().any(|a| a == "--counts-only");
    ensure!(
        nix::unistd::geteuid().is_root(),
        "the reconcile benchmark makes a WireGuard device in a network namespace: run it as root"
    );
    // A namespace of our own: nothing the bench creates is visible outside
    // it, and it goes away with the process.
    unshare(CloneFlags::CLONE_NEWNET).context("creating a network namespace")?;
    let interface = format!("tgbench{}", std::process::id() % 100_000);
    if kernel {
        ip(&["link", "add", "dev", &interface, "type", "wireguard"])
            .context("creating a kernel WireGuard interface (is the module there?)")?;
        let tap = nlmon::Tap::open("tgnlmon")?;
        println!("kernel WireGuard, {}", release());
        bench(
            &Backend::Kernel(Kernel::new(&interface)),
            Some(&tap),
            counts_only,
        )
    } else {
        let log = std::env::temp_dir().join(format!("{interface}-wireguard-go.log"));
        let device = Userspace::new(&interface);
        device.launch(&log)?;
        let pid = device.server_pid()?;
        let socket = device.socket().to_owned();
        println!("wireguard-go");
        let result = bench(&Backend::Userspace(device), None, counts_only);
        stop(pid)?;
        let _ = std::fs::remove_file(socket);
        result
    }
}

/// Runs `ip` in the bench's namespace.
fn ip(args: &[&str]) -> Result<()> {
    let status = std::process::Command::new("ip").args(args).status()?;
    ensure!(
        status.success(),
        "`ip {}` failed ({status})",
        args.join(" ")
    );
    Ok(())
}

/// `uname -r`.
fn release() -> String {
    nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Ends the wireguard-go we started, by its pid: SIGTERM, then SIGKILL if
/// it is still there after five seconds.
fn stop(pid: u32) -> Result<()> {
    use nix::sys::signal::{Signal, kill};

    let pid = nix::unistd::Pid::from_raw(i32::try_from(pid)?);
    let _ = kill(pid, Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(5);
    while kill(pid, None).is_ok() {
        if Instant::now() > deadline {
            let _ = kill(pid, Signal::SIGKILL);
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// One measured reconcile.
struct Step {
    name: String,
    read: Duration,
    plan: Duration,
    apply: Duration,
    summary: PlanSummary,
    requests: usize,
    peers_read: usize,
    /// Generic netlink messages (sent, received) while reading and
    /// applying, on the kernel backend.
    netlink: Option<nlmon::Counts>,
}

fn bench(device: &Backend, tap: Option<&nlmon::Tap>, counts_only: bool) -> Result<()> {
    let mut rng = XorShift(0x5eed_7e57_0b5e_55ed);
    let private_key = Key::new(rng.bytes()).clamped();
    let peers: Vec<PeerSpec> = (0..PEERS).map(|i| peer(&mut rng, i)).collect();
    let mut desired = Desired {
        private_key: Some(private_key),
        listen_port: Some(51820),
        peers: peers.iter().map(|p| (p.public_key, p.clone())).collect(),
    };

    let mut steps = vec![reconcile_once(
        device,
        tap,
        &desired,
        format!("apply {PEERS} peers to an empty device"),
    )?];

    // 1%: a third of the change adds peers, a third changes allowed IPs and
    // keepalive, a third removes peers.
    let third = CHANGED / 3;
    for i in 0..third {
        let added = peer(&mut rng, PEERS + i);
        desired.peers.insert(added.public_key, added);
    }
    let keys: Vec<Key> = peers.iter().map(|p| p.public_key).collect();
    for (n, key) in keys.iter().take(third as usize).enumerate() {
        let changed = desired.peers.get_mut(key).context("peer vanished")?;
        changed.allowed_ips = [format!("10.200.{}.{}/32", n / 256, n % 256).parse()?].into();
        changed.persistent_keepalive = Some(25);
    }
    for key in keys.iter().rev().take((CHANGED - 2 * third) as usize) {
        desired.peers.remove(key);
    }
    steps.push(reconcile_once(
        device,
        tap,
        &desired,
        format!("change 1% ({CHANGED} peers) of {PEERS}"),
    )?);
    steps.push(reconcile_once(
        device,
        tap,
        &desired,
        "reconcile with nothing to change".into(),
    )?);

    // The device must now be exactly what was asked.
    let actual = device.get()?;
    let leftover = reconcile::plan(&desired, &actual, &HashMap::new());
    ensure!(
        leftover.is_empty(),
        "the device differs from the config after reconciling: {:?}",
        leftover.summary()
    );
    if !counts_only {
        report(&steps);
    }
    if counts_only || steps.iter().any(|s| s.netlink.is_some()) {
        report_counts(&steps);
    }
    check_proportional(&steps)
}

fn reconcile_once(
    device: &Backend,
    tap: Option<&nlmon::Tap>,
    desired: &Desired,
    name: String,
) -> Result<Step> {
    let before = tap.map(nlmon::Tap::drain).transpose()?;
    let started = Instant::now();
    let actual = device.get()?;
    let read = started.elapsed();
    let planned = Instant::now();
    let plan = reconcile::plan(desired, &actual, &HashMap::new());
    let plan_time = planned.elapsed();
    let applied = Instant::now();
    let cost = device.apply(&plan)?;
    let apply = applied.elapsed();
    let netlink = match (tap, before) {
        (Some(tap), Some(_)) => Some(tap.drain()?),
        _ => None,
    };
    Ok(Step {
        name,
        read,
        plan: plan_time,
        apply,
        summary: plan.summary(),
        requests: cost.requests,
        peers_read: actual.peers.len(),
        netlink,
    })
}

/// The counts alone, for an emulated machine where times mean nothing.
fn report_counts(steps: &[Step]) {
    println!(
        "{:<42} {:>10} {:>13} {:>12} {:>12} {:>22}",
        "step", "peers read", "set requests", "netlink out", "netlink in", "ops (add/chg/rm/dev)"
    );
    for step in steps {
        let (out, inn) = step.netlink.map_or(("-".into(), "-".into()), |n| {
            (n.sent.to_string(), n.received.to_string())
        });
        println!(
            "{:<42} {:>10} {:>13} {:>12} {:>12} {:>22}",
            step.name,
            step.peers_read,
            step.requests,
            out,
            inn,
            ops(&step.summary),
        );
    }
    println!(
        "\nnetlink out: generic netlink messages the daemon sent (a read is one dump request; \
         a set request is as many messages as the kernel's size limit needs); \
         netlink in: the kernel's answers (dump parts, acknowledgements)"
    );
}

/// A step's operations: the total, then (added/changed/removed/device).
fn ops(s: &PlanSummary) -> String {
    format!(
        "{} ({}/{}/{}/{})",
        s.total(),
        s.added,
        s.updated,
        s.removed,
        s.device
    )
}

fn report(steps: &[Step]) {
    println!(
        "{:<42} {:>9} {:>9} {:>9} {:>9} {:>10} {:>8} {:>22}",
        "step",
        "read ms",
        "plan ms",
        "apply ms",
        "total ms",
        "peers read",
        "requests",
        "ops (add/chg/rm/dev)"
    );
    for step in steps {
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        println!(
            "{:<42} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>10} {:>8} {:>22}",
            step.name,
            ms(step.read),
            ms(step.plan),
            ms(step.apply),
            ms(step.read + step.plan + step.apply),
            step.peers_read,
            step.requests,
            ops(&step.summary),
        );
    }
    if let [full, change, ..] = steps {
        println!(
            "\nthe 1% change wrote {:.2}% of the operations and took {:.2}x the time of the full apply",
            100.0 * change.summary.total() as f64 / full.summary.total() as f64,
            (change.read + change.plan + change.apply).as_secs_f64()
                / (full.read + full.plan + full.apply).as_secs_f64()
        );
    }
}

/// The target: operations proportional to the change, not to the peers.
fn check_proportional(steps: &[Step]) -> Result<()> {
    let [full, change, nothing] = steps else {
        bail!("expected three steps");
    };
    let expected = BTreeMap::from([
        ("full", PEERS as usize + 2),
        ("change", CHANGED as usize),
        ("nothing", 0),
    ]);
    for (name, step) in [("full", full), ("change", change), ("nothing", nothing)] {
        ensure!(
            step.summary.total() == expected[name],
            "{}: {} operations, expected {}",
            step.name,
            step.summary.total(),
            expected[name]
        );
    }
    ensure!(
        change.requests <= 1 && nothing.requests == 0,
        "the change took {} requests and the no-op {}",
        change.requests,
        nothing.requests
    );
    if let Some(netlink) = nothing.netlink {
        // The no-op reads the device and writes nothing: one dump request.
        ensure!(
            netlink.sent == 1,
            "the no-op sent {} netlink messages, expected the one read",
            netlink.sent
        );
    }
    println!("target met: operations are proportional to the change");
    Ok(())
}

/// Peer `i`: a random key and tunnel address 10.x.y.z/32 from `i`.
fn peer(rng: &mut XorShift, i: u32) -> PeerSpec {
    let [_, a, b, c] = (i + 2).to_be_bytes();
    PeerSpec {
        name: None,
        public_key: Key::new(rng.bytes()),
        allowed_ips: [format!("10.{a}.{b}.{c}/32")
            .parse()
            .expect("a valid network")]
        .into(),
        preshared_key: None,
        persistent_keepalive: None,
        endpoint: None,
    }
}

/// A small deterministic generator for key bytes.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn bytes(&mut self) -> [u8; 32] {
        let mut out = [0; 32];
        for chunk in out.chunks_mut(8) {
            chunk.copy_from_slice(&self.next().to_le_bytes());
        }
        out
    }
}
