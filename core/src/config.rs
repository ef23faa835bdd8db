//! Core's config file (TOML): where the database and the admin socket are,
//! the TLS files, link timings and MFA settings. One set of defaults,
//! here; command-line flags override the file.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;

use crate::{
    leader::machine::Timing,
    lockout::Policy,
    pki::PkiDir,
    store::{Database, MfaSettings},
};

pub const DEFAULT_CONFIG: &str = "/etc/tidegate/core.toml";
pub const DEFAULT_DATABASE: &str = "/var/lib/tidegate/core.db";
pub const DEFAULT_ADMIN_SOCKET: &str = "/run/tidegate/core.sock";
pub const DEFAULT_PKI_DIR: &str = "/etc/tidegate/pki";
/// The name Core gives itself in its Welcome to Edges.
pub const DEFAULT_CORE_ID: &str = "core";

/// Why the config could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}")]
    Parse {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    #[error("{path}: {field}: {message}")]
    Invalid {
        path: PathBuf,
        field: &'static str,
        message: String,
    },
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    database: Option<String>,
    admin_socket: Option<PathBuf>,
    core_id: Option<String>,
    #[serde(default)]
    tls: TlsFile,
    #[serde(default)]
    links: LinksFile,
    #[serde(default)]
    mfa: MfaFile,
    #[serde(default)]
    lease: LeaseFile,
    metrics: Option<MetricsFile>,
}

/// `[lease]`: the leader lease of Cores sharing a PostgreSQL database.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct LeaseFile {
    duration_ms: Option<u64>,
    renew_ms: Option<u64>,
    poll_ms: Option<u64>,
}

/// `[metrics]`: the Prometheus endpoint, off unless `listen` is set.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MetricsFile {
    listen: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct TlsFile {
    /// A directory holding ca.pem, core.pem and core.key.
    dir: Option<PathBuf>,
    ca: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct LinksFile {
    reconnect_min_ms: Option<u64>,
    reconnect_max_ms: Option<u64>,
    connect_timeout_ms: Option<u64>,
    applied_timeout_ms: Option<u64>,
    mfa_apply_timeout_ms: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct MfaFile {
    challenge_ttl_s: Option<u32>,
    totp_skew_steps: Option<u32>,
    max_attempts: Option<u32>,
    device_lockout_after: Option<u32>,
    source_lockout_after: Option<u32>,
    lockout_s: Option<u32>,
}

/// TLS files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsPaths {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Link timings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkSettings {
    /// Backoff between connection attempts: from this...
    pub reconnect_min: Duration,
    /// ...doubling up to this, with jitter.
    pub reconnect_max: Duration,
    /// A TCP and TLS connection attempt gives up after this.
    pub connect_timeout: Duration,
    /// A gateway that answers no config within this is reconnected.
    pub applied_timeout: Duration,
    /// An MFA login waits this long for the gateways to apply its peer.
    pub mfa_apply_timeout: Duration,
}

impl Default for LinkSettings {
    fn default() -> Self {
        Self {
            reconnect_min: Duration::from_millis(200),
            reconnect_max: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
            applied_timeout: Duration::from_secs(60),
            mfa_apply_timeout: Duration::from_secs(10),
        }
    }
}

/// Core's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// An SQLite file or a `postgres://` URL.
    pub database: Database,
    pub admin_socket: PathBuf,
    pub core_id: String,
    pub tls: TlsPaths,
    pub links: LinkSettings,
    pub mfa: MfaSettings,
    /// The leader lease (used on PostgreSQL only).
    pub lease: Timing,
    /// Where `/metrics` is served (`[metrics] listen`); `None`: nowhere.
    pub metrics: Option<std::net::SocketAddr>,
}

/// Command-line overrides.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub database: Option<String>,
    pub admin_socket: Option<PathBuf>,
}

