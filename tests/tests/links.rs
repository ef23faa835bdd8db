//! The servers Core dials, over real mutual TLS on loopback: the gateway's
//! and the Edge's accept only a client certificate of their CA that names
//! Core, and a refused client changes nothing. Several Cores at once: each
//! keeps its Link, and only the leader at the highest term is acted on.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use axum::http::HeaderName;
use tidegate_edge::{http as edge_http, link as edge_link, relay, serve as edge_serve};
use tidegate_gateway::core_link::{self, CoreLinkConfig};
use tidegate_proto::edge::v1 as edge;
use tidegate_proto::gateway::v1 as gateway;
use tidegate_tests::pki::{CertFiles, TestPki};
use tidegate_tests::scripted_core::{EdgeLink, GatewayLink, channel, edge_welcome};
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(10);

/// A free loopback port, for a server the test starts next.
fn free_port() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap()
}

struct Pkis {
    _dir: tempfile::TempDir,
    ours: TestPki,
    foreign: TestPki,
}

fn pkis() -> Pkis {
    let dir = tempfile::tempdir().unwrap();
    let ours = TestPki::new(dir.path(), "ours").unwrap();
    let foreign = TestPki::new(dir.path(), "foreign").unwrap();
    Pkis {
        _dir: dir,
        ours,
        foreign,
    }
}

/// The gateway's server with no WireGuard and no HA behind it.
async fn gateway_server(files: &CertFiles, cancel: &CancellationToken) -> SocketAddr {
    let listen = free_port();
    let config = CoreLinkConfig {
        listen,
        ca_file: files.ca.clone(),
        cert_file: files.cert.clone(),
        key_file: files.key.clone(),
        identity: "gw-a".into(),
        core_identity: "core".into(),
        gateway_id: 3,
        status_interval: Duration::from_millis(200),
    };
    let parts = core_link::Parts {
        wireguard: None,
        ha: None,
        gateway_id: 3,
        status_interval: tokio::sync::watch::channel(Duration::from_millis(200)).1,
        links: core_link::CoreLinks::default(),
    };
    let server = core_link::serve(config, parts, cancel.clone())
        .await
        .unwrap();
    tokio::spawn(server);
    listen
}

