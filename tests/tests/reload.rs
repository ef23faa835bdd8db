//! Checks and reloads of the real daemons: `--check` names every problem
//! and touches nothing; SIGHUP to Core and to the Edge keeps their links up
//! (the link's connected-since in Core does not move) and applies what
//! changed, a renewed certificate included; the gateway applies a
//! `[core]` change it can, refuses one it cannot with the key named, and
//! `tidectl reload --check` shows the difference and changes nothing.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use nix::sys::signal::Signal;
use tidegate_tests::control::{LOCATION, edge_http, edge_link};
use tidegate_tests::core_daemon::CORE_BIN;
use tidegate_tests::edge::EDGE_BIN;
use tidegate_tests::gateway::GATEWAY_BIN;
use tidegate_tests::pki::served_certificate;
use tidegate_tests::{ControlLab, ControlOptions, binary, http, require_root, run_bounded};

const WAIT: Duration = Duration::from_secs(30);

/// Core's view of a link: (connected, connected since).
fn gateway_link(lab: &ControlLab) -> Result<(bool, i64)> {
    let status = lab.core()?.location_status(LOCATION)?;
    let gateway = &status["gateways"][0];
    Ok((
        gateway["connected"].as_bool() == Some(true),
        gateway["since_unix_ms"].as_i64().unwrap_or_default(),
    ))
}

fn edge_link_state(lab: &ControlLab) -> Result<(bool, i64)> {
    let edges = lab.core()?.tidectl_json(&["edge", "list"])?;
    let edge = &edges["edges"][0];
    Ok((
        edge["connected"].as_bool() == Some(true),
        edge["since_unix_ms"].as_i64().unwrap_or_default(),
    ))
}

