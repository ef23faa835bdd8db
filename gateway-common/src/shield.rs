//! The shield's settings beyond the services: what it does with the frames
//! to a service address it cannot check, and who may send to the HA advert
//! port.
//!
//! Adverts and endpoint-sharing messages are authenticated, but a flood of
//! junk would crowd real adverts out of the socket's queue before the agent
//! could tell them apart. So the program lets through to the advert port
//! only datagrams sent with TTL 255 (no router forwarded them, RFC 5798
//! section 5.1.1.3) from a source `ADVERT_SOURCES` names: a gateway of the
//! location (configured, or heard in an authenticated advert) passes; a
//! stranger on the location's segment passes only within a budget per CPU
//! (with multicast adverts, that is how a new gateway is first heard);
//! anyone else is dropped.

/// [`Shield::flags`]: IP fragments to a service address are dropped rather
/// than passed to the kernel to reassemble. The first fragment carries the
/// UDP header, so without it the rest never make a datagram.
pub const DROP_FRAGMENTS: u32 = 1;

/// The program's `SHIELD` global (section `maps::SHIELD`). User space
/// writes it; the program only reads it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Shield {
    /// [`DROP_FRAGMENTS`] or 0.
    pub flags: u32,
    /// Datagrams to the advert port from strangers on the segment admitted
    /// per second, per CPU (burst: as many).
    pub stranger_rate: u32,
}

const _: () = assert!(size_of::<Shield>() == 8);

impl Shield {
    /// Fragments pass; no stranger is admitted.
    pub const DEFAULT: Self = Self {
        flags: 0,
        stranger_rate: 0,
    };
}

/// Entries in `ADVERT_SOURCES`: the location's gateways and the segment's
/// prefixes.
pub const MAX_ADVERT_SOURCES: u32 = 256;

/// An `ADVERT_SOURCES` value: a gateway of the location (a /32).
pub const SOURCE_GATEWAY: u32 = 1;
/// An `ADVERT_SOURCES` value: a prefix of the location's segment.
pub const SOURCE_SEGMENT: u32 = 2;

/// One CPU's budget for strangers: a token bucket. `credit` is in
/// billionths of a datagram, so that a refill of `elapsed_ns * rate` needs
/// no division.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StrangerBudget {
    pub credit: u64,
    /// `bpf_ktime_get_ns` at the last refill.
    pub refilled_ns: u64,
}

const _: () = assert!(size_of::<StrangerBudget>() == 16);

/// What one admitted datagram costs in [`StrangerBudget::credit`].
pub const CREDIT_PER_DATAGRAM: u64 = 1_000_000_000;

impl StrangerBudget {
    /// Refills the budget for the time since the last refill at `rate` per
    /// second (at most one second's worth), then spends one datagram if it
    /// can; whether it could.
    #[inline(always)]
    pub fn spend(&mut self, rate: u32, now_ns: u64) -> bool {
        let cap = u64::from(rate) * CREDIT_PER_DATAGRAM;
        let elapsed = now_ns
            .saturating_sub(self.refilled_ns)
            .min(CREDIT_PER_DATAGRAM);
        self.credit = (self.credit + elapsed * u64::from(rate)).min(cap);
        self.refilled_ns = now_ns;
        if self.credit < CREDIT_PER_DATAGRAM {
            return false;
        }
        self.credit -= CREDIT_PER_DATAGRAM;
        true
    }
}

// SAFETY: `repr(C)`, `Copy`, no padding (sizes asserted above).
#[cfg(feature = "user")]
unsafe impl aya::Pod for Shield {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_admits_its_rate_and_a_burst_of_one_second() {
        let mut budget = StrangerBudget::default();
        let second = 1_000_000_000;
        // Idle for a while: a full second's worth, no more.
        let admitted = (0..100).filter(|_| budget.spend(10, 5 * second)).count();
        assert_eq!(admitted, 10);
        // Then 10 per second: one every 100 ms.
        assert!(!budget.spend(10, 5 * second + 99_999_999));
        assert!(budget.spend(10, 5 * second + 100_000_000));
        assert!(!budget.spend(10, 5 * second + 100_000_001));
        // Rate 0 admits nothing.
        let mut closed = StrangerBudget::default();
        assert!(!closed.spend(0, 9 * second));
    }
}
