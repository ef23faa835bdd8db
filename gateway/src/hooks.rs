//! Hooks: programs the operator names in `[[hooks]]`, run when this
//! gateway becomes MASTER, BACKUP or FAULT and when a failover to it
//! completes (95% of its recently active clients back, or the following
//! over), with the role, VIPs, cause and timings in their environment.
//!
//! They run beside the election, never in it: one task follows the HA
//! agent's published snapshots ([`HaHandle::subscribe`], the failover
//! records), turns each new transition and each completed failover into a
//! [`Firing`] ([`Tracker`], pure), and runs the matching hooks one at a
//! time, in order, each killed with its process group at its timeout. The
//! agent never waits for them: a slow hook delays only the hooks after it.
//! Where gratuitous ARP does not move a floating IP (cloud networks), a
//! MASTER hook moves it through the provider's API (docs/HOOKS.md).

use std::{
    collections::BTreeSet,
    path::Path,
    process::Stdio,
    time::{Duration, SystemTime},
};

use nix::{
    sys::signal::{Signal, killpg},
    unistd::Pid,
};
use serde::Deserialize;
use tokio::{io::AsyncReadExt as _, process::Command, sync::watch};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::{
    ha::{
        agent::HaHandle,
        machine::Role,
        status::{HaStatus, TransitionStatus},
    },
    wireguard::kick::FailoverReport,
};

/// A hook's timeout unless its entry sets one.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
const MIN_TIMEOUT_MS: u64 = 100;
const MAX_TIMEOUT_MS: u64 = 600_000;
/// Lines of a hook's output logged, each stream.
const MAX_LOGGED_LINES: usize = 20;
/// Bytes of a hook's output read, each stream; the rest is discarded.
const MAX_OUTPUT: u64 = 64 * 1024;

/// What a hook runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HookEvent {
    /// This gateway became MASTER: it holds the VIPs.
    Master,
    /// This gateway became BACKUP (also at start).
    Backup,
    /// This gateway became FAULT: a health check failed.
    Fault,
    /// A failover to this gateway completed: 95% of the recently active
    /// clients made a fresh handshake, or following them ended (needs
    /// `[wireguard]`).
    FailoverComplete,
}

impl HookEvent {
    /// The name in the config and in `TIDEGATE_EVENT`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Master => "master",
            Self::Backup => "backup",
            Self::Fault => "fault",
            Self::FailoverComplete => "failover-complete",
        }
    }

    /// The event of becoming `role`, if hooks run on it.
    fn of_role(role: Role) -> Option<Self> {
        match role {
            Role::Master => Some(Self::Master),
            Role::Backup => Some(Self::Backup),
            Role::Fault => Some(Self::Fault),
            Role::Init => None,
        }
    }
}

/// `[[hooks]]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HookEntry {
    /// A name for the log; the program's file name by default.
    name: Option<String>,
    /// The events it runs on.
    on: Vec<HookEvent>,
    /// The program (an absolute path) and its arguments; no shell.
    command: Vec<String>,
    timeout_ms: Option<u64>,
}

/// A hook, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hook {
    pub name: String,
    pub on: BTreeSet<HookEvent>,
    /// The program and its arguments.
    pub command: Vec<String>,
    /// Killed, with its process group, when it runs longer.
    pub timeout: Duration,
}

/// A `[[hooks]]` entry that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct HookError {
    pub field: &'static str,
    pub reason: String,
}

