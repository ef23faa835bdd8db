//! Which Core's Link the Edge relays to when several Cores share one
//! database and one of them leads, by a lease whose term only grows. Pure:
//! the Links and what each one's latest Welcome said, the highest term
//! seen; no I/O, no clock.
//!
//! The rules:
//! - the highest term is the highest any Welcome or Reply has carried;
//! - the leader is the Link whose latest Welcome came at the highest term
//!   and said it leads (the first such Link, should two claim one term);
//!   a Welcome at term 0 is a Core from before terms, taken as leading;
//! - requests go only to the leader; with none (a takeover under way, or
//!   only standbys linked) the Edge answers 503 at once;
//! - a Reply counts only from the leader and at the highest term; any
//!   other is dropped and its client gets the same 503.

use std::collections::BTreeMap;

/// What a Link's latest Welcome said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Said {
    pub core_id: String,
    pub term: u64,
    pub leading: bool,
}

impl Said {
    /// Whether it claims to lead at its term (a Core from before terms
    /// always does).
    pub fn claims(&self) -> bool {
        self.leading || self.term == 0
    }
}

/// The Links, by session number, and the highest term seen.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Leaders {
    highest: u64,
    links: BTreeMap<u64, Said>,
}

impl Leaders {
    /// The highest term any Core has sent.
    pub fn highest(&self) -> u64 {
        self.highest
    }

    /// The Links and what each said last.
    pub fn links(&self) -> &BTreeMap<u64, Said> {
        &self.links
    }

    /// A Welcome on Link `session` (its first or a later one). Returns the
    /// other Links of the same Core, which this one replaces: they are
    /// forgotten here and the caller closes them.
    pub fn welcome(&mut self, session: u64, said: Said) -> Vec<u64> {
        self.observe(said.term);
        let replaced: Vec<u64> = self
            .links
            .iter()
            .filter(|(n, s)| **n != session && s.core_id == said.core_id)
            .map(|(n, _)| *n)
            .collect();
        for old in &replaced {
            self.links.remove(old);
        }
        self.links.insert(session, said);
        replaced
    }

    /// Link `session` is gone.
    pub fn remove(&mut self, session: u64) {
        self.links.remove(&session);
    }

    /// A message of term `term` arrived: the highest term grows to it.
    pub fn observe(&mut self, term: u64) {
        self.highest = self.highest.max(term);
    }

    /// The Link requests go to, if any.
    pub fn leader(&self) -> Option<u64> {
        self.links
            .iter()
            .find(|(_, s)| s.term == self.highest && s.claims())
            .map(|(n, _)| *n)
    }

    /// A Reply of term `term` on Link `session`: whether its client gets
    /// it. Call [`Leaders::observe`] with its term first.
    pub fn reply_counts(&self, session: u64, term: u64) -> bool {
        term == self.highest && self.leader() == Some(session)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One event and what the selection must be after it.
    enum Event {
        Welcome(u64, &'static str, u64, bool),
        Remove(u64),
        /// A Reply on a Link at a term: whether it counts.
        Reply(u64, u64, bool),
    }

    fn run(name: &str, steps: &[(Event, Option<u64>, u64)]) {
        let mut leaders = Leaders::default();
        for (i, (event, leader, highest)) in steps.iter().enumerate() {
            match event {
                Welcome(session, core, term, leading) => {
                    leaders.welcome(
                        *session,
                        Said {
                            core_id: (*core).to_owned(),
                            term: *term,
                            leading: *leading,
                        },
                    );
                }
                Remove(session) => leaders.remove(*session),
                Reply(session, term, counts) => {
                    leaders.observe(*term);
                    assert_eq!(
                        leaders.reply_counts(*session, *term),
                        *counts,
                        "{name}, step {i}: the reply"
                    );
                }
            }
            assert_eq!(
                (leaders.leader(), leaders.highest()),
                (*leader, *highest),
                "{name}, step {i}: the leader and the highest term"
            );
        }
    }

    use Event::{Remove, Reply, Welcome};

    #[test]
    fn a_core_from_before_terms_leads() {
        run(
            "old Core",
            &[
                (Welcome(1, "core", 0, false), Some(1), 0),
                (Reply(1, 0, true), Some(1), 0),
                (Remove(1), None, 0),
            ],
        );
    }

    #[test]
    fn requests_follow_the_leader_at_the_highest_term() {
        run(
            "takeover",
            &[
                (Welcome(1, "core-a", 4, true), Some(1), 4),
                (Welcome(2, "core-b", 4, false), Some(1), 4),
                (Reply(1, 4, true), Some(1), 4),
                (Reply(2, 4, false), Some(1), 4),
                // core-b takes over at term 5.
                (Welcome(2, "core-b", 5, true), Some(2), 5),
                // The old leader's late reply does not count.
                (Reply(1, 4, false), Some(2), 5),
                (Reply(2, 5, true), Some(2), 5),
                // core-a comes back as a standby at term 5.
                (Welcome(1, "core-a", 5, false), Some(2), 5),
                (Remove(2), None, 5),
            ],
        );
    }

    #[test]
    fn no_leader_while_a_takeover_is_under_way() {
        run(
            "takeover under way",
            &[
                (Welcome(1, "core-a", 4, true), Some(1), 4),
                // A standby that has seen term 5, led by a Core not linked.
                (Welcome(2, "core-b", 5, false), None, 5),
                (Reply(1, 4, false), None, 5),
                // A stale claim does not bring a leader back.
                (Welcome(1, "core-a", 4, true), None, 5),
                // A Reply at a higher term raises it too.
                (Welcome(3, "core-c", 5, true), Some(3), 5),
                (Reply(2, 6, false), None, 6),
                (Welcome(3, "core-c", 6, true), Some(3), 6),
            ],
        );
    }

    #[test]
    fn a_new_link_of_a_core_replaces_its_old_one() {
        let mut leaders = Leaders::default();
        let said = |core: &str, term, leading| Said {
            core_id: core.to_owned(),
            term,
            leading,
        };
        assert!(leaders.welcome(1, said("core-a", 3, true)).is_empty());
        assert!(leaders.welcome(2, said("core-b", 3, false)).is_empty());
        assert_eq!(leaders.welcome(3, said("core-a", 3, true)), [1]);
        assert_eq!(leaders.leader(), Some(3));
        assert_eq!(leaders.links().keys().copied().collect::<Vec<_>>(), [2, 3]);
        // Two claims at one term: the first Link keeps it.
        assert!(leaders.welcome(4, said("core-c", 3, true)).is_empty());
        assert_eq!(leaders.leader(), Some(3));
    }
}
