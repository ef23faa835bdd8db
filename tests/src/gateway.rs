//! The gateway daemon under test: its config file, the process, and its
//! counters read through `tidectl`.

use std::collections::BTreeMap;
use std::fmt::{self, Write as _};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::str::FromStr;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use nix::sys::signal::Signal;
use serde::Deserialize;

use crate::bins::binary;
use crate::cmd::{self, CmdOutput};
use crate::netns::Netns;
use crate::pki::CertFiles;
use crate::process::{LOG_TAIL_LINES, Process};
use crate::wait::{Probe, poll_until};

/// The gateway daemon's binary.
pub const GATEWAY_BIN: &str = "tidegate-gateway";

/// The operator CLI's binary.
pub const TIDECTL_BIN: &str = "tidectl";

/// How long the daemon gets to attach XDP and answer on its socket.
pub const READY_TIMEOUT: Duration = Duration::from_secs(15);

/// How long one `tidectl` call may take.
const TIDECTL_TIMEOUT: Duration = Duration::from_secs(10);

/// Per-reason counters every `counters --json` answer must carry.
pub const COUNTER_NAMES: [&str; 21] = [
    "not-service",
    "fragment",
    "unparsed",
    "wg-initiation",
    "wg-response",
    "wg-cookie-reply",
    "wg-transport",
    "truncated",
    "bad-type",
    "bad-length",
    "bad-reserved",
    "aborted",
    "fenced",
    "wg-steered",
    "handed-over",
    "deep-headers",
    "fragment-dropped",
    "advert",
    "advert-ttl",
    "advert-stranger",
    "advert-throttled",
];

/// Totals every `counters --json` answer must carry.
pub const TOTAL_NAMES: [&str; 5] = ["pass", "drop", "aborted", "tx", "wireguard"];

/// The WireGuard counters that make up the "wireguard" total: the four
/// per-type ones (passed to the gateway's stack) and the steered ones.
pub const WIREGUARD_COUNTERS: [&str; 5] = [
    "wg-initiation",
    "wg-response",
    "wg-cookie-reply",
    "wg-transport",
    "wg-steered",
];

/// How the gateway attaches its XDP program (`xdp_mode` in its config).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum XdpMode {
    /// Driver mode, falling back to generic.
    #[default]
    Auto,
    /// Driver (native) mode only.
    Driver,
    /// Generic (skb) mode only.
    Generic,
}

impl XdpMode {
    /// The config value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Driver => "driver",
            Self::Generic => "generic",
        }
    }
}

impl fmt::Display for XdpMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for XdpMode {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "auto" => Self::Auto,
            "driver" => Self::Driver,
            "generic" => Self::Generic,
            other => bail!("unknown XDP mode {other:?} (expected auto, driver or generic)"),
        })
    }
}

/// The gateway daemon's configuration file.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// The public interface the XDP program attaches to.
    pub interface: String,
    /// How to attach the XDP program.
    pub xdp_mode: XdpMode,
    /// Where the daemon listens for `tidectl`.
    pub control_socket: PathBuf,
    /// The (address, port) pairs the shield protects.
    pub services: Vec<SocketAddr>,
    /// Where the daemon keeps state that outlives it (`state_dir`), if set.
    pub state_dir: Option<PathBuf>,
    /// The location's WireGuard interface (`[wireguard]`), if the daemon
    /// runs it.
    pub wireguard: Option<WireguardSection>,
    /// The peers of the config file (`[[peer]]`).
    pub peers: Vec<PeerEntry>,
    /// The HA agent's settings (`[ha]`), if the daemon runs one.
    pub ha: Option<HaSection>,
    /// Where the daemon pins its XDP link (`bpf_pin_dir`): a BPF filesystem
    /// in the root mount namespace, such as [`crate::Run::bpffs`].
    pub bpf_pin_dir: Option<PathBuf>,
    /// The server Core dials (`[core]`), if Core manages the gateway.
    pub core: Option<CoreSection>,
    /// Programs run on role changes (`[[hooks]]`).
    pub hooks: Vec<HookSection>,
    /// Where the daemon serves `/metrics` (`[metrics] listen`), if set.
    pub metrics: Option<SocketAddr>,
}

impl GatewayConfig {
    /// A config with the shield only: no state directory, no WireGuard.
    pub fn shield(
        interface: &str,
        xdp_mode: XdpMode,
        control_socket: PathBuf,
        services: Vec<SocketAddr>,
    ) -> Self {
        Self {
            interface: interface.to_owned(),
            xdp_mode,
            control_socket,
            services,
            state_dir: None,
            wireguard: None,
            peers: Vec::new(),
            ha: None,
            bpf_pin_dir: None,
            core: None,
            hooks: Vec::new(),
            metrics: None,
        }
    }
}

