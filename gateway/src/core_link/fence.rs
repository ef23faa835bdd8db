//! The term fence: which Core's messages the gateway acts on when several
//! Cores share one database and one of them leads, by a lease whose term
//! only grows. Pure: the highest term seen and the Core that said it leads
//! at it, stepped by each message; no I/O, no clock.
//!
//! The rules, for a message of term `t` from Core `c` (`""`: a stream that
//! has not named its Core, as a Core from before terms never does):
//! - every message raises the highest term to `t` if `t` is higher; a
//!   higher term forgets the leader until a CoreHello says who leads at it;
//! - a message of a term lower than the highest is refused;
//! - a CoreHello at the highest term with `leading` makes `c` the leader
//!   at it (a second Core claiming the same term is refused: the first
//!   keeps it); one without `leading` from the leader makes it step down;
//! - a state-changing message (LocationConfig, PeerChanges,
//!   FailoverRequest, RemovalsAcked) is accepted only when `t` is the
//!   highest term, `c`'s stream's latest CoreHello said it leads at `t`,
//!   and `c` is the leader at `t`; or when the stream never sent a
//!   CoreHello and `t` is 0 (a Core from before terms, taken as leading).

use serde::{Deserialize, Serialize};

/// What a stream's latest CoreHello said.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Said {
    /// The term the CoreHello came with.
    pub term: u64,
    pub leading: bool,
}

/// A message from Core, as the fence sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Hello {
        leading: bool,
    },
    Config,
    Changes,
    Failover,
    RemovalsAcked,
    /// A message with nothing in it: it only raises the term.
    Empty,
}

impl Kind {
    /// Whether the message changes the gateway (and so needs the leader).
    pub fn changes_state(self) -> bool {
        matches!(
            self,
            Self::Config | Self::Changes | Self::Failover | Self::RemovalsAcked
        )
    }
}

/// Why the fence refused a message: the text is what Core reads in
/// `Applied.error` or `FailoverResult.error`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("{}'s term {term} is older than term {highest} ({})", who(core), led(leader.as_deref()))]
    Stale {
        core: String,
        term: u64,
        highest: u64,
        leader: Option<String>,
    },
    #[error("{} does not lead at term {term} ({}); the gateway takes changes only from the leader", who(core), led(leader.as_deref()))]
    NotLeading {
        core: String,
        term: u64,
        leader: Option<String>,
    },
    #[error(
        "{} sent term {term} without a CoreHello saying it leads; the gateway takes changes only from the leader",
        who(core)
    )]
    NoHello { core: String, term: u64 },
    #[error(
        "this Link of {} was replaced by a newer one of the same Core",
        who(core)
    )]
    Replaced { core: String },
    #[error(
        "{} claims to lead at term {term}, which {leader} already leads; the first claim stands",
        who(core)
    )]
    Conflict {
        core: String,
        term: u64,
        leader: String,
    },
}

/// "Core core-a", or what stands for a Core that gave no name.
fn who(core: &str) -> String {
    if core.is_empty() {
        "a Core that sent no CoreHello".to_owned()
    } else {
        format!("Core {core}")
    }
}

/// Who leads, in words.
fn led(leader: Option<&str>) -> String {
    match leader {
        Some("") => "led by a Core that sent no CoreHello".to_owned(),
        Some(leader) => format!("led by {leader}"),
        None => "no Core has said it leads at it yet".to_owned(),
    }
}

/// The decision on one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Accept,
    Refuse(Refusal),
}

/// The highest term seen and who leads at it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fence {
    highest: u64,
    leader: Option<String>,
}

impl Fence {
    /// The highest term any Core has sent.
    pub fn highest(&self) -> u64 {
        self.highest
    }

    /// The Core whose CoreHello said it leads at the highest term, if any.
    pub fn leader(&self) -> Option<&str> {
        self.leader.as_deref()
    }

    /// Whether a stream of Core `core` whose latest CoreHello is `said`
    /// (none: never sent one) may change the gateway at term `term` now.
    pub fn leads(&self, core: &str, said: Option<Said>, term: u64) -> bool {
        if term != self.highest {
            return false;
        }
        match said {
            None => term == 0,
            Some(said) => said.leading && said.term == term && self.leader.as_deref() == Some(core),
        }
    }

