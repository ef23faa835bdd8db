//! The leader lease as a pure state machine: [`Machine::step`] takes what
//! happened (a tick of the clock, the answer to a lease query) and says
//! what to do (run a query, publish a new [`Leadership`]).
//!
//! The lease is one row in the database: a term, its holder and when it
//! expires by the database's clock. A standby asks for it every
//! `poll`; the database grants it only once it has expired (or to the Core
//! that already holds it), with the term raised by one. The leader renews
//! it every `renew`. It counts its lease from the moment it *sent* the
//! query that granted or renewed it, on its own monotonic clock: the
//! database set the expiry later than that, so the leader's view always
//! ends first, and it stops leading at that moment even when the renewal
//! it waits for never comes back.

use std::time::{Duration, Instant};

use super::Leadership;

/// How long a lease lasts and how often it is asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// A lease granted or renewed lasts this long.
    pub lease: Duration,
    /// The leader renews this often.
    pub renew: Duration,
    /// A standby asks for the lease this often.
    pub poll: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            lease: Duration::from_millis(600),
            renew: Duration::from_millis(150),
            poll: Duration::from_millis(100),
        }
    }
}

/// What the lease query found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// This Core holds the lease at `term`, until `lease` after it sent
    /// the query.
    Held { term: u64 },
    /// Another Core holds it (or held it last) at `term`.
    Other { holder: String, term: u64 },
    /// The query failed or did not come back in time.
    Failed(String),
}

/// An input to the machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// Time passed.
    Tick,
    /// The answer to the query sent at `sent`.
    Answered { answer: Answer, sent: Instant },
}

/// What the machine asks of its runner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Ask for the lease, or renew it at `term`: `Some(term)`.
    Query { renew: Option<u64> },
    /// This Core's leadership changed: publish it.
    Publish(Leadership),
}

/// The lease, as this Core sees it.
#[derive(Debug)]
pub struct Machine {
    core_id: String,
    timing: Timing,
    /// `Some((term, until))` while leading.
    lease: Option<(u64, Instant)>,
    /// The highest term heard of.
    term: u64,
    /// Who holds the lease, as last heard (`None`: unknown).
    holder: Option<String>,
    /// What is wrong, in words; empty when all is well.
    problem: String,
    /// A query is out and not answered.
    asking: bool,
    /// When to send the next query.
    next_query: Instant,
    /// What was last published.
    published: Leadership,
}

impl Machine {
    pub fn new(core_id: &str, timing: Timing, now: Instant) -> Self {
        Self {
            core_id: core_id.to_owned(),
            timing,
            lease: None,
            term: 0,
            holder: None,
            problem: Leadership::starting().problem,
            asking: false,
            next_query: now,
            published: Leadership::starting(),
        }
    }

    /// What this Core last published.
    pub fn leadership(&self) -> &Leadership {
        &self.published
    }

    /// When the machine next needs an [`Input::Tick`]: the next query, or
    /// the lease's end; `None` while it only waits for an answer.
    pub fn next_wake(&self) -> Option<Instant> {
        let query = (!self.asking).then_some(self.next_query);
        let expiry = self.lease.map(|(_, until)| until);
        [query, expiry].into_iter().flatten().min()
    }

    pub fn step(&mut self, input: Input, now: Instant) -> Vec<Effect> {
        let mut effects = Vec::new();
        if let Input::Answered { answer, sent } = input {
            self.asking = false;
            self.answered(answer, sent, now);
        }
        if let Some((term, until)) = self.lease
            && now >= until
        {
            self.lease = None;
            self.holder = None;
            self.problem = format!(
                "the lease at term {term} ran out: no renewal answered within {:?}",
                self.timing.lease
            );
        }
        if !self.asking && now >= self.next_query {
            self.asking = true;
            effects.push(Effect::Query {
                renew: self.lease.map(|(term, _)| term),
            });
        }
        let current = self.current();
        if current != self.published {
            self.published = current.clone();
            effects.push(Effect::Publish(current));
        }
        effects
    }

