//! The user's client against the real location: Core in its intranet,
//! Edges behind nginx over HTTPS, HA gateways, and `tidegate-client` in a
//! client namespace. The operator creates a device without a key and
//! hands out a token; the client enrols with a key it makes, logs in with
//! a code computed by oathtool as an authenticator app would, and pings
//! through its tunnel. Refusals (a used token, a wrong code, Core away)
//! leave nothing configured; a session Core ends by its age is renewed
//! before the end without a gap, while a client that cannot renew loses
//! it; a gateway crash does not ask for a new login. Enrolments in flight
//! when an Edge is killed are tried again and none is lost.

use std::net::IpAddr;
use std::os::unix::fs::MetadataExt as _;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use nix::sys::signal::Signal;
use tidegate_tests::control::{GATEWAY_TUNNEL, LOCATION};
use tidegate_tests::resolvconf;
use tidegate_tests::user_client::UserClient;
use tidegate_tests::{ControlLab, ControlOptions, Probe, poll_until, require_root};

const WAIT: Duration = Duration::from_secs(30);

/// Creates user `user` and a device `device` awaiting enrolment; returns
/// the user's TOTP secret (base32) and a one-time token for the device.
fn new_device(lab: &ControlLab, user: &str, device: &str) -> Result<(String, String)> {
    let core = lab.core()?;
    let created = core.tidectl_json(&["user", "create", user])?;
    let secret = created["totp_secret"]
        .as_str()
        .context("no TOTP secret printed")?
        .to_owned();
    core.tidectl_ok(&[
        "device",
        "create",
        device,
        "--user",
        user,
        "--location",
        LOCATION,
    ])?;
    let token = core.tidectl_json(&["device", "token", device])?;
    let token = token["token"].as_str().context("no token")?.to_owned();
    Ok((secret, token))
}

/// The code command an authenticator would stand in for.
fn oathtool(secret: &str) -> String {
    format!("oathtool --totp -b {secret}")
}

/// The interfaces of a namespace.
fn has_link(lab_ns: &tidegate_tests::netns::Netns, name: &str) -> Result<bool> {
    Ok(lab_ns
        .ip(&["-o", "link", "show"])?
        .lines()
        .any(|l| l.split(':').nth(1).is_some_and(|n| n.trim() == name)))
}

/// Checks that a refused `up` left nothing: no interface, no record.
fn nothing_configured(lab: &ControlLab, client: &UserClient, name: &str) -> Result<()> {
    ensure!(
        !has_link(lab.client(), name)?,
        "interface {name} left behind"
    );
    let status = client.status(name)?;
    ensure!(status["up"] == false, "{status}");
    Ok(())
}

/// `up` on a location without MFA: the tunnel on kernel WireGuard where
/// the kernel has it (the kernel suite's VMs), else wireguard-go, and
/// pings through it. The client's status.
fn up_without_login(
    lab: &ControlLab,
    client: &mut UserClient,
    name: &str,
) -> Result<serde_json::Value> {
    client.up(name, &[])?;
    let status = client.status(name)?;
    let kernel = Path::new("/sys/module/wireguard").exists();
    ensure!(
        status["backend"] == if kernel { "kernel" } else { "wireguard-go" },
        "{status}"
    );
    let ping = lab.client().ping(IpAddr::V4(GATEWAY_TUNNEL), 3)?;
    ensure!(ping.received == 3, "through the tunnel: {}", ping.summary);
    Ok(status)
}

fn device_json(lab: &ControlLab, device: &str) -> Result<serde_json::Value> {
    lab.core()?.tidectl_json(&["device", "show", device])
}

