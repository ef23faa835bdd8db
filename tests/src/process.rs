//! Long-running processes inside a namespace: spawned with their output in a
//! log file, stopped on drop with SIGTERM (and SIGCONT, should it be frozen)
//! to their own pid, then SIGKILL.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::cmd::describe;
use crate::netns::Netns;
use crate::wait::{Probe, poll_until};

/// How long a process gets to exit after SIGTERM before SIGKILL, by default.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(5);

/// How long to wait for a process to disappear after SIGKILL.
const KILL_WAIT: Duration = Duration::from_secs(5);

/// How many lines of the log error messages quote.
pub const LOG_TAIL_LINES: usize = 40;

/// A child process owned by the harness.
///
/// Dropping it stops the process: SIGTERM to its pid (never to a group or a
/// name), up to the grace period for it to exit, then SIGKILL, then reap.
/// It keeps a handle on its namespace so the namespace outlives it.
#[derive(Debug)]
pub struct Process {
    label: String,
    command: String,
    child: Child,
    pid: u32,
    log_path: PathBuf,
    grace: Duration,
    status: Option<ExitStatus>,
    _netns: Netns,
}

impl Process {
    /// Spawns `cmd` (usually from [`Netns::command`]) with stdin closed and
    /// stdout and stderr appended to `log_path`. `label` names the process in
    /// messages.
    pub fn spawn(label: &str, netns: &Netns, mut cmd: Command, log_path: &Path) -> Result<Self> {
        let command = describe(&cmd);
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log_path)
            .with_context(|| format!("opening log file {}", log_path.display()))?;
        let log_err = log
            .try_clone()
            .with_context(|| format!("duplicating log file {}", log_path.display()))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log_err))
            .spawn()
            .with_context(|| format!("starting {label}: `{command}`"))?;
        let pid = child.id();
        Ok(Self {
            label: label.to_owned(),
            command,
            child,
            pid,
            log_path: log_path.to_owned(),
            grace: DEFAULT_GRACE,
            status: None,
            _netns: netns.clone(),
        })
    }

    /// Sets how long the process gets after SIGTERM before SIGKILL.
    pub fn set_grace(&mut self, grace: Duration) {
        self.grace = grace;
    }

    /// The process id (the program's own: `ip netns exec` execs it).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The label given at spawn time.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// The file that receives the process's stdout and stderr.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Everything the process has written so far (empty if nothing yet).
    pub fn log(&self) -> String {
        std::fs::read(&self.log_path)
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
            .unwrap_or_default()
    }

    /// The last `lines` lines of the log.
    pub fn log_tail(&self, lines: usize) -> String {
        let log = self.log();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// The exit status if the process has exited (reaping it), else `None`.
    pub fn try_status(&mut self) -> Result<Option<ExitStatus>> {
        if self.status.is_none() {
            self.status = self
                .child
                .try_wait()
                .with_context(|| format!("checking on {}", self.label))?;
        }
        Ok(self.status)
    }

    /// `Ok` while the process runs; once it has exited, an error with its
    /// status and the tail of its log.
    pub fn ensure_running(&mut self) -> Result<()> {
        match self.try_status()? {
            None => Ok(()),
            Some(status) => bail!(
                "{} (pid {}) exited ({status}); `{}`; last lines of {}:\n{}",
                self.label,
                self.pid,
                self.command,
                self.log_path.display(),
                self.log_tail(LOG_TAIL_LINES)
            ),
        }
    }

    /// Stops the process: SIGTERM, then up to the grace period for it to
    /// exit. Returns its exit status. If it does not exit in time it is
    /// killed with SIGKILL and an error says so. Calling this on a process
    /// that already exited returns the status it exited with.
    pub fn stop(&mut self) -> Result<ExitStatus> {
        if let Some(status) = self.try_status()? {
            return Ok(status);
        }
        // The child has not been reaped (try_status saw it running), so the
        // pid still belongs to it, even if it exits meanwhile (a zombie).
        let pid = Pid::from_raw(
            i32::try_from(self.pid).with_context(|| format!("pid {} out of range", self.pid))?,
        );
        kill(pid, Signal::SIGTERM)
            .with_context(|| format!("sending SIGTERM to {} (pid {})", self.label, self.pid))?;
        // A stopped (frozen) process acts on SIGTERM only once continued; a
        // running one ignores SIGCONT.
        kill(pid, Signal::SIGCONT)
            .with_context(|| format!("sending SIGCONT to {} (pid {})", self.label, self.pid))?;
        let what = format!("{} (pid {}) to exit after SIGTERM", self.label, self.pid);
        let waited = poll_until(&what, self.grace, Duration::from_millis(20), || {
            Ok(match self.child.try_wait()? {
                Some(status) => Probe::Ready(status),
                None => Probe::NotYet("still running".into()),
            })
        });
        match waited {
            Ok(status) => {
                self.status = Some(status);
                Ok(status)
            }
            Err(timeout) => {
                self.kill_and_reap()?;
                bail!(
                    "{timeout:#}; killed it with SIGKILL; last lines of {}:\n{}",
                    self.log_path.display(),
                    self.log_tail(LOG_TAIL_LINES)
                )
            }
        }
    }

    /// Sends `signal` to the process's own pid, while it is our unreaped
    /// child (so the pid cannot belong to anyone else); an error once it
    /// has exited.
    pub fn signal(&mut self, signal: Signal) -> Result<()> {
        self.ensure_running()?;
        let pid = Pid::from_raw(
            i32::try_from(self.pid).with_context(|| format!("pid {} out of range", self.pid))?,
        );
        kill(pid, signal)
            .with_context(|| format!("sending {signal} to {} (pid {})", self.label, self.pid))
    }

    /// Kills the process with SIGKILL at once (no grace period) and reaps
    /// it; returns its exit status.
    pub fn kill(&mut self) -> Result<ExitStatus> {
        self.kill_and_reap()?;
        self.status
            .with_context(|| format!("{} (pid {}) was not reaped", self.label, self.pid))
    }

    /// `Ok` once the process has exited (reaped), else an error: for code
    /// that must not run two copies of a daemon.
    pub fn ensure_stopped(&mut self) -> Result<()> {
        match self.try_status()? {
            Some(_) => Ok(()),
            None => bail!("{} (pid {}) is still running", self.label, self.pid),
        }
    }

    /// SIGKILL (to our own unreaped child) and a bounded wait for it to go.
    fn kill_and_reap(&mut self) -> Result<()> {
        if self.try_status()?.is_some() {
            return Ok(());
        }
        self.child
            .kill()
            .with_context(|| format!("sending SIGKILL to {} (pid {})", self.label, self.pid))?;
        let what = format!("{} (pid {}) to exit after SIGKILL", self.label, self.pid);
        let status = poll_until(&what, KILL_WAIT, Duration::from_millis(20), || {
            Ok(match self.child.try_wait()? {
                Some(status) => Probe::Ready(status),
                None => Probe::NotYet("still running".into()),
            })
        })?;
        self.status = Some(status);
        Ok(())
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Err(err) = self.stop() {
            eprintln!("warning: stopping {}: {err:#}", self.label);
        }
    }
}
