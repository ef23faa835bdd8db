//! `cargo xtask bench core-failover`: how long a takeover between two
//! Cores on PostgreSQL keeps changes and MFA logins waiting, and what
//! PostgreSQL costs beside SQLite, on the control-plane lab
//! ([`tidegate_tests::control`]).
//!
//! * Part 1, takeover: two Cores on one PostgreSQL (lease 600 ms, renew
//!   150 ms, poll 100 ms), a location of two HA gateways, an MFA location
//!   of one gateway, one Edge behind nginx. The leader is SIGKILLed (then
//!   restarted) or SIGSTOPped (then resumed), `runs` times each, two at a
//!   time (the leader alternates between the two Cores, so each signal hits
//!   each). From the signal
//!   (t0), at once and side by side: a device create through the admin API
//!   (gRPC on each Core's Unix socket, retried on both until one takes it),
//!   timed until its peer is live in both gateways' WireGuard (read through
//!   UAPI); and an MFA login through nginx (start and finish, a fresh user
//!   each time a code was spent), timed until a login is served. A refused
//!   answer must be `UNAVAILABLE` with a message (admin) or 503 with a
//!   message (Edge); anything else fails the bench. Targets: median under
//!   1 s and worst under 2 s per series.
//! * Part 2, SQLite beside PostgreSQL: one lab with one Core on SQLite,
//!   then one with two Cores on PostgreSQL (durable: fsync on), each with
//!   an MFA location of one gateway and one Edge: device creates in
//!   sequence through the leader's admin socket (writes/s), and MFA logins
//!   through nginx, each of a fresh user, from the start request to the
//!   finish answered (p50, p99). No target: figures and ratios.

use std::io::{Read as _, Write as _};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use nix::sys::signal::Signal;
use tidegate_core::keys::Key;
use tidegate_proto::admin::v1::{self as admin, admin_client::AdminClient};
use tidegate_tests::control::{LOCATION, SECOND_LOCATION, SecondLocation, core_id};
use tidegate_tests::http::HttpAnswer;
use tidegate_tests::{ControlLab, ControlOptions, Probe, poll_until, require_root};
use tonic::transport::Channel;

const USAGE: &str =
    "usage: core_failover [--runs N] [--writes N] [--logins N] [--only takeover|store]

Part 1 (takeover): N runs (default 10) of the leading Core SIGKILLed and N
of it SIGSTOPped; from the signal, the time until a device create is live
on every gateway and until an MFA login through nginx is served; min /
median / max, PASS when the median is under 1 s and the worst under 2 s.
Part 2 (store): SQLite beside PostgreSQL, --writes device creates in
sequence (default 500) and --logins MFA logins (default 200). Needs root
and the release build (TIDEGATE_BIN_DIR).";

/// Runs of each signal unless `--runs` says otherwise.
const DEFAULT_RUNS: u32 = 10;
/// Device creates of part 2.
const DEFAULT_WRITES: usize = 500;
/// MFA logins of part 2.
const DEFAULT_LOGINS: usize = 200;
/// Targets of part 1 (the issue's), for every series.
const TARGET_MEDIAN_MS: f64 = 1000.0;
const TARGET_MAX_MS: f64 = 2000.0;
/// One admin attempt with no answer within this is abandoned (a paused
/// Core accepts the connection and never answers).
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(3);
/// Pause between admin attempts on one Core.
const ADMIN_RETRY: Duration = Duration::from_millis(10);
/// Pause between login attempts.
const LOGIN_RETRY: Duration = Duration::from_millis(20);
/// A run whose change or login is not through within this fails the bench.
const GIVE_UP: Duration = Duration::from_secs(20);
/// How long a restored Core may take to be a standby with its links up.
const RESTORE_TIMEOUT: Duration = Duration::from_secs(30);
/// How often the gateways' devices are read for the new peer.
const UAPI_POLL: Duration = Duration::from_millis(2);
/// wireguard-go's UAPI sockets.
const UAPI_DIR: &str = "/var/run/wireguard";