#[test]
fn a_user_enrols_logs_in_and_keeps_the_tunnel_through_refusals_and_a_gateway_crash() -> Result<()> {
    require_root();
    let mut lab = ControlLab::build(&ControlOptions {
        mfa_threshold_s: Some(120),
        ..ControlOptions::default()
    })?;
    let (secret, token) = new_device(&lab, "alice", "laptop")?;
    let awaiting = device_json(&lab, "laptop")?;
    ensure!(
        awaiting["public_key"]
            .as_str()
            .unwrap_or_default()
            .is_empty(),
        "a device created without a key has one: {awaiting}"
    );
    let mut client = UserClient::new(lab.client(), &lab.dir().join("user-client"))?;
    let url = lab.edge_url();
    // Interface names, and wireguard-go's sockets, are the host's: one per run.
    let name = lab.run().ifname("u");
    let name = name.as_str();

    // Enrolment: the key is made here, Core gets its public half.
    let out = client.enrol(&url, &token, lab.web_ca(), name)?;
    ensure!(out.contains("enrolled device laptop"), "{out}");
    let profile_path = client.profiles().join(format!("{name}.json"));
    ensure!(
        std::fs::metadata(&profile_path)?.mode() & 0o777 == 0o600,
        "the profile is readable by others"
    );
    let profile: serde_json::Value = serde_json::from_slice(&std::fs::read(&profile_path)?)?;
    let private: tidegate_wireguard::Key = profile["private_key"]
        .as_str()
        .context("no private key in the profile")?
        .parse()?;
    let enrolled = device_json(&lab, "laptop")?;
    ensure!(
        enrolled["public_key"] == private.public().to_string(),
        "Core's key {} is not the client's",
        enrolled["public_key"]
    );
    ensure!(profile["config"]["mfa"] == true, "{profile}");

    // The token worked once.
    let again = client.run(&[
        "enrol",
        &url,
        &token,
        "--ca-file",
        &lab.web_ca().to_string_lossy(),
        "--name",
        "again",
    ])?;
    ensure!(again.status.code() == Some(3), "a used token: {again:?}");
    ensure!(again.stderr.contains("used already"), "{}", again.stderr);

    // A wrong code: exit 3, nothing configured.
    let wrong = client.run(&["up", name, "--code", "000000"])?;
    ensure!(wrong.status.code() == Some(3), "a wrong code: {wrong:?}");
    ensure!(wrong.stderr.contains("MFA login"), "{}", wrong.stderr);
    nothing_configured(&lab, &client, name)?;

    // Core away during `up`: exit 6, a clear message, nothing configured.
    lab.core_mut()?.kill()?;
    for j in 1..=2 {
        lab.edge_mut(j).wait_health(503, WAIT)?;
    }
    let away = client.run(&["up", name, "--code-command", &oathtool(&secret)])?;
    ensure!(away.status.code() == Some(6), "Core away: {away:?}");
    ensure!(away.stderr.contains("Core"), "{}", away.stderr);
    nothing_configured(&lab, &client, name)?;
    lab.core_mut()?.restart()?;
    lab.core_mut()?.wait_applied(LOCATION, WAIT)?;
    lab.core_mut()?.wait_edges(WAIT)?;

    // The login and the tunnel.
    client.up(name, &["--code-command", &oathtool(&secret)])?;
    let ping = lab.client().ping(IpAddr::V4(GATEWAY_TUNNEL), 3)?;
    ensure!(ping.received == 3, "through the tunnel: {}", ping.summary);
    let status = client.status(name)?;
    ensure!(
        status["session"]["state"] == "open" && status["last_handshake_age_s"].is_u64(),
        "{status}"
    );
    let since = device_json(&lab, "laptop")?["mfa_session_since_unix_ms"].clone();
    ensure!(since.as_i64().is_some_and(|s| s > 0), "no session: {since}");

    // The master crashes: the tunnel comes back on the other gateway with
    // the same session, no new login.
    let master = lab.wait_master(WAIT)?;
    let public = lab.run().ifname(&format!("g{master}"));
    let gateway = lab.gateway_mut(master);
    gateway.daemon.kill()?;
    gateway.netns.ip(&["link", "set", &public, "down"])?;
    poll_until(
        "the tunnel to answer after the crash",
        WAIT,
        Duration::from_millis(200),
        || {
            Ok(if lab.client().ping_once(IpAddr::V4(GATEWAY_TUNNEL))? {
                Probe::Ready(())
            } else {
                Probe::NotYet("no reply".into())
            })
        },
    )?;
    let after = device_json(&lab, "laptop")?["mfa_session_since_unix_ms"].clone();
    ensure!(
        after == since,
        "a new login: session since {since}, now {after}"
    );
    ensure!(
        client.status(name)?["session"]["logged_in_unix_ms"]
            == status["session"]["logged_in_unix_ms"],
        "the client logged in again"
    );

    // Down: the interface and the record go, the keeper exits.
    let out = client.down(name)?;
    ensure!(out.contains(&format!("{name} is down")), "{out}");
    nothing_configured(&lab, &client, name)?;
    ensure!(
        client.up_log(name).contains(&format!("{name} is down")),
        "{}",
        client.up_log(name)
    );
    Ok(())
}

