//! End-to-end: the gateway daemon's XDP shield on a real segment with a real
//! WireGuard tunnel. WireGuard passes, malformed datagrams to the service
//! are dropped and counted by reason, everything else passes untouched.

use std::collections::BTreeMap;

use anyhow::{Context, Result, ensure};
use tidegate_tests::gateway::WIREGUARD_COUNTERS;
use tidegate_tests::packets::malformed_kinds;
use tidegate_tests::shield::WG_PORT;
use tidegate_tests::{Counters, Shield, ShieldOptions, XdpAttachMode, XdpMode, require_root};

/// Malformed datagrams sent per kind.
const PER_KIND: u32 = 100;
/// Echo requests per ping.
const PINGS: u32 = 5;
/// A UDP port on the gateway that is not the service.
const OTHER_PORT: u16 = 9;
/// Datagrams sent to [`OTHER_PORT`].
const OTHER_DATAGRAMS: u32 = 20;
/// How long counters must stay put after reaching their target, to catch
/// packets counted twice or late.
const SETTLE: std::time::Duration = std::time::Duration::from_millis(300);

/// Prints a step to the test's captured output.
fn narrate(line: &str) {
    println!("  {line}");
}

/// Checks the "wireguard" total against the sum of the wg-* counters.
fn ensure_wireguard_total_consistent(c: &Counters) -> Result<()> {
    let sum: u64 = WIREGUARD_COUNTERS
        .iter()
        .map(|name| c.counter(name).map(|v| v.packets))
        .sum::<Result<u64>>()?;
    ensure!(
        c.total("wireguard")?.packets == sum,
        "total \"wireguard\" {} != sum of {WIREGUARD_COUNTERS:?} {sum}",
        c.total("wireguard")?.packets
    );
    Ok(())
}

/// Pings through the tunnel and checks that the gateway counted the
/// WireGuard packets as passed and dropped nothing.
fn ping_through_tunnel(shield: &mut Shield, expect_handshake: bool) -> Result<Counters> {
    let before = shield.counters()?;
    let report = shield.ping_tunnel(PINGS)?;
    narrate(&format!(
        "ping through the tunnel: {}",
        report.summary.lines().next().unwrap_or_default()
    ));
    let after = shield.counters()?;
    let initiations = after.counter_growth(&before, "wg-initiation")?;
    let transport = after.counter_growth(&before, "wg-transport")?;
    if expect_handshake {
        assert!(
            initiations >= 1,
            "no handshake initiation counted: {after:#?}"
        );
    }
    // Every echo request is one transport message from the client.
    assert!(
        transport >= u64::from(PINGS),
        "{transport} transport messages counted for {PINGS} echo requests"
    );
    let wireguard = after.total_growth(&before, "wireguard")?;
    let per_type: u64 = WIREGUARD_COUNTERS
        .iter()
        .map(|name| after.counter_growth(&before, name))
        .sum::<Result<u64>>()?;
    assert_eq!(wireguard, per_type, "wireguard total vs wg-* counters");
    assert!(wireguard >= u64::from(PINGS) + u64::from(expect_handshake));
    assert_eq!(
        after.total_growth(&before, "drop")?,
        0,
        "drops during a clean ping"
    );
    ensure_wireguard_total_consistent(&after)?;
    Ok(after)
}