/// The `[ha]` section of the gateway's config.
#[derive(Debug, Clone)]
pub struct HaSection {
    /// The location the gateway belongs to.
    pub location_id: u32,
    /// This gateway's id (1 or more, unique in the location).
    pub gateway_id: u32,
    /// 1 to 255, if set (the daemon's default is 100).
    pub priority: Option<u8>,
    /// How often the gateway advertises, if set.
    pub advert_interval_ms: Option<u64>,
    /// Whether a higher priority takes over from a lower master, if set.
    pub preempt: Option<bool>,
    /// No preemption for this long after start, if set.
    pub preempt_delay_ms: Option<u64>,
    /// The location's shared advert key.
    pub key: String,
    /// The floating addresses.
    pub vips: Vec<IpAddr>,
    /// The advert UDP port, if set.
    pub port: Option<u16>,
    /// The advert multicast group, if set.
    pub multicast_group: Option<Ipv4Addr>,
    /// The other gateways' addresses: unicast adverts instead of multicast.
    pub peers: Vec<IpAddr>,
    /// Tracked interfaces (`[[ha.track]]`) and their weights.
    pub track: Vec<(String, u8)>,
    /// Handshakes kicked per second after a failover, if set.
    pub kick_rate: Option<u32>,
    /// The second-chance window of a handover in ms, if set.
    pub handover_window_ms: Option<u64>,
    /// `active-standby` or `director`, if set (the daemon's default is
    /// active-standby).
    pub mode: Option<String>,
}

impl HaSection {
    /// Appends the section as TOML to `out`.
    fn write_toml(&self, out: &mut String) {
        let _ = write!(
            out,
            "\n[ha]\nlocation_id = {}\ngateway_id = {}\n",
            self.location_id, self.gateway_id
        );
        if let Some(priority) = self.priority {
            let _ = writeln!(out, "priority = {priority}");
        }
        if let Some(ms) = self.advert_interval_ms {
            let _ = writeln!(out, "advert_interval_ms = {ms}");
        }
        if let Some(preempt) = self.preempt {
            let _ = writeln!(out, "preempt = {preempt}");
        }
        if let Some(ms) = self.preempt_delay_ms {
            let _ = writeln!(out, "preempt_delay_ms = {ms}");
        }
        let _ = writeln!(out, "key = {}", toml_string(&self.key));
        let _ = writeln!(out, "vips = {}", toml_array(&to_strings(&self.vips)));
        if let Some(port) = self.port {
            let _ = writeln!(out, "port = {port}");
        }
        if let Some(group) = self.multicast_group {
            let _ = writeln!(out, "multicast_group = {}", toml_string(&group.to_string()));
        }
        if !self.peers.is_empty() {
            let _ = writeln!(out, "peers = {}", toml_array(&to_strings(&self.peers)));
        }
        if let Some(rate) = self.kick_rate {
            let _ = writeln!(out, "kick_rate = {rate}");
        }
        if let Some(ms) = self.handover_window_ms {
            let _ = writeln!(out, "handover_window_ms = {ms}");
        }
        if let Some(mode) = &self.mode {
            let _ = writeln!(out, "mode = {}", toml_string(mode));
        }
        for (interface, weight) in &self.track {
            let _ = write!(
                out,
                "\n[[ha.track]]\ninterface = {}\nweight = {weight}\n",
                toml_string(interface)
            );
        }
    }
}

/// Every item's `to_string`.
fn to_strings<T: ToString>(items: &[T]) -> Vec<String> {
    items.iter().map(ToString::to_string).collect()
}

/// The `[core]` section of the gateway's config: where Core dials it and
/// the TLS files that prove who is who.
#[derive(Debug, Clone)]
pub struct CoreSection {
    /// The address the gateway's gRPC server listens on.
    pub listen: SocketAddr,
    /// The CA, the gateway's certificate and key.
    pub tls: CertFiles,
    /// The gateway's identity (its certificate's name).
    pub identity: String,
    /// The identity Core's certificate must carry, if not `core`.
    pub core_identity: Option<String>,
    /// The id in the gateway's Hello, if not the `[ha]` one.
    pub gateway_id: Option<u32>,
    /// How often the gateway sends its status, if not every 5 s.
    pub status_interval_ms: Option<u64>,
}

impl CoreSection {
    /// A section with the defaults for everything optional.
    pub fn new(listen: SocketAddr, identity: &str, tls: CertFiles) -> Self {
        Self {
            listen,
            tls,
            identity: identity.to_owned(),
            core_identity: None,
            gateway_id: None,
            status_interval_ms: None,
        }
    }

    /// Appends the section as TOML to `out`.
    fn write_toml(&self, out: &mut String) {
        let path = |p: &Path| toml_string(&p.to_string_lossy());
        let _ = write!(
            out,
            "\n[core]\nlisten = {}\nca_file = {}\ncert_file = {}\nkey_file = {}\nidentity = {}\n",
            toml_string(&self.listen.to_string()),
            path(&self.tls.ca),
            path(&self.tls.cert),
            path(&self.tls.key),
            toml_string(&self.identity)
        );
        if let Some(core) = &self.core_identity {
            let _ = writeln!(out, "core_identity = {}", toml_string(core));
        }
        if let Some(id) = self.gateway_id {
            let _ = writeln!(out, "gateway_id = {id}");
        }
        if let Some(ms) = self.status_interval_ms {
            let _ = writeln!(out, "status_interval_ms = {ms}");
        }
    }
}