fn main() -> ExitCode {
    let options = match parse_args(std::env::args().skip(1)) {
        Ok(options) => options,
        Err(error) => {
            eprintln!("core_failover: {error:#}\n\n{USAGE}");
            return ExitCode::FAILURE;
        }
    };
    match run(&options) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("core_failover: a target was not met");
            ExitCode::FAILURE
        }
        Err(error) => {
            eprintln!("core_failover: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// What to run.
#[derive(Debug, Clone)]
struct Options {
    runs: u32,
    writes: usize,
    logins: usize,
    takeover: bool,
    store: bool,
}

fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Options> {
    let mut options = Options {
        runs: DEFAULT_RUNS,
        writes: DEFAULT_WRITES,
        logins: DEFAULT_LOGINS,
        takeover: true,
        store: true,
    };
    fn number<T: std::str::FromStr>(value: Option<String>, flag: &str) -> Result<T>
    where
        T::Err: std::error::Error + Send + Sync + 'static,
    {
        value
            .with_context(|| format!("{flag} needs a value"))?
            .parse()
            .with_context(|| flag.to_owned())
    }
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--bench" => {}
            "--runs" => options.runs = number(args.next(), "--runs")?,
            "--writes" => options.writes = number(args.next(), "--writes")?,
            "--logins" => options.logins = number(args.next(), "--logins")?,
            "--only" => match args.next().as_deref() {
                Some("takeover") => options.store = false,
                Some("store") => options.takeover = false,
                other => bail!("--only takes takeover or store, not {other:?}"),
            },
            other => bail!("unknown argument {other:?}"),
        }
    }
    ensure!(
        options.runs > 0 && options.writes > 0 && options.logins > 0,
        "--runs, --writes and --logins must be at least 1"
    );
    Ok(options)
}

fn run(options: &Options) -> Result<bool> {
    require_root();
    let mut met = true;
    if options.takeover {
        let series = takeover(options.runs)?;
        met = print_takeover(&series);
    }
    if options.store {
        eprintln!("core_failover: part 2, one Core on SQLite");
        let sqlite = store_figures(1, options.writes, options.logins)?;
        eprintln!("core_failover: part 2, two Cores on PostgreSQL");
        let postgres = store_figures(2, options.writes, options.logins)?;
        print_store(options, &sqlite, &postgres);
    }
    Ok(met)
}

// ---------------------------------------------------------------- figures

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// p-th percentile (nearest rank) of sorted milliseconds.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn sorted(samples: &[f64]) -> Vec<f64> {
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted
}

/// The median (the mean of the middle two of an even count).
fn median(sorted: &[f64]) -> f64 {
    let n = sorted.len();
    if n.is_multiple_of(2) {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    } else {
        sorted[n / 2]
    }
}

// ------------------------------------------------------------- admin API

async fn connect(socket: &Path) -> Result<AdminClient<Channel>> {
    let channel = tonic::transport::Endpoint::from_shared(format!("unix:{}", socket.display()))?
        .connect()
        .await
        .with_context(|| format!("connecting to Core at {}", socket.display()))?;
    Ok(AdminClient::new(channel))
}

fn device_request(name: &str, user: &str, location: &str, key: &Key) -> admin::CreateDeviceRequest {
    admin::CreateDeviceRequest {
        name: name.to_owned(),
        user: user.to_owned(),
        location: location.to_owned(),
        public_key: key.to_base64(),
        ..Default::default()
    }
}

async fn create_user(api: &mut AdminClient<Channel>, name: &str) -> Result<Vec<u8>> {
    let user = api
        .create_user(admin::CreateUserRequest {
            name: name.to_owned(),
            enabled: None,
        })
        .await
        .map_err(|s| anyhow::anyhow!("creating user {name}: {}", s.message()))?
        .into_inner();
    tidegate_core::totp::secret_from_base32(&user.totp_secret)
        .with_context(|| format!("user {name}'s TOTP secret"))
}

