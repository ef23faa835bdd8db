//! The gateway's configuration: one TOML file, then command-line overrides.
//! Each section is validated alone, then [`rules`] checks them together.

pub mod rules;

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use ipnet::IpNet;
use serde::Deserialize;
use tidegate_common::director::{
    DEFAULT_MAX_SESSIONS, DEFAULT_TABLE_SIZE, MAX_BACKEND_ID, MAX_TABLE_SIZE,
};

pub use self::rules::{Finding, Severity};
use crate::{
    continuity,
    core_link::CoreLinkConfig,
    director::{DirectorConfig, maglev::is_prime},
    ha::{
        advert::{AdvertKey, MAX_VIPS},
        agent::{HaConfig, HaMode},
        machine::Settings,
        transport::Destination,
    },
    hooks::{Hook, HookEntry, HookError},
    wireguard::{
        BackendSetting, PeerEntry, WireguardConfig,
        key::{Key, KeyError},
        spec::{PeerError, check_peers},
    },
    xdp::{ServiceError, ServiceTable, ShieldSettings, XdpModeSetting},
};

/// Where the daemon looks for its config by default.
pub const DEFAULT_CONFIG: &str = "/etc/tidegate/gateway.toml";
/// Where the daemon listens for `tidectl` by default.
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/tidegate/gateway.sock";
/// Where the daemon keeps state that outlives it, by default.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/tidegate";
/// Where the daemon pins its XDP link, by default (on the BPF filesystem
/// systemd mounts at /sys/fs/bpf).
pub const DEFAULT_BPF_PIN_DIR: &str = "/sys/fs/bpf/tidegate";
/// Longest interface name Linux accepts (IFNAMSIZ less the NUL).
const MAX_INTERFACE_NAME: usize = 15;
/// WireGuard interface MTU when the file sets none.
const DEFAULT_MTU: u32 = 1420;
/// MTU bounds: IPv4's minimum, IPv6's minimum, and jumbo frames.
const MTU_MIN_V4: u32 = 576;
const MTU_MIN_V6: u32 = 1280;
const MTU_MAX: u32 = 9000;
/// Peer stats poll period when the file sets none.
const DEFAULT_STATS_INTERVAL_MS: u64 = 1000;
const MIN_STATS_INTERVAL_MS: u64 = 100;
/// HA defaults and bounds.
const DEFAULT_HA_PRIORITY: u8 = 100;
const DEFAULT_ADVERT_INTERVAL_MS: u64 = 100;
const MIN_ADVERT_INTERVAL_MS: u64 = 20;
const MAX_ADVERT_INTERVAL_MS: u64 = 10_000;
const DEFAULT_HA_PORT: u16 = 51899;
const DEFAULT_MULTICAST_GROUP: Ipv4Addr = Ipv4Addr::new(239, 255, 77, 18);
const MIN_HA_KEY: usize = 16;
/// Failover continuity defaults and bounds.
const DEFAULT_KICK_RATE: u32 = 2000;
const MAX_KICK_RATE: u32 = 100_000;
const DEFAULT_KICK_WINDOW_SECS: u64 = 180;
const MAX_KICK_WINDOW_SECS: u64 = 3600;
const DEFAULT_HANDOVER_WINDOW_MS: u64 = 2000;
const MAX_HANDOVER_WINDOW_MS: u64 = 60_000;
const DEFAULT_ENDPOINT_REFRESH_SECS: u64 = 30;
const MAX_ENDPOINT_REFRESH_SECS: u64 = 3600;
const DEFAULT_ENDPOINT_MAX_AGE_SECS: u64 = 600;
const MAX_ENDPOINT_MAX_AGE_SECS: u64 = 86_400;
/// Director bounds: Maglev table sizes (primes; the program holds up to
/// `MAX_TABLE_SIZE` entries) and session map capacities.
const MIN_DIRECTOR_TABLE_SIZE: u32 = 251;
const MIN_DIRECTOR_SESSIONS: u32 = 1024;
const MAX_DIRECTOR_SESSIONS: u32 = 16 * 1024 * 1024;
/// MFA peer-disconnect threshold when the file sets none.
const DEFAULT_PEER_DISCONNECT_THRESHOLD_SECS: u64 = 300;
/// The identity Core's certificate carries, by default.
pub const DEFAULT_CORE_IDENTITY: &str = "core";
/// How often the gateway sends Core its status, by default.
const DEFAULT_STATUS_INTERVAL_MS: u64 = 5000;
const MIN_STATUS_INTERVAL_MS: u64 = 100;
const MAX_STATUS_INTERVAL_MS: u64 = 3_600_000;

/// A config that cannot be used, with the file and the field at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading config {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config {path}")]
    Parse {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    #[error("config {path}: interface {name:?}: {reason}")]
    Interface {
        path: PathBuf,
        name: String,
        reason: &'static str,
    },
    #[error("config {path}: [[service]]")]
    Services {
        path: PathBuf,
        #[source]
        source: ServiceError,
    },
    #[error("config {path}: [ha] {field}: {reason}")]
    Ha {
        path: PathBuf,
        field: &'static str,
        reason: String,
    },
    #[error("config {path}: [wireguard] {field}: {reason}")]
    Wireguard {
        path: PathBuf,
        field: &'static str,
        reason: String,
    },
    #[error("config {path}: [wireguard] private_key")]
    PrivateKey {
        path: PathBuf,
        #[source]
        source: KeyError,
    },
    #[error("config {path}: [wireguard] private_key_file {file}")]
    PrivateKeyFile {
        path: PathBuf,
        file: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("config {path}: [[peer]] #{index}")]
    Peer {
        path: PathBuf,
        index: usize,
        #[source]
        source: PeerError,
    },
    #[error("config {path}: [[peer]]")]
    Peers {
        path: PathBuf,
        #[source]
        source: PeerError,
    },
    #[error("config {path}: [[hooks]] #{index}")]
    Hook {
        path: PathBuf,
        index: usize,
        #[source]
        source: HookError,
    },
    #[error("config {path}: [metrics] {field}: {reason}")]
    Metrics {
        path: PathBuf,
        field: &'static str,
        reason: String,
    },
    #[error("config {path}: [core] {field}: {reason}")]
    Core {
        path: PathBuf,
        field: &'static str,
        reason: String,
    },
    #[error("config {path}: {finding}")]
    Rule { path: PathBuf, finding: Finding },
    #[error("config {path}: {} problems:{}", problems.len(), list(problems))]
    Problems {
        path: PathBuf,
        problems: Vec<ConfigError>,
    },
}

impl ConfigError {
    /// Ok without problems, the problem itself when there is one, all of
    /// them together otherwise.
    fn all(path: &Path, mut problems: Vec<ConfigError>) -> Result<(), ConfigError> {
        match problems.len() {
            0 => Ok(()),
            1 => Err(problems.remove(0)),
            _ => Err(ConfigError::Problems {
                path: path.to_owned(),
                problems,
            }),
        }
    }

