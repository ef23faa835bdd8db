//! `tidegate-lab`: one gateway with its XDP shield and one WireGuard client
//! in network namespaces, then a location run by Core whose users enrol and
//! log in with `tidegate-client`, narrated step by step. `cargo xtask lab`
//! runs it.
//!
//! It builds the topology, pings through the tunnel, fires malformed
//! datagrams at the WireGuard port, shows the gateway's counters before and
//! after, checks every drop was counted under its reason, and tears
//! everything down. Then Core, two HA gateways, two Edges behind nginx and
//! three users: each device is created without a key, enrolled with a
//! one-time token, logged in with a TOTP code, and pings through its
//! tunnel. Exit status 0 means every check held.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::Duration;

use std::net::IpAddr;
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use tidegate_tests::control::{GATEWAY_TUNNEL, LOCATION};
use tidegate_tests::gateway::WIREGUARD_COUNTERS;
use tidegate_tests::shield::{GATEWAY_UNDERLAY, WG_PORT};
use tidegate_tests::user_client::UserClient;
use tidegate_tests::{ControlLab, ControlOptions};
use tidegate_tests::{Counters, Netns, Shield, ShieldOptions, WgBackend, XdpMode};

/// Malformed datagrams per kind.
const PER_KIND: u32 = 100;
/// Echo requests per ping.
const PINGS: u32 = 5;
/// A UDP port on the gateway that the shield does not protect.
const OTHER_PORT: u16 = 9;
/// Datagrams sent to [`OTHER_PORT`].
const OTHER_DATAGRAMS: u32 = 20;
/// How long counters must stay put after reaching their target.
const SETTLE: Duration = Duration::from_millis(300);

const USAGE: &str = "usage: tidegate-lab [--xdp-mode auto|driver|generic]

Builds a client, a switch and a gateway in network namespaces, a WireGuard
tunnel between client and gateway, and starts tidegate-gateway with its XDP
shield on the gateway's interface; then pings through the tunnel, sends
malformed WireGuard datagrams and shows the counters. Needs root.
The binaries are taken from $TIDEGATE_BIN_DIR (set by `cargo xtask lab`),
else from the directory of this executable.";

