//! The control plane end to end with the real Core: Core in an intranet
//! namespace nothing reaches, two HA gateways and two Edges behind nginx.
//! A device downloads its config with a one-time token and logs in with
//! MFA through nginx; its real WireGuard tunnel carries pings; Core killed
//! leaves tunnels up and every Edge unhealthy; Core back relinks everything
//! on the same state; a failover asked of Core moves the VIP; an idle
//! device's session ends. Bad client input is refused with a clear status
//! and stores nothing, and certificates from another CA, or naming someone
//! else, are refused in both directions.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, bail, ensure};
use nix::sys::signal::Signal;
use serde_json::json;
use tidegate_core::totp;
use tidegate_tests::control::{
    CORE_ADDR, DMZ_PUBLIC, EDGE_BODY_LIMIT, GATEWAY_LINK_PORT, GATEWAY_TUNNEL, LOCATION,
    NGINX_PORT, edge_link, gateway_mgmt,
};
use tidegate_tests::http::{self, HttpAnswer};
use tidegate_tests::{
    ControlLab, ControlOptions, CoreConfig, Probe, TestPki, poll_until, require_root,
};

const WAIT: Duration = Duration::from_secs(30);

/// A user and a device of the client's key: the user's TOTP secret.
fn enrol(lab: &mut ControlLab, public_key: &str) -> Result<Vec<u8>> {
    let core = lab.core()?;
    let user = core.tidectl_json(&["user", "create", "alice"])?;
    let secret = user["totp_secret"]
        .as_str()
        .context("no TOTP secret printed")?;
    core.tidectl_ok(&[
        "device",
        "create",
        "laptop",
        "--user",
        "alice",
        "--location",
        LOCATION,
        "--public-key",
        public_key,
    ])?;
    totp::secret_from_base32(secret).context("the TOTP secret is not base32")
}

fn now_s() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// The code of the current step.
fn code(secret: &[u8]) -> String {
    totp::code_at(secret, totp::step_at(now_s()))
}

/// A code no step near now has.
fn wrong_code(secret: &[u8]) -> String {
    let step = totp::step_at(now_s());
    (0..1_000_000)
        .map(|n| format!("{n:06}"))
        .find(|c| (step - 2..=step + 2).all(|s| totp::code_at(secret, s) != *c))
        .unwrap_or_default()
}

