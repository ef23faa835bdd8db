//! The Edge daemon under test: its config file and the process, ready once
//! its HTTP API answers `/health` (503 until Core links, 200 after).

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::bins::binary;
use crate::http::{self, HttpAnswer};
use crate::netns::Netns;
use crate::pki::CertFiles;
use crate::process::{LOG_TAIL_LINES, Process};
use crate::wait::{Probe, poll_until};

/// The Edge's binary.
pub const EDGE_BIN: &str = "tidegate-edge";

/// How long an Edge gets to answer on its HTTP address.
pub const EDGE_READY_TIMEOUT: Duration = Duration::from_secs(15);

/// The Edge's configuration file.
#[derive(Debug, Clone)]
pub struct EdgeConfig {
    /// Where clients (or nginx) reach the HTTP API.
    pub http_listen: SocketAddr,
    /// Where Core dials.
    pub link_listen: SocketAddr,
    /// The Edge's identity (its certificate's name).
    pub identity: String,
    /// The identity Core's certificate must carry, if not `core`.
    pub core_identity: Option<String>,
    /// The CA, the Edge's certificate and key.
    pub tls: CertFiles,
    /// Largest request body, if not the default.
    pub body_limit_bytes: Option<usize>,
    /// How long a request waits for Core, if not the default.
    pub core_timeout_ms: Option<u64>,
    /// How long a connection has to send a request's head, if not the
    /// default.
    pub header_timeout_ms: Option<u64>,
    /// How long a request has to send its body, if not the default.
    pub body_timeout_ms: Option<u64>,
    /// HTTP connections open at once, if not the default.
    pub max_connections: Option<usize>,
    /// Proxies whose X-Real-IP header is believed.
    pub trusted_proxies: Vec<IpAddr>,
    /// Where the Edge serves `/metrics` (`metrics_listen`), if set.
    pub metrics_listen: Option<SocketAddr>,
}

impl EdgeConfig {
    /// A config with the defaults for everything optional.
    pub fn new(
        identity: &str,
        http_listen: SocketAddr,
        link_listen: SocketAddr,
        tls: CertFiles,
    ) -> Self {
        Self {
            http_listen,
            link_listen,
            identity: identity.to_owned(),
            core_identity: None,
            tls,
            body_limit_bytes: None,
            core_timeout_ms: None,
            header_timeout_ms: None,
            body_timeout_ms: None,
            max_connections: None,
            trusted_proxies: Vec::new(),
            metrics_listen: None,
        }
    }

    /// The config as TOML.
    pub fn to_toml(&self) -> String {
        let mut out = String::new();
        let q = |s: &str| format!("{s:?}");
        let path = |p: &Path| q(&p.to_string_lossy());
        let _ = writeln!(out, "http_listen = {}", q(&self.http_listen.to_string()));
        let _ = writeln!(out, "link_listen = {}", q(&self.link_listen.to_string()));
        let _ = writeln!(out, "identity = {}", q(&self.identity));
        if let Some(core) = &self.core_identity {
            let _ = writeln!(out, "core_identity = {}", q(core));
        }
        let _ = writeln!(out, "ca_file = {}", path(&self.tls.ca));
        let _ = writeln!(out, "cert_file = {}", path(&self.tls.cert));
        let _ = writeln!(out, "key_file = {}", path(&self.tls.key));
        if let Some(limit) = self.body_limit_bytes {
            let _ = writeln!(out, "body_limit_bytes = {limit}");
        }
        if let Some(ms) = self.core_timeout_ms {
            let _ = writeln!(out, "core_timeout_ms = {ms}");
        }
        if let Some(ms) = self.header_timeout_ms {
            let _ = writeln!(out, "header_timeout_ms = {ms}");
        }
        if let Some(ms) = self.body_timeout_ms {
            let _ = writeln!(out, "body_timeout_ms = {ms}");
        }
        if let Some(max) = self.max_connections {
            let _ = writeln!(out, "max_connections = {max}");
        }
        if !self.trusted_proxies.is_empty() {
            let list: Vec<String> = self
                .trusted_proxies
                .iter()
                .map(|a| q(&a.to_string()))
                .collect();
            let _ = writeln!(out, "trusted_proxies = [{}]", list.join(", "));
        }
        if let Some(listen) = self.metrics_listen {
            let _ = writeln!(out, "metrics_listen = {}", q(&listen.to_string()));
        }
        out
    }
}

/// A running `tidegate-edge`.
#[derive(Debug)]
pub struct EdgeDaemon {
    process: Process,
    netns: Netns,
    config: EdgeConfig,
    config_path: PathBuf,
}

impl EdgeDaemon {
    /// Writes `config` to `dir/<identity>.toml`, starts the Edge in `netns`
    /// (log in `dir/<identity>.log`) and waits until `/health` answers.
    pub fn start(netns: &Netns, config: EdgeConfig, dir: &Path) -> Result<Self> {
        let config_path = dir.join(format!("{}.toml", config.identity));
        std::fs::write(&config_path, config.to_toml())
            .with_context(|| format!("writing {}", config_path.display()))?;
        let mut daemon = Self {
            process: Self::spawn_process(netns, &config_path, &config, dir)?,
            netns: netns.clone(),
            config,
            config_path,
        };
        daemon.wait_ready()?;
        Ok(daemon)
    }