/// The `[wireguard]` section of the gateway's config.
#[derive(Debug, Clone)]
pub struct WireguardSection {
    /// The WireGuard interface's name.
    pub interface: String,
    /// `auto`, `kernel` or `userspace`.
    pub backend: String,
    /// The interface's private key in base64; `None` leaves it to Core's
    /// location config (only with a `[core]` section).
    pub private_key: Option<String>,
    /// The UDP port WireGuard listens on; `None` as for the key.
    pub listen_port: Option<u16>,
    /// The interface's own addresses with their prefix (`10.77.0.1/24`).
    pub addresses: Vec<String>,
    /// The interface's MTU, if set.
    pub mtu: Option<u32>,
    /// The peer stats poll period in milliseconds, if set.
    pub stats_interval_ms: Option<u64>,
    /// Whether the location removes inactive peers.
    pub mfa: bool,
    /// The MFA inactivity threshold in seconds, if set.
    pub peer_disconnect_threshold_secs: Option<u64>,
}

/// One `[[peer]]` of the gateway's config, or the arguments of
/// `tidectl peer add`.
#[derive(Debug, Clone, Default)]
pub struct PeerEntry {
    /// A label, if any.
    pub name: Option<String>,
    /// The peer's public key in base64.
    pub public_key: String,
    /// Tunnel networks routed to the peer.
    pub allowed_ips: Vec<String>,
    /// The preshared key in base64, if any.
    pub preshared_key: Option<String>,
    /// Keepalive interval in seconds, if any.
    pub persistent_keepalive: Option<u16>,
    /// Where to reach the peer (`address:port`), if known.
    pub endpoint: Option<String>,
}

impl PeerEntry {
    /// The `tidectl peer add|change` arguments for this peer (a preshared
    /// key is not passed: it would need a file).
    pub fn tidectl_args(&self) -> Vec<String> {
        let mut args = vec![
            "--public-key".to_owned(),
            self.public_key.clone(),
            "--allowed-ips".to_owned(),
            self.allowed_ips.join(","),
        ];
        if let Some(name) = &self.name {
            args.extend(["--name".to_owned(), name.clone()]);
        }
        if let Some(keepalive) = self.persistent_keepalive {
            args.extend(["--keepalive".to_owned(), keepalive.to_string()]);
        }
        if let Some(endpoint) = &self.endpoint {
            args.extend(["--endpoint".to_owned(), endpoint.clone()]);
        }
        args
    }
}

impl GatewayConfig {
    /// The config as TOML.
    pub fn to_toml(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "interface = {}", toml_string(&self.interface));
        let _ = writeln!(out, "xdp_mode = {}", toml_string(self.xdp_mode.as_str()));
        let _ = writeln!(
            out,
            "control_socket = {}",
            toml_string(&self.control_socket.to_string_lossy())
        );
        if let Some(dir) = &self.state_dir {
            let _ = writeln!(out, "state_dir = {}", toml_string(&dir.to_string_lossy()));
        }
        if let Some(dir) = &self.bpf_pin_dir {
            let _ = writeln!(out, "bpf_pin_dir = {}", toml_string(&dir.to_string_lossy()));
        }
        for service in &self.services {
            let _ = write!(
                out,
                "\n[[service]]\naddress = {}\nport = {}\n",
                toml_string(&service.ip().to_string()),
                service.port()
            );
        }
        if let Some(wg) = &self.wireguard {
            let _ = write!(
                out,
                "\n[wireguard]\ninterface = {}\nbackend = {}\n",
                toml_string(&wg.interface),
                toml_string(&wg.backend),
            );
            if let Some(key) = &wg.private_key {
                let _ = writeln!(out, "private_key = {}", toml_string(key));
            }
            if let Some(port) = wg.listen_port {
                let _ = writeln!(out, "listen_port = {port}");
            }
            let _ = writeln!(out, "addresses = {}", toml_array(&wg.addresses));
            if let Some(mtu) = wg.mtu {
                let _ = writeln!(out, "mtu = {mtu}");
            }
            if let Some(ms) = wg.stats_interval_ms {
                let _ = writeln!(out, "stats_interval_ms = {ms}");
            }
            let _ = writeln!(out, "mfa = {}", wg.mfa);
            if let Some(secs) = wg.peer_disconnect_threshold_secs {
                let _ = writeln!(out, "peer_disconnect_threshold_secs = {secs}");
            }
        }
        for peer in &self.peers {
            out.push_str("\n[[peer]]\n");
            if let Some(name) = &peer.name {
                let _ = writeln!(out, "name = {}", toml_string(name));
            }
            let _ = writeln!(out, "public_key = {}", toml_string(&peer.public_key));
            let _ = writeln!(out, "allowed_ips = {}", toml_array(&peer.allowed_ips));
            if let Some(psk) = &peer.preshared_key {
                let _ = writeln!(out, "preshared_key = {}", toml_string(psk));
            }
            if let Some(keepalive) = peer.persistent_keepalive {
                let _ = writeln!(out, "persistent_keepalive = {keepalive}");
            }
            if let Some(endpoint) = &peer.endpoint {
                let _ = writeln!(out, "endpoint = {}", toml_string(endpoint));
            }
        }
        if let Some(ha) = &self.ha {
            ha.write_toml(&mut out);
        }
        if let Some(core) = &self.core {
            core.write_toml(&mut out);
        }
        if let Some(listen) = self.metrics {
            let _ = write!(
                out,
                "\n[metrics]\nlisten = {}\n",
                toml_string(&listen.to_string())
            );
        }
        for hook in &self.hooks {
            let on: Vec<String> = hook.on.iter().map(|e| (*e).to_owned()).collect();
            let _ = write!(
                out,
                "\n[[hooks]]\non = {}\ncommand = {}\ntimeout_ms = {}\n",
                toml_array(&on),
                toml_array(&hook.command),
                hook.timeout_ms
            );
        }
        out
    }
}