/// Checks an API error: the HTTP status and the error code.
fn refused(answer: &HttpAnswer, status: u16, code: &str) -> Result<()> {
    ensure!(
        answer.status == status,
        "expected {status} {code}, got {} {}",
        answer.status,
        answer.body
    );
    let body = answer.json()?;
    ensure!(
        body["error"]["code"] == code
            && body["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
        "expected code {code} and a message, got {body}"
    );
    Ok(())
}

fn start(lab: &ControlLab, public_key: &str) -> Result<String> {
    let answer = lab.post(
        "/api/v1/mfa/start",
        &json!({"location": LOCATION, "public_key": public_key}),
    )?;
    ensure!(
        answer.status == 200,
        "MFA start: {} {}",
        answer.status,
        answer.body
    );
    answer.json()?["session"]
        .as_str()
        .map(str::to_owned)
        .context("no session in the MFA challenge")
}

fn finish(lab: &ControlLab, session: &str, code: &str) -> Result<HttpAnswer> {
    lab.post(
        "/api/v1/mfa/finish",
        &json!({"session": session, "code": code}),
    )
}

/// The location's config version and whether the device has a session.
fn stored_state(lab: &ControlLab) -> Result<(u64, bool)> {
    let core = lab.core()?;
    let location = core.tidectl_json(&["location", "show", LOCATION])?;
    let device = core.tidectl_json(&["device", "show", "laptop"])?;
    Ok((
        location["version"].as_u64().unwrap_or_default(),
        device["mfa_session"].as_bool().unwrap_or_default(),
    ))
}

fn event_kinds(lab: &ControlLab) -> Result<Vec<String>> {
    let events = lab.core()?.tidectl_json(&["events", "--limit", "1000"])?;
    Ok(events["events"]
        .as_array()
        .map(|list| {
            list.iter()
                .filter_map(|e| e["kind"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default())
}

/// Whether a TCP connection to `addr` from inside `lab`'s DMZ succeeds.
fn dmz_connects(lab: &ControlLab, addr: SocketAddr) -> Result<bool> {
    lab.dmz()
        .run(move || TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_ok())
}

#[test]
fn bad_client_input_is_refused_and_nothing_is_stored() -> Result<()> {
    require_root();
    let mut lab = ControlLab::build(&ControlOptions {
        mfa_threshold_s: Some(300),
        challenge_ttl_s: Some(10),
        ..ControlOptions::default()
    })?;
    let key = lab.create_client_wg()?;
    let secret = enrol(&mut lab, &key)?;
    let before = stored_state(&lab)?;

    // Malformed and oversized requests stop at the Edge.
    refused(
        &lab.api("POST", "/api/v1/mfa/start", Some(b"{\"location\": "))?,
        400,
        "invalid",
    )?;
    refused(
        &lab.post(
            "/api/v1/mfa/start",
            &json!({"location": LOCATION, "public_key": "abc"}),
        )?,
        400,
        "invalid",
    )?;
    let big = json!({"location": LOCATION, "public_key": "x".repeat(2 * EDGE_BODY_LIMIT)});
    refused(&lab.post("/api/v1/mfa/start", &big)?, 413, "too-large")?;
    // Core's answers.
    refused(
        &lab.post(
            "/api/v1/mfa/start",
            &json!({"location": "nowhere", "public_key": key}),
        )?,
        404,
        "not-found",
    )?;
    let stranger = tidegate_core::keys::Key::generate_private()
        .public()
        .to_base64();
    refused(
        &lab.post(
            "/api/v1/mfa/start",
            &json!({"location": LOCATION, "public_key": stranger}),
        )?,
        404,
        "not-found",
    )?;
    refused(
        &finish(&lab, "no-such-session", "123456")?,
        404,
        "not-found",
    )?;
    refused(
        &lab.post("/api/v1/device-config", &json!({"token": "A".repeat(43)}))?,
        401,
        "unauthorized",
    )?;
    // An enrolment with another key than the device's is a conflict.
    let token = lab.core()?.tidectl_json(&["device", "token", "laptop"])?;
    refused(
        &lab.post(
            "/api/v1/enrol",
            &json!({"token": token["token"], "public_key": stranger}),
        )?,
        409,
        "conflict",
    )?;
    let short = lab
        .core()?
        .tidectl_json(&["device", "token", "laptop", "--ttl", "1"])?;
    std::thread::sleep(Duration::from_millis(1500));
    refused(
        &lab.post("/api/v1/device-config", &json!({"token": short["token"]}))?,
        410,
        "expired",
    )?;

    // A wrong code is refused, and the right one still works after it: the
    // wrong one used nothing up.
    let session = start(&lab, &key)?;
    refused(
        &finish(&lab, &session, &wrong_code(&secret))?,
        401,
        "unauthorized",
    )?;
    ensure!(
        stored_state(&lab)? == before,
        "a refused login stored something"
    );
    let answer = finish(&lab, &session, &code(&secret))?;
    ensure!(answer.status == 200, "{} {}", answer.status, answer.body);
    let after_login = stored_state(&lab)?;
    ensure!(
        after_login.1 && after_login.0 == before.0 + 1,
        "{after_login:?}"
    );
    // The same code again, in a new login: a replay.
    let replay = start(&lab, &key)?;
    let answer = finish(&lab, &replay, &code(&secret))?;
    refused(&answer, 401, "unauthorized")?;
    ensure!(
        answer.body.contains("used already"),
        "the replay is not named: {}",
        answer.body
    );
    // An expired login.
    let stale = start(&lab, &key)?;
    std::thread::sleep(Duration::from_secs(11));
    refused(&finish(&lab, &stale, &code(&secret))?, 410, "expired")?;
    ensure!(
        stored_state(&lab)? == after_login,
        "a refused request changed the store"
    );
    let logins = event_kinds(&lab)?
        .iter()
        .filter(|k| *k == "mfa-login")
        .count();
    ensure!(logins == 1, "{logins} logins logged, 1 expected");
    Ok(())
}

#[test]
fn an_mfa_login_survives_core_outages_and_ends_when_idle() -> Result<()> {
    require_root();
    let threshold = 20;
    let mut lab = ControlLab::build(&ControlOptions {
        mfa_threshold_s: Some(threshold),
        ..ControlOptions::default()
    })?;

    // Nothing reaches Core: it listens on no TCP port, and a connection
    // from the DMZ to its address fails.
    let listening = lab.intranet().exec_ok("ss", &["-Htln"])?;
    ensure!(
        listening.trim().is_empty(),
        "Core's namespace listens: {listening}"
    );
    for port in [GATEWAY_LINK_PORT, edge_link(1).port(), 443, 80] {
        let addr = SocketAddr::from((CORE_ADDR, port));
        ensure!(!dmz_connects(&lab, addr)?, "the DMZ reached Core at {addr}");
    }
    // The DMZ does reach what Core dials (the management segment works).
    ensure!(dmz_connects(
        &lab,
        SocketAddr::from((gateway_mgmt(1), GATEWAY_LINK_PORT))
    )?);

    let key = lab.create_client_wg()?;
    let secret = enrol(&mut lab, &key)?;

    // The one-time config download: once.
    let token = lab.core()?.tidectl_json(&["device", "token", "laptop"])?;
    let download = lab.post("/api/v1/device-config", &json!({"token": token["token"]}))?;
    ensure!(
        download.status == 200,
        "{} {}",
        download.status,
        download.body
    );
    let config = download.json()?;
    ensure!(
        config["device"] == "laptop"
            && config["endpoint"] == "198.51.100.100:51820"
            && config.get("preshared_key").is_none(),
        "{config}"
    );
    refused(
        &lab.post("/api/v1/device-config", &json!({"token": token["token"]}))?,
        401,
        "unauthorized",
    )?;

    // MFA login through nginx, then the tunnel.
    let session = start(&lab, &key)?;
    let answer = finish(&lab, &session, &code(&secret))?;
    ensure!(answer.status == 200, "{} {}", answer.status, answer.body);
    let config = answer.json()?;
    ensure!(
        config["preshared_key"]
            .as_str()
            .is_some_and(|k| k.len() == 44),
        "{config}"
    );
    lab.apply_device_config(&config)?;
    let ping = lab.client().ping(IpAddr::V4(GATEWAY_TUNNEL), 3)?;
    ensure!(ping.received == 3, "through the tunnel: {}", ping.summary);
    let status = lab.core()?.location_status(LOCATION)?;
    ensure!(status["mfa_sessions"] == 1, "{status}");
    let master = lab.wait_master(WAIT)?;
    let master_peers = lab.gateway_mut(master).daemon.peers()?;
    ensure!(
        master_peers.peer(&key).is_some(),
        "the master gw{master} has no peer for the device"
    );

    // Core killed: tunnels stay, every Edge says it has no Core.
    lab.core_mut()?.kill()?;
    for j in 1..=2 {
        let answer = lab.edge_mut(j).wait_health(503, WAIT)?;
        ensure!(
            answer.body.contains("Core"),
            "edge{j} /health: {}",
            answer.body
        );
    }
    let ping = lab.client().ping(IpAddr::V4(GATEWAY_TUNNEL), 3)?;
    ensure!(ping.received == 3, "without Core: {}", ping.summary);
    refused(
        &lab.post(
            "/api/v1/mfa/start",
            &json!({"location": LOCATION, "public_key": key}),
        )?,
        503,
        "unavailable",
    )?;

    // Core back: every link again, on the same state.
    lab.core_mut()?.restart()?;
    let status = lab.core_mut()?.wait_applied(LOCATION, WAIT)?;
    ensure!(status["mfa_sessions"] == 1, "{status}");
    lab.core_mut()?.wait_edges(WAIT)?;
    for j in 1..=2 {
        lab.edge_mut(j).wait_health(200, WAIT)?;
    }
    let ping = lab.client().ping(IpAddr::V4(GATEWAY_TUNNEL), 3)?;
    ensure!(ping.received == 3, "after Core's restart: {}", ping.summary);
    let connects = event_kinds(&lab)?
        .iter()
        .filter(|k| *k == "gateway-connected")
        .count();
    ensure!(connects >= 4, "{connects} gateway links logged, 4 expected");

    // A planned failover asked of Core: the master hands over.
    let master = lab.wait_master(WAIT)?;
    let backup = 3 - master;
    let out = lab
        .core()?
        .tidectl_ok(&["failover", "--location", LOCATION])?;
    ensure!(out.contains(&format!("gw{master}")), "{out}");
    poll_until(
        "the backup to become master",
        WAIT,
        Duration::from_millis(100),
        || {
            let status = lab.core()?.location_status(LOCATION)?;
            let role = |i: usize| {
                status["gateways"][i - 1]["role"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned()
            };
            Ok(if role(backup) == "master" && role(master) == "backup" {
                Probe::Ready(())
            } else {
                Probe::NotYet(status["gateways"].to_string())
            })
        },
    )?;
    let kinds = event_kinds(&lab)?;
    ensure!(
        kinds.iter().any(|k| k == "failover") && kinds.iter().any(|k| k == "role-change"),
        "{kinds:?}"
    );

    // The device goes quiet: the gateways remove its peer and Core ends the
    // session.
    lab.drop_client_wg();
    let wait = Duration::from_secs(u64::from(threshold) * 2 + 15);
    poll_until(
        "the idle device's session to end",
        wait,
        Duration::from_millis(500),
        || {
            let (_, session) = stored_state(&lab)?;
            Ok(if session {
                Probe::NotYet("session still on".into())
            } else {
                Probe::Ready(())
            })
        },
    )?;
    ensure!(event_kinds(&lab)?.iter().any(|k| k == "mfa-session-end"));
    let status = lab.core_mut()?.wait_applied(LOCATION, WAIT)?;
    ensure!(status["mfa_sessions"] == 0, "{status}");
    for i in 1..=2 {
        // `tidectl peers` shows the last stats poll: wait for one after.
        poll_until(
            &format!("gw{i} to drop the device's peer"),
            WAIT,
            Duration::from_millis(100),
            || {
                let peers = lab.gateway_mut(i).daemon.peers()?;
                Ok(if peers.peer(&key).is_none() {
                    Probe::Ready(())
                } else {
                    Probe::NotYet(format!("{peers:?}"))
                })
            },
        )?;
    }
    Ok(())
}

/// Waits until Core reports the link to every gateway and Edge down with
/// an error containing one of `needles`; returns the errors.
fn wait_refused(lab: &ControlLab, needles: &[&str]) -> Result<Vec<String>> {
    poll_until(
        "every link to be refused",
        WAIT,
        Duration::from_millis(200),
        || {
            let core = lab.core()?;
            let status = core.location_status(LOCATION)?;
            let edges = core.tidectl_json(&["edge", "list"])?;
            let mut errors = Vec::new();
            for link in status["gateways"]
                .as_array()
                .into_iter()
                .flatten()
                .chain(edges["edges"].as_array().into_iter().flatten())
            {
                if link["connected"].as_bool() == Some(true) {
                    bail!("{} linked: {link}", link["name"]);
                }
                errors.push(link["link_error"].as_str().unwrap_or_default().to_owned());
            }
            Ok(
                if errors.len() == 2 && errors.iter().all(|e| needles.iter().any(|n| e.contains(n)))
                {
                    Probe::Ready(errors)
                } else {
                    Probe::NotYet(format!("{errors:?}"))
                },
            )
        },
    )
}

/// Sets the identities Core requires of gw1 and edge1 (distinct: Core
/// refuses one identity for two of them).
fn set_identities(lab: &ControlLab, gateway: &str, edge: &str) -> Result<()> {
    lab.core()?
        .tidectl_ok(&["gateway", "change", "gw1", "--identity", gateway])?;
    lab.core()?
        .tidectl_ok(&["edge", "change", "edge1", "--identity", edge])?;
    Ok(())
}

#[test]
fn certificates_of_another_ca_or_another_name_are_refused_both_ways() -> Result<()> {
    require_root();
    let mut lab = ControlLab::build(&ControlOptions {
        gateways: 1,
        edges: 1,
        start_core: false,
        ..ControlOptions::default()
    })?;
    let foreign = TestPki::new(lab.dir(), "foreign")?;
    let ours = lab.pki().core_files();
    let foreign_core = foreign.issue("core")?;
    let core_dir = lab.dir().join("core");

    // Core with a certificate of another CA: the gateway and the Edge
    // refuse it in the handshake.
    lab.start_core(CoreConfig::new(
        &core_dir,
        tidegate_tests::CertFiles {
            ca: ours.ca.clone(),
            cert: foreign_core.cert.clone(),
            key: foreign_core.key.clone(),
        },
    ))?;
    lab.core()?.tidectl_ok(&[
        "location",
        "create",
        LOCATION,
        "--address",
        "10.77.0.1/24",
        "--vip",
        "198.51.100.100",
    ])?;
    lab.core()?.tidectl_ok(&[
        "gateway",
        "create",
        "gw1",
        "--location",
        LOCATION,
        "--address",
        &SocketAddr::from((gateway_mgmt(1), GATEWAY_LINK_PORT)).to_string(),
    ])?;
    lab.core()?.tidectl_ok(&[
        "edge",
        "create",
        "edge1",
        "--address",
        &edge_link(1).to_string(),
    ])?;
    let errors = wait_refused(&lab, &["received fatal alert: UnknownCA"])?;
    println!("Core's certificate of another CA: {errors:?}");
    lab.edge_mut(1).wait_health(503, WAIT)?;

    // Core trusting only another CA: it refuses the gateway's and the
    // Edge's certificates.
    lab.core_mut()?.stop()?;
    lab.start_core(CoreConfig::new(
        &core_dir,
        tidegate_tests::CertFiles {
            ca: foreign.ca_file().to_owned(),
            cert: ours.cert.clone(),
            key: ours.key.clone(),
        },
    ))?;
    let errors = wait_refused(&lab, &["invalid peer certificate: UnknownIssuer"])?;
    println!("their certificates of another CA: {errors:?}");

    // Our CA, but the peer's certificate names someone else: Core refuses.
    lab.core_mut()?.stop()?;
    lab.start_core(CoreConfig::new(&core_dir, ours.clone()))?;
    set_identities(&lab, "gw9", "edge9")?;
    let errors = wait_refused(
        &lab,
        &[
            "certificate not valid for name \"gw9\"",
            "certificate not valid for name \"edge9\"",
        ],
    )?;
    println!("certificates naming someone else: {errors:?}");

    // Core presenting a certificate of our CA that does not name Core (a
    // gateway's): the gateway and the Edge refuse it.
    lab.core_mut()?.stop()?;
    let not_core = lab.pki().issue("impostor")?;
    lab.start_core(CoreConfig::new(
        &core_dir,
        tidegate_tests::CertFiles {
            ca: ours.ca.clone(),
            cert: not_core.cert,
            key: not_core.key,
        },
    ))?;
    set_identities(&lab, "gw1", "edge1")?;
    let errors = wait_refused(
        &lab,
        &["(PermissionDenied): only Core (core) may open a Link"],
    )?;
    println!("Core's certificate naming someone else: {errors:?}");

    // And with the right certificates everything links.
    lab.core_mut()?.stop()?;
    lab.start_core(CoreConfig::new(&core_dir, ours))?;
    lab.core_mut()?.wait_applied(LOCATION, WAIT)?;
    lab.core_mut()?.wait_edges(WAIT)?;
    lab.edge_mut(1).wait_health(200, WAIT)?;

    // Each side shows its certificate's and the CA's serial and expiry.
    let core_certs = lab.core()?.tidectl_json(&["core-certificates"])?;
    for which in ["certificate", "ca"] {
        let cert = &core_certs[which];
        ensure!(
            cert["expiry"] == "valid"
                && cert["serial"].as_str().is_some_and(|s| !s.is_empty())
                && cert["days_left"].as_i64().is_some_and(|d| d > 800),
            "Core's {which}: {core_certs}"
        );
    }
    let text = lab.gateway_mut(1).daemon.tidectl_ok(&["certificates"])?;
    ensure!(
        text.starts_with("certificate: expires in 82") && text.contains("\nCA: expires in "),
        "the gateway's certificates: {text:?}"
    );
    // And Core shows when each linked gateway's and Edge's expires (from
    // their Hellos), so one place warns of them all.
    let in_800_days = now_s() + 800 * 86_400;
    let status = lab.core()?.location_status(LOCATION)?;
    let edges = lab.core()?.tidectl_json(&["edge", "list"])?;
    for (what, expiry) in [
        ("gateway", &status["gateways"][0]["cert_not_after_unix_s"]),
        ("Edge", &edges["edges"][0]["cert_not_after_unix_s"]),
    ] {
        ensure!(
            expiry.as_i64().is_some_and(|t| t > in_800_days),
            "the {what}'s certificate expiry in Core's status: {expiry} ({status} {edges})"
        );
    }

    // Core's certificate renewed while it runs: its next dial presents the
    // new one (the Edge restarts, so Core dials again), no restart of Core.
    let old_serial = core_certs["certificate"]["serial"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    lab.pki().renew_core(90)?;
    let new_serial = tidegate_tests::pki::certificate_info(&lab.pki().core_files().cert)?.serial;
    ensure!(new_serial != old_serial, "renewal kept serial {new_serial}");
    lab.edge_mut(1).stop()?;
    lab.edge_mut(1).restart()?;
    lab.edge_mut(1).wait_health(200, WAIT)?;
    let log = lab.edge(1).log_tail();
    ensure!(
        log.contains(&format!("core_serial={new_serial}")),
        "the Edge did not see Core's renewed certificate {new_serial}:\n{log}"
    );
    let core_certs = lab.core()?.tidectl_json(&["core-certificates"])?;
    ensure!(
        core_certs["certificate"]["serial"] == new_serial.as_str()
            && core_certs["certificate"]["days_left"].as_i64() < Some(91),
        "Core's status after renewal: {core_certs}"
    );
    Ok(())
}

/// Guesses the brute-force test makes.
const GUESSES: usize = 10_000;
/// Clients guessing at once.
const GUESSERS: usize = 4;
/// Wrong codes that lock a device out in that test.
const LOCKOUT_AFTER: u32 = 8;

/// What the guessing came to.
#[derive(Debug, Default)]
struct Guessing {
    /// Codes Core checked and found wrong (401).
    checked: usize,
    /// Guesses held back by a limit (429, with Retry-After).
    limited: usize,
    /// Guesses in a login that another guesser's start replaced (404).
    replaced: usize,
    /// Logins the guessers started.
    starts: usize,
    /// Anything else, with its body.
    other: Vec<String>,
}

/// `GUESSES` wrong codes for the device `key`, spread over `GUESSERS`
/// threads in the client's namespace, all from `from`, starting a new
/// login whenever one is over.
fn guess(lab: &ControlLab, from: Ipv4Addr, key: &str, secret: &[u8]) -> Result<Guessing> {
    let nginx = SocketAddr::from((DMZ_PUBLIC, NGINX_PORT));
    let step = totp::step_at(now_s());
    // Codes no step of the next hours has: a guess never hits by luck.
    let valid: HashSet<String> = (step - 2..step + 1_000)
        .map(|s| totp::code_at(secret, s))
        .collect();
    let codes: Vec<String> = (0..)
        .map(|n| format!("{n:06}"))
        .filter(|c| !valid.contains(c))
        .take(GUESSES)
        .collect();
    let deadline = Instant::now() + Duration::from_secs(240);
    let post = |path: &str, body: serde_json::Value| {
        http::request_from(
            from.into(),
            nginx,
            "POST",
            path,
            Some(body.to_string().as_bytes()),
        )
    };
    let outcomes = lab.client().run(|| {
        std::thread::scope(|scope| {
            let workers: Vec<_> = codes
                .chunks(GUESSES / GUESSERS)
                .map(|chunk| {
                    scope.spawn(move || -> Result<Guessing> {
                        let mut seen = Guessing::default();
                        let mut session: Option<String> = None;
                        for code in chunk {
                            ensure!(
                                Instant::now() < deadline,
                                "guessing took too long: {seen:?}"
                            );
                            let current = match &session {
                                Some(s) => s.clone(),
                                None => {
                                    let start = post(
                                        "/api/v1/mfa/start",
                                        json!({"location": LOCATION, "public_key": key}),
                                    )?;
                                    seen.starts += 1;
                                    match start.status {
                                        200 => {
                                            let s = start.json()?["session"]
                                                .as_str()
                                                .unwrap_or_default()
                                                .to_owned();
                                            session = Some(s.clone());
                                            s
                                        }
                                        // Locked out: no login to guess in.
                                        429 if start.header("retry-after").is_some() => {
                                            seen.limited += 1;
                                            continue;
                                        }
                                        _ => {
                                            seen.other
                                                .push(format!("{} {}", start.status, start.body));
                                            continue;
                                        }
                                    }
                                }
                            };
                            let answer = post(
                                "/api/v1/mfa/finish",
                                json!({"session": current, "code": code}),
                            )?;
                            match answer.status {
                                401 => {
                                    seen.checked += 1;
                                    if answer.body.contains("start the login again") {
                                        session = None;
                                    }
                                }
                                429 if answer.header("retry-after").is_some() => {
                                    seen.limited += 1;
                                }
                                404 => {
                                    seen.replaced += 1;
                                    session = None;
                                }
                                _ => seen
                                    .other
                                    .push(format!("{} {}", answer.status, answer.body)),
                            }
                        }
                        Ok(seen)
                    })
                })
                .collect();
            workers
                .into_iter()
                .map(|w| {
                    w.join()
                        .map_err(|_| anyhow::anyhow!("a guesser panicked"))?
                })
                .collect::<Result<Vec<_>>>()
        })
    })??;
    let mut total = Guessing::default();
    for seen in outcomes {
        total.checked += seen.checked;
        total.limited += seen.limited;
        total.replaced += seen.replaced;
        total.starts += seen.starts;
        total.other.extend(seen.other);
    }
    Ok(total)
}

#[test]
fn ten_thousand_guessed_codes_through_nginx_and_an_edge_are_held_to_the_limit() -> Result<()> {
    require_root();
    let mut lab = ControlLab::build(&ControlOptions {
        gateways: 1,
        edges: 1,
        mfa_threshold_s: Some(300),
        challenge_ttl_s: Some(900),
        device_lockout_after: Some(LOCKOUT_AFTER),
        ..ControlOptions::default()
    })?;
    let key = lab.create_client_wg()?;
    let secret = enrol(&mut lab, &key)?;

    // The user starts a login; a stranger elsewhere starts one for the
    // same device, which leaves the user's in progress.
    let user = start(&lab, &key)?;
    let stranger = Ipv4Addr::new(198, 51, 100, 51);
    lab.add_client_addr(stranger)?;
    let theirs = lab.post_from(
        stranger,
        "/api/v1/mfa/start",
        &json!({"location": LOCATION, "public_key": key}),
    )?;
    ensure!(theirs.status == 200, "{theirs:?}");

    let seen = guess(&lab, stranger, &key, &secret)?;
    ensure!(
        seen.other.is_empty(),
        "unexpected answers: {:?}",
        &seen.other[..seen.other.len().min(5)]
    );
    ensure!(
        seen.checked <= LOCKOUT_AFTER as usize
            && seen.checked + seen.limited + seen.replaced == GUESSES
            && seen.limited >= GUESSES / 10,
        "{GUESSES} guesses: {} codes checked (at most {LOCKOUT_AFTER} may be), {} held back, \
         {} in a replaced login, {} logins started",
        seen.checked,
        seen.limited,
        seen.replaced,
        seen.starts
    );
    let kinds = event_kinds(&lab)?;
    let failed = kinds.iter().filter(|k| *k == "mfa-failed").count();
    ensure!(
        failed == seen.checked && kinds.iter().any(|k| k == "mfa-locked"),
        "events: {failed} mfa-failed for {} checked, {kinds:?}",
        seen.checked
    );
    let device = lab.core()?.tidectl_json(&["device", "show", "laptop"])?;
    ensure!(device["mfa_locked_out"] == true, "{device}");

    // Locked out: the user's right code is not checked (nor used up).
    let held = finish(&lab, &user, &code(&secret))?;
    refused(&held, 429, "limited")?;
    ensure!(
        held.header("retry-after")
            .and_then(|s| s.parse::<u32>().ok())
            .is_some_and(|s| s > 60),
        "{held:?}"
    );
    // The operator lifts it; the user's login, never cancelled, finishes.
    lab.core()?
        .tidectl_ok(&["device", "change", "laptop", "--mfa-unlock"])?;
    let login = finish(&lab, &user, &code(&secret))?;
    ensure!(login.status == 200, "{} {}", login.status, login.body);
    ensure!(login.json()?["device"] == "laptop");
    Ok(())
}

/// Devices of the location the delivery test fills.
const BULK_DEVICES: usize = 50_000;

/// Devices wireguard-go holds at most (its MaxPeers).
const WIREGUARD_GO_MAX_PEERS: usize = 1 << 16;

/// The i-th bulk device's tunnel address in 10.76.0.0/15, past the
/// gateway's.
fn bulk_address(i: usize) -> String {
    let n = i + 2;
    format!("10.{}.{}.{}/32", 76 + n / 65_536, n / 256 % 256, n % 256)
}

/// The i-th bulk device's public key: distinct bytes (any 32 bytes are an
/// X25519 public key; deriving real ones would take the test longer than
/// the delivery).
fn bulk_key(i: usize) -> tidegate_core::keys::Key {
    let mut bytes = [0x5a; 32];
    bytes[..8].copy_from_slice(&(i as u64 + 1).to_le_bytes());
    tidegate_core::keys::Key::new(bytes)
}

/// Adds the bulk devices numbered `range` (of user `bulk`, made with the
/// first) through Core's admin socket (gRPC, as `tidectl core device
/// import` speaks it), 10,000 at a time.
fn add_bulk_devices(socket: &std::path::Path, range: std::ops::Range<usize>) -> Result<()> {
    use tidegate_proto::admin::v1::{self as admin, admin_client::AdminClient};
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let channel =
            tonic::transport::Endpoint::from_shared(format!("unix:{}", socket.display()))?
                .connect()
                .await
                .context("connecting to Core's admin socket")?;
        let mut api = AdminClient::new(channel);
        if range.start == 0 {
            api.create_user(admin::CreateUserRequest {
                name: "bulk".into(),
                ..Default::default()
            })
            .await
            .map_err(|s| anyhow::anyhow!("creating the user: {}", s.message()))?;
        }
        let devices: Vec<_> = range
            .map(|i| admin::CreateDeviceRequest {
                name: format!("b{i}"),
                user: "bulk".into(),
                location: LOCATION.into(),
                public_key: bulk_key(i).to_base64(),
                addresses: vec![bulk_address(i)],
                ..Default::default()
            })
            .collect();
        for batch in devices.chunks(10_000) {
            let created = api
                .create_devices(admin::CreateDevicesRequest {
                    devices: batch.to_vec(),
                })
                .await
                .map_err(|s| anyhow::anyhow!("adding devices: {}", s.message()))?
                .into_inner()
                .created;
            ensure!(
                created as usize == batch.len(),
                "{created} of {} added",
                batch.len()
            );
        }
        Ok(())
    })
}

#[test]
fn a_location_of_fifty_thousand_devices_is_delivered_whole() -> Result<()> {
    require_root();
    let mut lab = ControlLab::build(&ControlOptions {
        gateways: 1,
        edges: 0,
        status_interval_ms: 5_000,
        tunnel_address: "10.76.0.1/15".into(),
        ..ControlOptions::default()
    })?;
    let core = lab.core()?;
    // Off while the devices are added: the gateway then gets them in one
    // config, as after an outage or on a new gateway.
    core.tidectl_ok(&["gateway", "change", "gw1", "--enabled", "off"])?;
    let started = Instant::now();
    add_bulk_devices(&core.config().admin_socket, 0..BULK_DEVICES)?;
    let added = started.elapsed();
    core.tidectl_ok(&["gateway", "change", "gw1", "--enabled", "on"])?;
    let core = lab.core_mut()?;
    core.wait_applied(LOCATION, Duration::from_secs(240))?;
    let delivered = started.elapsed() - added;
    // The gateway runs them: its status (read from its WireGuard) counts
    // every peer.
    let status = poll_until(
        "the gateway's status to count every peer",
        Duration::from_secs(60),
        Duration::from_millis(500),
        || {
            let status = core.location_status(LOCATION)?;
            Ok(
                if status["gateways"][0]["peers"].as_u64() == Some(BULK_DEVICES as u64) {
                    Probe::Ready(status)
                } else {
                    Probe::NotYet(status["gateways"][0].to_string())
                },
            )
        },
    )?;
    eprintln!(
        "{BULK_DEVICES} devices added in {added:.1?}, delivered and applied in {delivered:.1?}: {}",
        status["gateways"][0]
    );

    // Past what wireguard-go holds: the change that crosses it is refused
    // whole, and the gateway runs what it ran.
    let admin_socket = core.config().admin_socket.clone();
    add_bulk_devices(&admin_socket, BULK_DEVICES..WIREGUARD_GO_MAX_PEERS + 1)?;
    let below = WIREGUARD_GO_MAX_PEERS / 10_000 * 10_000;
    let refused = poll_until(
        "the gateway to refuse the peers wireguard-go cannot hold",
        Duration::from_secs(120),
        Duration::from_millis(500),
        || {
            let gateway = core.location_status(LOCATION)?["gateways"][0].clone();
            let error = gateway["apply_error"].as_str().unwrap_or_default();
            Ok(
                if error.contains(&format!("holds at most {WIREGUARD_GO_MAX_PEERS}"))
                    && gateway["peers"].as_u64() == Some(below as u64)
                {
                    Probe::Ready(gateway)
                } else {
                    Probe::NotYet(gateway.to_string())
                },
            )
        },
    )?;
    eprintln!("refused past wireguard-go's limit: {refused}");
    Ok(())
}

#[test]
fn an_mfa_login_the_gateway_is_slow_to_apply_is_answered_by_core_before_the_edge_gives_up()
-> Result<()> {
    require_root();
    let edge_wait = Duration::from_secs(3);
    let mut lab = ControlLab::build(&ControlOptions {
        gateways: 1,
        edges: 1,
        mfa_threshold_s: Some(300),
        edge_core_timeout_ms: Some(edge_wait.as_millis() as u64),
        ..ControlOptions::default()
    })?;
    let key = lab.create_client_wg()?;
    let secret = enrol(&mut lab, &key)?;
    let session = start(&lab, &key)?;
    // The gateway freezes with its link open: Core commits the login and
    // waits for an Applied that does not come (its own limit is 10 s).
    lab.gateway_mut(1).daemon.signal(Signal::SIGSTOP)?;
    let started = Instant::now();
    let answer = finish(&lab, &session, &code(&secret));
    lab.gateway_mut(1).daemon.signal(Signal::SIGCONT)?;
    let answer = answer?;
    // Core's answer, within the Edge's wait, rather than the Edge's 504.
    refused(&answer, 503, "unavailable")?;
    ensure!(
        answer.body.contains("did not apply") && started.elapsed() < edge_wait,
        "after {:?}: {}",
        started.elapsed(),
        answer.body
    );
    Ok(())
}
