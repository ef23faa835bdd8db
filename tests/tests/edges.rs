//! Edges behind a real nginx in a namespace, linked to a scripted Core:
//! the client API end to end through the proxy, every bad input refused at
//! the Edge, an Edge killed without losing a request, and `/health`
//! turning 503 when Core goes away.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, SocketAddrV4, TcpStream};
use std::os::fd::AsRawFd as _;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, ensure};
use nix::sys::socket::{AddressFamily, SockFlag, SockType, SockaddrIn, bind, connect, socket};
use tidegate_proto::{edge::v1 as edge, listen::LINK_LIMITS, tls::HANDSHAKE_TIMEOUT};
use tidegate_tests::pki::served_certificate;
use tidegate_tests::scripted_core::ScriptedEdgeCore;
use tidegate_tests::{CorePki, EdgeConfig, EdgeDaemon, Netns, Nginx, Run, TestPki, require_root};

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
            ..Default::default()
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
        Some(edge::request::Kind::Enrol(_)) => error(
            edge::error::Code::Conflict,
            "device \"laptop\" already has a key",
        ),
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
        None,
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
    let health = nginx.request("GET", "/health", None)?;
    ensure!(health.status == 200, "{health:?}");
    // The link certificate's expiry, for monitoring.
    let cert = &health.json()?["certificate"];
    ensure!(
        cert["expiry"] == "valid" && cert["days_left"].as_i64().is_some_and(|d| d > 30),
        "{health:?}"
    );

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
        (
            "/api/v1/enrol",
            format!(r#"{{"token":"t","public_key":"{key}"}}"#),
            409,
            "conflict",
        ),
        // Refused at the Edge, never relayed.
        (
            "/api/v1/enrol",
            r#"{"token":"t","public_key":"short"}"#.to_owned(),
            400,
            "invalid",
        ),
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

/// Connections an Edge under attack holds open in the test below.
const MAX_CONNECTIONS: usize = 8;
/// Its deadlines for a request's head and body.
const CLIENT_TIMEOUT: Duration = Duration::from_millis(500);
/// Connections strangers open to its link port.
const LINK_STRANGERS: usize = 12;

/// Slow, idle and half-open clients: a connection that sends nothing, half
/// a head, or half a body, or sits idle after an answer, is cut off at the
/// deadline; past the connection limit new connections are closed at once;
/// and all the while Core links (its own listener, where strangers are
/// limited per address and by the TLS handshake's deadline) and, once the
/// stalled connections are cut, other clients are served.
#[test]
fn slow_idle_and_half_open_clients_are_cut_off_and_others_are_served() -> Result<()> {
    require_root();
    let run = Run::new()?;
    let ns = Netns::create(&run.netns_name("slow"))?;
    let pki = TestPki::new(run.dir(), "pki")?;
    let core = pki.issue("core")?;
    let http = addr("127.0.0.1:18091");
    let link = addr("127.0.0.1:17451");
    let mut config = EdgeConfig::new("edge-a", http, link, pki.issue("edge-a")?);
    config.header_timeout_ms = Some(CLIENT_TIMEOUT.as_millis() as u64);
    config.body_timeout_ms = Some(CLIENT_TIMEOUT.as_millis() as u64);
    config.max_connections = Some(MAX_CONNECTIONS);
    let mut edge = EdgeDaemon::start(&ns, config, run.dir())?;

    ns.run(|| -> Result<()> {
        // Strangers take the HTTP port: every place taken by connections that send
        // nothing, half a head, or half a body.
        let mut stalled = Vec::new();
        for n in 0..MAX_CONNECTIONS {
            let mut stream = TcpStream::connect(http)?;
            match n % 3 {
                0 => {}
                1 => stream.write_all(b"POST /api/v1/device-config HTTP/1.1\r\nHost: e\r\n")?,
                _ => stream.write_all(
                    b"POST /api/v1/device-config HTTP/1.1\r\nHost: e\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"tok",
                )?,
            }
            stalled.push((n, stream));
        }
        std::thread::sleep(Duration::from_millis(100));
        // Past the limit: closed at once, nothing answered.
        let mut extra = TcpStream::connect(http)?;
        extra.write_all(b"GET /health HTTP/1.1\r\nHost: e\r\n\r\n")?;
        let (read, took) = read_all(&mut extra, WAIT)?;
        ensure!(read.is_empty(), "a connection past the limit was answered: {read:?}");
        ensure!(took < CLIENT_TIMEOUT, "closed after {took:?}, not at once");

        // Each stalled one is cut at its deadline: no head, an empty close;
        // half a body, 408 with the API's error.
        for (n, stream) in &mut stalled {
            let (read, took) = read_all(stream, WAIT)?;
            let text = String::from_utf8_lossy(&read);
            ensure!(
                took < CLIENT_TIMEOUT * 4,
                "connection {n} was held {took:?}"
            );
            if *n % 3 == 2 {
                ensure!(
                    text.starts_with("HTTP/1.1 408") && text.contains("\"timeout\""),
                    "half a body: {text:?}"
                );
            } else {
                ensure!(!text.contains("200 OK"), "connection {n}: {text:?}");
            }
        }
        // An answered keep-alive connection left idle is cut too.
        let mut idle = TcpStream::connect(http)?;
        idle.write_all(b"GET /health HTTP/1.1\r\nHost: e\r\n\r\n")?;
        let (read, took) = read_all(&mut idle, WAIT)?;
        ensure!(
            String::from_utf8_lossy(&read).starts_with("HTTP/1.1 503"),
            "no Core yet: {read:?}"
        );
        ensure!(
            took >= CLIENT_TIMEOUT && took < CLIENT_TIMEOUT * 4,
            "an idle connection was closed after {took:?}"
        );
        Ok(())
    })??;

    // Strangers hold the link port with connections that never start TLS,
    // from one address, past its limit per peer; Core links from another
    // and the Edge serves.
    let connected = Instant::now();
    let mut strangers: Vec<TcpStream> = ns.run(|| -> Result<Vec<TcpStream>> {
        (0..LINK_STRANGERS)
            .map(|_| connect_from("127.0.0.9", link))
            .collect()
    })??;
    let _core = ScriptedEdgeCore::start(Some(&ns), link, &core, "edge-a", answer)?;
    edge.wait_health(200, WAIT)?;
    ensure!(
        edge.health()?.status == 200,
        "the Edge does not serve with Core linked"
    );
    // Past the limit per peer, closed at once; the rest at the TLS
    // handshake's deadline.
    let bound = HANDSHAKE_TIMEOUT + WAIT;
    for (n, stream) in strangers.iter_mut().enumerate().rev() {
        read_all(stream, bound)?;
        let closed = connected.elapsed();
        if n >= LINK_LIMITS.per_peer {
            ensure!(
                closed < WAIT,
                "link connection {n} past the limit was held {closed:?}"
            );
        } else {
            ensure!(
                closed >= HANDSHAKE_TIMEOUT - Duration::from_secs(1),
                "link connection {n} was closed after {closed:?}, before the handshake's deadline"
            );
        }
    }
    let log = edge.log_tail();
    ensure!(
        log.contains("connection limit reached"),
        "the limits were not logged: {log}"
    );
    Ok(())
}

/// A TCP connection to `to` from `from` (any port).
fn connect_from(from: &str, to: SocketAddr) -> Result<TcpStream> {
    let (SocketAddr::V4(to), Ok(from)) = (to, format!("{from}:0").parse::<SocketAddrV4>()) else {
        anyhow::bail!("IPv4 only: {from} to {to}");
    };
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    bind(fd.as_raw_fd(), &SockaddrIn::from(from))?;
    connect(fd.as_raw_fd(), &SockaddrIn::from(to))?;
    Ok(TcpStream::from(fd))
}

/// Everything `stream` sends until the server closes it, and how long
/// that took; at most `bound`.
fn read_all(stream: &mut TcpStream, bound: Duration) -> Result<(Vec<u8>, Duration)> {
    stream.set_read_timeout(Some(bound))?;
    let started = Instant::now();
    let mut read = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => read.extend_from_slice(&buf[..n]),
            Err(error) if error.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(error) => return Err(error).context("the server held the connection"),
        }
        ensure!(started.elapsed() < bound, "the server held the connection");
    }
    Ok((read, started.elapsed()))
}

