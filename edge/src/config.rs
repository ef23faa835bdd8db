//! The Edge's configuration: one TOML file, then command-line overrides.

use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;

/// Where the Edge looks for its config by default.
pub const DEFAULT_CONFIG: &str = "/etc/tidegate/edge.toml";
/// The identity Core's certificate carries, by default.
pub const DEFAULT_CORE_IDENTITY: &str = "core";
/// Largest request body accepted, by default.
pub const DEFAULT_BODY_LIMIT: usize = 16 * 1024;
const MAX_BODY_LIMIT: usize = 1024 * 1024;
/// How long a client waits for Core's answer, by default: longer than
/// Core's wait for gateways to apply an MFA login (10 s by default), so
/// that Core's answer, not a timeout, reaches the client.
const DEFAULT_CORE_TIMEOUT_MS: u64 = 15_000;
/// How long a connection may take to send a request's head (or stay idle
/// before the next one), and a request its body, by default.
const DEFAULT_HEADER_TIMEOUT_MS: u64 = 10_000;
const DEFAULT_BODY_TIMEOUT_MS: u64 = 10_000;
const MIN_CLIENT_TIMEOUT_MS: u64 = 100;
const MAX_CLIENT_TIMEOUT_MS: u64 = 600_000;
/// HTTP connections open at once, by default: well under the usual limit
/// of 1024 file descriptors, with room for the link and the logs.
const DEFAULT_MAX_CONNECTIONS: usize = 768;
const MAX_MAX_CONNECTIONS: usize = 1_000_000;
const MIN_CORE_TIMEOUT_MS: u64 = 100;
const MAX_CORE_TIMEOUT_MS: u64 = 120_000;
/// The header a trusted proxy puts the client's address in, by default.
pub const DEFAULT_REAL_IP_HEADER: &str = "x-real-ip";

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
    #[error("config {path}: {field}: {reason}")]
    Field {
        path: PathBuf,
        field: &'static str,
        reason: String,
    },
}

/// The file as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    http_listen: SocketAddr,
    link_listen: SocketAddr,
    identity: String,
    core_identity: Option<String>,
    ca_file: PathBuf,
    cert_file: PathBuf,
    key_file: PathBuf,
    body_limit_bytes: Option<usize>,
    core_timeout_ms: Option<u64>,
    header_timeout_ms: Option<u64>,
    body_timeout_ms: Option<u64>,
    max_connections: Option<usize>,
    #[serde(default)]
    trusted_proxies: Vec<IpAddr>,
    real_ip_header: Option<String>,
    /// Where `/metrics` is served; off when unset.
    metrics_listen: Option<String>,
}

/// Values given on the command line, which win over the file.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub http_listen: Option<SocketAddr>,
    pub link_listen: Option<SocketAddr>,
}

