//! The HA agent's own thread: a single-threaded runtime at a real-time
//! priority, so that adverts and the lease keep their times however busy
//! the rest of the daemon is.

use tokio::sync::oneshot;
use tracing::warn;

use super::agent::{Agent, HaConfig, HaError};
use crate::datapath::DatapathHandle;

/// A thread of the agent's own, with a single-threaded runtime that nothing
/// else of the daemon's runs on but the datapath task (short map writes,
/// the lease renewals among them): however busy the other tasks are (a
/// reload of many peers parses and plans on theirs), adverts, the lease and
/// the timers of the election keep their times. Its sockets (adverts, the
/// VIPs' netlink) are made on it, so that what arrives wakes it alone. The
/// thread runs at a real-time priority ([`REALTIME_PRIORITY`], `SCHED_RR`,
/// as keepalived's `vrrp_rt_priority`) where the daemon may, so that a
/// host whose CPUs are all busy still runs it on time; it is idle but for
/// a few microseconds each advert. It runs until this is dropped.
#[derive(Debug)]
pub struct AgentThread {
    runtime: tokio::runtime::Handle,
    /// Dropped with this: the thread's runtime stops.
    _stop: oneshot::Sender<()>,
}

impl AgentThread {
    /// Starts the thread.
    pub fn start() -> std::io::Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("ha-agent".into())
            .spawn(move || {
                if let Err(error) = set_realtime(REALTIME_PRIORITY) {
                    warn!(
                        %error,
                        "the HA agent runs at normal priority: busy CPUs may delay its adverts"
                    );
                }
                let _ = runtime.block_on(stopped);
            })?;
        Ok(Self {
            runtime: handle,
            _stop: stop,
        })
    }

    /// Starts the agent on the thread (see [`Agent::start`]).
    pub async fn start_agent(
        &self,
        config: HaConfig,
        datapath: DatapathHandle,
        epoch: u64,
    ) -> Result<Agent, HaError> {
        self.runtime
            .spawn(Agent::start(config, datapath, epoch))
            .await
            .map_err(|_| HaError::Stopped)?
    }

    /// Runs `task` (the agent's, from [`spawn`](super::agent::spawn), or the datapath task's)
    /// on the thread; the handle resolves when it ends.
    pub fn run<T: Send + 'static>(
        &self,
        task: impl Future<Output = T> + Send + 'static,
    ) -> tokio::task::JoinHandle<T> {
        self.runtime.spawn(task)
    }
}

/// The agent thread's `SCHED_RR` priority: above every normal thread, low
/// among real-time ones (the kernel's own threads run at 50).
pub const REALTIME_PRIORITY: i32 = 10;

/// Puts the calling thread in the `SCHED_RR` class at `priority`.
fn set_realtime(priority: i32) -> std::io::Result<()> {
    let param = libc::sched_param {
        sched_priority: priority,
    };
    // SAFETY: `param` is a valid sched_param that outlives the call; pid 0
    // is the calling thread.
    let result = unsafe { libc::sched_setscheduler(0, libc::SCHED_RR, &param) };
    if result == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
