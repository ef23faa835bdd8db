//! The gateway daemon under test: its config file, the process, and its
//! counters read through `tidectl`.

use std::collections::BTreeMap;
use std::fmt::{self, Write as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::str::FromStr;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde::Deserialize;

use crate::bins::binary;
use crate::cmd::{self, CmdOutput};
use crate::netns::Netns;
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
pub const COUNTER_NAMES: [&str; 12] = [
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
];

/// Totals every `counters --json` answer must carry.
pub const TOTAL_NAMES: [&str; 4] = ["pass", "drop", "aborted", "wireguard"];

/// The four per-type WireGuard counters that make up the "wireguard" total.
pub const WIREGUARD_COUNTERS: [&str; 4] = [
    "wg-initiation",
    "wg-response",
    "wg-cookie-reply",
    "wg-transport",
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
        for service in &self.services {
            let _ = write!(
                out,
                "\n[[service]]\naddress = {}\nport = {}\n",
                toml_string(&service.ip().to_string()),
                service.port()
            );
        }
        out
    }
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
        let mut daemon = Self {
            process,
            tidectl,
            config,
            config_path,
        };
        daemon.wait_ready()?;
        Ok(daemon)
    }

    /// Polls `tidectl counters --json` until it answers, while the daemon
    /// keeps running.
    fn wait_ready(&mut self) -> Result<()> {
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
    fn tidectl_ok(&mut self, args: &[&str]) -> Result<String> {
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
        let config = GatewayConfig {
            interface: "tg0123abcdg".into(),
            xdp_mode: XdpMode::Generic,
            control_socket: "/tmp/run \"x\"/gateway.sock".into(),
            services: vec![
                "198.51.100.1:51820".parse().unwrap(),
                "[2001:db8::1]:51821".parse().unwrap(),
            ],
        };
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