    fn answered(&mut self, answer: Answer, sent: Instant, now: Instant) {
        match answer {
            Answer::Held { term } => {
                let until = sent + self.timing.lease;
                self.term = self.term.max(term);
                self.problem.clear();
                if until > now {
                    self.lease = Some((term, until));
                    self.holder = Some(self.core_id.clone());
                    self.next_query = sent + self.timing.renew;
                } else {
                    // Granted, but the answer came too late to lead on it:
                    // ask again at once.
                    self.lease = None;
                    self.holder = None;
                    self.next_query = now;
                }
            }
            Answer::Other { holder, term } => {
                self.lease = None;
                self.term = self.term.max(term);
                self.holder = Some(holder);
                self.problem.clear();
                self.next_query = now + self.timing.poll;
            }
            Answer::Failed(problem) => {
                // A leader tries again soon; its lease runs out on its own.
                let retry = if self.lease.is_some() {
                    self.timing.renew / 2
                } else {
                    self.timing.poll
                };
                self.next_query = now + retry;
                self.problem = problem;
            }
        }
    }

    /// The leadership as it stands: leading exactly while the lease holds.
    fn current(&self) -> Leadership {
        Leadership {
            term: self.term,
            leading: self.lease.is_some(),
            leader: self.holder.clone(),
            problem: self.problem.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One step: at `ms` after the start, this input, these effects.
    type Row = (u64, Input, Vec<Effect>);

    fn tick() -> Input {
        Input::Tick
    }

    fn answered(answer: Answer, sent_ms: u64, start: Instant) -> Input {
        Input::Answered {
            answer,
            sent: start + Duration::from_millis(sent_ms),
        }
    }

    fn leading(term: u64) -> Effect {
        Effect::Publish(Leadership {
            term,
            leading: true,
            leader: Some("core-a".into()),
            problem: String::new(),
        })
    }

    fn standby(term: u64, leader: Option<&str>, problem: &str) -> Effect {
        Effect::Publish(Leadership {
            term,
            leading: false,
            leader: leader.map(str::to_owned),
            problem: problem.into(),
        })
    }

    fn ask() -> Effect {
        Effect::Query { renew: None }
    }

    fn renew(term: u64) -> Effect {
        Effect::Query { renew: Some(term) }
    }

    fn run(name: &str, rows: impl FnOnce(Instant) -> Vec<Row>) {
        let start = Instant::now();
        let mut machine = Machine::new("core-a", Timing::default(), start);
        for (i, (ms, input, want)) in rows(start).into_iter().enumerate() {
            let now = start + Duration::from_millis(ms);
            let got = machine.step(input.clone(), now);
            assert_eq!(got, want, "{name}: row {i} at {ms} ms, {input:?}");
        }
    }

    #[test]
    fn the_lease_is_led_renewed_and_lost_as_the_database_and_the_clock_say() {
        let ran_out = "the lease at term 3 ran out: no renewal answered within 600ms";
        run("granted, renewed, then the renewals stop", |s| {
            vec![
                (0, tick(), vec![ask()]),
                (
                    4,
                    answered(Answer::Held { term: 3 }, 0, s),
                    vec![leading(3)],
                ),
                (100, tick(), vec![]),
                (150, tick(), vec![renew(3)]),
                // The lease now counts from the renewal's sending.
                (160, answered(Answer::Held { term: 3 }, 150, s), vec![]),
                (300, tick(), vec![renew(3)]),
                // No answer: the lease ends 600 ms after the last renewal
                // was sent, with the query still out.
                (749, tick(), vec![]),
                (750, tick(), vec![standby(3, None, ran_out)]),
                (760, tick(), vec![]),
            ]
        });
        run("a standby polls, sees the leader, then takes over", |s| {
            vec![
                (0, tick(), vec![ask()]),
                (
                    3,
                    answered(
                        Answer::Other {
                            holder: "core-b".into(),
                            term: 7,
                        },
                        0,
                        s,
                    ),
                    vec![standby(7, Some("core-b"), "")],
                ),
                (50, tick(), vec![]),
                (103, tick(), vec![ask()]),
                (
                    105,
                    answered(Answer::Held { term: 8 }, 103, s),
                    vec![leading(8)],
                ),
                (253, tick(), vec![renew(8)]),
            ]
        });
        run("a renewal finds another holder: step down at once", |s| {
            vec![
                (0, tick(), vec![ask()]),
                (
                    1,
                    answered(Answer::Held { term: 3 }, 0, s),
                    vec![leading(3)],
                ),
                (150, tick(), vec![renew(3)]),
                (
                    151,
                    answered(
                        Answer::Other {
                            holder: "core-b".into(),
                            term: 4,
                        },
                        150,
                        s,
                    ),
                    vec![standby(4, Some("core-b"), "")],
                ),
                (251, tick(), vec![ask()]),
            ]
        });
        run(
            "failures: a standby retries after poll, a leader sooner",
            |s| {
                vec![
                    (0, tick(), vec![ask()]),
                    (
                        5,
                        answered(Answer::Failed("connection refused".into()), 0, s),
                        vec![standby(0, None, "connection refused")],
                    ),
                    (104, tick(), vec![]),
                    (105, tick(), vec![ask()]),
                    (
                        106,
                        answered(Answer::Held { term: 1 }, 105, s),
                        vec![leading(1)],
                    ),
                    (255, tick(), vec![renew(1)]),
                    (
                        260,
                        answered(Answer::Failed("timeout".into()), 255, s),
                        // Still leading, with the problem said.
                        vec![Effect::Publish(Leadership {
                            term: 1,
                            leading: true,
                            leader: Some("core-a".into()),
                            problem: "timeout".into(),
                        })],
                    ),
                    (335, tick(), vec![renew(1)]),
                ]
            },
        );
        run(
            "a grant that comes back after its lease is not led on",
            |s| {
                vec![
                    (0, tick(), vec![ask()]),
                    // Sent at 0, answered at 700: the lease ended at 600. The
                    // term is heard; this Core asks again at once.
                    (
                        700,
                        answered(Answer::Held { term: 2 }, 0, s),
                        vec![ask(), standby(2, None, "")],
                    ),
                ]
            },
        );
        run("the term heard never goes back", |s| {
            vec![
                (0, tick(), vec![ask()]),
                (
                    1,
                    answered(
                        Answer::Other {
                            holder: "core-b".into(),
                            term: 9,
                        },
                        0,
                        s,
                    ),
                    vec![standby(9, Some("core-b"), "")],
                ),
                (101, tick(), vec![ask()]),
                (
                    102,
                    answered(
                        Answer::Other {
                            holder: "core-c".into(),
                            term: 5,
                        },
                        101,
                        s,
                    ),
                    vec![standby(9, Some("core-c"), "")],
                ),
            ]
        });
    }

    #[test]
    fn the_runner_wakes_for_the_next_query_or_the_lease_end_whichever_is_first() {
        let start = Instant::now();
        let ms = |n| start + Duration::from_millis(n);
        let mut machine = Machine::new("core-a", Timing::default(), start);
        assert_eq!(machine.next_wake(), Some(start));
        machine.step(Input::Tick, start);
        // Asking, not leading: only the answer wakes it.
        assert_eq!(machine.next_wake(), None);
        machine.step(
            Input::Answered {
                answer: Answer::Held { term: 1 },
                sent: start,
            },
            ms(2),
        );
        assert_eq!(machine.next_wake(), Some(ms(150)));
        machine.step(Input::Tick, ms(150));
        // The renewal is out: the lease's end is next.
        assert_eq!(machine.next_wake(), Some(ms(600)));
    }
}