/// A validated configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Where clients (or the proxy in front) reach the HTTP API.
    pub http_listen: SocketAddr,
    /// Where Core dials the link.
    pub link_listen: SocketAddr,
    /// This Edge's name in its certificate.
    pub identity: String,
    /// The name Core's certificate must carry.
    pub core_identity: String,
    pub ca_file: PathBuf,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// Largest request body; larger ones get 413.
    pub body_limit: usize,
    /// How long a request waits for Core's answer before 504.
    pub core_timeout: Duration,
    /// How long a connection has to send a request's head, from when it
    /// opens or its last answer went out; then it is closed.
    pub header_timeout: Duration,
    /// How long a request has to send its body before 408.
    pub body_timeout: Duration,
    /// HTTP connections open at once; more are closed as they come.
    pub max_connections: usize,
    /// Peers whose `real_ip_header` names the client (the proxy in front).
    pub trusted_proxies: Vec<IpAddr>,
    /// Lower case.
    pub real_ip_header: String,
    /// Where `/metrics` is served (`metrics_listen`); `None`: nowhere.
    pub metrics_listen: Option<SocketAddr>,
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

    /// Parses `text` (read from `path`, named in errors).
    pub fn parse(path: &Path, text: &str, overrides: Overrides) -> Result<Self, ConfigError> {
        let file: File = toml::from_str(text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source,
        })?;
        let bad = |field, reason: String| ConfigError::Field {
            path: path.to_owned(),
            field,
            reason,
        };
        let http_listen = overrides.http_listen.unwrap_or(file.http_listen);
        let link_listen = overrides.link_listen.unwrap_or(file.link_listen);
        if http_listen.port() == 0 {
            return Err(bad(
                "http_listen",
                "port 0: give the port clients use".into(),
            ));
        }
        if link_listen.port() == 0 {
            return Err(bad(
                "link_listen",
                "port 0: give the port Core dials".into(),
            ));
        }
        if http_listen == link_listen {
            return Err(bad(
                "link_listen",
                format!("{link_listen} is also http_listen"),
            ));
        }
        tidegate_proto::tls::check_identity(&file.identity)
            .map_err(|e| bad("identity", e.to_string()))?;
        let core_identity = file
            .core_identity
            .unwrap_or_else(|| DEFAULT_CORE_IDENTITY.to_owned());
        tidegate_proto::tls::check_identity(&core_identity)
            .map_err(|e| bad("core_identity", e.to_string()))?;
        let body_limit = file.body_limit_bytes.unwrap_or(DEFAULT_BODY_LIMIT);
        if !(256..=MAX_BODY_LIMIT).contains(&body_limit) {
            return Err(bad(
                "body_limit_bytes",
                format!("{body_limit} is outside 256..={MAX_BODY_LIMIT}"),
            ));
        }
        let timeout_ms = file.core_timeout_ms.unwrap_or(DEFAULT_CORE_TIMEOUT_MS);
        if !(MIN_CORE_TIMEOUT_MS..=MAX_CORE_TIMEOUT_MS).contains(&timeout_ms) {
            return Err(bad(
                "core_timeout_ms",
                format!("{timeout_ms} is outside {MIN_CORE_TIMEOUT_MS}..={MAX_CORE_TIMEOUT_MS}"),
            ));
        }
        let client_timeout = |field, value: Option<u64>, default| {
            let ms = value.unwrap_or(default);
            if (MIN_CLIENT_TIMEOUT_MS..=MAX_CLIENT_TIMEOUT_MS).contains(&ms) {
                Ok(Duration::from_millis(ms))
            } else {
                Err(bad(
                    field,
                    format!("{ms} is outside {MIN_CLIENT_TIMEOUT_MS}..={MAX_CLIENT_TIMEOUT_MS}"),
                ))
            }
        };
        let header_timeout = client_timeout(
            "header_timeout_ms",
            file.header_timeout_ms,
            DEFAULT_HEADER_TIMEOUT_MS,
        )?;
        let body_timeout = client_timeout(
            "body_timeout_ms",
            file.body_timeout_ms,
            DEFAULT_BODY_TIMEOUT_MS,
        )?;
        let max_connections = file.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS);
        if !(1..=MAX_MAX_CONNECTIONS).contains(&max_connections) {
            return Err(bad(
                "max_connections",
                format!("{max_connections} is outside 1..={MAX_MAX_CONNECTIONS}"),
            ));
        }
        let real_ip_header = file
            .real_ip_header
            .unwrap_or_else(|| DEFAULT_REAL_IP_HEADER.to_owned())
            .to_ascii_lowercase();
        if axum::http::HeaderName::from_bytes(real_ip_header.as_bytes()).is_err() {
            return Err(bad(
                "real_ip_header",
                format!("{real_ip_header:?} is not an HTTP header name"),
            ));
        }
        let metrics_listen = file
            .metrics_listen
            .map(|text| tidegate_proto::metrics::parse_listen(&text))
            .transpose()
            .map_err(|reason| bad("metrics_listen", reason))?;
        if let Some(metrics) = metrics_listen
            && (metrics == http_listen || metrics == link_listen)
        {
            return Err(bad(
                "metrics_listen",
                format!("{metrics} is also http_listen or link_listen"),
            ));
        }
        Ok(Self {
            http_listen,
            link_listen,
            identity: file.identity,
            core_identity,
            ca_file: file.ca_file,
            cert_file: file.cert_file,
            key_file: file.key_file,
            body_limit,
            core_timeout: Duration::from_millis(timeout_ms),
            header_timeout,
            body_timeout,
            max_connections,
            trusted_proxies: file.trusted_proxies,
            real_ip_header,
            metrics_listen,
        })
    }
}

/// One key whose value differs between the running config and the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// The key as the file spells it.
    pub key: &'static str,
    pub from: String,
    pub to: String,
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} changed from {} to {}", self.key, self.from, self.to)
    }
}

