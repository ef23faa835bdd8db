//! What a daemon tells systemd (`Type=notify`): that it is ready, what it
//! is doing, that it is stopping. Outside systemd (no `NOTIFY_SOCKET`)
//! each call does nothing.

use sd_notify::NotifyState;
use tracing::warn;

/// Ready to serve (`READY=1`), with a status line.
pub fn ready(status: &str) {
    notify(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// A new status line for `systemctl status`.
pub fn status(status: &str) {
    notify(&[NotifyState::Status(status)]);
}

/// Stopping (`STOPPING=1`), with a status line.
pub fn stopping(status: &str) {
    notify(&[NotifyState::Stopping, NotifyState::Status(status)]);
}

/// A failed notification is logged: systemd then times the start out,
/// which names the unit, and the log says why.
fn notify(states: &[NotifyState<'_>]) {
    if let Err(error) = sd_notify::notify(states) {
        warn!(%error, "telling systemd the daemon's state failed");
    }
}
