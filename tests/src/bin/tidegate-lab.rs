//! `tidegate-lab`: a whole Tidegate location in network namespaces, walked
//! through step by step with the figures it measured. `cargo xtask lab`
//! runs it.
//!
//! Two Cores on PostgreSQL, one leading (no inbound port), dial three
//! gateways in director mode with failover continuity, a fourth gateway
//! serving an MFA location, and two Edges behind nginx (HTTPS). The operator creates users and devices with
//! `tidectl`; each client enrols with `tidegate-client` and a one-time
//! token, logs in with a TOTP code on the MFA location, and probes the
//! gateways through its tunnel for the whole run. Then: the director's
//! spread, the master's crash, a planned handover, a drain, an Edge killed
//! while devices enrol, every Core stopped and back, the leading Core
//! killed while the other takes over. A table of the figures and
//! an SVG picture of every client's probes end the run. Exit status 0
//! means every step held; everything is torn down, also on failure.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use tidegate_tests::continuity::{
    ClientOptions, KeepalivedTunnel, finish_probers, wait_fresh_handshakes, wait_tunnels_answer,
};
use tidegate_tests::control::{
    ECHO_PORT, GATEWAY_TUNNEL, LOCATION, SECOND_LOCATION, SECOND_TUNNEL, SecondLocation, VIP,
    WG_PORT,
};
use tidegate_tests::failover::{AddrMonitor, Spread, unix_ms_now};
use tidegate_tests::ha::{HaOptions, Prober, start_prober_paced};
use tidegate_tests::lab_report::{self, Figure, Lane, Mark, Window};
use tidegate_tests::metrics;
use tidegate_tests::packets::{malformed_kinds, send_paced};
use tidegate_tests::probe::ProbeSummary;
use tidegate_tests::user_client::UserClient;
use tidegate_tests::wait::{Probe, poll_until};
use tidegate_tests::{ControlLab, ControlOptions, Netns, XdpMode};

/// Clients when `--clients` is not given.
const DEFAULT_CLIENTS: usize = 20;
/// Clients of the MFA location; the others are the director's.
const MFA_CLIENTS: usize = 4;
/// The fewest clients: three for the director, the MFA location's.
const MIN_CLIENTS: usize = MFA_CLIENTS + 3;
/// The most (the lab's public addresses).
const MAX_CLIENTS: usize = 100;
/// Devices enrolled while an Edge is killed.
const EDGE_KILL_DEVICES: usize = 8;
/// The MFA location's peer-disconnect threshold: short, so that the lab
/// sees a peer expire.
const MFA_THRESHOLD_S: u32 = 6;
/// Probes are bounded: at most this many per client (10 minutes at the
/// host's pace).
const MAX_PROBES: u64 = 30_000;
/// How often a prober rewrites its summary while it probes.
const SNAPSHOT: Duration = Duration::from_millis(200);
/// Quiet time around a step, so its window holds probes before and after.
const QUIET: Duration = Duration::from_millis(1500);
/// The longest a step may take to settle, on the host (stretched where
/// the CPUs are emulated).
const STEP_TIMEOUT: Duration = Duration::from_secs(30);
/// Malformed datagrams of each kind sent at the VIP.
const MALFORMED_PER_KIND: u32 = 20;
/// Where `--keep` records the lab's process id, for `--stop`.
const PID_FILE: &str = "/run/tidegate-lab.pid";
/// Users' names (more clients get numbered names).
const NAMES: [&str; 20] = [
    "ana", "ben", "cai", "dan", "eva", "fay", "gus", "hal", "ida", "jon", "kim", "lea", "max",
    "ned", "oli", "pam", "quin", "ray", "sam", "tia",
];

const USAGE: &str = "usage: tidegate-lab [--clients N] [--compare] [--keep] [--report DIR]
                    [--xdp-mode auto|driver|generic]
       tidegate-lab --stop

Builds a whole Tidegate location in network namespaces: Core, two Edges
behind nginx, three gateways in director mode with failover continuity, a
gateway of an MFA location, and N WireGuard clients (default 20; the last 4
on the MFA location) enrolled with tidegate-client. Then walks through the
director's spread, the master's crash, a planned handover, a drain, an Edge
killed while devices enrol, and Core stopped and back, narrating what it
measured; ends with a table and an SVG picture of every client's probes,
written to DIR (default: the current directory).
  --compare  also runs keepalived + WireGuard through the same crash
  --keep     leaves the location running until Ctrl-C or `tidegate-lab --stop`
  --stop     tears down a location left running by --keep
Needs root. The binaries are taken from $TIDEGATE_BIN_DIR (set by `cargo
xtask lab`), else from the directory of this executable.";

