//! The Link sessions of every Core and the term fence they share: which
//! sessions are open and for which Core, what each one's latest CoreHello
//! said, and the fence's decision on each message.
//!
//! One owner, one lock: a `std::sync::Mutex` around the sessions and the
//! [`Fence`], taken for a few map operations and never across an await
//! (no lock is held while a message is read, a reply is awaited or a
//! status is sent). Why a lock and not a task or a watched snapshot: the
//! decision and the hand-over of what it allows must happen as one step.
//! A session that wants to apply first reserves a place in the WireGuard
//! (or HA) task's queue, outside the lock (that may wait); then, under the
//! lock, the fence decides and, when it accepts, the session fills its
//! place (which never waits). The task applies in queue order, so in the
//! order the fence decided: once a message of term 6 has been seen, no
//! message of term 5 can be accepted, and every message of term 5 accepted
//! before it is already in the queue ahead of whatever term 6 sends. A
//! snapshot read outside the lock could be stale by the time the apply is
//! queued; a task owning the fence would have to own the enqueue too,
//! which is this lock with a channel in front.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::SystemTime,
};

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::fence::{Fence, Kind, Refusal, Said, Verdict};

/// Link sessions kept at once; beyond, the oldest that does not lead goes.
pub const MAX_SESSIONS: usize = 8;

/// The sessions and the fence, shared by every session of the server and
/// read by the control socket.
#[derive(Debug, Clone, Default)]
pub struct CoreLinks {
    inner: Arc<Mutex<Inner>>,
}

#[derive(Debug, Default)]
struct Inner {
    fence: Fence,
    sessions: BTreeMap<u64, Session>,
    next: u64,
}

/// One open Link.
#[derive(Debug)]
struct Session {
    /// The Core it is from: `None` until its first message settles it (a
    /// CoreHello names it; anything else makes it `""`, a Core from before
    /// terms).
    core_id: Option<String>,
    said: Option<Said>,
    /// The term of its latest message.
    term: u64,
    since: SystemTime,
    cancel: CancellationToken,
}

/// What `tidectl status` shows of Core's links.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CoreLinksStatus {
    /// The highest term any Core has sent.
    pub highest_term: u64,
    /// The Core that said it leads at it.
    pub leader: Option<String>,
    /// Each open Link, oldest first.
    pub links: Vec<CoreLinkStatus>,
}

/// One open Link.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CoreLinkStatus {
    /// Empty: a Core that has sent no CoreHello (yet, or ever: one from
    /// before terms).
    pub core_id: String,
    /// The term of its latest message.
    pub term: u64,
    /// It may change the gateway now.
    pub leading: bool,
    pub since_unix_s: u64,
}

impl CoreLinks {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers a new Link; returns its number. Over [`MAX_SESSIONS`],
    /// the oldest session that does not lead is cancelled (the oldest of
    /// all if every one leads).
    pub fn open(&self, cancel: CancellationToken) -> u64 {
        let mut inner = self.lock();
        inner.next += 1;
        let number = inner.next;
        if inner.sessions.len() >= MAX_SESSIONS {
            let fence = &inner.fence;
            let victim = inner
                .sessions
                .iter()
                .find(|(_, s)| !s.leads(fence))
                .or_else(|| inner.sessions.iter().next())
                .map(|(n, _)| *n);
            if let Some(victim) = victim
                && let Some(old) = inner.sessions.remove(&victim)
            {
                warn!(
                    session = victim,
                    core_id = old.core_id.as_deref().unwrap_or("(not named yet)"),
                    limit = MAX_SESSIONS,
                    "too many Links from Core: closing the oldest that does not lead"
                );
                old.cancel.cancel();
            }
        }
        inner.sessions.insert(
            number,
            Session {
                core_id: None,
                said: None,
                term: 0,
                since: SystemTime::now(),
                cancel,
            },
        );
        number
    }

    /// Session `number` ended.
    pub fn close(&self, number: u64) {
        self.lock().sessions.remove(&number);
    }

    /// Steps the fence with one message of session `number`, and when it
    /// is accepted, runs `accepted` under the same lock (it must not
    /// block: it fills a reserved queue place). A CoreHello settles the
    /// session's Core (`hello` is its core_id); the first other message
    /// settles it as `""`. Settling cancels that Core's earlier session.
    pub fn decide<R>(
        &self,
        number: u64,
        term: u64,
        kind: Kind,
        hello: Option<&str>,
        accepted: impl FnOnce() -> R,
    ) -> Result<R, Refusal> {
        let mut inner = self.lock();
        let Inner {
            fence, sessions, ..
        } = &mut *inner;
        let Some(session) = sessions.get_mut(&number) else {
            // Replaced while this message was read: nothing it says counts.
            return Err(Refusal::Replaced {
                core: hello.unwrap_or_default().to_owned(),
            });
        };
        session.term = term;
        let settled = match (hello, &session.core_id) {
            (Some(named), Some(known)) if named == known => None,
            (Some(named), known) => {
                if let Some(known) = known {
                    warn!(session = number, from = %known, to = %named, "a Core renamed itself on its Link");
                }
                Some(named.to_owned())
            }
            (None, None) => Some(String::new()),
            (None, Some(_)) => None,
        };
        if let Some(core_id) = &settled {
            session.core_id = Some(core_id.clone());
        }
        let core_id = session.core_id.clone().unwrap_or_default();
        let said = session.said;
        if let Some(core_id) = settled {
            let replaced: Vec<u64> = sessions
                .iter()
                .filter(|(n, s)| **n != number && s.core_id.as_deref() == Some(core_id.as_str()))
                .map(|(n, _)| *n)
                .collect();
            for old in replaced {
                if let Some(old_session) = sessions.remove(&old) {
                    info!(
                        old,
                        new = number,
                        %core_id,
                        "a new Link from the same Core replaces its previous one"
                    );
                    old_session.cancel.cancel();
                }
            }
        }
        let verdict = fence.step(&core_id, said, term, kind);
        if let Kind::Hello { leading } = kind
            && let Some(session) = sessions.get_mut(&number)
        {
            // Recorded even when refused: a later message at the highest
            // term still needs the leader's word.
            session.said = Some(Said { term, leading });
        }
        match verdict {
            Verdict::Accept => Ok(accepted()),
            Verdict::Refuse(refusal) => Err(refusal),
        }
    }

