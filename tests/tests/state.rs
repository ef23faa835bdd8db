//! The gateway's state file under stress, and MFA removals that must reach
//! Core. A full disk fails closed: Core's removals and MFA expiry still
//! take peers off the device, the daemon says the state is unsaved, and
//! the file catches up once space is free. A removal is sent with every
//! status until Core acknowledges it: one lost with the link (Core frozen,
//! then killed) is sent again after Core comes back and ends the session
//! there, and a gateway restarted before the acknowledgement sends it too.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, ensure};
use base64::{Engine as _, engine::general_purpose::STANDARD};
use nix::sys::signal::Signal;
use serde_json::{Value, json};
use tidegate_core::totp;
use tidegate_proto::gateway::v1 as pb;
use tidegate_tests::control::{GATEWAY_TUNNEL as LAB_TUNNEL, LOCATION};
use tidegate_tests::location::{GATEWAY_TUNNEL, Location, LocationOptions};
use tidegate_tests::scripted_core::{GatewayLink, channel, peer};
use tidegate_tests::shield::WG_PORT;
use tidegate_tests::{
    CertFiles, ControlLab, ControlOptions, CoreSection, KeyPair, Probe, TestPki, poll_until,
    require_root,
};

const CORE_LISTEN: &str = "127.0.0.1:7443";
const WAIT: Duration = Duration::from_secs(20);

/// A base64 key's bytes.
fn key(text: &str) -> Vec<u8> {
    STANDARD.decode(text).unwrap()
}
/// Core's MFA peer-disconnect threshold in the full-disk test.
const THRESHOLD_S: u32 = 4;

fn open(
    runtime: &tokio::runtime::Runtime,
    location: &Location,
    core: &CertFiles,
) -> Result<GatewayLink> {
    let addr: SocketAddr = CORE_LISTEN.parse()?;
    let channel = location
        .gateway()
        .run(|| runtime.block_on(channel(addr, core, "gw-a")))??;
    let mut link = runtime
        .block_on(GatewayLink::open(channel))
        .map_err(|status| anyhow::anyhow!("opening the Link: {status}"))?;
    let first = runtime.block_on(link.next(false, WAIT))?;
    ensure!(
        matches!(first, pb::gateway_message::Msg::Hello(_)),
        "the first message is not Hello: {first:?}"
    );
    Ok(link)
}

/// The state file as JSON.
fn state_file(dir: &Path, interface: &str) -> Result<Value> {
    let path = dir.join(format!("wireguard-{interface}.json"));
    let text = std::fs::read_to_string(&path).with_context(|| format!("{}", path.display()))?;
    Ok(serde_json::from_str(&text)?)
}

/// The next status that carries removals, and their seqs and keys.
fn status_removals(
    runtime: &tokio::runtime::Runtime,
    link: &mut GatewayLink,
) -> Result<Vec<(u64, Vec<u8>)>> {
    runtime.block_on(async {
        loop {
            let status = link.status(WAIT).await?;
            if !status.removals.is_empty() {
                return anyhow::Ok(
                    status
                        .removals
                        .into_iter()
                        .map(|r| (r.seq, r.public_key))
                        .collect(),
                );
            }
        }
    })
}

