//! Stopping at the operator's request: SIGTERM or SIGINT sets a flag that
//! long-running tools check between steps, so they tear down cleanly.

use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result};
use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};

/// Set by SIGTERM or SIGINT once [`install`] has run.
static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_stop(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

/// Makes SIGTERM and SIGINT set the flag instead of ending the process.
pub fn install() -> Result<()> {
    let action = SigAction::new(
        SigHandler::Handler(on_stop),
        SaFlags::empty(),
        SigSet::empty(),
    );
    for signal in [Signal::SIGTERM, Signal::SIGINT] {
        // SAFETY: the handler only stores to an atomic, which is
        // async-signal-safe, and no other handler is replaced.
        unsafe { sigaction(signal, &action) }.with_context(|| format!("handling {signal}"))?;
    }
    Ok(())
}

/// Whether SIGTERM or SIGINT has arrived.
pub fn requested() -> bool {
    STOP.load(Ordering::Relaxed)
}
