//! Per-CPU counters: one per outcome, each naming its verdict and reason.
//!
//! CPUs below [`COUNTER_ROWS`] count in their own row of a table the program
//! finds at a constant address ([`CounterRows`]), which costs no map lookup;
//! any further CPU counts in its entry of the per-CPU `COUNTERS` map. Each
//! CPU writes only its own counters, so no atomics are needed; user space
//! sums both.

/// What the XDP program does with a frame.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Verdict {
    /// `XDP_ABORTED`: the program hit an internal error.
    Aborted = 0,
    /// `XDP_DROP`.
    Drop = 1,
    /// `XDP_PASS`: on to the kernel's stack, untouched.
    Pass = 2,
    /// `XDP_TX`: back out of the interface it came in on, Ethernet
    /// addresses rewritten, to another gateway (the director, the
    /// handover).
    Tx = 3,
}

impl Verdict {
    /// The verdict's short name, as `tidectl` shows it.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Aborted => "aborted",
            Self::Drop => "drop",
            Self::Pass => "pass",
            Self::Tx => "tx",
        }
    }
}

/// Index into the `COUNTERS` map: one outcome of the shield.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Counter {
    /// Not UDP to a service address and port (ARP, TCP, other ports...).
    NotService = 0,
    /// An IP fragment: there is no whole UDP header to check, so the kernel
    /// reassembles it and WireGuard authenticates the result. (An IPv6
    /// atomic fragment, offset 0 and no more to come, is the whole datagram
    /// and is checked as one.)
    Fragment = 1,
    /// Headers cut short or malformed before the UDP destination could be
    /// read; the kernel's own checks drop such frames.
    Unparsed = 2,
    /// WireGuard handshake initiation (type 1) of the right length.
    Initiation = 3,
    /// WireGuard handshake response (type 2) of the right length.
    Response = 4,
    /// WireGuard cookie reply (type 3) of the right length.
    CookieReply = 5,
    /// WireGuard transport data (type 4) of a valid length.
    Transport = 6,
    /// The UDP length field claims more bytes than the frame holds, or fewer
    /// than a UDP header.
    Truncated = 7,
    /// The first payload byte is not a WireGuard message type.
    BadType = 8,
    /// The payload length is wrong for its message type.
    BadLength = 9,
    /// One of the three reserved bytes after the type is not zero.
    BadReserved = 10,
    /// A map lookup that cannot fail failed.
    Aborted = 11,
    /// ARP or a neighbour solicitation for a VIP, or WireGuard to a VIP,
    /// while this gateway's lease has lapsed (see `fence`).
    Fenced = 12,
    /// WireGuard to a VIP that the director sent on to the gateway the
    /// client is pinned to (see `director`).
    Steered = 13,
    /// WireGuard of a session this gateway did not make, during the
    /// second-chance window of a planned handover: sent on to the other
    /// gateway (see `tidegate_common::handover`).
    HandedOver = 14,
    /// IPv6 to a service address whose extension headers go on past those
    /// the walk follows: what they carry cannot be checked.
    DeepHeaders = 15,
    /// An IP fragment to a service address while the shield drops them
    /// (see `tidegate_common::shield::DROP_FRAGMENTS`).
    FragmentDropped = 16,
    /// To the HA advert port from a gateway of the location, or from a
    /// stranger on the segment within its budget (see
    /// `tidegate_common::shield`).
    Advert = 17,
    /// To the advert port with a TTL below 255: a router forwarded it.
    AdvertTtl = 18,
    /// To the advert port from neither a gateway of the location nor the
    /// segment (with unicast adverts: from no configured peer).
    AdvertStranger = 19,
    /// To the advert port from a stranger on the segment, past the budget.
    AdvertThrottled = 20,
}

impl Counter {
    /// Every counter, in index order.
    pub const ALL: [Counter; 21] = [
        Self::NotService,
        Self::Fragment,
        Self::Unparsed,
        Self::Initiation,
        Self::Response,
        Self::CookieReply,
        Self::Transport,
        Self::Truncated,
        Self::BadType,
        Self::BadLength,
        Self::BadReserved,
        Self::Aborted,
        Self::Fenced,
        Self::Steered,
        Self::HandedOver,
        Self::DeepHeaders,
        Self::FragmentDropped,
        Self::Advert,
        Self::AdvertTtl,
        Self::AdvertStranger,
        Self::AdvertThrottled,
    ];

