//! A gateway managed by Core, with a scripted Core on its link: Core's
//! location config brings the key, the port and the client's peer, and the
//! client's tunnel works; peer changes apply in order and bad ones change
//! nothing; status flows back; a gateway restarted without Core comes up
//! on the config it last applied. Two Cores at once: only the leader at
//! the highest term changes the gateway, and a deposed one is refused.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use base64::{Engine as _, engine::general_purpose::STANDARD};
use tidegate_proto::gateway::v1 as pb;
use tidegate_tests::location::{GATEWAY_TUNNEL, Location, LocationOptions};
use tidegate_tests::scripted_core::{GatewayLink, channel, peer};
use tidegate_tests::shield::WG_PORT;
use tidegate_tests::{CoreSection, KeyPair, TestPki, require_root};

const CORE_LISTEN: &str = "127.0.0.1:7443";
const WAIT: Duration = Duration::from_secs(15);

/// A base64 key's bytes.
fn key(text: &str) -> Vec<u8> {
    STANDARD.decode(text).unwrap()
}

/// Opens a Link from inside the gateway's namespace (the socket lives
/// there; the runtime drives it from here).
fn open(
    runtime: &tokio::runtime::Runtime,
    location: &Location,
    core: &tidegate_tests::CertFiles,
) -> Result<GatewayLink> {
    let addr: SocketAddr = CORE_LISTEN.parse()?;
    let channel = location
        .gateway()
        .run(|| runtime.block_on(channel(addr, core, "gw-a")))??;
    runtime
        .block_on(GatewayLink::open(channel))
        .map_err(|status| anyhow::anyhow!("opening the Link: {status}"))
}

/// Opens a Link as Core `core_id` saying, at `term`, whether it leads,
/// and reads the gateway's Hello.
fn open_as(
    runtime: &tokio::runtime::Runtime,
    location: &Location,
    core: &tidegate_tests::CertFiles,
    core_id: &str,
    term: u64,
    leading: bool,
) -> Result<GatewayLink> {
    let addr: SocketAddr = CORE_LISTEN.parse()?;
    let channel = location
        .gateway()
        .run(|| runtime.block_on(channel(addr, core, "gw-a")))??;
    let mut link = runtime
        .block_on(GatewayLink::open_as(channel, core_id, term, leading))
        .map_err(|status| anyhow::anyhow!("opening the Link: {status}"))?;
    let pb::gateway_message::Msg::Hello(_) = runtime.block_on(link.next(false, WAIT))? else {
        anyhow::bail!("the first message is not Hello");
    };
    Ok(link)
}