    /// The sessions and the fence, for `tidectl status`.
    pub fn status(&self) -> CoreLinksStatus {
        let inner = self.lock();
        CoreLinksStatus {
            highest_term: inner.fence.highest(),
            leader: inner.fence.leader().map(str::to_owned),
            links: inner
                .sessions
                .values()
                .map(|s| CoreLinkStatus {
                    core_id: s.core_id.clone().unwrap_or_default(),
                    term: s.term,
                    leading: s.leads(&inner.fence),
                    since_unix_s: s
                        .since
                        .duration_since(SystemTime::UNIX_EPOCH)
                        .map_or(0, |d| d.as_secs()),
                })
                .collect(),
        }
    }
}

impl Session {
    /// Whether its next state-changing message would be accepted. A
    /// session not yet settled counts as not leading.
    fn leads(&self, fence: &Fence) -> bool {
        self.core_id
            .as_deref()
            .is_some_and(|core| fence.leads(core, self.said, fence.highest()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEAD: Kind = Kind::Hello { leading: true };
    const STANDBY: Kind = Kind::Hello { leading: false };

    #[test]
    fn one_session_per_core_and_the_fence_across_them() {
        let links = CoreLinks::default();
        let a1 = CancellationToken::new();
        let a = links.open(a1.clone());
        let b = links.open(CancellationToken::new());
        links.decide(a, 4, LEAD, Some("core-a"), || ()).unwrap();
        links.decide(b, 4, STANDBY, Some("core-b"), || ()).unwrap();
        assert!(links.decide(a, 4, Kind::Config, None, || 1).is_ok());
        let refused = links.decide(b, 4, Kind::Config, None, || 1).unwrap_err();
        assert!(refused.to_string().contains("led by core-a"), "{refused}");
        let status = links.status();
        assert_eq!(
            (status.highest_term, status.leader.as_deref()),
            (4, Some("core-a"))
        );
        let leading: Vec<_> = status
            .links
            .iter()
            .map(|l| (l.core_id.as_str(), l.leading))
            .collect();
        assert_eq!(leading, [("core-a", true), ("core-b", false)]);

        // A new Link from core-a: nothing happens until it names itself;
        // then the old one is cancelled and its messages no longer count.
        let a2 = links.open(CancellationToken::new());
        assert!(!a1.is_cancelled());
        links.decide(a2, 4, LEAD, Some("core-a"), || ()).unwrap();
        assert!(a1.is_cancelled());
        assert!(links.decide(a, 4, Kind::Config, None, || 1).is_err());
        assert!(links.decide(a2, 4, Kind::Config, None, || 1).is_ok());
        // core-b takes over at term 5.
        links.decide(b, 5, LEAD, Some("core-b"), || ()).unwrap();
        let refused = links.decide(a2, 4, Kind::Config, None, || 1).unwrap_err();
        assert_eq!(
            refused.to_string(),
            "Core core-a's term 4 is older than term 5 (led by core-b)"
        );
        assert_eq!(links.decide(b, 5, Kind::Config, None, || 7), Ok(7));
        links.close(b);
        assert_eq!(links.status().links.len(), 1);
    }

    #[test]
    fn a_core_from_before_terms_is_one_session_and_leads() {
        let links = CoreLinks::default();
        let first = CancellationToken::new();
        let old = links.open(first.clone());
        assert_eq!(links.decide(old, 0, Kind::Config, None, || 1), Ok(1));
        let again = links.open(CancellationToken::new());
        assert_eq!(links.decide(again, 0, Kind::Config, None, || 2), Ok(2));
        assert!(first.is_cancelled());
        let status = links.status();
        assert_eq!(status.links.len(), 1);
        assert!(status.links[0].leading && status.links[0].core_id.is_empty());
    }

    #[test]
    fn the_number_of_sessions_is_bounded_and_the_leader_stays() {
        let links = CoreLinks::default();
        let tokens: Vec<CancellationToken> = (0..MAX_SESSIONS)
            .map(|_| CancellationToken::new())
            .collect();
        let numbers: Vec<u64> = tokens.iter().map(|t| links.open(t.clone())).collect();
        links
            .decide(numbers[0], 3, LEAD, Some("core-a"), || ())
            .unwrap();
        for (i, n) in numbers.iter().enumerate().skip(1) {
            links
                .decide(*n, 3, STANDBY, Some(&format!("core-{i}")), || ())
                .unwrap();
        }
        links.open(CancellationToken::new());
        assert!(!tokens[0].is_cancelled(), "the leader was closed");
        assert!(tokens[1].is_cancelled(), "the oldest standby stays");
        assert_eq!(links.status().links.len(), MAX_SESSIONS);
    }
}