async fn create_device(
    api: &mut AdminClient<Channel>,
    request: admin::CreateDeviceRequest,
) -> Result<()> {
    let name = request.name.clone();
    api.create_device(request)
        .await
        .map_err(|s| anyhow::anyhow!("creating device {name}: {}", s.message()))?;
    Ok(())
}

/// A user with one device on the MFA location, to log in once.
struct LoginUser {
    key: Key,
    secret: Vec<u8>,
}

/// Makes `count` users `<prefix><n>`, each with a device on `location`.
async fn login_users(
    api: &mut AdminClient<Channel>,
    prefix: &str,
    location: &str,
    count: usize,
) -> Result<Vec<LoginUser>> {
    let mut users = Vec::with_capacity(count);
    for n in 0..count {
        let name = format!("{prefix}{n}");
        let secret = create_user(api, &name).await?;
        let key = Key::generate_private().public();
        create_device(api, device_request(&name, &name, location, &key)).await?;
        users.push(LoginUser { key, secret });
    }
    Ok(users)
}

/// How one admin attempt on one Core ended, short of success.
enum Attempt {
    /// Core answered with a refusal (a standby, or a leader not ready).
    Refused(Box<tonic::Status>),
    /// No Core answered: the socket refused the connection (a dead Core),
    /// or the call got no answer in time (a paused one).
    NoAnswer,
}

async fn attempt_create(socket: &Path, request: admin::CreateDeviceRequest) -> Result<(), Attempt> {
    let call = async {
        let mut api = connect(socket).await.map_err(|_| Attempt::NoAnswer)?;
        match api.create_device(request).await {
            Ok(_) => Ok(()),
            // An earlier attempt took it, its answer lost.
            Err(status) if status.code() == tonic::Code::AlreadyExists => Ok(()),
            // Made here, not sent by Core: the connection failed.
            Err(status) if std::error::Error::source(&status).is_some() => Err(Attempt::NoAnswer),
            Err(status) => Err(Attempt::Refused(Box::new(status))),
        }
    };
    match tokio::time::timeout(ATTEMPT_TIMEOUT, call).await {
        Ok(outcome) => outcome,
        Err(_) => Err(Attempt::NoAnswer),
    }
}

/// Retries `request` on one Core until it takes it; counts its refusals.
/// A refusal other than `UNAVAILABLE` with a message is an error.
async fn create_on(
    socket: &Path,
    request: &admin::CreateDeviceRequest,
    t0: Instant,
) -> Result<u32> {
    let mut refused = 0;
    loop {
        ensure!(
            t0.elapsed() < GIVE_UP,
            "no Core took device {} within {GIVE_UP:?}",
            request.name
        );
        match attempt_create(socket, request.clone()).await {
            Ok(()) => return Ok(refused),
            Err(Attempt::NoAnswer) => {}
            Err(Attempt::Refused(status)) => {
                ensure!(
                    status.code() == tonic::Code::Unavailable && !status.message().is_empty(),
                    "{} refused a device create with {:?}: {:?}",
                    socket.display(),
                    status.code(),
                    status.message()
                );
                refused += 1;
            }
        }
        tokio::time::sleep(ADMIN_RETRY).await;
    }
}

// -------------------------------------------------------------- WireGuard

fn hex(key: &Key) -> String {
    key.as_bytes().iter().map(|b| format!("{b:02x}")).collect()
}

/// wireguard-go's whole state through its UAPI socket.
fn dump(socket: &Path) -> Result<String> {
    let mut stream = UnixStream::connect(socket)
        .with_context(|| format!("connecting to {}", socket.display()))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.write_all(b"get=1\n\n")?;
    let mut answer = Vec::new();
    let mut chunk = [0u8; 64 * 1024];
    loop {
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            break;
        }
        answer.extend_from_slice(&chunk[..n]);
        if answer.ends_with(b"\n\n") {
            break;
        }
    }
    String::from_utf8(answer).context("UAPI answered invalid UTF-8")
}