impl Hook {
    /// Validates `entry`: an executable program by absolute path, at least
    /// one event, a timeout within bounds.
    pub fn from_entry(entry: HookEntry) -> Result<Self, HookError> {
        let bad = |field, reason: String| HookError { field, reason };
        if entry.on.is_empty() {
            return Err(bad(
                "on",
                "no events: give one or more of master, backup, fault, failover-complete".into(),
            ));
        }
        let Some(program) = entry.command.first() else {
            return Err(bad(
                "command",
                "empty: give the program and its arguments".into(),
            ));
        };
        let path = Path::new(program);
        if !path.is_absolute() {
            return Err(bad(
                "command",
                format!("{program:?} is not an absolute path (hooks run without a shell or PATH)"),
            ));
        }
        check_executable(path).map_err(|reason| bad("command", format!("{program}: {reason}")))?;
        let timeout_ms = entry
            .timeout_ms
            .unwrap_or(DEFAULT_TIMEOUT.as_millis() as u64);
        if !(MIN_TIMEOUT_MS..=MAX_TIMEOUT_MS).contains(&timeout_ms) {
            return Err(bad(
                "timeout_ms",
                format!("{timeout_ms} is outside {MIN_TIMEOUT_MS}..={MAX_TIMEOUT_MS}"),
            ));
        }
        let name = entry.name.unwrap_or_else(|| {
            path.file_name()
                .map_or_else(|| program.clone(), |n| n.to_string_lossy().into_owned())
        });
        Ok(Self {
            name,
            on: entry.on.into_iter().collect(),
            command: entry.command,
            timeout: Duration::from_millis(timeout_ms),
        })
    }
}

/// Whether `path` is a regular file someone may execute.
fn check_executable(path: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt as _;
    let metadata = std::fs::metadata(path).map_err(|e| e.to_string())?;
    if !metadata.is_file() {
        return Err("not a regular file".into());
    }
    if metadata.permissions().mode() & 0o111 == 0 {
        return Err("not executable".into());
    }
    Ok(())
}

/// Something hooks run on, and what they are told in their environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Firing {
    pub event: HookEvent,
    /// `TIDEGATE_*` variables, in a fixed order.
    pub env: Vec<(&'static str, String)>,
}

/// Turns successive HA statuses into firings, each transition and each
/// completed failover once. Pure: the task feeds it what the agent and the
/// WireGuard owner published.
#[derive(Debug, Default)]
pub struct Tracker {
    /// The last transition fired for.
    last: Option<TransitionStatus>,
    /// Completed failovers fired for (or done before the first status),
    /// by when this gateway took the VIPs (Unix ms).
    completed: BTreeSet<u64>,
    started: bool,
}

impl Tracker {
    /// The firings `status` holds that earlier ones did not. The first
    /// status fires its transitions (the start's BACKUP among them) but
    /// no failover completed before it.
    pub fn observe(&mut self, status: &HaStatus) -> Vec<Firing> {
        let mut firings = Vec::new();
        let new_from = match &self.last {
            // Transitions only append (the oldest drop off past 32): what
            // follows the last one fired for is new; if it dropped off,
            // every one kept is.
            Some(last) => status
                .transitions
                .iter()
                .rposition(|t| t == last)
                .map_or(0, |at| at + 1),
            None => 0,
        };
        for transition in &status.transitions[new_from..] {
            if let Some(event) = HookEvent::of_role(transition.to) {
                firings.push(Firing {
                    event,
                    env: role_env(status, transition),
                });
            }
        }
        if let Some(last) = status.transitions.last() {
            self.last = Some(last.clone());
        }
        for report in status.failovers.iter().filter(|r| r.finished) {
            if self.completed.insert(unix_ms(report.meta.at)) && self.started {
                firings.push(Firing {
                    event: HookEvent::FailoverComplete,
                    env: failover_env(status, report),
                });
            }
        }
        self.started = true;
        firings
    }
}

/// What every firing says about this gateway.
fn common_env(status: &HaStatus, event: HookEvent) -> Vec<(&'static str, String)> {
    let vips: Vec<String> = status.vips.iter().map(ToString::to_string).collect();
    vec![
        ("TIDEGATE_EVENT", event.name().to_owned()),
        ("TIDEGATE_LOCATION_ID", status.location_id.to_string()),
        ("TIDEGATE_GATEWAY_ID", status.gateway_id.to_string()),
        ("TIDEGATE_VIPS", vips.join(" ")),
        (
            "TIDEGATE_MASTER",
            status.master.map(|id| id.to_string()).unwrap_or_default(),
        ),
    ]
}