/// Whether opening a Link as `client` fails, and how.
async fn gateway_refuses(addr: SocketAddr, client: &CertFiles) -> String {
    match channel(addr, client, "gw-a").await {
        Err(error) => format!("handshake: {error:#}"),
        Ok(channel) => match GatewayLink::open(channel).await {
            Err(status) => {
                assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status}");
                format!("status: {status}")
            }
            Ok(mut link) => match link.next(true, WAIT).await {
                // Some servers answer the refusal on the first read.
                Err(error) => format!("stream: {error:#}"),
                Ok(message) => panic!("the gateway accepted the client: {message:?}"),
            },
        },
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_accepts_only_cores_certificate() -> Result<()> {
    let pkis = pkis();
    let cancel = CancellationToken::new();
    let addr = gateway_server(&pkis.ours.issue("gw-a")?, &cancel).await;

    let foreign = gateway_refuses(addr, &pkis.foreign.issue("core")?).await;
    assert!(
        !foreign.starts_with("status"),
        "another CA's certificate got as far as {foreign}"
    );
    let not_core = gateway_refuses(addr, &pkis.ours.issue("edge-a")?).await;
    assert!(
        not_core.contains("only Core (core) may open a Link"),
        "{not_core}"
    );

    // Core itself: Hello first, with this gateway's id and no config yet.
    let core = pkis.ours.issue("core")?;
    let mut link = GatewayLink::open(channel(addr, &core, "gw-a").await?).await?;
    let gateway::gateway_message::Msg::Hello(hello) = link.next(false, WAIT).await? else {
        panic!("the first message is not Hello");
    };
    assert_eq!(
        (hello.gateway_id, hello.location_id, hello.config_version),
        (3, 0, 0)
    );
    assert!(!hello.software_version.is_empty());
    // A status on connect and periodically, without HA.
    let status = link.status(WAIT).await?;
    assert!(status.ha.is_none() && status.at_unix_ms > 0);
    link.status(WAIT).await?;

    // Bad input is refused naming the field; a gateway without WireGuard
    // says so; a failover without HA is refused.
    let mut bad = gateway::LocationConfig {
        version: 1,
        interface: Some(gateway::WireguardInterface {
            private_key: vec![1; 31],
            listen_port: 51820,
            addresses: vec![],
            mtu: 0,
        }),
        ..Default::default()
    };
    link.send(gateway::core_message::Msg::Config(bad.clone()))
        .await?;
    let applied = link.applied(WAIT).await?;
    assert_eq!(applied.version, 1);
    assert!(
        applied
            .error
            .starts_with("config.interface.private_key: 31 bytes"),
        "{}",
        applied.error
    );
    bad.interface.as_mut().unwrap().private_key = vec![1; 32];
    link.send(gateway::core_message::Msg::Config(bad)).await?;
    let applied = link.applied(WAIT).await?;
    assert!(
        applied.error.contains("runs no WireGuard interface"),
        "{}",
        applied.error
    );
    link.send(gateway::core_message::Msg::Failover(
        gateway::FailoverRequest { id: 9 },
    ))
    .await?;
    let gateway::gateway_message::Msg::Failover(result) = link.next(false, WAIT).await? else {
        panic!("no failover result");
    };
    assert_eq!(result.id, 9);
    assert!(result.error.contains("no [ha] section"), "{}", result.error);

    // A second Link of the same Core replaces the first once it sends its
    // first message (a Core from before terms names itself by none): the
    // first stream ends.
    let mut second = GatewayLink::open(channel(addr, &core, "gw-a").await?).await?;
    assert!(matches!(
        second.next(false, WAIT).await?,
        gateway::gateway_message::Msg::Hello(_)
    ));
    second
        .send(gateway::core_message::Msg::RemovalsAcked(
            gateway::RemovalsAcked { through_seq: 0 },
        ))
        .await?;
    let ended = tokio::time::timeout(WAIT, async {
        loop {
            match link.from_gateway.message().await {
                Ok(Some(_)) => continue,
                other => return other.map(|_| ()),
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the replaced Link is still open");
    cancel.cancel();
    Ok(())
}

/// The next Applied's error on `link` (statuses skipped).
async fn applied_error(link: &mut GatewayLink, config: &gateway::LocationConfig) -> String {
    link.send(gateway::core_message::Msg::Config(config.clone()))
        .await
        .unwrap();
    let applied = link.applied(WAIT).await.unwrap();
    assert_eq!(applied.version, config.version);
    applied.error
}

/// What a gateway without WireGuard answers a config that passed the fence.
const PASSED: &str = "runs no WireGuard interface";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_acts_only_on_the_leader_at_the_highest_term() -> Result<()> {
    let pkis = pkis();
    let cancel = CancellationToken::new();
    let addr = gateway_server(&pkis.ours.issue("gw-a")?, &cancel).await;
    let core = pkis.ours.issue("core")?;
    let config = gateway::LocationConfig {
        version: 3,
        interface: Some(gateway::WireguardInterface {
            private_key: vec![1; 32],
            listen_port: 51820,
            addresses: vec![],
            mtu: 0,
        }),
        ..Default::default()
    };

    // core-a leads at term 4, core-b is a standby: both get Hello and
    // statuses; only core-a's config gets past the fence.
    let mut a =
        GatewayLink::open_as(channel(addr, &core, "gw-a").await?, "core-a", 4, true).await?;
    let mut b =
        GatewayLink::open_as(channel(addr, &core, "gw-a").await?, "core-b", 4, false).await?;
    for link in [&mut a, &mut b] {
        assert!(matches!(
            link.next(false, WAIT).await?,
            gateway::gateway_message::Msg::Hello(_)
        ));
        link.status(WAIT).await?;
    }
    let error = applied_error(&mut a, &config).await;
    assert!(error.contains(PASSED), "{error}");
    let error = applied_error(&mut b, &config).await;
    assert_eq!(
        error,
        "Core core-b does not lead at term 4 (led by core-a); the gateway takes changes only from the leader"
    );
    b.send(gateway::core_message::Msg::Failover(
        gateway::FailoverRequest { id: 5 },
    ))
    .await?;
    let gateway::gateway_message::Msg::Failover(result) = b.next(false, WAIT).await? else {
        panic!("no failover result");
    };
    assert!(
        result.error.contains("does not lead at term 4"),
        "{}",
        result.error
    );

    // core-b takes over at term 5: core-a's later config is refused with
    // the reason, core-b's passes; core-a still gets statuses.
    b.hello("core-b", 5, true).await?;
    let error = applied_error(&mut b, &config).await;
    assert!(error.contains(PASSED), "{error}");
    let error = applied_error(&mut a, &config).await;
    assert_eq!(
        error,
        "Core core-a's term 4 is older than term 5 (led by core-b)"
    );
    a.status(WAIT).await?;

    // A new Link of core-a replaces its old one, not core-b's.
    let mut a2 =
        GatewayLink::open_as(channel(addr, &core, "gw-a").await?, "core-a", 5, false).await?;
    assert!(matches!(
        a2.next(false, WAIT).await?,
        gateway::gateway_message::Msg::Hello(_)
    ));
    let ended = tokio::time::timeout(WAIT, async {
        loop {
            match a.from_gateway.message().await {
                Ok(Some(_)) => continue,
                other => return other.map(|_| ()),
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "core-a's replaced Link is still open");
    let error = applied_error(&mut b, &config).await;
    assert!(error.contains(PASSED), "{error}");
    cancel.cancel();
    Ok(())
}

/// An Edge's link server and HTTP API on loopback.
async fn edge_servers(files: &CertFiles, cancel: &CancellationToken) -> (SocketAddr, SocketAddr) {
    let (relay, task) = relay::spawn(cancel.clone());
    tokio::spawn(task);
    let link_addr = free_port();
    let settings = edge_link::LinkSettings {
        listen: link_addr,
        ca_file: files.ca.clone(),
        cert_file: files.cert.clone(),
        key_file: files.key.clone(),
        identity: "edge-a".into(),
        core_identity: "core".into(),
    };
    tokio::spawn(
        edge_link::serve(settings, relay.clone(), cancel.clone())
            .await
            .unwrap(),
    );
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http_addr = http.local_addr().unwrap();
    let settings = edge_http::RequestSettings {
        body_limit: 1024,
        core_timeout: Duration::from_millis(500),
        body_timeout: Duration::from_secs(5),
        trusted_proxies: Arc::from(Vec::new()),
        real_ip_header: HeaderName::from_static("x-real-ip"),
    };
    let state = edge_http::AppState {
        relay,
        settings: tokio::sync::watch::channel(Arc::new(settings)).1,
        cert: None,
    };
    let limits = edge_serve::HttpLimits {
        max_connections: 64,
        header_timeout: Duration::from_secs(5),
    };
    tokio::spawn(edge_serve::serve(
        http,
        edge_http::router(state),
        limits,
        cancel.clone(),
    ));
    (link_addr, http_addr)
}

async fn http_status(
    addr: SocketAddr,
    method: &'static str,
    path: &'static str,
    body: Option<&'static str>,
) -> (u16, serde_json::Value) {
    let answer = tokio::task::spawn_blocking(move || {
        tidegate_tests::http::request(addr, method, path, body.map(str::as_bytes), &[])
    })
    .await
    .unwrap()
    .unwrap();
    (answer.status, answer.json().unwrap_or_default())
}

fn answer(request: &edge::Request) -> edge::reply::Result {
    match &request.kind {
        Some(edge::request::Kind::Config(c)) if c.token == "good" => {
            edge::reply::Result::Config(edge::DeviceConfig {
                device: "laptop".into(),
                location: "lab".into(),
                endpoint: format!("198.51.100.100:51820 for {}", request.client_addr),
                ..Default::default()
            })
        }
        Some(edge::request::Kind::Config(c)) if c.token == "slow" => {
            std::thread::sleep(Duration::from_millis(900));
            edge::reply::Result::Error(edge::Error::default())
        }
        _ => edge::reply::Result::Error(edge::Error {
            code: edge::error::Code::Unauthorized as i32,
            message: "bad token".into(),
            ..Default::default()
        }),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_edge_accepts_only_cores_certificate_and_is_healthy_only_while_linked() -> Result<()> {
    let pkis = pkis();
    let cancel = CancellationToken::new();
    let (link_addr, http_addr) = edge_servers(&pkis.ours.issue("edge-a")?, &cancel).await;
    let (status, body) = http_status(http_addr, "GET", "/health", None).await;
    assert_eq!(status, 503);
    assert!(
        body["error"].as_str().unwrap().contains("no link to Core"),
        "{body}"
    );
    // Nothing is relayed without Core; bad input is refused all the same.
    let (status, body) = http_status(
        http_addr,
        "POST",
        "/api/v1/device-config",
        Some(r#"{"token":"good"}"#),
    )
    .await;
    assert_eq!(status, 503, "{body}");
    let (status, _) = http_status(http_addr, "POST", "/api/v1/device-config", Some("{")).await;
    assert_eq!(status, 400);

    // Another CA's certificate fails the handshake; this CA's for another
    // name is refused; neither makes the Edge healthy.
    let foreign = pkis.foreign.issue("core")?;
    match channel(link_addr, &foreign, "edge-a").await {
        Err(_) => {}
        Ok(channel) => {
            let refused = EdgeLink::open(channel, "core").await;
            assert!(
                refused.is_err(),
                "a certificate of another CA opened a Link"
            );
        }
    }
    let not_core = pkis.ours.issue("gw-a")?;
    let status = EdgeLink::open(channel(link_addr, &not_core, "edge-a").await?, "core")
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status}");
    assert_eq!(http_status(http_addr, "GET", "/health", None).await.0, 503);

    // Core links: healthy, requests relayed and answered.
    let core = pkis.ours.issue("core")?;
    let link = EdgeLink::open(channel(link_addr, &core, "edge-a").await?, "core").await?;
    let stop = CancellationToken::new();
    let serving = tokio::spawn(link.serve(answer, stop.clone()));
    let mut healthy = false;
    for _ in 0..100 {
        if http_status(http_addr, "GET", "/health", None).await.0 == 200 {
            healthy = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(healthy, "the Edge did not turn healthy with Core linked");
    let (status, body) = http_status(
        http_addr,
        "POST",
        "/api/v1/device-config",
        Some(r#"{"token":"good"}"#),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["device"], "laptop");
    assert!(
        body["endpoint"]
            .as_str()
            .unwrap()
            .ends_with("for 127.0.0.1"),
        "{body}"
    );
    let (status, body) = http_status(
        http_addr,
        "POST",
        "/api/v1/device-config",
        Some(r#"{"token":"nope"}"#),
    )
    .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (401, Some("unauthorized"))
    );
    // Core slower than the Edge's timeout: 504.
    let (status, body) = http_status(
        http_addr,
        "POST",
        "/api/v1/device-config",
        Some(r#"{"token":"slow"}"#),
    )
    .await;
    assert_eq!(status, 504, "{body}");

    // Core goes away: 503 again.
    stop.cancel();
    serving.await??;
    let mut down = false;
    for _ in 0..100 {
        if http_status(http_addr, "GET", "/health", None).await.0 == 503 {
            down = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(down, "the Edge stayed healthy after Core closed the Link");
    cancel.cancel();
    Ok(())
}

/// Waits until `/health` says `want` of the leader.
async fn wait_leader(http_addr: SocketAddr, want: Option<&str>) {
    for _ in 0..100 {
        let (status, body) = http_status(http_addr, "GET", "/health", None).await;
        if status == 200 && body["leader"].as_str() == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the Edge's leader never became {want:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_edge_relays_only_to_the_leader_and_answers_503_during_a_takeover() -> Result<()> {
    let pkis = pkis();
    let cancel = CancellationToken::new();
    let (link_addr, http_addr) = edge_servers(&pkis.ours.issue("edge-a")?, &cancel).await;
    let core = pkis.ours.issue("core")?;
    let good = Some(r#"{"token":"good"}"#);

    // Only a standby: healthy, but requests get 503 no-leader at once.
    let b = EdgeLink::open_at(
        channel(link_addr, &core, "edge-a").await?,
        "core-b",
        4,
        false,
    )
    .await?;
    let to_b = b.to_edge.clone();
    let stop_b = CancellationToken::new();
    let serving_b = tokio::spawn(b.serve(answer, stop_b.clone()));
    wait_leader(http_addr, None).await;
    let (status, body) = http_status(http_addr, "POST", "/api/v1/device-config", good).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (503, Some("no-leader")),
        "{body}"
    );

    // core-a leads at term 4: requests are answered.
    let a = EdgeLink::open_at(
        channel(link_addr, &core, "edge-a").await?,
        "core-a",
        4,
        true,
    )
    .await?;
    let to_a = a.to_edge.clone();
    let stop_a = CancellationToken::new();
    let serving_a = tokio::spawn(a.serve(answer, stop_a.clone()));
    wait_leader(http_addr, Some("core-a")).await;
    let (status, body) = http_status(http_addr, "POST", "/api/v1/device-config", good).await;
    assert_eq!(status, 200, "{body}");

    // A takeover under way: core-a has seen term 5 and stepped down, core-b
    // has not said it leads yet. 503 no-leader; then core-b leads.
    to_a.send(edge_welcome("core-a", 5, false)).await?;
    wait_leader(http_addr, None).await;
    let (status, body) = http_status(http_addr, "POST", "/api/v1/device-config", good).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (503, Some("no-leader")),
        "{body}"
    );
    to_b.send(edge_welcome("core-b", 5, true)).await?;
    wait_leader(http_addr, Some("core-b")).await;
    // core-b's replies go out at term 4 (its Link's term): dropped, 503.
    let (status, body) = http_status(http_addr, "POST", "/api/v1/device-config", good).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (503, Some("no-leader")),
        "{body}"
    );
    stop_b.cancel();
    serving_b.await??;
    let b = EdgeLink::open_at(
        channel(link_addr, &core, "edge-a").await?,
        "core-b",
        5,
        true,
    )
    .await?;
    let stop_b = CancellationToken::new();
    let serving_b = tokio::spawn(b.serve(answer, stop_b.clone()));
    wait_leader(http_addr, Some("core-b")).await;
    let (status, body) = http_status(http_addr, "POST", "/api/v1/device-config", good).await;
    assert_eq!(status, 200, "{body}");
    stop_a.cancel();
    stop_b.cancel();
    serving_a.await??;
    serving_b.await??;
    cancel.cancel();
    Ok(())
}
