//! Edges behind a real nginx in a namespace, linked to a scripted Core:
//! the client API end to end through the proxy, every bad input refused at
//! the Edge, an Edge killed without losing a request, and `/health`
//! turning 503 when Core goes away.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Result, ensure};
use tidegate_proto::edge::v1 as edge;
use tidegate_tests::scripted_core::ScriptedEdgeCore;
use tidegate_tests::{EdgeConfig, EdgeDaemon, Netns, Nginx, Run, TestPki, require_root};

const NGINX: &str = "127.0.0.1:8080";
const WAIT: Duration = Duration::from_secs(10);

fn addr(text: &str) -> SocketAddr {
    text.parse().unwrap()
}

/// Core's answers, scripted: one good token, one MFA login.
fn answer(request: &edge::Request) -> edge::reply::Result {
    let error = |code: edge::error::Code, message: &str| {
        edge::reply::Result::Error(edge::Error {
            code: code as i32,
            message: message.into(),
        })
    };
    match &request.kind {
        Some(edge::request::Kind::Config(c)) if c.token == "good" => {
            edge::reply::Result::Config(edge::DeviceConfig {
                device: "laptop".into(),
                location: "lab".into(),
                addresses: vec!["10.8.0.2/32".into()],
                server_public_key: "c2VydmVy".into(),
                endpoint: "198.51.100.100:51820".into(),
                allowed_ips: vec!["10.8.0.0/24".into()],
                ..Default::default()
            })
        }
        Some(edge::request::Kind::Config(_)) => {
            error(edge::error::Code::Unauthorized, "unknown or used token")
        }
        Some(edge::request::Kind::MfaStart(start)) if start.location == "lab" => {
            edge::reply::Result::Challenge(edge::MfaChallenge {
                session: "s-1".into(),
                expires_in_s: 120,
            })
        }
        Some(edge::request::Kind::MfaStart(_)) => {
            error(edge::error::Code::NotFound, "no such location")
        }
        Some(edge::request::Kind::MfaFinish(finish)) if finish.session == "old" => {
            error(edge::error::Code::Expired, "the session expired")
        }
        Some(edge::request::Kind::MfaFinish(_)) => {
            error(edge::error::Code::Unauthorized, "wrong code")
        }
        None => error(edge::error::Code::Invalid, "empty request"),
    }
}