fn role_env(status: &HaStatus, transition: &TransitionStatus) -> Vec<(&'static str, String)> {
    let event = HookEvent::of_role(transition.to).expect("a role hooks run on");
    let mut env = common_env(status, event);
    env.extend([
        ("TIDEGATE_ROLE", transition.to.to_string()),
        ("TIDEGATE_PREVIOUS_ROLE", transition.from.to_string()),
        ("TIDEGATE_CAUSE", transition.reason.clone()),
        ("TIDEGATE_AT_MS", transition.at_ms.to_string()),
    ]);
    env
}

fn failover_env(status: &HaStatus, report: &FailoverReport) -> Vec<(&'static str, String)> {
    let optional = |ms: Option<u64>| ms.map(|ms| ms.to_string()).unwrap_or_default();
    let mut env = common_env(status, HookEvent::FailoverComplete);
    env.extend([
        ("TIDEGATE_ROLE", status.role.to_string()),
        ("TIDEGATE_CAUSE", report.meta.cause.clone()),
        ("TIDEGATE_AT_MS", unix_ms(report.meta.at).to_string()),
        (
            "TIDEGATE_PLANNED",
            if report.meta.planned { "1" } else { "0" }.to_owned(),
        ),
        ("TIDEGATE_DETECTION_MS", optional(report.meta.detection_ms)),
        ("TIDEGATE_VIP_MOVE_MS", report.meta.vip_move_ms.to_string()),
        ("TIDEGATE_FRESH_95_MS", optional(report.fresh_95_ms)),
        (
            "TIDEGATE_RECENTLY_ACTIVE",
            report.recently_active.to_string(),
        ),
        ("TIDEGATE_KICKED", report.kicked.to_string()),
        ("TIDEGATE_COMPLETED", report.completed.to_string()),
    ]);
    env
}

