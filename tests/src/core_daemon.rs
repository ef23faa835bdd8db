//! The real Core under test: its PKI made by `tidegate-core init` and
//! `issue`, its config file, the process in a namespace, and `tidectl`
//! against its admin socket.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::bins::binary;
use crate::cmd::{self, CmdOutput};
use crate::gateway::TIDECTL_BIN;
use crate::netns::Netns;
use crate::pki::CertFiles;
use crate::process::{LOG_TAIL_LINES, Process};
use crate::wait::{Probe, poll_until};

/// Core's binary.
pub const CORE_BIN: &str = "tidegate-core";

/// How long Core gets to answer on its admin socket.
pub const CORE_READY_TIMEOUT: Duration = Duration::from_secs(15);

/// How long one `tidectl` or `tidegate-core` command may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(20);

/// A CA made by `tidegate-core init` in a directory.
#[derive(Debug, Clone)]
pub struct CorePki {
    dir: PathBuf,
}

impl CorePki {
    /// Runs `tidegate-core init --dir <dir>`.
    pub fn init(dir: &Path) -> Result<Self> {
        cmd::run_ok(
            Command::new(binary(CORE_BIN)?)
                .args(["init", "--dir"])
                .arg(dir),
            COMMAND_TIMEOUT,
        )
        .context("tidegate-core init")?;
        Ok(Self {
            dir: dir.to_owned(),
        })
    }

    /// The CA's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Core's own files.
    pub fn core_files(&self) -> CertFiles {
        CertFiles {
            ca: self.dir.join("ca.pem"),
            cert: self.dir.join("core.pem"),
            key: self.dir.join("core.key"),
        }
    }

    /// Runs `tidegate-core issue <name> --out <dir>/<name>` and returns the
    /// files.
    pub fn issue(&self, name: &str) -> Result<CertFiles> {
        let out = self.dir.join(name);
        cmd::run_ok(
            Command::new(binary(CORE_BIN)?)
                .arg("issue")
                .arg(name)
                .arg("--dir")
                .arg(&self.dir)
                .arg("--out")
                .arg(&out),
            COMMAND_TIMEOUT,
        )
        .with_context(|| format!("tidegate-core issue {name}"))?;
        Ok(CertFiles {
            ca: out.join("ca.pem"),
            cert: out.join(format!("{name}.pem")),
            key: out.join(format!("{name}.key")),
        })
    }
}

impl CorePki {
    /// Runs `tidegate-core issue <name> --renew --days <days> --out
    /// <dir>/<name>`: a new certificate for the same key, in place.
    pub fn renew(&self, name: &str, days: u32) -> Result<()> {
        self.renew_in(name, &self.dir.join(name), days)
    }

    /// Runs `tidegate-core issue core --renew` on Core's own files.
    pub fn renew_core(&self, days: u32) -> Result<()> {
        self.renew_in("core", &self.dir, days)
    }

    fn renew_in(&self, name: &str, out: &Path, days: u32) -> Result<()> {
        cmd::run_ok(
            Command::new(binary(CORE_BIN)?)
                .arg("issue")
                .arg(name)
                .arg("--renew")
                .arg("--days")
                .arg(days.to_string())
                .arg("--dir")
                .arg(&self.dir)
                .arg("--out")
                .arg(out),
            COMMAND_TIMEOUT,
        )
        .with_context(|| format!("tidegate-core issue {name} --renew"))?;
        Ok(())
    }
}

/// Core's config file.
#[derive(Debug, Clone)]
pub struct CoreConfig {
    /// An SQLite file or a `postgresql://` URL.
    pub database: String,
    /// `core_id`, if set.
    pub core_id: Option<String>,
    pub admin_socket: PathBuf,
    pub tls: CertFiles,
    /// `[links]` reconnect_max_ms, if set.
    pub reconnect_max_ms: Option<u64>,
    /// `[mfa]` challenge_ttl_s, if set.
    pub challenge_ttl_s: Option<u32>,
    /// `[mfa]` device_lockout_after, if set.
    pub device_lockout_after: Option<u32>,
    /// `[metrics]` listen, if set.
    pub metrics: Option<std::net::SocketAddr>,
    /// `[lease]` duration, renew and poll in ms, if set.
    pub lease_ms: Option<(u64, u64, u64)>,
}

impl CoreConfig {
    /// Database and socket in `dir`, TLS from `tls`.
    pub fn new(dir: &Path, tls: CertFiles) -> Self {
        Self {
            database: dir.join("core.db").to_string_lossy().into_owned(),
            core_id: None,
            admin_socket: dir.join("core.sock"),
            tls,
            reconnect_max_ms: None,
            challenge_ttl_s: None,
            device_lockout_after: None,
            metrics: None,
            lease_ms: None,
        }
    }