/// Waits until `log()` contains `needle`.
fn wait_log(what: &str, needle: &str, log: impl Fn() -> String) -> Result<String> {
    let started = Instant::now();
    loop {
        let text = log();
        if text.contains(needle) {
            return Ok(text);
        }
        ensure!(
            started.elapsed() < WAIT,
            "{what}: no {needle:?} in the log:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Both links up, then SIGHUP to Core (a `[links]` timing changed, then a
/// key that needs a restart) and to the Edge (a lower body limit and a
/// renewed certificate): nothing reconnects, the changes apply, the
/// refusal names its key, and a new handshake sees the renewed certificate.
#[test]
fn sighup_to_core_and_the_edge_keeps_their_links_and_applies_what_changed() -> Result<()> {
    require_root();
    let mut lab = ControlLab::build(&ControlOptions {
        gateways: 1,
        edges: 1,
        ..ControlOptions::default()
    })?;
    lab.core_mut()?.wait_applied(LOCATION, WAIT)?;
    lab.core_mut()?.wait_edges(WAIT)?;
    let gateway_before = gateway_link(&lab)?;
    let edge_before = edge_link_state(&lab)?;
    ensure!(gateway_before.0 && edge_before.0, "links not up");

    // Core: a live change, then one that needs a restart.
    let core_pid = lab.core()?.process().pid();
    let base = lab.core()?.config().to_toml();
    let timed = if base.contains("[links]\n") {
        base.replace("[links]\n", "[links]\nconnect_timeout_ms = 2500\n")
    } else {
        format!("{base}\n[links]\nconnect_timeout_ms = 2500\n")
    };
    lab.core()?.write_config_text(&timed)?;
    lab.core_mut()?.signal(Signal::SIGHUP)?;
    let log = wait_log("Core", "reload applied", || {
        lab.core().map(|c| c.log()).unwrap_or_default()
    })?;
    ensure!(
        log.contains("links.connect_timeout_ms changed from 5000 to 2500"),
        "the applied key is not logged:\n{log}"
    );
    lab.core()?
        .write_config_text(&format!("core_id = \"another\"\n{timed}"))?;
    lab.core_mut()?.signal(Signal::SIGHUP)?;
    let log = wait_log("Core", "reload refused", || {
        lab.core().map(|c| c.log()).unwrap_or_default()
    })?;
    ensure!(
        log.contains("core_id changed from \"core\" to \"another\": restart Core to apply it"),
        "the refusal does not name the key:\n{log}"
    );

    // The Edge: a lower body limit and a renewed certificate.
    let edge_pid = lab.edge(1).process().pid();
    let big = vec![b'x'; 1500];
    let before = lab.dmz().run(|| {
        http::request(
            edge_http(1),
            "POST",
            "/api/v1/enrol",
            Some(&big),
            &[("content-type", "application/json")],
        )
    })??;
    ensure!(
        before.status != 413,
        "1500 bytes refused before the reload: {before:?}"
    );
    let core_files = lab.pki().core_files();
    let cert_before = lab
        .dmz()
        .run(|| served_certificate(edge_link(1), "edge1", &core_files))??;
    lab.pki().renew("edge1", 20)?;
    let mut config = lab.edge(1).config().clone();
    config.body_limit_bytes = Some(1024);
    lab.edge_mut(1).write_config(config)?;
    lab.edge_mut(1).signal(Signal::SIGHUP)?;
    let log = wait_log("the Edge", "reload applied", || lab.edge(1).log())?;
    ensure!(
        log.contains("body_limit_bytes changed from 2048 to 1024"),
        "the applied key is not logged:\n{log}"
    );
    let after = lab.dmz().run(|| {
        http::request(
            edge_http(1),
            "POST",
            "/api/v1/enrol",
            Some(&big),
            &[("content-type", "application/json")],
        )
    })??;
    ensure!(
        after.status == 413,
        "1500 bytes not refused after the limit went to 1024: {after:?}"
    );
    let cert_after = lab
        .dmz()
        .run(|| served_certificate(edge_link(1), "edge1", &core_files))??;
    ensure!(
        cert_after.serial != cert_before.serial,
        "a new handshake still sees serial {}",
        cert_after.serial
    );
    // A key that needs a restart: refused, named, the Edge runs on.
    let mut config = lab.edge(1).config().clone();
    config.max_connections = Some(10);
    lab.edge_mut(1).write_config(config)?;
    lab.edge_mut(1).signal(Signal::SIGHUP)?;
    let log = wait_log("the Edge", "reload refused", || lab.edge(1).log())?;
    ensure!(
        log.contains("max_connections changed from 768 to 10: restart the Edge to apply"),
        "the refusal does not name the key:\n{log}"
    );

    // A while later: same processes, same links, no reconnect.
    std::thread::sleep(Duration::from_secs(2));
    ensure!(
        lab.core()?.process().pid() == core_pid && lab.edge(1).process().pid() == edge_pid,
        "a daemon restarted"
    );
    lab.edge_mut(1).wait_health(200, WAIT)?;
    let gateway_after = gateway_link(&lab)?;
    let edge_after = edge_link_state(&lab)?;
    ensure!(
        gateway_after == gateway_before,
        "the gateway's link went from {gateway_before:?} to {gateway_after:?}"
    );
    ensure!(
        edge_after == edge_before,
        "the Edge's link went from {edge_before:?} to {edge_after:?}"
    );
    Ok(())
}

/// Core's last status from the gateway, in ms since the epoch.
fn last_status(lab: &ControlLab) -> Result<i64> {
    let status = lab.core()?.location_status(LOCATION)?;
    status["gateways"][0]["status_unix_ms"]
        .as_i64()
        .context("no status_unix_ms")
}

/// How many times Core's last status moved within `window`.
fn statuses_within(lab: &ControlLab, window: Duration) -> Result<usize> {
    let started = Instant::now();
    let mut last = last_status(lab)?;
    let mut moved = 0;
    while started.elapsed() < window {
        std::thread::sleep(Duration::from_millis(50));
        let now = last_status(lab)?;
        if now != last {
            moved += 1;
            last = now;
        }
    }
    Ok(moved)
}

/// A gateway whose statuses are a minute apart: `tidectl reload --check`
/// shows the new interval and changes nothing; the reload applies it on
/// the running link (statuses come every 200 ms, the link is the same);
/// a new `[core] listen` is refused, naming the key, by the check, by the
/// reload and on SIGHUP, and nothing of that file is applied.
#[test]
fn the_gateway_applies_the_core_changes_it_can_and_names_the_one_it_refuses() -> Result<()> {
    require_root();
    let mut lab = ControlLab::build(&ControlOptions {
        gateways: 1,
        edges: 0,
        status_interval_ms: 60_000,
        ..ControlOptions::default()
    })?;
    lab.core_mut()?.wait_applied(LOCATION, WAIT)?;
    lab.wait_master(WAIT)?;
    let link_before = gateway_link(&lab)?;
    ensure!(link_before.0, "the link is not up");

    let mut config = lab.gateway(1).daemon.config().clone();
    let core = config.core.as_mut().context("no [core]")?;
    core.status_interval_ms = Some(200);
    lab.gateway_mut(1).daemon.write_config(config.clone())?;
    let check = lab
        .gateway_mut(1)
        .daemon
        .tidectl_ok(&["reload", "--check"])?;
    ensure!(
        check.contains("setting [core] status_interval_ms changed from 60000 to 200"),
        "reload --check shows no difference:\n{check}"
    );
    let quiet = statuses_within(&lab, Duration::from_secs(2))?;
    ensure!(
        quiet == 0,
        "{quiet} statuses within 2 s after reload --check: it applied the change"
    );

    lab.gateway_mut(1).daemon.tidectl_ok(&["reload"])?;
    let busy = statuses_within(&lab, Duration::from_secs(2))?;
    ensure!(busy >= 4, "{busy} statuses within 2 s at a 200 ms interval");

    let mut refused = config.clone();
    let core = refused.core.as_mut().context("no [core]")?;
    let moved = SocketAddr::new(core.listen.ip(), core.listen.port() + 1);
    let key = format!(
        "[core] listen changed from {} to {moved}: restart the daemon to apply it",
        core.listen
    );
    core.listen = moved;
    core.status_interval_ms = Some(60_000);
    lab.gateway_mut(1).daemon.write_config(refused)?;
    let out = lab.gateway(1).daemon.tidectl(&["reload", "--check"])?;
    ensure!(
        !out.status.success() && out.stderr.contains(&key),
        "reload --check: {out:?}"
    );
    let out = lab.gateway(1).daemon.tidectl(&["reload"])?;
    ensure!(
        !out.status.success() && out.stderr.contains(&key),
        "reload: {out:?}"
    );
    lab.gateway_mut(1).daemon.signal(Signal::SIGHUP)?;
    wait_log("the gateway", &key, || lab.gateway(1).daemon.log_tail())?;
    // The refused file's interval was not applied either.
    let busy = statuses_within(&lab, Duration::from_secs(2))?;
    ensure!(
        busy >= 4,
        "{busy} statuses within 2 s: the refused file applied"
    );
    ensure!(
        gateway_link(&lab)? == link_before,
        "the link with Core was re-established"
    );
    Ok(())
}

/// Runs `binary args` and returns (success, stdout, stderr).
fn run(name: &str, args: &[&str]) -> Result<(bool, String, String)> {
    let mut command = std::process::Command::new(binary(name)?);
    command.args(args);
    let out = run_bounded(&mut command, Duration::from_secs(30))?;
    Ok((out.status.success(), out.stdout, out.stderr))
}

/// Each daemon's check: a good file is `ok` with a summary, a bad one
/// names every problem with the file and the field, and nothing is
/// touched (no socket, no database, no interface: the gateway's public
/// interface does not even exist here).
#[test]
fn checks_name_every_problem_and_touch_nothing() -> Result<()> {
    require_root();
    let run_dir = tidegate_tests::run::Run::new()?;
    let dir = run_dir.dir();
    let pki = tidegate_tests::CorePki::init(&dir.join("pki"))?;
    let core_files = pki.core_files();
    let gw = pki.issue("gw-a")?;
    let edge = pki.issue("edge-a")?;
    let path = |p: &std::path::Path| format!("{:?}", p.to_string_lossy());
    let socket = dir.join("gw.sock");
    let key = "GIbFHGJ94P/5WIjoFmrEMtgF7nQSB0IOcq8hBlTAmHE=";

    // The gateway: good, then with a problem in three sections and two
    // rules broken between sections.
    let good = format!(
        "interface = \"nosuch0\"\ncontrol_socket = {}\n\
         [[service]]\naddress = \"198.51.100.100\"\nport = 51820\n\
         [wireguard]\ninterface = \"wg-check\"\nprivate_key = \"{key}\"\nlisten_port = 51820\n\
         addresses = [\"10.77.0.1/24\"]\n\
         [ha]\nlocation_id = 1\ngateway_id = 1\nkey = \"a-shared-key-of-16+\"\n\
         vips = [\"198.51.100.100\"]\npeers = [\"198.51.100.2\"]\n\
         [core]\nlisten = \"198.51.100.1:7443\"\nca_file = {}\ncert_file = {}\nkey_file = {}\n\
         identity = \"gw-a\"\n",
        path(&socket),
        path(&gw.ca),
        path(&gw.cert),
        path(&gw.key),
    );
    let file = dir.join("gw.toml");
    std::fs::write(&file, &good)?;
    let file_arg = file.to_string_lossy().into_owned();
    let (ok, out, err) = run(GATEWAY_BIN, &["--check", "--config", &file_arg])?;
    ensure!(ok, "a good file fails: {out} {err}");
    ensure!(
        out.contains(&format!("{file_arg}: ok (interface nosuch0, 1 services"))
            && out.contains("1 VIPs, adverts to 1 unicast peers")
            && out.contains("core link on 198.51.100.1:7443 as gw-a"),
        "no summary: {out}"
    );
    ensure!(!socket.exists(), "the check made the control socket");

    let bad = good
        .replace("gateway_id = 1", "gateway_id = 0")
        .replace("listen_port = 51820", "listen_port = 0")
        .replace("\"198.51.100.1:7443\"", "\"198.51.100.1:0\"");
    std::fs::write(&file, &bad)?;
    let (ok, out, err) = run(GATEWAY_BIN, &["--check", "--config", &file_arg])?;
    ensure!(!ok, "a bad file passes: {out}");
    for needle in [
        "[wireguard] listen_port: 0 is not a port",
        "[ha] gateway_id: 0 is reserved",
        "[core] listen: port 0",
    ] {
        ensure!(
            err.lines()
                .any(|l| l.contains(&file_arg) && l.contains(needle)),
            "no {needle:?}:\n{err}"
        );
    }
    let crossed = good.replace(
        "peers = [\"198.51.100.2\"]",
        "peers = [\"2001:db8::2\", \"198.51.100.100\"]",
    );
    std::fs::write(&file, &crossed)?;
    let (ok, _, err) = run(GATEWAY_BIN, &["--check", "--config", &file_arg])?;
    ensure!(
        !ok && err.contains("[ha] peers 2001:db8::2: the advert socket is IPv4")
            && err.contains("[ha] peers 198.51.100.100, [ha] vips"),
        "the rules between sections:\n{err}"
    );
    let missing = good.replace(&path(&gw.key), "\"/nonexistent/gw.key\"");
    std::fs::write(&file, &missing)?;
    let (ok, _, err) = run(GATEWAY_BIN, &["--check", "--config", &file_arg])?;
    ensure!(
        !ok && err.contains("[core] key_file /nonexistent/gw.key"),
        "a missing key file:\n{err}"
    );

    // Core: good, then a missing key and a bad value.
    let database = dir.join("core.db");
    let core_toml = format!(
        "database = {}\nadmin_socket = {}\n[tls]\nca = {}\ncert = {}\nkey = {}\n",
        path(&database),
        path(&dir.join("core.sock")),
        path(&core_files.ca),
        path(&core_files.cert),
        path(&core_files.key),
    );
    let file = dir.join("core.toml");
    let file_arg = file.to_string_lossy().into_owned();
    std::fs::write(&file, &core_toml)?;
    let (ok, out, err) = run(CORE_BIN, &["check", "--config", &file_arg])?;
    ensure!(
        ok && out.contains(&format!("{file_arg}: ok (database")),
        "{out} {err}"
    );
    ensure!(!database.exists(), "the check made the database");
    std::fs::write(
        &file,
        core_toml.replace(&path(&core_files.key), "\"/nonexistent/core.key\""),
    )?;
    let (ok, _, err) = run(CORE_BIN, &["check", "--config", &file_arg])?;
    ensure!(
        !ok && err.contains(&file_arg) && err.contains("tls.key /nonexistent/core.key"),
        "{err}"
    );
    std::fs::write(&file, format!("{core_toml}[links]\nreconnect_min_ms = 0\n"))?;
    let (ok, _, err) = run(CORE_BIN, &["check", "--config", &file_arg])?;
    ensure!(
        !ok && err.contains(&file_arg) && err.contains("links.reconnect_min_ms: must be above 0"),
        "{err}"
    );

    // The Edge.
    let edge_toml = format!(
        "http_listen = \"127.0.0.1:18097\"\nlink_listen = \"127.0.0.1:17457\"\nidentity = \"edge-a\"\n\
         ca_file = {}\ncert_file = {}\nkey_file = {}\n",
        path(&edge.ca),
        path(&edge.cert),
        path(&edge.key),
    );
    let file = dir.join("edge.toml");
    let file_arg = file.to_string_lossy().into_owned();
    std::fs::write(&file, &edge_toml)?;
    let (ok, out, err) = run(EDGE_BIN, &["--check", "--config", &file_arg])?;
    ensure!(
        ok && out.contains(&format!("{file_arg}: ok (http on 127.0.0.1:18097")),
        "{out} {err}"
    );
    // The wrong identity for its certificate.
    std::fs::write(&file, edge_toml.replace("\"edge-a\"", "\"edge-b\""))?;
    let (ok, _, err) = run(EDGE_BIN, &["--check", "--config", &file_arg])?;
    ensure!(
        !ok && err.contains(&file_arg) && err.contains("not issued for identity \"edge-b\""),
        "{err}"
    );
    Ok(())
}