#[test]
fn a_session_core_ends_by_its_age_is_renewed_in_time_and_lost_without_renewal() -> Result<()> {
    require_root();
    let session_s = 60;
    let lab = ControlLab::build(&ControlOptions {
        gateways: 1,
        edges: 1,
        clients: 2,
        mfa_threshold_s: Some(600),
        mfa_session_s: Some(session_s),
        ..ControlOptions::default()
    })?;
    let (secret, token) = new_device(&lab, "alice", "laptop")?;
    let (other_secret, other_token) = new_device(&lab, "bob", "phone")?;
    let mut renewing = UserClient::new(lab.client(), &lab.dir().join("renewing"))?;
    let mut lapsing = UserClient::new(lab.other_client(2), &lab.dir().join("lapsing"))?;
    let url = lab.edge_url();
    let (name, other) = (lab.run().ifname("u"), lab.run().ifname("u2"));
    let (name, other) = (name.as_str(), other.as_str());
    renewing.enrol(&url, &token, lab.web_ca(), name)?;
    lapsing.enrol(&url, &other_token, lab.web_ca(), other)?;

    // One renews with a code command; the other had one code only.
    renewing.up(name, &["--code-command", &oathtool(&secret)])?;
    let first = renewing.status(name)?;
    ensure!(
        first["session"]["state"] == "active"
            && first["session"]["expires_in_s"]
                .as_u64()
                .is_some_and(|s| s <= u64::from(session_s)),
        "{first}"
    );
    let code = lab
        .other_client(2)
        .exec_ok("sh", &["-c", &oathtool(&other_secret)])?;
    lapsing.up(other, &["--code", code.trim()])?;
    ensure!(
        lapsing.up_log(other).contains("cannot be renewed"),
        "{}",
        lapsing.up_log(other)
    );

    // Past the session's end: the renewing tunnel never stops; the other
    // is cut when Core ends its session.
    let interval = Duration::from_millis(200);
    let steady =
        lab.client()
            .start_ping(IpAddr::V4(GATEWAY_TUNNEL), interval, Duration::from_secs(1))?;
    std::thread::sleep(Duration::from_secs(u64::from(session_s) + 15));
    let report = steady.finish()?;
    ensure!(
        report.transmitted > 300 && report.lost() <= 2,
        "the renewing tunnel lost pings: {}",
        report.summary
    );
    let renewed = renewing.status(name)?;
    ensure!(
        renewed["session"]["logged_in_unix_ms"].as_u64()
            > first["session"]["logged_in_unix_ms"].as_u64(),
        "no renewal: {renewed}"
    );
    ensure!(
        renewing.up_log(name).contains("renewed the MFA session"),
        "{}",
        renewing.up_log(name)
    );
    let cut = lab.other_client(2).ping_paced(
        IpAddr::V4(GATEWAY_TUNNEL),
        3,
        interval,
        Duration::from_secs(1),
    )?;
    ensure!(
        cut.received == 0,
        "the lapsed tunnel still carries: {}",
        cut.summary
    );
    let phone = device_json(&lab, "phone")?;
    ensure!(
        phone["mfa_session"] != true,
        "the lapsed session is on: {phone}"
    );
    let lapsed = lapsing.status(other)?;
    ensure!(lapsed["session"]["state"] == "expired", "{lapsed}");
    let events = lab.core()?.tidectl_json(&["events", "--limit", "1000"])?;
    let ended: Vec<&serde_json::Value> = events["events"]
        .as_array()
        .map(|list| {
            list.iter()
                .filter(|e| e["kind"] == "mfa-session-ended")
                .collect()
        })
        .unwrap_or_default();
    ensure!(
        ended.len() == 1 && ended[0].to_string().contains("phone"),
        "one session ended by its age, the phone's: {ended:?}"
    );
    Ok(())
}