impl Config {
    /// Reads `path`; a missing file at the default path means all defaults.
    pub fn load(path: &Path, overrides: Overrides) -> Result<Self, ConfigError> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e)
                if e.kind() == std::io::ErrorKind::NotFound
                    && path == Path::new(DEFAULT_CONFIG) =>
            {
                String::new()
            }
            Err(source) => {
                return Err(ConfigError::Read {
                    path: path.to_owned(),
                    source,
                });
            }
        };
        Self::parse(path, &text, overrides)
    }

    /// Parses the text of `path`.
    pub fn parse(path: &Path, text: &str, overrides: Overrides) -> Result<Self, ConfigError> {
        let file: File = toml::from_str(text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source,
        })?;
        let invalid = |field, message: String| ConfigError::Invalid {
            path: path.to_owned(),
            field,
            message,
        };
        let dir = PkiDir::new(file.tls.dir.unwrap_or_else(|| DEFAULT_PKI_DIR.into()));
        let tls = TlsPaths {
            ca: file.tls.ca.unwrap_or_else(|| dir.ca_cert()),
            cert: file
                .tls
                .cert
                .unwrap_or_else(|| dir.cert(crate::pki::CORE_IDENTITY)),
            key: file
                .tls
                .key
                .unwrap_or_else(|| dir.key(crate::pki::CORE_IDENTITY)),
        };
        let defaults = LinkSettings::default();
        let ms = |value: Option<u64>, default: Duration, field: &'static str| match value {
            None => Ok(default),
            Some(0) => Err(invalid(field, "must be above 0".into())),
            Some(ms) => Ok(Duration::from_millis(ms)),
        };
        let links = LinkSettings {
            reconnect_min: ms(
                file.links.reconnect_min_ms,
                defaults.reconnect_min,
                "links.reconnect_min_ms",
            )?,
            reconnect_max: ms(
                file.links.reconnect_max_ms,
                defaults.reconnect_max,
                "links.reconnect_max_ms",
            )?,
            connect_timeout: ms(
                file.links.connect_timeout_ms,
                defaults.connect_timeout,
                "links.connect_timeout_ms",
            )?,
            applied_timeout: ms(
                file.links.applied_timeout_ms,
                defaults.applied_timeout,
                "links.applied_timeout_ms",
            )?,
            mfa_apply_timeout: ms(
                file.links.mfa_apply_timeout_ms,
                defaults.mfa_apply_timeout,
                "links.mfa_apply_timeout_ms",
            )?,
        };
        if links.reconnect_max < links.reconnect_min {
            return Err(invalid(
                "links.reconnect_max_ms",
                "must be at least links.reconnect_min_ms".into(),
            ));
        }
        let mfa_defaults = MfaSettings::default();
        let mfa = MfaSettings {
            challenge_ttl_s: file
                .mfa
                .challenge_ttl_s
                .unwrap_or(mfa_defaults.challenge_ttl_s),
            totp_skew_steps: file
                .mfa
                .totp_skew_steps
                .unwrap_or(mfa_defaults.totp_skew_steps),
            max_attempts: file.mfa.max_attempts.unwrap_or(mfa_defaults.max_attempts),
            max_challenges: mfa_defaults.max_challenges,
            device: lockout(
                mfa_defaults.device,
                file.mfa.device_lockout_after,
                file.mfa.lockout_s,
                "mfa.device_lockout_after",
            )
            .map_err(|(field, message)| invalid(field, message))?,
            source: lockout(
                mfa_defaults.source,
                file.mfa.source_lockout_after,
                file.mfa.lockout_s,
                "mfa.source_lockout_after",
            )
            .map_err(|(field, message)| invalid(field, message))?,
        };
        if !(10..=3600).contains(&mfa.challenge_ttl_s) {
            return Err(invalid(
                "mfa.challenge_ttl_s",
                format!("{} is outside 10..=3600", mfa.challenge_ttl_s),
            ));
        }
        if mfa.totp_skew_steps > 10 {
            return Err(invalid(
                "mfa.totp_skew_steps",
                format!("{} is over 10", mfa.totp_skew_steps),
            ));
        }
        if !(1..=20).contains(&mfa.max_attempts) {
            return Err(invalid(
                "mfa.max_attempts",
                format!("{} is outside 1..=20", mfa.max_attempts),
            ));
        }
        let lease =
            lease_timing(&file.lease).map_err(|(field, message)| invalid(field, message))?;
        let core_id = file.core_id.unwrap_or_else(|| DEFAULT_CORE_ID.into());
        if core_id.is_empty() || core_id.len() > 128 {
            return Err(invalid("core_id", "must be 1 to 128 characters".into()));
        }
        let metrics = file
            .metrics
            .map(|m| tidegate_proto::metrics::parse_listen(&m.listen))
            .transpose()
            .map_err(|message| invalid("metrics.listen", message))?;
        let database = overrides
            .database
            .or(file.database)
            .unwrap_or_else(|| DEFAULT_DATABASE.into())
            .parse::<Database>()
            .map_err(|e| invalid("database", e.to_string()))?;
        Ok(Self {
            database,
            admin_socket: overrides
                .admin_socket
                .or(file.admin_socket)
                .unwrap_or_else(|| DEFAULT_ADMIN_SOCKET.into()),
            core_id,
            tls,
            links,
            lease,
            mfa,
            metrics,
        })
    }
}