#[test]
fn shield_passes_wireguard_and_drops_malformed_datagrams() -> Result<()> {
    require_root();
    let mut shield = Shield::build(&ShieldOptions::default(), &mut narrate)?;
    println!("WireGuard path: {}", shield.wg_backend());

    let start = shield.counters()?;
    assert_eq!(start.interface, shield.underlay().gateway_if());
    let xdp = shield
        .gateway_xdp()?
        .context("no XDP program on the gateway's interface")?;
    println!(
        "XDP mode: {} (kernel: {}, prog id {:?})",
        start.xdp_mode, xdp.mode, xdp.prog_id
    );
    assert_eq!(
        start.xdp_mode,
        xdp.mode.as_str(),
        "gateway and kernel disagree on the XDP mode"
    );
    ensure_wireguard_total_consistent(&start)?;

    // WireGuard through the shield.
    let after_ping = ping_through_tunnel(&mut shield, true)?;

    // Traffic that is not for the service passes and is counted as such.
    shield.send_udp(OTHER_PORT, b"not for the shield", OTHER_DATAGRAMS)?;
    let underlay = shield.ping_underlay(3)?;
    narrate(&format!(
        "ping on the segment: {}",
        underlay.summary.lines().next().unwrap_or_default()
    ));
    let targets = BTreeMap::from([("not-service", u64::from(OTHER_DATAGRAMS))]);
    let after_other = shield.wait_for_growth(&after_ping, &targets)?;
    let passed = after_other.total_growth(&after_ping, "pass")?;
    assert!(
        passed >= u64::from(OTHER_DATAGRAMS + underlay.transmitted),
        "{passed} packets passed for {OTHER_DATAGRAMS} datagrams and {} echo requests",
        underlay.transmitted
    );
    assert_eq!(
        after_other.total_growth(&after_ping, "drop")?,
        0,
        "non-service traffic dropped"
    );

    // Malformed datagrams to the service are dropped, each under its reason.
    let before = after_other;
    let sent = shield.send_malformed(PER_KIND, &mut narrate)?;
    let total_sent: u64 = sent.values().sum();
    assert_eq!(
        total_sent,
        u64::from(PER_KIND) * malformed_kinds().len() as u64
    );
    shield.wait_for_growth(&before, &sent)?;
    std::thread::sleep(SETTLE);
    let after = shield.counters()?;
    for (counter, n) in &sent {
        assert_eq!(
            after.counter_growth(&before, counter)?,
            *n,
            "counter {counter:?}: sent {n}"
        );
    }
    for kind in malformed_kinds() {
        let min_bytes = kind.payload.len() as u64 * u64::from(PER_KIND);
        let bytes = after.counter_bytes_growth(&before, kind.counter)?;
        assert!(
            bytes >= min_bytes,
            "{}: {bytes} bytes counted, payloads alone are {min_bytes}",
            kind.counter
        );
    }
    assert_eq!(
        after.total_growth(&before, "drop")?,
        total_sent,
        "drop total"
    );
    assert_eq!(after.total_growth(&before, "aborted")?, 0, "aborted total");
    assert_eq!(
        after.counter_growth(&before, "wg-initiation")?,
        0,
        "malformed datagrams counted as WireGuard"
    );
    println!(
        "dropped: bad-type +{}, bad-length +{}, bad-reserved +{}, drop +{}",
        after.counter_growth(&before, "bad-type")?,
        after.counter_growth(&before, "bad-length")?,
        after.counter_growth(&before, "bad-reserved")?,
        after.total_growth(&before, "drop")?
    );

    // The tunnel still works after the burst (no new handshake needed).
    ping_through_tunnel(&mut shield, false)?;

    // SIGTERM: the daemon exits 0 and detaches its program.
    let status = shield.stop_gateway()?;
    assert!(
        status.success(),
        "tidegate-gateway exited with {status} on SIGTERM"
    );
    let left = shield.gateway_xdp()?;
    assert!(
        left.is_none(),
        "XDP program still attached after exit: {left:?}"
    );
    let listed = shield.daemon().tidectl(&["counters", "--json"])?;
    assert!(
        !listed.status.success(),
        "tidectl succeeded against a stopped daemon"
    );
    assert!(
        !listed.stderr.trim().is_empty(),
        "tidectl failed without a message"
    );
    Ok(())
}