/// Reads every device until each lists `key`; when the last did.
fn wait_live(sockets: &[PathBuf], key: &Key, t0: Instant) -> Result<Instant> {
    let needle = format!("public_key={}\n", hex(key));
    let mut pending: Vec<&PathBuf> = sockets.iter().collect();
    let mut last = Instant::now();
    while !pending.is_empty() {
        let mut still = Vec::new();
        for socket in pending {
            if dump(socket)?.contains(&needle) {
                last = Instant::now();
            } else {
                still.push(socket);
            }
        }
        pending = still;
        if !pending.is_empty() {
            ensure!(
                t0.elapsed() < GIVE_UP,
                "peer {key} not live on {} within {GIVE_UP:?}",
                pending
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            std::thread::sleep(UAPI_POLL);
        }
    }
    Ok(last)
}

// ------------------------------------------------------------------ MFA

/// The code of the current TOTP step.
fn code(secret: &[u8]) -> String {
    let now_s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    tidegate_core::totp::code_at(secret, tidegate_core::totp::step_at(now_s))
}

/// How one login through nginx ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Login {
    Served,
    /// The start was refused: the user's code is unspent.
    RefusedAtStart,
    /// The finish was refused: the code may be spent.
    RefusedAtFinish,
}

/// A refusal must be a 503 with a message in its body.
fn check_refusal(answer: &HttpAnswer, what: &str) -> Result<()> {
    let message = answer
        .json()
        .ok()
        .and_then(|body| body["error"]["message"].as_str().map(str::to_owned))
        .unwrap_or_default();
    ensure!(
        answer.status == 503 && !message.is_empty(),
        "{what} answered {} {}",
        answer.status,
        answer.body
    );
    Ok(())
}

/// One MFA login of `user`'s device on `location` through nginx.
fn login(lab: &ControlLab, location: &str, user: &LoginUser) -> Result<Login> {
    let start = lab.post(
        "/api/v1/mfa/start",
        &serde_json::json!({"location": location, "public_key": user.key.to_base64()}),
    )?;
    if start.status != 200 {
        check_refusal(&start, "an MFA start")?;
        return Ok(Login::RefusedAtStart);
    }
    let session = start.json()?["session"]
        .as_str()
        .context("no session in the MFA challenge")?
        .to_owned();
    let finish = lab.post(
        "/api/v1/mfa/finish",
        &serde_json::json!({"session": session, "code": code(&user.secret)}),
    )?;
    if finish.status != 200 {
        check_refusal(&finish, "an MFA finish")?;
        return Ok(Login::RefusedAtFinish);
    }
    Ok(Login::Served)
}

/// Logs in through nginx until a login is served, a fresh user after
/// every refused finish; when it was served and how many were refused.
fn login_until_served(
    lab: &ControlLab,
    users: &mut impl Iterator<Item = LoginUser>,
    t0: Instant,
) -> Result<(Instant, u32)> {
    let mut refused = 0;
    let mut user = users.next().context("no fresh user left to log in")?;
    loop {
        ensure!(
            t0.elapsed() < GIVE_UP,
            "no MFA login served within {GIVE_UP:?}"
        );
        match login(lab, SECOND_LOCATION, &user)? {
            Login::Served => return Ok((Instant::now(), refused)),
            Login::RefusedAtStart => refused += 1,
            Login::RefusedAtFinish => {
                refused += 1;
                user = users.next().context("no fresh user left to log in")?;
            }
        }
        std::thread::sleep(LOGIN_RETRY);
    }
}

// ------------------------------------------------------------- part 1

/// How the leader is taken away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    Kill,
    Stop,
}

impl Fault {
    fn name(self) -> &'static str {
        match self {
            Self::Kill => "SIGKILL",
            Self::Stop => "SIGSTOP",
        }
    }
}

/// The four series of part 1, in ms from the signal, and the refusals.
#[derive(Debug, Default)]
struct Takeover {
    kill_applied: Vec<f64>,
    kill_login: Vec<f64>,
    stop_applied: Vec<f64>,
    stop_login: Vec<f64>,
    /// Admin refusals (`UNAVAILABLE`) and Edge refusals (503), all runs.
    admin_refused: u32,
    login_refused: u32,
}

