//! The gateway's configuration: one TOML file, then command-line overrides.

use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
};

use serde::Deserialize;

use crate::xdp::{ServiceError, ServiceTable, XdpModeSetting};

/// Where the daemon looks for its config by default.
pub const DEFAULT_CONFIG: &str = "/etc/tidegate/gateway.toml";
/// Where the daemon listens for `tidectl` by default.
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/tidegate/gateway.sock";
/// Longest interface name Linux accepts (IFNAMSIZ less the NUL).
const MAX_INTERFACE_NAME: usize = 15;

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
    #[serde(default, rename = "service")]
    services: Vec<ServiceEntry>,
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
        let interface = overrides.interface.unwrap_or(file.interface);
        if let Some(reason) = bad_interface_name(&interface) {
            return Err(ConfigError::Interface {
                path: path.to_owned(),
                name: interface,
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
        })?;
        Ok(Self {
            interface,
            xdp_mode: overrides.xdp_mode.unwrap_or(file.xdp_mode),
            control_socket: overrides
                .control_socket
                .or(file.control_socket)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_CONTROL_SOCKET)),
            services,
        })
    }
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
        ];
        for (text, expected) in cases {
            let error = message(parse(text).unwrap_err());
            assert!(
                error.contains(expected) && error.contains("gw.toml"),
                "{text:?}: {error}"
            );
        }
    }
}