/// What reloading a running Edge from `current` to `new` changes: the
/// request settings apply live, to the requests that arrive after; the
/// listening addresses, the identities, the TLS file paths and the
/// connection limits need a restart. The TLS files' contents are re-read
/// on every reload whatever their paths.
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
    let ms = |d: Duration| d.as_millis();
    let (a, b) = (current, new);
    let mut changes = Changes::default();
    let restart = &mut changes.restart;
    key(restart, "http_listen", &a.http_listen, &b.http_listen);
    key(restart, "link_listen", &a.link_listen, &b.link_listen);
    key(restart, "identity", &a.identity, &b.identity);
    key(restart, "core_identity", &a.core_identity, &b.core_identity);
    key(restart, "ca_file", &a.ca_file, &b.ca_file);
    key(restart, "cert_file", &a.cert_file, &b.cert_file);
    key(restart, "key_file", &a.key_file, &b.key_file);
    key(
        restart,
        "header_timeout_ms",
        &ms(a.header_timeout),
        &ms(b.header_timeout),
    );
    key(
        restart,
        "max_connections",
        &a.max_connections,
        &b.max_connections,
    );
    let live = &mut changes.live;
    key(live, "body_limit_bytes", &a.body_limit, &b.body_limit);
    key(
        live,
        "core_timeout_ms",
        &ms(a.core_timeout),
        &ms(b.core_timeout),
    );
    key(
        live,
        "body_timeout_ms",
        &ms(a.body_timeout),
        &ms(b.body_timeout),
    );
    key(
        live,
        "trusted_proxies",
        &a.trusted_proxies,
        &b.trusted_proxies,
    );
    key(live, "real_ip_header", &a.real_ip_header, &b.real_ip_header);
    changes
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
        http_listen = "192.0.2.10:8080"
        link_listen = "192.0.2.10:7444"
        identity = "edge-a"
        ca_file = "/pki/ca.pem"
        cert_file = "/pki/edge-a.pem"
        key_file = "/pki/edge-a.key"
    "#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("edge.toml"), text, Overrides::default())
    }

    #[test]
    fn a_good_file_with_defaults_and_overrides() {
        let config = parse(GOOD).unwrap();
        assert_eq!(config.core_identity, "core");
        assert_eq!(config.body_limit, DEFAULT_BODY_LIMIT);
        assert_eq!(config.core_timeout, Duration::from_secs(15));
        assert_eq!(config.header_timeout, Duration::from_secs(10));
        assert_eq!(config.body_timeout, Duration::from_secs(10));
        assert_eq!(config.max_connections, 768);
        assert_eq!(config.real_ip_header, "x-real-ip");
        assert!(config.trusted_proxies.is_empty());
        assert_eq!(config.metrics_listen, None);
        let config = parse(&format!("{GOOD}metrics_listen = \"127.0.0.1:9773\"\n")).unwrap();
        assert_eq!(
            config.metrics_listen,
            Some("127.0.0.1:9773".parse().unwrap())
        );
        let config = Config::parse(
            Path::new("edge.toml"),
            &format!(
                "{GOOD}trusted_proxies = [\"127.0.0.1\"]\nreal_ip_header = \"X-Forwarded-Client\"\n"
            ),
            Overrides {
                http_listen: Some("127.0.0.1:9000".parse().unwrap()),
                link_listen: None,
            },
        )
        .unwrap();
        assert_eq!(config.http_listen, "127.0.0.1:9000".parse().unwrap());
        assert_eq!(
            config.trusted_proxies,
            ["127.0.0.1".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(config.real_ip_header, "x-forwarded-client");
    }

    #[test]
    fn a_reload_names_every_changed_key() {
        let base = parse(GOOD).unwrap();
        let cases: [(String, &[&str], &[&str]); 4] = [
            (GOOD.to_owned(), &[], &[]),
            (
                format!("{GOOD}core_timeout_ms = 2000\ntrusted_proxies = [\"192.0.2.1\"]\n"),
                &["core_timeout_ms", "trusted_proxies"],
                &[],
            ),
            (
                GOOD.replace("7444", "7445")
                    .replace("edge-a.pem", "other.pem"),
                &[],
                &["link_listen", "cert_file"],
            ),
            (
                format!("{GOOD}max_connections = 10\nbody_limit_bytes = 4096\n"),
                &["body_limit_bytes"],
                &["max_connections"],
            ),
        ];
        for (text, live, restart) in cases {
            let changes = changes(&base, &parse(&text).unwrap());
            let keys = |list: &[Change]| list.iter().map(|c| c.key).collect::<Vec<_>>();
            assert_eq!(keys(&changes.live), live, "{text}");
            assert_eq!(keys(&changes.restart), restart, "{text}");
        }
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (
                format!("{GOOD}body_limit_bytes = 10\n"),
                "body_limit_bytes: 10 is outside",
            ),
            (
                format!("{GOOD}core_timeout_ms = 1\n"),
                "core_timeout_ms: 1 is outside",
            ),
            (format!("{GOOD}core_identity = \"a b\"\n"), "core_identity:"),
            (
                format!("{GOOD}header_timeout_ms = 0\n"),
                "header_timeout_ms: 0 is outside",
            ),
            (
                format!("{GOOD}body_timeout_ms = 900000\n"),
                "body_timeout_ms: 900000 is outside",
            ),
            (
                format!("{GOOD}max_connections = 0\n"),
                "max_connections: 0 is outside",
            ),
            (
                format!("{GOOD}real_ip_header = \"bad header\"\n"),
                "real_ip_header:",
            ),
            (format!("{GOOD}listen = 1\n"), "unknown field `listen`"),
            (
                format!("{GOOD}metrics_listen = \"edge:9773\"\n"),
                "metrics_listen: \"edge:9773\" is not an address",
            ),
            (
                format!("{GOOD}metrics_listen = \"192.0.2.10:8080\"\n"),
                "metrics_listen: 192.0.2.10:8080 is also",
            ),
            (GOOD.replace("edge-a\"", "edge a\""), "identity:"),
            (
                GOOD.replace("7444", "8080"),
                "link_listen: 192.0.2.10:8080 is also http_listen",
            ),
            (GOOD.replace(":8080", ":0"), "http_listen: port 0"),
            (
                GOOD.replace("http_listen = \"192.0.2.10:8080\"", ""),
                "missing field `http_listen`",
            ),
        ];
        for (text, expected) in cases {
            let error = crate::error_chain(&parse(&text).unwrap_err());
            assert!(
                error.contains(expected) && error.contains("edge.toml"),
                "{expected}: {error}"
            );
        }
    }
}
