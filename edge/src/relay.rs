//! The task that owns the link with Core: which Link stream is current, the
//! requests in flight on it and their ids. HTTP handlers hand it requests
//! and wait for the reply; link sessions hand it Core's replies. Health is
//! published on a watch channel, so `/health` never waits on the task.

use std::{
    collections::HashMap,
    time::{Duration, SystemTime},
};

use tidegate_proto::edge::v1::{self as pb, edge_message, request::Kind};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tonic::Status;
use tracing::{debug, info, warn};

/// Requests queued towards Core before new ones are refused.
pub const OUTBOUND_QUEUE: usize = 1024;

/// The stream half towards Core.
pub type Outbound = mpsc::Sender<Result<pb::EdgeMessage, Status>>;

/// Whether Core is linked, as `/health` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkState {
    Up { core_id: String, since: SystemTime },
    Down { reason: String, since: SystemTime },
}

impl LinkState {
    pub fn is_up(&self) -> bool {
        matches!(self, Self::Up { .. })
    }
}

/// Why a request got no reply from Core.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RelayError {
    #[error("no link to Core: {0}")]
    NoLink(String),
    #[error("the link to Core was lost before Core answered")]
    LinkLost,
    #[error("too many requests are waiting for Core")]
    Busy,
    #[error("the Edge is shutting down")]
    Stopped,
}

enum Command {
    Attach {
        session: u64,
        core_id: String,
        outbound: Outbound,
        cancel: CancellationToken,
    },
    Detach {
        session: u64,
        reason: String,
    },
    Reply {
        session: u64,
        reply: pb::Reply,
    },
    Request {
        kind: Kind,
        client_addr: String,
        wait_ms: u32,
        reply: oneshot::Sender<Result<pb::Reply, RelayError>>,
    },
}

/// A cheap, cloneable way to reach the relay.
#[derive(Debug, Clone)]
pub struct RelayHandle {
    tx: mpsc::Sender<Command>,
    state: watch::Receiver<LinkState>,
}

impl RelayHandle {
    /// The link state now.
    pub fn state(&self) -> LinkState {
        self.state.borrow().clone()
    }

    /// Follows the link state.
    pub fn subscribe(&self) -> watch::Receiver<LinkState> {
        self.state.clone()
    }

    /// Relays a request to Core and waits for its reply. The caller bounds
    /// the wait to `wait`, which Core is told so that it answers within.
    pub async fn request(
        &self,
        kind: Kind,
        client_addr: String,
        wait: Duration,
    ) -> Result<pb::Reply, RelayError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Request {
                kind,
                client_addr,
                wait_ms: u32::try_from(wait.as_millis()).unwrap_or(u32::MAX),
                reply,
            })
            .await
            .map_err(|_| RelayError::Stopped)?;
        rx.await.map_err(|_| RelayError::Stopped)?
    }

    /// Makes session `session` (on which Core sent Welcome) the link;
    /// the one before, if any, is cancelled.
    pub async fn attach(
        &self,
        session: u64,
        core_id: String,
        outbound: Outbound,
        cancel: CancellationToken,
    ) {
        let _ = self
            .tx
            .send(Command::Attach {
                session,
                core_id,
                outbound,
                cancel,
            })
            .await;
    }

    /// Session `session` ended; nothing happens if it was replaced already.
    pub async fn detach(&self, session: u64, reason: String) {
        let _ = self.tx.send(Command::Detach { session, reason }).await;
    }

    /// A reply Core sent on session `session`.
    pub async fn reply(&self, session: u64, reply: pb::Reply) {
        let _ = self.tx.send(Command::Reply { session, reply }).await;
    }
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Attach { .. } => "Attach",
            Self::Detach { .. } => "Detach",
            Self::Reply { .. } => "Reply",
            Self::Request { .. } => "Request",
        })
    }
}

/// The current link.
#[derive(Debug)]
struct Link {
    session: u64,
    outbound: Outbound,
    cancel: CancellationToken,
}

/// The relay's state.
#[derive(Debug)]
struct Relay {
    link: Option<Link>,
    next_id: u64,
    pending: HashMap<u64, oneshot::Sender<Result<pb::Reply, RelayError>>>,
    state: watch::Sender<LinkState>,
}

impl Relay {
    fn handle(&mut self, command: Command) {
        match command {
            Command::Attach {
                session,
                core_id,
                outbound,
                cancel,
            } => {
                if let Some(old) = self.link.take() {
                    info!(
                        old = old.session,
                        new = session,
                        "a new Link from Core replaces the previous one"
                    );
                    old.cancel.cancel();
                    self.fail_pending(RelayError::LinkLost);
                }
                info!(session, %core_id, "Core linked: serving clients");
                self.link = Some(Link {
                    session,
                    outbound,
                    cancel,
                });
                self.state.send_replace(LinkState::Up {
                    core_id,
                    since: SystemTime::now(),
                });
            }
            Command::Detach { session, reason } => {
                if self.link.as_ref().is_some_and(|l| l.session == session) {
                    warn!(session, %reason, "the link to Core is down: answering 503");
                    self.link = None;
                    self.fail_pending(RelayError::LinkLost);
                    self.state.send_replace(LinkState::Down {
                        reason,
                        since: SystemTime::now(),
                    });
                }
            }
            Command::Reply { session, reply } => {
                if self.link.as_ref().is_none_or(|l| l.session != session) {
                    debug!(
                        session,
                        id = reply.id,
                        "a reply on a replaced link; dropped"
                    );
                    return;
                }
                match self.pending.remove(&reply.id) {
                    Some(waiter) => {
                        let _ = waiter.send(Ok(reply));
                    }
                    None => debug!(
                        id = reply.id,
                        "a reply nobody waits for (timed out); dropped"
                    ),
                }
            }
            Command::Request {
                kind,
                client_addr,
                wait_ms,
                reply,
            } => self.request(kind, client_addr, wait_ms, reply),
        }
    }