#[derive(Debug, Clone, PartialEq)]
struct Options {
    clients: usize,
    compare: bool,
    keep: bool,
    stop: bool,
    report: PathBuf,
    xdp_mode: XdpMode,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            clients: DEFAULT_CLIENTS,
            compare: false,
            keep: false,
            stop: false,
            report: PathBuf::from("."),
            xdp_mode: XdpMode::Auto,
        }
    }
}

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
    let result = if options.stop {
        stop_kept()
    } else {
        run(&options)
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("\nlab failed: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Parses the command line; `None` means help was asked for.
fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Option<Options>> {
    let mut options = Options::default();
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((flag, value)) if flag.starts_with("--") => {
                (flag.to_owned(), Some(value.to_owned()))
            }
            _ => (arg.clone(), None),
        };
        let mut value = || -> Result<String> {
            match &inline {
                Some(value) => Ok(value.clone()),
                None => args.next().with_context(|| format!("{flag} needs a value")),
            }
        };
        match flag.as_str() {
            "-h" | "--help" => return Ok(None),
            "--clients" => {
                let n: usize = value()?.parse().context("--clients")?;
                ensure!(
                    (MIN_CLIENTS..=MAX_CLIENTS).contains(&n),
                    "--clients {n} is outside {MIN_CLIENTS}..={MAX_CLIENTS}"
                );
                options.clients = n;
            }
            "--report" => options.report = PathBuf::from(value()?),
            "--xdp-mode" => options.xdp_mode = value()?.parse::<XdpMode>()?,
            "--compare" | "--keep" | "--stop" if inline.is_some() => {
                bail!("{flag} takes no value")
            }
            "--compare" => options.compare = true,
            "--keep" => options.keep = true,
            "--stop" => options.stop = true,
            other => bail!("unknown argument {other:?}"),
        }
    }
    ensure!(
        !(options.stop && (options.keep || options.compare)),
        "--stop stands alone"
    );
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

/// Prints a block (a table) indented under a step.
fn block(text: &str) {
    for line in text.lines() {
        println!("      {line}");
    }
}

/// One user's client: its namespace, its `tidegate-client`, its prober.
struct LabClient {
    user: String,
    device: String,
    /// 1: the director's location; 2: the MFA location.
    location: usize,
    /// The client namespace's number in the lab (1-based).
    k: usize,
    /// The profile's (and the interface's) name.
    profile: String,
    client: UserClient,
    /// The TOTP secret (MFA location).
    secret: Option<String>,
    prober: Option<Prober>,
    /// Its last summary (after the prober ended).
    summary: Option<ProbeSummary>,
    /// Its tunnel is up.
    up: bool,
}

impl LabClient {
    /// What it probes: its location's gateways' echo, through the tunnel.
    fn target(&self) -> SocketAddr {
        let tunnel = if self.location == 1 {
            GATEWAY_TUNNEL
        } else {
            SECOND_TUNNEL
        };
        SocketAddr::from((tunnel, ECHO_PORT))
    }

    /// Its latest summary: the prober's snapshot while it runs.
    fn latest(&self) -> Result<Option<ProbeSummary>> {
        match &self.prober {
            Some(prober) => prober.snapshot(),
            None => Ok(self.summary.clone()),
        }
    }
}

/// The namespace of client `k` (1-based).
fn client_netns(lab: &ControlLab, k: usize) -> &Netns {
    if k == 1 {
        lab.client()
    } else {
        lab.other_client(k)
    }
}

/// A user's name.
fn user_name(k: usize) -> String {
    NAMES
        .get(k - 1)
        .map_or_else(|| format!("user{k}"), |name| (*name).to_owned())
}

/// Everything the steps record for the report.
struct Record {
    figures: Vec<Figure>,
    marks: Vec<Mark>,
}

impl Record {
    fn figure(&mut self, step: &str, what: &str, value: impl Into<String>) {
        self.figures.push(Figure::new(step, what, value));
    }

    fn mark(&mut self, at_unix_ms: u64, label: impl Into<String>) {
        self.marks.push(Mark {
            at_unix_ms,
            label: label.into(),
        });
    }
}

fn now_ms() -> u64 {
    unix_ms_now() as u64
}

fn run(options: &Options) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("the lab needs root (namespaces, XDP): run `cargo xtask lab` as root");
    }
    std::fs::create_dir_all(&options.report)
        .with_context(|| format!("creating {}", options.report.display()))?;
    let started = Instant::now();
    let mut record = Record {
        figures: Vec::new(),
        marks: Vec::new(),
    };
    location(options, &mut record)?;
    println!(
        "\nlab passed in {:.0} s: every step held; every namespace and process removed",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The location, its steps, the comparison, the report; then `--keep`'s
/// wait, and the teardown.
fn location(options: &Options, record: &mut Record) -> Result<()> {
    step(
        1,
        "the location: 2 Cores on PostgreSQL, 2 Edges behind nginx, 3 director gateways, an MFA location's gateway",
    );
    let built = Instant::now();
    let mut lab = ControlLab::build(&ControlOptions {
        gateways: 3,
        edges: 2,
        director: true,
        second: Some(SecondLocation {
            gateways: 1,
            mfa_threshold_s: MFA_THRESHOLD_S,
        }),
        clients: options.clients,
        xdp_mode: options.xdp_mode,
        metrics: true,
        cores: 2,
        ..ControlOptions::default()
    })?;
    lab.start_echoes()?;
    // Nothing but its metrics endpoint on its own loopback.
    let listening = lab.intranet().exec_ok("ss", &["-Htln"])?;
    let reachable: Vec<&str> = listening
        .lines()
        .filter(|line| !line.contains("127.0.0.1:"))
        .collect();
    ensure!(reachable.is_empty(), "Core listens: {listening}");
    let listening = lab.core_k(2)?.netns().exec_ok("ss", &["-Htln"])?;
    ensure!(
        listening.trim().is_empty(),
        "the second Core listens: {listening}"
    );
    let names: Vec<String> = Netns::list()?
        .into_iter()
        .filter(|n| n.contains(&lab.run().netns_name("")))
        .collect();
    say(&format!(
        "built in {:.1} s: {} namespaces; the Cores listen on no port outside their namespaces; each dials 4 gateways and 2 Edges, core-1 leads",
        built.elapsed().as_secs_f64(),
        names.len()
    ));
    say(&format!(
        "location {LOCATION:?}: VIP {VIP}, gw1-gw3 in director mode; location {SECOND_LOCATION:?} (MFA): gw4; users reach {}",
        lab.edge_url()
    ));
    let backend = lab
        .gateway(1)
        .wg
        .pid()?
        .map_or("kernel WireGuard", |_| "wireguard-go");
    say(&format!("WireGuard: {backend}"));
    record.figure(
        "location",
        "built",
        format!("{:.1} s", built.elapsed().as_secs_f64()),
    );

    let clients = enrol(&mut lab, options, record)?;
    let mut clients = connect(&lab, clients, record)?;
    let result = steps(&mut lab, &mut clients, options, record);
    // Probers end first, together: their summaries make the picture.
    for prober in clients.iter_mut().filter_map(|c| c.prober.as_mut()) {
        prober.request_stop()?;
    }
    for client in &mut clients {
        if let Some(prober) = client.prober.take() {
            client.summary = Some(prober.wait(step_timeout())?);
        }
    }
    let picture = picture(&lab, &clients, record, options)?;
    let worst_gap = match result {
        Ok(gap) => gap,
        Err(err) => {
            println!("\nthe run's picture: {}", picture.display());
            return Err(err);
        }
    };
    println!("\nthe run's picture: {}", picture.display());
    if options.compare {
        compare(options, worst_gap, record)?;
    }
    println!("\nfigures:");
    block(&lab_report::table(&record.figures));
    if options.keep {
        keep(&mut lab, &clients)?;
    }

    step(13, "teardown");
    for client in clients.iter_mut().filter(|c| c.up) {
        // A Ctrl-C reaches the clients too: theirs may be down already.
        if client.client.status(&client.profile)?["up"] == true {
            client.client.down(&client.profile)?;
        }
    }
    drop(clients);
    drop(lab);
    let listed = Netns::list()?;
    let survivors: Vec<&String> = names.iter().filter(|n| listed.contains(n)).collect();
    ensure!(
        survivors.is_empty(),
        "namespaces survived teardown: {survivors:?}"
    );
    say("every client down; every namespace, daemon and XDP program removed");
    Ok(())
}

/// Step 2: users and devices by `tidectl`, enrolled by `tidegate-client`.
fn enrol(lab: &mut ControlLab, options: &Options, record: &mut Record) -> Result<Vec<LabClient>> {
    step(
        2,
        "users enrol: tidectl makes users and devices, each client enrols with a one-time token",
    );
    let at = Instant::now();
    let mut clients = Vec::new();
    for k in 1..=options.clients {
        let location = if k > options.clients - MFA_CLIENTS {
            2
        } else {
            1
        };
        let user = user_name(k);
        let device = format!("{user}-laptop");
        let core = lab.core()?;
        let created = core.tidectl_json(&["user", "create", &user])?;
        let secret = created["totp_secret"].as_str().map(str::to_owned);
        let location_name = if location == 1 {
            LOCATION
        } else {
            SECOND_LOCATION
        };
        core.tidectl_ok(&[
            "device",
            "create",
            &device,
            "--user",
            &user,
            "--location",
            location_name,
        ])?;
        clients.push(LabClient {
            client: UserClient::new(
                client_netns(lab, k),
                &lab.dir().join(format!("client-{user}")),
            )?,
            profile: lab.run().ifname(&format!("u{k}")),
            secret: (location == 2).then_some(secret).flatten(),
            user,
            device,
            location,
            k,
            prober: None,
            summary: None,
            up: false,
        });
    }
    let url = lab.edge_url();
    let ca = lab.web_ca().to_owned();
    let tokens = clients
        .iter()
        .map(|c| token(lab, &c.device))
        .collect::<Result<Vec<_>>>()?;
    let timings = in_parallel(&mut clients, |client, i| {
        let at = Instant::now();
        client
            .client
            .enrol(&url, &tokens[i], &ca, &client.profile)?;
        Ok(at.elapsed().as_secs_f64() * 1000.0)
    })?;
    for client in &clients {
        let key = lab
            .core()?
            .tidectl_json(&["device", "show", &client.device])?;
        ensure!(
            key["public_key"].as_str().is_some_and(|k| !k.is_empty()),
            "Core holds no key for {}: {key}",
            client.device
        );
    }
    let spread = Spread::of(&timings)?;
    say(&format!(
        "{} devices enrolled through nginx and an Edge in {:.1} s (each {} ms); Core holds every public key, no private key left a client",
        clients.len(),
        at.elapsed().as_secs_f64(),
        spread.show(0)
    ));
    record.figure("enrol", "devices", clients.len().to_string());
    record.figure(
        "enrol",
        "time per device (min/median/max)",
        format!("{} ms", spread.show(0)),
    );
    Ok(clients)
}

/// A one-time download token for `device`.
fn token(lab: &ControlLab, device: &str) -> Result<String> {
    let token = lab.core()?.tidectl_json(&["device", "token", device])?;
    Ok(token["token"]
        .as_str()
        .context("no token printed")?
        .to_owned())
}

/// Runs `work` on every client, a few at a time, and returns its results in
/// order.
fn in_parallel<T: Send>(
    clients: &mut [LabClient],
    work: impl Fn(&mut LabClient, usize) -> Result<T> + Sync,
) -> Result<Vec<T>> {
    const AT_ONCE: usize = 8;
    let mut results = Vec::with_capacity(clients.len());
    for (chunk_index, chunk) in clients.chunks_mut(AT_ONCE).enumerate() {
        let chunk_results: Vec<Result<T>> = std::thread::scope(|scope| {
            let handles: Vec<_> = chunk
                .iter_mut()
                .enumerate()
                .map(|(j, client)| {
                    let work = &work;
                    scope.spawn(move || work(client, chunk_index * AT_ONCE + j))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(anyhow::anyhow!("a worker panicked")))
                })
                .collect()
        });
        for result in chunk_results {
            results.push(result?);
        }
    }
    Ok(results)
}