fn main() -> ExitCode {
    let options = match parse_args(std::env::args().skip(1)) {
        Ok(Some(options)) => options,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(err) => {
            eprintln!("tidegate-lab: {err:#}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(&options) {
        Ok(()) => {
            println!(
                "\nlab passed: WireGuard through the shield, every malformed datagram dropped and counted; users enrolled and logged in with tidegate-client; clean teardown"
            );
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("\nlab failed: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Parses the command line; `None` means help was asked for.
fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Option<ShieldOptions>> {
    let mut options = ShieldOptions::default();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "-h" | "--help" => return Ok(None),
            "--xdp-mode" => {
                let value = args.next().context("--xdp-mode needs a value")?;
                options.xdp_mode = value.parse::<XdpMode>()?;
            }
            other => match other.strip_prefix("--xdp-mode=") {
                Some(value) => options.xdp_mode = value.parse::<XdpMode>()?,
                None => bail!("unknown argument {other:?}"),
            },
        }
    }
    Ok(Some(options))
}

/// Prints a step heading.
fn step(n: u32, title: &str) {
    println!("\n[{n}] {title}");
}

/// Prints a detail line under a step.
fn say(line: &str) {
    println!("    {line}");
}

/// Prints a multi-line block (a table) indented under a step.
fn block(text: &str) {
    for line in text.lines() {
        if line.trim().is_empty() {
            println!();
        } else {
            println!("      {line}");
        }
    }
}

/// The first line of a ping summary.
fn first_line(text: &str) -> &str {
    text.lines().next().unwrap_or_default()
}

fn run(options: &ShieldOptions) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("the lab needs root (namespaces, XDP): run `cargo xtask lab` as root");
    }

    step(
        1,
        "topology: client, switch and gateway namespaces on one segment",
    );
    let mut shield = Shield::build(options, &mut say)?;
    let names: Vec<String> = [
        shield.underlay().client(),
        shield.underlay().switch(),
        shield.underlay().gateway(),
    ]
    .iter()
    .map(|ns| ns.name().to_owned())
    .collect();
    let wg_pids: Vec<u32> = [shield.tunnel().client(), shield.tunnel().gateway()]
        .iter()
        .filter_map(|wg| wg.daemon().map(|p| p.pid()))
        .collect();

    step(2, "WireGuard and XDP");
    let backend = shield.wg_backend();
    say(&format!("WireGuard path: {backend}"));
    if backend == WgBackend::WireguardGo {
        say(&format!(
            "wireguard-go pids {wg_pids:?} (no WireGuard kernel module here)"
        ));
    }
    let start = shield.counters()?;
    let xdp = shield
        .gateway_xdp()?
        .context("the kernel shows no XDP program on the gateway's interface")?;
    say(&format!(
        "XDP shield attached to {} in {} mode (requested {}; kernel reports {} mode, program id {})",
        start.interface,
        start.xdp_mode,
        options.xdp_mode,
        xdp.mode,
        xdp.prog_id.map_or_else(|| "?".into(), |id| id.to_string())
    ));
    ensure!(
        start.xdp_mode == xdp.mode.as_str(),
        "the gateway reports {} mode but the kernel shows {}",
        start.xdp_mode,
        xdp.mode
    );
    say("counters before any traffic (tidectl counters):");
    block(&shield.counters_table()?);

    step(3, "ping through the tunnel");
    let before = shield.counters()?;
    let ping = shield.ping_tunnel(PINGS)?;
    say(&format!(
        "client -> 10.77.0.1: {}",
        first_line(&ping.summary)
    ));
    let after_ping = shield.counters()?;
    report_wireguard(&before, &after_ping)?;
    ensure!(
        after_ping.counter_growth(&before, "wg-transport")? >= u64::from(PINGS),
        "the shield counted fewer transport messages than echo requests"
    );
    ensure!(
        after_ping.total_growth(&before, "drop")? == 0,
        "the shield dropped packets of a clean ping"
    );

    step(4, "traffic that is not for the service passes untouched");
    shield.send_udp(OTHER_PORT, b"not for the shield", OTHER_DATAGRAMS)?;
    let underlay = shield.ping_underlay(3)?;
    say(&format!(
        "{OTHER_DATAGRAMS} UDP datagrams to {GATEWAY_UNDERLAY}:{OTHER_PORT}; ping {GATEWAY_UNDERLAY}: {}",
        first_line(&underlay.summary)
    ));
    let targets = BTreeMap::from([("not-service", u64::from(OTHER_DATAGRAMS))]);
    let after_other = shield.wait_for_growth(&after_ping, &targets)?;
    say(&format!(
        "not-service +{}, pass +{}, drop +{}",
        after_other.counter_growth(&after_ping, "not-service")?,
        after_other.total_growth(&after_ping, "pass")?,
        after_other.total_growth(&after_ping, "drop")?
    ));
    ensure!(
        after_other.total_growth(&after_ping, "drop")? == 0,
        "the shield dropped traffic that is not for the service"
    );

    step(
        5,
        &format!("malformed datagrams to {GATEWAY_UNDERLAY}:{WG_PORT}"),
    );
    let sent = shield.send_malformed(PER_KIND, &mut say)?;
    shield.wait_for_growth(&after_other, &sent)?;
    std::thread::sleep(SETTLE);
    let after_burst = shield.counters()?;
    let mut mismatches = Vec::new();
    for (counter, n) in &sent {
        let got = after_burst.counter_growth(&after_other, counter)?;
        say(&format!("{counter:<13} sent {n:>4}  counted +{got}"));
        if got != *n {
            mismatches.push(format!("{counter}: sent {n}, counted {got}"));
        }
    }
    let total_sent: u64 = sent.values().sum();
    let dropped = after_burst.total_growth(&after_other, "drop")?;
    say(&format!(
        "{:<13} sent {total_sent:>4}  counted +{dropped}",
        "drop (total)"
    ));
    ensure!(
        mismatches.is_empty(),
        "drop counters off: {}",
        mismatches.join("; ")
    );
    ensure!(
        dropped == total_sent,
        "drop total +{dropped}, sent {total_sent}"
    );

    step(6, "ping through the tunnel again");
    let ping = shield.ping_tunnel(PINGS)?;
    say(&format!(
        "client -> 10.77.0.1: {}",
        first_line(&ping.summary)
    ));
    let after_second = shield.counters()?;
    report_wireguard(&after_burst, &after_second)?;

    step(7, "counters after (tidectl counters)");
    block(&shield.counters_table()?);

    step(8, "teardown");
    let status = shield.stop_gateway()?;
    say(&format!("tidegate-gateway stopped with SIGTERM: {status}"));
    ensure!(status.success(), "tidegate-gateway exited with {status}");
    let left = shield.gateway_xdp()?;
    ensure!(
        left.is_none(),
        "XDP program still attached after exit: {left:?}"
    );
    say("XDP program detached");
    drop(shield);
    let listed = Netns::list()?;
    let survivors: Vec<&String> = names.iter().filter(|n| listed.contains(n)).collect();
    ensure!(
        survivors.is_empty(),
        "namespaces survived teardown: {survivors:?}"
    );
    let running: Vec<&u32> = wg_pids
        .iter()
        .filter(|pid| std::path::Path::new(&format!("/proc/{pid}")).exists())
        .collect();
    ensure!(
        running.is_empty(),
        "wireguard-go still running: pids {running:?}"
    );
    say(&format!(
        "namespaces {} removed{}",
        names.join(", "),
        if wg_pids.is_empty() {
            ""
        } else {
            ", wireguard-go stopped"
        }
    ));
    users()
}

/// The users of the lab's MFA location, one client namespace each.
const USERS: [&str; 3] = ["alice", "bob", "carol"];

/// A location run by Core, with Edges behind nginx, and users whose
/// `tidegate-client` enrols with a token and logs in with a TOTP code.
fn users() -> Result<()> {
    step(
        9,
        "a location with Core: 2 HA gateways, 2 Edges behind nginx (HTTPS), Core in its own namespace",
    );
    let started = Instant::now();
    let lab = ControlLab::build(&ControlOptions {
        mfa_threshold_s: Some(300),
        clients: USERS.len(),
        ..ControlOptions::default()
    })?;
    let listening = lab.intranet().exec_ok("ss", &["-Htln"])?;
    ensure!(listening.trim().is_empty(), "Core listens: {listening}");
    say(&format!(
        "built in {} ms; Core listens on no port and dials the gateways and Edges; users reach {}",
        started.elapsed().as_millis(),
        lab.edge_url()
    ));
    let names: Vec<String> = [lab.intranet(), lab.dmz(), lab.client()]
        .iter()
        .map(|ns| ns.name().to_owned())
        .collect();

    step(
        10,
        "users enrol: a device without a key, a one-time token, the key made by the client",
    );
    let mut clients = Vec::new();
    for (k, user) in USERS.iter().enumerate() {
        let netns = if k == 0 {
            lab.client()
        } else {
            lab.other_client(k + 1)
        };
        let core = lab.core()?;
        let created = core.tidectl_json(&["user", "create", user])?;
        let secret = created["totp_secret"]
            .as_str()
            .context("no TOTP secret printed")?
            .to_owned();
        let device = format!("{user}-laptop");
        core.tidectl_ok(&[
            "device",
            "create",
            &device,
            "--user",
            user,
            "--location",
            LOCATION,
        ])?;
        let token = core.tidectl_json(&["device", "token", &device])?;
        let token = token["token"].as_str().context("no token")?.to_owned();
        let client = UserClient::new(netns, &lab.dir().join(format!("client-{user}")))?;
        let name = lab.run().ifname(&format!("u{k}"));
        let at = Instant::now();
        client.enrol(&lab.edge_url(), &token, lab.web_ca(), &name)?;
        let key = core.tidectl_json(&["device", "show", &device])?["public_key"].clone();
        say(&format!(
            "{user}: tidegate-client enrol {} <token>: {} ms; Core holds its public key {}",
            lab.edge_url(),
            at.elapsed().as_millis(),
            key.as_str().unwrap_or("?")
        ));
        clients.push((user, netns, client, name, secret));
    }

    step(
        11,
        "MFA logins (codes from oathtool, as an authenticator app) and tunnels",
    );
    for (user, netns, client, name, secret) in &mut clients {
        let at = Instant::now();
        client.up(
            name,
            &["--code-command", &format!("oathtool --totp -b {secret}")],
        )?;
        let up_ms = at.elapsed().as_millis();
        let ping = netns.ping(IpAddr::V4(GATEWAY_TUNNEL), PINGS)?;
        ensure!(
            ping.received == PINGS,
            "{user}'s tunnel: {}",
            first_line(&ping.summary)
        );
        let status = client.status(name)?;
        say(&format!(
            "{user}: logged in and up in {up_ms} ms ({}); session {}; ping {}",
            status["backend"].as_str().unwrap_or("?"),
            status["session"]["state"].as_str().unwrap_or("?"),
            first_line(&ping.summary)
        ));
    }

    step(12, "Core's view (tidectl location status)");
    let status = lab.core()?.location_status(LOCATION)?;
    ensure!(
        status["mfa_sessions"] == USERS.len(),
        "MFA sessions: {status}"
    );
    say(&format!("MFA sessions: {}", status["mfa_sessions"]));
    for gateway in status["gateways"].as_array().into_iter().flatten() {
        say(&format!(
            "{}: link {}, {}, {} peers",
            gateway["name"].as_str().unwrap_or("?"),
            if gateway["connected"] == true {
                "up"
            } else {
                "down"
            },
            gateway["role"].as_str().unwrap_or("?"),
            gateway["peers"]
        ));
    }

    step(13, "teardown");
    for (user, _, client, name, _) in &mut clients {
        client.down(name)?;
        say(&format!("{user}: tidegate-client down"));
    }
    drop(clients);
    drop(lab);
    let listed = Netns::list()?;
    let survivors: Vec<&String> = names.iter().filter(|n| listed.contains(n)).collect();
    ensure!(
        survivors.is_empty(),
        "namespaces survived teardown: {survivors:?}"
    );
    say("every namespace and process of the location removed");
    Ok(())
}

/// Prints how the WireGuard counters grew between two readings.
fn report_wireguard(before: &Counters, after: &Counters) -> Result<()> {
    let mut parts = Vec::new();
    for name in WIREGUARD_COUNTERS {
        parts.push(format!("{name} +{}", after.counter_growth(before, name)?));
    }
    say(&format!(
        "passed WireGuard +{} ({})",
        after.total_growth(before, "wireguard")?,
        parts.join(", ")
    ));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Option<ShieldOptions>> {
        parse_args(args.iter().map(|s| (*s).to_owned()))
    }

    #[test]
    fn parses_xdp_mode() {
        assert_eq!(parse(&[]).unwrap().unwrap().xdp_mode, XdpMode::Auto);
        assert_eq!(
            parse(&["--xdp-mode", "generic"]).unwrap().unwrap().xdp_mode,
            XdpMode::Generic
        );
        assert_eq!(
            parse(&["--xdp-mode=driver"]).unwrap().unwrap().xdp_mode,
            XdpMode::Driver
        );
        assert!(parse(&["--help"]).unwrap().is_none());
    }

    #[test]
    fn rejects_bad_arguments() {
        assert!(parse(&["--xdp-mode"]).is_err());
        assert!(parse(&["--xdp-mode", "native"]).is_err());
        assert!(parse(&["--verbose"]).is_err());
    }
}
