//! The owner of Core's state: one thread holds the [`Store`] (the SQLite
//! connection and the MFA logins in progress) and runs the jobs other tasks
//! send it, one at a time. After each job it broadcasts the notices of
//! what was committed, in commit order, so that a gateway link sees its
//! location's versions in sequence. Between jobs it sleeps until the next
//! timed duty: housekeeping, or the end of an MFA session by its age (the
//! store keeps that one deadline; nothing is polled).

use std::{
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use tokio::sync::{broadcast, oneshot};
use tracing::{error, info, warn};

use crate::store::{Notice, Store};

/// Notices kept for a slow subscriber before it lags (and resyncs).
pub const NOTICE_BUFFER: usize = 8192;
/// How often expired tokens, logins and old events are dropped.
const HOUSEKEEPING: Duration = Duration::from_secs(60);
/// How soon a failed read of the next session end is tried again.
const RETRY: Duration = Duration::from_secs(5);
/// How often a standby looks whether it leads now (its timed duties wait
/// for that).
const STANDBY_CHECK: Duration = Duration::from_secs(1);

type Job = Box<dyn FnOnce(&mut Store, &broadcast::Sender<Notice>) + Send>;

/// The state thread has stopped (Core is shutting down).
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("Core's state has shut down")]
pub struct StateGone;

/// A handle on the state thread; cheap to clone.
#[derive(Debug, Clone)]
pub struct StateHandle {
    jobs: mpsc::Sender<Job>,
    notices: broadcast::Sender<Notice>,
}

impl StateHandle {
    /// Runs `job` on the store and returns its result.
    pub async fn call<T, F>(&self, job: F) -> Result<T, StateGone>
    where
        T: Send + 'static,
        F: FnOnce(&mut Store) -> T + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        self.jobs
            .send(Box::new(
                move |store: &mut Store, notices: &broadcast::Sender<Notice>| {
                    let result = job(store);
                    // Notices go out before the caller hears back, so a caller
                    // that then waits for its change sees it announced.
                    publish(store, notices);
                    let _ = tx.send(result);
                },
            ))
            .map_err(|_| StateGone)?;
        rx.await.map_err(|_| StateGone)
    }

    /// Notices of every change committed from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Notice> {
        self.notices.subscribe()
    }
}

fn publish(store: &mut Store, notices: &broadcast::Sender<Notice>) {
    for notice in store.take_notices() {
        // No subscriber is fine: nothing to tell.
        let _ = notices.send(notice);
    }
}

/// When the next MFA session ends by its age, as an instant; a failed read
/// is retried after [`RETRY`].
fn next_session_end(store: &mut Store) -> Option<Instant> {
    match store.next_session_end() {
        Ok(at_ms) => at_ms.map(|at_ms| {
            let left_ms = u64::try_from(at_ms - crate::now_ms()).unwrap_or(0);
            Instant::now() + Duration::from_millis(left_ms)
        }),
        Err(e) => {
            warn!(error = %crate::error_chain(&e), "reading the next MFA session end failed");
            Some(Instant::now() + RETRY)
        }
    }
}

/// Starts the state thread. It stops once every handle is dropped.
pub fn spawn(mut store: Store) -> (StateHandle, thread::JoinHandle<()>) {
    let (jobs, rx) = mpsc::channel::<Job>();
    let (notices, _) = broadcast::channel(NOTICE_BUFFER);
    let sender = notices.clone();
    let thread = thread::Builder::new()
        .name("core-state".into())
        .spawn(move || {
            let mut next_housekeeping = Instant::now() + HOUSEKEEPING;
            let mut leading = store.may_write();
            loop {
                // The timed duties write: only the leader does them, with
                // what it reads afresh once it leads.
                let now_leading = store.may_write();
                if now_leading && !leading {
                    store.forget_cached();
                }
                leading = now_leading;
                let due = if leading {
                    let session_end = next_session_end(&mut store);
                    session_end.map_or(next_housekeeping, |at| at.min(next_housekeeping))
                } else {
                    Instant::now() + STANDBY_CHECK
                };
                let wait = due.saturating_duration_since(Instant::now());
                match rx.recv_timeout(wait) {
                    Ok(job) => job(&mut store, &sender),
                    Err(mpsc::RecvTimeoutError::Timeout) if !leading => {}
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        let session_end = next_session_end(&mut store);
                        if session_end.is_some_and(|at| at <= Instant::now()) {
                            match store.end_old_sessions(crate::now_ms()) {
                                Ok(0) => {}
                                Ok(ended) => info!(ended, "MFA sessions ended by their age"),
                                Err(e) => {
                                    warn!(error = %crate::error_chain(&e), "ending old MFA sessions failed");
                                }
                            }
                            publish(&mut store, &sender);
                        }
                        if next_housekeeping <= Instant::now() {
                            if let Err(e) = store.housekeeping(crate::now_ms()) {
                                warn!(error = %crate::error_chain(&e), "housekeeping failed");
                            }
                            next_housekeeping = Instant::now() + HOUSEKEEPING;
                        }
                    }
                    Err(mpsc::RecvTimeoutError::Disconnected) => break,
                }
            }
            if let Err(e) = store.integrity_check() {
                error!(error = %crate::error_chain(&e), "the database fails its check at shutdown");
            }
        })
        .expect("spawning the state thread");
    (StateHandle { jobs, notices }, thread)
}