/// Step 3: tunnels up (MFA logins with TOTP codes), probers started.
fn connect(
    lab: &ControlLab,
    mut clients: Vec<LabClient>,
    record: &mut Record,
) -> Result<Vec<LabClient>> {
    step(
        3,
        "tunnels up: tidegate-client up (MFA users log in with a TOTP code from oathtool), probes through every tunnel",
    );
    let at = Instant::now();
    let timings = in_parallel(&mut clients, |client, _| {
        let at = Instant::now();
        let args: Vec<String> = match &client.secret {
            Some(secret) => vec![
                "--code-command".into(),
                format!("oathtool --totp -b {secret}"),
            ],
            None => Vec::new(),
        };
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        client.client.up(&client.profile, &args)?;
        client.up = true;
        Ok(at.elapsed().as_secs_f64() * 1000.0)
    })?;
    let spread = Spread::of(&timings)?;
    let probe_dir = lab.dir().join("probes");
    std::fs::create_dir_all(&probe_dir)?;
    for client in &mut clients {
        client.prober = Some(start_prober_paced(
            client_netns(lab, client.k),
            client.target(),
            &probe_dir,
            &client.user,
            MAX_PROBES,
            probe_interval(),
            Some(SNAPSHOT),
        )?);
    }
    let mfa = clients.iter().filter(|c| c.location == 2).count();
    say(&format!(
        "{} tunnels up in {:.1} s (each {} ms), {mfa} of them after an MFA login; every client probes its gateways' echo every {} ms",
        clients.len(),
        at.elapsed().as_secs_f64(),
        spread.show(0),
        probe_interval().as_millis()
    ));
    let now = now_ms();
    wait_answering(&clients, now, step_timeout())?;
    record.figure(
        "tunnels",
        "up (min/median/max)",
        format!("{} ms", spread.show(0)),
    );
    record.mark(now, "probing");
    Ok(clients)
}

/// How long a step may take to settle on this machine.
fn step_timeout() -> Duration {
    tidegate_tests::pace::stretch(STEP_TIMEOUT)
}

/// How often clients probe: every 20 ms on the host, 50 ms where the CPUs
/// are emulated.
fn probe_interval() -> Duration {
    Duration::from_millis(tidegate_tests::pace::load(20, 50))
}

/// Waits until every probing client's snapshot reaches a second past
/// `since_unix_ms` and ends in answered probes.
fn wait_answering(clients: &[LabClient], since_unix_ms: u64, timeout: Duration) -> Result<()> {
    poll_until(
        "every client's probes answered",
        timeout,
        Duration::from_millis(100),
        || {
            let mut waiting = Vec::new();
            for client in clients.iter().filter(|c| c.prober.is_some()) {
                let answered = client.latest()?.is_some_and(|s| {
                    let end = s.started_unix_ms as f64 + s.sent as f64 * s.interval_ms;
                    end >= since_unix_ms as f64 + 1000.0
                        && s.runs.last().is_some_and(|r| r.gateway.is_some())
                });
                if !answered {
                    waiting.push(client.user.as_str());
                }
            }
            Ok(if waiting.is_empty() {
                Probe::Ready(())
            } else {
                Probe::NotYet(format!("waiting for {waiting:?}"))
            })
        },
    )
}

/// Waits until every running prober's snapshot covers `until_unix_ms`,
/// then returns each client's window from `from_unix_ms`.
fn windows(
    clients: &[LabClient],
    from_unix_ms: u64,
    until_unix_ms: u64,
) -> Result<Vec<(usize, Window)>> {
    let summaries = poll_until(
        "the probers' snapshots",
        step_timeout(),
        Duration::from_millis(50),
        || {
            let mut out = Vec::new();
            for (i, client) in clients
                .iter()
                .enumerate()
                .filter(|(_, c)| c.prober.is_some())
            {
                match client.latest()? {
                    Some(s)
                        if s.started_unix_ms as f64 + s.sent as f64 * s.interval_ms
                            >= until_unix_ms as f64 =>
                    {
                        out.push((i, s));
                    }
                    _ => return Ok(Probe::NotYet(format!("{}'s snapshot", client.user))),
                }
            }
            Ok(Probe::Ready(out))
        },
    )?;
    Ok(summaries
        .into_iter()
        .map(|(i, s)| (i, Window::of(&s, from_unix_ms, until_unix_ms)))
        .collect())
}

