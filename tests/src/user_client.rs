//! The user's `tidegate-client`, run in a namespace as a user runs it: its
//! profiles and tunnel records in a directory of the run, `up` kept running
//! as a process of the test, and everything taken down on drop.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::bins::binary;
use crate::cmd::{self, CmdOutput};
use crate::netns::Netns;
use crate::process::Process;
use crate::wait::{Probe, poll_until};

/// The client's binary.
pub const CLIENT_BIN: &str = "tidegate-client";

/// How long a one-shot command (enrol, status, down, a refused up) may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);
/// How long `up` may take to bring the tunnel up.
const UP_TIMEOUT: Duration = Duration::from_secs(30);

/// One host's client.
#[derive(Debug)]
pub struct UserClient {
    netns: Netns,
    dir: PathBuf,
    profiles: PathBuf,
    run_dir: PathBuf,
    /// `up`, while it keeps a tunnel, and its profile's name.
    keepers: Vec<(String, Process)>,
}

impl UserClient {
    /// A client in `netns` keeping its files under `dir` (created).
    pub fn new(netns: &Netns, dir: &Path) -> Result<Self> {
        binary(CLIENT_BIN)?;
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Self {
            netns: netns.clone(),
            dir: dir.to_owned(),
            profiles: dir.join("profiles"),
            run_dir: dir.join("run"),
            keepers: Vec::new(),
        })
    }

    /// Where the client keeps its profiles.
    pub fn profiles(&self) -> &Path {
        &self.profiles
    }

    fn command(&self, args: &[&str]) -> Result<std::process::Command> {
        let mut command = self.netns.command(binary(CLIENT_BIN)?);
        command
            .arg("--dir")
            .arg(&self.profiles)
            .arg("--run-dir")
            .arg(&self.run_dir)
            .args(args)
            .env("RUST_LOG", "info");
        Ok(command)
    }

    /// Runs `tidegate-client args` to its end, whatever its exit.
    pub fn run(&self, args: &[&str]) -> Result<CmdOutput> {
        cmd::run_bounded(&mut self.command(args)?, COMMAND_TIMEOUT)
    }

    /// Runs `tidegate-client args`; its stdout, or an error with its output.
    pub fn run_ok(&self, args: &[&str]) -> Result<String> {
        self.run(args)?.into_success()
    }

    /// `enrol URL TOKEN --ca-file CA --name NAME`.
    pub fn enrol(&self, url: &str, token: &str, ca: &Path, name: &str) -> Result<String> {
        let ca = ca.to_string_lossy();
        self.run_ok(&["enrol", url, token, "--ca-file", &ca, "--name", name])
    }

    /// Starts `enrol URL TOKEN --ca-file CA --name NAME` and returns at
    /// once: a process of the test, its output in `enrol-NAME.log` under
    /// the client's directory.
    pub fn spawn_enrol(&self, url: &str, token: &str, ca: &Path, name: &str) -> Result<Process> {
        let ca = ca.to_string_lossy();
        let command = self.command(&["enrol", url, token, "--ca-file", &ca, "--name", name])?;
        let log = self.dir.join(format!("enrol-{name}.log"));
        Process::spawn(CLIENT_BIN, &self.netns, command, &log)
    }

    /// Starts `up NAME args` and waits until its tunnel is up; it keeps
    /// running (renewing the session) until `down` or drop.
    pub fn up(&mut self, name: &str, args: &[&str]) -> Result<()> {
        let mut all = vec!["up", name];
        all.extend(args);
        let log = self.dir.join(format!("up-{name}.log"));
        let mut keeper = Process::spawn(CLIENT_BIN, &self.netns, self.command(&all)?, &log)?;
        let waited = poll_until(
            "the client's tunnel to come up",
            UP_TIMEOUT,
            Duration::from_millis(100),
            || {
                if keeper.try_status()?.is_some() {
                    bail!(
                        "`tidegate-client up {name}` ended:\n{}",
                        keeper.log_tail(40)
                    );
                }
                let status = self.status(name)?;
                Ok(if status["up"] == true {
                    Probe::Ready(())
                } else {
                    Probe::NotYet(status.to_string())
                })
            },
        );
        let waited = waited.map_err(|e| e.context(keeper.log_tail(40)));
        self.keepers.push((name.to_owned(), keeper));
        waited
    }

    /// `status NAME --json`: the profile's entry.
    pub fn status(&self, name: &str) -> Result<serde_json::Value> {
        let out = self.run_ok(&["status", name, "--json"])?;
        let all: serde_json::Value =
            serde_json::from_str(&out).with_context(|| format!("status is not JSON: {out}"))?;
        all.get(0)
            .cloned()
            .with_context(|| format!("status has no entry: {out}"))
    }

    /// `down NAME`; the keeper then exits.
    pub fn down(&mut self, name: &str) -> Result<String> {
        let out = self.run_ok(&["down", name])?;
        if let Some(at) = self.keepers.iter().position(|(n, _)| n == name) {
            let (_, mut keeper) = self.keepers.remove(at);
            keeper.stop()?;
        }
        Ok(out)
    }

    /// The log of `up NAME`.
    pub fn up_log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join(format!("up-{name}.log"))).unwrap_or_default()
    }

    /// The keeper of `name`, while it runs.
    pub fn keeper(&mut self, name: &str) -> Option<&mut Process> {
        self.keepers
            .iter_mut()
            .find(|(n, _)| n == name)
            .map(|(_, p)| p)
    }
}

impl Drop for UserClient {
    fn drop(&mut self) {
        for (name, _) in std::mem::take(&mut self.keepers) {
            // `down` stops the keeper, which takes its tunnel down (and
            // wireguard-go with it); the Process drop then reaps it.
            let _ = self.run(&["down", &name]);
        }
    }
}
