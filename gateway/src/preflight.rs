//! What the daemon's start and `tidegate-gateway --check` share: the config
//! file with the rules between its sections, and the files it names (the
//! `[core]` certificates), read and validated but never put to use. Nothing
//! here binds a socket, loads a program or changes an interface.

use std::path::{Path, PathBuf};

use tidegate_proto::tls::{Pki, TlsError};

use crate::{
    config::{Config, ConfigError, Finding, Overrides},
    core_link::server::load_pki,
};

/// Why the config cannot be run; every problem found.
#[derive(Debug, thiserror::Error)]
pub enum PreflightError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("config {path}: [core] {problem}")]
    Unreadable { path: PathBuf, problem: String },
    #[error("config {path}: [core] TLS files")]
    Tls {
        path: PathBuf,
        #[source]
        source: TlsError,
    },
}

impl PreflightError {
    /// Each problem on its own line, with its causes.
    pub fn lines(errors: &[PreflightError]) -> Vec<String> {
        errors
            .iter()
            .flat_map(|e| match e {
                Self::Config(config) => config.lines(),
                other => vec![crate::error_chain(other)],
            })
            .collect()
    }
}

/// A config that passed: what the daemon would run.
#[derive(Debug)]
pub struct Checked {
    pub config: Config,
    /// Rules of [`crate::config::Severity::Warning`] it breaks.
    pub warnings: Vec<Finding>,
    /// The `[core]` TLS files, loaded.
    pub pki: Option<Pki>,
}

/// Reads and validates `path` and the files it names.
pub fn check(path: &Path, overrides: Overrides) -> Result<Checked, Vec<PreflightError>> {
    let (config, warnings) = Config::load_checked(path, overrides).map_err(|e| vec![e.into()])?;
    let pki = match &config.core {
        Some(core) => {
            let missing: Vec<_> = tidegate_proto::tls::unreadable(&[
                ("ca_file", &core.ca_file),
                ("cert_file", &core.cert_file),
                ("key_file", &core.key_file),
            ])
            .into_iter()
            .map(|problem| PreflightError::Unreadable {
                path: path.to_owned(),
                problem,
            })
            .collect();
            if !missing.is_empty() {
                return Err(missing);
            }
            Some(load_pki(core).map_err(|e| {
                vec![match e {
                    crate::core_link::CoreLinkError::Tls(source) => PreflightError::Tls {
                        path: path.to_owned(),
                        source,
                    },
                    other => PreflightError::Unreadable {
                        path: path.to_owned(),
                        problem: crate::error_chain(&other),
                    },
                }]
            })?)
        }
        None => None,
    };
    Ok(Checked {
        config,
        warnings,
        pki,
    })
}

/// One line on what `config` would run, for `--check`.
pub fn summary(config: &Config) -> String {
    let mut parts = vec![
        format!("interface {}", config.interface),
        format!("{} services", config.services.services().len()),
    ];
    if let Some(wg) = &config.wireguard {
        parts.push(format!(
            "wireguard {} with {} peers{}",
            wg.interface,
            wg.peers.len(),
            wg.listen_port
                .map(|p| format!(" on port {p}"))
                .unwrap_or_default()
        ));
    }
    if let Some(ha) = &config.ha {
        let adverts = match &ha.destination {
            crate::ha::transport::Destination::Multicast(group) => format!("multicast {group}"),
            crate::ha::transport::Destination::Unicast(peers) => {
                format!("{} unicast peers", peers.len())
            }
        };
        parts.push(format!(
            "ha location {} gateway {} {} with {} VIPs, adverts to {adverts}",
            ha.location_id,
            ha.election.gateway_id,
            if ha.director.is_some() {
                "director"
            } else {
                "active-standby"
            },
            ha.vips.len(),
        ));
    }
    if let Some(core) = &config.core {
        parts.push(format!("core link on {} as {}", core.listen, core.identity));
    }
    parts.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_tls_files_are_each_named_with_their_field() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("gw.toml");
        let key = crate::wireguard::key::Key::new([1; 32]);
        std::fs::write(
            &file,
            format!(
                "interface = \"eth0\"\n[[service]]\naddress = \"192.0.2.1\"\nport = 51820\n\
                 [wireguard]\ninterface = \"wg0\"\nprivate_key = \"{key}\"\nlisten_port = 51820\n\
                 [core]\nlisten = \"192.0.2.1:7443\"\nca_file = \"{0}/ca.pem\"\n\
                 cert_file = \"{0}/gw.pem\"\nkey_file = \"{0}/gw.key\"\nidentity = \"gw-a\"\n",
                dir.path().display()
            ),
        )
        .unwrap();
        std::fs::write(dir.path().join("gw.pem"), "not a certificate").unwrap();
        let errors = check(&file, Overrides::default()).unwrap_err();
        let lines = PreflightError::lines(&errors);
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(lines[0].contains("gw.toml: [core] ca_file") && lines[0].contains("ca.pem"));
        assert!(lines[1].contains("gw.toml: [core] key_file") && lines[1].contains("gw.key"));
    }

    #[test]
    fn problems_in_several_sections_are_all_reported() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("gw.toml");
        std::fs::write(
            &file,
            "interface = \"eth0/1\"\n[[service]]\naddress = \"192.0.2.1\"\nport = 0\n\
             [ha]\nlocation_id = 1\ngateway_id = 0\nkey = \"a-shared-key-of-16+\"\nvips = [\"192.0.2.1\"]\n",
        )
        .unwrap();
        let errors = check(&file, Overrides::default()).unwrap_err();
        let lines = PreflightError::lines(&errors);
        assert_eq!(lines.len(), 3, "{lines:?}");
        assert!(lines[0].contains("interface \"eth0/1\""), "{lines:?}");
        assert!(lines[1].contains("[[service]]"), "{lines:?}");
        assert!(
            lines[2].contains("[ha] gateway_id: 0 is reserved"),
            "{lines:?}"
        );
    }
}