fn unix_ms(at: SystemTime) -> u64 {
    at.duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

/// Follows the HA agent and runs `hooks` until `cancel`; a hook running
/// then is killed.
pub async fn run(hooks: Vec<Hook>, ha: HaHandle, cancel: CancellationToken) {
    let mut summary = ha.subscribe();
    // Without failover continuity nothing completes: a sender kept here
    // makes that receiver wait forever.
    let (_none, quiet) = watch::channel(Vec::new());
    let mut failovers = ha.subscribe_failovers().unwrap_or(quiet);
    let mut tracker = Tracker::default();
    loop {
        match ha.status().await {
            Ok(status) => {
                for firing in tracker.observe(&status) {
                    for hook in hooks.iter().filter(|h| h.on.contains(&firing.event)) {
                        tokio::select! {
                            () = cancel.cancelled() => return,
                            () = run_one(hook, &firing) => {}
                        }
                    }
                }
            }
            Err(error) => warn!(%error, "hooks: reading the HA status failed"),
        }
        tokio::select! {
            () = cancel.cancelled() => return,
            changed = summary.changed() => if changed.is_err() { return },
            changed = failovers.changed() => if changed.is_err() { return },
        }
    }
}

/// Runs `hook` for `firing` and logs how it ended; a hook still running at
/// its timeout, or when the future is dropped, is killed with its process
/// group.
async fn run_one(hook: &Hook, firing: &Firing) {
    let event = firing.event.name();
    let mut child = match Command::new(&hook.command[0])
        .args(&hook.command[1..])
        .envs(firing.env.iter().map(|(k, v)| (*k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
    {
        Ok(child) => child,
        Err(error) => {
            warn!(hook = %hook.name, event, %error, "hook could not start");
            return;
        }
    };
    let group = child.id().map(|pid| Pid::from_raw(pid as i32));
    // Killed with its group however this ends: at the timeout, or when
    // the daemon stops and drops this future.
    let _kill = KillGroup(group);
    let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
    let finished = tokio::time::timeout(hook.timeout, async {
        let (out, err, status) =
            tokio::join!(read_capped(stdout), read_capped(stderr), child.wait());
        (out, err, status)
    })
    .await;
    match finished {
        Ok((out, err, Ok(status))) => {
            for line in out.lines().chain(err.lines()).take(2 * MAX_LOGGED_LINES) {
                info!(hook = %hook.name, event, "hook: {line}");
            }
            if status.success() {
                info!(hook = %hook.name, event, "hook done");
            } else {
                warn!(hook = %hook.name, event, %status, "hook failed");
            }
        }
        Ok((_, _, Err(error))) => {
            warn!(hook = %hook.name, event, %error, "waiting for the hook failed")
        }
        Err(_) => warn!(
            hook = %hook.name,
            event,
            timeout_ms = hook.timeout.as_millis() as u64,
            "hook timed out: killed with its process group"
        ),
    }
}

/// Kills a hook's process group when dropped (nothing if it is gone).
struct KillGroup(Option<Pid>);

impl Drop for KillGroup {
    fn drop(&mut self) {
        if let Some(group) = self.0 {
            // ESRCH: the group ended already.
            let _ = killpg(group, Signal::SIGKILL);
        }
    }
}

/// Up to [`MAX_OUTPUT`] bytes of a stream, lossily as text; the rest is
/// read and dropped so the hook never blocks on a full pipe.
async fn read_capped(stream: Option<impl tokio::io::AsyncRead + Unpin>) -> String {
    let Some(mut stream) = stream else {
        return String::new();
    };
    let mut kept = Vec::new();
    let _ = (&mut stream).take(MAX_OUTPUT).read_to_end(&mut kept).await;
    let _ = tokio::io::copy(&mut stream, &mut tokio::io::sink()).await;
    String::from_utf8_lossy(&kept).into_owned()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::{ha::agent::HaMode, wireguard::kick::FailoverMeta};

    fn transition(at_ms: u64, from: Role, to: Role, reason: &str) -> TransitionStatus {
        TransitionStatus {
            at_ms,
            from,
            to,
            reason: reason.to_owned(),
        }
    }

    fn report(at_ms: u64, finished: bool) -> FailoverReport {
        FailoverReport {
            meta: FailoverMeta {
                at: SystemTime::UNIX_EPOCH + Duration::from_millis(at_ms),
                cause: "master 1 down".into(),
                planned: false,
                detection_ms: Some(310),
                vip_move_ms: 4,
            },
            recently_active: 20,
            kicked: 20,
            completed: 19,
            fresh: 19,
            skipped: 0,
            fresh_95_ms: Some(42),
            last_kick_ms: Some(21),
            finished,
            interrupted: false,
        }
    }

    fn status(transitions: Vec<TransitionStatus>, failovers: Vec<FailoverReport>) -> HaStatus {
        HaStatus {
            location_id: 7,
            gateway_id: 2,
            role: transitions.last().map_or(Role::Init, |t| t.to),
            priority: 100,
            advert_interval_ms: 100,
            advert_version: 2,
            master: Some(2),
            maintenance: false,
            mode: HaMode::ActiveStandby,
            draining: false,
            vips: vec![
                "198.51.100.100".parse().unwrap(),
                "2001:db8::100".parse().unwrap(),
            ],
            vips_held: Vec::new(),
            peers: Vec::new(),
            transitions,
            dropped: BTreeMap::new(),
            fence: None,
            failovers,
            endpoints: None,
            state_unsaved: None,
            core_links: None,
        }
    }

    fn env<'a>(firing: &'a Firing, name: &str) -> &'a str {
        firing
            .env
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
            .unwrap_or_else(|| panic!("{name} not set"))
    }

    #[test]
    fn each_transition_and_completed_failover_fires_once() {
        let started = transition(1000, Role::Init, Role::Backup, "started");
        let master = transition(2000, Role::Backup, Role::Master, "master 1 down");
        let fault = transition(3000, Role::Master, Role::Fault, "wg0 down");
        let backup = transition(4000, Role::Fault, Role::Backup, "healthy again");
        let mut tracker = Tracker::default();
        // (transitions kept, failover records, events fired)
        let steps: Vec<(Vec<TransitionStatus>, Vec<FailoverReport>, Vec<HookEvent>)> = vec![
            // The start's BACKUP fires; a failover done before it does not.
            (
                vec![started.clone()],
                vec![report(500, true)],
                vec![HookEvent::Backup],
            ),
            (vec![started.clone()], vec![report(500, true)], vec![]),
            (
                vec![started.clone(), master.clone()],
                vec![report(500, true), report(2000, false)],
                vec![HookEvent::Master],
            ),
            (
                vec![started.clone(), master.clone()],
                vec![report(500, true), report(2000, true)],
                vec![HookEvent::FailoverComplete],
            ),
            // Two transitions between looks: both, in order.
            (
                vec![
                    started.clone(),
                    master.clone(),
                    fault.clone(),
                    backup.clone(),
                ],
                vec![report(500, true), report(2000, true)],
                vec![HookEvent::Fault, HookEvent::Backup],
            ),
            // The oldest dropped off the list: nothing new.
            (
                vec![master.clone(), fault.clone(), backup.clone()],
                vec![report(2000, true)],
                vec![],
            ),
        ];
        for (n, (transitions, failovers, expected)) in steps.into_iter().enumerate() {
            let fired: Vec<HookEvent> = tracker
                .observe(&status(transitions, failovers))
                .iter()
                .map(|f| f.event)
                .collect();
            assert_eq!(fired, expected, "step {n}");
        }
    }

    #[test]
    fn a_firing_says_the_role_vips_cause_and_timings() {
        let mut tracker = Tracker::default();
        let transitions = vec![
            transition(1000, Role::Init, Role::Backup, "started"),
            transition(2000, Role::Backup, Role::Master, "master 1 down"),
        ];
        tracker.observe(&status(transitions[..1].to_vec(), Vec::new()));
        let fired = tracker.observe(&status(transitions.clone(), vec![report(2000, false)]));
        let master = &fired[0];
        for (name, value) in [
            ("TIDEGATE_EVENT", "master"),
            ("TIDEGATE_ROLE", "MASTER"),
            ("TIDEGATE_PREVIOUS_ROLE", "BACKUP"),
            ("TIDEGATE_CAUSE", "master 1 down"),
            ("TIDEGATE_AT_MS", "2000"),
            ("TIDEGATE_VIPS", "198.51.100.100 2001:db8::100"),
            ("TIDEGATE_LOCATION_ID", "7"),
            ("TIDEGATE_GATEWAY_ID", "2"),
            ("TIDEGATE_MASTER", "2"),
        ] {
            assert_eq!(env(master, name), value, "{name}");
        }
        let fired = tracker.observe(&status(transitions, vec![report(2000, true)]));
        let complete = &fired[0];
        for (name, value) in [
            ("TIDEGATE_EVENT", "failover-complete"),
            ("TIDEGATE_CAUSE", "master 1 down"),
            ("TIDEGATE_PLANNED", "0"),
            ("TIDEGATE_DETECTION_MS", "310"),
            ("TIDEGATE_VIP_MOVE_MS", "4"),
            ("TIDEGATE_FRESH_95_MS", "42"),
            ("TIDEGATE_RECENTLY_ACTIVE", "20"),
            ("TIDEGATE_KICKED", "20"),
            ("TIDEGATE_COMPLETED", "19"),
        ] {
            assert_eq!(env(complete, name), value, "{name}");
        }
    }
}
