//! Watching a location's adverts under load: every advert on the segment
//! with the time it arrived, `tidectl status` asked on a schedule, and the
//! numbered peers a large reload is made of. The load test of the `ha`
//! suite and `cargo xtask bench adverts` share them.

use std::net::{IpAddr, Ipv4Addr, UdpSocket};
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow};
use base64::{Engine as _, engine::general_purpose::STANDARD as BASE64};
use nix::sys::socket::{IpMembershipRequest, setsockopt, sockopt};
use tidegate_gateway::ha::{
    advert::{Advert, AdvertKey},
    machine::Role,
};

use crate::bins::binary;
use crate::cmd::run_bounded;
use crate::gateway::{PeerEntry, TIDECTL_BIN};
use crate::ha::{ADVERT_GROUP, ADVERT_PORT, CLIENT_ADDR, HaGateway, HaLocation, KEY};

/// A bound on every watch: it stops by itself after this long.
const MAX_WATCH: Duration = Duration::from_secs(600);

/// One advert seen on the segment.
#[derive(Debug, Clone, Copy)]
pub struct SeenAdvert {
    pub at: Instant,
    pub gateway_id: u32,
    pub role: Role,
}

/// Every advert on the segment, decoded with the location's key, read on a
/// thread from a socket in the client's namespace that joined the advert
/// group. Anything else on the port (endpoint messages, junk) is skipped.
#[derive(Debug)]
pub struct AdvertWatch {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Vec<SeenAdvert>>,
}

impl AdvertWatch {
    /// Starts watching `location`'s segment.
    pub fn start(location: &HaLocation) -> Result<Self> {
        let socket = location.client().run(|| -> Result<UdpSocket> {
            let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, ADVERT_PORT))?;
            setsockopt(
                &socket,
                sockopt::IpAddMembership,
                &IpMembershipRequest::new(ADVERT_GROUP, Some(CLIENT_ADDR)),
            )?;
            socket.set_read_timeout(Some(Duration::from_millis(50)))?;
            Ok(socket)
        })??;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let key = AdvertKey::new(KEY.as_bytes().to_vec());
        let thread = std::thread::Builder::new()
            .name("advert watch".into())
            .spawn(move || {
                let started = Instant::now();
                let mut seen = Vec::new();
                let mut buf = [0u8; 2048];
                while !flag.load(Ordering::Relaxed) && started.elapsed() < MAX_WATCH {
                    let Ok((len, _)) = socket.recv_from(&mut buf) else {
                        continue;
                    };
                    let at = Instant::now();
                    if let Ok(advert) = Advert::decode(&buf[..len], &key) {
                        seen.push(SeenAdvert {
                            at,
                            gateway_id: advert.gateway_id,
                            role: advert.role,
                        });
                    }
                }
                seen
            })?;
        Ok(Self { stop, thread })
    }

    /// Stops watching; every advert seen, in order.
    pub fn finish(self) -> Result<Vec<SeenAdvert>> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .join()
            .map_err(|_| anyhow!("the advert watch panicked"))
    }
}

/// Gateway `id`'s adverts in `seen` from `from` on: how many, and the
/// longest time between two of them (from `from` to the first counts).
pub fn longest_gap(seen: &[SeenAdvert], id: u32, from: Instant) -> (usize, Duration) {
    let mut longest = Duration::ZERO;
    let mut count = 0;
    let mut last = from;
    for advert in seen.iter().filter(|a| a.gateway_id == id && a.at >= from) {
        longest = longest.max(advert.at - last);
        last = advert.at;
        count += 1;
    }
    (count, longest)
}

/// `tidectl status` asked of one gateway every interval, on a thread;
/// counts the answers.
#[derive(Debug)]
pub struct StatusPolls {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<u32>,
}