    /// Each problem on its own line, with its causes.
    pub fn lines(&self) -> Vec<String> {
        match self {
            Self::Problems { problems, .. } => {
                problems.iter().map(|p| crate::error_chain(p)).collect()
            }
            other => vec![crate::error_chain(other)],
        }
    }
}

fn list(problems: &[ConfigError]) -> String {
    problems
        .iter()
        .map(|p| format!("\n  {}", crate::error_chain(p)))
        .collect()
}

/// The file as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    /// Public interface the XDP program attaches to.
    interface: String,
    #[serde(default)]
    xdp_mode: XdpModeSetting,
    control_socket: Option<PathBuf>,
    state_dir: Option<PathBuf>,
    bpf_pin_dir: Option<PathBuf>,
    #[serde(default, rename = "service")]
    services: Vec<ServiceEntry>,
    #[serde(default)]
    shield: ShieldSettings,
    wireguard: Option<WireguardSection>,
    ha: Option<HaSection>,
    core: Option<CoreSection>,
    metrics: Option<MetricsSection>,
    #[serde(default, rename = "peer")]
    peers: Vec<PeerEntry>,
    #[serde(default)]
    hooks: Vec<HookEntry>,
}

/// `[metrics]`: the Prometheus endpoint.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MetricsSection {
    /// Address and port `/metrics` is served on.
    listen: String,
}

/// `[core]`: the gRPC server Core dials.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CoreSection {
    listen: SocketAddr,
    ca_file: PathBuf,
    cert_file: PathBuf,
    key_file: PathBuf,
    identity: String,
    core_identity: Option<String>,
    gateway_id: Option<u32>,
    status_interval_ms: Option<u64>,
}

/// `[ha]`: the election among the location's gateways.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct HaSection {
    location_id: u32,
    gateway_id: u32,
    priority: Option<u8>,
    advert_interval_ms: Option<u64>,
    preempt: Option<bool>,
    preempt_delay_ms: Option<u64>,
    key: Option<String>,
    key_file: Option<PathBuf>,
    vips: Vec<IpAddr>,
    port: Option<u16>,
    multicast_group: Option<Ipv4Addr>,
    #[serde(default)]
    peers: Vec<IpAddr>,
    #[serde(default)]
    track: Vec<TrackEntry>,
    kick_rate: Option<u32>,
    kick_window_secs: Option<u64>,
    handover_window_ms: Option<u64>,
    endpoint_refresh_secs: Option<u64>,
    endpoint_max_age_secs: Option<u64>,
    /// `active-standby` (the default) or `director`.
    #[serde(default = "default_mode")]
    mode: HaMode,
    director_table_size: Option<u32>,
    director_max_sessions: Option<u32>,
}

fn default_mode() -> HaMode {
    HaMode::ActiveStandby
}

/// `[[ha.track]]`: an interface whose failure costs priority.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TrackEntry {
    interface: String,
    weight: u8,
}

/// `[wireguard]`: the location's interface.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WireguardSection {
    interface: String,
    #[serde(default)]
    backend: BackendSetting,
    private_key: Option<String>,
    private_key_file: Option<PathBuf>,
    listen_port: Option<u16>,
    #[serde(default)]
    addresses: Vec<String>,
    mtu: Option<u32>,
    stats_interval_ms: Option<u64>,
    #[serde(default)]
    mfa: bool,
    peer_disconnect_threshold_secs: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ServiceEntry {
    address: IpAddr,
    port: u16,
}

/// Values given on the command line, which win over the file.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub interface: Option<String>,
    pub xdp_mode: Option<XdpModeSetting>,
    pub control_socket: Option<PathBuf>,
}

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Public interface the XDP program attaches to.
    pub interface: String,
    /// How to attach the XDP program.
    pub xdp_mode: XdpModeSetting,
    /// The local control socket (root only).
    pub control_socket: PathBuf,
    /// The (address, port) pairs the shield protects.
    pub services: ServiceTable,
    /// What the shield does with what it cannot check.
    pub shield: ShieldSettings,
    /// Where state that outlives the daemon is kept.
    pub state_dir: PathBuf,
    /// Where the XDP link is pinned (a directory on a BPF filesystem).
    pub bpf_pin_dir: PathBuf,
    /// The location's WireGuard interface and peers, if the daemon runs it.
    pub wireguard: Option<WireguardConfig>,
    /// The HA agent's settings, if this gateway takes part in an election.
    pub ha: Option<HaConfig>,
    /// The server Core dials, if Core manages this gateway.
    pub core: Option<CoreLinkConfig>,
    /// Programs run on role changes and completed failovers (with `[ha]`).
    pub hooks: Vec<Hook>,
    /// Where `/metrics` is served (`[metrics] listen`); `None`: nowhere.
    pub metrics: Option<SocketAddr>,
}

