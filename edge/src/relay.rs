//! The task that owns the links with Core: the Link streams of every Core
//! (one per Core), which one leads ([`crate::leader`]), the requests in
//! flight and their ids. HTTP handlers hand it requests and wait for the
//! reply; link sessions hand it Core's Welcomes and replies. Requests go
//! only to the Core that leads at the highest term; with none, they are
//! answered 503 at once. Health is published on a watch channel, so
//! `/health` never waits on the task.

use std::{
    collections::HashMap,
    time::{Duration, SystemTime},
};

use prometheus_client::metrics::counter::Counter;
use tidegate_proto::edge::v1::{self as pb, edge_message, request::Kind};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tonic::Status;
use tracing::{debug, info, warn};

use crate::leader::{Leaders, Said};

/// Requests queued towards Core before new ones are refused.
pub const OUTBOUND_QUEUE: usize = 1024;

/// The stream half towards Core.
pub type Outbound = mpsc::Sender<Result<pb::EdgeMessage, Status>>;

/// Whether Core is linked, as `/health` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkState {
    /// At least one Core has a welcomed Link open.
    Up {
        /// The leader's core_id, or the last Core welcomed when none leads.
        core_id: String,
        since: SystemTime,
        /// The Core requests go to; `None` while none leads at `term`.
        leader: Option<String>,
        /// The highest term seen.
        term: u64,
    },
    Down {
        reason: String,
        since: SystemTime,
    },
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
    #[error("No Core leads right now (a takeover is under way); try again in a second.")]
    NoLeader,
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
        said: Said,
        outbound: Outbound,
        cancel: CancellationToken,
    },
    Welcome {
        session: u64,
        said: Said,
    },
    Detach {
        session: u64,
        reason: String,
    },
    Reply {
        session: u64,
        term: u64,
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
    no_leader: Counter,
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

    /// Requests answered 503 because no Core led (counted by the task).
    pub fn no_leader(&self) -> Counter {
        self.no_leader.clone()
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

    /// Adds session `session`, on which Core `said.core_id` sent its first
    /// Welcome; an older session of the same Core is cancelled.
    pub async fn attach(
        &self,
        session: u64,
        said: Said,
        outbound: Outbound,
        cancel: CancellationToken,
    ) {
        let _ = self
            .tx
            .send(Command::Attach {
                session,
                said,
                outbound,
                cancel,
            })
            .await;
    }

    /// A later Welcome on session `session`: the Core's role changed.
    pub async fn welcome(&self, session: u64, said: Said) {
        let _ = self.tx.send(Command::Welcome { session, said }).await;
    }

    /// Session `session` ended; nothing happens if it was replaced already.
    pub async fn detach(&self, session: u64, reason: String) {
        let _ = self.tx.send(Command::Detach { session, reason }).await;
    }

    /// A reply Core sent on session `session`, in a message of term `term`.
    pub async fn reply(&self, session: u64, term: u64, reply: pb::Reply) {
        let _ = self
            .tx
            .send(Command::Reply {
                session,
                term,
                reply,
            })
            .await;
    }
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Attach { .. } => "Attach",
            Self::Welcome { .. } => "Welcome",
            Self::Detach { .. } => "Detach",
            Self::Reply { .. } => "Reply",
            Self::Request { .. } => "Request",
        })
    }
}

/// An open, welcomed Link.
#[derive(Debug)]
struct Link {
    outbound: Outbound,
    cancel: CancellationToken,
}

/// A request waiting for its reply: the session it went down, the waiter.
type Waiter = (u64, oneshot::Sender<Result<pb::Reply, RelayError>>);

/// The relay's state.
#[derive(Debug)]
struct Relay {
    links: HashMap<u64, Link>,
    leaders: Leaders,
    /// The leader as last announced, to log and act on its changes.
    leader: Option<u64>,
    next_id: u64,
    pending: HashMap<u64, Waiter>,
    state: watch::Sender<LinkState>,
    no_leader: Counter,
}