#[cfg(test)]
mod tests {
    use tidegate_proto::admin::v1 as admin;

    use super::*;
    use crate::store::MfaSettings;

    #[tokio::test]
    async fn jobs_run_in_order_and_notices_follow_commits() {
        let dir = tempfile::tempdir().unwrap();
        let store =
            Store::open(&dir.path().join("core.db").into(), MfaSettings::default()).unwrap();
        let (state, thread) = spawn(store);
        let mut notices = state.subscribe();
        let created = state
            .call(|s| {
                s.create_gateway(
                    admin::CreateGatewayRequest {
                        name: "gw-a".into(),
                        location: "nowhere".into(),
                        address: "198.51.100.2:1".into(),
                        ..Default::default()
                    },
                    0,
                )
            })
            .await
            .unwrap();
        assert!(created.is_err());
        state
            .call(|s| {
                s.create_edge(
                    admin::CreateEdgeRequest {
                        name: "edge-1".into(),
                        address: "203.0.113.1:1".into(),
                        ..Default::default()
                    },
                    0,
                )
            })
            .await
            .unwrap()
            .unwrap();
        assert!(matches!(notices.try_recv(), Ok(Notice::Links)));
        assert!(notices.try_recv().is_err());
        drop(state);
        thread.join().unwrap();
    }

    #[tokio::test]
    async fn the_state_thread_ends_an_old_session_on_time_without_a_job() {
        use crate::{keys::Key, store::testing};
        let dir = tempfile::tempdir().unwrap();
        let mut store =
            Store::open(&dir.path().join("core.db").into(), MfaSettings::default()).unwrap();
        store
            .create_location(
                admin::CreateLocationRequest {
                    name: "ams".into(),
                    addresses: vec!["10.8.0.1/24".into()],
                    vips: vec!["198.51.100.100".into()],
                    mfa: true,
                    mfa_session_s: 60,
                    ..Default::default()
                },
                0,
            )
            .unwrap();
        store
            .create_user(
                admin::CreateUserRequest {
                    name: "alice".into(),
                    enabled: None,
                },
                0,
            )
            .unwrap();
        let key = Key::new([1; 32]);
        store
            .create_device(
                admin::CreateDeviceRequest {
                    name: "laptop".into(),
                    user: "alice".into(),
                    location: "ams".into(),
                    public_key: key.to_base64(),
                    ..Default::default()
                },
                0,
            )
            .unwrap();
        // A login 59.3 s ago: the session's end is 0.7 s away.
        let login_ms = crate::now_ms() - 59_300;
        testing::login(&mut store, "ams", key, login_ms);
        store.take_notices();
        let (state, thread) = spawn(store);
        let mut notices = state.subscribe();
        let started = Instant::now();
        let notice = tokio::time::timeout(Duration::from_secs(3), notices.recv())
            .await
            .expect("the session did not end within 3 s")
            .unwrap();
        let took = started.elapsed();
        let Notice::Location(change) = notice else {
            panic!("{notice:?}")
        };
        assert_eq!(
            change.kind,
            crate::store::ChangeKind::Peers {
                upsert: vec![],
                remove: vec![key]
            }
        );
        assert!(
            took >= Duration::from_millis(500) && took < Duration::from_millis(1_700),
            "ended after {took:?}, due after 0.7 s"
        );
        let device = state.call(|s| s.device("laptop")).await.unwrap().unwrap();
        assert!(!device.mfa_session);
        drop(state);
        thread.join().unwrap();
    }
}