impl Config {
    /// Reads `path`, applies `overrides`, and validates the result.
    pub fn load(path: &Path, overrides: Overrides) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(path, &text, overrides)
    }

    /// Reads `path` and validates it as [`Config::parse_checked`] does.
    pub fn load_checked(
        path: &Path,
        overrides: Overrides,
    ) -> Result<(Self, Vec<Finding>), ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse_checked(path, &text, overrides)
    }

    /// Parses `text` (read from `path`, named in errors).
    pub fn parse(path: &Path, text: &str, overrides: Overrides) -> Result<Self, ConfigError> {
        Self::parse_checked(path, text, overrides).map(|(config, _)| config)
    }

    /// Parses `text` and checks the rules between its sections
    /// ([`rules::check`]): a broken rule of [`Severity::Error`] fails it,
    /// the warnings come back with the config.
    pub fn parse_checked(
        path: &Path,
        text: &str,
        overrides: Overrides,
    ) -> Result<(Self, Vec<Finding>), ConfigError> {
        let config = Self::parse_sections(path, text, overrides)?;
        let (errors, warnings): (Vec<_>, Vec<_>) = rules::check(&config)
            .into_iter()
            .partition(|f| f.severity == Severity::Error);
        let errors = errors
            .into_iter()
            .map(|finding| ConfigError::Rule {
                path: path.to_owned(),
                finding,
            })
            .collect();
        ConfigError::all(path, errors)?;
        Ok((config, warnings))
    }

    /// Parses `text` and validates each section alone; every section's
    /// first problem is reported, not only the first section's.
    pub fn parse_sections(
        path: &Path,
        text: &str,
        overrides: Overrides,
    ) -> Result<Self, ConfigError> {
        let file: File = toml::from_str(text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source,
        })?;
        let mut problems = Vec::new();
        let interface = overrides.interface.unwrap_or(file.interface);
        if let Some(reason) = bad_interface_name(&interface) {
            problems.push(ConfigError::Interface {
                path: path.to_owned(),
                name: interface.clone(),
                reason,
            });
        }
        let services = ServiceTable::new(
            file.services
                .iter()
                .map(|s| SocketAddr::new(s.address, s.port)),
        )
        .map_err(|source| ConfigError::Services {
            path: path.to_owned(),
            source,
        });
        let state_dir = file
            .state_dir
            .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR));
        let managed = file.core.is_some();
        let has_wireguard = file.wireguard.is_some();
        let has_ha = file.ha.is_some();
        let wireguard = match file.wireguard {
            Some(section) => wireguard(path, section, &file.peers, &state_dir, managed).map(Some),
            None if file.peers.is_empty() => Ok(None),
            None => Err(ConfigError::Wireguard {
                path: path.to_owned(),
                field: "section",
                reason: "[[peer]] entries need a [wireguard] section".into(),
            }),
        };
        let ha = file
            .ha
            .map(|section| ha(path, section, &interface))
            .transpose();
        let core = match file.core {
            Some(_) if !has_wireguard => Err(ConfigError::Core {
                path: path.to_owned(),
                field: "section",
                reason: "[core] needs a [wireguard] section naming the interface \
                         Core's location config is applied to"
                    .into(),
            }),
            Some(section) => {
                core(path, section, ha.as_ref().ok().and_then(Option::as_ref)).map(Some)
            }
            None => Ok(None),
        };
        let hooks = if !file.hooks.is_empty() && !has_ha {
            Err(ConfigError::Hook {
                path: path.to_owned(),
                index: 0,
                source: HookError {
                    field: "on",
                    reason: "hooks run on HA role changes: they need an [ha] section".into(),
                },
            })
        } else {
            file.hooks
                .into_iter()
                .enumerate()
                .map(|(index, entry)| {
                    Hook::from_entry(entry).map_err(|source| ConfigError::Hook {
                        path: path.to_owned(),
                        index,
                        source,
                    })
                })
                .collect::<Result<Vec<_>, _>>()
        };
        let metrics = file
            .metrics
            .map(|section| {
                tidegate_proto::metrics::parse_listen(&section.listen).map_err(|reason| {
                    ConfigError::Metrics {
                        path: path.to_owned(),
                        field: "listen",
                        reason,
                    }
                })
            })
            .transpose();
        let services = keep(&mut problems, services);
        let wireguard = keep(&mut problems, wireguard);
        let ha = keep(&mut problems, ha);
        let core = keep(&mut problems, core);
        let hooks = keep(&mut problems, hooks);
        let metrics = keep(&mut problems, metrics);
        let (Some(services), Some(wireguard), Some(ha), Some(core), Some(hooks), Some(metrics)) =
            (services, wireguard, ha, core, hooks, metrics)
        else {
            return Err(ConfigError::all(path, problems).expect_err("a section failed"));
        };
        ConfigError::all(path, problems)?;
        Ok(Self {
            interface,
            xdp_mode: overrides.xdp_mode.unwrap_or(file.xdp_mode),
            control_socket: overrides
                .control_socket
                .or(file.control_socket)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_CONTROL_SOCKET)),
            services,
            shield: file.shield,
            state_dir,
            bpf_pin_dir: file
                .bpf_pin_dir
                .unwrap_or_else(|| PathBuf::from(DEFAULT_BPF_PIN_DIR)),
            wireguard,
            ha,
            core,
            hooks,
            metrics,
        })
    }
}

/// The value, or `None` with the problem added to `problems`.
fn keep<T>(problems: &mut Vec<ConfigError>, result: Result<T, ConfigError>) -> Option<T> {
    match result {
        Ok(value) => Some(value),
        Err(e) => {
            problems.push(e);
            None
        }
    }
}

fn core(
    path: &Path,
    section: CoreSection,
    ha: Option<&HaConfig>,
) -> Result<CoreLinkConfig, ConfigError> {
    let bad = |field, reason: String| ConfigError::Core {
        path: path.to_owned(),
        field,
        reason,
    };
    if section.listen.port() == 0 {
        return Err(bad("listen", "port 0: give the port Core dials".into()));
    }
    tidegate_proto::tls::check_identity(&section.identity)
        .map_err(|e| bad("identity", e.to_string()))?;
    let core_identity = section
        .core_identity
        .unwrap_or_else(|| DEFAULT_CORE_IDENTITY.to_owned());
    tidegate_proto::tls::check_identity(&core_identity)
        .map_err(|e| bad("core_identity", e.to_string()))?;
    let ha_id = ha.map(|ha| ha.election.gateway_id);
    let gateway_id = match (section.gateway_id, ha_id) {
        (Some(id), Some(ha_id)) if id != ha_id => {
            return Err(bad(
                "gateway_id",
                format!("{id} differs from [ha] gateway_id {ha_id}; leave it out to use that"),
            ));
        }
        (Some(id), _) => id,
        (None, Some(ha_id)) => ha_id,
        (None, None) => 0,
    };
    let interval_ms = section
        .status_interval_ms
        .unwrap_or(DEFAULT_STATUS_INTERVAL_MS);
    if !(MIN_STATUS_INTERVAL_MS..=MAX_STATUS_INTERVAL_MS).contains(&interval_ms) {
        return Err(bad(
            "status_interval_ms",
            format!("{interval_ms} is outside {MIN_STATUS_INTERVAL_MS}..={MAX_STATUS_INTERVAL_MS}"),
        ));
    }
    Ok(CoreLinkConfig {
        listen: section.listen,
        ca_file: section.ca_file,
        cert_file: section.cert_file,
        key_file: section.key_file,
        identity: section.identity,
        core_identity,
        gateway_id,
        status_interval: Duration::from_millis(interval_ms),
    })
}