/// Out of file descriptors, an Edge pauses accepting rather than spin, and
/// serves again once descriptors are free: its limit is lowered, its HTTP
/// and link ports are held open past it, and its CPU time is read meanwhile.
#[test]
fn an_edge_out_of_file_descriptors_does_not_spin_and_recovers() -> Result<()> {
    require_root();
    let run = Run::new()?;
    let ns = Netns::create(&run.netns_name("emfile"))?;
    let pki = TestPki::new(run.dir(), "pki")?;
    let http = addr("127.0.0.1:18092");
    let link = addr("127.0.0.1:17452");
    let config = EdgeConfig::new("edge-a", http, link, pki.issue("edge-a")?);
    let edge = EdgeDaemon::start(&ns, config, run.dir())?;
    let pid = edge.process().pid();
    let limit = libc::rlimit {
        rlim_cur: FD_LIMIT,
        rlim_max: FD_LIMIT,
    };
    // SAFETY: prlimit on a process this test started, with a valid struct.
    let set = unsafe {
        libc::prlimit(
            pid as libc::pid_t,
            libc::RLIMIT_NOFILE,
            &limit,
            std::ptr::null_mut(),
        )
    };
    ensure!(set == 0, "prlimit: {}", std::io::Error::last_os_error());

    let held = ns.run(|| -> Result<Vec<TcpStream>> {
        let mut held = Vec::new();
        // Past the limit on both ports, from addresses of their own (the
        // link's limit per address is not what stops them).
        for n in 0..FD_LIMIT {
            let from = format!("127.0.1.{}", n + 1);
            held.push(connect_from(&from, http)?);
            held.push(connect_from(&from, link)?);
        }
        Ok(held)
    })??;
    std::thread::sleep(Duration::from_millis(500));
    let before = cpu_ticks(pid)?;
    std::thread::sleep(EMFILE_WATCH);
    let used = cpu_ticks(pid)? - before;
    // Clock ticks are 1/100 s.
    let busy = used as f64 / 100.0 / EMFILE_WATCH.as_secs_f64();
    ensure!(
        busy < 0.2,
        "the Edge used {:.0}% of a CPU while out of file descriptors",
        busy * 100.0
    );
    drop(held);
    let health = poll_health(&edge)?;
    ensure!(health == 503, "no Core linked: {health}");
    let log = edge.log_tail();
    ensure!(
        log.contains("accepting a connection failed; pausing"),
        "no accept error logged: {log}"
    );
    Ok(())
}