/// Probes every client lost from `from_unix_ms` until now.
fn lost_since(clients: &[LabClient], from_unix_ms: u64) -> Result<u64> {
    Ok(windows(clients, from_unix_ms, now_ms())?
        .iter()
        .map(|(_, w)| w.lost)
        .sum())
}

/// Steps 4 to 11; returns the worst probe gap of the crash.
fn steps(
    lab: &mut ControlLab,
    clients: &mut [LabClient],
    options: &Options,
    record: &mut Record,
) -> Result<f64> {
    election(lab, clients, record)?;
    shield(lab, record)?;
    let worst_gap = crash(lab, clients, record)?;
    handover(lab, clients, record)?;
    drain(lab, clients, record)?;
    edge_kill(lab, clients, options, record)?;
    core_away(lab, clients, record)?;
    core_takeover(lab, clients, record)?;
    Ok(worst_gap)
}

/// The director's gateways (1 to 3), by lab number.
const DIRECTOR_GATEWAYS: [usize; 3] = [1, 2, 3];

/// Clients pinned per gateway, from the master's `tidectl sessions`.
fn pins(lab: &mut ControlLab, master: usize) -> Result<BTreeMap<u32, usize>> {
    let json = lab
        .gateway_mut(master)
        .daemon
        .tidectl_ok(&["sessions", "--json"])?;
    let sessions: Vec<tidegate_gateway::xdp::SessionEntry> =
        serde_json::from_str(&json).with_context(|| format!("parsing sessions {json}"))?;
    let mut per = BTreeMap::new();
    for session in sessions {
        *per.entry(session.gateway_id).or_insert(0) += 1;
    }
    Ok(per)
}

/// Step 4: the election and the director's spread.
fn election(lab: &mut ControlLab, clients: &[LabClient], record: &mut Record) -> Result<()> {
    step(4, "election and the director's spread");
    let master = lab.wait_master(step_timeout())?;
    let of_director = clients.iter().filter(|c| c.location == 1).count();
    let per = poll_until(
        "every director client pinned",
        step_timeout(),
        Duration::from_millis(100),
        || {
            let per = pins(lab, master)?;
            let pinned: usize = per.values().sum();
            Ok(if pinned >= of_director {
                Probe::Ready(per)
            } else {
                Probe::NotYet(format!("{pinned} of {of_director} pinned: {per:?}"))
            })
        },
    )?;
    let shares: Vec<String> = per.iter().map(|(g, n)| format!("gw{g} {n}")).collect();
    say(&format!(
        "gw{master} is master and directs; clients per gateway: {}",
        shares.join(", ")
    ));
    ensure!(
        per.len() >= 2,
        "the director sent every client to one gateway: {per:?}"
    );
    let mfa_master = lab.wait_master_of(2, step_timeout())?;
    say(&format!(
        "the MFA location's gw{mfa_master} serves its {} clients",
        clients.len() - of_director
    ));
    record.figure("spread", "clients per gateway", shares.join(", "));
    Ok(())
}

/// Step 5: malformed WireGuard at the VIP, dropped and counted by reason.
fn shield(lab: &mut ControlLab, record: &mut Record) -> Result<()> {
    step(5, "the shield: malformed WireGuard datagrams at the VIP");
    let master = lab.wait_master(step_timeout())?;
    let before = lab.gateway_mut(master).daemon.counters()?;
    let mut sent: BTreeMap<&str, u64> = BTreeMap::new();
    let from = lab.client();
    for kind in malformed_kinds() {
        let payload = kind.payload.clone();
        let n = from.run(move || -> Result<u32> {
            let socket = std::net::UdpSocket::bind("0.0.0.0:0")?;
            send_paced(
                &socket,
                SocketAddr::from((VIP, WG_PORT)),
                &payload,
                MALFORMED_PER_KIND,
            )
        })??;
        *sent.entry(kind.counter).or_default() += u64::from(n);
    }
    let total: u64 = sent.values().sum();
    let after = poll_until(
        "the drops counted",
        step_timeout(),
        Duration::from_millis(50),
        || {
            let now = lab.gateway_mut(master).daemon.counters()?;
            Ok(if now.total_growth(&before, "drop")? >= total {
                Probe::Ready(now)
            } else {
                Probe::NotYet("counting".into())
            })
        },
    )?;
    let mut parts = Vec::new();
    for (counter, n) in &sent {
        let got = after.counter_growth(&before, counter)?;
        ensure!(got == *n, "{counter}: sent {n}, counted {got}");
        parts.push(format!("{counter} {got}"));
    }
    say(&format!(
        "{total} datagrams to {VIP}:{WG_PORT}, every one dropped by gw{master}'s XDP program and counted: {}",
        parts.join(", ")
    ));
    record.figure(
        "shield",
        "malformed datagrams dropped",
        format!("{total} of {total}"),
    );
    Ok(())
}

/// The failover reports of gateway `gateway` (its lab number) from
/// `since_unix_ms` on.
fn failover_reports(
    lab: &mut ControlLab,
    gateway: usize,
    since_unix_ms: u64,
) -> Result<Vec<tidegate_gateway::wireguard::kick::FailoverReport>> {
    let status = lab.gateway_mut(gateway).status()?;
    Ok(status
        .failovers
        .into_iter()
        .filter(|r| {
            r.meta
                .at
                .duration_since(std::time::UNIX_EPOCH)
                .is_ok_and(|d| d.as_millis() as u64 >= since_unix_ms)
        })
        .collect())
}