#[test]
fn without_mfa_the_client_and_stock_wg_quick_route_everything_through_the_tunnel() -> Result<()> {
    require_root();
    let lab = ControlLab::build(&ControlOptions {
        gateways: 1,
        edges: 1,
        clients: 2,
        allowed_ips: vec!["0.0.0.0/0".into()],
        mtu: Some(1380),
        ..ControlOptions::default()
    })?;
    let (_, token) = new_device(&lab, "carol", "laptop")?;
    let mut client = UserClient::new(lab.client(), &lab.dir().join("user-client"))?;
    let name = lab.run().ifname("u");
    let name = name.as_str();
    client.enrol(&lab.edge_url(), &token, lab.web_ca(), name)?;

    // No login on a location without MFA; everything goes through the
    // tunnel but the tunnel's own packets, which the mark sends around it.
    let status = up_without_login(&lab, &mut client, name)?;
    ensure!(status["session"].is_null(), "{status}");
    let link = lab.client().ip(&["link", "show", name])?;
    ensure!(link.contains("mtu 1380"), "not the location's MTU: {link}");
    let rules = lab.client().ip(&["-4", "rule", "show"])?;
    ensure!(
        rules.contains("not from all fwmark 0xca6c lookup 51820")
            && rules.contains("from all lookup main suppress_prefixlength 0"),
        "{rules}"
    );
    let route = lab.client().ip(&["-4", "route", "get", "203.0.113.9"])?;
    ensure!(
        route.contains(&format!("dev {name} table 51820")),
        "{route}"
    );
    let around = lab
        .client()
        .ip(&["-4", "route", "get", "198.51.100.100", "mark", "51820"])?;
    ensure!(
        !around.contains("dev lab"),
        "the endpoint through the tunnel: {around}"
    );
    // A keeper killed outright leaves the tunnel; `down` undoes it from
    // the record.
    client.keeper(name).context("no keeper")?.kill()?;
    ensure!(
        has_link(lab.client(), name)?,
        "the interface went with the keeper"
    );
    client.down(name)?;
    let rules = lab.client().ip(&["-4", "rule", "show"])?;
    ensure!(!rules.contains("51820"), "rules left behind: {rules}");
    ensure!(!has_link(lab.client(), name)?, "the interface is left");

    // A stock app's config, its key made by tidectl and shown once.
    let core = lab.core()?;
    core.tidectl_ok(&[
        "device",
        "create",
        "tablet",
        "--user",
        "carol",
        "--location",
        LOCATION,
    ])?;
    let conf = core.tidectl_ok(&["device", "config", "tablet", "--wg-quick", "--new-key"])?;
    ensure!(
        conf.contains("[Interface]")
            && conf.contains("PrivateKey = ")
            && conf.contains("AllowedIPs = 0.0.0.0/0"),
        "{conf}"
    );
    let qr = core.tidectl_ok(&["device", "config", "tablet", "--qr", "--new-key"])?;
    ensure!(
        qr.lines().count() > 10 && !qr.contains("PrivateKey"),
        "{qr}"
    );
    // The QR code's key replaced the first: this config is the one in force.
    let conf = core.tidectl_ok(&["device", "config", "tablet", "--wg-quick", "--new-key"])?;
    // wg-quick names the interface after the file.
    let path = lab.dir().join(format!("{}.conf", lab.run().ifname("q")));
    std::fs::write(&path, &conf)?;
    let path = path.to_string_lossy().into_owned();
    let tablet = lab.other_client(2);
    tablet.exec_ok("wg-quick", &["up", &path])?;
    let ping = tablet.ping(IpAddr::V4(GATEWAY_TUNNEL), 3);
    let down = tablet.exec_ok("wg-quick", &["down", &path]);
    let ping = ping?;
    down?;
    ensure!(ping.received == 3, "stock wg-quick: {}", ping.summary);
    Ok(())
}