/// A `[[hooks]]` entry of the gateway's config.
#[derive(Debug, Clone)]
pub struct HookSection {
    /// The events: `master`, `backup`, `fault`, `failover-complete`.
    pub on: Vec<&'static str>,
    /// The program and its arguments.
    pub command: Vec<String>,
    pub timeout_ms: u64,
}

/// `items` as a TOML array of basic strings.
fn toml_array(items: &[String]) -> String {
    let quoted: Vec<String> = items.iter().map(|s| toml_string(s)).collect();
    format!("[{}]", quoted.join(", "))
}

/// `s` as a TOML basic string.
fn toml_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04X}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A packet and byte count.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub struct Counter {
    /// Packets counted.
    pub packets: u64,
    /// Bytes counted.
    pub bytes: u64,
}

/// The answer of `tidectl counters --json`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Counters {
    /// The interface the XDP program is attached to.
    pub interface: String,
    /// The mode it is attached in ("driver" or "generic").
    pub xdp_mode: String,
    /// Counters per verdict reason.
    pub counters: BTreeMap<String, Counter>,
    /// Totals per verdict.
    pub totals: BTreeMap<String, Counter>,
}

impl Counters {
    /// Parses `tidectl counters --json` output and checks that every counter
    /// and total of the contract is present.
    pub fn parse(json: &str) -> Result<Self> {
        let counters: Self = serde_json::from_str(json)
            .with_context(|| format!("parsing counters JSON {json:?}"))?;
        for name in COUNTER_NAMES {
            counters.counter(name)?;
        }
        for name in TOTAL_NAMES {
            counters.total(name)?;
        }
        Ok(counters)
    }

    /// The per-reason counter `name`; an error if it is missing.
    pub fn counter(&self, name: &str) -> Result<Counter> {
        self.counters
            .get(name)
            .copied()
            .with_context(|| format!("no counter {name:?} in {:?}", self.counters.keys()))
    }

    /// The total `name`; an error if it is missing.
    pub fn total(&self, name: &str) -> Result<Counter> {
        self.totals
            .get(name)
            .copied()
            .with_context(|| format!("no total {name:?} in {:?}", self.totals.keys()))
    }

    /// Packets counted by counter `name` since `earlier`; an error if the
    /// counter is missing or went backwards.
    pub fn counter_growth(&self, earlier: &Self, name: &str) -> Result<u64> {
        growth(name, earlier.counter(name)?, self.counter(name)?)
    }

    /// Packets counted by total `name` since `earlier`.
    pub fn total_growth(&self, earlier: &Self, name: &str) -> Result<u64> {
        growth(name, earlier.total(name)?, self.total(name)?)
    }

    /// Bytes counted by counter `name` since `earlier`.
    pub fn counter_bytes_growth(&self, earlier: &Self, name: &str) -> Result<u64> {
        let (before, after) = (earlier.counter(name)?, self.counter(name)?);
        after.bytes.checked_sub(before.bytes).with_context(|| {
            format!("byte counter {name:?} went backwards: {before:?} -> {after:?}")
        })
    }
}

/// `after.packets - before.packets`, or an error if it went backwards.
fn growth(name: &str, before: Counter, after: Counter) -> Result<u64> {
    after
        .packets
        .checked_sub(before.packets)
        .with_context(|| format!("counter {name:?} went backwards: {before:?} -> {after:?}"))
}

/// The answer of `tidectl peers --json`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct PeersReply {
    /// The WireGuard interface.
    pub interface: String,
    /// `userspace` or `kernel`.
    pub backend: String,
    /// The wireguard-go process, for the userspace backend.
    pub backend_pid: Option<u32>,
    /// The port WireGuard listens on.
    pub listen_port: u16,
    /// Unix time of the stats poll the figures come from.
    pub polled_at: u64,
    /// The MFA threshold in seconds, if MFA is on.
    pub mfa_threshold_secs: Option<u64>,
    /// Why the state file is behind the state in force, while it is.
    #[serde(default)]
    pub state_unsaved: Option<String>,
    /// The peers on the device.
    pub peers: Vec<PeerStatus>,
}

impl PeersReply {
    /// The peer with public key `key`, if the device has it.
    pub fn peer(&self, key: &str) -> Option<&PeerStatus> {
        self.peers.iter().find(|p| p.public_key == key)
    }
}