#[test]
fn a_full_disk_fails_closed_and_the_state_file_catches_up() -> Result<()> {
    require_root();
    let pki_dir = tempfile::tempdir()?;
    let pki = TestPki::new(pki_dir.path(), "pki")?;
    let core = pki.issue("core")?;
    let mut section = CoreSection::new(CORE_LISTEN.parse()?, "gw-a", pki.issue("gw-a")?);
    section.status_interval_ms = Some(300);
    let mut location = Location::build(&LocationOptions {
        clients: 1,
        core: Some(section),
        state_tmpfs_bytes: Some(1 << 20),
        ..LocationOptions::default()
    })?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let interface = location.wg_interface().to_owned();
    let state_dir = location
        .state_mount()
        .context("no state tmpfs")?
        .path()
        .to_owned();
    let mut link = open(&runtime, &location, &core)?;

    // An MFA location: the client's peer, and a silent one MFA expires
    // THRESHOLD_S after it was added.
    let client_key = location.client(0).public_key().to_owned();
    let silent = KeyPair::generate()?.public;
    let config = pb::LocationConfig {
        version: 1,
        location_id: 7,
        location_name: "lab".into(),
        interface: Some(pb::WireguardInterface {
            private_key: key(location.gateway_private_key()),
            listen_port: u32::from(WG_PORT),
            addresses: vec![format!("{GATEWAY_TUNNEL}/24")],
            mtu: 0,
        }),
        mfa: true,
        peer_disconnect_threshold_s: THRESHOLD_S,
        peers: vec![
            peer(&client_key, &format!("{}/32", location.client(0).tunnel())),
            peer(&silent, "10.77.0.50/32"),
        ],
    };
    runtime.block_on(link.send(pb::core_message::Msg::Config(config)))?;
    let applied = runtime.block_on(link.applied(WAIT))?;
    ensure!(applied.error.is_empty(), "{applied:?}");
    ensure!(state_file(&state_dir, &interface)?["location"]["version"] == 1);
    location.wait_peers("both peers on the device", WAIT, |p| p.peers.len() == 2)?;

    // The disk fills up; Core disables the client's device.
    let filled = location.state_mount().context("no state tmpfs")?.fill()?;
    eprintln!("state tmpfs full after {filled} bytes");
    runtime.block_on(link.send(pb::core_message::Msg::Changes(pb::PeerChanges {
        base_version: 1,
        version: 2,
        upsert: Vec::new(),
        remove: vec![key(&client_key)],
    })))?;
    let applied = runtime.block_on(link.applied(WAIT))?;
    ensure!(
        applied.version == 2 && applied.error.is_empty(),
        "Core's removal must land on a full disk: {applied:?}"
    );
    // Then MFA expires the silent peer: both gone from the device.
    let peers = location.wait_peers("both peers off the device", WAIT, |p| p.peers.is_empty())?;
    let unsaved = peers
        .state_unsaved
        .context("tidectl peers does not say the state is unsaved")?;
    ensure!(
        unsaved.contains(&format!("wireguard-{interface}.json"))
            && unsaved.contains("No space left on device"),
        "{unsaved}"
    );
    let table = location.daemon_mut().tidectl_ok(&["peers"])?;
    ensure!(table.contains("state-unsaved: "), "{table}");
    location
        .daemon_mut()
        .wait_for_log("the state file cannot be written", 0, WAIT)?;
    poll_until(
        "the device to drop both peers",
        WAIT,
        Duration::from_millis(100),
        || {
            let wg = location.wg_dump()?;
            Ok(if wg.contains(&client_key) || wg.contains(&silent) {
                Probe::NotYet(wg)
            } else {
                Probe::Ready(())
            })
        },
    )?;
    // The file is behind: it still holds version 1 and both peers.
    let on_disk = state_file(&state_dir, &interface)?;
    ensure!(on_disk["location"]["version"] == 1, "{on_disk}");
    // A peer only the file would remember is refused while it cannot be
    // written.
    let refused = location.daemon().tidectl(&[
        "peer",
        "add",
        "--public-key",
        &KeyPair::generate()?.public,
        "--allowed-ips",
        "10.77.0.60/32",
    ])?;
    ensure!(
        !refused.status.success() && refused.stderr.contains("state file cannot be written"),
        "{refused:?}"
    );

    // Space again: the file catches up on its own with the state in force.
    location.state_mount().context("no state tmpfs")?.free()?;
    let silent_b64 = silent.clone();
    let caught_up = poll_until(
        "the state file to catch up",
        WAIT,
        Duration::from_millis(200),
        || {
            let state = state_file(&state_dir, &interface)?;
            let expired = state["expired_location_peers"]
                .as_object()
                .is_some_and(|m| m.contains_key(&silent_b64));
            let peers = state["location"]["peers"].as_object().map(|m| m.len());
            Ok(
                if state["location"]["version"] == 2 && expired && peers == Some(0) {
                    Probe::Ready(state)
                } else {
                    Probe::NotYet(state.to_string())
                },
            )
        },
    )?;
    ensure!(
        caught_up["removals"][0]["public_key"] == silent.as_str(),
        "{caught_up}"
    );
    location.wait_peers("the unsaved state to clear", WAIT, |p| {
        p.state_unsaved.is_none()
    })?;

    // The removal goes to Core with every status until acknowledged, also
    // after a restart.
    let sent = status_removals(&runtime, &mut link)?;
    ensure!(sent.len() == 1 && sent[0].1 == key(&silent), "{sent:?}");
    let again = status_removals(&runtime, &mut link)?;
    ensure!(again == sent, "{again:?} after {sent:?}");
    drop(link);
    location.daemon_mut().kill()?;
    location.restart_daemon()?;
    let mut link = open(&runtime, &location, &core)?;
    let after_restart = status_removals(&runtime, &mut link)?;
    ensure!(after_restart == sent, "{after_restart:?} after {sent:?}");
    let seq = sent[0].0;
    ensure!(seq > 0, "removals must be numbered: {sent:?}");
    runtime.block_on(
        link.send(pb::core_message::Msg::RemovalsAcked(pb::RemovalsAcked {
            through_seq: seq,
        })),
    )?;
    poll_until(
        "the acknowledgement in the state file",
        WAIT,
        Duration::from_millis(100),
        || {
            let state = state_file(&state_dir, &interface)?;
            Ok(if state["acked_seq"] == seq {
                Probe::Ready(())
            } else {
                Probe::NotYet(state.to_string())
            })
        },
    )?;
    for _ in 0..3 {
        let status = runtime.block_on(link.status(WAIT))?;
        ensure!(status.removals.is_empty(), "sent after the ack: {status:?}");
    }
    drop(link);
    drop(runtime);
    Ok(())
}