#[test]
#[ignore = "installs Debian's resolvconf into /etc and /usr: runs in the kernel suite's VMs"]
fn the_locations_dns_servers_go_to_resolvconf_while_the_tunnel_is_up() -> Result<()> {
    require_root();
    let server = GATEWAY_TUNNEL.to_string();
    // A full tunnel too: in the VMs this test is the client's on kernel
    // WireGuard, its routing and its DNS at once.
    let lab = ControlLab::build(&ControlOptions {
        gateways: 1,
        edges: 1,
        dns: vec![server.clone()],
        allowed_ips: vec!["0.0.0.0/0".into()],
        ..ControlOptions::default()
    })?;
    resolvconf::install(lab.dir())?;
    let (_, token) = new_device(&lab, "dave", "laptop")?;
    let mut client = UserClient::new(lab.client(), &lab.dir().join("user-client"))?;
    let name = lab.run().ifname("u");
    let name = name.as_str();
    client.enrol(&lab.edge_url(), &token, lab.web_ca(), name)?;
    let record = resolvconf::record(&format!("tun.{name}"));
    let line = format!("nameserver {server}");

    up_without_login(&lab, &mut client, name)?;
    let rules = lab.client().ip(&["-4", "rule", "show"])?;
    ensure!(
        rules.contains("not from all fwmark 0xca6c lookup 51820"),
        "{rules}"
    );
    let conf = resolvconf::read()?;
    ensure!(
        conf.contains(&line),
        "{} without {line}:\n{conf}",
        resolvconf::RESOLV_CONF
    );
    ensure!(record.exists(), "no record {}", record.display());

    client.down(name)?;
    let conf = resolvconf::read()?;
    ensure!(
        !conf.contains(&line),
        "{line} left in {}:\n{conf}",
        resolvconf::RESOLV_CONF
    );
    ensure!(!record.exists(), "record {} left", record.display());
    let rules = lab.client().ip(&["-4", "rule", "show"])?;
    ensure!(!rules.contains("51820"), "rules left behind: {rules}");
    Ok(())
}