/// Waits until Core `k` is a standby that names `leader`, with its links
/// to every gateway and the Edge up, and `leader` has every gateway on its
/// location's version.
fn wait_settled(lab: &ControlLab, k: usize, leader: usize) -> Result<()> {
    let what = format!("core-{k} to be a standby of core-{leader} with its links up");
    poll_until(&what, RESTORE_TIMEOUT, Duration::from_millis(50), || {
        let lease = match lab.core_k(k)?.lease() {
            Ok(lease) => lease,
            Err(e) => return Ok(Probe::NotYet(format!("core-{k}: {e:#}"))),
        };
        if lease.leading || lease.leader != core_id(leader) {
            return Ok(Probe::NotYet(format!("core-{k}: {lease:?}")));
        }
        for location in [LOCATION, SECOND_LOCATION] {
            for (core, applied) in [(k, false), (leader, true)] {
                let status = lab.core_k(core)?.location_status(location)?;
                let version = status["location"]["version"].as_u64().unwrap_or(0);
                let gateways = status["gateways"].as_array().cloned().unwrap_or_default();
                let ready = gateways.iter().all(|g| {
                    g["connected"].as_bool() == Some(true)
                        && (!applied || g["applied_version"].as_u64() == Some(version))
                });
                if gateways.is_empty() || !ready {
                    return Ok(Probe::NotYet(format!("core-{core} {location}: {status}")));
                }
            }
        }
        let edges = lab.core_k(k)?.tidectl_json(&["edge", "list"])?;
        let linked = edges["edges"]
            .as_array()
            .is_some_and(|l| l.iter().all(|e| e["connected"].as_bool() == Some(true)));
        Ok(if linked {
            Probe::Ready(())
        } else {
            Probe::NotYet(format!("core-{k} edges: {edges}"))
        })
    })
}

/// `runs` of each fault, two of a kind in turn: the leader alternates, so
/// each signal hits each Core.
fn schedule(runs: u32) -> Vec<Fault> {
    let (mut kills, mut stops) = (runs, runs);
    let mut faults = Vec::new();
    while kills + stops > 0 {
        for fault in [Fault::Kill, Fault::Kill, Fault::Stop, Fault::Stop] {
            let left = match fault {
                Fault::Kill => &mut kills,
                Fault::Stop => &mut stops,
            };
            if *left > 0 {
                *left -= 1;
                faults.push(fault);
            }
        }
    }
    faults
}