/// Step 6: the master crashes.
fn crash(lab: &mut ControlLab, clients: &[LabClient], record: &mut Record) -> Result<f64> {
    step(6, "the master crashes (SIGKILL, link down)");
    let master = lab.wait_master(step_timeout())?;
    let pinned = pins(lab, master)?;
    // The VIP's arrival on each backup's interface, as `ip monitor` sees it.
    let mut monitors = BTreeMap::new();
    for g in DIRECTOR_GATEWAYS.into_iter().filter(|&g| g != master) {
        let gateway = lab.gateway(g);
        let log = gateway.dir.join("addresses.log");
        monitors.insert(g, AddrMonitor::start(&gateway.netns, &log)?);
    }
    std::thread::sleep(QUIET);
    let t0 = now_ms();
    lab.gateway_mut(master).crash()?;
    record.mark(t0, format!("gw{master} crashed"));
    let new = lab.wait_master(step_timeout())?;
    wait_answering(clients, t0, step_timeout())?;
    let became = lab
        .gateway_mut(new)
        .status()?
        .last_change_to(tidegate_tests::ha::Role::Master)
        .map_or(0, |t| t.at_ms);
    let public = lab.gateway(new).public.clone();
    let monitor = monitors
        .get_mut(&new)
        .context("no monitor on the new master")?;
    let vip_at = poll_until(
        "the VIP on the new master's interface",
        step_timeout(),
        Duration::from_millis(50),
        || {
            Ok(match monitor.first_add_after(&public, VIP, t0 as f64)? {
                Some(at) => Probe::Ready(at),
                None => Probe::NotYet("not yet".into()),
            })
        },
    )?;
    drop(monitors);
    let detection = became.saturating_sub(t0);
    let vip_move = (vip_at - became as f64).max(0.0);
    let survivors: Vec<usize> = DIRECTOR_GATEWAYS
        .into_iter()
        .filter(|&g| g != master)
        .collect();
    // Every kicked handshake completes.
    let (kicked, completed) = poll_until(
        "the kicked handshakes to complete",
        step_timeout(),
        Duration::from_millis(100),
        || {
            let (mut kicked, mut completed) = (0, 0);
            for &g in &survivors {
                for r in failover_reports(lab, g, t0)? {
                    kicked += r.kicked;
                    completed += r.completed;
                }
            }
            Ok(if completed >= kicked {
                Probe::Ready((kicked, completed))
            } else {
                Probe::NotYet(format!("{completed} of {kicked}"))
            })
        },
    )?;
    std::thread::sleep(QUIET);
    let windows = windows(clients, t0, now_ms())?;
    let director_windows = || windows.iter().filter(|(i, _)| clients[*i].location == 1);
    let gaps: Vec<f64> = director_windows().map(|(_, w)| w.longest_gap_ms).collect();
    let gap = Spread::of(&gaps)?;
    let moved = pinned.get(&(master as u32)).copied().unwrap_or(0);
    let worst = director_windows()
        .max_by(|a, b| a.1.longest_gap_ms.total_cmp(&b.1.longest_gap_ms))
        .map(|(i, w)| format!("{}, answered by {:?}", clients[*i].user, w.answered_by))
        .unwrap_or_default();
    let mfa_lost: u64 = windows
        .iter()
        .filter(|(i, _)| clients[*i].location == 2)
        .map(|(_, w)| w.lost)
        .sum();
    say(&format!(
        "gw{new} became master {detection} ms after the crash; the VIP was on its interface {vip_move:.0} ms later"
    ));
    say(&format!(
        "gw{master}'s {moved} clients were inherited: {kicked} handshakes kicked, {completed} completed"
    ));
    say(&format!(
        "every client answers again; longest probe gap per client: {} ms (the longest: {worst})",
        gap.show(0)
    ));
    say(&format!(
        "the MFA location lost {mfa_lost} probes meanwhile"
    ));
    record.figure(
        "crash",
        "detection (crash to new master)",
        format!("{detection} ms"),
    );
    record.figure(
        "crash",
        "VIP move (to the interface)",
        format!("{vip_move:.0} ms"),
    );
    record.figure(
        "crash",
        "handshakes kicked / completed",
        format!("{kicked} / {completed}"),
    );
    record.figure(
        "crash",
        "probe gap per client (min/median/max)",
        format!("{} ms", gap.show(0)),
    );
    ensure!(
        completed >= kicked,
        "kicked {kicked}, completed {completed}"
    );
    crash_metrics(lab, new, record)?;
    Ok(gap.max)
}

/// The new master's `/metrics` after the crash: its failover histograms
/// hold the takeover, and its peers are counted.
fn crash_metrics(lab: &ControlLab, new: usize, record: &mut Record) -> Result<()> {
    let scrape = lab
        .metrics_of_gateway(new)
        .with_context(|| format!("scraping gw{new}'s /metrics"))?;
    let read = |series: &str| metrics::value(&scrape, series);
    let takeovers = read("tidegate_failover_detection_seconds_count")?;
    let detection = read("tidegate_failover_detection_seconds_sum")?;
    let vip_moves = read("tidegate_failover_vip_move_seconds_count")?;
    let vip_move = read("tidegate_failover_vip_move_seconds_sum")?;
    let peers = read("tidegate_wireguard_peers")?;
    let live = read("tidegate_wireguard_peers_by_handshake_age{age=\"under-2m\"}")?;
    say(&format!(
        "gw{new}'s /metrics: {takeovers} takeover(s) detected in {:.0} ms in all, {vip_moves} VIP move(s) in {:.1} ms in all; {peers} peers, {live} with a handshake under 2 minutes",
        detection * 1000.0,
        vip_move * 1000.0,
    ));
    record.figure(
        "crash",
        "new master's /metrics: takeovers, detection",
        format!("{takeovers}, {:.0} ms", detection * 1000.0),
    );
    ensure!(
        takeovers >= 1.0 && vip_moves >= 1.0,
        "gw{new}'s failover histograms hold no takeover"
    );
    Ok(())
}

/// Step 7: a planned handover loses no probe.
fn handover(lab: &mut ControlLab, clients: &[LabClient], record: &mut Record) -> Result<()> {
    step(7, "a planned handover (tidectl failover on the master)");
    let master = lab.wait_master(step_timeout())?;
    let t0 = now_ms();
    lab.gateway_mut(master).daemon.tidectl_ok(&["failover"])?;
    record.mark(t0, format!("gw{master} hands over"));
    let new = poll_until(
        "another master",
        step_timeout(),
        Duration::from_millis(50),
        || {
            let m = lab.wait_master(step_timeout())?;
            Ok(if m == master {
                Probe::NotYet(format!("gw{m} still master"))
            } else {
                Probe::Ready(m)
            })
        },
    )?;
    std::thread::sleep(QUIET);
    let lost: u64 = lost_since(clients, t0)?;
    say(&format!(
        "gw{master} handed the VIP to gw{new}; probes lost: {lost}"
    ));
    record.figure("handover", "probes lost", lost.to_string());
    ensure!(lost == 0, "a planned handover lost {lost} probes");
    Ok(())
}

