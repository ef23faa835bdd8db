//! `cargo xtask bench control`: how fast Core's changes reach the
//! gateways, on the control-plane lab ([`tidegate_tests::control`]): Core in
//! its namespace, three HA gateways each running wireguard-go, every link
//! over mutual TLS.
//!
//! * Peer add latency: a device added through Core's admin API (gRPC on its
//!   Unix socket, as `tidectl` does), from the call to the peer being live
//!   in every gateway's wireguard-go (read through each device's UAPI
//!   socket, polled every millisecond), over 1,000 adds. Baseline in the
//!   same run, alternating with them: one peer set straight into a
//!   wireguard-go of the bench's own through its UAPI socket, to visible.
//! * Full sync: the three gateways disabled in Core, the location
//!   refilled with 10,000 devices (in one call), then the gateways
//!   enabled: from the
//!   enabling calls to every gateway having applied the location's version
//!   (its Applied, sent once its reconcile returned; each device's peer
//!   count is checked through UAPI afterwards). Baselines: the same 10,000
//!   peers set into a fresh wireguard-go in one UAPI call, and into three
//!   fresh ones at once (what the gateways' devices must do, on the same
//!   cores).
//! * Delivery of 100,000 devices (the most a link is sized for): the
//!   gateways disabled again, 90,000 more devices, the gateways enabled:
//!   from the enabling calls until every gateway has answered the whole
//!   config (Core renders and encodes it, TLS carries it, the gateway
//!   decodes and checks it). wireguard-go holds 65,536 peers, so each
//!   gateway refuses it, naming the limit, and keeps its 10,000.

use std::collections::HashSet;
use std::io::{Read as _, Write as _};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use tidegate_core::keys::Key;
use tidegate_proto::admin::v1::{self as admin, admin_client::AdminClient};
use tidegate_tests::control::LOCATION;
use tidegate_tests::{ControlLab, ControlOptions, WgInterface, require_root};
use tonic::transport::Channel;

/// Peer adds measured.
const CHANGES: usize = 1000;
/// Peers of the full sync.
const SYNC_PEERS: usize = 10_000;
/// Devices of the delivery: the most a link is sized for.
const DELIVERY_DEVICES: usize = tidegate_proto::limits::MAX_DEVICES;
/// Devices added by one admin call in the refill.
const BATCH: usize = 10_000;
/// Gateways of the location.
const GATEWAYS: usize = 3;
/// How often the latency loop reads each device.
const POLL: Duration = Duration::from_millis(1);
/// A change not live within this is a failure.
const CHANGE_TIMEOUT: Duration = Duration::from_secs(10);
/// A sync not done within this is a failure.
const SYNC_TIMEOUT: Duration = Duration::from_secs(120);
/// Targets.
const TARGET_P99_MS: f64 = 100.0;
const TARGET_SYNC_S: f64 = 2.0;
/// wireguard-go's UAPI sockets.
const UAPI_DIR: &str = "/var/run/wireguard";

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("control bench: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn hex(key: &Key) -> String {
    key.as_bytes().iter().map(|b| format!("{b:02x}")).collect()
}

/// One UAPI request and its answer (up to the blank line after `errno=`).
fn uapi(socket: &Path, request: &str) -> Result<String> {
    let mut stream = UnixStream::connect(socket)
        .with_context(|| format!("connecting to {}", socket.display()))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    stream.write_all(request.as_bytes())?;
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
    let text = String::from_utf8(answer).context("UAPI answered invalid UTF-8")?;
    match text.lines().find_map(|l| l.strip_prefix("errno=")) {
        Some("0") => Ok(text),
        Some(errno) => bail!("UAPI {}: errno {errno}", socket.display()),
        None => bail!("UAPI {}: no errno in {text:?}", socket.display()),
    }
}

fn dump(socket: &Path) -> Result<String> {
    uapi(socket, "get=1\n\n")
}

fn peer_count(socket: &Path) -> Result<usize> {
    Ok(dump(socket)?
        .lines()
        .filter(|l| l.starts_with("public_key="))
        .count())
}