#[test]
fn enrolments_in_flight_survive_an_edge_killed_under_them() -> Result<()> {
    require_root();
    const DEVICES: usize = 8;
    let mut lab = ControlLab::build(&ControlOptions {
        gateways: 1,
        clients: DEVICES,
        ..ControlOptions::default()
    })?;
    let core = lab.core()?;
    core.tidectl_json(&["user", "create", "dave"])?;
    let mut tokens = Vec::new();
    for k in 1..=DEVICES {
        let device = format!("dev{k}");
        core.tidectl_ok(&[
            "device",
            "create",
            &device,
            "--user",
            "dave",
            "--location",
            LOCATION,
        ])?;
        let token = core.tidectl_json(&["device", "token", &device])?;
        tokens.push(token["token"].as_str().context("no token")?.to_owned());
    }
    let clients = (1..=DEVICES)
        .map(|k| {
            let netns = if k == 1 {
                lab.client()
            } else {
                lab.other_client(k)
            };
            UserClient::new(netns, &lab.dir().join(format!("client{k}")))
        })
        .collect::<Result<Vec<_>>>()?;

    // Core uses a token and stores the key, then holds the answer until
    // the location's gateways have the peer: with the gateway frozen, every
    // answer waits in Core, its token used, until the Edge is killed.
    lab.gateway_mut(1).daemon.signal(Signal::SIGSTOP)?;
    let url = lab.edge_url();
    let mut enrols = Vec::new();
    for (k, (client, token)) in clients.iter().zip(&tokens).enumerate() {
        enrols.push(client.spawn_enrol(&url, token, lab.web_ca(), &format!("dev{}", k + 1))?);
    }
    let keys = |lab: &ControlLab| -> Result<Vec<String>> {
        let list = lab.core()?.tidectl_json(&["device", "list"])?;
        let devices = list["devices"].as_array().context("no devices")?;
        Ok(devices
            .iter()
            .filter_map(|d| d["public_key"].as_str())
            .filter(|k| !k.is_empty())
            .map(str::to_owned)
            .collect())
    };
    let stored = poll_until(
        "Core to store every key",
        Duration::from_secs(8),
        Duration::from_millis(100),
        || {
            let keys = keys(&lab)?;
            Ok(if keys.len() == DEVICES {
                Probe::Ready(keys)
            } else {
                Probe::NotYet(format!("{} keys", keys.len()))
            })
        },
    );
    // Whatever happened, the gateway runs again before the test goes on.
    let killed = stored.and_then(|_| lab.edge_mut(1).kill());
    lab.gateway_mut(1).daemon.signal(Signal::SIGCONT)?;
    killed?;

    // Every enrolment ends well: those whose answer went down with Edge 1
    // got a 502 from nginx, tried again through Edge 2, and Core answered
    // them again as the key their token enrolled.
    let ended = poll_until(
        "every enrolment to end",
        Duration::from_secs(60),
        Duration::from_millis(100),
        || {
            let mut running = 0;
            for enrol in &mut enrols {
                if enrol.try_status()?.is_none() {
                    running += 1;
                }
            }
            Ok(if running == 0 {
                Probe::Ready(())
            } else {
                Probe::NotYet(format!("{running} running"))
            })
        },
    );
    let logs: Vec<String> = enrols.iter().map(|e| e.log()).collect();
    ended.with_context(|| logs.join("\n---\n"))?;
    let mut retried = 0;
    for (k, (enrol, client)) in enrols.iter_mut().zip(&clients).enumerate() {
        let device = format!("dev{}", k + 1);
        let log = enrol.log();
        let status = enrol.try_status()?.context("still running")?;
        ensure!(
            status.success(),
            "{device}'s enrolment failed ({status}):\n{log}"
        );
        ensure!(log.contains(&format!("enrolled device {device}")), "{log}");
        if log.contains("trying again") {
            ensure!(log.contains("bad gateway (502)"), "{log}");
            retried += 1;
        }
        let profile: serde_json::Value = serde_json::from_slice(&std::fs::read(
            client.profiles().join(format!("{device}.json")),
        )?)?;
        let private: tidegate_wireguard::Key = profile["private_key"]
            .as_str()
            .context("no private key in the profile")?
            .parse()?;
        let held = device_json(&lab, &device)?;
        ensure!(
            held["public_key"] == private.public().to_string(),
            "Core holds {} for {device}, not the client's key",
            held["public_key"]
        );
    }
    // nginx spreads the eight over both Edges: Edge 1 had some in flight.
    ensure!(retried > 0, "no enrolment was in flight on Edge 1");
    println!("{retried} of {DEVICES} enrolments went down with Edge 1 and were tried again");
    let answered_again = lab
        .core()?
        .log()
        .matches("device config answered again")
        .count();
    ensure!(
        answered_again == retried,
        "Core answered {answered_again} retried enrolments, the clients retried {retried}"
    );
    Ok(())
}
