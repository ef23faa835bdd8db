//! Re-reading the config file, on SIGHUP or `tidectl reload`, and applying
//! what changed: the WireGuard settings and peers, and the shield's
//! services. Settings that need a restart are refused, and then nothing is
//! applied.

use std::{path::PathBuf, sync::Arc};

use tokio::sync::Mutex;

use crate::{
    config::{Config, ConfigError, Overrides},
    datapath::{DatapathError, DatapathHandle},
    wireguard::{ApplyReport, WireguardError, WireguardHandle},
};

/// Why a reload was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error(transparent)]
    Config(#[from] Box<ConfigError>),
    #[error("{what} changed from {from} to {to}: restart the daemon to apply it")]
    NeedsRestart {
        what: &'static str,
        from: String,
        to: String,
    },
    #[error(transparent)]
    Wireguard(#[from] WireguardError),
    #[error("installing the services")]
    Datapath(#[source] DatapathError),
}

/// Reloads the config; clones share one lock, so reloads never overlap.
#[derive(Debug, Clone)]
pub struct Reloader {
    inner: Arc<Mutex<Inner>>,
}

#[derive(Debug)]
struct Inner {
    path: PathBuf,
    overrides: Overrides,
    current: Config,
    datapath: DatapathHandle,
    wireguard: Option<WireguardHandle>,
}

impl Reloader {
    /// A reloader for the daemon started with `current`, read from `path`.
    pub fn new(
        path: PathBuf,
        overrides: Overrides,
        current: Config,
        datapath: DatapathHandle,
        wireguard: Option<WireguardHandle>,
    ) -> Self {
        Self {
            inner: Arc::new(Mutex::new(Inner {
                path,
                overrides,
                current,
                datapath,
                wireguard,
            })),
        }
    }

    /// Re-reads the file and applies it.
    pub async fn reload(&self) -> Result<ApplyReport, ReloadError> {
        let mut inner = self.inner.lock().await;
        let new = Config::load(&inner.path, inner.overrides.clone()).map_err(Box::new)?;
        let current = &inner.current;
        let restart = |what, from: &dyn std::fmt::Debug, to: &dyn std::fmt::Debug| {
            Err(ReloadError::NeedsRestart {
                what,
                from: format!("{from:?}"),
                to: format!("{to:?}"),
            })
        };
        if new.interface != current.interface {
            return restart("interface", &current.interface, &new.interface);
        }
        if new.xdp_mode != current.xdp_mode {
            return restart("xdp_mode", &current.xdp_mode, &new.xdp_mode);
        }
        if new.control_socket != current.control_socket {
            return restart(
                "control_socket",
                &current.control_socket,
                &new.control_socket,
            );
        }
        if new.state_dir != current.state_dir {
            return restart("state_dir", &current.state_dir, &new.state_dir);
        }
        if new.bpf_pin_dir != current.bpf_pin_dir {
            return restart("bpf_pin_dir", &current.bpf_pin_dir, &new.bpf_pin_dir);
        }
        if new.ha != current.ha {
            return Err(ReloadError::NeedsRestart {
                what: "[ha]",
                from: "the running settings".into(),
                to: "new ones".into(),
            });
        }
        if new.hooks != current.hooks {
            return Err(ReloadError::NeedsRestart {
                what: "[[hooks]]",
                from: format!("{} hooks", current.hooks.len()),
                to: format!("{} changed", new.hooks.len()),
            });
        }
        let wireguard = |c: &Config| c.wireguard.as_ref().map(|w| w.interface.clone());
        if wireguard(&new).is_none() != wireguard(current).is_none() {
            return restart("[wireguard]", &wireguard(current), &wireguard(&new));
        }
        // WireGuard first: it is the part that can fail (a port in use).
        let report = match (&inner.wireguard, &new.wireguard) {
            (Some(handle), Some(config)) => handle.reload(config.clone()).await?,
            _ => ApplyReport::default(),
        };
        if new.services != current.services || new.shield != current.shield {
            inner
                .datapath
                .install_services(new.services.clone(), new.shield)
                .await
                .map_err(ReloadError::Datapath)?;
        }
        inner.current = new;
        Ok(report)
    }
}