#[test]
fn two_cores_and_only_the_leader_at_the_highest_term_changes_the_gateway() -> Result<()> {
    require_root();
    let pki_dir = tempfile::tempdir()?;
    let pki = TestPki::new(pki_dir.path(), "pki")?;
    let core = pki.issue("core")?;
    let mut section = CoreSection::new(CORE_LISTEN.parse()?, "gw-a", pki.issue("gw-a")?);
    section.status_interval_ms = Some(300);
    let mut location = Location::build(&LocationOptions {
        clients: 1,
        core: Some(section),
        ..LocationOptions::default()
    })?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let mut a = open_as(&runtime, &location, &core, "core-a", 4, true)?;
    let mut b = open_as(&runtime, &location, &core, "core-b", 4, false)?;
    // Both get statuses, the standby too.
    runtime.block_on(a.status(WAIT))?;
    runtime.block_on(b.status(WAIT))?;

    let client = location.client(0);
    let client_key = client.public_key().to_owned();
    let private_key = key(location.gateway_private_key());
    let config = |version, peers| pb::LocationConfig {
        version,
        location_id: 7,
        location_name: "lab".into(),
        interface: Some(pb::WireguardInterface {
            private_key: private_key.clone(),
            listen_port: u32::from(WG_PORT),
            addresses: vec![format!("{GATEWAY_TUNNEL}/24")],
            mtu: 0,
        }),
        mfa: false,
        peer_disconnect_threshold_s: 0,
        peers,
    };
    let client_peer = peer(&client_key, &format!("{}/32", client.tunnel()));

    // The standby's config is refused with the reason; nothing applied.
    runtime.block_on(b.send(pb::core_message::Msg::Config(config(
        1,
        vec![client_peer.clone()],
    ))))?;
    let applied = runtime.block_on(b.applied(WAIT))?;
    ensure!(
        applied.error
            == "Core core-b does not lead at term 4 (led by core-a); the gateway takes changes only from the leader",
        "{applied:?}"
    );
    ensure!(
        location.daemon_mut().peers()?.peers.is_empty(),
        "the standby's config was applied"
    );
    // The leader's applies.
    runtime.block_on(a.send(pb::core_message::Msg::Config(config(1, vec![client_peer]))))?;
    let applied = runtime.block_on(a.applied(WAIT))?;
    ensure!(
        applied.version == 1 && applied.error.is_empty(),
        "{applied:?}"
    );
    let ping = location.client(0).ping(GATEWAY_TUNNEL, 3)?;
    ensure!(ping.received == 3, "{}", ping.summary);

    // core-b takes over at term 5 and adds a peer.
    let extra = KeyPair::generate()?;
    runtime.block_on(b.hello("core-b", 5, true))?;
    runtime.block_on(b.send(pb::core_message::Msg::Changes(pb::PeerChanges {
        base_version: 1,
        version: 2,
        upsert: vec![peer(&extra.public, "10.77.0.9/32")],
        remove: Vec::new(),
    })))?;
    let applied = runtime.block_on(b.applied(WAIT))?;
    ensure!(
        applied.version == 2 && applied.error.is_empty(),
        "{applied:?}"
    );
    // The deposed leader's later config (dropping every peer) is refused.
    runtime.block_on(a.send(pb::core_message::Msg::Config(config(9, Vec::new()))))?;
    let applied = runtime.block_on(a.applied(WAIT))?;
    ensure!(
        applied.error == "Core core-a's term 4 is older than term 5 (led by core-b)",
        "{applied:?}"
    );
    location.wait_peers("both peers under core-b", WAIT, |p| p.peers.len() == 2)?;
    let ping = location.client(0).ping(GATEWAY_TUNNEL, 3)?;
    ensure!(ping.received == 3, "{}", ping.summary);
    // core-a, deposed, still hears the gateway's status.
    runtime.block_on(a.status(WAIT))?;
    drop((a, b));
    drop(runtime);
    Ok(())
}