    pub fn to_toml(&self) -> String {
        let path = |p: &Path| format!("{:?}", p.to_string_lossy());
        let mut out = format!(
            "database = {:?}\nadmin_socket = {}\n",
            self.database,
            path(&self.admin_socket),
        );
        if let Some(core_id) = &self.core_id {
            let _ = writeln!(out, "core_id = {core_id:?}");
        }
        let _ = write!(
            out,
            "\n[tls]\nca = {}\ncert = {}\nkey = {}\n",
            path(&self.tls.ca),
            path(&self.tls.cert),
            path(&self.tls.key),
        );
        if let Some(ms) = self.reconnect_max_ms {
            let _ = write!(out, "\n[links]\nreconnect_max_ms = {ms}\n");
        }
        if self.challenge_ttl_s.is_some() || self.device_lockout_after.is_some() {
            out.push_str("\n[mfa]\n");
        }
        if let Some(secs) = self.challenge_ttl_s {
            let _ = writeln!(out, "challenge_ttl_s = {secs}");
        }
        if let Some(count) = self.device_lockout_after {
            let _ = writeln!(out, "device_lockout_after = {count}");
        }
        if let Some(listen) = self.metrics {
            let _ = write!(out, "\n[metrics]\nlisten = \"{listen}\"\n");
        }
        if let Some((duration, renew, poll)) = self.lease_ms {
            let _ = write!(
                out,
                "\n[lease]\nduration_ms = {duration}\nrenew_ms = {renew}\npoll_ms = {poll}\n"
            );
        }
        out
    }
}

/// A Core's lease, as `tidectl core-status` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CoreLease {
    pub core_id: String,
    pub term: u64,
    pub leading: bool,
    /// Empty: none known.
    pub leader: String,
    pub problem: String,
    /// Cores in the roster (this one included).
    pub cores: usize,
}

/// A running `tidegate-core run`.
#[derive(Debug)]
pub struct CoreDaemon {
    process: Process,
    netns: Netns,
    config: CoreConfig,
    config_path: PathBuf,
    dir: PathBuf,
    tidectl: PathBuf,
}

impl CoreDaemon {
    /// Writes `config` to `dir/core.toml`, starts Core in `netns` (log in
    /// `dir/core.log`) and waits until its admin socket answers.
    pub fn start(netns: &Netns, config: CoreConfig, dir: &Path) -> Result<Self> {
        let config_path = dir.join("core.toml");
        std::fs::write(&config_path, config.to_toml())
            .with_context(|| format!("writing {}", config_path.display()))?;
        let mut core = Self {
            process: Self::spawn(netns, &config_path, dir)?,
            netns: netns.clone(),
            config,
            config_path,
            dir: dir.to_owned(),
            tidectl: binary(TIDECTL_BIN)?,
        };
        core.wait_ready()?;
        Ok(core)
    }

    fn spawn(netns: &Netns, config_path: &Path, dir: &Path) -> Result<Process> {
        let mut command = netns.command(binary(CORE_BIN)?);
        command.arg("run").arg("--config").arg(config_path);
        if std::env::var_os("RUST_LOG").is_none() {
            command.env("RUST_LOG", "info");
        }
        Process::spawn(CORE_BIN, netns, command, &dir.join("core.log"))
    }

    fn wait_ready(&mut self) -> Result<()> {
        let what = format!(
            "{CORE_BIN} to answer on {}",
            self.config.admin_socket.display()
        );
        poll_until(&what, CORE_READY_TIMEOUT, Duration::from_millis(50), || {
            self.process.ensure_running()?;
            let out = self.tidectl(&["location", "list"])?;
            Ok(if out.status.success() {
                Probe::Ready(())
            } else {
                Probe::NotYet(out.stderr.trim().to_owned())
            })
        })
        .map_err(|e| e.context(format!("last lines of the log:\n{}", self.log_tail())))
    }

    /// `tidectl --core-socket <socket> <args>`.
    pub fn tidectl(&self, args: &[&str]) -> Result<CmdOutput> {
        cmd::run_bounded(
            Command::new(&self.tidectl)
                .arg("--core-socket")
                .arg(&self.config.admin_socket)
                .args(args),
            COMMAND_TIMEOUT,
        )
    }

    /// `tidectl` that must succeed; its standard output.
    pub fn tidectl_ok(&self, args: &[&str]) -> Result<String> {
        let out = self.tidectl(args)?;
        if !out.status.success() {
            bail!(
                "tidectl {} failed ({}): {}",
                args.join(" "),
                out.status,
                out.stderr.trim()
            );
        }
        Ok(out.stdout)
    }

    /// `tidectl ... --json` parsed.
    pub fn tidectl_json(&self, args: &[&str]) -> Result<serde_json::Value> {
        let mut args = args.to_vec();
        args.push("--json");
        let out = self.tidectl_ok(&args)?;
        serde_json::from_str(&out)
            .with_context(|| format!("tidectl {} printed {out:?}", args.join(" ")))
    }