impl Relay {
    fn handle(&mut self, command: Command) {
        match command {
            Command::Attach {
                session,
                said,
                outbound,
                cancel,
            } => {
                info!(session, core_id = %said.core_id, term = said.term, leading = said.leading, "Core linked");
                self.links.insert(session, Link { outbound, cancel });
                let core_id = said.core_id.clone();
                for old in self.leaders.welcome(session, said) {
                    info!(
                        old,
                        new = session,
                        %core_id,
                        "a new Link from the same Core replaces its previous one"
                    );
                    if let Some(link) = self.links.remove(&old) {
                        link.cancel.cancel();
                    }
                    self.fail_session(old, &RelayError::LinkLost);
                }
                self.update(None);
            }
            Command::Welcome { session, said } => {
                if !self.links.contains_key(&session) {
                    return;
                }
                info!(session, core_id = %said.core_id, term = said.term, leading = said.leading, "Core's role changed");
                // A later Welcome keeps the Link's Core; a Core does not
                // rename itself on a Link.
                let core_id = self
                    .leaders
                    .links()
                    .get(&session)
                    .map_or(said.core_id.clone(), |s| s.core_id.clone());
                self.leaders.welcome(session, Said { core_id, ..said });
                self.update(None);
            }
            Command::Detach { session, reason } => {
                if self.links.remove(&session).is_some() {
                    info!(session, %reason, "a Link from Core ended");
                    self.leaders.remove(session);
                    self.fail_session(session, &RelayError::LinkLost);
                    self.update(Some(reason));
                }
            }
            Command::Reply {
                session,
                term,
                reply,
            } => {
                if !self.links.contains_key(&session) {
                    debug!(session, id = reply.id, "a reply on a closed Link; dropped");
                    return;
                }
                self.leaders.observe(term);
                self.update(None);
                let counts = self.leaders.reply_counts(session, term);
                let waiter = match self.pending.entry(reply.id) {
                    std::collections::hash_map::Entry::Occupied(entry)
                        if entry.get().0 == session =>
                    {
                        entry.remove().1
                    }
                    _ => {
                        debug!(
                            session,
                            id = reply.id,
                            "a reply nobody waits for on this Link (timed out, or failed over); dropped"
                        );
                        return;
                    }
                };
                if counts {
                    let _ = waiter.send(Ok(reply));
                } else {
                    warn!(
                        session,
                        id = reply.id,
                        term,
                        highest = self.leaders.highest(),
                        "a reply from a Core that no longer leads; dropped, the client gets 503"
                    );
                    self.no_leader.inc();
                    let _ = waiter.send(Err(RelayError::NoLeader));
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

    /// Follows a change of the Links or the term: a new leader gets the
    /// requests to come, and those in flight on any other Link get 503 (a
    /// Core that lost the lease must not answer them); the published state
    /// follows. `reason`: why a Link ended, for the state when none is left.
    fn update(&mut self, reason: Option<String>) {
        let leader = self.leaders.leader();
        if leader != self.leader {
            let term = self.leaders.highest();
            match leader.and_then(|n| self.leaders.links().get(&n)) {
                Some(said) => {
                    info!(session = leader, core_id = %said.core_id, term, "Core leads: relaying to it")
                }
                None => warn!(term, "no Core leads: answering 503 until one does"),
            }
            let stale: Vec<u64> = self
                .pending
                .iter()
                .filter(|(_, (session, _))| Some(*session) != leader)
                .map(|(id, _)| *id)
                .collect();
            for id in stale {
                if let Some((_, waiter)) = self.pending.remove(&id) {
                    self.no_leader.inc();
                    let _ = waiter.send(Err(RelayError::NoLeader));
                }
            }
            self.leader = leader;
        }
        let now = SystemTime::now();
        let links = self.leaders.links();
        let next = if links.is_empty() {
            if !self.state.borrow().is_up() {
                return;
            }
            warn!("no link to Core is left: answering 503");
            LinkState::Down {
                reason: reason.unwrap_or_else(|| "Core closed the Link".to_owned()),
                since: now,
            }
        } else {
            let leader = leader
                .and_then(|n| links.get(&n))
                .map(|s| s.core_id.clone());
            let core_id = leader.clone().unwrap_or_else(|| {
                links
                    .values()
                    .next_back()
                    .map(|s| s.core_id.clone())
                    .unwrap_or_default()
            });
            let since = match &*self.state.borrow() {
                LinkState::Up { since, .. } => *since,
                LinkState::Down { .. } => now,
            };
            LinkState::Up {
                core_id,
                since,
                leader,
                term: self.leaders.highest(),
            }
        };
        self.state.send_if_modified(|state| {
            if *state == next {
                false
            } else {
                *state = next;
                true
            }
        });
    }

    fn request(
        &mut self,
        kind: Kind,
        client_addr: String,
        wait_ms: u32,
        reply: oneshot::Sender<Result<pb::Reply, RelayError>>,
    ) {
        let Some((session, link)) = self
            .leader
            .and_then(|session| self.links.get(&session).map(|link| (session, link)))
        else {
            let error = match &*self.state.borrow() {
                LinkState::Down { reason, .. } => RelayError::NoLink(reason.clone()),
                LinkState::Up { .. } => {
                    self.no_leader.inc();
                    RelayError::NoLeader
                }
            };
            let _ = reply.send(Err(error));
            return;
        };
        // Waiters that gave up (timed out) leave no entry behind.
        self.pending.retain(|_, (_, waiter)| !waiter.is_closed());
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
                self.pending.insert(id, (session, reply));
            }
            Err(mpsc::error::TrySendError::Full(_)) => {
                let _ = reply.send(Err(RelayError::Busy));
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                let _ = reply.send(Err(RelayError::LinkLost));
            }
        }
    }

    /// Fails the requests in flight on `session`.
    fn fail_session(&mut self, session: u64, error: &RelayError) {
        let ids: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, (s, _))| *s == session)
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            if let Some((_, waiter)) = self.pending.remove(&id) {
                let _ = waiter.send(Err(error.clone()));
            }
        }
    }

    fn fail_pending(&mut self, error: &RelayError) {
        for (_, (_, waiter)) in self.pending.drain() {
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
    let no_leader = Counter::default();
    let mut relay = Relay {
        links: HashMap::new(),
        leaders: Leaders::default(),
        leader: None,
        next_id: 0,
        pending: HashMap::new(),
        state: state_tx,
        no_leader: no_leader.clone(),
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
        for (_, link) in relay.links.drain() {
            link.cancel.cancel();
        }
        relay.fail_pending(&RelayError::Stopped);
    };
    (
        RelayHandle {
            tx,
            state,
            no_leader,
        },
        task,
    )
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

    fn said(core: &str, term: u64, leading: bool) -> Said {
        Said {
            core_id: core.to_owned(),
            term,
            leading,
        }
    }

    /// A request sent from a task of its own.
    fn ask(relay: &RelayHandle) -> tokio::task::JoinHandle<Result<pb::Reply, RelayError>> {
        let relay = relay.clone();
        tokio::spawn(async move { relay.request(download(), "x".into(), Duration::ZERO).await })
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

        // A Core from before terms: term 0, no leading flag; it leads.
        let (out, mut from_edge) = mpsc::channel(8);
        let session = CancellationToken::new();
        relay
            .attach(1, said("core", 0, false), out, session.clone())
            .await;
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
        relay.reply(1, 0, pb::Reply { id, result: None }).await;
        assert_eq!(waiting.await.unwrap().unwrap().id, id);

        // A reply on another session is not taken for this one's.
        let waiting = ask(&relay);
        let id = request_id(from_edge.recv().await.unwrap());
        relay.reply(7, 0, pb::Reply { id, result: None }).await;
        // A new link of the same Core replaces the old: its requests fail,
        // its session ends.
        let (out2, _from_edge2) = mpsc::channel(8);
        relay
            .attach(2, said("core", 0, false), out2, CancellationToken::new())
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

    #[tokio::test]
    async fn requests_go_to_the_leader_only_and_a_takeover_is_a_clear_503() {
        let cancel = CancellationToken::new();
        let (relay, task) = spawn(cancel.clone());
        let task = tokio::spawn(task);
        // Only a standby: up (healthy), but nobody to ask.
        let (out_b, mut to_b) = mpsc::channel(8);
        relay
            .attach(1, said("core-b", 4, false), out_b, CancellationToken::new())
            .await;
        assert_eq!(
            ask(&relay).await.unwrap().unwrap_err(),
            RelayError::NoLeader
        );
        assert!(relay.state().is_up());
        assert_eq!(relay.no_leader().get(), 1);

        // core-a leads at term 4: requests go to it, not to core-b.
        let (out_a, mut to_a) = mpsc::channel(8);
        relay
            .attach(2, said("core-a", 4, true), out_a, CancellationToken::new())
            .await;
        let waiting = ask(&relay);
        let id = request_id(to_a.recv().await.unwrap());
        assert!(to_b.try_recv().is_err(), "a standby got a request");
        relay.reply(2, 4, pb::Reply { id, result: None }).await;
        assert_eq!(waiting.await.unwrap().unwrap().id, id);
        let LinkState::Up { leader, term, .. } = relay.state() else {
            panic!("down")
        };
        assert_eq!((leader.as_deref(), term), (Some("core-a"), 4));

        // A request in flight on core-a when core-b takes over at term 5:
        // its client gets 503 at once; core-a's late reply is dropped.
        let waiting = ask(&relay);
        let stale = request_id(to_a.recv().await.unwrap());
        relay.welcome(1, said("core-b", 5, true)).await;
        assert_eq!(waiting.await.unwrap().unwrap_err(), RelayError::NoLeader);
        relay
            .reply(
                2,
                4,
                pb::Reply {
                    id: stale,
                    result: None,
                },
            )
            .await;
        let waiting = ask(&relay);
        let id = request_id(to_b.recv().await.unwrap());
        relay.reply(1, 5, pb::Reply { id, result: None }).await;
        assert_eq!(waiting.await.unwrap().unwrap().id, id);

        // A reply at a lower term than the highest seen is refused even
        // from the leader's Link: a standby has seen term 6 already.
        let waiting = ask(&relay);
        let id = request_id(to_b.recv().await.unwrap());
        relay.welcome(2, said("core-a", 6, false)).await;
        assert_eq!(waiting.await.unwrap().unwrap_err(), RelayError::NoLeader);
        relay.reply(1, 5, pb::Reply { id, result: None }).await;
        assert_eq!(
            ask(&relay).await.unwrap().unwrap_err(),
            RelayError::NoLeader
        );
        assert_eq!(relay.no_leader().get(), 4);

        // The leader's Link closing with a request in flight: 503, Link lost.
        relay.welcome(1, said("core-b", 6, true)).await;
        let waiting = ask(&relay);
        let _ = request_id(to_b.recv().await.unwrap());
        relay.detach(1, "Core closed the Link".into()).await;
        assert_eq!(waiting.await.unwrap().unwrap_err(), RelayError::LinkLost);
        assert!(relay.state().is_up(), "core-a is still linked");
        cancel.cancel();
        task.await.unwrap();
    }
}