/// One peer of [`PeersReply`].
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct PeerStatus {
    /// The peer's public key in base64.
    pub public_key: String,
    /// Its label, if any.
    #[serde(default)]
    pub name: Option<String>,
    /// `file`, `dynamic` or `unknown`.
    pub source: String,
    /// Where the peer was last seen (`ip:port`).
    pub endpoint: Option<String>,
    /// Its allowed IPs.
    pub allowed_ips: Vec<String>,
    /// Unix time of the last completed handshake.
    pub last_handshake: Option<u64>,
    /// Unix time of the last handshake or received data.
    pub last_active: Option<u64>,
    /// Bytes received from the peer.
    pub rx_bytes: u64,
    /// Bytes sent to the peer.
    pub tx_bytes: u64,
    /// Keepalive interval in seconds.
    pub persistent_keepalive: Option<u16>,
    /// Whether a preshared key is set.
    pub preshared_key: bool,
}

/// One entry of `tidectl removals --json`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Removal {
    /// The removed peer's public key.
    pub public_key: String,
    /// Its label, if any.
    #[serde(default)]
    pub name: Option<String>,
    /// Unix time of the removal.
    pub removed_at: u64,
    /// `idle` or `no-handshake`.
    pub reason: String,
    /// Unix time the peer was last active, if ever.
    #[serde(default)]
    pub last_active: Option<u64>,
}

/// A running `tidegate-gateway` and the way to talk to it.
#[derive(Debug)]
pub struct GatewayDaemon {
    process: Process,
    tidectl: PathBuf,
    config: GatewayConfig,
    config_path: PathBuf,
}

impl GatewayDaemon {
    /// Writes `config` to `dir/gateway.toml`, starts the daemon in `netns`
    /// (log in `dir/gateway.log`) and waits until its control socket answers
    /// `tidectl counters --json`, i.e. the XDP program is attached.
    pub fn start(netns: &Netns, config: GatewayConfig, dir: &Path) -> Result<Self> {
        let mut daemon = Self::spawn(netns, config, dir)?;
        daemon.wait_ready()?;
        Ok(daemon)
    }

    /// Like [`Self::start`] without waiting: for starting several daemons
    /// at about the same time, then [`Self::wait_ready`] on each.
    pub fn spawn(netns: &Netns, config: GatewayConfig, dir: &Path) -> Result<Self> {
        anyhow::ensure!(
            config.bpf_pin_dir.is_some(),
            "the gateway config has no bpf_pin_dir: set it to the run's BPF filesystem (Run::bpffs), \
             the only place a pinned XDP link outlives the daemon under `ip netns exec`"
        );
        let gateway_bin = binary(GATEWAY_BIN)?;
        let tidectl = binary(TIDECTL_BIN)?;
        let config_path = dir.join("gateway.toml");
        std::fs::write(&config_path, config.to_toml())
            .with_context(|| format!("writing {}", config_path.display()))?;

        let mut command = netns.command(&gateway_bin);
        command.arg("--config").arg(&config_path);
        if std::env::var_os("RUST_LOG").is_none() {
            command.env("RUST_LOG", "info");
        }
        let process = Process::spawn(GATEWAY_BIN, netns, command, &dir.join("gateway.log"))?;
        Ok(Self {
            process,
            tidectl,
            config,
            config_path,
        })
    }

    /// Polls `tidectl counters --json` until it answers, while the daemon
    /// keeps running.
    pub fn wait_ready(&mut self) -> Result<()> {
        let what = format!(
            "{GATEWAY_BIN} to answer on {}",
            self.config.control_socket.display()
        );
        let waited = poll_until(&what, READY_TIMEOUT, Duration::from_millis(100), || {
            self.process.ensure_running()?;
            let out = self.tidectl(&["counters", "--json"])?;
            if !out.status.success() {
                return Ok(Probe::NotYet(format!(
                    "{}: {}",
                    out.status,
                    out.stderr.trim()
                )));
            }
            Ok(match Counters::parse(&out.stdout) {
                Ok(_) => Probe::Ready(()),
                Err(err) => Probe::NotYet(format!("{err:#}")),
            })
        });
        waited.map_err(|err| {
            // An exited daemon's error already quotes its log.
            if matches!(self.process.try_status(), Ok(None)) {
                anyhow::anyhow!(
                    "{err:#}\n{GATEWAY_BIN} is still running; last lines of {}:\n{}",
                    self.process.log_path().display(),
                    self.process.log_tail(LOG_TAIL_LINES)
                )
            } else {
                err
            }
        })
    }

    /// Runs `tidectl --socket <socket> <args>` (from the root namespace: the
    /// socket is a file) and returns its output whatever its exit status.
    pub fn tidectl(&self, args: &[&str]) -> Result<CmdOutput> {
        let mut command = Command::new(&self.tidectl);
        command
            .arg("--socket")
            .arg(&self.config.control_socket)
            .args(args);
        cmd::run_bounded(&mut command, TIDECTL_TIMEOUT)
    }

    /// Runs `tidectl` and returns its stdout; on failure the error carries
    /// tidectl's output and the daemon's log tail.
    pub fn tidectl_ok(&mut self, args: &[&str]) -> Result<String> {
        let result = self.tidectl(args).and_then(CmdOutput::into_success);
        result.map_err(|err| {
            let state = match self.process.ensure_running() {
                Ok(()) => format!(
                    "{GATEWAY_BIN} is still running; last lines of its log:\n{}",
                    self.process.log_tail(LOG_TAIL_LINES)
                ),
                Err(exited) => format!("{exited:#}"),
            };
            err.context(state)
        })
    }