fn takeover(runs: u32) -> Result<Takeover> {
    eprintln!("core_failover: part 1, building the lab (two Cores on PostgreSQL)");
    let mut lab = ControlLab::build(&ControlOptions {
        gateways: 2,
        edges: 1,
        cores: 2,
        second: Some(SecondLocation {
            gateways: 1,
            mfa_threshold_s: 300,
        }),
        ..ControlOptions::default()
    })?;
    let (leader, term) = lab.wait_leader(&[1], Duration::from_secs(10))?;
    eprintln!("  core-{leader} leads at term {term}");
    let sockets: Vec<PathBuf> = (1..=2)
        .map(|k| Ok(lab.core_k(k)?.config().admin_socket.clone()))
        .collect::<Result<_>>()?;
    let uapi: Vec<PathBuf> = (1..=2)
        .map(|i| Path::new(UAPI_DIR).join(format!("{}.sock", lab.gateway(i).wg.interface())))
        .collect();

    // Users to log in: one per served login, and spares for refused
    // finishes (each may have spent its code).
    let count = 6 * runs as usize + 20;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let users = runtime.block_on(async {
        let mut api = connect(&sockets[leader - 1]).await?;
        create_user(&mut api, "bench").await?;
        login_users(&mut api, "m", SECOND_LOCATION, count).await
    })?;
    eprintln!("  {count} users with a device on the MFA location");
    let mut users = users.into_iter();
    login_until_served(&lab, &mut users, Instant::now())?;
    wait_settled(&lab, 3 - leader, leader)?;

    let mut out = Takeover::default();
    for (run, fault) in schedule(runs).into_iter().enumerate() {
        let (leader, term) = lab.wait_leader(&[1, 2], Duration::from_secs(10))?;
        let other = 3 - leader;
        let key = Key::generate_private().public();
        let request = device_request(&format!("f{run}"), "bench", LOCATION, &key);

        let signal = match fault {
            Fault::Kill => Signal::SIGKILL,
            Fault::Stop => Signal::SIGSTOP,
        };
        let t0 = Instant::now();
        lab.core_k_mut(leader)?.signal(signal)?;
        let (applied, login) = std::thread::scope(|scope| {
            let lab = &lab;
            let (sockets, uapi, request, key) = (&sockets, &uapi, &request, &key);
            let changer = scope.spawn(move || -> Result<(Instant, u32)> {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                let refused = runtime.block_on(async {
                    tokio::select! {
                        r = create_on(&sockets[0], request, t0) => r,
                        r = create_on(&sockets[1], request, t0) => r,
                    }
                })?;
                Ok((wait_live(uapi, key, t0)?, refused))
            });
            let users = &mut users;
            let logger = scope.spawn(move || login_until_served(lab, users, t0));
            let applied = changer
                .join()
                .map_err(|_| anyhow::anyhow!("the change thread panicked"))?;
            let login = logger
                .join()
                .map_err(|_| anyhow::anyhow!("the login thread panicked"))?;
            anyhow::Ok((applied?, login?))
        })?;
        let applied_ms = ms(applied.0 - t0);
        let login_ms = ms(login.0 - t0);
        out.admin_refused += applied.1;
        out.login_refused += login.1;
        match fault {
            Fault::Kill => {
                out.kill_applied.push(applied_ms);
                out.kill_login.push(login_ms);
            }
            Fault::Stop => {
                out.stop_applied.push(applied_ms);
                out.stop_login.push(login_ms);
            }
        }

        // Restore the signalled Core as a standby of the new leader.
        let (new_leader, new_term) = lab.wait_leader(&[other], Duration::from_secs(5))?;
        ensure!(
            new_term > term,
            "core-{new_leader} leads at term {new_term}, not past {term}"
        );
        match fault {
            Fault::Kill => {
                let core = lab.core_k_mut(leader)?;
                core.kill()?;
                core.restart()?;
            }
            Fault::Stop => lab.core_k_mut(leader)?.signal(Signal::SIGCONT)?,
        }
        wait_settled(&lab, leader, other)?;
        eprintln!(
            "  run {:>2}: core-{leader} {}: change applied {applied_ms:>7.1} ms ({} refused), \
             login served {login_ms:>7.1} ms ({} refused); core-{other} leads at term {new_term}",
            run + 1,
            fault.name(),
            applied.1,
            login.1,
        );
    }
    Ok(out)
}

/// Prints part 1's table; whether every series met its targets.
fn print_takeover(t: &Takeover) -> bool {
    println!(
        "\ncore takeover: 2 Cores on PostgreSQL (lease 600 ms, renew 150 ms, poll 100 ms), \
         {} runs of each signal\n",
        t.kill_applied.len()
    );
    println!(
        "{:<44} {:>8} {:>10} {:>8}  target",
        "from the signal to", "min ms", "median ms", "max ms"
    );
    let mut met = true;
    for (label, samples) in [
        ("SIGKILL: change live on both gateways", &t.kill_applied),
        ("SIGKILL: MFA login served", &t.kill_login),
        ("SIGSTOP: change live on both gateways", &t.stop_applied),
        ("SIGSTOP: MFA login served", &t.stop_login),
    ] {
        let s = sorted(samples);
        let (min, med, max) = (s[0], median(&s), s[s.len() - 1]);
        let pass = med < TARGET_MEDIAN_MS && max < TARGET_MAX_MS;
        met &= pass;
        println!(
            "{label:<44} {min:>8.1} {med:>10.1} {max:>8.1}  {}",
            if pass { "PASS" } else { "FAIL" }
        );
    }
    println!(
        "\ntargets: median < {TARGET_MEDIAN_MS} ms, max < {TARGET_MAX_MS} ms; refused on the \
         way: {} admin calls (UNAVAILABLE), {} Edge answers (503), every one with a message",
        t.admin_refused, t.login_refused
    );
    met
}

