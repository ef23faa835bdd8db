//! Self-tests of the namespace harness: the segment, code run inside a
//! namespace, process guards, a WireGuard tunnel without the gateway, and
//! teardown that leaves nothing behind.

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use tidegate_tests::shield::{
    CLIENT_UNDERLAY, CLIENT_UNDERLAY_V6, GATEWAY_TUNNEL, GATEWAY_UNDERLAY, GATEWAY_UNDERLAY_V6,
    Tunnel, Underlay, WG_PORT,
};
use tidegate_tests::{Netns, Probe, Process, Run, WgBackend, poll_until, require_root};

/// Prints a harness step to the test's captured output.
fn narrate(line: &str) {
    eprintln!("  {line}");
}

/// Whether a process with `pid` still exists.
fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Fails unless none of `names` is listed by `ip netns list`.
fn ensure_namespaces_gone(names: &[String]) -> Result<()> {
    let left = Netns::list()?;
    for name in names {
        ensure!(!left.contains(name), "namespace {name} survived teardown");
    }
    Ok(())
}

#[test]
fn segment_carries_ipv4_and_ipv6_and_teardown_removes_it() -> Result<()> {
    require_root();
    let underlay = Underlay::build(&mut narrate)?;
    let names: Vec<String> = [underlay.client(), underlay.switch(), underlay.gateway()]
        .iter()
        .map(|ns| ns.name().to_owned())
        .collect();
    let listed = Netns::list()?;
    for name in &names {
        ensure!(
            listed.contains(name),
            "{name} missing from `ip netns list`: {listed:?}"
        );
    }
    let run_dir = underlay.run().dir().to_path_buf();

    let v4 = underlay.client().ping(IpAddr::V4(GATEWAY_UNDERLAY), 3)?;
    assert_eq!((v4.transmitted, v4.received), (3, 3), "{}", v4.summary);
    let v6 = underlay.client().ping(IpAddr::V6(GATEWAY_UNDERLAY_V6), 3)?;
    assert_eq!((v6.transmitted, v6.received), (3, 3), "{}", v6.summary);
    let back = underlay.gateway().ping(IpAddr::V6(CLIENT_UNDERLAY_V6), 1)?;
    assert_eq!(back.received, 1);

    // The switch only forwards: it has no address on the segment.
    let switch_addrs =
        underlay
            .switch()
            .ip(&["-o", "addr", "show", "dev", underlay.bridge_if()])?;
    assert!(
        !switch_addrs.contains("198.51.100."),
        "the bridge has an address: {switch_addrs}"
    );
    // Nothing routes out: no default route in the client or the gateway.
    for ns in [underlay.client(), underlay.gateway()] {
        for family in ["-4", "-6"] {
            let routes = ns.ip(&[family, "route", "show", "default"])?;
            assert!(
                routes.trim().is_empty(),
                "{}: default route {routes}",
                ns.name()
            );
        }
    }

    drop(underlay);
    ensure_namespaces_gone(&names)?;
    assert!(!run_dir.exists(), "{} survived teardown", run_dir.display());
    Ok(())
}

#[test]
fn run_executes_inside_the_namespace() -> Result<()> {
    require_root();
    let underlay = Underlay::build(&mut narrate)?;

    // A socket bound inside the gateway namespace stays there after the
    // closure returns.
    let receiver = underlay
        .gateway()
        .run(|| UdpSocket::bind((GATEWAY_UNDERLAY, 0)))?
        .context("binding in the gateway namespace")?;
    receiver.set_read_timeout(Some(Duration::from_secs(5)))?;
    let target = receiver.local_addr()?;

    // The gateway's address does not exist in the client namespace...
    let err = underlay
        .client()
        .run(|| UdpSocket::bind((GATEWAY_UNDERLAY, 0)))?
        .expect_err("the gateway's address must not be bindable in the client namespace");
    assert_eq!(err.kind(), std::io::ErrorKind::AddrNotAvailable, "{err}");

    // ...but the client's is, and a datagram from it crosses the bridge.
    let sender = underlay.client().run(move || -> Result<SocketAddr> {
        let socket = UdpSocket::bind((CLIENT_UNDERLAY, 0))?;
        socket.send_to(b"across the bridge", target)?;
        Ok(socket.local_addr()?)
    })??;
    let mut buf = [0_u8; 64];
    let (n, from) = receiver.recv_from(&mut buf)?;
    assert_eq!(&buf[..n], b"across the bridge");
    assert_eq!(from, sender);
    Ok(())
}