#[test]
fn core_manages_a_gateway_through_its_link() -> Result<()> {
    require_root();
    let pki_dir = tempfile::tempdir()?;
    let pki = TestPki::new(pki_dir.path(), "pki")?;
    let core = pki.issue("core")?;
    let mut section = CoreSection::new(CORE_LISTEN.parse()?, "gw-a", pki.issue("gw-a")?);
    section.status_interval_ms = Some(300);
    let mut location = Location::build(&LocationOptions {
        clients: 1,
        core: Some(section),
        ..LocationOptions::default()
    })?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let mut link = open(&runtime, &location, &core)?;
    let pb::gateway_message::Msg::Hello(hello) = runtime.block_on(link.next(false, WAIT))? else {
        anyhow::bail!("the first message is not Hello");
    };
    ensure!(hello.config_version == 0, "{hello:?}");

    // Core's config: the location's key and port, and the client.
    let client = location.client(0);
    let client_key = client.public_key().to_owned();
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
        mfa: false,
        peer_disconnect_threshold_s: 0,
        peers: vec![peer(&client_key, &format!("{}/32", client.tunnel()))],
    };
    runtime.block_on(link.send(pb::core_message::Msg::Config(config)))?;
    let applied = runtime.block_on(link.applied(WAIT))?;
    ensure!(
        applied.version == 1 && applied.error.is_empty(),
        "{applied:?}"
    );
    let ping = location.client(0).ping(GATEWAY_TUNNEL, 3)?;
    ensure!(ping.received == 3, "{}", ping.summary);
    let peers =
        location.wait_peers("the client's peer", WAIT, |p| p.peer(&client_key).is_some())?;
    let on_gateway = peers
        .peer(&client_key)
        .context("the client's peer is missing")?;
    ensure!(on_gateway.source == "core", "{on_gateway:?}");
    ensure!(peers.listen_port == WG_PORT);

    // Changes on another version are refused; on the right one, applied.
    let extra = KeyPair::generate()?;
    let changes = |base, version, ip: &str| pb::PeerChanges {
        base_version: base,
        version,
        upsert: vec![peer(&extra.public, ip)],
        remove: Vec::new(),
    };
    runtime.block_on(link.send(pb::core_message::Msg::Changes(changes(
        5,
        6,
        "10.77.0.9/32",
    ))))?;
    let applied = runtime.block_on(link.applied(WAIT))?;
    ensure!(
        applied
            .error
            .contains("base_version 5 differs from the version this gateway runs, 1"),
        "{applied:?}"
    );
    runtime.block_on(link.send(pb::core_message::Msg::Changes(changes(
        1,
        2,
        "10.77.0.9/33",
    ))))?;
    let applied = runtime.block_on(link.applied(WAIT))?;
    ensure!(
        applied
            .error
            .starts_with("changes.upsert[0].allowed_ips[0]"),
        "{applied:?}"
    );
    // Overlapping the client's address is refused, naming both peers.
    runtime.block_on(link.send(pb::core_message::Msg::Changes(changes(
        1,
        2,
        "10.77.0.0/24",
    ))))?;
    let applied = runtime.block_on(link.applied(WAIT))?;
    ensure!(applied.error.contains("overlaps"), "{applied:?}");
    // Two stats polls later, still one peer.
    std::thread::sleep(Duration::from_millis(500));
    ensure!(
        location.daemon_mut().peers()?.peers.len() == 1,
        "a refused change was applied"
    );
    runtime.block_on(link.send(pb::core_message::Msg::Changes(changes(
        1,
        2,
        "10.77.0.9/32",
    ))))?;
    let applied = runtime.block_on(link.applied(WAIT))?;
    ensure!(
        applied.version == 2 && applied.error.is_empty(),
        "{applied:?}"
    );
    location.wait_peers("Core's second peer", WAIT, |p| {
        p.peer(&extra.public).is_some()
    })?;

    // Core's peers are Core's: tidectl cannot take them over.
    let taken = location.daemon().tidectl(&[
        "peer",
        "change",
        "--public-key",
        &client_key,
        "--allowed-ips",
        "10.77.0.2/32",
    ])?;
    ensure!(
        !taken.status.success() && taken.stderr.contains("Core's location config"),
        "{taken:?}"
    );

    // Status: the client's peer with its handshake.
    let status = runtime.block_on(async {
        loop {
            let status = link.status(WAIT).await?;
            let client = status
                .peers
                .iter()
                .find(|p| p.public_key == key(&client_key));
            if client.is_some_and(|p| p.last_handshake_unix_ms > 0) {
                return anyhow::Ok(status);
            }
        }
    })?;
    ensure!(status.ha.is_none() && status.peers.len() == 2, "{status:?}");

    // Core away and the gateway killed: it comes back on the last config.
    drop(link);
    location.daemon_mut().kill()?;
    location.restart_daemon()?;
    location.wait_peers("both peers after the restart", WAIT, |p| {
        p.peers.len() == 2 && p.listen_port == WG_PORT && p.peers.iter().all(|p| p.source == "core")
    })?;
    let ping = location.client(0).ping(GATEWAY_TUNNEL, 3)?;
    ensure!(ping.received == 3, "{}", ping.summary);
    let mut link = open(&runtime, &location, &core)?;
    let pb::gateway_message::Msg::Hello(hello) = runtime.block_on(link.next(false, WAIT))? else {
        anyhow::bail!("the first message is not Hello");
    };
    ensure!(
        (hello.location_id, hello.config_version) == (7, 2),
        "{hello:?}"
    );
    drop(link);
    drop(runtime);
    Ok(())
}