/// One key whose value differs between the running config and the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// The key as the file spells it: `links.connect_timeout_ms`.
    pub key: &'static str,
    pub from: String,
    pub to: String,
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} changed from {} to {}", self.key, self.from, self.to)
    }
}

/// `[lease]` checked: the renewals fit the lease several times over, so
/// that one slow answer does not end it.
fn lease_timing(file: &LeaseFile) -> Result<Timing, (&'static str, String)> {
    let defaults = Timing::default();
    let ms = |v: Option<u64>, default: Duration| v.map_or(default, Duration::from_millis);
    let timing = Timing {
        lease: ms(file.duration_ms, defaults.lease),
        renew: ms(file.renew_ms, defaults.renew),
        poll: ms(file.poll_ms, defaults.poll),
    };
    if !(Duration::from_millis(100)..=Duration::from_secs(60)).contains(&timing.lease) {
        return Err((
            "lease.duration_ms",
            format!("{} is outside 100..=60000", timing.lease.as_millis()),
        ));
    }
    if timing.renew.is_zero() || timing.renew * 3 > timing.lease {
        return Err((
            "lease.renew_ms",
            format!(
                "{} must be above 0 and at most a third of lease.duration_ms ({})",
                timing.renew.as_millis(),
                timing.lease.as_millis()
            ),
        ));
    }
    if timing.poll.is_zero() || timing.poll > timing.lease {
        return Err((
            "lease.poll_ms",
            format!(
                "{} must be above 0 and at most lease.duration_ms ({})",
                timing.poll.as_millis(),
                timing.lease.as_millis()
            ),
        ));
    }
    Ok(timing)
}

/// What reloading a running Core from `current` to `new` changes: the
/// keys applied live (`[links]`) and the ones that need a restart (the
/// database, the admin socket, `core_id`, the TLS file paths, `[mfa]`,
/// which the store holds). The TLS files' contents are re-read on every
/// reload whatever their paths.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub live: Vec<Change>,
    pub restart: Vec<Change>,
}