#[test]
fn process_guard_stops_its_own_pid() -> Result<()> {
    require_root();
    let run = Run::new()?;
    let ns = Netns::create(&run.netns_name("proc"))?;
    let ns_name = ns.name().to_owned();

    // `ip netns exec` execs: the pid is the program's own.
    let mut sleeper = ns.command("sleep");
    sleeper.arg("30");
    let mut sleeper = Process::spawn("sleep", &ns, sleeper, &run.dir().join("sleep.log"))?;
    let pid = sleeper.pid();
    let comm = poll_until(
        "ip netns exec to exec sleep",
        Duration::from_secs(5),
        Duration::from_millis(10),
        || {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm"))?;
            Ok(if comm.trim() == "sleep" {
                Probe::Ready(comm)
            } else {
                Probe::NotYet(format!("comm is {}", comm.trim()))
            })
        },
    )?;
    assert_eq!(comm.trim(), "sleep");
    sleeper.ensure_running()?;
    let start = Instant::now();
    let status = sleeper.stop()?;
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "SIGTERM was not enough"
    );
    assert!(
        !status.success(),
        "sleep killed by SIGTERM reports {status}"
    );
    drop(sleeper);
    assert!(!pid_alive(pid), "sleep (pid {pid}) survived its guard");

    // A process that ignores SIGTERM (the disposition survives exec) gets
    // SIGKILL after the grace period.
    let mut stubborn = ns.command("sh");
    stubborn.args(["-c", "trap '' TERM; echo ignoring TERM; exec sleep 30"]);
    let mut stubborn = Process::spawn(
        "stubborn sleep",
        &ns,
        stubborn,
        &run.dir().join("stubborn.log"),
    )?;
    stubborn.set_grace(Duration::from_millis(300));
    let pid = stubborn.pid();
    poll_until(
        "the stubborn process to start ignoring TERM",
        Duration::from_secs(5),
        Duration::from_millis(10),
        || {
            Ok(if stubborn.log().contains("ignoring TERM") {
                Probe::Ready(())
            } else {
                Probe::NotYet("nothing logged yet".into())
            })
        },
    )?;
    // The shell has printed; give it a moment to exec sleep.
    std::thread::sleep(Duration::from_millis(100));
    let err = stubborn.stop().expect_err("SIGTERM is ignored").to_string();
    assert!(err.contains("SIGKILL"), "{err}");
    assert!(
        err.contains("ignoring TERM"),
        "the error quotes the log: {err}"
    );
    assert!(!pid_alive(pid), "stubborn (pid {pid}) survived SIGKILL");
    drop(stubborn);

    // A process that dies on its own is reported with its log.
    let mut short = ns.command("sh");
    short.args(["-c", "echo about to fail; exit 7"]);
    let mut short = Process::spawn("short-lived", &ns, short, &run.dir().join("short.log"))?;
    let err = poll_until(
        "the short-lived process to exit",
        Duration::from_secs(5),
        Duration::from_millis(10),
        || {
            Ok(match short.ensure_running() {
                Ok(()) => Probe::NotYet("running".into()),
                Err(err) => Probe::Ready(format!("{err:#}")),
            })
        },
    )?;
    assert!(err.contains("about to fail"), "{err}");
    assert!(err.contains("exit status: 7"), "{err}");
    drop(short);

    // Every guard holding the namespace is gone: dropping the last handle
    // deletes it.
    drop(ns);
    ensure_namespaces_gone(&[ns_name])
}