fn now_s() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Whether the device `laptop` has an MFA session on Core.
fn session_on(lab: &ControlLab) -> Result<bool> {
    let device = lab.core()?.tidectl_json(&["device", "show", "laptop"])?;
    Ok(device["mfa_session"].as_bool().unwrap_or_default())
}

#[test]
fn an_mfa_removal_lost_with_the_link_is_sent_again_and_ends_the_session() -> Result<()> {
    require_root();
    let mut lab = ControlLab::build(&ControlOptions {
        gateways: 1,
        edges: 1,
        mfa_threshold_s: Some(3),
        ..ControlOptions::default()
    })?;
    let key = lab.create_client_wg()?;
    let core = lab.core()?;
    let user = core.tidectl_json(&["user", "create", "alice"])?;
    let secret = totp::secret_from_base32(
        user["totp_secret"]
            .as_str()
            .context("no TOTP secret printed")?,
    )
    .context("the TOTP secret is not base32")?;
    core.tidectl_ok(&[
        "device",
        "create",
        "laptop",
        "--user",
        "alice",
        "--location",
        LOCATION,
        "--public-key",
        &key,
    ])?;
    let start = lab.post(
        "/api/v1/mfa/start",
        &json!({"location": LOCATION, "public_key": key}),
    )?;
    ensure!(start.status == 200, "{} {}", start.status, start.body);
    let session = start.json()?["session"]
        .as_str()
        .context("no session in the MFA challenge")?
        .to_owned();
    let code = totp::code_at(&secret, totp::step_at(now_s()));
    let finish = lab.post(
        "/api/v1/mfa/finish",
        &json!({"session": session, "code": code}),
    )?;
    ensure!(finish.status == 200, "{} {}", finish.status, finish.body);
    lab.apply_device_config(&finish.json()?)?;
    let ping = lab.client().ping(IpAddr::V4(LAB_TUNNEL), 3)?;
    ensure!(ping.received == 3, "through the tunnel: {}", ping.summary);
    ensure!(session_on(&lab)?, "no session after the login");

    // Core freezes with its link open; the device goes quiet and the
    // gateway removes its peer and reports it into the frozen link.
    lab.core_mut()?.signal(Signal::SIGSTOP)?;
    lab.drop_client_wg();
    poll_until(
        "the gateway to remove the idle peer",
        WAIT,
        Duration::from_millis(100),
        || {
            let removals = lab.gateway_mut(1).daemon.removals()?;
            Ok(if removals.iter().any(|r| r.public_key == key) {
                Probe::Ready(())
            } else {
                Probe::NotYet(format!("{removals:?}"))
            })
        },
    )?;
    // A few statuses (every 300 ms) go into the frozen link.
    std::thread::sleep(Duration::from_secs(1));
    // Core dies without having read them, and comes back.
    lab.core_mut()?.kill()?;
    lab.core_mut()?.restart()?;
    poll_until(
        "Core to end the session from the removal sent again",
        WAIT,
        Duration::from_millis(300),
        || {
            Ok(if session_on(&lab)? {
                Probe::NotYet("session still on".into())
            } else {
                Probe::Ready(())
            })
        },
    )?;
    let events = lab.core()?.tidectl_json(&["events", "--limit", "100"])?;
    ensure!(
        events["events"]
            .as_array()
            .is_some_and(|list| list.iter().any(|e| e["kind"] == "mfa-session-end")),
        "{events}"
    );
    // Core acknowledged it: the gateway's state file says so, and it is
    // sent no more.
    let gateway = lab.gateway(1);
    let config = gateway.daemon.config();
    let state_dir = config.state_dir.clone().context("no state_dir")?;
    let interface = config
        .wireguard
        .as_ref()
        .context("no [wireguard]")?
        .interface
        .clone();
    poll_until(
        "Core's acknowledgement in the gateway's state file",
        WAIT,
        Duration::from_millis(200),
        || {
            let state = state_file(&state_dir, &interface)?;
            let last = state["removal_seq"].as_u64().unwrap_or_default();
            Ok(if last > 0 && state["acked_seq"] == last {
                Probe::Ready(())
            } else {
                Probe::NotYet(state.to_string())
            })
        },
    )?;
    Ok(())
}