/// Compares two configs key by key.
pub fn changes(current: &Config, new: &Config) -> Changes {
    fn key<T: PartialEq + std::fmt::Debug>(
        into: &mut Vec<Change>,
        key: &'static str,
        from: &T,
        to: &T,
    ) {
        if from != to {
            into.push(Change {
                key,
                from: format!("{from:?}"),
                to: format!("{to:?}"),
            });
        }
    }
    let mut changes = Changes::default();
    let restart = &mut changes.restart;
    key(restart, "database", &current.database, &new.database);
    key(
        restart,
        "admin_socket",
        &current.admin_socket,
        &new.admin_socket,
    );
    key(restart, "core_id", &current.core_id, &new.core_id);
    key(restart, "tls.ca", &current.tls.ca, &new.tls.ca);
    key(restart, "tls.cert", &current.tls.cert, &new.tls.cert);
    key(restart, "tls.key", &current.tls.key, &new.tls.key);
    key(restart, "[lease]", &current.lease, &new.lease);
    let (a, b) = (&current.mfa, &new.mfa);
    key(
        restart,
        "mfa.challenge_ttl_s",
        &a.challenge_ttl_s,
        &b.challenge_ttl_s,
    );
    key(
        restart,
        "mfa.totp_skew_steps",
        &a.totp_skew_steps,
        &b.totp_skew_steps,
    );
    key(
        restart,
        "mfa.max_attempts",
        &a.max_attempts,
        &b.max_attempts,
    );
    key(
        restart,
        "mfa.device_lockout_after",
        &a.device.lockout_after,
        &b.device.lockout_after,
    );
    key(
        restart,
        "mfa.source_lockout_after",
        &a.source.lockout_after,
        &b.source.lockout_after,
    );
    key(
        restart,
        "mfa.lockout_s",
        &a.device.lockout_ms,
        &b.device.lockout_ms,
    );
    if a != b && changes.restart.iter().all(|c| !c.key.starts_with("mfa.")) {
        changes.restart.push(Change {
            key: "[mfa]",
            from: "the running settings".into(),
            to: "others".into(),
        });
    }
    let ms = |d: Duration| d.as_millis();
    let (a, b) = (&current.links, &new.links);
    let live = &mut changes.live;
    key(
        live,
        "links.reconnect_min_ms",
        &ms(a.reconnect_min),
        &ms(b.reconnect_min),
    );
    key(
        live,
        "links.reconnect_max_ms",
        &ms(a.reconnect_max),
        &ms(b.reconnect_max),
    );
    key(
        live,
        "links.connect_timeout_ms",
        &ms(a.connect_timeout),
        &ms(b.connect_timeout),
    );
    key(
        live,
        "links.applied_timeout_ms",
        &ms(a.applied_timeout),
        &ms(b.applied_timeout),
    );
    key(
        live,
        "links.mfa_apply_timeout_ms",
        &ms(a.mfa_apply_timeout),
        &ms(b.mfa_apply_timeout),
    );
    changes
}