    fn request(
        &mut self,
        kind: Kind,
        client_addr: String,
        wait_ms: u32,
        reply: oneshot::Sender<Result<pb::Reply, RelayError>>,
    ) {
        let Some(link) = &self.link else {
            let reason = match &*self.state.borrow() {
                LinkState::Down { reason, .. } => reason.clone(),
                LinkState::Up { .. } => "not linked".to_owned(),
            };
            let _ = reply.send(Err(RelayError::NoLink(reason)));
            return;
        };
        // Waiters that gave up (timed out) leave no entry behind.
        self.pending.retain(|_, waiter| !waiter.is_closed());
        self.next_id += 1;
        let id = self.next_id;
        let message = pb::EdgeMessage {
            msg: Some(edge_message::Msg::Request(pb::Request {
                id,
                client_addr,
                kind: Some(kind),
                wait_ms,
            })),
        };
        match link.outbound.try_send(Ok(message)) {
            Ok(()) => {
                self.pending.insert(id, reply);
            }
            Err(mpsc::error::TrySendError::Full(_)) => {
                let _ = reply.send(Err(RelayError::Busy));
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                let _ = reply.send(Err(RelayError::LinkLost));
            }
        }
    }

    fn fail_pending(&mut self, error: RelayError) {
        for (_, waiter) in self.pending.drain() {
            let _ = waiter.send(Err(error.clone()));
        }
    }
}

/// Starts the relay: returns its handle and the task's future, which ends
/// when every handle is dropped or `cancel` fires.
pub fn spawn(cancel: CancellationToken) -> (RelayHandle, impl Future<Output = ()>) {
    let (tx, mut rx) = mpsc::channel(256);
    let (state_tx, state) = watch::channel(LinkState::Down {
        reason: "Core has not connected since the Edge started".into(),
        since: SystemTime::now(),
    });
    let mut relay = Relay {
        link: None,
        next_id: 0,
        pending: HashMap::new(),
        state: state_tx,
    };
    let task = async move {
        loop {
            tokio::select! {
                () = cancel.cancelled() => break,
                command = rx.recv() => match command {
                    Some(command) => relay.handle(command),
                    None => break,
                },
            }
        }
        if let Some(link) = relay.link.take() {
            link.cancel.cancel();
        }
        relay.fail_pending(RelayError::Stopped);
    };
    (RelayHandle { tx, state }, task)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn download() -> Kind {
        Kind::Config(pb::ConfigDownload { token: "t".into() })
    }

    fn request_id(message: Result<pb::EdgeMessage, Status>) -> u64 {
        match message.unwrap().msg {
            Some(edge_message::Msg::Request(request)) => request.id,
            other => panic!("not a request: {other:?}"),
        }
    }

    #[tokio::test]
    async fn requests_travel_while_linked_and_fail_clearly_otherwise() {
        let cancel = CancellationToken::new();
        let (relay, task) = spawn(cancel.clone());
        let task = tokio::spawn(task);
        assert!(!relay.state().is_up());
        let error = relay
            .request(download(), "x".into(), Duration::ZERO)
            .await
            .unwrap_err();
        assert!(
            matches!(error, RelayError::NoLink(ref r) if r.contains("not connected")),
            "{error}"
        );

        let (out, mut from_edge) = mpsc::channel(8);
        let session = CancellationToken::new();
        relay.attach(1, "core".into(), out, session.clone()).await;
        let waiting = tokio::spawn({
            let relay = relay.clone();
            async move {
                relay
                    .request(download(), "198.51.100.7".into(), Duration::ZERO)
                    .await
            }
        });
        let id = request_id(from_edge.recv().await.unwrap());
        assert!(relay.state().is_up());
        relay.reply(1, pb::Reply { id, result: None }).await;
        assert_eq!(waiting.await.unwrap().unwrap().id, id);

        // A reply on another session is not taken for this one's.
        let waiting = tokio::spawn({
            let relay = relay.clone();
            async move { relay.request(download(), "x".into(), Duration::ZERO).await }
        });
        let id = request_id(from_edge.recv().await.unwrap());
        relay.reply(7, pb::Reply { id, result: None }).await;
        // A new link replaces the old: its requests fail, its session ends.
        let (out2, _from_edge2) = mpsc::channel(8);
        relay
            .attach(2, "core".into(), out2, CancellationToken::new())
            .await;
        assert_eq!(waiting.await.unwrap().unwrap_err(), RelayError::LinkLost);
        assert!(session.is_cancelled());
        // Detaching a replaced session changes nothing; the current one
        // takes the link down.
        relay.detach(1, "old".into()).await;
        assert!(relay.state().is_up());
        relay.detach(2, "Core closed the stream".into()).await;
        let mut state = relay.subscribe();
        state.wait_for(|s| !s.is_up()).await.unwrap();
        let error = relay
            .request(download(), "x".into(), Duration::ZERO)
            .await
            .unwrap_err();
        assert_eq!(error, RelayError::NoLink("Core closed the stream".into()));
        cancel.cancel();
        task.await.unwrap();
    }
}