/// Step 8: a gateway drains: its clients stay, no new one comes.
fn drain(lab: &mut ControlLab, clients: &[LabClient], record: &mut Record) -> Result<()> {
    step(8, "a drain (tidectl drain on a backup)");
    let master = lab.wait_master(step_timeout())?;
    let drained = DIRECTOR_GATEWAYS
        .into_iter()
        .find(|&g| g != master && lab.gateway_mut(g).running())
        .context("no backup to drain")?;
    let before = pins(lab, master)?;
    let t0 = now_ms();
    lab.gateway_mut(drained).daemon.tidectl_ok(&["drain"])?;
    record.mark(t0, format!("gw{drained} drains"));
    let entries = poll_until(
        "the master to leave the drained gateway out of its table",
        step_timeout(),
        Duration::from_millis(100),
        || {
            let json = lab
                .gateway_mut(master)
                .daemon
                .tidectl_ok(&["director", "--json"])?;
            let status: tidegate_gateway::xdp::DirectorStatus = serde_json::from_str(&json)?;
            let backend = status
                .backends
                .iter()
                .find(|b| b.gateway_id == drained as u32);
            Ok(match backend {
                Some(b) if b.draining && b.table_entries == 0 => Probe::Ready(status.table_size),
                other => Probe::NotYet(format!("{other:?}")),
            })
        },
    )?;
    std::thread::sleep(QUIET);
    let windows = windows(clients, t0, now_ms())?;
    let lost: u64 = windows.iter().map(|(_, w)| w.lost).sum();
    let staying = windows
        .iter()
        .filter(|(_, w)| w.answered_by == [drained as u32])
        .count();
    let had = before.get(&(drained as u32)).copied().unwrap_or(0);
    say(&format!(
        "gw{drained} holds 0 of {entries} table entries: no new client; its {staying} pinned clients stay (it had {had}); probes lost: {lost}"
    ));
    lab.gateway_mut(drained).daemon.tidectl_ok(&["undrain"])?;
    record.figure(
        "drain",
        "clients kept by the drained gateway",
        format!("{staying} of {had}"),
    );
    record.figure("drain", "probes lost", lost.to_string());
    ensure!(lost == 0, "the drain lost {lost} probes");
    ensure!(
        staying == had,
        "{had} clients were pinned to gw{drained}, {staying} stayed"
    );
    Ok(())
}

/// Step 9a: an Edge killed while devices enrol.
fn edge_kill(
    lab: &mut ControlLab,
    clients: &[LabClient],
    options: &Options,
    record: &mut Record,
) -> Result<()> {
    step(9, "an Edge killed (SIGKILL) while devices enrol");
    let n = EDGE_KILL_DEVICES.min(options.clients);
    let mut jobs = Vec::new();
    for client in clients.iter().take(n) {
        let device = format!("{}-phone", client.user);
        lab.core()?.tidectl_ok(&[
            "device",
            "create",
            &device,
            "--user",
            &client.user,
            "--location",
            LOCATION,
        ])?;
        let phone = UserClient::new(
            client_netns(lab, client.k),
            &lab.dir().join(format!("phone-{}", client.user)),
        )?;
        jobs.push((
            device.clone(),
            token(lab, &device)?,
            phone,
            lab.run().ifname(&format!("p{}", client.k)),
        ));
    }
    let url = lab.edge_url();
    let ca = lab.web_ca().to_owned();
    let t0 = now_ms();
    let outcomes: Vec<Result<()>> = std::thread::scope(|scope| {
        let handles: Vec<_> = jobs
            .iter()
            .map(|(_, token, phone, name)| {
                let (url, ca) = (&url, &ca);
                scope.spawn(move || phone.enrol(url, token, ca, name).map(|_| ()))
            })
            .collect();
        std::thread::sleep(Duration::from_millis(50));
        let killed = lab.edge_mut(1).kill();
        let mut outcomes: Vec<Result<()>> = handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a worker panicked")))
            })
            .collect();
        if let Err(err) = killed {
            outcomes.push(Err(err.context("killing edge1")));
        }
        outcomes
    });
    record.mark(t0, "edge1 killed");
    let failed: Vec<String> = outcomes
        .iter()
        .zip(&jobs)
        .filter_map(|(outcome, (device, ..))| {
            outcome.as_ref().err().map(|e| format!("{device}: {e:#}"))
        })
        .collect();
    say(&format!(
        "{n} devices enrolled while edge1 died: {} lost; nginx sent the rest to edge2",
        failed.len()
    ));
    record.figure(
        "Edge killed",
        "enrolments lost",
        format!("{} of {n}", failed.len()),
    );
    ensure!(failed.is_empty(), "enrolments lost: {}", failed.join("; "));
    lab.edge_mut(1).restart()?;
    lab.core_mut()?.wait_edges(step_timeout())?;
    say("edge1 restarted; Core dialled it again");
    Ok(())
}

/// Step 10: every Core stopped and back.
fn core_away(lab: &mut ControlLab, clients: &mut [LabClient], record: &mut Record) -> Result<()> {
    step(10, "every Core stopped, then back");
    let of_director = clients.iter().filter(|c| c.location == 1).count();
    let leaving = clients
        .iter()
        .rposition(|c| c.location == 2)
        .context("no MFA client")?;
    let key = lab
        .core()?
        .tidectl_json(&["device", "show", &clients[leaving].device])?["public_key"]
        .as_str()
        .context("no public key")?
        .to_owned();
    let mut peers_before = BTreeMap::new();
    for g in DIRECTOR_GATEWAYS {
        if lab.gateway_mut(g).running() {
            peers_before.insert(g, lab.gateway_mut(g).daemon.peers()?.peers.len());
        }
    }
    let t0 = now_ms();
    for k in 1..=lab.cores() {
        lab.core_k_mut(k)?.stop()?;
    }
    record.mark(t0, "Cores stopped");
    // The leaving user's tunnel goes down while Core is away.
    let client = &mut clients[leaving];
    if let Some(prober) = client.prober.take() {
        client.summary = Some(prober.finish()?);
    }
    client.client.down(&client.profile)?;
    client.up = false;
    let down_at = Instant::now();
    let user = client.user.clone();
    let expired = poll_until(
        "the MFA gateway to drop the idle peer",
        Duration::from_secs(u64::from(MFA_THRESHOLD_S) + 20),
        Duration::from_millis(200),
        || {
            let peers = lab.gateway_mut(4).daemon.peers()?;
            Ok(if peers.peer(&key).is_none() {
                Probe::Ready(down_at.elapsed())
            } else {
                Probe::NotYet("still a peer".into())
            })
        },
    )?;
    record.mark(now_ms(), format!("{user}'s MFA peer expired"));
    let mut kept = Vec::new();
    for (&g, &before) in &peers_before {
        let now = lab.gateway_mut(g).daemon.peers()?.peers.len();
        ensure!(
            now == before && now >= of_director,
            "gw{g} has {now} peers while Core is away, {before} before"
        );
        kept.push(format!("gw{g} {now}"));
    }
    let mfa_left = lab.gateway_mut(4).daemon.peers()?.peers.len();
    say(&format!(
        "with Core away the gateways keep every peer ({}); {user} went offline and gw4 dropped that MFA peer after {:.1} s (threshold {MFA_THRESHOLD_S} s); {mfa_left} MFA peers stay",
        kept.join(", "),
        expired.as_secs_f64()
    ));
    let t1 = now_ms();
    for k in 1..=lab.cores() {
        lab.core_k_mut(k)?.restart()?;
    }
    record.mark(t1, "Cores back");
    wait_applied_by_live(lab, LOCATION)?;
    wait_applied_by_live(lab, SECOND_LOCATION)?;
    let sessions = poll_until(
        "Core to learn of the expiry",
        step_timeout(),
        Duration::from_millis(200),
        || {
            let status = lab.leader()?.location_status(SECOND_LOCATION)?;
            let sessions = status["mfa_sessions"].as_u64().unwrap_or(u64::MAX);
            Ok(if sessions == mfa_left as u64 {
                Probe::Ready(sessions)
            } else {
                Probe::NotYet(format!("{sessions} MFA sessions"))
            })
        },
    )?;
    std::thread::sleep(QUIET);
    let lost: u64 = lost_since(clients, t0)?;
    say(&format!(
        "the Cores back after {:.1} s: one leads, links up, every gateway on its config, {sessions} MFA sessions (the expired one ended); probes lost while Core was away: {lost}",
        (t1 - t0) as f64 / 1000.0
    ));
    record.figure("Core away", "probes lost", lost.to_string());
    record.figure(
        "Core away",
        "MFA peer expired after",
        format!("{:.1} s", expired.as_secs_f64()),
    );
    ensure!(lost == 0, "{lost} probes lost while Core was away");
    Ok(())
}