/// Polls every socket until each lists `key`; the time from `start` until
/// the last one does.
fn wait_live(sockets: &[PathBuf], key: &Key, start: Instant) -> Result<Duration> {
    let needle = format!("public_key={}\n", hex(key));
    let mut pending: Vec<&PathBuf> = sockets.iter().collect();
    let mut last = Duration::ZERO;
    while !pending.is_empty() {
        let mut still = Vec::new();
        for socket in pending {
            if dump(socket)?.contains(&needle) {
                last = start.elapsed();
            } else {
                still.push(socket);
            }
        }
        pending = still;
        if !pending.is_empty() {
            if start.elapsed() > CHANGE_TIMEOUT {
                bail!(
                    "peer {key} not live on {} within {CHANGE_TIMEOUT:?}",
                    pending
                        .iter()
                        .map(|p| p.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
            std::thread::sleep(POLL);
        }
    }
    Ok(last)
}

/// p-th percentile (nearest rank) of sorted milliseconds.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

struct Spread {
    p50: f64,
    p99: f64,
    max: f64,
}

fn spread(samples: &[f64]) -> Spread {
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    Spread {
        p50: percentile(&sorted, 50.0),
        p99: percentile(&sorted, 99.0),
        max: sorted[sorted.len() - 1],
    }
}

/// The i-th device's tunnel address in 10.76.0.0/15, past the gateways'.
fn device_address(i: usize) -> String {
    let n = i + 2;
    format!("10.{}.{}.{}/32", 76 + n / 65_536, n / 256 % 256, n % 256)
}

async fn connect(socket: &Path) -> Result<AdminClient<Channel>> {
    let channel = tonic::transport::Endpoint::from_shared(format!("unix:{}", socket.display()))?
        .connect()
        .await
        .with_context(|| format!("connecting to Core at {}", socket.display()))?;
    Ok(AdminClient::new(channel))
}

async fn add_device(api: &mut AdminClient<Channel>, name: String, key: &Key) -> Result<()> {
    api.create_device(admin::CreateDeviceRequest {
        name,
        user: "bench".into(),
        location: LOCATION.into(),
        public_key: key.to_base64(),
        ..Default::default()
    })
    .await
    .map_err(|s| anyhow::anyhow!("adding a device: {}", s.message()))?;
    Ok(())
}

/// Adds a device of user `bench` for each key, `s{first}` onwards, `BATCH`
/// to a call.
async fn add_devices(api: &mut AdminClient<Channel>, keys: &[Key], first: usize) -> Result<()> {
    for (n, batch) in keys.chunks(BATCH).enumerate() {
        let devices = batch
            .iter()
            .enumerate()
            .map(|(j, key)| {
                let i = first + n * BATCH + j;
                admin::CreateDeviceRequest {
                    name: format!("s{i}"),
                    user: "bench".into(),
                    location: LOCATION.into(),
                    public_key: key.to_base64(),
                    addresses: vec![device_address(i)],
                    ..Default::default()
                }
            })
            .collect();
        api.create_devices(admin::CreateDevicesRequest { devices })
            .await
            .map_err(|s| anyhow::anyhow!("adding devices: {}", s.message()))?;
        eprintln!("  {} devices", first + n * BATCH + batch.len());
    }
    Ok(())
}

async fn set_gateways(api: &mut AdminClient<Channel>, enabled: bool) -> Result<()> {
    for i in 1..=GATEWAYS {
        api.update_gateway(admin::UpdateGatewayRequest {
            name: format!("gw{i}"),
            enabled: Some(enabled),
            ..Default::default()
        })
        .await
        .map_err(|s| anyhow::anyhow!("changing gw{i}: {}", s.message()))?;
    }
    Ok(())
}

async fn location_status(api: &mut AdminClient<Channel>) -> Result<admin::LocationStatusResponse> {
    Ok(api
        .location_status(admin::LocationStatusRequest {
            name: LOCATION.into(),
        })
        .await
        .map_err(|s| anyhow::anyhow!("location status: {}", s.message()))?
        .into_inner())
}

fn run() -> Result<()> {
    require_root();
    let lab = ControlLab::build(&ControlOptions {
        gateways: GATEWAYS,
        edges: 0,
        status_interval_ms: 5000,
        tunnel_address: "10.76.0.1/15".into(),
        ..ControlOptions::default()
    })?;
    let sockets: Vec<PathBuf> = (1..=GATEWAYS)
        .map(|i| Path::new(UAPI_DIR).join(format!("{}.sock", lab.gateway(i).wg.interface())))
        .collect();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let admin_socket = lab.core()?.config().admin_socket.clone();
    let mut api = runtime.block_on(connect(&admin_socket))?;
    runtime
        .block_on(api.create_user(admin::CreateUserRequest {
            name: "bench".into(),
            enabled: None,
        }))
        .map_err(|s| anyhow::anyhow!("creating the user: {}", s.message()))?;
    // The baseline's wireguard-go, in the client's namespace.
    let baseline_dir = lab.dir().join("baseline");
    std::fs::create_dir_all(&baseline_dir)?;
    let baseline = WgInterface::create(lab.client(), &lab.run().ifname("bw"), &baseline_dir)?;
    let baseline_socket = Path::new(UAPI_DIR).join(format!("{}.sock", baseline.name()));

    eprintln!("control bench: {CHANGES} peer adds through Core, alternating with the baseline");
    let mut core_live = Vec::with_capacity(CHANGES);
    let mut core_call = Vec::with_capacity(CHANGES);
    let mut base_live = Vec::with_capacity(CHANGES);
    for i in 0..CHANGES {
        let key = Key::generate_private().public();
        let start = Instant::now();
        runtime.block_on(add_device(&mut api, format!("d{i}"), &key))?;
        core_call.push(ms(start.elapsed()));
        core_live.push(ms(wait_live(&sockets, &key, start)?));

        let key = Key::generate_private().public();
        let start = Instant::now();
        uapi(
            &baseline_socket,
            &format!(
                "set=1\npublic_key={}\nallowed_ip={}\n\n",
                hex(&key),
                device_address(i)
            ),
        )?;
        base_live.push(ms(wait_live(
            std::slice::from_ref(&baseline_socket),
            &key,
            start,
        )?));
        if (i + 1) % 100 == 0 {
            eprintln!("  {} adds", i + 1);
        }
    }

    eprintln!("control bench: refilling the location with {SYNC_PEERS} devices, gateways disabled");
    runtime.block_on(set_gateways(&mut api, false))?;
    for i in 0..CHANGES {
        runtime
            .block_on(api.delete_device(admin::DeleteDeviceRequest {
                name: format!("d{i}"),
            }))
            .map_err(|s| anyhow::anyhow!("deleting a device: {}", s.message()))?;
    }
    let sync_keys: Vec<Key> = (0..SYNC_PEERS)
        .map(|_| Key::generate_private().public())
        .collect();
    runtime.block_on(add_devices(&mut api, &sync_keys, 0))?;
    let version = runtime
        .block_on(location_status(&mut api))?
        .location
        .context("no location in the status")?
        .version;
    for socket in &sockets {
        ensure!(
            peer_count(socket)? == CHANGES,
            "a disabled gateway changed meanwhile"
        );
    }

    eprintln!("control bench: enabling the gateways (full sync)");
    let start = Instant::now();
    runtime.block_on(set_gateways(&mut api, true))?;
    let mut linked: Vec<Option<Duration>> = vec![None; GATEWAYS];
    let mut applied: Vec<Option<Duration>> = vec![None; GATEWAYS];
    loop {
        let status = runtime.block_on(location_status(&mut api))?;
        let now = start.elapsed();
        for (i, gateway) in status.gateways.iter().enumerate().take(GATEWAYS) {
            if gateway.connected && linked[i].is_none() {
                linked[i] = Some(now);
            }
            if gateway.connected && gateway.applied_version >= version && applied[i].is_none() {
                applied[i] = Some(now);
            }
        }
        if applied.iter().all(Option::is_some) {
            break;
        }
        if now > SYNC_TIMEOUT {
            bail!("the full sync did not finish within {SYNC_TIMEOUT:?}: {status:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let sync = start.elapsed();
    let wanted: HashSet<String> = sync_keys.iter().map(hex).collect();
    for socket in &sockets {
        let listed: HashSet<String> = dump(socket)?
            .lines()
            .filter_map(|l| l.strip_prefix("public_key=").map(str::to_owned))
            .collect();
        ensure!(
            listed == wanted,
            "{} has {} peers, {} of the location's {SYNC_PEERS}",
            socket.display(),
            listed.len(),
            listed.intersection(&wanted).count()
        );
    }

    eprintln!(
        "control bench: baselines, {SYNC_PEERS} peers into one fresh wireguard-go, then into {GATEWAYS} at once"
    );
    let mut request = String::from("set=1\n");
    for (i, key) in sync_keys.iter().enumerate() {
        request.push_str(&format!(
            "public_key={}\nallowed_ip={}\n",
            hex(key),
            device_address(i)
        ));
    }
    request.push('\n');
    let fresh: Vec<WgInterface> = (0..=GATEWAYS)
        .map(|n| {
            WgInterface::create(
                lab.client(),
                &lab.run().ifname(&format!("bs{n}")),
                &baseline_dir,
            )
        })
        .collect::<Result<_>>()?;
    let fresh_sockets: Vec<PathBuf> = fresh
        .iter()
        .map(|wg| Path::new(UAPI_DIR).join(format!("{}.sock", wg.name())))
        .collect();
    let start = Instant::now();
    uapi(&fresh_sockets[0], &request)?;
    let base_one = start.elapsed();
    let start = Instant::now();
    std::thread::scope(|scope| -> Result<()> {
        let workers: Vec<_> = fresh_sockets[1..]
            .iter()
            .map(|socket| scope.spawn(|| uapi(socket, &request)))
            .collect();
        for worker in workers {
            worker
                .join()
                .map_err(|_| anyhow::anyhow!("a baseline thread panicked"))??;
        }
        Ok(())
    })?;
    let base_all = start.elapsed();
    for socket in &fresh_sockets {
        ensure!(peer_count(socket)? == SYNC_PEERS);
    }

    eprintln!("control bench: {DELIVERY_DEVICES} devices, delivered to the gateways");
    runtime.block_on(set_gateways(&mut api, false))?;
    let more: Vec<Key> = (SYNC_PEERS..DELIVERY_DEVICES)
        .map(|_| Key::generate_private().public())
        .collect();
    runtime.block_on(add_devices(&mut api, &more, SYNC_PEERS))?;
    let start = Instant::now();
    runtime.block_on(set_gateways(&mut api, true))?;
    let limit = format!("holds at most {}", 1 << 16);
    let delivery = loop {
        let status = runtime.block_on(location_status(&mut api))?;
        let answered = status
            .gateways
            .iter()
            .filter(|g| g.connected && g.apply_error.contains(&limit))
            .count();
        if answered == GATEWAYS {
            break start.elapsed();
        }
        if start.elapsed() > SYNC_TIMEOUT {
            bail!("the delivery did not finish within {SYNC_TIMEOUT:?}: {status:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    for socket in &sockets {
        ensure!(
            peer_count(socket)? == SYNC_PEERS,
            "a gateway changed its device for a config it refused"
        );
    }

    let live = spread(&core_live);
    let call = spread(&core_call);
    let base = spread(&base_live);
    println!("\ncontrol plane: Core, {GATEWAYS} gateways (wireguard-go), mutual TLS links\n");
    println!("{:<58} {:>9} {:>9} {:>9}", "", "p50 ms", "p99 ms", "max ms");
    println!(
        "{:<58} {:>9.2} {:>9.2} {:>9.2}",
        format!("peer add: admin call to live on all {GATEWAYS} gateways"),
        live.p50,
        live.p99,
        live.max
    );
    println!(
        "{:<58} {:>9.2} {:>9.2} {:>9.2}",
        "  of which the admin call (stored, announced)", call.p50, call.p99, call.max
    );
    println!(
        "{:<58} {:>9.2} {:>9.2} {:>9.2}",
        "baseline: UAPI set on one wireguard-go to visible", base.p50, base.p99, base.max
    );
    println!(
        "{:<58} {:>9.1} {:>9.1}",
        "ratio Core / baseline",
        live.p50 / base.p50,
        live.p99 / base.p99
    );
    println!();
    println!(
        "full sync of {SYNC_PEERS} peers to {GATEWAYS} gateways: {:.3} s (enabled to every gateway's Applied)",
        sync.as_secs_f64()
    );
    for i in 0..GATEWAYS {
        let secs = |d: Option<Duration>| d.map_or(f64::NAN, |d| d.as_secs_f64());
        println!(
            "  gw{}: link up at {:.3} s, applied at {:.3} s",
            i + 1,
            secs(linked[i]),
            secs(applied[i])
        );
    }
    println!(
        "baseline: {SYNC_PEERS} peers in one UAPI set on one wireguard-go: {:.3} s",
        base_one.as_secs_f64()
    );
    println!(
        "baseline: the same on {GATEWAYS} wireguard-go at once: {:.3} s (ratio Core / this: {:.2})",
        base_all.as_secs_f64(),
        sync.as_secs_f64() / base_all.as_secs_f64()
    );
    println!(
        "delivery of {DELIVERY_DEVICES} devices to {GATEWAYS} gateways: {:.3} s (enabled to every gateway's answer; refused: wireguard-go holds at most 65,536 peers)",
        delivery.as_secs_f64()
    );
    println!();
    let verdict = |met: bool| if met { "met" } else { "NOT met" };
    println!(
        "target p99 < {TARGET_P99_MS} ms: {}; full sync < {TARGET_SYNC_S} s: {}",
        verdict(live.p99 < TARGET_P99_MS),
        verdict(sync.as_secs_f64() < TARGET_SYNC_S)
    );
    drop(fresh);
    drop(baseline);
    Ok(())
}