impl StatusPolls {
    /// Starts asking `gateway` every `interval`.
    pub fn start(gateway: &HaGateway, interval: Duration) -> Result<Self> {
        let tidectl = binary(TIDECTL_BIN)?;
        let socket: PathBuf = gateway.daemon().config().control_socket.clone();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("status polls".into())
            .spawn(move || {
                let started = Instant::now();
                let mut answered = 0;
                while !flag.load(Ordering::Relaxed) && started.elapsed() < MAX_WATCH {
                    let mut command = Command::new(&tidectl);
                    command
                        .arg("--socket")
                        .arg(&socket)
                        .args(["status", "--json"]);
                    if run_bounded(&mut command, Duration::from_secs(10))
                        .is_ok_and(|out| out.status.success())
                    {
                        answered += 1;
                    }
                    std::thread::sleep(interval);
                }
                answered
            })?;
        Ok(Self { stop, thread })
    }

    /// Stops asking; how many requests were answered.
    pub fn finish(self) -> Result<u32> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .join()
            .map_err(|_| anyhow!("the status polls panicked"))
    }
}

/// Peer `i` of a large config: a key and a tunnel address of its own
/// (10.100.0.0/15, outside the location's tunnel network).
pub fn numbered_peer(i: usize) -> PeerEntry {
    let mut key = [0x5a_u8; 32];
    key[..8].copy_from_slice(&(i as u64 + 1).to_le_bytes());
    let [_, b, c, d] = u32::try_from(i).unwrap_or(u32::MAX).to_be_bytes();
    PeerEntry {
        public_key: BASE64.encode(key),
        allowed_ips: vec![format!("{}/32", IpAddr::from([10, 100 + (b & 1), c, d]))],
        ..PeerEntry::default()
    }
}

/// How long a reload of many peers may take on a loaded machine.
const RELOAD_TIMEOUT: Duration = Duration::from_secs(120);

/// Rewrites `gateway`'s config with `peers` and reloads it.
pub fn reload_peers(gateway: &mut HaGateway, peers: Vec<PeerEntry>) -> Result<()> {
    let daemon = gateway.daemon_mut();
    let mut config = daemon.config().clone();
    config.peers = peers;
    let socket = config.control_socket.clone();
    daemon.write_config(config)?;
    let mut command = Command::new(binary(TIDECTL_BIN)?);
    command.arg("--socket").arg(&socket).arg("reload");
    run_bounded(&mut command, RELOAD_TIMEOUT)?.into_success()?;
    Ok(())
}

/// Adverts as MASTER from another gateway than `master`, from `from` on.
pub fn others_as_master(seen: &[SeenAdvert], master: u32, from: Instant) -> usize {
    seen.iter()
        .filter(|a| a.at >= from && a.gateway_id != master && a.role == Role::Master)
        .count()
}

/// Unix ms at the instant `at` (in the past).
pub fn unix_ms_at(at: Instant) -> u64 {
    let now = std::time::SystemTime::now() - at.elapsed();
    now.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The CPUs' busy and total time, from the first line of `/proc/stat`.
#[derive(Debug, Clone, Copy)]
pub struct CpuTimes {
    busy: u64,
    total: u64,
}

impl CpuTimes {
    pub fn read() -> Result<Self> {
        let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
        let fields: Vec<u64> = stat
            .lines()
            .next()
            .context("an empty /proc/stat")?
            .split_whitespace()
            .skip(1)
            .map(str::parse)
            .collect::<Result<_, _>>()?;
        // user nice system idle iowait irq softirq steal ...
        let idle = fields.get(3).copied().unwrap_or(0) + fields.get(4).copied().unwrap_or(0);
        let total: u64 = fields.iter().take(8).sum();
        Ok(Self {
            busy: total - idle,
            total,
        })
    }

    /// The busy share of the CPUs' time since `self`.
    pub fn busy_since(&self) -> Result<f64> {
        let now = Self::read()?;
        let total = now.total.saturating_sub(self.total).max(1);
        Ok(now.busy.saturating_sub(self.busy) as f64 / total as f64)
    }
}