    /// The counters, from `tidectl counters --json`.
    pub fn counters(&mut self) -> Result<Counters> {
        let json = self.tidectl_ok(&["counters", "--json"])?;
        Counters::parse(&json)
    }

    /// The human counters table, from `tidectl counters`.
    pub fn counters_table(&mut self) -> Result<String> {
        self.tidectl_ok(&["counters"])
    }

    /// The WireGuard peers, from `tidectl peers --json`.
    pub fn peers(&mut self) -> Result<PeersReply> {
        let json = self.tidectl_ok(&["peers", "--json"])?;
        serde_json::from_str(&json).with_context(|| format!("parsing peers JSON {json:?}"))
    }

    /// The peers an MFA location removed, from `tidectl removals --json`.
    pub fn removals(&mut self) -> Result<Vec<Removal>> {
        let json = self.tidectl_ok(&["removals", "--json"])?;
        serde_json::from_str(&json).with_context(|| format!("parsing removals JSON {json:?}"))
    }

    /// `tidectl peer <verb> <args>` (verb `add` or `change`) for `peer`,
    /// whatever its outcome.
    pub fn peer_command(&self, verb: &str, peer: &PeerEntry) -> Result<CmdOutput> {
        let args = peer.tidectl_args();
        let mut all = vec!["peer", verb];
        all.extend(args.iter().map(String::as_str));
        self.tidectl(&all)
    }

    /// `tidectl peer <verb>` for `peer`, which must succeed; returns the
    /// "applied: ..." line.
    pub fn peer_ok(&mut self, verb: &str, peer: &PeerEntry) -> Result<String> {
        let args = peer.tidectl_args();
        let mut all = vec!["peer", verb];
        all.extend(args.iter().map(String::as_str));
        self.tidectl_ok(&all)
    }

    /// Rewrites the config file with `config` (the daemon reads it on
    /// `tidectl reload` or SIGHUP) and keeps it as the daemon's config.
    pub fn write_config(&mut self, config: GatewayConfig) -> Result<()> {
        std::fs::write(&self.config_path, config.to_toml())
            .with_context(|| format!("writing {}", self.config_path.display()))?;
        self.config = config;
        Ok(())
    }

    /// Kills the daemon with SIGKILL (no clean-up of its own) and reaps it.
    pub fn kill(&mut self) -> Result<ExitStatus> {
        self.process.kill()
    }

    /// Sends `signal` to the daemon's own pid (SIGSTOP, SIGCONT, ...).
    pub fn signal(&mut self, signal: Signal) -> Result<()> {
        self.process.signal(signal)
    }

    /// Starts the daemon again with the config file as it is, after it
    /// exited or was killed (its log goes on in the same file), and waits
    /// until it answers. Returns the length of the log before the restart,
    /// so that callers can read what the new process wrote.
    pub fn restart(&mut self, netns: &Netns) -> Result<usize> {
        self.process.ensure_stopped()?;
        let offset = self.process.log().len();
        let gateway_bin = binary(GATEWAY_BIN)?;
        let mut command = netns.command(&gateway_bin);
        command.arg("--config").arg(&self.config_path);
        if std::env::var_os("RUST_LOG").is_none() {
            command.env("RUST_LOG", "info");
        }
        let log = self.process.log_path().to_owned();
        self.process = Process::spawn(GATEWAY_BIN, netns, command, &log)?;
        self.wait_ready()?;
        Ok(offset)
    }

    /// The daemon's log from byte `offset` on.
    pub fn log_since(&self, offset: usize) -> String {
        let log = self.process.log();
        log.get(offset..).unwrap_or_default().to_owned()
    }

    /// The last lines of the daemon's log, for failure messages.
    pub fn log_tail(&self) -> String {
        self.process.log_tail(LOG_TAIL_LINES)
    }

    /// Polls the daemon's log until it contains `needle` after byte
    /// `offset`, at most `timeout`.
    pub fn wait_for_log(&mut self, needle: &str, offset: usize, timeout: Duration) -> Result<()> {
        let what = format!("{GATEWAY_BIN} to log {needle:?}");
        poll_until(&what, timeout, Duration::from_millis(50), || {
            self.process.ensure_running()?;
            Ok(if self.log_since(offset).contains(needle) {
                Probe::Ready(())
            } else {
                Probe::NotYet(format!("last lines of the log:\n{}", self.log_tail()))
            })
        })
    }

    /// The configuration the daemon runs with.
    pub fn config(&self) -> &GatewayConfig {
        &self.config
    }

    /// Where the config file was written.
    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// The daemon process (pid, log).
    pub fn process(&self) -> &Process {
        &self.process
    }

    /// `Ok` while the daemon runs, else an error with its log tail.
    pub fn ensure_running(&mut self) -> Result<()> {
        self.process.ensure_running()
    }