/// Step 11: the leading Core killed; the other leads.
fn core_takeover(lab: &mut ControlLab, clients: &[LabClient], record: &mut Record) -> Result<()> {
    step(11, "the leading Core killed (SIGKILL): the other leads");
    let all: Vec<usize> = (1..=lab.cores()).collect();
    let (old, term) = lab.wait_leader(&all, step_timeout())?;
    let other: Vec<usize> = all.iter().copied().filter(|&k| k != old).collect();
    std::thread::sleep(QUIET);
    let t0 = now_ms();
    let killed = Instant::now();
    lab.core_k_mut(old)?.kill()?;
    record.mark(t0, format!("core-{old} killed"));
    let (new, new_term) = lab.wait_leader(&other, step_timeout())?;
    let took = killed.elapsed();
    record.mark(now_ms(), format!("core-{new} leads"));
    // A change through the new leader reaches every gateway it runs on.
    let device = format!("takeover-{new_term}");
    let key = tidegate_core::keys::Key::new([0x7a; 32]).to_base64();
    let user = clients.first().context("no client")?.user.clone();
    let changed = Instant::now();
    lab.core_k(new)?.tidectl_ok(&[
        "device",
        "create",
        &device,
        "--user",
        &user,
        "--location",
        LOCATION,
        "--public-key",
        &key,
    ])?;
    let applied = poll_until(
        "the new leader's change on every director gateway",
        step_timeout(),
        Duration::from_millis(20),
        || {
            let mut missing = Vec::new();
            for g in DIRECTOR_GATEWAYS {
                let gateway = lab.gateway_mut(g);
                if gateway.running() && gateway.daemon.peers()?.peer(&key).is_none() {
                    missing.push(format!("gw{g}"));
                }
            }
            Ok(if missing.is_empty() {
                Probe::Ready(changed.elapsed())
            } else {
                Probe::NotYet(format!("missing on {}", missing.join(", ")))
            })
        },
    )?;
    std::thread::sleep(QUIET);
    let lost = lost_since(clients, t0)?;
    say(&format!(
        "core-{old} (term {term}) killed; core-{new} leads at term {new_term} after {} ms; \
         its first change ran on every gateway {} ms after tidectl sent it; probes lost: {lost}",
        took.as_millis(),
        applied.as_millis()
    ));
    lab.core_k_mut(old)?.restart()?;
    let lease = poll_until(
        &format!("core-{old} back as a standby"),
        step_timeout(),
        Duration::from_millis(50),
        || {
            let lease = lab.core_k(old)?.lease()?;
            Ok(if !lease.leading && lease.leader == format!("core-{new}") {
                Probe::Ready(lease)
            } else {
                Probe::NotYet(format!("{lease:?}"))
            })
        },
    )?;
    // Its links are up as the leader's are: a standby's are warm.
    let warm = poll_until(
        &format!("core-{old}'s links to be up as core-{new}'s are"),
        step_timeout(),
        Duration::from_millis(100),
        || {
            let status = lab.core_k(new)?.tidectl_json(&["core-status"])?;
            let line = |k: usize| {
                status["cores"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|c| c["core_id"] == format!("core-{k}"))
                    .map(|c| {
                        (
                            c["gateways_connected"].as_u64(),
                            c["edges_connected"].as_u64(),
                            c["term"].as_u64(),
                        )
                    })
            };
            Ok(match (line(old), line(new)) {
                // The restarted Core's own line (at the new term, not the
                // one it left when it died), with the leader's links.
                (Some(standby), Some(leader)) if standby == leader => Probe::Ready(leader),
                (standby, leader) => {
                    Probe::NotYet(format!("core-{old} {standby:?}, core-{new} {leader:?}"))
                }
            })
        },
    )?;
    say(&format!(
        "core-{old} restarted: a standby at term {}, its links up as the leader's are ({} gateways, {} Edges)",
        lease.term,
        warm.0.unwrap_or(0),
        warm.1.unwrap_or(0)
    ));
    block(&lab.core_k(new)?.tidectl_ok(&["core-status"])?);
    record.figure(
        "Core takeover",
        "new leader after",
        format!("{} ms", took.as_millis()),
    );
    record.figure(
        "Core takeover",
        "first change on every gateway",
        format!("{} ms", applied.as_millis()),
    );
    record.figure("Core takeover", "probes lost", lost.to_string());
    ensure!(
        lost == 0,
        "{lost} probes lost while the Cores changed leaders"
    );
    Ok(())
}

/// Waits until Core is linked to every running gateway of `location` and
/// each runs the location's config version.
fn wait_applied_by_live(lab: &mut ControlLab, location: &str) -> Result<()> {
    let running: Vec<String> = lab
        .gateways_mut()
        .iter_mut()
        .filter_map(|g| g.running().then(|| g.name.clone()))
        .collect();
    poll_until(
        &format!("the gateways of {location} to run Core's config"),
        step_timeout(),
        Duration::from_millis(100),
        || {
            let status = lab.leader()?.location_status(location)?;
            let version = status["location"]["version"].as_u64();
            let behind: Vec<String> = status["gateways"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|g| {
                    g["name"]
                        .as_str()
                        .is_some_and(|n| running.iter().any(|r| r == n))
                })
                .filter(|g| g["connected"] != true || g["applied_version"].as_u64() != version)
                .map(|g| g["name"].as_str().unwrap_or("?").to_owned())
                .collect();
            Ok(if behind.is_empty() {
                Probe::Ready(())
            } else {
                Probe::NotYet(format!("behind: {behind:?}"))
            })
        },
    )
}