/// A lockout policy with the file's count and duration over `default`'s,
/// or the key that is wrong and why.
fn lockout(
    default: Policy,
    after: Option<u32>,
    lockout_s: Option<u32>,
    after_key: &'static str,
) -> Result<Policy, (&'static str, String)> {
    let mut policy = default;
    if let Some(after) = after {
        if !(policy.free + 1..=10_000).contains(&after) {
            return Err((
                after_key,
                format!("{after} is outside {}..=10000", policy.free + 1),
            ));
        }
        policy.lockout_after = after;
    }
    if let Some(seconds) = lockout_s {
        if !(60..=604_800).contains(&seconds) {
            return Err((
                "mfa.lockout_s",
                format!("{seconds} is outside 60..=604800 (a minute to a week)"),
            ));
        }
        policy.lockout_ms = i64::from(seconds) * 1000;
    }
    Ok(policy)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("core.toml"), text, Overrides::default())
    }

    #[test]
    fn an_empty_file_means_the_defaults() {
        let config = parse("").unwrap();
        assert_eq!(config.database, Database::Sqlite(DEFAULT_DATABASE.into()));
        assert_eq!(config.tls.ca, Path::new("/etc/tidegate/pki/ca.pem"));
        assert_eq!(config.tls.key, Path::new("/etc/tidegate/pki/core.key"));
        assert_eq!(config.links, LinkSettings::default());
        assert_eq!(config.mfa, MfaSettings::default());
        assert_eq!(config.metrics, None);
        let config = parse("[metrics]\nlisten = \"127.0.0.1:9772\"").unwrap();
        assert_eq!(config.metrics, Some("127.0.0.1:9772".parse().unwrap()));
    }

    #[test]
    fn file_then_flags() {
        let config = Config::parse(
            Path::new("core.toml"),
            "database = \"/a.db\"\nadmin_socket = \"/a.sock\"\n[tls]\ndir = \"/pki\"\n[links]\nreconnect_min_ms = 50\n[mfa]\nchallenge_ttl_s = 60\n",
            Overrides {
                database: Some("/b.db".into()),
                admin_socket: None,
            },
        )
        .unwrap();
        assert_eq!(config.database, Database::Sqlite("/b.db".into()));
        assert_eq!(config.admin_socket, Path::new("/a.sock"));
        assert_eq!(config.tls.cert, Path::new("/pki/core.pem"));
        assert_eq!(config.links.reconnect_min, Duration::from_millis(50));
        assert_eq!(config.mfa.challenge_ttl_s, 60);
    }

    #[test]
    fn a_reload_names_every_changed_key() {
        let base = parse("[links]\nconnect_timeout_ms = 1000\n").unwrap();
        let cases: [(&str, &[&str], &[&str]); 5] = [
            ("[links]\nconnect_timeout_ms = 1000\n", &[], &[]),
            (
                "[links]\nconnect_timeout_ms = 2000\napplied_timeout_ms = 5000\n",
                &["links.connect_timeout_ms", "links.applied_timeout_ms"],
                &[],
            ),
            (
                "database = \"/other.db\"\ncore_id = \"c2\"\n[links]\nconnect_timeout_ms = 1000\n",
                &[],
                &["database", "core_id"],
            ),
            (
                "[tls]\ndir = \"/elsewhere\"\n[links]\nconnect_timeout_ms = 1000\n",
                &[],
                &["tls.ca", "tls.cert", "tls.key"],
            ),
            (
                "[mfa]\nmax_attempts = 3\n",
                &["links.connect_timeout_ms"],
                &["mfa.max_attempts"],
            ),
        ];
        for (text, live, restart) in cases {
            let changes = changes(&base, &parse(text).unwrap());
            let keys = |list: &[Change]| list.iter().map(|c| c.key).collect::<Vec<_>>();
            assert_eq!(keys(&changes.live), live, "{text}");
            assert_eq!(keys(&changes.restart), restart, "{text}");
        }
    }

    #[test]
    fn bad_values_name_the_file_and_field() {
        for (text, says) in [
            ("databse = \"/a\"", "unknown field"),
            ("[links]\nreconnect_min_ms = 0", "links.reconnect_min_ms"),
            (
                "[links]\nreconnect_min_ms = 5000\nreconnect_max_ms = 100",
                "links.reconnect_max_ms",
            ),
            ("[mfa]\nchallenge_ttl_s = 1", "mfa.challenge_ttl_s"),
            ("[lease]\nduration_ms = 50", "lease.duration_ms"),
            (
                "[lease]\nduration_ms = 600\nrenew_ms = 300",
                "lease.renew_ms",
            ),
            ("[lease]\npoll_ms = 0", "lease.poll_ms"),
            ("database = \"mysql://db/x\"", "database"),
            ("[mfa]\nmax_attempts = 0", "mfa.max_attempts"),
            (
                "[metrics]\nlisten = \"localhost:9772\"",
                "metrics.listen: \"localhost:9772\" is not an address",
            ),
            ("[metrics]\nlisten = \"127.0.0.1:0\"", "metrics.listen:"),
        ] {
            let err = crate::error_chain(&parse(text).unwrap_err());
            assert!(
                err.contains("core.toml") && err.contains(says),
                "{text}: {err}"
            );
        }
    }
}