    /// Stops the daemon with SIGTERM and returns its exit status (see
    /// [`Process::stop`]).
    pub fn stop(&mut self) -> Result<ExitStatus> {
        self.process.stop()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_toml_has_every_field() {
        let config = GatewayConfig::shield(
            "tg0123abcdg",
            XdpMode::Generic,
            "/tmp/run \"x\"/gateway.sock".into(),
            vec![
                "198.51.100.1:51820".parse().unwrap(),
                "[2001:db8::1]:51821".parse().unwrap(),
            ],
        );
        assert_eq!(
            config.to_toml(),
            "interface = \"tg0123abcdg\"\n\
             xdp_mode = \"generic\"\n\
             control_socket = \"/tmp/run \\\"x\\\"/gateway.sock\"\n\
             \n[[service]]\naddress = \"198.51.100.1\"\nport = 51820\n\
             \n[[service]]\naddress = \"2001:db8::1\"\nport = 51821\n"
        );
    }

    #[test]
    fn config_toml_has_wireguard_and_peers() {
        let mut config = GatewayConfig::shield(
            "tg0123abcdg",
            XdpMode::Auto,
            "/tmp/gw.sock".into(),
            vec!["198.51.100.1:51820".parse().unwrap()],
        );
        config.state_dir = Some("/tmp/state".into());
        config.bpf_pin_dir = Some("/tmp/bpf".into());
        config.wireguard = Some(WireguardSection {
            interface: "tg0123abcdgw".into(),
            backend: "userspace".into(),
            private_key: Some("cHJpdmF0ZQ==".into()),
            listen_port: Some(51820),
            addresses: vec!["10.77.0.1/24".into()],
            mtu: Some(1420),
            stats_interval_ms: Some(200),
            mfa: true,
            peer_disconnect_threshold_secs: Some(3),
        });
        config.peers = vec![
            PeerEntry {
                name: Some("alice".into()),
                public_key: "YWxpY2U=".into(),
                allowed_ips: vec!["10.77.0.2/32".into(), "10.77.1.0/24".into()],
                preshared_key: Some("cHNr".into()),
                persistent_keepalive: Some(25),
                endpoint: Some("198.51.100.2:51820".into()),
            },
            PeerEntry {
                public_key: "Ym9i".into(),
                allowed_ips: vec!["10.77.0.3/32".into()],
                ..PeerEntry::default()
            },
        ];
        assert_eq!(
            config.to_toml(),
            "interface = \"tg0123abcdg\"\n\
             xdp_mode = \"auto\"\n\
             control_socket = \"/tmp/gw.sock\"\n\
             state_dir = \"/tmp/state\"\n\
             bpf_pin_dir = \"/tmp/bpf\"\n\
             \n[[service]]\naddress = \"198.51.100.1\"\nport = 51820\n\
             \n[wireguard]\ninterface = \"tg0123abcdgw\"\nbackend = \"userspace\"\n\
             private_key = \"cHJpdmF0ZQ==\"\nlisten_port = 51820\naddresses = [\"10.77.0.1/24\"]\n\
             mtu = 1420\nstats_interval_ms = 200\nmfa = true\npeer_disconnect_threshold_secs = 3\n\
             \n[[peer]]\nname = \"alice\"\npublic_key = \"YWxpY2U=\"\n\
             allowed_ips = [\"10.77.0.2/32\", \"10.77.1.0/24\"]\npreshared_key = \"cHNr\"\n\
             persistent_keepalive = 25\nendpoint = \"198.51.100.2:51820\"\n\
             \n[[peer]]\npublic_key = \"Ym9i\"\nallowed_ips = [\"10.77.0.3/32\"]\n"
        );
        assert_eq!(
            config.peers[0].tidectl_args(),
            [
                "--public-key",
                "YWxpY2U=",
                "--allowed-ips",
                "10.77.0.2/32,10.77.1.0/24",
                "--name",
                "alice",
                "--keepalive",
                "25",
                "--endpoint",
                "198.51.100.2:51820"
            ]
        );
    }

    #[test]
    fn parses_peers_and_removals() {
        let peers: PeersReply = serde_json::from_str(
            r#"{"interface":"wg0","backend":"userspace","backend_pid":42,"listen_port":51820,
                "polled_at":1700000000,"mfa_threshold_secs":null,"peers":[{"public_key":"YWxpY2U=",
                "name":"alice","source":"file","endpoint":"198.51.100.2:40000",
                "allowed_ips":["10.77.0.2/32"],"last_handshake":1700000000,"last_active":null,
                "rx_bytes":1,"tx_bytes":2,"persistent_keepalive":null,"preshared_key":false}]}"#,
        )
        .unwrap();
        assert_eq!(peers.backend_pid, Some(42));
        let alice = peers.peer("YWxpY2U=").unwrap();
        assert_eq!(alice.endpoint.as_deref(), Some("198.51.100.2:40000"));
        assert!(peers.peer("Ym9i").is_none());
        let removals: Vec<Removal> = serde_json::from_str(
            r#"[{"public_key":"Ym9i","removed_at":5,"reason":"no-handshake"}]"#,
        )
        .unwrap();
        assert_eq!(removals[0].reason, "no-handshake");
        assert_eq!(removals[0].last_active, None);
    }