    /// The verdict the program returns when it counts this outcome.
    pub const fn verdict(self) -> Verdict {
        match self {
            Self::NotService
            | Self::Fragment
            | Self::Unparsed
            | Self::Initiation
            | Self::Response
            | Self::CookieReply
            | Self::Transport
            | Self::Advert => Verdict::Pass,
            Self::Truncated
            | Self::BadType
            | Self::BadLength
            | Self::BadReserved
            | Self::Fenced
            | Self::DeepHeaders
            | Self::FragmentDropped
            | Self::AdvertTtl
            | Self::AdvertStranger
            | Self::AdvertThrottled => Verdict::Drop,
            Self::Aborted => Verdict::Aborted,
            Self::Steered | Self::HandedOver => Verdict::Tx,
        }
    }

    /// Whether this outcome is a well-formed WireGuard message to a service
    /// that this gateway's stack receives (steered messages are not).
    pub const fn is_wireguard(self) -> bool {
        matches!(
            self,
            Self::Initiation | Self::Response | Self::CookieReply | Self::Transport
        )
    }

    /// The counter's short name, as `tidectl` and the JSON output show it.
    pub const fn name(self) -> &'static str {
        match self {
            Self::NotService => "not-service",
            Self::Fragment => "fragment",
            Self::Unparsed => "unparsed",
            Self::Initiation => "wg-initiation",
            Self::Response => "wg-response",
            Self::CookieReply => "wg-cookie-reply",
            Self::Transport => "wg-transport",
            Self::Truncated => "truncated",
            Self::BadType => "bad-type",
            Self::BadLength => "bad-length",
            Self::BadReserved => "bad-reserved",
            Self::Aborted => "aborted",
            Self::Fenced => "fenced",
            Self::Steered => "wg-steered",
            Self::HandedOver => "handed-over",
            Self::DeepHeaders => "deep-headers",
            Self::FragmentDropped => "fragment-dropped",
            Self::Advert => "advert",
            Self::AdvertTtl => "advert-ttl",
            Self::AdvertStranger => "advert-stranger",
            Self::AdvertThrottled => "advert-throttled",
        }
    }
}

/// Packets and bytes seen for one counter on one CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CounterValue {
    /// Frames counted.
    pub packets: u64,
    /// Their bytes, from the Ethernet header to the end of the frame.
    pub bytes: u64,
}

const _: () = assert!(size_of::<CounterValue>() == 16);

/// One CPU's counters: every counter, indexed by [`Counter`]. The one
/// `COUNTERS` entry (per CPU), and the payload of a [`CounterRow`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub by_counter: [CounterValue; Counter::ALL.len()],
}

const _: () = assert!(size_of::<Counters>() == 16 * Counter::ALL.len());

impl Counters {
    /// Nothing counted.
    pub const ZERO: Self = Self {
        by_counter: [CounterValue {
            packets: 0,
            bytes: 0,
        }; Counter::ALL.len()],
    };
}

/// CPUs that count in the [`CounterRows`] table (32 KiB); CPUs numbered from
/// here on count in the per-CPU `COUNTERS` map.
pub const COUNTER_ROWS: usize = 128;

/// One CPU's row of [`CounterRows`]: its counters, then a cache line of
/// padding, so that no two CPUs' counters share a cache line wherever the
/// kernel places the table.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CounterRow {
    pub counters: Counters,
    pub _pad: [u64; 8],
}

const _: () = assert!(size_of::<CounterRow>() == size_of::<Counters>() + 64);

impl CounterRow {
    /// Nothing counted.
    pub const ZERO: Self = Self {
        counters: Counters::ZERO,
        _pad: [0; 8],
    };
}

/// The program's `COUNTER_ROWS` global: a row per CPU below [`COUNTER_ROWS`],
/// indexed by CPU number.
pub type CounterRows = [CounterRow; COUNTER_ROWS];

// SAFETY: `Counters` is `repr(C)`, `Copy`, and has no padding (size asserted above).
#[cfg(feature = "user")]
unsafe impl aya::Pod for Counters {}

// SAFETY: `CounterRow` is `repr(C)`, `Copy`, and has no padding (size asserted above).
#[cfg(feature = "user")]
unsafe impl aya::Pod for CounterRow {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_lists_every_counter_at_its_index() {
        for (index, counter) in Counter::ALL.iter().enumerate() {
            assert_eq!(*counter as usize, index, "{counter:?}");
        }
    }
}
