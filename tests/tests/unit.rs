//! The gateway as its systemd unit runs it: with only the capabilities the
//! unit's `CapabilityBoundingSet=` grants, it loads and attaches its XDP
//! program and starts the election, then says READY=1 on `NOTIFY_SOCKET`
//! (`Type=notify`) with a status line naming its role, and STOPPING=1 on
//! SIGTERM.

use std::{os::unix::net::UnixDatagram, time::Duration};

use anyhow::{Context as _, Result, ensure};
use tidegate_tests::{Netns, Process, Run, binary, gateway::GATEWAY_BIN, require_root, veth};

/// The unit the package installs.
const UNIT: &str = include_str!("../../dist/systemd/tidegate-gateway.service");

/// The unit's bounding set as `setpriv --bounding-set` takes it.
fn unit_bounding_set() -> Result<String> {
    let line = UNIT
        .lines()
        .find_map(|line| line.strip_prefix("CapabilityBoundingSet="))
        .context("the gateway's unit has no CapabilityBoundingSet=")?;
    let mut set = String::from("-all");
    for cap in line.split_whitespace() {
        let name = cap
            .strip_prefix("CAP_")
            .with_context(|| format!("{cap}: not a capability"))?;
        set.push_str(",+");
        set.push_str(&name.to_ascii_lowercase());
    }
    Ok(set)
}

/// The next notification, or an error naming what was awaited.
fn next(socket: &UnixDatagram, awaited: &str, gateway: &Process) -> Result<String> {
    let mut buf = [0u8; 4096];
    let len = socket.recv(&mut buf).with_context(|| {
        format!(
            "no notification while awaiting {awaited}; the gateway's log ends with:\n{}",
            gateway.log_tail(60)
        )
    })?;
    Ok(String::from_utf8_lossy(&buf[..len]).into_owned())
}

#[test]
fn gateway_is_ready_with_the_units_capabilities() -> Result<()> {
    require_root();
    let caps = unit_bounding_set()?;
    let run = Run::new()?;
    let ns = Netns::create(&run.netns_name("unit"))?;
    let peer = Netns::create(&run.netns_name("peer"))?;
    let public = run.ifname("pub");
    let segment = run.ifname("seg");
    veth(&ns, &public, &peer, &segment)?;
    // Both ends up: a veth whose peer is down has no carrier, and the
    // gateway's health check takes a public link without one for FAULT.
    peer.set_up(&segment)?;
    ns.set_up(&public)?;
    ns.add_addr(&public, "198.51.100.2/24")?;

    let dir = run.dir();
    let key = dir.join("ha.key");
    std::fs::write(&key, "a location's key of twenty bytes")?;
    let config = dir.join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            "interface = {public:?}\nxdp_mode = \"generic\"\n\
             control_socket = {:?}\nbpf_pin_dir = {:?}\nstate_dir = {:?}\n\
             [[service]]\naddress = \"198.51.100.100\"\nport = 51820\n\
             [ha]\nlocation_id = 1\ngateway_id = 1\npriority = 100\n\
             key_file = {key:?}\nvips = [\"198.51.100.100\"]\npeers = [\"198.51.100.3\"]\n",
            dir.join("gateway.sock"),
            run.bpffs()?,
            dir.join("state"),
        ),
    )?;
    let notify_path = dir.join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path)?;
    notify.set_read_timeout(Some(Duration::from_secs(30)))?;

    let mut command = ns.command("setpriv");
    command
        .args(["--bounding-set", &caps, "--inh-caps", "-all"])
        .arg(binary(GATEWAY_BIN)?)
        .arg("--config")
        .arg(&config)
        .env("NOTIFY_SOCKET", &notify_path)
        .env("RUST_LOG", "info");
    let mut gateway = Process::spawn(GATEWAY_BIN, &ns, command, &dir.join("gateway.log"))?;

    let ready = next(&notify, "READY=1", &gateway)?;
    ensure!(
        ready.lines().any(|l| l == "READY=1"),
        "the first notification is not READY=1: {ready}"
    );
    // The election has taken its first step: the role is no longer INIT.
    let status = ready
        .lines()
        .find_map(|l| l.strip_prefix("STATUS="))
        .with_context(|| format!("READY=1 came without a status line: {ready}"))?;
    ensure!(
        status.starts_with(&format!("shield on {public}"))
            && (status.ends_with("HA BACKUP") || status.ends_with("HA MASTER")),
        "status line: {status}"
    );
    gateway.ensure_running()?;

    let stopped = gateway.stop()?;
    let mut stopping = false;
    // Role changes may come first (a lone gateway becomes master).
    for _ in 0..10 {
        let message = next(&notify, "STOPPING=1", &gateway)?;
        if message.lines().any(|l| l == "STOPPING=1") {
            stopping = true;
            break;
        }
    }
    ensure!(stopping, "no STOPPING=1 among the gateway's notifications");
    ensure!(
        stopped.success(),
        "the gateway exited {stopped}; its log ends with:\n{}",
        gateway.log_tail(20)
    );
    Ok(())
}