    /// `tidectl core-status --json`: this Core's lease as it says it.
    pub fn lease(&self) -> Result<CoreLease> {
        let status = self.tidectl_json(&["core-status"])?;
        Ok(CoreLease {
            core_id: status["core_id"].as_str().unwrap_or_default().to_owned(),
            term: status["term"].as_u64().unwrap_or(0),
            leading: status["leading"].as_bool().unwrap_or(false),
            leader: status["leader"].as_str().unwrap_or_default().to_owned(),
            problem: status["problem"].as_str().unwrap_or_default().to_owned(),
            cores: status["cores"].as_array().map_or(0, Vec::len),
        })
    }

    /// `tidectl location status <name> --json`.
    pub fn location_status(&self, location: &str) -> Result<serde_json::Value> {
        self.tidectl_json(&["location", "status", location])
    }

    /// Waits until every gateway of `location` is connected and has applied
    /// the location's version; returns the status.
    pub fn wait_applied(&mut self, location: &str, timeout: Duration) -> Result<serde_json::Value> {
        let what = format!("every gateway of {location} to apply Core's config");
        poll_until(&what, timeout, Duration::from_millis(50), || {
            self.process.ensure_running()?;
            let status = self.location_status(location)?;
            let version = status["location"]["version"].as_u64().unwrap_or(0);
            let gateways = status["gateways"].as_array().cloned().unwrap_or_default();
            let done = !gateways.is_empty()
                && gateways.iter().all(|g| {
                    g["connected"].as_bool() == Some(true)
                        && g["applied_version"].as_u64() == Some(version)
                });
            Ok(if done {
                Probe::Ready(status)
            } else {
                Probe::NotYet(status.to_string())
            })
        })
        .map_err(|e| e.context(format!("last lines of Core's log:\n{}", self.log_tail())))
    }

    /// Waits until every Edge has its link up.
    pub fn wait_edges(&mut self, timeout: Duration) -> Result<()> {
        poll_until(
            "every Edge linked to Core",
            timeout,
            Duration::from_millis(50),
            || {
                self.process.ensure_running()?;
                let edges = self.tidectl_json(&["edge", "list"])?;
                let list = edges["edges"].as_array().cloned().unwrap_or_default();
                Ok(
                    if !list.is_empty()
                        && list.iter().all(|e| e["connected"].as_bool() == Some(true))
                    {
                        Probe::Ready(())
                    } else {
                        Probe::NotYet(edges.to_string())
                    },
                )
            },
        )
    }

    pub fn config(&self) -> &CoreConfig {
        &self.config
    }

    pub fn netns(&self) -> &Netns {
        &self.netns
    }

    pub fn process(&self) -> &Process {
        &self.process
    }

    /// The log so far.
    pub fn log(&self) -> String {
        self.process.log()
    }

    /// Writes `text` over Core's config file (for a reload); Core is not
    /// told.
    pub fn write_config_text(&self, text: &str) -> Result<()> {
        std::fs::write(&self.config_path, text)
            .with_context(|| format!("writing {}", self.config_path.display()))
    }

    pub fn log_tail(&self) -> String {
        self.process.log_tail(LOG_TAIL_LINES)
    }

    /// SIGKILL, and reap.
    pub fn kill(&mut self) -> Result<ExitStatus> {
        self.process.kill()
    }

    /// Sends `signal` (SIGSTOP freezes Core with its connections open).
    pub fn signal(&mut self, signal: nix::sys::signal::Signal) -> Result<()> {
        self.process.signal(signal)
    }

    /// SIGTERM (graceful), and reap.
    pub fn stop(&mut self) -> Result<ExitStatus> {
        self.process.stop()
    }

    /// Starts Core again on the same files, after it stopped.
    pub fn restart(&mut self) -> Result<()> {
        self.process.ensure_stopped()?;
        self.process = Self::spawn(&self.netns, &self.config_path, &self.dir)?;
        self.wait_ready()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_toml() {
        let mut config = CoreConfig::new(
            Path::new("/r"),
            CertFiles {
                ca: "/p/ca.pem".into(),
                cert: "/p/core.pem".into(),
                key: "/p/core.key".into(),
            },
        );
        config.reconnect_max_ms = Some(500);
        config.challenge_ttl_s = Some(10);
        assert_eq!(
            config.to_toml(),
            "database = \"/r/core.db\"\nadmin_socket = \"/r/core.sock\"\n\n[tls]\n\
             ca = \"/p/ca.pem\"\ncert = \"/p/core.pem\"\nkey = \"/p/core.key\"\n\
             \n[links]\nreconnect_max_ms = 500\n\n[mfa]\nchallenge_ttl_s = 10\n"
        );
    }
}