fn ha(path: &Path, section: HaSection, interface: &str) -> Result<HaConfig, ConfigError> {
    let bad = |field, reason: String| ConfigError::Ha {
        path: path.to_owned(),
        field,
        reason,
    };
    if section.gateway_id == 0 {
        return Err(bad("gateway_id", "0 is reserved; use 1 or more".into()));
    }
    let priority = section.priority.unwrap_or(DEFAULT_HA_PRIORITY);
    if priority == 0 {
        return Err(bad(
            "priority",
            "0 means \"resigning\" on the wire; use 1..=255".into(),
        ));
    }
    let interval_ms = section
        .advert_interval_ms
        .unwrap_or(DEFAULT_ADVERT_INTERVAL_MS);
    if !(MIN_ADVERT_INTERVAL_MS..=MAX_ADVERT_INTERVAL_MS).contains(&interval_ms) {
        return Err(bad(
            "advert_interval_ms",
            format!("{interval_ms} is outside {MIN_ADVERT_INTERVAL_MS}..={MAX_ADVERT_INTERVAL_MS}"),
        ));
    }
    let key = match (section.key, section.key_file) {
        (Some(key), None) => key.into_bytes(),
        (None, Some(file)) => std::fs::read(&file)
            .map_err(|e| bad("key_file", format!("reading {}: {e}", file.display())))?,
        (Some(_), Some(_)) => return Err(bad("key", "give key or key_file, not both".into())),
        (None, None) => return Err(bad("key", "missing: give key or key_file".into())),
    };
    let key: Vec<u8> = key.trim_ascii().to_vec();
    if key.len() < MIN_HA_KEY {
        return Err(bad(
            "key",
            format!(
                "{} bytes; use at least {MIN_HA_KEY} (e.g. `openssl rand -base64 32`)",
                key.len()
            ),
        ));
    }
    if section.vips.is_empty() || section.vips.len() > MAX_VIPS {
        return Err(bad("vips", format!("give 1 to {MAX_VIPS} addresses")));
    }
    for vip in &section.vips {
        if vip.is_unspecified() || vip.is_multicast() || vip.is_loopback() {
            return Err(bad("vips", format!("{vip} is not a unicast address")));
        }
    }
    let destination = match (section.multicast_group, section.peers.is_empty()) {
        (Some(_), false) => {
            return Err(bad(
                "peers",
                "give multicast_group or peers (unicast), not both".into(),
            ));
        }
        (group, true) => {
            let group = group.unwrap_or(DEFAULT_MULTICAST_GROUP);
            if !group.is_multicast() {
                return Err(bad("multicast_group", format!("{group} is not multicast")));
            }
            Destination::Multicast(group)
        }
        (None, false) => Destination::Unicast(section.peers),
    };
    let mut track = Vec::new();
    for entry in section.track {
        if let Some(reason) = bad_interface_name(&entry.interface) {
            return Err(bad(
                "track",
                format!("interface {:?} {reason}", entry.interface),
            ));
        }
        if entry.weight == 0 {
            return Err(bad(
                "track",
                format!(
                    "{}: weight 0 would change nothing; use 1..=254",
                    entry.interface
                ),
            ));
        }
        if track.iter().any(|(name, _)| *name == entry.interface) {
            return Err(bad("track", format!("{} is listed twice", entry.interface)));
        }
        track.push((entry.interface, entry.weight));
    }
    let bounded = |field, value: u64, min: u64, max: u64| {
        if (min..=max).contains(&value) {
            Ok(value)
        } else {
            Err(bad(field, format!("{value} is outside {min}..={max}")))
        }
    };
    let kick_rate = section.kick_rate.unwrap_or(DEFAULT_KICK_RATE);
    if kick_rate > MAX_KICK_RATE {
        return Err(bad(
            "kick_rate",
            format!("{kick_rate} is above {MAX_KICK_RATE} handshakes per second"),
        ));
    }
    let kick_window = bounded(
        "kick_window_secs",
        section.kick_window_secs.unwrap_or(DEFAULT_KICK_WINDOW_SECS),
        1,
        MAX_KICK_WINDOW_SECS,
    )?;
    let handover_window = bounded(
        "handover_window_ms",
        section
            .handover_window_ms
            .unwrap_or(DEFAULT_HANDOVER_WINDOW_MS),
        0,
        MAX_HANDOVER_WINDOW_MS,
    )?;
    let refresh = bounded(
        "endpoint_refresh_secs",
        section
            .endpoint_refresh_secs
            .unwrap_or(DEFAULT_ENDPOINT_REFRESH_SECS),
        1,
        MAX_ENDPOINT_REFRESH_SECS,
    )?;
    let max_age = bounded(
        "endpoint_max_age_secs",
        section
            .endpoint_max_age_secs
            .unwrap_or(DEFAULT_ENDPOINT_MAX_AGE_SECS),
        1,
        MAX_ENDPOINT_MAX_AGE_SECS,
    )?;
    if max_age < kick_window {
        return Err(bad(
            "endpoint_max_age_secs",
            format!(
                "{max_age} is below kick_window_secs ({kick_window}): \
                 the table would forget peers a failover is to kick"
            ),
        ));
    }
    let director = match section.mode {
        HaMode::ActiveStandby => {
            for (field, set) in [
                ("director_table_size", section.director_table_size.is_some()),
                (
                    "director_max_sessions",
                    section.director_max_sessions.is_some(),
                ),
            ] {
                if set {
                    return Err(bad(
                        field,
                        "applies only to mode = \"director\"; this location runs active-standby"
                            .into(),
                    ));
                }
            }
            None
        }
        HaMode::Director => {
            if section.gateway_id > MAX_BACKEND_ID {
                return Err(bad(
                    "gateway_id",
                    format!(
                        "{} is above {MAX_BACKEND_ID}: in director mode gateway ids are 1..={MAX_BACKEND_ID}",
                        section.gateway_id
                    ),
                ));
            }
            let table_size = section.director_table_size.unwrap_or(DEFAULT_TABLE_SIZE);
            if !(MIN_DIRECTOR_TABLE_SIZE..=MAX_TABLE_SIZE as u32).contains(&table_size)
                || !is_prime(table_size)
            {
                return Err(bad(
                    "director_table_size",
                    format!(
                        "{table_size} is not a prime in {MIN_DIRECTOR_TABLE_SIZE}..={MAX_TABLE_SIZE} \
                         (the default, {DEFAULT_TABLE_SIZE}, suits up to 255 gateways)"
                    ),
                ));
            }
            let max_sessions = section
                .director_max_sessions
                .unwrap_or(DEFAULT_MAX_SESSIONS);
            if !(MIN_DIRECTOR_SESSIONS..=MAX_DIRECTOR_SESSIONS).contains(&max_sessions) {
                return Err(bad(
                    "director_max_sessions",
                    format!(
                        "{max_sessions} is outside {MIN_DIRECTOR_SESSIONS}..={MAX_DIRECTOR_SESSIONS}"
                    ),
                ));
            }
            Some(DirectorConfig {
                table_size,
                max_sessions,
            })
        }
    };
    Ok(HaConfig {
        location_id: section.location_id,
        election: Settings {
            gateway_id: section.gateway_id,
            priority,
            interval: Duration::from_millis(interval_ms),
            preempt: section.preempt.unwrap_or(true),
            preempt_delay: Duration::from_millis(section.preempt_delay_ms.unwrap_or(0)),
        },
        key: AdvertKey::new(key),
        vips: section.vips,
        port: section.port.unwrap_or(DEFAULT_HA_PORT),
        destination,
        track,
        interface: interface.to_owned(),
        continuity: continuity::Settings {
            kick_rate,
            kick_window: Duration::from_secs(kick_window),
            handover_window: Duration::from_millis(handover_window),
            endpoint_refresh: Duration::from_secs(refresh),
            endpoint_max_age: Duration::from_secs(max_age),
        },
        director,
    })
}