/// Writes the SVG picture of the run and returns its path.
fn picture(
    lab: &ControlLab,
    clients: &[LabClient],
    record: &Record,
    options: &Options,
) -> Result<PathBuf> {
    let lanes: Vec<Lane> = clients
        .iter()
        .filter_map(|c| {
            c.summary.clone().map(|summary| Lane {
                label: format!(
                    "{} ({})",
                    c.user,
                    if c.location == 1 {
                        LOCATION
                    } else {
                        SECOND_LOCATION
                    }
                ),
                summary,
            })
        })
        .collect();
    let names: BTreeMap<u32, String> = (1..=4).map(|g| (g, format!("gw{g}"))).collect();
    let svg = lab_report::svg(
        &format!(
            "tidegate-lab: every client's probes through its tunnel, coloured by the gateway answering ({})",
            lab.run().netns_name("").trim_end_matches('-')
        ),
        &lanes,
        &record.marks,
        &names,
    );
    let path = options.report.join("tidegate-lab.svg");
    std::fs::write(&path, svg).with_context(|| format!("writing {}", path.display()))?;
    Ok(std::fs::canonicalize(&path).unwrap_or(path))
}

/// `--keep`: prints how to explore the location and waits for Ctrl-C or
/// `tidegate-lab --stop`.
fn keep(lab: &mut ControlLab, clients: &[LabClient]) -> Result<()> {
    tidegate_tests::stop::install()?;
    std::fs::write(PID_FILE, std::process::id().to_string())
        .with_context(|| format!("writing {PID_FILE}"))?;
    let tidectl = tidegate_tests::bins::binary("tidectl")?
        .to_string_lossy()
        .into_owned();
    println!("\nthe location is left running; explore it:");
    for gateway in lab.gateways_mut() {
        let state = if gateway.running() { "" } else { ", crashed" };
        println!(
            "  {tidectl} --socket {} status      # {} ({}{state})",
            gateway.daemon.config().control_socket.display(),
            gateway.name,
            gateway.netns.name()
        );
    }
    if let Ok(core) = lab.leader() {
        println!(
            "  {tidectl} --core-socket {} location status {LOCATION}",
            core.config().admin_socket.display()
        );
    }
    if let Some(client) = clients.first() {
        println!(
            "  ip netns exec {} ping {GATEWAY_TUNNEL}      # {}'s tunnel",
            client_netns(lab, client.k).name(),
            client.user
        );
    }
    println!("Ctrl-C here, or `cargo xtask lab -- --stop` elsewhere, tears it down.");
    while !tidegate_tests::stop::requested() {
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = std::fs::remove_file(PID_FILE);
    Ok(())
}

/// `--stop`: ends a lab left running by `--keep` and waits for its teardown.
fn stop_kept() -> Result<()> {
    let text = std::fs::read_to_string(PID_FILE)
        .with_context(|| format!("no lab left running ({PID_FILE} is missing)"))?;
    let pid: i32 = text
        .trim()
        .parse()
        .with_context(|| format!("{PID_FILE}: {text:?}"))?;
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    ensure!(
        comm.trim() == "tidegate-lab",
        "process {pid} of {PID_FILE} is not a running tidegate-lab"
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGTERM,
    )
    .with_context(|| format!("signalling the lab (pid {pid})"))?;
    poll_until(
        "the lab to tear down",
        Duration::from_secs(120),
        Duration::from_millis(200),
        || {
            Ok(if Path::new(&format!("/proc/{pid}")).exists() {
                Probe::NotYet("tearing down".into())
            } else {
                Probe::Ready(())
            })
        },
    )?;
    println!("the lab (pid {pid}) tore its location down");
    Ok(())
}

/// `--compare`: keepalived + WireGuard through the same crash.
fn compare(options: &Options, tidegate_gap: f64, record: &mut Record) -> Result<()> {
    step(12, "the same crash with keepalived + WireGuard (--compare)");
    let count = options.clients - MFA_CLIENTS;
    let mut location = KeepalivedTunnel::build(
        &HaOptions::priorities(&[200, 100]),
        &ClientOptions {
            count,
            keepalive: None,
        },
    )?;
    location.location_mut().wait_master(1, step_timeout())?;
    let before: Vec<u64> = location
        .clients()
        .iter()
        .map(|c| c.latest_handshake())
        .collect::<Result<_>>()?;
    let probers = location.start_probers(MAX_PROBES)?;
    std::thread::sleep(QUIET);
    let at = Instant::now();
    location.crash(1)?;
    location.location_mut().wait_master(2, step_timeout())?;
    let recovery = Duration::from_secs(60);
    wait_fresh_handshakes(location.clients(), &before, recovery)?;
    wait_tunnels_answer(location.clients(), recovery)?;
    let back = at.elapsed();
    std::thread::sleep(QUIET);
    let summaries = finish_probers(probers)?;
    let gaps: Vec<f64> = summaries.iter().map(|s| s.longest_gap_ms).collect();
    let gap = Spread::of(&gaps)?;
    say(&format!(
        "{count} clients: every tunnel back after {:.1} s; longest probe gap per client {} ms",
        back.as_secs_f64(),
        gap.show(0)
    ));
    drop(location);
    say(&format!(
        "worst gap: keepalived + WireGuard {:.0} ms, Tidegate {tidegate_gap:.0} ms ({:.0}x shorter)",
        gap.max,
        gap.max / tidegate_gap.max(1.0)
    ));
    record.figure(
        "keepalived",
        "probe gap per client (min/median/max)",
        format!("{} ms", gap.show(0)),
    );
    record.figure(
        "keepalived",
        "worst gap vs Tidegate's",
        format!("{:.0}x", gap.max / tidegate_gap.max(1.0)),
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Option<Options>> {
        parse_args(args.iter().map(|s| (*s).to_owned()))
    }

    #[test]
    fn parses_every_option() {
        assert_eq!(parse(&[]).unwrap().unwrap(), Options::default());
        let all = parse(&[
            "--clients",
            "12",
            "--compare",
            "--keep",
            "--report=/tmp/r",
            "--xdp-mode",
            "generic",
        ])
        .unwrap()
        .unwrap();
        assert_eq!(
            all,
            Options {
                clients: 12,
                compare: true,
                keep: true,
                stop: false,
                report: PathBuf::from("/tmp/r"),
                xdp_mode: XdpMode::Generic,
            }
        );
        assert!(parse(&["--stop"]).unwrap().unwrap().stop);
        assert!(parse(&["--help"]).unwrap().is_none());
    }

    #[test]
    fn rejects_bad_arguments() {
        for args in [
            &["--xdp-mode"][..],
            &["--xdp-mode", "native"],
            &["--clients", "6"],
            &["--clients", "101"],
            &["--clients", "many"],
            &["--keep=yes"],
            &["--stop", "--keep"],
            &["--verbose"],
        ] {
            assert!(parse(args).is_err(), "{args:?} accepted");
        }
    }

    #[test]
    fn users_have_names_then_numbers() {
        assert_eq!(user_name(1), "ana");
        assert_eq!(user_name(20), "tia");
        assert_eq!(user_name(21), "user21");
    }
}