#[test]
fn wireguard_tunnel_without_the_gateway() -> Result<()> {
    require_root();
    let underlay = Underlay::build(&mut narrate)?;
    let tunnel = Tunnel::build(&underlay, &mut narrate)?;
    eprintln!("WireGuard path: {}", tunnel.backend());
    assert_eq!(tunnel.client().backend(), tunnel.gateway().backend());

    let report = underlay.client().ping(IpAddr::V4(GATEWAY_TUNNEL), 3)?;
    assert_eq!(report.received, 3, "{}", report.summary);

    let client_peers = tunnel.client().peers()?;
    let [to_gateway] = client_peers.as_slice() else {
        panic!("client has {} peers: {client_peers:?}", client_peers.len());
    };
    assert_eq!(to_gateway.public_key, tunnel.gateway().public_key());
    assert_eq!(
        to_gateway.endpoint.as_deref(),
        Some(format!("{GATEWAY_UNDERLAY}:{WG_PORT}").as_str())
    );
    assert!(
        to_gateway.latest_handshake > 0,
        "no handshake: {to_gateway:?}"
    );
    assert!(
        to_gateway.rx_bytes > 0 && to_gateway.tx_bytes > 0,
        "{to_gateway:?}"
    );

    // The gateway learnt the client's endpoint from the handshake.
    let gateway_peers = tunnel.gateway().peers()?;
    let [to_client] = gateway_peers.as_slice() else {
        panic!(
            "gateway has {} peers: {gateway_peers:?}",
            gateway_peers.len()
        );
    };
    assert_eq!(to_client.public_key, tunnel.client().public_key());
    let endpoint = to_client.endpoint.as_deref().unwrap_or_default();
    assert!(
        endpoint.starts_with(&format!("{CLIENT_UNDERLAY}:")),
        "gateway sees the client at {endpoint:?}"
    );

    let names: Vec<String> = [underlay.client(), underlay.switch(), underlay.gateway()]
        .iter()
        .map(|ns| ns.name().to_owned())
        .collect();
    let mut daemons: Vec<(u32, PathBuf)> = Vec::new();
    if tunnel.backend() == WgBackend::WireguardGo {
        for wg in [tunnel.client(), tunnel.gateway()] {
            let daemon = wg
                .daemon()
                .context("wireguard-go backend without a process")?;
            let socket =
                Path::new(tidegate_tests::wireguard::UAPI_DIR).join(format!("{}.sock", wg.name()));
            assert!(
                socket.exists(),
                "{} missing while running",
                socket.display()
            );
            daemons.push((daemon.pid(), socket));
        }
    }

    drop(tunnel);
    drop(underlay);
    ensure_namespaces_gone(&names)?;
    for (pid, socket) in daemons {
        assert!(
            !pid_alive(pid),
            "wireguard-go (pid {pid}) survived teardown"
        );
        assert!(!socket.exists(), "{} survived teardown", socket.display());
    }
    Ok(())
}

#[test]
fn teardown_runs_when_a_test_panics() -> Result<()> {
    require_root();
    let (tx, rx) = std::sync::mpsc::channel();
    let outcome = std::thread::spawn(move || {
        let underlay = Underlay::build(&mut narrate).expect("building the segment");
        let tunnel = Tunnel::build(&underlay, &mut narrate).expect("building the tunnel");
        let names: Vec<String> = [underlay.client(), underlay.switch(), underlay.gateway()]
            .iter()
            .map(|ns| ns.name().to_owned())
            .collect();
        let pids: Vec<u32> = [tunnel.client(), tunnel.gateway()]
            .iter()
            .filter_map(|wg| wg.daemon().map(Process::pid))
            .collect();
        tx.send((names, pids)).expect("reporting names to the test");
        panic!("deliberate failure with the whole tunnel up");
    })
    .join();
    assert!(outcome.is_err(), "the thread was meant to panic");
    let (names, pids) = rx.recv().context("the thread reported nothing")?;
    ensure_namespaces_gone(&names)?;
    for pid in pids {
        assert!(
            !pid_alive(pid),
            "wireguard-go (pid {pid}) survived the panic"
        );
    }
    Ok(())
}