// ------------------------------------------------------------- part 2

/// Part 2's figures for one store.
struct StoreFigures {
    writes_per_s: f64,
    write_p50: f64,
    write_p99: f64,
    login_p50: f64,
    login_p99: f64,
}

fn store_figures(cores: usize, writes: usize, logins: usize) -> Result<StoreFigures> {
    let lab = ControlLab::build(&ControlOptions {
        gateways: 1,
        edges: 1,
        cores,
        mfa_threshold_s: Some(300),
        // Room for every device: a /24 holds 253.
        tunnel_address: "10.76.0.1/15".into(),
        ..ControlOptions::default()
    })?;
    let leader = if cores > 1 {
        lab.wait_leader(&[1], Duration::from_secs(10))?.0
    } else {
        1
    };
    let socket = lab.core_k(leader)?.config().admin_socket.clone();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut api = runtime.block_on(connect(&socket))?;
    runtime.block_on(create_user(&mut api, "bench"))?;
    let mut calls = Vec::with_capacity(writes);
    let start = Instant::now();
    for n in 0..writes {
        let key = Key::generate_private().public();
        let call = Instant::now();
        runtime.block_on(create_device(
            &mut api,
            device_request(&format!("w{n}"), "bench", LOCATION, &key),
        ))?;
        calls.push(ms(call.elapsed()));
    }
    let writes_per_s = writes as f64 / start.elapsed().as_secs_f64();
    let calls = sorted(&calls);

    // One more user than timed: the first login warms the path.
    let users = runtime.block_on(login_users(&mut api, "m", LOCATION, logins + 1))?;
    let mut times = Vec::with_capacity(logins);
    for (n, user) in users.iter().enumerate() {
        let start = Instant::now();
        let outcome = login(&lab, LOCATION, user)?;
        ensure!(outcome == Login::Served, "login {n}: {outcome:?}");
        if n > 0 {
            times.push(ms(start.elapsed()));
        }
    }
    let times = sorted(&times);
    Ok(StoreFigures {
        writes_per_s,
        write_p50: percentile(&calls, 50.0),
        write_p99: percentile(&calls, 99.0),
        login_p50: percentile(&times, 50.0),
        login_p99: percentile(&times, 99.0),
    })
}

fn print_store(options: &Options, sqlite: &StoreFigures, postgres: &StoreFigures) {
    println!(
        "\nstore: one Core on SQLite beside two Cores on PostgreSQL (durable), MFA location, \
         1 gateway, 1 Edge\n"
    );
    println!(
        "{:<46} {:>10} {:>11} {:>10}",
        "", "SQLite", "PostgreSQL", "PG/SQLite"
    );
    for (label, s, p) in [
        (
            format!("admin writes/s ({} device creates)", options.writes),
            sqlite.writes_per_s,
            postgres.writes_per_s,
        ),
        (
            "  one create, p50 ms".to_owned(),
            sqlite.write_p50,
            postgres.write_p50,
        ),
        (
            "  one create, p99 ms".to_owned(),
            sqlite.write_p99,
            postgres.write_p99,
        ),
        (
            format!("MFA login p50 ms ({} logins)", options.logins),
            sqlite.login_p50,
            postgres.login_p50,
        ),
        (
            "MFA login p99 ms".to_owned(),
            sqlite.login_p99,
            postgres.login_p99,
        ),
    ] {
        println!("{label:<46} {s:>10.1} {p:>11.1} {:>10.2}", p / s);
    }
}