#[test]
fn edges_behind_nginx_serve_clients_while_core_is_linked() -> Result<()> {
    require_root();
    let run = Run::new()?;
    let ns = Netns::create(&run.netns_name("edge"))?;
    let pki = TestPki::new(run.dir(), "pki")?;
    let core = pki.issue("core")?;

    let mut edges = Vec::new();
    for (name, http, link) in [
        ("edge-a", "127.0.0.1:18081", "127.0.0.1:17441"),
        ("edge-b", "127.0.0.1:18082", "127.0.0.1:17442"),
    ] {
        let mut config = EdgeConfig::new(name, addr(http), addr(link), pki.issue(name)?);
        config.body_limit_bytes = Some(1024);
        config.trusted_proxies = vec!["127.0.0.1".parse()?];
        edges.push(EdgeDaemon::start(&ns, config, run.dir())?);
    }
    let nginx = Nginx::start(
        &ns,
        &run.dir().join("nginx"),
        addr(NGINX),
        &edges
            .iter()
            .map(|e| e.config().http_listen)
            .collect::<Vec<_>>(),
    )?;

    // No Core yet: unhealthy, and requests get 503 with a reason.
    let health = nginx.request("GET", "/health", None)?;
    ensure!(health.status == 503, "{health:?}");
    ensure!(
        health.json()?["error"]
            .as_str()
            .unwrap_or_default()
            .contains("no link to Core")
    );

    let mut cores = Vec::new();
    for edge in &mut edges {
        let link = edge.config().link_listen;
        let identity = edge.config().identity.clone();
        cores.push(ScriptedEdgeCore::start(
            Some(&ns),
            link,
            &core,
            &identity,
            answer,
        )?);
        edge.wait_health(200, WAIT)?;
    }
    ensure!(nginx.request("GET", "/health", None)?.status == 200);

    // The API end to end.
    let post = |path: &str, body: &str| nginx.request("POST", path, Some(body.as_bytes()));
    let key = "AgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgI=";
    let config = post("/api/v1/device-config", r#"{"token":"good"}"#)?;
    ensure!(config.status == 200, "{config:?}");
    ensure!(config.json()?["server_public_key"] == "c2VydmVy");
    ensure!(
        config.header("cache-control") == Some("no-store"),
        "{config:?}"
    );
    let start = post(
        "/api/v1/mfa/start",
        &format!(r#"{{"location":"lab","public_key":"{key}"}}"#),
    )?;
    ensure!(
        start.status == 200 && start.json()?["session"] == "s-1",
        "{start:?}"
    );
    let cases = [
        (
            "/api/v1/device-config",
            r#"{"token":"used"}"#.to_owned(),
            401,
            "unauthorized",
        ),
        (
            "/api/v1/mfa/start",
            format!(r#"{{"location":"nowhere","public_key":"{key}"}}"#),
            404,
            "not-found",
        ),
        (
            "/api/v1/mfa/finish",
            r#"{"session":"s-1","code":"000000"}"#.to_owned(),
            401,
            "unauthorized",
        ),
        (
            "/api/v1/mfa/finish",
            r#"{"session":"old","code":"123456"}"#.to_owned(),
            410,
            "expired",
        ),
        // Refused at the Edge, never relayed.
        (
            "/api/v1/device-config",
            "{\"token\":".to_owned(),
            400,
            "invalid",
        ),
        ("/api/v1/device-config", "{}".to_owned(), 400, "invalid"),
        (
            "/api/v1/mfa/start",
            r#"{"location":"lab","public_key":"short"}"#.to_owned(),
            400,
            "invalid",
        ),
        (
            "/api/v1/mfa/finish",
            r#"{"session":"s-1","code":"12ab56"}"#.to_owned(),
            400,
            "invalid",
        ),
        (
            "/api/v1/device-config",
            format!(r#"{{"token":"{}"}}"#, "x".repeat(2000)),
            413,
            "too-large",
        ),
        ("/api/v1/nothing", "{}".to_owned(), 404, "not-found"),
    ];
    for (path, body, status, code) in cases {
        let answer = post(path, &body)?;
        ensure!(answer.status == status, "{path} {body:.60}: {answer:?}");
        ensure!(
            answer.json()?["error"]["code"] == code,
            "{path}: {answer:?}"
        );
    }
    let get = nginx.request("GET", "/api/v1/device-config", None)?;
    ensure!(get.status == 405, "{get:?}");

    // Kill one Edge between requests: nginx retries the connection on the
    // other, so no request fails.
    for n in 0..20 {
        if n == 10 {
            edges[0].kill()?;
        }
        let answer = post("/api/v1/device-config", r#"{"token":"good"}"#)?;
        ensure!(answer.status == 200, "request {n}: {answer:?}");
    }
    let log = edges[1].process().log();
    ensure!(log.contains("answered"), "edge-b served nothing:\n{log}");

    // Core goes away: the remaining Edge says so.
    drop(cores);
    let down = edges[1].wait_health(503, WAIT)?;
    ensure!(
        down.json()?["error"]
            .as_str()
            .unwrap_or_default()
            .contains("no link to Core"),
        "{down:?}"
    );
    let refused = post("/api/v1/device-config", r#"{"token":"good"}"#)?;
    ensure!(refused.status == 503, "{refused:?}");

    // A graceful stop exits 0.
    let status = edges[1].stop()?;
    ensure!(
        status.success(),
        "edge-b exited {status}:\n{}",
        edges[1].log_tail()
    );
    drop(nginx);
    Ok(())
}
