//! How many events a gateway's link may write to the log: a burst, then a
//! steady rate. What is over the budget is counted, and the next event
//! written says how many were left out, so a gateway flipping its role or
//! its link on every message costs the state thread a bounded number of
//! writes.

/// Events written in a burst.
pub const BURST: u32 = 10;
/// Then one per this many milliseconds (ten a minute).
pub const REFILL_MS: i64 = 6_000;

/// One gateway's event budget.
#[derive(Debug, Clone)]
pub struct EventBudget {
    tokens: u32,
    /// When the last token was added (or the budget made).
    refilled_ms: i64,
    /// Events left out since the last one written.
    left_out: u32,
}

impl EventBudget {
    pub fn new(now_ms: i64) -> Self {
        Self {
            tokens: BURST,
            refilled_ms: now_ms,
            left_out: 0,
        }
    }

    /// Takes one event's share at `now_ms`: `Some(left_out)` when it may be
    /// written (with the number left out before it), `None` when it is over
    /// the budget (and counted).
    pub fn take(&mut self, now_ms: i64) -> Option<u32> {
        let earned = (now_ms - self.refilled_ms).max(0) / REFILL_MS;
        if earned > 0 {
            let earned = u32::try_from(earned).unwrap_or(u32::MAX);
            self.tokens = self.tokens.saturating_add(earned).min(BURST);
            self.refilled_ms = if self.tokens == BURST {
                now_ms
            } else {
                self.refilled_ms + i64::from(earned) * REFILL_MS
            };
        }
        if self.tokens == 0 {
            self.left_out = self.left_out.saturating_add(1);
            return None;
        }
        self.tokens -= 1;
        Some(std::mem::take(&mut self.left_out))
    }
}

/// An event's message, saying how many were left out before it.
pub fn with_left_out(message: String, left_out: u32) -> String {
    if left_out == 0 {
        message
    } else {
        format!(
            "{message} ({left_out} earlier events of this gateway not logged: over {BURST} at once or one per {} s)",
            REFILL_MS / 1000
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_one_per_refill_and_what_is_over_is_counted() {
        let mut budget = EventBudget::new(0);
        for _ in 0..BURST {
            assert_eq!(budget.take(0), Some(0));
        }
        // A flood: every further event at once is left out.
        for _ in 0..1000 {
            assert_eq!(budget.take(100), None);
        }
        assert_eq!(budget.take(REFILL_MS - 1), None);
        // One token per refill; the next written says how many were not.
        assert_eq!(budget.take(REFILL_MS), Some(1001));
        assert_eq!(budget.take(REFILL_MS), None);
        assert_eq!(budget.take(2 * REFILL_MS), Some(1));
        // Quiet for long: a whole burst again, no more.
        let later = 100 * REFILL_MS;
        for _ in 0..BURST {
            assert_eq!(budget.take(later), Some(0));
        }
        assert_eq!(budget.take(later), None);
    }

    #[test]
    fn a_message_names_what_was_left_out() {
        assert_eq!(with_left_out("a -> b".into(), 0), "a -> b");
        assert!(with_left_out("a -> b".into(), 7).starts_with("a -> b (7 earlier events"));
    }
}