/// The file descriptor limit the test gives the Edge.
const FD_LIMIT: u64 = 48;
/// How long the Edge's CPU time is watched while it is out of descriptors.
const EMFILE_WATCH: Duration = Duration::from_secs(2);

/// User and system time of process `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The fields after the command's closing parenthesis; utime and stime
    // are the 14th and 15th of the whole line.
    let rest = stat.rsplit_once(')').context("a /proc stat line")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11).context("utime")?.parse()?;
    let stime: u64 = fields.get(12).context("stime")?.parse()?;
    Ok(utime + stime)
}

/// `/health`'s status once the Edge answers again.
fn poll_health(edge: &EdgeDaemon) -> Result<u16> {
    let started = Instant::now();
    loop {
        if let Ok(answer) = edge.health() {
            return Ok(answer.status);
        }
        ensure!(started.elapsed() < WAIT, "the Edge did not answer again");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `tidegate-core issue --renew` while an Edge runs: the next connection to
/// its link port gets the renewed certificate (another serial, another
/// expiry) from the same process; a broken file put in its place is
/// refused, logged, and the renewed certificate stays in use.
#[test]
fn a_renewed_certificate_is_presented_without_a_restart() -> Result<()> {
    require_root();
    let run = Run::new()?;
    let ns = Netns::create(&run.netns_name("renew"))?;
    let pki = CorePki::init(&run.dir().join("pki"))?;
    let core = pki.core_files();
    let files = pki.issue("edge-r")?;
    let link = addr("127.0.0.1:17452");
    let config = EdgeConfig::new("edge-r", addr("127.0.0.1:18092"), link, files.clone());
    let edge = EdgeDaemon::start(&ns, config, run.dir())?;
    let pid = edge.process().pid();

    let (before, after, kept) = ns.run(|| -> Result<_> {
        let before = served_certificate(link, "edge-r", &core)?;
        pki.renew("edge-r", 20)?;
        let after = served_certificate(link, "edge-r", &core)?;
        // Not a certificate: refused, the renewed one stays.
        std::fs::write(&files.cert, "not a certificate")?;
        let kept = served_certificate(link, "edge-r", &core)?;
        Ok((before, after, kept))
    })??;
    ensure!(
        after.serial != before.serial,
        "the same serial {} after renewal",
        after.serial
    );
    ensure!(
        after.not_after_unix < before.not_after_unix - 700 * 24 * 3600,
        "renewed for 20 days, yet notAfter {} (was {})",
        after.not_after_unix,
        before.not_after_unix
    );
    ensure!(
        kept == after,
        "a broken file replaced the certificate: {kept:?}"
    );
    ensure!(edge.process().pid() == pid, "the Edge restarted");
    let log = edge.log_tail();
    ensure!(
        log.contains("this Edge's certificate is valid")
            && log.contains("loaded a new certificate")
            && log.contains("cannot be used"),
        "the expiry at start, the reload and the refusal are not logged:\n{log}"
    );
    // Renewed for 20 days: inside the warning time.
    ensure!(
        log.lines().any(|line| line.contains("WARN")
            && line.contains("the new certificate expires in")
            && line.contains("renew it")),
        "no warning that the renewed certificate expires within 30 days:\n{log}"
    );
    Ok(())
}