    #[test]
    fn config_toml_has_every_ha_field() {
        let mut config = GatewayConfig::shield(
            "tg0123abcdg",
            XdpMode::Auto,
            "/tmp/gw.sock".into(),
            vec!["198.51.100.100:51820".parse().unwrap()],
        );
        config.ha = Some(HaSection {
            track: Vec::new(),
            location_id: 3,
            gateway_id: 2,
            priority: Some(110),
            advert_interval_ms: Some(50),
            preempt: Some(false),
            preempt_delay_ms: Some(1000),
            key: "sixteen-bytes-key!".into(),
            vips: vec![
                "198.51.100.100".parse().unwrap(),
                "2001:db8::100".parse().unwrap(),
            ],
            port: Some(51900),
            multicast_group: Some(Ipv4Addr::new(239, 255, 0, 9)),
            peers: Vec::new(),
            kick_rate: Some(500),
            handover_window_ms: Some(1500),
            mode: Some("director".into()),
        });
        assert!(
            config.to_toml().ends_with(
                "port = 51820\n\
                 \n[ha]\nlocation_id = 3\ngateway_id = 2\npriority = 110\n\
                 advert_interval_ms = 50\npreempt = false\npreempt_delay_ms = 1000\n\
                 key = \"sixteen-bytes-key!\"\n\
                 vips = [\"198.51.100.100\", \"2001:db8::100\"]\nport = 51900\n\
                 multicast_group = \"239.255.0.9\"\nkick_rate = 500\nhandover_window_ms = 1500\n\
                 mode = \"director\"\n"
            ),
            "{}",
            config.to_toml()
        );
    }

    #[test]
    fn config_toml_has_the_core_section() {
        let mut config = GatewayConfig::shield(
            "tg0123abcdg",
            XdpMode::Auto,
            "/tmp/gw.sock".into(),
            vec!["198.51.100.1:51820".parse().unwrap()],
        );
        config.wireguard = Some(WireguardSection {
            interface: "tg0123abcdgw".into(),
            backend: "userspace".into(),
            private_key: None,
            listen_port: None,
            addresses: vec!["10.77.0.1/24".into()],
            mtu: None,
            stats_interval_ms: None,
            mfa: false,
            peer_disconnect_threshold_secs: None,
        });
        let mut core = CoreSection::new(
            "192.0.2.2:7443".parse().unwrap(),
            "gw-a",
            CertFiles {
                ca: "/p/ca.pem".into(),
                cert: "/p/gw-a.pem".into(),
                key: "/p/gw-a.key".into(),
            },
        );
        core.status_interval_ms = Some(200);
        config.core = Some(core);
        let toml = config.to_toml();
        assert!(
            toml.ends_with(
                "\n[wireguard]\ninterface = \"tg0123abcdgw\"\nbackend = \"userspace\"\n\
                 addresses = [\"10.77.0.1/24\"]\nmfa = false\n\
                 \n[core]\nlisten = \"192.0.2.2:7443\"\nca_file = \"/p/ca.pem\"\n\
                 cert_file = \"/p/gw-a.pem\"\nkey_file = \"/p/gw-a.key\"\nidentity = \"gw-a\"\n\
                 status_interval_ms = 200\n"
            ),
            "{toml}"
        );
    }

    #[test]
    fn xdp_mode_round_trips() {
        for mode in [XdpMode::Auto, XdpMode::Driver, XdpMode::Generic] {
            assert_eq!(mode.as_str().parse::<XdpMode>().unwrap(), mode);
        }
        assert!("native".parse::<XdpMode>().is_err());
    }

    fn sample_json(bad_type: u64) -> String {
        let counters: Vec<String> = COUNTER_NAMES
            .iter()
            .map(|name| {
                let packets = if *name == "bad-type" { bad_type } else { 1 };
                format!(
                    "\"{name}\":{{\"packets\":{packets},\"bytes\":{}}}",
                    packets * 60
                )
            })
            .collect();
        let totals: Vec<String> = TOTAL_NAMES
            .iter()
            .map(|name| format!("\"{name}\":{{\"packets\":7,\"bytes\":420}}"))
            .collect();
        format!(
            "{{\"interface\":\"g0\",\"xdp_mode\":\"driver\",\"counters\":{{{}}},\"totals\":{{{}}}}}",
            counters.join(","),
            totals.join(",")
        )
    }

    #[test]
    fn parses_counters_and_computes_growth() {
        let before = Counters::parse(&sample_json(3)).unwrap();
        let after = Counters::parse(&sample_json(10)).unwrap();
        assert_eq!(before.interface, "g0");
        assert_eq!(before.xdp_mode, "driver");
        assert_eq!(
            before.counter("bad-type").unwrap(),
            Counter {
                packets: 3,
                bytes: 180
            }
        );
        assert_eq!(after.counter_growth(&before, "bad-type").unwrap(), 7);
        assert_eq!(
            after.counter_bytes_growth(&before, "bad-type").unwrap(),
            420
        );
        assert_eq!(after.total_growth(&before, "drop").unwrap(), 0);
        assert!(before.counter_growth(&after, "bad-type").is_err());
    }

    #[test]
    fn rejects_counters_missing_a_name() {
        let json = sample_json(0).replace("\"bad-reserved\"", "\"bad-reserve\"");
        let err = Counters::parse(&json).unwrap_err().to_string();
        assert!(err.contains("bad-reserved"), "{err}");
    }
}