    fn spawn_process(
        netns: &Netns,
        config_path: &Path,
        config: &EdgeConfig,
        dir: &Path,
    ) -> Result<Process> {
        let mut command = netns.command(binary(EDGE_BIN)?);
        command.arg("--config").arg(config_path);
        if std::env::var_os("RUST_LOG").is_none() {
            command.env("RUST_LOG", "info");
        }
        let log = dir.join(format!("{}.log", config.identity));
        Process::spawn(EDGE_BIN, netns, command, &log)
    }

    /// Polls `/health` until it answers (with any status) while the Edge
    /// runs.
    pub fn wait_ready(&mut self) -> Result<()> {
        let what = format!("{EDGE_BIN} {} to answer /health", self.config.identity);
        let addr = self.config.http_listen;
        let netns = self.netns.clone();
        poll_until(&what, EDGE_READY_TIMEOUT, Duration::from_millis(50), || {
            self.process.ensure_running()?;
            Ok(match netns.run(move || http::get(addr, "/health"))? {
                Ok(_) => Probe::Ready(()),
                Err(error) => Probe::NotYet(format!("{error:#}")),
            })
        })
    }

    /// `GET /health` from inside the Edge's namespace.
    pub fn health(&self) -> Result<HttpAnswer> {
        let addr = self.config.http_listen;
        self.netns.run(move || http::get(addr, "/health"))?
    }

    /// Polls `/health` until its status is `status`.
    pub fn wait_health(&mut self, status: u16, timeout: Duration) -> Result<HttpAnswer> {
        let what = format!("{} /health to answer {status}", self.config.identity);
        poll_until(&what, timeout, Duration::from_millis(50), || {
            self.process.ensure_running()?;
            let answer = self.health()?;
            Ok(if answer.status == status {
                Probe::Ready(answer)
            } else {
                Probe::NotYet(format!("{} {}", answer.status, answer.body))
            })
        })
        .map_err(|e| e.context(format!("last lines of the log:\n{}", self.log_tail())))
    }

    /// The configuration the Edge runs with.
    pub fn config(&self) -> &EdgeConfig {
        &self.config
    }

    /// Where the config file was written.
    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// The process (pid, log).
    pub fn process(&self) -> &Process {
        &self.process
    }

    /// The last lines of the log.
    pub fn log_tail(&self) -> String {
        self.process.log_tail(LOG_TAIL_LINES)
    }

    /// The whole log so far.
    pub fn log(&self) -> String {
        self.process.log()
    }

    /// Writes `config` over the file the Edge was started with (for a
    /// reload); the Edge is not told.
    pub fn write_config(&mut self, config: EdgeConfig) -> Result<()> {
        std::fs::write(&self.config_path, config.to_toml())
            .with_context(|| format!("writing {}", self.config_path.display()))?;
        self.config = config;
        Ok(())
    }

    /// Sends `signal` to the Edge (SIGHUP: reload).
    pub fn signal(&mut self, signal: nix::sys::signal::Signal) -> Result<()> {
        self.process.signal(signal)
    }

    /// Kills the Edge with SIGKILL and reaps it.
    pub fn kill(&mut self) -> Result<ExitStatus> {
        self.process.kill()
    }

    /// Stops the Edge with SIGTERM (graceful shutdown).
    pub fn stop(&mut self) -> Result<ExitStatus> {
        self.process.stop()
    }

    /// Starts the Edge again with the same config, after it stopped.
    pub fn restart(&mut self) -> Result<()> {
        self.process.ensure_stopped()?;
        let dir = self
            .config_path
            .parent()
            .context("the config file has no directory")?
            .to_owned();
        self.process = Self::spawn_process(&self.netns, &self.config_path, &self.config, &dir)?;
        self.wait_ready()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_toml_has_every_field() {
        let mut config = EdgeConfig::new(
            "edge-a",
            "127.0.0.1:8080".parse().unwrap(),
            "127.0.0.1:7444".parse().unwrap(),
            CertFiles {
                ca: "/p/ca.pem".into(),
                cert: "/p/edge-a.pem".into(),
                key: "/p/edge-a.key".into(),
            },
        );
        config.core_identity = Some("core-1".into());
        config.body_limit_bytes = Some(1024);
        config.core_timeout_ms = Some(500);
        config.trusted_proxies = vec!["127.0.0.1".parse().unwrap()];
        assert_eq!(
            config.to_toml(),
            "http_listen = \"127.0.0.1:8080\"\nlink_listen = \"127.0.0.1:7444\"\n\
             identity = \"edge-a\"\ncore_identity = \"core-1\"\nca_file = \"/p/ca.pem\"\n\
             cert_file = \"/p/edge-a.pem\"\nkey_file = \"/p/edge-a.key\"\n\
             body_limit_bytes = 1024\ncore_timeout_ms = 500\ntrusted_proxies = [\"127.0.0.1\"]\n"
        );
    }
}