    /// Steps the fence with one message of term `term` from Core `core`,
    /// whose stream's latest CoreHello before this message is `said`.
    pub fn step(&mut self, core: &str, said: Option<Said>, term: u64, kind: Kind) -> Verdict {
        if term > self.highest {
            self.highest = term;
            self.leader = None;
        }
        if term < self.highest {
            return Verdict::Refuse(Refusal::Stale {
                core: core.to_owned(),
                term,
                highest: self.highest,
                leader: self.leader.clone(),
            });
        }
        match kind {
            Kind::Hello { leading: true } => match &self.leader {
                Some(leader) if leader != core => Verdict::Refuse(Refusal::Conflict {
                    core: core.to_owned(),
                    term,
                    leader: leader.clone(),
                }),
                _ => {
                    self.leader = Some(core.to_owned());
                    Verdict::Accept
                }
            },
            Kind::Hello { leading: false } => {
                if self.leader.as_deref() == Some(core) {
                    self.leader = None;
                }
                Verdict::Accept
            }
            Kind::Empty => Verdict::Accept,
            Kind::Config | Kind::Changes | Kind::Failover | Kind::RemovalsAcked => {
                if self.leads(core, said, term) {
                    Verdict::Accept
                } else if said.is_none() {
                    Verdict::Refuse(Refusal::NoHello {
                        core: core.to_owned(),
                        term,
                    })
                } else {
                    Verdict::Refuse(Refusal::NotLeading {
                        core: core.to_owned(),
                        term,
                        leader: self.leader.clone(),
                    })
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One message and what the fence must make of it.
    struct Step {
        core: &'static str,
        /// The stream's latest CoreHello before this message.
        said: Option<(u64, bool)>,
        term: u64,
        kind: Kind,
        /// `None`: accepted; otherwise the refusal's text.
        refused: Option<&'static str>,
        /// The highest term and the leader after it.
        after: (u64, Option<&'static str>),
    }

    const fn step(
        core: &'static str,
        said: Option<(u64, bool)>,
        term: u64,
        kind: Kind,
        refused: Option<&'static str>,
        after: (u64, Option<&'static str>),
    ) -> Step {
        Step {
            core,
            said,
            term,
            kind,
            refused,
            after,
        }
    }

    const LEAD: Kind = Kind::Hello { leading: true };
    const STANDBY: Kind = Kind::Hello { leading: false };

    fn run(name: &str, steps: &[Step]) {
        let mut fence = Fence::default();
        for (i, s) in steps.iter().enumerate() {
            let said = s.said.map(|(term, leading)| Said { term, leading });
            let verdict = fence.step(s.core, said, s.term, s.kind);
            let got = match &verdict {
                Verdict::Accept => None,
                Verdict::Refuse(refusal) => Some(refusal.to_string()),
            };
            assert_eq!(
                got.as_deref(),
                s.refused,
                "{name}, step {i}: {} term {} {:?}",
                s.core,
                s.term,
                s.kind
            );
            assert_eq!(
                (fence.highest(), fence.leader()),
                s.after,
                "{name}, step {i}: the fence after it"
            );
        }
    }

    #[test]
    fn a_core_from_before_terms_leads_at_term_0() {
        run(
            "old Core",
            &[
                step("", None, 0, Kind::Config, None, (0, None)),
                step("", None, 0, Kind::Changes, None, (0, None)),
                step("", None, 0, Kind::Failover, None, (0, None)),
                step("", None, 0, Kind::RemovalsAcked, None, (0, None)),
                // A Core with terms comes: the old one is fenced off.
                step("core-a", None, 3, LEAD, None, (3, Some("core-a"))),
                step(
                    "",
                    None,
                    0,
                    Kind::Config,
                    Some(
                        "a Core that sent no CoreHello's term 0 is older than term 3 (led by core-a)",
                    ),
                    (3, Some("core-a")),
                ),
            ],
        );
    }

    #[test]
    fn only_the_leader_at_the_highest_term_changes_the_gateway() {
        run(
            "two Cores",
            &[
                step("core-a", None, 4, LEAD, None, (4, Some("core-a"))),
                step("core-b", None, 4, STANDBY, None, (4, Some("core-a"))),
                step(
                    "core-a",
                    Some((4, true)),
                    4,
                    Kind::Config,
                    None,
                    (4, Some("core-a")),
                ),
                step(
                    "core-b",
                    Some((4, false)),
                    4,
                    Kind::Config,
                    Some(
                        "Core core-b does not lead at term 4 (led by core-a); the gateway takes changes only from the leader",
                    ),
                    (4, Some("core-a")),
                ),
                step(
                    "core-b",
                    Some((4, false)),
                    4,
                    Kind::RemovalsAcked,
                    Some(
                        "Core core-b does not lead at term 4 (led by core-a); the gateway takes changes only from the leader",
                    ),
                    (4, Some("core-a")),
                ),
                // core-b takes over at term 5: core-a is fenced off.
                step(
                    "core-b",
                    Some((4, false)),
                    5,
                    LEAD,
                    None,
                    (5, Some("core-b")),
                ),
                step(
                    "core-a",
                    Some((4, true)),
                    4,
                    Kind::Config,
                    Some("Core core-a's term 4 is older than term 5 (led by core-b)"),
                    (5, Some("core-b")),
                ),
                step(
                    "core-a",
                    Some((4, true)),
                    4,
                    Kind::Failover,
                    Some("Core core-a's term 4 is older than term 5 (led by core-b)"),
                    (5, Some("core-b")),
                ),
                step(
                    "core-b",
                    Some((5, true)),
                    5,
                    Kind::Changes,
                    None,
                    (5, Some("core-b")),
                ),
                step(
                    "core-b",
                    Some((5, true)),
                    5,
                    Kind::Failover,
                    None,
                    (5, Some("core-b")),
                ),
                // A stale CoreHello changes nothing.
                step(
                    "core-a",
                    Some((4, true)),
                    4,
                    LEAD,
                    Some("Core core-a's term 4 is older than term 5 (led by core-b)"),
                    (5, Some("core-b")),
                ),
            ],
        );
    }

    #[test]
    fn a_higher_term_fences_even_before_its_leader_is_known() {
        run(
            "takeover under way",
            &[
                step("core-a", None, 4, LEAD, None, (4, Some("core-a"))),
                // A standby has seen term 5 (its Core lost the lease to
                // core-c, not linked here yet).
                step("core-b", None, 5, STANDBY, None, (5, None)),
                step(
                    "core-a",
                    Some((4, true)),
                    4,
                    Kind::Config,
                    Some(
                        "Core core-a's term 4 is older than term 5 (no Core has said it leads at it yet)",
                    ),
                    (5, None),
                ),
                // Any message raises the term, not only a CoreHello.
                step(
                    "core-a",
                    Some((4, true)),
                    6,
                    Kind::Config,
                    Some(
                        "Core core-a does not lead at term 6 (no Core has said it leads at it yet); the gateway takes changes only from the leader",
                    ),
                    (6, None),
                ),
                step("core-c", None, 6, LEAD, None, (6, Some("core-c"))),
                step(
                    "core-c",
                    Some((6, true)),
                    6,
                    Kind::Config,
                    None,
                    (6, Some("core-c")),
                ),
            ],
        );
    }

    #[test]
    fn claims_step_downs_and_missing_hellos() {
        run(
            "claims",
            &[
                step("core-a", None, 7, LEAD, None, (7, Some("core-a"))),
                step(
                    "core-b",
                    None,
                    7,
                    LEAD,
                    Some(
                        "Core core-b claims to lead at term 7, which core-a already leads; the first claim stands",
                    ),
                    (7, Some("core-a")),
                ),
                // Its CoreHello was refused, but the stream said it leads:
                // still not the leader.
                step(
                    "core-b",
                    Some((7, true)),
                    7,
                    Kind::Config,
                    Some(
                        "Core core-b does not lead at term 7 (led by core-a); the gateway takes changes only from the leader",
                    ),
                    (7, Some("core-a")),
                ),
                // The leader steps down at its term; nobody leads then.
                step("core-a", Some((7, true)), 7, STANDBY, None, (7, None)),
                step(
                    "core-a",
                    Some((7, false)),
                    7,
                    Kind::Config,
                    Some(
                        "Core core-a does not lead at term 7 (no Core has said it leads at it yet); the gateway takes changes only from the leader",
                    ),
                    (7, None),
                ),
                // A stream that named no Core, above term 0.
                step(
                    "",
                    None,
                    7,
                    Kind::Config,
                    Some(
                        "a Core that sent no CoreHello sent term 7 without a CoreHello saying it leads; the gateway takes changes only from the leader",
                    ),
                    (7, None),
                ),
                // A CoreHello that said it leads at another term does not
                // count for this one.
                step(
                    "core-a",
                    Some((6, true)),
                    7,
                    LEAD,
                    None,
                    (7, Some("core-a")),
                ),
                step(
                    "core-a",
                    Some((6, true)),
                    7,
                    Kind::Config,
                    Some(
                        "Core core-a does not lead at term 7 (led by core-a); the gateway takes changes only from the leader",
                    ),
                    (7, Some("core-a")),
                ),
                step(
                    "core-a",
                    Some((7, true)),
                    7,
                    Kind::Config,
                    None,
                    (7, Some("core-a")),
                ),
                // An empty message only raises the term.
                step("core-b", Some((7, true)), 8, Kind::Empty, None, (8, None)),
            ],
        );
    }

    #[test]
    fn leads_is_what_step_accepts() {
        let mut fence = Fence::default();
        assert!(fence.leads("", None, 0));
        assert!(!fence.leads(
            "core-a",
            Some(Said {
                term: 0,
                leading: false
            }),
            0
        ));
        assert_eq!(fence.step("core-a", None, 2, LEAD), Verdict::Accept);
        let said = Some(Said {
            term: 2,
            leading: true,
        });
        assert!(fence.leads("core-a", said, 2));
        assert!(!fence.leads("core-b", said, 2));
        assert!(!fence.leads("core-a", said, 1));
        assert!(!fence.leads("", None, 0));
    }
}