#[test]
fn shield_in_generic_mode_drops_each_reason() -> Result<()> {
    require_root();
    let options = ShieldOptions {
        xdp_mode: XdpMode::Generic,
    };
    let mut shield = Shield::build(&options, &mut narrate)?;
    println!("WireGuard path: {}", shield.wg_backend());
    let xdp = shield
        .gateway_xdp()?
        .context("no XDP program on the gateway's interface")?;
    assert_eq!(xdp.mode, XdpAttachMode::Generic);
    let before = shield.counters()?;
    assert_eq!(before.xdp_mode, "generic");

    ping_through_tunnel(&mut shield, true)?;
    let before_burst = shield.counters()?;
    let kinds = malformed_kinds();
    let mut sent: BTreeMap<&str, u64> = BTreeMap::new();
    for kind in &kinds {
        let n = shield.send_udp(WG_PORT, &kind.payload, 10)?;
        *sent.entry(kind.counter).or_default() += u64::from(n);
    }
    shield.wait_for_growth(&before_burst, &sent)?;
    std::thread::sleep(SETTLE);
    let after = shield.counters()?;
    for (counter, n) in &sent {
        assert_eq!(
            after.counter_growth(&before_burst, counter)?,
            *n,
            "{counter}"
        );
    }
    assert_eq!(
        after.total_growth(&before_burst, "drop")?,
        sent.values().sum::<u64>()
    );

    let status = shield.stop_gateway()?;
    assert!(
        status.success(),
        "tidegate-gateway exited with {status} on SIGTERM"
    );
    Ok(())
}

#[test]
fn the_shield_outlives_a_killed_daemon_and_a_restart_takes_it_over() -> Result<()> {
    require_root();
    let mut shield = Shield::build(&ShieldOptions::default(), &mut narrate)?;
    let before = shield
        .gateway_xdp()?
        .context("no XDP program on the gateway's interface")?;
    ping_through_tunnel(&mut shield, true)?;

    // SIGKILL: no clean-up, but the pinned link keeps the program attached.
    shield.daemon_mut().kill()?;
    let orphaned = shield
        .gateway_xdp()?
        .context("the XDP program went with the killed daemon")?;
    assert_eq!(
        orphaned.prog_id, before.prog_id,
        "another program after the kill"
    );
    let report = shield.ping_tunnel(PINGS)?;
    assert_eq!(
        report.received, report.transmitted,
        "tunnel with the daemon dead: {}",
        report.summary
    );
    narrate(&format!(
        "daemon killed: program {:?} still attached, tunnel up",
        orphaned.prog_id
    ));

    // A new daemon replaces the program in the same link.
    let gateway = shield.underlay().gateway().clone();
    let offset = shield.daemon_mut().restart(&gateway)?;
    let log = shield.daemon().log_since(offset);
    assert!(
        log.contains("XDP shield replaced in the pinned link"),
        "the restarted daemon did not take over the pinned link:\n{log}"
    );
    let replaced = shield
        .gateway_xdp()?
        .context("no XDP program after the restart")?;
    assert_ne!(
        replaced.prog_id, before.prog_id,
        "the restarted daemon's program is not the one attached"
    );
    assert_eq!(replaced.mode, before.mode, "the link changed mode");
    ping_through_tunnel(&mut shield, false)?;

    // SIGTERM detaches, pin and all.
    let status = shield.stop_gateway()?;
    assert!(status.success(), "exit on SIGTERM: {status}");
    let left = shield.gateway_xdp()?;
    assert!(left.is_none(), "XDP still attached after SIGTERM: {left:?}");
    // (A BPF filesystem also lists the kernel's own progs.debug and maps.debug.)
    let pins: Vec<_> = std::fs::read_dir(shield.underlay().run().bpffs()?)?
        .map(|entry| entry.map(|e| e.file_name()))
        .collect::<std::io::Result<Vec<_>>>()?
        .into_iter()
        .filter(|name| name.to_string_lossy().starts_with("xdp-link-"))
        .collect();
    assert!(pins.is_empty(), "pins left after SIGTERM: {pins:?}");
    Ok(())
}