fn wireguard(
    path: &Path,
    section: WireguardSection,
    peers: &[PeerEntry],
    state_dir: &Path,
    managed: bool,
) -> Result<WireguardConfig, ConfigError> {
    let bad = |field, reason: String| ConfigError::Wireguard {
        path: path.to_owned(),
        field,
        reason,
    };
    if let Some(reason) = bad_interface_name(&section.interface) {
        return Err(bad(
            "interface",
            format!("{:?} {reason}", section.interface),
        ));
    }
    let private_key = match (section.private_key, section.private_key_file) {
        (Some(text), None) => {
            Some(
                text.parse::<Key>()
                    .map_err(|source| ConfigError::PrivateKey {
                        path: path.to_owned(),
                        source,
                    })?,
            )
        }
        (None, Some(file)) => {
            let key_err = |source| ConfigError::PrivateKeyFile {
                path: path.to_owned(),
                file: file.clone(),
                source,
            };
            let text = std::fs::read_to_string(&file).map_err(|e| key_err(Box::new(e)))?;
            Some(text.parse::<Key>().map_err(|e| key_err(Box::new(e)))?)
        }
        (Some(_), Some(_)) => {
            return Err(bad(
                "private_key",
                "give private_key or private_key_file, not both".into(),
            ));
        }
        // Core's location config brings the key.
        (None, None) if managed => None,
        (None, None) => {
            return Err(bad(
                "private_key",
                "missing: give private_key or private_key_file".into(),
            ));
        }
    };
    let listen_port = match section.listen_port {
        Some(0) => {
            return Err(bad(
                "listen_port",
                "0 is not a port clients can reach".into(),
            ));
        }
        Some(port) => Some(port),
        None if managed => None,
        None => return Err(bad("listen_port", "missing".into())),
    };
    let mut addresses = Vec::new();
    for text in &section.addresses {
        let net: IpNet = text.trim().parse().map_err(|_| {
            bad(
                "addresses",
                format!("{text:?} is not an address with a prefix (like 10.77.0.1/24)"),
            )
        })?;
        if addresses.contains(&net) {
            return Err(bad("addresses", format!("{text:?} is listed twice")));
        }
        addresses.push(net);
    }
    let mtu = section.mtu.unwrap_or(DEFAULT_MTU);
    let min_mtu = if addresses.iter().any(|a| matches!(a, IpNet::V6(_))) {
        MTU_MIN_V6
    } else {
        MTU_MIN_V4
    };
    if !(min_mtu..=MTU_MAX).contains(&mtu) {
        return Err(bad(
            "mtu",
            format!("{mtu} is outside {min_mtu}..={MTU_MAX} (IPv6 needs at least {MTU_MIN_V6})"),
        ));
    }
    let stats_ms = section
        .stats_interval_ms
        .unwrap_or(DEFAULT_STATS_INTERVAL_MS);
    if stats_ms < MIN_STATS_INTERVAL_MS {
        return Err(bad(
            "stats_interval_ms",
            format!("{stats_ms} is below the minimum of {MIN_STATS_INTERVAL_MS}"),
        ));
    }
    let threshold = section
        .peer_disconnect_threshold_secs
        .unwrap_or(DEFAULT_PEER_DISCONNECT_THRESHOLD_SECS);
    if threshold == 0 {
        return Err(bad(
            "peer_disconnect_threshold_secs",
            "0 would remove every peer at once".into(),
        ));
    }
    let peers = peers
        .iter()
        .enumerate()
        .map(|(i, entry)| {
            entry.validate().map_err(|source| ConfigError::Peer {
                path: path.to_owned(),
                index: i + 1,
                source,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    check_peers(&peers).map_err(|source| ConfigError::Peers {
        path: path.to_owned(),
        source,
    })?;
    Ok(WireguardConfig {
        interface: section.interface,
        backend: section.backend,
        private_key: private_key.map(Key::clamped),
        listen_port,
        addresses,
        mtu,
        stats_interval: Duration::from_millis(stats_ms),
        mfa_threshold: section.mfa.then(|| Duration::from_secs(threshold)),
        peers,
        state_dir: state_dir.to_owned(),
    })
}

fn bad_interface_name(name: &str) -> Option<&'static str> {
    if name.is_empty() {
        Some("is empty")
    } else if name.len() > MAX_INTERFACE_NAME {
        Some("is longer than 15 bytes")
    } else if name.contains(['/', ':']) || name.chars().any(char::is_whitespace) {
        Some("contains '/', ':' or whitespace")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("gw.toml"), text, Overrides::default())
    }

    fn message(error: ConfigError) -> String {
        crate::error_chain(&error)
    }

    const GOOD: &str = r#"
        interface = "eth0"
        [[service]]
        address = "198.51.100.10"
        port = 51820
        [[service]]
        address = "2001:db8::10"
        port = 51820
    "#;

    #[test]
    fn a_good_file_with_defaults() {
        let config = parse(GOOD).unwrap();
        assert_eq!(config.interface, "eth0");
        assert_eq!(config.xdp_mode, XdpModeSetting::Auto);
        assert_eq!(config.control_socket, Path::new(DEFAULT_CONTROL_SOCKET));
        assert_eq!(config.services.services().len(), 2);
        assert!(!config.shield.drop_fragments);
        let dropping = parse(&format!("{GOOD}\n[shield]\ndrop_fragments = true\n")).unwrap();
        assert!(dropping.shield.drop_fragments);
    }

    #[test]
    fn overrides_win_over_the_file() {
        let config = Config::parse(
            Path::new("gw.toml"),
            GOOD,
            Overrides {
                interface: Some("eth1".into()),
                xdp_mode: Some(XdpModeSetting::Generic),
                control_socket: Some("/tmp/x.sock".into()),
            },
        )
        .unwrap();
        assert_eq!(config.interface, "eth1");
        assert_eq!(config.xdp_mode, XdpModeSetting::Generic);
        assert_eq!(config.control_socket, Path::new("/tmp/x.sock"));
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            ("interface = \"eth0\"\nport = 1\n", "unknown field `port`"),
            ("interface = \"eth0\"\nxdp_mode = \"fast\"\n", "xdp_mode"),
            (
                "interface = \"eth0\"\n[[service]]\naddress = \"198.51.100.300\"\nport = 51820\n",
                "invalid IP address syntax",
            ),
            (
                "interface = \"eth0\"\n[[service]]\naddress = \"198.51.100.1\"\nport = 70000\n",
                "port",
            ),
            ("interface = \"eth0\"\n", "no services"),
            (
                "interface = \"a-very-long-interface\"\n[[service]]\naddress = \"198.51.100.1\"\nport = 1\n",
                "longer than 15 bytes",
            ),
            (
                "[[service]]\naddress = \"198.51.100.1\"\nport = 1\n",
                "missing field `interface`",
            ),
            (
                "interface = \"eth0\"\n[shield]\ndrop_fragment = true\n",
                "unknown field `drop_fragment`",
            ),
            (
                "interface = \"eth0\"\n[shield]\ndrop_fragments = 1\n",
                "drop_fragments",
            ),
        ];
        for (text, expected) in cases {
            let error = message(parse(text).unwrap_err());
            assert!(
                error.contains(expected) && error.contains("gw.toml"),
                "{text:?}: {error}"
            );
        }
    }

    fn key(n: u8) -> String {
        Key::new([n; 32]).to_string()
    }

    fn with_wireguard(section: &str, peers: &str) -> String {
        format!("{GOOD}\n[wireguard]\n{section}\n{peers}")
    }

    fn wireguard_section(extra: &str) -> String {
        format!(
            "interface = \"wg0\"\nprivate_key = \"{}\"\nlisten_port = 51820\naddresses = [\"10.77.0.1/24\"]\n{extra}",
            key(1)
        )
    }

    #[test]
    fn a_wireguard_section_with_defaults() {
        let peers = format!(
            "[[peer]]\nname = \"alice\"\npublic_key = \"{}\"\nallowed_ips = [\"10.77.0.2/32\"]\n",
            key(2)
        );
        let config = parse(&with_wireguard(&wireguard_section(""), &peers)).unwrap();
        assert_eq!(config.state_dir, Path::new(DEFAULT_STATE_DIR));
        assert_eq!(config.bpf_pin_dir, Path::new(DEFAULT_BPF_PIN_DIR));
        let wg = config.wireguard.unwrap();
        assert_eq!(wg.interface, "wg0");
        assert_eq!(wg.backend, BackendSetting::Auto);
        assert_eq!(wg.private_key, Some(Key::new([1; 32]).clamped()));
        assert_eq!(wg.mtu, DEFAULT_MTU);
        assert_eq!(
            wg.stats_interval,
            Duration::from_millis(DEFAULT_STATS_INTERVAL_MS)
        );
        assert_eq!(wg.mfa_threshold, None);
        assert_eq!(wg.addresses, ["10.77.0.1/24".parse::<IpNet>().unwrap()]);
        assert_eq!(wg.peers.len(), 1);
        assert_eq!(wg.peers[0].name.as_deref(), Some("alice"));
    }

    #[test]
    fn mfa_uses_the_threshold_and_a_key_file_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let key_file = dir.path().join("wg.key");
        std::fs::write(&key_file, format!("{}\n", key(7))).unwrap();
        let section = format!(
            "interface = \"wg0\"\nprivate_key_file = \"{}\"\nlisten_port = 51820\nmfa = true\npeer_disconnect_threshold_secs = 60\nbackend = \"userspace\"\n",
            key_file.display()
        );
        let wg = parse(&with_wireguard(&section, ""))
            .unwrap()
            .wireguard
            .unwrap();
        assert_eq!(wg.private_key, Some(Key::new([7; 32]).clamped()));
        assert_eq!(wg.mfa_threshold, Some(Duration::from_secs(60)));
        assert_eq!(wg.backend, BackendSetting::Userspace);
    }

    #[test]
    fn wireguard_errors_name_the_field_and_the_peer() {
        let peer = |n: u8, ips: &str| {
            format!(
                "[[peer]]\nname = \"p{n}\"\npublic_key = \"{}\"\nallowed_ips = [{ips}]\n",
                key(n)
            )
        };
        let cases = [
            (
                with_wireguard("interface = \"wg0\"\nlisten_port = 51820\n", ""),
                "[wireguard] private_key: missing",
            ),
            (
                with_wireguard(&wireguard_section("").replace(&key(1), "short"), ""),
                "[wireguard] private_key: not valid base64",
            ),
            (
                with_wireguard(&wireguard_section("").replace("51820", "0"), ""),
                "listen_port: 0 is not a port",
            ),
            (
                with_wireguard(&wireguard_section("mtu = 100\n"), ""),
                "mtu: 100 is outside",
            ),
            (
                with_wireguard(
                    &wireguard_section("").replace("10.77.0.1/24", "10.77.0.1"),
                    "",
                ),
                "addresses: \"10.77.0.1\" is not an address with a prefix",
            ),
            (
                with_wireguard(&wireguard_section("stats_interval_ms = 5\n"), ""),
                "stats_interval_ms: 5 is below the minimum",
            ),
            (
                with_wireguard(&wireguard_section("frobnicate = 1\n"), ""),
                "unknown field `frobnicate`",
            ),
            (
                with_wireguard(&wireguard_section(""), &peer(2, "\"10.77.0.500/32\"")),
                "[[peer]] #1: peer \"p2\"",
            ),
            (
                with_wireguard(
                    &wireguard_section(""),
                    &format!(
                        "{}{}",
                        peer(2, "\"10.77.0.0/24\""),
                        peer(3, "\"10.77.0.3/32\"")
                    ),
                ),
                "10.77.0.3/32 overlaps 10.77.0.0/24 of peer \"p2\"",
            ),
            (
                with_wireguard(
                    &wireguard_section(""),
                    &format!(
                        "{}{}",
                        peer(2, "\"10.77.0.2/32\""),
                        peer(2, "\"10.77.0.3/32\"")
                    ),
                ),
                "public_key is also the key of peer",
            ),
            (
                format!("{GOOD}\n{}", peer(2, "\"10.77.0.2/32\"")),
                "[[peer]] entries need a [wireguard] section",
            ),
        ];
        for (text, expected) in cases {
            let error = message(parse(&text).unwrap_err());
            assert!(
                error.contains(expected) && error.contains("gw.toml"),
                "{expected}: {error}"
            );
        }
    }

    const CORE: &str = "[core]\nlisten = \"192.0.2.2:7443\"\nca_file = \"/pki/ca.pem\"\ncert_file = \"/pki/gw.pem\"\nkey_file = \"/pki/gw.key\"\nidentity = \"gw-a\"\n";

    #[test]
    fn a_core_section_lets_core_bring_the_key_and_port() {
        let section = "interface = \"wg0\"\naddresses = [\"10.77.0.1/24\"]\n";
        let text = format!("{}\n{CORE}", with_wireguard(section, ""));
        let config = parse(&text).unwrap();
        let wg = config.wireguard.unwrap();
        assert_eq!((wg.private_key, wg.listen_port), (None, None));
        let core = config.core.unwrap();
        assert_eq!(core.listen, "192.0.2.2:7443".parse().unwrap());
        assert_eq!(core.identity, "gw-a");
        assert_eq!(core.core_identity, DEFAULT_CORE_IDENTITY);
        assert_eq!(core.gateway_id, 0);
        assert_eq!(core.status_interval, Duration::from_secs(5));
        // Without [core], the key and the port stay required.
        let error = message(parse(&with_wireguard(section, "")).unwrap_err());
        assert!(
            error.contains("[wireguard] private_key: missing"),
            "{error}"
        );
        // The gateway id comes from [ha] unless given.
        let text = format!("{}\n{CORE}\n[ha]\n{HA}", with_wireguard(section, ""));
        assert_eq!(parse(&text).unwrap().core.unwrap().gateway_id, 2);
    }

    #[test]
    fn metrics_are_off_unless_listen_is_set() {
        assert_eq!(parse(GOOD).unwrap().metrics, None);
        let cases: &[(&str, Result<&str, &str>)] = &[
            ("listen = \"127.0.0.1:9771\"", Ok("127.0.0.1:9771")),
            ("listen = \"[::]:9771\"", Ok("[::]:9771")),
            (
                "listen = \"127.0.0.1:0\"",
                Err("[metrics] listen: \"127.0.0.1:0\": port 0"),
            ),
            (
                "listen = \"localhost:9771\"",
                Err("[metrics] listen: \"localhost:9771\" is not an address"),
            ),
            (
                "listen = \"9771\"",
                Err("[metrics] listen: \"9771\" is not an address"),
            ),
            ("port = 9771", Err("unknown field `port`")),
        ];
        for (section, want) in cases {
            let text = format!("{GOOD}\n[metrics]\n{section}\n");
            match (parse(&text), want) {
                (Ok(config), Ok(want)) => {
                    assert_eq!(config.metrics.unwrap().to_string(), *want, "{section}");
                }
                (Err(error), Err(want)) => {
                    let error = message(error);
                    assert!(
                        error.contains(want) && error.contains("gw.toml"),
                        "{section}: {error}"
                    );
                }
                (got, want) => panic!("{section}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn core_errors_name_the_field() {
        let wg = with_wireguard(&wireguard_section(""), "");
        let cases = [
            (
                format!("{GOOD}\n{CORE}"),
                "[core] section: [core] needs a [wireguard] section",
            ),
            (
                format!("{wg}\n{}", CORE.replace("7443", "0")),
                "[core] listen: port 0",
            ),
            (
                format!("{wg}\n{}", CORE.replace("gw-a", "not a name")),
                "[core] identity:",
            ),
            (
                format!("{wg}\n{CORE}core_identity = \"\"\n"),
                "[core] core_identity:",
            ),
            (
                format!("{wg}\n{CORE}status_interval_ms = 5\n"),
                "[core] status_interval_ms: 5 is outside",
            ),
            (
                format!("{wg}\n{CORE}gateway_id = 9\n[ha]\n{HA}"),
                "[core] gateway_id: 9 differs from [ha] gateway_id 2",
            ),
            (format!("{wg}\n{CORE}port = 1\n"), "unknown field `port`"),
        ];
        for (text, expected) in cases {
            let error = message(parse(&text).unwrap_err());
            assert!(
                error.contains(expected) && error.contains("gw.toml"),
                "{expected}: {error}"
            );
        }
    }

    #[test]
    fn hooks_are_checked_and_named_by_index() {
        let hooks = |entries: &str| parse(&format!("{}\n{entries}", with_ha(HA)));
        let config = hooks(
            "[[hooks]]\non = [\"master\", \"failover-complete\"]\ncommand = [\"/bin/true\", \"--flag\"]\n\
             [[hooks]]\nname = \"page\"\non = [\"fault\"]\ncommand = [\"/bin/false\"]\ntimeout_ms = 500\n",
        )
        .unwrap();
        let names: Vec<(&str, usize, u128)> = config
            .hooks
            .iter()
            .map(|h| (h.name.as_str(), h.on.len(), h.timeout.as_millis()))
            .collect();
        assert_eq!(names, [("true", 2, 30_000), ("page", 1, 500)]);
        let dir = tempfile::tempdir().unwrap();
        let plain = dir.path().join("plain");
        std::fs::write(&plain, "#!/bin/sh\n").unwrap();
        let plain = plain.display();
        let not_executable = format!("on = [\"master\"]\ncommand = [\"{plain}\"]");
        let plain_reason = format!("{plain}: not executable");
        let cases = [
            ("on = []\ncommand = [\"/bin/true\"]", "#0: on: no events"),
            (
                "on = [\"promoted\"]\ncommand = [\"/bin/true\"]",
                "unknown variant `promoted`",
            ),
            ("on = [\"master\"]\ncommand = []", "#0: command: empty"),
            (
                "on = [\"master\"]\ncommand = [\"true\"]",
                "not an absolute path",
            ),
            (
                "on = [\"master\"]\ncommand = [\"/nonexistent/hook\"]",
                "/nonexistent/hook: No such file",
            ),
            (not_executable.as_str(), plain_reason.as_str()),
            (
                "on = [\"master\"]\ncommand = [\"/etc\"]",
                "/etc: not a regular file",
            ),
            (
                "on = [\"master\"]\ncommand = [\"/bin/true\"]\ntimeout_ms = 10",
                "timeout_ms: 10 is outside",
            ),
            (
                "on = [\"master\"]\ncommand = [\"/bin/true\"]\nretries = 2",
                "unknown field `retries`",
            ),
        ];
        for (entry, expected) in cases {
            let error = message(hooks(&format!("[[hooks]]\n{entry}\n")).unwrap_err());
            assert!(
                error.contains(expected) && error.contains("gw.toml"),
                "{entry:?}: {error}"
            );
        }
        let error = message(
            parse(&format!(
                "{GOOD}\n[[hooks]]\non = [\"master\"]\ncommand = [\"/bin/true\"]\n"
            ))
            .unwrap_err(),
        );
        assert!(error.contains("need an [ha] section"), "{error}");
    }

    fn with_ha(section: &str) -> String {
        format!("{GOOD}\n[ha]\n{section}")
    }

    const HA: &str = "location_id = 7\ngateway_id = 2\nkey = \"a-shared-key-of-16+\"\nvips = [\"198.51.100.100\", \"2001:db8::100\"]\n";

    #[test]
    fn an_ha_section_with_defaults_and_options() {
        let ha = parse(&with_ha(HA)).unwrap().ha.unwrap();
        assert_eq!(ha.location_id, 7);
        assert_eq!(ha.election.gateway_id, 2);
        assert_eq!(ha.election.priority, DEFAULT_HA_PRIORITY);
        assert_eq!(ha.election.interval, Duration::from_millis(100));
        assert!(ha.election.preempt);
        assert_eq!(ha.port, DEFAULT_HA_PORT);
        assert_eq!(
            ha.destination,
            Destination::Multicast(DEFAULT_MULTICAST_GROUP)
        );
        assert_eq!(ha.interface, "eth0");
        assert_eq!(ha.vips.len(), 2);
        assert!(ha.track.is_empty());
        assert_eq!(
            ha.continuity,
            continuity::Settings {
                kick_rate: 2000,
                kick_window: Duration::from_secs(180),
                handover_window: Duration::from_secs(2),
                endpoint_refresh: Duration::from_secs(30),
                endpoint_max_age: Duration::from_secs(600),
            }
        );

        let more = format!(
            "{HA}priority = 200\nadvert_interval_ms = 20\npreempt = false\npreempt_delay_ms = 5000\n\
             peers = [\"198.51.100.3\"]\nkick_rate = 0\nkick_window_secs = 60\nhandover_window_ms = 0\n\
             endpoint_refresh_secs = 5\nendpoint_max_age_secs = 60\n\
             [[ha.track]]\ninterface = \"uplink0\"\nweight = 50\n"
        );
        let ha = parse(&with_ha(&more)).unwrap().ha.unwrap();
        assert_eq!(ha.election.priority, 200);
        assert_eq!(ha.election.interval, Duration::from_millis(20));
        assert!(!ha.election.preempt);
        assert_eq!(ha.election.preempt_delay, Duration::from_secs(5));
        assert_eq!(
            ha.destination,
            Destination::Unicast(vec!["198.51.100.3".parse().unwrap()])
        );
        assert_eq!(ha.track, [("uplink0".to_owned(), 50)]);
        assert_eq!(
            ha.continuity,
            continuity::Settings {
                kick_rate: 0,
                kick_window: Duration::from_secs(60),
                handover_window: Duration::ZERO,
                endpoint_refresh: Duration::from_secs(5),
                endpoint_max_age: Duration::from_secs(60),
            }
        );
        assert_eq!(ha.director, None);
    }

    #[test]
    fn director_mode_with_defaults_and_sizes() {
        let ha = parse(&with_ha(&format!("{HA}mode = \"director\"\n")))
            .unwrap()
            .ha
            .unwrap();
        assert_eq!(
            ha.director,
            Some(DirectorConfig {
                table_size: 65537,
                max_sessions: 262_144
            })
        );
        let sized = format!(
            "{HA}mode = \"director\"\ndirector_table_size = 251\ndirector_max_sessions = 4096\n"
        );
        let ha = parse(&with_ha(&sized)).unwrap().ha.unwrap();
        assert_eq!(
            ha.director,
            Some(DirectorConfig {
                table_size: 251,
                max_sessions: 4096
            })
        );
        let standby = format!("{HA}mode = \"active-standby\"\n");
        assert_eq!(
            parse(&with_ha(&standby)).unwrap().ha.unwrap().director,
            None
        );
    }

    #[test]
    fn ha_errors_name_the_field() {
        let cases = [
            (
                HA.replace("gateway_id = 2", "gateway_id = 0"),
                "[ha] gateway_id: 0 is reserved",
            ),
            (format!("{HA}priority = 0\n"), "[ha] priority: 0 means"),
            (
                format!("{HA}advert_interval_ms = 10\n"),
                "advert_interval_ms: 10 is outside 20..=10000",
            ),
            (
                HA.replace("a-shared-key-of-16+", "short"),
                "[ha] key: 5 bytes; use at least 16",
            ),
            (
                format!("{HA}key_file = \"/x\"\n"),
                "give key or key_file, not both",
            ),
            (
                HA.replace(
                    "vips = [\"198.51.100.100\", \"2001:db8::100\"]",
                    "vips = []",
                ),
                "[ha] vips: give 1 to 16 addresses",
            ),
            (
                HA.replace("\"198.51.100.100\", ", "\"224.0.0.5\", "),
                "224.0.0.5 is not a unicast address",
            ),
            (
                format!("{HA}multicast_group = \"239.1.1.1\"\npeers = [\"198.51.100.3\"]\n"),
                "give multicast_group or peers",
            ),
            (
                format!("{HA}multicast_group = \"198.51.100.1\"\n"),
                "198.51.100.1 is not multicast",
            ),
            (
                format!("{HA}[[ha.track]]\ninterface = \"up0\"\nweight = 0\n"),
                "up0: weight 0 would change nothing",
            ),
            (
                format!(
                    "{HA}[[ha.track]]\ninterface = \"up0\"\nweight = 5\n[[ha.track]]\ninterface = \"up0\"\nweight = 6\n"
                ),
                "up0 is listed twice",
            ),
            (
                format!("{HA}frobnicate = 1\n"),
                "unknown field `frobnicate`",
            ),
            (
                format!("{HA}kick_rate = 1000000\n"),
                "[ha] kick_rate: 1000000 is above 100000",
            ),
            (
                format!("{HA}kick_window_secs = 0\n"),
                "[ha] kick_window_secs: 0 is outside 1..=3600",
            ),
            (
                format!("{HA}handover_window_ms = 90000\n"),
                "[ha] handover_window_ms: 90000 is outside 0..=60000",
            ),
            (
                format!("{HA}endpoint_refresh_secs = 0\n"),
                "[ha] endpoint_refresh_secs: 0 is outside",
            ),
            (
                format!("{HA}endpoint_max_age_secs = 100\n"),
                "[ha] endpoint_max_age_secs: 100 is below kick_window_secs (180)",
            ),
            (
                format!("{HA}mode = \"anycast\"\n"),
                "unknown variant `anycast`",
            ),
            (
                format!("{HA}director_table_size = 251\n"),
                "[ha] director_table_size: applies only to mode = \"director\"",
            ),
            (
                format!("{HA}mode = \"director\"\ndirector_table_size = 65536\n"),
                "[ha] director_table_size: 65536 is not a prime in 251..=65537",
            ),
            (
                format!("{HA}mode = \"director\"\ndirector_table_size = 131071\n"),
                "director_table_size: 131071 is not a prime in 251..=65537",
            ),
            (
                format!("{HA}mode = \"director\"\ndirector_max_sessions = 10\n"),
                "[ha] director_max_sessions: 10 is outside 1024..=16777216",
            ),
            (
                HA.replace("gateway_id = 2", "gateway_id = 256") + "mode = \"director\"\n",
                "[ha] gateway_id: 256 is above 255: in director mode gateway ids are 1..=255",
            ),
        ];
        for (section, expected) in cases {
            let error = message(parse(&with_ha(&section)).unwrap_err());
            assert!(
                error.contains(expected) && error.contains("gw.toml"),
                "{expected}: {error}"
            );
        }
    }
}
